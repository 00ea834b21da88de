"""sft.py's training step with --packing against padded micro-batches, on long-tailed sequence lengths.

    python benchmarks/packing.py                                   # SmolLM2-135M's shape, CUDA when present
    python benchmarks/packing.py --model tiny --steps 2 --repeats 1  # a smoke run of a minute on a CPU
    python benchmarks/packing.py --script ppo                      # ppo.py's training pass on rollouts

Real data mixes short and long examples (chat turns of a few tokens to thousands): a padded micro-batch
computes every row at its longest example's length. Here the lengths in tokens are drawn from a lognormal
distribution, exp(N(log --median, --sigma^2)), rounded and clipped to [--min-length, --max-length]; the
first quarter of each example (at least one token) is prompt, the rest is learned. Both layouts run the
same optimizer steps of sft.py (its collate, accumulate_gradients and an AdamW step) on the same batches
of a randomly initialised model, in turns (so a change in the machine's load hits both alike), and the
table gives the tokens per second of each (real tokens, padding not counted; median step of --repeats
rounds after a warm-up round), their ratio and the fraction of each layout's rows that is padding.
Packed rows are no longer than the micro-batch's longest example (see sft.collate), so the packed step
never computes more than the padded one; on a CPU its attention runs SDPA with a block-diagonal mask.

With --script ppo the same examples are rollouts, laid out as ppo.py lays them out: each one's first quarter
a prompt, left-padded to the batch's longest prompt, the rest its response, right-padded to the longest response;
the step is ppo.py's training pass for the policy, packed (--packing) or padded, through ppo.py's own functions
(micro_batches_of, trunk_states, logprobs_from_hidden: the trunk, then the fused log-probs and entropies of the
response tokens), the backward of their sum and an AdamW step; TRL is not run then.

TRL's SFTTrainer with its own packing runs last on the same examples and a fresh copy of the same model
(AdamW at the same learning rate, the loss on the same completion tokens) when trl is installed (run the
script in benchmarks/requirements-peers-trl116.txt's environment): TRL packs the whole dataset best fit
decreasing into rows of --max-length tokens, and its padding-free collator joins a step's rows into one
row with restarting position ids. Its steps hold whole packed rows rather than --batch-size examples, so
it is given the number of rows per step that holds about as many real tokens as ours' steps; the table
counts the real tokens of each of its timed steps (the rows are taken in order) over their seconds.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402


def random_model(name: str, max_length: int, device):
    """A randomly initialised causal LM: SmolLM2-135M's shape (Llama: 30 layers, hidden 576, 9 heads, 3 KV
    heads, vocabulary 49152), or a tiny 2-layer Llama of hidden 64 for smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    if name == "tiny":
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(
        vocab_size=49152 if name == "smollm2" else 512,
        num_key_value_heads=3 if name == "smollm2" else 2,
        max_position_embeddings=max(2048, max_length),
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device), config.vocab_size


