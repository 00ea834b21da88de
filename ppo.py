"""PPO for language models: online RLHF against a reward, with a KL penalty to a reference model.

The policy generates responses to prompts, a reward model (or a task metric, or your function)
scores them, and PPO raises the probability of what scored well while a per-token KL penalty keeps
the policy near the reference (its starting point). One update, as numbered steps in `main`:
  1. generate responses to a batch of prompts;
  2. truncate each at its first EOS;
  3. score them;
  4. log-probs under the policy and the reference, and values;
  5. the per-token KL and its coefficient;
  6. optionally scale the scores;
  7. advantages (GAE, or critic-free);
  8. PPO epochs over minibatches.

    python sft.py --output-dir runs/sft                       # 1. behaviour cloning
    python reward_model.py --model runs/sft --output-dir runs/rm   # 2. a reward model
    python ppo.py --model runs/sft --reward-model runs/rm     # 3. RLHF against it
    python ppo.py --model runs/sft                            # or against the true metric
    torchrun --nproc_per_node 8 ppo.py --model ... --zero-stage 3   # data parallel, see parallel.py
    torchrun --nproc_per_node 8 ppo.py --model ... --tp 2 --pp 2    # tensor x pipeline x data parallel

Memory savers: `--num-layers-unfrozen k` (Hydra: the reference shares the frozen bottom of the
policy and copies only its top k layers), `--lora-rank r` (the reference is the policy with its
adapters switched off), and critic-free advantages (`--advantage rloo|grpo|reinforce++`).
Log-probs and entropies come from `kernels.fused_logprobs`, which never builds more of the
vocabulary-sized logits than one chunk; advantages from `kernels.gae`.

Under torchrun the rollouts do not depend on the number of ranks: every rank builds the same
prompts, the batch is cut into chunks of --generation-batch-size, each sampled with its own seed
and dealt out to the ranks, and the responses are gathered so that every rank holds the whole
batch. Each rank then computes log-probs and values for, and trains on, its share of each
minibatch; gradients are averaged over ranks. N ranks give the single-process run on the same
global batch, up to float rounding. Under --tp/--pp the ranks of one model copy generate the same
chunks together (under --pp with a whole-depth copy gathered from the stages), and the log-prob
passes and PPO epochs run through the stages, the last one computing the loss.

Reading order. `main` (at the bottom) is the whole method: the update's steps 1-8 above, in
order, each a few lines that call the pieces defined earlier in the file: the pieces of the
update, each small enough to test by hand (`truncate_at_eos`, `KLController`, `kl_per_token`,
`token_rewards`, `critic_free_advantages`, `ppo_losses`), then `generate` (step 1),
`truncate_and_score` (2-3), `rollout_logprobs` (4) and `micro_batch_loss` (8). Before those:
Args and check_args; the randomwalks task; prompts; rewards; LoRA and Hydra references; the
forward passes (log-probs from hidden states). `Reward`, `Models` and `build_models` hold what
the update runs; what is marked plumbing (timing, statistics, checkpoints, resume) can be
skipped on a first read.
"""

import contextlib
import copy
import functools
import gzip
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import re
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import numpy as np
import torch
import tqdm
import tyro
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import kernels
import parallel


@dataclass
class Args:
    exp_name: str = "ppo"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (sampling, minibatch order): any integer from 0"""
    task: Literal["randomwalks", "sentiment", "jsonl", "hh", "tldr", "arithmetic"] = "randomwalks"
    """randomwalks: the 20 start letters, scored by optimality unless a reward model is given; sentiment: openings of
    movie reviews (examples/sentiment_prompts.jsonl, or --data), scored by VADER's compound score of the reply unless a
    reward is given (VADER, an optional extra, is then still reported as eval/vader_*); jsonl: prompt-only records from
    --data; hh: Anthropic/hh-rlhf prompts; tldr: Reddit TL;DR posts (hh and tldr download from the hub unless --data is
    given); arithmetic: integer problems from --seed as a user message for a chat model, rewarded for the right answer,
    the last integer of the reply (--train-problems, --operands, --digits, --operations, --format-reward). Every task's
    prompts become prompt-only records, read by one code path"""
    data: Optional[str] = None
    """prompt-only records (TRL's format): `{"prompt": text}` or `{"prompt": [{"role": "user", "content": ...}]}`, one
    kind per file, any other columns (a reference answer, `tools` for the chat template) kept for --reward-fn; a .jsonl
    or .jsonl.gz file, or with the datasets package a .parquet file or a datasets directory. Required for --task jsonl;
    for sentiment it replaces the shipped openings; for hh/tldr a local copy in the upstream format"""
    chat_template: Optional[str] = None
    """a Jinja chat template file replacing the tokenizer's (saved with the policy); conversational prompts are
    rendered by it with the generation prompt, and its end-of-turn token ends a response"""
    train_problems: int = 1000
    """--task arithmetic: problems generated for training (all there are, if the difficulty allows fewer); the
    held-out ones are --eval-prompts more"""
    operands: int = 2
    """--task arithmetic: numbers in a problem, at least 2"""
    digits: int = 1
    """--task arithmetic: digits of each number (1: 0 to 9, 2: 10 to 99, ...)"""
    operations: str = "+"
    """--task arithmetic: the operators drawn from, some of + - * (e.g. "+-*"); * binds before + and -"""
    format_reward: float = 0.0
    """--task arithmetic: added to the reward of a well-formed reply (stripped, exactly one integer), 0 or more"""
    model: Optional[str] = None
    """the policy's starting point: an sft.py run directory, or any causal LM hub name or local path (required)"""
    reward_model: Optional[str] = None
    """a reward_model.py run directory (or any sequence-classification model with num_labels=1); scores are normalised
    with its saved mean/std"""
    reward_fn: Optional[str] = None
    """`module:function` (or `path/file.py:function`) called as TRL's reward functions are, once per generation chunk:
    f(prompts, completions, **columns), prompts and completions message lists for conversational data (a completion
    is [{"role": "assistant", "content": reply}]) and strings otherwise, every other column of the rows a keyword
    argument (a list, one value per sample); returns one float per sample, or None for no score: that sample carries
    no loss this update and stands at its group's (or the batch's) mean score in the statistics
    (objective/unscored_fraction counts them; all None is an error). A function of exactly two parameters is called
    f(prompts, responses)"""
    reward_device: Optional[str] = None
    """device of the reward model given by --reward-model (default: the policy's)"""
    reward_normalization: Literal["reward-model", "first-batch"] = "reward-model"
    """how scores are centred and scaled before the KL penalty weighs against them. reward-model: by a reward model's
    saved reward_mean and reward_std (reward_model.py measures them on held-out dataset responses; scores of a
    --reward-fn or a task metric stay raw). first-batch: by the mean and std of the first batch's scores, the reference
    policy's own samples, fixed for the run (lm-human-preferences), so that beta weighs the same against any reward's
    scale"""
    reward_clip: Optional[float] = None
    """clip normalised scores to [-c, c], c > 0 (default: no clipping)"""
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of a response cut at --max-new-tokens without an end-of-turn id (0: none; default: 1.0
    for text tasks, 0 for randomwalks, sentiment and arithmetic)"""
    env: Optional[str] = None
    """a multi-turn environment, `module:Class` (or `path/file.py:Class`) or `calculator` (CalculatorEnv): each prompt
    row becomes Class(row), whose reset() gives the opening messages and step(reply) the messages that follow, the
    step's reward and whether the episode is over (README); policy and environment take turns until then, --max-turns,
    or --max-new-tokens (with --env the budget of the whole episode after its opening). It replaces the reward"""
    max_turns: int = 4
    """--env: policy turns per episode at most"""
    env_timeout: float = 60.0
    """--env: seconds a reset() or step() call may take; one that has not returned by then stops the run"""
    value_model: Optional[str] = None
    """start the critic from this model (e.g. the reward model) as a separate network, instead of a value head on the
    policy (--advantage gae only)"""
    dtype: Literal["fp32", "bf16", "fp64"] = "fp32"
    """fp32; bf16: autocast for forward passes (trained weights and optimizer stay fp32; the reference and reward model
    are stored in bf16); fp64: every model (policy, reference, value function, reward model) and every computation in
    float64, slow, for checking that two layouts compute the same math (the tests compare runs this way)"""
    device: str = "auto"
    """torch device; auto picks cuda when present, else cpu"""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage under torchrun: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters
    (and a reference copy)"""
    tp: int = 1
    """tensor-parallel ranks per model copy under torchrun (policy and reference split by attention heads, MLP and
    vocabulary; the value head and reward model stay whole; data parallel takes the remaining ranks)"""
    pp: int = 1
    """pipeline stages per model copy under torchrun (policy and reference split into contiguous stages of decoder
    layers, 1F1B schedule over the micro-batches, value head on the last stage; rollouts are generated with a whole copy
    gathered from the stages)"""
    cp: int = 1
    """context-parallel ranks per model copy under torchrun (Ulysses: each holds 1/cp of every sequence through the
    whole model, attention trades positions for heads; for sequences whose activations outgrow one device)"""
    sequence_parallel: bool = False
    """with --tp: also split the activations between the tensor-parallel matmuls (norms, residual adds) along the
    sequence (Megatron sequence parallelism: the same communication, 1/tp of those activations)"""
    output_dir: Optional[str] = None
    """where the run directory goes; default runs/<run name>"""

    num_layers_unfrozen: int = -1
    """Hydra: train only the top k layers and share the frozen rest with the reference (-1: train everything, full
    reference copy)"""
    lora_rank: int = 0
    """LoRA adapters of this rank on the policy's linear layers (0: off); the reference is the policy with adapters
    disabled"""
    lora_alpha: float = 16.0
    """LoRA scale numerator, positive: the adapter output is multiplied by alpha / rank"""
    lora_target_modules: str = "all"
    """comma-separated names (suffixes) of the linear layers that get adapters; `all` means every linear layer inside
    the decoder blocks"""

    advantage: Literal["gae", "rloo", "grpo", "reinforce++"] = "gae"
    """gae: critic and generalized advantage estimation; rloo: leave-one-out baseline (Ahmadian et al. 2024); grpo:
    group-normalised score, the KL to the reference a loss term (DeepSeekMath, Shao et al. 2024); reinforce++: globally
    whitened returns (Hu 2025)"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (rloo and grpo need at least 2)"""
    grpo_scale_by_std: bool = True
    """--advantage grpo: divide each group's centred scores by their std (DeepSeekMath). --no-grpo-scale-by-std keeps
    them centred only, as Dr. GRPO does (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2): the std
    weighs groups of near-equal scores (too easy or too hard prompts) up. A flag rather than an --advantage of its own,
    since Dr. GRPO's other change, a constant length normaliser, is --loss-aggregation constant and applies alone"""
    drop_equal_groups: bool = False
    """--advantage grpo or rloo: leave out of the update's losses and statistics every group whose scores are all equal
    (its grpo advantage is 0; its rloo advantage only the KL's differences). DAPO's dynamic sampling (Yu et al. 2025,
    sec. 3.2) without its resampling: the batch is not refilled, so an update trains on fewer responses, and on none
    (no step) when every group is equal; objective/dropped_group_fraction logs the share dropped"""
    num_updates: int = 100
    """PPO updates (each: generate a batch, then optimise on it)"""
    batch_size: int = 128
    """rollouts (responses) per update, over all ranks: a multiple of --mini-batch-size and of --samples-per-prompt"""
    mini_batch_size: int = 32
    """rollouts per optimizer step, over all ranks (each of N data-parallel ranks trains on mini_batch_size / N; 32
    splits over 1, 2, 4 or 8)"""
    micro_batch_size: Optional[int] = None
    """rollouts per forward/backward pass on one rank (default: the rank's whole share of a minibatch,
    mini_batch_size / ranks); the share must be a multiple of it (gradient accumulation inside the share)"""
    packing: bool = False
    """the training passes (log-probs, values, the PPO epochs) pack each micro-batch's rollouts, prompt and response
    without padding, into rows no longer than its longest, attention kept within each by position ids that restart
    (same losses; not with --pp, --cp or --sequence-parallel)"""
    generation_batch_size: int = 64
    """rollouts sampled by one generate() call: the batch is cut into chunks of this size (the last may be shorter),
    each sampled with its own seed and dealt out to the ranks in order, so rollouts do not depend on the number of
    ranks; make batch_size / generation_batch_size a multiple of the rank count to keep every rank busy"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon: the ratio is clipped to [1 - cliprange, 1 + cliprange_high]"""
    cliprange_high: Optional[float] = None
    """upper ratio clip epsilon, positive (default: --cliprange). DAPO's clip-higher (Yu et al. 2025, sec. 3.1, 0.28
    beside a lower 0.2): more room to raise a token's probability than to lower it, against entropy collapse"""
    cliprange_value: float = 0.2
    """clip of the value prediction's change from the rollout's value"""
    vf_coef: float = 0.5
    """weight of the value loss (0: the critic is not trained)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (0: none)"""
    gamma: float = 1.0
    """discount, in [0, 1] (1: none; 0: each token sees only its own reward)"""
    lam: float = 0.95
    """GAE lambda, in [0, 1] (0: one-step TD advantages; 1: Monte Carlo returns minus the value)"""
    loss_aggregation: Optional[Literal["token", "sequence", "constant"]] = None
    """how per-token losses become a minibatch's loss. token: their sum over all real tokens of the minibatch divided
    by the count of those tokens (DAPO's token-level loss, Yu et al. 2025, sec. 3.3, as its release computes it over a
    batch; its formula writes the count of one prompt's group); sequence: the mean over each sequence's real tokens,
    then over sequences (DeepSeekMath's objective); constant: each sequence's sum divided by --max-new-tokens, then
    the mean over sequences (Dr. GRPO's constant normaliser, Liu et al. 2025, sec. 3.2: no length bias). Default
    token, and sequence under --advantage grpo"""
    scale_rewards: bool = False
    """divide scores by their running standard deviation (the mean is never shifted)"""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """weigh each token's policy loss by rho = pi_old / pi_sampler, the trainer's probability of the token over the
    sampler's, kept from going large. tis: min(rho, --is-cap) (truncated importance sampling, Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"); mis: rho, or 0 above the cap (masked
    importance sampling, Liu et al. 2025, "When Speed Kills Stability", token level). The sampler here is the policy
    itself on its KV cache, so rho is 1 up to rounding under fp32; it matters where sampling rounds differently (--dtype
    bf16, the bf16 copy gathered under --pp) or draws from another distribution (--top-k/--top-p: rho <= 1)"""
    is_cap: float = 2.0
    """the cap C of --is-correction, at least 1 (below, tokens the sampler and trainer agree on would be cut)"""
    old_logprobs: Literal["trainer", "sampler"] = "trainer"
    """pi_old of the PPO ratio. trainer: a forward of the policy over the rollouts, in the first PPO epoch's
    micro-batches, so that the first minibatch's ratio is exactly 1; sampler: the log-probs each token was drawn with
    (as TRL's PPOTrainer takes them), which saves that forward (unless the value head needs it) and equals it up to
    the sampler's rounding (of its bf16 copy under --pp, or under --dtype bf16). Not with --top-k/--top-p (the sampler's
    distribution is then not the policy's) or --is-correction (rho would be 1 everywhere)"""

    init_kl_coef: float = 0.05
    """initial coefficient beta of the KL to the reference (0: no KL penalty, and then no --target-kl): a per-token
    penalty in the reward, or under --advantage grpo the weight of a k3 term in the loss (DeepSeekMath used 0.04)"""
    target_kl: Optional[float] = None
    """adaptive KL controller target (per-sequence KL), positive; unset keeps beta fixed"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon, in rollouts"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimate in the reward: k1 = log-ratio, k3 = (r - 1) - log r with r = p_ref / p"""

    temperature: float = 1.0
    """sampling temperature, positive (log-probs use the same one)"""
    top_k: int = 0
    """sample from the k most likely tokens (0: all)"""
    top_p: float = 1.0
    """nucleus sampling threshold, in (0, 1] (1: off)"""
    max_new_tokens: int = 10
    """response budget in tokens (randomwalks needs 10: nine letters and EOS)"""
    max_prompt_length: int = 256
    """prompts are cut on the left to this many tokens"""

    eval_every: int = 25
    """updates between evaluations (and at the end)"""
    eval_samples_per_start: int = 20
    """randomwalks: sampled walks per start node at each evaluation"""
    eval_samples: int = 1
    """text tasks: sampled responses per held-out prompt at each evaluation (arithmetic: pass@k estimated from them)"""
    eval_prompts: int = 64
    """text tasks: held-out prompts scored at each evaluation (at most a tenth of the prompts, and at least one)"""
    save_every: int = 0
    """updates between checkpoints; 0 saves only the final model"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep on disk"""
    resume: Optional[str] = None
    """checkpoint directory (or a run directory: its newest checkpoint) to continue from; pass the same flags as the
    original run"""

    track: bool = False
    """log to Weights & Biases (works with WANDB_MODE=offline)"""
    wandb_project: str = "rlhf"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""


# Bad input stops with one `error:` line and exit status 1, not a traceback; under torchrun rank 0
# prints it while the other ranks wait (see parallel.fail).
fail = parallel.fail


def check_args(args: Args, world_size: int) -> Args:
    """Every flag, checked before anything is loaded or written: ranges, sizes that must divide,
    and what depends on the number of processes. Returns the flags with --micro-batch-size and
    --loss-aggregation settled."""

    def require(ok: bool, flag: str, what: str):
        if not ok:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} {what}")

    at_least_one = (
        "tp pp cp samples_per_prompt num_updates batch_size mini_batch_size generation_batch_size ppo_epochs "
        "kl_horizon max_new_tokens max_prompt_length eval_every eval_samples_per_start eval_samples eval_prompts "
        "max_turns digits train_problems keep_checkpoints"
    )
    for flag in at_least_one.split():
        require(getattr(args, flag) >= 1, flag, "must be at least 1")
    for flag in ("seed", "lora_rank", "top_k", "save_every"):
        require(getattr(args, flag) >= 0, flag, "must be 0 or more")
    require(
        args.num_layers_unfrozen == -1 or args.num_layers_unfrozen >= 1,
        "num_layers_unfrozen",
        "must be -1 (train every layer) or the number of top layers to train, at least 1",
    )
    for flag in ("learning_rate", "max_grad_norm", "cliprange", "cliprange_value", "temperature", "lora_alpha"):
        require(0 < getattr(args, flag) < math.inf, flag, "must be a positive number")
    for flag in ("reward_clip", "target_kl", "cliprange_high"):
        value = getattr(args, flag)
        require(value is None or 0 < value < math.inf, flag, "must be a positive number, or unset")
    for flag in ("vf_coef", "entropy_coef", "init_kl_coef", "format_reward", "missing_eos_penalty"):
        value = getattr(args, flag)  # --missing-eos-penalty may be unset
        require(value is None or 0 <= value < math.inf, flag, "must be 0 or a positive number")
    require(
        1 <= args.is_cap < math.inf,
        "is_cap",
        "must be a number of at least 1 (rho is 1 where sampler and trainer agree)",
    )
    for flag in ("gamma", "lam"):
        require(0 <= getattr(args, flag) <= 1, flag, "must lie between 0 and 1")
    require(0 < args.top_p <= 1, "top_p", "must lie in (0, 1]: the probability mass sampled from (1: all of it)")
    if args.old_logprobs == "sampler" and (args.top_k or args.top_p < 1 or args.is_correction != "none"):
        fail("--old-logprobs sampler takes the sampler's log-probs for the policy's; drop --top-k/p, --is-correction")
    if args.target_kl is not None and args.init_kl_coef == 0:
        fail(
            f"--target-kl {args.target_kl} adapts the KL coefficient by factors, which cannot move it from "
            "--init-kl-coef 0; give a positive --init-kl-coef, or drop --target-kl"
        )

    model_ranks = args.tp * args.pp * args.cp
    layout = f"--tp {args.tp} --pp {args.pp}" + (f" --cp {args.cp}" if args.cp > 1 else "")
    if model_ranks > 1 and world_size == 1:
        fail(
            f"{layout} splits the model over {model_ranks} processes; "
            f"launch with torchrun --nproc_per_node {model_ranks} (or a multiple)"
        )
    if world_size % model_ranks:
        fail(
            f"{world_size} processes do not split into {layout.replace(' --', ' x --')} groups; "
            f"make the process count a multiple of {model_ranks}"
        )
    if args.sequence_parallel and args.tp == 1:
        fail("--sequence-parallel splits the tensor-parallel ranks' activations; it needs --tp 2 or more")
    if args.pp > 1 and (args.cp > 1 or args.sequence_parallel):
        fail("--cp and --sequence-parallel do not compose with --pp; use them with data and tensor parallelism")
    if args.packing and (args.pp > 1 or args.cp > 1 or args.sequence_parallel):
        fail("--packing composes with data and tensor parallelism only, not with --pp, --cp or --sequence-parallel")
    if args.zero_stage == 3 and args.tp * args.pp > 1:
        fail("--zero-stage 3 does not compose with --tp or --pp; use --zero-stage 0, 1 or 2")
    if args.lora_rank > 0 and args.tp * args.pp > 1:
        fail(
            "--lora-rank is not supported with --tp or --pp (the adapters would need splitting too); "
            "use --num-layers-unfrozen for a cheap reference"
        )
    if args.value_model and args.tp * args.pp > 1:
        fail(
            "--value-model (a separate critic) is not supported with --tp or --pp; "
            "use the value head (the default) or a critic-free --advantage"
        )
    if args.num_layers_unfrozen > 0 and args.lora_rank > 0:
        fail("--num-layers-unfrozen and --lora-rank are two ways to get a cheap reference; pick one")
    if args.num_layers_unfrozen > 0 and (args.cp > 1 or args.sequence_parallel):
        fail(
            "--num-layers-unfrozen (Hydra) runs the reference's top from the policy's intermediate states, which "
            "--cp and --sequence-parallel leave split; use --lora-rank or a whole reference with them"
        )

    ranks = world_size // model_ranks  # data-parallel ranks
    for flag, divisor, what in (
        ("batch_size", args.samples_per_prompt, "is not a whole number of prompts times --samples-per-prompt {}"),
        ("batch_size", args.mini_batch_size, "does not split into minibatches of --mini-batch-size {}"),
        ("mini_batch_size", ranks, "does not split over {} data-parallel ranks"),
    ):
        require(getattr(args, flag) % divisor == 0, flag, f"{what.format(divisor)}; make it a multiple of {divisor}")
    share = args.mini_batch_size // ranks
    micro_batch_size = share if args.micro_batch_size is None else args.micro_batch_size
    require(
        micro_batch_size >= 1, "micro_batch_size", "must be at least 1 (or unset: a rank's whole share of a minibatch)"
    )
    require(
        share % micro_batch_size == 0,
        "micro_batch_size",
        f"does not divide a rank's share of a minibatch "
        f"(--mini-batch-size {args.mini_batch_size} / {ranks} rank(s) = {share}); "
        f"pick a divisor of {share}, or leave it unset",
    )
    if args.advantage in ("rloo", "grpo") and args.samples_per_prompt < 2:
        fail(f"--advantage {args.advantage} compares responses to the same prompt; set --samples-per-prompt 2 or more")
    if not args.grpo_scale_by_std and args.advantage != "grpo":
        fail(f"--no-grpo-scale-by-std changes --advantage grpo's advantage; --advantage {args.advantage} has no std")
    if args.drop_equal_groups and args.advantage not in ("grpo", "rloo"):
        fail(
            f"--drop-equal-groups drops groups of responses to one prompt, which --advantage {args.advantage} does "
            "not compare; use --advantage grpo or rloo"
        )
    if args.value_model and args.advantage != "gae":
        fail(
            f"--value-model starts a critic, which --advantage {args.advantage} does not use; "
            "drop it, or use --advantage gae"
        )

    if args.model is None:
        fail(
            "--model is required: the policy starts from a trained model, "
            "e.g. `python sft.py --output-dir runs/sft` then --model runs/sft"
        )
    if args.reward_model and args.reward_fn:
        fail("pass one of --reward-model and --reward-fn")
    if args.reward_device and not args.reward_model:
        fail(f"--reward-device {args.reward_device} places the reward model, but no --reward-model is given")
    require(args.operands >= 2, "operands", "must be at least 2: a problem joins two numbers or more")
    require(
        0 < len(args.operations) and set(args.operations) <= set("+-*"),
        "operations",
        'must be some of the operators + - * (e.g. "+-*")',
    )
    require(0 < args.env_timeout < math.inf, "env_timeout", "must be a positive number of seconds")
    if args.env and (args.reward_model or args.reward_fn or args.reward_normalization == "first-batch"):
        fail(f"--env {args.env} gives the reward; drop --reward-model, --reward-fn and --reward-normalization")
    if args.task not in ("randomwalks", "sentiment", "arithmetic") and not (
        args.reward_model or args.reward_fn or args.env
    ):
        fail(f"--task {args.task} has no built-in reward; pass --reward-model or --reward-fn")
    if args.task == "jsonl" and args.data is None:
        fail('--task jsonl needs --data PATH (a file of {"prompt": ...} lines)')
    if args.task in ("randomwalks", "arithmetic") and args.data is not None:
        fail(f"--data {args.data} is for the text tasks; {args.task} builds its own prompts")
    if args.chat_template and not os.path.isfile(args.chat_template):
        fail(f"--chat-template {args.chat_template}: no such file; pass a Jinja chat template file")
    parallel.check_output_dir(args)
    loss_aggregation = args.loss_aggregation or ("sequence" if args.advantage == "grpo" else "token")
    return replace(args, micro_batch_size=micro_batch_size, loss_aggregation=loss_aggregation)


