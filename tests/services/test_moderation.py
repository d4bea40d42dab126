"""Moderation and fairness without Discord: filters, regex safety, policy, quotas, the fair queue, the dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.backends.fal_queue import FalQueueClient, RetryPolicy
from services.dispatch import Dispatcher
from services.errors import UserError
from services.fairqueue import FairQueue, QueuedJob
from services.limits import Limits, day_start
from services.moderation import GuildPolicy, PromptFilter, normalize, save_policy, validate_regex
from services.progress import Progress
from services.schema import InpaintOutput
from services.store import Job, JobStatus, JobStore, ModerationStore, StoredBlob
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo


@pytest.mark.parametrize(
    ("prompt", "rule"),
    [("A NÜDE woman", "nude"), ("n u d e beach", "nude"), ("n.u.d.e", "nude"), ("N-U-D-E", "nude"),
     ("nud3 art", "nude"), ("p0rn", "porn"), ("s\u200bexy", "sexy"), ("NAKEDS", "naked"),
     ("expl1c1t", "explicit"), ("ｎｕｄｅ", "nude")],
)
def test_default_filter_sees_through_tricks(prompt: str, rule: str) -> None:
    hit = PromptFilter(GuildPolicy()).check({"prompt": prompt})
    assert hit is not None and hit.rule == f"default word '{rule}'" and hit.field == "prompt"


@pytest.mark.parametrize("prompt", ["essex county fair", "sussex", "a landscape at 1024", "snakedance",
                                    "a scunthorpe sign", "the 3 musketeers", "glass of 7up"])
def test_no_false_positives_on_innocent_prompts(prompt: str) -> None:
    assert PromptFilter(GuildPolicy()).check({"prompt": prompt}) is None


def test_server_words_regexes_and_the_negative_prompt() -> None:
    policy = GuildPolicy(filter_words=["Clown"], filter_regexes=[r"\bspider\s*man\b"], use_default_filters=False)
    check = PromptFilter(policy).check
    assert check({"prompt": "a c.l.o.w.n at a party"}) == check({"prompt": "CLOWNS"})
    hit_word = check({"prompt": "clown"})
    assert hit_word is not None and hit_word.rule == "server word 'Clown'"
    hit = check({"prompt": "a hero", "negative_prompt": "SpiderMan"})
    assert hit is not None and hit.field == "negative_prompt" and hit.rule.startswith("server regex")
    assert check({"prompt": "nude"}) is None  # the built-in list is off for this server
    assert normalize("Crème Brûlée") == "creme brulee"


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(x+x+)+y", r"(a|aa)+$", r"^(\w+\s?)+$"])
def test_catastrophic_regexes_are_refused(pattern: str) -> None:
    with pytest.raises(UserError, match="catastrophic"):
        validate_regex(pattern)


def test_regex_validation() -> None:
    assert validate_regex(r"\bdragons?\b") == r"\bdragons?\b"
    for bad, why in (("(unclosed", "valid regular expression"), ("", "empty"), ("a" * 300, "at most")):
        with pytest.raises(UserError, match=why):
            validate_regex(bad)


def test_nsfw_policy_by_channel_type() -> None:
    for policy in ("block", "spoiler", "allow"):
        p = GuildPolicy(nsfw_policy=policy)
        assert p.flagged_action(age_restricted=False) == "block"  # ordinary channels: never anything else
        assert p.flagged_action(age_restricted=True) == policy
    assert GuildPolicy().safety_checker_required(age_restricted=True)
    relaxed = GuildPolicy(checker_off_in_age_restricted=True)
    assert not relaxed.safety_checker_required(age_restricted=True)
    assert relaxed.safety_checker_required(age_restricted=False)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    async with await JobStore.open(tmp_path / "m.sqlite3") as s:
        yield s


async def test_policy_round_trips_and_validates(store: JobStore) -> None:
    policy = await save_policy(store, 5, {"nsfw_policy": "spoiler", "server_daily_jobs": 3})
    assert (policy.nsfw_policy, policy.server_daily_jobs) == ("spoiler", 3)
    with pytest.raises(UserError, match="isn't valid"):
        await save_policy(store, 5, {"user_concurrent": 0})
    again = await save_policy(store, 5, {"filter_words": ["x"]})
    assert again.nsfw_policy == "spoiler" and again.filter_words == ["x"]


async def test_quota_exhausted_then_reset_the_next_day(store: JobStore) -> None:
    now = [day_start(1_800_000_000) + 3600.0]
    limits = Limits(ModerationStore(store), clock=lambda: now[0])
    policy = GuildPolicy(user_daily_jobs=2, server_daily_steps=120)
    for _ in range(2):
        await limits.check(policy, 1, 7, steps=25)
        job = await store.create_job(user_id=7, guild_id=1, input={"num_inference_steps": 25}, backend="fal")
        await store.transition(job.id, JobStatus.SUBMITTED)  # reached a backend: it counts
    # (jobs are stamped with the real time; move the test clock to "today" as the store sees it)
    now[0] = job.created_at + 1
    with pytest.raises(UserError, match="used your 2 jobs for today"):
        await limits.check(policy, 1, 7, steps=25)
    await limits.check(policy, 1, 8, steps=25)  # someone else still can…
    with pytest.raises(UserError, match="needs 100 steps"):
        await limits.check(policy, 1, 8, steps=100)  # …but not past the server's step budget (50 used)
    quota = await limits.quota(policy, 1, 7)
    assert (quota.user_jobs, quota.server_steps) == (2, 50)
    now[0] += 86400  # the next UTC day
    await limits.check(policy, 1, 7, steps=25)
    # jobs blocked by moderation or refused before reaching a backend don't count
    blocked = await store.create_job(user_id=9, guild_id=1, input={}, backend="fal")
    await store.transition(blocked.id, JobStatus.BLOCKED)
    now[0] = blocked.created_at
    assert (await limits.quota(policy, 1, 9)).user_jobs == 0


async def test_cooldown(store: JobStore) -> None:
    limits = Limits(ModerationStore(store))
    policy = GuildPolicy(user_cooldown_s=60)
    await limits.check(policy, 1, 7, steps=25)
    job = await store.create_job(user_id=7, guild_id=1, input={}, backend="fal")
    await store.transition(job.id, JobStatus.SUBMITTED)
    with pytest.raises(UserError, match="Slow down"):
        await limits.check(policy, 1, 7, steps=25)


async def test_bans_and_the_moderation_log(store: JobStore) -> None:
    moderation = ModerationStore(store)
    assert await moderation.ban(1, 7, by=99) and not await moderation.ban(1, 7, by=99)
    assert await moderation.is_banned(1, 7) and not await moderation.is_banned(2, 7)
    assert await moderation.unban(1, 7) and not await moderation.is_banned(1, 7)
    await moderation.log(1, "user_banned", user_id=7, actor_id=99)
    await moderation.log(1, "user_unbanned", user_id=7, actor_id=99)
    assert [e.action for e in await moderation.entries(1)] == ["user_banned", "user_unbanned"]


def test_fair_queue_round_robin() -> None:
    queue = FairQueue()
    for user in (1, 2, 3):
        for n in range(4):
            queue.push(QueuedJob(user * 10 + n, user, 1))
    assert queue.position(10) == 0 and queue.position(21) == 4 and queue.position(33) == 11
    order = []
    while (item := queue.pop()) is not None:
        order.append(item.job_id)
    assert order == [10, 20, 30, 11, 21, 31, 12, 22, 32, 13, 23, 33]
    # a user at their cap is skipped, not waited for
    for job_id, user in ((1, 1), (2, 1), (3, 2)):
        queue.push(QueuedJob(job_id, user, 1))
    skipped = queue.pop(lambda q: q.user_id != 1)
    assert skipped is not None and skipped.job_id == 3


class _Recorder:
    """The dispatcher's listener, recording what a presentation layer would be told."""

    def __init__(self) -> None:
        self.done: dict[int, asyncio.Event] = {}
        self.succeeded: list[int] = []
        self.ended: list[Job] = []

    def event(self, job_id: int) -> asyncio.Event:
        return self.done.setdefault(job_id, asyncio.Event())

    async def job_progress(self, job: Job, progress: Progress) -> None:
        return None

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[StoredBlob], *,
                            spoiler: bool = False) -> None:
        self.succeeded.append(job.id)
        self.event(job.id).set()

    async def job_ended(self, job: Job) -> None:
        self.ended.append(job)
        self.event(job.id).set()


