"""ppo.py: the update's pieces against hand computations, Hydra and LoRA references, critic-free
advantages, exact resume (also past a damaged checkpoint), bad input, short runs of every variant,
and data, tensor and pipeline parallel under torchrun against one process (in fp64, to SAME_MATH)."""

import collections
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import types
from dataclasses import replace

import pytest
import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

import kernels
import parallel
import ppo
import sft
import rft
from conftest import (
    check_calculator_env,
    TurnScript,
    ENVIRONMENTS,
    CHAT_TEMPLATES,
    END_OF_TURN,
    FIXTURES,
    chat_tokenizer,
    save_tiny_chat_model,
    write_jsonl,
    LOGPROB_GAP,
    SAME_MATH,
    assert_same_weights,
    damage,
    run_and_kill,
    run_script,
    save_tiny_model,
    text_tokenizer,
    tiny_config,
    gamma,
    run_ranks,
    torchrun_kill_and_resume,
)


@pytest.fixture(scope="module")
def walk_policy(tmp_path_factory):
    """A tiny GPT-2 with the randomwalks tokenizer: a policy the scripts accept."""
    return save_tiny_model(tmp_path_factory.mktemp("policy"), "gpt2", tokenizer=sft.randomwalks_tokenizer())


@pytest.fixture(scope="module")
def text_reward_model(tmp_path_factory):
    """A tiny reward model with a text tokenizer unlike the randomwalks one."""
    path = tmp_path_factory.mktemp("rm")
    tokenizer = text_tokenizer()
    config = tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def quick_args(tmp_path, policy, **overrides):
    settings = dict(
        model=policy,
        output_dir=str(tmp_path / "run"),
        num_updates=2,
        batch_size=8,
        mini_batch_size=4,
        micro_batch_size=2,
        ppo_epochs=2,
        eval_every=100,
        eval_samples_per_start=1,
    )
    return ppo.Args(**{**settings, **overrides})


def assert_close(actual, expected, atol):
    assert torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=atol), (
        actual,
        expected,
    )


def last_update(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as file:
        return json.load(file)


# --- the pieces of the update, by hand ----------------------------------------------------------
def test_rewards_advantages_and_returns_with_padding():
    # Two responses: the first has 2 real tokens then padding, the second 3.
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 7.0], [0.0, -0.1, 0.3]], dtype=torch.float64)
    scores = torch.tensor([1.0, -1.0], dtype=torch.float64)
    rewards = ppo.token_rewards(scores, kl, mask, beta=0.5)
    assert_close(rewards, [[-0.05, -0.1 + 1.0, 0.0], [0.0, 0.05, -0.15 - 1.0]], 1e-15)
    values = torch.tensor([[0.5, 0.2, 9.0], [0.1, 0.3, -0.2]], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    advantages, returns = kernels.gae(values, rewards, mask, gamma, lam)
    # Row 0 by hand: the value after the last real token is 0, the padding's 9.0 is never read.
    delta1 = 0.9 - 0.2
    delta0 = -0.05 + gamma * 0.2 - 0.5
    expected0 = [delta0 + gamma * lam * delta1, delta1, 0.0]
    # Row 1 by hand.
    d2 = -1.15 - (-0.2)
    d1 = 0.05 + gamma * (-0.2) - 0.3
    d0 = 0.0 + gamma * 0.3 - 0.1
    expected1 = [d0 + gamma * lam * (d1 + gamma * lam * d2), d1 + gamma * lam * d2, d2]
    assert_close(advantages, [expected0, expected1], 1e-12)
    assert_close(
        returns,
        [[expected0[0] + 0.5, expected0[1] + 0.2, 0.0], [e + v for e, v in zip(expected1, [0.1, 0.3, -0.2])]],
        1e-12,
    )


def test_policy_and_value_losses_by_hand():
    args = ppo.Args(cliprange=0.2, cliprange_value=0.5, vf_coef=0.5, loss_aggregation="token")
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    old_logprobs = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    logprobs = torch.tensor(
        [[-1.0 + math.log(1.5), -2.0 + math.log(0.9), 5.0]], dtype=torch.float64
    )  # ratios 1.5 and 0.9
    advantages = torch.tensor([[2.0, -1.0, 4.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 1.2, 3.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 9.0]], dtype=torch.float64)
    loss, stats = ppo.ppo_losses(
        logprobs, old_logprobs, advantages, values, old_values, returns, mask, args, normaliser=2.0
    )
    # Token 0: max(-2 * 1.5, -2 * 1.2) = -2.4 (clipped). Token 1: max(1 * 0.9, 1 * 0.9) = 0.9.
    policy_loss = (-2.4 + 0.9) / 2
    # Token 0: value moved 1.0 > 0.5, so clipped 0.5: max((1-2)^2, (0.5-2)^2) = 2.25. Token 1: max(1.44, 1.44).
    value_loss = 0.5 * (2.25 + 1.44) / 2
    assert loss.item() == pytest.approx(policy_loss + 0.5 * value_loss, rel=1e-12)
    assert stats["policy/clip_fraction"].item() == pytest.approx(0.5)
    assert stats["value/clip_fraction"].item() == pytest.approx(0.5)
    assert stats["policy/approx_kl"].item() == pytest.approx(
        ((1.5 - 1 - math.log(1.5)) + (0.9 - 1 - math.log(0.9))) / 2, rel=1e-12
    )
    # Per-sequence aggregation: the mean over each sequence's real tokens, then over sequences.
    args.loss_aggregation = "sequence"
    per_sequence, _ = ppo.ppo_losses(logprobs, old_logprobs, advantages, None, None, None, mask, args, normaliser=1.0)
    assert per_sequence.item() == pytest.approx((-2.4 + 0.9) / 2, rel=1e-12)


def test_kl_controller():
    fixed = ppo.KLController(0.1, None, 10000)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    adaptive = ppo.KLController(0.1, 6.0, 10000)
    adaptive.update(9.0, 256)  # error = clip(9/6 - 1) = 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    adaptive.update(5.7, 256)  # error = -0.05
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.05 * 256 / 10000))


def test_kl_estimators():
    # fp64: k3 >= 0.1 here, and the two formulas' few roundings of terms <= 2.7 are ~1e-15 of it (in
    # fp32, r - 1 - log r could be off by 3e-6 of k3 = 0.107: more than approx's default 1e-6).
    logprobs, ref_logprobs = (
        torch.tensor([-1.0, -2.0], dtype=torch.float64),
        torch.tensor([-1.5, -1.0], dtype=torch.float64),
    )
    assert ppo.kl_per_token(logprobs, ref_logprobs, "k1").tolist() == [0.5, -1.0]
    r = torch.exp(ref_logprobs - logprobs)
    assert ppo.kl_per_token(logprobs, ref_logprobs, "k3").tolist() == pytest.approx(
        (r - 1 - torch.log(r)).tolist(), rel=1e-12
    )


def test_running_moments_match_the_whole_sample():
    moments = ppo.RunningMoments()
    chunks = [torch.randn(n) * 3 + 1 for n in (5, 1, 17, 8)]
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    # The moments accumulate in fp64: 31 values merged in another order, ~1e-15 apart.
    assert moments.mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std().item(), rel=1e-12)


def test_adamw_state_made_before_the_loop_is_the_one_its_first_step_makes():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    eager, lazy = (torch.optim.AdamW(ws, lr=0.1, weight_decay=0.0, fused=True) for ws in (weights, twins))
    ppo.allocate_adamw_state(eager)
    for _ in range(3):  # the same gradients into both: every weight and moment stays bitwise the same
        for w, twin in zip(weights, twins):
            w.grad = torch.randn(w.shape)
            twin.grad = w.grad.clone()
        eager.step(), lazy.step()
        for w, twin in zip(weights, twins):
            assert torch.equal(w, twin)
            for key, value in lazy.state[twin].items():
                assert value.dtype == eager.state[w][key].dtype and torch.equal(value, eager.state[w][key]), key


def test_truncate_at_eos():
    eos, pad = 9, 0
    responses = torch.tensor([[3, 9, 4, 9], [3, 4, 5, 6], [9, 2, 2, 2]])
    truncated, mask, has_eos = ppo.truncate_at_eos(responses, eos, pad)
    assert truncated.tolist() == [[3, 9, 0, 0], [3, 4, 5, 6], [9, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_eos.tolist() == [True, False, True]


def test_critic_free_advantages_on_a_hand_computed_group():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    kl = torch.tensor([[0.2, 0.2], [0.4, 9.0], [0.0, 0.0], [0.1, 0.1]], dtype=torch.float64)
    scores = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    beta = 0.5
    reward = [1.0 - 0.2, 2.0 - 0.2, 0.0, 3.0 - 0.1]  # score - beta * summed KL over real tokens; groups of 2
    rloo = ppo.critic_free_advantages("rloo", scores, kl, mask, beta, 2, 1.0)
    assert_close(
        rloo,
        [
            [reward[0] - reward[1]] * 2,
            [reward[1] - reward[0], 0.0],
            [reward[2] - reward[3]] * 2,
            [reward[3] - reward[2]] * 2,
        ],
        1e-12,
    )
    # GRPO normalises the scores alone (the KL is a loss term): a group of two is +-1/sqrt(2) whatever its KL.
    grpo = ppo.critic_free_advantages("grpo", scores, kl, mask, beta, 2, 1.0)
    half = 1 / math.sqrt(2)  # (score - mean) / unbiased std for two scores
    # The 1e-8 added to the std s moves (x - mean) / s by |x - mean| 1e-8 / s^2 = 1e-8 here (s = 1/sqrt 2).
    assert_close(grpo, [[-half, -half], [half, 0.0], [-half, -half], [half, half]], 1.1e-8)
    reinforce = ppo.critic_free_advantages("reinforce++", scores, kl, mask, beta, 2, 1.0)
    returns = torch.tensor(
        [[-0.1 + 0.9, 0.9], [1.8, 0.0], [0.0, 0.0], [-0.05 + 2.95, 2.95]], dtype=torch.float64
    )  # gamma 1
    real = returns[mask]
    assert reinforce[mask].tolist() == pytest.approx(
        ((real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8)).tolist(), abs=1e-12
    )
    assert reinforce[1, 1].item() == 0.0


def test_grpo_keeps_the_kl_out_of_the_advantage_and_puts_k3_in_the_loss():
    """DeepSeekMath's GRPO on a group of tied scores: every advantage is 0 whatever the KL (it
    used to be the group-normalised KL, [1.02, -1.32, -0.15, 0.44] here: unit-scale noise), and
    the loss is beta times the mean per-sequence k3 KL of the current policy."""
    scores = torch.ones(4, dtype=torch.float64)
    kl = torch.tensor([0.10, 0.30, 0.20, 0.15], dtype=torch.float64)[:, None]  # one-token responses
    mask = torch.ones(4, 1, dtype=torch.bool)
    advantages = ppo.critic_free_advantages("grpo", scores, kl, mask, 0.05, 4, 1.0)
    assert advantages.abs().max().item() == 0.0
    args = ppo.check_args(ppo.Args(model="m", advantage="grpo", samples_per_prompt=4), 1)
    assert args.loss_aggregation == "sequence"
    logprobs = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]], dtype=torch.float64)
    ref_logprobs = logprobs - torch.tensor([[0.2], [-0.1], [0.0], [0.3]], dtype=torch.float64)
    loss, stats = ppo.ppo_losses(logprobs, logprobs, advantages, None, None, None, mask, args, 4.0, ref_logprobs, 0.05)
    k3 = [math.exp(-d) - 1 + d for d in (0.2, -0.1, 0.0, 0.3)]  # pi_ref / pi - log(pi_ref / pi) - 1
    assert loss.item() == pytest.approx(0.05 * sum(k3) / 4, abs=1e-15)
    assert stats["policy/kl_loss"].item() == pytest.approx(sum(k3) / 4, abs=1e-15)