# ---------------------------------------------------------------------------------------------
# The randomwalks task (trlX's examples/randomwalks), as in sft.py: prompts are start letters,
# and the true reward of a response is the optimality of the walk it completes.
# ---------------------------------------------------------------------------------------------
RANDOMWALKS_SEED = 1000
RANDOMWALKS_NODES = 21
RANDOMWALKS_MAX_NODES = 10  # a walk has at most this many nodes, start included


def random_walks_graph(seed=RANDOMWALKS_SEED, n_nodes=RANDOMWALKS_NODES):
    """The graph (boolean adjacency [n, n]), drawn exactly as trlX does; trlX then draws its walks from the same
    generator, which PPO, scoring its own walks, does not need."""
    rng = np.random.RandomState(seed)
    while True:  # redraw until every node has a way out
        adjacency = rng.rand(n_nodes, n_nodes) > 0.9
        np.fill_diagonal(adjacency, False)
        if adjacency.any(axis=1).all():
            break
    adjacency[0, :] = False  # the goal is absorbing
    adjacency[0, 0] = True
    return adjacency


def shortest_path_nodes(adjacency) -> list:
    """Node count of a shortest path from each node to the goal (node 0), by breadth-first search
    backwards from the goal; None where the goal is unreachable."""
    nodes = [1] + [None] * (len(adjacency) - 1)  # the goal itself: a path of one node
    queue = deque([0])
    while queue:
        node = queue.popleft()
        for previous in np.nonzero(adjacency[:, node])[0]:
            if nodes[previous] is None:
                nodes[previous] = nodes[node] + 1
                queue.append(previous)
    return nodes


def walk_optimality(walk: str, adjacency, shortest, max_nodes=RANDOMWALKS_MAX_NODES) -> float:
    """(max_nodes - length) / (max_nodes - shortest length) for a walk written as letters, start included.

    The walk is scanned up to its first visit of the goal (what follows is ignored); length counts
    nodes, start included. An unknown letter or a missing edge before the goal, or never reaching
    it, makes the walk invalid: 0. A shortest path scores 1."""
    nodes = [ord(letter) - ord("a") for letter in walk]
    if not nodes or not 0 < nodes[0] < len(adjacency) or shortest[nodes[0]] is None:
        return 0.0
    for position in range(1, len(nodes)):
        if not 0 <= nodes[position] < len(adjacency) or not adjacency[nodes[position - 1], nodes[position]]:
            return 0.0
        if nodes[position] == 0:
            return max(0.0, (max_nodes - (position + 1)) / (max_nodes - shortest[nodes[0]]))
    return 0.0


# ---------------------------------------------------------------------------------------------
# The arithmetic task: integer problems generated from the seed, whose answers can be checked
# ---------------------------------------------------------------------------------------------
ARITHMETIC_QUESTION = "What is {}? Answer with the number only."
ARITHMETIC_FLAGS = ("operands", "digits", "operations")  # the difficulty


def arithmetic_problems(seed: int, count: int, operands: int, digits: int, operations: str, held_out: bool) -> list:
    """`count` distinct problems of one side, drawn from `seed`, as prompt-only rows {"prompt": [the
    user message], "answer": its value}: `operands` numbers of exactly `digits` digits (0-9 for
    one) joined by operators drawn from `operations`, * binding before + and -. A problem is held
    out when the first byte of its text's SHA-256 is below 26 (about a tenth), whatever the seed
    and count: training and held-out problems never meet, in any two runs. A side holding fewer
    than `count` problems (one-digit addition has 100 in all) gives every one of them."""
    numbers, rng = range(0 if digits == 1 else 10 ** (digits - 1), 10**digits), random.Random(seed)
    if len(numbers) ** operands * len(operations) ** (operands - 1) <= max(100_000, 20 * count):
        # Small: listed whole, in a seeded order (draws would mostly repeat). Only here: product() lists its inputs.
        operand_values = itertools.product(numbers, repeat=operands)
        candidates = list(itertools.product(operand_values, itertools.product(operations, repeat=operands - 1)))
        rng.shuffle(candidates)
    else:  # each side holds over twice `count`: drawn until enough are distinct
        candidates = iter(lambda: (rng.choices(numbers, k=operands), rng.choices(operations, k=operands - 1)), None)
    problems = {}
    for values, operators in candidates:
        text = " ".join(f"{value} {operator}" for value, operator in zip(values, operators)) + f" {values[-1]}"
        if (hashlib.sha256(text.encode()).digest()[0] < 26) == held_out:
            problems[text] = eval(text)  # integers and + - * only: Python's precedence is arithmetic's
        if len(problems) == count:
            break
    return [
        {"prompt": [{"role": "user", "content": ARITHMETIC_QUESTION.format(t)}], "answer": a}
        for t, a in problems.items()
    ]


