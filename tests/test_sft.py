"""sft.py: data parsing, loss masking, training, checkpoints with exact resume, and bad input."""

import gzip
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import parallel
import sft
from conftest import (
    CHAT_TEMPLATES,
    END_OF_TURN,
    FIXTURES,
    ROOT,
    SAME_MATH,
    assert_same_weights,
    damage,
    run_and_kill,
    run_script,
    save_tiny_model,
    save_tiny_walk_model,
    text_tokenizer,
    chat_tokenizer,
    save_tiny_chat_model,
    write_jsonl,
    run_ranks,
    write_text_examples,
    max_weight_difference,
    torchrun_kill_and_resume,
)


def quick_args(tmp_path, **overrides):
    """A few-second randomwalks run."""
    settings = dict(
        output_dir=str(tmp_path / "run"), num_epochs=1, eval_every=1000, eval_samples_per_start=2, warmup_steps=2
    )
    return sft.Args(**{**settings, **overrides})


def final_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as file:
        return json.load(file)


# --- data ---------------------------------------------------------------------------------------
def test_hh_parser_on_upstream_format(tmp_path):
    examples = sft.load_examples("hh", os.path.join(FIXTURES, "hh-rlhf-train.jsonl"))
    assert len(examples) == 4
    prompt, completion, _ = examples[1]  # a multi-turn dialogue: the prompt keeps every earlier turn
    assert (
        prompt == "\n\nHuman: Can you recommend a book?\n\nAssistant: What kind of books do you enjoy?"
        "\n\nHuman: Science fiction.\n\nAssistant:"
    )
    assert completion == " Try The Left Hand of Darkness by Ursula K. Le Guin."
    # The hub ships gzip-compressed JSON lines; the same parser reads them.
    compressed = tmp_path / "train.jsonl.gz"
    with open(os.path.join(FIXTURES, "hh-rlhf-train.jsonl"), "rb") as source, gzip.open(compressed, "wb") as target:
        target.write(source.read())
    assert sft.load_examples("hh", str(compressed)) == examples
    assert sft.hh_example("no assistant turn here") is None


def test_tldr_parser_on_upstream_format():
    examples = sft.load_examples("tldr", os.path.join(FIXTURES, "tldr-train.jsonl"))
    assert len(examples) == 4
    prompt, completion, _ = examples[0]
    assert prompt.startswith("SUBREDDIT: r/relationships\n\nTITLE: My roommate keeps eating my food\n\nPOST: We agreed")
    assert prompt.endswith("How do I bring it up?\n\nTL;DR:")
    assert completion == " roommate eats my groceries, how do I talk to them without a fight?"


def test_jsonl_parser():
    examples = sft.load_examples("jsonl", os.path.join(FIXTURES, "demos.jsonl"))
    assert examples[1] == ("Q: Capital of France?\nA:", " Paris", None)


def test_tokenize_examples_appends_eos_and_truncates_from_the_left_of_the_prompt(capsys):
    tokenizer = sft.randomwalks_tokenizer()
    eos = tokenizer.eos_token_id
    examples = [("bc", "da", None), ("bcdefg", "hij", None)]
    sequences = sft.tokenize_examples(tokenizer, examples, max_length=6, overlong="truncate")
    assert sequences[0] == ([1, 2, 3, 0, eos], [0, 0, 1, 1, 1])
    assert sequences[1] == ([5, 6, 7, 8, 9, eos], [0, 0, 1, 1, 1, 1])  # "efg" lost "bcd"; the completion is whole
    assert "1 of 2 examples are longer than --max-length 6" in capsys.readouterr().out
    assert sft.tokenize_examples(tokenizer, examples, 6, "skip") == [([1, 2, 3, 0, eos], [0, 0, 1, 1, 1])]
    # A completion longer than the budget keeps one prompt token and is cut on the right.
    assert sft.tokenize_examples(tokenizer, [("bc", "defghij", None)], 4, "truncate") == [([2, 3, 4, 5], [0, 1, 1, 1])]


# --- conversations ------------------------------------------------------------------------------
def turn(role, content):
    return {"role": role, "content": content}


