"""Two-stage tuning of a LLaVA-family model on the pipeline's conversations.

    python -m training.vlm.tune --stage 1 --data var/vlm/data/train_alignment.jsonl \
        --out var/vlm/runs/stage1 --time-limit-min 10
    python -m training.vlm.tune --stage 2 --data var/vlm/data/train_instruction.jsonl \
        --init var/vlm/runs/stage1 --out var/vlm/runs/stage2 --time-limit-min 40

Stage 1 (alignment) trains the projector and, for the mini model, the vision tower; the
language model is frozen, and the prompt holds the instructions but not the findings (the image
alone must say what the answer says). Stage 2 (instruction) adds LoRA adapters (peft) to the
language model's linear layers and keeps training the projector. Each example is rendered
exactly as the language service renders a conversation (findings description in the system
message, the image in the first user turn, the model's chat template); only the assistant's
tokens count in the loss. A checkpoint of the trainable weights, the optimiser and the data
order is written every --save-every steps and at the end; --resume continues from it. Losses go
to <out>/log.jsonl. GPU runs use bfloat16 autocast, CPU runs fp32 unless --bf16; the same
command serves both (--device)."""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from services.analysis.engine.runtime import cpu_has_bf16, pick_device
from services.language.facts import facts_from_findings
from services.language.prompting import build_messages, describe
from shared import findings as F
from training.recording import REPO, shown

DEFAULT_MODEL = REPO / "var/models/retinalgpt-mini"
IGNORE = -100
LORA_MODULES = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TRAINABLE = "trainable.safetensors"
STATE = "state.pt"


@dataclass(frozen=True)
class Example:
    image: Path
    messages: list[dict[str, Any]]  # system + alternating user/assistant, image in turn one


def read_examples(paths: list[Path], with_findings: bool) -> list[Example]:
    """LLaVA JSONL with our `findings` -> the messages the service would build.

    Without findings (stage 1) the system message is the instructions alone: the tower and
    projector learn to say what the image shows from its pixels, in a short context.
    """
    examples = []
    records = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    for record in records:
        result = F.Findings.model_validate(record["findings"])
        turns = [
            (
                "user" if turn["from"] == "human" else "assistant",
                turn["value"].replace("<image>\n", "").replace("<image>", ""),
            )
            for turn in record["conversations"]
        ]
        description = describe(result, *facts_from_findings(result)) if with_findings else None
        examples.append(Example(Path(record["image"]), build_messages(description, turns, True)))
    return examples


class Encoder:
    """Tokens, loss labels (assistant turns only) and pixels of an example; images cached.

    Token ids are the processor's: the chat template's text, tokenized without added special
    tokens, with the image placeholder expanded to the model's image tokens.
    """

    def __init__(self, processor: Any, image_token_id: int, image_tokens: int) -> None:
        self.processor = processor
        self._image_token_id = image_token_id
        self._image_tokens = image_tokens
        self._pixels: dict[Path, torch.Tensor] = {}

    def _image(self, path: Path) -> torch.Tensor:
        if path not in self._pixels:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            self._pixels[path] = self.processor.image_processor(rgb, return_tensors="pt")[
                "pixel_values"
            ][0]
        return self._pixels[path]

    def _ids(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        ids: list[int] = []
        for token in self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids += [token] * (self._image_tokens if token == self._image_token_id else 1)
        return ids

    def encode(self, example: Example) -> dict[str, torch.Tensor]:
        ids = self._ids(example.messages, False)
        labels = [IGNORE] * len(ids)
        for end in range(1, len(example.messages)):
            if example.messages[end]["role"] != "assistant":
                continue
            start = len(self._ids(example.messages[:end], True))
            stop = len(self._ids(example.messages[: end + 1], False))
            labels[start:stop] = ids[start:stop]
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": self._image(example.image),
        }


def collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(i["input_ids"]) for i in items)
    input_ids = torch.full((len(items), length), pad_id)
    labels = torch.full((len(items), length), IGNORE)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n], labels[row, :n], attention[row, :n] = (
            item["input_ids"],
            item["labels"],
            1,
        )
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
    }


