"""The backends the bot runs jobs on, in preference order: e.g. our worker (or its Ray Serve deployment) first, and
hosted fal to take the overflow. Every backend speaks fal's queue protocol
(https://docs.fal.ai/model-apis/model-endpoints/queue), so each is one `FalQueueClient`.

**Settings.** `BACKENDS` lists the pool, first choice first. Either names of the backends the single-backend
settings describe (`BACKENDS=worker,fal`: `WORKER_URL` + `WORKER_KEY` + `WORKER_MAX_QUEUE`, then `FAL_KEY` on
`FAL_QUEUE_BASE`), or a JSON list whose entries are those names or objects::

    BACKENDS='[{"name": "gpu1", "kind": "worker", "url": "http://gpu1:8000", "key": "…", "max_queue": 8},
               {"name": "gpu2", "kind": "worker", "url": "http://gpu2:8000"}, "fal"]'

`kind` is `worker` (anything serving our worker's protocol and `/health`: the single worker or its Serve
deployment) or `fal` (hosted fal: `url` defaults to `FAL_QUEUE_BASE`, `key` to `FAL_KEY`); `max_queue` (workers
only) is the queue length at which new jobs go to the next backend. Names are unique: a job records its backend's
name. Without `BACKENDS` the bot runs on one backend as before: `FAL_KEY`, else `WORKER_URL`, else the worker
embedded in the bot (`services/backend_select.py`).

**Which backend takes a job.** When a job leaves the bot's queue it goes to the first backend in order that is
up and not full; the others are the last resort, in order, when none is (a full worker still queues the job):

- a worker is up when its `/health` (asked with a short timeout, the answer kept `health_ttl_s`, a "down" five
  times longer) answers 200 with `ready` not false; full when its `queue_length` is at least its `max_queue`;
- hosted fal has no `/health`: it is up until a call to it fails (unreachable, or a 5xx / 429 after retries);
- a backend that refuses a submit (unreachable, 503 queue full, 429) is passed over for `down_s`, and the job
  goes to the next one at once (a submit to a pool of several is tried once per backend: the dispatcher's outage
  ride-out tries the pool again with backoff when every backend refused).

**A job belongs to the backend that has it.** Its name is recorded (the job's `backend`) before the submit is
sent, so following it, cancelling it, sending its submit again with its `Idempotency-Key` (per backend: hosted fal
doesn't honour keys) and recovering it after a restart all go there, and its result images are downloaded under
that backend's policy. A request the backend lost (404) is submitted again to the pool, its own backend first. A
job held by a backend that is no longer configured fails with a Retry saying so (nothing can follow or cancel it
there); one not submitted anywhere simply takes the pool's choice. With a single backend every job is its own,
whatever name it recorded (as before the pool existed).

**Safety.** Each backend is fitted to the moderation policy as a single one is (`fit_to_policy`): a generative
worker without a safety checker is left out of a pool of several, loudly; the bot refuses to start only when no
usable backend remains. A classic (non-generative) worker without a checker serves with the checker off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from services.backend_select import (
    BackendChoice,
    Capabilities,
    CapabilityProbe,
    EmbeddedWorker,
    choose_backend,
    fit_to_policy,
    shown_url,
)
from services.backends.fal_queue import FalQueueClient, RetryPolicy
from services.config import BotConfig
from services.errors import StartupError
from services.url_fetch import FetchPolicy, result_policy

log = logging.getLogger(__name__)

#: names `BACKENDS` may use for the backends the single-backend settings describe
SETTING_NAMES = ("worker", "fal")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class BackendSpec(BaseModel):
    """One entry of `BACKENDS`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME.pattern)
    kind: Literal["worker", "fal"]
    url: str | None = None
    key: SecretStr | None = None
    max_queue: int | None = Field(default=None, ge=1)


