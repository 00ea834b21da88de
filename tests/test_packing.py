"""--packing: a micro-batch's sequences concatenated into rows, position ids restarting per sequence, computes
exactly what the padded micro-batch computes (fp64): per-token log-probs (sft.py), each sequence's score at its last
token (reward_model.py) or each response's summed log-prob in pair order (dpo.py), the loss, every parameter's
gradient, and whole runs, for GPT-2 (learned positions), Llama (rotary, GQA) and GPT-NeoX (rotary, parallel
residual)."""

import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpo
import parallel
import ppo
import reward_model as rm
import sft
from conftest import SAME_MATH, chat_tokenizer, max_weight_difference, save_tiny_model, tiny_config, write_jsonl

FAMILIES = ["gpt2", "llama", "gpt-neox"]
CONVERSATION = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome"},
]


def skewed_sequences(tokenizer) -> list:
    """Sequences of 4 to 53 tokens: an empty completion (its EOS the one token learned), one-word ones, long ones, a
    conversation rendered by the chat template, and one learned from its first token on (as a template rendering no
    context before the first turn would give), whose first token no sequence before it in a row may predict."""
    examples = [
        ("the cat", "", None),
        ("a", " dog", None),
        ("my friend said hello to the world and then the cat sat on the mat in the park", " a summary", None),
        ("post", " the dog ran to the park and my friend said hello world to the cat on the mat", None),
        ("title", " hello", None),
        ([], CONVERSATION, None),
    ]
    sequences = sft.tokenize_examples(tokenizer, examples, 64, "truncate")
    return sequences + [(sequences[1][0], [1] * len(sequences[1][0]))]


def tiny_model(family: str, tokenizer, attention: str = "sdpa"):
    torch.manual_seed(0)
    config = tiny_config(family, len(tokenizer), tokenizer.eos_token_id)
    config._attn_implementation = attention
    return AutoModelForCausalLM.from_config(config).double()


def per_sequence_logprobs(model, micro_batch: dict) -> dict:
    """{token ids of a sequence: the log-prob of each of its tokens after the first, given those before}; a
    packed row is cut where its position ids restart (a padded row has none, and is cut at its padding)."""
    logprobs = torch.log_softmax(sft.model_logits(model, micro_batch), -1)
    found = {}
    for row, ids in enumerate(micro_batch["input_ids"].tolist()):
        if "position_ids" in micro_batch:
            starts = [k for k, position in enumerate(micro_batch["position_ids"][row].tolist()) if position == 0]
        else:
            starts = [0, int(micro_batch["attention_mask"][row].sum())]
        for start, end in zip(starts, starts[1:] + [len(ids)]):
            if end - start > 1:
                found[tuple(ids[start:end])] = logprobs[row, torch.arange(start, end - 1), ids[start + 1 : end]]
    return found


