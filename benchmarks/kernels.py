"""Benchmark kernels.py against the naive computations it replaces, side by side in one process.

    python benchmarks/kernels.py              # CPU here, CUDA when a GPU is present
    python benchmarks/kernels.py --device cpu
    python benchmarks/kernels.py --only linear  # kernels.linear against F.linear (fp32)

Prints one markdown table (paste it into benchmarks/README.md). Each row is one forward+backward
(or one call, for gae): the median wall time over --repeats runs after a warm-up, and the peak
memory that run added on top of its inputs. Peak memory on CUDA is torch.cuda.max_memory_allocated;
on CPU it is the process's resident-set high-water mark (VmHWM in /proc/self/status), reset through
/proc/self/clear_refs right before the run and taken relative to the resident set at that moment,
after malloc_trim has handed freed memory back to the OS. That is what the machine actually had
to provide, allocator overheads included.
"""

import argparse
import ctypes
import functools
import os
import re
import sys
import tempfile
import time

# A fresh inductor cache, so that "first call" below is a true cold compile.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

MiB = 2**20


# -----------------------------------------------------------------------------
# measuring


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _resident(field):
    status = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def peak_memory(fn, device):
    """Bytes of memory fn() needs beyond what is allocated when it starts."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM to the current resident set
    start = _resident("VmRSS")
    fn()
    return _resident("VmHWM") - start


def cpu_seconds():
    """(seconds all CPUs were busy, seconds this process and its live children, such as inductor's
    compile workers, were busy), from /proc."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            # fields after the command name: state ppid ... utime (12th) stime (13th)
            rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    own, family = 0, {os.getpid()}
    for _ in range(4):  # children, grandchildren, ...
        family |= {pid for pid, (parent, _) in stats.items() if parent in family}
    own = sum(stats[pid][1] for pid in family if pid in stats)
    return busy / os.sysconf("SC_CLK_TCK"), own / os.sysconf("SC_CLK_TCK")


def wall_time(fn, device, repeats):
    """(median seconds over `repeats` calls after one warm-up call, seconds of the warm-up call)."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], first


# -----------------------------------------------------------------------------
# the routines and their naive baselines


def naive_logprobs(hidden, weight, labels, temperature):
    """The path kernels.fused_logprobs replaces: full logits, full log_softmax, gather."""
    logits = hidden @ weight.T / temperature
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def naive_from_logits(logits, labels, temperature):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def loop_gae(values, rewards, mask, gamma, lam):
    """The textbook reverse loop (lm-human-preference-details, TRL)."""
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


def forward_backward(fn, inputs, grad_output):
    """One forward and backward; the gradients are returned and dropped by the caller."""
    return torch.autograd.grad((fn() * grad_output).sum(), inputs)


# -----------------------------------------------------------------------------
# benchmarks


def bench_logprobs(rows, tokens, hidden_size, vocab, dtype, device, repeats, temperature=0.7):
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (
        torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) * hidden_size**-0.5
    ).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    grad_output = torch.randn(tokens, device=device, generator=generator)
    shape = f"BT={tokens} H={hidden_size} V={vocab} {str(dtype)[6:]}"

    variants = {
        "naive": lambda: naive_logprobs(hidden, weight, labels, temperature),
        "fused_logprobs": lambda: kernels.fused_logprobs(hidden, weight, labels, temperature, compile=True),
        "fused_logprobs eager": lambda: kernels.fused_logprobs(hidden, weight, labels, temperature, compile=False),
    }
    results = {}
    for name, fn in variants.items():
        step = functools.partial(forward_backward, fn, (hidden, weight), grad_output)
        graphs = counters["stats"]["unique_graphs"]
        seconds, first = wall_time(step, device, repeats)
        memory = peak_memory(step, device)
        results[name] = (seconds, memory, first, counters["stats"]["unique_graphs"] - graphs)
    # A new number of tokens must reuse the compiled (dynamic) chunk bodies.
    graphs = counters["stats"]["unique_graphs"]
    fewer = slice(0, tokens - 123)
    kernels.fused_logprobs(hidden[fewer], weight, labels[fewer], temperature, compile=True).sum().backward()
    recompiled = counters["stats"]["unique_graphs"] - graphs
    for name, (seconds, memory, first, compiled) in results.items():
        note = ""
        if name == "fused_logprobs":
            recompiles = "yes" if recompiled else "no"
            note = f"first call {first:.1f} s ({compiled} graphs compiled); new BT recompiles: {recompiles}"
        rows.append(("fwd+bwd logprobs", shape, name, seconds, results["naive"][0], memory, results["naive"][1], note))

    # Log-probs from logits that already exist (e.g. a Hugging Face model's output).
    if device == "cpu" or tokens * vocab * 4 < 8 * 2**30:
        with torch.no_grad():
            logits = (hidden @ weight.T).detach()
        logits.requires_grad_()
        variants = {
            "naive": lambda: naive_from_logits(logits, labels, temperature),
            "logprobs_from_logits": lambda: kernels.logprobs_from_logits(logits, labels, temperature, compile=True),
        }
        results = {}
        for name, fn in variants.items():
            step = functools.partial(forward_backward, fn, (logits,), grad_output)
            seconds, _ = wall_time(step, device, repeats)
            results[name] = (seconds, peak_memory(step, device))
        for name, (seconds, memory) in results.items():
            rows.append(
                (
                    "fwd+bwd from logits",
                    shape,
                    name,
                    seconds,
                    results["naive"][0],
                    memory,
                    results["naive"][1],
                    "gradient w.r.t. logits (its own size) included",
                )
            )


def bench_gae(rows, batch, length, device, repeats):
    generator = torch.Generator(device).manual_seed(0)
    values = torch.randn(batch, length, device=device, generator=generator)
    rewards = torch.randn(batch, length, device=device, generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), device=device, generator=generator)
    mask = torch.arange(length, device=device) < lengths[:, None]
    graphs = counters["stats"]["unique_graphs"]
    results = {}
    for name, fn in [("python loop", loop_gae), ("gae", kernels.gae)]:
        step = functools.partial(fn, values, rewards, mask, 1.0, 0.95)
        seconds, first = wall_time(step, device, repeats)
        results[name] = (seconds, peak_memory(step, device), first)
    compiled = counters["stats"]["unique_graphs"] - graphs
    for name, (seconds, memory, first) in results.items():
        note = (
            f"first call {first * 1e3:.1f} ms, {compiled} graphs compiled (none to recompile for a new T)"
            if name == "gae"
            else ""
        )
        rows.append(
            (
                "gae",
                f"B={batch} T={length}",
                name,
                seconds,
                results["python loop"][0],
                memory,
                results["python loop"][1],
                note,
            )
        )


def bench_linear(rows, device, repeats):
    """kernels.linear against F.linear at SmolLM2-135M's shapes: a decode step's 16 rows (forward only,
    as generation runs it) and a micro-batch's 192 rows (forward and backward)."""
    generator = torch.Generator(device).manual_seed(0)
    for tokens, inputs, outputs in [(16, 576, 1536), (16, 1536, 576), (16, 576, 49152), (192, 576, 1536)] + [
        (192, 1536, 576),
        (192, 576, 576),
        (128, 576, 49152),
    ]:
        x = torch.randn(tokens, inputs, device=device, generator=generator, requires_grad=tokens > 16)
        weight = torch.randn(outputs, inputs, device=device, generator=generator, requires_grad=tokens > 16)
        grad_output = torch.randn(tokens, outputs, device=device, generator=generator)
        results = {}
        for name, fn in [("F.linear", torch.nn.functional.linear), ("kernels.linear", kernels.linear)]:
            if tokens > 16:
                step = functools.partial(forward_backward, functools.partial(fn, x, weight), (x, weight), grad_output)
            else:
                step = torch.no_grad()(functools.partial(fn, x, weight))
            results[name] = (wall_time(step, device, repeats)[0], peak_memory(step, device))
        for name, (seconds, memory) in results.items():
            kind = "fwd+bwd" if tokens > 16 else "fwd"
            base_seconds, base_memory = results["F.linear"]
            rows.append(
                (
                    f"{kind} linear",
                    f"{tokens}x{inputs} -> {outputs}",
                    name,
                    seconds,
                    base_seconds,
                    memory,
                    base_memory,
                    "",
                )
            )


