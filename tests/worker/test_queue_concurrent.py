"""The queue with a pipeline that runs several batches at once (`concurrent_batches`, `run_batch_async`: the Ray
Serve ingress's remote pipeline): requests wait in the queue while every slot is busy, a cancel there frees
everything they held, and the queue keeps running afterwards."""

from __future__ import annotations

import asyncio
import functools

from PIL import Image

from services.worker.config import WorkerConfig
from services.worker.pipelines.base import Cancelled, PipelineJob, RunContext
from services.worker.queue import RequestQueue
from tests.helpers.waits import wait_until
from tests.worker.fakes import inpaint_input


class FakeRemote:
    """Runs each job once the test releases its prompt (as replicas elsewhere would, whenever they finish)."""

    name = "remote"
    device = "cpu"
    model = "m"
    batches = False

    def __init__(self, concurrent: int) -> None:
        self.concurrent_batches = concurrent
        self.started: list[str] = []
        self.released: set[str] = set()

    def warmup(self) -> None: ...

    def run(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]:
        raise NotImplementedError

    def run_batch(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        raise NotImplementedError

    async def run_batch_async(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        self.started.extend(j.prompt for j in jobs)
        while not all(j.prompt in self.released for j in jobs):
            if all(c.cancel_event.is_set() for c in ctxs):
                raise Cancelled()
            await asyncio.sleep(0.01)
        return [[Image.new("RGB", j.image.size) for _ in j.seeds] for j in jobs]


async def test_requests_wait_in_the_queue_while_every_slot_is_busy_and_a_cancel_there_frees_them() -> None:
    config = WorkerConfig(_env_file=None, pipeline="classic", max_batch_images=2, prepare_concurrency=2)
    pipe = FakeRemote(concurrent=2)
    queue = RequestQueue(config, pipe)
    async with queue.background_tasks():
        busy = [await queue.submit(inpaint_input(prompt=f"busy {i}"), "http://w") for i in range(2)]
        await wait_until(lambda: len(pipe.started) == 2, what="both busy requests running")
        assert all(record.state == "IN_PROGRESS" for record in busy) and queue.queue_length == 2
        for i in range(3):  # more cancels than the preparer looks ahead (max_batch_images = 2)
            victim = await queue.submit(inpaint_input(prompt=f"victim {i}"), "http://w")
            await wait_until(functools.partial(queue.preparer.is_ready, victim), what="the victim prepared")
            await asyncio.sleep(0.05)  # the runner had its chance to take it
            assert victim in queue.pending and queue.position(victim) == 0 and victim.state == "IN_QUEUE"
            assert queue.cancel(victim.id) == "OK"
        assert queue.preparer.prepared == 0, "a cancelled request's prepared job is still held"
        pipe.released.update({"busy 0", "busy 1", "fresh"})
        fresh = await queue.submit(inpaint_input(prompt="fresh"), "http://w")
        await wait_until(lambda: fresh.state == "COMPLETED", what="a later request done")
        assert fresh.error is None and fresh.result is not None
        assert all(record.state == "COMPLETED" and record.error is None for record in busy)
        # (the two busy ones start in the order their preparations finish) and no cancelled request ever ran
        assert sorted(pipe.started[:2]) == ["busy 0", "busy 1"] and pipe.started[2:] == ["fresh"]
        await wait_until(lambda: queue.queue_length == 0, what="an empty queue")
        assert queue.running == [] and queue.preparer.prepared == 0
