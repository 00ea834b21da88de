"""parallel.py against torch's own: our DDP vs torch.nn.parallel.DistributedDataParallel, our
ZeRO-3 vs FSDP2 (torch.distributed.fsdp.fully_shard), ZeRO-1/2 for reference, and our tensor
parallel and pipeline (AFAB and 1F1B, with the measured bubble against the (p-1)/(m+p-1) bound)
over all ranks, on the same model, global batch and optimizer, one after the other in the same
processes.

    torchrun --standalone --nproc_per_node 2 benchmarks/parallel.py            # gloo on CPU
    torchrun --standalone --nproc_per_node 8 benchmarks/parallel.py --layers 24 --hidden 2048   # NCCL
    torchrun --standalone --nproc_per_node 2 benchmarks/parallel.py --sequences 1024 2048 4096 8192

With --sequences, the table is instead one row per layout and sequence length (one sequence per
step): the activations a rank keeps for backward under dense (every rank the whole model and
sequence), tensor parallel, tensor + sequence parallel and context parallel over all ranks, against
dense and against the 1/N the split promises, and the forward-backward time. Activations are the
tensors autograd saves, counted by saved_tensors_hooks (each storage once, parameters excluded):
exact on any device, where a peak measured from the allocator would also count the transients of
attention and the loss.

Rank 0 prints a markdown table: median step time (forward, backward, clipping, AdamW step) and
memory per rank, with ratios to the torch baseline of the same kind. Memory is measured twice:
the state a rank keeps between steps (parameters, gradients, optimizer state, counted tensor by
tensor, each storage once) and the peak during the training steps (CUDA: max_memory_allocated;
CPU: the resident-set high-water mark VmHWM, reset through /proc/self/clear_refs after
malloc_trim once the model is wrapped, so wrapping's one-off copies do not count), relative to
what was allocated before the model was built.
"""

import ctypes
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402


@dataclass
class Args:
    layers: int = 6
    """GPT-2 blocks"""
    hidden: int = 384
    """model width"""
    vocab: int = 8192
    """vocabulary size"""
    sequence: int = 128
    """tokens per sequence"""
    batch: int = 4
    """sequences per rank per step"""
    steps: int = 6
    """timed steps (after two warm-up steps)"""
    micro_batches: int = 8
    """pipeline rows: micro-batches the global batch (batch x ranks sequences) is cut into"""
    bf16: bool = False
    """bf16 autocast (fp32 master weights), as the scripts' --dtype bf16"""
    sequences: tuple[int, ...] = ()
    """sequence lengths for the sequence/context-parallel table (replaces the table above)"""


