"""parallel.py against single-process training and against torch's own DDP and FSDP2, on CPU
with gloo, in fp64 so that equality can be asserted to ~1e-12.

Each world size runs once, as processes of its own, through a battery of experiments whose results
(plain tensors) come back to the parent; the tests below then assert on them. Every experiment
also recomputes the single-process reference inside the worker, on the whole global batch."""

import ctypes
import io
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import parallel

TOLERANCE = dict(rtol=0, atol=1e-12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, experiment, args, queue):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        grid = parallel.init_distributed(
            "cpu", tp=args.get("tp", 1), cp=args.get("cp", 1), timeout_s=args.get("timeout_s", 120)
        )
        result = experiment(grid, **{k: v for k, v in args.items() if k not in ("timeout_s", "tp", "cp")})
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except BaseException as error:  # report, never hang the parent
        result = RuntimeError(f"rank {rank}: {type(error).__name__}: {error}")
    # As bytes: a tensor sent through a queue by shared memory dies with its sender.
    buffer = io.BytesIO()
    torch.save(result, buffer)
    queue.put((rank, buffer.getvalue()))


def spawn(world: int, experiment, timeout: float = 300, **args) -> list:
    """Run experiment(grid, **args) on `world` gloo ranks; the per-rank results, rank order. The ranks
    are forked from conftest's forkserver, which has imported torch and transformers once (a fresh
    interpreter per rank spent about 5 s of CPU on those imports) and runs no torch op, so each rank
    starts with no threads, as a spawned one does."""
    context = mp.get_context("forkserver")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(r, world, port, experiment, args, queue)) for r in range(world)]
    for p in processes:
        p.start()
    results, deadline = {}, time.time() + timeout
    try:
        while len(results) < world and time.time() < deadline:
            try:
                rank, result = queue.get(timeout=1.0)
                results[rank] = torch.load(io.BytesIO(result), weights_only=False)
            except Exception:  # queue.Empty: stop waiting once every process has exited
                if not any(p.is_alive() for p in processes) and queue.empty():
                    break
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results.get(r) for r in range(world)]  # None: that rank died without a result


# ---------------------------------------------------------------------------------------------
# The model and data every experiment uses
# ---------------------------------------------------------------------------------------------
def tiny_gpt2(seed=0, layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=layers,
        n_embd=16,
        n_head=2,
        vocab_size=61,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).double()


def global_batch(seed=1, rows=8, width=10):
    return torch.randint(0, 61, (rows, width), generator=torch.Generator().manual_seed(seed))


def batch_loss(model, input_ids):
    """Mean next-token loss of the rows; every rank's slice has the same number of tokens, so the
    mean over ranks of per-rank means is the global mean."""
    return model(input_ids=input_ids, labels=input_ids).loss


def local_rows(batch, grid):
    rows = batch.shape[0] // grid.dp_size
    return batch[grid.dp_rank * rows : (grid.dp_rank + 1) * rows]


def full_parameters(wrapper) -> dict:
    with wrapper.gathered():
        return {name: p.detach().clone() for name, p in wrapper.module.named_parameters()}


