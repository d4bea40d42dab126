"""Compiled serving on the tiny model (dynamo with the "eager" backend: the plumbing without inductor's minutes):
the warm-up compiles the served grid, requests then never compile, other sizes and adapter requests run uncompiled,
and /health counts recompiles. FAST_FP8's refusal without CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.pipelines import load_pipeline
from services.worker.pipelines.base import LoraSpec, PipelineJob, RunContext
from services.worker.pipelines.fast import FastPathOptions
from services.worker.pipelines.fp8 import Fp8Unavailable, check_fp8
from services.worker.pipelines.sdxl import SDXLPipeline
from tests.helpers.imagegen import box_mask, photo
from tests.helpers.tiny_sdxl import save_tiny_lora
from tests.helpers.worker_harness import serve_sync


def _job(side: int = 64, seeds: tuple[int, ...] = (3,), **extra: Any) -> PipelineJob:
    fields: dict[str, Any] = {"prompt": "a lantern", "negative_prompt": "", "steps": 3, "guidance_scale": 6.0,
                              "strength": 1.0, "seeds": seeds, **extra}
    return PipelineJob(image=photo(side, side), mask=box_mask((side, side), (8, 8, side - 8, side - 8)), **fields)


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def _ctx() -> RunContext:
    return RunContext(log=lambda _m: None)


@pytest.fixture(scope="module")
def lora_dir(tiny_inpaint_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA for the tiny UNet with random (non-zero) weights, saved the way diffusers saves LoRAs."""
    return save_tiny_lora(tiny_inpaint_model, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def compiled(tiny_inpaint_model: Path) -> Iterator[tuple[SDXLPipeline, str]]:
    """The worker on a pipeline compiled for 64×64 (latent 32×32), one image per call at most: the warm-up (run
    by the app's start) compiles UNet batches 1 (no guidance) and 2 (guidance)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    torch._dynamo.reset()
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(tiny_inpaint_model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipeline = SDXLPipeline(pipe, "cpu", "tiny", fast=FastPathOptions(
        enabled="on", compile="on", compile_backend="eager", compile_sizes=((64, 64),), max_batch_images=1))
    assert [(r.size, r.images, r.guidance) for r in pipeline.fast.warmup_plan()] == [
        ((64, 64), 1, False), ((64, 64), 1, True)]
    config = WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, max_batch_images=1)
    try:
        with serve_sync(create_app(config, pipeline=pipeline)) as base:
            yield pipeline, base
    finally:
        pipeline.fast.close()


def test_requests_after_warm_up_never_compile(compiled: tuple[SDXLPipeline, str], tiny_inpaint_model: Path,
                                              lora_dir: Path) -> None:
    pipeline, base = compiled
    fast = pipeline.fast
    assert fast.applied == ["channels_last", "fused_qkv", "torch_compile"] and fast.watch is not None
    assert fast.router is not None and fast.router.warmed == {((32, 32), 1), ((32, 32), 2)}
    assert fast.watch.compiles == 2 and fast.recompiles == 0
    assert fast.route((32, 32), 1) == "compiled" and fast.route((24, 24), 1) == "eager"

    stock: Any = load_pipeline(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="off",
                                            lora_dir=lora_dir))
    served = pipeline.run(_job(), _ctx())  # compiled, guidance on
    assert _mean_diff(served[0], stock.run(_job(), _ctx())[0]) < 0.5
    pipeline.run(_job(guidance_scale=1.0), _ctx())  # compiled, no guidance
    pipeline.run(_job(side=48), _ctx())  # not in the grid: uncompiled

    # an adapter request runs on the unfused, uncompiled copy that shares the weights
    lora = (LoraSpec(lora_dir / "style" / "pytorch_lora_weights.safetensors", 1.0),)
    styled = pipeline.run(_job(loras=lora), _ctx())
    assert _mean_diff(styled[0], stock.run(_job(loras=lora), _ctx())[0]) < 0.5
    assert _mean_diff(styled[0], served[0]) > 2.0
    assert pipeline.pipe.unet is fast.served_unet and fast.fused
    assert not any("lora" in name for name, _ in fast.eager_unet.named_modules())  # unloaded
    # back on the compiled UNet, same images, still no compile
    assert _mean_diff(pipeline.run(_job(), _ctx())[0], served[0]) < 0.5
    assert fast.watch.compiles == 2 and fast.recompiles == 0
    assert fast.unet_for(True, (32, 32), 1) is fast.eager_unet
    assert fast.unet_for(False, (32, 32), 1) is fast.served_unet

    health = httpx.get(f"{base}/health").json()
    assert health["recompiles"] == 0


def test_the_adapters_copy_shares_the_weights(compiled: tuple[SDXLPipeline, str]) -> None:
    fast = compiled[0].fast
    served = dict(fast.served_unet.base.named_parameters())
    eager = dict(fast.eager_unet.named_parameters())
    shared = [name for name, p in eager.items() if name in served and served[name] is p]
    assert len(shared) == len(eager)  # every eager weight is the served one (the fused to_qkv are extra)
    assert all(not p.requires_grad for p in eager.values())


def test_fp8_is_refused_without_cuda(tiny_inpaint_model: Path) -> None:
    with pytest.raises(Fp8Unavailable, match=r"FAST_FP8=on needs a CUDA GPU with compute capability >= 8\.9"):
        check_fp8("cpu")
    with pytest.raises(Fp8Unavailable, match="Set FAST_FP8=off"):
        load_pipeline(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="on", fast_fp8="on"))
