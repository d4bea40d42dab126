"""How a job starts — the one answer, for every entry point (the slash command, the message command's form,
draft Confirm, the mask painter's submit, and every result button):

    admission → server defaults and auto size → one validation → create (or derive) → enqueue

The caller says who is asking, gives the options, and where the images come from: new images, prepared only
once admission has passed (so a refused user's upload is never downloaded), or an earlier job whose stored
images are reused. The result is the queued job, a draft waiting for the user to confirm their mask (servers
that ask for it), or `Refused` with a structured reason. Queuing tells the dispatcher's listener, which shows the
job; if it can't, the job is cancelled before it costs anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError

from services.admission import Admission, Admissions
from services.backend_pool import BackendPool
from services.backend_select import BackendChoice, CapabilityProbe, fit_to_policy
from services.blob import Blob
from services.crop_plan import STITCH_OPTION_NAMES, OutputFormat, StitchOptions
from services.dispatch import Dispatcher, JobImages
from services.errors import StartupError, validation_problems
from services.images import IntakeLimits, MaskSource, PreparedInputs, normalized_image, prepare_inputs
from services.job_state import CROP_IMAGE_REF, CROP_MASK_REF, IMAGE_REF, MASK_REF, Job, JobNotFound
from services.outpaint import Expansion, expand
from services.preview import mask_overlay_jpeg
from services.refusals import ImagesGone, InvalidOptions, JobGone, NotRunning, Refused, Unsupported
from services.requester import Requester
from services.retention import pictures_gone
from services.schema import IMAGE_SIZE_PRESETS, ImageSize, InpaintInput
from services.stitch import TARGET_PIXELS, stage
from services.store import Store
from services.store.drafts import Draft

log = logging.getLogger(__name__)

#: Source formats that lose nothing: their pictures come back as PNG, untouched pixels bit for bit.
LOSSLESS_SOURCES = frozenset({"PNG", "BMP", "GIF"})
#: What the backend is asked for: the crop's result is an intermediate, so it should lose nothing.
INTERMEDIATE_FORMAT = "png"


async def prepare_stored(store: Store, limits: IntakeLimits, image_sha256: str, mask: str | bytes, *,
                         source_format: str | None = None) -> PreparedInputs:
    """Take in a stored image with a mask (a stored one by its sha256, or new bytes) as for a new job; the stored
    copy may be a PNG made from the upload, so `source_format` says what the upload was."""
    image = await store.blobs.get(image_sha256)
    stored_mask = await store.blobs.get(mask) if isinstance(mask, str) else None
    if image is None or (isinstance(mask, str) and stored_mask is None):
        raise Refused(ImagesGone(None))
    mask_bytes = stored_mask.data if stored_mask is not None else mask
    assert isinstance(mask_bytes, bytes)
    prepared = await asyncio.to_thread(prepare_inputs, image.data, mask_bytes, limits=limits)
    return dataclasses.replace(prepared, source_format=source_format) if source_format else prepared


@dataclass(frozen=True)
class NewImages:
    """Images not stored as a job yet. `prepare` downloads and takes them in; it runs only after admission.
    `may_draft`: a server that asks users to confirm their mask gets a draft instead of a job. `parent_id`: the
    job whose result these images come from (Zoom Out, Pan, Vary Region)."""

    prepare: Callable[[], Awaitable[PreparedInputs]]
    may_draft: bool = True
    parent_id: int | None = None


def expanded_upload(read: Callable[[], Awaitable[bytes]], expansion: Expansion, limits: IntakeLimits) -> NewImages:
    """An uploaded picture on an expanded canvas (/outpaint, the command line): read, taken in, expanded."""

    async def prepare() -> PreparedInputs:
        data = await read()

        def make() -> PreparedInputs:
            picture, _ = normalized_image(data, limits)
            return expand(picture, expansion, max_pixels=limits.max_pixels)

        return await asyncio.to_thread(make)

    return NewImages(prepare, may_draft=False)


def from_result(store: Store, job_id: int, make: Callable[[Image.Image], PreparedInputs]) -> NewImages:
    """A job's (first) result image, made into new inputs by `make` (in a thread), e.g. an expanded canvas."""

    async def prepare() -> PreparedInputs:
        blob = (await store.jobs.blobs(job_id)).get("output_0")
        if blob is None:
            raise Refused(await pictures_gone(store, job_id, result=True))
        return await asyncio.to_thread(lambda: make(Image.open(io.BytesIO(blob.data)).convert("RGB")))

    return NewImages(prepare, may_draft=False, parent_id=job_id)


