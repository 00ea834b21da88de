"""dpo.py: the losses against hand computations, the response log-probabilities against a plain
softmax, the reference at step 0 (never a table left in the run directory), LoRA, exact resume
(the reference's log-probabilities from the checkpoint), data and context parallel against one
process, bad input, the judge fed as reward_model.py trained it, and sampled pairs kept as sampled."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo
import parallel
import sft
from conftest import (
    SAME_MATH,
    assert_same_weights,
    gamma,
    max_weight_difference,
    read_metrics,
    run_and_kill,
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
    path = save_tiny_model(tmp_path / "policy", "llama", tokenizer=sft.randomwalks_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    pairs = [(([1, 2, 3, 4], 2), ([1, 5, 21], 1)), (([7, 8], 1), ([7, 9, 10, 11, 12], 3))]
    chosen, rejected = dpo.pair_logprobs(model, pairs, 22, torch.device("cpu")).T
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
    return save_tiny_model(folder / "policy", "llama", tokenizer=sft.randomwalks_tokenizer())


@pytest.mark.parametrize("variant", [[], ["--lora-rank", "2", "--lora-alpha", "4"]], ids=["copy", "lora"])
def test_the_reference_is_the_policy_at_step_0_and_training_moves_away(tmp_path, walk_policy, variant):
    """Before the first step the policy is its reference (a frozen copy, or under LoRA itself with
    its adapters off): every log-ratio is 0, so the loss is log 2 and no pair is ranked yet, even
    where the output directory holds a reference table of other pairs, left by a run (with other
    flags) that stopped before its first checkpoint: the 96 + 9 pairs of these flags, so the shapes
    match. The saved model loads in plain transformers and has moved."""
    (tmp_path / "run").mkdir()
    stale = {"train": torch.randn(96, 2) - 20, "eval": torch.randn(9, 2) - 20}
    torch.save(stale, tmp_path / "run" / "reference_logprobs.pt")
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


def test_attention_dropout_is_off_so_the_first_step_starts_at_the_reference(tmp_path):
    """Llama's attention applies config.attention_dropout as a rate it copied at init, not through an
    nn.Dropout module: at 0.3 the first step's training forward drew masks, and its log-ratios to the
    reference (computed in eval mode) were not 0. One pair per micro-batch, as the reference's were
    computed, so the two forwards are the same computation: every implicit reward is exactly 0."""
    policy = save_tiny_model(tmp_path / "policy", "llama", tokenizer=sft.randomwalks_tokenizer(), attention_dropout=0.3)
    flags = [
        "--randomwalks-pairs",
        "8",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "1",
        "--eval-samples-per-start",
        "1",
    ]
    run = run_script("dpo.py", "--model", policy, *flags, "--output-dir", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 1
    first_step = metrics["last_step"]  # the sums of the first step's forward, before its update
    assert first_step["train/chosen_reward"] == 0 and first_step["train/rejected_reward"] == 0
    assert first_step["train/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_resume_after_kill_is_bitwise_exact(tmp_path, walk_policy):
    """Killed after the checkpoint of step 2 and resumed: the reference log-probabilities are read
    back from the checkpoint (nothing of them in the run directory is needed), and the run ends
    bitwise where an uninterrupted one does. A checkpoint without them (as an older dpo.py wrote),
    or a resume whose flags make other pairs (--seed), stops with one line: the policy it would
    recompute them from is trained, no longer the reference."""
    flags = ["--model", walk_policy, *FLAGS, "--save-every", "2", "--num-epochs", "2"]
    flags += ["--eval-every", "6"]  # of 12 steps: the evaluations at the start, mid-way and at the end
    reference, killed = run_and_kill("dpo.py", flags, tmp_path, "step_00000002")
    (killed / "reference_logprobs.pt").unlink(missing_ok=True)  # copied elsewhere without it
    older = tmp_path / "older" / "checkpoints" / "step_00000002"
    shutil.copytree(killed / "checkpoints" / "step_00000002", older)
    state = torch.load(older / "trainer_state.pt", weights_only=False)
    state.pop("reference_logprobs", None)
    torch.save(state, older / "trainer_state.pt")
    (older / parallel.MANIFEST).unlink()
    parallel.write_manifest(str(older))
    for resume, extra in ((older, []), (killed, ["--seed", "2"])):
        run = run_script("dpo.py", *flags, *extra, "--resume", str(resume), cwd=tmp_path)
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]  # after transformers' bars
        assert run.returncode == 1 and "Traceback" not in run.stderr and len(errors) == 1, run.stderr[-2000:]
        assert errors[0].startswith("error: --resume: the checkpoint holds no reference log-probabilities")
        assert not (resume.parent.parent / "config.json").exists()
    resumed = run_script("dpo.py", *flags, "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    assert_same_weights(reference, killed)
    assert read_metrics(reference) == read_metrics(killed)


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


def test_a_causal_lm_is_not_a_judge(tmp_path):
    """A causal LM given as --reward-model loaded with a score head transformers made up at random;
    with num_labels=1 in its config it judged the win rate with it, and the run exited 0."""
    from test_reward_model import write_preference_pairs

    data = write_preference_pairs(tmp_path / "pairs.jsonl", n=16)
    causal_lm = save_tiny_model(tmp_path / "lm", "llama", num_labels=1)
    args = dpo.Args(
        task="jsonl", data=data, model=save_tiny_model(tmp_path / "policy", "llama"), reward_model=causal_lm
    )
    args = dataclasses.replace(args, batch_size=8, eval_prompts=2, max_new_tokens=2, output_dir=str(tmp_path / "run"))
    with pytest.raises(SystemExit) as error:
        dpo.main(args)
    assert str(error.value).startswith("error: --reward-model") and "has no trained score head" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_sentiment_task_ranks_the_policys_own_samples(tmp_path, tiny_gpt2, fake_vader, monkeypatch):
    """Pairs of the policy's own continuations, the more positive (by the stand-in VADER) chosen;
    evaluation reports the policy's VADER score and its KL to the reference, 0 at step 0. Token in,
    token out: every response a forward pass scores (the pairs' in the loss and the reference's
    table, the evaluation samples) is exactly what the sampler drew, with an EOS only where it drew
    one, so a continuation cut at --max-new-tokens has none; the pairs kept for a resume hold the ids."""
    sampled, scored = set(), []
    generate, sequence_logprobs = dpo.generate, dpo.sequence_logprobs

    def recording_generate(*args, **kwargs):
        responses = generate(*args, **kwargs)
        sampled.update(tuple(ids) for ids in responses)
        return responses

    def recording_logprobs(model, batch):
        scored.extend(tuple(row[row != dpo.kernels.IGNORE_INDEX].tolist()) for row in batch["labels"])
        return sequence_logprobs(model, batch)

    monkeypatch.setattr(dpo, "generate", recording_generate)
    monkeypatch.setattr(dpo, "sequence_logprobs", recording_logprobs)
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
    assert scored and set(scored) <= sampled
    eos = AutoTokenizer.from_pretrained(tiny_gpt2).eos_token_id
    assert any(len(ids) == args.max_new_tokens and eos not in ids for ids in scored)
    assert {tuple(p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")} <= set(scored)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["start"]["eval/kl"] == 0 and metrics["eval/kl"] > 0
    assert -1 <= metrics["start"]["eval/vader"] <= 1 and -1 <= metrics["eval/vader"] <= 1


def test_the_judge_is_fed_as_reward_model_py_trained_it():
    """The win rate's judge sees what reward_model.py trains on. With the policy's tokenizer: the
    prompt's ids then the response's as sampled (never decoded and tokenized again), cut on the left
    to fit the judge's context (64 here), right-padded. With a tokenizer of its own (a Llama-3 style
    template, where the policy speaks ChatML): the reply decoded and the conversation rendered with
    the judge's template, through its end-of-turn token, exactly as reward_model.score feeds it; both
    run the same fp64 forward on the same batch, and dpo.py's scores are rounded once to fp32, hence
    rtol 2^-23."""
    import reward_model
    from conftest import chat_tokenizer, tiny_config

    tokenizer, judge_tokenizer = chat_tokenizer("chatml"), chat_tokenizer("llama3")
    config = tiny_config("llama", len(judge_tokenizer), judge_tokenizer.eos_token_id)
    config.update(dict(num_labels=1, pad_token_id=judge_tokenizer.pad_token_id))
    torch.manual_seed(0)
    judge = AutoModelForSequenceClassification.from_config(config).double().eval()
    fed = []  # what the judge's trunk reads (reward_model.score runs the trunk and the score head itself)
    judge.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs.get("input_ids", args[0] if args else None)), with_kwargs=True
    )
    prompts = [{"prompt": [{"role": "user", "content": "the cat"}]}, {"prompt": "my friend said hello to the dog"}]
    prompt_ids = [dpo.tokenize_prompt(tokenizer, p["prompt"])[0] for p in prompts]
    # One reply ended by the model's end of turn; one cut at --max-new-tokens, longer than the judge's context.
    responses = [tokenizer(" sat on the mat<|im_end|>")["input_ids"], tokenizer(" hello" * 70)["input_ids"]]
    dpo.judge_scores(judge, tokenizer, tokenizer, prompts, prompt_ids, responses)
    for row, ids in enumerate([prompt_ids[0] + responses[0], (prompt_ids[1] + responses[1])[-64:]]):
        assert fed[0][row].tolist() == ids + [judge_tokenizer.pad_token_id] * (fed[0].shape[1] - len(ids))
    scores = dpo.judge_scores(judge, judge_tokenizer, tokenizer, prompts, prompt_ids, responses)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    expected = reward_model.score(judge, judge_tokenizer, [p["prompt"] for p in prompts], texts)
    torch.testing.assert_close(scores, expected.float(), rtol=2**-23, atol=0)
    assert torch.equal(fed[1], fed[2])
    rendered = judge_tokenizer.apply_chat_template(
        prompts[0]["prompt"] + [{"role": "assistant", "content": " sat on the mat"}], tokenize=True
    )["input_ids"]
    assert fed[1][0, : len(rendered)].tolist() == rendered and rendered[-1] == judge_tokenizer.convert_tokens_to_ids(
        "<|eot_id|>"
    )


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_conversational_pairs_score_exactly_the_completion_tokens(style):
    """An implicit-prompt pair (the prompt: the conversations' three shared messages) is the chat
    template's rendering written out by hand: the prompt with the generation prompt, each response
    through its end-of-turn token and no EOS after it; a standard pair's response ends with the EOS.
    The loss's labels are exactly the response tokens."""
    from test_reward_model import CHOSEN, PROMPT, REJECTED, RENDERED_PROMPT, written_out

    from conftest import END_OF_TURN, chat_tokenizer

    tokenizer = chat_tokenizer(style)
    pair, kind = dpo.preference_pair({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}, "record 1")
    assert kind == "conversational implicit-prompt preference" and (pair["prompt"], pair["chosen"]) == (PROMPT, CHOSEN)
    standard = {"prompt": "the cat", "chosen": " sat", "rejected": " ran"}
    [(chosen, rejected), (standard_chosen, _)] = dpo.tokenize_pairs(tokenizer, [pair, standard], max_length=512)
    prompt = written_out(tokenizer, RENDERED_PROMPT[style])
    assert chosen == (prompt + written_out(tokenizer, ["the cat sat", END_OF_TURN[style]]), len(prompt))
    assert rejected == (prompt + written_out(tokenizer, ["a dog", END_OF_TURN[style]]), len(prompt))
    the_cat = tokenizer("the cat")["input_ids"]
    assert standard_chosen == (the_cat + tokenizer(" sat")["input_ids"] + [tokenizer.eos_token_id], len(the_cat))
    labels = dpo.collate([chosen, rejected], tokenizer.pad_token_id, "cpu")["labels"]
    assert [row[row != dpo.kernels.IGNORE_INDEX].tolist() for row in labels] == [
        chosen[0][len(prompt) :],
        rejected[0][len(prompt) :],
    ]


def test_generation_stops_on_every_end_of_turn_id_of_the_generation_config():
    """The policy's samples end at the first of the EOS and the generation config's ids (a list, here
    holding <|im_end|>), kept; a sample cut at --max-new-tokens has none."""
    from transformers import GenerationConfig

    from conftest import chat_tokenizer
    from test_reward_model import ScriptedLM

    tokenizer = chat_tokenizer("chatml")
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    tokenizer.chat_template = None  # so that only the generation config can name <|im_end|>
    model = ScriptedLM([[7, im_end, 8, eos], [7, 8, eos, im_end], [7, 8, 9, 10, 11, 12]], len(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=[eos, im_end])
    responses = dpo.generate(model, tokenizer, [[3], [4, 5], [6]], 5, 1.0, "cpu")
    assert responses == [[7, im_end], [7, 8, eos], [7, 8, 9, 10, 11]]


def test_conversational_data_end_to_end_with_a_judge_of_another_template(tmp_path):
    """Implicit-prompt conversations train a tiny ChatML model, evaluated on its samples of the
    held-out conversations (KL, and the win rate by a reward model with a Llama-3 style template,
    which renders them itself). A bad record of each kind, conversational data with a tokenizer that
    has no chat template, and a judge whose tokenizer has none, stop with one error line before
    anything is written."""
    from test_reward_model import BAD_RECORDS, preference_records

    from conftest import chat_tokenizer, save_tiny_chat_model, text_tokenizer, tiny_config, write_jsonl

    judge_tokenizer = chat_tokenizer("llama3")
    config = tiny_config("llama", len(judge_tokenizer), judge_tokenizer.eos_token_id)
    config.update(dict(num_labels=1, pad_token_id=judge_tokenizer.pad_token_id))
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "judge")
    judge_tokenizer.save_pretrained(tmp_path / "judge")
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records("implicit", n=16))
    args = dpo.Args(
        task="jsonl",
        data=data,
        model=save_tiny_chat_model(tmp_path / "policy", "chatml", "llama"),
        reward_model=str(tmp_path / "judge"),
        output_dir=str(tmp_path / "run"),
        batch_size=8,
        eval_prompts=4,
        max_new_tokens=4,
        learning_rate=1e-2,
    )
    for records, message in [*BAD_RECORDS, (preference_records("implicit", n=16), "has no chat template")]:
        model = save_tiny_model(tmp_path / "bare", "llama") if "chat template" in message else args.model
        bad = write_jsonl(tmp_path / "bad.jsonl", records)
        with pytest.raises(SystemExit) as error:
            dpo.main(dataclasses.replace(args, data=bad, model=model))
        assert str(error.value).startswith("error: ") and "\n" not in str(error.value) and message in str(error.value)
        assert not (tmp_path / "run").exists()
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "plain-judge")
    text_tokenizer().save_pretrained(tmp_path / "plain-judge")  # trained on text: no template for conversations
    with pytest.raises(SystemExit, match="its tokenizer has no chat template to render the conversations"):
        dpo.main(dataclasses.replace(args, reward_model=str(tmp_path / "plain-judge")))
    assert not (tmp_path / "run").exists()
    dpo.main(args)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["start"]["eval/kl"] == 0 and metrics["eval/kl"] != 0 and 0 <= metrics["eval/win_rate"] <= 1


