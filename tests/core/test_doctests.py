"""Every docstring example in the package runs: doctest over every ckcore module.

The modules are found by walking the installed package's folders (nothing is
imported to find them), so a new module is covered without touching this
file. The torch-free modules run here (both passes); ``ckcore.dcp.*`` needs
torch and runs in tests/differential/test_doctests_dcp.py. ``ckcore.__main__``
is left out: importing it runs the command line.

Each module's examples see the package's top-level names (``ckcore.*``) and
the module's own, with ``ELLIPSIS`` on.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckcore

PACKAGE_DIR = Path(ckcore.__file__).resolve().parent


def _walk(path: Path, prefix: str) -> Iterator[str]:
    for info in pkgutil.iter_modules([str(path)]):
        name = prefix + info.name
        yield name
        if info.ispkg:
            yield from _walk(path / info.name, name + ".")


def package_modules(*, torch: bool) -> list[str]:
    """ckcore and its modules: those of ckcore.dcp if ``torch``, else all the others."""
    out = []
    for name in ["ckcore", *_walk(PACKAGE_DIR, "ckcore.")]:
        if name == "ckcore.__main__":
            continue
        if (name == "ckcore.dcp" or name.startswith("ckcore.dcp.")) == torch:
            out.append(name)
    return sorted(out)


def run_doctests(name: str) -> doctest.TestResults:
    mod = importlib.import_module(name)
    globs = dict(vars(ckcore))
    globs.update(vars(mod))
    return doctest.testmod(mod, globs=globs, optionflags=doctest.ELLIPSIS, verbose=False)


TORCH_FREE = package_modules(torch=False)


def test_walk_finds_the_modules():
    for name in ("ckcore.layout", "ckcore.ranges", "ckcore._kernels._intersect"):
        assert name in TORCH_FREE
    assert not [m for m in TORCH_FREE if m.startswith("ckcore.dcp")]


@pytest.mark.parametrize("name", TORCH_FREE)
def test_docstring_examples(name):
    result = run_doctests(name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
