"""The starting point of the sentiment task: how positive are a model's continuations of the prompts?

    pip install -r requirements-examples.txt
    python examples/convert_smollm2.py                      # once: runs/smollm2-135m/
    python examples/sentiment_baseline.py                   # every prompt, sampled and greedy
    python examples/sentiment_baseline.py --model runs/ppo_run --num-prompts 128

Continues each prompt of examples/sentiment_prompts.jsonl as plain text (no chat template), in
left-padded batches, once sampled (temperature 1, no top-k, no top-p) and once greedily, and scores
the continuation alone, cut at the first EOS, with VADER's compound score (-1 very negative to +1
very positive). Prints the mean score, the fraction of continuations that end with EOS, the seconds
per batch, and a few samples; `--output` also writes every continuation and score as JSONL.
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
    texts, ended, seconds = [], [], []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start : start + args.batch_size], return_tensors="pt", padding=True)
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
