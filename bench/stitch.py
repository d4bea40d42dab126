"""Benchmark: what crop and stitch cost, and what they save.

    .venv/bin/python -m bench.stitch [--runs 5]

1. Cost, for a 1024² and a 4000×3000 upload (a photo-like PNG with a 300×200 mask), each next to the decode of
   that upload in the same run: planning the crop and cutting and scaling it (`plan_crop` + `crop_for_backend`),
   putting a result back (`stitch`: scale back + feathered composite), and the output's PNG encode. The stitch
   should cost less than decoding the picture.
2. Faithfulness, with the tiny random-weight SDXL model (tests/helpers/tiny_sdxl.py) behind the embedded worker:
   the mean absolute change (0–255) of the pixels outside the mask and its feather band, for `area masked` and for
   the old behaviour (`area whole` with `keep_unmasked` off: every pixel regenerated), through the command line's
   path (`services/cli.py`: intake → crop → backend → stitch).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.crop_plan import StitchOptions
from services.images import encode_image
from services.stitch import crop_for_backend, plan_crop, stitch
from tests.helpers.imagegen import box_mask, encode, photo


def _ms(fn: Callable[[], Any], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def cost(size: tuple[int, int], runs: int) -> dict[str, float]:
    width, height = size
    picture = photo(width, height)
    mask = box_mask(size, (width // 2, height // 3, width // 2 + 299, height // 3 + 199))
    upload = encode(picture)
    plan = plan_crop(mask, StitchOptions(), output_format="png")
    result = Image.new("RGB", plan.sent, (40, 120, 200))

    def decode() -> None:
        Image.open(io.BytesIO(upload)).convert("RGB")

    def crop() -> None:
        crop_for_backend(picture, mask, plan_crop(mask, StitchOptions(), output_format="png"))

    stitched = stitch(picture, mask, result, plan)
    return {"decode": _ms(decode, runs), "plan+crop+scale": _ms(crop, runs),
            "stitch (scale back + composite)": _ms(lambda: stitch(picture, mask, result, plan), runs),
            "encode output PNG": _ms(lambda: encode_image(stitched, "png"), runs)}


async def faithfulness(area: str, keep_unmasked: bool, folder: Path) -> float:
    from services import cli
    from services.config import BotConfig

    size = (384, 256)
    picture = photo(*size)
    mask = box_mask(size, (150, 80, 229, 159))
    (folder / "in.png").write_bytes(encode(picture))
    (folder / "mask.png").write_bytes(encode(mask))
    out = folder / f"out-{area}-{keep_unmasked}.png"
    args = cli.parser().parse_args(
        ["inpaint", "--image", str(folder / "in.png"), "--mask", str(folder / "mask.png"), "--prompt", "a red boat",
         "--out", str(out), "--seed", "1", "--area", area, "--size", "square", "--steps", "2",
         *([] if keep_unmasked else ["--no-keep-unmasked"])])
    await cli.run(args, BotConfig(_env_file=None))
    result = np.asarray(Image.open(out).convert("RGB")).astype(int)
    outside = np.ones(size[::-1], bool)
    outside[80 - 5:160 + 5, 150 - 5:230 + 5] = False  # the mask, its 4-pixel feather band and a pixel of slack
    return float(np.abs(result - np.asarray(picture).astype(int))[outside].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    for size in ((1024, 1024), (4000, 3000)):
        figures = cost(size, args.runs)
        print(f"{size[0]}×{size[1]}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in figures.items()))
    with tempfile.TemporaryDirectory() as tmp:
        from tests.helpers.tiny_sdxl import build_tiny_sdxl

        model = build_tiny_sdxl(Path(tmp) / "model")
        os.environ.update(MODEL_PATH=str(model), PIPELINE="sdxl", WARMUP="false")
        for area, keep in (("masked", True), ("whole", True), ("whole", False)):
            change = asyncio.run(faithfulness(area, keep, Path(tmp)))
            print(f"tiny SDXL, area {area}, keep_unmasked {keep}: mean |change| outside the mask {change:.2f}/255")


if __name__ == "__main__":
    main()
