"""Implicit Language Q-Learning (ILQL): offline RLHF from a fixed dataset of scored responses.

ILQL (Snell et al. 2022, as implemented in trlX) never generates during training. It fits, on
the LM's last hidden state, a value head V and Q heads over the vocabulary by offline
Q-learning (an expectile V loss keeps Q from trusting actions the data never took, and a CQL term
pushes down the Q of untaken tokens), while the LM itself learns by (advantage-weighted)
behaviour cloning. At generation the LM's log-probs are shifted by beta * (Q - V), steering the
cloned policy towards high-return tokens. The default task, randomwalks, runs offline on a CPU
in under a minute:

    python ilql.py                                           # randomwalks, fresh 6-layer GPT-2
    python ilql.py --task jsonl --data scored.jsonl --model gpt2
    python ilql.py --task sentiment --model runs/smollm2-135m   # the model's own samples, scored by VADER
    python ilql.py --task hh --model EleutherAI/pythia-160m  # needs the network
    python ilql.py --model ... --lora-rank 16                # or --num-layers-unfrozen 8: train less of the LM
    torchrun --nproc_per_node 8 ilql.py --model ... --zero-stage 3   # data parallel, see parallel.py
    torchrun --nproc_per_node 8 ilql.py --model ... --tp 2 --pp 2    # tensor x pipeline x data parallel

The run directory (`runs/<run name>/`) receives the LM and its tokenizer, loadable with plain
`AutoModelForCausalLM.from_pretrained(run_dir)`, and the V/Q heads in `ilql_heads.safetensors`;
`load_trained(run_dir)` returns all three ready for `generate`.

Reading order. The method is `ilql_loss` (Q, V, CQL and AWAC terms, numbered 1-4) and
`generate` (the LM's log-probs shifted by beta * (Q - V)); `main` (at the bottom) runs the
loop of optimizer steps over the scored dataset, with the target Q heads following the Q heads
every --steps-for-target-sync steps. Above it, in file order: Args and check_args; the
randomwalks task; the data parsers and `tokenize_examples` (rewards on the last token,
`normalize_returns`); the heads and the loss; LoRA and frozen layers; generation; the sentiment
dataset; run directory, checkpoints and logging (plumbing); evaluation.
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
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tqdm
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import kernels
import parallel


@dataclass
class Args:
    exp_name: str = "ilql"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (model and head init, data order, dropout, evaluation samples): any integer
    from 0"""
    task: Literal["randomwalks", "sentiment", "jsonl", "hh"] = "randomwalks"
    """randomwalks: built-in offline graph task, rewarded by optimality; sentiment: continuations of movie-review
    openings (examples/sentiment_prompts.jsonl, or --data's `prompt` strings or conversations) sampled from --model
    itself and scored by VADER (needs vaderSentiment); jsonl: --data's `prompt`, `completion` (strings or
    conversations) and `reward` records; hh: Anthropic/hh-rlhf, chosen dialogues rewarded +1 and rejected ones -1
    (downloads from the hub unless --data is given)"""
    data: Optional[str] = None
    """local data: .jsonl or .jsonl.gz, or (with the datasets package) .parquet or a datasets directory; required for
    --task jsonl; for sentiment `prompt` records replacing the shipped ones; for hh a local copy in the upstream
    format"""
    model: Optional[str] = None
    """hub name or local path of any causal LM; default: a fresh 6-layer GPT-2 for randomwalks (required for other
    tasks)"""
    dtype: Literal["fp32", "bf16", "fp64"] = "fp32"
    """fp32; bf16: autocast for the forward pass (weights, heads and optimizer stay fp32); fp64: the LM, the heads and
    every computation in float64, slow, for checking that two layouts compute the same math (the tests compare runs
    this way)"""
    device: str = "auto"
    """torch device; auto picks cuda when present, else cpu"""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage under torchrun: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also
    parameters"""
    tp: int = 1
    """tensor-parallel ranks per model copy under torchrun (the LM's attention heads, MLP and vocabulary split over
    them; the ILQL heads stay whole on every rank; data parallel takes the remaining ranks)"""
    pp: int = 1
    """pipeline stages per model copy under torchrun (the LM's decoder layers split in contiguous stages, 1F1B schedule
    over the micro-batches; the ILQL heads live on the last stage)"""
    cp: int = 1
    """context-parallel ranks per model copy under torchrun (Ulysses: each holds 1/cp of every sequence through the
    whole model, attention trades positions for heads; for sequences whose activations outgrow one device)"""
    sequence_parallel: bool = False
    """with --tp: also split the activations between the tensor-parallel matmuls (norms, residual adds) along the
    sequence (Megatron sequence parallelism: the same communication, 1/tp of those activations)"""
    output_dir: Optional[str] = None
    """where the run directory goes; default runs/<run name>"""
    chat_template: Optional[str] = None
    """a Jinja file replacing the tokenizer's chat template (saved with the tokenizer), which renders conversational
    data"""

    num_layers_unfrozen: int = -1
    """train only the LM's top k decoder layers, its final norm and an untied LM head besides the ILQL heads; the rest
    stays frozen (-1: the whole LM trains)"""
    lora_rank: int = 0
    """LoRA adapters of this rank on the LM's linear layers, the LM itself frozen (0: off); the ILQL heads train whole,
    and the saved LM has the adapters merged in"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter output is multiplied by alpha / rank (a positive number)"""
    lora_target_modules: str = "all"
    """comma-separated names (suffixes) of the linear layers that get adapters; `all` means every linear layer inside
    the decoder blocks"""

    max_length: int = 512
    """longest prompt+response in tokens (capped at the model's context)"""
    overlong: Literal["truncate", "skip"] = "truncate"
    """examples longer than --max-length: truncate (cut the prompt from the left, then the response from the right) or
    skip them"""
    samples_per_prompt: int = 4
    """sentiment: continuations of each training prompt sampled from --model (temperature 1, no top-k, --max-new-tokens)
    to make the dataset; it is written to sentiment_samples.jsonl in the run directory, in the format of --task jsonl"""
    generation_batch_size: int = 64
    """sentiment: prompts per batch when sampling the dataset"""

    num_epochs: int = 20
    """passes over the dataset"""
    batch_size: int = 96
    """examples per optimizer step, over all ranks (each of N data-parallel ranks takes batch_size / N; 96 splits over
    1, 2, 4 or 8)"""
    micro_batch_size: Optional[int] = None
    """examples per forward/backward pass on one rank (default: the rank's whole share, batch_size / ranks); the share
    must be a multiple of it"""
    learning_rate: float = 2e-4
    """peak learning rate of AdamW (betas 0.9, 0.95 as in trlX)"""
    weight_decay: float = 1e-6
    """AdamW weight decay (0: none)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    """decay after warm-up: cosine or linear to zero, or constant"""
    warmup_steps: int = 0
    """optimizer steps of linear learning-rate warm-up (0: none)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""

    tau: Optional[float] = None
    """expectile of the V loss, strictly between 0 and 1 (towards 1, V approaches the max of Q over the data's actions);
    default 0.7, or trlX's 0.8 for randomwalks"""
    gamma: float = 0.99
    """discount per token, in [0, 1] (0: a state is worth only the reward of its own action)"""
    cql_scale: float = 0.1
    """weight of the CQL loss (cross-entropy of each Q head's values against the taken token; 0: none)"""
    awac_scale: float = 1.0
    """weight of the LM's advantage-weighted cross-entropy on the taken tokens (0: none, the LM learns only through the
    heads' losses)"""
    beta: float = 0.0
    """AWAC temperature, 0 or more: LM cross-entropy weights are exp(beta * (min target Q - V)); 0 is plain behaviour
    cloning"""
    alpha: Optional[float] = None
    """Polyak rate of the target Q heads, in (0, 1]: target = alpha * q + (1 - alpha) * target; default 0.001, or
    trlX's 0.1 for randomwalks"""
    steps_for_target_sync: int = 5
    """optimizer steps between two Polyak updates of the target Q heads"""
    two_qs: bool = True
    """two Q heads whose minimum is used (clipped double Q-learning); --no-two-qs for one"""

    eval_every: int = 50
    """optimizer steps between evaluations (and at the end)"""
    eval_betas: tuple[float, ...] = (0.0, 1.0, 4.0, 100.0)
    """generation betas swept at each evaluation, each 0 or more: log-probs are shifted by beta * (min target Q - V)
    (0: the LM's own distribution)"""
    top_k: int = 10
    """sampling at evaluation keeps the k best tokens after the shift (0 keeps all)"""
    temperature: float = 1.0
    """sampling temperature at evaluation, a positive number (greedy decoding is evaluated as well)"""
    eval_samples_per_start: int = 50
    """randomwalks: sampled walks per start node and beta at each evaluation"""
    eval_generations: int = 8
    """jsonl and hh: prompts whose greedy completions are shown for each beta at each evaluation"""
    eval_prompts: int = 64
    """sentiment: held-out prompts (at most a tenth, never in the dataset) continued greedily and by sampling at each
    beta and scored by VADER"""
    max_new_tokens: int = 64
    """generation budget for text tasks (randomwalks uses its own: 9)"""
    save_every: int = 0
    """optimizer steps between checkpoints; 0 saves only the final model"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep on disk"""
    resume: Optional[str] = None
    """checkpoint directory (or a run directory: its newest intact checkpoint) to continue from; pass the same flags as
    the original run"""

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
    and what depends on the number of processes. Returns the flags with --micro-batch-size and the
    task's defaults of --tau and --alpha settled."""
    randomwalks = args.task == "randomwalks"
    args = replace(
        args,
        tau=args.tau if args.tau is not None else 0.8 if randomwalks else 0.7,
        alpha=args.alpha if args.alpha is not None else 0.1 if randomwalks else 0.001,
    )

    def require(ok: bool, flag: str, what: str):
        if not ok:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} {what}")

    at_least_1 = (
        "tp pp cp max_length samples_per_prompt generation_batch_size num_epochs batch_size steps_for_target_sync "
        "eval_every eval_samples_per_start eval_generations eval_prompts max_new_tokens keep_checkpoints"
    )
    rules = (  # (flags, the rule, what it says when broken)
        (at_least_1, lambda v: v >= 1, "must be at least 1"),
        ("seed lora_rank warmup_steps top_k save_every", lambda v: v >= 0, "must be 0 or more"),
        ("lora_alpha learning_rate max_grad_norm temperature", lambda v: 0 < v < math.inf, "must be a positive number"),
        ("weight_decay cql_scale awac_scale beta", lambda v: 0 <= v < math.inf, "must be 0 or a positive number"),
        (
            "num_layers_unfrozen",
            lambda v: v == -1 or v >= 1,
            "must be -1 (the whole LM trains) or a number of layers, at least 1",
        ),
        ("tau", lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
        ("alpha", lambda v: 0 < v <= 1, "must lie in (0, 1] (1 copies the Q heads at every sync)"),
        ("gamma", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    )
    for flags, ok, what in rules:
        for flag in flags.split():
            require(ok(getattr(args, flag)), flag, what)
    if not args.eval_betas:
        fail("--eval-betas needs at least one beta to evaluate with")
    betas = " ".join(map(str, args.eval_betas))
    for beta in args.eval_betas:
        if not 0 <= beta < math.inf:
            fail(f"--eval-betas {betas} holds {beta}; every beta must be 0 or a positive number")
    if args.lora_rank > 0 and args.num_layers_unfrozen > 0:
        fail("--num-layers-unfrozen and --lora-rank are two ways to train less of the LM; pick one")
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
    if args.zero_stage == 3 and args.tp * args.pp > 1:
        fail("--zero-stage 3 does not compose with --tp or --pp; use --zero-stage 0, 1 or 2")
    if args.lora_rank > 0 and args.tp * args.pp > 1:
        fail(
            "--lora-rank is not supported with --tp or --pp (the adapters would need splitting too); "
            "use --num-layers-unfrozen"
        )
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
    if not randomwalks and args.model is None and args.resume is None:
        fail(f"--task {args.task} needs --model (a hub name or a local directory)")
    if args.chat_template and not os.path.isfile(args.chat_template):
        fail(f"--chat-template {args.chat_template} does not exist; pass the path of a Jinja file")
    parallel.check_output_dir(args)  # before sentiment's minutes of sampling
    return replace(args, micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------------------------------
# The randomwalks task (trlX's examples/randomwalks): walks on a random directed graph whose
# node 0 is the goal. The data are random walks (mean optimality 0.35), each rewarded with its
# optimality; ILQL should find the shortest paths, which are known exactly.
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


def randomwalks_model(tokenizer) -> GPT2LMHeadModel:
    """trlX's model for this task: GPT-2 with 6 layers, 144 hidden, 12 heads, context 16, GPT-2's dropout."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=144,
        n_layer=6,
        n_head=12,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------------------------------------
# Data: every task becomes (prompt, completion, reward, tools) examples, prompt and completion
# strings or conversations (message lists) rendered by the chat template; a sampled completion
# is token ids.
# ---------------------------------------------------------------------------------------------
KIND = "'prompt' and 'completion' (strings or conversations) and a 'reward'"


def read_records(path: str) -> list:
    """Records of a .jsonl or .jsonl.gz file (malformed lines are named by number), or of a .parquet file or a
    directory written by datasets' save_to_disk, read through the optional datasets package."""
    if not os.path.exists(path):
        fail(f"data file {path!r} does not exist; pass --data with the path of a .jsonl file")
    if path.endswith(".parquet") or os.path.isdir(path):
        try:
            import datasets
        except ImportError:
            fail(f"reading {path} needs the datasets package: pip install datasets")
        try:
            return (
                datasets.Dataset.from_parquet(path) if os.path.isfile(path) else datasets.load_from_disk(path)
            ).to_list()
        except Exception as error:  # a corrupt file, a DatasetDict, a folder of something else
            fail(f"cannot read {path!r} as a dataset ({type(error).__name__}); pass a .parquet file or one saved split")
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
    """A non-empty list of messages, each a dict with a string role and a string content (other keys allowed)."""
    messages = value if isinstance(value, list) and value else [None]
    return all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content")) for m in messages)


def scored_example(record: dict, number: int, path: str) -> tuple:
    """(prompt, completion, reward, tools) of a record, with one clear line for each way it can be wrong."""
    prompt, completion, reward = record.get("prompt"), record.get("completion"), record.get("reward")
    strings = isinstance(prompt, str) and isinstance(completion, str)
    if "reward" not in record or not (strings or is_conversation(prompt) and is_conversation(completion)):
        fail(f"{path}, record {number}: expected {KIND}, found fields {', '.join(record) or 'none'}")
    if not completion:
        fail(f"{path}, record {number}: 'completion' is empty; ILQL needs at least one completion token to act on")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        fail(f"{path}, record {number}: 'reward' is {json.dumps(reward)}, not a number")
    if not math.isfinite(reward):
        fail(f"{path}, record {number}: 'reward' is {reward}; rewards must be finite numbers")
    return prompt, completion, float(reward), record.get("tools")


def hh_example(dialogue: str):
    """Split an hh-rlhf dialogue into (everything up to the last "\\n\\nAssistant:", the final reply)."""
    marker = "\n\nAssistant:"
    prompt, found, reply = dialogue.rpartition(marker)
    return (prompt + marker, reply) if found else None


def download_hh() -> list:
    """Fetch Anthropic/hh-rlhf's training files from the Hugging Face hub (online only) and return their paths."""
    from huggingface_hub import snapshot_download

    repo = "Anthropic/hh-rlhf"
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=["*/train.jsonl.gz"])
    except Exception as error:  # offline, gated, renamed: all end the same way for the user
        fail(f"could not download {repo} ({type(error).__name__}); without a network pass --data with a local copy")
    return sorted(
        os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".jsonl.gz")
    )


def load_examples(task: str, data: Optional[str]) -> list:
    """(prompt, completion, reward, tools) examples of a text task: hh's pairs are first converted to scored
    prompt-completion records, so every task's records are checked and read by the same code."""
    if task == "jsonl" and data is None:
        fail(f"--task jsonl needs --data PATH (records with {KIND})")
    paths = [data] if data else download_hh()
    examples, unusable = [], 0
    for path in paths:
        records = read_records(path)
        if task == "hh":  # both dialogues of a pair share the prompt; the preferred reply earns +1, the other -1
            for number, record in enumerate(records, 1):
                if not all(isinstance(record.get(field), str) for field in ("chosen", "rejected")):
                    fail(
                        f"{path}, record {number}: expected strings chosen, rejected, found fields {', '.join(record)}"
                    )
            pairs = [
                (hh_example(r[field]), reward) for r in records for field, reward in (("chosen", 1), ("rejected", -1))
            ]
            records = [dict(prompt=p[0], completion=p[1], reward=r) for p, r in pairs if p is not None and p[1].strip()]
            unusable += len(pairs) - len(records)
        scored = [scored_example(record, number, path) for number, record in enumerate(records, 1)]
        strings = [isinstance(completion, str) for _, completion, _, _ in scored]
        if not all(strings) and any(strings):
            fail(f"{path}, record {strings.index(not strings[0]) + 1}: strings and conversations mixed in one file")
        examples += scored
    if unusable:
        print(f"skipped {unusable} dialogues without an '\\n\\nAssistant:' turn or with an empty final reply")
    if not examples:
        fail(f"no examples in {', '.join(paths)}; the file is empty or every record was filtered out")
    return examples


def render(tokenizer, messages: list, tools=None, generation_prompt=False) -> list:
    """Token ids of a conversation as the chat template writes it (the template writes any BOS itself)."""
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer, generation_config=None) -> set:
    """The ids that end a turn: the tokenizer's EOS, the generation config's (an int or a list), and the token the
    chat template writes right after an assistant's reply (<|im_end|>, <|eot_id|>: often not the EOS)."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    if tokenizer.chat_template:
        question, reply = [{"role": "user", "content": "x"}], len(tokenizer("y", add_special_tokens=False)["input_ids"])
        context = render(tokenizer, question, generation_prompt=True)
        ids.update(render(tokenizer, question + [{"role": "assistant", "content": "y"}])[len(context) + reply :][:1])
    return ids - {None}


def encode_prompt(tokenizer, prompt, tools=None) -> list:
    """Token ids of a prompt: a string tokenized (an empty one gives an EOS, a position to act from), a
    conversation rendered by the chat template with the generation prompt, as the model will see it."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id]
    if not tokenizer.chat_template:
        fail("the data are conversations and the model's tokenizer has no chat template; pass --chat-template PATH")
    return render(tokenizer, prompt, tools, generation_prompt=True)