def skewed_sequences(n: int, options, vocab_size: int, seed: int = 0) -> list:
    """(token ids, loss mask) of n examples with lognormal lengths (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(options.median), options.sigma, n)), options.min_length, None)
    sequences = []
    for length in np.minimum(lengths, options.max_length).astype(int):
        prompt = max(1, length // 4)
        sequences.append((rng.integers(1, vocab_size, length).tolist(), [0] * prompt + [1] * (length - prompt)))
    return sequences


def rollout_micro_batches(batch: list, options, packing: bool) -> list:
    """A batch of examples as ppo.py lays out rollouts (see the module's docstring), in ppo.py's micro-batches."""
    prompts, responses = zip(*((ids[: mask.index(1)], ids[mask.index(1) :]) for ids, mask in batch))
    prompt_length, width = max(map(len, prompts)), max(map(len, prompts)) + max(map(len, responses))
    input_ids, attention_mask = torch.zeros(len(batch), width, dtype=torch.long), torch.zeros(len(batch), width)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        columns = slice(prompt_length - len(prompt), prompt_length + len(response))
        input_ids[row, columns], attention_mask[row, columns] = torch.tensor(prompt + response), 1
    rows = list(torch.arange(len(batch)).split(options.micro_batch_size))
    args = argparse.Namespace(packing=packing)
    micro_batches = ppo.micro_batches_of(
        rows, input_ids.to(options.device), attention_mask.long().to(options.device), args
    )
    return [micro_batch | {"prompt_length": prompt_length} for micro_batch in micro_batches]


def ppo_pass(model, micro_batches: list, autocast):
    """ppo.py's training pass for the policy over one minibatch: per micro-batch the trunk, the fused log-probs and
    entropies of the response tokens, and the backward of their sum over real tokens."""
    for micro_batch in micro_batches:
        with autocast:
            hidden = ppo.trunk_states(model, micro_batch)
            logprobs, entropy, _ = ppo.logprobs_from_hidden(
                model.get_output_embeddings(),
                hidden,
                micro_batch["input_ids"],
                micro_batch["prompt_length"],
                1.0,
                with_entropy=True,
            )
        real = micro_batch["attention_mask"][:, micro_batch["prompt_length"] :].bool()
        (logprobs + entropy).where(real, 0.0).sum().backward()


def trl_tokens_per_second(options, data: list, tokens_per_step: float) -> tuple:
    """(real tokens per second, rows per step) of TRL's SFTTrainer with packing=True on `data` (see the
    module's docstring); the median of the --repeats x --steps steps after --steps warm-up steps."""
    import tempfile

    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from torch.utils.data import SequentialSampler
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows_per_step = max(1, round(tokens_per_step / options.max_length))
    steps = options.steps * (options.repeats + 1)
    examples = [data[k % len(data)] for k in range(len(data) * (steps // options.steps))]
    dataset = Dataset.from_dict(
        {"input_ids": [ids for ids, _ in examples], "completion_mask": [m for _, m in examples]}
    )
    model, vocab_size = random_model(options.model, options.max_length, options.device)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w0")  # id 0, as ours'
    seconds = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if options.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as folder:
        config = SFTConfig(
            output_dir=folder,
            packing=True,
            max_length=options.max_length,
            per_device_train_batch_size=rows_per_step,
            learning_rate=1e-5,
            max_steps=steps,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.01,  # torch.optim.AdamW's default, which ours' side uses
            bf16=options.dtype == "bf16",
            use_cpu=options.device == "cpu",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model, config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimes()])
        trainer._get_train_sampler = lambda *args: SequentialSampler(trainer.train_dataset)  # known rows per step
        trainer.train()
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    tokens = [sum(lengths[k * rows_per_step : (k + 1) * rows_per_step]) for k in range(len(seconds))]
    speeds = [t / s for t, s in zip(tokens[options.steps :], seconds[options.steps :])]
    return statistics.median(speeds), rows_per_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", choices=["sft", "ppo"], default="sft", help="whose training step is timed")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as sft.py's")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--median", type=float, default=128, help="median length in tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="spread of log(length)")
    parser.add_argument("--min-length", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (different batches) per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    options = parser.parse_args()
    model, vocab_size = random_model(options.model, options.max_length, options.device)
    if options.script == "sft":
        model = parallel.DataParallel(model)  # one process: the pass-through wrapper sft.py trains through
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(torch.device(options.device).type, dtype=torch.bfloat16, enabled=options.dtype == "bf16")
    data = skewed_sequences(options.batch_size * options.steps, options, vocab_size)
    batches = [data[k : k + options.batch_size] for k in range(0, len(data), options.batch_size)]
    layouts = {}
    for packing in (False, True):
        if options.script == "ppo":
            layouts[packing] = [rollout_micro_batches(batch, options, packing) for batch in batches]
        else:
            args = sft.Args(micro_batch_size=options.micro_batch_size, packing=packing)
            layouts[packing] = [sft.micro_batches_of(batch, args, 0, options.device) for batch in batches]

    def round_of(packing: bool) -> float:
        """Seconds of one step (the median over the round's batches)."""
        seconds = []
        for batch, micro_batches in zip(batches, layouts[packing]):
            start = time.perf_counter()
            if options.script == "ppo":
                ppo_pass(model, micro_batches, autocast)
            else:
                sft.accumulate_gradients(model, micro_batches, sum(sum(mask[1:]) for _, mask in batch), 1, autocast)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if options.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    for packing in (False, True):
        round_of(packing)  # warm-up
    seconds = {False: [], True: []}
    for _ in range(options.repeats):
        for packing in (False, True):
            seconds[packing].append(round_of(packing))
    real = sum(len(ids) for ids, _ in data) / len(batches)  # tokens per step
    speed = {packing: real / statistics.median(times) for packing, times in seconds.items()}
    computed = {  # the rows each layout computes
        packing: [(mb["packed"] or mb if options.script == "ppo" else mb) for step in steps for mb in step]
        for packing, steps in layouts.items()
    }
    padding = {
        packing: 1 - real * len(batches) / sum(mb["input_ids"].numel() for mb in computed[packing])
        for packing in computed
    }
    lengths = [len(ids) for ids, _ in data]
    import importlib.util

    versus_trl = "trl not installed"
    if options.script == "ppo":
        versus_trl = "not run for ppo"
    elif importlib.util.find_spec("trl") is not None:
        del model, optimizer, layouts, computed
        trl_speed, rows = trl_tokens_per_second(options, data, real)
        versus_trl = f"{trl_speed:.0f} ({rows} rows of {options.max_length} per step); packed / TRL "
        versus_trl += f"{speed[True] / trl_speed:.2f}x"
    print(
        "| script | device | dtype | model | batch (micro) | lengths: median, mean, max | padded tokens/s | "
        "packed tokens/s | packed / padded | padding: padded, packed | TRL SFTTrainer packing=True tokens/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {options.script} | {options.device} | {options.dtype} | {options.model} | "
        f"{options.batch_size} ({options.micro_batch_size}) | "
        f"{np.median(lengths):.0f}, {np.mean(lengths):.0f}, {max(lengths)} | {speed[False]:.0f} | {speed[True]:.0f} | "
        f"{speed[True] / speed[False]:.2f}x | {padding[False]:.0%}, {padding[True]:.0%} | {versus_trl} |"
    )


if __name__ == "__main__":
    main()
