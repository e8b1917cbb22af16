"""The JobManager through the Kernel facade, on a real SQLite file and real folders."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from adapters import Kernel
from adapters.files import FileNotInInput, PathOutsideRoot
from adapters.sqlite import SqliteEventStore
from kernel.config import WorkflowConfig
from kernel.decide import Rejected
from kernel.events import JobCancelled, JobCompleted, JobFailed, JobProgress, JobStarted
from kernel.ports import Append, DuplicateJob, JobQuery, StoreUnavailable
from kernel.state import Status
from kernel.task import BaseProcessor, BaseTask, JobContext, JobError

pytestmark = pytest.mark.anyio

FAST_RETRY = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


class Upper(BaseProcessor):
    """Writes the input upper-cased to output/{name}.out, in a worker thread."""

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        data = ctx.input_path.read_bytes()
        with ctx.open_output(ctx.job.file_path.rsplit("/", 1)[-1] + ".out") as out:
            out.write(data.upper())
        return {"bytes": len(data)}


class Failing(BaseProcessor):
    """Always fails with an ordinary exception."""

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        raise RuntimeError("disk says no")


class Sleeper(BaseProcessor):
    """Sleeps on the event loop until cancelled; counts how often it was cleaned up."""

    def __init__(self) -> None:
        self.cleanups = 0
        self.started = anyio.Event()

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.started.set()
        await anyio.sleep(60)
        return {}

    def cleanup(self, ctx: JobContext) -> None:
        self.cleanups += 1


def drop(data_dir: Path, workflow: str, name: str, content: bytes = b"hello") -> None:
    inbox = data_dir / workflow / "input"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_bytes(content)


async def test_a_job_runs_and_its_files_land_where_the_lifecycle_says(tmp_path: Path) -> None:
    """Submit -> completed: output written, input archived under the UTC date, events in order."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("upper", Upper())
        drop(tmp_path, "upper", "a.txt")
        job = await kernel.submit("upper", "a.txt")
        assert job.status is Status.PENDING and job.file_path == "upper/input/a.txt"
        done = await kernel.wait(job.id, timeout_s=10)
        events = [type(e.event).__name__ for e in await kernel.job_events(job.id)]
    assert done.status is Status.COMPLETED and done.result == {"bytes": 5}
    assert (tmp_path / done.current_path).read_bytes() == b"hello"
    assert done.current_path.startswith(f"upper/archive/{done.finished_at:%Y-%m-%d}/{job.id}--")
    assert (tmp_path / "upper/output/a.txt.out").read_bytes() == b"HELLO"
    assert done.output_paths == ("upper/output/a.txt.out",)
    assert events == ["JobCreated", "JobStarted", "JobCompleted"]
    assert not list((tmp_path / "upper/input").iterdir())


async def test_a_failing_job_is_retried_then_lands_in_error_with_its_reason(tmp_path: Path) -> None:
    """After max_attempts the job fails finally; its file and .error.json are in error/."""
    config = WorkflowConfig(max_attempts=3, **FAST_RETRY)
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("boom", Failing(), config=config)
        drop(tmp_path, "boom", "b.txt")
        done = await kernel.wait((await kernel.submit("boom", "b.txt")).id, timeout_s=10)
        history = await kernel.job_events(done.id)
    assert done.status is Status.FAILED and done.attempts == 3
    assert done.error is not None and done.error.type == "RuntimeError"
    assert [e.event.retry_at is None for e in history if type(e.event).__name__ == "JobFailed"] \
        == [False, False, True]
    report = json.loads((tmp_path / (done.current_path + ".error.json")).read_text())
    assert report["error_type"] == "RuntimeError" and report["attempts"] == 3
    assert "disk says no" in report["traceback"]
    assert (tmp_path / done.current_path).read_bytes() == b"hello"


async def test_a_non_retryable_job_error_fails_at_once(tmp_path: Path) -> None:
    """JobError(retryable=False) ends the job after one attempt, with its own error type."""

    class Refuses(BaseProcessor):
        async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
            raise JobError("BadHeader", "no header row", retryable=False)

    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("refuses", Refuses(), config=WorkflowConfig(**FAST_RETRY))
        drop(tmp_path, "refuses", "c.csv")
        done = await kernel.wait((await kernel.submit("refuses", "c.csv")).id, timeout_s=10)
    assert done.status is Status.FAILED and done.attempts == 1
    assert done.error is not None and done.error.type == "BadHeader"


