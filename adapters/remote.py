"""`multiflow watch`: watch a folder on another machine and upload complete files to the API.

Each upload carries an `Idempotency-Key` made from the file's sha256, size, mtime and
name, so a retry after a lost answer returns the job it already made. On 201 or 200 the
local file moves
to `sent/`; on any failure it stays where it is and is tried again with backoff.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.parse
from pathlib import Path

import anyio
import structlog

from adapters.fsutil import move
from adapters.watch import LATER, WatchfilesWatcher, sha256_of
from kernel.config import WorkflowConfig

log = structlog.get_logger("multiflow.remote")
BACKOFF_MAX_S = 300.0
TIMEOUT_S = 60.0


class UploadFailed(Exception):
    """The server did not take the file (network error or a non-2xx answer)."""


class RemoteUploader:
    """Uploads one file to `POST {url}/api/{workflow}/process` and files it under sent/."""

    def __init__(self, url: str, workflow_name: str, folder: Path, token: str | None,
                 priority: int = 0, channel_name: str | None = None) -> None:
        self.base = urllib.parse.urlsplit(url.rstrip("/"))
        if self.base.scheme not in ("http", "https") or not self.base.netloc:
            raise ValueError(f"--url must be http(s)://host[:port], got {url!r}")
        self.workflow_name = workflow_name
        self.folder = folder
        self.token = token
        self.priority = priority
        self.channel_name = channel_name
        self.sent = folder / "sent"
        self.failures: dict[str, tuple[int, float]] = {}  # name -> (failures, retry at)

    async def __call__(self, name: str, completeness: str, key: str | None) -> str | None:
        """The watcher's submit: upload, move to sent/, or leave the file for a retry."""
        failures, retry_at = self.failures.get(name, (0, 0.0))
        if time.monotonic() < retry_at:
            return LATER  # the file (and its marker) wait for the next try
        try:
            job_id = await anyio.to_thread.run_sync(self.upload, name)
        except (UploadFailed, OSError) as exc:
            delay_s = min(BACKOFF_MAX_S, 2.0 ** failures)
            self.failures[name] = (failures + 1, time.monotonic() + delay_s)
            log.warning("upload_failed", name=name, error=str(exc), retry_in_s=delay_s)
            return LATER
        self.failures.pop(name, None)
        return job_id

    def upload(self, name: str) -> str:
        """Send the file (streamed) and move it to sent/ once the server has its job."""
        path = self.folder / name
        info = path.stat()
        # The key names this drop of this file: a retry after a lost answer gets the job it
        # made, while the same bytes dropped again (another name, another day) are new work.
        digest = hashlib.sha256(
            f"{sha256_of(path)}:{info.st_size}:{info.st_mtime_ns}:{name}".encode()).hexdigest()
        query = {"filename": name, "priority": str(self.priority)}
        if self.channel_name:
            query["channel_name"] = self.channel_name
        target = f"{self.base.path}/api/{self.workflow_name}/process?" + \
            urllib.parse.urlencode(query)
        headers = {"Content-Type": "application/octet-stream", "Idempotency-Key": digest,
                   "Content-Length": str(info.st_size)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        status, body = self._post(target, path, headers)
        if status not in (200, 201):
            raise UploadFailed(f"HTTP {status}: {body[:300]!r}")
        job_id = str(json.loads(body)["id"])
        self.sent.mkdir(exist_ok=True)
        move(path, _free_name(self.sent, name))
        log.info("uploaded", name=name, job_id=job_id, status=status)
        return job_id

    def _post(self, target: str, path: Path, headers: dict[str, str]) -> tuple[int, bytes]:
        kind = http.client.HTTPSConnection if self.base.scheme == "https" else \
            http.client.HTTPConnection
        conn = kind(self.base.netloc, timeout=TIMEOUT_S)
        try:
            with open(path, "rb") as body:
                conn.request("POST", target, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise UploadFailed(str(exc)) from exc
        finally:
            conn.close()


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `name.1`, `name.2` ... when taken: sent files are never overwritten."""
    candidate, n = folder / name, 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{name}.{n}"
    return candidate


async def watch_remote(url: str, workflow_name: str, folder: Path, token: str | None, *,
                       settle_ms: int = 500, marker: bool = False, priority: int = 0,
                       channel_name: str | None = None) -> None:
    """Run the remote watcher until cancelled."""
    await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
    uploader = RemoteUploader(url, workflow_name, folder, token, priority, channel_name)
    config = WorkflowConfig(settle_ms=settle_ms, marker=marker, rescan_interval_s=5.0)
    # A failed upload is not marked submitted: the next rescan (every 5 s) retries it,
    # and the uploader's own backoff decides whether it is time.
    watcher = WatchfilesWatcher(workflow_name, folder, config, uploader)
    log.info("remote_watch_started", url=url, workflow_name=workflow_name, folder=str(folder),
             pid=os.getpid())
    await watcher.run()

