"""Child process of test_csv_memory: profile one CSV through a Kernel, print peak RSS as JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio

import workflows.csv_summary as csv_summary
from adapters import Kernel

from .kit import fast_config


def peak_rss_kb() -> int:
    """This process's high-water mark of resident memory (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


async def profile(data_dir: Path, name: str) -> dict[str, object]:
    """Submit the file to csv_summary and wait for the job."""
    started_s = time.monotonic()
    async with Kernel.open(store="memory://", data_dir=data_dir) as kernel:
        kernel.register_workflow("csv_summary", csv_summary.processor,
                                 config=fast_config(csv_summary, timeout_s=600.0))
        job = await kernel.submit("csv_summary", name)
        done = await kernel.wait(job.id, timeout_s=600)
    return {"status": str(done.status), "result": done.result,
            "error": None if done.error is None else done.error.message,
            "seconds": round(time.monotonic() - started_s, 2), "peak_rss_kb": peak_rss_kb()}


if __name__ == "__main__":
    print(json.dumps(anyio.run(profile, Path(sys.argv[1]), sys.argv[2])))
