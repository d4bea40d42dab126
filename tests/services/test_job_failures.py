"""What a backend error means for a job, and how long an outage is waited for: pure rules, checked directly."""

from __future__ import annotations

import pytest

from services.backends.fal_queue import (
    FalAuthError,
    FalHTTPError,
    FalRequestFailed,
    FalSubmitUncertain,
    FalValidationError,
)
from services.images import ImageInputError
from services.job_failures import ending_for, overdue, refused
from services.job_state import JobStatus
from services.outage import Outage


def test_endings_say_what_happened_and_whether_retry_helps() -> None:
    flagged = FalValidationError("flagged", status_code=422, error_type="content_policy_violation")
    assert ending_for(flagged, cancel_requested=False).flagged_input
    cancelled = FalRequestFailed("stopped", error_type="runner_disconnected")
    assert ending_for(cancelled, cancel_requested=True).status is JobStatus.CANCELLED
    assert ending_for(cancelled, cancel_requested=False).retryable  # fal says a runner disconnect can pass
    auth = ending_for(FalAuthError("no", status_code=401), cancel_requested=False)
    assert "FAL_KEY" in auth.message and not auth.retryable
    outage = ending_for(FalSubmitUncertain("lost"), cancel_requested=False)
    assert outage.status is JobStatus.FAILED and outage.retryable
    result = ending_for(ImageInputError("download_failed", "That link could not be downloaded.", role="result"),
                        cancel_requested=False)
    assert "RESULT_HOSTS" in result.message and result.retryable
    assert overdue(600) == ("The backend didn't finish this job within 10 minutes, so it was stopped. Try again in "
                            "a while.")


@pytest.mark.parametrize(("code", "nothing_created"), [(400, True), (404, True), (422, True), (408, False),
                                                       (429, False), (500, False), (503, False)])
def test_only_a_definite_no_means_the_backend_created_nothing(code: int, nothing_created: bool) -> None:
    assert refused(FalHTTPError("x", status_code=code)) is nothing_created


def test_an_outage_is_waited_for_with_backoff_up_to_its_limit() -> None:
    now = [0.0]
    outage = Outage(20.0, clock=lambda: now[0])
    delays = []
    while (delay := outage.next_delay()) is not None:
        delays.append(delay)
        now[0] += delay
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 4.5] and sum(delays) == pytest.approx(20.0)
    outage.over()  # the backend answered: the next outage starts afresh
    assert outage.next_delay() == 0.5 and outage.tries == 1
