"""Shared test helpers: tiny models and tokenizers built in code, so no test needs the network."""

import json
import math
import multiprocessing
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
# Scripts run their kernels eagerly in tests (a first compile costs 15-25 s); tests/test_kernels.py
# compiles explicitly where it checks the compiled path.
os.environ.setdefault("KERNELS_COMPILE", "0")


# ---------------------------------------------------------------------------------------------
# Launching the scripts. A test runs a script as a user does, `python script.py FLAGS` or the N
# processes `torchrun --nproc_per_node N` starts, each with its own argv, environment (RANK,
# WORLD_SIZE, MASTER_ADDR/PORT as torchrun sets them), working directory and stdout/stderr, the
# script run as __main__ from its file. The processes are forked from a server that has imported
# torch and transformers once (multiprocessing's forkserver, which runs no torch op, so its
# children start with no threads): a fresh interpreter spends about 4 s of CPU on those imports,
# and that was most of the suite's time. Real interpreters and real torchrun are still tested
# where they are the subject: importing a script (test_layout), `torchrun()` below (test_args),
# and two nodes joined by rendezvous (test_sft).
# ---------------------------------------------------------------------------------------------
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(
    [
        "torch",
        "torch.distributed",
        "numpy",
        "tqdm",
        "tyro",
        "tokenizers",
        "safetensors.torch",
        "transformers",
        "transformers.modeling_utils",
        "transformers.models.gpt2.modeling_gpt2",
        "transformers.models.llama.modeling_llama",
        "transformers.models.gpt_neox.modeling_gpt_neox",
    ]
)


def _run_as_main(script: str, argv: list, env: dict, cwd: str, stdout_path: str, stderr_path: str, delay: float):
    """In a forked process: become `python script argv...` started in cwd with env, `delay` s late."""
    time.sleep(delay)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    if "OMP_NUM_THREADS" in env:  # read once by torch's import, in the server: apply it here
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(script)  # where `python script.py` looks for imports first
    runpy.run_path(script, run_name="__main__")


