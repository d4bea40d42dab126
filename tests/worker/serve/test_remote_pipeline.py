"""The ingress's remote pipeline and the model replicas' batching rules, without a cluster: a model deployment
that never takes a request (none running) fails the request in bounded time and makes /health say not ready; a
Serve batch is cut to MAX_BATCH_IMAGES per pipeline call; plain requests carry no multiplexed id."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.worker.pipelines.base import LoraSpec, PipelineJob, RunContext
from services.worker.serve import remote
from services.worker.serve.model import _chunks, _Item
from services.worker.serve.remote import NoReplica, RemotePipeline
from tests.helpers.waits import wait_until


class _Silent:
    """A call Serve's router holds because no replica runs: nothing ever arrives."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Any:
        return asyncio.Event().wait().__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._never()

    async def _never(self) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield None


class _Method:
    def __init__(self, calls: list[_Silent]) -> None:
        self.calls = calls

    def remote(self, *args: Any) -> _Silent:
        self.calls.append(_Silent())
        return self.calls[-1]


class _Handle:
    """Shaped like a DeploymentHandle to a deployment with no running replica."""

    def __init__(self) -> None:
        self.calls: list[_Silent] = []
        self.options_seen: list[dict[str, Any]] = []
        self.generate = self.info = _Method(self.calls)

    def options(self, **options: Any) -> _Handle:
        self.options_seen.append(options)
        return self


def _job(num_images: int = 1, loras: tuple[LoraSpec, ...] = ()) -> PipelineJob:
    image = Image.new("RGB", (64, 64))
    return PipelineJob(image=image, mask=image.convert("L"), prompt="p", negative_prompt="", steps=4,
                       guidance_scale=7.5, strength=1.0, seeds=tuple(range(num_images)), loras=loras)


async def test_a_request_no_replica_takes_fails_in_bounded_time_and_its_call_is_cancelled() -> None:
    handle = _Handle()
    pipeline = RemotePipeline(handle, {"name": "sdxl"}, concurrent_batches=4, replica_wait_s=0.2)  # type: ignore[arg-type]
    with pytest.raises(NoReplica, match=r"no model replica took this request within 0\.2 s"):
        async with asyncio.timeout(5):
            await pipeline.run_one(_job(), RunContext(log=lambda line: None))
    assert [call.cancelled for call in handle.calls] == [True]
    assert handle.options_seen == [{"stream": True}]  # a plain request names no adapter set


async def test_health_says_not_ready_while_no_replica_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "WATCH_TIMEOUT_S", 0.05)
    monkeypatch.setattr(remote, "WATCH_EVERY_S", 0.01)
    handle = _Handle()
    pipeline = RemotePipeline(handle, {"name": "sdxl"}, concurrent_batches=4)  # type: ignore[arg-type]
    assert pipeline.ready
    watcher = asyncio.create_task(pipeline.watch_replicas())
    try:
        await wait_until(lambda: not pipeline.ready, what="not ready", within_s=5)
    finally:
        watcher.cancel()
    assert handle.calls and all(call.cancelled for call in handle.calls[:-1])


async def test_a_lora_request_names_its_adapter_set() -> None:
    handle = _Handle()
    pipeline = RemotePipeline(handle, {}, concurrent_batches=1, replica_wait_s=0.01)  # type: ignore[arg-type]
    with pytest.raises(NoReplica):
        await pipeline.run_one(_job(loras=(LoraSpec(Path("/l/a.safetensors"), 1.0),)),
                               RunContext(log=lambda line: None, cancel_event=threading.Event()))
    assert handle.options_seen[0]["multiplexed_model_id"].startswith("lora-")


def test_a_serve_batch_is_cut_to_max_batch_images_per_pipeline_call() -> None:
    loop = asyncio.new_event_loop()
    try:
        items = [_Item(_job(n), loop) for n in (2, 2, 2, 2, 8, 1)]
        chunks = list(_chunks([[0, 1, 2, 3], [4, 5]], items, max_images=4))
    finally:
        loop.close()
    # whole requests only; one larger than the limit runs alone
    assert chunks == [[0, 1], [2, 3], [4], [5]]
