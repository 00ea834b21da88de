"""dpo.py: the losses against hand computations, the response log-probabilities against a plain
softmax, the reference at step 0, LoRA, exact resume, data and context parallel against one
process, and bad input."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpo
from conftest import (
    SAME_MATH,
    assert_same_weights,
    gamma,
    kill_and_resume,
    max_weight_difference,
    read_metrics,
    run_ranks,
    run_script,
    save_tiny_model,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    "loss, smoothing, expected",
    [
        # h = (-3 - -5) - (-6 - -4) = 4 for the first pair and (-2 - -2) - (-2 - -1) = 1 for the second
        ("dpo", 0.0, [-log_sigmoid(0.5 * 4), -log_sigmoid(0.5 * 1)]),
        (
            "dpo",
            0.2,
            [-0.8 * log_sigmoid(2) - 0.2 * log_sigmoid(-2), -0.8 * log_sigmoid(0.5) - 0.2 * log_sigmoid(-0.5)],
        ),
        ("ipo", 0.0, [(4 - 1 / (2 * 0.5)) ** 2, (1 - 1) ** 2]),
        # lengths (2, 4) and (1, 1): h = 2 / 2 - (-2) / 4 = 1.5, then 0 - (-1) = 1
        ("length-normalized", 0.0, [-log_sigmoid(0.5 * 1.5), -log_sigmoid(0.5 * 1)]),
    ],
)
def test_losses_and_rewards_match_a_hand_computation(loss, smoothing, expected):
    policy = torch.tensor([[-3.0, -6.0], [-2.0, -2.0]], dtype=torch.float64)
    reference = torch.tensor([[-5.0, -4.0], [-2.0, -1.0]], dtype=torch.float64)
    lengths = torch.tensor([[2, 4], [1, 1]])
    args = dpo.Args(model="m", loss=loss, beta=0.5, label_smoothing=smoothing)
    losses, chosen, rejected = dpo.preference_losses(policy, reference, lengths, args)
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    scale = lengths.double() if loss == "length-normalized" else 1.0
    rewards = 0.5 * (policy - reference) / scale
    assert torch.equal(chosen, rewards[:, 0]) and torch.equal(rejected, rewards[:, 1])


def test_response_logprobs_are_the_plain_softmax_of_the_response_tokens(tmp_path):
    path = save_tiny_model(tmp_path / "policy", "llama", tokenizer=dpo.randomwalks_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    pairs = [(([1, 2, 3, 4], 2), ([1, 5, 21], 1)), (([7, 8], 1), ([7, 9, 10, 11, 12], 3))]
    chosen, rejected = dpo.pair_logprobs(model, pairs, 22, torch.device("cpu"))
    for side, sums in ((0, chosen), (1, rejected)):
        for row, pair in enumerate(pairs):
            ids, start = pair[side]
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            expected = sum(logprobs[t - 1, ids[t]] for t in range(start, len(ids)))
            assert sums[row].item() == pytest.approx(expected.item(), abs=1e-12)


FLAGS = [
    "--randomwalks-pairs",
    "96",
    "--batch-size",
    "16",
    "--micro-batch-size",
    "4",
    "--eval-every",
    "3",
    "--eval-samples-per-start",
    "1",
    "--warmup-steps",
    "1",
    "--learning-rate",
    "1e-3",
    "--beta",
    "0.5",
]


@pytest.fixture(scope="module")
def walk_policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    return save_tiny_model(folder / "policy", "llama", tokenizer=dpo.randomwalks_tokenizer())


@pytest.mark.parametrize("variant", [[], ["--lora-rank", "2", "--lora-alpha", "4"]], ids=["copy", "lora"])
def test_the_reference_is_the_policy_at_step_0_and_training_moves_away(tmp_path, walk_policy, variant):
    """Before the first step the policy is its reference (a frozen copy, or under LoRA itself with
    its adapters off): every log-ratio is 0, so the loss is log 2 and no pair is ranked yet. The
    saved model loads in plain transformers and has moved."""
    run = run_script("dpo.py", "--model", walk_policy, *FLAGS, *variant, "--output-dir", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    start = metrics["start"]
    # A margin of exactly 0: every loss is -logsigmoid(0) = log 2 in fp32, within 5u (log's 2 ulps and a
    # rounding), and their mean over at most the 96 pairs adds gamma(96) of it.
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=gamma(96 + 5) * math.log(2))
    assert start["eval/margin"] == 0 and start["eval/accuracy"] == 0
    assert metrics["eval/loss"] < start["eval/loss"] and metrics["eval/margin"] > 0
    assert 0 <= metrics["eval/optimality_greedy"] <= 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert max_weight_difference(walk_policy, tmp_path / "run") > 1e-4


def test_resume_after_kill_is_bitwise_exact(tmp_path, walk_policy):
    """Killed after the checkpoint of step 2 and resumed: the reference log-probabilities are read
    back from the run directory, and the run ends bitwise where an uninterrupted one does."""
    flags = ["--model", walk_policy, *FLAGS, "--save-every", "2", "--num-epochs", "2"]
    reference, resumed = kill_and_resume("dpo.py", flags, tmp_path, "step_00000002")
    assert_same_weights(reference, resumed)
    assert read_metrics(reference) == read_metrics(resumed)


def test_data_parallel_zero3_and_context_parallel_match_one_process(tmp_path, walk_policy):
    """2 ranks (micro-batches of 4 pairs, a global batch of 16) under plain data parallel and ZeRO-3
    (ZeRO-1 and 2 run DataParallel's code of stage 0 with other reductions, tested with every other
    script), and the sequences split over 2 context-parallel ranks: the eval metrics and weights of
    one process, in fp64 (up to summation order: see SAME_MATH in conftest)."""
    flags = ["--model", walk_policy, *FLAGS, "--dtype", "fp64"]
    single = run_script("dpo.py", *flags, "--output-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    expected = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for name, layout in [("zero0", []), ("zero3", ["--zero-stage", "3"]), ("cp2", ["--cp", "2"])]:
        run = run_ranks("dpo.py", *flags, *layout, "--output-dir", str(tmp_path / name))
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("saved ") == 1, "only rank 0 reports"
        actual = json.loads((tmp_path / name / "metrics.json").read_text())
        for key in ("eval/loss", "eval/margin", "eval/accuracy"):
            assert actual[key] == pytest.approx(expected[key], rel=SAME_MATH, abs=SAME_MATH), (name, key)
        assert max_weight_difference(tmp_path / "one", tmp_path / name) < SAME_MATH, name


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "--model is needed"),
        (["--model", "m", "--label-smoothing", "0.5"], "--label-smoothing 0.5 must lie in [0, 0.5)"),
        (["--model", "m", "--loss", "ipo", "--label-smoothing", "0.1"], "IPO has no label noise term"),
        (["--model", "m", "--pp", "2"], "--pp 2 is not supported by dpo.py"),
        (["--model", "m", "--beta", "0"], "--beta 0.0 must be a positive number"),
        (["--model", "m", "--reward-model", "r"], "--reward-model judges text tasks"),
    ],
)
def test_bad_input_is_one_line(tmp_path, flags, message):
    run = run_script("dpo.py", *flags, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.startswith("error: ") and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_text_task_reports_the_kl_and_the_win_rate_over_the_reference(tmp_path):
    """jsonl pairs on a tiny text model, judged by a tiny reward model: at step 0 the policy is the
    reference, so the KL of its samples is exactly 0; training moves it away (KL above 0), and the
    win rate over the reference's samples is a fraction."""
    from transformers import AutoModelForSequenceClassification

    from conftest import text_tokenizer, tiny_config
    from test_reward_model import write_preference_pairs

    tokenizer = text_tokenizer()
    config = tiny_config("llama", len(tokenizer), tokenizer.eos_token_id)
    config.update(dict(num_labels=1, pad_token_id=tokenizer.pad_token_id))
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    flags = ["--task", "jsonl", "--data", write_preference_pairs(tmp_path / "pairs.jsonl", n=48)]
    flags += ["--model", save_tiny_model(tmp_path / "policy", "llama"), "--reward-model", str(tmp_path / "judge")]
    flags += ["--batch-size", "8", "--learning-rate", "1e-2", "--eval-prompts", "8", "--max-new-tokens", "6"]
    run = run_script("dpo.py", *flags, "--output-dir", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["start"]["eval/kl"] == 0 and metrics["eval/kl"] > 0
    assert 0 <= metrics["eval/win_rate"] <= 1


def test_the_sentiment_task_ranks_the_policys_own_samples(tmp_path, tiny_gpt2, fake_vader):
    """Pairs of the policy's own continuations, the more positive (by the stand-in VADER) chosen;
    evaluation reports the policy's VADER score and its KL to the reference, 0 at step 0."""
    words = "cat dog mat park friend hello world post title summary sat ran said my the a on to".split()
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {a} {b}"}) + "\n" for a, b in zip(words, reversed(words))))
    args = dpo.Args(
        task="sentiment",
        data=str(data),
        model=tiny_gpt2,
        output_dir=str(tmp_path / "run"),
        max_new_tokens=4,
        generation_batch_size=16,
        batch_size=4,
        eval_fraction=0.2,
        learning_rate=1e-2,
    )
    dpo.main(args)
    pairs = dpo.read_records(str(tmp_path / "run" / dpo.SENTIMENT_PAIRS))
    assert pairs and all(fake_vader(p["chosen"]) > fake_vader(p["rejected"]) for p in pairs)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["start"]["eval/kl"] == 0 and metrics["eval/kl"] > 0
    assert -1 <= metrics["start"]["eval/vader"] <= 1 and -1 <= metrics["eval/vader"] <= 1