THREE_TURNS = [
    turn("system", "Be terse."),
    turn("user", "Capital of France?"),
    turn("assistant", "Paris"),
    turn("user", "And Italy?"),
    turn("assistant", "<think>easy</think>Rome"),
    turn("user", "Spain?"),
    turn("assistant", "Madrid"),
]
# The three-turn conversation as each template writes it, in pieces: 1 marks the pieces learned (each
# assistant reply and its end-of-turn token), 0 the context (the template's framing after an end-of-turn
# token included).
THREE_TURNS_RENDERED = {
    "chatml": [
        ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0),
        ("Paris<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>easy</think>Rome<|im_end|>", 1),
        ("\n<|im_start|>user\nSpain?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Madrid<|im_end|>", 1),
        ("\n", 0),
    ],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>", 0),
        ("<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>", 0),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("Paris<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|>", 0),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("<think>easy</think>Rome<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nSpain?<|eot_id|>", 0),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("Madrid<|eot_id|>", 1),
    ],
}


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_loss_mask_of_a_three_turn_conversation_token_by_token(style):
    """Every assistant turn and its end-of-turn token are learned, nothing else: the mask, token by
    token, against the pieces written out by hand; the ids are the template's own rendering."""
    tokenizer = chat_tokenizer(style)
    pieces = [
        (tokenizer(text, add_special_tokens=False)["input_ids"], learned)
        for text, learned in THREE_TURNS_RENDERED[style]
    ]
    [(ids, mask)] = sft.tokenize_examples(tokenizer, [([], THREE_TURNS, None)], 512, "truncate")
    assert ids == [token for piece, _ in pieces for token in piece]
    assert mask == [learned for piece, learned in pieces for _ in piece]
    assert ids == tokenizer.apply_chat_template(THREE_TURNS, tokenize=True)["input_ids"]
    assert sft.end_of_turn_ids(tokenizer) == {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(END_OF_TURN[style]),
    }


def test_every_format_is_read_and_rendered_as_apply_chat_template_does(tmp_path):
    """Each kind of record, from jsonl (and parquet and a datasets directory where datasets is
    installed), becomes the sequence the tokenizer's own rendering gives: conversations through
    apply_chat_template with their tools and, for a prompt, the generation prompt; strings
    tokenized as before. Only the completion (or every token of a text) is learned."""
    tokenizer, tools = chat_tokenizer("chatml"), [{"name": "lookup", "parameters": {}}]
    question, answer = THREE_TURNS[:2], [turn("assistant", "Paris")]
    records = {
        "text": {"text": "the cat sat"},
        "messages": {"messages": question + answer, "tools": tools},
        "prompt-completion": {"prompt": "the cat", "completion": " sat"},
        "conversational prompt-completion": {"prompt": question, "completion": answer, "tools": tools, "id": 7},
    }
    for kind, record in records.items():
        [example] = sft.load_examples("jsonl", write_jsonl(tmp_path / "data.jsonl", [record]))
        [(ids, mask)] = sft.tokenize_examples(tokenizer, [example], 512, "truncate")
        if kind in ("text", "prompt-completion"):
            prompt_ids = tokenizer(record.get("prompt", ""))["input_ids"] or [tokenizer.eos_token_id]
            completion = tokenizer(record.get("completion", record.get("text")))["input_ids"] + [tokenizer.eos_token_id]
            assert (ids, mask) == (prompt_ids + completion, [0] * len(prompt_ids) + [1] * len(completion))
            continue
        assert ids == tokenizer.apply_chat_template(question + answer, tools=tools, tokenize=True)["input_ids"]
        context = tokenizer.apply_chat_template(question, tools=tools, add_generation_prompt=True, tokenize=True)
        learned = tokenizer("Paris<|im_end|>", add_special_tokens=False)["input_ids"]
        assert mask == [0] * len(context["input_ids"]) + [1] * len(learned) + [0]  # the "\n" after <|im_end|>
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": THREE_TURNS}, {"messages": question + answer}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "data.parquet", tmp_path / "saved"):
        assert sft.load_examples("jsonl", str(path)) == [([], row["messages"], None) for row in rows]