async def test_a_timeout_stops_the_processor_and_counts_as_an_attempt(tmp_path: Path) -> None:
    """A processor past its timeout is cancelled and recorded as Timeout, then cleaned up."""
    sleeper = Sleeper()
    config = WorkflowConfig(timeout_s=0.2, max_attempts=1)
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("slow", sleeper, config=config)
        drop(tmp_path, "slow", "s.txt")
        done = await kernel.wait((await kernel.submit("slow", "s.txt")).id, timeout_s=10)
    assert done.status is Status.FAILED
    assert done.error is not None and done.error.type == "Timeout"
    assert sleeper.cleanups == 1


async def test_cancelling_a_running_job_stops_it_and_records_who(tmp_path: Path) -> None:
    """Cancel of a running job: JobCancelled with the actor, processor stopped, file in error/."""
    sleeper = Sleeper()
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("slow", sleeper)
        drop(tmp_path, "slow", "s.txt")
        job = await kernel.submit("slow", "s.txt")
        with anyio.fail_after(5):
            await sleeper.started.wait()
        await kernel.cancel(job.id, actor="alice", reason="wrong file")
        done = await kernel.wait(job.id, timeout_s=10)
    assert (tmp_path / (done.current_path + ".error.json")).exists()
    assert done.status is Status.CANCELLED
    assert done.error is not None and (done.error.actor, done.error.message) == \
        ("alice", "wrong file")
    assert sleeper.cleanups == 1
    assert (tmp_path / done.current_path).exists()


async def test_cancelling_a_pending_job_moves_its_file_to_error(tmp_path: Path) -> None:
    """A job that never started is cancelled from the queue; its file goes to error/."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("off", Upper(), config=WorkflowConfig(enabled=False))
        drop(tmp_path, "off", "p.txt")
        job = await kernel.submit("off", "p.txt")
        cancelled = await kernel.cancel(job.id, actor="cli")
        with pytest.raises(Rejected) as again:
            await kernel.cancel(job.id, actor="cli")
    assert cancelled.status is Status.CANCELLED
    assert again.value.code == "invalid_transition"
    assert (tmp_path / cancelled.current_path).read_bytes() == b"hello"
    assert not (tmp_path / "off/input/p.txt").exists()


async def test_an_operator_retry_runs_a_failed_job_again_from_error(tmp_path: Path) -> None:
    """A finally failed job retried by an operator is claimed from error/ and can complete."""
    flaky = {"fail": True}

    class Flaky(BaseProcessor):
        async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
            if flaky["fail"]:
                raise RuntimeError("not yet")
            return {"ok": True}

    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("flaky", Flaky(), config=WorkflowConfig(max_attempts=1))
        drop(tmp_path, "flaky", "f.txt")
        failed = await kernel.wait((await kernel.submit("flaky", "f.txt")).id, timeout_s=10)
        error_json = tmp_path / (failed.current_path + ".error.json")
        assert failed.status is Status.FAILED and error_json.exists()
        flaky["fail"] = False
        await kernel.retry(failed.id, actor="bob")
        done = await kernel.wait(failed.id, timeout_s=10)
    assert done.status is Status.COMPLETED and done.attempts == 2
    assert not error_json.exists()
    assert (tmp_path / done.current_path).exists()


async def test_one_active_job_per_file(tmp_path: Path) -> None:
    """A second submit of a file with an active job returns that job, not a new one."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("off", Upper(), config=WorkflowConfig(enabled=False))
        drop(tmp_path, "off", "same.txt")
        first = await kernel.submit_file("off", "same.txt")
        second = await kernel.submit_file("off", "same.txt")
        log_length = await kernel.store.last_seq()
    assert first.created and not second.created
    assert first.job.id == second.job.id
    assert log_length == 1


