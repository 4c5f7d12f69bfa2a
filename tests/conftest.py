"""Test session setup: what each folder needs, ``--torch-free``, hypothesis profiles.

Folders, by what their tests need (a test goes where its imports put it):

- ``core/``: ckcore only, no torch (in-process, or a plain child interpreter).
- ``hostile/``: ckcore only, no torch; attacks on the ``.metadata`` reader, each
  payload in a resource-limited child process.
- ``differential/``: torch in-process: ckcore against torch (the differential
  tests) and the torch.distributed.checkpoint integration (``ckcore.dcp``).
- ``multiprocess/``: worker processes that import torch: gloo process groups
  (ranks rendezvous through a file store, see ``support/rdzv.py``) and the examples.
- ``from_source/``: Cython and a C compiler: tests that compile kernel sources
  with other directives (a bounds-checked build). scripts/test.sh runs them in
  its build environment; the wheel's test environment has no compiler, and
  its passes leave this folder out (``--ignore``).
- ``support/``: shared fixtures and builders (not tests), imported by bench too.

``--torch-free`` collects only ``core/`` and ``hostile/`` (the
``TORCH_FREE_FOLDERS`` below) and insists that torch really is absent: it is
how CI proves that ckcore works without torch installed (scripts/test.sh and
cibuildwheel's test-command pass it). A torch-free test that imports torch by
mistake fails to import in that pass, loudly. Without the flag every folder
runs, and the torch tests import torch unconditionally (they never skip).

Hypothesis runs under a profile:

- ``ci`` (the default): derandomized (each test's examples are a fixed
  function of the test, so a run is reproducible), no deadline (2 shared CI
  cores), and each test's own ``max_examples``.
- ``long``: by hand, to hunt for new failures: random examples and 10x each
  test's ``max_examples``::

      python -m pytest tests --hypothesis-profile=long
      CKCORE_HYPOTHESIS_PROFILE=long python -m pytest tests

  A failure prints the ``@reproduce_failure`` blob to paste onto the test.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

TESTS = Path(__file__).resolve().parent
TORCH_FREE_FOLDERS = ("core", "hostile")

LONG_SCALE = 10
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", derandomize=False, deadline=None, print_blob=True)
# --hypothesis-profile (hypothesis' pytest plugin) overrides this default.
settings.load_profile(os.environ.get("CKCORE_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption(
        "--torch-free",
        action="store_true",
        default=False,
        help="run only the torch-free folders (tests/core, tests/hostile); torch must be absent",
    )


def pytest_configure(config):
    if config.getoption("--torch-free") and importlib.util.find_spec("torch") is not None:
        raise pytest.UsageError("--torch-free needs an environment without torch installed")


def _folder(path: Path) -> str | None:
    """The top-level folder of tests/ that ``path`` is in (None for tests/ itself or outside)."""
    try:
        rel = path.resolve().relative_to(TESTS)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 or path.is_dir() else None


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("--torch-free"):
        return None
    folder = _folder(Path(collection_path))
    if folder is not None and folder not in TORCH_FREE_FOLDERS:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--torch-free"):
        stray = [item.nodeid for item in items if _folder(item.path) not in TORCH_FREE_FOLDERS]
        if stray:
            raise pytest.UsageError(f"--torch-free collected tests outside {TORCH_FREE_FOLDERS}: "
                                    f"{stray[:5]}")
    if settings.get_current_profile_name() == "long":
        _scale_max_examples(items)


def _scale_max_examples(items):
    # Every property test sets its own max_examples (tuned for CI time); a profile
    # cannot raise an explicit value, so the long profile scales each test's own.
    seen = set()
    for item in items:
        fn = getattr(item, "obj", None)
        own = getattr(fn, "_hypothesis_internal_use_settings", None)
        if own is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        fn._hypothesis_internal_use_settings = settings(
            own, max_examples=own.max_examples * LONG_SCALE, derandomize=False)
