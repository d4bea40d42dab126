"""Every service the bot runs on, built once, outside discord.py, and closed in reverse order:

    async with build_services(config) as services:
        bot = InpaintBot(config, services)

(the shape of discord.py's `examples/advanced_startup.py`). The store, the HTTP client, the backends (hosted fal,
our worker, or the worker embedded in this process; or a pool of several, `services/backend_pool.py`), the
moderation log, quotas, admission, the dispatcher, the launcher, drafts and the mask painter's web server all
join one `AsyncExitStack`. Tests and benchmarks build this same graph. The Discord layer attaches itself when it
starts: it starts the dispatcher with itself as the listener, and subscribes to the moderation log.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx

from services.admission import Admissions
from services.backend_pool import BackendPool, open_pool
from services.backend_select import BackendChoice
from services.backends.fal_queue import FalQueueClient
from services.config import BotConfig
from services.dispatch import Dispatcher
from services.draft_review import DraftReview
from services.errors import StartupError
from services.images import IntakeLimits
from services.launch import Launcher
from services.modlog import ModerationLog
from services.painter.links import PainterLinks
from services.quotas import Quotas
from services.retention import RetentionCleanup, RetentionPolicy
from services.spend import SpendBudget, SpendPolicy
from services.store import Store
from services.upload_check import UploadCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    config: BotConfig
    store: Store
    http: httpx.AsyncClient
    backend: FalQueueClient  # the first backend's (the only one's, without BACKENDS)
    backend_choice: BackendChoice
    pool: BackendPool
    intake_limits: IntakeLimits
    modlog: ModerationLog
    quotas: Quotas
    admissions: Admissions
    dispatcher: Dispatcher
    launcher: Launcher
    drafts: DraftReview
    painter: PainterLinks | None  # None when the painter is turned off


@asynccontextmanager
async def build_services(config: BotConfig) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(await Store.open(config.database_path))
        except (sqlite3.Error, OSError) as exc:
            raise StartupError(f"the database {config.database_path} can't be opened: {exc} (DATABASE_PATH)") from exc
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)))
        pool = await open_pool(config, http, stack)
        first = pool.first
        limits = IntakeLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
        modlog = ModerationLog(store.modlog)
        spend_policy = SpendPolicy.from_config(config, hosted=pool.hosted)
        log.info("bot-wide spending budget: %s (SPEND_DAILY_BUDGET)", f"{spend_policy.daily_units:g} megapixel-steps "
                 "a UTC day" if spend_policy.daily_units is not None else "none")
        spend = SpendBudget(store.spend, spend_policy, modlog)
        quotas = Quotas(store.usage, spend=spend)
        admissions = Admissions(store, quotas, modlog, backend=first.name, spend=spend)
        upload_check = UploadCheck(store, pool, threshold=config.nsfw_threshold)
        dispatcher = Dispatcher(store, pool, http, modlog, upload_check=upload_check,
                                concurrency=config.dispatch_concurrency, deadline_s=config.backend_total_timeout_s,
                                outage_s=config.backend_outage_s, spend=spend if pool.mixed else None)
        stack.push_async_callback(dispatcher.close)
        store.server_settings.subscribe(dispatcher.settings_changed)
        assert first.probe is not None
        launcher = Launcher(store, admissions, dispatcher, first.choice, first.probe, pool=pool)
        painter = None
        if config.painter_enabled:
            painter = await stack.enter_async_context(PainterLinks(
                store, launcher, limits, host=config.painter_host, port=config.painter_port,
                public_url=config.painter_public_url,
                secret=config.painter_secret.get_secret_value() if config.painter_secret else None,
                ttl_s=config.painter_link_ttl_s))
        await stack.enter_async_context(RetentionCleanup(  # stopped first: a batch in progress rolls back
            store, RetentionPolicy.from_config(config), interval_s=config.retention_interval_s,
            convert_max_bytes=config.retention_convert_max_mb * 1024 * 1024))
        yield Services(config=config, store=store, http=http, backend=first.client, backend_choice=first.choice,
                       pool=pool,
                       intake_limits=limits, modlog=modlog, quotas=quotas, admissions=admissions,
                       dispatcher=dispatcher, launcher=launcher, drafts=DraftReview(store, limits), painter=painter)
