"""Packaging facts a user relies on: one version, the license shipped, the torch range stated."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ckcore

REPO = Path(__file__).resolve().parents[1]


def _distribution() -> importlib.metadata.Distribution:
    try:
        dist = importlib.metadata.distribution("ckcore")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ckcore is imported from a source tree, not installed (CI tests the wheel)")
    return dist


def test_version_is_written_once():
    text = (REPO / "ckcore" / "_version.py").read_text()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', text, re.MULTILINE)
    assert ckcore.__version__ in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.MULTILINE)


def test_installed_metadata_matches_the_package():
    dist = _distribution()
    assert dist.version == ckcore.__version__
    assert dist.metadata["License-Expression"] == "BSD-3-Clause"
    files = {f.name for f in dist.files or ()}
    assert "LICENSE" in files


def test_license_file_is_the_declared_license():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert 'license = "BSD-3-Clause"' in (REPO / "pyproject.toml").read_text()


def test_build_requirements_are_the_ones_used():
    pyproject = (REPO / "pyproject.toml").read_text()
    requires = re.search(r"^requires = \[(.*)\]$", pyproject, re.MULTILINE).group(1)
    # No kernel cimports numpy: numpy is a run-time dependency only.
    assert "numpy" not in requires
    for pyx in (REPO / "ckcore" / "_kernels").glob("*.p*x*"):
        assert "cimport numpy" not in pyx.read_text(), pyx


def test_torch_extra_matches_the_tested_range():
    pyproject = (REPO / "pyproject.toml").read_text()
    extra = re.search(r'^torch = \["torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"\]$', pyproject, re.MULTILINE)
    assert extra, "the torch extra must have both bounds"
    lo = (int(extra.group(1)), int(extra.group(2)))
    hi = (int(extra.group(3)), int(extra.group(4)))
    compat = (REPO / "ckcore" / "dcp" / "_compat.py").read_text()
    assert f"TESTED_TORCH = (({lo[0]}, {lo[1]}), ({hi[0]}, {hi[1]}))" in compat


@pytest.mark.needs_torch
def test_dcp_warns_once_at_import_outside_the_tested_torch(tmp_path):
    # A child process: ckcore.dcp must be imported fresh, with torch reporting
    # a release outside the tested range, and the warning must name the
    # importing line (the user's code), not ckcore's.
    script = tmp_path / "user_code.py"
    script.write_text(
        "import warnings\n"
        "import torch\n"
        "torch.__version__ = '2.99.0'\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import ckcore.dcp\n"
        "ours = [w for w in seen if w.category.__name__ == 'UntestedTorchWarning']\n"
        "assert len(ours) == 1, [str(w.message) for w in seen]\n"
        "assert 'torch 2.99.0' in str(ours[0].message), ours[0].message\n"
        "assert ours[0].filename == __file__, ours[0].filename\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(ckcore.__file__).parent.parent))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.needs_torch
def test_dcp_is_silent_with_the_tested_torch(tmp_path):
    script = tmp_path / "user_code.py"
    script.write_text(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import ckcore.dcp\n"
        "ours = [w for w in seen if w.category.__name__ == 'UntestedTorchWarning']\n"
        "assert not ours, [str(w.message) for w in ours]\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(ckcore.__file__).parent.parent))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
