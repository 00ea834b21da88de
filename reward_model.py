"""Reward model training: a scalar score for a response, learned from human comparisons.

The reward model stands in for the human in RLHF. It is a causal LM backbone with a linear head
on the hidden state of the last real token, trained on pairs where one response was preferred
(Bradley-Terry: -log sigmoid(r_chosen - r_rejected)). The default task runs offline on a CPU:

    python reward_model.py                                  # randomwalks, fresh 6-layer GPT-2
    python reward_model.py --model runs/sft                 # start from sft.py's checkpoint
    python reward_model.py --task jsonl --data pairs.jsonl --model gpt2
    python reward_model.py --task jsonl --data chats.jsonl --model runs/sft-chat   # conversations, its chat template
    python reward_model.py --task sentiment --model runs/smollm2-135m  # the model's own samples, ranked by VADER
    python reward_model.py --task hh --model EleutherAI/pythia-160m      # needs the network
    torchrun --nproc_per_node 8 reward_model.py --model ... --zero-stage 3   # data parallel, see parallel.py
    torchrun --nproc_per_node 8 reward_model.py --model ... --tp 2 --pp 2    # tensor x pipeline x data parallel

The run directory holds a model that `AutoModelForSequenceClassification.from_pretrained(run_dir)`
loads (num_labels=1), with the mean and std of its scores on held-out responses in its config
(`reward_mean`, `reward_std`) so that a consumer can normalise rewards.

Reading order. The method is `main` (at the bottom): preference pairs, model, then the loop of
optimizer steps over pairs, with the Bradley-Terry loss of `pairwise_loss` on `sequence_scores`
(the score of the last real token, chosen and rejected in one forward); `evaluate` and the
optimality correlation after it. Above it, in file order: Args and check_args; the randomwalks
pairs; the data parsers and `tokenize_pairs`; the model and `score`; the sentiment pairs; run
directory, checkpoints and logging (plumbing).
"""

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
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

import kernels
import parallel


