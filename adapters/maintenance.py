"""Maintenance of a data folder: online backup, restore, vacuum, archive cleanup, doctor.

Everything here works on the SQLite file and the folders directly, with no click
and no server, so it is tested as plain functions. What runs beside a live server
(backup, the WAL checkpoint, cleanup, doctor) only reads the log or touches
archive/; what rewrites the log (restore, VACUUM) takes the writer's lock first
and is refused while a server holds it.
"""

from __future__ import annotations

import os
import pkgutil
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc
import msgspec
import structlog

from adapters.audit import verify_chain
from adapters.fsutil import TEMP_SUFFIX, fsync_dir
from adapters.sqlite import SqliteEventStore
from adapters.sqlite.lock import WriterLock
from kernel.config import WorkflowConfig
from kernel.layout import RESERVED_NAMES, STAGES, WORKFLOW_NAME, stored_name
from kernel.ports import ScannerUnavailable, StoreUnavailable
from kernel.state import Job, Status

if TYPE_CHECKING:
    from adapters.bootstrap import Kernel
    from adapters.config import Settings

log = structlog.get_logger("multiflow.maintenance")

Progress = Callable[[int, int], None]  # (pages copied, pages in all)
BACKUP_STEPS = 100  # progress updates per backup
BACKUP_STEP_PAGES_MIN = 64
DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DUPLICATE_STAMP = re.compile(r"^[^-]+--(\d{8}T\d{12})--")
AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
AGE_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


class MaintenanceError(Exception):
    """A maintenance step that cannot be done; the message says why and what to do."""


# -- checks of a log file ---------------------------------------------------------------


class LogCheck(msgspec.Struct, kw_only=True):
    """What `integrity_check` and the hash chain say about one log file."""

    integrity: str
    events: int  # events whose hash verified
    last_seq: int
    first_bad_seq: int | None = None
    chain_reason: str = ""

    @property
    def ok(self) -> bool:
        """True when SQLite finds the file sound and every event links to the one before."""
        return self.integrity == "ok" and self.first_bad_seq is None

    def problem(self) -> str:
        """One sentence on what is wrong (empty when ok)."""
        if self.integrity != "ok":
            return f"SQLite's integrity check failed: {self.integrity}"
        if self.first_bad_seq is not None:
            return f"the hash chain breaks at seq {self.first_bad_seq}: {self.chain_reason}"
        return ""


def sqlite_check(path: Path, pragma: Literal["integrity_check", "quick_check"]) -> str:
    """'ok', or SQLite's findings joined, for a full or a quick structural check."""
    if not path.is_file():
        raise StoreUnavailable(f"no event log at {path}")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only=ON")
        rows = [str(row[0]) for row in conn.execute(f"PRAGMA {pragma}(20)")]
    except sqlite3.DatabaseError as exc:
        return f"not a readable SQLite database: {exc}"
    finally:
        conn.close()
    return "; ".join(rows) or "no answer"


async def check_log(path: Path, pragma: Literal["integrity_check", "quick_check"]
                    = "integrity_check") -> LogCheck:
    """Check a log file (live or a copy) read-only: SQLite's own check, then the chain."""
    integrity = await anyio.to_thread.run_sync(sqlite_check, path, pragma)
    if integrity != "ok":
        return LogCheck(integrity=integrity, events=0, last_seq=0)
    store = await SqliteEventStore.open(path, readonly=True)
    try:
        report = await verify_chain(store)
        last_seq = await store.last_seq()
    finally:
        await store.close()
    return LogCheck(integrity=integrity, events=report.checked, last_seq=last_seq,
                    first_bad_seq=report.first_bad_seq, chain_reason=report.reason)


# -- backup and restore -----------------------------------------------------------------


class BackupReport(msgspec.Struct, kw_only=True):
    """A verified copy: where, how big, the last seq it holds, and how long it took."""

    path: str
    size_bytes: int
    snapshot_seq: int  # every event up to here was committed before the copy began
    check: LogCheck
    seconds: float


