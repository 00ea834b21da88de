"""PPO for language models: online RLHF against a reward, with a KL penalty to a reference model.

The policy generates responses to prompts, a reward model (or a task metric, or your function)
scores them, and PPO raises the probability of what scored well while a per-token KL penalty keeps
the policy near the reference (its starting point). One update, as numbered steps in `main`:
generate, truncate at EOS, score, log-probs and values, per-token rewards, reward scaling,
advantages, then PPO epochs over minibatches.

    python sft.py --output-dir runs/sft                       # 1. behaviour cloning
    python reward_model.py --model runs/sft --output-dir runs/rm   # 2. a reward model
    python ppo.py --model runs/sft --reward-model runs/rm     # 3. RLHF against it
    python ppo.py --model runs/sft                            # or against the true metric

Memory savers: `--num-layers-unfrozen k` (Hydra: the reference shares the frozen bottom of the
policy and copies only its top k layers), `--lora-rank r` (the reference is the policy with its
adapters switched off), and critic-free advantages (`--advantage rloo|grpo|reinforce++`).
Log-probs and entropies come from `kernels.fused_logprobs`, which never builds the vocabulary-sized
logits; advantages from `kernels.gae`.
"""

import copy
import gzip
import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tqdm
import tyro
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

import kernels


@dataclass
class Args:
    exp_name: str = "ppo"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    seed: int = 1
    """seed of python, numpy and torch (sampling, minibatch order)"""
    task: Literal["randomwalks", "jsonl", "hh", "tldr"] = "randomwalks"
    """randomwalks: the 20 start letters, scored by optimality unless a reward model is given; jsonl: `{"prompt"}` records from --data;
    hh: Anthropic/hh-rlhf prompts; tldr: Reddit TL;DR posts (hh and tldr download from the hub unless --data is given)"""
    data: Optional[str] = None
    """local prompt file: required for --task jsonl; for hh/tldr a local copy in the upstream format"""
    model: Optional[str] = None
    """the policy's starting point: an sft.py run directory, or any causal LM hub name or local path (required)"""
    reward_model: Optional[str] = None
    """a reward_model.py run directory (or any sequence-classification model with num_labels=1); scores are normalised with its saved mean/std"""
    reward_fn: Optional[str] = None
    """`module:function` (or `path/file.py:function`) taking (prompts, responses) and returning one float per response"""
    reward_device: Optional[str] = None
    """device of the reward model (default: the policy's)"""
    reward_clip: Optional[float] = None
    """clip normalised scores to [-c, c]"""
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of a response that has no EOS within --max-new-tokens (default: 1.0 for text tasks, 0 for randomwalks)"""
    value_model: Optional[str] = None
    """start the critic from this model (e.g. the reward model) as a separate network, instead of a value head on the policy"""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast for forward passes (weights and optimizer stay fp32)"""
    device: str = "auto"
    """torch device; auto picks cuda when present, else cpu"""
    output_dir: Optional[str] = None
    """where the run directory goes; default runs/<run name>"""

    num_layers_unfrozen: int = -1
    """Hydra: train only the top k layers and share the frozen rest with the reference (-1: train everything, full reference copy)"""
    lora_rank: int = 0
    """LoRA adapters of this rank on the policy's linear layers (0: off); the reference is the policy with adapters disabled"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter output is multiplied by alpha / rank"""
    lora_target_modules: str = "all"
    """comma-separated names (suffixes) of the linear layers that get adapters; `all` means every linear layer inside the decoder blocks"""

    advantage: Literal["gae", "rloo", "grpo", "reinforce++"] = "gae"
    """gae: critic and generalized advantage estimation; rloo: leave-one-out baseline; grpo: group-normalised score; reinforce++: globally whitened returns"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (rloo and grpo need at least 2)"""
    num_updates: int = 100
    """PPO updates (each: generate a batch, then optimise on it)"""
    batch_size: int = 128
    """rollouts (responses) per update"""
    mini_batch_size: int = 32
    """rollouts per optimizer step"""
    micro_batch_size: int = 32
    """rollouts per forward/backward pass (gradient accumulation inside a minibatch)"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon"""
    cliprange_value: float = 0.2
    """clip of the value prediction's change from the rollout's value"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """average losses over all real tokens of a minibatch (token) or per sequence first (sequence)"""
    scale_rewards: bool = False
    """divide scores by their running standard deviation (the mean is never shifted)"""

    init_kl_coef: float = 0.05
    """initial KL penalty coefficient beta"""
    target_kl: Optional[float] = None
    """adaptive KL controller target (per-sequence KL); None keeps beta fixed"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon, in rollouts"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimate in the reward: k1 = log-ratio, k3 = (r - 1) - log r with r = p_ref / p"""

    temperature: float = 1.0
    """sampling temperature (log-probs use the same one)"""
    top_k: int = 0
    """sample from the k most likely tokens (0: all)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1: off)"""
    max_new_tokens: int = 10
    """response budget in tokens (randomwalks needs 10: nine letters and EOS)"""
    max_prompt_length: int = 256
    """prompts are cut on the left to this many tokens"""

    eval_every: int = 25
    """updates between evaluations (and at the end)"""
    eval_samples_per_start: int = 20
    """randomwalks: sampled walks per start node at each evaluation"""
    eval_prompts: int = 64
    """text tasks: held-out prompts scored at each evaluation"""
    save_every: int = 0
    """updates between checkpoints; 0 saves only the final model"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep on disk"""
    resume: Optional[str] = None
    """checkpoint directory (or a run directory: its newest checkpoint) to continue from; pass the same flags as the original run"""

    track: bool = False
    """log to Weights & Biases (works with WANDB_MODE=offline)"""
    wandb_project: str = "rlhf"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""


