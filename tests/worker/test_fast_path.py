"""The SDXL fast path on CPU with the tiny model: output within tolerance of stock diffusers, batching of
compatible requests (each request gets the images it would get alone), and adapters still working."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.pipelines import load_pipeline
from services.worker.pipelines.base import LoraSpec, PipelineJob, RunContext
from tests.helpers.imagegen import box_mask, image_pair_uris, photo
from tests.helpers.worker_harness import serve_sync

APP = "fal-ai/fast-sdxl/inpainting"
#: mean absolute difference (0-255 scale) allowed between the fast path and stock diffusers on the tiny model in
#: float32; fused QKV and channels-last only reorder float sums, so this is float noise
MAX_MEAN_PIXEL_DIFF = 0.5


def _job(seed: int = 3, steps: int = 6) -> PipelineJob:
    return PipelineJob(image=photo(64, 64), mask=box_mask((64, 64), (12, 12, 44, 44)), prompt="a lantern",
                       negative_prompt="", steps=steps, guidance_scale=6.0, strength=1.0, seeds=(seed, seed + 1))


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def test_fast_path_matches_stock_diffusers(tiny_inpaint_model: Path) -> None:
    stock: Any = load_pipeline(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="off"))
    fast: Any = load_pipeline(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="on"))
    assert stock.fast.applied == [] and fast.fast.applied == ["channels_last", "fused_qkv"]
    job = _job()
    diffs = [_mean_diff(a, b) for a, b in zip(stock.run(job, RunContext(log=lambda _m: None)),
                                              fast.run(job, RunContext(log=lambda _m: None)), strict=True)]
    print(f"fast path vs stock, mean abs pixel difference per image: {diffs}")
    assert max(diffs) <= MAX_MEAN_PIXEL_DIFF, diffs
    # and the fast path is really different code: the attention projections are fused
    assert any("to_qkv" in name for name, _ in fast.pipe.unet.named_modules())


def test_lora_on_the_fused_pipeline_loads_and_unloads(tiny_inpaint_model: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = StableDiffusionXLInpaintPipeline.from_pretrained(str(tiny_inpaint_model), local_files_only=True)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet))
    StableDiffusionXLInpaintPipeline.save_lora_weights(str(tmp_path / "style"), unet_lora_layers=layers)
    fast: Any = load_pipeline(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="on",
                                             lora_dir=tmp_path))

    def fingerprint() -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(fast.pipe.unet.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()

    before = fingerprint()
    plain = fast.run(_job(), RunContext(log=lambda _m: None))
    styled_job = PipelineJob(**{**_job().__dict__,
                                "loras": (LoraSpec(tmp_path / "style" / "pytorch_lora_weights.safetensors", 1.0),)})
    styled = fast.run(styled_job, RunContext(log=lambda _m: None))
    assert _mean_diff(styled[0], plain[0]) > 2.0
    assert fast.fast.fused and fingerprint() == before  # fused again, and the weights are the base weights
    assert _mean_diff(fast.run(_job(), RunContext(log=lambda _m: None))[0], plain[0]) < 0.5


def _body(**overrides: Any) -> dict[str, Any]:
    image, mask = image_pair_uris((64, 64))
    return {"image_url": image, "mask_url": mask, "prompt": "a lantern", "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 6, "strength": 1.0, "guidance_scale": 6.0, "enable_safety_checker": False,
            "sync_mode": True, "format": "png", "seed": 5, **overrides}


def _images(result: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(i["url"].split(",", 1)[1]))).convert("RGB")
            for i in result["images"]]


@pytest.fixture(scope="module")
def worker(tiny_inpaint_model: Path) -> Iterator[str]:
    with serve_sync(create_app(WorkerConfig(_env_file=None, model_path=tiny_inpaint_model, fast_path="on",
                                              max_batch_images=8))) as base:
        yield base


def _run_to_end(http: httpx.Client, handle: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    for _ in range(3000):
        status = http.get(handle["status_url"], params={"logs": 1}).json()
        if status["status"] == "COMPLETED":
            return http.get(handle["response_url"]).json(), [log["message"] for log in status["logs"]]
        time.sleep(0.01)
    raise AssertionError("never completed")


def test_compatible_requests_share_a_batch_and_match_running_alone(worker: str) -> None:
    with httpx.Client(base_url=worker, timeout=60) as http:
        blocker = http.post(f"/{APP}", json=_body(num_inference_steps=40, seed=1)).json()  # keeps the GPU busy
        a = http.post(f"/{APP}", json=_body(seed=10, prompt="a red lantern")).json()
        b = http.post(f"/{APP}", json=_body(seed=20, num_images=2, prompt="a blue lantern")).json()
        odd = http.post(f"/{APP}", json=_body(seed=30, num_inference_steps=7)).json()  # different steps
        _run_to_end(http, blocker)
        (out_a, logs_a), (out_b, logs_b) = _run_to_end(http, a), _run_to_end(http, b)
        out_odd, logs_odd = _run_to_end(http, odd)
        assert any("sharing a batch with 1 other request(s)" in m for m in logs_a)
        assert any("sharing a batch with 1 other request(s)" in m for m in logs_b)
        assert not any("sharing a batch" in m for m in logs_odd)
        assert [m for m in logs_a if m.startswith("step ")] == [f"step {i}/6" for i in range(1, 7)]
        # each request gets exactly what it would have got alone
        alone_a = http.post(f"/sync/{APP}", json=_body(seed=10, prompt="a red lantern")).json()
        alone_b = http.post(f"/sync/{APP}", json=_body(seed=20, num_images=2, prompt="a blue lantern")).json()
    for batched, alone in ((out_a, alone_a), (out_b, alone_b)):
        assert batched["seed"] == alone["seed"] and len(batched["images"]) == len(alone["images"])
        for x, y in zip(_images(batched), _images(alone), strict=True):
            assert _mean_diff(x, y) < 0.5
    assert len(_images(out_odd)) == 1


def test_a_cancelled_request_in_a_batch_leaves_the_others(worker: str) -> None:
    with httpx.Client(base_url=worker, timeout=60) as http:
        blocker = http.post(f"/{APP}", json=_body(num_inference_steps=40, seed=1)).json()
        keep = http.post(f"/{APP}", json=_body(seed=11, num_inference_steps=30)).json()
        drop = http.post(f"/{APP}", json=_body(seed=12, num_inference_steps=30)).json()
        _run_to_end(http, blocker)
        for _ in range(500):  # wait until the pair is running together
            if http.get(drop["status_url"]).json()["status"] == "IN_PROGRESS":
                break
            time.sleep(0.01)
        http.put(drop["cancel_url"])
        kept, _ = _run_to_end(http, keep)
        dropped = http.get(drop["response_url"])
    assert len(kept["images"]) == 1
    assert dropped.status_code == 400 and dropped.json()["error_type"] == "cancelled"


def test_the_benchmark_builds_the_real_sdxl_architecture() -> None:
    """bench/sdxl.py's full-size configs give SDXL's parameter counts (built on the meta device: no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.sdxl import CLIP_G_CONFIG, CLIP_L_CONFIG, UNET_CONFIG, VAE_CONFIG

    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**UNET_CONFIG), "vae": AutoencoderKL(**VAE_CONFIG),
                   "clip_l": CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG, vocab_size=49408)),
                   "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG, vocab_size=49408))}
    millions = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for name, m in modules.items()}
    assert millions == {"unet": 2567.5, "vae": 83.7, "clip_l": 123.1, "clip_g": 694.7}
