"""Moderation stays whole: the whole upload is checked before a crop of it is sent.

With crop and stitch the backend's safety checker sees only the crop, so a picture with NSFW content outside the
mask would come back (untouched, but posted) unchecked. So before the first submission, the whole picture goes to
the backend's NSFW estimator, fal's `fal-ai/imageutils/nsfw` (our worker serves the same app with its safety
checker). A posted result is then made of checked input pixels plus checked output pixels. This also gives
hosted-fal users the upload check hosted inpainting doesn't do.

With a pool of backends (`services/backend_pool.py`) the first backend that is up and has a safety checker is
asked (hosted fal always has one); when none can be asked, the upload goes unchecked, and the job's history says so.

Where the server turned the checker off (age-restricted channels, if it allows that) or the backend has no
estimator, no such check runs: the server's settings decide, and the job's history says so.

The estimator needs the picture's content, not its resolution: it gets a JPEG at most 1024 pixels on a side. Each
picture is checked once, by its content (rerolls and variations reuse the answer). A backend with no estimator
(our worker without a safety checker answers 422 naming it; an unknown app is a 404) leaves the server's existing
policy to decide, and the job's history says the upload went unchecked.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from services.backend_pool import BackendPool
from services.backends.fal_queue import FalNotFoundError, FalQueueClient, FalValidationError
from services.images import encode_image, to_data_uri
from services.job_state import Job
from services.schema import NSFW_APP_ID, NsfwCheckOutput
from services.store import Store

log = logging.getLogger(__name__)

#: At or above this probability an upload is treated as flagged.
DEFAULT_THRESHOLD = 0.5
CHECK_MAX_SIDE = 1024

Verdict = Literal["clean", "flagged", "unchecked"]


@dataclass(frozen=True)
class UploadVerdict:
    verdict: Verdict
    probability: float | None = None
    why: str = ""  # for "unchecked": why no check could run


def check_image(data: bytes) -> str:
    """The picture as the estimator gets it: a JPEG data URI at most `CHECK_MAX_SIDE` pixels on a side."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((CHECK_MAX_SIDE, CHECK_MAX_SIDE), Image.Resampling.BILINEAR)
    return to_data_uri(encode_image(image, "jpeg", quality=90), "image/jpeg")


class UploadCheck:
    def __init__(self, store: Store, backend: FalQueueClient | BackendPool, *,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.store = store
        self.pool = backend if isinstance(backend, BackendPool) else None
        self.backend = backend.first.client if isinstance(backend, BackendPool) else backend
        self.threshold = threshold
        self._asking: dict[str, asyncio.Future[float]] = {}

    async def verdict(self, job: Job) -> UploadVerdict:
        """Whether the job's whole picture may be sent (asked of the backend once per picture)."""
        blobs = await self.store.jobs.blobs(job.id)
        picture = blobs.get("image")
        if picture is None:
            return UploadVerdict("unchecked", why="the picture is no longer stored")
        probability = await self.store.upload_checks.probability(picture.sha256)
        if probability is None:
            estimator = self.backend if self.pool is None else await self.pool.estimator()
            if estimator is None:
                return UploadVerdict("unchecked", why="no backend with an NSFW estimator is up")
            try:
                probability = await self._ask_once(estimator, picture.sha256, picture.data)
            except (FalNotFoundError, FalValidationError) as exc:
                if isinstance(exc, FalValidationError) and not _no_checker(exc):
                    raise
                return UploadVerdict("unchecked", why=f"the backend has no NSFW estimator ({exc})")
        return UploadVerdict("flagged" if probability >= self.threshold else "clean", probability)

    async def _ask_once(self, estimator: FalQueueClient, sha256: str, data: bytes) -> float:
        """Ask about a picture, and store the answer; jobs asking about the same picture at the same time (a burst
        of variations) share one request, which finishes (and is stored) even if the job that started it is
        cancelled meanwhile."""
        pending = self._asking.get(sha256)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(estimator, sha256, data))
            self._asking[sha256] = pending
            pending.add_done_callback(lambda done: self._settle(sha256, done))
        return await asyncio.shield(pending)

    def _settle(self, sha256: str, done: asyncio.Future[float]) -> None:
        self._asking.pop(sha256, None)
        if not done.cancelled() and done.exception() is not None:  # retrieved here: the waiters re-raise it
            log.info("the NSFW estimator failed for %s: %s", sha256[:12], done.exception())

    async def _ask(self, estimator: FalQueueClient, sha256: str, data: bytes) -> float:
        uri = await asyncio.to_thread(check_image, data)
        handle = await estimator.submit({"image_url": uri}, app_id=NSFW_APP_ID)
        probability = (await estimator.follow_as(handle, NsfwCheckOutput)).nsfw_probability
        await self.store.upload_checks.record(sha256, probability)
        return probability


def _no_checker(exc: FalValidationError) -> bool:
    """Our worker's 422 when it has no safety checker to serve the estimator with."""
    return "SAFETY_CHECKER_PATH" in str(exc) or any("SAFETY_CHECKER_PATH" in message for _, message in exc.field_errors)