def print_table(rows):
    print("| routine | shape | variant | time | time / baseline | peak extra memory | memory / baseline | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for routine, shape, name, seconds, base_seconds, memory, base_memory, note in rows:
        time_text = f"{seconds:.3f} s" if seconds >= 0.1 else f"{seconds * 1e3:.2f} ms"
        ratio = seconds / base_seconds
        ratio_text = f"{ratio:.3f}x ({1 / ratio:.0f}x faster)" if ratio < 0.5 else f"{ratio:.2f}x"
        print(
            f"| {routine} | {shape} | {name} | {time_text} | {ratio_text} | "
            f"{memory / MiB:.0f} MiB | {memory / max(base_memory, 1):.2f}x | {note} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--gae-repeats", type=int, default=20)
    parser.add_argument("--only", default=None, choices=["gae", "logprobs", "linear"], help="run one group of rows")
    parser.add_argument("--linear-repeats", type=int, default=30)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="dtype of hidden and weight at the first shape (default: float32 on CPU, bfloat16 on CUDA)",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if args.device == "cpu" else torch.bfloat16

    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}",
        flush=True,
    )
    rows = []
    busy_start, own_start = cpu_seconds()
    if args.only in (None, "gae"):
        for length in (256, 1024):
            bench_gae(rows, 64, length, args.device, args.gae_repeats)
    if args.only in (None, "logprobs"):
        bench_logprobs(rows, 4096, 576, 49152, dtype, args.device, args.repeats)
        if args.device == "cuda":
            bench_logprobs(rows, 8192, 2048, 128256, torch.bfloat16, args.device, args.repeats)
    if args.only in (None, "linear"):
        bench_linear(rows, args.device, args.linear_repeats)
    print_table(rows)
    # Other work on the machine skews CPU timings: report how much CPU time it took meanwhile.
    busy_end, own_end = cpu_seconds()
    print(
        f"\nCPU seconds used by other processes during the run: {busy_end - busy_start - (own_end - own_start):.1f} "
        f"(this process: {own_end - own_start:.1f})"
    )
