"""Convert an original LLaVA / LLaVA-Med checkpoint to the HF `LlavaForConditionalGeneration`
layout that transformers and vLLM load.

    python -m training.vlm.convert --input SRC_DIR --output DST_DIR [--vision-tower CLIP_DIR]

Sources (the original repositories' `save_pretrained` output; `.safetensors` or
`pytorch_model*.bin` files, the config's `architectures` decides):

- `LlavaLlamaForCausalLM`: LLaVA v0, LLaVA-Med v0 and the published RetinalGPT weights. LLaMA
  text model; conversations in the LLaVA v0 "simple" format (prompt family "retinalgpt_v0").
- `LlavaMistralForCausalLM`: LLaVA-Med v1.5. Mistral text model; Mistral's `[INST]` format as
  LLaVA's `mistral_instruct` conversation renders it (prompt family "chat"; a system message
  is put before the first user turn, as Mistral's template does).

The vision tower is either inside the checkpoint (`model.vision_tower.vision_tower.*`; its
CLIP config is read off the weights' shapes with OpenAI CLIP's conventions: 64-wide attention
heads, quick GELU) or only named by `mm_vision_tower`: then `--vision-tower` gives a local CLIP
folder (a `CLIPVisionModel` or `CLIPModel` checkpoint). Nothing is downloaded.

Projector (`mm_projector_type`; absent means LLaVA v0's single Linear):

- `mlp2x_gelu` (`mm_projector.0/2`): HF's projector as it is (`linear_1/2`, GELU).
- `linear` (v0, `mm_projector.weight/bias`: y = W x + b): HF's projector is always
  Linear(d_vision -> d_text), activation, Linear(d_text -> d_text), and neither transformers
  nor vLLM offers an activation both accept that is the identity. The converter writes the
  exact equivalent with ReLU, since relu(x) - relu(-x) = x:
  linear_1 = [I; -I; 0] (no bias), ReLU, linear_2 = [W, -W, 0] with bias b. Each output is
  the same sum of the same products W_ij x_j as before (the others are exact zeros), so it
  equals W x + b up to the summation order of the matrix product. It needs
  2 * d_vision <= d_text (CLIP ViT-L 1024 and LLaMA-7B 4096: yes); otherwise it is refused.
  The projector grows from d_text * d_vision to d_text * (d_vision + d_text) weights.

Other projector types (`mlp3x_gelu`, `identity`...) are refused.

Also: the `<image>` placeholder token is added to the tokenizer when missing (new embedding
rows are the mean of the others; the placeholder's embedding is never used, image features
replace it); the special token ids come from the tokenizer (LLaVA v0 configs carry early
LLaMA's bos 0 / eos 1 / pad -1); with `mm_use_im_start_end` the chat template wraps the image
in `<im_start>`/`<im_end>`, as LLaVA's prompts did; buffers that old checkpoints saved and
current models compute (`rotary_emb.inv_freq`, `embeddings.position_ids`) are dropped; any
other weight the mapping does not know is an error. The processor resizes the shortest side
to the tower's input size and centre-crops (CLIP's processing, LLaVA v0's); LLaVA-Med v1.5
was trained with `image_aspect_ratio: pad` (padding to a square with the mean colour), which
HF's LLaVA processor does not do: for fundus photographs (nearly square) the crop loses only
the corners outside the field of view.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerBase,
)

from services.analysis.engine.model_files import sha256_of
from services.language.prompting import PromptFamily
from training.vlm.assemble import IMAGE_TOKEN, MANIFEST
from training.vlm.export import WEIGHTS, save_for_vllm

IM_START, IM_END = "<im_start>", "<im_end>"
TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
# Buffers that checkpoints of older transformers versions saved; current models compute them.
OBSOLETE_BUFFERS = (".rotary_emb.inv_freq", ".embeddings.position_ids")
CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT (B/32, B/16, L/14, L/14-336)
# Config keys that are not the text model's own, or that the conversion sets itself.
NOT_TEXT_KEYS = {
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "id2label",
    "label2id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "vocab_size",
}
TEXT_MODELS: dict[str, tuple[type[LlamaConfig] | type[MistralConfig], PromptFamily]] = {
    "LlavaLlamaForCausalLM": (LlamaConfig, PromptFamily.RETINALGPT_V0),
    "LlavaMistralForCausalLM": (MistralConfig, PromptFamily.CHAT),
}


class ConversionError(ValueError):
    """The source checkpoint is not one this converter can map exactly."""


class OriginalLlava(BaseModel):
    """The multimodal part of an original LLaVA config (LLaVA's own defaults)."""

    model_config = ConfigDict(extra="ignore")

    architectures: list[Literal["LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"]] = Field(
        min_length=1, max_length=1
    )
    mm_vision_tower: str | None = None
    mm_hidden_size: int | None = None
    mm_projector_type: Literal["linear", "mlp2x_gelu"] = "linear"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: Literal["patch", "cls_patch"] = "patch"
    mm_use_im_start_end: bool = False


def read_weights(source: Path) -> dict[str, torch.Tensor]:
    files = sorted(source.glob("*.safetensors"))
    if files:
        return {name: t for file in files for name, t in load_file(file).items()}
    files = sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{source}: no *.safetensors or pytorch_model*.bin weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return weights


def _text_config(
    raw: dict[str, object],
    config_class: type[LlamaConfig] | type[MistralConfig],
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
) -> LlamaConfig | MistralConfig:
    known = (set(config_class().to_dict()) | {"rope_theta", "rope_scaling"}) - NOT_TEXT_KEYS
    return config_class(
        **{key: value for key, value in raw.items() if key in known},
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tower_config(tower: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """A CLIP vision config from the weights' shapes (OpenAI CLIP's conventions otherwise)."""
    patch = tower["embeddings.patch_embedding.weight"]
    positions = tower["embeddings.position_embedding.weight"].shape[0]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    layers = {m.group(1) for name in tower if (m := re.match(r"encoder\.layers\.(\d+)\.", name))}
    if hidden % CLIP_HEAD_DIM:
        raise ConversionError(
            f"vision tower width {hidden} is not a multiple of {CLIP_HEAD_DIM}: pass its CLIP "
            "folder with --vision-tower to give its configuration"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=tower["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        image_size=math.isqrt(positions - 1) * patch_size,
        patch_size=patch_size,
    )


def _vision_tower(
    weights: dict[str, torch.Tensor],
    vision_tower: Path | None,
    named: str | None,
    dtype: torch.dtype,
) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """The tower's config and its weights named as in CLIPVisionModel (`vision_model.` off)."""
    inside = {
        name.removeprefix(TOWER_PREFIX).removeprefix("vision_model."): weights[name]
        for name in weights
        if name.startswith(TOWER_PREFIX) and not name.endswith(OBSOLETE_BUFFERS)
    }
    if inside and vision_tower is not None:
        raise ConversionError("the checkpoint holds its vision tower: drop --vision-tower")
    if inside:
        return _tower_config(inside), inside
    if vision_tower is None:
        raise ConversionError(
            f"the checkpoint has no vision tower weights; its config names {named!r}: pass a "
            "local copy of that CLIP model with --vision-tower (nothing is downloaded)"
        )
    model = CLIPVisionModel.from_pretrained(vision_tower, dtype=dtype)
    tower = {name.removeprefix("vision_model."): t for name, t in model.state_dict().items()}
    return model.config, {n: t for n, t in tower.items() if not n.endswith(OBSOLETE_BUFFERS)}


def _projector(
    weights: dict[str, torch.Tensor], kind: str, vision_hidden: int, text_hidden: int
) -> tuple[dict[str, torch.Tensor], str]:
    """HF projector weights (`linear_1/2`) and activation; see the module docstring."""

    def get(name: str) -> torch.Tensor:
        if PROJECTOR_PREFIX + name not in weights:
            raise ConversionError(
                f"mm_projector_type {kind!r} but no {PROJECTOR_PREFIX}{name} in the weights"
            )
        return weights[PROJECTOR_PREFIX + name]

    first = get("0.weight" if kind == "mlp2x_gelu" else "weight")
    if first.shape[1] != vision_hidden:
        raise ConversionError(
            f"the projector takes {first.shape[1]}-wide features but the vision tower is "
            f"{vision_hidden} wide"
        )
    if kind == "mlp2x_gelu":
        names = ("weight", "bias")
        return {
            **{f"linear_1.{n}": get(f"0.{n}") for n in names},
            **{f"linear_2.{n}": get(f"2.{n}") for n in names},
        }, "gelu"
    w, b = first, get("bias")
    if 2 * vision_hidden > text_hidden:
        raise ConversionError(
            f"a linear projector ({vision_hidden} -> {text_hidden}) has no exact form in HF "
            f"LLaVA's two-layer projector unless 2 x {vision_hidden} <= {text_hidden}"
        )
    spare = text_hidden - 2 * vision_hidden
    eye = torch.eye(vision_hidden, dtype=w.dtype)
    return {
        "linear_1.weight": torch.cat([eye, -eye, w.new_zeros(spare, vision_hidden)]),
        "linear_1.bias": w.new_zeros(text_hidden),
        "linear_2.weight": torch.cat([w, -w, w.new_zeros(text_hidden, spare)], dim=1),
        "linear_2.bias": b,
    }, "relu"


def _resized(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` with rows appended up to `size`, each the mean of the original rows."""
    extra = size - rows.shape[0]
    if extra <= 0:
        return rows
    mean = rows.float().mean(0, keepdim=True).to(rows.dtype)
    return torch.cat([rows, mean.expand(extra, -1)])


def _content(image_part: str) -> str:
    """A message's content: a string, or parts (text, and images as `image_part`). Every role
    goes through the part loop, since vLLM hands a template whose loop it detects all
    contents as parts, a system message's too."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] in ['image', 'image_url'] %}" + image_part + "{% else %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


def v0_chat_template(image_part: str) -> str:
    """LLaVA v0's "simple" conversation: `system###Human: ...###Assistant: ...###`."""
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'Human: ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' }}{% endif %}"
        + _content(image_part)
        + "{{ '###' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


def mistral_chat_template(image_part: str) -> str:
    """LLaVA's `mistral_instruct` conversation: `[INST] user [/INST] answer </s>`...; a system
    message opens the first `[INST]`, followed by a blank line."""
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{% set after_system = loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' %}"
        "{% if message['role'] == 'system' or (message['role'] == 'user' and not after_system) %}"
        "{{ '[INST] ' }}{% elif message['role'] == 'assistant' %}{{ ' ' }}{% endif %}"
        + _content(image_part)
        + "{% if message['role'] == 'system' %}{{ '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ ' [/INST]' }}"
        "{% else %}{{ ' ' + eos_token }}{% endif %}{% endfor %}"
    )


def build(
    source: Path, vision_tower: Path | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, PromptFamily, str]:
    """The converted model (the source's weights and dtype, on CPU; buffers the model computes
    itself, such as rotary frequencies, are left unmaterialised: it is for saving, load the
    saved folder to run it), its processor, prompt family and the source architecture."""
    raw = json.loads((source / "config.json").read_text())
    try:
        original = OriginalLlava.model_validate(raw)
    except ValidationError as error:
        raise ConversionError(
            f"{source / 'config.json'}: not a supported LLaVA config\n{error}"
        ) from None
    architecture = original.architectures[0]
    config_class, family = TEXT_MODELS[architecture]
    weights = read_weights(source)
    if "model.embed_tokens.weight" not in weights:
        raise ConversionError(f"{source}: no model.embed_tokens.weight: not a LLaVA checkpoint")
    dtype = weights["model.embed_tokens.weight"].dtype

    tokenizer = AutoTokenizer.from_pretrained(source)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    image_part = IMAGE_TOKEN + "\n"
    if original.mm_use_im_start_end:
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            raise ConversionError(f"mm_use_im_start_end, but the tokenizer lacks {missing}")
        image_part = IM_START + IMAGE_TOKEN + IM_END + "\n"

    vision_config, tower = _vision_tower(weights, vision_tower, original.mm_vision_tower, dtype)
    if original.mm_hidden_size not in (None, vision_config.hidden_size):
        raise ConversionError(
            f"mm_hidden_size {original.mm_hidden_size} but the vision tower is "
            f"{vision_config.hidden_size} wide"
        )
    rows = max(weights["model.embed_tokens.weight"].shape[0], len(tokenizer))
    text_config = _text_config(raw, config_class, tokenizer, rows)
    projector, activation = _projector(
        weights, original.mm_projector_type, vision_config.hidden_size, text_config.hidden_size
    )
    strategy = "full" if original.mm_vision_select_feature == "cls_patch" else "default"
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid**2 + (1 if strategy == "full" else 0),
        vision_feature_layer=original.mm_vision_select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=activation,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    config.dtype = dtype

    state = {f"model.vision_tower.{name}": t for name, t in tower.items()}
    state |= {f"model.multi_modal_projector.{name}": t for name, t in projector.items()}
    unknown = []
    for name, tensor in weights.items():
        if name.startswith((TOWER_PREFIX, PROJECTOR_PREFIX)) or name.endswith(OBSOLETE_BUFFERS):
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = _resized(tensor, rows)
        if name == "lm_head.weight":
            state[name] = tensor
        elif name.startswith("model."):
            state["model.language_model." + name.removeprefix("model.")] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ConversionError(f"weights the conversion does not know: {unknown[:10]}")

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ConversionError(f"the weights do not fit the converted model: {error}") from None
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    template = (
        v0_chat_template(image_part)
        if family is PromptFamily.RETINALGPT_V0
        else mistral_chat_template(image_part)
    )
    size = vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    return model, processor, family, architecture


def convert(
    source: Path,
    output: Path,
    vision_tower: Path | None = None,
    name: str | None = None,
    version: str = "1.0.0",
) -> dict[str, object]:
    """Convert `source` into `output` and write its retinal_model.json; return the manifest."""
    model, processor, family, architecture = build(source, vision_tower)
    save_for_vllm(model, processor, output)
    manifest: dict[str, object] = {
        "name": name or output.name,
        "version": version,
        "task": "vision-language chat",
        "sha256": sha256_of(output / WEIGHTS),
        "training_data": f"converted from {architecture}",
        "prompt_family": str(family),
        "image_tokens": model.config.image_seq_length,
        "metrics": {},
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="original LLaVA checkpoint")
    parser.add_argument("--output", type=Path, required=True, help="HF LLaVA folder to write")
    parser.add_argument(
        "--vision-tower", type=Path, help="local CLIP folder, when the checkpoint lacks its tower"
    )
    parser.add_argument("--name", help="model name in retinal_model.json (default: folder name)")
    parser.add_argument("--version", default="1.0.0", help="model version in retinal_model.json")
    args = parser.parse_args()
    try:
        manifest = convert(args.input, args.output, args.vision_tower, args.name, args.version)
    except ConversionError as error:
        raise SystemExit(f"convert: {error}") from None
    print(json.dumps({k: manifest[k] for k in ("name", "version", "sha256", "prompt_family")}))


if __name__ == "__main__":
    main()
