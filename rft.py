"""Rejection-sampling fine-tuning (RFT): sample, keep the best, fine-tune on them, repeat.

The simplest way to improve a policy against a reward: for each prompt draw many responses from
the policy itself, score them, keep those that score at or above a percentile of their prompt's
scores, and fine-tune on the kept (prompt, response) pairs with the supervised loss of sft.py
(cross-entropy on the response tokens; the prompt is context). The next round samples from the
improved policy, and its threshold is higher. One round, as the numbered steps of `main`:
  1. sample --samples-per-prompt responses to every training prompt (with --env, episodes of turns);
  2. score them (randomwalks: the walk's optimality; sentiment: VADER; text tasks: --reward-model
     or --reward-fn; --env: the summed step rewards);
  3. select, per prompt, the samples at or above the --start-percentile .. --end-percentile
     threshold of the round (the percentile rises linearly over the rounds);
  4. fine-tune on them for --epochs-per-round epochs;
  5. evaluate.

    python sft.py --output-dir runs/sft      # behaviour cloning first
    python rft.py --model runs/sft           # randomwalks against the true optimality
    python rft.py --task sentiment --model runs/smollm2-135m --max-new-tokens 24 --samples-per-prompt 8
    python rft.py --task jsonl --data prompts.jsonl --model gpt2 --reward-model runs/rm
    torchrun --nproc_per_node 8 rft.py --model ... --zero-stage 3   # data parallel, see parallel.py

The method is trlX's RFT trainer (trlx/trainer/accelerate_rft_trainer.py), which implements the
Grow and Improve steps of ReST (Gulcehre et al., 2023, "Reinforced Self-Training (ReST) for
Language Modeling"); it is also RAFT (Dong et al., 2023, "RAFT: Reward rAnked FineTuning for
Generative Foundation Model Alignment"), and an instance of expert iteration (Anthony et al., 2017:
the policy imitates an expert that improves on it; here the expert is best-of-many sampling under
the reward). Like trlX, the threshold is a quantile (np.quantile, linear interpolation) of each prompt's
own scores, so a prompt that is hard for the policy still contributes its best responses, and
identical kept samples are not de-duplicated (trlX does not: a response drawn twice weighs twice,
as it does in the policy's distribution). Where this script differs from trlX, on purpose:
  - a sample is kept when its score is at or above the threshold; trlX adds 1e-6 to the threshold,
    which drops ties, so a prompt whose best score is shared by more than 1 - percentile of its
    samples (an easy prompt: say 40% of the walks optimal at percentile 0.7) keeps none. Here such
    a prompt keeps its best; but a prompt whose samples all score the same keeps none, as in trlX:
    the tie says nothing of which response is better, and a prompt whose 64 walks all fail would
    otherwise put 64 failures into the fine-tuning set;
  - the percentile rises from --start-percentile at round 0 to --end-percentile at the last round;
    trlX raises it over the improve steps of one grow step and starts again at the next;
  - each round fine-tunes on its own samples; trlX keeps every grow step's samples in its pool;
  - the loss covers response tokens only, as in sft.py; trlX's covers the prompt too.

Under torchrun every rank gathers every score and selects the same samples, which do not depend on
the number of ranks (see `sample_and_score`); fine-tuning then splits each batch over the ranks as
sft.py does. N ranks compute the one-process run up to float rounding.

Reading order. `main` (at the bottom) is the round's steps 1-5, each a call or two. The pieces of
the method come first after the flags: `percentile_at` and `select` (step 3), then the loss of
sft.py (`completion_loss_sum`, `accumulate_gradients`) and `fine_tune` (step 4). Then, in file
order: the randomwalks task; prompts; rewards (`Reward`); `generate`, `sample_and_score` and
`play_episodes` (steps 1 and 2); `evaluate` (step 5); run directory, checkpoints and logging
(plumbing).
"""

import contextlib
import functools
import gzip
import hashlib
import importlib
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
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
import tqdm
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import kernels
import parallel


