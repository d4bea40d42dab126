"""From a pipeline's images to a request's output body (`InpaintOutput`): the safety checker's verdict on each image
(flagged images are replaced with black), the encoding the request asked for, and where each image is found — a
data URI with `sync_mode`, else a file this worker serves at `/files/{request id}/{name}` (kept on disk, in the
worker's storage, until the request expires). The output's `prompt` is the one the images were made from (the
expanded one, when the request asked for `expand_prompt`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from PIL import Image

from services.images import CONTENT_TYPES, encode_image, to_data_uri
from services.schema import InpaintOutput, OutputImage
from services.worker.records import InpaintRecord
from services.worker.safety import SafetyChecker
from services.worker.storage import RequestStorage

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
FILE_EXTENSIONS = {"jpeg": "jpg", "png": "png"}


async def build_output(record: InpaintRecord, images: list[Image.Image], safety: SafetyChecker | None,
                       storage: RequestStorage, *, flags: list[bool] | None = None) -> dict[str, Any]:
    """The output body for `record`'s images: safety-checked when the request asks for it (with `flags`, the
    verdicts a batch check already gave: `check_batch`), then encoded (both in threads). Encoded files are written
    to `storage`; the record has their paths."""
    nsfw = [False] * len(images)
    if record.input.enable_safety_checker:
        assert safety is not None, "requests needing the checker are refused at submit without one"
        nsfw, images = await check_safety(record, images, safety, flags=flags)
    return await asyncio.to_thread(encode_output, record, images, nsfw, storage)


async def check_batch(records: list[InpaintRecord], outputs: list[list[Image.Image]],
                      safety: SafetyChecker | None) -> list[list[bool] | None]:
    """The safety checker's flags for every image of a pipeline batch whose request asks for the check, in one
    checker call (in a thread); None for the requests that don't ask, or for all when the call failed (each request
    then checks its own images, and fails alone when that fails too)."""
    wanted = [i for i, record in enumerate(records) if record.input.enable_safety_checker and not
              record.cancel_requested]
    verdicts: list[list[bool] | None] = [None] * len(records)
    if safety is None or not wanted:
        return verdicts
    images = [image for i in wanted for image in outputs[i]]
    try:
        flags = await asyncio.to_thread(safety, images)
    except Exception:
        log.exception("the safety check of a batch failed; checking its requests one by one")
        return verdicts
    start = 0
    for i in wanted:
        verdicts[i] = flags[start:start + len(outputs[i])]
        start += len(outputs[i])
    return verdicts


async def check_safety(record: InpaintRecord, images: list[Image.Image], safety: SafetyChecker, *,
                       flags: list[bool] | None = None) -> tuple[list[bool], list[Image.Image]]:
    """The checker's flag per image (given as `flags`, or asked now), and the images with each flagged one
    replaced by black."""
    if record.input.safety_checker_version == "v2":
        record.add_log("safety checker v2 is not installed on this worker; using v1")
    if flags is None:
        flags = await asyncio.to_thread(safety, images)
    if any(flags):
        record.add_log(f"safety checker flagged {sum(flags)} of {len(flags)} image(s); replaced with black",
                       "WARN")
    checked = [Image.new("RGB", im.size, (0, 0, 0)) if flag else im for im, flag in zip(images, flags, strict=True)]
    return flags, checked


def encode_output(record: InpaintRecord, images: list[Image.Image], nsfw: list[bool],
                  storage: RequestStorage) -> dict[str, Any]:
    """Encode the images in the requested format, write the files, and build the output body (CPU work and
    blocking writes: call it in a thread)."""
    fmt = record.input.format
    content_type = CONTENT_TYPES[fmt]
    outputs = []
    for i, image in enumerate(images):
        data = encode_image(image, fmt, quality=JPEG_QUALITY)
        if record.input.sync_mode:
            url = to_data_uri(data, content_type)
        else:
            name = f"{i}.{FILE_EXTENSIONS[fmt]}"
            record.files[name] = (storage.write_file(record.id, name, data), content_type)
            url = f"{record.base_url}/files/{record.id}/{name}"
        outputs.append(OutputImage(url=url, width=image.width, height=image.height, content_type=content_type))
    timings = {"inference": record.inference_time or 0.0, "total": record.running_for_s()}
    output = InpaintOutput(images=outputs, timings=timings, seed=record.seed, has_nsfw_concepts=nsfw,
                           prompt=record.prompt)
    return output.model_dump(mode="json")
