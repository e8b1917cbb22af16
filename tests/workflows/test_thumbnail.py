"""thumbnail end to end on images drawn with Pillow; non-images and bombs refused at intake."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

import workflows.thumbnail as thumbnail
from adapters import Kernel
from kernel.decide import Rejected
from kernel.events import JobProgress
from kernel.state import Status
from workflows.thumbnail.processor import ThumbnailProcessor

from .kit import Finished, drop, fast_config, run_file

pytestmark = pytest.mark.anyio
PILLOW_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def draw(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", **save: Any) -> bytes:
    """An image with a left-red/right-blue split and a diagonal, encoded as `fmt`."""
    image = Image.new("RGBA", size, (255, 0, 0, 255))
    pen = ImageDraw.Draw(image)
    pen.rectangle((size[0] // 2, 0, size[0], size[1]), fill=(0, 0, 255, 255))
    pen.line((0, 0, size[0], size[1]), fill=(0, 255, 0, 255), width=3)
    if mode == "RGBA":
        pen.rectangle((0, 0, size[0] // 4, size[1] // 4), fill=(0, 0, 0, 0))
    out = io.BytesIO()
    image.convert(mode).save(out, fmt, **save)
    return out.getvalue()


def grey16(size: tuple[int, int]) -> bytes:
    """A 16-bit greyscale PNG (mode I;16), which Pillow cannot resample as it is."""
    image = Image.linear_gradient("L").resize(size).convert("I").point(lambda v: v * 256)
    out = io.BytesIO()
    image.convert("I;16").save(out, "PNG")
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header claims width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def fits(source: tuple[int, int], box: tuple[int, int], out: tuple[int, int]) -> bool:
    """`out` is `source` scaled into `box` (never up), aspect kept to within a pixel."""
    scale = min(box[0] / source[0], box[1] / source[1], 1.0)
    return all(abs(o - s * scale) <= 1 for o, s in zip(out, source, strict=True))


def opened(done: Finished) -> Image.Image:
    """The job's one output, opened."""
    (output,) = done.job.output_paths
    return Image.open(done.data_dir / output)


@pytest.mark.parametrize(("name", "content", "params", "fmt", "mode"), [
    ("wide.jpg", draw((1200, 800), fmt="JPEG"), {}, "jpeg", "RGB"),
    ("tall.png", draw((300, 900), "RGBA"), {"max_width": 100, "max_height": 100}, "png", "RGBA"),
    ("cam.webp", draw((640, 480), fmt="WEBP"), {"format": "jpeg", "quality": 50}, "jpeg", "RGB"),
    ("tiny.png", draw((64, 48), "P"), {"format": "webp"}, "webp", "RGB"),
    ("gray.png", draw((2000, 100), "L"), {"max_width": 4096, "max_height": 16}, "png", "L"),
    ("deep.png", grey16((640, 480)), {"format": "jpeg"}, "jpeg", "L"),
], ids=["jpeg", "png-alpha", "webp-to-jpeg", "small-not-enlarged", "gray-wide", "16-bit-grey"])
async def test_thumbnails_fit_the_box_keep_the_aspect_and_take_the_format(
        tmp_path: Path, name: str, content: bytes, params: dict[str, Any], fmt: str,
        mode: str) -> None:
    """Sizes, aspect, format and mode of the thumbnail; input archived; progress recorded."""
    with Image.open(io.BytesIO(content)) as original:
        source, source_format = original.size, str(original.format).lower()
    done = await run_file(tmp_path, "thumbnail", thumbnail, name, content, params=params)
    assert done.job.status is Status.COMPLETED, done.job.error
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}[fmt]
    assert done.job.output_paths == (f"thumbnail/output/{name}.thumb.{ext}",)
    with opened(done) as thumb:
        box = (params.get("max_width", 256), params.get("max_height", 256))
        assert thumb.format == PILLOW_NAMES[fmt] and thumb.mode == mode
        assert fits(source, box, thumb.size), (source, box, thumb.size)
        assert done.job.result == {"width": thumb.width, "height": thumb.height, "format": fmt,
                                   "source_format": source_format, "source_width": source[0],
                                   "source_height": source[1]}
    assert done.job.current_path.startswith("thumbnail/archive/")
    assert any(isinstance(event, JobProgress) for event in done.events)


async def test_exif_orientation_is_applied_and_dropped(tmp_path: Path) -> None:
    """A JPEG stored 400x200 with orientation 6 (turn right) becomes a 128x256 upright thumb."""
    exif = Image.Exif()
    exif[0x0112] = 6
    content = draw((400, 200), fmt="JPEG", exif=exif, quality=95)
    done = await run_file(tmp_path, "thumbnail", thumbnail, "phone.jpg", content)
    with opened(done) as thumb:
        assert thumb.size == (128, 256)
        assert thumb.getexif().get(0x0112, 1) == 1
        red, blue = thumb.getpixel((64, 10)), thumb.getpixel((64, 245))
    assert isinstance(red, tuple) and isinstance(blue, tuple)
    assert red[0] > 200 and red[2] < 60  # the stored left half (red) is now on top
    assert blue[2] > 200 and blue[0] < 60


