"""Stand-ins for the worker's unit tests: a pipeline that records what it was asked and returns flat images at
once (or when a test lets it), safety checkers with fixed verdicts (or one that flags red images, when a test lets
it), a prompt expander that says what it was given, requests made from the schema's defaults, and flat images."""

from __future__ import annotations

import threading
from typing import Any

from PIL import Image, ImageStat

from services.images import to_data_uri
from services.schema import InpaintInput
from services.worker.pipelines.base import Cancelled, PipelineJob, RunContext
from tests.helpers.imagegen import encode, image_pair_uris

IMAGE_URI, MASK_URI = image_pair_uris((64, 64))
#: the schema's default step count, read from the schema (a request with other steps can't share its batch)
DEFAULT_STEPS: int = InpaintInput.model_fields["num_inference_steps"].default


def inpaint_input(**overrides: Any) -> InpaintInput:
    """A valid 64×64 request; every field not given keeps the schema's default, except the safety checker (off)."""
    values: dict[str, Any] = {"image_url": IMAGE_URI, "mask_url": MASK_URI, "prompt": "a red door",
                              "image_size": {"width": 64, "height": 64}, "enable_safety_checker": False, **overrides}
    return InpaintInput.model_validate(values)


class FakePipeline:
    """Returns one flat grey image per seed. With `gate`, each call waits for the test to set it (after setting
    `entered`); with `error`, each call raises it. Every call's jobs are kept in `calls`."""

    name = "fake"
    device = "cpu"
    model = "fake-model"

    def __init__(self, *, batches: bool = True, gate: threading.Event | None = None,
                 error: Exception | None = None) -> None:
        self.batches = batches
        self.gate = gate
        self.error = error
        self.entered = threading.Event()
        self.calls: list[list[PipelineJob]] = []

    def warmup(self) -> None:
        pass

    def run(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]:
        return self.run_batch([job], [ctx])[0]

    def run_batch(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        self.calls.append(list(jobs))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.error is not None:
            raise self.error
        for ctx in ctxs:
            ctx.log("step 1/1")
        if all(ctx.cancel_event.is_set() for ctx in ctxs):
            raise Cancelled()
        return [[Image.new("RGB", job.image.size, (120, 120, 120)) for _ in job.seeds] for job in jobs]


def flag_all(images: list[Image.Image]) -> list[bool]:
    return [True] * len(images)


def flag_none(images: list[Image.Image]) -> list[bool]:
    return [False] * len(images)


def must_not_run(images: list[Image.Image]) -> list[bool]:
    raise AssertionError("the safety checker ran")


def solid_uri(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    """A PNG data URI of one flat colour."""
    return to_data_uri(encode(Image.new("RGB", size, colour)), "image/png")


RED_URI = solid_uri((220, 30, 30))
BLUE_URI = solid_uri((30, 30, 220))


def flag_red(images: list[Image.Image]) -> list[bool]:
    """Flags the images whose mean colour is mostly red."""
    flags = []
    for im in images:
        r, g, b = ImageStat.Stat(im.convert("RGB")).mean
        flags.append(r > g + 60 and r > b + 60)
    return flags


class GatedChecker:
    """`flag_red` once the test opens `gate`; `entered` counts the calls that have started."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, images: list[Image.Image]) -> list[bool]:
        self.entered.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return flag_red(images)


class FakeExpander:
    """Appends `, by seed {seed}` to the prompt; every call is kept in `calls`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, prompt: str, seed: int) -> str:
        self.calls.append((prompt, seed))
        return f"{prompt}, by seed {seed}"
