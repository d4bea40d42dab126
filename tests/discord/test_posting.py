"""Discord's per-channel budget: the posting queue keeps within it (no 429) and puts results first, so 20 jobs
finishing together in one channel all have their results out promptly. The in-memory Discord answers 429 with
Retry-After past the budget, through discord.py's own HTTP client (so its own rate-limit handling runs)."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import discord

from cogs import render
from cogs.posting import ANNOUNCE, OUTCOME, PROGRESS, ChannelPosting
from cogs.result_post import ResultPost
from services.job_state import Job, JobStatus
from services.schema import InpaintOutput
from tests.helpers.bot_env import (
    ALICE,
    BOB,
    MOD,
    PLACE,
    bot_config,
    ephemeral_text,
    result_message,
    results_by_job,
    running_bot,
    uploads,
)
from tests.helpers.discord_harness import ALL_PERMISSIONS, Driver, FakeDiscord, FakeMessage, user
from tests.helpers.fal_server import FalTestServer
from tests.helpers.waits import wait_until


async def test_the_queue_keeps_the_budget_puts_outcomes_first_and_coalesces_progress() -> None:
    posting = ChannelPosting(limit=2, per_s=0.2, margin=1.0)
    ran: list[tuple[str, float]] = []
    start = time.monotonic()

    def op(name: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            ran.append((name, time.monotonic() - start))
            return name
        return run

    futures = [posting.submit(1, op("announce-1"), priority=ANNOUNCE),
               posting.submit(1, op("progress-a"), priority=PROGRESS, key="a"),
               posting.submit(1, op("progress-b"), priority=PROGRESS, key="b"),
               posting.submit(1, op("announce-2"), priority=ANNOUNCE)]
    futures.append(posting.submit(1, op("progress-a2"), priority=PROGRESS, key="a"))  # replaces progress-a
    futures.append(posting.submit(1, op("outcome"), priority=OUTCOME))
    posting.discard(1, "b")
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert [name for name, _ in ran] == ["outcome", "announce-1", "announce-2", "progress-a2"]
    assert results[1] == results[4] == "progress-a2" and isinstance(results[2], asyncio.CancelledError)
    times = [t for _, t in ran]
    assert all(later - earlier >= 0.19 for earlier, later in zip(times, times[2:], strict=False))  # 2 per 0.2 s
    other = await posting.run(2, op("another channel"), priority=PROGRESS)  # each channel has its own budget
    assert other == "another channel"
    await posting.close()


async def test_twenty_jobs_finishing_together_in_one_channel(tmp_path: Path) -> None:
    """Time scaled down 5×: a budget of 5 operations per second, jobs finishing at 7.5 per second, results due
    within 1 s of their job's end (Discord: 5 per 5 s, 1.5 jobs/s, 5 s)."""
    budget = (5, 1.0)
    async with FalTestServer(key="k:s", queue_polls=10**9, progress_logs=2) as server:
        fake = FakeDiscord()
        fake.channel_budget = budget
        with fake.installed():
            config = bot_config(tmp_path, server, fal_key="k:s", channel_budget_ops=budget[0],
                                channel_budget_s=budget[1], dispatch_concurrency=20, progress_edit_interval_s=0.2)
            async with running_bot(config, fake) as (bot, driver):
                await bot.services.store.server_settings.save(PLACE.guild_id, {"user_concurrent": 20,
                                                                               "server_concurrent": 20})
                people = [user(100 + i, f"artist{i}") for i in range(4)]
                await asyncio.gather(*(driver.slash(people[i % 4], "inpaint", **uploads(fake), prompt=f"job {i}")
                                       for i in range(20)))
                await wait_until(lambda: len(server.requests) == 20, what="20 submissions", within_s=30)
                for request in list(server.requests.values()):  # the backend finishes them, 7.5 a second
                    request.queue_polls_left = 0
                    await asyncio.sleep(1 / 7.5)
                await wait_until(lambda: len(results_by_job(fake)) == 20, what="20 results", within_s=60)
                late = []
                outputs = {}
                for job_id in range(1, 21):
                    outputs[job_id] = (await bot.services.store.jobs.blobs(job_id))["output_0"].data
                    job = await bot.services.store.jobs.get(job_id)
                    assert job.status is JobStatus.SUCCEEDED
                    ended = next(e.created_at for e in await bot.services.store.jobs.events(job_id)
                                 if e.kind == "state" and e.message == "succeeded")
                    late.append(results_by_job(fake)[job_id].created_at - ended)
    assert fake.rate_limited == []  # never past Discord's budget
    assert max(late) <= 1.0, sorted(late)
    shown = results_by_job(fake)
    assert len(set(map(id, shown.values()))) < 20  # results that waited together went out together
    for job_id, message in shown.items():  # each job's own picture, whichever message carries it
        name = "result_0.png" if len(message.embeds) == 1 else f"job{job_id}_result_0.png"
        assert message.files[name] == outputs[job_id], job_id


