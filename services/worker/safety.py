"""The safety checker: what the worker calls one (`SafetyChecker`), and the v1 checker it can load — diffusers'
`StableDiffusionSafetyChecker` (CompVis) from a local folder.

torch and diffusers are imported only when a checker is loaded, so the CPU-only worker can import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: Images in, one flag per image out (True: the image is flagged and must not be shown).
SafetyChecker = Callable[[list[Image.Image]], list[bool]]


def load_safety_checker(path: Path, device: str) -> SafetyChecker:
    """Load the checker and its CLIP image processor from `path` (blocking: call it in a thread)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    checker = StableDiffusionSafetyChecker.from_pretrained(str(path), local_files_only=True).to(device).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    dtype = next(checker.parameters()).dtype

    def check(images: list[Image.Image]) -> list[bool]:
        if not images:
            return []
        clip_input = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        with torch.no_grad():
            _, flags = checker(images=arrays, clip_input=clip_input.to(device=device, dtype=dtype))
        return [bool(flag) for flag in flags]

    return check
