"""Memory planner: what one GPU holds for a training job of this repository's scripts, for every
(data, tensor, pipeline, ZeRO) layout of a number of GPUs, and the best layout that fits.

    python benchmarks/plan.py --model llama-2-70b --algorithm ppo --gpu-memory 80 --gpus 64
    python benchmarks/plan.py --model runs/sft --gpus 1 2 4     # any config.json, or a run directory

Arithmetic on paper, no GPU needed: it imports nothing of the library and allocates nothing. The
comment below says what is counted and how; tests/test_planner.py checks the parameter counts
against transformers models built from a config and the bytes against sums written out by hand.
"""

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

# Everything below is arithmetic on paper: nothing is allocated, no process group is made. It
# counts what one GPU holds for a training job, for every layout of a number of GPUs, and picks
# one that fits. GB are 10^9 bytes; an "80 GB" H100 holds 85.5e9 bytes, so reading
# --gpu-memory 80 as 80e9 is a little conservative before the safety margin (10% by default)
# that covers the CUDA context, NCCL buffers, allocator fragmentation and whatever else is not
# counted here.
#
# Parameters are counted exactly from the shapes (tested against `sum(p.numel())` of transformers
# models built from a config). Every norm weight and bias is included: Llama has RMSNorm weights
# (2 per layer, 1 final) and no biases; GPT-NeoX and GPT-2 have LayerNorm weights and biases and a
# bias on every linear layer but the LM head; GPT-2 also has learned position embeddings. A
# sequence-classification head (reward model: `score`, hidden -> 1, no bias) and the PPO value
# head (hidden -> 1 with bias) replace the LM head where used.
#
# The layout. dp data-parallel ranks x tp tensor-parallel ranks x pp pipeline stages = GPUs.
#   - Tensor parallel (Megatron): the attention and MLP matrices of a layer are split over tp
#     ranks (so tp must divide the attention heads and the KV heads, and stays within a node:
#     tp <= 8); the embedding and the LM head are vocab-parallel, ceil(vocab / tp) rows each. Norm
#     weights and biases are counted whole on every tp rank (Megatron splits the biases of
#     column-parallel layers; counting them whole overstates by less than 0.01%).
#   - Pipeline parallel: pp divides the layer count; a stage holds layers / pp consecutive
#     layers, the first stage the embeddings too, the last the final norm and the head. With tied
#     embeddings and pp > 1 the last stage keeps its own copy of the embedding as the LM head (as
#     Megatron does). Stages differ, so each is computed and the WORST one is reported (its index
#     in the `stage` column): it is the one that must fit.
#   - Every model of a job (policy, reference, critic, reward model) is laid out on the same grid,
#     so tp and pp must suit every one of them.
#   - ZeRO over the dp ranks, as in this file: the trained parameters keep an fp32 master copy
#     (4 B), an fp32 gradient (4 B) and AdamW's two fp32 moments (8 B). Stage 1 divides the
#     optimizer state by dp, stage 2 the gradients too, stage 3 the parameters too, plus one unit
#     (the largest of a layer, the embedding, a head) gathered whole while it runs. ZeRO-3 only
#     with pp == 1 (as in most frameworks), and with dp == 1 ZeRO shards nothing, so only stage 0
#     is listed there.
# - Frozen models (PPO's reference and reward model) are stored in bf16 (2 B per parameter; under --dtype bf16 ppo.py
# stores
# the reward model whole in bf16 and the reference's matmul weights, while the reference's embeddings and norms stay
# fp32,
# a small share of a large model, left out here), split by tp x pp like the trained ones, and by dp too under ZeRO-3.
# ILQL's target Q heads
#     stay fp32 (4 B: Polyak steps of 0.001 would vanish in bf16), counted as frozen.
#   - Not counted: the bf16 casts of the weights that autocast makes when a layer runs are
#     assumed to live no longer than that layer (torch.autocast's cast cache keeps them until
#     the autocast block exits, which would add 2 B per trained parameter of the rank); ZeRO's
#     transient communication buckets (~25 MB); pipeline send/receive buffers; the frozen
#     models' no-grad forward passes (one layer's activations at a time, less than training's).
#
# Activations of training, bytes on stage `stage` for micro-batches of b sequences of s tokens,
# h hidden, a heads, L layers (bf16 activations, activation checkpointing at every layer):
#   - checkpoints: the input of every layer of the stage is kept, 2 * s * b * h bytes each, not
#     divided by tp (no sequence parallelism); in 1F1B stage i holds up to pp - i micro-batches in
#     flight (the first stage pp, the last one), so (pp - stage) * (L / pp) * 2 * s * b * h;
#   - one layer's full working set while it is recomputed and back-propagated, Korthikanti et al.
#     2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2, tensor parallel
#     without sequence parallel): s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp)) bytes, which
#     is 34 * s * b * h + 5 * a * s^2 * b at tp 1. It assumes a 4h MLP and materialised attention
#     scores (the 5 a s^2 b term); with flash attention that term is gone, so this is an upper bound;
#   - on the last stage, the LM head's log-probs as kernels.fused_logprobs computes them: the
#     [tokens, vocab] logits never exist, one fp32 block of min(tokens, 1024) x min(16384,
#     vocab / tp) logits and its gradient (8 B per entry) plus an fp32 [tokens, h] gradient
#     accumulator (4 B * s * b * h);
#   - rm: a micro-batch of b pairs is 2b sequences (chosen and rejected in one forward), and its
#     score head has no vocabulary-sized output;
#   - ilql: the LM as for sft, plus the heads as ilql.py runs them (on the last stage, whole on
#     every tp rank): every one of the 1 + 2 * n_q heads (V, Q, target Q) keeps its fp32 [tokens,
#     2h] hidden layer, and each Q and target Q head its fp32 [tokens, vocab] output, the trained
#     Q heads' with a gradient of the same size: 4 * T * 2h * (1 + 2 n_q) + 4 * T * vocab * 3 n_q;
#   - ppo: the policy's, plus as much again for a separate critic (the same trunk; policy and
#     value losses are summed into one backward in ppo.py, so both sets are alive at once).
#   - sequence parallel (--sequence-parallel, with tp): the checkpoints are sequence shards, 2 * s
#     * b * h / tp each, and the working set is Korthikanti et al.'s eq. 4, s * b * h * (34 / tp +
#     5 * a * s / (h * tp)): what lay between the matmuls is divided by tp too;
#   - context parallel (--cp N, Ulysses): a rank holds s / N tokens of every layer (checkpoints and
#     the linear terms of the working set), and attends over all s tokens with a / N heads (the
#     s^2 term / N as well); on the last stage the whole sequence's final hidden state is gathered
#     for the head (2 * s * b * h more), whose log-prob blocks are those of the whole sequence.
#     Context-parallel ranks hold whole weights (ZeRO shards them over dp x cp) and generate like
#     data-parallel ranks, so the KV cache is not divided by N.
# PPO's rollout (generation, then the scoring passes of policy, critic, reference and reward
# model) is a separate phase. It holds the KV cache of `rollout_batch_size` sequences of seq_len
# (prompt + response) tokens, bf16, for the layers of the stage and the tp rank's KV heads,
# 2 (K and V) * 2 B * rollout_batch_size * s * (L / pp) * kv_heads * head_dim / tp; and under
# ZeRO-3, unless rollout_gather=False, the models gathered whole, as ppo.py does (`gathered()`
# once around the generation loop, which would otherwise gather every layer at every token, and
# around the scoring pass): the (dp - 1) / dp of the rank's trained (4 B) and frozen (2 B)
# parameters that it does not hold (generation and scoring are summed: conservative and simple).
# Under pipeline parallelism ppo.py generates with a whole-depth copy of the policy gathered from
# the stages, still split over tp, matmul weights in bf16 (pipeline_gathered_model(keep_tensor_parallel=True)),
# so the rollout holds that copy, 2 B * (the policy's parameters on a tp rank at pp 1), and the KV
# cache of all L layers rather than the stage's L / pp (the scoring passes run through the
# pipeline). Evaluation also gathers the reference for a moment; with its small batches it is not
# counted. Training activations are freed by then, so a layout's total takes the larger of the
# two phases.
#
# Which layout is best: among those that fit, the fewest pipeline stages (bubbles and stage
# imbalance), then the smallest tp (tensor-parallel all-reduces every layer), then the lowest ZeRO
# stage (least communication). This is a proxy for speed, not a measurement.
GB = 1e9
PLAN_MARGIN = 0.10  # fraction of --gpu-memory kept free for what is not counted
LOGITS_BLOCK = (1024, 16384)  # kernels.fused_logprobs' chunk_size x vocab_chunk_size
MAX_TP = 8  # tensor parallel stays within a node of 8 GPUs


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer. family sets the layer's parts:
    llama (SwiGLU MLP of 3 matrices, RMSNorm, grouped-query attention, no biases unless the
    config asks), gpt-neox (4h-style MLP of 2 matrices, LayerNorm, biases), gpt2 (as gpt-neox, plus
    learned position embeddings, tied unless the config says otherwise)."""

    name: str
    family: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    positions: int = 0  # learned position embeddings (GPT-2's n_positions)
    attention_bias: bool = False  # llama's attention_bias
    mlp_bias: bool = False  # llama's mlp_bias

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


BUILTIN_SHAPES = {
    shape.name: shape
    for shape in (
        ModelShape("llama-2-70b", "llama", 8192, 28672, 80, 64, 8, 32000, tied=False),
        ModelShape("gpt-neox-20b", "gpt-neox", 6144, 24576, 44, 64, 64, 50432, tied=False),
        ModelShape("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128256, tied=False),
    )
}


def shape_from_config(config: dict, name: str = "config") -> ModelShape:
    """A ModelShape from the fields of a Hugging Face config.json: GPT-2 (n_embd, n_layer, n_head,
    n_inner or 4 * n_embd, n_positions; tied), GPT-NeoX (model_type gpt_neox) and Llama-style
    configs (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads defaulting to the head count, vocab_size, tie_word_embeddings)."""

    def field(key, default=None):
        value = config.get(key, default)
        if value is None:
            raise SystemExit(f"error: {name}: config.json has no {key!r}")
        return value

    model_type = config.get("model_type", "")
    if model_type == "gpt2" or "n_embd" in config:
        hidden = field("n_embd")
        return ModelShape(
            name,
            "gpt2",
            hidden,
            config.get("n_inner") or 4 * hidden,
            field("n_layer"),
            field("n_head"),
            field("n_head"),
            field("vocab_size"),
            tied=config.get("tie_word_embeddings", True),
            positions=field("n_positions", config.get("n_ctx")),
        )
    heads = field("num_attention_heads")
    family = "gpt-neox" if model_type == "gpt_neox" else "llama"
    return ModelShape(
        name,
        family,
        field("hidden_size"),
        field("intermediate_size"),
        field("num_hidden_layers"),
        heads,
        config.get("num_key_value_heads") or heads,
        field("vocab_size"),
        tied=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim") or 0,
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
    )


def load_shape(model: str) -> ModelShape:
    """A built-in shape by name, or the config.json at a path (the file, or a directory holding it)."""

    if model in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[model]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: --model {model!r} is neither a built-in shape ({', '.join(BUILTIN_SHAPES)}) nor a config.json or "
            "a directory holding one"
        )
    try:
        with open(path) as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: not a readable JSON config ({error})")
    if not isinstance(config, dict):
        raise SystemExit(f"error: {path}: not a JSON object")
    return shape_from_config(config, model)


def layer_parameters(shape: ModelShape) -> tuple:
    """(matrix parameters, which tensor parallel splits; norm weights and biases, counted whole on
    every tp rank) of one decoder layer."""
    h, f, kv = shape.hidden, shape.ffn, shape.kv_heads * shape.dim
    q = shape.heads * shape.dim
    if shape.family == "llama":  # q, k, v, o; gate, up, down; two RMSNorm weights
        matrices = h * q + 2 * h * kv + q * h + 3 * h * f
        vectors = 2 * h + (q + 2 * kv + h) * shape.attention_bias + (2 * f + h) * shape.mlp_bias
        return matrices, vectors
    # gpt-neox and gpt2: fused qkv and dense with biases, fc_in and fc_out with biases, 2 LayerNorms
    return 4 * h * h + 2 * h * f, (3 * h + h) + (f + h) + 2 * 2 * h


def largest_tensor(shape: ModelShape) -> int:
    """Parameters of the model's largest tensor, dense: the embedding (or head), an MLP matrix, or a
    fused query-key-value matrix."""
    return max(
        shape.vocab * shape.hidden,
        shape.hidden * shape.ffn,
        shape.hidden * (shape.heads + 2 * shape.kv_heads) * shape.dim,
    )


def final_norm_parameters(shape: ModelShape) -> int:
    return shape.hidden if shape.family == "llama" else 2 * shape.hidden


def head_parameters(shape: ModelShape, head: str, tp: int = 1) -> int:
    """On one tp rank: the LM head (vocab-parallel; 0 if tied, the embedding serving), the reward
    model's score head (hidden -> 1, no bias) or PPO's value head (hidden -> 1 with a bias)."""
    if head == "lm":
        return 0 if shape.tied else math.ceil(shape.vocab / tp) * shape.hidden
    return {"score": shape.hidden, "value": shape.hidden + 1}[head]


def count_parameters(shape: ModelShape, head: str = "lm") -> int:
    """Every parameter of the model: embeddings, layers, final norm and the given head."""
    matrices, vectors = layer_parameters(shape)
    embeddings = (shape.vocab + shape.positions) * shape.hidden
    return (
        embeddings + shape.layers * (matrices + vectors) + final_norm_parameters(shape) + head_parameters(shape, head)
    )


def stage_units(shape: ModelShape, tp: int = 1, pp: int = 1, stage: int = 0, head: str = "lm") -> list:
    """The parameters one rank (tp rank, pipeline stage) holds of a model, as ZeRO-3's units: one
    entry per layer, then the embeddings on the first stage, then the final norm and head on the
    last. sum() of it is the rank's parameter count."""
    matrices, vectors = layer_parameters(shape)
    units = [math.ceil(matrices / tp) + vectors] * (shape.layers // pp)
    if stage == 0:
        units.append(math.ceil(shape.vocab / tp) * shape.hidden + shape.positions * shape.hidden)
    if stage == pp - 1:
        lm_head = head_parameters(shape, head, tp)
        if head == "lm" and shape.tied and pp > 1:
            lm_head = math.ceil(shape.vocab / tp) * shape.hidden  # the last stage's copy of the tied embedding
        units.append(final_norm_parameters(shape) + lm_head)
    return units


def ilql_head_parameters(shape: ModelShape, n_q: int = 2) -> tuple:
    """(trained, target) parameters of ilql.py's heads: V is hidden -> 2 hidden -> 1, each of the
    n_q Q heads hidden -> 2 hidden -> vocab (biases included), and the target Q heads copy them."""
    h, v = shape.hidden, shape.vocab
    v_head = (h * 2 * h + 2 * h) + (2 * h + 1)
    q_head = (h * 2 * h + 2 * h) + (2 * h * v + v)
    return v_head + n_q * q_head, n_q * q_head


def activation_bytes(
    shape: ModelShape,
    tp: int,
    pp: int,
    stage: int,
    seq_len: int,
    sequences: int,
    logits: bool = True,
    cp: int = 1,
    sequence_parallel: bool = False,
) -> float:
    """Training activations of one model on one rank (see the section's comment): the checkpointed
    layer inputs of the micro-batches in flight, one layer's working set, and on the last stage the
    fused log-probs' logits block and gradient accumulator (when the model has an LM head); the
    layers' share divided along the sequence under cp and sequence parallel."""
    s, b, h, a = seq_len, sequences, shape.hidden, shape.heads
    between_matmuls = 34 / tp if sequence_parallel else 10 + 24 / tp
    checkpoints = (pp - stage) * (shape.layers // pp) * 2 * s * b * h / (tp if sequence_parallel else 1)
    working_set = s * b * h * (between_matmuls + 5 * a * s / (h * tp))
    head = 0
    if stage == pp - 1:
        tokens = s * b
        head = 2 * tokens * h if cp > 1 else 0  # the final hidden state gathered whole
        if logits:
            head += 8 * min(tokens, LOGITS_BLOCK[0]) * min(LOGITS_BLOCK[1], math.ceil(shape.vocab / tp))
            head += 4 * tokens * h
    return (checkpoints + working_set) / cp + head


def kv_cache_bytes(shape: ModelShape, tp: int, pp: int, sequences: int, seq_len: int) -> float:
    """bf16 keys and values of `sequences` sequences of seq_len tokens, for the stage's layers and
    the tp rank's share of the KV heads."""
    return 2 * 2 * sequences * seq_len * (shape.layers // pp) * shape.kv_heads * shape.dim / tp


@dataclass
class Memory:
    """Bytes on one GPU of a layout, for its worst pipeline stage."""

    dp: int
    tp: int
    pp: int
    zero: int
    stage: int = 0
    params: float = 0.0  # trained parameters' fp32 master copy (and under ZeRO-3 one gathered unit)
    grads: float = 0.0  # fp32 gradients
    optimizer: float = 0.0  # AdamW's two fp32 moments
    frozen: float = 0.0  # frozen models, bf16 (ILQL's target heads fp32)
    activations: float = 0.0  # training activations
    kv_cache: float = 0.0  # PPO rollout's KV cache (a separate phase from training)
    gathered: float = 0.0  # PPO rollout under ZeRO-3: the rest of the models, gathered whole
    cp: int = 1  # context-parallel ranks per model copy
    # Saving a checkpoint or exporting (between steps, so in place of the activations): parallel.dense_tensors
    # streams one tensor at a time to rank 0's CPU, beside the one ZeRO-3 unit gathered (counted in params). A
    # tensor-parallel tensor is all-gathered (its parts and the assembled copy: twice the dense tensor), and under
    # pp a rank receives each broadcast tensor (once more): see largest_tensor.
    saving: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.frozen
            + max(self.activations, self.kv_cache + self.gathered, self.saving)
        )


def stage_memory(
    algorithm: str,
    policy: ModelShape,
    dp: int,
    tp: int,
    pp: int,
    zero: int,
    stage: int,
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    rollout_batch_size: int = 64,
    value: str = "head",
    reward: Optional[ModelShape] = None,
    n_q: int = 2,
    rollout_gather: bool = True,
    cp: int = 1,
    sequence_parallel: bool = False,
) -> Memory:
    """Bytes on a rank of pipeline stage `stage` for algorithm sft, rm, ilql or ppo.

    sft, rm: one trained model (rm with the score head instead of the LM head). ilql: the LM and
    its V and Q heads trained, the target Q heads frozen in fp32. ppo: the policy trained, with a
    value model that is either a separate critic of the policy's shape (trunk + value head,
    value="critic") or a value head on the policy (value="head"); a frozen bf16 reference of the
    policy's shape and a frozen bf16 reward model of shape `reward` (default: the policy's).
    rollout_gather: under ZeRO-3, PPO's rollout gathers the models whole, and under pipeline
    parallelism a bf16 whole-depth copy of the policy split over tp, as ppo.py does; False counts a
    rollout that gathers nothing beyond the shards (a layer at a time, or through the stages). cp,
    sequence_parallel: the sequence splits (dp counts model copies; ZeRO shards over dp x cp)."""
    if algorithm not in ("sft", "rm", "ilql", "ppo"):
        raise SystemExit(f"error: unknown algorithm {algorithm!r}; use sft, rm, ilql or ppo")
    last = stage == pp - 1
    trained = stage_units(policy, tp, pp, stage, "score" if algorithm == "rm" else "lm")
    frozen_bytes = 0.0
    sequences = 2 * micro_batch_size if algorithm == "rm" else micro_batch_size
    split = dict(cp=cp, sequence_parallel=sequence_parallel and tp > 1)
    activations = activation_bytes(policy, tp, pp, stage, seq_len, sequences, logits=algorithm != "rm", **split)
    kv_cache = 0.0
    if algorithm == "ilql" and last:
        heads, targets = ilql_head_parameters(policy, n_q)
        q_head = targets // n_q
        # ilql.py keeps its heads whole on every tensor-parallel rank (they take the whole hidden
        # states), so nothing here is divided by tp.
        trained = trained + [heads - n_q * q_head] + [q_head] * n_q
        frozen_bytes += 4 * targets
        tokens, h = seq_len * micro_batch_size, policy.hidden
        activations += 4 * tokens * 2 * h * (1 + 2 * n_q) + 4 * tokens * policy.vocab * 3 * n_q
    elif algorithm == "ppo":
        if value == "critic":
            trained = trained + stage_units(policy, tp, pp, stage, "value")
            activations += activation_bytes(policy, tp, pp, stage, seq_len, micro_batch_size, logits=False, **split)
        elif last:
            trained = trained + [head_parameters(policy, "value")]
        frozen = sum(stage_units(policy, tp, pp, stage, "lm")) + sum(
            stage_units(reward or policy, tp, pp, stage, "score")
        )
        frozen_bytes += 2 * frozen
        kv_cache = kv_cache_bytes(policy, tp, 1 if rollout_gather else pp, rollout_batch_size, seq_len)
    n = sum(trained)
    gathered, shards = 0.0, dp * cp  # ZeRO shards over every rank that holds the same weights
    if algorithm == "ppo" and rollout_gather and zero >= 3:
        gathered = (4 * n + frozen_bytes) * (shards - 1) / shards
    elif algorithm == "ppo" and rollout_gather and pp > 1:
        gathered = 2 * sum(stage_units(policy, tp, 1, 0, "lm"))
    return Memory(
        dp,
        tp,
        pp,
        zero,
        stage,
        params=4 * n / (shards if zero >= 3 else 1) + (4 * max(trained) if zero >= 3 else 0),
        grads=4 * n / (shards if zero >= 2 else 1),
        optimizer=8 * n / (shards if zero >= 1 else 1),
        frozen=frozen_bytes / (shards if zero >= 3 else 1),
        activations=activations,
        kv_cache=kv_cache,
        gathered=gathered,
        cp=cp,
        saving=4 * largest_tensor(policy) * ((2 if tp > 1 else 0) + (1 if pp > 1 else 0)),
    )


def layout_memory(algorithm: str, policy: ModelShape, dp: int, tp: int, pp: int, zero: int, **options) -> Memory:
    """stage_memory of the stage with the largest total: the one that decides whether it fits."""
    return max(
        (stage_memory(algorithm, policy, dp, tp, pp, zero, stage, **options) for stage in range(pp)),
        key=lambda m: m.total,
    )


def layouts(gpus: int, shapes: list, max_tp: int = MAX_TP, cp: int = 1) -> list:
    """Every (dp, tp, pp, zero) with dp * tp * pp * cp == gpus, tp <= max_tp and tp * cp dividing
    the attention and KV heads of every model, pp dividing their layer counts (and 1 under cp,
    which does not compose with it), zero 3 only with pp == 1, and only zero 0 when dp * cp == 1
    (nothing to shard)."""
    found = []
    if gpus % cp:
        return found
    for tp in range(1, min(gpus // cp, max_tp) + 1):
        if (gpus // cp) % tp or any(shape.heads % (tp * cp) or shape.kv_heads % (tp * cp) for shape in shapes):
            continue
        for pp in range(1, gpus // (tp * cp) + 1) if cp == 1 else [1]:
            if (gpus // (tp * cp)) % pp or any(shape.layers % pp for shape in shapes):
                continue
            dp = gpus // (tp * pp * cp)
            for zero in range(4) if dp * cp > 1 else [0]:
                if zero == 3 and pp > 1:
                    continue
                found.append((dp, tp, pp, zero))
    return found


def plan(
    algorithm: str, policy: ModelShape, gpus: int, reward: Optional[ModelShape] = None, max_tp: int = MAX_TP, **options
) -> list:
    """layout_memory of every layout of `gpus` GPUs, smallest total first. options go to
    stage_memory (seq_len, micro_batch_size, rollout_batch_size, value, n_q, rollout_gather, cp,
    sequence_parallel)."""
    shapes = [policy] + ([reward] if algorithm == "ppo" and reward is not None else [])
    rows = [
        layout_memory(algorithm, policy, dp, tp, pp, zero, reward=reward, **options)
        for dp, tp, pp, zero in layouts(gpus, shapes, max_tp, options.get("cp", 1))
    ]
    return sorted(rows, key=lambda m: (m.total, m.pp, m.tp, m.zero))


def best_layout(rows: list, gpu_memory_gb: float, margin: float = PLAN_MARGIN) -> Optional[Memory]:
    """Among the layouts whose total fits in (1 - margin) * gpu_memory_gb: the fewest pipeline
    stages, then the smallest tp, then the lowest ZeRO stage (then the smallest total). None if
    none fits."""
    usable = (1 - margin) * gpu_memory_gb * GB
    fitting = [m for m in rows if m.total <= usable]
    return min(fitting, key=lambda m: (m.pp, m.tp, m.zero, m.total), default=None)


def format_plan(rows: list, gpu_memory_gb: float, margin: float = PLAN_MARGIN) -> str:
    """The table: one line per layout, GB per GPU (worst stage), and whether it fits."""
    usable = (1 - margin) * gpu_memory_gb * GB
    columns = ("params", "grads", "optim", "frozen", "activ", "kv", "gather", "save", "total")
    lines = [
        f"{'dp':>4} {'tp':>3} {'pp':>3} {'zero':>4} {'cp':>3} {'stage':>5} "
        + " ".join(f"{c:>7}" for c in columns)
        + "  fits"
    ]
    for m in rows:
        values = (m.params, m.grads, m.optimizer, m.frozen, m.activations, m.kv_cache, m.gathered, m.saving, m.total)
        lines.append(
            f"{m.dp:>4} {m.tp:>3} {m.pp:>3} {m.zero:>4} {m.cp:>3} {m.stage:>5} "
            + " ".join(f"{v / GB:>7.1f}" for v in values)
            + f"  {'yes' if m.total <= usable else 'no'}"
        )
    return "\n".join(lines)


GATHERS = "gathers models (ZeRO-3: whole; pp: a whole-depth copy of the policy split over tp, matmul weights bf16)"


def main(argv: Optional[list] = None):
    """The table and the best layout for each --gpus count."""
    p = argparse.ArgumentParser(
        description="Per-GPU memory of every dp x tp x pp x ZeRO layout of a training job, on paper "
        "(the assumptions are in the comment above ModelShape in benchmarks/plan.py)."
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"a built-in shape ({', '.join(BUILTIN_SHAPES)}) or a config.json (or a directory holding one)",
    )
    p.add_argument("--gpus", type=int, nargs="+", required=True, help="GPU count(s) to plan for")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB (10^9 bytes) per GPU")
    p.add_argument(
        "--margin", type=float, default=PLAN_MARGIN, help="fraction of --gpu-memory kept free for what is not counted"
    )
    p.add_argument(
        "--algorithm", choices=["sft", "rm", "ilql", "ppo"], default="sft", help="what is trained (see stage_memory)"
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (prompt + response)")
    p.add_argument(
        "--micro-batch-size", type=int, default=1, help="sequences per forward/backward on one rank (rm: pairs)"
    )
    p.add_argument(
        "--rollout-batch-size",
        type=int,
        default=64,
        help="ppo: sequences generated at once by one model replica (KV cache)",
    )
    p.add_argument(
        "--value",
        choices=["critic", "head"],
        default="head",
        help="ppo: a value head on the policy (ppo.py's default, and all it supports with --tp/--pp), "
        "or a separate critic of the policy's shape",
    )
    p.add_argument(
        "--rollout-gather",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ppo: the rollout gathers whole models under ZeRO-3 and a whole-depth copy under pp, as ppo.py does "
        "(--no-rollout-gather: nothing beyond the shards)",
    )
    p.add_argument(
        "--reward-model",
        default=None,
        help="ppo: the reward model's shape (built-in name or config.json); default: the policy's",
    )
    p.add_argument("--max-tp", type=int, default=MAX_TP, help="largest tensor-parallel size (GPUs of a node)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks per model copy (the scripts' --cp)")
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split the activations between tensor-parallel matmuls along the sequence (for layouts with tp > 1)",
    )
    args = p.parse_args(argv)
    for flag in ("gpus", "gpu_memory", "seq_len", "micro_batch_size", "rollout_batch_size", "max_tp", "cp"):
        values = getattr(args, flag)
        if any(v <= 0 for v in (values if isinstance(values, list) else [values])):
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive")
    if not 0 <= args.margin < 1:
        raise SystemExit("error: --margin must be in [0, 1)")
    policy = load_shape(args.model)
    reward = load_shape(args.reward_model) if args.reward_model else None
    options = dict(
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        rollout_batch_size=args.rollout_batch_size,
        value=args.value,
        rollout_gather=args.rollout_gather,
        cp=args.cp,
        sequence_parallel=args.sequence_parallel,
    )
    usable = (1 - args.margin) * args.gpu_memory
    print(
        f"{args.algorithm} on {policy.name} ({count_parameters(policy) / 1e9:.2f}B parameters), seq_len "
        f"{args.seq_len}, "
        f"micro-batch {args.micro_batch_size}"
        + (f", --cp {args.cp}" if args.cp > 1 else "")
        + (", sequence parallel" if args.sequence_parallel else "")
        + (
            f", rollouts {args.rollout_batch_size}, value {args.value}, reward model "
            f"{(reward or policy).name}, rollout "
            + (GATHERS if args.rollout_gather else "gathers nothing beyond the shards")
            if args.algorithm == "ppo"
            else ""
        )
        + f"; GB per GPU, worst pipeline stage; fits: total <= {usable:g} GB "
        f"({args.gpu_memory:g} GB less {args.margin:.0%})"
    )
    for gpus in args.gpus:
        rows = plan(args.algorithm, policy, gpus, reward=reward, max_tp=args.max_tp, **options)
        best = best_layout(rows, args.gpu_memory, args.margin)
        print(f"\n{gpus} GPUs:")
        print(format_plan(rows, args.gpu_memory, args.margin))
        if best is None:
            smallest = f", smallest total {rows[0].total / GB:.1f} GB" if rows else ""
            print(f"best on {gpus} GPUs: none fits in {usable:g} GB{smallest}")
        else:
            print(
                f"best on {gpus} GPUs: dp {best.dp} tp {best.tp} pp {best.pp} zero {best.zero}"
                + (f" cp {best.cp}" if best.cp > 1 else "")
                + f", {best.total / GB:.1f} "
                f"GB of {usable:g} GB "
                f"(rule: fewest pipeline stages, then smallest tp, then lowest ZeRO stage)"
            )


if __name__ == "__main__":
    main()
