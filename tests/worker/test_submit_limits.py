"""What a submit is refused for, over real HTTP: a cost over MAX_REQUEST_COST (422 naming the fields), waiting
sources over MAX_QUEUE_BYTES (503 with Retry-After); results kept on disk and served from there."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from services.images import to_data_uri
from services.schema import InpaintOutput
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.cost import request_cost
from services.worker.pipelines.classic import ClassicPipeline
from tests.helpers.imagegen import encode
from tests.helpers.worker_harness import serve
from tests.worker.fakes import FakePipeline, inpaint_input
from tests.worker.test_queue_pipelining import _wait

APP = "fal-ai/fast-sdxl/inpainting"


def _config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(_env_file=None, pipeline="classic", **overrides)


def _body(**overrides: Any) -> dict[str, Any]:
    return inpaint_input(**overrides).model_dump(mode="json", exclude_unset=True)


def _noise_uri(side: int) -> str:
    """A PNG data URI of random pixels (incompressible: about 4 characters per pixel)."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return to_data_uri(encode(Image.fromarray(pixels, "RGB")), "image/png")


def _locs(resp: httpx.Response) -> list[list[str]]:
    return [item["loc"] for item in resp.json()["detail"]]


async def test_a_request_costing_too_much_is_a_422_naming_its_fields() -> None:
    async with serve(create_app(_config(warmup=False))) as base, httpx.AsyncClient(base_url=base) as http:
        # the issue's 75 s: 2048² × 8 images on the classic pipeline
        resp = await http.post(f"/{APP}", json=_body(image_size={"width": 2048, "height": 2048}, num_images=8))
        assert resp.status_code == 422
        assert _locs(resp) == [["body", "image_size"], ["body", "num_images"]]  # classic: the steps don't count
        detail = resp.json()["detail"]
        assert "MAX_REQUEST_COST" in detail[0]["msg"] and "2048×2048" in detail[0]["msg"]
        assert "classic pipeline counts a 2048×2048 request as 100 steps" in detail[0]["msg"]
        assert {item["type"] for item in detail} == {"value_error.request_cost"}
        # fal's largest preset with every image and step the schema allows is admitted by default
        ok = await http.post(f"/{APP}", json=_body(image_size="square_hd", num_images=8, num_inference_steps=65,
                                                   sync_mode=True))
        assert ok.status_code == 200
        await http.put(ok.json()["cancel_url"])


async def test_on_a_diffusion_pipeline_the_steps_count_too() -> None:
    limit = 512 * 512 * 2 * 25
    app = create_app(_config(max_request_cost=limit), pipeline=FakePipeline())
    async with serve(app) as base, httpx.AsyncClient(base_url=base) as http:
        size = {"width": 512, "height": 512}
        assert (await http.post(f"/{APP}", json=_body(image_size=size, num_images=2,
                                                      num_inference_steps=25))).status_code == 200
        resp = await http.post(f"/{APP}", json=_body(image_size=size, num_images=2, num_inference_steps=26))
        assert resp.status_code == 422
        assert _locs(resp) == [["body", "image_size"], ["body", "num_images"], ["body", "num_inference_steps"]]
        assert f"{512 * 512 * 2 * 26:,}" in resp.json()["detail"][0]["msg"]


def test_the_classic_pipeline_counts_the_square_of_the_pixels() -> None:
    classic = ClassicPipeline()
    one_mp = request_cost(inpaint_input(image_size={"width": 1024, "height": 1024}), classic)
    four_mp = request_cost(inpaint_input(image_size={"width": 2048, "height": 2048}), classic)
    assert one_mp == 1024 * 1024 * 25 and four_mp == 16 * one_mp
    assert request_cost(inpaint_input(num_inference_steps=1), classic) == \
        request_cost(inpaint_input(num_inference_steps=65), classic)


