"""Every script's flags go through one check_args before anything is loaded or written.

The cases are built from the Args dataclasses themselves: each numeric flag of each script is set
to 0 and -1 (floats also to nan and inf) on top of defaults that pass. The check must either stop
with one `error:` line that names the flag and the value, or accept the value, and then the
flag's docstring (its --help) must say that the value means something. A few subprocess runs
show the same on the command line and under torchrun, where rank 0 alone prints."""

import ast
import dataclasses
import importlib
import math
import os
import re
import typing

import pytest

from conftest import ROOT, Job, run_ranks, run_script, save_tiny_model, torchrun

SCRIPTS = ["sft", "reward_model", "ppo", "ilql", "dpo", "rft"]
BASE = {name: dict(model="runs/sft") for name in ("ppo", "dpo", "rft")}  # no default policy: the flags they need


def field_docstrings(script: str) -> dict:
    """{field name: its docstring} of the script's Args, read from the source as tyro does."""
    tree = ast.parse(open(os.path.join(ROOT, f"{script}.py")).read())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args").body
    return {
        node.target.id: body[i + 1].value.value for i, node in enumerate(body[:-1]) if isinstance(node, ast.AnnAssign)
    }


def numeric_kind(annotation):
    """int or float for a numeric flag (Optional or a tuple of them included), else None."""
    if annotation in (int, float):
        return annotation
    arguments = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(annotation) in (typing.Union, tuple) and len(arguments) == 1 and arguments[0] in (int, float):
        return arguments[0]
    return None


def bad_value_cases():
    for script in SCRIPTS:
        module = importlib.import_module(script)
        for name, annotation in typing.get_type_hints(module.Args).items():
            kind = numeric_kind(annotation)
            if kind is not None:
                for value in (0, -1) if kind is int else (0.0, -1.0, math.nan, math.inf):
                    yield pytest.param(script, name, annotation, value, id=f"{script}-{name}={value}")


def documents(docstring: str, value) -> bool:
    """Whether a docstring names the value as a meaningful setting: `0` or `-1` as a word."""
    literal = re.escape(f"{value:g}")
    return re.search(rf"(?<![\w.-]){literal}(?![\w]|\.\d)", docstring) is not None


def test_the_defaults_pass_at_1_2_4_and_8_ranks():
    for script in SCRIPTS:
        module = importlib.import_module(script)
        for world_size in (1, 2, 4, 8):
            settled = module.check_args(module.Args(**BASE.get(script, {})), world_size)
            assert settled.micro_batch_size >= 1, script


@pytest.mark.parametrize("script, name, annotation, value", list(bad_value_cases()))
def test_every_numeric_flag_is_checked_or_documented(script, name, annotation, value):
    module = importlib.import_module(script)
    args = dataclasses.replace(
        module.Args(**BASE.get(script, {})), **{name: (value,) if typing.get_origin(annotation) is tuple else value}
    )
    try:
        module.check_args(args, 1)
    except SystemExit as error:
        message = str(error.code)
        flag = "--" + name.replace("_", "-")
        assert message.startswith("error: ") and "\n" not in message, message
        assert flag in message and str(value) in message, f"the error names neither {flag} nor {value}: {message}"
    else:
        assert documents(field_docstrings(script)[name], value), (
            f"{script}.py accepts --{name.replace('_', '-')} {value} but its docstring does not say what it means"
        )


def test_documents_needs_the_value_as_a_word():
    assert (
        documents("0 saves only the final model", 0)
        and documents("(0: off)", 0.0)
        and documents("(-1: train everything)", -1)
    )
    assert not documents("one in 10 steps", 0) and not documents("clip to 0.5", 0) and not documents("at most 1", -1)