def arithmetic_answer(reply: str) -> tuple:
    """(the reply's answer, whether it is well-formed). The answer is the last integer in the reply
    (digits with an optional minus sign, so "1,234" reads 234), None when it holds none; a reply is
    well-formed when, stripped, it is exactly one integer."""
    integers = re.findall(r"-?\d+", reply)
    return (int(integers[-1]) if integers else None), re.fullmatch(r"-?\d+", reply.strip()) is not None


def arithmetic_reward(prompts, completions, answer, format_reward: float = 0.0, **columns) -> list:
    """The arithmetic task's reward, a function of TRL's convention: 1 for each completion (a string,
    or a list holding the assistant message) whose answer is its row's `answer`, plus format_reward
    (--format-reward) when it is well-formed."""
    replies = [completion[-1]["content"] if isinstance(completion, list) else completion for completion in completions]
    parsed = [arithmetic_answer(reply) for reply in replies]
    return [
        float(value == expected) + format_reward * well_formed for (value, well_formed), expected in zip(parsed, answer)
    ]


def pass_at_k(n: int, right: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which `right` are right, 1 - C(n - right, k)
    / C(n, k), in the product form of Chen et al. 2021 ("Evaluating Large Language Models Trained
    on Code", fig. 3), which never forms the large binomials."""
    return 1.0 if n - right < k else 1.0 - float(np.prod(1.0 - k / np.arange(n - right + 1, n + 1)))


def arithmetic_metrics(mode: str, replies: list, answers: list, lengths: list, samples: int) -> dict:
    """What an evaluation reports of the replies to held-out problems, `samples` consecutive replies
    per problem: accuracy, the share of well-formed replies, the mean length in tokens, and with
    several samples pass@k for k = 1, 2, 4, ... and `samples`."""
    parsed = [arithmetic_answer(reply) for reply in replies]
    right = np.array([value == answer for (value, _), answer in zip(parsed, answers)]).reshape(-1, samples)
    metrics = {f"eval/accuracy_{mode}": float(right.mean()), f"eval/response_length_{mode}": float(np.mean(lengths))}
    metrics[f"eval/well_formed_{mode}"] = float(np.mean([well_formed for _, well_formed in parsed]))
    for k in sorted({2**i for i in range(samples.bit_length())} | {samples}) if samples > 1 else ():
        metrics[f"eval/pass@{k}"] = float(np.mean([pass_at_k(samples, int(c), k) for c in right.sum(1)]))
    return metrics


class CalculatorEnv:
    """--env calculator, the arithmetic task with a tool: a reply may call `<calc>17*23</calc>` (integers, + - * and
    parentheses), answered by a tool message holding each call's result; the first reply without a call ends the
    episode, rewarded by arithmetic_reward against the row's `answer`."""

    SYSTEM = "You have a calculator: write <calc>17*23</calc> and its result comes back. Give the answer without one."

    def __init__(self, row: dict):
        self.row = row

    def reset(self) -> list:
        return [{"role": "system", "content": self.SYSTEM}, *self.row["prompt"]]

    def step(self, message: dict) -> tuple:
        calls = re.findall(r"<calc>(.*?)</calc>", message["content"], re.DOTALL)
        if not calls:
            return [], arithmetic_reward(None, [message["content"]], [self.row["answer"]])[0], True
        return [{"role": "tool", "content": ", ".join(calculate(call) for call in calls)}], 0.0, False


def calculate(expression: str) -> str:
    """The value of an integer expression, or "error": only digits, + - * and parentheses are evaluated, never **
    (a power tower would not finish)."""
    if len(expression) > 100 or "**" in expression or not re.fullmatch(r"[\d\s+*()-]+", expression):
        return "error"
    try:
        return str(eval(expression, {"__builtins__": {}}))
    except (SyntaxError, TypeError, ValueError):
        return "error"


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def read_records(path: str) -> list:
    """Records of a .jsonl or .jsonl.gz file (malformed lines are named by number), or of a .parquet file or a
    directory written by datasets' save_to_disk, read through the optional datasets package."""
    if path.endswith(".parquet") or os.path.isdir(path):
        try:
            import datasets
        except ImportError:
            fail(f"reading {path} needs the datasets package: pip install datasets")
        try:
            table = datasets.load_from_disk(path) if os.path.isdir(path) else datasets.Dataset.from_parquet(path)
            return table.to_list()
        except Exception as error:  # a corrupt file, a folder of several splits: one line either way
            fail(f"cannot read {path!r} as one dataset ({type(error).__name__}: {error}); pass a .jsonl file")
    if not os.path.isfile(path):
        fail(f"data file {path!r} does not exist; pass --data with the path of a .jsonl file")
    records = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    fail(f"{path}, line {line_number}: not valid JSON ({error.msg}); each line must be one JSON object")
                if not isinstance(record, dict):
                    fail(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read data file {path!r}: {error}")
    return records


def is_conversation(value) -> bool:
    """A message list: a non-empty list of dicts, each with a string role and a string content."""
    messages = value if isinstance(value, list) and value else [None]
    return all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content")) for m in messages)


def hh_prompt(dialogue) -> Optional[str]:
    """An hh-rlhf dialogue up to and including its last "\\n\\nAssistant:" (None without one)."""
    cut = dialogue.rfind("\n\nAssistant:") if isinstance(dialogue, str) else -1
    return dialogue[: cut + len("\n\nAssistant:")] if cut >= 0 else None


def download(task: str) -> list:
    """Fetch the upstream training files from the Hugging Face hub (online only) and return their paths."""
    from huggingface_hub import snapshot_download

    repo, patterns = {
        "hh": ("Anthropic/hh-rlhf", ["*/train.jsonl.gz"]),
        "tldr": ("vwxyzjn/summarize_from_feedback_tldr_3_filtered", ["data/train-*"]),
    }[task]
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=patterns)
    except Exception as error:  # offline, gated, renamed: all end the same way for the user
        fail(f"could not download {repo} ({type(error).__name__}); without a network pass --data with a local copy")
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in sorted(names)]
    return sorted(p for p in paths if p.endswith((".jsonl.gz", ".parquet")))


SENTIMENT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "sentiment_prompts.jsonl")
PROMPT_ONLY = "'prompt' (a string or a list of role/content messages)"
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"  # Stiennon et al.'s format


def load_prompts(task: str, data: Optional[str]) -> list:
    """The prompt-only records of a text task (TRL's format): `prompt` a string or a message list, the same kind in
    every record, every other column kept. The upstream tasks' records become such records: an hh dialogue up to
    its last assistant turn (its comparison left out, so that the prompt it repeats for each is kept once), a TL;DR
    post in its prompt format. Each record once, with every column (None where it had none), so that a reward
    function gets the same arguments for every chunk."""
    expected = {"hh": "'chosen' (a dialogue)", "tldr": "'subreddit', 'title', 'post'"}
    records, kinds = [], set()
    for path in [data or SENTIMENT_PROMPTS] if data or task == "sentiment" else download(task):
        for number, record in enumerate(read_records(path), 1):
            prompt = hh_prompt(record.get("chosen")) if task == "hh" else record.get("prompt")
            if task == "tldr" and all(isinstance(record.get(k), str) for k in ("subreddit", "title", "post")):
                prompt = TLDR_PROMPT.format(**record)
            if not isinstance(prompt, str) and not is_conversation(prompt):
                found = ", ".join(record) or "none"
                fail(f"{path}, record {number}: expected {expected.get(task, PROMPT_ONLY)}, found fields {found}")
            kinds.add(type(prompt))
            records.append({"prompt": prompt} if task == "hh" else {**record, "prompt": prompt})
    if len(kinds) > 1:
        fail(f"{data} mixes string prompts and message lists; use one kind of prompt per file")
    records = list({json.dumps(r, sort_keys=True, default=str): r for r in records}.values())
    if not records:
        fail(f"no prompts in {data or task}; the file is empty")
    columns = dict.fromkeys(k for r in records for k in r)
    return [{k: r.get(k) for k in columns} for r in records]


def render(tokenizer, messages: list, tools=None, generation_prompt=False) -> list:
    """Token ids of a conversation in the tokenizer's chat template (the template writes any BOS itself)."""
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_tokens(tokenizer, record: dict, room: int) -> list:
    """A prompt's token ids, cut on the left to `room` tokens: a conversation rendered by the chat template with the
    generation prompt, a string as the tokenizer encodes it (an empty prompt becomes EOS: generation needs a
    position to start from)."""
    prompt = record["prompt"]
    if is_conversation(prompt):
        return render(tokenizer, prompt, record.get("tools"), generation_prompt=True)[-room:]
    return tokenizer(prompt)["input_ids"][-room:] or [tokenizer.eos_token_id]


def end_of_turn_ids(tokenizer, generation_config=None) -> list:
    """The ids that end a response: the tokenizer's EOS, generation_config.eos_token_id (an int or a list), and the
    chat template's end-of-turn token (<|im_end|>, <|eot_id|>), found as the first token after a reply's text."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    if tokenizer.chat_template:
        user, reply = [{"role": "user", "content": "x"}], tokenizer("y", add_special_tokens=False)["input_ids"]
        context = render(tokenizer, user, generation_prompt=True)
        tail = render(tokenizer, user + [{"role": "assistant", "content": "y"}])[len(context) :]
        if tail[: len(reply)] == reply and len(tail) > len(reply):
            ids.add(tail[len(reply)])
    return sorted(i for i in ids if i is not None)


def use_chat_template(tokenizer, path: Optional[str], records: list, name: str):
    """--chat-template replaces the tokenizer's template (and is saved with it); conversations need a template."""
    if path:
        with open(path, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()
    if is_conversation(records[0]["prompt"]) and not tokenizer.chat_template:
        fail(f"the tokenizer of {name!r} has no chat template for the conversations; pass --chat-template PATH")


# ---------------------------------------------------------------------------------------------
# Rewards: a reward model (as in reward_model.py), the task metric, or a user function
# ---------------------------------------------------------------------------------------------
def reward_model_ids(tokenizer, record: dict, response: str) -> list:
    """What a reward model with a tokenizer of its own reads: the conversation (the prompt's messages and the reply)
    in its chat template, up to the reply's end-of-turn token, or without a template the prompt's text (a
    conversation's contents, a line each) and the reply's."""
    prompt, tools = record["prompt"], record.get("tools")
    if is_conversation(prompt) and tokenizer.chat_template:
        ids = render(tokenizer, prompt + [{"role": "assistant", "content": response}], tools)
        reply, end_ids = len(render(tokenizer, prompt, tools, generation_prompt=True)), end_of_turn_ids(tokenizer)
        return ids[: next((i + 1 for i in range(reply, len(ids)) if ids[i] in end_ids), len(ids))]
    text = "\n".join(m["content"] for m in prompt) if is_conversation(prompt) else prompt
    return tokenizer(text)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]


def pad_batch(sequences: list, pad_token_id: int, device, side: str = "right"):
    """input_ids and attention_mask of a padded batch. Give the model positions_from_mask: a left-padded sequence
    then sees the same positions as a right-padded one, and scores the same."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        columns = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def score(model, tokenizer, records: list, responses: list, sequences=None, batch_size: int = 32) -> torch.Tensor:
    """Raw reward-model scores of each (prompt record, response text), as a float tensor on the CPU (fp64 from an
    fp64 model, else fp32): of `sequences` when given (prompt and response token ids as sampled, for a model with
    the policy's tokenizer), else of reward_model_ids. Each is cut on the left to the model's context (the response
    is what is judged, and its last token is where the score is read). Normalise with the statistics in the
    model's config: (score - config.reward_mean) / config.reward_std. The score is read at each sequence's last real
    token (the transformers class finds the rightmost non-pad token, so a pad token must not occur inside the text)."""
    # The longest sequence the model's position embeddings allow, when the config says.
    max_length = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = max_length or 1 << 30
    device = next(model.parameters()).device
    sequences = sequences or [reward_model_ids(tokenizer, r, response) for r, response in zip(records, responses)]
    sequences = [ids[-max_length:] for ids in sequences]
    scores = []  # the model was loaded in eval mode (load_reward_model), and only scores
    for i in range(0, len(sequences), batch_size):
        input_ids, attention_mask = pad_batch(sequences[i : i + batch_size], tokenizer.pad_token_id, device)
        output = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
        )
        scores.append(upcast(output.logits[:, 0]).cpu())
    return torch.cat(scores)


def load_reward_model(path: str, device, policy_tokenizer, verbose: bool = True, dtype=torch.float32):
    """A reward model with its tokenizer and normalisation; texts are re-tokenized for it, so a
    tokenizer that differs from the policy's is fine (and said once, when verbose)."""
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        fail(f"--reward-model {path!r}: no such directory; pass a reward_model.py run directory")
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        fail(f"--reward-model {path!r} could not be loaded: {str(error).splitlines()[0]}")
    if loading["missing_keys"]:  # a causal LM, say: transformers made up the score head at random
        fail(f"--reward-model {path!r} has no trained score head; pass a reward_model.py run directory")
    if model.config.num_labels != 1:
        fail(f"--reward-model {path!r} has {model.config.num_labels} outputs; a reward model has one (num_labels=1)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab() and verbose:
        print(
            "note: the reward model's tokenizer differs from the policy's; responses are decoded to text and "
            "rendered for it (with its chat template, if it has one)"
        )
    mean, std = getattr(model.config, "reward_mean", 0.0), getattr(model.config, "reward_std", 1.0)
    if not hasattr(model.config, "reward_mean") and verbose:
        print(f"note: {path} has no reward_mean/reward_std (not trained by reward_model.py); raw scores are used")
    return kernels.use_linear(model.to(device).eval().requires_grad_(False)), tokenizer, mean, std


def load_reward_fn(spec: str, flag: str = "--reward-fn"):
    """The user's reward function (or --env class) from `module:function` or `path/to/file.py:function`."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        fail(f"{flag} {spec!r}: expected module:name or file.py:name")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location("user_reward", module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ImportError, FileNotFoundError, AttributeError) as error:
        fail(f"{flag} {spec!r} could not be loaded: {error}")
    if not callable(function):
        fail(f"{flag} {spec!r} is a {type(function).__name__}, not a function or class")
    return function


def call_reward_fn(function, records: list, texts: list):
    """--reward-fn on one chunk in TRL's convention (see Args.reward_fn): f(prompts, completions, **columns), or
    f(prompts, responses) for a function of exactly two positional parameters, as before."""
    prompts = [r["prompt"] for r in records]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversation(prompts[0]) else texts
    parameters = inspect.signature(function).parameters.values()
    if len(parameters) == 2 and all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters):
        return function(prompts, completions)
    return function(prompts, completions, **{k: [r[k] for r in records] for k in records[0] if k != "prompt"})


@functools.cache
def vader():
    """VADER's analyser (the optional extra vaderSentiment): the sentiment task's built-in reward."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        fail(
            "--task sentiment scores responses with VADER: pip install vaderSentiment (or pip install -r "
            "requirements-examples.txt)"
        )
    return SentimentIntensityAnalyzer()


def sentiment_scores(responses: list, dtype=torch.float32) -> torch.Tensor:
    """VADER's compound score of each continuation, in [-1, 1]: how positive the text the policy
    wrote is (the prompt is not scored, so the opening's own sentiment does not count)."""
    return torch.tensor([vader().polarity_scores(response)["compound"] for response in responses], dtype=dtype)


def checked_scores(values, count: int, source: str, dtype=torch.float32) -> torch.Tensor:
    """A reward source's output as a tensor of `dtype`, None as NaN (no score), refusing wrong lengths and
    non-finite numbers (in that dtype: a score beyond fp32's range is refused under fp32)."""
    try:
        values = list(values)
        scores = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=dtype)
    except (TypeError, ValueError):
        fail(f"{source} must return a list of numbers (or None for no score), got {type(values).__name__}")
    if len(scores) != count:
        fail(f"{source} returned {len(scores)} scores for {count} responses; return exactly one per response")
    bad = (~torch.isfinite(scores) & torch.tensor([v is not None for v in values])).nonzero()
    if len(bad):
        fail(f"{source} returned a non-finite score (NaN or inf) for response {int(bad[0])}; return finite numbers")
    return scores


