"""`multiflow watch` (the remote watcher) as a subprocess, uploading to the real server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.serverkit import Server, multiflow_command, unique

FILES = 100


@contextlib.contextmanager
def remote_watcher(server: Server, folder: Path, channel: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run `multiflow watch` on `folder` for the echo workflow; stopped (SIGINT) on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFLOW_")}
    log = (folder.parent / f"{folder.name}-watch.log").open("wb")
    proc = subprocess.Popen(
        [*multiflow_command(), "watch", "--url", server.url, "--workflow", "echo",
         "--token", server.token, "--settle-ms", "100", "--channel", channel, str(folder)],
        cwd=folder.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _drop(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).write_bytes(f"{name} {unique('bytes')}\n".encode())


def _wait_sent(folder: Path, count: int, proc: subprocess.Popen[bytes], timeout_s: float
               ) -> list[str]:
    deadline = time.monotonic() + timeout_s
    sent: list[str] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, (folder.parent / f"{folder.name}-watch.log").read_text()
        sent_dir = folder / "sent"
        sent = sorted(p.name for p in sent_dir.iterdir()) if sent_dir.is_dir() else []
        left = [p for p in folder.iterdir() if p.is_file()]
        if len(sent) >= count and not left:
            return sent
        time.sleep(0.1)
    raise AssertionError(f"{len(sent)} of {count} files were sent")


def _jobs_of_channel(server: Server, channel: str) -> list[dict[str, object]]:
    with server.client() as client:
        page = client.get("/api/jobs", params={"channel_name": channel, "limit": 1000})
    assert page.status_code == 200
    assert page.json()["next_cursor"] is None
    items: list[dict[str, object]] = page.json()["items"]
    return items


def test_each_dropped_file_becomes_exactly_one_job_and_lands_in_sent(
        server: Server, tmp_path: Path) -> None:
    """100 files dropped around the watcher's start become 100 jobs, once each, then sent/."""
    folder, channel = tmp_path / "outbox", unique("remote")
    folder.mkdir()
    names = [f"remote-{channel}-{i:03d}.txt" for i in range(FILES)]
    _drop(folder, names[: FILES // 2])  # found by the first scan
    with remote_watcher(server, folder, channel) as proc:
        time.sleep(0.5)
        _drop(folder, names[FILES // 2:])  # found by notifications
        sent = _wait_sent(folder, FILES, proc, timeout_s=60)
    assert sent == sorted(names)
    server.wait_quiet()
    jobs = _jobs_of_channel(server, channel)
    assert sorted(str(job["file_path"]).rsplit("/", 1)[1] for job in jobs) == sorted(names)
    assert {job["status"] for job in jobs} == {"completed"}
    created = server.sql("SELECT count(*) FROM events WHERE type = 'job.created' AND "
                         f"payload LIKE '%\"channel_name\":\"{channel}\"%'")[0][0]
    assert created == FILES


def test_two_files_with_the_same_bytes_are_two_jobs(server: Server, tmp_path: Path) -> None:
    """A remote drop of identical bytes under two names makes two jobs (echo has dedupe off)."""
    folder, channel = tmp_path / "outbox", unique("same")
    folder.mkdir()
    payload = f"identical {channel}\n".encode()
    with remote_watcher(server, folder, channel) as proc:
        (folder / f"{channel}-a.txt").write_bytes(payload)
        _wait_sent(folder, 1, proc, timeout_s=30)
        (folder / f"{channel}-b.txt").write_bytes(payload)
        _wait_sent(folder, 2, proc, timeout_s=30)
    server.wait_quiet()
    assert len(_jobs_of_channel(server, channel)) == 2


def test_a_failed_upload_keeps_its_marker_for_the_retry(tmp_path: Path) -> None:
    """With --marker, an upload that fails (the server down) leaves the file and its
    marker for the retry (the marker was removed as if the file could never be a job,
    and the file was never uploaded)."""
    import anyio

    from adapters.remote import RemoteUploader
    from adapters.watch import MARKER_SUFFIX, BaseWatcher
    from kernel.config import WorkflowConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = int(probe.getsockname()[1])
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"data")
    (folder / f"a.txt{MARKER_SUFFIX}").write_bytes(b"")
    uploader = RemoteUploader(f"http://127.0.0.1:{closed}", "echo", folder, None)
    watcher = BaseWatcher("echo", folder, WorkflowConfig(marker=True), uploader)
    anyio.run(watcher._submit, "a.txt", (4, 0))
    assert "a.txt" in uploader.failures  # to be retried
    assert (folder / "a.txt").exists() and (folder / f"a.txt{MARKER_SUFFIX}").exists()