def test_a_template_that_rewrites_earlier_turns_gives_one_example_per_turn(capsys):
    """The drops-thinking template (as Qwen3's) writes an earlier turn without its <think> block, so the
    rendering of the whole conversation is not what the model saw when it wrote that turn: each assistant
    turn becomes an example of its own, whose context is the template's rendering at that turn."""
    tokenizer = chat_tokenizer("drops-thinking")
    sequences = sft.tokenize_examples(tokenizer, [([], THREE_TURNS, None)], 512, "truncate")
    assert len(sequences) == 3
    for (ids, mask), reply in zip(sequences, (2, 4, 6)):
        context = tokenizer.apply_chat_template(THREE_TURNS[:reply], add_generation_prompt=True, tokenize=True)
        learned = tokenizer(THREE_TURNS[reply]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids == context["input_ids"] + learned and mask == [0] * len(context["input_ids"]) + [1] * len(learned)
    assert "<think>easy</think>" in tokenizer.decode(sequences[1][0])  # the turn that thought keeps its thinking
    assert "easy" not in tokenizer.decode(sequences[2][0])  # and it is dropped from the next turn's context
    assert capsys.readouterr().out.count("1 conversation(s) are not rendered prefix-preserving") == 1


def test_evaluation_stops_on_every_end_of_turn_id():
    """A chat model ends a turn with a token that is not its EOS (<|im_end|> here) and lists both in its
    generation config: generation stops on either, and on none at --max-new-tokens."""
    tokenizer = chat_tokenizer("chatml")
    eos, end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = torch.tensor([[5, 6, end, 7], [5, eos, 7, 7], [5, 6, 7, 8]])  # each row's tokens, step by step

    class Scripted(torch.nn.Module):
        config, generation_config, step = object(), GenerationConfig(eos_token_id=[eos, end]), 0

        def forward(self, input_ids, **_):
            logits = torch.nn.functional.one_hot(script[:, self.step], len(tokenizer)).double()[:, None]
            self.step += 1
            return type("Output", (), {"logits": logits, "cache": None})

    assert sft.generate(Scripted(), tokenizer, [[1], [2, 3], [4]], 4, 0.0, "cpu") == [[5, 6], [5], [5, 6, 7, 8]]


# --- loss ---------------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """Stands in for a model: returns a logits tensor we can take gradients against."""

    def __init__(self, batch, width, vocab):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(batch, width, vocab, dtype=torch.float64))

    def forward(self, input_ids, attention_mask, use_cache):
        return type("Output", (), {"logits": self.logits})


