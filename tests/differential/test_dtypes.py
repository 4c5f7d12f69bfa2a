"""ckcore's torch-free dtype table against every dtype of the installed torch."""

from __future__ import annotations

import pytest
import torch

from ckcore import itemsize
from ckcore.dtypes import DTYPE_ITEMSIZE, normalize_dtype


def torch_dtypes():
    """Every torch.dtype reachable as ``torch.<name>``, with all its attribute names."""
    found: dict[torch.dtype, list[str]] = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            found.setdefault(value, []).append(name)
    return found


ALL = torch_dtypes()


def test_found_the_usual_dtypes():
    # Guards the discovery itself: if dir(torch) stopped listing dtypes this file would pass
    # vacuously.
    for d in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool,
              torch.complex128, torch.uint1, torch.quint4x2):
        assert d in ALL
    assert len(ALL) >= 40


@pytest.mark.parametrize("dtype", sorted(ALL, key=str), ids=str)
def test_itemsize_equals_torch(dtype):
    name = str(dtype).removeprefix("torch.")
    assert DTYPE_ITEMSIZE[name] == dtype.itemsize
    assert itemsize(name) == dtype.itemsize
    assert itemsize(dtype) == dtype.itemsize


@pytest.mark.parametrize("dtype", sorted(ALL, key=str), ids=str)
def test_normalize_dtype_of_torch_dtypes_and_names(dtype):
    name = str(dtype).removeprefix("torch.")
    assert normalize_dtype(dtype) == name
    assert normalize_dtype(str(dtype)) == name
    # Every attribute name torch accepts (torch.float, torch.half, torch.bit, ...).
    for alias in ALL[dtype]:
        assert normalize_dtype(alias) == name, alias
        assert normalize_dtype("torch." + alias) == name, alias


def test_table_has_nothing_torch_lacks():
    names = {str(d).removeprefix("torch.") for d in ALL}
    assert set(DTYPE_ITEMSIZE) == names


@pytest.mark.parametrize("bad", ["float33", "torch.floot", "", "Float32", None, 4])
def test_unknown_dtypes(bad):
    with pytest.raises(ValueError, match="unknown dtype"):
        normalize_dtype(bad)
    with pytest.raises(ValueError):
        itemsize(bad)
