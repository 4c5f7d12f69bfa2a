"""The docstring examples of ``ckcore.dcp.*`` (they import torch); the rest: tests/core/test_doctests.py."""

from __future__ import annotations

import pytest

from tests.core.test_doctests import package_modules, run_doctests

DCP = package_modules(torch=True)


def test_walk_finds_the_dcp_modules():
    assert "ckcore.dcp" in DCP and "ckcore.dcp.convert" in DCP


@pytest.mark.parametrize("name", DCP)
def test_docstring_examples(name):
    result = run_doctests(name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
