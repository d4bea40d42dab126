"""From a validated fal request to a `PipelineJob`: checks that need the worker's configuration (the models a request
asks for among them), output size, seeds, image and mask fetched and fitted to the size (the upload safety-checked),
LoRA and embedding paths resolved inside their folders, and which requests can share a batch. Also the image intake
limits and the URL policy every app of the worker fetches its images with (`intake_limits`, `url_policy`): public
addresses only, plus what the operator lists in FETCH_ALLOW, within FETCH_DEADLINE_S in all."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from pathlib import Path
from typing import Any

from PIL import Image

from services.images import MASK_THRESHOLD, ImageInputError, IntakeLimits, PreparedInputs, prepare_inputs_async
from services.schema import InpaintInput
from services.url_fetch import FetchPolicy, fetch_policy
from services.worker.config import WorkerConfig
from services.worker.pipelines.base import EmbeddingSpec, LoraSpec, PipelineJob
from services.worker.safety import SafetyChecker

SEED_SPACE = 2**64


class RequestError(ValueError):
    """A request the worker cannot serve, reported as fal's 422 `detail` list."""

    def __init__(self, field: str, message: str, type_: str = "value_error") -> None:
        """`field`: the dotted path of the field at fault; empty when the request as a whole can't be served."""
        super().__init__(message)
        loc = ["body", *field.split(".")] if field else ["body"]
        self.detail: list[dict[str, Any]] = [{"loc": loc, "msg": message, "type": type_}]

    @classmethod
    def from_image_error(cls, exc: ImageInputError, field: str) -> RequestError:
        """An image the intake code could not use (`services.images`), blamed on `field`."""
        return cls(field, exc.message, f"image_error.{exc.code}")

    @property
    def error_type(self) -> str:
        """The request's `error_type` when this error completes it: a flagged upload is a content policy
        violation, anything else a validation error."""
        type_: str = self.detail[0]["type"]
        return type_ if type_ == "content_policy_violation" else "validation_error"


def output_size(inp: InpaintInput) -> tuple[int, int]:
    """The requested size rounded to the nearest multiple of 8 (what the VAE needs)."""
    width, height = inp.size_pixels()
    return max(8, round(width / 8) * 8), max(8, round(height / 8) * 8)


def intake_limits(config: WorkerConfig) -> IntakeLimits:
    """The limits every image the worker fetches is held to (8 pixels: the smallest output side; the download's
    total deadline)."""
    return IntakeLimits(max_bytes=config.max_image_bytes, min_side=8, download_timeout_s=config.fetch_deadline_s)


#: how many times the largest output's pixels an inpainting request's image may have: room for a picture larger than
#: its output, and a bound on what decoding one request's image holds in memory while it is prepared
INPUT_PIXELS_PER_OUTPUT_PIXEL = 4


def inpaint_limits(config: WorkerConfig) -> IntakeLimits:
    """`intake_limits` for an inpainting request's image and mask: at most `INPUT_PIXELS_PER_OUTPUT_PIXEL` ×
    MAX_OUTPUT_PIXELS pixels (16.8 MP by default), so a small file can't decode to hundreds of MiB while it waits
    to run. (The NSFW estimator takes whole uploads, and keeps the intake's own limit.)"""
    return dataclasses.replace(intake_limits(config),
                               max_pixels=INPUT_PIXELS_PER_OUTPUT_PIXEL * config.max_output_pixels)


def url_policy(config: WorkerConfig) -> FetchPolicy:
    """What the worker's image downloads may reach: public addresses, and what FETCH_ALLOW trusts."""
    return fetch_policy(config.fetch_allow or ())


def check_request(inp: InpaintInput, config: WorkerConfig, *, safety_available: bool,
                  expander_available: bool) -> None:
    """Refuse at submit time what this worker can't do, so nobody waits in the queue for an error."""
    width, height = output_size(inp)
    if width * height > config.max_output_pixels:
        raise RequestError("image_size", f"{width}×{height} is more than this worker's limit of "
                           f"{config.max_output_pixels} pixels per image")
    if inp.enable_safety_checker and not safety_available:
        raise RequestError("enable_safety_checker", "the safety checker was requested but this worker has none "
                           "configured (set SAFETY_CHECKER_PATH), or send enable_safety_checker=false")
    if inp.expand_prompt and not expander_available:
        raise RequestError("expand_prompt", "prompt expansion was requested but this worker has no prompt expander "
                           "configured (set PROMPT_EXPANDER_PATH), or send expand_prompt=false")
    for i, lora in enumerate(inp.loras):
        resolve_asset(lora.path, config.lora_dir, f"loras.{i}.path", "LORA_DIR")
    for i, emb in enumerate(inp.embeddings):
        resolve_asset(emb.path, config.embedding_dir, f"embeddings.{i}.path", "EMBEDDING_DIR")
        if not emb.tokens:
            raise RequestError(f"embeddings.{i}.tokens", "at least one token is needed")


