"""
Numeric routines shared by every algorithm script: log-probs that hold at most a chunk of the
vocabulary's logits, generalized advantage estimation, statistics over real (unmasked) tokens, and
linear layers in the orientation a CPU's BLAS runs faster.

RLHF spends most of its memory on one tensor, the [batch, seq, vocab] logits from which every
log-prob, KL and entropy is computed. `fused_logprobs` goes straight from the last hidden states
and the LM head to per-token log-probs (and entropies), one chunk of logits at a time, so that
tensor never exists beyond one chunk. Everything here runs on CPU and CUDA, takes fp32 or bf16
inputs, accumulates in at least fp32, and is tested exactly against naive references
(tests/test_kernels.py).

The chunk bodies are compiled with torch.compile(dynamic=True): on CUDA at once, on a CPU once that
pays (see _maybe_compile). Set KERNELS_COMPILE=0, or pass compile=False, to run them eagerly (same math,
numbers equal up to floating-point summation order); KERNELS_COMPILE=1 or compile=True compiles at once.
"""

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value Hugging Face uses for "no target here"


# -----------------------------------------------------------------------------
# compilation switch

_compiled = {}
COMPILE_SECONDS = 10.0  # about one chunk body's cold compile on a CPU (benchmarks/kernels.py: 15.5 s for two)


def _maybe_compile(fn, compile):
    """Return fn, compiled once per process: at once with compile=True or KERNELS_COMPILE=1, never with
    compile=False or KERNELS_COMPILE=0. By default on CUDA at once, and on a CPU once it pays: there the
    eager body takes about 1.5x the compiled one's time (benchmarks/kernels.py), so it runs eagerly
    until a third of its eager time adds up to COMPILE_SECONDS (ski rental: a run of a few updates,
    trying flags, never waits for a compile; a long one spends at most one compile's time more)."""
    if compile is None:
        compile = {"0": False, "1": True}.get(os.environ.get("KERNELS_COMPILE"), "auto")
    if not compile:
        return fn
    if (fn, compile) not in _compiled:
        # dynamic=True: the last chunk of every call is shorter, and a new batch shape must not
        # trigger a fresh compile.
        import torch.fx.experimental._config as fx_config

        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        surplus = [0.0 if compile == "auto" else COMPILE_SECONDS]  # what eager calls cost beyond compiled ones

        def call(*args):
            if surplus[0] < COMPILE_SECONDS and args[0].device.type == "cpu":
                start = time.perf_counter()
                result = fn(*args)
                surplus[0] += (time.perf_counter() - start) / 3
                return result
            # Without duck shaping: by default, sizes (and view offsets) that happen to be equal
            # when compiling, say 1024 tokens per chunk and a chunk starting at token 1024, are
            # assumed always equal, and every call that breaks the coincidence recompiles.
            with fx_config.patch(use_duck_shape=False):
                return compiled(*args)

        _compiled[(fn, compile)] = call
    return _compiled[(fn, compile)]


