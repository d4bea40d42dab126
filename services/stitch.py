"""Crop and stitch: the model works on the region around the mask at its best resolution, and its result is blended
back into the user's own picture, so only the masked area (and a thin feathered band around it) changes, at the
picture's own size.

1. `plan_crop`: the mask's bounding box, grown by a context padding, then grown again to the aspect ratio of an
   SDXL working size near one megapixel (sides multiples of 8), and clamped to the picture. The crop is scaled to
   that working size: up for small regions, down for large ones.
2. `crop_for_backend`: the crop of the picture and of its mask, at the working size, as the backend gets them.
3. `stitch`: the backend's result scaled back to the crop's size and composited into the original through the
   mask, feathered outwards by `feather` pixels. Pixels outside the mask and its feather band are the original's,
   bit for bit.

Several distant masked regions get one crop covering them all, not one crop each: the hosted endpoint takes one
image per request, so one crop per region would cost one request (and one seed, one look) per region; one crop
keeps the regions consistent and costs one request. The price is detail: far-apart regions make a large crop that
is scaled down more. A mask covering most of the picture simply gets the whole picture as its crop.

`area="whole"` is the old behaviour for global restyles: the whole picture at about one megapixel. Its unmasked
pixels are still restored at full size unless `keep_unmasked` is off (then the model's whole output is used,
scaled to the picture's size).

This module is pure image work (Pillow, NumPy, OpenCV): callers run it in a thread.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from services.crop_plan import CropPlan, OutputFormat, StitchOptions
from services.images import MASK_THRESHOLD, encode_image

#: SDXL works best near one megapixel.
TARGET_PIXELS = 1024 * 1024
#: Working sizes are multiples of this (what SDXL's VAE needs).
MULTIPLE = 8
#: Context around the mask when no padding is given: a quarter of the mask's longer side, at least this.
MIN_AUTO_PADDING = 32
#: SDXL's trained aspect ratios span about 1:4 to 4:1; a crop is kept within them where the picture allows.
MAX_ASPECT = 4.0
#: Scaling the crop to the working size and the result back: bicubic (antialiased when shrinking) is a third
#: cheaper than Lanczos here, and the difference is below what SDXL's own VAE round trip changes.
RESAMPLE = Image.Resampling.BICUBIC


def working_size(width: int, height: int, *, target: int = TARGET_PIXELS) -> tuple[int, int]:
    """A size with this aspect ratio and about `target` pixels, sides multiples of 8."""
    scale = (target / (width * height)) ** 0.5
    return (max(MULTIPLE, round(width * scale / MULTIPLE) * MULTIPLE),
            max(MULTIPLE, round(height * scale / MULTIPLE) * MULTIPLE))


def auto_padding(box: tuple[int, int, int, int]) -> int:
    x0, y0, x1, y1 = box
    return max(MIN_AUTO_PADDING, round(0.25 * max(x1 - x0, y1 - y0)))


def _grow(start: int, length: int, wanted: int, limit: int) -> tuple[int, int]:
    """Grow the span [start, start + length) to `wanted` around its centre, kept inside [0, limit)."""
    wanted = min(max(wanted, length), limit)
    start = start - (wanted - length) // 2
    return min(max(0, start), limit - wanted), wanted


def plan_crop(mask: Image.Image, options: StitchOptions, *, output_format: OutputFormat,
              target: int = TARGET_PIXELS, keep: tuple[int, int, int, int] | None = None) -> CropPlan:
    """The crop for a binary mask (white = repaint) of the picture's size."""
    width, height = mask.size
    bbox = mask.point(lambda v: 255 if v >= MASK_THRESHOLD else 0).getbbox()
    if options.area == "whole" or bbox is None:
        crop = (0, 0, width, height)
    else:
        crop = _context_box(bbox, (width, height), options, target)
    return CropPlan(options=options, image_size=(width, height), crop=crop,
                    sent=working_size(crop[2], crop[3], target=target), output_format=output_format, keep=keep)