def test_loss_covers_completion_tokens_only():
    tokenizer = sft.randomwalks_tokenizer()
    sequences = sft.tokenize_examples(tokenizer, [("bcd", "ea", None), ("f", "ghija", None)], 16, "truncate")
    batch = sft.collate(sequences, tokenizer.pad_token_id, "cpu")
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert labels.tolist()[0] == [-100, -100, -100, 4, 0, 21, -100]  # prompt and padding carry no label
    model = FixedLogits(2, input_ids.shape[1], len(tokenizer))
    loss = sft.loss_sum_from_logits(sft.model_logits(model, batch), labels)
    loss.backward()
    # Positions whose next token is prompt or padding get exactly zero gradient.
    predicts_completion = torch.zeros(input_ids.shape, dtype=torch.bool)
    predicts_completion[:, :-1] = labels[:, 1:] != -100
    gradient_norm = model.logits.grad.abs().sum(-1)
    assert (gradient_norm[~predicts_completion] == 0).all()
    assert (gradient_norm[predicts_completion] > 0).all()
    # And the value is the plain sum of completion-token negative log-likelihoods.
    log_probs = torch.log_softmax(model.logits.detach(), -1)
    expected = -sum(
        log_probs[b, t - 1, input_ids[b, t]]
        for b in range(2)
        for t in range(1, input_ids.shape[1])
        if labels[b, t] != -100
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_gradient_accumulation_equals_one_big_batch(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    examples = sft.load_examples("tldr", os.path.join(FIXTURES, "tldr-train.jsonl"))
    batch = sft.tokenize_examples(tokenizer, examples, 64, "truncate")  # unequal lengths and completion sizes
    model = parallel.DataParallel(model)  # one process: the pass-through wrapper the script uses
    batch_tokens = sum(sum(mask[1:]) for _, mask in batch)
    gradients, losses = [], []
    for micro_batch_size in (4, 3, 1):
        model.zero_grad()
        args = sft.Args(micro_batch_size=micro_batch_size)
        micro_batches = sft.micro_batches_of(batch, args, tokenizer.pad_token_id, "cpu")
        losses.append(
            sft.accumulate_gradients(model, micro_batches, batch_tokens, 1, torch.autocast("cpu", enabled=False))
        )
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert gradients[0].abs().max() > 1e-3
    for loss, gradient in zip(losses[1:], gradients[1:]):
        assert loss == pytest.approx(losses[0], rel=1e-12)
        assert torch.allclose(gradient, gradients[0], rtol=1e-10, atol=1e-13)


# --- training -----------------------------------------------------------------------------------
def test_conversational_formats_train_end_to_end(tmp_path, tiny_gpt2):
    """text, messages and conversational prompt-completion records train a tiny chat model (prompt-completion
    strings: the tests above); a template-less model takes its template from --chat-template, saved with it."""
    chat_model = save_tiny_chat_model(tmp_path / "chat", "chatml")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATES["chatml"])
    records = {
        "text": [{"text": "the cat sat on the mat"}] * 4,
        "messages": [{"messages": THREE_TURNS}] * 4,
        "prompt-completion": [{"prompt": THREE_TURNS[:2], "completion": THREE_TURNS[2:3]}] * 4,
    }
    for kind, rows in records.items():
        model = tiny_gpt2 if kind == "messages" else chat_model  # tiny_gpt2's tokenizer has no template
        args = text_args(
            tmp_path, write_jsonl(tmp_path / f"{kind}.jsonl", rows), model=model, output_dir=str(tmp_path / kind)
        )
        args = replace(args, num_epochs=1, batch_size=2, eval_fraction=0.25, max_new_tokens=3, eval_generations=1)
        sft.main(replace(args, chat_template=str(template)) if kind == "messages" else args)
        assert final_metrics(args.output_dir)["step"] == 1 and math.isfinite(
            final_metrics(args.output_dir)["eval/loss"]
        )
    assert AutoTokenizer.from_pretrained(tmp_path / "messages").chat_template == CHAT_TEMPLATES["chatml"]


def test_loss_decreases_and_model_reloads(tmp_path):
    args = quick_args(tmp_path)
    sft.main(args)
    metrics = final_metrics(args.output_dir)
    assert metrics["eval/loss"] < 2.0  # a fresh model starts at log(24) = 3.18; one epoch (9 steps) reaches 1.79
    model = AutoModelForCausalLM.from_pretrained(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    assert tokenizer("sda")["input_ids"] == [18, 3, 0]
    assert model.config.n_layer == 6 and model.config.n_embd == 144


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_model_families_train_on_text(tmp_path, family):
    model_dir = save_tiny_model(tmp_path / "model", family)
    args = sft.Args(
        task="hh",
        data=os.path.join(FIXTURES, "hh-rlhf-train.jsonl"),
        model=model_dir,
        output_dir=str(tmp_path / "run"),
        num_epochs=3,
        batch_size=2,
        micro_batch_size=1,
        eval_fraction=0.25,
        learning_rate=3e-3,
        warmup_steps=1,
        max_new_tokens=4,
        eval_generations=1,
    )
    sft.main(args)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    assert reloaded.config.model_type == family.replace("-", "_")
    assert final_metrics(args.output_dir)["step"] == 3


def test_tokenizer_without_pad_token_is_handled(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "gpt2", tokenizer=text_tokenizer(pad_token=False))
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    args = sft.Args(
        task="jsonl",
        data=os.path.join(FIXTURES, "demos.jsonl"),
        model=model_dir,
        output_dir=str(tmp_path / "run"),
        num_epochs=1,
        batch_size=3,
        micro_batch_size=3,
        eval_fraction=0.25,
        max_new_tokens=2,
        eval_generations=1,
    )
    sft.main(args)
    assert os.path.exists(os.path.join(args.output_dir, "model.safetensors"))


def test_smoke_run_with_wandb_offline(tmp_path):
    """The tracked run's plumbing, on a tiny model: the default one trains in test_loss_decreases_and_model_reloads."""
    result = run_script(
        "sft.py",
        "--model",
        save_tiny_walk_model(tmp_path / "model"),
        "--num-epochs",
        "1",
        "--eval-every",
        "5",
        "--eval-samples-per-start",
        "2",
        "--track",
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 5: loss" in result.stdout
    run_dir = tmp_path / "run"
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"} <= set(os.listdir(run_dir))
    assert any(name.startswith("offline-run") for name in os.listdir(run_dir / "wandb"))
    assert set(final_metrics(run_dir)) >= {
        "eval/loss",
        "eval/optimality_greedy",
        "eval/optimality_sampled",
        "eval/valid_walks_sampled",
    }


def test_generation_is_the_models_own_whatever_its_generation_config_asks():
    """A checkpoint whose generation_config asks for a huge repetition penalty and no repeated token
    (instruct checkpoints often ship a penalty): model.generate() obeyed it, so the evaluation did
    not measure the model's own distribution. sft.generate decodes by argmax at temperature 0, as
    a loop that re-runs the whole prefix each step does, repeats included."""
    from conftest import tiny_config

    tokenizer = sft.randomwalks_tokenizer()
    torch.manual_seed(0)
    model = (
        AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)).double().eval()
    )
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 100.0, 1
    prompts = [tokenizer(prompt)["input_ids"] for prompt in ("b", "cde", "fg")]
    completions = sft.generate(model, tokenizer, prompts, 12, 0.0, "cpu")
    for prompt, completion in zip(prompts, completions):
        ids, reference = list(prompt), []
        with torch.no_grad():
            for _ in range(12):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                reference.append(token)
                ids.append(token)
        assert completion == reference
    assert any(len(set(c)) < len(c) for c in completions), (
        "no completion repeats a token: the test would not see a penalty"
    )


# --- checkpoints --------------------------------------------------------------------------------
def test_interrupted_checkpoint_write_is_not_picked_up(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000020.tmp").mkdir(parents=True)  # what a kill mid-write leaves
    (run_dir / "checkpoints" / "step_00000010").mkdir()
    (run_dir / "checkpoints" / "step_00000010" / "trainer_state.pt").write_bytes(b"state")
    parallel.write_manifest(str(run_dir / "checkpoints" / "step_00000010"))
    assert parallel.find_checkpoint(str(run_dir)) == str(run_dir / "checkpoints" / "step_00000010")


def test_resume_after_kill_is_bitwise_exact_and_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    """A run killed after its checkpoints at steps 3 and 6 resumes from step 6 and ends bitwise
    where the uninterrupted run does; 9 steps an epoch, so the kill lands mid-epoch and the
    epoch's shuffle must be replayed. With one file of step 6 changed, --resume names it and
    resumes from step 3, still bitwise; one cut short or deleted is named and skipped the same way.
    With no intact checkpoint left it stops with one line. The model is a tiny one with dropout."""
    flags = [
        "--model",
        save_tiny_walk_model(tmp_path / "model"),
        "--num-epochs",
        "2",
        "--batch-size",
        "96",
        "--micro-batch-size",
        "48",
        "--save-every",
        "3",
        "--eval-every",
        "7",
        "--eval-samples-per-start",
        "2",
    ]
    reference, killed = run_and_kill("sft.py", flags, tmp_path, "step_00000006")
    # Two resumes run to the end (intact, and one damaged file); the other damages are checked where
    # the resume picks its checkpoint (sft.py calls parallel.find_checkpoint), since from there the
    # run is the same resume from step 3.
    for how, victim in (
        ("intact", None),
        ("corrupt", "rank_0.pt"),
        ("truncate", "model.safetensors"),
        ("delete", "trainer_state.pt"),
    ):
        run_dir = tmp_path / how
        shutil.copytree(killed, run_dir)
        newest = run_dir / "checkpoints" / "step_00000006"
        if victim:
            damage(newest / victim, how)
        if how in ("truncate", "delete"):
            assert parallel.find_checkpoint(str(run_dir)) == str(run_dir / "checkpoints" / "step_00000003")
            assert f"warning: checkpoint {newest} is damaged ({victim} is " in capsys.readouterr().out
            continue
        resumed = run_script("sft.py", *flags, "--resume", str(run_dir), cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        if victim:
            assert f"warning: checkpoint {newest} is damaged ({victim} is " in resumed.stdout
        assert f"resuming {run_dir} from step {6 if how == 'intact' else 3}" in resumed.stdout
        assert_same_weights(reference, run_dir)
        assert len(os.listdir(run_dir / "checkpoints")) <= 2  # --keep-checkpoints
    damage(killed / "checkpoints" / "step_00000003" / "config.json", "delete")
    damage(killed / "checkpoints" / "step_00000006" / "tokenizer.json", "corrupt")
    with pytest.raises(SystemExit, match="every checkpoint in .* is damaged"):
        parallel.find_checkpoint(str(killed))
    with pytest.raises(SystemExit, match=r"the checkpoint is damaged \(tokenizer.json is not the file that was saved"):
        parallel.find_checkpoint(str(killed / "checkpoints" / "step_00000006"))


# --- bad input ----------------------------------------------------------------------------------
def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as error:
        sft.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(args.output_dir), "a failed run must not leave a half-written run directory"


def write(path, text):
    path.write_text(text)
    return str(path)


def text_args(tmp_path, data, **overrides):
    return sft.Args(
        **{"task": "jsonl", "data": data, "model": str(tmp_path), "output_dir": str(tmp_path / "run"), **overrides}
    )


def test_bad_data_files(tmp_path, tiny_gpt2):
    expect_error(text_args(tmp_path, str(tmp_path / "missing.jsonl")), "missing.jsonl", "does not exist")
    expect_error(sft.Args(task="jsonl", model=tiny_gpt2, output_dir=str(tmp_path / "run")), "--data")
    bad_bytes = tmp_path / "latin1.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "caf\xe9"}\n')
    expect_error(text_args(tmp_path, str(bad_bytes)), "cannot read")
    malformed = write(
        tmp_path / "malformed.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n'
    )
    expect_error(text_args(tmp_path, malformed), "line 2", "not valid JSON")
    missing = write(tmp_path / "missing_field.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    expect_error(
        text_args(tmp_path, missing), "record 2: expected 'text' (a string), 'messages'", "found fields prompt"
    )
    expect_error(text_args(tmp_path, write(tmp_path / "empty.jsonl", "\n")), "no examples")


def test_overlong_examples_all_skipped(tmp_path, tiny_gpt2):
    data = os.path.join(FIXTURES, "demos.jsonl")
    expect_error(text_args(tmp_path, data, model=tiny_gpt2, max_length=3, overlong="skip"), "exceed --max-length 3")


def test_bad_model_batch_and_resume(tmp_path, tiny_gpt2):
    data = os.path.join(FIXTURES, "demos.jsonl")
    expect_error(text_args(tmp_path, data, model=str(tmp_path / "no-such-model")), "no-such-model", "no such directory")
    expect_error(quick_args(tmp_path, batch_size=100, micro_batch_size=30), "--batch-size 100", "--micro-batch-size 30")
    expect_error(quick_args(tmp_path, resume=str(tmp_path)), "not a checkpoint")
    expect_error(sft.Args(task="hh", output_dir=str(tmp_path / "run")), "--model")


def test_bad_conversational_records(tmp_path, tiny_gpt2, monkeypatch):
    """Each kind of bad record, and conversations for a tokenizer without a chat template, stop with one line."""
    chat = [turn("user", "hi"), turn("assistant", "hello")]
    for record, fragments in (
        ({"text": 3}, ["record 2: expected 'text' (a string)", "found fields text"]),
        ({"messages": [{"role": "user"}]}, ["record 2: expected", "found fields messages"]),
        ({"prompt": chat[:1], "completion": "hello"}, ["record 2: expected", "found fields prompt, completion"]),
        ({"prompt": "hi"}, ["record 2: expected", "found fields prompt"]),
        ({"messages": chat[:1]}, ["record 2: the conversation has no assistant message to learn from"]),
        ({"prompt": "hi", "completion": "hello"}, ["record 2: a prompt-completion record after messages ones"]),
    ):
        data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": chat}, record])
        expect_error(text_args(tmp_path, data), data, *fragments)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 4)
    expect_error(text_args(tmp_path, data, model=tiny_gpt2), "has no chat template; pass --chat-template PATH")
    expect_error(text_args(tmp_path, data, chat_template="missing.jinja"), "--chat-template missing.jinja does not")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    expect_error(
        text_args(tmp_path, str(tmp_path / "data.parquet")), "needs the datasets package: pip install datasets"
    )


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path):
    malformed = write(tmp_path / "bad.jsonl", "{not json}\n")
    result = run_script(
        "sft.py",
        "--task",
        "jsonl",
        "--data",
        malformed,
        "--model",
        str(tmp_path),
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {malformed}, line 1: not valid JSON (Expecting property name enclosed in double quotes); each line "
        "must be one JSON object"
    ]
    # Splitting the model needs the processes torchrun starts.
    result = run_script("sft.py", "--tp", "2", "--output-dir", str(tmp_path / "split"), cwd=tmp_path)
    assert result.returncode == 1 and not (tmp_path / "split").exists()
    assert result.stderr.strip().splitlines() == [
        "error: --tp 2 --pp 1 splits the model over 2 processes; launch with torchrun --nproc_per_node 2 (or a "
        "multiple)"
    ]


def test_an_output_dir_holding_a_run_is_refused(tmp_path):
    args = quick_args(tmp_path)
    sft.main(args)
    with pytest.raises(SystemExit) as error:
        sft.main(args)
    assert "already holds a run" in str(error.value) and "--resume" in str(error.value)


# --- data parallel under torchrun -----------------------------------------------------------------
DATA_PARALLEL_FLAGS = [
    "--task",
    "jsonl",
    "--dtype",
    "fp64",
    "--batch-size",
    "8",
    "--micro-batch-size",
    "2",
    "--num-epochs",
    "2",
    "--eval-every",
    "5",
    "--warmup-steps",
    "2",
    "--learning-rate",
    "3e-3",
    "--eval-fraction",
    "0.25",
    "--max-new-tokens",
    "8",
]


@pytest.fixture(scope="module")
def text_run_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    return ["--data", write_text_examples(folder / "data.jsonl"), "--model", save_tiny_model(folder / "tiny", "gpt2")]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, text_run_inputs):
    """The single-process run every multi-process layout must reproduce."""
    folder = tmp_path_factory.mktemp("one-process")
    single = run_script(
        "sft.py", *DATA_PARALLEL_FLAGS, *text_run_inputs, "--output-dir", str(folder / "run"), cwd=folder
    )
    assert single.returncode == 0, single.stderr[-2000:]
    return folder / "run", json.loads((folder / "run" / "metrics.json").read_text())["eval/loss"]