@pytest.mark.parametrize(
    "command",
    [
        ["sft.py", "--learning-rate", "-1"],
        ["reward_model.py", "--eval-fraction", "nan"],
        ["ppo.py", "--model", "runs/sft", "--temperature", "0"],
        ["ilql.py", "--batch-size", "0"],
    ],
)
def test_a_bad_flag_on_the_command_line_is_one_line(tmp_path, command):
    result = run_script(*command, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {command[-2]} {command[-1]}"), result.stderr
    assert os.listdir(tmp_path) == [], "nothing is written"


def test_under_torchrun_rank_0_alone_prints_and_every_rank_exits_1(tmp_path):
    result = torchrun("sft.py", "--batch-size", "7", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["error: --batch-size 7 does not split over 2 data-parallel ranks; make it a multiple of 2"], (
        result.stderr[-3000:]
    )
    assert "exitcode  : 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_rank_0_prints_the_line_even_when_another_rank_fails_first(tmp_path):
    """torchrun ends every rank as soon as one exits. Here rank 0 starts 3 s late, so rank 1 meets the
    bad flag first; were rank 1 to exit at once, rank 0 would be ended before printing (CI once failed
    on exactly that: exit status 1 and an empty stderr). Rank 1 waits 10 s, so rank 0 has 7 s to reach
    the same check, print and exit, and rank 1 is ended unprinted."""
    job = Job(
        "sft.py", "--batch-size", "7", "--output-dir", str(tmp_path / "run"), nproc=2, cwd=tmp_path, delays={0: 3}
    )
    result = job.wait(60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["error: --batch-size 7 does not split over 2 data-parallel ranks; make it a multiple of 2"], (
        result.stderr[-3000:]
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_rank_that_fails_alone_names_itself(script, monkeypatch):
    module = importlib.import_module(script)
    waits = []
    monkeypatch.setattr(module.time, "sleep", waits.append)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        module.fail("the shard is unreadable")
    assert waits == [10] and stop.value.code == "error: rank 1: the shard is unreadable"


@pytest.mark.parametrize("script", SCRIPTS)
def test_fail_ends_the_line_of_an_open_progress_bar(script):
    """An error raised while a bar is open was glued to it (`ppo:   0%|...| 0/1 [...]error: ...`):
    fail() closes the bars first, which ends their line."""
    import io

    import tqdm

    module, output = importlib.import_module(script), io.StringIO()
    bar = tqdm.tqdm(total=2, desc="run", file=output)
    with pytest.raises(SystemExit):
        module.fail("the reward is broken")
    assert output.getvalue().endswith("\n") and bar.disable, repr(output.getvalue())


@pytest.fixture(scope="module")
def walk_policy(tmp_path_factory):
    import sft

    return save_tiny_model(tmp_path_factory.mktemp("policy"), tokenizer=sft.randomwalks_tokenizer())


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, script, walk_policy):
    """--output-dir under a file (or under /proc, where nothing can be made) ended in a traceback; it is
    refused with one line when the run directory is made, before anything is written."""
    (tmp_path / "file").write_text("")
    flags = {
        "sft": ["--num-epochs", "1"],
        "reward_model": ["--randomwalks-pairs", "64"],
        "ppo": ["--model", walk_policy],
        "ilql": ["--num-epochs", "1"],
        "dpo": ["--model", walk_policy, "--randomwalks-pairs", "64"],
        "rft": ["--model", walk_policy],
    }[script]
    for output in [tmp_path / "file" / "run"] + (["/proc/nope/run"] if script == "sft" else []):
        result = run_script(f"{script}.py", *flags, "--output-dir", str(output), cwd=tmp_path)
        errors = [line for line in result.stderr.split("\n") if "error" in line.lower()]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith(f"error: cannot create the run directory {output}: "), errors
    assert os.listdir(tmp_path) == ["file"]


def test_every_script_runs_under_torchrun_with_its_default_sizes(tmp_path, walk_policy):
    """The first multi-process command a user types: no batch or micro-batch flag, 2 processes.
    Only the run length and the evaluations' samples (one a start node) are cut (and ppo and dpo are given
    the policy they need), to keep the suite short.
    The ranks are run_ranks' (torchrun's environment, forked with torch imported): real torchrun, three
    fresh interpreters a run, is the subject of the test above."""
    commands = {
        "sft.py": ["--num-epochs", "1", "--eval-samples-per-start", "1"],
        "reward_model.py": ["--num-epochs", "1", "--randomwalks-pairs", "256"],
        "ppo.py": ["--model", walk_policy, "--num-updates", "1", "--eval-samples-per-start", "1"],
        "ilql.py": ["--num-epochs", "1", "--eval-samples-per-start", "1", "--eval-betas", "1"],
        "dpo.py": ["--model", walk_policy, "--randomwalks-pairs", "128", "--eval-samples-per-start", "1"],
    }
    for script, flags in commands.items():
        result = run_ranks(script, *flags, "--output-dir", str(tmp_path / script), cwd=tmp_path)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
        assert result.stdout.count("saved ") == 1, f"{script}: rank 0 alone reports"
        assert "2 data-parallel rank(s)" in result.stdout, f"{script} does not print its derived sizes"
