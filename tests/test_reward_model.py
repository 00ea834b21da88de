"""reward_model.py: the loss, last-token pooling, data parsers, saving and reloading, resume, bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import reward_model as rm
from conftest import FIXTURES, assert_same_weights, kill_and_resume, run_script, save_tiny_model


def quick_args(tmp_path, **overrides):
    """A few-second randomwalks run."""
    settings = dict(output_dir=str(tmp_path / "run"), randomwalks_pairs=256, num_epochs=1, batch_size=32, micro_batch_size=32, eval_every=1000, warmup_steps=2)
    return rm.Args(**{**settings, **overrides})


def test_pairwise_loss_and_accuracy_on_a_hand_made_batch():
    chosen = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    margins = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    loss = rm.pairwise_loss(chosen, rejected, margins)
    expected = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.5)), math.log(2.0)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    loss.sum().backward()
    # d/dr_chosen of -log sigmoid(d) is -(1 - sigmoid(d)): always pushes the chosen score up.
    assert chosen.grad.tolist() == pytest.approx([-(1 - 1 / (1 + math.exp(-d))) for d in (2.0, -1.5, 0.0)], rel=1e-12)
    assert (chosen > rejected).float().mean().item() == pytest.approx(1 / 3)  # a tie is not a win


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_last_token_pooling_is_the_same_with_left_and_right_padding(tmp_path, family):
    model_dir = save_tiny_model(tmp_path / "lm", family)
    model, tokenizer = rm.load_model(model_dir, "cpu", seed=0)
    model = model.double().eval()
    sequences = [tokenizer("a short one")["input_ids"], tokenizer("a somewhat longer sequence of words here")["input_ids"], [5]]
    scores = {}
    for side in ("left", "right"):
        input_ids, attention_mask, position_ids = rm.pad_batch(sequences, tokenizer.pad_token_id, "cpu", side)
        scores[side] = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 0]
    alone = torch.stack([model(input_ids=torch.tensor([ids])).logits[0, 0] for ids in sequences])
    assert torch.allclose(scores["left"], scores["right"], rtol=0, atol=1e-10)
    assert torch.allclose(scores["right"], alone, rtol=0, atol=1e-10)
    assert alone.std() > 1e-3  # the sequences really score differently


def test_head_init_and_dropout_off(tmp_path):
    model_dir = save_tiny_model(tmp_path / "lm", "gpt2")
    model, _ = rm.load_model(model_dir, "cpu", seed=0)
    assert model.score.weight.std().item() == pytest.approx(1 / math.sqrt(32 + 1), rel=0.3)  # 32 weights: a loose check
    assert all(module.p == 0 for module in model.modules() if isinstance(module, torch.nn.Dropout))
    assert model.config.resid_pdrop == 0 and model.config.pad_token_id is not None
    tokenizer = rm.randomwalks_tokenizer()
    fresh = rm.randomwalks_model(tokenizer)
    rm.init_head(fresh, seed=0)
    assert fresh.score.weight.std().item() == pytest.approx(1 / math.sqrt(145), rel=0.15)


def test_prompt_is_truncated_on_the_left_never_the_response(capsys):
    tokenizer = rm.randomwalks_tokenizer()
    pairs = [{"prompt": "bcdef", "chosen": "ghi", "rejected": "jk", "margin": 0.0}, {"prompt": "b", "chosen": "cdefghij", "rejected": "k", "margin": 0.0}]
    tokenized = rm.tokenize_pairs(tokenizer, pairs, max_length=6)
    assert tokenized == [([3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 9, 10], 0.0)]  # "def"+"ghi" and "cdef"+"jk"; the second pair's response is too long
    out = capsys.readouterr().out
    assert "1 of 2 pairs are longer than --max-length 6" in out and "skipped 1 pairs" in out


def test_spearman_against_a_reference_with_ties():
    rng = np.random.RandomState(0)
    x = rng.randint(0, 4, size=50).astype(float)  # heavy ties
    y = x + rng.randn(50)
    def average_ranks(values):  # rank = number below + half the ties, plus one
        return np.array([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values])
    rx, ry = average_ranks(x), average_ranks(y)
    reference = ((rx - rx.mean()) * (ry - ry.mean())).sum() / math.sqrt(((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum())
    assert rm.spearman(x, y) == pytest.approx(reference, rel=1e-12)
    assert rm.spearman(x, -y) == pytest.approx(-reference, rel=1e-12)


def test_randomwalks_pairs_prefer_the_more_optimal_walk():
    adjacency, walks = rm.generate_random_walks()
    shortest = rm.shortest_path_nodes(adjacency)
    pairs = rm.randomwalks_pairs(walks, 500, adjacency, shortest, np.random.RandomState(0))
    assert len(pairs) == 500
    for pair in pairs:
        chosen, rejected = (rm.walk_optimality(pair["prompt"] + pair[k], adjacency, shortest) for k in ("chosen", "rejected"))
        assert chosen > rejected
    rejected_scores = [rm.walk_optimality(p["prompt"] + p["rejected"], adjacency, shortest) for p in pairs]
    chosen_scores = [rm.walk_optimality(p["prompt"] + p["chosen"], adjacency, shortest) for p in pairs]
    assert 0 in rejected_scores and 1.0 in chosen_scores and any(0 < s < 1 for s in chosen_scores)  # valid and invalid walks both appear


# --- data parsers on upstream formats -----------------------------------------------------------
def test_jsonl_pairs_with_margin():
    pairs = rm.load_pairs("jsonl", os.path.join(FIXTURES, "preference-pairs.jsonl"))
    assert pairs[1] == {"prompt": "Q: Capital of France?\nA:", "chosen": " Paris", "rejected": " Rome", "margin": 1.5}
    assert pairs[0]["margin"] == 0.0


def test_hh_pairs():
    pairs = rm.load_pairs("hh", os.path.join(FIXTURES, "hh-rlhf-train.jsonl"))
    assert len(pairs) == 4
    assert pairs[1]["prompt"].endswith("\n\nHuman: Science fiction.\n\nAssistant:")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (" Try The Left Hand of Darkness by Ursula K. Le Guin.", " I don't read.")


def test_tldr_comparisons(capsys):
    pairs = rm.load_pairs("tldr", os.path.join(FIXTURES, "tldr-comparisons.jsonl"))
    assert len(pairs) == 3  # the CNN/DM article has no post and is skipped
    assert pairs[0]["prompt"].startswith("SUBREDDIT: r/relationships\n\nTITLE: My roommate keeps eating my food\n\nPOST: ")
    assert pairs[0]["prompt"].endswith("\n\nTL;DR:")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (" small cheap loan and good savings: pay early or invest?", " loan")  # choice 1
    assert "skipped 1 records" in capsys.readouterr().out


# --- training, saving, reloading ----------------------------------------------------------------
def test_training_saves_a_model_transformers_reloads_with_identical_scores(tmp_path):
    args = quick_args(tmp_path, num_epochs=2)
    rm.main(args)
    metrics = json.load(open(os.path.join(args.output_dir, "metrics.json")))
    assert metrics["eval/accuracy"] > 0.6  # 16 steps from scratch already beat chance
    model = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    assert model.config.num_labels == 1
    assert model.config.reward_mean == pytest.approx(metrics["eval/score_mean"]) and model.config.reward_std == pytest.approx(metrics["eval/score_std"])
    walks = ["sda", "ebjnbdtkna", "bj", "fda"]
    ours = rm.score(model, tokenizer, [w[0] for w in walks], [w[1:] for w in walks], batch_size=3)
    plain = torch.stack([model(**tokenizer(w, return_tensors="pt")).logits[0, 0] for w in walks]).detach()
    assert torch.allclose(ours, plain, atol=1e-5)
    assert ours[0] > ours[2]  # a shortest path beats a walk that stops short


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_model_families_train_on_text_pairs(tmp_path, family):
    model_dir = save_tiny_model(tmp_path / "lm", family)
    args = rm.Args(task="jsonl", data=os.path.join(FIXTURES, "preference-pairs.jsonl"), model=model_dir, output_dir=str(tmp_path / "run"),
                   num_epochs=2, batch_size=3, micro_batch_size=1, eval_fraction=0.25, warmup_steps=1)
    rm.main(args)
    model = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    assert model.config.model_type == family.replace("-", "_") and model.config.num_labels == 1


def test_smoke_run_with_wandb_offline(tmp_path):
    result = run_script("reward_model.py", "--randomwalks-pairs", "128", "--num-epochs", "1", "--batch-size", "32", "--micro-batch-size", "16",
                        "--eval-every", "2", "--track", "--output-dir", str(tmp_path / "run"), cwd=tmp_path,
                        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2: loss" in result.stdout and "spearman_optimality" in result.stdout
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "run" / "wandb"))


def test_resume_after_kill_is_bitwise_exact(tmp_path):
    flags = ["--randomwalks-pairs", "640", "--num-epochs", "2", "--batch-size", "32", "--micro-batch-size", "16", "--save-every", "8", "--eval-every", "15"]
    reference, resumed = kill_and_resume("reward_model.py", flags, tmp_path, "step_00000008")
    assert_same_weights(reference, resumed)


# --- bad input ----------------------------------------------------------------------------------
def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as error:
        rm.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(args.output_dir), "a failed run must not leave a half-written run directory"


def pairs_args(tmp_path, text, model):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    return rm.Args(task="jsonl", data=str(path), model=model, output_dir=str(tmp_path / "run"), batch_size=1, micro_batch_size=1)


def test_bad_inputs(tmp_path, tiny_gpt2, capsys):
    expect_error(pairs_args(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n', tiny_gpt2), "record 2", "'rejected' is missing")
    expect_error(pairs_args(tmp_path, '{"prompt": "p", "chosen": "same", "rejected": "same"}\n', tiny_gpt2), "no preference pairs")
    expect_error(pairs_args(tmp_path, "", tiny_gpt2), "no preference pairs")
    expect_error(pairs_args(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n', tiny_gpt2), "'margin' must be a finite number")
    expect_error(pairs_args(tmp_path, '{"prompt": "p", "chosen": 3, "rejected": "b"}\n', tiny_gpt2), "'chosen' must be a string")
    expect_error(pairs_args(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b"}\n', str(tmp_path / "nope")), "no such directory")
    expect_error(quick_args(tmp_path, resume=str(tmp_path)), "not a checkpoint")
    expect_error(quick_args(tmp_path, batch_size=32, micro_batch_size=5), "not a multiple")
    # Identical pairs among good ones are dropped with a count, not fatal.
    pairs = rm.load_pairs("jsonl", write_pairs(tmp_path, ['{"prompt": "p", "chosen": "x", "rejected": "x"}', '{"prompt": "p", "chosen": "a", "rejected": "b"}']))
    assert len(pairs) == 1 and "dropped 1 pairs whose chosen and rejected responses are identical" in capsys.readouterr().out


def write_pairs(tmp_path, lines):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a"}\n')
    result = run_script("reward_model.py", "--task", "jsonl", "--data", str(path), "--model", str(tmp_path), "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}, record 1: field 'rejected' is missing; every record needs 'prompt', 'chosen', 'rejected'"]
