"""Buttons on a result whose pictures the retention cleanup deleted say so, and after how long, instead of
"Something went wrong"; the buttons that need nothing deleted keep working."""

from __future__ import annotations

from services.retention import DAY_S, RetentionCleanup, RetentionPolicy
from tests.conftest import BotEnv
from tests.helpers.bot_env import ALICE, BOB, ephemeral_text, result_message, uploads


async def test_buttons_on_an_expired_job_say_its_pictures_were_deleted(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a lighthouse", seed=9)
    result = await result_message(fake, 1, bot)
    store = bot.services.store
    finished = (await store.jobs.get(1)).finished_at
    assert finished is not None
    cleanup = RetentionCleanup(store, RetentionPolicy(inputs_days=7, results_days=30))

    report = await cleanup.sweep(finished + 7 * DAY_S + 1800)  # the hourly sweep just after a week
    assert report.inputs == 1 and report.results == 0
    pictures_gone = ("Job #1's pictures were deleted after 7 days (this bot keeps a job's pictures that long), so it "
                     "can't be run again: start a new job with /inpaint.")
    for action in ("reroll", "vary", "edit"):
        pressed = await driver.click(BOB, result, f"inpaint:{action}:1")
        assert set(pressed.texts()) == {pictures_gone}, action
        assert pressed.modal is None
    params = await driver.click(BOB, result, "inpaint:params:1")  # needs no picture
    assert '"prompt": "a lighthouse"' in ephemeral_text(params)

    report = await cleanup.sweep(finished + 30 * DAY_S + 60)
    assert report.results == 1
    result_gone = ("Job #1's result was deleted after 30 days (this bot keeps results that long), so it can't be "
                   "zoomed, panned or varied any more: start a new job with /inpaint.")
    for action in ("zoom15", "zoom2", "pan_left", "pan_up", "region"):
        pressed = await driver.click(BOB, result, f"inpaint:{action}:1")
        assert set(pressed.texts()) == {result_gone}, action
    assert [job.id for job in await store.jobs.for_user(20)] == []  # nothing was started, nothing counted
