"""The bot on a pool of backends (`services/backend_pool.py`), over real loopback HTTP: a worker-protocol backend
first (the fal-protocol test server serving a worker's /health, or the real worker) and hosted fal (the test
server) second. Failover when the first is down, overflow when it is full (its queue_length, or a 503), each job
followed to its own backend after a restart and cancelled there, the upload check and the spending budget with a
pool, and the setting's worst inputs."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.backend_pool import backend_specs
from services.blob import Blob
from services.config import BotConfig
from services.container import Services, build_services
from services.dispatch import JobImages
from services.errors import StartupError
from services.job_state import Job, JobStatus
from services.modlog import ModerationLog
from services.spend import SpendBudget, SpendPolicy, utc_day
from tests.helpers.bot_env import KEY, bot_config
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.listener import RecordingListener

PICTURE, MASK = photo(64, 64), box_mask((64, 64), (8, 8, 40, 40))
INPUTS = {"image": Blob(encode(PICTURE), "image/png"), "mask": Blob(encode(MASK), "image/png")}
HEALTHY = {"ready": True, "pipeline": "sdxl", "queue_length": 0, "safety_checker": True, "idempotency_keys": True}


def pool_setting(worker_url: str, fal: FalTestServer, *, max_queue: int | None = 2) -> str:
    return json.dumps([{"name": "gpu", "kind": "worker", "url": worker_url, "max_queue": max_queue},
                       {"name": "hosted", "kind": "fal", "url": fal.base_url, "key": KEY}])


def closed_port_url() -> str:
    """The address of a port nothing listens on (a worker that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@asynccontextmanager
async def worker_and_fal(**server: Any) -> AsyncIterator[tuple[FalTestServer, FalTestServer]]:
    async with FalTestServer(key=None, **server) as worker, FalTestServer(key=KEY, **server) as fal:
        worker.health = dict(HEALTHY)
        worker.honour_keys = True
        yield worker, fal


@asynccontextmanager
async def running(config: BotConfig) -> AsyncIterator[tuple[Services, RecordingListener]]:
    async with build_services(config) as services:
        for entry in services.pool.entries:
            entry.health_ttl_s = 0.0  # every choice reads /health afresh: the tests change it between jobs
        listener = RecordingListener()
        await services.dispatcher.start(listener)
        yield services, listener


async def new_job(services: Services, *, checker: bool = False) -> Job:
    job = await services.store.jobs.create(
        user_id=1, guild_id=1, channel_id=2, backend=services.pool.first.name, blobs=INPUTS,
        input={"prompt": "a boat", "image_url": "blob:image", "mask_url": "blob:mask", "image_size": "square",
               "enable_safety_checker": checker})
    await services.dispatcher.enqueue(job, JobImages(PICTURE, MASK))
    return job


async def ended(services: Services, listener: RecordingListener, *jobs: Job) -> list[Job]:
    await asyncio.wait_for(asyncio.gather(*(listener.event(j.id).wait() for j in jobs)), 30)
    return [await services.store.jobs.get(j.id) for j in jobs]


async def until_status(services: Services, job: Job, *statuses: JobStatus) -> Job:
    for _ in range(3000):
        current = await services.store.jobs.get(job.id)
        if current.status in statuses:
            return current
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job.id} stayed {current.status}")


async def test_a_job_goes_to_hosted_fal_when_the_first_backend_is_down(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY) as fal:
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(closed_port_url(), fal))
        async with running(config) as (services, listener):
            assert services.pool.names == ["gpu", "hosted"]
            job, = await ended(services, listener, await new_job(services))
    assert (job.status, job.backend) == (JobStatus.SUCCEEDED, "hosted"), job.error
    assert len(fal.hits("submit")) == 1


async def test_overflow_when_the_worker_says_its_queue_is_full_then_back(tmp_path: Path) -> None:
    async with worker_and_fal() as (worker, fal):
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            worker.health = dict(HEALTHY, queue_length=2)  # at its max_queue
            full, = await ended(services, listener, await new_job(services))
            worker.health = dict(HEALTHY, queue_length=1)
            room, = await ended(services, listener, await new_job(services))
    assert (full.status, full.backend) == (JobStatus.SUCCEEDED, "hosted")
    assert (room.status, room.backend) == (JobStatus.SUCCEEDED, "gpu")
    assert len(worker.hits("submit")) == 1 and len(fal.hits("submit")) == 1


