"""Why a job ended without a result, in its user's terms: what each backend error (`services/backends/fal_queue.py`)
or input error means for the job, as its end state, message and whether Retry may help. Pure: the dispatcher
records the ending."""

from __future__ import annotations

from dataclasses import dataclass

from services.backends.fal_queue import (
    FalAuthError,
    FalError,
    FalHTTPError,
    FalRequestFailed,
    FalTimeoutError,
    FalUnavailableError,
    FalValidationError,
)
from services.errors import UserError
from services.images import ImageInputError
from services.job_state import JobStatus

#: a submit whose answer was lost, on a backend that doesn't promise to honour Idempotency-Key
MAYBE_SUBMITTED = ("The connection to the backend broke while this job was being sent, so it may or may not have "
                   "started there. To be sure it doesn't run (and cost) twice, it was stopped: press Retry to run it "
                   "again.")


@dataclass(frozen=True)
class Ending:
    """How a job ends: `flagged_input` means the backend's checker flagged the upload (the job is blocked, and the
    moderation log told), and `message` is then the checker's detail."""

    status: JobStatus
    message: str
    retryable: bool = False
    flagged_input: bool = False


def ending_for(exc: FalError | UserError | ImageInputError, *, cancel_requested: bool) -> Ending:
    """The ending of a job that `exc` stopped (`cancel_requested`: its user asked to cancel it)."""
    if isinstance(exc, FalRequestFailed):
        if exc.error_type == "cancelled" or cancel_requested:
            return Ending(JobStatus.CANCELLED, "Cancelled.")
        return Ending(JobStatus.FAILED, f"The backend failed: {exc}", retryable=exc.retryable)
    if isinstance(exc, FalValidationError):
        if content_policy(exc):
            return Ending(JobStatus.BLOCKED, str(exc), flagged_input=True)
        fields = ", ".join(f for f, _ in exc.field_errors if f) or "the request"
        return Ending(JobStatus.FAILED, f"The backend refused {fields}: {exc}")
    if isinstance(exc, FalAuthError):
        return Ending(JobStatus.FAILED, "The backend refused the bot's key: ask the bot's owner to check FAL_KEY / "
                      "WORKER_KEY.")
    if isinstance(exc, (FalUnavailableError, FalTimeoutError)):
        return Ending(JobStatus.FAILED, f"The backend is unavailable right now ({exc}). Try again in a moment.",
                      retryable=True)
    if isinstance(exc, FalError):
        return Ending(JobStatus.FAILED, f"The backend answered something unexpected: {exc}", retryable=True)
    if isinstance(exc, ImageInputError) and exc.role == "result":
        return Ending(JobStatus.FAILED, f"The backend's result couldn't be fetched: {exc.message} (a result is "
                      "downloaded only from the backend itself or the hosts in RESULT_HOSTS).", retryable=True)
    return Ending(JobStatus.FAILED, exc.message)


def overdue(deadline_s: float) -> str:
    """Why a job that ran past its deadline at the backend was stopped."""
    return f"The backend didn't finish this job within {duration(deadline_s)}, so it was stopped. Try again in a while."


def content_policy(exc: FalValidationError) -> bool:
    """A 422 for content (fal's `content_policy_violation`, also what our worker sends for a flagged input)."""
    detail = exc.detail if isinstance(exc.detail, list) else []
    return exc.error_type == "content_policy_violation" or any(
        isinstance(item, dict) and item.get("type") == "content_policy_violation" for item in detail)


def refused(exc: FalHTTPError) -> bool:
    """A definite "no" to a submit (a 4xx other than the busy ones): the backend created nothing."""
    return 400 <= exc.status_code < 500 and exc.status_code not in (408, 409, 429)


def duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:g} minutes"
    return f"{seconds:g} seconds"