@dataclass(frozen=True)
class FromJob:
    """A job derived from an earlier one (reroll, variations, edit, retry): its stored images, its options with
    the given ones changed (an option set to None is dropped, e.g. the seed)."""

    parent_id: int


@dataclass(frozen=True)
class Launched:
    job: Job
    mask_source: MaskSource | None = None  # where the mask came from, for new images


@dataclass(frozen=True)
class DraftOffered:
    """Nothing is spent yet: the user sees `preview_jpeg` (the mask over the image) and confirms, inverts or
    cancels."""

    draft: Draft
    preview_jpeg: bytes
    coverage: float


class Launcher:
    def __init__(self, store: Store, admissions: Admissions, dispatcher: Dispatcher, backend: BackendChoice,
                 capabilities: CapabilityProbe, *, pool: BackendPool | None = None) -> None:
        """`backend` and `capabilities`: the first backend's (the only one's without a pool), whose name a new job
        gets until it is submitted and whose capabilities options are checked against; with a `pool` of several,
        results are asked to be checked when any backend has a checker (one without, a classic worker, gets the
        request with the checker off: `services/dispatch.py`)."""
        self.store = store
        self.pool = pool
        self.admissions = admissions
        self.dispatcher = dispatcher
        self.backend = backend
        self.capabilities = capabilities

    async def launch(self, who: Requester, options: dict[str, Any],
                     source: NewImages | FromJob) -> Launched | DraftOffered:
        """Start a job for `who`, or raise `Refused`."""
        if not self.dispatcher.running:
            raise Refused(NotRunning())
        if isinstance(source, FromJob):
            return await self._derive(who, options, source.parent_id)
        admission = await self.admissions.admit(who, options, parent_id=source.parent_id)
        await self._check_capabilities(admission.options)
        stitching = _stitch_options(admission.options)
        request = self._request(admission, who, (CROP_IMAGE_REF, CROP_MASK_REF))
        prepared = await source.prepare()
        if source.may_draft and admission.settings.confirm_masks:
            return await self.offer_draft(who, options, prepared)
        output_format = "png" if prepared.original is not None else _output_format(prepared.source_format,
                                                                                    admission.options)
        plan, crop, crop_mask = await asyncio.to_thread(stage, prepared.image, prepared.mask, stitching,
                                                        output_format=output_format, keep=prepared.keep,
                                                        target=_target_pixels(admission.options))
        request = request.model_copy(update={"image_size": ImageSize(width=plan.sent[0], height=plan.sent[1])})
        hold = await self.admissions.reserve(who, request)  # the bot-wide budget, at the request's exact cost
        job = await self.store.jobs.create(
            user_id=who.user_id, guild_id=who.guild_id, channel_id=who.channel_id, backend=self.backend.name,
            input=request.wire(), age_restricted=who.age_restricted, cost=request.cost, asked=admission.options,
            parent_job_id=source.parent_id, plan=plan, blobs={
                "image": prepared.image_blob, "mask": prepared.mask_blob, "crop_image": Blob(crop, "image/png"),
                "crop_mask": Blob(crop_mask, "image/png"),
                **({"original": prepared.original} if prepared.original is not None else {})})
        await hold.attach(job.id)
        await self.dispatcher.enqueue(job, JobImages(prepared.image, prepared.mask))
        return Launched(job, prepared.mask_source)

    async def offer_draft(self, who: Requester, options: dict[str, Any], prepared: PreparedInputs) -> DraftOffered:
        """Keep the prepared images as a draft for `who` to confirm; nothing runs until they do."""
        draft = await self.store.drafts.create(secrets.token_urlsafe(12), who=who, image=prepared.image_blob,
                                               mask=prepared.mask_blob, params=options,
                                               source_format=prepared.source_format)
        preview = await asyncio.to_thread(mask_overlay_jpeg, prepared.image, prepared.mask)
        return DraftOffered(draft, preview, prepared.coverage)

    async def _derive(self, who: Requester, changes: dict[str, Any], parent_id: int) -> Launched:
        try:
            parent = await self.store.jobs.get(parent_id)
        except JobNotFound as exc:
            raise Refused(JobGone(parent_id)) from exc
        options = {k: v for k, v in {**parent.options(), **changes}.items() if v is not None}
        admission = await self.admissions.admit(who, options, parent_id=parent.id)
        await self._check_capabilities(admission.options)
        plan = parent.plan  # the same crop of the same picture (a job from before crop and stitch has none)
        roles = ("image", "mask", "crop_image", "crop_mask") if plan else ("image", "mask")
        request = self._request(admission, who, (CROP_IMAGE_REF, CROP_MASK_REF) if plan else (IMAGE_REF, MASK_REF))
        if plan is not None:
            request = request.model_copy(update={"image_size": ImageSize(width=plan.sent[0], height=plan.sent[1])})
        blobs = await self.store.jobs.blobs(parent.id)
        if any(role not in blobs for role in roles):
            raise Refused(await pictures_gone(self.store, parent.id))
        images = await asyncio.to_thread(_decode, blobs["image"].data, blobs["mask"].data)  # before a row exists
        hold = await self.admissions.reserve(who, request)
        job = await self.store.jobs.create(
            user_id=who.user_id, guild_id=parent.guild_id, channel_id=who.channel_id or parent.channel_id,
            backend=self.backend.name, input=request.wire(), parent_job_id=parent.id, age_restricted=who.age_restricted,
            cost=request.cost, asked=admission.options, plan=plan,
            # the blobs themselves, not their hashes: stored once by content all the same, and stored again should
            # the retention cleanup collect them meanwhile (the parent's pictures expiring as this is pressed)
            blobs={r: blobs[r] for r in (*roles, "original") if r in blobs})
        await hold.attach(job.id)
        await self.dispatcher.enqueue(job, images)
        return Launched(job)

    async def _check_capabilities(self, options: dict[str, Any]) -> None:
        if options.get("expand_prompt") and not (await self.capabilities.current(recheck_no=True)).expand_prompt:
            raise Refused(Unsupported("expand_prompt", "its worker has no prompt expander (PROMPT_EXPANDER_PATH)"))
        if not self.backend.checker_known and not self._pooled:  # unreadable at start-up: ask again now (a pool's
            # backends are asked again by the pool before they take a job)
            known = await self.capabilities.current(recheck_unknown=True)
            try:
                self.backend = fit_to_policy(self.backend, known, self.capabilities.base_url)
                if self.pool is not None:
                    self.pool.first.choice = self.backend
            except StartupError as exc:
                log.error("%s", exc)
                raise Refused(Unsupported("safety checking", "its worker has none, and the bot's moderation "
                                          "needs one (the bot's operator sets SAFETY_CHECKER_PATH)")) from exc

    @property
    def _pooled(self) -> bool:
        return self.pool is not None and len(self.pool.entries) > 1

    def _request(self, admission: Admission, who: Requester, refs: tuple[str, str]) -> InpaintInput:
        """The backend request for admitted options, images as blob references: the one validation. With a crop
        plan the backend gets the crop at its working size, as a lossless intermediate; the caller sets the size."""
        body: dict[str, Any] = {k: v for k, v in admission.options.items() if k not in STITCH_OPTION_NAMES}
        body.update(image_url=refs[0], mask_url=refs[1])
        if refs[0] == CROP_IMAGE_REF:
            body.update(image_size="square_hd", format=INTERMEDIATE_FORMAT)  # the size: a placeholder till planned
        checker = (any(entry.choice.safety_checker for entry in self.pool.entries)
                   if self.pool is not None and self._pooled else self.backend.safety_checker)
        body["enable_safety_checker"] = checker and admission.settings.safety_checker_required(who.age_restricted)
        try:
            return InpaintInput.model_validate(body)
        except ValidationError as exc:
            raise Refused(InvalidOptions(validation_problems(exc))) from exc


