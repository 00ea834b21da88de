"""reward_model.py: the loss, last-token pooling, data parsers, saving and reloading, resume, bad input."""

import json
import math
import os
import random
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import tyro
from dataclasses import replace as replace_args
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import parallel
import reward_model as rm
from conftest import (
    CHAT_TEMPLATES,
    END_OF_TURN,
    chat_tokenizer,
    save_tiny_chat_model,
    write_jsonl,
    read_metrics,
    FIXTURES,
    SAME_MATH,
    assert_same_weights,
    damage,
    max_weight_difference,
    run_and_kill,
    run_script,
    save_tiny_model,
    save_tiny_walk_model,
    run_ranks,
    torchrun_kill_and_resume,
)


def quick_args(tmp_path, **overrides):
    """A few-second randomwalks run."""
    settings = dict(
        output_dir=str(tmp_path / "run"),
        randomwalks_pairs=256,
        num_epochs=1,
        batch_size=32,
        micro_batch_size=32,
        eval_every=1000,
        warmup_steps=2,
    )
    return rm.Args(**{**settings, **overrides})


def test_pairwise_loss_and_accuracy_on_a_hand_made_batch():
    chosen = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    margins = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    loss = rm.pairwise_loss(chosen, rejected, margins)
    expected = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.5)), math.log(2.0)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    loss.sum().backward()
    # d/dr_chosen of -log sigmoid(d) is -(1 - sigmoid(d)): always pushes the chosen score up.
    assert chosen.grad.tolist() == pytest.approx([-(1 - 1 / (1 + math.exp(-d))) for d in (2.0, -1.5, 0.0)], rel=1e-12)
    assert (chosen > rejected).float().mean().item() == pytest.approx(1 / 3)  # a tie is not a win


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_last_token_pooling_is_the_same_with_left_and_right_padding(tmp_path, family):
    model_dir = save_tiny_model(tmp_path / "lm", family)
    model, tokenizer = rm.load_model(model_dir, "cpu", seed=0)
    model = model.double().eval()
    sequences = [
        tokenizer("a short one")["input_ids"],
        tokenizer("a somewhat longer sequence of words here")["input_ids"],
        [5],
    ]
    scores = {}
    for side in ("left", "right"):
        input_ids, attention_mask, position_ids = rm.pad_batch(sequences, tokenizer.pad_token_id, "cpu", side)
        scores[side] = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 0]
    alone = torch.stack([model(input_ids=torch.tensor([ids])).logits[0, 0] for ids in sequences])
    # fp64: padding changes only which masked (exactly zero) terms join the sums, and their order: ~1e-15.
    assert torch.allclose(scores["left"], scores["right"], rtol=0, atol=1e-10)
    assert torch.allclose(scores["right"], alone, rtol=0, atol=1e-10)
    assert alone.std() > 1e-3  # the sequences really score differently


def test_head_init_and_dropout_off(tmp_path):
    model_dir = save_tiny_model(tmp_path / "lm", "gpt2")
    model, _ = rm.load_model(model_dir, "cpu", seed=0)
    assert model.score.weight.std().item() == pytest.approx(1 / math.sqrt(32 + 1), rel=0.3)  # 32 weights: a loose check
    assert all(module.p == 0 for module in model.modules() if isinstance(module, torch.nn.Dropout))
    assert model.config.resid_pdrop == 0 and model.config.pad_token_id is not None
    tokenizer = rm.randomwalks_tokenizer()
    fresh = rm.randomwalks_model(tokenizer)
    rm.init_head(fresh, seed=0)
    assert fresh.score.weight.std().item() == pytest.approx(1 / math.sqrt(145), rel=0.15)


def test_prompt_is_truncated_on_the_left_never_the_response(capsys):
    tokenizer = rm.randomwalks_tokenizer()
    pairs = [
        {"prompt": "bcdef", "chosen": "ghi", "rejected": "jk", "margin": 0.0},
        {"prompt": "b", "chosen": "cdefghij", "rejected": "k", "margin": 0.0},
    ]
    tokenized = rm.tokenize_pairs(tokenizer, pairs, max_length=6)
    assert tokenized == [
        ([3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 9, 10], 0.0)
    ]  # "def"+"ghi" and "cdef"+"jk"; the second pair's response is too long
    out = capsys.readouterr().out
    assert "1 of 2 pairs are longer than --max-length 6" in out and "skipped 1 pairs" in out


