"""The single worker's protocol tests, unchanged, against the worker as a Ray Serve application (the ingress and
2 model replicas on a local Ray cluster): our client, raw HTTP, SSE, the sync endpoint and fal's official client.

The tests are the same functions as tests/worker/test_protocol.py's (imported, so pytest runs them here with this
module's fixtures): only where the app runs differs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.serve.conftest import Deployed
from tests.worker.test_protocol import (
    KEY,
    test_422_on_a_body_that_is_not_json,
    test_422_on_each_invalid_field,
    test_auth_is_required_when_a_key_is_set,
    test_bad_image_is_a_stored_422_result,
    test_full_protocol_through_the_bots_client,
    test_official_fal_client_subscribes,
    test_queue_positions_cancel_and_full_queue,
    test_result_before_completion_is_202_with_status,
    test_sse_stream_sends_new_logs_and_closes,
    test_status_codes_logs_key_and_url_forms,
    test_sync_endpoint_returns_the_output,
)

__all__ = [
    "test_422_on_a_body_that_is_not_json",
    "test_422_on_each_invalid_field",
    "test_auth_is_required_when_a_key_is_set",
    "test_bad_image_is_a_stored_422_result",
    "test_full_protocol_through_the_bots_client",
    "test_official_fal_client_subscribes",
    "test_queue_positions_cancel_and_full_queue",
    "test_result_before_completion_is_202_with_status",
    "test_sse_stream_sends_new_logs_and_closes",
    "test_status_codes_logs_key_and_url_forms",
    "test_sync_endpoint_returns_the_output",
]


def _app(worker: dict[str, Any], **args: Any) -> dict[str, Any]:
    return {"model_replicas": 2, "model_num_cpus": 0.25, "ingress_num_cpus": 0.25,
            "worker": {"worker_key": KEY, **worker}, **args}


@pytest.fixture(scope="module")
def classic(deployed: Deployed) -> str:
    return deployed.run("classic", _app({"pipeline": "classic"}))


@pytest.fixture(scope="module")
def slow_sdxl(deployed: Deployed, tiny_inpaint_model: Path) -> str:
    """The tiny SDXL model; one request at a time to the replicas (`in_flight` 1), so the ingress's queue
    positions read as the single worker's do."""
    return deployed.run("slow", _app({"pipeline": "sdxl", "model_path": str(tiny_inpaint_model), "max_queue": 2},
                                     in_flight=1, batch_wait_s=0))
