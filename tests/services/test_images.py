"""Image and mask intake: real photos, hostile files, mask conventions, sources over real HTTP."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from services.images import (
    ImageInputError,
    IntakeLimits,
    MaskOptions,
    decode_image,
    encode_image,
    fetch_source,
    fit_mask,
    mask_coverage,
    parse_data_uri,
    prepare_inputs,
    prepare_inputs_async,
    to_data_uri,
)
from services.url_fetch import fetch_policy
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import SHARED_EXAMPLES, box_mask, encode, photo, png_bomb

LIMITS = IntakeLimits()


def _examples() -> list[tuple[Path, Path]]:
    if not SHARED_EXAMPLES.is_dir():
        return []
    return [(p, p.with_name(p.stem + "_mask.png")) for p in sorted(SHARED_EXAMPLES.glob("*.png"))
            if not p.stem.endswith("_mask") and p.with_name(p.stem + "_mask.png").exists()]


@pytest.mark.skipif(not _examples(), reason=f"real example photos not found at {SHARED_EXAMPLES}")
def test_real_photos_with_masks_in_both_modes() -> None:
    pairs = _examples()
    modes = set()
    for image_path, mask_path in pairs:
        mask_raw = Image.open(mask_path)
        modes.add(mask_raw.mode)
        prepared = prepare_inputs(image_path.read_bytes(), mask_path.read_bytes(), limits=LIMITS)
        assert prepared.image.mode == "RGB" and prepared.mask.mode == "L"
        assert prepared.mask.size == prepared.image.size == mask_raw.size
        assert _is_binary(prepared.mask)
        assert 0.01 < prepared.coverage < 0.9
        # the binary mask keeps the source mask's shape: the same pixels are ≥128 in both
        source_l = mask_raw.convert("L")
        assert prepared.mask.tobytes() == source_l.point(lambda v: 255 if v >= 128 else 0).tobytes()
        # a plain RGB PNG is sent as the user's own bytes, not re-encoded
        assert prepared.image_blob.data == image_path.read_bytes()
        assert prepared.image_blob.content_type == "image/png"
    assert {"L", "RGB"} <= modes, f"expected masks in two modes, saw {modes}"


# --- hostile inputs -----------------------------------------------------------------------------------

def _gif_animation() -> bytes:
    frames = [photo(seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


def test_decompression_bomb_is_rejected_not_warned() -> None:
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000  # 400 megapixels in a tiny file
    with pytest.raises(ImageInputError) as info:
        decode_image(bomb, LIMITS)
    assert info.value.code == "too_many_pixels"
    # below Pillow's own bomb threshold, our limit still applies
    with pytest.raises(ImageInputError) as info:
        decode_image(png_bomb(8000, 8000), IntakeLimits(max_pixels=50_000_000))
    assert info.value.code == "too_many_pixels"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"this is a text file someone named picture.png\n" * 20, "not_an_image"),
        (encode(photo(), "PNG")[:4000], "truncated"),
        (encode(Image.new("RGB", (1, 1), "red")), "too_small"),
        (b"", "not_an_image"),
        (encode(photo(), "TIFF"), "not_an_image"),
    ],
    ids=["text-named-png", "truncated-png", "1x1", "empty", "tiff"],
)
def test_hostile_files_get_clear_errors(data: bytes, code: str) -> None:
    with pytest.raises(ImageInputError) as info:
        decode_image(data, LIMITS)
    assert info.value.code == code
    assert info.value.message and "Traceback" not in info.value.message


def test_byte_limit() -> None:
    data = encode(photo(), "PNG")
    with pytest.raises(ImageInputError) as info:
        decode_image(data, IntakeLimits(max_bytes=len(data) - 1))
    assert info.value.code == "too_many_bytes"


def test_cmyk_jpeg_becomes_rgb() -> None:
    src = photo()
    prepared = prepare_inputs(encode(src.convert("CMYK"), "JPEG", quality=95),
                              encode(box_mask(src.size, (10, 10, 80, 80))), limits=LIMITS)
    assert prepared.image.mode == "RGB" and prepared.source_format == "JPEG"
    # colours survive the round trip (not inverted, not garbage)
    assert _mean_abs_diff(prepared.image, src) < 12
    assert prepared.image_blob.content_type == "image/png"  # re-encoded: the source was not RGB


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = Image.linear_gradient("L").resize((128, 128))
    sixteen = ramp.convert("I").point(lambda v: v * 257).convert("I;16")
    decoded = decode_image(encode(sixteen), LIMITS)
    assert decoded.source_mode.startswith("I;16")
    prepared = prepare_inputs(encode(sixteen), encode(box_mask((128, 128), (0, 0, 40, 40))), limits=LIMITS)
    hist = prepared.image.convert("L").histogram()
    lo, hi = min(i for i, n in enumerate(hist) if n), max(i for i, n in enumerate(hist) if n)
    assert lo < 10 and hi > 245  # a full 0..255 range, not all-white clipping
    assert _mean_abs_diff(prepared.image.convert("L"), ramp) < 2


def test_animated_gif_uses_first_frame() -> None:
    data = _gif_animation()
    decoded = decode_image(data, LIMITS)
    assert decoded.animated and decoded.source_format == "GIF"
    prepared = prepare_inputs(data, encode(box_mask(decoded.image.size, (0, 0, 50, 50))), limits=LIMITS)
    assert prepared.animated and prepared.image.mode == "RGB"
    first = Image.open(io.BytesIO(data)).convert("RGB")
    assert prepared.image.tobytes() == first.tobytes()


def test_exif_orientation_is_applied() -> None:
    src = photo(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise
    data = encode(src, "JPEG", exif=exif, quality=95)
    decoded = decode_image(data, LIMITS)
    assert decoded.image.size == (100, 200) and not decoded.untouched
    assert _mean_abs_diff(decoded.image.convert("RGB"), src.transpose(Image.Transpose.ROTATE_270)) < 8
    mask = encode(box_mask((100, 200), (0, 0, 50, 50)))
    prepared = prepare_inputs(data, mask, limits=LIMITS)
    assert prepared.size == (100, 200)
    assert prepared.image_blob.content_type == "image/png"  # rotated pixels are sent, not the raw file


# --- masks --------------------------------------------------------------------------------------------

def test_mask_modes_resize_binarise_invert() -> None:
    src = photo(256, 192)
    for mode in ("L", "RGB", "1", "P", "RGBA"):
        small = box_mask((128, 96), (32, 24, 95, 71), mode)  # half size, same aspect ratio
        prepared = prepare_inputs(encode(src), encode(small), limits=LIMITS)
        assert prepared.mask.size == (256, 192)
        assert _is_binary(prepared.mask)
        assert prepared.mask.getpixel((128, 96)) == 255 and prepared.mask.getpixel((5, 5)) == 0
        assert prepared.coverage == pytest.approx(0.25, abs=0.02)

    inverted = prepare_inputs(encode(src), encode(box_mask((256, 192), (64, 48, 191, 143))), limits=LIMITS,
                              options=MaskOptions(invert=True))
    assert inverted.mask.getpixel((128, 96)) == 0 and inverted.mask.getpixel((5, 5)) == 255
    assert inverted.coverage == pytest.approx(0.75, abs=0.01)
    # a mask stays binary at intake: the seam is feathered when the result is put back (tests/services/test_stitch)
    assert _is_binary(fit_mask(box_mask((128, 96), (32, 24, 95, 71)), (256, 192)))


def test_rgba_mask_white_strokes_on_transparent_layer() -> None:
    layer = Image.new("RGBA", (256, 192), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (100, 50, 150, 100))
    prepared = prepare_inputs(encode(photo()), encode(layer), limits=LIMITS)
    assert prepared.mask.getpixel((120, 70)) == 255 and prepared.mask.getpixel((10, 10)) == 0


def test_mask_with_other_shape_is_refused() -> None:
    with pytest.raises(ImageInputError) as info:
        prepare_inputs(encode(photo(256, 192)), encode(box_mask((192, 256), (0, 0, 50, 50))), limits=LIMITS)
    assert info.value.code == "mask_mismatch" and info.value.role == "mask"
    assert "192×256" in info.value.message and "256×192" in info.value.message


@pytest.mark.parametrize(("fill", "code"), [(0, "empty_mask"), (255, "full_mask")])
def test_empty_and_full_masks(fill: int, code: str) -> None:
    with pytest.raises(ImageInputError) as info:
        prepare_inputs(encode(photo()), encode(Image.new("L", (256, 192), fill)), limits=LIMITS)
    assert info.value.code == code
    # an almost-white grey still counts as white, a dark grey as black
    assert mask_coverage(fit_mask(Image.new("L", (8, 8), 130), (8, 8))) == 1.0
    assert mask_coverage(fit_mask(Image.new("L", (8, 8), 120), (8, 8))) == 0.0


def test_transparent_png_alpha_becomes_the_mask() -> None:
    rgba = photo().convert("RGBA")
    hole = Image.new("L", (60, 40), 0)
    rgba.putalpha(255)
    rgba.paste(Image.new("RGBA", (60, 40), (0, 0, 0, 0)), (100, 80))
    assert hole.size == (60, 40)
    prepared = prepare_inputs(encode(rgba), None, limits=LIMITS)
    assert prepared.mask_source == "alpha"
    assert prepared.mask.getpixel((120, 90)) == 255 and prepared.mask.getpixel((10, 10)) == 0
    assert prepared.coverage == pytest.approx(60 * 40 / (256 * 192), rel=0.01)
    assert prepared.image.mode == "RGB"
    # an opaque image and no mask: a clear "no mask" error
    with pytest.raises(ImageInputError) as info:
        prepare_inputs(encode(photo()), None, limits=LIMITS)
    assert info.value.code == "no_mask"


# --- encoding and sources -----------------------------------------------------------------------------

def test_encoding_and_data_uris() -> None:
    im = photo()
    png = encode_image(im, "png")
    jpeg = encode_image(im.convert("RGBA"), "jpeg")
    assert png.startswith(b"\x89PNG") and jpeg.startswith(b"\xff\xd8")
    uri = to_data_uri(png, "image/png")
    assert uri.startswith("data:image/png;base64,")
    assert parse_data_uri(uri, max_bytes=10**7) == png
    with pytest.raises(ImageInputError) as info:
        parse_data_uri(uri, max_bytes=100)
    assert info.value.code == "too_many_bytes"
    for bad in ("data:image/png,notbase64", "data:image/png;base64,@@@", "data:"):
        with pytest.raises(ImageInputError):
            parse_data_uri(bad, max_bytes=10**7)


@pytest.fixture
async def file_server() -> AsyncIterator[FalTestServer]:
    async with FalTestServer() as server:
        yield server


async def test_sources_bytes_data_uri_and_http(file_server: FalTestServer) -> None:
    png = encode(photo())
    mask = encode(box_mask((256, 192), (10, 10, 100, 100)))
    file_server.files["in.png"] = (png, "text/plain")  # a lying content type doesn't matter: we sniff
    file_server.files["mask.bin"] = (mask, "application/octet-stream")
    local = fetch_policy("127.0.0.1")  # the test server is on loopback, which only an allow-list lets us reach
    from_url = await prepare_inputs_async(f"{file_server.base_url}/files/in.png",
                                          f"{file_server.base_url}/files/mask.bin", limits=LIMITS, policy=local)
    from_uri = await prepare_inputs_async(to_data_uri(png, "image/png"), to_data_uri(mask, "image/png"),
                                          limits=LIMITS)
    from_bytes = await prepare_inputs_async(png, mask, limits=LIMITS)
    assert from_url.image_blob.sha256 == from_uri.image_blob.sha256 == from_bytes.image_blob.sha256
    assert from_url.mask.tobytes() == from_bytes.mask.tobytes()

    with pytest.raises(ImageInputError) as info:
        await fetch_source(f"{file_server.base_url}/files/missing.png", limits=LIMITS, policy=local)
    assert info.value.code == "download_failed"
    with pytest.raises(ImageInputError) as info:
        await fetch_source(f"{file_server.base_url}/files/in.png", limits=IntakeLimits(max_bytes=1000), role="mask",
                           policy=local)
    assert info.value.code == "too_many_bytes" and info.value.role == "mask"
    with pytest.raises(ImageInputError) as info:
        await fetch_source("ftp://example.invalid/x.png", limits=LIMITS)
    assert info.value.code == "bad_source"
    with pytest.raises(ImageInputError) as info:
        await fetch_source("http://127.0.0.1:9/x.png", limits=LIMITS, policy=local)  # nothing listens
    assert info.value.code == "download_failed"
    served = len(file_server.hits("file"))
    with pytest.raises(ImageInputError) as info:  # the default policy: public addresses only
        await fetch_source(f"{file_server.base_url}/files/in.png", limits=LIMITS)
    assert info.value.code == "download_failed" and len(file_server.hits("file")) == served


async def test_intake_does_not_block_the_event_loop() -> None:
    big = encode(photo(2400, 2400), "PNG", compress_level=1)
    mask = encode(box_mask((2400, 2400), (100, 100, 900, 900)))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    await prepare_inputs_async(big, mask, limits=LIMITS)
    elapsed = time.perf_counter() - start
    done.set()
    await tick
    assert elapsed > 0.05, "the workload is too small to show anything"
    assert len(gaps) >= 3
    assert max(gaps) < max(0.05, elapsed / 2), f"loop stalled {max(gaps):.3f}s during {elapsed:.3f}s of work"


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    from PIL import ImageChops, ImageStat

    diff = ImageChops.difference(a.convert(b.mode), b)
    return sum(ImageStat.Stat(diff).mean) / len(b.getbands())


def _is_binary(mask: Image.Image) -> bool:
    hist = mask.histogram()
    return sum(hist[1:255]) == 0


async def test_when_both_files_are_bad_the_image_error_is_reported() -> None:
    with pytest.raises(ImageInputError) as info:
        await prepare_inputs_async(b"not an image at all", b"nor is this", limits=LIMITS)
    assert info.value.role == "image"
    with pytest.raises(ImageInputError) as info:
        await prepare_inputs_async(encode(photo()), b"nor is this", limits=LIMITS)
    assert info.value.role == "mask" and info.value.code == "not_an_image"


def _strokes(size: tuple[int, int] = (256, 192), colour: tuple[int, int, int] = (255, 0, 255)) -> tuple[
        Image.Image, Image.Image]:
    """A photo with brush strokes painted on it, and the true mask of those strokes."""
    from PIL import ImageDraw

    painted = photo(*size).copy()
    truth = Image.new("L", size, 0)
    for canvas, fill in ((ImageDraw.Draw(painted), colour), (ImageDraw.Draw(truth), 255)):
        canvas.line((40, 60, 180, 80), fill=fill, width=18)
        canvas.ellipse((150, 100, 210, 160), fill=fill)
    return painted, truth


def _iou(mask: Image.Image, truth: Image.Image) -> float:
    """Overlap with the true strokes grown by 2 px (the bot widens painted masks so stroke edges are repainted),
    after checking that every true stroke pixel is in the mask."""
    from PIL import ImageChops, ImageFilter

    a, b = mask.point(lambda v: 255 if v >= 128 else 0), truth.point(lambda v: 255 if v >= 128 else 0)
    missed = mask_coverage(ImageChops.subtract(b, a))
    assert missed < 0.002, f"{missed:.2%} of the painted strokes are missing from the mask"
    grown = b.filter(ImageFilter.MaxFilter(5))
    return mask_coverage(ImageChops.multiply(a, grown)) / mask_coverage(ImageChops.lighter(a, grown))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_painted_copy_as_the_mask(fmt: str) -> None:
    painted, truth = _strokes()
    prepared = prepare_inputs(encode(photo()), encode(painted, fmt, **({"quality": 90} if fmt == "JPEG" else {})),
                              limits=LIMITS)
    assert prepared.mask_source == "painted_copy"
    assert _iou(prepared.mask, truth) > 0.85
    assert prepared.mask.getpixel((110, 70)) == 255 and prepared.mask.getpixel((10, 180)) == 0


def test_colour_painted_on_the_image_itself() -> None:
    painted, truth = _strokes(colour=(0, 255, 0))
    prepared = prepare_inputs(encode(painted), None, limits=LIMITS, options=MaskOptions(paint_colour=(0, 255, 0)))
    assert prepared.mask_source == "colour" and _iou(prepared.mask, truth) > 0.85
    with pytest.raises(ImageInputError) as info:  # a colour that isn't there: nothing to repaint
        prepare_inputs(encode(painted), None, limits=LIMITS, options=MaskOptions(paint_colour=(0, 0, 255)))
    assert info.value.code == "empty_mask"


def test_unclear_colour_masks_are_refused() -> None:
    unrelated = photo(256, 192, seed=9).convert("RGB")
    from PIL import ImageOps

    with pytest.raises(ImageInputError) as info:
        prepare_inputs(encode(photo()), encode(ImageOps.invert(unrelated)), limits=LIMITS)
    assert info.value.code == "mask_unclear"  # a colour picture that isn't a painted copy: refused, not guessed
    rainbow = photo().copy()
    from PIL import ImageDraw

    draw = ImageDraw.Draw(rainbow)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        draw.rectangle((20 + 40 * i, 40, 55 + 40 * i, 120), fill=colour)
    with pytest.raises(ImageInputError) as info:
        prepare_inputs(encode(photo()), encode(rainbow), limits=LIMITS)
    assert info.value.code == "mask_unclear" and "isn't one solid colour" in info.value.message
