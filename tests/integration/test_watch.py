"""The hot folder on a real SQLite file, real folders and real watchfiles events.

Each test opens a Kernel on `tmp_path/data`, registers the workflow `hot`, starts
its watcher and drops files into `data/hot/input/` the way people and programs
do: written in place, renamed in, copied with their mtime, linked. Every wait is
bounded; a wait for "never" is a bounded quiet period after a sentinel file went
through, so the watcher has provably looked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

import adapters.watch
from adapters import Kernel
from adapters.watch import LATER, BaseWatcher, WatchfilesWatcher
from kernel import layout
from kernel.config import WorkflowConfig
from kernel.events import JobCreated, JobDuplicateReceived
from kernel.state import Job, Status
from kernel.task import BaseProcessor, JobContext, JobError

pytestmark = pytest.mark.anyio

WORKFLOW = "hot"
MIB = 1 << 20
WAIT_S = 10.0  # the bound of an ordinary wait: a file picked up, a job finished
POLL_S = 0.02


# -- processors ----------------------------------------------------------------------------


class Noop(BaseProcessor):
    """Does nothing, on the event loop."""

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return {}


class Digest(BaseProcessor):
    """Reads the whole input in a worker thread; its size and sha256 are the result."""

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        data = ctx.input_path.read_bytes()
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Gate(BaseProcessor):
    """Holds every job until `release` is set, so the jobs behind it stay pending."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.started.set()
        await self.release.wait()
        return {}


# -- watchers ------------------------------------------------------------------------------


class FailsOnce(WatchfilesWatcher):
    """watchfiles notifications, except that the first `follow` raises."""

    failed = False

    async def follow(self) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the notification source broke")
        await super().follow()


class AlwaysFails(BaseWatcher):
    """A notification source that breaks every time; it notes when each attempt began."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[float] = []

    async def follow(self) -> None:
        self.calls.append(anyio.current_time())
        raise RuntimeError("the notification source is down")


class Deaf(BaseWatcher):
    """A notification source that never notices anything: only the scans find files."""

    async def follow(self) -> None:
        await anyio.sleep_forever()


# -- the running hot folder ----------------------------------------------------------------


class HotFolder:
    """A running kernel with the workflow `hot` and its watcher, and ways to look at both."""

    def __init__(self, kernel: Kernel, watcher: BaseWatcher, data_dir: Path) -> None:
        self.kernel = kernel
        self.watcher = watcher
        self.data_dir = data_dir
        self.root = data_dir / WORKFLOW
        self.inbox = self.root / "input"

    def drop(self, name: str, data: bytes = b"hello\n") -> Path:
        """Write a file into input/ in place, in one go."""
        path = self.inbox / name
        path.write_bytes(data)
        return path

    def rename_in(self, name: str, data: bytes = b"hello\n") -> Path:
        """Write a file outside input/ (same filesystem), then rename it in: atomic."""
        staging = self.data_dir.parent / "staging"
        staging.mkdir(exist_ok=True)
        (staging / name).write_bytes(data)
        os.rename(staging / name, self.inbox / name)
        return self.inbox / name

    async def created(self) -> list[JobCreated]:
        """Every JobCreated of the log, in order."""
        found: list[JobCreated] = []
        after = 0
        while page := await self.kernel.events(after, 5000):
            found += [e.event for e in page if isinstance(e.event, JobCreated)]
            after = page[-1].seq
        return found

    async def created_for(self, name: str) -> list[JobCreated]:
        """The JobCreated events of files dropped as `name`."""
        path = f"{WORKFLOW}/input/{name}"
        return [event for event in await self.created() if event.file_path == path]

    async def job_of(self, name: str, timeout_s: float = WAIT_S) -> Job:
        """Wait until `name` has a job; the only one."""
        await eventually(lambda: self._has_job(name), timeout_s, f"a job for {name!r}")
        (event,) = await self.created_for(name)
        job = await self.kernel.get_job(event.job_id)
        assert job is not None
        return job

    async def finished(self, name: str, timeout_s: float = WAIT_S) -> Job:
        """Wait until the one job of `name` has finished and its file is settled."""
        job = await self.job_of(name, timeout_s)
        return await self.kernel.wait(job.id, timeout_s=timeout_s)

    async def count(self, status: Status) -> int:
        """How many of the workflow's jobs have this status."""
        return (await self.kernel.store.count_jobs()).get((WORKFLOW, str(status)), 0)

    async def _has_job(self, name: str) -> bool:
        return bool(await self.created_for(name))

    def files(self, stage: str) -> list[Path]:
        """Every file under one stage folder (subfolders too), sorted."""
        base = self.root / stage
        return sorted(Path(d) / f for d, _, names in os.walk(base) for f in names)


@contextlib.asynccontextmanager
async def hot_folder(
    tmp_path: Path,
    processor: BaseProcessor | None = None,
    *,
    watcher: type[BaseWatcher] | None = None,
    **config: Any,
) -> AsyncIterator[HotFolder]:
    """Open a kernel on tmp_path/data with the workflow `hot` and start its watcher."""
    data_dir = tmp_path / "data"
    async with Kernel.open(data_dir=data_dir, drain_grace_s=5.0) as kernel:
        kernel.register_workflow(WORKFLOW, processor or Noop(), config=WorkflowConfig(**config),
                                 watcher=watcher)
        with anyio.fail_after(WAIT_S):
            watchers = await kernel.start_watchers()
        hot = HotFolder(kernel, watchers[WORKFLOW], data_dir)
        try:
            yield hot
        finally:
            wake_watchfiles(hot.inbox)


