"""The memory planner, benchmarks/plan.py: parameter counts against known
totals and against transformers models, per-GPU bytes against arithmetic written out by hand,
the choice of the best layout, and the command line. Nothing distributed, nothing on a GPU."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_benchmark

plan = load_benchmark("plan")

GB = 1e9
LLAMA_70B, NEOX_20B, LLAMA_8B = (plan.BUILTIN_SHAPES[name] for name in ("llama-2-70b", "gpt-neox-20b", "llama-3-8b"))


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------
def test_llama_2_70b_parameter_count():
    h, f, kv = 8192, 28672, 8 * 128  # 8 KV heads of head_dim 8192 / 64 = 128
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o = 150,994,944
    mlp = 3 * h * f  # gate, up, down = 704,643,072
    layer = attention + mlp + 2 * h  # two RMSNorm weights = 855,654,400
    total = 80 * layer + 2 * 32000 * h + h  # 80 layers, embedding and untied head, final norm
    assert total == 68_976_648_192
    assert plan.count_parameters(LLAMA_70B) == total
    assert round(total / 1e9, 2) == 68.98


def test_gpt_neox_20b_parameter_count():
    h, f = 6144, 24576
    attention = (h * 3 * h + 3 * h) + (h * h + h)  # fused qkv and dense, with biases = 151,019,520
    mlp = (h * f + f) + (f * h + h)  # = 302,020,608
    layer = attention + mlp + 2 * 2 * h  # two LayerNorms, weight and bias = 453,064,704
    total = 44 * layer + 2 * 50432 * h + 2 * h  # embed_in and embed_out (untied), final LayerNorm
    assert total == 20_554_567_680
    assert plan.count_parameters(NEOX_20B) == total
    assert round(total / 1e9, 2) == 20.55


def test_llama_3_8b_parameter_count():
    h, f, kv = 4096, 14336, 8 * 128
    layer = (2 * h * h + 2 * h * kv) + 3 * h * f + 2 * h  # 41,943,040 + 176,160,768 + 8,192 = 218,112,000
    total = 32 * layer + 2 * 128256 * h + h
    assert total == 8_030_261_248
    assert plan.count_parameters(LLAMA_8B) == total
    assert round(total / 1e9, 2) == 8.03


def tiny_configs():
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    return {
        "gpt2": GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "gpt2-n_inner": GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=48),
        "llama": LlamaConfig(
            vocab_size=400,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "llama-tied-biased": LlamaConfig(
            vocab_size=400,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
        "gpt-neox": GPTNeoXConfig(
            vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
    }


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_counts_equal_transformers_models_built_from_the_config(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tiny_configs()[name]
    config.save_pretrained(tmp_path)  # the planner reads the config.json, as for any local model
    shape = plan.load_shape(str(tmp_path))
    assert dataclasses.replace(plan.load_shape(str(tmp_path / "config.json")), name=shape.name) == shape
    lm = AutoModelForCausalLM.from_config(config)
    assert plan.count_parameters(shape) == sum(p.numel() for p in lm.parameters())
    # The reward model: the same trunk and a hidden -> 1 score head without bias, no LM head.
    config.num_labels = 1
    config.pad_token_id = 0
    scorer = AutoModelForSequenceClassification.from_config(config)
    assert plan.count_parameters(shape, head="score") == sum(p.numel() for p in scorer.parameters())
    # The pipeline stages together hold the model, plus the last stage's copy of a tied embedding.
    for pp in [n for n in (1, 2, 3) if shape.layers % n == 0]:
        stages = sum(sum(plan.stage_units(shape, 1, pp, stage)) for stage in range(pp))
        assert stages == plan.count_parameters(shape) + (400 * 32 if shape.tied and pp > 1 else 0)


def test_ilql_head_count_matches_the_heads_of_ilql_py():
    shape = plan.ModelShape("tiny", "gpt2", 32, 128, 2, 4, 4, 400, tied=True, positions=64)

    def make_head(hidden, out):  # ilql.make_head
        return torch.nn.Sequential(
            torch.nn.Linear(hidden, 2 * hidden), torch.nn.ReLU(), torch.nn.Linear(2 * hidden, out)
        )

    v_head, q_heads = make_head(32, 1), [make_head(32, 400) for _ in range(2)]
    trained = sum(p.numel() for m in [v_head, *q_heads] for p in m.parameters())
    targets = sum(p.numel() for m in q_heads for p in m.parameters())  # the target Q heads copy the Q heads
    assert plan.ilql_head_parameters(shape, n_q=2) == (trained, targets)


# ---------------------------------------------------------------------------------------------
# Bytes per GPU, by hand
# ---------------------------------------------------------------------------------------------
def test_llama_3_8b_sft_on_8_gpus_every_zero_stage_by_hand():
    P = 8_030_261_248
    # Activations (tp 1, pp 1, one micro-batch of 1 x 2048 tokens, h 4096, 32 heads):
    checkpoints = 32 * 2 * 2048 * 4096  # every layer's bf16 input = 536,870,912
    working = 2048 * 4096 * (34 + 5 * 32 * 2048 / 4096)  # Korthikanti at tp 1: 34sbh + 5as^2b = 956,301,312
    logits = (
        8 * 1024 * 16384 + 4 * 2048 * 4096
    )  # fused log-probs' fp32 block + its gradient, and the [T, h] accumulator
    activations = checkpoints + working + logits
    assert activations == 1_660_944_384
    unit = (
        128256 * 4096 + 4096
    )  # the largest ZeRO-3 unit: LM head and final norm (the embedding is 4096 less, a layer 218,112,000)
    expected = {  # zero: (params, grads, optimizer)
        0: (4 * P, 4 * P, 8 * P),  # 32.1 + 32.1 + 64.2 GB
        1: (4 * P, 4 * P, 8 * P / 8),  # optimizer / dp
        2: (4 * P, 4 * P / 8, 8 * P / 8),  # + gradients / dp
        3: (4 * P / 8 + 4 * unit, 4 * P / 8, 8 * P / 8),  # + params / dp, and one unit gathered
    }
    for zero, (params, grads, optimizer) in expected.items():
        m = plan.layout_memory("sft", LLAMA_8B, dp=8, tp=1, pp=1, zero=zero, seq_len=2048, micro_batch_size=1)
        assert (m.params, m.grads, m.optimizer, m.frozen, m.activations, m.kv_cache) == pytest.approx(
            (params, grads, optimizer, 0, activations, 0)
        )
        assert m.total == pytest.approx(params + grads + optimizer + activations)
    assert plan.layout_memory("sft", LLAMA_8B, 8, 1, 1, 2).total == pytest.approx(
        45_827_381_248
    )  # 4P + P/2 + P + activations


def test_llama_2_70b_sft_tensor_and_pipeline_parallel_by_hand():
    # dp 2 x tp 8 x pp 4 = 64 GPUs, ZeRO-1. A layer on one tp rank: its matrices / 8, its two norms whole.
    h = 8192
    layer = (150_994_944 + 704_643_072) // 8 + 2 * h  # 106,954,752 + 16,384 = 106,971,136
    stage0 = 20 * layer + 32000 // 8 * h  # 20 layers and the vocab-parallel embedding = 2,172,190,720
    stage3 = 20 * layer + h + 32000 // 8 * h  # 20 layers, final norm, vocab-parallel head = 2,172,198,912
    assert (stage0, stage3) == (2_172_190_720, 2_172_198_912)
    assert sum(plan.stage_units(LLAMA_70B, 8, 4, 0)) == stage0
    assert sum(plan.stage_units(LLAMA_70B, 8, 4, 3)) == stage3
    sbh = 2048 * 1 * h
    working = sbh * (10 + 24 / 8 + 5 * 64 * 2048 / (h * 8))  # Korthikanti, tp 8: sbh * 23 = 385,875,968
    first = 4 * 20 * 2 * sbh + working  # 1F1B: the first stage holds pp = 4 micro-batches' checkpoints
    last = (
        1 * 20 * 2 * sbh + working + 8 * 1024 * 4000 + 4 * 2048 * h
    )  # one in flight; logits block over 32000 / 8 entries
    assert (first, last) == (3_070_230_528, 1_156_841_472)
    options = dict(seq_len=2048, micro_batch_size=1)
    m0 = plan.stage_memory("sft", LLAMA_70B, 2, 8, 4, 1, stage=0, **options)
    m3 = plan.stage_memory("sft", LLAMA_70B, 2, 8, 4, 1, stage=3, **options)
    assert (m0.params, m0.grads, m0.optimizer, m0.activations) == pytest.approx(
        (4 * stage0, 4 * stage0, 8 * stage0 / 2, first)
    )
    assert (m3.params, m3.grads, m3.optimizer, m3.activations) == pytest.approx(
        (4 * stage3, 4 * stage3, 8 * stage3 / 2, last)
    )
    # Saving streams one tensor at a time: the largest (the 32000 x 8192 head) all-gathered over tp (its parts and
    # the assembled copy) and received from another stage (once more), 3.1 GB in fp32, more than the last stage's
    # activations.
    saving = 4 * 32000 * h * 3
    assert (m0.saving, m3.saving) == pytest.approx((saving, saving))
    worst = plan.layout_memory("sft", LLAMA_70B, 2, 8, 4, 1, **options)
    assert worst.stage == 3 and worst.total == pytest.approx(12 * stage3 + saving)  # 29.2 GB


def test_ppo_by_hand():
    # Llama-3-8B PPO with a value head, reward model of the same shape, dp 8, ZeRO-3, tp 1, pp 1.
    P = 8_030_261_248
    trained = P + 4096 + 1  # policy and value head (hidden -> 1 with bias)
    frozen = 2 * (P + (P - 128256 * 4096 + 4096)) / 8  # bf16 reference, and reward model (score head for LM head), / dp
    kv = (
        2 * 2 * 64 * 2048 * 32 * 8 * 128
    )  # K and V, bf16, 64 rollouts x 2048 tokens x 32 layers x 8 KV heads x 128 = 17.2 GB
    gathered = (4 * trained + 8 * frozen) * 7 / 8  # ppo.py gathers the models whole for the rollout under ZeRO-3
    m = plan.layout_memory(
        "ppo", LLAMA_8B, 8, 1, 1, 3, seq_len=2048, micro_batch_size=1, rollout_batch_size=64, value="head"
    )
    assert (m.params, m.grads, m.optimizer) == pytest.approx(
        (4 * trained / 8 + 4 * (128256 * 4096 + 4096), 4 * trained / 8, 8 * trained / 8)
    )
    assert (m.frozen, m.kv_cache, m.gathered) == pytest.approx((frozen, kv, gathered))
    assert m.activations == pytest.approx(1_660_944_384)  # the policy's, as for sft
    assert m.total == pytest.approx(m.params + m.grads + m.optimizer + m.frozen + max(m.activations, kv + gathered))
    # A separate critic doubles the trained trunk and the activations; without the whole-model gather nothing is
    # gathered.
    critic = plan.layout_memory("ppo", LLAMA_8B, 8, 1, 1, 3, value="critic", rollout_gather=False)
    assert critic.grads == pytest.approx(4 * (P + (P - 128256 * 4096 + 4096 + 1)) / 8)
    assert critic.activations == pytest.approx(1_660_944_384 + 536_870_912 + 956_301_312) and critic.gathered == 0
    # Under pp 2 (tp 2, dp 1, ZeRO 0) the rollout generates with a bf16 whole-depth copy of the
    # policy still split over tp (embedding and untied head vocab-split, norms whole), and the KV
    # cache of all 32 layers and the tp rank's 4 KV heads.
    piped = plan.layout_memory(
        "ppo", LLAMA_8B, 1, 2, 2, 0, seq_len=2048, micro_batch_size=1, rollout_batch_size=64, value="head"
    )
    matrices = (
        32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) / 2
    )  # q, o, k, v and the MLP of 32 layers, over tp
    norms = 32 * 2 * 4096 + 4096
    assert piped.gathered == pytest.approx(2 * (matrices + norms + 2 * 128256 * 4096 / 2))
    assert piped.kv_cache == pytest.approx(kv / 2)
    assert plan.layout_memory("ppo", LLAMA_8B, 1, 2, 2, 0, rollout_gather=False).gathered == 0


# ---------------------------------------------------------------------------------------------
# Layouts and the best one
# ---------------------------------------------------------------------------------------------
def test_layouts_follow_the_rules():
    found = plan.layouts(64, [LLAMA_70B])
    assert all(dp * tp * pp == 64 for dp, tp, pp, _ in found)
    assert {tp for _, tp, _, _ in found} == {1, 2, 4, 8}  # divides 64 heads and 8 KV heads, within a node
    assert {pp for _, _, pp, _ in found} == {1, 2, 4, 8, 16}  # divides 80 layers and 64 / tp
    assert all(pp == 1 for _, _, pp, zero in found if zero == 3)
    assert all(zero == 0 for dp, _, _, zero in found if dp == 1)
    assert (8, 8, 1, 3) in found and (1, 8, 8, 0) in found and (2, 8, 4, 2) in found
    assert all(
        tp in (1, 2)
        for _, tp, _, _ in plan.layouts(8, [NEOX_20B, plan.ModelShape("x", "llama", 64, 64, 4, 6, 2, 10, False)])
    )


def test_best_layout_prefers_fewest_stages_then_smallest_tp_then_lowest_zero():
    rows = plan.plan("sft", LLAMA_8B, 8, seq_len=2048, micro_batch_size=1)
    assert rows == sorted(rows, key=lambda m: m.total)
    by_layout = {(m.dp, m.tp, m.pp, m.zero): m for m in rows}
    # On 8 x 80 GB (72 GB usable): dp 8 ZeRO-1 misses (9P + activations = 73.9 GB), ZeRO-2 fits (45.8 GB);
    # dp 4 x tp 2 ZeRO-0 fits too (65.5 GB) but tp 2 loses to tp 1.
    assert by_layout[(8, 1, 1, 1)].total / GB == pytest.approx(73.9, abs=0.05)
    assert by_layout[(4, 2, 1, 0)].total < 72 * GB
    best = plan.best_layout(rows, 80)
    assert (best.dp, best.tp, best.pp, best.zero) == (8, 1, 1, 2)
    # With no margin ZeRO-1 fits in 80 GB, and the lower stage wins.
    best = plan.best_layout(rows, 80, margin=0.0)
    assert (best.dp, best.tp, best.pp, best.zero) == (8, 1, 1, 1)
    assert plan.best_layout(rows, 10) is None
    # Fewest pipeline stages before smallest tp, lowest ZeRO stage before least memory: PPO (value
    # head) on Llama-2-70B over 64 GPUs fits at pp 2 (tp 8, ZeRO-2 only: 70.0 GB), pp 4 (tp 8, any
    # ZeRO stage), pp 8 and pp 16; pp 2 wins. With a separate critic only pp 8 fits (62.3 GB).
    rows = plan.plan("ppo", LLAMA_70B, 64)
    fitting = {(m.dp, m.tp, m.pp, m.zero) for m in rows if m.total <= 72 * GB}
    assert fitting == {(4, 8, 2, 2), (2, 8, 4, 0), (2, 8, 4, 1), (2, 8, 4, 2), (1, 8, 8, 0), (1, 4, 16, 0)}
    best = plan.best_layout(rows, 80)
    assert (best.dp, best.tp, best.pp, best.zero) == (4, 8, 2, 2)
    rows = plan.plan("ppo", LLAMA_70B, 64, value="critic")
    assert {(m.dp, m.tp, m.pp, m.zero) for m in rows if m.total <= 72 * GB} == {(1, 8, 8, 0)}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def plan_cli(*argv):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "plan.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_a_table_and_the_best_layout(tmp_path):
    result = plan_cli(
        "--model",
        "llama-3-8b",
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--algorithm",
        "sft",
        "--seq-len",
        "2048",
        "--micro-batch-size",
        "1",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.split()[:4] == ["dp", "tp", "pp", "zero"])
    assert "total" in header and "fits" in header
    rows = lines[lines.index(header) + 1 : -1]
    assert len(rows) == len(plan.layouts(8, [LLAMA_8B]))
    totals = [float(row.split()[-2]) for row in rows]
    assert totals == sorted(totals)
    assert lines[-1].startswith("best on 8 GPUs: dp 8 tp 1 pp 1 zero 2, 45.8 GB")
    # PPO, several GPU counts, a config.json for the reward model.
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
            }
        )
    )
    result = plan_cli(
        "--model", "llama-2-70b", "--gpus", "24", "64", "--algorithm", "ppo", "--reward-model", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    best = [line for line in result.stdout.splitlines() if line.startswith("best on")]
    assert best[0].startswith("best on 24 GPUs: none fits") and best[1].startswith("best on 64 GPUs: dp ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llama-9-1t", "--gpus", "8"], "neither a built-in shape"),
        (["--model", "/no/such/dir", "--gpus", "8"], "neither a built-in shape"),
        (["--model", "EMPTY", "--gpus", "8"], "no 'hidden_size'"),
        (["--model", "llama-3-8b", "--gpus", "0"], "--gpus must be positive"),
    ],
)
def test_cli_bad_input_is_one_error_line(argv, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    result = plan_cli(*[str(tmp_path) if a == "EMPTY" else a for a in argv])
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        len(result.stderr.strip().splitlines()) == 1
        and result.stderr.startswith("error: ")
        and message in result.stderr
    )


def test_ilql_heads_are_whole_on_every_tensor_parallel_rank():
    """ilql.py keeps its V, Q and target Q heads whole under --tp: splitting the model over 2 ranks
    halves the LM's share but not the heads' (the target heads are the frozen bytes)."""
    shape = plan.load_shape("llama-3-8b")
    _, targets = plan.ilql_head_parameters(shape, n_q=2)
    one, two = (plan.stage_memory("ilql", shape, dp=1, tp=tp, pp=1, zero=0, stage=0) for tp in (1, 2))
    assert one.frozen == two.frozen == 4 * targets
