"""Test images made in code: photo-like pictures, masks, and hostile files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from services.images import to_data_uri

SHARED_EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "inpainting_examples"


def photo(width: int = 256, height: int = 192, *, seed: int = 1) -> Image.Image:
    """A deterministic photo-like RGB picture: a gradient, shapes and fine noise (so PNG can't shrink it)."""
    import numpy as np

    base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.normal(128, 40, (height, width)).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    im = Image.blend(base, noise, 0.35)
    draw = ImageDraw.Draw(im)
    draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(200, 60 + seed % 100, 40))
    return im.filter(ImageFilter.SMOOTH)


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "L") -> Image.Image:
    """White (repaint) rectangle on black, in any mode."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask if mode == "L" else mask.convert(mode)


def encode(im: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width×height pixels that compresses to a few tens of KiB."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row) for _ in range(height)]
    idat = b"".join(chunks) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_pair_uris(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] | None = None) -> tuple[str, str]:
    """A photo and a box mask as PNG data URIs (what the bot sends)."""
    w, h = size
    box = box or (w // 4, h // 4, 3 * w // 4 - 1, 3 * h // 4 - 1)
    return (to_data_uri(encode(photo(w, h)), "image/png"), to_data_uri(encode(box_mask(size, box)), "image/png"))
