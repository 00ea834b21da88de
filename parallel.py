"""Multi-GPU training written out on torch.distributed: data parallel, ZeRO stages 1 to 3, tensor,
sequence, context and pipeline parallelism. A script started without torchrun is world size 1: every wrapper below
is then a thin pass-through and nothing is communicated. All collectives are NCCL on GPUs and gloo
on CPUs (which makes the tests run anywhere). Mixed precision is torch.autocast: parameters,
gradients and reductions stay fp32 (the master weights), matmuls run in bf16.

The file, section by section; each section opens with what it communicates, when, and why.

1. Process groups. `init_distributed` reads torchrun's environment and cuts the world into a
   dp x pp x cp x tp grid (`Grid`): tensor-parallel ranks adjacent (they talk several times a
   layer), then context-parallel ones (twice a layer), then pipeline stages, then data-parallel
   replicas. Small helpers: sums and object gathers over a
   group, `clean_exit` (a failed collective becomes one line instead of a traceback per rank).
2. Data parallel and ZeRO-1/2 (`DataParallel`). Gradients are averaged over dp_group in flat
   buckets, each all-reduced as soon as backward completes it, while backward goes on. ZeRO-1
   reduce-scatters instead, so a rank keeps the gradient and optimizer state of its slice, and
   the step all-gathers the updated parameters; ZeRO-2 also frees the full gradient buffer
   between backwards.
3. ZeRO-3 (`FullyShardedDataParallel`): the parameters sharded too. Each block's are
   all-gathered just before its forward and again before its backward, and freed after each;
   its gradients are reduce-scattered as soon as they are complete.
4. Tensor parallel (Megatron): four tiny exchanges (copy, reduce, gather, split) carry
   all the communication; column- and row-parallel linear layers and a vocabulary-parallel
   embedding are built from them, and `tensor_parallel` rewrites a Hugging Face model in place.
5. Sequence and context parallel: activations split along the sequence. `sequence_parallel`
   (Megatron) splits what lies between the tensor-parallel matmuls over the tp ranks, trading
   each all-reduce for a reduce-scatter and an all-gather; `context_parallel` (Ulysses) splits
   every layer over the cp ranks, with an all-to-all before and after attention. Both start and
   end at the base model, which hands the heads the whole sequence's last hidden state.
6. Pipeline parallel: `PipelineStage` keeps a model's consecutive layers; point-to-point sends
   carry activations forward and their gradients back, in the all-forward-all-backward or 1F1B
   schedule; `pipeline_forward` for passes without gradients; whole-model copies for generating.
7. Checkpoints: what every script saves and resumes through, written by every rank (its own
   state) and streamed to rank 0 one tensor at a time (the weights, as sharded safetensors); a
   clean stop on SIGTERM/SIGUSR1; `python parallel.py export CHECKPOINT OUT`.

Every algorithm script uses it the same way:

    grid = parallel.init_distributed(args.device, tp=args.tp, pp=args.pp, cp=args.cp)
    model = parallel.tensor_parallel(model, grid.tp_group)    # each a no-op for a group of one
    model = parallel.split_sequences(model, grid, args.sequence_parallel)
    model = parallel.data_parallel(model, grid.dp_cp_group, args.zero_stage)
    optimizer = model.make_optimizer(torch.optim.AdamW, lr=...)
    for micro_batch in batch:                                 # gradients are averaged over ranks
        with model.no_sync() if not last else nullcontext():  # when the last backward returns
            loss.backward()
    model.clip_grad_norm_(max_norm); optimizer.step()         # the step re-assembles shards

What each ZeRO stage keeps on a rank (N ranks, fp32 master weights, AdamW's two fp32 moments):

    stage   parameters   gradients    optimizer state   bytes per parameter
    0       full         full         full              4 + 4 + 8     = 16
    1       full         full         1/N               4 + 4 + 8/N
    2       full         1/N          1/N               4 + (4 + 8)/N
    3       1/N          1/N          1/N               16/N (+ one block gathered at a time)

How much each layout needs for a given model is arithmetic: `python benchmarks/plan.py`.
"""

import contextlib
import ctypes
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------
# Every collective below runs over one of the groups of this rank's grid: dp_group (the model
# copies, which see different batches), tp_group (the ranks that split each layer, which talk at
# every layer), cp_group (the ranks that split each sequence, which talk at every attention),
# pp_group (the pipeline stages, which pass activations), and dp_cp_group (dp x cp: every rank
# that holds the same weights, which average gradients). Building the groups is itself
# collective: every rank creates every group, in the same order, at start-up.
@dataclass
class Grid:
    """This rank's place in the (dp, pp, cp, tp) grid. Ranks are laid out tensor-parallel
    innermost, then context-parallel, rank = ((dp_rank * pp_size + pp_rank) * cp_size + cp_rank)
    * tp_size + tp_rank: the groups that talk inside every layer (tp several times a layer, cp
    twice, around attention) sit on the same node, on its fastest links; pipeline stages talk once
    per micro-batch and data-parallel replicas once per batch. A group of size one is None."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_size: int = 1
    pp_size: int = 1
    tp_size: int = 1
    cp_size: int = 1
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    cp_rank: int = 0
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    tp_group: Optional[dist.ProcessGroup] = None
    cp_group: Optional[dist.ProcessGroup] = None
    dp_cp_group: Optional[dist.ProcessGroup] = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, wandb, progress bars and the saved model."""
        return self.rank == 0


def init_distributed(device: str = "auto", tp: int = 1, pp: int = 1, timeout_s: float = 600.0, cp: int = 1) -> Grid:
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
    else:
        keep_freed_memory()
    split = tp * pp * cp
    flags = f"--tp {tp} --pp {pp}" + (f" --cp {cp}" if cp > 1 else "")
    if world_size == 1:
        if split > 1:
            raise SystemExit(
                f"error: {flags} splits the model over {split} processes; launch with torchrun --nproc_per_node "
                f"{split} (or a multiple)"
            )
        return Grid(device=device)
    if world_size % split:
        raise SystemExit(
            f"error: {world_size} processes do not split into {flags.replace(' --', ' x --')} groups; make the process "
            f"count a multiple of {split}"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None
        )
    rank = dist.get_rank()
    dp = world_size // split
    dp_rank, rest = divmod(rank, pp * cp * tp)
    pp_rank, rest = divmod(rest, cp * tp)
    cp_rank, tp_rank = divmod(rest, tp)

    def layout(d, p, c, t):
        return ((d * pp + p) * cp + c) * tp + t

    D, P, C, T = range(dp), range(pp), range(cp), range(tp)
    # Every rank must call new_group for every group, in the same order, even those it is not in.
    groups = {}
    for name, members in (
        ("tp_group", [[layout(d, p, c, t) for t in T] for d in D for p in P for c in C]),
        ("cp_group", [[layout(d, p, c, t) for c in C] for d in D for p in P for t in T]),
        ("pp_group", [[layout(d, p, c, t) for p in P] for d in D for c in C for t in T]),
        ("dp_group", [[layout(d, p, c, t) for d in D] for p in P for c in C for t in T]),
        ("dp_cp_group", [[layout(d, p, c, t) for d in D for c in C] for p in P for t in T]),
    ):
        for ranks in members:
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s)) if len(ranks) > 1 else None
            if rank in ranks:
                groups[name] = group
    return Grid(rank, world_size, local_rank, device, dp, pp, tp, cp, dp_rank, pp_rank, tp_rank, cp_rank, **groups)