async def test_results_posted_together_are_each_their_own(tmp_path: Path) -> None:
    """Three results waiting together go out in one message: each job has its embed, its picture and its row of
    buttons; More opens the rest of a job's buttons; Delete (a moderator's from the mod log, or the authors' at the
    same moment from stale copies of the message) takes out exactly that job's part, and nothing comes back."""
    async with FalTestServer(key="k:s", queue_polls=10**9) as server:
        fake = FakeDiscord()
        fake.channel_budget = (2, 2.0)  # paced one per second: the three results wait for the same turn
        with fake.installed():
            config = bot_config(tmp_path, server, fal_key="k:s", channel_budget_ops=2, channel_budget_s=2.0)
            async with running_bot(config, fake) as (bot, driver):
                await bot.services.store.server_settings.save(PLACE.guild_id, {"modlog_channel_id": MODLOG,
                                                                               "user_concurrent": 4})
                owner = {1: ALICE, 2: BOB, 3: ALICE}
                shared = await _three_results_together(driver, fake, server, owner)
                assert len(shared.embeds) == 3 and len(shared.components) == 3
                assert sorted(shared.content.split()) == ["<@10>", "<@20>"]  # each author mentioned once
                outputs = {j: (await bot.services.store.jobs.blobs(j))["output_0"].data for j in owner}
                for job_id in owner:
                    await result_message(fake, job_id, bot)  # recorded as posted (in the shared message)
                    assert (await bot.services.store.jobs.get(job_id)).result_message_id == shared.id
                    assert shared.files[f"job{job_id}_result_0.png"] == outputs[job_id]
                    embed = next(e for e in shared.embeds if e["title"].endswith(f"job #{job_id}"))
                    assert embed["image"]["url"] == f"attachment://job{job_id}_result_0.png"

                more = await driver.click(ALICE, shared, "inpaint:more:1")
                offered = more.responses[0]["data"]
                assert offered["flags"] & 64 and {c["custom_id"] for row in offered["components"]
                                                  for c in row["components"]} == {
                    f"inpaint:{action}:1" for action in ("params", "zoom15", "zoom2", "region", "pan_left",
                                                         "pan_right", "pan_up", "pan_down")}
                stranger = await driver.click(CAROL, shared, "inpaint:delete:1")
                assert "Only the person who started" in ephemeral_text(stranger)

                stale = copy.deepcopy(shared)  # as another client still shows it
                job = await bot.services.store.jobs.get(1)  # a moderator, from the mod log
                await bot.services.modlog.record(PLACE.guild_id, "image_flagged_allow", job=job, user_id=job.user_id)
                await wait_until(lambda: _modlog_entry(fake, 1) is not None, what="the mod-log entry")
                entry = _modlog_entry(fake, 1)
                assert entry is not None
                await driver.click(MOD, entry, "modlog:delete:1", permissions=ALL_PERMISSIONS)
                assert not shared.deleted and "job1_result_0.png" not in shared.files
                assert sorted(e["title"] for e in shared.embeds) == ["Inpainted · job #2", "Inpainted · job #3"]
                assert not any(c.endswith(":1") for c in shared.custom_ids())
                assert sorted(e["image"]["url"] for e in shared.embeds) == [
                    "attachment://job2_result_0.png", "attachment://job3_result_0.png"]
                assert shared.files["job2_result_0.png"] == outputs[2]

                await asyncio.gather(driver.click(BOB, shared, "inpaint:delete:2"),
                                     driver.click(ALICE, stale, "inpaint:delete:3"))
                assert shared.deleted  # nothing of job 1 came back from the stale copy
                again = await driver.click(MOD, entry, "modlog:delete:1", permissions=ALL_PERMISSIONS)
                assert "already deleted" in ephemeral_text(again)
                job, before = await bot.services.store.jobs.get(1), len(fake.channel_messages(MODLOG))
                await bot.services.modlog.record(PLACE.guild_id, "image_flagged_allow", job=job, user_id=job.user_id)
                await wait_until(lambda: len(fake.channel_messages(MODLOG)) == before + 1, what="another entry")
                assert "modlog:delete:1" not in fake.channel_messages(MODLOG)[-1].custom_ids()
                assert job.result_message_id == shared.id  # still recorded as posted: a restart won't post it again


