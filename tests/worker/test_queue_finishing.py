"""A batch's results are finished (safety check, encoding) beside the next batch, not before it: the runner takes
batch 2 to the pipeline while batch 1's output check still runs; and a batch's images are checked in one call."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from PIL import Image

from services.schema import InpaintOutput
from services.worker.config import WorkerConfig
from services.worker.queue import RequestQueue
from services.worker.records import InpaintRecord, RequestRecord
from tests.worker.fakes import FakePipeline, inpaint_input


class SlowChecker:
    """Waits for `gate` (the test opens it), then flags what `verdict` says; records each call's image count."""

    def __init__(self, verdict: Any = None) -> None:
        self.gate = threading.Event()
        self.calls: list[int] = []
        self.verdict = verdict or (lambda images: [False] * len(images))

    def __call__(self, images: list[Image.Image]) -> list[bool]:
        self.calls.append(len(images))
        assert self.gate.wait(30), "the test never opened the gate"
        return list(self.verdict(images))


def _queue(pipeline: FakePipeline, checker: SlowChecker, **config: Any) -> RequestQueue:
    settings = WorkerConfig(_env_file=None, pipeline="classic", check_inputs=False, **config)
    return RequestQueue(settings, pipeline, safety=checker)


async def _submit(queue: RequestQueue, **overrides: Any) -> InpaintRecord:
    return await queue.submit(inpaint_input(**overrides), "http://worker")


async def _until(condition: Any) -> None:
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def _until_completed(*records: RequestRecord) -> None:
    for record in records:
        while record.state != "COMPLETED":
            assert await record.wait_changed(30), f"{record.id} stopped changing"


async def test_the_next_batch_runs_while_the_last_one_is_checked_and_encoded() -> None:
    pipeline, checker = FakePipeline(), SlowChecker()
    queue = _queue(pipeline, checker, max_batch_images=1)
    first = await _submit(queue, enable_safety_checker=True, seed=1)
    second = await _submit(queue, enable_safety_checker=True, seed=2)
    async with queue.background_tasks():
        await _until(lambda: len(pipeline.calls) == 2)  # batch 2 reached the pipeline...
        assert checker.calls and first.state == "IN_PROGRESS" and first.result is None  # ...batch 1 unfinished
        assert queue.queue_length == 2
        checker.gate.set()
        await _until_completed(first, second)
    for record in (first, second):
        assert record.error is None, record.error
        assert InpaintOutput.model_validate(record.result).has_nsfw_concepts == [False]
    assert checker.calls == [1, 1]


async def test_a_batch_is_checked_in_one_call_and_each_request_gets_its_flags() -> None:
    pipeline = FakePipeline(gate=threading.Event())
    checker = SlowChecker(verdict=lambda images: [i == 1 for i in range(len(images))])
    checker.gate.set()
    queue = _queue(pipeline, checker)
    blocker = await _submit(queue, num_inference_steps=3)
    async with queue.background_tasks():
        await _until(pipeline.entered.is_set)  # the others wait together behind it
        a = await _submit(queue, enable_safety_checker=True, num_images=2, seed=1)
        unchecked = await _submit(queue, seed=2)
        b = await _submit(queue, enable_safety_checker=True, seed=3)
        await _until(lambda: all(queue.preparer.is_ready(r) for r in (a, unchecked, b)))
        assert pipeline.gate is not None
        pipeline.gate.set()
        await _until_completed(blocker, a, unchecked, b)
    assert [len(call) for call in pipeline.calls] == [1, 3]
    assert checker.calls == [3]  # a's two images and b's one, in one call; nothing for the unchecked request
    flags = [InpaintOutput.model_validate(r.result).has_nsfw_concepts for r in (a, unchecked, b)]
    assert flags == [[False, True], [False], [False]]
