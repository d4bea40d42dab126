"""Image and mask intake: bytes, `http(s)` URLs or `data:` URIs in; an RGB image and a binary L mask out.

Everything here that touches pixels is synchronous and CPU-bound; async callers use `prepare_inputs_async`
(or `asyncio.to_thread`) so the event loop never decodes an image itself.

Conventions: mask white (255) = repaint, black (0) = keep. A transparent PNG without a separate mask is
read as "transparent area = repaint".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, TypeVar

from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from services.blob import Blob
from services.url_fetch import PUBLIC_MESSAGE, STRICT, FetchError, FetchPolicy, FetchTooLarge, fetch_url

#: Formats we accept, by sniffed content (Pillow identifies by magic bytes, never by name or MIME type).
#: MPO is how Pillow names many phone-camera JPEGs; AVIF is taken when this Pillow build has it.
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(
    f for f in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "AVIF") if f in Image.OPEN)
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MASK_THRESHOLD = 128
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_A = TypeVar("_A")
_B = TypeVar("_B")
#: A mask whose aspect ratio differs from the image's by more than this is a wrong mask, not a resizable one.
ASPECT_TOLERANCE = 0.02

ErrorCode = Literal[
    "mask_unclear",
    "not_an_image",
    "unsupported_format",
    "truncated",
    "too_many_bytes",
    "too_many_pixels",
    "too_small",
    "bad_source",
    "download_failed",
    "mask_mismatch",
    "empty_mask",
    "full_mask",
    "no_mask",
    "bad_shape",
]


class ImageInputError(ValueError):
    """An image or mask a user sent that we cannot use. `message` is safe to show to the user."""

    def __init__(self, code: ErrorCode, message: str, *, role: str = "image") -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.role = role


@dataclass(frozen=True)
class IntakeLimits:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 64
    #: the total deadline of a download (lookup, connection, redirects and every byte), not a per-read timeout
    download_timeout_s: float = 20.0


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, orientation-corrected image and what we learned about its source."""

    image: Image.Image
    source_format: str
    source_mode: str
    animated: bool
    has_alpha: bool
    #: True when `image` is pixel-for-pixel what the source bytes decode to (no rotation, no mode change).
    untouched: bool


@dataclass(frozen=True)
class MaskOptions:
    invert: bool = False
    #: the colour the user painted straight onto the image (no separate mask): those pixels are repainted
    paint_colour: tuple[int, int, int] | None = None


MaskSource = Literal["attachment", "alpha", "painted_copy", "colour", "outpaint"]


@dataclass(frozen=True)
class PreparedInputs:
    """An image and its mask, validated, normalised, and encoded ready to send to a backend."""

    image: Image.Image
    mask: Image.Image
    image_blob: Blob
    mask_blob: Blob
    coverage: float
    mask_source: MaskSource
    source_format: str
    animated: bool
    #: a rectangle (x, y, width, height) whose pixels must come back untouched whatever the mask says (the
    #: picture inside an outpainting canvas)
    keep: tuple[int, int, int, int] | None = None
    #: the upload with its transparency (RGBA PNG), when it had any: the model gets `image` (flattened onto white)
    #: and the result is put back into this, so transparent pixels come back as they were
    original: Blob | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# --- bytes and URIs -----------------------------------------------------------------------------------

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def to_data_uri(data: bytes, content_type: str) -> str:
    """Encode bytes as a `data:` URI, the form fal accepts for any file input."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def parse_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """Decode a `data:` URI, refusing it before decoding when it would exceed `max_bytes`."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise ImageInputError("bad_source", "That data URI is malformed.")
    payload = uri[match.end():]
    if not match.group("b64"):
        raise ImageInputError("bad_source", "Only base64 data URIs are supported.")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageInputError("too_many_bytes", _too_many_bytes_message(max_bytes))
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError("bad_source", "That data URI is not valid base64.") from exc


