"""Direct preference optimisation (DPO) of a causal LM on preference pairs.

DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") solves the KL-regularised RLHF objective without a reward model and without
sampling. The policy's log-likelihood ratio to a frozen reference is an implicit reward,
r(x, y) = beta * log(pi(y|x) / ref(y|x)), and the Bradley-Terry likelihood of the preferences
under it is maximised:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with log-probabilities summed over the response tokens; chosen and rejected go through one
forward pass. The reference's log-probabilities are computed once, before training, and kept
in checkpoints. `--loss` picks a variant (each cited where it is computed, in `preference_losses`):
ipo (Azar et al., 2023), the length-normalised form, and with `--label-smoothing` the
conservative DPO of noisy labels (Mitchell, 2023). The default task runs offline on a CPU:

    python sft.py --output-dir runs/sft && python dpo.py --model runs/sft    # randomwalks
    python dpo.py --model runs/sft --loss ipo --beta 0.5
    python dpo.py --model runs/sft --lora-rank 8                    # the reference: adapters off
    python dpo.py --task jsonl --data pairs.jsonl --model gpt2
    python dpo.py --task jsonl --data chats.jsonl --model runs/sft-chat --chat-template chatml.jinja  # conversations
    torchrun --nproc_per_node 8 dpo.py --model ... --zero-stage 3   # data parallel, see parallel.py

The trained policy lands in the run directory, loadable with plain
`AutoModelForCausalLM.from_pretrained(run_dir)` (LoRA adapters merged in).

Reading order. The method is `main` (at the bottom): preference pairs, policy, the reference's
log-probabilities (`reference_logprobs`), then the loop of optimizer steps over pairs, each
accumulated over micro-batches by `accumulate_gradients` with the loss of `preference_losses` on
the response log-probabilities of `pair_logprobs`; `evaluate` after it. Above it, in file order:
Args and check_args; the randomwalks pairs; the data parsers and `tokenize_pairs`; the policy,
LoRA and `generate`; the sentiment pairs; run directory, checkpoints and logging (plumbing).
"""

import contextlib
import copy
import functools
import gzip
import hashlib
import json
import math
import os
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tqdm
import tyro
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import kernels
import parallel


