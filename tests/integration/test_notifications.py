"""Webhooks and alerts against a real HTTP receiver on loopback (tests/integration/receiver.py).

The oracle of what a target must receive is the stored log itself, read back and
filtered here with the documented rules (final failures, completions,
cancellations, operator retries; by workflow, channel and kind), never the
notifier's own filter. The receiver checks every signature over the wire.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from adapters import Kernel
from adapters.config import Settings, SettingsError, load_settings
from adapters.http.app import create_app
from adapters.http.state import AppState
from adapters.notify.alerts import AlertEngine
from adapters.notify.records import AlertRecord
from adapters.notify.service import start_notifications
from adapters.notify.settings import AlertRule, WebhookTarget
from kernel.config import WorkflowConfig
from kernel.events import JobCancelled, JobCompleted, JobCreated, JobFailed, JobRetried
from kernel.ports import StoreFull
from kernel.state import Job, StoredEvent
from kernel.task import BaseProcessor, JobContext, JobError
from tests.integration.receiver import Receiver, deliveries_by_key

SECRET = "test-secret-0123456789"
TOKEN = "notify-test-token"
WORKFLOWS = ("alpha", "beta")


class Echo(BaseProcessor):
    """Completes, or fails finally when the file starts with `fail`."""

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        data = ctx.input_path.read_bytes()
        if data.startswith(b"fail"):
            raise JobError("Boom", "asked to fail", retryable=False)
        return {"size": len(data)}


def hook(receiver: Receiver, name: str = "hook", **options: Any) -> WebhookTarget:
    """A target for `receiver` with fast retries (tests must not wait for real backoff)."""
    options = {"timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05, **options}
    return WebhookTarget(name=name, url=receiver.url, secret=SECRET, **options)


@contextlib.asynccontextmanager
async def running(data: Path, settings: Settings, *, parked: bool = False
                  ) -> AsyncIterator[tuple[Kernel, AlertEngine | None]]:
    """A kernel with the test workflows and the notifier started as `multiflow run` does."""
    async with Kernel.open(data_dir=data, concurrency=4, drain_grace_s=2) as kernel:
        for name in WORKFLOWS:
            kernel.register_workflow(name, Echo(), config=WorkflowConfig(max_attempts=1))
        if parked:
            kernel.register_workflow("parked", Echo(), config=WorkflowConfig(enabled=False))
        await kernel.ready()
        engine = await start_notifications(kernel, settings)
        yield kernel, engine


async def submit(kernel: Kernel, workflow: str, name: str, data: bytes = b"ok",
                 channel: str | None = None) -> Job:
    """Drop a file into the workflow's input/ and make it a job."""
    await anyio.Path(kernel.files.data_dir / workflow / "input" / name).write_bytes(data)
    return await kernel.submit(workflow, name, channel_name=channel)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 20.0,
                     what: str = "condition") -> None:
    """Poll `check` until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


# -- the oracle ----------------------------------------------------------------------------


async def read_log(kernel: Kernel) -> list[StoredEvent]:
    """The whole stored log, in seq order."""
    events: list[StoredEvent] = []
    while page := await kernel.events(events[-1].seq if events else 0, 1000):
        events += page
    return events


def kind(stored: StoredEvent) -> str | None:
    """What the docs promise a target hears about (independent of the notifier's code)."""
    event = stored.event
    if isinstance(event, JobCompleted):
        return "completed"
    if isinstance(event, JobFailed):
        return "failed" if event.retry_at is None else None
    if isinstance(event, JobCancelled):
        return "cancelled"
    if isinstance(event, JobRetried):
        return "retried"
    return None


def expected(events: list[StoredEvent], target: WebhookTarget) -> dict[str, StoredEvent]:
    """{idempotency key: event} of every event the target must receive, in seq order."""
    created = {s.job_id: s.event for s in events if isinstance(s.event, JobCreated)}
    wanted: dict[str, StoredEvent] = {}
    for stored in events:
        job = created[stored.job_id]
        assert isinstance(job, JobCreated)
        news = kind(stored)
        if news is None or news not in target.events:
            continue
        if target.workflows and job.workflow_name not in target.workflows:
            continue
        if target.channels and job.channel_name not in target.channels:
            continue
        wanted[f"{stored.seq}-{target.name}"] = stored
    return wanted


def assert_delivered_exactly(receiver: Receiver, wanted: dict[str, StoredEvent],
                             target: WebhookTarget) -> None:
    """Every wanted event arrived (2xx), nothing else did, signed, and repeats are identical."""
    received = receiver.received
    assert received, "nothing arrived"
    assert all(r.signature_valid for r in received), "a request with a bad signature"
    assert {r.key for r in received} <= set(wanted), "a delivery nobody asked for"
    assert receiver.delivered_keys() == set(wanted), \
        f"missing: {sorted(set(wanted) - receiver.delivered_keys())}"
    for key, copies in deliveries_by_key(received):
        stored = wanted[key]
        bodies = {c.body for c in copies}
        assert len(bodies) == 1, f"{key}: repeats differ"
        body = copies[0].json()
        assert body["delivery_id"] == key and body["target"] == target.name
        assert body["event"]["seq"] == stored.seq and body["event"]["job_id"] == stored.job_id
        assert copies[0].kind == body["event"]["type"] == f"job.{kind(stored)}"
        assert body["job"]["id"] == stored.job_id


def arrival_seqs(receiver: Receiver) -> list[int]:
    """The seq of each request, in arrival order (retries included)."""
    return [r.json()["event"]["seq"] for r in receiver.received]


# -- deliveries ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_deliveries_are_signed_filtered_and_in_log_order(tmp_path: Path) -> None:
    """Four targets with different filters each get exactly their events, signed, in seq order,
    each with the job as it was at that event."""
    with Receiver(SECRET) as all_r, Receiver(SECRET) as alpha_r, Receiver(SECRET) as red_r, \
            Receiver(SECRET) as bad_r:
        targets = [hook(all_r, "all"), hook(alpha_r, "alpha-only", workflows=["alpha"]),
                   hook(red_r, "red", channels=["red"]),
                   hook(bad_r, "bad-news", events=["failed", "cancelled"])]
        receivers = [all_r, alpha_r, red_r, bad_r]
        async with running(tmp_path / "data", Settings(webhooks=targets), parked=True) as (k, _):
            jobs = []
            for i in range(12):
                workflow = WORKFLOWS[i % 2]
                channel = ("red", "blue", None)[i % 3]
                data = b"fail" if i % 5 == 2 else b"ok"  # f2 (alpha) and f7 (beta)
                jobs.append(await submit(k, workflow, f"f{i}.txt", data, channel))
            parked = await submit(k, "parked", "p.txt", channel="red")
            for job in jobs:
                await k.wait(job.id, timeout_s=10)
            await k.cancel(parked.id, reason="test")
            failed = jobs[2]
            await k.retry(failed.id, reason="test")
            await k.wait(failed.id, timeout_s=10)
            events = await read_log(k)
            wants = [expected(events, t) for t in targets]
            await eventually(lambda: all(r.delivered_keys() == set(w)
                                         for r, w in zip(receivers, wants, strict=True)),
                             what="every target's deliveries")
        for receiver, target, wanted in zip(receivers, targets, wants, strict=True):
            assert_delivered_exactly(receiver, wanted, target)
            seqs = arrival_seqs(receiver)
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), "out of log order"
    assert {kind(s) for s in wants[0].values()} == {"completed", "failed", "cancelled",
                                                   "retried"}
    assert all(kind(s) in ("failed", "cancelled") for s in wants[3].values())
    assert all(0 < len(w) < len(wants[0]) for w in wants[1:]), "a filter that filters nothing"
    # Each delivery shows the job as it was at its event: failed, sent back, failed again.
    story = [(b["event"]["type"], b["job"]["status"], b["job"]["attempts"])
             for b in (r.json() for r in all_r.delivered()) if b["job"]["id"] == failed.id]
    assert story == [("job.failed", "failed", 1), ("job.retried", "pending", 1),
                     ("job.failed", "failed", 2)]


