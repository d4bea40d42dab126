"""The web mask painter: a real Chromium paints a stroke and submits; links are personal, single-use, expiring.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` package (browser downloads are impossible
here, so Playwright drives the system Chromium). The browser test skips with a reason when they are missing;
the link tests need no browser.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tests.conftest import BotEnv
from tests.helpers.bot_env import (
    ALICE,
    KEY,
    PAINTER_PUBLIC,
    PLACE,
    bot_config,
    ephemeral_text,
    link_url,
    result_message,
    running_bot,
)
from tests.helpers.discord_harness import Driver, FakeDiscord
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo

ALICE_ID = int(ALICE["id"])
#: what a browser on the painter's page sends with its submit (the public address's origin)
FROM_PAGE = {"Origin": PAINTER_PUBLIC}

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it where apt works"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in the [dev] extra)"
    return None


async def _ask_for_link(fake: FakeDiscord, driver: Driver, size: tuple[int, int] = (320, 240),
                        prompt: str = "a red balloon") -> tuple[str, bytes]:
    image = encode(photo(*size), "PNG")
    upload = fake.upload(PLACE.channel_id, "photo.png", image, "image/png")
    record = await driver.slash(ALICE, "inpaint", image=upload, prompt=prompt)
    assert "paint the area to change on this page" in ephemeral_text(record)
    assert "works once, for 30 minutes" in ephemeral_text(record)
    return link_url(record, driver.bot), image


def _painted_mask(width: int, height: int, box: tuple[int, int, int, int]) -> str:
    from services.images import to_data_uri

    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return to_data_uri(encode(mask), "image/png")


async def _post(client: httpx.AsyncClient, url: str, prompt: str, box: tuple[int, int, int, int],
                headers: dict[str, str] = FROM_PAGE) -> httpx.Response:
    """Submit `prompt` and a 320×240 mask painted over `box`, as the page does (from its origin)."""
    return await client.post(f"{url}/submit", headers=headers, json={"prompt": prompt,
                                                                     "mask": _painted_mask(320, 240, box)})


@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
async def test_chromium_paints_a_stroke_and_submits(discord_env: BotEnv) -> None:
    from playwright.async_api import async_playwright

    bot, fake, driver = discord_env
    local, _ = await _ask_for_link(fake, driver)
    # the browser opens the link as users do, at the public address (so its submit carries that origin), which
    # Chromium resolves to the painter on loopback
    assert bot.services.painter is not None
    local_base = bot.services.painter.local_url
    url = PAINTER_PUBLIC + local.removeprefix(local_base)
    served = urlsplit(local_base).netloc
    resolve = f"--host-resolver-rules=MAP {urlsplit(PAINTER_PUBLIC).hostname} {served}, MAP elsewhere.example {served}"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, resolve])
        try:
            page = await browser.new_page(viewport={"width": 900, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            first = await page.goto(url)
            assert first is not None and first.headers["cache-control"] == "no-store"
            await page.wait_for_selector("#app[data-ready='1']")
            # reopened later from another site (Discord in a browser tab): the same browser still holds the link
            await page.goto("http://elsewhere.example/painter/static/painter.css")
            await page.set_content(f'<a id="again" href="{url}">the painter link</a>')
            await page.click("#again")
            await page.wait_for_selector("#app[data-ready='1']")
            assert await page.input_value("#prompt") == "a red balloon"  # pre-filled from /inpaint
            assert await page.is_disabled("#submit")  # nothing painted yet
            box = await page.locator("#overlay").bounding_box()
            assert box is not None
            # a horizontal stroke across the middle third of the image, at 40% of its height
            y = box["y"] + box["height"] * 0.4
            await page.mouse.move(box["x"] + box["width"] * 0.33, y)
            await page.mouse.down()
            for step in range(1, 21):
                await page.mouse.move(box["x"] + box["width"] * (0.33 + 0.34 * step / 20), y)
            await page.mouse.up()
            # undo and redo are real: the stroke goes and comes back
            await page.click("#undo")
            assert "Nothing painted yet" in await page.inner_text("#coverage")
            await page.click("#redo")
            assert "will be repainted" in await page.inner_text("#coverage")
            await page.fill("#prompt", "a red balloon, sunset light")
            DOCS.mkdir(exist_ok=True)
            await page.screenshot(path=str(DOCS / "mask-painter.png"))
            await page.click("#submit")
            await page.wait_for_selector("#status.ok")
            assert "Queued as job #1" in await page.inner_text("#status")
            assert not errors, errors
        finally:
            await browser.close()

    await result_message(fake, 1, bot)
    job = await bot.services.store.jobs.get(1)
    assert job.input["prompt"] == "a red balloon, sunset light"
    mask = Image.open(io.BytesIO((await bot.services.store.jobs.blobs(1))["mask"].data)).convert("L")
    assert mask.size == (320, 240)
    row = int(240 * 0.4)
    assert mask.getpixel((160, row)) == 255  # on the stroke
    assert mask.getpixel((int(320 * 0.4), row)) == 255 and mask.getpixel((int(320 * 0.6), row)) == 255
    assert mask.getpixel((10, 10)) == 0 and mask.getpixel((160, 230)) == 0  # far from it
    events = [e.message for e in await bot.services.store.jobs.events(1)]
    assert "mask painted in the web painter" in events


async def test_links_are_personal_single_use_and_expire(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    url, _ = await _ask_for_link(fake, driver)
    async with httpx.AsyncClient() as owner, httpx.AsyncClient() as stranger:
        page = await owner.get(url)
        assert page.status_code == 200 and "Paint what to change" in page.text
        assert any(c.startswith("painter_") for c in owner.cookies)
        image = await owner.get(f"{url}/image")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

        # someone else with the same link: refused, and never sees the image
        assert (await stranger.get(url)).status_code == 403
        assert "opened in another browser" in (await stranger.get(url)).text
        assert (await stranger.get(f"{url}/image")).status_code == 403

        # forged: another signature, or another session id
        forged = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
        assert (await owner.get(forged)).status_code == 403
        assert "This link isn&#x27;t valid." in (await owner.get(forged)).text  # (HTML-escaped)

        # a fixable mistake (an empty mask) is refused but keeps the link usable
        empty = await _post(owner, url, "x", (0, 0, 0, 0))
        assert empty.status_code == 400 and "The mask is empty" in empty.json()["error"]
        ok = await _post(owner, url, "a kite", (50, 50, 150, 150))
        assert ok.status_code == 200 and ok.json() == {"job_id": 1}
        # …and then it is used up
        again = await _post(owner, url, "a kite", (50, 50, 150, 150))
        assert again.status_code == 410 and "already used" in again.json()["error"]
        assert (await owner.get(url)).status_code == 410

    await result_message(fake, 1, bot)
    url2, _ = await _ask_for_link(fake, driver)
    assert bot.services.painter is not None
    real = bot.services.painter.clock
    bot.services.painter.clock = lambda: real() + 31 * 60  # past the 30-minute life of the link
    async with httpx.AsyncClient() as owner:
        expired = await owner.get(url2)
    assert expired.status_code == 410 and "expired" in expired.text


async def test_painter_submit_goes_through_moderation(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    url, _ = await _ask_for_link(fake, driver)
    async with httpx.AsyncClient() as owner:
        await owner.get(url)
        blocked = await _post(owner, url, "a nude statue", (0, 0, 100, 100))
    assert blocked.status_code == 400 and "blocked by this server's filters" in blocked.json()["error"]
    from services.job_state import JobStatus

    (stored,) = await bot.services.store.jobs.with_status([JobStatus.BLOCKED])
    assert stored.error == "Blocked: default word 'nude' in the prompt"


async def test_painter_page_has_no_inline_code(discord_env: BotEnv) -> None:
    """The page is served with a strict Content-Security-Policy, so nothing inline would run."""
    _, fake, driver = discord_env
    url, _ = await _ask_for_link(fake, driver)
    async with httpx.AsyncClient() as owner:
        page = await owner.get(url)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and "onclick" not in page.text and "<style>" not in page.text


@pytest.mark.parametrize("public_url", [None, "http://127.0.0.1:8765", "http://localhost:8765",
                                        "http://0.0.0.0:8765", "http://[::1]:8765"])
async def test_no_link_nobody_could_open(tmp_path: Path, public_url: str | None) -> None:
    """Without PAINTER_PUBLIC_URL (or with one only this machine can open) no painter link is offered: the user
    reads the other ways to make a mask, and who can set the painter up."""
    async with FalTestServer(key=KEY) as server:
        fake = FakeDiscord()
        with fake.installed():
            config = bot_config(tmp_path, server, painter_public_url=public_url, painter_host="0.0.0.0")
            async with running_bot(config, fake) as (bot, driver):
                image = fake.upload(PLACE.channel_id, "photo.png", encode(photo(320, 240), "PNG"), "image/png")
                record = await driver.slash(ALICE, "inpaint", image=image, prompt="a red balloon")
                said = ephemeral_text(record)
                assert "No mask was attached" in said and "`mask_colour`" in said and "transparency" in said
                assert "`PAINTER_PUBLIC_URL`" in said and "paint the area" not in said
                assert not [c for m in record.followups for row in m.components for c in row["components"]
                            if c.get("style") == 5]  # no link button
                assert await bot.services.store.jobs.for_user(ALICE_ID) == []

                mask = fake.upload(PLACE.channel_id, "m.png", encode(box_mask((320, 240), (10, 10, 90, 90))),
                                   "image/png")
                await driver.slash(ALICE, "inpaint", image=image, mask=mask, prompt="a kite")
                result = await result_message(fake, 1, bot)
                vary = await driver.click(ALICE, result, "inpaint:region:1")
                assert "Inpaint this image" in ephemeral_text(vary) and "`PAINTER_PUBLIC_URL`" in ephemeral_text(vary)


def test_which_addresses_users_can_open() -> None:
    from services.painter.links import reachable_by_users

    for url in ("https://paint.example.com", "http://192.168.1.20:8765", "http://10.0.0.5", "http://[2001:db8::1]"):
        assert reachable_by_users(url), url
    for url in ("", "http://127.0.0.1:8765", "http://127.1.2.3", "http://localhost", "http://app.localhost:80",
                "http://0.0.0.0:8765", "http://[::]:8765", "http://[::1]", "http://localhost.", "http://127.1",
                "http://2130706433", "http://0", "http://[::ffff:127.0.0.1]"):
        assert not reachable_by_users(url), url
