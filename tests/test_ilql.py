"""ilql.py: each loss term against a hand-written loop, the target heads, generation, data, exact resume (past a damaged
checkpoint too), bad input, and every parallel layout against one process in fp64."""

import copy
import json
import math
import os
import re
import shutil
import sys
from dataclasses import replace

import pytest
import torch
import tyro
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import ilql
import parallel
from conftest import (
    CHAT_TEMPLATES,
    chat_tokenizer,
    save_tiny_chat_model,
    read_metrics,
    FIXTURES,
    SAME_MATH,
    assert_same_weights,
    damage,
    max_weight_difference,
    run_and_kill,
    run_script,
    run_ranks,
    save_tiny_model,
    torchrun_kill_and_resume,
)

# Scored records in the jsonl format. They live here rather than in tests/fixtures/, whose files
# conftest.text_tokenizer reads as text-only records.
SCORED = [
    {"prompt": "Q: What is 2+2?\nA:", "completion": " 4", "reward": 1},
    {"prompt": "Q: What is 2+2?\nA:", "completion": " 5", "reward": -1.5},
    {"prompt": "Q: Capital of France?\nA:", "completion": " Paris", "reward": 0.25},
    {"prompt": "", "completion": " Blue", "reward": 2e-3},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def tiny_randomwalks_model(path, seed=0):
    """A 2-layer GPT-2 for the randomwalks tokenizer, with GPT-2's dropout so that exact resume needs the RNG states."""
    tokenizer = ilql.randomwalks_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def double_heads(hidden_size=6, vocab_size=5, seed=0, two_qs=True):
    """fp64 heads whose target Q heads differ from the Q heads (as they do after training), so min and detach matter."""
    torch.manual_seed(seed)
    heads = ilql.ILQLHeads(hidden_size, vocab_size, two_qs).double()
    with torch.no_grad():
        for parameter in heads.target_q_heads.parameters():
            parameter.add_(torch.randn_like(parameter))
    return heads


# --- loss ---------------------------------------------------------------------------------------
@torch.no_grad()
def reference_losses(heads, logits, hidden, sequences, tau, gamma, beta):
    """The four terms written the long way, one action at a time, from the method's definition."""
    q_loss = v_loss = cql = awac = 0.0
    for row, (ids, prompt_length, reward) in enumerate(sequences):
        last = len(ids) - 1  # the terminal state: the position of the final token
        for t in range(prompt_length - 1, last):  # the states that choose a response token
            action, h = ids[t + 1], hidden[row, t]
            value = heads.v_head(h)[0]
            next_value = 0.0 if t + 1 == last else heads.v_head(hidden[row, t + 1])[0]
            target = (reward if t + 1 == last else 0.0) + gamma * next_value
            target_q = min(head(h)[action] for head in heads.target_q_heads)
            for head in heads.q_heads:
                q_loss += (head(h)[action] - target) ** 2
                cql += -torch.log_softmax(head(h), -1)[action]
            v_loss += (tau if target_q >= value else 1 - tau) * (target_q - value) ** 2
            awac += -torch.log_softmax(logits[row, t], -1)[action] * math.exp(beta * (target_q - value))
    return {"q": q_loss, "v": v_loss, "cql": cql, "awac": awac}


@pytest.mark.parametrize("two_qs", [True, False])
def test_loss_terms_match_a_hand_written_loop(two_qs):
    # Row 0: a two-token prompt and a two-token response (its last token plays the EOS); the
    # actions sit at positions 1 and 2, the terminal state at 3. Row 1: one prompt token, one
    # response token, then padding (token 4).
    # The rewards are not exact in fp32: with fp64 heads the loss must keep them in fp64.
    sequences = [([3, 1, 2, 0], 2, 0.7), ([2, 1], 1, -1.3)]
    input_ids, attention_mask, action_mask, rewards = ilql.collate(sequences, 4, "cpu").values()
    assert input_ids.tolist() == [[3, 1, 2, 0], [2, 1, 4, 4]] and attention_mask.tolist() == [
        [1, 1, 1, 1],
        [1, 1, 0, 0],
    ]
    assert action_mask.tolist() == [[False, True, True], [True, False, False]]
    assert rewards.tolist() == [[0.0, 0.0, 0.7], [-1.3, 0.0, 0.0]]  # the return sits on the last action
    heads = double_heads(two_qs=two_qs)
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    tau, gamma, beta = 0.8, 0.9, 0.5
    terms = ilql.ilql_loss(heads, logits, hidden, input_ids, action_mask, rewards, tau, gamma, beta)
    expected = reference_losses(heads, logits, hidden, sequences, tau, gamma, beta)
    for name in ("q", "v", "cql", "awac"):
        assert terms[name].item() == pytest.approx(float(expected[name]), rel=1e-12), name
    # Each term trains only its own part: the Q target r + gamma * V(next), the V loss's target Q
    # and the AWAC weights are all detached.
    trains = {"q": {"q_heads"}, "v": {"v_head"}, "cql": {"q_heads"}, "awac": {"logits"}}
    for name, expected_parts in trains.items():
        parts = {
            "q_heads": list(heads.q_heads.parameters()),
            "v_head": list(heads.v_head.parameters()),
            "logits": [logits],
        }
        for part, parameters in parts.items():
            gradients = torch.autograd.grad(terms[name], parameters, retain_graph=True, allow_unused=True)
            receives = any(g is not None and g.abs().sum() > 0 for g in gradients)
            assert receives == (part in expected_parts), (name, part)
    # Masking: positions that choose no response token (early prompt, terminal state, padding)
    # receive no gradient at all.
    sum(terms[name] for name in ("q", "v", "cql", "awac")).backward()
    acting = torch.tensor([[False, True, True, False], [True, False, False, False]])
    for gradient in (logits.grad, hidden.grad):
        norms = gradient.abs().sum(-1)
        assert (norms[~acting] == 0).all() and (norms[acting] > 0).all()


def test_v_loss_is_an_asymmetric_expectile():
    # Heads with constant outputs make V and Q known numbers: V = 1 everywhere, target Q = 1 +- 0.5.
    heads = ilql.ILQLHeads(4, 3, two_qs=True).double()
    with torch.no_grad():
        for head in [heads.v_head, *heads.q_heads, *heads.target_q_heads]:
            head[2].weight.zero_()
        heads.v_head[2].bias.fill_(1.0)
    sequences = [([0, 1, 2], 1, 0.0)]  # two actions
    input_ids, _, action_mask, rewards = ilql.collate(sequences, 0, "cpu").values()
    logits, hidden = torch.zeros(1, 3, 3, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    losses = {}
    for offset in (0.5, -0.5):
        with torch.no_grad():
            heads.target_q_heads[0][2].bias.fill_(1.0 + offset)
            heads.target_q_heads[1][2].bias.fill_(5.0)  # the min over target heads picks head 0
        losses[offset] = ilql.ilql_loss(
            heads, logits, hidden, input_ids, action_mask, rewards.double(), 0.8, 0.99, 0.0
        )["v"].item()
    assert losses[0.5] == pytest.approx(2 * 0.8 * 0.25, rel=1e-12)  # V below the target costs tau
    assert losses[-0.5] == pytest.approx(2 * 0.2 * 0.25, rel=1e-12)  # V above it costs 1 - tau


def test_returns_are_z_scored_over_the_dataset():
    returns = [r for _, _, r in ilql.normalize_returns([([0, 1], 1, reward) for reward in (1.0, 2.0, 6.0)])]
    assert sum(returns) == pytest.approx(0, abs=1e-12)
    assert sum(r * r for r in returns) / 3 == pytest.approx(1, rel=1e-9)
    assert returns[0] < returns[1] < returns[2]
    assert [r for _, _, r in ilql.normalize_returns([([0, 1], 1, 3.0)] * 2)] == [
        0.0,
        0.0,
    ]  # a constant reward carries nothing


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_randomwalks_model(tmp_path / "model"), dtype=torch.float64).eval()
    tokenizer = ilql.randomwalks_tokenizer()
    heads = ilql.new_heads(model, two_qs=True).double()
    args = ilql.Args(tau=0.7, beta=0.3, batch_size=6)
    batch = ilql.tokenize_examples(
        tokenizer,
        [
            ("b", "cda", 1.0, None),
            ("cd", "a", -1.0, None),
            ("e", "fghia", 0.5, None),
            ("f", "a", 0.0, None),
            ("g", "ha", 2.0, None),
            ("hij", "ka", -0.5, None),
        ],
        16,
        "truncate",
    )
    wrapped = parallel.DataParallel(
        ilql.trained_modules(model, heads)
    )  # one process: the pass-through wrapper the script uses
    batch_actions = sum(len(ids) - prompt_length for ids, prompt_length, _ in batch)
    gradients, losses = [], []
    for micro_batch_size in (6, 4, 1):
        model.zero_grad()
        heads.zero_grad()
        losses.append(
            ilql.accumulate_gradients(
                wrapped,
                heads,
                batch,
                batch_actions,
                1,
                ilql.replace(args, micro_batch_size=micro_batch_size),
                tokenizer.pad_token_id,
                "cpu",
                torch.autocast("cpu", enabled=False),
            )
        )
        gradients.append(
            torch.cat(
                [
                    p.grad.flatten()
                    for p in [*model.parameters(), *heads.v_head.parameters(), *heads.q_heads.parameters()]
                ]
            )
        )
    assert gradients[0].abs().max() > 1e-3
    for loss, gradient in zip(losses[1:], gradients[1:]):
        assert loss["loss"] == pytest.approx(losses[0]["loss"], rel=1e-12)
        assert torch.allclose(gradient, gradients[0], rtol=1e-10, atol=1e-13)


# --- target heads -------------------------------------------------------------------------------
def test_polyak_update_of_the_target_heads():
    heads = double_heads()
    q_before = [p.clone() for p in heads.q_heads.parameters()]
    target_before = [p.clone() for p in heads.target_q_heads.parameters()]
    heads.sync_target_q_heads(0.3)
    for q, old_target, new_target, q_now in zip(
        q_before, target_before, heads.target_q_heads.parameters(), heads.q_heads.parameters()
    ):
        assert torch.allclose(new_target, 0.3 * q + 0.7 * old_target, rtol=1e-14, atol=0)
        assert torch.equal(q_now, q)
    # Fresh heads start with targets equal to the Q heads, and alpha 1 copies them.
    fresh = ilql.ILQLHeads(6, 5)
    assert all(torch.equal(a, b) for a, b in zip(fresh.q_heads.parameters(), fresh.target_q_heads.parameters()))
    heads.sync_target_q_heads(1.0)
    assert all(torch.equal(a, b) for a, b in zip(heads.q_heads.parameters(), heads.target_q_heads.parameters()))


def test_target_heads_get_no_gradient(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_randomwalks_model(tmp_path / "model"))
    tokenizer = ilql.randomwalks_tokenizer()
    heads = ilql.new_heads(model, two_qs=True)
    batch = ilql.tokenize_examples(tokenizer, [("b", "cda", 1.0, None), ("c", "a", -1.0, None)], 16, "truncate")
    wrapped = parallel.DataParallel(ilql.trained_modules(model, heads))
    ilql.accumulate_gradients(
        wrapped,
        heads,
        batch,
        4,
        1,
        ilql.Args(tau=0.7, beta=1.0, micro_batch_size=2, batch_size=2),
        tokenizer.pad_token_id,
        "cpu",
        torch.autocast("cpu", enabled=False),
    )
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in [*heads.v_head.parameters(), *heads.q_heads.parameters()]
    )
    assert all(p.grad is None and not p.requires_grad for p in heads.target_q_heads.parameters())


