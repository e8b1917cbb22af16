"""The queue projection: priority, FIFO, retry_at, aging, capacity filter and replacement."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.queue import JobQueue
from kernel.state import Job, Status

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def make_job(
    job_id: str,
    *,
    priority: int = 0,
    created_seq: int,
    workflow: str = "wf",
    ready_at: datetime = T0,
    retry_at: datetime | None = None,
    status: Status = Status.PENDING,
) -> Job:
    """A queued job created (and last updated) at `ready_at`."""
    return Job(
        id=job_id,
        workflow_name=workflow,
        file_path=f"{workflow}/input/{job_id}",
        current_path=f"{workflow}/input/{job_id}",
        priority=priority,
        status=status,
        created_at=ready_at,
        updated_at=ready_at,
        retry_at=retry_at,
        created_seq=created_seq,
        seq=created_seq,
    )


def drain(queue: JobQueue, now: datetime) -> list[str]:
    """The ids of every job a run of picks at `now` returns, in order."""
    ids: list[str] = []
    while (job := queue.pick(now)) is not None:
        ids.append(job.id)
    return ids


def queue_of(*jobs: Job, aging_interval_s: float | None = None) -> JobQueue:
    queue = JobQueue(aging_interval_s)
    for job in jobs:
        queue.push(job)
    return queue


def test_higher_priority_runs_first() -> None:
    """Among ready jobs the highest priority is picked first, whatever the push order."""
    queue = queue_of(
        make_job("low", priority=-5, created_seq=1),
        make_job("high", priority=50, created_seq=3),
        make_job("mid", priority=0, created_seq=2),
    )
    assert drain(queue, T0) == ["high", "mid", "low"]
    assert len(queue) == 0


def test_fifo_by_created_seq_within_one_priority() -> None:
    """Within one priority jobs run in the order of their JobCreated seq, not of push."""
    queue = queue_of(*(make_job(f"j{s}", created_seq=s) for s in (7, 3, 9, 1, 5)))
    assert drain(queue, T0) == ["j1", "j3", "j5", "j7", "j9"]


def test_fifo_holds_across_workflows_at_one_priority() -> None:
    """Two workflows at the same priority interleave by created_seq: one central queue."""
    queue = queue_of(
        make_job("a1", created_seq=1, workflow="a"),
        make_job("b2", created_seq=2, workflow="b"),
        make_job("a3", created_seq=3, workflow="a"),
        make_job("b4", created_seq=4, workflow="b"),
    )
    assert drain(queue, T0) == ["a1", "b2", "a3", "b4"]


def test_a_job_waiting_for_retry_at_is_not_picked_before_it_is_due() -> None:
    """A job with retry_at in the future stays queued and is picked once the time comes."""
    due = T0 + 5 * MINUTE
    queue = queue_of(make_job("r", priority=100, created_seq=1, retry_at=due))
    assert queue.pick(due - timedelta(microseconds=1)) is None
    assert "r" in queue
    picked = queue.pick(due)
    assert picked is not None
    assert picked.id == "r"
    assert "r" not in queue


def test_a_waiting_job_does_not_block_ready_ones() -> None:
    """A higher-priority job waiting for retry lets a ready lower-priority job run meanwhile."""
    queue = queue_of(
        make_job("waiting", priority=100, created_seq=1, retry_at=T0 + MINUTE),
        make_job("ready", priority=-100, created_seq=2),
    )
    assert drain(queue, T0) == ["ready"]
    assert drain(queue, T0 + MINUTE) == ["waiting"]


def test_next_due_is_the_earliest_retry_at_of_the_waiting_jobs() -> None:
    """next_due names the earliest retry_at, skips discarded jobs and is None without waiters."""
    queue = queue_of(make_job("ready", created_seq=1))
    assert queue.next_due() is None
    queue.push(make_job("late", created_seq=2, retry_at=T0 + 9 * MINUTE))
    queue.push(make_job("soon", created_seq=3, retry_at=T0 + 2 * MINUTE))
    assert queue.next_due() == T0 + 2 * MINUTE
    queue.discard("soon")
    assert queue.next_due() == T0 + 9 * MINUTE
    assert drain(queue, T0 + 9 * MINUTE) == ["ready", "late"]
    assert queue.next_due() is None


@pytest.mark.parametrize(
    ("waited", "expected"),
    [
        (timedelta(0), 3),
        (59 * timedelta(seconds=1), 3),
        (MINUTE, 4),
        (2 * MINUTE - timedelta(microseconds=1), 4),
        (10 * MINUTE, 13),
        (-MINUTE, 3),
    ],
)
def test_effective_priority_adds_one_per_full_aging_interval(
    waited: timedelta, expected: int
) -> None:
    """Aging adds +1 per full interval waited, nothing for a partial one or a clock step back."""
    queue = JobQueue(aging_interval_s=60.0)
    assert queue.effective_priority(make_job("j", priority=3, created_seq=1), T0 + waited) == (
        expected
    )


def test_aging_of_a_retried_job_counts_from_its_creation() -> None:
    """A job that waited for a retry keeps the age it gathered since it was created."""
    queue = JobQueue(aging_interval_s=60.0)
    job = make_job("j", created_seq=1, ready_at=T0, retry_at=T0 + 10 * MINUTE)
    assert queue.effective_priority(job, T0 + 12 * MINUTE) == 12


def test_aging_stops_at_the_top_priority() -> None:
    """Aging never lifts a job above PRIORITY_MAX, where log order decides among equals."""
    queue = JobQueue(aging_interval_s=60.0)
    assert (
        queue.effective_priority(make_job("j", priority=95, created_seq=1), T0 + 60 * MINUTE) == 100
    )
    assert (
        queue.effective_priority(make_job("k", priority=100, created_seq=2), T0 + 60 * MINUTE)
        == 100
    )


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_an_aging_interval_that_is_not_positive_is_refused(interval: float) -> None:
    """Zero or a negative interval is a configuration error, not a silent switch-off."""
    with pytest.raises(ValueError, match="aging_interval_s must be positive"):
        JobQueue(aging_interval_s=interval)


def test_a_long_waiting_low_priority_job_overtakes_newer_high_priority_ones() -> None:
    """A priority-0 job that waited 3 full intervals ties, and then beats, new priority-3 jobs."""

    def fresh_queue() -> JobQueue:
        old = make_job("old", priority=0, created_seq=1, ready_at=T0)
        now = T0 + 3 * MINUTE
        new = [make_job(f"new{i}", priority=3, created_seq=10 + i, ready_at=now) for i in range(3)]
        return queue_of(old, *new, aging_interval_s=60.0)

    just_short = T0 + 3 * MINUTE - timedelta(seconds=1)
    assert drain(fresh_queue(), just_short)[0] == "new0"
    # At 3 full intervals the effective priorities tie and the older job wins on created_seq.
    assert drain(fresh_queue(), T0 + 3 * MINUTE) == ["old", "new0", "new1", "new2"]


def test_aging_disabled_keeps_strict_priority() -> None:
    """With aging_interval_s None a low-priority job waits behind every higher one, for ever."""
    old = make_job("old", priority=0, created_seq=1, ready_at=T0)
    now = T0 + timedelta(days=30)
    queue = queue_of(
        old, make_job("new", priority=1, created_seq=2, ready_at=now), aging_interval_s=None
    )
    assert queue.effective_priority(old, now) == 0
    assert drain(queue, now) == ["new", "old"]


def test_pick_honours_effective_priority_across_workflows_when_a_retry_heads_a_bucket() -> None:
    """The highest effective priority runs first even when a fresh retry heads its bucket."""
    # pick() compares only the head (lowest created_seq) of each (workflow, priority) bucket;
    # aging counts from creation, so the head is always the most aged job of its bucket.
    now = T0 + 10 * MINUTE
    # Older by log order, but ready only now after a failed attempt.
    retried = make_job("retried", priority=0, created_seq=1, workflow="a", retry_at=now)
    patient = make_job("patient", priority=0, created_seq=2, workflow="a", ready_at=T0)
    urgent = make_job("urgent", priority=5, created_seq=3, workflow="b", ready_at=now)
    queue = queue_of(retried, patient, urgent, aging_interval_s=60.0)
    effective = {j.id: queue.effective_priority(j, now) for j in (retried, patient, urgent)}
    assert effective == {"retried": 10, "patient": 10, "urgent": 5}
    assert drain(queue, now) == ["retried", "patient", "urgent"]


def test_can_run_skips_a_workflow_at_capacity_and_picks_from_the_next() -> None:
    """A workflow the filter refuses is passed over; its jobs stay queued for later."""
    queue = queue_of(
        make_job("a-high", priority=9, created_seq=1, workflow="a"),
        make_job("a-low", priority=1, created_seq=2, workflow="a"),
        make_job("b-low", priority=0, created_seq=3, workflow="b"),
    )
    picked = queue.pick(T0, can_run=lambda job: job.workflow_name != "a")
    assert picked is not None
    assert picked.id == "b-low"
    assert queue.pick(T0, can_run=lambda job: job.workflow_name != "a") is None
    assert len(queue) == 2
    assert drain(queue, T0) == ["a-high", "a-low"]


def test_discard_takes_a_job_out_for_good() -> None:
    """A discarded job is returned once, never picked, and discarding twice returns None."""
    job = make_job("gone", priority=100, created_seq=1)
    queue = queue_of(job, make_job("stays", created_seq=2))
    assert queue.discard("gone") == job
    assert queue.discard("gone") is None
    assert queue.discard("never-queued") is None
    assert "gone" not in queue
    assert queue.get("gone") is None
    assert drain(queue, T0) == ["stays"]


def test_push_replaces_the_queued_copy() -> None:
    """Pushing a job again replaces its copy: one entry, the new priority, no ghost pick."""
    queue = queue_of(
        make_job("j", priority=0, created_seq=1),
        make_job("other", priority=5, created_seq=2),
    )
    queue.push(make_job("j", priority=10, created_seq=1))
    assert len(queue) == 2
    replaced = queue.get("j")
    assert replaced is not None
    assert replaced.priority == 10
    assert drain(queue, T0) == ["j", "other"]


def test_push_replaces_a_waiting_copy_with_a_ready_one_and_back() -> None:
    """Replacing moves a job between waiting and ready without leaving the old slot live."""
    queue = queue_of(make_job("j", created_seq=1, retry_at=T0 + MINUTE))
    queue.push(make_job("j", created_seq=1))
    assert queue.next_due() is None
    queue.push(make_job("j", created_seq=1, retry_at=T0 + 2 * MINUTE))
    assert queue.pick(T0 + MINUTE) is None
    assert queue.next_due() == T0 + 2 * MINUTE
    assert drain(queue, T0 + 2 * MINUTE) == ["j"]


@pytest.mark.parametrize(
    "status", [Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.CANCELLED]
)
def test_only_pending_jobs_are_queued(status: Status) -> None:
    """Pushing a job that is not pending is a bug upstream and raises ValueError."""
    with pytest.raises(ValueError, match="only pending jobs"):
        JobQueue().push(make_job("j", created_seq=1, status=status))


def test_ordered_gives_the_run_order_with_waiting_jobs_last_by_time() -> None:
    """ordered() lists ready jobs in pick order, then waiting ones by retry_at, and picks none."""
    queue = queue_of(
        make_job("w-late", priority=100, created_seq=1, retry_at=T0 + 9 * MINUTE),
        make_job("low", priority=-1, created_seq=2),
        make_job("w-soon", priority=-100, created_seq=3, retry_at=T0 + 2 * MINUTE),
        make_job("high", priority=7, created_seq=4),
        make_job("mid", priority=0, created_seq=5),
        make_job("due", priority=0, created_seq=6, retry_at=T0),
    )
    assert [j.id for j in queue.ordered(T0)] == ["high", "mid", "due", "low", "w-soon", "w-late"]
    assert len(queue) == 6
    assert drain(queue, T0) == ["high", "mid", "due", "low"]


def test_len_and_contains_track_the_queued_jobs() -> None:
    """len counts queued jobs and `in` answers by job id."""
    queue = queue_of(
        make_job("a", created_seq=1), make_job("b", created_seq=2, retry_at=T0 + MINUTE)
    )
    assert len(queue) == 2
    assert "a" in queue
    assert "b" in queue
    assert "c" not in queue
    assert sorted(j.id for j in queue.jobs()) == ["a", "b"]


queued_jobs = st.lists(
    st.tuples(st.integers(-100, 100), st.sampled_from(["a", "b", "c"])),
    max_size=40,
)


@given(specs=queued_jobs, seqs=st.permutations(range(40)))
def test_pick_order_without_aging_is_sorted_by_priority_then_created_seq(
    specs: list[tuple[int, str]], seqs: list[int]
) -> None:
    """With aging off, draining the queue equals sorting by (-priority, created_seq)."""
    jobs = [
        make_job(
            f"j{i}",
            priority=priority,
            created_seq=seqs[i] + 1,
            workflow=workflow,
            ready_at=T0 + i * MINUTE,
        )
        for i, (priority, workflow) in enumerate(specs)
    ]
    queue = queue_of(*jobs, aging_interval_s=None)
    now = T0 + timedelta(days=1)
    expected = [j.id for j in sorted(jobs, key=lambda j: (-j.priority, j.created_seq))]
    assert [j.id for j in queue.ordered(now)] == expected
    assert drain(queue, now) == expected