def tokenize_examples(tokenizer, examples: list, max_length: int, overlong: str):
    """(token ids of prompt + response, the prompt's length, reward) of each example.

    Strings: prompt and response are tokenized apart so the boundary is exact (BOS, if the tokenizer
    adds one, goes on the prompt), and the response ends with EOS. A conversational response is the
    conversation's rendering after the prompt's, up to and including its end-of-turn token. A
    response given as token ids (a sampled one) is taken as it is: an end-of-turn id only where the
    sampler drew one. The response's tokens are the actions. Over-long examples are skipped, or
    truncated: the prompt loses tokens from its left first, the response from its right after (the
    reward then lands on the last kept token)."""
    sequences, too_long, end_ids = [], 0, end_of_turn_ids(tokenizer)
    for prompt, response_ids, reward, tools in examples:
        prompt_ids = encode_prompt(tokenizer, prompt, tools)
        if isinstance(response_ids, str):
            response_ids = tokenizer(response_ids, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        elif is_conversation(response_ids):
            whole = render(tokenizer, prompt + response_ids, tools)
            if whole[: len(prompt_ids)] != prompt_ids:
                fail(
                    "the chat template renders a prompt differently once a completion follows; fix it (--chat-template)"
                )
            response_ids = whole[len(prompt_ids) :]
            response_ids = response_ids[: next((k + 1 for k, t in enumerate(response_ids) if t in end_ids), None)]
        if len(prompt_ids) + len(response_ids) > max_length:
            too_long += 1
            if overlong == "skip":
                continue
            response_ids = response_ids[: max_length - 1]  # keep at least one prompt token as context
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)) :]
        sequences.append((prompt_ids + response_ids, len(prompt_ids), reward))
    if too_long:
        action = "skipped" if overlong == "skip" else "truncated"
        print(
            f"{too_long} of {len(examples)} examples are longer than --max-length {max_length} tokens: {action} (see "
            "--overlong)"
        )
    if not sequences:
        fail(
            f"no examples left: all {len(examples)} exceed --max-length {max_length}; raise it or use --overlong "
            "truncate"
        )
    return sequences


