"""The bot through discord.py's real interaction path (tests/discord_harness.py) with a real fal-protocol backend
on 127.0.0.1: slash command → progress edits → result with buttons → button presses → restart mid-job."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.config import BotConfig
from services.job_events import log_lines
from services.job_state import JobStatus
from tests.conftest import BotEnv
from tests.helpers.bot_env import (
    ALICE,
    BOB,
    KEY,
    MOD,
    PLACE,
    bot_config,
    ephemeral_text,
    message_with,
    progress_message,
    result_message,
    running_bot,
    uploads,
    wait_for_final_message,
)
from tests.helpers.discord_harness import ALL_PERMISSIONS, FakeDiscord
from tests.helpers.fal_server import EXPANSION, FalTestServer
from tests.helpers.imagegen import encode, photo
from tests.helpers.waits import wait_for, wait_until


async def test_inpaint_end_to_end(discord_env: BotEnv, server: FalTestServer) -> None:
    bot, fake, driver = discord_env
    record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a red boat", seed=5, steps=20,
                                negative_prompt="blurry", format="png")
    assert record.responses[0] == {"type": 5, "data": {"flags": 64}}  # deferred, ephemeral, within the 3 s
    assert ephemeral_text(record) == "Queued as job #1: progress is in the channel."

    result = await result_message(fake, 1, bot)
    job = await bot.services.store.jobs.get(1)
    assert job.status is JobStatus.SUCCEEDED and job.result_message_id == result.id
    # the result: the author mentioned, the image attached, every parameter in the embed, five buttons
    assert result.content == "<@10>"
    assert list(result.files) == ["result_0.png"]
    # the posted picture against the upload, pixel for pixel: the user's size, only the mask (and its 4-pixel
    # feather band) changed, to the backend's colour inside the mask
    posted = np.asarray(Image.open(io.BytesIO(result.files["result_0.png"])).convert("RGB")).astype(int)
    upload = np.asarray(photo(256, 192)).astype(int)
    assert posted.shape == upload.shape  # 256×192, as uploaded
    changed = np.any(posted != upload, axis=2)
    band = np.zeros_like(changed)
    band[48 - 4:96 + 5, 64 - 4:128 + 5] = True  # uploads(): the mask is the box (64, 48)–(128, 96)
    assert changed[48:97, 64:129].all() and not (changed & ~band).any()
    assert np.abs(posted[60:90, 70:120] - [40, 120, 200]).max() <= 2  # the test server paints (40, 120, 200)
    assert result.field("Seed") == "`5`" and result.field("Steps") == "20" and result.field("Backend") == "fal"
    assert result.field("Negative prompt") == "blurry"
    assert job.plan is not None and result.field("Size") == f"256×192 (model {job.plan.sent[0]}×{job.plan.sent[1]})"
    assert result.custom_ids() == [f"inpaint:{a}:1" for a in ("reroll", "vary", "edit", "delete", "params", "zoom15",
                                                              "zoom2", "region", "pan_left", "pan_right", "pan_up",
                                                              "pan_down")]
    assert [len(row["components"]) for row in result.components] == [5, 3, 4]  # three rows of buttons

    # the progress message: posted with the preview, edited with progress, finally marked done without buttons
    progress = progress_message(fake, job.status_message_id)
    await wait_until(lambda: progress.field("Status") == "✅ Done", what="the progress message's final edit")
    assert list(progress.files) == ["preview.jpg"] and progress.edits >= 2
    assert progress.components == []

    # the backend got the crop around the mask at its working size (data URIs built from the stored blobs) and the
    # options the user chose, and was asked for a lossless result
    sent = next(iter(server.requests.values())).input
    assert sent.image_url.startswith("data:image/png;base64,") and sent.mask_url.startswith("data:image/png")
    assert (sent.seed, sent.num_inference_steps, sent.negative_prompt, sent.format) == (5, 20, "blurry", "png")
    assert sent.size_pixels() == job.plan.sent and 0.9e6 < job.plan.sent[0] * job.plan.sent[1] < 1.1e6

    # every state change and backend log line is in SQLite, in order
    events = await bot.services.store.jobs.events(1)
    states = [e.message for e in events if e.kind == "state"]
    assert states == ["queued", "submitted", "running", "succeeded"]
    assert log_lines(events) == ["step 1/3", "step 2/3", "step 3/3"]
    assert any(e.kind == "posted" for e in events)


async def test_buttons_reroll_params_delete(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a lighthouse", seed=9)
    first = await result_message(fake, 1)

    reroll = await driver.click(BOB, first, "inpaint:reroll:1")
    assert "Rerolling job #1 as job #2." in ephemeral_text(reroll)
    await result_message(fake, 2)
    second = await bot.services.store.jobs.get(2)
    assert second.parent_job_id == 1 and second.user_id == 20 and "seed" not in second.input
    jobs = bot.services.store.jobs
    assert (await jobs.blobs(2))["image"].sha256 == (await jobs.blobs(1))["image"].sha256

    params = await driver.click(BOB, first, "inpaint:params:1")
    shown = params.responses[0]["data"]
    assert shown["flags"] & 64 and '"prompt": "a lighthouse"' in shown["content"]
    assert '"crop": [' in shown["content"] and '"picture": [\n    256,\n    192\n  ]' in shown["content"]

    refused = await driver.click(BOB, first, "inpaint:delete:1")
    assert "Only the person who started job #1 or a moderator can delete it." in ephemeral_text(refused)
    assert not first.deleted
    deleted = await driver.click(ALICE, first, "inpaint:delete:1")
    assert "Deleted the result of job #1." in ephemeral_text(deleted) and first.deleted
    # a moderator may delete anyone's result
    result_two = message_with(fake, "inpaint:delete:2")
    await driver.click(MOD, result_two, "inpaint:delete:2", permissions=ALL_PERMISSIONS)
    assert result_two.deleted


async def test_variations_and_edit_modal(discord_env: BotEnv,
                                         server: FalTestServer) -> None:
    bot, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a cat")
    first = await result_message(fake, 1)
    await driver.click(ALICE, first, "inpaint:vary:1")
    variations = await result_message(fake, 2)
    assert len(variations.files) == 4 and (await bot.services.store.jobs.get(2)).input["num_images"] == 4

    shown = await driver.click(ALICE, first, "inpaint:edit:1")
    assert shown.modal is not None and shown.modal["title"] == "Edit job #1"
    done = await driver.submit_modal(ALICE, shown, {"Prompt": "a dog", "Strength (0.01 to 1)": "0.6",
                                                    "Seed (empty = random)": "1234"})
    assert "Re-running job #1 as job #3." in ephemeral_text(done)
    await result_message(fake, 3)
    edited = await bot.services.store.jobs.get(3)
    assert (edited.input["prompt"], edited.input["strength"], edited.input["seed"]) == ("a dog", 0.6, 1234)

    for text in ("lots", "nan", "inf", "1.5"):  # nan would also be a number to Python, and no JSON
        again = await driver.click(ALICE, first, "inpaint:edit:1")  # a submitted modal is gone: open a new one
        bad = await driver.submit_modal(ALICE, again, {"Prompt": "a nude dog", "Strength (0.01 to 1)": text})
        assert "Strength must be a number between 0.01 and 1." in ephemeral_text(bad)
    assert len(await bot.services.store.jobs.for_user(10)) == 3  # not even a blocked job was stored


async def test_cancel_by_author_only(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY, queue_polls=10_000) as slow:  # stays queued at the backend
        fake = FakeDiscord()
        with fake.installed():
            async with running_bot(bot_config(tmp_path, slow), fake) as (bot, driver):
                await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="slow one")
                await wait_until(lambda: bool(slow.requests), what="the submit")
                job = await bot.services.store.jobs.get(1)
                progress = progress_message(fake, job.status_message_id)
                await wait_until(lambda: progress.field("Status", ) is not None and "queue" in (
                    progress.field("Status") or ""), what="the queue position on the progress message")
                refused = await driver.click(BOB, progress, "inpaint:cancel:1")
                assert "Only the person who started job #1" in ephemeral_text(refused)
                ok = await driver.click(ALICE, progress, "inpaint:cancel:1")
                assert "Cancelling job #1" in ephemeral_text(ok)
                await wait_until(lambda: progress.field("Status") == "🚫 Cancelled", what="the cancelled state")
                assert (await bot.services.store.jobs.get(1)).status is JobStatus.CANCELLED
                assert len(slow.hits("cancel")) == 1 and progress.components == []


async def test_user_errors_are_friendly_and_ephemeral(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    text = fake.upload(PLACE.channel_id, "notes.txt", b"hello", "text/plain")
    record = await driver.slash(ALICE, "inpaint", image=text, prompt="x")
    (reply,) = record.responses  # answered at once, not deferred: nothing was downloaded or queued
    assert reply["type"] == 4 and reply["data"]["flags"] & 64
    assert reply["data"]["content"] == "The image `notes.txt` isn't an image (text/plain). Send a PNG, JPEG or WebP."
    assert not any(call[0] == "CDN" for call in fake.calls)  # refused before downloading anything

    huge = fake.upload(PLACE.channel_id, "huge.png", b"x" * 100, "image/png")
    huge["size"] = 200 * 1024 * 1024
    record = await driver.slash(ALICE, "inpaint", image=huge, prompt="x")
    assert "is 200.0 MiB; the limit is 25 MiB" in ephemeral_text(record)

    empty_mask = fake.upload(PLACE.channel_id, "mask.png", encode(Image.new("L", (256, 192), 0)), "image/png")
    record = await driver.slash(ALICE, "inpaint", image=uploads(fake)["image"], mask=empty_mask, prompt="x")
    assert "The mask is empty" in ephemeral_text(record)

    no_mask = await driver.slash(ALICE, "inpaint", image=uploads(fake)["image"], prompt="x")
    assert "paint the area to change on this page" in ephemeral_text(no_mask)  # the web painter's link
    assert await bot.services.store.jobs.for_user(10) == []  # nothing was queued for any of these


async def test_transparent_png_needs_no_mask(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    rgba = photo(256, 192).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (60, 40, 160, 120))
    image = fake.upload(PLACE.channel_id, "cutout.png", encode(rgba), "image/png")
    record = await driver.slash(ALICE, "inpaint", image=image, prompt="a window")
    assert "mask taken from the image's transparent area" in ephemeral_text(record)
    await result_message(fake, 1)
    stored = Image.open(io.BytesIO((await bot.services.store.jobs.blobs(1))["mask"].data))
    assert stored.getpixel((100, 80)) == 255 and stored.getpixel((10, 10)) == 0  # the hole is what gets repainted


async def test_backend_down_becomes_a_failed_job_with_retry(discord_env: BotEnv,
                                                            server: FalTestServer) -> None:
    bot, fake, driver = discord_env
    fault = server.inject("submit", "status", code=503, times=-1, body={"detail": "no runners available"})
    bot.services.backend.retry = type(bot.services.backend.retry)(attempts=2, base_delay_s=0.01, max_delay_s=0.02)
    bot.services.dispatcher.outage_s = 0.3  # waited for this long (BACKEND_OUTAGE_S), then the job fails
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a tree")
    job_msg = await wait_for_final_message(fake, bot, 1, JobStatus.FAILED)
    assert "The backend is unavailable right now" in (job_msg.field("Why") or "")
    assert len(server.hits("submit")) > 2  # asked again while waiting
    job = await bot.services.store.jobs.get(1)
    assert job.submit_key is None  # refused with 503 each time: nothing at the backend to find or cancel
    assert job_msg.custom_ids() == ["inpaint:retry:1", "inpaint:params:1"]

    fault.times = 0  # the backend is back
    retry = await driver.click(ALICE, job_msg, "inpaint:retry:1")
    assert "Retrying job #1 as job #2." in ephemeral_text(retry)
    await result_message(fake, 2)


async def test_restart_mid_job_resumes_and_posts_once(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY, queue_polls=10_000) as server:
        fake = FakeDiscord()
        with fake.installed():
            settings = bot_config(tmp_path, server)
            async with running_bot(settings, fake) as (bot, driver):
                await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="resume me", seed=77)
                await driver.slash(BOB, "inpaint", **uploads(fake), prompt="lost by the backend", seed=78)
                await wait_until(lambda: len(server.requests) == 2, what="both submits")
                await wait_until(lambda: len(server.hits("status")) >= 4, what="polling")
                jobs = bot.services.store.jobs

                async def both_recorded() -> bool:
                    return all([(await jobs.get(1)).backend_request_id, (await jobs.get(2)).backend_request_id])

                await wait_for(both_recorded, what="both submissions recorded")
                first_rid, second_rid = (await jobs.get(1)).backend_request_id, (await jobs.get(2)).backend_request_id
            # the bot is down; meanwhile the backend finishes the first request and forgets the second
            assert first_rid is not None and second_rid is not None
            server.requests[first_rid].queue_polls_left = 0
            del server.requests[second_rid]
            server.queue_polls = 1  # new submissions run promptly now
            async with running_bot(settings, fake) as (bot, driver):
                one = await result_message(fake, 1, bot)
                two = await result_message(fake, 2, bot)
                job_one = await bot.services.store.jobs.get(1)
                assert job_one.backend_request_id == first_rid  # followed, not re-submitted
                job_two = await bot.services.store.jobs.get(2)
                assert job_two.attempts == 2 and job_two.backend_request_id != second_rid  # re-submitted from blobs
                assert "seed: 77" not in one.content and one.field("Seed") == "`77`"
                assert two.field("Seed") == "`78`"
            async with running_bot(settings, fake):  # a third start posts nothing again
                pass
        results = [m for m in fake.channel_messages(PLACE.channel_id) if m.custom_ids()
                   and m.custom_ids()[0].startswith("inpaint:reroll")]
        assert sorted(m.custom_ids()[0] for m in results) == ["inpaint:reroll:1", "inpaint:reroll:2"]


async def test_unposted_result_is_posted_after_restart(tmp_path: Path, server: FalTestServer) -> None:
    fake = FakeDiscord()
    with fake.installed():
        settings = bot_config(tmp_path, server)
        fake.fail_routes[r"POST /channels/\d+/messages"] = 503
        async with running_bot(settings, fake) as (bot, driver):
            fake.fail_routes.clear()
            await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="post me")
            fake.fail_routes[r"POST /channels/\d+/messages"] = 503  # Discord refuses the result post
            await wait_until(lambda: True, what="nothing")
            for _ in range(500):
                if (await bot.services.store.jobs.get(1)).status is JobStatus.SUCCEEDED:
                    break
                await asyncio.sleep(0.01)
            assert (await bot.services.store.jobs.get(1)).result_message_id is None
        fake.fail_routes.clear()
        async with running_bot(settings, fake) as (bot, _):
            await result_message(fake, 1, bot)
            assert (await bot.services.store.jobs.get(1)).result_message_id is not None


async def test_context_menu_with_modal_mask_upload(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    files = uploads(fake)
    posted = fake.user_message(PLACE.channel_id, BOB, [files["image"]])
    shown = await driver.message_command(ALICE, "Inpaint this image", posted)
    assert shown.modal is not None and shown.modal["title"] == "Inpaint this image"
    done = await driver.submit_modal(ALICE, shown, {"Prompt": "a sailboat",
                                                    "Mask (white = repaint)": [files["mask"]]})
    assert "Queued as job #1" in ephemeral_text(done)
    await result_message(fake, 1)
    assert (await bot.services.store.jobs.get(1)).input["prompt"] == "a sailboat"

    nothing = fake.user_message(PLACE.channel_id, BOB, [])
    refused = await driver.message_command(ALICE, "Inpaint this image", nothing)
    assert "That message has no image attachment to inpaint." in ephemeral_text(refused)


async def test_jobs_and_job_commands(discord_env: BotEnv) -> None:
    _, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="first")
    await result_message(fake, 1)
    listing = await driver.slash(ALICE, "jobs")
    embed = listing.responses[0]["data"]["embeds"][0]
    assert "`#1` succeeded" in embed["description"] and listing.responses[0]["data"]["flags"] & 64
    detail = await driver.slash(ALICE, "job", job_id=1)
    history = detail.responses[0]["data"]["embeds"][0]["fields"][0]["value"]
    assert "**state** succeeded" in history and "**log** step 3/3" in history
    other = await driver.slash(BOB, "job", job_id=1)
    assert "isn't yours to look at" in ephemeral_text(other)
    assert "There is no job #99." in ephemeral_text(await driver.slash(ALICE, "job", job_id=99))
    empty = await driver.slash(BOB, "jobs")
    assert "You have no jobs here yet" in ephemeral_text(empty)


async def test_command_definitions_snapshot(discord_env: BotEnv) -> None:
    """Option changes must be deliberate: regenerate with UPDATE_SNAPSHOTS=1 and review the diff."""
    import os

    bot, _, _ = discord_env
    current = sorted((cmd.to_dict(bot.tree) for cmd in bot.tree.get_commands(type=None)),
                     key=lambda c: (c["type"], c["name"]))
    path = Path(__file__).parent / "snapshots" / "commands.json"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert json.loads(path.read_text()) == json.loads(json.dumps(current)), "slash command definitions changed"


def test_private_discord_names_still_exist() -> None:
    from tests.helpers.discord_harness import PRIVATE_NAMES

    for owner, name in PRIVATE_NAMES:
        assert hasattr(owner, name) or name in getattr(owner, "__annotations__", {}) or name == "_connection", \
            f"discord.py no longer has {owner}.{name}"


async def test_no_backend_configured_runs_the_embedded_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Neither FAL_KEY nor WORKER_URL: the worker app runs inside the bot on 127.0.0.1 (classic pipeline), still
    spoken to over HTTP by the same client."""
    for name in ("MODEL_PATH", "PIPELINE", "WORKER_KEY"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level("WARNING")
    settings = BotConfig(_env_file=None, discord_token="fake-token", database_path=tmp_path / "bot.sqlite3",
                        backend_poll_interval_s=0.01, progress_edit_interval_s=0.05, painter_port=0)
    fake = FakeDiscord()
    with fake.installed():
        async with running_bot(settings, fake) as (bot, driver):
            services = bot.services
            assert services.backend_choice.name == "embedded"
            assert services.backend.base_url.startswith("http://127.0.0.1:")
            assert await services.dispatcher._keys_honoured()  # the worker's /health: a submit can be sent again
            assert "NO BACKEND CONFIGURED" in caplog.text
            await driver.slash(ALICE, "inpaint", **uploads(fake, (128, 96)), prompt="ignored by the fill",
                               size="square", format="png")
            result = await result_message(fake, 1)
            job = await bot.services.store.jobs.get(1)
            assert job.backend == "embedded" and job.input["enable_safety_checker"] is False
            posted = Image.open(io.BytesIO(result.files["result_0.png"])).convert("RGB")
            assert posted.size == (128, 96) and job.plan is not None  # the picture's size…
            assert abs(job.plan.sent[0] * job.plan.sent[1] - 512 * 512) < 0.05 * 512 * 512  # …worked at "square"
            changed = np.any(np.asarray(posted) != np.asarray(photo(128, 96)), axis=2)
            assert changed[24:48, 32:64].any() and not changed[:20].any() and not changed[:, :28].any()
            logs = log_lines(await bot.services.store.jobs.events(1, kind="log"))
            assert "classic pipeline: content-aware fill; the prompt is not used" in logs


async def test_secrets_stay_out_of_logs_and_the_database(tmp_path: Path, server: FalTestServer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    fake = FakeDiscord()
    with fake.installed():
        async with running_bot(bot_config(tmp_path, server), fake) as (bot, driver):
            await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="quiet")
            await result_message(fake, 1)
            server.inject("status", "echo_auth", times=1)  # a backend that echoes our key back in an error
            await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="loud backend")
            for _ in range(500):
                if (await bot.services.store.jobs.get(2)).terminal:
                    break
                await asyncio.sleep(0.01)
            assert (await bot.services.store.jobs.get(2)).status is JobStatus.FAILED
    secret = KEY.split(":")[1]
    assert secret not in caplog.text and "fake-token" not in caplog.text
    assert secret.encode() not in _database_bytes(tmp_path)
    assert all(secret not in m.content and secret not in json.dumps(m.embeds) for m in fake.messages.values())