async def fetch_source(source: str | bytes, *, limits: IntakeLimits, role: str = "image",
                       policy: FetchPolicy = STRICT) -> bytes:
    """Bytes from raw bytes, a `data:` URI or an `http(s)` URL, never reading more than `limits.max_bytes`.

    A URL is downloaded as `policy` allows (`services.url_fetch`; the default, `STRICT`, reaches public addresses
    only), within `limits.download_timeout_s` in all. Every failed download reads the same to the user
    (`url_fetch.PUBLIC_MESSAGE`: "download_failed"), except a file over the cap ("too_many_bytes"); the cause is
    logged. Each download makes its own connections, only to addresses the policy checked.
    """
    try:
        if isinstance(source, bytes):
            if len(source) > limits.max_bytes:
                raise ImageInputError("too_many_bytes", _too_many_bytes_message(limits.max_bytes))
            return source
        if source[:5].lower() == "data:":
            return parse_data_uri(source, max_bytes=limits.max_bytes)
        if source[:8].lower().startswith(("http://", "https://")):
            return await _download(source, limits=limits, policy=policy)
        raise ImageInputError("bad_source", "Images must be attachments, http(s) links or data URIs.")
    except ImageInputError as exc:
        exc.role = role
        raise


async def _download(url: str, *, limits: IntakeLimits, policy: FetchPolicy) -> bytes:
    try:
        return await fetch_url(url, policy=policy, max_bytes=limits.max_bytes, deadline_s=limits.download_timeout_s)
    except FetchTooLarge as exc:
        raise ImageInputError("too_many_bytes", _too_many_bytes_message(limits.max_bytes)) from exc
    except FetchError as exc:
        raise ImageInputError("download_failed", PUBLIC_MESSAGE) from exc


def _too_many_bytes_message(max_bytes: int) -> str:
    return f"That file is too large (the limit is {max_bytes / (1024 * 1024):.0f} MiB)."


# --- decoding -----------------------------------------------------------------------------------------

def decode_image(data: bytes, limits: IntakeLimits, *, role: str = "image") -> DecodedImage:
    """Decode untrusted bytes into a fully-loaded, orientation-corrected image (mode not yet normalised).

    Raises `ImageInputError` for anything a user could send wrong: not an image, a format we don't take,
    a truncated file, a decompression bomb, too many bytes, too small.
    """
    if len(data) > limits.max_bytes:
        raise ImageInputError("too_many_bytes", _too_many_bytes_message(limits.max_bytes), role=role)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError("too_many_pixels", _too_many_pixels_message(limits.max_pixels), role=role) from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError("not_an_image", _not_an_image_message(data), role=role) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError("not_an_image", "That file is damaged and can't be read as an image.",
                              role=role) from exc

    width, height = im.size
    if width * height > limits.max_pixels:
        raise ImageInputError("too_many_pixels", _too_many_pixels_message(limits.max_pixels), role=role)
    if min(width, height) < limits.min_side:
        raise ImageInputError(
            "too_small", f"That {role} is {width}×{height}; it must be at least {limits.min_side} pixels "
            "on each side.", role=role)

    source_format = im.format or "unknown"
    animated = bool(getattr(im, "is_animated", False))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError("truncated", f"That {role} file is truncated or corrupt.", role=role) from exc

    source_mode = im.mode
    has_alpha = _has_transparency(im)
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    rotated = orientation not in (None, 1)
    if rotated:
        ImageOps.exif_transpose(im, in_place=True)
    return DecodedImage(image=im, source_format=source_format, source_mode=source_mode,
                        animated=animated, has_alpha=has_alpha, untouched=not rotated and not animated)


def _not_an_image_message(data: bytes) -> str:
    head = data[:16]
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF files aren't supported; please send a PNG, JPEG or WebP."
    return "That file isn't an image we can read; please send a PNG, JPEG or WebP."


def _too_many_pixels_message(max_pixels: int) -> str:
    return f"That image has too many pixels (the limit is {max_pixels / 1e6:.0f} megapixels)."


def _has_transparency(im: Image.Image) -> bool:
    if im.mode in _ALPHA_MODES:
        return _band_min(im.getchannel("A")) < 255
    return im.mode == "P" and "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Normalise any decoded mode to 8-bit RGB (transparency composited onto white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        scale = 1 / 256 if im.mode.startswith("I;16") or _max_value(im) > 255 else 1.0
        return im.convert("I").point(lambda v: v * scale).convert("L").convert("RGB")
    if im.mode == "F":
        return im.convert("L").convert("RGB")
    return _flatten_alpha(im, (255, 255, 255, 255)).convert("RGB")


