"""The Files port on real folders: `data/{workflow}/{input,processing,output,archive,error}`.

Every move follows a durable event and is idempotent: it looks for the file
wherever the lifecycle could have left it, so a move retried after a crash is
harmless. Names never collide (`{job_id}--{name}`), and nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import structlog

from adapters.context import FileJobContext
from adapters.fsutil import TEMP_SUFFIX, Done, FileLane, move, write_bytes_atomic
from adapters.intake import IntakeChecker
from kernel import layout
from kernel.config import WorkflowConfig
from kernel.ports import FileChanged, FileMissing, JobLookup, ProgressSink, Refusal
from kernel.state import Job, Status
from kernel.task import BaseProcessor

log = structlog.get_logger("multiflow.files")
ERROR_SUFFIX = layout.REPORT_SUFFIX
CLAIMS_REMEMBERED = 4096  # durable claims kept, so that a job's second claim costs nothing
SCANS_AT_ONCE = 4  # intake checks waiting on the virus scanner at once (each in a thread)


class ErrorReport(msgspec.Struct, kw_only=True):
    """What `error/{job_id}--x.error.json` says about a failed or cancelled job."""

    job_id: str
    workflow_name: str
    file_path: str
    status: str
    error_type: str
    message: str
    traceback: str = ""
    actor: str | None = None
    attempts: int
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None


class PathOutsideRoot(ValueError):
    """A path that would resolve outside the data root."""


class FileNotInInput(LookupError):
    """The file a submit names is not in the workflow's input/ folder."""


ACCEPTED_REMEMBERED = 200_000  # pending files whose identity is kept for the claim's check
STAGING_IDLE_S = 3600.0  # an upload unwritten this long was cut short by a crash


class HotFolders:
    """The data root and the moves of the job lifecycle (see the module docstring)."""

    def __init__(self, data_dir: str | Path, intake: IntakeChecker | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._root = str(self.data_dir)
        self.intake_checker = intake or IntakeChecker()
        # Concurrent jobs share thread hops: the moves (and the fsyncs that make them
        # durable, one per folder for a whole batch) in one lane, intake reads in another,
        # so that a claim never waits behind another file's checks.
        self._moves = FileLane()
        self._checks = FileLane()
        self._scans: anyio.CapacityLimiter | None = None  # made on the event loop
        # job id -> the attempt whose claim is durable: the manager moves a file while its
        # claim commits, and the attempt's own claim then has nothing left to do.
        self._claimed: dict[str, int] = {}
        # Claims on their way: a second claim of the same attempt waits for the first.
        self._claiming: dict[str, tuple[int, Done]] = {}
        # What intake accepted of each pending job's file in input/ (inode, size, mtime):
        # the claim moves that file only if it is still the same.
        self._accepted: dict[str, tuple[int, int, int]] = {}
        # Told of each job whose file has settled (the Kernel wakes the watcher of a name
        # that waited for that job to end).
        self.on_settled: Callable[[Job], None] | None = None

    def ensure_layout(self, workflow_name: str) -> None:
        """Create the workflow's five folders."""
        for stage in layout.STAGES:
            (self.data_dir / workflow_name / stage).mkdir(parents=True, exist_ok=True)

    def input_file(self, workflow_name: str, name: str) -> str:
        """Check that `name` is a regular file inside the workflow's input/; its relative path.

        Refuses NUL, absolute paths, `..` and symlinks that lead outside input/. The common
        case (a plain file, no symlink) costs one `lstat`: this runs on every submit.
        """
        parts = name.split("/")
        if not name or "\x00" in name or name.startswith("/") or \
                any(part in ("", ".", "..") for part in parts):
            raise PathOutsideRoot(f"{name!r} must be a plain relative path inside input/")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PathOutsideRoot(f"{name!r} is not valid UTF-8; rename the file") from None
        inbox = os.path.join(self.data_dir, workflow_name, "input")
        full = os.path.join(inbox, name)
        try:
            mode = os.lstat(full).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotInInput(f"{workflow_name}/input/{name} does not exist") from None
        except OSError as exc:  # a name too long, a loop on the way ...
            raise PathOutsideRoot(f"{name!r} cannot be used: {exc.strerror}") from None
        if stat.S_ISLNK(mode) or len(parts) > 1:
            real = os.path.realpath(full)
            if not real.startswith(os.path.realpath(inbox) + os.sep):
                raise PathOutsideRoot(f"{name!r} resolves outside {workflow_name}/input/")
            try:
                mode = os.stat(real).st_mode
            except FileNotFoundError:
                raise PathOutsideRoot(f"{name!r} is a symlink to nothing") from None
            except OSError as exc:
                raise PathOutsideRoot(f"{name!r} cannot be used: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise FileNotInInput(f"{workflow_name}/input/{name} is not a regular file")
        return layout.input_path(workflow_name, name)

    def staging_dir(self) -> Path:
        """Where uploads are streamed before they are renamed into an input/ folder."""
        path = self.data_dir / ".staging"
        path.mkdir(exist_ok=True)
        return path

    def sweep_staging(self, now_s: float, idle_s: float = STAGING_IDLE_S) -> list[Path]:
        """Remove uploads left in staging by a server that stopped mid-upload (a kill, a
        power cut): those unwritten for `idle_s`. An upload in progress keeps its file's
        time fresh, on this node or another sharing the data root."""
        folder = self.data_dir / ".staging"
        removed: list[Path] = []
        if not folder.is_dir():
            return removed
        for entry in os.scandir(folder):
            if not entry.name.startswith("upload-") or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now_s - entry.stat(follow_symlinks=False).st_mtime >= idle_s:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
        return removed

    @staticmethod
    def check_upload_name(name: str) -> None:
        """An uploaded file's name: one plain path segment, not hidden, not temporary."""
        if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", "..") \
                or name.startswith(".") or len(name.encode()) > 255:
            raise PathOutsideRoot(f"filename {name!r} must be one plain file name")
        if name.endswith(TEMP_SUFFIX):
            raise PathOutsideRoot(f"filename {name!r} ends like multiflow's temporary files "
                                  f"({TEMP_SUFFIX}); upload it under another name")

    def place_upload(self, staged: Path, workflow_name: str, name: str) -> str:
        """fsync a staged upload and rename it into input/ durably; its relative path."""
        self.check_upload_name(name)
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        relative = layout.input_path(workflow_name, name)
        try:
            move(staged, self.absolute(relative))  # never over a file (one name, two uploads)
        except FileExistsError:
            raise FileExistsError(f"{relative} already exists") from None
        return relative

    @staticmethod
    def input_file_path(workflow_name: str, name: str) -> str:
        """The data-root relative path of `name` in the workflow's input/ (no checks)."""
        return layout.input_path(workflow_name, name)

    def absolute(self, relative: str) -> Path:
        """The absolute path of a data-root relative path; refuses anything outside the root.

        A lexical check (no `..`, no absolute path, no NUL), not a resolve: the paths the
        lifecycle uses are built from names `input_file` already vetted, symlinks included.
        """
        return Path(self._path(relative))

    def _path(self, relative: str) -> str:
        """`absolute` as a string: the moves run per job, and pathlib costs more than they do."""
        if "\x00" in relative or relative.startswith("/") or ".." in relative.split("/"):
            raise PathOutsideRoot(f"{relative!r} is outside the data root")
        return f"{self._root}/{relative}"

    # -- the Files port ----------------------------------------------------------------

    async def intake(self, job: Job, config: WorkflowConfig,
                     processor: BaseProcessor) -> Refusal | None:
        """Run the intake checks on a pending job's file (where it lies now)."""
        if config.scan:  # a scan waits on clamd: its own thread, never a shared batch
            if self._scans is None:
                self._scans = anyio.CapacityLimiter(SCANS_AT_ONCE)
            return await anyio.to_thread.run_sync(self._intake, job, config, processor,
                                                  limiter=self._scans)
        return await self._checks.run(lambda _: self._intake(job, config, processor))

    def _intake(self, job: Job, config: WorkflowConfig,
                processor: BaseProcessor) -> Refusal | None:
        path = self._find(job)
        if path is None:
            return Refusal("FileMissing", f"{job.file_path} is not there any more")
        try:
            seen = _identity(path)  # before the checks: a change during them shows too
        except OSError:
            seen = None
        refusal = self.intake_checker.check(Path(path), config, processor)
        if refusal is None and seen is not None and path == self._path(job.file_path):
            self._accepted[job.id] = seen
            if len(self._accepted) > ACCEPTED_REMEMBERED:
                del self._accepted[next(iter(self._accepted))]  # the oldest: unchecked
        return refusal

    async def claim(self, job: Job) -> None:
        """Move the file of a just-started job into processing/ (idempotent); durable
        when this returns (the lane fsyncs processing/ once for its whole batch).

        A second claim of the same attempt returns at once: the first made it durable,
        and only `settle` moves the file on (it forgets the claim). While the first is
        still on its way, the second waits for it (and tries itself if it failed).
        """
        if self._claimed.get(job.id) == job.attempts:
            return
        pending = self._claiming.get(job.id)
        if pending is not None and pending[0] == job.attempts:
            await pending[1].wait()
            if self._claimed.get(job.id) == job.attempts:
                return
        done = Done()
        self._claiming[job.id] = (job.attempts, done)
        try:
            await self._moves.run(lambda dirty: self._claim(job, dirty))
            self._claimed[job.id] = job.attempts
            if len(self._claimed) > CLAIMS_REMEMBERED:
                del self._claimed[next(iter(self._claimed))]  # the oldest
        finally:
            if self._claiming.get(job.id, (0, None))[1] is done:
                del self._claiming[job.id]
            done.set()

    async def settle(self, job: Job) -> None:
        """Move a terminal job's file to archive/ or error/ (idempotent).

        A failure here is logged, not raised: the log already holds the outcome, and
        reconciliation at the next start finishes the move.
        """
        self._claimed.pop(job.id, None)
        self._accepted.pop(job.id, None)
        try:
            await self._moves.run(lambda dirty: self._settle(job, dirty))
        except OSError:
            log.exception("settle_failed", job_id=job.id, workflow_name=job.workflow_name,
                          target=job.current_path)
        if self.on_settled is not None and not job.is_active:
            self.on_settled(job)

    async def reconcile(self, workflow_name: str, active: Sequence[Job],
                        jobs: JobLookup) -> None:
        """Settle what a crash left between a terminal event and its move; sweep temps.

        A file in processing/ that no active job owns is settled like its finished job, or,
        when the log does not know it, goes back to input/. A file in input/ whose latest
        job was refused or cancelled there before it started (no error/ copy, the file no
        newer than that end) is settled to error/ too, instead of becoming new work.
        """
        self.ensure_layout(workflow_name)
        strays, waiting = await anyio.to_thread.run_sync(self._sweep, workflow_name, active)
        for path in strays:
            job_id, _, _ = path.name.partition("--")
            job = await jobs.get_job(job_id)
            if job is None:
                await anyio.to_thread.run_sync(self._return_orphan, workflow_name, path)
            elif not job.is_active:
                await self.settle(job)
            # else: claimed since `active` was read (by another node, say): its own file
        owned = {job.file_path for job in active}
        # A name that is not UTF-8 never had a job (the watcher refuses it).
        candidates = [relative for name in waiting if _is_utf8(name)
                      and (relative := layout.input_path(workflow_name, name)) not in owned]
        latest = await jobs.latest_jobs(workflow_name, candidates)
        ended = [job for job in latest.values() if job.status in (Status.FAILED, Status.CANCELLED)]
        for job in await anyio.to_thread.run_sync(self._left_in_input, ended):
            await self.settle(job)

    def _left_in_input(self, jobs: Sequence[Job]) -> list[Job]:
        """The jobs whose file in input/ is theirs, left there by a crash before its move:
        jobs that never started (refused or cancelled while pending) whose error/ copy does
        not exist, and whose file is no newer than their end. A file dropped since (the
        fixed version of a file that failed, say) is new work, whatever the name."""
        left = []
        for job in jobs:
            if job.attempts or job.finished_at is None or \
                    os.path.exists(self._path(job.current_path)):
                continue
            try:
                written = os.stat(self._path(job.file_path)).st_mtime
            except OSError:
                continue
            if written <= job.finished_at.timestamp():
                left.append(job)
        return left

    def context(self, job: Job, config: WorkflowConfig, progress: ProgressSink,
                cancelled: Callable[[], bool]) -> FileJobContext:
        """The processor's workspace for this attempt."""
        return FileJobContext(job, self.data_dir, self.absolute(job.current_path),
                              progress, cancelled)

    async def keep_duplicate(self, job: Job, name: str, at: datetime) -> str:
        """Move a dropped duplicate of `job`'s file out of input/; where it went (relative)."""
        target = layout.duplicate_path(job, name, at)
        source = self.absolute(layout.input_path(job.workflow_name, name))
        await anyio.to_thread.run_sync(move, source, self.absolute(target))
        return target

    async def reject(self, workflow_name: str, name: str, reason: str, at: datetime) -> str:
        """Move a file that cannot become a job (an escaping symlink, ...) to error/ with why."""
        prefix = f"rejected-{at:%Y%m%dT%H%M%S%f}--"
        kept = layout.fit_name(name, layout.NAME_MAX - len(prefix) - len(ERROR_SUFFIX))
        target = self.data_dir / workflow_name / "error" / f"{prefix}{kept}"
        source = self.data_dir / workflow_name / "input" / name
        report_path = target.with_name(target.name + ERROR_SUFFIX)

        def _move() -> None:
            # The report first, as a job's settle does: a file in error/ always has its why.
            shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
            report = {"workflow_name": workflow_name, "file_path": f"{workflow_name}/input/{shown}",
                      "status": "rejected", "error_type": "Rejected", "message": reason,
                      "at": at.isoformat()}
            write_bytes_atomic(report_path, msgspec.json.format(msgspec.json.encode(report)))
            try:
                move(source, target)
            except BaseException:
                report_path.unlink(missing_ok=True)  # the file stays (or went): no report
                raise

        await anyio.to_thread.run_sync(_move)
        return target.relative_to(self.data_dir).as_posix()

    # -- the moves, in a worker thread -------------------------------------------------

    def _candidates(self, job: Job) -> list[str]:
        """Every place the lifecycle may have left the job's file, most advanced first.

        A long name's file moved before names were shortened (`layout.fit_name`) lies
        under its whole name: looked for too, and moved on under the shortened one."""
        places = [layout.processing_path(job), layout.error_path(job), job.file_path]
        if job.finished_at is not None:
            places.insert(0, layout.archive_path(job, job.finished_at))
        whole = f"{job.id}--{job.file_path.rpartition('/')[2]}"
        stored = layout.stored_name(job)
        if whole != stored:
            places[-1:-1] = [place.rpartition("/")[0] + "/" + whole
                             for place in places[:-1]]
        return [self._path(place) for place in places]

    def _find(self, job: Job) -> str | None:
        current = self._path(job.current_path)
        if os.path.isfile(current):
            return current
        return next((path for path in self._candidates(job) if os.path.isfile(path)), None)

    def _claim(self, job: Job, dirty: set[str]) -> None:
        target = self._path(job.current_path)
        if os.path.exists(target):
            return
        for source in self._candidates(job):
            if source != target and os.path.isfile(source):
                accepted = self._accepted.get(job.id)
                if accepted is not None and source == self._path(job.file_path) and \
                        _identity(source) != accepted:
                    raise FileChanged(
                        f"{job.file_path} changed after intake accepted it (replaced, or "
                        "still being written): its bytes were not checked; drop the file "
                        "again, complete, to process it")
                # Durable before the processor runs: were this rename lost in a power cut
                # after the job completed, the file would reappear in input/ as new work.
                # (The lane fsyncs processing/ once for every claim of its batch.)
                move(source, target, dirty=dirty)
                self._accepted.pop(job.id, None)
                if source == self._path(layout.error_path(job)):  # an operator's retry
                    Path(source + ERROR_SUFFIX).unlink(missing_ok=True)
                return
        raise FileMissing(f"{job.file_path} is in none of input/, processing/, error/")

    def _settle(self, job: Job, dirty: set[str]) -> None:
        """Move the file to where the job's status says (its `current_path`)."""
        target = self._path(job.current_path)
        if job.status in (Status.FAILED, Status.CANCELLED):
            # The report first: a crash before the move leaves the file where
            # reconciliation settles it again; a file in error/ always has its report.
            write_bytes_atomic(Path(target + ERROR_SUFFIX),
                               msgspec.json.format(msgspec.json.encode(_report(job))))
        if not os.path.exists(target):
            source = next((p for p in self._candidates(job)
                           if p != target and os.path.isfile(p)), None)
            if source is None:
                log.warning("file_missing_at_settle", job_id=job.id, file_path=job.file_path)
            else:
                # From processing/ no fsync is needed: were the rename lost in a power cut,
                # reconciliation finds the file there and settles it again from the log.
                # From input/ (refused or cancelled before a start) the watcher would see
                # it as new work, so that move is made durable.
                from_input = source == self._path(job.file_path)
                move(source, target, durable=from_input, dirty=dirty)

    def _sweep(self, workflow_name: str, active: Sequence[Job]) -> tuple[list[Path], list[str]]:
        owned = {layout.stored_name(job) for job in active}
        root = self.data_dir / workflow_name
        for stage in layout.STAGES:
            # Only the hidden names `temp_name` makes: a file of an operator's that merely
            # ends like one is not ours to delete.
            for tmp in (root / stage).rglob(f".*{TEMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
        strays = [
            path for path in sorted((root / "processing").iterdir())
            if path.is_file() and path.name not in owned and not path.name.startswith(".")
        ]
        waiting = [entry.name for entry in os.scandir(root / "input")
                   if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")]
        return strays, waiting

    def _return_orphan(self, workflow_name: str, path: Path) -> None:
        _, _, name = path.name.partition("--")
        target = self.data_dir / workflow_name / "input" / (name or path.name)
        if target.exists():
            target = self.data_dir / workflow_name / "error" / path.name
        move(path, target)
        log.warning("orphan_returned", path=str(path), to=str(target))


def _identity(path: str) -> tuple[int, int, int]:
    """A file as intake saw it: inode, size, modification time (ns)."""
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _report(job: Job) -> ErrorReport:
    error = job.error
    return ErrorReport(
        job_id=job.id, workflow_name=job.workflow_name, file_path=job.file_path,
        status=str(job.status), error_type=error.type if error else "Unknown",
        message=error.message if error else "", traceback=error.traceback if error else "",
        actor=error.actor if error else None, attempts=job.attempts,
        created_at=_iso(job.created_at), started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at),
    )


def _iso(value: Any) -> Any:
    return value.isoformat() if value is not None else None
