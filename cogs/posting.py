"""Every message the bot posts, edits or deletes in a channel goes through here, within Discord's budget for that
channel (about 5 operations per 5 seconds, posts and edits together), before Discord would answer 429.

Operations wait in a per-channel queue ordered by what matters to users:

- `OUTCOME`: a result, or a job's end when it has no result (failed, cancelled, blocked): what the user waits for;
- `ANNOUNCE`: a new job's progress message, a mod-log entry;
- `TIDY`: a finished job's progress message brought to its final state once its result is posted;
- `PROGRESS`: an intermediate progress edit. Edits of one message are coalesced (only the latest waits).

`TIDY` and `PROGRESS` wait while the channel is busy with outcomes (one went out within the last budget window),
and even in a quiet channel they only take a slot when all but one are free: a channel where results are arriving
(or about to) spends its budget on them, and shows progress again when it quiets.

Operations are paced, one per `per_s / limit` seconds (1 s) at most, rather than sent in bursts: after a burst that
used the whole budget, a result would wait for the window to pass (5 s); paced, it waits at most one step.

Even alone, results can outrun the budget: 20 jobs finishing at 1.5 a second need 1.5 posts a second against the
channel's 1. So an operation may say how it can share one request with others of its kind (`Mergeable`): when an
outcome had to wait, the outcomes of its kind waiting with it go out together (several results in one message) as
far as one request can hold them. Every result is then out within about two seconds of its job's end.

discord.py's own per-route rate limiting still runs underneath; this keeps the channel's shared budget, which
discord.py can't see (it tracks each route separately).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

log = logging.getLogger(__name__)

OUTCOME, ANNOUNCE, TIDY, PROGRESS = 0, 1, 2, 3


class Mergeable(Protocol):
    """An operation that can share one request with others of its type (posting several results as one message)."""

    def joins(self, batch: Sequence[Self]) -> bool:
        """Whether one request can carry `batch` (all of this type, starting with the first to go) and this too."""
        ...

    def together(self, batch: Sequence[Self]) -> Callable[[], Awaitable[Any]]:
        """The one request that carries all of `batch` (which includes this one); its result goes to each."""
        ...


@dataclass(order=True)
class _Entry:
    priority: int
    seq: int
    op: Callable[[], Awaitable[Any]] = field(compare=False)
    done: asyncio.Future[Any] = field(compare=False)
    key: Hashable | None = field(default=None, compare=False)
    merge: Mergeable | None = field(default=None, compare=False)


class _Lane:
    """One channel's queue and the record of what it sent lately."""

    def __init__(self) -> None:
        self.heap: list[_Entry] = []
        self.by_key: dict[Hashable, _Entry] = {}
        self.sent: deque[float] = deque()
        self.last_outcome = float("-inf")
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class ChannelPosting:
    def __init__(self, *, limit: int = 5, per_s: float = 5.0, margin: float = 1.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.per_s = per_s * margin  # a little slower than Discord's window, so clocks needn't agree exactly
        self.clock = clock
        self._lanes: dict[int, _Lane] = {}
        self._seq = itertools.count()
        self._closed = False

    async def run(self, channel_id: int, op: Callable[[], Awaitable[Any]], *, priority: int,
                  key: Hashable | None = None, merge: Mergeable | None = None) -> Any:
        """Run `op` when the channel's budget and the queue allow; returns its result (the result of the operation
        that replaced it when a later one with the same `key` came first; of the shared request when `merge` let
        it go out with others)."""
        return await self.submit(channel_id, op, priority=priority, key=key, merge=merge)

    def submit(self, channel_id: int, op: Callable[[], Awaitable[Any]], *, priority: int,
               key: Hashable | None = None, merge: Mergeable | None = None) -> asyncio.Future[Any]:
        """Queue `op` without waiting for it; the future completes with its result (or its exception)."""
        if self._closed:
            raise RuntimeError("posting has stopped")
        lane = self._lanes.setdefault(channel_id, _Lane())
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)  # a caller that doesn't wait still has its failure logged, not lost
        previous = lane.by_key.get(key) if key is not None else None
        if previous is not None and not previous.done.done():
            previous.op = op  # the latest version waits in the earlier one's place
            chained = previous.done
            chained.add_done_callback(lambda f: _copy(f, done))
            return done
        entry = _Entry(priority, next(self._seq), op, done, key, merge)
        heapq.heappush(lane.heap, entry)
        if key is not None:
            lane.by_key[key] = entry
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._drain(lane), name=f"posting-{channel_id}")
        lane.wakeup.set()
        return done

    def discard(self, channel_id: int, key: Hashable) -> None:
        """Drop the operation waiting under `key` (one already running finishes first: a channel's operations run
        one at a time, in order)."""
        lane = self._lanes.get(channel_id)
        entry = lane.by_key.pop(key, None) if lane else None
        if lane is None or entry is None:
            return
        lane.heap.remove(entry)
        heapq.heapify(lane.heap)
        entry.done.cancel()

    def pending(self, channel_id: int) -> int:
        lane = self._lanes.get(channel_id)
        return len(lane.heap) if lane else 0

    async def _drain(self, lane: _Lane) -> None:
        batch: list[_Entry] = []
        try:
            while lane.heap:
                waited = await self._paced(lane)
                self._drop_cancelled(lane)  # callers that stopped waiting (their job was stopped) get nothing sent
                if not lane.heap:
                    break
                if lane.heap[0].priority >= TIDY:
                    if await self._busy(lane):
                        continue  # the channel quieted, or something more urgent came: look again
                    if not self._room(lane, self.limit - 1):
                        await self._within_budget(lane, free=self.limit - 1)
                        continue
                batch = self._take(lane, merge=waited)
                await self._send(lane, batch)
                batch = []
        finally:  # stopped (close) with a batch in flight: its callers hear so rather than wait forever
            for entry in batch:
                if not entry.done.done():
                    entry.done.cancel()

    async def _send(self, lane: _Lane, batch: list[_Entry]) -> None:
        """One request for `batch`; its result (or failure) goes to each caller. A shared request that Discord
        refuses is tried again as separate ones, so one part can't cost the others."""
        if batch[0].priority == OUTCOME:
            lane.last_outcome = self.clock()
        lane.sent.append(self.clock())
        try:
            first = batch[0]
            op = first.op if first.merge is None or len(batch) == 1 else \
                first.merge.together([entry.merge for entry in batch if entry.merge is not None])
            result = await op()
        except Exception as exc:  # the caller decides what a failed post means
            if len(batch) > 1:
                log.warning("a shared request failed (%r): sending its %d parts one by one", exc, len(batch))
                for entry in batch:
                    entry.merge = None
                    heapq.heappush(lane.heap, entry)
                return
            for entry in batch:
                if not entry.done.done():
                    entry.done.set_exception(exc)
        else:
            for entry in batch:
                if not entry.done.done():
                    entry.done.set_result(result)

    def _drop_cancelled(self, lane: _Lane) -> None:
        if any(entry.done.cancelled() for entry in lane.heap):
            for entry in lane.heap:
                if entry.done.cancelled() and entry.key is not None and lane.by_key.get(entry.key) is entry:
                    del lane.by_key[entry.key]
            lane.heap = [entry for entry in lane.heap if not entry.done.cancelled()]
            heapq.heapify(lane.heap)

    async def _paced(self, lane: _Lane) -> bool:
        """Wait until the channel may send again; whether that took any waiting.

        Operations go out at most one per `per_s / limit` seconds, never in a burst that would use the whole
        budget at once: a result that comes just after a burst would wait for the window to pass (5 s); paced, it
        waits one step (1 s), with whatever joined it meanwhile."""
        waited = False
        while True:
            now = self.clock()
            wait = lane.sent[-1] + self.per_s / self.limit - now if lane.sent else 0.0
            if not self._room(lane, 1):
                wait = max(wait, self.per_s - (now - lane.sent[0]))
            if wait <= 0:
                return waited
            waited = True
            await asyncio.sleep(wait)

    def _take(self, lane: _Lane, *, merge: bool) -> list[_Entry]:
        """The next operation, with (when `merge`: it waited for the budget) those of its kind that can share its
        request, in the order they came."""
        first = heapq.heappop(lane.heap)
        batch = [first]
        if merge and first.merge is not None:
            kind = type(first.merge)
            for entry in sorted(lane.heap):
                if entry.priority != first.priority or type(entry.merge) is not kind:
                    continue
                parts = [e.merge for e in batch if e.merge is not None]
                assert entry.merge is not None
                if entry.merge.joins(parts):
                    batch.append(entry)
            if len(batch) > 1:
                taken = {id(entry) for entry in batch}
                lane.heap = [entry for entry in lane.heap if id(entry) not in taken]
                heapq.heapify(lane.heap)
        for entry in batch:
            if entry.key is not None:
                lane.by_key.pop(entry.key, None)
        return batch

    async def _busy(self, lane: _Lane) -> bool:
        """Whether the channel is busy with outcomes; if so, wait until it quiets or something more urgent comes."""
        quiet_at = lane.last_outcome + self.per_s
        now = self.clock()
        if now >= quiet_at:
            return False
        lane.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.wakeup.wait(), quiet_at - now)
        return True

    def _room(self, lane: _Lane, free: int) -> bool:
        """Whether `free` slots of the channel's budget are unused now."""
        now = self.clock()
        while lane.sent and now - lane.sent[0] >= self.per_s:
            lane.sent.popleft()
        return self.limit - len(lane.sent) >= min(free, self.limit)

    async def _within_budget(self, lane: _Lane, *, free: int) -> None:
        """Wait until `free` slots are unused, or a more urgent operation arrives."""
        while not self._room(lane, free):
            if lane.heap and lane.heap[0].priority < TIDY:
                return
            wait = self.per_s - (self.clock() - lane.sent[0])
            lane.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wakeup.wait(), wait)

    async def close(self) -> None:
        """Stop: what hasn't been sent is dropped (a restarted bot shows jobs from the store again)."""
        self._closed = True
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            for entry in lane.heap:
                if not entry.done.done():
                    entry.done.cancel()
        self._lanes.clear()


def _retrieve(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.debug("a channel operation failed: %r", done.exception())


def _copy(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())
