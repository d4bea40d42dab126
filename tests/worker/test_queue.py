"""The request queue without HTTP: positions, cancel, a full queue, which requests share a batch, running a batch
through a (fake) pipeline, and freeing old results."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.schema import InpaintOutput, NsfwCheckInput
from services.worker.config import WorkerConfig
from services.worker.queue import QueueFull, RequestQueue
from services.worker.records import InpaintRecord, RequestRecord
from tests.worker.fakes import BLUE_URI, DEFAULT_STEPS, RED_URI, FakePipeline, flag_red, inpaint_input


def _queue(pipeline: FakePipeline | None = None, **config: Any) -> RequestQueue:
    return RequestQueue(WorkerConfig(_env_file=None, pipeline="classic", **config), pipeline or FakePipeline())


async def _submit(queue: RequestQueue, **overrides: Any) -> InpaintRecord:
    return await queue.submit(inpaint_input(**overrides), "http://worker")


async def _until_completed(*records: RequestRecord) -> None:
    for record in records:
        while record.state != "COMPLETED":
            assert await record.wait_changed(30), f"{record.id} stopped changing"


def _messages(record: RequestRecord) -> list[str]:
    return [line["message"] for line in record.logs]


async def test_positions_full_queue_and_cancel() -> None:
    queue = _queue(max_queue=2)
    first, second = await _submit(queue), await _submit(queue)
    assert (queue.position(first), queue.position(second), queue.queue_length) == (0, 1, 2)
    with pytest.raises(QueueFull, match="queue is full"):
        await _submit(queue)

    assert queue.cancel(first.id) == "OK"
    assert first.state == "COMPLETED" and first.error_type == "cancelled" and first.error_status == 400
    assert _messages(first) == ["cancelled while queued"]
    assert queue.position(second) == 0 and queue.queue_length == 1
    assert queue.cancel(first.id) == "ALREADY_COMPLETED"
    assert queue.cancel("no-such-id") == "NOT_FOUND"
    assert queue.get(first.id) is first and queue.get("no-such-id") is None

    running = queue.take_batch()[0]
    ctx = running.start()
    assert queue.cancel(running.id) == "CANCELLATION_REQUESTED"
    assert ctx.cancel_event.is_set() and running.state == "IN_PROGRESS"
    assert _messages(running)[-1] == "cancellation requested"


async def test_compatible_requests_are_batched_up_to_the_image_limit() -> None:
    queue = _queue(max_batch_images=4)
    a = await _submit(queue)
    other_steps = await _submit(queue, num_inference_steps=DEFAULT_STEPS + 1)
    b = await _submit(queue, num_images=2)
    big = await _submit(queue, num_images=2)  # 1 + 2 + 2 images would pass max_batch_images
    small = await _submit(queue)  # would fit, but does not overtake the request before it
    assert queue.take_batch() == [a, b]
    assert list(queue.pending) == [other_steps, big, small]
    assert (queue.position(other_steps), queue.position(big), queue.position(small)) == (0, 1, 2)
    assert queue.take_batch() == [other_steps]  # the ones behind it have other steps
    assert queue.take_batch() == [big, small]


@pytest.mark.parametrize(
    "difference",
    [{"num_inference_steps": DEFAULT_STEPS + 1}, {"strength": 0.5}, {"guidance_scale": 2.0},
     {"image_size": {"width": 128, "height": 64}}, {"negative_prompt": "blurry"}],
)
async def test_requests_that_differ_run_apart(difference: dict[str, Any]) -> None:
    queue = _queue()
    first, second = await _submit(queue), await _submit(queue, **difference)
    assert queue.take_batch() == [first]
    assert queue.take_batch() == [second]


async def test_different_prompts_and_seeds_share_a_batch() -> None:
    queue = _queue()
    records = [await _submit(queue, prompt="a blue door", seed=1), await _submit(queue, prompt="a green door", seed=2)]
    assert queue.take_batch() == records


async def test_adapters_or_a_pipeline_that_cannot_batch_run_alone(tmp_path: Path) -> None:
    (tmp_path / "style.safetensors").write_bytes(b"")  # found, so preparing it (which may start at once) succeeds
    queue = _queue(lora_dir=tmp_path)
    with_lora = [await _submit(queue, loras=[{"path": "style.safetensors"}]), await _submit(queue),
                 await _submit(queue, loras=[{"path": "style.safetensors"}])]
    assert [queue.take_batch() for _ in with_lora] == [[record] for record in with_lora]

    single = _queue(FakePipeline(batches=False))
    records = [await _submit(single), await _submit(single)]
    assert [single.take_batch() for _ in records] == [[record] for record in records]


async def test_the_runner_batches_what_waits_together() -> None:
    pipeline = FakePipeline()
    queue = _queue(pipeline)
    a = await _submit(queue, seed=5, format="png")  # not sync_mode: the images become files
    b = await _submit(queue, num_images=2, sync_mode=True)
    async with queue.background_tasks():
        await _until_completed(a, b)
    assert [len(call) for call in pipeline.calls] == [2]
    for record in (a, b):
        assert record.error is None, record.error
        assert any("sharing a batch with 1 other request(s)" in m for m in _messages(record))
        assert _messages(record)[-2] == "step 1/1" and _messages(record)[-1].startswith("done in")
        assert record.inference_time is not None and record.inference_time >= 0
    out_a = InpaintOutput.model_validate(a.result)
    assert out_a.seed == 5 and out_a.images[0].url == f"http://worker/files/{a.id}/0.png"
    assert a.files["0.png"][1] == "image/png"
    out_b = InpaintOutput.model_validate(b.result)
    assert [i.url[:23] for i in out_b.images] == ["data:image/jpeg;base64,"] * 2 and not b.files
    assert pipeline.calls[0][1].seeds == (b.seed, b.seed + 1)


async def test_a_request_that_cannot_be_prepared_leaves_its_batch() -> None:
    pipeline = FakePipeline()
    queue = _queue(pipeline)
    bad = await _submit(queue, mask_url="data:image/png;base64,bm90IGFuIGltYWdl")
    good = await _submit(queue)
    await queue.run(queue.take_batch())
    assert bad.error_status == 422 and bad.error_type == "validation_error"
    assert bad.error_body is not None and bad.error_body["detail"][0]["loc"] == ["body", "mask_url"]
    assert good.error is None and good.result is not None
    assert [len(call) for call in pipeline.calls] == [1]


async def test_a_pipeline_error_fails_the_whole_batch() -> None:
    queue = _queue(FakePipeline(error=RuntimeError("boom")))
    records = [await _submit(queue), await _submit(queue)]
    await queue.run(queue.take_batch())
    for record in records:
        assert (record.state, record.error_type, record.error_status) == ("COMPLETED", "runner_error", 500)
        assert record.error == "the worker failed: RuntimeError: boom"
        assert _messages(record)[-1] == "internal error: RuntimeError: boom"


async def test_cancelling_one_request_of_a_running_batch() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    queue = _queue(pipeline)
    keep, drop = await _submit(queue), await _submit(queue)
    run = asyncio.create_task(queue.run(queue.take_batch()))
    assert await asyncio.to_thread(pipeline.entered.wait, 30)
    assert queue.cancel(drop.id) == "CANCELLATION_REQUESTED"
    gate.set()
    await run
    assert keep.error is None and keep.result is not None
    assert drop.error_type == "cancelled" and _messages(drop)[-1] == "cancelled: its images are discarded"


async def test_cancelling_every_request_stops_the_batch() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    queue = _queue(pipeline)
    records = [await _submit(queue), await _submit(queue)]
    run = asyncio.create_task(queue.run(queue.take_batch()))
    assert await asyncio.to_thread(pipeline.entered.wait, 30)
    for record in records:
        queue.cancel(record.id)
    gate.set()
    await run
    for record in records:
        assert record.error_type == "cancelled" and _messages(record)[-1] == "cancelled between denoising steps"


async def test_reap_frees_completed_requests_past_the_ttl() -> None:
    queue = _queue(result_ttl_s=60)
    old, recent, waiting = await _submit(queue), await _submit(queue), await _submit(queue)
    for record in (old, recent):
        queue.cancel(record.id)
    assert old.finished_at is not None
    old.finished_at = time.monotonic() - 61
    assert queue.reap() == 1
    assert queue.get(old.id) is None and queue.get(recent.id) is recent and queue.get(waiting.id) is waiting
    assert queue.reap() == 0


async def test_checks_run_beside_the_batch_and_expire_like_the_others() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    queue = RequestQueue(WorkerConfig(_env_file=None, pipeline="classic", result_ttl_s=60), pipeline,
                         safety=flag_red)
    async with queue.background_tasks():
        inpaint = await _submit(queue)
        assert await asyncio.to_thread(pipeline.entered.wait, 30)
        red = await queue.submit_check(NsfwCheckInput(image_url=RED_URI), "http://worker")
        blue = await queue.submit_check(NsfwCheckInput(image_url=BLUE_URI), "http://worker")
        assert red.url_prefix == "fal-ai/imageutils" and inpaint.url_prefix == "fal-ai/fast-sdxl"
        await _until_completed(red, blue)
        assert inpaint.state == "IN_PROGRESS" and queue.queue_length == 1
        assert (red.result, blue.result) == ({"nsfw_probability": 1.0}, {"nsfw_probability": 0.0})
        assert red.inference_time is not None and _messages(red)[-1].endswith(": flagged")
        gate.set()
        await _until_completed(inpaint)
    assert queue.cancel(red.id) == "ALREADY_COMPLETED"
    assert red.finished_at is not None
    red.finished_at = time.monotonic() - 61
    assert queue.reap() == 1 and queue.get(red.id) is None and queue.get(blue.id) is blue


async def test_a_failing_checker_fails_only_its_check() -> None:
    def broken(images: list[Any]) -> list[bool]:
        raise RuntimeError("no memory")

    queue = RequestQueue(WorkerConfig(_env_file=None, pipeline="classic"), FakePipeline(), safety=broken)
    record = await queue.submit_check(NsfwCheckInput(image_url=RED_URI), "http://worker")
    await _until_completed(record)
    assert (record.error_type, record.error_status) == ("runner_error", 500)
    assert record.error == "the worker failed: RuntimeError: no memory"
    assert _messages(record)[-1] == "internal error: RuntimeError: no memory"
    assert queue.queue_length == 0
