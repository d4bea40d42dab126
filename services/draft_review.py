"""Confirm-your-mask drafts (servers that ask for it): the user sees the mask over their image, and confirms,
inverts or cancels before anything is spent. Creating a draft is the launcher's (`Launcher.offer_draft`); this
is what happens to one afterwards."""

from __future__ import annotations

import asyncio

from PIL import ImageOps

from services.blob import Blob
from services.images import IntakeLimits, PreparedInputs, check_coverage, encode_image, mask_coverage
from services.launch import DraftOffered, NewImages, prepare_stored
from services.preview import mask_overlay_jpeg
from services.refusals import DraftGone, Refused
from services.store import Store
from services.store.drafts import Draft


class DraftReview:
    def __init__(self, store: Store, limits: IntakeLimits) -> None:
        self.store = store
        self.limits = limits

    async def get(self, draft_id: str) -> Draft:
        draft = await self.store.drafts.get(draft_id)
        if draft is None:
            raise Refused(DraftGone())
        return draft

    def confirmed(self, draft_id: str) -> NewImages:
        """The draft's images as the source of a job: taking them uses the draft up (a second Confirm is
        refused). Admission runs first, so a Confirm refused by a ban, a quota or a filter leaves the draft in
        place (the options were validated when the draft was made)."""

        async def prepare() -> PreparedInputs:
            draft = await self.store.drafts.take(draft_id)
            if draft is None:
                raise Refused(DraftGone())
            return await self._prepared(draft)

        return NewImages(prepare, may_draft=False)

    async def invert(self, draft_id: str) -> DraftOffered:
        """Swap the draft's mask (repaint what was to be kept); refused if that repaints nothing or everything."""
        draft = await self.get(draft_id)
        prepared = await self._prepared(draft)

        def invert() -> tuple[Blob, bytes, float]:
            mask = ImageOps.invert(prepared.mask.convert("L"))
            coverage = mask_coverage(mask)
            check_coverage(coverage)
            return Blob(encode_image(mask, "png"), "image/png"), mask_overlay_jpeg(prepared.image, mask), coverage

        mask, preview, coverage = await asyncio.to_thread(invert)
        await self.store.drafts.replace_mask(draft.id, mask)
        return DraftOffered(draft.model_copy(update={"mask_sha256": mask.sha256}), preview, coverage)

    async def cancel(self, draft_id: str) -> None:
        await self.store.drafts.take(draft_id)

    async def _prepared(self, draft: Draft) -> PreparedInputs:
        return await prepare_stored(self.store, self.limits, draft.image_sha256, draft.mask_sha256,
                                    source_format=draft.source_format)
