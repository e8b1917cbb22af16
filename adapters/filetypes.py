"""What a file really is, by its magic bytes, and whether it is whole, by its trailer.

Only a bounded head and tail of the file are read: `filetype` looks at the first
8 KiB, and the longest trailer we check (a ZIP end record with a full comment) fits
in the last 64 KiB. Magic-byte sniffers call a truncated PNG "image/png", so
completeness needs the trailer checks below.
"""

from __future__ import annotations

import codecs
import mimetypes
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import filetype
import msgspec

HEAD_BYTES = 8192  # filetype never looks further
ZIP_END_BYTES = 22  # the fixed part of a ZIP end-of-central-directory record
TAIL_BYTES = ZIP_END_BYTES + 0xFFFF  # an end record with the longest comment
PDF_EOF_WITHIN_BYTES = 1024
TEXT_CONTROLS = frozenset(b"\t\n\f\r")
TEXT = "text"  # the kind of a file with no magic whose sample reads as text
DATA = "data"  # the kind of a file with no magic that is not text

# ZIP and the formats that are ZIP archives inside: one family, one completeness check.
ZIP_FAMILY = frozenset({"zip", "docx", "xlsx", "pptx", "odt", "ods", "odp", "epub", "jar",
                        "apk", "whl", "xpi"})
# Extensions that name one format, so a sniffed kind covers every name in its family.
FAMILIES = (
    ZIP_FAMILY,
    frozenset({"jpg", "jpeg", "jpe", "jfif"}),
    frozenset({"png", "apng"}),
    frozenset({"tif", "tiff"}),
    frozenset({"mpg", "mpeg"}),
    frozenset({"mid", "midi"}),
    frozenset({"mp4", "m4v", "m4a", "mov", "3gp"}),
    frozenset({"mkv", "webm"}),
    frozenset({"ogg", "oga", "ogv", "opus"}),
    frozenset({"doc", "xls", "ppt", "msg"}),  # OLE2 compound files look alike
    frozenset({"gz", "tgz"}),
    frozenset({"ttf", "otf"}),
    frozenset({"exe", "dll", "sys"}),
)
DESCRIPTIONS = {
    "elf": "an ELF executable",
    "exe": "a Windows PE executable",
    "zip": "a ZIP archive",
    "pdf": "a PDF document",
    TEXT: "plain text",
    DATA: "unrecognised binary data",
}
_MIME = mimetypes.MimeTypes()  # the built-in table only: the same answer on every machine


def _family(kind: str) -> frozenset[str]:
    for family in FAMILIES:
        if kind in family:
            return family
    return frozenset({kind})


MAGIC_EXTENSIONS = frozenset(
    extension for t in filetype.types for extension in _family(str(t.extension).lower()))


class Sample(msgspec.Struct, frozen=True):
    """The bytes intake looks at: the head, the tail and the size when they were read."""

    head: bytes
    tail: bytes
    size_bytes: int


class Sniffed(msgspec.Struct, frozen=True, kw_only=True):
    """A file's type by its content: a kind (`png`, `text`, `data`), MIME types, extensions."""

    kind: str
    mime: str
    mimes: frozenset[str]
    extensions: frozenset[str]

    @property
    def description(self) -> str:
        """What the file is, in words, for a refusal's message."""
        words = DESCRIPTIONS.get(self.kind, f"a {self.kind.upper()} file")
        return f"{words} ({self.mime})"

    def matches_extension(self, extension: str) -> bool:
        """Whether a name ending in `.{extension}` fits this content."""
        if self.kind in (TEXT, DATA):
            return extension not in MAGIC_EXTENSIONS and (
                self.kind == TEXT or not _guess_mime(extension).startswith("text/"))
        return extension in self.extensions

    def matches_mime(self, pattern: str) -> bool:
        """Whether a MIME type or wildcard (`image/*`, `*/*`) fits this content."""
        if pattern == "*/*" or pattern in self.mimes:
            return True
        return pattern.endswith("/*") and any(m.startswith(pattern[:-1]) for m in self.mimes)


