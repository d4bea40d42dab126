"""The fal queue client against a real fal-protocol server on 127.0.0.1, in every fault mode."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.backends.fal_queue import (
    FalAuthError,
    FalHTTPError,
    FalNotFoundError,
    FalProtocolError,
    FalQueueClient,
    FalRequestFailed,
    FalSubmitUncertain,
    FalTimeoutError,
    FalUnavailableError,
    FalValidationError,
    QueueUpdate,
    RetryPolicy,
)
from services.schema import InpaintInput, QueueHandle
from tests.helpers.fal_server import FalTestServer

FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05)
BODY = InpaintInput(image_url="data:image/png;base64,iVBORw0KGgo=", mask_url="data:image/png;base64,iVBORw0KGgo=",
                    prompt="a lighthouse at dusk", seed=17454220438242315174, image_size="square", num_images=2)
KEY = "test-key-id:test-key-secret"


@pytest.fixture
async def server() -> AsyncIterator[FalTestServer]:
    async with FalTestServer(key=KEY) as srv:
        yield srv


@pytest.fixture
async def client(server: FalTestServer) -> AsyncIterator[FalQueueClient]:
    async with FalQueueClient(base_url=server.base_url + "/", key=KEY, retry=FAST_RETRY, poll_interval_s=0,
                              request_timeout_s=2.0, total_timeout_s=10.0) as c:
        yield c


async def _run(client: FalQueueClient, body: InpaintInput | dict[str, Any] = BODY) -> tuple[Any, list[QueueUpdate]]:
    updates: list[QueueUpdate] = []

    async def collect(update: QueueUpdate) -> None:
        updates.append(update)

    out = await client.run(body, on_update=collect)
    return out, updates


async def test_happy_path_yields_positions_logs_and_result(server: FalTestServer, client: FalQueueClient) -> None:
    handles: list[QueueHandle] = []

    async def submitted(handle: QueueHandle) -> None:
        handles.append(handle)

    updates: list[QueueUpdate] = []

    async def collect(update: QueueUpdate) -> None:
        updates.append(update)

    out = await client.run(BODY, on_submitted=submitted, on_update=collect)
    assert out.seed == 17454220438242315174 and out.prompt == BODY.prompt
    assert [(i.width, i.height) for i in out.images] == [(512, 512)] * 2
    assert out.has_nsfw_concepts == [False, False]
    assert [(u.kind, u.position) for u in updates if u.kind == "queued"] == [("queued", 1), ("queued", 0)]
    assert [u.log.message for u in updates if u.log] == ["step 1/3", "step 2/3", "step 3/3"]  # each once
    assert [u.kind for u in updates][-1] == "completed"
    assert updates[-1].metrics == {"inference_time": 0.01}

    # the client followed the server's URLs, with the key on every call and logs requested on status
    handle = handles[0]
    assert server.hits("submit")[0].path == "/fal-ai/fast-sdxl/inpainting"
    assert all(r.path == "/fal-ai/fast-sdxl/requests/" + handle.request_id + "/status" for r in server.hits("status"))
    assert all(r.query == {"logs": "1"} for r in server.hits("status"))
    assert all(r.headers["authorization"] == f"Key {KEY}" for r in server.recorded)
    # only what the user set goes on the wire
    assert len(server.requests[handle.request_id].input.model_fields_set) == len(BODY.model_fields_set)


@pytest.mark.parametrize(
    ("op", "kind", "params"),
    [
        ("submit", "status", {"code": 429, "times": 2, "headers": {"Retry-After": "0"}}),
        ("submit", "status", {"code": 503, "times": 3}),
        ("submit", "status", {"code": 408, "times": 1}),
        ("status", "status", {"code": 409, "times": 2}),
        ("status", "status", {"code": 502, "times": 2, "body": "<html>nginx bad gateway</html>"}),
        ("result", "status", {"code": 504, "times": 2}),
        ("status", "drop", {"times": 2}),
        ("result", "drop", {"times": 1}),
        ("status", "slow", {"delay_s": 0.3, "times": 3}),
        ("cancel", "status", {"code": 500, "times": -1}),  # never touched by a normal run
    ],
    ids=["429-submit", "503-submit", "408-submit", "409-status", "502-status", "504-result",
         "drop-status", "drop-result", "slow-status", "unrelated-fault"],
)
async def test_retryable_faults_still_complete(server: FalTestServer, client: FalQueueClient, op: str, kind: str,
                                               params: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fault = server.inject(op, kind, **params)  # type: ignore[arg-type]
    out, updates = await _run(client)
    assert out.seed == BODY.seed and len(out.images) == 2
    assert [u.log.message for u in updates if u.log] == ["step 1/3", "step 2/3", "step 3/3"]
    if fault.times >= 0:
        assert fault.times == 0, "the fault was not exercised"
    if kind in ("status", "drop") and op != "cancel":
        assert "retry" in caplog.text
    assert KEY not in caplog.text and "test-key-secret" not in caplog.text


async def test_500_is_not_retried_and_reads_clearly(server: FalTestServer, client: FalQueueClient) -> None:
    server.inject("submit", "status", code=500, body={"detail": "Internal server error", "error_type": "boom"},
                  times=-1)
    with pytest.raises(FalHTTPError) as info:
        await client.run(BODY)
    assert len(server.hits("submit")) == 1
    assert "HTTP 500" in str(info.value) and "Internal server error" in str(info.value)
    assert info.value.error_type == "boom"


async def test_validation_error_detail_becomes_readable(server: FalTestServer, client: FalQueueClient) -> None:
    bad = {**BODY.wire(), "num_inference_steps": 100, "strength": 0}
    with pytest.raises(FalValidationError) as info:
        await client.run(bad)
    assert len(server.hits("submit")) == 1  # not retried
    fields = dict(info.value.field_errors)
    assert set(fields) == {"num_inference_steps", "strength"}
    assert "num_inference_steps" in str(info.value) and "less than or equal to 65" in str(info.value)
    assert not info.value.retryable


async def test_exhausted_retries_give_unavailable(server: FalTestServer, client: FalQueueClient) -> None:
    server.inject("status", "status", code=503, times=-1, body={"detail": "no runners"})
    with pytest.raises(FalUnavailableError) as info:
        await client.run(BODY)
    assert len(server.hits("status")) == FAST_RETRY.attempts
    assert "503" in str(info.value) and info.value.retryable


async def test_connection_refused_gives_unavailable() -> None:
    async with FalQueueClient(base_url="http://127.0.0.1:9", key=KEY, retry=FAST_RETRY) as c:
        with pytest.raises(FalUnavailableError, match="unreachable"):
            await c.submit(BODY)


async def test_malformed_json_is_a_clear_protocol_error(server: FalTestServer, client: FalQueueClient) -> None:
    server.inject("status", "malformed", times=1)
    with pytest.raises(FalProtocolError, match="malformed JSON"):
        await client.run(BODY)
    server.inject("submit", "malformed", times=1)
    with pytest.raises(FalProtocolError, match="malformed JSON for submit"):
        await client.run(BODY)


async def test_unknown_status_is_an_error(server: FalTestServer, client: FalQueueClient) -> None:
    server.inject("status", "unknown_status", times=1)
    with pytest.raises(FalProtocolError, match="unknown request status 'FROBNICATING'"):
        await client.run(BODY)


async def test_slow_backend_hits_the_total_timeout_and_is_cancelled(server: FalTestServer,
                                                                    client: FalQueueClient) -> None:
    server.inject("status", "slow", delay_s=0.5, times=-1)
    with pytest.raises(FalTimeoutError, match=r"within 0\.3 s"):
        await client.run(BODY, total_timeout_s=0.3)
    assert len(server.hits("cancel")) == 1
    (rid,) = server.requests
    assert server.requests[rid].error_type == "cancelled"


async def test_per_request_timeout_is_retried_then_reported(server: FalTestServer) -> None:
    server.inject("status", "slow", delay_s=0.6, times=-1)
    async with FalQueueClient(base_url=server.base_url, key=KEY, retry=RetryPolicy(2, 0.01, 0.02),
                              request_timeout_s=0.2) as c:
        handle = await c.submit(BODY)
        with pytest.raises(FalUnavailableError, match="ReadTimeout"):
            await c.status(handle)
    assert len(server.hits("status")) == 2


@pytest.mark.parametrize(("kind", "params"), [("slow", {"delay_s": 0.6}), ("drop", {}),
                                              ("status", {"code": 502}), ("status", {"code": 504})],
                         ids=["read-timeout", "dropped", "502", "504"])
async def test_a_submit_that_may_have_arrived_is_not_sent_twice(server: FalTestServer, kind: str,
                                                                params: dict[str, Any]) -> None:
    """After a read timeout, a dropped connection or a gateway error the backend may hold the request: sending
    it again could run (and bill) it twice, so the client says so instead of retrying."""
    server.inject("submit", kind, times=-1, **params)  # type: ignore[arg-type]
    async with FalQueueClient(base_url=server.base_url, key=KEY, retry=RetryPolicy(4, 0.01, 0.02),
                              request_timeout_s=0.2) as c:
        with pytest.raises(FalSubmitUncertain, match="may or may not have reached"):
            await c.submit(BODY, idempotency_key="job-1-abc")
    assert len(server.hits("submit")) == 1
    assert server.hits("submit")[0].headers["idempotency-key"] == "job-1-abc"


async def test_a_submit_that_never_arrived_is_sent_again() -> None:
    """Nothing listening (connection refused): the request can't have arrived, so it is retried, then reported as
    the backend being unreachable."""
    async with FalQueueClient(base_url="http://127.0.0.1:9", key=KEY, retry=RetryPolicy(3, 0.01, 0.02)) as c:
        with pytest.raises(FalUnavailableError, match="ConnectError") as info:
            await c.submit(BODY)
    assert not isinstance(info.value, FalSubmitUncertain)


async def test_wrong_key_is_an_auth_error_without_the_key(server: FalTestServer) -> None:
    wrong = "wrong-key-id:wrong-secret-value"
    async with FalQueueClient(base_url=server.base_url, key=wrong, retry=FAST_RETRY) as c:
        with pytest.raises(FalAuthError) as info:
            await c.submit(BODY)
    assert info.value.status_code == 401 and "No user found" in str(info.value)
    assert len(server.hits("submit")) == 1
    assert "wrong-secret-value" not in str(info.value) and "wrong-secret-value" not in repr(c)


async def test_key_echoed_by_a_server_is_redacted(server: FalTestServer, client: FalQueueClient,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.inject("submit", "echo_auth", times=1)
    with pytest.raises(FalHTTPError) as info:
        await client.submit(BODY)
    assert "[redacted]" in str(info.value)
    for text in (str(info.value), repr(info.value), caplog.text):
        assert "test-key-secret" not in text and "test-key-id" not in text


async def test_key_is_not_sent_to_another_origin(server: FalTestServer, client: FalQueueClient) -> None:
    server.inject("submit", "foreign_urls", times=1)
    handle = await client.submit(BODY)
    assert handle.status_url.startswith("http://localhost:")
    with pytest.raises(FalAuthError):
        await client.status(handle)  # the server wants the key, and we won't hand it to another host
    assert "authorization" not in server.hits("status")[0].headers


async def test_failed_request_raises_with_error_type(server: FalTestServer, client: FalQueueClient) -> None:
    server.fail_next = ("Runner disconnected mid-request", "runner_disconnected")
    with pytest.raises(FalRequestFailed) as info:
        await client.run(BODY)
    assert info.value.error_type == "runner_disconnected" and info.value.retryable
    assert "Runner disconnected" in str(info.value)


async def test_cancel_in_every_state(server: FalTestServer, client: FalQueueClient) -> None:
    queued = await client.submit(BODY)
    assert await client.cancel(queued) == "OK"
    status = await client.status(queued)
    assert status.status == "COMPLETED" and getattr(status, "error_type", None) == "cancelled"

    running = await client.submit(BODY)
    server.requests[running.request_id].queue_polls_left = 0
    await client.status(running)  # → IN_PROGRESS
    assert await client.cancel(running) == "CANCELLATION_REQUESTED"
    with pytest.raises(FalRequestFailed) as info:
        async for _ in client.updates(running):
            pass
    assert info.value.error_type == "cancelled"

    done = await client.submit(BODY)
    await client.follow(done)
    assert await client.cancel(done) == "ALREADY_COMPLETED"

    gone = QueueHandle(request_id="nope", response_url=f"{server.base_url}/fal-ai/fast-sdxl/requests/nope",
                       status_url=f"{server.base_url}/fal-ai/fast-sdxl/requests/nope/status",
                       cancel_url=f"{server.base_url}/fal-ai/fast-sdxl/requests/nope/cancel")
    assert await client.cancel(gone) == "NOT_FOUND"
    with pytest.raises(FalNotFoundError) as lost:
        await client.status(gone)
    assert lost.value.retryable  # the dispatcher re-submits from stored blobs


async def test_resume_follows_a_stored_handle(server: FalTestServer, client: FalQueueClient) -> None:
    """After a restart the bot rebuilds the handle from SQLite and follows it to the result."""
    handle = await client.submit(BODY)
    stored = handle.model_dump(mode="json")
    async with FalQueueClient(base_url=server.base_url, key=KEY, retry=FAST_RETRY, poll_interval_s=0) as fresh:
        out = await fresh.follow(QueueHandle.model_validate(stored))
    assert out.seed == BODY.seed


async def test_result_before_completion_is_refused(server: FalTestServer, client: FalQueueClient) -> None:
    handle = await client.submit(BODY)
    with pytest.raises(FalProtocolError, match="before the request completed"):
        await client.result(handle)
