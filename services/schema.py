"""Pydantic models for `fal-ai/fast-sdxl/inpainting` and fal's queue protocol, field for field.

Sources: fal's queue documentation (https://docs.fal.ai/model-apis/model-endpoints/queue) for the queue
bodies, and the model's page (https://fal.ai/models/fal-ai/fast-sdxl/inpainting/api) for its input and output.
The bot, the fal client and the worker all validate with these models: one definition of the wire format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]

#: fal toolkit `IMAGE_SIZE_PRESETS`: preset name → (width, height).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

MAX_IMAGE_SIDE = 14142
INPAINT_APP_ID = "fal-ai/fast-sdxl/inpainting"
#: the longest link (anything but a `data:` URI, whose size the request body's cap and the image byte cap bound)
MAX_URL_CHARS = 8192
#: the longest LoRA or embedding path
MAX_PATH_CHARS = 4096


def _printable(value: str, what: str) -> str:
    """Refuse control characters (CR, LF, NUL, …) and whitespace of any kind: no link or path has them, and a
    header or log line must not get them from a user. (`isprintable` is false for controls and separators except
    the ASCII space, checked apart: both C-speed, even on a 30 MB data URI.)"""
    if not value.isprintable() or " " in value:
        raise ValueError(f"{what} may not contain whitespace or control characters")
    return value


def _url(value: str) -> str:
    if value[:5].lower() != "data:" and len(value) > MAX_URL_CHARS:
        raise ValueError(f"a URL may be at most {MAX_URL_CHARS} characters long (or send the image as a data URI)")
    return _printable(value, "a URL")


def _path(value: str) -> str:
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"a path may be at most {MAX_PATH_CHARS} characters long")
    return _printable(value, "a path")


#: an image input: an http(s) link or a data URI (fal's file inputs), one line of printable characters
ImageUrl = Annotated[str, Field(min_length=1), AfterValidator(_url)]
#: a LoRA's or embedding's "URL or path", one line of printable characters
AssetPath = Annotated[str, AfterValidator(_path)]


class _Wire(BaseModel):
    """Base for wire models: unknown keys are kept so a newer server's fields round-trip unchanged."""

    model_config = ConfigDict(extra="allow")


class ImageSize(_Wire):
    width: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)] = 512
    height: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)] = 512


class LoraWeight(_Wire):
    path: AssetPath = Field(description="URL or path to the LoRA weights (safetensors)")
    scale: Annotated[float, Field(ge=0, le=1)] = 1.0
    force: bool = False


class Embedding(_Wire):
    path: AssetPath = Field(description="URL or path to the embedding weights")
    tokens: list[str] = Field(default_factory=lambda: ["<s0>", "<s1>"])


class InpaintInput(BaseModel):
    """The request body of `fal-ai/fast-sdxl/inpainting` (all 17 fields, fal's defaults and ranges)."""

    # fal's own endpoint ignores keys it doesn't know; so do we (a newer client's extra field is no error).
    model_config = ConfigDict(extra="ignore")

    image_url: ImageUrl
    mask_url: ImageUrl
    prompt: str
    negative_prompt: str = ""
    image_size: ImageSize | ImageSizePreset = "square_hd"
    num_inference_steps: Annotated[int, Field(ge=1, le=65)] = 25
    guidance_scale: Annotated[float, Field(ge=0, le=20)] = 7.5
    strength: Annotated[float, Field(ge=0.01, le=1)] = 0.95
    seed: NonNegativeInt | None = None
    num_images: Annotated[int, Field(ge=1, le=8)] = 1
    sync_mode: bool = False
    loras: list[LoraWeight] = Field(default_factory=list)
    embeddings: list[Embedding] = Field(default_factory=list)
    enable_safety_checker: bool = True
    safety_checker_version: Literal["v1", "v2"] = "v1"
    expand_prompt: bool = False
    format: Literal["jpeg", "png"] = "jpeg"
    request_id: str = ""

    def size_pixels(self) -> tuple[int, int]:
        """The requested output size as (width, height)."""
        if isinstance(self.image_size, str):
            return IMAGE_SIZE_PRESETS[self.image_size]
        return self.image_size.width, self.image_size.height

    @property
    def cost(self) -> int:
        """Denoising steps × images: what the request costs (the unit of a server's daily step budget)."""
        return self.num_inference_steps * self.num_images

    def wire(self) -> dict[str, Any]:
        """The JSON body to send: fields the user set, plus every field that differs from fal's default."""
        return self.model_dump(mode="json", exclude_unset=True)


def step_cost(options: Mapping[str, Any]) -> int:
    """`InpaintInput.cost` for options not validated yet: fal's defaults stand in for what is not given."""
    fields = InpaintInput.model_fields
    steps = options.get("num_inference_steps") or fields["num_inference_steps"].default
    images = options.get("num_images") or fields["num_images"].default
    return int(steps) * int(images)


class OutputImage(_Wire):
    url: str
    width: int
    height: int
    content_type: str = "image/jpeg"


class InpaintOutput(_Wire):
    """The result body of `fal-ai/fast-sdxl/inpainting`."""

    images: list[OutputImage]
    timings: dict[str, float]
    seed: NonNegativeInt = Field(description="Unbounded: fal returns seeds above 2**63")
    has_nsfw_concepts: list[bool]
    prompt: str


# --- the upload check: fal-ai/imageutils/nsfw ----------------------------------------------------------
#: fal's NSFW estimator (https://fal.ai/docs/model-api-reference/vision-api/imageutils.md): one image in, the
#: probability that it is NSFW out. Our worker serves the same app id with its safety checker.
NSFW_APP_ID = "fal-ai/imageutils/nsfw"


class NsfwCheckInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image_url: ImageUrl


class NsfwCheckOutput(_Wire):
    nsfw_probability: Annotated[float, Field(ge=0, le=1)]


# --- queue protocol ---------------------------------------------------------------------------------

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


class RequestLog(_Wire):
    """One backend log line. Every field is optional: real fal captures omit `level`/`source`."""

    message: str = ""
    level: str | None = None
    source: str | None = None
    timestamp: str | None = None


class QueueHandle(_Wire):
    """The submit response: where to follow the request. Only these URLs are used afterwards."""

    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    status: QueueState | None = None
    queue_position: int | None = None


class _StatusBase(_Wire):
    request_id: str | None = None
    response_url: str | None = None
    status_url: str | None = None
    cancel_url: str | None = None


class InQueueStatus(_StatusBase):
    status: Literal["IN_QUEUE"]
    queue_position: NonNegativeInt


class InProgressStatus(_StatusBase):
    status: Literal["IN_PROGRESS"]
    logs: list[RequestLog] | None
    metrics: dict[str, Any] = Field(default_factory=dict)


class CompletedStatus(_StatusBase):
    status: Literal["COMPLETED"]
    logs: list[RequestLog] | None
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None


QueueStatus = Annotated[InQueueStatus | InProgressStatus | CompletedStatus, Field(discriminator="status")]

CancelOutcome = Literal["OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class ValidationErrorItem(_Wire):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(_Wire):
    """fal's error envelope: `detail` is a list of field errors (422) or a plain string (infrastructure)."""

    detail: list[ValidationErrorItem] | str | None = None
    error_type: str | None = None
