"""The Discord layer's builders on their own: refusals worded with mentions and relative times, embeds showing
fal's defaults for options a job left out, and persistent buttons whose custom ids stay those of older messages."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cogs import render
from cogs.buttons import JOB_BUTTONS, RerollButton
from cogs.drafts import DRAFT_BUTTONS, ConfirmButton
from cogs.errors import user_message
from cogs.modlog import MODLOG_BUTTONS, BanButton, DeleteResultButton
from cogs.wording import refusal_text
from services.job_state import Job, JobStatus
from services.refusals import (
    Banned,
    ChannelNotAllowed,
    Cooldown,
    Refused,
    RoleNotAllowed,
    ServerQuotaUsed,
    StepBudgetExceeded,
    UserQuotaUsed,
)
from services.schema import InpaintOutput


def _job(**input_: Any) -> Job:
    return Job(id=7, guild_id=1, channel_id=2, user_id=3, status=JobStatus.SUCCEEDED, status_message_id=None,
               parent_job_id=None, backend="fal", backend_request_id=None, status_url=None, response_url=None,
               cancel_url=None, input={"prompt": "a boat", **input_}, result=None, error=None, attempts=1,
               created_at=0.0, updated_at=0.0, submitted_at=None, started_at=None, finished_at=None)


def test_refusals_mention_channels_and_roles_and_show_resets_in_the_users_time() -> None:
    assert refusal_text(ChannelNotAllowed((11, 12))) == "The bot works only in <#11>, <#12> in this server."
    assert refusal_text(RoleNotAllowed((5,))) == "Only members with <@&5> can use the bot in this server."
    assert refusal_text(UserQuotaUsed(3, 1_800_000_000.9)).endswith("the quota resets <t:1800000000:R>.")
    assert "<t:1800000000:R>" in refusal_text(ServerQuotaUsed(50, 1_800_000_000))
    assert refusal_text(StepBudgetExceeded(100, 40, 500, 1_800_000_000)).startswith(
        "This job needs 100 steps (steps × images) but the server has 40 of its 500 left today")
    assert refusal_text(Cooldown(12.4)) == "Slow down: you can start another job in 12 s."
    assert user_message(Refused(Banned())) == Banned().plain()
    # outside Discord (the painter's page) the same facts read without markup
    for reason in (ChannelNotAllowed((11,)), RoleNotAllowed((5,)), UserQuotaUsed(3, 1_800_000_000)):
        assert not re.search(r"<[#@t]", reason.plain())


def test_embeds_show_fals_defaults_for_options_left_out() -> None:
    job = _job(image_size={"width": 1152, "height": 896})
    output = InpaintOutput(images=[], timings={"inference": 1.5}, seed=9, has_nsfw_concepts=[], prompt="a boat")
    fields = {f.name: f.value for f in render.result_embed(job, output, render.ResultFiles([])).fields}
    assert (fields["Steps"], fields["Guidance"], fields["Strength"]) == ("25", "7.5", "0.95")
    assert fields["Size"] == "1152×896" and fields["Seed"] == "`9`"
    footer = render.progress_embed(_job(num_inference_steps=40), None).footer.text
    assert footer == "square_hd · 40 steps · backend: fal"


@pytest.mark.parametrize(("button", "custom_id"), [
    (RerollButton(41), "inpaint:reroll:41"),
    (ConfirmButton("Ab-_9"), "draft:confirm:Ab-_9"),
    (BanButton(1, 2), "modlog:ban:1:2"),
    (DeleteResultButton(9), "modlog:delete:9"),
])
def test_custom_ids_keep_their_format(button: Any, custom_id: str) -> None:
    assert button.custom_id == custom_id and button.template.fullmatch(custom_id)


async def test_every_button_parses_its_own_custom_id() -> None:
    patterns = []
    for cls in (*JOB_BUTTONS, *DRAFT_BUTTONS, *MODLOG_BUTTONS):
        button: Any = cls
        ids = tuple(3 + i if kind is int else "d-1" for i, (_, kind) in enumerate(button.fields))
        made = button(*ids)
        match = made.template.fullmatch(made.custom_id)
        assert match is not None, cls
        again = await button.from_custom_id(None, made.item, match)
        assert again.custom_id == made.custom_id and again.ids == ids
        patterns.append(made.template.pattern)
    assert len(set(patterns)) == len(patterns)  # no two buttons answer the same custom id
    with pytest.raises(TypeError):
        BanButton(1)


def test_every_embed_builder_fits_discords_limits_with_huge_inputs() -> None:
    from cogs import fit

    huge = "x" * 7000
    job = _job(image_size={"width": 1152, "height": 896}, negative_prompt=huge, prompt=huge)
    output = InpaintOutput(images=[], timings={f"stage {i} {'y' * 90}": 1.0 for i in range(40)}, seed=9,
                           has_nsfw_concepts=[], prompt=huge)
    for embed in (render.result_embed(job, output, render.ResultFiles([])), render.progress_embed(job, None),
                  render.ended_embed(job.model_copy(update={"error": huge}))):
        assert len(embed) <= fit.EMBED_TOTAL and len(embed.fields) <= fit.EMBED_FIELDS
        assert all(len(f.value or "") <= fit.FIELD_VALUE for f in embed.fields)
        assert len(embed.description or "") <= fit.EMBED_DESCRIPTION
    assert fit.listing([f"<#{i}>" for i in range(60)], 100).endswith("more")
    assert fit.prefill("0123456789", 5) == "0123…"
