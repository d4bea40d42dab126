"""Canvas expansion: outpainting, Zoom Out and Pan keep the picture's pixels bit for bit and fill only the new area,
through the same launch, crop and stitch as every job."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.container import Services, build_services
from services.images import ImageInputError, PreparedInputs
from services.job_state import JobStatus
from services.launch import Launched, NewImages, from_result
from services.outpaint import OVERLAP, Expansion, expand, pan, zoom_out
from services.requester import Requester
from tests.helpers.bot_env import bot_config
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import photo
from tests.helpers.listener import RecordingListener

WHO = Requester(guild_id=1, channel_id=2, user_id=10)
LIMIT = 40_000_000


def test_zoom_and_pan_sizes() -> None:
    assert zoom_out((1024, 768), 2.0) == Expansion(left=512, right=512, top=384, bottom=384)
    assert zoom_out((1001, 601), 1.5).canvas((1001, 601)) == (1501, 901)  # 1.5 × the size, to the pixel
    assert pan((1000, 600), "left") == Expansion(left=500)
    assert pan((1000, 600), "down").canvas((1000, 600)) == (1000, 900)


def test_the_canvas_keeps_the_picture_and_masks_the_new_area() -> None:
    picture = photo(400, 300)
    prepared = expand(picture, Expansion(left=100, bottom=50), max_pixels=LIMIT)
    assert prepared.size == (500, 350) and prepared.keep == (100, 0, 400, 300)
    canvas = np.asarray(prepared.image)
    assert (canvas[0:300, 100:500] == np.asarray(picture)).all()  # the picture, untouched
    mask = np.asarray(prepared.mask)
    assert (mask[:, :100 + OVERLAP] == 255).all() and (mask[300 - OVERLAP:, :] == 255).all()  # the new area
    assert (mask[:300 - OVERLAP, 100 + OVERLAP:] == 0).all()  # the picture, shown to the model in full
    with_overlap = np.asarray(expand(picture, Expansion(left=100), max_pixels=LIMIT, overlap=8).mask)
    assert (with_overlap[:, :108] == 255).all() and (with_overlap[:, 108:] == 0).all()
    assert canvas[:, :100].std() > 0  # pre-filled with the picture's colours, not a flat block
    with pytest.raises(ImageInputError, match="megapixels"):
        expand(picture, Expansion(left=200_000), max_pixels=LIMIT)  # 200,400 × 300 = 60 MP
    with pytest.raises(ImageInputError, match="at least one side"):
        expand(picture, Expansion(), max_pixels=LIMIT)


@pytest.fixture
async def env(tmp_path: Path, server: FalTestServer) -> AsyncIterator[tuple[Services, RecordingListener]]:
    async with build_services(bot_config(tmp_path, server, painter_enabled=False)) as built:
        listener = RecordingListener()
        await built.dispatcher.start(listener)
        yield built, listener


async def _finish(built: Services, listener: RecordingListener, source: NewImages) -> tuple[int, Image.Image]:
    outcome = await built.launcher.launch(WHO, {"prompt": "more sea", "strength": 1.0}, source)
    assert isinstance(outcome, Launched)
    await listener.event(outcome.job.id).wait()
    job = await built.store.jobs.get(outcome.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    blob = (await built.store.jobs.blobs(job.id))["output_0"]
    return job.id, Image.open(io.BytesIO(blob.data)).convert("RGB")


async def test_outpaint_then_zoom_out_keeps_every_original_pixel(env: tuple[Services, RecordingListener]) -> None:
    built, listener = env
    picture = photo(640, 480)

    async def prepare() -> PreparedInputs:
        return expand(picture, Expansion(right=200, top=40), max_pixels=LIMIT)

    first, out = await _finish(built, listener, NewImages(prepare, may_draft=False))
    assert out.size == (840, 520)
    result = np.asarray(out).astype(int)
    assert (result[40:520, 0:640] == np.asarray(picture)).all()  # bit for bit, overlap included
    assert np.abs(result[100:500, 700:840] - [40, 120, 200]).max() <= 2  # the new area is the model's
    assert np.abs(result[0:30, 0:640] - [40, 120, 200]).max() <= 2

    zoomed_id, zoomed = await _finish(built, listener, from_result(
        built.store, first, lambda image: expand(image, zoom_out(image.size, 2.0), max_pixels=LIMIT)))
    assert zoomed.size == (1680, 1040) and (await built.store.jobs.get(zoomed_id)).parent_job_id == first
    assert (np.asarray(zoomed)[260:780, 420:1260] == np.asarray(out)).all()  # the first result, in the middle