def backend_specs(config: BotConfig) -> list[BackendSpec] | None:
    """The pool `BACKENDS` describes, in order (None when it isn't set), or `StartupError` saying what is wrong.
    Messages name entries by position and name, never by value (an entry may hold a key)."""
    if config.backends is None:
        return None
    raw = config.backends.get_secret_value().strip()
    if not raw:
        return None
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except ValueError as exc:
            raise StartupError(f"BACKENDS isn't valid JSON (line {getattr(exc, 'lineno', '?')}, column "
                               f"{getattr(exc, 'colno', '?')}): give a JSON list, or names like worker,fal") from None
        if not isinstance(items, list):
            raise StartupError("BACKENDS must be a JSON list (or names like worker,fal)")
    else:
        items = [part.strip() for part in raw.split(",")]
    if not items:
        raise StartupError("BACKENDS is an empty list: name at least one backend, or leave it unset")
    specs = [_spec(config, i, item) for i, item in enumerate(items, 1)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise StartupError(f"BACKENDS names {spec.name!r} twice: each backend needs a name of its own (jobs "
                               "record which backend has them)")
        seen.add(spec.name)
    return specs


def _spec(config: BotConfig, position: int, item: object) -> BackendSpec:
    where = f"BACKENDS entry {position}"
    if isinstance(item, str):
        if item == "worker":
            if not config.worker_url:
                raise StartupError(f"{where} names the worker, but WORKER_URL isn't set")
            return BackendSpec(name="worker", kind="worker", url=config.worker_url, key=config.worker_key,
                               max_queue=config.worker_max_queue)
        if item == "fal":
            if config.fal_key is None:
                raise StartupError(f"{where} names hosted fal, but FAL_KEY isn't set")
            return BackendSpec(name="fal", kind="fal", url=config.fal_queue_base, key=config.fal_key)
        shown = item if _NAME.match(item) else "(an unknown name)"
        raise StartupError(f"{where} is {shown!r}: a name must be one of {', '.join(SETTING_NAMES)}, or give an "
                           "object {name, kind, url, key, max_queue} in a JSON list")
    if not isinstance(item, dict):
        raise StartupError(f"{where} must be a name or an object {{name, kind, url, key, max_queue}}")
    name = item.get("name")
    if isinstance(name, str) and _NAME.match(name):
        where += f" ({name})"
    try:
        spec = BackendSpec.model_validate(item)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {_problem(e)}" for e in exc.errors())
        raise StartupError(f"{where}: {problems}") from None
    if spec.kind == "worker":
        if not spec.url:
            raise StartupError(f"{where} is a worker without a url: give its base URL (e.g. http://gpu1:8000)")
    else:
        if spec.max_queue is not None:
            raise StartupError(f"{where}: max_queue is for workers (hosted fal doesn't say its queue length)")
        spec = spec.model_copy(update={"url": spec.url or config.fal_queue_base, "key": spec.key or config.fal_key})
        if spec.key is None:
            raise StartupError(f"{where} is hosted fal without a key: give `key`, or set FAL_KEY")
    assert spec.url is not None
    if not spec.url.startswith(("http://", "https://")):
        raise StartupError(f"{where}: url must start with http:// or https://")
    return spec


def _problem(error: object) -> str:
    """A pydantic error's message, without the input value (it may be a key)."""
    assert isinstance(error, dict)
    if error.get("type") == "extra_forbidden":
        return "unknown field (allowed: name, kind, url, key, max_queue)"
    if error.get("type") == "literal_error":
        return "unknown kind (allowed: worker, fal)"
    if error.get("type") == "string_pattern_mismatch":
        return "a name is 1-32 letters, digits, '.', '_' or '-'"
    return str(error.get("msg", "invalid"))


@dataclass(frozen=True)
class Health:
    up: bool
    queue_length: int | None = None
    why: str = ""


class PoolBackend:
    """One backend of the pool: its client, what it can do, and whether it is taking jobs now."""

    def __init__(self, choice: BackendChoice, client: FalQueueClient, *, results_from: FetchPolicy,
                 keys_honoured: Callable[[], Awaitable[bool | None]], probe: CapabilityProbe | None = None,
                 max_queue: int | None = None, submitter: FalQueueClient | None = None,
                 http: httpx.AsyncClient | None = None, health_ttl_s: float = 2.0, health_timeout_s: float = 2.0,
                 down_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.choice = choice
        self.client = client
        #: the client a pool's submits go through: tried once, so a refusal moves the job on at once
        self.submitter = submitter or client
        self.results_from = results_from
        self.probe = probe
        self.http = http
        self.max_queue = max_queue
        self.health_ttl_s = health_ttl_s
        self.health_timeout_s = health_timeout_s
        self.down_s = down_s
        self.clock = clock
        self._keys_honoured = keys_honoured
        #: left out of a pool of several (a generative worker that turned out to have no safety checker): takes no
        #: new jobs; jobs it has are still followed and cancelled there
        self.excluded = False
        self._health: Health | None = None
        self._health_at = 0.0
        self._asking = asyncio.Lock()  # jobs starting together share one /health request
        self._down_until = 0.0
        self._down_why = ""

    def __repr__(self) -> str:
        return f"PoolBackend({self.name!r}, {shown_url(self.client.base_url)!r})"

    @property
    def name(self) -> str:
        return self.choice.name

    @property
    def hosted(self) -> bool:
        return self.choice.hosted

    async def refit(self) -> None:
        """A backend that hadn't said whether it has a safety checker (its /health unreadable at start-up) is asked
        again (at most every `recheck_s`), and left out of the pool if it turns out it can't serve."""
        if self.choice.checker_known or self.probe is None or self.excluded:
            return
        known = await self.probe.current(recheck_unknown=True)
        if known.safety_checker is None:
            return  # still not said
        try:
            self.choice = fit_to_policy(self.choice, known, self.client.base_url)
        except StartupError as exc:
            log.error("BACKEND %s IS LEFT OUT OF THE POOL: %s", self.name, exc)
            self.excluded = True

    async def keys_honoured(self) -> bool | None:
        """Whether a repeated `Idempotency-Key` is answered with the request it made (None: not said yet)."""
        return await self._keys_honoured()

    def failed(self, why: str) -> None:
        """A call failed as an outage does (unreachable, queue full, 5xx): pass this backend over for `down_s`."""
        if self.clock() >= self._down_until:
            log.warning("backend %s is passed over for %g s: %s", self.name, self.down_s, why)
        self._down_until = self.clock() + self.down_s
        self._down_why = why
        self._health = None

    def worked(self) -> None:
        """A call succeeded: the backend takes jobs again."""
        self._down_until = 0.0

    async def health(self) -> Health:
        """Whether it takes jobs now: a worker's `/health` (kept `health_ttl_s`), hosted fal's last failure."""
        if self.clock() < self._down_until:
            return Health(False, why=self._down_why)
        if self.hosted:
            return Health(True)
        async with self._asking:
            if self._health is None or self.clock() - self._health_at >= self._kept_s(self._health):
                self._health = await self._ask_health()
                self._health_at = self.clock()
            return self._health

    def _kept_s(self, health: Health) -> float:
        """How long an answer stands: a "down" longer (a worker that doesn't answer may take the whole timeout to
        say so again), but not as long as a refused submit's `down_s`."""
        return self.health_ttl_s if health.up else max(self.health_ttl_s, min(self.down_s, 5 * self.health_ttl_s))

    async def available(self) -> tuple[bool, str]:
        """Up and not full, or why not."""
        health = await self.health()
        if not health.up:
            return False, health.why
        if self.max_queue is not None and health.queue_length is not None and health.queue_length >= self.max_queue:
            return False, f"its queue is full ({health.queue_length} of max_queue {self.max_queue})"
        return True, ""

    async def _ask_health(self) -> Health:
        if self.http is None:
            return Health(True)
        try:
            response = await self.http.get(f"{self.client.base_url}/health", timeout=self.health_timeout_s)
        except httpx.HTTPError as exc:
            return Health(False, why=f"/health unreachable ({type(exc).__name__})")
        if response.status_code != 200:
            return Health(False, why=f"/health answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            return Health(True)
        if not isinstance(body, dict):
            return Health(True)
        if body.get("ready") is False:
            return Health(False, why="/health says it isn't ready")
        length = body.get("queue_length")
        return Health(True, queue_length=length if isinstance(length, int) and not isinstance(length, bool) else None)


class BackendPool:
    """The backends in preference order. A pool of one behaves exactly as the single backend did."""

    def __init__(self, entries: Sequence[PoolBackend]) -> None:
        if not entries:
            raise ValueError("a pool needs a backend")
        self.entries = list(entries)

    @classmethod
    def single(cls, client: FalQueueClient, *, name: str = "backend",
               keys_honoured: Callable[[], Awaitable[bool | None]], results_from: FetchPolicy | None = None,
               choice: BackendChoice | None = None, probe: CapabilityProbe | None = None) -> BackendPool:
        choice = choice or BackendChoice(name, client.base_url, None)
        return cls([PoolBackend(choice, client, results_from=results_from or result_policy(client.base_url),
                                keys_honoured=keys_honoured, probe=probe)])

    @property
    def first(self) -> PoolBackend:
        return self.entries[0]

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    @property
    def hosted(self) -> bool:
        """Hosted fal is in the pool (jobs may cost money)."""
        return any(entry.hosted for entry in self.entries)

    @property
    def mixed(self) -> bool:
        """Hosted fal and backends of our own together: only the jobs hosted fal runs cost money."""
        return self.hosted and not all(entry.hosted for entry in self.entries)

    def get(self, name: str) -> PoolBackend | None:
        """The backend of that name; with a single backend, it whatever the name (as before the pool)."""
        if len(self.entries) == 1:
            return self.entries[0]
        return next((entry for entry in self.entries if entry.name == name), None)

    async def candidates(self, prefer: str | None = None) -> list[PoolBackend]:
        """Where a new submit goes, in the order to try: the backends up and not full (`prefer` first, if it is
        one of them), then the rest in order as the last resort."""
        if len(self.entries) == 1:
            return list(self.entries)
        ready: list[PoolBackend] = []
        rest: list[PoolBackend] = []
        for entry in self.entries:
            await entry.refit()
            if entry.excluded:
                continue
            ok, why = await entry.available()
            (ready if ok else rest).append(entry)
            if not ok:
                log.info("backend %s is passed over for new jobs: %s", entry.name, why)
        ready.sort(key=lambda entry: entry.name != prefer)  # stable: the pool's order otherwise
        return ready + rest

    async def estimator(self) -> FalQueueClient | None:
        """The backend to ask fal's NSFW estimator (`fal-ai/imageutils/nsfw`): the first that is up and has a
        safety checker (hosted fal always has). A single backend is asked whatever it said (it answers 422 or 404
        without one). None: no backend can be asked now."""
        if len(self.entries) == 1:
            return self.first.client
        for entry in self.entries:
            if not entry.excluded and entry.choice.safety_checker and (await entry.health()).up:
                return entry.client
        return None


async def open_pool(config: BotConfig, http: httpx.AsyncClient, stack: AsyncExitStack) -> BackendPool:
    """The pool the configuration describes, each backend probed and fitted to the moderation policy (clients
    and an embedded worker join `stack`). `StartupError` when no usable backend remains."""
    specs = backend_specs(config)
    if specs is None:
        choice = choose_backend(config)
        base_url = choice.base_url
        if base_url is None:
            base_url = await stack.enter_async_context(EmbeddedWorker())
        entry = await _entry(config, http, stack, choice, base_url, max_queue=None, pooled=False)
        entry.choice = fit_to_policy(entry.choice, await _known(entry, base_url), base_url)
        return BackendPool([entry])
    pooled = len(specs) > 1
    entries: list[PoolBackend] = []
    for spec in specs:
        assert spec.url is not None
        choice = BackendChoice(spec.name, spec.url, spec.key, kind=spec.kind)
        entry = await _entry(config, http, stack, choice, spec.url, max_queue=spec.max_queue, pooled=pooled)
        try:
            entry.choice = fit_to_policy(entry.choice, await _known(entry, spec.url), spec.url)
        except StartupError as exc:
            if not pooled:
                raise
            log.error("BACKEND %s IS LEFT OUT OF THE POOL: %s", spec.name, exc)
            continue
        entries.append(entry)
    if not entries:
        raise StartupError("no backend in BACKENDS can serve under the bot's moderation policy (see the log above): "
                           "set SAFETY_CHECKER_PATH on the workers, or add hosted fal")
    log.info("backend pool, in order: %s", ", ".join(f"{e.name} ({e.choice.kind}, {shown_url(e.client.base_url)})"
                                                    for e in entries))
    return BackendPool(entries)


async def _entry(config: BotConfig, http: httpx.AsyncClient, stack: AsyncExitStack, choice: BackendChoice,
                 base_url: str, *, max_queue: int | None, pooled: bool) -> PoolBackend:
    def client(retry: RetryPolicy | None = None) -> FalQueueClient:
        made = FalQueueClient(base_url=base_url, key=choice.key, app_id=config.app_id, http=http,
                              retry=retry or RetryPolicy(),
                              poll_interval_s=config.backend_poll_interval_s,
                              total_timeout_s=config.backend_total_timeout_s)
        stack.push_async_callback(made.aclose)
        return made

    probe = CapabilityProbe(choice, base_url, http)

    async def keys_honoured() -> bool | None:
        return (await probe.current(recheck_unknown=True)).idempotency_keys

    return PoolBackend(choice, client(), submitter=client(RetryPolicy(attempts=1)) if pooled else None,
                       probe=probe, keys_honoured=keys_honoured, max_queue=max_queue, http=http,
                       results_from=result_policy(base_url, result_hosts=config.result_hosts,
                                                  allow=config.fetch_allow or ()))


async def _known(entry: PoolBackend, base_url: str) -> Capabilities:
    assert entry.probe is not None
    known = await entry.probe.current()
    log.info("backend %s at %s: %s", entry.name, shown_url(base_url), known)
    return known
