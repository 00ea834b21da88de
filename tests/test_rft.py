"""rft.py: the threshold schedule and selection, the loss, a run end to end, exact resume, data parallel, bad input."""

import importlib.util
import json
import os
import types

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

import rft
import sft  # the randomwalks tokenizer: rft.py reads its tokenizer from --model
from conftest import (
    check_calculator_env,
    TurnScript,
    ENVIRONMENTS,
    CHAT_TEMPLATES,
    END_OF_TURN,
    SAME_MATH,
    chat_tokenizer,
    save_tiny_chat_model,
    write_jsonl,
    assert_same_weights,
    kill_and_resume,
    max_weight_difference,
    run_ranks,
    run_script,
    save_tiny_model,
    tiny_config,
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny GPT-2 (no dropout) with the randomwalks tokenizer: an sft.py run directory in miniature."""
    return save_tiny_model(tmp_path_factory.mktemp("policy"), tokenizer=sft.randomwalks_tokenizer())


@pytest.fixture(scope="module")
def policy_with_dropout(tmp_path_factory, policy):
    """The tiny policy with GPT-2's dropout, so that the RNG state a resume restores matters."""
    model = AutoModelForCausalLM.from_pretrained(policy)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.1
    folder = tmp_path_factory.mktemp("dropout")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(policy).save_pretrained(folder)
    return str(folder)


# 20 start letters x 8 samples = 160 rows a round, in 10 chunks of 16; a few seconds a round.
QUICK = [
    "--rounds",
    "2",
    "--samples-per-prompt",
    "8",
    "--generation-batch-size",
    "16",
    "--batch-size",
    "16",
    "--epochs-per-round",
    "1",
    "--learning-rate",
    "3e-3",
    "--eval-samples-per-start",
    "2",
]


def metrics_of(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as file:
        return json.load(file)


def write_reward_fn(folder, body: str) -> str:
    """A --reward-fn in a file of its own: `def reward(prompts, responses): <body>`."""
    path = folder / "reward.py"
    path.write_text(f"import hashlib\n\n\ndef reward(prompts, responses):\n    {body}\n")
    return f"{path}:reward"


@pytest.fixture(scope="module")
def hash_reward(tmp_path_factory):
    """A --reward-fn that gives every response its own score (a hash of its text): a tiny random
    policy's walks are nearly all invalid, so their optimality ties at 0 and, a prompt whose samples
    all tie keeping none, a run would keep next to nothing."""
    body = "return [int(hashlib.md5(r.encode()).hexdigest(), 16) % 1000 for r in responses]"
    return write_reward_fn(tmp_path_factory.mktemp("reward"), body)


def without_clock(rounds: list) -> list:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rounds]


# --- the method ---------------------------------------------------------------------------------
def test_percentile_rises_linearly_from_start_to_end():
    assert [rft.percentile_at(r, 4, 0.7, 0.95) for r in range(4)] == pytest.approx([0.7, 0.78333333, 0.86666667, 0.95])
    assert rft.percentile_at(0, 1, 0.7, 0.95) == 0.7  # a single round uses the start


def test_selection_keeps_each_prompts_samples_at_or_above_its_own_quantile():
    scores = np.array(
        [
            [1.0, 0.0, 0.5, 0.25, 1.0],  # sorted 0, .25, .5, 1, 1: the 0.7 quantile lies at 2.8 -> 0.5 + 0.8 * 0.5
            [0.3, 0.3, 0.3, 0.3, 0.3],  # all tied: none kept
            [0.0, 0.2, 0.0, 0.1, 0.0],  # a hard prompt keeps its best, though below the others' thresholds
        ]
    )
    kept, thresholds = rft.select(scores, 0.7)
    assert thresholds == pytest.approx([0.9, 0.3, 0.08])
    assert kept.tolist() == [
        [True, False, False, False, True],
        [False, False, False, False, False],
        [False, True, False, True, False],
    ]
    # The quantile falling on a sample keeps it (at or above); 0 keeps everything, 1 the best (ties too).
    assert rft.select(scores, 0.5)[0][0].tolist() == [True, False, True, False, True]
    assert rft.select(scores, 0.0)[0].tolist() == [[True] * 5, [False] * 5, [True] * 5]
    assert rft.select(scores, 1.0)[0].tolist()[0] == [True, False, False, False, True]


def test_a_prompt_whose_samples_all_tie_contributes_nothing():
    """All 8 walks of the first prompt fail: the tie tells no better from worse, and kept they would be
    8 failures in the fine-tuning set. The second prompt keeps its two successes."""
    kept, thresholds = rft.select(np.array([[0.0] * 8, [0, 0, 0, 0, 0, 0, 1, 1]], dtype=np.float64), 0.95)
    assert kept.sum(axis=1).tolist() == [0, 2] and kept[1, 6:].all()
    assert rft.select(np.ones((3, 4)), 0.0)[0].sum() == 0  # all optimal: no signal either


def test_a_round_that_keeps_nothing_says_so_and_leaves_the_policy_as_it_was(tmp_path, policy, capsys):
    """A reward that scores every response the same: every prompt ties, no sample is kept, and the
    round is a clear outcome (a line saying so, no step, no mean score of an empty set), not a crash."""
    reward = write_reward_fn(tmp_path, "return [0.0 for r in responses]")
    run_dir = tmp_path / "run"
    args = dict(rounds=2, samples_per_prompt=2, batch_size=16, eval_samples_per_start=1, save_every=1)
    rft.main(rft.Args(model=policy, reward_fn=reward, output_dir=str(run_dir), **args))
    out = capsys.readouterr().out
    assert out.count("kept 0 samples, fewer than one batch of 16: no fine-tuning step") == 2
    for r in metrics_of(run_dir)["rounds"]:
        assert r["samples/kept"] == 0 and r["samples/kept_fraction"] == 0 and r["train/steps"] == 0
        assert "samples/kept_score_mean" not in r and "train/loss" not in r
    assert max_weight_difference(policy, run_dir) == 0


def test_the_loss_sees_the_sampled_token_ids(tmp_path, policy, hash_reward, monkeypatch):
    """Token in, token out: every kept (prompt, response) the loss sees is the prompt's ids and the
    response's ids as the sampler drew them, with an EOS only where it drew one (a response cut at
    --max-new-tokens has none)."""
    eos = sft.randomwalks_tokenizer().eos_token_id
    sampled, trained = [], []

    def generate(model, prompts, *rest):
        responses = real_generate(model, prompts, *rest)
        sampled.extend(tuple(prompt + response) for prompt, response in zip(prompts, responses))
        return responses

    def collate(samples, *rest):
        assert all(labels == response for _, response, labels in samples)  # the loss covers every response token
        trained.extend((tuple(prompt + response), len(prompt)) for prompt, response, _ in samples)
        return real_collate(samples, *rest)

    real_generate, real_collate = rft.generate, rft.collate
    monkeypatch.setattr(rft, "generate", generate)
    monkeypatch.setattr(rft, "collate", collate)
    args = dict(rounds=1, samples_per_prompt=8, batch_size=8, epochs_per_round=1, eval_samples_per_start=1)
    rft.main(rft.Args(model=policy, reward_fn=hash_reward, output_dir=str(tmp_path / "run"), **args))
    assert len(trained) >= 32 and {ids for ids, _ in trained} <= set(sampled)
    responses = [ids[prompt_length:] for ids, prompt_length in trained]
    assert all(eos not in response[:-1] for response in responses)
    cut = [response for response in responses if response[-1] != eos]
    assert cut and all(len(response) == 10 for response in cut)  # cut at --max-new-tokens, no EOS added
    assert len(cut) < len(responses), "no kept response drew an EOS: the test would not see one kept"


def test_loss_is_the_response_tokens_cross_entropy_and_ignores_the_prompt():
    tokenizer = sft.randomwalks_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)).double()
    eos = tokenizer.eos_token_id
    samples = [([3], [5, 0, eos], [5, 0, eos]), ([7, 2, 9], [4, 0], [4, 0])]  # (prompt, response, labels); no EOS drawn
    input_ids, attention_mask, labels = rft.collate(samples, tokenizer.pad_token_id, "cpu")
    loss = rft.completion_loss_sum(model, input_ids, attention_mask, labels)
    expected = 0.0
    for prompt, response, _ in samples:
        ids, prompt_length = prompt + response, len(prompt)
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        expected -= sum(log_probs[t - 1, ids[t]] for t in range(prompt_length, len(ids)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # The prompt is context only: changing a prompt token's label changes nothing.
    assert labels.tolist() == [[-100, 5, 0, eos, -100], [-100, -100, -100, 4, 0]]


def test_generate_is_greedy_decoding_up_to_and_including_eos():
    tokenizer = sft.randomwalks_tokenizer()
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)).double()
    model.lm_head.weight.data[tokenizer.eos_token_id] *= 8  # EOS likely enough to end some responses, not all
    prompts = [[1], [4, 7, 2], [9, 3], [5], [6, 8]]
    responses = rft.generate(model, prompts, 8, 0.0, tokenizer, [tokenizer.eos_token_id], "cpu")
    for prompt, response in zip(prompts, responses):
        ids, reference = list(prompt), []
        with torch.no_grad():
            for _ in range(8):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                reference.append(token)
                ids.append(token)
                if token == tokenizer.eos_token_id:
                    break
        assert response == reference
    ended = [response[-1] == tokenizer.eos_token_id for response in responses]
    assert any(ended) and not all(ended), "the test would not see where a response stops"


