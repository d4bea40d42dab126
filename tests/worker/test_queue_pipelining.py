"""Preparation runs ahead of the device and beside it: a request whose image URL trickles in from a real loopback
server delays nobody but itself; inputs are dropped once prepared; bounds on preparations at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx

from services.images import to_data_uri
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.queue import RequestQueue
from services.worker.records import InpaintRecord
from services.worker.storage import SPOOL_ABOVE_BYTES
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.worker_harness import serve
from tests.worker.fakes import FakePipeline, inpaint_input

APP = "fal-ai/fast-sdxl/inpainting"


class TricklingServer:
    """A loopback HTTP server whose every response is a PNG header and then one byte per `gap_s`, until `stop()`:
    the slow image URL of the issue. `requests` counts the requests it got."""

    def __init__(self, gap_s: float = 0.5) -> None:
        self.gap_s = gap_s
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/slow.png"

    async def __aexit__(self, *exc: object) -> None:
        self._stopped.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n\x89PNG")
            await writer.drain()
            while not self._stopped.is_set():
                try:
                    await asyncio.wait_for(self._stopped.wait(), self.gap_s)
                except TimeoutError:
                    writer.write(b"\0")
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _body(**overrides: Any) -> dict[str, Any]:
    inp = inpaint_input(**overrides)
    return inp.model_dump(mode="json", exclude_unset=True)


async def _wait(http: httpx.AsyncClient, status_url: str, state: str) -> dict[str, Any]:
    for _ in range(1500):
        body: dict[str, Any] = (await http.get(status_url)).json()
        if body["status"] == state:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"never reached {state}")


async def test_a_trickling_image_url_does_not_delay_the_request_behind_it() -> None:
    config = WorkerConfig(_env_file=None, pipeline="classic", fetch_allow=["127.0.0.1"], fetch_deadline_s=60)
    async with TricklingServer() as slow_url, serve(create_app(config, pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        slow = (await http.post(f"/{APP}", json=_body(image_url=slow_url))).json()
        fast = (await http.post(f"/{APP}", json=_body(seed=3))).json()
        assert fast["queue_position"] == 1  # it arrived second
        done = await _wait(http, fast["status_url"], "COMPLETED")
        assert "error" not in done
        assert (await http.get(fast["response_url"])).json()["seed"] == 3
        # the first is still being fetched: it waits (first in line), holding nobody up
        still = (await http.get(slow["status_url"])).json()
        assert still["status"] == "IN_QUEUE" and still["queue_position"] == 0
        assert (await http.put(slow["cancel_url"])).json() == {"status": "OK"}
        assert (await _wait(http, slow["status_url"], "COMPLETED"))["error_type"] == "cancelled"


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never held")


async def _until_completed(*records: InpaintRecord) -> None:
    for record in records:
        while record.state != "COMPLETED":
            assert await record.wait_changed(30), f"{record.id} stopped changing"


async def test_the_next_batch_is_prepared_while_one_runs_and_inputs_are_dropped(tmp_path: Any) -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate, batches=False)
    config = WorkerConfig(_env_file=None, pipeline="classic", worker_data_dir=tmp_path, prepare_concurrency=2)
    queue = RequestQueue(config, pipeline)
    big = inpaint_input(image_size={"width": 64, "height": 64})
    async with queue.background_tasks():
        first = await queue.submit(big, "http://worker")
        assert await asyncio.to_thread(pipeline.entered.wait, 30)  # the first runs, held at the gate
        behind = [await queue.submit(big, "http://worker") for _ in range(3)]
        for record in behind:  # the record keeps no image: the sources wait in the storage, or in `sources`
            assert record.input.image_url == "" and record.input.mask_url == ""
        await _until(lambda: queue.preparer.prepared >= 2)  # prepared ahead, beside the running one
        assert queue.preparer.is_ready(behind[0]) and queue.preparer.is_ready(behind[1])
        assert behind[0].state == behind[1].state == "IN_QUEUE"
        assert all(record.sources is None for record in behind[:2])  # dropped once prepared
        gate.set()
        await _until_completed(first, *behind)
    assert [len(call) for call in pipeline.calls] == [1, 1, 1, 1]
    assert all(record.error is None for record in (first, *behind))
    assert all(record.sources is None and record.input.image_url == "" for record in (first, *behind))


async def test_large_sources_wait_on_disk_and_are_deleted_once_read(tmp_path: Any) -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate, batches=False)
    config = WorkerConfig(_env_file=None, pipeline="classic", worker_data_dir=tmp_path, prepare_concurrency=1)
    queue = RequestQueue(config, pipeline)
    photo_uri = to_data_uri(encode(photo(256, 256)), "image/png")
    assert len(photo_uri) > SPOOL_ABOVE_BYTES  # long enough to wait on disk
    inp = inpaint_input(image_url=photo_uri, mask_url=to_data_uri(encode(box_mask((256, 256), (8, 8, 64, 64))),
                                                                   "image/png"),
                        image_size={"width": 256, "height": 256})
    async with queue.background_tasks():
        running = await queue.submit(inp, "http://worker")
        assert await asyncio.to_thread(pipeline.entered.wait, 30)
        waiting = [await queue.submit(inp, "http://worker") for _ in range(3)]
        spooled = waiting[-1].sources  # the last can't have been prepared yet (PREPARE_CONCURRENCY=1)
        assert spooled is not None and spooled.path is not None and spooled.path.parent == tmp_path / "inputs"
        assert spooled.path.stat().st_size == len(photo_uri) + len(inp.mask_url)
        queue.cancel(waiting[-1].id)
        gate.set()
        await _until_completed(running, *waiting)
        assert list((tmp_path / "inputs").iterdir()) == []  # read back and deleted, or dropped at cancel
    assert not (tmp_path / "inputs").exists() and not (tmp_path / "results").exists()  # emptied at stop
