"""What the crash tests share: starting and killing the child, and auditing what it left.

The audit reads only the finished data dir: the log (opened read-only, after the
child has exited), the folders and the outputs. Its oracle for the read model is
`kernel.state.replay` of the stored log, never the store's own projection code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc

from adapters.fsutil import TEMP_SUFFIX
from adapters.sqlite import SqliteEventStore
from kernel import chain
from kernel.events import Event, JobCompleted, JobCreated, JobFailed, JobStarted
from kernel.state import Job, Status, StoredEvent, replay
from tests.integration import crash_child
from tests.integration.crash_child import WORKFLOW, input_bytes, input_name, output_bytes

CHILD = Path(crash_child.__file__).resolve()
ROOT = CHILD.parents[2]
READ_PAGE = 5000


def child_command(data_dir: Path, files: int, **options: object) -> list[str]:
    """The command line of one life of the child."""
    command = [sys.executable, str(CHILD), str(data_dir), "--files", str(files)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


async def start_child(command: list[str], log_path: Path) -> anyio.abc.Process:
    """Start one life; its output goes to `log_path` (appended, one file for all lives)."""
    with open(log_path, "ab") as log:
        return await anyio.open_process(command, stdin=None, stdout=log,
                                        stderr=log, cwd=ROOT)


async def kill_when(process: anyio.abc.Process, due: Callable[[], Awaitable[bool]],
                    poll_s: float = 0.005) -> int:
    """SIGKILL the child once `due()` says so; its exit code (-SIGKILL when the kill landed)."""
    try:
        while process.returncode is None:
            if await due():
                with contextlib.suppress(ProcessLookupError):  # it may have just exited
                    os.kill(process.pid, signal.SIGKILL)
                break
            await anyio.sleep(poll_s)
        return await process.wait()
    finally:
        await process.aclose()


async def finish(process: anyio.abc.Process, timeout_s: float) -> int:
    """Wait for a life to end by itself; its exit code."""
    try:
        with anyio.fail_after(timeout_s):
            return await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


def tail(log_path: Path, lines: int = 40) -> str:
    """The end of the child's log, for assertion messages."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def count_archived(data_dir: Path) -> int:
    """How many inputs lie in archive/ now (the child's progress, as the parent sees it)."""
    archive = data_dir / WORKFLOW / "archive"
    if not archive.is_dir():
        return 0
    return sum(len(os.listdir(day)) for day in archive.iterdir() if day.is_dir())


# -- the audit ---------------------------------------------------------------------------


class Audit:
    """Everything the finished run left: the log, its replay, the read model, the folders."""

    def __init__(self, data_dir: Path, events: list[StoredEvent], rows: list[chain.ChainRow],
                 read_model: dict[str, Job | None]) -> None:
        self.data_dir = data_dir
        self.db = data_dir / "multiflow.db"
        self.events = events
        self.chain_rows = rows
        self.replayed = replay(events)
        self.read_model = read_model
        self.by_job: dict[str, list[Event]] = {}
        for stored in events:
            self.by_job.setdefault(stored.job_id, []).append(stored.event)
        self.by_name: dict[str, list[Job]] = {}
        for job in self.replayed.values():
            self.by_name.setdefault(Path(job.file_path).name, []).append(job)

    @classmethod
    async def load(cls, data_dir: Path) -> Audit:
        """Open the store read-only (no writer, no lock) and read all of it."""
        store = await SqliteEventStore.open(data_dir / "multiflow.db", readonly=True)
        try:
            events: list[StoredEvent] = []
            while page := await store.read_all(events[-1].seq if events else 0, READ_PAGE):
                events += page
            rows = await store.read_chain(0, 10**9)
            read_model = {job_id: await store.get_job(job_id)
                          for job_id in {e.job_id for e in events}}
        finally:
            await store.close()
        return cls(data_dir, events, rows, read_model)

    def types_of(self, job_id: str) -> Counter[str]:
        """How many events of each type the job has."""
        return Counter(type(event).__name__ for event in self.by_job.get(job_id, []))

    def job_of(self, name: str) -> Job:
        """The one job created for the input named `name`."""
        jobs = self.by_name.get(name, [])
        assert len(jobs) == 1, f"{name} has {len(jobs)} jobs"
        return jobs[0]

    def failures(self, error_type: str) -> int:
        """How many JobFailed events of this type the log holds."""
        return sum(1 for e in self.events
                   if isinstance(e.event, JobFailed) and e.event.error_type == error_type)

    def stage_files(self, stage: str) -> list[Path]:
        """Every file under one stage folder of the workflow (hidden ones too)."""
        root = self.data_dir / WORKFLOW / stage
        return sorted(Path(d) / f for d, _, names in os.walk(root) for f in names)

    def leftover_temporaries(self) -> list[Path]:
        """Temporary files anywhere under the data dir."""
        return sorted(Path(d) / f for d, _, names in os.walk(self.data_dir)
                      for f in names if f.endswith(TEMP_SUFFIX))