async def test_200_jobs_from_10_users_every_first_job_starts_before_any_second(tmp_path: Path) -> None:
    from services.jobs import JobService

    async with FalTestServer(key=None, queue_polls=0, progress_logs=0) as server, \
            await JobStore.open(tmp_path / "fair.sqlite3") as store, httpx.AsyncClient() as http:
        jobs = JobService(store, backend="fal")
        blobs = {"image": (encode(photo(64, 64)), "image/png"),
                 "mask": (encode(box_mask((64, 64), (8, 8, 40, 40))), "image/png")}
        created = []
        for user in range(10):  # each user queues 20 jobs, one user after the other
            for _ in range(20):
                created.append(await store.create_job(
                    user_id=user, guild_id=1, channel_id=2, backend="fal", blobs=blobs,
                    input={"prompt": "x", "image_url": "blob:image", "mask_url": "blob:mask",
                           "image_size": "square", "enable_safety_checker": False}))
        recorder = _Recorder()
        backend = FalQueueClient(base_url=server.base_url, http=http, poll_interval_s=0.001,
                                 retry=RetryPolicy(2, 0.01, 0.02))

        async def roomy(_guild: int | None) -> GuildPolicy:
            return GuildPolicy(user_concurrent=2, server_concurrent=8)

        dispatcher = Dispatcher(store, jobs, backend, http, recorder, concurrency=8, policies=roomy)
        await dispatcher.start()  # recovery picks up all 200 queued jobs
        await asyncio.wait_for(asyncio.gather(*(recorder.event(j.id).wait() for j in created)), 120)
        await dispatcher.close()
        user_of = {j.id: j.user_id for j in created}
        order = [user_of[j] for j in dispatcher.started]
        assert len(order) == 200 and sorted(recorder.succeeded) == [j.id for j in created]
        firsts = {user: order.index(user) for user in range(10)}
        seconds = {user: [i for i, u in enumerate(order) if u == user][1] for user in range(10)}
        assert max(firsts.values()) < min(seconds.values())  # every first job before any second job


