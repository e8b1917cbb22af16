"""Settings of thumbnail; [workflows.thumbnail] in multiflow.toml overrides them."""

from kernel.config import WorkflowConfig

# Decompression bombs: a few KB of PNG can claim 100000x100000 pixels (30 GB decoded).
# Images over this many pixels are refused at intake. It stays under Pillow's own
# MAX_IMAGE_PIXELS (~89.5 M), so Pillow's warning never fires on a file we accepted.
PIXELS_MAX = 64_000_000  # 8000 x 8000; a 48 MP camera photo passes

config = WorkflowConfig(
    concurrency=2,  # a decoded 64 MP image is ~256 MB: bound how many decode at once
    timeout_s=120.0,
    max_attempts=2,
    max_size_bytes=100 * 1024**2,
    allowed_types=("image/jpeg", "image/png", "image/webp"),  # by content, at intake
    # thread: Pillow decodes and resamples with the GIL released, so a thread is as fast
    # as a process and sees ctx.cancelled. A worker process would also isolate a decoder
    # crash, but the process executor loses JobError today (see the report).
    runner="thread",
)