# ---------------------------------------------------------------------------------------------
# LoRA, written out: y = base(x) + (alpha / r) * B(A(dropout-free x)), B initialised to zero so the
# adapted model starts equal to the base. Switching adapters off gives back the base model, which
# is the reference policy at no memory cost.
# ---------------------------------------------------------------------------------------------
class LoRA(torch.nn.Module):
    """A frozen linear layer (nn.Linear, or GPT-2's Conv1D whose weight is [in, out]) plus a low-rank update."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.transposed = type(base).__name__ == "Conv1D"
        in_features, out_features = base.weight.shape if self.transposed else base.weight.shape[::-1]
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, **like))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, **like))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        output = self.base(x)
        if self.enabled:
            output = output + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale).to(output.dtype)
        return output

    def merged(self) -> torch.nn.Module:
        """The base layer with the update added into its weight."""
        layer = copy.deepcopy(self.base)
        delta = (self.lora_B @ self.lora_A) * self.scale  # [out, in]
        with torch.no_grad():
            layer.weight += (delta.T if self.transposed else delta).to(layer.weight.dtype)
        return layer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks (GPT-2's h, Llama's and NeoX's layers)."""
    count = model.config.num_hidden_layers
    lists = [m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(lists) != 1:
        fail(
            f"cannot find the {count} decoder layers of {type(model).__name__}; Hydra and LoRA support GPT-2, Llama "
            "and GPT-NeoX style models"
        )
    return lists[0]


def add_lora(model, rank: int, alpha: float, targets: str) -> list:
    """Freeze the model and wrap the chosen linear layers of its blocks with LoRA; returns the wrappers."""
    model.requires_grad_(False)
    wanted = None if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    wrapped = []
    for block in decoder_layers(model):
        for name, module in list(block.named_modules()):
            is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            if is_linear and (wanted is None or any(name == t or name.endswith("." + t) for t in wanted)):
                wrapped.append(LoRA(module, rank, alpha))
                block.set_submodule(name, wrapped[-1])
    if not wrapped:
        fail(
            f"--lora-target-modules {targets!r} matched no linear layer; name layers such as q_proj,v_proj (Llama) or "
            "c_attn (GPT-2)"
        )
    return wrapped


@contextlib.contextmanager
def adapters_disabled(adapters: list):
    """The base model, for reference log-probs and reference generations."""
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def merge_lora(model) -> torch.nn.Module:
    """A plain copy of the model with every adapter merged into its layer: what gets saved (the
    model itself when it has no adapters)."""
    if not any(isinstance(module, LoRA) for module in model.modules()):
        return model
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoRA):
            merged.set_submodule(name, module.merged())
    return merged


# ---------------------------------------------------------------------------------------------
# Hydra (trlX): the bottom of the network is frozen and shared; only the top k blocks, the final
# norm and an untied head are trained, and the reference is a copy of just those. The reference
# runs its own no-grad forward through the shared trunk, which costs compute but no parameters.
# ---------------------------------------------------------------------------------------------
def make_hydra(policy, num_layers_unfrozen: int):
    """Freeze the policy's bottom and return the reference: a copy sharing every frozen module."""
    layers = decoder_layers(policy)
    if not 0 < num_layers_unfrozen <= len(layers):
        fail(f"--num-layers-unfrozen {num_layers_unfrozen} must be between 1 and the model's {len(layers)} layers")
    policy.requires_grad_(False)
    trainable = list(layers[len(layers) - num_layers_unfrozen :])
    # The final norm: a direct child of the trunk that is neither an embedding nor the block list.
    embeddings = (torch.nn.Embedding, parallel.VocabParallelEmbedding)
    trainable += [
        m
        for m in policy.base_model.children()
        if m is not layers and not isinstance(m, embeddings) and any(True for _ in m.parameters())
    ]
    head = policy.get_output_embeddings()
    if head.weight is not policy.get_input_embeddings().weight:  # a tied head is the frozen embedding
        trainable.append(head)
    for module in trainable:
        module.requires_grad_(True)
    # deepcopy with a memo holding the frozen parameters copies only the trainable ones.
    memo = {id(p): p for p in policy.parameters() if not p.requires_grad}
    return copy_model(policy, memo).requires_grad_(False).eval()


def copy_model(model, memo: Optional[dict] = None):
    """copy.deepcopy of a model whose tensor-parallel layers hold a process group: the copy shares
    the group (a group cannot be copied, and the copy's layers talk to the same ranks)."""
    memo = dict(memo or {})
    memo.update({id(m.group): m.group for m in model.modules() if getattr(m, "group", None) is not None})
    return copy.deepcopy(model, memo)


def hydra_owned(reference, policy) -> torch.nn.Module:
    """The modules of a Hydra reference that hold its own copied parameters (top blocks, final norm,
    untied head), in one container: what ZeRO-3 shards for the reference. The shared trunk is the
    policy's, sharded with it; sharding it twice would break it."""
    shared = {id(p) for p in policy.parameters()}
    layers = [layer for layer in decoder_layers(reference) if not any(id(p) in shared for p in layer.parameters())]
    inside = {id(m) for layer in layers for m in layer.modules()}
    others = [
        m
        for m in reference.modules()
        if id(m) not in inside and any(p is not None and id(p) not in shared for p in m._parameters.values())
    ]
    return torch.nn.ModuleDict({"layers": torch.nn.ModuleList(layers), "others": torch.nn.ModuleList(others)})


# ---------------------------------------------------------------------------------------------
# Forward passes: log-probs of the response tokens, their entropies, and values, without logits
# ---------------------------------------------------------------------------------------------
def upcast(x: torch.Tensor) -> torch.Tensor:
    """A forward's output as the update computes with it: bf16 (under autocast) to fp32, while
    fp32 and fp64 stay as they are (.float() would drop an fp64 run to fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so a left-padded prompt starts at position 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, input_ids, attention_mask, prompt_length: int, temperature: float):
    """Log-probs of the response tokens input_ids[:, prompt_length:], and the hidden states that
    predicted them (which the value head reads), as logprobs_from_hidden returns them."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
    ).last_hidden_state
    return logprobs_from_hidden(model.get_output_embeddings(), hidden, input_ids, prompt_length, temperature)


def logprobs_from_hidden(head, hidden, input_ids, prompt_length: int, temperature: float, with_entropy=False):
    """response_logprobs from the trunk's last (final-normed) hidden states [B, T, H], as the
    model's trunk or the last pipeline stage returns them. They go straight to kernels.fused_logprobs
    with the LM head: no more than a chunk of the [B, T, vocab] logits is ever built. It runs as the
    head module's forward for this one call: hooks on the head then fire as for any module
    call, which ZeRO-3 needs (it gathers the head's weight before the forward and again before the
    backward, and frees it after). Under --tp the head is this rank's slice of the vocabulary
    (parallel.ColumnParallelLinear), and fused_logprobs combines the slices over its group: no
    rank ever holds whole logits."""
    hidden, labels = hidden[:, prompt_length - 1 : -1], input_ids[:, prompt_length:]
    group = getattr(head, "group", None)
    head.forward = lambda x: kernels.fused_logprobs(
        x, head.weight, labels, temperature=temperature, bias=head.bias, return_entropy=with_entropy, group=group
    )
    try:
        result = head(hidden)
    finally:
        del head.forward
    return (*result, hidden) if with_entropy else (result, None, hidden)


class Critic(torch.nn.Module):
    """A separate value network: a trunk (initialised from --value-model) and a scalar head."""

    def __init__(self, path: str, dtype=torch.float32):
        super().__init__()
        try:
            config = AutoConfig.from_pretrained(path)
            self.trunk = kernels.use_linear(
                AutoModel.from_pretrained(path, config=without_dropout(config), dtype=dtype)
            )
        except (OSError, ValueError) as error:
            fail(f"--value-model {path!r} could not be loaded: {str(error).splitlines()[0]}")
        self.head = torch.nn.Linear(config.hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        if getattr(config, "num_labels", None) == 1:  # a reward model: start from its score head too
            scorer = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
            with torch.no_grad():
                self.head.weight.copy_(scorer.score.weight)
                if scorer.score.bias is not None:
                    self.head.bias.copy_(scorer.score.bias)

    def forward(self, micro_batch: dict, prompt_length: int):
        return self.head(trunk_states(self.trunk, micro_batch)[:, prompt_length - 1 : -1]).squeeze(-1)


def trunk_states(model, micro_batch: dict) -> torch.Tensor:
    """A model's final hidden states [b, T, H] of a micro-batch's padded rows, computed on them or (--packing) on
    its packed rows and put back in place: zero at the padding, which the losses mask out. Without a cache, which
    would keep transformers from reading packed positions as separate sequences."""
    packed = micro_batch["packed"]
    if packed is None:
        inputs = {k: micro_batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        return model.base_model(**inputs, use_cache=False).last_hidden_state
    hidden = model.base_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
    hidden = hidden.last_hidden_state.flatten(0, 1)
    hidden = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])])  # the row every padding position reads
    return hidden[packed["slots"]].view(*micro_batch["input_ids"].shape, -1)


def pack(input_ids, mask) -> dict:
    """--packing: a micro-batch's real tokens in rows no longer than its longest sequence, filled first fit from the
    longest, each sequence with its own position ids and the padding ending a row a sequence of its own (positions
    from 0); `slots` maps each padded position to its packed one, or for padding to one past the last."""
    lengths, end = mask.sum(-1).tolist(), mask.numel()  # end: the padding's index, a zero after the flattened inputs
    width, rows, where = max(lengths), [], mask.flatten().nonzero().flatten().split(lengths)
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        row = next((row for row in rows if sum(lengths[k] for k in row) + lengths[j] <= width), None)
        rows.append([j]) if row is None else row.append(j)
    fill = where[0].new_full((width,), end)
    flat = torch.stack([torch.cat([where[j] for j in row] + [fill])[:width] for row in rows])
    slots = torch.full((end + 1,), flat.numel(), device=flat.device)
    slots[flat.flatten()] = torch.arange(flat.numel(), device=flat.device)
    padding, packed = flat == end, lambda x: torch.cat([x.flatten(), x.new_zeros(1)])[flat]
    positions = torch.where(padding, padding.cumsum(-1) - 1, packed(positions_from_mask(mask)))
    return {"input_ids": packed(input_ids), "position_ids": positions, "slots": slots[:end]}


def values_of(models, hidden, micro_batch: dict, prompt_length: int):
    """V(state) before each response token, from the policy's hidden states or the separate critic."""
    if models.critic is not None:
        return upcast(models.critic(micro_batch, prompt_length))
    return upcast(models.value_head(hidden).squeeze(-1))


# ---------------------------------------------------------------------------------------------
# The pieces of the update, each small enough to test by hand
# ---------------------------------------------------------------------------------------------
def truncate_at_eos(responses: torch.Tensor, end_ids, pad_token_id: int):
    """Everything after the first end-of-turn id (any of end_ids: the EOS, a chat template's <|im_end|>, ...)
    becomes padding. Returns (responses, mask of real tokens, has an end id); the id that ended a response is a real
    token: it is an action the policy took. A response cut at --max-new-tokens has none."""
    is_end = torch.isin(responses, torch.as_tensor(end_ids, device=responses.device))
    mask = is_end.cumsum(-1) - is_end.long() == 0  # no end id before the token
    return torch.where(mask, responses, pad_token_id), mask, is_end.any(-1)


class KLController:
    """beta of the KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019):
    error = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + error * n / horizon."""

    def __init__(self, init_kl_coef: float, target: Optional[float], horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int):
        if self.target is not None:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation over every score seen, merged batch by batch with Chan
    et al.'s parallel update (exact, and stable where a naive sum of squares is not)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor):
        x = x.double()
        batch_mean, batch_var, batch_count = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean, self.var, self.count = self.mean + delta * batch_count / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(1, self.count - 1))  # unbiased, as a sample std


def kl_per_token(logprobs, ref_logprobs, estimator: str):
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # k3: (r - 1) - log r with r = p_ref / p, never negative


def token_rewards(scores, kl, mask, beta: float):
    """-beta * KL on every real response token, plus the score on the last real token; scores of shape [B, T] (an
    --env episode's step rewards, each on the last token of the turn that earned it) are added where they stand."""
    rewards = torch.where(mask, -beta * kl, 0.0)
    if scores.dim() == 2:
        return rewards + scores.to(rewards.dtype)
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def critic_free_advantages(
    method: str, scores, kl, mask, beta: float, group_size: int, gamma: float, scale_by_std: bool = True
):
    """Advantages without a value function, each as its paper has it; rows i*group_size ... are the
    responses to one prompt, and every token of a response gets its sequence's advantage.
    - rloo (Ahmadian et al. 2024, "Back to Basics"): the sequence reward R = score - beta * sum_t KL_t
      minus the mean R of the other responses to the same prompt.
    - grpo (Shao et al. 2024, DeepSeekMath 4.1.1, outcome supervision): (score - group mean) /
      group std (unbiased). The KL is not in the advantage: it is a k3 term of the loss (ppo_losses).
      Without scale_by_std, score - group mean: Dr. GRPO (Liu et al. 2025, sec. 3.2).
    - reinforce++ (Hu 2025): per-token rewards -beta * KL_t with the score on the last token,
      discounted returns whitened over the whole batch."""
    if method == "reinforce++":
        returns, _ = kernels.gae(torch.zeros_like(kl), token_rewards(scores, kl, mask, beta), mask, gamma, 1.0)
        return kernels.masked_whiten(returns, mask)
    if method == "rloo":
        sequence_reward = (scores.to(kl.dtype) - beta * torch.where(mask, kl, 0.0).sum(-1)).view(-1, group_size)
        advantage = sequence_reward - (sequence_reward.sum(-1, keepdim=True) - sequence_reward) / (group_size - 1)
    else:  # grpo
        group = scores.to(kl.dtype).view(-1, group_size)
        advantage = group - group.mean(-1, keepdim=True)
        if scale_by_std:
            advantage = advantage / (group.std(-1, keepdim=True) + 1e-8)
    return torch.where(mask, advantage.view(-1, 1), 0.0)


def drop_equal_groups(scores, mask, group_size: int, enabled: bool = True):
    """DAPO's dynamic sampling as a filter (Yu et al. 2025, sec. 3.2): (the mask with every response
    of a group whose scores are all equal switched off, the fraction of groups dropped), or (mask,
    None) when not enabled. All right or all wrong, such a group has nothing to compare: its grpo
    advantage is 0, and kept it would only dilute the token and sequence counts the loss is divided by."""
    if not enabled:
        return mask, None
    group = scores.view(-1, group_size)
    equal = (group == group[:, :1]).all(-1)
    return mask & ~equal.repeat_interleave(group_size)[:, None].to(mask.device), equal.double().mean().item()


