"""Which backend the bot talks to: hosted fal (FAL_KEY), our worker (WORKER_URL), or — with neither — the worker
app started inside the bot's own process on 127.0.0.1 (still over HTTP, so there is one code path)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import SecretStr

from services.config import BotConfig
from services.errors import StartupError
from services.http_server import LoopServer

log = logging.getLogger(__name__)

Kind = Literal["fal", "worker", "embedded"]


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "fal", "worker" or "embedded"; in a pool (BACKENDS), the entry's name
    base_url: str | None  # None for "embedded" until it has started
    key: SecretStr | None = field(default=None, repr=False)
    safety_checker: bool = True
    #: False while the backend hasn't said whether it has a checker (its /health unreadable at start-up): the
    #: launcher asks again before each job until it has
    checker_known: bool = True
    #: what it is: hosted fal, our worker, or the worker inside the bot (None: as its name says)
    kind: Kind | None = None

    @property
    def hosted(self) -> bool:
        """Hosted fal (every job costs money; no /health)."""
        return (self.kind or self.name) == "fal"


@dataclass(frozen=True)
class Capabilities:
    """What the backend does beyond fal's basic inpainting request, and what it runs (None: it didn't say)."""

    expand_prompt: bool = False
    safety_checker: bool | None = None
    pipeline: str | None = None
    #: a repeated submit with the same `Idempotency-Key` is answered with the request the backend already has
    #: (None: it didn't say: its /health didn't answer)
    idempotency_keys: bool | None = None


class CapabilityProbe:
    """What the backend can do, as it last said. A "no" older than `recheck_s` is asked again before it refuses
    a user (the worker may have been down, or reconfigured, since)."""

    def __init__(self, choice: BackendChoice, base_url: str, http: httpx.AsyncClient, *, recheck_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.choice, self.base_url, self.http = choice, base_url, http
        self.recheck_s = recheck_s
        self.clock = clock
        self._known: Capabilities | None = None
        self._asked_at = 0.0

    async def current(self, *, recheck_no: bool = False, recheck_unknown: bool = False) -> Capabilities:
        """What the backend said; asked again when it has never answered, or (with `recheck_no` /
        `recheck_unknown`) when it said no to a prompt expander / didn't say whether it has a safety checker or
        honours Idempotency-Key, longer than `recheck_s` ago."""
        again = recheck_no or (recheck_unknown and self._known is not None and (
            self._known.safety_checker is None or self._known.idempotency_keys is None))
        stale = self._known is None or (again and self.clock() - self._asked_at >= self.recheck_s)
        if stale:
            self._known = await probe_capabilities(self.choice, self.base_url, self.http)
            self._asked_at = self.clock()
        assert self._known is not None
        return self._known


async def probe_capabilities(choice: BackendChoice, base_url: str, http: httpx.AsyncClient) -> Capabilities:
    """Hosted fal does everything its schema offers; our worker says what it can in `/health` (a worker that
    can't do something it is asked still refuses it with a 422 naming the setting)."""
    if choice.hosted:  # fal's documentation promises nothing about a repeated submit
        return Capabilities(expand_prompt=True, safety_checker=True, idempotency_keys=False)
    try:
        response = await http.get(f"{base_url.rstrip('/')}/health", timeout=10.0)
        health = response.json()
    except (httpx.HTTPError, ValueError):
        log.warning("could not read the worker's /health at %s: assuming it can't expand prompts", base_url)
        return Capabilities()
    if not isinstance(health, dict):
        return Capabilities(idempotency_keys=False)
    checker = health.get("safety_checker")
    pipeline = health.get("pipeline")
    return Capabilities(expand_prompt=health.get("expand_prompt") is True,
                        safety_checker=checker if isinstance(checker, bool) else None,
                        pipeline=pipeline if isinstance(pipeline, str) else None,
                        idempotency_keys=health.get("idempotency_keys") is True)


#: the pipeline that only fills from the picture's own pixels (services/worker/classic.py): nothing new to check
NON_GENERATIVE = "classic"


def fit_to_policy(choice: BackendChoice, capabilities: Capabilities, where: str) -> BackendChoice:
    """The backend as the bot will use it under its moderation policy: results in ordinary channels are checked by
    the backend's safety checker (fal's default). A worker without one can still serve if it paints nothing new
    (the classic fill: then, like the embedded default, results go unchecked, and the log says so loudly); a
    generative one without a checker can't, and the bot won't start on it (`StartupError`) rather than have every
    job refused."""
    where = shown_url(where)
    if capabilities.safety_checker is None:
        log.warning("the backend at %s didn't say whether it has a safety checker (/health): asking for it as fal's "
                    "default does, and asking the backend again before each job until it says", where)
        return replace(choice, safety_checker=True, checker_known=False)
    if capabilities.safety_checker:
        return replace(choice, safety_checker=True, checker_known=True)
    if capabilities.pipeline == NON_GENERATIVE:
        log.warning("THE BACKEND AT %s HAS NO SAFETY CHECKER: results are NOT checked for NSFW content, in any "
                    "channel, whatever servers' settings say. Its classic pipeline only fills from the picture's "
                    "own pixels; for a generative pipeline, set SAFETY_CHECKER_PATH on the worker.", where)
        return replace(choice, safety_checker=False, checker_known=True)
    raise StartupError(f"the worker at {where} runs the {capabilities.pipeline or 'unknown'} pipeline without a "
                       "safety checker, so it can't check results as servers require: set SAFETY_CHECKER_PATH "
                       "on the worker (a StableDiffusionSafetyChecker folder) and restart it")


def shown_url(url: str) -> str:
    """A URL as logs and messages may show it: without any user:password in it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")
                                     if parts.hostname else ""))


def choose_backend(config: BotConfig) -> BackendChoice:
    if config.fal_key is not None:
        return BackendChoice("fal", config.fal_queue_base, config.fal_key, kind="fal")
    if config.worker_url:
        return BackendChoice("worker", config.worker_url, config.worker_key, kind="worker")
    return BackendChoice("embedded", None, None, kind="embedded")


class EmbeddedWorker:
    """The worker app served on the bot's own event loop, bound to 127.0.0.1 (`async with`, or start/stop)."""

    def __init__(self) -> None:
        self._server: LoopServer | None = None
        self.base_url = ""
        self.description = ""

    async def start(self) -> str:
        from services.worker.app import create_app
        from services.worker.config import WorkerConfig

        config = WorkerConfig()
        if config.model_path is None:
            config = config.model_copy(update={"pipeline": "classic"})
        config = config.model_copy(update={"worker_key": None, "host": "127.0.0.1"})
        self._server = LoopServer(create_app(config))
        self.base_url = await self._server.start()
        self.description = f"{config.pipeline} pipeline" + (f" ({config.model_path})" if config.model_path else "")
        log.warning("NO BACKEND CONFIGURED (neither FAL_KEY nor WORKER_URL): running the worker inside the bot at "
                    "%s with the %s. Set FAL_KEY or WORKER_URL for SDXL.", self.base_url, self.description)
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