async def test_an_idempotency_key_returns_the_job_it_made(tmp_path: Path) -> None:
    """The same key later returns the first job even after it completed."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("upper", Upper())
        drop(tmp_path, "upper", "k1.txt")
        first = await kernel.submit("upper", "k1.txt", idempotency_key="sha-1")
        await kernel.wait(first.id, timeout_s=10)
        drop(tmp_path, "upper", "k2.txt")
        again = await kernel.submit_file("upper", "k2.txt", idempotency_key="sha-1")
    assert not again.created and again.job.id == first.id


async def test_bad_submits_write_nothing(tmp_path: Path) -> None:
    """Unknown workflow, missing file, escapes and bad priority are refused with no event."""
    (tmp_path / "secret.txt").write_text("no")
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("upper", Upper())
        drop(tmp_path, "upper", "ok.txt")
        (tmp_path / "upper/input/link.txt").symlink_to(tmp_path / "secret.txt")
        with pytest.raises(Rejected):
            await kernel.submit("nope", "ok.txt")
        with pytest.raises(FileNotInInput):
            await kernel.submit("upper", "missing.txt")
        for bad in ("../secret.txt", "/etc/passwd", "a\x00b", "link.txt", ""):
            with pytest.raises(PathOutsideRoot):
                await kernel.submit("upper", bad)
        with pytest.raises(Rejected) as priority:
            await kernel.submit("upper", "ok.txt", priority=101)
        assert await kernel.store.last_seq() == 0
    assert priority.value.code == "invalid"


async def test_params_are_validated_by_the_workflows_task(tmp_path: Path) -> None:
    """Params that the workflow's BaseTask refuses are rejected; defaults are filled in."""

    class Resize(BaseTask):
        width: int = 128

    class Thumbs(Upper):
        Task = Resize

    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("thumbs", Thumbs(), config=WorkflowConfig(enabled=False))
        drop(tmp_path, "thumbs", "a.png")
        with pytest.raises(Rejected, match="width"):
            await kernel.submit("thumbs", "a.png", params={"width": "wide"})
        with pytest.raises(Rejected, match="height"):
            await kernel.submit("thumbs", "a.png", params={"height": 3})
        job = await kernel.submit("thumbs", "a.png")
    assert job.params == {"width": 128}


async def test_priority_decides_the_order_and_fifo_within_it(tmp_path: Path) -> None:
    """With concurrency 1, jobs run by priority, then in the order they were submitted."""
    order: list[str] = []

    class Record(BaseProcessor):
        async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
            order.append(ctx.job.file_path.rsplit("/", 1)[-1])
            return {}

    async with Kernel.open(data_dir=tmp_path) as kernel:
        workflow = kernel.register_workflow("rec", Record(), config=WorkflowConfig(enabled=False))
        ids = []
        for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 2)]:
            drop(tmp_path, "rec", name)
            ids.append((await kernel.submit("rec", name, priority=priority)).id)
        kernel.manager.workflows["rec"] = msgspec.structs.replace(
            workflow, config=WorkflowConfig(enabled=True))
        kernel.manager._wake()
        for job_id in ids:
            await kernel.wait(job_id, timeout_s=10)
    assert order == ["high1", "high2", "mid", "low1", "low2"]


async def test_the_global_concurrency_limit_holds(tmp_path: Path) -> None:
    """No more than `concurrency` processors ever run at once, across workflows."""
    running = 0
    peak = 0

    class Busy(BaseProcessor):
        async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.2)  # long enough that every job is queued while others run
            running -= 1
            return {}

    async with Kernel.open(data_dir=tmp_path, concurrency=3) as kernel:
        kernel.register_workflow("a", Busy())
        kernel.register_workflow("b", Busy(), config=WorkflowConfig(concurrency=1))
        ids = []
        for i in range(12):
            workflow = "a" if i % 2 else "b"
            drop(tmp_path, workflow, f"{i}.txt")
            ids.append((await kernel.submit(workflow, f"{i}.txt")).id)
        for job_id in ids:
            await kernel.wait(job_id, timeout_s=20)
    assert peak == 3


async def test_progress_is_throttled_and_the_last_value_kept(tmp_path: Path) -> None:
    """A processor reporting 1,000 times writes a handful of JobProgress, ending at its last."""

    class Chatty(BaseProcessor):
        def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
            for i in range(1000):
                ctx.progress(i / 1000, f"step {i}")
                time.sleep(0.0005)
            ctx.progress(0.999, "almost")
            return {}

    config = WorkflowConfig(progress_interval_s=0.1)
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("chatty", Chatty(), config=config)
        drop(tmp_path, "chatty", "c.txt")
        done = await kernel.wait((await kernel.submit("chatty", "c.txt")).id, timeout_s=20)
        progress = [e.event for e in await kernel.job_events(done.id)
                    if isinstance(e.event, JobProgress)]
    assert 1 <= len(progress) <= 20
    assert (progress[-1].fraction, progress[-1].message) == (0.999, "almost")