def backup_target(dest: Path, now: datetime) -> Path:
    """The file a backup writes: DEST itself, or a stamped name inside a folder DEST."""
    if dest.is_dir():
        dest = dest / f"multiflow-{now:%Y%m%dT%H%M%SZ}.db"
    if dest.exists():
        raise MaintenanceError(f"{dest} exists; a backup never overwrites a file")
    if not dest.parent.is_dir():
        raise MaintenanceError(f"the folder {dest.parent} does not exist")
    return dest


def copy_online(source_path: Path, target_path: Path, progress: Progress | None = None) -> int:
    """Copy the log with SQLite's backup API from one read snapshot; the last seq copied.

    The read transaction pins a WAL snapshot for the whole copy, so the server keeps
    committing meanwhile and the copy never restarts: it holds exactly the events
    committed when the copy began. The copy is switched to rollback-journal mode so
    that it is one self-contained file.
    """
    if not source_path.is_file():
        raise StoreUnavailable(f"no event log at {source_path}")
    source = sqlite3.connect(source_path, isolation_level=None)
    try:
        source.execute("PRAGMA busy_timeout=5000")
        source.execute("PRAGMA query_only=ON")
        source.execute("BEGIN")
        (snapshot_seq,) = source.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        (page_count,) = source.execute("PRAGMA page_count").fetchone()
        target = sqlite3.connect(target_path, isolation_level=None)
        try:
            source.backup(target, pages=max(BACKUP_STEP_PAGES_MIN, page_count // BACKUP_STEPS),
                          sleep=0, progress=_pages(progress))
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
        source.execute("COMMIT")
    finally:
        source.close()
    _fsync_file(target_path)
    return int(snapshot_seq)


def _pages(progress: Progress | None) -> Callable[[int, int, int], None] | None:
    if progress is None:
        return None
    return lambda status, remaining, total: progress(total - remaining, total)


async def backup(source_path: Path, dest: Path, progress: Progress | None = None,
                 now: datetime | None = None) -> BackupReport:
    """Copy the live log to `dest`, verify the copy, and only then give it its name."""
    started = time.perf_counter()
    target = backup_target(dest, now or datetime.now(UTC))
    partial = target.with_name(target.name + ".partial")
    try:
        try:
            snapshot_seq = await anyio.to_thread.run_sync(copy_online, source_path, partial,
                                                          progress)
        except sqlite3.Error as exc:
            raise MaintenanceError(f"copying {source_path} failed: {exc}") from exc
        check = await check_log(partial)
        if not check.ok:
            raise MaintenanceError(f"the copy does not verify, so it was not kept: "
                                   f"{check.problem()}")
        if check.last_seq < snapshot_seq:
            raise MaintenanceError(f"the copy ends at seq {check.last_seq}, "
                                   f"before the snapshot's {snapshot_seq}")
        os.rename(partial, target)
        fsync_dir(target.parent)
    finally:
        partial.unlink(missing_ok=True)
    return BackupReport(path=str(target), size_bytes=target.stat().st_size,
                        snapshot_seq=snapshot_seq, check=check,
                        seconds=time.perf_counter() - started)


class RestoreReport(msgspec.Struct, kw_only=True):
    """What a restore put in place, and where the file it replaced was kept."""

    check: LogCheck
    kept: list[str]  # the replaced log (and its -wal/-shm), renamed


async def restore(backup_path: Path, db_path: Path, now: datetime | None = None
                  ) -> RestoreReport:
    """Replace the log with a verified backup; refused (StoreLocked) while a server runs."""
    if not await anyio.Path(backup_path).is_file():
        raise MaintenanceError(f"no backup at {backup_path}")
    await anyio.Path(db_path.parent).mkdir(parents=True, exist_ok=True)
    lock = WriterLock(db_path)
    lock.acquire()  # held to the end: no server may start on a half-restored file
    try:
        check = await check_log(backup_path)
        if not check.ok:
            raise MaintenanceError(f"{backup_path} does not verify; nothing was changed: "
                                   f"{check.problem()}")
        stamp = f"{now or datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        kept = await anyio.to_thread.run_sync(_put_in_place, backup_path, db_path, stamp)
    finally:
        lock.release()
    return RestoreReport(check=check, kept=kept)


def _put_in_place(backup_path: Path, db_path: Path, stamp: str) -> list[str]:
    """Copy the backup beside the log, keep the old log, swap the copy in atomically.

    At every instant `multiflow.db` is the old log or the new one, so a crash anywhere
    leaves a log to start on (the old one was renamed away first, and a crash before the
    copy was renamed in left none: the next start made an empty log). The old log's WAL
    is folded into it first, so no stale `-wal` can be read as the new file's.
    """
    incoming = db_path.with_name(f".{db_path.name}.restoring{TEMP_SUFFIX}")
    shutil.copyfile(backup_path, incoming)
    _fsync_file(incoming)
    kept: list[str] = []
    if db_path.exists():
        _fold_wal(db_path)
        # SQLite finds a WAL by name: one left (the fold failed on a damaged log) is kept
        # beside the kept log, and removed before the swap.
        for suffix in ("", "-wal", "-shm"):
            current = Path(f"{db_path}{suffix}")
            if current.exists():
                old = Path(f"{db_path}.before-restore-{stamp}{suffix}")
                os.link(current, old)
                kept.append(str(old))
        fsync_dir(db_path.parent)
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    os.replace(incoming, db_path)
    fsync_dir(db_path.parent)
    return kept


def _fold_wal(db_path: Path) -> None:
    """Checkpoint the log's WAL into it and leave it a single file (best effort)."""
    try:
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("restore_wal_not_folded", path=str(db_path), error=str(exc))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- vacuum -------------------------------------------------------------------------------


class VacuumReport(msgspec.Struct, kw_only=True):
    """The log's size (with its WAL) before and after, and what was done."""

    mode: Literal["vacuum", "checkpoint"]
    before_bytes: int
    after_bytes: int
    detail: str = ""


def log_size(db_path: Path) -> int:
    """Bytes of the log file and its WAL."""
    return sum(p.stat().st_size for p in (db_path, Path(f"{db_path}-wal")) if p.exists())


def damaged(db_path: Path, exc: sqlite3.Error) -> MaintenanceError:
    """The error of a log SQLite cannot work on, with what to do."""
    return MaintenanceError(f"{db_path} cannot be used: {exc}. Check it with `multiflow "
                            "doctor`; `multiflow restore` puts a backup back")


def vacuum(db_path: Path) -> VacuumReport:
    """Rewrite the log compactly (VACUUM, then ANALYZE); needs the store to itself."""
    if not db_path.is_file():
        raise StoreUnavailable(f"no event log at {db_path}")
    before = log_size(db_path)
    free = shutil.disk_usage(db_path.parent).free
    if free < 2 * before:
        raise MaintenanceError(f"VACUUM needs about twice the log's size free "
                               f"({2 * before:,} bytes); {free:,} are free")
    lock = WriterLock(db_path)
    lock.acquire()
    try:
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("VACUUM")
            conn.execute("PRAGMA optimize=0x10002")  # ANALYZE what needs it
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise damaged(db_path, exc) from exc
    finally:
        lock.release()
    return VacuumReport(mode="vacuum", before_bytes=before, after_bytes=log_size(db_path))


def checkpoint(db_path: Path) -> VacuumReport:
    """Fold the WAL into the log and truncate it: safe beside a running server."""
    if not db_path.is_file():
        raise StoreUnavailable(f"no event log at {db_path}")
    before = log_size(db_path)
    try:
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            busy, wal_pages, done_pages = conn.execute(
                "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise damaged(db_path, exc) from exc
    detail = "the WAL is folded in and truncated" if not busy else \
        f"readers held part of the WAL ({done_pages} of {wal_pages} pages folded in); try later"
    return VacuumReport(mode="checkpoint", before_bytes=before, after_bytes=log_size(db_path),
                        detail=detail)


# -- archive cleanup ----------------------------------------------------------------------


class Removal(msgspec.Struct, frozen=True, kw_only=True):
    """One folder or file the cleanup removes (paths relative to the data root)."""

    path: str
    kind: Literal["archive-day", "duplicate", "output"]
    size_bytes: int
    dated: datetime


class CleanupReport(msgspec.Struct, kw_only=True):
    """What the cleanup removed (or, in a dry run, would remove)."""

    cutoff: datetime
    dry_run: bool
    removals: list[Removal]

    @property
    def size_bytes(self) -> int:
        """Bytes freed (or that would be)."""
        return sum(r.size_bytes for r in self.removals)


def parse_age(text: str) -> timedelta:
    """An age such as 30d, 12h, 90m, 2w or 45s; a bare number is days."""
    found = AGE.match(text.strip().lower())
    if found is None:
        raise ValueError(f"{text!r} is not an age: use a number and a unit, e.g. 30d, 12h, 2w")
    try:
        return timedelta(seconds=float(found[1]) * AGE_UNITS_S[found[2]])
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any date can go back") from None


def plan_cleanup(data_dir: Path, older_than: timedelta, now: datetime, *,
                 include_output: bool = False) -> CleanupReport:
    """What is older than `older_than` in each workflow's archive/ (and output/ if asked)."""
    try:
        cutoff = now - older_than
    except OverflowError:  # further back than any date: nothing is that old
        cutoff = datetime.min.replace(tzinfo=UTC)
    removals: list[Removal] = []
    for workflow in _workflow_dirs(data_dir):
        removals += _old_days(data_dir, workflow / "archive", cutoff)
        removals += _old_files(data_dir, workflow / "archive" / "duplicates", cutoff,
                               "duplicate")
        if include_output:
            removals += _old_files(data_dir, workflow / "output", cutoff, "output")
    return CleanupReport(cutoff=cutoff, dry_run=True, removals=removals)


def cleanup(data_dir: Path, older_than: timedelta, now: datetime, *, dry_run: bool = False,
            include_output: bool = False) -> CleanupReport:
    """Remove archive/{yyyy-mm-dd}/ folders and duplicates (and outputs) past the age."""
    report = plan_cleanup(data_dir, older_than, now, include_output=include_output)
    report.dry_run = dry_run
    if not dry_run:
        for removal in report.removals:
            _remove(data_dir / removal.path)
    return report


def _workflow_dirs(data_dir: Path) -> Iterator[Path]:
    if not data_dir.is_dir():
        return
    for path in sorted(data_dir.iterdir()):
        if WORKFLOW_NAME.match(path.name) and _real_dir(path):
            yield path


def _real_dir(path: Path) -> bool:
    """A folder, not a symlink to one: cleanup never follows links out of the data root."""
    return path.is_dir() and not path.is_symlink()


def _old_days(data_dir: Path, archive: Path, cutoff: datetime) -> list[Removal]:
    """Day folders whose whole UTC day ended before the cutoff."""
    if not _real_dir(archive):
        return []
    found = []
    for day in sorted(archive.iterdir()):
        if not DAY_FOLDER.match(day.name) or not _real_dir(day):
            continue
        try:
            start = datetime.strptime(day.name, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            continue
        if start + timedelta(days=1) <= cutoff:
            found.append(Removal(path=day.relative_to(data_dir).as_posix(), kind="archive-day",
                                 size_bytes=_tree_size(day), dated=start))
    return found


def _old_files(data_dir: Path, folder: Path, cutoff: datetime,
               kind: Literal["duplicate", "output"]) -> list[Removal]:
    """Files below `folder` dated before the cutoff (duplicates by their name's stamp)."""
    if not _real_dir(folder):
        return []
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink() or name.endswith(TEMP_SUFFIX):
                continue
            stat = path.stat()
            dated = _stamp(name) if kind == "duplicate" else None
            dated = dated or datetime.fromtimestamp(stat.st_mtime, UTC)
            if dated <= cutoff:
                found.append(Removal(path=path.relative_to(data_dir).as_posix(), kind=kind,
                                     size_bytes=stat.st_size, dated=dated))
    return found


def _stamp(name: str) -> datetime | None:
    """The UTC time in a duplicate's name `{job_id}--{yyyymmddThhmmssffffff}--{name}`."""
    found = DUPLICATE_STAMP.match(name)
    if found is None:
        return None
    try:
        return datetime.strptime(found[1], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    except ValueError:
        return None


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


async def cleanup_daily(kernel: Kernel, settings: Settings, *,
                        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
    """Run the archive cleanup now and every `cleanup_interval_s`; start it with tg.start.

    Each pass also removes uploads a crash left in staging (`HotFolders.sweep_staging`);
    with retention off (0 days) the archive itself is kept for ever."""
    task_status.started()
    older_than = timedelta(days=settings.archive_retention_days)
    while True:
        try:
            for path in await anyio.to_thread.run_sync(kernel.files.sweep_staging, time.time()):
                log.info("staging_removed", path=path.name,
                         reason="an upload cut short (unwritten for an hour)")
        except Exception:
            log.exception("staging_cleanup_failed")
        if settings.archive_retention_days > 0:
            try:
                report = await anyio.to_thread.run_sync(
                    lambda: cleanup(kernel.files.data_dir, older_than, datetime.now(UTC)))
            except Exception:  # a cleanup that fails must never stop the server
                log.exception("archive_cleanup_failed")
            else:
                _log_cleanup(report)
        await anyio.sleep(settings.cleanup_interval_s)


def _log_cleanup(report: CleanupReport) -> None:
    for removal in report.removals:
        log.info("archive_removed", workflow_name=removal.path.split("/", 1)[0],
                 path=removal.path, kind=removal.kind, size_bytes=removal.size_bytes)
    log.info("archive_cleanup", removed=len(report.removals), freed_bytes=report.size_bytes,
             cutoff=report.cutoff.isoformat())


# -- doctor ---------------------------------------------------------------------------------

Level = Literal["ok", "warn", "fail"]
SETTLING_S = 60.0  # a finished job's file may still be on its way out of processing/


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One thing the doctor looked at: ok, a warning, or a failure with its fix."""

    check: str
    level: Level
    detail: str
    fix: str = ""


class ServerFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the running server said: /healthz, and each workflow's timeout."""

    url: str
    health: dict[str, object]
    timeouts_s: dict[str, float | None]


async def diagnose(settings: Settings, db_path: Path, server: ServerFacts | None,
                   now: datetime, url: str = "") -> list[Finding]:
    """Every check, in the order an operator would look: folders, disk, log, server, jobs."""
    data_dir = settings.data_path
    names = sorted(server.timeouts_s) if server and server.timeouts_s \
        else known_workflows(settings)
    held = WriterLock(db_path).is_held_elsewhere()
    findings = check_folders(data_dir, names)
    findings.append(check_disk(data_dir, settings.disk_free_min_bytes))
    store = await check_store(db_path)
    findings += store + check_server(server, held, url)
    if all(f.level == "ok" for f in store if f.check == "store"):  # a readable log
        timeouts = server.timeouts_s if server and server.timeouts_s \
            else settings_timeouts(settings, names)
        findings += await check_jobs(db_path, data_dir, names, timeouts, held, now)
    if settings.scanner is not None:
        findings.append(await check_scanner(settings))
    return findings


def known_workflows(settings: Settings) -> list[str]:
    """Workflow names without a server: packages, entries, settings and data folders."""
    import workflows as bundled

    names = {info.name for info in pkgutil.iter_modules(bundled.__path__)
             if info.ispkg and not info.name.startswith("_")}
    folder = Path(settings.workflows_dir)
    if folder.is_dir():
        names |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    names |= {e.partition(":")[2] or e.partition(":")[0].rsplit(".", 1)[-1]
              for e in settings.workflow_entries}
    names |= set(settings.workflows)
    names |= {p.name for p in _workflow_dirs(settings.data_path)
              if any((p / stage).exists() for stage in STAGES)}
    return sorted(n for n in names if WORKFLOW_NAME.match(n) and n not in RESERVED_NAMES)


def settings_timeouts(settings: Settings, names: list[str]) -> dict[str, float | None]:
    """Each workflow's timeout as the settings give it (the package may set its own)."""
    default = WorkflowConfig().timeout_s
    return {name: settings.workflows.get(name, {}).get("timeout_s", default) for name in names}


def check_folders(data_dir: Path, names: list[str]) -> list[Finding]:
    """Each workflow's five folders exist, are folders, and take a new file."""
    findings = []
    for name in names:
        if not (data_dir / name).exists():
            findings.append(Finding(check=f"folders:{name}", level="warn",
                                    detail=f"{data_dir / name} does not exist yet",
                                    fix="the server creates it when it registers the workflow"))
            continue
        bad = [problem for stage in STAGES if (problem := _folder_problem(data_dir / name / stage))]
        if bad:
            findings.append(Finding(
                check=f"folders:{name}", level="fail", detail="; ".join(bad),
                fix=f"mkdir -p {data_dir}/{name}/{{{','.join(STAGES)}}} (move away any file "
                    "in a folder's place) and give the server's user write access"))
        else:
            findings.append(Finding(check=f"folders:{name}", level="ok",
                                    detail="input, processing, output, archive, error writable"))
    return findings


def _folder_problem(folder: Path) -> str:
    """Why `folder` cannot be used, or ''; writes a probe file (root ignores mode bits)."""
    if not folder.exists():
        return f"{folder} is missing"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    probe = folder / f".multiflow-doctor-{os.getpid()}{TEMP_SUFFIX}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror})"
    return ""


def check_disk(data_dir: Path, free_min_bytes: int) -> Finding:
    """Free space under the data root against `disk_free_min_bytes`."""
    existing = next(p for p in (data_dir.absolute(), *data_dir.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / 1024**3:.1f} GiB free under {data_dir}"
    if free >= free_min_bytes:
        return Finding(check="disk", level="ok", detail=detail)
    return Finding(check="disk", level="fail",
                   detail=f"{detail}, below disk_free_min_bytes ({free_min_bytes:,})",
                   fix="free space: `multiflow cleanup --archive-older-than 30d`, move old "
                       "output/ away, or grow the disk")


async def check_store(db_path: Path) -> list[Finding]:
    """PRAGMA quick_check and the hash chain, read-only (safe while the server runs)."""
    if not await anyio.Path(db_path).is_file():
        return [Finding(check="store", level="warn", detail=f"no event log at {db_path} yet",
                        fix="`multiflow run` creates it; check --data-dir / --store")]
    try:
        found = await check_log(db_path, "quick_check")
    except StoreUnavailable as exc:
        return [Finding(check="store", level="fail", detail=str(exc),
                        fix="check the file's owner and mode and the disk; see "
                            "docs/operations.md#database-connection-issues")]
    if found.integrity != "ok":
        return [Finding(check="store", level="fail", detail=found.problem(),
                        fix="stop the server and `multiflow restore` the latest backup")]
    if not found.ok:
        return [Finding(check="chain", level="fail", detail=found.problem(),
                        fix="the log was edited outside multiflow: keep the file for the "
                            "investigation (`multiflow audit verify`), restore a backup")]
    return [Finding(check="store", level="ok",
                    detail=f"quick_check ok; {found.events:,} events, the chain holds")]


def check_server(server: ServerFacts | None, lock_held: bool, url: str) -> list[Finding]:
    """The server's own readiness checks (watchers, store, disk, scanner, workflows)."""
    if server is None:
        detail = f"no server answers at {url or 'the URL'}"
        if lock_held:
            return [Finding(check="server", level="warn",
                            detail=f"{detail}, but a process holds the store's lock",
                            fix="check --url / MULTIFLOW_URL; if it is a hung server, "
                                "restart it (systemctl restart multiflow)")]
        return [Finding(check="server", level="warn", detail=f"{detail}: nothing is processed "
                        "and watcher heartbeats cannot be checked",
                        fix="start it: `multiflow run` (or systemctl start multiflow)")]
    checks = server.health.get("checks", [])
    findings = [Finding(check="server", level="ok",
                        detail=f"{server.url} is {server.health.get('status', '?')}")]
    for check in checks if isinstance(checks, list) else []:
        name, ok, detail = str(check.get("name")), bool(check.get("ok")), str(check.get("detail"))
        findings.append(Finding(check=f"server:{name}", level="ok" if ok else "fail",
                                detail=detail or ("ok" if ok else "failing"),
                                fix="" if ok else _health_fix(name)))
    return findings


def _health_fix(name: str) -> str:
    kind, _, subject = name.partition(":")
    return {
        "watcher": f"the watcher of {subject} has stopped beating: look for watcher_failed in "
                   f"data/logs/{subject}.log; raise fs.inotify.max_user_watches, or set "
                   f"watch_mode = \"poll\" for a network share; then restart the server",
        "store": "see docs/operations.md#database-connection-issues",
        "disk": "free space: `multiflow cleanup --archive-older-than 30d`",
        "scanner": "start clamd (systemctl start clamav-daemon) and check scanner.socket",
        "workflow": f"fix the package of {subject} (the detail says why) and restart",
        "accepting": "the server is shutting down; start it again once it has stopped",
    }.get(kind, "see docs/operations.md#troubleshooting")


async def check_jobs(db_path: Path, data_dir: Path, names: list[str],
                     timeouts_s: dict[str, float | None], lock_held: bool,
                     now: datetime) -> list[Finding]:
    """Jobs running past their timeout (or left running by a dead server), stray files."""
    store = await SqliteEventStore.open(db_path, readonly=True)
    try:
        active = await store.active_jobs()
        findings = [f for job in active if job.status is Status.RUNNING
                    if (f := _running_finding(job, timeouts_s, lock_held, now))]
        for name in names:
            findings += await _strays(store, data_dir, name,
                                      [j for j in active if j.workflow_name == name], now)
    finally:
        await store.close()
    return findings


def _running_finding(job: Job, timeouts_s: dict[str, float | None], lock_held: bool,
                     now: datetime) -> Finding | None:
    timeout_s = timeouts_s.get(job.workflow_name, WorkflowConfig().timeout_s)
    running_s = (now - (job.started_at or job.updated_at)).total_seconds()
    past = timeout_s is not None and running_s > timeout_s
    over = f", past its timeout of {timeout_s:g} s" if past else ""
    what = f"job {job.id} ({job.workflow_name}) has been running for {running_s:,.0f} s{over}"
    if not lock_held:
        return Finding(check="jobs:running", level="fail",
                       detail=f"{what}, but no server runs: it was interrupted",
                       fix="start the server: it records the job as Interrupted and retries "
                           "it per its policy")
    if not past:
        return None
    return Finding(check="jobs:running", level="fail", detail=f"{what}: its processor does "
                   "not stop", fix=f"`multiflow cancel {job.id}`; if it stays running, restart "
                   "the server; make the processor call ctx.check_cancelled() between chunks")


async def _strays(store: SqliteEventStore, data_dir: Path, workflow_name: str,
                  active: list[Job], now: datetime) -> list[Finding]:
    """Files in processing/ that no active job owns."""
    folder = data_dir / workflow_name / "processing"
    if not _real_dir(folder):
        return []
    owned = {stored_name(job) for job in active}
    findings = []
    for path in sorted(folder.iterdir()):
        if path.name in owned or path.name.startswith(".") or not path.is_file():
            continue
        job = await store.get_job(path.name.partition("--")[0])
        if job is not None and job.finished_at is not None and \
                (now - job.finished_at).total_seconds() < SETTLING_S:
            continue  # finished a moment ago: the server is moving it out now
        findings.append(_stray_finding(data_dir, path, workflow_name, job))
    return findings


def _stray_finding(data_dir: Path, path: Path, workflow_name: str, job: Job | None) -> Finding:
    where = path.relative_to(data_dir).as_posix()
    if job is None:
        return Finding(check="files:processing", level="fail",
                       detail=f"{where}: no job owns it",
                       fix=f"move it back to {workflow_name}/input/ to process it (the server "
                           "does so at its next start), or delete it")
    return Finding(check="files:processing", level="fail",
                   detail=f"{where}: its job {job.id} is {job.status}",
                   fix=f"the server moves it to {job.current_path} at its next start; or move "
                       "it there by hand")


async def check_scanner(settings: Settings) -> Finding:
    """Whether clamd answers PING, when a scanner is configured."""
    from adapters.clamd import ClamdClient

    assert settings.scanner is not None
    quick = msgspec.structs.replace(settings.scanner, connect_timeout_s=3.0, read_timeout_s=3.0)
    try:
        await ClamdClient(quick).ping()
    except ScannerUnavailable as exc:
        return Finding(check="scanner", level="fail", detail=str(exc),
                       fix="start clamd (systemctl start clamav-daemon); check scanner "
                           "socket_path or port in the settings; its database must not be empty")
    return Finding(check="scanner", level="ok", detail="clamd answers PONG")