@pytest.fixture(scope="module")
def zero_stage_runs(tmp_path_factory, text_run_inputs):
    """{stage: (run dir, torchrun's result)} of the 2-rank runs at ZeRO stages 0 to 2, with a checkpoint at step 4
    (ZeRO-3 is the cp2xdp2-zero3 layout of test_tensor_and_pipeline_parallel_match_one_process)."""
    folder = tmp_path_factory.mktemp("zero")
    flags = DATA_PARALLEL_FLAGS + text_run_inputs + ["--save-every", "4"]
    return {
        stage: (
            folder / f"zero{stage}",
            run_ranks(
                "sft.py", *flags, "--zero-stage", str(stage), "--output-dir", str(folder / f"zero{stage}"), cwd=folder
            ),
        )
        for stage in (0, 1, 2)
    }


def test_data_parallel_every_zero_stage_matches_one_process(one_process_run, zero_stage_runs):
    """2 ranks x micro-batches of 2 = a global batch of 8: every ZeRO stage ends with the eval loss
    and weights of one process on the same batches (in fp64, up to summation order: see SAME_MATH).
    ZeRO-3, whose gathers are the only stage-specific code in sft.py, is the cp2xdp2-zero3 layout: a
    2-rank run of it here would check parallel.py's sharding again, which test_parallel does."""
    single, expected = one_process_run
    for stage, (run_dir, run) in zero_stage_runs.items():
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("saved ") == 1, "only rank 0 reports"
        actual = json.loads((run_dir / "metrics.json").read_text())["eval/loss"]
        assert actual == pytest.approx(expected, rel=SAME_MATH), f"ZeRO-{stage}"
        assert max_weight_difference(single, run_dir) < SAME_MATH, f"ZeRO-{stage}"
    with pytest.raises(
        SystemExit,
        match=r"--micro-batch-size 2 does not divide a rank's share of the batch \(--batch-size 6 / 2 rank\(s\) = 3\)",
    ):
        sft.check_args(sft.Args(batch_size=6, micro_batch_size=2), world_size=2)


