"""docs/workflows.md, followed step by step: scaffold, start, drop a file, see it complete."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "from adapters.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_tutorial_from_zero_to_a_completed_job(tmp_path: Path) -> None:
    """The steps of docs/workflows.md work as written, against the real server."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "MULTIFLOW_API_TOKENS": "me:tutorial-token"}
    # Step 1: scaffold
    subprocess.run([*CLI, "new-workflow", "wordcount"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    assert (tmp_path / "workflows/wordcount/processor.py").is_file()
    # Step 2: its own test passes at once
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "workflows/wordcount/tests"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    # Step 3: start the server
    port = free_port()
    server = subprocess.Popen([*CLI, "run", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.1)
        names = [w["name"] for w in get(f"{base}/api/workflows", "tutorial-token")]
        assert "wordcount" in names
        # Step 4: drop a file into the hot folder
        inbox = tmp_path / "data/wordcount/input"
        (tmp_path / "hello.txt").write_text("one two\nthree\n")
        os.rename(tmp_path / "hello.txt", inbox / "hello.txt")
        # Step 5: see it complete
        deadline = time.monotonic() + 30
        while True:
            items = get(f"{base}/api/jobs?workflow_name=wordcount", "tutorial-token")["items"]
            if items and items[0]["status"] == "completed":
                break
            assert time.monotonic() < deadline, f"no completed job: {items}"
            time.sleep(0.2)
        assert items[0]["result"] == {"lines": 2, "words": 3}
        assert (tmp_path / "data/wordcount/output/hello.txt.summary.json").is_file()
    except BaseException:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        print(output[-6000:])  # the server's own account, shown with the failure
        raise
    server.send_signal(signal.SIGTERM)
    output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
