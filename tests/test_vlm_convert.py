"""training/vlm/convert.py: tiny checkpoints written in the original LLaVA layouts (LLaVA-Med
v0: LLaMA, linear projector, CLIP tower beside it, .bin weights; LLaVA-Med v1.5: Mistral, MLP
projector, tower inside, safetensors) are converted and loaded by transformers (weights,
text-only and image logits against the original computation) and by vLLM."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from tests.conftest import REPO
from training.vlm.convert import ConversionError, convert
from training.vlm.export import sha256_of

VLLM = REPO / ".venv-vllm" / "bin" / "python"
CORPUS = [
    "The optic disc is pink with a sharp margin and a cup-to-disc ratio of 0.3.",
    "Dot and blot haemorrhages and hard exudates near the macula suggest diabetic retinopathy.",
    "Arteries are narrower than veins; the fractal dimension of the vessel tree is measured.",
] * 4
VISION = CLIPVisionConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    image_size=28,
    patch_size=14,
)
TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 512,
}
QUESTION = "Is there diabetic retinopathy?"


@dataclass
class Original:
    """A source checkpoint and its parts, kept for the reference computation."""

    source: Path
    text: LlamaForCausalLM | MistralForCausalLM
    tower: CLIPVisionModel
    projector: torch.nn.Module
    select_layer: int
    keep_cls: bool
    tower_dir: Path | None


def _tokenizer(directory: Path, extra: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_tokens(extra, special_tokens=True)  # as LLaVA v0 added its image tokens
    tokenizer.save_pretrained(directory)
    return tokenizer


def _llava_med_v0(root: Path) -> Original:
    """LlavaLlamaForCausalLM as LLaVA-Med v0 saved it: the tower only named in the config."""
    source = root / "llava-med-v0"
    tokenizer = _tokenizer(source, ["<im_patch>", "<im_start>", "<im_end>"])
    torch.manual_seed(0)
    text_config = LlamaConfig(**TEXT, vocab_size=len(tokenizer))
    text = LlamaForCausalLM(text_config).eval()
    tower = CLIPVisionModel(VISION).eval()
    projector = torch.nn.Linear(VISION.hidden_size, TEXT["hidden_size"])
    tower_dir = root / "clip-vit"
    tower.save_pretrained(tower_dir)
    weights = {**text.state_dict()}
    weights |= {f"model.mm_projector.{n}": t for n, t in projector.state_dict().items()}
    for layer in range(TEXT["num_hidden_layers"]):  # saved by transformers 4.28
        weights[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
    torch.save(weights, source / "pytorch_model.bin")
    config = {
        **text_config.to_dict(),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 0,  # early LLaMA's ids, as in LLaVA v0 configs
        "eos_token_id": 1,
        "pad_token_id": -1,
        "max_sequence_length": 2048,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_hidden_size": VISION.hidden_size,
        "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2,
        "use_mm_proj": True,
        "sep_image_conv_front": False,
        "tune_mm_mlp_adapter": False,
    }
    (source / "config.json").write_text(json.dumps(config))
    return Original(source, text, tower, projector, -2, False, tower_dir)


def _llava_med_v15(root: Path) -> Original:
    """LlavaMistralForCausalLM as LLaVA-Med v1.5 saved it: MLP projector, tower inside."""
    source = root / "llava-med-v1.5"
    tokenizer = _tokenizer(source, [])
    torch.manual_seed(1)
    text_config = MistralConfig(
        **TEXT, num_key_value_heads=1, rope_theta=1e6, vocab_size=len(tokenizer)
    )
    text = MistralForCausalLM(text_config).eval()
    tower = CLIPVisionModel(VISION).eval()
    projector = torch.nn.Sequential(
        torch.nn.Linear(VISION.hidden_size, TEXT["hidden_size"]),
        torch.nn.GELU(),
        torch.nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"]),
    )
    weights = {**text.state_dict()}
    weights |= {f"model.mm_projector.{n}": t for n, t in projector.state_dict().items()}
    weights |= {
        f"model.vision_tower.vision_tower.vision_model.{n.removeprefix('vision_model.')}": t
        for n, t in tower.state_dict().items()
    }
    weights["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(
        5
    )[None]
    save_file({n: t.contiguous() for n, t in weights.items()}, source / "model.safetensors")
    config = {
        **text_config.to_dict(),
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": VISION.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "pad",
    }
    (source / "config.json").write_text(json.dumps(config))
    return Original(source, text, tower, projector, -1, True, None)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Original, Path]]:
    root = tmp_path_factory.mktemp("convert")
    result = {}
    for name, make in (("v0", _llava_med_v0), ("v1.5", _llava_med_v15)):
        original = make(root)
        output = root / f"{name}-hf"
        convert(original.source, output, original.tower_dir)
        result[name] = (original, output)
    return result


def _image() -> Image.Image:
    torch.manual_seed(2)
    return Image.fromarray((torch.rand(40, 36, 3) * 255).to(torch.uint8).numpy())


def _messages() -> list[dict[str, object]]:
    return [
        {"role": "system", "content": "You are RetinalGPT."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
    ]


def _reference_logits(
    original: Original, input_ids: torch.Tensor, pixels: torch.Tensor, image_id: int
) -> torch.Tensor:
    """The original LLaVA forward: projected CLIP features replace the image tokens' embeddings."""
    hidden = original.tower(pixels, output_hidden_states=True).hidden_states[original.select_layer]
    features = original.projector(hidden if original.keep_cls else hidden[:, 1:])
    is_image = input_ids == image_id
    embeds = original.text.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
    embeds[is_image] = features.reshape(-1, features.shape[-1])
    return original.text(inputs_embeds=embeds).logits