# No layout of one split alone (--tp 2, --pp 2, --cp 2, nor --sequence-parallel on --tp 2 alone): sft.py has
# no code for any of them alone (its branches test --pp > 1; --tp, --cp and --sequence-parallel reach it only
# through parallel.py's wrappers), and each is compared below within a combined layout (--tp 2 alone also
# resumes in test_a_checkpoint_resumes_on_another_layout).
LAYOUTS = [
    (["--tp", "2", "--pp", "2"], 4),
    (["--pp", "2"], 4),
    (["--tp", "2", "--zero-stage", "1"], 4),
    (["--cp", "2", "--zero-stage", "3"], 4),
    (["--cp", "2", "--tp", "2", "--sequence-parallel"], 4),
    (["--pp", "2", "--packing", "--micro-batch-size", "4"], 2),  # each stage masks packed rows by their positions
]
LAYOUT_IDS = [
    "tp2xpp2",
    "pp2xdp2",
    "tp2xdp2-zero1",
    "cp2xdp2-zero3",
    "cp2xsp-tp2",
    "pp2-packing",
]


@pytest.mark.parametrize("flags, nproc", LAYOUTS, ids=LAYOUT_IDS)
def test_tensor_and_pipeline_parallel_match_one_process(tmp_path, text_run_inputs, one_process_run, flags, nproc):
    """Heads, MLP and vocabulary split over tensor-parallel ranks, layers over pipeline stages
    (1F1B), sequences over context-parallel ranks (and over the tensor-parallel ones between their
    matmuls under --sequence-parallel), and data parallel over what remains, on 2 and 4 processes:
    the same eval loss and the same saved dense weights as one process (the tiny GPT-2 ties its
    embeddings, so the pipelined runs also exercise the tied copy on the first and last stage)."""
    single, expected = one_process_run
    run = run_ranks(
        "sft.py",
        *DATA_PARALLEL_FLAGS,
        *text_run_inputs,
        *flags,
        "--output-dir",
        str(tmp_path / "run"),
        nproc=nproc,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval/loss"] == pytest.approx(
        expected, rel=SAME_MATH
    )
    assert max_weight_difference(single, tmp_path / "run") < SAME_MATH


