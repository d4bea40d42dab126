"""fal's NSFW estimator, `fal-ai/imageutils/nsfw`, served with the worker's safety checker: one image in
(`NsfwCheckInput`), the probability that it is NSFW out (`NsfwCheckOutput`).

The bot checks a whole upload with it before it sends only a crop of the upload for inpainting. The image is
fetched and decoded by the same intake code, with the same limits, as the inpainting app's (`services.images`,
`inputs.intake_limits`); decoding and the checker run in threads.

This module runs one check from start to end; the queue (`services.worker.queue`) decides when.
"""

from __future__ import annotations

import asyncio
import logging
import time

from PIL import Image

from services.images import ImageInputError, decode_image, fetch_source, to_rgb
from services.schema import NsfwCheckOutput
from services.worker.config import WorkerConfig
from services.worker.inputs import RequestError, intake_limits, url_policy
from services.worker.pipelines.base import Cancelled
from services.worker.records import CheckRecord
from services.worker.safety import SafetyChecker

log = logging.getLogger(__name__)


def nsfw_probability(flagged: bool) -> float:
    """The v1 checker (diffusers' `StableDiffusionSafetyChecker`) only says whether an image is flagged, not how
    likely it is to be NSFW: a flagged image is reported as probability 1.0, any other as 0.0."""
    return 1.0 if flagged else 0.0


async def fetch_check_image(image_url: str, config: WorkerConfig) -> Image.Image:
    """The image at `image_url` (http(s) URL or data URI), decoded in a thread to RGB. Raises `RequestError` on
    `image_url` for an image the client must fix. The URL is fetched as `inputs.url_policy` allows (downloads make
    their own connections, to checked addresses only)."""
    limits = intake_limits(config)
    try:
        data = await fetch_source(image_url, limits=limits, role="image", policy=url_policy(config))
        return await asyncio.to_thread(lambda: to_rgb(decode_image(data, limits, role="image").image))
    except ImageInputError as exc:
        raise RequestError.from_image_error(exc, "image_url") from exc


async def run_check(record: CheckRecord, config: WorkerConfig, safety: SafetyChecker) -> None:
    """Start `record`, check its image and complete it: with the output, the image's 422, or cancelled."""
    ctx = record.start()
    record.add_log("estimating the NSFW probability with the safety checker (v1: it answers 1.0 for a flagged "
                   "image, 0.0 for any other)")
    try:
        image = await fetch_check_image(record.input.image_url, config)
        ctx.check()
        start = time.perf_counter()
        flagged = (await asyncio.to_thread(safety, [image]))[0]
        record.inference_time = time.perf_counter() - start
    except Cancelled:
        record.fail_cancelled("cancelled before the check")
        return
    except RequestError as exc:
        record.add_log(f"request error: {exc}", "ERROR")
        record.fail(str(exc), exc.error_type, 422, {"detail": exc.detail})
        return
    except Exception as exc:
        log.exception("check %s failed", record.id)
        record.add_log(f"internal error: {type(exc).__name__}: {exc}", "ERROR")
        record.fail_internal(exc)
        return
    if record.cancel_requested:
        record.fail_cancelled("cancelled: its result is discarded")
        return
    record.result = NsfwCheckOutput(nsfw_probability=nsfw_probability(flagged)).model_dump(mode="json")
    record.add_log(f"done in {record.running_for_s():.2f} s: {'flagged' if flagged else 'not flagged'}")
    record.complete()