def fail(message: str):
    """Stop with one line on stderr and exit status 1: bad input is the user's to fix, not a traceback to read."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# The randomwalks task (trlX's examples/randomwalks), as in sft.py: prompts are start letters,
# and the true reward of a response is the optimality of the walk it completes.
# ---------------------------------------------------------------------------------------------
RANDOMWALKS_SEED = 1000
RANDOMWALKS_NODES = 21
RANDOMWALKS_MAX_NODES = 10  # a walk has at most this many nodes, start included


def generate_random_walks(seed=RANDOMWALKS_SEED, n_nodes=RANDOMWALKS_NODES, n_walks=1000, max_nodes=RANDOMWALKS_MAX_NODES):
    """The graph (boolean adjacency [n, n]) and the walks (lists of node indices), drawn exactly as trlX does."""
    rng = np.random.RandomState(seed)
    while True:  # redraw until every node has a way out
        adjacency = rng.rand(n_nodes, n_nodes) > 0.9
        np.fill_diagonal(adjacency, False)
        if adjacency.any(axis=1).all():
            break
    adjacency[0, :] = False  # the goal is absorbing
    adjacency[0, 0] = True
    walks = []
    for _ in range(n_walks):
        node = rng.randint(n_nodes)
        while node == 0:
            node = rng.randint(n_nodes)
        walk = [node]
        for _ in range(max_nodes - 1):
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
    n = len(adjacency)
    nodes = [None] * n
    nodes[0] = 1
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


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def read_records(path: str) -> list:
    """Records of a .jsonl, .jsonl.gz or .parquet file; malformed lines are named by number."""
    if not os.path.isfile(path):
        fail(f"data file {path!r} does not exist; pass --data with the path of a .jsonl file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet
        except ImportError:
            fail("reading .parquet needs pyarrow: pip install pyarrow (or convert the file to .jsonl)")
        return pyarrow.parquet.read_table(path).to_pylist()
    records = []
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as file:
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
    for number, record in enumerate(records, 1):
        for field in fields:
            if not isinstance(record.get(field), str):
                problem = "is missing" if field not in record else "is not a string"
                fail(f"{path}, record {number}: field {field!r} {problem}; every record needs {', '.join(repr(f) for f in fields)}")


def hh_example(dialogue: str):
    """Split an hh-rlhf dialogue into (everything up to the last "\\n\\nAssistant:", the final reply)."""
    marker = "\n\nAssistant:"
    cut = dialogue.rfind(marker)
    if cut < 0:
        return None
    return dialogue[: cut + len(marker)], dialogue[cut + len(marker) :]


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


def load_prompts(task: str, data: Optional[str]) -> list:
    """The prompts of a text task: jsonl `prompt`s, hh dialogues up to their last assistant turn, TL;DR posts."""
    if task == "jsonl" and data is None:
        fail('--task jsonl needs --data PATH (a file of {"prompt": ...} lines)')
    prompts = []
    for path in [data] if data else download(task):
        records = read_records(path)
        if task == "jsonl":
            require_fields(records, ("prompt",), path)
            prompts += [r["prompt"] for r in records]
        elif task == "hh":
            require_fields(records, ("chosen",), path)
            prompts += [p[0] for p in map(hh_example, (r["chosen"] for r in records)) if p is not None]
        elif task == "tldr":
            require_fields(records, ("subreddit", "title", "post"), path)
            prompts += [f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR:" for r in records]
    prompts = list(dict.fromkeys(prompts))  # hh repeats a prompt for each of its comparisons
    if not prompts:
        fail(f"no prompts in {data or task}; the file is empty or no record has a prompt")
    return prompts


# ---------------------------------------------------------------------------------------------
# Rewards: a reward model (as in reward_model.py), the task metric, or a user function
# ---------------------------------------------------------------------------------------------
def tokenize_pair_side(tokenizer, prompt: str, response: str, max_length: int):
    """Token ids of prompt + response cut to max_length from the left of the prompt (the response is
    what is judged, and its last token is where the score is read), and whether the prompt was cut.
    None if the response alone does not fit."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(response_ids) >= max_length:
        return None
    excess = max(0, len(prompt_ids) + len(response_ids) - max_length)
    return prompt_ids[excess:] + response_ids, excess > 0


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


