"""fal's NSFW estimator, `fal-ai/imageutils/nsfw`, on the worker, over real HTTP: the queue protocol (submit,
status, result, cancel, SSE, the synchronous endpoint, auth, expiry) with a fake checker that flags red images,
the tiny real `StableDiffusionSafetyChecker` loaded through SAFETY_CHECKER_PATH, and fal's official client."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.schema import NSFW_APP_ID, NsfwCheckOutput
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.queue import MAX_RUNNING_CHECKS
from tests.helpers.worker_harness import serve
from tests.worker.fakes import BLUE_URI, RED_URI, FakePipeline, GatedChecker, flag_red, inpaint_input

KEY = "worker-id:worker-secret"
PREFIX = "fal-ai/imageutils"
NOT_AN_IMAGE = "data:image/png;base64,bm90IGFuIGltYWdl"


def _config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {"pipeline": "classic", "worker_key": KEY, "warmup": False, **overrides}
    return WorkerConfig(_env_file=None, **values)


def _http(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"Authorization": f"Key {KEY}"}, timeout=30)


async def _wait_state(http: httpx.AsyncClient, status_url: str, state: str) -> dict[str, Any]:
    for _ in range(1500):
        body: dict[str, Any] = (await http.get(status_url, params={"logs": "1"})).json()
        if body["status"] == state:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"never reached {state}")


async def _check(http: httpx.AsyncClient, image_url: str) -> tuple[dict[str, Any], httpx.Response]:
    """Submit a check, follow it to the end: (its last status, its result response)."""
    submit = await http.post(f"/{NSFW_APP_ID}", json={"image_url": image_url})
    assert submit.status_code == 200, submit.text
    done = await _wait_state(http, submit.json()["status_url"], "COMPLETED")
    return done, await http.get(submit.json()["response_url"])


@pytest.fixture
async def red_checker() -> AsyncIterator[str]:
    """A worker whose checker flags red images (and may fetch from loopback, where its test files are)."""
    async with serve(create_app(_config(fetch_allow=["127.0.0.1"]), safety=flag_red)) as base:
        yield base


async def test_submit_status_and_result(red_checker: str) -> None:
    async with _http(red_checker) as http:
        submit = await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})
        assert submit.status_code == 200
        handle = submit.json()
        rid = handle["request_id"]
        assert handle["status"] == "IN_QUEUE" and isinstance(handle["queue_position"], int)
        assert submit.headers["x-fal-request-id"] == rid
        assert handle["response_url"] == f"{red_checker}/{PREFIX}/requests/{rid}"
        assert handle["status_url"] == f"{red_checker}/{PREFIX}/requests/{rid}/status"
        assert handle["cancel_url"] == f"{red_checker}/{PREFIX}/requests/{rid}/cancel"

        done = await _wait_state(http, handle["status_url"], "COMPLETED")
        assert "error" not in done and done["metrics"]["inference_time"] >= 0
        messages = [log["message"] for log in done["logs"]]
        assert messages[0].startswith("estimating the NSFW probability with the safety checker")
        assert messages[-1].startswith("done in") and messages[-1].endswith(": flagged")
        assert {"message", "level", "source", "timestamp"} <= set(done["logs"][0])
        quiet = await http.get(handle["status_url"])
        assert quiet.status_code == 200 and "logs" in quiet.json() and quiet.json()["logs"] is None

        result = await http.get(handle["response_url"])
        assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
        assert result.json() == {"nsfw_probability": 1.0}
        # the full app id and trailing slashes reach the same request; another app's URLs don't
        for path in (f"/{NSFW_APP_ID}/requests/{rid}", f"/{PREFIX}/requests/{rid}/", f"/{NSFW_APP_ID}/requests/{rid}/"):
            resp = await http.get(path)
            assert resp.status_code == 200 and resp.json() == {"nsfw_probability": 1.0}, path
        for path in (f"/fal-ai/fast-sdxl/requests/{rid}", f"/fal-ai/fast-sdxl/inpainting/requests/{rid}/status",
                     f"/fal-ai/imageutils/depth/requests/{rid}"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.put(f"/fal-ai/fast-sdxl/requests/{rid}/cancel")).json() == {"status": "NOT_FOUND"}
        cancel = await http.put(handle["cancel_url"])
        assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})

        _, clean = await _check(http, BLUE_URI)
        assert NsfwCheckOutput.model_validate(clean.json()).nsfw_probability == 0.0


async def test_an_unreadable_image_is_a_stored_422_on_image_url(red_checker: str) -> None:
    async with _http(red_checker) as http:
        missing = f"{red_checker}/files/no-such-request/0.png"  # a URL that answers 404
        for image_url, code in ((NOT_AN_IMAGE, "image_error.not_an_image"),
                                (missing, "image_error.download_failed"),
                                ("ftp://example.invalid/x.png", "image_error.bad_source")):
            done, result = await _check(http, image_url)
            assert done["error_type"] == "validation_error" and done["logs"][-1]["level"] == "ERROR"
            assert result.status_code == 422 and result.headers["x-fal-error-type"] == "validation_error"
            detail = result.json()["detail"]
            assert (detail[0]["loc"], detail[0]["type"]) == (["body", "image_url"], code) and detail[0]["msg"]
        # a body without an image is refused at submit, as fal does
        for body in ({}, {"image_url": ""}, {"image_url": 3}):
            resp = await http.post(f"/{NSFW_APP_ID}", json=body)
            assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "image_url"], body
        bad_json = await http.post(f"/{NSFW_APP_ID}", content=b"{", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"


async def test_without_a_checker_the_submit_names_the_setting() -> None:
    async with serve(create_app(_config())) as base, _http(base) as http:
        resp = await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})
        sync = await http.post(f"/sync/{NSFW_APP_ID}", json={"image_url": RED_URI})
        unknown = await http.post("/fal-ai/imageutils/depth", json={"image_url": RED_URI})
        health = (await http.get("/health")).json()
    for refused in (resp, sync):
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert detail[0]["loc"] == ["body"] and "SAFETY_CHECKER_PATH" in detail[0]["msg"]
    assert unknown.status_code == 404 and NSFW_APP_ID in unknown.json()["detail"]
    assert health["safety_checker"] is False and health["queue_length"] == 0


async def test_sync_endpoint_and_auth(red_checker: str) -> None:
    async with _http(red_checker) as http:
        red = await http.post(f"/sync/{NSFW_APP_ID}", json={"image_url": RED_URI})
        blue = await http.post(f"/sync/{NSFW_APP_ID}/", json={"image_url": BLUE_URI})
        bad = await http.post(f"/sync/{NSFW_APP_ID}", json={"image_url": NOT_AN_IMAGE})
        handle = (await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})).json()
    assert (red.status_code, red.json()) == (200, {"nsfw_probability": 1.0})
    assert (blue.status_code, blue.json()) == (200, {"nsfw_probability": 0.0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image_url"]
    async with httpx.AsyncClient(base_url=red_checker, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Key wrong"}):
            for method, url in (("POST", f"/{NSFW_APP_ID}"), ("POST", f"/sync/{NSFW_APP_ID}"),
                                ("GET", handle["status_url"]), ("GET", handle["response_url"]),
                                ("PUT", handle["cancel_url"])):
                resp = await anonymous.request(method, url, json={"image_url": RED_URI}, headers=headers)
                assert resp.status_code == 401 and "x-fal-request-id" in resp.headers, (method, url, headers)


async def test_sse_stream_sends_the_logs_and_closes(red_checker: str) -> None:
    async with _http(red_checker) as http:
        handle = (await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})).json()
        events: list[dict[str, Any]] = []
        async with http.stream("GET", handle["status_url"] + "/stream", params={"logs": "1"}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "COMPLETED" and "error" not in events[-1]
    messages = [log["message"] for e in events for log in (e.get("logs") or [])]
    assert len(messages) == len(set(messages)) == 2 and messages[-1].endswith(": flagged")


async def test_cancel_a_running_and_a_waiting_check() -> None:
    checker = GatedChecker()
    async with serve(create_app(_config(), safety=checker)) as base, _http(base) as http:
        running = [(await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})).json()
                   for _ in range(MAX_RUNNING_CHECKS)]
        for _ in running:  # every slot is taken, by a check inside the checker
            assert await asyncio.to_thread(checker.entered.acquire, True, 30)
        waiting = (await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})).json()
        behind = (await http.post(f"/{NSFW_APP_ID}", json={"image_url": BLUE_URI})).json()
        assert (waiting["queue_position"], behind["queue_position"]) == (0, 1)
        assert (await http.get("/health")).json()["queue_length"] == MAX_RUNNING_CHECKS + 2

        cancel = await http.put(waiting["cancel_url"])
        assert (cancel.status_code, cancel.json()) == (200, {"status": "OK"})
        assert (await http.get(behind["status_url"])).json()["queue_position"] == 0
        cancel = await http.put(running[0]["cancel_url"])
        assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        checker.gate.set()

        stopped = await _wait_state(http, running[0]["status_url"], "COMPLETED")
        assert stopped["error_type"] == "cancelled"
        assert [log["message"] for log in stopped["logs"]][-2:] == ["cancellation requested",
                                                                    "cancelled: its result is discarded"]
        assert (await http.get(running[0]["response_url"])).status_code == 400
        gone = await http.get(waiting["response_url"])
        assert gone.status_code == 400 and gone.json()["error_type"] == "cancelled"
        for handle in running[1:]:
            await _wait_state(http, handle["status_url"], "COMPLETED")
            assert (await http.get(handle["response_url"])).json() == {"nsfw_probability": 1.0}
        await _wait_state(http, behind["status_url"], "COMPLETED")
        assert (await http.get(behind["response_url"])).json() == {"nsfw_probability": 0.0}


async def test_checks_do_not_wait_behind_inpainting() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    async with serve(create_app(_config(worker_key=None), pipeline=pipeline, safety=flag_red)) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        body = inpaint_input().model_dump(mode="json")
        busy = (await http.post("/fal-ai/fast-sdxl/inpainting", json=body)).json()
        assert await asyncio.to_thread(pipeline.entered.wait, 30)
        queued = (await http.post("/fal-ai/fast-sdxl/inpainting", json=body)).json()
        check = await http.post(f"/sync/{NSFW_APP_ID}", json={"image_url": RED_URI})
        assert check.json() == {"nsfw_probability": 1.0}
        assert (await http.get(busy["status_url"])).json()["status"] == "IN_PROGRESS"
        assert (await http.get(queued["status_url"])).json()["status"] == "IN_QUEUE"
        gate.set()
        await _wait_state(http, queued["status_url"], "COMPLETED")


async def test_results_expire_after_the_ttl() -> None:
    async with serve(create_app(_config(result_ttl_s=0.2), safety=flag_red)) as base, _http(base) as http:
        handle = (await http.post(f"/{NSFW_APP_ID}", json={"image_url": RED_URI})).json()
        await _wait_state(http, handle["status_url"], "COMPLETED")
        assert (await http.get(handle["response_url"])).status_code == 200
        await asyncio.sleep(0.6)
        assert (await http.get(handle["response_url"])).status_code == 404
        assert (await http.get(handle["status_url"])).status_code == 404
        assert (await http.put(handle["cancel_url"])).json() == {"status": "NOT_FOUND"}


@pytest.mark.parametrize(("fixture", "expected"), [("checker_flags_all", 1.0), ("checker_flags_none", 0.0)])
async def test_the_real_checker_from_safety_checker_path(fixture: str, expected: float,
                                                         request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    async with serve(create_app(_config(safety_checker_path=path))) as base, _http(base) as http:
        assert (await http.get("/health")).json()["safety_checker"] is True
        for image_url in (RED_URI, BLUE_URI):
            done, result = await _check(http, image_url)
            assert result.status_code == 200 and result.json() == {"nsfw_probability": expected}
            assert done["logs"][-1]["message"].endswith(": flagged" if expected else ": not flagged")
        sync = await http.post(f"/sync/{NSFW_APP_ID}", json={"image_url": RED_URI})
        assert sync.json() == {"nsfw_probability": expected}


async def test_official_fal_client(red_checker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fal_client
    import fal_client.client

    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", red_checker + "/")
    client = fal_client.AsyncClient(key=KEY)
    seen: list[Any] = []
    result = await client.subscribe(NSFW_APP_ID, arguments={"image_url": RED_URI}, with_logs=True,
                                    on_queue_update=seen.append)
    assert result == {"nsfw_probability": 1.0}
    assert seen, "no queue updates reached the callback"

    handle = await client.submit(NSFW_APP_ID, arguments={"image_url": BLUE_URI})
    assert handle.status_url.startswith(f"{red_checker}/{PREFIX}/requests/")
    assert await handle.get() == {"nsfw_probability": 0.0}
    status = await handle.status(with_logs=True)
    assert isinstance(status, fal_client.Completed) and status.logs
    assert any(log["message"].endswith(": not flagged") for log in status.logs)

    failing = await client.submit(NSFW_APP_ID, arguments={"image_url": NOT_AN_IMAGE})
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        await failing.get()
    assert info.value.status_code == 422
