"""Each moderation and fairness path through the Discord layer (discord.py's real interaction handling), with a
real fal-protocol backend on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

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
    progress_message,
    result_message,
    running_bot,
    uploads,
    wait_status,
)
from tests.helpers.discord_harness import ALL_PERMISSIONS, Channel, Driver, FakeDiscord, FakeMessage, Place, user
from tests.helpers.fal_server import FalTestServer
from tests.helpers.waits import wait_until

CAROL = user(40, "carol")
MODLOG = 999
NSFW_PLACE = Place(guild_id=PLACE.guild_id, channel_id=333, nsfw=True)


async def _settings_cmd(driver: Driver, sub: str, **options: object) -> str:
    """Run `/settings <sub>` as a server manager; returns what the bot answered."""
    return ephemeral_text(await driver.slash(MOD, f"settings {sub}", permissions=ALL_PERMISSIONS, **options))


def _modlog_posts(fake: FakeDiscord) -> list[FakeMessage]:
    return fake.channel_messages(MODLOG)


async def test_settings_refused_for_non_managers(discord_env: BotEnv) -> None:
    bot, _, driver = discord_env
    record = await driver.slash(BOB, "settings show", permissions=0)
    assert "You need the Manage Server permission to use /settings." in ephemeral_text(record)
    shown = await driver.slash(MOD, "settings show", permissions=ALL_PERMISSIONS)
    embed = shown.responses[0]["data"]["embeds"][0]
    assert embed["title"] == "Inpaint bot settings" and shown.responses[0]["data"]["flags"] & 64
    text = await _settings_cmd(driver, "limits", per_user_at_once=3, per_server_per_day=50)
    assert "Saved: user_concurrent = 3, server_daily_jobs = 50" in text
    policy = await bot.services.store.server_settings.raw(PLACE.guild_id)
    assert policy["user_concurrent"] == 3 and policy["server_daily_jobs"] == 50
    refused = await _settings_cmd(driver, "filter", action="add_regex", value="(a+)+$")
    assert "catastrophic backtracking" in refused


async def test_blocked_prompt_is_stored_told_and_logged(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await _settings_cmd(driver, "modlog", channel=Channel(MODLOG))
    await _settings_cmd(driver, "filter", action="add_word", value="clown")
    record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a c.l.o.w.n at the fair")
    assert ("Your prompt was blocked by this server's filters (server word 'clown'). Please rephrase it."
            in ephemeral_text(record))
    assert not any(c[0] == "CDN" for c in fake.calls)  # refused before downloading the images
    jobs = await bot.services.store.jobs.with_status([JobStatus.BLOCKED])
    assert len(jobs) == 1 and jobs[0].error == "Blocked: server word 'clown' in the prompt"
    events = await bot.services.store.jobs.events(jobs[0].id)
    assert events[-1].data and events[-1].data["rule"] == "server word 'clown' in the prompt"
    await wait_until(lambda: any("Prompt blocked" in (m.embeds[0].get("title") or "") for m in _modlog_posts(fake)
                                 if m.embeds), what="the mod log post")
    post = next(m for m in _modlog_posts(fake) if "Prompt blocked" in m.embeds[0]["title"])
    assert post.field("User") == "<@10>" and "clown" in post.embeds[0]["description"]
    assert post.custom_ids() == ["modlog:ban:111:10", "modlog:unban:111:10"]
    negative = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a fair", negative_prompt="p0rn")
    assert "Your negative prompt was blocked" in ephemeral_text(negative)


async def test_flagged_output_in_an_ordinary_channel_is_blocked(discord_env: BotEnv,
                                                                server: FalTestServer) -> None:
    bot, fake, driver = discord_env
    await _settings_cmd(driver, "modlog", channel=Channel(MODLOG))
    await _settings_cmd(driver, "safety", flagged="allow")  # applies to age-restricted channels only
    server.flag_outputs = True
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a statue")
    await wait_status(bot, 1, JobStatus.BLOCKED)
    job = await bot.services.store.jobs.get(1)
    assert job.input["enable_safety_checker"] is True and job.result_message_id is None
    progress = progress_message(fake, job.status_message_id)
    await wait_until(lambda: progress.field("Status") == "⛔ Blocked", what="the blocked state")
    assert "safety checker flagged the result" in (progress.field("Why") or "")
    assert not any("inpaint:reroll:1" in m.custom_ids() for m in fake.channel_messages(PLACE.channel_id))
    await wait_until(lambda: any(m.files for m in _modlog_posts(fake)), what="the flagged thumbnail")
    post = next(m for m in _modlog_posts(fake) if m.files)
    assert list(post.files) == ["SPOILER_flagged_0.jpg"]  # the thumbnail hides behind a spoiler


async def test_flagged_output_in_an_age_restricted_channel_follows_the_policy(
        discord_env: BotEnv, server: FalTestServer) -> None:
    bot, fake, driver = discord_env
    nsfw = Driver(fake, bot, NSFW_PLACE)
    server.flag_outputs = True
    await nsfw.slash(ALICE, "inpaint", **uploads(fake), prompt="a statue")  # default policy: block
    await wait_status(bot, 1, JobStatus.BLOCKED)

    await _settings_cmd(driver, "safety", flagged="spoiler")
    await nsfw.slash(ALICE, "inpaint", **uploads(fake), prompt="a statue")
    await wait_status(bot, 2, JobStatus.SUCCEEDED)
    await wait_until(lambda: bool([m for m in fake.channel_messages(NSFW_PLACE.channel_id)
                                   if "inpaint:reroll:2" in m.custom_ids()]), what="the spoilered result")
    spoilered = [m for m in fake.channel_messages(NSFW_PLACE.channel_id) if "inpaint:reroll:2" in m.custom_ids()]
    assert list(spoilered[0].files) == ["SPOILER_result_0.png"] and "image" not in spoilered[0].embeds[0]

    await _settings_cmd(driver, "safety", flagged="allow", checker_off_in_age_restricted=True)
    await nsfw.slash(ALICE, "inpaint", **uploads(fake), prompt="a statue")
    await wait_status(bot, 3, JobStatus.SUCCEEDED)
    assert (await bot.services.store.jobs.get(3)).input["enable_safety_checker"] is False
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a statue")  # ordinary channel: checker stays on
    await wait_status(bot, 4, JobStatus.BLOCKED)
    assert (await bot.services.store.jobs.get(4)).input["enable_safety_checker"] is True


async def test_flagged_upload_blocks_the_job(discord_env: BotEnv,
                                             server: FalTestServer) -> None:
    bot, fake, driver = discord_env
    server.flag_inputs = True
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="innocent words")
    await wait_status(bot, 1, JobStatus.BLOCKED)
    assert (await bot.services.store.jobs.get(1)).error == (
        "The safety checker flagged the uploaded image, so it can't be used here.")
    entries = await bot.services.store.modlog.entries(PLACE.guild_id)
    assert [e.action for e in entries][-1] == "input_flagged"


async def test_ban_from_the_mod_log_is_enforced_and_lifted(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await _settings_cmd(driver, "modlog", channel=Channel(MODLOG))
    await driver.slash(BOB, "inpaint", **uploads(fake), prompt="a naked tree")  # blocked: posts to the mod log
    await wait_until(lambda: bool(_modlog_posts(fake)), what="the mod log post")
    post = next(m for m in _modlog_posts(fake) if "modlog:ban:111:20" in m.custom_ids())
    refused = await driver.click(BOB, post, "modlog:ban:111:20")
    assert "Only moderators" in ephemeral_text(refused)
    await driver.click(MOD, post, "modlog:ban:111:20", permissions=ALL_PERMISSIONS)
    assert await bot.services.store.bans.is_banned(PLACE.guild_id, 20)
    banned = await driver.slash(BOB, "inpaint", **uploads(fake), prompt="a tree")
    assert "a moderator has banned you" in ephemeral_text(banned)
    await driver.click(MOD, post, "modlog:unban:111:20", permissions=ALL_PERMISSIONS)
    await driver.slash(BOB, "inpaint", **uploads(fake), prompt="a tree")
    await result_message(fake, 2, bot)  # the refused attempt made no job
    actions = [e.action for e in await bot.services.store.modlog.entries(PLACE.guild_id)]
    assert actions == ["settings_changed", "prompt_blocked", "user_banned", "user_unbanned"]


async def test_access_limited_to_a_channel(discord_env: BotEnv) -> None:
    _, fake, driver = discord_env
    saved = await _settings_cmd(driver, "access", action="allow", channel=Channel(NSFW_PLACE.channel_id, nsfw=True))
    assert "Saved: access allow" in saved, saved
    refused = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a tree")
    assert f"The bot works only in <#{NSFW_PLACE.channel_id}>" in ephemeral_text(refused)


async def test_round_robin_three_users_twelve_jobs(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY, queue_polls=10_000, progress_logs=0) as server:
        fake = FakeDiscord()
        with fake.installed():
            async with running_bot(bot_config(tmp_path, server, dispatch_concurrency=1), fake) as (bot, driver):
                for member in (ALICE, BOB, CAROL):  # Alice sends all four first, then Bob, then Carol
                    for n in range(4):
                        await driver.slash(member, "inpaint", **uploads(fake), prompt=f"{member['username']} {n}")
                await wait_until(lambda: len(server.requests) == 1, what="the first submit")
                server.queue_polls = 0
                for request in server.requests.values():
                    request.queue_polls_left = 0
                await result_message(fake, 12, bot)
                users = {1: "A", 2: "A", 3: "A", 4: "A", 5: "B", 6: "B", 7: "B", 8: "B",
                         9: "C", 10: "C", 11: "C", 12: "C"}
                order = "".join(users[j] for j in bot.services.dispatcher.started)
                # Alice's first job was already running when the others arrived; then the users take turns
                assert order == "AABCABCABCBC", order


async def test_quota_exhausted_and_reset(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await _settings_cmd(driver, "limits", per_user_per_day=2)
    for n in (1, 2):
        await driver.slash(ALICE, "inpaint", **uploads(fake), prompt=f"job {n}")
        await result_message(fake, n, bot)
    refused = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="job 3")
    assert "You've used your 2 jobs for today here; the quota resets" in ephemeral_text(refused)
    quota = await driver.slash(ALICE, "quota")
    fields = {f["name"]: f["value"] for f in quota.responses[0]["data"]["embeds"][0]["fields"]}
    assert fields["Your jobs"] == "0 of 2 left" and fields["Server jobs"] == "unlimited"
    bob_ok = await driver.slash(BOB, "inpaint", **uploads(fake), prompt="bob's job")  # others are unaffected
    assert "Queued as job #3" in ephemeral_text(bob_ok)
    real_clock = bot.services.quotas.clock
    bot.services.quotas.clock = lambda: real_clock() + 86400  # tomorrow (UTC)
    again = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a new day")
    assert "Queued as job #4" in ephemeral_text(again)
    tomorrow = await driver.slash(ALICE, "quota")
    fields = {f["name"]: f["value"] for f in tomorrow.responses[0]["data"]["embeds"][0]["fields"]}
    assert fields["Your jobs"] == "2 of 2 left"  # jobs are stamped with the real clock: today's count is empty


async def test_moderator_deleting_a_result_is_logged(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await _settings_cmd(driver, "modlog", channel=Channel(MODLOG))
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat")
    result = await result_message(fake, 1, bot)
    await driver.click(MOD, result, "inpaint:delete:1", permissions=ALL_PERMISSIONS)
    await wait_until(lambda: any("Result deleted" in (m.embeds[0].get("title") or "") for m in _modlog_posts(fake)
                                 if m.embeds), what="the moderator action in the mod log")
    assert "result_deleted" in [e.action for e in await bot.services.store.modlog.entries(PLACE.guild_id)]


async def test_server_defaults_and_allowed_roles(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await _settings_cmd(driver, "defaults", steps=12, size="square", negative_prompt="watermark")
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a harbour")
    await result_message(fake, 1, bot)
    job = await bot.services.store.jobs.get(1)
    assert (job.input["num_inference_steps"], job.input["negative_prompt"]) == (12, "watermark")
    assert job.asked is not None and job.asked["image_size"] == "square"  # the server's default working size…
    sent = job.input["image_size"]
    assert abs(sent["width"] * sent["height"] - 512 * 512) < 0.05 * 512 * 512  # …is what the model got
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a harbour", steps=30)  # the user's choice wins
    await result_message(fake, 2, bot)
    assert (await bot.services.store.jobs.get(2)).input["num_inference_steps"] == 30

    # allowed roles (set directly: a role option is just its id)
    await bot.services.store.server_settings.save(PLACE.guild_id, {"allowed_role_ids": [555]})
    refused = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a harbour")
    assert "Only members with <@&555> can use the bot in this server." in ephemeral_text(refused)
    artist = user(50, "artist", roles=(555,))
    allowed = await driver.slash(artist, "inpaint", **uploads(fake), prompt="a harbour")
    assert "Queued as job #3" in ephemeral_text(allowed)