def integrity_check(db: Path) -> list[str]:
    """`PRAGMA integrity_check` on the log file."""
    conn = sqlite3.connect(db)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def assert_log_sound(audit: Audit) -> None:
    """The chain verifies over the whole log, the file is intact, the read model is the replay."""
    report = chain.verify(audit.chain_rows)
    assert report.ok, f"chain broken at seq {report.first_bad_seq}: {report.reason}"
    assert report.checked == len(audit.events)
    assert [e.seq for e in audit.events] == list(range(1, len(audit.events) + 1)), "seq gaps"
    assert integrity_check(audit.db) == ["ok"]
    differing = [job_id for job_id, job in audit.replayed.items()
                 if audit.read_model.get(job_id) != job]
    assert not differing, f"read model differs from replay for {len(differing)} jobs"


def assert_every_file_once(audit: Audit, names: list[str]) -> None:
    """One job per input file, each with exactly one JobCreated."""
    created = [e.event for e in audit.events if isinstance(e.event, JobCreated)]
    files = Counter(Path(event.file_path).name for event in created)
    assert sorted(files) == sorted(names), "jobs lost or made for unknown files"
    duplicates = {name: n for name, n in files.items() if n != 1}
    assert not duplicates, f"files with more than one job: {duplicates}"
    assert len(audit.replayed) == len(names)


def assert_attempts_consistent(audit: Audit, job: Job) -> None:
    """Every attempt of the job started once and ended once; crashes are the only failures."""
    mine = audit.by_job[job.id]
    starts = [e for e in mine if isinstance(e, JobStarted)]
    failures = [e for e in mine if isinstance(e, JobFailed)]
    completions = [e for e in mine if isinstance(e, JobCompleted)]
    assert [s.attempt for s in starts] == list(range(1, len(starts) + 1))
    assert len(starts) == len(failures) + len(completions), f"{job.id}: unended attempts"
    assert {f.error_type for f in failures} <= {"Interrupted"}, [f.message for f in failures]
    finals = [f for f in failures if f.retry_at is None]
    assert finals == (failures[-1:] if job.status is Status.FAILED else []), f"{job.id}: finals"


def assert_completed_job(audit: Audit, name: str) -> None:
    """The input's job completed once; its input is archived once and its output is whole."""
    job = audit.job_of(name)
    assert job.status is Status.COMPLETED, f"{name}: {job.status} {job.error}"
    assert audit.types_of(job.id)["JobCompleted"] == 1
    assert_attempts_consistent(audit, job)
    archived = audit.data_dir / job.current_path
    assert archived.read_bytes() == input_bytes(int(name[1:6]))
    output = audit.data_dir / WORKFLOW / "output" / crash_child.output_name(name)
    assert output.read_bytes() == output_bytes(input_bytes(int(name[1:6])))
    assert job.output_paths == (output.relative_to(audit.data_dir).as_posix(),)


def assert_folders(audit: Audit, completed: list[str], failed: list[str]) -> None:
    """input/ and processing/ are empty; each input lies once in archive/ or error/."""
    assert audit.stage_files("input") == []
    assert audit.stage_files("processing") == []
    archived = Counter(p.name.partition("--")[2] for p in audit.stage_files("archive"))
    assert archived == Counter(completed), "archive/ holds missing or duplicated inputs"
    errors = Counter(p.name.partition("--")[2] for p in audit.stage_files("error"))
    assert errors == Counter([*failed, *(f"{n}.error.json" for n in failed)])
    outputs = sorted(p.name for p in audit.stage_files("output"))
    assert outputs == sorted(crash_child.output_name(n) for n in completed)
    assert audit.leftover_temporaries() == []


def all_names(files: int) -> list[str]:
    """The names of the inputs the child seeds."""
    return [input_name(i) for i in range(files)]