# -----------------------------------------------------------------------------
# linear layers on a CPU
#
# For y = x W^T, F.linear asks oneMKL's sgemm for y in rows; (W x^T)^T asks for the same dot products
# with the operands' roles swapped. On the two AMD EPYCs measured, oneMKL runs that 1.2x to 2.5x as fast
# on a decode step's 16 rows, and a micro-batch's forward and backward about as fast:
# `python benchmarks/kernels.py --only linear` prints the ratios on your CPU. One row, bf16 (another
# kernel), autocast and other devices keep F.linear.


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), for several fp32 rows on a CPU as (W x^T)^T copied back to rows."""
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) < 2 or not x.is_cpu or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    y = (weight @ rows.T).T.contiguous().view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(torch.nn.Linear):
    """nn.Linear computed by linear(); use_linear turns a model's nn.Linear layers into these."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def use_linear(model: torch.nn.Module) -> torch.nn.Module:
    """The model with each nn.Linear computed by linear(): only the class changes, so weights, names,
    state dicts and save_pretrained see the same model."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Linear
    return model


# -----------------------------------------------------------------------------
# the chunk body: softmax statistics of one block of logits, and its gradient
#
# A block is `n` tokens by `v` vocabulary entries. Each token's softmax over the full vocabulary
# is assembled from per-block partial statistics (an online logsumexp, as in flash attention):
#   m = max_j z_j,  s = sum_j exp(z_j - m),  a = sum_j exp(z_j - m) (z_j - m),  t = z_label
# from which  logsumexp = m + log s,  log p_label = t - logsumexp,  entropy = log s - a / s.
# Partials from different blocks (or, under tensor parallelism, different ranks) combine exactly
# after rebasing them to a common maximum, see _rebase.


def _block_logits(x, weight, bias, temperature):
    """Logits of one block in the accumulation dtype, divided by the sampling temperature.

    x is a block of hidden states [n, H] when weight [v, H] is given, else already logits [n, v].
    The product runs in the input dtype, exactly like the model's own lm_head, and is upcast
    afterwards, as generation upcasts before dividing by the temperature: so the log-probs here
    are those of the tokens that were actually sampled.
    """
    z = x if weight is None else linear(x, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z / temperature if temperature != 1.0 else z


def _chunk_stats(x, weight, bias, target, temperature, with_entropy):
    """Partial softmax statistics (m, s, a, t) of one block, each [n]; a is None without entropy.

    target [n] is each token's label position inside this block; positions outside [0, v) mean
    "the label lives in another block" and contribute t = 0.
    """
    z = _block_logits(x, weight, bias, temperature)
    m = z.amax(dim=-1)
    shifted = z - m[:, None]
    e = shifted.exp()
    s = e.sum(dim=-1)
    a = None
    if with_entropy:
        # where(): a logit of -inf (a filtered token) has e = 0 and must add 0, not 0 * -inf.
        a = torch.where(e > 0, e * shifted, 0.0).sum(dim=-1)
    inside = (target >= 0) & (target < z.shape[-1])
    t = z.gather(1, target.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(1)
    t = torch.where(inside, t, 0.0)
    return m, s, a, t


def _chunk_grad(x, weight, bias, target, temperature, lse, grad_logprob, grad_entropy, entropy):
    """Gradient of the loss w.r.t. one block of raw logits (before the division by temperature),
    [n, v] in fp32 (fp64 for fp64 inputs).

    With z = logits / temperature and p = softmax(z):
      d log p_label / dz = onehot(label) - p
      d entropy / dz     = -p * (log p + entropy)
    grad_entropy and entropy are None when the entropy does not receive a gradient.
    """
    z = _block_logits(x, weight, bias, temperature)
    logp = z - lse[:, None]
    p = logp.exp()
    coef = grad_logprob[:, None]
    if grad_entropy is not None:
        # where(): p = 0 at a logit of -inf, whose log p is -inf; its gradient is 0.
        coef = coef + grad_entropy[:, None] * torch.where(p > 0, logp + entropy[:, None], 0.0)
    # onehot(label) by a scatter into the label's column, where the label is in this block
    inside = (target >= 0) & (target < z.shape[-1])
    label_column, label_grad = target.clamp(0, z.shape[-1] - 1)[:, None], torch.where(inside, grad_logprob, 0.0)
    grad_z = (p * -coef).scatter_add_(1, label_column, label_grad[:, None])
    return grad_z / temperature if temperature != 1.0 else grad_z


def _rebase(m, s, a, new_m):
    """Re-express partials taken relative to max m relative to a larger max new_m."""
    scale = torch.exp(m - new_m)
    # a = sum e^(z-m) (z-m)  ->  sum e^(z-new_m) (z-new_m) = scale * (a + (m - new_m) * s)
    a = scale * (a + (m - new_m) * s) if a is not None else None
    return s * scale, a


def _merge(stats, other):
    """Combine the partial statistics of two disjoint vocabulary blocks of the same tokens."""
    if stats is None:
        return other
    (m1, s1, a1, t1), (m2, s2, a2, t2) = stats, other
    m = torch.maximum(m1, m2)
    s1, a1 = _rebase(m1, s1, a1, m)
    s2, a2 = _rebase(m2, s2, a2, m)
    return m, s1 + s2, (a1 + a2) if a1 is not None else None, t1 + t2


def _all_reduce_stats(stats, group):
    """Combine partial statistics over the vocabulary shards held by the ranks of `group`."""
    m, s, a, t = stats
    new_m = m.clone()
    dist.all_reduce(new_m, op=dist.ReduceOp.MAX, group=group)
    s, a = _rebase(m, s, a, new_m)
    # The label lives on exactly one rank; the others contributed t = 0.
    for x in (s, a, t) if a is not None else (s, t):
        dist.all_reduce(x, group=group)
    return new_m, s, a, t


def _cat_stats(blocks):
    """The statistics of consecutive token blocks as those of all their tokens."""
    return tuple(torch.cat(parts) if parts[0] is not None else None for parts in zip(*blocks))


def _finish(stats, ignored):
    """Turn full-vocabulary statistics into (logsumexp, logprob, entropy-or-None), each [n]."""
    m, s, a, t = stats
    log_s = s.log()
    lse = m + log_s
    logprob = torch.where(ignored, 0.0, t - lse)
    entropy = torch.where(ignored, 0.0, log_s - a / s) if a is not None else None
    return lse, logprob, entropy


def _add_product(out, a, b):
    """out += a @ b, summed in out's dtype (fp32) even when a and b are bf16."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)  # in place: no [rows, cols] temporary
    else:
        out += a @ b


