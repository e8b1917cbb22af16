"""kill -9 of `multiflow run` while it delivers webhooks: every matching event still arrives.

The parent runs a loopback receiver (tests/integration/receiver.py, 20 ms per answer so
the target lags behind the jobs), writes a multiflow.toml with a `[[webhooks]]` target
for one workflow of a tiny workflows_dir, drops a stream of files into both workflows'
hot folders, SIGKILLs the server at seeded moments while deliveries flow and starts it
again. At the end the log, read back read-only and filtered with the documented rules,
is the oracle: every matching event was delivered at least once, nothing else was, every
request was signed, and the repeats of an event carry the same X-Multiflow-Delivery key
and the same body.

The seed is printed; set MULTIFLOW_NOTIFY_CRASH_SEED to replay a schedule (the moments
are delivery counts, so a replay is close to, not exactly, the same run).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import httpx2
import pytest

from adapters.sqlite import SqliteEventStore
from kernel.events import JobCancelled, JobCompleted, JobCreated, JobFailed, JobRetried
from kernel.state import StoredEvent
from tests.integration.receiver import Receiver, deliveries_by_key

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("MULTIFLOW_NOTIFY_CRASH_SEED") or secrets.randbits(32))
SECRET = "kill9-secret-0123456789"
TARGET = "receiver"
FILES = 120  # into "ticker" (the target's workflow)
OTHER_FILES = 20  # into "other" (not the target's)
KILLS = 4
START_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 40.0

WORKFLOW = '''
    from kernel.config import WorkflowConfig
    from kernel.task import BaseProcessor


    class Tick(BaseProcessor):
        def process(self, ctx, task):
            return {"size": ctx.input_path.stat().st_size}


    processor = Tick()
    config = WorkflowConfig(settle_ms=50, max_attempts=20, backoff_base_s=0.05,
                            backoff_max_s=0.2, rescan_interval_s=1.0)
'''


def write_setup(tmp: Path, receiver: Receiver) -> Path:
    """The workflows_dir with `ticker` and `other`, and the multiflow.toml naming them."""
    for name in ("ticker", "other"):
        package = tmp / "workflows" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(textwrap.dedent(WORKFLOW).lstrip())
    config = tmp / "multiflow.toml"
    config.write_text(textwrap.dedent(f'''
        data_dir = "{tmp / 'data'}"
        workflows_dir = "{tmp / 'workflows'}"
        auth = "off"
        concurrency = 2
        drain_grace_s = 2
        log_format = "json"

        [[webhooks]]
        name = "{TARGET}"
        url = "{receiver.url}"
        secret = "{SECRET}"
        workflows = ["ticker"]
        timeout_s = 2
        backoff_base_s = 0.05
        backoff_max_s = 0.2
    '''))
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(config: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """One life of `multiflow run`; returns once /readyz answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFLOW_")}
    command = [sys.executable, "-c", "from adapters.cli import main; main()", "run",
               "--config", str(config), "--port", str(port)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"seed {SEED}: the server exited\n{tail(log_path)}"
            with contextlib.suppress(httpx2.TransportError):
                if client.get("/readyz").status_code == 200:
                    return proc, port
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"seed {SEED}: not ready in time\n{tail(log_path)}")


def tail(log_path: Path, lines: int = 40) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def drop_stream(data: Path, rng: random.Random, done: threading.Event) -> None:
    """Drop the files (renamed in whole) at an uneven pace, through the kills."""
    staging = data / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    names = [("ticker", f"t{i:04d}.txt") for i in range(FILES)]
    names += [("other", f"o{i:04d}.txt") for i in range(OTHER_FILES)]
    rng.shuffle(names)
    for workflow, name in names:
        inbox = data / workflow / "input"
        inbox.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(name.encode())
        os.rename(staging / name, inbox / name)
        time.sleep(rng.uniform(0.0, 0.04))
    done.set()


def read_log(db: Path) -> list[StoredEvent]:
    """The whole log, from the file opened read-only (the server may still run)."""

    async def read() -> list[StoredEvent]:
        store = await SqliteEventStore.open(db, readonly=True)
        try:
            events: list[StoredEvent] = []
            while page := await store.read_all(events[-1].seq if events else 0, 5000):
                events += page
            return events
        finally:
            await store.close()

    return anyio.run(read)


def expected_keys(events: list[StoredEvent]) -> tuple[dict[str, StoredEvent], int]:
    """The keys the target must receive (ticker's finished, retried, cancelled events), and
    how many ticker jobs have finished."""
    workflow = {s.job_id: s.event.workflow_name for s in events
                if isinstance(s.event, JobCreated)}
    wanted: dict[str, StoredEvent] = {}
    finished = 0
    for stored in events:
        event = stored.event
        final = isinstance(event, JobCompleted | JobCancelled | JobRetried) or \
            (isinstance(event, JobFailed) and event.retry_at is None)
        if final and workflow[stored.job_id] == "ticker":
            wanted[f"{stored.seq}-{TARGET}"] = stored
            finished += not isinstance(event, JobRetried)
    return wanted, finished


