"""Preview images: the user's image with the mask painted over it, so a wrong mask is obvious at a glance."""

from __future__ import annotations

from PIL import Image, ImageChops, ImageFilter

from services.errors import UserError
from services.images import (
    IntakeLimits,
    MaskOptions,
    decode_image,
    decode_mask,
    encode_image,
    to_rgb,
    understood_mask,
)

OVERLAY_RGB = (255, 48, 96)


def mask_overlay(image: Image.Image, mask: Image.Image, *, max_side: int = 512) -> Image.Image:
    """The image, scaled to fit `max_side`, with the repaint area tinted and outlined."""
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    area = mask.convert("L").resize(size, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
    tint = Image.new("RGB", size, OVERLAY_RGB)
    out = Image.composite(Image.blend(base, tint, 0.55), base, area)
    edge = ImageChops.subtract(area.filter(ImageFilter.MaxFilter(3)), area.filter(ImageFilter.MinFilter(3)))
    out.paste(OVERLAY_RGB, mask=edge)
    return out


def mask_overlay_jpeg(image: Image.Image, mask: Image.Image, *, max_side: int = 512) -> bytes:
    return encode_image(mask_overlay(image, mask, max_side=max_side), "jpeg", quality=85)


def understood_jpeg(image_bytes: bytes, mask_bytes: bytes | None, limits: IntakeLimits,
                    options: MaskOptions | None = None) -> bytes:
    """What the bot made of an image and its mask, side by side: the image with the mask overlaid, and the mask
    itself (white = repaint). Shown when a mask is refused, so the user sees why."""
    decoded = decode_image(image_bytes, limits, role="image")
    rgb = to_rgb(decoded.image)
    mask_l, mask_rgb = decode_mask(mask_bytes, limits) if mask_bytes is not None else (None, None)
    mask, _ = understood_mask(decoded, rgb, mask_l, options or MaskOptions(), mask_rgb=mask_rgb)
    left = mask_overlay(rgb, mask, max_side=384)
    right = mask.convert("RGB").resize(left.size, Image.Resampling.NEAREST)
    sheet = Image.new("RGB", (left.width * 2 + 8, left.height), (32, 34, 37))
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width + 8, 0))
    return encode_image(sheet, "jpeg", quality=85)


_NAMED_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "magenta": (255, 0, 255),
                  "pink": (255, 0, 255), "yellow": (255, 255, 0), "cyan": (0, 255, 255), "white": (255, 255, 255),
                  "black": (0, 0, 0)}


def parse_colour(text: str) -> tuple[int, int, int]:
    """`#ff00ff`, `ff00ff` or a colour name, as RGB; a `UserError` otherwise."""
    value = text.strip().lower()
    if value in _NAMED_COLOURS:
        return _NAMED_COLOURS[value]
    digits = value.removeprefix("#")
    if len(digits) == 6 and all(c in "0123456789abcdef" for c in digits):
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)
    raise UserError(f"`{text}` isn't a colour: use a name ({', '.join(sorted(_NAMED_COLOURS))}) or a hex code "
                    "like #ff00ff.")
