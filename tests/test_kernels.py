"""kernels.py against naive references written here, independently of the code under test.

Everything runs eagerly (compile=False) except test_compiled_matches_eager, which compiles the two
chunk bodies once on small shapes and checks that new shapes do not recompile.
"""

import itertools
import math
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernels
from conftest import UNIT_ROUNDOFF, gamma

F64 = torch.float64


# -----------------------------------------------------------------------------
# naive references


def naive_logprobs(logits, labels, temperature=1.0, ignore_index=-100):
    """log_softmax over the full vocabulary, then gather; entropy as sum of -p log p."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    ignored = labels == ignore_index
    logprob = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = torch.special.entr(logp.exp()).sum(-1)
    return logprob.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def naive_fused(hidden, weight, labels, temperature=1.0, bias=None, ignore_index=-100):
    return naive_logprobs(F.linear(hidden, weight, bias), labels, temperature, ignore_index)


def batched_loop_gae(values, rewards, mask, gamma, lam):
    """The textbook loop (as in lm-human-preference-details) for masks of real tokens then padding."""
    values, rewards = values * mask, rewards * mask
    length = values.shape[1]
    advantages = torch.zeros_like(values)
    last_advantage = 0.0
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = last_advantage
    return advantages * mask, (advantages + values) * mask


def make_inputs(n, h, v, dtype=F64, bias=True, ignore=(), seed=0, shape=None):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator, dtype=F64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=generator, dtype=F64) / h**0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(v, generator=generator, dtype=F64).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[list(ignore)] = -100
    if shape is not None:
        hidden = hidden.detach().view(*shape, h).requires_grad_()
        labels = labels.view(shape)
    return hidden, weight, b, labels


# -----------------------------------------------------------------------------
# rounding bounds: how far results computed in fp32 or bf16 can be from exact math on the same
# (rounded) inputs on any CPU, from u and gamma(n) (see conftest) and these inputs' magnitudes. The
# fp64 references' own rounding is 2^-29 of these bounds. The fp64 comparisons of fused_logprobs
# use 1e-12: in fp64 these bounds are at most 3e-13 for their log-probs and entropies, and up to
# 1e-11 for gradients only if every rounding of a sum errs the same way; they add like a random walk
# (1e-14 seen, see conftest). GAE's fp64 comparisons use gae_rounding's bound.


def logit_rounding(hidden, weight, bias, temperature):
    """The exact logits z = (h w^T + b) / T [n, V], in fp64, and a bound [n, V] on the error of the
    kernel's: H + 1 products summed in fp32 (a bf16 matmul too) and the division by T err by at
    most gamma(H + 2) sum|terms| / T, and bf16 logits are rounded once more, by u_bf16 |z|."""
    h, w = hidden.detach().double().reshape(-1, hidden.shape[-1]), weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=F64)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    z = (h @ w.T + b) / temperature
    dz = gamma(h.shape[-1] + 2, acc) * (h.abs() @ w.abs().T + b.abs()) / temperature
    return z, dz + (UNIT_ROUNDOFF[hidden.dtype] * z.abs() if hidden.dtype != acc else 0.0)


def softmax_rounding(z, dz, labels, blocks=1, dtype=torch.float32):
    """Bounds [n] on the error of log p(label) and of the entropy, computed in dtype over `blocks`
    vocabulary blocks from logits whose error is at most dz [n, V] (z: exact, fp64), and a bound on
    that of any log p_j. Each rounding inside the softmax statistics is an error of a logit:
    exp(x (1 + u)) (1 + 4u) for |x| <= 2 max|z|, the sum of V positive terms (gamma(V)), each block
    merge's exp of a difference, product and sums; so each logit is off by at most
    d = dz + gamma(V + (blocks + 1)(2 max|z| + 8)). Then log p_y moves by at most d_y + sum_j p_j d_j
    and the entropy H by sum_j p_j |log p_j + H| d_j (their derivatives), where, between the exact
    and the computed logits, p_j grows by at most exp(2 max d) and |log p_j + H| by
    2 max d (1 + log V) (mean value theorem). The last roundings, of log s, m + log s and
    z_y - (m + log s), add u (3 max|z| + 6 log V); those of a = sum_j e_j x_j (relative gamma(V +
    4 blocks + 4), and 4u of s) in H = log s - a / s, with |a / s| <= log V, add (log V + 1)
    gamma(V + 4 blocks + 8)."""
    u, vocab = UNIT_ROUNDOFF[dtype], z.shape[-1]
    zmax, log_v = (z.abs() + dz).max().item(), math.log(vocab)
    d = dz + gamma(vocab + (blocks + 1) * (2 * zmax + 8), dtype)
    grow, dmax = math.exp(2 * d.max().item()), d.max().item()
    logp = torch.log_softmax(z, -1)
    p, entropy = logp.exp(), -(logp.exp() * logp).sum(-1, keepdim=True)
    through_lse = (p * d).sum(-1)
    last = u * (3 * zmax + 6 * log_v)
    label = d.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    logprob = grow * (label + through_lse) + last
    any_logprob = (grow * (dmax + through_lse) + last).max().item()
    spread = (logp + entropy).abs() + 2 * dmax * (1 + log_v)
    entropy_bound = grow * (p * spread * d).sum(-1) + (log_v + 1) * gamma(vocab + 4 * blocks + 8, dtype)
    ignored = labels == kernels.IGNORE_INDEX
    return logprob.masked_fill(ignored, 0.0), entropy_bound.masked_fill(ignored, 0.0), any_logprob


def fused_rounding(hidden, weight, bias, labels, temperature, vocab_chunk_size, seed=1):
    """Bounds on the errors of forward_backward(ours(...)): of the log-probs and entropies [n], and
    elementwise of the gradients of hidden, weight and bias (in fp64 for fp64 inputs). The gradient
    of the loss with respect to the raw logits is G = (g1 (onehot - p) - g2 p (log p + H)) / T; the
    kernel's log p are off by at most L (softmax_rounding's), so p by p expm1(L + 4u), and its
    coefficient g1 + g2 (log p + H) by |g2| (L + error of H) plus 3 roundings; G is cast to the
    input dtype (u_in |G|). Then the gradients are sums of V (hidden) or n (weight, bias) products
    accumulated in fp32 (fp64): gamma(V + 2) or gamma(n + 2) of sum|terms|, plus, for bf16 inputs,
    u_bf16 of each block's product and of the result."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    u, u_in = UNIT_ROUNDOFF[acc], UNIT_ROUNDOFF[hidden.dtype] if hidden.dtype != acc else 0.0
    labels = labels.reshape(-1)
    z, dz = logit_rounding(hidden, weight, bias, temperature)
    blocks = -(-weight.shape[0] // vocab_chunk_size)
    d_logprob, d_entropy, any_logprob = softmax_rounding(z, dz, labels, blocks, acc)
    generator = torch.Generator().manual_seed(seed)  # forward_backward's output gradients
    ignored = labels == kernels.IGNORE_INDEX
    g1 = torch.randn(labels.shape, generator=generator, dtype=F64).masked_fill(ignored, 0.0)[:, None]
    g2 = torch.randn(labels.shape, generator=generator, dtype=F64).masked_fill(ignored, 0.0)[:, None]
    logp = torch.log_softmax(z, -1)
    p, entropy = logp.exp(), -(logp.exp() * logp).sum(-1, keepdim=True)
    hit = F.one_hot(labels.clamp(min=0), z.shape[-1]).double()
    coef = g1 + g2 * (logp + entropy)
    grad_z = (hit * g1 - p * coef) / temperature
    eta = math.expm1(any_logprob + 4 * u)
    d_coef = g2.abs() * (any_logprob + d_entropy.max().item()) + 3 * u * (g1.abs() + g2.abs() * (logp.abs() + entropy))
    d_grad_z = (1 + eta) * (p * (eta * coef.abs() + d_coef) * (1 + 4 * u) + 4 * u * (hit * g1.abs() + p * coef.abs()))
    d_grad_z = d_grad_z / temperature + u_in * grad_z.abs()
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    w = weight.detach().double()
    n, vocab = h.shape[0], w.shape[0]
    bounds = [
        d_grad_z @ w.abs() + (gamma(vocab + 2, acc) + u_in) * grad_z.abs() @ w.abs() + u_in * (grad_z @ w).abs(),
        d_grad_z.T @ h.abs() + (gamma(n + 2, acc) + u_in) * grad_z.abs().T @ h.abs() + u_in * (grad_z.T @ h).abs(),
    ]
    if bias is not None:
        bounds.append(d_grad_z.sum(0) + gamma(n + 2, acc) * grad_z.abs().sum(0) + u_in * grad_z.sum(0).abs())
    return d_logprob, d_entropy, [b.view(x.shape) for b, x in zip(bounds, (hidden, weight, bias))]


def assert_within(actual, expected, bound, what=""):
    """Elementwise |actual - expected| <= bound, with the worst ratio in the message."""
    error = (actual.double() - expected.double()).abs()
    assert (error <= bound).all(), f"{what}: error / bound up to {(error / bound).max().item():.3g}"


def forward_backward(fn, hidden, weight, bias, labels, seed=1):
    """Outputs and the gradients of a random linear combination of logprob and entropy."""
    logprob, entropy = fn(hidden, weight, labels, bias)
    generator = torch.Generator().manual_seed(seed)
    g1 = torch.randn(logprob.shape, generator=generator, dtype=F64)
    g2 = torch.randn(logprob.shape, generator=generator, dtype=F64)
    loss = (logprob.double() * g1).sum() + (entropy.double() * g2).sum()
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    return logprob, entropy, torch.autograd.grad(loss, inputs)


def ours(**options):
    options = {"compile": False, **options}
    return lambda h, w, y, b: kernels.fused_logprobs(h, w, y, bias=b, return_entropy=True, **options)


def naive(temperature=1.0):
    return lambda h, w, y, b: naive_fused(h, w, y, temperature, b)


# -----------------------------------------------------------------------------
# linear


def test_linear_is_f_linear_within_rounding_and_takes_the_transposed_product_where_it_pays(monkeypatch):
    """Forward and both gradients against fp64 F.linear of the same fp32 values. Each output is a sum of K
    products (plus the bias), so any summation order is within gamma(K + 1) of the sum of the terms' sizes."""
    calls = []
    f_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(a[0].shape) or f_linear(*a))
    generator = torch.Generator().manual_seed(0)
    for shape, bias in (((2, 5, 64), True), ((7, 64), False), ((1, 64), True)):
        x, grad = torch.randn(*shape, generator=generator), torch.randn(*shape[:-1], 48, generator=generator)
        w, b = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator) if bias else None
        inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
        out = kernels.linear(x, w, b)
        grads = torch.autograd.grad(out, inputs, grad)
        x64, w64, b64, grad64 = (t.detach().double() if t is not None else None for t in (x, w, b, grad))
        reference = f_linear(x64, w64, b64)
        terms = x64.abs() @ w64.abs().T + (b64.abs() if bias else 0)
        assert_within(out, reference, gamma(65) * terms, f"output {shape}")
        assert_within(grads[0], grad64 @ w64, gamma(49) * (grad64.abs() @ w64.abs()), "input gradient")
        rows, grad_rows = x64.reshape(-1, 64), grad64.reshape(-1, 48)
        bound = gamma(len(rows) + 1) * (grad_rows.abs().T @ rows.abs())
        assert_within(grads[1], grad_rows.T @ rows, bound, "weight gradient")
    assert calls == [(1, 64)]  # one row keeps F.linear
    for x in (torch.randn(3, 64, dtype=F64), torch.randn(3, 64, dtype=torch.bfloat16)):
        assert torch.equal(
            kernels.linear(x, torch.ones(8, 64, dtype=x.dtype)), f_linear(x, torch.ones(8, 64, dtype=x.dtype))
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.linear(torch.randn(3, 64), torch.randn(8, 64))
    assert len(calls) == 4


def test_use_linear_changes_only_how_a_model_computes(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 50, 0))
    before = dict(model.state_dict())
    assert kernels.use_linear(model) is model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is kernels.Linear for m in linears)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k].data_ptr() == v.data_ptr() for k, v in after.items())
    calls = []
    monkeypatch.setattr(kernels, "linear", lambda *a: calls.append(1) or F.linear(*a))
    model(torch.tensor([[1, 2, 3]]))
    assert len(calls) == len(linears)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(type(m) is kernels.Linear for m in reloaded.modules())
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


