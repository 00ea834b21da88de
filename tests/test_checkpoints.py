"""Checkpoints through parallel.py: the streamed Hugging Face export and its command, and the clean stop
on SIGTERM / SIGUSR1 (checkpoint, exit 0, resume bitwise where the uninterrupted run ends)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import parallel
from conftest import ROOT, Job, assert_same_weights, run_script, save_tiny_model, save_tiny_walk_model


def test_export_command_writes_indexed_shards_that_from_pretrained_loads(tmp_path):
    """A checkpoint streamed by save_checkpoint, exported with shards of about 20 kB: several files and
    the index transformers reads, the same tensors bitwise, every file but the training state copied.
    An existing output directory and a folder without a model each stop with one error line."""
    model_dir = save_tiny_model(tmp_path / "tiny", "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    grid = parallel.init_distributed("cpu")
    weights = {"model": parallel.dense_tensors(model, None, grid)}
    parallel.save_checkpoint(str(tmp_path / "run"), "step_00000001", grid, 2, {"step": 1}, weights, (model, tokenizer))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert parallel.checkpoint_damage(str(checkpoint)) is None

    def export(*argv):  # `python parallel.py export ...`, forked as conftest runs the scripts (no fresh import)
        return run_script("parallel.py", "export", *argv, cwd=tmp_path)

    done = export(tmp_path / "run", tmp_path / "out", 0.02)  # a run directory: its newest intact checkpoint
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert not any(f.endswith(".pt") or f == parallel.MANIFEST for f in files)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = model.state_dict()
    assert exported.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in exported.state_dict().items())
    for argv, message in (
        ((checkpoint, tmp_path / "out"), "exists; pass a new directory"),
        ((model_dir, tmp_path / "other"), "is not a checkpoint"),
    ):
        refused = export(*argv)
        assert refused.returncode == 1 and refused.stderr.strip().startswith("error: ") and message in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def stop_and_resume(script, flags, tmp_path, first_checkpoint, nproc=1, how=signal.SIGTERM, reference=None):
    """The uninterrupted run (or `reference`, its run dir, when a test shares one); a second one sent `how`
    as soon as its first checkpoint exists, which must checkpoint after the step it is in, say how to resume
    and exit 0; its resumption. With nproc > 1 the signalled run is the real torchrun's, and the whole
    process group gets the signal as a scheduler sends it; the other two are run_ranks' (torchrun's
    environment, forked with torch imported), since there the launcher is no part of what is checked.
    Returns (uninterrupted, resumed) run dirs."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]

    def run(*extra, background=False):
        if nproc == 1 or not background:
            job = Job(script, *flags, *extra, nproc=nproc, cwd=tmp_path)
            return job if background else job.wait()
        command = [*launcher, os.path.join(ROOT, script), *flags, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    if reference is None:
        reference = tmp_path / "reference"
        uninterrupted = run("--output-dir", str(reference))
        assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    stopped = tmp_path / "stopped"
    job = run("--output-dir", str(stopped), background=True)
    deadline = time.time() + 600
    while not (stopped / "checkpoints" / first_checkpoint).exists():
        assert time.time() < deadline and (job.running() if nproc == 1 else job.poll() is None), "ended before"
        time.sleep(0.02)
    if nproc == 1:
        for process in job.processes:
            os.kill(process.pid, how)
        result = job.wait(600)
    else:
        os.killpg(job.pid, how)
        out, err = job.communicate(timeout=600)
        result = subprocess.CompletedProcess(job.args, 0, out, err)  # torchrun itself reports the signal it got
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stopped by {how.name}" in result.stdout and f"continue with --resume {stopped}" in result.stdout
    assert not (stopped / "config.json").exists(), "the run finished before the signal; the test proves nothing"
    assert len(os.listdir(stopped / "checkpoints")) >= 2  # the stop wrote one of its own
    resumed = run("--resume", str(stopped))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return reference, stopped


@pytest.fixture(scope="module")
def walk_model(tmp_path_factory):
    return save_tiny_walk_model(tmp_path_factory.mktemp("walk-model"))


SFT_FLAGS = ["--num-epochs", "1", "--batch-size", "96", "--micro-batch-size", "48", "--save-every", "3"]
SFT_FLAGS += ["--keep-checkpoints", "5", "--eval-every", "100", "--eval-samples-per-start", "1"]


def test_sft_stops_on_sigterm_and_resumes_bitwise(tmp_path, walk_model):
    flags = [*SFT_FLAGS, "--model", walk_model]
    assert_same_weights(*stop_and_resume("sft.py", flags, tmp_path, "step_00000003"))


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_ppo_stops_on_signal_and_resumes_bitwise(tmp_path, how, ppo_walk_run):
    """The uninterrupted run is conftest's, shared by both signals and test_ppo's kill-and-resume test."""
    flags, reference = ppo_walk_run
    reference, resumed = stop_and_resume("ppo.py", flags, tmp_path, "step_00000002", how=how, reference=reference)
    assert_same_weights(reference, resumed)
    assert all(
        torch.equal(v, torch.load(resumed / "value_head.pt")["value_head"][k])
        for k, v in torch.load(reference / "value_head.pt")["value_head"].items()
    )
    # What a preempted run leaves is a model to use: its newest checkpoint exports with the tokenizer.
    parallel.export(str(resumed), str(tmp_path / "exported"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "exported").get_vocab()
        == AutoTokenizer.from_pretrained(flags[flags.index("--model") + 1]).get_vocab()
    )


def test_sft_under_torchrun_stops_on_sigterm_and_resumes_bitwise(tmp_path, walk_model):
    """Two ranks (ZeRO-3, so the stop's checkpoint streams sharded parameters), the signal sent to
    torchrun and its workers together, as SLURM and Kubernetes send it."""
    flags = [*SFT_FLAGS, "--model", walk_model, "--zero-stage", "3", "--dtype", "fp64"]
    assert_same_weights(*stop_and_resume("sft.py", flags, tmp_path, "step_00000003", nproc=2))


def test_a_run_resumes_on_another_layout_but_not_with_another_global_batch(tmp_path, capsys):
    """load_checkpoint takes a checkpoint of another layout with a warning, leaving the per-rank RNG
    states out, and refuses another global batch with one line naming the flag to pass."""
    grid = parallel.init_distributed("cpu")
    args = {"zero_stage": 2, "tp": 1, "pp": 1, "cp": 1, "batch_size": 8}
    parallel.save_checkpoint(str(tmp_path / "run"), "step_00000001", grid, 1, {"args": args})
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step_00000001")
    assert parallel.load_checkpoint(checkpoint, grid, args)[1]["rng"] is not None
    assert parallel.load_checkpoint(checkpoint, grid, {**args, "zero_stage": 3})[1] == {"rng": None}
    assert "written by 1 process(es) with --zero-stage 2 --tp 1 --pp 1 --cp 1: its optimizer" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"written with --batch-size 8, which a resumed run cannot change; resume it"):
        parallel.load_checkpoint(checkpoint, grid, {**args, "batch_size": 4})