def train(wrapper, optimizer, batches: list, grid, micro_batches: int, max_norm: float):
    """Optimizer steps over global batches; each rank takes its rows, in micro-batches."""
    norms = []
    for batch in batches:
        rows = local_rows(batch, grid)
        pieces = rows.chunk(micro_batches)
        for i, piece in enumerate(pieces):
            context = wrapper.no_sync() if i < len(pieces) - 1 else torch.enable_grad()
            with context:
                (batch_loss(wrapper, piece) / len(pieces)).backward()
        norms.append(float(wrapper.clip_grad_norm_(max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def reference_training(model, batches: list, max_norm: float, lr: float):
    """Single process, whole global batch, torch's own clipping and AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    norms = []
    for batch in batches:
        batch_loss(model, batch).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, norms


# ---------------------------------------------------------------------------------------------
# Experiments (run inside the spawned ranks)
# ---------------------------------------------------------------------------------------------
def gradients_experiment(grid):
    """One backward: ours, torch DDP's, and the single-process gradient of the whole batch."""
    from torch.nn.parallel import DistributedDataParallel

    batch = global_batch()
    reference = tiny_gpt2()
    batch_loss(reference, batch).backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}

    ours = parallel.DataParallel(tiny_gpt2(), grid.dp_group, zero_stage=0, bucket_mb=0.002)  # several buckets
    batch_loss(ours, local_rows(batch, grid)).backward()
    theirs = DistributedDataParallel(tiny_gpt2())
    batch_loss(theirs, local_rows(batch, grid)).backward()
    return {
        "buckets": len(ours.buckets),
        "ours": {n: p.grad.clone() for n, p in ours.module.named_parameters()},
        "torch_ddp": {n: p.grad.clone() for n, p in theirs.module.named_parameters()},
        "single": expected,
    }


def training_experiment(grid, stages=(0, 1, 2, 3), steps=3, micro_batches=2, freeze=False, fsdp=True):
    """AdamW steps with clipping under each ZeRO stage, against a single process and FSDP2."""
    batches = [global_batch(seed=s) for s in range(steps)]
    lr, max_norm = 1e-2, 0.5  # small max_norm so clipping really scales

    def prepare(model):
        if freeze:  # a frozen block (Hydra-style) and a parameter no forward uses
            for p in model.transformer.h[0].parameters():
                p.requires_grad_(False)
            model.register_parameter("unused", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)))
        return model

    expected, expected_norms = reference_training(prepare(tiny_gpt2()), batches, max_norm, lr)
    results = {"single": expected, "single_norms": expected_norms}
    for stage in stages:
        wrapper = parallel.data_parallel(prepare(tiny_gpt2()), grid.dp_group, stage)
        optimizer = wrapper.make_optimizer(torch.optim.AdamW, lr=lr, weight_decay=0.1)
        norms = train(wrapper, optimizer, batches, grid, micro_batches, max_norm)
        results[f"stage{stage}"] = full_parameters(wrapper)
        results[f"stage{stage}_norms"] = norms
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = prepare(tiny_gpt2())
        mesh = init_device_mesh("cpu", (grid.world_size,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        for batch in batches:
            batch_loss(model, local_rows(batch, grid)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results["fsdp2"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return results


def memory_experiment(grid):
    """Bytes a rank holds once backward has produced the gradients of a second step: parameters,
    gradients and optimizer state (created by the first step)."""

    def held(wrapper, optimizer):
        storages = {}
        tensors = list(wrapper.module.parameters()) + wrapper.optimizer_parameters()
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [b.grads for b in getattr(wrapper, "buckets", []) if b.grads is not None]
        tensors += [
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
        ]
        for t in tensors:  # count each storage once (views share one)
            storage = t.untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        return sum(storages.values())

    result = {"numel": sum(p.numel() for p in tiny_gpt2(layers=6).parameters())}
    for stage in (0, 1, 2, 3):
        wrapper = parallel.data_parallel(tiny_gpt2(layers=6), grid.dp_group, stage)
        optimizer = wrapper.make_optimizer(torch.optim.AdamW, lr=1e-3)
        train(wrapper, optimizer, [global_batch()], grid, micro_batches=1, max_norm=1.0)
        batch_loss(wrapper, local_rows(global_batch(seed=2), grid)).backward()
        result[stage] = held(wrapper, optimizer)
    return result


def dead_rank_experiment(grid, stall=False):
    """Rank 1 dies (or, with stall, stays alive but never joins) before a collective; rank 0 must
    get a clear error, not hang."""
    if grid.rank == 1:
        if stall:
            time.sleep(12)
            return None
        os._exit(3)
    started = time.time()
    try:
        with parallel.clean_exit():
            parallel.all_reduce_sum(torch.ones(1), grid.dp_group)
            parallel.all_reduce_sum(torch.ones(1), grid.dp_group)
    except SystemExit as error:
        return {"message": str(error), "seconds": time.time() - started}
    return {"message": None, "seconds": time.time() - started}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def assert_close_dicts(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys()
    for name in expected:
        difference = (actual[name] - expected[name]).abs().max().item()
        assert difference <= 1e-12, f"{what}: {name} differs by {difference:.3g}"


def test_ddp_gradients_equal_single_process_and_torch_ddp():
    for rank_result in spawn(2, gradients_experiment):
        assert not isinstance(rank_result, BaseException), rank_result
        assert rank_result["buckets"] > 3
        assert_close_dicts(rank_result["ours"], rank_result["single"], "DDP vs single process")
        assert_close_dicts(rank_result["ours"], rank_result["torch_ddp"], "DDP vs torch DDP")


@pytest.fixture(scope="module")
def two_rank_training():
    results = spawn(2, training_experiment)
    for r in results:
        assert not isinstance(r, BaseException), r
    return results


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_training_equals_single_process(two_rank_training, stage):
    """Three AdamW steps, two micro-batches per rank under no_sync, clipped: every stage ends
    where one process on the whole batch ends, with the same gradient norms."""
    for result in two_rank_training:
        assert_close_dicts(result[f"stage{stage}"], result["single"], f"ZeRO-{stage} vs single process")
        assert result[f"stage{stage}_norms"] == pytest.approx(result["single_norms"], rel=1e-12)
        assert result["single_norms"][0] > 0.5, "clipping never engaged; the test would not see a wrong norm"


def test_zero3_equals_torch_fsdp2(two_rank_training):
    for result in two_rank_training:
        assert_close_dicts(result["stage3"], result["fsdp2"], "ZeRO-3 vs FSDP2")


def test_four_ranks_frozen_and_unused_parameters():
    """World size 4, a frozen block and a parameter that never gets a gradient: no hang, and every
    stage still equals the single process (ZeRO stages step the unused parameter with a zero
    gradient, which AdamW's weight decay then shrinks, so it is compared separately)."""
    results = spawn(4, training_experiment, steps=2, freeze=True, fsdp=False)
    for result in results:
        assert not isinstance(result, BaseException), result
        for stage in (0, 1, 2, 3):
            actual = {k: v for k, v in result[f"stage{stage}"].items() if k != "unused"}
            expected = {k: v for k, v in result["single"].items() if k != "unused"}
            assert_close_dicts(actual, expected, f"ZeRO-{stage}, 4 ranks, frozen block")
        assert torch.equal(result["stage0"]["unused"], torch.ones(3, dtype=torch.float64))  # skipped, like one process


def test_zero3_holds_a_world_fraction_of_the_state():
    world = 2
    for result in spawn(world, memory_experiment):
        assert not isinstance(result, BaseException), result
        per_parameter = {stage: result[stage] / result["numel"] for stage in (0, 1, 2, 3)}
        # fp64: 8 bytes of parameter, 8 of gradient, 16 of AdamW moments
        assert per_parameter[0] == pytest.approx(8 + 8 + 16, rel=0.02)
        assert per_parameter[1] == pytest.approx(8 + 8 + 16 / world, rel=0.02)
        assert per_parameter[2] == pytest.approx(8 + (8 + 16) / world, rel=0.02)
        assert per_parameter[3] == pytest.approx((8 + 8 + 16) / world, rel=0.02)


def freed_memory_experiment(grid):
    """The bytes glibc holds from the OS (its heaps and its blocks mapped alone), while blocks the size of a step's
    gradients are held and once they are freed, four times over."""

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        ]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Mallinfo2

    def from_os():
        counts = mallinfo2()
        return counts.arena + counts.hblkhd

    held_and_freed = []
    for _ in range(4):
        blocks = [torch.ones(2**21) for _ in range(8)]  # 8 MiB each, 64 MiB in all, then freed together
        held = from_os()
        del blocks
        held_and_freed.append((held, from_os()))
    return held_and_freed


@pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc's allocator, 2.33 or newer"
)
def test_a_cpu_process_keeps_freed_memory_for_the_next_step():
    """Blocks freed and asked for again, as a step's gradients are, stay in the process, as CUDA's caching allocator
    keeps them: by default glibc returns them to the OS, and each 4 KiB page of the next step's then faults anew. The
    test reads glibc's own count rather than page faults, which depend on the heap's past (an earlier test's leftovers
    split the free space) and on the kernel."""
    (held_and_freed,) = spawn(1, freed_memory_experiment)
    assert not isinstance(held_and_freed, BaseException), held_and_freed
    for held, freed in held_and_freed:
        assert freed == held, f"freeing 64 MiB gave {(held - freed) / 2**20:.1f} MiB back to the OS: {held_and_freed}"


def test_dead_rank_gives_a_clear_error_within_the_timeout():
    result = spawn(2, dead_rank_experiment, timeout_s=10, timeout=120)
    assert isinstance(result[0], dict), result[0]
    assert result[0]["message"] is not None, "the collective succeeded without its peer"
    assert result[0]["message"].startswith("error: rank 0: a collective failed")
    assert result[0]["seconds"] < 60


def test_stalled_rank_times_out_with_a_clear_error():
    result = spawn(2, dead_rank_experiment, stall=True, timeout_s=3, timeout=120)
    assert isinstance(result[0], dict), result[0]
    assert result[0]["message"] is not None and result[0]["message"].startswith("error: rank 0: a collective failed")
    assert 2 < result[0]["seconds"] < 10, "the timeout was not applied"


def _write_streamed(grid, folder):
    """Stream a ZeRO-3 model into files of at most 4 kB and hash them (test below); the files this rank wrote."""
    import safetensors.torch

    written, save_file = [], safetensors.torch.save_file
    safetensors.torch.save_file = lambda tensors, path, **kw: (written.append(path), save_file(tensors, path, **kw))
    wrapper = parallel.data_parallel(tiny_gpt2(), grid.dp_group, 3)
    parallel.write_safetensors(folder, "model", parallel.dense_tensors(wrapper.module, wrapper, grid), grid, 4000)
    parallel.barrier()
    parallel.write_manifest(folder, grid)
    return written


def test_ranks_share_the_writing_of_a_streamed_checkpoint(tmp_path):
    """Every rank writes its share of a checkpoint's files (file i by rank i % 2) and hashes a share for the
    manifest: each file is written once, by its rank; together they hold the dense model bitwise (the tied head
    left out, as save_pretrained leaves it), with the index transformers reads, and the manifest finds them intact."""
    written = spawn(2, _write_streamed, folder=str(tmp_path))
    parts = sorted((int(path.rsplit("part", 1)[1]), rank) for rank, paths in enumerate(written) for path in paths)
    assert [part for part, _ in parts] == list(range(len(parts))) and len(parts) > 6
    assert all(rank == part % 2 for part, rank in parts)
    stored = dict(parallel.stored_tensors(str(tmp_path), "model"))
    expected = {k: v for k, v in tiny_gpt2().state_dict().items() if k != "lm_head.weight"}
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], v) for k, v in expected.items())
    assert parallel.checkpoint_damage(str(tmp_path)) is None
    assert len(os.listdir(tmp_path)) == len(parts) + 2  # the shards, the index, the manifest