def normalize_returns(sequences: list) -> list:
    """Returns z-scored over the dataset, as trlX's make_experience does, except that ours divides
    by the population std where trlX uses torch.std (unbiased): the two differ by a factor
    sqrt(n / (n - 1)), 1.0005 for the 1000 randomwalks examples, and the population std is
    defined for a dataset of one. A constant reward becomes 0."""
    rewards = np.array([reward for _, _, reward in sequences], dtype=np.float64)
    returns = (rewards - rewards.mean()) / (rewards.std() + np.finfo(np.float64).eps)
    return [(ids, prompt_length, float(r)) for (ids, prompt_length, _), r in zip(sequences, returns)]


def collate(sequences: list, pad_token_id: int, device) -> dict:
    """Right-padded batch (input_ids, attention_mask), and over the T - 1 positions that predict a next token:

    action_mask[b, t]: position t is a state that acts, i.e. token t + 1 belongs to the response
    (EOS included); rewards[b, t]: the sequence's return on its last action, 0 elsewhere (fp64, as
    normalize_returns computes it; the loss rounds it to the heads' dtype). The position of the
    last token (the EOS) is the terminal state: no action, value 0."""
    width = max(len(ids) for ids, _, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    action_mask = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    rewards = torch.zeros((len(sequences), width - 1), dtype=torch.float64)
    for row, (ids, prompt_length, reward) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        action_mask[row, prompt_length - 1 : len(ids) - 1] = True
        rewards[row, len(ids) - 2] = reward
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "action_mask": action_mask, "rewards": rewards}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def model_context(config):
    """Longest sequence the model's position embeddings allow (None when the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# ---------------------------------------------------------------------------------------------
# The ILQL heads and loss
# ---------------------------------------------------------------------------------------------
def make_head(hidden_size: int, out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, 2 * hidden_size), torch.nn.ReLU(), torch.nn.Linear(2 * hidden_size, out)
    )


class ILQLHeads(torch.nn.Module):
    """V (hidden -> 2 hidden -> 1), one or two Q heads (hidden -> 2 hidden -> vocab), and target
    copies of the Q heads that get no gradient and trail the Q heads by Polyak averaging."""

    def __init__(self, hidden_size: int, vocab_size: int, two_qs: bool = True):
        super().__init__()
        self.v_head = make_head(hidden_size, 1)
        self.q_heads = torch.nn.ModuleList(make_head(hidden_size, vocab_size) for _ in range(2 if two_qs else 1))
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)

    def target_advantage(self, hidden):
        """min over target Q heads minus V, for every token of the vocabulary: [..., vocab]."""
        target_q = torch.stack([head(hidden) for head in self.target_q_heads]).min(0).values
        return target_q - self.v_head(hidden)

    @torch.no_grad()
    def sync_target_q_heads(self, alpha: float):
        for target_head, head in zip(self.target_q_heads, self.q_heads):
            for target, source in zip(target_head.parameters(), head.parameters()):
                target.copy_(alpha * source + (1 - alpha) * target)


def ilql_loss(
    heads: ILQLHeads, logits, hidden, input_ids, action_mask, rewards, tau: float, gamma: float, beta: float
) -> dict:
    """Each ILQL loss term summed over the batch's actions (the caller divides by the number of
    actions of the whole batch, so that gradient accumulation equals one big batch).

    logits [B, T, vocab] and hidden [B, T, H] come from the LM; action_mask and rewards [B, T - 1]
    from `collate`. The action at position t is token t + 1; the state after it is position t + 1,
    which either acts again or is terminal (value 0)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 is upcast, fp64 kept
    dtype = heads.v_head[0].weight.dtype  # the heads run in their own precision (fp32, or fp64 under --dtype fp64)
    hidden, rewards = hidden.to(dtype), rewards.to(dtype)
    actions = input_ids[:, 1:][action_mask]  # [N] the taken tokens
    states = hidden[:, :-1][action_mask]  # [N, H] the states that took them
    values = heads.v_head(hidden).squeeze(-1)  # [B, T] V of every position
    next_acts = F.pad(action_mask[:, 1:], (0, 1))  # [B, T - 1] the next state acts (else it is terminal or padding)
    v = values[:, :-1][action_mask]
    v_next = (values[:, 1:] * next_acts)[action_mask]

    # 1. Q loss: each Q head's value of the taken token against r + gamma * V(next), V(next) detached.
    target = rewards[action_mask] + gamma * v_next.detach()
    qs = [head(states) for head in heads.q_heads]  # [N, vocab] each
    q_taken = [q.gather(-1, actions[:, None]).squeeze(-1) for q in qs]
    loss_q = sum(((q - target) ** 2).sum() for q in q_taken)

    # 2. V loss: expectile regression of V on the (detached) min over target Q heads; tau > 0.5
    #    penalises V below the target more than above, so V leans to the best actions in the data.
    with torch.no_grad():
        target_taken = [head(states).gather(-1, actions[:, None]).squeeze(-1) for head in heads.target_q_heads]
        target_q = torch.stack(target_taken).amin(0)
    difference = target_q - v
    expectile_weight = torch.full_like(difference, tau).masked_fill(difference < 0, 1 - tau)
    loss_v = (expectile_weight * difference**2).sum()

    # 3. CQL: cross-entropy of each Q head's values over the vocabulary against the taken token,
    #    which pushes down Q of the tokens the data never took.
    loss_cql = sum(F.cross_entropy(q, actions, reduction="sum") for q in qs)

    # 4. AWAC: the LM's cross-entropy on the taken tokens, weighted by exp(beta * advantage).
    weights = torch.exp(beta * (target_q - v.detach()))
    loss_awac = (F.cross_entropy(logits[:, :-1][action_mask], actions, reduction="none") * weights).sum()

    return {
        "q": loss_q,
        "v": loss_v,
        "cql": loss_cql,
        "awac": loss_awac,
        "value": v.detach().sum(),
        "q_value": q_taken[0].detach().sum(),
        "advantage": (target_q - v.detach()).sum(),
    }


