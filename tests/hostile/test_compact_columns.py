"""Hostile compact save plans (ckcore.compact): bad input is refused or planned in bounded time.

Torch-free. Findings of the review of the compact plan traffic:

* a props row with a huge number of dimensions (a few KiB packed) made rank
  0's planning compute ``math.prod`` of 300,000 large ints, a bignum product
  that takes minutes; the storage size now stops at int64's range;
* a format version that is not an int (an array) raised numpy's "truth
  value is ambiguous", and a part that is a list raised "unhashable type"
  from the table cache, instead of naming what was wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ckcore.compact import (
    CompactPlanError,
    WriteColumns,
    _storage_size,
    pack_write_columns,
    plan_columns,
    unpack_write_columns,
)

F32 = ("torch.float32", "torch.strided", False, "torch.contiguous_format", False)


def _cols(size, offs, sizes, kind=1):
    return WriteColumns(("x",), (F32 + (tuple(size),),), np.array([0]), np.array([kind], np.int8),
                        np.array([0]), np.array(offs, np.int64), np.array(sizes, np.int64))


def test_storage_size_is_exact_within_int64_and_stops_beyond():
    assert _storage_size((3, 0, 1 << 62), 4) == 0
    assert _storage_size((), 2) == 2
    assert _storage_size((7, 5), 4) == 140
    big = _storage_size((1 << 62,) * 300_000, 4)
    assert big > (1 << 63) - 1


def test_many_dimensions_plan_in_bounded_time():
    # In a child: before the fix this ran for minutes (the parent's timeout fails it).
    code = (
        "import numpy as np\n"
        "from ckcore.compact import WriteColumns, plan_columns, pack_write_columns, "
        "unpack_write_columns\n"
        "nd = 300_000\n"
        "p = ('torch.float32', 'torch.strided', False, 'torch.contiguous_format', False, "
        "(1 << 62,) * nd)\n"
        "c = WriteColumns(('x',), (p,), np.array([0]), np.array([0], np.int8), np.array([0]), "
        "np.zeros(nd, np.int64), np.full(nd, 1 << 62, np.int64))\n"
        "parts = pack_write_columns(c)\n"
        "assert sum(len(x) for x in parts[1:]) < 100_000\n"
        "got = unpack_write_columns(parts)\n"
        "assert plan_columns([got, got], dedup=True, save_to_lowest_rank=False, "
        "itemsize=lambda n: 4) is None\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("version", [np.array([1, 1]), 1.0, True, "1", None, (1,)])
def test_version_that_is_not_an_int_is_named(version):
    parts = pack_write_columns(_cols((4,), [0], [4]))
    with pytest.raises(CompactPlanError, match="format version"):
        unpack_write_columns((version,) + parts[1:])


@pytest.mark.parametrize("at", [1, 2, 3])
@pytest.mark.parametrize("bad", [[b"x"], bytearray(b"x"), None, 7])
def test_part_that_is_not_bytes_is_named(at, bad):
    # A list (unhashable) once escaped as TypeError from the table cache.
    parts = list(pack_write_columns(_cols((4,), [0], [4])))
    parts[at] = bad
    with pytest.raises(CompactPlanError, match="not bytes"):
        unpack_write_columns(tuple(parts), _tables={})


@pytest.mark.parametrize("offs,sizes", [([0, 6], [6, -2]), ([-2, 2], [4, 2]),
                                        ([(1 << 63) - 2, 0], [2, (1 << 63) - 2])])
def test_negative_or_overflowing_chunks_are_not_planned(offs, sizes):
    # Not a plan the columns cover: None, and the caller's object path gives torch's error.
    size = ((1 << 63) - 1,) if offs[0] > 100 else (4,)
    ranks = [_cols(size, [o], [s]) for o, s in zip(offs, sizes)]
    assert plan_columns(ranks, dedup=True, save_to_lowest_rank=False, itemsize=lambda n: 4) is None


def test_negative_tensor_size_is_a_value_error():
    ranks = [_cols((-4,), [0], [-4])] * 2
    with pytest.raises(ValueError):
        plan_columns(ranks, dedup=True, save_to_lowest_rank=False, itemsize=lambda n: 4)