async def test_a_submit_refused_with_503_goes_to_the_next_backend_at_once(tmp_path: Path) -> None:
    async with worker_and_fal() as (worker, fal):
        worker.inject("submit", "status", code=503, body={"detail": "queue full"})
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            job, = await ended(services, listener, await new_job(services))
            events = [e.message for e in await services.store.jobs.events(job.id)]
    assert (job.status, job.backend) == (JobStatus.SUCCEEDED, "hosted")
    assert len(worker.hits("submit")) == 1  # tried once, not retried with backoff: the next backend takes it
    assert len(fal.hits("submit")) == 1
    assert any(m.startswith("not submitted: gpu:") for m in events)
    assert "submitting to the backend hosted" in events


@pytest.mark.parametrize("code", [403, 404, 422])
async def test_a_submit_the_first_backend_refuses_outright_goes_to_the_next(tmp_path: Path, code: int) -> None:
    """A 403 (an exhausted account), a 404 (a Serve app being redeployed), a 422 (an option this backend lacks):
    nothing was created there, and the next backend may well run the job."""
    async with worker_and_fal() as (worker, fal):
        worker.inject("submit", "status", code=code, body={"detail": "no"})
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            job, = await ended(services, listener, await new_job(services))
    assert (job.status, job.backend) == (JobStatus.SUCCEEDED, "hosted")
    assert len(worker.hits("submit")) == 1 and len(fal.hits("submit")) == 1


async def test_recovery_after_a_restart_follows_each_job_to_its_own_backend(tmp_path: Path) -> None:
    async with worker_and_fal(queue_polls=10**6) as (worker, fal):
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, first_run):
            at_worker = await until_status(services, await new_job(services), JobStatus.SUBMITTED)
            worker.health = dict(HEALTHY, queue_length=5)
            at_fal = await until_status(services, await new_job(services), JobStatus.SUBMITTED)
        assert (at_worker.backend, at_fal.backend) == ("gpu", "hosted")
        assert first_run.succeeded == [] and first_run.ended == []
        for server in (worker, fal):  # the requests the backends have run to their end now
            server.queue_polls = 0
            for request in server.requests.values():
                request.queue_polls_left = 0
        worker.health = dict(HEALTHY)
        async with running(config) as (services, second_run):
            done = await ended(services, second_run, at_worker, at_fal)
    assert [(j.status, j.backend) for j in done] == [(JobStatus.SUCCEEDED, "gpu"), (JobStatus.SUCCEEDED, "hosted")]
    assert sorted(second_run.succeeded) == [at_worker.id, at_fal.id]  # each posted once
    assert len(worker.hits("submit")) == 1 and len(fal.hits("submit")) == 1  # followed, never sent again
    assert f"/requests/{at_worker.backend_request_id}/" in worker.hits("status")[-1].path
    assert f"/requests/{at_fal.backend_request_id}/" in fal.hits("status")[-1].path


async def test_cancel_reaches_the_backend_that_has_the_job(tmp_path: Path) -> None:
    async with worker_and_fal(queue_polls=10**6) as (worker, fal):
        worker.health = dict(HEALTHY, queue_length=9)
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            job = await until_status(services, await new_job(services), JobStatus.SUBMITTED)
            assert await services.dispatcher.cancel(job.id)
            job, = await ended(services, listener, job)
    assert (job.status, job.backend) == (JobStatus.CANCELLED, "hosted")
    assert len(fal.hits("cancel")) == 1 and worker.hits("cancel") == []


async def test_a_job_held_by_a_backend_no_longer_configured_fails_clearly_and_a_new_one_runs(tmp_path: Path) -> None:
    async with worker_and_fal() as (worker, fal):
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with build_services(config) as services:
            jobs = services.store.jobs
            held = await jobs.create(user_id=1, guild_id=1, backend="old-gpu", blobs=INPUTS,
                                     input={"prompt": "x", "image_url": "blob:image", "mask_url": "blob:mask"})
            base = "http://127.0.0.1:9/fal-ai/fast-sdxl/requests/r1"
            await jobs.transition(held.id, JobStatus.SUBMITTED, backend_request_id="r1", status_url=f"{base}/status",
                                  response_url=base, cancel_url=f"{base}/cancel")
            fresh = await jobs.create(user_id=1, guild_id=1, backend="old-gpu", blobs=INPUTS,
                                      input={"prompt": "y", "image_url": "blob:image", "mask_url": "blob:mask",
                                             "image_size": "square", "enable_safety_checker": False})
            listener = RecordingListener()
            await services.dispatcher.start(listener)
            held, fresh = await ended(services, listener, held, fresh)
    assert held.status is JobStatus.FAILED and "'old-gpu'" in (held.error or "") and "Retry" in (held.error or "")
    assert (fresh.status, fresh.backend) == (JobStatus.SUCCEEDED, "gpu")  # never submitted: the pool's choice