def test_a_reward_model_scores_each_response_at_its_last_token(tmp_path, policy):
    """Batched and right-padded, the score of each (prompt, response) is the model's output on that
    sequence alone; a run selects by it and still reports the walks' optimality."""
    tokenizer = sft.randomwalks_tokenizer()
    config = tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    model, rm_tokenizer = rft.load_reward_model(str(tmp_path / "rm"), "cpu", tokenizer, False, torch.float64)
    prompts, responses = ["b", "cd", "e"], ["da", "a", "fghb"]
    with torch.no_grad():
        expected = [
            model(torch.tensor([tokenizer(p + r)["input_ids"]])).logits[0, 0].item() for p, r in zip(prompts, responses)
        ]
    records = [{"prompt": p} for p in prompts]
    assert rft.reward_model_scores(model, rm_tokenizer, records, responses, batch_size=2) == pytest.approx(
        expected, rel=1e-12
    )
    rm, run_dir = str(tmp_path / "rm"), str(tmp_path / "run")
    args = dict(rounds=1, samples_per_prompt=4, batch_size=16, eval_samples_per_start=2)
    rft.main(rft.Args(model=policy, reward_model=rm, output_dir=run_dir, **args))
    metrics = metrics_of(tmp_path / "run")
    assert metrics["eval/score_greedy"] != metrics["eval/optimality_greedy"]