def keep_freed_memory():
    """On CPU, keep freed memory in the process for the next tensor, as CUDA's caching allocator keeps it on a GPU.
    By default glibc gives the free top of its heap back to the OS once it passes twice the largest block freed so far,
    which a step's gradients do, and the OS then faults in and zeroes every 4 KiB page of the next step's: on the VM
    of benchmarks/README.md that slowed every update (vs_trl, fourth round). So the heap keeps up to 2 GiB free at its
    top, and only blocks over 32 MiB (an embedding's gradient) are mapped on their own and returned when freed.
    Elsewhere, a no-op."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-3, 2**25)  # M_MMAP_THRESHOLD, fixed: blocks over 32 MiB get their own mapping
        mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: the heap's free top goes back to the OS past 2 GiB only


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
    the process group is torn down on the way out. After a run that succeeded under torchrun, the
    process then leaves without the interpreter's teardown: gloo's worker threads outlive
    destroy_process_group, and a rank finalizing beside them sometimes aborts (SIGABRT, "terminate
    called without an active exception"), which torchrun would report as a failed run."""
    distributed = False
    try:
        yield
        distributed = dist.is_initialized()
    except RuntimeError as error:
        # gloo reports a dead peer as a plain RuntimeError, so judge by where it was raised.
        raised_in = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
        if not isinstance(error, dist.DistError) and not any(
            f"torch{os.sep}distributed{os.sep}" in name for name in raised_in
        ):
            raise
        rank = os.environ.get("RANK", "0")
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise SystemExit(
            f"error: rank {rank}: a collective failed, most likely because another rank died or stalled past the "
            f"timeout (look for the first rank that failed): {first_line}"
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---------------------------------------------------------------------------------------------
# Data parallel and ZeRO-1/2: gradients in flat buckets, reduced while backward is still running
# ---------------------------------------------------------------------------------------------
# Communicated: gradients, over dp_group, once per batch (the last micro-batch's backward; the
# others run under no_sync), bucket by bucket as backward completes each, so the reduction of the
# last layers overlaps the backward of the first. ZeRO-1/2 then all-gather the updated parameter
# slices after the step. Why buckets: one collective per parameter would pay the latency of
# hundreds of small messages; one per model would wait for the whole backward.
class _Bucket:
    """A run of consecutive parameters (in reverse registration order, roughly the order backward
    produces their gradients) whose gradients live in one flat buffer, so a whole bucket travels
    in one collective. Under ZeRO-1/2 the parameters live in one flat buffer too, and this rank
    owns the slice [rank * shard_size, (rank + 1) * shard_size) of it."""

    def __init__(self, params: list, world: int, rank: int, zero_stage: int, norm_weights: list):
        self.params = params
        *self.offsets, numel = itertools.accumulate((p.numel() for p in params), initial=0)  # starts, and the total
        self.padded = math.ceil(numel / world) * world  # reduce-scatter wants equal slices
        self.shard_size = self.padded // world
        self.rank = rank
        self.dtype, self.device = params[0].dtype, params[0].device
        self.grads = None if zero_stage == 2 else torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        self.flat_params, self.shard = None, None
        if zero_stage >= 1:
            self.flat_params = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
            for param, offset in zip(params, self.offsets):
                self.flat_params[offset : offset + param.numel()].copy_(param.data.view(-1))
                param.data = self.flat_params[offset : offset + param.numel()].view_as(param)
            # The optimizer steps this view in place, i.e. this rank's slice of the flat parameters.
            self.shard = nn.Parameter(self.flat_params[rank * self.shard_size : (rank + 1) * self.shard_size])
            # Each element's weight in the squared gradient norm (see _clip_grads), for this slice.
            weights = torch.cat([torch.full((p.numel(),), float(w)) for p, w in zip(params, norm_weights)])
            self.norm_weights = torch.cat([weights, weights.new_zeros(self.padded - numel)])[
                rank * self.shard_size : (rank + 1) * self.shard_size
            ].to(self.device, self.dtype)
        self.seen = set()  # positions whose gradient arrived in this backward
        self.touched = set()  # ... in this accumulation cycle (since the last reduction)
        self.work = None
        self.reduced = None  # reduce-scatter output, waiting to be added to the shard's gradient

    def grad_view(self, index: int) -> torch.Tensor:
        param, offset = self.params[index], self.offsets[index]
        return self.grads[offset : offset + param.numel()].view_as(param)


class _AllReduce:
    """ZeRO-0's path (DDP): each parameter's .grad is a view into its bucket's flat buffer, so
    autograd accumulates straight into it; a complete bucket is all-reduced; afterwards every
    rank holds the whole averaged gradient."""

    sharded, reduce_every_backward = False, False

    def accumulate(self, bucket, index: int, param):
        view = bucket.grad_view(index)
        if param.grad.data_ptr() != view.data_ptr():
            # .grad was set to None (optimizer.zero_grad) and autograd made a fresh tensor: fold
            # it into the bucket and point .grad back at the bucket.
            view.add_(param.grad)
            param.grad = view

    def launch(self, bucket, group):
        return dist.all_reduce(bucket.grads, op=dist.ReduceOp.AVG, group=group, async_op=True)

    def finish(self, bucket):
        for index, param in enumerate(bucket.params):
            # A parameter that took no part keeps grad None, so the optimizer skips it exactly as
            # it would in a single process.
            param.grad = bucket.grad_view(index) if index in bucket.touched else None


class _ReduceScatter:
    """ZeRO-1's path: gradients accumulate as in ZeRO-0, but a complete bucket is reduce-scattered,
    which leaves each rank the averaged gradient of its slice, the one its optimizer steps."""

    sharded, reduce_every_backward = True, False
    accumulate = _AllReduce.accumulate

    def launch(self, bucket, group):
        """In place: this rank's slice of the bucket's buffer receives the averaged slice, so no
        second gradient-sized buffer is needed."""
        if bucket.grads is None:  # ZeRO-2, where no gradient reached this bucket
            bucket.grads = torch.zeros(bucket.padded, dtype=bucket.dtype, device=bucket.device)
        bucket.reduced = bucket.grads[bucket.rank * bucket.shard_size : (bucket.rank + 1) * bucket.shard_size]
        return dist.reduce_scatter_single(
            bucket.reduced, bucket.grads, op=dist.ReduceOp.AVG, group=group, async_op=True
        )

    def finish(self, bucket):
        bucket.shard.grad = bucket.reduced


class _ReduceScatterFreed(_ReduceScatter):
    """ZeRO-2's path: the full-size gradient buffer exists only while a backward runs. Each
    gradient is copied into a temporary bucket buffer and dropped; the bucket is reduce-scattered
    as soon as it is complete and freed, so between steps a rank keeps only its gradient slice.
    It reduces every backward (keeping full gradients across micro-batches is what it avoids)."""

    reduce_every_backward = True

    def accumulate(self, bucket, index: int, param):
        if bucket.grads is None:
            bucket.grads = torch.zeros(bucket.padded, dtype=bucket.dtype, device=bucket.device)
        bucket.grad_view(index).add_(param.grad)
        param.grad = None  # the full-size gradient must not outlive the bucket

    def finish(self, bucket):
        bucket.shard.grad = (
            bucket.reduced.clone() if bucket.shard.grad is None else bucket.shard.grad.add_(bucket.reduced)
        )
        bucket.grads = None  # frees the full-size buffer


class DataParallel(nn.Module):
    """Data parallel with ZeRO stages 0, 1 and 2.

    Trainable parameters are grouped into buckets of about bucket_mb (see _Bucket). A
    post-accumulate-grad hook notes each gradient as it arrives; when a bucket's last gradient
    has arrived, an asynchronous reduction of the whole bucket starts while backward carries on
    with earlier layers, and a callback queued on the autograd engine waits for all of them when
    backward ends. Buckets are launched strictly in order, because every rank must issue the same
    collectives in the same order. What the stages do differently (how a gradient is kept, which
    collective reduces a bucket, where the result goes) is each stage's own small path:
    _AllReduce (stage 0), _ReduceScatter (stage 1), _ReduceScatterFreed (stage 2). Under stages
    1 and 2 the optimizer holds state for this rank's slice only, steps it, and an all-gather of
    the flat parameters after the step brings every rank the updated weights.

    Gradients are averaged over ranks, as torch's DistributedDataParallel does, so a loss that is
    each rank's mean over its share of the batch gives the gradient of the global mean.
    """

    def __init__(
        self,
        module: nn.Module,
        group: Optional[dist.ProcessGroup] = None,
        zero_stage: int = 0,
        bucket_mb: float = 25.0,
        tp_group: Optional[dist.ProcessGroup] = None,
        pp_group: Optional[dist.ProcessGroup] = None,
    ):
        super().__init__()
        assert zero_stage in (0, 1, 2), "stage 3 is FullyShardedDataParallel"
        self.module, self.group, self.zero_stage = module, group, zero_stage
        self.path = (_AllReduce, _ReduceScatter, _ReduceScatterFreed)[zero_stage]()  # how gradients are reduced
        # The groups the module itself is split over: the gradient norm sums over them too.
        self.tp_group, self.pp_group = tp_group, pp_group
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
        contents, size = [[]], 0
        for param in trainable:
            if size >= bucket_mb * 2**20:  # the bucket is full: start the next
                contents, size = contents + [[]], 0
            contents[-1].append(param)
            size += param.numel() * param.element_size()
        self.buckets = [
            _Bucket(params, self.world, self.rank, zero_stage, [self._norm_weight(p) for p in params])
            for params in contents
            if params  # none when nothing is trainable
        ]
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
        self.path.accumulate(bucket, i, param)
        bucket.seen.add(i)
        bucket.touched.add(i)
        if self.sync_gradients or self.path.reduce_every_backward:
            self._launch_ready_buckets(force=False)

    def _launch_ready_buckets(self, force: bool):
        """Start reductions for complete buckets in bucket order (all of them when force)."""
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if not force and len(bucket.seen) < len(bucket.params):
                return
            bucket.work = self.path.launch(bucket, self.group)
            self._next_launch += 1

    def _finish_backward(self):
        self._callback_queued = False
        if self.sync_gradients or self.path.reduce_every_backward:
            self._launch_ready_buckets(force=True)  # buckets holding parameters that got no gradient
            for bucket in self.buckets:
                bucket.work.wait()
                bucket.work = None
                self.path.finish(bucket)
                bucket.reduced = None
                bucket.touched = set()
            self._next_launch = 0
        for bucket in self.buckets:
            bucket.seen = set()

    # -- optimizer -----------------------------------------------------------------------------
    def optimizer_parameters(self) -> list:
        """What the optimizer steps: the trainable parameters, or this rank's slices of them."""
        if self.world == 1 or not self.path.sharded:
            return [p for p in self.module.parameters() if p.requires_grad]
        return [bucket.shard for bucket in self.buckets]

    def make_optimizer(self, optimizer_class, **kwargs) -> torch.optim.Optimizer:
        """optimizer_class over optimizer_parameters(); after each step, ZeRO stages all-gather the
        updated slices and every stage clears the gradient buffers for the next batch. A module
        with nothing to train (a pipeline stage of frozen layers, as under Hydra) gets an optimizer
        over an empty placeholder, so that its rank runs the same loop as the others."""
        parameters = self.optimizer_parameters() or [nn.Parameter(torch.zeros(0, device=_module_device(self.module)))]
        optimizer = optimizer_class(parameters, **kwargs)
        optimizer.register_step_post_hook(lambda *_: self._after_step())
        return optimizer

    @torch.no_grad()
    def _after_step(self):
        if self.world == 1:
            return
        works = []
        for bucket in self.buckets:
            if self.path.sharded:
                works.append(
                    dist.all_gather_single(bucket.flat_params, bucket.shard.data, group=self.group, async_op=True)
                )
                bucket.shard.grad = None
            if bucket.grads is not None:
                bucket.grads.zero_()
        for work in works:
            work.wait()

    def _norm_weight(self, param) -> float:
        """How much of this parameter's squared gradient this rank counts in the global norm, so
        that summing over the tensor- and pipeline-parallel groups counts every weight once: a
        tensor-parallel shard counts fully; a parameter replicated on the tp ranks 1/tp on each;
        the last pipeline stage's copy of a tied embedding not at all (the first stage's counts)."""
        stage = self.module
        if getattr(stage, "tied", False) and stage.is_last and param is stage.tied_weight:
            return 0.0
        if self.tp_group is not None and not getattr(param, "tensor_parallel", False):
            return 1.0 / group_size(self.tp_group)
        return 1.0

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole gradient: over the shards when sharded, and over the
        tensor- and pipeline-parallel pieces of the model."""
        sharded = self.path.sharded and self.world > 1
        groups = [g for g in (self.group if sharded else None, self.tp_group, self.pp_group) if g is not None]
        if sharded:
            parameters = [bucket.shard for bucket in self.buckets]
            weights = [bucket.norm_weights for bucket in self.buckets]
        else:
            parameters = self.optimizer_parameters()
            weights = [self._norm_weight(p) for p in parameters]
        return _clip_grads(parameters, max_norm, groups, weights, _module_device(self.module))


def _module_device(module: nn.Module) -> torch.device:
    """Where a module lives (its first parameter or buffer): where the tensors it sends to a
    collective must be, even on a rank with nothing to train (NCCL refuses CPU tensors)."""
    return next(iter(list(module.parameters()) + list(module.buffers()))).device


def _clip_grads(
    parameters: list, max_norm: float, groups: list, weights: Optional[list] = None, device=None
) -> torch.Tensor:
    """Global-norm clipping of the parameters' gradients. When nothing is split over other ranks
    (no groups), the norm is torch.nn.utils.clip_grad_norm_'s, so one process is bitwise what it was
    without the wrapper. Otherwise each rank sums its squared gradients, each parameter (or element)
    weighted as `weights` says (see DataParallel._norm_weight), and the sums are added over `groups`.
    Every gradient is then scaled as torch does, by min(1, max_norm / (norm + 1e-6)), except that a
    factor of exactly 1 is skipped: it would change nothing, at the price of a pass over every gradient."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not groups:
        total_norm = torch.nn.utils.get_total_norm(grads)
    else:
        # On the module's device even where this rank has no gradient (Hydra's frozen first pipeline
        # stage), since the sum still goes through the collective.
        squares = torch.zeros((), dtype=torch.float64, device=device if device is not None else grads[0].device)
        for p, weight in zip(parameters, weights or [1.0] * len(parameters)):
            if p.grad is not None:
                squares += (p.grad.detach().double().square() * weight).sum()
        for group in groups:
            dist.all_reduce(squares, group=group)
        total_norm = squares.sqrt().to(grads[0].dtype if grads else torch.float32)
    clip = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    if grads and clip < 1:
        for g in grads:
            g.mul_(clip.to(g.dtype))
    return total_norm


# ---------------------------------------------------------------------------------------------
# ZeRO-3: parameters sharded too, gathered one block at a time
# ---------------------------------------------------------------------------------------------
# Communicated over dp_group: each unit's (block's) parameters, all-gathered before its forward
# and again before its backward; its gradients, reduce-scattered as soon as backward completes
# them. Why: a rank then holds 1/N of everything plus one block whole, at the price of gathering
# the parameters twice per step instead of reducing the gradients once.
class _FlatShard:
    """Parameters of one unit that share requires_grad and dtype, stored as this rank's slice of their
    flattened concatenation. Gathering all-gathers the slices into a full flat buffer that the
    module's parameters are views of; freeing resizes that buffer's storage to zero, which empties
    the parameters without replacing them (autograd's saved references stay valid and see the
    data again when the next gather refills the same storage)."""

    def __init__(self, params: list, group, world: int, rank: int):
        self.params, self.group, self.world = params, group, world
        self.trainable = params[0].requires_grad
        *self.offsets, numel = itertools.accumulate((p.numel() for p in params), initial=0)  # starts, and the total
        self.padded = math.ceil(numel / world) * world
        self.shard_size = self.padded // world
        dtype, device = params[0].dtype, params[0].device
        self.full = torch.zeros(self.padded, dtype=dtype, device=device)
        with torch.no_grad():
            for param, offset in zip(params, self.offsets):
                self.full[offset : offset + param.numel()].copy_(param.data.view(-1))
                param.data = self.full[offset : offset + param.numel()].view_as(param)
        self.shard = nn.Parameter(
            self.full[rank * self.shard_size : (rank + 1) * self.shard_size].clone(), requires_grad=self.trainable
        )
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


def _hook_gradients(value, hook):
    """Register `hook` on the gradient of every tensor in `value` (nested tuples and lists) that needs one."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        value.register_hook(hook)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _hook_gradients(item, hook)


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
        candidates += [
            (m, [p for p in m._parameters.values() if p is not None and id(p) not in in_blocks])
            for m in module.modules()
        ]
        for unit_module, params in candidates:
            if not params:
                continue
            new = [p for p in dict.fromkeys(params) if p not in owner]
            # One flat buffer per (trainable, dtype): a frozen model may keep its matmul weights
            # in bf16 beside fp32 norms (ppo.py's reference under --dtype bf16).
            for trainable, dtype in dict.fromkeys((p.requires_grad, p.dtype) for p in new):
                members = [p for p in new if p.requires_grad == trainable and p.dtype == dtype]
                if members:
                    flat = _FlatShard(members, group, self.world, self.rank)
                    flat.unit = unit_module  # saving gathers a unit's shards together, then frees them
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

                _hook_gradients([args, list(kwargs.values())], after_backward)
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

                _hook_gradients(output, before_backward)
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
            optimizer.register_step_post_hook(
                lambda *_: [setattr(p, "grad", None) for p in self.optimizer_parameters()]
            )
        return optimizer

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return _clip_grads(
            self.optimizer_parameters(),
            max_norm,
            [self.group] if self.world > 1 else [],
            device=_module_device(self.module),
        )


def data_parallel(
    module: nn.Module,
    group: Optional[dist.ProcessGroup],
    zero_stage: int = 0,
    tp_group: Optional[dist.ProcessGroup] = None,
    pp_group: Optional[dist.ProcessGroup] = None,
):
    """The wrapper for a ZeRO stage: DataParallel for 0-2, FullyShardedDataParallel for 3. On one
    rank both are pass-throughs, so scripts call them unconditionally. tp_group, pp_group: the
    groups a tensor-parallel module or a pipeline stage is split over (ZeRO-1/2 compose with them;
    ZeRO-3 does not)."""
    if zero_stage == 3:
        if tp_group is not None or pp_group is not None:
            raise SystemExit(
                "error: --zero-stage 3 does not compose with tensor or pipeline parallelism; use --zero-stage 0, 1 or "
                "2 with --tp/--pp"
            )
        return FullyShardedDataParallel(module, group)
    return DataParallel(module, group, zero_stage, tp_group=tp_group, pp_group=pp_group)


# ---------------------------------------------------------------------------------------------
# Tensor parallel (Megatron-style): each layer's matrices split over the ranks of tp_group
# ---------------------------------------------------------------------------------------------
# Four tiny exchanges (_Exchange) carry all the communication. A column-parallel layer (output
# features split) needs its whole input on every rank and hands on a split output; a row-parallel
# layer (input features split) takes that split output and all-reduces the partial products. So an
# attention block or an MLP costs one all-reduce forward and one backward, wherever it sits.
class _Exchange(torch.autograd.Function):
    """Forward: forward(x, group); backward: backward(grad, group), its adjoint. Every crossing
    between ranks below is one: tensor parallel's copy, reduce, gather and split, sequence
    parallel's pairs of _shard, _all_gather and _seq_reduce_scatter, context parallel's all-to-all."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.backward = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad, ctx.group), None, None, None


def _shard(x, group, dim=1):
    """This rank's contiguous 1/N of dimension `dim` (the sequence, for [batch, sequence, ...])."""
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x, group, dim=1):
    """Every rank's x joined along dimension `dim`, in rank order (_shard's adjoint)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _all_reduce(x, group):
    """The sum over the ranks, in place of x (made contiguous)."""
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def copy_to_group(x, group):
    """Forward: identity, every rank holds the whole input. Backward: all-reduce, because each
    rank's column shard contributed only part of the input's gradient."""
    return _Exchange.apply(x, group, lambda x, group: x, _all_reduce) if group is not None else x


def reduce_from_group(x, group):
    """Forward: all-reduce the ranks' partial results (into a copy, leaving x as autograd saw it).
    Backward: identity, the sum's gradient reaches every term unchanged."""
    if group is None:
        return x
    return _Exchange.apply(x, group, lambda x, group: _all_reduce(x.contiguous().clone(), group), lambda g, _: g)