def _targets(labels, ignore_index, vocab_start):
    """Flattened label positions relative to this rank's vocabulary shard, and the ignore mask."""
    labels = labels.reshape(-1)
    ignored = labels == ignore_index
    # -1 is below every block start, so an ignored token never matches a vocabulary entry.
    target = torch.where(ignored, -1, labels - vocab_start)
    return target, ignored


def _incoming_grads(grad_logprob, grad_entropy, ignored, n, dtype):
    """Flatten the output gradients, in the accumulation dtype, zeroed at ignored tokens."""
    if grad_logprob is None:
        grad_logprob = torch.zeros(n, dtype=dtype, device=ignored.device)
    grad_logprob = torch.where(ignored, 0.0, grad_logprob.reshape(-1).to(dtype))
    if grad_entropy is not None:
        grad_entropy = torch.where(ignored, 0.0, grad_entropy.reshape(-1).to(dtype))
    return grad_logprob, grad_entropy


# -----------------------------------------------------------------------------
# autocast: the backward recomputes what the forward computed, so it must run under the same
# autocast state. The scripts call .backward() after leaving their autocast block; a backward
# that recomputed the logits in fp32 against a logsumexp of bf16 logits would be off by several
# percent on sharp logits. torch.amp.custom_fwd/custom_bwd do this for one device type fixed at
# decoration; these two helpers take it from the input, so one function serves CPU and CUDA.


def _autocast_state(x):
    device_type = x.device.type
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_as_in_forward(state):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


# -----------------------------------------------------------------------------
# log-probs when the full logits already exist


