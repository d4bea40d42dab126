"""The bot-wide spending budget through the launch service, with a real fal-protocol backend on 127.0.0.1: on by
default with FAL_KEY, checked before any image is taken in, reserved at the exact cost when the job is created
(two launches at the edge: one runs), and nothing spent by drafts or jobs cancelled before submission."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.container import Services, build_services
from services.images import IntakeLimits, PreparedInputs, prepare_inputs
from services.job_state import JobStatus
from services.launch import DraftOffered, FromJob, Launched, NewImages
from services.refusals import Refused, SpendBudgetReached
from services.requester import Requester
from services.schema import InpaintInput
from services.spend import DEFAULT_HOSTED_DAILY_UNITS, request_units
from tests.helpers.bot_env import bot_config
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.listener import RecordingListener

GUILD = 1
ALICE = Requester(guild_id=GUILD, channel_id=2, user_id=10)
BOB = Requester(guild_id=3, channel_id=4, user_id=20)  # another server: the budget is the bot's


class Images:
    """A 640×480 photo with a box mask; `gate` (when set) holds every prepare until all have reached it."""

    def __init__(self, gate: asyncio.Barrier | None = None) -> None:
        self.prepared = 0
        self.gate = gate

    async def prepare(self) -> PreparedInputs:
        self.prepared += 1
        if self.gate is not None:
            await self.gate.wait()
        return prepare_inputs(encode(photo(640, 480), "PNG"), encode(box_mask((640, 480), (100, 100, 300, 260))),
                              limits=IntakeLimits())

    def source(self) -> NewImages:
        return NewImages(self.prepare)


Env = tuple[Services, RecordingListener]


async def _services(tmp_path: Path, server: FalTestServer, **overrides: Any) -> AsyncIterator[Env]:
    async with build_services(bot_config(tmp_path, server, painter_enabled=False, **overrides)) as built:
        listener = RecordingListener()
        await built.dispatcher.start(listener)
        yield built, listener


@pytest.fixture
async def services(tmp_path: Path, server: FalTestServer) -> AsyncIterator[Env]:
    """A bot whose budget fits one job of the crop's size (about 26 megapixel-steps) and not two."""
    async for env in _services(tmp_path, server, spend_daily_budget=40):
        yield env


async def _used(built: Services) -> float:
    assert built.admissions.spend is not None
    return (await built.admissions.spend.today()).used


async def test_on_by_default_with_fal_key_and_each_job_records_its_exact_cost(tmp_path: Path,
                                                                              server: FalTestServer) -> None:
    async for built, _ in _services(tmp_path, server):
        assert built.admissions.spend is not None
        assert built.admissions.spend.policy.daily_units == DEFAULT_HOSTED_DAILY_UNITS
        launched = await built.launcher.launch(ALICE, {"prompt": "a kite", "num_images": 2}, Images().source())
        assert isinstance(launched, Launched)
        request = InpaintInput.model_validate(launched.job.input)
        width, height = request.size_pixels()  # the crop's working size, about one megapixel
        assert 0.9e6 < width * height < 1.2e6
        assert await built.store.spend.units_of(launched.job.id) == pytest.approx(request_units(request))
        assert await _used(built) == pytest.approx(width * height / 1e6 * 25 * 2)
        derived = await built.launcher.launch(ALICE, {"num_images": 1}, FromJob(launched.job.id))
        assert isinstance(derived, Launched)
        assert await built.store.spend.units_of(derived.job.id) == pytest.approx(width * height / 1e6 * 25)


async def test_past_the_budget_nothing_is_taken_in(services: Env) -> None:
    built, _ = services
    first = await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())
    assert isinstance(first, Launched)
    images = Images()
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(BOB, {"prompt": "y"}, images.source())
    assert isinstance(refused.value.reason, SpendBudgetReached) and images.prepared == 0
    with pytest.raises(Refused) as refused:  # a reroll too
        await built.launcher.launch(ALICE, {}, FromJob(first.job.id))
    assert isinstance(refused.value.reason, SpendBudgetReached)
    assert len(await built.store.jobs.for_user(20)) == 0


async def test_two_launches_at_the_edge_one_runs(services: Env) -> None:
    built, _ = services
    gate = asyncio.Barrier(2)  # both pass admission (the budget has room for one) before either is created
    outcomes = await asyncio.gather(built.launcher.launch(ALICE, {"prompt": "a"}, Images(gate).source()),
                                    built.launcher.launch(BOB, {"prompt": "b"}, Images(gate).source()),
                                    return_exceptions=True)
    launched = [o for o in outcomes if isinstance(o, Launched)]
    refused = [o for o in outcomes if isinstance(o, Refused)]
    assert (len(launched), len(refused)) == (1, 1), outcomes
    reason = refused[0].reason
    assert isinstance(reason, SpendBudgetReached) and reason.left == pytest.approx(40 - reason.needed)
    assert await _used(built) == pytest.approx(reason.needed)  # what the admitted one costs, nothing more
    jobs = await built.store.jobs.for_user(10) + await built.store.jobs.for_user(20)
    assert [j.id for j in jobs] == [launched[0].job.id]  # the refused one left no job behind


async def test_drafts_and_jobs_cancelled_before_submission_spend_nothing(services: Env,
                                                                         server: FalTestServer) -> None:
    built, listener = services
    await built.store.server_settings.save(GUILD, {"confirm_masks": True})
    offered = await built.launcher.launch(ALICE, {"prompt": "a kite"}, Images().source())
    assert isinstance(offered, DraftOffered) and await _used(built) == 0
    await built.store.server_settings.save(GUILD, {"confirm_masks": False})
    listener.refuse_to_show = RuntimeError("Missing Access")  # the job is cancelled before it is submitted
    with pytest.raises(RuntimeError, match="Missing Access"):
        await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())
    (job,) = await built.store.jobs.for_user(10)
    assert job.status is JobStatus.CANCELLED and job.attempts == 0 and server.requests == {}
    assert await built.store.spend.units_of(job.id) is not None and await _used(built) == 0
    listener.refuse_to_show = None
    again = await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())  # the budget is whole again
    assert isinstance(again, Launched)