class InProcess(BaseProcessor):
    """Runs in a worker process: reports progress, writes an output, returns its pid."""

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        import os

        ctx.progress(0.5, "halfway")
        time.sleep(0.6)
        with ctx.open_output("from-process.txt") as out:
            out.write(b"done")
        return {"pid": os.getpid()}


async def test_a_process_runner_reports_progress_and_outputs(tmp_path: Path) -> None:
    """runner="process": the work happens in another process; progress and outputs come back."""
    import os

    config = WorkflowConfig(runner="process", progress_interval_s=0.05)
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("proc", InProcess(), config=config)
        drop(tmp_path, "proc", "p.txt")
        done = await kernel.wait((await kernel.submit("proc", "p.txt")).id, timeout_s=60)
        progress = [e.event for e in await kernel.job_events(done.id)
                    if isinstance(e.event, JobProgress)]
    assert done.status is Status.COMPLETED, done.error
    assert done.result is not None and done.result["pid"] != os.getpid()
    assert done.output_paths == ("proc/output/from-process.txt",)
    assert any(p.message == "halfway" for p in progress)


async def test_jobs_left_running_are_recovered_as_interrupted(tmp_path: Path) -> None:
    """A job the log shows running when the process died is failed Interrupted and retried."""
    sleeper = Sleeper()
    async with Kernel.open(data_dir=tmp_path, drain_grace_s=0) as kernel:
        kernel.register_workflow("slow", sleeper)
        drop(tmp_path, "slow", "s.txt")
        job = await kernel.submit("slow", "s.txt")
        with anyio.fail_after(5):
            await sleeper.started.wait()
    # drain with no grace records the running job as interrupted, retryable
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("slow", Upper())
        done = await kernel.wait(job.id, timeout_s=10)
        kinds = [type(e.event).__name__ for e in await kernel.job_events(job.id)]
    assert done.status is Status.COMPLETED and done.attempts == 2
    assert kinds == ["JobCreated", "JobStarted", "JobFailed", "JobStarted", "JobCompleted"]


async def test_two_kernels_live_in_one_process(tmp_path: Path) -> None:
    """No global state: two kernels on two data folders run side by side."""
    async with Kernel.open(data_dir=tmp_path / "one") as one, \
            Kernel.open(store="memory://", data_dir=tmp_path / "two") as two:
        one.register_workflow("upper", Upper())
        two.register_workflow("upper", Upper())
        drop(tmp_path / "one", "upper", "x.txt")
        drop(tmp_path / "two", "upper", "x.txt")
        a = await one.wait((await one.submit("upper", "x.txt")).id, timeout_s=10)
        b = await two.wait((await two.submit("upper", "x.txt")).id, timeout_s=10)
    assert a.status is b.status is Status.COMPLETED
    assert a.id != b.id


async def test_a_second_server_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """The SQLite store has one writer: a second open names the process that holds it."""
    from kernel.ports import StoreLocked

    async with Kernel.open(data_dir=tmp_path):
        result: list[BaseException] = []

        def other() -> None:
            async def open_again() -> None:
                async with Kernel.open(data_dir=tmp_path):
                    pass

            try:
                anyio.run(open_again)
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(result) == 1
    locked = result[0]
    while isinstance(locked, BaseExceptionGroup):
        locked = locked.exceptions[0]
    assert isinstance(locked, StoreLocked) and "in use by another multiflow process" in str(locked)


