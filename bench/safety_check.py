"""CPU timing of the worker's output safety check on 4 images of 1024²: the replaced path (CLIPImageProcessorPil on
the CPU, a float32 copy of every image, diffusers' checker forward) vs the current one (`services.worker.safety`:
preprocessing in torch, one model call). The tiny random checker of the tests is used, so this times the
preprocessing, not the CLIP model; on a GPU the current path also runs on the device.

    .venv/bin/python -m bench.safety_check
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPImageProcessorPil

from services.worker.safety import load_safety_checker
from tests.helpers.imagegen import photo
from tests.helpers.tiny_sdxl import build_tiny_safety_checker


def _best(run: Callable[[], Any], times: int = 5) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return min(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_safety_checker(Path(tmp) / "checker", flag_everything=False)
        current = load_safety_checker(folder, "cpu")
        processor = CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        images = [photo(1024, 1024, seed=i) for i in range(4)]

        def replaced() -> Any:
            clip = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
            arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
            with torch.no_grad():
                return current.checker(images=arrays, clip_input=clip)[1]

        print(f"replaced {_best(replaced) * 1000:.1f} ms, current {_best(lambda: current(images)) * 1000:.1f} ms "
              f"(4 × 1024², CPU, {torch.get_num_threads()} threads, best of 5)")


if __name__ == "__main__":
    main()