def loss_normaliser(mask, aggregation: str, max_new_tokens: int) -> float:
    """What `aggregate` divides by, from the mask of a whole minibatch (all ranks' rows, so that
    micro-batches and ranks add up to the one-process loss): its count of real tokens (token), of
    sequences with a token to train on (sequence), or that count times the token budget (constant).
    0 when nothing is left to train on (every row dropped by --drop-equal-groups)."""
    if aggregation == "token":
        return float(mask.sum())
    sequences = float(mask.any(-1).sum())
    return sequences * max_new_tokens if aggregation == "constant" else sequences


def aggregate(loss, mask, aggregation: str, normaliser: float):
    """Sum of a per-token loss over a micro-batch, divided by the minibatch's loss_normaliser; under
    sequence, each sequence's sum is first divided by its own count of real tokens. Accumulating
    these over micro-batches gives the minibatch's loss exactly."""
    loss = torch.where(mask, loss, 0.0)
    if aggregation == "sequence":
        return (loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return loss.sum() / normaliser  # token and constant: only the normaliser differs


def importance_weights(old_logprobs, sampler_logprobs, mask, correction: str, cap: float) -> tuple:
    """(per-token weights of the policy loss, their statistics) for --is-correction: rho = pi_old /
    pi_sampler, the trainer's probability of each sampled token over the sampler's, is capped at
    `cap` (tis) or zeroed above it (mis); none weighs every token 1. Constants of the update: the
    gradient flows through the PPO ratio alone. Where sampler and trainer agree, rho is exactly 1
    and so is every weight, which leaves the loss bitwise unchanged."""
    rho = torch.exp(torch.where(mask, old_logprobs - sampler_logprobs, 0.0))
    weights = {"none": torch.ones_like(rho), "tis": rho.clamp(max=cap), "mis": torch.where(rho <= cap, rho, 0.0)}
    stats = {"is/ratio_mean": kernels.masked_mean(rho, mask).item(), "is/ratio_max": rho[mask].max().item()}
    stats["is/capped_fraction"] = kernels.masked_mean((rho > cap).to(rho.dtype), mask).item()
    return weights[correction], stats if correction != "none" else {}


def ppo_losses(
    logprobs,
    old_logprobs,
    advantages,
    values,
    old_values,
    returns,
    mask,
    args: Args,
    normaliser: float,
    ref_logprobs=None,
    kl_coef: float = 0.0,
    is_weights=None,
):
    """Clipped policy loss and clipped value loss (each aggregated), with the statistics to log.
    The ratio is clipped to [1 - cliprange, 1 + cliprange_high]; clip_fraction counts the real
    tokens whose ratio lies outside, on either side. Each token's policy loss is multiplied by its
    is_weights (importance_weights) when given. With ref_logprobs (grpo), plus kl_coef times
    the k3 estimate of KL(policy || reference) of the current policy, pi_ref / pi - log(pi_ref / pi)
    - 1 per token, whose gradient pulls the policy back (DeepSeekMath's eq. 3-4)."""
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    low, high = 1 - args.cliprange, 1 + (args.cliprange if args.cliprange_high is None else args.cliprange_high)
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(low, high))
    if is_weights is not None:
        policy_loss = policy_loss * is_weights
    stats = {
        "policy/approx_kl": kernels.masked_mean(ratio - 1 - log_ratio, mask),  # k3 of the update, >= 0
        "policy/clip_fraction": kernels.masked_mean(((ratio < low) | (ratio > high)).to(ratio.dtype), mask),
        "policy/ratio_mean": kernels.masked_mean(ratio, mask),
        "policy/ratio_max": torch.where(mask, ratio, 0.0).max(),
    }
    loss = aggregate(policy_loss, mask, args.loss_aggregation, normaliser)
    if values is not None:
        clipped_values = old_values + (values - old_values).clamp(-args.cliprange_value, args.cliprange_value)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
        loss = loss + args.vf_coef * aggregate(value_loss, mask, args.loss_aggregation, normaliser)
        clipped = (values - old_values).abs() > args.cliprange_value
        stats["value/clip_fraction"] = kernels.masked_mean(clipped.to(values.dtype), mask)
        stats["value/error"] = kernels.masked_mean((values - returns) ** 2, mask)
    if ref_logprobs is not None:
        kl = kl_per_token(logprobs, ref_logprobs, "k3")
        loss = loss + kl_coef * aggregate(kl, mask, args.loss_aggregation, normaliser)
        stats["policy/kl_loss"] = kernels.masked_mean(kl, mask)
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Generation, run directory, checkpoints
# ---------------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int) -> list:
    """Shuffled example order of one epoch; a function of (seed, epoch) alone, so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def restrict(logits, top_k: int, top_p: float):
    """Logits with every token outside the k most likely (0: no limit) and outside the smallest set
    of most likely tokens whose probability reaches top_p (1: no limit) set to -inf."""
    if top_k:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already reach top_p (never the first)
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
    return logits


def draw(probs):
    """One token of each row of probs [B, V], by inverting the row's CDF at a uniform: one random number per row,
    where torch.multinomial draws one per vocabulary entry, much the slower on a CPU. The CDF is summed in fp64,
    whose rounding (about V * 1e-16) shifts no token's probability measurably; tokens of probability 0 leave it
    flat, so they are never drawn."""
    cdf = probs.double().cumsum(-1)
    uniform = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, args: Args, tokenizer, end_ids: list, greedy=False):
    """Responses [B, max_new_tokens] to left-padded prompts, and the log-prob of each response
    token under the distribution it was drawn from: softmax(logits / temperature) over the tokens
    --top-k and --top-p keep. A short decode loop on the KV cache rather than model.generate(),
    which would also apply what the checkpoint's generation_config.json asks (a repetition
    penalty, banned n-grams, min_p, ...): sampling from a distribution that the trainer's
    log-probs do not describe. Greedy takes the argmax. Rows that drew one of end_ids are padded
    after it, with log-prob 0, and the loop stops when every row has ended."""
    rows, width, end_ids = prompt_ids.shape[0], args.max_new_tokens, torch.tensor(end_ids, device=prompt_ids.device)
    responses = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long, device=prompt_ids.device)
    logprobs, finished = None, torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
    step_ids, attention_mask, position_ids, cache = prompt_ids, prompt_mask, positions_from_mask(prompt_mask), None
    for t in range(width):
        output = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output.cache
        # Upcast, then divided by the temperature: the order kernels.fused_logprobs follows.
        logits = upcast(output.logits[:, -1])
        logits = restrict(logits / args.temperature if args.temperature != 1 else logits, args.top_k, args.top_p)
        # One softmax, as generate() does; the log of a drawn token's probability is exact to
        # rounding (a token drawn has a probability far from fp32's underflow).
        probs = logits.softmax(-1)
        next_ids = logits.argmax(-1) if greedy else draw(probs)
        if logprobs is None:
            logprobs = torch.zeros(rows, width, dtype=logits.dtype, device=prompt_ids.device)
        responses[:, t] = next_ids.masked_fill(finished, tokenizer.pad_token_id)
        logprobs[:, t] = probs.gather(-1, next_ids[:, None]).squeeze(-1).log().masked_fill(finished, 0.0)
        finished |= torch.isin(next_ids, end_ids)
        if finished.all():
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    return responses, logprobs


def deal_chunks(total: int, chunk_size: int, ranks: int, rank: int) -> list:
    """This rank's chunks (index, start, end) of `total` rows cut into pieces of chunk_size (the
    last may be shorter), dealt out in order: rank r takes chunks [r * n // ranks, (r + 1) * n // ranks)."""
    chunks = [(index, start, min(start + chunk_size, total)) for index, start in enumerate(range(0, total, chunk_size))]
    return chunks[rank * len(chunks) // ranks : (rank + 1) * len(chunks) // ranks]


def chunk_seed(seed: int, stream: str, chunk: int) -> int:
    """The torch seed of one generation chunk: a hash of (--seed, which generation, chunk index), so
    a chunk samples the same tokens whichever rank draws it, and in a resumed run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}/{chunk}".encode()).digest()[:8], "little") & (2**63 - 1)


def encode_prompts(tokenizer, records: list, max_prompt_length: int, device):
    """Left-padded token ids and mask of prompt records (prompt_tokens): generation starts where every prompt ends."""
    ids = [prompt_tokens(tokenizer, record, max_prompt_length) for record in records]
    return pad_batch(ids, tokenizer.pad_token_id, device, side="left")


def init_wandb(args: Args, run_name: str, run_dir: str, run_id: Optional[str]):
    """wandb.init that cannot hang a run: online with a bounded wait, falling back to offline logging."""
    import wandb

    kwargs = dict(
        project=args.wandb_project,
        entity=args.wandb_entity,
        name=run_name,
        config=asdict(args),
        dir=run_dir,
        id=run_id,
        resume="allow",
    )
    try:
        return wandb.init(**kwargs, settings=wandb.Settings(init_timeout=60))
    except Exception as error:
        print(f"wandb could not start online ({type(error).__name__}); logging offline to {run_dir}/wandb")
        return wandb.init(**kwargs, mode="offline")


def without_dropout(config):
    """A copy of the config without dropout, so that the first minibatch's ratio is exactly 1: every number
    named for a drop (dropout, attn_pdrop, layerdrop) or a jitter (MoE router noise), nested ones too. Build
    the model from it: attention modules keep the rate they read at init (Llama's self.attention_dropout)."""

    def zeroed(key: str, value):
        if isinstance(value, dict):
            return {k: zeroed(k, v) for k, v in value.items()}
        random = type(value) in (int, float) and ("drop" in key or "jitter" in key)
        return type(value)(0) if random else value  # an int stays an int: configs check their fields' types

    return config.__class__.from_dict(zeroed("", config.to_dict()))


def load_policy(name: str, device, dtype=torch.float32):
    """The policy's causal LM, without dropout, and tokenizer, with one clear line when they cannot be had."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name!r}: no such directory; pass an sft.py run directory or a hub name such as gpt2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        config = without_dropout(AutoConfig.from_pretrained(name))
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {name!r} has no EOS token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return kernels.use_linear(model.to(device)), tokenizer


# ---------------------------------------------------------------------------------------------
# The reward, the models of a layout, and the passes over them (what main's steps call)
# ---------------------------------------------------------------------------------------------
def task_prompts(args: Args) -> tuple:
    """(training prompts, held-out prompts). randomwalks uses the 20 start letters for both; a text
    task holds out --eval-prompts (at most a tenth) by a shuffle of its own seed."""
    if args.task == "randomwalks":
        prompts = [{"prompt": chr(ord("a") + n)} for n in range(1, RANDOMWALKS_NODES)]  # the start letters
        return prompts, prompts
    if args.task == "arithmetic":  # disjoint sides by construction: --eval-prompts held-out problems
        problems = functools.partial(arithmetic_problems, args.seed, **{k: getattr(args, k) for k in ARITHMETIC_FLAGS})
        return problems(args.train_problems, held_out=False), problems(args.eval_prompts, held_out=True)
    prompts = load_prompts(args.task, args.data)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_eval = min(args.eval_prompts, max(1, len(prompts) // 10))
    if len(prompts) <= n_eval:  # n_eval is at least 1, so only a single prompt gets here
        fail(
            f"{args.data or args.task} holds {len(prompts)} distinct prompt, held out for evaluation, "
            "and none is left to train on; give at least 2 prompts"
        )
    if args.task == "sentiment":
        vader()  # the reward or, beside another reward, the task's metric: a missing extra ends the run here
    return [prompts[i] for i in order[n_eval:]], [prompts[i] for i in order[:n_eval]]


def batch_prompts(train_prompts: list, update: int, args: Args) -> list:
    """The prompts of an update (each --samples-per-prompt times): the next ones of a stream of
    shuffled epochs, a function of seed and position alone, so a resumed run replays it."""
    per_batch = args.batch_size // args.samples_per_prompt
    first, last = update * per_batch, (update + 1) * per_batch
    epochs = range(first // len(train_prompts), (last - 1) // len(train_prompts) + 1)
    stream = [i for epoch in epochs for i in epoch_order(len(train_prompts), args.seed, epoch)]
    offset = first - epochs[0] * len(train_prompts)
    return [train_prompts[i] for i in stream[offset : offset + per_batch] for _ in range(args.samples_per_prompt)]


class Reward:
    """The score of each response as its source gives it (a reward model, --reward-fn, or the
    task's metric), and the (shift, scale) that normalises it before the KL penalty weighs
    against it. The reward model is replicated on every rank: it only scores."""

    def __init__(self, args: Args, tokenizer, end_ids: list, device, dtype, verbose: bool):
        self.args, self.dtype, self.tokenizer, self.end_ids = args, dtype, tokenizer, end_ids
        if args.task == "randomwalks":
            self.adjacency = random_walks_graph()
            self.shortest = shortest_path_nodes(self.adjacency)
        reward_device = torch.device(args.reward_device) if args.reward_device else device
        # The reward model only scores, so under --dtype bf16 it is stored in bf16: half the memory.
        frozen_dtype = torch.bfloat16 if args.dtype == "bf16" else dtype
        self.model = (
            load_reward_model(args.reward_model, reward_device, tokenizer, verbose=verbose, dtype=frozen_dtype)
            if args.reward_model
            else None
        )
        self.same_tokenizer = self.model is not None and self.model[1].get_vocab() == tokenizer.get_vocab()
        self.fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
        if args.task == "arithmetic" and self.fn is None:
            self.fn = functools.partial(arithmetic_reward, format_reward=args.format_reward)
        self.env_class = CalculatorEnv if args.env == "calculator" else args.env and load_reward_fn(args.env, "--env")
        # A continuation of a review is not expected to end within the budget, and arithmetic's reward is the
        # verifiable one alone: no penalty by default.
        default_penalty = 0.0 if args.task in ("randomwalks", "sentiment", "arithmetic") else 1.0
        self.missing_eos_penalty = args.missing_eos_penalty if args.missing_eos_penalty is not None else default_penalty
        # The reward model's normalisation, or under first-batch none until the first batch is measured.
        shift, scale = self.model[2:] if self.model is not None else (0.0, 1.0)
        if args.reward_normalization == "first-batch":
            shift = scale = None
        self.norm = {"shift": shift, "scale": scale}

    def raw(self, records: list, texts: list, sequences: list) -> torch.Tensor:
        """Scores of one generation chunk (so a --reward-fn sees one chunk's responses at a time): `records` the
        prompt records, `texts` the replies before their end-of-turn id, `sequences` the prompt's and reply's token ids
        as sampled, which a reward model with the policy's tokenizer reads; NaN where a --reward-fn gave None."""
        if self.model is not None:
            model, tokenizer, _, _ = self.model
            return score(model, tokenizer, records, texts, sequences if self.same_tokenizer else None)
        if self.fn is not None:
            scores = call_reward_fn(self.fn, records, texts)
            return checked_scores(scores, len(texts), f"--reward-fn {self.args.reward_fn}", self.dtype)
        if self.args.task == "sentiment":
            return sentiment_scores(texts, self.dtype)
        return torch.tensor(self.optimality(records, texts), dtype=self.dtype)

    def optimality(self, records: list, responses: list) -> list:
        return [walk_optimality(r["prompt"] + t, self.adjacency, self.shortest) for r, t in zip(records, responses)]

    def of_chunk(self, records: list, prompt_ids, prompt_mask, generated) -> tuple:
        """(texts, raw scores) of a chunk of generated responses: what a reward reads of each response is its text
        before the id that ended it, or for a reward model with the policy's tokenizer the sampled token ids."""
        responses, mask, has_end = truncate_at_eos(generated, self.end_ids, self.tokenizer.pad_token_id)
        lengths = (mask.sum(-1) - has_end.long()).tolist()
        texts = [
            self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(responses.tolist(), lengths)
        ]
        sequences = [
            p[m.bool()].tolist() + r[k].tolist() for p, m, r, k in zip(prompt_ids, prompt_mask, responses, mask)
        ]
        return texts, self.raw(records, texts, sequences)

    def normalized(self, scores: torch.Tensor, verbose: bool = False) -> torch.Tensor:
        """Under --reward-normalization first-batch, the first call measures the shift and scale."""
        if self.norm["scale"] is None:
            self.norm.update(shift=scores.mean().item(), scale=scores.std().item() if scores.std() > 0 else 1.0)
            if verbose:
                print(
                    f"reward normalization: mean {self.norm['shift']:.4g} and std {self.norm['scale']:.4g} of the "
                    f"first batch's {len(scores)} scores"
                )
        scores = (scores - self.norm["shift"]) / self.norm["scale"]
        return scores if self.args.reward_clip is None else scores.clamp(-self.args.reward_clip, self.args.reward_clip)


def head_of(model):
    """The LM head: a pipeline stage's (the last stage holds it), or a whole model's."""
    return model.head if isinstance(model, parallel.PipelineStage) else model.get_output_embeddings()


@dataclass
class Models:
    """What an update runs, built once for the layout by build_models. Under --pp, `stage` is
    this rank's PipelineStage of the policy (and `reference` its stage of the reference); the
    update's passes go through parallel.forward_backward/forward_only, which choose the pipeline
    schedule or the plain loop, so the update itself never asks which layout it runs on."""

    policy: torch.nn.Module
    reference: Optional[torch.nn.Module]  # None under LoRA: the policy with its adapters switched off
    adapters: list
    value_head: Optional[torch.nn.Module]
    critic: Optional[Critic]
    value_modules: dict  # the value function as saved in value_head.pt (under --pp: on the last stage only)
    stage: Optional[torch.nn.Module]
    wrapper: torch.nn.Module  # the data-parallel wrapper of everything trained
    reference_wrapper: Optional[torch.nn.Module]  # ZeRO-3 shards a reference with weights of its own
    grid: parallel.Grid
    bf16: bool

    @property
    def head(self):
        return head_of(self.stage if self.stage is not None else self.policy)

    @property
    def saved(self) -> dict:
        """{file prefix: module} of what a checkpoint saves: the policy and the value function."""
        return {"policy": self.policy, "value": torch.nn.ModuleDict(self.value_modules)}

    def reference_gathered(self):
        return self.reference_wrapper.gathered() if self.reference_wrapper is not None else contextlib.nullcontext()

    def whole(self, model):
        """The model itself, or under --pp a whole copy gathered from its stages (every rank of the
        pipeline must call it): what generates and evaluates. The copy stays split over the
        tensor-parallel ranks, with its matmul weights in bf16 under --dtype bf16 (so it samples
        exactly what the policy computes), so it costs each rank about 1/tp of the model at 2 bytes
        per parameter while it lives; generating through the stages token by token would instead
        idle all stages but one at every token."""
        if self.stage is None:
            return model
        return parallel.pipeline_gathered_model(
            model, self.grid.tp_group, keep_tensor_parallel=True, matmul_dtype=torch.bfloat16 if self.bf16 else None
        )

    def trunk(self, model):
        """micro-batch -> the final hidden states of `model`, for the plain (unpipelined) passes."""
        return functools.partial(trunk_states, model)


def build_models(args: Args, grid, policy, states, device, dtype) -> Models:
    """Policy, reference and value function; everything trained goes in one container, wrapped once
    for data parallel (after a checkpoint's weights are loaded, so the wrapper shards those). Under
    --tp the policy is split first and the reference copied from the split policy (so Hydra's
    shares the frozen shards); under --pp both are then cut into the same stages."""
    pipelined = args.pp > 1
    if pipelined and args.zero_stage and policy.get_output_embeddings().weight is policy.get_input_embeddings().weight:
        fail(
            "a model with tied embeddings keeps a copy on the first and the last pipeline stage, which ZeRO-1/2 cannot "
            "shard; use --zero-stage 0 with --pp"
        )
    policy = parallel.tensor_parallel(policy, grid.tp_group)  # a no-op unless --tp > 1
    adapters = []
    if args.lora_rank > 0:
        adapters, reference = add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_target_modules), None
    elif args.num_layers_unfrozen > 0:
        reference = make_hydra(policy, args.num_layers_unfrozen)
    else:
        # A frozen full copy. Under --dtype bf16 the weights that only enter matmuls are stored in bf16: half their
        # memory, and at the first rollout the reference computes bitwise what the policy does under autocast, so
        # the KL is exactly 0 (a copy cast whole to bf16 would not be).
        reference = copy_model(policy).requires_grad_(False).eval()
        if args.dtype == "bf16":
            reference = parallel.cast_matmul_weights(reference, torch.bfloat16)
    value_head = critic = None
    if args.advantage == "gae" and args.value_model:
        critic = Critic(args.value_model, dtype).to(device)
    elif args.advantage == "gae":
        value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(device, dtype)
        torch.nn.init.zeros_(value_head.weight)  # V = 0 at the start: no prior opinion of any state
        torch.nn.init.zeros_(value_head.bias)
    # Each model that runs whole sequences splits them (a no-op unless --cp > 1 or --sequence-parallel);
    # after the reference is copied, which must not share the policy's split state.
    policy = parallel.split_sequences(policy, grid, args.sequence_parallel)
    if reference is not None:
        reference = parallel.split_sequences(reference, grid, args.sequence_parallel)
    if critic is not None:  # whole on every rank (not tensor-parallel): its heads split over the cp ranks alone
        critic.trunk = parallel.context_parallel(critic.trunk, grid.cp_group)
    value_modules = {name: m for name, m in (("value_head", value_head), ("critic", critic)) if m is not None}
    if states is not None:  # the models' dense states of a checkpoint (see main), in any layout
        # A tied head is saved once, as its embedding (see parallel.dense_tensors).
        missing = parallel.load_dense(policy, states[1]["policy"])
        assert all(k.endswith("lm_head.weight") for k in missing), missing
        torch.nn.ModuleDict(value_modules).load_state_dict(states[1]["value"])
    stage = None
    if pipelined:
        # This rank's stage of the policy, returning final-normed hidden states: the last stage
        # applies the LM head (through fused_logprobs) and holds the value head as a child, so the
        # data-parallel wrapper reduces and steps it with the stage.
        trained = stage = parallel.PipelineStage(policy, grid.pp_group, compute_logits=False)
        if reference is not None:
            reference = parallel.PipelineStage(reference, grid.pp_group, compute_logits=False)
        if stage.is_last and value_head is not None:
            stage.value_head = value_head
        else:
            value_modules = {}
    else:
        trained = torch.nn.ModuleDict({"policy": policy, **value_modules})
    wrapper = parallel.data_parallel(
        trained, grid.dp_cp_group, args.zero_stage, tp_group=grid.tp_group, pp_group=grid.pp_group
    )
    # Under ZeRO-3 a reference with weights of its own is sharded too and used only inside its
    # gathered(); Hydra's shares the frozen trunk with the policy, so only its copied top is wrapped.
    reference_wrapper = None
    if args.zero_stage == 3 and reference is not None:
        owned = hydra_owned(reference, policy) if args.num_layers_unfrozen > 0 else reference
        reference_wrapper = parallel.FullyShardedDataParallel(owned, grid.dp_cp_group)
    return Models(
        policy,
        reference,
        adapters,
        value_head,
        critic,
        value_modules,
        stage,
        wrapper,
        reference_wrapper,
        grid,
        args.dtype == "bf16",
    )


def micro_batches_of(micro_rows: list, input_ids, attention_mask, args: Args) -> list:
    """Micro-batches (each a tensor of row indices into the batch) in the form the passes take:
    every pipeline stage needs the mask and positions, and the loss the rows; --packing adds the packed rows."""
    return [
        {
            "input_ids": input_ids[rows],
            "attention_mask": attention_mask[rows],
            "position_ids": positions_from_mask(attention_mask[rows]),
            "rows": rows,
            "packed": pack(input_ids[rows], attention_mask[rows]) if args.packing else None,
        }
        for rows in micro_rows
    ]


def sample_chunks(
    models: Models, prompt_ids, prompt_mask, chunks: list, args: Args, tokenizer, end_ids, stream: str, autocast, env=()
) -> list:
    """(responses, their sampler log-probs) of this rank's chunks of the prompts, each chunk on a
    forked RNG seeded by (seed, stream, chunk), so the rollouts do not depend on the rank count;
    with env = (the --env class, the prompt rows, greedy) each chunk's episodes (play_episodes)."""
    models.policy.eval()
    sampler, generated = models.whole(models.stage if models.stage is not None else models.policy), []
    fork_devices = [models.grid.device] if models.grid.device.type == "cuda" else []
    with models.wrapper.gathered(), autocast:  # ZeRO-3: the whole policy gathered once for the decode loop
        for chunk, lo, hi in chunks:
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(chunk_seed(args.seed, stream, chunk))
                if env:
                    generated.append(play_episodes(sampler, env[1][lo:hi], args, tokenizer, end_ids, *env[::2]))
                else:
                    generated.append(generate(sampler, prompt_ids[lo:hi], prompt_mask[lo:hi], args, tokenizer, end_ids))
    models.policy.train()
    return generated


def call_env(function, *arguments, args: Args):
    """An --env method's result; a call that raises or runs past --env-timeout stops the run with one line."""

    def timed_out(*_):
        raise TimeoutError(f"did not return within --env-timeout {args.env_timeout:g} s")

    handler = signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, args.env_timeout)
    try:
        return function(*arguments)
    except Exception as error:
        fail(f"--env {args.env}: {function.__qualname__} failed ({type(error).__name__}: {error}); fix the environment")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)


def play_episodes(sampler, rows: list, args: Args, tokenizer, end_ids: list, env_class, greedy=False) -> list:
    """Multi-turn rollouts of one chunk (--env): an environment per row, and turns of the policy (one batched
    generate() over the episodes still running) and the environment until the environment ends the episode,
    --max-turns, or --max-new-tokens (the episode's budget after its opening). Each turn re-encodes every running
    conversation whole, left-padded, rather than carry the KV cache over the environment's tokens: simpler, and
    the cost is one prompt pass per turn. The policy's turns keep the ids sampled; the environment's messages
    enter as the chat template renders them: the ids the conversation's rendering grows by (the template's framing
    after the policy's end-of-turn id, then the new messages and the generation prompt). Returns per episode its
    opening's ids, the ids after it with their sampler log-probs, which are the policy's, and the step rewards
    (each on the last token of the turn that earned it), and whether the environment ended it."""

    def extend(episode: dict, ids: list, logprobs: list, by_policy: bool):
        """A stretch of the policy's tokens, or of the environment's (log-prob 0), with reward 0 until a step's."""
        episode["ids"] += ids
        episode["logprobs"] += logprobs
        episode["policy"] += [by_policy] * len(ids)
        episode["rewards"] += [0.0] * len(ids)

    envs = [call_env(env_class, row, args=args) for row in rows]
    episodes = [{"messages": call_env(env.reset, args=args), "ids": [], "logprobs": [], "policy": []} for env in envs]
    for episode in episodes:
        if not is_conversation(episode["messages"]) or "user" not in {m["role"] for m in episode["messages"]}:
            fail(f"--env {args.env}: reset() returned {episode['messages']!r:.100}; return messages, one a user's")
        opening = render(tokenizer, episode["messages"], generation_prompt=True)
        episode.update(prompt=opening[-args.max_prompt_length :], rewards=[], done=False)
    running = list(zip(envs, episodes))
    for _ in range(args.max_turns):
        rooms = [args.max_new_tokens - len(episode["ids"]) for _, episode in running]
        contexts = [episode["prompt"] + episode["ids"] for _, episode in running]
        prompt_ids, prompt_mask = pad_batch(contexts, tokenizer.pad_token_id, sampler.device, "left")
        turn_args = replace(args, max_new_tokens=max(rooms))
        generated, logprobs = generate(sampler, prompt_ids, prompt_mask, turn_args, tokenizer, end_ids, greedy)
        still = []
        for (env, episode), room, reply, reply_logprobs in zip(running, rooms, generated.tolist(), logprobs.tolist()):
            length = next((i + 1 for i, token in enumerate(reply[:room]) if token in end_ids), None)
            reply = reply[: length or room]
            extend(episode, reply, reply_logprobs[: len(reply)], by_policy=True)
            if length is None:  # out of budget
                continue
            message = {"role": "assistant", "content": tokenizer.decode(reply[:-1], skip_special_tokens=True)}
            result = call_env(env.step, message, args=args)
            valid = isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], (int, float))
            if not valid or not isinstance(result[2], bool) or not math.isfinite(result[1]):
                fail(f"--env {args.env}: step() returned {result!r:.100}; return (messages, a finite reward, a bool)")
            added, episode["rewards"][-1], episode["done"] = result
            if not (added == [] or is_conversation(added)) or {m["role"] for m in added} - {"user", "tool"}:
                fail(f"--env {args.env}: step() returned messages {added!r:.100}; return role user or tool messages")
            conversation = episode["messages"] + [message]
            before = render(tokenizer, episode["messages"], generation_prompt=True)
            replied = render(tokenizer, conversation)
            after = render(tokenizer, conversation + added, generation_prompt=True)
            if replied[: len(before)] != before or after[: len(replied)] != replied:
                fail(
                    f"--env {args.env}: the chat template rewrites earlier turns (its rendering of a conversation is "
                    "not a prefix of its continuation's); use a prefix-preserving template (--chat-template)"
                )
            turn = replied[len(before) :]
            framing = turn[next((i + 1 for i, token in enumerate(turn) if token in end_ids), len(turn)) :]
            increment = framing + after[len(replied) :]
            if episode["done"] or len(episode["ids"]) + len(increment) >= args.max_new_tokens:
                continue
            episode["messages"] = conversation + added
            extend(episode, increment, [0.0] * len(increment), by_policy=False)
            still.append((env, episode))
        running = still
        if not running:
            break
    return episodes