# --- a run --------------------------------------------------------------------------------------
def test_a_short_run_logs_each_round_and_saves_a_loadable_model(policy, one_process_run):
    """Selection by hash_reward, so the kept share is the best 1 - percentile of each prompt's 8
    samples; the optimality of the walks is still reported. The run is the one-process run that the
    layouts below reproduce (in fp64, with wandb offline): one run where two cost twice."""
    run_dir = one_process_run
    stdout = (run_dir.parent / "stdout.txt").read_text()
    assert "round 0: score_greedy" in stdout and "round 2: percentile 0.9500" in stdout
    metrics = metrics_of(run_dir)
    assert metrics["round"] == 2 and [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r, percentile, kept_per_prompt in zip(metrics["rounds"], (0.7, 0.95), (3, 1)):
        assert r["samples/percentile"] == pytest.approx(percentile)
        # Of 8 scores the 0.7 quantile lies between the 5th and 6th (index 4.9), the 0.95 one between
        # the 7th and 8th; a tie could only add to the kept ones.
        assert r["samples/kept"] >= 20 * kept_per_prompt and r["samples/kept_fraction"] == r["samples/kept"] / 160
        assert r["samples/kept"] <= 20 * kept_per_prompt + 4
        assert r["samples/score_min"] <= r["samples/threshold_mean"] <= r["samples/score_max"] < 1000
        assert r["samples/kept_score_mean"] > r["samples/score_mean"]
        assert r["train/steps"] == r["samples/kept"] // 16
    keys = {"eval/score_greedy", "eval/optimality_greedy", "eval/optimality_sampled", "eval/valid_walks_sampled"}
    assert keys <= set(metrics["start"]) and keys <= set(metrics)
    assert metrics["eval/score_sampled"] > 1  # the hash, not the optimality
    assert any(name.startswith("offline-run") for name in os.listdir(run_dir / "wandb"))
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert AutoTokenizer.from_pretrained(run_dir)("bda")["input_ids"] == [1, 3, 0]
    assert max_weight_difference(policy, run_dir) > 1e-4, "training changed nothing"
    assert model.config.n_layer == 2


def sentiment_args(tmp_path, model, **overrides) -> rft.Args:
    """One round on 12 review openings (one held out), 4 continuations of 4 tokens each."""
    data = tmp_path / "openings.jsonl"
    openings = ["The film", "The cast", "Its story", "The ending", "I thought", "This movie", "The plot", "Honestly"]
    openings += ["The music", "Every scene", "The director", "Overall"]
    data.write_text("".join(json.dumps({"prompt": opening}) + "\n" for opening in openings))
    settings = dict(task="sentiment", data=str(data), model=model, output_dir=str(tmp_path / "run"), rounds=1)
    settings.update(samples_per_prompt=4, batch_size=8, generation_batch_size=16, max_new_tokens=4, eval_prompts=1)
    return rft.Args(**{**settings, **overrides})


def test_sentiment_without_vader_is_one_line(tmp_path, tiny_gpt2):
    if importlib.util.find_spec("vaderSentiment") is not None:
        pytest.skip("vaderSentiment is installed")
    expect_error(sentiment_args(tmp_path, tiny_gpt2), "pip install vaderSentiment")


def test_sentiment_is_scored_by_vader_and_reports_it_beside_another_reward(tmp_path, tiny_gpt2, fake_vader):
    args = sentiment_args(tmp_path, tiny_gpt2)
    rft.main(args)
    metrics = metrics_of(args.output_dir)
    assert metrics["eval/score_sampled"] == pytest.approx(metrics["eval/vader_sampled"])  # VADER is the reward
    assert -1 <= metrics["rounds"][0]["samples/score_min"] <= metrics["rounds"][0]["samples/score_max"] <= 1
    reward = write_reward_fn(tmp_path, "return [-float(len(r)) for r in responses]")
    args = sentiment_args(tmp_path, tiny_gpt2, reward_fn=reward, output_dir=str(tmp_path / "with_fn"))
    rft.main(args)
    metrics = metrics_of(args.output_dir)
    assert metrics["eval/score_greedy"] < 0 and -1 <= metrics["eval/vader_greedy"] <= 1


def test_resume_after_kill_is_bitwise_exact(tmp_path, policy_with_dropout, hash_reward):
    """Killed once the checkpoint after round 1 of 2 exists, resumed: the same weights and the same
    per-round log as the uninterrupted run (the sampling seeds, the optimizer and the dropout RNG
    carry over)."""
    flags = ["--model", policy_with_dropout, *QUICK, "--reward-fn", hash_reward, "--save-every", "1"]
    flags += ["--samples-per-prompt", "4"]  # half QUICK's rows a round: the same code, four rounds run in all
    reference, resumed = kill_and_resume("rft.py", flags, tmp_path, "round_00000001")
    assert_same_weights(reference, resumed)
    assert without_clock(metrics_of(resumed)["rounds"]) == without_clock(metrics_of(reference)["rounds"])
    assert os.listdir(resumed / "checkpoints") == ["round_00000001"]  # none after the last round
    assert metrics_of(resumed)["rounds"][1]["train/steps"] >= 1, "the resumed round took no step: nothing to compare"


# --- data, tensor and context parallel ----------------------------------------------------------
def parallel_flags(policy, reward) -> list:
    return ["--model", policy, *QUICK, "--reward-fn", reward, "--dtype", "fp64", "--micro-batch-size", "4"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, policy, hash_reward):
    """The single-process run every layout must reproduce, tracked by wandb offline (its stdout beside
    it): the short run whose log and model test_a_short_run_logs_each_round_and_saves_a_loadable_model checks."""
    folder = tmp_path_factory.mktemp("one-process")
    single = run_script(
        "rft.py",
        *parallel_flags(policy, hash_reward),
        "--track",
        "--output-dir",
        str(folder / "run"),
        cwd=folder,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert single.returncode == 0, single.stderr[-2000:]
    (folder / "stdout.txt").write_text(single.stdout)
    return folder / "run"


def assert_same_run(run_dir, single):
    """The same samples, kept sets, losses and weights as one process (fp64: see SAME_MATH)."""
    actual, expected = metrics_of(run_dir), metrics_of(single)
    for key in ("samples/kept", "samples/score_mean", "eval/optimality_sampled", "train/loss"):
        assert [r[key] for r in actual["rounds"]] == pytest.approx([r[key] for r in expected["rounds"]], rel=1e-9)
    assert max_weight_difference(single, run_dir) < SAME_MATH


def test_data_parallel_and_zero3_match_one_process(tmp_path, policy, hash_reward, one_process_run):
    """2 ranks, each sampling half the chunks and training on half of each batch in 2 micro-batches,
    under plain data parallel and ZeRO-3 (ZeRO-1 and 2 run DataParallel's code of stage 0 with other
    reductions, tested against one process with every other script)."""
    for stage in (0, 3):
        run_dir = tmp_path / f"zero{stage}"
        run = run_ranks(
            "rft.py",
            *parallel_flags(policy, hash_reward),
            "--zero-stage",
            str(stage),
            "--output-dir",
            str(run_dir),
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("saved ") == 1, "only rank 0 reports"
        assert_same_run(run_dir, one_process_run)


@pytest.mark.parametrize("layout", [["--tp", "2", "--sequence-parallel"], ["--cp", "2"]], ids=["sp-tp2", "cp2"])
def test_tensor_and_context_parallel_match_one_process(tmp_path, policy, hash_reward, one_process_run, layout):
    """One model copy split over 2 ranks: by heads, MLP and vocabulary (and the sequence between the
    matmuls), or by the sequence (Ulysses; the 2 ranks then share the sampling as data-parallel
    ranks do)."""
    run = run_ranks(
        "rft.py", *parallel_flags(policy, hash_reward), *layout, "--output-dir", str(tmp_path / "run"), cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(tmp_path / "run", one_process_run)


# --- bad input ----------------------------------------------------------------------------------
def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as error:
        rft.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(args.output_dir), "a failed run must not leave a run directory"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, policy):
    output = str(tmp_path / "run")
    expect_error(rft.Args(output_dir=output), "--model is required")
    expect_error(rft.Args(model=policy, output_dir=output, end_percentile=0.5), "--end-percentile 0.5", "is below")
    expect_error(rft.Args(model=policy, output_dir=output, start_percentile=1.5), "--start-percentile 1.5", "[0, 1]")
    expect_error(rft.Args(model=policy, output_dir=output, pp=2), "--pp 2", "does not pipeline")
    expect_error(rft.Args(model=policy, output_dir=output, task="arithmetic", operations=""), "--operations  must be")
    expect_error(rft.Args(model=policy, output_dir=output, task="arithmetic", train_problems=0), "--train-problems 0")
    expect_error(rft.Args(model=policy, output_dir=output, task="jsonl", data="x.jsonl"), "--reward-model")
    expect_error(rft.Args(model=str(tmp_path / "missing"), output_dir=output), "missing", "no such directory")
    expect_error(rft.Args(model=policy, output_dir=output, max_new_tokens=64), "--max-new-tokens 64", "context")
    expect_error(rft.Args(model=policy, output_dir=output, resume=str(tmp_path)), "not a checkpoint")
    result = run_script("rft.py", "--model", policy, "--samples-per-prompt", "0", "--output-dir", output, cwd=tmp_path)
    assert result.returncode == 1 and os.listdir(tmp_path) == []
    assert result.stderr.strip().splitlines() == ["error: --samples-per-prompt 0 must be at least 1"]
    (tmp_path / "not_a_function.py").write_text("reward = 'good'\n")  # was a TypeError traceback at the first call
    reward_fn = str(tmp_path / "not_a_function.py") + ":reward"
    quick = dict(model=policy, output_dir=output, rounds=1, samples_per_prompt=2, eval_samples_per_start=1)
    expect_error(rft.Args(**quick, reward_fn=reward_fn), "is a str, not a function")
    # A causal LM loads with a made-up score head; with num_labels=1 in its config rft selected on random scores.
    causal_lm = save_tiny_model(tmp_path / "lm", tokenizer=sft.randomwalks_tokenizer(), num_labels=1)
    expect_error(rft.Args(**quick, reward_model=causal_lm), "has no trained score head")


# --- conversational data and chat models (issue 25) ---------------------------------------------
def test_generate_stops_on_every_end_of_turn_id_and_keeps_it():
    """A model biased towards the Llama-3 style template's <|eot_id|>, which is not its EOS: responses end
    at the first of the EOS or <|eot_id|>, keep it, and a response cut at the budget has neither."""
    tokenizer = chat_tokenizer("llama3")
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN["llama3"])
    end_ids = rft.end_of_turn_ids(tokenizer, GenerationConfig(eos_token_id=[tokenizer.eos_token_id, eot]))
    assert end_ids == sorted({tokenizer.eos_token_id, eot}) == rft.end_of_turn_ids(tokenizer)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)).double()
    model.lm_head.weight.data[eot] *= 30
    prompts = [rft.prompt_tokens(tokenizer, {"prompt": [{"role": "user", "content": w}]}, 32) for w in "abcdefgh"]
    torch.manual_seed(0)
    responses = rft.generate(model, prompts, 6, 1.0, tokenizer, end_ids, "cpu")
    assert all(not set(response[:-1]) & set(end_ids) for response in responses)
    ended = [response[-1] == eot for response in responses]
    assert any(ended) and all(response[-1] in end_ids or len(response) == 6 for response in responses)
    assert not all(ended), "the test would not see a response cut at the budget"


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_prompts_are_rendered_as_apply_chat_template_with_the_generation_prompt(style):
    tokenizer = chat_tokenizer(style)
    messages = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"}]
    messages.append({"role": "user", "content": "my friend said hello"})
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    for record in ({"prompt": messages}, {"prompt": messages, "tools": tools}):
        expected = tokenizer.apply_chat_template(
            messages, tools=record.get("tools"), add_generation_prompt=True, tokenize=True
        )["input_ids"]
        assert rft.prompt_tokens(tokenizer, record, 1000) == expected


