"""Benchmark: stock diffusers vs the worker's SDXL fast path, side by side on the same inputs.

    .venv/bin/python -m bench.sdxl                 # CUDA if present (full SDXL architecture), else tiny on CPU
    .venv/bin/python -m bench.sdxl --tiny --runs 5 # force the tiny model

The model has random weights built from the real SDXL configs (`../shared/DESIGN.md`): the same architecture and
FLOPs as the real inpainting checkpoint, 9-channel UNet. It is saved with `save_pretrained` and loaded through the
worker's own `MODEL_PATH` loader, once with the fast path off (stock: bf16, SDPA, eager) and once with it on.

The request is fal's default: 1024×1024 (64×64 for the tiny model), 25 steps, strength 0.95 (23 denoising steps),
guidance 7.5, one image. "End to end" is inside the worker: request decoded (image and mask as PNG bytes) →
inputs prepared → pipeline → image encoded as JPEG. Quality: the latents of both paths for the same seed
(relative error), the decoded images (mean absolute pixel difference), and no NaN.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from services.images import IntakeLimits, encode_image, prepare_inputs
from services.schema import InpaintInput
from services.worker.config import WorkerConfig
from services.worker.inputs import build_job
from services.worker.outputs import JPEG_QUALITY
from services.worker.pipelines.base import RunContext
from services.worker.pipelines.sdxl import SDXLPipeline
from tests.helpers.imagegen import box_mask, encode, photo

#: The real SDXL inpainting architecture (../shared/DESIGN.md); parameter counts are checked in
#: tests/worker/test_fast_path.py (UNet 2567.5M, VAE 83.7M, CLIP-G 694.7M, CLIP-L 123.1M).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128, "in_channels": 9, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816}
VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512), "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": False}
CLIP_L_CONFIG: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                 "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G_CONFIG: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                                 "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}


def build_full_sdxl(folder: Path) -> Path:
    """The full SDXL inpainting architecture with random weights, from the real configs, saved to `folder`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.helpers.tiny_sdxl import _tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLInpaintPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG, **ids)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG, **ids)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def end_to_end(pipeline: SDXLPipeline, image_png: bytes, mask_png: bytes, inp: InpaintInput) -> float:
    """Request decoded → image encoded, inside the worker (seconds)."""
    _sync(pipeline.device)
    start = time.perf_counter()
    prepared = prepare_inputs(image_png, mask_png, limits=IntakeLimits(min_side=8))
    job = build_job(inp, prepared, inp.seed or 0, WorkerConfig(_env_file=None))
    images = pipeline.run(job, RunContext(log=lambda _m: None))
    for image in images:
        encode_image(image, "jpeg", quality=JPEG_QUALITY)
    _sync(pipeline.device)
    return time.perf_counter() - start


def latents(pipeline: SDXLPipeline, job: Any) -> torch.Tensor:
    generator = torch.Generator(device="cuda" if pipeline.device.startswith("cuda") else "cpu").manual_seed(7)
    out = pipeline.pipe(prompt=job.prompt, image=job.image, mask_image=job.mask, width=job.image.width,
                        height=job.image.height, num_inference_steps=job.steps, strength=job.strength,
                        guidance_scale=job.guidance_scale, generator=generator, output_type="latent")
    result: torch.Tensor = out.images.float()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="the tiny model even on a GPU")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    side = 64 if tiny else 1024
    device = "cuda" if cuda and not args.tiny else "cpu"
    gpu = torch.cuda.get_device_name() if cuda else "none"
    print(f"torch {torch.__version__}, device {device} ({gpu}), model {'tiny' if tiny else 'full SDXL'}, {side}²")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        if tiny:
            from tests.helpers.tiny_sdxl import build_tiny_sdxl

            build_tiny_sdxl(folder, in_channels=9)
        else:
            build_full_sdxl(folder)
        stock = SDXLPipeline.load(WorkerConfig(_env_file=None, model_path=folder, device=device, fast_path="off"))
        fast = SDXLPipeline.load(WorkerConfig(_env_file=None, model_path=folder, device=device, fast_path="on"))

        image_png = encode(photo(side, side), "PNG")
        mask_png = encode(box_mask((side, side), (side // 4, side // 4, 3 * side // 4, 3 * side // 4)), "PNG")
        inp = InpaintInput(image_url="x", mask_url="y", prompt="a lighthouse at dusk", seed=7,
                           image_size={"width": side, "height": side})
        job = build_job(inp, prepare_inputs(image_png, mask_png, limits=IntakeLimits(min_side=8)), 7,
                        WorkerConfig(_env_file=None))

        ref, got = latents(stock, job), latents(fast, job)
        rel = float((got - ref).norm() / ref.norm())
        nan = bool(torch.isnan(got).any())
        a = stock.run(job, RunContext(log=lambda _m: None))[0]
        b = fast.run(job, RunContext(log=lambda _m: None))[0]
        import numpy as np

        pixel = float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())

        rows = []
        for name, pipeline in (("stock diffusers", stock), ("fast path", fast)):
            for _ in range(2):
                end_to_end(pipeline, image_png, mask_png, inp)  # warm-up
            times = [end_to_end(pipeline, image_png, mask_png, inp) for _ in range(args.runs)]
            four = inp.model_copy(update={"num_images": 4})
            batch = [end_to_end(pipeline, image_png, mask_png, four) for _ in range(max(2, args.runs // 3))]
            rows.append((name, statistics.median(times), min(times), 4 / statistics.median(batch),
                         ", ".join(pipeline.fast.applied) or "—"))

    print(f"\n{'path':16} {'median s':>9} {'min s':>8} {'img/s @4':>9}  applied")
    for name, median, best, throughput, applied in rows:
        print(f"{name:16} {median:9.3f} {best:8.3f} {throughput:9.2f}  {applied}")
    print(f"\nquality: latent relative error {rel:.2e}, mean |pixel diff| {pixel:.3f}, NaN in fast path: {nan}")
    print(f"speed-up (median): {rows[0][1] / rows[1][1]:.2f}×")


if __name__ == "__main__":
    main()
