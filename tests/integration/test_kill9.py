"""kill -9 at random moments of a 2,000-file run: nothing is lost and nothing completes twice.

The seed of the kill schedule is printed (and named in failures); set
MULTIFLOW_CRASH_SEED to replay a schedule (the moments are progress points, so a
replay is close to, not exactly, the same run).
"""

from __future__ import annotations

import os
import random
import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from tests.integration.crash_child import SEEDED_MARKER
from tests.integration.crashkit import (
    Audit,
    all_names,
    assert_completed_job,
    assert_every_file_once,
    assert_folders,
    assert_log_sound,
    child_command,
    count_archived,
    finish,
    kill_when,
    start_child,
    tail,
)

FILES = 2000
PROGRESS_KILLS = 12  # spread across the run by archived count
EARLY_KILLS = 4  # a fraction of a second after a start: in recovery or resubmission
LAST_LIFE_TIMEOUT_S = 90.0
SEED = int(os.environ.get("MULTIFLOW_CRASH_SEED") or secrets.randbits(32))

Due = Callable[[], Awaitable[bool]]


def kill_plan(rng: random.Random) -> list[tuple[str, float]]:
    """When each life dies: ("archived", count reached) or ("after_s", seconds after start)."""
    plan = [("archived", FILES * (k + rng.random()) / (PROGRESS_KILLS + 1))
            for k in range(PROGRESS_KILLS)]
    for _ in range(EARLY_KILLS):
        plan.insert(rng.randint(0, len(plan)), ("after_s", rng.uniform(0.05, 0.8)))
    return plan


def due_for(kind: str, value: float, data_dir: Path, rng: random.Random) -> Due:
    """The kill condition of one life; never before the inputs are all seeded."""
    started_s = anyio.current_time()
    jitter_s = rng.uniform(0.0, 0.05)
    reached_s: list[float] = []
    marker = data_dir / SEEDED_MARKER

    async def due() -> bool:
        if not marker.exists():
            return False
        now_s = anyio.current_time()
        if kind == "after_s":
            return now_s - started_s >= value
        if not reached_s and await anyio.to_thread.run_sync(count_archived, data_dir) >= value:
            reached_s.append(now_s)
        return bool(reached_s) and now_s - reached_s[0] >= jitter_s

    return due


@pytest.mark.slow
@pytest.mark.anyio
async def test_kill9_at_random_moments_loses_nothing_and_completes_each_job_once(
    tmp_path: Path,
) -> None:
    """SIGKILLed 16 times across a 2,000-file run, the child still completes every file
    exactly once and leaves a sound log and clean folders."""
    print(f"kill -9 schedule seed: {SEED} (MULTIFLOW_CRASH_SEED={SEED} to replay)")
    rng = random.Random(SEED)
    data_dir, log = tmp_path / "data", tmp_path / "child.log"
    command = child_command(data_dir, FILES, concurrency=4, max_attempts=50, backoff_s=0.01)
    codes = []
    for kind, value in kill_plan(rng):
        process = await start_child(command, log)
        codes.append(await kill_when(process, due_for(kind, value, data_dir, rng)))
    process = await start_child(command, log)
    code = await finish(process, LAST_LIFE_TIMEOUT_S)
    assert code == 0, f"seed {SEED}: the last life exited {code}\n{tail(log)}"
    kills = codes.count(-signal.SIGKILL)
    assert set(codes) <= {0, -signal.SIGKILL}, f"seed {SEED}: lives exited {codes}\n{tail(log)}"
    assert kills >= 10, f"seed {SEED}: only {kills} kills landed"
    assert "Traceback" not in log.read_text(errors="replace"), tail(log, 200)

    audit = await Audit.load(data_dir)
    names = all_names(FILES)
    assert_log_sound(audit)
    assert_every_file_once(audit, names)
    for name in names:
        assert_completed_job(audit, name)
    assert_folders(audit, completed=names, failed=[])
    interrupted = audit.failures("Interrupted")
    assert interrupted > 0, f"seed {SEED}: no kill caught a running job"
    print(f"{kills} kills, {interrupted} attempts interrupted, {len(audit.events)} events")