@pytest.mark.parametrize("name", ["v0", "v1.5"])
def test_every_original_weight_lands_unchanged(
    converted: dict[str, tuple[Original, Path]], name: str
) -> None:
    original, output = converted[name]
    saved = load_file(output / "model.safetensors")
    vocab = original.text.config.vocab_size
    for key, tensor in original.text.state_dict().items():
        new = (
            saved["language_model." + key]
            if key.startswith("model.")
            else saved["language_model.lm_head.weight"]
        )
        assert torch.equal(
            new[:vocab] if "embed_tokens" in key or "lm_head" in key else new, tensor
        ), key
    for key, tensor in original.tower.state_dict().items():
        assert torch.equal(
            saved[f"vision_tower.vision_model.{key.removeprefix('vision_model.')}"], tensor
        ), key
    projector = {k: v for k, v in saved.items() if k.startswith("multi_modal_projector.")}
    if name == "v1.5":
        assert torch.equal(
            projector["multi_modal_projector.linear_1.weight"], original.projector[0].weight
        )
        assert torch.equal(
            projector["multi_modal_projector.linear_2.bias"], original.projector[2].bias
        )
    else:  # relu(x) - relu(-x) = x: linear_1 = [I; -I; 0], linear_2 = [W, -W, 0] + b
        d = VISION.hidden_size
        w = original.projector.weight
        assert torch.equal(projector["multi_modal_projector.linear_1.weight"][:d], torch.eye(d))
        assert torch.equal(
            projector["multi_modal_projector.linear_1.weight"][d : 2 * d], -torch.eye(d)
        )
        assert torch.equal(projector["multi_modal_projector.linear_2.weight"][:, :d], w)
        assert torch.equal(projector["multi_modal_projector.linear_2.weight"][:, d : 2 * d], -w)
        assert torch.equal(
            projector["multi_modal_projector.linear_2.bias"], original.projector.bias
        )
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert "quantization_config" not in config


def test_v0_config_manifest_and_template(converted: dict[str, tuple[Original, Path]]) -> None:
    _, output = converted["v0"]
    processor = AutoProcessor.from_pretrained(output)
    tokenizer = processor.tokenizer
    config = json.loads((output / "config.json").read_text())
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    assert config["image_token_index"] == len(tokenizer) - 1  # added
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "relu"
    # the tokenizer's ids, not early LLaMA's (bos 0, eos 1, pad -1)
    assert config["text_config"]["eos_token_id"] == tokenizer.eos_token_id == 2
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    manifest = json.loads((output / "retinal_model.json").read_text())
    assert manifest["prompt_family"] == "retinalgpt_v0"
    assert manifest["training_data"] == "converted from LlavaLlamaForCausalLM"
    assert manifest["sha256"] == sha256_of(output / "model.safetensors")
    assert manifest["name"] == output.name and manifest["metrics"] == {}
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    assert prompt == (
        f"<s>You are RetinalGPT.###Human: <im_start><image><im_end>\n{QUESTION}###Assistant:"
    )
    assert processor.image_processor.crop_size == {"height": 28, "width": 28}


def test_v15_template_and_strategy(converted: dict[str, tuple[Original, Path]]) -> None:
    _, output = converted["v1.5"]
    processor = AutoProcessor.from_pretrained(output)
    config = json.loads((output / "config.json").read_text())
    assert config["text_config"]["model_type"] == "mistral"
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1e6
    assert config["vision_feature_select_strategy"] == "full"  # cls_patch
    assert config["projector_hidden_act"] == "gelu"
    manifest = json.loads((output / "retinal_model.json").read_text())
    assert manifest["prompt_family"] == "chat"
    messages = [
        *_messages(),
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Sure?"},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        f"<s>[INST] You are RetinalGPT.\n\n<image>\n{QUESTION} [/INST] No. </s>[INST] Sure? [/INST]"
    )