def kill_when_delivered(proc: subprocess.Popen[bytes], receiver: Receiver, count: int,
                        jitter_s: float) -> int:
    """SIGKILL once the receiver has answered `count` deliveries (plus a jitter)."""
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while len(receiver.delivered()) < count and proc.poll() is None:
        assert time.monotonic() < deadline, f"seed {SEED}: stuck below {count} deliveries"
        time.sleep(0.002)
    time.sleep(jitter_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(10)


@pytest.mark.slow
def test_kill9_during_deliveries_loses_no_webhook(tmp_path: Path) -> None:
    """SIGKILLed 4 times while it delivers, the server still delivers every matching event at
    least once, signed, and each repeat carries the same key and body."""
    print(f"notify kill -9 seed: {SEED} (MULTIFLOW_NOTIFY_CRASH_SEED={SEED} to replay)")
    rng = random.Random(SEED)
    log_path = tmp_path / "server.log"
    with Receiver(SECRET, delay_s=0.02) as receiver:
        config = write_setup(tmp_path, receiver)
        dropped = threading.Event()
        dropper = threading.Thread(target=drop_stream,
                                   args=(tmp_path / "data", random.Random(rng.random()), dropped))
        lives: list[int] = []  # len(receiver.received) when each life started
        proc, _ = start(config, log_path)
        dropper.start()
        codes = []
        try:
            for k in range(KILLS):
                lives.append(len(receiver.received))
                goal = int(FILES * (k + rng.uniform(0.4, 1.0)) / (KILLS + 1))
                codes.append(kill_when_delivered(proc, receiver, goal, rng.uniform(0, 0.03)))
                proc, _ = start(config, log_path)
            lives.append(len(receiver.received))
            dropped.wait(FINISH_TIMEOUT_S)
            wanted = wait_for_everything(tmp_path / "data" / "multiflow.db", receiver)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, f"seed {SEED}: the last life did not stop cleanly"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            dropper.join(FINISH_TIMEOUT_S)
        received = receiver.received

    assert codes == [-signal.SIGKILL] * KILLS, f"seed {SEED}: lives exited {codes}"
    wanted, finished = expected_keys(read_log(tmp_path / "data" / "multiflow.db"))
    assert finished == FILES, f"seed {SEED}: {finished} of {FILES} ticker jobs finished"
    assert all(r.signature_valid for r in received), f"seed {SEED}: a bad signature"
    assert {r.key for r in received} <= set(wanted), f"seed {SEED}: an unwanted delivery"
    missing = set(wanted) - {r.key for r in received if r.ok}
    assert not missing, f"seed {SEED}: never delivered: {sorted(missing)}"
    repeats = 0
    for key, copies in deliveries_by_key(received):
        assert len({c.body for c in copies}) == 1, f"seed {SEED}: {key}'s repeats differ"
        assert copies[0].json()["event"]["seq"] == wanted[key].seq
        repeats += len(copies) - 1
    for start_at, end_at in zip(lives, [*lives[1:], len(received)], strict=True):
        seqs = [r.json()["event"]["seq"] for r in received[start_at:end_at]]
        assert seqs == sorted(seqs), f"seed {SEED}: a life delivered out of log order"
    assert "Traceback" not in log_path.read_text(errors="replace"), tail(log_path, 200)
    print(f"{len(wanted)} events, {len(received)} requests, {repeats} repeated deliveries")


def wait_for_everything(db: Path, receiver: Receiver) -> dict[str, StoredEvent]:
    """Wait until every ticker job finished and every matching event was delivered."""
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while True:
        wanted, finished = expected_keys(read_log(db))
        if finished == FILES and set(wanted) <= receiver.delivered_keys():
            return wanted
        assert time.monotonic() < deadline, \
            f"seed {SEED}: {finished}/{FILES} finished, " \
            f"{len(set(wanted) - receiver.delivered_keys())} undelivered"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_is_not_held_up_by_a_hanging_receiver(tmp_path: Path) -> None:
    """With a delivery held by the receiver (timeout_s = 6), SIGTERM ends the process in
    well under the delivery timeout."""
    log_path = tmp_path / "server.log"
    with Receiver(SECRET) as receiver:
        receiver.hang()
        config = write_setup(tmp_path, receiver)
        config.write_text(config.read_text().replace("timeout_s = 2", "timeout_s = 6"))
        proc, _ = start(config, log_path)
        try:
            inbox = tmp_path / "data" / "ticker" / "input"
            inbox.mkdir(parents=True, exist_ok=True)
            (inbox / "a.txt").write_text("a")
            receiver.wait_for(lambda r: r.arrivals >= 1)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            exit_s = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0
    assert exit_s < 3.0, f"the process exited {exit_s:.1f} s after SIGTERM"