def test_conversational_prompts_with_a_trl_reward_function(tmp_path):
    """Message-list prompts with an extra column, scored by a reward function that checks it gets message
    lists and the column, and leaves some samples unscored: those are never kept, and a share is logged."""
    policy = save_tiny_chat_model(tmp_path / "chat", "chatml")
    (tmp_path / "reward.py").write_text(
        "def reward(prompts, completions, answer):\n"
        "    assert all(p[-1]['role'] == 'user' for p in prompts)\n"
        "    assert all(c[0]['role'] == 'assistant' for c in completions)\n"
        "    assert all(a in p[-1]['content'] for a, p in zip(answer, prompts)), answer\n"
        "    return [None if i % 4 == 0 else float(len(c[0]['content'])) for i, c in enumerate(completions)]\n"
    )
    words = ["cat", "dog", "friend", "park", "world", "post", "title", "mat", "hello", "summary"]
    records = [{"prompt": [{"role": "user", "content": f"what does the {w} say"}], "answer": w} for w in words]
    args = rft.Args(
        model=policy,
        task="jsonl",
        data=write_jsonl(tmp_path / "chat.jsonl", records),
        reward_fn=f"{tmp_path / 'reward.py'}:reward",
        output_dir=str(tmp_path / "run"),
        rounds=1,
        samples_per_prompt=4,
        batch_size=4,
        max_new_tokens=4,
        eval_prompts=1,
        start_percentile=0.0,
    )
    rft.main(args)
    (round_metrics,) = metrics_of(args.output_dir)["rounds"]
    assert round_metrics["samples/unscored_fraction"] == 0.25 and round_metrics["train/steps"] >= 1
    # Percentile 0: every scored sample of an informative prompt is kept, no unscored one.
    assert round_metrics["samples/kept"] <= 27
    assert AutoTokenizer.from_pretrained(args.output_dir).chat_template == CHAT_TEMPLATES["chatml"]