def trained_modules(lm, heads: ILQLHeads) -> torch.nn.ModuleDict:
    """What the optimizer trains, in one module for the data-parallel wrapper: the LM, the V head
    and the Q heads. The target Q heads stay outside it (they get no gradient, only Polyak
    updates), so they are whole on every rank at every ZeRO stage."""
    return torch.nn.ModuleDict({"lm": lm, "v_head": heads.v_head, "q_heads": heads.q_heads})


LOSS_TERMS = ("q", "v", "cql", "awac", "value", "q_value", "advantage", "loss")  # what ilql_loss returns, and the total


def pipelined_stage(lm, heads: ILQLHeads, group) -> parallel.PipelineStage:
    """The pipeline stage of the LM to train under --pp: it returns the final-normed hidden states
    (compute_logits=False), and the last stage, which applies the LM head and the ILQL heads to
    them in the loss, also holds the V and Q heads as children, so the data-parallel wrapper
    reduces and steps them with the stage. The target Q heads stay outside, as in trained_modules."""
    stage = parallel.PipelineStage(lm, group, compute_logits=False)
    if stage.is_last:
        stage.v_head, stage.q_heads = heads.v_head, heads.q_heads
    return stage


def accumulate_gradients(
    model, heads, batch: list, batch_actions: int, ranks: int, args: Args, pad_token_id: int, device, autocast
) -> dict:
    """Backward over this rank's share of the batch in micro-batches; returns its share of each
    loss term's mean over the global batch's actions (the shares sum to the means over ranks).

    `model` is the wrapped `trained_modules(lm, heads)`, or under --pp the wrapped
    `pipelined_stage`. Each micro-batch's summed loss is divided by the action count of the whole
    global batch, not its own, so the accumulated gradient equals the one-big-batch gradient
    exactly. The data-parallel reduction averages over ranks, hence the factor `ranks`. Only the
    last micro-batch's backward communicates (no_sync on the others)."""
    totals = {}
    starts = range(0, len(batch), args.micro_batch_size)
    micro_batches = [collate(batch[start : start + args.micro_batch_size], pad_token_id, device) for start in starts]

    pipelined = isinstance(model.module, parallel.PipelineStage)

    def loss_fn(output, micro_batch):
        """The micro-batch's loss, scaled for the global batch; its terms are added to the totals. `output`:
        under --pp the final hidden states, to which the last stage applies the LM head (under autocast, as
        the LM's own head runs outside the pipeline); else the LM's output."""
        logits, hidden = (model.module.head(output), output) if pipelined else (output.logits, output.hidden_states[-1])
        with torch.autocast(torch.device(device).type, enabled=False):  # the ILQL heads run in their own precision
            tensors = (micro_batch[name] for name in ("input_ids", "action_mask", "rewards"))
            terms = ilql_loss(heads, logits, hidden, *tensors, args.tau, args.gamma, args.beta)
            terms["loss"] = terms["q"] + terms["v"] + args.cql_scale * terms["cql"] + args.awac_scale * terms["awac"]
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.item() / batch_actions
        return terms["loss"] / batch_actions * ranks

    def lm_output(micro_batch):
        inputs = {name: micro_batch[name] for name in ("input_ids", "attention_mask")}
        return model.module["lm"](**inputs, output_hidden_states=True)

    parallel.forward_backward(model, micro_batches, loss_fn, lm_output, autocast)
    if pipelined:  # the sums of the terms, on the last stage only, come back to every stage
        sums = torch.tensor([totals.get(name, 0.0) for name in LOSS_TERMS], dtype=torch.float64, device=device)
        return dict(zip(LOSS_TERMS, parallel.all_reduce_sum(sums, model.module.group).tolist()))
    return totals