# -----------------------------------------------------------------------------
# fused_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [(5, 7), (64, 1000), (1, 3)])
def test_fused_matches_naive_fp64(temperature, bias, chunks):
    # 37 tokens, 53 vocabulary entries: no chunk size above divides either.
    inputs = make_inputs(37, 8, 53, bias=bias, ignore=(3, 20))
    ours_out = forward_backward(
        ours(temperature=temperature, chunk_size=chunks[0], vocab_chunk_size=chunks[1]), *inputs
    )
    ref_out = forward_backward(naive(temperature), *inputs)
    torch.testing.assert_close(ours_out[0], ref_out[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_out[1], ref_out[1], rtol=0, atol=1e-12)
    for ours_grad, ref_grad in zip(ours_out[2], ref_out[2]):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-12)


def test_fused_gradcheck():
    hidden, weight, bias, labels = make_inputs(6, 4, 11, ignore=(2,))

    def fn(h, w, b):
        return kernels.fused_logprobs(
            h, w, labels, 0.8, bias=b, chunk_size=4, vocab_chunk_size=5, return_entropy=True, compile=False
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_fused_batch_shape_and_single_token():
    for shape in [(3, 5), (1, 1)]:
        n = shape[0] * shape[1]
        inputs = make_inputs(n, 6, 19, shape=shape)
        ours_out = forward_backward(ours(chunk_size=4, vocab_chunk_size=8), *inputs)
        ref_out = forward_backward(naive(), *inputs)
        assert ours_out[0].shape == shape and ours_out[2][0].shape == (*shape, 6)
        torch.testing.assert_close(ours_out[0], ref_out[0], rtol=0, atol=1e-12)
        for ours_grad, ref_grad in zip(ours_out[2], ref_out[2]):
            torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-12)


