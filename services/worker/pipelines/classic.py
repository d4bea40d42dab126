"""A CPU content-aware fill (OpenCV inpainting) for machines with no GPU.

Real pixels inside the mask, identical pixels outside it. The prompt is not used (and a log line says so).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from services.images import MASK_THRESHOLD
from services.worker.pipelines.base import PipelineJob, RunContext

#: what a request costs on this pipeline (`cost_steps`), per megapixel of output
CLASSIC_STEPS_PER_MEGAPIXEL = 25

# Alternate the two OpenCV methods across num_images so a batch offers a choice.
_METHODS = ((cv2.INPAINT_TELEA, "telea"), (cv2.INPAINT_NS, "navier-stokes"))


class ClassicPipeline:
    name = "classic"
    device = "cpu"
    model = "opencv-inpaint"
    batches = False

    def cost_steps(self, width: int, height: int, steps: int) -> int:
        """25 steps per megapixel: the fill's time grows with the square of the pixels (`services.worker.cost`);
        the request's own steps don't matter (no denoising steps run)."""
        return math.ceil(CLASSIC_STEPS_PER_MEGAPIXEL * width * height / 2**20)

    def warmup(self) -> None:
        image = np.zeros((16, 16, 3), np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        cv2.inpaint(image, mask, 3, cv2.INPAINT_TELEA)

    def run(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]:
        ctx.log("classic pipeline: content-aware fill; the prompt is not used")
        source = np.asarray(job.image.convert("RGB"))
        hard = np.asarray(job.mask.convert("L")) >= MASK_THRESHOLD
        cv_mask = hard.astype(np.uint8) * 255
        radius = max(3, round(min(job.image.size) / 128))
        outputs = []
        for i in range(job.num_images):
            ctx.check()
            flag, method = _METHODS[i % len(_METHODS)]
            filled = cv2.inpaint(source, cv_mask, radius, flag)
            out = np.where(hard[..., None], filled, source)
            outputs.append(Image.fromarray(out, "RGB"))
            ctx.log(f"step {i + 1}/{job.num_images} ({method})")
        return outputs

    def run_batch(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        return [self.run(job, ctx) for job, ctx in zip(jobs, ctxs, strict=True)]
