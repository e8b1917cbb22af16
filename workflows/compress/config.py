"""Settings of compress; [workflows.compress] in multiflow.toml overrides them."""

from kernel.config import WorkflowConfig

CHUNK_BYTES = 1024 * 1024  # read, compress, hash and report progress per MiB
INFLATE_BYTES_MAX = 4 * CHUNK_BYTES  # the verify pass never holds more than this inflated

config = WorkflowConfig(
    timeout_s=4 * 3600.0,  # level 9 on a large, poorly compressible file is slow
    max_attempts=3,
    max_size_bytes=64 * 1024**3,  # memory stays at a few MiB whatever the size
    allowed_types=(),  # any file can be compressed
    # thread, measured against process: zlib and hashlib release the GIL on MiB-sized
    # chunks, so a thread compresses at the same speed and the event loop keeps answering
    # (tests/workflows checks 50 status reads during a level-9 job). A thread also sees
    # ctx.cancelled between chunks and removes what it wrote, which a killed worker
    # process cannot; and the process executor loses JobError (see the report).
    runner="thread",
)
