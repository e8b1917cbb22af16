"""The dashboard in real headless Chromium against the real server: dropped files show up.

Needs Debian's /usr/bin/chromium and Playwright for Python (never `playwright install`:
it downloads browsers). Without them the browser test is skipped, except in CI
(CI=true), where it fails instead. The screenshot lands in test-artifacts/dashboard.png
under the repository root.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page, Request

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "secret-token"
REPO_ROOT = Path(__file__).resolve().parents[2]
STATIC_DIR = REPO_ROOT / "adapters" / "http" / "static"
SCREENSHOT = REPO_ROOT / "test-artifacts" / "dashboard.png"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PAGE_TIMEOUT_MS = 20_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# Fails a `.bad` file with markup in its message; otherwise ~1.2 s of reported progress.
ECHO_WORKFLOW = '''
    import anyio

    from kernel.config import WorkflowConfig
    from kernel.task import BaseProcessor, JobError


    class Echo(BaseProcessor):
        async def process(self, ctx, task):
            if ctx.input_path.suffix == ".bad":
                raise JobError("BadInput", "<img src=x onerror=alert(1)> refused",
                               retryable=False)
            for step in range(10):
                ctx.progress(step / 10, f"step {step + 1} of 10")
                await anyio.sleep(0.12)
            return {}


    processor = Echo()
    config = WorkflowConfig(settle_ms=0, progress_interval_s=0.1)
'''


@dataclass
class Server:
    """`multiflow run` in `root` on a fixed port; it can be stopped and started again."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")

    def start(self) -> None:
        """Start the process and wait for /readyz."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFLOW_")}
        env.update(MULTIFLOW_API_TOKENS=f"ui:{TOKEN}",
                   MULTIFLOW_WORKFLOWS_DIR=str(self.root / "workflows"))
        command = [sys.executable, "-c", "from adapters.cli import main; main()",
                   "run", "--port", str(self.port)]
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Poll /readyz until 200, or fail with the server's log."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the server exited:\n{self.log_text()}")
            if is_ready(self.url):
                return
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready in time:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past the timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def is_ready(url: str) -> bool:
    """Whether /readyz answers 200."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError as exc:  # 503 while starting; closed: no ResourceWarning
        exc.close()
    except OSError:
        pass
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need_browser() -> None:
    """Skip without Chromium or Playwright; in CI their absence is a failure."""
    missing = [what for what, present in (
        (str(CHROMIUM), CHROMIUM.is_file()),
        ("playwright (pip install playwright)", importlib.util.find_spec("playwright") is not None),
    ) if not present]
    if not missing:
        return
    reason = f"the dashboard test needs {' and '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI installs them)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`multiflow run` in a temporary folder, with the one `echo` workflow."""
    root = tmp_path_factory.mktemp("dashboard")
    package = root / "workflows" / "echo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(ECHO_WORKFLOW).lstrip())
    running = Server(root, free_port())
    try:
        running.start()
        yield running
    finally:
        running.stop()


def drop_file(server: Server, name: str) -> None:
    """Write a file beside input/ and rename it in, as a well-behaved producer does."""
    folder = server.root / "data" / "echo"
    staging = folder / f".{name}.part"
    staging.write_bytes(b"hello dashboard\n")
    (folder / "input").mkdir(exist_ok=True)
    staging.rename(folder / "input" / name)


def sign_in(page: Page, server: Server) -> None:
    """Open the page; a wrong token is refused, the right one connects."""
    from playwright.sync_api import expect

    page.goto(server.url + "/")
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("The server refused this token.")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live",
                                                          timeout=PAGE_TIMEOUT_MS)


def expect_status(page: Page, name: str, status: str) -> Locator:
    """Wait until the recent-jobs row of file `name` shows `status`; the row."""
    from playwright.sync_api import expect

    row = page.locator("#jobs tr", has_text=name)
    expect(row).to_have_count(1, timeout=PAGE_TIMEOUT_MS)
    expect(row.locator(".status")).to_have_text(status, timeout=PAGE_TIMEOUT_MS)
    return row


def restart(page: Page, server: Server) -> None:
    """Stop the server (the page shows it lost the stream), start it again, see it resume."""
    from playwright.sync_api import expect

    server.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting",
                                                          timeout=PAGE_TIMEOUT_MS)
    server.start()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live",
                                                          timeout=PAGE_TIMEOUT_MS)