def to_mask_l(im: Image.Image) -> Image.Image:
    """Any decoded mask mode as 8-bit luminance, before thresholding.

    A mask with real transparency is composited onto black, so white strokes on a transparent layer read as
    "repaint here" and the untouched transparent area as "keep".
    """
    if im.mode == "L":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_rgb(im).convert("L")
    return _flatten_alpha(im, (0, 0, 0, 255)).convert("L")


def _flatten_alpha(im: Image.Image, background: tuple[int, int, int, int]) -> Image.Image:
    """Composite an image with transparency onto a solid background; other images are returned as they are."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in _ALPHA_MODES:
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)


def _max_value(im: Image.Image) -> float:
    extrema = im.getextrema()
    assert isinstance(extrema, tuple) and not isinstance(extrema[0], tuple), "single-band image expected"
    return float(extrema[1])


def _band_min(band: Image.Image) -> float:
    extrema = band.getextrema()
    assert isinstance(extrema, tuple) and not isinstance(extrema[0], tuple), "single-band image expected"
    return float(extrema[0])


# --- masks --------------------------------------------------------------------------------------------

def _threshold_lut(invert: bool) -> list[int]:
    return [(0 if v >= MASK_THRESHOLD else 255) if invert else (255 if v >= MASK_THRESHOLD else 0)
            for v in range(256)]


_LUT = {False: _threshold_lut(False), True: _threshold_lut(True)}


def mask_from_alpha(im: Image.Image) -> Image.Image | None:
    """The transparent area of an image as a mask (white = repaint), or None when it has no transparency."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in _ALPHA_MODES:
        return None
    alpha = im.getchannel("A")
    if _band_min(alpha) == 255:
        return None
    return alpha.point(_LUT[True])


def fit_mask(mask: Image.Image, size: tuple[int, int], options: MaskOptions = MaskOptions()) -> Image.Image:
    """Resize a luminance mask to `size`, binarise it (≥128 → repaint), optionally invert it. (Seams are softened
    when the result is put back: `services/stitch.py`.)

    Raises `mask_mismatch` when the mask's aspect ratio is not the image's: that is a wrong mask, and
    stretching it would repaint the wrong place.
    """
    if mask.mode != "L":
        mask = to_mask_l(mask)
    if mask.size != size:
        mw, mh = mask.size
        iw, ih = size
        if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
            raise ImageInputError(
                "mask_mismatch", f"The mask is {mw}×{mh} but the image is {iw}×{ih}: their shapes don't "
                "match. Export the mask from the same image.", role="mask")
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask.point(_LUT[options.invert])


def mask_coverage(mask: Image.Image) -> float:
    """Fraction of pixels that will be repainted (mask value ≥ 128)."""
    hist = mask.histogram()
    total = mask.size[0] * mask.size[1]
    return sum(hist[MASK_THRESHOLD:256]) / total if total else 0.0


def check_coverage(coverage: float) -> None:
    """Refuse a mask that repaints nothing or everything: both are user mistakes that waste GPU time."""
    if coverage <= 0.0:
        raise ImageInputError(
            "empty_mask", "The mask is empty: nothing would be repainted. Paint the area to change in white "
            "(or use invert if you painted it in black).", role="mask")
    if coverage >= 1.0:
        raise ImageInputError(
            "full_mask", "The mask covers the whole image: that repaints everything. Paint only the area to "
            "change in white (or use invert if you painted the area to keep).", role="mask")


# --- encoding -----------------------------------------------------------------------------------------

def encode_image(im: Image.Image, fmt: Literal["png", "jpeg", "webp"] = "png", *, quality: int = 92,
                 png_compress_level: int = 1) -> bytes:
    """Encode an image for sending or posting. JPEG/WebP get RGB; PNG keeps L or RGB(A)."""
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=png_compress_level)
    elif fmt == "jpeg":
        im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    else:
        im.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


def _image_blob(decoded: DecodedImage, rgb: Image.Image, raw: bytes) -> Blob:
    """The bytes to send for the image: the user's own file when it is already a plain RGB PNG/JPEG."""
    fmt = decoded.source_format.lower()
    if decoded.untouched and decoded.source_mode == "RGB" and fmt in ("png", "jpeg"):
        return Blob(raw, CONTENT_TYPES[fmt])
    return Blob(encode_image(rgb, "png"), "image/png")