# --- Dr. GRPO and DAPO's pieces, by hand -----------------------------------------------------------
# Two prompts x four samples: the first group's scores spread evenly, the second's one outlier. Row 3 has padding.
GROUPS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 4.0], dtype=torch.float64)
GROUPS_MASK = torch.tensor([[1, 1]] * 3 + [[1, 0]] + [[1, 1]] * 4, dtype=torch.bool)


def test_dr_grpo_leaves_the_group_std_out_of_the_advantage():
    """Group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 1, std 2. DeepSeekMath divides the
    centred scores by the std, which lifts the evenly spread group's +-0.5 to +-sqrt(3)/2 and shrinks
    the outlier's 3 to 1.5; Dr. GRPO keeps them centred only."""
    kl = torch.full((8, 2), 0.3, dtype=torch.float64)  # never in a grpo advantage
    scaled = ppo.critic_free_advantages("grpo", GROUPS, kl, GROUPS_MASK, 0.1, 4, 1.0)
    s = math.sqrt(3) / 2
    expected = [s, -s, -s, s, -0.5, -0.5, -0.5, 1.5]
    # The 1e-8 added to the std s moves (x - mean) / s by |x - mean| 1e-8 / s^2: at most 0.5 / (1/3) 1e-8.
    assert_close(scaled, [[a, a if row != 3 else 0.0] for row, a in enumerate(expected)], 1.6e-8)
    centred = ppo.critic_free_advantages("grpo", GROUPS, kl, GROUPS_MASK, 0.1, 4, 1.0, scale_by_std=False)
    expected = [0.5, -0.5, -0.5, 0.5, -1.0, -1.0, -1.0, 3.0]
    assert_close(centred, [[a, a if row != 3 else 0.0] for row, a in enumerate(expected)], 1e-15)