async def test_caps_hold_per_user_and_per_server(tmp_path: Path) -> None:
    from services.jobs import JobService

    async with FalTestServer(key=None, queue_polls=3, progress_logs=2) as server, \
            await JobStore.open(tmp_path / "caps.sqlite3") as store, httpx.AsyncClient() as http:
        jobs = JobService(store, backend="fal")
        blobs = {"image": (encode(photo(64, 64)), "image/png"),
                 "mask": (encode(box_mask((64, 64), (8, 8, 40, 40))), "image/png")}
        created = [await store.create_job(user_id=u % 2, guild_id=1, channel_id=2, backend="fal", blobs=blobs,
                                          input={"prompt": "x", "image_url": "blob:image", "mask_url": "blob:mask",
                                                 "image_size": "square"}) for u in range(8)]
        recorder = _Recorder()
        backend = FalQueueClient(base_url=server.base_url, http=http, poll_interval_s=0.005)
        peak = {"user": 0, "server": 0}

        async def tight(_guild: int | None) -> GuildPolicy:
            return GuildPolicy(user_concurrent=1, server_concurrent=2)

        dispatcher = Dispatcher(store, jobs, backend, http, recorder, concurrency=8, policies=tight)

        async def watch() -> None:
            while True:
                running = [q for q, _ in dispatcher._running.values()]
                peak["server"] = max(peak["server"], len(running))
                per_user = [sum(1 for q in running if q.user_id == u) for u in (0, 1)]
                peak["user"] = max(peak["user"], *per_user)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        await dispatcher.start()
        await asyncio.wait_for(asyncio.gather(*(recorder.event(j.id).wait() for j in created)), 60)
        watcher.cancel()
        await dispatcher.close()
        assert peak == {"user": 1, "server": 2}
