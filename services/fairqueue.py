"""A fair job queue: users take turns (round-robin), so one user's twenty jobs don't hold up everyone else's
first; a job only starts while its user and its server are under their concurrency caps."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

UserKey = tuple[int | None, int]  # (guild id, user id)


@dataclass(frozen=True)
class QueuedJob:
    job_id: int
    user_id: int
    guild_id: int | None

    @property
    def user_key(self) -> UserKey:
        return (self.guild_id, self.user_id)


class FairQueue:
    def __init__(self) -> None:
        self._users: OrderedDict[UserKey, deque[QueuedJob]] = OrderedDict()  # rotation order: next user first
        self._index: dict[int, QueuedJob] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._index

    def __iter__(self) -> Iterator[QueuedJob]:
        return iter(list(self._index.values()))

    def push(self, job: QueuedJob) -> None:
        if job.job_id in self._index:
            return
        self._index[job.job_id] = job
        self._users.setdefault(job.user_key, deque()).append(job)

    def remove(self, job_id: int) -> bool:
        job = self._index.pop(job_id, None)
        if job is None:
            return False
        jobs = self._users[job.user_key]
        jobs.remove(job)
        if not jobs:
            del self._users[job.user_key]
        return True

    def pop(self, can_run: Callable[[QueuedJob], bool] = lambda _job: True) -> QueuedJob | None:
        """The next user's oldest job that may run now; that user then goes to the back of the rotation."""
        for key, jobs in self._users.items():
            head = jobs[0]
            if can_run(head):
                jobs.popleft()
                del self._index[head.job_id]
                if jobs:
                    self._users.move_to_end(key)
                else:
                    del self._users[key]
                return head
        return None

    def position(self, job_id: int) -> int | None:
        """How many queued jobs would start before this one if nothing else arrived (caps aside)."""
        job = self._index.get(job_id)
        if job is None:
            return None
        depth = self._users[job.user_key].index(job)
        ahead = depth
        seen_own = False
        for key, jobs in self._users.items():
            if key == job.user_key:
                seen_own = True
                continue
            ahead += min(len(jobs), depth if seen_own else depth + 1)
        return ahead
