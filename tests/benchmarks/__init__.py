"""Benchmarks: scripts that print figures; not part of the test suite."""

import logging

import structlog

# The figures measure the system, not the terminal: keep the per-job log lines out.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