def test_spearman_against_a_reference_with_ties():
    rng = np.random.RandomState(0)
    x = rng.randint(0, 4, size=50).astype(float)  # heavy ties
    y = x + rng.randn(50)

    def average_ranks(values):  # rank = number below + half the ties, plus one
        return np.array([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values])

    rx, ry = average_ranks(x), average_ranks(y)
    reference = ((rx - rx.mean()) * (ry - ry.mean())).sum() / math.sqrt(
        ((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum()
    )
    assert rm.spearman(x, y) == pytest.approx(reference, rel=1e-12)
    assert rm.spearman(x, -y) == pytest.approx(-reference, rel=1e-12)


def test_randomwalks_pairs_prefer_the_more_optimal_walk():
    adjacency, walks = rm.generate_random_walks()
    shortest = rm.shortest_path_nodes(adjacency)
    pairs = rm.randomwalks_pairs(walks, 500, adjacency, shortest, np.random.RandomState(0))
    assert len(pairs) == 500
    for pair in pairs:
        chosen, rejected = (
            rm.walk_optimality(pair["prompt"] + pair[k], adjacency, shortest) for k in ("chosen", "rejected")
        )
        assert chosen > rejected
    rejected_scores = [rm.walk_optimality(p["prompt"] + p["rejected"], adjacency, shortest) for p in pairs]
    chosen_scores = [rm.walk_optimality(p["prompt"] + p["chosen"], adjacency, shortest) for p in pairs]
    assert (
        0 in rejected_scores and 1.0 in chosen_scores and any(0 < s < 1 for s in chosen_scores)
    )  # valid and invalid walks both appear


def test_gradient_accumulation_equals_one_big_batch(tiny_gpt2):
    model, tokenizer = rm.load_model(tiny_gpt2, "cpu", seed=0)
    model = parallel.DataParallel(model.double())  # one process: the pass-through wrapper the script uses
    batch = rm.tokenize_pairs(tokenizer, rm.load_pairs("jsonl", os.path.join(FIXTURES, "preference-pairs.jsonl")), 64)
    assert len(batch) >= 4 and any(margin for _, _, margin in batch)
    gradients, results = [], []
    for micro_batch_size in (len(batch), 3, 1):
        model.zero_grad()
        results.append(
            rm.accumulate_gradients(
                model,
                batch,
                len(batch),
                1,
                rm.Args(micro_batch_size=micro_batch_size),
                tokenizer.pad_token_id,
                "cpu",
                torch.autocast("cpu", enabled=False),
            ).tolist()
        )
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert gradients[0].abs().max() > 1e-3
    for (loss, correct), gradient in zip(results[1:], gradients[1:]):
        assert loss == pytest.approx(results[0][0], rel=1e-12) and correct == results[0][1]
        assert torch.allclose(gradient, gradients[0], rtol=1e-10, atol=1e-13)


def test_sentiment_sampling_is_the_models_own_whatever_its_generation_config_asks():
    """The sentiment task's continuations come from the LM's own softmax, seed for seed the tokens
    of a loop that re-runs the whole left-padded prefix each step, even when the checkpoint's
    generation_config asks for a huge repetition penalty and no repeated token (which
    model.generate() obeyed)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    tokenizer = rm.randomwalks_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), tokenizer.eos_token_id)).double().eval()
    lm.generation_config.repetition_penalty, lm.generation_config.no_repeat_ngram_size = 100.0, 1
    batch = tokenizer(["b", "cde", "fg", "h"] * 2, return_tensors="pt", padding=True)
    torch.manual_seed(1)
    responses = rm.sample(lm, batch, 12, {tokenizer.eos_token_id})
    torch.manual_seed(1)
    ids, mask, finished = batch["input_ids"], batch["attention_mask"], torch.zeros(len(responses), dtype=torch.bool)
    reference = [[] for _ in responses]
    for _ in range(12):
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[
                :, -1
            ]
        step = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
        for row in (~finished).nonzero()[:, 0].tolist():
            reference[row].append(int(step[row]))
        finished |= step == tokenizer.eos_token_id
        if finished.all():
            break
        ids, mask = torch.cat([ids, step[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    # Each row up to and including the EOS it drew; a row that drew none has all 12 tokens and no EOS.
    assert responses == reference
    ended = [response[-1] == tokenizer.eos_token_id for response in responses]
    assert all(len(response) == 12 for response, end in zip(responses, ended) if not end)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    assert any(len(set(text)) < len(text) for text in texts), (
        "no continuation repeats a letter: the test would not see a penalty"
    )


def eos_prone_gpt2(path) -> str:
    """The tiny GPT-2 with EOS made likely (a logit of about 4.5 where the others lie within about 0.3
    of 0), so that a few sampled tokens end with EOS about half the time."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(path, "gpt2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 3.0
        model.lm_head.weight[model.config.eos_token_id] = 0.0  # tied to the input embedding: EOS is no prompt token
        model.lm_head.weight[model.config.eos_token_id, 0] = 1.5
    model.save_pretrained(model_dir)
    return model_dir


def test_sentiment_pairs_reach_the_loss_as_the_sampled_token_ids(tmp_path, fake_vader, monkeypatch):
    """Token in, token out: every sequence the loss scores is a prompt's ids and a response's ids as
    the sampler drew them, not the decoded text tokenized again; an EOS only where the sampler drew
    one, so a response cut at --max-new-tokens has none."""
    model_dir = eos_prone_gpt2(tmp_path / "lm")
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    sampled, scored = {}, []  # sampled: prompt + response ids -> response ids

    def sample(lm, batch, *rest):
        responses = real_sample(lm, batch, *rest)
        for ids, mask, response in zip(batch["input_ids"], batch["attention_mask"], responses):
            sampled[tuple(ids[mask.bool()].tolist() + response)] = response
        return responses

    def collate(sequences, *rest):
        scored.extend(tuple(ids) for ids in sequences)
        return real_collate(sequences, *rest)

    real_sample, real_collate = rm.sample, rm.collate
    monkeypatch.setattr(rm, "sample", sample)
    monkeypatch.setattr(rm, "collate", collate)
    words = "cat dog mat park friend hello world post title summary sat ran said my the a on to".split()
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {a} {b}"}) + "\n" for a, b in zip(words, reversed(words))))
    settings = dict(task="sentiment", data=str(data), model=model_dir, output_dir=str(tmp_path / "run"))
    settings.update(samples_per_prompt=4, max_new_tokens=4, num_epochs=1, batch_size=4, eval_fraction=0.2)
    rm.main(rm.Args(**settings, warmup_steps=0))
    assert len(scored) >= 16 and set(scored) <= set(sampled)
    responses = [sampled[ids] for ids in scored]
    cut = [response for response in responses if response[-1] != eos]
    assert cut and all(len(response) == 4 and eos not in response for response in cut)
    assert len(cut) < len(responses), "no response drew an EOS: the test would not see one kept"


def test_sentiment_pairs_sample_from_a_model_whose_tokenizer_has_no_pad_token(tmp_path, fake_vader):
    """GPT-2's tokenizer has no pad token: the left-padded prompts take EOS as pad (masked out)."""
    from types import SimpleNamespace

    from conftest import text_tokenizer

    model_dir = save_tiny_model(tmp_path / "lm", "gpt2", tokenizer=text_tokenizer(pad_token=False))
    args = rm.Args(task="sentiment", model=model_dir, samples_per_prompt=4, max_new_tokens=4)
    grid = SimpleNamespace(dp_rank=0, dp_size=1, dp_group=None, is_main=True)
    pairs = rm.sample_sentiment_pairs(["the cat sat", "a dog ran to", "hello"], args, grid, torch.device("cpu"))
    assert pairs and all(len(p["chosen_ids"]) <= 4 and len(p["rejected_ids"]) <= 4 for p in pairs)


def test_pad_as_eos_reads_a_sampled_responses_score_at_its_last_token_before_eos(tmp_path):
    """Where EOS is also the pad token (GPT-2's tokenizer has no other), a sampled EOS at the end of a
    response reads as padding in a right-padded batch: the transformers pooling reads the score at the
    token before it, where a response cut at --max-new-tokens is read too (the EOS comes after, and a
    causal model's earlier outputs do not see it); training reads it there too, padded and packed."""
    from conftest import text_tokenizer

    model_dir = save_tiny_model(tmp_path / "lm", "gpt2", tokenizer=text_tokenizer(pad_token=False))
    model, tokenizer = rm.load_model(model_dir, "cpu", seed=0, dtype=torch.float64)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    prompt, long, short = tokenizer("the cat")["input_ids"], [17, 42, 99, 7], [5, 6]
    pairs = [(prompt + long + [eos], prompt + short, 0.0), (prompt + short + [eos], prompt + long, 0.0)]
    with torch.no_grad():
        alone = [
            model.eval()(torch.tensor([prompt + response])).logits[0, 0] for response in (long, short, short, long)
        ]
        for packing in (True, False):
            [micro_batch] = rm.pair_micro_batches(pairs, rm.Args(micro_batch_size=2, packing=packing), eos, "cpu")
            scores = rm.sequence_scores(rm.token_scores(model, micro_batch), micro_batch)
            assert torch.allclose(scores, torch.stack(alone), rtol=0, atol=1e-12), packing
        # the transformers class's own pooling of the padded micro-batch, as a consumer of the saved model scores
        padded = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(padded, torch.stack(alone), rtol=0, atol=1e-12)


# --- data parsers on upstream formats -----------------------------------------------------------
def test_jsonl_pairs_with_margin():
    pairs = rm.load_pairs("jsonl", os.path.join(FIXTURES, "preference-pairs.jsonl"))
    assert pairs[1] == {
        "prompt": "Q: Capital of France?\nA:",
        "chosen": " Paris",
        "rejected": " Rome",
        "margin": 1.5,
        "tools": None,
    }
    assert pairs[0]["margin"] == 0.0


def test_hh_pairs():
    pairs = rm.load_pairs("hh", os.path.join(FIXTURES, "hh-rlhf-train.jsonl"))
    assert len(pairs) == 4
    assert pairs[1]["prompt"].endswith("\n\nHuman: Science fiction.\n\nAssistant:")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (
        " Try The Left Hand of Darkness by Ursula K. Le Guin.",
        " I don't read.",
    )


def test_tldr_comparisons(capsys):
    pairs = rm.load_pairs("tldr", os.path.join(FIXTURES, "tldr-comparisons.jsonl"))
    assert len(pairs) == 3  # the CNN/DM article has no post and is skipped
    assert pairs[0]["prompt"].startswith(
        "SUBREDDIT: r/relationships\n\nTITLE: My roommate keeps eating my food\n\nPOST: "
    )
    assert pairs[0]["prompt"].endswith("\n\nTL;DR:")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (
        " small cheap loan and good savings: pay early or invest?",
        " loan",
    )  # choice 1
    assert "skipped 1 records" in capsys.readouterr().out


# --- conversational data: TRL's preference kinds, rendered by the chat template ------------------
USER, ASSISTANT = "user", "assistant"
PROMPT = [
    {"role": USER, "content": "hi there"},
    {"role": ASSISTANT, "content": "hello"},
    {"role": USER, "content": "name a pet"},
]
CHOSEN, REJECTED = [{"role": ASSISTANT, "content": "the cat sat"}], [{"role": ASSISTANT, "content": "a dog"}]
# The chat templates' renderings written out by hand: special tokens by name, the text between them.
RENDERED_PROMPT = {
    "chatml": ["<|im_start|>", "user\nhi there", "<|im_end|>", "\n", "<|im_start|>", "assistant\nhello", "<|im_end|>"]
    + ["\n", "<|im_start|>", "user\nname a pet", "<|im_end|>", "\n", "<|im_start|>", "assistant\n"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\nhi there", "<|eot_id|>"]
    + ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\nhello", "<|eot_id|>", "<|start_header_id|>"]
    + ["user", "<|end_header_id|>", "\n\nname a pet", "<|eot_id|>", "<|start_header_id|>", "assistant"]
    + ["<|end_header_id|>", "\n\n"],
}


def written_out(tokenizer, pieces: list) -> list:
    """Token ids of a rendering written out by hand: a special token by its name, text tokenized alone."""
    special = set(tokenizer.all_special_tokens)
    return [
        i
        for piece in pieces
        for i in (
            [tokenizer.convert_tokens_to_ids(piece)]
            if piece in special
            else tokenizer(piece, add_special_tokens=False)["input_ids"]
        )
    ]


def preference_records(kind: str, n: int = 1) -> list:
    """n preference records of one kind: standard, conversational, or conversational with an implicit prompt."""
    words = "the cat sat on mat a dog ran to park my friend said hello world post title summary".split()
    rng = random.Random(0)
    records = []
    for i in range(n):
        prompt, chosen, rejected = (" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(3))
        if kind == "standard":
            records.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
            continue
        messages = [{"role": USER, "content": prompt}]
        chosen, rejected = ([{"role": ASSISTANT, "content": text}] for text in (chosen, rejected + " " + str(i)))
        records.append(
            {"chosen": messages + chosen, "rejected": messages + rejected}
            if kind == "implicit"
            else {"prompt": messages, "chosen": chosen, "rejected": rejected}
        )
    return records


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_conversational_pairs_are_the_chat_templates_rendering_token_by_token(tmp_path, style):
    """Both conversational kinds, the implicit prompt taken as the conversations' longest common prefix
    (three messages, an assistant turn among them): the prompt is rendered with the generation prompt,
    each response is what the template writes after it through the end-of-turn token (ChatML's newline
    after <|im_end|> is no part of it), checked against the rendering written out by hand and against
    tokenizer.apply_chat_template; a `tools` column reaches the template."""
    tokenizer = chat_tokenizer(style)
    end = END_OF_TURN[style]
    tools = [{"type": "function", "function": {"name": "pet_names", "parameters": {}}}]
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED, "margin": 0.5}],
    )
    pairs = rm.load_pairs("jsonl", data)
    assert pairs == [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "margin": 0.5, "tools": None}]
    explicit = rm.load_pairs(
        "jsonl",
        write_jsonl(
            tmp_path / "tools.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": tools}]
        ),
    )
    [(chosen, rejected, margin)] = rm.tokenize_pairs(tokenizer, pairs, max_length=512)
    prompt = written_out(tokenizer, RENDERED_PROMPT[style])
    assert chosen == prompt + written_out(tokenizer, ["the cat sat", end])
    assert rejected == prompt + written_out(tokenizer, ["a dog", end]) and margin == 0.5
    [(chosen_with_tools, _, _)] = rm.tokenize_pairs(tokenizer, explicit, max_length=512)
    rendered_prompt = tokenizer.apply_chat_template(PROMPT, tools=tools, add_generation_prompt=True)["input_ids"]
    rendered = tokenizer.apply_chat_template(PROMPT + CHOSEN, tools=tools)["input_ids"]
    assert chosen_with_tools[: len(rendered_prompt)] == rendered_prompt != prompt
    assert chosen_with_tools == rendered[: len(chosen_with_tools)] and chosen_with_tools[
        -1
    ] == tokenizer.convert_tokens_to_ids(end)
    assert tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)["input_ids"] == prompt


