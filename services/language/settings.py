"""Settings of the language service (environment variables prefixed RETINAL_LANGUAGE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.language.prompting import PromptFamily
from shared.config import GrpcServiceSettings

# Where `make setup` puts the mini model and vLLM's environment: the checkout, whatever the
# working directory.
CHECKOUT = Path(__file__).resolve().parents[2]


class LanguageSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_LANGUAGE_", extra="ignore")

    port: int = 50053
    metrics_port: int = 9453

    # A LLaVA-family checkpoint in the HF layout (RetinalGPT-mini by default; `make setup`
    # assembles it); its retinal_model.json, when present, is the model card.
    model_dir: Path = CHECKOUT / "var" / "models" / "retinalgpt-mini"
    # How conversations are rendered: the checkpoint's chat template, or the LLaVA v0
    # "simple" template of the published RetinalGPT weights. Unset: the model card's
    # `prompt_family`, else "chat".
    prompt_family: PromptFamily | None = None
    # "auto": vLLM when its server is configured or installed (`vllm_python`), else
    # transformers.
    backend: Literal["auto", "vllm", "transformers"] = "auto"

    # vLLM: a running OpenAI-compatible server, or the Python (with vLLM installed) that runs
    # one as a sidecar.
    vllm_url: str = ""
    vllm_python: str = str(CHECKOUT / ".venv-vllm" / "bin" / "python")
    # Extra arguments of vLLM's server. CPU default: fp32, no CUDA graphs, short context. On a GPU,
    # e.g. '["--dtype", "bfloat16", "--max-model-len", "4096"]'.
    vllm_args: list[str] = Field(
        default_factory=lambda: ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
    )
    # GiB of KV cache for the CPU build (VLLM_CPU_KVCACHE_SPACE); ignored on a GPU.
    vllm_cpu_kvcache_gib: int = Field(default=1, ge=1)
    vllm_startup_timeout_s: float = Field(default=600, gt=0)
    # transformers: "cpu", "cuda", "cuda:1"...
    transformers_device: str = "cpu"

    # Conversations generated at once (vLLM batches them; transformers runs one) and how many
    # may wait beyond that before a call is refused with RESOURCE_EXHAUSTED.
    max_concurrency: int = Field(default=8, ge=1, le=256)
    max_queue: int = Field(default=8, ge=0, le=1024)
    default_max_tokens: int = Field(default=256, ge=1, le=4096)
    max_conversation_turns: int = Field(default=64, ge=1)
    max_turn_chars: int = Field(default=8000, ge=1)