async def test_a_classic_worker_without_checker_runs_with_it_off_and_uploads_are_checked_at_fal(
        tmp_path: Path) -> None:
    """The real worker (classic pipeline, no safety checker) first: jobs run there with the checker off (it fills
    only from the picture's own pixels), and the whole upload is checked by the first backend that has a checker."""
    from services.worker.app import create_app
    from services.worker.config import WorkerConfig
    from tests.helpers.worker_harness import serve

    async with FalTestServer(key=KEY) as fal, \
            serve(create_app(WorkerConfig(_env_file=None, pipeline="classic", warmup=False))) as worker_url:
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker_url, fal))
        async with running(config) as (services, listener):
            gpu = services.pool.get("gpu")
            assert gpu is not None and not gpu.choice.safety_checker and gpu.choice.checker_known
            job, = await ended(services, listener, await new_job(services, checker=True))
            events = [e.message for e in await services.store.jobs.events(job.id)]
    assert (job.status, job.backend) == (JobStatus.SUCCEEDED, "gpu")
    assert job.input["enable_safety_checker"] is True  # the job asked for it; the classic worker got it off
    assert len(fal.hits("check")) >= 1 and fal.hits("submit") == []
    assert any(m.startswith("the whole upload was checked") for m in events)


async def test_only_jobs_hosted_fal_runs_count_against_the_spending_budget(tmp_path: Path) -> None:
    async with worker_and_fal() as (worker, fal):
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            assert services.pool.mixed
            budget = SpendBudget(services.store.spend, SpendPolicy(daily_units=1000),
                                 ModerationLog(services.store.modlog))
            day = utc_day(budget.clock())
            outcomes = []
            for queue_length in (0, 5):  # room at the worker, then full: hosted fal
                worker.health = dict(HEALTHY, queue_length=queue_length)
                hold = await budget.reserve(1, 10.0)
                job = await new_job(services)
                await hold.attach(job.id)
                job, = await ended(services, listener, job)
                outcomes.append((job.backend, await services.store.spend.used(day)))
            assert await services.store.spend.recount(day) == pytest.approx(10.0)
    assert outcomes == [("gpu", 0.0), ("hosted", 10.0)]


async def test_a_worker_job_whose_submit_answer_was_lost_gives_its_reservation_back(tmp_path: Path) -> None:
    """The worker took the request but its answer came too late: the job sends it again with its key (the worker
    answers with the request it has), and, as after a fresh submit there, the budget holds nothing for it."""
    async with worker_and_fal() as (worker, fal):
        worker.inject("submit", "late", delay_s=0.5, times=1)
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            gpu = services.pool.entries[0]
            gpu.submitter._timeout = gpu.client._timeout = httpx.Timeout(0.2)  # the answer is "lost"
            budget = SpendBudget(services.store.spend, SpendPolicy(daily_units=1000),
                                 ModerationLog(services.store.modlog))
            day = utc_day(budget.clock())
            hold = await budget.reserve(1, 10.0)
            job = await new_job(services)
            await hold.attach(job.id)
            assert await services.store.spend.used(day) == pytest.approx(10.0)
            job, = await ended(services, listener, job)
            used = await services.store.spend.used(day)
    assert (job.status, job.backend) == (JobStatus.SUCCEEDED, "gpu")
    assert len(worker.hits("submit")) == 2 and len(worker.requests) == 1  # sent again with its key, run once
    assert used == 0.0


async def test_without_backends_the_bot_runs_on_its_one_backend_as_before(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY) as fal, \
            running(bot_config(tmp_path, fal, painter_enabled=False)) as (services, listener):
        assert services.pool.names == ["fal"] and not services.pool.mixed
        job, = await ended(services, listener, await new_job(services))
    assert (job.status, job.backend) == (JobStatus.SUCCEEDED, "fal")


# --- the setting --------------------------------------------------------------------------------------------

def config(**values: Any) -> BotConfig:
    return BotConfig(_env_file=None, **values)


def test_names_form_uses_the_single_backend_settings() -> None:
    specs = backend_specs(config(backends="worker, fal", worker_url="http://gpu:8000", worker_key="wk",
                                 worker_max_queue=4, fal_key="id:secret"))
    assert specs is not None
    assert [(s.name, s.kind, s.url, s.max_queue) for s in specs] == [
        ("worker", "worker", "http://gpu:8000", 4), ("fal", "fal", "https://queue.fal.run", None)]
    assert specs[1].key is not None and specs[1].key.get_secret_value() == "id:secret"
    assert backend_specs(config(fal_key="id:secret")) is None  # unset: the single backend, as before


