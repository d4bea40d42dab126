"""Moderation stays whole: the whole upload goes to the backend's NSFW estimator (fal-ai/imageutils/nsfw) before
only a crop of it is sent; a flagged area outside the mask blocks the job."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from services.container import Services, build_services
from services.images import IntakeLimits, PreparedInputs, prepare_inputs
from services.job_state import JobStatus
from services.launch import FromJob, Launched, NewImages
from services.requester import Requester
from tests.helpers.bot_env import bot_config
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.listener import RecordingListener

MARKER = (3, 251, 7)  # the test estimator's "NSFW content"
WHO = Requester(guild_id=1, channel_id=2, user_id=10)
Env = tuple[Services, RecordingListener, FalTestServer]


@pytest.fixture
async def env(tmp_path: Path, server: FalTestServer) -> AsyncIterator[Env]:
    server.nsfw_marker = MARKER
    async with build_services(bot_config(tmp_path, server, painter_enabled=False)) as built:
        listener = RecordingListener()
        await built.dispatcher.start(listener)
        yield built, listener, server


def _upload(*, marked: bool) -> NewImages:
    """A 1600×1200 photo masked at its top left; `marked`: "NSFW content" far from the mask, outside any crop."""
    picture = photo(1600, 1200)
    if marked:
        ImageDraw.Draw(picture).rectangle((1400, 1000, 1499, 1099), fill=MARKER)
    image, mask = encode(picture), encode(box_mask((1600, 1200), (100, 100, 299, 249)))

    async def prepare() -> PreparedInputs:
        return prepare_inputs(image, mask, limits=IntakeLimits())

    return NewImages(prepare)


async def _run(built: Services, listener: RecordingListener, source: NewImages | FromJob,
               who: Requester = WHO) -> int:
    outcome = await built.launcher.launch(who, {"prompt": "a boat"}, source)
    assert isinstance(outcome, Launched)
    await listener.event(outcome.job.id).wait()
    return outcome.job.id


async def test_nsfw_content_outside_the_mask_blocks_the_job(env: Env) -> None:
    built, listener, server = env
    job_id = await _run(built, listener, _upload(marked=True))
    job = await built.store.jobs.get(job_id)
    assert job.plan is not None and job.plan.box[2] < 1400  # the crop never reaches the marked area…
    assert job.status is JobStatus.BLOCKED and "uploaded image" in (job.error or "")  # …but the whole upload did
    assert server.requests == {}  # nothing was sent for inpainting
    entries = await built.store.modlog.entries(1)
    assert [e.action for e in entries] == ["input_flagged"] and "NSFW probability 0.98" in entries[0].detail


async def test_a_clean_upload_is_checked_once_for_all_its_jobs(env: Env) -> None:
    built, listener, server = env
    first = await _run(built, listener, _upload(marked=False))
    assert (await built.store.jobs.get(first)).status is JobStatus.SUCCEEDED
    reroll = await _run(built, listener, FromJob(first))
    assert (await built.store.jobs.get(reroll)).status is JobStatus.SUCCEEDED
    assert len(server.checks) == 1 and len(server.requests) == 2  # one check, two inpaintings
    notes = [e.message for e in await built.store.jobs.events(first) if e.kind == "note"]
    assert "the whole upload was checked: NSFW probability 0.01" in notes


async def test_without_an_estimator_the_servers_settings_decide_and_the_history_says_so(env: Env) -> None:
    built, listener, server = env
    server.serve_nsfw = False
    job_id = await _run(built, listener, _upload(marked=True))
    assert (await built.store.jobs.get(job_id)).status is JobStatus.SUCCEEDED
    notes = [e.message for e in await built.store.jobs.events(job_id) if e.kind == "note"]
    assert any(n.startswith("the whole upload was not checked: the backend has no NSFW estimator") for n in notes)


async def test_no_check_where_the_server_turned_the_checker_off(env: Env) -> None:
    built, listener, server = env
    await built.store.server_settings.save(1, {"checker_off_in_age_restricted": True})
    adult = Requester(guild_id=1, channel_id=3, user_id=10, age_restricted=True)
    job_id = await _run(built, listener, _upload(marked=True), adult)
    assert (await built.store.jobs.get(job_id)).status is JobStatus.SUCCEEDED and server.checks == {}


def test_the_estimator_gets_the_whole_picture_small() -> None:
    from services.images import parse_data_uri
    from services.upload_check import CHECK_MAX_SIDE, check_image

    uri = check_image(encode(photo(4000, 3000)))
    picture = Image.open(io.BytesIO(parse_data_uri(uri, max_bytes=10 * 1024 * 1024)))
    assert picture.format == "JPEG" and picture.size == (CHECK_MAX_SIDE, 768)


async def test_with_our_worker_the_whole_upload_goes_to_its_safety_checker(tmp_path: Path) -> None:
    """The bot and the worker across real HTTP: the worker serves fal-ai/imageutils/nsfw with its checker."""
    import numpy as np

    from services.worker.app import create_app
    from services.worker.config import WorkerConfig
    from tests.helpers.worker_harness import serve

    seen: list[tuple[int, int]] = []

    def checker(images: list[Image.Image]) -> list[bool]:  # flags pictures holding the marker colour
        seen.extend(image.size for image in images)
        return [bool(np.all(np.asarray(image.convert("RGB")) == MARKER, axis=2).sum() >= 64) for image in images]

    app = create_app(WorkerConfig(_env_file=None, pipeline="classic", warmup=False), safety=checker)
    async with serve(app) as base_url, FalTestServer(key=None) as unused:
        config = bot_config(tmp_path, unused, fal_key=None, worker_url=base_url, painter_enabled=False)
        async with build_services(config) as built:
            listener = RecordingListener()
            await built.dispatcher.start(listener)
            blocked = await _run(built, listener, _upload(marked=True))
            assert (await built.store.jobs.get(blocked)).status is JobStatus.BLOCKED
            clean = await _run(built, listener, _upload(marked=False))
            assert (await built.store.jobs.get(clean)).status is JobStatus.SUCCEEDED
    assert (1024, 768) in seen  # the whole picture, made small for the checker, was checked


async def test_jobs_launched_together_on_one_picture_share_one_check(env: Env) -> None:
    built, listener, server = env
    outcomes = await asyncio.gather(*(built.launcher.launch(Requester(guild_id=1, channel_id=2, user_id=10 + i),
                                                            {"prompt": "a boat"}, _upload(marked=False))
                                      for i in range(3)))
    for outcome in outcomes:
        assert isinstance(outcome, Launched)
        await listener.event(outcome.job.id).wait()
        assert (await built.store.jobs.get(outcome.job.id)).status is JobStatus.SUCCEEDED
    assert len(server.checks) == 1 and len(server.requests) == 3
