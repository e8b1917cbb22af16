"""The csv_summary workflow: a CSV of any size in, a JSON profile of its columns out."""

from .config import config
from .models import Task
from .processor import CsvSummaryProcessor

processor = CsvSummaryProcessor()

__all__ = ["CsvSummaryProcessor", "Task", "config", "processor"]
