"""The HTTP API under load (wrk, 16 connections, one uvicorn worker), against bare Starlette.

- POST /api/jobs (auth, validation, a durable append of a NEW job each time):
  target >= 0.5x the requests/s of a bare Starlette endpoint that only decodes JSON and
  returns 201, p99 <= 25 ms.
- GET /api/jobs/{id}: target >= 0.6x the bare endpoint.

Each round runs bare then multiflow, POST then GET; the figures are the medians of the
rounds, and the ratio is the median of the per-round ratios. Every POST of every round
names a file of its own, so each one creates a job.

Needs `wrk` (Debian package wrk). Run:

    .venv/bin/python -m tests.benchmarks.bench_api [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

TOKEN = "bench:bench-token-0123456789"
BARE_APP = '''
import json
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def create(request):
    body = json.loads(await request.body())
    return JSONResponse({"id": "x", **body}, status_code=201)

async def read(request):
    return JSONResponse({"id": request.path_params["job_id"], "status": "pending"})

app = Starlette(routes=[Route("/api/jobs", create, methods=["POST"]),
                        Route("/api/jobs/{job_id}", read, methods=["GET"])])
'''
FILES_PER_ROUND = 60_000  # per wrk thread and round: 12,000 POST/s for 10 s
POST_SCRIPT = '''
counter = %d
request = function()
  counter = counter + 1
  local name = string.format("f%%d-%%07d.dat", id, counter)
  local body = '{"workflow_name": "bench", "file_path": "' .. name .. '"}'
  return wrk.format("POST", "/api/jobs", {["Content-Type"] = "application/json",
                    ["Authorization"] = "Bearer %s"}, body)
end
setup = function(thread) thread_id = (thread_id or -1) + 1; thread:set("id", thread_id) end
'''
GET_SCRIPT = '''
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer %s"
'''
WORKFLOW = '''
from kernel.config import WorkflowConfig
from kernel.task import BaseProcessor

class Parked(BaseProcessor):
    async def process(self, ctx, task):
        return {}

processor = Parked()
config = WorkflowConfig(enabled=False)  # jobs are created and stay pending: only the API is timed
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def wait_recovered(url: str) -> None:
    """Wait until the server has reconciled its input/ folder (a start with many waiting
    files scans them all): a POST of a missing file answers 404 only once it has."""
    secret = TOKEN.partition(":")[2]
    request = urllib.request.Request(
        f"{url}/api/jobs", data=b'{"workflow_name": "bench", "file_path": "missing.dat"}',
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


def wrk(url: str, seconds: int, script: Path) -> tuple[float, float]:
    """(requests/s, p99 ms) of a wrk run: 2 threads, 16 connections."""
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "-s", str(script),
                          url], check=True, capture_output=True, text=True).stdout
    if "Non-2xx" in out or "MULTIFLOW_BENCH_DEBUG" in os.environ:
        print(f"warning: {url} answered errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    value, unit = float(p99.group(1)), p99.group(2)
    return rate, value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def start_multiflow(root: Path, port: int, files: int) -> subprocess.Popen[bytes]:
    package = root / "workflows" / "bench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(WORKFLOW)
    inbox = root / "data" / "bench" / "input"
    inbox.mkdir(parents=True)
    for thread in range(2):
        for i in range(1, files + 1):
            (inbox / f"f{thread}-{i:07d}.dat").write_bytes(b"x")
    env = {**os.environ, "MULTIFLOW_API_TOKENS": TOKEN, "MULTIFLOW_WATCHERS": "false",
           "MULTIFLOW_RATE_LIMIT_PER_S": "1000000", "MULTIFLOW_RATE_LIMIT_BURST": "1000000",
           "MULTIFLOW_LOG_LEVEL": "warning", "MULTIFLOW_WORKFLOWS_DIR": str(root / "workflows"),
           "MULTIFLOW_DATA_DIR": str(root / "data")}
    return subprocess.Popen([sys.executable, "-c", "from adapters.cli import main; main()",
                             "run", "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_bare(root: Path, port: int) -> subprocess.Popen[bytes]:
    (root / "bare_app.py").write_text(BARE_APP)
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                             "--log-level", "warning", "--no-access-log"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


Run = tuple[float, float]  # (requests/s, p99 ms)


def one_round(root: Path, number: int, seconds: int, ports: tuple[int, int]
              ) -> dict[str, Run]:
    """bare POST, multiflow POST, bare GET, multiflow GET; files of round `number` only."""
    secret = TOKEN.partition(":")[2]
    post_script, get_script = root / f"post{number}.lua", root / "get.lua"
    post_script.write_text(POST_SCRIPT % (number * FILES_PER_ROUND, secret))
    get_script.write_text(GET_SCRIPT % secret)
    bare, ours = (f"http://127.0.0.1:{port}" for port in ports)
    runs = {"bare_post": wrk(f"{bare}/api/jobs", seconds, post_script),
            "post": wrk(f"{ours}/api/jobs", seconds, post_script)}
    request = urllib.request.Request(f"{ours}/api/jobs?limit=1",
                                     headers={"Authorization": f"Bearer {secret}"})
    listing = urllib.request.urlopen(request).read()
    job_id = re.search(rb'"id":"([^"]+)"', listing)
    assert job_id is not None, f"the POST run created no job: {listing[:300]!r}"
    runs["bare_get"] = wrk(f"{bare}/api/jobs/x", seconds, get_script)
    runs["get"] = wrk(f"{ours}/api/jobs/{job_id.group(1).decode()}", seconds, get_script)
    return runs


def report(rounds: list[dict[str, Run]]) -> None:
    def median(key: str, index: int) -> float:
        return statistics.median(r[key][index] for r in rounds)

    def ratio(key: str) -> float:
        return statistics.median(r[key][0] / r[f"bare_{key}"][0] for r in rounds)

    print(f"medians of {len(rounds)} rounds:")
    print(f"bare Starlette POST: {median('bare_post', 0):,.0f} req/s, "
          f"p99 {median('bare_post', 1):.1f} ms")
    print(f"POST /api/jobs:      {median('post', 0):,.0f} req/s, p99 {median('post', 1):.1f} ms "
          f"(ratio {ratio('post'):.2f}x; target >= 0.5x, p99 <= 25 ms)")
    print(f"bare Starlette GET:  {median('bare_get', 0):,.0f} req/s, "
          f"p99 {median('bare_get', 1):.1f} ms")
    print(f"GET /api/jobs/{{id}}:  {median('get', 0):,.0f} req/s, p99 {median('get', 1):.1f} ms "
          f"(ratio {ratio('get'):.2f}x; target >= 0.6x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian package wrk)")
    rounds: list[dict[str, Run]] = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()
        ports = free_port(), free_port()
        bare = start_bare(root, ports[0])
        ours = start_multiflow(root, ports[1], files=args.rounds * FILES_PER_ROUND)
        try:
            wait_ready(f"http://127.0.0.1:{ports[0]}/api/jobs/x")
            wait_ready(f"http://127.0.0.1:{ports[1]}/livez")
            wait_recovered(f"http://127.0.0.1:{ports[1]}")
            for number in range(args.rounds):
                runs = one_round(root, number, args.seconds, ports)
                rounds.append(runs)
                print(f"round {number + 1}: " + ", ".join(
                    f"{key} {rate:,.0f} req/s p99 {p99:.1f} ms" for key, (rate, p99) in
                    runs.items()))
        finally:
            for process in (bare, ours):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    report(rounds)


if __name__ == "__main__":
    main()
