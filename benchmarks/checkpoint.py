"""Peak memory and time of one rank while saving and loading a checkpoint, today's way against the way
before issue 27.

    python benchmarks/checkpoint.py                       # a tiny Llama, ZeRO-3 over 4 gloo ranks, then --tp 2
    python benchmarks/checkpoint.py --hidden 1024 --layers 24 --vocab 32000 --shard-mb 512   # a few hundred MB

Each (layout, way) runs in fresh processes (gloo on CPU): the model is built and wrapped, then saved either
as the scripts did before (the whole model gathered on every rank: ZeRO-3's gathered(), or
tensor_parallel_state_dict's all-gathered dense weights, then save_pretrained on rank 0; each rank's
optimizer state with torch.save) or as they do now,
parallel.save_checkpoint with the AdamW state (parallel.dense_tensors streamed one tensor at a time into
sharded safetensors of --shard-mb, file i written by rank i % world size). Reported: each rank's peak
resident memory while saving above what it held before (VmHWM, reset just before the save; each way gets
processes of its own), the seconds the save took, and for today's way the seconds and peak of a resume
from that checkpoint in the same processes: the model read back with from_pretrained and wrapped, and its
optimizer state resharded by parallel.load_optimizer.
"""

import argparse
import ctypes
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak():
    """Start the peak over from the present resident size: ru_maxrss would keep the peak of building
    the whole model before it was sharded, which hides whatever the save adds below it. Memory freed
    before (the model deleted before the resume) is handed back to the OS first (glibc's malloc_trim),
    so that reusing it counts."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # Linux 4.0+: resets VmHWM, the peak resident set size


def peak_mb() -> float:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("VmHWM:")) / 1024  # kB


def worker(rank, world, port, layout, way, args, folder, queue):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    tp = 2 if layout == "tp2" else 1
    grid = parallel.init_distributed("cpu", tp=tp)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = parallel.tensor_parallel(LlamaForCausalLM(config), grid.tp_group)
    wrapper = parallel.data_parallel(model, grid.dp_group, 3 if layout == "zero3" else 0, tp_group=grid.tp_group)
    optimizer = wrapper.make_optimizer(torch.optim.AdamW, lr=1e-5)
    for param in wrapper.optimizer_parameters():  # a step, so that AdamW holds its moments
        param.grad = torch.zeros_like(param)
    optimizer.step()
    parallel.barrier()
    reset_peak()
    before, started = rss_mb(), time.time()
    if way == "gathered":  # and each rank's optimizer shard in a file of its own
        torch.save(optimizer.state_dict(), os.path.join(folder, f"optimizer_{rank}.pt"))
        with wrapper.gathered():
            state = parallel.tensor_parallel_state_dict(model, grid.tp_group) if tp > 1 else None
            if grid.rank == 0:
                model.save_pretrained(folder, state_dict=state)
    else:
        parallel.write_safetensors.__defaults__ = (None, args.shard_mb * 2**20)  # save_checkpoint's shard size
        trained = (optimizer, wrapper, {"model": model})
        weights = {"model": parallel.dense_tensors(model, wrapper, grid)}
        parallel.save_checkpoint(folder, "step_00000001", grid, 1, {"args": {}}, weights, (model,), trained)
    parallel.barrier()
    saved = (peak_mb() - before, time.time() - started)
    loaded = (0.0, 0.0)
    if way == "streamed":
        checkpoint = os.path.join(folder, "checkpoints", "step_00000001")
        del trained, optimizer, wrapper, model
        reset_peak()
        before, started = rss_mb(), time.time()
        model = parallel.tensor_parallel(LlamaForCausalLM.from_pretrained(checkpoint), grid.tp_group)
        wrapper = parallel.data_parallel(model, grid.dp_group, 3 if layout == "zero3" else 0, tp_group=grid.tp_group)
        optimizer = wrapper.make_optimizer(torch.optim.AdamW, lr=1e-5)
        shared = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
        parallel.load_optimizer(checkpoint, shared, optimizer, wrapper, {"model": model})
        parallel.barrier()
        loaded = (peak_mb() - before, time.time() - started)
    queue.put((rank, *saved, *loaded))
    parallel.barrier()


def measure(layout: str, way: str, args) -> list:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    world = 4 if layout == "zero3" else 2
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, (world, port, layout, way, args, folder, queue), nprocs=world, start_method="spawn")
        return sorted(queue.get() for _ in range(world))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--shard-mb", type=int, default=2048, help="the size of each file saved (transformers': 2 GiB)")
    args = parser.parse_args()
    model_mb = None
    for layout in ("zero3", "tp2"):
        for way in ("gathered", "streamed"):
            rows = measure(layout, way, args)
            if model_mb is None:
                h, f = args.hidden, 4 * args.hidden
                count = args.layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * args.vocab * h + h
                model_mb = 4 * count / 2**20
                print(f"model: {count:,} parameters, {model_mb:.1f} MB in fp32")
            peaks = ", ".join(f"rank {r} +{p:.1f} MB" for r, p, *_ in rows)
            print(f"{layout:>5} {way:>8}: save {peaks}; {max(row[2] for row in rows):.2f} s")
            if way == "streamed":
                peaks = ", ".join(f"rank {r} +{row[3]:.1f} MB" for r, *row in rows)
                print(f"{layout:>5} {way:>8}: load {peaks}; {max(row[4] for row in rows):.2f} s")


if __name__ == "__main__":
    main()
