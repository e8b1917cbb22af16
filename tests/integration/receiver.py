"""A real webhook receiver on loopback: a ThreadingHTTPServer in a thread that records requests.

It verifies every request's signature itself (HMAC-SHA256 over `{timestamp}.{body}`,
compared in constant time) and records the outcome, so a test asserts on what arrived
over the wire, never on what the sender believes it sent. It can be told to answer
500 to the next N requests, to fail every request, or to hang (hold the request
unanswered until released or the hang times out).
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

HANG_MAX_S = 120.0  # a hung request is answered at the latest after this


@dataclass(frozen=True)
class Received:
    """One request as it arrived, the status it was answered, and whether it was signed."""

    headers: dict[str, str]
    body: bytes
    status: int
    signature_valid: bool
    received_s: float  # time.monotonic() at arrival

    @property
    def key(self) -> str:
        """The idempotency key (X-Multiflow-Delivery)."""
        return self.headers.get("x-multiflow-delivery", "")

    @property
    def kind(self) -> str:
        """The event type header (X-Multiflow-Event)."""
        return self.headers.get("x-multiflow-event", "")

    @property
    def ok(self) -> bool:
        """Answered 2xx: the sender may count it delivered."""
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)


def signature_ok(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check: `sha256=` + HMAC(secret, timestamp + "." + body), constant time."""
    timestamp = headers.get("x-multiflow-timestamp", "")
    given = headers.get("x-multiflow-signature", "")
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return bool(timestamp) and hmac.compare_digest(given, "sha256=" + mac.hexdigest())


class Receiver:
    """The loopback receiver; use as a context manager (`with Receiver(secret) as r:`)."""

    def __init__(self, secret: str, *, delay_s: float = 0.0) -> None:
        self.secret = secret
        self.delay_s = delay_s  # every request is answered this much later
        self.fail_status = 500
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self.arrivals = 0  # requests read so far, including those still held or delayed
        self._fail_next = 0
        self._fail_always = False
        self._hanging = False
        self._release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- behaviour ---------------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer `status` to the next `count` requests."""
        with self._lock:
            self._fail_next, self.fail_status = count, status

    def fail_always(self, on: bool = True, status: int = 500) -> None:
        """Answer `status` to every request until told otherwise."""
        with self._lock:
            self._fail_always, self.fail_status = on, status

    def hang(self) -> None:
        """Hold every request from now on unanswered, until `release()`."""
        with self._lock:
            self._hanging = True
            self._release.clear()

    @property
    def hanging(self) -> bool:
        """Whether requests are held unanswered now."""
        with self._lock:
            return self._hanging

    def release(self) -> None:
        """Stop hanging; the held requests are answered (to senders that may have gone)."""
        with self._lock:
            self._hanging = False
        self._release.set()

    # -- what arrived ------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Every request so far, in arrival order (answered or not yet)."""
        with self._lock:
            return list(self._received)

    def delivered(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [r for r in self.received if r.ok]

    def delivered_keys(self) -> set[str]:
        return {r.key for r in self.delivered()}

    def wait_for(self, predicate: Any, timeout_s: float = 20.0) -> None:
        """Poll (from a thread or sync code) until `predicate(self)` holds."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver waited in vain; got {len(self.received)}")
            time.sleep(0.01)

    # -- the server's side -------------------------------------------------------------------

    def _decide(self) -> tuple[int, bool]:
        """(status to answer, whether to hang first), counting down `fail_next`."""
        with self._lock:
            self.arrivals += 1
            if self._fail_next > 0:
                self._fail_next -= 1
                return self.fail_status, self._hanging
            status = self.fail_status if self._fail_always else 200
            return status, self._hanging

    def _record(self, entry: Received) -> None:
        with self._lock:
            self._received.append(entry)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, hangs = receiver._decide()
                if hangs:
                    receiver._release.wait(HANG_MAX_S)
                    status = 503
                elif receiver.delay_s:
                    time.sleep(receiver.delay_s)
                receiver._record(Received(headers, body, status,
                                          signature_ok(receiver.secret, headers, body), arrived))
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting (a timeout): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def deliveries_by_key(received: list[Received]) -> Iterator[tuple[str, list[Received]]]:
    """The successful requests grouped by idempotency key, in first-arrival order."""
    groups: dict[str, list[Received]] = {}
    for entry in received:
        if entry.ok:
            groups.setdefault(entry.key, []).append(entry)
    yield from groups.items()
