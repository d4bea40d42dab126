"""The worker's fal queue protocol, over real HTTP: our client, raw httpx, and fal's official client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.backends.fal_queue import FalQueueClient, FalRequestFailed, FalValidationError, QueueUpdate
from services.schema import InpaintOutput
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from tests.helpers.imagegen import image_pair_uris
from tests.helpers.worker_harness import serve
from tests.worker.fakes import FakePipeline, flag_all

KEY = "worker-id:worker-secret"
APP = "fal-ai/fast-sdxl/inpainting"


def _config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {"pipeline": "classic", "worker_key": KEY, **overrides}
    return WorkerConfig(_env_file=None, **values)


def _body(**overrides: Any) -> dict[str, Any]:
    image, mask = image_pair_uris((64, 64))
    return {"image_url": image, "mask_url": mask, "prompt": "a red door", "image_size": {"width": 64, "height": 64},
            "enable_safety_checker": False, "seed": 42, **overrides}


@pytest.fixture
async def classic() -> AsyncIterator[str]:
    async with serve(create_app(_config())) as base:
        yield base


@pytest.fixture
async def slow_sdxl(tiny_inpaint_model: Path) -> AsyncIterator[str]:
    """The tiny SDXL model: 65 steps take long enough to see a request queued and running."""
    async with serve(create_app(_config(pipeline="sdxl", model_path=tiny_inpaint_model, max_queue=2))) as base:
        yield base


def _http(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"Authorization": f"Key {KEY}"}, timeout=30)


async def _wait_state(http: httpx.AsyncClient, status_url: str, state: str) -> dict[str, Any]:
    for _ in range(600):
        body: dict[str, Any] = (await http.get(status_url, params={"logs": "1"})).json()
        if body["status"] == state:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"never reached {state}")


async def _wait_log(http: httpx.AsyncClient, status_url: str, start: str) -> None:
    for _ in range(600):
        body: dict[str, Any] = (await http.get(status_url, params={"logs": "1"})).json()
        if any(log["message"].startswith(start) for log in body["logs"] or []):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no log line starting {start!r}")


async def test_full_protocol_through_the_bots_client(classic: str) -> None:
    updates: list[QueueUpdate] = []

    async def collect(update: QueueUpdate) -> None:
        updates.append(update)

    async with FalQueueClient(base_url=classic, key=KEY, poll_interval_s=0.02) as client:
        out = await client.run(_body(num_images=2, format="png"), on_update=collect)
    assert out.seed == 42 and out.prompt == "a red door" and out.has_nsfw_concepts == [False, False]
    assert [(i.width, i.height, i.content_type) for i in out.images] == [(64, 64, "image/png")] * 2
    logs = [u.log.message for u in updates if u.log]
    assert "classic pipeline: content-aware fill; the prompt is not used" in logs
    assert "step 2/2 (navier-stokes)" in logs
    assert updates[-1].kind == "completed" and updates[-1].metrics and "inference_time" in updates[-1].metrics
    # not sync_mode: the images are files the worker serves (no key needed, like fal's CDN)
    async with httpx.AsyncClient() as http:
        resp = await http.get(out.images[0].url)
    assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")


async def test_status_codes_logs_key_and_url_forms(classic: str) -> None:
    async with _http(classic) as http:
        submit = await http.post(f"/{APP}", json=_body())
        assert submit.status_code == 200
        handle = submit.json()
        assert handle["status"] == "IN_QUEUE" and isinstance(handle["queue_position"], int)
        rid = handle["request_id"]
        assert submit.headers["x-fal-request-id"] == rid
        assert handle["status_url"] == f"{classic}/fal-ai/fast-sdxl/requests/{rid}/status"
        assert handle["response_url"] == f"{classic}/fal-ai/fast-sdxl/requests/{rid}"
        assert handle["cancel_url"] == f"{classic}/fal-ai/fast-sdxl/requests/{rid}/cancel"

        done = await _wait_state(http, handle["status_url"], "COMPLETED")
        assert isinstance(done["logs"], list) and done["logs"][0]["message"]
        assert {"message", "level", "source", "timestamp"} <= set(done["logs"][0])
        assert done["metrics"]["inference_time"] >= 0
        # logs=0 / false: the key is there, its value null; every spelling of the flag is understood
        for flag, expect_list in (("0", False), ("false", False), ("true", True), ("1", True), ("TRUE", True)):
            body = (await http.get(handle["status_url"], params={"logs": flag})).json()
            assert "logs" in body and isinstance(body["logs"], list) is expect_list
        # owner/alias form, full-id form, trailing slashes: all the same request
        for path in (f"/fal-ai/fast-sdxl/requests/{rid}/status", f"/{APP}/requests/{rid}/status",
                     f"/fal-ai/fast-sdxl/requests/{rid}/status/", f"/{APP}/requests/{rid}/status/"):
            resp = await http.get(path)
            assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED", path
        for path in (f"/fal-ai/fast-sdxl/requests/{rid}", f"/{APP}/requests/{rid}/"):
            resp = await http.get(path)
            assert resp.status_code == 200 and InpaintOutput.model_validate(resp.json()).seed == 42
            assert resp.headers["x-fal-request-id"] == rid
        assert (await http.put(f"/{APP}/requests/{rid}/cancel")).json() == {"status": "ALREADY_COMPLETED"}
        # unknown requests and apps
        missing = await http.get("/fal-ai/fast-sdxl/requests/no-such-id/status")
        assert missing.status_code == 404 and "x-fal-request-id" in missing.headers
        assert (await http.put("/fal-ai/fast-sdxl/requests/no-such-id/cancel")).json() == {"status": "NOT_FOUND"}
        assert (await http.post("/fal-ai/fast-sdxl/image-to-image", json=_body())).status_code == 404


async def test_auth_is_required_when_a_key_is_set(classic: str) -> None:
    async with httpx.AsyncClient(base_url=classic) as http:
        for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": KEY}):
            resp = await http.post(f"/{APP}", json=_body(), headers=headers)
            assert resp.status_code == 401 and resp.json()["detail"], headers
            assert "x-fal-request-id" in resp.headers
        ok = await http.post(f"/{APP}", json=_body(), headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        health = await http.get("/health")  # liveness probes need no key
        assert health.status_code == 200
        assert health.json() | {"queue_length": 0} == {"ready": True, "pipeline": "classic", "model": "opencv-inpaint",
                                                        "device": "cpu", "queue_length": 0, "safety_checker": False,
                                                        "expand_prompt": False, "idempotency_keys": True,
                                                        "recompiles": 0}


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_inference_steps", 0), ("num_inference_steps", 66), ("guidance_scale", 21), ("strength", 0),
     ("num_images", 9), ("image_size", "huge"), ("image_size", {"width": 14143, "height": 64}), ("format", "gif"),
     ("safety_checker_version", "v9"), ("seed", -1), ("loras", [{"path": "x.safetensors", "scale": 2}]),
     ("prompt", None), ("image_url", ""), ("image_size", {"width": 4096, "height": 4096}),
     ("loras", [{"path": "x.safetensors"}]), ("embeddings", [{"path": "e.safetensors"}]),
     ("enable_safety_checker", True)],
)
async def test_422_on_each_invalid_field(classic: str, field: str, value: Any) -> None:
    async with _http(classic) as http:
        resp = await http.post(f"/{APP}", json=_body(**{field: value}))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail[0]["loc"][:2] == ["body", field] and detail[0]["msg"] and detail[0]["type"]


async def test_422_on_a_body_that_is_not_json(classic: str) -> None:
    async with _http(classic) as http:
        resp = await http.post(f"/{APP}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["type"] == "json_invalid"


async def test_bad_image_is_a_stored_422_result(classic: str) -> None:
    async with FalQueueClient(base_url=classic, key=KEY, poll_interval_s=0.02) as client:
        handle = await client.submit(_body(mask_url="data:image/png;base64,bm90IGFuIGltYWdl"))
        with pytest.raises(FalValidationError) as info:
            await client.follow(handle)
    assert info.value.field_errors[0][0] == "mask_url" and "isn't an image" in str(info.value)


async def test_sse_stream_sends_new_logs_and_closes(classic: str) -> None:
    async with _http(classic) as http:
        handle = (await http.post(f"/{APP}", json=_body(num_images=3))).json()
        events: list[dict[str, Any]] = []
        async with http.stream("GET", handle["status_url"] + "/stream", params={"logs": "1"}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "COMPLETED"
    messages = [log["message"] for e in events for log in (e.get("logs") or [])]
    assert messages.count("step 3/3 (telea)") == 1  # each line once: only new logs per event
    assert messages[-1].startswith("done in")


async def test_result_before_completion_is_202_with_status(slow_sdxl: str) -> None:
    async with _http(slow_sdxl) as http:
        handle = (await http.post(f"/{APP}", json=_body(num_inference_steps=65, strength=1.0))).json()
        early = await http.get(handle["response_url"])
        assert early.status_code == 202 and early.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
        await http.put(handle["cancel_url"])


async def test_queue_positions_cancel_and_full_queue(slow_sdxl: str) -> None:
    slow = _body(num_inference_steps=65, strength=1.0)
    async with _http(slow_sdxl) as http:
        first = (await http.post(f"/{APP}", json=slow)).json()
        running = await _wait_state(http, first["status_url"], "IN_PROGRESS")
        assert running["logs"] is not None and "queue_position" not in running
        await _wait_log(http, first["status_url"], "step ")  # denoising (on Ray Serve, a replica away)
        second = (await http.post(f"/{APP}", json=slow)).json()
        third = (await http.post(f"/{APP}", json=slow)).json()
        assert (second["queue_position"], third["queue_position"]) == (0, 1)
        # max_queue=2: a fourth waits nowhere
        full = await http.post(f"/{APP}", json=slow)
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]

        # cancel a queued request: it is removed, and the one behind it moves up
        cancel = await http.put(second["cancel_url"])
        assert (cancel.status_code, cancel.json()) == (200, {"status": "OK"})
        assert (await http.get(third["status_url"])).json()["queue_position"] == 0
        gone = (await http.get(second["status_url"])).json()
        assert gone["status"] == "COMPLETED" and gone["error_type"] == "cancelled"

        # cancel the running request: it stops between denoising steps
        cancel = await http.put(first["cancel_url"])
        assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        stopped = await _wait_state(http, first["status_url"], "COMPLETED")
        assert stopped["error_type"] == "cancelled"
        steps = [log["message"] for log in stopped["logs"] if log["message"].startswith("step ")]
        assert 0 < len(steps) < 65
        result = await http.get(first["response_url"])
        assert result.status_code == 400 and result.json()["error_type"] == "cancelled"

        # the third now runs; cancelling it through our client surfaces as a failed request
        await _wait_state(http, third["status_url"], "IN_PROGRESS")
        await http.put(third["cancel_url"])
    async with FalQueueClient(base_url=slow_sdxl, key=KEY, poll_interval_s=0.02) as client:
        with pytest.raises(FalRequestFailed) as info:
            await client.follow(_handle(third))
    assert info.value.error_type == "cancelled"


async def test_results_are_freed_after_the_ttl() -> None:
    async with serve(create_app(_config(result_ttl_s=0.2))) as base, _http(base) as http:
        handle = (await http.post(f"/{APP}", json=_body())).json()
        await _wait_state(http, handle["status_url"], "COMPLETED")
        assert (await http.get(handle["response_url"])).status_code == 200
        await asyncio.sleep(0.6)
        assert (await http.get(handle["response_url"])).status_code == 404
        assert (await http.get(handle["status_url"])).status_code == 404


async def test_sync_endpoint_returns_the_output(classic: str) -> None:
    async with _http(classic) as http:
        resp = await http.post(f"/sync/{APP}", json=_body(sync_mode=True, format="jpeg"))
    assert resp.status_code == 200
    out = InpaintOutput.model_validate(resp.json())
    assert out.images[0].url.startswith("data:image/jpeg;base64,") and out.seed == 42


async def test_official_fal_client_subscribes(classic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fal_client
    import fal_client.client

    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", classic + "/")
    client = fal_client.AsyncClient(key=KEY)
    seen: list[Any] = []
    result = await client.subscribe(APP, arguments=_body(num_images=2), with_logs=True,
                                    on_queue_update=seen.append)
    out = InpaintOutput.model_validate(result)
    assert out.seed == 42 and len(out.images) == 2
    assert seen, "no queue updates reached the callback"
    # fal_client polls every 0.1 s; a fast job's lines may all arrive with the last event, which has them all
    logs = [log["message"] for e in seen if hasattr(e, "logs") for log in (e.logs or [])]
    assert any(m.startswith("step 1/2") for m in logs)


def _handle(body: dict[str, Any]) -> Any:
    from services.schema import QueueHandle

    return QueueHandle.model_validate(body)


async def test_create_app_serves_the_pipeline_and_checker_it_is_given() -> None:
    pipeline = FakePipeline()
    app = create_app(_config(check_inputs=False), pipeline=pipeline, safety=flag_all)
    async with serve(app) as base, _http(base) as http:
        health = (await http.get("/health")).json()
        resp = await http.post(f"/sync/{APP}", json=_body(enable_safety_checker=True, sync_mode=True))
    assert (health["pipeline"], health["model"], health["safety_checker"]) == ("fake", "fake-model", True)
    assert resp.status_code == 200 and InpaintOutput.model_validate(resp.json()).has_nsfw_concepts == [True]
    assert len(pipeline.calls) == 1
