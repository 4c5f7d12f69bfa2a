"""mypy over the whole installed package is clean.

It checks the ckcore under test (the installed wheel in CI: its ``.py`` files
and the ``.pyi`` stubs of the compiled kernels, shipped with ``py.typed``),
from a directory outside the checkout, with the checkout's ``[tool.mypy]``.

It lives with the torch tests because ``ckcore.dcp`` and ``ckcore.cli``'s demo
are typed against torch: without torch installed mypy could only treat torch as
``Any`` and would pass code that the check with torch rejects. So there is one
verdict, with torch, in the full pass; the torch-free pass runs stubtest
(tests/core/test_sourcecode.py), which needs no torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support.paths import REPO

_ERROR = re.compile(r"^(?P<path>\S+?\.pyi?):\d+: error: ", re.MULTILINE)


def _package_path(path: str) -> str:
    # site-packages/ckcore/x.py or ckcore/x.py -> ckcore/x.py
    path = path.replace(os.sep, "/")
    return path[path.rindex("ckcore/"):] if "ckcore/" in path else path


def test_mypy_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), "-p", "ckcore"],
        cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=900,
        check=False,
    )
    assert "No module named mypy" not in proc.stderr, "mypy is not installed: pip install mypy"
    files = {_package_path(m["path"]) for m in _ERROR.finditer(proc.stdout)}
    assert not files, f"mypy errors in {sorted(files)}:\n" + proc.stdout[-8000:]
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert "Success: no issues found" in proc.stdout, proc.stdout
