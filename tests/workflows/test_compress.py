"""compress end to end: gzip round trip, sha256 manifest, progress, nothing left on failure."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

import workflows.compress as compress
from adapters import Kernel
from kernel.decide import Rejected
from kernel.events import JobProgress
from kernel.state import Status
from kernel.task import JobContext, JobError
from workflows.compress.processor import CompressProcessor
from workflows.compress.services.gzip_stream import Compressed

from .kit import Paced, drop, fast_config, no_files_left, run_file, wait_running_with_progress

pytestmark = pytest.mark.anyio


def mixed_bytes(size_bytes: int, seed: int = 3) -> bytes:
    """Half text (compressible), half random bytes, interleaved in 64 KiB runs."""
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"\n"]
    parts: list[bytes] = []
    while sum(map(len, parts)) < size_bytes:
        parts.append(b" ".join(rnd.choice(words) for _ in range(11_000))[:65_536])
        parts.append(rnd.randbytes(65_536))
    return b"".join(parts)[:size_bytes]


async def test_gzip_round_trip_manifest_and_result(tmp_path: Path) -> None:
    """The .gz inflates to the input; the manifest is sha256sum's format; digests match."""
    content = mixed_bytes(3 * 1024 * 1024 + 17)
    done = await run_file(tmp_path, "compress", compress, "data.bin", content,
                          params={"level": 6})
    assert done.job.status is Status.COMPLETED, done.job.error
    gz = tmp_path / "compress/output/data.bin.gz"
    assert gzip.decompress(gz.read_bytes()) == content
    gz_sha256 = hashlib.sha256(gz.read_bytes()).hexdigest()
    manifest = (tmp_path / "compress/output/data.bin.gz.sha256").read_text()
    assert manifest == f"{gz_sha256}  data.bin.gz\n"
    assert done.job.result == {
        "level": 6, "size_bytes": len(content), "gz_size_bytes": gz.stat().st_size,
        "ratio": round(gz.stat().st_size / len(content), 6),
        "sha256": hashlib.sha256(content).hexdigest(), "gz_sha256": gz_sha256,
        "verified": True}
    assert done.job.output_paths == ("compress/output/data.bin.gz",
                                     "compress/output/data.bin.gz.sha256")
    assert (tmp_path / done.job.current_path).read_bytes() == content
    assert done.job.current_path.startswith("compress/archive/")
    fractions = [e.fraction for e in done.events if isinstance(e, JobProgress)]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
async def test_the_manifest_checks_with_sha256sum_in_a_subfolder(tmp_path: Path) -> None:
    """`sha256sum -c` accepts the manifest beside the .gz, for a file submitted in a subfolder."""
    done = await run_file(tmp_path, "compress", compress, "2026/jan/report.csv",
                          b"a,b\n1,2\n" * 5000)
    folder = tmp_path / "compress/output/2026/jan"
    check = await anyio.run_process(["sha256sum", "-c", "report.csv.gz.sha256"], cwd=folder,
                                    check=False)
    assert done.job.status is Status.COMPLETED
    assert check.returncode == 0 and check.stdout == b"report.csv.gz: OK\n"


@pytest.mark.parametrize("level", [1, 9])
async def test_every_level_round_trips(tmp_path: Path, level: int) -> None:
    """Levels 1 and 9 both round-trip; an empty file too."""
    content = b"" if level == 1 else mixed_bytes(200_000)
    done = await run_file(tmp_path, "compress", compress, "x.txt", content,
                          params={"level": level})
    gz = (tmp_path / "compress/output/x.txt.gz").read_bytes()
    assert done.job.status is Status.COMPLETED and gzip.decompress(gz) == content
    assert done.job.result is not None and done.job.result["level"] == level
    assert done.job.result["ratio"] == (None if not content else round(len(gz) / len(content), 6))


@pytest.mark.parametrize("params", [{"level": 0}, {"level": 10}, {"level": "9"}])
async def test_bad_levels_are_refused_at_submit(tmp_path: Path, params: dict[str, Any]) -> None:
    """The level is an int in 1..9."""
    drop(tmp_path, "compress", "a.txt", b"a")
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("compress", compress.processor, config=compress.config)
        with pytest.raises(Rejected):
            await kernel.submit("compress", "a.txt", params=params)


class FailingVerify(CompressProcessor):
    """A compress whose round-trip check finds a mismatch (as a damaged disk would)."""

    def _verify(self, ctx: JobContext, path: Path, gz_name: str, result: Compressed) -> None:
        raise JobError("VerifyFailed", "simulated mismatch", retryable=False)


class ManifestContext:
    """A context whose manifest write fails (a full disk at the worst moment)."""

    def __init__(self, inner: JobContext) -> None:
        self._inner = inner

    def open_output(self, name: str, mode: str = "wb") -> Any:
        """Fail for the manifest, delegate otherwise."""
        if name.endswith(".sha256"):
            raise OSError(28, "No space left on device")
        return self._inner.open_output(name, mode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FailingManifest(CompressProcessor):
    """A compress whose manifest cannot be written."""

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return super().process(ManifestContext(ctx), task)


@pytest.mark.parametrize(("processor", "error_type"), [
    (FailingVerify(), "VerifyFailed"), (FailingManifest(), "OSError")])
async def test_a_failure_after_the_gz_was_written_removes_it(
        tmp_path: Path, processor: CompressProcessor, error_type: str) -> None:
    """If verify or the manifest fails, the .gz already written is removed: no half result."""
    done = await run_file(tmp_path, "compress", compress, "a.bin", mixed_bytes(300_000),
                          processor=processor, config=fast_config(compress, max_attempts=2))
    assert done.job.status is Status.FAILED
    assert done.job.error is not None and done.job.error.type == error_type
    assert done.outputs("compress") == []
    assert (tmp_path / f"{done.job.current_path}.error.json").exists()


async def test_cancelling_mid_compress_leaves_nothing(tmp_path: Path) -> None:
    """A cancel between chunks removes the partial .gz (the atomic writer's temp file)."""
    drop(tmp_path, "compress", "big.bin", os.urandom(12 * 1024 * 1024))
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("compress", Paced(compress.processor),
                                 config=fast_config(compress))
        job = await kernel.submit("compress", "big.bin")
        await wait_running_with_progress(kernel, job.id)
        await kernel.cancel(job.id, actor="test")
        done = await kernel.wait(job.id, timeout_s=30)
        left = await no_files_left(tmp_path / "compress/output")
    assert done.status is Status.CANCELLED and left == []
    history = json.loads((tmp_path / f"{done.current_path}.error.json").read_text())
    assert history["status"] == "cancelled"


async def test_a_failed_job_leaves_an_earlier_jobs_outputs_of_the_same_name(
        tmp_path: Path) -> None:
    """report.txt dropped again, and this second job fails its verify: the first job's
    report.txt.gz and its manifest stay as they were (the second's clean-up deleted the
    first's manifest, and its unverified .gz had replaced the first's)."""
    first = await run_file(tmp_path, "compress", compress, "report.txt",
                           b"first report\n" * 999, processor=compress.processor)
    assert first.job.status is Status.COMPLETED
    before = {p: (tmp_path / p).read_bytes() for p in first.job.output_paths}
    assert sorted(before) == ["compress/output/report.txt.gz",
                              "compress/output/report.txt.gz.sha256"]
    second = await run_file(tmp_path, "compress", compress, "report.txt", b"second\n" * 999,
                            processor=FailingVerify(), config=fast_config(compress))
    assert second.job.status is Status.FAILED
    assert {p: (tmp_path / p).read_bytes() for p in first.job.output_paths} == before
