"""The served size grid (`COMPILE_SIZES`): the image sizes the compiled UNet serves and warms up at start.

A request is served by the compiled UNet when its latent size (image height and width divided by the VAE's scale
factor) is exactly that of a size in the grid and its padded batch was warmed up; any other request runs on the
uncompiled UNet, so nothing ever compiles on a user's time. By default the grid is fal's six `image_size` presets
(https://fal.ai/models/fal-ai/fast-sdxl/inpainting/api, `image_size`: square_hd, square, portrait_4_3,
portrait_16_9, landscape_4_3, landscape_16_9), scaled to the model: SDXL's native side is 1024 px, a model with a
smaller native side (the tests' tiny model) gets the presets scaled down by the same ratio.
"""

from __future__ import annotations

from services.schema import IMAGE_SIZE_PRESETS

Size = tuple[int, int]  # (width, height) in pixels

#: the native side the presets are designed for (SDXL: a 128² latent × 8)
PRESET_NATIVE_SIDE = 1024


def parse_sizes(text: str) -> list[Size]:
    """`"1024x1024, 768x1024"` → [(1024, 1024), (768, 1024)] (width × height, in pixels)."""
    sizes = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        width, sep, height = part.partition("x")
        if not sep or not width.strip().isdigit() or not height.strip().isdigit():
            raise ValueError(f"COMPILE_SIZES entry {part!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        size = (int(width), int(height))
        if min(size) < 8:
            raise ValueError(f"COMPILE_SIZES entry {part!r} is too small")
        if size not in sizes:
            sizes.append(size)
    return sizes


def default_sizes(native_side: int, multiple: int) -> list[Size]:
    """fal's six presets scaled by `native_side / 1024`, each side rounded to a multiple of `multiple` px."""
    sizes: list[Size] = []
    for width, height in IMAGE_SIZE_PRESETS.values():
        size = (_scaled(width, native_side, multiple), _scaled(height, native_side, multiple))
        if size not in sizes:
            sizes.append(size)
    return sizes


def _scaled(side: int, native_side: int, multiple: int) -> int:
    return max(multiple, round(side * native_side / PRESET_NATIVE_SIDE / multiple) * multiple)


def latent_size(size: Size, vae_scale_factor: int) -> tuple[int, int]:
    """The UNet's (height, width) for an image of `size` (width, height) pixels."""
    width, height = size
    return height // vae_scale_factor, width // vae_scale_factor
