"""The safety checker: what the worker calls one (`SafetyChecker`), and the v1 checker it can load — diffusers'
`StableDiffusionSafetyChecker` (CompVis) from a local folder.

The loaded checker (`ClipSafetyChecker`) runs on the device in the pipeline's dtype (bfloat16 on CUDA), one model
call for all the images it is given, with the CLIP preprocessing done by torch on the device
(`services.worker.safety_tensor`): images go to the device as uint8 (one copy), never resized by PIL on the CPU nor
copied to float on the host. PIL images in (`__call__`, the `SafetyChecker` interface), or a batch tensor
(`check_tensor`) for a caller that already holds one on the device.

torch and diffusers are imported only when a checker is loaded, so the CPU-only worker can import this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Images in, one flag per image out (True: the image is flagged and must not be shown).
SafetyChecker = Callable[[list[Image.Image]], list[bool]]


class ClipSafetyChecker:
    """diffusers' v1 checker, its flags computed on the device from uint8 tensors (a `SafetyChecker`)."""

    def __init__(self, checker: Any, processor: Any, device: str) -> None:
        from services.worker.safety_tensor import ClipPreprocess

        self.checker = checker
        self.device = device
        self.preprocess = ClipPreprocess.from_processor(processor)

    def __call__(self, images: list[Image.Image]) -> list[bool]:
        """One flag per PIL image; images of one size go to the device as one uint8 batch, and all are checked in
        one model call."""
        import torch

        if not images:
            return []
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        order: list[int] = []
        inputs = []
        for indices in by_size.values():
            batch = np.stack([np.asarray(images[i].convert("RGB"), dtype=np.uint8) for i in indices])
            tensor = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
            inputs.append(self.preprocess(tensor))
            order.extend(indices)
        flags = self._flags(torch.cat(inputs))
        result = [False] * len(images)
        for position, index in enumerate(order):
            result[index] = flags[position]
        return result

    def check_tensor(self, images: torch.Tensor) -> list[bool]:
        """One flag per image of a N×3×H×W batch (uint8 0–255 or float 0–1), on the device where it lies."""
        if images.shape[0] == 0:
            return []
        return self._flags(self.preprocess(images.to(self.device)))

    def _flags(self, clip_input: torch.Tensor) -> list[bool]:
        from services.worker.safety_tensor import nsfw_flags

        return [bool(flag) for flag in nsfw_flags(self.checker, clip_input).tolist()]  # the one sync


def load_safety_checker(path: Path, device: str, dtype: str | None = None) -> ClipSafetyChecker:
    """Load the checker and its CLIP image processor config from `path` (blocking: call it in a thread), in `dtype`
    ("bfloat16", "float16", "float32"; default: bfloat16 on CUDA, as the pipeline's DTYPE=auto, else float32)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    checker = StableDiffusionSafetyChecker.from_pretrained(str(path), local_files_only=True)
    checker = checker.to(device=device, dtype=torch_dtype).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    log.info("safety checker from %s on %s (%s)", path, device, torch_dtype)
    return ClipSafetyChecker(checker, processor, device)