@dataclass
class Args:
    exp_name: str = "dpo"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (pair sampling, data order, evaluation samples): any integer from 0"""
    task: Literal["randomwalks", "sentiment", "jsonl", "hh", "tldr"] = "randomwalks"
    """randomwalks: built-in offline pairs of walks; sentiment: pairs of continuations of movie-review openings
    (examples/sentiment_prompts.jsonl) sampled from --model itself, the more positive by VADER chosen (needs
    vaderSentiment); jsonl: preference records from --data, `{"prompt", "chosen", "rejected"}` as strings or message
    lists (optional "tools"), or `{"chosen", "rejected"}` conversations whose shared first messages are the prompt; hh:
    Anthropic/hh-rlhf chosen/rejected dialogues; tldr: OpenAI summarize-from-feedback comparisons (hh and tldr download
    from the hub unless --data is given)"""
    data: Optional[str] = None
    """local data: required for --task jsonl; for sentiment `{"prompt"}` records (strings or message lists) replacing
    the shipped ones; for hh/tldr a local copy in the upstream format (.jsonl, .jsonl.gz; .parquet or a directory
    saved by `datasets` need the datasets package)"""
    chat_template: Optional[str] = None
    """a Jinja chat template file replacing the tokenizer's (saved with it) for conversational data, which is rendered
    by the template: prompts with the generation prompt, each completion through its end-of-turn token"""
    model: Optional[str] = None
    """the policy to train and, frozen, the reference: hub name or local path of a causal LM (an sft.py run directory,
    say); required"""
    reward_model: Optional[str] = None
    """text tasks: a reward_model.py run directory that judges, at each evaluation, the policy's samples against the
    reference's (the win rate); none: no win rate"""
    dtype: Literal["fp32", "bf16", "fp64"] = "fp32"
    """fp32; bf16: autocast for the forward pass (weights and optimizer stay fp32); fp64: weights and every computation
    in float64, slow, for checking that two layouts compute the same math (the tests compare runs this way)"""
    device: str = "auto"
    """torch device; auto picks cuda when present, else cpu"""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage under torchrun: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also
    parameters"""
    tp: int = 1
    """tensor-parallel ranks per model copy under torchrun (attention heads, MLP and vocabulary split over them; data
    parallel takes the remaining ranks)"""
    pp: int = 1
    """pipeline stages per model copy: only 1 here (dpo.py has no pipeline schedule; use --tp, --cp and ZeRO)"""
    cp: int = 1
    """context-parallel ranks per model copy under torchrun (Ulysses: each holds 1/cp of every sequence through the
    whole model, attention trades positions for heads; for sequences whose activations outgrow one device)"""
    sequence_parallel: bool = False
    """with --tp: also split the activations between the tensor-parallel matmuls (norms, residual adds) along the
    sequence (Megatron sequence parallelism: the same communication, 1/tp of those activations)"""
    output_dir: Optional[str] = None
    """where the run directory goes; default runs/<run name>"""

    loss: Literal["dpo", "ipo", "length-normalized"] = "dpo"
    """dpo: -log sigmoid(beta * h), h the chosen minus the rejected log-ratio to the reference; ipo: (h - 1 / (2 *
    beta))^2 (Azar et al., 2023); length-normalized: dpo with each side's log-ratio divided by its response's length"""
    beta: float = 0.1
    """positive: the strength of the KL regularisation toward the reference (dpo: the implicit reward's scale; ipo:
    the target margin is 1 / (2 beta))"""
    label_smoothing: float = 0.0
    """conservative DPO (Mitchell, 2023): the probability that a pair's preference is flipped, from 0 (plain DPO) up to
    but not including 0.5; not with --loss ipo"""
    lora_rank: int = 0
    """LoRA adapters of this rank on the policy's linear layers (0: off, the reference is a frozen copy); with adapters
    the reference is the policy with its adapters switched off, at no memory cost"""
    lora_alpha: float = 16.0
    """LoRA scale numerator, positive: the adapter output is multiplied by alpha / rank"""
    lora_target_modules: str = "all"
    """comma-separated names (suffixes) of the linear layers that get adapters; `all` means every linear layer inside
    the decoder blocks"""

    max_length: int = 512
    """longest prompt+response in tokens (capped at the model's context), at least 2; longer prompts lose tokens
    on the left, pairs with a response that does not fit are skipped"""
    eval_fraction: float = 0.1
    """fraction of the pairs held out for evaluation, strictly between 0 and 1 (at least one pair is held out)"""
    randomwalks_pairs: int = 4000
    """randomwalks: number of training pairs drawn (held-out pairs come from held-out walks)"""
    samples_per_prompt: int = 4
    """sentiment: continuations of each prompt sampled from --model (temperature 1, no top-k), taken two by two as pairs
    (pairs VADER scores equal are dropped), so at least 2; the pairs are written to sentiment_pairs.jsonl in the run
    directory, in the format of --task jsonl"""
    max_new_tokens: int = 24
    """sentiment and text tasks: tokens sampled per continuation (pairs, evaluation samples)"""
    generation_batch_size: int = 64
    """sentiment: prompts per batch when sampling the continuations"""
    eval_prompts: int = 64
    """text tasks: held-out prompts whose sampled continuations are scored at each evaluation (VADER on sentiment, the
    win rate with --reward-model) and give the KL to the reference"""

    num_epochs: int = 1
    """passes over the training pairs"""
    batch_size: int = 64
    """pairs per optimizer step, over all ranks (each of N data-parallel ranks takes batch_size / N;
    64 splits over 1, 2, 4 or 8)"""
    micro_batch_size: Optional[int] = None
    """pairs per forward/backward pass on one rank, chosen and rejected together (default: the rank's whole share,
    batch_size / ranks); the share must be a multiple of it"""
    packing: bool = False
    """pack a micro-batch's sequences (both sides of each pair) into rows no longer than its longest instead of padding
    each, attention kept within each by restarting position ids (same loss; not with --cp or --sequence-parallel)"""
    learning_rate: float = 1e-4
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW weight decay (0: none)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warm-up: cosine or linear to zero, or constant"""
    warmup_steps: int = 5
    """optimizer steps of linear learning-rate warm-up (0: none)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""

    eval_every: int = 20
    """optimizer steps between evaluations (also before the first step and at the end)"""
    eval_samples_per_start: int = 20
    """randomwalks: walks sampled (temperature 1) from each start node for the sampled optimality"""
    save_every: int = 0
    """optimizer steps between checkpoints; 0 saves only the final model"""
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
    """Every flag, checked before anything is loaded, sampled or written: ranges, sizes that must
    divide, and what depends on the number of processes. Returns the flags with --micro-batch-size
    settled."""

    def require(ok: bool, flag: str, what: str):
        if not ok:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} {what}")

    # The least value of each integer flag (1 unless named here), with the reason where it is not plain.
    least = dict(seed=0, warmup_steps=0, save_every=0, lora_rank=0, max_length=2, samples_per_prompt=2)
    reason = {
        "max_length": ": room for a prompt token and a response token",
        "samples_per_prompt": ": a pair is two continuations of one prompt",
    }
    for name, kind in Args.__annotations__.items():
        minimum = least.get(name, 1)
        if kind is int:
            require(getattr(args, name) >= minimum, name, f"must be at least {minimum}{reason.get(name, '')}")
    for flag in ("learning_rate", "max_grad_norm", "beta", "lora_alpha"):
        require(0 < getattr(args, flag) < math.inf, flag, "must be a positive number")
    require(0 <= args.weight_decay < math.inf, "weight_decay", "must be 0 or a positive number")
    require(0 < args.eval_fraction < 1, "eval_fraction", "must lie strictly between 0 and 1")
    require(0 <= args.label_smoothing < 0.5, "label_smoothing", "must lie in [0, 0.5): the chance a label is flipped")
    if args.label_smoothing and args.loss == "ipo":
        fail("--label-smoothing is conservative DPO's; IPO has no label noise term: drop it or use --loss dpo")
    require(args.pp == 1, "pp", "is not supported by dpo.py (no pipeline schedule); use --tp, --cp and --zero-stage")
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
    if args.packing and (args.cp > 1 or args.sequence_parallel):
        fail("--cp and --sequence-parallel do not compose with --packing; use them with data and tensor parallelism")
    if args.zero_stage == 3 and args.tp > 1:
        fail("--zero-stage 3 does not compose with --tp; use --zero-stage 0, 1 or 2")
    if args.lora_rank > 0 and args.tp > 1:
        fail("--lora-rank is not supported with --tp (the adapters would need splitting too); use --zero-stage instead")
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
        f"(--batch-size {args.batch_size} / {ranks} rank(s) = {share}); pick a divisor of {share}, "
        "or leave it unset",
    )
    if args.model is None and args.resume is None:
        fail(
            "--model is needed: the policy to train (on randomwalks an sft.py run: python sft.py --output-dir runs/sft)"
        )
    if args.reward_model is not None and args.task == "randomwalks":
        fail("--reward-model judges text tasks; randomwalks is judged by the walks' true optimality: drop it")
    if args.chat_template and not os.path.isfile(args.chat_template):
        fail(f"--chat-template {args.chat_template}: no such file; pass the path of a Jinja chat template")
    parallel.check_output_dir(args)
    return replace(args, micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------------------------------
# The randomwalks task (trlX's examples/randomwalks), as in sft.py. Preference pairs are two walks
# from the same start whose optimality differs; the more optimal one is chosen.
# ---------------------------------------------------------------------------------------------
RANDOMWALKS_SEED = 1000
RANDOMWALKS_NODES = 21
RANDOMWALKS_MAX_NODES = 10  # a walk has at most this many nodes, start included


def generate_random_walks(n_walks=1000):
    """The graph (boolean adjacency [n, n]) and the walks (lists of node indices), drawn exactly as trlX does."""
    rng = np.random.RandomState(RANDOMWALKS_SEED)
    while True:  # redraw until every node has a way out
        adjacency = rng.rand(RANDOMWALKS_NODES, RANDOMWALKS_NODES) > 0.9
        np.fill_diagonal(adjacency, False)
        if adjacency.any(axis=1).all():
            break
    adjacency[0, :] = False  # the goal is absorbing
    adjacency[0, 0] = True
    walks = []
    for _ in range(n_walks):
        node = rng.randint(RANDOMWALKS_NODES)
        while node == 0:
            node = rng.randint(RANDOMWALKS_NODES)
        walk = [node]
        for _ in range(RANDOMWALKS_MAX_NODES - 1):
            node = rng.choice(np.nonzero(adjacency[node])[0])
            walk.append(node)
            if node == 0:
                break
        walks.append(walk)
    return adjacency, walks


def node_letter(node: int) -> str:
    return chr(ord("a") + int(node))


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


def perturb_walk(walk: list, rng: np.random.RandomState, n_nodes=RANDOMWALKS_NODES) -> list:
    """A corrupted copy of a walk: a node replaced by a random one (usually a missing edge), or the
    walk cut before its end (usually never reaching the goal). Gives the reward model bad walks
    of the kind a policy produces, which the random-walk data alone has too few of."""
    if len(walk) < 2:
        return walk
    if rng.rand() < 0.5:
        position = rng.randint(1, len(walk))
        return walk[:position] + [rng.randint(n_nodes)] + walk[position + 1 :]
    return walk[: rng.randint(1, len(walk))]


def randomwalks_pairs(walks: list, n_pairs: int, adjacency, shortest, rng: np.random.RandomState) -> list:
    """Preference pairs from the walks and one perturbed copy of each: two walks from the same
    start with different optimality, drawn uniformly over starts, then over walks."""
    pool = walks + [perturb_walk(walk, rng) for walk in walks]
    by_start = {}
    for walk in pool:
        letters = "".join(node_letter(n) for n in walk)
        by_start.setdefault(letters[0], []).append((letters, walk_optimality(letters, adjacency, shortest)))
    starts = sorted(s for s, group in by_start.items() if len({score for _, score in group}) > 1)
    if not starts:  # a handful of walks, when --eval-fraction leaves one side almost none
        fail(
            f"no start node has two walks of different optimality among {len(walks)} walks; "
            "move --eval-fraction away from 0 and 1"
        )
    pairs = []
    while len(pairs) < n_pairs:
        group = by_start[starts[rng.randint(len(starts))]]
        (walk_a, score_a), (walk_b, score_b) = (group[i] for i in rng.choice(len(group), 2, replace=False))
        if score_a != score_b:
            chosen, rejected = (walk_a, walk_b) if score_a > score_b else (walk_b, walk_a)
            pairs.append({"prompt": chosen[0], "chosen": chosen[1:], "rejected": rejected[1:]})
    return pairs


# ---------------------------------------------------------------------------------------------
# Data: every task becomes a list of {"prompt", "chosen", "rejected", "tools"} pairs, chosen and
# rejected two responses to the same prompt, all strings (standard) or all message lists
# (conversational, rendered by the chat template). hh and tldr records are turned into standard
# pairs first, so that one path checks and tokenizes the pairs of every task (a record may also
# carry reward_model.py's "margin": DPO has no use for it).
# ---------------------------------------------------------------------------------------------
def read_records(path: str) -> list:
    """Records of a .jsonl or .jsonl.gz file (malformed lines are named by number), or through the
    optional datasets package of a .parquet file or a directory `Dataset.save_to_disk` wrote."""
    if not os.path.exists(path):
        fail(f"data file {path!r} does not exist; pass --data with the path of a .jsonl file")
    if os.path.isdir(path) or path.endswith(".parquet"):
        try:
            import datasets
        except ImportError:
            fail(f"reading {path} needs the datasets package: pip install datasets (or convert it to .jsonl)")
        try:
            return (
                datasets.load_from_disk(path) if os.path.isdir(path) else datasets.Dataset.from_parquet(path)
            ).to_list()
        except Exception as error:  # a corrupt file, a folder of something else, a dictionary of splits
            fail(
                f"cannot read {path} as a dataset ({type(error).__name__}: {str(error).split(chr(10))[0]}); pass a "
                ".jsonl file, a .parquet file or the directory of one split"
            )
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
    """A message list: a non-empty list of dicts, each with a string "role" and a string "content"."""
    messages = value if isinstance(value, list) and value else [None]
    return all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content")) for m in messages)


def upstream_record(task: str, record: dict) -> Optional[dict]:
    """An hh-rlhf pair of dialogues (the prompt: all up to the last "\\n\\nAssistant:") or a
    summarize-from-feedback comparison (OpenAI's prompt format, as sft.py's) as a standard preference
    record; None where it is no pair of replies to one prompt; itself where it lacks the fields."""
    if task == "hh" and isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str):
        marker = "\n\nAssistant:"
        (prompt, found, chosen), (other, found_too, rejected) = (
            record[k].rpartition(marker) for k in ("chosen", "rejected")
        )
        if not (found and found_too) or prompt != other:
            return None  # no final assistant reply, or the dialogues differ before it
        return {"prompt": prompt + marker, "chosen": chosen, "rejected": rejected}
    if task == "hh" or not {"info", "summaries", "choice"} <= record.keys():
        return record
    info, summaries, choice = record["info"], record["summaries"], record["choice"]
    if not info.get("post") or len(summaries) != 2 or choice not in (0, 1):
        return None  # the comparisons also hold CNN/DM articles, which have no post
    prompt = f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {info['post']}\n\nTL;DR:"
    chosen, rejected = (" " + summaries[i]["text"].strip() for i in (choice, 1 - choice))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def download(task: str) -> list:
    """Fetch the upstream training comparisons from the Hugging Face hub (online only) and return their paths."""
    from huggingface_hub import snapshot_download

    repo, patterns = {
        "hh": ("Anthropic/hh-rlhf", ["*/train.jsonl.gz"]),
        "tldr": ("openai/summarize_from_feedback", ["comparisons/train/*.parquet"]),
    }[task]
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=patterns)
    except Exception as error:  # offline, gated, renamed: all end the same way for the user
        fail(f"could not download {repo} ({type(error).__name__}); without a network pass --data with a local copy")
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in sorted(names)]
    return sorted(p for p in paths if p.endswith((".jsonl.gz", ".parquet")))


def preference_pair(record: dict, where: str) -> tuple:
    """(pair, kind) of a record: `prompt`, `chosen`, `rejected` all strings (standard) or all message
    lists (conversational); or `chosen` and `rejected` conversations (implicit prompt): their longest
    common prefix of messages is the prompt, the rest each side's completion. The pair keeps the
    record's "tools" (for the chat template)."""
    prompt, chosen, rejected = values = tuple(record.get(key) for key in ("prompt", "chosen", "rejected"))
    implicit = prompt is None and is_conversation(chosen) and is_conversation(rejected)
    if implicit:
        shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt or (chosen != rejected and not (chosen and rejected)):
            fail(f"{where}: 'chosen' and 'rejected' must open with the same messages (the prompt), then each go on")
    elif not (all(map(is_conversation, values)) or all(isinstance(value, str) for value in values)):
        fail(
            f"{where}: expected 'prompt', 'chosen', 'rejected' (all strings or all message lists) or 'chosen', "
            "'rejected' (conversations opening with the same messages, the prompt); found fields "
            + (", ".join(record) or "none")
        )
    kind = ("standard" if isinstance(prompt, str) else "conversational") + " implicit-prompt" * implicit
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, tools=record.get("tools")), f"{kind} preference"