def episode_tensors(episodes: list, args: Args, pad_token_id: int, device, dtype) -> tuple:
    """The batch of --env episodes as the update takes it: (prompt ids and mask, the openings left-padded, then
    [B, --max-new-tokens] tensors: ids, mask of real tokens, mask of the policy's tokens, sampler log-probs, step
    rewards, and whether the environment ended each episode)."""
    prompt_ids, prompt_mask = pad_batch([e["prompt"] for e in episodes], pad_token_id, device, "left")

    def padded(key, fill, kind):
        rows = [e[key] + [fill] * (args.max_new_tokens - len(e[key])) for e in episodes]
        return torch.tensor(rows, dtype=kind, device=device)

    lengths = torch.tensor([len(e["ids"]) for e in episodes], device=device)
    real = torch.arange(args.max_new_tokens, device=device) < lengths[:, None]
    done = torch.tensor([e["done"] for e in episodes], device=device)
    ids, policy = padded("ids", pad_token_id, torch.long), padded("policy", False, torch.bool)
    logprobs, rewards = padded("logprobs", 0.0, dtype), padded("rewards", 0.0, dtype)
    return prompt_ids, prompt_mask, ids, real, policy, logprobs, rewards, done


def truncate_and_score(
    generated: list, chunks: list, prompts: list, prompt_ids, prompt_mask, reward: Reward, grid, dtype
):
    """Steps 2 and 3 on this rank's chunks, then gathered over the ranks in chunk order: (responses
    padded after their end-of-turn id, mask of real tokens, has an end id, sampler log-probs, scores,
    scored). The scores are normalised, and a response cut at --max-new-tokens pays the missing-EOS
    penalty. A response a --reward-fn gave None (scored False) stands at its group's mean score (the
    batch's when its whole group has none), so that it moves no statistic of the group; main takes it
    out of the loss."""
    local = []
    for (chunk, lo, hi), (chunk_generated, chunk_logprobs) in zip(chunks, generated):
        _, scores = reward.of_chunk(prompts[lo:hi], prompt_ids[lo:hi], prompt_mask[lo:hi], chunk_generated)
        local.append((chunk_generated.cpu(), chunk_logprobs.cpu(), scores))
    shares = [part for share in parallel.all_gather_objects(local, grid.dp_cp_group) for part in share]
    sampler_logprobs = torch.cat([lp for _, lp, _ in shares]).to(grid.device, dtype)
    generated = torch.cat([g for g, _, _ in shares]).to(grid.device)
    responses, mask, has_eos = truncate_at_eos(generated, reward.end_ids, reward.tokenizer.pad_token_id)
    group = torch.cat([s for _, _, s in shares]).view(-1, reward.args.samples_per_prompt)
    if group.isnan().all():
        fail(f"--reward-fn {reward.args.reward_fn} returned None for every response of a batch; score some of them")
    scores = torch.where(group.isnan(), group.nanmean(-1, keepdim=True), group).nan_to_num(group.nanmean().item())
    scores = reward.normalized(scores.view(-1), verbose=grid.is_main)
    scores = scores - reward.missing_eos_penalty * (~has_eos).cpu().to(scores.dtype)
    return responses, mask, has_eos, sampler_logprobs, scores, ~group.isnan().view(-1).to(grid.device)


