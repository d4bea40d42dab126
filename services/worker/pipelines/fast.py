"""The SDXL fast path: the optimisations applied to a loaded pipeline, each one switchable and reported.

On CUDA, by default: bfloat16 weights (chosen at load), channels-last memory layout for the UNet and VAE, fused
QKV projections in the attention blocks, PyTorch SDPA attention (diffusers' default), and batching of concurrent
compatible requests into one UNet batch (the worker's queue). `torch.compile` of the UNet is opt-in
(`FAST_COMPILE=on`) until its compile time and gain are measured on the target GPU (see bench/RESULTS.md).

Compilation never happens on a user's request:
- the compiled UNet serves only the size grid `COMPILE_SIZES` (exact latent size match), with batches padded to
  powers of two (`padding.py`), and only the (size, padded batch) shapes warmed up at start (`warming()`, run by
  `SDXLPipeline.warmup`); every other call runs the same UNet uncompiled (`served_unet.py`);
- the compile artefacts are loaded from `COMPILE_CACHE_DIR` before warm-up and saved after it (`compile_cache.py`);
- requests with LoRAs or embeddings run on an unfused, uncompiled copy of the UNet that shares its weights
  (`eager_unet`): loading adapters never touches the compiled module, so it never recompiles;
- compiles after warm-up are counted and logged as recompiles (`recompiles.py`; /health's `recompiles`).
`COMPILE_MODE`: "default" (with `DEFAULT_INDUCTOR_OPTIONS`), "reduce-overhead" (CUDA graphs), or
"max-autotune-no-cudagraphs" (many minutes of autotuning per shape). `FAST_FP8=on` quantises the compiled UNet's
Linear layers to float8 (`fp8.py`; CUDA with compute capability >= 8.9 only, refused at start otherwise).

Every optimisation here must keep the output within bf16 tolerance of stock diffusers;
`tests/worker/test_fast_path.py` guards that on the tiny model, `bench/sdxl.py` on the full architecture.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from services.worker.pipelines.compile_cache import load_compile_cache, save_compile_cache
from services.worker.pipelines.compile_grid import Size, default_sizes, latent_size
from services.worker.pipelines.fp8 import check_fp8, quantize_fp8
from services.worker.pipelines.padding import batch_buckets
from services.worker.pipelines.recompiles import RecompileWatch
from services.worker.pipelines.served_unet import (
    CompiledRouter,
    CompileMode,
    ServedUNet,
    compile_module,
    raise_recompile_limit,
)

log = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]

#: inductor settings with COMPILE_MODE=default (the issue's candidates: 1×1 convolutions as matmuls, coordinate
#: descent tuning of kernel configs, no epilogue fusion); change here, measured with bench/gpu_bench.py
DEFAULT_INDUCTOR_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("conv_1x1_as_mm", True), ("coordinate_descent_tuning", True), ("epilogue_fusion", False))

#: the most images one request may ask for (fal's `num_images`, services/schema.py)
MAX_IMAGES_PER_REQUEST = 8
WARMUP_STEPS = 2


@dataclass(frozen=True)
class FastPathOptions:
    enabled: Switch = "auto"  # auto = on for CUDA
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: Switch = "off"  # auto = on for CUDA (not the default until measured)
    compile_mode: CompileMode = "default"
    compile_backend: str = "inductor"  # tests use "eager" / "aot_eager": dynamo's plumbing without inductor
    inductor_options: tuple[tuple[str, Any], ...] = DEFAULT_INDUCTOR_OPTIONS
    compile_sizes: tuple[Size, ...] | None = None  # (width, height) px; None: fal's presets at the model's scale
    cache_dir: Path | None = None
    max_batch_images: int = MAX_IMAGES_PER_REQUEST  # the most images in one UNet call (the warm-up's largest)
    fp8: bool = False

    def active(self, device: str) -> bool:
        return self.enabled == "on" or (self.enabled == "auto" and device.startswith("cuda"))

    def compiling(self, device: str) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.startswith("cuda"))


@dataclass(frozen=True)
class WarmupRun:
    """One short run of the warm-up grid: an image size, an image count and whether guidance is on."""

    size: Size
    images: int
    guidance: bool


@dataclass
class FastPathState:
    applied: list[str] = field(default_factory=list)
    fused: bool = False  # pipe.unet is the fused (served) UNet, not the adapters' copy
    eager_unet: Any = None  # unfused, uncompiled, sharing the served UNet's weights: adapter requests run on it
    served_unet: Any = None  # pipe.unet between adapter requests (a ServedUNet when compiling)
    router: CompiledRouter | None = None
    watch: RecompileWatch | None = None
    sizes: tuple[Size, ...] = ()
    cache_dir: Path | None = None
    max_images: int = MAX_IMAGES_PER_REQUEST

    @property
    def compiled(self) -> bool:
        return self.router is not None

    @property
    def recompiles(self) -> int:
        """Compiles after warm-up (each one on a request's time)."""
        return self.watch.recompiles if self.watch is not None else 0

    def close(self) -> None:
        """Stop counting compiles (the callback registered with dynamo is removed)."""
        if self.watch is not None:
            self.watch.close()

    def unet_for(self, adapters: bool, latent: tuple[int, int], batch: int) -> Any:
        """The UNet a batch runs on: the adapters' uncompiled copy, or the served UNet (which runs a call compiled
        only when its latent size and padded batch were warmed up; see `route`)."""
        return self.eager_unet if adapters else self.served_unet

    def route(self, latent: tuple[int, int], batch: int) -> str:
        """"compiled" or "eager": how a call without adapters at this latent (height, width) and batch runs."""
        return self.router.route(latent, batch) if self.router is not None else "eager"

    def warmup_plan(self) -> list[WarmupRun]:
        """Every (size × padded batch) the compiled UNet serves: image counts 1, 2, 4, … with guidance (UNet batches
        2, 4, 8, …) and one image without (UNet batch 1). Empty when not compiling."""
        if self.router is None:
            return []
        runs = []
        for size in self.sizes:
            runs.append(WarmupRun(size, 1, guidance=False))
            runs += [WarmupRun(size, images, guidance=True) for images in batch_buckets(self.max_images)]
        return runs

    @contextmanager
    def warming(self) -> Iterator[None]:
        """Around the warm-up runs: the compile cache loaded first, every grid call compiled, the cache saved after.
        A no-op when not compiling."""
        if self.router is None or self.watch is None:
            yield
            return
        if self.cache_dir is not None:
            load_compile_cache(self.cache_dir)
        self.router.warming = self.watch.warming = True
        try:
            yield
        finally:
            self.router.warming = self.watch.warming = False
        log.info("compiled UNet warmed up: %d shapes (latent size × padded batch), %d compiles",
                 len(self.router.warmed), self.watch.compiles)
        if self.cache_dir is not None:
            save_compile_cache(self.cache_dir)


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A second module tree holding the same parameter and buffer tensors (no weight memory is copied)."""
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def apply_fast_path(pipe: Any, device: str, options: FastPathOptions) -> FastPathState:
    """Apply the fast path to a loaded pipeline (in place); returns what was applied."""
    state = FastPathState(eager_unet=pipe.unet, served_unet=pipe.unet)
    if not options.active(device):
        return state
    compiling = options.compiling(device)
    if options.fp8:
        check_fp8(device)  # refused at start, before anything is changed
    pipe.unet.requires_grad_(False)  # so PEFT's marking of trainable layers changes nothing the compiled graph sees
    if options.channels_last:
        # the UNet only: on an H100 the (float32, force-upcast) VAE got slower channels-last, encode 122 → 152 ms
        # and decode 91 → 158 ms per 1024² request (bench/RESULTS.md, 2026-11-26)
        pipe.unet.to(memory_format=torch.channels_last)
        state.applied.append("channels_last")
    served = pipe.unet
    if options.fuse_qkv or compiling or options.fp8:
        state.eager_unet = shared_copy(served)  # LoRAs target the unfused q/k/v projections
    if options.fuse_qkv:
        served.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
        state.fused = True
        state.applied.append("fused_qkv")
    if options.fp8:
        quantize_fp8(served, device)
        state.applied.append("fp8")
    if compiling:
        vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        native = int(served.config.sample_size) * vae_scale
        state.sizes = options.compile_sizes or tuple(default_sizes(native, 8))
        state.max_images = options.max_batch_images
        state.cache_dir = options.cache_dir
        state.watch = RecompileWatch()
        state.watch.install()
        compiled = compile_module(served, options.compile_mode, options.compile_backend,
                                  dict(options.inductor_options))
        state.router = CompiledRouter(served, compiled, [latent_size(s, vae_scale) for s in state.sizes],
                                      state.watch, cuda_graphs=options.compile_mode == "reduce-overhead")
        raise_recompile_limit(len(state.warmup_plan()))
        served = ServedUNet(served, state.router)
        pipe.unet = served
        state.applied.append("torch_compile")
        log.info("torch.compile (%s, mode %s) serves %s at padded batches %s", options.compile_backend,
                 options.compile_mode, ", ".join(f"{w}x{h}" for w, h in state.sizes),
                 batch_buckets(2 * state.max_images))
    state.served_unet = served
    log.info("SDXL fast path on %s: %s", device, ", ".join(state.applied) or "nothing")
    return state


def unfuse_for_adapters(pipe: Any, state: FastPathState) -> None:
    """LoRAs target the unfused q/k/v projections: adapter requests run on the unfused, uncompiled copy."""
    if pipe.unet is not state.eager_unet:
        pipe.unet = state.eager_unet
        state.fused = False


def refuse_after_adapters(pipe: Any, state: FastPathState, options: FastPathOptions) -> None:
    """Back to the served UNet (fused, compiled where configured) once the adapters are unloaded."""
    if pipe.unet is not state.served_unet:
        pipe.unet = state.served_unet
        state.fused = "fused_qkv" in state.applied