def test_end_of_turn_ids_are_the_eos_the_generation_configs_and_the_templates():
    from transformers import GenerationConfig

    from conftest import text_tokenizer

    chatml, llama3 = chat_tokenizer("chatml"), chat_tokenizer("llama3")
    ids = chatml.convert_tokens_to_ids
    assert rm.end_of_turn_ids(chatml) == {chatml.eos_token_id, ids("<|im_end|>")}
    assert rm.end_of_turn_ids(llama3) == {llama3.eos_token_id, llama3.convert_tokens_to_ids("<|eot_id|>")}
    assert rm.end_of_turn_ids(chatml, GenerationConfig(eos_token_id=[7, ids("<|im_end|>")])) == {
        0,
        7,
        ids("<|im_end|>"),
    }
    assert rm.end_of_turn_ids(text_tokenizer(), GenerationConfig(eos_token_id=9)) == {text_tokenizer().eos_token_id, 9}


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM that emits, row by row, the tokens of a script (then token 5 forever), as the
    scripts' samplers call one: a step on the KV cache returns logits for the last position only."""

    def __init__(self, scripts: list, vocab: int):
        super().__init__()
        self.scripts, self.vocab = scripts, vocab
        self.generation_config = None

    def forward(self, input_ids, cache=None, **kwargs):
        from types import SimpleNamespace

        step = 0 if cache is None else cache + 1
        logits = torch.full((len(input_ids), 1, self.vocab), -1e9, dtype=torch.float64)
        for row, script in enumerate(self.scripts):
            logits[row, 0, script[step] if step < len(script) else 5] = 0.0
        return SimpleNamespace(logits=logits, cache=step)