@torch.no_grad()
def rollout_logprobs(models: Models, micro_batches: list, prompt_length: int, args: Args, dtype, autocast) -> tuple:
    """(old log-probs, reference log-probs, old values or None) of the whole batch [B, T]. This rank
    fills the rows of its micro-batches (on the last stage under --pp) and sums over the ranks
    fill the rest, so every rank ends with the whole batch."""
    critic_free, trainer = args.advantage != "gae", args.old_logprobs == "trainer"
    device = micro_batches[0]["input_ids"].device
    rollout = torch.zeros(2 if critic_free else 3, args.batch_size, args.max_new_tokens, dtype=dtype, device=device)

    def policy_outputs(hidden, micro_batch):
        rows, input_ids = micro_batch["rows"], micro_batch["input_ids"]
        if trainer:  # with the entropies, as the training pass: bit for bit the same computation
            logprobs, _, _ = logprobs_from_hidden(models.head, hidden, input_ids, prompt_length, args.temperature, True)
            rollout[0, rows] = upcast(logprobs)
        if not critic_free:
            states = None if hidden is None else hidden[:, prompt_length - 1 : -1]
            rollout[2, rows] = values_of(models, states, micro_batch, prompt_length)

    def reference_outputs(hidden, micro_batch):
        logprobs, _, _ = logprobs_from_hidden(
            head_of(reference), hidden, micro_batch["input_ids"], prompt_length, args.temperature
        )
        rollout[1, micro_batch["rows"]] = upcast(logprobs)

    reference = models.reference if models.reference is not None else models.policy  # LoRA: the adapters switched off
    with models.wrapper.gathered(), models.reference_gathered(), autocast:
        needed = trainer or models.value_head is not None  # the policy's hidden states
        trunk = models.trunk(models.policy) if needed else lambda micro_batch: None
        parallel.forward_only(models.wrapper, micro_batches, policy_outputs, trunk)
        with adapters_disabled(models.adapters):
            parallel.forward_only(reference, micro_batches, reference_outputs, models.trunk(reference))
    parallel.all_reduce_sum(rollout, models.grid.dp_group)
    parallel.all_reduce_sum(rollout, models.grid.pp_group)
    return rollout[0], rollout[1], None if critic_free else rollout[2]


@torch.no_grad()
def evaluate(
    models: Models, reward: Reward, eval_prompts: list, tokenizer, args: Args, update: int, autocast, dtype
) -> tuple:
    """Scores of greedy and sampled responses to held-out prompts, their KL to the reference, and
    (with a reward model) the win rate against the reference policy's own samples. The prompts
    are cut into chunks as in training, each chunk sampled with a fixed seed of its own on a
    forked RNG (so evaluation never changes training, evaluations compare, and the result does
    not depend on the number of ranks); ranks evaluate their chunks and gather the results.
    The models are gathered once (a no-op below ZeRO-3), so ranks may run different numbers
    of forwards without per-block collectives; under --pp whole copies are gathered from the
    stages, and the ranks of a pipeline evaluate the same chunks. Returns (metrics, sample rows)."""
    grid, policy, device = models.grid, models.policy, next(models.policy.parameters()).device
    metrics, rows = {}, []
    repeats = args.eval_samples_per_start if args.task == "randomwalks" else args.eval_samples
    if args.env:  # episodes (sample_chunks gathers the sampler), scored by their summed step rewards
        for name, greedy, copies in (("greedy", True, 1), ("sampled", False, repeats)):
            prompts = [p for p in eval_prompts for _ in range(copies)]
            chunks = deal_chunks(len(prompts), args.generation_batch_size, grid.dp_size, grid.dp_rank)
            env = (reward.env_class, prompts, greedy)
            samples = sample_chunks(
                models, None, None, chunks, args, tokenizer, reward.end_ids, f"eval {name}", autocast, env
            )
            episodes = [e for share in parallel.all_gather_objects(samples, grid.dp_group) for c in share for e in c]
            metrics[f"eval/score_{name}"] = float(np.mean([sum(e["rewards"]) for e in episodes]))
            turns = [sum(now and not then for now, then in zip(e["policy"], [False] + e["policy"])) for e in episodes]
            metrics[f"eval/turns_{name}"] = float(np.mean(turns))
        return metrics, []

    policy.eval()
    sampler = models.whole(models.stage if models.stage is not None else policy)
    # Under LoRA the reference is the policy itself, its adapters off inside adapters_disabled.
    reference_sampler = policy if models.reference is None else models.whole(models.reference)
    fork_devices = [device] if device.type == "cuda" else []

    def reference_logprobs(input_ids, attention_mask, prompt_length):
        with adapters_disabled(models.adapters):
            return response_logprobs(reference_sampler, input_ids, attention_mask, prompt_length, args.temperature)[0]

    with models.wrapper.gathered(), models.reference_gathered(), torch.random.fork_rng(devices=fork_devices), autocast:
        for name, greedy, copies in (("greedy", True, 1), ("sampled", False, repeats)):
            prompts = [p for p in eval_prompts for _ in range(copies)]
            all_prompt_ids, all_prompt_mask = encode_prompts(tokenizer, prompts, args.max_prompt_length, device)
            local = []
            for chunk, lo, hi in deal_chunks(len(prompts), args.generation_batch_size, grid.dp_size, grid.dp_rank):
                torch.manual_seed(chunk_seed(args.seed, f"eval {name}", chunk))
                chunk_prompts, prompt_ids, prompt_mask = prompts[lo:hi], all_prompt_ids[lo:hi], all_prompt_mask[lo:hi]
                generated, _ = generate(sampler, prompt_ids, prompt_mask, args, tokenizer, reward.end_ids, greedy)
                responses, mask, _ = truncate_at_eos(generated, reward.end_ids, tokenizer.pad_token_id)
                texts, ours = reward.of_chunk(chunk_prompts, prompt_ids, prompt_mask, generated)
                result = {"text": texts, "score": reward.normalized(ours).tolist(), "length": mask.sum(-1).tolist()}
                if args.task == "randomwalks":
                    result["optimality"] = reward.optimality(chunk_prompts, texts)
                if args.task == "sentiment":  # the task's metric, whatever the reward
                    result["vader"] = sentiment_scores(texts, dtype).tolist()
                if name == "sampled":
                    input_ids, prompt_length = torch.cat([prompt_ids, responses], 1), prompt_ids.shape[1]
                    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
                    logprobs = response_logprobs(sampler, input_ids, attention_mask, prompt_length, args.temperature)[0]
                    kl = kl_per_token(logprobs, reference_logprobs(input_ids, attention_mask, prompt_length), "k1")
                    result["kl"] = torch.where(mask, kl, 0.0).sum(-1).tolist()
                    if reward.model is not None:  # the trlX paper's metric: wins against the reference policy
                        with adapters_disabled(models.adapters):
                            theirs, _ = generate(
                                reference_sampler, prompt_ids, prompt_mask, args, tokenizer, reward.end_ids
                            )
                        theirs = reward.of_chunk(chunk_prompts, prompt_ids, prompt_mask, theirs)[1]
                        result["win"] = ((ours > theirs).to(dtype) + 0.5 * (ours == theirs).to(dtype)).tolist()
                local.append(result)
            # In chunk order.
            results = [result for share in parallel.all_gather_objects(local, grid.dp_group) for result in share]

            def joined(key):
                return [value for result in results for value in result[key]]

            def mean(key):  # nanmean: a response a --reward-fn gave None has no score to average
                return torch.tensor(joined(key), dtype=dtype).nanmean().item()

            metrics.update(
                {f"eval/{key}_{name}": mean(key) for key in ("score", "optimality", "vader") if key in results[0]}
            )
            texts = joined("text")
            if args.task == "arithmetic":
                lengths = joined("length")
                metrics.update(arithmetic_metrics(name, texts, [p["answer"] for p in prompts], lengths, copies))
            if name == "sampled":
                metrics["eval/kl"] = mean("kl")
                if reward.model is not None:
                    metrics["eval/win_rate"] = mean("win")
                rows = [[update, str(p["prompt"]), t] for p, t in zip(prompts[:16], texts[:16])]
    policy.train()
    return metrics, rows


# ---------------------------------------------------------------------------------------------
# Plumbing of the loop: timing, statistics, checkpoints, resume
# ---------------------------------------------------------------------------------------------
def allocate_adamw_state(optimizer: torch.optim.AdamW):
    """A fused AdamW's state, made before the loop as its first step would make it. Allocated before what every update
    frees and takes back, it keeps those from fragmenting a CPU heap around it."""
    for parameter in (p for group in optimizer.param_groups for p in group["params"]):
        zeros = dict(exp_avg=torch.zeros_like(parameter), exp_avg_sq=torch.zeros_like(parameter))
        optimizer.state[parameter].update(step=torch.zeros((), dtype=torch.float32, device=parameter.device), **zeros)


class PhaseTimer:
    """Seconds of each phase of an update, read after the device's queued work (time/*_s in the log)."""

    def __init__(self, device):
        self.device, self.seconds = device, {}
        self.started = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, phase: str):
        now = self.now()
        self.seconds[f"time/{phase}_s"], self.started = now - self.started, now


def gather_statistics(tally: dict, grid, micro_per_share: int, pipelined: bool) -> dict:
    """The update's mean of each micro-batch statistic, gathered once, in the order one process
    would have produced them (each minibatch's micro-batches, rank by rank), and the largest
    first-minibatch log-ratio of any rank. Under --pp the last stage has them."""
    mine = (tally["statistics"], tally["first_ratio"])
    if pipelined:
        mine = parallel.all_gather_objects(mine, grid.pp_group)[-1]
    per_rank = parallel.all_gather_objects(mine, grid.dp_group)
    statistics = [
        s
        for group in range(0, len(mine[0]), micro_per_share)
        for rank_stats, _ in per_rank
        for s in rank_stats[group : group + micro_per_share]
    ]
    # A micro-batch with nothing to train on (--drop-equal-groups) recorded none: it is left out of the means.
    keys = dict.fromkeys(k for s in statistics for k in s)
    metrics = {k: float(np.mean([s[k] for s in statistics if k in s])) for k in keys}
    metrics["policy/first_minibatch_max_log_ratio"] = max(ratio for _, ratio in per_rank)
    return metrics


def update_metrics(batch: dict, score_mean: float, kl: float, has_eos, gap: float) -> dict:
    """What an update logs beside the loss statistics: the objective and, with a critic, how much of
    the returns' variance the old values explain."""
    mask, dtype = batch["mask"], batch["old_logprobs"].dtype
    metrics = {
        "objective/score": score_mean,
        "objective/kl": kl,
        "objective/kl_coef": batch["beta"],
        "objective/eos_fraction": has_eos.to(dtype).mean().item(),
        "objective/unscored_fraction": 1 - batch["scored"].to(dtype).mean().item(),
        "objective/response_length": mask.sum(-1).to(dtype).mean().item(),
        "policy/sampler_logprob_gap": gap,
    }
    if batch["dropped_fraction"] is not None:
        metrics["objective/dropped_group_fraction"] = batch["dropped_fraction"]
    if batch["returns"] is not None:
        real_returns, real_values = batch["returns"][mask], batch["old_values"][mask]
        unexplained = (real_returns - real_values).var() / real_returns.var().clamp(min=1e-8)
        metrics["value/explained_variance"] = (1 - unexplained).item()
    return metrics


