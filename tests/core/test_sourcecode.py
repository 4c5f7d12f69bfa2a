"""The compiled kernels match their stubs: ``mypy.stubtest`` on every ``ckcore._kernels`` module.

It checks the installed package (the wheel in CI, built for this very
platform and Python): each extension module is imported and compared, name by
name and signature by signature, with the ``.pyi`` shipped next to it, the one
that mypy and IDEs read. Cython's own module internals are allow-listed in
``stubtest_allowlist.txt``. Torch is not needed, so this runs in the torch-free
pass too (and in cibuildwheel's test of every wheel). mypy over the whole
package needs torch installed: tests/differential/test_mypy.py.

mypy must be installed (``pip install mypy``, in the ``test`` extra): a missing
checker is a failure, not a skip.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import ckcore._kernels

HERE = Path(__file__).resolve().parent
KERNELS_DIR = Path(ckcore._kernels.__file__).resolve().parent


def _extension_modules() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(ckcore._kernels.__path__, "ckcore._kernels."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            names.append(info.name)
    return sorted(names)


def test_every_kernel_has_a_stub():
    mods = _extension_modules()
    assert "ckcore._kernels._intersect" in mods, mods
    missing = [m for m in mods if not (KERNELS_DIR / (m.rsplit(".", 1)[1] + ".pyi")).is_file()]
    assert not missing, f"compiled kernels without a .pyi next to them: {missing}"


def test_stubtest_kernels(tmp_path):
    # Outside the checkout, so that the checkout's sources cannot stand in for
    # the installed package; the environment's PYTHONPATH (development: the
    # built checkout) is kept.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", *_extension_modules(),
         "--allowlist", str(HERE / "stubtest_allowlist.txt")],
        cwd=tmp_path, env=dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert "No module named mypy" not in proc.stderr, "mypy is not installed: pip install mypy"
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
