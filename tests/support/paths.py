"""Where things are: the checkout's folders, and the ckcore under test."""

from __future__ import annotations

from pathlib import Path

import ckcore

REPO = Path(__file__).resolve().parent.parent.parent
TESTS = REPO / "tests"
DATA = TESTS / "data"
BENCH = REPO / "bench"
EXAMPLES = REPO / "examples"

# The folder that holds the ckcore this process imported (the installed wheel in
# CI, the built checkout in development): child processes put it first on their
# PYTHONPATH so that they test the very same package.
CKCORE_PARENT = Path(ckcore.__file__).resolve().parent.parent
