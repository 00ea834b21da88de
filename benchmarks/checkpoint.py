"""Peak memory of one rank while saving the final model, today's way against the streamed one (issue 27).

    python benchmarks/checkpoint.py                       # a tiny Llama, ZeRO-3 over 4 gloo ranks, then --tp 2
    python benchmarks/checkpoint.py --hidden 1024 --layers 24 --vocab 32000   # a few hundred MB

Each (layout, way) runs in fresh processes (gloo on CPU): the model is built and wrapped, then saved either
as the scripts did before (the whole model gathered on every rank: ZeRO-3's gathered(), or
tensor_parallel_state_dict's all-gathered dense weights, then save_pretrained on rank 0) or through
parallel.save_final (parallel.dense_tensors streamed to rank 0, one tensor at a time, into sharded
safetensors). Reported: each rank's peak resident memory while saving above what it held before (VmHWM,
reset just before the save; each way gets processes of its own), and the seconds the save took.
"""

import argparse
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
    the whole model before it was sharded, which hides whatever the save adds below it."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # Linux 4.0+: resets VmHWM, the peak resident set size


def peak_mb() -> float:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("VmHWM:")) / 1024  # kB


def worker(rank, world, port, layout, way, args, folder, queue):
    from transformers import LlamaConfig, LlamaForCausalLM

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
    parallel.barrier()
    reset_peak()
    before, started = rss_mb(), time.time()
    if way == "gathered":
        with wrapper.gathered():
            state = parallel.tensor_parallel_state_dict(model, grid.tp_group) if tp > 1 else None
            if grid.rank == 0:
                model.save_pretrained(folder, state_dict=state)
    else:
        parallel.save_final(folder, grid, {"model": parallel.dense_tensors(model, wrapper, grid)}, (model,))
    parallel.barrier()
    queue.put((rank, peak_mb() - before, time.time() - started))
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
            peaks = ", ".join(f"rank {r} +{p:.1f} MB" for r, p, _ in rows)
            print(f"{layout:>5} {way:>8}: {peaks}; {max(s for _, _, s in rows):.2f} s")


if __name__ == "__main__":
    main()
