"""What a compress job does: gzip in chunks, verify the round trip, write the manifest."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kernel.task import BaseProcessor, JobContext, JobError
from workflows.common import submitted_name

from . import models
from .services.gzip_stream import Compressed, OnChunk, gunzip_digest, gzip_file

COMPRESS_SHARE = 0.75  # of the progress bar; the verify pass reads the smaller .gz


class CompressProcessor(BaseProcessor):
    """Writes output/{name}.gz and output/{name}.gz.sha256; nothing if any step fails."""

    Task = models.Task

    def process(self, ctx: JobContext, task: models.Task) -> dict[str, Any]:
        """Compress and verify under a temporary name, publish the .gz, then its manifest.

        The .gz replaces an earlier one of the same name only once it is verified, and a
        failure removes only what this attempt published, never another job's outputs.
        """
        gz_name = f"{submitted_name(ctx.job)}.gz"
        published: list[str] = []
        try:
            result = self._compress_and_verify(ctx, task, gz_name)
            published.append(gz_name)
            with ctx.open_output(f"{gz_name}.sha256", "w") as manifest:
                manifest.write(f"{result.gz_sha256}  {PurePosixPath(gz_name).name}\n")
            published.append(f"{gz_name}.sha256")
            ctx.check_cancelled()  # an abandoned thread's outputs must not outlive its cancel
        except BaseException:
            for name in published:
                (ctx.output_dir / name).unlink(missing_ok=True)
            raise
        ctx.progress(1.0, "verified")
        return _result(task, result)

    def _compress_and_verify(self, ctx: JobContext, task: models.Task, gz_name: str
                             ) -> Compressed:
        size_bytes = max(1, ctx.input_path.stat().st_size)
        # The output appears under its name only when the block ends well: the round trip
        # is checked on the temporary file before that.
        with ctx.open_output(gz_name) as out:
            result = gzip_file(ctx.input_path, out, task.level,
                               _reporter(ctx, 0.0, COMPRESS_SHARE, size_bytes, "compressed"))
            out.flush()
            self._verify(ctx, Path(out.name), gz_name, result)
        return result

    def _verify(self, ctx: JobContext, path: Path, gz_name: str, result: Compressed) -> None:
        on_chunk = _reporter(ctx, COMPRESS_SHARE, 1.0 - COMPRESS_SHARE,
                             max(1, result.gz_size_bytes), "verified")
        try:
            size, sha256 = gunzip_digest(path, on_chunk)
        except ValueError as exc:
            raise JobError("VerifyFailed", f"{gz_name} does not inflate: {exc}") from None
        if (size, sha256) != (result.size_bytes, result.sha256):
            raise JobError("VerifyFailed", f"{gz_name} inflates to {size} bytes with sha256 "
                                           f"{sha256}, not the input's {result.sha256}")


def _reporter(ctx: JobContext, start: float, share: float, total: int, verb: str) -> OnChunk:
    """Between chunks: stop if cancelled, else report progress within [start, start+share]."""

    def on_chunk(done: int) -> None:
        ctx.check_cancelled()
        ctx.progress(start + share * min(1.0, done / total), f"{done} bytes {verb}")

    return on_chunk


def _result(task: models.Task, result: Compressed) -> dict[str, Any]:
    """The job's result: sizes, ratio (compressed / original) and both digests."""
    ratio = result.gz_size_bytes / result.size_bytes if result.size_bytes else None
    return {"level": task.level, "size_bytes": result.size_bytes,
            "gz_size_bytes": result.gz_size_bytes,
            "ratio": None if ratio is None else round(ratio, 6),
            "sha256": result.sha256, "gz_sha256": result.gz_sha256, "verified": True}