@dataclass
class Args:
    exp_name: str = "rft"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (sampling, data order, dropout): any integer from 0"""
    task: Literal["randomwalks", "sentiment", "jsonl", "hh", "tldr", "arithmetic"] = "randomwalks"
    """randomwalks: the 20 start letters, scored by the walk's optimality; sentiment: openings of movie reviews
    (examples/sentiment_prompts.jsonl, or --data) scored by VADER's compound score of the reply (the optional extra
    vaderSentiment) unless a reward is given (VADER is then still reported as eval/vader_*); jsonl: prompt-only records
    from --data; hh: Anthropic/hh-rlhf prompts; tldr: Reddit TL;DR posts (hh and tldr download from the hub unless
    --data is given; jsonl, hh and tldr need --reward-model or --reward-fn); arithmetic: integer problems from --seed
    as a user message for a chat model, rewarded for the right answer, the last integer of the reply (--train-problems,
    --operands, --digits, --operations, --format-reward). Every task's prompts become prompt-only records, read by one
    code path"""
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
    """a reward_model.py run directory (or any sequence-classification model with num_labels=1): its raw score ranks
    the samples"""
    reward_fn: Optional[str] = None
    """`module:function` (or `path/file.py:function`) called as TRL's reward functions are, once per generation chunk:
    f(prompts, completions, **columns), prompts and completions message lists for conversational data (a completion
    is [{"role": "assistant", "content": reply}]) and strings otherwise, every other column of the rows a keyword
    argument (a list, one value per sample); returns one float per sample, or None for no score: that sample is never
    kept and its prompt's threshold is the quantile of the others' scores (samples/unscored_fraction counts them; all
    None in a round is an error). A function of exactly two parameters is called f(prompts, responses)"""
    env: Optional[str] = None
    """a multi-turn environment, `module:Class` (or `path/file.py:Class`) or `calculator` (CalculatorEnv): each prompt
    row becomes Class(row), whose reset() gives the opening messages and step(reply) the messages that follow, the
    step's reward and whether the episode is over (README); policy and environment take turns until then, --max-turns,
    or --max-new-tokens (with --env the budget of the whole episode after its opening). It replaces the reward: an
    episode scores the sum of its step rewards, and a kept one is fine-tuned on the policy's turns alone"""
    max_turns: int = 4
    """--env: policy turns per episode at most"""
    env_timeout: float = 60.0
    """--env: seconds a reset() or step() call may take; one that has not returned by then stops the run"""
    dtype: Literal["fp32", "bf16", "fp64"] = "fp32"
    """fp32; bf16: autocast for the forward passes (weights and optimizer stay fp32); fp64: weights and every
    computation in float64, slow, for checking that two layouts compute the same math (the tests compare runs this
    way)"""
    device: str = "auto"
    """torch device; auto picks cuda when present, else cpu"""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage under torchrun: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also
    parameters"""
    tp: int = 1
    """tensor-parallel ranks per model copy under torchrun (attention heads, MLP and vocabulary split over them; data
    parallel takes the remaining ranks)"""
    pp: int = 1
    """pipeline stages: only 1 (rft.py does not pipeline; use --tp, --cp and ZeRO to split a large model)"""
    cp: int = 1
    """context-parallel ranks per model copy under torchrun (Ulysses: each holds 1/cp of every sequence through the
    whole model while fine-tuning; sampling is not split, the cp ranks share it as data-parallel ranks do)"""
    sequence_parallel: bool = False
    """with --tp: also split the activations between the tensor-parallel matmuls (norms, residual adds) along the
    sequence (Megatron sequence parallelism: the same communication, 1/tp of those activations)"""
    output_dir: Optional[str] = None
    """where the run directory goes; default runs/<run name>"""

    rounds: int = 4
    """rounds of sample, score, select, fine-tune"""
    samples_per_prompt: int = 64
    """responses sampled per training prompt in each round (trlX's n_generations_per_prompt)"""
    start_percentile: float = 0.7
    """the threshold of round 0, as a fraction in [0, 1]: a sample is kept when its score is at or above this quantile
    of its prompt's scores (0: keep every sample; 0.7: about the best 30%)"""
    end_percentile: float = 0.95
    """the threshold of the last round, in [0, 1] and not below --start-percentile; rounds in between rise linearly"""
    temperature: float = 1.0
    """sampling temperature of the rounds' samples, positive (evaluation samples at 1)"""
    max_new_tokens: int = 10
    """response budget in tokens (randomwalks needs 10: nine letters and EOS)"""
    max_prompt_length: int = 256
    """prompts are cut on the left to this many tokens"""
    generation_batch_size: int = 64
    """samples drawn by one generation call: a round's samples are cut into chunks of this size, each sampled with its
    own seed and dealt out to the ranks in order, so the samples do not depend on the number of ranks"""

    epochs_per_round: int = 2
    """passes over a round's kept samples"""
    batch_size: int = 64
    """kept samples per optimizer step, over all ranks (each of N data-parallel ranks takes batch_size / N; a round's
    last incomplete batch is left out, a different one each epoch)"""
    micro_batch_size: Optional[int] = None
    """samples per forward/backward pass on one rank (default: the rank's whole share, batch_size / ranks); the share
    must be a multiple of it"""
    learning_rate: float = 3e-4
    """AdamW learning rate (constant; one optimizer for the whole run)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""

    eval_samples_per_start: int = 50
    """randomwalks: sampled walks per start node at each evaluation"""
    eval_samples: int = 1
    """text tasks: sampled responses per held-out prompt at each evaluation (arithmetic: pass@k estimated from them)"""
    eval_prompts: int = 64
    """text tasks: held-out prompts scored at each evaluation (at most a tenth of the prompts, and at least one)"""
    save_every: int = 0
    """rounds between checkpoints, written at the end of a round (a run killed mid-round redoes that round on
    --resume); 0 saves only the final model"""
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
    and what depends on the number of processes. Returns the flags with --micro-batch-size settled."""

    def require(ok: bool, flag: str, what: str):
        if not ok:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} {what}")

    rules = {  # what a flag must be: the flags, and the test of their values
        "must be at least 1": (
            "tp pp cp rounds samples_per_prompt generation_batch_size max_new_tokens max_prompt_length epochs_per_round"
            " batch_size eval_samples_per_start eval_samples eval_prompts digits train_problems keep_checkpoints"
            " max_turns",
            lambda value: value >= 1,
        ),
        "must be 0 or more": ("seed save_every", lambda value: value >= 0),
        "must be a positive number": ("learning_rate max_grad_norm temperature", lambda value: 0 < value < math.inf),
        "must lie in [0, 1] (a fraction: 0.7 keeps about the best 30%)": (
            "start_percentile end_percentile",
            lambda value: 0 <= value <= 1,
        ),
        "must be at least 2: a problem joins two numbers or more": ("operands", lambda value: value >= 2),
        "must be 0 or a positive number": ("format_reward", lambda value: 0 <= value < math.inf),
        'must be some of the operators + - * (e.g. "+-*")': (
            "operations",
            lambda value: 0 < len(value) and set(value) <= set("+-*"),
        ),
        f"is below --start-percentile {args.start_percentile}; the threshold rises over the rounds": (
            "end_percentile",
            lambda value: value >= args.start_percentile,
        ),
    }
    for what, (flags, ok) in rules.items():
        for flag in flags.split():
            require(ok(getattr(args, flag)), flag, what)
    require(0 < args.env_timeout < math.inf, "env_timeout", "must be a positive number of seconds")
    if args.pp > 1:
        fail(f"--pp {args.pp}: rft.py does not pipeline; split the model with --tp, --cp and --zero-stage instead")
    model_ranks = args.tp * args.cp
    layout = f"--tp {args.tp}" + (f" --cp {args.cp}" if args.cp > 1 else "")
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
    if args.zero_stage == 3 and args.tp > 1:
        fail("--zero-stage 3 does not compose with --tp; use --zero-stage 0, 1 or 2")
    ranks = world_size // model_ranks  # data-parallel ranks
    require(
        args.batch_size % ranks == 0,
        "batch_size",
        f"does not split over {ranks} data-parallel ranks; make it a multiple of {ranks}",
    )
    share = args.batch_size // ranks
    micro_batch_size = share if args.micro_batch_size is None else args.micro_batch_size
    require(
        micro_batch_size >= 1, "micro_batch_size", "must be at least 1 (or unset: a rank's whole share of the batch)"
    )
    require(
        share % micro_batch_size == 0,
        "micro_batch_size",
        f"does not divide a rank's share of the batch "
        f"(--batch-size {args.batch_size} / {ranks} rank(s) = {share}); pick a divisor of {share}, or leave it unset",
    )
    if args.model is None:
        fail(
            "--model is required: rejection sampling starts from a trained policy, "
            "e.g. `python sft.py --output-dir runs/sft` then --model runs/sft"
        )
    if args.reward_model and args.reward_fn:
        fail("pass one of --reward-model and --reward-fn")
    if args.env and (args.reward_model or args.reward_fn):
        fail(f"--env {args.env} gives the reward; drop --reward-model and --reward-fn")
    if args.task in ("jsonl", "hh", "tldr") and not (args.reward_model or args.reward_fn or args.env):
        fail(f"--task {args.task} has no built-in reward; pass --reward-model, --reward-fn or --env")
    if args.task == "jsonl" and args.data is None:
        fail('--task jsonl needs --data PATH (a file of {"prompt": ...} lines)')
    if args.task in ("randomwalks", "arithmetic") and args.data is not None:
        fail(f"--data {args.data} is for the text tasks; {args.task} builds its own prompts")
    if args.chat_template and not os.path.isfile(args.chat_template):
        fail(f"--chat-template {args.chat_template}: no such file; pass a Jinja chat template file")
    parallel.check_output_dir(args)
    return replace(args, micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------------------------------
# The method: which samples a round keeps (step 3), and the fine-tuning on them (step 4)
# ---------------------------------------------------------------------------------------------
def percentile_at(round_index: int, rounds: int, start: float, end: float) -> float:
    """The selection percentile of round r (from 0): start at round 0, end at the last, linear between."""
    return start if rounds == 1 else start + (end - start) * round_index / (rounds - 1)


def select(scores: np.ndarray, percentile: float) -> tuple:
    """(kept [P, S] bool, thresholds [P]) for the scores [P, S] of S samples of each of P prompts:
    a prompt's threshold is the `percentile` quantile of its own S scores (linear interpolation
    between the two nearest, numpy's default, as trlX), and a sample is kept when its score is at
    or above it, ties included. A prompt whose samples all score the same keeps none: the tie says
    nothing of which is better (all walks failing, or all optimal), and kept, an all-failure prompt
    would weigh as much as the prompts that do tell good from bad. A NaN score (a --reward-fn's None)
    is never kept and leaves its prompt's quantile to the other samples' scores."""
    scores = np.where(np.isnan(scores).all(axis=1, keepdims=True), 0.0, scores)  # no score at all: a tie
    thresholds = np.nanquantile(scores, percentile, axis=1)
    informative = np.nanmax(scores, axis=1) > np.nanmin(scores, axis=1)
    return (scores >= thresholds[:, None]) & informative[:, None], thresholds


def padded(rows: list, value: int, side: str = "right") -> torch.Tensor:
    """Lists of token ids (or labels, or mask bits) as one long tensor [rows, longest], `value` padding on `side`."""
    return pad_sequence([torch.tensor(row) for row in rows], batch_first=True, padding_value=value, padding_side=side)


def collate(samples: list, pad_token_id: int, device):
    """Right-padded batch of (prompt ids, response ids, response labels) samples; the labels are -100 on the prompt,
    the padding and an --env episode's environment tokens, so only the policy's tokens carry loss."""
    input_ids = padded([prompt + response for prompt, response, _ in samples], pad_token_id)
    attention_mask = padded([[1] * (len(prompt) + len(response)) for prompt, response, _ in samples], 0)
    labels = padded([[-100] * len(prompt) + labels for prompt, _, labels in samples], -100)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def completion_loss_sum(model, input_ids, attention_mask, labels):
    """Summed cross-entropy of the response tokens (the caller divides by the batch's token count,
    so that gradient accumulation over micro-batches equals one big batch exactly)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits are upcast, fp64 kept
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def accumulate_gradients(model, batch: list, batch_tokens: int, args: Args, grid, pad_token_id: int, autocast) -> float:
    """Backward over this rank's share of the batch in micro-batches; returns its share of the
    global batch's mean response-token loss (the shares sum to the mean over ranks).

    Each micro-batch's summed loss is divided by the response-token count of the whole global
    batch, not its own, so the accumulated gradient equals the one-big-batch gradient exactly. The
    data-parallel reduction averages over ranks, hence the factor of their count. Only the last
    micro-batch's backward communicates (no_sync on the others)."""
    size, starts = args.micro_batch_size, range(0, len(batch), args.micro_batch_size)
    batch_loss = 0.0
    for start in starts:
        input_ids, attention_mask, labels = collate(batch[start : start + size], pad_token_id, grid.device)
        with model.no_sync() if start != starts[-1] else contextlib.nullcontext():
            with autocast:
                loss = completion_loss_sum(model, input_ids, attention_mask, labels) / batch_tokens
            (loss * grid.dp_size).backward()
        batch_loss += loss.item()
    return batch_loss


def fine_tune(model, optimizer, samples: list, round_index: int, args: Args, grid, pad_token_id, autocast, progress):
    """Step 4: --epochs-per-round epochs over the kept (prompt ids, response ids, response labels), in batches
    of --batch-size (the last incomplete one left out), each rank its share of each batch, as
    sft.py trains. Returns the round's training metrics."""
    local_batch_size = args.batch_size // grid.dp_size
    steps_per_epoch = len(samples) // args.batch_size
    losses, grad_norm = [], None
    for epoch in range(args.epochs_per_round):
        # The epoch's shuffled order, a function of (seed, round, epoch) alone, so a resumed run replays it.
        generator = torch.Generator().manual_seed(chunk_seed(args.seed, f"round {round_index} order", epoch))
        order = torch.randperm(len(samples), generator=generator).tolist()
        for position in range(steps_per_epoch):
            batch = [samples[i] for i in order[position * args.batch_size : (position + 1) * args.batch_size]]
            batch_tokens = sum(len(labels) - labels.count(-100) for _, _, labels in batch)
            rank_share = batch[grid.dp_rank * local_batch_size : (grid.dp_rank + 1) * local_batch_size]
            batch_loss = accumulate_gradients(model, rank_share, batch_tokens, args, grid, pad_token_id, autocast)
            batch_loss = parallel.all_reduce_sum(
                torch.tensor([batch_loss], dtype=torch.float64, device=grid.device), grid.dp_group
            ).item()
            grad_norm = float(model.clip_grad_norm_(args.max_grad_norm))
            if not math.isfinite(batch_loss) or not math.isfinite(grad_norm):  # every rank sees the same sums
                fail(
                    f"the loss is {batch_loss} and the gradient norm {grad_norm} in round {round_index + 1}, so "
                    "training would learn nothing; lower --learning-rate"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(batch_loss)
            progress.set_postfix(loss=f"{batch_loss:.4f}")
    if not losses:  # a clear outcome, not an error: the next round samples the unchanged policy with new seeds
        if grid.is_main:
            progress.write(
                f"round {round_index + 1} kept {len(samples)} samples, fewer than one batch of {args.batch_size}: "
                "no fine-tuning step (a prompt whose samples all scored the same keeps none)"
            )
        return {"train/steps": 0}
    return {"train/loss": float(np.mean(losses)), "train/steps": len(losses), "train/grad_norm": grad_norm}


# ---------------------------------------------------------------------------------------------
# The randomwalks task (trlX's examples/randomwalks), as in sft.py: prompts are start letters,
# and the true reward of a response is the optimality of the walk it completes.
# ---------------------------------------------------------------------------------------------
RANDOMWALKS_SEED = 1000
RANDOMWALKS_NODES = 21
RANDOMWALKS_MAX_NODES = 10  # a walk has at most this many nodes, start included


def randomwalks_graph(seed=RANDOMWALKS_SEED, n_nodes=RANDOMWALKS_NODES):
    """The graph (boolean adjacency [n, n]), drawn exactly as trlX does (its walks, drawn next from the same
    generator, are not needed here: the reward is the optimality, which the graph alone decides)."""
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
# Prompts: randomwalks' start letters, or the prompts of a text task
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


def task_prompts(args: Args) -> tuple:
    """(training prompts, held-out prompts). randomwalks uses the 20 start letters for both; a text
    task holds out --eval-prompts (at most a tenth) by a shuffle of its own seed."""
    if args.task == "randomwalks":
        prompts = [{"prompt": chr(ord("a") + n)} for n in range(1, RANDOMWALKS_NODES)]
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
    return [prompts[i] for i in order[n_eval:]], [prompts[i] for i in order[:n_eval]]


def render(tokenizer, messages: list, tools=None, add_generation_prompt=False) -> list:
    """Token ids of a conversation in the tokenizer's chat template (the template writes any BOS itself)."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_tokens(tokenizer, record: dict, room: int) -> list:
    """A prompt's token ids, cut on the left to `room` tokens: a conversation rendered by the chat template with the
    generation prompt, a string as the tokenizer encodes it (an empty prompt becomes EOS: generation needs a
    position to start from)."""
    prompt = record["prompt"]
    if is_conversation(prompt):
        return render(tokenizer, prompt, record.get("tools"), add_generation_prompt=True)[-room:]
    return tokenizer(prompt)["input_ids"][-room:] or [tokenizer.eos_token_id]


def end_of_turn_ids(tokenizer, generation_config=None) -> list:
    """The ids that end a response: the tokenizer's EOS, generation_config.eos_token_id (an int or a list), and the
    chat template's end-of-turn token (<|im_end|>, <|eot_id|>), found as the first token after a reply's text."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    if tokenizer.chat_template:
        user, reply = [{"role": "user", "content": "x"}], tokenizer("y", add_special_tokens=False)["input_ids"]
        context = render(tokenizer, user, add_generation_prompt=True)
        tail = render(tokenizer, user + [{"role": "assistant", "content": "y"}])[len(context) :]
        if tail[: len(reply)] == reply and len(tail) > len(reply):
            ids.add(tail[len(reply)])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# Rewards: the task's metric, VADER, a reward model (as in reward_model.py), or a user function
# ---------------------------------------------------------------------------------------------
def reward_model_ids(tokenizer, record: dict, response: str) -> list:
    """What a reward model with a tokenizer of its own reads: the conversation (the prompt's messages and the reply)
    in its chat template, up to the reply's end-of-turn token, or without a template the prompt's text (a
    conversation's contents, a line each) and the reply's."""
    prompt, tools = record["prompt"], record.get("tools")
    if is_conversation(prompt) and tokenizer.chat_template:
        ids = render(tokenizer, prompt + [{"role": "assistant", "content": response}], tools)
        reply, end_ids = len(render(tokenizer, prompt, tools, add_generation_prompt=True)), end_of_turn_ids(tokenizer)
        return ids[: next((i + 1 for i in range(reply, len(ids)) if ids[i] in end_ids), len(ids))]
    text = "\n".join(m["content"] for m in prompt) if is_conversation(prompt) else prompt
    return tokenizer(text)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def reward_model_scores(model, tokenizer, records: list, responses: list, sequences=None, batch_size: int = 32) -> list:
    """Raw reward-model scores of each (prompt record, response text), read at the last real token of the
    right-padded sequence (the transformers class finds the rightmost non-pad token): of `sequences` when given
    (prompt and response token ids as sampled, for a model with the policy's tokenizer), else of reward_model_ids.
    Each is cut to the model's context from the left: the response is what is judged, and its last token is where
    the score is read."""
    max_length = model_context(model.config) or 1 << 30
    device = next(model.parameters()).device
    sequences = sequences or [reward_model_ids(tokenizer, r, response) for r, response in zip(records, responses)]
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = [([], ids[-max_length:], []) for ids in sequences[start : start + batch_size]]
        input_ids, attention_mask, _ = collate(batch, tokenizer.pad_token_id, device)  # no labels: it is not trained
        scores += model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].double().tolist()
    return scores


def load_reward_model(path: str, device, policy_tokenizer, verbose: bool, dtype=torch.float32) -> tuple:
    """A reward model with its tokenizer; texts are re-tokenized for it, so a tokenizer that differs
    from the policy's is fine (and said once, when verbose)."""
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
    return kernels.use_linear(model.to(device).eval().requires_grad_(False)), tokenizer


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


def checked_scores(values, count: int, source: str) -> list:
    """A reward function's output as floats, None as NaN (no score), refusing wrong lengths and non-finite numbers."""
    try:
        values = list(values)
        scores = [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        fail(f"{source} must return a list of numbers (or None for no score), got {type(values).__name__}")
    if len(scores) != count:
        fail(f"{source} returned {len(scores)} scores for {count} responses; return exactly one per response")
    bad = [i for i, (s, v) in enumerate(zip(scores, values)) if not math.isfinite(s) and v is not None]
    if bad:
        fail(f"{source} returned a non-finite score (NaN or inf) for response {bad[0]}; return finite numbers")
    return scores


class Reward:
    """The score of each response as its source gives it: a reward model, --reward-fn, VADER on
    sentiment, or the walk's optimality on randomwalks (with --env the environment's class: its
    episodes score the sum of their step rewards as they are played). Raw scores: the selection compares a
    prompt's samples with each other, so no normalisation would change it. The reward model is
    replicated on every rank: it only scores."""

    def __init__(self, args: Args, tokenizer, end_ids: list, device, dtype, verbose: bool):
        self.task, self.source, self.end_ids = args.task, args.reward_fn, end_ids
        if args.task == "randomwalks":
            self.adjacency = randomwalks_graph()
            self.shortest = shortest_path_nodes(self.adjacency)
        self.model = args.reward_model and load_reward_model(args.reward_model, device, tokenizer, verbose, dtype)
        self.same_tokenizer = bool(self.model) and self.model[1].get_vocab() == tokenizer.get_vocab()
        self.fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
        self.env_class = CalculatorEnv if args.env == "calculator" else args.env and load_reward_fn(args.env, "--env")
        if args.task == "arithmetic" and self.fn is None:
            self.fn = functools.partial(arithmetic_reward, format_reward=args.format_reward)
        if args.task == "sentiment":
            vader()  # the reward or, beside another reward, the task's metric: a missing extra ends the run here

    def __call__(self, records: list, texts: list, sequences: list) -> list:
        """One float (NaN: a --reward-fn's None) per response of one generation chunk: `records` the prompt records,
        `texts` the replies before their end-of-turn id, `sequences` the prompt's and reply's token ids as sampled,
        which a reward model with the policy's tokenizer reads."""
        if self.model:
            return reward_model_scores(*self.model, records, texts, sequences if self.same_tokenizer else None)
        if self.fn is not None:
            return checked_scores(call_reward_fn(self.fn, records, texts), len(texts), f"--reward-fn {self.source}")
        return self.task_metric(records, texts)

    def task_metric(self, records: list, responses: list) -> list:
        """The task's own measure, whatever the reward: the walk's optimality, or VADER's compound
        score of the reply (the prompt is not scored, so the opening's own sentiment does not
        count)."""
        if self.task == "sentiment":
            return [vader().polarity_scores(response)["compound"] for response in responses]
        return [walk_optimality(r["prompt"] + t, self.adjacency, self.shortest) for r, t in zip(records, responses)]


# ---------------------------------------------------------------------------------------------
# Sampling (step 1) and scoring (step 2)
# ---------------------------------------------------------------------------------------------
def model_context(config):
    """Longest sequence the model's position embeddings allow (None when the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, temperature: float, tokenizer, end_ids: list, device) -> list:
    """Response token ids for each prompt (a list of token ids), up to and including the first of end_ids (the EOS,
    a chat template's end-of-turn id; a response cut at max_new_tokens has none):
    a left-padded batch decoded token by token on the KV cache, greedy at temperature 0, else
    sampled from softmax(logits / temperature) and nothing else. (model.generate() would also
    apply what the checkpoint's generation_config.json asks, a repetition penalty or banned
    n-grams: samples from a distribution that is not the policy's.)"""
    # Left padding: every prompt ends where generation starts.
    step_ids = padded(prompts, tokenizer.pad_token_id, "left").to(device)
    attention_mask = padded([[1] * len(ids) for ids in prompts], 0, "left").to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    cache, finished, tokens = None, torch.zeros(len(prompts), dtype=torch.bool, device=device), []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        output = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output.cache
        logits = output.logits[:, -1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 is upcast, fp64 kept
        next_ids = (
            logits.argmax(-1)
            if temperature == 0
            else torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
        )
        next_ids = next_ids.masked_fill(finished, tokenizer.eos_token_id)
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, torch.tensor(end_ids, device=device))
        if finished.all():
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    model.train(was_training)
    return [
        ids[: next((i + 1 for i, t in enumerate(ids) if t in end_ids), len(ids))]
        for ids in torch.stack(tokens, 1).tolist()
    ]


def chunk_seed(seed: int, stream: str, chunk: int) -> int:
    """The torch seed of one generation chunk: a hash of (--seed, which generation, chunk index), so
    a chunk samples the same tokens whichever rank draws it, and in a resumed run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}/{chunk}".encode()).digest()[:8], "little") & (2**63 - 1)


def sample_and_score(model, prompts, prompt_ids, copies, temperature, stream, reward, tokenizer, args, grid, autocast):
    """Steps 1 and 2: `copies` samples of each prompt and their scores, as (rows, every row's sample, its text, its
    score) on every rank, a sample being (prompt ids, response ids, response labels) as play_episodes draws it. The
    rows, (prompt, copy) pairs prompt by prompt, are cut into chunks of --generation-batch-size (the last may be
    shorter) dealt out to the ranks in order, each chunk sampled on a forked RNG seeded by (seed, stream, chunk), so
    the samples depend neither on the rank count nor on the training RNG (which drives dropout); each rank scores its
    chunks, and they are gathered in chunk order. Context-parallel ranks hold whole weights, so they share the
    sampling as data-parallel ranks do; the tensor-parallel ranks of one copy draw the same chunks together (their
    forwards are collective). The whole model is gathered once (a no-op below ZeRO-3), so ranks may run different
    numbers of forwards."""
    rows = [i for i in range(len(prompts)) for _ in range(copies)]
    ranks, rank = grid.dp_size * grid.cp_size, grid.dp_rank * grid.cp_size + grid.cp_rank
    size = args.generation_batch_size
    chunks = [(chunk, rows[start : start + size]) for chunk, start in enumerate(range(0, len(rows), size))]
    chunks = chunks[rank * len(chunks) // ranks : (rank + 1) * len(chunks) // ranks]
    played = []
    with model.gathered(), autocast:
        for chunk, chunk_rows in chunks:
            with torch.random.fork_rng(devices=[grid.device] if grid.device.type == "cuda" else []):
                torch.manual_seed(chunk_seed(args.seed, stream, chunk))
                records, openings = [prompts[row] for row in chunk_rows], [prompt_ids[row] for row in chunk_rows]
                episodes = play_episodes(
                    model.module, records, openings, temperature, reward, tokenizer, args, grid.device
                )
                played.append((chunk, records, *episodes))
    local = []
    for chunk, records, samples, texts, scores in played:
        if not reward.env_class:  # scored here, outside the sampling's autocast
            scores = reward(records, texts, [prompt + response for prompt, response, _ in samples])
        local.append((chunk, samples, texts, scores))
    gathered = sorted(
        (part for share in parallel.all_gather_objects(local, grid.dp_cp_group) for part in share), key=lambda p: p[0]
    )
    return rows, *([item for part in gathered for item in part[k]] for k in (1, 2, 3))


def call_env(function, *arguments, args: Args):
    """An --env method's result; a call that raises or runs past --env-timeout stops the run with one line."""

    def timed_out(*_):
        raise TimeoutError(f"did not return within --env-timeout {args.env_timeout:g} s")

    signal.signal(signal.SIGALRM, timed_out)  # only call_env arms the timer, and disarms it after the call
    signal.setitimer(signal.ITIMER_REAL, args.env_timeout)
    try:
        return function(*arguments)
    except Exception as error:
        fail(f"--env {args.env}: {function.__qualname__} failed ({type(error).__name__}: {error}); fix the environment")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def play_episodes(model, rows: list, openings: list, temperature, reward: Reward, tokenizer, args: Args, device):
    """Step 1 of one chunk, as (samples, texts, scores): an episode per prompt row, a sample being (prompt ids,
    response ids, response labels). Without --env an episode is one response to its prompt's ids (`openings`), its
    labels its ids. With --env the row's environment opens it, and the policy (one batched generate() over the
    episodes still running) and the environment take turns until the environment ends it, --max-turns, or
    --max-new-tokens (the episode's budget after its opening); each turn re-encodes every running conversation whole
    rather than carry the KV cache over the environment's tokens: simpler, and the cost is one prompt pass per turn.
    The policy's turns keep the ids sampled, their own labels; the environment's messages enter as the chat template
    renders them, labelled -100 (no loss): the ids the conversation's rendering grows by (the template's framing
    after the policy's end-of-turn id, then the new messages and the generation prompt). A text is the episode's last
    reply, a score the sum of its step rewards (without --env 0, for sample_and_score to score)."""
    episodes = []
    for row, opening in zip(rows, openings):
        env = reward.env_class and call_env(reward.env_class, row, args=args)
        messages = env and call_env(env.reset, args=args)
        if env and (not is_conversation(messages) or "user" not in {m["role"] for m in messages}):
            fail(f"--env {args.env}: reset() returned {messages!r:.100}; return messages, one a user's")
        opening = render(tokenizer, messages, add_generation_prompt=True)[-args.max_prompt_length :] if env else opening
        episodes.append({"env": env, "messages": messages, "sample": (opening, [], []), "score": 0.0})
    running = episodes
    for _ in range(args.max_turns if reward.env_class else 1):
        rooms = [args.max_new_tokens - len(e["sample"][1]) for e in running]
        contexts = [e["sample"][0] + e["sample"][1] for e in running]
        replies = generate(model, contexts, max(rooms), temperature, tokenizer, reward.end_ids, device)
        still = []
        for episode, room, reply in zip(running, rooms, replies):
            _, ids, labels = episode["sample"]
            reply = reply[:room]
            ids += reply
            labels += reply
            # The text before the end-of-turn id; randomwalks decodes every other token, so a pad or unknown token
            # inside a walk makes it invalid.
            ended = reply[-1] in reward.end_ids
            text = tokenizer.decode(reply[:-1] if ended else reply, skip_special_tokens=reward.task != "randomwalks")
            episode["text"], message = text, {"role": "assistant", "content": text}
            if not (ended and episode["env"]):
                continue
            result = call_env(episode["env"].step, message, args=args)
            valid = isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], (int, float))
            if not valid or not isinstance(result[2], bool) or not math.isfinite(result[1]):
                fail(f"--env {args.env}: step() returned {result!r:.100}; return (messages, a finite reward, a bool)")
            added, step_reward, done = result
            if not (added == [] or is_conversation(added)) or {m["role"] for m in added} - {"user", "tool"}:
                fail(f"--env {args.env}: step() returned messages {added!r:.100}; return role user or tool messages")
            episode["score"] += step_reward
            conversation = episode["messages"] + [message]
            before = render(tokenizer, episode["messages"], add_generation_prompt=True)
            replied = render(tokenizer, conversation)
            after = render(tokenizer, conversation + added, add_generation_prompt=True)
            if replied[: len(before)] != before or after[: len(replied)] != replied:
                fail(
                    f"--env {args.env}: the chat template rewrites earlier turns (its rendering of a conversation is "
                    "not a prefix of its continuation's); use a prefix-preserving template (--chat-template)"
                )
            turn = replied[len(before) :]
            framing = turn[next((i + 1 for i, token in enumerate(turn) if token in reward.end_ids), len(turn)) :]
            increment = framing + after[len(replied) :]
            if done or len(ids) + len(increment) >= args.max_new_tokens:
                continue
            episode["messages"] = conversation + added
            ids += increment
            labels += [-100] * len(increment)
            still.append(episode)
        running = still
        if not running:
            break
    return [e["sample"] for e in episodes], [e["text"] for e in episodes], [e["score"] for e in episodes]


@torch.no_grad()
def evaluate(model, prompt_ids: list, prompts: list, reward: Reward, tokenizer, args: Args, grid, autocast) -> tuple:
    """Step 5: the reward of greedy and sampled (temperature 1, as sft.py evaluates) responses to
    the held-out prompts (randomwalks: every start letter, --eval-samples-per-start times for the
    sampled walks), and the task's own measure whatever the reward (optimality, VADER). They are
    drawn in chunks of fixed seeds as the rounds' samples are: evaluation never changes training,
    evaluations compare, and the result does not depend on the number of ranks.
    Returns (metrics, sample rows of the greedy responses)."""
    metrics, table = {}, []
    repeats = args.eval_samples_per_start if args.task == "randomwalks" else args.eval_samples
    for mode, temperature, copies in (("greedy", 0.0, 1), ("sampled", 1.0, repeats)):
        rows, samples, texts, scores = sample_and_score(
            model, prompts, prompt_ids, copies, temperature, f"eval {mode}", reward, tokenizer, args, grid, autocast
        )
        records = [prompts[row] for row in rows]
        metrics[f"eval/score_{mode}"] = float(np.nanmean(scores))
        if args.task == "arithmetic":
            answers, lengths = [r["answer"] for r in records], [len(ids) - ids.count(-100) for *_, ids in samples]
            metrics.update(arithmetic_metrics(mode, texts, answers, lengths, copies))
        if args.task == "randomwalks":
            optimality = reward.task_metric(records, texts)
            metrics[f"eval/optimality_{mode}"] = float(np.mean(optimality))
            metrics[f"eval/valid_walks_{mode}"] = float(np.mean([value > 0 for value in optimality]))
        if args.task == "sentiment":
            metrics[f"eval/vader_{mode}"] = float(np.mean(reward.task_metric(records, texts)))
        if mode == "greedy":
            table = [[str(prompts[row]["prompt"]), text, s] for row, text, s in zip(rows[:20], texts, scores)]
    return metrics, table


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints and logging (plumbing)
# ---------------------------------------------------------------------------------------------
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


def load_model(name: str, device, dtype=torch.float32):
    """A causal LM from a local directory or a hub name, with one clear line when it cannot be had."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name!r}: no such directory; pass an sft.py run directory or a hub name such as gpt2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {name!r} has no EOS token; responses need one to end")
    if tokenizer.pad_token_id is None:  # padding is masked out of the loss, so EOS serves as pad
        tokenizer.pad_token = tokenizer.eos_token
    return kernels.use_linear(model.to(device)), tokenizer


def selection_metrics(scores: np.ndarray, kept: np.ndarray, thresholds: np.ndarray, percentile: float) -> dict:
    """What a round selected from (the distribution of its scores) and what it kept (the kept samples'
    mean score only when there are some)."""
    return {
        "samples/percentile": percentile,
        "samples/threshold_mean": float(thresholds.mean()),
        "samples/kept": int(kept.sum()),
        "samples/kept_fraction": float(kept.mean()),
        **({"samples/kept_score_mean": float(scores[kept].mean())} if kept.any() else {}),
        "samples/score_mean": float(np.nanmean(scores)),
        "samples/score_std": float(np.nanstd(scores)),
        "samples/score_min": float(np.nanmin(scores)),
        "samples/score_max": float(np.nanmax(scores)),
        "samples/unscored_fraction": float(np.isnan(scores).mean()),
    }


def wandb_extras(scores: np.ndarray, thresholds: np.ndarray, eval_rows: list, kept_rows: list) -> dict:
    """The round's histograms and sample tables, for --track."""
    import wandb

    columns = ["prompt", "response", "score"]
    return {
        "samples/scores": wandb.Histogram(scores[~np.isnan(scores)]),
        "samples/thresholds": wandb.Histogram(thresholds),
        "samples/kept_samples": wandb.Table(columns=columns, data=kept_rows),
        "eval/greedy": wandb.Table(columns=columns, data=eval_rows),
    }


def round_line(metrics: dict) -> str:
    """The progress line of a round: what was kept, from what, and where the policy stands."""
    keys = ("samples/percentile", "samples/threshold_mean", "samples/kept_fraction", "samples/score_mean", "train/loss")
    keys += tuple(k for k in metrics if k.startswith("eval/"))
    return ", ".join(f"{k.split('/')[1]} {metrics[k]:.4f}" for k in keys if k in metrics)


def main(args: Args):
    # Flags, then the other ranks (a no-op without torchrun).
    args = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    grid = parallel.init_distributed(args.device, tp=args.tp, pp=args.pp, cp=args.cp)
    device, ranks = grid.device, grid.dp_size
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    if grid.is_main:
        print(
            f"batch {args.batch_size} = {ranks} data-parallel rank(s) x "
            f"{args.batch_size // ranks // args.micro_batch_size} micro-batch(es) of {args.micro_batch_size}"
        )
    checkpoint = parallel.find_checkpoint(args.resume, verbose=grid.is_main) if args.resume else None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Prompts, the policy (from the checkpoint when resuming), the reward.
    train_prompts, eval_prompts = task_prompts(args)
    model, tokenizer = load_model(checkpoint or args.model, device, dtype)
    context = model_context(model.config)
    if context and args.max_new_tokens >= context:
        fail(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's {context}-token context"
        )
    if context:  # settled: a prompt (an --env episode's opening) is cut to the room the responses leave it
        args = replace(args, max_prompt_length=min(args.max_prompt_length, context - args.max_new_tokens))
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()  # saved with the tokenizer, so the trained policy keeps it
    if (args.env or is_conversation(train_prompts[0]["prompt"])) and not tokenizer.chat_template:
        fail(f"the tokenizer of {args.model!r} has no chat template for the conversations; pass --chat-template PATH")
    train_ids = [prompt_tokens(tokenizer, p, args.max_prompt_length) for p in train_prompts]
    eval_ids = [prompt_tokens(tokenizer, p, args.max_prompt_length) for p in eval_prompts]
    end_ids = end_of_turn_ids(tokenizer, model.generation_config)  # a response ends at any of them
    reward = Reward(args, tokenizer, end_ids, device, dtype, verbose=grid.is_main)

    # The layout: each wrapper a no-op for a group of one. Same seed on every rank, so the weights
    # start equal (the wrapper also broadcasts rank 0's).
    model = parallel.tensor_parallel(model, grid.tp_group)
    model = parallel.split_sequences(model, grid, args.sequence_parallel)
    model = parallel.data_parallel(model, grid.dp_cp_group, args.zero_stage, tp_group=grid.tp_group)
    optimizer = model.make_optimizer(torch.optim.AdamW, lr=args.learning_rate, weight_decay=0.0)
    # Data-parallel replicas draw their own dropout masks (replica 0 keeps the single-process
    # stream); the tensor-parallel ranks of one replica must draw the same ones.
    if grid.dp_rank:
        torch.manual_seed(args.seed + grid.dp_rank)

    # The run directory; a resumed run continues in its checkpoint's directory, its history restored.
    trained = (optimizer, model, {"model": model.module})  # what the optimizer steps, as checkpoints save it
    state, run_name, run_dir = parallel.open_run(checkpoint, args, grid, trained)
    round_index, wandb_id, history = (state["round"], state["wandb_id"], state["history"]) if state else (0, None, [])
    if grid.is_main:
        tokenizer.save_pretrained(run_dir)
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track and grid.is_main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    started = time.time()
    if not history:  # where the policy starts, for comparison
        start_metrics, _ = evaluate(model, eval_ids, eval_prompts, reward, tokenizer, args, grid, autocast)
        history.append({"round": 0, **start_metrics})
        if grid.is_main:
            print("round 0: " + round_line(start_metrics))
        if wandb_run:
            wandb_run.log(start_metrics, step=0)

    model.train()
    progress = tqdm.tqdm(
        total=args.rounds,
        initial=round_index,
        desc="rft",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not grid.is_main,
    )
    parallel.catch_stop_signals()
    while round_index < args.rounds:
        round_started = time.time()
        # 1-2. Sample --samples-per-prompt responses to each training prompt, each rank its chunks of the (prompt,
        #      sample) rows, and score them; every rank ends with every response and score.
        stream, copies = f"round {round_index}", args.samples_per_prompt
        rows, samples, texts, scores = sample_and_score(
            model, train_prompts, train_ids, copies, args.temperature, stream, reward, tokenizer, args, grid, autocast
        )
        scores = np.array(scores, dtype=np.float64).reshape(len(train_prompts), args.samples_per_prompt)
        if np.isnan(scores).all():
            fail(f"--reward-fn {args.reward_fn} returned None for every sample of round {round_index + 1}; score some")

        # 3. Select: per prompt, the samples at or above this round's percentile of its scores.
        percentile = percentile_at(round_index, args.rounds, args.start_percentile, args.end_percentile)
        kept, thresholds = select(scores, percentile)
        kept_indices = np.flatnonzero(kept)  # into rows, samples, texts and the flattened scores

        # 4. Fine-tune on the kept samples with the loss of sft.py.
        kept_samples = [samples[i] for i in kept_indices]
        metrics = fine_tune(
            model, optimizer, kept_samples, round_index, args, grid, tokenizer.pad_token_id, autocast, progress
        )
        round_index += 1

        # 5. Evaluate; log the round (the score distribution it selected from) and checkpoint it.
        eval_metrics, table = evaluate(model, eval_ids, eval_prompts, reward, tokenizer, args, grid, autocast)
        metrics.update(eval_metrics)
        metrics.update(selection_metrics(scores, kept, thresholds, percentile))
        metrics["time/round_s"] = time.time() - round_started
        history.append({"round": round_index, **metrics})
        progress.update(1)
        if grid.is_main:
            progress.write(f"round {round_index}: " + round_line(metrics))
        if wandb_run:
            kept_rows = [[str(train_prompts[rows[i]]["prompt"]), texts[i], scores.flat[i]] for i in kept_indices[:32]]
            wandb_run.log({**metrics, **wandb_extras(scores, thresholds, table, kept_rows)}, step=round_index)
        # SIGTERM stops at the end of the round: a checkpoint in the middle would need its samples.
        stop = round_index < args.rounds and parallel.stop_requested(grid)
        if stop or args.save_every and round_index % args.save_every == 0 and round_index < args.rounds:
            trainer_state = {
                "round": round_index,
                "history": history,
                "args": asdict(args),
                "run_name": run_name,
                "wandb_id": wandb_run.id if wandb_run else None,
            }
            weights = {"model": parallel.dense_tensors(model.module, model, grid)}
            name, keep = f"round_{round_index:08d}", args.keep_checkpoints
            parallel.save_checkpoint(
                run_dir, name, grid, keep, trainer_state, weights, (model.module, tokenizer), trained
            )
        if stop:
            return parallel.report_stop(run_dir, grid, f"round {round_index}")
    progress.close()

    # The result, loadable by plain transformers and by the other scripts.
    weights = {"model": parallel.dense_tensors(model.module, model, grid)}
    parallel.save_final(run_dir, grid, weights, (model.module, tokenizer))
    if not grid.is_main:
        return
    summary = {k: v for k, v in history[-1].items() if k.startswith("eval/")}
    start = {k: v for k, v in history[0].items() if k.startswith("eval/")}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump({"round": round_index, **summary, "start": start, "rounds": history[1:]}, file, indent=1)
    print(
        f"saved {run_dir} after {round_index} rounds in {time.time() - started:.0f}s: "
        + ", ".join(f"{k} {start[k]:.4f} -> {v:.4f}" for k, v in summary.items())
    )
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()


if __name__ == "__main__":
    with parallel.clean_exit():
        main(tyro.cli(Args))
