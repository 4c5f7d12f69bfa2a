"""Packaging facts a user relies on: one version, the license shipped, the torch range stated."""

from __future__ import annotations

import importlib.metadata
import re

import pytest

import ckcore
from tests.support.paths import REPO


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
