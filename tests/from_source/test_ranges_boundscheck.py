"""The box copy kernels hold up in a bounds-checked build (``CKCORE_BOUNDSCHECK=1``).

A bounds-checked build is how the kernels' index arithmetic is audited, so
its walks must not index an empty memoryview: inside a ``noexcept nogil``
helper the IndexError cannot propagate, the helper returns garbage and the
copy loops over an uninitialised run count (a crash or a hang). This test
builds ``_ranges`` with boundscheck, wraparound and initializedcheck on, as
``_ranges_bc`` in a temporary directory, and runs 0-d and n-d boxes through
``copy_box``, ``paired_runs`` and ``paired_run_info`` in a child process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent

_BUILD = """
from setuptools import Extension, setup
from Cython.Build import cythonize
setup(script_args=["build_ext", "--inplace", "-q"],
      ext_modules=cythonize([Extension("_ranges_bc", ["_ranges_bc.pyx"])],
                            include_path=[{repo!r}],
                            compiler_directives={{"language_level": 3, "boundscheck": True,
                                                 "wraparound": True, "initializedcheck": True,
                                                 "cdivision": True}}, quiet=True))
"""

_RUN = textwrap.dedent("""
    import numpy as np
    import _ranges_bc as R
    e = np.zeros(0, dtype=np.int64)
    def a(*v):
        return np.array(v, dtype=np.int64)
    # 0-d: one element of 4 bytes
    src = np.arange(4, dtype=np.uint8)
    dst = np.zeros(4, dtype=np.uint8)
    R.copy_box(src, e, e, 0, e, dst, e, e, 0, e, e, 4)
    assert dst.tolist() == [0, 1, 2, 3], dst
    pr = R.paired_runs(e, e, 0, e, e, e, 0, e, e, 4)
    assert pr.tolist() == [[0, 0, 4]], pr
    assert R.paired_run_info(e, e, e, e, e, e, e, 4) == (1, 4)
    # 2-d, a transposed destination
    src = np.arange(6, dtype=np.uint8)
    dst = np.zeros(6, dtype=np.uint8)
    R.copy_box(src, a(2, 3), a(3, 1), 0, a(0, 0), dst, a(2, 3), a(1, 2), 0, a(0, 0), a(2, 3), 1)
    assert dst.tolist() == [0, 3, 1, 4, 2, 5], dst
    print("ok")
""")


@pytest.fixture(scope="module")
def bc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranges_bc")
    for ext in ("pyx", "pxd"):
        shutil.copy(REPO / "ckcore" / "_kernels" / f"_ranges.{ext}", d / f"_ranges_bc.{ext}")
    subprocess.run([sys.executable, "-c", _BUILD.format(repo=str(REPO))], cwd=d, check=True,
                   capture_output=True)
    return d


def test_box_kernels_in_a_bounds_checked_build(bc_dir):
    r = subprocess.run([sys.executable, "-c", _RUN], cwd=bc_dir, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])
