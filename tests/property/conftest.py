"""Property tests: keep Hypothesis's cache out of the source tree (as tests/contract does)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

# `norecursedirs` replaces pytest's defaults, so a ./.hypothesis/ folder would make the next
# run fail at collection on Hypothesis's warning about it (filterwarnings = error).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "multiflow-hypothesis")
