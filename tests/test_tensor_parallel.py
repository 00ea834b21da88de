"""Tensor parallel layers and the per-family rewrite against the dense model, on 2 gloo ranks in
fp64: forward outputs, gradients (reassembled from the shards), vocabulary-parallel log-probs,
generation, and the reassembled state dict."""

import copy

import pytest
import torch

import kernels
import parallel
from test_parallel import spawn

TOLERANCE = 1e-12


def layers_experiment(grid):
    group, rank = grid.tp_group, grid.tp_rank
    torch.manual_seed(0)
    up, down = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 6).double()
    embedding = torch.nn.Embedding(10, 6).double()
    ids = torch.tensor([[1, 9, 4, 0], [5, 5, 2, 7]])
    # Dense: embedding -> up -> gelu -> down, and up alone with its output whole.
    dense_x = embedding(ids)
    dense_y = down(torch.nn.functional.gelu(up(dense_x)))
    (dense_y.square().sum() + up(dense_x).sum()).backward()

    rows = torch.arange(rank * 4, (rank + 1) * 4)
    column = parallel.ColumnParallelLinear(up.weight, up.bias, rows, group)
    gathered = parallel.ColumnParallelLinear(up.weight, up.bias, rows, group, gather_output=True)
    row = parallel.RowParallelLinear(down.weight, down.bias, rows, group)
    vocab = parallel.VocabParallelEmbedding(embedding.weight, group)
    x = vocab(ids)
    y = row(torch.nn.functional.gelu(column(x)))
    (y.square().sum() + gathered(x).sum()).backward()
    # split_last_dim keeps this rank's slice forward and all-gathers the gradient backward: with a
    # different weight per rank, the whole input's gradient is every rank's weight in its slice.
    whole = dense_x.detach().clone().requires_grad_()
    (parallel.split_last_dim(whole, group) * (rank + 1)).sum().backward()
    expected_split_grad = torch.cat([torch.full((2, 4, 3), float(r + 1), dtype=torch.float64) for r in range(2)], -1)
    return {
        "split": (parallel.split_last_dim(dense_x, group) - dense_x[..., rank * 3 : (rank + 1) * 3]).abs().max().item(),
        "split_grad": (whole.grad - expected_split_grad).abs().max().item(),
        "output": (y - dense_y).abs().max().item(),
        "gathered": (gathered(x) - up(dense_x)).abs().max().item(),
        "embedding": (x - dense_x).abs().max().item(),
        "up_grad": (column.weight.grad + gathered.weight.grad - up.weight.grad[rows]).abs().max().item(),
        "down_grad": (row.weight.grad - down.weight.grad[:, rows]).abs().max().item(),
        "down_bias_grad": (row.bias.grad - down.bias.grad).abs().max().item(),
        "embedding_grad": (vocab.weight.grad - embedding.weight.grad[vocab.start : vocab.end]).abs().max().item(),
    }


def model_experiment(grid, family):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=64, eos_token_id=0)).double()
    model = parallel.tensor_parallel(copy.deepcopy(dense), grid.tp_group)
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    dense_out = dense(input_ids=ids, labels=ids)
    dense_out.loss.backward()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    # Clipping by the global norm: shards summed over the group, replicated parameters once.
    dense_norm = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.05)
    norm = parallel.data_parallel(model, None, 0, tp_group=grid.tp_group).clip_grad_norm_(0.05)
    dense_grads = {n: p.grad for n, p in dense.named_parameters()}
    grads = parallel.tensor_parallel_state_dict(model, grid.tp_group, grads=True)
    state = parallel.tensor_parallel_state_dict(model, grid.tp_group)

    # Vocabulary-parallel log-probs from the head's shard never build whole logits.
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
        sharded = kernels.fused_logprobs(
            hidden, model.get_output_embeddings().weight, ids[:, 1:], group=grid.tp_group, compile=False
        )
        expected = torch.log_softmax(dense(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        generated = model.generate(ids[:, :3], max_new_tokens=6, do_sample=False, pad_token_id=0)
        dense_generated = dense.generate(ids[:, :3], max_new_tokens=6, do_sample=False, pad_token_id=0)
        reloaded = AutoModelForCausalLM.from_config(dense.config).double()
        missing, unexpected = reloaded.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
        reloaded.tie_weights()
        reloaded_logits = reloaded(input_ids=ids).logits
    return {
        "logits": (out.logits - dense_out.logits).abs().max().item(),
        "norm": abs(norm.item() - dense_norm.item()),
        "clipped": dense_norm.item() > 0.05,
        "loss": abs(out.loss.item() - dense_out.loss.item()),
        "grad_names": set(dense_grads) == set(grads),
        "grads": max((grads[n] - dense_grads[n]).abs().max().item() for n in dense_grads),
        "grad_scale": max(g.abs().max().item() for g in dense_grads.values()),
        "logprobs": (sharded - expected).abs().max().item(),
        "generated": generated.tolist(),
        "dense_generated": dense_generated.tolist(),
        "reloaded": (reloaded_logits - dense_out.logits).abs().max().item(),
        "local_parameters": sum(p.numel() for p in model.parameters()),
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
    }


def test_parallel_layers_equal_dense_layers():
    for result in spawn(2, layers_experiment, tp=2):
        assert isinstance(result, dict), result
        for name, difference in result.items():
            assert difference <= TOLERANCE, f"{name} differs by {difference:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_tensor_parallel_model_equals_dense(family):
    """Logits, loss, every parameter's gradient, vocabulary-parallel log-probs, greedy generation
    and the reassembled state dict of a 2-way tensor-parallel model match the dense model (Llama
    with 4 query and 2 key/value heads: one KV head per rank)."""
    results = spawn(2, model_experiment, tp=2, family=family)
    for result in results:
        assert isinstance(result, dict), result
        assert result["grad_names"]
        assert result["grad_scale"] > 1e-4 and result["clipped"]
        for name in ("logits", "loss", "norm", "grads", "logprobs", "reloaded"):
            assert result[name] <= TOLERANCE, f"{family}: {name} differs by {result[name]:.3g}"
        assert result["generated"] == result["dense_generated"]
        assert result["local_parameters"] < 0.75 * result["dense_parameters"]
    assert results[0]["generated"] == results[1]["generated"]


def meta_experiment(grid, family):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=64, eos_token_id=0))
    parallel.tensor_parallel(model, grid.tp_group)
    return [
        name
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
        if tensor.device.type != "meta"
    ]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tensor_parallel_builds_every_tensor_where_the_model_is(family):
    """A model on the meta device stands for one on a GPU: after the rewrite no tensor of it may be
    on the CPU (the index buffers were, and data parallel's broadcast of buffers, which NCCL
    refuses for CPU tensors, then crashed)."""
    for elsewhere in spawn(2, meta_experiment, tp=2, family=family):
        assert elsewhere == [], elsewhere


def test_gradient_clipping_on_a_rank_with_nothing_to_train_stays_on_the_module_device(monkeypatch):
    """Hydra's frozen first pipeline stage has no gradient, yet its squared-norm sum goes through
    the pipeline group's all-reduce: it must be made on the module's device (it was on the CPU,
    which NCCL refuses). A meta-device module stands for a GPU one; the collective is recorded."""
    devices = []
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda tensor, group=None: devices.append(tensor.device))
    frozen = torch.nn.Linear(4, 4, device="meta").requires_grad_(False)
    wrapper = parallel.DataParallel(frozen, group=None, pp_group=object())
    wrapper.clip_grad_norm_(1.0)
    assert devices == [torch.device("meta")]
