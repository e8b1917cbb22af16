"""Path rules of a job's file: names that fit the filesystem whatever their length."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from kernel.layout import NAME_MAX, REPORT_SUFFIX, duplicate_path, fit_name, stored_name

ID = "06H2NES52GXMCB0WR9XKR11DNM"


class FileOf:
    """What the path rules read of a job."""

    def __init__(self, name: str) -> None:
        self.id, self.workflow_name, self.file_path = ID, "wf", f"wf/input/{name}"


def job(name: str) -> FileOf:
    return FileOf(name)


def test_a_name_that_fits_is_kept_as_it_is() -> None:
    assert stored_name(job("report.csv")) == f"{ID}--report.csv"
    assert fit_name("x" * 20, 20) == "x" * 20


def test_a_long_name_keeps_its_extension_and_whole_characters() -> None:
    name = "báo cáo tài chính quý ba " * 12 + ".xlsx"
    stored = stored_name(job(name))
    assert len((stored + REPORT_SUFFIX).encode()) <= NAME_MAX
    assert stored.startswith(f"{ID}--báo cáo") and stored.endswith("~.xlsx")
    assert "\ufffd" not in stored  # no character cut in half


@given(st.text(min_size=1, max_size=300).filter(lambda n: "/" not in n))
def test_every_stored_name_and_its_report_fit_one_path_segment(name: str) -> None:
    assert len((stored_name(job(name)) + REPORT_SUFFIX).encode("utf-8", "surrogateescape")) \
        <= NAME_MAX
    at = datetime(2026, 11, 30, tzinfo=UTC)
    kept = duplicate_path(job(name), name, at).rpartition("/")[2]
    assert len(kept.encode("utf-8", "surrogateescape")) <= NAME_MAX


def test_bytes_that_are_not_utf8_stay_the_bytes_they_are() -> None:
    name = "\udcff" * 300 + ".csv"  # os.fsdecode of b"\xff" * 300 + b".csv"
    fitted = fit_name(name, 100).encode("utf-8", "surrogateescape")
    assert fitted == b"\xff" * 95 + b"~.csv"
