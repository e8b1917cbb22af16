"""The thumbnail workflow: JPEG, PNG or WebP in, a thumbnail that keeps the aspect out."""

from .config import config
from .models import Task
from .processor import ThumbnailProcessor

processor = ThumbnailProcessor()

__all__ = ["Task", "ThumbnailProcessor", "config", "processor"]
