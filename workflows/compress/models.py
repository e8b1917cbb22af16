"""The parameters a compress job takes (validated when the job is created)."""

from typing import Annotated

import msgspec

from kernel.task import BaseTask


class Task(BaseTask):
    """The gzip level: 1 is fastest, 9 is smallest."""

    level: Annotated[int, msgspec.Meta(ge=1, le=9)] = 6
