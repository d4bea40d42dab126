"""The launch service without Discord: admission before any image work, server defaults and auto size, one
validation, create or derive, enqueue (the listener is told), drafts, and every refusal as a structured reason."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from services.container import Services, build_services
from services.images import IntakeLimits, PreparedInputs, prepare_inputs
from services.job_state import CROP_IMAGE_REF, CROP_MASK_REF, Job, JobStatus
from services.launch import DraftOffered, FromJob, Launched, NewImages
from services.refusals import (
    Banned,
    ChannelNotAllowed,
    DraftGone,
    ImagesGone,
    InvalidOptions,
    JobGone,
    NotRunning,
    PromptBlocked,
    Refused,
    RoleNotAllowed,
    StepBudgetExceeded,
)
from services.requester import Requester
from tests.helpers.bot_env import KEY, bot_config
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import SHARED_EXAMPLES, box_mask, encode, photo
from tests.helpers.listener import RecordingListener

GUILD, CHANNEL = 1, 2
ALICE = Requester(guild_id=GUILD, channel_id=CHANNEL, user_id=10, role_ids=(5,))


class Images:
    """New images for a launch: a 640×480 photo with a box mask, prepared only when the launcher asks."""

    format = "PNG"

    def __init__(self) -> None:
        self.prepared = 0

    async def prepare(self) -> PreparedInputs:
        self.prepared += 1
        return prepare_inputs(encode(photo(640, 480), self.format),
                              encode(box_mask((640, 480), (100, 100, 300, 260))), limits=IntakeLimits())

    def source(self, *, may_draft: bool = True) -> NewImages:
        return NewImages(self.prepare, may_draft=may_draft)


class JpegImages(Images):
    format = "JPEG"


@pytest.fixture
async def services(tmp_path: Path, server: FalTestServer) -> AsyncIterator[tuple[Services, RecordingListener]]:
    async with build_services(bot_config(tmp_path, server, painter_enabled=False)) as built:
        listener = RecordingListener()
        await built.dispatcher.start(listener)
        yield built, listener


Env = tuple[Services, RecordingListener]


async def _launch(services: Services, options: dict[str, Any], who: Requester = ALICE) -> Launched:
    outcome = await services.launcher.launch(who, options, Images().source())
    assert isinstance(outcome, Launched)
    return outcome


async def test_new_images_become_a_queued_job_that_sends_its_crop(services: Env) -> None:
    built, listener = services
    outcome = await _launch(built, {"prompt": "a red boat", "num_images": 2, "seed": None})
    job = outcome.job
    assert job.status is JobStatus.QUEUED and job.user_id == 10 and (job.guild_id, job.channel_id) == (1, 2)
    plan = job.plan
    assert plan is not None and plan.image_size == (640, 480) and plan.output_format == "png"  # PNG in, PNG out
    x, y, w, h = plan.crop
    assert x <= 100 and y <= 100 and x + w >= 301 and y + h >= 261  # the mask with its context
    assert job.input == {"image_url": CROP_IMAGE_REF, "mask_url": CROP_MASK_REF, "prompt": "a red boat",
                         "num_images": 2, "image_size": {"width": plan.sent[0], "height": plan.sent[1]},
                         "format": "png", "enable_safety_checker": True}
    assert job.asked == {"prompt": "a red boat", "num_images": 2}  # what the user asked, for rerolls and edits
    assert job.cost == 25 * 2  # fal's default steps × images
    assert outcome.mask_source == "attachment"
    blobs = await built.store.jobs.blobs(job.id)
    assert set(blobs) == {"image", "mask", "crop_image", "crop_mask"}
    assert Image.open(io.BytesIO(blobs["crop_image"].data)).size == plan.sent
    assert Image.open(io.BytesIO(blobs["image"].data)).size == (640, 480)  # the upload itself, for the stitch
    (queued, images, position), = listener.queued
    assert queued.id == job.id and images.image.size == (640, 480) and position in (0, None)


async def test_options_shape_the_crop_and_the_output_format(services: Env) -> None:
    built, _ = services
    whole = (await _launch(built, {"prompt": "x", "area": "whole", "image_size": "square"})).job
    assert whole.plan is not None and whole.plan.crop == (0, 0, 640, 480)
    assert whole.plan.sent[0] * whole.plan.sent[1] <= 1.05 * 512 * 512  # `size` sets the working resolution
    jpeg = JpegImages()
    outcome = await built.launcher.launch(ALICE, {"prompt": "x", "feather": 9, "padding": 0}, jpeg.source())
    assert isinstance(outcome, Launched) and outcome.job.plan is not None
    assert outcome.job.plan.output_format == "jpeg" and outcome.job.plan.options.feather == 9
    png_asked = await built.launcher.launch(ALICE, {"prompt": "x", "format": "png"}, jpeg.source())
    assert isinstance(png_asked, Launched) and png_asked.job.plan is not None
    assert png_asked.job.plan.output_format == "png"
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x", "feather": 500}, Images().source())
    assert isinstance(refused.value.reason, InvalidOptions) and "feather" in refused.value.reason.problems[0]


async def test_admission_refuses_before_any_image_is_taken_in(services: Env) -> None:
    built, _ = services
    await built.store.bans.ban(GUILD, 10, by=99)
    images = Images()
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x"}, images.source())
    assert refused.value.reason == Banned() and images.prepared == 0
    assert await built.store.jobs.for_user(10) == []


async def test_a_blocked_prompt_is_stored_as_blocked_with_its_rule(services: Env) -> None:
    built, _ = services
    images = Images()
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "a n.u.d.e statue"}, images.source())
    reason = refused.value.reason
    assert isinstance(reason, PromptBlocked) and reason.field == "prompt" and images.prepared == 0
    blocked = await built.store.jobs.get(reason.job_id)
    assert blocked.status is JobStatus.BLOCKED and "default word 'nude'" in (blocked.error or "")
    assert blocked.cost == 0 and [e.action for e in await built.store.modlog.entries(GUILD)] == ["prompt_blocked"]


async def test_access_by_channel_and_role_and_moderators_pass(services: Env) -> None:
    built, _ = services
    await built.store.server_settings.save(GUILD, {"allowed_channel_ids": [77]})
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())
    assert refused.value.reason == ChannelNotAllowed((77,))
    moderator = ALICE.model_copy(update={"moderator": True})
    await _launch(built, {"prompt": "x"}, moderator)
    await built.store.server_settings.save(GUILD, {"allowed_channel_ids": [], "allowed_role_ids": [6, 7]})
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())
    assert refused.value.reason == RoleNotAllowed((6, 7))
    await _launch(built, {"prompt": "x"}, ALICE.model_copy(update={"role_ids": (7,)}))


async def test_server_defaults_fill_in_and_the_step_budget_counts_them(services: Env) -> None:
    built, _ = services
    await built.store.server_settings.save(GUILD, {"default_steps": 40, "default_negative_prompt": "blurry",
                                                   "server_daily_steps": 100})
    job = (await _launch(built, {"prompt": "x", "negative_prompt": None})).job
    assert job.input["num_inference_steps"] == 40 and job.input["negative_prompt"] == "blurry" and job.cost == 40
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x", "num_images": 2}, Images().source())  # 80 > 60 left
    reason = refused.value.reason
    assert isinstance(reason, StepBudgetExceeded) and (reason.needed, reason.left, reason.limit) == (80, 60, 100)


async def test_options_are_validated_once_with_every_problem_named(services: Env) -> None:
    built, _ = services
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x", "num_inference_steps": 100, "guidance_scale": -1},
                                    Images().source())
    reason = refused.value.reason
    assert isinstance(reason, InvalidOptions) and len(reason.problems) == 2
    assert reason.problems[0].startswith("num_inference_steps:")
    assert await built.store.jobs.for_user(10) == []


async def test_derived_jobs_share_the_parents_images_and_change_only_what_is_asked(services: Env) -> None:
    built, listener = services
    parent = (await _launch(built, {"prompt": "a red boat", "seed": 5, "strength": 0.5})).job
    bob = Requester(guild_id=GUILD, channel_id=3, user_id=20)
    child = await built.launcher.launch(bob, {"seed": None, "num_images": 4}, FromJob(parent.id))
    assert isinstance(child, Launched)
    job = child.job
    assert job.parent_job_id == parent.id and job.user_id == 20 and job.channel_id == 3
    assert "seed" not in job.input and job.input["strength"] == 0.5 and job.input["num_images"] == 4
    assert job.input["image_size"] == parent.input["image_size"] and job.cost == 100
    assert await built.store.jobs.blob_refs(job.id) == await built.store.jobs.blob_refs(parent.id)
    assert [q[0].id for q in listener.queued] == [parent.id, job.id]
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(bob, {}, FromJob(999))
    assert refused.value.reason == JobGone(999)


async def test_servers_that_confirm_masks_get_a_draft_then_one_job(services: Env) -> None:
    built, listener = services
    await built.store.server_settings.save(GUILD, {"confirm_masks": True})
    offered = await built.launcher.launch(ALICE, {"prompt": "a kite"}, Images().source())
    assert isinstance(offered, DraftOffered) and offered.preview_jpeg[:2] == b"\xff\xd8"
    assert round(offered.coverage, 3) == round(201 * 161 / (640 * 480), 3)
    assert await built.store.jobs.for_user(10) == [] and listener.queued == []
    inverted = await built.drafts.invert(offered.draft.id)
    assert round(inverted.coverage + offered.coverage, 6) == 1.0
    draft = await built.drafts.get(offered.draft.id)
    confirmed = await built.launcher.launch(draft.requester, draft.params, built.drafts.confirmed(draft.id))
    assert isinstance(confirmed, Launched) and confirmed.job.input["prompt"] == "a kite"
    mask = (await built.store.jobs.blobs(confirmed.job.id))["mask"]
    assert mask.sha256 == inverted.draft.mask_sha256  # the inverted mask is what runs
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(draft.requester, draft.params, built.drafts.confirmed(draft.id))
    assert refused.value.reason == DraftGone()


async def test_a_job_that_cannot_be_shown_is_cancelled_before_it_costs_anything(services: Env,
                                                                                server: FalTestServer) -> None:
    built, listener = services
    listener.refuse_to_show = RuntimeError("Missing Access")
    with pytest.raises(RuntimeError, match="Missing Access"):
        await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())
    (job,) = await built.store.jobs.for_user(10)
    assert job.status is JobStatus.CANCELLED and job.attempts == 0 and server.requests == {}
    assert [e.message for e in await built.store.jobs.events(job.id)] == ["queued", "cancelled before submission"]


async def test_a_job_submitted_while_its_post_failed_is_cancelled_at_the_backend(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY, queue_polls=10_000) as slow, \
            build_services(bot_config(tmp_path, slow, painter_enabled=False)) as built:
        listener = RecordingListener()
        await built.dispatcher.start(listener)
        listener.show_delay_s, listener.refuse_to_show = 0.3, RuntimeError("Missing Access")
        with pytest.raises(RuntimeError, match="Missing Access"):
            await built.launcher.launch(ALICE, {"prompt": "x"}, Images().source())
        (job,) = await built.store.jobs.for_user(10)
        assert job.attempts == 1  # it had started while the post was on its way…
        await listener.event(job.id).wait()
        assert (await built.store.jobs.get(job.id)).status is JobStatus.CANCELLED  # …and was stopped there
        assert len(slow.hits("cancel")) == 1


async def test_nothing_is_queued_while_the_dispatcher_is_stopped(services: Env) -> None:
    built, _ = services
    await built.dispatcher.close()
    images = Images()
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x"}, images.source())
    assert refused.value.reason == NotRunning() and images.prepared == 0
    assert await built.store.jobs.for_user(10) == []


async def test_a_draft_is_only_offered_for_valid_options(services: Env) -> None:
    built, _ = services
    await built.store.server_settings.save(GUILD, {"confirm_masks": True})
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {"prompt": "x", "num_inference_steps": 100}, Images().source())
    assert isinstance(refused.value.reason, InvalidOptions)
    assert await built.store.db.scalar("SELECT COUNT(*) FROM drafts") == 0


async def test_a_derived_job_whose_images_are_gone_leaves_nothing_behind(services: Env) -> None:
    built, _ = services
    parent = (await _launch(built, {"prompt": "x"})).job
    async with built.store.db.transaction() as conn:
        await conn.execute("DELETE FROM job_blobs WHERE job_id = ? AND role = 'mask'", (parent.id,))
    with pytest.raises(Refused) as refused:
        await built.launcher.launch(ALICE, {}, FromJob(parent.id))
    assert refused.value.reason == ImagesGone(parent.id)
    assert [j.id for j in await built.store.jobs.for_user(10)] == [parent.id]


class Upload(Images):
    """A given picture and mask (PNG bytes), taken in when the launcher asks."""

    def __init__(self, image: bytes, mask: bytes) -> None:
        super().__init__()
        self.image, self.mask = image, mask

    async def prepare(self) -> PreparedInputs:
        self.prepared += 1
        return prepare_inputs(self.image, self.mask, limits=IntakeLimits())


async def _posted_picture(built: Services, listener: RecordingListener, upload: Upload) -> tuple[Job, Image.Image]:
    """Launch `upload`, let the backend answer, and return the job with the stored (posted) result."""
    outcome = await built.launcher.launch(ALICE, {"prompt": "x"}, upload.source())
    assert isinstance(outcome, Launched)
    await listener.event(outcome.job.id).wait()
    job = await built.store.jobs.get(outcome.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    return job, Image.open(io.BytesIO((await built.store.jobs.blobs(job.id))["output_0"].data))


def _outside(mask: Image.Image, feather: int) -> np.ndarray:
    """Pixels farther than `feather` from the mask: the ones that must come back untouched."""
    inside = (np.asarray(mask.convert("L")) >= 128).astype(np.uint8)
    grown: np.ndarray = cv2.dilate(inside, np.ones((2 * feather + 1, 2 * feather + 1), np.uint8)) == 0
    return grown


async def test_a_large_upload_comes_back_at_its_size_changed_only_in_the_mask(services: Env,
                                                                              server: FalTestServer) -> None:
    built, listener = services
    picture = photo(4000, 3000)
    mask = box_mask((4000, 3000), (2500, 600, 2799, 799))
    job, posted = await _posted_picture(built, listener, Upload(encode(picture), encode(mask)))
    sent = next(iter(server.requests.values())).input.size_pixels()
    assert sent[0] * sent[1] <= 1.1 * 1024 * 1024 and job.plan is not None and job.plan.sent == sent
    assert posted.format == "PNG" and posted.size == (4000, 3000)
    same = np.all(np.asarray(posted.convert("RGB")) == np.asarray(picture), axis=2)
    assert same[_outside(mask, 4)].all()  # bit-identical outside the mask and its feather band
    assert not same[600:800, 2500:2800].any()  # and the whole mask repainted


@pytest.mark.skipif(not SHARED_EXAMPLES.is_dir(), reason=f"real example photos not found at {SHARED_EXAMPLES}")
async def test_real_photos_come_back_untouched_outside_their_masks(services: Env) -> None:
    built, listener = services
    pairs = [(p, p.with_name(p.stem + "_mask.png")) for p in sorted(SHARED_EXAMPLES.glob("*.png"))
             if not p.stem.endswith("_mask") and p.with_name(p.stem + "_mask.png").exists()]
    assert pairs
    for image_path, mask_path in pairs:
        _, posted = await _posted_picture(built, listener, Upload(image_path.read_bytes(), mask_path.read_bytes()))
        original = Image.open(image_path).convert("RGB")
        assert posted.size == original.size, image_path.name
        same = np.all(np.asarray(posted.convert("RGB")) == np.asarray(original), axis=2)
        mask = Image.open(mask_path).convert("L").point(lambda v: 255 if v >= 128 else 0)
        assert same[_outside(mask, 4)].all(), image_path.name


async def test_capabilities_come_from_the_backend(tmp_path: Path) -> None:
    import httpx

    from services.backend_select import BackendChoice, probe_capabilities

    async with FalTestServer(key=None) as worker, httpx.AsyncClient() as http:
        choice = BackendChoice("worker", worker.base_url, None)
        assert not (await probe_capabilities(choice, worker.base_url, http)).expand_prompt  # no /health at all
        worker.health = {"ready": True, "expand_prompt": True}
        assert (await probe_capabilities(choice, worker.base_url, http)).expand_prompt
        worker.health = {"ready": True, "expand_prompt": False}
        assert not (await probe_capabilities(choice, worker.base_url, http)).expand_prompt
        assert (await probe_capabilities(BackendChoice("fal", "https://queue.fal.run", None), "", http)).expand_prompt


async def test_a_transparent_upload_keeps_its_transparency_outside_the_mask(services: Env) -> None:
    built, listener = services
    rgba = photo(320, 240).convert("RGBA")
    rgba.paste((255, 0, 0, 0), (0, 0, 60, 40))  # a fully transparent corner holding red
    rgba.paste((10, 200, 30, 128), (260, 200, 320, 240))  # and a half-transparent one
    mask = box_mask((320, 240), (120, 90, 199, 149))
    _, posted = await _posted_picture(built, listener, Upload(encode(rgba), encode(mask)))
    assert posted.mode == "RGBA" and posted.format == "PNG"
    out = np.asarray(posted)
    assert (out[_outside(mask, 4)] == np.asarray(rgba)[_outside(mask, 4)]).all()  # RGBA, bit for bit
    assert (out[95:145, 125:195, 3] == 255).all()  # the model's pixels are opaque
    reroll = await built.launcher.launch(ALICE, {"seed": None}, FromJob(1))
    assert isinstance(reroll, Launched)
    await listener.event(reroll.job.id).wait()
    again = Image.open(io.BytesIO((await built.store.jobs.blobs(reroll.job.id))["output_0"].data))
    assert again.mode == "RGBA" and (np.asarray(again)[0:40, 0:60] == [255, 0, 0, 0]).all()


def test_a_one_pixel_stroke_survives_shrinking_and_a_hair_thin_picture_is_refused() -> None:
    from services.crop_plan import StitchOptions
    from services.images import ImageInputError
    from services.stitch import crop_for_backend, plan_crop

    mask = Image.new("L", (6000, 4000), 0)
    mask.paste(255, (100, 100, 5900, 101))  # a 1-pixel line across the picture
    mask.paste(255, (3000, 100, 3001, 3900))
    plan = plan_crop(mask, StitchOptions(), output_format="png")
    assert plan.sent[0] < 6000 / 4
    _, sent = crop_for_backend(Image.new("RGB", (6000, 4000)), mask, plan)
    sent_mask = np.asarray(sent) > 0
    assert sent_mask.any(axis=1).sum() >= 1 and sent_mask.any(axis=0).sum() >= 1
    scale = plan.sent[0] / plan.crop[2]
    row, first, last = (round(v * scale) for v in (100 - plan.crop[1], 100 - plan.crop[0], 5900 - plan.crop[0]))
    assert sent_mask[max(0, row - 1):row + 2, first + 1:last - 1].any(axis=0).all()  # the whole line, unbroken
    strip = Image.new("L", (20000, 64), 0)
    strip.paste(255, (0, 10, 20000, 50))
    with pytest.raises(ImageInputError, match="long and thin"):
        plan_crop(strip, StitchOptions(), output_format="png")


async def test_a_no_from_the_backend_is_asked_again_once_it_is_old(tmp_path: Path) -> None:
    import httpx

    from services.backend_select import BackendChoice, CapabilityProbe

    now = [0.0]
    async with FalTestServer(key=None) as worker, httpx.AsyncClient() as http:
        probe = CapabilityProbe(BackendChoice("worker", worker.base_url, None), worker.base_url, http,
                                recheck_s=60, clock=lambda: now[0])
        assert not (await probe.current()).expand_prompt  # the worker is down (no /health) at start
        worker.health = {"expand_prompt": True}
        assert not (await probe.current(recheck_no=True)).expand_prompt  # asked a moment ago: no again
        now[0] = 61
        assert (await probe.current(recheck_no=True)).expand_prompt  # a minute later it is asked, and says yes


async def test_a_confirmed_draft_of_a_rotated_jpeg_comes_back_as_jpeg(services: Env) -> None:
    built, _ = services
    await built.store.server_settings.save(GUILD, {"confirm_masks": True})
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90°": intake turns it, so the stored copy is a PNG of the turned picture
    photo(640, 480).save(rotated, format="JPEG", exif=exif)
    upload = Upload(rotated.getvalue(), encode(box_mask((480, 640), (100, 100, 300, 260))))
    offered = await built.launcher.launch(ALICE, {"prompt": "x"}, upload.source())
    assert isinstance(offered, DraftOffered) and offered.draft.source_format == "JPEG"
    confirmed = await built.launcher.launch(ALICE, {"prompt": "x"}, built.drafts.confirmed(offered.draft.id))
    assert isinstance(confirmed, Launched) and confirmed.job.plan is not None
    assert confirmed.job.plan.output_format == "jpeg" and confirmed.job.plan.image_size == (480, 640)
