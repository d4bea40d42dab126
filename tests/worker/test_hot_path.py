"""The SDXL hot path (issue 14) on CPU with the tiny model: bf16 keeps the VAE in bf16 (force_upcast off), the VAE
encodes a batch in one call with each row's own generator, the output is made uint8 from the pipeline's tensor
with the same pixels as diffusers' PIL output, and prompt embeddings are cached for requests without adapters."""

from __future__ import annotations

import itertools
import json
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from services.worker.config import WorkerConfig
from services.worker.pipelines import load_pipeline
from services.worker.pipelines.base import EmbeddingSpec, PipelineJob, RunContext
from services.worker.pipelines.sdxl import to_pil
from tests.helpers.imagegen import box_mask, photo


def _ctx() -> RunContext:
    return RunContext(log=lambda _m: None)


def _job(seeds: tuple[int, ...] = (3, 4, 5), *, strength: float = 0.7, prompt: str = "a lantern",
         image: Image.Image | None = None, **extra: Any) -> PipelineJob:
    return PipelineJob(image=image or photo(64, 64), mask=box_mask((64, 64), (12, 12, 44, 44)), prompt=prompt,
                       negative_prompt="", steps=4, guidance_scale=6.0, strength=strength, seeds=seeds, **extra)


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.fixture(scope="module")
def sdxl(tiny_inpaint_model: Path) -> Any:
    return load_pipeline(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="off",
                                      dtype="float32"))


@pytest.fixture
def encoder_calls(sdxl: Any) -> Iterator[list[int]]:
    """Batch sizes of every VAE encoder call while the test runs."""
    calls: list[int] = []
    handle = sdxl.pipe.vae.encoder.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    yield calls
    handle.remove()


def _stock_encode(sdxl: Any) -> Any:
    """diffusers' own `_encode_vae_image` (row by row with a list of generators), bound to the same pipeline."""
    from diffusers import StableDiffusionXLInpaintPipeline

    return types.MethodType(StableDiffusionXLInpaintPipeline._encode_vae_image, sdxl.pipe)


def test_bfloat16_turns_force_upcast_off_and_the_vae_stays_bf16(tiny_inpaint_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_inpaint_model, tmp_path / "model"))
    vae_config = model / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "force_upcast": True}))
    full: Any = load_pipeline(WorkerConfig(_env_file=None, model_path=model, dtype="float32", fast_path="off"))
    assert full.pipe.vae.config.force_upcast is True  # float32 (and float16) left as the checkpoint says
    sdxl: Any = load_pipeline(WorkerConfig(_env_file=None, model_path=model, dtype="bfloat16", fast_path="off"))
    assert sdxl.pipe.vae.config.force_upcast is False
    seen: list[torch.dtype] = []
    outputs: list[torch.Tensor] = []
    for part in (sdxl.pipe.vae.encoder, sdxl.pipe.vae.decoder):
        part.register_forward_pre_hook(lambda m, _a: seen.append(next(m.parameters()).dtype))
    sdxl.pipe.vae.decoder.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    images = sdxl.run(_job(seeds=(1, 2)), _ctx())
    assert len(images) == 2 and seen and set(seen) == {torch.bfloat16}
    assert all(bool(torch.isfinite(out.float()).all()) for out in outputs)
    assert np.asarray(images[0]).std() > 0


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_the_vae_encodes_a_batch_in_one_call_with_the_stock_images(sdxl: Any, encoder_calls: list[int],
                                                                   strength: float) -> None:
    other = photo(64, 64, seed=9)
    jobs = [_job((3, 4), strength=strength), _job((5,), strength=strength, image=other, prompt="a lamp")]
    batched = sdxl.run_batch(jobs, [_ctx(), _ctx()])
    # strength < 1: the init image and the masked image, one call each; strength 1: the masked image only; each
    # call holds the distinct images of the batch (two requests: two images, not three rows)
    assert encoder_calls == ([2, 2] if strength < 1 else [2])
    encoder_calls.clear()
    sdxl.pipe._encode_vae_image = _stock_encode(sdxl)
    try:
        stock = sdxl.run_batch(jobs, [_ctx(), _ctx()])
    finally:
        del sdxl.pipe._encode_vae_image  # back to the batched encode installed on the instance
        from services.worker.pipelines.vae_encode import install_batched_vae_encode
        install_batched_vae_encode(sdxl.pipe)
    assert encoder_calls == [1] * (6 if strength < 1 else 3)  # stock: one row at a time
    for ours, theirs in zip(itertools.chain(*batched), itertools.chain(*stock), strict=True):
        assert _max_diff(ours, theirs) <= 1 and _mean_diff(ours, theirs) < 0.05