@dataclass
class Args:
    exp_name: str = "reward_model"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (head init, pair sampling, data order): any integer from 0"""
    task: Literal["randomwalks", "sentiment", "jsonl", "hh", "tldr"] = "randomwalks"
    """randomwalks: built-in offline pairs of walks; sentiment: pairs of continuations of movie-review openings
    (examples/sentiment_prompts.jsonl) sampled from --model itself, the more positive by VADER chosen (needs
    vaderSentiment); jsonl: preference records from --data, `{"prompt", "chosen", "rejected"}` as strings or message
    lists (optional "margin", "tools"), or `{"chosen", "rejected"}` conversations whose shared first messages are the
    prompt; hh: Anthropic/hh-rlhf chosen/rejected dialogues; tldr: OpenAI summarize-from-feedback comparisons (hh and
    tldr download from the hub unless --data is given)"""
    data: Optional[str] = None
    """local data: required for --task jsonl; for sentiment `{"prompt"}` records (strings or message lists) replacing
    the shipped ones; for hh/tldr a local copy in the upstream format (.jsonl, .jsonl.gz; .parquet or a directory
    saved by `datasets` need the datasets package)"""
    chat_template: Optional[str] = None
    """a Jinja chat template file replacing the tokenizer's (saved with it) for conversational data, which is rendered
    by the template: prompts with the generation prompt, each completion through its end-of-turn token"""
    model: Optional[str] = None
    """hub name or local path of a causal LM (an sft.py run directory, say); default: a fresh 6-layer GPT-2 for
    randomwalks"""
    dtype: Literal["fp32", "bf16", "fp64"] = "fp32"
    """fp32; bf16: autocast for the forward pass (weights and optimizer stay fp32); fp64: weights and every computation
    in float64, slow, for checking that two layouts compute the same math (the tests compare runs this way)"""
    device: str = "auto"
    """torch device; auto picks cuda when present, else cpu"""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage under torchrun: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also
    parameters"""
    tp: int = 1
    """tensor-parallel ranks per model copy under torchrun (attention heads, MLP and vocabulary split over them; the
    score head stays whole; data parallel takes the remaining ranks)"""
    pp: int = 1
    """pipeline stages per model copy under torchrun (decoder layers split in contiguous stages, 1F1B schedule over the
    micro-batches; the last stage scores)"""
    cp: int = 1
    """context-parallel ranks per model copy under torchrun (Ulysses: each holds 1/cp of every sequence through the
    whole model, attention trades positions for heads; for sequences whose activations outgrow one device)"""
    sequence_parallel: bool = False
    """with --tp: also split the activations between the tensor-parallel matmuls (norms, residual adds) along the
    sequence (Megatron sequence parallelism: the same communication, 1/tp of those activations)"""
    output_dir: Optional[str] = None
    """where the run directory goes; default runs/<run name>"""

    max_length: int = 512
    """longest prompt+response in tokens (capped at the model's context), at least 2; longer prompts lose tokens
    on the left, responses are never cut"""
    eval_fraction: float = 0.1
    """fraction of the pairs held out for evaluation and for the score statistics, strictly between 0 and 1
    (at least one pair is held out)"""
    randomwalks_pairs: int = 4000
    """randomwalks: number of training pairs drawn (held-out pairs come from held-out walks)"""
    samples_per_prompt: int = 4
    """sentiment: continuations of each prompt sampled from --model (temperature 1, no top-k), taken two by two as pairs
    (pairs VADER scores equal are dropped), so at least 2; the pairs are written to sentiment_pairs.jsonl in the run
    directory, in the format of --task jsonl"""
    max_new_tokens: int = 24
    """sentiment: tokens sampled per continuation"""
    generation_batch_size: int = 64
    """sentiment: prompts per batch when sampling the continuations"""

    num_epochs: int = 3
    """passes over the training pairs"""
    batch_size: int = 64
    """pairs per optimizer step, over all ranks (each of N data-parallel ranks takes batch_size / N;
    64 splits over 1, 2, 4 or 8)"""
    micro_batch_size: Optional[int] = None
    """pairs per forward/backward pass on one rank, chosen and rejected together (default: the rank's whole share,
    batch_size / ranks); the share must be a multiple of it"""
    packing: bool = False
    """pack each micro-batch's sequences into rows no longer than its longest instead of padding each to it, attention
    kept within each sequence by position ids that restart (same loss; not with --cp or --sequence-parallel)"""
    learning_rate: float = 1e-3
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW weight decay (0: none)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warm-up: cosine or linear to zero, or constant"""
    warmup_steps: int = 10
    """optimizer steps of linear learning-rate warm-up (0: none)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""

    eval_every: int = 50
    """optimizer steps between evaluations (and at the end)"""
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

    at_least_1 = (
        "tp pp cp randomwalks_pairs max_new_tokens generation_batch_size num_epochs batch_size eval_every "
        "keep_checkpoints"
    )
    rules = (  # (flags, the rule, what it says when broken)
        (at_least_1, lambda v: v >= 1, "must be at least 1"),
        ("seed warmup_steps save_every", lambda v: v >= 0, "must be 0 or more"),
        ("learning_rate max_grad_norm", lambda v: 0 < v < math.inf, "must be a positive number"),
        ("weight_decay", lambda v: 0 <= v < math.inf, "must be 0 or a positive number"),
        ("eval_fraction", lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
        ("max_length", lambda v: v >= 2, "leaves no room for a prompt token and a response token; use at least 2"),
        ("samples_per_prompt", lambda v: v >= 2, "must be at least 2: a pair is two continuations of one prompt"),
    )
    for flags, ok, what in rules:
        for flag in flags.split():
            require(ok(getattr(args, flag)), flag, what)
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
    flag = "--pp" if args.pp > 1 else "--packing" if args.packing else None  # a flag needing whole rows on a rank
    if flag and (args.cp > 1 or args.sequence_parallel):
        fail(f"--cp and --sequence-parallel do not compose with {flag}; use them with data and tensor parallelism")
    if args.zero_stage == 3 and args.tp * args.pp > 1:
        fail("--zero-stage 3 does not compose with --tp or --pp; use --zero-stage 0, 1 or 2")
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
    if args.task != "randomwalks" and args.model is None and args.resume is None:
        fail(f"--task {args.task} needs --model (a hub name or a local directory)")
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
    """The graph (boolean adjacency [n, n]) and the walks (strings of node letters), drawn exactly as trlX does."""
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
        walks.append("".join(node_letter(n) for n in walk))
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


def randomwalks_tokenizer() -> PreTrainedTokenizerFast:
    """One token per node letter (token id = node index), then EOS, pad and unknown."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {node_letter(i): i for i in range(RANDOMWALKS_NODES)}
    vocab.update({"<eos>": RANDOMWALKS_NODES, "<pad>": RANDOMWALKS_NODES + 1, "<unk>": RANDOMWALKS_NODES + 2})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # letters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def randomwalks_model(tokenizer) -> GPT2ForSequenceClassification:
    """The task's GPT-2 (6 layers, 144 hidden, 12 heads, context 16) with a scalar head."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=144,
        n_layer=6,
        n_head=12,
        num_labels=1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2ForSequenceClassification(without_dropout(config))


def perturb_walk(walk: str, rng: np.random.RandomState, n_nodes=RANDOMWALKS_NODES) -> str:
    """A corrupted copy of a walk: a node replaced by a random one (usually a missing edge), or the
    walk cut before its end (usually never reaching the goal). Gives the reward model bad walks
    of the kind a policy produces, which the random-walk data alone has too few of."""
    if len(walk) < 2:
        return walk
    if rng.rand() < 0.5:
        position = rng.randint(1, len(walk))
        return walk[:position] + node_letter(rng.randint(n_nodes)) + walk[position + 1 :]
    return walk[: rng.randint(1, len(walk))]


def randomwalks_pairs(walks: list, n_pairs: int, adjacency, shortest, rng: np.random.RandomState) -> list:
    """Preference pairs from the walks and one perturbed copy of each: two walks from the same
    start with different optimality, drawn uniformly over starts, then over walks."""
    pool = walks + [perturb_walk(walk, rng) for walk in walks]
    by_start = {}
    for walk in pool:
        by_start.setdefault(walk[0], []).append((walk, walk_optimality(walk, adjacency, shortest)))
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
            pairs.append({"prompt": chosen[0], "chosen": chosen[1:], "rejected": rejected[1:], "margin": 0.0})
    return pairs


# ---------------------------------------------------------------------------------------------
# Data: every task becomes a list of {"prompt", "chosen", "rejected", "margin", "tools"} pairs,
# chosen and rejected two responses to the same prompt, all strings (standard) or all message
# lists (conversational, rendered by the chat template). hh and tldr records are turned into
# standard pairs first, so that one path checks and tokenizes the pairs of every task.
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
    record's "margin" (0 if absent) and "tools" (for the chat template)."""
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
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        fail(f"{where}: 'margin' must be a finite number, got {margin!r}")
    kind = ("standard" if isinstance(prompt, str) else "conversational") + " implicit-prompt" * implicit
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin)}
    return {**pair, "tools": record.get("tools")}, f"{kind} preference"


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
    path, prompts = data or SENTIMENT_PROMPTS, {}  # read_records names a missing file, the shipped one too
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


