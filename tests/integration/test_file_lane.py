"""The file lane: many blocking file operations per thread hop, one fsync per dirty folder,
and each caller resumes only once the folders it dirtied are durable."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import adapters.fsutil
from adapters.fsutil import FileLane

pytestmark = pytest.mark.anyio


class Fsyncs:
    """Records every folder fsync (the real one still runs) and the order of things."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[str] = []
        self.lock = threading.Lock()
        real = adapters.fsutil.fsync_dir

        def fsync_dir(path: str | Path) -> None:
            real(path)
            self.note(f"fsync {Path(path).name}")

        monkeypatch.setattr(adapters.fsutil, "fsync_dir", fsync_dir)

    def note(self, line: str) -> None:
        with self.lock:
            self.log.append(line)

    def count(self, name: str) -> int:
        return self.log.count(f"fsync {name}")


async def test_concurrent_operations_share_hops_and_one_fsync_per_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty operations issued together take far fewer thread hops than twenty, every one
    gets its own result, and each dirty folder is fsynced once per batch, not once each."""
    fsyncs = Fsyncs(monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hops = 0
    real_run_batch = adapters.fsutil._run_batch

    def counting_run_batch(batch: list[Any]) -> None:
        nonlocal hops
        hops += 1
        real_run_batch(batch)

    monkeypatch.setattr(adapters.fsutil, "_run_batch", counting_run_batch)
    lane = FileLane()
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        folder = str(tmp_path / ("a" if i % 2 else "b"))
        results[i] = await lane.run(lambda dirty: dirty.add(folder) or i * i)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    assert results == {i: i * i for i in range(20)}
    assert hops <= 3
    assert fsyncs.count("a") == fsyncs.count("b") == hops


async def test_a_caller_resumes_only_after_its_folder_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operation runs, then its folder's fsync, and only then does its caller go on."""
    fsyncs = Fsyncs(monkeypatch)
    lane = FileLane()

    def rename(dirty: set[str]) -> None:
        (tmp_path / "x").write_bytes(b"x")
        fsyncs.note("op")
        dirty.add(str(tmp_path))

    await lane.run(rename)
    fsyncs.note("caller resumed")
    assert fsyncs.log == ["op", f"fsync {tmp_path.name}", "caller resumed"]


async def test_each_operation_fails_on_its_own(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation that raises fails its caller only; a failed fsync fails exactly the
    operations that dirtied that folder."""
    lane = FileLane()
    missing = str(tmp_path / "gone")  # fsync of a folder that does not exist: OSError
    fine = str(tmp_path)
    outcomes: dict[str, object] = {}

    def boom(dirty: set[str]) -> str:
        raise ValueError("boom")

    async def one(name: str, call: adapters.fsutil.LaneCall[str]) -> None:
        try:
            outcomes[name] = await lane.run(call)
        except (OSError, ValueError) as exc:
            outcomes[name] = type(exc).__name__

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "raises", boom)
        tg.start_soon(one, "unsynced", lambda dirty: dirty.add(missing) or "unsynced")
        tg.start_soon(one, "synced", lambda dirty: dirty.add(fine) or "synced")
    assert outcomes == {"raises": "ValueError", "unsynced": "FileNotFoundError",
                        "synced": "synced"}


async def test_a_cancelled_waiter_does_not_stall_the_lane(tmp_path: Path) -> None:
    """A caller cancelled while its batch waits still has its operation run, and the
    callers queued behind it are served (the lead passes over the abandoned one)."""
    lane = FileLane()
    release = threading.Event()
    ran: list[str] = []

    def slow(dirty: set[str]) -> None:
        release.wait(5)
        ran.append("slow")

    async with anyio.create_task_group() as tg:
        tg.start_soon(lane.run, slow)  # leads; its batch blocks in the thread
        await anyio.sleep(0.05)
        with anyio.move_on_after(0.05):
            await lane.run(lambda dirty: ran.append("abandoned"))  # queued, then cancelled
        done = anyio.Event()

        async def later() -> None:
            await lane.run(lambda dirty: ran.append("later"))
            done.set()

        tg.start_soon(later)
        await anyio.sleep(0.05)
        release.set()
        with anyio.fail_after(5):
            await done.wait()
    assert ran == ["slow", "abandoned", "later"]


async def test_the_lanes_thread_ends_when_idle_and_comes_back(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane's own thread ends after its idle time and a new one serves the next batch."""
    monkeypatch.setattr(adapters.fsutil._Worker, "IDLE_S", 0.05)
    lane = FileLane()
    first = await lane.run(lambda dirty: threading.current_thread())
    assert first.name == "multiflow-file-lane"
    with anyio.fail_after(5):
        while first.is_alive():  # noqa: ASYNC110 (a thread ending has no event to wait on)
            await anyio.sleep(0.02)
    second = await lane.run(lambda dirty: threading.current_thread())
    assert second is not first and second.name == "multiflow-file-lane"


async def test_without_an_asyncio_loop_the_lane_uses_anyios_threads(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under another event loop (trio) there is no asyncio loop to answer to: batches run
    in anyio's worker threads instead."""
    monkeypatch.setattr(adapters.fsutil, "_asyncio_loop", lambda: None)
    lane = FileLane()
    name = await lane.run(lambda dirty: threading.current_thread().name)
    assert name != "multiflow-file-lane" and name != threading.main_thread().name