class _LogprobsFromLogits(torch.autograd.Function):
    # Saves the logits (which exist anyway) and the per-token logsumexp instead of a log_softmax
    # copy; backward writes the gradient one row block at a time.

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy, chunk_size, compile):
        ctx.set_materialize_grads(False)  # an output outside the loss (often the entropy) costs the backward nothing
        vocab = logits.shape[-1]
        x = logits.detach().reshape(-1, vocab)
        target, ignored = _targets(labels, ignore_index, 0)
        stats_fn = _maybe_compile(_chunk_stats, compile)
        blocks = [
            stats_fn(x[r : r + chunk_size], None, None, target[r : r + chunk_size], temperature, with_entropy)
            for r in range(0, x.shape[0], chunk_size)
        ]
        lse, logprob, entropy = _finish(_cat_stats(blocks), ignored)
        ctx.save_for_backward(logits, target, ignored, lse, entropy)
        ctx.options = (temperature, chunk_size, compile)
        ctx.autocast = _autocast_state(logits)
        logprob = logprob.view(labels.shape)
        return (logprob, entropy.view(labels.shape)) if with_entropy else logprob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy=None):
        logits, target, ignored, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, compile = ctx.options
        x = logits.reshape(-1, logits.shape[-1])
        grad_logprob, grad_entropy = _incoming_grads(grad_logprob, grad_entropy, ignored, x.shape[0], lse.dtype)
        grad_fn = _maybe_compile(_chunk_grad, compile)
        grad_x = torch.empty_like(x)
        with _autocast_as_in_forward(ctx.autocast):
            for r in range(0, x.shape[0], chunk_size):
                rows = slice(r, r + chunk_size)
                grad_x[rows] = grad_fn(
                    x[rows],
                    None,
                    None,
                    target[rows],
                    temperature,
                    lse[rows],
                    grad_logprob[rows],
                    grad_entropy[rows] if grad_entropy is not None else None,
                    entropy[rows] if grad_entropy is not None else None,
                )
        return grad_x.view(logits.shape), None, None, None, None, None, None


def logprobs_from_logits(
    logits, labels, temperature=1.0, ignore_index=IGNORE_INDEX, return_entropy=False, chunk_size=256, compile=None
):
    """Log-probability of each label under softmax(logits / temperature).

    logits: [..., V] (fp32 or bf16); labels: [...] int64. Returns logprobs [...] in fp32 (fp64 for
    fp64 logits), and with return_entropy=True also the per-token entropy [...]. Tokens whose label
    is ignore_index get logprob 0, entropy 0 and no gradient. Works `chunk_size` rows at a time,
    so no full fp32 copy of the logits is ever built, neither in forward nor in backward.
    """
    return _LogprobsFromLogits.apply(
        logits, labels, float(temperature), ignore_index, return_entropy, chunk_size, compile
    )


# -----------------------------------------------------------------------------
# log-probs straight from the hidden states and the LM head


def _block_inputs(h, weight, bias, logits, rows, cols):
    """(x, weight, bias) of a block for _chunk_stats and _chunk_grad: its rows of the kept logits, or its rows of
    the hidden states and its columns of the head."""
    if logits is not None:
        return logits[rows], None, None
    return h[rows], weight[cols], bias[cols] if bias is not None else None