def lora_targets(layers: int, top: int) -> str:
    """The linear layers of the top `top` decoder layers (all when `top` >= `layers`): on a
    CPU, backpropagation then stops there instead of crossing the whole model."""
    first = max(0, layers - top)
    numbers = "|".join(str(i) for i in range(first, layers))
    return rf".*language_model\.layers\.({numbers})\..*{LORA_MODULES}"


def prepare_model(
    model: LlavaForConditionalGeneration, stage: int, lora_rank: int, lora_layers: int
) -> Any:
    layers = model.config.text_config.num_hidden_layers
    for parameter in model.parameters():
        parameter.requires_grad = False
    for parameter in model.model.multi_modal_projector.parameters():
        parameter.requires_grad = True
    if stage == 1:
        for parameter in model.model.vision_tower.parameters():
            parameter.requires_grad = True
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_dropout=0.0,
        target_modules=lora_targets(layers, lora_layers),
    )
    peft_model = get_peft_model(model, config)
    # The projector's gradient crosses every layer: trained on only when the LoRA does too.
    for parameter in peft_model.base_model.model.model.multi_modal_projector.parameters():
        parameter.requires_grad = lora_layers >= layers
    return peft_model


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the assistant's tokens, with the vocabulary projection run
    only where a label follows: over a 1,500-token prompt and a 49k vocabulary, projecting
    every position costs about a fifth of the forward pass for nothing."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # the positions whose next token is labelled, shared by the batch's rows
    positions = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=positions).logits
    targets = labels[:, positions + 1]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    model_config = model.config
    if args.init is not None:  # the previous stage's trained weights
        model.load_state_dict(load_file(args.init / TRAINABLE), strict=False)
    model = prepare_model(model, args.stage, args.lora_rank, args.lora_layers).to(device)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    examples = read_examples(args.data, with_findings=args.stage == 2)
    encoder = Encoder(processor, model_config.image_token_index, model_config.image_seq_length)
    pad_id = processor.tokenizer.pad_token_id or 0
    args.out.mkdir(parents=True, exist_ok=True)
    step, order, elapsed_before = 0, list(range(len(examples))), 0.0
    random.Random(args.seed).shuffle(order)
    if args.resume and (args.out / STATE).is_file():
        state = torch.load(args.out / STATE, weights_only=False)
        model.load_state_dict(load_file(args.out / TRAINABLE), strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, order, elapsed_before = state["step"], state["order"], state["elapsed_s"]
    # bf16 autocast is opt-in on a CPU (--bf16): it pays only with bf16 units (AMX here).
    autocast = device.type == "cuda" or (args.bf16 and cpu_has_bf16())
    started = time.monotonic()
    log = (args.out / "log.jsonl").open("a")

    def save() -> None:
        save_file(trainable_state(model), args.out / TRAINABLE)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "step": step,
                "order": order,
                "elapsed_s": elapsed_before + time.monotonic() - started,
                "args": {key: shown(value) for key, value in vars(args).items()},
            },
            args.out / STATE,
        )

    while step < args.steps:
        elapsed = elapsed_before + time.monotonic() - started
        if args.time_limit_min and elapsed > args.time_limit_min * 60:
            break
        progress = max(
            step / args.steps, elapsed / (args.time_limit_min * 60) if args.time_limit_min else 0.0
        )
        warmup = min(1.0, (step + 1) / 10)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        batch_ids = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        batch = collate([encoder.encode(examples[i]) for i in batch_ids], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {
            "step": step,
            "loss": round(loss.item(), 4),
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": round(elapsed_before + time.monotonic() - started, 1),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)
        if step % args.save_every == 0:
            save()
    save()
    log.close()
    return {"steps": step, "elapsed_s": round(elapsed_before + time.monotonic() - started, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="LLaVA JSONL files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--init", type=Path, default=None, help="stage 1's run folder")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--time-limit-min", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-layers", type=int, default=1000, help="top decoder layers")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on a CPU")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    return parser.parse_args(argv)


def main() -> None:
    print(json.dumps(train(parse_args())))


if __name__ == "__main__":
    main()
