"""csv_summary end to end on generated CSVs, checked against an independent computation."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import workflows.csv_summary as csv_summary
from adapters import Kernel
from kernel.decide import Rejected
from kernel.events import JobProgress
from kernel.state import Status

from .kit import Paced, drop, fast_config, no_files_left, run_file, wait_running_with_progress

pytestmark = pytest.mark.anyio

ROWS = 30_000
CITIES = ["Hanoi", "Hue", "Saigon", "Da Nang", "Can Tho", "Vinh", "Nha Trang"]
DISTINCT_ERROR_MAX = 0.06  # ~4 standard errors of a 4096-value KMV sketch (1/sqrt(4094))


def make_table(seed: int = 5) -> tuple[list[str], list[list[str]]]:
    """A header and rows: ints, floats with gaps, a few cities, many names, a late word."""
    rnd = random.Random(seed)
    header = ["id", "price", "city", "name", "code", "blank"]
    rows = []
    for i in range(ROWS):
        price = "" if i % 17 == 0 else f"{rnd.uniform(-50, 950):.2f}"
        code = "n/a" if i == ROWS - 3 else str(rnd.randrange(100))  # numeric until the end
        rows.append([str(1000 + i), price, rnd.choice(CITIES), f"user{rnd.randrange(9000)}",
                     code, ""])
    return header, rows


def encode(header: list[str] | None, rows: list[list[str]], delimiter: str = ",",
           encoding: str = "utf-8") -> bytes:
    """The table as CSV bytes, written by the csv module."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, delimiter=delimiter)
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue().encode(encoding)


def column(rows: list[list[str]], index: int) -> list[str]:
    """One column's cells (the oracle works on the generated data, not on our parser)."""
    return [row[index] for row in rows]


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The summary's column profiles by column name."""
    return {profile["name"]: profile for profile in summary["columns"]}


def assert_distinct(profile: dict[str, Any], truth: int) -> None:
    """Exact below the sketch size, else within the stated error."""
    if profile["distinct_exact"]:
        assert profile["distinct"] == truth
    else:
        assert abs(profile["distinct"] - truth) <= DISTINCT_ERROR_MAX * truth, (profile, truth)


def expected_top(cells: list[str], k: int) -> list[dict[str, Any]]:
    """The k most frequent non-empty values, ties by value."""
    counts = Counter(cell for cell in cells if cell)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [{"value": value, "count": count} for value, count in ranked]


async def test_profile_matches_an_independent_computation(tmp_path: Path) -> None:
    """Counts, nulls, min/max/mean, top values and distinct estimates match the generated data."""
    header, rows = make_table()
    done = await run_file(tmp_path, "csv_summary", csv_summary, "sales.csv", encode(header, rows),
                          params={"top_k": 5})
    assert done.job.status is Status.COMPLETED, done.job.error
    summary = json.loads((tmp_path / "csv_summary/output/sales.csv.summary.json").read_text())
    assert summary["rows"] == ROWS and summary["file"] == "sales.csv"
    assert done.job.result == {"rows": ROWS, "columns": 6, "size_bytes": summary["size_bytes"]}
    profiles = by_name(summary)
    ids = [int(cell) for cell in column(rows, 0)]
    assert profiles["id"] | {"distinct": 0, "distinct_exact": False} == {
        "name": "id", "kind": "numeric", "count": ROWS, "nulls": 0, "distinct": 0,
        "distinct_exact": False, "min": min(ids), "max": max(ids), "mean": sum(ids) / ROWS}
    assert_distinct(profiles["id"], ROWS)
    prices = [float(cell) for cell in column(rows, 1) if cell]
    price = profiles["price"]
    assert (price["kind"], price["count"], price["nulls"]) == \
        ("numeric", len(prices), ROWS - len(prices))
    assert (price["min"], price["max"]) == (min(prices), max(prices))
    assert math.isclose(price["mean"], math.fsum(prices) / len(prices), rel_tol=1e-12)
    assert_distinct(price, len(set(column(rows, 1)) - {""}))
    city = profiles["city"]
    assert (city["kind"], city["distinct"], city["distinct_exact"]) == ("text", 7, True)
    assert city["top"] == expected_top(column(rows, 2), 5) and "top_error_max" not in city
    assert_distinct(profiles["name"], len(set(column(rows, 3))))
    assert profiles["code"]["kind"] == "text"  # one word among numbers makes a column text
    assert profiles["blank"] == {"name": "blank", "kind": "empty", "count": 0, "nulls": ROWS,
                                 "distinct": 0, "distinct_exact": True}
    assert done.job.output_paths == ("csv_summary/output/sales.csv.summary.json",)
    assert done.job.current_path.startswith("csv_summary/archive/")
    assert (tmp_path / done.job.current_path).read_bytes() == encode(header, rows)
    assert done.kinds()[:2] == ["JobCreated", "JobStarted"]
    assert done.kinds()[-1] == "JobCompleted"
    fractions = [e.fraction for e in done.events if isinstance(e, JobProgress)]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0


