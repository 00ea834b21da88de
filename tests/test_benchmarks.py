"""benchmarks/gpu_check.py, the parts a CPU can check: every row's flags pass its script's
check_args, and a run on the CPU (the same child processes, gloo in place of NCCL) fills the table
from the scripts' metrics.json, or names the error of a row that failed."""

import pytest
import torch

from conftest import LOGPROB_GAP, load_benchmark

gpu_check = load_benchmark("gpu_check")


def table_rows(report: str) -> dict:
    """{check name: {column: cell}} of the report's main table."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["check"]: row for row in rows if "ranks" in row}


@pytest.mark.parametrize("gpus", [1, 2])
def test_every_row_passes_its_scripts_flag_checks(gpus, capsys):
    rows = gpu_check.main(["--dry-run", "--device", "cpu", "--gpus", str(gpus)])
    names = {row.name: row for row in rows}
    assert {
        "sft",
        "reward_model",
        "ilql",
        "ppo",
        "ppo-grpo",
        "ppo-smollm2",
        "ppo-zero3",
        "ppo-tp2",
        "ppo-pp2",
        "kernels",
        "sampling",
    } <= set(names)
    assert all(bool(names[name].skip) == (gpus < 2) for name in ("ppo-zero3", "ppo-tp2", "ppo-pp2"))
    assert "ppo-pp2 (2 ranks): ppo.py" in capsys.readouterr().out


def test_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--only", "ppo-tp3"])
    assert "--only ppo-tp3: no such row" in capsys.readouterr().err


def test_a_cpu_run_fills_the_table_and_a_failed_row_shows_its_error(tmp_path):
    """sft, then PPO from it over a 2-stage pipeline (torchrun, gloo), cut short (--small) and in fp32:
    the table's cells come from the runs' metrics.json, and the sampler log-prob gap is rounding. (The
    check's own sizes in bf16 took 150 s to 250 s a row on a CPU without native bf16, AVX2; ppo
    --pp 2's gap under bf16 is test_ppo's to check.) Between them PPO against the reward model, whose
    row did not run, fails: its row says why and the check goes on. gpu_check.main runs in this
    process (every row in processes of its own as always): a run of its own as a script, for the
    failed row, cost a fresh interpreter of torch's imports."""
    report = tmp_path / "report.md"
    flags = ["--device", "cpu", "--gpus", "2", "--dtype", "fp32", "--small"]
    # The limits are sized for GPUs; a loaded CPU is slower.
    flags += ["--row-timeout-s", "900", "--budget-s", "1800", "--workdir", str(tmp_path / "work"), "--out", str(report)]
    gpu_check.main([*flags, "--only", "sft", "ppo-reward-model", "ppo-pp2"])
    rows = table_rows(report.read_text())
    assert rows["sft"]["status"] == "ok" and rows["ppo-pp2"]["status"] == "ok", rows
    assert float(rows["sft"]["s/update"]) > 0 and rows["sft"]["throughput"].endswith(" tokens/s")
    pipeline = rows["ppo-pp2"]
    assert pipeline["ranks"] == "2" and pipeline["throughput"].endswith(" response tokens/s")
    assert float(pipeline["first-minibatch max log-ratio"]) == 0.0
    # conftest's fp32 LOGPROB_GAP argument scaled to this model: sums of 4H = 576 terms (not 128) in 6 layers (not 2),
    # 13.5 times the rounding, under 16 LOGPROB_GAP = 2^-12 (7.2e-7 seen); sampling off the policy gave 1e-2 or more.
    assert float(pipeline["sampler log-prob gap"]) < 16 * LOGPROB_GAP[torch.float32]
    assert pipeline["eval"].startswith("optimality_sampled ")
    status = rows["ppo-reward-model"]["status"]
    assert status.startswith("failed: error: --reward-model "), status
