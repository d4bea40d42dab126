"""The fal schema: fields, defaults, ranges, and the wire examples from the spec round-tripping unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from services.schema import (
    IMAGE_SIZE_PRESETS,
    CompletedStatus,
    InpaintInput,
    InpaintOutput,
    InProgressStatus,
    InQueueStatus,
    QueueHandle,
    QueueStatus,
)

# A captured fast-sdxl output (its seed is above 2**63).
SPEC_OUTPUT = (
    '{"images": [{"url": "https://v3.fal.media/files/lion/O853qAknYZGU8_2QCbJwd.jpeg", "width": 1024, '
    '"height": 1024, "content_type": "image/jpeg"}], "timings": {"inference": 2.107286686077714}, '
    '"seed": 17454220438242315174, "has_nsfw_concepts": [false], "prompt": "dog"}'
)
MINIMAL_INPUT = {"image_url": "https://example.invalid/in.png", "mask_url": "data:image/png;base64,iVBOR",
                 "prompt": "a tiger sitting on a park bench"}


def test_spec_output_round_trips_unchanged() -> None:
    out = InpaintOutput.model_validate_json(SPEC_OUTPUT)
    assert out.seed == 17454220438242315174 > 2**63
    assert json.loads(out.model_dump_json()) == json.loads(SPEC_OUTPUT)
    assert out.model_dump(mode="json") == json.loads(SPEC_OUTPUT)


def test_input_has_all_17_fields_with_fal_defaults() -> None:
    inp = InpaintInput.model_validate(MINIMAL_INPUT)
    assert set(InpaintInput.model_fields) == {
        "image_url", "mask_url", "prompt", "negative_prompt", "image_size", "num_inference_steps",
        "guidance_scale", "strength", "seed", "num_images", "sync_mode", "loras", "embeddings",
        "enable_safety_checker", "safety_checker_version", "expand_prompt", "format", "request_id"}
    assert (inp.negative_prompt, inp.image_size, inp.num_inference_steps, inp.guidance_scale, inp.strength) == \
        ("", "square_hd", 25, 7.5, 0.95)
    assert (inp.seed, inp.num_images, inp.sync_mode, inp.enable_safety_checker) == (None, 1, False, True)
    assert (inp.safety_checker_version, inp.expand_prompt, inp.format) == ("v1", False, "jpeg")
    assert inp.size_pixels() == (1024, 1024)
    # what goes on the wire is what the user set: the server applies the same defaults
    assert inp.wire() == MINIMAL_INPUT


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("num_inference_steps", [1, 65], [0, 66]),
        ("guidance_scale", [0, 20], [-0.1, 20.5]),
        ("strength", [0.01, 1], [0.0, 1.01]),
        ("num_images", [1, 8], [0, 9]),
        ("seed", [0, 2**64 + 5], [-1]),
        ("image_size", ["portrait_16_9", {"width": 14142, "height": 8}], ["huge", {"width": 14143, "height": 8},
                                                                          {"width": 0, "height": 8}]),
        ("format", ["png", "jpeg"], ["webp"]),
        ("safety_checker_version", ["v1", "v2"], ["v3"]),
    ],
)
def test_ranges(field: str, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        InpaintInput.model_validate({**MINIMAL_INPUT, field: value})
    for value in bad:
        with pytest.raises(ValidationError) as info:
            InpaintInput.model_validate({**MINIMAL_INPUT, field: value})
        assert info.value.errors()[0]["loc"][0] == field


def test_required_fields() -> None:
    with pytest.raises(ValidationError) as info:
        InpaintInput.model_validate({})
    assert {e["loc"][0] for e in info.value.errors()} == {"image_url", "mask_url", "prompt"}


def test_presets_and_custom_size() -> None:
    assert IMAGE_SIZE_PRESETS["portrait_4_3"] == (768, 1024)
    inp = InpaintInput.model_validate({**MINIMAL_INPUT, "image_size": {"width": 800, "height": 600}})
    assert inp.size_pixels() == (800, 600)
    assert InpaintInput.model_validate({**MINIMAL_INPUT, "image_size": {}}).size_pixels() == (512, 512)


def test_loras_and_embeddings() -> None:
    inp = InpaintInput.model_validate({**MINIMAL_INPUT, "loras": [{"path": "/w/style.safetensors", "scale": 0.6}],
                                       "embeddings": [{"path": "/w/emb.safetensors"}]})
    assert inp.loras[0].scale == 0.6 and inp.loras[0].force is False
    assert inp.embeddings[0].tokens == ["<s0>", "<s1>"]
    with pytest.raises(ValidationError):
        InpaintInput.model_validate({**MINIMAL_INPUT, "loras": [{"path": "x", "scale": 1.5}]})
    with pytest.raises(ValidationError):
        InpaintInput.model_validate({**MINIMAL_INPUT, "loras": [{"scale": 0.5}]})


def test_unknown_input_keys_are_ignored_like_fal() -> None:
    inp = InpaintInput.model_validate({**MINIMAL_INPUT, "some_future_field": 3})
    assert "some_future_field" not in inp.wire()


def test_queue_bodies() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(QueueStatus)
    urls = {"request_id": "r1", "response_url": "u", "status_url": "u/status", "cancel_url": "u/cancel"}
    queued = adapter.validate_python({"status": "IN_QUEUE", "queue_position": 3, **urls})
    assert isinstance(queued, InQueueStatus) and queued.queue_position == 3
    running = adapter.validate_python({"status": "IN_PROGRESS", "logs": [{"message": "step 1/3",
                                                                         "labels": {}}], **urls})
    assert isinstance(running, InProgressStatus) and running.logs and running.logs[0].message == "step 1/3"
    assert running.logs[0].level is None  # every log field is optional
    done = adapter.validate_python({"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 9.27},
                                    "error": "boom", "error_type": "runner_disconnected", **urls})
    assert isinstance(done, CompletedStatus) and done.error_type == "runner_disconnected"
    for bad in ({"status": "FAILED", **urls}, {"status": "IN_QUEUE", **urls},
                {"status": "IN_PROGRESS", **urls}):  # unknown state; position and logs are required keys
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)
    handle = QueueHandle.model_validate({**urls, "status": "IN_QUEUE", "queue_position": 0})
    assert handle.model_dump(mode="json", exclude_none=True) == {**urls, "status": "IN_QUEUE", "queue_position": 0}