def test_the_arithmetic_task_end_to_end_reports_its_metrics(tmp_path):
    """--task arithmetic wired in: generated problems, the built-in reward, and the held-out accuracy, well-formed
    share, length (greedy and sampled) and pass@k of --eval-samples 2, at the start and after a round."""
    args = rft.Args(
        model=save_tiny_chat_model(tmp_path / "chat", "chatml"),
        task="arithmetic",
        output_dir=str(tmp_path / "run"),
        rounds=1,
        samples_per_prompt=2,
        batch_size=4,
        max_new_tokens=3,
        train_problems=8,
        eval_prompts=2,
        eval_samples=2,
    )
    rft.main(args)
    metrics = metrics_of(args.output_dir)
    for mode in ("greedy", "sampled"):
        for key in ("accuracy", "well_formed", "response_length"):
            assert f"eval/{key}_{mode}" in metrics and f"eval/{key}_{mode}" in metrics["start"]
        assert 1 <= metrics[f"eval/response_length_{mode}"] <= 3
    assert {"eval/pass@1", "eval/pass@2"} <= metrics.keys()


def test_bad_prompt_data_is_one_line(tmp_path, tiny_gpt2):
    reward_fn = write_reward_fn(tmp_path, "return [1.0] * len(responses)")

    def refused(records, *fragments, model=tiny_gpt2):
        data = write_jsonl(tmp_path / "data.jsonl", records)
        expect_error(
            rft.Args(model=model, task="jsonl", data=data, reward_fn=reward_fn, output_dir=str(tmp_path / "run")),
            *fragments,
        )

    refused([{"prompt": "a"}, {"text": "b"}], "data.jsonl, record 2: expected 'prompt'", "found fields text")
    refused([{"prompt": [{"role": "user", "content": "b"}]}, {"prompt": "a"}], "mixes string prompts and message lists")
    conversations = [{"prompt": [{"role": "user", "content": word}]} for word in ("a", "b")]
    refused(conversations, "has no chat template", "pass --chat-template PATH")