def test_data_parallel_resume_after_kill_is_bitwise_exact(tmp_path, text_run_inputs):
    """ZeRO-2 on 2 ranks, which split each sequence (--cp 2) and so shard the optimizer over dp x cp,
    the whole launcher killed after a checkpoint: the resumed run (each rank reloading its own
    optimizer slice and RNG) ends bitwise where an uninterrupted one does."""
    flags = DATA_PARALLEL_FLAGS + text_run_inputs + ["--zero-stage", "2", "--cp", "2", "--save-every", "2"]
    flags += ["--num-epochs", "3"]  # 4 steps an epoch: the kill at the end of the first leaves 8 to resume
    reference, killed = torchrun_kill_and_resume("sft.py", flags, tmp_path, "step_00000004")
    assert_same_weights(tmp_path / "reference", killed)


def test_a_checkpoint_resumes_on_another_layout(tmp_path, text_run_inputs, zero_stage_runs):
    """Saved by 2 ranks under ZeRO-2 (the optimizer's moments streamed dense, keyed as the weights), the
    checkpoint of step 4 of 8 resumes on 4 ranks under ZeRO-3, on one process and at --tp 2, each rank
    reading its own part of the moments, and each ends where the uninterrupted run does to SAME_MATH:
    in fp64 the layouts differ only in the order of their sums, the moments and step count carry over
    exactly, and the tiny model has no dropout for the new random streams to change (restarting
    Adam's moments instead moves the weights by the learning rate's order). Another global batch
    stops with one line."""
    flags = DATA_PARALLEL_FLAGS + text_run_inputs
    reference, run = zero_stage_runs[2]
    assert run.returncode == 0, run.stderr[-3000:]
    refused = run_script("sft.py", *flags, "--batch-size", "4", "--resume", str(reference), cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {reference / 'checkpoints' / 'step_00000004'} was written with --batch-size 8, which a resumed run "
        "cannot change; resume it with the same"
    )
    # One after another: side by side, on two cores, the seven processes take longer than in turn.
    for name, layout, nproc in (("zero3", ["--zero-stage", "3"], 4), ("one", [], 1), ("tp2", ["--tp", "2"], 2)):
        shutil.copytree(reference / "checkpoints", tmp_path / name / "checkpoints")
        resume = ["--resume", str(tmp_path / name / "checkpoints" / "step_00000004")]
        resumed = run_ranks("sft.py", *flags, *layout, *resume, nproc=nproc, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "with --zero-stage 2 --tp 1 --pp 1 --cp 1: its optimizer state is resharded" in resumed.stdout
        assert max_weight_difference(reference, tmp_path / name) < SAME_MATH, name


def test_two_nodes_equal_one_node(tmp_path, text_run_inputs, zero_stage_runs):
    """Multi-node launch as on a cluster, here two 'nodes' of one process each on loopback with
    c10d rendezvous: the same run as one launcher with two processes (the ZeRO-1 run above)."""
    flags = DATA_PARALLEL_FLAGS + text_run_inputs + ["--zero-stage", "1"]
    one_node, result = zero_stage_runs[1]
    assert result.returncode == 0, result.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                os.path.join(ROOT, "sft.py"),
                *flags,
                "--output-dir",
                str(tmp_path / "two"),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for node in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert_same_weights(one_node, tmp_path / "two")