@pytest.mark.anyio
async def test_a_receiver_that_fails_for_a_while_loses_nothing(tmp_path: Path) -> None:
    """The first 5 requests get 500; retries deliver everything, each key's copies identical,
    nothing dead-lettered, still in seq order."""
    with Receiver(SECRET) as receiver:
        receiver.fail_next(5)
        target = hook(receiver)
        async with running(tmp_path / "data", Settings(webhooks=[target])) as (k, _):
            jobs = [await submit(k, WORKFLOWS[i % 2], f"f{i}.txt") for i in range(10)]
            for job in jobs:
                await k.wait(job.id, timeout_s=10)
            wanted = expected(await read_log(k), target)
            await eventually(lambda: receiver.delivered_keys() == set(wanted),
                             what="the deliveries after the receiver recovered")
            assert await k.store.list_dead_letters() == []  # type: ignore[attr-defined]
        assert_delivered_exactly(receiver, wanted, target)
        failures = [r for r in receiver.received if not r.ok]
        assert len(failures) == 5 and all(r.status == 500 for r in failures)
        assert len({r.key for r in failures}) == 1, "the first event was retried 5 times"
        seqs = arrival_seqs(receiver)
        assert seqs == sorted(seqs)


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "retried"), [(503, True), (408, True), (429, True),
                                                  (400, False), (404, False)])