def _stitch_options(options: dict[str, Any]) -> StitchOptions:
    try:
        return StitchOptions.model_validate({k: v for k, v in options.items() if k in STITCH_OPTION_NAMES})
    except ValidationError as exc:
        raise Refused(InvalidOptions(validation_problems(exc))) from exc


def _target_pixels(options: dict[str, Any]) -> int:
    """The model's working resolution: the `image_size` option's pixel count, about one megapixel by default."""
    size = options.get("image_size")
    if isinstance(size, str) and size in IMAGE_SIZE_PRESETS:
        width, height = IMAGE_SIZE_PRESETS[size]
        return width * height
    if isinstance(size, dict) and isinstance(size.get("width"), int) and isinstance(size.get("height"), int):
        return max(64 * 64, int(size["width"]) * int(size["height"]))
    return TARGET_PIXELS


def _output_format(source_format: str, options: dict[str, Any]) -> OutputFormat:
    """PNG for a picture that came in losslessly (so untouched pixels stay bit-identical); otherwise the user's
    `format`, fal's default when not given."""
    if source_format.upper() in LOSSLESS_SOURCES:
        return "png"
    fmt = options.get("format", InpaintInput.model_fields["format"].default)
    return "png" if fmt == "png" else "jpeg"


def _decode(image: bytes, mask: bytes) -> JobImages:
    return JobImages(Image.open(io.BytesIO(image)).convert("RGB"), Image.open(io.BytesIO(mask)).convert("L"))