def load_pairs(task: str, data: Optional[str]) -> list:
    """Preference pairs of a text task; a record of no kind, or of another kind than the first's,
    stops the run. Pairs whose two responses are identical carry no preference and are dropped with a
    count (hh-rlhf has some); so are upstream records the format cannot split."""
    if task == "jsonl" and data is None:
        fail('--task jsonl needs --data PATH (a file of {"prompt": ..., "chosen": ..., "rejected": ...} lines)')
    paths = [data] if data else download(task)
    pairs, unusable, first = [], 0, None
    for path in paths:
        for number, record in enumerate(read_records(path), 1):
            record = record if task == "jsonl" else upstream_record(task, record)
            if record is None:
                unusable += 1
                continue
            where = f"{path}, record {number}"
            pair, kind = preference_pair(record, where)
            first = first or (kind, where)
            if kind != first[0]:
                fail(f"{where} is a {kind} record but {first[1]} a {first[0]} one; the data must be of one kind")
            pairs.append(pair)
    identical = sum(pair["chosen"] == pair["rejected"] for pair in pairs)
    pairs = [pair for pair in pairs if pair["chosen"] != pair["rejected"]]
    if unusable:
        print(f"skipped {unusable} records that do not form a pair of replies to one prompt")
    if identical:
        print(f"dropped {identical} pairs whose chosen and rejected responses are identical (no preference to learn)")
    if not pairs:
        fail(f"no preference pairs in {', '.join(paths)}; the file is empty or no record has two different responses")
    return pairs


SENTIMENT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "sentiment_prompts.jsonl")
SENTIMENT_PAIRS = "sentiment_pairs.jsonl"  # the sampled pairs, kept in the run directory


def load_sentiment_prompts(data: Optional[str]) -> list:
    """The openings to continue, each once: the shipped file, or --data's `{"prompt"}` records, all
    strings or all message lists."""
    path, prompts = data or SENTIMENT_PROMPTS, {}
    for number, record in enumerate(read_records(path), 1):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) and not is_conversation(prompt):
            fail(
                f"{path}, record {number}: expected 'prompt' (a string or a message list), found fields "
                f"{', '.join(record) or 'none'}"
            )
        if prompts and isinstance(prompt, str) != isinstance(next(iter(prompts.values())), str):
            fail(f"{path}, record {number}: the prompts must be all strings or all message lists, not both")
        prompts.setdefault(json.dumps(prompt), prompt)
    if not prompts:
        fail(f"no prompts in {path}; the file is empty")
    return list(prompts.values())


def completion_of(prompt, text: str):
    """A reply's text as its prompt's kind of completion: the text, or one assistant message."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


@functools.cache
def vader():
    """VADER's analyser (the optional extra vaderSentiment): what ranks the sentiment task's pairs."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        fail(
            "--task sentiment ranks continuations with VADER: pip install vaderSentiment (or pip install -r "
            "requirements-examples.txt)"
        )
    return SentimentIntensityAnalyzer()


