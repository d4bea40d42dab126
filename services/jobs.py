"""Jobs as users see them: created from validated inputs, derived (reroll, variations, edit, retry), and turned
back into the backend request from stored blobs (so a job can be re-submitted after Discord URLs expire)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from services.errors import UserError
from services.images import PreparedInputs, to_data_uri
from services.schema import InpaintInput
from services.store import Job, JobStore

#: Placeholders stored in a job's input where the image and mask go; resolved from blobs at submit time.
IMAGE_REF = "blob:image"
MASK_REF = "blob:mask"
_REFS = {IMAGE_REF: "image", MASK_REF: "mask"}

#: SDXL works best near one megapixel; "auto" picks a size of the image's shape with about that many pixels.
TARGET_PIXELS = 1024 * 1024


def auto_size(width: int, height: int, *, target: int = TARGET_PIXELS, multiple: int = 64) -> dict[str, int]:
    """An output size with the image's aspect ratio and about `target` pixels, in multiples of `multiple`."""
    scale = (target / (width * height)) ** 0.5
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    return {"width": w, "height": h}


class JobService:
    def __init__(self, store: JobStore, *, backend: str, safety_checker: bool = True) -> None:
        self.store = store
        self.backend = backend
        #: False only for a backend that has no checker (the embedded classic fill, which paints no new content)
        self.safety_checker = safety_checker

    def validate(self, params: dict[str, Any]) -> InpaintInput:
        """The fal input for these options (image and mask as blob references), or a `UserError`."""
        body = {"image_url": IMAGE_REF, "mask_url": MASK_REF, **params}
        if not self.safety_checker:
            body["enable_safety_checker"] = False
        try:
            return InpaintInput.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise UserError(f"Some options are not valid: {problems}") from exc

    async def create(self, prepared: PreparedInputs, params: dict[str, Any], *, user_id: int,
                     guild_id: int | None, channel_id: int | None, age_restricted: bool = False) -> Job:
        """Store a new queued job with its image and mask as content-addressed blobs."""
        if params.get("image_size") in (None, "auto"):
            params = {**params, "image_size": auto_size(*prepared.size)}
        inp = self.validate(params)
        return await self.store.create_job(
            user_id=user_id, guild_id=guild_id, channel_id=channel_id, backend=self.backend, input=inp.wire(),
            age_restricted=age_restricted,
            blobs={"image": (prepared.image_blob.data, prepared.image_blob.content_type),
                   "mask": (prepared.mask_blob.data, prepared.mask_blob.content_type)})

    @staticmethod
    def merged_params(parent: Job, changes: dict[str, Any]) -> dict[str, Any]:
        """An earlier job's options with some changed; a change to None removes the option (e.g. the seed)."""
        params = {k: v for k, v in parent.input.items() if k not in ("image_url", "mask_url")}
        params.update(changes)
        return {k: v for k, v in params.items() if v is not None}

    async def derive(self, parent: Job, params: dict[str, Any], *, user_id: int, channel_id: int | None = None,
                     age_restricted: bool | None = None) -> Job:
        """A new job from an earlier one (reroll, variations, edit, retry) with these complete options, sharing
        the parent's input blobs."""
        inp = self.validate(params)
        blobs = await self.store.job_blobs(parent.id)
        refs: dict[str, str] = {role: blobs[role].sha256 for role in ("image", "mask") if role in blobs}
        if len(refs) != 2:
            raise UserError(f"Job #{parent.id}'s images are no longer stored, so it can't be run again.")
        return await self.store.create_job(
            user_id=user_id, guild_id=parent.guild_id, channel_id=channel_id or parent.channel_id,
            backend=self.backend, input=inp.wire(), parent_job_id=parent.id, blob_refs=refs,
            age_restricted=parent.age_restricted if age_restricted is None else age_restricted)

    async def backend_input(self, job: Job) -> dict[str, Any]:
        """The request body to send: the stored input with blob references replaced by data URIs."""
        blobs = await self.store.job_blobs(job.id)
        body = dict(job.input)
        for key in ("image_url", "mask_url"):
            role = _REFS.get(body.get(key, ""))
            if role is not None:
                blob = blobs.get(role)
                if blob is None:
                    raise UserError(f"Job #{job.id}'s {role} is no longer stored.")
                body[key] = to_data_uri(blob.data, blob.content_type)
        return body