@torch.no_grad()
def sample(lm, batch, max_new_tokens: int, stop_ids: set) -> list:
    """Continuation token ids of each row of a left-padded batch (input_ids and attention_mask), up
    to and including the first of stop_ids (the end-of-turn ids; one cut at max_new_tokens has
    none), sampled token by token on the KV cache from softmax(logits) and nothing else
    (model.generate() would also apply what the checkpoint's generation_config.json asks, such as a
    repetition penalty)."""
    step_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    cache, tokens, finished = None, [], torch.zeros(len(step_ids), dtype=torch.bool, device=step_ids.device)
    stop = torch.tensor(sorted(stop_ids), device=step_ids.device)
    for _ in range(max_new_tokens):
        output = lm(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output.cache
        logits = output.logits[:, -1]
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        next_ids = torch.multinomial(probs, 1).squeeze(-1).masked_fill(finished, int(stop[0]))
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all():
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(attention_mask), 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    rows = torch.stack(tokens, 1).tolist()
    return [ids[: next((i + 1 for i, token in enumerate(ids) if token in stop_ids), len(ids))] for ids in rows]


def sample_sentiment_pairs(prompts: list, args: Args, grid, device) -> list:
    """Preference pairs from --model's own continuations: --samples-per-prompt continuations of each
    prompt (a conversation rendered with the generation prompt) are sampled (temperature 1, no top-k
    or top-p: the LM's own distribution) until an end-of-turn id, taken two by two, and the one VADER
    finds more positive is chosen; ties carry no preference and are dropped with a count. Each pair
    keeps its responses' token ids as sampled (`chosen_ids`, `rejected_ids`, an end-of-turn id only
    where the sampler drew one), which the loss then sees: decoded and tokenized again, a text need
    not give back the same ids. Batches are dealt round-robin over the data-parallel ranks and each
    is sampled with a seed of its own on a forked RNG, so the pairs do not depend on the number of
    ranks and training's random stream is untouched."""
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=param_dtype(args)).to(device).eval()
    except (OSError, ValueError) as error:
        fail(f"--model {args.model!r} could not be loaded as a causal LM to sample from: {str(error).splitlines()[0]}")
    if args.chat_template:
        tokenizer.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    if tokenizer.pad_token is None:  # left padding is masked out, so EOS serves as pad
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = end_of_turn_ids(tokenizer, lm.generation_config)
    repeated = [p for p in prompts for _ in range(args.samples_per_prompt)]
    prompt_ids = [ids for p in prompts for ids in [tokenize_prompt(tokenizer, p)[0]] * args.samples_per_prompt]
    my_batches = list(enumerate(range(0, len(repeated), args.generation_batch_size)))[grid.dp_rank :: grid.dp_size]
    mine = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for number, start in tqdm.tqdm(my_batches, desc="sampling pairs", dynamic_ncols=True, disable=not grid.is_main):
            digest = hashlib.sha256(f"{args.seed}/sentiment pairs/{number}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            chunk = prompt_ids[start : start + args.generation_batch_size]
            input_ids, attention_mask, _ = pad_batch(chunk, tokenizer.pad_token_id, device, side="left")
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            mine.append((number, sample(lm, batch, args.max_new_tokens, stop_ids)))
    gathered = sorted(b for part in parallel.all_gather_objects(mine, grid.dp_group) for b in part)
    responses = [ids for _, batch in gathered for ids in batch]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)  # what VADER reads
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
                "chosen_ids": responses[chosen],
                "rejected_ids": responses[rejected],
                "margin": 0.0,
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
    special tokens (a BOS, say), each completion alone without them (no EOS). A conversation is
    rendered by the chat template and tokenized without adding special tokens (the template writes
    any BOS): the prompt with the generation prompt, so that the assistant's reply comes next; each
    completion as the template writes it after the prompt in the whole conversation, through its
    last end-of-turn id (framing after it, ChatML's newline, is no part of the reply)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"], [
            tokenizer(completion, add_special_tokens=False)["input_ids"] for completion in completions
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


def fit_pair_side(prompt_ids: list, response_ids: list, max_length: int):
    """Token ids of prompt + response cut to max_length from the left of the prompt (the response is
    what is judged, and its last token is where the score is read), and whether the prompt was cut.
    None if the response alone does not fit."""
    if len(response_ids) >= max_length:
        return None
    excess = max(0, len(prompt_ids) + len(response_ids) - max_length)
    return prompt_ids[excess:] + response_ids, excess > 0


def tokenize_pairs(tokenizer, pairs: list, max_length: int) -> list:
    """(chosen ids, rejected ids, margin) per pair, each the prompt's ids then a response's, as
    tokenize_prompt splits them (a sampled pair's responses are its ids as sampled), reporting how
    many prompts were truncated."""
    tokenized, truncated, too_long = [], 0, 0
    for pair in pairs:
        prompt_ids, responses = tokenize_prompt(
            tokenizer, pair["prompt"], [pair["chosen"], pair["rejected"]], pair.get("tools")
        )
        responses = [pair.get(f"{key}_ids") or ids for key, ids in zip(("chosen", "rejected"), responses)]
        sides = [fit_pair_side(prompt_ids, ids, max_length) for ids in responses]
        if None in sides:
            too_long += 1
            continue
        truncated += sides[0][1] or sides[1][1]
        tokenized.append((sides[0][0], sides[1][0], pair["margin"]))
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
# The model: backbone + scalar head, scored at the last real token.
# ---------------------------------------------------------------------------------------------
def without_dropout(config):
    """A copy of the config with every dropout probability set to 0: a reward model is a regression
    whose scores must not depend on a dropout draw, in training or when PPO queries it. Every number
    named for a drop (dropout, attn_pdrop, layerdrop, drop_path_rate) or a jitter (MoE router noise)
    is zeroed, in nested configs (text_config, attn_config) too. The model must be built from it:
    attention modules keep the rate they read at init (Llama's self.attention_dropout)."""

    def zeroed(key: str, value):
        if isinstance(value, dict):
            return {k: zeroed(k, v) for k, v in value.items()}
        random = type(value) in (int, float) and ("drop" in key or "jitter" in key)
        return type(value)(0) if random else value  # an int stays an int: configs check their fields' types

    return config.__class__.from_dict(zeroed("", config.to_dict()))


def init_head(model, seed: int):
    """The score head, std 1/sqrt(hidden + 1) and zero bias (Stiennon et al.), so initial scores have unit scale."""
    head = model.score
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # drawn in fp32 whatever the weights' dtype, so an fp64 run starts where an fp32 one does
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(head.weight.shape[1] + 1))
        if head.bias is not None:
            head.bias.zero_()


