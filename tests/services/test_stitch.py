"""Crop and stitch on their own: the crop holds the mask with its context at about one megapixel, the result goes
back at the picture's size, and only the mask and its feather band change."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.crop_plan import CropPlan, StitchOptions
from services.stitch import (
    crop_for_backend,
    plan_crop,
    stitch,
    stitch_encoded,
)
from tests.helpers.imagegen import box_mask, encode, photo


def _backend(plan: CropPlan, value: int = 255) -> Image.Image:
    """What a backend might answer for the crop: a flat grey of `value` at the working size."""
    return Image.new("RGB", plan.sent, (value, value, value))


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    changed: np.ndarray = np.any(np.asarray(a) != np.asarray(b), axis=2)
    return changed


def _band(mask: Image.Image, feather: int) -> np.ndarray:
    """The mask grown by `feather` pixels (Chebyshev distance: a square neighbourhood holds the round band)."""
    import cv2

    inside = (np.asarray(mask) >= 128).astype(np.uint8)
    return cv2.dilate(inside, np.ones((2 * feather + 1, 2 * feather + 1), np.uint8)) > 0


def test_a_small_mask_in_a_large_picture() -> None:
    picture = photo(4000, 3000)
    mask = box_mask((4000, 3000), (1800, 1400, 2099, 1599))
    plan = plan_crop(mask, StitchOptions(), output_format="png")
    x, y, w, h = plan.crop
    assert x <= 1800 - 32 and y <= 1400 - 32 and x + w >= 2100 + 32 and y + h >= 1600 + 32  # mask + padding
    assert plan.sent[0] * plan.sent[1] <= 1.1 * 1024 * 1024 and plan.sent[0] % 8 == plan.sent[1] % 8 == 0
    assert abs(plan.sent[0] / plan.sent[1] - w / h) < 0.01  # scaled, not stretched
    sent_image, sent_mask = crop_for_backend(picture, mask, plan)
    assert sent_image.size == sent_mask.size == plan.sent and set(np.unique(np.asarray(sent_mask))) == {0, 255}
    out = stitch(picture, mask, _backend(plan), plan)
    assert out.size == (4000, 3000)
    changed = _changed(out, picture)
    assert changed[1400:1600, 1800:2100].all()  # the whole mask was repainted…
    assert not (changed & ~_band(mask, plan.options.feather)).any()  # …and nothing outside it and its band


@pytest.mark.parametrize("feather", [0, 3, 8, 16])
def test_feather_is_a_ramp_of_that_width_outside_the_mask(feather: int) -> None:
    picture = Image.new("RGB", (512, 256), (0, 0, 0))
    mask = box_mask((512, 256), (200, 0, 511, 255))  # repaint the right part, touching three borders
    plan = plan_crop(mask, StitchOptions(feather=feather), output_format="png")
    out = np.asarray(stitch(picture, mask, _backend(plan, 255), plan))[128, :, 0].astype(int)
    assert (out[200:] == 255).all()  # inside: all model
    ramp = [x for x in range(200) if 0 < out[x] < 255]
    assert len(ramp) == feather  # the blend is exactly `feather` pixels wide (0: a hard edge)…
    if feather:
        assert ramp == list(range(200 - feather, 200))  # …right outside the mask…
        assert all(np.diff(out[200 - feather - 1:201]) > 0)  # …rising steadily towards it
    assert (out[:200 - feather] == 0).all()


def test_whole_area_restores_the_unmasked_pixels_unless_asked_not_to() -> None:
    picture = photo(640, 480)
    mask = box_mask((640, 480), (100, 100, 200, 200))
    kept = plan_crop(mask, StitchOptions(area="whole"), output_format="png")
    assert kept.crop == (0, 0, 640, 480) and kept.sent == (1184, 888)
    out = stitch(picture, mask, _backend(kept, 128), kept)
    assert not (_changed(out, picture) & ~_band(mask, kept.options.feather)).any()
    restyled = plan_crop(mask, StitchOptions(area="whole", keep_unmasked=False), output_format="png")
    out = stitch(picture, mask, _backend(restyled, 128), restyled)
    assert out.size == (640, 480) and (np.asarray(out) == 128).all()  # the model's whole output, full size


def test_several_regions_share_one_crop_and_a_border_mask_is_clamped() -> None:
    mask = box_mask((2000, 1000), (100, 100, 199, 199))
    mask.paste(255, (1700, 700, 1800, 800))
    plan = plan_crop(mask, StitchOptions(padding=16), output_format="png")
    x, y, w, h = plan.crop
    assert x <= 84 and y <= 84 and x + w >= 1816 and y + h >= 816
    corner = plan_crop(box_mask((2000, 1000), (0, 0, 49, 49)), StitchOptions(), output_format="png")
    assert corner.crop[:2] == (0, 0) and corner.crop[2] <= 2000 and corner.crop[3] <= 1000


def test_a_tiny_picture_is_scaled_up_for_the_model_and_back_down() -> None:
    picture = photo(96, 64)
    mask = box_mask((96, 64), (30, 20, 60, 40))
    plan = plan_crop(mask, StitchOptions(), output_format="png")
    assert plan.sent[0] > plan.crop[2] * 8  # upscaled for the model
    out = stitch(picture, mask, _backend(plan), plan)
    assert out.size == (96, 64) and not (_changed(out, picture) & ~_band(mask, 4)).any()


def test_encoded_round_trip_keeps_png_pixels_and_gives_jpeg_when_asked() -> None:
    picture = photo(800, 600)
    mask = box_mask((800, 600), (300, 200, 400, 300))
    plan = plan_crop(mask, StitchOptions(), output_format="png")
    result = encode(_backend(plan, 200))
    ((png, content_type),) = stitch_encoded(encode(picture), encode(mask), [result], plan)
    out = Image.open(io.BytesIO(png))
    assert content_type == "image/png" and out.size == (800, 600)
    assert not (_changed(out.convert("RGB"), picture) & ~_band(mask, 4)).any()
    jpeg_plan = plan.model_copy(update={"output_format": "jpeg"})
    ((jpeg, jpeg_type),) = stitch_encoded(encode(picture), encode(mask), [result], jpeg_plan)
    assert jpeg_type == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