@pytest.mark.parametrize("groups", [False, True], ids=["one-process", "grouped"])
def test_clipping_scales_as_torch_and_leaves_gradients_under_the_limit_alone(groups, monkeypatch):
    """Above the limit every gradient is torch's clip_grad_norm_'s bitwise; under it none is written
    (its version counter stays), since multiplying by exactly 1 only costs a pass over the gradients."""
    torch.manual_seed(0)
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda tensor, group=None: tensor)  # one rank: the sum is itself
    for max_norm in (0.5, 100.0):
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, twin in zip(params, twins):
            p.grad = torch.randn_like(p)
            twin.grad = p.grad.clone()
        versions = [p.grad._version for p in params]
        norm = parallel._clip_grads(params, max_norm, ["group"] if groups else [])
        expected = torch.nn.utils.clip_grad_norm_(twins, max_norm)
        assert 1 < float(expected) < 100
        torch.testing.assert_close(norm, expected, rtol=1e-6 if groups else 0, atol=0)  # grouped sums in fp64
        for p, twin, version in zip(params, twins, versions):
            if max_norm < float(expected):
                torch.testing.assert_close(p.grad, twin.grad, rtol=1e-6 if groups else 0, atol=0)
            else:
                assert p.grad._version == version and torch.equal(p.grad, twin.grad)
