"""Settings: `multiflow.toml` < `.env` < `MULTIFLOW_*` environment < command-line flags.

Everything decodes into typed msgspec Structs; a bad global setting stops the
start with a message naming the key, and a bad `[workflows.NAME]` section
disables only that workflow.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
from dotenv import dotenv_values

from adapters.clamd import ScannerSettings
from adapters.notify.settings import AlertRule, WebhookTarget
from kernel.config import WorkflowConfig

ENV_PREFIX = "MULTIFLOW_"
SECRET_KEYS = frozenset({"api_tokens"})
LIST_KEYS = frozenset({"api_tokens", "workflow_entries"})
_SECRET_QUERY = re.compile(r"([^&=]*(?:pass|token|key|secret|sig|auth)[^&=]*)=[^&]*", re.I)
STORE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://", "memory://")


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every global setting; `.env.example` lists them with their environment names."""

    data_dir: str = "data"
    store: str | None = None  # sqlite:///PATH, postgresql://..., memory://; default: DATA_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    concurrency: int = 1  # jobs at once; on PostgreSQL across all nodes (0: no such limit)
    node_concurrency: int | None = None  # on PostgreSQL: jobs at once on this node
    lease_s: float = 15.0  # on PostgreSQL: a dead node's jobs are recovered after this
    heartbeat_s: float = 3.0  # on PostgreSQL: how often a node renews its lease
    aging_interval_s: float = 60.0
    drain_grace_s: float = 30.0
    auth: Literal["on", "off"] = "on"
    api_tokens: list[str] = msgspec.field(default_factory=list)  # "name:secret" or "secret"
    metrics_public: bool = False
    rate_limit_per_s: float = 50.0
    rate_limit_burst: int = 100
    body_max_bytes: int = 1024 * 1024  # JSON bodies
    upload_max_bytes: int = 1024**3  # uploaded files
    sse_queue_max: int = 1000  # events buffered per SSE client before it is dropped
    disk_free_min_bytes: int = 100 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_file_max_bytes: int = 10 * 1024 * 1024  # per-workflow files in DATA_DIR/logs/
    log_file_backups: int = 5
    workflows_dir: str = "workflows"
    workflow_entries: list[str] = msgspec.field(default_factory=list)  # "module:attr"
    watchers: bool = True
    scanner: ScannerSettings | None = None
    archive_retention_days: int = 30  # archive/ days and duplicates older than this go; 0: keep
    cleanup_interval_s: float = 86400.0  # how often the server runs that cleanup
    workflows: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    webhooks: list[WebhookTarget] = msgspec.field(default_factory=list)
    alerts: list[AlertRule] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "port", "must be within 1..65535")
        _check(0 <= self.concurrency <= 1024, "concurrency", "must be within 1..1024")
        _check(self.concurrency >= 1 or (self.node_concurrency is not None and self.shared),
               "concurrency", "0 (no cluster-wide limit) needs a PostgreSQL store and "
               "node_concurrency")
        _check(self.node_concurrency is None or 1 <= self.node_concurrency <= 1024,
               "node_concurrency", "must be within 1..1024")
        _check(0 < self.heartbeat_s < self.lease_s, "heartbeat_s",
               "must be positive and shorter than lease_s")
        _check(self.drain_grace_s >= 0, "drain_grace_s", "must not be negative")
        _check(self.aging_interval_s > 0, "aging_interval_s", "must be positive")
        _check(self.rate_limit_per_s > 0 and self.rate_limit_burst >= 1, "rate_limit_per_s",
               "rate and burst must be positive")
        _check(self.store is None or self.store.startswith(STORE_SCHEMES), "store",
               "must be sqlite:///PATH, postgresql://... or memory://")
        _check(self.body_max_bytes >= 1024, "body_max_bytes", "must be at least 1024")
        _check(self.upload_max_bytes >= 1, "upload_max_bytes", "must be at least 1")
        _check(self.disk_free_min_bytes >= 0, "disk_free_min_bytes", "must not be negative")
        _check(self.log_file_max_bytes >= 1024, "log_file_max_bytes", "must be at least 1024")
        _check(self.log_file_backups >= 1, "log_file_backups",
               "must be at least 1 (a file past log_file_max_bytes is rotated to .1)")
        _check(self.sse_queue_max >= 1, "sse_queue_max", "must be at least 1")
        _check(0 <= self.archive_retention_days <= 100 * 365, "archive_retention_days",
               "must be within 0..36500 (0 keeps the archive for ever)")
        _check(self.cleanup_interval_s >= 60, "cleanup_interval_s", "must be at least 60")
        for token in self.api_tokens:
            _check(bool(token_secret(token)), "api_tokens", "a token's secret may not be empty")
        names = [target.name for target in self.webhooks]
        _check(len(names) == len(set(names)), "webhooks", "names must be unique")
        for rule in self.alerts:
            unknown = sorted(set(rule.targets) - set(names))
            _check(not unknown, "alerts", f"rule {rule.name} names unknown webhooks {unknown}")

    @property
    def data_path(self) -> Path:
        """The data root as a Path."""
        return Path(self.data_dir)

    @property
    def shared(self) -> bool:
        """True when the store is PostgreSQL: several nodes may share it."""
        return (self.store or "").startswith(("postgresql://", "postgres://"))

    def binds_loopback(self) -> bool:
        """True when the server listens on a loopback address only."""
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")


