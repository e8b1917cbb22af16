"""Settings of csv_summary; [workflows.csv_summary] in multiflow.toml overrides them."""

from kernel.config import WorkflowConfig

# A chunk is parsed between progress reports and cancellation checks: at most CHUNK_CELLS
# cells and about CHUNK_BYTES of text (sized from the previous chunk's rows), so memory
# is a chunk plus one row, and a row is bounded by csv's field limit (128 KiB) per column.
CHUNK_CELLS = 100_000
CHUNK_BYTES = 4 * 1024 * 1024
FIRST_CHUNK_ROWS = 64  # until the size of a row is known
COLUMNS_MAX = 512  # a wider file is refused: every column keeps two bounded sketches
DISTINCT_SKETCH_K = 4096  # KMV hashes kept per column: exact below, ~1.6% error above
TOP_COUNTERS_TOTAL = 65_536  # Misra-Gries counters over all columns (exact below, per column)
TOP_COUNTERS_MAX = 1024  # per column: a column of up to 1024 distinct values is counted exactly
TOP_VALUE_CHARS_MAX = 200  # longer values are counted by their first 200 characters



def top_counters(columns: int, top_k: int) -> int:
    """Counters per column: many for a narrow file, never fewer than 4 per reported value."""
    return max(4 * top_k, min(TOP_COUNTERS_MAX, TOP_COUNTERS_TOTAL // max(1, columns)))


config = WorkflowConfig(
    timeout_s=3 * 3600.0,  # a 10 GB file at ~20 MB/s takes ~9 minutes; leave headroom
    max_attempts=3,
    max_size_bytes=50 * 1024**3,  # memory does not grow with the file; disk is the limit
    # CSV has no magic bytes: any file whose content reads as text passes intake, binary
    # files are refused (TypeNotAllowed), and the parser judges the rest (BadCsv).
    allowed_types=("text/*",),
    # thread: a worker thread sees ctx.cancelled between chunks; the pure-Python parse
    # holds the GIL, but the event loop gets it back every switch interval (5 ms), which
    # tests/workflows measures. runner="process" would also shield the loop from the GIL,
    # but the process executor loses JobError (BadCsv would turn retryable): see the report.
    runner="thread",
)