class Job:
    """A script running as `nproc` processes (1: plain `python script.py`), started at once, or the
    ranks in `delays` ({rank: seconds}) that much later, as a slow machine might start them."""

    def __init__(self, script: str, *argv, nproc: int = 1, cwd=None, env=None, delays=None):
        self.folder = tempfile.mkdtemp(prefix="job-")
        env = {**os.environ, **(env or {})}
        if nproc > 1:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            env.update(
                WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
        self.processes = []
        for rank in range(nproc):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else env
            paths = (os.path.join(self.folder, f"{rank}.out"), os.path.join(self.folder, f"{rank}.err"))
            process = _SERVER.Process(
                target=_run_as_main,
                args=(
                    os.path.join(ROOT, script),
                    [str(a) for a in argv],
                    rank_env,
                    str(cwd or os.getcwd()),
                    *paths,
                    (delays or {}).get(rank, 0.0),
                ),
            )
            process.start()
            self.processes.append(process)

    def running(self) -> bool:
        return any(process.is_alive() for process in self.processes)

    def kill(self):
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.join()

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for every process, as torchrun does: when one fails, the others are killed (they
        would wait on it until the collective timeout). stdout and stderr are the ranks' outputs in
        rank order; the return code is the first failing rank's (0 if none)."""
        deadline = time.time() + timeout
        while self.running() and not any(process.exitcode for process in self.processes):
            if time.time() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(str(self.processes), timeout)
            time.sleep(0.05)
        failed = [process.exitcode for process in self.processes if process.exitcode]
        self.kill()  # a no-op for processes that have exited
        outputs = []
        for suffix in ("out", "err"):
            outputs.append(
                "".join(
                    open(os.path.join(self.folder, f"{rank}.{suffix}"), errors="replace").read()
                    for rank in range(len(self.processes))
                )
            )
        shutil.rmtree(self.folder, ignore_errors=True)
        return subprocess.CompletedProcess(self.processes, failed[0] if failed else 0, *outputs)


def run_script(*argv, cwd=None, env=None, timeout=600):
    """Run one of the top-level scripts in one process, as `python script.py FLAGS` does."""
    return Job(*argv, cwd=cwd, env=env).wait(timeout)


def run_ranks(script, *flags, nproc=2, cwd=None, timeout=600):
    """Run a script as the `nproc` processes `torchrun --nproc_per_node nproc` starts on one machine (gloo on CPU)."""
    return Job(script, *flags, nproc=nproc, cwd=cwd).wait(timeout)


def torchrun(script, *flags, nproc=2, cwd=None, timeout=600):
    """Launch a script with the real torchrun (its launcher and workers are fresh interpreters)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        os.path.join(ROOT, script),
        *flags,
    ]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def kill_when(job: Job, path, what: str = "the run"):
    """SIGKILL every process of a job as soon as `path` exists; fail if the job ends first."""
    deadline = time.time() + 300
    while not path.exists():
        assert job.running() and time.time() < deadline, f"{what} ended before it could be killed"
        time.sleep(0.02)
    job.kill()
    shutil.rmtree(job.folder, ignore_errors=True)


def run_and_kill(script, flags, tmp_path, checkpoint, reference=None):
    """Run the script to the end (unless `reference`, the run dir of a run with these flags that tests
    share, is given); run it again and SIGKILL it as soon as checkpoints/<checkpoint> exists. One after
    the other: side by side, each with a thread per core, the resume tests of ppo and sft took 90 s
    instead of 35 s on CI's two cores. Returns (uninterrupted run dir, killed run dir)."""
    if reference is None:
        reference = tmp_path / "reference"
        uninterrupted = run_script(script, *flags, "--output-dir", str(reference), cwd=tmp_path)
        assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    killed = tmp_path / "killed"
    kill_when(Job(script, *flags, "--output-dir", str(killed), cwd=tmp_path), killed / "checkpoints" / checkpoint)
    assert not (killed / "config.json").exists(), "the run finished before the kill; the test proves nothing"
    return reference, killed


def kill_and_resume(script, flags, tmp_path, checkpoint):
    """The exact-resume experiment: run_and_kill, then resume the killed run with the same flags.
    Returns (uninterrupted run dir, resumed run dir)."""
    reference, killed = run_and_kill(script, flags, tmp_path, checkpoint)
    resumed = run_script(script, *flags, "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    return reference, killed


def damage(path, how: str):
    """Damage one file of a checkpoint as a full disk or a broken copy would: cut it to half its
    size, flip one byte in its middle, or delete it."""
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "corrupt":
        with open(path, "r+b") as file:
            file.seek(os.path.getsize(path) // 2)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.remove(path)


def load_benchmark(name: str):
    """A script of benchmarks/ as a module, loaded from its file: putting benchmarks/ on sys.path
    would shadow the library (benchmarks/parallel.py, benchmarks/kernels.py) for every process
    the tests spawn afterwards, which inherit sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def read_metrics(run_dir) -> dict:
    """A run's metrics.json without the numbers the clock measures (time/*, throughput *_per_s),
    which differ between any two runs of the same math."""

    def measured(key):
        return key.startswith("time/") or key.endswith("_per_s")

    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {
        k: {kk: vv for kk, vv in v.items() if not measured(kk)} if isinstance(v, dict) else v
        for k, v in metrics.items()
        if not measured(k)
    }


def assert_same_weights(first, second, name="model.safetensors"):
    """Bitwise the same saved weights (a NaN anywhere fails too)."""
    assert max_weight_difference(first, second, name) == 0.0, "resumed weights differ from the uninterrupted run's"


def text_tokenizer(pad_token=True):
    """A byte-level BPE tokenizer trained in code on the fixture texts (a stand-in for GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, (dict, list)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from strings(item)

    texts = []
    for name in sorted(os.listdir(FIXTURES)):
        if name.endswith(".jsonl"):
            with open(os.path.join(FIXTURES, name)) as file:
                texts += [text for line in file if line.strip() for text in strings(json.loads(line))]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] + (["<|pad|>"] if pad_token else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>" if pad_token else None
    )


# Two chat templates of different styles, written here so no test downloads one. ChatML (SmolLM2,
# Qwen) ends a turn with <|im_end|> and a newline, while its EOS is <|endoftext|>; the Llama-3 style
# opens with a BOS in the text and ends a turn with <|eot_id|>. Both pass a `tools` list on.
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools: {{ tools | tojson }}<|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Like Qwen3's: an assistant turn before the last loses its <think>...</think> block, so the rendering
# of a conversation is not a prefix of the rendering of its continuation.
DROPS_THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% for message in messages %}",
    "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set message = {'role': 'assistant', 'content': message['content'].split('</think>')[-1]} %}{% endif %}",
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "drops-thinking": DROPS_THINKING_TEMPLATE}
CHAT_SPECIAL_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
CHAT_SPECIAL_TOKENS["drops-thinking"] = CHAT_SPECIAL_TOKENS["chatml"]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "drops-thinking": "<|im_end|>"}