class SettingsError(ValueError):
    """A setting that cannot be used: the message names the key and why."""


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"{key} {reason}")


def token_secret(token: str) -> str:
    """The secret part of a `name:secret` (or bare `secret`) token."""
    return token.partition(":")[2] if ":" in token else token


def token_name(token: str) -> str:
    """The name part of a `name:secret` token (`default` for a bare secret)."""
    return token.partition(":")[0] if ":" in token else "default"


def load_settings(
    config_file: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_file: Path | None = Path(".env"),
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the four sources (weakest first) and decode them; raises SettingsError."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(_read_toml(config_file))
    elif Path("multiflow.toml").is_file():
        merged.update(_read_toml(Path("multiflow.toml")))
    if env_file is not None and env_file.is_file():
        dotenv = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        _merge(merged, _from_env(dotenv))
    _merge(merged, _from_env(os.environ if env is None else env))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {exc}") from None
    except ValueError as exc:
        raise SettingsError(f"invalid setting: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    known = set(Settings.__struct_fields__)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        if key not in known or key in ("workflows", "scanner", "webhooks", "alerts"):
            continue
        if key == "store" and not raw.strip():
            continue  # `MULTIFLOW_STORE=` in a .env: unset, not an empty URL
        values[key] = [p.strip() for p in raw.split(",") if p.strip()] if key in LIST_KEYS \
            else raw
    if "MULTIFLOW_SCANNER_SOCKET" in env:
        values["scanner"] = {"socket_path": env["MULTIFLOW_SCANNER_SOCKET"]}
    elif "MULTIFLOW_SCANNER_PORT" in env:
        values["scanner"] = {"port": env["MULTIFLOW_SCANNER_PORT"],
                             "host": env.get("MULTIFLOW_SCANNER_HOST", "127.0.0.1")}
    return values


def _merge(merged: dict[str, Any], values: dict[str, Any]) -> None:
    """Take a stronger source's values. The scanner's connection from the environment
    replaces the weaker one's (a socket or a host and port), and keeps its other keys
    (`stream_max_bytes`, the timeouts)."""
    scanner = values.pop("scanner", None)
    merged.update(values)
    if scanner is not None:
        base = dict(merged.get("scanner") or {})
        for key in ("socket_path", "host", "port"):
            base.pop(key, None)
        merged["scanner"] = {**base, **scanner}


def workflow_config(settings: Settings, name: str, base: WorkflowConfig) -> WorkflowConfig:
    """The workflow's own config with `[workflows.NAME]` applied; SettingsError if invalid."""
    overrides = settings.workflows.get(name)
    if not overrides:
        return base
    merged = {**msgspec.structs.asdict(base), **overrides}
    try:
        return msgspec.convert(merged, WorkflowConfig, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise SettingsError(f"[workflows.{name}]: {exc}") from None


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as a dict with secrets masked (for `multiflow config`)."""
    data: dict[str, Any] = msgspec.to_builtins(settings)
    data["api_tokens"] = [f"{token_name(t)}:****" for t in settings.api_tokens]
    if settings.store is not None:
        data["store"] = masked_url(settings.store)
    for target in data["webhooks"]:
        target["secret"] = "****"
        target["url"] = masked_url(target["url"])
    return data


def masked_url(url: str) -> str:
    """A URL with its password, and the values of query keys that hold secrets (token,
    key, secret, password, signature ...), shown as ****."""
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":****@", 1)
    if parts.query:
        query = _SECRET_QUERY.sub(lambda m: f"{m[1]}=****", parts.query)
        url = url.replace(f"?{parts.query}", f"?{query}", 1)
    return url
