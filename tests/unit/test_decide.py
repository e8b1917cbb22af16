"""The decider: every command in every status, fencing, intake refusal and bounds."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from kernel.decide import (
    AnyCommand,
    CancelJob,
    Command,
    CompleteJob,
    CreateJob,
    FailJob,
    RefuseAtIntake,
    Rejected,
    ReportProgress,
    RetryJob,
    StartJob,
    decide,
)
from kernel.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
)
from kernel.state import Job, Status, evolve

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
RETRY_AT = T0 + timedelta(minutes=5)
LATER = T0 + timedelta(minutes=10)
JOB_ID = "j1"


def fold(*events: Event) -> Job:
    """The job the given events describe, folded with `evolve`."""
    job: Job | None = None
    for event in events:
        job = evolve(job, event)
    assert job is not None
    return job


CREATED = JobCreated(job_id=JOB_ID, at=T0, workflow_name="wf", file_path="wf/input/a.pdf")
STARTED = JobStarted(job_id=JOB_ID, at=T0 + timedelta(seconds=1), attempt=1, worker="w1")
FAILED_RETRY = JobFailed(
    job_id=JOB_ID,
    at=T0 + timedelta(seconds=2),
    attempt=1,
    error_type="Boom",
    message="boom",
    retry_at=RETRY_AT,
)
FAILED_FINAL = JobFailed(
    job_id=JOB_ID, at=T0 + timedelta(seconds=2), attempt=1, error_type="Boom", message="boom"
)
COMPLETED = JobCompleted(job_id=JOB_ID, at=T0 + timedelta(seconds=2), attempt=1)
CANCELLED = JobCancelled(job_id=JOB_ID, at=T0 + timedelta(seconds=2), actor="alice")

JOBS: dict[str, Callable[[], Job]] = {
    "pending": lambda: fold(CREATED),
    "running": lambda: fold(CREATED, STARTED),
    "waiting": lambda: fold(CREATED, STARTED, FAILED_RETRY),
    "completed": lambda: fold(CREATED, STARTED, COMPLETED),
    "failed": lambda: fold(CREATED, STARTED, FAILED_FINAL),
    "cancelled": lambda: fold(CREATED, CANCELLED),
}

# Each command built for a job, at a moment past any retry_at, with the job's own attempt,
# so that a rejection can only come from the job's status.
COMMANDS: dict[str, Callable[[Job], AnyCommand]] = {
    "start": lambda job: StartJob(job_id=job.id, at=LATER, worker="w2"),
    "progress": lambda job: ReportProgress(
        job_id=job.id, at=LATER, attempt=job.attempts, fraction=0.5, message="half"
    ),
    "complete": lambda job: CompleteJob(
        job_id=job.id,
        at=LATER,
        attempt=job.attempts,
        result={"pages": 3},
        output_paths=["wf/output/a.txt"],
    ),
    "fail": lambda job: FailJob(
        job_id=job.id,
        at=LATER,
        attempt=job.attempts,
        error_type="Boom",
        message="boom",
        traceback="tb",
        retry_at=LATER + timedelta(seconds=4),
    ),
    "refuse": lambda job: RefuseAtIntake(
        job_id=job.id, at=LATER, error_type="TooLarge", message="2 GiB > 1 GiB"
    ),
    "cancel": lambda job: CancelJob(job_id=job.id, at=LATER, actor="alice", reason="oops"),
    "retry": lambda job: RetryJob(job_id=job.id, at=LATER, actor="bob", reason="fixed"),
}

ALLOWED = {
    ("pending", "start"),
    ("waiting", "start"),
    ("running", "progress"),
    ("running", "complete"),
    ("running", "fail"),
    ("pending", "refuse"),
    ("pending", "cancel"),
    ("running", "cancel"),
    ("waiting", "cancel"),
    ("failed", "retry"),
    ("cancelled", "retry"),
}
REJECTED = sorted((s, c) for s in JOBS for c in COMMANDS if (s, c) not in ALLOWED)


def test_the_status_builders_reach_the_status_they_are_named_after() -> None:
    """Each status fixture is really in that status, so the matrix below tests what it says."""
    statuses = {name: build().status for name, build in JOBS.items()}
    assert statuses == {
        "pending": Status.PENDING,
        "running": Status.RUNNING,
        "waiting": Status.PENDING,
        "completed": Status.COMPLETED,
        "failed": Status.FAILED,
        "cancelled": Status.CANCELLED,
    }
    assert JOBS["waiting"]().retry_at == RETRY_AT


@pytest.mark.parametrize(("status", "command"), REJECTED)
def test_a_command_the_status_does_not_allow_is_rejected(status: str, command: str) -> None:
    """Every (status, command) pair outside the lifecycle is refused as invalid_transition."""
    job = JOBS[status]()
    with pytest.raises(Rejected) as excinfo:
        decide(job, COMMANDS[command](job))
    assert excinfo.value.code == "invalid_transition"


@pytest.mark.parametrize("status", sorted(JOBS))
def test_create_on_an_existing_job_is_rejected_as_exists(status: str) -> None:
    """A second CreateJob for a job id that exists, whatever its status, is refused."""
    command = CreateJob(job_id=JOB_ID, at=LATER, workflow_name="wf", file_path="wf/input/a.pdf")
    with pytest.raises(Rejected) as excinfo:
        decide(JOBS[status](), command)
    assert excinfo.value.code == "exists"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_for_an_unknown_job_is_rejected_as_not_found(command: str) -> None:
    """Every command but CreateJob needs the job to exist."""
    with pytest.raises(Rejected) as excinfo:
        decide(None, COMMANDS[command](JOBS["running"]()))
    assert excinfo.value.code == "not_found"


def test_a_command_outside_the_union_is_rejected_as_invalid() -> None:
    """A Command subclass that decide does not know is refused, not silently ignored."""

    class Unknown(Command, frozen=True):
        pass

    with pytest.raises(Rejected) as excinfo:
        decide(JOBS["pending"](), Unknown(job_id=JOB_ID, at=LATER))  # type: ignore[arg-type]
    assert excinfo.value.code == "invalid"


def test_create_produces_job_created_with_every_field() -> None:
    """CreateJob on no job yields exactly one JobCreated carrying the command's fields."""
    command = CreateJob(
        job_id="j9",
        at=T0,
        workflow_name="wf",
        file_path="wf/input/b.png",
        channel_name="scanner",
        priority=7,
        params={"dpi": 300},
        completeness="stable:500ms",
        idempotency_key="k1",
    )
    assert decide(None, command) == [
        JobCreated(
            job_id="j9",
            at=T0,
            workflow_name="wf",
            file_path="wf/input/b.png",
            channel_name="scanner",
            priority=7,
            params={"dpi": 300},
            completeness="stable:500ms",
            idempotency_key="k1",
        )
    ]