def gather_last_dim(x, group):
    """Forward: all-gather shards along the last dimension (e.g. vocabulary-split logits for
    sampling). Backward: keep this rank's slice of the gradient."""
    if group is None:
        return x
    return _Exchange.apply(x, group, lambda x, group: _all_gather(x, group, -1), lambda g, group: _shard(g, group, -1))


def split_last_dim(x, group):
    """Forward: keep this rank's slice of the last dimension. Backward: all-gather the gradient."""
    if group is None:
        return x
    return _Exchange.apply(x, group, lambda x, group: _shard(x, group, -1), lambda g, group: _all_gather(g, group, -1))


class ColumnParallelLinear(nn.Module):
    """y[..., rows] = x @ weight[rows].T + bias[rows]: this rank computes the output features
    `rows` of a dense layer (a tensor of indices into the full weight's rows, so a fused q/k/v
    projection can take matching slices of each part). Built by slicing the full weight, so the
    layers of all ranks together equal the dense layer exactly. gather_output all-gathers the
    shards into the whole output (only sensible when the rows are contiguous and in rank order)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        rows: torch.Tensor,
        group,
        gather_output: bool = False,
        conv1d: bool = False,
    ):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.conv1d = conv1d  # the dense layer was GPT-2's Conv1D: saved transposed, as [in, out]
        # With the weights (data parallel broadcasts buffers, and NCCL takes only GPU tensors), but
        # as given for weights on the meta device, which hold no data to index.
        self.register_buffer("rows", rows if weight.is_meta else rows.to(weight.device), persistent=False)
        self.weight = nn.Parameter(weight.detach()[rows].clone())
        self.bias = nn.Parameter(bias.detach()[rows].clone()) if bias is not None else None
        for parameter in (self.weight, self.bias):
            if parameter is not None:
                parameter.tensor_parallel = True  # a shard: counted whole in the gradient norm

    # Set by sequence_parallel: the input then arrives all-gathered along the sequence, and that
    # gather's backward does the reduction copy_to_group's would.
    sequence_split = None

    def forward(self, x):
        split = self.sequence_split is not None and self.sequence_split.sp_active
        y = nn.functional.linear(x if split else copy_to_group(x, self.group), self.weight, self.bias)
        return gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., shard] @ weight[:, columns].T, + bias once: this rank holds the
    input features `columns` (those the previous column-parallel layer produced here), and the
    forward all-reduces the partial products. The bias is added after the reduction, so it is not
    counted once per rank."""

    def __init__(
        self, weight: torch.Tensor, bias: Optional[torch.Tensor], columns: torch.Tensor, group, conv1d: bool = False
    ):
        super().__init__()
        self.group, self.conv1d = group, conv1d
        # As ColumnParallelLinear's rows.
        self.register_buffer("columns", columns if weight.is_meta else columns.to(weight.device), persistent=False)
        self.weight = nn.Parameter(weight.detach()[:, columns].clone())
        self.weight.tensor_parallel = True  # the bias is replicated
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    sequence_split = None  # set by sequence_parallel: reduce-scatter along the sequence instead

    def forward(self, x):
        y = nn.functional.linear(x, self.weight)
        if self.sequence_split is not None and self.sequence_split.sp_active:
            y = _reduce_scatter_sequence(y, self.group)
        else:
            y = reduce_from_group(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding table on this rank. A token outside the range looks up
    zeros here; the all-reduce over ranks then assembles every token's row from the one rank that
    holds it."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = weight.shape[0] // world
        self.start, self.end = rank * rows, (rank + 1) * rows
        self.weight = nn.Parameter(weight.detach()[self.start : self.end].clone())
        self.weight.tensor_parallel = True

    def forward(self, input_ids):
        outside = (input_ids < self.start) | (input_ids >= self.end)
        local = (input_ids - self.start).masked_fill(outside, 0)
        embedded = nn.functional.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(embedded, self.group)


def tensor_parallel(model: nn.Module, group, index_device: Optional[torch.device] = None) -> nn.Module:
    """Rewrite a Hugging Face causal LM of the GPT-2, Llama or GPT-NeoX family in place for tensor
    parallelism over `group`: attention q/k/v column-parallel with whole heads per rank (key/value
    heads too under GQA), the output projection row-parallel; MLP up (and gate) column-parallel,
    down row-parallel; token embeddings vocabulary-parallel; the LM head column-parallel over the
    vocabulary, with logits all-gathered so generate() and the HF loss see whole logits (log-prob
    code that can work on the shard passes lm_head.weight and tp_group to kernels.fused_logprobs
    instead). Heads are inferred from tensor shapes in these models' attention code, so only
    GPT-2's split size needs updating. Every rank must load the same full weights first.
    index_device: where the layers' index buffers go (default: with the weights), for a model
    built on the meta device that will take real weights later."""
    if group is None:
        return model
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % world or kv_heads % world or config.vocab_size % world:
        raise SystemExit(
            f"error: --tp {world} must divide the attention heads ({heads}), key/value heads ({kv_heads}) and "
            f"vocabulary ({config.vocab_size}); "
            "pad the vocabulary with model.resize_token_embeddings(..., pad_to_multiple_of=tp) if needed"
        )
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    local_heads, local_kv = heads // world, kv_heads // world
    index_device = index_device or next(model.parameters()).device

    def head_rows(first_head: int, heads: int, head_dim: int) -> torch.Tensor:
        return torch.arange(first_head * head_dim, (first_head + heads) * head_dim, device=index_device)

    def rank_rows(size: int) -> torch.Tensor:  # this rank's contiguous 1/world of `size` rows
        return torch.arange(rank * size // world, (rank + 1) * size // world, device=index_device)

    q_rows = head_rows(rank * local_heads, local_heads, head_dim)
    kv_rows = head_rows(rank * local_kv, local_kv, head_dim)
    family = config.model_type

    def split_mlp(up_names, down_name, mlp):
        conv1d = family == "gpt2"  # GPT-2's Conv1D stores [in, out]
        layers = {name: getattr(mlp, name) for name in (*up_names, down_name)}
        weights = {name: layer.weight.t() if conv1d else layer.weight for name, layer in layers.items()}
        rows = rank_rows(weights[down_name].shape[1])  # the intermediate features
        for name, layer in layers.items():
            split = RowParallelLinear if name == down_name else ColumnParallelLinear
            setattr(mlp, name, split(weights[name], layer.bias, rows, group, conv1d=conv1d))

    if family == "gpt2":
        for block in model.transformer.h:
            attention = block.attn
            # c_attn is one Conv1D producing [q | k | v]: take this rank's heads from each third.
            rows = torch.cat([q_rows + part * hidden for part in range(3)])
            c_attn, c_proj = attention.c_attn, attention.c_proj
            attention.c_attn = ColumnParallelLinear(c_attn.weight.t(), c_attn.bias, rows, group, conv1d=True)
            attention.c_proj = RowParallelLinear(c_proj.weight.t(), c_proj.bias, q_rows, group, conv1d=True)
            attention.split_size = hidden // world
            split_mlp(["c_fc"], "c_proj", block.mlp)
        embeddings = model.transformer
        embeddings.wte = VocabParallelEmbedding(embeddings.wte.weight, group)
    elif family == "llama":
        for block in model.model.layers:
            attention = block.self_attn
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                layer = getattr(attention, name)
                setattr(attention, name, ColumnParallelLinear(layer.weight, layer.bias, rows, group))
            attention.o_proj = RowParallelLinear(attention.o_proj.weight, attention.o_proj.bias, q_rows, group)
            split_mlp(["gate_proj", "up_proj"], "down_proj", block.mlp)
        model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens.weight, group)
    elif family == "gpt_neox":
        for block in model.gpt_neox.layers:
            attention = block.attention
            # query_key_value's rows are grouped per head as [q_h | k_h | v_h], so a rank's heads
            # are one contiguous block of rows.
            rows = head_rows(rank * local_heads, local_heads, 3 * head_dim)
            qkv = attention.query_key_value
            attention.query_key_value = ColumnParallelLinear(qkv.weight, qkv.bias, rows, group)
            attention.dense = RowParallelLinear(attention.dense.weight, attention.dense.bias, q_rows, group)
            split_mlp(["dense_h_to_4h"], "dense_4h_to_h", block.mlp)
        model.gpt_neox.embed_in = VocabParallelEmbedding(model.gpt_neox.embed_in.weight, group)
    else:
        raise SystemExit(f"error: tensor parallel knows the gpt2, llama and gpt_neox families, not {family!r}")
    head = model.get_output_embeddings()
    if head is None:  # a sequence-classification model: its small score head stays whole on every rank
        return model
    vocab_rows = rank_rows(config.vocab_size)
    new_head = ColumnParallelLinear(head.weight, head.bias, vocab_rows, group, gather_output=True)
    if getattr(config, "tie_word_embeddings", False):
        new_head.weight = model.get_input_embeddings().weight  # the same shard, still tied
    model.set_output_embeddings(new_head)
    return model


def _state_tensors(model: nn.Module, grads: bool = False):
    """(key, owning module, name in it, tensor) of each parameter (with grads, each parameter's
    gradient) and persistent buffer of a model, in state-dict order, each tied weight once (as
    save_pretrained keeps it)."""
    seen = set()
    for name, module in model.named_modules():
        buffers = [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + ([] if grads else buffers):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield f"{name}.{tensor_name}" if name else tensor_name, module, tensor_name, tensor


def _dense_tensor(module: nn.Module, tensor_name: str, tensor: torch.Tensor, group) -> torch.Tensor:
    """One tensor of a tensor-parallel layer reassembled from every tp rank's shard, in the dense
    model's layout (anything else as it is); every rank of `group` calls it and gets the result."""
    tensor = tensor.detach()
    world = dist.get_world_size(group) if group is not None else 1
    sharded = isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
    if world == 1 or not sharded or (isinstance(module, RowParallelLinear) and tensor_name == "bias"):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    if isinstance(module, VocabParallelEmbedding):
        return torch.cat(parts, 0)
    index = module.rows if isinstance(module, ColumnParallelLinear) else module.columns
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(indices, index, group=group)
    dim = 0 if isinstance(module, ColumnParallelLinear) or tensor.dim() == 1 else 1
    shape = list(tensor.shape)
    shape[dim] = sum(i.numel() for i in indices)
    full = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    for part, rows in zip(parts, indices):
        full.index_copy_(dim, rows, part)
    return full.t().contiguous() if module.conv1d and full.dim() == 2 else full


def tensor_parallel_state_dict(model: nn.Module, group, grads: bool = False) -> dict:
    """The dense model's state dict (or, with grads, its parameters' gradients) reassembled from
    every rank's shards, in the dense model's layout, each tied weight once; all ranks call it and
    get the same result. For generating and for tests against a dense model (saving streams one
    tensor at a time instead: see dense_tensors)."""
    return {
        key: _dense_tensor(module, name, tensor.grad if grads else tensor, group).clone()
        for key, module, name, tensor in _state_tensors(model, grads)
    }


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store in `dtype` the weights that only enter matmuls (linear layers, tensor-parallel or not,
    GPT-2's Conv1D, an untied LM head); embeddings (a tied head is one), norms and biases keep
    theirs. Under autocast to `dtype` the model then computes bitwise what it did: autocast rounds
    those weights to the same values before every matmul anyway, while a copy cast whole would
    also round the embeddings, the norms and the residual stream that they feed. Frozen copies of
    a policy (PPO's reference, the model that samples under --pp) take half the memory this way
    and stay exactly the policy."""
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        matmul = (
            isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear))
            or type(module).__name__ == "Conv1D"
        )
        if matmul and module.weight is not embedding:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=module.weight.requires_grad)
    return model


# ---------------------------------------------------------------------------------------------
# Sequence parallel (Megatron) and context parallel (Ulysses): activations split along the sequence
# ---------------------------------------------------------------------------------------------
# Tensor parallel splits the matmuls, but every tp rank still holds the whole sequence in what
# lies between them: norms, residual adds, dropouts. Sequence parallel (Korthikanti et al., 2022)
# splits those along the sequence over tp_group. The all-reduce after a row-parallel layer becomes
# a reduce-scatter along the sequence, and the input of the next column-parallel layers is
# all-gathered along it first: the same bytes move (an all-reduce is a reduce-scatter plus an
# all-gather), and the activations between the matmuls shrink by the tp size.
# Context parallel (DeepSpeed-Ulysses, Jacobs et al., 2023) splits the whole forward along the
# sequence over cp_group: a rank holds 1/N of every sequence through every layer, and around
# attention one all-to-all turns its sequence shard of all heads into the whole sequence of 1/N of
# the heads, and a second turns the attention output back. It hooks into Hugging Face models as an
# attention function of transformers' registry, so their layers are not rewritten.
# Both begin and end at the base model (the trunk, model.base_model): a pass pads the sequence to a
# multiple of the split (masked tokens at the end, which no real token attends to), cuts it, runs
# the layers, and all-gathers the last hidden state. The LM head, a score or value head, log-probs
# and losses then see whole sequences exactly as without a split; their compute is repeated on
# each cp rank (the head is one matmul against the layers' dozens) and every statistic is the same
# on each. A pass that builds or reads a KV cache (sampling) is not split: cp ranks hold whole
# weights and sample like data-parallel ranks.
def _seq_reduce_scatter(x, group):
    parts = [part.contiguous() for part in x.chunk(dist.get_world_size(group), dim=1)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _split_sequence(x, group):
    """Forward: keep this rank's slice of the sequence (entering a split region from one where
    every rank holds the whole sequence). Backward: all-gather the gradient."""
    return _Exchange.apply(x, group, _shard, _all_gather)


def _gather_sequence(x, group, grad_scale: float = 1.0):
    """Forward: all-gather the sequence (leaving a split region: every rank then computes the same
    thing from the whole sequence). Backward: keep this rank's slice of the gradient, which is the
    same on every rank, times grad_scale (see _gather_outputs for why cp needs one)."""
    return _Exchange.apply(x, group, _all_gather, lambda grad, group: _shard(grad, group) * grad_scale)


def _gather_sequence_to_columns(x, group):
    """Forward: all-gather the sequence, the whole input column-parallel layers need. Backward:
    reduce-scatter: each rank's column shard gave part of every position's gradient, and each rank
    keeps the sum for its own positions."""
    return _Exchange.apply(x, group, _all_gather, _seq_reduce_scatter)


def _reduce_scatter_sequence(x, group):
    """Forward: sum a row-parallel layer's partial products and keep this rank's positions.
    Backward: all-gather the gradient, which every rank's partial product needs whole."""
    return _Exchange.apply(x, group, _seq_reduce_scatter, _all_gather)


def _all_to_all(x, group, scatter: int = 1, gather: int = 2):
    """Cut dimension `scatter` into N pieces, send piece j to rank j, and join what arrives along
    dimension `gather` in rank order. Ulysses uses it on [batch, heads, sequence, head_dim]:
    sequence shards of all heads in, the whole sequence of 1/N of the heads out."""
    inputs = [piece.contiguous() for piece in x.chunk(dist.get_world_size(group), dim=scatter)]
    outputs = [torch.empty_like(piece) for piece in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather)


def _ulysses_exchange(x, group):
    """Forward: _all_to_all of dimension 1 into 2. Backward: the same exchange with the two dimensions swapped."""
    return _Exchange.apply(x, group, _all_to_all, lambda grad, group: _all_to_all(grad, group, 2, 1))


_SEQUENCE_LAYOUT = {
    # model_type: (the norms whose outputs feed a layer's column-parallel matmuls, attention module)
    "gpt2": (("ln_1", "ln_2"), "attn"),
    "llama": (("input_layernorm", "post_attention_layernorm"), "self_attn"),
    "gpt_neox": (("input_layernorm", "post_attention_layernorm"), "attention"),
}


class _SequenceSplit:
    """How one base model's passes are split: sp_group (sequence parallel, the tp group) and
    cp_group; whether the pass running now is split, its length and under cp the whole sequence's
    attention mask. The layers and the attention function read it. A pass is split unless it asks for a KV cache
    (use_cache=True or past_key_values), as sampling does."""

    def __init__(self):
        self.sp_group = self.cp_group = self.mask = None
        self.active, self.length, self.passes, self.forks = False, 0, 0, []

    def fork_rng(self, device: torch.device, shard: int):
        """From here to the end of the pass (_gather_outputs), draw dropout masks of this rank's own:
        ranks holding different shards of the same sequences would otherwise draw the same masks, as
        they share a seed (Megatron's model-parallel RNG tracker seeds them apart too). The default
        generators are saved and reseeded from the run's seed, the pass and `shard` (this rank's
        index among those splitting the region); the pass's end restores them, so with dropout 0,
        where nothing is drawn, the run stays that of one process."""
        self.passes += 1
        self.forks.append(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        self.forks[-1].__enter__()
        torch.manual_seed(hash((torch.initial_seed(), self.passes, shard)) % 2**63)

    @property
    def sp_active(self) -> bool:
        return self.active and self.sp_group is not None

    def multiple(self) -> int:
        return group_size(self.sp_group) * group_size(self.cp_group)


def _split_inputs(trunk, args, kwargs):
    """The base model's forward pre-hook: pad the batch to a multiple of the split, and under cp
    hand the layers this rank's slice with its global positions and the whole sequence's mask."""
    split = trunk.sequence_split
    if args:  # GPT-2's LM head passes input_ids by position
        kwargs, args = {**kwargs, "input_ids": args[0]}, args[1:]
    input_ids = kwargs.get("input_ids")
    cached = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")
    split.active = input_ids is not None and not args and not cached
    if not split.active:
        return args, kwargs
    if split.cp_group is not None:  # from the embeddings' dropout on, each cp rank holds its own positions
        split.fork_rng(input_ids.device, dist.get_rank(split.cp_group))
    batch, length = input_ids.shape
    split.length = length
    pad = -length % split.multiple()
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    positions = kwargs.get("position_ids")
    positions = torch.arange(length, device=input_ids.device).expand(batch, -1) if positions is None else positions
    # The padding goes after the last token, where causal attention never lets a real token see it;
    # marking it attended keeps an all-ones mask all ones, so SDPA stays on its causal fast path.
    input_ids, positions = nn.functional.pad(input_ids, (0, pad)), nn.functional.pad(positions, (0, pad))
    mask = nn.functional.pad(mask, (0, pad), value=1)
    if split.cp_group is not None:
        from transformers.masking_utils import sdpa_mask

        # Attention sees the whole sequence, so it takes the whole sequence's [batch, 1, query, key]
        # mask, built as the model would build it unsplit (None when nothing is padded: causal
        # SDPA); the model is left to build one for its slice, which attention ignores.
        split.mask = sdpa_mask(
            batch_size=batch,
            q_length=length + pad,
            kv_length=length + pad,
            attention_mask=mask.bool(),
            device=mask.device,
        )
        input_ids, positions, mask = _shard(input_ids, split.cp_group), _shard(positions, split.cp_group), None
    kwargs.update(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return args, kwargs


def _gather_outputs(trunk, args, kwargs, output):
    """The base model's forward hook: the whole sequence's last hidden state, padding cut off."""
    split = trunk.sequence_split
    if not split.active:
        return output
    while split.forks:
        split.forks.pop().__exit__(None, None, None)
    hidden = output.last_hidden_state
    if split.cp_group is not None:
        # Every cp rank computes the same loss from the gathered states, and the gradients of the
        # weights are then averaged over dp x cp; each rank's share of the sequence must count
        # whole, not 1/cp: so the gradient flowing back into the split region is scaled by cp.
        hidden = _gather_sequence(hidden, split.cp_group, float(group_size(split.cp_group)))
    output.last_hidden_state = hidden[:, : split.length]
    if output.hidden_states is not None:  # only the last is gathered (the others stay this rank's shard)
        output.hidden_states = (*output.hidden_states[:-1], output.last_hidden_state)
    return output


def _sequence_split(model: nn.Module) -> _SequenceSplit:
    """The split state of the model's base model, installing its two hooks the first time."""
    trunk = model.base_model
    if getattr(trunk, "sequence_split", None) is None:
        if model.config.model_type not in _SEQUENCE_LAYOUT:
            raise SystemExit(
                f"error: sequence and context parallel know the {', '.join(_SEQUENCE_LAYOUT)} families, not "
                f"{model.config.model_type!r}"
            )
        trunk.sequence_split = _SequenceSplit()
        trunk.register_forward_pre_hook(_split_inputs, with_kwargs=True)
        trunk.register_forward_hook(_gather_outputs, with_kwargs=True)
    return trunk.sequence_split


def sequence_parallel(model: nn.Module, tp_group) -> nn.Module:
    """Megatron sequence parallelism on a model tensor_parallel has rewritten: between the matmuls
    each tp rank keeps 1/tp of the sequence. The first layer's input is cut (_split_sequence); each
    layer's norms hand the column-parallel matmuls the all-gathered sequence
    (_gather_sequence_to_columns); row-parallel matmuls reduce-scatter (_reduce_scatter_sequence); the
    final norm's output is all-gathered for the head (_gather_sequence). The weights the split
    region shares (norms, row-parallel biases) see only this rank's positions, so in a split pass
    they enter the forward through copy_to_group, whose backward all-reduces their gradients over
    tp_group: decided as each pass runs, so a backward treats every pass it differentiates as that
    pass ran, whatever passes (sampling's, unsplit) came between."""
    if tp_group is None:
        return model
    split = _sequence_split(model)
    split.sp_group = tp_group
    base_name, _, layers_name, norm_name, _ = _PIPELINE_LAYOUT[model.config.model_type]
    norm_names, _ = _SEQUENCE_LAYOUT[model.config.model_type]
    layers, final_norm = getattr(model.base_model, layers_name), getattr(model.base_model, norm_name)

    def split_first_input(layer, args, kwargs):
        if split.sp_active:  # from here each tp rank holds its own positions: its own dropout masks
            split.fork_rng(args[0].device, dist.get_rank(tp_group))
            args = (_split_sequence(args[0], tp_group), *args[1:])
        return args, kwargs

    def gather_for_columns(norm, args, output):
        return _gather_sequence_to_columns(output, tp_group) if split.sp_active else output

    def gather_for_head(norm, args, output):
        return _gather_sequence(output, tp_group) if split.sp_active else output

    def share_gradients(module, args):
        if split.sp_active:
            module.unsplit_parameters = dict(module._parameters)
            for name, param in module.unsplit_parameters.items():
                if param is not None and param.requires_grad and not getattr(param, "tensor_parallel", False):
                    module._parameters[name] = copy_to_group(param, tp_group)

    def restore_parameters(module, args, output):
        module._parameters.update(module.__dict__.pop("unsplit_parameters", {}))

    layers[0].register_forward_pre_hook(split_first_input, with_kwargs=True)
    for layer in layers:
        for name in norm_names:
            getattr(layer, name).register_forward_hook(gather_for_columns)
        for module in layer.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.sequence_split = split
    final_norm.register_forward_hook(gather_for_head)
    for module in [*layers.modules(), final_norm]:
        if module._parameters:
            module.register_forward_pre_hook(share_gradients)
            module.register_forward_hook(restore_parameters)
    return model


def _ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, run by each cp rank over the whole sequence for 1/N of the
    heads: query, key and value arrive as [batch, heads, this rank's positions, head_dim] and go
    through one all-to-all each; the output, [batch, positions, heads, head_dim], goes back
    through one more. The mask is the whole sequence's, from the split state (the model's is for
    its slice). Unsplit passes (sampling) are plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    split = module.sequence_split
    if not split.active:  # this attention is only installed where cp_group is set
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    query, key, value = (_ulysses_exchange(t, split.cp_group) for t in (query, key, value))
    output, weights = sdpa_attention_forward(module, query, key, value, split.mask, **kwargs)
    return _ulysses_exchange(output, split.cp_group), weights


def context_parallel(model: nn.Module, cp_group, tp_group=None) -> nn.Module:
    """Ulysses context parallelism over cp_group: each rank runs 1/N of every sequence through
    the whole model (see the section's opening). Attention runs as `_ulysses_attention`,
    registered with transformers as "context_parallel"; heads and key/value heads must divide by
    N times the tensor-parallel size, as each rank attends with whole heads."""
    if cp_group is None:
        return model
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config, cp, tp = model.config, group_size(cp_group), group_size(tp_group)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % (cp * tp) or kv_heads % (cp * tp):
        raise SystemExit(
            f"error: --cp {cp} x --tp {tp} = {cp * tp} must divide the attention heads ({heads}) and key/value heads "
            f"({kv_heads}), as each rank attends with whole heads; pick a --cp that does"
        )
    split = _sequence_split(model)
    split.cp_group = cp_group
    _, attention_name = _SEQUENCE_LAYOUT[config.model_type]
    for layer in getattr(model.base_model, _PIPELINE_LAYOUT[config.model_type][2]):
        getattr(layer, attention_name).sequence_split = split
    AttentionInterface.register("context_parallel", _ulysses_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("context_parallel", sdpa_mask)  # unsplit passes: SDPA's mask
    model.config._attn_implementation = "context_parallel"
    return model


def split_sequences(model: nn.Module, grid: Grid, sp: bool = False) -> nn.Module:
    """What a script calls on each model after tensor_parallel: sequence parallel over the grid's
    tp group if `sp`, context parallel over its cp group; a no-op without either."""
    if sp:
        model = sequence_parallel(model, grid.tp_group)
    return context_parallel(model, grid.cp_group, grid.tp_group)


# ---------------------------------------------------------------------------------------------
# Pipeline parallel: consecutive decoder layers on each rank of pp_group, micro-batches streamed
# ---------------------------------------------------------------------------------------------
# A stage is a Hugging Face causal LM with every module of the other stages removed. Only
# activations travel: stage i sends the hidden states of a micro-batch to stage i + 1 as it
# finishes its forward, and stage i + 1 sends their gradient back as it finishes its backward
# (point-to-point, both directions posted together with batch_isend_irecv). Everything else a
# decoder layer needs (the causal/padding mask, position ids, rotary cos/sin) is cheap and is
# recomputed on every stage from the micro-batch itself, which every stage gets from its own data
# loader: input_ids, attention_mask, labels (and position_ids where a script passes them).
#
# No shapes are sent and nothing is padded beyond what the data loader does: an activation of a
# micro-batch is [rows, seq_len, hidden], rows and seq_len are input_ids.shape on every stage,
# hidden is the config's and the dtype the widest of the stage's parameters (the residual stream
# stays in the norms' and embeddings' dtype under autocast, also where a frozen copy keeps its
# matmul weights in bf16), so each receiver allocates the right buffer by itself
# and micro-batches of different lengths (the last, short one; length-bucketed batches) just work.
#
# Tied embeddings (GPT-2): the first stage keeps the token embedding, the last stage keeps the
# same matrix as its LM head, a copy once the stages live in different processes (Megatron does
# the same). Both start equal because every rank loads the same weights, and stay equal because
# the schedules end by exchanging the two partial gradients between the first and the last stage
# and adding them, so both copies get the whole gradient and take identical optimizer steps.
_PIPELINE_LAYOUT = {
    # model_type: (base model attribute, embedding modules, decoder layers, final norm, embedding dropout)
    "gpt2": ("transformer", ("wte", "wpe"), "h", "ln_f", "drop"),
    "llama": ("model", ("embed_tokens",), "layers", "norm", None),
    "gpt_neox": ("gpt_neox", ("embed_in",), "layers", "final_layer_norm", "emb_dropout"),
}


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The decoder layers of `stage`: contiguous, as even as possible, the first num_layers %
    stages stages taking one layer more (np.array_split's rule), e.g. 5 layers on 4 stages are
    [0, 1], [2], [3], [4]. So the last stage, which also runs the final norm, the LM head and the
    loss, never gets an extra layer. The price: under 1F1B the first stage holds the most
    micro-batches in flight (pp), so its extra layer costs the most activation memory; a planner
    that balances memory rather than time would put the extra layers in the middle."""
    if not 1 <= stages <= num_layers:
        raise SystemExit(f"error: --pp {stages} needs at least one decoder layer per stage; the model has {num_layers}")
    size, extra = divmod(num_layers, stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (stage < extra))


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle fraction of a pipeline with equal stages and free communication, (p - 1) / (m + p - 1):
    each stage idles p - 1 forward slots waiting for the first micro-batch and as many backward
    slots draining the last, out of m + p - 1 slots each way. GPipe and 1F1B have the same bubble;
    1F1B only caps the micro-batches in flight at p instead of m."""
    return (stages - 1) / (micro_batches + stages - 1)


class PipelineStage(nn.Module):
    """This rank's stage of a GPT-2, Llama or GPT-NeoX causal LM, over the ranks of `group` (the
    grid's pp_group; None is one stage holding everything). The model is pruned in place, like
    tensor_parallel: the other stages' decoder layers become None in their ModuleList, and the
    embeddings (not on the first stage), the final norm and the LM head (not on the last) become
    None, so their parameters are freed and the stage's state_dict() is the subset of the dense
    model's under the dense names (prefixed "model."). Every rank must load the same full weights
    first; load with low_cpu_mem_usage / on the meta device where the whole model does not fit.

    forward(x, attention_mask, position_ids): x is input_ids on the first stage and the previous
    stage's hidden states elsewhere; returns hidden states, or on the last stage the logits (the
    final-normed hidden states if compute_logits=False, for a loss that applies the head itself,
    e.g. kernels.fused_logprobs with stage.head.weight). Missing position_ids default to 0..s-1,
    as in the HF models."""

    def __init__(self, model: nn.Module, group: Optional[dist.ProcessGroup] = None, compute_logits: bool = True):
        super().__init__()
        config = model.config
        if config.model_type not in _PIPELINE_LAYOUT:
            raise SystemExit(
                f"error: pipeline parallel knows the {', '.join(_PIPELINE_LAYOUT)} families, not {config.model_type!r}"
            )
        base_name, embedding_names, layers_name, norm_name, dropout_name = _PIPELINE_LAYOUT[config.model_type]
        self.group, self.compute_logits, self.config = group, compute_logits, config
        self.size = group_size(group)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.is_first, self.is_last = self.rank == 0, self.rank == self.size - 1
        # Neighbours as global ranks: P2POp takes the peer's global rank.
        self.prev_rank = dist.get_global_rank(group, self.rank - 1) if not self.is_first else None
        self.next_rank = dist.get_global_rank(group, self.rank + 1) if not self.is_last else None
        self.first_rank = dist.get_global_rank(group, 0) if group is not None else None
        self.last_rank = dist.get_global_rank(group, self.size - 1) if group is not None else None

        base = getattr(model, base_name)
        head = model.get_output_embeddings() or model.score  # LM head, or a reward model's score head
        head_name = next(name for name, module in model.named_children() if module is head)
        all_layers = getattr(base, layers_name)
        self.layer_indices = stage_layers(len(all_layers), self.size, self.rank)
        self.tied = self.size > 1 and head.weight is model.get_input_embeddings().weight
        if not self.is_first:
            for name in embedding_names:
                setattr(base, name, None)
        for index in range(len(all_layers)):
            if index not in self.layer_indices:
                all_layers[index] = None
        if not self.is_last:
            setattr(base, norm_name, None)
            setattr(model, head_name, None)
        self.model = model  # the only registered child: parameter names stay the dense model's
        # Unregistered handles on the kept modules, so that forward reads like the HF forward.
        self._embeddings = [getattr(base, name) for name in embedding_names] if self.is_first else []
        self._dropout = getattr(base, dropout_name) if dropout_name and self.is_first else None
        self._layers = [all_layers[index] for index in self.layer_indices]
        self._norm = getattr(base, norm_name) if self.is_last else None
        self._head = head if self.is_last else None
        self._rotary = getattr(base, "rotary_emb", None)  # buffers only; Llama and NeoX need it on every stage
        if group is not None:
            # Every stage must have cut the same model the same way; this first collective on the
            # group also makes NCCL set the group up with every rank present, as its P2P requires.
            shapes = all_gather_objects((config.model_type, len(all_layers), config.hidden_size), group)
            assert len(set(shapes)) == 1, f"the pipeline stages were built from different models: {shapes}"

    @property
    def head(self) -> Optional[nn.Module]:
        """The LM head (last stage only), for losses that apply it themselves."""
        return self._head

    @property
    def tied_weight(self) -> Optional[nn.Parameter]:
        """The tied embedding / LM head matrix on the first and last stages, when pipelined."""
        if not self.tied:
            return None
        return self._embeddings[0].weight if self.is_first else self._head.weight if self.is_last else None

    def activation(self, micro_batch: dict) -> tuple:
        """(shape, dtype) of the hidden states a micro-batch sends between stages."""
        rows, length = micro_batch["input_ids"].shape
        dtype = max((p.dtype for p in self.parameters() if p.is_floating_point()), key=lambda d: torch.finfo(d).bits)
        return (rows, length, self.config.hidden_size), dtype

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        length = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).unsqueeze(0)
        if self.is_first:
            hidden = self._embeddings[0](x)
            if len(self._embeddings) > 1:  # GPT-2's learned positions
                hidden = hidden + self._embeddings[1](position_ids)
            if self._dropout is not None:
                hidden = self._dropout(hidden)
        else:
            hidden = x
        # As the HF top-level forward builds them; the mask reads only the shape, dtype and device
        # of `inputs_embeds`, which received hidden states share with the first stage's embeddings.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        extra = (
            {"position_embeddings": self._rotary(hidden, position_ids=position_ids)} if self._rotary is not None else {}
        )
        for layer in self._layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, **extra)
        if self.is_last:
            hidden = self._norm(hidden)
            if self.compute_logits:
                hidden = self._head(hidden)
        return hidden


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens) -> torch.Tensor:
    """Next-token cross-entropy summed over a micro-batch's labelled tokens (-100 is ignored) and
    divided by num_tokens, the labelled-token count of the WHOLE batch (every micro-batch of every
    data-parallel rank), so that the micro-batch losses add up to the whole batch's mean and their
    gradients to its gradient. The HF models' own loss, but in the logits' dtype when it is at
    least fp32 (HF always uses fp32)."""
    logits = logits[:, :-1].flatten(0, 1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    labels = labels[:, 1:].flatten().to(logits.device)
    return nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_tokens


def count_label_tokens(micro_batches: list, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The labelled tokens (label != -100, past the first position) of all micro-batches, summed over
    `group` (pass the dp_group when the batch is split over data-parallel ranks): causal_lm_loss's
    num_tokens."""
    count = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    return all_reduce_sum(torch.as_tensor(count, dtype=torch.float64, device=micro_batches[0]["labels"].device), group)


def _p2p(stage: PipelineStage, send_next=None, send_prev=None, recv_prev=None, recv_next=None) -> tuple:
    """Post every send and receive of one step together and wait for all of them. recv_prev and
    recv_next are (shape, dtype) of the buffer to receive into, or None. Posting both directions
    in one batch is what keeps 1F1B's steady state (send an activation forward while receiving a
    gradient from the same neighbour) free of deadlocks: neither side waits for the other's
    receive before posting its own."""
    ops, received = [], []
    for send, recv, peer in ((send_prev, recv_prev, stage.prev_rank), (send_next, recv_next, stage.next_rank)):
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), peer, stage.group))
        received.append(None if recv is None else torch.empty(recv[0], dtype=recv[1], device=_device(stage)))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, received[-1], peer, stage.group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return tuple(received)


def _device(stage: PipelineStage) -> torch.device:
    return next(stage.parameters()).device


class _Runner:
    """What both schedules share: one micro-batch's forward and backward on this stage, the
    messages to the neighbours around them, the loss, the busy-time clock, and which backward is
    the last (where a DataParallel-wrapped stage reduces gradients over its dp_group; every
    earlier backward runs under no_sync)."""

    def __init__(self, stage: nn.Module, micro_batches: list, loss_fn, timings: Optional[dict]):
        self.wrapper = stage  # called for forward: a DataParallel wrapper forwards to the stage
        self.stage = stage if isinstance(stage, PipelineStage) else stage.module
        assert isinstance(self.stage, PipelineStage), (
            "the schedules run a PipelineStage, optionally wrapped in DataParallel"
        )
        assert micro_batches, "a schedule needs at least one micro-batch"
        # The tied-gradient exchange adds whole gradients; ZeRO-1/2 leave only a shard of them.
        assert not (self.stage.tied and getattr(stage, "zero_stage", 0) >= 1), (
            "tied embeddings across pipeline stages need zero_stage 0"
        )
        self.micro_batches, self.loss_fn, self.timings = micro_batches, loss_fn, timings
        self.backwards_left = len(micro_batches)
        self.inputs, self.outputs = {}, {}  # of the micro-batches between their forward and backward
        self.total_loss = None
        self.busy, self.order = 0.0, []
        self.start = self._clock()

    def _clock(self) -> float:
        if self.timings is not None and _device(self.stage).type == "cuda":
            torch.cuda.synchronize()  # only when timing: it stalls the host on every kernel
        return time.perf_counter()

    def receive_forward(self, index: int, send_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The first stage's input is the micro-batch's token ids, which need no gradient. Other
        stages receive the previous stage's hidden states (while sending back a gradient, when
        1F1B has one to send) and mark them as needing a gradient, which is what they send back."""
        if self.stage.is_first:
            _p2p(self.stage, send_prev=send_grad)
            return self.micro_batches[index]["input_ids"]
        x, _ = _p2p(self.stage, send_prev=send_grad, recv_prev=self.stage.activation(self.micro_batches[index]))
        return x.requires_grad_()

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The stage's output for micro-batch `index` (on the last stage: its loss), kept with x
        for its backward."""
        micro_batch = self.micro_batches[index]
        began = self._clock()
        self.order.append(("F", index))
        y = self.wrapper(
            x, attention_mask=micro_batch.get("attention_mask"), position_ids=micro_batch.get("position_ids")
        )
        if self.stage.is_last:
            y = self.loss_fn(y, micro_batch)
            loss = y.detach()
            self.total_loss = loss if self.total_loss is None else self.total_loss + loss
        self.busy += self._clock() - began
        self.inputs[index], self.outputs[index] = x, y
        return y

    def backward(self, index: int, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Backward of micro-batch `index` from its output (the loss on the last stage, else the
        hidden states with the gradient the next stage sent); returns the input's gradient, or
        None on the first stage. The graph of a micro-batch dies with its backward."""
        x, y = self.inputs.pop(index), self.outputs.pop(index)
        self.order.append(("B", index))
        self.backwards_left -= 1
        sync = self.backwards_left == 0 or not hasattr(self.wrapper, "no_sync")
        began = self._clock()
        with contextlib.nullcontext() if sync else self.wrapper.no_sync():
            if y.requires_grad:  # not so on a first stage with nothing to train (Hydra's frozen bottom)
                torch.autograd.backward(y, grad_tensors=None if self.stage.is_last else grad)
        self.busy += self._clock() - began
        if self.stage.is_first:
            return None
        return x.grad if x.grad is not None else torch.zeros_like(x)

    def forwards(self, indices):
        """The forwards of micro-batches `indices` in turn, each output sent on to the next stage."""
        for index in indices:
            y = self.forward(index, self.receive_forward(index))
            if not self.stage.is_last:
                _p2p(self.stage, send_next=y.detach())

    def backwards(self, indices):
        """The backwards of micro-batches `indices` in turn, each from the gradient the next stage
        sends back, each input's gradient sent to the previous stage."""
        for index in indices:
            grad = None
            if not self.stage.is_last:
                _, grad = _p2p(self.stage, recv_next=self.stage.activation(self.micro_batches[index]))
            _p2p(self.stage, send_prev=self.backward(index, grad))

    def finish(self, broadcast_loss: bool) -> Optional[torch.Tensor]:
        """Tied embedding gradients, the loss, the timings."""
        stage = self.stage
        tied = stage.tied_weight
        if tied is not None:
            # First and last stage swap their partial gradients; a + b == b + a exactly, so both
            # copies end bitwise equal.
            grad = tied.grad if tied.grad is not None else torch.zeros_like(tied)
            other = torch.empty_like(grad)
            peer = stage.last_rank if stage.is_first else stage.first_rank
            send = dist.P2POp(dist.isend, grad.contiguous(), peer, stage.group)
            receive = dist.P2POp(dist.irecv, other, peer, stage.group)
            for request in dist.batch_isend_irecv([send, receive]):
                request.wait()
            if tied.grad is None:
                tied.grad = other
            else:
                tied.grad.add_(other)
        loss = self.total_loss
        if broadcast_loss:
            loss = (
                loss.to(torch.float64) if stage.is_last else torch.zeros((), dtype=torch.float64, device=_device(stage))
            )
            if stage.group is not None:
                dist.broadcast(loss, src=stage.last_rank, group=stage.group)
        if self.timings is not None:
            total = self._clock() - self.start
            self.timings.update(
                busy=self.busy, total=total, bubble=1.0 - self.busy / total if total > 0 else 0.0, order=self.order
            )
        return loss


def pipeline_afab(
    stage: nn.Module, micro_batches: list, loss_fn, broadcast_loss: bool = True, timings: Optional[dict] = None
) -> Optional[torch.Tensor]:
    """All forwards, then all backwards (GPipe), of the micro-batches on this stage; every stage of
    the pipeline calls it with the same number of micro-batches (each its own copy of them).

    micro_batches: dicts with input_ids and optionally attention_mask, position_ids, labels.
    loss_fn(output, micro_batch) -> scalar, called on the last stage only; scale it so that the
    micro-batch losses add up to the whole batch's loss (causal_lm_loss with count_label_tokens
    does). Gradients accumulate into .grad (zero them between batches as usual); the tied
    embedding's two copies are made whole at the end. Returns the summed loss: on every stage
    (broadcast from the last, fp64) by default, on the last stage only with broadcast_loss=False
    (None elsewhere). `timings`, a dict, receives this stage's busy seconds (forward and backward
    compute), total seconds, the measured bubble 1 - busy / total (waiting for neighbours and
    communicating count as idle) and the order of its steps, [("F" or "B", micro-batch), ...].

    Simple, but stage i keeps the activations of all M micro-batches until the backwards start,
    so memory grows with M."""
    run = _Runner(stage, micro_batches, loss_fn, timings)
    run.forwards(range(len(micro_batches)))
    run.backwards(range(len(micro_batches)))
    return run.finish(broadcast_loss)


def pipeline_1f1b(
    stage: nn.Module, micro_batches: list, loss_fn, broadcast_loss: bool = True, timings: Optional[dict] = None
) -> Optional[torch.Tensor]:
    """One forward, one backward (PipeDream-Flush, Megatron's default schedule); arguments and
    result as pipeline_afab. Stage i runs pp - i - 1 warm-up forwards, then alternates one forward
    and one backward, then drains the remaining backwards. The same bubble as GPipe, but a stage
    never holds more than pp - i micro-batches' activations, whatever the number of micro-batches.

    Each step's messages go in one batch: after a forward, the output goes to the next stage
    while the gradient of the oldest micro-batch in flight comes back from it; after a backward,
    the input gradient goes to the previous stage while the next micro-batch's activations come
    from it."""
    run = _Runner(stage, micro_batches, loss_fn, timings)
    s, count = run.stage, len(micro_batches)
    warmup = min(s.size - s.rank - 1, count)
    run.forwards(range(warmup))
    steady = count - warmup
    x = run.receive_forward(warmup) if steady > 0 else None
    for step in range(steady):
        index, oldest = warmup + step, step  # forward micro-batch `index`, backward `oldest`
        y = run.forward(index, x)
        grad = None
        if not s.is_last:
            _, grad = _p2p(s, send_next=y.detach(), recv_next=s.activation(micro_batches[oldest]))
        dx = run.backward(oldest, grad)
        if step < steady - 1:
            x = run.receive_forward(index + 1, send_grad=dx)
        else:
            _p2p(s, send_prev=dx)
    run.backwards(range(steady, count))
    return run.finish(broadcast_loss)


@torch.no_grad()
def pipeline_forward(stage: nn.Module, micro_batches: list, statistic_fn) -> Optional[torch.Tensor]:
    """Forward only (evaluation): each micro-batch goes through the stages in turn and the last
    stage reduces its output with statistic_fn(output, micro_batch) -> a 1-d tensor of sums (e.g.
    summed loss and token count). Returns the sum over micro-batches on every stage (fp64,
    broadcast from the last). No activations are kept, so there is no schedule to speak of."""
    module = stage if isinstance(stage, PipelineStage) else stage.module
    total = None
    for micro_batch in micro_batches:
        if module.is_first:
            x = micro_batch["input_ids"]
        else:
            x, _ = _p2p(module, recv_prev=module.activation(micro_batch))
        y = stage(x, attention_mask=micro_batch.get("attention_mask"), position_ids=micro_batch.get("position_ids"))
        if module.is_last:
            value = statistic_fn(y, micro_batch).to(torch.float64)
            total = value if total is None else total + value
        else:
            _p2p(module, send_next=y)
    if module.group is not None:
        size = all_gather_objects(None if total is None else total.numel(), module.group)[-1]
        total = total if module.is_last else torch.zeros(size, dtype=torch.float64, device=_device(module))
        dist.broadcast(total, src=module.last_rank, group=module.group)
    return total


def is_pipelined(model: nn.Module) -> bool:
    """Whether model is a PipelineStage, or a data-parallel wrapper of one."""
    return isinstance(model, PipelineStage) or isinstance(getattr(model, "module", None), PipelineStage)


def forward_backward(model: nn.Module, micro_batches: list, loss_fn, trunk=None, autocast=contextlib.nullcontext()):
    """Accumulate into .grad the gradient of the micro-batches' summed loss, whatever the layout,
    so that an algorithm writes its loss once: loss_fn(hidden, micro_batch) turns one micro-batch's
    final hidden states into its loss.

    Under pipeline parallelism (model is a stage, or wraps one) the micro-batches run through the
    stages in the 1F1B schedule, loss_fn on the last stage. Otherwise each runs here in turn:
    trunk(micro_batch) gives the hidden states, and the backward of its loss runs under
    model.no_sync() for all but the last micro-batch, so only the last backward communicates.
    The forward runs under `autocast`; outside the pipeline the backward runs after it, as usual."""
    if is_pipelined(model):
        with autocast:
            pipeline_1f1b(model, micro_batches, loss_fn, broadcast_loss=False)
        return
    for index, micro_batch in enumerate(micro_batches):
        with model.no_sync() if index < len(micro_batches) - 1 else contextlib.nullcontext():
            with autocast:
                loss = loss_fn(trunk(micro_batch), micro_batch)
            loss.backward()


@torch.no_grad()
def forward_only(model: nn.Module, micro_batches: list, output_fn, trunk=None):
    """forward_backward without gradients: output_fn(hidden, micro_batch) receives each
    micro-batch's final hidden states (on the last pipeline stage under pipeline parallelism,
    which every stage of the pipeline must call together) and keeps what it needs."""
    if not is_pipelined(model):
        for micro_batch in micro_batches:
            output_fn(trunk(micro_batch), micro_batch)
        return

    def no_statistic(hidden, micro_batch):
        output_fn(hidden, micro_batch)
        return torch.zeros(1, device=hidden.device)

    pipeline_forward(model, micro_batches, no_statistic)


def pipeline_state_dict(stage: nn.Module, tp_group: Optional[dist.ProcessGroup] = None) -> dict:
    """The whole dense model's state dict on every stage: each stage's share (reassembled over
    tp_group first when tensor-parallel; without tp_group a tensor-parallel stage contributes this
    rank's shards) all-gathered over the pipeline group. For saving and for
    generating, which this file does with a whole model rather than through the pipeline: a
    token-by-token loop through p stages would idle p - 1 of them at every token, so gathering the
    weights once (a full copy per rank for the duration, as ZeRO-3's gathered()) is both simpler
    and faster for the short generations of evaluation and PPO rollouts."""
    module = stage if isinstance(stage, PipelineStage) else stage.module
    if tp_group is not None:
        share = tensor_parallel_state_dict(module.model, tp_group)
    else:
        share = {k: v.detach() for k, v in module.model.state_dict().items()}
    if module.group is None:
        return share
    parts = all_gather_objects({k: v.cpu() for k, v in share.items()}, module.group)
    return {k: v.to(_device(module)) for part in parts for k, v in part.items()}


def pipeline_gathered_model(
    stage: nn.Module,
    tp_group: Optional[dist.ProcessGroup] = None,
    keep_tensor_parallel: bool = False,
    matmul_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A whole copy of the pipelined model on this rank, in eval mode, e.g. for generate(); every
    rank of the pipeline group must call it. The copy has the stage's dtype; matmul_dtype (bf16 for
    a model run under bf16 autocast) stores its matmul weights in that dtype, which halves them and
    changes nothing it computes under autocast (see cast_matmul_weights).

    By default the copy is dense (the tensor-parallel shards reassembled over tp_group first): what
    saving needs. It is built as a randomly initialised model on a forked RNG (so making it leaves
    the run's random stream as it was, the same with and without --pp) that then loads the state.

    keep_tensor_parallel=True gathers over the pipeline only: the copy stays split over tp_group
    as the stage is (1/tp of the model per rank; its forward is then a collective of the tp
    ranks, which must call it together), which is what generating with a model too large for
    one GPU can afford. It is built on the meta device, rewritten by tensor_parallel into the
    stage's layer shapes, and takes the gathered shards as its parameters; the rotary embedding,
    whose buffers are not in the state dict, is the stage's own (every stage has it)."""
    module = stage if isinstance(stage, PipelineStage) else stage.module
    device = _device(module)
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    model_class = type(module.model)  # the same class: causal LM or reward model
    if not keep_tensor_parallel or tp_group is None:
        state = pipeline_state_dict(stage, tp_group)
        with torch.random.fork_rng(devices=[]):
            model = model_class._from_config(module.config, dtype=dtype).to(device)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
        model.tie_weights()
        return (cast_matmul_weights(model, matmul_dtype) if matmul_dtype else model).eval()
    state = pipeline_state_dict(stage)  # this tensor-parallel rank's shards of every stage
    with torch.device("meta"):
        model = model_class._from_config(module.config, dtype=dtype)
    tensor_parallel(model, tp_group, index_device=device)
    state = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
    if getattr(module.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if module._rotary is not None:
        setattr(getattr(model, _PIPELINE_LAYOUT[module.config.model_type][0]), "rotary_emb", module._rotary)
    left = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    assert not left, f"not gathered: {left}"
    return (cast_matmul_weights(model, matmul_dtype) if matmul_dtype else model).eval()


# ---------------------------------------------------------------------------------------------
# Checkpoints: what is saved where, by whom, and how a run stops and resumes
# ---------------------------------------------------------------------------------------------
# A checkpoint is checkpoints/<name> in the run directory (step_00000010, round_00000002), written
# as <name>.tmp and renamed once complete, so a kill mid-write never leaves a checkpoint that
# --resume would find. In it:
#   - rank_R.pt, written by every rank R: its RNG states (which only the same layout reads back);
#   - trainer_state.pt, written by rank 0: the shared state (step, scheduler, flags, world size...);
#   - <prefix>.safetensors (or <prefix>-0000i-of-0000N.safetensors and an index, as transformers
#     shards them), from a stream that every rank feeds and sees: each tensor is gathered alone (a
#     ZeRO-3 unit at a time, a tensor-parallel matrix at a time, a pipeline stage's tensors sent one
#     by one over its group); the files are dealt round robin, file i written by rank i % world
#     size, which copies its file's tensors to its CPU, so writing is spread over the ranks and no
#     rank ever holds more than its shards plus one block and one file's worth of CPU memory. With
#     prefix "model" and the model's config beside it, the checkpoint is a Hugging Face model
#     directory that from_pretrained loads. optimizer.safetensors streams AdamW's moments so, keyed
#     by the weights' names, which any layout reshards on --resume (see load_optimizer). Dense files
#     rather than torch.distributed.checkpoint's per-rank shards: any layout, and plain transformers,
#     read them with no planner, at the cost of the all-gathers (a ZeRO-3 forward pass's traffic);
#   - manifest.json, written last by rank 0: every file's size and SHA-256 (each rank hashing a
#     share of the files), so --resume can tell an intact checkpoint from one damaged since and fall
#     back to the newest intact one.
# The final model is the same stream written into the run directory (config.json moved in last).
# A clean stop: SIGTERM (what SLURM and Kubernetes send before SIGKILL) or SIGUSR1 (SLURM's
# --signal) only sets a flag; after each optimizer step the scripts ask stop_requested(), which
# every rank answers together (a max over the world), then checkpoint and exit 0.
MANIFEST = "manifest.json"
_stop_signal = []  # the signals received, set by the handler, read after a step


def fail(message: str):
    """Every script's fail(), and this file's for what it checks on their behalf (a damaged checkpoint,
    one of another layout): one `error:` line on stderr and exit status 1, bad input being the user's
    to fix, not a traceback to read. Under torchrun every rank meets the same bad input and rank 0
    prints the line; torchrun ends all ranks as soon as one exits, so the others wait first. A rank
    still running after the wait failed alone: it prints its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(tqdm.tqdm._instances) if tqdm else []:
        bar.close()  # or the line would be glued to a progress bar
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(10)
    raise SystemExit(f"error: {message}" if rank == "0" else f"error: rank {rank}: {message}")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str, grid: Optional[Grid] = None):
    """Record the size and checksum of every file in a checkpoint folder: with a grid, every rank
    calls it and hashes a share of the files, and rank 0 writes the manifest."""
    rank, world = (grid.rank, grid.world_size) if grid else (0, 1)
    paths = {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))[rank::world]}
    files = {name: {"bytes": os.path.getsize(path), "sha256": file_sha256(path)} for name, path in paths.items()}
    shares = all_gather_objects(files, dist.group.WORLD if world > 1 else None)
    if rank == 0:
        with open(os.path.join(folder, MANIFEST), "w") as file:
            json.dump(dict(sorted(item for share in shares for item in share.items())), file, indent=1)


def checkpoint_damage(folder: str) -> Optional[str]:
    """What is wrong with a checkpoint folder (a file missing, cut short or changed since its manifest
    was written), or None if it is intact."""
    try:
        with open(os.path.join(folder, MANIFEST)) as file:
            files = json.load(file)
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != expected["bytes"] or file_sha256(path) != expected["sha256"]:
            return f"{name} is not the file that was saved (its size or checksum differs)"
    return None


def find_checkpoint(path: str, verbose: bool = True) -> str:
    """The checkpoint to resume from: `path` itself if it is a checkpoint folder, else the newest
    intact checkpoint in the run directory's checkpoints/. A damaged one is named and skipped for
    the next older. Every rank checks for itself and reaches the same answer."""
    if os.path.isfile(os.path.join(path, "trainer_state.pt")) or os.path.isfile(os.path.join(path, MANIFEST)):
        damage = checkpoint_damage(path)
        if damage:
            fail(
                f"--resume {path}: the checkpoint is damaged ({damage}); "
                "pass its run directory to resume from the newest intact checkpoint"
            )
        return path
    folder = os.path.join(path, "checkpoints")
    names = sorted((d for d in os.listdir(folder) if not d.endswith(".tmp")) if os.path.isdir(folder) else [])
    if not names:
        fail(f"--resume {path!r} is not a checkpoint (no trainer_state.pt) nor a run directory with checkpoints/")
    for name in reversed(names):
        damage = checkpoint_damage(os.path.join(folder, name))
        if damage is None:
            return os.path.join(folder, name)
        if verbose:
            print(f"warning: checkpoint {os.path.join(folder, name)} is damaged ({damage}); trying the one before it")
    fail(f"--resume {path}: every checkpoint in {folder} is damaged; the run cannot be resumed")


def check_output_dir(args):
    """check_args' rule for --output-dir: a directory that holds a finished run (config.json) or a
    started one (checkpoints/) is continued with --resume, not written over."""
    folder = args.output_dir
    started = folder and any(os.path.exists(os.path.join(folder, n)) for n in ("config.json", "checkpoints"))
    if started and not args.resume:
        fail(
            f"--output-dir {folder} already holds a run; pick another directory, "
            f"or pass --resume {folder} to continue it"
        )


def rng_states() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: Optional[dict]):
    if states is None:  # a checkpoint of another layout (see load_checkpoint): the fresh run's streams
        return
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def dense_tensors(model: Optional[nn.Module], wrapper: Optional[nn.Module], grid: Grid, trained: bool = False):
    """(key, tensor) of `model`'s dense state dict (with trained, only the parameters that `wrapper`
    trains), one tensor at a time, on every rank, each valid until the next is asked for (copy what
    you keep). Every rank must consume the whole stream (it communicates). `model` is what a script
    saves (an HF model, a head, a LoRA-merged copy); `wrapper` the data-parallel wrapper it trains
    in, whose ZeRO-3 units are gathered one at a time (and freed again unless inside gathered()); a
    tensor-parallel tensor is all-gathered over tp_group. Under --pp each rank passes what its stage
    holds (the stage's part of the model; a head only the last stage has, None elsewhere), and each
    tensor is broadcast over pp_group from the first stage that has it (so a head every stage keeps
    a copy of is saved once; the last stage's copy of a tied embedding is left out, as
    save_pretrained leaves the tied head out)."""
    fsdp = wrapper if isinstance(wrapper, FullyShardedDataParallel) and wrapper.world > 1 else None
    stage = next((m for m in wrapper.modules() if isinstance(m, PipelineStage)), None) if wrapper else None
    tied = stage.tied_weight if stage is not None and stage.is_last else None
    stepped = {p for p in wrapper.module.parameters() if p.requires_grad} if trained else None
    entries = _state_tensors(model) if model is not None else []
    local = {entry[0]: entry for entry in entries if entry[3] is not tied and (not trained or entry[3] in stepped)}
    owner = dict.fromkeys(local, 0)  # key -> the pipeline stage that sends it
    if grid.pp_group is not None:
        owner = {}
        for index, keys in enumerate(all_gather_objects(list(local), grid.pp_group)):
            owner.update((key, index) for key in keys if key not in owner)
    me = dist.get_rank(grid.pp_group) if grid.pp_group is not None else 0
    gathered = []
    for key, index in owner.items():
        tensor = None
        if index == me:
            _, module, name, tensor = local[key]
            flat = fsdp.owner.get(tensor) if fsdp is not None else None
            if flat is not None and not flat.gathered:  # a new ZeRO-3 unit: free the last one's shards
                if gathered and gathered[-1].unit is not flat.unit and not fsdp._keep_gathered:
                    for done in gathered:
                        done.free()
                    gathered = []
                flat.gather()
                gathered.append(flat)
            tensor = _dense_tensor(module, name, tensor, grid.tp_group)
        if grid.pp_group is not None:
            source = dist.get_global_rank(grid.pp_group, index)
            meta = [(tensor.shape, tensor.dtype) if tensor is not None else None]
            dist.broadcast_object_list(meta, src=source, group=grid.pp_group, device=grid.device)
            tensor = tensor if tensor is not None else torch.empty(meta[0][0], dtype=meta[0][1], device=grid.device)
            dist.broadcast(tensor, src=source, group=grid.pp_group)
        yield key, tensor
    for done in gathered if fsdp is not None and not fsdp._keep_gathered else []:
        done.free()


def write_safetensors(folder: str, prefix: str, tensors, grid: Optional[Grid] = None, max_shard_bytes: int = 2**31):
    """Write a (key, tensor) stream as transformers shards a model: <prefix>.safetensors when it
    fits in one file, else <prefix>-0000i-of-0000N.safetensors and <prefix>.safetensors.index.json.
    With a grid, every rank consumes the stream and cuts the files where the others do; file i is
    written by rank i % world size, which holds one file's worth at most, and the index by rank 0."""
    from safetensors.torch import save_file

    rank, world = (grid.rank, grid.world_size) if grid else (0, 1)
    shards, current, size, total = [], {}, 0, 0  # shards: the keys of each file

    def flush():
        if current or not shards:  # an empty stream still writes its (empty) file
            if len(shards) % world == rank:
                save_file(current, os.path.join(folder, f"{prefix}.part{len(shards)}"), metadata={"format": "pt"})
            shards.append(list(current))
            current.clear()

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        mine = len(shards) % world == rank
        current[key] = tensor.to("cpu", memory_format=torch.contiguous_format, copy=True) if mine else None
        size, total = size + nbytes, total + nbytes
    flush()
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    names = names if len(shards) > 1 else [f"{prefix}.safetensors"]
    for index in range(rank, len(shards), world):
        os.replace(os.path.join(folder, f"{prefix}.part{index}"), os.path.join(folder, names[index]))
    if len(shards) > 1 and rank == 0:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        with open(os.path.join(folder, f"{prefix}.safetensors.index.json"), "w") as file:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, file, indent=2)


def _stored_files(folder: str, prefix: str) -> dict:
    """{key: file name} of what write_safetensors wrote."""
    from safetensors import safe_open

    index = os.path.join(folder, f"{prefix}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as file:
            return json.load(file)["weight_map"]
    with safe_open(os.path.join(folder, f"{prefix}.safetensors"), "pt") as file:
        return dict.fromkeys(file.keys(), f"{prefix}.safetensors")


def stored_tensors(folder: str, prefix: str, device="cpu"):
    """What write_safetensors wrote, read back one tensor at a time as (key, tensor)."""
    from safetensors import safe_open

    for name in sorted(set(_stored_files(folder, prefix).values())):
        with safe_open(os.path.join(folder, name), "pt", device=str(device)) as file:
            for key in file.keys():
                yield key, file.get_tensor(key)


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state of a parameter, besides its step count


@contextlib.contextmanager
def _moment_as_weights(optimizer: torch.optim.Optimizer, wrapper: nn.Module, moment: str):
    """Inside, each parameter the optimizer steps holds its `moment` (zeros before its first step)
    in place of its weights, so that dense_tensors streams the moments as it streams the weights.
    Under ZeRO-1/2 those parameters are slices of flat buffers the model's parameters view: the
    moments are copied in and all-gathered, and the weights copied back and all-gathered after."""
    stepped = wrapper.optimizer_parameters()
    gathers = isinstance(wrapper, DataParallel) and wrapper.path.sharded and wrapper.world > 1
    weights = [p.data.clone() if gathers else p.data for p in stepped]

    def hold(values):
        for param, value in zip(stepped, values):
            if gathers:
                param.data.copy_(value)
            else:
                param.data = value
        if gathers:
            wrapper._after_step()

    hold([optimizer.state[p].get(moment, torch.zeros_like(p)) for p in stepped])
    try:
        yield
    finally:
        hold(weights)


def optimizer_tensors(optimizer: torch.optim.Optimizer, wrapper: nn.Module, grid: Grid, models: dict):
    """(key, tensor) of an AdamW's state, dense and keyed as the weights are, so that any layout can
    reshard it (see load_optimizer): for each parameter it steps in `models` {file prefix: module},
    "<prefix>.<key>.exp_avg" and ".exp_avg_sq", streamed as dense_tensors streams the weights (no
    rank holds more than its shards plus one block); then "step", the steps taken."""
    for moment in MOMENTS:
        with _moment_as_weights(optimizer, wrapper, moment):
            for prefix, model in models.items():
                for key, tensor in dense_tensors(model, wrapper, grid, trained=True):
                    yield f"{prefix}.{key}.{moment}", tensor
    steps = [float(state["step"]) for state in optimizer.state.values() if "step" in state]
    # A pipeline stage with nothing to train (Hydra's frozen first stage) has taken none: the others' count.
    yield "step", torch.tensor(max(all_gather_objects(max(steps, default=0.0), grid.pp_group)))


def _stepped_pieces(wrapper: nn.Module) -> list:
    """(parameter the optimizer steps, [(model parameter, start, lo, hi)]): elements lo:hi of each
    model parameter (flattened; this rank's tensor-parallel shard of it) are elements start: of the
    stepped one. Under ZeRO-1/2/3 a stepped parameter is this rank's slice of a flat buffer of
    model parameters (a _Bucket, a _FlatShard), elsewhere a model parameter itself."""
    if isinstance(wrapper, FullyShardedDataParallel) and wrapper.world > 1:
        flats = [flat for flat in wrapper.flat_shards if flat.trainable]
    elif isinstance(wrapper, DataParallel) and wrapper.world > 1 and wrapper.path.sharded:
        flats = wrapper.buckets
    else:
        return [(p, [(p, 0, 0, p.numel())]) for p in wrapper.optimizer_parameters()]
    stepped = []
    for flat in flats:
        first, end = wrapper.rank * flat.shard_size, (wrapper.rank + 1) * flat.shard_size
        pieces = [
            (p, max(offset, first) - first, max(offset, first) - offset, min(offset + p.numel(), end) - offset)
            for p, offset in zip(flat.params, flat.offsets)
            if offset < end and offset + p.numel() > first
        ]
        stepped.append((flat.shard, pieces))
    return stepped


def _local_part(module: nn.Module, name: str, dense: torch.Tensor) -> torch.Tensor:
    """This rank's part of the dense tensor `module` holds as `name`: under tensor parallelism the
    rows or columns that tensor_parallel cut for it (_dense_tensor's inverse), else the tensor."""
    if not getattr(getattr(module, name), "tensor_parallel", False):
        return dense
    if isinstance(module, VocabParallelEmbedding):
        return dense[module.start : module.end]
    dense = dense.t() if module.conv1d and dense.dim() == 2 else dense
    return dense[module.rows.cpu()] if isinstance(module, ColumnParallelLinear) else dense[:, module.columns.cpu()]


def load_dense(model: nn.Module, state: dict) -> list:
    """Copy a dense state dict (as dense_tensors streams it) into `model`, whatever its tensor-parallel
    split; returns the keys `state` lacks (a tied head is saved once, as its embedding)."""
    entries = list(_state_tensors(model))
    for key, module, name, tensor in entries:
        if key in state:
            tensor.data.copy_(_local_part(module, name, state[key]))
    return [entry[0] for entry in entries if entry[0] not in state]


def _read_elements(file, key: str, lo: int, hi: int, module: nn.Module, name: str) -> torch.Tensor:
    """Elements lo:hi of this rank's part (see _local_part) of the stored tensor `key`, flattened: of
    a tensor that is not split over the tensor-parallel ranks, only the rows that hold them are read."""
    stored = file.get_slice(key)
    shape = stored.get_shape()
    if getattr(getattr(module, name), "tensor_parallel", False) or not shape:
        return _local_part(module, name, file.get_tensor(key)).reshape(-1)[lo:hi]
    row = math.prod(shape[1:])
    return stored[lo // row : -(-hi // row)].reshape(-1)[lo % row : lo % row + hi - lo]


def load_optimizer(checkpoint: str, shared: dict, optimizer: torch.optim.Optimizer, wrapper: nn.Module, models: dict):
    """Restore into `optimizer` (made by wrapper.make_optimizer) what save_checkpoint saved of the
    same `models`, whatever layout saved it: each parameter it steps reads its pieces of the dense
    moments (see _stepped_pieces) and the step count, and the hyperparameters come from `shared`
    (trainer_state.pt). Moments missing for a parameter (another model) stop with one line."""
    from safetensors import safe_open

    names = {}  # model parameter -> (stored key, its module, its name there)
    stage = next((m for m in wrapper.modules() if isinstance(m, PipelineStage)), None)
    tied = stage.tied_weight if stage is not None and stage.is_last else None
    for prefix, model in models.items():
        for key, module, name, tensor in _state_tensors(model):
            if tensor is tied:  # saved as the first stage's embedding (see dense_tensors)
                base, embeddings = _PIPELINE_LAYOUT[stage.config.model_type][:2]
                key = f"{base}.{embeddings[0]}.weight"
            names[tensor] = (f"{prefix}.{key}", module, name)
    files = _stored_files(checkpoint, "optimizer")
    index = {p: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state = {}
    with contextlib.ExitStack() as stack:
        opened = {f: stack.enter_context(safe_open(os.path.join(checkpoint, f), "pt")) for f in set(files.values())}
        step = opened[files["step"]].get_tensor("step")
        for target, pieces in _stepped_pieces(wrapper):
            moments = {moment: torch.zeros(target.numel(), dtype=target.dtype) for moment in MOMENTS}
            for param, start, lo, hi in pieces:
                key, module, name = names[param]
                for moment, value in moments.items():
                    if f"{key}.{moment}" not in files:
                        fail(f"{checkpoint} holds no optimizer state of {key}: it was saved from another model")
                    file = opened[files[f"{key}.{moment}"]]
                    value[start : start + hi - lo] = _read_elements(file, f"{key}.{moment}", lo, hi, module, name)
            state[index[target]] = {"step": step.clone(), **{k: v.view_as(target) for k, v in moments.items()}}
    groups = optimizer.state_dict()["param_groups"]
    groups = [{**saved, "params": group["params"]} for saved, group in zip(shared["param_groups"], groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_files(folder: str, grid: Grid, tensors: dict, pretrained: tuple, objects: dict):
    """tensors {prefix: stream} through write_safetensors (every rank); then, on rank 0, each of
    `pretrained` by its save_pretrained (an HF model: its config and generation config only, its
    weights being a stream) and each of `objects` {file name: object} by torch.save."""
    for prefix, stream in tensors.items():
        write_safetensors(folder, prefix, stream, grid)
    if grid.rank != 0:
        return
    for item in pretrained:
        if isinstance(item, nn.Module):  # as its save_pretrained would write them
            item.config.dtype = str(item.dtype).split(".")[1]
            item.config.architectures = [type(item).__name__]
            item.config.save_pretrained(folder)
            if item.can_generate() and item.generation_config is not None:
                item.generation_config.save_pretrained(folder)
        else:
            item.save_pretrained(folder)
    for name, value in objects.items():
        torch.save(value, os.path.join(folder, name))


def save_checkpoint(
    run_dir: str,
    name: str,
    grid: Grid,
    keep: int,
    shared: dict,
    tensors: Optional[dict] = None,
    pretrained: tuple = (),
    trained: tuple = (),
):
    """Write checkpoints/<name> (see the section's comment): rank_R.pt (this rank's RNG states) by
    every rank, trainer_state.pt (`shared`, the world size and the
    optimizer's hyperparameters) and `pretrained` (e.g. the model for its config, the tokenizer)
    by rank 0, `tensors` {file prefix: dense_tensors(...)} streamed, and with `trained`
    (optimizer, its data-parallel wrapper, {file prefix: module}) optimizer.safetensors (see
    optimizer_tensors); then the manifest, the rename, and only the `keep` newest checkpoints
    kept. All ranks call it."""
    folder = os.path.join(run_dir, "checkpoints")
    final = os.path.join(folder, name)
    temporary = final + ".tmp"
    if grid.rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    barrier()
    torch.save({"rng": rng_states()}, os.path.join(temporary, f"rank_{grid.rank}.pt"))
    shared, tensors = {**shared, "world_size": grid.world_size}, dict(tensors or {})
    if trained:
        tensors["optimizer"] = optimizer_tensors(trained[0], trained[1], grid, trained[2])
        shared["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in trained[0].param_groups]
    _write_files(temporary, grid, tensors, pretrained, {"trainer_state.pt": shared})
    barrier()  # every rank's file is written before the manifest lists them and the rename makes them visible
    write_manifest(temporary, grid)
    if grid.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in sorted(d for d in os.listdir(folder) if not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(folder, old))


def load_checkpoint(checkpoint: str, grid: Grid, args: dict, fixed: tuple = ("batch_size",)) -> tuple:
    """(trainer_state.pt, this rank's rank_R.pt) of a checkpoint, refused with one line when one of
    the `fixed` flags differs (the global batch, in which the data position is counted; a flag
    that makes another model). Another layout (number of processes, ZeRO stage, --tp/--pp/--cp)
    resumes with a warning: load_optimizer reshards the optimizer state, and the RNG states, one
    per rank, start as a fresh run's (rank_R.pt is then {"rng": None}). Other flags that differ
    are named in a warning (the resume is then not exact). Restore the RNG states with
    set_rng_states(rank_state["rng"]) once the models are built."""
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
    refused = {k: state["args"][k] for k in fixed if state["args"][k] != args[k]}
    if refused:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in refused.items())
        fail(f"{checkpoint} was written with {flags}, which a resumed run cannot change; resume it with the same")
    layout = ("zero_stage", "tp", "pp", "cp")
    ignored = ("resume", "track", "output_dir", *layout)
    changed = {k: (v, args[k]) for k, v in state["args"].items() if k not in ignored and args.get(k, v) != v}
    if changed and grid.rank == 0:
        print(f"warning: flags differ from the checkpoint's run, so the resume is not exact: {changed}")
    saved, now = ({k: flags.get(k, int(k != "zero_stage")) for k in layout} for flags in (state["args"], args))
    if state["world_size"] == grid.world_size and saved == now:
        return state, torch.load(os.path.join(checkpoint, f"rank_{grid.rank}.pt"), weights_only=False)
    if grid.rank == 0:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in saved.items())
        print(
            f"warning: {checkpoint} was written by {state['world_size']} process(es) with {flags}: its optimizer "
            "state is resharded and the random streams start as a new run's, so the resume is not exact"
        )
    return state, {"rng": None}


def run_directory(checkpoint: str) -> str:
    """The run directory a checkpoint belongs to (a resumed run continues there)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def open_run(checkpoint: Optional[str], args, grid: Grid, trained: tuple, scheduler=None, states=None) -> tuple:
    """(trainer state, run name, run directory). A run that resumes `checkpoint` continues in its
    directory with the optimizer (`trained`, see save_checkpoint), scheduler and RNG states restored
    (`states`: load_checkpoint's, if the script read them before). A new run (state None) is named
    from rank 0's clock, so every rank agrees on the directory, made once every rank checked its flags."""
    if checkpoint:
        state, rank_state = states or load_checkpoint(checkpoint, grid, asdict(args))
        load_optimizer(checkpoint, state, *trained)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_states(rank_state["rng"])
        if grid.rank == 0:
            what, _, number = os.path.basename(checkpoint).partition("_")
            print(f"resuming {run_directory(checkpoint)} from {what} {int(number)}")
        return state, state["run_name"], run_directory(checkpoint)
    run_name = broadcast_object(f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = args.output_dir or os.path.join("runs", run_name)
    barrier()
    if grid.rank == 0:
        try:  # the first thing written: a folder that cannot be made stops the run with nothing half-written
            os.makedirs(run_dir, exist_ok=True)
        except OSError as error:
            fail(f"cannot create the run directory {run_dir}: {error.strerror}; pass another --output-dir")
    return None, run_name, run_dir


def save_final(run_dir: str, grid: Grid, tensors: dict, pretrained: tuple = (), objects: Optional[dict] = None):
    """The trained model into the run directory itself, as save_checkpoint writes its files (a
    model with prefix "model" loads with from_pretrained): written aside and moved in with
    config.json last, so a directory that has a config.json holds a complete model."""
    temporary = os.path.join(run_dir, ".final.tmp")
    if grid.rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    _write_files(temporary, grid, tensors, pretrained, objects or {})
    barrier()  # every rank's files are written before they move
    if grid.rank == 0:
        for name in sorted(os.listdir(temporary), key=lambda name: name == "config.json"):
            os.replace(os.path.join(temporary, name), os.path.join(run_dir, name))
        os.rmdir(temporary)


def catch_stop_signals():
    """From here on SIGTERM and SIGUSR1 only set a flag that stop_requested() reads."""
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, lambda received, frame: _stop_signal.append(signal.Signals(received).name))


def stop_requested(grid: Grid) -> bool:
    """Whether any rank has received SIGTERM or SIGUSR1: every rank calls it after the same step and
    gets the same answer, so all of them checkpoint and stop together."""
    flag = torch.tensor([float(bool(_stop_signal))], device=grid.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def report_stop(run_dir: str, grid: Grid, where: str):
    """The line a stopped run prints (rank 0), saying how to continue it."""
    if grid.rank == 0:
        print(
            f"stopped by {(_stop_signal or ['a signal on another rank'])[0]} after {where}; "
            f"continue with --resume {run_dir}"
        )


def export(checkpoint: str, out: str, max_shard_bytes: int = 2**31):
    """A training checkpoint (or a run directory: its newest intact one) as a Hugging Face model
    directory `out`, in one process without GPUs: its weights (model.safetensors, or ppo.py's
    policy) re-sharded to max_shard_bytes, read and written one tensor at a time, and every other
    file but the training state (config, generation config, tokenizer) copied. Written aside and
    renamed, so `out` is complete or absent."""
    checkpoint = find_checkpoint(checkpoint)
    ends = (".safetensors", ".safetensors.index.json")
    kept = [p for p in ("model", "policy") for end in ends if os.path.exists(os.path.join(checkpoint, p + end))]
    if not kept or not os.path.exists(os.path.join(checkpoint, "config.json")):
        fail(
            f"{checkpoint} holds no whole model with its config (a LoRA run keeps its adapters apart): export the "
            "run's final model instead"
        )
    if os.path.exists(out):
        fail(f"{out} exists; pass a new directory")
    temporary = out.rstrip(os.sep) + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    write_safetensors(temporary, "model", stored_tensors(checkpoint, kept[0]), max_shard_bytes=max_shard_bytes)
    for name in os.listdir(checkpoint):
        if not name.endswith((".safetensors", ".safetensors.index.json", ".pt")) and name != MANIFEST:
            shutil.copy(os.path.join(checkpoint, name), temporary)
    os.replace(temporary, out)
    print(f"exported {checkpoint} to {out}")


if __name__ == "__main__":
    # python parallel.py export CHECKPOINT OUT [MAX_SHARD_MB]
    if len(sys.argv) not in (4, 5) or sys.argv[1] != "export":
        fail("usage: python parallel.py export CHECKPOINT_OR_RUN_DIR OUT [MAX_SHARD_MB]")
    export(sys.argv[2], sys.argv[3], int(float(sys.argv[4]) * 2**20) if len(sys.argv) == 5 else 2**31)
