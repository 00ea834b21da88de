"""The arithmetic task outside training: how often a chat model gets held-out problems right, with or
without ppo.py's calculator, and SFT data that teaches the calculator's tag.

    python examples/arithmetic.py --model runs/smollm2-135m --digits 2               # in its head
    python examples/arithmetic.py --model runs/smollm2-135m --digits 2 --operations '*' --calculator
    python examples/arithmetic.py --digits 2 --operations '*' --sft-data runs/calc_sft.jsonl --sft-problems 256

The problems are ppo.py's own (`arithmetic_problems`: the same --seed, difficulty flags and held-out
split as `ppo.py --task arithmetic`, --eval-prompts of them), each a user message rendered by the
model's chat template with its generation prompt, answered greedily and, --samples times each, at
--temperature (no top-k, no top-p); the answer is the reply's last integer (`arithmetic_answer`).
Prints accuracy greedy and sampled, pass@k, the share of well-formed replies and the mean reply length.
With --calculator each problem is an episode of ppo.py's CalculatorEnv (its system message, then the
question): a reply holding `<calc>...</calc>` gets a tool message with the result and the model
answers again, up to --max-turns replies; the score is the environment's. Between turns the
conversation is rendered anew from its text (an evaluation has no loss, so the sampled ids need not
be kept, unlike in ppo.py's rollouts).
--sft-data writes, instead, one conversation per training problem (never a held-out one) in the form
CalculatorEnv expects, for sft.py: system, question, `<calc>A*B</calc>`, the tool's result, the answer.
"""

import importlib.util
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    model: str = "runs/smollm2-135m"
    """chat model directory to evaluate (not loaded with --sft-data)"""
    seed: int = 1
    """ppo.py's --seed: which problems (the held-out split does not depend on it)"""
    operands: int = 2
    """numbers in a problem (ppo.py's --operands)"""
    digits: int = 2
    """digits of each number (ppo.py's --digits)"""
    operations: str = "+"
    """operators drawn from (ppo.py's --operations)"""
    eval_prompts: int = 64
    """held-out problems evaluated (ppo.py's --eval-prompts)"""
    samples: int = 2
    """sampled replies per problem, besides the greedy one (0: greedy only)"""
    max_new_tokens: int = 32
    """new tokens per reply"""
    temperature: float = 1.0
    """sampling temperature of the sampled replies (ppo.py's --temperature)"""
    calculator: bool = False
    """play each problem as an episode of ppo.py's CalculatorEnv (--env calculator)"""
    max_turns: int = 3
    """--calculator: replies per episode at most"""
    batch_size: int = 64
    """replies generated together"""
    sft_data: str = ""
    """write calculator conversations of training problems to this JSONL file for sft.py, and evaluate nothing"""
    sft_problems: int = 256
    """--sft-data: training problems, one conversation each"""


def load_ppo():
    sys.path.insert(0, os.path.join(HERE, ".."))  # ppo.py imports parallel and kernels beside it
    spec = importlib.util.spec_from_file_location("ppo", os.path.join(HERE, "..", "ppo.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["ppo"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def write_sft_data(args: Args, ppo):
    rows = ppo.arithmetic_problems(args.seed, args.sft_problems, args.operands, args.digits, args.operations, False)
    with open(args.sft_data, "w") as file:
        for row in rows:
            expression = row["prompt"][-1]["content"].split("What is ")[1].split("?")[0].replace(" ", "")
            messages = [*ppo.CalculatorEnv(row).reset(), {"role": "assistant", "content": f"<calc>{expression}</calc>"}]
            messages += [{"role": "tool", "content": ppo.calculate(expression)}]
            messages += [{"role": "assistant", "content": str(row["answer"])}]
            file.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {len(rows)} conversations to {args.sft_data}")


def reply(model, tokenizer, conversations: list, args: Args, greedy: bool) -> list:
    """One reply per conversation: its text (cut at the end of turn) and its length in tokens."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    out = []
    sampling = (
        dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    )
    for start in range(0, len(texts), args.batch_size):
        batch = tokenizer(
            texts[start : start + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            generated = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                **sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )[:, batch.input_ids.shape[1] :]
        for ids in generated.tolist():
            length = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
            out.append((tokenizer.decode(ids[:length], skip_special_tokens=True), length))
    return out


def evaluate(model, tokenizer, rows: list, args: Args, ppo, greedy: bool) -> dict:
    if not args.calculator:
        replies = reply(model, tokenizer, [row["prompt"] for row in rows], args, greedy)
        texts, lengths = zip(*replies)
        return {
            "right": [ppo.arithmetic_answer(t)[0] == r["answer"] for t, r in zip(texts, rows)],
            "texts": texts,
            "lengths": lengths,
            "well_formed": [ppo.arithmetic_answer(t)[1] for t in texts],
        }
    envs = [ppo.CalculatorEnv(row) for row in rows]
    conversations = [env.reset() for env in envs]
    scores, lengths, turns, live = [0.0] * len(rows), [0] * len(rows), [0] * len(rows), list(range(len(rows)))
    for turn in range(args.max_turns):
        replies = reply(model, tokenizer, [conversations[i] for i in live], args, greedy)
        still = []
        for i, (text, length) in zip(live, replies):
            message = {"role": "assistant", "content": text}
            messages, score, done = envs[i].step(message)
            conversations[i] += [message, *messages]
            scores[i], lengths[i], turns[i] = scores[i] + score, lengths[i] + length, turn + 1
            if not done:
                still.append(i)
        live = still
    texts = [json.dumps(c[len(envs[0].reset()) :]) for c in conversations]
    return {"right": [s >= 1 for s in scores], "texts": texts, "lengths": lengths, "turns": turns}


def main(args: Args):
    ppo = load_ppo()
    if args.sft_data:
        return write_sft_data(args, ppo)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = ppo.arithmetic_problems(args.seed, args.eval_prompts, args.operands, args.digits, args.operations, True)
    torch.manual_seed(args.seed)
    print(f"{len(rows)} held-out problems, e.g. {rows[0]['prompt'][-1]['content']!r} = {rows[0]['answer']}")
    for name, greedy, copies in (("greedy", True, 1), ("sampled", False, args.samples)):
        if copies == 0:
            continue
        result = evaluate(model, tokenizer, [row for row in rows for _ in range(copies)], args, ppo, greedy)
        right = np.array(result["right"]).reshape(len(rows), copies)
        line = f"{name}: accuracy {right.mean():.4f}, mean length {np.mean(result['lengths']):.1f} tokens"
        line += f", well-formed {np.mean(result['well_formed']):.4f}" if "well_formed" in result else ""
        line += f", turns {np.mean(result['turns']):.2f}" if "turns" in result else ""
        if copies > 1:
            passes = [ppo.pass_at_k(copies, int(c), copies) for c in right.sum(1)]
            line += f", pass@{copies} {np.mean(passes):.4f}"
        print(line)
        for text, ok in list(zip(result["texts"], result["right"]))[:3]:
            print(f"   {'right' if ok else 'wrong'}: {text!r}")


if __name__ == "__main__":
    main(tyro.cli(Args))