async def test_results_posted_just_before_a_crash_are_not_posted_again(tmp_path: Path) -> None:
    """The bot dies after Discord made a (shared) result message but before the store recorded it: on the restart
    the jobs look unposted, and posting the first again carries the same nonce, so Discord hands back the message
    it made; every job it shows is recorded, and nothing is posted twice."""
    async with FalTestServer(key="k:s", queue_polls=10**9) as server:
        fake = FakeDiscord()
        fake.channel_budget = (2, 2.0)
        with fake.installed():
            config = bot_config(tmp_path, server, fal_key="k:s", channel_budget_ops=2, channel_budget_s=2.0)
            async with running_bot(config, fake) as (bot, driver):
                await bot.services.store.server_settings.save(PLACE.guild_id, {"user_concurrent": 4})
                shared = await _three_results_together(driver, fake, server, {1: ALICE, 2: BOB, 3: ALICE})
                assert len(shared.embeds) == 3
                async with bot.services.store.jobs.db.transaction() as conn:  # as if the records never happened
                    await conn.execute("UPDATE jobs SET result_message_id = NULL")
            before = {m.id for m in fake.messages.values() if not m.deleted}
            async with running_bot(config, fake) as (bot, driver):
                for job_id in (1, 2, 3):
                    await result_message(fake, job_id, bot)
                    assert (await bot.services.store.jobs.get(job_id)).result_message_id == shared.id
            new = [m for m in fake.messages.values() if m.id not in before and m.files]
            assert new == [], [m.embeds for m in new]


async def _three_results_together(driver: Driver, fake: FakeDiscord, server: FalTestServer,
                                  owner: dict[int, dict[str, Any]]) -> FakeMessage:
    """Three jobs (`owner`: job id → who starts it) finishing at once in a channel paced at one operation a second:
    their results go out as one message, returned."""
    for job_id, who in owner.items():
        await driver.slash(who, "inpaint", **uploads(fake), prompt=f"job {job_id}")
    await wait_until(lambda: len(server.requests) == 3, what="3 submissions")
    for request in server.requests.values():
        request.queue_polls_left = 0
    await wait_until(lambda: len(results_by_job(fake)) == 3, what="3 results")
    return results_by_job(fake)[1]


def _modlog_entry(fake: FakeDiscord, job_id: int) -> FakeMessage | None:
    return next((m for m in fake.channel_messages(MODLOG) if f"modlog:delete:{job_id}" in m.custom_ids()), None)


MODLOG = 999
CAROL = user(40, "carol")


def test_a_shared_message_holds_only_what_one_message_can() -> None:
    """At most 5 jobs (a row of buttons each), 10 files, the upload limit and 6,000 embed characters in all."""
    def post(job_id: int, *, files: int = 1, size: int = 1000, prompt: str = "a boat") -> ResultPost:
        job = Job(id=job_id, guild_id=1, channel_id=2, user_id=3, status=JobStatus.SUCCEEDED, status_message_id=1,
                  parent_job_id=None, backend="fal", backend_request_id=None, status_url=None, response_url=None,
                  cancel_url=None, input={"prompt": prompt, "negative_prompt": "n" * 300}, result=None, error=None,
                  attempts=1, created_at=0.0, updated_at=0.0, submitted_at=None, started_at=None, finished_at=None)
        output = InpaintOutput(images=[], timings={"inference": 1.5}, seed=9, has_nsfw_concepts=[], prompt=prompt)
        attached = render.ResultFiles([(b"x" * size, "image/png")] * files)
        async def record(job_id: int, message_id: int) -> None:
            return None

        return ResultPost(cast(discord.abc.Messageable, None), job, output, attached, limit=10_000, record=record)

    five = [post(i) for i in range(1, 6)]
    assert all(p.joins(five[:i]) for i, p in enumerate(five) if i) and not post(6).joins(five)
    assert post(2, files=4, size=9).joins([post(1, files=6, size=9)])
    assert not post(2, files=5, size=9).joins([post(1, files=6, size=9)])
    assert post(2, size=4000).joins([post(1, size=5000)]) and not post(2, size=5000).joins([post(1, size=5000)])
    wordy = [post(i, prompt="w" * 1000) for i in range(1, 6)]  # about 1,500 embed characters each
    assert wordy[3].joins(wordy[:3]) and not wordy[4].joins(wordy[:4])


