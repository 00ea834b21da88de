"""Supervised fine-tuning (SFT) of a causal LM on prompt/completion pairs.

The first stage of the RLHF pipeline: teach the model the format of good responses by
maximum likelihood on demonstrations. The loss covers completion tokens only; the prompt
is context. The default task, randomwalks, runs offline on a CPU in a couple of minutes:

    python sft.py                                    # randomwalks, fresh 6-layer GPT-2
    python sft.py --task jsonl --data demos.jsonl --model gpt2
    python sft.py --task jsonl --data chats.jsonl --model runs/smollm2-135m   # {"messages": [...]}: assistant turns
    python sft.py --task hh --model EleutherAI/pythia-160m   # needs the network
    torchrun --nproc_per_node 8 sft.py --model ... --zero-stage 3   # data parallel, see parallel.py

The trained model and its tokenizer land in the run directory (`runs/<run name>/`), loadable
with plain `AutoModelForCausalLM.from_pretrained(run_dir)` and by the other scripts.

Reading order. The method is `main` (at the bottom): data, model, then the loop of optimizer
steps, each accumulated over micro-batches by `accumulate_gradients` with the loss of
`loss_sum_from_logits` (cross-entropy on completion tokens only); `evaluate` after it. Above it,
in file order: Args and check_args; the randomwalks task; the data parsers (jsonl, hh, tldr) and
`tokenize_examples`; the model and `generate`; run directory, checkpoints and logging (plumbing).
"""

import contextlib
import gzip
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
import torch.nn.functional as F
import tqdm
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import kernels
import parallel