async def test_top_values_are_exact_while_the_column_fits_the_counters(tmp_path: Path) -> None:
    """A text column of a few hundred values gets exact top counts and no error bound."""
    rnd = random.Random(11)
    rows = [[f"sku-{rnd.randrange(300):03d}"] for _ in range(20_000)]
    done = await run_file(tmp_path, "csv_summary", csv_summary, "skus.csv",
                          encode(["sku"], rows), params={"top_k": 100})
    profile = by_name(json.loads(
        (tmp_path / "csv_summary/output/skus.csv.summary.json").read_text()))["sku"]
    assert done.job.status is Status.COMPLETED
    assert profile["top"] == expected_top(column(rows, 0), 100)
    assert "top_error_max" not in profile


async def test_no_header_other_delimiter_latin1_and_short_rows(tmp_path: Path) -> None:
    """has_header=false names columns column_N; missing trailing cells count as nulls."""
    content = "Zoë;1.5;x\nJosé;2.5\n\nAnaïs;-3;y\n".encode("latin-1")
    done = await run_file(tmp_path, "csv_summary", csv_summary, "people.txt", content,
                          params={"has_header": False, "delimiter": ";",
                                  "encoding": "latin-1"})
    assert done.job.status is Status.COMPLETED, done.job.error
    summary = json.loads((tmp_path / "csv_summary/output/people.txt.summary.json").read_text())
    assert (summary["rows"], summary["short_rows"]) == (3, 1)
    profiles = by_name(summary)
    assert [p["name"] for p in summary["columns"]] == ["column_1", "column_2", "column_3"]
    assert [t["value"] for t in profiles["column_1"]["top"]] == ["Anaïs", "José", "Zoë"]
    assert (profiles["column_2"]["min"], profiles["column_2"]["max"]) == (-3, 2.5)
    assert profiles["column_2"]["mean"] == pytest.approx(1.0 / 3)
    assert (profiles["column_3"]["count"], profiles["column_3"]["nulls"]) == (2, 1)


async def test_an_empty_file_and_a_header_only_file_profile_to_zero_rows(tmp_path: Path) -> None:
    """Zero rows is a summary, not a failure."""
    done = await run_file(tmp_path, "csv_summary", csv_summary, "h.csv", b"a,b\n")
    summary = json.loads((tmp_path / "csv_summary/output/h.csv.summary.json").read_text())
    assert done.job.status is Status.COMPLETED
    assert summary["rows"] == 0 and [c["kind"] for c in summary["columns"]] == ["empty"] * 2


@pytest.mark.parametrize(("content", "where"), [
    (b'a,b\n1,"two"x\n', "line 2"),  # a quote closed in the middle of a field
    (b"a,b\n1,2\n3,4,5\n", "data row 2 has 3 fields"),
    (b"a,b\n1,\xff\xfe\n", "not utf-8"),
], ids=["quoting", "long-row", "encoding"])
async def test_malformed_csv_fails_finally_as_badcsv(tmp_path: Path, content: bytes,
                                                    where: str) -> None:
    """BadCsv is final at once: one attempt, file in error/ with its reason, no output."""
    done = await run_file(tmp_path, "csv_summary", csv_summary, "bad.csv", content)
    assert done.job.status is Status.FAILED and done.job.attempts == 1
    assert done.job.error is not None and done.job.error.type == "BadCsv"
    assert where in done.job.error.message
    assert done.job.current_path.startswith("csv_summary/error/")
    report = json.loads((tmp_path / f"{done.job.current_path}.error.json").read_text())
    assert report["error_type"] == "BadCsv"
    assert done.outputs("csv_summary") == []


