"""Pipeline parallel (parallel.PipelineStage, pipeline_afab, pipeline_1f1b) against one backward of
the whole batch on the dense model, on gloo ranks in fp64: the loss and the gradient of every
parameter of every stage, to ~1e-12, for GPT-2 (tied embeddings), Llama (GQA) and GPT-NeoX.

Each world size is spawned once (a session fixture) and runs every layout and schedule; the tests
below assert on what comes back. World 2: pp=2 with 3 layers (an uneven 2 + 1 split). World 4:
pp=4 with 5 layers (2 + 1 + 1 + 1), and pp=2 x dp=2 with the stages wrapped in DataParallel."""

import copy
import gc
import time
import weakref

import pytest
import torch

import parallel
from test_parallel import spawn

TOLERANCE = 1e-12
FAMILIES = ("gpt2", "llama", "gpt-neox")
SCHEDULES = {"afab": parallel.pipeline_afab, "1f1b": parallel.pipeline_1f1b}
VOCAB = 64


def dense_model(family: str, layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config(family, vocab_size=VOCAB, eos_token_id=0)
    config.num_hidden_layers = layers  # n_layer for GPT-2: its config maps the name
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).double()


def make_batch(rows: int = 8, length: int = 9, seed: int = 1) -> dict:
    """Left-padded rows of different lengths, so that a stage that did not rebuild the padding
    mask would let real tokens attend to padding and differ from the dense model."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    pads = torch.randint(0, length - 3, (rows,), generator=generator)
    attention_mask = (torch.arange(length)[None, :] >= pads[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_rows(batch: dict, pieces: int, piece: int) -> dict:
    rows = batch["input_ids"].shape[0] // pieces
    return {k: v[piece * rows : (piece + 1) * rows] for k, v in batch.items()}


def micro_batches(batch: dict, count: int) -> list:
    return [split_rows(batch, count, i) for i in range(count)]


def dense_reference(dense, batch: dict):
    """One forward and backward of the whole batch; the loss is the mean over its labelled tokens."""
    logits = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = parallel.causal_lm_loss(logits, batch["labels"], parallel.count_label_tokens([batch]))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in dense.named_parameters(remove_duplicate=False)}


def compare(stage, loss, dense_loss, dense_grads) -> dict:
    names = [name for name, _ in stage.model.named_parameters()]
    grads = {name: p.grad for name, p in stage.model.named_parameters()}
    missing = [name for name, grad in grads.items() if grad is None]
    assert not missing, f"no gradient for {missing}"
    return {
        "loss": abs(loss.item() - dense_loss.item()),
        "grads": max((grads[n] - dense_grads[n]).abs().max().item() for n in names),
        "grad_scale": max(g.abs().max().item() for g in grads.values()),
        "names": names,
    }


def pipeline_experiment(grid, layouts: list, dropping: bool = False, gathering: bool = False) -> dict:
    """For each (family, layers, pp, micro-batch count, data parallel): the dense reference and
    both schedules on this rank's stage. With dropping, also dropping_experiment on pp=2; with
    gathering, gathering_experiment on tp=2 x pp=2."""
    results = {"dropping": dropping_experiment(2)} if dropping else {}
    if gathering:
        results["gathering"] = gathering_experiment()
    for family, layers, pp, count, data_parallel in layouts:
        grid = parallel.init_distributed("cpu", pp=pp, timeout_s=60)  # new groups on the same world
        batch = make_batch()
        dense = dense_model(family, layers)
        dense_loss, dense_grads = dense_reference(dense, batch)
        local = split_rows(batch, grid.dp_size, grid.dp_rank)
        # Each data-parallel rank's share is scaled by dp because DataParallel averages gradients.
        num_tokens = parallel.count_label_tokens([batch]) / grid.dp_size
        # GPT-NeoX's last stage returns the final hidden states and the loss applies the head itself.
        compute_logits = family != "gpt-neox"

        def loss_fn(output, mb):
            logits = output if compute_logits else stage.head(output)
            return parallel.causal_lm_loss(logits, mb["labels"], num_tokens)

        for schedule_name, schedule in SCHEDULES.items():
            model = copy.deepcopy(dense)
            model.zero_grad(set_to_none=True)
            stage = parallel.PipelineStage(model, grid.pp_group, compute_logits=compute_logits)
            wrapped = parallel.DataParallel(stage, grid.dp_group) if data_parallel else stage
            timings = {}
            loss = schedule(wrapped, micro_batches(local, count), loss_fn, timings=timings)
            loss = parallel.all_reduce_sum(loss.clone(), grid.dp_group) / grid.dp_size
            result = compare(stage, loss, dense_loss, dense_grads)
            result.update(
                layers=list(stage.layer_indices),
                timings=timings,
                pp_rank=grid.pp_rank,
                dp_rank=grid.dp_rank,
                parameters=sum(p.numel() for p in stage.parameters()),
                dense_parameters=sum(p.numel() for p in dense.parameters()),
            )
            results[(family, layers, pp, count, data_parallel, schedule_name)] = result
    return results


def dropping_experiment(pp: int) -> dict:
    """A stage built from a model nobody else holds frees the other stages' weights."""
    grid = parallel.init_distributed("cpu", pp=pp, timeout_s=60)
    model = dense_model("llama", layers=3)
    other = 2 if grid.pp_rank == 0 else 0
    dropped = [weakref.ref(model.model.layers[other].self_attn.q_proj.weight)]
    dropped.append(weakref.ref(model.lm_head.weight if grid.pp_rank == 0 else model.model.embed_tokens.weight))
    stage = parallel.PipelineStage(model, grid.pp_group)
    del model
    gc.collect()
    return {"alive": [ref() is not None for ref in dropped], "keys": sorted(stage.model.state_dict())}