def chat_tokenizer(style="chatml"):
    """text_tokenizer with a chat template and its special tokens; its EOS stays <|endoftext|>, so the
    end of a turn is a different token from the EOS, as in SmolLM2 and Llama 3."""
    tokenizer = text_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS[style]})
    tokenizer.chat_template = CHAT_TEMPLATES[style]
    return tokenizer


def save_tiny_chat_model(path, style="chatml", family="gpt2", seed=0, **config):
    """A tiny chat model: chat_tokenizer(style), and a generation config whose eos_token_id is a list
    holding the EOS and the end-of-turn id (as Llama 3's and many chat models' are)."""
    from transformers import GenerationConfig

    tokenizer = chat_tokenizer(style)
    save_tiny_model(path, family, tokenizer, seed, **config)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[style])
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end_of_turn]).save_pretrained(path)
    return str(path)


def write_jsonl(path, records: list):
    with open(path, "w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return str(path)


def tiny_config(family: str, vocab_size: int, eos_token_id: int):
    """The smallest model of each family that still has every part (GQA for Llama, parallel residual for
    NeoX), without dropout so that runs can be compared exactly."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    if family == "gpt2":
        return GPT2Config(
            n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
        )
    if family == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    if family == "gpt-neox":
        return GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    raise ValueError(family)


def save_tiny_model(path, family="gpt2", tokenizer=None, seed=0, **config):
    """A tiny randomly initialised causal LM of the given family, saved with its tokenizer; `config`
    overrides settings of tiny_config (attention_dropout=0.3, say)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or text_tokenizer()
    torch.manual_seed(seed)
    settings = tiny_config(family, len(tokenizer), tokenizer.eos_token_id)
    settings.update(config)
    model = AutoModelForCausalLM.from_config(settings)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_walk_model(path, seed=0):
    """A tiny GPT-2 with the randomwalks tokenizer and GPT-2's dropout (0.1), so that an exact resume
    needs the RNG states: the default randomwalks model's part in a resume test, at a fraction of its
    compute (6 layers of 144 are most of a randomwalks run's time)."""
    import sft

    dropout = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return save_tiny_model(path, "gpt2", sft.randomwalks_tokenizer(), seed, **dropout)


@pytest.fixture(scope="session")
def ppo_walk_run(tmp_path_factory):
    """(flags, run dir) of a 6-update PPO run on a tiny randomwalks policy that checkpoints every 2 updates:
    the uninterrupted run where test_ppo's killed run and test_checkpoints' stopped ones must end."""
    import sft

    folder = tmp_path_factory.mktemp("ppo-walk")
    policy = save_tiny_model(folder / "policy", "gpt2", tokenizer=sft.randomwalks_tokenizer())
    flags = ["--model", policy, "--num-updates", "6", "--batch-size", "16", "--mini-batch-size", "8"]
    flags += ["--micro-batch-size", "4", "--save-every", "2", "--keep-checkpoints", "5", "--eval-every", "5"]
    flags += ["--eval-samples-per-start", "1", "--samples-per-prompt", "2", "--scale-rewards", "--target-kl", "1"]
    run = run_script("ppo.py", *flags, "--output-dir", str(folder / "reference"), cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    return flags, folder / "reference"


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def fake_sentiment(text: str) -> float:
    """The stand-in for VADER's compound score in tests: in [-1, 1], and it depends on the text."""
    return round(math.tanh(text.count("e") - text.count("o")), 6)


@pytest.fixture
def fake_vader(monkeypatch):
    """A stand-in vaderSentiment package scoring with fake_sentiment, so the sentiment tasks' plumbing
    is tested without the optional extra; the scripts' cached analysers are cleared before and after."""
    import types

    class SentimentIntensityAnalyzer:
        def polarity_scores(self, text):
            return {"compound": fake_sentiment(text)}

    package, module = types.ModuleType("vaderSentiment"), types.ModuleType("vaderSentiment.vaderSentiment")
    module.SentimentIntensityAnalyzer = SentimentIntensityAnalyzer
    package.vaderSentiment = module
    monkeypatch.setitem(sys.modules, "vaderSentiment", package)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", module)

    def clear():
        for name in ("ppo", "ilql", "reward_model", "rft", "dpo"):
            if name in sys.modules:
                sys.modules[name].vader.cache_clear()

    clear()
    yield fake_sentiment
    clear()


def write_text_examples(path, n=48, seed=0):
    """n prompt/completion records in the jsonl format, from the fixture vocabulary, so data
    parallel tests have enough examples to split over ranks."""
    import random

    words = "the cat sat on mat a dog ran to park my friend said hello world post title summary".split()
    rng = random.Random(seed)
    with open(path, "w") as file:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            completion = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            file.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return str(path)


def torchrun_kill_and_resume(script, flags, tmp_path, checkpoint, nproc=2):
    """kill_and_resume on nproc processes: an uninterrupted run; a second one whose processes are
    all SIGKILLed as soon as checkpoints/<checkpoint> exists (each rank's file included); its
    resumption with the same flags, one after the other. Returns (uninterrupted, resumed) run dirs."""
    reference = run_ranks(script, *flags, "--output-dir", str(tmp_path / "reference"), nproc=nproc, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_when(
        Job(script, *flags, "--output-dir", str(killed), nproc=nproc, cwd=tmp_path), killed / "checkpoints" / checkpoint
    )
    assert not (killed / "config.json").exists(), "the run finished before the kill; the test proves nothing"
    assert sorted(p.name for p in (killed / "checkpoints" / checkpoint).glob("rank_*.pt")) == [
        f"rank_{r}.pt" for r in range(nproc)
    ]
    resumed = run_ranks(script, *flags, "--resume", str(killed), nproc=nproc, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return tmp_path / "reference", killed


# Rounding bounds, for the comparisons that are not in fp64 and hold on any CPU (another vector width,
# blocking, thread count or math library sums in another order). u is a dtype's unit roundoff, 2^-p
# for p significand bits (the implicit one included): one correctly rounded operation errs by at most
# u of its result. A sum or dot product of n terms, in any order, errs by at most gamma(n) times the
# sum of its terms' sizes, gamma(n) = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
# Algorithms, 2nd ed., sec. 3.1); a bf16 matmul accumulates in fp32 (ATen, oneDNN, cuBLAS) and rounds
# its result once to bf16; exp and log are within 2 ulps (4 u) in every library torch uses.
UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}


def gamma(n, dtype=torch.float32):
    """gamma(n) = n u / (1 - n u): the relative error bound of n chained roundings in `dtype`."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1, "no bound: too many roundings for this dtype"
    return nu / (1 - nu)


# The sampler's log-prob of a token and the trainer's are one function computed twice in another
# order (the decode loop on the KV cache, the full forward), so their gap is rounding. In fp32 that
# is the rounding of each layer's sums, at most 4H = 128 terms of order 1 in the tests' 2-layer
# models (LayerNorm-ed inputs, 0.02-std weights), gamma(128) ~ 2^7 u each: to first order the gap is
# under 2^8 u = 2^-16 = 1.5e-5 (2.4e-7 seen). bf16 rounds every matmul's result to 8 bits and the
# two orders flip some of those roundings, through the whole model: no bound follows from u, and
# the claim is only that the gap stays within bf16's spacing of log-probs of size 8 to 16, 2^-4.
# Seen: 2.4e-7 on ATen's scalar kernels; 4.7e-4 and 1.9e-3 on the tests' GPT-2 and Llama with AVX2
# (AMD EPYC); on the benchmark's trained model 4.5e-4 with an AMX Xeon's kernels and 0.014 with
# AVX2's. A model copy cast whole to bf16 gave 0.017 there and 1.9e-3 on the tests' models, which
# no bound tells from rounding on every CPU: test_pipeline_parallel checks that copy exactly.
# Sampling off-policy (--top-k 3) gave more than 1e-2 in fp32.
LOGPROB_GAP = {torch.float32: 2**-16, torch.bfloat16: 2**-4}

# Runs that claim to compute the same math in another layout (ranks, ZeRO stages, tensor or
# pipeline splits) are compared in fp64 (--dtype fp64), where they differ only in the order of
# their sums. A sum of n terms moves by at most n 2^-53 (n 1.1e-16) of its terms' sizes when its
# order changes, and a few tens of AdamW steps carry that to well under 1e-12 of the weights' size
# (the tests see 1e-14 to 1e-13); a ReLU, clip or argmax flips only for a value within ~1e-13 of
# its kink, which among the few thousand values of these runs has a chance of order 1e-9. So a
# bound of 1e-9 holds on any CPU and thread count, and a real difference in the math (a missed
# reduction, a wrong normaliser) moves the weights by at least the learning rate's order, 1e-4 or
# more.
SAME_MATH = 1e-9

# Single computations checked in fp64 against a hand computation or another order of the same math
# (padding against none, micro-batches against one batch, a cached decode against a full forward)
# use bounds of 1e-15 to 1e-10 (relative or absolute) by the same argument: their sums have tens
# to a few hundred terms of order 1, so rounding moves them by n 2^-53 sum|terms|, 1e-14 or less,
# where a wrong formula moves them by far more than 1e-10.


def max_weight_difference(first, second, name="model.safetensors"):
    """The largest absolute difference between two runs' saved weights (same tensor names), one file
    or the shards an index lists (as parallel.write_safetensors and transformers write them)."""
    import parallel

    prefix = name.removesuffix(".safetensors")
    a, b = (dict(parallel.stored_tensors(str(path), prefix)) for path in (first, second))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Scripted --env classes for ppo.py and rft.py: one that plays three turns, and one broken in each way.
ENVIRONMENTS = '''
import time


class ThreeTurns:
    """Answers each reply with a tool message, then a user message, and ends after the third: rewards 1, 2, 3."""

    def __init__(self, row):
        self.turn = 0

    def reset(self):
        return [{"role": "user", "content": "count with me"}]

    def step(self, message):
        self.turn += 1
        reply = {"role": "tool" if self.turn == 1 else "user", "content": f"step {self.turn}"}
        return [reply], float(self.turn), self.turn == 3


class Raises(ThreeTurns):
    def step(self, message):
        raise KeyError("score")


class WrongType(ThreeTurns):
    def step(self, message):
        return "more", 1.0, False


class NeverReturns(ThreeTurns):
    def step(self, message):
        time.sleep(600)


class NoUser(ThreeTurns):
    def reset(self):
        return [{"role": "system", "content": "hello"}]
'''


class TurnScript(torch.nn.Module):
    """A causal LM that writes replies[k] (greedily) in its k-th generate() call: each call opens with the pass over
    the whole prompt (more than one token), and then feeds one token at a time."""

    device = torch.device("cpu")

    def __init__(self, replies: list, vocab_size: int):
        super().__init__()
        self.replies, self.vocab_size, self.turn, self.step = replies, vocab_size, -1, 0

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1:
            self.turn, self.step = self.turn + 1, 0
        tokens = self.replies[self.turn]
        logits = torch.zeros(len(input_ids), 1, self.vocab_size, dtype=torch.float64)
        logits[:, 0, tokens[min(self.step, len(tokens) - 1)]] = 50.0
        self.step += 1
        return types.SimpleNamespace(logits=logits, cache=None)


def check_calculator_env(script):
    """The calculator --env of ppo.py and rft.py (each script has its own copy): every <calc> in a reply answered in
    one tool message (an expression too big to compute is an error, not a hang), reward 1 for the right answer."""
    env = script.CalculatorEnv({"prompt": [{"role": "user", "content": "What is 17 * 23?"}], "answer": 391})
    assert [m["role"] for m in env.reset()] == ["system", "user"]
    assert env.step({"role": "assistant", "content": "<calc>17*23</calc> and <calc>2**99**99</calc>"}) == (
        [{"role": "tool", "content": "391, error"}],
        0.0,
        False,
    )
    assert env.step({"role": "assistant", "content": "391"}) == ([], 1.0, True)
    assert env.step({"role": "assistant", "content": "390"})[1:] == (0.0, True)
