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
from services.images import MASK_THRESHOLD, ImageInputError, encode_image
from services.schema import MAX_IMAGE_SIDE

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
    sent = working_size(crop[2], crop[3], target=target)
    if max(sent) > MAX_IMAGE_SIDE:
        raise ImageInputError("bad_shape", f"That area is too long and thin for the model ({crop[2]}×{crop[3]} "
                              "pixels): mask a shorter stretch, or crop the picture first.")
    return CropPlan(options=options, image_size=(width, height), crop=crop, sent=sent, output_format=output_format,
                    keep=keep)


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
    """The picture's crop and the mask's, at the working size. The mask stays binary, and any pixel the user marked
    stays marked however far the crop is shrunk (a 1-pixel stroke on a 6000-pixel picture included): the
    stitch puts the model's pixels there, so the model must have been asked to paint them."""
    region = image.crop(plan.box)
    mask_region = mask.crop(plan.box)
    if region.size == plan.sent:
        return region, mask_region.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)
    shrinking = plan.sent[0] < region.width
    region = region.resize(plan.sent, RESAMPLE)
    mask_region = mask_region.resize(plan.sent, Image.Resampling.BILINEAR)
    threshold = 1 if shrinking else MASK_THRESHOLD  # shrinking: any part of a marked pixel marks the new one
    return region, mask_region.point(lambda v: 255 if v >= threshold else 0)


def blend_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """The weight of the model's pixels (0–255): 255 in the mask, falling linearly outside it to 0 at `feather` + 1
    pixels away (a `feather`-pixel ramp), 0 beyond. `mask` is a boolean array."""
    if feather <= 0 or not mask.any():
        return np.where(mask, 255, 0).astype(np.uint8)
    alpha = np.zeros(mask.shape, np.uint8)
    rows, cols = np.nonzero(mask)
    reach = feather + 1  # only the mask's box and the band around it need a distance at all
    top, left = max(0, int(rows.min()) - reach), max(0, int(cols.min()) - reach)
    bottom, right = min(mask.shape[0], int(rows.max()) + reach + 1), min(mask.shape[1], int(cols.max()) + reach + 1)
    outside = np.where(mask[top:bottom, left:right], 0, 255).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    weight = np.clip(1.0 - distance / reach, 0.0, 1.0)
    alpha[top:bottom, left:right] = np.rint(weight * 255).astype(np.uint8)
    return alpha


def stitch_alpha(mask: Image.Image, plan: CropPlan) -> Image.Image:
    """The weight of the model's pixels over the crop (L, 0–255): the mask feathered outwards; everything under
    `area whole` without `keep_unmasked`; never inside the plan's `keep` rectangle."""
    x0, y0, x1, y1 = plan.box
    if plan.options.area == "whole" and not plan.options.keep_unmasked:
        alpha = np.full((y1 - y0, x1 - x0), 255, np.uint8)
    else:
        alpha = blend_alpha(np.asarray(mask.crop(plan.box).convert("L")) >= MASK_THRESHOLD, plan.options.feather)
    if plan.keep is not None:  # e.g. the picture inside an outpainting canvas: its pixels are never the model's
        kx, ky, kw, kh = plan.keep
        alpha[max(0, ky - y0):max(0, ky + kh - y0), max(0, kx - x0):max(0, kx + kw - x0)] = 0
    return Image.fromarray(alpha, "L")


def stitch(original: Image.Image, mask: Image.Image, result: Image.Image, plan: CropPlan) -> Image.Image:
    """`result` (the backend's output for the crop) put back into a copy of `original` through the feathered
    mask. An RGBA original keeps its alpha (the model's pixels are opaque)."""
    canvas = _canvas(original)
    _paste(canvas, original, stitch_alpha(mask, plan), result, plan)
    return canvas


def _canvas(original: Image.Image) -> Image.Image:
    return original.copy() if original.mode in ("RGB", "RGBA") else original.convert("RGB")


def _paste(canvas: Image.Image, original: Image.Image, alpha: Image.Image, result: Image.Image,
           plan: CropPlan) -> None:
    """Blend `result` into `canvas` where `alpha` says, from the original's pixels: only the part of the crop the
    weight reaches is touched (a result pasted into the same canvas again replaces the previous one exactly)."""
    x0, y0, x1, y1 = plan.box
    reach = alpha.getbbox()
    if reach is None:
        return
    back = result.convert(canvas.mode).resize((x1 - x0, y1 - y0), RESAMPLE).crop(reach)
    if canvas.mode == "RGBA":
        back.putalpha(255)
    box = (x0 + reach[0], y0 + reach[1], x0 + reach[2], y0 + reach[3])
    base = original.crop(box)
    base = base if base.mode == canvas.mode else base.convert(canvas.mode)
    canvas.paste(Image.composite(back, base, alpha.crop(reach)), box[:2])


def stitch_encoded(original: bytes, mask: bytes, results: list[bytes], plan: CropPlan) -> list[tuple[bytes, str]]:
    """`stitch` from and to encoded images: each result put back into the original, encoded in the plan's
    output format (PNG keeps the untouched pixels bit-identical, and an RGBA original's alpha). The original is
    decoded and copied once for all the results: each is pasted over the same area of one canvas in turn."""
    opened = Image.open(io.BytesIO(original))
    picture: Image.Image = opened if opened.mode in ("RGB", "RGBA") else opened.convert(
        "RGBA" if _has_alpha(opened) else "RGB")
    area = Image.open(io.BytesIO(mask)).convert("L")
    alpha = stitch_alpha(area, plan)
    canvas = _canvas(picture)
    encoded = []
    for data in results:
        _paste(canvas, picture, alpha, Image.open(io.BytesIO(data)), plan)
        if plan.output_format == "png":
            encoded.append((encode_image(canvas, "png"), "image/png"))
        else:
            encoded.append((encode_image(canvas, "jpeg", quality=92), "image/jpeg"))
    return encoded


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("LA", "PA", "La") or (image.mode == "P" and "transparency" in image.info)


def stage(image: Image.Image, mask: Image.Image, options: StitchOptions, *, output_format: OutputFormat,
          target: int = TARGET_PIXELS, keep: tuple[int, int, int, int] | None = None) -> tuple[CropPlan, bytes, bytes]:
    """Plan the crop of a new job and encode what the backend gets: (plan, crop PNG, crop mask PNG)."""
    plan = plan_crop(mask, options, output_format=output_format, target=target, keep=keep)
    region, region_mask = crop_for_backend(image, mask, plan)
    return plan, encode_image(region, "png"), encode_image(region_mask, "png")