class _FusedLogprobs(torch.autograd.Function):
    # Forward walks the vocabulary in blocks of vocab_chunk_size (outer loop) and the tokens in
    # blocks of chunk_size (inner loop), merging partial statistics per token; it keeps only the
    # per-token logsumexp (and entropy). Backward recomputes each block's softmax. The vocabulary
    # is the outer loop so that, with bf16 weights, only one vocabulary block of the weight
    # gradient needs an fp32 accumulator at a time.

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        bias,
        temperature,
        ignore_index,
        with_entropy,
        chunk_size,
        vocab_chunk_size,
        group,
        compile,
    ):
        ctx.set_materialize_grads(False)  # an output outside the loss (often the entropy) costs the backward nothing
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        w = weight.detach()
        b = bias.detach() if bias is not None else None
        # Under tensor parallelism each rank holds an equal, contiguous slice of the vocabulary.
        vocab_start = 0 if group is None else dist.get_rank(group) * w.shape[0]
        target, ignored = _targets(labels, ignore_index, vocab_start)
        stats_fn = _maybe_compile(_chunk_stats, compile)

        n, vocab = h.shape[0], w.shape[0]
        # Few tokens: logits no larger than one block are computed once, kept, and read a block's worth of rows
        # at a time.
        logits = linear(h, w, b) if group is None and n * vocab <= chunk_size * vocab_chunk_size else None
        if logits is not None:
            chunk_size, vocab_chunk_size = max(1, min(n, chunk_size) * min(vocab, vocab_chunk_size) // vocab), vocab
        stats = None
        for v in range(0, vocab, vocab_chunk_size):
            cols = slice(v, v + vocab_chunk_size)
            block = [
                stats_fn(
                    *_block_inputs(h, w, b, logits, slice(r, r + chunk_size), cols),
                    target[r : r + chunk_size] - v,
                    temperature,
                    with_entropy,
                )
                for r in range(0, n, chunk_size)
            ]
            stats = _merge(stats, _cat_stats(block))
        if group is not None:
            stats = _all_reduce_stats(stats, group)
        lse, logprob, entropy = _finish(stats, ignored)

        ctx.save_for_backward(hidden, weight, bias, target, ignored, lse, entropy, logits)
        ctx.options = (temperature, chunk_size, vocab_chunk_size, group, compile)
        ctx.autocast = _autocast_state(hidden)
        logprob = logprob.view(labels.shape)
        return (logprob, entropy.view(labels.shape)) if with_entropy else logprob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy=None):
        with _autocast_as_in_forward(ctx.autocast):
            return _FusedLogprobs._backward(ctx, grad_logprob, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, target, ignored, lse, entropy, logits = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size, group, compile = ctx.options
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        h = hidden.reshape(-1, hidden.shape[-1])
        acc = lse.dtype  # fp32, or fp64 for fp64 inputs
        grad_logprob, grad_entropy = _incoming_grads(grad_logprob, grad_entropy, ignored, h.shape[0], acc)
        grad_fn = _maybe_compile(_chunk_grad, compile)

        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_hidden else None
        grad_w = torch.empty_like(weight) if need_weight else None
        grad_b = torch.empty(weight.shape[0], dtype=acc, device=h.device) if need_bias else None
        for v in range(0, weight.shape[0], vocab_chunk_size):
            cols = slice(v, v + vocab_chunk_size)
            w = weight[cols]
            # Accumulate this block's weight gradient over all tokens in fp32; for fp32 weights
            # that is the output slice itself.
            in_place = weight.dtype == acc
            if need_weight:
                grad_w_block = grad_w[cols] if in_place else torch.empty(w.shape, dtype=acc, device=w.device)
                grad_w_block.zero_()
            if need_bias:
                grad_b[cols] = 0
            for r in range(0, h.shape[0], chunk_size):
                rows = slice(r, r + chunk_size)
                grad_z = grad_fn(
                    *_block_inputs(h, weight, bias, logits, rows, cols),
                    target[rows] - v,
                    temperature,
                    lse[rows],
                    grad_logprob[rows],
                    grad_entropy[rows] if grad_entropy is not None else None,
                    entropy[rows] if grad_entropy is not None else None,
                )
                if need_bias:
                    grad_b[cols] += grad_z.sum(dim=0)
                # The matmuls run in the input dtype (bf16 tensor cores on GPU); their products are
                # summed over blocks in fp32.
                grad_z = grad_z.to(h.dtype)
                if need_hidden:
                    _add_product(grad_h[rows], grad_z, w)
                if need_weight:
                    _add_product(grad_w_block, grad_z.T, h[rows])
            if need_weight and not in_place:
                grad_w[cols] = grad_w_block
        if need_hidden and group is not None:
            # Each rank saw only its vocabulary shard; the hidden states' gradient is the sum.
            dist.all_reduce(grad_h, group=group)

        grad_h = grad_h.to(hidden.dtype).view(hidden.shape) if need_hidden else None
        grad_b = grad_b.to(bias.dtype) if need_bias else None
        return grad_h, grad_w, None, grad_b, None, None, None, None, None, None, None


def fused_logprobs(
    hidden,
    weight,
    labels,
    temperature=1.0,
    bias=None,
    chunk_size=1024,
    vocab_chunk_size=16384,
    ignore_index=IGNORE_INDEX,
    return_entropy=False,
    group=None,
    compile=None,
):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature),
    without ever building the [..., V] logits.

    hidden: [..., H] last hidden states (fp32 or bf16); weight: [V, H] LM head; bias: [V] or None;
    labels: [...] int64. Returns logprobs [...] in fp32 (fp64 for fp64 inputs), and with
    return_entropy=True also the per-token entropy [...]; both are differentiable w.r.t. hidden,
    weight and bias, whose gradients come back in their own dtypes. Tokens whose label is
    ignore_index get logprob 0, entropy 0 and no gradient; other labels must lie in [0, V).

    Memory: a block of chunk_size x vocab_chunk_size logits (and its gradient) at a time, plus an
    fp32 [tokens, H] gradient accumulator; with bf16 weights, also an fp32 [vocab_chunk_size, H] one.
    Logits no larger than one such block (few tokens) are computed once and kept for the backward,
    which then need not compute them again.

    group: a torch.distributed process group over which the vocabulary is sharded (tensor
    parallel). weight (and bias) are then this rank's contiguous, equal-sized slice of the rows,
    rank r holding rows [r * V_local, (r + 1) * V_local); labels are global ids, identical on all
    ranks. The per-token max, sum-exp and label logit are all-reduced, and the gradient of hidden
    is all-reduced in backward, so the caller must not all-reduce it again.
    """
    return _FusedLogprobs.apply(
        hidden,
        weight,
        labels,
        bias,
        float(temperature),
        ignore_index,
        return_entropy,
        chunk_size,
        vocab_chunk_size,
        group,
        compile,
    )


# -----------------------------------------------------------------------------
# generalized advantage estimation


def _discount_matrix(n, discount, stride, dtype, device):
    """[n, n] upper-triangular matrix U with U[i, k] = discount ** (stride * (k - i)) for k >= i."""
    i = torch.arange(n, device=device, dtype=dtype)
    steps = (i[None, :] - i[:, None]).clamp(min=0) * stride
    # Each power is computed directly rather than by repeated products, so no rounding compounds.
    return torch.pow(discount, steps).triu()


def _discounted_sum_right(x, discount):
    """y_t = sum_{k >= t} discount^(k - t) x_k along the last dim of x [B, T], i.e. the reverse
    recursion y_t = x_t + discount * y_{t+1}, without a loop over T.

    One [T, T] upper-triangular matmul would do, at O(B T^2) work. Instead: blocks of
    L ~ sqrt(T) tokens, each summed as if the sequence ended at the block's end, then the block
    starts summed across blocks, then each position topped up with the next block start's value:
    two small matmuls and O(B T sqrt(T)) work. Every term is an exact power times x, so the result
    matches the loop to rounding.
    """
    batch, length = x.shape
    block = max(1, int(length**0.5))
    num_blocks = -(-length // block)
    x = F.pad(x, (0, num_blocks * block - length)).view(batch, num_blocks, block)
    y = x @ _discount_matrix(block, discount, 1, x.dtype, x.device).T
    starts = y[:, :, 0] @ _discount_matrix(num_blocks, discount, block, x.dtype, x.device).T
    distance = torch.arange(block, 0, -1, device=x.device, dtype=x.dtype)
    y[:, :-1].addcmul_(starts[:, 1:, None], torch.pow(discount, distance))
    return y.view(batch, -1)[:, :length]


def gae_loop(values, rewards, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016) by its definition: for each row, the
    reverse loop over its real tokens (mask True), a masked token skipped as if it were not there,
        delta_t = r_t + gamma * V_next - V_t,    A_t = delta_t + gamma * lam * A_next,
    where next is the next real token, and V and A past the last one are 0. Returns (advantages,
    returns = advantages + values), both 0 at masked positions. One Python step per token: this is
    the reference that gae() computes vectorised, and what the tests hold it to."""
    advantages = torch.zeros_like(values)
    for row in range(values.shape[0]):
        next_advantage, next_value = 0.0, 0.0
        for t in reversed(mask[row].nonzero().flatten().tolist()):
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[row, t] = next_advantage
            next_value = values[row, t]
    return advantages, (advantages + values) * mask


