"""What crop and stitch need to remember about a job: the user's options for it, and where its crop lies in the
picture (stored with the job, so a restart or a reroll puts results back the same way). The image work is in
`services/stitch.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Area = Literal["masked", "whole"]
OutputFormat = Literal["png", "jpeg"]


class StitchOptions(BaseModel):
    """The bot's own options for how a job uses the picture (fal's request has no such fields)."""

    model_config = ConfigDict(frozen=True)

    area: Area = "masked"
    padding: int | None = Field(default=None, ge=0, le=4096, description="context around the mask (None: auto)")
    feather: int = Field(default=4, ge=0, le=64, description="blend width in pixels outside the mask")
    keep_unmasked: bool = Field(default=True, description="whole area: restore the unmasked pixels afterwards")


STITCH_OPTION_NAMES = frozenset(StitchOptions.model_fields)


class CropPlan(BaseModel):
    """Where a job's crop lies in the picture and how it is sent and put back. Stored with the job."""

    model_config = ConfigDict(frozen=True)

    options: StitchOptions
    image_size: tuple[int, int]  # the picture's (the output's) width and height
    crop: tuple[int, int, int, int]  # x, y, width, height in the picture
    sent: tuple[int, int]  # the working size the backend gets
    output_format: OutputFormat
    keep: tuple[int, int, int, int] | None = None  # x, y, width, height that always come back untouched

    @property
    def box(self) -> tuple[int, int, int, int]:
        x, y, w, h = self.crop
        return x, y, x + w, y + h
