"""RetinalGPT-mini's trained parts: small enough to commit, merged by the assembly.

    python -m training.vlm.parts --stage1 var/vlm/runs/stage1 --stage2 var/vlm/runs/stage2 \
        --metrics bench/results/vlm_eval_tuned.json

writes `training/vlm/weights/retinalgpt-mini-parts.safetensors` (fp16: the vision tower and
projector, the LoRA matrices of the language model) and its manifest (data, recipe, wall
times, metrics, sha256). `merge_parts` applies them to an assembled model: tower and projector
replaced, each LoRA pair merged into its linear layer (W += alpha/r * B @ A).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.analysis.engine.model_files import sha256_of

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PARTS = WEIGHTS_DIR / "retinalgpt-mini-parts.safetensors"
MANIFEST = WEIGHTS_DIR / "retinalgpt-mini-parts.json"
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.default\.weight$")


def _plain(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")


def collect(stage1: Path, stage2: Path) -> dict[str, torch.Tensor]:
    """Stage 1's tower and projector, then stage 2's projector and LoRA (stage 2 wins)."""
    parts = {_plain(n): t for n, t in load_file(stage1 / "trainable.safetensors").items()}
    parts.update({_plain(n): t for n, t in load_file(stage2 / "trainable.safetensors").items()})
    return {name: tensor.to(torch.float16).contiguous() for name, tensor in parts.items()}


def merge_parts(model: Any, parts: dict[str, torch.Tensor], lora_scale: float) -> None:
    """Load the trained parts into an assembled LlavaForConditionalGeneration, in place."""
    state = model.state_dict()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, tensor in parts.items():
            found = _LORA.match(name)
            if found:
                pairs.setdefault(found["module"], {})[found["side"]] = tensor.float()
            elif name in state:
                state[name].copy_(tensor.float())
            else:
                raise KeyError(f"trained part {name} has no place in the model")
        for module, pair in pairs.items():
            state[f"{module}.weight"].add_(lora_scale * (pair["B"] @ pair["A"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", type=Path, required=True)
    parser.add_argument("--stage2", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, nargs="*", default=[])
    parser.add_argument("--data-stats", type=Path, default=Path("var/vlm/data/stats.json"))
    args = parser.parse_args()
    parts = collect(args.stage1, args.stage2)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    save_file(parts, PARTS, metadata={"format": "pt"})
    runs = {}
    for stage, folder in (("stage1", args.stage1), ("stage2", args.stage2)):
        state = torch.load(folder / "state.pt", weights_only=False)
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        runs[stage] = {
            "args": state["args"],
            "steps": state["step"],
            "wall_s": round(state["elapsed_s"], 1),
            "loss_first10_mean": round(sum(r["loss"] for r in log[:10]) / min(10, len(log)), 4),
            "loss_last10_mean": round(sum(r["loss"] for r in log[-10:]) / min(10, len(log)), 4),
        }
    lora_rank = int(runs["stage2"]["args"]["lora_rank"])
    manifest = {
        "name": "retinalgpt-mini-parts",
        "version": "1.0.0",
        "sha256": sha256_of(PARTS),
        "task": "vision-language chat (trained parts of RetinalGPT-mini)",
        "contents": "vision tower + projector (stage 1; stage 2 trains the projector only when its "
        "LoRA covers every layer) and LoRA of the linear layers of the top "
        f"{runs['stage2']['args']['lora_layers']} language-model layers (stage 2), fp16",
        "lora": {"rank": lora_rank, "alpha": 2 * lora_rank},
        "training_data": json.loads(args.data_stats.read_text())
        if args.data_stats.is_file()
        else {},
        "recipe": runs,
        "metrics": {path.stem: json.loads(path.read_text())["scores"] for path in args.metrics},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        json.dumps(
            {
                "sha256": manifest["sha256"],
                "tensors": len(parts),
                "mb": round(PARTS.stat().st_size / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