def gae(values, rewards, mask, gamma, lam):
    """Generalized advantage estimation: gae_loop's numbers (up to summation order), vectorised.
    Returns (advantages, returns), both [B, T].

    values, rewards: [B, T] float; mask: [B, T] bool (or 0/1), True at real response tokens
    (usually real tokens, then padding after EOS). A mask with holes (e.g. tool output inside a
    response) is read as gae_loop reads it: rewards and values at masked positions are ignored,
    and each real token bootstraps from the next real token.

    Vectorized (see _discounted_sum_right), nothing compiled, so a new T costs nothing extra.
    Computes in fp32, or fp64 for fp64 inputs; returns values' dtype.
    """
    batch, length = values.shape
    out_dtype, dtype = values.dtype, torch.promote_types(values.dtype, torch.float32)
    real = mask = mask.bool()
    values, rewards = values.to(dtype), rewards.to(dtype)

    # A real token after a masked one is a hole. Then move each row's real tokens to the front,
    # in order, which reduces holes to the usual case. Masked tokens go to distinct spare columns
    # past T (distinct, so the scatter is deterministic), which are dropped.
    holes = bool((mask[:, 1:] & ~mask[:, :-1]).any())
    if holes:
        position = mask.long().cumsum(dim=1) - 1
        slot = torch.where(mask, position, length + torch.arange(length, device=mask.device))
        packed = torch.zeros(2, batch, 2 * length, dtype=dtype, device=values.device)
        packed[0].scatter_(1, slot, values)
        packed[1].scatter_(1, slot, rewards)
        values, rewards = packed[0, :, :length], packed[1, :, :length]
        mask = torch.arange(length, device=mask.device) < mask.sum(dim=1, keepdim=True)

    # Zeroing V after the last real token makes it bootstrap from 0 and gives padding delta 0.
    values = torch.where(mask, values, 0.0)
    delta = torch.where(mask, rewards, 0.0) - values
    delta[:, :-1].add_(values[:, 1:], alpha=gamma)
    advantages = torch.where(mask, _discounted_sum_right(delta, gamma * lam), 0.0)
    returns = advantages + values

    if holes:
        back = position.clamp(min=0)
        advantages = torch.where(real, advantages.gather(1, back), 0.0)
        returns = torch.where(real, returns.gather(1, back), 0.0)
    return advantages.to(out_dtype), returns.to(out_dtype)


