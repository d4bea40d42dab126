"""A job and its state machine: what states exist, which moves between them are legal, and what a job holds.

A job is one inpainting request as the bot tracks it from the slash command to the posted result. Its row in
SQLite (`services/store/jobs.py`) is the source of truth; this module is what that row means.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.crop_plan import CropPlan


class JobStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.BLOCKED})

#: Legal transitions. A terminal job never changes again (a retry is a new job with `parent_job_id`).
#: `submitted/running → queued` is the re-queue after a backend lost the request (attempts is bumped).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.SUBMITTED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.BLOCKED}),
    JobStatus.SUBMITTED: frozenset({JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                                    JobStatus.CANCELLED, JobStatus.BLOCKED, JobStatus.QUEUED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.BLOCKED, JobStatus.QUEUED}),
    **{s: frozenset() for s in TERMINAL},
}


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: int, current: JobStatus, wanted: JobStatus) -> None:
        super().__init__(f"job {job_id}: illegal transition {current} → {wanted}")
        self.job_id = job_id
        self.current = current
        self.wanted = wanted


class JobNotFound(LookupError):
    pass


#: Placeholders stored in a job's input where the image and mask go; resolved from its blobs at submit time (a
#: job can be re-submitted after Discord's attachment URLs expire). A job with a crop plan sends its crop.
IMAGE_REF = "blob:image"
MASK_REF = "blob:mask"
CROP_IMAGE_REF = "blob:crop_image"
CROP_MASK_REF = "blob:crop_mask"
BLOB_REFS: dict[str, str] = {IMAGE_REF: "image", MASK_REF: "mask", CROP_IMAGE_REF: "crop_image",
                             CROP_MASK_REF: "crop_mask"}


class Job(BaseModel):
    """One job. `input` is the fal request body as sent, with blob references in place of the image URLs; `asked`
    is what its user asked for (after the server's defaults); `plan` puts the result back into the picture."""

    model_config = ConfigDict(frozen=True)

    id: int
    guild_id: int | None
    channel_id: int | None
    user_id: int
    status: JobStatus
    status_message_id: int | None
    parent_job_id: int | None
    backend: str
    backend_request_id: str | None
    status_url: str | None
    response_url: str | None
    cancel_url: str | None
    input: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: float
    updated_at: float
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    result_message_id: int | None = None
    age_restricted: bool = False
    #: denoising steps × images: what the server's daily step budget counts (0 for a job that never ran)
    cost: int = 0
    asked: dict[str, Any] | None = None  # None: a job from before crop and stitch (its input is what was asked)
    plan: CropPlan | None = None
    result_removed_at: float | None = None  # when its posted result was taken out of the channel
    #: the Idempotency-Key its current submission was (or is being) sent with; None before the first POST
    submit_key: str | None = None
    deadline_at: float | None = None  # when it must have finished at the backend (fixed when it first starts)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def options(self) -> dict[str, Any]:
        """The job's options as its user would give them again."""
        if self.asked is not None:
            return dict(self.asked)
        return {k: v for k, v in self.input.items() if k not in ("image_url", "mask_url")}


class JobEvent(BaseModel):
    """One line of a job's history: a state change, a backend log line, a queue position, a note."""

    model_config = ConfigDict(frozen=True)

    id: int
    job_id: int
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: float
