"""Preview images: the user's image with the mask painted over it, so a wrong mask is obvious at a glance."""

from __future__ import annotations

from PIL import Image, ImageChops, ImageFilter

from services.images import encode_image

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