def test_loss_aggregations_by_hand_and_over_micro_batches():
    """Per-token losses of three sequences of 2, 1 and 3 real tokens (9: padding, never counted),
    a budget of 4 tokens. token (DAPO): 21 / 6; sequence: the mean of the means 1.5, 3 and 5;
    constant (Dr. GRPO): 21 / (3 sequences x 4). Summed over micro-batches, each divided by the
    whole minibatch's normaliser, the parts give the whole: what accumulation and ranks rely on."""
    loss = torch.tensor([[1, 2, 9, 9], [3, 9, 9, 9], [4, 5, 6, 9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # Integer losses: every sum and every division by 2, 4, 6 or 12 here is exact; a division by 3, the
    # sum after it and the expected value's own division round: 3 u = 3.3e-16 relative.
    for aggregation, normaliser, expected in (("token", 6, 21 / 6), ("sequence", 3, 9.5 / 3), ("constant", 12, 1.75)):
        assert ppo.loss_normaliser(mask, aggregation, max_new_tokens=4) == normaliser
        whole = ppo.aggregate(loss, mask, aggregation, normaliser)
        assert whole.item() == pytest.approx(expected, rel=1e-15), aggregation
        parts = sum(ppo.aggregate(loss[rows], mask[rows], aggregation, normaliser) for rows in ([0, 1], [2]))
        assert parts.item() == pytest.approx(expected, rel=1e-15), aggregation


def test_clip_higher_clips_and_counts_each_side_by_hand():
    """Ratios 1.25 and 1.4 with advantage +1, 0.7 and 0.9 with -1 (a padded token with ratio 5 is
    never counted). Symmetric 0.2: the policy loss clips 1.25 and 1.4 to 1.2 and 0.7 to 0.8, and 3
    of 4 tokens lie outside [0.8, 1.2]. DAPO's clip-higher 0.28: 1.25 is inside [0.8, 1.28] and 1.4
    clips to 1.28; 2 of 4 lie outside."""
    ratios = [1.25, 1.4, 0.7, 0.9, 5.0]
    old_logprobs = torch.full((1, 5), -2.0, dtype=torch.float64)
    logprobs = old_logprobs + torch.log(torch.tensor([ratios], dtype=torch.float64))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    for high, expected_loss, expected_fraction in (
        (None, (-1.2 - 1.2 + 0.8 + 0.9) / 4, 0.75),
        (0.28, (-1.25 - 1.28 + 0.8 + 0.9) / 4, 0.5),
    ):
        args = ppo.Args(cliprange=0.2, cliprange_high=high, loss_aggregation="token")
        loss, stats = ppo.ppo_losses(logprobs, old_logprobs, advantages, None, None, None, mask, args, 4.0)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-12), high
        assert stats["policy/clip_fraction"].item() == expected_fraction, high


def test_importance_sampling_weights_and_losses_by_hand():
    """Trainer-over-sampler ratios 0.5, 1.5 and 3 on real tokens (a padded token at 10 is never
    counted), cap 2: tis weighs the tokens' policy losses 0.5, 1.5 and 2; mis 0.5, 1.5 and 0. The
    update's ratio is 1 here, so each token's policy loss is -A times its weight; token aggregation
    divides by the 3 real tokens. Every weight, product and sum is exact in fp64 except the log
    and exp that carry the ratios (a few units of 2^-53 each)."""
    sampler_logprobs = torch.full((1, 4), -2.0, dtype=torch.float64)
    old_logprobs = sampler_logprobs + torch.log(torch.tensor([[0.5, 1.5, 3.0, 10.0]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    advantages = torch.tensor([[2.0, -1.0, 4.0, 8.0]], dtype=torch.float64)
    args = ppo.Args(loss_aggregation="token")
    for correction, weights in (("none", [1, 1, 1]), ("tis", [0.5, 1.5, 2.0]), ("mis", [0.5, 1.5, 0.0])):
        is_weights, stats = ppo.importance_weights(old_logprobs, sampler_logprobs, mask, correction, cap=2.0)
        assert_close(is_weights[:, :3], [weights], 1e-15)
        loss, _ = ppo.ppo_losses(
            old_logprobs, old_logprobs, advantages, None, None, None, mask, args, 3.0, None, 0.0, is_weights
        )
        expected = -(2.0 * weights[0] - 1.0 * weights[1] + 4.0 * weights[2]) / 3
        assert loss.item() == pytest.approx(expected, rel=1e-14), correction
        if correction != "none":
            assert stats["is/ratio_mean"] == pytest.approx(5 / 3, rel=1e-14)
            assert stats["is/ratio_max"] == pytest.approx(3.0, rel=1e-14)
            assert stats["is/capped_fraction"] == pytest.approx(1 / 3, rel=1e-15)
    assert ppo.importance_weights(old_logprobs, sampler_logprobs, mask, "none", cap=2.0)[1] == {}


def test_importance_sampling_changes_nothing_where_sampler_and_trainer_agree():
    """Identical sampler and trainer log-probs: rho is exp(0) = 1 exactly, every weight is 1, and
    the loss and its gradient are bitwise those without a correction, whatever the update's ratio."""
    torch.manual_seed(0)
    old_logprobs = -torch.rand(3, 5, dtype=torch.float64) * 3
    advantages = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    args = ppo.Args(loss_aggregation="token", cliprange=0.2)
    results = {}
    for correction in ("none", "tis", "mis"):
        logprobs = (
            old_logprobs + 0.3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ).requires_grad_()
        weights, _ = ppo.importance_weights(old_logprobs, old_logprobs.clone(), mask, correction, cap=1.0)
        loss, _ = ppo.ppo_losses(
            logprobs, old_logprobs, advantages, None, None, None, mask, args, 8.0, None, 0.0, weights
        )
        loss.backward()
        results[correction] = (loss.detach(), logprobs.grad)
    for correction in ("tis", "mis"):
        assert torch.equal(results[correction][0], results["none"][0]), correction
        assert torch.equal(results[correction][1], results["none"][1]), correction


# --- the arithmetic task (its core is in ppo.py and rft.py alike: both copies are checked) --------
def evaluated_by_hand(text):
    """A problem's value computed apart from the scripts: products first, then sums, left to right."""
    tokens = text.split()
    terms, signs = [int(tokens[0])], [1]
    for operator, number in zip(tokens[1::2], tokens[2::2]):
        if operator == "*":
            terms[-1] *= int(number)
        else:
            terms.append(int(number))
            signs.append(1 if operator == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms))


def problem_text(row):
    """The expression of a generated problem's question, which must be the task's one user message."""
    (message,) = row["prompt"]
    assert message["role"] == "user"
    return re.fullmatch(r"What is ([0-9 +*-]+)\? Answer with the number only\.", message["content"]).group(1)


@pytest.mark.parametrize("script", [ppo, rft])
def test_arithmetic_problems_are_distinct_right_and_disjoint_from_the_held_out_ones(script):
    rows = script.arithmetic_problems(1, 200, 3, 2, "+-*", held_out=False)
    texts = [problem_text(row) for row in rows]
    assert len(set(texts)) == 200
    for text, row in zip(texts, rows):
        numbers, operators = text.split()[::2], text.split()[1::2]
        assert len(numbers) == 3 and all(10 <= int(n) <= 99 for n in numbers) and set(operators) <= set("+-*")
        assert row["answer"] == evaluated_by_hand(text), text
    assert {"+", "-", "*"} <= {o for text in texts for o in text.split()[1::2]}
    assert script.arithmetic_problems(1, 200, 3, 2, "+-*", held_out=False) == rows  # a function of the seed
    assert script.arithmetic_problems(2, 200, 3, 2, "+-*", held_out=False) != rows
    # Drawn (729,000 x 9 problems), from another seed: the sides never meet.
    held_out = [problem_text(row) for row in script.arithmetic_problems(2, 200, 3, 2, "+-*", held_out=True)]
    assert len(set(held_out)) == 200 and set(held_out).isdisjoint(texts)
    # Listed (one-digit addition, 100 problems): the sides split the whole space whatever the seed and
    # count, and the held-out side is the same set from any seed.
    train = script.arithmetic_problems(1, 1000, 2, 1, "+", held_out=False)
    held_out = script.arithmetic_problems(5, 1000, 2, 1, "+", held_out=True)
    assert len(train) + len(held_out) == 100 and 0 < len(held_out) < 20
    assert {problem_text(r) for r in train}.isdisjoint(problem_text(r) for r in held_out)
    assert all(r["answer"] == evaluated_by_hand(problem_text(r)) for r in train + held_out)
    again = script.arithmetic_problems(9, 1000, 2, 1, "+", held_out=True)
    assert again != held_out and sorted(map(problem_text, again)) == sorted(map(problem_text, held_out))


@pytest.mark.parametrize("script", [ppo, rft])
def test_arithmetic_answer_extraction_and_reward_by_hand(script):
    for reply, expected in (
        ("68", (68, True)),
        ("  68\n", (68, True)),
        ("-22", (-22, True)),
        ("The answer is 68.", (68, False)),
        ("23 + 45 = 68", (68, False)),  # several numbers: the last one counts
        ("68 or maybe 69", (69, False)),
        ("It is -7", (-7, False)),
        ("1,234", (234, False)),
        ("68 68", (68, False)),
        ("sixty-eight", (None, False)),
        ("", (None, False)),
    ):
        assert script.arithmetic_answer(reply) == expected, reply
    replies = ["68", "The answer is 68", "67", "I do not know", " -3 "]
    answers = [68, 68, 68, 68, -3]
    expected = [1.25, 1.0, 0.25, 0.0, 1.25]
    prompts = [[{"role": "user", "content": "What is 23 + 45?"}]] * 5
    conversational = [[{"role": "assistant", "content": reply}] for reply in replies]
    assert script.arithmetic_reward(prompts, conversational, answers, format_reward=0.25, tests=[None] * 5) == expected
    assert script.arithmetic_reward(["What is 23 + 45?"] * 5, replies, answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("script", [ppo, rft])
def test_pass_at_k_and_the_arithmetic_metrics_by_hand(script):
    for n, right, k in ((4, 1, 2), (5, 2, 3), (10, 3, 4), (3, 0, 1), (3, 3, 2), (4, 2, 3)):
        assert script.pass_at_k(n, right, k) == pytest.approx(1 - math.comb(n - right, k) / math.comb(n, k), rel=1e-14)
    # Two problems (answers 5 and 7) with four samples each: the first right once, the second never.
    replies = ["5", "6", "the answer is 4", "4", "x", "8", "9", "-7"]
    metrics = script.arithmetic_metrics("sampled", replies, [5] * 4 + [7] * 4, [1, 1, 4, 1, 1, 1, 1, 2], samples=4)
    assert metrics == {
        "eval/accuracy_sampled": 1 / 8,
        "eval/response_length_sampled": 12 / 8,
        "eval/well_formed_sampled": 6 / 8,
        "eval/pass@1": pytest.approx(1 / 8, rel=1e-15),  # (1/4 + 0) / 2
        "eval/pass@2": pytest.approx(1 / 4, rel=1e-15),  # (1 - C(3,2)/C(4,2) = 1/2, + 0) / 2
        "eval/pass@4": 1 / 2,
    }
    greedy = script.arithmetic_metrics("greedy", ["5", "7 "], [5, 8], [1, 2], samples=1)
    assert greedy == {"eval/accuracy_greedy": 0.5, "eval/response_length_greedy": 1.5, "eval/well_formed_greedy": 1.0}


def test_dynamic_sampling_drops_the_groups_of_equal_scores():
    """The second group's scores all equal 0.5: its four responses leave the loss mask (and the
    counts the loss is divided by); the first group is kept whole, padding included. With every
    group equal nothing is left: every normaliser is 0, which main reads as no step."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    kept, fraction = ppo.drop_equal_groups(scores, GROUPS_MASK, 4)
    assert fraction == 0.5
    assert torch.equal(kept[:4], GROUPS_MASK[:4]) and not kept[4:].any()
    assert [ppo.loss_normaliser(kept, a, 2) for a in ("token", "sequence", "constant")] == [7, 4, 8]
    nearly = scores.clone()
    nearly[7] += 1e-12  # not equal: kept
    assert ppo.drop_equal_groups(nearly, GROUPS_MASK, 4)[1] == 0.0
    none_left, fraction = ppo.drop_equal_groups(torch.ones(8, dtype=torch.float64), GROUPS_MASK, 4)
    assert (
        fraction == 1.0 and [ppo.loss_normaliser(none_left, a, 2) for a in ("token", "sequence", "constant")] == [0] * 3
    )


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.precision)])
def test_under_bf16_the_reference_and_the_sampler_are_the_policy_at_the_first_rollout(tmp_path, family):
    """--dtype bf16: the full reference copy keeps only its matmul weights in bf16, so the KL of the
    first rollout, before any step, is exactly 0 (with a whole-bf16 copy, whose residual stream,
    embeddings and norms were bf16, it was not), in one process and under ZeRO-3, which shards the
    reference's bf16 and fp32 parameters in separate buffers. GPT-2 ties its LM head to the
    embedding (kept fp32); Llama's untied head goes bf16. Under --pp the rollouts come from a copy
    gathered from the stages, which follows the same rule: a whole-bf16 copy sampled from another
    distribution than the policy's (a sampler log-prob gap of 0.017 on randomwalks), where now the
    gap is rounding, as without --pp (LOGPROB_GAP, see conftest; test_pipeline_parallel checks
    the copy exactly)."""
    policy = save_tiny_model(tmp_path / "policy", family, tokenizer=sft.randomwalks_tokenizer())
    args = quick_args(tmp_path, policy, dtype="bf16", num_updates=1)
    ppo.main(args)
    assert last_update(args.output_dir)["last_update"]["objective/kl"] == 0.0
    flags = [
        "--model",
        policy,
        "--dtype",
        "bf16",
        "--num-updates",
        "1",
        "--batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--eval-samples-per-start",
        "1",
    ]
    for layout in (["--zero-stage", "3"], ["--pp", "2"]):
        result = run_ranks("ppo.py", *flags, *layout, "--output-dir", str(tmp_path / layout[0]), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = last_update(tmp_path / layout[0])["last_update"]
        assert metrics["objective/kl"] == 0.0, layout
        assert metrics["policy/sampler_logprob_gap"] < LOGPROB_GAP[torch.bfloat16], layout


def test_first_batch_reward_normalization_centres_and_scales_the_reference_samples(tmp_path, walk_policy):
    """--reward-normalization first-batch: the scores of the first batch, the reference policy's own
    samples (policy and reference are equal then), come out centred (and divided by their std, as in
    lm-human-preferences); by default a reward function's scores stay raw."""
    reward = write_reward_fn(tmp_path, "return [10.0 + 3.0 * len(r) for r in responses]")
    raw = quick_args(tmp_path, walk_policy, reward_fn=reward, num_updates=1, output_dir=str(tmp_path / "raw"))
    ppo.main(raw)
    assert last_update(raw.output_dir)["last_update"]["objective/score"] > 10
    normalised = quick_args(tmp_path, walk_policy, reward_fn=reward, num_updates=1, reward_normalization="first-batch")
    ppo.main(normalised)
    # fp32, n = 8 scores s <= 10 + 3 max_new_tokens (one letter a token): their mean errs by gamma(n) max s,
    # centring by u more, and the centred scores are divided by 3 std(lengths) >= 3 / sqrt(n) (or,
    # all lengths equal, are 0); their mean, of n values of size < sqrt(n), adds gamma(n + 2) sqrt(n).
    n, top = normalised.batch_size, 10 + 3 * normalised.max_new_tokens
    bound = gamma(n + 1) * top * math.sqrt(n) / 3 + gamma(n + 2) * math.sqrt(n)
    assert last_update(normalised.output_dir)["last_update"]["objective/score"] == pytest.approx(0.0, abs=bound)


def test_sampling_is_plain_softmax_whatever_the_checkpoint_asks_and_returns_its_logprobs():
    """A policy whose generation_config asks for a huge repetition penalty and no repeated token
    (instruct checkpoints often ship a penalty): model.generate() obeyed it and never repeated a
    token, sampling from a distribution PPO's log-probs do not describe. ppo.generate samples
    softmax(logits / T) itself: the same tokens, seed for seed, as a loop that re-runs the whole
    left-padded prefix every step, and the log-probs of that distribution."""
    tokenizer = sft.randomwalks_tokenizer()
    torch.manual_seed(0)
    model = (
        AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)).double().eval()
    )
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 100.0, 1
    args = ppo.Args(model="m", max_new_tokens=12, temperature=0.7)
    prompts = [{"prompt": p} for p in ["b", "cde", "f", "ghi"] * 2]
    prompt_ids, prompt_mask = ppo.encode_prompts(tokenizer, prompts, 8, "cpu")
    torch.manual_seed(1)
    responses, logprobs = ppo.generate(model, prompt_ids, prompt_mask, args, tokenizer, [tokenizer.eos_token_id])

    torch.manual_seed(1)
    ids, mask, finished = prompt_ids, prompt_mask, torch.zeros(len(prompt_ids), dtype=torch.bool)
    for t in range(args.max_new_tokens):
        with torch.no_grad():
            logits = (
                model(input_ids=ids, attention_mask=mask, position_ids=ppo.positions_from_mask(mask)).logits[:, -1]
                / args.temperature
            )
        step = torch.log_softmax(logits, -1)
        tokens = ppo.draw(step.exp())
        assert torch.equal(responses[:, t], tokens.masked_fill(finished, tokenizer.pad_token_id)), t
        expected = step.gather(-1, tokens[:, None]).squeeze(-1).masked_fill(finished, 0.0)
        # fp64: the cached decode and the whole prefix differ in summation order only (~1e-15 here).
        torch.testing.assert_close(logprobs[:, t], expected, rtol=0, atol=1e-12)
        finished |= tokens == tokenizer.eos_token_id
        if finished.all():
            break
        ids, mask = torch.cat([ids, tokens[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    real = ppo.truncate_at_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[1]
    assert any(len(set(row[keep].tolist())) < int(keep.sum()) for row, keep in zip(responses, real)), (
        "no response repeats a token"
    )


def test_draw_samples_each_token_with_its_probability():
    """200,000 draws from 6 probabilities, 0 and 1e-3 among them: each token's count is within 5 standard deviations
    of its expectation (a chance of about 6e-7 to fail, for a fixed seed never), the zero never comes up, and a row
    that is one token draws it."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.199, 0.001, 0.1]]).expand(200_000, -1)
    torch.manual_seed(0)
    counts = torch.bincount(ppo.draw(probs), minlength=6).double()
    expected = probs[0].double() * len(probs)
    assert counts[1] == 0 and ((counts - expected).abs() <= 5 * (expected * (1 - probs[0])).sqrt()).all(), counts
    assert ppo.draw(torch.tensor([[0.0, 0.0, 1.0]])).tolist() == [2]


def test_top_k_and_top_p_keep_the_tokens_they_name():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    assert torch.isfinite(ppo.restrict(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(ppo.restrict(logits, 0, 0.75)).tolist() == [
        [True, True, False, False]
    ]  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(ppo.restrict(logits, 0, 0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(ppo.restrict(logits, 0, 0.1)).tolist() == [[True, False, False, False]]  # never empty
    assert torch.equal(ppo.restrict(logits, 0, 1.0), logits)


# --- Hydra and LoRA references ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_hydra_reference_equals_policy_at_init_and_only_the_top_trains(tmp_path, family):
    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(family, len(tokenizer), tokenizer.eos_token_id)
    config.num_hidden_layers = 4
    policy = AutoModelForCausalLM.from_config(config).double()
    reference = ppo.make_hydra(policy, num_layers_unfrozen=2)
    ids = torch.randint(0, len(tokenizer), (2, 9))
    assert torch.equal(policy(ids).logits, reference(ids).logits)
    shared = [p for p in reference.parameters() if any(p is q for q in policy.parameters())]
    assert 0 < len(shared) < len(list(reference.parameters()))  # bottom shared, top copied
    policy(ids).logits.sum().backward()
    layers = ppo.decoder_layers(policy)
    assert all(p.grad is None for layer in layers[:2] for p in layer.parameters())
    assert all(p.grad is not None for layer in layers[2:] for p in layer.parameters())
    assert policy.get_input_embeddings().weight.grad is None
    assert all(p.grad is None for p in reference.parameters())
    # Training the top moves the policy away from its reference.
    with torch.no_grad():
        for p in layers[3].parameters():
            p.add_(0.1)
    assert not torch.allclose(policy(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_reference_is_the_base_and_the_merged_save_is_the_adapted_model(tmp_path, family):
    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), tokenizer.eos_token_id)).double()
    policy = AutoModelForCausalLM.from_config(base.config).double()
    policy.load_state_dict(base.state_dict())
    adapters = ppo.add_lora(policy, rank=4, alpha=8, targets="all")
    ids = torch.randint(0, len(tokenizer), (2, 7))
    assert torch.equal(policy(ids).logits, base(ids).logits)  # B = 0: the adapted model starts as the base
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, _ in policy.named_parameters() if "lora_" in n
    }
    with torch.no_grad():
        for adapter in adapters:
            adapter.lora_B.normal_()  # as if trained
    adapted = policy(ids).logits
    assert not torch.allclose(adapted, base(ids).logits)
    with ppo.adapters_disabled(adapters):
        assert torch.equal(policy(ids).logits, base(ids).logits)
    ppo.merge_lora(policy).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    assert not any("lora" in name for name in merged.state_dict())
    # fp64: W x + s B (A x) and (W + s B A) x in other orders, ~1e-14 of logits of order 10 (SAME_MATH's argument).
    assert torch.allclose(merged(ids).logits, adapted, atol=1e-10)


# --- runs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({}, marks=pytest.mark.precision),
        {"num_layers_unfrozen": 1},
        {"lora_rank": 4},
        {"advantage": "grpo", "samples_per_prompt": 4},
        {"advantage": "rloo", "samples_per_prompt": 2},
        {"advantage": "reinforce++"},
        {"loss_aggregation": "sequence", "kl_estimator": "k3", "target_kl": 1.0, "scale_rewards": True},
        pytest.param({"dtype": "bf16"}, marks=pytest.mark.precision),
        {"top_k": 3, "top_p": 0.9},
    ],
)
def test_variants_run_and_the_first_minibatch_ratio_is_exactly_one(tmp_path, walk_policy, variant):
    """Each variant trains, its first minibatch's ratio is exactly 1, and the sampler's log-probs
    are the trainer's up to rounding: the decode loop on the KV cache sums in another order than
    the full forward (LOGPROB_GAP, see conftest). Under --top-k/--top-p the sampler draws from the
    kept tokens only, and the gap shows it."""
    args = quick_args(tmp_path, walk_policy, **variant)
    ppo.main(args)
    metrics = last_update(args.output_dir)
    assert metrics["last_update"]["policy/first_minibatch_max_log_ratio"] == 0.0
    gap = metrics["last_update"]["policy/sampler_logprob_gap"]
    rounding = LOGPROB_GAP[torch.bfloat16 if variant.get("dtype") == "bf16" else torch.float32]
    assert gap > 1e-2 if "top_k" in variant else gap < rounding
    assert {"eval/optimality_greedy", "eval/optimality_sampled", "eval/kl"} <= set(metrics)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    assert not any("lora" in name for name in reloaded.state_dict())
    assert os.path.exists(os.path.join(args.output_dir, "value_head.pt")) == (args.advantage == "gae")


def test_sampler_old_logprobs_skip_the_policy_pass_and_train_as_the_trainer_ones(
    tmp_path, walk_policy, text_reward, monkeypatch
):
    """--old-logprobs sampler with a separate critic: the rollout runs no policy forward (nothing needs its hidden
    states), and in fp64 the run is the default one to SAME_MATH, since the sampler's log-probs are the trainer's
    but for a cached decode's summation order (~1e-15): only the first minibatch's ratio shows it. Refused with
    --top-k, whose sampler draws from another distribution."""
    trunk_states, calls = ppo.trunk_states, collections.Counter()

    def counted(model, micro_batch):
        calls[type(model).__name__, torch.is_grad_enabled()] += 1
        return trunk_states(model, micro_batch)

    monkeypatch.setattr(ppo, "trunk_states", counted)
    runs = {}
    for mode in ("trainer", "sampler"):
        calls.clear()
        options = dict(old_logprobs=mode, value_model=walk_policy, reward_fn=text_reward, learning_rate=1e-3)
        args = quick_args(tmp_path / mode, walk_policy, dtype="fp64", **options)
        ppo.main(args)
        runs[mode] = metrics_and_weights(args.output_dir), dict(calls)
    (expected, expected_weights), trainer_calls = runs["trainer"]
    (actual, actual_weights), sampler_calls = runs["sampler"]
    rollout_micro_batches = 2 * 8 // 2  # updates x batch / micro-batch
    assert trainer_calls[("GPT2LMHeadModel", False)] == 2 * rollout_micro_batches  # the policy's and the reference's
    assert {**trainer_calls, ("GPT2LMHeadModel", False): rollout_micro_batches} == sampler_calls
    # The cached decode and the full forward differ by their summation order only, which a CPU may also round alike.
    assert actual["policy/first_minibatch_max_log_ratio"] < 1e-12 and actual["policy/sampler_logprob_gap"] == 0
    assert expected["policy/first_minibatch_max_log_ratio"] == 0
    expected.pop("policy/sampler_logprob_gap"), actual.pop("policy/sampler_logprob_gap")
    expected.pop("policy/first_minibatch_max_log_ratio"), actual.pop("policy/first_minibatch_max_log_ratio")
    assert actual == pytest.approx(expected, rel=SAME_MATH, abs=SAME_MATH)
    assert max((expected_weights[k] - actual_weights[k]).abs().max().item() for k in expected_weights) < SAME_MATH
    start = AutoModelForCausalLM.from_pretrained(walk_policy).state_dict()
    assert max((start[k].double() - actual_weights[k]).abs().max().item() for k in start if k in actual_weights) > 1e-3
    expect_error(quick_args(tmp_path, walk_policy, old_logprobs="sampler", top_k=3), "drop --top-k/p")


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_importance_sampling_corrections_run_and_log_the_ratio(tmp_path, walk_policy, correction):
    """Two updates under each correction, sampling with --top-k 3: the sampler draws from the kept
    tokens' renormalised distribution, which gives each drawn token at least the trainer's
    probability, so rho <= 1 up to rounding (fp32, LOGPROB_GAP), nothing is capped, and the mean is
    below 1. The first minibatch's PPO ratio stays exactly 1: the weights touch the loss, not it."""
    args = quick_args(tmp_path, walk_policy, is_correction=correction, top_k=3)
    ppo.main(args)
    metrics = last_update(args.output_dir)["last_update"]
    assert metrics["is/ratio_max"] <= math.exp(LOGPROB_GAP[torch.float32])
    assert metrics["is/capped_fraction"] == 0.0 and 0 < metrics["is/ratio_mean"] < 1
    assert metrics["policy/first_minibatch_max_log_ratio"] == 0.0


def test_attention_dropout_is_off_too_so_the_first_minibatch_ratio_is_exactly_one(tmp_path):
    """Llama's attention applies config.attention_dropout as a rate it copied at init, not through an
    nn.Dropout module: at 0.3 the training forward drew masks the rollout's did not, and the first
    minibatch's ratio was not 1. The policy and a separate critic are built from a config without it."""
    policy = save_tiny_model(tmp_path / "policy", "llama", tokenizer=sft.randomwalks_tokenizer(), attention_dropout=0.3)
    args = quick_args(tmp_path, policy, num_updates=1, value_model=policy)
    ppo.main(args)
    assert last_update(args.output_dir)["last_update"]["policy/first_minibatch_max_log_ratio"] == 0.0


@pytest.mark.parametrize(
    "family, config",
    [
        ("GPT2", dict(n_embd=32, n_layer=2, n_head=4, summary_first_dropout=0.3)),  # attn_, resid_, embd_pdrop 0.1
        ("GPTNeoX", dict(attention_dropout=0.3, hidden_dropout=0.3)),
        ("OPT", dict(ffn_dim=64, word_embed_proj_dim=32, dropout=0.3, attention_dropout=0.3, layerdrop=0.3)),
        ("Phi", dict(resid_pdrop=0.3, embd_pdrop=0.3, attention_dropout=0.3)),
        ("Mixtral", dict(num_local_experts=2, num_experts_per_tok=1, num_key_value_heads=4, router_jitter_noise=0.3)),
        ("Llava", dict(text_config=dict(model_type="llama", attention_dropout=0.3))),  # nested, not built here
    ],
)
def test_without_dropout_leaves_no_random_number_in_training(family, config):
    """Every family names its dropout its own way (attention_dropout, attn_pdrop, layerdrop, an MoE
    router's jitter noise), some in nested configs; the model built from the cleaned config computes
    in training mode bitwise what it computes in evaluation mode. dpo.py and reward_model.py keep
    copies of the function, which must agree."""
    import transformers

    import dpo
    import reward_model

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    settings = {**({} if family in ("GPT2", "Llava") else sizes), **config}
    original = getattr(transformers, f"{family}Config")(**settings)
    cleaned = ppo.without_dropout(original)
    assert all(m.without_dropout(original).to_dict() == cleaned.to_dict() for m in (dpo, reward_model))
    if family == "Llava":
        assert original.text_config.attention_dropout == 0.3 and cleaned.text_config.attention_dropout == 0.0
        return
    ids = torch.randint(0, 50, (2, 7))
    for built, same in ((original, False), (cleaned, True)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(built)
        training = model.train()(ids).logits
        assert torch.equal(training, model.eval()(ids).logits) == same, built


def test_dr_grpo_and_dapo_flags_run_together_and_an_update_of_equal_groups_takes_no_step(tmp_path, walk_policy):
    """The new flags in one run: Dr. GRPO (no std, constant normaliser) with DAPO's clip-higher and
    dropped groups. The reward is 1 for start letters from k on (every such group equal) and the
    response length before k: the logged dropped fraction is the share of equal groups among the
    scores the reward function returned, and the micro-batches (of 2) whose responses were all
    dropped stay out of the statistics (counted as zeros, they pulled the mean ratio to 0.87).
    Then a run whose second update scores every response alike: every group is dropped, and that
    update takes no step (Adam's momentum from the first would move the weights), makes no NaN and
    logs no loss statistic."""
    from safetensors.torch import load_file

    record = tmp_path / "scores.jsonl"
    body = (
        "scores = [float(len(r)) if p < 'k' else 1.0 for p, r in zip(prompts, responses)]\n"
        f"    open({str(record)!r}, 'a').write(__import__('json').dumps(scores) + '\\n')\n"
        "    return scores"
    )
    flags = dict(advantage="grpo", samples_per_prompt=4, grpo_scale_by_std=False, loss_aggregation="constant")
    flags.update(cliprange_high=0.28, drop_equal_groups=True, batch_size=16, mini_batch_size=8)
    args = quick_args(tmp_path, walk_policy, reward_fn=write_reward_fn(tmp_path, body), num_updates=1, **flags)
    ppo.main(args)
    metrics = last_update(args.output_dir)["last_update"]
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    scores = torch.tensor([b for b in batches if len(b) == 16][-1]).view(-1, 4)  # the last update's, not the eval's
    equal = (scores == scores[:, :1]).all(-1).double().mean().item()
    assert 0 < equal < 1, scores  # some groups kept, some dropped, as the letters of this seed fall
    assert metrics["objective/dropped_group_fraction"] == equal
    assert abs(metrics["policy/ratio_mean"] - 1) < 0.02 and 0 <= metrics["policy/clip_fraction"] <= 1
    assert metrics["policy/first_minibatch_max_log_ratio"] == 0.0 and all(map(math.isfinite, metrics.values()))

    second_equal = "calls.append(1)\n    return [float(len(r)) if len(calls) == 1 else 0.5 for r in responses]"
    (tmp_path / "second.py").write_text(f"calls = []\n\n\ndef reward(prompts, responses):\n    {second_equal}\n")
    args = quick_args(
        tmp_path, walk_policy, reward_fn=f"{tmp_path / 'second.py'}:reward", output_dir=str(tmp_path / "equal"), **flags
    )
    ppo.main(replace(args, save_every=1))
    metrics = last_update(args.output_dir)["last_update"]
    assert metrics["objective/dropped_group_fraction"] == 1.0
    assert {k for k in metrics if k.startswith("policy/")} == {
        "policy/first_minibatch_max_log_ratio",
        "policy/sampler_logprob_gap",
    }
    start, end = (load_file(os.path.join(d, "model.safetensors")) for d in (walk_policy, args.output_dir))
    first = dict(parallel.stored_tensors(os.path.join(args.output_dir, "checkpoints", "step_00000001"), "policy"))
    assert not all(torch.equal(start[k], first[k]) for k in start)  # the first update trained
    assert all(torch.equal(first[k], end[k]) for k in end)


def test_reward_model_with_another_tokenizer_and_critic_from_it(tmp_path, walk_policy, text_reward_model, capsys):
    args = quick_args(
        tmp_path, walk_policy, reward_model=text_reward_model, value_model=text_reward_model, eval_every=2
    )
    ppo.main(args)
    assert "the reward model's tokenizer differs from the policy's" in capsys.readouterr().out
    metrics = last_update(args.output_dir)
    assert (
        0.0 <= metrics["eval/win_rate"] <= 1.0 and "eval/optimality_sampled" in metrics
    )  # true metric measured at eval


def write_reward_fn(tmp_path, body):
    path = tmp_path / "my_reward.py"
    path.write_text(f"def reward(prompts, responses):\n    {body}\n")
    return f"{path}:reward"


def test_missing_eos_penalty(tmp_path, walk_policy):
    # Two new tokens never fit a walk and its EOS for a fresh model... unless EOS comes first; the
    # constant reward makes the mean score 1 - penalty * (fraction without EOS).
    args = quick_args(
        tmp_path,
        walk_policy,
        task="randomwalks",
        reward_fn=write_reward_fn(tmp_path, "return [1.0] * len(responses)"),
        missing_eos_penalty=0.25,
        max_new_tokens=2,
        num_updates=1,
    )
    ppo.main(args)
    metrics = last_update(args.output_dir)["last_update"]
    # Exact in fp32: scores 1 or 0.75, summed over 8 rows and divided by 8.
    assert metrics["objective/score"] == pytest.approx(1.0 - 0.25 * (1 - metrics["objective/eos_fraction"]), abs=1e-6)
    assert metrics["objective/eos_fraction"] < 1.0


def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as error:
        ppo.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_reward_functions(tmp_path, walk_policy):
    expect_error(
        quick_args(tmp_path, walk_policy, reward_fn=write_reward_fn(tmp_path, "return [1.0]")),
        "returned 1 scores for 8 responses",
    )
    expect_error(
        quick_args(
            tmp_path, walk_policy, reward_fn=write_reward_fn(tmp_path, "return [float('nan')] * len(responses)")
        ),
        "non-finite",
    )
    expect_error(
        quick_args(tmp_path, walk_policy, reward_fn=write_reward_fn(tmp_path, "return ['good'] * len(responses)")),
        "list of numbers",
    )
    expect_error(
        quick_args(tmp_path, walk_policy, reward_fn=str(tmp_path / "absent.py") + ":reward"), "could not be loaded"
    )
    (tmp_path / "not_a_function.py").write_text("reward = 'good'\n")  # was a TypeError traceback at the first call
    reward_fn = str(tmp_path / "not_a_function.py") + ":reward"
    expect_error(quick_args(tmp_path, walk_policy, reward_fn=reward_fn), "is a str, not a function")


def test_a_causal_lm_is_not_a_reward_model(tmp_path, walk_policy):
    """A causal LM given as --reward-model loads with a score head transformers makes up at random
    (it says so in a load report); with num_labels=1 in its config PPO trained against random rewards
    and exited 0."""
    causal_lm = save_tiny_model(tmp_path / "lm", "llama", tokenizer=sft.randomwalks_tokenizer(), num_labels=1)
    expect_error(quick_args(tmp_path, walk_policy, reward_model=causal_lm), "has no trained score head")
    assert not os.path.exists(tmp_path / "run")


def test_an_error_under_the_progress_bar_starts_a_line_of_its_own(tmp_path, walk_policy):
    """A reward function that fails at the first update, while the bar is open: the bar ends its line
    first (the error was glued to it: `ppo:   0%|...| 0/1 [00:00<?, ?it/s]error: ...`)."""
    flags = ["--model", walk_policy, "--reward-fn", write_reward_fn(tmp_path, "return [1.0]"), "--num-updates", "1"]
    flags += ["--batch-size", "8", "--mini-batch-size", "4", "--eval-samples-per-start", "1"]
    run = run_script("ppo.py", *flags, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 1
    lines = run.stderr.split("\n")  # only a newline ends a line in a log: a bar redraws itself after a \r
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --reward-fn"), run.stderr[-2000:]
    assert "ppo:" in run.stderr and "Traceback" not in run.stderr


def test_bad_flags(tmp_path, walk_policy):
    def refused(fragment, **flags):
        expect_error(quick_args(tmp_path, walk_policy, **flags), fragment)

    refused("--batch-size 8 does not split into minibatches of --mini-batch-size 3", mini_batch_size=3)
    refused(
        "--micro-batch-size 3 does not divide a rank's share of a minibatch (--mini-batch-size 4 / 1 rank(s) = 4)",
        micro_batch_size=3,
    )
    refused("--batch-size 6 is not a whole number of prompts", batch_size=6, mini_batch_size=2, samples_per_prompt=4)
    refused("--generation-batch-size 0 must be at least 1", generation_batch_size=0)
    refused("--temperature 0.0 must be a positive number", temperature=0.0)
    refused("--top-p 1.5 must lie in (0, 1]", top_p=1.5)
    refused("--num-layers-unfrozen 0 must be -1", num_layers_unfrozen=0)
    refused("cannot move it from --init-kl-coef 0", target_kl=1.0, init_kl_coef=0.0)
    refused("which --advantage reinforce++ does not use", advantage="reinforce++", value_model=walk_policy)
    refused("--task jsonl needs --data", task="jsonl", reward_fn="m:f")
    refused("is for the text tasks; randomwalks builds its own prompts", data=str(tmp_path / "x.jsonl"))
    refused("pass one of --reward-model and --reward-fn", reward_model="rm", reward_fn="m:f")
    refused("--reward-device cpu places the reward model, but no --reward-model", reward_device="cpu")
    refused("--samples-per-prompt 2", advantage="rloo")
    refused("--advantage rloo has no std", advantage="rloo", samples_per_prompt=2, grpo_scale_by_std=False)
    refused(
        "--drop-equal-groups drops groups of responses to one prompt, which --advantage gae", drop_equal_groups=True
    )
    refused("--cliprange-high -1.0 must be a positive number, or unset", cliprange_high=-1.0)
    refused("--is-cap 0.5 must be a number of at least 1", is_correction="tis", is_cap=0.5)
    refused("--operands 1 must be at least 2", task="arithmetic", operands=1)
    refused("--digits 0 must be at least 1", task="arithmetic", digits=0)
    refused("--operations +/ must be some of the operators + - *", task="arithmetic", operations="+/")
    refused("--format-reward -0.1 must be 0 or a positive number", task="arithmetic", format_reward=-0.1)
    refused("is for the text tasks; arithmetic builds its own prompts", task="arithmetic", data=str(tmp_path / "x"))
    refused("pick one", lora_rank=4, num_layers_unfrozen=1)
    refused("between 1 and", num_layers_unfrozen=7)
    refused("matched no linear layer", lora_rank=4, lora_target_modules="nothing_here")
    expect_error(quick_args(tmp_path, None), "--model is required")
    refused("no built-in reward", task="jsonl", data=str(tmp_path / "x.jsonl"))
    refused("no such directory", reward_model=str(tmp_path / "no-rm"))
    refused("--value-model", value_model=str(tmp_path / "no-critic"))  # was an OSError traceback
    refused("launch with torchrun", tp=2)
    assert not os.path.exists(tmp_path / "run"), "nothing is written"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    refused(f"--output-dir {tmp_path / 'run'} already holds a run")


def test_a_single_prompt_leaves_nothing_to_train_on(tmp_path, tiny_gpt2):
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "hello"}\n{"prompt": "hello"}\n')  # one prompt, after duplicates are dropped
    reward = write_reward_fn(tmp_path, "return [0.0] * len(responses)")
    args = quick_args(tmp_path, tiny_gpt2, task="jsonl", data=str(data), reward_fn=reward)
    expect_error(args, "holds 1 distinct prompt, held out for evaluation, and none is left to train on")
    assert not os.path.exists(args.output_dir)


def test_a_non_finite_loss_stops_the_run_before_the_step(tmp_path, walk_policy):
    """Scores near fp32's largest number make the value loss overflow: the run stops at the first
    minibatch with one line rather than stepping to NaN weights."""
    args = quick_args(tmp_path, walk_policy, reward_fn=write_reward_fn(tmp_path, "return [3e38] * len(responses)"))
    expect_error(args, "at update 1 (PPO epoch 1, minibatch 1)", "the loss is")
    assert not os.path.exists(os.path.join(args.output_dir, "config.json"))


def test_layouts_that_are_refused(tmp_path, walk_policy, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; each is refused before any process group is made
    expect_error(quick_args(tmp_path, walk_policy, tp=2, lora_rank=4), "--lora-rank is not supported with --tp")
    expect_error(
        quick_args(tmp_path, walk_policy, pp=2, value_model=walk_policy),
        "--value-model (a separate critic) is not supported",
    )
    expect_error(quick_args(tmp_path, walk_policy, pp=2, zero_stage=3), "does not compose")


def test_resume_after_kill_is_bitwise_exact_and_falls_back_from_a_damaged_checkpoint(tmp_path, ppo_walk_run):
    """A run killed once its checkpoints of updates 2 and 4 (of 6) exist resumes from update 4 and
    ends bitwise where the uninterrupted run does. With a file of the newest checkpoint cut short,
    --resume names it, resumes from update 2 and still ends bitwise equal; a changed byte or a
    deleted file is found the same way, and with no intact checkpoint left it stops with one line.
    The uninterrupted run is shared with test_checkpoints' stop tests."""
    flags, reference = ppo_walk_run
    reference, killed = run_and_kill("ppo.py", flags, tmp_path, "step_00000004", reference=reference)
    for how in ("truncate", "corrupt", "delete"):
        shutil.copytree(killed, tmp_path / how)
    newest, older = "checkpoints/step_00000004", "checkpoints/step_00000002"
    damage(tmp_path / "truncate" / newest / "trainer_state.pt", "truncate")
    skipped = f"warning: checkpoint {tmp_path / 'truncate' / newest} is damaged (trainer_state.pt is not the file"
    for run_dir, update in ((killed, 4), (tmp_path / "truncate", 2)):
        resumed = run_script("ppo.py", *flags, "--resume", str(run_dir), cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resuming {run_dir} from step {update}" in resumed.stdout
        assert (skipped in resumed.stdout) == (update == 2) and resumed.stdout.count("is damaged") == (update == 2)
        assert_same_weights(reference, run_dir)
        expected, actual = (torch.load(run / "value_head.pt")["value_head"] for run in (reference, run_dir))
        assert all(torch.equal(expected[k], actual[k]) for k in expected)
    for how, victim, what in (
        ("corrupt", "rank_0.pt", "is not the file"),
        ("delete", "manifest.json", "is missing or unreadable"),
    ):
        run_dir = tmp_path / how
        damage(run_dir / newest / victim, how)
        with pytest.raises(SystemExit, match=rf"the checkpoint is damaged \({victim} {what}"):
            parallel.find_checkpoint(str(run_dir / newest))
        assert parallel.find_checkpoint(str(run_dir), verbose=False) == str(run_dir / older)
    damage(run_dir / older / "trainer_state.pt", "delete")
    with pytest.raises(SystemExit, match="every checkpoint in .* is damaged"):
        parallel.find_checkpoint(str(run_dir))


def test_smoke_run_with_wandb_offline(tmp_path, walk_policy):
    result = run_script(
        "ppo.py",
        "--model",
        walk_policy,
        "--num-updates",
        "2",
        "--batch-size",
        "8",
        "--mini-batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--eval-every",
        "1",
        "--eval-samples-per-start",
        "1",
        "--track",
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "update 1: score_greedy" in result.stdout
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "run" / "wandb"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").config.model_type == "gpt2"


def test_text_task_with_a_reward_function(tmp_path, tiny_gpt2):
    prompts = ppo.load_prompts("hh", os.path.join(FIXTURES, "hh-rlhf-train.jsonl"))
    assert prompts[0] == {"prompt": "\n\nHuman: What is a good way to learn to cook?\n\nAssistant:"}
    compressed = tmp_path / "train.jsonl.gz"  # the hub's format
    compressed.write_bytes(gzip.compress(open(os.path.join(FIXTURES, "hh-rlhf-train.jsonl"), "rb").read()))
    assert ppo.load_prompts("hh", str(compressed)) == prompts
    args = quick_args(
        tmp_path,
        tiny_gpt2,
        task="hh",
        data=os.path.join(FIXTURES, "hh-rlhf-train.jsonl"),
        max_new_tokens=4,
        eval_prompts=1,
        reward_fn=write_reward_fn(tmp_path, "return [float(len(r)) / 10 for r in responses]"),
        lora_rank=2,
    )
    ppo.main(args)
    metrics = last_update(args.output_dir)
    assert metrics["last_update"]["policy/first_minibatch_max_log_ratio"] == 0.0 and "eval/score_sampled" in metrics


def test_sentiment_task_prompts_and_reward(tmp_path, tiny_gpt2):
    prompts = ppo.load_prompts("sentiment", None)  # the shipped openings of movie reviews
    prompts = [p["prompt"] for p in prompts]
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts) and all(2 <= len(p.split()) <= 8 for p in prompts)
    args = quick_args(tmp_path, tiny_gpt2, task="sentiment", max_new_tokens=4, eval_prompts=2)
    if importlib.util.find_spec("vaderSentiment") is None:  # an optional extra: without it, one clear line
        expect_error(args, "pip install vaderSentiment")
        assert not os.path.exists(args.output_dir)
        return
    assert ppo.sentiment_scores(["a wonderful, moving film", "dull and awful", "the"]).tolist() == pytest.approx(
        [0.8, -0.7, 0.0], abs=0.25
    )
    ppo.main(args)
    assert -1 <= last_update(args.output_dir)["eval/score_sampled"] <= 1


def test_sentiment_task_reports_vader_beside_another_reward(tmp_path, tiny_gpt2, fake_vader):
    args = quick_args(tmp_path, tiny_gpt2, task="sentiment", max_new_tokens=4, eval_prompts=4)
    ppo.main(args)
    metrics = last_update(args.output_dir)
    assert metrics["eval/score_sampled"] == pytest.approx(metrics["eval/vader_sampled"])  # VADER is the reward
    reward = write_reward_fn(tmp_path, "return [-float(len(r)) for r in responses]")
    args = quick_args(
        tmp_path,
        tiny_gpt2,
        task="sentiment",
        max_new_tokens=4,
        eval_prompts=4,
        reward_fn=reward,
        output_dir=str(tmp_path / "with_fn"),
    )
    ppo.main(args)
    metrics = last_update(args.output_dir)
    assert (
        metrics["eval/score_greedy"] <= 0
        and -1 <= metrics["eval/vader_greedy"] <= 1
        and metrics["eval/score_greedy"] != metrics["eval/vader_greedy"]
    )


# --- data parallel ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_reward(tmp_path_factory):
    """A reward of the response's text, so advantages are not zero."""
    return write_reward_fn(
        tmp_path_factory.mktemp("reward"), "return [len(set(r)) / 4 - r.count('a') for r in responses]"
    )


def data_parallel_flags(policy, reward, *variant):
    """A short run that learns something (a learning rate that moves the weights well beyond float
    noise): 2 generation chunks, and per rank one micro-batch of each minibatch. In fp64, so that
    layouts that compute the same math agree to SAME_MATH. An evaluation after each of the 2 updates,
    so that the second trains after one (whose gathered models and forked RNG must leave training as
    it was); one sampled walk a start node, as evaluations are most of a run's time."""
    return [
        "--model",
        policy,
        "--reward-fn",
        reward,
        "--dtype",
        "fp64",
        "--num-updates",
        "2",
        "--batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--generation-batch-size",
        "4",
        "--ppo-epochs",
        "2",
        "--learning-rate",
        "1e-3",
        "--eval-every",
        "1",
        "--eval-samples-per-start",
        "1",
        *variant,
    ]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of some flags, run once for the module: several layouts compare to it."""
    runs = {}

    def run(flags: list):
        if tuple(flags) not in runs:
            output_dir = tmp_path_factory.mktemp("one")
            ppo.main(tyro.cli(ppo.Args, args=flags + ["--output-dir", str(output_dir)]))
            runs[tuple(flags)] = output_dir
        return runs[tuple(flags)]

    return run


def metrics_and_weights(run_dir):
    from safetensors.torch import load_file

    metrics = last_update(run_dir)
    numbers = {**{k: v for k, v in metrics.items() if k != "last_update"}, **metrics["last_update"]}
    weights = load_file(os.path.join(run_dir, "model.safetensors"))
    value_path = os.path.join(run_dir, "value_head.pt")
    if os.path.exists(value_path):
        weights.update({f"{name}.{k}": v for name, state in torch.load(value_path).items() for k, v in state.items()})
    return {k: v for k, v in numbers.items() if not k.startswith("time/")}, weights


def assert_runs_agree(one, two, policy):
    """The other layout gives the 1-process numbers and weights up to the order of fp64 sums (the
    gradient and the clipping norm of shards are summed in another order, and the processes may
    use other thread counts): SAME_MATH, see conftest. And it trained: the agreement is not trivial."""
    from safetensors.torch import load_file

    (expected, expected_weights), (actual, actual_weights) = metrics_and_weights(one), metrics_and_weights(two)
    assert actual.keys() == expected.keys() and "eval/score_sampled" in actual
    assert actual == pytest.approx(expected, rel=SAME_MATH, abs=SAME_MATH)
    assert actual["policy/first_minibatch_max_log_ratio"] == 0.0
    assert (
        actual["policy/sampler_logprob_gap"] < 1e-12
    )  # fp64: the cached decode and the full forward agree to rounding
    assert expected_weights.keys() == actual_weights.keys()
    assert all(w.dtype == torch.float64 for w in actual_weights.values())
    assert max((expected_weights[k] - actual_weights[k]).abs().max().item() for k in expected_weights) < SAME_MATH
    start = load_file(os.path.join(policy, "model.safetensors"))
    assert max((start[k] - actual_weights[k]).abs().max().item() for k in start) > 1e-3


def assert_resumed_bitwise(reference, resumed):
    (expected, expected_weights), (actual, actual_weights) = (
        metrics_and_weights(reference),
        metrics_and_weights(resumed),
    )
    assert expected.keys() == actual.keys() and all(expected[k] == actual[k] for k in expected)
    assert all(torch.equal(expected_weights[k], actual_weights[k]) for k in expected_weights)


# The stage-0 variant is the flags of the resume test below, which compares ZeRO-3 without Hydra
# (a sharded reference copy) to the same one-process run.
SCALED_REWARDS = ["--scale-rewards", "--target-kl", "1"]
HYDRA = ["--num-layers-unfrozen", "1"]
GRPO = ["--advantage", "grpo", "--samples-per-prompt", "2"]


@pytest.mark.parametrize("stage, variant", [(0, SCALED_REWARDS), (1, ["--lora-rank", "4"]), (2, GRPO), (3, HYDRA)])
def test_two_ranks_equal_one_process(tmp_path, walk_policy, text_reward, one_process, stage, variant):
    flags = data_parallel_flags(walk_policy, text_reward, *variant)
    result = run_ranks(
        "ppo.py", *flags, "--zero-stage", str(stage), "--output-dir", str(tmp_path / "two"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1  # rank 0 alone reports
    assert_runs_agree(one_process(flags), tmp_path / "two", walk_policy)


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--tp", "2", "--sequence-parallel"]], ids=["cp2", "sp-tp2"])
def test_sequence_splits_equal_one_process(tmp_path, walk_policy, text_reward, one_process, layout):
    """Every sequence split over 2 context-parallel ranks (which share the sampling as data-parallel
    ranks would), or over the 2 tensor-parallel ranks between their matmuls: one process's run. Both
    with the critic and the flags of the stage-0 test, whose one-process run they share (one of their
    own cost as much as the split run; reward scaling and the adaptive KL only add steps to the path
    of unscaled rewards and a fixed KL, which the other layouts run)."""
    flags = data_parallel_flags(walk_policy, text_reward, *SCALED_REWARDS)
    result = run_ranks("ppo.py", *flags, *layout, "--output-dir", str(tmp_path / "two"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1  # rank 0 alone reports
    assert_runs_agree(one_process(flags), tmp_path / "two", walk_policy)


def test_two_rank_resume_after_kill_is_bitwise_exact(tmp_path, walk_policy, text_reward, one_process):
    """ZeRO-3 on 2 ranks equals one process, and killed after the checkpoint of update 1 (each
    rank's RNG states in its own file, the optimizer's moments streamed dense, all listed in the
    manifest) it resumes bitwise."""
    flags = data_parallel_flags(walk_policy, text_reward, *SCALED_REWARDS)
    one = one_process(flags)
    flags += ["--save-every", "1", "--zero-stage", "3"]
    reference, killed = torchrun_kill_and_resume("ppo.py", flags, tmp_path, "step_00000001")
    assert_runs_agree(one, reference, walk_policy)
    checkpoint = killed / "checkpoints" / "step_00000001"
    names = sorted(os.listdir(checkpoint))  # each rank's own file, and the weights and moments streamed to rank 0
    assert names == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "optimizer.safetensors",
        "policy.safetensors",
        "rank_0.pt",
        "rank_1.pt",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.pt",
        "value.safetensors",
    ]
    with open(checkpoint / "manifest.json") as file:
        assert sorted(json.load(file)) == [name for name in names if name != "manifest.json"]
    assert_resumed_bitwise(reference, killed)
    # Another global batch is refused with one line.
    expect_error(
        tyro.cli(ppo.Args, args=flags + ["--batch-size", "4", "--resume", str(killed)]),
        "written with --batch-size 8, which a resumed run cannot change",
    )


# --- tensor and pipeline parallel ---------------------------------------------------------------
def test_tensor_parallel_hydra_equals_one_process(tmp_path, walk_policy, text_reward, one_process):
    """--tp 2: the policy split over two ranks, its Hydra reference sharing the frozen shards, log-probs
    over the vocabulary shards of the tied head, the value head whole on both ranks."""
    flags = data_parallel_flags(walk_policy, text_reward, *HYDRA)
    result = run_ranks("ppo.py", *flags, "--tp", "2", "--output-dir", str(tmp_path / "two"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_runs_agree(one_process(flags), tmp_path / "two", walk_policy)


def test_pipeline_parallel_hydra_equals_one_process_and_resumes_exactly(
    tmp_path, walk_policy, text_reward, one_process
):
    """--pp 2 with Hydra: the first stage holds only frozen layers (nothing to train), the last the
    trained top and the value head; rollouts are generated by a copy gathered from the stages.
    Killed after a checkpoint (the models and the optimizer's moments streamed dense) and resumed, the
    run ends bitwise where the uninterrupted one does, which equals one process; one process resumes
    it too (the frozen first stage had taken no step: the step count is the last stage's)."""
    flags = data_parallel_flags(walk_policy, text_reward, *HYDRA)
    one = one_process(flags)
    flags += ["--save-every", "1", "--pp", "2"]
    reference, killed = torchrun_kill_and_resume("ppo.py", flags, tmp_path, "step_00000001")
    assert_runs_agree(one, reference, walk_policy)
    assert_resumed_bitwise(reference, killed)
    resumed = run_script("ppo.py", *flags[:-2], "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "with --zero-stage 0 --tp 1 --pp 2 --cp 1: its optimizer state is resharded" in resumed.stdout


def test_tensor_times_pipeline_parallel_equals_one_process(tmp_path, text_reward, one_process):
    """4 ranks as 2 tensor-parallel x 2 pipeline ranks, on Llama (GQA, untied head) with a full
    reference copy and critic-free GRPO advantages."""
    policy = save_tiny_model(tmp_path / "llama", "llama", tokenizer=sft.randomwalks_tokenizer())
    flags = data_parallel_flags(policy, text_reward, *GRPO)
    result = run_ranks(
        "ppo.py", *flags, "--tp", "2", "--pp", "2", "--output-dir", str(tmp_path / "four"), nproc=4, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_runs_agree(one_process(flags), tmp_path / "four", policy)


# --- conversational data and chat models (issue 25) ---------------------------------------------
class ScriptedModel(torch.nn.Module):
    """A causal LM whose greedy choice at step t of row r is script[r][t]: the logits the decode loop sees."""

    def __init__(self, script: list, vocab_size: int):
        super().__init__()
        self.script, self.vocab_size, self.step = script, vocab_size, 0

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(len(self.script), 1, self.vocab_size, dtype=torch.float64)
        for row, tokens in enumerate(self.script):
            logits[row, 0, tokens[min(self.step, len(tokens) - 1)]] = 50.0
        self.step += 1
        return types.SimpleNamespace(logits=logits, cache=None)


def test_generation_stops_on_every_end_of_turn_id_and_a_cut_response_has_none():
    """The tiny chat tokenizer's EOS is <|endoftext|> and its turns end with <|im_end|>; the generation
    config lists both. A row stops at whichever it draws first and keeps it; a row that draws neither
    within --max-new-tokens is cut there, with no end token (the old loop stopped on the EOS alone)."""
    tokenizer = chat_tokenizer("chatml")
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN["chatml"])
    end_ids = ppo.end_of_turn_ids(tokenizer, GenerationConfig(eos_token_id=[eos, im_end]))
    assert end_ids == sorted({eos, im_end}) and ppo.end_of_turn_ids(tokenizer) == end_ids  # found in the template
    llama3 = chat_tokenizer("llama3")
    assert ppo.end_of_turn_ids(llama3) == sorted({llama3.eos_token_id, llama3.convert_tokens_to_ids("<|eot_id|>")})
    assert ppo.end_of_turn_ids(text_tokenizer(), GenerationConfig(eos_token_id=7)) == sorted({0, 7})
    script = [[5, im_end, 6, 7], [5, 6, eos, 8], [5, 6, 7, 8, 9, 10]]
    model = ScriptedModel(script, len(tokenizer))
    prompt_ids, prompt_mask = torch.tensor([[1, 2]] * 3), torch.ones(3, 2, dtype=torch.long)
    args = ppo.Args(model="m", max_new_tokens=4)
    generated, _ = ppo.generate(model, prompt_ids, prompt_mask, args, tokenizer, end_ids, greedy=True)
    responses, mask, has_end = ppo.truncate_at_eos(generated, end_ids, tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    assert responses.tolist() == [[5, im_end, pad, pad], [5, 6, eos, pad], [5, 6, 7, 8]]
    assert mask.sum(-1).tolist() == [2, 3, 4] and has_end.tolist() == [True, True, False]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_prompts_are_rendered_as_apply_chat_template_with_the_generation_prompt(style):
    tokenizer = chat_tokenizer(style)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on the mat"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    for record in ({"prompt": messages}, {"prompt": messages, "tools": tools}):
        expected = tokenizer.apply_chat_template(
            messages, tools=record.get("tools"), add_generation_prompt=True, tokenize=True
        )["input_ids"]
        assert ppo.prompt_tokens(tokenizer, record, 1000) == expected
    assert ppo.prompt_tokens(tokenizer, {"prompt": "the cat"}, 1000) == tokenizer("the cat")["input_ids"]


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    """A tiny ChatML model whose <|im_end|> is likely enough that some responses end with it (not all):
    its generation config lists the EOS and <|im_end|>."""
    path = save_tiny_chat_model(tmp_path_factory.mktemp("chat"), "chatml")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = chat_tokenizer("chatml")
    with torch.no_grad():
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] *= 30
    model.save_pretrained(path)
    return path


CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": f"what does the {word} say"}], "answer": word}
    for word in ("cat", "dog", "friend", "park", "world", "post", "title", "mat")
]
CHECKING_REWARD = """
def reward(prompts, completions, answer, **columns):
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts
    assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)
    assert len(answer) == len(prompts) and all(a in p[0]["content"] for a, p in zip(answer, prompts)), answer
    return [None if i % 2 else 1.0 for i in range(len(answer))]
"""


def test_conversational_prompts_a_trl_reward_function_and_the_missing_eos_penalty(tmp_path, chat_policy):
    """Message-list prompts with an extra column: the reward function gets message lists and the column,
    and gives no score to half the responses (a share logged, no loss). A constant reward shows the
    penalty: every response cut at --max-new-tokens without an end-of-turn id (<|im_end|> counts) pays it."""
    (tmp_path / "reward.py").write_text(CHECKING_REWARD)
    args = quick_args(
        tmp_path,
        chat_policy,
        task="jsonl",
        data=write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 2),
        reward_fn=f"{tmp_path / 'reward.py'}:reward",
        missing_eos_penalty=0.25,
        max_new_tokens=3,
        eval_prompts=1,
        eval_every=2,
    )
    ppo.main(args)
    metrics = last_update(args.output_dir)
    update = metrics["last_update"]
    assert 0 < update["objective/eos_fraction"] < 1, "the test would not see both kinds of response"
    assert update["objective/unscored_fraction"] == 0.5  # one chunk of 8, every other one None
    # Exact in fp32: scores 1 or 0.75 (an unscored one stands at the mean score, 1), 8 of them, divided by 8.
    assert update["objective/score"] == pytest.approx(1.0 - 0.25 * (1 - update["objective/eos_fraction"]), abs=1e-6)
    assert AutoTokenizer.from_pretrained(args.output_dir).chat_template == CHAT_TEMPLATES["chatml"]


def test_string_prompts_with_a_column_and_a_template_flag(tmp_path, chat_policy):
    """Standard prompts through the same path: strings, and the extra column as a keyword argument;
    --chat-template replaces the tokenizer's template and is saved with the policy."""
    (tmp_path / "reward.py").write_text(
        "def reward(prompts, completions, **columns):\n"
        "    assert all(isinstance(p, str) for p in prompts + completions) and columns.keys() == {'answer'}\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    (tmp_path / "template.jinja").write_text(CHAT_TEMPLATES["drops-thinking"])
    records = [{"prompt": r["prompt"][0]["content"], "answer": r["answer"]} for r in CONVERSATIONS]
    args = quick_args(
        tmp_path,
        chat_policy,
        task="jsonl",
        data=write_jsonl(tmp_path / "plain.jsonl", records),
        reward_fn=f"{tmp_path / 'reward.py'}:reward",
        chat_template=str(tmp_path / "template.jinja"),
        max_new_tokens=3,
        num_updates=1,
        eval_prompts=1,
    )
    ppo.main(args)
    assert AutoTokenizer.from_pretrained(args.output_dir).chat_template == CHAT_TEMPLATES["drops-thinking"]


def test_the_arithmetic_task_end_to_end_reports_its_metrics(tmp_path, chat_policy):
    """--task arithmetic wired in: generated problems, the built-in reward (no penalty for a missing end of turn by
    default: a tiny model's replies are wrong, so with no format reward every score is exactly 0), and the held-out
    accuracy, well-formed share, length (greedy and sampled) and pass@k of --eval-samples 4."""
    args = quick_args(
        tmp_path,
        chat_policy,
        task="arithmetic",
        advantage="grpo",
        samples_per_prompt=4,
        train_problems=16,
        eval_prompts=3,
        eval_samples=4,
        max_new_tokens=3,
    )
    ppo.main(args)
    metrics = last_update(args.output_dir)
    assert metrics["last_update"]["objective/score"] == 0.0
    for mode in ("greedy", "sampled"):
        assert 0 <= metrics[f"eval/accuracy_{mode}"] <= 1 and 0 <= metrics[f"eval/well_formed_{mode}"] <= 1
        assert 1 <= metrics[f"eval/response_length_{mode}"] <= 3
    assert [key for key in metrics if key.startswith("eval/pass@")] == ["eval/pass@1", "eval/pass@2", "eval/pass@4"]


def test_bad_prompt_data_is_one_line(tmp_path, chat_policy, tiny_gpt2):
    def refused(records, *fragments, model=chat_policy, name="data.jsonl"):
        data = write_jsonl(tmp_path / name, records)
        reward_fn = write_reward_fn(tmp_path, "return [1.0] * len(responses)")
        expect_error(quick_args(tmp_path, model, task="jsonl", data=data, reward_fn=reward_fn), *fragments)
        assert not os.path.exists(tmp_path / "run")

    refused(
        [{"prompt": "a"}, {"question": "b", "answer": "c"}],
        "data.jsonl, record 2: expected 'prompt' (a string or a list of role/content messages), found fields "
        "question, answer",
    )
    refused([{"prompt": [{"role": "user"}]}], "record 1: expected 'prompt'", "found fields prompt")
    refused([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}], "mixes string prompts and message lists")
    refused(CONVERSATIONS, "has no chat template", "pass --chat-template PATH", model=tiny_gpt2)
    if importlib.util.find_spec("datasets") is None:
        (tmp_path / "data.parquet").write_bytes(b"PAR1")
        reward_fn = write_reward_fn(tmp_path, "return [1.0] * len(responses)")
        args = quick_args(tmp_path, chat_policy, task="jsonl", data=str(tmp_path / "data.parquet"), reward_fn=reward_fn)
        expect_error(args, "needs the datasets package: pip install datasets")


# --- multi-turn environments (issue 26) ----------------------------------------------------------


def environments(tmp_path):
    (tmp_path / "environments.py").write_text(ENVIRONMENTS)
    return str(tmp_path / "environments.py")


def test_an_episode_of_three_turns_is_the_chat_templates_rendering_with_its_masks_rewards_and_gae(tmp_path):
    """A scripted policy and a scripted environment of three turns: the episode's ids are apply_chat_template's of the
    final conversation (up to the framing after the last end of turn), the policy mask covers exactly the assistant
    turns, each step's reward sits on the last token of its turn, and GAE over the mask (in fp64) is the hand
    recursion over the policy's tokens alone, each bootstrapping from the next policy token."""
    spec = importlib.util.spec_from_file_location("environments", environments(tmp_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = chat_tokenizer("chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_ids = ppo.end_of_turn_ids(tokenizer)
    texts = ["the cat", "a dog", "the mat"]
    replies = [tokenizer(t, add_special_tokens=False)["input_ids"] + [im_end] for t in texts]
    args = ppo.Args(model="m", env="ThreeTurns", max_new_tokens=200, max_turns=5, dtype="fp64")
    model = TurnScript(replies, len(tokenizer))
    (episode,) = ppo.play_episodes(model, [{"prompt": "x"}], args, tokenizer, end_ids, module.ThreeTurns, greedy=True)
    final = [{"role": "user", "content": "count with me"}]
    for turn, text in enumerate(texts, 1):
        final += [{"role": "assistant", "content": text}]
        final += [{"role": "tool" if turn == 1 else "user", "content": f"step {turn}"}] if turn < 3 else []
    rendered = tokenizer.apply_chat_template(final, tokenize=True)["input_ids"]
    ids = episode["prompt"] + episode["ids"]
    assert ids == rendered[: len(ids)] and tokenizer.decode(rendered[len(ids) :]) == "\n" and episode["done"]
    # Each assistant turn's ids, where the growing renderings place them: its reply up to <|im_end|>.
    policy = [False] * len(rendered)
    for k, message in enumerate(final):
        if message["role"] == "assistant":
            start = len(
                tokenizer.apply_chat_template(final[:k], add_generation_prompt=True, tokenize=True)["input_ids"]
            )
            policy[start : start + len(replies[k // 2])] = [True] * len(replies[k // 2])
    _, _, responses, real, mask, _, placed, done = ppo.episode_tensors(
        [episode], args, tokenizer.pad_token_id, "cpu", torch.float64
    )
    width = len(episode["ids"])
    assert mask[0, :width].tolist() == policy[len(episode["prompt"]) : len(ids)] and not mask[0, width:].any()
    assert real[0].sum() == width and responses[0, :width].tolist() == episode["ids"] and done.tolist() == [True]
    turn_ends = [i for i in range(width) if mask[0, i] and (i + 1 == width or not mask[0, i + 1])]
    assert len(turn_ends) == 3 and placed[0, turn_ends].tolist() == [1.0, 2.0, 3.0] and placed.sum() == 6
    # GAE over the mask against the recursion written out, on random values and a KL penalty.
    generator = torch.Generator().manual_seed(0)
    values, kl = (torch.randn(1, 200, dtype=torch.float64, generator=generator) for _ in range(2))
    rewards = ppo.token_rewards(placed, kl, mask, beta=0.1)
    advantages, returns = kernels.gae(values, rewards, mask, 0.9, 0.8)
    expected, next_value, next_advantage = torch.zeros(200, dtype=torch.float64), 0.0, 0.0
    for t in reversed(
        [t for t in range(200) if policy[len(episode["prompt"]) + t : len(episode["prompt"]) + t + 1] == [True]]
    ):
        delta = placed[0, t] - 0.1 * kl[0, t] + 0.9 * next_value - values[0, t]
        next_advantage = expected[t] = delta + 0.9 * 0.8 * next_advantage
        next_value = values[0, t]
    assert torch.allclose(advantages[0], expected, rtol=0, atol=1e-12)
    assert torch.allclose(returns[0], torch.where(mask[0], expected + values[0], 0.0), rtol=0, atol=1e-12)


def env_flags(tmp_path, policy, *more):
    flags = dict(model=policy, task="jsonl", data=write_jsonl(tmp_path / "rows.jsonl", CONVERSATIONS * 2))
    flags.update(env=f"{environments(tmp_path)}:ThreeTurns", max_new_tokens=32, max_turns=4, num_updates=2)
    flags.update(batch_size=8, mini_batch_size=4, ppo_epochs=1, eval_prompts=1)
    return [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()] + list(more)


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_runs_with_an_environment_complete_under_one_process_and_two_ranks(tmp_path, chat_policy, advantage):
    """A couple of updates with --env on a tiny chat model, one process and 2 ranks: the sampled episodes do not depend
    on the rank count, so the first update's score (the mean summed reward of its episodes) is the same."""
    extra = ["--advantage", advantage] + (["--samples-per-prompt", "2"] if advantage == "grpo" else [])
    one = run_script("ppo.py", *env_flags(tmp_path, chat_policy, *extra), "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_ranks("ppo.py", *env_flags(tmp_path, chat_policy, *extra), "--output-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = last_update(tmp_path / "one"), last_update(tmp_path / "two")
    assert 0 < first["eval/turns_sampled"] <= 3 and first["eval/score_greedy"] == second["eval/score_greedy"]
    assert 0 < first["last_update"]["objective/score"] <= 6


def test_the_calculator_environment(tmp_path):
    check_calculator_env(ppo)
    policy = save_tiny_chat_model(tmp_path / "long", "chatml", n_positions=256)  # room for the system message
    args = quick_args(
        tmp_path, policy, task="arithmetic", env="calculator", train_problems=8, eval_prompts=2, max_new_tokens=24
    )
    ppo.main(args)
    assert "eval/score_sampled" in last_update(args.output_dir)


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("Raises", ["--env ", ":Raises: Raises.step failed (KeyError: 'score')"]),
        ("WrongType", [":WrongType: step() returned messages 'more'; return role user or tool messages"]),
        ("NeverReturns", ["NeverReturns.step failed (TimeoutError: did not return within --env-timeout 0.5 s)"]),
    ],
)
def test_a_broken_environment_is_one_line(tmp_path, chat_policy, name, fragments):
    args = quick_args(
        tmp_path,
        chat_policy,
        task="jsonl",
        data=write_jsonl(tmp_path / "rows.jsonl", CONVERSATIONS * 2),
        env=f"{environments(tmp_path)}:{name}",
        env_timeout=0.5,
        max_new_tokens=6,
    )
    expect_error(args, *fragments)
    assert not os.path.exists(tmp_path / "run" / "config.json")