def resolve_asset(path: str, folder: Path | None, field: str, setting: str) -> Path:
    """A LoRA or embedding path, which must name an existing file inside the configured folder."""
    if folder is None:
        raise RequestError(field, f"this worker loads no such files: {setting} is not set")
    if "://" in path:
        raise RequestError(field, f"only files inside {setting} can be used, not URLs")
    root = folder.resolve()
    try:
        candidate = (root / path).resolve()
        found = candidate.is_relative_to(root) and candidate.is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte: no such file either
        raise RequestError(field, f"{path[:200]!r} was not found in {setting}") from exc
    if not candidate.is_relative_to(root):
        raise RequestError(field, f"{path!r} is outside {setting}")
    if not found:
        raise RequestError(field, f"{path!r} was not found in {setting}")
    return candidate


def request_batch_key(inp: InpaintInput) -> tuple[object, ...] | None:
    """Requests with equal keys can share one UNet batch: the same output size, steps, strength and guidance, and
    all or none with a negative prompt. None means the request runs alone (it loads LoRAs or embeddings)."""
    if inp.loras or inp.embeddings:
        return None
    return (output_size(inp), inp.num_inference_steps, round(inp.strength, 6), round(inp.guidance_scale, 6),
            bool(inp.negative_prompt))


def resolve_seed(inp: InpaintInput) -> int:
    return inp.seed if inp.seed is not None else secrets.randbelow(SEED_SPACE)


def build_job(inp: InpaintInput, prepared: PreparedInputs, seed: int, config: WorkerConfig) -> PipelineJob:
    """Fit image and mask to the output size and assemble everything the pipeline needs (CPU work)."""
    size = output_size(inp)
    image, mask = prepared.image, prepared.mask
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= MASK_THRESHOLD else 0)
    loras = tuple(LoraSpec(resolve_asset(lo.path, config.lora_dir, f"loras.{i}.path", "LORA_DIR"), lo.scale)
                  for i, lo in enumerate(inp.loras))
    embeddings = tuple(
        EmbeddingSpec(resolve_asset(e.path, config.embedding_dir, f"embeddings.{i}.path", "EMBEDDING_DIR"),
                      tuple(e.tokens)) for i, e in enumerate(inp.embeddings))
    return PipelineJob(
        image=image, mask=mask, prompt=inp.prompt, negative_prompt=inp.negative_prompt,
        steps=inp.num_inference_steps, guidance_scale=inp.guidance_scale, strength=inp.strength,
        seeds=tuple((seed + i) % SEED_SPACE for i in range(inp.num_images)), loras=loras, embeddings=embeddings)


async def prepare_job(inp: InpaintInput, seed: int, config: WorkerConfig, *,
                      safety: SafetyChecker | None) -> PipelineJob:
    """Fetch and decode the request's image and mask, build its job and, when the request wants the safety
    checker and the worker checks inputs, check the upload too (nobody gets to launder an image through the bot).
    Decoding and checking run in threads. Raises `RequestError` for what the client must fix. (Downloads make their
    own connections, to checked addresses only: `services.url_fetch`.)"""
    try:
        prepared = await prepare_inputs_async(inp.image_url, inp.mask_url, limits=inpaint_limits(config),
                                              policy=url_policy(config))
    except ImageInputError as exc:
        raise RequestError.from_image_error(exc, "mask_url" if exc.role == "mask" else "image_url") from exc
    job = await asyncio.to_thread(build_job, inp, prepared, seed, config)
    if inp.enable_safety_checker and safety is not None and config.check_inputs and (
            await asyncio.to_thread(safety, [prepared.image]))[0]:
        raise RequestError("image_url", "the safety checker flagged the uploaded image", "content_policy_violation")
    return job