# ---------------------------------------------------------------------------------------------
# Cheaper fine-tuning of the LM (the ILQL heads always train whole): LoRA, written out as
# y = base(x) + (alpha / r) * B(A(x)) with B starting at zero, so the adapted LM starts equal to
# the base; or trlX's num_layers_unfrozen, which freezes all but the top k decoder layers.
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

    def forward(self, x):
        output = self.base(x)
        return output + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale).to(output.dtype)

    def merged(self) -> torch.nn.Module:
        """The base layer with the update added into its weight (in place: merge_lora calls it on a copy)."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # [out, in]
        with torch.no_grad():
            self.base.weight += (delta.T if self.transposed else delta).to(self.base.weight.dtype)
        return self.base


def decoder_layers(lm) -> torch.nn.ModuleList:
    """The list of transformer blocks (GPT-2's h, Llama's and NeoX's layers)."""
    count = lm.config.num_hidden_layers
    lists = [m for m in lm.base_model.children() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(lists) != 1:
        fail(
            f"cannot find the {count} decoder layers of {type(lm).__name__}; --num-layers-unfrozen and --lora-rank "
            "support GPT-2, Llama and GPT-NeoX style models"
        )
    return lists[0]


def add_lora(lm, rank: int, alpha: float, targets: str):
    """Freeze the LM and wrap the chosen linear layers of its blocks with LoRA."""
    lm.requires_grad_(False)
    wanted = None if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    wrapped = 0
    for block in decoder_layers(lm):
        for name, module in list(block.named_modules()):
            is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            if is_linear and (wanted is None or any(name == t or name.endswith("." + t) for t in wanted)):
                block.set_submodule(name, LoRA(module, rank, alpha))
                wrapped += 1
    if not wrapped:
        fail(
            f"--lora-target-modules {targets!r} matched no linear layer; name layers such as q_proj,v_proj (Llama) or "
            "c_attn (GPT-2)"
        )


def merge_lora(lm) -> torch.nn.Module:
    """A plain copy of the LM with every adapter merged into its layer (the LM itself when it has none)."""
    if not any(isinstance(module, LoRA) for module in lm.modules()):
        return lm
    merged = copy.deepcopy(lm)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoRA):
            merged.set_submodule(name, module.merged())
    return merged


def base_tensors(tensors, wrappers: list):
    """The (key, tensor) stream of an LM with LoRA (the names of its LoRA layers, each with a final
    dot: `wrappers`) as its frozen base's, under the plain model's names: what a checkpoint keeps
    beside the adapters, so a resumed run continues from exactly these."""
    for key, tensor in tensors:
        owner = next((name for name in wrappers if key.startswith(name)), None)
        if owner is None:
            yield key, tensor
        elif not key[len(owner) :].startswith("lora_"):
            yield owner + key[len(owner) + len("base.") :], tensor


def freeze_bottom(lm, num_layers_unfrozen: int):
    """Train only the top k decoder layers, the final norm and an untied LM head (a tied head is the
    frozen input embedding)."""
    layers = decoder_layers(lm)
    lm.requires_grad_(False)
    trainable = list(layers[len(layers) - num_layers_unfrozen :])
    # The final norm: a direct child of the trunk that is neither an embedding nor the block list.
    embeddings = (torch.nn.Embedding, parallel.VocabParallelEmbedding)
    trainable += [
        m
        for m in lm.base_model.children()
        if m is not layers and not isinstance(m, embeddings) and any(True for _ in m.parameters())
    ]
    head = lm.get_output_embeddings()
    if head.weight is not lm.get_input_embeddings().weight:
        trainable.append(head)
    for module in trainable:
        module.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Generation: the LM's log-probs shifted by beta * (min target Q - V), one token at a time.
# ---------------------------------------------------------------------------------------------
def shifted_scores(logits, advantage, beta: float, top_k: int):
    """log softmax(logits) + beta * advantage, with all but the top_k best set to -inf (0 keeps all)."""
    scores = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1) + beta * advantage
    if top_k:
        kth_best = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    return scores


@torch.no_grad()
def generate(
    lm, heads, tokenizer, prompts: list, max_new_tokens: int, beta: float, temperature: float, top_k: int, device
) -> list:
    """Response token ids for each prompt (token ids), up to and including the first end-of-turn id
    (see end_of_turn_ids; a response cut at max_new_tokens has none). A left-padded batch runs token
    by token on the KV cache; each step samples from softmax(shifted scores / temperature), or
    takes their argmax at temperature 0. With beta 0 and top_k 0 this is plain sampling from the LM.
    No prompts (a rank's empty share of a few) give no responses."""
    if not prompts:
        return []
    stop_ids = end_of_turn_ids(tokenizer, lm.generation_config)
    context = model_context(lm.config)
    prompts = [list(p)[-(context - max_new_tokens) :] if context else list(p) for p in prompts]  # the newest context
    width = max(len(p) for p in prompts)
    step_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    cache, finished, tokens = None, torch.zeros(len(prompts), dtype=torch.bool, device=device), []
    was_training = lm.training
    lm.eval()
    for _ in range(max_new_tokens):
        output = lm(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        cache = output.cache
        # The heads in their own precision, as in training, even when the LM runs under autocast:
        # beta (100 in the default sweep) would multiply a bf16 error in Q - V.
        with torch.autocast(torch.device(device).type, enabled=False):
            advantage = heads.target_advantage(output.hidden_states[-1][:, -1].to(heads.v_head[0].weight.dtype))
        scores = shifted_scores(output.logits[:, -1], advantage, beta, top_k)
        if temperature > 0:
            next_ids = torch.multinomial(torch.softmax(scores / temperature, -1), 1).squeeze(-1)
        else:
            next_ids = scores.argmax(-1)
        next_ids = next_ids.masked_fill(finished, tokenizer.pad_token_id)
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, torch.tensor(sorted(stop_ids), device=device))
        if finished.all():
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    lm.train(was_training)
    output = torch.stack(tokens, 1).tolist()
    return [ids[: next((k + 1 for k, token in enumerate(ids) if token in stop_ids), len(ids))] for ids in output]


# ---------------------------------------------------------------------------------------------
# The sentiment task (trlX's ilql_sentiments, offline): the dataset is the starting model's own
# continuations of movie-review openings, each rewarded with VADER's score of how positive it is.
# ILQL should then steer the same model to continuations more positive than its dataset's.
# ---------------------------------------------------------------------------------------------
SENTIMENT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "sentiment_prompts.jsonl")
SENTIMENT_SAMPLES = "sentiment_samples.jsonl"  # the sampled dataset, kept in the run directory


