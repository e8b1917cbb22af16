"""Intake, recovery at registration, and progress: the JobManager's duties besides its loop.

A mixin of `JobManager` (kernel/manager.py); `self` is typed as the `ManagerHost`
protocol, the part of the manager these methods use.
"""

from __future__ import annotations

from typing import Any

import anyio

from kernel.attempt import Attempt
from kernel.decide import RefuseAtIntake, Rejected, ReportProgress, decide
from kernel.host import SCANNER_RETRY_S, STORE_RETRY_MAX_S, ManagerHost, Workflow
from kernel.ports import Append, ScannerUnavailable, StoreError
from kernel.state import Job, Status


class IntakeDuties:
    """New jobs through the intake checks into the queue; recovery; progress flushes."""

    def _admit(self: ManagerHost, job: Job) -> None:
        """A pending job enters the intake (first attempt) or the queue (a retry)."""
        if job.status is not Status.PENDING:
            return
        if job.attempts == 0:
            self._intake.append(job.id)
            self._intake_ready.set()
        else:
            self.queue.push(job)
            self._wake()

    async def _intake_worker(self: ManagerHost) -> None:
        while True:
            if not self._intake:
                if self._intake_ready.is_set():  # one fresh event for every idle worker
                    self._intake_ready = anyio.Event()
                await self._intake_ready.wait()
                continue
            job = self._jobs.get(self._intake.popleft())
            if job is None or job.status is not Status.PENDING:
                continue  # cancelled, or claimed elsewhere, while it waited
            await self._check_intake(job)

    async def _check_intake(self: ManagerHost, job: Job) -> None:
        workflow = self.workflows.get(job.workflow_name)
        if workflow is None:
            return  # its pending jobs enter the queue when the workflow registers
        try:
            refusal = await self.files.intake(job, workflow.config, workflow.processor)
        except ScannerUnavailable:
            self._tg_start(self._readmit_later, job.id, SCANNER_RETRY_S)
            return
        current = self._jobs.get(job.id)
        if current is None or current.status is not Status.PENDING:
            return
        if refusal is None:
            self.queue.push(current)
            self._wake()
            return
        try:
            refused = await self._decide_and_append(job.id, lambda j: RefuseAtIntake(
                job_id=j.id, at=self.clock.now(), error_type=refusal.error_type,
                message=refusal.message))
        except StoreError:
            self._tg_start(self._readmit_later, job.id, STORE_RETRY_MAX_S)  # full or down
            return
        except Rejected:
            return  # cancelled (or claimed elsewhere) while intake looked at it
        await self._settle_file(refused)

    async def _readmit_later(self: ManagerHost, job_id: str, delay_s: float) -> None:
        await anyio.sleep(delay_s)
        job = self._jobs.get(job_id)
        if job is not None:
            self._admit(job)

    async def recover(self: ManagerHost, workflow: Workflow) -> None:
        """Fail the workflow's jobs left running as Interrupted, reconcile files, queue."""
        finished: list[Job] = []  # jobs whose attempts the interruption used up
        running = [job for job in await self.store.active_jobs(workflow.name)
                   if job.status is Status.RUNNING]
        for job in await self._orphans(running):
            try:
                interrupted = await self._interrupt(job, workflow.config)
            except Rejected:
                continue  # another node recovered it first
            if not interrupted.is_active:
                finished.append(interrupted)
        active = await self.store.active_jobs(workflow.name)
        await self.files.reconcile(workflow.name, active, self.store)
        for job in active:
            if job.status is Status.PENDING:
                self._jobs[job.id] = job
                self._admit(job)
        for job in finished:
            await self._settle_file(job)

    async def _refresh_pending(self: ManagerHost, job_id: str, claimed_version: int) -> None:
        """A claim lost its race: follow whatever the log now says of the job.

        In a cluster the follower usually has the winner's event already: it dropped the
        job (started or ended elsewhere) or holds a newer version of it. Only while it
        still holds the version we claimed at is the log read here.
        """
        known = self._jobs.get(job_id)
        if self.cluster is not None and (known is None or known.version > claimed_version):
            job = known
        else:
            job = await self._fresh_job(job_id)
        if job is None or job.id in self._running:
            return
        if job.status is Status.PENDING:
            self._jobs[job.id] = job
            if job.id not in self.queue:
                self._admit(job)
        elif job.is_active:
            self._jobs.pop(job.id, None)  # another node runs it
        elif self.cluster is not None:
            # Ended elsewhere: the node that ran it, or that cancelled it while pending,
            # moves its file (two nodes moving one file would race).
            self._jobs.pop(job.id, None)
            self._done_here(job.id)
        else:
            self._jobs.pop(job.id, None)
            await self._settle_file(job)  # e.g. cancelled while we were claiming it

    async def _flush_progress(self: ManagerHost) -> None:
        """Append the latest progress of running jobs, at most once per interval each."""
        while True:
            await anyio.sleep(0.1)
            now_s = anyio.current_time()
            due = [a for a in self._running.values() if a.progress_due(now_s, self._interval(a))]
            if not due:
                continue
            at = self.clock.now()
            appends = []
            before = [attempt.sent for attempt in due]
            for attempt in due:
                fraction, message = attempt.take_progress(now_s)
                appends.append(Append(attempt.job.id, decide(attempt.job, ReportProgress(
                    job_id=attempt.job.id, at=at, attempt=attempt.job.attempts,
                    fraction=fraction, message=message)), attempt.job.version))
            try:
                results: list[Any] = await self.store.append_batch(appends)
            except StoreError as exc:
                results = [exc] * len(due)
            for attempt, result, sent in zip(due, results, before, strict=True):
                if isinstance(result, StoreError):
                    # Not recorded: not sent either, so that the next flush (or the
                    # outcome's commit) records it; the last value is never lost.
                    attempt.sent = sent
                elif not attempt.finishing:
                    attempt.job = self._apply(attempt.job, result)

    def _interval(self: ManagerHost, attempt: Attempt) -> float:
        workflow = self.workflows.get(attempt.job.workflow_name)
        return workflow.config.progress_interval_s if workflow else 0.5
