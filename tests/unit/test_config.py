"""Workflow settings validation and the pure retry policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.config import DEFAULT_NON_RETRYABLE, WorkflowConfig, retry_at

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
NO_JITTER = WorkflowConfig(
    max_attempts=20, backoff_base_s=2.0, backoff_max_s=300.0, backoff_jitter=0.0
)


def test_defaults_are_valid_and_sensible() -> None:
    """The default config builds and carries the documented retry and intake defaults."""
    config = WorkflowConfig()
    assert (config.max_attempts, config.backoff_base_s, config.backoff_max_s) == (3, 2.0, 300.0)
    assert config.backoff_jitter == 0.2
    assert config.non_retryable == DEFAULT_NON_RETRYABLE
    assert config.concurrency is None
    assert config.settle_ms == 500


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"concurrency": -3}, "concurrency must be at least 1"),
        ({"timeout_s": 0.0}, "timeout_s must be positive"),
        ({"timeout_s": -1.0}, "timeout_s must be positive"),
        ({"max_attempts": 0}, "max_attempts must be within 1..1000"),
        ({"max_attempts": 1001}, "max_attempts must be within 1..1000"),
        ({"backoff_base_s": -0.1}, "backoff must not be negative"),
        ({"backoff_max_s": -1.0}, "backoff must not be negative"),
        ({"backoff_jitter": -0.01}, "backoff_jitter must be within 0..1"),
        ({"backoff_jitter": 1.01}, "backoff_jitter must be within 0..1"),
        ({"settle_ms": -1}, "settle_ms must not be negative"),
        ({"max_size_bytes": 0}, "max_size_bytes must be positive"),
        ({"progress_interval_s": -0.5}, "progress_interval_s must not be negative"),
    ],
)
def test_invalid_settings_are_refused_with_a_named_reason(
    fields: dict[str, Any], message: str
) -> None:
    """Each out-of-range setting raises ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        WorkflowConfig(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"concurrency": 1},
        {"timeout_s": None},
        {"timeout_s": 0.001},
        {"max_attempts": 1},
        {"backoff_base_s": 0.0, "backoff_max_s": 0.0},
        {"backoff_jitter": 0.0},
        {"backoff_jitter": 1.0},
        {"settle_ms": 0},
        {"max_size_bytes": None},
        {"max_size_bytes": 1},
        {"progress_interval_s": 0.0},
    ],
)
def test_boundary_settings_are_accepted(fields: dict[str, Any]) -> None:
    """The edges of every valid range are allowed."""
    config = WorkflowConfig(**fields)
    assert all(getattr(config, name) == value for name, value in fields.items())


def test_validation_applies_when_decoding_a_config_file() -> None:
    """Settings read from toml or env (via msgspec.convert) are validated the same way."""
    with pytest.raises(msgspec.ValidationError, match=r"max_attempts must be within 1\.\.1000"):
        msgspec.convert({"max_attempts": 0}, WorkflowConfig)


def test_unknown_settings_are_refused() -> None:
    """A misspelt setting is an error, not silently ignored."""
    with pytest.raises(msgspec.ValidationError, match="unknown field `max_attempt`"):
        msgspec.convert({"max_attempt": 5}, WorkflowConfig)


def test_runner_must_be_thread_or_process() -> None:
    """The runner setting accepts only its two literal values."""
    assert msgspec.convert({"runner": "process"}, WorkflowConfig).runner == "process"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"runner": "fork"}, WorkflowConfig)


@pytest.mark.parametrize(
    ("attempt", "delay_s"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (7, 128.0)]
)
def test_retry_delay_doubles_with_each_attempt(attempt: int, delay_s: float) -> None:
    """Without jitter the delay after attempt n is base * 2**(n-1)."""
    assert retry_at(NO_JITTER, attempt, "Boom", T0, 0.5) == T0 + timedelta(seconds=delay_s)


@pytest.mark.parametrize("attempt", [9, 10, 19])
def test_retry_delay_is_capped(attempt: int) -> None:
    """Once base * 2**(n-1) passes backoff_max_s the delay stays at the cap."""
    assert retry_at(NO_JITTER, attempt, "Boom", T0, 0.5) == T0 + timedelta(seconds=300)


def test_retry_delay_is_capped_for_very_high_attempt_numbers() -> None:
    """A workflow allowing thousands of attempts still gets the capped delay, not a crash."""
    config = WorkflowConfig(max_attempts=1000, backoff_jitter=0.0)
    assert retry_at(config, 999, "Boom", T0, 0.5) == T0 + timedelta(seconds=300)


@pytest.mark.parametrize(
    ("sample", "delay_s"), [(0.0, 8.0), (0.25, 9.0), (0.5, 10.0), (0.75, 11.0)]
)
def test_jitter_spreads_the_delay_linearly(sample: float, delay_s: float) -> None:
    """The sample maps [0, 1) linearly onto [1 - jitter, 1 + jitter) times the delay."""
    config = WorkflowConfig(max_attempts=5, backoff_base_s=10.0, backoff_jitter=0.2)
    assert retry_at(config, 1, "Boom", T0, sample) == T0 + timedelta(seconds=delay_s)


@given(
    sample=st.floats(0.0, 1.0, exclude_max=True),
    attempt=st.integers(1, 19),
    jitter=st.floats(0.0, 1.0),
)
def test_jitter_stays_within_its_bounds(sample: float, attempt: int, jitter: float) -> None:
    """Whatever the sample, the delay lies within +-jitter of the capped exponential delay."""
    config = WorkflowConfig(max_attempts=20, backoff_jitter=jitter)
    when = retry_at(config, attempt, "Boom", T0, sample)
    assert when is not None
    delay_s = (when - T0).total_seconds()
    base_s = min(300.0, 2.0 * 2 ** (attempt - 1))
    slack_s = 1e-6  # timedelta rounds to whole microseconds
    assert base_s * (1 - jitter) - slack_s <= delay_s <= base_s * (1 + jitter) + slack_s
    assert delay_s >= 0


@pytest.mark.parametrize("error_type", DEFAULT_NON_RETRYABLE)
def test_non_retryable_errors_are_final_at_once(error_type: str) -> None:
    """An error the same bytes would repeat is final on the first attempt."""
    assert retry_at(WorkflowConfig(max_attempts=10), 1, error_type, T0, 0.5) is None


def test_a_workflow_chooses_its_own_non_retryable_errors() -> None:
    """non_retryable is per workflow: listed types are final, the defaults no longer are."""
    config = WorkflowConfig(non_retryable=("QuotaExceeded",))
    assert retry_at(config, 1, "QuotaExceeded", T0, 0.5) is None
    assert retry_at(config, 1, "TooLarge", T0, 0.5) is not None


@pytest.mark.parametrize("error_type", ["Timeout", "Interrupted", "Boom"])
def test_timeouts_and_crashes_are_retried(error_type: str) -> None:
    """Timeout and Interrupted count as ordinary, retryable failures."""
    assert retry_at(WorkflowConfig(), 1, error_type, T0, 0.5) is not None


@pytest.mark.parametrize(("attempt", "final"), [(1, False), (2, False), (3, True), (4, True)])
def test_the_last_allowed_attempt_is_final(attempt: int, final: bool) -> None:
    """With max_attempts=3 the third failed attempt (or any later one) gets no retry."""
    when = retry_at(WorkflowConfig(max_attempts=3), attempt, "Boom", T0, 0.5)
    assert (when is None) == final


def test_one_attempt_means_never_retried() -> None:
    """max_attempts=1 makes the first failure final."""
    assert retry_at(WorkflowConfig(max_attempts=1), 1, "Boom", T0, 0.5) is None
