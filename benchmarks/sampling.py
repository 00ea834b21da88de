"""ppo.py's decode loop against transformers' model.generate(), side by side in one process.

    python benchmarks/sampling.py                  # CPU here, CUDA when a GPU is present
    python benchmarks/sampling.py --batch 64 --new-tokens 64 --dtype bf16

ppo.generate samples softmax(logits / T) on the KV cache itself (so that a checkpoint's
generation_config cannot change the distribution) and returns each sampled token's log-prob. This
checks that it costs no speed: both sample the same number of tokens from a randomly initialised
model of SmolLM2-135M's shape (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary
49152), with no EOS (every row runs the whole budget), temperature 1, no top-k or top-p. Ours' copy
of the model computes its linear layers by kernels.linear, as ppo.py loads models; generate() runs
the model as built. It prints one markdown row per setting: tokens per second of each (median of
--repeats runs after a warm-up) and their ratio, and how many CPU seconds other processes used
meanwhile (which spoil a CPU timing).
"""

import argparse
import copy
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import ppo  # noqa: E402


def smollm2_shaped(dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def other_cpu_seconds():
    """CPU seconds used by every process but this one, from /proc/stat and our own /proc/self/stat."""
    total = sum(int(x) for x in open("/proc/stat").readline().split()[1:4])  # user, nice, system jiffies
    mine = sum(int(x) for x in open("/proc/self/stat").read().rsplit(")", 1)[1].split()[11:15])
    return (total - mine) / os.sysconf("SC_CLK_TCK")


def timed(functions, repeats, device):
    """Median seconds of each function, run in turns after one warm-up each, so that a change in
    the machine's load hits them alike."""
    for fn in functions:
        fn()
    seconds = [[] for _ in functions]
    for _ in range(repeats):
        for fn, times in zip(functions, seconds):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast over fp32 weights, as --dtype bf16 runs",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    model = smollm2_shaped(torch.float32, options.device)
    ours_model = kernels.use_linear(copy.deepcopy(model))  # as ppo.py loads it; generate() runs the model as loaded
    autocast = torch.autocast(torch.device(options.device).type, dtype=torch.bfloat16, enabled=options.dtype == "bf16")
    # No EOS: a token id that never occurs, so both run the whole budget.
    tokenizer = SimpleNamespace(eos_token_id=-1, pad_token_id=0)
    args = ppo.Args(model="benchmark", max_new_tokens=options.new_tokens)
    print(
        "| device | dtype | batch x (prompt + new) tokens | ours tokens/s | generate() tokens/s | ours / generate() | "
        "other processes' CPU s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in options.batch:
        generator = torch.Generator().manual_seed(1)
        prompt_ids = torch.randint(1, 49152, (batch, options.prompt_tokens), generator=generator).to(options.device)
        prompt_mask = torch.ones_like(prompt_ids)

        def ours():
            with torch.no_grad(), autocast:
                responses, _ = ppo.generate(
                    ours_model, prompt_ids, prompt_mask, args, tokenizer, [tokenizer.eos_token_id]
                )
            assert responses.shape == (batch, options.new_tokens)

        def theirs():
            with torch.no_grad(), autocast:
                output = model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=options.new_tokens,
                    min_new_tokens=options.new_tokens,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            assert output.shape == (batch, options.prompt_tokens + options.new_tokens)

        others = other_cpu_seconds()
        ours_s, theirs_s = timed([ours, theirs], options.repeats, options.device)
        others = other_cpu_seconds() - others
        tokens = batch * options.new_tokens
        print(
            f"| {options.device} | {options.dtype} | {batch} x ({options.prompt_tokens} + {options.new_tokens}) | "
            f"{tokens / ours_s:.0f} | "
            f"{tokens / theirs_s:.0f} | {theirs_s / ours_s:.2f}x | {others:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
