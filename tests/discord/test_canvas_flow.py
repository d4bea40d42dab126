"""/outpaint and the result buttons that expand or repaint a result (Zoom Out, Pan, Vary Region), through the
Discord layer: every posted picture is compared with the one it came from, pixel for pixel."""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from services.images import to_data_uri
from tests.conftest import BotEnv
from tests.helpers.bot_env import (
    ALICE,
    PAINTER_PUBLIC,
    PLACE,
    ephemeral_text,
    link_url,
    message_with,
    result_message,
)
from tests.helpers.discord_harness import FakeMessage
from tests.helpers.imagegen import encode, photo

MODEL = np.array([40, 120, 200])  # what the fal test server paints


def _posted(message: FakeMessage, name: str = "result_0.png") -> np.ndarray:
    picture: np.ndarray = np.asarray(Image.open(io.BytesIO(message.files[name])).convert("RGB")).astype(int)
    return picture


def _model_painted(area: np.ndarray) -> bool:
    return bool(np.abs(area - MODEL).max() <= 2)


async def test_outpaint_then_zoom_out_and_pan(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    upload = fake.upload(PLACE.channel_id, "photo.png", encode(photo(256, 192)), "image/png")
    record = await driver.slash(ALICE, "outpaint", image=upload, left=64, top=32, prompt="more beach")
    assert ephemeral_text(record) == "Queued as job #1: progress is in the channel."
    first = _posted(await result_message(fake, 1, bot))
    assert first.shape == (224, 320, 3)
    assert (first[32:, 64:] == np.asarray(photo(256, 192))).all()  # the upload, bit for bit
    assert _model_painted(first[:32, :]) and _model_painted(first[:, :64])  # the new strips are the model's
    assert (await bot.services.store.jobs.get(1)).input["strength"] == 1.0

    zoom = await driver.click(ALICE, message_with(fake, "inpaint:zoom2:1"), "inpaint:zoom2:1")
    assert ephemeral_text(zoom) == "Zooming out job #1 as job #2."
    zoomed = _posted(await result_message(fake, 2, bot))
    assert zoomed.shape == (448, 640, 3) and (zoomed[112:336, 160:480] == first).all()
    assert (await bot.services.store.jobs.get(2)).parent_job_id == 1

    await driver.click(ALICE, message_with(fake, "inpaint:pan_right:2"), "inpaint:pan_right:2")
    panned = _posted(await result_message(fake, 3, bot))
    assert panned.shape == (448, 960, 3) and (panned[:, :640] == zoomed).all()
    assert _model_painted(panned[:, 700:])


async def test_vary_region_opens_the_painter_on_the_result(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", image=fake.upload(PLACE.channel_id, "p.png", encode(photo(256, 192)),
                                                           "image/png"),
                       mask=fake.upload(PLACE.channel_id, "m.png", encode(_mask((256, 192), (10, 10, 60, 60))),
                                        "image/png"), prompt="a kite", seed=4)
    result = await result_message(fake, 1, bot)
    posted = _posted(result)
    record = await driver.click(ALICE, result, "inpaint:region:1")
    assert "Paint the area of job #1's result to vary on this page." in ephemeral_text(record)
    url = link_url(record, bot)
    async with httpx.AsyncClient() as browser:
        shown = await browser.get(url)
        assert shown.status_code == 200 and "a kite" in shown.text  # the prompt carried over
        image = await browser.get(f"{url}/image")
        assert (np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB")) == posted).all()  # the result
        sent = await browser.post(f"{url}/submit", headers={"Origin": PAINTER_PUBLIC}, json={  # as from the page
            "prompt": "a red kite", "mask": to_data_uri(encode(_mask((256, 192), (150, 100, 220, 170))), "image/png")})
    assert sent.json() == {"job_id": 2}
    child = await bot.services.store.jobs.get(2)
    assert child.parent_job_id == 1 and child.input["prompt"] == "a red kite" and "seed" not in child.input
    varied = _posted(await result_message(fake, 2, bot))
    assert (varied[:90, :] == posted[:90, :]).all()  # the result, repainted only in the new region
    assert _model_painted(varied[110:160, 160:210])


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask
