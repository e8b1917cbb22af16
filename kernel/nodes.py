"""Several nodes on one store: the JobManager's cluster duties (decision 0004).

Keep this node's lease alive, recover the jobs of nodes whose leases expired, and
follow the other nodes' events so that the queue stays in step with the log. A mixin
of `JobManager`; `self` is typed as the `ManagerHost` protocol.
"""

from __future__ import annotations

import contextlib

import anyio

from kernel.config import WorkflowConfig, retry_at
from kernel.decide import FailJob, Rejected
from kernel.events import JobCancelled, JobCompleted, JobCreated, JobFailed, JobRetried
from kernel.host import ManagerHost
from kernel.ports import Cluster, StoreError
from kernel.state import Job, Status, StoredEvent, apply


class ClusterDuties:
    """Leases, recovery of dead nodes' jobs, and following the other nodes."""

    async def _orphans(self: ManagerHost, running: list[Job]) -> list[Job]:
        """The running jobs nobody runs: on one node, every one this manager does not run;
        in a cluster, those whose node's lease has expired, and this node's own claims
        whose outcome it never learnt (`_unsure_claims`) that the log shows running here:
        committed although the store reported a failure, the reply lost with the
        connection. The node never started them, and no other node would recover them
        while this one lives."""
        if self.cluster is None:
            return [job for job in running if job.id not in self._running]
        live = await self.cluster.live_nodes()
        me = self.cluster.node_id
        return [job for job in running if job.id not in self._running and (
            job.worker not in live or (job.worker == me and job.id in self._unsure_claims))]

    async def _interrupt(self: ManagerHost, job: Job, config: WorkflowConfig) -> Job:
        at = self.clock.now()
        when = retry_at(config, job.attempts, "Interrupted", at, self.entropy.random())
        who = f"node {job.worker}" if self.cluster is not None and job.worker else "the process"
        # The attempt found orphaned, not the job's latest: if another node recovered it
        # first and a live node claimed it again, the decider refuses this report.
        return await self._decide_and_append(job.id, lambda j: FailJob(
            job_id=j.id, at=at, attempt=job.attempts, error_type="Interrupted",
            message=f"{who} running this job stopped before it finished", retry_at=when))

    async def _keep_alive(self: ManagerHost, cluster: Cluster) -> None:
        """Renew this node's lease; recover the jobs of nodes whose leases expired.

        When the lease cannot be renewed before it runs out, other nodes will recover
        this node's jobs: it stops claiming and interrupts its processors rather than
        let the same job run twice.
        """
        renewed_s = anyio.current_time()
        while True:
            await anyio.sleep(self.heartbeat_s)
            started_s = anyio.current_time()
            # A renewal that hangs must not outlast the lease: give up in time to stop.
            patience_s = max(0.05, renewed_s + self.lease_s - self.heartbeat_s - started_s)
            try:
                with anyio.fail_after(patience_s):
                    await cluster.heartbeat(self.lease_s)
            except (StoreError, TimeoutError):
                if anyio.current_time() - renewed_s >= self.lease_s - self.heartbeat_s and \
                        self._lease_ok:
                    self._lease_ok = False
                    self._lease_renewed = anyio.Event()
                    # Processors stop; a claim still on its way is not stopped (it would
                    # start stopped and use up an attempt that never ran): if it commits,
                    # its processor waits until the lease is renewed (`_run_claimed`).
                    for attempt in list(self._running.values()):
                        if attempt.job.status is Status.RUNNING:
                            attempt.stop("shutdown")
                continue
            renewed_s = started_s
            with contextlib.suppress(StoreError):
                self._peers = len(await cluster.live_nodes() - {cluster.node_id})
            if not self._lease_ok:
                self._lease_ok = True
                self._lease_renewed.set()
                self._wake()
            try:
                await self._recover_orphans(cluster)
            except StoreError:
                continue  # the next beat tries again

    async def _recover_orphans(self: ManagerHost, cluster: Cluster) -> None:
        running = await cluster.running_jobs()
        for job in await self._orphans(running):
            workflow = self.workflows.get(job.workflow_name)
            if workflow is None:
                continue  # a node that has the workflow recovers it
            # Whatever this node holds of it is older (a lost claim's pending copy): the
            # interruption is decided on the log's.
            self._jobs.pop(job.id, None)
            self.queue.discard(job.id)
            try:
                interrupted = await self._interrupt(job, workflow.config)
            except Rejected:
                continue  # another node was first
            self._unsure_claims.pop(job.id, None)
            await self._settle(interrupted)
        await self._resolve_unsure_claims(cluster, {j.id for j in running})
        for node in await cluster.dead_nodes():
            # A node that died between a terminal event and its file's move: finish the
            # move for it (settling is idempotent), then forget the node.
            for job in await cluster.finished_by(node):
                if job.workflow_name in self.workflows:
                    await self.files.settle(job)
            if await self._orphans([j for j in await cluster.running_jobs()
                                    if j.worker == node]):
                continue  # some of its running jobs wait for a node with their workflow
            await cluster.forget_node(node)

    async def _resolve_unsure_claims(self: ManagerHost, cluster: Cluster, running: set[str]
                                     ) -> None:
        """Forget the unsure claims the log has moved past without them running here.

        A claim made at version v that the log shows past v, and not running on this
        node, either never committed (and no longer can: it expected v) or committed and
        ended since; if it ended cancelled by another node, that node left the file to
        this one, the log's runner of it, to move, unless a newer job owns the name now.
        """
        for job_id, claimed_at in list(self._unsure_claims.items()):
            if job_id in running:
                continue  # running: recovered above if it is ours
            job = await self.store.get_job(job_id)
            if job is not None and job.version <= claimed_at:
                continue  # the claim may still land
            if job is not None and job.status is Status.RUNNING:
                continue  # running since the read above: the next beat looks again
            if self._unsure_claims.get(job_id) != claimed_at:
                continue  # claimed again meanwhile
            del self._unsure_claims[job_id]
            if job is None or job.is_active or job.worker != cluster.node_id or \
                    job.workflow_name not in self.workflows:
                continue
            latest = await self.store.latest_jobs(job.workflow_name, [job.file_path])
            owner = latest.get(job.file_path)
            if owner is None or owner.id == job.id:
                await self._settle_file(job)

    async def _follow(self: ManagerHost, cluster: Cluster, after: int) -> None:
        """Keep the queue in step with what the other nodes append."""
        async for stored in cluster.tail_others(after):
            try:
                await self._foreign(stored)
            except StoreError:
                continue  # a refusal of the store's own (not an outage: that is waited out)

    async def _foreign(self: ManagerHost, stored: StoredEvent) -> None:
        event = stored.event
        ends = isinstance(event, JobCancelled | JobFailed | JobCompleted)
        if ends:
            self._cluster_full_until = 0.0
            self._wake()
        attempt = self._running.get(stored.job_id)
        if attempt is not None and attempt.job.status is Status.RUNNING:
            # Running here, changed elsewhere since our claim: cancelled, or recovered
            # after our lease lapsed. Stop the processor; its outcome is fenced off by the
            # version. (An older event, read late, says nothing about this attempt.)
            if ends and not attempt.finishing and stored.version > attempt.job.version:
                attempt.stop("cancel" if isinstance(event, JobCancelled) else "shutdown")
            return
        if attempt is not None and ends and stored.version > attempt.job.version + 1:
            # Being claimed here, and ended elsewhere past the version our claim makes:
            # had the claim committed (its result not handled yet), its processor would
            # run a job cancelled or recovered meanwhile. It starts stopped instead (and
            # a claim that conflicts loses nothing by it); the log is followed as ever.
            attempt.stop("cancel" if isinstance(event, JobCancelled) else "shutdown")
        # (A job we are claiming right now: our claim will conflict; follow the log.)
        known = self._jobs.get(stored.job_id)
        if isinstance(event, JobCreated):
            if known is None:
                self._follow_job(None, apply(None, stored))
            return
        if known is not None and known.version == stored.version - 1:
            self._follow_job(known, apply(known, stored))
        elif known is not None or isinstance(event, JobFailed | JobRetried):
            # Read until the store answers: a pending job skipped here would wait for
            # nothing on this node (a lost claim of it trusts what the follower holds).
            self._follow_job(known, await self._fresh_job(stored.job_id))

    def _follow_job(self: ManagerHost, known: Job | None, job: Job | None) -> None:
        if job is None:
            return
        if job.status is Status.PENDING:
            self._jobs[job.id] = job
            if job.id in self._running:
                return  # being claimed here: the claim conflicts and queues this version
            if job.id in self.queue:
                self.queue.discard(job.id)
                self.queue.push(job)
            elif known is None or known.status is not Status.PENDING:
                self._admit(job)
            return
        self._jobs.pop(job.id, None)
        self.queue.discard(job.id)
        if not job.is_active:
            self._done_here(job.id)