async def test_waiting_sources_are_limited_in_bytes(tmp_path: Path) -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate, batches=False)
    image = _noise_uri(420)
    assert 600_000 < len(image) < 1024 * 1024  # two of them pass MAX_QUEUE_BYTES (its least: 1 MiB)
    body = _body(image_url=image, image_size={"width": 64, "height": 64})
    # one request prepared ahead at most: the third waits with its sources, and only its sources count
    app = create_app(_config(max_queue_bytes=1024 * 1024, worker_data_dir=tmp_path, max_batch_images=1,
                             prepare_concurrency=1), pipeline=pipeline)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        first = (await http.post(f"/{APP}", json=body)).json()
        await _wait(http, first["status_url"], "IN_PROGRESS")  # prepared and running: its sources are gone
        second, third = [await http.post(f"/{APP}", json=body) for _ in range(2)]
        assert second.status_code == third.status_code == 200
        full = await http.post(f"/{APP}", json=body)
        assert full.status_code == 503 and full.headers["retry-after"].isdigit()
        assert "MiB" in full.json()["detail"] and full.json()["error_type"] == "queue_full"
        # a request with URLs only still fits
        assert (await http.post(f"/{APP}", json=_body(image_url="http://127.0.0.1:9/x.png"))).status_code == 200
        gate.set()
        await _wait(http, third.json()["status_url"], "COMPLETED")


async def test_results_are_kept_on_disk_served_from_there_and_deleted_when_they_expire(tmp_path: Path) -> None:
    app = create_app(_config(worker_data_dir=tmp_path, result_ttl_s=2, warmup=False))  # the classic fill
    body = _body(image_url=_noise_uri(256), image_size={"width": 256, "height": 256}, format="png")
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        files = (await http.post(f"/{APP}", json=body)).json()
        inline = (await http.post(f"/{APP}", json=body | {"sync_mode": True, "num_images": 2})).json()
        await _wait(http, files["status_url"], "COMPLETED")
        await _wait(http, inline["status_url"], "COMPLETED")
        out = InpaintOutput.model_validate((await http.get(files["response_url"])).json())
        image = await http.get(out.images[0].url)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        assert (tmp_path / "results" / files["request_id"] / "0.png").read_bytes() == image.content
        # two 256² PNGs of noise as data URIs: too large to keep in memory, served from disk as they were made
        resp = await http.get(inline["response_url"])
        assert resp.status_code == 200 and resp.headers["x-fal-request-id"] == inline["request_id"]
        assert resp.headers["content-type"] == "application/json"
        assert len(InpaintOutput.model_validate(resp.json()).images) == 2
        assert (tmp_path / "results" / inline["request_id"] / "result.json").read_bytes() == resp.content
        for _ in range(300):  # the reaper runs every RESULT_TTL_S / 2
            if (await http.get(files["response_url"])).status_code == 404:
                break
            await asyncio.sleep(0.05)
        assert (await http.get(out.images[0].url)).status_code == 404
        assert (await http.get(inline["response_url"])).status_code == 404
        assert list((tmp_path / "results").iterdir()) == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_bodies_wait_their_turn_and_are_served(chunked: bool) -> None:
    """Large bodies are read one at a time; each is served (a chunked body, of unknown length, counts as large)."""
    image = _noise_uri(600)
    assert len(image) > 1024 * 1024
    body = _body(image_url=image, image_size={"width": 64, "height": 64})
    async with serve(create_app(_config(), pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps(body).encode()

        if chunked:
            sent = await asyncio.gather(*(http.post(f"/{APP}", content=chunks(),
                                                    headers={"content-type": "application/json"})
                                          for _ in range(3)))
        else:
            sent = await asyncio.gather(*(http.post(f"/{APP}", json=body) for _ in range(3)))
        assert [resp.status_code for resp in sent] == [200, 200, 200]
        for resp in sent:
            await _wait(http, resp.json()["status_url"], "COMPLETED")


async def test_a_client_that_stops_sending_its_body_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two connections announce 3 MB submits and send one byte: past the body deadline each is answered 408, and a
    real large submit behind them is served (they can't hold the large-body slots for as long as they stay open)."""
    monkeypatch.setattr("services.worker.app.BODY_READ_S", 0.5)
    body = _body(image_url=_noise_uri(600), image_size={"width": 64, "height": 64})
    async with serve(create_app(_config(), pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        host, port = base.removeprefix("http://").split(":")
        stalled = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST /{APP} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 3000000\r\n\r\n{{".encode())
            await writer.drain()
            stalled.append((reader, writer))
        resp = await http.post(f"/{APP}", json=body)
        assert resp.status_code == 200
        for reader, writer in stalled:
            answer = await asyncio.wait_for(reader.read(200), 5)
            assert answer.startswith(b"HTTP/1.1 408")
            writer.close()