# --- generation ---------------------------------------------------------------------------------
def test_beta_zero_sampling_equals_plain_lm_sampling():
    tokenizer = ilql.randomwalks_tokenizer()
    torch.manual_seed(0)
    model = ilql.randomwalks_model(tokenizer).double().eval()
    heads = double_heads(144, len(tokenizer))
    texts = ["b", "cde", "f", "ghij"] * 5  # unequal lengths: left padding must not change the result
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    torch.manual_seed(3)
    ours = ilql.generate(model, heads, tokenizer, prompts, 9, 0.0, 1.0, 0, "cpu")
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    config = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=9,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    output = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :].tolist()
    plain = [ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids for ids in output]
    assert ours == plain
    assert len({tuple(ids) for ids in ours}) > 10  # the samples do differ from each other
    # A non-zero beta changes what is drawn with the same seed.
    torch.manual_seed(3)
    assert ilql.generate(model, heads, tokenizer, prompts, 9, 5.0, 1.0, 0, "cpu") != ours


def test_shifted_scores_and_greedy_decoding_follow_the_advantage():
    tokenizer = ilql.randomwalks_tokenizer()
    torch.manual_seed(0)
    model = ilql.randomwalks_model(tokenizer).double().eval()
    heads = double_heads(144, len(tokenizer))
    hidden = torch.randn(3, 144, dtype=torch.float64)
    logits = torch.randn(3, len(tokenizer), dtype=torch.float64)
    advantage = torch.minimum(heads.target_q_heads[0](hidden), heads.target_q_heads[1](hidden)) - heads.v_head(hidden)
    assert torch.allclose(heads.target_advantage(hidden), advantage, rtol=1e-14, atol=1e-14)
    scores = ilql.shifted_scores(logits, advantage, 2.5, 0)
    assert torch.allclose(scores, torch.log_softmax(logits, -1) + 2.5 * advantage, rtol=1e-14, atol=1e-14)
    top = ilql.shifted_scores(logits, advantage, 2.5, 4)
    assert (torch.isfinite(top).sum(-1) == 4).all()
    assert torch.equal(top[torch.isfinite(top)], scores[torch.isfinite(top)])
    assert torch.equal(torch.isfinite(top), scores >= scores.topk(4, -1).values[:, -1:])

    # Greedy generation with the KV cache equals a loop that re-runs the whole prefix each step.
    prompts, beta = [tokenizer(text)["input_ids"] for text in ("b", "cde", "f")], 3.0
    generated = ilql.generate(model, heads, tokenizer, prompts, 9, beta, 0.0, 10, "cpu")
    for prompt, response in zip(prompts, generated):
        ids = list(prompt)
        reference = []
        with torch.no_grad():
            for _ in range(9):
                output = model(torch.tensor([ids]), output_hidden_states=True)
                h = output.hidden_states[-1][0, -1]
                step_scores = torch.log_softmax(output.logits[0, -1], -1) + beta * (
                    torch.minimum(heads.target_q_heads[0](h), heads.target_q_heads[1](h)) - heads.v_head(h)
                )
                token = int(step_scores.topk(10).indices[0])
                reference.append(token)  # the response keeps the EOS that ends it
                ids.append(token)
                if token == tokenizer.eos_token_id:
                    break
        assert response == reference
    assert generated != ilql.generate(model, heads, tokenizer, prompts, 9, 0.0, 0.0, 10, "cpu")  # the shift matters

    # Under bf16 autocast (evaluation of a --dtype bf16 run) the heads still run in fp32, as in
    # training: at beta 100 a bf16 error in Q - V would be multiplied by 100.
    model, heads, head_dtypes = (
        copy.deepcopy(model).float(),
        copy.deepcopy(heads).float(),
        [],
    )  # fp32 weights, as under --dtype bf16
    heads.v_head.register_forward_hook(lambda module, inputs, output: head_dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ilql.generate(model, heads, tokenizer, prompts, 3, 100.0, 0.0, 10, "cpu")
    assert head_dtypes and set(head_dtypes) == {torch.float32}


# --- data ---------------------------------------------------------------------------------------
def test_jsonl_parser(tmp_path):
    path = write_jsonl(tmp_path / "scored.jsonl", SCORED)
    examples = ilql.load_examples("jsonl", path)
    assert examples == [(r["prompt"], r["completion"], float(r["reward"]), None) for r in SCORED]
    sequences = ilql.tokenize_examples(ilql.randomwalks_tokenizer(), [("", "bc", 1.0, None)], 16, "truncate")
    assert sequences == [([21, 1, 2, 21], 1, 1.0)]  # an empty prompt acts from an EOS; the response ends with one


def test_hh_parser_gives_chosen_plus_one_and_rejected_minus_one():
    examples = ilql.load_examples("hh", os.path.join(FIXTURES, "hh-rlhf-train.jsonl"))
    assert len(examples) == 8
    chosen, rejected = examples[2], examples[3]  # the second pair: a multi-turn dialogue
    prompt = (
        "\n\nHuman: Can you recommend a book?\n\nAssistant: What kind of books do you enjoy?"
        "\n\nHuman: Science fiction.\n\nAssistant:"
    )
    assert chosen == (prompt, " Try The Left Hand of Darkness by Ursula K. Le Guin.", 1.0, None)
    assert rejected == (prompt, " I don't read.", -1.0, None)
    assert [reward for _, _, reward, _ in examples] == [1.0, -1.0] * 4


def chat(*turns):
    return [{"role": role, "content": content} for role, content in zip(("user", "assistant") * 2, turns)]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_conversational_records_are_rendered_as_apply_chat_template_does(tmp_path, style):
    """A conversational prompt is the template's rendering with the generation prompt (and the record's
    tools); its completion is the rest of the conversation's rendering up to and including the end-of-turn
    token, which is not the EOS; a string prompt-completion is tokenized as before."""
    tokenizer, tools = chat_tokenizer(style), [{"name": "lookup"}]
    records = [
        {"prompt": chat("Capital of France?"), "completion": chat("", "Paris")[1:], "reward": 1, "tools": tools},
        {"prompt": chat("Hi", "Hello", "Capital of Italy?"), "completion": chat("", "Rome")[1:], "reward": -1},
    ]
    examples = ilql.load_examples("jsonl", write_jsonl(tmp_path / "chat.jsonl", records))
    for (ids, prompt_length, reward), record in zip(ilql.tokenize_examples(tokenizer, examples, 512, "skip"), records):
        messages, tools = record["prompt"] + record["completion"], record.get("tools")
        prompt = tokenizer.apply_chat_template(record["prompt"], tools=tools, add_generation_prompt=True, tokenize=True)
        whole = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]
        assert ids[:prompt_length] == prompt["input_ids"] and reward == record["reward"]
        assert ids == whole[: len(ids)]
        end = tokenizer.convert_tokens_to_ids({"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[style])
        assert ids[prompt_length:] == tokenizer(record["completion"][0]["content"], add_special_tokens=False)[
            "input_ids"
        ] + [end]
        assert end != tokenizer.eos_token_id and end in ilql.end_of_turn_ids(tokenizer)


def test_conversational_data_train_and_sample_end_to_end(tmp_path, tiny_gpt2, fake_vader):
    """A tiny chat model trains on conversational scored records, and samples the sentiment task from
    conversational prompts rendered with the generation prompt (its samples file, in the jsonl format, keeps
    the conversation); a template-less tokenizer takes --chat-template, and without one stops with one line."""
    model = save_tiny_chat_model(tmp_path / "chat", "chatml")
    scored = write_jsonl(
        tmp_path / "scored.jsonl",
        [{"prompt": chat("Hi"), "completion": chat("", "Hello")[1:], "reward": r} for r in (1, -1, 0.5, 2)],
    )
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": chat(f"Continue this review: the {w}")}
            for w in "cat dog mat park friend hello world post title summary".split()
        ],
    )
    settings = dict(
        model=model, num_epochs=1, batch_size=2, max_new_tokens=3, eval_generations=1, eval_prompts=1, eval_betas=(0.0,)
    )
    ilql.main(ilql.Args(task="jsonl", data=scored, output_dir=str(tmp_path / "jsonl"), **settings))
    ilql.main(
        ilql.Args(
            task="sentiment", data=prompts, samples_per_prompt=1, output_dir=str(tmp_path / "sentiment"), **settings
        )
    )
    records = ilql.read_records(str(tmp_path / "sentiment" / ilql.SENTIMENT_SAMPLES))
    assert records and all(
        r["prompt"][0]["role"] == "user" and r["completion"][0]["role"] == "assistant" for r in records
    )
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATES["chatml"])
    args = ilql.Args(task="jsonl", data=scored, output_dir=str(tmp_path / "plain"), **{**settings, "model": tiny_gpt2})
    expect_error(args, "has no chat template; pass --chat-template PATH")
    bad = write_jsonl(tmp_path / "bad-prompts.jsonl", [{"prompt": "a"}, {"prompt": [{"content": "b"}]}])
    expect_error(replace(args, task="sentiment", data=bad), "record 2: expected a 'prompt' string or conversation")
    ilql.main(replace(args, chat_template=str(template)))
    assert read_metrics(tmp_path / "plain")["step"] == 2