async def test_duplicate_error_is_translated_for_direct_store_users(tmp_path: Path) -> None:
    """The store's DuplicateJob names the existing job for callers below the Kernel."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("off", Upper(), config=WorkflowConfig(enabled=False))
        drop(tmp_path, "off", "d.txt")
        job = await kernel.submit("off", "d.txt")
        from kernel.events import JobCreated

        with pytest.raises(DuplicateJob) as dup:
            await kernel.store.append("other", [JobCreated(
                job_id="other", at=job.created_at, workflow_name="off",
                file_path=job.file_path)], 0)
    assert dup.value.existing_job_id == job.id


class Exits(BaseProcessor):
    """Wraps a command-line tool whose argument parser gives up: `sys.exit(2)`."""


    def process(self, ctx: JobContext, task: BaseTask) -> dict[str, Any]:
        raise SystemExit(2)


class ExitsOnTheLoop(BaseProcessor):
    async def process(self, ctx: JobContext, task: BaseTask) -> dict[str, Any]:
        raise SystemExit("usage: convert --dpi N")


@pytest.mark.parametrize("processor", [Exits(), ExitsOnTheLoop()], ids=["thread", "async"])
async def test_a_processor_that_calls_sys_exit_fails_its_job_not_the_server(
        tmp_path: Path, processor: BaseProcessor) -> None:
    """SystemExit from a processor is its job's failure (it used to end the event loop:
    the server exited, and every restart retried the job and exited again)."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("cli", processor, config=WorkflowConfig(max_attempts=1))
        kernel.register_workflow("up", Upper())
        await kernel.ready()
        drop(tmp_path, "cli", "a.txt")
        drop(tmp_path, "up", "b.txt")
        failed = await kernel.wait((await kernel.submit("cli", "a.txt")).id, timeout_s=10)
        assert failed.status is Status.FAILED and failed.error is not None
        assert failed.error.type == "SystemExit"
        done = await kernel.wait((await kernel.submit("up", "b.txt")).id, timeout_s=10)
        assert done.status is Status.COMPLETED  # the server goes on


class DeepResult(BaseProcessor):
    """Returns the parse tree of a hostile input: 5,000 levels deep."""

    async def process(self, ctx: JobContext, task: BaseTask) -> dict[str, Any]:
        tree: list[Any] = []
        for _ in range(5000):
            tree = [tree]
        return {"tree": tree}


async def test_a_job_whose_result_cannot_be_stored_ends_as_outcome_refused(
        tmp_path: Path) -> None:
    """The log refuses the result; the job fails once, as OutcomeRefused (its outcome was
    taken for a store outage and retried for ever, the job running until a restart)."""
    async with Kernel.open(data_dir=tmp_path, drain_grace_s=0) as kernel:
        kernel.register_workflow("deep", DeepResult(), config=WorkflowConfig(max_attempts=3))
        await kernel.ready()
        drop(tmp_path, "deep", "a.txt")
        done = await kernel.wait((await kernel.submit("deep", "a.txt")).id, timeout_s=10)
    assert done.status is Status.FAILED and done.error is not None
    assert done.error.type == "OutcomeRefused" and "cannot be stored" in done.error.message
    assert done.attempts == 1


