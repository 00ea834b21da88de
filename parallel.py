"""Multi-GPU training written out on torch.distributed: data parallel and ZeRO stages 1 to 3.

Every algorithm script uses this file the same way:

    grid = parallel.init_distributed(args.device)            # reads torchrun's environment
    model = parallel.data_parallel(model, grid.dp_group, args.zero_stage)
    optimizer = model.make_optimizer(torch.optim.AdamW, lr=...)
    for micro_batch in batch:                                 # gradients are averaged over ranks
        with model.no_sync() if not last else nullcontext():  # when the last backward returns
            loss.backward()
    model.clip_grad_norm_(max_norm); optimizer.step()         # the step re-assembles shards

and a script started without torchrun is world size 1: every wrapper below is then a thin
pass-through and nothing is communicated.

What each ZeRO stage keeps on a rank (N ranks, fp32 master weights, AdamW's two fp32 moments):

    stage   parameters   gradients    optimizer state   bytes per parameter
    0       full         full         full              4 + 4 + 8     = 16
    1       full         full         1/N               4 + 4 + 8/N
    2       full         1/N          1/N               4 + (4 + 8)/N
    3       1/N          1/N          1/N               16/N (+ one block gathered at a time)

Mixed precision is torch.autocast: parameters, gradients and reductions stay fp32 (the master
weights), matmuls run in bf16. All collectives are NCCL on GPUs and gloo on CPUs; gloo makes the
tests run anywhere.
"""

import contextlib
import datetime
import math
import os
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """This rank's place in the (dp, pp, tp) grid. Ranks are laid out tensor-parallel innermost,
    rank = (dp_rank * pp_size + pp_rank) * tp_size + tp_rank, so the ranks of a tensor-parallel
    group (which talk every layer) sit on the same node. A group of size one is None."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_size: int = 1
    pp_size: int = 1
    tp_size: int = 1
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    tp_group: Optional[dist.ProcessGroup] = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, wandb, progress bars and the saved model."""
        return self.rank == 0