async def test_a_result_is_not_held_back_by_a_waiting_progress_edit(tmp_path: Path) -> None:
    """A job that ends while its progress edit waits its turn in the channel posts its result in that turn, not
    after the pause between progress edits (2 s)."""
    async with FalTestServer(key="k:s", queue_polls=10**9, progress_logs=2) as server:
        fake = FakeDiscord()
        fake.channel_budget = (5, 2.5)  # paced: one operation per 0.5 s
        with fake.installed():
            config = bot_config(tmp_path, server, fal_key="k:s", progress_edit_interval_s=2.0,
                                channel_budget_ops=5, channel_budget_s=2.5)
            async with running_bot(config, fake) as (bot, driver):
                await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat")
                await wait_until(lambda: len(server.requests) == 1, what="the job at the backend")
                await wait_until(lambda: bot.posting.pending(PLACE.channel_id) == 1, what="a progress edit waiting")
                (request,) = server.requests.values()
                request.queue_polls_left = 0
                result = await result_message(fake, 1, bot)
                ended = next(e.created_at for e in await bot.services.store.jobs.events(1)
                             if e.kind == "state" and e.message == "succeeded")
                assert result.created_at - ended < 1.0


class _Part:
    """A `Mergeable` for the queue's own tests: joins any batch; `fail` makes the shared request fail."""

    def __init__(self, name: str, sent: list[str], *, fail: bool = False) -> None:
        self.name, self.sent, self.fail = name, sent, fail

    def alone(self) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.sent.append(self.name)
            return self.name
        return run

    def joins(self, batch: Sequence[_Part]) -> bool:
        return True

    def together(self, batch: Sequence[_Part]) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            if any(part.fail for part in batch):
                raise RuntimeError("refused")
            self.sent.append("+".join(part.name for part in batch))
            return "shared"
        return run


async def test_the_queue_never_sends_for_a_caller_gone_and_never_loses_a_part() -> None:
    posting = ChannelPosting(limit=2, per_s=0.2, margin=1.0)  # one operation per 0.1 s
    sent: list[str] = []
    first = _Part("a", sent)
    assert await posting.run(1, first.alone(), priority=OUTCOME, merge=first) == "a"
    # waiting for its turn: b and c go together; d's caller stopped waiting (its job was stopped), so d isn't sent
    parts = [_Part(name, sent) for name in "bcd"]
    waiting = [asyncio.ensure_future(posting.run(1, p.alone(), priority=OUTCOME, merge=p)) for p in parts]
    await asyncio.sleep(0)
    waiting[2].cancel()
    assert await asyncio.gather(*waiting[:2]) == ["shared", "shared"] and sent == ["a", "b+c"]
    # a shared request Discord refuses: each part is sent on its own
    sent.clear()
    parts = [_Part("e", sent, fail=True), _Part("f", sent)]
    assert await asyncio.gather(*(posting.run(1, p.alone(), priority=OUTCOME, merge=p) for p in parts)) == ["e", "f"]
    assert sent == ["e", "f"]
    # a progress edit discarded while the queue paces: nothing breaks, the next operation still goes out
    doomed = posting.submit(1, _Part("g", sent).alone(), priority=PROGRESS, key="g")
    posting.discard(1, "g")
    assert doomed.cancelled() and await posting.run(1, _Part("h", sent).alone(), priority=OUTCOME) == "h"
    # closed with an operation in flight: its caller hears so
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "late"
    in_flight = posting.submit(1, slow, priority=OUTCOME)
    await asyncio.sleep(0.15)
    await posting.close()
    assert in_flight.cancelled()