async def test_a_job_created_by_a_cancelled_submit_still_runs(tmp_path: Path) -> None:
    """A caller that gives up on `submit` (a timeout) while its JobCreated is in the group
    commit: the commit lands all the same, and the job runs (it stayed pending, in
    neither the intake nor the queue, until a restart)."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("up", Upper())
        await kernel.ready("up")
        drop(tmp_path, "up", "a.txt")
        with anyio.move_on_after(0):
            await kernel.submit("up", "a.txt")
        with anyio.fail_after(5):
            while not (jobs := await kernel.store.list_jobs(JobQuery(limit=10))).items:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        done = await kernel.wait(jobs.items[0].id, timeout_s=5)
        assert done.status is Status.COMPLETED
        assert len((await kernel.store.list_jobs(JobQuery(limit=10))).items) == 1


async def test_a_job_retried_by_a_cancelled_call_still_runs(tmp_path: Path) -> None:
    """The same for `retry`: once JobRetried is written, the job is queued, whatever the
    caller does meanwhile."""
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("fails", Failing(), config=WorkflowConfig(max_attempts=1))
        await kernel.ready("fails")
        drop(tmp_path, "fails", "a.txt")
        failed = await kernel.wait((await kernel.submit("fails", "a.txt")).id, timeout_s=5)
        assert failed.status is Status.FAILED
        with anyio.move_on_after(0):
            await kernel.retry(failed.id, actor="ops")
        again = await kernel.wait(failed.id, timeout_s=5)
        assert again.attempts == 2  # it ran once more (and failed again)


class TakesOneSecond(BaseProcessor):
    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        import os

        time.sleep(1.0)
        return {"pid": os.getpid()}


async def test_the_process_runner_runs_as_many_jobs_at_once_as_the_concurrency(
        tmp_path: Path) -> None:
    """More jobs at once than CPUs: each gets its worker process at once, none waits for
    one inside its timeout (anyio's own limit, the CPU count, made two of them time out
    without running late)."""
    import os

    jobs_at_once = (os.cpu_count() or 2) + 2
    config = WorkflowConfig(runner="process", timeout_s=3.0, max_attempts=1)
    async with Kernel.open(data_dir=tmp_path, concurrency=jobs_at_once) as kernel:
        kernel.register_workflow("proc", TakesOneSecond(), config=config)
        await kernel.ready()
        ids = []
        for i in range(jobs_at_once):
            drop(tmp_path, "proc", f"{i}.txt")
            ids.append((await kernel.submit("proc", f"{i}.txt")).id)
        done = [await kernel.wait(job_id, timeout_s=60) for job_id in ids]
    assert [d.status for d in done] == [Status.COMPLETED] * jobs_at_once, \
        [d.error for d in done]
    assert len({d.result["pid"] for d in done if d.result}) == jobs_at_once


class ProgressThenFail(BaseProcessor):
    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        ctx.progress(0.7, "page 7 of 10 done")
        raise RuntimeError("page 8 is corrupt")


async def test_the_process_runner_keeps_the_last_progress_of_a_failed_job(
        tmp_path: Path) -> None:
    """The worker's last report, flushed as it ended, is recorded (the relay stopped
    before reading it: the failed job showed no progress)."""
    config = WorkflowConfig(runner="process", max_attempts=1, progress_interval_s=0)
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("proc", ProgressThenFail(), config=config)
        await kernel.ready()
        drop(tmp_path, "proc", "a.txt")
        done = await kernel.wait((await kernel.submit("proc", "a.txt")).id, timeout_s=60)
    assert done.status is Status.FAILED
    assert (done.progress, done.progress_message) == (0.7, "page 7 of 10 done")


class ProgressHiccup:
    """The SQLite store, unavailable for the first progress-only batch."""

    def __init__(self, inner: SqliteEventStore) -> None:
        self._inner = inner
        self.failures_left = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def append_batch(self, appends: Sequence[Append]) -> list[Any]:
        progress_only = all(isinstance(e, JobProgress) for a in appends for e in a.events)
        if progress_only and self.failures_left:
            self.failures_left -= 1
            raise StoreUnavailable("database is locked (for a moment)")
        return await self._inner.append_batch(appends)


class HalfThenFail(BaseProcessor):
    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        ctx.progress(0.5, "half of the pages")
        time.sleep(0.5)  # several flush intervals: the first flush fails, nothing changes after
        raise RuntimeError("page 6 is corrupt")


async def test_progress_that_failed_to_flush_is_recorded_later(tmp_path: Path) -> None:
    """A flush the store refuses for a moment leaves its progress unsent: the next flush,
    or the outcome's commit, records it (it was marked sent, and lost)."""
    store = ProgressHiccup(await SqliteEventStore.open(tmp_path / "log.db"))
    config = WorkflowConfig(max_attempts=1, progress_interval_s=0.05)
    async with Kernel.open(store, data_dir=tmp_path) as kernel:
        kernel.register_workflow("half", HalfThenFail(), config=config)
        await kernel.ready("half")
        (tmp_path / "half/input/a.txt").write_bytes(b"x")
        done = await kernel.wait((await kernel.submit("half", "a.txt")).id, timeout_s=10)
    assert store.failures_left == 0  # the hiccup happened
    assert done.status is Status.FAILED
    assert (done.progress, done.progress_message) == (0.5, "half of the pages")


class FlushWinsTheRace:
    """The SQLite store, where a progress append on a finishing job lands just before
    its outcome (as the manager's own in-flight progress flush does)."""

    def __init__(self, inner: SqliteEventStore) -> None:
        self._inner = inner
        self._raced: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def append_batch(self, appends: Sequence[Append]) -> list[Any]:
        for append in appends:
            outcome = next((e for e in append.events if isinstance(e, JobCompleted)), None)
            if outcome is not None and append.job_id not in self._raced:
                self._raced.add(append.job_id)
                await self._inner.append(append.job_id, [JobProgress(
                    job_id=append.job_id, at=outcome.at, fraction=0.9, message="flush")],
                    append.expected_version)
        return await self._inner.append_batch(appends)