def test_sampling_stops_on_every_end_of_turn_id_and_keeps_it():
    """A row ends at the first of the end-of-turn ids it draws (the EOS or the template's <|im_end|>),
    which it keeps; one that reaches --max-new-tokens first is truncated and has none."""
    tokenizer = chat_tokenizer("chatml")
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    lm = ScriptedLM([[7, im_end, 8, eos], [7, 8, eos, im_end], [7, 8, 9, 10, 11, 12]], len(tokenizer))
    batch = {"input_ids": torch.ones(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long)}
    assert rm.sample(lm, batch, 5, rm.end_of_turn_ids(tokenizer)) == [[7, im_end], [7, 8, eos], [7, 8, 9, 10, 11]]


def test_sentiment_prompts_as_conversations_are_rendered_with_the_generation_prompt(tmp_path, fake_vader, monkeypatch):
    """Message-list prompts are sampled from as the chat template renders them with the generation
    prompt, stopping on every end-of-turn id of the model (its generation config lists <|im_end|>);
    the pairs are conversational (one assistant message per side) and keep the sampled ids."""
    from types import SimpleNamespace

    model_dir = save_tiny_chat_model(tmp_path / "chat", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": USER, "content": f"Continue this review: the {word}"}] for word in ("cat", "dog", "park")]
    fed, real_sample = [], rm.sample

    def sample(lm, batch, max_new_tokens, stop_ids):
        fed.extend(ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"]))
        assert stop_ids == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return real_sample(lm, batch, max_new_tokens, stop_ids)

    monkeypatch.setattr(rm, "sample", sample)
    args = rm.Args(task="sentiment", model=model_dir, samples_per_prompt=4, max_new_tokens=4)
    grid = SimpleNamespace(dp_rank=0, dp_size=1, dp_group=None, is_main=True)
    pairs = rm.sample_sentiment_pairs(prompts, args, grid, torch.device("cpu"))
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in prompts]
    assert fed == [ids for ids in rendered for _ in range(4)]
    assert pairs and all(p["prompt"] in prompts and p["chosen"][0]["role"] == ASSISTANT for p in pairs)
    assert all(tokenizer.decode(p["chosen_ids"], skip_special_tokens=True) == p["chosen"][0]["content"] for p in pairs)


def test_conversational_runs_end_to_end_and_a_template_less_tokenizer_gives_one_line(tmp_path):
    """Conversational pairs (explicit prompts) and implicit-prompt ones train a tiny chat model. A
    tokenizer without a chat template stops the run with one line, before anything is written;
    --chat-template supplies one, which the saved tokenizer then keeps."""
    chat_model = save_tiny_chat_model(tmp_path / "chat", "chatml", "llama")
    bare = tmp_path / "bare"
    shutil.copytree(chat_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATES["chatml"])
    settings = dict(task="jsonl", batch_size=4, micro_batch_size=2, num_epochs=1, eval_fraction=0.25, warmup_steps=0)
    for kind, model, extra in (
        ("conversational", chat_model, {}),
        ("implicit", str(bare), {"chat_template": str(template)}),
    ):
        data = write_jsonl(tmp_path / f"{kind}.jsonl", preference_records(kind, n=10))
        args = rm.Args(data=data, model=model, output_dir=str(tmp_path / kind), **settings)
        if extra:
            expect_error(args, "has no chat template; pass --chat-template PATH")
        rm.main(replace_args(args, **extra))
        metrics = json.loads((tmp_path / kind / "metrics.json").read_text())
        assert 0 <= metrics["eval/accuracy"] <= 1
        assert AutoTokenizer.from_pretrained(tmp_path / kind).chat_template == CHAT_TEMPLATES["chatml"]


BAD_RECORDS = [  # (records, what the error line says), one bad record of each kind
    ([{"prompt": "p", "chosen": "a", "rejected": 3}], "record 1: expected 'prompt', 'chosen', 'rejected'"),
    (
        [{"prompt": PROMPT, "chosen": [{"role": ASSISTANT}], "rejected": REJECTED}],
        "found fields prompt, chosen, rejected",
    ),
    ([{"chosen": CHOSEN, "rejected": REJECTED}], "record 1: 'chosen' and 'rejected' must open with the same messages"),
    ([{"chosen": PROMPT + CHOSEN, "rejected": PROMPT}], "then each go on"),
    ([{"chosen": "a", "rejected": "b"}], "found fields chosen, rejected"),
    (
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}],
        "record 2 is a conversational preference record but",
    ),
]