def read_sample(path: Path) -> Sample:
    """The head and tail of a file, read through one descriptor; memory stays bounded."""
    with path.open("rb") as file:
        size_bytes = os.fstat(file.fileno()).st_size
        head = file.read(HEAD_BYTES)
        if size_bytes <= len(head):
            return Sample(head, head, size_bytes)
        file.seek(max(0, size_bytes - TAIL_BYTES))
        return Sample(head, file.read(TAIL_BYTES), size_bytes)


def sniff(sample: Sample, name: str) -> Sniffed:
    """The type of a file by its magic bytes; text or data when it has no known magic."""
    suffix = suffix_of(name)
    try:
        found = filetype.guess(sample.head)
    except (TypeError, ValueError, IndexError, struct.error):
        found = None  # a sniffer that trips on odd bytes has not recognised them
    if found is None:
        return _without_magic(sample.head, suffix)
    kind = str(found.extension).lower()
    mimes = {str(found.mime)}
    family = _family(kind)
    if suffix in family:
        mimes.add(_guess_mime(suffix))
    if kind in ZIP_FAMILY:
        mimes.add("application/zip")
    return Sniffed(kind=kind, mime=str(found.mime), mimes=frozenset(mimes - {""}),
                   extensions=family)


def _without_magic(head: bytes, suffix: str) -> Sniffed:
    if not _is_text(head):
        mime = "application/octet-stream"
        return Sniffed(kind=DATA, mime=mime, mimes=frozenset({mime}), extensions=frozenset())
    guessed = "" if suffix in MAGIC_EXTENSIONS else _guess_mime(suffix)
    mime = guessed if guessed.startswith("text/") else "text/plain"
    return Sniffed(kind=TEXT, mime=mime, mimes=frozenset({"text/plain", mime, guessed} - {""}),
                   extensions=frozenset())


def _is_text(head: bytes) -> bool:
    """UTF-8 (or UTF-16 with a BOM) without NULs, or an 8-bit text without control bytes."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decodes(head, "utf-16")
    if b"\x00" in head:
        return False
    return _decodes(head, "utf-8") or not any(b < 0x20 and b not in TEXT_CONTROLS for b in head)


def _decodes(head: bytes, encoding: str) -> bool:
    try:
        # final=False: the sample may end inside a multi-byte character
        codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _guess_mime(extension: str) -> str:
    return _MIME.guess_type(f"x.{extension}", strict=False)[0] or ""


def suffix_of(name: str) -> str:
    """The last extension of a name, lower-case and without its dot ('' for none)."""
    stem, dot, suffix = name.rpartition(".")
    return suffix.lower() if dot and stem else ""


def type_refusal(sniffed: Sniffed, name: str, allowed: Sequence[str]) -> str | None:
    """Why `allowed` (extensions, MIME types, wildcards) refuses this file, or None.

    The name's own extension must fit the content when it names a format we can
    sniff (a `.png` must be a PNG), and the content must fit one allowed entry.
    """
    if not allowed:
        return None
    suffix = suffix_of(name)
    if suffix in MAGIC_EXTENSIONS and not sniffed.matches_extension(suffix) \
            and not _mislabelled_alike(sniffed, suffix, allowed):
        return f"{name} is really {sniffed.description}, not .{suffix}"
    if any(_allows(entry.strip().lower(), sniffed, name) for entry in allowed):
        return None
    return f"{name} is {sniffed.description}; allowed: {', '.join(allowed)}"


def _mislabelled_alike(sniffed: Sniffed, suffix: str, allowed: Sequence[str]) -> bool:
    """A file of the kind its name claims (a PNG named .jpg), whose real type is allowed."""
    claimed = _guess_mime(suffix).partition("/")[0]
    return bool(claimed) and sniffed.mime.partition("/")[0] == claimed and any(
        "/" in entry and sniffed.matches_mime(entry.strip().lower()) for entry in allowed)


def _allows(entry: str, sniffed: Sniffed, name: str) -> bool:
    if "/" in entry:
        return sniffed.matches_mime(entry)
    entry = entry if entry.startswith(".") else f".{entry}"
    return name.lower().endswith(entry) and sniffed.matches_extension(entry.rsplit(".", 1)[1])


# -- completeness ------------------------------------------------------------------------


def truncation(sniffed: Sniffed, sample: Sample) -> str | None:
    """Why the file's structure says it is cut short, or None (also for unchecked kinds)."""
    check = TRAILER_CHECKS.get(sniffed.kind)
    return None if check is None else check(sample)