@pytest.mark.parametrize("priority", [-100, -1, 0, 1, 100])
def test_create_accepts_priorities_within_bounds(priority: int) -> None:
    """Priorities from -100 to 100 inclusive are accepted."""
    command = CreateJob(
        job_id="j9", at=T0, workflow_name="wf", file_path="wf/input/b", priority=priority
    )
    [event] = decide(None, command)
    assert isinstance(event, JobCreated)
    assert event.priority == priority


@pytest.mark.parametrize("priority", [-101, 101, -10_000, 10_000])
def test_create_rejects_priorities_out_of_bounds(priority: int) -> None:
    """A priority outside -100..100 is refused as invalid."""
    command = CreateJob(
        job_id="j9", at=T0, workflow_name="wf", file_path="wf/input/b", priority=priority
    )
    with pytest.raises(Rejected) as excinfo:
        decide(None, command)
    assert excinfo.value.code == "invalid"


@pytest.mark.parametrize("field", ["channel_name", "idempotency_key"])
@pytest.mark.parametrize("value", ["a\x00b", "tab\there", "line\n", "del\x7f"])
def test_create_rejects_control_characters_in_names_kept_in_the_row(field: str, value: str
                                                                     ) -> None:
    """A channel name or idempotency key with a control character (a NUL, which no
    PostgreSQL text column takes, failing the whole group it was written with) is refused;
    any other text is kept as given."""
    command = CreateJob(job_id="j9", at=T0, workflow_name="wf", file_path="wf/input/b",
                        **{field: value})
    with pytest.raises(Rejected) as excinfo:
        decide(None, command)
    assert excinfo.value.code == "invalid" and field in str(excinfo.value)
    fine = CreateJob(job_id="j9", at=T0, workflow_name="wf", file_path="wf/input/b",
                     **{field: "Grüße / 日本 😀 \\ \""})
    [event] = decide(None, fine)
    assert getattr(event, field) == "Grüße / 日本 😀 \\ \""