def forward_scores(model, sequences: list, pad_token_id: int, device) -> torch.Tensor:
    """Scalar score of each sequence, read at its last real token (the transformers class finds the
    rightmost non-pad token, so a pad token must not occur inside the text)."""
    input_ids, attention_mask, position_ids = pad_batch(sequences, pad_token_id, device)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 0]


@torch.no_grad()
def score(model, tokenizer, prompts: list, responses: list, batch_size: int = 32, max_length: Optional[int] = None) -> torch.Tensor:
    """Raw reward-model scores of each (prompt, response), as a float tensor on the CPU. Normalise with
    the statistics in the model's config: (score - config.reward_mean) / config.reward_std."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_length = max_length or model_context(model.config) or 1 << 30
    device = next(model.parameters()).device
    sequences = []
    for prompt, response in zip(prompts, responses):
        tokenized = tokenize_pair_side(tokenizer, prompt, response, max_length)
        sequences.append(tokenized[0] if tokenized else tokenizer(response, add_special_tokens=False)["input_ids"][-max_length:])
    was_training = model.training
    model.eval()
    scores = torch.cat([forward_scores(model, sequences[i : i + batch_size], tokenizer.pad_token_id, device).float().cpu() for i in range(0, len(sequences), batch_size)])
    model.train(was_training)
    return scores


def load_reward_model(path: str, device, policy_tokenizer):
    """A reward model with its tokenizer and normalisation; texts are re-tokenized for it, so a
    tokenizer that differs from the policy's is fine (and said once)."""
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        fail(f"--reward-model {path!r}: no such directory; pass a reward_model.py run directory")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        fail(f"--reward-model {path!r} could not be loaded: {str(error).splitlines()[0]}")
    if model.config.num_labels != 1:
        fail(f"--reward-model {path!r} has {model.config.num_labels} outputs; a reward model has one (num_labels=1)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        print("note: the reward model's tokenizer differs from the policy's; responses are decoded to text and re-tokenized for it")
    mean, std = getattr(model.config, "reward_mean", 0.0), getattr(model.config, "reward_std", 1.0)
    if not hasattr(model.config, "reward_mean"):
        print(f"note: {path} has no reward_mean/reward_std (not trained by reward_model.py); raw scores are used")
    model.requires_grad_(False)
    return model, tokenizer, mean, std


def load_reward_fn(spec: str):
    """The user's reward function from `module:function` or `path/to/file.py:function`."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        fail(f"--reward-fn {spec!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location("user_reward", module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, function_name)
    except (ImportError, FileNotFoundError, AttributeError) as error:
        fail(f"--reward-fn {spec!r} could not be loaded: {error}")


def checked_scores(values, count: int, source: str) -> torch.Tensor:
    """A reward source's output as a float tensor, refusing wrong lengths and non-finite numbers."""
    try:
        scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        fail(f"{source} must return a list of numbers, got {type(values).__name__}")
    if len(scores) != count:
        fail(f"{source} returned {len(scores)} scores for {count} responses; return exactly one per response")
    if not torch.isfinite(scores).all():
        fail(f"{source} returned a non-finite score (NaN or inf) for response {int((~torch.isfinite(scores)).nonzero()[0])}; return finite numbers")
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
        fail(f"cannot find the {count} decoder layers of {type(model).__name__}; Hydra and LoRA support GPT-2, Llama and GPT-NeoX style models")
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
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, LoRA(module, rank, alpha))
                wrapped.append(getattr(parent, child))
    if not wrapped:
        fail(f"--lora-target-modules {targets!r} matched no linear layer; name layers such as q_proj,v_proj (Llama) or c_attn (GPT-2)")
    return wrapped


@contextmanager
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
    """A plain copy of the model with every adapter merged into its layer: what gets saved."""
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoRA):
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, module.merged())
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
    trainable += [m for m in policy.base_model.children() if m is not layers and not isinstance(m, torch.nn.Embedding) and any(True for _ in m.parameters())]
    head = policy.get_output_embeddings()
    if head.weight is not policy.get_input_embeddings().weight:  # a tied head is the frozen embedding
        trainable.append(head)
    for module in trainable:
        module.requires_grad_(True)
    # deepcopy with a memo holding the frozen parameters copies only the trainable ones.
    memo = {id(p): p for p in policy.parameters() if not p.requires_grad}
    reference = copy.deepcopy(policy, memo)
    return reference.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# Forward passes: log-probs of the response tokens, their entropies, and values, without logits