def sentiment_dataset(lm, heads, tokenizer, checkpoint: Optional[str], args: Args, grid) -> tuple:
    """(examples, training prompts, held-out prompts' token ids) of the sentiment task. The openings, as
    (prompt, tools): the shipped file, or --data's prompt-only records (a `prompt` string or conversation, and
    optional `tools`). The held-out openings are those ppo.py picks (same seed, same split), so the two compare.
    The dataset is sampled by the starting model; a resumed run reads the one its run sampled."""
    path = args.data or SENTIMENT_PROMPTS  # read_records names a missing file, the shipped one too
    records = read_records(path)
    for number, record in enumerate(records, 1):
        if not isinstance(record.get("prompt"), str) and not is_conversation(record.get("prompt")):
            fail(
                f"{path}, record {number}: expected a 'prompt' string or conversation, found fields {', '.join(record)}"
            )
    prompts = list({json.dumps(r["prompt"]): (r["prompt"], r.get("tools")) for r in records}.values())
    if not prompts:
        fail(f"no prompts in {path}; the file is empty")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_eval = min(args.eval_prompts, max(1, len(prompts) // 10))
    eval_prompts = [encode_prompt(tokenizer, *prompts[i]) for i in order[:n_eval]]
    train_prompts = [prompts[i] for i in order[n_eval:]]
    if checkpoint:
        samples_file = os.path.join(parallel.run_directory(checkpoint), SENTIMENT_SAMPLES)
        records = read_records(samples_file)
        examples = [scored_example(record, number, samples_file) for number, record in enumerate(records, 1)]
        # The ids the run sampled and trained on (a file without them, written by hand, has only the text).
        examples = [(p, record.get("completion_ids", c), r, t) for (p, c, r, t), record in zip(examples, records)]
    else:
        examples = sample_sentiment_dataset(lm, heads, tokenizer, train_prompts, args, grid, grid.device)
        if not examples:
            fail(f"every continuation {args.model} sampled was empty; raise --max-new-tokens or check the model's EOS")
    return examples, train_prompts, eval_prompts


@functools.cache
def vader():
    """VADER's analyser (the optional extra vaderSentiment): the sentiment task's reward is its compound score of
    a continuation, in [-1, 1] (the opening itself is not scored)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        fail(
            "--task sentiment scores continuations with VADER: pip install vaderSentiment (or pip install -r "
            "requirements-examples.txt)"
        )
    return SentimentIntensityAnalyzer()


def sample_sentiment_dataset(lm, heads, tokenizer, prompts: list, args: Args, grid, device) -> list:
    """(prompt, response token ids, reward, tools) for --samples-per-prompt continuations of each prompt,
    sampled from the starting LM (beta 0, no top-k: the LM's own distribution) and scored by VADER:
    the ids as sampled, which the loss then sees (decoded and tokenized again, a text need not give
    back the same ids), with an end-of-turn id only where the sampler drew one. The batches are dealt
    round-robin over the data-parallel ranks and each is sampled with a seed of its own on a forked
    RNG, so the dataset does not depend on the number of ranks and training's random stream is
    untouched. Continuations whose text is empty (EOS first) are dropped: the dataset file, in the
    format of --task jsonl, has no empty response."""
    repeated = [p for p in prompts for _ in range(args.samples_per_prompt)]
    my_batches = list(enumerate(range(0, len(repeated), args.generation_batch_size)))[grid.dp_rank :: grid.dp_size]
    mine = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for number, start in tqdm.tqdm(
            my_batches, desc="sampling the dataset", dynamic_ncols=True, disable=not grid.is_main
        ):
            digest = hashlib.sha256(f"{args.seed}/sentiment dataset/{number}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            batch_prompts = repeated[start : start + args.generation_batch_size]
            encoded = [encode_prompt(tokenizer, prompt, tools) for prompt, tools in batch_prompts]
            responses = generate(lm, heads, tokenizer, encoded, args.max_new_tokens, 0.0, 1.0, 0, device)
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]  # without the end-of-turn id
            scores = [vader().polarity_scores(text)["compound"] for text in texts]
            scored = zip(batch_prompts, responses, scores, texts)
            mine.append((number, [(prompt, ids, score, tools) for (prompt, tools), ids, score, text in scored if text]))
    batches = sorted(b for share_of_rank in parallel.all_gather_objects(mine, grid.dp_group) for b in share_of_rank)
    return [example for _, batch in batches for example in batch]


def write_jsonl_atomically(path: str, examples: list, tokenizer):
    """The sampled dataset as --task jsonl reads it (the completion as text, or as an assistant message after a
    conversation), with each completion's token ids beside it for a resumed run, renamed into place only once
    complete."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        for prompt, ids, reward, tools in examples:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            completion = text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
            record = dict(prompt=prompt, completion=completion, completion_ids=ids, reward=reward, tools=tools)
            file.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints and logging
# ---------------------------------------------------------------------------------------------
HEADS, ADAPTERS = "ilql_heads", "lora_adapters"  # file prefixes; the adapters: checkpoints of a --lora-rank run
HEADS_FILE, ADAPTERS_FILE = f"{HEADS}.safetensors", f"{ADAPTERS}.safetensors"


def load_model(name: str, device, dtype=torch.float32):
    """A causal LM from a local directory or a hub name, with one clear line when it cannot be had."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name!r}: no such directory; pass a local model directory or a hub name such as gpt2")
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


def new_heads(lm, two_qs: bool) -> ILQLHeads:
    """Heads sized from the LM's output layer (its input is the last hidden state, its output the
    vocabulary), in the dtype of its weights (fp32, or fp64 under --dtype fp64)."""
    weight = lm.get_output_embeddings().weight
    return ILQLHeads(weight.shape[1], weight.shape[0], two_qs).to(weight.dtype)


def load_trained(path: str, device="cpu", dtype=torch.float32):
    """(LM, tokenizer, heads) of a finished run directory or a checkpoint, ready for `generate`, in
    `dtype` (a run's fp64 checkpoint resumes in fp64)."""
    lm, tokenizer = load_model(path, device, dtype)
    state = dict(parallel.stored_tensors(path, HEADS, device))
    heads = new_heads(lm, two_qs="q_heads.1.0.weight" in state).to(device)
    heads.load_state_dict(state)
    if os.path.exists(os.path.join(path, ADAPTERS_FILE)):  # a LoRA run's checkpoint: adapters back on their layers
        adapters = dict(parallel.stored_tensors(path, ADAPTERS, device))
        run_args = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["args"]
        add_lora(lm, run_args["lora_rank"], run_args["lora_alpha"], run_args["lora_target_modules"])  # as the run did
        missing, unexpected = lm.load_state_dict(adapters, strict=False)
        assert not unexpected and not any("lora_" in key for key in missing), (unexpected, missing)
    return lm, tokenizer, heads


def saved_tensors(model, lm, heads: ILQLHeads, grid) -> dict:
    """{file prefix: stream} (see parallel.save_checkpoint) of the LM and the heads of the wrapped
    trained modules `model`. An LM with LoRA adapters is saved as its frozen base (the plain
    model's names) plus ADAPTERS_FILE, from which load_trained rebuilds it exactly; the final save
    merges them first."""
    heads_from_last_stage(model, heads, grid)
    files = {"model": parallel.dense_tensors(lm, model, grid), HEADS: parallel.dense_tensors(heads, model, grid)}
    wrappers = [name + "." for name, module in lm.named_modules() if isinstance(module, LoRA)]
    if wrappers:  # the LM streamed twice, once for the base and once for the adapters
        files[ADAPTERS] = ((k, v) for k, v in parallel.dense_tensors(lm, model, grid) if ".lora_" in k)
        files["model"] = base_tensors(files["model"], wrappers)
    return files


def heads_from_last_stage(model, heads: ILQLHeads, grid):
    """Under pipeline parallelism the heads train on the last stage only: copy them, target Q heads
    included, to the other stages (which generate and save with them). Every rank calls it; a
    no-op without --pp."""
    if isinstance(model.module, parallel.PipelineStage) and grid.pp_group is not None:
        with torch.no_grad():
            for tensor in heads.state_dict().values():
                dist.broadcast(tensor, src=model.module.last_rank, group=grid.pp_group)


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
def evaluate(model, heads, step: int, eval_prompts: list, tokenizer, graph, args: Args, grid, autocast) -> tuple:
    """Generate at each of --eval-betas. randomwalks: mean optimality of greedy walks and of
    sampled ones from every start node; sentiment: mean VADER score of greedy and sampled
    continuations of the held-out prompts; jsonl and hh: greedy responses to a few prompts. Each
    rank generates for a contiguous share of the prompts and the results are gathered in
    order. Sampling runs on a forked RNG re-seeded (seed + rank) for every beta: evaluation
    never perturbs training, and every evaluation draws comparable samples. The whole model
    is gathered once (a no-op below ZeRO-3), so ranks may run different numbers of forwards
    without per-block collectives. The tensor-parallel ranks of one replica generate together
    (the same prompts and seed); under --pp every stage generates with a whole gathered copy
    of the LM and the heads of the last stage. graph: randomwalks' (adjacency, shortest paths),
    else None. Returns (metrics, sample rows)."""
    device, ranks = grid.device, grid.dp_size
    randomwalks, sentiment = args.task == "randomwalks", args.task == "sentiment"
    metric = "optimality" if randomwalks else "score"
    max_new_tokens = RANDOMWALKS_MAX_NODES - 1 if randomwalks else args.max_new_tokens
    samples = args.eval_samples_per_start if randomwalks else 1  # of each prompt (for randomwalks: start node)
    runs = (("greedy", 0.0, 1), ("sampled", args.temperature, samples))[: 2 if randomwalks or sentiment else 1]
    metrics, rows = {}, []
    heads_from_last_stage(model, heads, grid)
    # Communicates under --pp only, where ZeRO-3 (and so gathered()) is refused.
    sampler = parallel.pipeline_gathered_model(model.module, grid.tp_group) if args.pp > 1 else model.module["lm"]
    with model.gathered(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        for beta in args.eval_betas:
            torch.manual_seed(args.seed + grid.dp_rank)
            for name, temperature, repeats in runs:  # greedy decoding is the same with or without top-k
                prompts = [prompt for prompt in eval_prompts for _ in range(repeats)]
                size = math.ceil(len(prompts) / ranks)  # the last ranks may get fewer prompts, or none
                mine = prompts[grid.dp_rank * size : (grid.dp_rank + 1) * size]
                responses = generate(
                    sampler, heads, tokenizer, mine, max_new_tokens, beta, temperature, args.top_k, device
                )
                responses = [r for part in parallel.all_gather_objects(responses, grid.dp_group) for r in part]
                texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
                if randomwalks:  # a walk is its start node's letter and the generated ones
                    scores = [walk_optimality(tokenizer.decode(p) + t, *graph) for p, t in zip(prompts, texts)]
                else:
                    scores = [vader().polarity_scores(text)["compound"] if sentiment else None for text in texts]
                if randomwalks or sentiment:
                    metrics[f"eval/{metric}_{name}_beta{beta:g}"] = float(np.mean(scores))
                if randomwalks:
                    metrics[f"eval/valid_walks_{name}_beta{beta:g}"] = float(np.mean([s > 0 for s in scores]))
                if name == "greedy":
                    rows += [[step, beta, tokenizer.decode(p), t, s] for p, t, s in zip(prompts, texts, scores)]
                if name == "greedy" and not randomwalks:
                    metrics[f"eval/response_tokens_beta{beta:g}"] = float(np.mean([len(r) for r in responses]))
    if randomwalks or sentiment:
        for name in ("greedy", "sampled"):
            best = max(args.eval_betas, key=lambda beta: metrics[f"eval/{metric}_{name}_beta{beta:g}"])
            metrics[f"eval/best_{metric}_{name}"] = metrics[f"eval/{metric}_{name}_beta{best:g}"]
            metrics[f"eval/best_beta_{name}"] = best
    return metrics, rows


def report(step: int, metrics: dict, rows: list, dataset_mean: float, args: Args) -> str:
    """The sweep over betas as a table; dataset_mean: the data's mean optimality or VADER score."""
    randomwalks, sentiment = args.task == "randomwalks", args.task == "sentiment"
    if randomwalks or sentiment:
        metric = "optimality" if randomwalks else "score"
        columns = {"greedy": f"{metric}_greedy", "sampled": f"{metric}_sampled"}
        columns.update({"valid": "valid_walks_sampled"} if randomwalks else {})
        title = "optimality" if randomwalks else "mean VADER score of held-out continuations"
        lines = [
            f"step {step}: {title} by generation beta (dataset {dataset_mean:.3f})",
            " ".join(f"{column:>8}" for column in ("beta", *columns)),
        ]
        lines += [
            f"{beta:>8g} " + " ".join(f"{metrics[f'eval/{key}_beta{beta:g}']:>8.3f}" for key in columns.values())
            for beta in args.eval_betas
        ]
    else:
        lines = [f"step {step}: greedy response to {rows[0][2]!r} by generation beta"]
        lines += [f"{beta:>8g}  {text!r}" for _, beta, prompt, text, _ in rows if prompt == rows[0][2]]
    return "\n".join(lines)


def lr_scheduler(optimizer, args: Args, total_steps: int):
    """Linear warm-up over --warmup-steps, then --lr-schedule (constant, linear or cosine decay to 0)."""

    def factor(step):  # step counts finished optimizer steps
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        factors = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + np.cos(np.pi * progress))}
        return factors[args.lr_schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(args: Args):
    # Flags (and the task's defaults), then the other ranks (a no-op without torchrun).
    args = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    grid = parallel.init_distributed(args.device, tp=args.tp, pp=args.pp, cp=args.cp)
    device, ranks = grid.device, grid.dp_size
    local_batch_size = args.batch_size // ranks
    param_dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    if grid.is_main:
        print(
            f"batch {args.batch_size} = {ranks} data-parallel rank(s) x "
            f"{local_batch_size // args.micro_batch_size} micro-batch(es) of {args.micro_batch_size}"
        )
    randomwalks, sentiment = args.task == "randomwalks", args.task == "sentiment"
    if sentiment:
        vader()  # a missing optional extra ends the run here, before anything is written
    checkpoint = parallel.find_checkpoint(args.resume, verbose=grid.is_main) if args.resume else None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data, model and heads.
    graph = eval_prompts = None
    if randomwalks:
        adjacency, walks = generate_random_walks()
        graph = adjacency, shortest_path_nodes(adjacency)
        examples = [(walk[0], walk[1:], walk_optimality(walk, *graph), None) for walk in walks]
        eval_prompts = [[node] for node in range(1, RANDOMWALKS_NODES)]  # a node's token id is its number
    elif not sentiment:
        examples = load_examples(args.task, args.data)
    # The LM, tokenizer and heads: a checkpoint's (with the adapters of a LoRA run), or --model's (or randomwalks'
    # fresh GPT-2) with new heads and, under --lora-rank, new adapters.
    if checkpoint:
        lm, tokenizer, heads = load_trained(checkpoint, device, param_dtype)
    else:
        if args.model:
            lm, tokenizer = load_model(args.model, device, param_dtype)
        else:
            tokenizer = randomwalks_tokenizer()
            lm = randomwalks_model(tokenizer).to(device, param_dtype)
        heads = new_heads(lm, args.two_qs).to(device)
        if args.lora_rank > 0:  # B = 0: the adapted LM starts equal to the base (and samples the same dataset)
            add_lora(lm, args.lora_rank, args.lora_alpha, args.lora_target_modules)
    if args.num_layers_unfrozen > 0 and not args.num_layers_unfrozen <= len(decoder_layers(lm)):
        fail(
            f"--num-layers-unfrozen {args.num_layers_unfrozen} must be between 1 and the model's "
            f"{len(decoder_layers(lm))} layers"
        )
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()  # saved with the tokenizer, so the trained model keeps it
    if sentiment:
        examples, train_prompts, eval_prompts = sentiment_dataset(lm, heads, tokenizer, checkpoint, args, grid)
    dataset_mean = float(np.mean([reward for _, _, reward, _ in examples])) if randomwalks or sentiment else None
    context = model_context(lm.config)
    max_length = min(args.max_length, context) if context else args.max_length
    sequences = normalize_returns(tokenize_examples(tokenizer, examples, max_length, args.overlong))
    if eval_prompts is None:  # jsonl and hh: a few distinct prompts of the shuffled dataset
        eval_order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(args.seed)).tolist()
        eval_prompts = list(dict.fromkeys(tuple(sequences[i][0][: sequences[i][1]]) for i in eval_order))
        eval_prompts = eval_prompts[: args.eval_generations]
    steps_per_epoch = len(sequences) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} exceeds the {len(sequences)} examples; lower it")
    total_steps = steps_per_epoch * args.num_epochs

    # The LM, V and Q heads are trained (and sharded under ZeRO); the target Q heads are not
    # optimized: they only follow the Q heads by Polyak averaging, the same on every rank. Same
    # seed on every rank, so the weights start equal (the wrapper also broadcasts rank 0's).
    # Under --tp the LM is split and the heads are whole on every rank (they read the whole hidden
    # state); under --pp the V and Q heads train on the last stage (see pipelined_stage).
    if args.pp > 1 and args.zero_stage and lm.get_output_embeddings().weight is lm.get_input_embeddings().weight:
        fail(
            "a model with tied embeddings keeps a copy on the first and the last pipeline stage, which ZeRO-1/2 cannot "
            "shard; use --zero-stage 0 with --pp"
        )
    lm = parallel.tensor_parallel(lm, grid.tp_group)  # a no-op unless --tp > 1
    if args.num_layers_unfrozen > 0:  # on the split LM: the frozen flags must be on the layers that train
        freeze_bottom(lm, args.num_layers_unfrozen)
    lm = parallel.split_sequences(lm, grid, args.sequence_parallel)  # a no-op unless --cp > 1 or asked
    trained = pipelined_stage(lm, heads, grid.pp_group) if args.pp > 1 else trained_modules(lm, heads)
    model = parallel.data_parallel(
        trained, grid.dp_cp_group, args.zero_stage, tp_group=grid.tp_group, pp_group=grid.pp_group
    )
    last_stage = args.pp == 1 or model.module.is_last  # where the heads train

    optimizer = model.make_optimizer(
        torch.optim.AdamW, lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    # Data-parallel replicas draw their own dropout masks (replica 0 keeps the single-process
    # stream); the tensor-parallel ranks of one replica must draw the same ones.
    if grid.dp_rank:
        torch.manual_seed(args.seed + grid.dp_rank)
    scheduler = lr_scheduler(optimizer, args, total_steps)

    # Run directory; a resumed run continues in the directory its checkpoint belongs to.
    trained = (optimizer, model, {"model": lm, HEADS: heads})  # what the optimizer steps, as checkpoints save it
    state, run_name, run_dir = parallel.open_run(checkpoint, args, grid, trained, scheduler)
    step, wandb_id = (state["step"], state["wandb_id"]) if state else (0, None)
    if grid.is_main:
        if sentiment and not checkpoint:
            written = os.path.join(run_dir, SENTIMENT_SAMPLES)
            write_jsonl_atomically(written, examples, tokenizer)
            print(f"{len(examples)} samples of {len(train_prompts)} prompts, mean VADER {dataset_mean:.3f}: {written}")
        tokenizer.save_pretrained(run_dir)
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track and grid.is_main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    # The loop: one optimizer step per batch; each rank takes a contiguous share of it,
    #    accumulated over micro-batches; the target Q heads move towards the Q heads every
    #    --steps-for-target-sync steps.
    model.train()
    progress = tqdm.tqdm(
        total=total_steps, initial=step, desc="ilql", dynamic_ncols=True, mininterval=1.0, disable=not grid.is_main
    )
    tokens_seen, started, start_step = 0, time.time(), step
    parallel.catch_stop_signals()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        # The epoch's order is a function of (seed, epoch) alone, so a resumed run replays it.
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        batch = [sequences[i] for i in order[position * args.batch_size : (position + 1) * args.batch_size].tolist()]
        batch_actions = sum(len(ids) - prompt_length for ids, prompt_length, _ in batch)
        rank_share = batch[grid.dp_rank * local_batch_size : (grid.dp_rank + 1) * local_batch_size]
        losses = accumulate_gradients(
            model, heads, rank_share, batch_actions, ranks, args, tokenizer.pad_token_id, device, autocast
        )
        totals = parallel.all_reduce_sum(
            torch.tensor(list(losses.values()), dtype=torch.float64, device=device), grid.dp_group
        )
        losses = dict(zip(losses, totals.tolist()))
        tokens_seen += sum(len(ids) for ids, _, _ in batch)
        grad_norm = model.clip_grad_norm_(args.max_grad_norm)
        if not math.isfinite(losses["loss"]) or not torch.isfinite(grad_norm):  # every rank sees the same sums
            fail(
                f"the loss is {losses['loss']} and the gradient norm {float(grad_norm)} at step {step + 1}, so "
                "training would learn nothing; lower --learning-rate or --beta, or check the rewards and --max-length"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.steps_for_target_sync == 0 and last_stage:  # other stages get the heads when they need them
            with model.gathered():  # the Q heads whole under ZeRO-3 (a no-op below it)
                heads.sync_target_q_heads(args.alpha)

        tokens_per_second = tokens_seen / (time.time() - started)
        progress.update(1)
        progress.set_postfix(
            loss=f"{losses['loss']:.4f}", value=f"{losses['value']:.3f}", tokens_per_s=f"{tokens_per_second:.0f}"
        )
        metrics = {f"train/loss_{k}" if k in ("q", "v", "cql", "awac") else f"train/{k}": v for k, v in losses.items()}
        metrics |= {
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/tokens_per_s": tokens_per_second,
            "train/epoch": step / steps_per_epoch,
            "time/steps_per_s": (step - start_step) / (time.time() - started),
        }
        if step % args.eval_every == 0 or step == total_steps:
            eval_metrics, rows = evaluate(model, heads, step, eval_prompts, tokenizer, graph, args, grid, autocast)
            metrics.update(eval_metrics)
            if grid.is_main:
                progress.write(report(step, eval_metrics, rows, dataset_mean, args))
            if wandb_run:
                import wandb

                metrics["samples"] = wandb.Table(columns=["step", "beta", "prompt", "response", "score"], data=rows)
        if wandb_run:
            wandb_run.log(metrics, step=step)
        stop = step < total_steps and parallel.stop_requested(grid)  # SIGTERM: checkpoint and exit 0
        if stop or args.save_every and step % args.save_every == 0 and step < total_steps:
            shared = {"step": step, "scheduler": scheduler.state_dict(), "args": asdict(args), "run_name": run_name}
            shared["wandb_id"] = wandb_run.id if wandb_run else None
            files, name, keep = saved_tensors(model, lm, heads, grid), f"step_{step:08d}", args.keep_checkpoints
            parallel.save_checkpoint(run_dir, name, grid, keep, shared, files, (lm, tokenizer), trained)
        if stop:
            return parallel.report_stop(run_dir, grid, f"step {step}")
    progress.close()

    # The result: the LM (adapters merged) loadable by plain transformers, the heads beside it.
    with model.gathered() if args.lora_rank else contextlib.nullcontext():  # merging copies the (small) LoRA model
        lm = merge_lora(lm)
    parallel.save_final(run_dir, grid, saved_tensors(model, lm, heads, grid), (lm, tokenizer))
    if not grid.is_main:
        return
    summary = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if randomwalks or sentiment:
        summary["dataset/optimality" if randomwalks else "dataset/score"] = dataset_mean
    last_step = {k: v for k, v in metrics.items() if k.startswith(("train/", "time/"))}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump({"step": step, **summary, "last_step": last_step}, file, indent=1)
    shown = {k: v for k, v in summary.items() if "best" in k or k.startswith("dataset")} or summary
    print(
        f"saved {run_dir} after {step} steps in {time.time() - started:.0f}s: "
        + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    )
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()


if __name__ == "__main__":
    with parallel.clean_exit():
        main(tyro.cli(Args))