def build_model(args: Args, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.hidden,
        n_head=max(1, args.hidden // 64),
        vocab_size=args.vocab,
        n_positions=args.sequence,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(device)


def resident(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # VmHWM := current resident set
    return resident("VmRSS")


def peak_since(start: int, device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - start
    return resident("VmHWM") - start


def state_bytes(model, optimizer, extra=()) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds, each storage once."""
    from torch.distributed.tensor import DTensor

    tensors = list(model.parameters()) + list(extra)
    tensors += [t.grad for t in tensors if t.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    storages = {}
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    return sum(storages.values())


def run_variant(name: str, args: Args, grid, batches):
    """Median step time, bytes held, peak bytes and, for pipelines, the measured bubble of one
    layout. Every layout does the same work per step: a global batch of batch x ranks sequences
    (data parallel: each rank its rows; tensor parallel: every rank all rows; pipeline: all rows in
    micro-batches)."""
    device = grid.device
    start = reset_peak(device)
    model = build_model(args, device)
    extra, bubbles = [], []
    world = dist.group.WORLD
    if name.startswith(("ours TP", "ours PP")):
        global_batch = torch.cat(parallel.all_gather_objects(batches[0].cpu(), world)).to(device)
        batches = [global_batch] * len(batches)
    if name.startswith("ours PP"):
        schedule = parallel.pipeline_1f1b if "1F1B" in name else parallel.pipeline_afab
        wrapped = parallel.data_parallel(parallel.PipelineStage(model, world), None, 0, pp_group=world)
        tokens = global_batch.shape[0] * (global_batch.shape[1] - 1)

        def forward_backward(input_ids):
            timings = {}
            micro_batches = [{"input_ids": rows, "labels": rows} for rows in input_ids.chunk(args.micro_batches)]
            schedule(
                wrapped,
                micro_batches,
                lambda logits, mb: parallel.causal_lm_loss(logits, mb["labels"], tokens),
                timings=timings,
            )
            bubbles.append(timings["bubble"])
    else:
        if name == "ours TP":
            wrapped = parallel.data_parallel(parallel.tensor_parallel(model, world), None, 0, tp_group=world)
        elif name == "torch DDP":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        elif name == "torch FSDP2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (grid.world_size,))
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        else:
            wrapped = parallel.data_parallel(model, grid.dp_group, int(name[-1]) if name.startswith("ours ZeRO") else 0)
            extra = wrapped.optimizer_parameters() + [
                b.grads for b in getattr(wrapped, "buckets", []) if b.grads is not None
            ]

        def forward_backward(input_ids):
            wrapped(input_ids=input_ids, labels=input_ids).loss.backward()

    if name.startswith("torch"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # noqa: E731
    else:
        optimizer = wrapped.make_optimizer(torch.optim.AdamW, lr=1e-4)
        clip = lambda: wrapped.clip_grad_norm_(1.0)  # noqa: E731
    reset_peak(device)  # the peak is of the training steps; wrapping's one-off copies do not count
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    for step, input_ids in enumerate(batches):
        dist.barrier()
        started = time.perf_counter()
        with autocast:
            forward_backward(input_ids)
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - started)
    peak = peak_since(start, device)
    held = state_bytes(wrapped.module if name.startswith("ours PP") else model, optimizer, extra)
    # The idlest stage's bubble, over the timed steps.
    bubble = max(parallel.all_gather_objects(statistics.median(bubbles[2:]), world)) if bubbles else None
    return statistics.median(times), held, peak, bubble


SPLITS = ("dense", "TP", "TP + SP", "CP")


def saved_activation_bytes(function) -> int:
    """Run function() and count the bytes autograd saves for backward, each storage once, leaving
    out parameters (which backward reads but the pass does not allocate)."""
    storages = {}

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function()
    return sum(storages.values()), output


def split_row(name: str, args: Args, length: int, grid):
    """(activation bytes, median forward-backward seconds) of one layout on one sequence of `length`
    tokens: the model's layers and final norm, then log-probs of the next tokens through
    kernels.fused_logprobs (vocabulary-parallel under TP), as the scripts compute them."""
    import kernels

    world = dist.group.WORLD
    model = build_model(replace(args, sequence=length), grid.device)
    tp_group = world if name.startswith("TP") else None
    model = parallel.tensor_parallel(model, tp_group)
    if name == "TP + SP":
        model = parallel.sequence_parallel(model, world)
    if name == "CP":
        model = parallel.context_parallel(model, world)
    ids = torch.randint(0, args.vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(grid.device)
    head = model.get_output_embeddings().weight

    def forward():
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
        return -kernels.fused_logprobs(hidden, head, ids[:, 1:], group=tp_group, compile=False).mean()

    activations, times = None, []
    for step in range(args.steps + 2):
        dist.barrier()
        started = time.perf_counter()
        if step == 0:
            activations, loss = saved_activation_bytes(forward)
        else:
            loss = forward()
        loss.backward()
        if grid.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - started)
    return activations, statistics.median(times)


def sequence_table(args: Args, grid):
    world = grid.world_size
    rows = {(name, length): split_row(name, args, length, grid) for length in args.sequences for name in SPLITS}
    if grid.is_main:
        print(
            f"{world} ranks, {'NCCL' if grid.device.type == 'cuda' else 'gloo'} on {grid.device.type}, GPT-2 "
            f"{args.layers} layers x {args.hidden} ({max(1, args.hidden // 64)} heads), vocabulary {args.vocab}, one "
            f"sequence per step, fp32, torch {torch.__version__}"
        )
        print("| tokens | layout | activations per rank | vs dense | 1/N | forward-backward | vs dense |")
        print("|---|---|---|---|---|---|---|")
        for (name, length), (activations, seconds) in rows.items():
            dense_bytes, dense_seconds = rows["dense", length]
            print(
                f"| {length} | {name} | {activations / 2**20:.1f} MiB | {activations / dense_bytes:.3f} | "
                f"{'' if name == 'dense' else f'{1 / world:.3f}'} | {seconds * 1000:.0f} ms | "
                f"{seconds / dense_seconds:.2f}x |"
            )


def main(args: Args):
    with parallel.clean_exit():
        grid = parallel.init_distributed("auto")
        assert grid.world_size > 1, "launch with torchrun --nproc_per_node 2 (or more)"
        if args.sequences:
            return sequence_table(args, grid)
        generator = torch.Generator().manual_seed(grid.rank)
        batches = [
            torch.randint(0, args.vocab, (args.batch, args.sequence), generator=generator).to(grid.device)
            for _ in range(args.steps + 2)
        ]
        run_variant(
            "ours DDP", args, grid, batches
        )  # warm-up: first-touch allocations and thread pools count for no one
        rows = {}
        for name in (
            "torch DDP",
            "ours DDP",
            "ours ZeRO-1",
            "ours ZeRO-2",
            "torch FSDP2",
            "ours ZeRO-3",
            "ours TP",
            "ours PP AFAB",
            "ours PP 1F1B",
        ):
            rows[name] = run_variant(name, args, grid, batches)
            gc.collect()  # the variant's model and optimizer are gone once it returns
        if grid.is_main:
            parameters = sum(p.numel() for p in build_model(args, torch.device("cpu")).parameters())
            print(
                f"{grid.world_size} ranks, {'NCCL' if grid.device.type == 'cuda' else 'gloo'} on {grid.device.type}, "
                f"GPT-2 {args.layers} layers x {args.hidden}, "
                f"{parameters / 1e6:.1f}M parameters, {args.batch} x {args.sequence} tokens per rank, "
                f"{'bf16 autocast' if args.bf16 else 'fp32'}, torch {torch.__version__}"
            )
            bound = parallel.bubble_fraction(grid.world_size, args.micro_batches)
            print(
                f"Pipeline rows: {args.micro_batches} micro-batches on {grid.world_size} stages; the bubble bound "
                f"(p-1)/(m+p-1) is {bound:.3f}."
            )
            print(
                "| variant | step time | vs baseline | state per rank | vs baseline | peak per rank | vs baseline | "
                "bubble |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for name, (seconds, held, peak, bubble) in rows.items():
                baseline = rows["torch FSDP2" if name.endswith("ZeRO-3") else "torch DDP"]
                print(
                    f"| {name} | {seconds * 1000:.1f} ms | {seconds / baseline[0]:.2f}x | {held / 2**20:.1f} MiB | "
                    f"{held / baseline[1]:.2f}x "
                    f"| {peak / 2**20:.1f} MiB | {peak / max(baseline[2], 1):.2f}x | "
                    f"{'' if bubble is None else f'{bubble:.3f} (bound {bound:.3f})'} |"
                )


if __name__ == "__main__":
    main(tyro.cli(Args))