@pytest.mark.parametrize("records, message", BAD_RECORDS)
def test_a_bad_record_of_each_kind_is_one_error_line(tmp_path, records, message):
    with pytest.raises(SystemExit) as error:
        rm.load_pairs("jsonl", write_jsonl(tmp_path / "pairs.jsonl", records))
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value) and message in str(error.value)


def test_bad_prompts_and_unreadable_formats_are_one_error_line(tmp_path, monkeypatch):
    for records, message in (
        ([{"prompt": 3}], "record 1: expected 'prompt' (a string or a message list), found fields prompt"),
        ([{"prompt": "p"}, {"prompt": PROMPT}], "record 2: the prompts must be all strings or all message lists"),
    ):
        with pytest.raises(SystemExit, match=re.escape(message)):
            rm.load_sentiment_prompts(write_jsonl(tmp_path / "prompts.jsonl", records))
    (tmp_path / "pairs.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the optional package were not installed
    with pytest.raises(SystemExit, match="needs the datasets package: pip install datasets"):
        rm.load_pairs("jsonl", str(tmp_path / "pairs.parquet"))
    # A stand-in datasets package: a directory saved by save_to_disk is read; a corrupt .parquet is one line.
    from types import ModuleType, SimpleNamespace

    def from_parquet(path):
        raise ValueError("Parquet magic bytes not found in footer.\nEither the file is corrupted or this is not...")

    datasets = ModuleType("datasets")
    datasets.Dataset = SimpleNamespace(from_parquet=from_parquet)
    datasets.load_from_disk = lambda path: SimpleNamespace(
        to_list=lambda: [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]
    )
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    (tmp_path / "saved").mkdir()
    assert rm.load_pairs("jsonl", str(tmp_path / "saved"))[0]["chosen"] == CHOSEN
    with pytest.raises(SystemExit) as error:
        rm.load_pairs("jsonl", str(tmp_path / "pairs.parquet"))
    assert str(error.value) == (
        f"error: cannot read {tmp_path / 'pairs.parquet'} as a dataset (ValueError: Parquet magic bytes not found in "
        "footer.); pass a .jsonl file, a .parquet file or the directory of one split"
    )


# --- training, saving, reloading ----------------------------------------------------------------
def test_training_saves_a_model_transformers_reloads_with_identical_scores(tmp_path):
    args = quick_args(tmp_path, num_epochs=2)
    rm.main(args)
    metrics = json.load(open(os.path.join(args.output_dir, "metrics.json")))
    assert metrics["eval/accuracy"] > 0.6  # 16 steps from scratch already beat chance
    model = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    assert model.config.num_labels == 1
    assert model.config.reward_mean == pytest.approx(
        metrics["eval/score_mean"]
    ) and model.config.reward_std == pytest.approx(metrics["eval/score_std"])
    walks = ["sda", "ebjnbdtkna", "bj", "fda"]
    # In fp64 (exactly the saved weights), where batched with padding and alone differ only in the order
    # of their sums: ~1e-15 of scores of order 1 (SAME_MATH's argument).
    model = model.double()
    ours = rm.score(model, tokenizer, [w[0] for w in walks], [w[1:] for w in walks], batch_size=3)
    plain = torch.stack([model(**tokenizer(w, return_tensors="pt")).logits[0, 0] for w in walks]).detach()
    assert torch.allclose(ours, plain, rtol=0, atol=1e-12)
    assert ours[0] > ours[2]  # a shortest path beats a walk that stops short


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_model_families_train_on_text_pairs(tmp_path, family):
    model_dir = save_tiny_model(tmp_path / "lm", family)
    args = rm.Args(
        task="jsonl",
        data=os.path.join(FIXTURES, "preference-pairs.jsonl"),
        model=model_dir,
        output_dir=str(tmp_path / "run"),
        num_epochs=2,
        batch_size=3,
        micro_batch_size=1,
        eval_fraction=0.25,
        warmup_steps=1,
    )
    rm.main(args)
    model = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    assert model.config.model_type == family.replace("-", "_") and model.config.num_labels == 1


def test_sentiment_task_ranks_the_models_own_samples_and_resumes_from_them(
    tmp_path, tiny_gpt2, fake_vader, monkeypatch
):
    words = "cat dog mat park friend hello world post title summary sat ran said my the a on to".split()
    prompts = [f"the {first} {second}" for first, second in zip(words, reversed(words))]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    run_dir = tmp_path / "run"
    args = rm.Args(
        task="sentiment",
        data=str(data),
        model=tiny_gpt2,
        output_dir=str(run_dir),
        samples_per_prompt=4,
        max_new_tokens=4,
        generation_batch_size=16,
        num_epochs=1,
        batch_size=4,
        micro_batch_size=2,
        eval_fraction=0.2,
        warmup_steps=0,
        save_every=2,
        keep_checkpoints=10,
    )
    rm.main(args)
    pairs = rm.read_records(str(run_dir / rm.SENTIMENT_PAIRS))
    # Two pairs at most per prompt, each of two different samples, the more positive chosen (ties dropped).
    assert 10 <= len(pairs) <= 2 * len(prompts) and all(
        sum(p["prompt"] == prompt for p in pairs) <= 2 for prompt in prompts
    )
    assert all(
        fake_vader(p["chosen"]) == p["chosen_score"] > p["rejected_score"] == fake_vader(p["rejected"]) for p in pairs
    )
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held_out = {prompts[i] for i in order[: int(len(prompts) * 0.2)]}
    n_train = sum(p["prompt"] not in held_out for p in pairs)
    with open(run_dir / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["step"] == n_train // 4 and 0 <= metrics["eval/accuracy"] <= 1

    # A resumed run reads the pairs its run sampled and ends where the run did.
    finished = (run_dir / "model.safetensors").read_bytes()
    monkeypatch.setattr(rm, "sample_sentiment_pairs", lambda *a: pytest.fail("a resumed run sampled new pairs"))
    rm.main(rm.Args(**{**args.__dict__, "resume": str(run_dir / "checkpoints" / "step_00000002")}))
    assert (run_dir / "model.safetensors").read_bytes() == finished


def test_smoke_run_with_wandb_offline(tmp_path):
    result = run_script(
        "reward_model.py",
        "--randomwalks-pairs",
        "128",
        "--num-epochs",
        "1",
        "--batch-size",
        "32",
        "--micro-batch-size",
        "16",
        "--eval-every",
        "2",
        "--track",
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2: loss" in result.stdout and "spearman_optimality" in result.stdout
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "run" / "wandb"))


def test_throughput_of_a_resumed_run_counts_only_its_own_steps(tmp_path, monkeypatch):
    """train/pairs_per_s and time/steps_per_s divide the work done since this process started by
    the time since then: a run resumed at step 4 of 8 did 4 steps, not 8. On a clock that ticks 1 s
    per reading, the resumed run's rate is about the fresh run's (each reads the clock about the
    same number of times per step); counting the steps before the resume doubled it."""
    ticks = iter(range(10**9))
    monkeypatch.setattr(rm.time, "time", lambda: float(next(ticks)))
    model = save_tiny_walk_model(tmp_path / "model")
    fresh = quick_args(tmp_path, model=model, save_every=4, keep_checkpoints=2)  # 256 pairs / 32: 8 steps
    rm.main(fresh)
    fresh_rates = json.load(open(os.path.join(fresh.output_dir, "metrics.json")))["last_step"]
    rm.main(replace_args(fresh, output_dir=None, resume=os.path.join(fresh.output_dir, "checkpoints", "step_00000004")))
    resumed_rates = json.load(open(os.path.join(fresh.output_dir, "metrics.json")))["last_step"]
    for key in ("train/pairs_per_s", "time/steps_per_s"):
        assert 0.7 < resumed_rates[key] / fresh_rates[key] < 1.4, (key, resumed_rates[key], fresh_rates[key])


def test_resume_after_kill_is_bitwise_exact_and_falls_back_from_a_damaged_checkpoint(tmp_path):
    """A run killed once it holds two checkpoints (6 steps an epoch, so both resumes cross into the
    second epoch): resumed as it is, it ends bitwise where the uninterrupted run does. With a file of
    its newest checkpoint changed, --resume names it, resumes from the one before and still ends
    bitwise there; a file cut short or deleted is caught the same way. With no intact checkpoint
    left it stops with one line. The model is a tiny one: the default's 6 layers took most of the time."""
    flags = [
        "--model",
        save_tiny_walk_model(tmp_path / "model"),
        "--randomwalks-pairs",
        "192",
        "--num-epochs",
        "2",
        "--batch-size",
        "32",
        "--micro-batch-size",
        "16",
        "--save-every",
        "2",
        "--eval-every",
        "5",
    ]
    reference, killed = run_and_kill("reward_model.py", flags, tmp_path, "step_00000004")
    older, newest = sorted((killed / "checkpoints").glob("step_????????"))[-2:]  # the kill may come a checkpoint late
    copies = {how: tmp_path / how for how in ("corrupt", "truncate", "delete")}
    for copy in copies.values():
        shutil.copytree(killed, copy)

    resumed = run_script("reward_model.py", *flags, "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"resuming {killed} from step {int(newest.name[5:])}" in resumed.stdout and "is damaged" not in resumed.stdout
    )
    assert_same_weights(reference, killed)

    damage(copies["corrupt"] / "checkpoints" / newest.name / "rank_0.pt", "corrupt")
    resumed = run_script("reward_model.py", *flags, "--resume", str(copies["corrupt"]), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    damaged = copies["corrupt"] / "checkpoints" / newest.name
    assert f"warning: checkpoint {damaged} is damaged (rank_0.pt is not the file that was saved" in resumed.stdout
    assert f"resuming {copies['corrupt']} from step {int(older.name[5:])}" in resumed.stdout
    assert_same_weights(reference, copies["corrupt"])
    for how, victim in (("truncate", "model.safetensors"), ("delete", "trainer_state.pt")):
        damage(copies[how] / "checkpoints" / newest.name / victim, how)
        assert parallel.find_checkpoint(str(copies[how]), verbose=False) == str(
            copies[how] / "checkpoints" / older.name
        ), how

    checkpoints = sorted((killed / "checkpoints").glob("step_????????"))  # the resumed run's last two
    damage(checkpoints[0] / "config.json", "delete")
    damage(checkpoints[1] / "tokenizer.json", "corrupt")
    with pytest.raises(SystemExit, match="every checkpoint in .* is damaged"):
        parallel.find_checkpoint(str(killed))
    with pytest.raises(SystemExit, match=r"the checkpoint is damaged \(tokenizer.json is not the file that was saved"):
        parallel.find_checkpoint(str(checkpoints[1]))


# --- bad input ----------------------------------------------------------------------------------
def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as error:
        rm.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(args.output_dir), "a failed run must not leave a half-written run directory"


def pairs_args(tmp_path, text, model):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    return rm.Args(
        task="jsonl", data=str(path), model=model, output_dir=str(tmp_path / "run"), batch_size=1, micro_batch_size=1
    )


def test_bad_inputs(tmp_path, tiny_gpt2, capsys):
    expect_error(
        pairs_args(
            tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n', tiny_gpt2
        ),
        "record 2: expected 'prompt', 'chosen', 'rejected'",
        "found fields prompt, chosen",
    )
    expect_error(
        pairs_args(tmp_path, '{"prompt": "p", "chosen": "same", "rejected": "same"}\n', tiny_gpt2),
        "no preference pairs",
    )
    expect_error(pairs_args(tmp_path, "", tiny_gpt2), "no preference pairs")
    expect_error(
        pairs_args(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n', tiny_gpt2),
        "'margin' must be a finite number",
    )
    expect_error(
        pairs_args(tmp_path, '{"prompt": "p", "chosen": 3, "rejected": "b"}\n', tiny_gpt2),
        "(all strings or all message lists)",
    )
    expect_error(
        pairs_args(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b"}\n', str(tmp_path / "nope")),
        "no such directory",
    )
    expect_error(quick_args(tmp_path, resume=str(tmp_path)), "not a checkpoint")
    expect_error(
        quick_args(tmp_path, batch_size=32, micro_batch_size=5),
        "--micro-batch-size 5 does not divide a rank's share of the batch (--batch-size 32 / 1 rank(s) = 32)",
    )
    expect_error(
        quick_args(tmp_path, pp=2),
        "--tp 1 --pp 2 splits the model over 2 processes; launch with torchrun --nproc_per_node 2",
    )
    expect_error(
        quick_args(tmp_path, task="sentiment", model=tiny_gpt2, samples_per_prompt=1),
        "--samples-per-prompt 1 must be at least 2",
    )
    expect_error(quick_args(tmp_path, task="hh"), "--task hh needs --model")
    with pytest.raises(SystemExit, match="--zero-stage 3 does not compose with --tp or --pp"):
        rm.check_args(quick_args(tmp_path, tp=2, zero_stage=3), world_size=2)
    with pytest.raises(
        SystemExit,
        match=r"6 processes do not split into --tp 2 x --pp 2 groups; make the process count a multiple of 4",
    ):
        rm.check_args(quick_args(tmp_path, tp=2, pp=2), world_size=6)
    # Identical pairs among good ones are dropped with a count, not fatal.
    pairs = rm.load_pairs(
        "jsonl",
        write_pairs(
            tmp_path,
            ['{"prompt": "p", "chosen": "x", "rejected": "x"}', '{"prompt": "p", "chosen": "a", "rejected": "b"}'],
        ),
    )
    assert (
        len(pairs) == 1
        and "dropped 1 pairs whose chosen and rejected responses are identical" in capsys.readouterr().out
    )


def test_an_output_dir_holding_a_run_is_refused(tmp_path):
    for holding in ("config.json", "checkpoints"):  # a finished run, a started one
        folder = tmp_path / holding.split(".")[0]
        folder.mkdir()
        if holding == "checkpoints":
            (folder / holding).mkdir()
        else:
            (folder / holding).write_text("{}")
        with pytest.raises(SystemExit) as error:
            rm.main(rm.Args(output_dir=str(folder)))
        assert str(error.value) == (
            f"error: --output-dir {folder} already holds a run; pick another directory, "
            f"or pass --resume {folder} to continue it"
        )
        assert os.listdir(folder) == [holding]


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path):
    """Steps of 1e30 overflow the fp32 activations: the run stops before the optimizer applies a
    NaN gradient, naming the step and what to change."""
    with pytest.raises(SystemExit) as error:
        rm.main(quick_args(tmp_path, learning_rate=1e30))
    message = str(error.value)
    assert message.startswith("error: the loss is ") and "\n" not in message, message
    assert " at step 2, so training would learn nothing; lower --learning-rate" in message, message


def write_pairs(tmp_path, lines):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a"}\n')
    result = run_script(
        "reward_model.py",
        "--task",
        "jsonl",
        "--data",
        str(path),
        "--model",
        str(tmp_path),
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}, record 1: expected 'prompt', 'chosen', 'rejected' (all strings or all message lists) or "
        "'chosen', 'rejected' (conversations opening with the same messages, the prompt); found fields prompt, chosen"
    ]


# --- data parallel under torchrun -----------------------------------------------------------------
# The layouts are compared in fp64 (see SAME_MATH in conftest.py). Llama has no bias anywhere:
# GPT-2's final layer-norm bias (which shifts every score alike, and the Bradley-Terry loss ignores a
# common shift) and its attention key biases get a gradient that is exactly zero but for rounding,
# which AdamW divides by its own size; in fp32 that rounding is near AdamW's eps and the steps grow
# to the learning rate's (~1e-4 apart between two summation orders). Without such directions the
# comparison rests on the math alone.
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
    "0.2",
]


def write_preference_pairs(path, n=40, seed=0):
    """n preference pairs in the jsonl format, from the fixture vocabulary, some with a margin."""
    words = "the cat sat on mat a dog ran to park my friend said hello world post title summary".split()
    rng = random.Random(seed)
    with open(path, "w") as file:
        for _ in range(n):
            prompt, chosen, rejected = (" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(3))
            file.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "chosen": " " + chosen,
                        "rejected": " " + rejected,
                        "margin": rng.choice([0.0, 0.5]),
                    }
                )
                + "\n"
            )
    return str(path)