def gathering_experiment() -> dict:
    """Whole copies gathered from tp=2 x pp=2 stages of each family: the one still split over tp
    (what ppo.py generates with) and the dense one (what the scripts save) give the dense model's
    logits, and making them leaves the RNG where it was. Under bf16 autocast, a copy of an fp32
    model with its matmul weights stored in bf16 (what ppo.py samples from under --pp --dtype bf16)
    computes bit for bit what the fp32 copy computes, and one cast whole to bf16 does not."""
    grid = parallel.init_distributed("cpu", tp=2, pp=2, timeout_s=60)
    batch = make_batch()
    results = {}
    for family in FAMILIES:
        dense = dense_model(family, layers=3)
        with torch.no_grad():
            expected = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        stage = parallel.PipelineStage(parallel.tensor_parallel(copy.deepcopy(dense), grid.tp_group), grid.pp_group)
        for keep in (True, False):
            rng = torch.get_rng_state()
            whole = parallel.pipeline_gathered_model(stage, grid.tp_group, keep_tensor_parallel=keep)
            with torch.no_grad():
                logits = whole(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            results[(family, keep)] = {
                "error": (logits - expected).abs().max().item(),
                "rng_kept": torch.equal(rng, torch.get_rng_state()),
                "split": any(isinstance(m, parallel.ColumnParallelLinear) for m in whole.modules()),
                "parameters": sum(p.numel() for p in whole.parameters()),
                "dense_parameters": sum(p.numel() for p in dense.parameters()),
            }
        stage = parallel.PipelineStage(
            parallel.tensor_parallel(copy.deepcopy(dense).float(), grid.tp_group), grid.pp_group
        )
        copies = [  # split over tp, as ppo.py's
            parallel.pipeline_gathered_model(stage, grid.tp_group, keep_tensor_parallel=True, matmul_dtype=dtype)
            for dtype in (None, torch.bfloat16)
        ]
        copies.append(parallel.pipeline_gathered_model(stage, grid.tp_group, keep_tensor_parallel=True).bfloat16())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fp32, matmul_bf16, whole_bf16 = (
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for m in copies
            )
        results[(family, True)]["bf16_matmul_weights_same"] = torch.equal(fp32, matmul_bf16)
        results[(family, True)]["whole_bf16_differs"] = not torch.equal(fp32, whole_bf16)
    return results


WORLD_2 = [(family, 3, 2, 4, False) for family in FAMILIES] + [
    ("gpt2", 2, 2, 1, False)
]  # one micro-batch: no steady state
WORLD_4 = [(family, 5, 4, 4, False) for family in ("gpt2", "llama")] + [
    ("gpt-neox", 5, 4, 8, False),
    ("gpt2", 3, 2, 2, True),
    ("llama", 3, 2, 2, True),
]


def run_world(world: int, layouts: list, **args):
    started = time.time()
    results = spawn(world, pipeline_experiment, layouts=layouts, timeout=240, **args)
    for rank, result in enumerate(results):
        assert isinstance(result, dict), f"rank {rank}: {result}"
    print(f"world {world}: {time.time() - started:.1f} s")
    return results


@pytest.fixture(scope="module")
def world_2():
    return run_world(2, WORLD_2, dropping=True)


@pytest.fixture(scope="module")
def world_4():
    return run_world(4, WORLD_4, gathering=True)


def max_in_flight(order: list) -> int:
    """The most micro-batches whose activations a stage held at once (forwarded, not yet back-propagated)."""
    held, most = set(), 0
    for step, index in order:
        held.add(index) if step == "F" else held.remove(index)
        most = max(most, len(held))
    return most


def expected_in_flight(key: tuple, pp_rank: int) -> int:
    """GPipe holds every micro-batch; 1F1B at most pp - pp_rank (the warm-up forwards and one more)."""
    pp, count, schedule = key[2], key[3], key[5]
    return count if schedule == "afab" else min(pp - pp_rank, count)


def check_layout(results: list, key: tuple):
    family, layers, pp = key[:3]
    per_rank = [r[key] for r in results]
    for r in per_rank:
        assert r["loss"] <= TOLERANCE, f"{key}: loss differs by {r['loss']:.3g}"
        assert r["grads"] <= TOLERANCE, f"{key}: gradients differ by {r['grads']:.3g}"
        assert r["grad_scale"] > 1e-3
        assert 0.0 <= r["timings"]["bubble"] < 1.0 and r["timings"]["busy"] > 0
        assert max_in_flight(r["timings"]["order"]) == expected_in_flight(key, r["pp_rank"]), r["timings"]["order"]
    model = dense_model(family, layers)
    dense, aliases = (
        {n for n, _ in model.named_parameters()},
        {n for n, _ in model.named_parameters(remove_duplicate=False)},
    )
    for dp_rank in {r["dp_rank"] for r in per_rank}:
        stages = sorted((r for r in per_rank if r["dp_rank"] == dp_rank), key=lambda r: r["pp_rank"])
        # Every dense parameter on some stage; GPT-2's last stage holds the tied head as lm_head.weight.
        covered = {name for r in stages for name in r["names"]}
        assert dense <= covered <= aliases, f"{key}: missing {dense - covered}, extra {covered - aliases}"
        assert [i for r in stages for i in r["layers"]] == list(range(layers))
        assert [len(r["layers"]) for r in stages] == [len(parallel.stage_layers(layers, pp, s)) for s in range(pp)]
        assert all(r["parameters"] < r["dense_parameters"] for r in stages)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("layout", WORLD_2, ids=lambda case: f"{case[0]}-{case[1]}layers-pp{case[2]}-m{case[3]}")
def test_two_stages_equal_dense(world_2, layout, schedule):
    """pp=2: 3 layers split 2 + 1 over 4 micro-batches, and a single micro-batch (1F1B without
    steady state), for every family."""
    check_layout(world_2, (*layout, schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "layout", WORLD_4, ids=lambda case: f"{case[0]}-{case[1]}layers-pp{case[2]}-m{case[3]}{'-dp2' if case[4] else ''}"
)
def test_four_ranks_equal_dense(world_4, layout, schedule):
    """pp=4 (5 layers: 2 + 1 + 1 + 1; GPT-2's tied embedding between the first and the fourth
    stage), and pp=2 x dp=2 with DataParallel reducing over the dp group on the last backward."""
    check_layout(world_4, (*layout, schedule))


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_copies_gathered_from_the_stages_equal_dense(world_4, family):
    for rank, result in enumerate(world_4):
        split, dense = result["gathering"][(family, True)], result["gathering"][(family, False)]
        assert split["error"] <= TOLERANCE and dense["error"] <= TOLERANCE, (rank, split["error"], dense["error"])
        assert split["rng_kept"] and dense["rng_kept"]
        assert split["split"] and not dense["split"]
        assert split["parameters"] < dense["parameters"] == dense["dense_parameters"]
        assert split["bf16_matmul_weights_same"] and split["whole_bf16_differs"], rank


def test_stage_drops_other_stages_parameters(world_2):
    """Llama, 3 layers on 2 stages: the weights of the other stage's layers and of the embedding
    or head are freed (weak references die), and the state dict is the stage's share under the
    dense names."""
    first, last = (r["dropping"] for r in world_2)
    assert first["alive"] == [False, False] and last["alive"] == [False, False]
    assert "model.embed_tokens.weight" in first["keys"] and "lm_head.weight" not in first["keys"]
    assert "lm_head.weight" in last["keys"] and "model.embed_tokens.weight" not in last["keys"]
    assert {k.split(".")[2] for k in first["keys"] if k.startswith("model.layers.")} == {"0", "1"}
    assert {k.split(".")[2] for k in last["keys"] if k.startswith("model.layers.")} == {"2"}


def test_stage_layers_and_bubble():
    assert [list(parallel.stage_layers(5, 4, s)) for s in range(4)] == [[0, 1], [2], [3], [4]]
    assert [list(parallel.stage_layers(3, 2, s)) for s in range(2)] == [[0, 1], [2]]
    assert [list(parallel.stage_layers(8, 4, s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(SystemExit):
        parallel.stage_layers(2, 3, 0)
    assert parallel.bubble_fraction(1, 8) == 0.0
    assert parallel.bubble_fraction(4, 8) == pytest.approx(3 / 11)
