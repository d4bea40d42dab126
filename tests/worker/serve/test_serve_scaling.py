"""What Ray Serve adds to the worker, on a local cluster (2 CPUs) with the tiny SDXL model and 2 model replicas:
Serve's batching across concurrent requests (and the same pictures as the single worker), a model replica killed
mid-request (retried elsewhere, or a clear error when no try is left), LoRA-affine routing, and /health."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from services.backends.fal_queue import FalQueueClient, FalRequestFailed, QueueUpdate
from services.schema import InpaintOutput
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from tests.helpers.imagegen import image_pair_uris
from tests.helpers.tiny_sdxl import save_tiny_lora
from tests.helpers.worker_harness import serve
from tests.worker.serve.conftest import Deployed, ray

APP = "fal-ai/fast-sdxl/inpainting"
LORA = [{"path": "style/pytorch_lora_weights.safetensors", "scale": 1.0}]


def _body(**overrides: Any) -> dict[str, Any]:
    image, mask = image_pair_uris((64, 64))
    return {"image_url": image, "mask_url": mask, "prompt": "a red door", "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 4, "strength": 1.0, "enable_safety_checker": False, "seed": 7,
            "sync_mode": True, "format": "png", **overrides}


def _pixels(out: InpaintOutput) -> list[np.ndarray[Any, Any]]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i.url.split(",", 1)[1]))).convert("RGB"), np.int16)
            for i in out.images]


def _same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    """Equal up to float noise (CPU kernels may round the last bit differently in a batch of another size)."""
    diff = np.abs(a - b)
    return bool(diff.mean() < 0.5 and diff.max() <= 4)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_inpaint_model: Path) -> Path:
    return save_tiny_lora(tiny_inpaint_model, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def worker_settings(tiny_inpaint_model: Path, lora_dir: Path, checker_flags_all: Path) -> dict[str, Any]:
    """The ingress loads the safety checker (a tiny one that flags every picture) for the pictures the replicas
    paint (uploads aren't checked: it would refuse them all); requests ask for it or not."""
    return {"pipeline": "sdxl", "model_path": str(tiny_inpaint_model), "lora_dir": str(lora_dir),
            "safety_checker_path": str(checker_flags_all), "check_inputs": False}


@pytest.fixture(scope="module")
def sdxl(deployed: Deployed, worker_settings: dict[str, Any]) -> str:
    """2 model replicas; a Serve batch waits up to 0.5 s to fill, so concurrent requests meet in one."""
    return deployed.run("sdxl", {"model_replicas": 2, "model_num_cpus": 0.25, "ingress_num_cpus": 0.25,
                                 "batch_wait_s": 0.5, "worker": worker_settings})


async def _run(base: str, body: dict[str, Any]) -> tuple[InpaintOutput, list[str]]:
    logs: list[str] = []

    async def collect(update: QueueUpdate) -> None:
        if update.log:
            logs.append(update.log.message)

    async with FalQueueClient(base_url=base, key=None, poll_interval_s=0.02) as client:
        out = await client.run(body, on_update=collect)
    return out, logs


async def test_health_names_the_replicas_pipeline(sdxl: str, tiny_inpaint_model: Path) -> None:
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{sdxl}/health")).json()
    assert health["ready"] is True and health["pipeline"] == "sdxl" and health["device"] == "cpu"
    assert health["model"] == str(tiny_inpaint_model) and health["idempotency_keys"] is True
    assert health["safety_checker"] is True


async def test_the_ingress_safety_checker_checks_the_replicas_pictures(sdxl: str) -> None:
    out, _ = await _run(sdxl, _body(enable_safety_checker=True, num_images=2))
    assert out.has_nsfw_concepts == [True, True]


async def test_concurrent_requests_share_serve_batches_and_match_the_single_worker(
        sdxl: str, worker_settings: dict[str, Any]) -> None:
    seeds = [11, 12, 13, 14]
    results = await asyncio.gather(*(_run(sdxl, _body(seed=seed)) for seed in seeds))
    shared = [logs for _, logs in results if any(line.startswith("sharing a batch with") for line in logs)]
    assert shared, "no two concurrent requests met in a Serve batch"
    # each request's picture is the one the single-process worker gives for its seed, batched or not
    async with serve(create_app(WorkerConfig(_env_file=None, **worker_settings))) as base, \
            httpx.AsyncClient(timeout=60) as http:
        for seed, (out, _) in zip(seeds, results, strict=True):
            alone = InpaintOutput.model_validate((await http.post(f"{base}/sync/{APP}", json=_body(seed=seed))).json())
            assert _same(_pixels(out)[0], _pixels(alone)[0]), seed


async def test_requests_for_one_lora_set_go_to_the_replica_that_holds_it(sdxl: str) -> None:
    replicas = []
    for seed in (1, 2, 3):
        out, logs = await _run(sdxl, _body(seed=seed, loras=LORA))
        assert len(out.images) == 1
        replicas += [line.split()[-1] for line in logs if line.startswith("on model replica ")]
    assert len(replicas) == 3 and len(set(replicas)) == 1, replicas
    base, _ = await _run(sdxl, _body(seed=1))
    styled, _ = await _run(sdxl, _body(seed=1, loras=LORA))
    assert not _same(_pixels(base)[0], _pixels(styled)[0]), "the LoRA changed nothing"


def _kill_replica(replica: str) -> None:
    """Kill the model replica's actor process (as a crash or a lost node would), without a restart by Ray."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "InpaintModel" in a["name"] and a["name"].endswith(replica)]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


async def _replica_running(http: httpx.AsyncClient, status_url: str) -> str:
    """The replica a request runs on, once its denoising has started."""
    for _ in range(1500):
        logs = [line["message"] for line in (await http.get(status_url, params={"logs": 1})).json()["logs"] or []]
        replicas = [line.split()[-1] for line in logs if line.startswith("on model replica ")]
        if replicas and logs[-1].startswith("step "):
            return str(replicas[-1])
        await asyncio.sleep(0.02)
    raise AssertionError("the request never started denoising")


async def test_a_replica_killed_mid_request_is_retried_on_another(sdxl: str) -> None:
    slow = _body(num_inference_steps=65, sync_mode=False)
    async with httpx.AsyncClient(timeout=30) as http:
        handle = (await http.post(f"{sdxl}/{APP}", json=slow)).json()
        first = await _replica_running(http, handle["status_url"])
        await asyncio.to_thread(_kill_replica, first)
        for _ in range(3000):
            status = (await http.get(handle["status_url"], params={"logs": 1})).json()
            if status["status"] == "COMPLETED":
                break
            await asyncio.sleep(0.02)
        assert "error" not in status, status
        logs = [line["message"] for line in status["logs"]]
        assert any(line.startswith("the model replica running this request stopped; trying again") for line in logs)
        replicas = [line.split()[-1] for line in logs if line.startswith("on model replica ")]
        assert replicas[0] == first and replicas[-1] != first
        out = InpaintOutput.model_validate((await http.get(handle["response_url"])).json())
        assert len(out.images) == 1


async def test_a_replica_killed_with_no_try_left_fails_the_request_clearly(
        deployed: Deployed, worker_settings: dict[str, Any]) -> None:
    base = deployed.run("fragile", {"model_replicas": 1, "model_num_cpus": 0.25, "ingress_num_cpus": 0.25,
                                    "attempts": 1, "worker": worker_settings})
    async with httpx.AsyncClient(timeout=30) as http:
        handle = (await http.post(f"{base}/{APP}", json=_body(num_inference_steps=65, sync_mode=False))).json()
        await asyncio.to_thread(_kill_replica, await _replica_running(http, handle["status_url"]))
    async with FalQueueClient(base_url=base, key=None, poll_interval_s=0.05) as client:
        from services.schema import QueueHandle

        with pytest.raises(FalRequestFailed) as info:
            await client.follow(QueueHandle.model_validate(handle))
    assert "the model replica running this request stopped" in str(info.value)
