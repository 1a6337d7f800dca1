"""The VLM data pipeline, the tuning loop and the trained parts, without the datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.language.facts import facts_from_findings
from services.language.prompting import describe
from tests.findings_examples import example_findings
from training.vlm import conversations, data
from training.vlm.records import LabeledImage

MINI = Path(__file__).resolve().parents[1] / "var/models/retinalgpt-mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason="RetinalGPT-mini not assembled")


def _image(tmp_path: Path, name: str) -> LabeledImage:
    path = tmp_path / f"{name}.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path)
    return LabeledImage("TEST", name, path, {"diagnosis": "none"})


def images_with_findings(
    tmp_path: Path, count: int
) -> tuple[list[LabeledImage], data.FindingsCache]:
    """`count` images and a findings cache holding, for each, the example findings (as the
    engines would have cached them)."""
    images = [_image(tmp_path, f"img{i}") for i in range(count)]
    cache = data.FindingsCache(tmp_path / "cache")
    for image in images:
        target = cache.folder / image.dataset / f"{image.image_id}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(example_findings().model_dump_json(exclude_none=True))
    return images, cache


def test_conversations_are_seeded_varied_and_state_measured_values() -> None:
    result = example_findings()
    image = LabeledImage("TEST", "a", Path("a.png"))
    first = conversations.instruction(random.Random(1), result, image)
    assert first == conversations.instruction(random.Random(1), result, image)
    phrasings = set()
    for seed in range(40):
        turns = conversations.instruction(random.Random(seed), result, image)
        assert 3 <= len(turns) <= 6
        assert any(t.fact_key for t in turns)
        phrasings.update(t.question for t in turns)
        facts = {f.key: f for f in facts_from_findings(result)[0]}
        for turn in turns:
            if turn.fact_key:
                assert facts[turn.fact_key].text in turn.answer
    assert len(phrasings) > 30
    record = conversations.to_llava("x", image, first, result)
    assert record["conversations"][0]["value"].startswith("<image>\n")  # type: ignore[index]
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * len(first)  # type: ignore[union-attr]


def test_values_track_asks_many_measured_values_and_one_never_measured() -> None:
    result = example_findings()
    facts = {f.key: f for f in facts_from_findings(result)[0]}
    for seed in range(20):
        turns = conversations.values(random.Random(seed), result, 8)
        assert len(turns) == 8
        assert [t.kind for t in turns].count("not_measured") == 1
        asked = [t.fact_key for t in turns if t.fact_key]
        assert len(asked) == 7 == len(set(asked))
        for turn in turns:
            if turn.fact_key:
                assert facts[turn.fact_key].spoken in turn.question
                assert facts[turn.fact_key].text in turn.answer
            else:
                assert not any(ch.isdigit() for ch in turn.answer)


def test_the_prompt_names_each_vessel_value_as_a_question_does() -> None:
    result = example_findings()
    facts, boxes = facts_from_findings(result)
    lines = describe(result, facts, boxes).splitlines()
    for fact in conversations.askable_facts(result):
        if fact.key.startswith("vessels."):
            assert f"{fact.spoken}: {fact.text}" in lines


def test_build_writes_llava_jsonl_splits_and_stats(tmp_path: Path) -> None:
    images, cache = images_with_findings(tmp_path, 12)
    stats = data.build(
        images, cache, tmp_path / "out", seed=0, instruction_per_image=2, values_per_image=1
    )
    splits = {data.split_of(image) for image in images}
    assert stats["instruction_conversations"] == 24
    assert stats["values_conversations"] == 12
    for split in splits:
        for track in ("alignment", "instruction", "values"):
            lines = (tmp_path / "out" / f"{split}_{track}.jsonl").read_text().splitlines()
            record = json.loads(lines[0])
            assert {"id", "image", "conversations", "findings", "labels"} <= set(record)
    heldout = {
        json.loads(line)["image"]
        for line in (tmp_path / "out" / "heldout_instruction.jsonl").read_text().splitlines()
    }
    train = {
        json.loads(line)["image"]
        for line in (tmp_path / "out" / "train_instruction.jsonl").read_text().splitlines()
    }
    assert not heldout & train  # held out by image


@needs_mini
def test_only_the_assistant_turns_count_in_the_loss(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from training.vlm.tune import IGNORE, Encoder, read_examples

    image = _image(tmp_path, "x")
    turns = conversations.instruction(random.Random(0), example_findings(), image)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(conversations.to_llava("x", image, turns, example_findings())))
    processor = AutoProcessor.from_pretrained(MINI)
    encoded = Encoder(processor, 49152, 49).encode(read_examples([path], with_findings=True)[0])
    labels = encoded["labels"]
    taught = processor.tokenizer.decode(labels[labels != IGNORE])
    assert taught == "".join(f"{t.answer}<|im_end|>\n" for t in turns)
    assert int((encoded["input_ids"] == 49152).sum()) == 49


@needs_mini
def test_a_run_resumes_and_its_parts_merge_into_the_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    from training.vlm import tune
    from training.vlm.parts import collect, merge_parts

    image = _image(tmp_path, "x")
    lines = [
        json.dumps(
            conversations.to_llava(
                f"x{i}",
                image,
                conversations.instruction(random.Random(i), example_findings(), image),
                example_findings(),
            )
        )
        for i in range(3)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    common = ["--data", str(tmp_path / "d.jsonl"), "--batch", "1", "--lora-layers", "2"]
    tune.train(
        tune.parse_args(["--stage", "2", "--out", str(tmp_path / "s2"), "--steps", "1", *common])
    )
    # an interrupted run continues where it stopped: step 2 follows step 1
    result = tune.train(
        tune.parse_args(
            ["--stage", "2", "--out", str(tmp_path / "s2"), "--steps", "2", "--resume", *common]
        )
    )
    assert result["steps"] == 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "s2/log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    trained = load_file(tmp_path / "s2/trainable.safetensors")
    assert trained and all("layers.28." in n or "layers.29." in n for n in trained)

    # merging the LoRA gives the adapted model's outputs
    (tmp_path / "s1").mkdir()
    save_file({}, tmp_path / "s1/trainable.safetensors")  # an empty stage 1
    parts = collect(tmp_path / "s1", tmp_path / "s2")
    for name in parts:  # make the B matrices count (they start at zero)
        if ".lora_B." in name:
            parts[name] = torch.full_like(parts[name], 0.01)
    model = LlavaForConditionalGeneration.from_pretrained(MINI, dtype=torch.float32)
    reference = LlavaForConditionalGeneration.from_pretrained(MINI, dtype=torch.float32)
    merge_parts(model, parts, lora_scale=2.0)
    ids = torch.tensor([[1, 4093, 198, 22, 23, 24]])
    with torch.no_grad():
        changed = model(input_ids=ids).logits
        original = reference(input_ids=ids).logits
        layer = reference.model.language_model.layers[29].mlp.down_proj
        a = parts["model.language_model.layers.29.mlp.down_proj.lora_A.default.weight"].float()
        b = parts["model.language_model.layers.29.mlp.down_proj.lora_B.default.weight"].float()
        layer.weight += 2.0 * b @ a
    assert not torch.allclose(changed, original)
    merged = model.model.language_model.layers[29].mlp.down_proj.weight
    assert torch.allclose(merged, layer.weight)


@pytest.mark.parametrize(
    ("answer", "yes"),
    [
        ("The DR grade estimate is 2 (ICDR), referable.", True),
        ("The DR grade estimate is 0 (ICDR), not referable.", False),
        ("There are no signs of diabetic retinopathy.", False),
        ("Yes: microaneurysms were found.", True),
        ("No lesions were found among the types assessed.", False),
        ("The eye is a glaucoma suspect by its vertical cup-to-disc ratio.", True),
        ("The vertical cup-to-disc ratio does not suggest glaucoma.", False),
    ],
)
def test_screening_answers_are_read_with_their_negations(answer: str, yes: bool) -> None:
    from training.vlm.evaluate import says_yes

    assert says_yes(answer) is yes