@pytest.mark.parametrize("name", ["v0", "v1.5"])
def test_logits_equal_the_original_computation(
    converted: dict[str, tuple[Original, Path]], name: str
) -> None:
    original, output = converted[name]
    model = LlavaForConditionalGeneration.from_pretrained(output, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(output)
    vocab = original.text.config.vocab_size
    with torch.no_grad():
        text_ids = processor.tokenizer(CORPUS[0], return_tensors="pt").input_ids
        expected = original.text(text_ids).logits
        assert torch.allclose(model(input_ids=text_ids).logits[..., :vocab], expected, atol=1e-5)

        prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
        inputs = processor(images=_image(), text=prompt, return_tensors="pt")
        image_id = model.config.image_token_index
        tokens = 5 if original.keep_cls else 4  # 2 x 2 patches (+ CLS with cls_patch)
        assert int((inputs.input_ids == image_id).sum()) == tokens
        logits = model(**inputs).logits[..., :vocab]
        reference = _reference_logits(original, inputs.input_ids, inputs.pixel_values, image_id)
    assert torch.allclose(logits, reference, atol=1e-5)


def test_refusals(tmp_path: Path, converted: dict[str, tuple[Original, Path]]) -> None:
    v0, _ = converted["v0"]
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert(v0.source, tmp_path / "no-tower")
    config = json.loads((v0.source / "config.json").read_text())
    bad = tmp_path / "mlp3x"
    bad.mkdir()
    for file in v0.source.iterdir():
        (bad / file.name).symlink_to(file)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**config, "mm_projector_type": "mlp3x_gelu"}))
    with pytest.raises(ConversionError, match="mlp3x_gelu"):
        convert(bad, tmp_path / "out", v0.tower_dir)
    # a linear projector from a tower wider than half the text model has no exact HF form
    wide = CLIPVisionConfig(**{**VISION.to_dict(), "hidden_size": 128, "num_attention_heads": 2})
    CLIPVisionModel(wide).save_pretrained(tmp_path / "wide-clip")
    weights = torch.load(v0.source / "pytorch_model.bin", weights_only=True)
    weights["model.mm_projector.weight"] = torch.zeros(TEXT["hidden_size"], 128)
    (bad / "pytorch_model.bin").unlink()
    torch.save(weights, bad / "pytorch_model.bin")
    (bad / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 128}))
    with pytest.raises(ConversionError, match=r"linear projector \(128 -> 128\)"):
        convert(bad, tmp_path / "out", tmp_path / "wide-clip")
    with pytest.raises(ConversionError, match="mm_hidden_size 128 but the vision tower is 64"):
        convert(bad, tmp_path / "out", v0.tower_dir)
    (bad / "config.json").write_text(json.dumps({**config, "mm_hidden_size": None}))
    with pytest.raises(ConversionError, match="projector takes 128-wide features"):
        convert(bad, tmp_path / "out", v0.tower_dir)


VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, url = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512,
              limit_mm_per_prompt={"image": 1})
    messages = [{"role": "system", "content": "You are RetinalGPT."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": sys.argv[3]}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    print("RESULT " + json.dumps({"prompt": out.prompt_token_ids,
                                  "tokens": list(out.outputs[0].token_ids)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not VLLM.exists(), reason="vLLM is not installed (.venv-vllm: make setup)")
def test_vllm_generates_with_an_image(
    tmp_path: Path, converted: dict[str, tuple[Original, Path]]
) -> None:
    """The v0 conversion (LLaMA, the ReLU form of the linear projector, <im_start>/<im_end>) in
    vLLM: the same prompt tokens and the same greedy tokens as transformers."""
    _, output = converted["v0"]
    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    script = tmp_path / "generate.py"
    script.write_text(VLLM_SCRIPT)
    run = subprocess.run(
        [str(VLLM), str(script), str(output), url, QUESTION],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))

    model = LlavaForConditionalGeneration.from_pretrained(output, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(output)
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    assert result["prompt"] == inputs.input_ids[0].tolist()
    ids = inputs.input_ids
    with torch.no_grad():  # greedy, whatever the token (vLLM ignores EOS)
        for _ in range(4):
            logits = model(input_ids=ids, pixel_values=inputs.pixel_values).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert result["tokens"] == ids[0, inputs.input_ids.shape[1] :].tolist()
