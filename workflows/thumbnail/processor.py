"""What a thumbnail job does: decode, fit in the box upright, encode, write atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from kernel.task import BaseProcessor, JobContext, JobError
from workflows.common import output_name, write_unless_cancelled

from . import models
from .config import PIXELS_MAX
from .services.images import (
    EXTENSIONS,
    TooManyPixels,
    open_image,
    resamplable,
    save,
    source_format,
)
from .services.images import thumbnail as make_thumbnail

# What Pillow raises on bytes it cannot decode; the same bytes fail the same way again.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ThumbnailProcessor(BaseProcessor):
    """Writes output/{name}.thumb.{jpg|png|webp}; refuses non-images and bombs at intake."""

    Task = models.Task

    def __init__(self, pixels_max: int = PIXELS_MAX) -> None:
        self.pixels_max = pixels_max

    def validate_file(self, path: Path) -> str | None:
        """Refuse what Pillow cannot read as JPEG, PNG or WebP, and images over the pixel bound."""
        try:
            with open_image(path, self.pixels_max) as image:
                image.verify()  # PNG: every chunk's CRC; the decoders run in process()
        except TooManyPixels as exc:
            return f"{path.name} is refused as a possible decompression bomb: {exc}"
        except UnidentifiedImageError:
            return f"{path.name} is not a JPEG, PNG or WebP image"
        except Exception as exc:  # hostile bytes may trip any decoder: a reason, never a crash
            return f"{path.name} is a damaged image: {type(exc).__name__}: {exc}"
        return None

    def process(self, ctx: JobContext, task: models.Task) -> dict[str, Any]:
        """Decode, fit, encode; the output appears only once it is whole."""
        try:
            with open_image(ctx.input_path, self.pixels_max) as image:
                source = (source_format(image), *image.size)
                ctx.progress(0.1, "decoding")
                upright = make_thumbnail(resamplable(image), (task.max_width, task.max_height))
        except (TooManyPixels, UnidentifiedImageError, *DECODE_ERRORS) as exc:
            raise JobError("BadImage", f"cannot decode the image: {exc}",
                           retryable=False) from None
        ctx.check_cancelled()
        ctx.progress(0.7, "encoding")
        fmt = task.format or source[0]
        name = output_name(ctx.job, f".thumb.{EXTENSIONS[fmt]}")
        encoded = io.BytesIO()  # a thumbnail is small; encode first, then write at once
        save(upright, encoded, fmt, task.quality)
        write_unless_cancelled(ctx, name, encoded.getvalue())
        ctx.progress(1.0, "written")
        return {"width": upright.width, "height": upright.height, "format": fmt,
                "source_format": source[0], "source_width": source[1],
                "source_height": source[2]}