# --- training runs ------------------------------------------------------------------------------
def test_smoke_run_with_wandb_offline_and_reload(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        "ilql.py",
        "--num-epochs",
        "1",
        "--eval-every",
        "5",
        "--eval-samples-per-start",
        "2",
        "--eval-betas",
        "0",
        "4",
        "--track",
        "--output-dir",
        str(run_dir),
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 5: optimality by generation beta" in result.stdout and "greedy  sampled    valid" in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", ilql.HEADS_FILE, "metrics.json"} <= set(
        os.listdir(run_dir)
    )
    assert any(name.startswith("offline-run") for name in os.listdir(run_dir / "wandb"))
    with open(run_dir / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["step"] == 10 and metrics["dataset/optimality"] == pytest.approx(0.3515, abs=1e-4)
    assert {
        "eval/optimality_greedy_beta0",
        "eval/optimality_sampled_beta4",
        "eval/best_optimality_greedy",
        "eval/best_beta_sampled",
    } <= set(metrics)

    # The LM alone loads with plain transformers; with its heads it generates as at the end of training.
    plain = AutoModelForCausalLM.from_pretrained(run_dir)
    assert plain.config.n_layer == 6 and plain.config.n_embd == 144
    model, tokenizer, heads = ilql.load_trained(str(run_dir))
    saved = load_file(run_dir / ilql.HEADS_FILE)
    assert saved.keys() == heads.state_dict().keys() and len(heads.q_heads) == 2
    adjacency, _ = ilql.generate_random_walks()
    shortest = ilql.shortest_path_nodes(adjacency)
    starts = [[node] for node in range(1, 21)]
    responses = ilql.generate(model, heads, tokenizer, starts, 9, 4.0, 0.0, 10, "cpu")
    walks = [tokenizer.decode(s + r, skip_special_tokens=True) for s, r in zip(starts, responses)]
    greedy = sum(ilql.walk_optimality(walk, adjacency, shortest) for walk in walks) / 20
    assert greedy == pytest.approx(metrics["eval/optimality_greedy_beta4"], abs=1e-12)


def test_text_tasks_train(tmp_path, tiny_gpt2):
    jsonl = write_jsonl(tmp_path / "scored.jsonl", SCORED)
    for task, data in (("jsonl", jsonl), ("hh", os.path.join(FIXTURES, "hh-rlhf-train.jsonl"))):
        args = ilql.Args(
            task=task,
            data=data,
            model=tiny_gpt2,
            output_dir=str(tmp_path / task),
            num_epochs=2,
            batch_size=2,
            micro_batch_size=1,
            max_new_tokens=3,
            eval_generations=2,
            eval_betas=(0.0, 1.0),
            save_every=3,
        )
        ilql.main(args)
        with open(tmp_path / task / "metrics.json") as file:
            metrics = json.load(file)
        assert metrics["step"] == 2 * (len(ilql.load_examples(task, data)) // 2)
        assert {"eval/response_tokens_beta0", "eval/response_tokens_beta1"} <= set(metrics)
        assert ilql.load_trained(str(tmp_path / task))[2].v_head[0].in_features == 32


def test_sentiment_task_samples_its_own_dataset_and_resumes_from_it(tmp_path, tiny_gpt2, fake_vader, monkeypatch):
    words = "cat dog mat park friend hello world post title summary sat ran said my the a on to".split()
    prompts = [f"the {first} {second}" for first, second in zip(words, reversed(words))]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    run_dir = tmp_path / "run"
    args = ilql.Args(
        task="sentiment",
        data=data,
        model=tiny_gpt2,
        output_dir=str(run_dir),
        samples_per_prompt=2,
        generation_batch_size=8,
        max_new_tokens=4,
        num_epochs=2,
        batch_size=4,
        micro_batch_size=2,
        eval_prompts=2,
        eval_betas=(0.0, 4.0),
        save_every=3,
        keep_checkpoints=10,
    )
    ilql.main(args)
    records = ilql.read_records(str(run_dir / ilql.SENTIMENT_SAMPLES))
    # The held-out openings (ppo.py's split) are never in the dataset; the others are sampled twice each
    # (less any empty continuation) and every continuation is rewarded with its score.
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held_out = {prompts[i] for i in order[:1]}
    assert {r["prompt"] for r in records} <= set(prompts) - held_out and 24 <= len(records) <= 2 * (len(prompts) - 1)
    assert all(r["completion"] and r["reward"] == fake_vader(r["completion"]) for r in records)
    assert len({r["completion"] for r in records}) > len(records) // 2  # sampled, not greedy
    with open(run_dir / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["dataset/score"] == pytest.approx(sum(r["reward"] for r in records) / len(records))
    assert metrics["eval/best_score_sampled"] == max(
        metrics["eval/score_sampled_beta0"], metrics["eval/score_sampled_beta4"]
    )
    assert metrics["step"] == 2 * (len(records) // 4)

    # A resumed run trains on the dataset its run sampled (the model has changed since) and ends where the run did.
    finished = (run_dir / "model.safetensors").read_bytes()
    monkeypatch.setattr(ilql, "sample_sentiment_dataset", lambda *a: pytest.fail("a resumed run sampled a new dataset"))
    ilql.main(replace(args, resume=str(run_dir / "checkpoints" / "step_00000003")))
    assert (run_dir / "model.safetensors").read_bytes() == finished


def eos_prone_gpt2(path) -> str:
    """The tiny GPT-2 with EOS made likely (a logit of about 4.5 where the others lie within about 0.3
    of 0), so that a few sampled tokens end with EOS about half the time."""
    model_dir = save_tiny_model(path, "gpt2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 3.0
        model.lm_head.weight[model.config.eos_token_id] = 0.0  # tied to the input embedding: EOS is no prompt token
        model.lm_head.weight[model.config.eos_token_id, 0] = 1.5
    model.save_pretrained(model_dir)
    return model_dir


def test_sentiment_samples_reach_the_loss_as_the_sampled_token_ids(tmp_path, fake_vader, monkeypatch):
    """Token in, token out: every sequence the loss sees is a prompt's ids and a continuation's ids as
    the sampler drew them, not the decoded text tokenized again; an EOS only where the sampler drew
    one (generate cuts before it: a response shorter than --max-new-tokens drew one), so a response
    cut at --max-new-tokens has none and its last token is the terminal action."""
    model_dir = eos_prone_gpt2(tmp_path / "lm")
    sampled, trained = {}, []  # sampled: prompt + response ids -> response ids as drawn

    def generate(lm, heads, tokenizer, prompts, max_new_tokens, *rest):
        responses = real_generate(lm, heads, tokenizer, prompts, max_new_tokens, *rest)
        for prompt, response in zip(prompts, responses):
            sampled[tuple(prompt + response)] = response
        return responses

    def collate(sequences, *rest):
        trained.extend(tuple(ids) for ids, _, _ in sequences)
        return real_collate(sequences, *rest)

    real_generate, real_collate = ilql.generate, ilql.collate
    monkeypatch.setattr(ilql, "generate", generate)
    monkeypatch.setattr(ilql, "collate", collate)
    words = "cat dog mat park friend hello world post title summary sat ran said my the a on to".split()
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"the {a} {b}"} for a, b in zip(words, reversed(words))])
    settings = dict(task="sentiment", data=data, model=model_dir, output_dir=str(tmp_path / "run"), eval_betas=(0.0,))
    settings.update(samples_per_prompt=2, generation_batch_size=8, max_new_tokens=4, num_epochs=1, batch_size=4)
    ilql.main(ilql.Args(**settings, micro_batch_size=2, eval_prompts=2))
    assert len(trained) >= 16 and set(trained) <= set(sampled)
    responses = [sampled[ids] for ids in trained]
    eos = ilql.load_model(model_dir, "cpu")[1].eos_token_id
    cut = [response for response in responses if response[-1] != eos]
    assert cut and all(len(response) == 4 and eos not in response for response in cut)
    assert len(cut) < len(responses), "no response drew an EOS: the test would not see one kept"


def test_sentiment_dataset_does_not_depend_on_the_number_of_ranks(tiny_gpt2, fake_vader):
    from types import SimpleNamespace

    lm, tokenizer = ilql.load_model(tiny_gpt2, "cpu")
    heads = ilql.new_heads(lm, True)
    args = ilql.Args(samples_per_prompt=3, generation_batch_size=4, max_new_tokens=4)
    prompts = [(text, None) for text in ("the cat", "a dog ran", "my friend said", "hello world", "the park")]
    device = torch.device("cpu")

    def sample(rank, ranks):  # each rank's batches (one process cannot gather, so the test joins them)
        return ilql.sample_sentiment_dataset(
            lm,
            heads,
            tokenizer,
            prompts,
            args,
            SimpleNamespace(dp_rank=rank, dp_size=ranks, dp_group=None, is_main=rank == 0),
            device,
        )

    state = torch.get_rng_state()
    whole = sample(0, 1)
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert sorted(sample(0, 2) + sample(1, 2)) == sorted(whole) and len(whole) >= 10


def test_sentiment_task_without_vader_says_what_to_install(tmp_path, tiny_gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # import fails as when it is not installed
    ilql.vader.cache_clear()
    expect_error(
        ilql.Args(task="sentiment", model=tiny_gpt2, output_dir=str(tmp_path / "run")), "pip install vaderSentiment"
    )
    ilql.vader.cache_clear()


# 10 steps an epoch, 20 in all, with dropout on; checkpoints every 4 steps, and the kill once the
# second (step 8, mid-epoch, between two syncs of the target heads) is written: a resumed run
# must restore the optimizer, the RNG, the target heads and the data order to match the
# uninterrupted one (and an evaluation, at step 9, must not perturb it).
RESUME_FLAGS = [
    "--num-epochs",
    "2",
    "--batch-size",
    "100",
    "--micro-batch-size",
    "50",
    "--save-every",
    "4",
    "--steps-for-target-sync",
    "3",
    "--eval-every",
    "9",
    "--eval-samples-per-start",
    "2",
    "--eval-betas",
    "1",
]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """(the tiny model, its flags, the uninterrupted run, a run killed with checkpoints at steps 4 and 8)."""
    folder = tmp_path_factory.mktemp("killed")
    model = tiny_randomwalks_model(folder / "model")
    flags = ["--model", model, *RESUME_FLAGS]
    reference, killed = run_and_kill("ilql.py", flags, folder, "step_00000008")
    assert sorted(os.listdir(killed / "checkpoints")) == ["step_00000004", "step_00000008"]
    return model, flags, reference, killed


def test_resume_after_kill_is_bitwise_exact(tmp_path, killed_run):
    model, flags, reference, killed = killed_run
    shutil.copytree(killed, tmp_path / "run")
    resumed = run_script("ilql.py", *flags, "--resume", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'run'} from step 8" in resumed.stdout
    for name in ("model.safetensors", ilql.HEADS_FILE):
        assert_same_weights(reference, tmp_path / "run", name)
    initial = load_file(os.path.join(model, "model.safetensors"))
    trained = load_file(tmp_path / "run" / "model.safetensors")
    assert not any(torch.equal(initial[k], trained[k]) for k in initial if k.endswith(".weight"))  # the runs did train


def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, killed_run):
    """With the heads of the newest checkpoint cut short, --resume names it, resumes from the one
    before and still ends bitwise where the uninterrupted run does; a changed or deleted file is
    caught the same way. With no intact checkpoint left it stops with one line."""
    _, flags, reference, killed = killed_run
    run_dir = tmp_path / "truncate"
    shutil.copytree(killed, run_dir)
    newest = run_dir / "checkpoints" / "step_00000008"
    damage(newest / ilql.HEADS_FILE, "truncate")
    resumed = run_script("ilql.py", *flags, "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"warning: checkpoint {newest} is damaged ({ilql.HEADS_FILE} is not the file that was saved" in resumed.stdout
    )
    assert f"resuming {run_dir} from step 4" in resumed.stdout
    for name in ("model.safetensors", ilql.HEADS_FILE):
        assert_same_weights(reference, run_dir, name)
    for how, victim in (("corrupt", "rank_0.pt"), ("delete", "trainer_state.pt")):
        copy = tmp_path / how
        shutil.copytree(killed, copy)
        damage(copy / "checkpoints" / "step_00000008" / victim, how)
        assert parallel.find_checkpoint(str(copy), verbose=False) == str(copy / "checkpoints" / "step_00000004")
    damage(tmp_path / "corrupt" / "checkpoints" / "step_00000004" / "config.json", "delete")
    with pytest.raises(SystemExit, match="every checkpoint in .* is damaged"):
        parallel.find_checkpoint(str(tmp_path / "corrupt"))
    with pytest.raises(SystemExit, match=r"the checkpoint is damaged \(rank_0.pt is not the file that was saved"):
        parallel.find_checkpoint(str(tmp_path / "corrupt" / "checkpoints" / "step_00000008"))


def test_num_layers_unfrozen_trains_only_the_top_layers_of_the_lm(tmp_path):
    model = tiny_randomwalks_model(tmp_path / "model")  # 2 layers, GPT-2's tied head
    run = tmp_path / "run"
    ilql.main(
        ilql.Args(
            model=model,
            num_layers_unfrozen=1,
            num_epochs=1,
            batch_size=100,
            micro_batch_size=50,
            eval_every=100,
            eval_samples_per_start=1,
            eval_betas=(1.0,),
            output_dir=str(run),
        )
    )
    initial, trained = load_file(os.path.join(model, "model.safetensors")), load_file(run / "model.safetensors")
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    # The top block and the final norm train; the bottom block, the embeddings and the tied head (the embedding) do not.
    assert changed and all(k.startswith(("transformer.h.1.", "transformer.ln_f.")) for k in changed), changed
    assert {k for k in changed if k.endswith(".weight")} == {
        k for k in initial if k.startswith(("transformer.h.1.", "transformer.ln_f.")) and k.endswith(".weight")
    }


def test_lora_trains_adapters_saves_them_merged_and_resumes_exactly(tmp_path, randomwalks_llama):
    """The LM stays frozen under its adapters; a checkpoint keeps the frozen base and the adapters
    apart and resumes bitwise; the final LM has them merged and loads with plain transformers."""
    flags = dict(
        model=randomwalks_llama,
        lora_rank=2,
        lora_alpha=4.0,
        num_epochs=1,
        batch_size=100,
        micro_batch_size=50,
        learning_rate=1e-2,
        save_every=3,
        keep_checkpoints=3,
        eval_every=100,
        eval_samples_per_start=1,
        eval_betas=(1.0,),
    )
    ilql.main(ilql.Args(**flags, output_dir=str(tmp_path / "run")))
    initial = load_file(os.path.join(randomwalks_llama, "model.safetensors"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert load_file(checkpoint / "model.safetensors").keys() == initial.keys()
    assert max_weight_difference(randomwalks_llama, checkpoint) == 0.0  # the base never moves
    adapters = load_file(checkpoint / ilql.ADAPTERS_FILE)
    assert adapters and all(".lora_A" in k or ".lora_B" in k for k in adapters)
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in adapters.items())  # trained away from B = 0

    # The checkpoint reloads as the adapted LM: its logits are those of the base with B A added by hand.
    # In fp64, where W x + s B (A x) and (W + s B A) x differ by rounding of order 1e-15 (SAME_MATH's argument).
    lm, _, _ = ilql.load_trained(str(checkpoint), dtype=torch.float64)
    by_hand = AutoModelForCausalLM.from_pretrained(randomwalks_llama, dtype=torch.float64)
    with torch.no_grad():
        for key, a in adapters.items():
            if key.endswith("lora_A"):
                layer = by_hand.get_submodule(key[: -len(".lora_A")])
                layer.weight += adapters[key[:-1] + "B"].double() @ a.double() * (4.0 / 2)
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.allclose(lm(ids).logits, by_hand(ids).logits, rtol=0, atol=1e-12)

    # Final save: adapters merged, loadable with plain transformers, every adapted matrix moved, norms and
    # embeddings not.
    final = load_file(tmp_path / "run" / "model.safetensors")
    assert final.keys() == initial.keys() and not (tmp_path / "run" / ilql.ADAPTERS_FILE).exists()
    assert all(not torch.equal(final[k], initial[k]) for k in initial if k.endswith("proj.weight"))
    assert all(torch.equal(final[k], initial[k]) for k in initial if "norm" in k or "embed" in k)
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")

    # Resume from step 3 in a copy of the run without its final files: bitwise the uninterrupted end.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    for name in ("config.json", "model.safetensors", ilql.HEADS_FILE, "metrics.json"):
        os.remove(tmp_path / "resumed" / name)
    ilql.main(ilql.Args(**flags, resume=str(tmp_path / "resumed" / "checkpoints" / "step_00000003")))
    for name in ("model.safetensors", ilql.HEADS_FILE):
        assert_same_weights(tmp_path / "run", tmp_path / "resumed", name)


# --- bad input ----------------------------------------------------------------------------------
def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as error:
        ilql.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(args.output_dir), "a failed run must not leave a run directory"


@pytest.mark.parametrize(
    "record, fragments",
    [
        ({"prompt": "a", "completion": "b", "reward": "high"}, ["record 2", "'reward' is \"high\", not a number"]),
        ({"prompt": "a", "completion": "b", "reward": True}, ["record 2", "'reward' is true, not a number"]),
        (
            {"prompt": "a", "completion": "b"},
            ["record 2: expected 'prompt' and 'completion'", "fields prompt, completion"],
        ),
        ('{"prompt": "a", "completion": "b", "reward": NaN}', ["record 2", "'reward' is nan"]),
        ('{"prompt": "a", "completion": "b", "reward": -Infinity}', ["record 2", "'reward' is -inf"]),
        ({"prompt": "a", "completion": "", "reward": 1}, ["record 2", "'completion' is empty"]),
        ({"prompt": "a", "reward": 1}, ["record 2: expected", "found fields prompt, reward"]),
        ({"prompt": chat("a"), "completion": "b", "reward": 1}, ["record 2: expected", "prompt, completion, reward"]),
        ({"prompt": [{"role": "user"}], "completion": chat("", "b")[1:], "reward": 1}, ["record 2: expected"]),
        (
            {"prompt": chat("a"), "completion": chat("", "b")[1:], "reward": 1},
            ["record 2: strings and conversations mixed"],
        ),
        (
            {"prompt": "a", "response": "b", "reward": 1},
            ["record 2: expected", "found fields prompt, response, reward"],
        ),
    ],
)
def test_bad_records(tmp_path, record, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl", [SCORED[0], record])
    expect_error(
        ilql.Args(task="jsonl", data=path, model=str(tmp_path), output_dir=str(tmp_path / "run")), path, *fragments
    )


def test_bad_flags_and_files(tmp_path):
    run = str(tmp_path / "run")
    expect_error(ilql.Args(task="jsonl", model=str(tmp_path), output_dir=run), "--data")
    expect_error(
        ilql.Args(task="jsonl", data=str(tmp_path / "missing.jsonl"), model=str(tmp_path), output_dir=run),
        "does not exist",
    )
    expect_error(ilql.Args(task="hh", output_dir=run), "--model")
    expect_error(
        ilql.Args(output_dir=run, batch_size=100, micro_batch_size=30),
        "--micro-batch-size 30 does not divide a rank's share of the batch (--batch-size 100 / 1 rank(s) = 100)",
    )
    expect_error(ilql.Args(output_dir=run, tau=1.0), "--tau 1.0 must lie strictly between 0 and 1")
    expect_error(ilql.Args(output_dir=run, tp=2), "launch with torchrun --nproc_per_node 2")
    expect_error(ilql.Args(output_dir=run, resume=str(tmp_path)), "not a checkpoint")
    expect_error(ilql.Args(output_dir=run, lora_rank=4, num_layers_unfrozen=1), "pick one")
    expect_error(ilql.Args(output_dir=run, lora_rank=-1), "--lora-rank -1 must be 0 or more")
    expect_error(
        ilql.Args(output_dir=run, num_layers_unfrozen=0), "--num-layers-unfrozen 0 must be -1 (the whole LM trains) or"
    )
    expect_error(
        ilql.Args(output_dir=run, eval_betas=(0.0, -2.0)),
        "--eval-betas 0.0 -2.0 holds -2.0; every beta must be 0 or a positive number",
    )
    expect_error(ilql.Args(output_dir=run, eval_betas=()), "--eval-betas needs at least one beta")
    expect_error(ilql.Args(output_dir=run, num_layers_unfrozen=7), "between 1 and the model's 6 layers")
    expect_error(ilql.Args(output_dir=run, lora_rank=4, lora_target_modules="nothing_here"), "matched no linear layer")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a run"):
        ilql.main(ilql.Args(output_dir=str(tmp_path / "done")))


def test_check_args_settles_the_defaults_and_refuses_layouts_that_cannot_work():
    settled = ilql.check_args(ilql.Args(), 2)
    assert (settled.micro_batch_size, settled.tau, settled.alpha) == (
        48,
        0.8,
        0.1,
    )  # a rank's share; trlX's randomwalks values
    settled = ilql.check_args(ilql.Args(task="jsonl", model="m", batch_size=8, micro_batch_size=2, tau=0.6), 4)
    assert (settled.micro_batch_size, settled.tau, settled.alpha) == (2, 0.6, 0.001)
    for args, world_size, message in [
        (ilql.Args(tp=2), 3, "3 processes do not split into --tp 2 x --pp 1 groups"),
        (ilql.Args(pp=2, zero_stage=3), 2, "--zero-stage 3 does not compose with --tp or --pp"),
        (ilql.Args(tp=2, lora_rank=2), 2, "--lora-rank is not supported with --tp or --pp"),
        (ilql.Args(), 5, "--batch-size 96 does not split over 5 data-parallel ranks"),
        (ilql.Args(task="sentiment"), 1, "--task sentiment needs --model"),
    ]:
        with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}"):
            ilql.check_args(args, world_size)


def test_a_non_finite_loss_stops_the_run(tmp_path, tiny_gpt2):
    # exp(beta * advantage) overflows on the first action the heads happen to favour.
    args = ilql.Args(
        task="jsonl",
        data=write_jsonl(tmp_path / "scored.jsonl", SCORED),
        model=tiny_gpt2,
        beta=1e4,
        num_epochs=1,
        batch_size=4,
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(
        SystemExit, match=r"^error: the loss is (inf|nan) and the gradient norm (inf|nan) at step 1, so training "
    ):
        ilql.main(args)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b", "reward": NaN}'])
    result = run_script(
        "ilql.py",
        "--task",
        "jsonl",
        "--data",
        path,
        "--model",
        str(tmp_path),
        "--output-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {path}, record 1: 'reward' is nan; rewards must be finite numbers"
    ]
    assert not (tmp_path / "run").exists()


# --- data parallel under torchrun -----------------------------------------------------------------
# Every layout is compared with one process in fp64, where the two differ only in the order of
# their sums (see SAME_MATH in conftest). In fp32 a rounding difference of ~1e-7 could carry a ReLU
# unit of a head across its kink on one state, after which the runs part by the learning rate's
# order; in fp64 that takes a value within ~1e-13 of the kink. A Llama, as it has no dropout
# (data-parallel replicas draw their own masks) and no biases (GPT-2's attention key biases get a
# gradient that is zero but for rounding, which AdamW scales up towards steps of the learning rate).
DATA_PARALLEL_FLAGS = [
    "--dtype",
    "fp64",
    "--num-epochs",
    "1",
    "--batch-size",
    "48",
    "--micro-batch-size",
    "12",
    "--learning-rate",
    "2e-2",
    "--steps-for-target-sync",
    "3",
    "--eval-every",
    "20",
    "--eval-samples-per-start",
    "2",
    "--eval-betas",
    "0",
    "4",
]


@pytest.fixture(scope="module")
def randomwalks_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "llama"
    tokenizer = ilql.randomwalks_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, randomwalks_llama):
    """The single-process run (in this process) that every layout must reproduce, for the flags of a
    variant (LoRA, frozen layers) added to DATA_PARALLEL_FLAGS: its directory and greedy
    evaluation. Each variant runs once and serves every test that asks for it."""
    runs = {}

    def run(*variant):
        if variant not in runs:
            folder = tmp_path_factory.mktemp("one-process") / "run"
            flags = [*DATA_PARALLEL_FLAGS, "--model", randomwalks_llama, *variant, "--output-dir", str(folder)]
            ilql.main(tyro.cli(ilql.Args, args=flags))
            expected = read_metrics(folder)
            if not variant:  # it learned enough for greedy walks to tell a difference (the variants train less)
                assert expected["eval/optimality_greedy_beta4"] > 0.1
            for name in ("model.safetensors", ilql.HEADS_FILE):
                assert {t.dtype for t in load_file(folder / name).values()} == {torch.float64}, name
            runs[variant] = folder, expected
        return runs[variant]

    return run


def assert_same_math(single, parallel_run, expected):
    """The greedy evaluation, the saved dense LM and the heads (target heads included) of a parallel
    run are those of the single-process run, up to fp64 summation order."""
    actual = read_metrics(parallel_run)
    assert actual.keys() == expected.keys()
    greedy = {k: v for k, v in expected.items() if "greedy" in k}
    assert {k: actual[k] for k in greedy} == pytest.approx(greedy, rel=SAME_MATH)
    for name in ("model.safetensors", ilql.HEADS_FILE):
        assert max_weight_difference(single, parallel_run, name) < SAME_MATH, name


def test_data_parallel_every_zero_stage_matches_one_process(tmp_path, randomwalks_llama, one_process_run):
    """2 ranks x 2 micro-batches of 12 walks = a global batch of 48: every ZeRO stage ends with the
    LM, the heads and the greedy evaluation of one process on the same batches. Sampled walks differ
    by design (each rank samples from seed + rank). ZeRO-2 is the pp2xdp2-zero2 layout below: ilql.py
    has no code for stage 2 that stage 1 does not run (only ZeRO-3 gathers), so a third run here
    would check parallel.py's sharding again, which test_parallel does."""
    single, expected = one_process_run()
    for stage in (0, 1, 3):
        run = run_ranks(
            "ilql.py",
            *DATA_PARALLEL_FLAGS,
            "--model",
            randomwalks_llama,
            "--zero-stage",
            str(stage),
            "--output-dir",
            str(tmp_path / f"zero{stage}"),
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("saved ") == 1 and run.stdout.count("optimality by generation beta") == 1, (
            "only rank 0 reports"
        )
        assert run.stdout.count("batch 48 = 2 data-parallel rank(s) x 2 micro-batch(es) of 12") == 1
        assert_same_math(single, tmp_path / f"zero{stage}", expected)


# No layout of --tp 2 or --pp 2 alone: ilql.py has no code for either alone (its branches test --pp > 1, or
# --tp x --pp > 1; --tp reaches it only through parallel.py's wrappers), and both are compared within tp2xpp2,
# sp-tp2 and pp2xdp2-zero2, so separate runs of each added no check of the script.
LAYOUTS = [
    (["--tp", "2", "--pp", "2"], 4),
    (["--pp", "2", "--zero-stage", "2"], 4),
    (["--tp", "2", "--sequence-parallel"], 2),
    (["--cp", "2"], 2),
]


@pytest.mark.parametrize("flags, nproc", LAYOUTS, ids=["tp2xpp2", "pp2xdp2-zero2", "sp-tp2", "cp2"])
def test_tensor_and_pipeline_parallel_match_one_process(tmp_path, randomwalks_llama, one_process_run, flags, nproc):
    """The LM's heads, MLP and vocabulary split over tensor-parallel ranks (the ILQL heads whole on
    each), its layers over pipeline stages (1F1B; the V and Q heads train on the last stage, which
    hands them to the others for generating and saving; generation with the LM gathered whole),
    and data parallel under ZeRO-2 over what remains: the greedy evaluation, the saved dense LM and
    the heads (target heads included) of one process."""
    single, expected = one_process_run()
    run = run_ranks(
        "ilql.py",
        *DATA_PARALLEL_FLAGS,
        "--model",
        randomwalks_llama,
        *flags,
        "--output-dir",
        str(tmp_path / "run"),
        nproc=nproc,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved ") == 1 and run.stdout.count("optimality by generation beta") == 1, (
        "only rank 0 reports"
    )
    assert_same_math(single, tmp_path / "run", expected)


@pytest.mark.parametrize(
    "variant, layout, nproc",
    [
        (["--lora-rank", "2", "--lora-alpha", "2"], ["--zero-stage", "3"], 2),
        (["--num-layers-unfrozen", "1"], ["--tp", "2", "--pp", "2"], 4),
    ],
    ids=["lora-zero3", "unfrozen1-tp2xpp2"],
)
def test_lora_and_frozen_layers_under_parallelism_match_one_process(
    tmp_path, randomwalks_llama, one_process_run, variant, layout, nproc
):
    """LoRA under ZeRO-3 (frozen base and trained adapters sharded in separate units), and the
    bottom layer frozen under tensor x pipeline parallelism (a first stage with nothing to train,
    and the frozen flags set on the split layers): the saved LM and heads of one process. One run
    of tp2xpp2 serves both: freeze_bottom runs on the split LM whatever the layout, and the stage
    with nothing to train is the first one with or without --tp."""
    single, expected = one_process_run(*variant)
    run = run_ranks(
        "ilql.py",
        *DATA_PARALLEL_FLAGS,
        "--model",
        randomwalks_llama,
        *variant,
        *layout,
        "--output-dir",
        str(tmp_path / "run"),
        nproc=nproc,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_math(single, tmp_path / "run", expected)
    assert max_weight_difference(randomwalks_llama, tmp_path / "run") > 1e-3  # the LM did train


def test_data_parallel_resume_after_kill_is_bitwise_exact(tmp_path):
    """ZeRO-3 on 2 ranks with dropout on, the whole launcher killed after a checkpoint: the resumed
    run (each rank reloading its optimizer slice and RNG, rank 0's target heads) ends bitwise where
    an uninterrupted one does. 5 steps an epoch: the kill at step 4 leaves 6, across the epoch's end
    and a sync of the target heads (step 6)."""
    model = tiny_randomwalks_model(tmp_path / "model")
    flags = [
        "--model",
        model,
        "--num-epochs",
        "2",
        "--batch-size",
        "200",
        "--micro-batch-size",
        "50",
        "--save-every",
        "4",
        "--steps-for-target-sync",
        "3",
        "--eval-every",
        "100",
        "--eval-samples-per-start",
        "2",
        "--eval-betas",
        "1",
        "--zero-stage",
        "3",
    ]
    reference, killed = torchrun_kill_and_resume("ilql.py", flags, tmp_path, "step_00000004")
    for name in ("model.safetensors", ilql.HEADS_FILE):
        assert_same_weights(tmp_path / "reference", killed, name)
    assert read_metrics(killed) == read_metrics(tmp_path / "reference")
    with pytest.raises(SystemExit, match=r"written with --batch-size 200, which a resumed run cannot change"):
        ilql.main(tyro.cli(ilql.Args, args=[*flags, "--batch-size", "100", "--resume", str(killed)]))
