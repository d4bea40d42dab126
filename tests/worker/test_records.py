"""A request record on its own: log lines, change notification, the start of a run, how it completes, and the
record of each app."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime

from services.schema import NsfwCheckInput
from services.worker.protocol import request_urls
from services.worker.records import CheckRecord, InpaintRecord
from tests.worker.fakes import inpaint_input


def _record() -> InpaintRecord:
    return InpaintRecord(id="r1", input=inpaint_input(), seed=7, base_url="http://worker")


async def test_a_change_wakes_the_waiters_and_nothing_times_out() -> None:
    record = _record()
    assert await record.wait_changed(0.01) is False
    waiters = [asyncio.create_task(record.wait_changed(10)) for _ in range(2)]
    await asyncio.sleep(0)  # both are waiting now
    record.add_log("hello")
    assert await asyncio.gather(*waiters) == [True, True]
    # the next wait is for the next change, not the one already seen
    assert await record.wait_changed(0.01) is False


async def test_log_lines_have_fals_fields() -> None:
    record = _record()
    record.add_log("first")
    record.add_log("careful", "WARN")
    assert [(line["message"], line["level"], line["source"]) for line in record.logs] == [
        ("first", "INFO", "USER"), ("careful", "WARN", "USER")]
    stamp = record.logs[0]["timestamp"]
    assert "+" not in stamp and datetime.fromisoformat(stamp).tzinfo is None  # UTC, written without an offset


async def test_start_runs_and_lines_from_the_pipeline_thread_arrive_in_order() -> None:
    record = _record()
    waiter = asyncio.create_task(record.wait_changed(10))
    await asyncio.sleep(0)
    ctx = record.start()
    assert await waiter is True
    assert record.state == "IN_PROGRESS" and record.ctx is ctx and record.running_for_s() >= 0
    thread_ids: list[int] = []

    def pipeline_thread() -> None:
        thread_ids.append(threading.get_ident())
        for i in range(50):
            ctx.log(f"step {i}")

    await asyncio.to_thread(pipeline_thread)
    assert thread_ids[0] != threading.get_ident()
    assert [line["message"] for line in record.logs] == [f"step {i}" for i in range(50)]
    assert not record.cancel_requested
    ctx.cancel_event.set()
    assert record.cancel_requested


async def test_fail_stores_the_error_and_completes() -> None:
    record = _record()
    record.start()
    waiter = asyncio.create_task(record.wait_changed(10))
    await asyncio.sleep(0)
    record.fail("bad mask", "validation_error", 422)
    assert await waiter is True
    assert record.state == "COMPLETED" and record.finished_at is not None and record.result is None
    assert (record.error, record.error_type, record.error_status) == ("bad mask", "validation_error", 422)
    assert record.error_body == {"detail": "bad mask", "error_type": "validation_error"}

    detailed = _record()
    body = {"detail": [{"loc": ["body", "mask_url"], "msg": "bad mask", "type": "value_error"}]}
    detailed.fail("bad mask", "validation_error", 422, body)
    assert detailed.error_body == body


async def test_cancelled_and_internal_failures() -> None:
    cancelled = _record()
    cancelled.fail_cancelled("cancelled while queued")
    assert cancelled.logs[-1]["message"] == "cancelled while queued"
    assert (cancelled.state, cancelled.error, cancelled.error_type, cancelled.error_status) == (
        "COMPLETED", "Request was cancelled", "cancelled", 400)

    crashed = _record()
    crashed.fail_internal(RuntimeError("out of memory"))
    assert (crashed.error, crashed.error_type, crashed.error_status) == (
        "the worker failed: RuntimeError: out of memory", "runner_error", 500)
    assert crashed.logs == []  # the caller decides whether clients see a log line


async def test_each_app_has_its_record_under_its_own_urls() -> None:
    inpaint = _record()
    check = CheckRecord(id="c1", input=NsfwCheckInput(image_url="data:,"), base_url="http://worker")
    assert (inpaint.app_id, inpaint.url_prefix) == ("fal-ai/fast-sdxl/inpainting", "fal-ai/fast-sdxl")
    assert (check.app_id, check.url_prefix) == ("fal-ai/imageutils/nsfw", "fal-ai/imageutils")
    assert request_urls(check)["status_url"] == "http://worker/fal-ai/imageutils/requests/c1/status"
    # the output's prompt is the expanded one once there is one
    assert inpaint.prompt == inpaint.input.prompt
    inpaint.expanded_prompt = f"{inpaint.input.prompt}, oil painting"
    assert inpaint.prompt == "a red door, oil painting"