def test_ignored_tokens_give_zero_and_no_gradient():
    hidden, weight, bias, labels = make_inputs(9, 4, 13, ignore=range(9))
    logprob, entropy, grads = forward_backward(ours(chunk_size=4), hidden, weight, bias, labels)
    assert logprob.abs().max() == 0 and entropy.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)
    # One ignored token: its hidden state receives no gradient even from an unmasked loss.
    hidden, weight, bias, labels = make_inputs(9, 4, 13, ignore=(4,))
    *_, grads = forward_backward(ours(chunk_size=4), hidden, weight, bias, labels)
    assert grads[0][4].abs().max() == 0 and grads[0][3].abs().max() > 0


def test_logprob_only_entropy_only_and_frozen_weight():
    hidden, weight, bias, labels = make_inputs(10, 5, 17, ignore=(1,))
    ref_logprob, ref_entropy = naive_fused(hidden, weight, labels, 1.3, bias)
    logprob = kernels.fused_logprobs(
        hidden, weight, labels, 1.3, bias=bias, chunk_size=3, vocab_chunk_size=6, compile=False
    )
    _, entropy = kernels.fused_logprobs(
        hidden, weight, labels, 1.3, bias=bias, chunk_size=3, vocab_chunk_size=6, return_entropy=True, compile=False
    )
    for out, ref in [(logprob, ref_logprob), (entropy, ref_entropy)]:
        got = torch.autograd.grad(out.sum(), (hidden, weight, bias))
        want = torch.autograd.grad(ref.sum(), (hidden, weight, bias), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    frozen = weight.detach()
    logprob = kernels.fused_logprobs(hidden, frozen, labels, chunk_size=4, compile=False)
    (grad,) = torch.autograd.grad(logprob.sum(), hidden)
    (want,) = torch.autograd.grad(naive_fused(hidden, frozen, labels)[0].sum(), hidden)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


def test_fused_keeps_logits_of_one_block_and_recomputes_larger_ones(monkeypatch):
    """Logits no larger than one block are built once, and the backward reuses them (one F.linear call
    in all); larger ones are computed block by block, and again in the backward. Both equal the naive
    fp64 log-probs, entropies and gradients."""
    calls = []
    linear = F.linear
    monkeypatch.setattr(kernels.F, "linear", lambda *a: calls.append(a[0].shape) or linear(*a))
    inputs = make_inputs(12, 4, 10, ignore=(5,))
    ref_out = forward_backward(naive(0.8), *inputs)
    for chunk_size, vocab_chunk_size, expected in ((4, 30, [(12, 4)]), (4, 29, [(4, 4)] * 6)):
        calls.clear()
        ours_out = forward_backward(
            ours(temperature=0.8, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size), *inputs
        )
        assert [tuple(shape) for shape in calls] == expected
        for a, b in zip([*ours_out[:2], *ours_out[2]], [*ref_out[:2], *ref_out[2]]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_an_output_outside_the_loss_costs_the_backward_nothing(monkeypatch):
    """With the entropy returned but only the log-probs in the loss, no entropy gradient reaches the chunk
    gradient (autograd's zeros in its place cost four passes over each block), whether the logits are kept or
    recomputed; the gradients are bitwise those of a call without the entropy."""
    entropy_grads, chunk_grad = [], kernels._chunk_grad
    monkeypatch.setattr(kernels, "_chunk_grad", lambda *a: entropy_grads.append(a[7]) or chunk_grad(*a))
    hidden, weight, bias, labels = make_inputs(12, 4, 10, ignore=(5,))
    for vocab_chunk_size in (30, 3):  # logits kept whole, then in blocks
        options = dict(bias=bias, chunk_size=4, vocab_chunk_size=vocab_chunk_size, compile=False)
        logprob, _ = kernels.fused_logprobs(hidden, weight, labels, return_entropy=True, **options)
        with_entropy = torch.autograd.grad(logprob.sum(), (hidden, weight, bias))
        alone = torch.autograd.grad(
            kernels.fused_logprobs(hidden, weight, labels, **options).sum(), (hidden, weight, bias)
        )
        assert all(torch.equal(a, b) for a, b in zip(with_entropy, alone))
    assert entropy_grads and all(g is None for g in entropy_grads)


@pytest.mark.precision
def test_fused_fp32_and_bf16():
    # The reference is fp64 on the same (rounded) inputs; the bounds are fused_rounding's.
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, bias, labels = make_inputs(50, 32, 301, dtype=dtype, ignore=(7,))
        logprob, entropy, grads = forward_backward(
            ours(temperature=0.9, chunk_size=16, vocab_chunk_size=128), hidden, weight, bias, labels
        )
        assert logprob.dtype == torch.float32 and [g.dtype for g in grads] == [dtype] * 3
        promoted = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
        ref_logprob, ref_entropy, ref_grads = forward_backward(naive(0.9), *promoted, labels)
        d_logprob, d_entropy, d_grads = fused_rounding(hidden, weight, bias, labels, 0.9, 128)
        assert_within(logprob, ref_logprob, d_logprob, f"{dtype} log-probs")
        assert_within(entropy, ref_entropy, d_entropy, f"{dtype} entropies")
        for grad, ref, bound, name in zip(grads, ref_grads, d_grads, ("hidden", "weight", "bias")):
            assert_within(grad, ref, bound, f"{dtype} gradient of {name}")


@pytest.mark.precision
def test_bf16_matches_what_generation_sampled_from():
    # bf16 logits as the model computes them, upcast, then divided by the temperature. One chunk holds
    # every token and the whole vocabulary, so the kernel's logits are those of this same F.linear call,
    # bit for bit; the two fp32 log-softmaxes of them each err by at most softmax_rounding's bound.
    hidden, weight, bias, labels = make_inputs(40, 16, 97, dtype=torch.bfloat16)
    logprob = kernels.fused_logprobs(
        hidden, weight, labels, 0.7, bias=bias, chunk_size=40, vocab_chunk_size=97, compile=False
    )
    logits = F.linear(hidden, weight, bias).float() / 0.7
    ref, _ = naive_logprobs(logits, labels)
    bound, _, _ = softmax_rounding(logits.double(), torch.zeros(logits.shape, dtype=F64), labels)
    assert_within(logprob, ref, 2 * bound)


@pytest.mark.precision
def test_gradient_under_autocast_with_the_backward_outside_it():
    """The scripts' pattern: fp32 weights, the forward under bf16 autocast, .backward() after the
    block. The gradient must be that of the same expression under autocast (autograd replays the
    bf16 casts it recorded). A backward that recomputed the logits in fp32 against the logsumexp
    of the forward's bf16 logits was off by 5.3% here (sharp logits: weights of std 1); inside
    autocast, or now outside it, by 0.28% (bf16 rounding of two different summation orders).

    Both sides differentiate the same bf16 logits (one chunk: the same F.linear call, bit for bit),
    G = g (onehot - p), each within |g| p expm1(L + 4u) and two roundings of exact; each rounds G
    and w (or h) to bf16 at most once each and its result once, and sums V (or n) products in fp32:
    |ours - reference| <= 2 (|dG| @ |w| + (2 u_bf16 + gamma(V + 2)) |G| @ |w| + u_bf16 |G @ w|)."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(256, 128, generator=generator), torch.randn(4096, 128, generator=generator)
    labels, grad_output = torch.randint(4096, (256,), generator=generator), torch.randn(256, generator=generator)

    def gradients(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = fn(h, w)
        (output.float() * grad_output).sum().backward()
        return h.grad, w.grad

    u, u_bf16 = UNIT_ROUNDOFF[torch.float32], UNIT_ROUNDOFF[torch.bfloat16]
    logits = F.linear(hidden.bfloat16(), weight.bfloat16()).double()
    _, _, any_logprob = softmax_rounding(logits, torch.zeros(logits.shape, dtype=F64), labels)
    p, hit, g = torch.softmax(logits, -1), F.one_hot(labels, 4096).double(), grad_output.double()[:, None]
    grad_z = g * (hit - p)
    d_grad_z = g.abs() * (p * math.expm1(any_logprob + 4 * u) + 2 * u * (hit + p))
    bounds = []
    for left, d_left, right in ((grad_z, d_grad_z, weight), (grad_z.T, d_grad_z.T, hidden)):
        right = right.bfloat16().double()  # the gradient of hidden sums over V, that of weight over n
        one_side = d_left @ right.abs() + (2 * u_bf16 + gamma(left.shape[1] + 2)) * left.abs() @ right.abs()
        bounds.append(2 * (one_side + u_bf16 * (left @ right).abs()))

    reference = gradients(
        lambda h, w: torch.log_softmax(F.linear(h, w).float(), -1).gather(1, labels[:, None]).squeeze(1)
    )
    ours = gradients(lambda h, w: kernels.fused_logprobs(h, w, labels, compile=False))
    for grad, ref, bound in zip(ours, reference, bounds):
        assert_within(grad, ref, bound)
    ours = gradients(lambda h, w: kernels.logprobs_from_logits(F.linear(h, w), labels, compile=False))
    for grad, ref, bound in zip(ours, reference, bounds):
        assert_within(grad, ref, bound)


# -----------------------------------------------------------------------------
# logprobs_from_logits


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_from_logits_matches_naive(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 29, generator=generator, dtype=F64) * 4).requires_grad_()
    labels = torch.randint(0, 29, (3, 7), generator=generator)
    labels[1, 2] = -100
    logprob, entropy = kernels.logprobs_from_logits(
        logits, labels, temperature, return_entropy=True, chunk_size=4, compile=False
    )
    ref_logprob, ref_entropy = naive_logprobs(logits, labels, temperature)
    torch.testing.assert_close(logprob, ref_logprob, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    g1, g2 = torch.randn(3, 7, generator=generator, dtype=F64), torch.randn(3, 7, generator=generator, dtype=F64)
    (grad,) = torch.autograd.grad((logprob * g1 + entropy * g2).sum(), logits)
    (ref,) = torch.autograd.grad((ref_logprob * g1 + ref_entropy * g2).sum(), logits)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12)
    assert grad[1, 2].abs().max() == 0

    def fn(x):
        return kernels.logprobs_from_logits(
            x, labels[:2, :3], temperature, return_entropy=True, chunk_size=4, compile=False
        )

    assert torch.autograd.gradcheck(fn, (logits[:2, :3].detach().requires_grad_(),))


@pytest.mark.precision
def test_logprobs_from_logits_bf16_and_filtered_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 40, generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, 40, (11,), generator=generator)
    logprob = kernels.logprobs_from_logits(logits, labels, chunk_size=3, compile=False)
    (grad,) = torch.autograd.grad(logprob.sum(), logits)
    ref_logprob, _ = naive_logprobs(logits, labels)
    (ref,) = torch.autograd.grad(ref_logprob.sum(), logits)
    assert logprob.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # Both take the log-softmax of the same (exactly upcast) logits in fp32: each errs by at most
    # softmax_rounding's bound, its p by p expm1(L + 4u); the gradients onehot - p, each with two more
    # roundings, are then rounded to bf16: |bf16(a) - bf16(b)| <= |a - b| (1 + u_bf16) + 2 u_bf16 |grad|.
    exact = logits.detach().double()
    bound, _, any_logprob = softmax_rounding(exact, torch.zeros(exact.shape, dtype=F64), labels)
    assert_within(logprob, ref_logprob, 2 * bound)
    u, u_bf16 = UNIT_ROUNDOFF[torch.float32], UNIT_ROUNDOFF[torch.bfloat16]
    p, hit = torch.softmax(exact, -1), F.one_hot(labels, 40).double()
    apart = 2 * (p * math.expm1(any_logprob + 4 * u) + 2 * u * (hit + p))
    assert_within(grad, ref, apart * (1 + u_bf16) + 2 * u_bf16 * (hit - p).abs())
    # top-k filtered logits (-inf) keep a finite entropy and gradient
    filtered = logits.detach().double().masked_fill(torch.arange(40) >= 30, float("-inf")).requires_grad_()
    labels = labels.clamp(max=29)
    logprob, entropy = kernels.logprobs_from_logits(filtered, labels, return_entropy=True, chunk_size=4, compile=False)
    ref_logprob, ref_entropy = naive_logprobs(filtered, labels)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(entropy.sum() + logprob.sum(), filtered)
    assert torch.isfinite(grad).all() and grad[:, 30:].abs().max() == 0


# -----------------------------------------------------------------------------
# compilation


def test_compile_switch(monkeypatch):
    monkeypatch.setenv("KERNELS_COMPILE", "0")
    assert kernels._maybe_compile(kernels._chunk_stats, None) is kernels._chunk_stats
    assert kernels._maybe_compile(kernels._chunk_stats, True) is not kernels._chunk_stats
    monkeypatch.setenv("KERNELS_COMPILE", "1")
    assert kernels._maybe_compile(kernels._chunk_stats, False) is kernels._chunk_stats


def test_by_default_a_cpu_compiles_once_the_eager_calls_have_cost_a_compile(monkeypatch):
    """Unset KERNELS_COMPILE on a CPU: the eager body runs until a third of its time (what compiling would save)
    adds up to COMPILE_SECONDS, then the compiled one (here a stand-in that records its calls)."""
    calls, ticks = [], itertools.count()

    def body(x):
        calls.append("eager")
        return x

    monkeypatch.delenv("KERNELS_COMPILE")
    monkeypatch.setattr(kernels, "_compiled", {})
    # A clock on which every eager call takes 0.03 s, a third of which (0.01 s) is surplus.
    monkeypatch.setattr(kernels, "time", types.SimpleNamespace(perf_counter=lambda: 0.03 * next(ticks)))
    monkeypatch.setattr(kernels, "COMPILE_SECONDS", 0.025)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: lambda x: calls.append("compiled") or x)
    call = kernels._maybe_compile(body, None)
    for _ in range(5):
        call(torch.zeros(2))
    assert calls == ["eager"] * 3 + ["compiled"] * 2
    calls.clear()
    kernels._maybe_compile(body, True)(torch.zeros(2))  # compile=True: at once
    assert calls == ["compiled"]


# Not marked precision: under ATEN_CPU_CAPABILITY=default, torch 2.13's inductor writes CPU code that
# does not compile ("'at::vec' has not been declared").
def test_compiled_matches_eager():
    from torch._dynamo.utils import counters

    def run(compile, n, v):
        inputs = make_inputs(n, 16, v, dtype=torch.float32, ignore=(2,))
        return forward_backward(ours(temperature=0.8, chunk_size=8, vocab_chunk_size=48, compile=compile), *inputs)

    for n, v in [(21, 100), (30, 150)]:  # the second shape must reuse the dynamic graphs
        compiled, eager = run(True, n, v), run(False, n, v)
        # Each is within fused_rounding's bounds of exact (the compiled code may fuse and reorder, not
        # add roundings), so the two are within twice those.
        d_logprob, d_entropy, d_grads = fused_rounding(
            *make_inputs(n, 16, v, dtype=torch.float32, ignore=(2,)), 0.8, 48
        )
        assert_within(compiled[0], eager[0], 2 * d_logprob, "log-probs")
        assert_within(compiled[1], eager[1], 2 * d_entropy, "entropies")
        for a, b, bound in zip(compiled[2], eager[2], d_grads):
            assert_within(a, b, 2 * bound, "gradients")
        if n == 21:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 2  # the stats and the gradient chunk bodies were compiled
    assert counters["stats"]["unique_graphs"] == graphs


# -----------------------------------------------------------------------------
# tensor parallel: a vocabulary sharded over two gloo processes equals the dense computation


def _sharded_worker(rank, world_size, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        hidden, weight, bias, labels = make_inputs(13, 6, 22, ignore=(5,), seed=3)
        ref = forward_backward(naive(0.9), hidden, weight, bias, labels)
        shard = slice(rank * 11, (rank + 1) * 11)
        local = [x.detach()[shard].clone().requires_grad_() for x in (weight, bias)]
        got = forward_backward(
            ours(temperature=0.9, chunk_size=4, vocab_chunk_size=4, group=dist.group.WORLD),
            hidden,
            local[0],
            local[1],
            labels,
        )
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2][0], ref[2][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2][1], ref[2][1][shard], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2][2], ref[2][2][shard], rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_vocab_sharded_matches_dense():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Forked from conftest's forkserver, which has imported torch once (spawn's fresh interpreters did it again).
    mp.start_processes(_sharded_worker, args=(2, port), nprocs=2, start_method="forkserver")


# -----------------------------------------------------------------------------
# gae


def random_lengths_mask(batch, length, generator):
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    lengths[0], lengths[1] = 0, length  # an all-masked row and a full one
    return torch.arange(length) < lengths[:, None]


def gae_rounding(values, rewards, advantages, gamma_, lam, dtype):
    """A bound on how far gae() in `dtype` and the fp64 loop can be apart, from these (fp64) inputs
    and the loop's advantages. A_t = sum_k d^k delta_{t+k}, d = gamma lam (the one Python product
    both use), delta_t = r_t - v_t + gamma v_{t+1}, whose terms sum to at most S. gae() rounds each
    delta at most 6 times (the inputs to dtype, gamma, a product, two sums) and each term d^k delta
    at most rho k + L + nb + 16 times (rho = 1 where d is not exact in dtype; powers within 2 ulps,
    products, sums of L ~ sqrt(T) and nb = T / L terms, the block starts' addcmul): an error of at
    most sum_k d^k gamma(rho k + L + nb + 22) S. The loop rounds 5 times a step, on terms of at most
    S + d max|A|, an error carried on times d; the returns A + v add u (max|v| + max|A|)."""
    length = values.shape[-1]
    block = max(1, int(length**0.5))
    d = gamma_ * lam
    rho = int(torch.tensor(d, dtype=dtype).item() != d)
    size = (rewards.abs() + values.abs() + gamma_ * F.pad(values.abs()[..., 1:], (0, 1))).max().item()
    ours = sum(d**k * gamma(rho * k + block + -(-length // block) + 22, dtype) for k in range(length)) * size
    loop = sum(d**k for k in range(length)) * gamma(5, F64) * (size + d * advantages.abs().max().item())
    u = UNIT_ROUNDOFF[dtype]
    return ours + loop, ours + loop + u * (values.abs().max().item() + advantages.abs().max().item())


@pytest.mark.parametrize("length", [1, 2, 37, 1024])
def test_gae_matches_loop_fp64(length):
    generator = torch.Generator().manual_seed(length)
    values = torch.randn(64, length, generator=generator, dtype=F64)
    rewards = torch.randn(64, length, generator=generator, dtype=F64)
    mask = random_lengths_mask(64, length, generator)
    for gamma_, lam in [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0)]:
        advantages, returns = kernels.gae(values, rewards, mask, gamma_, lam)
        ref_advantages, ref_returns = batched_loop_gae(values, rewards, mask, gamma_, lam)
        d_advantages, d_returns = gae_rounding(values, rewards, ref_advantages, gamma_, lam, F64)
        torch.testing.assert_close(advantages, ref_advantages, rtol=0, atol=d_advantages)
        torch.testing.assert_close(returns, ref_returns, rtol=0, atol=d_returns)
        assert advantages[~mask].abs().max() == 0 and returns[~mask].abs().max() == 0


def test_gae_mask_with_holes_skips_masked_tokens():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(16, 40, generator=generator, dtype=F64)
    rewards = torch.randn(16, 40, generator=generator, dtype=F64)
    mask = torch.rand(16, 40, generator=generator) < 0.6
    mask[0] = False
    advantages, returns = kernels.gae(values, rewards, mask, 0.99, 0.9)
    ref_advantages, ref_returns = kernels.gae_loop(values, rewards, mask, 0.99, 0.9)
    d_advantages, d_returns = gae_rounding(values, rewards, ref_advantages, 0.99, 0.9, F64)
    torch.testing.assert_close(advantages, ref_advantages, rtol=0, atol=d_advantages)
    torch.testing.assert_close(returns, ref_returns, rtol=0, atol=d_returns)


@pytest.mark.precision
def test_gae_fp32_and_float_mask():
    generator = torch.Generator().manual_seed(1)
    values, rewards = torch.randn(2, 8, 300, generator=generator, dtype=F64)
    mask = random_lengths_mask(8, 300, generator)
    advantages, returns = kernels.gae(values.float(), rewards.float(), mask.float(), 0.99, 0.95)
    ref_advantages, ref_returns = batched_loop_gae(values, rewards, mask, 0.99, 0.95)
    assert advantages.dtype == torch.float32
    d_advantages, d_returns = gae_rounding(values, rewards, ref_advantages, 0.99, 0.95, torch.float32)
    torch.testing.assert_close(advantages.double(), ref_advantages, rtol=0, atol=d_advantages)
    torch.testing.assert_close(returns.double(), ref_returns, rtol=0, atol=d_returns)


# -----------------------------------------------------------------------------
# masked statistics


def test_masked_mean_and_var():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=generator, dtype=F64)
    mask = torch.rand(5, 9, generator=generator) < 0.5
    mask[0], mask[1], mask[2] = False, True, False
    mask[2, 3] = True  # a single real token
    real = x[mask]
    torch.testing.assert_close(kernels.masked_mean(x, mask), real.mean())
    torch.testing.assert_close(kernels.masked_var(x, mask, unbiased=True), real.var(correction=1))
    torch.testing.assert_close(kernels.masked_var(x, mask, unbiased=False), real.var(correction=0))
    # per row: empty rows give 0, a single token gives 0 unbiased
    rows = [x[i][mask[i]] for i in range(5)]
    mean = torch.stack([r.mean() if len(r) else torch.tensor(0.0, dtype=F64) for r in rows])
    var = torch.stack([r.var(correction=1) if len(r) > 1 else torch.tensor(0.0, dtype=F64) for r in rows])
    torch.testing.assert_close(kernels.masked_mean(x, mask, dim=1), mean)
    torch.testing.assert_close(kernels.masked_var(x, mask, unbiased=True, dim=1), var)
    # NaN in padding does not leak
    poisoned = x.masked_fill(~mask, float("nan"))
    torch.testing.assert_close(kernels.masked_mean(poisoned, mask), real.mean())
    empty = torch.zeros_like(mask)
    assert kernels.masked_mean(x, empty) == 0 and kernels.masked_var(x, empty) == 0


def test_masked_whiten():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=generator, dtype=F64) * 3 + 2
    mask = torch.rand(6, 10, generator=generator) < 0.7
    real = x[mask]
    mean, var = real.mean(), real.var(correction=0)
    whitened = kernels.masked_whiten(x, mask)
    torch.testing.assert_close(whitened[mask], (real - mean) / torch.sqrt(var + 1e-8))
    assert whitened[~mask].abs().max() == 0
    rescaled = kernels.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(rescaled[mask], (real - mean) / torch.sqrt(var + 1e-8) + mean)
    assert torch.isfinite(kernels.masked_whiten(x, torch.zeros_like(mask))).all()
    assert kernels.masked_whiten(x.float(), mask).dtype == torch.float32