def param_dtype(args: Args) -> torch.dtype:
    """The dtype of the weights: fp32 (also under bf16 autocast), or fp64 under --dtype fp64."""
    return torch.float64 if args.dtype == "fp64" else torch.float32


def load_model(name: str, device, seed: int, dtype=torch.float32, chat_template: Optional[str] = None):
    """A sequence-classification model (num_labels=1) from a causal LM or reward model directory or hub name."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name!r}: no such directory; pass a local model directory or a hub name such as gpt2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name)
        is_reward_model = getattr(config, "num_labels", None) == 1 and any(
            a.endswith("ForSequenceClassification") for a in config.architectures or []
        )
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_pretrained(name, config=without_dropout(config), dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}")
    if chat_template:  # saved with the tokenizer, so the run directory renders as training did
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    if tokenizer.pad_token_id is None:  # pooling reads the last non-pad token, so EOS serves as pad
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        fail(f"the tokenizer of {name!r} has neither a pad nor an EOS token; add a pad token to it")
    model.config.pad_token_id = tokenizer.pad_token_id
    if not is_reward_model:
        init_head(model, seed)
    return kernels.use_linear(model.to(device)), tokenizer


def pad_batch(sequences: list, pad_token_id: int, device, side: str = "right"):
    """input_ids, attention_mask and position_ids of a padded batch. Positions follow the attention
    mask, so a left-padded sequence sees the same positions as a right-padded one and scores the same."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        columns = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, columns] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def collate(sequences: list, pad_token_id: int, device, packing=False) -> dict:
    """A micro-batch of token-id sequences: the base model's keyword arguments, and `ends`, the index in the
    flattened rows of each sequence's last non-pad token, where its score is read (where the transformers
    sequence-classification classes read it, so a trailing EOS that serves as pad is not the token scored).

    Padded: a row per sequence, right-padded, with an attention mask. Packed (--packing): rows of whole sequences,
    filled first fit from the longest and no longer than the longest, as sft.py packs; the position ids restart at 0
    for each sequence and for the padding ending a row, and without an attention mask and a cache transformers'
    create_causal_mask reads them as packed sequences: attention stays within each one."""
    width, rows = max(len(ids) for ids in sequences), []
    for k in sorted(range(len(sequences)), key=lambda k: -len(sequences[k])) if packing else range(len(sequences)):
        fitting = [row for row in rows if packing and sum(len(sequences[j]) for j in row) + len(sequences[k]) <= width]
        if fitting:
            fitting[0].append(k)
        else:
            rows.append([k])
    batch, ends = {"input_ids": [], "position_ids" if packing else "attention_mask": []}, [0] * len(sequences)
    for number, row in enumerate(rows):
        ids = []
        for k in row:
            last = max((j for j, token in enumerate(sequences[k]) if token != pad_token_id), default=0)
            ends[k] = number * width + len(ids) + last
            ids += sequences[k]
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_token_id] * pad)
        if packing:  # the padding is a sequence of its own, which no other attends to
            batch["position_ids"].append([j for k in row for j in range(len(sequences[k]))] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
    return {key: torch.tensor(value, device=device) for key, value in {**batch, "ends": ends}.items()}


def token_scores(model, micro_batch: dict) -> torch.Tensor:
    """The score head's output at every token of a micro-batch, [rows, T, 1], as a pipeline's last stage computes
    it. The base model and the head are called as modules, whose hooks ZeRO-3 gathers their weights in, and
    without a cache, which would keep transformers from reading packed position ids."""
    inputs = {key: micro_batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in micro_batch}
    return model.score(model.base_model(**inputs, use_cache=False).last_hidden_state)


def sequence_scores(head_output: torch.Tensor, micro_batch: dict) -> torch.Tensor:
    """Each sequence's score: the score head's output (token_scores) at the sequence's end, collate's `ends`;
    bf16 is upcast, fp64 kept."""
    scores = head_output.flatten(0, 1)[micro_batch["ends"], 0]
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


@torch.no_grad()
def score(model, tokenizer, prompts: list, responses: list, batch_size: int = 32) -> torch.Tensor:
    """Raw reward-model scores of each (prompt, response text), as a tensor on the CPU (fp32; fp64 for
    an fp64 model), tokenized as training tokenized its pairs: a prompt that is a message list and
    the response as the assistant's reply are rendered by the tokenizer's chat template. Normalise
    with the statistics in the model's config: (score - config.reward_mean) / config.reward_std."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_length = model_context(model.config) or 1 << 30
    device, sequences = next(model.parameters()).device, []
    for prompt, response in zip(prompts, responses):
        prompt_ids, [response_ids] = tokenize_prompt(tokenizer, prompt, [completion_of(prompt, response)])
        fitted = fit_pair_side(prompt_ids, response_ids, max_length)
        sequences.append(fitted[0] if fitted else response_ids[-max_length:])
    was_training = model.training
    model.eval()
    batches = [
        collate(sequences[i : i + batch_size], tokenizer.pad_token_id, device)
        for i in range(0, len(sequences), batch_size)
    ]
    scores = torch.cat([sequence_scores(token_scores(model, batch), batch).cpu() for batch in batches])
    model.train(was_training)
    return scores


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood per pair, -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margins)


def pair_micro_batches(pairs: list, args: Args, pad_token_id: int, device) -> list:
    """The pairs collated in micro-batches of --micro-batch-size, padded or packed (--packing): the chosen sequences,
    then the rejected ones, so that the loss (under --pp on the last stage) sees both sides of every pair; with the
    margins (fp64: the loss takes them to the scores' dtype) and `start`, the index of the micro-batch's first pair."""
    micro_batches = []
    for start in range(0, len(pairs), args.micro_batch_size):
        chunk = pairs[start : start + args.micro_batch_size]
        sequences = [p[0] for p in chunk] + [p[1] for p in chunk]
        margins = torch.tensor([p[2] for p in chunk], dtype=torch.float64, device=device)
        micro_batches.append(
            {**collate(sequences, pad_token_id, device, args.packing), "margins": margins, "start": start}
        )
    return micro_batches


def accumulate_gradients(
    model, pairs: list, batch_pairs: int, ranks: int, args: Args, pad_token_id: int, device, autocast
):
    """Backward over this rank's share of the batch in micro-batches (through the stages in the 1F1B
    schedule under --pp, the last stage scoring); returns [its share of the global batch's mean loss
    (the shares sum to the mean over ranks), its count of pairs ranked right] (fp64).

    Each micro-batch's summed loss is divided by the pair count of the whole global batch, not its
    own, so the accumulated gradient equals the one-big-batch gradient exactly. The data-parallel
    reduction averages over ranks, hence the factor `ranks`. Only the last micro-batch's backward
    communicates (no_sync on the others)."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)

    def loss_fn(scores, micro_batch):
        chosen, rejected = sequence_scores(scores, micro_batch).chunk(2)
        loss = pairwise_loss(chosen, rejected, micro_batch["margins"].to(chosen.dtype)).sum() / batch_pairs
        totals[0] += loss.detach()
        totals[1] += (chosen > rejected).sum()
        return loss * ranks

    micro_batches = pair_micro_batches(pairs, args, pad_token_id, device)
    parallel.forward_backward(model, micro_batches, loss_fn, functools.partial(token_scores, model.module), autocast)
    if parallel.is_pipelined(model):  # the sums are the last stage's: bring them to every stage
        totals = parallel.all_reduce_sum(totals, model.module.group)
    return totals


def share(items: list, rank: int, ranks: int) -> list:
    """Rank `rank`'s contiguous share of `items` for evaluation (the last ranks may get fewer, or
    none); concatenating the shares in rank order gives back `items`."""
    size = math.ceil(len(items) / ranks)
    return items[rank * size : (rank + 1) * size]


def model_context(config):
    """Longest sequence the model's position embeddings allow (None when the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties (the Pearson correlation of the ranks)."""

    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties share the mean of their ranks
            tied = values == value
            result[tied] = result[tied].mean()
        return result

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints and logging (as in sft.py)
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def evaluate(model, eval_sequences: list, tokenizer, args: Args, grid, autocast, dtype) -> tuple:
    """Pairwise accuracy, margin and score distribution on the held-out pairs. Each rank scores
    a contiguous share and the scores are gathered in order, so every rank computes the same
    metrics. The whole model is gathered once (a no-op below ZeRO-3), so ranks may run
    different numbers of forwards without per-block collectives. The tensor-parallel ranks and
    pipeline stages of one replica score the same share together. Returns (metrics, every score)."""
    mine = share(eval_sequences, grid.dp_rank, grid.dp_size)
    slots = torch.zeros(2, len(mine), dtype=torch.float64, device=grid.device)  # the chosen scores, the rejected

    def keep(scores, micro_batch):  # on the last stage under --pp
        start = micro_batch["start"]
        slots[:, start : start + len(micro_batch["margins"])] = sequence_scores(scores, micro_batch).view(2, -1)

    model.eval()
    with model.gathered(), autocast:
        if mine:
            micro_batches = pair_micro_batches(mine, args, tokenizer.pad_token_id, grid.device)
            parallel.forward_only(model, micro_batches, keep, functools.partial(token_scores, model.module))
            if parallel.is_pipelined(model):  # each slot is written once, by the last stage: the sum is exact
                slots = parallel.all_reduce_sum(slots, model.module.group)
    model.train()
    # back to the dtype of the scores (fp64 slots hold any exactly)
    gathered = torch.cat(parallel.all_gather_objects(slots.to(dtype).cpu(), grid.dp_group), 1)
    chosen, rejected = gathered
    margins = torch.tensor([p[2] for p in eval_sequences], dtype=dtype)
    both = gathered.flatten()
    metrics = {
        "eval/loss": pairwise_loss(chosen, rejected, margins).mean().item(),
        "eval/accuracy": (chosen > rejected).to(dtype).mean().item(),
        "eval/margin": (chosen - rejected).mean().item(),
        "eval/chosen_score": chosen.mean().item(),
        "eval/rejected_score": rejected.mean().item(),
        "eval/score_mean": both.mean().item(),
        "eval/score_std": both.std().item(),
    }
    return metrics, both


def optimality_correlation(model, tokenizer, eval_walks: list, perturbed_walks: list, graph, args: Args, grid) -> dict:
    """Spearman correlation of the scores of held-out walks with their true optimality. Corrupted
    walks are mostly invalid: a block of ties at optimality 0 that the model, rightly, still
    grades (a walk that breaks one edge scores above one that wanders), so their correlation is
    lower and reported apart. Each rank scores a share of the walks (under --pp with a whole copy
    of the model, gathered from the stages)."""
    metrics = {}
    with model.gathered():
        scorer = parallel.pipeline_gathered_model(model.module, grid.tp_group) if args.pp > 1 else model.module
        for name, evaluated in (("", eval_walks), ("_with_perturbed", eval_walks + perturbed_walks)):
            mine = share(evaluated, grid.dp_rank, grid.dp_size)
            scores = torch.zeros(0, dtype=param_dtype(args))  # a rank left without a share
            if mine:
                scores = score(scorer, tokenizer, [w[0] for w in mine], [w[1:] for w in mine], batch_size=256)
            scores = torch.cat(parallel.all_gather_objects(scores, grid.dp_group))
            metrics[f"eval/spearman_optimality{name}"] = spearman(
                scores.numpy(), [walk_optimality(w, *graph) for w in evaluated]
            )
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
    """(training pairs, held-out pairs, every pair, held-out walks): the task's preference pairs,
    split before pairing for randomwalks so that no held-out walk is seen in training. The
    held-out walks (randomwalks only, else None) are (walks, corrupted copies of them, (adjacency,
    shortest paths)), scored against their true optimality after training."""
    pairs, walks_to_score = None, None
    if args.task == "randomwalks":
        adjacency, walks = generate_random_walks()
        shortest = shortest_path_nodes(adjacency)
        n_eval_walks = int(len(walks) * args.eval_fraction)
        rng = np.random.RandomState(args.seed)
        train_pairs = randomwalks_pairs(walks[n_eval_walks:], args.randomwalks_pairs, adjacency, shortest, rng)
        eval_pairs = randomwalks_pairs(
            walks[:n_eval_walks], max(1, int(args.randomwalks_pairs * args.eval_fraction)), adjacency, shortest, rng
        )
        # Held-out walks, and corrupted copies of them, scored against their true optimality after training.
        eval_walks = walks[:n_eval_walks]
        walks_to_score = (eval_walks, [perturb_walk(walk, rng) for walk in eval_walks], (adjacency, shortest))
    elif args.task == "sentiment":
        # The held-out pairs are those of held-out openings (with the same seed, the first of the
        # openings ppo.py holds out), so no evaluated continuation shares a prompt with training.
        # A resumed run reads the pairs its run sampled.
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
    return train_pairs, eval_pairs, pairs, walks_to_score


def main(args: Args):
    # Flags, then the other ranks (a no-op without torchrun).
    args = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    grid = parallel.init_distributed(args.device, tp=args.tp, pp=args.pp, cp=args.cp)
    device, ranks = grid.device, grid.dp_size
    local_batch_size = args.batch_size // ranks
    dtype = param_dtype(args)
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

    train_pairs, eval_pairs, pairs, walks_to_score = preference_pairs(args, grid, checkpoint)
    if checkpoint or args.model:
        model, tokenizer = load_model(checkpoint or args.model, device, args.seed, dtype, args.chat_template)
    else:
        tokenizer = randomwalks_tokenizer()
        model = randomwalks_model(tokenizer).to(device, dtype)
        init_head(model, args.seed)
    context = model_context(model.config)
    max_length = min(args.max_length, context) if context else args.max_length
    train_sequences = tokenize_pairs(tokenizer, train_pairs, max_length)
    eval_sequences = tokenize_pairs(tokenizer, eval_pairs, max_length)
    steps_per_epoch = len(train_sequences) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} exceeds the {len(train_sequences)} training pairs; lower it")
    total_steps = steps_per_epoch * args.num_epochs

    # Same seed on every rank, so the weights start equal (the wrapper also broadcasts rank 0's).
    # The score head is never tied to the embeddings, so ZeRO-1/2 compose with --pp here.
    model = parallel.tensor_parallel(model, grid.tp_group)  # a no-op unless --tp > 1; the score head stays whole
    model = parallel.split_sequences(model, grid, args.sequence_parallel)  # a no-op unless --cp > 1 or asked
    if args.pp > 1:
        model = parallel.PipelineStage(model, grid.pp_group)  # the last stage holds the final norm and the score head
    model = parallel.data_parallel(
        model, grid.dp_cp_group, args.zero_stage, tp_group=grid.tp_group, pp_group=grid.pp_group
    )

    saved = model.module.model if args.pp > 1 else model.module  # the HF model saved (under --pp, this stage's part)
    optimizer = model.make_optimizer(torch.optim.AdamW, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = lr_scheduler(optimizer, args, total_steps)

    # Run directory; a resumed run continues in the directory its checkpoint belongs to.
    trained = (optimizer, model, {"model": saved})  # what the optimizer steps, as checkpoints save it
    state, run_name, run_dir = parallel.open_run(checkpoint, args, grid, trained, scheduler)
    step, wandb_id = (state["step"], state["wandb_id"]) if state else (0, None)
    if grid.is_main and not checkpoint and args.task == "sentiment":
        write_jsonl_atomically(os.path.join(run_dir, SENTIMENT_PAIRS), pairs)
    if grid.is_main:
        tokenizer.save_pretrained(run_dir)
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track and grid.is_main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    # The loop: one optimizer step per batch of pairs; each rank takes a contiguous share of it,
    #    accumulated over micro-batches.
    model.train()
    progress = tqdm.tqdm(
        total=total_steps,
        initial=step,
        desc="reward model",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not grid.is_main,
    )
    metrics, started, start_step = {}, time.time(), step
    parallel.catch_stop_signals()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        # The epoch's shuffled order is a function of (seed, epoch) alone, so a resumed run replays it.
        generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        shuffled = torch.randperm(len(train_sequences), generator=generator).tolist()
        batch = [train_sequences[i] for i in shuffled[position * args.batch_size : (position + 1) * args.batch_size]]
        rank_share = batch[grid.dp_rank * local_batch_size : (grid.dp_rank + 1) * local_batch_size]
        totals = accumulate_gradients(
            model, rank_share, len(batch), ranks, args, tokenizer.pad_token_id, device, autocast
        )
        totals = parallel.all_reduce_sum(totals, grid.dp_group).tolist()
        batch_loss, batch_accuracy = totals[0], totals[1] / len(batch)
        grad_norm = model.clip_grad_norm_(args.max_grad_norm)
        if not math.isfinite(batch_loss) or not torch.isfinite(grad_norm):  # every rank sees the same sums
            fail(
                f"the loss is {batch_loss} and the gradient norm {float(grad_norm)} at step {step + 1}, so training "
                "would learn nothing; lower --learning-rate, or check the data"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        progress.update(1)
        progress.set_postfix(loss=f"{batch_loss:.4f}", accuracy=f"{batch_accuracy:.3f}")
        metrics = {
            "train/loss": batch_loss,
            "train/accuracy": batch_accuracy,
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/pairs_per_s": (step - start_step) * args.batch_size / (time.time() - started),
            "train/epoch": step / steps_per_epoch,
            "time/steps_per_s": (step - start_step) / (time.time() - started),
        }
        if step % args.eval_every == 0 or step == total_steps:
            eval_metrics, eval_scores = evaluate(model, eval_sequences, tokenizer, args, grid, autocast, dtype)
            metrics.update(eval_metrics)
            if grid.is_main:
                progress.write(
                    f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in eval_metrics.items())
                )
            if wandb_run:
                import wandb

                metrics["eval/scores"] = wandb.Histogram(eval_scores.numpy())
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
            }
            weights = {"model": parallel.dense_tensors(saved, model, grid)}
            name, keep = f"step_{step:08d}", args.keep_checkpoints
            parallel.save_checkpoint(run_dir, name, grid, keep, trainer_state, weights, (saved, tokenizer), trained)
        if stop:
            return parallel.report_stop(run_dir, grid, f"step {step}")
    progress.close()

    # Score statistics on held-out chosen and rejected responses, stored with the model so that
    # a consumer (ppo.py) can normalise rewards to zero mean and unit variance.
    summary = {k: v for k, v in metrics.items() if k.startswith("eval/") and not k.endswith("/scores")}
    model.module.config.reward_mean = summary["eval/score_mean"]
    model.module.config.reward_std = summary["eval/score_std"]
    if walks_to_score is not None:
        summary.update(optimality_correlation(model, tokenizer, *walks_to_score, args, grid))
    parallel.save_final(run_dir, grid, {"model": parallel.dense_tensors(saved, model, grid)}, (saved, tokenizer))
    if not grid.is_main:
        return
    last_step = {k: v for k, v in metrics.items() if k.startswith(("train/", "time/"))}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump({"step": step, **summary, "last_step": last_step}, file, indent=1)
    print(
        f"saved {run_dir} after {step} steps in {time.time() - started:.0f}s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
    )
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()


if __name__ == "__main__":
    with parallel.clean_exit():
        main(tyro.cli(Args))
