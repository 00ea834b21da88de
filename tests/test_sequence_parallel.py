"""Sequence parallel (Megatron, over the tensor-parallel group) and context parallel (Ulysses)
against the dense model, on 2 and 4 gloo ranks in fp64: logits, loss, every gradient (also where
an unsplit pass, one with a KV cache, runs between a split pass and its backward) and greedy
generation, for GPT-2, Llama (grouped-query attention) and GPT-NeoX, on a left-padded batch whose
length (11) divides by neither 2 nor 4; and with dropout, that each shard of a sequence draws its
own masks."""

import copy

import pytest
import torch

import parallel
from test_parallel import spawn

TOLERANCE = 1e-12
FAMILIES = ["gpt2", "llama", "gpt-neox"]


def left_padded_batch():
    """Three sequences of 11 tokens, the first two left-padded by 3 and 1, with the positions the
    scripts give them (counting from each sequence's first real token)."""
    ids = torch.randint(1, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def masked_loss(logits, ids, mask):
    """Next-token cross-entropy over real tokens, plus a term on every real position's logits so
    that each position's gradient differs."""
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    targets = mask[:, 1:].double()
    return -(logprobs * targets).sum() / targets.sum() + (logits.tanh().sum(-1) * mask).sum() * 1e-3


def split_experiment(grid, families, sequence_parallel):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    ids, mask, positions = left_padded_batch()
    results = {}
    for family in families:
        config = tiny_config(family, vocab_size=64, eos_token_id=0)
        if grid.world_size == 4:  # 8 heads, 4 of them key/value: whole heads for 4 ranks, still GQA
            config.update(dict(num_attention_heads=8, num_key_value_heads=4) if family == "llama" else {})
            config.update(dict(n_head=8) if family == "gpt2" else {})
            config.update(dict(num_attention_heads=8) if family == "gpt-neox" else {})
        torch.manual_seed(0)
        dense = AutoModelForCausalLM.from_config(config).double()
        model = parallel.tensor_parallel(copy.deepcopy(dense), grid.tp_group)
        if sequence_parallel:
            model = parallel.sequence_parallel(model, grid.tp_group)
        model = parallel.context_parallel(model, grid.cp_group, grid.tp_group)
        dense_logits = dense(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        whole = dense(input_ids=ids).logits  # and a batch without padding, mask or positions
        (masked_loss(dense_logits, ids, mask) + 2 * masked_loss(whole, ids, torch.ones_like(mask))).backward()
        lengths = []  # the sequence length the last decoder layer sees: the split is real
        hook = model.base_model.get_submodule("h" if family == "gpt2" else "layers")[-1].register_forward_pre_hook(
            lambda layer, args: lengths.append(args[0].shape[1])
        )
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        split_whole = model(input_ids=ids).logits
        hook.remove()
        # An unsplit pass (a KV cache) after the split ones, differentiated in the same backward: each
        # pass's gradients must be reduced as that pass ran, not as the latest did.
        cached = model(input_ids=ids, use_cache=True).logits
        ones = torch.ones_like(mask)
        (
            masked_loss(logits, ids, mask) + masked_loss(split_whole, ids, ones) + masked_loss(cached, ids, ones)
        ).backward()
        for param in model.parameters():  # what data parallel over dp x cp does: the mean over cp ranks
            param.grad = parallel.all_reduce_sum(param.grad, grid.cp_group) / grid.cp_size
        grads = parallel.tensor_parallel_state_dict(model, grid.tp_group, grads=True)
        with torch.no_grad():  # sampling uses the KV cache, and is not split
            greedy = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            generated, dense_generated = model.generate(ids, **greedy), dense.generate(ids, **greedy)
        real = mask.bool()
        results[family] = {
            "logits": max((logits - dense_logits)[real].abs().max().item(), (split_whole - whole).abs().max().item()),
            "grads": max((grads[n] - p.grad).abs().max().item() for n, p in dense.named_parameters()),
            "grad_names": set(grads) == {n for n, _ in dense.named_parameters()},
            "grad_scale": min(p.grad.abs().max().item() for p in dense.parameters()),
            "generated": generated.tolist() == dense_generated.tolist(),
            "layer_length": lengths[0],
        }
        if family == "gpt2":  # dropout before the layers (cut under cp) and in them (cut under cp and sp)
            masks, drops = {}, dict(embeddings=model.transformer.drop, layer=model.transformer.h[0].mlp.dropout)
            for name, drop in drops.items():
                drop.p = 0.5
                drop.register_forward_hook(lambda module, args, output, name=name: masks.update({name: output == 0}))
            with torch.no_grad():
                model(input_ids=ids)
            results[family]["dropout_masks"] = masks
    return results


LAYOUTS = [
    pytest.param(2, dict(tp=2), True, id="sp-tp2"),
    pytest.param(4, dict(tp=4), True, id="sp-tp4"),
    pytest.param(2, dict(cp=2), False, id="cp2"),
    pytest.param(4, dict(cp=4), False, id="cp4"),
    pytest.param(4, dict(cp=2, tp=2), True, id="cp2xsp-tp2"),
]


@pytest.mark.parametrize("world, layout, sequence_parallel", LAYOUTS)
def test_split_model_equals_dense(world, layout, sequence_parallel):
    results = spawn(world, split_experiment, families=FAMILIES, sequence_parallel=sequence_parallel, **layout)
    ranks_per_sequence = layout.get("cp", 1) * (layout.get("tp", 1) if sequence_parallel else 1)
    padded = -(-11 // ranks_per_sequence) * ranks_per_sequence
    for rank, result in enumerate(results):
        assert isinstance(result, dict), result
        for family, numbers in result.items():
            assert numbers["grad_names"] and numbers["grad_scale"] > 0 and numbers["generated"], (family, numbers)
            assert numbers["layer_length"] == padded // ranks_per_sequence, (family, numbers)
            for name in ("logits", "grads"):
                assert numbers[name] <= TOLERANCE, f"{family}, rank {rank}: {name} differ by {numbers[name]:.3g}"
    # Ranks are tp-innermost: rank // tp is the cp rank. Before the layers, the tp ranks of a cp rank
    # hold the same positions and must drop the same elements; every other pair holds different positions.
    tp, masks = layout.get("tp", 1), [result["gpt2"]["dropout_masks"] for result in results]
    for a in range(world):
        for b in range(a):
            assert torch.equal(masks[a]["embeddings"], masks[b]["embeddings"]) == (a // tp == b // tp), (a, b)
            assert not torch.equal(masks[a]["layer"], masks[b]["layer"]), (a, b)


def test_heads_that_do_not_divide_are_refused_in_one_line(monkeypatch):
    """Ulysses gives each rank whole heads: 3 heads over --cp 2 stop before any hook is installed."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("gpt2", vocab_size=64, eos_token_id=0)
    config.update(dict(n_head=3, n_embd=24))
    model = AutoModelForCausalLM.from_config(config)
    monkeypatch.setattr(parallel, "group_size", lambda group: 1 if group is None else group)  # a group of 2 ranks
    with pytest.raises(SystemExit, match=r"^error: --cp 2 x --tp 1 = 2 must divide the attention heads \(3\)"):
        parallel.context_parallel(model, 2)
    assert getattr(model.base_model, "sequence_split", None) is None


def test_the_critic_splits_over_its_own_groups(tmp_path, monkeypatch):
    """ppo's separate critic is whole on every rank, never tensor-parallel: under --cp its heads are
    split over the cp ranks alone, so 2 heads suit cp 2 beside a policy of 4 heads on cp 2 x tp 2."""
    from transformers import AutoModel, AutoModelForCausalLM

    import ppo
    from conftest import tiny_config

    policy = AutoModelForCausalLM.from_config(tiny_config("gpt2", vocab_size=64, eos_token_id=0))
    critic_config = tiny_config("gpt2", vocab_size=64, eos_token_id=0)
    critic_config.update(dict(n_head=2))
    AutoModel.from_config(critic_config).save_pretrained(tmp_path)
    monkeypatch.setattr(parallel, "group_size", lambda group: 1 if group is None else group)  # groups of 2 ranks
    monkeypatch.setattr(parallel, "tensor_parallel", lambda model, group: model)  # the policy's split is not tested
    grid = parallel.Grid(tp_size=2, cp_size=2, tp_group=2, cp_group=2)
    args = ppo.Args(value_model=str(tmp_path), advantage="gae")
    models = ppo.build_models(args, grid, policy, None, torch.device("cpu"), torch.float32)
    critic_split = models.critic.trunk.sequence_split
    assert (critic_split.cp_group, critic_split.sp_group) == (2, None)
    assert models.policy.base_model.sequence_split.cp_group == 2
