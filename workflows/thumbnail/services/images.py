"""Pillow, guarded: formats we accept, a pixel bound, orientation, modes each format takes."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from ..models import Format

PILLOW_FORMATS: dict[str, Format] = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
OPEN_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow tries no other decoder on our files
EXTENSIONS: dict[Format, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
AXES_SWAPPED = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image a quarter
MODES: dict[Format, frozenset[str]] = {
    "jpeg": frozenset({"L", "RGB"}),
    "png": frozenset({"1", "L", "LA", "P", "RGB", "RGBA"}),
    "webp": frozenset({"RGB", "RGBA"}),
}
# Warning filters are process-wide: one thread at a time may change them.
_warnings_lock = threading.Lock()


class TooManyPixels(ValueError):
    """The image claims more pixels than the bound: a possible decompression bomb."""


@contextlib.contextmanager
def open_image(path: Path, pixels_max: int) -> Iterator[Image.Image]:
    """Open an image of an accepted format; TooManyPixels past `pixels_max`."""
    with _warnings_lock, warnings.catch_warnings():
        # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that: make it raise.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=OPEN_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise TooManyPixels(str(exc)) from None
    with image:
        width, height = image.size
        if width * height > pixels_max:
            raise TooManyPixels(f"{width}x{height} is {width * height} pixels, over the "
                                f"limit of {pixels_max}")
        yield image


def thumbnail(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    """A copy that fits in `box` (never enlarged), turned upright as its EXIF says."""
    orientation = image.getexif().get(0x0112, 1)
    if orientation in AXES_SWAPPED:
        box = (box[1], box[0])  # the box applies to the picture as it will be shown
    image.thumbnail(box)  # draft mode makes a JPEG decode at a fraction of its size
    return ImageOps.exif_transpose(image)


def resamplable(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey (a PNG of depth 16) scaled to 8 bits: Pillow cannot resample them."""
    if image.mode not in WIDE_GREY_MODES:
        return image
    return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")


def save(image: Image.Image, out: IO[bytes], fmt: Format, quality: int) -> None:
    """Write `image` as `fmt`, converted to a mode that format can hold; no metadata kept."""
    image = _fit_mode(image, fmt)
    if fmt == "png":
        image.save(out, "PNG", optimize=True)
    else:
        image.save(out, fmt.upper(), quality=quality)


def _fit_mode(image: Image.Image, fmt: Format) -> Image.Image:
    if image.mode in MODES[fmt]:
        return image
    alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data
    if fmt != "jpeg" and alpha:
        return image.convert("RGBA")
    if alpha:  # JPEG has no alpha: lay the picture on white
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def source_format(image: Image.Image) -> Format:
    """The input's format as a task names it (`jpeg`, `png`, `webp`)."""
    return PILLOW_FORMATS[image.format or ""]  # open_image admits only these formats