def exercise(page: Page, server: Server) -> None:
    """Drop a good file, restart the server, drop a failing file and a good one."""
    from playwright.sync_api import expect

    sign_in(page, server)
    drop_file(server, "hello.txt")
    page.wait_for_selector("#running li.running-job .fill", timeout=PAGE_TIMEOUT_MS)
    expect(expect_status(page, "hello.txt", "completed")).to_contain_text("echo")

    restart(page, server)
    drop_file(server, "broken.bad")
    error = expect_status(page, "broken.bad", "failed").locator("td.error")
    expect(error).to_have_text("BadInput: <img src=x onerror=alert(1)> refused")
    expect(page.locator("#jobs img")).to_have_count(0)  # server text is never markup

    drop_file(server, "third.txt")
    running = page.locator("#running li.running-job", has_text="third.txt")
    expect(running.locator(".pct")).to_have_text(re.compile(r"^[3-9]\d%$"),
                                                 timeout=PAGE_TIMEOUT_MS)
    expect(running).to_contain_text("of 10")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    expect_status(page, "third.txt", "completed")

    expect(page.locator("#running-empty")).to_be_visible()
    expect(page.locator("#running-count")).to_have_text("0", timeout=PAGE_TIMEOUT_MS)
    expect(page.locator("#done-hour")).to_have_text("2")
    expect(page.locator("#failed-hour")).to_have_text("1")
    expect(page.locator("#error-rate")).to_have_text("33.3%")
    assert chart_totals(page, "echo") == (2, 1)


def chart_totals(page: Page, workflow: str) -> tuple[int, int]:
    """Completed and failed jobs summed over the chart's minute bars (read from their titles)."""
    titles = page.locator(f".workflow[data-workflow={workflow}] .chart g > title")
    counts = [re.search(r"(\d+) completed, (\d+) failed", text)
              for text in titles.all_text_contents()]
    assert all(counts), titles.all_text_contents()
    return (sum(int(m[1]) for m in counts if m), sum(int(m[2]) for m in counts if m))


def check_requests(requests: list[Request]) -> None:
    """The token only ever in a header; the stream resumed with Last-Event-ID."""
    assert not [r.url for r in requests if TOKEN in r.url]
    api_calls = [r for r in requests if "/api/" in r.url]
    assert api_calls
    assert all(r.headers.get("authorization", "").startswith("Bearer ") for r in api_calls)
    streams = [r for r in api_calls if "/api/events?after=" in r.url]
    assert "last-event-id" not in streams[0].headers
    resumed = [r for r in streams if "last-event-id" in r.headers]
    assert resumed, [r.url for r in streams]
    last_event_id = resumed[-1].headers["last-event-id"]
    assert last_event_id.isdigit() and int(last_event_id) > 0
    assert resumed[-1].url.endswith(f"after={last_event_id}")


def test_dropped_files_appear_run_and_finish_on_the_dashboard(server: Server) -> None:
    """Live from the event stream the page shows jobs run and finish, across a restart."""
    need_browser()
    from playwright.sync_api import sync_playwright

    requests: list[Request] = []
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("request", lambda request: requests.append(request))
            page.on("pageerror", lambda error: problems.append(str(error)))
            # Refused tokens and the restart make "Failed to load resource" errors; the
            # rest (a CSP violation, an exception) is a problem.
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error"
                    and not msg.text.startswith("Failed to load resource") else None)
            try:
                exercise(page, server)
            except Exception as exc:
                raise AssertionError(f"{exc}\n--- server log (tail) ---\n"
                                     f"{server.log_text()[-5000:]}") from exc
            check_requests(requests)
        finally:
            browser.close()
    assert not problems, problems


def raw_get(server: Server, target: str, method: str = "GET"
            ) -> tuple[int, dict[str, str], bytes]:
    """Send `target` exactly as written (no `..` or `%2f` normalisation); one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, target, headers={"Connection": "close"})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
ESCAPES = ["/static/../dashboard.py", "/static/..%2fdashboard.py", "/static/%2e%2e/dashboard.py",
           "/static/../../../../etc/passwd", "/static//etc/passwd", "/static/..\\dashboard.py",
           "/static/", "/static/missing.js", "/static/./index.html", "/static/index.html%00.js"]


def test_the_page_and_its_files_answer_without_a_token_with_their_types(server: Server) -> None:
    """/ and every static file answer 200 without a token, typed, under a strict CSP."""
    status, headers, body = raw_get(server, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/static/dashboard.js">' in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    for path in sorted(STATIC_DIR.iterdir()):
        status, headers, body = raw_get(server, f"/static/{path.name}")
        assert status == 200, path.name
        assert headers["content-type"].startswith(STATIC_TYPES[path.suffix]), path.name
        assert body == path.read_bytes()
    assert raw_get(server, "/", method="HEAD")[0] == 200
    assert raw_get(server, "/api/queue")[0] == 401


@pytest.mark.parametrize("target", ESCAPES)
def test_no_static_path_reaches_a_file_outside_the_static_folder(server: Server,
                                                                  target: str) -> None:
    """A climbing, encoded, absolute or unknown name under /static/ is a plain 404."""
    status, _, body = raw_get(server, target)
    assert status == 404, (target, body[:200])
    assert b"from __future__" not in body and b"root:" not in body