async def test_the_log_never_shows_more_running_jobs_than_the_limit(tmp_path: Path) -> None:
    """An outcome refused by a conflict (a progress flush of its job landed just before)
    does not let the next job's claim, made beside it, start: the log never shows two
    jobs running under a limit of one (the claim started, the outcome landed a retry
    later)."""
    store = FlushWinsTheRace(await SqliteEventStore.open(tmp_path / "log.db"))
    async with Kernel.open(store, data_dir=tmp_path, concurrency=1) as kernel:
        kernel.register_workflow("quick", Upper())
        await kernel.ready("quick")
        (tmp_path / "quick/input").mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(3):
            (tmp_path / f"quick/input/{i}.txt").write_bytes(b"x")
            ids.append((await kernel.submit("quick", f"{i}.txt")).id)
        for job_id in ids:
            await kernel.wait(job_id, timeout_s=10)
        events = await kernel.events(0, 10_000)
    running: set[str] = set()
    peak = 0
    for stored in events:
        if isinstance(stored.event, JobStarted):
            running.add(stored.job_id)
        elif isinstance(stored.event, JobCompleted | JobFailed | JobCancelled):
            running.discard(stored.job_id)
        peak = max(peak, len(running))
    assert peak == 1, [(s.seq, type(s.event).__name__, s.job_id[-4:]) for s in events]


class BlockingCall(BaseProcessor):
    """A library call of 1 s that cannot be interrupted (it never looks at ctx.cancelled)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(1.0)
        finally:
            with self.lock:
                self.running -= 1
        return {}


async def test_a_timed_out_thread_keeps_its_slot_until_it_returns(tmp_path: Path) -> None:
    """A thread processor past its timeout is waited for (up to a grace) before its slot
    and its job's retry go on: at concurrency 1 one processor runs at a time (three
    attempts of the same job ran side by side on the same file)."""
    processor = BlockingCall()
    config = WorkflowConfig(timeout_s=0.2, max_attempts=3, backoff_base_s=0.01,
                            backoff_max_s=0.01, backoff_jitter=0)
    async with Kernel.open(data_dir=tmp_path, concurrency=1) as kernel:
        kernel.register_workflow("slow", processor, config=config)
        await kernel.ready()
        drop(tmp_path, "slow", "a.txt")
        done = await kernel.wait((await kernel.submit("slow", "a.txt")).id, timeout_s=30)
    assert done.status is Status.FAILED and done.error is not None
    assert done.error.type == "Timeout" and done.attempts == 3
    assert processor.peak == 1


class InThread(BaseProcessor):
    def __init__(self) -> None:
        self.ran = False

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.ran = True
        return {}


async def test_a_thread_job_cancelled_during_its_claim_ends_at_once(tmp_path: Path) -> None:
    """Stopped before its thread began, there is no thread to wait for: the job ends at
    once (it held its slot for the whole 10 s grace and was logged as abandoned)."""
    processor = InThread()
    async with Kernel.open(data_dir=tmp_path, concurrency=1) as kernel:
        kernel.register_workflow("t", processor)
        await kernel.ready()
        claim = kernel.files.claim
        claiming, release = anyio.Event(), anyio.Event()

        async def slow_claim(job: Any) -> None:  # the move into processing/ takes a while
            claiming.set()
            await release.wait()
            await claim(job)

        kernel.files.claim = slow_claim  # type: ignore[method-assign]
        drop(tmp_path, "t", "a.txt")
        job = await kernel.submit("t", "a.txt")
        with anyio.fail_after(5):
            await claiming.wait()
        await kernel.cancel(job.id, actor="ops")
        release.set()
        with anyio.fail_after(2):
            done = await kernel.wait(job.id)
    assert done.status is Status.CANCELLED and not processor.ran


async def test_a_refused_outcome_does_not_hold_up_the_next_claim(tmp_path: Path) -> None:
    """The claim made beside an outcome the log refused is not taken for a cluster-wide
    limit: with its slot free, the next job starts at once (the node stopped claiming
    for a second)."""
    async with Kernel.open(data_dir=tmp_path, concurrency=1) as kernel:
        kernel.register_workflow("deep", DeepResult(), config=WorkflowConfig(max_attempts=1))
        kernel.register_workflow("up", Upper())
        await kernel.ready()
        drop(tmp_path, "deep", "a.txt")
        drop(tmp_path, "up", "b.txt")
        a = await kernel.submit("deep", "a.txt")
        b = await kernel.submit("up", "b.txt")
        failed = await kernel.wait(a.id, timeout_s=10)
        assert failed.error is not None and failed.error.type == "OutcomeRefused"
        with anyio.fail_after(0.5):
            done = await kernel.wait(b.id)
    assert done.status is Status.COMPLETED