def test_start_on_a_pending_job_claims_attempt_one() -> None:
    """StartJob on a fresh pending job yields JobStarted for attempt 1 by the named worker."""
    job = JOBS["pending"]()
    assert decide(job, StartJob(job_id=JOB_ID, at=LATER, worker="w2")) == [
        JobStarted(job_id=JOB_ID, at=LATER, attempt=1, worker="w2")
    ]


def test_start_on_a_waiting_job_when_due_claims_the_next_attempt() -> None:
    """StartJob exactly at retry_at is allowed and numbers the attempt after the failed one."""
    job = JOBS["waiting"]()
    assert decide(job, StartJob(job_id=JOB_ID, at=RETRY_AT, worker="w2")) == [
        JobStarted(job_id=JOB_ID, at=RETRY_AT, attempt=2, worker="w2")
    ]


def test_start_before_retry_at_is_rejected() -> None:
    """A job waiting for its retry_at cannot be started a microsecond early."""
    job = JOBS["waiting"]()
    early = RETRY_AT - timedelta(microseconds=1)
    with pytest.raises(Rejected) as excinfo:
        decide(job, StartJob(job_id=JOB_ID, at=early))
    assert excinfo.value.code == "invalid_transition"


def test_progress_on_the_running_attempt_yields_job_progress() -> None:
    """ReportProgress from the current attempt yields one JobProgress with its message."""
    job = JOBS["running"]()
    command = ReportProgress(job_id=JOB_ID, at=LATER, attempt=1, fraction=0.25, message="p1")
    assert decide(job, command) == [
        JobProgress(job_id=JOB_ID, at=LATER, fraction=0.25, message="p1")
    ]


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (-0.5, 0.0),
        (0.0, 0.0),
        (0.75, 0.75),
        (1.0, 1.0),
        (1.5, 1.0),
        (math.inf, 1.0),
        (-math.inf, 0.0),
        (math.nan, 0.0),
    ],
)
def test_progress_fraction_is_clamped_to_zero_one(fraction: float, expected: float) -> None:
    """A fraction outside 0..1 (or NaN) reaches the log clamped into 0..1."""
    job = JOBS["running"]()
    [event] = decide(job, ReportProgress(job_id=JOB_ID, at=LATER, attempt=1, fraction=fraction))
    assert isinstance(event, JobProgress)
    assert event.fraction == expected


def test_complete_on_the_running_attempt_yields_job_completed() -> None:
    """CompleteJob from the current attempt yields JobCompleted with result and outputs."""
    job = JOBS["running"]()
    command = CompleteJob(
        job_id=JOB_ID, at=LATER, attempt=1, result={"ok": True}, output_paths=["wf/output/a.txt"]
    )
    assert decide(job, command) == [
        JobCompleted(
            job_id=JOB_ID,
            at=LATER,
            attempt=1,
            result={"ok": True},
            output_paths=["wf/output/a.txt"],
        )
    ]


@pytest.mark.parametrize("retry_at", [None, LATER + timedelta(seconds=4)])
def test_fail_on_the_running_attempt_yields_job_failed(retry_at: datetime | None) -> None:
    """FailJob from the current attempt yields JobFailed carrying the policy's retry_at."""
    job = JOBS["running"]()
    command = FailJob(
        job_id=JOB_ID,
        at=LATER,
        attempt=1,
        error_type="Timeout",
        message="took too long",
        traceback="tb",
        retry_at=retry_at,
    )
    assert decide(job, command) == [
        JobFailed(
            job_id=JOB_ID,
            at=LATER,
            attempt=1,
            error_type="Timeout",
            message="took too long",
            traceback="tb",
            retry_at=retry_at,
        )
    ]


