"""Benchmark ppo.py against TRL's trainers on the same work: PPO (TRL's experimental PPOTrainer), GRPO
and RLOO (TRL's GRPOTrainer and RLOOTrainer).

    # peers live in their own virtual environments (this script installs nothing; see benchmarks/README.md)
    python benchmarks/vs_trl.py --ppo-python /tmp/venv_trl112/bin/python --grpo-python /tmp/venv_trl116/bin/python
    python benchmarks/vs_trl.py --model gpt2 --algos ppo      # the fast row only
    python benchmarks/vs_trl.py --device cuda                 # on a GPU

One command runs every contender, one after the other, each in a fresh process of this script (so
peak memories are separate), and prints one markdown table with the ratios. Every contender gets the
same randomly initialised model (SmolLM2-135M's architecture, or a tiny GPT-2), the same prompts, batch
size, response length, epochs, minibatches, micro-batches, sampling settings (temperature 1, no top-k,
no top-p) and reward. Every response is exactly --response-length tokens long in every contender: the
tokenizer is word-level, one word per model token (so decoding and re-tokenizing gives back the same
ids), and its EOS is an id the model cannot produce (one past its vocabulary), so no row stops early.
The generated tokens are counted in every contender and printed. The same work too: ours' PPO row takes
its old log-probs from the sampler and clips no gradient (--old-logprobs sampler, --max-grad-norm 1e9),
as TRL's PPOTrainer does; its GRPO and RLOO rows run the old-log-prob pass and clip at 1, as TRL's do.

Per contender: seconds per update (median over --updates timed updates after --warmup updates; an
update is generate + score + log-probs + optimise), generated tokens per second, and peak memory of the
whole training (warm-up included): on CPU the resident-set high-water mark (VmHWM) of the process, and
above what it held after its imports (so that TRL's extra libraries do not count); on CUDA
torch.cuda.max_memory_allocated. Ours also reports where its time goes (the time/*_s phases ppo.py
logs). Evaluation is outside the timed updates in ours (it runs after the last update's clock is
read) and switched off in TRL (num_sample_generations=0, no eval strategy).

TRL's PPOTrainer calls gc.collect() (and empty_cache(), a no-op on CPU) after every update; the
"TRL PPO, no cleanup" row times it with those calls replaced by no-ops.
"""

import argparse
import ctypes
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 2**20

# contender name -> (algorithm, whose, which interpreter flag runs it)
CONTENDERS = {
    "ours-ppo": ("ppo", "ours"),
    "trl-ppo": ("ppo", "trl"),
    "trl-ppo-nocleanup": ("ppo", "trl"),
    "ours-grpo": ("grpo", "ours"),
    "trl-grpo": ("grpo", "trl"),
    "ours-rloo": ("rloo", "ours"),
    "trl-rloo": ("rloo", "trl"),
}
LABELS = {
    "ours-ppo": "ours PPO",
    "trl-ppo": "TRL PPOTrainer (as shipped)",
    "trl-ppo-nocleanup": "TRL PPOTrainer, no gc.collect/empty_cache",
    "ours-grpo": "ours GRPO",
    "trl-grpo": "TRL GRPOTrainer",
    "ours-rloo": "ours RLOO",
    "trl-rloo": "TRL RLOOTrainer",
}
REWARD_SOURCE = '''
def reward(prompts, completions, **kwargs):
    """Fraction of the response's words whose number is even: cheap, deterministic, and the same in both."""
    return [sum(int(w[1:]) % 2 == 0 for w in c.split()) / max(1, len(c.split())) for c in completions]
'''


# -----------------------------------------------------------------------------
# the shared setup: models, tokenizer, prompts (built by the driver, read by every contender)