@dataclass
class Args:
    exp_name: str = "sft"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (model init, data order, dropout): any integer from 0"""
    task: Literal["randomwalks", "jsonl", "hh", "tldr"] = "randomwalks"
    """randomwalks: built-in offline graph task; jsonl: --data's records of TRL's kinds, `text` or `messages` (every
    token, or every assistant turn, learned) or `prompt` and `completion` (the completion learned), strings or
    conversations; hh: Anthropic/hh-rlhf chosen dialogues; tldr: Reddit TL;DR summaries (hh and tldr download from the
    hub unless --data is given)"""
    data: Optional[str] = None
    """local data: .jsonl or .jsonl.gz, or (with the datasets package) .parquet or a datasets directory; required for
    --task jsonl; for hh/tldr a local copy in the upstream format"""
    model: Optional[str] = None
    """hub name or local path of any causal LM; default: a fresh 6-layer GPT-2 for randomwalks (required for other
    tasks)"""
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
    """pipeline stages per model copy under torchrun (decoder layers split in contiguous stages, 1F1B schedule over the
    micro-batches)"""
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

    max_length: int = 512
    """longest prompt+completion in tokens (capped at the model's context)"""
    overlong: Literal["truncate", "skip"] = "truncate"
    """examples longer than --max-length: truncate (cut the prompt from the left, then the completion from the right) or
    skip them"""
    eval_fraction: float = 0.1
    """fraction of the examples held out for the eval loss, strictly between 0 and 1 (at least one example is held
    out)"""

    num_epochs: int = 30
    """passes over the training split"""
    batch_size: int = 96
    """examples per optimizer step, over all ranks (each of N data-parallel ranks takes batch_size / N; 96 splits over
    1, 2, 4 or 8)"""
    micro_batch_size: Optional[int] = None
    """examples per forward/backward pass on one rank (default: the rank's whole share, batch_size / ranks); the share
    must be a multiple of it"""
    packing: bool = False
    """pack each micro-batch's examples into rows no longer than its longest instead of padding each to it, attention
    kept within each example by position ids that restart (same loss; not with --cp or --sequence-parallel)"""
    learning_rate: float = 1e-3
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW weight decay (0: none)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warm-up: cosine or linear to zero, or constant"""
    warmup_steps: int = 20
    """optimizer steps of linear learning-rate warm-up (0: none)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""

    eval_every: int = 50
    """optimizer steps between evaluations (and at the end)"""
    eval_samples_per_start: int = 50
    """randomwalks: sampled walks per start node at each evaluation"""
    eval_generations: int = 8
    """held-out prompts whose greedy completions are shown at each evaluation (0: none)"""
    max_new_tokens: int = 64
    """generation budget for the sample completions (randomwalks uses its own: 10)"""
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
    """Every flag, checked before anything is loaded or written: ranges, sizes that must divide,
    and what depends on the number of processes. Returns the flags with --micro-batch-size settled."""

    def require(ok: bool, flag: str, what: str):
        if not ok:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} {what}")

    at_least_1 = "tp pp cp num_epochs batch_size eval_every eval_samples_per_start max_new_tokens keep_checkpoints"
    rules = (  # (flags, the rule, what it says when broken)
        (at_least_1, lambda v: v >= 1, "must be at least 1"),
        ("seed warmup_steps eval_generations save_every", lambda v: v >= 0, "must be 0 or more"),
        ("learning_rate max_grad_norm", lambda v: 0 < v < math.inf, "must be a positive number"),
        ("weight_decay", lambda v: 0 <= v < math.inf, "must be 0 or a positive number"),
        ("eval_fraction", lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
        ("max_length", lambda v: v >= 2, "leaves no room for a prompt token and a completion token; use at least 2"),
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
        fail(f"--chat-template {args.chat_template} does not exist; pass the path of a Jinja file")
    parallel.check_output_dir(args)
    return replace(args, micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------------------------------
# The randomwalks task (trlX's examples/randomwalks): walks on a random directed graph whose
# node 0 is the goal. The data are random walks, so behaviour cloning scores what they score
# (mean optimality 0.35); RLHF can push towards shortest paths, which are known exactly.
# ---------------------------------------------------------------------------------------------
RANDOMWALKS_SEED = 1000
RANDOMWALKS_NODES = 21
RANDOMWALKS_MAX_NODES = 10  # a walk has at most this many nodes, start included


def generate_random_walks(seed=RANDOMWALKS_SEED, n_walks=1000):
    """The graph (boolean adjacency [n, n]) and the walks (lists of node indices), drawn exactly as trlX does."""
    rng = np.random.RandomState(seed)
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
# Data: every task becomes (prompt, completion, tools) examples of TRL's kinds: strings, or
# conversations (message lists) rendered by the chat template.
# ---------------------------------------------------------------------------------------------
KINDS = "'text' (a string), 'messages' (a conversation), or 'prompt' and 'completion' (strings or conversations)"


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


def require_fields(records: list, fields: tuple, path: str):
    """Every record has these string fields (an upstream format's), else one line naming the first that does not."""
    for number, record in enumerate(records, 1):
        if not all(isinstance(record.get(field), str) for field in fields):
            fail(f"{path}, record {number}: expected strings {', '.join(fields)}, found fields {', '.join(record)}")


def is_conversation(value) -> bool:
    """A non-empty list of messages, each a dict with a string role and a string content (other keys allowed)."""
    messages = value if isinstance(value, list) and value else [None]
    return all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content")) for m in messages)


def example_of(record: dict, number: int, path: str) -> tuple:
    """(kind, (prompt, completion, tools)) of a record. `text` and `messages` are a completion with an empty prompt,
    so every token, or every assistant turn, is learned; of `prompt` and `completion`, the completion."""
    prompt, completion, tools = record.get("prompt"), record.get("completion"), record.get("tools")
    if isinstance(record.get("text"), str):
        return "text", ("", record["text"], None)
    if is_conversation(record.get("messages")):
        kind, (prompt, completion) = "messages", ([], record["messages"])
    elif isinstance(prompt, str) and isinstance(completion, str):
        return "prompt-completion", (prompt, completion, None)
    elif is_conversation(prompt) and is_conversation(completion):
        kind = "conversational prompt-completion"
    else:
        fail(f"{path}, record {number}: expected {KINDS}, found fields {', '.join(record) or 'none'}")
    if not any(message["role"] == "assistant" for message in completion):
        fail(f"{path}, record {number}: the conversation has no assistant message to learn from")
    return kind, (prompt, completion, tools)


def hh_example(dialogue: str) -> Optional[dict]:
    """An hh-rlhf dialogue as a prompt-completion record: the prompt everything up to the last
    "\\n\\nAssistant:", the completion the final reply; None without one."""
    marker = "\n\nAssistant:"
    prompt, found, reply = dialogue.rpartition(marker)
    return {"prompt": prompt + marker, "completion": reply} if found else None


def tldr_example(record: dict) -> dict:
    """OpenAI's summarize-from-feedback prompt format: post in, " summary" out."""
    prompt = f"SUBREDDIT: r/{record['subreddit']}\n\nTITLE: {record['title']}\n\nPOST: {record['post']}\n\nTL;DR:"
    return {"prompt": prompt, "completion": " " + record["summary"].strip()}


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


def load_examples(task: str, data: Optional[str]) -> list:
    """(prompt, completion, tools) examples of a text task: hh and tldr records are first converted to
    prompt-completion ones, so every task's records are checked and read by the same code."""
    if task == "jsonl" and data is None:
        fail(f"--task jsonl needs --data PATH (records with {KINDS})")
    paths = [data] if data else download(task)
    examples, unusable = [], 0
    for path in paths:
        records = read_records(path)
        if task != "jsonl":
            require_fields(records, ("chosen",) if task == "hh" else ("subreddit", "title", "post", "summary"), path)
            records = [hh_example(r["chosen"]) if task == "hh" else tldr_example(r) for r in records]
            unusable += records.count(None)
            records = [record for record in records if record is not None]
        kinds = [example_of(record, number, path) for number, record in enumerate(records, 1)]
        for number, (kind, _) in enumerate(kinds, 1):
            if kind != kinds[0][0]:
                fail(f"{path}, record {number}: a {kind} record after {kinds[0][0]} ones; one file holds one kind")
        examples += [example for _, example in kinds]
    if unusable:
        print(f"skipped {unusable} dialogues without an '\\n\\nAssistant:' turn")
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


def conversation_sequences(tokenizer, messages: list, tools, first: int, end_ids: set) -> tuple:
    """([(token ids, loss mask)], whether the template is prefix-preserving on this conversation): the loss covers
    each assistant turn from message `first` on, up to and including its end-of-turn token.

    A turn's tokens are found by rendering growing prefixes: the context before the turn (with the generation
    prompt) and the conversation up to the turn must each extend the previous rendering. When the template rewrites
    earlier turns (drops their <think> blocks, say), the whole rendering is not what the model saw at each turn:
    then every assistant turn becomes its own sequence, its context as the template renders it at that turn."""
    whole = render(tokenizer, messages, tools)
    mask, turns, preserving = [0] * len(whole), [], True
    for i in [i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]:
        context = render(tokenizer, messages[:i], tools, generation_prompt=True)
        turn = render(tokenizer, messages[: i + 1], tools)
        if turn[: len(context)] != context:
            fail(
                f"the chat template renders message {i + 1} of a conversation so that its context changes; "
                "its tokens cannot be told apart: fix the template (--chat-template)"
            )
        end = next((k + 1 for k in range(len(context), len(turn)) if turn[k] in end_ids), len(turn))
        turns.append((turn[:end], [0] * len(context) + [1] * (end - len(context))))
        mask[len(context) : end] = turns[-1][1][len(context) :]
        preserving &= whole[: len(turn)] == turn
    return ([(whole, mask)], True) if preserving else (turns, False)


def tokenize_examples(tokenizer, examples: list, max_length: int, overlong: str):
    """(token ids, loss mask) of each example: 1 on the tokens learned, 0 on the context.

    Strings: prompt and completion are tokenized apart so the boundary is exact (BOS, if the
    tokenizer adds one, goes on the prompt), and the completion ends with EOS. Conversations are
    rendered by the chat template (see conversation_sequences). Over-long sequences are skipped, or
    truncated keeping what is learned: the context before the first learned token loses tokens from
    its left first (one stays, to predict from), the rest from its right after."""
    sequences, total, too_long, rewritten, end_ids = [], 0, 0, 0, end_of_turn_ids(tokenizer)
    for prompt, completion, tools in examples:
        if isinstance(completion, str):
            prompt_ids = tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id]  # a position to predict from
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            pieces = [(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))]
        else:
            if not tokenizer.chat_template:
                fail(
                    "the data are conversations and the model's tokenizer has no chat template; pass --chat-template "
                    "PATH (a Jinja file)"
                )
            pieces, preserving = conversation_sequences(tokenizer, prompt + completion, tools, len(prompt), end_ids)
            rewritten += not preserving
        total += len(pieces)
        for ids, mask in pieces:
            if len(ids) > max_length:
                too_long += 1
                if overlong == "skip":
                    continue
                start = min(mask.index(1) - 1, len(ids) - max_length)
                ids, mask = ids[start : start + max_length], mask[start : start + max_length]
            sequences.append((ids, mask))
    if rewritten:
        print(
            f"{rewritten} conversation(s) are not rendered prefix-preserving by the chat template (it rewrites earlier "
            "turns); each of their assistant turns became its own example"
        )
    if too_long:
        action = "skipped" if overlong == "skip" else "truncated"
        print(
            f"{too_long} of {total} examples are longer than --max-length {max_length} tokens: {action} (see "
            "--overlong)"
        )
    if not sequences:
        fail(f"no examples left: all {total} exceed --max-length {max_length}; raise it or use --overlong truncate")
    return sequences


def collate(sequences: list, pad_token_id: int, device, packing=False) -> dict:
    """A micro-batch: the model's keyword arguments, and labels that are -100 except on the learned tokens (and on
    each sequence's first token, which nothing before it in a row may predict).

    Padded: a row per sequence, right-padded, with an attention mask. Packed (--packing): rows of whole sequences,
    filled first fit from the longest and no longer than the longest, so attention never costs more than padded;
    the position ids restart at 0 for each sequence and for the padding ending a row, and without an attention mask
    and a cache transformers' create_causal_mask reads them as packed sequences: attention stays within each one."""
    width, rows = max(len(ids) for ids, _ in sequences), []
    for sequence in sorted(sequences, key=lambda sequence: -len(sequence[0])) if packing else sequences:
        fitting = [row for row in rows if packing and sum(len(ids) for ids, _ in row) + len(sequence[0]) <= width]
        if fitting:
            fitting[0].append(sequence)
        else:
            rows.append([sequence])
    batch = {"input_ids": [], "labels": [], "position_ids" if packing else "attention_mask": []}
    for row in rows:
        ids = [token for tokens, _ in row for token in tokens]
        labels = [-100 if k == 0 or not mask[k] else tokens[k] for tokens, mask in row for k in range(len(tokens))]
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_token_id] * pad)
        batch["labels"].append(labels + [-100] * pad)
        if packing:  # the padding is a sequence of its own, which no other attends to
            batch["position_ids"].append([k for tokens, _ in row for k in range(len(tokens))] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
    return {key: torch.tensor(value, device=device) for key, value in batch.items()}


def micro_batches_of(sequences: list, args: Args, pad_token_id: int, device) -> list:
    """The sequences collated in micro-batches of --micro-batch-size, padded or packed (--packing)."""
    size = args.micro_batch_size
    return [
        collate(sequences[k : k + size], pad_token_id, device, args.packing) for k in range(0, len(sequences), size)
    ]


def model_logits(model, micro_batch: dict):
    """The logits of a micro-batch (without a cache, which would keep transformers from reading packed positions)."""
    return model(**{key: value for key, value in micro_batch.items() if key != "labels"}, use_cache=False).logits


def loss_sum_from_logits(logits, labels):
    """Summed cross-entropy of the completion tokens (the caller divides by the batch's token count,
    so that gradient accumulation over micro-batches equals one big batch exactly)."""
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits are upcast, fp64 kept
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def accumulate_gradients(model, micro_batches: list, batch_tokens: int, ranks: int, autocast) -> float:
    """Backward over this rank's share of the batch, collated in micro-batches; returns its share of
    the global batch's mean completion-token loss (the shares sum to the mean over ranks).

    Each micro-batch's summed loss is divided by the completion-token count of the whole global
    batch, not its own, so the accumulated gradient equals the one-big-batch gradient exactly. The
    data-parallel reduction averages over ranks, hence the factor `ranks`. Only the last
    micro-batch's backward communicates (no_sync on the others)."""
    if isinstance(model.module, parallel.PipelineStage):
        # Pipelined: the 1F1B schedule runs every micro-batch through the stages; the last stage
        # computes the loss, and the sum comes back to every stage.

        def loss_fn(logits, micro_batch):
            return loss_sum_from_logits(logits, micro_batch["labels"]) / batch_tokens * ranks

        with autocast:
            return parallel.pipeline_1f1b(model, micro_batches, loss_fn).item() / ranks
    batch_loss = 0.0
    for number, micro_batch in enumerate(micro_batches, 1):
        with model.no_sync() if number < len(micro_batches) else contextlib.nullcontext():
            with autocast:
                loss = loss_sum_from_logits(model_logits(model, micro_batch), micro_batch["labels"]) / batch_tokens
            (loss * ranks).backward()
        batch_loss += loss.item()
    return batch_loss


def model_context(config):
    """Longest sequence the model's position embeddings allow (None when the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, device) -> list:
    """Completion token ids for each prompt (token ids), cut before the first end-of-turn id (see
    end_of_turn_ids): a left-padded batch decoded token by token on the KV cache of a model in eval
    mode (evaluate's), greedy at temperature 0, else sampled from softmax(logits / temperature) and nothing else.
    (model.generate() would also apply what the checkpoint's generation_config.json asks, a
    repetition penalty or banned n-grams, and the evaluation would no longer measure the model's
    own distribution.)"""
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    context = model_context(model.config)
    # Prompts end where generation starts: a long one loses its oldest tokens.
    prompts = [p[-(context - max_new_tokens) :] if context else p for p in prompts]
    width = max(len(p) for p in prompts)
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
        next_ids = next_ids.masked_fill(finished, tokenizer.pad_token_id)
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, torch.tensor(sorted(stop_ids), device=device))
        if finished.all():
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], -1)
        position_ids = position_ids[:, -1:] + 1
    output = torch.stack(tokens, 1).tolist()
    return [ids[: next((k for k, token in enumerate(ids) if token in stop_ids), len(ids))] for ids in output]


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints and logging
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
        fail(f"--model {name!r}: no such directory; pass a local model directory or a hub name such as gpt2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {name!r} has no EOS token; completions need one to end")
    if tokenizer.pad_token_id is None:  # padding is masked out of the loss, so EOS serves as pad
        tokenizer.pad_token = tokenizer.eos_token
    return kernels.use_linear(model.to(device)), tokenizer


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def evaluate(model, step: int, eval_sequences: list, tokenizer, graph, args: Args, grid, autocast) -> tuple:
    """Eval loss on the held-out split; randomwalks also samples walks and scores their optimality.
    Each rank evaluates a share and the sums are reduced. Sampling runs on a forked RNG with a
    fixed seed per rank: evaluation never perturbs training, and every evaluation draws
    comparable samples. The whole model is gathered once (a no-op below ZeRO-3), so ranks
    may run different numbers of forwards without per-block collectives. Under --pp the samples
    come from a whole copy gathered from the stages. graph: randomwalks' (adjacency, shortest
    paths), else None. Returns (metrics, sample rows)."""
    device, ranks = grid.device, grid.dp_size
    model.eval()
    metrics, rows = {}, []
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, completion tokens
    with model.gathered(), torch.no_grad():
        with autocast:
            batches = micro_batches_of(eval_sequences[grid.dp_rank :: ranks], args, tokenizer.pad_token_id, device)

            def sums(logits, micro_batch):
                labels = micro_batch["labels"]
                return torch.stack(
                    [loss_sum_from_logits(logits, labels).double(), (labels[:, 1:] != -100).sum().double()]
                )

            if args.pp > 1:
                totals += parallel.pipeline_forward(model, batches, sums)
            else:
                for micro_batch in batches:
                    totals += sums(model_logits(model.module, micro_batch), micro_batch)
        parallel.all_reduce_sum(totals, grid.dp_group)
        sampler = parallel.pipeline_gathered_model(model.module, grid.tp_group) if args.pp > 1 else model.module
        metrics["eval/loss"] = (totals[0] / totals[1]).item()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + grid.dp_rank)
            if args.task == "randomwalks":
                starts = [[node] for node in range(1, RANDOMWALKS_NODES)]  # a node's token id is its number
                for temperature, repeats, name in ((0.0, 1, "greedy"), (1.0, args.eval_samples_per_start, "sampled")):
                    prompts = [s for s in starts for _ in range(repeats)][grid.dp_rank :: ranks]
                    completions = generate(sampler, tokenizer, prompts, RANDOMWALKS_MAX_NODES, temperature, device)
                    walks = [tokenizer.decode(p + c) for p, c in zip(prompts, completions)]
                    scored = [(w, walk_optimality(w, *graph)) for w in walks]
                    scored = [pair for share in parallel.all_gather_objects(scored, grid.dp_group) for pair in share]
                    metrics[f"eval/optimality_{name}"] = float(np.mean([s for _, s in scored]))
                    metrics[f"eval/valid_walks_{name}"] = float(np.mean([s > 0 for _, s in scored]))
                    if name == "greedy":
                        rows = [[step, w[0], w[1:], s] for w, s in scored]
            elif grid.dp_rank == 0 and args.eval_generations:  # with its tensor-parallel partners (same forwards)
                eval_prompts = [ids[: mask.index(1)] for ids, mask in eval_sequences[: args.eval_generations]]
                completions = generate(sampler, tokenizer, eval_prompts, args.max_new_tokens, 0.0, device)
                rows = [
                    [step, tokenizer.decode(p), tokenizer.decode(c, skip_special_tokens=True), None]
                    for p, c in zip(eval_prompts, completions)
                ]
    model.train()
    return metrics, rows


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
    # Flags, then the other ranks (a no-op without torchrun).
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
    checkpoint = parallel.find_checkpoint(args.resume, verbose=grid.is_main) if args.resume else None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data and model.
    if args.task == "randomwalks":
        adjacency, walks = generate_random_walks()
        graph = (adjacency, shortest_path_nodes(adjacency))
        walk_strings = ["".join(node_letter(n) for n in walk) for walk in walks]
        examples = [(walk[0], walk[1:], None) for walk in walk_strings]
        dataset_optimality = float(np.mean([walk_optimality(w, *graph) for w in walk_strings]))
    else:
        examples, graph = load_examples(args.task, args.data), None
    if checkpoint or args.model:
        model, tokenizer = load_model(checkpoint or args.model, device, param_dtype)
    else:
        tokenizer = randomwalks_tokenizer()
        model = randomwalks_model(tokenizer).to(device, param_dtype)
    context = model_context(model.config)
    max_length = min(args.max_length, context) if context else args.max_length
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()  # saved with the tokenizer, so the trained model keeps it
    sequences = tokenize_examples(tokenizer, examples, max_length, args.overlong)
    if context and args.task != "randomwalks" and args.max_new_tokens >= context:
        fail(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's {context}-token "
            "context; lower it"
        )
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_eval = max(1, int(len(sequences) * args.eval_fraction))
    eval_sequences, train_sequences = [sequences[i] for i in order[:n_eval]], [sequences[i] for i in order[n_eval:]]
    steps_per_epoch = len(train_sequences) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} exceeds the {len(train_sequences)} training examples; lower it")
    total_steps = steps_per_epoch * args.num_epochs

    # Same seed on every rank, so the weights start equal (the wrapper also broadcasts rank 0's).
    if args.pp > 1 and args.zero_stage and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        fail(
            "a model with tied embeddings keeps a copy on the first and the last pipeline stage, which ZeRO-1/2 cannot "
            "shard; use --zero-stage 0 with --pp"
        )
    model = parallel.tensor_parallel(model, grid.tp_group)  # a no-op unless --tp > 1
    model = parallel.split_sequences(model, grid, args.sequence_parallel)  # a no-op unless --cp > 1 or asked
    if args.pp > 1:
        model = parallel.PipelineStage(model, grid.pp_group)
    model = parallel.data_parallel(
        model, grid.dp_cp_group, args.zero_stage, tp_group=grid.tp_group, pp_group=grid.pp_group
    )

    saved = model.module.model if args.pp > 1 else model.module  # the HF model saved (under --pp, this stage's part)
    optimizer = model.make_optimizer(torch.optim.AdamW, lr=args.learning_rate, weight_decay=args.weight_decay)
    # Data-parallel replicas draw their own dropout masks (replica 0 keeps the single-process
    # stream); the tensor-parallel ranks of one replica must draw the same ones.
    if grid.dp_rank:
        torch.manual_seed(args.seed + grid.dp_rank)
    scheduler = lr_scheduler(optimizer, args, total_steps)

    # Run directory; a resumed run continues in the directory its checkpoint belongs to.
    trained = (optimizer, model, {"model": saved})  # what the optimizer steps, as checkpoints save it
    state, run_name, run_dir = parallel.open_run(checkpoint, args, grid, trained, scheduler)
    step, wandb_id = (state["step"], state["wandb_id"]) if state else (0, None)
    if grid.is_main:
        tokenizer.save_pretrained(run_dir)
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track and grid.is_main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    # The loop: one optimizer step per batch, accumulated over micro-batches.
    model.train()
    progress = tqdm.tqdm(
        total=total_steps, initial=step, desc="sft", dynamic_ncols=True, mininterval=1.0, disable=not grid.is_main
    )
    tokens_seen, started, start_step = 0, time.time(), step
    parallel.catch_stop_signals()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        # The epoch's shuffled order is a function of (seed, epoch) alone, so a resumed run replays it.
        generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        shuffled = torch.randperm(len(train_sequences), generator=generator).tolist()
        batch = [train_sequences[i] for i in shuffled[position * args.batch_size : (position + 1) * args.batch_size]]
        batch_tokens = sum(sum(mask[1:]) for _, mask in batch)
        rank_share = batch[grid.dp_rank * local_batch_size : (grid.dp_rank + 1) * local_batch_size]
        rank_micro_batches = micro_batches_of(rank_share, args, tokenizer.pad_token_id, device)
        batch_loss = accumulate_gradients(model, rank_micro_batches, batch_tokens, ranks, autocast)
        batch_loss = parallel.all_reduce_sum(
            torch.tensor([batch_loss], dtype=torch.float64, device=device), grid.dp_group
        ).item()
        tokens_seen += sum(len(ids) for ids, _ in batch)
        grad_norm = model.clip_grad_norm_(args.max_grad_norm)
        if not math.isfinite(batch_loss) or not torch.isfinite(grad_norm):  # every rank sees the same sums
            fail(
                f"the loss is {batch_loss} and the gradient norm {float(grad_norm)} at step {step + 1}, so training "
                "would learn nothing; lower --learning-rate, or check the data and --max-length"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        tokens_per_second = tokens_seen / (time.time() - started)
        progress.update(1)
        progress.set_postfix(loss=f"{batch_loss:.4f}", tokens_per_s=f"{tokens_per_second:.0f}")
        metrics = {
            "train/loss": batch_loss,
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/tokens_per_s": tokens_per_second,
            "train/epoch": step / steps_per_epoch,
            "time/steps_per_s": (step - start_step) / (time.time() - started),
        }
        if step % args.eval_every == 0 or step == total_steps:
            eval_metrics, rows = evaluate(model, step, eval_sequences, tokenizer, graph, args, grid, autocast)
            metrics.update(eval_metrics)
            if grid.is_main:
                progress.write(
                    f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in eval_metrics.items())
                )
            if wandb_run:
                import wandb

                metrics["samples"] = wandb.Table(columns=["step", "prompt", "completion", "score"], data=rows)
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

    # The result, loadable by plain transformers and by the other scripts.
    parallel.save_final(run_dir, grid, {"model": parallel.dense_tensors(saved, model, grid)}, (saved, tokenizer))
    if not grid.is_main:
        return
    summary = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if args.task == "randomwalks":
        summary["dataset/optimality"] = dataset_optimality
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
