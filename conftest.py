"""Makes the checkout's ``tests`` package (``tests.support``) importable for tests and bench.

Both suites run from outside the checkout against the installed ckcore
(scripts/test.sh: ``--rootdir`` is the checkout, the working directory is the
test venv). Putting the checkout on ``sys.path`` would make ``import ckcore``
find the sources instead of the wheel; so only the ``tests`` package itself is
registered, from its file, under its own name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent / "tests"

_loaded = sys.modules.get("tests")
if _loaded is None:
    _spec = importlib.util.spec_from_file_location(
        "tests", _TESTS / "__init__.py", submodule_search_locations=[str(_TESTS)])
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["tests"] = _module
    _spec.loader.exec_module(_module)
elif Path(getattr(_loaded, "__file__", "") or "").resolve().parent != _TESTS:
    raise ImportError(f"another 'tests' package is already imported: {_loaded!r}")