def test_uint8_on_the_device_gives_diffusers_pil_pixels(sdxl: Any) -> None:
    image, mask = photo(64, 64), box_mask((64, 64), (12, 12, 44, 44))

    def call(output_type: str) -> Any:
        return sdxl.pipe(prompt=["a lantern"] * 2, image=image, mask_image=mask, width=64, height=64,
                         num_inference_steps=3, strength=1.0, guidance_scale=5.0, output_type=output_type,
                         generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images

    pil, ours = call("pil"), to_pil(call("pt"))
    assert [im.mode for im in ours] == ["RGB", "RGB"] and ours[0].size == (64, 64)
    assert all(_max_diff(a, b) <= 1 for a, b in zip(pil, ours, strict=True))


@pytest.fixture
def text_encoder_calls(sdxl: Any) -> Iterator[list[str]]:
    calls: list[str] = []
    handles = [encoder.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
               for name, encoder in (("clip_l", sdxl.pipe.text_encoder), ("clip_g", sdxl.pipe.text_encoder_2))]
    sdxl.prompt_cache.clear()
    yield calls
    for handle in handles:
        handle.remove()


def test_a_repeated_prompt_skips_the_text_encoders_with_identical_images(sdxl: Any,
                                                                        text_encoder_calls: list[str]) -> None:
    first = sdxl.run(_job((7, 8), prompt="a brass lantern"), _ctx())
    assert text_encoder_calls and len(sdxl.prompt_cache) == 1
    text_encoder_calls.clear()
    again = sdxl.run(_job((7, 8), prompt="a brass lantern"), _ctx())
    assert text_encoder_calls == []
    assert all(_max_diff(a, b) == 0 for a, b in zip(first, again, strict=True))
    # the same images as the uncached path (diffusers encoding the prompt itself)
    sdxl.prompt_cache.size = 0
    try:
        uncached = sdxl.run(_job((7, 8), prompt="a brass lantern"), _ctx())
    finally:
        sdxl.prompt_cache.size = 64
    assert text_encoder_calls
    assert all(_max_diff(a, b) <= 1 for a, b in zip(first, uncached, strict=True))


def test_a_batch_encodes_its_missing_prompts_once(sdxl: Any, text_encoder_calls: list[str]) -> None:
    sdxl.run(_job((1,), prompt="a lamp"), _ctx())
    text_encoder_calls.clear()
    jobs = [_job((1,), prompt="a lamp"), _job((2, 3), prompt="a candle"), _job((4,), prompt="a torch")]
    sdxl.run_batch(jobs, [_ctx(), _ctx(), _ctx()])
    # "a lamp" from the cache; the two new prompts in one call per text encoder (an empty negative prompt is
    # zeros: SDXL's force_zeros_for_empty_prompt)
    assert sorted(text_encoder_calls) == ["clip_g", "clip_l"]
    assert len(sdxl.prompt_cache) == 3


def test_an_embedding_request_bypasses_the_cache(sdxl: Any, text_encoder_calls: list[str], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(3)
    save_file({"clip_l": torch.randn(1, 32) * 3, "clip_g": torch.randn(1, 32) * 3}, str(tmp_path / "e.safetensors"))
    sdxl.run(_job((1,), prompt="a <thing> lantern"), _ctx())
    assert len(sdxl.prompt_cache) == 1
    text_encoder_calls.clear()
    hits = sdxl.prompt_cache.hits
    job = _job((1,), prompt="a <thing> lantern",
               embeddings=(EmbeddingSpec(tmp_path / "e.safetensors", ("<thing>",)),))
    sdxl.run(job, _ctx())
    assert text_encoder_calls  # encoded with the embedding loaded, not taken from the cache
    assert len(sdxl.prompt_cache) == 1 and sdxl.prompt_cache.hits == hits
