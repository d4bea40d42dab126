"""The worker's configuration, `WorkerConfig`: read from the environment and `.env`, one variable per field (its
name in upper case: PIPELINE, MODEL_PATH, SAFETY_CHECKER_PATH, PROMPT_EXPANDER_PATH, WORKER_KEY, MAX_QUEUE, …)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.images import IntakeLimits
from services.url_fetch import host_list_setting


class WorkerConfig(BaseSettings):
    """How this worker runs: which pipeline and model, where it listens, and the limits it enforces."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    pipeline: Literal["sdxl", "classic"] = Field(default="sdxl", description="Which pipeline serves requests")
    model_path: Path | None = Field(default=None, description="A diffusers folder or a single .safetensors file")
    model_config_path: Path | None = Field(
        default=None, description="For a single-file checkpoint: a diffusers folder holding the component configs")
    safety_checker_path: Path | None = Field(default=None, description="Folder of a StableDiffusionSafetyChecker")
    check_inputs: bool = Field(default=True, description="Run the safety checker on uploaded images too")
    prompt_expander_path: Path | None = Field(
        default=None, description="Folder of a causal text-generation model (a MagicPrompt-style GPT-2, loaded "
        "with transformers' AutoModelForCausalLM, nothing downloaded) that serves requests' `expand_prompt`; "
        "without it such requests are refused with a 422")
    lora_dir: Path | None = Field(default=None, description="LoRA paths in requests resolve inside this folder")
    embedding_dir: Path | None = Field(default=None, description="Embedding paths resolve inside this folder")
    device: str | None = Field(default=None, description="torch device; default cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    fast_path: Literal["auto", "on", "off"] = Field(
        default="off", description="channels-last UNet + fused QKV (auto: on for CUDA); off: on an H100 "
        "(bench/RESULTS.md, 2026-11-26) it gained nothing beyond run-to-run noise and its output moved 2.15/255 "
        "from stock, over the 2/255 bound")
    fast_compile: Literal["auto", "on", "off"] = Field(
        default="off", description="torch.compile the UNet (auto: on for CUDA); off until measured on the GPU")
    max_batch_images: int = Field(default=8, ge=1, le=64, description="Images per shared UNet batch")

    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(default=None, description="Base URL clients reach us at (default: from Host)")
    worker_key: SecretStr | None = Field(default=None, description="When set, `Authorization: Key …` is required")

    max_queue: int = Field(default=64, ge=1, description="Queued requests beyond this are refused with 503")
    result_ttl_s: float = Field(default=3600.0, gt=0, description="How long results and files are kept")
    max_output_pixels: int = Field(default=2048 * 2048, ge=64 * 64)
    max_image_bytes: int = Field(default=IntakeLimits.max_bytes, description="Largest image or mask file accepted")
    sse_ping_s: float = Field(default=15.0, gt=0)
    warmup: bool = True

    fetch_allow: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="Comma-separated hosts (`name`, `*.suffix`, `name:port`) and networks "
        "(`10.0.0.0/8`, `127.0.0.1`) image URLs may reach although they are not public addresses; by default only "
        "public addresses are fetched (services/url_fetch.py)")
    fetch_deadline_s: float = Field(
        default=IntakeLimits.download_timeout_s, gt=0,
        description="Total time one image download may take, from the name lookup to the last byte")

    # bounded memory and work per request (services.worker.storage, .preparation, .cost)
    worker_data_dir: Path | None = Field(
        default=None, description="Folder where waiting requests' image and mask sources and finished requests' "
        "results are kept (its inputs/ and results/ subfolders are emptied at start and stop: one worker per "
        "folder). Default: a fresh temporary folder, removed at stop")
    max_queue_bytes: int = Field(
        default=1024**3, ge=1024 * 1024, description="Bytes of image and mask sources (data URIs, URLs) that "
        "waiting requests may hold in all (on disk, in WORKER_DATA_DIR); a submit beyond it is refused with 503")
    max_request_cost: int = Field(
        default=1024 * 1024 * 8 * 65, ge=64 * 64, description="Output pixels × num_images × steps one request "
        "may cost (the classic pipeline counts 25 steps per megapixel); more is refused with 422. Default: "
        "any request at fal's preset sizes (1024×1024 at most) with up to 8 images of up to 65 steps")
    prepare_concurrency: int = Field(
        default=2, ge=1, le=64, description="Requests whose image and mask are fetched, decoded and checked at "
        "once, ahead of the running batch (each holds its decoded images in memory while it is prepared)")
    prompt_cache_size: int = Field(
        default=64, ge=0, description="Prompt embeddings (per prompt, negative prompt and guidance) kept for "
        "requests without LoRAs or embeddings, least recently used dropped first: rerolls and variations skip the "
        "text encoders (0: no cache)")

    @field_validator("fetch_allow", mode="before")
    @classmethod
    def _split_fetch_allow(cls, value: object) -> object:
        return host_list_setting(value)

    # torch.compile without compiling on a request's time (services/worker/pipelines/fast.py)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="torch.compile mode of the UNet with FAST_COMPILE: default (with inductor's "
        "conv_1x1_as_mm, coordinate_descent_tuning, no epilogue fusion), reduce-overhead (CUDA graphs) or "
        "max-autotune-no-cudagraphs (many minutes of autotuning per shape)")
    compile_cache_dir: Path | None = Field(
        default=None, description="Folder of torch.compile artefacts: loaded at start before the warm-up, saved "
        "after it (a restart with a warm cache compiles in seconds). Default: none")
    compile_sizes: Annotated[list[tuple[int, int]] | None, NoDecode] = Field(
        default=None, description="Comma-separated WIDTHxHEIGHT image sizes the compiled UNet serves and warms up "
        "at start (other sizes run uncompiled). Default: fal's six image_size presets at the model's scale")
    fast_fp8: Literal["off", "on"] = Field(
        default="off", description="float8 dynamic quantisation of the UNet's Linear layers with torchao (CUDA with "
        "compute capability >= 8.9 only; refused at start elsewhere)")

    @field_validator("compile_sizes", mode="before")
    @classmethod
    def _parse_compile_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            from services.worker.pipelines.compile_grid import parse_sizes

            return parse_sizes(value) or None
        return value