async def test_which_answers_are_retried(tmp_path: Path, status: int, retried: bool) -> None:
    """5xx, 408 and 429 are retried until the receiver recovers; other 4xx go straight to the
    dead-letter list after one attempt, and the next event is delivered regardless."""
    with Receiver(SECRET) as receiver:
        attempts = 2 if retried else 1
        receiver.fail_next(attempts, status)
        target = hook(receiver)
        async with running(tmp_path / "data", Settings(webhooks=[target])) as (k, _):
            first = await submit(k, "alpha", "a.txt")
            await k.wait(first.id, timeout_s=10)
            await eventually(lambda: len(receiver.received) >= attempts, what="the attempts")
            second = await submit(k, "alpha", "b.txt")
            await k.wait(second.id, timeout_s=10)
            wanted = expected(await read_log(k), target)
            keys = list(wanted)
            want_delivered = set(keys) if retried else {keys[1]}
            await eventually(lambda: receiver.delivered_keys() == want_delivered,
                             what="deliveries")
            letters = await k.store.list_dead_letters()  # type: ignore[attr-defined]
    assert all(r.signature_valid for r in receiver.received)
    if retried:
        assert letters == []
    else:
        (letter,) = letters
        assert f"{letter.seq}-{letter.target}" == keys[0]
        assert letter.attempts == 1 and letter.last_error == f"HTTP {status}"


@pytest.mark.anyio
async def test_a_timeout_is_retried_with_the_same_key(tmp_path: Path) -> None:
    """A request held past the target's timeout is sent again, same key and body."""
    with Receiver(SECRET) as receiver:
        target = hook(receiver, timeout_s=0.3)
        async with running(tmp_path / "data", Settings(webhooks=[target])) as (k, _):
            receiver.hang()
            job = await submit(k, "alpha", "a.txt")
            await k.wait(job.id, timeout_s=10)
            await eventually(lambda: receiver.arrivals >= 2, what="a retry after a timeout")
            receiver.release()
            wanted = expected(await read_log(k), target)
            await eventually(lambda: receiver.delivered_keys() == set(wanted), what="delivery")
    keys = {r.key for r in receiver.received}
    assert keys == set(wanted) and len(receiver.received) >= 2
    assert len({r.body for r in receiver.received}) == 1


# -- the dead-letter list ------------------------------------------------------------------


