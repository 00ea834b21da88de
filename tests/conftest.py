"""Shared test helpers: tiny models and tokenizers built in code, so no test needs the network."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
# Scripts run their kernels eagerly in tests (a first compile costs 15-25 s); tests/test_kernels.py
# compiles explicitly where it checks the compiled path.
os.environ.setdefault("KERNELS_COMPILE", "0")


def run_script(*argv, cwd=None, env=None, timeout=600):
    """Run one of the top-level scripts in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def run_and_kill(script, flags, tmp_path, checkpoint):
    """Run the script to the end; run it again and SIGKILL it as soon as checkpoints/<checkpoint>
    exists. Returns (uninterrupted run dir, killed run dir)."""
    reference = run_script(script, *flags, "--output-dir", str(tmp_path / "reference"), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags, "--output-dir", str(killed)],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / checkpoint).exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "config.json").exists(), "the run finished before the kill; the test proves nothing"
    return tmp_path / "reference", killed


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
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>" if pad_token else None)


def tiny_config(family: str, vocab_size: int, eos_token_id: int):
    """The smallest model of each family that still has every part (GQA for Llama, parallel residual for
    NeoX), without dropout so that runs can be compared exactly."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    if family == "gpt2":
        return GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, **common)
    if family == "gpt-neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                             hidden_dropout=0.0, attention_dropout=0.0, **common)
    raise ValueError(family)


def save_tiny_model(path, family="gpt2", tokenizer=None, seed=0):
    """A tiny randomly initialised causal LM of the given family, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or text_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), tokenizer.eos_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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
        for name in ("ppo", "ilql", "reward_model"):
            if name in sys.modules:
                sys.modules[name].vader.cache_clear()

    clear()
    yield fake_sentiment
    clear()


def torchrun(script, *flags, nproc=2, cwd=None, timeout=600, extra=()):
    """Launch a script as torchrun would on one machine with `nproc` processes (gloo on CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *extra, os.path.join(ROOT, script), *flags]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


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


def process_tree(pid: int) -> list:
    """pid and every process below it, read from /proc (Linux)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    tree, frontier = [pid], [pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree += children
        frontier += children
    return tree


def kill_launcher_and_workers(launcher: subprocess.Popen):
    """SIGKILL a torchrun launcher started with start_new_session=True and all its workers, and wait
    until they are gone. torchrun starts every worker in a session of its own, so killing the
    launcher's process group alone leaves the workers running (they would finish the run)."""
    tree = process_tree(launcher.pid)
    for pid in tree:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    deadline = time.time() + 30
    for pid in tree[1:]:
        while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
            with contextlib.suppress(OSError):
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, waiting for its new parent to reap it
            time.sleep(0.02)


def torchrun_kill_and_resume(script, flags, tmp_path, checkpoint, nproc=2):
    """kill_and_resume under torchrun: an uninterrupted nproc-process run; a second one whose
    launcher and workers are all SIGKILLed as soon as checkpoints/<checkpoint> exists (each rank's
    file included); its resumption with the same flags. Returns (uninterrupted, resumed) run dirs."""
    reference = torchrun(script, *flags, "--output-dir", str(tmp_path / "reference"), nproc=nproc, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), os.path.join(ROOT, script), *flags, "--output-dir", str(killed)]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (killed / "checkpoints" / checkpoint).exists():
        assert launcher.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    kill_launcher_and_workers(launcher)
    assert not (killed / "config.json").exists(), "the run finished before the kill; the test proves nothing"
    assert sorted(p.name for p in (killed / "checkpoints" / checkpoint).glob("rank_*.pt")) == [f"rank_{r}.pt" for r in range(nproc)]
    resumed = torchrun(script, *flags, "--resume", str(killed), nproc=nproc, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return tmp_path / "reference", killed


# Runs that claim to compute the same math in another layout (ranks, ZeRO stages, tensor or
# pipeline splits) are compared in fp64 (--dtype fp64), where they differ only in the order of
# their sums. Each sum rounds at 2**-53 (1.1e-16) of its size, and a few tens of AdamW steps carry
# that to well under 1e-12 of the weights' size (the tests see 1e-14 to 1e-13); a ReLU, clip or
# argmax flips only for a value within ~1e-13 of its kink, which among the few thousand values of
# these runs has a chance of order 1e-9. So a bound of 1e-9 holds on any CPU and thread count,
# and a real difference in the math (a missed reduction, a wrong normaliser) moves the weights by
# at least the learning rate's order, 1e-4 or more.
SAME_MATH = 1e-9


def max_weight_difference(first, second, name="model.safetensors"):
    """The largest absolute difference between two runs' saved weights (same tensor names)."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(first, name)), load_file(os.path.join(second, name))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