def word_tokenizer(vocab_size):
    """A word-level tokenizer with one word per model token ("w0" ... "w{V-1}") and an EOS (also the pad)
    at id V, which the model cannot sample: every response runs to the full length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["<eos>"] = vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>", clean_up_tokenization_spaces=False
    )


def model_config(name):
    from transformers import GPT2Config, LlamaConfig

    if name == "smollm2":  # SmolLM2-135M
        return LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            bos_token_id=None,
            eos_token_id=49152,
            pad_token_id=None,
        )
    return GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=8192,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=8192,
        pad_token_id=None,
    )


def build_setup(workdir, model_name, prompt_length, n_prompts=64):
    """policy/ (causal LM), reward/ (sequence classifier with num_labels=1: TRL's reward and value model,
    our --reward-model and --value-model), prompts.jsonl, reward.py; all from fixed seeds."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = os.path.join(workdir, model_name)
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    config = model_config(model_name)
    tokenizer = word_tokenizer(config.vocab_size)
    for sub, cls, seed in (("policy", AutoModelForCausalLM, 0), ("reward", AutoModelForSequenceClassification, 1)):
        torch.manual_seed(seed)
        config.num_labels = 1
        cls.from_config(config).save_pretrained(os.path.join(folder, sub))
        tokenizer.save_pretrained(os.path.join(folder, sub))
    rng = np.random.RandomState(0)
    # n_prompts for TRL; ours holds one more out for its (untimed) evaluation.
    prompts = [
        " ".join(f"w{i}" for i in rng.randint(0, config.vocab_size, prompt_length)) for _ in range(n_prompts + 1)
    ]
    with open(os.path.join(folder, "prompts.jsonl"), "w") as file:
        file.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    with open(os.path.join(folder, "reward.py"), "w") as file:
        file.write(REWARD_SOURCE)
    open(os.path.join(folder, "done"), "w").close()
    return folder


# -----------------------------------------------------------------------------
# measuring (inside a contender's process)


