"""Preparing a request's job without the queue: images fetched and fitted, the upload safety-checked when it should
be, and the errors a client must fix."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from services.images import to_data_uri
from services.worker.config import WorkerConfig
from services.worker.inputs import RequestError, prepare_job
from services.worker.safety import SafetyChecker
from tests.helpers.imagegen import encode
from tests.worker.fakes import flag_all, inpaint_input, must_not_run


def _config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(_env_file=None, pipeline="classic", **overrides)


async def test_the_job_is_at_the_output_size_with_a_seed_per_image() -> None:
    inp = inpaint_input(image_size={"width": 60, "height": 44}, num_images=3, negative_prompt="blurry")
    job = await prepare_job(inp, 2**64 - 1, _config(), safety=None)
    assert job.image.size == job.mask.size == (64, 48)  # rounded to multiples of 8
    assert job.seeds == (2**64 - 1, 0, 1)  # consecutive, wrapping in the seed space
    assert (job.prompt, job.negative_prompt, job.steps, job.guidance_scale, job.strength) == (
        inp.prompt, "blurry", inp.num_inference_steps, inp.guidance_scale, inp.strength)


async def test_a_flagged_upload_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        await prepare_job(inpaint_input(enable_safety_checker=True), 1, _config(), safety=flag_all)
    assert info.value.error_type == "content_policy_violation"
    assert info.value.detail == [{"loc": ["body", "image_url"], "msg": "the safety checker flagged the uploaded image",
                                  "type": "content_policy_violation"}]


@pytest.mark.parametrize(("enable", "check_inputs"), [(False, True), (True, False)])
async def test_the_upload_is_checked_only_when_both_want_it(enable: bool,
                                                            check_inputs: bool) -> None:
    safety: SafetyChecker = must_not_run
    job = await prepare_job(inpaint_input(enable_safety_checker=enable), 1, _config(check_inputs=check_inputs),
                            safety=safety)
    assert job.image.size == (64, 64)


async def test_an_image_that_is_not_an_image_names_its_field() -> None:
    inp = inpaint_input(mask_url="data:image/png;base64,bm90IGFuIGltYWdl")
    with pytest.raises(RequestError) as info:
        await prepare_job(inp, 1, _config(), safety=None)
    (item,) = info.value.detail
    assert item["loc"] == ["body", "mask_url"] and item["type"].startswith("image_error.")
    assert info.value.error_type == "validation_error"


async def test_an_image_with_more_pixels_than_the_worker_takes_is_refused() -> None:
    """A small file that would decode to a huge picture is refused before it is decoded: the worker takes at most
    4 × MAX_OUTPUT_PIXELS (a 41 KB PNG of 4100 × 4100 here, against 16.8 megapixels)."""
    big = encode(Image.new("RGB", (4100, 4100), (90, 120, 30)), "PNG")
    assert len(big) < 100_000
    inp = inpaint_input(image_url=to_data_uri(big, "image/png"))
    with pytest.raises(RequestError) as info:
        await prepare_job(inp, 1, _config(), safety=None)
    (item,) = info.value.detail
    assert item["loc"] == ["body", "image_url"] and item["type"] == "image_error.too_many_pixels"
    accepted = await prepare_job(inp, 1, _config(max_output_pixels=4100 * 4100 // 4 + 1), safety=None)
    assert accepted.image.size == (64, 64)
