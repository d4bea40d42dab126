"""SDXL inpainting with diffusers, from a local model (a diffusers folder or a single .safetensors file).

Loads offline (`HF_HUB_OFFLINE=1`, `local_files_only=True`): weights are never downloaded. Both the
9-channel inpainting checkpoint and the 4-channel base checkpoint work (`StableDiffusionXLInpaintPipeline`
handles both). Each request can bring LoRAs (loaded with their scales, unloaded afterwards) and
textual-inversion embeddings (added to both text encoders, removed afterwards).

The hot path (issue 14): with bfloat16 weights the VAE's `force_upcast` is turned off at load (a real SDXL
checkpoint's VAE config asks for it, and diffusers then casts the VAE to float32 and back on every encode; bf16
does not overflow as fp16 does); the init and masked images are encoded with one VAE call per batch
(`vae_encode`); prompt embeddings of requests without adapters come from an LRU cache (`PromptCache`,
PROMPT_CACHE_SIZE); the decoded images become uint8 on the device and reach the host in one copy.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.worker.config import WorkerConfig
from services.worker.pipelines.base import Cancelled, EmbeddingSpec, LoraSpec, PipelineJob, RunContext
from services.worker.pipelines.fast import (
    MAX_IMAGES_PER_REQUEST,
    WARMUP_STEPS,
    FastPathOptions,
    WarmupRun,
    apply_fast_path,
    refuse_after_adapters,
    unfuse_for_adapters,
)
from services.worker.pipelines.vae_encode import install_batched_vae_encode
from services.worker.prompt_cache import PromptCache, PromptEmbeds, PromptKey

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def denoising_steps(steps: int, strength: float) -> int:
    """How many steps diffusers actually runs for an img2img/inpaint request (its `get_timesteps`)."""
    init = min(int(steps * strength), steps)
    return steps - max(steps - init, 0)


class SDXLPipeline:
    name = "sdxl"
    batches = True  # compatible requests can share one UNet batch

    def __init__(self, pipe: Any, device: str, model: str, *, fast: FastPathOptions | None = None,
                 prompt_cache_size: int = 64) -> None:
        self.pipe = pipe
        self.device = device
        self.model = model
        self.fast_options = fast or FastPathOptions(enabled="off")
        self.fast = apply_fast_path(pipe, device, self.fast_options)
        install_batched_vae_encode(pipe)
        self.prompt_cache = PromptCache(prompt_cache_size)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: WorkerConfig) -> SDXLPipeline:
        from diffusers import StableDiffusionXLInpaintPipeline

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        assert config.model_path is not None
        path = Path(config.model_path).expanduser()
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            dtype = _DTYPES[config.dtype]
        if path.is_dir():
            pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(path), dtype=dtype,
                                                                    local_files_only=True)
        elif path.is_file() and path.suffix in (".safetensors", ".ckpt"):
            if config.model_config_path is None:
                raise RuntimeError("a single-file MODEL_PATH needs MODEL_CONFIG_PATH: a local diffusers folder "
                                   "with the SDXL component configs (model_index.json, unet/config.json, …)")
            pipe = StableDiffusionXLInpaintPipeline.from_single_file(
                str(path), config=str(config.model_config_path), dtype=dtype, local_files_only=True)
        else:
            raise RuntimeError(f"MODEL_PATH {path} is neither a diffusers folder nor a .safetensors file")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if dtype == torch.bfloat16 and pipe.vae.config.force_upcast:
            # bf16 has fp32's range: no overflow to guard against (fp16 VAEs do overflow: left as they are)
            pipe.vae.register_to_config(force_upcast=False)
            log.info("VAE force_upcast turned off: the VAE stays in bfloat16 (no float32 round trip per encode)")
        in_channels = pipe.unet.config.in_channels
        log.info("loaded SDXL from %s on %s (%s, UNet with %d input channels)", path, device, dtype, in_channels)
        fast = FastPathOptions(enabled=config.fast_path, compile=config.fast_compile,
                               compile_mode=config.compile_mode, cache_dir=config.compile_cache_dir,
                               compile_sizes=tuple(config.compile_sizes) if config.compile_sizes else None,
                               max_batch_images=max(config.max_batch_images, MAX_IMAGES_PER_REQUEST),
                               fp8=config.fast_fp8 == "on")
        return cls(pipe, device, str(path), fast=fast, prompt_cache_size=config.prompt_cache_size)

    def warmup(self) -> None:
        """One tiny request; when compiling, a short run of every (size × padded batch) the compiled UNet serves
        (compile cache loaded first and saved after: see fast.py), so no request compiles."""
        side = 32 * self.pipe.vae_scale_factor
        plan = self.fast.warmup_plan() or [WarmupRun((side, side), 1, guidance=True)]
        with self.fast.warming():
            for i, run in enumerate(plan):
                width, height = run.size
                image = Image.new("RGB", (width, height), (127, 127, 127))
                mask = Image.new("L", (width, height), 0)
                mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
                job = PipelineJob(image=image, mask=mask, prompt="warm-up", negative_prompt="", steps=WARMUP_STEPS,
                                  guidance_scale=5.0 if run.guidance else 1.0, strength=1.0,
                                  seeds=tuple(range(run.images)))
                started = time.perf_counter()
                self.run(job, RunContext(log=lambda _msg: None))
                if self.fast.compiled:
                    log.info("warm-up %d/%d: %dx%d, %d image(s), guidance %s: %.1f s", i + 1, len(plan), width,
                             height, run.images, "on" if run.guidance else "off", time.perf_counter() - started)

    def run(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]:
        return self.run_batch([job], [ctx])[0]

    def run_batch(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        """Several compatible requests (same size, steps, strength, guidance; no adapters) in one UNet batch.

        Each image is one batch row with its own generator, so a request gets the same images batched or alone.
        The batch stops between steps only when every request in it was cancelled; the worker drops the results
        of any that were cancelled on their own.
        """
        with self._lock:
            adapters = bool(len(jobs) == 1 and (jobs[0].loras or jobs[0].embeddings))
            if adapters:
                unfuse_for_adapters(self.pipe, self.fast)
                self._load_loras(jobs[0].loras, ctxs[0])
                self._load_embeddings(jobs[0].embeddings, ctxs[0])
            try:
                return self._generate(jobs, ctxs, cache_prompts=not adapters)
            finally:
                if adapters:
                    self._unload(jobs[0], ctxs[0])
                    refuse_after_adapters(self.pipe, self.fast, self.fast_options)

    def _generate(self, jobs: list[PipelineJob], ctxs: list[RunContext], *,
                  cache_prompts: bool) -> list[list[Image.Image]]:
        first = jobs[0]
        total = denoising_steps(first.steps, first.strength)
        gen_device = self.device if self.device.startswith("cuda") else "cpu"
        prompts, negatives, images, masks, generators = [], [], [], [], []
        for job in jobs:
            for seed in job.seeds:
                prompts.append(job.prompt)
                negatives.append(job.negative_prompt)
                images.append(job.image)
                masks.append(job.mask)
                generators.append(torch.Generator(device=gen_device).manual_seed(seed))

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            for ctx in ctxs:
                ctx.log(f"step {step + 1}/{total}")
            if all(ctx.cancel_event.is_set() for ctx in ctxs):
                raise Cancelled()
            return kwargs

        if all(ctx.cancel_event.is_set() for ctx in ctxs):
            raise Cancelled()
        # One batch row per image, each with its own generator. (With num_images_per_prompt, diffusers encodes the
        # image once with generator[0] only, so image i of a batch would not match a single image of seed i.)
        negative = negatives if any(negatives) else None
        if cache_prompts:  # LoRAs and embeddings change the text encoders: those requests bypass the cache
            text: dict[str, Any] = self._prompt_embeds(prompts, negative, first.guidance_scale)
        else:
            text = {"prompt": prompts, "negative_prompt": negative}
        result = self.pipe(
            **text, image=images, mask_image=masks,
            width=first.image.width, height=first.image.height, num_inference_steps=first.steps,
            strength=first.strength, guidance_scale=first.guidance_scale, num_images_per_prompt=1,
            generator=generators, output_type="pt", callback_on_step_end=on_step_end)
        out = to_pil(result.images)
        split, start = [], 0
        for job in jobs:
            split.append(out[start:start + job.num_images])
            start += job.num_images
        return split

    # --- prompt embeddings ---------------------------------------------------------------------------

    def _prompt_embeds(self, prompts: list[str], negatives: list[str] | None,
                       guidance_scale: float) -> dict[str, Any]:
        """The pipeline's embedding arguments for these rows: each distinct (prompt, negative, guidance) from the
        cache, the missing ones encoded together in one `encode_prompt` call (as the stock path does)."""
        cfg = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        keys: list[PromptKey] = [(p, negatives[i] if negatives is not None else None, cfg)
                                 for i, p in enumerate(prompts)]
        distinct = list(dict.fromkeys(keys))
        encoded: dict[PromptKey, PromptEmbeds] = {}
        missing = [key for key in distinct if key not in self.prompt_cache]
        if missing:
            encoded.update(self._encode_prompts(missing, cfg, negatives is not None))
        found = {key: self.prompt_cache.get(key, functools.partial(encoded.__getitem__, key)) for key in distinct}
        rows = [found[key] for key in keys]
        embeds: dict[str, Any] = {
            "prompt_embeds": torch.cat([r.prompt for r in rows]),
            "pooled_prompt_embeds": torch.cat([r.pooled for r in rows])}
        if cfg:
            embeds["negative_prompt_embeds"] = torch.cat([r.negative for r in rows if r.negative is not None])
            embeds["negative_pooled_prompt_embeds"] = torch.cat(
                [r.negative_pooled for r in rows if r.negative_pooled is not None])
        return embeds

    def _encode_prompts(self, keys: list[PromptKey], cfg: bool, with_negative: bool) -> dict[PromptKey, PromptEmbeds]:
        """`encode_prompt` once for these keys (all with or all without a negative prompt); one entry each."""
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=[k[0] for k in keys], device=self.pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, negative_prompt=[k[1] or "" for k in keys] if with_negative else None)
        return {key: PromptEmbeds(prompt=pe[i:i + 1].clone(), pooled=ppe[i:i + 1].clone(),
                                  negative=npe[i:i + 1].clone() if cfg else None,
                                  negative_pooled=nppe[i:i + 1].clone() if cfg else None)
                for i, key in enumerate(keys)}

    # --- per-request adapters -----------------------------------------------------------------------

    def _load_loras(self, loras: tuple[LoraSpec, ...], ctx: RunContext) -> None:
        if not loras:
            return
        names = []
        for i, lora in enumerate(loras):
            name = f"request_lora_{i}"
            # a copy of the in-memory tensors' dict: diffusers may rename its keys while converting them
            source: Any = dict(lora.weights) if lora.weights is not None else str(lora.path)
            self.pipe.load_lora_weights(source, adapter_name=name)
            names.append(name)
            ctx.log(f"loaded LoRA {lora.path.name} (scale {lora.scale:g})")
        self.pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])

    def _load_embeddings(self, embeddings: tuple[EmbeddingSpec, ...], ctx: RunContext) -> None:
        from safetensors.torch import load_file

        for emb in embeddings:
            tensors = load_file(str(emb.path))
            pairs = [("clip_l", self.pipe.text_encoder, self.pipe.tokenizer),
                     ("clip_g", self.pipe.text_encoder_2, self.pipe.tokenizer_2)]
            missing = [key for key, _, _ in pairs if key not in tensors]
            if missing:
                raise ValueError(f"embedding {emb.path.name} has no {', '.join(missing)} vectors (an SDXL "
                                 "embedding holds clip_l and clip_g)")
            for key, encoder, tokenizer in pairs:
                vectors = tensors[key]
                if vectors.shape[0] != len(emb.tokens):
                    raise ValueError(f"embedding {emb.path.name} has {vectors.shape[0]} vectors but "
                                     f"{len(emb.tokens)} tokens were given")
                self.pipe.load_textual_inversion(vectors, token=list(emb.tokens), text_encoder=encoder,
                                                 tokenizer=tokenizer)
            ctx.log(f"loaded embedding {emb.path.name} as {' '.join(emb.tokens)}")

    def _unload(self, job: PipelineJob, ctx: RunContext) -> None:
        if job.loras:
            self.pipe.unload_lora_weights()
        for emb in job.embeddings:
            for encoder, tokenizer in ((self.pipe.text_encoder, self.pipe.tokenizer),
                                       (self.pipe.text_encoder_2, self.pipe.tokenizer_2)):
                present = [t for t in emb.tokens if t in tokenizer.get_vocab()]
                if present:
                    self.pipe.unload_textual_inversion(tokens=present, text_encoder=encoder, tokenizer=tokenizer)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """The pipeline's `output_type="pt"` batch (N×3×H×W in [0, 1], on the device) as PIL images: made uint8 on the
    device as diffusers' `numpy_to_pil` does on the host (×255 in float32, rounded), then one copy to the host."""
    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return [Image.fromarray(array) for array in pixels.cpu().numpy()]
