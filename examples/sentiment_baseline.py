"""The starting point of the sentiment task: how positive are a model's continuations of the prompts?

    pip install -r requirements-examples.txt
    python examples/convert_smollm2.py                      # once: runs/smollm2-135m/
    python examples/sentiment_baseline.py                   # every prompt, sampled and greedy
    python examples/sentiment_baseline.py --model runs/ppo_run --num-prompts 128
    python examples/sentiment_baseline.py --prompts examples/sentiment_chat_prompts.jsonl   # as chat
    python examples/sentiment_baseline.py --prompts examples/sentiment_chat_prompts.jsonl \
        --best-of 4 --demos runs/sentiment_chat_demos.jsonl                              # SFT data

Continues each prompt of examples/sentiment_prompts.jsonl as plain text, or of
examples/sentiment_chat_prompts.jsonl (a user message "Continue this movie review: ...") rendered with
the model's chat template and its generation prompt, in left-padded batches, once sampled
(temperature 1, no top-k, no top-p) and once greedily, and scores
the continuation alone, cut at the first EOS, with VADER's compound score (-1 very negative to +1
very positive). Prints the mean score, the fraction of continuations that end with EOS, the seconds
per batch, and a few samples; `--output` also writes every continuation and score as JSONL.
`--demos` writes SFT data for sft.py: for each prompt the best of `--best-of` sampled replies by VADER,
as a `{"messages": [user, assistant]}` conversation (chat prompts) or `{"prompt", "completion"}` record.
"""

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    model: str = "runs/smollm2-135m"
    """causal LM directory (or hub name) to continue the prompts"""
    prompts: str = os.path.join(HERE, "sentiment_prompts.jsonl")
    """JSONL file with one {"prompt": ...} per line"""
    num_prompts: int = 0
    """use the first N prompts (0: all)"""
    batch_size: int = 64
    """prompts per generate() call"""
    max_new_tokens: int = 24
    """length of each continuation"""
    temperature: float = 1.0
    """sampling temperature (the greedy pass ignores it)"""
    seed: int = 0
    """torch seed for sampling"""
    output: str = ""
    """if set, write every prompt, continuation and score to this JSONL file"""
    best_of: int = 4
    """replies sampled per prompt for --demos"""
    demos: str = ""
    """if set, write the best of --best-of sampled replies per prompt to this JSONL file as SFT data"""


def continue_prompts(model, tokenizer, prompts: list, args: Args, greedy: bool):
    """(continuation texts, ended-with-EOS flags, seconds per batch) for left-padded batches."""
    import torch
    from transformers import GenerationConfig

    sampling = (
        dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    )
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    tokenizer.padding_side = "left"
    # A chat prompt is rendered by the template, which writes its own special tokens.
    chat = [isinstance(p, list) for p in prompts]
    texts_in = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) if c else p
        for p, c in zip(prompts, chat)
    ]
    texts, ended, seconds = [], [], []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(
            texts_in[start : start + args.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not any(chat),
        )
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**batch, generation_config=config)
        seconds.append(time.perf_counter() - began)
        for row in output[:, batch.input_ids.shape[1] :].tolist():
            stop = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            ended.append(stop < len(row))
            texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
    return texts, ended, seconds


if __name__ == "__main__":
    args = tyro.cli(Args)
    if importlib.util.find_spec("vaderSentiment") is None:
        print(
            "error: missing optional package vaderSentiment; run: pip install -r requirements-examples.txt",
            file=sys.stderr,
        )
        sys.exit(1)
    if not os.path.exists(args.model):
        print(f"error: {args.model} does not exist; run python examples/convert_smollm2.py first", file=sys.stderr)
        sys.exit(1)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    torch.manual_seed(args.seed)
    with open(args.prompts) as file:
        prompts = [json.loads(line)["prompt"] for line in file if line.strip()]
    prompts = prompts[: args.num_prompts or None]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    analyzer = SentimentIntensityAnalyzer()
    print(
        f"{len(prompts)} prompts, {args.model}, batches of {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )

    records = []
    for name, greedy in (("sampled", False), ("greedy", True)):
        texts, ended, seconds = continue_prompts(model, tokenizer, prompts, args, greedy)
        scores = [analyzer.polarity_scores(text)["compound"] for text in texts]
        full = [
            s
            for s, start in zip(seconds, range(0, len(prompts), args.batch_size))
            if len(prompts) - start >= args.batch_size
        ]
        positive, negative = sum(s > 0.05 for s in scores) / len(scores), sum(s < -0.05 for s in scores) / len(scores)
        print(
            f"{name:8s} mean compound {sum(scores) / len(scores):+.4f}  positive {positive:.1%}  negative "
            f"{negative:.1%}  "
            f"ended with EOS {sum(ended) / len(ended):.1%}  s/batch {sum(full) / max(len(full), 1):.2f} (full batches "
            f"of {args.batch_size})"
        )
        for prompt, text, score in list(zip(prompts, texts, scores))[:3]:
            print(f"    {score:+.3f}  {prompt!r} -> {text!r}")
        records += [
            dict(decoding=name, prompt=p, continuation=t, eos=e, compound=s)
            for p, t, e, s in zip(prompts, texts, ended, scores)
        ]
    if args.output:
        with open(args.output, "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)
    if args.demos:
        # Best of N: the prompts repeated N times in one pass, each prompt's highest-scored reply kept.
        texts, _, _ = continue_prompts(model, tokenizer, prompts * args.best_of, args, greedy=False)
        scores = [analyzer.polarity_scores(text)["compound"] for text in texts]
        with open(args.demos, "w") as file:
            for i, prompt in enumerate(prompts):
                best = max(range(i, len(texts), len(prompts)), key=lambda j: scores[j])
                reply = texts[best].strip()
                record = (
                    {"messages": prompt + [{"role": "assistant", "content": reply}]}
                    if isinstance(prompt, list)
                    else {"prompt": prompt, "completion": " " + reply}
                )
                file.write(json.dumps(record) + "\n")
        mean = sum(max(scores[j] for j in range(i, len(texts), len(prompts))) for i in range(len(prompts))) / len(
            prompts
        )
        print(
            f"wrote {len(prompts)} demonstrations to {args.demos} (best of {args.best_of}: mean compound {mean:+.4f})"
        )