@pytest.fixture(scope="module")
def pairs_run_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    return [
        "--data",
        write_preference_pairs(folder / "pairs.jsonl"),
        "--model",
        save_tiny_model(folder / "tiny", "llama"),
    ]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, pairs_run_inputs):
    """The single-process run (in this process) every multi-process layout must reproduce: its
    directory and metrics."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("one-process") / "run"
    rm.main(tyro.cli(rm.Args, args=[*DATA_PARALLEL_FLAGS, *pairs_run_inputs, "--output-dir", str(folder)]))
    expected = read_metrics(folder)
    assert 0 < expected["eval/accuracy"] < 1 and expected["eval/score_std"] > 0.1  # scores that can tell a difference
    initial, trained = (
        load_file(os.path.join(pairs_run_inputs[3], "model.safetensors")),
        load_file(folder / "model.safetensors"),
    )
    assert trained["model.norm.weight"].dtype == torch.float64
    assert max((trained[k] - initial[k]).abs().max().item() for k in initial.keys() & trained.keys()) > 1e-3, (
        "the backbone trained"
    )
    return folder, expected


def assert_same_run(expected: dict, single, run_dir, what: str):
    """Eval metrics, saved weights and saved score statistics of a multi-process run against one process."""
    actual = read_metrics(run_dir)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=SAME_MATH, abs=SAME_MATH), f"{what} {key}"
    assert max_weight_difference(single, run_dir) < SAME_MATH, what
    config = json.loads((run_dir / "config.json").read_text())
    assert config["reward_mean"] == pytest.approx(actual["eval/score_mean"]) and config["reward_std"] == pytest.approx(
        actual["eval/score_std"]
    )
    assert config["architectures"] == ["LlamaForSequenceClassification"]  # the dense reward model, whatever the layout


def test_data_parallel_every_zero_stage_matches_one_process(tmp_path, pairs_run_inputs, one_process_run):
    """2 ranks x 2 micro-batches of 2 pairs = a global batch of 8: every ZeRO stage ends with the
    eval metrics and weights of one process on the same batches (in fp64, up to summation order: see SAME_MATH).
    ZeRO-1 is the pp2xdp2-zero1 layout below: reward_model.py has no code for stage 1 that stage 2 does
    not run (only ZeRO-3 gathers), so a run of it here would check parallel.py's sharding again, which
    test_parallel does."""
    flags = DATA_PARALLEL_FLAGS + pairs_run_inputs
    single, expected = one_process_run
    for stage in (0, 2, 3):
        run = run_ranks(
            "reward_model.py",
            *flags,
            "--zero-stage",
            str(stage),
            "--output-dir",
            str(tmp_path / f"zero{stage}"),
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("saved ") == 1, "only rank 0 reports"
        assert_same_run(expected, single, tmp_path / f"zero{stage}", f"ZeRO-{stage}")
    odd = run_ranks("reward_model.py", *flags, "--batch-size", "6", "--output-dir", str(tmp_path / "odd"), cwd=tmp_path)
    assert (
        odd.returncode != 0
        and "--micro-batch-size 2 does not divide a rank's share of the batch (--batch-size 6 / 2 rank(s) = 3)"
        in odd.stderr
    )
    assert not (tmp_path / "odd").exists()


# No layout of --tp 2 alone: reward_model.py has no code for it (--tp reaches the script only through
# parallel.py's wrapper, and its branches test --pp > 1), and tp2xpp2 and sp-tp2 compare it.
LAYOUTS = [
    (["--pp", "2", "--packing"], 2),  # packed rows through the stages, the last one reading each pair's scores
    (["--tp", "2", "--pp", "2"], 4),
    (["--pp", "2", "--zero-stage", "1"], 4),
    (["--tp", "2", "--sequence-parallel"], 2),
    (["--cp", "2"], 2),
]


@pytest.mark.parametrize("flags, nproc", LAYOUTS, ids=["pp2-packing", "tp2xpp2", "pp2xdp2-zero1", "sp-tp2", "cp2"])
def test_tensor_and_pipeline_parallel_match_one_process(tmp_path, pairs_run_inputs, one_process_run, flags, nproc):
    """Heads, MLP and vocabulary split over tensor-parallel ranks (the score head whole on each),
    layers over pipeline stages (1F1B; the last stage pools the scores and computes the pairwise
    loss, both sides of a pair in one micro-batch; eval through the forward-only pipeline), and
    data parallel under ZeRO-1 over what remains, on 2 and 4 processes: the eval metrics, the saved
    dense reward model and its score statistics of one process."""
    single, expected = one_process_run
    run = run_ranks(
        "reward_model.py",
        *DATA_PARALLEL_FLAGS,
        *pairs_run_inputs,
        *flags,
        "--output-dir",
        str(tmp_path / "run"),
        nproc=nproc,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved ") == 1, "only rank 0 reports"
    assert_same_run(expected, single, tmp_path / "run", " ".join(flags))


def test_data_parallel_resume_after_kill_is_bitwise_exact(tmp_path, pairs_run_inputs):
    """ZeRO-1 on 2 ranks, the whole launcher killed after a checkpoint: the resumed run (each rank
    reloading its own optimizer slice and RNG) ends bitwise where an uninterrupted one does. 4 steps an
    epoch: the kill at the end of the first leaves 12 to resume."""
    flags = DATA_PARALLEL_FLAGS + pairs_run_inputs + ["--zero-stage", "1", "--save-every", "2", "--num-epochs", "4"]
    reference, killed = torchrun_kill_and_resume("reward_model.py", flags, tmp_path, "step_00000004")
    assert_same_weights(tmp_path / "reference", killed)
    assert read_metrics(killed) == read_metrics(tmp_path / "reference")
    with pytest.raises(SystemExit, match=r"written with --batch-size 8, which a resumed run cannot change"):
        rm.main(tyro.cli(rm.Args, args=[*flags, "--batch-size", "4", "--resume", str(killed)]))
