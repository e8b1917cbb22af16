"""Intake checks on real files the tests write: types by magic bytes, completeness, size."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.filetypes import (
    HEAD_BYTES,
    TAIL_BYTES,
    Sample,
    end_checked,
    read_sample,
    sniff,
    truncation,
)
from adapters.intake import IntakeChecker
from kernel.config import WorkflowConfig
from kernel.ports import Refusal, ScannerUnavailable
from kernel.task import BaseProcessor

# -- real files, built byte by byte ------------------------------------------------------


def png_bytes() -> bytes:
    """A 1x1 RGBA PNG: signature, IHDR, IDAT, IEND, each chunk with its CRC."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")  # filter byte, one red pixel
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def pdf_bytes() -> bytes:
    """A one-page PDF with a correct cross-reference table and trailer."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def jpeg_bytes() -> bytes:
    """A JPEG's marker structure: SOI, a JFIF APP0 segment, a comment, entropy data, EOI."""
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    comment = b"multiflow test"
    return (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
            + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
            + bytes(range(1, 200)) + b"\xff\xd9")


def zip_bytes(members: dict[str, bytes] | None = None, comment: bytes = b"") -> bytes:
    """A ZIP archive made by zipfile, with an optional archive comment."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in (members or {"hello.txt": b"hello " * 100}).items():
            archive.writestr(name, data)
        archive.comment = comment
    return buffer.getvalue()


def docx_bytes() -> bytes:
    """A ZIP laid out as a Word document, which `filetype` recognises as docx."""
    return zip_bytes({"[Content_Types].xml": b"<Types/>", "_rels/.rels": b"<Relationships/>",
                      "word/document.xml": b"<w:document/>"})


def gif_bytes() -> bytes:
    """A 1x1 GIF89a: header, two-colour palette, one image, trailer."""
    screen = struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b";"


def webp_bytes() -> bytes:
    """A RIFF/WEBP container with one VP8L chunk; the RIFF size counts every byte after it."""
    payload = b"\x2f\x00\x00\x00\x00" + bytes(15)
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def elf_bytes() -> bytes:
    """The 64-byte header of an x86-64 ELF executable, then some code bytes."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0, 64, 56, 0, 64, 0, 0)
    return ident + header + b"\x90" * 64


def pe_bytes() -> bytes:
    """A DOS stub pointing at a PE header, as every Windows executable starts."""
    dos = bytearray(b"MZ" + bytes(0x3A)) + struct.pack("<I", 0x80)
    return bytes(dos.ljust(0x80, b"\x00")) + b"PE\x00\x00" + struct.pack("<H", 0x8664) + bytes(64)


COMPLETE: dict[str, Callable[[], bytes]] = {
    ".png": png_bytes, ".pdf": pdf_bytes, ".jpg": jpeg_bytes, ".zip": zip_bytes,
    ".docx": docx_bytes, ".gif": gif_bytes, ".webp": webp_bytes,
}


# -- the checker ---------------------------------------------------------------------------


class Plain(BaseProcessor):
    """Accepts every file in `validate_file`."""


class Picky(BaseProcessor):
    """Refuses every file in `validate_file` and records that it was asked."""

    def __init__(self) -> None:
        self.asked: list[Path] = []

    def validate_file(self, path: Path) -> str | None:
        self.asked.append(path)
        return "the workflow does not like it"


class FakeScanner:
    """A scanner that answers from a script and records what it was given."""

    def __init__(self, verdict: Refusal | None = None, *, down: bool = False) -> None:
        self.verdict, self.down = verdict, down
        self.scanned: list[Path] = []

    async def scan_file(self, path: Path) -> Refusal | None:
        self.scanned.append(path)
        if self.down:
            raise ScannerUnavailable("the fake scanner is down")
        return self.verdict


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check(path: Path, processor: BaseProcessor | None = None, **settings: Any) -> Refusal | None:
    config = msgspec.structs.replace(WorkflowConfig(), **settings)
    return IntakeChecker().check(path, config, processor or Plain())


# -- completeness --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(COMPLETE))
def test_complete_files_pass(tmp_path: Path, suffix: str) -> None:
    """A whole PNG, PDF, JPEG, ZIP, docx, GIF and WebP passes type and completeness checks."""
    path = write(tmp_path, f"file{suffix}", COMPLETE[suffix]())
    assert check(path, allowed_types=(suffix,)) is None