def _context_box(bbox: tuple[int, int, int, int], size: tuple[int, int], options: StitchOptions,
                 target: int) -> tuple[int, int, int, int]:
    """The mask's box with its padding (at least the feather band), grown to a working size's aspect ratio
    (within 1:4 and 4:1) and kept inside the picture; as (x, y, width, height)."""
    width, height = size
    pad = max(options.padding if options.padding is not None else auto_padding(bbox), options.feather + 1)
    x0, y0 = max(0, bbox[0] - pad), max(0, bbox[1] - pad)
    w, h = min(width, bbox[2] + pad) - x0, min(height, bbox[3] + pad) - y0
    aspect = min(max(w / h, 1 / MAX_ASPECT), MAX_ASPECT)
    sent_w, sent_h = working_size(max(w, round(h * aspect)), max(h, round(w / aspect)), target=target)
    # the smallest box of exactly the working size's aspect that holds the padded mask box
    box_h = max(h, -(-w * sent_h // sent_w))
    box_w = max(w, -(-box_h * sent_w // sent_h))
    x, w = _grow(x0, w, box_w, width)
    y, h = _grow(y0, h, box_h, height)
    return x, y, w, h


def crop_for_backend(image: Image.Image, mask: Image.Image, plan: CropPlan) -> tuple[Image.Image, Image.Image]:
    """The picture's crop and the mask's, at the working size (the mask stays binary)."""
    region = image.crop(plan.box)
    mask_region = mask.crop(plan.box)
    if region.size != plan.sent:
        region = region.resize(plan.sent, RESAMPLE)
        mask_region = mask_region.resize(plan.sent, Image.Resampling.BILINEAR)
    return region, mask_region.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def blend_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """The weight of the model's pixels (0–255): 255 in the mask, falling linearly to 0 over `feather` pixels
    outside it, 0 beyond. `mask` is a boolean array."""
    if feather <= 0:
        return np.where(mask, 255, 0).astype(np.uint8)
    outside = np.where(mask, 0, 255).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    weight = np.clip(1.0 - distance / (feather + 1), 0.0, 1.0)
    return np.rint(weight * 255).astype(np.uint8)


def stitch(original: Image.Image, mask: Image.Image, result: Image.Image, plan: CropPlan) -> Image.Image:
    """`result` (the backend's output for the crop) put back into a copy of `original` through the feathered
    mask. Outside the crop nothing is even touched."""
    x0, y0, x1, y1 = plan.box
    back = result.convert("RGB").resize((x1 - x0, y1 - y0), RESAMPLE)
    if plan.options.area == "whole" and not plan.options.keep_unmasked:
        alpha = np.full((y1 - y0, x1 - x0), 255, np.uint8)
    else:
        inside = np.asarray(mask.crop(plan.box).convert("L")) >= MASK_THRESHOLD
        alpha = blend_alpha(inside, plan.options.feather)
    if plan.keep is not None:  # e.g. the picture inside an outpainting canvas: its pixels are never the model's
        kx, ky, kw, kh = plan.keep
        alpha[max(0, ky - y0):max(0, ky + kh - y0), max(0, kx - x0):max(0, kx + kw - x0)] = 0
    picture = original if original.mode == "RGB" else original.convert("RGB")
    base = np.asarray(picture.crop(plan.box), dtype=np.uint16)
    model = np.asarray(back, dtype=np.uint16)
    a = alpha.astype(np.uint16)[:, :, None]
    mixed = ((model * a + base * (255 - a) + 127) // 255).astype(np.uint8)
    out = picture.copy()
    out.paste(Image.fromarray(mixed, "RGB"), (x0, y0))
    return out


def stitch_encoded(original: bytes, mask: bytes, results: list[bytes], plan: CropPlan) -> list[tuple[bytes, str]]:
    """`stitch` from and to encoded images: each result put back into the original, encoded in the plan's
    output format (PNG keeps the untouched pixels bit-identical). The original is decoded once for all."""
    picture = Image.open(io.BytesIO(original)).convert("RGB")
    area = Image.open(io.BytesIO(mask)).convert("L")
    encoded = []
    for data in results:
        stitched = stitch(picture, area, Image.open(io.BytesIO(data)), plan)
        if plan.output_format == "png":
            encoded.append((encode_image(stitched, "png"), "image/png"))
        else:
            encoded.append((encode_image(stitched, "jpeg", quality=92), "image/jpeg"))
    return encoded


def stage(image: Image.Image, mask: Image.Image, options: StitchOptions, *, output_format: OutputFormat,
          target: int = TARGET_PIXELS, keep: tuple[int, int, int, int] | None = None) -> tuple[CropPlan, bytes, bytes]:
    """Plan the crop of a new job and encode what the backend gets: (plan, crop PNG, crop mask PNG)."""
    plan = plan_crop(mask, options, output_format=output_format, target=target, keep=keep)
    region, region_mask = crop_for_backend(image, mask, plan)
    return plan, encode_image(region, "png"), encode_image(region_mask, "png")
