"""The fair queue and the dispatcher without Discord: users take turns, caps hold per user and per server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from services.backends.fal_queue import FalQueueClient, RetryPolicy
from services.blob import Blob
from services.dispatch import Dispatcher
from services.fairqueue import FairQueue, QueuedJob
from services.modlog import ModerationLog
from services.store import Store
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.listener import RecordingListener

INPUTS = {"image": Blob(encode(photo(64, 64)), "image/png"),
          "mask": Blob(encode(box_mask((64, 64), (8, 8, 40, 40))), "image/png")}


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


async def test_200_jobs_from_10_users_every_first_job_starts_before_any_second(tmp_path: Path) -> None:
    async with FalTestServer(key=None, queue_polls=0, progress_logs=0) as server, \
            await Store.open(tmp_path / "fair.sqlite3") as store, httpx.AsyncClient() as http:
        await store.server_settings.save(1, {"user_concurrent": 2, "server_concurrent": 8})
        created = []
        for user in range(10):  # each user queues 20 jobs, one user after the other
            for _ in range(20):
                created.append(await store.jobs.create(
                    user_id=user, guild_id=1, channel_id=2, backend="fal", blobs=INPUTS,
                    input={"prompt": "x", "image_url": "blob:image", "mask_url": "blob:mask",
                           "image_size": "square", "enable_safety_checker": False}))
        recorder = RecordingListener()
        backend = FalQueueClient(base_url=server.base_url, http=http, poll_interval_s=0.001,
                                 retry=RetryPolicy(2, 0.01, 0.02))

        dispatcher = Dispatcher(store, backend, http, ModerationLog(store.modlog), concurrency=8)
        await dispatcher.start(recorder)  # recovery picks up all 200 queued jobs
        await asyncio.wait_for(asyncio.gather(*(recorder.event(j.id).wait() for j in created)), 120)
        await dispatcher.close()
        user_of = {j.id: j.user_id for j in created}
        order = [user_of[j] for j in dispatcher.started]
        assert len(order) == 200 and sorted(recorder.succeeded) == [j.id for j in created]
        firsts = {user: order.index(user) for user in range(10)}
        seconds = {user: [i for i, u in enumerate(order) if u == user][1] for user in range(10)}
        assert max(firsts.values()) < min(seconds.values())  # every first job before any second job


async def test_caps_hold_per_user_and_per_server(tmp_path: Path) -> None:
    async with FalTestServer(key=None, queue_polls=3, progress_logs=2) as server, \
            await Store.open(tmp_path / "caps.sqlite3") as store, httpx.AsyncClient() as http:
        await store.server_settings.save(1, {"user_concurrent": 1, "server_concurrent": 2})
        created = [await store.jobs.create(user_id=u % 2, guild_id=1, channel_id=2, backend="fal", blobs=INPUTS,
                                          input={"prompt": "x", "image_url": "blob:image", "mask_url": "blob:mask",
                                                 "image_size": "square"}) for u in range(8)]
        recorder = RecordingListener()
        backend = FalQueueClient(base_url=server.base_url, http=http, poll_interval_s=0.005)
        peak = {"user": 0, "server": 0}

        dispatcher = Dispatcher(store, backend, http, ModerationLog(store.modlog), concurrency=8)

        async def watch() -> None:
            while True:
                running = [q for q, _ in dispatcher._running.values()]
                peak["server"] = max(peak["server"], len(running))
                per_user = [sum(1 for q in running if q.user_id == u) for u in (0, 1)]
                peak["user"] = max(peak["user"], *per_user)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        await dispatcher.start(recorder)
        await asyncio.wait_for(asyncio.gather(*(recorder.event(j.id).wait() for j in created)), 60)
        watcher.cancel()
        await dispatcher.close()
        assert peak == {"user": 1, "server": 2}
