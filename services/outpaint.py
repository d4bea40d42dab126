"""Canvas expansion: outpainting, Zoom Out and Pan. The picture is put on a larger canvas, the new area is pre-filled
with plausible colour so the model has context (the picture's edges mirrored outwards, then blurred: colour and
light, no copied detail), and the new area becomes the mask (see `OVERLAP` for why not more). The job then
runs through crop and stitch like any other, with the picture's own rectangle kept: its pixels come back bit for
bit, and only the new area is the model's.

Pure image work: callers run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageFilter

from services.blob import Blob
from services.images import ImageInputError, PreparedInputs, encode_image, mask_coverage

#: How far the mask reaches into the picture. None: an inpainting model is shown the picture *except* its masked
#: pixels, so a mask reaching into the picture would hide the very edge the new area must continue; and those
#: pixels are kept anyway (the picture comes back bit for bit). With no overlap the model sees the picture up to
#: its edge and paints outwards from it; the seam is where the picture ends.
OVERLAP = 0
#: The new area's pre-fill is only context for the model, nothing to keep: outpainting repaints it fully.
OUTPAINT_STRENGTH = 1.0
#: Zoom Out factors the result buttons offer, and how far Pan extends the canvas (of the picture's side).
ZOOM_FACTORS = (1.5, 2.0)
PAN_FRACTION = 0.5

Direction = Literal["left", "right", "up", "down"]


@dataclass(frozen=True)
class Expansion:
    """Pixels added on each side of the picture."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def canvas(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] + self.left + self.right, size[1] + self.top + self.bottom

    @property
    def empty(self) -> bool:
        return not (self.left or self.right or self.top or self.bottom)


def outpaint_options(options: dict[str, object]) -> dict[str, object]:
    """The options of an outpainting job: the new area is repainted fully (its pre-fill is only context)."""
    return {**options, "strength": OUTPAINT_STRENGTH}


def zoom_out(size: tuple[int, int], factor: float) -> Expansion:
    """The picture centred on a canvas `factor` times its size."""
    width, height = size
    extra_w, extra_h = round(width * (factor - 1)), round(height * (factor - 1))
    return Expansion(left=extra_w // 2, right=extra_w - extra_w // 2, top=extra_h // 2, bottom=extra_h - extra_h // 2)


def pan(size: tuple[int, int], direction: Direction, fraction: float = PAN_FRACTION) -> Expansion:
    """The canvas extended on one side by `fraction` of the picture's width or height."""
    across, down = round(size[0] * fraction), round(size[1] * fraction)
    return {"left": Expansion(left=across), "right": Expansion(right=across), "up": Expansion(top=down),
            "down": Expansion(bottom=down)}[direction]


def expand(picture: Image.Image, expansion: Expansion, *, max_pixels: int,
           overlap: int = OVERLAP) -> PreparedInputs:
    """The expanded canvas (pre-filled), its mask (the new area and `overlap` pixels into the picture) and the
    picture's rectangle to keep, ready to launch."""
    if expansion.empty:
        raise ImageInputError("empty_mask", "Add some pixels on at least one side to outpaint.")
    width, height = expansion.canvas(picture.size)
    if width * height > max_pixels:
        raise ImageInputError("too_many_pixels", f"The expanded picture would be {width}×{height}, more than the "
                              f"{max_pixels / 1e6:.0f} megapixels this bot takes. Expand it less.")
    canvas = _prefill(picture.convert("RGB"), expansion)
    keep = (expansion.left, expansion.top, picture.width, picture.height)
    mask = Image.new("L", (width, height), 255)
    x, y, w, h = keep
    inner = (x + (overlap if expansion.left else 0), y + (overlap if expansion.top else 0),
             x + w - (overlap if expansion.right else 0), y + h - (overlap if expansion.bottom else 0))
    mask.paste(0, inner)
    return PreparedInputs(image=canvas, mask=mask, image_blob=Blob(encode_image(canvas, "png"), "image/png"),
                          mask_blob=Blob(encode_image(mask, "png"), "image/png"), coverage=mask_coverage(mask),
                          mask_source="outpaint", source_format="PNG", animated=False, keep=keep)


def _prefill(picture: Image.Image, expansion: Expansion) -> Image.Image:
    """The picture mirrored outwards into the new area, the new area then blurred (the picture itself is not)."""
    source = np.asarray(picture)
    width, height = picture.size
    e = expansion
    while e.left > width - 1 or e.right > width - 1 or e.top > height - 1 or e.bottom > height - 1:
        # cv2's reflection reaches at most one picture's width: reflect in steps
        step = Expansion(min(e.left, width - 1), min(e.right, width - 1), min(e.top, height - 1),
                         min(e.bottom, height - 1))
        source = cv2.copyMakeBorder(source, step.top, step.bottom, step.left, step.right, cv2.BORDER_REFLECT_101)
        e = Expansion(e.left - step.left, e.right - step.right, e.top - step.top, e.bottom - step.bottom)
        height, width = source.shape[:2]
    filled = cv2.copyMakeBorder(source, e.top, e.bottom, e.left, e.right, cv2.BORDER_REFLECT_101)
    canvas = Image.fromarray(filled, "RGB")
    radius = max(8, round(max(canvas.size) / 64))
    blurred = canvas.filter(ImageFilter.GaussianBlur(radius))
    blurred.paste(picture, (expansion.left, expansion.top))
    return blurred
