"""Save a LLaVA checkpoint in the layout vLLM's LLaVA loader reads.

transformers 5 writes the vision tower as `vision_tower.*`; vLLM expects
`vision_tower.vision_model.*`. A config loaded from GGUF keeps a `quantization_config` that
vLLM rejects. The processor (with its chat template) is saved beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from services.analysis.engine.model_files import sha256_of

WEIGHTS = "model.safetensors"


def _vllm_name(name: str) -> str:
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def save_for_vllm(model: Any, processor: Any, output: Path) -> str:
    """Write weights, config, processor and chat template; return the weights' sha256."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    weights = output / WEIGHTS
    tensors = {_vllm_name(name): t.contiguous() for name, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = output / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config.get("text_config", {}).pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return sha256_of(weights)
