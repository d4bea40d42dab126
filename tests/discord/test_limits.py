"""Discord's limits with the worst a user or a server setting can produce: 6,000-character texts, 60 channels and
60 roles, odd decimals. The in-memory Discord refuses (400) anything Discord would, so every builder is checked."""

from __future__ import annotations

import io
import json

from tests.conftest import BotEnv
from tests.helpers.bot_env import ALICE, MOD, PLACE, ephemeral_text, result_message, uploads
from tests.helpers.discord_harness import ALL_PERMISSIONS

LONG = ("a very long description of a harbour at dawn, " * 140)[:6000]


async def test_settings_with_huge_values_still_show_and_save(discord_env: BotEnv) -> None:
    bot, _, driver = discord_env
    guild = PLACE.guild_id
    await bot.services.store.server_settings.save(guild, {  # as a server could have them, set over time
        "default_negative_prompt": LONG, "filter_words": [f"word{i}-{'x' * 150}" for i in range(60)],
        "allowed_channel_ids": [PLACE.channel_id, *range(10**17, 10**17 + 59)],
        "allowed_role_ids": list(range(2 * 10**17, 2 * 10**17 + 60))})
    shown = await driver.slash(MOD, "settings show", permissions=ALL_PERMISSIONS)
    embed = shown.responses[0]["data"]["embeds"][0]
    access = next(f["value"] for f in embed["fields"] if f["name"] == "Access")
    assert "and " in access and " more" in access and len(access) <= 1024
    saved = await driver.slash(MOD, "settings defaults", permissions=ALL_PERMISSIONS, negative_prompt="n" * 1000)
    assert ephemeral_text(saved).startswith("Saved: defaults default_negative_prompt = nnn")
    assert len(saved.responses[0]["data"]["content"]) <= 2000
    word = await driver.slash(MOD, "settings filter", permissions=ALL_PERMISSIONS, action="add_regex",
                              value="b" * 200)
    assert "Saved: filter add regex" in ephemeral_text(word)


async def test_the_edit_form_and_params_fit_whatever_the_job_holds(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="p" * 1000, negative_prompt="n" * 1000,
                       strength=0.333333, seed=5)
    result = await result_message(fake, 1, bot)
    async with bot.services.store.db.transaction() as conn:  # a job from before prompts were capped
        asked = {"prompt": LONG, "negative_prompt": LONG, "strength": 0.333333, "seed": 5}
        await conn.execute("UPDATE jobs SET options_json = ? WHERE id = 1", (json.dumps(asked),))
    shown = await driver.click(ALICE, result, "inpaint:edit:1")
    assert shown.modal is not None  # Discord took the form: every pre-fill within its input's limit
    inputs = {row["label"] if "label" in row else row["components"][0]["label"]: row for row in
              shown.modal["components"]}
    strength = inputs["Strength (0.01 to 1)"]["components"][0]
    assert strength["value"] == "0.3333" and len(strength["value"]) <= strength["max_length"]
    params = await driver.click(ALICE, result, "inpaint:params:1")
    attached = params.original  # the answer carries the parameters as a file
    assert attached is not None and list(attached.files) == ["job-1-params.json"]
    assert json.load(io.BytesIO(attached.files["job-1-params.json"]))["asked"]["prompt"] == LONG


async def test_a_refusal_naming_60_channels_fits_one_message(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await bot.services.store.server_settings.save(PLACE.guild_id, {
        "allowed_channel_ids": list(range(10**17, 10**17 + 60))})
    record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="x")
    (text,) = record.texts()  # answered at once (deferred), then told why, in one message
    assert text.startswith("The bot works only in <#") and text.endswith(" in this server.") and len(text) <= 2000
    assert await bot.services.store.jobs.for_user(10) == []