def sample_sentiment_pairs(prompts: list, args: Args, grid, device) -> list:
    """Preference pairs from --model's own continuations: --samples-per-prompt continuations of each
    prompt (a conversation rendered with the generation prompt) are sampled (temperature 1, no top-k
    or top-p: the LM's own distribution) until an end-of-turn id, taken two by two, and the one VADER
    finds more positive is chosen; ties carry no preference and are dropped with a count. Batches
    are dealt round-robin over the data-parallel ranks and each is sampled with a seed of its own on
    a forked RNG, so the pairs do not depend on the number of ranks and training's random stream is
    untouched."""
    lm, tokenizer = load_model(args.model, device, param_dtype(args), args.chat_template)
    # Prompts are cut on the left to leave --max-new-tokens of room in the context.
    room = max(1, (model_context(lm.config) or 1 << 30) - args.max_new_tokens)
    repeated = [p for p in prompts for _ in range(args.samples_per_prompt)]
    prompt_ids = [ids for p in prompts for ids in [tokenize_prompt(tokenizer, p)[0][-room:]] * args.samples_per_prompt]
    my_batches = list(enumerate(range(0, len(repeated), args.generation_batch_size)))[grid.dp_rank :: grid.dp_size]
    mine = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for number, start in tqdm.tqdm(my_batches, desc="sampling pairs", dynamic_ncols=True, disable=not grid.is_main):
            torch.manual_seed(
                int.from_bytes(hashlib.sha256(f"{args.seed}/sentiment pairs/{number}".encode()).digest()[:8], "little")
                & (2**63 - 1)
            )
            chunk = prompt_ids[start : start + args.generation_batch_size]
            mine.append((number, generate(lm, tokenizer, chunk, args.max_new_tokens, 1.0, device)))
    batches = sorted(b for part in parallel.all_gather_objects(mine, grid.dp_group) for b in part)
    sampled = [ids for _, batch in batches for ids in batch]
    texts = tokenizer.batch_decode(sampled, skip_special_tokens=True)  # for VADER only: the pairs keep the ids
    scores = [vader().polarity_scores(text)["compound"] for text in texts]
    pairs, ties = [], 0
    for first in range(0, len(texts) - 1, 2):
        if repeated[first] != repeated[first + 1] or scores[first] == scores[first + 1]:
            ties += repeated[first] == repeated[first + 1]
            continue
        chosen, rejected = (first, first + 1) if scores[first] > scores[first + 1] else (first + 1, first)
        pairs.append(
            {
                "prompt": repeated[first],
                "chosen": completion_of(repeated[first], texts[chosen]),
                "rejected": completion_of(repeated[first], texts[rejected]),
                "chosen_ids": sampled[chosen],
                "rejected_ids": sampled[rejected],
                "chosen_score": scores[chosen],
                "rejected_score": scores[rejected],
            }
        )
    if grid.is_main:
        print(
            f"sampled {len(texts)} continuations of {len(prompts)} prompts (mean VADER score {np.mean(scores):.3f}): "
            f"{len(pairs)} pairs, {ties} dropped as ties"
        )
    if not pairs:
        fail(
            f"no pair of {args.model}'s continuations differs in VADER score; raise --samples-per-prompt or "
            "--max-new-tokens"
        )
    return pairs


def write_jsonl_atomically(path: str, records: list):
    """Records as --task jsonl reads them, renamed into place only once complete."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)


def end_of_turn_ids(tokenizer, generation_config=None) -> set:
    """The tokenizer's EOS, the generation config's eos_token_id (an int, a list or None), and the
    added token the chat template writes right after an assistant's message (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>), with which chat models end a turn: often not the EOS."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
        )
        after = tokenizer(text[text.rfind("y") + 1 :], add_special_tokens=False)["input_ids"]
        if after and after[0] in tokenizer.added_tokens_decoder:  # a marker, not text (a newline) that ends turns
            ids.add(after[0])
    return ids - {None}


