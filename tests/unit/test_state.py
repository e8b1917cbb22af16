"""The status fold: lifecycles, file paths, versions, log stamps, replay and wire format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from kernel.events import (
    EVENT_TYPES,
    AnyEvent,
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobDuplicateReceived,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
    decode_event,
    encode_event,
    event_tag,
)
from kernel.state import ErrorInfo, Job, Status, StoredEvent, apply, evolve, replay

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """A fixed moment `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def created(
    job_id: str = "j1",
    file_path: str = "wf/input/a.pdf",
    *,
    channel_name: str | None = None,
    priority: int = 0,
    params: dict[str, Any] | None = None,
    completeness: str = "submitted",
    idempotency_key: str | None = None,
) -> JobCreated:
    return JobCreated(
        job_id=job_id,
        at=T0,
        workflow_name="wf",
        file_path=file_path,
        channel_name=channel_name,
        priority=priority,
        params=params or {},
        completeness=completeness,
        idempotency_key=idempotency_key,
    )


def fold(events: list[Event]) -> list[Job]:
    """Every intermediate job state, one per event."""
    states: list[Job] = []
    job: Job | None = None
    for event in events:
        job = evolve(job, event)
        states.append(job)
    return states


def test_created_job_is_pending_at_its_input_path() -> None:
    """JobCreated makes a pending job, version 1, whose file is where it was submitted."""
    job = evolve(
        None,
        created(
            channel_name="scan",
            priority=5,
            params={"dpi": 300},
            completeness="marker",
            idempotency_key="k",
        ),
    )
    assert job == Job(
        id="j1",
        workflow_name="wf",
        file_path="wf/input/a.pdf",
        current_path="wf/input/a.pdf",
        channel_name="scan",
        priority=5,
        params={"dpi": 300},
        completeness="marker",
        idempotency_key="k",
        status=Status.PENDING,
        created_at=T0,
        updated_at=T0,
        version=1,
    )
    assert job.is_active


def test_successful_lifecycle_moves_the_file_input_processing_archive() -> None:
    """Created -> Started -> Progress -> Completed walks statuses, paths and versions in step."""
    done_at = datetime(2024, 3, 1, 18, 30, tzinfo=UTC)
    states = fold(
        [
            created(),
            JobStarted(job_id="j1", at=at(1), attempt=1, worker="w1"),
            JobProgress(job_id="j1", at=at(2), fraction=0.5, message="half"),
            JobCompleted(
                job_id="j1",
                at=done_at,
                attempt=1,
                result={"pages": 3},
                output_paths=["wf/output/a.txt"],
            ),
        ]
    )
    assert [s.status for s in states] == [
        Status.PENDING,
        Status.RUNNING,
        Status.RUNNING,
        Status.COMPLETED,
    ]
    assert [s.current_path for s in states] == [
        "wf/input/a.pdf",
        "wf/processing/j1--a.pdf",
        "wf/processing/j1--a.pdf",
        "wf/archive/2024-03-01/j1--a.pdf",
    ]
    assert [s.version for s in states] == [1, 2, 3, 4]
    assert [s.updated_at for s in states] == [T0, at(1), at(2), done_at]
    running, progressed, done = states[1:]
    assert (running.attempts, running.started_at, running.progress) == (1, at(1), 0.0)
    assert (progressed.progress, progressed.progress_message) == (0.5, "half")
    assert (done.progress, done.result, done.output_paths) == (
        1.0,
        {"pages": 3},
        ("wf/output/a.txt",),
    )
    assert done.finished_at == done_at
    assert done.error is None
    assert not done.is_active


@pytest.mark.parametrize(
    ("done_at", "day"),
    [
        (datetime(2024, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), "2024-02-29"),
        (datetime(2024, 3, 1, 20, 0, tzinfo=timezone(timedelta(hours=-5))), "2024-03-02"),
        (datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC), "2024-12-31"),
    ],
)
def test_archive_folder_is_the_utc_day_of_completion(done_at: datetime, day: str) -> None:
    """The archive date is the UTC calendar day, whatever offset the completion time carries."""
    states = fold(
        [
            created(),
            JobStarted(job_id="j1", at=at(1), attempt=1),
            JobCompleted(job_id="j1", at=done_at, attempt=1),
        ]
    )
    assert states[-1].current_path == f"wf/archive/{day}/j1--a.pdf"


def test_stored_name_uses_the_base_name_of_a_nested_input() -> None:
    """A file submitted from a sub-folder of input/ keeps only its base name once claimed."""
    states = fold(
        [
            created(file_path="wf/input/2024/batch/scan.tif"),
            JobStarted(job_id="j1", at=at(1), attempt=1),
        ]
    )
    assert states[-1].current_path == "wf/processing/j1--scan.tif"
    assert states[-1].file_path == "wf/input/2024/batch/scan.tif"


def test_retry_lifecycle_waits_in_processing_then_fails_into_error() -> None:
    """A retryable failure waits pending in processing/; the final failure moves it to error/."""
    retry_at = at(60)
    states = fold(
        [
            created(),
            JobStarted(job_id="j1", at=at(1), attempt=1),
            JobProgress(job_id="j1", at=at(2), fraction=0.4),
            JobFailed(
                job_id="j1",
                at=at(3),
                attempt=1,
                error_type="Timeout",
                message="slow",
                traceback="tb1",
                retry_at=retry_at,
            ),
            JobStarted(job_id="j1", at=retry_at, attempt=2),
            JobFailed(
                job_id="j1", at=at(90), attempt=2, error_type="Boom", message="bad", traceback="tb2"
            ),
        ]
    )
    waiting, restarted, failed = states[3], states[4], states[5]
    assert waiting.status is Status.PENDING
    assert waiting.retry_at == retry_at
    assert waiting.current_path == "wf/processing/j1--a.pdf"
    assert waiting.error == ErrorInfo(type="Timeout", message="slow", traceback="tb1")
    assert waiting.finished_at is None
    assert (restarted.status, restarted.attempts) == (Status.RUNNING, 2)
    assert (restarted.retry_at, restarted.progress, restarted.started_at) == (None, 0.0, retry_at)
    assert restarted.current_path == "wf/processing/j1--a.pdf"
    assert failed.status is Status.FAILED
    assert failed.current_path == "wf/error/j1--a.pdf"
    assert failed.error == ErrorInfo(type="Boom", message="bad", traceback="tb2")
    assert (failed.finished_at, failed.retry_at) == (at(90), None)
    assert [s.version for s in states] == [1, 2, 3, 4, 5, 6]


def test_refused_at_intake_goes_from_input_straight_to_error() -> None:
    """Created -> Failed(final, attempt 0) fails the job with no attempt and files it in error/."""
    states = fold(
        [
            created(),
            JobFailed(job_id="j1", at=at(1), attempt=0, error_type="TooLarge", message="2 GiB"),
        ]
    )
    refused = states[-1]
    assert (refused.status, refused.attempts, refused.version) == (Status.FAILED, 0, 2)
    assert refused.current_path == "wf/error/j1--a.pdf"
    assert refused.started_at is None
    assert refused.error == ErrorInfo(type="TooLarge", message="2 GiB")


@pytest.mark.parametrize("started", [False, True])
def test_cancel_files_the_input_in_error_and_records_the_actor(started: bool) -> None:
    """A cancelled job, pending or running, rests in error/ with who cancelled it and why."""
    events: list[Event] = [created()]
    if started:
        events.append(JobStarted(job_id="j1", at=at(1), attempt=1))
    events.append(JobCancelled(job_id="j1", at=at(5), actor="alice", reason="wrong file"))
    cancelled = fold(events)[-1]
    assert cancelled.status is Status.CANCELLED
    assert cancelled.current_path == "wf/error/j1--a.pdf"
    assert cancelled.error == ErrorInfo(type="Cancelled", message="wrong file", actor="alice")
    assert (cancelled.finished_at, cancelled.retry_at) == (at(5), None)
    assert cancelled.version == len(events)


def test_cancel_of_a_waiting_job_clears_its_retry_at() -> None:
    """Cancelling a job that waits for a retry leaves no retry_at behind."""
    cancelled = fold(
        [
            created(),
            JobStarted(job_id="j1", at=at(1), attempt=1),
            JobFailed(
                job_id="j1", at=at(2), attempt=1, error_type="E", message="m", retry_at=at(60)
            ),
            JobCancelled(job_id="j1", at=at(3), actor="alice"),
        ]
    )[-1]
    assert (cancelled.status, cancelled.retry_at) == (Status.CANCELLED, None)


def test_operator_retry_returns_the_job_to_pending_and_the_next_claim_to_processing() -> None:
    """Retried makes a failed job pending (file still in error/) and Started claims it again."""
    states = fold(
        [
            created(),
            JobStarted(job_id="j1", at=at(1), attempt=1),
            JobFailed(job_id="j1", at=at(2), attempt=1, error_type="Boom", message="m"),
            JobRetried(job_id="j1", at=at(10), actor="bob", reason="fixed the input"),
            JobStarted(job_id="j1", at=at(11), attempt=2),
        ]
    )
    retried, restarted = states[3], states[4]
    assert (retried.status, retried.finished_at, retried.retry_at) == (Status.PENDING, None, None)
    assert retried.current_path == "wf/error/j1--a.pdf"
    assert retried.attempts == 1
    assert retried.updated_at == at(10)
    assert restarted.current_path == "wf/processing/j1--a.pdf"
    assert (restarted.status, restarted.attempts) == (Status.RUNNING, 2)


def test_an_event_for_an_unknown_job_is_refused() -> None:
    """Only JobCreated may start a job's history; anything else on None raises ValueError."""
    with pytest.raises(ValueError, match="unknown job j1"):
        evolve(None, JobStarted(job_id="j1", at=T0, attempt=1))


def test_evolve_does_not_mutate_the_job_it_was_given() -> None:
    """Jobs are frozen values: evolve returns a new job and leaves the old one as it was."""
    job = evolve(None, created())
    before = msgspec.structs.asdict(job)
    evolve(job, JobStarted(job_id="j1", at=at(1), attempt=1))
    assert msgspec.structs.asdict(job) == before


def stored(seq: int, version: int, event: AnyEvent) -> StoredEvent:
    return StoredEvent(seq=seq, job_id=event.job_id, version=version, event=event)


def test_apply_stamps_seq_and_keeps_created_seq_from_the_creation() -> None:
    """apply records the last seq applied and the seq of JobCreated as the FIFO key."""
    job = apply(None, stored(5, 1, created()))
    assert (job.seq, job.created_seq, job.version) == (5, 5, 1)
    job = apply(job, stored(9, 2, JobStarted(job_id="j1", at=at(1), attempt=1)))
    assert (job.seq, job.created_seq, job.version) == (9, 5, 2)
    job = apply(job, stored(12, 3, JobProgress(job_id="j1", at=at(2), fraction=0.1)))
    assert (job.seq, job.created_seq, job.version) == (12, 5, 3)


def _interleaved_log() -> list[StoredEvent]:
    return [
        stored(1, 1, created("a")),
        stored(2, 1, created("b", file_path="wf/input/b.png", priority=3)),
        stored(3, 2, JobStarted(job_id="b", at=at(1), attempt=1)),
        stored(4, 2, JobStarted(job_id="a", at=at(2), attempt=1)),
        stored(5, 3, JobCompleted(job_id="b", at=at(3), attempt=1)),
        stored(
            6,
            3,
            JobFailed(
                job_id="a", at=at(4), attempt=1, error_type="E", message="m", retry_at=at(30)
            ),
        ),
        stored(7, 1, created("c", file_path="wf/input/c.txt")),
        stored(8, 2, JobCancelled(job_id="c", at=at(5), actor="alice")),
    ]


def test_replay_equals_the_step_by_step_fold() -> None:
    """replay over an interleaved log gives each job the state of folding its own events."""
    log = _interleaved_log()
    by_hand: dict[str, Job] = {}
    for job_id in ("a", "b", "c"):
        job: Job | None = None
        for entry in log:
            if entry.job_id == job_id:
                job = apply(job, entry)
        assert job is not None
        by_hand[job_id] = job
    assert replay(log) == by_hand


def test_replay_of_an_interleaved_log_reaches_the_expected_states() -> None:
    """replay's result matches states written out by hand, not only its own building blocks."""
    jobs = replay(_interleaved_log())
    summary = {
        job_id: (j.status, j.version, j.seq, j.created_seq, j.current_path)
        for job_id, j in jobs.items()
    }
    assert summary == {
        "a": (Status.PENDING, 3, 6, 1, "wf/processing/a--a.pdf"),
        "b": (Status.COMPLETED, 3, 5, 2, "wf/archive/2024-03-01/b--b.png"),
        "c": (Status.CANCELLED, 2, 8, 7, "wf/error/c--c.txt"),
    }
    assert jobs["a"].retry_at == at(30)
    assert replay([]) == {}


def test_replay_of_a_prefix_is_the_state_at_that_seq() -> None:
    """Replaying the log up to a seq gives the state every job had at that point."""
    jobs = replay(_interleaved_log()[:4])
    assert {k: (v.status, v.seq) for k, v in jobs.items()} == {
        "a": (Status.RUNNING, 4),
        "b": (Status.RUNNING, 3),
    }


EXPECTED_TAGS = {
    JobCreated: "job.created",
    JobStarted: "job.started",
    JobProgress: "job.progress",
    JobFailed: "job.failed",
    JobCompleted: "job.completed",
    JobCancelled: "job.cancelled",
    JobRetried: "job.retried",
    JobDuplicateReceived: "job.duplicate_received",
}

ONE_OF_EACH: list[Event] = [
    created(
        channel_name="scan",
        priority=-3,
        params={"dpi": 300, "tags": ["x"]},
        completeness="stable:500ms",
        idempotency_key="k1",
    ),
    JobStarted(job_id="j1", at=at(1), attempt=2, worker="host:42"),
    JobProgress(job_id="j1", at=at(2), fraction=0.25, message="page 1/4"),
    JobFailed(
        job_id="j1",
        at=at(3),
        attempt=2,
        error_type="Timeout",
        message="slow",
        traceback="Traceback ...",
        retry_at=at(60),
    ),
    JobCompleted(
        job_id="j1", at=at(4), attempt=3, result={"pages": 4}, output_paths=["wf/output/a.txt"]
    ),
    JobCancelled(job_id="j1", at=at(5), actor="alice", reason="oops"),
    JobRetried(job_id="j1", at=at(6), actor="bob", reason="fixed"),
]


def test_every_event_type_has_its_stable_wire_tag() -> None:
    """The seven event classes carry exactly the dotted tags the log already holds."""
    assert {cls: cls.__struct_config__.tag for cls in EVENT_TYPES} == EXPECTED_TAGS
    assert [event_tag(e) for e in ONE_OF_EACH] == [EXPECTED_TAGS[type(e)] for e in ONE_OF_EACH]


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: type(e).__name__)
def test_events_round_trip_through_the_wire_format(event: Event) -> None:
    """encode_event then decode_event gives back an equal event of the same class and tag."""
    payload = encode_event(event)
    assert msgspec.json.decode(payload)["type"] == EXPECTED_TAGS[type(event)]
    decoded = decode_event(payload)
    assert type(decoded) is type(event)
    assert decoded == event
    assert decoded.at.utcoffset() == timedelta(0)


def test_a_stored_payload_written_by_hand_still_decodes() -> None:
    """A literal payload in the documented shape decodes, defaults filling missing fields."""
    event = decode_event(
        '{"type":"job.failed","job_id":"j1","at":"2024-03-01T12:00:00Z",'
        '"error_type":"TooLarge","message":"2 GiB"}'
    )
    assert event == JobFailed(
        job_id="j1",
        at=T0,
        error_type="TooLarge",
        message="2 GiB",
        attempt=0,
        traceback="",
        retry_at=None,
    )


def test_an_unknown_tag_does_not_decode() -> None:
    """A payload whose tag is not one of ours is refused rather than guessed."""
    with pytest.raises(msgspec.ValidationError):
        decode_event('{"type":"job.exploded","job_id":"j1","at":"2024-03-01T12:00:00Z"}')