# --- multi-turn environments (issue 26) ----------------------------------------------------------


def environments(folder) -> str:
    (folder / "environments.py").write_text(ENVIRONMENTS)
    return str(folder / "environments.py")


def test_an_episode_of_three_turns_is_the_chat_templates_rendering_with_the_loss_on_the_policys_turns(tmp_path):
    """A scripted policy and a scripted environment of three turns: the episode's ids are apply_chat_template's of the
    final conversation (up to the framing after the last end of turn), its labels are its ids exactly on the assistant
    turns (-100 elsewhere, so collate puts the loss there alone), and its score is the sum of the step rewards."""
    spec = importlib.util.spec_from_file_location("environments", environments(tmp_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = chat_tokenizer("chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_ids = rft.end_of_turn_ids(tokenizer)
    texts = ["the cat", "a dog", "the mat"]
    replies = [tokenizer(t, add_special_tokens=False)["input_ids"] + [im_end] for t in texts]
    args = rft.Args(model="m", env="ThreeTurns", max_new_tokens=200, max_turns=5)
    reward = types.SimpleNamespace(env_class=module.ThreeTurns, end_ids=end_ids, task="jsonl")
    model = TurnScript(replies, len(tokenizer))
    samples, last_replies, scores = rft.play_episodes(
        model, [{"prompt": "x"}], [[]], 0.0, reward, tokenizer, args, "cpu"
    )
    final = [{"role": "user", "content": "count with me"}]
    for turn, text in enumerate(texts, 1):
        final += [{"role": "assistant", "content": text}]
        final += [{"role": "tool" if turn == 1 else "user", "content": f"step {turn}"}] if turn < 3 else []
    rendered = tokenizer.apply_chat_template(final, tokenize=True)["input_ids"]
    ((opening, response, labels),) = samples
    ids = opening + response
    assert ids == rendered[: len(ids)] and tokenizer.decode(rendered[len(ids) :]) == "\n"
    assert scores == [6.0] and last_replies == ["the mat"]
    # Each assistant turn's ids, where the growing renderings place them: its reply up to <|im_end|>.
    policy = [False] * len(rendered)
    for k, message in enumerate(final):
        if message["role"] == "assistant":
            start = len(
                tokenizer.apply_chat_template(final[:k], add_generation_prompt=True, tokenize=True)["input_ids"]
            )
            policy[start : start + len(replies[k // 2])] = [True] * len(replies[k // 2])
    expected = [token if mine else -100 for token, mine in zip(ids, policy)]
    assert [-100] * len(opening) + labels == expected and sum(label != -100 for label in expected) == sum(
        map(len, replies)
    )
    _, _, batch_labels = rft.collate(samples, tokenizer.pad_token_id, "cpu")
    assert batch_labels[0].tolist() == expected


@pytest.fixture(scope="module")
def turn_taker(tmp_path_factory):
    """A tiny chat model that ends a turn (<|im_end|>) often enough for its episodes to run one to three turns."""
    folder = tmp_path_factory.mktemp("turn-taker")
    save_tiny_chat_model(folder, "chatml")
    model = AutoModelForCausalLM.from_pretrained(folder)
    im_end = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.weight[im_end] *= 30
    model.save_pretrained(folder)
    return str(folder)


def env_flags(folder, model) -> list:
    rows = [{"prompt": [{"role": "user", "content": f"what does the {word} say"}], "answer": word} for word in WORDS]
    flags = dict(model=model, task="jsonl", data=write_jsonl(folder / "rows.jsonl", rows))
    flags.update(env=f"{environments(folder)}:ThreeTurns", max_new_tokens=24, max_turns=4, rounds=2, dtype="fp64")
    flags.update(samples_per_prompt=4, generation_batch_size=8, batch_size=4, micro_batch_size=2, eval_prompts=1)
    flags.update(start_percentile=0.5, end_percentile=0.5, learning_rate=3e-3, eval_samples=2)
    return [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]


WORDS = ["cat", "dog", "friend", "park", "world", "post", "title", "mat", "hello", "summary"]


def test_runs_with_an_environment_match_under_one_process_and_two_ranks(tmp_path, turn_taker):
    """Two rounds with --env on a tiny chat model, one process and 2 ranks: the episodes do not depend on the rank
    count, so every round keeps the same samples of the same scores and trains to the same weights (fp64: see
    SAME_MATH)."""
    one = run_script("rft.py", *env_flags(tmp_path, turn_taker), "--output-dir", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_ranks("rft.py", *env_flags(tmp_path, turn_taker), "--output-dir", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    for r in first["rounds"]:  # summed step rewards of 0 to 3 turns: 0, 1, 3 or 6
        assert r["samples/score_max"] >= 3 and r["samples/kept"] >= 4 and r["train/steps"] >= 1
    for key in ("samples/kept", "samples/score_mean", "samples/threshold_mean", "eval/score_sampled"):
        assert [r[key] for r in first["rounds"]] == [r[key] for r in second["rounds"]], key
    assert [r["train/loss"] for r in second["rounds"]] == pytest.approx([r["train/loss"] for r in first["rounds"]])
    assert first["start"] == second["start"] and max_weight_difference(tmp_path / "one", tmp_path / "two") < SAME_MATH


def test_the_calculator_environment_with_the_arithmetic_task(tmp_path):
    check_calculator_env(rft)
    args = rft.Args(
        model=save_tiny_chat_model(tmp_path / "long", "chatml", n_positions=256),  # room for the system message
        task="arithmetic",
        env="calculator",
        output_dir=str(tmp_path / "run"),
        rounds=1,
        samples_per_prompt=2,
        batch_size=4,
        max_new_tokens=24,
        train_problems=8,
        eval_prompts=2,
    )
    rft.main(args)
    metrics = metrics_of(args.output_dir)
    assert {"eval/score_sampled", "eval/accuracy_greedy", "eval/well_formed_sampled"} <= metrics.keys()


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("Raises", ["--env ", ":Raises: Raises.step failed (KeyError: 'score')"]),
        ("WrongType", [":WrongType: step() returned messages 'more'; return role user or tool messages"]),
        ("NeverReturns", ["NeverReturns.step failed (TimeoutError: did not return within --env-timeout 0.5 s)"]),
        (
            "NoUser",
            [":NoUser: reset() returned [{'role': 'system', 'content': 'hello'}]; return messages, one a user's"],
        ),
    ],
)
def test_a_broken_environment_is_one_line(tmp_path, turn_taker, name, fragments):
    rows = [{"prompt": [{"role": "user", "content": word}]} for word in WORDS]
    args = rft.Args(
        model=turn_taker,
        task="jsonl",
        data=write_jsonl(tmp_path / "rows.jsonl", rows),
        env=f"{environments(tmp_path)}:{name}",
        env_timeout=0.5,
        max_new_tokens=24,
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(SystemExit) as error:  # in the first evaluation, once the run directory exists
        rft.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message and all(f in message for f in fragments), message
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_bad_environment_flags_are_one_line(tmp_path, policy, turn_taker):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": [{"role": "user", "content": w}]} for w in WORDS])
    quick = dict(model=turn_taker, task="jsonl", data=rows, output_dir=str(tmp_path / "run"))
    expect_error(rft.Args(**quick, env="m:C", reward_fn="m:f"), "--env m:C gives the reward; drop --reward-model")
    expect_error(rft.Args(**quick, env="m:C", max_turns=0), "--max-turns 0 must be at least 1")
    expect_error(rft.Args(**quick, env="m:C", env_timeout=0), "--env-timeout 0 must be a positive number")
    expect_error(rft.Args(**quick, env="no_such_module:C"), "--env 'no_such_module:C' could not be loaded")
    # The environment's messages are rendered by a chat template: a model without one is refused before any episode.
    expect_error(rft.Args(model=policy, env="calculator", output_dir=quick["output_dir"]), "has no chat template")
