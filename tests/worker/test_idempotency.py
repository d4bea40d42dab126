"""Idempotent submits over real HTTP (`Idempotency-Key`, IETF draft-ietf-httpapi-idempotency-key-header): the
same key gets the same request, whatever its state, until the request expires; keys are per caller and app."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from services.schema import QueueHandle
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.idempotency import MAX_KEY_LENGTH, BadIdempotencyKey, caller_of, parse_key
from tests.helpers.worker_harness import serve
from tests.worker.fakes import RED_URI, FakePipeline, flag_none, inpaint_input
from tests.worker.test_queue_pipelining import _wait

KEY = "worker-id:worker-secret"
APP = "fal-ai/fast-sdxl/inpainting"
HANDLE_FIELDS = ("request_id", "response_url", "status_url", "cancel_url")


def _body(**overrides: Any) -> dict[str, Any]:
    return inpaint_input(**overrides).model_dump(mode="json", exclude_unset=True)


def _http(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"Authorization": f"Key {KEY}"}, timeout=30)


def _same_handle(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[field] == b[field] for field in HANDLE_FIELDS)


async def test_the_same_key_gets_the_same_request_whatever_its_state() -> None:
    config = WorkerConfig(_env_file=None, pipeline="classic", worker_key=KEY, result_ttl_s=3600)
    async with serve(create_app(config, pipeline=FakePipeline())) as base, _http(base) as http:
        first = await http.post(f"/{APP}", json=_body(seed=1), headers={"Idempotency-Key": "job-7-attempt-1"})
        assert first.status_code == 200
        handle = first.json()
        await _wait(http, handle["status_url"], "COMPLETED")
        # the retry (even with another body) gets the completed request, not a second one
        again = await http.post(f"/{APP}", json=_body(seed=2), headers={"Idempotency-Key": "job-7-attempt-1"})
        assert again.status_code == 200 and again.headers["x-fal-request-id"] == handle["request_id"]
        assert _same_handle(again.json(), handle) and again.json()["status"] == "COMPLETED"
        QueueHandle.model_validate(again.json())
        assert (await http.get(handle["response_url"])).json()["seed"] == 1
        # the draft's quoted form names the same key; the Bearer scheme, the same caller
        quoted = await http.post(f"/{APP}", json=_body(), headers={"Idempotency-Key": '"job-7-attempt-1"',
                                                                   "Authorization": f"Bearer {KEY}"})
        assert _same_handle(quoted.json(), handle)
        # another key, or none: new requests
        other = (await http.post(f"/{APP}", json=_body(), headers={"Idempotency-Key": "job-8"})).json()
        plain = [(await http.post(f"/{APP}", json=_body())).json() for _ in range(2)]
        ids = {handle["request_id"], other["request_id"], *(p["request_id"] for p in plain)}
        assert len(ids) == 4


async def test_a_waiting_request_is_found_and_concurrent_retries_make_one_request() -> None:
    config = WorkerConfig(_env_file=None, pipeline="classic")
    async with serve(create_app(config, pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        sent = await asyncio.gather(*(http.post(f"/{APP}", json=_body(), headers={"Idempotency-Key": "k"})
                                      for _ in range(5)))
        assert {resp.status_code for resp in sent} == {200}
        assert len({resp.json()["request_id"] for resp in sent}) == 1
        await _wait(http, sent[0].json()["status_url"], "COMPLETED")


async def test_keys_are_per_app_and_forgotten_when_the_request_expires() -> None:
    config = WorkerConfig(_env_file=None, pipeline="classic", result_ttl_s=0.4)
    app = create_app(config, pipeline=FakePipeline(), safety=flag_none)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        headers = {"Idempotency-Key": "shared-key"}
        inpaint = (await http.post(f"/{APP}", json=_body(), headers=headers)).json()
        check = (await http.post("/fal-ai/imageutils/nsfw", json={"image_url": RED_URI}, headers=headers)).json()
        assert check["request_id"] != inpaint["request_id"]
        again = (await http.post("/fal-ai/imageutils/nsfw", json={"image_url": RED_URI}, headers=headers)).json()
        assert again["request_id"] == check["request_id"]
        await _wait(http, inpaint["status_url"], "COMPLETED")
        for _ in range(300):  # expired and reaped: the key names nothing any more
            if (await http.get(inpaint["status_url"])).status_code == 404:
                break
            await asyncio.sleep(0.05)
        fresh = (await http.post(f"/{APP}", json=_body(), headers=headers)).json()
        assert fresh["request_id"] != inpaint["request_id"]


@pytest.mark.parametrize("value", ["", '""', "x" * (MAX_KEY_LENGTH + 1), "clé", "tab\there", '"un"quoted"'])
async def test_a_malformed_key_is_a_422_at_the_header(value: str) -> None:
    async with serve(create_app(WorkerConfig(_env_file=None, pipeline="classic"), pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await http.post(f"/{APP}", json=_body(), headers={b"Idempotency-Key": value.encode()})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_key_parsing_and_callers() -> None:
    assert parse_key(None) is None
    assert parse_key("abc") == parse_key('"abc"') == "abc"
    assert parse_key('"a\\"b\\\\c"') == 'a"b\\c'
    assert parse_key("x" * MAX_KEY_LENGTH) == "x" * MAX_KEY_LENGTH
    with pytest.raises(BadIdempotencyKey):
        parse_key('"a\\b"')
    assert caller_of(None) == caller_of("") == ""
    assert caller_of("Key a:b") == caller_of("Bearer a:b") != caller_of("Key a:c")
    assert "a:b" not in caller_of("Key a:b")  # a digest, never the secret