def tokenize_prompt(tokenizer, prompt, completions=(), tools=None) -> tuple:
    """(prompt ids, [each completion's ids]). A string prompt is tokenized with the tokenizer's
    special tokens (a BOS, say), each completion alone without them and an EOS after it (where to
    stop is part of what is preferred). A conversation is rendered by the chat template and
    tokenized without adding special tokens (the template writes any BOS): the prompt with the
    generation prompt, so that the assistant's reply comes next; each completion as the template
    writes it after the prompt in the whole conversation, through its last end-of-turn id (framing
    after it, ChatML's newline, is no part of the reply)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"], [
            tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for completion in completions
        ]
    if not tokenizer.chat_template:
        fail(
            f"the data is conversational and the tokenizer of {tokenizer.name_or_path!r} has no chat template; "
            "pass --chat-template PATH (a Jinja file)"
        )
    renderings = [(prompt, True)] + [(prompt + completion, False) for completion in completions]
    try:
        texts = [
            tokenizer.apply_chat_template(m, tools=tools, add_generation_prompt=g, tokenize=False)
            for m, g in renderings
        ]
    except Exception as error:  # a template's own checks raise (roles that do not alternate, say)
        fail(f"the chat template cannot render a conversation of the data: {error}")
    prompt_ids, *wholes = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
    end_of_turn, tails = end_of_turn_ids(tokenizer), []
    for whole in wholes:
        if whole[: len(prompt_ids)] != prompt_ids:
            fail(
                f"the chat template of {tokenizer.name_or_path!r} does not open a conversation's rendering with "
                "its prompt's (rendered with the generation prompt), so a completion has no place to start; pass "
                "--chat-template PATH with one that does"
            )
        tail = whole[len(prompt_ids) :]
        ends = [i for i, token in enumerate(tail) if token in end_of_turn]
        tails.append(tail[: ends[-1] + 1] if ends else tail)
    return prompt_ids, tails


def tokenize_pairs(tokenizer, pairs: list, max_length: int) -> list:
    """((chosen ids, its response start), (rejected ids, its response start)) per pair, each the
    prompt's ids (an EOS for an empty one, a position to predict the response from) then a
    response's, as tokenize_prompt splits them (a sampled pair's responses are its ids as sampled),
    reporting how many prompts were cut and how many pairs were skipped."""
    tokenized, truncated, too_long = [], 0, 0
    for pair in pairs:
        prompt_ids, responses = tokenize_prompt(
            tokenizer, pair["prompt"], [pair["chosen"], pair["rejected"]], pair.get("tools")
        )
        prompt_ids = prompt_ids or [tokenizer.eos_token_id]
        responses = [pair.get(f"{key}_ids") or ids for key, ids in zip(("chosen", "rejected"), responses)]
        if max(map(len, responses)) >= max_length:
            too_long += 1
            continue
        cuts = [max(0, len(prompt_ids) + len(ids) - max_length) for ids in responses]
        truncated += max(cuts) > 0
        tokenized.append(tuple((prompt_ids[cut:] + ids, len(prompt_ids) - cut) for ids, cut in zip(responses, cuts)))
    if truncated:
        print(
            f"{truncated} of {len(pairs)} pairs are longer than --max-length {max_length} tokens: their prompts were "
            "cut on the left"
        )
    if too_long:
        print(
            f"skipped {too_long} pairs with a response of {max_length} tokens or more (raise --max-length to keep them)"
        )
    if not tokenized:
        fail(f"no pairs left: every response is longer than --max-length {max_length}; raise it")
    return tokenized


# ---------------------------------------------------------------------------------------------
# The policy, its reference and their log-probabilities
# ---------------------------------------------------------------------------------------------
def param_dtype(args: Args) -> torch.dtype:
    """The dtype of the weights: fp32 (also under bf16 autocast), or fp64 under --dtype fp64."""
    return torch.float64 if args.dtype == "fp64" else torch.float32


def without_dropout(config):
    """A copy of the config without dropout: every number named for a drop (dropout, attn_pdrop, layerdrop)
    or a jitter (MoE router noise), in nested configs (text_config, attn_config) too. Build the model
    from it: attention modules keep the rate they read at init (Llama's self.attention_dropout)."""

    def zeroed(key: str, value):
        if isinstance(value, dict):
            return {k: zeroed(k, v) for k, v in value.items()}
        random = type(value) in (int, float) and ("drop" in key or "jitter" in key)
        return type(value)(0) if random else value  # an int stays an int: configs check their fields' types

    return config.__class__.from_dict(zeroed("", config.to_dict()))


def load_model(name: str, device, dtype=torch.float32, chat_template: Optional[str] = None):
    """A causal LM from a local directory or a hub name, with one clear line when it cannot be had.
    It is built without dropout (without_dropout): the implicit reward is the policy's log-ratio to
    the reference, and a dropout draw would make the two differ before any step."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name!r}: no such directory; pass a local model directory or a hub name such as gpt2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        config = without_dropout(AutoConfig.from_pretrained(name))
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}")
    if chat_template:  # saved with the tokenizer, so the run directory renders as training did
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {name!r} has no EOS token; responses need one to end")
    if tokenizer.pad_token_id is None:  # padding is masked out of every log-prob, so EOS serves as pad
        tokenizer.pad_token = tokenizer.eos_token
    return kernels.use_linear(model.to(device)), tokenizer


# LoRA, written out (as in ppo.py): y = base(x) + (alpha / r) * B(A(x)), B initialised to zero so
# the adapted policy starts equal to the base, and the base (adapters off) is the reference.
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
        """The base layer with the update added into its weight (in place: merge_lora calls it on a copy)."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # [out, in]
        with torch.no_grad():
            self.base.weight += (delta.T if self.transposed else delta).to(self.base.weight.dtype)
        return self.base


def add_lora(model, rank: int, alpha: float, targets: str):
    """Freeze the model and wrap the chosen linear layers of its decoder blocks with LoRA."""
    count = model.config.num_hidden_layers
    blocks = [m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(blocks) != 1:
        fail(f"cannot find the {count} decoder layers of {type(model).__name__}; LoRA supports GPT-2, Llama, GPT-NeoX")
    model.requires_grad_(False)
    wanted = None if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    wrapped = []
    for block in blocks[0]:
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


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model, which under LoRA is the reference (a no-op without adapters)."""
    adapters = [m for m in model.modules() if isinstance(m, LoRA)]
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


def collate(sequences: list, pad_token_id: int, device, packing=False) -> dict:
    """A batch of (ids, response start): the model's keyword arguments, labels (-100 but on the responses) and the
    number in `sequences` of each token's sequence, by which sequence_logprobs sums each response. Padded: a row per
    sequence, right-padded, with an attention mask. Packed (--packing): rows of whole sequences, filled first fit from
    the longest and no longer than it; the position ids restart at 0 for each sequence and for the padding ending a
    row, by which transformers, given no attention mask and no cache, keeps attention within each sequence."""
    width, rows = max(len(ids) for ids, _ in sequences), []
    numbered = [(number, ids, start) for number, (ids, start) in enumerate(sequences)]
    for sequence in sorted(numbered, key=lambda sequence: -len(sequence[1])) if packing else numbered:
        fitting = [row for row in rows if packing and sum(len(ids) for _, ids, _ in row) + len(sequence[1]) <= width]
        if fitting:
            fitting[0].append(sequence)
        else:
            rows.append([sequence])
    batch = {"input_ids": [], "labels": [], "sequence": [], "position_ids" if packing else "attention_mask": []}
    for row in rows:
        ids = [token for _, tokens, _ in row for token in tokens]
        labels = [token if t >= max(start, 1) else -100 for _, tokens, start in row for t, token in enumerate(tokens)]
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_token_id] * pad)
        batch["labels"].append(labels + [-100] * pad)
        batch["sequence"].append([number for number, tokens, _ in row for _ in tokens] + [row[-1][0]] * pad)
        if packing:  # the padding is a sequence of its own, which no other attends to
            batch["position_ids"].append([t for _, tokens, _ in row for t in range(len(tokens))] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
    return {key: torch.tensor(value, device=device) for key, value in batch.items()}


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(response | prompt) of each sequence: the response tokens' log-probabilities, summed. The
    LM head runs through kernels.fused_logprobs, which builds no more of the [tokens, vocabulary] logits than a chunk,
    as the head module's forward for this one call: hooks on the head then fire as for any module
    call, which ZeRO-3 needs (it gathers the head's weight before the forward and again before the
    backward). Under --tp the head is this rank's slice of the vocabulary, and fused_logprobs
    combines the slices over its group."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # a cache would unpack --packing's rows
    head = model.get_output_embeddings()
    head.forward = lambda x: kernels.fused_logprobs(
        x, head.weight, batch["labels"][:, 1:], bias=head.bias, group=getattr(head, "group", None)
    )
    try:
        logprobs = head(hidden[:, :-1])  # fp32, or fp64 under --dtype fp64
    finally:
        del head.forward
    sums = logprobs.new_zeros(int(batch["sequence"].max()) + 1)
    return sums.index_add(0, batch["sequence"][:, 1:].flatten(), logprobs.flatten())


def pair_logprobs(model, pairs: list, pad_token_id: int, device, packing=False) -> torch.Tensor:
    """[pairs, 2] (chosen, rejected) response log-probabilities of a micro-batch of pairs, from one
    forward pass over both sides, padded or packed (--packing)."""
    sides = [c for c, _ in pairs] + [r for _, r in pairs]
    return sequence_logprobs(model, collate(sides, pad_token_id, device, packing)).view(2, -1).T


def response_lengths(pairs: list) -> torch.Tensor:
    """[pairs, 2] token counts of the chosen and rejected responses (EOS included)."""
    return torch.tensor([[len(c[0]) - c[1], len(r[0]) - r[1]] for c, r in pairs])


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, args: Args) -> tuple:
    """Per pair: the loss, and the implicit rewards beta * log(pi / ref) of the chosen and the
    rejected response. policy, reference: [pairs, 2] summed response log-probabilities (chosen,
    rejected); lengths: [pairs, 2] response token counts (reference and lengths are moved to the
    policy's dtype and device). With h the chosen minus the rejected log-ratio:

      dpo (Rafailov et al., 2023):  -log sigmoid(beta h), and with --label-smoothing eps the
          conservative DPO of Mitchell (2023), the expected loss when a label is wrong with
          probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h);
      ipo (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
          Preferences"): (h - 1 / (2 beta))^2, a squared loss that stops pushing once the margin is
          met, where DPO's keeps widening it on deterministic preferences;
      length-normalized: dpo with each log-ratio divided by its response's token count, so that a
          longer response does not get a larger implicit reward for its length alone (the
          normalisation SimPO, Meng et al., 2024, applies to its reward; here DPO's reference is
          kept)."""
    log_ratios = policy - reference.to(policy)
    if args.loss == "length-normalized":
        log_ratios = log_ratios / lengths.to(log_ratios)
    h = log_ratios[:, 0] - log_ratios[:, 1]
    if args.loss == "ipo":
        losses = (h - 1 / (2 * args.beta)) ** 2
    else:
        eps = args.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(args.beta * h) - eps * F.logsigmoid(-args.beta * h)
    rewards = args.beta * log_ratios.detach()
    return losses, rewards[:, 0], rewards[:, 1]


def accumulate_gradients(model, pairs: list, references: torch.Tensor, args: Args, grid, pad_token_id, autocast):
    """Backward over this rank's share of the batch in micro-batches; returns the summed [loss,
    pairs ranked right, chosen reward, rejected reward] of the share.

    Each micro-batch's summed loss is divided by --batch-size, the pair count of the whole global
    batch, not its own, so the accumulated gradient equals the one-big-batch gradient exactly. The
    data-parallel reduction averages over ranks, hence the factor dp_size. Only the last
    micro-batch's backward communicates (no_sync on the others)."""
    sums = torch.zeros(4, dtype=torch.float64)
    starts = range(0, len(pairs), args.micro_batch_size)
    for start, reference in zip(starts, references.split(args.micro_batch_size)):
        micro_batch = pairs[start : start + args.micro_batch_size]
        with model.no_sync() if start != starts[-1] else contextlib.nullcontext():
            with autocast:
                policy = pair_logprobs(model.module, micro_batch, pad_token_id, grid.device, args.packing)
            lengths = response_lengths(micro_batch)
            losses, chosen_rewards, rejected_rewards = preference_losses(policy, reference, lengths, args)
            (losses.sum() / args.batch_size * grid.dp_size).backward()
        right = chosen_rewards > rejected_rewards
        sums += torch.stack([losses.sum(), right.sum(), chosen_rewards.sum(), rejected_rewards.sum()]).detach().cpu()
    return sums


def share(items: list, rank: int, ranks: int) -> list:
    """Rank `rank`'s contiguous share of `items` for evaluation (the last ranks may get fewer, or
    none); concatenating the shares in rank order gives back `items`."""
    size = math.ceil(len(items) / ranks)
    return items[rank * size : (rank + 1) * size]


@torch.no_grad()
def all_pair_logprobs(model, pairs: list, args: Args, grid, pad_token_id, autocast) -> torch.Tensor:
    """[pairs, 2] (chosen, rejected) response log-probabilities of every pair under `model` as it
    is now: each data-parallel rank computes a contiguous share and the shares are gathered, so
    every rank holds all of them. The whole model is gathered once (a no-op below ZeRO-3), so ranks
    may run different numbers of forwards. The callers put the model in eval mode."""
    rows = []
    with model.gathered(), autocast:
        mine = share(pairs, grid.dp_rank, grid.dp_size)
        for start in range(0, len(mine), args.micro_batch_size):
            micro_batch = mine[start : start + args.micro_batch_size]
            rows.append(pair_logprobs(model.module, micro_batch, pad_token_id, grid.device, args.packing).cpu())
    gathered = [row for part in parallel.all_gather_objects(rows, grid.dp_group) for row in part]
    return torch.cat(gathered).to(param_dtype(args))


def reference_logprobs(model, train_pairs: list, eval_pairs: list, args, grid, pad_token_id, autocast, saved) -> dict:
    """{"train": [pairs, 2], "eval": [pairs, 2], "pairs": SHA-256 of the pairs' token ids}: the
    reference's log-probabilities of every pair. A new run computes them before the first step from
    the policy as loaded (under LoRA with its adapters off: the base, the reference at every step).
    Checkpoints keep the table in trainer_state.pt (under its manifest); a resumed run reads it from
    `saved`, its checkpoint's state, and stops with one line if it is missing or of other pairs:
    the policy it loads is trained, no reference to recompute them from."""
    fingerprint = hashlib.sha256(json.dumps([train_pairs, eval_pairs]).encode()).hexdigest()
    if saved is not None:
        if saved.get("reference_logprobs", {}).get("pairs") != fingerprint:
            fail(
                "--resume: the checkpoint holds no reference log-probabilities of these pairs (an older dpo.py wrote "
                "it, or --seed, --data, --max-length or the tokenizer changed); resume with the original flags"
            )
        return saved["reference_logprobs"]
    model.eval()  # as at evaluation (main puts it back in training mode)
    with adapters_disabled(model.module):
        train = all_pair_logprobs(model, train_pairs, args, grid, pad_token_id, autocast)
        held_out = all_pair_logprobs(model, eval_pairs, args, grid, pad_token_id, autocast)
    return {"train": train, "eval": held_out, "pairs": fingerprint}


def model_context(config):
    """Longest sequence the model's position embeddings allow (None when the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, device) -> list:
    """Response token ids for each prompt (token ids, leaving max_new_tokens of room in the model's
    context) up to its first end-of-turn id (end_of_turn_ids of the model's generation config),
    included (one cut at max_new_tokens has none): a left-padded batch decoded token by token on the
    KV cache of a model its callers put in eval mode, greedy at temperature 0, else sampled from softmax(logits /
    temperature) and nothing else (model.generate() would also apply what the checkpoint's generation_config.json
    asks, and evaluation would no longer measure the policy's own distribution)."""
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    stop, width = torch.tensor(sorted(stop_ids), device=device), max(map(len, prompts))
    step_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    cache, finished, tokens = None, torch.zeros(len(prompts), dtype=torch.bool, device=device), []
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
        if temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            next_ids = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
        next_ids = next_ids.masked_fill(finished, int(stop[0]))
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all():
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    rows = torch.stack(tokens, 1).tolist()
    return [ids[: next((i + 1 for i, token in enumerate(ids) if token in stop_ids), len(ids))] for ids in rows]


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints and logging (as in sft.py)
# ---------------------------------------------------------------------------------------------
ADAPTERS = "adapters"  # under LoRA a checkpoint keeps the adapters (adapters.safetensors); the base is --model


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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def judge_scores(judge, judge_tokenizer, tokenizer, prompts: list, prompt_ids: list, responses: list) -> torch.Tensor:
    """A reward_model.py model's raw scores of sampled responses (token ids) to prompts (pairs, for
    their prompt and tools), fed as it was trained: where its tokenizer is the policy's (the same
    vocabulary and chat template), the prompt's ids and the response's as sampled; else the response,
    decoded up to its end-of-turn token, tokenized as reward_model.py tokenizes a pair with the
    judge's tokenizer (a conversation rendered by its own chat template, the reply through its
    end-of-turn id; a string prompt and reply tokenized apart, no EOS added). The prompt is cut on
    the left to fit the judge's context; right-padded, the score read at the last real token."""
    context = model_context(judge.config) or 1 << 30
    sequences = [p + r for p, r in zip(prompt_ids, responses)]
    if (judge_tokenizer.get_vocab(), judge_tokenizer.chat_template) != (tokenizer.get_vocab(), tokenizer.chat_template):
        sequences = []
        for pair, text in zip(prompts, tokenizer.batch_decode(responses, skip_special_tokens=True)):
            prompt = pair["prompt"]
            ids, [reply] = tokenize_prompt(judge_tokenizer, prompt, [completion_of(prompt, text)], pair.get("tools"))
            sequences.append(ids + (reply[:-1] if isinstance(prompt, str) else reply))  # reward_model.py adds no EOS
    batch = collate([(ids[-context:], 0) for ids in sequences], judge.config.pad_token_id, judge.device)
    return judge(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float().cpu()


def sample_metrics(model, frozen, judge, prompts: list, tokenizer, args: Args, grid) -> dict:
    """Text tasks: continuations of held-out prompts sampled from the policy (temperature 1), their
    KL to the reference (the summed log-ratio of the sampled tokens, averaged over samples), their
    mean VADER score on sentiment, and with --reward-model the win rate of the policy's samples
    over the reference's, as the judge scores them (ties count half)."""
    device, mine = grid.device, share(prompts, grid.dp_rank, grid.dp_size)
    sums = torch.zeros(4, dtype=torch.float64)  # KL, VADER, wins, samples
    if mine:
        # Prompts are cut on the left to leave --max-new-tokens of room in the context.
        room = max(1, (model_context(model.config) or 1 << 30) - args.max_new_tokens)
        prompt_ids = [tokenize_prompt(tokenizer, p["prompt"], tools=p.get("tools"))[0][-room:] for p in mine]
        # The tokens as sampled (not the decoded text tokenized again), with an end-of-turn id only where one was drawn.
        responses = generate(model, tokenizer, prompt_ids, args.max_new_tokens, 1.0, device)
        batch = collate([(p + r, len(p)) for p, r in zip(prompt_ids, responses)], tokenizer.pad_token_id, device)
        policy_logprobs = sequence_logprobs(model, batch)  # before the adapters go off under LoRA
        with adapters_disabled(model):  # the reference: `frozen`, or under LoRA the policy with its adapters off
            reference_model = model if frozen is None else frozen
            log_ratio = policy_logprobs - sequence_logprobs(reference_model, batch)
            if judge is not None:  # the reference's own samples, for the judge to compare
                reference_responses = generate(reference_model, tokenizer, prompt_ids, args.max_new_tokens, 1.0, device)
        sums[0], sums[3] = log_ratio.double().sum().cpu(), len(mine)
        if args.task == "sentiment":
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            sums[1] = sum(vader().polarity_scores(text)["compound"] for text in texts)
        if judge is not None:
            ours = judge_scores(*judge, tokenizer, mine, prompt_ids, responses)
            theirs = judge_scores(*judge, tokenizer, mine, prompt_ids, reference_responses)
            sums[2] = ((ours > theirs).double() + 0.5 * (ours == theirs).double()).sum()
    sums = parallel.all_reduce_sum(sums.to(device), grid.dp_group).cpu()
    metrics = {"eval/kl": (sums[0] / sums[3]).item()}
    if args.task == "sentiment":
        metrics["eval/vader"] = (sums[1] / sums[3]).item()
    if judge is not None:
        metrics["eval/win_rate"] = (sums[2] / sums[3]).item()
    return metrics


def evaluate(
    model, frozen, judge, eval_pairs: list, references: dict, eval_prompts: list, tokenizer, graph, args, grid, autocast
) -> dict:
    """The DPO loss, the accuracy (the chosen response's implicit reward above the rejected one's)
    and the implicit rewards on the held-out pairs; then what the policy generates: on randomwalks
    the optimality of its greedy and sampled walks, on text tasks sample_metrics. Sampling runs on a
    forked RNG with a fixed seed per rank, so evaluation never perturbs training and every
    evaluation draws comparable samples. The whole model is gathered once (a no-op below ZeRO-3)."""
    model.eval()
    policy = all_pair_logprobs(model, eval_pairs, args, grid, tokenizer.pad_token_id, autocast)
    losses, chosen, rejected = preference_losses(policy, references["eval"], response_lengths(eval_pairs), args)
    metrics = {
        "eval/loss": losses.mean().item(),
        "eval/accuracy": (chosen > rejected).double().mean().item(),
        "eval/chosen_reward": chosen.mean().item(),
        "eval/rejected_reward": rejected.mean().item(),
        "eval/margin": (chosen - rejected).mean().item(),
    }
    device, sampler = grid.device, model.module
    with model.gathered(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        torch.manual_seed(args.seed + grid.dp_rank)
        if args.task == "randomwalks":
            starts = [node_letter(n) for n in range(1, RANDOMWALKS_NODES)]
            for temperature, repeats, name in ((0.0, 1, "greedy"), (1.0, args.eval_samples_per_start, "sampled")):
                prompts = [s for s in starts for _ in range(repeats)][grid.dp_rank :: grid.dp_size]
                prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
                completions = generate(sampler, tokenizer, prompt_ids, RANDOMWALKS_MAX_NODES, temperature, device)
                walks = [p + w for p, w in zip(prompts, tokenizer.batch_decode(completions, skip_special_tokens=True))]
                scores = [walk_optimality(walk, *graph) for walk in walks]
                scores = [s for part in parallel.all_gather_objects(scores, grid.dp_group) for s in part]
                metrics[f"eval/optimality_{name}"] = float(np.mean(scores))
        else:
            metrics.update(sample_metrics(sampler, frozen, judge, eval_prompts, tokenizer, args, grid))
    model.train()
    return metrics


def lr_scheduler(optimizer, args: Args, total_steps: int):
    """Linear warm-up over --warmup-steps, then --lr-schedule (constant, linear or cosine decay to 0)."""

    def factor(step):  # step counts finished optimizer steps
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        factors = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + np.cos(np.pi * progress))}
        return factors[args.lr_schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def preference_pairs(args: Args, grid, checkpoint: Optional[str]) -> tuple:
    """(training pairs, held-out pairs, every pair (sentiment: to keep), randomwalks' (adjacency,
    shortest paths) or None): the task's preference pairs, split before pairing for randomwalks so
    that no held-out walk is seen in training, and by prompt for sentiment."""
    pairs, graph = None, None
    if args.task == "randomwalks":
        adjacency, walks = generate_random_walks()
        graph = (adjacency, shortest_path_nodes(adjacency))
        n_eval_walks = int(len(walks) * args.eval_fraction)
        rng = np.random.RandomState(args.seed)
        train_pairs = randomwalks_pairs(walks[n_eval_walks:], args.randomwalks_pairs, *graph, rng)
        eval_pairs = randomwalks_pairs(
            walks[:n_eval_walks], max(1, int(args.randomwalks_pairs * args.eval_fraction)), *graph, rng
        )
    elif args.task == "sentiment":
        # Held-out pairs are those of held-out openings; a resumed run reads the pairs its run sampled.
        prompts = load_sentiment_prompts(args.data)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
        eval_prompts = {json.dumps(prompts[i]) for i in order[: max(1, int(len(prompts) * args.eval_fraction))]}
        if checkpoint:
            pairs = read_records(os.path.join(parallel.run_directory(checkpoint), SENTIMENT_PAIRS))
        else:
            pairs = sample_sentiment_pairs(prompts, args, grid, grid.device)
        eval_pairs = [p for p in pairs if json.dumps(p["prompt"]) in eval_prompts]
        train_pairs = [p for p in pairs if json.dumps(p["prompt"]) not in eval_prompts]
        if not eval_pairs:
            fail(
                f"no held-out pairs: the continuations of the {len(eval_prompts)} held-out prompts all tied; raise "
                "--eval-fraction or --samples-per-prompt"
            )
    else:
        pairs = load_pairs(args.task, args.data)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, int(len(pairs) * args.eval_fraction))
        eval_pairs, train_pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
    return train_pairs, eval_pairs, pairs, graph


def evaluation_models(args: Args, grid, device) -> tuple:
    """(a frozen reference to sample from, the judge (model, tokenizer)), each None when not needed:
    text tasks sample the reference at evaluation (under LoRA it is the policy with its adapters
    off, so no copy), and --reward-model judges their samples."""
    frozen = judge = None
    if args.task != "randomwalks" and not args.lora_rank:
        frozen = load_model(args.model, device, param_dtype(args))[0].requires_grad_(False).eval()
        frozen = parallel.split_sequences(parallel.tensor_parallel(frozen, grid.tp_group), grid, args.sequence_parallel)
    if args.reward_model:
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                args.reward_model, dtype=param_dtype(args), output_loading_info=True
            )
            judge_tokenizer = AutoTokenizer.from_pretrained(args.reward_model)  # its own, to render conversations
        except (OSError, ValueError) as error:
            fail(f"--reward-model {args.reward_model!r} could not be loaded: {str(error).splitlines()[0]}")
        if loading["missing_keys"] or model.config.num_labels != 1:  # a causal LM's score head is made up at random
            fail(
                f"--reward-model {args.reward_model!r} has no trained score head of one output; "
                "pass a reward_model.py run directory"
            )
        judge = model.to(device).eval(), judge_tokenizer
    return frozen, judge


def main(args: Args):
    # Flags, then the other ranks (a no-op without torchrun).
    args = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    grid = parallel.init_distributed(args.device, tp=args.tp, cp=args.cp)
    device, ranks = grid.device, grid.dp_size
    local_batch_size = args.batch_size // ranks
    if grid.is_main:
        print(
            f"batch {args.batch_size} = {ranks} data-parallel rank(s) x "
            f"{local_batch_size // args.micro_batch_size} micro-batch(es) of {args.micro_batch_size}"
        )
    if args.task == "sentiment":
        vader()  # a missing optional extra ends the run here, before anything is written
    checkpoint = parallel.find_checkpoint(args.resume, verbose=grid.is_main) if args.resume else None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data and models: the pairs, the policy, and for text tasks a frozen reference to sample from
    # (under LoRA, the policy with its adapters off; randomwalks needs none after the log-probs).
    train_pairs, eval_pairs, pairs, graph = preference_pairs(args, grid, checkpoint)
    policy, tokenizer = load_model(
        checkpoint if checkpoint and not args.lora_rank else args.model, device, param_dtype(args), args.chat_template
    )
    if args.lora_rank:
        add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_target_modules)
        if checkpoint:  # under LoRA a checkpoint keeps only the adapters: the base is --model
            adapters = dict(parallel.stored_tensors(checkpoint, ADAPTERS))
            missing, unexpected = policy.load_state_dict(adapters, strict=False)
            assert not unexpected, unexpected
    max_length = min(args.max_length, model_context(policy.config) or args.max_length)
    train_sequences = tokenize_pairs(tokenizer, train_pairs, max_length)
    eval_sequences = tokenize_pairs(tokenizer, eval_pairs, max_length)
    eval_prompts = list({json.dumps(p["prompt"]): p for p in eval_pairs}.values())[: args.eval_prompts]
    steps_per_epoch = len(train_sequences) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} exceeds the {len(train_sequences)} training pairs; lower it")
    total_steps = steps_per_epoch * args.num_epochs
    frozen, judge = evaluation_models(args, grid, device)
    if judge and not isinstance(eval_prompts[0]["prompt"], str) and not judge[1].chat_template:
        fail(f"--reward-model {args.reward_model}: its tokenizer has no chat template to render the conversations")

    policy = parallel.tensor_parallel(policy, grid.tp_group)  # a no-op unless --tp > 1
    policy = parallel.split_sequences(policy, grid, args.sequence_parallel)  # a no-op unless --cp > 1 or asked
    model = parallel.data_parallel(policy, grid.dp_cp_group, args.zero_stage, tp_group=grid.tp_group)
    optimizer = model.make_optimizer(torch.optim.AdamW, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = lr_scheduler(optimizer, args, total_steps)

    # The reference's log-probabilities of every pair (a resumed run reads its checkpoint's), then the run directory.
    fixed = ("batch_size", "lora_rank")  # the data position's unit, and the model
    states = parallel.load_checkpoint(checkpoint, grid, asdict(args), fixed) if checkpoint else (None, None)
    saved = states[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    pad = tokenizer.pad_token_id
    references = reference_logprobs(model, train_sequences, eval_sequences, args, grid, pad, autocast, saved)
    trained = (optimizer, model, {"model": model.module})  # what the optimizer steps, as checkpoints save it
    state, run_name, run_dir = parallel.open_run(checkpoint, args, grid, trained, scheduler, states)
    step, wandb_id = (state["step"], state["wandb_id"]) if state else (0, None)
    if grid.is_main and not checkpoint and args.task == "sentiment":
        write_jsonl_atomically(os.path.join(run_dir, SENTIMENT_PAIRS), pairs)
    if grid.is_main:
        tokenizer.save_pretrained(run_dir)
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track and grid.is_main else None

    def evaluation() -> dict:
        results = evaluate(
            model, frozen, judge, eval_sequences, references, eval_prompts, tokenizer, graph, args, grid, autocast
        )
        if grid.is_main:
            progress.write(f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in results.items()))
        return results

    # The loop: one optimizer step per batch of pairs; each rank takes a contiguous share of it,
    # accumulated over micro-batches.
    model.train()
    progress = tqdm.tqdm(
        total=total_steps, initial=step, desc="dpo", dynamic_ncols=True, mininterval=1.0, disable=not grid.is_main
    )
    metrics, started, start_step = {}, time.time(), step
    first = saved["first_eval"] if checkpoint else evaluation()  # where the policy started: the reference itself
    parallel.catch_stop_signals()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        start = position * args.batch_size + grid.dp_rank * local_batch_size  # this rank's share of the batch
        # The epoch's shuffled order is a function of (seed, epoch) alone, so a resumed run replays it.
        generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        mine = torch.randperm(len(train_sequences), generator=generator)[start : start + local_batch_size].tolist()
        batch = [train_sequences[i] for i in mine]
        sums = accumulate_gradients(model, batch, references["train"][mine], args, grid, pad, autocast)
        sums = parallel.all_reduce_sum(sums.to(device), grid.dp_group).cpu() / args.batch_size
        grad_norm = model.clip_grad_norm_(args.max_grad_norm)
        if not math.isfinite(sums[0]) or not torch.isfinite(grad_norm):  # every rank sees the same sums
            fail(
                f"the loss is {sums[0].item()} and the gradient norm {float(grad_norm)} at step {step + 1}, so "
                "training would learn nothing; lower --learning-rate, or check the data"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        progress.update(1)
        progress.set_postfix(loss=f"{sums[0]:.4f}", accuracy=f"{sums[1]:.3f}")
        metrics = {
            "train/loss": sums[0].item(),
            "train/accuracy": sums[1].item(),
            "train/chosen_reward": sums[2].item(),
            "train/rejected_reward": sums[3].item(),
            "train/margin": (sums[2] - sums[3]).item(),
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/epoch": step / steps_per_epoch,
            "time/steps_per_s": (step - start_step) / (time.time() - started),
        }
        if step % args.eval_every == 0 or step == total_steps:
            metrics.update(evaluation())
        if wandb_run:
            wandb_run.log(metrics, step=step)
        stop = step < total_steps and parallel.stop_requested(grid)  # SIGTERM: checkpoint and exit 0
        if stop or args.save_every and step % args.save_every == 0 and step < total_steps:
            trainer_state = {
                "step": step,
                "scheduler": scheduler.state_dict(),
                "args": asdict(args),
                "run_name": run_name,
                "wandb_id": wandb_run.id if wandb_run else None,
                "first_eval": first,
                "reference_logprobs": references,
            }
            # Under LoRA only the adapters (the base is --model); otherwise the policy, loadable as a model.
            weights = parallel.dense_tensors(model.module, model, grid)
            weights = (
                {ADAPTERS: ((k, v) for k, v in weights if ".lora_" in k)} if args.lora_rank else {"model": weights}
            )
            name, keep = f"step_{step:08d}", args.keep_checkpoints
            config = () if args.lora_rank else (model.module,)
            parallel.save_checkpoint(run_dir, name, grid, keep, trainer_state, weights, (*config, tokenizer), trained)
        if stop:
            return parallel.report_stop(run_dir, grid, f"step {step}")
    progress.close()

    with model.gathered() if args.lora_rank else contextlib.nullcontext():  # merging copies the (small) LoRA model
        policy = merge_lora(model.module)
    parallel.save_final(run_dir, grid, {"model": parallel.dense_tensors(policy, model, grid)}, (policy, tokenizer))
    if not grid.is_main:
        return
    summary = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    last_step = {k: v for k, v in metrics.items() if k.startswith(("train/", "time/"))}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump({"step": step, **summary, "start": first, "last_step": last_step}, file, indent=1)
    print(
        f"saved {run_dir} after {step} steps in {time.time() - started:.0f}s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
        + " (at step 0: "
        + ", ".join(f"{k} {v:.4f}" for k, v in first.items() if "optimality" in k or k in ("eval/vader", "eval/kl"))
        + ")"
    )
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()


if __name__ == "__main__":
    with parallel.clean_exit():
        main(tyro.cli(Args))