def init_distributed(device: str = "auto", tp: int = 1, pp: int = 1, timeout_s: float = 600.0) -> Grid:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment) and build the grid's groups. NCCL with CUDA, gloo otherwise. A collective that
    waits longer than timeout_s (a dead or stuck peer) raises instead of hanging forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        assert tp == 1 and pp == 1, "tensor and pipeline parallel need torchrun with more than one process"
        return Grid(device=device)
    if world_size % (tp * pp):
        raise SystemExit(f"error: {world_size} processes do not split into --tp {tp} x --pp {pp} groups; make the process count a multiple of {tp * pp}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    rank = dist.get_rank()
    dp = world_size // (tp * pp)
    dp_rank, rest = divmod(rank, pp * tp)
    pp_rank, tp_rank = divmod(rest, tp)

    def layout(d, p, t):
        return (d * pp + p) * tp + t

    # Every rank must call new_group for every group, in the same order, even those it is not in.
    groups = {}
    for name, members in (
        ("tp", [[layout(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)]),
        ("pp", [[layout(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)]),
        ("dp", [[layout(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]),
    ):
        for ranks in members:
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s)) if len(ranks) > 1 else None
            if rank in ranks:
                groups[name] = group
    return Grid(rank, world_size, local_rank, device, dp, pp, tp, dp_rank, pp_rank, tp_rank, groups["dp"], groups["pp"], groups["tp"])


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_reduce_sum(values: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum a tensor of statistics over the group (in place; a no-op for a group of one, None).
    Scripts sum
    (loss * count, count) pairs so that means over ranks weigh every token or sample equally."""
    if group is not None:
        dist.all_reduce(values, group=group)
    return values


def all_gather_objects(value, group: Optional[dist.ProcessGroup] = None) -> list:
    """Every rank's `value` (any picklable object), in rank order."""
    if group is None:
        return [value]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def broadcast_object(value, src: int = 0):
    """Rank src's `value` on every rank (e.g. a run name made from the clock)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def clean_exit():
    """Wrap a script's main(): a collective that fails (a peer process died, or nothing arrived
    within the timeout) becomes one line and exit status 1 instead of a traceback per rank, and
    the process group is torn down on the way out."""
    try:
        yield
    except RuntimeError as error:
        # gloo reports a dead peer as a plain RuntimeError, so judge by where it was raised.
        raised_in = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
        if not isinstance(error, dist.DistError) and not any(f"torch{os.sep}distributed{os.sep}" in name for name in raised_in):
            raise
        rank = os.environ.get("RANK", "0")
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: rank {rank}: a collective failed, most likely because another rank died or stalled past the timeout (look for the first rank that failed): {first_line}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Data parallel and ZeRO-1/2: gradients in flat buckets, reduced while backward is still running
# ---------------------------------------------------------------------------------------------
class _Bucket:
    """A run of consecutive parameters (in reverse registration order, roughly the order backward
    produces their gradients) whose gradients live in one flat buffer, so a whole bucket travels
    in one collective. Under ZeRO-1/2 the parameters live in one flat buffer too, and this rank
    owns the slice [rank * shard_size, (rank + 1) * shard_size) of it."""

    def __init__(self, params: list, world: int, rank: int, zero_stage: int):
        self.params = params
        self.offsets, numel = [], 0
        for param in params:
            self.offsets.append(numel)
            numel += param.numel()
        self.numel = numel
        self.padded = math.ceil(numel / world) * world  # reduce-scatter wants equal slices
        self.shard_size = self.padded // world
        self.rank = rank
        reference = params[0]
        self.dtype, self.device = reference.dtype, reference.device
        self.grads = None if zero_stage == 2 else torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        self.flat_params, self.shard = None, None
        if zero_stage >= 1:
            self.flat_params = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
            for param, offset in zip(params, self.offsets):
                self.flat_params[offset : offset + param.numel()].copy_(param.data.view(-1))
                param.data = self.flat_params[offset : offset + param.numel()].view_as(param)
            # The optimizer steps this view in place, i.e. this rank's slice of the flat parameters.
            self.shard = nn.Parameter(self.flat_params[rank * self.shard_size : (rank + 1) * self.shard_size])
        self.seen = set()  # positions whose gradient arrived in this backward
        self.touched = set()  # ... in this accumulation cycle (since the last reduction)
        self.work = None
        self.reduced = None  # reduce-scatter output, waiting to be added to the shard's gradient

    def grad_view(self, index: int) -> torch.Tensor:
        param, offset = self.params[index], self.offsets[index]
        return self.grads[offset : offset + param.numel()].view_as(param)


class DataParallel(nn.Module):
    """Data parallel with ZeRO stages 0, 1 and 2.

    Stage 0 (DDP): each parameter's .grad is a view into its bucket's flat buffer, so autograd
    accumulates straight into the buffer. When the last gradient of a bucket arrives (a
    post-accumulate-grad hook), an asynchronous all-reduce of the whole bucket starts while
    backward carries on with earlier layers; a callback queued on the autograd engine waits for
    all of them when backward ends. Buckets are launched strictly in order, because every rank must
    issue the same collectives in the same order.

    Stage 1: as stage 0, but a reduce-scatter instead of the all-reduce leaves each rank the
    averaged gradient of its slice only; the optimizer holds state for that slice, steps it, and an
    all-gather of the flat parameters after the step brings every rank the updated weights.

    Stage 2: as stage 1, but the full-size gradient buffer exists only while a backward runs: each
    parameter's gradient is copied into a temporary bucket buffer and dropped, the bucket is
    reduce-scattered as soon as it is complete, and the temporary buffer is freed, so between steps a
    rank keeps only its gradient slice. no_sync() cannot skip communication here (keeping full
    gradients across micro-batches is what stage 2 exists to avoid): every micro-batch is
    reduce-scattered and accumulated into the slice.

    Gradients are averaged over ranks, as torch's DistributedDataParallel does, so a loss that is
    each rank's mean over its share of the batch gives the gradient of the global mean.
    """

    def __init__(self, module: nn.Module, group: Optional[dist.ProcessGroup] = None, zero_stage: int = 0, bucket_mb: float = 25.0):
        super().__init__()
        assert zero_stage in (0, 1, 2), "stage 3 is FullyShardedDataParallel"
        self.module, self.group, self.zero_stage = module, group, zero_stage
        self.world = group_size(group)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.sync_gradients = True
        self.buckets: list = []
        if self.world == 1:
            return
        # Start from identical weights whatever each rank initialised (as torch DDP does).
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=dist.get_global_rank(group, 0), group=group)
        trainable = [p for p in module.parameters() if p.requires_grad][::-1]
        dtypes = {p.dtype for p in trainable}
        assert len(dtypes) <= 1, f"trainable parameters mix dtypes {dtypes}; keep fp32 master weights and use autocast"
        limit, current, size = bucket_mb * 2**20, [], 0
        for param in trainable:
            current.append(param)
            size += param.numel() * param.element_size()
            if size >= limit:
                self.buckets.append(_Bucket(current, self.world, self.rank, zero_stage))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current, self.world, self.rank, zero_stage))
        self.where = {}  # parameter -> (bucket index, position in bucket)
        for b, bucket in enumerate(self.buckets):
            for i, param in enumerate(bucket.params):
                self.where[param] = (b, i)
                if bucket.grads is not None and zero_stage == 0:
                    param.grad = bucket.grad_view(i)
                param.register_post_accumulate_grad_hook(self._on_gradient)
        self._callback_queued = False
        self._next_launch = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate (stages 0 and 1); the first backward outside the
        block reduces everything accumulated so far. Use it on every micro-batch but the last."""
        previous, self.sync_gradients = self.sync_gradients, False
        try:
            yield
        finally:
            self.sync_gradients = previous

    @contextlib.contextmanager
    def gathered(self):
        """Parameters are whole on every rank below stage 3; present for a uniform interface."""
        yield

    # -- backward ------------------------------------------------------------------------------
    def _on_gradient(self, param: torch.Tensor):
        if not self._callback_queued:
            # Runs once this backward has finished every node: wait for the in-flight reductions.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        b, i = self.where[param]
        bucket = self.buckets[b]
        if self.zero_stage == 2:
            if bucket.grads is None:
                bucket.grads = torch.zeros(bucket.padded, dtype=bucket.dtype, device=bucket.device)
            bucket.grad_view(i).add_(param.grad)
            param.grad = None  # the full-size gradient must not outlive the bucket
        else:
            view = bucket.grad_view(i)
            if param.grad.data_ptr() != view.data_ptr():
                # .grad was set to None (optimizer.zero_grad) and autograd made a fresh tensor:
                # fold it into the bucket and point .grad back at the bucket.
                view.add_(param.grad)
                param.grad = view
        bucket.seen.add(i)
        bucket.touched.add(i)
        if self.sync_gradients or self.zero_stage == 2:
            self._launch_ready_buckets(force=False)

    def _launch_ready_buckets(self, force: bool):
        """Start reductions for complete buckets in bucket order (all of them when force)."""
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if not force and len(bucket.seen) < len(bucket.params):
                return
            if self.zero_stage == 0:
                bucket.work = dist.all_reduce(bucket.grads, op=dist.ReduceOp.AVG, group=self.group, async_op=True)
            else:
                if bucket.grads is None:  # stage 2, no gradient reached this bucket
                    bucket.grads = torch.zeros(bucket.padded, dtype=bucket.dtype, device=bucket.device)
                # In place: this rank's slice of the buffer receives the averaged slice, so no
                # second gradient-sized buffer is needed.
                bucket.reduced = bucket.grads[bucket.rank * bucket.shard_size : (bucket.rank + 1) * bucket.shard_size]
                bucket.work = dist.reduce_scatter_single(bucket.reduced, bucket.grads, op=dist.ReduceOp.AVG, group=self.group, async_op=True)
            self._next_launch += 1

    def _finish_backward(self):
        self._callback_queued = False
        syncing = self.sync_gradients or self.zero_stage == 2
        if syncing:
            self._launch_ready_buckets(force=True)  # buckets holding parameters that got no gradient
            for bucket in self.buckets:
                bucket.work.wait()
                bucket.work = None
                if self.zero_stage == 0:
                    for i, param in enumerate(bucket.params):
                        # A parameter that took no part keeps grad None, so the optimizer skips
                        # it exactly as it would in a single process.
                        param.grad = bucket.grad_view(i) if i in bucket.touched else None
                elif self.zero_stage == 1:
                    bucket.shard.grad = bucket.reduced
                else:
                    bucket.shard.grad = bucket.reduced.clone() if bucket.shard.grad is None else bucket.shard.grad.add_(bucket.reduced)
                    bucket.grads = None  # frees the full-size buffer
                bucket.reduced = None
                bucket.touched = set()
            self._next_launch = 0
        for bucket in self.buckets:
            bucket.seen = set()

    # -- optimizer -----------------------------------------------------------------------------
    def optimizer_parameters(self) -> list:
        """What the optimizer steps: the trainable parameters, or this rank's slices of them."""
        if self.world == 1 or self.zero_stage == 0:
            return [p for p in self.module.parameters() if p.requires_grad]
        return [bucket.shard for bucket in self.buckets]

    def make_optimizer(self, optimizer_class, **kwargs) -> torch.optim.Optimizer:
        """optimizer_class over optimizer_parameters(); after each step, ZeRO stages all-gather the
        updated slices and every stage clears the gradient buffers for the next batch."""
        optimizer = optimizer_class(self.optimizer_parameters(), **kwargs)
        optimizer.register_step_post_hook(lambda *_: self._after_step())
        return optimizer

    @torch.no_grad()
    def _after_step(self):
        if self.world == 1:
            return
        works = []
        for bucket in self.buckets:
            if self.zero_stage >= 1:
                works.append(dist.all_gather_single(bucket.flat_params, bucket.shard.data, group=self.group, async_op=True))
                bucket.shard.grad = None
            if bucket.grads is not None:
                bucket.grads.zero_()
        for work in works:
            work.wait()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole gradient, summing squares over shards when sharded;
        the same arithmetic as torch.nn.utils.clip_grad_norm_."""
        grads = [p.grad for p in self.optimizer_parameters() if p.grad is not None]
        return _clip_grads(grads, max_norm, self.group if self.zero_stage >= 1 and self.world > 1 else None)


def _clip_grads(grads: list, max_norm: float, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Global-norm clipping of `grads`; when `group` is given each rank holds a disjoint slice
    and the squared norms are summed over it first."""
    if grads:
        squares = torch.stack([g.detach().pow(2).sum() for g in grads]).sum()
    else:
        squares = torch.zeros((), dtype=torch.float32)
    if group is not None:
        dist.all_reduce(squares, group=group)
    total_norm = squares.sqrt()
    clip = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(clip.to(g.dtype))
    return total_norm


# ---------------------------------------------------------------------------------------------
# ZeRO-3: parameters sharded too, gathered one block at a time
# ---------------------------------------------------------------------------------------------
class _FlatShard:
    """Parameters of one unit that share requires_grad, stored as this rank's slice of their
    flattened concatenation. Gathering all-gathers the slices into a full flat buffer that the
    module's parameters are views of; freeing resizes that buffer's storage to zero, which empties
    the parameters without replacing them (autograd's saved references stay valid and see the
    data again when the next gather refills the same storage)."""

    def __init__(self, params: list, group, world: int, rank: int):
        self.params, self.group, self.world = params, group, world
        self.trainable = params[0].requires_grad
        self.offsets, numel = [], 0
        for param in params:
            self.offsets.append(numel)
            numel += param.numel()
        self.padded = math.ceil(numel / world) * world
        self.shard_size = self.padded // world
        dtype, device = params[0].dtype, params[0].device
        self.full = torch.zeros(self.padded, dtype=dtype, device=device)
        with torch.no_grad():
            for param, offset in zip(params, self.offsets):
                self.full[offset : offset + param.numel()].copy_(param.data.view(-1))
                param.data = self.full[offset : offset + param.numel()].view_as(param)
        self.shard = nn.Parameter(self.full[rank * self.shard_size : (rank + 1) * self.shard_size].clone(), requires_grad=self.trainable)
        self.gathered = True
        self.free()
        self.seen = set()
        self.pending_reductions = []  # (work, output, flat gradient kept alive until the wait)
        self.reduced = False  # reduce-scattered in the current backward

    @torch.no_grad()
    def gather(self):
        if self.gathered:
            return
        self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        dist.all_gather_single(self.full, self.shard.data, group=self.group)
        self.gathered = True

    def free(self):
        if self.gathered:
            self.full.untyped_storage().resize_(0)
            self.gathered = False

    @torch.no_grad()
    def reduce_gradients(self):
        """Flatten this unit's gradients, start an averaging reduce-scatter and drop the full-size
        gradients; the slice lands in shard.grad when the backward's final callback waits."""
        flat = torch.zeros(self.padded, dtype=self.shard.dtype, device=self.shard.device)
        for param, offset in zip(self.params, self.offsets):
            if param.grad is not None:
                flat[offset : offset + param.numel()].copy_(param.grad.view(-1))
                param.grad = None
        output = torch.empty(self.shard_size, dtype=flat.dtype, device=flat.device)
        work = dist.reduce_scatter_single(output, flat, op=dist.ReduceOp.AVG, group=self.group, async_op=True)
        self.pending_reductions.append((work, output, flat))
        self.seen = set()
        self.reduced = True

    def wait_reductions(self):
        for work, output, _ in self.pending_reductions:
            work.wait()
            self.shard.grad = output if self.shard.grad is None else self.shard.grad.add_(output)
        self.pending_reductions = []


def _blocks(module: nn.Module) -> list:
    """The repeated blocks of a model: members of any nn.ModuleList whose entries are all of one
    class and own parameters (a decoder's layers), outermost lists only."""
    blocks, inside = [], set()
    for submodule in module.modules():
        if id(submodule) in inside or not isinstance(submodule, nn.ModuleList) or len(submodule) == 0:
            continue
        kinds = {type(m) for m in submodule}
        if len(kinds) == 1 and all(any(True for _ in m.parameters()) for m in submodule):
            blocks.extend(submodule)
            for m in submodule:
                inside.update(id(x) for x in m.modules())
    return blocks


def _map_tensors(function, value):
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(function, v) for v in value)
    return value


class FullyShardedDataParallel(nn.Module):
    """ZeRO-3 in the manner of FSDP: parameters, gradients and optimizer state all sharded.

    The model is cut into units: each repeated block (decoder layer), plus every other module that
    owns parameters directly (embeddings, final norm, LM head, value head). A unit's parameters are
    stored as this rank's 1/N slice (see _FlatShard). Around each unit:

      - before its forward: all-gather its parameters (hook on the module);
      - after its forward: free them again, unless inside gathered(); if its outputs need gradients,
        hook them so that their gradient arriving (= the unit's backward about to start) gathers
        the parameters once more;
      - when the gradients of all its trainable parameters have accumulated: reduce-scatter them
        (async) and drop the full-size gradients; when the gradient of its input has been
        computed (= its backward is over), free the parameters.

    A callback at the end of backward reduces whatever no hook reached, waits for every
    reduce-scatter and adds the slices to shard.grad. The optimizer only ever sees the slices.
    Every micro-batch is reduce-scattered (no_sync cannot skip it without keeping full gradients).

    Generating token by token would all-gather every block at every token; gathered() instead
    gathers the whole model once for a generation loop (or for saving, or for a frozen model used
    in forward only) and frees it at the end.
    """

    def __init__(self, module: nn.Module, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.module, self.group = module, group
        self.world = group_size(group)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.sync_gradients = True
        self.flat_shards: list = []
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=dist.get_global_rank(group, 0), group=group)
        self._keep_gathered = 0
        self._callback_queued = False
        self._in_flight = []  # flat shards whose reduce-scatter may still be running
        owner = {}  # parameter -> its _FlatShard
        units = []  # (module, the flat shards its forward needs)
        blocks = _blocks(module)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        candidates = [(b, list(b.parameters())) for b in blocks]
        candidates += [(m, [p for p in m._parameters.values() if p is not None and id(p) not in in_blocks]) for m in module.modules()]
        for unit_module, params in candidates:
            if not params:
                continue
            new = [p for p in dict.fromkeys(params) if p not in owner]
            for trainable in (True, False):
                members = [p for p in new if p.requires_grad == trainable]
                if members:
                    flat = _FlatShard(members, group, self.world, self.rank)
                    self.flat_shards.append(flat)
                    for p in members:
                        owner[p] = flat
            needs = list(dict.fromkeys(owner[p] for p in params))
            units.append((unit_module, needs))
        self.owner = owner
        for unit_module, needs in units:
            unit_module.register_forward_pre_hook(self._pre_forward(needs), with_kwargs=True)
            unit_module.register_forward_hook(self._post_forward(needs))
        for flat in self.flat_shards:
            if flat.trainable:
                for param in flat.params:
                    param.register_post_accumulate_grad_hook(self._on_gradient)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accepted for a uniform interface; stage 3 reduce-scatters every micro-batch."""
        yield

    @contextlib.contextmanager
    def gathered(self):
        """Keep every parameter gathered inside the block (generation, saving, frozen forwards)."""
        if self.world == 1:
            yield
            return
        for flat in self.flat_shards:
            flat.gather()
        self._keep_gathered += 1
        try:
            yield
        finally:
            self._keep_gathered -= 1
            if self._keep_gathered == 0:
                for flat in self.flat_shards:
                    flat.free()

    # -- hooks ---------------------------------------------------------------------------------
    def _queue_callback(self):
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True

    def _pre_forward(self, needs: list):
        def hook(module, args, kwargs):
            for flat in needs:
                flat.gather()
            if torch.is_grad_enabled():
                def after_backward(grad):
                    if not self._keep_gathered:
                        for flat in needs:
                            flat.free()
                    return grad

                def register(tensor):
                    if tensor.requires_grad:
                        tensor.register_hook(after_backward)
                    return tensor

                _map_tensors(register, args)
                _map_tensors(register, list(kwargs.values()))
            return None

        return hook

    def _post_forward(self, needs: list):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                def before_backward(grad):
                    self._queue_callback()
                    for flat in needs:
                        flat.gather()
                    return grad

                def register(tensor):
                    if tensor.requires_grad:
                        tensor.register_hook(before_backward)
                    return tensor

                _map_tensors(register, output)
            if not self._keep_gathered:
                for flat in needs:
                    flat.free()
            return None

        return hook

    def _on_gradient(self, param: torch.Tensor):
        self._queue_callback()
        flat = self.owner[param]
        flat.seen.add(param)
        if len(flat.seen) == len(flat.params):
            flat.reduce_gradients()
            # Keep two reductions in flight at most: waiting for older ones releases their
            # full-size gradient buffers, which would otherwise pile up to a whole model's worth.
            self._in_flight.append(flat)
            while len(self._in_flight) > 2:
                self._in_flight.pop(0).wait_reductions()

    def _finish_backward(self):
        self._callback_queued = False
        for flat in self.flat_shards:
            if flat.trainable and not flat.reduced:
                flat.reduce_gradients()  # parameters that got no gradient this backward
        for flat in self.flat_shards:
            flat.wait_reductions()
            flat.reduced = False
            if not self._keep_gathered:
                flat.free()
        self._in_flight = []

    # -- optimizer -----------------------------------------------------------------------------
    def optimizer_parameters(self) -> list:
        if self.world == 1:
            return [p for p in self.module.parameters() if p.requires_grad]
        return [flat.shard for flat in self.flat_shards if flat.trainable]

    def make_optimizer(self, optimizer_class, **kwargs) -> torch.optim.Optimizer:
        """optimizer_class over this rank's slices; the next forward gathers the updated weights."""
        optimizer = optimizer_class(self.optimizer_parameters(), **kwargs)
        if self.world > 1:
            optimizer.register_step_post_hook(lambda *_: [setattr(p, "grad", None) for p in self.optimizer_parameters()])
        return optimizer

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in self.optimizer_parameters() if p.grad is not None]
        return _clip_grads(grads, max_norm, self.group if self.world > 1 else None)


def data_parallel(module: nn.Module, group: Optional[dist.ProcessGroup], zero_stage: int = 0):
    """The wrapper for a ZeRO stage: DataParallel for 0-2, FullyShardedDataParallel for 3. On one
    rank both are pass-throughs, so scripts call them unconditionally."""
    if zero_stage == 3:
        return FullyShardedDataParallel(module, group)
    return DataParallel(module, group, zero_stage)