def _png_end(sample: Sample) -> str | None:
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type, CRC: always these bytes
    return None if sample.tail.endswith(iend) else "no IEND chunk at the end"


def _pdf_end(sample: Sample) -> str | None:
    if b"%%EOF" in sample.tail[-PDF_EOF_WITHIN_BYTES:]:
        return None
    return f"no %%EOF in the last {PDF_EOF_WITHIN_BYTES} bytes"


def _jpeg_end(sample: Sample) -> str | None:
    ends = sample.tail.rstrip(b"\x00").endswith(b"\xff\xd9")  # some writers pad with zeros
    return None if ends else "no EOI marker (FFD9) at the end"


def _gif_end(sample: Sample) -> str | None:
    return None if sample.tail.endswith(b"\x3b") else "no trailer byte (0x3B) at the end"


def _webp_end(sample: Sample) -> str | None:
    if len(sample.head) < 12:
        return "shorter than a RIFF header"
    riff_size = int.from_bytes(sample.head[4:8], "little") + 8
    if riff_size == sample.size_bytes:
        return None
    return f"the RIFF header says {riff_size} bytes, the file has {sample.size_bytes}"


def _zip_end(sample: Sample) -> str | None:
    return None if any(_zip_end_records(sample.tail)) else "no end-of-central-directory record"


def _zip_end_records(tail: bytes) -> Iterable[bool]:
    """For each end-record signature, from the last: does its comment end the file exactly?"""
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0:
        comment_bytes = int.from_bytes(tail[at + 20:at + 22], "little")
        yield at + ZIP_END_BYTES <= len(tail) and at + ZIP_END_BYTES + comment_bytes == len(tail)
        at = tail.rfind(b"PK\x05\x06", 0, at)


TRAILER_CHECKS: dict[str, Callable[[Sample], str | None]] = {
    "png": _png_end,
    "apng": _png_end,
    "pdf": _pdf_end,
    "jpg": _jpeg_end,
    "gif": _gif_end,
    "webp": _webp_end,
    **dict.fromkeys(ZIP_FAMILY, _zip_end),
}
# The matchers of the formats whose end `truncation` checks. Every matcher of the ZIP
# family wants a local file header first ("PK"), and the document ones search 6,000 bytes
# for it before looking: they are tried only on a head that starts so.
_END_CHECKED = tuple(t for t in filetype.types if str(t.extension).lower() in TRAILER_CHECKS)
_END_CHECKED_NOT_ZIP = tuple(t for t in _END_CHECKED if str(t.extension).lower() not in ZIP_FAMILY)


def end_checked(head: bytes) -> bool:
    """Whether the head may be of a format whose end `truncation` checks.

    False means `truncation(sniff(sample, name), sample)` is None: `sniff` names a format
    only when that format's matcher accepts the head, so when none of these does, the
    kind it would name has no end to check. Trying these few costs a sixth of `sniff`,
    which is what a workflow that checks completeness but allows every type needs.
    """
    try:
        matchers = _END_CHECKED if head[:2] == b"PK" else _END_CHECKED_NOT_ZIP
        return filetype.match(head, matchers) is not None
    except (TypeError, ValueError, IndexError, struct.error):
        return True  # let `sniff` decide, as it would have