# -----------------------------------------------------------------------------
# statistics over real tokens
#
# Computed in at least fp32 and returned in x's dtype. A row (or batch) with no real token gives
# 0 rather than NaN, so that one empty micro-batch cannot poison a running statistic or a loss.


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is True. x, mask: same shape; dim: None (all) or int."""
    acc = torch.promote_types(x.dtype, torch.float32)
    mask = mask.bool()
    total = torch.where(mask, x.to(acc), 0.0).sum(dim=dim)
    count = mask.sum(dim=dim)
    return (total / count.clamp(min=1)).to(x.dtype)


def masked_var(x, mask, unbiased=True, dim=None):
    """Variance of x over positions where mask is True, two-pass (mean first, then squares).

    unbiased=True applies Bessel's correction count / (count - 1); a single real token then gives 0.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    mask = mask.bool()
    mean = masked_mean(x.to(acc), mask, dim=dim)
    mean = mean.unsqueeze(dim) if dim is not None else mean
    count = mask.sum(dim=dim)
    var = torch.where(mask, (x.to(acc) - mean) ** 2, 0.0).sum(dim=dim) / count.clamp(min=1)
    if unbiased:
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), 0.0)
    return var.to(x.dtype)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) * rsqrt(var + 1e-8) with mean and biased variance over the real tokens of the
    whole tensor, as lm-human-preferences' `whiten` does (tf.nn.moments, biased). TRL's
    `masked_whiten` divides by the unbiased variance instead: a factor n / (n - 1) apart, which
    for the thousands of tokens of a batch is a few parts in 10^4. shift_mean=False adds the mean
    back (rescale only). Masked positions come out as 0. Returns x's shape and dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    mask = mask.bool()
    mean = masked_mean(x.to(acc), mask)
    var = masked_var(x.to(acc), mask, unbiased=False)
    whitened = (x.to(acc) - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0).to(x.dtype)
