"""The compress workflow: any file in, `{name}.gz` and its sha256 manifest out, verified."""

from .config import config
from .models import Task
from .processor import CompressProcessor

processor = CompressProcessor()

__all__ = ["CompressProcessor", "Task", "config", "processor"]