def test_json_entries_and_names_mix_and_fal_defaults_to_its_settings() -> None:
    specs = backend_specs(config(fal_key="id:secret", backends=json.dumps(
        [{"name": "gpu1", "kind": "worker", "url": "http://gpu1:8000", "key": "k1"}, "fal"])))
    assert specs is not None and [s.name for s in specs] == ["gpu1", "fal"]


@pytest.mark.parametrize(("value", "extra", "says"), [
    ('[{"name": "a", "kind": "worker", "url": "http://a"}, {"name": "a", "kind": "fal", "key": "k"}]', {},
     "names 'a' twice"),
    ("worker,worker", {"worker_url": "http://a"}, "names 'worker' twice"),
    ('[{"name": "a", "kind": "gpu", "url": "http://a"}]', {}, "entry 1 (a): kind: unknown kind"),
    ('[{"name": "a", "kind": "worker"}]', {}, "entry 1 (a) is a worker without a url"),
    ('[{"name": "a", "kind": "worker", "url": "ftp://a"}]', {}, "url must start with http"),
    ('[{"name": "a", "kind": "worker", "url": "http://a", "max_queue": 0}]', {}, "max_queue"),
    ('[{"name": "a", "kind": "worker", "url": "http://a", "keys": "TOPSECRET"}]', {}, "unknown field"),
    ('[{"name": "a", "kind": "fal"}]', {}, "hosted fal without a key"),
    ('[{"kind": "fal", "key": "TOPSECRET"}]', {}, "name: Field required"),
    ('[{"name": "a b", "kind": "fal", "key": "TOPSECRET"}]', {}, "a name is 1-32 letters"),
    ("worker", {}, "WORKER_URL isn't set"),
    ("fal", {}, "FAL_KEY isn't set"),
    ("gpu,fal", {"fal_key": "TOPSECRET"}, "entry 1 is 'gpu': a name must be one of worker, fal"),
    ('[{"name": "a", "kind": "fal", "key": "TOPSECRET"', {}, "isn't valid JSON"),
    ('{"name": "a"}', {}, "a name must be one of"),
    ("[]", {}, "empty list"),
    ('["TOPSECRET!"]', {}, "(an unknown name)"),
])
def test_worst_inputs_get_a_friendly_startup_error_without_secrets(value: str, extra: dict[str, Any],
                                                                   says: str) -> None:
    with pytest.raises(StartupError) as caught:
        backend_specs(config(backends=value, **extra))
    assert says in str(caught.value)
    assert "TOPSECRET" not in str(caught.value)
    assert "TOPSECRET" not in repr(config(backends=value, **extra))


async def test_a_bad_setting_stops_the_bot_at_start(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY) as fal:
        with pytest.raises(StartupError, match="twice"):
            async with build_services(bot_config(tmp_path, fal, painter_enabled=False, backends="fal,fal")):
                pass


async def test_a_generative_worker_without_checker_is_left_out_unless_it_is_all_there_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with worker_and_fal() as (worker, fal):
        worker.health = dict(HEALTHY, safety_checker=False)
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with build_services(config) as services:
            assert services.pool.names == ["hosted"]
        assert any("BACKEND gpu IS LEFT OUT OF THE POOL" in r.getMessage() for r in caplog.records)
        alone = json.dumps([{"name": "gpu", "kind": "worker", "url": worker.base_url}])
        with pytest.raises(StartupError, match="without a safety checker"):
            async with build_services(bot_config(tmp_path, fal, painter_enabled=False, backends=alone)):
                pass


async def test_a_request_its_backend_lost_is_submitted_there_again_first(tmp_path: Path) -> None:
    async with worker_and_fal(queue_polls=10**6) as (worker, fal):
        worker.health = dict(HEALTHY, queue_length=9)
        config = bot_config(tmp_path, fal, painter_enabled=False, backends=pool_setting(worker.base_url, fal))
        async with running(config) as (services, listener):
            job = await until_status(services, await new_job(services), JobStatus.SUBMITTED)
            assert job.backend == "hosted"
            worker.health = dict(HEALTHY)  # the worker has room now: still, the job's own backend comes first
            fal.queue_polls = 0
            del fal.requests[str(job.backend_request_id)]  # hosted fal lost it (404)
            job, = await ended(services, listener, job)
    assert (job.status, job.backend, job.attempts) == (JobStatus.SUCCEEDED, "hosted", 2)
    assert len(fal.hits("submit")) == 2 and worker.hits("submit") == []