def _running_attempt_two() -> Job:
    return fold(
        CREATED,
        STARTED,
        FAILED_RETRY,
        JobStarted(job_id=JOB_ID, at=RETRY_AT, attempt=2, worker="w2"),
    )


STALE_REPORTS: dict[str, Callable[[int], AnyCommand]] = {
    "progress": lambda n: ReportProgress(job_id=JOB_ID, at=LATER, attempt=n, fraction=0.5),
    "complete": lambda n: CompleteJob(job_id=JOB_ID, at=LATER, attempt=n),
    "fail": lambda n: FailJob(job_id=JOB_ID, at=LATER, attempt=n, error_type="E", message="m"),
}


@pytest.mark.parametrize("attempt", [0, 1, 3])
@pytest.mark.parametrize("command", sorted(STALE_REPORTS))
def test_a_report_from_another_attempt_is_fenced_off(command: str, attempt: int) -> None:
    """Progress, completion or failure from any attempt but the current one is stale_attempt."""
    job = _running_attempt_two()
    assert job.attempts == 2
    with pytest.raises(Rejected) as excinfo:
        decide(job, STALE_REPORTS[command](attempt))
    assert excinfo.value.code == "stale_attempt"


@pytest.mark.parametrize("command", sorted(STALE_REPORTS))
def test_the_current_attempt_passes_the_fence(command: str) -> None:
    """The same reports from attempt 2 of a job on attempt 2 are accepted."""
    assert len(decide(_running_attempt_two(), STALE_REPORTS[command](2))) == 1


def test_refuse_at_intake_fails_a_fresh_job_finally() -> None:
    """RefuseAtIntake on a pending job with no attempt yields a final JobFailed of attempt 0."""
    job = JOBS["pending"]()
    command = RefuseAtIntake(
        job_id=JOB_ID, at=LATER, error_type="TypeNotAllowed", message="application/x-msdownload"
    )
    [event] = decide(job, command)
    assert event == JobFailed(
        job_id=JOB_ID,
        at=LATER,
        attempt=0,
        error_type="TypeNotAllowed",
        message="application/x-msdownload",
        retry_at=None,
    )
    refused = evolve(job, event)
    assert refused.status is Status.FAILED
    assert refused.attempts == 0
    assert refused.current_path == "wf/error/j1--a.pdf"


def test_refuse_at_intake_after_an_operator_retry_of_an_attempted_job_is_rejected() -> None:
    """A job that already ran an attempt is past intake, even when pending again."""
    job = fold(CREATED, STARTED, FAILED_FINAL, JobRetried(job_id=JOB_ID, at=LATER, actor="bob"))
    assert (job.status, job.attempts) == (Status.PENDING, 1)
    with pytest.raises(Rejected) as excinfo:
        decide(job, RefuseAtIntake(job_id=JOB_ID, at=LATER, error_type="TooLarge", message="m"))
    assert excinfo.value.code == "invalid_transition"


@pytest.mark.parametrize("status", ["pending", "running", "waiting"])
def test_cancel_of_an_active_job_yields_job_cancelled(status: str) -> None:
    """A pending, running or waiting job is cancelled with the actor and reason recorded."""
    job = JOBS[status]()
    assert decide(job, CancelJob(job_id=JOB_ID, at=LATER, actor="alice", reason="oops")) == [
        JobCancelled(job_id=JOB_ID, at=LATER, actor="alice", reason="oops")
    ]


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_retry_of_a_finished_unsuccessful_job_yields_job_retried(status: str) -> None:
    """An operator may send a finally failed or cancelled job back to the queue."""
    job = JOBS[status]()
    assert decide(job, RetryJob(job_id=JOB_ID, at=LATER, actor="bob", reason="fixed")) == [
        JobRetried(job_id=JOB_ID, at=LATER, actor="bob", reason="fixed")
    ]


def test_rejected_carries_code_and_detail() -> None:
    """Rejected exposes a machine code and a human detail that names the job."""
    with pytest.raises(Rejected) as excinfo:
        decide(JOBS["completed"](), CancelJob(job_id=JOB_ID, at=LATER, actor="alice"))
    assert excinfo.value.code == "invalid_transition"
    assert JOB_ID in excinfo.value.detail
    assert str(excinfo.value) == excinfo.value.detail
