"""The bot-wide daily spending budget: with hosted fal every job costs the operator money, so the bot as a whole
(all servers together) may spend at most so much a day; past it, jobs are refused until the UTC day resets.

**The unit is the megapixel-step**: one denoising step over one megapixel (10⁶ pixels) of one output image.

    cost = width × height / 10⁶ × num_inference_steps × num_images

hosted fal bills `fal-ai/fast-sdxl/inpainting` by the GPU time a request takes (its model page lists the price
"per compute seconds"; fal's pricing documentation, https://docs.fal.ai/documentation/model-apis/pricing, says
models without a fixed per-output price fall back to per-second billing by machine type, and that only
successful outputs are billed). SDXL's GPU time grows with the pixels denoised, the steps and the images, so their
product is what a job's bill is proportional to; it is known from the request alone, so admission can count it
before anything runs. `strength` is left out: it shortens an image-to-image run to about steps × strength
(diffusers' `get_timesteps`), but the fixed work per request (text encoders, VAE, safety checker) is not counted
either, so steps alone is the simpler and safer upper bound.

**The default**, with `FAL_KEY`, is 25,000 megapixel-steps a day. fal's guide to this model
(https://docs.fal.ai/fast-sdxl/) gives "~$0.0025" for a typical inference: 1024×1024 at the default 25 steps, one
image, so 26.2 megapixel-steps, about $0.0000954 each. The default is then about 950 such jobs, or $2.38 a day
(about $72 a month): room for a busy small community, while a runaway script or an abusive user can't cost more
than that. (fal's prices change: the model's page has today's.)
`SPEND_DAILY_BUDGET` changes it (0 turns it off); with our own worker there is no budget unless it is set.
`SPEND_PRICE_PER_UNIT` (e.g. 0.0000954 for the figure above) and `SPEND_CURRENCY` show it as money in /quota.

**What counts**: admission checks the day's total (a read of one row, the day's running total), so a job past
the budget is refused before its images are downloaded; then, just before the job is created, its exact cost is
reserved: the total is read and the reservation written in one write transaction, so two admissions at the edge
can't both take the last of the budget. The reservation is tied to the job, and the job's state decides whether
it counts: a job blocked, failed or cancelled before it was ever submitted to the backend costs nothing (a
trigger on the jobs table takes it off the day's total in the same transaction as that change, whichever code
path made it; the dispatcher needs no hook). A job that reached the backend counts, whatever happened after (fal
may have billed it), and so does one that may have: a submit whose answer was lost keeps its `submit_key`. A
reservation whose job was never created is given back; if the bot dies in between, it stays counted (over rather
than under). Everything is in SQLite (`services/store/spend.py`), so a restart loses nothing. The NSFW
estimator's request for an upload (`services/upload_check.py`) is not counted.

**With a backend pool** holding hosted fal and workers of our own (`BACKENDS`), the budget is on by default and
only jobs hosted fal runs count: a job is reserved at admission as above (it may go to fal), gives its reservation
back when it is submitted to a worker, and counts again should a later submit (its worker lost it) go to fal.

**The moderation log** of a server where a job was refused by the budget says so once a UTC day.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.config import BotConfig
from services.modlog import ModerationLog
from services.refusals import Refused, SpendBudgetReached, amount
from services.schema import IMAGE_SIZE_PRESETS, InpaintInput
from services.store.spend import SpendLedger

UNIT = "megapixel-steps"
PIXELS_PER_MEGAPIXEL = 1_000_000
DAY_S = 86400
#: The daily budget with hosted fal when none is set: about 950 jobs of 1024² × 25 steps, $2.38 (see above).
DEFAULT_HOSTED_DAILY_UNITS = 25_000.0
#: The modlog action for "the budget refused a job here today".
MODLOG_ACTION = "spend_budget_reached"

_FIELDS = InpaintInput.model_fields
_DEFAULT_SIZE = IMAGE_SIZE_PRESETS[str(_FIELDS["image_size"].default)]


def units(width: int, height: int, steps: int, images: int) -> float:
    """What a request costs, in megapixel-steps."""
    return width * height / PIXELS_PER_MEGAPIXEL * steps * images


def request_units(request: InpaintInput) -> float:
    """What a validated request costs: its output size (the crop's working size, with crop and stitch), steps and
    images."""
    width, height = request.size_pixels()
    return units(width, height, request.num_inference_steps, request.num_images)


def _positive_int(value: Any, default: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def estimated_units(options: Mapping[str, Any]) -> float:
    """What options not validated yet will cost (admission): the size asked (a preset, {width, height}, or fal's
    default square_hd, which is also the working size crop and stitch aims for), fal's defaults for steps and
    images. Anything invalid is left to validation, which refuses it later; here it counts as the default."""
    size = options.get("image_size")
    width, height = _DEFAULT_SIZE
    if isinstance(size, str) and size in IMAGE_SIZE_PRESETS:
        width, height = IMAGE_SIZE_PRESETS[size]
    elif isinstance(size, Mapping):
        width, height = _positive_int(size.get("width"), width), _positive_int(size.get("height"), height)
    steps = _positive_int(options.get("num_inference_steps"), int(_FIELDS["num_inference_steps"].default))
    images = _positive_int(options.get("num_images"), int(_FIELDS["num_images"].default))
    return units(width, height, steps, images)


def utc_day(now: float) -> int:
    """The UTC day `now` falls in, as a number (days since 1970-01-01; days start at UTC midnight)."""
    return int(now // DAY_S)


class SpendPolicy(BaseModel):
    """The budget: megapixel-steps a UTC day for the whole bot (None: no budget), and optionally a price per unit
    to show it as money."""

    model_config = ConfigDict(frozen=True)

    daily_units: float | None
    price_per_unit: float | None = None
    currency: str = "USD"

    @classmethod
    def from_config(cls, config: BotConfig, *, hosted: bool) -> SpendPolicy:
        """`SPEND_DAILY_BUDGET` when set (0: none); otherwise the default with hosted fal, and none with a worker."""
        budget = config.spend_daily_budget
        if budget is None:
            budget = DEFAULT_HOSTED_DAILY_UNITS if hosted else None
        return cls(daily_units=budget or None, price_per_unit=config.spend_price_per_unit,
                   currency=config.spend_currency)

    def money(self, value: float) -> str | None:
        """`value` units as money ("0.12 USD"), or None without a price."""
        if self.price_per_unit is None:
            return None
        cost = value * self.price_per_unit
        return f"{cost:,.2f} {self.currency}" if cost >= 1 or cost == 0 else f"{cost:.3g} {self.currency}"


@dataclass(frozen=True)
class SpendDay:
    """The bot's spending today, against its budget."""

    used: float
    limit: float | None  # None: no budget
    resets_at: float
    policy: SpendPolicy

    @property
    def left(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.used)

    def summary(self) -> str:
        """"1,234 of 25,000 megapixel-steps used (0.118 of 2.39 USD)", as /quota shows it."""
        limit = f" of {amount(self.limit)}" if self.limit is not None else ""
        text = f"{amount(self.used)}{limit} {UNIT} used"
        used_money = self.policy.money(self.used)
        if used_money is not None:
            limit_money = self.policy.money(self.limit) if self.limit is not None else None
            text += f" ({used_money.rsplit(' ', 1)[0]} of {limit_money})" if limit_money else f" ({used_money})"
        return text


@dataclass
class SpendHold:
    """A job's cost, reserved before the job is created: `attach` it to the job once it exists, or `release` it
    if the job never comes to be. Without a ledger row (nothing to reserve) both do nothing."""

    ledger: SpendLedger
    spend_id: int | None
    units: float

    async def attach(self, job_id: int) -> None:
        if self.spend_id is not None:
            await self.ledger.attach(self.spend_id, job_id)

    async def release(self) -> None:
        if self.spend_id is not None:
            await self.ledger.release(self.spend_id)
            self.spend_id = None


class SpendBudget:
    """Checks and records the bot-wide spending. Every job is recorded, budget or not, so a budget turned on
    during a day counts what that day already ran."""

    def __init__(self, ledger: SpendLedger, policy: SpendPolicy, modlog: ModerationLog, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.policy = policy
        self.modlog = modlog
        self.clock = clock

    async def today(self) -> SpendDay:
        now = self.clock()
        day = utc_day(now)
        return SpendDay(used=await self.ledger.used(day), limit=self.policy.daily_units,
                        resets_at=(day + 1) * DAY_S, policy=self.policy)

    async def check(self, guild_id: int | None, cost: float) -> None:
        """Refuse a job of `cost` that today's budget can't pay for (a read: `reserve` is what counts)."""
        if self.policy.daily_units is None:
            return
        now = self.clock()
        used = await self.ledger.used(utc_day(now))
        if used + cost > self.policy.daily_units:
            await self._refuse(guild_id, cost, used, now)

    async def reserve(self, guild_id: int | None, cost: float) -> SpendHold:
        """Record a job of `cost` about to be created, or refuse it if today's budget can't pay for it."""
        now = self.clock()
        limit = self.policy.daily_units if self.policy.daily_units is not None else float("inf")
        reserved = await self.ledger.reserve(utc_day(now), cost, limit, guild_id=guild_id, now=now)
        if reserved.spend_id is None:
            await self._refuse(guild_id, cost, reserved.used_before, now)
        return SpendHold(self.ledger, reserved.spend_id, cost)

    async def ran_on(self, job_id: int, guild_id: int | None, request: Mapping[str, Any], *, hosted: bool) -> None:
        """A pool with hosted fal and workers of our own (`services/backend_pool.py`): a job submitted to a worker
        gives its reservation back; one submitted to hosted fal counts (again, if an earlier run on a worker gave it
        back), today."""
        if hosted:
            now = self.clock()
            await self.ledger.charge_job(job_id, utc_day(now), estimated_units(request), guild_id=guild_id, now=now)
        else:
            await self.ledger.release_job(job_id)

    async def _refuse(self, guild_id: int | None, cost: float, used: float, now: float) -> None:
        assert self.policy.daily_units is not None
        day = utc_day(now)
        resets_at = float((day + 1) * DAY_S)
        if guild_id is not None and await self.ledger.first_notice(guild_id, day, now=now):
            money = self.policy.money(used)
            await self.modlog.record(guild_id, MODLOG_ACTION, detail=(
                f"The bot-wide daily budget (all servers together) can't pay for more jobs today: "
                f"{amount(used)} of {amount(self.policy.daily_units)} {UNIT} used"
                f"{f' ({money})' if money else ''}. Jobs are refused until it resets at 00:00 UTC. "
                f"Said once a day, at the first job refused here."))
        raise Refused(SpendBudgetReached(needed=cost, left=max(0.0, self.policy.daily_units - used),
                                         limit=self.policy.daily_units, resets_at=resets_at, unit=UNIT))
