"""Test session setup.

``--torch-free`` runs only the test modules that do not import torch (and
none marked ``needs_torch``, for modules whose subprocesses import it), and
insists that torch really is absent: it is how CI proves that ckcore works
without torch installed. Without the flag every module runs, and the
differential tests import torch unconditionally (they never skip).
"""

from __future__ import annotations

import importlib.util
import re

import pytest

_IMPORTS_TORCH = re.compile(r"^\s*(import torch|from torch[. ])", re.MULTILINE)


def pytest_addoption(parser):
    parser.addoption(
        "--torch-free",
        action="store_true",
        default=False,
        help="run only the test modules that do not import torch (torch must be absent)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_torch: needs torch although the module does not import it itself")
    if config.getoption("--torch-free") and importlib.util.find_spec("torch") is not None:
        raise pytest.UsageError("--torch-free needs an environment without torch installed")


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("--torch-free"):
        return None
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        text = collection_path.read_text(encoding="utf-8")
        if _IMPORTS_TORCH.search(text):
            return True
    return None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--torch-free"):
        return
    keep = [item for item in items if item.get_closest_marker("needs_torch") is None]
    deselected = [item for item in items if item.get_closest_marker("needs_torch") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