def sniff_format(data: bytes) -> str | None:
    """The image format of some bytes, from their header alone (None when Pillow doesn't know them)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (UnidentifiedImageError, OSError):
        return None


def normalized_image(data: bytes, limits: IntakeLimits) -> tuple[Image.Image, Blob]:
    """A decoded RGB image and the bytes to keep for it (the user's own file when it is a plain RGB PNG/JPEG)."""
    decoded = decode_image(data, limits, role="image")
    rgb = to_rgb(decoded.image)
    return rgb, _image_blob(decoded, rgb, data)


# --- the whole intake ---------------------------------------------------------------------------------

def decode_mask(data: bytes, limits: IntakeLimits) -> tuple[Image.Image | None, Image.Image | None]:
    """Decode an uploaded mask: (luminance mask, None) for a black-and-white one, (None, the picture) for a
    colour one (a painted copy of the image)."""
    image = decode_image(data, limits, role="mask").image
    if is_colour_mask(image) and not _has_transparency(image):
        return None, image
    return to_mask_l(image), None


def assemble_inputs(decoded: DecodedImage, image_bytes: bytes, mask_l: Image.Image | None,
                    options: MaskOptions = MaskOptions(), *, mask_rgb: Image.Image | None = None) -> PreparedInputs:
    """Combine a decoded image with its mask into ready-to-send inputs. The mask is, in order: a painted copy
    of the image (`mask_rgb` in colour), a black-and-white mask (`mask_l`), the colour painted onto the image
    (`options.paint_colour`), or the image's own transparent area."""
    rgb = to_rgb(decoded.image)
    mask, source = understood_mask(decoded, rgb, mask_l, options, mask_rgb=mask_rgb)
    coverage = mask_coverage(mask)
    check_coverage(coverage)
    original = Blob(encode_image(decoded.image.convert("RGBA"), "png"), "image/png") if decoded.has_alpha else None
    return PreparedInputs(
        image=rgb, mask=mask, image_blob=_image_blob(decoded, rgb, image_bytes),
        mask_blob=Blob(encode_image(mask, "png"), "image/png"), coverage=coverage, mask_source=source,
        source_format=decoded.source_format, animated=decoded.animated, original=original)


def understood_mask(decoded: DecodedImage, rgb: Image.Image, mask_l: Image.Image | None,
                    options: MaskOptions = MaskOptions(), *,
                    mask_rgb: Image.Image | None = None) -> tuple[Image.Image, MaskSource]:
    """The binary mask as the bot reads it (before the empty/full check), and where it came from."""
    source: MaskSource
    if mask_rgb is not None:
        mask_l, source = mask_from_painted_copy(rgb, mask_rgb), "painted_copy"
    elif mask_l is not None:
        source = "attachment"
    elif options.paint_colour is not None:
        mask_l, source = mask_from_colour(rgb, options.paint_colour), "colour"
    else:
        mask_l, source = mask_from_alpha(decoded.image), "alpha"
        if mask_l is None:
            raise ImageInputError(
                "no_mask", "No mask was given and the image has no transparent area. Attach a mask (white = "
                "repaint) or send a PNG whose area to repaint is transparent.", role="mask")
    return fit_mask(mask_l, rgb.size, options), source


# --- painted masks ----------------------------------------------------------------------------------------

#: a pixel counts as painted when some channel moved by more than this (JPEG noise stays well below)
PAINT_DIFF = 48
COLOUR_TOLERANCE = 60


def is_colour_mask(im: Image.Image) -> bool:
    """True when a mask upload is a colour picture rather than black-and-white (with some JPEG slack)."""
    if im.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return False
    r, g, b = im.convert("RGB").split()
    spread = ImageChops.lighter(ImageChops.difference(r, g), ImageChops.difference(g, b))
    hist = spread.histogram()
    coloured = sum(hist[24:])
    return coloured > 0.005 * im.width * im.height


def mask_from_painted_copy(original: Image.Image, painted: Image.Image) -> Image.Image:
    """The strokes a user painted on a copy of the image: the pixels that differ from the original, when they
    differ in one roughly uniform colour over part (not all) of the picture."""
    painted = to_rgb(painted)
    if painted.size != original.size:
        pw, ph = painted.size
        if abs((pw / ph) / (original.width / original.height) - 1) > ASPECT_TOLERANCE:
            raise ImageInputError("mask_mismatch", f"The painted copy is {pw}×{ph} but the image is "
                                  f"{original.width}×{original.height}: paint on the same image.", role="mask")
        painted = painted.resize(original.size, Image.Resampling.BILINEAR)
    diff = ImageChops.difference(original, painted)
    r, g, b = diff.split()
    strongest = ImageChops.lighter(ImageChops.lighter(r, g), b)
    mask = strongest.point(lambda v: 255 if v > PAINT_DIFF else 0).filter(ImageFilter.MedianFilter(3))
    share = mask_coverage(mask)
    if share > 0.9:
        raise ImageInputError("mask_unclear", "The mask is a colour picture that doesn't look like a painted copy "
                              "of the image. Send a black-and-white mask (white = repaint), or the image with "
                              "the area to change painted over in one solid colour.", role="mask")
    if share > 0 and not _uniform(painted, mask):
        raise ImageInputError("mask_unclear", "The mask looks like a painted copy of the image, but the painted "
                              "area isn't one solid colour, so it can't be told apart reliably. Paint it in one "
                              "bright colour, or send a black-and-white mask.", role="mask")
    return _grow(mask)


def mask_from_colour(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """The pixels painted in `colour` (within a tolerance) on the image itself."""
    flat = Image.new("RGB", image.size, colour)
    r, g, b = ImageChops.difference(image, flat).split()
    distance = ImageChops.lighter(ImageChops.lighter(r, g), b)
    mask = distance.point(lambda v: 255 if v <= COLOUR_TOLERANCE else 0).filter(ImageFilter.MedianFilter(3))
    return _grow(mask)


def _uniform(painted: Image.Image, mask: Image.Image) -> bool:
    """Whether the masked pixels of `painted` are close to a single colour."""
    from PIL import ImageStat

    stats = ImageStat.Stat(painted, mask.point(lambda v: 255 if v else 0))
    return max(stats.stddev) < 40


def _grow(mask: Image.Image) -> Image.Image:
    """Widen by 2 px so the soft edge of a brush stroke is repainted too, not left as a coloured fringe."""
    return mask.filter(ImageFilter.MaxFilter(5))


def prepare_inputs(image_bytes: bytes, mask_bytes: bytes | None, *, limits: IntakeLimits,
                   options: MaskOptions = MaskOptions()) -> PreparedInputs:
    """Validate and normalise an image and its mask (or the image's transparency), ready to send.

    Synchronous and CPU-bound: async code calls `prepare_inputs_async`.
    """
    decoded = decode_image(image_bytes, limits, role="image")
    mask_l, mask_rgb = decode_mask(mask_bytes, limits) if mask_bytes is not None else (None, None)
    return assemble_inputs(decoded, image_bytes, mask_l, options, mask_rgb=mask_rgb)


async def prepare_inputs_async(image: str | bytes, mask: str | bytes | None, *, limits: IntakeLimits,
                               options: MaskOptions = MaskOptions(),
                               policy: FetchPolicy = STRICT) -> PreparedInputs:
    """Fetch (bytes, data: URI or http(s) URL, URLs as `policy` allows: `fetch_source`) and prepare an image and
    mask without blocking the loop.

    The image and the mask are fetched, then decoded, concurrently (in worker threads); when both are
    wrong, the image's error is the one reported.
    """
    if mask is None:
        image_bytes = await fetch_source(image, limits=limits, role="image", policy=policy)
        return await asyncio.to_thread(prepare_inputs, image_bytes, None, limits=limits, options=options)
    image_bytes, mask_bytes = await _both(fetch_source(image, limits=limits, role="image", policy=policy),
                                          fetch_source(mask, limits=limits, role="mask", policy=policy))
    decoded, (mask_l, mask_rgb) = await _both(asyncio.to_thread(decode_image, image_bytes, limits, role="image"),
                                              asyncio.to_thread(decode_mask, mask_bytes, limits))
    return await asyncio.to_thread(lambda: assemble_inputs(decoded, image_bytes, mask_l, options, mask_rgb=mask_rgb))


async def _both(first: Awaitable[_A], second: Awaitable[_B]) -> tuple[_A, _B]:
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    if isinstance(a, BaseException):
        raise a
    if isinstance(b, BaseException):
        raise b
    return a, b