# ---------------------------------------------------------------------------------------------
def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so a left-padded prompt starts at position 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, input_ids, attention_mask, prompt_length: int, temperature: float, with_entropy=False):
    """Log-probs (and entropies) of the response tokens input_ids[:, prompt_length:], and the hidden
    states that predicted them (which the value head reads). The last hidden state goes straight to
    kernels.fused_logprobs with the LM head: the [B, T, vocab] logits are never built."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)).last_hidden_state
    hidden = hidden[:, prompt_length - 1 : -1]
    head = model.get_output_embeddings()
    result = kernels.fused_logprobs(hidden, head.weight, input_ids[:, prompt_length:], temperature=temperature, bias=head.bias, return_entropy=with_entropy)
    logprobs, entropy = result if with_entropy else (result, None)
    return logprobs, entropy, hidden


class Critic(torch.nn.Module):
    """A separate value network: a trunk (initialised from --value-model) and a scalar head."""

    def __init__(self, path: str):
        super().__init__()
        config = AutoConfig.from_pretrained(path)
        self.trunk = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.head = torch.nn.Linear(config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        if getattr(config, "num_labels", None) == 1:  # a reward model: start from its score head too
            scorer = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            with torch.no_grad():
                self.head.weight.copy_(scorer.score.weight)
                if scorer.score.bias is not None:
                    self.head.bias.copy_(scorer.score.bias)

    def forward(self, input_ids, attention_mask, prompt_length: int):
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)).last_hidden_state
        return self.head(hidden[:, prompt_length - 1 : -1]).squeeze(-1)


def values_of(value_head, critic, hidden, input_ids, attention_mask, prompt_length):
    """V(state) before each response token, from the policy's hidden states or the separate critic."""
    if critic is not None:
        return critic(input_ids, attention_mask, prompt_length).float()
    return value_head(hidden).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# The pieces of the update, each small enough to test by hand
# ---------------------------------------------------------------------------------------------
def truncate_at_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """Everything after the first EOS becomes padding. Returns (responses, mask of real tokens, has_eos);
    the EOS itself is a real token: it is an action the policy took."""
    is_eos = responses == eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = ~after_eos
    return torch.where(mask, responses, pad_token_id), mask, is_eos.any(-1)


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
    """-beta * KL on every real response token, plus the score on the last real token."""
    rewards = torch.where(mask, -beta * kl, 0.0)
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def critic_free_advantages(method: str, scores, kl, mask, beta: float, group_size: int, gamma: float):
    """Advantages without a value function. rloo and grpo work on the sequence reward
    R = score - beta * sum_t KL_t of each response and a baseline from the other responses to the
    same prompt (rows i*group_size ... are one group); reinforce++ whitens per-token returns over
    the whole batch."""
    if method == "reinforce++":
        returns, _ = kernels.gae(torch.zeros_like(kl), token_rewards(scores, kl, mask, beta), mask, gamma, 1.0)
        return kernels.masked_whiten(returns, mask)
    sequence_reward = (scores.to(kl.dtype) - beta * torch.where(mask, kl, 0.0).sum(-1)).view(-1, group_size)
    if method == "rloo":
        baseline = (sequence_reward.sum(-1, keepdim=True) - sequence_reward) / (group_size - 1)
        advantage = sequence_reward - baseline
    else:  # grpo
        advantage = (sequence_reward - sequence_reward.mean(-1, keepdim=True)) / (sequence_reward.std(-1, keepdim=True) + 1e-8)
    return torch.where(mask, advantage.view(-1, 1), 0.0)


def aggregate(loss, mask, aggregation: str, normaliser: float):
    """Sum of a per-token loss over a micro-batch, divided by the minibatch's count of real tokens
    (token) or of sequences, after averaging within each sequence (sequence): accumulating these
    over micro-batches gives the minibatch mean exactly."""
    loss = torch.where(mask, loss, 0.0)
    if aggregation == "token":
        return loss.sum() / normaliser
    return (loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, args: Args, normaliser: float):
    """Clipped policy loss and clipped value loss (each aggregated), with the statistics to log."""
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))
    stats = {
        "policy/approx_kl": kernels.masked_mean(ratio - 1 - log_ratio, mask),  # k3 of the update, >= 0
        "policy/clip_fraction": kernels.masked_mean(((ratio - 1).abs() > args.cliprange).float(), mask),
        "policy/ratio_mean": kernels.masked_mean(ratio, mask), "policy/ratio_max": torch.where(mask, ratio, 0.0).max(),
    }
    loss = aggregate(policy_loss, mask, args.loss_aggregation, normaliser)
    if values is not None:
        clipped_values = old_values + (values - old_values).clamp(-args.cliprange_value, args.cliprange_value)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
        loss = loss + args.vf_coef * aggregate(value_loss, mask, args.loss_aggregation, normaliser)
        stats["value/clip_fraction"] = kernels.masked_mean(((values - old_values).abs() > args.cliprange_value).float(), mask)
        stats["value/error"] = kernels.masked_mean((values - returns) ** 2, mask)
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Generation, run directory, checkpoints
# ---------------------------------------------------------------------------------------------
def model_context(config):
    """Longest sequence the model's position embeddings allow (None when the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def epoch_order(n: int, seed: int, epoch: int) -> list:
    """Shuffled example order of one epoch; a function of (seed, epoch) alone, so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, args: Args, tokenizer, greedy=False):
    """Responses [B, max_new_tokens] to left-padded prompts, with KV cache; rows that stop early are
    padded. top_k=0 is passed explicitly: left unset, generate() would fall back to top-k 50."""
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    responses = output[:, prompt_ids.shape[1] :]
    return F.pad(responses, (0, args.max_new_tokens - responses.shape[1]), value=tokenizer.pad_token_id)


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int, device):
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def find_checkpoint(path: str) -> str:
    """A checkpoint directory, or the newest one inside a run directory's checkpoints/."""
    if os.path.isfile(os.path.join(path, "trainer_state.pt")):
        return path
    folder = os.path.join(path, "checkpoints")
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step_") and not d.endswith(".tmp")) if os.path.isdir(folder) else []
    steps = [d for d in steps if os.path.isfile(os.path.join(folder, d, "trainer_state.pt"))]
    if not steps:
        fail(f"--resume {path!r} is not a checkpoint (no trainer_state.pt) nor a run directory with checkpoints/step_*")
    return os.path.join(folder, steps[-1])


