"""The parameters a thumbnail job takes (validated when the job is created)."""

from typing import Annotated, Literal

import msgspec

from kernel.task import BaseTask

Format = Literal["jpeg", "png", "webp"]


class Task(BaseTask):
    """The box the thumbnail must fit in, its format (None: the input's) and quality."""

    max_width: Annotated[int, msgspec.Meta(ge=16, le=4096)] = 256
    max_height: Annotated[int, msgspec.Meta(ge=16, le=4096)] = 256
    format: Format | None = None
    quality: Annotated[int, msgspec.Meta(ge=1, le=95)] = 85  # JPEG and WebP only