def wake_watchfiles(inbox: Path) -> None:
    """Make a change in input/ so that a blocked watchfiles call returns and the kernel can
    close at once instead of after watchfiles' 5 s timeout (a bug: see
    test_closing_the_kernel_does_not_wait_for_the_watchfiles_timeout)."""
    nudge = inbox / ".closing"
    nudge.write_bytes(b"")
    nudge.unlink()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout_s`."""
    try:
        with anyio.fail_after(timeout_s):
            while not await check():  # noqa: ASYNC110 (polling the log and the folders)
                await anyio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


# -- completeness --------------------------------------------------------------------------


def write_slowly(path: Path, size_bytes: int, rng: random.Random) -> datetime:
    """Write `size_bytes` in place in 128 KiB chunks over ~2 s; when the last byte was written."""
    chunk = 128 * 1024
    block = bytes(range(256)) * (chunk // 256)
    with open(path, "wb") as handle:
        for index in range(size_bytes // chunk):
            handle.write(block[index % 256:] + block[:index % 256])
            handle.flush()
            # Pauses well under settle_ms (500 ms), a few of them long.
            time.sleep(0.2 if rng.random() < 0.1 else 0.04)
    return datetime.now(UTC)


def slow_content(size_bytes: int) -> bytes:
    """What `write_slowly` writes."""
    chunk = 128 * 1024
    block = bytes(range(256)) * (chunk // 256)
    return b"".join(block[i % 256:] + block[:i % 256] for i in range(size_bytes // chunk))


async def test_a_slow_writer_gets_its_job_only_after_the_last_byte(tmp_path: Path) -> None:
    """A 5 MB file written in place over ~2 s becomes a job only after its last byte, whole."""
    size_bytes = 5 * MIB
    async with hot_folder(tmp_path, Digest()) as hot:
        path = hot.inbox / "big.bin"
        written_at = await anyio.to_thread.run_sync(write_slowly, path, size_bytes,
                                                    random.Random(7))
        job = await hot.finished("big.bin")
    assert job.created_at >= written_at, "the job was created before the writer finished"
    assert job.completeness == "stable:500ms"
    assert job.status is Status.COMPLETED
    assert job.result == {"bytes": size_bytes,
                          "sha256": hashlib.sha256(slow_content(size_bytes)).hexdigest()}


async def test_a_file_renamed_in_is_complete_at_once(tmp_path: Path) -> None:
    """With settle_ms=0, files renamed in (from outside input/ or from a .part name) become
    jobs, and JobCreated says how they were judged complete."""
    async with hot_folder(tmp_path, Digest(), settle_ms=0) as hot:
        hot.rename_in("outside.csv", b"a,b\n1,2\n")
        (hot.inbox / "download.csv.part").write_bytes(b"c,d\n3,4\n")
        await anyio.sleep(0.3)  # the .part name alone must not become a job
        assert await hot.created_for("download.csv.part") == []
        os.rename(hot.inbox / "download.csv.part", hot.inbox / "download.csv")
        first = await hot.finished("outside.csv")
        second = await hot.finished("download.csv")
        created = await hot.created()
    assert sorted(e.file_path for e in created) == ["hot/input/download.csv",
                                                    "hot/input/outside.csv"]
    assert {e.completeness for e in created} == {"stable:0ms"}
    assert first.result == {"bytes": 8, "sha256": hashlib.sha256(b"a,b\n1,2\n").hexdigest()}
    assert second.result == {"bytes": 8, "sha256": hashlib.sha256(b"c,d\n3,4\n").hexdigest()}


async def test_a_burst_of_1000_renamed_files_makes_exactly_1000_jobs(tmp_path: Path) -> None:
    """1,000 files renamed into input/ at once become exactly 1,000 jobs, all completed."""
    count = 1000
    names = [f"burst-{index:04d}.txt" for index in range(count)]
    async with hot_folder(tmp_path, Noop(), settle_ms=0) as hot:
        staging = tmp_path / "staging"
        staging.mkdir()
        for name in names:
            (staging / name).write_bytes(name.encode())

        def rename_all() -> None:
            for name in names:
                os.rename(staging / name, hot.inbox / name)

        await anyio.to_thread.run_sync(rename_all)

        async def all_completed() -> bool:
            return await hot.count(Status.COMPLETED) >= count

        await eventually(all_completed, 40.0, "1,000 completed jobs")
        await anyio.sleep(0.3)  # a straggler JobCreated would show now
        created = await hot.created()
        completed = await hot.count(Status.COMPLETED)
        archived = hot.files("archive")
    assert len(created) == count
    assert sorted(e.file_path for e in created) == [f"hot/input/{n}" for n in names]
    assert completed == count
    assert sorted(p.name.partition("--")[2] for p in archived) == names
    assert hot.files("input") == []


async def test_files_already_in_input_at_start_become_jobs(tmp_path: Path) -> None:
    """Files that lay in input/ before the watcher started are found by its first scan."""
    inbox = tmp_path / "data" / WORKFLOW / "input"
    inbox.mkdir(parents=True)
    for name in ("early-1.txt", "early-2.txt", ".early-hidden"):
        (inbox / name).write_bytes(name.encode())
    async with hot_folder(tmp_path, Digest(), settle_ms=50) as hot:
        first = await hot.finished("early-1.txt")
        second = await hot.finished("early-2.txt")
        created = await hot.created()
    assert first.status is second.status is Status.COMPLETED
    assert sorted(e.file_path for e in created) == ["hot/input/early-1.txt",
                                                    "hot/input/early-2.txt"]
    assert first.result is not None and first.result["bytes"] == len(b"early-1.txt")


async def test_unicode_and_spaces_in_names_survive_the_whole_lifecycle(tmp_path: Path) -> None:
    """Names with accents, spaces, parentheses and CJK characters keep their bytes throughout."""
    names = ["résumé 2026 (final).csv", "文件.txt"]
    async with hot_folder(tmp_path, Digest(), settle_ms=50) as hot:
        for name in names:
            hot.drop(name, name.encode())
        jobs = [await hot.finished(name) for name in names]
    for name, job in zip(names, jobs, strict=True):
        assert job.status is Status.COMPLETED, job.error
        assert job.file_path == f"hot/input/{name}"
        assert job.current_path.endswith(f"/{job.id}--{name}")
        assert (hot.data_dir / job.current_path).read_bytes() == name.encode()
        assert job.result == {"bytes": len(name.encode()),
                              "sha256": hashlib.sha256(name.encode()).hexdigest()}
    assert hot.files("input") == []


# -- once, and only once -------------------------------------------------------------------


async def test_a_name_dropped_again_after_archiving_makes_a_second_job(tmp_path: Path) -> None:
    """The same name dropped after its first job finished is new work: a second job."""
    async with hot_folder(tmp_path, Digest(), settle_ms=50) as hot:
        hot.drop("same.txt", b"first")
        first = await hot.finished("same.txt")
        hot.drop("same.txt", b"second")

        async def two_jobs() -> bool:
            return len(await hot.created_for("same.txt")) == 2

        await eventually(two_jobs, WAIT_S, "a second job for same.txt")
        created = await hot.created_for("same.txt")
        second = await hot.kernel.wait(created[1].job_id, timeout_s=WAIT_S)
    assert first.id != second.id
    assert first.status is second.status is Status.COMPLETED
    assert (hot.data_dir / first.current_path).read_bytes() == b"first"
    assert (hot.data_dir / second.current_path).read_bytes() == b"second"


async def test_a_name_dropped_again_while_its_job_is_pending_makes_no_second_job(
    tmp_path: Path,
) -> None:
    """Replacing a file whose job is still pending does not make a second job."""
    gate = Gate()
    async with hot_folder(tmp_path, gate, settle_ms=50) as hot:
        hot.drop("blocker.txt")
        with anyio.fail_after(WAIT_S):
            await gate.started.wait()  # the only slot is taken: the next jobs stay pending
        hot.drop("pending.txt", b"v1")
        job = await hot.job_of("pending.txt")
        assert job.status is Status.PENDING
        hot.rename_in("pending.txt", b"v2")  # dropped again, over the first
        await anyio.sleep(0.3)
        hot.drop("sentinel.txt")
        await hot.job_of("sentinel.txt")  # the watcher has looked at pending.txt again
        await anyio.sleep(0.2)
        again = await hot.created_for("pending.txt")
        gate.release.set()
        done = await hot.kernel.wait(job.id, timeout_s=WAIT_S)
    assert [e.job_id for e in again] == [job.id]
    assert done.status is Status.COMPLETED


async def test_a_name_copied_again_with_the_same_mtime_makes_a_second_job(tmp_path: Path) -> None:
    """A file copied in twice with its mtime preserved (cp -p) is two drops and two jobs."""
    source = tmp_path / "report.csv"
    source.write_bytes(b"the same bytes\n")
    os.utime(source, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    async with hot_folder(tmp_path, Noop(), settle_ms=50) as hot:
        shutil.copy2(source, hot.inbox / "report.csv")
        await hot.finished("report.csv")
        shutil.copy2(source, hot.inbox / "report.csv")  # a day later, the same export again

        async def two_jobs() -> bool:
            return len(await hot.created_for("report.csv")) == 2

        await eventually(two_jobs, 2.0, "a second job for report.csv")


# -- markers, ignored names, globs ---------------------------------------------------------


async def test_marker_mode_waits_for_the_done_file_and_removes_it(tmp_path: Path) -> None:
    """In marker mode `x` alone waits; `x.done` makes the job (completeness "marker") and goes."""
    async with hot_folder(tmp_path, Digest(), marker=True) as hot:
        hot.drop("scan.csv", b"a,b\n1,2\n")
        await anyio.sleep(1.5)  # more than a settle time and a check cycle
        assert await hot.created() == []
        (hot.inbox / "scan.csv.done").write_bytes(b"")
        job = await hot.job_of("scan.csv")
        await eventually(lambda: _gone(hot.inbox / "scan.csv.done"), WAIT_S, "the marker removed")
        done = await hot.kernel.wait(job.id, timeout_s=WAIT_S)
        created = await hot.created()
    assert job.completeness == "marker"
    assert [e.file_path for e in created] == ["hot/input/scan.csv"]
    assert done.status is Status.COMPLETED
    assert hot.files("input") == []


async def _gone(path: Path) -> bool:
    return not await anyio.Path(path).exists()


async def test_temporary_and_hidden_names_never_become_jobs(tmp_path: Path) -> None:
    """Dot files, *.tmp, *.part and *.crdownload stay in input/ and never become jobs."""
    ignored = [".hidden", "a.tmp", "b.part", "c.crdownload"]
    async with hot_folder(tmp_path, Noop(), settle_ms=0, rescan_interval_s=0.2) as hot:
        for name in ignored:
            hot.drop(name)
        hot.drop("sentinel.txt")
        await hot.finished("sentinel.txt")
        await anyio.sleep(0.6)  # and a few rescans
        created = await hot.created()
    assert [e.file_path for e in created] == ["hot/input/sentinel.txt"]
    assert sorted(p.name for p in hot.files("input")) == sorted(ignored)


async def test_include_and_exclude_globs_choose_the_files(tmp_path: Path) -> None:
    """Only names matching an include glob and no exclude glob become jobs."""
    config = {"include": ("*.csv", "*.txt"), "exclude": ("draft-*",)}
    async with hot_folder(tmp_path, Noop(), settle_ms=0, rescan_interval_s=0.2,
                          **config) as hot:
        for name in ("data.csv", "notes.txt", "image.png", "draft-plan.txt", "README"):
            hot.drop(name)
        await hot.finished("data.csv")
        await hot.finished("notes.txt")
        await anyio.sleep(0.6)
        created = await hot.created()
    assert sorted(e.file_path for e in created) == ["hot/input/data.csv", "hot/input/notes.txt"]
    assert sorted(p.name for p in hot.files("input")) == ["README", "draft-plan.txt",
                                                          "image.png"]


# -- dedupe --------------------------------------------------------------------------------


async def test_an_identical_file_under_another_name_is_kept_as_a_duplicate(
    tmp_path: Path,
) -> None:
    """With dedupe, the same bytes dropped under another name go to archive/duplicates/ and are
    recorded against the first job, not processed again."""
    content = b"invoice 42: 1,000 EUR\n"
    async with hot_folder(tmp_path, Digest(), settle_ms=50, dedupe=True) as hot:
        hot.drop("invoice.txt", content)
        first = await hot.finished("invoice.txt")
        hot.drop("invoice (copy).txt", content)

        async def recorded() -> bool:
            job = await hot.kernel.get_job(first.id)
            return job is not None and job.duplicates == 1

        await eventually(recorded, WAIT_S, "the duplicate recorded")
        job = await hot.kernel.get_job(first.id)
        events = [stored.event for stored in await hot.kernel.job_events(first.id)]
        created = await hot.created()
    assert job is not None and job.status is Status.COMPLETED and job.duplicates == 1
    assert [e.file_path for e in created] == ["hot/input/invoice.txt"]
    assert created[0].idempotency_key == "sha256:" + hashlib.sha256(content).hexdigest()
    (duplicate,) = [e for e in events if isinstance(e, JobDuplicateReceived)]
    assert duplicate.file_path == "hot/input/invoice (copy).txt"
    assert duplicate.sha256 == hashlib.sha256(content).hexdigest()
    assert duplicate.stored_path.startswith(f"hot/archive/duplicates/{first.id}--")
    assert duplicate.stored_path.endswith("--invoice (copy).txt")
    assert (hot.data_dir / duplicate.stored_path).read_bytes() == content
    assert hot.files("input") == []


# -- polling, symlinks ---------------------------------------------------------------------


async def test_polling_mode_picks_files_up(tmp_path: Path) -> None:
    """watch_mode="poll" (for shares without inotify) finds new files between full rescans."""
    async with hot_folder(tmp_path, Digest(), settle_ms=50, watch_mode="poll",
                          poll_interval_s=0.1, rescan_interval_s=60.0) as hot:
        hot.drop("polled.txt", b"found by polling\n")
        job = await hot.finished("polled.txt", timeout_s=5.0)
    assert job.status is Status.COMPLETED
    assert job.result is not None and job.result["bytes"] == len(b"found by polling\n")


async def test_a_symlink_leading_outside_the_data_root_is_refused(tmp_path: Path) -> None:
    """A symlink in input/ to a file outside the data root makes no job: the link goes to
    error/ with an .error.json saying why, and its target is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(b"not for you\n")
    before = secret.stat()
    async with hot_folder(tmp_path, Digest(), settle_ms=50) as hot:
        os.symlink(secret, hot.inbox / "link.txt")

        async def rejected() -> bool:
            return any(p.name.endswith("--link.txt.error.json") for p in hot.files("error"))

        await eventually(rejected, WAIT_S, "the link moved to error/")
        hot.drop("sentinel.txt")
        await hot.finished("sentinel.txt")
        created = await hot.created()
    link, report_path = hot.files("error")
    assert link.name.startswith("rejected-") and link.name.endswith("--link.txt")
    assert link.is_symlink() and os.readlink(link) == str(secret)
    assert report_path.name == link.name + ".error.json"
    report = json.loads(report_path.read_text())
    assert report["file_path"] == "hot/input/link.txt"
    assert report["status"] == "rejected" and report["error_type"] == "Rejected"
    assert "outside" in report["message"]
    assert [e.file_path for e in created] == ["hot/input/sentinel.txt"]
    after = secret.stat()
    assert secret.read_bytes() == b"not for you\n"
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)


async def test_a_dangling_symlink_does_not_crash_the_watcher(tmp_path: Path) -> None:
    """A symlink in input/ whose target does not exist is handled without a watcher restart."""
    async with hot_folder(tmp_path, Noop(), settle_ms=0) as hot:
        with structlog.testing.capture_logs() as logs:
            os.symlink("not-there-yet.txt", hot.inbox / "dangling.txt")
            await anyio.sleep(0.3)
            hot.drop("sentinel.txt")
            await hot.finished("sentinel.txt", timeout_s=3.0)
            await anyio.sleep(0.5)
        failures = [e for e in logs if e["event"] == "watcher_failed"]
        assert (hot.watcher.restarts, failures) == (0, [])


async def test_a_name_that_is_not_utf8_is_refused_and_the_rest_of_the_burst_flows(
    tmp_path: Path,
) -> None:
    """A file whose name is not valid UTF-8 goes to error/, and the 20 good files beside it
    still become jobs and complete; the watcher does not restart."""
    inbox = tmp_path / "data" / WORKFLOW / "input"
    inbox.mkdir(parents=True)
    good = [f"good-{index:02d}.txt" for index in range(20)]
    for name in good:
        (inbox / name).write_bytes(name.encode())
    raw = os.fsencode(inbox) + b"/caf\xe9.txt"
    write_raw(raw, b"a latin-1 name\n")
    with structlog.testing.capture_logs():
        async with hot_folder(tmp_path, Noop(), settle_ms=0) as hot:

            async def all_completed() -> bool:
                return await hot.count(Status.COMPLETED) >= len(good)

            async def left_input() -> bool:
                return not lexists(raw)

            await eventually(all_completed, 4.0, "the 20 good files completed")
            await eventually(left_input, 2.0, "the bad name moved out of input/")
            assert hot.watcher.restarts == 0
            assert sorted(e.file_path for e in await hot.created()) == \
                [f"hot/input/{name}" for name in good]
    assert any(p.name.endswith(".error.json") for p in hot.files("error"))


def write_raw(path: bytes, data: bytes) -> None:
    """Write a file whose name is given as raw bytes."""
    with open(path, "wb") as handle:
        handle.write(data)


def lexists(path: bytes) -> bool:
    """Whether a name exists (a symlink counts, even a dangling one)."""
    return os.path.lexists(path)


async def test_with_dedupe_a_symlink_to_a_fifo_does_not_block_the_watcher(
    tmp_path: Path,
) -> None:
    """With dedupe, a symlink to a FIFO outside the root is refused and later files still flow."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    async with hot_folder(tmp_path, Noop(), settle_ms=0, dedupe=True) as hot:
        os.symlink(fifo, hot.inbox / "pipe.txt")
        try:
            await anyio.sleep(0.3)
            hot.drop("sentinel.txt")
            await hot.finished("sentinel.txt", timeout_s=2.0)
        finally:
            await anyio.to_thread.run_sync(unblock_reader, fifo)


def unblock_reader(fifo: Path) -> None:
    """Give a reader blocked on the FIFO its end of file, so the kernel can shut down."""
    for _ in range(50):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader (yet, or at all)
                raise
            time.sleep(0.02)


# -- restarts, heartbeat, rescans ----------------------------------------------------------


async def test_a_watcher_whose_follow_fails_once_is_restarted_and_keeps_working(
    tmp_path: Path,
) -> None:
    """A notification source that raises once is restarted (restarts == 1) and files still
    become jobs; the heartbeat stays fresh while it runs."""
    with structlog.testing.capture_logs() as logs:
        async with hot_folder(tmp_path, Noop(), settle_ms=0, watcher=FailsOnce) as hot:

            async def restarted() -> bool:
                return hot.watcher.restarts == 1

            await eventually(restarted, WAIT_S, "one restart")
            await anyio.sleep(0.7)  # past the restart backoff (0.5 s)
            hot.drop("after-restart.txt")
            job = await hot.finished("after-restart.txt")
            ages = []
            for _ in range(15):
                ages.append(hot.watcher.heartbeat_age_s())
                await anyio.sleep(0.1)
            restarts = hot.watcher.restarts
    assert job.status is Status.COMPLETED
    assert restarts == 1
    assert max(ages) < 1.5, ages
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["watcher_failed"]


async def test_a_watcher_that_keeps_failing_backs_off(tmp_path: Path) -> None:
    """Each restart of a watcher that keeps failing waits longer than the one before."""
    with structlog.testing.capture_logs():
        async with hot_folder(tmp_path, Noop(), watcher=AlwaysFails) as hot:
            watcher = hot.watcher
            assert isinstance(watcher, AlwaysFails)

            async def three_attempts() -> bool:
                return len(watcher.calls) >= 3

            await eventually(three_attempts, 6.0, "three attempts")
            calls = list(watcher.calls)
    first_gap_s, second_gap_s = calls[1] - calls[0], calls[2] - calls[1]
    assert second_gap_s - first_gap_s >= 0.25, (first_gap_s, second_gap_s)


async def test_the_periodic_rescan_catches_missed_notifications(tmp_path: Path) -> None:
    """With a notification source that misses everything, the rescan still finds new files."""
    async with hot_folder(tmp_path, Digest(), watcher=Deaf, settle_ms=0,
                          rescan_interval_s=0.2) as hot:
        hot.drop("missed.txt", b"nobody told the watcher\n")
        job = await hot.finished("missed.txt", timeout_s=5.0)
        hot.drop("missed-too.txt", b"nor this\n")
        again = await hot.finished("missed-too.txt", timeout_s=5.0)
    assert job.status is again.status is Status.COMPLETED
    assert job.completeness == "stable:0ms"


async def test_closing_the_kernel_does_not_wait_for_the_watchfiles_timeout(
    tmp_path: Path,
) -> None:
    """A kernel whose watcher is idle closes in well under a second."""
    data_dir = tmp_path / "data"
    async with Kernel.open(data_dir=data_dir, drain_grace_s=1.0) as kernel:
        kernel.register_workflow(WORKFLOW, Noop(), config=WorkflowConfig(settle_ms=0))
        with anyio.fail_after(WAIT_S):
            await kernel.start_watchers()
        await anyio.sleep(0.2)  # idle: watchfiles waits in its worker thread
        closing_at = anyio.current_time()
    closed_in_s = anyio.current_time() - closing_at
    assert closed_in_s < 1.0, f"closing took {closed_in_s:.1f}s"


# Vietnamese words with diacritics (1-3 UTF-8 bytes a character) up to 240 bytes, + ".txt":
# a legal name on ext4/xfs (NAME_MAX 255) that an operator can create and drop.
LONG_NAME = ("báo cáo tài chính quý ba năm hai nghìn hai mươi lăm " * 10).encode()[:236] \
    .decode("utf-8", "ignore") + ".txt"


async def test_a_name_near_the_filesystems_limit_goes_through_and_the_server_starts_again(
        tmp_path: Path) -> None:
    """The job's `{job_id}--name` (and `.error.json` beside it) would pass 255 bytes: the
    name is shortened on disk (the log keeps it whole), the job completes, and the next
    start finds nothing to redo (every attempt failed with ENAMETOOLONG, the file stuck in
    input/, and the next start failed on it)."""
    assert 230 < len(LONG_NAME.encode()) <= 255
    async with hot_folder(tmp_path, Digest(), settle_ms=50, max_attempts=1) as hot:
        hot.drop(LONG_NAME, b"quarterly numbers\n")
        job = await hot.kernel.wait((await hot.job_of(LONG_NAME)).id, timeout_s=WAIT_S)
        assert job.status is Status.COMPLETED, job.error
        assert job.file_path.endswith(LONG_NAME)
        assert (hot.data_dir / job.current_path).read_bytes() == b"quarterly numbers\n"
    async with hot_folder(tmp_path, Digest(), settle_ms=50, max_attempts=1) as hot:
        await anyio.sleep(0.5)
        assert len(await hot.created_for(LONG_NAME)) == 1
        assert hot.files("input") == []


class RefusesV1(BaseProcessor):
    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        if ctx.input_path.read_bytes() == b"v1 broken\n":
            raise JobError("BadInput", "v1 is broken", retryable=False)
        return {"ok": True}


async def test_a_fixed_file_dropped_while_the_server_was_down_becomes_a_job(
    tmp_path: Path,
) -> None:
    """orders.csv failed last week; the operator read error/, deleted the file and its
    .error.json, stopped the server for a deploy, and dropped the fixed orders.csv.
    At start the new file becomes a job (it was filed in error/ under the old job, whose
    file it took for one a crash had left in input/)."""
    async with hot_folder(tmp_path, RefusesV1(), settle_ms=50) as hot:
        hot.drop("orders.csv", b"v1 broken\n")
        old = await hot.finished("orders.csv")
        assert old.status is Status.FAILED
        for path in hot.files("error"):  # handled: the operator cleans error/ up
            path.unlink()
    inbox = tmp_path / "data" / "hot" / "input"
    (inbox / "orders.csv").write_bytes(b"v2 fixed\n")  # dropped while the server is down
    async with hot_folder(tmp_path, RefusesV1(), settle_ms=50) as hot:
        await anyio.sleep(1.5)
        created = await hot.created_for("orders.csv")
        where = {p.relative_to(hot.root).as_posix(): p.read_bytes() for p in hot.files("error")
                 if not p.name.endswith(".json")}
    assert len(created) == 2, (
        f"the fixed file got no job; {len(created)} job(s) for orders.csv; it now lies in "
        f"error/ as {where}")


async def test_a_file_that_cannot_be_hashed_or_submitted_does_not_stop_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With dedupe on, a file the server may not read (an SFTP user's 0600 upload) and a
    submit that fails for one file (a bug, a store error) are that file's own trouble:
    the watcher keeps running and the other files become jobs (a PermissionError while
    hashing used to end the watcher, and every restart died on it again)."""
    hashed = adapters.watch.sha256_of

    def sha256_of(path: Path) -> str:
        if path.name == "private.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return hashed(path)

    monkeypatch.setattr(adapters.watch, "sha256_of", sha256_of)
    async with hot_folder(tmp_path, Noop(), settle_ms=50, dedupe=True) as hot:
        real_submit = hot.watcher.submit

        async def submit(name: str, completeness: str, key: str | None) -> str | None:
            if name == "broken.csv":
                raise RuntimeError("a submit that fails for this file only")
            return await real_submit(name, completeness, key)

        hot.watcher.submit = submit  # type: ignore[method-assign]
        for index in range(10):
            hot.drop(f"good-{index:02d}.csv", f"{index}\n".encode())
        hot.drop("private.csv", b"secret\n")
        hot.drop("broken.csv", b"x\n")
        for index in range(10):
            await hot.job_of(f"good-{index:02d}.csv")
        private = await hot.job_of("private.csv")  # submitted without a key
        assert private.idempotency_key is None
        assert hot.watcher.restarts == 0
        assert (hot.inbox / "broken.csv").exists()  # left for the next scan


class Reading(Gate):
    """A Gate that keeps the bytes of each input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[bytes] = []

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.inputs.append(ctx.input_path.read_bytes())
        return await super().process(ctx, task)


@pytest.mark.parametrize("mode", ["settle", "marker"])
async def test_a_file_dropped_while_its_names_job_runs_becomes_the_next_job(
        tmp_path: Path, mode: str) -> None:
    """export.csv lands again while the previous export.csv's job runs (its file in
    processing/): the new file waits, marker and all, and becomes a job of its own as
    soon as that job ends (it was taken for the running job's file: never a job in
    marker mode, not before a restart otherwise)."""
    gate = Reading()
    marker = mode == "marker"
    async with hot_folder(tmp_path, gate, settle_ms=50, marker=marker) as hot:
        hot.drop("export.csv", b"monday\n")
        if marker:
            hot.drop("export.csv.done", b"")
        first = await hot.job_of("export.csv")
        with anyio.fail_after(WAIT_S):
            await gate.started.wait()
        hot.rename_in("export.csv", b"tuesday\n")
        if marker:
            hot.drop("export.csv.done", b"")
        await anyio.sleep(0.5)  # seen, and told to wait
        assert len(await hot.created_for("export.csv")) == 1
        assert not marker or (hot.inbox / "export.csv.done").exists()
        gate.release.set()
        await hot.kernel.wait(first.id, timeout_s=WAIT_S)

        async def two_jobs() -> bool:
            return len(await hot.created_for("export.csv")) == 2

        await eventually(two_jobs, WAIT_S, "a job for the second export.csv")
        second = [j for j in await hot.kernel.store.active_jobs("hot") if j.id != first.id]
        if second:
            await hot.kernel.wait(second[0].id, timeout_s=WAIT_S)
    assert gate.inputs == [b"monday\n", b"tuesday\n"]


async def test_a_marker_whose_file_was_rejected_does_not_vouch_for_the_next_file(
        tmp_path: Path) -> None:
    """scan.csv arrives as a link out of the data root, with its marker, and is refused
    to error/: its marker goes too. The real scan.csv, being written later with no new
    marker, is not complete and not yet a job (the old marker vouched for it)."""
    outside = tmp_path / "outside.csv"
    outside.write_bytes(b"elsewhere\n")
    async with hot_folder(tmp_path, Digest(), marker=True) as hot:
        os.symlink(outside, hot.inbox / "scan.csv")
        (hot.inbox / "scan.csv.done").write_bytes(b"")

        async def rejected() -> bool:
            return any(p.name.endswith("--scan.csv") for p in hot.files("error"))

        await eventually(rejected, WAIT_S, "the link rejected")
        await anyio.sleep(0.3)
        assert not (hot.inbox / "scan.csv.done").exists()
        with open(hot.inbox / "scan.csv", "wb") as handle:  # the real file, half written
            handle.write(b"a,b\n" * 100)
            handle.flush()
            await anyio.sleep(1.5)  # its writer has not written the marker yet
            assert await hot.created_for("scan.csv") == []


class GateThenRead(Gate):
    """Holds the job of `blocker.txt` until released; records each input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.seen[ctx.input_path.name.partition("--")[2]] = ctx.input_path.stat().st_size
        if ctx.input_path.name.endswith("blocker.txt"):
            return await super().process(ctx, task)
        return {}


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
async def test_a_file_changed_after_intake_unseen_is_not_processed_unchecked(
        tmp_path: Path, how: str) -> None:
    """Intake passed a 9-byte data.txt (submitted through the API: no watcher looks at it
    again); while its job waits for the slot, the file is replaced by one past the size
    limit, or written to by a writer not done yet. Those bytes never went through intake:
    the job fails as FileChanged (not retried) and the file goes to error/ with its
    report; the processor never sees it (it processed the unchecked bytes)."""
    gate = GateThenRead()
    config = WorkflowConfig(settle_ms=50, max_size_bytes=100)
    async with Kernel.open(data_dir=tmp_path / "data") as kernel:
        kernel.register_workflow(WORKFLOW, gate, config=config)
        await kernel.ready()
        inbox = tmp_path / "data" / WORKFLOW / "input"
        (inbox / "blocker.txt").write_bytes(b"hello\n")
        await kernel.submit(WORKFLOW, "blocker.txt")
        with anyio.fail_after(WAIT_S):
            await gate.started.wait()
        (inbox / "data.txt").write_bytes(b"small v1\n")
        job = await kernel.submit(WORKFLOW, "data.txt")
        await anyio.sleep(0.3)  # intake has passed it; it waits for the slot
        if how == "replaced":
            (inbox / ".data.txt").write_bytes(b"x" * 5000)
            os.rename(inbox / ".data.txt", inbox / "data.txt")
        else:
            with open(inbox / "data.txt", "ab") as handle:
                handle.write(b"a" * 50)
        gate.release.set()
        done = await kernel.wait(job.id, timeout_s=WAIT_S)
        assert done.status is Status.FAILED and done.error is not None
        assert done.error.type == "FileChanged" and done.attempts == 1
        assert "data.txt" not in gate.seen
        data_dir = tmp_path / "data"
        assert (data_dir / done.current_path).is_file()
        assert (data_dir / (done.current_path + ".error.json")).is_file()


async def test_a_pending_jobs_file_dropped_again_goes_through_intake_again(
        tmp_path: Path) -> None:
    """The watcher sees data.txt dropped again while its job waits: the job goes through
    intake again for the new bytes (refused here: past the size limit), and the
    processor never sees them."""
    gate = GateThenRead()
    async with hot_folder(tmp_path, gate, settle_ms=50, max_size_bytes=100) as hot:
        hot.drop("blocker.txt")
        with anyio.fail_after(WAIT_S):
            await gate.started.wait()
        hot.drop("data.txt", b"small v1\n")
        job = await hot.job_of("data.txt")
        await anyio.sleep(0.3)  # intake has passed it; it waits for the slot
        hot.rename_in("data.txt", b"x" * 5000)
        done = await hot.kernel.wait(job.id, timeout_s=WAIT_S)  # refused while blocked
        gate.release.set()
    assert done.status is Status.FAILED and done.error is not None
    assert done.error.type == "TooLarge"
    assert "data.txt" not in gate.seen


async def test_a_file_dropped_while_its_pending_jobs_file_is_in_processing_waits(
        tmp_path: Path) -> None:
    """A claim refused after its early move (the outcome beside it refused) leaves a pending
    job whose file is in processing/: a new file dropped under the name is new work that
    waits for that job (it was taken for the job's own file, and never processed)."""
    async with Kernel.open(data_dir=tmp_path / "data") as kernel:
        kernel.register_workflow(WORKFLOW, Noop(), config=WorkflowConfig(enabled=False))
        await kernel.ready()
        data = tmp_path / "data"
        (data / WORKFLOW / "input" / "b.txt").write_bytes(b"old")
        job = await kernel.submit(WORKFLOW, "b.txt")
        os.rename(data / WORKFLOW / "input" / "b.txt", data / layout.processing_path(job))
        (data / WORKFLOW / "input" / "b.txt").write_bytes(b"new")
        answer = await kernel._watch_submit(WORKFLOW)("b.txt", "stable:0ms", None)
        assert answer == LATER
        assert len(await kernel.store.active_jobs(WORKFLOW)) == 1


async def test_a_long_names_file_moved_under_its_whole_name_before_an_upgrade_is_found(
        tmp_path: Path) -> None:
    """A 220-byte name fitted `{job_id}--name` before names were shortened: a file an
    earlier version moved to processing/ under its whole name is found, and its job
    completes (it was looked for under the shortened name only: FileMissing)."""
    name = "a" * 216 + ".txt"
    data = tmp_path / "data"
    async with Kernel.open(data_dir=data) as kernel:
        kernel.register_workflow(WORKFLOW, Noop(), config=WorkflowConfig(enabled=False))
        await kernel.ready()
        (data / WORKFLOW / "input" / name).write_bytes(b"from before the upgrade\n")
        job = await kernel.submit(WORKFLOW, name)
    whole = data / WORKFLOW / "processing" / f"{job.id}--{name}"
    os.rename(data / WORKFLOW / "input" / name, whole)
    assert layout.stored_name(job) != whole.name
    async with Kernel.open(data_dir=data) as kernel:
        kernel.register_workflow(WORKFLOW, Noop())
        await kernel.ready()
        done = await kernel.wait(job.id, timeout_s=WAIT_S)
    assert done.status is Status.COMPLETED, done.error
    assert (data / done.current_path).read_bytes() == b"from before the upgrade\n"


async def test_a_file_dropped_before_notifications_are_live_is_found_at_once(
        tmp_path: Path) -> None:
    """A file that lands after the first scan, while the notification watch is still being
    set up, is found by a second scan a second later (it waited a whole rescan interval,
    30 s: a tutorial's first drop right after start looked lost)."""
    async with hot_folder(tmp_path, Noop(), settle_ms=50, watcher=Deaf) as hot:
        hot.drop("early.txt")
        with anyio.fail_after(5):
            job = await hot.job_of("early.txt")
        assert job.file_path.endswith("early.txt")