@pytest.mark.parametrize(
    "family, attention", [(family, "sdpa") for family in FAMILIES] + [("gpt2", "eager")], ids=lambda x: x
)
def test_packed_equals_padded_logprobs_loss_and_gradients(family, attention):
    tokenizer = chat_tokenizer("chatml")
    sequences = skewed_sequences(tokenizer)
    padded, packed = (sft.collate(sequences, tokenizer.pad_token_id, "cpu", packing) for packing in (False, True))
    assert len(packed["input_ids"]) < len(sequences) and "attention_mask" not in packed  # rows hold several
    model = tiny_model(family, tokenizer, attention)
    # Per token: every position sees its own sequence's tokens and nothing else (in a padded row, the
    # padding's log-probs are cut off: they are what a row ends with, not a sequence).
    expected, actual = per_sequence_logprobs(model, padded), per_sequence_logprobs(model, packed)
    for ids, _ in sequences:
        assert torch.allclose(actual[tuple(ids)], expected[tuple(ids)], rtol=0, atol=1e-12), len(ids)
    # The summed loss and its gradient: the same tokens learned, each predicted from its own sequence alone.
    learned = [sum(mask[1:]) for _, mask in sequences]
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum()) == sum(learned)
    losses, gradients = [], []
    for micro_batch in (padded, packed):
        model.zero_grad()
        loss = sft.loss_sum_from_logits(sft.model_logits(model, micro_batch), micro_batch["labels"])
        loss.backward()
        losses.append(loss.item())
        gradients.append({name: parameter.grad.clone() for name, parameter in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0, name
        assert torch.allclose(gradients[1][name], gradient, rtol=1e-10, atol=1e-13), name


def test_rows_are_no_longer_than_the_longest_sequence_and_keep_every_token():
    tokenizer = chat_tokenizer("chatml")
    sequences = skewed_sequences(tokenizer)  # 4 to 53 tokens: 7 rows of 53 padded, 4 rows packed
    padded, packed = (sft.collate(sequences, tokenizer.pad_token_id, "cpu", packing) for packing in (False, True))
    assert packed["input_ids"].shape == (4, max(len(ids) for ids, _ in sequences)) == (4, padded["input_ids"].shape[1])
    pieces = []
    for ids, positions, labels in zip(*(packed[key].tolist() for key in ("input_ids", "position_ids", "labels"))):
        starts = [k for k, position in enumerate(positions) if position == 0]
        pieces += [ids[start:end] for start, end in zip(starts, starts[1:] + [len(ids)])]
        # Each sequence's first token (and the padding) carries no label: nothing before it in a row predicts it.
        assert all(labels[start] == -100 for start in starts)
    pieces = [piece for piece in pieces if set(piece) != {tokenizer.pad_token_id}]  # the padding ending a row
    assert sorted(pieces) == sorted(ids for ids, _ in sequences)


def skewed_records(n: int, seed: int = 0) -> list:
    """Prompt-completion records whose lengths in words are long-tailed: 1 + lognormal(1, 0.8) for prompts,
    lognormal(1, 1) for completions (0 words: only the EOS is learned), each clipped at 25."""
    rng = random.Random(seed)
    words = "the cat sat on mat a dog ran to park my friend said hello world".split()

    def text(mean: float, spread: float, least: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(min(25, least + int(rng.lognormvariate(mean, spread)))))

    return [{"prompt": text(1, 0.8, 1).strip(), "completion": text(1, 1, 0)} for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_run_with_packing_equals_one_without(tmp_path, family, monkeypatch):
    """Whole fp64 runs on long-tailed lengths in micro-batches of 3: the same loss at every step, the same eval
    loss and the same weights, up to summation order (SAME_MATH's argument in conftest)."""
    model = save_tiny_model(tmp_path / "model", family)
    losses = {}
    accumulate = sft.accumulate_gradients

    def recording(model, micro_batches, *rest):
        loss = accumulate(model, micro_batches, *rest)
        losses.setdefault(micro_batches[0].keys() >= {"position_ids"}, []).append(loss)
        return loss

    monkeypatch.setattr(sft, "accumulate_gradients", recording)
    args = sft.Args(
        task="jsonl",
        data=write_jsonl(tmp_path / "data.jsonl", skewed_records(16)),
        model=model,
        dtype="fp64",
        num_epochs=2,
        batch_size=6,
        micro_batch_size=3,
        eval_fraction=0.25,
        eval_every=2,
        learning_rate=3e-3,
        warmup_steps=1,
        max_new_tokens=2,
        eval_generations=0,
    )
    for packing in (False, True):
        sft.main(replace(args, packing=packing, output_dir=str(tmp_path / str(packing))))
    assert len(losses[True]) == len(losses[False]) >= 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)
    metrics = [json.loads((tmp_path / str(packing) / "metrics.json").read_text()) for packing in (False, True)]
    assert metrics[1]["eval/loss"] == pytest.approx(metrics[0]["eval/loss"], rel=1e-12)
    first, second = (dict(parallel.stored_tensors(str(tmp_path / str(packing)), "model")) for packing in (False, True))
    assert max((first[name] - second[name]).abs().max().item() for name in first) < 1e-9


def test_packing_refuses_split_sequences():
    for flags in (dict(cp=2), dict(tp=2, sequence_parallel=True)):
        with pytest.raises(SystemExit, match="--cp and --sequence-parallel do not compose with --packing"):
            sft.check_args(sft.Args(packing=True, **flags), world_size=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_packed_scores_loss_and_gradients_equal_padded(tmp_path, family):
    """Each sequence's score is read at its own last token in its packed row, seeing its own tokens alone: the
    scores, the summed loss, the pairs ranked right and every gradient are the padded micro-batches' (fp64)."""
    sequences = [ids for ids, _ in skewed_sequences(chat_tokenizer("chatml"))]
    pairs = [(sequences[k], sequences[(k + 3) % len(sequences)], k / 10) for k in range(len(sequences))]
    model_dir = save_tiny_model(tmp_path, family, tokenizer=chat_tokenizer("chatml"))
    model, tokenizer = rm.load_model(model_dir, "cpu", seed=0, dtype=torch.float64)
    model, pad = parallel.DataParallel(model), tokenizer.pad_token_id  # one process: the script's pass-through wrapper
    scores, totals, gradients = [], [], []
    for packing in (False, True):
        args = rm.Args(micro_batch_size=4, packing=packing)  # micro-batches of 4 and 3 pairs
        micro_batches = rm.pair_micro_batches(pairs, args, pad, "cpu")
        with torch.no_grad():
            scores.append(torch.cat([rm.sequence_scores(rm.token_scores(model.module, m), m) for m in micro_batches]))
        model.zero_grad()
        autocast = torch.autocast("cpu", enabled=False)
        totals.append(rm.accumulate_gradients(model, pairs, len(pairs), 1, args, pad, "cpu", autocast).tolist())
        gradients.append({name: parameter.grad.clone() for name, parameter in model.named_parameters()})
    assert len(micro_batches[0]["input_ids"]) < 8 and "attention_mask" not in micro_batches[0]  # rows hold several
    assert scores[0].std() > 1e-3 and torch.allclose(scores[1], scores[0], rtol=0, atol=1e-12)
    assert totals[1][0] == pytest.approx(totals[0][0], rel=1e-12) and totals[1][1] == totals[0][1]
    # The final norm's bias reaches a score through the head alone, so each pair gives it dL/dchosen + dL/drejected
    # = 0: its gradient is zero up to rounding, in either layout.
    final_norm_bias = {"gpt2": "transformer.ln_f.bias", "gpt-neox": "gpt_neox.final_layer_norm.bias"}.get(family)
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0 or name == f"module.{final_norm_bias}", name
        assert torch.allclose(gradients[1][name], gradient, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_run_with_packing_equals_one_without(tmp_path, family, monkeypatch):
    """Whole fp64 reward_model.py runs on long-tailed lengths in micro-batches of 2 pairs: the same loss at every
    step, the same evaluation and the same weights, up to summation order (SAME_MATH's argument in conftest)."""
    model = save_tiny_model(tmp_path / "model", family)
    records = [
        {"prompt": a["prompt"], "chosen": a["completion"] or " the", "rejected": b["completion"] or " a"}
        for a, b in zip(skewed_records(16), skewed_records(16, seed=1))
    ]
    losses = {}
    accumulate = rm.accumulate_gradients

    def recording(model, pairs, batch_pairs, ranks, args, *rest):
        totals = accumulate(model, pairs, batch_pairs, ranks, args, *rest)
        losses.setdefault(args.packing, []).append(totals[0].item())
        return totals

    monkeypatch.setattr(rm, "accumulate_gradients", recording)
    args = rm.Args(
        task="jsonl",
        data=write_jsonl(tmp_path / "pairs.jsonl", records),
        model=model,
        dtype="fp64",
        num_epochs=1,
        batch_size=4,
        micro_batch_size=2,
        eval_fraction=0.25,
        eval_every=2,
        learning_rate=3e-3,
        warmup_steps=1,
    )
    for packing in (False, True):
        rm.main(replace(args, packing=packing, output_dir=str(tmp_path / str(packing))))
    assert len(losses[True]) == len(losses[False]) >= 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)
    metrics = [json.loads((tmp_path / str(packing) / "metrics.json").read_text()) for packing in (False, True)]
    for key in ("eval/loss", "eval/score_mean", "eval/score_std"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-12), key
    assert max_weight_difference(tmp_path / "False", tmp_path / "True") < 1e-9


def test_reward_model_packing_refuses_split_sequences():
    for flags in (dict(cp=2), dict(tp=2, sequence_parallel=True)):
        with pytest.raises(SystemExit, match="--cp and --sequence-parallel do not compose with --packing"):
            rm.check_args(rm.Args(packing=True, **flags), world_size=2)


def skewed_pairs(tokenizer) -> list:
    """dpo.py's pairs of 3 to 33 tokens: an empty response (its EOS the one token scored), one-word ones, long ones,
    and a conversation rendered by the chat template."""
    long = "my friend said hello to the world and then the cat sat on the mat in the park"
    pairs = [
        {"prompt": "the cat", "chosen": "", "rejected": " sat on the mat"},
        {"prompt": long, "chosen": " a summary", "rejected": " hello"},
        {"prompt": "post", "chosen": " " + long, "rejected": " a dog"},
        {
            "prompt": CONVERSATION[:3],
            "chosen": CONVERSATION[3:],
            "rejected": [{"role": "assistant", "content": "Paris"}],
        },
    ]
    return dpo.tokenize_pairs(tokenizer, pairs, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_packed_pair_logprobs_and_gradients_equal_padded(family):
    """Each response's summed log-prob, in pair order, and every parameter's gradient of a sum that weighs each
    response apart (so a response credited to another sequence shows), packed as padded (fp64)."""
    tokenizer = chat_tokenizer("chatml")
    pairs = skewed_pairs(tokenizer)
    sides = [side for pair in pairs for side in pair]
    packed = dpo.collate(sides, tokenizer.pad_token_id, "cpu", packing=True)
    assert len(packed["input_ids"]) < len(sides) and "attention_mask" not in packed  # rows hold several
    model = tiny_model(family, tokenizer)
    weights = torch.randn(len(pairs), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logprobs, gradients = [], []
    for packing in (False, True):
        model.zero_grad()
        pair_logprobs = dpo.pair_logprobs(model, pairs, tokenizer.pad_token_id, "cpu", packing)
        (pair_logprobs * weights).sum().backward()
        logprobs.append(pair_logprobs.detach())
        gradients.append({name: parameter.grad.clone() for name, parameter in model.named_parameters()})
    assert logprobs[0].shape == (len(pairs), 2)
    assert torch.allclose(logprobs[1], logprobs[0], rtol=0, atol=1e-12), (logprobs[1] - logprobs[0]).abs().max()
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0, name
        assert torch.allclose(gradients[1][name], gradient, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_run_with_packing_equals_one_without(tmp_path, family, monkeypatch):
    """Whole fp64 randomwalks runs (walks of 2 to 11 tokens) in micro-batches of 4 pairs, packed into fewer rows: the
    same sums (loss, pairs ranked right, rewards) at every step, so the same reference log-probs too, the same eval
    loss and the same weights, up to summation order (SAME_MATH's argument in conftest)."""
    model = save_tiny_model(tmp_path / "model", family, tokenizer=sft.randomwalks_tokenizer())
    sums, rows = {}, {True: 0, False: 0}
    accumulate, collate = dpo.accumulate_gradients, dpo.collate

    def recording(model, pairs, references, args, *rest):
        sums.setdefault(args.packing, []).append(accumulate(model, pairs, references, args, *rest))
        return sums[args.packing][-1]

    def counting(sequences, pad_token_id, device, packing=False):
        batch = collate(sequences, pad_token_id, device, packing)
        rows[packing] += len(batch["input_ids"])
        return batch

    monkeypatch.setattr(dpo, "accumulate_gradients", recording)
    monkeypatch.setattr(dpo, "collate", counting)
    # No walks sampled at evaluation (half a run's time): the runs compare the losses.
    monkeypatch.setattr(dpo, "generate", lambda model, tokenizer, prompts, *rest: [[] for _ in prompts])
    args = dpo.Args(
        model=model,
        dtype="fp64",
        randomwalks_pairs=16,
        batch_size=8,
        micro_batch_size=4,
        eval_samples_per_start=1,
        warmup_steps=1,
        learning_rate=1e-2,
        beta=0.5,
    )
    for packing in (False, True):
        dpo.main(replace(args, packing=packing, output_dir=str(tmp_path / str(packing))))
    assert 0 < rows[True] < rows[False]
    assert len(sums[True]) == len(sums[False]) == 2
    # Absolute too: the first step's rewards are 0, exactly where the policy's and the reference's rows are the same
    # computation (padded), else up to a few ulps of the summed log-probs (about 30) added in another order.
    for packed, padded in zip(sums[True], sums[False]):
        assert torch.allclose(packed, padded, rtol=1e-12, atol=1e-12), (packed, padded)
    metrics = [json.loads((tmp_path / str(packing) / "metrics.json").read_text()) for packing in (False, True)]
    for key in ("eval/loss", "eval/margin"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-12), key
    assert max_weight_difference(tmp_path / "False", tmp_path / "True") < SAME_MATH


def test_dpo_packing_refuses_split_sequences():
    for flags in (dict(cp=2), dict(tp=2, sequence_parallel=True)):
        with pytest.raises(SystemExit, match="--cp and --sequence-parallel do not compose with --packing"):
            dpo.check_args(dpo.Args(model="m", packing=True, **flags), world_size=2)


def rollout_batch(vocab_size: int, pad_token_id: int, prompt_lengths: list, response_lengths: list):
    """(input_ids, attention_mask, prompt length) of rollouts as ppo.py lays them out: each prompt left-padded to
    the longest, each response right-padded after its last token (its EOS, or the budget)."""
    prompt_length, width = max(prompt_lengths), max(prompt_lengths) + max(response_lengths)
    columns = torch.arange(width)
    mask = torch.stack(
        [
            (columns >= prompt_length - p) & (columns < prompt_length + r)
            for p, r in zip(prompt_lengths, response_lengths)
        ]
    ).long()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, mask.shape, generator=generator).masked_fill(mask == 0, pad_token_id)
    return input_ids, mask, prompt_length


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_packed_logprobs_values_and_gradients_equal_padded(tmp_path, family):
    """ppo.py's training passes on a micro-batch of rollouts (prompts of 1 to 6 tokens left-padded, responses of 1
    to 7 right-padded), packed as padded (fp64): the response log-probs and entropies from the policy's trunk, the
    values from a separate critic's and from a value head on the policy's, and every parameter's gradient of a sum
    weighing each token apart (so a token credited to another sequence or position shows)."""
    tokenizer = chat_tokenizer("chatml")
    input_ids, mask, prompt_length = rollout_batch(
        len(tokenizer), tokenizer.pad_token_id, [6, 1, 3, 4, 2], [7, 1, 3, 5, 2]
    )
    model = tiny_model(family, tokenizer)
    model.save_pretrained(tmp_path / "critic")
    critic = ppo.Critic(str(tmp_path / "critic"), dtype=torch.float64)
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(1))  # zero at first
    value_head = torch.nn.Linear(model.config.hidden_size, 1, dtype=torch.float64)
    parameters = dict(model.named_parameters()) | {f"critic.{k}": p for k, p in critic.named_parameters()}
    parameters |= {f"value_head.{k}": p for k, p in value_head.named_parameters()}
    real = mask[:, prompt_length:].bool()
    weights = torch.randn(3, *real.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outputs, gradients = [], []
    for packing in (False, True):
        micro_batch = ppo.micro_batches_of(
            [torch.arange(len(mask))], input_ids, mask, SimpleNamespace(packing=packing)
        )[0]
        if packing:  # 5 sequences of 13, 2, 6, 9 and 4 tokens in 3 rows of 13
            assert micro_batch["packed"]["input_ids"].shape == (3, 13) and mask.shape == (5, 13)
        for parameter in parameters.values():
            parameter.grad = None
        hidden = ppo.trunk_states(model, micro_batch)
        logprobs, entropy, hidden = ppo.logprobs_from_hidden(
            model.get_output_embeddings(), hidden, input_ids, prompt_length, 1.0, with_entropy=True
        )
        values = critic(micro_batch, prompt_length)
        heads = value_head(hidden).squeeze(-1)
        stacked = torch.stack([logprobs, entropy, values, heads]).where(real, 0.0)
        (stacked[:3] * weights).sum().add(stacked[3].sum()).backward()
        outputs.append(stacked.detach())
        gradients.append({name: parameter.grad.clone() for name, parameter in parameters.items()})
    assert torch.allclose(outputs[1], outputs[0], rtol=0, atol=1e-12), (outputs[1] - outputs[0]).abs().max()
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0, name
        assert torch.allclose(gradients[1][name], gradient, rtol=1e-10, atol=1e-13), name


PPO_VARIANTS = {"gpt2": {}, "llama": {"value_model": True}, "gpt-neox": {"num_layers_unfrozen": 1}}


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_run_with_packing_equals_one_without(tmp_path, family, monkeypatch):
    """Whole fp64 runs on prompts of long-tailed lengths and responses cut by EOS, micro-batches of 4 rollouts
    packed into fewer rows: the same statistics at the last update and the same policy and value weights, up to
    summation order (SAME_MATH's argument in conftest). The value head, a separate critic and a Hydra reference."""
    model = save_tiny_model(tmp_path / "model", family)
    (tmp_path / "reward.py").write_text(
        "def reward(prompts, completions, **kwargs):\n    return [len(c) / 8 for c in completions]\n"
    )
    rows = {True: 0, False: 0}
    micro_batches_of = ppo.micro_batches_of

    def counting(micro_rows, input_ids, attention_mask, args):
        micro_batches = micro_batches_of(micro_rows, input_ids, attention_mask, args)
        rows[args.packing] += sum(len((m["packed"] if args.packing else m)["input_ids"]) for m in micro_batches)
        return micro_batches

    monkeypatch.setattr(ppo, "micro_batches_of", counting)
    variant = PPO_VARIANTS[family]
    args = ppo.Args(
        model=model,
        task="jsonl",
        data=write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in skewed_records(16)]),
        reward_fn=f"{tmp_path / 'reward.py'}:reward",
        value_model=model if variant.get("value_model") else None,
        num_layers_unfrozen=variant.get("num_layers_unfrozen", -1),
        dtype="fp64",
        num_updates=2,
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=4,
        generation_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=1e-3,
        eval_every=100,
        eval_samples=2,
    )
    for packing in (False, True):
        ppo.main(replace(args, packing=packing, output_dir=str(tmp_path / str(packing))))
    assert 0 < rows[True] < rows[False]
    metrics = [json.loads((tmp_path / str(packing) / "metrics.json").read_text()) for packing in (False, True)]
    numbers = [{k: v for k, v in (m | m.pop("last_update")).items() if not k.startswith("time/")} for m in metrics]
    assert numbers[1] == pytest.approx(numbers[0], rel=SAME_MATH, abs=SAME_MATH)
    assert numbers[1]["policy/first_minibatch_max_log_ratio"] == 0.0
    assert max_weight_difference(tmp_path / "False", tmp_path / "True") < SAME_MATH
    # The first update moved the policy (k1, a sampled log-ratio, may come out negative): the agreement is not trivial.
    assert abs(numbers[1]["objective/kl"]) > 1e-5
    values = [torch.load(tmp_path / str(packing) / "value_head.pt") for packing in (False, True)]
    assert (
        max((values[0][m][k] - values[1][m][k]).abs().max().item() for m in values[0] for k in values[0][m]) < SAME_MATH
    )


def test_ppo_packing_refuses_pipelines_and_split_sequences():
    for flags in (dict(pp=2), dict(cp=2), dict(tp=2, sequence_parallel=True)):
        with pytest.raises(SystemExit, match="--packing composes with data and tensor parallelism only"):
            ppo.check_args(ppo.Args(model="m", packing=True, **flags), world_size=2)