def micro_batch_loss(
    hidden, micro_batch, models: Models, batch: dict, args: Args, normaliser: float, first_minibatch: bool, tally: dict
):
    """Step 8 for one micro-batch, from the policy's final hidden states: the PPO loss (clipped
    policy loss, clipped value loss, under GRPO the k3 KL term), the entropy bonus, all
    aggregated over real tokens with the whole minibatch's normaliser; statistics go to tally
    (none from a micro-batch whose rows --drop-equal-groups dropped). Multiplied by the rank
    count, since the data-parallel wrapper averages gradients over ranks."""
    rows, critic_free = micro_batch["rows"], args.advantage != "gae"
    logprobs, entropy, hidden = logprobs_from_hidden(
        models.head, hidden, micro_batch["input_ids"], batch["prompt_length"], args.temperature, with_entropy=True
    )
    values = None if critic_free else values_of(models, hidden, micro_batch, batch["prompt_length"])
    logprobs, entropy, mask = upcast(logprobs), upcast(entropy), batch["loss_mask"][rows]
    old_logprobs = batch["old_logprobs"][rows]
    loss, stats = ppo_losses(
        logprobs,
        old_logprobs,
        batch["advantages"][rows],
        values,
        None if critic_free else batch["old_values"][rows],
        None if critic_free else batch["returns"][rows],
        mask,
        args,
        normaliser,
        batch["ref_logprobs"][rows] if args.advantage == "grpo" else None,
        batch["beta"],
        batch["is_weights"][rows],
    )
    if args.entropy_coef:
        loss = loss - args.entropy_coef * aggregate(entropy, mask, args.loss_aggregation, normaliser)
    stats["policy/entropy"] = kernels.masked_mean(entropy, mask)
    tally["statistics"].append({k: float(v.detach()) for k, v in stats.items()} if mask.any() else {})
    tally["loss"].add_(loss.detach())
    if first_minibatch:  # exactly 0 unless old and new log-probs were computed differently
        tally["first_ratio"] = max(
            tally["first_ratio"], torch.where(mask, logprobs - old_logprobs, 0.0).abs().max().item()
        )
    return loss * models.grid.dp_size


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main(args: Args):
    # Flags, processes, sizes (plumbing). Prompts per batch times samples per prompt is the batch;
    # batch and minibatch sizes count all ranks' rollouts.
    args = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    grid = parallel.init_distributed(args.device, tp=args.tp, pp=args.pp, cp=args.cp)
    device, ranks, critic_free = grid.device, grid.dp_size, args.advantage != "gae"
    local_mini_batch_size = args.mini_batch_size // ranks  # each rank's share of a minibatch
    generation_chunk = min(args.generation_batch_size, args.batch_size)
    sampling_rank = grid.dp_rank * grid.cp_size + grid.cp_rank  # this rank's place in dp_cp_group
    # The trained weights, the value function and every tensor of the update; under bf16 autocast
    # the forward runs in bf16 and its outputs are upcast to this.
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    if grid.is_main:
        print(
            f"batch {args.batch_size} = {args.batch_size // args.mini_batch_size} minibatch(es) of "
            f"{args.mini_batch_size}; minibatch {args.mini_batch_size} = {ranks} data-parallel rank(s) x "
            f"{local_mini_batch_size // args.micro_batch_size} micro-batch(es) of {args.micro_batch_size}"
        )
        chunks_per_batch = math.ceil(args.batch_size / generation_chunk)
        if chunks_per_batch % ranks:
            print(
                f"note: the {chunks_per_batch} generation chunk(s) of --generation-batch-size {generation_chunk} do "
                f"not spread evenly over {ranks} ranks, so some ranks idle while others generate; a "
                f"--generation-batch-size that divides {args.batch_size // ranks} avoids it"
            )
    # --resume: the checkpoint's states, with the models' dense states (loaded once the models are built).
    checkpoint = parallel.find_checkpoint(args.resume, verbose=grid.is_main) if args.resume else None
    states = parallel.load_checkpoint(checkpoint, grid, asdict(args)) if checkpoint else None
    if states:
        states[1].update({name: dict(parallel.stored_tensors(checkpoint, name)) for name in ("policy", "value")})
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # The prompts, the policy, the reward, and the models of the layout.
    train_prompts, eval_prompts = task_prompts(args)
    policy, tokenizer = load_policy(args.model, device, dtype)
    use_chat_template(tokenizer, args.chat_template, train_prompts, args.model)
    end_ids = end_of_turn_ids(tokenizer, policy.generation_config)  # a response ends at any of them
    reward = Reward(args, tokenizer, end_ids, device, dtype, verbose=grid.is_main)
    models = build_models(args, grid, policy, states, device, dtype)
    # fused: one kernel for all parameters, about 4x faster than the default per-tensor loop on CPU
    # (benchmarks/vs_trl.py)
    optimizer = models.wrapper.make_optimizer(torch.optim.AdamW, lr=args.learning_rate, weight_decay=0.0, fused=True)
    allocate_adamw_state(optimizer)  # a resume replaces it
    kl_controller = KLController(args.init_kl_coef, args.target_kl, args.kl_horizon)
    score_moments = RunningMoments()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    # The run directory; a resumed run continues in its checkpoint's directory with every state restored.
    trained = (optimizer, models.wrapper, models.saved)  # what the optimizer steps, as checkpoints save it
    state, run_name, run_dir = parallel.open_run(checkpoint, args, grid, trained, None, states)
    update, wandb_id = (state["update"], state["wandb_id"]) if state else (0, None)
    if state:
        kl_controller.value = state["kl_coef"]
        score_moments.__dict__.update(state["score_moments"])
        reward.norm.update(state["reward_norm"])
    states = None  # the model states are loaded; let them go
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track and grid.is_main else None

    def micro_batch_rows(minibatch: list) -> list:
        """This rank's share of a minibatch (a list of row indices), cut into micro-batches."""
        share = minibatch[grid.dp_rank * local_mini_batch_size : (grid.dp_rank + 1) * local_mini_batch_size]
        return [
            torch.tensor(share[i : i + args.micro_batch_size], device=device)
            for i in range(0, local_mini_batch_size, args.micro_batch_size)
        ]

    models.policy.train()  # dropout is off (without_dropout) in every forward pass that PPO compares
    progress = tqdm.tqdm(
        total=args.num_updates,
        initial=update,
        desc="ppo",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not grid.is_main,
    )
    metrics, started, start_update = {}, time.time(), update
    parallel.catch_stop_signals()
    while update < args.num_updates:
        timer = PhaseTimer(device)
        # 1. Generate. Every rank encodes all prompts (so the padding is the single-process one)
        #    and samples its chunks; the responses (max_new_tokens wide) are gathered below.
        prompts = batch_prompts(train_prompts, update, args)
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, args.max_prompt_length, device)
        # Context-parallel ranks hold whole weights: they share the sampling as data-parallel ranks do.
        my_chunks = deal_chunks(args.batch_size, generation_chunk, ranks * grid.cp_size, sampling_rank)
        env = (reward.env_class, prompts, False) if args.env else ()
        samples = sample_chunks(
            models, prompt_ids, prompt_mask, my_chunks, args, tokenizer, end_ids, f"update {update}", autocast, env
        )
        timer.lap("generation")

        # 2-3. Truncate at the first end-of-turn id (what follows is padding, outside every loss and
        #      statistic) and score; each rank its chunks, then all are gathered in chunk order. An
        #      --env episode holds the environment's tokens too (`real`, attended to), and its step
        #      rewards where they were earned (`placed`); only the policy's tokens (`mask`) are trained.
        if args.env:
            episodes = [e for share in parallel.all_gather_objects(samples, grid.dp_cp_group) for c in share for e in c]
            prompt_ids, prompt_mask, responses, real, mask, sampler_logprobs, placed, has_eos = episode_tensors(
                episodes, args, tokenizer.pad_token_id, device, dtype
            )
            scores, scored = placed.sum(-1), torch.ones(args.batch_size, dtype=torch.bool, device=device)
        else:
            responses, mask, has_eos, sampler_logprobs, scores, scored = truncate_and_score(
                samples, my_chunks, prompts, prompt_ids, prompt_mask, reward, grid, dtype
            )
            real, placed = mask, None
        prompt_length = prompt_ids.shape[1]
        input_ids, attention_mask = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, real.long()], 1)
        raw_mean = scores.mean().item()
        timer.lap("scoring")

        # 4. Log-probs under the policy and the reference (at the sampling temperature), and values,
        #    computed in the micro-batches and order of the first PPO epoch, so that the first
        #    minibatch repeats bitwise the same computation: its ratio is exactly 1.
        permutations = [torch.randperm(args.batch_size).tolist() for _ in range(args.ppo_epochs)]
        first_epoch = [
            rows
            for start in range(0, args.batch_size, args.mini_batch_size)
            for rows in micro_batch_rows(permutations[0][start : start + args.mini_batch_size])
        ]
        old_logprobs, ref_logprobs, old_values = rollout_logprobs(
            models, micro_batches_of(first_epoch, input_ids, attention_mask, args), prompt_length, args, dtype, autocast
        )
        old_logprobs = old_logprobs if args.old_logprobs == "trainer" else sampler_logprobs
        # Rounding when sampler and trainer agree; more means sampling went off-policy (or --top-k/p cut mass).
        sampler_logprob_gap = torch.where(mask, (sampler_logprobs - old_logprobs).abs(), 0.0).max().item()
        is_weights, is_stats = importance_weights(old_logprobs, sampler_logprobs, mask, args.is_correction, args.is_cap)
        timer.lap("logprobs")

        # 5. Per-token KL to the reference and the coefficient that weighs it (from here on every
        #    rank computes the same numbers over the whole batch).
        kl = kl_per_token(old_logprobs, ref_logprobs, args.kl_estimator)
        beta = kl_controller.value
        sequence_kl = torch.where(mask, old_logprobs - ref_logprobs, 0.0).sum(-1).mean().item()

        # 6. Optional reward scaling by the running std of scores (the mean is never shifted).
        scores = scores.to(device)
        if args.scale_rewards:
            score_moments.update(scores)
            scores, placed = (x if x is None else x / max(score_moments.std, 1e-8) for x in (scores, placed))

        # 7. Advantages: GAE on real tokens with a critic, or a critic-free estimator; returns before whitening.
        returns = None
        if critic_free:
            advantages = critic_free_advantages(
                args.advantage, scores, kl, mask, beta, args.samples_per_prompt, args.gamma, args.grpo_scale_by_std
            )
        else:
            rewards = token_rewards(scores if placed is None else placed, kl, mask, beta)
            advantages, returns = kernels.gae(old_values, rewards, mask, args.gamma, args.lam)
            advantages = kernels.masked_whiten(advantages, mask)
        # DAPO's dynamic sampling as a filter: groups of equal scores leave the loss and its statistics;
        # so does every response a --reward-fn gave no score.
        loss_mask, dropped = drop_equal_groups(scores, mask, args.samples_per_prompt, enabled=args.drop_equal_groups)
        loss_mask = loss_mask & scored[:, None]

        # 8. PPO epochs over shuffled minibatches, each rank its share of each in micro-batches.
        #    The loss is normalised by the whole minibatch's count of tokens (or sequences), so
        #    accumulating the micro-batches and ranks gives the one-process step.
        batch = dict(prompt_length=prompt_length, mask=mask, advantages=advantages, returns=returns, beta=beta)
        batch.update(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=old_values)
        batch.update(loss_mask=loss_mask, dropped_fraction=dropped, scored=scored, is_weights=is_weights)
        tally = {"statistics": [], "first_ratio": 0.0, "loss": torch.zeros(1, dtype=torch.float64, device=device)}
        update_loss = functools.partial(micro_batch_loss, models=models, batch=batch, args=args, tally=tally)
        for epoch, permutation in enumerate(permutations):
            for start in range(0, args.batch_size, args.mini_batch_size):
                minibatch = permutation[start : start + args.mini_batch_size]
                normaliser = loss_normaliser(loss_mask[minibatch], args.loss_aggregation, args.max_new_tokens)
                if normaliser == 0:  # every row dropped: no step (Adam's momentum would still move the weights)
                    continue
                loss_fn = functools.partial(
                    update_loss, normaliser=normaliser, first_minibatch=epoch == 0 and start == 0
                )
                micro_batches = micro_batches_of(micro_batch_rows(minibatch), input_ids, attention_mask, args)
                parallel.forward_backward(models.wrapper, micro_batches, loss_fn, models.trunk(models.policy), autocast)
                # The minibatch's loss summed over the ranks (a pipeline's last stage has it), and the tally reset.
                loss = parallel.all_reduce_sum(parallel.all_reduce_sum(tally["loss"], grid.dp_group), grid.pp_group)
                loss = loss.item()
                tally["loss"].zero_()
                grad_norm = models.wrapper.clip_grad_norm_(args.max_grad_norm)
                where = f"update {update + 1} (PPO epoch {epoch + 1}, minibatch {start // args.mini_batch_size + 1})"
                if not math.isfinite(loss) or not torch.isfinite(grad_norm):  # every rank sees the same sums
                    fail(
                        f"the loss is {loss} and the gradient norm {float(grad_norm)} at {where}, so the step would "
                        "wreck the policy; lower --learning-rate, or bound the reward (--reward-clip, --scale-rewards)"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        kl_controller.update(sequence_kl, args.batch_size)
        update += 1
        timer.lap("training")  # advantages and the PPO epochs

        # Statistics of the update, gathered once; evaluation; checkpoint (plumbing).
        metrics = gather_statistics(tally, grid, local_mini_batch_size // args.micro_batch_size, args.pp > 1)
        metrics.update(update_metrics(batch, raw_mean, sequence_kl, has_eos, sampler_logprob_gap))
        metrics.update(
            {"time/updates_per_s": (update - start_update) / (time.time() - started)}, **timer.seconds, **is_stats
        )
        progress.update(1)
        progress.set_postfix(score=f"{raw_mean:.3f}", kl=f"{sequence_kl:.3f}")
        if update % args.eval_every == 0 or update == args.num_updates:
            eval_metrics, eval_rows = evaluate(models, reward, eval_prompts, tokenizer, args, update, autocast, dtype)
            metrics.update(eval_metrics)
            if grid.is_main:
                progress.write(f"update {update}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in eval_metrics.items()))
            if wandb_run:  # the evaluation's samples
                import wandb

                metrics["samples"] = wandb.Table(columns=["update", "prompt", "response"], data=eval_rows)
        if wandb_run:
            wandb_run.log(metrics, step=update)
        stop = update < args.num_updates and parallel.stop_requested(grid)  # SIGTERM: checkpoint and exit 0
        if stop or args.save_every and update % args.save_every == 0 and update < args.num_updates:
            # Everything an exact resume needs: the models streamed to rank 0, which writes them whole.
            shared = {
                "update": update,
                "kl_coef": kl_controller.value,
                "score_moments": dict(score_moments.__dict__),
                "reward_norm": dict(reward.norm),
                "args": asdict(args),
                "run_name": run_name,
                "wandb_id": wandb_run.id if wandb_run else None,
            }
            files = {name: parallel.dense_tensors(m, models.wrapper, grid) for name, m in trained[2].items()}
            config = (tokenizer,) if args.lora_rank else (models.policy, tokenizer)  # parallel.export takes them
            name, keep = f"step_{update:08d}", args.keep_checkpoints
            parallel.save_checkpoint(run_dir, name, grid, keep, shared, files, config, trained)
        if stop:
            return parallel.report_stop(run_dir, grid, f"update {update}")
    progress.close()

    # The result: the policy with adapters merged, loadable by plain transformers; the value function
    # apart in value_head.pt ({name: state dict}, written by rank 0 from the last pipeline stage's).
    value_states = {}
    for key, tensor in parallel.dense_tensors(torch.nn.ModuleDict(models.value_modules), models.wrapper, grid):
        name, _, rest = key.partition(".")
        value_states.setdefault(name, {})[rest] = tensor.to("cpu", copy=True)
    with models.wrapper.gathered() if args.lora_rank else contextlib.nullcontext():  # merging copies the LoRA model
        policy = merge_lora(models.policy)
    weights = {"model": parallel.dense_tensors(policy, models.wrapper, grid)}
    parallel.save_final(
        run_dir, grid, weights, (policy, tokenizer), {"value_head.pt": value_states} if value_states else {}
    )
    if not grid.is_main:
        return
    summary = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    last_update = {k: v for k, v in metrics.items() if not k.startswith("eval/") and k != "samples"}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump({"update": update, **summary, "last_update": last_update}, file, indent=1)
    print(
        f"saved {run_dir} after {update} updates in {time.time() - started:.0f}s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
    )
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()


if __name__ == "__main__":
    with parallel.clean_exit():
        main(tyro.cli(Args))