@pytest.mark.parametrize("suffix", sorted(COMPLETE))
def test_truncated_files_are_refused(tmp_path: Path, suffix: str) -> None:
    """Each format cut to two thirds of its length is refused as Truncated."""
    data = COMPLETE[suffix]()
    path = write(tmp_path, f"file{suffix}", data[: len(data) * 2 // 3])
    refusal = check(path, allowed_types=(suffix,))
    assert refusal is not None and refusal.error_type == "Truncated"
    assert f"file{suffix}" in refusal.message


def test_png_without_only_its_iend_chunk_is_truncated(tmp_path: Path) -> None:
    """A PNG missing just its 12-byte IEND chunk is Truncated, though sniffers call it PNG."""
    path = write(tmp_path, "image.png", png_bytes()[:-12])
    assert check(path, allowed_types=("image/png",)) == Refusal(
        "Truncated", "image.png (a PNG file (image/png)) is cut short: no IEND chunk at the end")


def test_pdf_needs_eof_in_its_last_kilobyte(tmp_path: Path) -> None:
    """A PDF whose %%EOF is followed by more than 1024 bytes reads as truncated."""
    path = write(tmp_path, "doc.pdf", pdf_bytes() + b" " * 2000)
    refusal = check(path, allowed_types=(".pdf",))
    assert refusal is not None and refusal.error_type == "Truncated"
    assert check(write(tmp_path, "ok.pdf", pdf_bytes() + b"\n" * 100), allowed_types=()) is None


def test_jpeg_with_zero_padding_after_eoi_passes(tmp_path: Path) -> None:
    """Trailing zero padding after a JPEG's EOI marker does not count as truncation."""
    assert check(write(tmp_path, "photo.jpeg", jpeg_bytes() + bytes(300))) is None


def test_zip_with_the_longest_comment_passes_and_its_cut_fails(tmp_path: Path) -> None:
    """The end record is found behind a 65,535-byte comment; one byte less is truncated."""
    data = zip_bytes({"noise.bin": random.Random(7).randbytes(200_000)}, comment=b"c" * 0xFFFF)
    assert check(write(tmp_path, "big.zip", data), allowed_types=(".zip",)) is None
    refusal = check(write(tmp_path, "cut.zip", data[:-1]), allowed_types=(".zip",))
    assert refusal is not None and refusal.error_type == "Truncated"


def test_completeness_is_checked_without_allowed_types(tmp_path: Path) -> None:
    """With no type restriction a truncated PNG is still refused, unless check_complete is off."""
    path = write(tmp_path, "image.png", png_bytes()[:40])
    refusal = check(path)
    assert refusal is not None and refusal.error_type == "Truncated"
    assert check(path, check_complete=False) is None


@pytest.mark.parametrize("suffix", sorted(COMPLETE))
def test_every_truncated_format_is_refused_without_allowed_types(tmp_path: Path,
                                                                 suffix: str) -> None:
    """With every type allowed, a cut file of each checked format is still Truncated (the
    shortcut that skips the full sniff recognises each of them)."""
    data = COMPLETE[suffix]()
    refusal = check(write(tmp_path, f"file{suffix}", data[: len(data) * 2 // 3]))
    assert refusal is not None and refusal.error_type == "Truncated"
    assert end_checked(data[:HEAD_BYTES])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(COMPLETE)), st.integers(0, 64), st.binary(max_size=64),
       st.booleans())
def test_a_head_no_checked_format_accepts_has_no_end_to_check(
    suffix: str, cut: int, noise: bytes, prefix: bool
) -> None:
    """Whenever `end_checked` says no, the full sniff names no format whose end is checked:
    heads made of real formats' first bytes, cut short and followed or led by noise."""
    head = COMPLETE[suffix]()[:cut]
    head = head + noise if prefix else noise + head
    sample = Sample(head, head, len(head))
    assert end_checked(head) or truncation(sniff(sample, f"f{suffix}"), sample) is None


def test_sample_reads_only_head_and_tail(tmp_path: Path) -> None:
    """Intake reads a bounded head and tail of a large file, never the whole of it."""
    data = random.Random(1).randbytes(3 * 1024**2)
    sample = read_sample(write(tmp_path, "big.bin", data))
    assert sample.head == data[:HEAD_BYTES] and len(sample.head) == HEAD_BYTES
    assert sample.tail == data[-TAIL_BYTES:] and sample.size_bytes == len(data)


# -- types by magic bytes and extension ----------------------------------------------------


@pytest.mark.parametrize(("make", "what"), [(elf_bytes, "an ELF executable"),
                                            (pe_bytes, "a Windows PE executable")])
def test_executable_named_pdf_is_refused(tmp_path: Path, make: Callable[[], bytes],
                                         what: str) -> None:
    """An ELF or PE executable named .pdf is TypeNotAllowed, and the message says what it is."""
    refusal = check(write(tmp_path, "invoice.pdf", make()), allowed_types=(".pdf",))
    assert refusal is not None and refusal.error_type == "TypeNotAllowed"
    assert refusal.message.startswith(f"invoice.pdf is really {what}")


@pytest.mark.parametrize("allowed", [(".png",), ("image/*",), (".png", "application/zip")])
def test_zip_named_png_is_refused(tmp_path: Path, allowed: tuple[str, ...]) -> None:
    """A ZIP named .png is refused even when ZIP itself is allowed: name and content disagree."""
    refusal = check(write(tmp_path, "cat.png", zip_bytes()), allowed_types=allowed)
    assert refusal == Refusal("TypeNotAllowed",
                              "cat.png is really a ZIP archive (application/zip), not .png")


def test_text_named_png_is_refused(tmp_path: Path) -> None:
    """A text file cannot pass as a PNG by its name."""
    refusal = check(write(tmp_path, "cat.png", b"meow\n"), allowed_types=(".png",))
    assert refusal is not None and refusal.error_type == "TypeNotAllowed"
    assert "plain text" in refusal.message


def test_extension_not_listed_is_refused(tmp_path: Path) -> None:
    """A real GIF is refused where only PNG is allowed, naming the allowed types."""
    refusal = check(write(tmp_path, "anim.gif", gif_bytes()), allowed_types=(".png", "image/png"))
    assert refusal == Refusal("TypeNotAllowed",
                              "anim.gif is a GIF file (image/gif); allowed: .png, image/png")


def test_mime_wildcard_allows_every_image(tmp_path: Path) -> None:
    """`image/*` admits PNG, GIF, JPEG and WebP by content, and refuses a PDF."""
    for suffix in (".png", ".gif", ".jpg", ".webp"):
        path = write(tmp_path, f"x{suffix}", COMPLETE[suffix]())
        assert check(path, allowed_types=("image/*",)) is None, suffix
    refusal = check(write(tmp_path, "x.pdf", pdf_bytes()), allowed_types=("image/*",))
    assert refusal is not None and refusal.error_type == "TypeNotAllowed"


def test_zip_containers_fit_their_names_and_zip(tmp_path: Path) -> None:
    """A docx passes as .docx or application/zip; a plain ZIP passes as .jar or .xlsx."""
    docx = write(tmp_path, "letter.docx", docx_bytes())
    assert check(docx, allowed_types=(".docx",)) is None
    assert check(docx, allowed_types=("application/zip",)) is None
    assert check(write(tmp_path, "lib.jar", zip_bytes()), allowed_types=(".jar",)) is None
    assert check(write(tmp_path, "t.xlsx", zip_bytes()), allowed_types=(".xlsx",)) is None


@pytest.mark.parametrize("allowed", [(".csv",), ("text/csv",), ("text/plain",), ("text/*",)])
def test_csv_without_magic_is_allowed_as_text(tmp_path: Path, allowed: tuple[str, ...]) -> None:
    """A UTF-8 CSV has no magic bytes and passes as .csv, text/csv, text/plain or text/*."""
    path = write(tmp_path, "prices.csv", "item;price\ncafé;2,50 €\n".encode())
    assert check(path, allowed_types=allowed) is None


def test_legacy_8bit_csv_is_text(tmp_path: Path) -> None:
    """A cp1252 CSV (not UTF-8, but no control bytes) still reads as text."""
    path = write(tmp_path, "export.csv", "name;city\nJosé;Zürich\n".encode("cp1252"))
    assert check(path, allowed_types=(".csv",)) is None


def test_binary_named_csv_is_refused(tmp_path: Path) -> None:
    """Binary bytes with no known magic are not text, so they cannot pass as .csv."""
    path = write(tmp_path, "data.csv", bytes(range(256)) * 4)
    refusal = check(path, allowed_types=(".csv", "text/plain"))
    assert refusal is not None and "unrecognised binary data" in refusal.message


def test_unknown_binary_format_goes_by_its_extension(tmp_path: Path) -> None:
    """A format the sniffer does not know (Parquet) passes on its listed extension only."""
    path = write(tmp_path, "table.parquet", b"PAR1" + bytes(range(256)) + b"PAR1")
    assert check(path, allowed_types=(".parquet",)) is None
    assert check(path, allowed_types=("text/plain", ".csv")) is not None


def test_any_type_when_nothing_is_listed(tmp_path: Path) -> None:
    """An empty allowed_types admits any whole file, even an executable."""
    assert check(write(tmp_path, "tool.pdf", elf_bytes()), allowed_types=()) is None


# -- size, files and the workflow's own check ----------------------------------------------


def test_oversize_is_too_large(tmp_path: Path) -> None:
    """A file one byte over max_size_bytes is TooLarge; one at the limit passes."""
    assert check(write(tmp_path, "a.txt", b"x" * 10), max_size_bytes=10) is None
    refusal = check(write(tmp_path, "b.txt", b"x" * 11), max_size_bytes=10)
    assert refusal == Refusal("TooLarge", "11 bytes is over the limit of 10")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A file that vanished before intake is FileMissing, not an exception."""
    assert check(tmp_path / "gone.png") == Refusal("FileMissing", "gone.png is not there any more")


def test_validate_file_runs_last(tmp_path: Path) -> None:
    """The workflow's validate_file refuses as ValidationError, and never sees a refused file."""
    picky = Picky()
    assert check(write(tmp_path, "a.pdf", elf_bytes()), picky, allowed_types=(".pdf",)) == \
        Refusal("TypeNotAllowed", "a.pdf is really an ELF executable "
                                  "(application/x-executable), not .pdf")
    assert picky.asked == []
    refusal = check(write(tmp_path, "b.pdf", pdf_bytes()), picky, allowed_types=(".pdf",))
    assert refusal == Refusal("ValidationError", "the workflow does not like it")


# -- the scan step (a fake scanner; the real clamd is in test_clamd.py) --------------------


async def check_in_thread(checker: IntakeChecker, path: Path, **settings: Any) -> Refusal | None:
    config = msgspec.structs.replace(WorkflowConfig(), **settings)
    return await anyio.to_thread.run_sync(checker.check, path, config, Plain())


@pytest.mark.anyio
async def test_scan_refusal_is_returned(tmp_path: Path) -> None:
    """The scanner's verdict is the intake's refusal; it is asked only when the workflow scans."""
    infected = Refusal("Infected", "ClamAV found Test.Signature")
    scanner = FakeScanner(infected)
    path = write(tmp_path, "a.txt", b"hello")
    assert await check_in_thread(IntakeChecker(scanner), path, scan=True) == infected
    assert await check_in_thread(IntakeChecker(scanner), path, scan=False) is None
    assert scanner.scanned == [path]


@pytest.mark.anyio
async def test_scanner_down_or_missing_means_wait(tmp_path: Path) -> None:
    """A scanner that is down, or none at all, raises ScannerUnavailable: never clean."""
    path = write(tmp_path, "a.txt", b"hello")
    with pytest.raises(ScannerUnavailable):
        await check_in_thread(IntakeChecker(FakeScanner(down=True)), path, scan=True)
    with pytest.raises(ScannerUnavailable, match="no scanner is configured"):
        await check_in_thread(IntakeChecker(), path, scan=True)


@pytest.mark.anyio
async def test_refused_type_is_never_scanned(tmp_path: Path) -> None:
    """A file refused by type or size never reaches the scanner."""
    scanner = FakeScanner()
    checker = IntakeChecker(scanner)
    path = write(tmp_path, "a.pdf", elf_bytes())
    assert await check_in_thread(checker, path, scan=True, allowed_types=(".pdf",)) is not None
    assert await check_in_thread(checker, path, scan=True, max_size_bytes=1) is not None
    assert scanner.scanned == []
