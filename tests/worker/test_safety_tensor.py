"""The safety checker on the device (issue 14): the same flags as diffusers' own forward with CLIP's PIL
preprocessing (the implementation it replaced), one model call for a batch, and a tensor entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from services.worker.safety import load_safety_checker
from tests.helpers.imagegen import photo

IMAGES = [photo(64, 64, seed=1), photo(64, 64, seed=2), photo(96, 64, seed=3), photo(64, 80, seed=4),
          Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 30, 220))]


def _reference(path: Path, images: list[Image.Image], checker: Any) -> tuple[list[bool], np.ndarray]:
    """The replaced implementation: CLIPImageProcessorPil on the CPU, a float copy of each image, diffusers'
    forward; also the cosine of each image with concept 0."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    clip_input = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    with torch.no_grad():
        _, flags = checker(images=arrays, clip_input=clip_input)
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        cos = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(checker.concept_embeds).t()
    return [bool(f) for f in flags], cos[:, 0].numpy()


def _set_thresholds(checker: Any, concept0: float) -> None:
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)  # never
        checker.special_care_embeds_weights.fill_(2.0)
        checker.concept_embeds_weights[0] = concept0


@pytest.mark.parametrize("fixture", ["checker_flags_all", "checker_flags_none"])
def test_same_flags_as_the_replaced_checker(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    ours = load_safety_checker(path, "cpu")
    expected, _ = _reference(path, IMAGES, ours.checker)
    assert ours(IMAGES) == expected == [fixture == "checker_flags_all"] * len(IMAGES)


def test_a_threshold_between_images_flags_the_same_ones(checker_flags_none: Path) -> None:
    ours = load_safety_checker(checker_flags_none, "cpu")
    _, cos = _reference(checker_flags_none, IMAGES, ours.checker)
    ordered = np.sort(cos)
    gaps = np.diff(ordered)
    widest = int(gaps.argmax())
    assert gaps[widest] > 0.01, cos  # room for float and resampling differences on either side
    _set_thresholds(ours.checker, float(ordered[widest] + ordered[widest + 1]) / 2)
    expected, _ = _reference(checker_flags_none, IMAGES, ours.checker)
    assert any(expected) and not all(expected)
    assert ours(IMAGES) == expected
    # in bfloat16 too, and from a uint8 tensor batch (the entry point for images already on the device)
    ours_bf16 = load_safety_checker(checker_flags_none, "cpu", "bfloat16")
    _set_thresholds(ours_bf16.checker, float(ordered[widest] + ordered[widest + 1]) / 2)
    assert ours_bf16.checker.visual_projection.weight.dtype == torch.bfloat16
    square = [i for i, im in enumerate(IMAGES) if im.size == (64, 64)]
    batch = torch.stack([torch.from_numpy(np.array(IMAGES[i])).permute(2, 0, 1) for i in square])
    assert ours.check_tensor(batch) == [expected[i] for i in square]
    assert ours.check_tensor(batch.float() / 255) == [expected[i] for i in square]
    if gaps[widest] > 0.05:
        assert ours_bf16(IMAGES) == expected


def test_one_model_call_for_a_batch_of_mixed_sizes(checker_flags_none: Path) -> None:
    ours = load_safety_checker(checker_flags_none, "cpu")
    calls: list[int] = []
    ours.checker.vision_model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    assert ours(IMAGES) == [False] * len(IMAGES)
    assert calls == [len(IMAGES)]
    assert ours([]) == [] and ours.check_tensor(torch.zeros(0, 3, 64, 64, dtype=torch.uint8)) == []