def _status(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


class Memory:
    """Peak memory of the training: on CPU VmHWM, reset (after malloc_trim) once the imports are done;
    on CUDA max_memory_allocated."""

    def __init__(self, device):
        self.device = device
        self.import_peak = _status("VmHWM")
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # VmHWM := VmRSS
        self.base = _status("VmRSS")
        self.peak = None

    def read(self):
        """Called at the end of the last update (before any final save)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = {"peak": torch.cuda.max_memory_allocated(), "peak_extra": torch.cuda.max_memory_allocated()}
        else:
            hwm = _status("VmHWM")
            self.peak = {"peak": max(hwm, self.import_peak), "peak_extra": hwm - self.base}


def clock(device):
    """(wall seconds, CPU seconds of this process over all its threads), after the device's queued work."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def count_optimizer_steps():
    """Counts every torch optimizer step in this process (a global hook, so TRL's and ours alike)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    counter = [0]
    register_optimizer_step_post_hook(lambda *args: counter.__setitem__(0, counter[0] + 1))
    return counter


def summarise(ends, warmup, tokens_per_update, memory, steps, extra):
    """Seconds per update from the times at which updates ended (ends[0]: the start of the first)."""
    durations = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    seconds = statistics.median(durations[warmup:])
    return {
        "seconds": seconds,
        "all_seconds": durations,
        "cpu_seconds": statistics.median(cpu[warmup:]),
        "tokens_per_update": tokens_per_update,
        "tokens_per_s": tokens_per_update / seconds,
        **memory.peak,
        "optimizer_steps_per_update": steps,
        **extra,
    }


# -----------------------------------------------------------------------------
# ours


def run_ours(args, folder, algo):
    import types

    import torch
    import tqdm

    sys.path.insert(0, ROOT)
    import ppo
    import torch._dynamo  # noqa: F401

    # torch._dynamo (about 65 MB resident) comes with TRL's imports, and with ours' first forward (transformers'
    # masking_utils imports it): imported before the baseline in both, so that neither counts it as training.
    memory = Memory(args.device)
    steps = count_optimizer_steps()
    total = args.warmup + args.updates
    marks, logged = [], []

    class Marker(tqdm.tqdm):
        """ppo.main's progress bar, created right before the loop and advanced right after each
        update's training phase, before any evaluation: its calls are the update boundaries."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            marks.append(clock(args.device))

        def update(self, n=1):
            marks.append(clock(args.device))
            if len(marks) == total + 1:
                memory.read()  # after the last update, before ppo's evaluation and final save
            return super().update(n)

    class Recorder:
        """Stands in for the wandb run: keeps each update's metrics in this process."""

        id = "benchmark"
        summary = {}

        def log(self, metrics, step):
            logged.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

        def finish(self):
            pass

    ppo.tqdm = types.SimpleNamespace(tqdm=Marker)
    ppo.init_wandb = lambda *a, **k: Recorder()
    critic_free = algo != "ppo"
    with tempfile.TemporaryDirectory() as output:
        ppo.main(
            ppo.Args(
                model=os.path.join(folder, "policy"),
                task="jsonl",
                data=os.path.join(folder, "prompts.jsonl"),
                reward_model=None if critic_free else os.path.join(folder, "reward"),
                value_model=None if critic_free else os.path.join(folder, "reward"),
                reward_fn=os.path.join(folder, "reward.py") + ":reward" if critic_free else None,
                advantage="gae" if algo == "ppo" else algo,
                samples_per_prompt=args.samples_per_prompt if critic_free else 1,
                batch_size=args.batch_size,
                mini_batch_size=args.batch_size // args.mini_batches,
                micro_batch_size=args.micro_batch_size,
                generation_batch_size=args.batch_size,
                ppo_epochs=args.ppo_epochs,
                max_new_tokens=args.response_length,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                init_kl_coef=0.05,
                kl_estimator="k1",
                vf_coef=0.1,
                cliprange=0.2,
                # TRL 1.12.0's PPOTrainer takes the old log-probs from generation's logits and never clips the
                # gradient: ours' PPO does the same work (a limit no gradient here reaches), GRPO/RLOO as TRL's do.
                old_logprobs="trainer" if critic_free else "sampler",
                max_grad_norm=1.0 if critic_free else 1e9,
                learning_rate=args.learning_rate,
                missing_eos_penalty=1.0,
                num_updates=total,
                eval_every=10**9,
                eval_prompts=1,
                device=args.device,
                dtype=args.dtype,
                output_dir=output,
                track=True,
                seed=1,
            )
        )
    assert len(logged) == total and len(marks) == total + 1, (len(logged), len(marks))
    names = ("generation", "scoring", "logprobs", "training")
    phases = {p: statistics.median(m[f"time/{p}_s"] for m in logged[args.warmup :]) for p in names}
    # the rest of each update: choosing and encoding prompts, statistics, logging (per update, then the median)
    phases["other"] = statistics.median(
        b[0] - a[0] - sum(m[f"time/{p}_s"] for p in names)
        for a, b, m in list(zip(marks, marks[1:], logged))[args.warmup :]
    )
    tokens = [m["objective/response_length"] * args.batch_size for m in logged]
    return summarise(
        marks,
        args.warmup,
        statistics.mean(tokens),
        memory,
        steps[0] / total,
        {
            "phases": phases,
            "eos_fraction": max(m["objective/eos_fraction"] for m in logged),
            "torch_threads": torch.get_num_threads(),
        },
    )


# -----------------------------------------------------------------------------
# TRL


def trl_common(args, output):
    """TrainingArguments shared by every TRL config: --dtype (fp32, or bf16=True, TRL's default: accelerate's
    bf16 autocast over fp32 weights, as ours' --dtype bf16), no gradient checkpointing (as ours; TRL's default
    is gradient_checkpointing=True), constant learning rate, no saving, no reporting."""
    return dict(
        output_dir=output,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        bf16=args.dtype == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        seed=1,
        per_device_train_batch_size=args.micro_batch_size,
    )


def trl_callback(args, ends, logs, memory, last_step, every):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(clock(args.device))

        def on_step_end(self, training_args, state, control, **k):
            if state.global_step % every == 0:
                ends.append(clock(args.device))
            if state.global_step == last_step:
                memory.read()

        def on_log(self, training_args, state, control, logs=None, **k):
            logs_seen.append(dict(logs or {}))

    logs_seen = logs
    return Timer()


def run_trl_ppo(args, folder, cleanup):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    memory = Memory(args.device)
    steps = count_optimizer_steps()
    if not cleanup:  # the per-update cleanup, disabled

        class NoGC:
            @staticmethod
            def collect():
                return 0

        ppo_trainer.gc = NoGC
        ppo_trainer.empty_cache = lambda: None
    generated = [0, 0.0]  # tokens, seconds
    batch_generation = ppo_trainer.batch_generation

    def counted_generation(model, queries, *rest):
        start = clock(args.device)[0]
        query_responses, logits = batch_generation(model, queries, *rest)
        generated[1] += clock(args.device)[0] - start
        generated[0] += int((query_responses[:, queries.shape[1] :] != tokenizer.pad_token_id).sum())
        return query_responses, logits

    ppo_trainer.batch_generation = counted_generation
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "policy"))
    tokenizer.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(folder, "prompts.jsonl"))][:-1]
    dataset = datasets.Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    # The models that only run forward are stored in bf16 under --dtype bf16, as ours stores them:
    # TRL runs them outside accelerate's autocast, so fp32 copies would run in fp32.
    frozen = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"), dtype=frozen)
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "reward"), dtype=frozen)
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "reward"), dtype=torch.float32)
    total = args.warmup + args.updates
    ends, logs = [], []
    # TRL 1.12.0's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, and
    # accelerate steps once every gradient_accumulation_steps micro-batches. With micro-batch =
    # minibatch (the default here), per_device_train_batch_size = batch and no accumulation give
    # ours' schedule: micro-batches of one minibatch, one optimizer step per minibatch. Otherwise
    # TRL cannot express it; accumulating over the whole batch steps once every two minibatches.
    mini = args.batch_size // args.mini_batches
    per_minibatch = args.micro_batch_size == mini
    layout = (
        dict(per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1)
        if per_minibatch
        else dict(gradient_accumulation_steps=args.batch_size // args.micro_batch_size)
    )
    with tempfile.TemporaryDirectory() as output:
        config = PPOConfig(
            **{**trl_common(args, output), **layout},
            num_mini_batches=args.mini_batches,
            num_ppo_epochs=args.ppo_epochs,
            response_length=args.response_length,
            total_episodes=args.batch_size * total,
            local_rollout_forward_batch_size=args.batch_size,
            temperature=1.0,
            stop_token="eos",
            missing_eos_penalty=1.0,
            kl_coef=0.05,
            kl_estimator="k1",
            vf_coef=0.1,
            cliprange=0.2,
            num_sample_generations=0,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            eval_dataset=dataset.select(range(2)),
        )
        trainer.add_callback(trl_callback(args, ends, logs, memory, total, 1))
        trainer.train()
    assert len(ends) == total + 1, ends
    return summarise(
        ends,
        args.warmup,
        generated[0] / total,
        memory,
        steps[0] / total,
        {"generation_s": generated[1] / total, "eos_tokens": sum(log.get("val/num_eos_tokens", 0) for log in logs)},
    )


def run_trl_group(args, folder, algo):
    import importlib.util

    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    memory = Memory(args.device)
    steps = count_optimizer_steps()
    spec = importlib.util.spec_from_file_location("bench_reward", os.path.join(folder, "reward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "policy"))
    tokenizer.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(folder, "prompts.jsonl"))][:-1]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    mini = args.batch_size // args.mini_batches
    # One generation batch of --batch-size rollouts, used for --ppo-epochs passes (num_iterations) in
    # minibatches of batch/mini_batches rollouts (one optimizer step each) of micro-batches.
    steps_per_update = args.ppo_epochs * args.mini_batches
    total = args.warmup + args.updates
    Config, Trainer = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    ends, logs = [], []
    with tempfile.TemporaryDirectory() as output:
        config = Config(
            **trl_common(args, output),
            gradient_accumulation_steps=mini // args.micro_batch_size,
            steps_per_generation=args.batch_size // args.micro_batch_size,
            num_iterations=args.ppo_epochs,
            num_generations=args.samples_per_prompt,
            max_completion_length=args.response_length,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=0.05,
            epsilon=0.2,
            max_steps=total * steps_per_update,
            disable_dropout=True,
            log_completions=False,
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = Trainer(
            model=os.path.join(folder, "policy"),
            reward_funcs=module.reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.add_callback(trl_callback(args, ends, logs, memory, total * steps_per_update, steps_per_update))
        trainer.train()
    assert len(ends) == total + 1, ends
    lengths = [log["completions/mean_length"] for log in logs if "completions/mean_length" in log]
    clipped = [log["completions/clipped_ratio"] for log in logs if "completions/clipped_ratio" in log]
    return summarise(
        ends,
        args.warmup,
        statistics.mean(lengths) * args.batch_size,
        memory,
        steps[0] / total,
        {"clipped_ratio_min": min(clipped) if clipped else None},
    )


def run_contender(args):
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    folder = os.path.join(args.workdir, args.model_name)
    algo, whose = CONTENDERS[args.only]
    if whose == "ours":
        result = run_ours(args, folder, algo)
    elif algo == "ppo":
        result = run_trl_ppo(args, folder, cleanup=args.only == "trl-ppo")
    else:
        result = run_trl_group(args, folder, algo)
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    print("RESULT " + json.dumps({**result, "versions": versions}), flush=True)


# -----------------------------------------------------------------------------
# the driver


def cpu_busy():
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def child_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(args, python, model_name, contender):
    flags = [
        "--only",
        contender,
        "--workdir",
        args.workdir,
        "--model-name",
        model_name,
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--response-length",
        str(args.response_length),
        "--ppo-epochs",
        str(args.ppo_epochs),
        "--mini-batches",
        str(args.mini_batches),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--samples-per-prompt",
        str(args.samples_per_prompt),
        "--warmup",
        str(args.warmup),
        "--updates",
        str(args.updates),
        "--learning-rate",
        str(args.learning_rate),
        "--dtype",
        args.dtype,
    ] + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    started = time.time()
    process = subprocess.run([python, os.path.abspath(__file__), *flags], capture_output=True, text=True, env=env)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        print(f"  {contender}: failed (exit {process.returncode}): {' | '.join(tail)}", flush=True)
        return None
    result = json.loads(lines[-1][7:])
    print(
        f"  {contender}: {result['seconds']:.2f} s/update, {result['cpu_seconds']:.2f} CPU s/update (updates: "
        f"{', '.join(f'{s:.2f}' for s in result['all_seconds'])}), "
        f"{result['tokens_per_update']:.0f} tokens/update, peak {result['peak'] / MiB:.0f} MiB "
        f"(+{result['peak_extra'] / MiB:.0f}), {result['optimizer_steps_per_update']:g} optimizer steps/update, "
        f"{time.time() - started:.0f} s in all"
        + (f", generation {result['generation_s']:.2f} s/update" if "generation_s" in result else ""),
        flush=True,
    )
    return result


def print_table(rows):
    print(
        "\n| model | algorithm | contender | s / update | first update s | CPU s / update | tokens / s | peak memory | "
        "peak above imports | time vs TRL | CPU time vs TRL | peak vs TRL | optimizer steps / update |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name, algo, contender, result, baseline in rows:
        ratio = result["seconds"] / baseline["seconds"]
        speed = f"{ratio:.2f}x ({1 / ratio:.2f}x as fast)" if contender.startswith("ours") else f"{ratio:.2f}x"
        print(
            f"| {model_name} | {algo} | {LABELS[contender]} | {result['seconds']:.2f} | "
            f"{result['all_seconds'][0]:.2f} | {result['cpu_seconds']:.2f} | "
            f"{result['tokens_per_s']:.1f} | "
            f"{result['peak'] / MiB:.0f} MiB | {result['peak_extra'] / MiB:.0f} MiB | {speed} | "
            f"{result['cpu_seconds'] / baseline['cpu_seconds']:.2f}x | "
            f"{result['peak_extra'] / baseline['peak_extra']:.2f}x | {result['optimizer_steps_per_update']:g} |"
        )
    ours = [(m, a, r) for m, a, c, r, _ in rows if c.startswith("ours")]
    if ours:
        print("\nWhere ours spends an update (median seconds of each phase, as ppo.py logs them):\n")
        print("| model | algorithm | generation | scoring | log-probs | training | other |")
        print("|---|---|---|---|---|---|---|")
        for model_name, algo, result in ours:
            phases = result["phases"]
            cells = " | ".join(
                f"{phases[p]:.2f} ({phases[p] / result['seconds']:.0%})"
                for p in ("generation", "scoring", "logprobs", "training", "other")
            )
            print(f"| {model_name} | {algo} | {cells} |")


def drive(args):
    import platform

    import torch

    machine = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    try:
        machine = (
            re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
            if args.device == "cpu"
            else machine
        )
    except (OSError, AttributeError):
        pass
    print(
        f"device {args.device} ({machine}, {os.cpu_count()} CPUs); batch {args.batch_size}, response "
        f"{args.response_length} tokens, "
        f"{args.ppo_epochs} epochs x {args.mini_batches} minibatches, micro-batch {args.micro_batch_size}, "
        f"{args.samples_per_prompt} samples per prompt (GRPO/RLOO); {args.warmup} warm-up + {args.updates} timed "
        f"updates; {args.dtype}" + (f"; {args.threads} torch thread(s)" if args.threads else ""),
        flush=True,
    )
    try:  # which ppo.py is measured (the working tree may differ from the last commit)
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "ppo.py", "kernels.py", "parallel.py"]
        ).returncode
        print(f"ppo.py at commit {head}" + (" with uncommitted changes" if dirty else ""), flush=True)
    except OSError:
        pass
    pythons = {"ppo": args.ppo_python, "grpo": args.grpo_python, "rloo": args.grpo_python}
    rows = []
    busy, children = cpu_busy(), child_cpu()
    versions = {}
    for model_name in args.model:
        build_setup(args.workdir, model_name, args.prompt_length)
        for algo in args.algos:
            print(f"{model_name} {algo} (python: {pythons[algo]})", flush=True)
            results = {}
            for contender in [c for c, (a, _) in CONTENDERS.items() if a == algo]:
                results[contender] = launch(args, pythons[algo], model_name, contender)
                if results[contender]:
                    versions[pythons[algo]] = results[contender]["versions"]
            baseline = results.get(f"trl-{algo}")
            for contender, result in results.items():
                if result and baseline:
                    rows.append((model_name, algo, contender, result, baseline))
            if baseline and results.get(f"ours-{algo}"):
                ours = results[f"ours-{algo}"]
                checks = [f"ours {baseline['seconds'] / ours['seconds']:.2f}x as fast as TRL as shipped"]
                if results.get("trl-ppo-nocleanup"):
                    checks.append(
                        f"{results['trl-ppo-nocleanup']['seconds'] / ours['seconds']:.2f}x as fast as TRL without "
                        "cleanup"
                    )
                checks.append(f"peak above imports {ours['peak_extra'] / baseline['peak_extra']:.2f}x TRL's")
                print(f"  -> {'; '.join(checks)}", flush=True)
    print_table(rows)
    print()
    for python, version in versions.items():
        print(f"{python}: " + ", ".join(f"{k} {v}" for k, v in version.items()))
    own = child_cpu() - children
    print(
        f"CPU seconds used by other processes during the run: {max(0.0, cpu_busy() - busy - own):.1f} (the contenders: "
        f"{own:.1f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--model", nargs="+", default=["gpt2", "smollm2"], choices=["smollm2", "gpt2"])
    parser.add_argument("--algos", nargs="+", default=["ppo", "grpo", "rloo"], choices=["ppo", "grpo", "rloo"])
    parser.add_argument("--batch-size", type=int, default=16, help="rollouts per update")
    parser.add_argument(
        "--response-length", type=int, default=16, help="generated tokens per rollout (every rollout runs to it)"
    )
    parser.add_argument("--prompt-length", type=int, default=8, help="words (= tokens) per prompt")
    parser.add_argument(
        "--ppo-epochs", type=int, default=2, help="passes over each batch (TRL GRPO/RLOO: num_iterations)"
    )
    parser.add_argument(
        "--mini-batches", type=int, default=2, help="minibatches per epoch (one optimizer step each in ours)"
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="rollouts per forward/backward (default: a whole minibatch)"
    )
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="GRPO/RLOO group size (TRL: num_generations)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed updates first (the table gives the first update's time too)"
    )
    parser.add_argument("--updates", type=int, default=3, help="timed updates (the median is reported)")
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: bf16 autocast over fp32 trained weights in every contender "
        "(ours' --dtype bf16, TRL's bf16=True, its default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per contender (default: torch's, one per core); "
        "1 avoids OpenMP threads waiting on each other on a shared machine",
    )
    parser.add_argument(
        "--ppo-python", default=sys.executable, help="interpreter of the environment with trl 1.12.0 (PPOTrainer)"
    )
    parser.add_argument(
        "--grpo-python", default=sys.executable, help="interpreter of the environment with trl 1.16.0 (GRPO/RLOO)"
    )
    parser.add_argument("--workdir", default=None, help="where the models are built (default: a temporary directory)")
    parser.add_argument("--only", default=None, choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-name", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.micro_batch_size = args.micro_batch_size or args.batch_size // args.mini_batches
    if args.only:
        run_contender(args)
    elif args.workdir:
        drive(args)
    else:
        with tempfile.TemporaryDirectory(prefix="vs-trl-") as workdir:
            args.workdir = workdir
            drive(args)