async def test_alpha_is_laid_on_white_for_jpeg(tmp_path: Path) -> None:
    """A transparent corner of a PNG turns white, not black, in a JPEG thumbnail."""
    done = await run_file(tmp_path, "thumbnail", thumbnail, "logo.png",
                          draw((400, 400), "RGBA"), params={"format": "jpeg"})
    with opened(done) as thumb:
        corner = thumb.getpixel((5, 5))
    assert isinstance(corner, tuple) and min(corner) > 240


async def test_a_png_named_jpg_is_thumbnailed_by_its_content(tmp_path: Path) -> None:
    """With the intake's name check off, the decoder goes by content: a .png thumbnail."""
    config = fast_config(thumbnail, allowed_types=())
    done = await run_file(tmp_path, "thumbnail", thumbnail, "photo.jpg", draw((500, 250)),
                          config=config)
    assert done.job.status is Status.COMPLETED, done.job.error
    assert done.job.output_paths == ("thumbnail/output/photo.jpg.thumb.png",)
    with opened(done) as thumb:
        assert (thumb.format, thumb.size) == ("PNG", (256, 128))


async def test_the_default_intake_takes_a_png_named_jpg_by_its_content(tmp_path: Path) -> None:
    """An image mislabelled as another allowed image kind passes intake and is made by content."""
    done = await run_file(tmp_path, "thumbnail", thumbnail, "photo.jpg", draw((500, 250)))
    assert done.job.status is Status.COMPLETED, done.job.error


@pytest.mark.parametrize(("name", "content", "allowed_types"), [
    ("notes.png", b"this is not an image\n" * 10, None),
    ("notes.png", b"this is not an image\n" * 10, ()),
    ("fake.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 garbage!", ()),
], ids=["by-intake-type", "by-pillow", "broken-webp"])
async def test_non_images_are_refused_at_intake(tmp_path: Path, name: str, content: bytes,
                                                allowed_types: tuple[str, ...] | None) -> None:
    """A non-image is refused before any attempt (TypeNotAllowed or ValidationError), final."""
    config = fast_config(thumbnail, check_complete=False) if allowed_types is None else \
        fast_config(thumbnail, allowed_types=allowed_types, check_complete=False)
    done = await run_file(tmp_path, "thumbnail", thumbnail, name, content, config=config)
    assert done.job.status is Status.FAILED and done.job.attempts == 0
    assert done.job.error is not None
    assert done.job.error.type in {"TypeNotAllowed", "ValidationError"}
    assert done.job.current_path == f"thumbnail/error/{done.job.id}--{name}"
    assert done.outputs("thumbnail") == []


@pytest.mark.parametrize(("content", "processor"), [
    (png_claiming(100_000, 100_000), thumbnail.processor),  # Pillow's DecompressionBombError
    (png_claiming(10_000, 10_000), thumbnail.processor),  # Pillow's warning zone, made an error
    (png_claiming(9_000, 8_000), thumbnail.processor),  # over our PIXELS_MAX
    (draw((200, 200)), ThumbnailProcessor(pixels_max=10_000)),  # a real image, a lower bound
], ids=["100000x100000", "10000x10000", "9000x8000", "own-bound"])
async def test_decompression_bombs_are_refused_at_intake(
        tmp_path: Path, content: bytes, processor: ThumbnailProcessor) -> None:
    """An image claiming too many pixels is a ValidationError at intake, final, no warning."""
    done = await run_file(tmp_path, "thumbnail", thumbnail, "bomb.png", content,
                          processor=processor)
    assert done.job.status is Status.FAILED and done.job.attempts == 0
    assert done.job.error is not None and done.job.error.type == "ValidationError"
    assert "decompression bomb" in done.job.error.message
    report = json.loads((tmp_path / f"{done.job.current_path}.error.json").read_text())
    assert "decompression bomb" in report["message"]


async def test_an_image_whose_data_is_damaged_fails_finally(tmp_path: Path) -> None:
    """A header and checksums that pass intake but pixel data cut short: BadImage, one attempt."""
    done = await run_file(tmp_path, "thumbnail", thumbnail, "cut.png", png_claiming(300, 200))
    assert done.job.status is Status.FAILED and done.job.attempts == 1
    assert done.job.error is not None and done.job.error.type == "BadImage"
    assert done.outputs("thumbnail") == []


def test_validate_file_never_raises_on_hostile_bytes(tmp_path: Path) -> None:
    """Random bytes behind each accepted magic give a reason, never an exception."""
    rnd = random.Random(9)
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x00\x01\x00\x00WEBPVP8L", b""]
    for number in range(60):
        path = tmp_path / f"h{number}.img"
        path.write_bytes(magics[number % 4] + rnd.randbytes(rnd.randrange(0, 300)))
        reason = thumbnail.processor.validate_file(path)
        assert isinstance(reason, str) and reason


@pytest.mark.parametrize("params", [
    {"max_width": 15}, {"max_height": 4097}, {"quality": 0}, {"quality": 96},
    {"format": "gif"}, {"max_width": 256.5},
])
async def test_bad_params_are_refused_at_submit(tmp_path: Path, params: dict[str, Any]) -> None:
    """Sizes are 16..4096, quality 1..95, format jpeg|png|webp."""
    drop(tmp_path, "thumbnail", "a.png", draw((20, 20)))
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("thumbnail", thumbnail.processor, config=thumbnail.config)
        with pytest.raises(Rejected):
            await kernel.submit("thumbnail", "a.png", params=params)