async def test_a_binary_file_is_refused_at_intake(tmp_path: Path) -> None:
    """A file whose content is not text never reaches the parser: TypeNotAllowed, final."""
    done = await run_file(tmp_path, "csv_summary", csv_summary, "x.csv",
                          b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert done.job.status is Status.FAILED and done.job.attempts == 0
    assert done.job.error is not None and done.job.error.type == "TypeNotAllowed"


@pytest.mark.parametrize("params", [
    {"top_k": 0}, {"top_k": 101}, {"delimiter": ";;"}, {"delimiter": '"'},
    {"encoding": "no-such-codec"}, {"has_header": "yes"}, {"unknown": 1},
])
async def test_bad_params_are_refused_at_submit(tmp_path: Path, params: dict[str, Any]) -> None:
    """Parameters are typed and bounded: a bad one is refused before any job exists."""
    drop(tmp_path, "csv_summary", "a.csv", b"a\n1\n")
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("csv_summary", csv_summary.processor,
                                 config=csv_summary.config)
        with pytest.raises(Rejected) as refused:
            await kernel.submit("csv_summary", "a.csv", params=params)
        assert (await kernel.list_jobs()).items == []
    assert refused.value.code == "invalid"


async def test_cancelling_a_long_csv_mid_job_leaves_no_output(tmp_path: Path) -> None:
    """A cancel between chunks stops the job; no summary (nor temporary file) is left."""
    header, rows = make_table()
    drop(tmp_path, "csv_summary", "long.csv", encode(header, rows * 4))
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("csv_summary", Paced(csv_summary.processor, pace_s=0.5),
                                 config=fast_config(csv_summary))
        job = await kernel.submit("csv_summary", "long.csv")
        running = await wait_running_with_progress(kernel, job.id)
        await kernel.cancel(job.id, actor="test", reason="wrong file")
        done = await kernel.wait(job.id, timeout_s=30)
        left = await no_files_left(tmp_path / "csv_summary/output")
    assert 0 < running.progress < 1
    assert done.status is Status.CANCELLED and left == []
    assert done.current_path.startswith("csv_summary/error/")


async def test_two_files_of_one_stem_keep_a_summary_each(tmp_path: Path) -> None:
    """sales.csv and sales.tsv: outputs are named after the whole input name, so neither
    summary replaces the other (both were output/sales.summary.json)."""
    a = await run_file(tmp_path, "csv_summary", csv_summary, "sales.csv", b"region,n\nnorth,1\n")
    b = await run_file(tmp_path, "csv_summary", csv_summary, "sales.tsv", b"sku\tqty\nx1\t5\n",
                       params={"delimiter": "\t"})
    assert a.job.status is Status.COMPLETED and b.job.status is Status.COMPLETED
    assert a.job.output_paths == ("csv_summary/output/sales.csv.summary.json",)
    assert b.job.output_paths == ("csv_summary/output/sales.tsv.summary.json",)
    assert all((tmp_path / p).is_file() for p in a.job.output_paths + b.job.output_paths)


@pytest.mark.parametrize("content", [b"", b"\n\n\r\n"], ids=["empty", "blank-lines"])
async def test_an_empty_file_is_a_summary_of_no_rows(tmp_path: Path, content: bytes) -> None:
    """No rows, no columns: a summary, not a ZeroDivisionError retried as if transient."""
    done = await run_file(tmp_path, "csv_summary", csv_summary, "empty.csv", content)
    assert done.job.status is Status.COMPLETED, done.job.error
    summary = json.loads((tmp_path / "csv_summary/output/empty.csv.summary.json").read_text())
    assert (summary["rows"], summary["columns"]) == (0, [])


async def test_a_field_longer_than_pythons_default_limit_is_read(tmp_path: Path) -> None:
    """One quoted field of 1 MiB (an HTML body, a base64 image) is a cell like any other
    (csv's default limit of 128 KiB failed the file as BadCsv)."""
    body = "x" * (1024 * 1024)
    content = f'id,body\n1,"{body}"\n2,short\n'.encode()
    done = await run_file(tmp_path, "csv_summary", csv_summary, "pages.csv", content)
    assert done.job.status is Status.COMPLETED, done.job.error
    assert done.job.result == {"rows": 2, "columns": 2, "size_bytes": len(content)}