def test_sentiment_prompts_as_conversations_are_sampled_from_their_rendering(tmp_path, fake_vader, monkeypatch):
    """Message-list prompts are sampled from as the chat template renders them with the generation
    prompt; the pairs are conversational (one assistant message a side) and keep the sampled ids."""
    from types import SimpleNamespace

    from conftest import save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "chat", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": f"Continue this review: the {word}"}] for word in ("cat", "dog", "park")]
    fed, generate = [], dpo.generate
    monkeypatch.setattr(
        dpo, "generate", lambda model, tok, ids, *rest: fed.extend(ids) or generate(model, tok, ids, *rest)
    )
    args = dpo.Args(task="sentiment", model=model_dir, samples_per_prompt=4, max_new_tokens=4)
    grid = SimpleNamespace(dp_rank=0, dp_size=1, dp_group=None, is_main=True)
    pairs = dpo.sample_sentiment_pairs(prompts, args, grid, torch.device("cpu"))
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in prompts]
    assert fed == [ids for ids in rendered for _ in range(4)]
    assert pairs and all(p["prompt"] in prompts and p["chosen"][0]["role"] == "assistant" for p in pairs)
    assert all(tokenizer.decode(p["chosen_ids"], skip_special_tokens=True) == p["chosen"][0]["content"] for p in pairs)