def save_checkpoint(run_dir: str, step: int, trainer_state: dict, keep: int):
    """Write checkpoints/step_N/trainer_state.pt via a temporary directory and a rename, so a kill
    mid-write never leaves a broken checkpoint where --resume would find it."""
    folder = os.path.join(run_dir, "checkpoints")
    final = os.path.join(folder, f"step_{step:08d}")
    temporary = final + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    torch.save(trainer_state, os.path.join(temporary, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    for old in sorted(d for d in os.listdir(folder) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
        shutil.rmtree(os.path.join(folder, old))


def save_final(run_dir: str, policy, tokenizer, value_state: Optional[dict]):
    """The policy with adapters merged, by save_pretrained into the run directory (config.json moved
    in last, so a directory with a config.json holds a complete model), and the value function
    apart in value_head.pt."""
    temporary = os.path.join(run_dir, ".final.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    merge_lora(policy).save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    if value_state is not None:
        torch.save(value_state, os.path.join(temporary, "value_head.pt"))
    for name in sorted(os.listdir(temporary), key=lambda name: name == "config.json"):
        os.replace(os.path.join(temporary, name), os.path.join(run_dir, name))
    os.rmdir(temporary)


def rng_states() -> dict:
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def init_wandb(args: Args, run_name: str, run_dir: str, run_id: Optional[str]):
    """wandb.init that cannot hang a run: online with a bounded wait, falling back to offline logging."""
    import wandb

    kwargs = dict(project=args.wandb_project, entity=args.wandb_entity, name=run_name, config=asdict(args), dir=run_dir, id=run_id, resume="allow")
    try:
        return wandb.init(**kwargs, settings=wandb.Settings(init_timeout=60))
    except Exception as error:
        print(f"wandb could not start online ({type(error).__name__}); logging offline to {run_dir}/wandb")
        return wandb.init(**kwargs, mode="offline")


def load_policy(name: str, device):
    """The policy's causal LM and tokenizer, with one clear line when they cannot be had."""
    if not os.path.isdir(os.path.expanduser(name)) and (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)):
        fail(f"--model {name!r}: no such directory; pass an sft.py run directory or a hub name such as gpt2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as error:
        fail(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {name!r} has no EOS token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main(args: Args):
    # 0. Sizes, checked once. Prompts per batch times samples per prompt is the batch.
    critic_free = args.advantage != "gae"
    for name, size, unit in (("--batch-size", args.batch_size, args.mini_batch_size), ("--mini-batch-size", args.mini_batch_size, args.micro_batch_size), ("--batch-size", args.batch_size, args.samples_per_prompt)):
        if size % unit:
            fail(f"{name} {size} is not a multiple of {unit} (mini-batch, micro-batch and samples per prompt must divide evenly)")
    if args.advantage in ("rloo", "grpo") and args.samples_per_prompt < 2:
        fail(f"--advantage {args.advantage} compares responses to the same prompt; set --samples-per-prompt 2 or more")
    if args.num_layers_unfrozen > 0 and args.lora_rank > 0:
        fail("--num-layers-unfrozen and --lora-rank are two ways to get a cheap reference; pick one")
    if args.model is None:
        fail("--model is required: the policy starts from a trained model, e.g. `python sft.py --output-dir runs/sft` then --model runs/sft")
    if args.reward_model and args.reward_fn:
        fail("pass one of --reward-model and --reward-fn")
    if args.task != "randomwalks" and not (args.reward_model or args.reward_fn):
        fail(f"--task {args.task} has no built-in reward; pass --reward-model or --reward-fn")
    prompts_per_batch = args.batch_size // args.samples_per_prompt
    checkpoint = find_checkpoint(args.resume) if args.resume else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # 1. Prompts and the reward.
    if args.task == "randomwalks":
        adjacency, _ = generate_random_walks()
        shortest = shortest_path_nodes(adjacency)
        train_prompts = eval_prompts = [node_letter(n) for n in range(1, RANDOMWALKS_NODES)]
    else:
        prompts = load_prompts(args.task, args.data)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = min(args.eval_prompts, max(1, len(prompts) // 10))
        eval_prompts, train_prompts = [prompts[i] for i in order[:n_eval]], [prompts[i] for i in order[n_eval:]]
    policy, tokenizer = load_policy(args.model, device)
    reward_device = torch.device(args.reward_device) if args.reward_device else device
    reward_model = load_reward_model(args.reward_model, reward_device, tokenizer) if args.reward_model else None
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    missing_eos_penalty = args.missing_eos_penalty if args.missing_eos_penalty is not None else (0.0 if args.task == "randomwalks" else 1.0)

    def raw_scores(prompts: list, responses: list) -> torch.Tensor:
        """The score of each response before any penalty: reward model (normalised), user function, or task metric."""
        if reward_model is not None:
            model, rm_tokenizer, mean, std = reward_model
            scores = (score(model, rm_tokenizer, prompts, responses) - mean) / std
        elif reward_fn is not None:
            scores = checked_scores(reward_fn(prompts, responses), len(responses), f"--reward-fn {args.reward_fn}")
        else:
            scores = torch.tensor([walk_optimality(p + r, adjacency, shortest) for p, r in zip(prompts, responses)])
        return scores.clamp(-args.reward_clip, args.reward_clip) if args.reward_clip is not None else scores

    # 2. Policy, reference and value function.
    adapters = []
    if args.lora_rank > 0:
        adapters = add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_target_modules)
        reference = None  # the policy with adapters disabled
    elif args.num_layers_unfrozen > 0:
        reference = make_hydra(policy, args.num_layers_unfrozen)
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    value_head = critic = None
    if not critic_free:
        if args.value_model:
            critic = Critic(args.value_model).to(device)
        else:
            value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(device)
            torch.nn.init.zeros_(value_head.weight)  # V = 0 at the start: no prior opinion of any state
            torch.nn.init.zeros_(value_head.bias)
    value_modules = [m for m in (value_head, critic) if m is not None]
    trainable = [p for p in policy.parameters() if p.requires_grad] + [p for m in value_modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    kl_controller = KLController(args.init_kl_coef, args.target_kl, args.kl_horizon)
    score_moments = RunningMoments()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def reference_logprobs(input_ids, attention_mask, prompt_length):
        if adapters:
            with adapters_disabled(adapters):
                return response_logprobs(policy, input_ids, attention_mask, prompt_length, args.temperature)[0]
        return response_logprobs(reference, input_ids, attention_mask, prompt_length, args.temperature)[0]

    # 3. Run directory; a resumed run continues in its checkpoint's directory with every state restored.
    update, wandb_id = 0, None
    if checkpoint:
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
        changed = {k: (v, getattr(args, k)) for k, v in state["args"].items() if k not in ("resume", "track") and getattr(args, k, v) != v}
        if changed:
            print(f"warning: flags differ from the checkpoint's run, so the resume is not exact: {changed}")
        policy.load_state_dict(state["policy"])
        for module, module_state in zip(value_modules, state["value"]):
            module.load_state_dict(module_state)
        optimizer.load_state_dict(state["optimizer"])
        kl_controller.value = state["kl_coef"]
        score_moments.__dict__.update(state["score_moments"])
        set_rng_states(state["rng"])
        update, run_name, wandb_id = state["update"], state["run_name"], state["wandb_id"]
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
        print(f"resuming {run_dir} from update {update}")
    else:
        run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = args.output_dir or os.path.join("runs", run_name)
        if os.path.exists(os.path.join(run_dir, "config.json")) or os.path.isdir(os.path.join(run_dir, "checkpoints")):
            fail(f"--output-dir {run_dir} already holds a run; pick another directory, or pass --resume {run_dir} to continue it")
        os.makedirs(run_dir, exist_ok=True)
    wandb_run = init_wandb(args, run_name, run_dir, wandb_id) if args.track else None

    @torch.no_grad()
    def evaluate():
        """Scores of greedy and sampled responses to held-out prompts, their KL to the reference, and
        (with a reward model) the win rate against the reference policy's own samples. Runs on a
        forked RNG with a fixed seed, so it never changes training and evaluations compare."""
        policy.eval()
        metrics, rows = {}, []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            torch.manual_seed(args.seed)
            repeats = args.eval_samples_per_start if args.task == "randomwalks" else 1
            for name, greedy, copies in (("greedy", True, 1), ("sampled", False, repeats)):
                prompts = [p for p in eval_prompts for _ in range(copies)]
                prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, args.max_prompt_length, device)
                responses, mask, _ = truncate_at_eos(generate(policy, prompt_ids, prompt_mask, args, tokenizer, greedy), tokenizer.eos_token_id, tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                metrics[f"eval/score_{name}"] = raw_scores(prompts, texts).mean().item()
                if args.task == "randomwalks":
                    optimality = [walk_optimality(p + t, adjacency, shortest) for p, t in zip(prompts, texts)]
                    metrics[f"eval/optimality_{name}"] = float(np.mean(optimality))
                if name == "sampled":
                    input_ids, attention_mask = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, mask.long()], 1)
                    logprobs = response_logprobs(policy, input_ids, attention_mask, prompt_ids.shape[1], args.temperature)[0]
                    kl = kl_per_token(logprobs, reference_logprobs(input_ids, attention_mask, prompt_ids.shape[1]), "k1")
                    metrics["eval/kl"] = torch.where(mask, kl, 0.0).sum(-1).mean().item()
                    if reward_model is not None:  # the trlX paper's metric: wins against the reference policy
                        if adapters:
                            with adapters_disabled(adapters):
                                reference_responses = generate(policy, prompt_ids, prompt_mask, args, tokenizer)
                        else:
                            reference_responses = generate(reference, prompt_ids, prompt_mask, args, tokenizer)
                        reference_texts = tokenizer.batch_decode(truncate_at_eos(reference_responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0], skip_special_tokens=True)
                        ours, theirs = raw_scores(prompts, texts), raw_scores(prompts, reference_texts)
                        metrics["eval/win_rate"] = ((ours > theirs).float() + 0.5 * (ours == theirs).float()).mean().item()
                    rows = [[update, p, t] for p, t in zip(prompts[:16], texts[:16])]
        policy.train()
        return metrics, rows

    # 4. The loop.
    policy.train()  # dropout is switched off below for every forward pass that PPO compares
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # a ratio of 1 on the first minibatch needs the same network twice
    progress = tqdm.tqdm(total=args.num_updates, initial=update, desc="ppo", dynamic_ncols=True, mininterval=1.0)
    metrics, started, start_update = {}, time.time(), update
    while update < args.num_updates:
        # 1. Sample prompts (a stream of shuffled epochs, a function of seed and position alone, so a
        # resumed run replays it) and generate.
        first, last = update * prompts_per_batch, (update + 1) * prompts_per_batch
        epochs = range(first // len(train_prompts), (last - 1) // len(train_prompts) + 1)
        stream = [i for epoch in epochs for i in epoch_order(len(train_prompts), args.seed, epoch)]
        offset = first - epochs[0] * len(train_prompts)
        prompts = [train_prompts[i] for i in stream[offset : offset + prompts_per_batch] for _ in range(args.samples_per_prompt)]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, args.max_prompt_length, device)
        prompt_length = prompt_ids.shape[1]
        policy.eval()
        with autocast:
            generated = generate(policy, prompt_ids, prompt_mask, args, tokenizer)
        policy.train()

        # 2. Truncate at the first EOS: what follows is padding, excluded from every loss and statistic.
        responses, mask, has_eos = truncate_at_eos(generated, tokenizer.eos_token_id, tokenizer.pad_token_id)
        input_ids = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)

        # 3. Score the decoded responses; a response that never ended pays the missing-EOS penalty.
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = raw_scores(prompts, texts)
        scores = scores - missing_eos_penalty * (~has_eos).float().cpu()
        raw_mean = scores.mean().item()

        # 4. Log-probs under the policy and the reference (same temperature as sampling), and values.
        # The policy's pass runs in the micro-batches of the first PPO epoch, in its order, so the
        # first minibatch repeats bitwise the same computation: its ratio is exactly 1.
        permutations = [torch.randperm(args.batch_size).tolist() for _ in range(args.ppo_epochs)]
        old_logprobs, ref_logprobs = torch.zeros(2, args.batch_size, args.max_new_tokens, device=device)
        old_values = None if critic_free else torch.zeros(args.batch_size, args.max_new_tokens, device=device)
        with torch.no_grad(), autocast:
            for start in range(0, args.batch_size, args.micro_batch_size):
                rows = torch.tensor(permutations[0][start : start + args.micro_batch_size], device=device)
                logprobs, _, hidden = response_logprobs(policy, input_ids[rows], attention_mask[rows], prompt_length, args.temperature, with_entropy=True)
                old_logprobs[rows] = logprobs.float()
                ref_logprobs[rows] = reference_logprobs(input_ids[rows], attention_mask[rows], prompt_length).float()
                if not critic_free:
                    old_values[rows] = values_of(value_head, critic, hidden, input_ids[rows], attention_mask[rows], prompt_length)

        # 5. Per-token KL to the reference and the coefficient that weighs it.
        kl = kl_per_token(old_logprobs, ref_logprobs, args.kl_estimator)
        beta = kl_controller.value
        sequence_kl = torch.where(mask, old_logprobs - ref_logprobs, 0.0).sum(-1).mean().item()

        # 6. Optional reward scaling by the running std of scores (the mean is never shifted).
        scores = scores.to(device)
        if args.scale_rewards:
            score_moments.update(scores)
            scores = scores / max(score_moments.std, 1e-8)

        # 7. Advantages: GAE on real tokens with a critic, or a critic-free estimator; returns before whitening.
        if critic_free:
            advantages = critic_free_advantages(args.advantage, scores, kl, mask, beta, args.samples_per_prompt, args.gamma)
            returns = None
        else:
            rewards = token_rewards(scores, kl, mask, beta)
            advantages, returns = kernels.gae(old_values, rewards, mask, args.gamma, args.lam)
            advantages = kernels.masked_whiten(advantages, mask)

        # 8. PPO epochs over shuffled minibatches, accumulated over micro-batches.
        statistics = []
        for permutation in permutations:
            for start in range(0, args.batch_size, args.mini_batch_size):
                minibatch = permutation[start : start + args.mini_batch_size]
                normaliser = float(mask[minibatch].sum()) if args.loss_aggregation == "token" else float(len(minibatch))
                for micro_start in range(0, len(minibatch), args.micro_batch_size):
                    rows = torch.tensor(minibatch[micro_start : micro_start + args.micro_batch_size], device=device)
                    with autocast:
                        logprobs, entropy, hidden = response_logprobs(policy, input_ids[rows], attention_mask[rows], prompt_length, args.temperature, with_entropy=True)
                        values = None if critic_free else values_of(value_head, critic, hidden, input_ids[rows], attention_mask[rows], prompt_length)
                    loss, stats = ppo_losses(logprobs.float(), old_logprobs[rows], advantages[rows], values, None if critic_free else old_values[rows],
                                             None if critic_free else returns[rows], mask[rows], args, normaliser)
                    if args.entropy_coef:
                        loss = loss - args.entropy_coef * aggregate(entropy.float(), mask[rows], args.loss_aggregation, normaliser)
                    loss.backward()
                    stats["policy/entropy"] = kernels.masked_mean(entropy.float(), mask[rows])
                    statistics.append({k: float(v.detach()) for k, v in stats.items()})
                    if len(statistics) == 1:  # exactly 0 unless old and new log-probs were computed differently
                        first_minibatch_log_ratio = torch.where(mask[rows], logprobs.float() - old_logprobs[rows], 0.0).abs().max().item()
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        kl_controller.update(sequence_kl, args.batch_size)
        update += 1

        # Statistics of the update, gathered once.
        metrics = {k: float(np.mean([s[k] for s in statistics])) for k in statistics[0]}
        metrics.update({
            "objective/score": raw_mean, "objective/kl": sequence_kl, "objective/kl_coef": beta, "objective/eos_fraction": has_eos.float().mean().item(),
            "objective/response_length": mask.sum(-1).float().mean().item(), "time/updates_per_s": (update - start_update) / (time.time() - started),
            "policy/first_minibatch_max_log_ratio": first_minibatch_log_ratio,
        })
        if not critic_free:
            real_returns, real_values = returns[mask], old_values[mask]
            metrics["value/explained_variance"] = (1 - (real_returns - real_values).var() / real_returns.var().clamp(min=1e-8)).item()
        progress.update(1)
        progress.set_postfix(score=f"{raw_mean:.3f}", kl=f"{sequence_kl:.3f}")
        if update % args.eval_every == 0 or update == args.num_updates:
            eval_metrics, rows = evaluate()
            metrics.update(eval_metrics)
            progress.write(f"update {update}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in eval_metrics.items()))
            if wandb_run:
                import wandb

                metrics["samples"] = wandb.Table(columns=["update", "prompt", "response"], data=rows)
        if wandb_run:
            wandb_run.log(metrics, step=update)
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            save_checkpoint(run_dir, update, {
                "update": update, "policy": policy.state_dict(), "value": [m.state_dict() for m in value_modules], "optimizer": optimizer.state_dict(),
                "kl_coef": kl_controller.value, "score_moments": dict(score_moments.__dict__), "rng": rng_states(),
                "args": asdict(args), "run_name": run_name, "wandb_id": wandb_run.id if wandb_run else None,
            }, args.keep_checkpoints)
    progress.close()

    # 9. The result: the policy with adapters merged, loadable by plain transformers; the value function apart.
    save_final(run_dir, policy, tokenizer, {"value_head": value_head.state_dict()} if value_head is not None else ({"critic": critic.state_dict()} if critic is not None else None))
    summary = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump({"update": update, **summary, "last_update": {k: v for k, v in metrics.items() if not k.startswith("eval/") and k != "samples"}}, file, indent=1)
    print(f"saved {run_dir} after {update} updates in {time.time() - started:.0f}s: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
