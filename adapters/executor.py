"""The Executor port: runs a processor on the loop, in a thread or in a worker process."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_process
import anyio.to_thread
import structlog

from adapters.context import DetachedContext, FileJobContext, read_progress
from kernel.task import BaseProcessor, BaseTask, JobContext

log = structlog.get_logger("multiflow.executor")
PROGRESS_POLL_S = 0.25
THREAD_GRACE_S = 10.0  # a stopped thread processor's time to return before it is abandoned
THREAD_POLL_S = 0.02


class LocalExecutor:
    """Runs `async def process` on the event loop, a plain `def` in a thread or a process."""

    def __init__(self, *, threads_max: int = 16, processes_max: int | None = None) -> None:
        """`threads_max`/`processes_max` bound the processors running at once in threads
        and in worker processes; sized at least to the node's concurrency (`for_jobs`), no
        job waits for one (which would count against its timeout)."""
        self._threads = anyio.CapacityLimiter(threads_max)
        self._processes = anyio.CapacityLimiter(processes_max or os.cpu_count() or 1)

    @classmethod
    def for_jobs(cls, concurrency: int) -> LocalExecutor:
        """An executor with room for `concurrency` jobs at once in either runner."""
        return cls(threads_max=max(16, concurrency),
                   processes_max=max(os.cpu_count() or 1, concurrency))

    async def run(
        self, processor: BaseProcessor, ctx: JobContext, task: BaseTask, runner: str
    ) -> dict[str, Any]:
        """Call `processor.process(ctx, task)` as `runner` says (see the Executor port)."""
        if processor.is_async:
            return await cast(Awaitable[dict[str, Any]], processor.process(ctx, task))
        if runner == "process" and isinstance(ctx, FileJobContext):
            return await self._in_process(processor, ctx, task)
        began, returned = threading.Event(), threading.Event()

        def call() -> Any:
            began.set()
            try:
                return processor.process(ctx, task)
            finally:
                returned.set()

        try:
            result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True,
                                                    limiter=self._threads)
        except anyio.get_cancelled_exc_class():
            # A timeout or a cancel: ctx.cancelled is true now, and the thread should
            # return soon. The attempt (its slot, and any next attempt of the job) waits
            # for it, up to a grace: a thread cannot be stopped, only abandoned. (Stopped
            # before its thread began, there is nothing to wait for.)
            if began.is_set():
                await _wait_for_thread(returned, ctx.job.id)
            raise
        return cast(dict[str, Any], result)

    async def _in_process(
        self, processor: BaseProcessor, ctx: FileJobContext, task: BaseTask
    ) -> dict[str, Any]:
        progress_file = ctx.input_path.with_name(f".{ctx.job.id}.progress")
        detached = ctx.detached(progress_file)
        failure: list[BaseException] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_relay_progress, progress_file, ctx)
                try:
                    # cancellable: a timeout or cancel kills the worker process.
                    result, outputs = await anyio.to_process.run_sync(
                        _process_entry, processor, detached, task, cancellable=True,
                        limiter=self._processes)
                except Exception as exc:  # re-raised below, unwrapped by the task group
                    failure.append(exc)
                tg.cancel_scope.cancel()
            # The worker's last report (flushed as it ended) may be newer than the relay's
            # last poll: the last progress is always recorded, a failed job's included.
            latest = await anyio.to_thread.run_sync(read_progress, progress_file)
            if latest is not None:
                ctx.progress(*latest)
        finally:
            progress_file.unlink(missing_ok=True)
        if failure:
            raise failure[0]
        ctx.adopt_outputs(outputs)
        return cast(dict[str, Any], result)

    async def cleanup(self, processor: BaseProcessor, ctx: JobContext) -> None:
        """Run the processor's cleanup in a thread; its failure is logged, not raised."""
        try:
            if inspect.iscoroutinefunction(processor.cleanup):
                await processor.cleanup(ctx)
            else:
                await anyio.to_thread.run_sync(processor.cleanup, ctx, abandon_on_cancel=True)
        except Exception:
            log.exception("processor_cleanup_failed", job_id=ctx.job.id)


async def _wait_for_thread(returned: threading.Event, job_id: str) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(THREAD_GRACE_S):
        while not returned.is_set():  # noqa: ASYNC110 (set by an abandoned thread)
            await anyio.sleep(THREAD_POLL_S)
    if not returned.is_set():
        log.warning("processor_thread_abandoned", job_id=job_id, grace_s=THREAD_GRACE_S,
                    why="it did not return after its timeout or cancel (check ctx.cancelled "
                        "between chunks of work); it keeps running beside other jobs")


def _process_entry(
    processor: BaseProcessor, ctx: DetachedContext, task: BaseTask
) -> tuple[Any, list[str]]:
    try:
        result = processor.process(ctx, task)
    finally:
        ctx.flush_progress()
    return result, ctx.output_paths


async def _relay_progress(progress_file: Path, ctx: FileJobContext) -> None:
    last: tuple[float, str] | None = None
    while True:
        await anyio.sleep(PROGRESS_POLL_S)
        latest = await anyio.to_thread.run_sync(read_progress, progress_file)
        if latest is not None and latest != last:
            ctx.progress(*latest)
            last = latest
