"""The watcher's compiled name filters choose exactly what the glob rules say."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.watch import IGNORED, MARKER_SUFFIX, BaseWatcher
from kernel.config import WorkflowConfig

NAME_CHARS = st.sampled_from([*"ab.-_*?[]!~ ", "done", "tmp", "part", "csv", "é"])
names = st.lists(NAME_CHARS, min_size=1, max_size=8).map("".join)
globs = st.lists(st.sampled_from(["*.csv", "a*", "*b?", "[ab]*", "[!a]*", "*.done", "*[*",
                                  "draft-*", "*.tmp", "?"]), max_size=3).map(tuple)


def by_the_rules(name: str, config: WorkflowConfig) -> bool:
    """The rules, one glob at a time: ignored, marker, include, exclude."""
    base = name.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatch(base, pattern) for pattern in IGNORED):
        return False
    if config.marker and base.endswith(MARKER_SUFFIX):
        return False
    if config.include and not any(fnmatch.fnmatch(base, p) for p in config.include):
        return False
    return not any(fnmatch.fnmatch(base, p) for p in config.exclude)


async def never(name: str, completeness: str, key: str | None) -> str | None:
    return None


@settings(max_examples=300)
@given(name=names, sub=st.booleans(), include=globs, exclude=globs, marker=st.booleans())
def test_wanted_agrees_with_the_glob_rules(name: str, sub: bool, include: tuple[str, ...],
                                           exclude: tuple[str, ...], marker: bool) -> None:
    """For any name and any include/exclude globs, with or without markers, `wanted` says
    what matching each glob in turn would."""
    config = WorkflowConfig(include=include, exclude=exclude, marker=marker)
    watcher = BaseWatcher("w", Path("/nowhere"), config, never)
    full = f"sub/{name}" if sub else name
    assert watcher.wanted(full) == by_the_rules(full, config)
