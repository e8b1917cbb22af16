"""The embedded SQLite event store (the default)."""

from adapters.sqlite.store import SqliteEventStore

__all__ = ["SqliteEventStore"]
