"""The PostgreSQL event store, for several nodes on one database."""

from adapters.postgres.store import PostgresEventStore

__all__ = ["PostgresEventStore"]