def _database_bytes(folder: Path) -> bytes:
    """The SQLite database and its WAL, byte for byte."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob("bot.sqlite3*")))


async def test_progress_edits_are_throttled(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY, queue_polls=0, progress_logs=20) as busy:
        fake = FakeDiscord()
        with fake.installed():
            settings = bot_config(tmp_path, busy, progress_edit_interval_s=0.5)
            async with running_bot(settings, fake) as (bot, driver):
                await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="chatty backend")
                await result_message(fake, 1, bot)
                job = await bot.services.store.jobs.get(1)
                progress = progress_message(fake, job.status_message_id)
                await wait_until(lambda: progress.field("Status") == "✅ Done", what="the final edit")
                assert len(log_lines(await bot.services.store.jobs.events(1))) == 20  # every line stored…
                elapsed = (job.finished_at or 0) - job.created_at
                # …but the message is edited at most once per interval, plus the final state
                assert progress.edits <= 2 + int(elapsed / 0.5), (progress.edits, elapsed)


def test_results_are_reencoded_to_fit_the_upload_limit() -> None:
    from cogs.render import result_embed, result_files
    from services.blob import Blob
    from services.job_state import Job
    from services.schema import InpaintOutput, OutputImage

    big = encode(photo(1024, 1024), "PNG")
    blobs = [Blob(big, "image/png") for _ in range(3)]
    roomy = result_files(blobs, 50 * 1024 * 1024)
    assert [f.filename for f in roomy.files] == ["result_0.png", "result_1.png", "result_2.png"] and not roomy.note
    tight = result_files(blobs, 3 * len(big) // 2)
    assert all(f.filename.endswith(".jpg") for f in tight.files)
    assert tight.note.startswith("Re-encoded as JPEG to fit this server's")
    sizes = [len(f.fp.read()) for f in tight.files]
    assert sum(sizes) <= 0.95 * 3 * len(big) // 2
    tiny = result_files(blobs, 200_000)
    data = [f.fp.read() for f in tiny.files]
    assert Image.open(io.BytesIO(data[0])).width < 1024 and sum(len(d) for d in data) <= 190_000
    assert "at 35% of its size" in tiny.note or "at 50% of its size" in tiny.note
    # the embed shows the attachment that was really sent (not a .png that was re-encoded away)
    job = Job(id=1, guild_id=1, channel_id=2, user_id=3, status=JobStatus.SUCCEEDED, status_message_id=None,
              parent_job_id=None, backend="fal", backend_request_id=None, status_url=None, response_url=None,
              cancel_url=None, input={"prompt": "p"}, result=None, error=None, attempts=1, created_at=0.0,
              updated_at=0.0, submitted_at=None, started_at=None, finished_at=None)
    output = InpaintOutput(images=[OutputImage(url="stored", width=1024, height=1024, content_type="image/png")],
                           timings={}, seed=1, has_nsfw_concepts=[False], prompt="p")
    embed = result_embed(job, output, tight).to_dict()
    assert embed["image"]["url"] == "attachment://result_0.jpg"
    assert any(f["name"] == "Note" and f["value"] == tight.note for f in embed["fields"])


async def test_buttons_on_old_messages_work_after_a_restart(tmp_path: Path, server: FalTestServer) -> None:
    fake = FakeDiscord()
    with fake.installed():
        settings = bot_config(tmp_path, server)
        async with running_bot(settings, fake) as (bot, driver):
            await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="before the restart", seed=3)
            old = await result_message(fake, 1, bot)
        async with running_bot(settings, fake) as (bot, driver):  # a new process: no views in memory
            params = await driver.click(BOB, old, "inpaint:params:1")
            assert "before the restart" in ephemeral_text(params)
            await driver.click(BOB, old, "inpaint:reroll:1")
            await result_message(fake, 2, bot)
            assert (await bot.services.store.jobs.get(2)).parent_job_id == 1


async def test_expand_prompt_where_the_backend_can_and_a_clear_no_where_it_cant(discord_env: BotEnv,
                                                                               tmp_path: Path) -> None:
    bot, fake, driver = discord_env  # hosted fal (the test server): it expands prompts
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat", expand_prompt=True)
    result = await result_message(fake, 1, bot)
    assert (await bot.services.store.jobs.get(1)).input["expand_prompt"] is True
    assert result.embeds[0]["description"] == "a boat" + EXPANSION  # the prompt the backend really used
    # …unless that text breaks the server's filters: then the job is blocked, as if the user had written it
    await bot.services.store.server_settings.save(PLACE.guild_id, {"filter_words": ["golden"]})
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat", expand_prompt=True)
    final = await wait_for_final_message(fake, bot, 2, JobStatus.BLOCKED)
    assert final.field("Status") == "⛔ Blocked"
    job = await bot.services.store.jobs.get(2)
    assert job.error == "Blocked: server word 'golden' in the expanded prompt"
    assert not any("inpaint:reroll:2" in m.custom_ids() for m in fake.channel_messages(PLACE.channel_id))
    assert [e.action for e in await bot.services.store.modlog.entries(PLACE.guild_id)] == ["prompt_blocked"]
    async with FalTestServer(key=None) as worker:  # a worker whose /health doesn't offer it
        fake2 = FakeDiscord()
        with fake2.installed():
            config = bot_config(tmp_path / "second", worker, fal_key=None, worker_url=worker.base_url)
            async with running_bot(config, fake2) as (bot2, driver2):
                record = await driver2.slash(ALICE, "inpaint", **uploads(fake2), prompt="a boat", expand_prompt=True)
                assert "This bot's backend can't do `expand_prompt`" in ephemeral_text(record)
                assert await bot2.services.store.jobs.for_user(10) == [] and worker.requests == {}