def api(kernel: Kernel, settings: Settings, engine: AlertEngine | None = None
        ) -> httpx2.AsyncClient:
    """The real Starlette app over httpx2's ASGI transport, with a token."""
    state = AppState(kernel=kernel, settings=settings, tokens=[f"test:{TOKEN}"])
    state.alerts = engine
    transport = httpx2.ASGITransport(app=create_app(state))
    return httpx2.AsyncClient(transport=transport,
                              base_url="http://testserver",
                              headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.mark.anyio
async def test_dead_letters_are_listed_and_redelivered(tmp_path: Path) -> None:
    """A receiver that always fails fills the dead-letter list (store and API); redelivery while
    it still fails is a 502 that keeps the letter; after it recovers, redelivery delivers the
    same key, signed, and removes the letter."""
    with Receiver(SECRET) as receiver:
        receiver.fail_always()
        target = hook(receiver, max_attempts=3)
        settings = Settings(webhooks=[target], api_tokens=[f"test:{TOKEN}"])
        async with running(tmp_path / "data", settings) as (k, _), api(k, settings) as client:
            jobs = [await submit(k, "alpha", f"f{i}.txt") for i in range(3)]
            for job in jobs:
                await k.wait(job.id, timeout_s=10)
            wanted = expected(await read_log(k), target)
            store: Any = k.store
            await eventually(lambda: _count(store.list_dead_letters(), len(wanted)),
                             what="three dead letters")
            letters = await store.list_dead_letters()
            assert [f"{d.seq}-{d.target}" for d in letters] == list(wanted)
            assert all(d.attempts == 3 and d.last_error == "HTTP 500" and
                       d.event_type == "job.completed" for d in letters)
            assert len(receiver.received) == 3 * 3

            anonymous = await client.get("/api/notifications/dead", headers={"Authorization": ""})
            assert anonymous.status_code == 401
            listed = (await client.get("/api/notifications/dead")).json()
            assert [(d["id"], d["seq"], d["target"], d["job_id"]) for d in listed] == \
                [(d.id, d.seq, d.target, d.job_id) for d in letters]

            first = letters[0]
            still = await client.post(f"/api/notifications/dead/{first.id}/redeliver")
            assert still.status_code == 502, still.text
            assert still.headers["content-type"].startswith("application/problem+json")
            assert [d.id for d in await store.list_dead_letters()] == [d.id for d in letters]

            receiver.fail_always(False)
            done = await client.post(f"/api/notifications/dead/{first.id}/redeliver")
            assert done.status_code == 200, done.text
            assert done.json() == {"redelivered": True, "id": first.id}
            assert [d.id for d in await store.list_dead_letters()] == [d.id for d in letters[1:]]
            (delivered,) = receiver.delivered()
            assert delivered.key == f"{first.seq}-{target.name}" and delivered.signature_valid
            assert {r.body for r in receiver.received if r.key == delivered.key} == \
                {delivered.body}, "the redelivery is not the same body"
            assert delivered.json()["event"]["seq"] == first.seq

            again = await client.post(f"/api/notifications/dead/{first.id}/redeliver")
            assert again.status_code == 404
            assert (await client.post("/api/notifications/dead/x1/redeliver")).status_code \
                == 404
            later = await submit(k, "alpha", "later.txt")
            await k.wait(later.id, timeout_s=10)
            await eventually(lambda: len(receiver.delivered()) == 2,
                             what="the next event after the dead letters")


async def _count(letters: Awaitable[list[Any]], count: int) -> bool:
    return len(await letters) == count


@pytest.mark.anyio
async def test_a_dead_letter_of_a_removed_target_cannot_be_redelivered(tmp_path: Path) -> None:
    """A letter whose target left the settings answers 409 and stays listed."""
    with Receiver(SECRET) as receiver:
        receiver.fail_always(status=400)
        target = hook(receiver, name="gone")
        settings = Settings(webhooks=[target], api_tokens=[f"test:{TOKEN}"])
        async with running(tmp_path / "data", settings) as (k, _):
            job = await submit(k, "alpha", "a.txt")
            await k.wait(job.id, timeout_s=10)
            store: Any = k.store
            await eventually(lambda: _count(store.list_dead_letters(), 1), what="a dead letter")
            (letter,) = await store.list_dead_letters()
            async with api(k, Settings(api_tokens=[f"test:{TOKEN}"])) as client:
                answer = await client.post(f"/api/notifications/dead/{letter.id}/redeliver")
            assert answer.status_code == 409, answer.text
            assert len(await store.list_dead_letters()) == 1


# -- checkpoints ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_delivery_resumes_at_the_checkpoint_after_a_stop(tmp_path: Path) -> None:
    """Stopped halfway through a slow target's backlog, the next start resumes after the
    durable checkpoint: nothing at or before it is sent again, nothing after it is skipped."""
    data = tmp_path / "data"
    with Receiver(SECRET, delay_s=0.03) as receiver:
        target = hook(receiver)
        settings = Settings(webhooks=[target])
        async with running(data, settings) as (k, _):
            jobs = [await submit(k, WORKFLOWS[i % 2], f"f{i}.txt") for i in range(40)]
            for job in jobs:
                await k.wait(job.id, timeout_s=10)
            await eventually(lambda: len(receiver.delivered()) >= 10, what="10 deliveries")
        first_life = len(receiver.received)
        assert 10 <= first_life < 40, "the stop did not land midway"

        async with Kernel.open(data_dir=data) as probe:
            checkpoint = await probe.store.get_checkpoint(  # type: ignore[attr-defined]
                f"webhook:{target.name}")
        async with running(data, settings) as (k, _):
            more = [await submit(k, "alpha", f"g{i}.txt") for i in range(5)]
            for job in more:
                await k.wait(job.id, timeout_s=10)
            wanted = expected(await read_log(k), target)
            await eventually(lambda: receiver.delivered_keys() == set(wanted), what="the rest")
            last_seq = max(stored.seq for stored in wanted.values())

            async def checkpointed() -> bool:  # recorded just after the receiver answers
                seq = await k.store.get_checkpoint(  # type: ignore[attr-defined]
                    f"webhook:{target.name}")
                return bool(seq == last_seq)

            await eventually(checkpointed, what="the final checkpoint")
            final_checkpoint = last_seq

    seqs = [stored.seq for stored in wanted.values()]
    assert seqs[0] <= checkpoint < seqs[-1]
    second_life = [r.json()["event"]["seq"] for r in receiver.received[first_life:]]
    assert second_life[0] == min(s for s in seqs if s > checkpoint), "did not resume there"
    assert all(seq > checkpoint for seq in second_life)
    assert second_life == sorted(second_life)
    assert_delivered_exactly(receiver, wanted, target)
    repeats = [key for key, copies in deliveries_by_key(receiver.received) if len(copies) > 1]
    assert len(repeats) <= 1, f"more than the one in flight at the stop was repeated: {repeats}"
    assert final_checkpoint == seqs[-1]


# -- alerts --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failure_alert_fires_once_and_clears_once(tmp_path: Path) -> None:
    """More than 2 final failures within the window fire the rule once; once they age out of
    the window it clears once; both are recorded (store and GET /api/alerts) and reach the
    rule's target signed."""
    window_s = 4.0
    with Receiver(SECRET) as receiver:
        ops = hook(receiver, name="ops", events=[])  # alerts only, no job events
        rule = AlertRule(name="failing", kind="failures", threshold=2, window_s=window_s,
                         workflow="alpha", targets=["ops"])
        settings = Settings(webhooks=[ops], alerts=[rule], api_tokens=[f"test:{TOKEN}"])
        async with running(tmp_path / "data", settings) as (k, engine):
            assert engine is not None
            store: Any = k.store
            beta = await submit(k, "beta", "b.txt", b"fail")  # another workflow: not counted
            first_failure = time.monotonic()  # no counted failure is older than this
            for name in ("f1", "f2"):
                await k.wait((await submit(k, "alpha", name, b"fail")).id, timeout_s=10)
            await k.wait(beta.id, timeout_s=10)
            await anyio.sleep(0.3)  # let the engine see them
            await engine.check()
            assert engine.firing == {"failing": False} and await store.list_alerts() == []

            await k.wait((await submit(k, "alpha", "f3", b"fail")).id, timeout_s=10)
            await eventually(lambda: _checked(engine, True), what="the alert to fire")
            for _ in range(3):
                await engine.check()
            (fired,) = await store.list_alerts()
            assert (fired.rule, fired.state) == ("failing", "fired")
            assert fired.detail.startswith("3 final failures")

            await eventually(lambda: _checked(engine, False), timeout_s=window_s + 5,
                             what="the alert to clear")
            assert time.monotonic() - first_failure >= window_s, "cleared too early"
            for _ in range(3):
                await engine.check()
            history = [(a.rule, a.state) for a in await store.list_alerts()]
            assert history == [("failing", "cleared"), ("failing", "fired")]

            async with api(k, settings, engine) as client:
                shown = (await client.get("/api/alerts")).json()
            assert shown["firing"] == {"failing": False}
            assert [(a["rule"], a["state"]) for a in shown["history"]] == history
            await eventually(lambda: len(receiver.delivered()) == 2, what="two alert messages")

    messages = receiver.received
    assert len(messages) == 2 and all(m.signature_valid and m.ok for m in messages)
    assert all(m.kind == "alert" for m in messages), "a job event reached an alerts-only target"
    bodies = [m.json() for m in messages]
    assert [b["state"] for b in bodies] == ["fired", "cleared"]
    assert all(b["alert"] == "failing" and b["kind"] == "failures" and b["workflow"] == "alpha"
               for b in bodies)
    assert len({m.key for m in messages}) == 2


async def _checked(engine: AlertEngine, firing: bool) -> bool:
    await engine.check()
    return engine.firing["failing"] is firing


# -- isolation -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_hanging_receiver_does_not_delay_jobs(tmp_path: Path) -> None:
    """While the receiver holds every request for longer than N delivery timeouts, N jobs
    still complete well within that time, and the kernel still stops at once."""
    n, timeout_s = 20, 0.5
    with Receiver(SECRET) as receiver:
        receiver.hang()
        target = hook(receiver, timeout_s=timeout_s, max_attempts=100, backoff_base_s=0.0)
        kernel_cm = running(tmp_path / "data", Settings(webhooks=[target]))
        async with kernel_cm as (k, _):
            warm = await submit(k, "alpha", "warm.txt")
            await k.wait(warm.id, timeout_s=10)
            await eventually(lambda: receiver.arrivals >= 1, what="the first delivery")
            started = time.monotonic()
            jobs = [await submit(k, WORKFLOWS[i % 2], f"f{i}.txt") for i in range(n)]
            for job in jobs:
                assert (await k.wait(job.id, timeout_s=n * timeout_s)).status == "completed"
            elapsed_s = time.monotonic() - started
            assert receiver.delivered() == [], "the receiver was supposed to be hanging"
            stopping = time.monotonic()
        stop_s = time.monotonic() - stopping
    assert elapsed_s < n * timeout_s / 4, f"{n} jobs took {elapsed_s:.2f} s"
    assert stop_s < 3.0, f"the kernel took {stop_s:.2f} s to stop"


@pytest.mark.anyio
async def test_a_queue_depth_alert_fires_and_clears(tmp_path: Path) -> None:
    """More than 2 jobs waiting fires the rule once; cancelling one clears it once."""
    rule = AlertRule(name="deep", kind="queue_depth", workflow="parked", threshold=2,
                     window_s=0)
    async with running(tmp_path / "data", Settings(alerts=[rule]), parked=True) as (k, engine):
        assert engine is not None
        store: Any = k.store
        jobs = [await submit(k, "parked", f"p{i}.txt") for i in range(3)]
        await eventually(lambda: len(k.manager.queue) == 3, what="3 jobs queued")
        await engine.check()
        await engine.check()
        assert engine.firing == {"deep": True}
        await k.cancel(jobs[0].id, reason="test")
        await engine.check()
        await engine.check()
        assert engine.firing == {"deep": False}
        history = [(a.rule, a.state) for a in await store.list_alerts()]
        assert history == [("deep", "cleared"), ("deep", "fired")]


# -- bugs found while writing these tests (see the reasons) --------------------------------


def test_a_webhook_url_with_a_bad_port_is_refused_at_start(tmp_path: Path) -> None:
    """`url = "http://127.0.0.1:80a/hook"` is a settings error naming the webhook."""
    config = tmp_path / "multiflow.toml"
    config.write_text('[[webhooks]]\nname = "t"\nurl = "http://127.0.0.1:80a/hook"\n'
                      'secret = "x"\n')
    with pytest.raises(SettingsError, match="url"):
        load_settings(config, env={}, env_file=None)


@pytest.mark.anyio
async def test_many_hanging_targets_do_not_starve_jobs(tmp_path: Path) -> None:
    """60 targets whose receiver hangs do not keep 5 jobs from completing promptly."""
    with Receiver(SECRET) as receiver:
        receiver.hang()
        targets = [hook(receiver, f"t{i}", timeout_s=1.0, max_attempts=100, backoff_base_s=0.0)
                   for i in range(60)]
        async with running(tmp_path / "data", Settings(webhooks=targets)) as (k, _):
            warm = await submit(k, "alpha", "warm.txt")
            with anyio.move_on_after(10):
                await k.wait(warm.id)
            await eventually(lambda: receiver.arrivals >= 40, what="the targets to hang")
            for i in range(5):
                (k.files.data_dir / "alpha" / "input" / f"f{i}.txt").write_bytes(b"ok")
            started = time.monotonic()
            done = 0
            with anyio.move_on_after(3):
                for i in range(5):
                    await k.wait((await k.submit("alpha", f"f{i}.txt")).id)
                    done += 1
            elapsed_s = time.monotonic() - started
    assert done == 5 and elapsed_s < 1.5, f"{done} of 5 jobs done in {elapsed_s:.2f} s"


@pytest.mark.anyio
async def test_an_alert_that_fired_before_a_restart_clears_after_it(tmp_path: Path) -> None:
    """Fired in one life, the alert clears (recorded and sent) in the next once it no
    longer holds."""
    data, window_s = tmp_path / "data", 1.0
    with Receiver(SECRET) as receiver:
        ops = hook(receiver, name="ops", events=[])
        rule = AlertRule(name="failing", kind="failures", threshold=2, window_s=window_s,
                         targets=["ops"])
        settings = Settings(webhooks=[ops], alerts=[rule])
        async with running(data, settings) as (k, engine):
            assert engine is not None
            for i in range(3):
                await k.wait((await submit(k, "alpha", f"f{i}", b"fail")).id, timeout_s=10)
            await eventually(lambda: _checked(engine, True), what="the alert to fire")
            await eventually(lambda: len(receiver.delivered()) == 1, what="the alert message")
        async with running(data, settings) as (k, engine):
            assert engine is not None
            with contextlib.suppress(AssertionError):
                await eventually(lambda: _checked(engine, False), timeout_s=window_s + 2)
            await anyio.sleep(window_s)
            await engine.check()
            history = [(a.rule, a.state) for a in await k.store.list_alerts()]  # type: ignore[attr-defined]
        assert history == [("failing", "cleared"), ("failing", "fired")]
        assert [m.json()["state"] for m in receiver.delivered()] == ["fired", "cleared"]


class FullRecords:
    """The store's notifier records, on a disk that just filled up."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def record_alert(self, record: AlertRecord) -> None:
        raise StoreFull("database or disk is full")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.anyio
async def test_a_full_disk_while_recording_an_alert_does_not_end_the_engine(
        tmp_path: Path) -> None:
    """An alert that cannot be recorded (StoreFull) leaves the engine (and the kernel) running."""
    rule = AlertRule(name="deep", kind="queue_depth", threshold=0, window_s=0)
    async with running(tmp_path / "data", Settings(), parked=True) as (k, _):
        await submit(k, "parked", "p.txt")
        await eventually(lambda: len(k.manager.queue) == 1, what="the job queued")
        engine = AlertEngine(k, [rule], [], FullRecords(k.store))
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(engine.run)
                await anyio.sleep(0.5)  # its first check runs at once
                tg.cancel_scope.cancel()
        except* StoreFull:
            pytest.fail("StoreFull escaped the alert engine")


@pytest.mark.anyio
async def test_a_target_added_to_a_log_with_a_history_hears_of_new_jobs_only(
        tmp_path: Path) -> None:
    """A webhook added to a server that has run for months starts at the log's head: its
    receiver is not sent every job that ever finished (and its first news does not wait
    behind them)."""
    data = tmp_path / "data"
    async with running(data, Settings()) as (kernel, _):
        old = [await submit(kernel, "alpha", f"old{i}.txt") for i in range(20)]
        for job in old:
            await kernel.wait(job.id, timeout_s=10)
    with Receiver(SECRET) as receiver:
        async with running(data, Settings(webhooks=[hook(receiver, "crm")])) as (kernel, _):
            new = await submit(kernel, "alpha", "new.txt")
            await kernel.wait(new.id, timeout_s=10)
            await eventually(lambda: any(r.json()["job"]["id"] == new.id
                                         for r in receiver.delivered()), what="the new job")
            await anyio.sleep(0.2)
    old_ids = {job.id for job in old}
    assert [r for r in receiver.delivered() if r.json()["job"]["id"] in old_ids] == []


@pytest.mark.anyio
async def test_a_url_with_user_info_is_delivered_with_basic_auth_and_never_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`https://user:password@host/hook`: delivered with an Authorization header (the
    user info was taken for part of the host name, and nothing was ever delivered), and
    the password appears in no log line."""
    password = "pa55w0rd-do-not-leak"
    with Receiver(SECRET) as receiver:
        url = receiver.url.replace("http://", f"http://hook:{password}@")
        target = WebhookTarget(name="crm", url=url, secret=SECRET, timeout_s=2.0,
                               backoff_base_s=0.01, backoff_max_s=0.05)
        async with running(tmp_path / "data", Settings(webhooks=[target])) as (kernel, _):
            job = await submit(kernel, "alpha", "a.txt")
            await kernel.wait(job.id, timeout_s=10)
            await eventually(lambda: bool(receiver.delivered()), what="the delivery")
    assert receiver.delivered()[0].headers["authorization"] == \
        "Basic " + base64.b64encode(f"hook:{password}".encode()).decode()
    assert password not in capsys.readouterr().out


@pytest.mark.anyio
async def test_dead_letters_page_on_and_any_one_can_be_redelivered(tmp_path: Path) -> None:
    """Past the first 1,000 (a receiver that answered 401 to everything for a day), the
    list pages on with `after`, and the newest letter can be redelivered (it was looked
    for among the 100,000 oldest: 404)."""
    data = tmp_path / "data"
    async with running(data, Settings()):
        pass  # the log and its tables
    with sqlite3.connect(data / "multiflow.db") as conn:
        conn.executemany(
            "INSERT INTO dead_letters (target, seq, job_id, event_type, attempts, last_error, "
            "created_at) VALUES ('crm', ?, 'X', 'job.completed', 1, 'HTTP 401', "
            "'2026-01-01T00:00:00+00:00')", [(-i,) for i in range(1, 1501)])
    with Receiver(SECRET) as receiver:
        receiver.fail_always(status=401)
        target = hook(receiver, name="crm")
        settings = Settings(webhooks=[target], api_tokens=[f"test:{TOKEN}"])
        async with running(data, settings) as (kernel, _), api(kernel, settings) as client:
            job = await submit(kernel, "alpha", "a.txt")
            await kernel.wait(job.id, timeout_s=10)
            store: Any = kernel.store
            await eventually(lambda: _count(store.list_dead_letters(5000), 1501),
                             what="the new dead letter")
            first = (await client.get("/api/notifications/dead")).json()
            assert len(first) == 1000
            rest = (await client.get("/api/notifications/dead",
                                     params={"after": first[-1]["id"]})).json()
            assert len(rest) == 501 and rest[-1]["job_id"] == job.id
            assert (await client.get("/api/notifications/dead",
                                     params={"limit": "0"})).status_code == 422
            receiver.fail_always(False)
            answer = await client.post(f"/api/notifications/dead/{rest[-1]['id']}/redeliver")
            assert answer.status_code == 200, answer.text
