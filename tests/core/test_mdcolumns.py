"""MetadataColumns (torch-free): construction from arrays, conversions, lookups, the column reader.

The reader's differential tests against torch's pickle are in
tests/differential/test_mdcolumns_read.py; its hostile tests in
tests/hostile/test_columns.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ckcore.checkpoint import CheckpointError, loads_metadata, loads_metadata_columns
from ckcore.mdcolumns import BYTES, TENSOR, MetadataColumns

from ..support.streams import sample_metadata, torchify

P = ("float32", "strided", False, "contiguous_format", False)


def _args(**over):
    args = dict(
        kinds=[TENSOR, BYTES, TENSOR], properties=[P, None, P],
        size_ptr=[0, 2, 2, 2], size_values=[4, 4],
        chunk_ptr=[0, 2, 2, 3], chunk_offsets=[0, 0, 2, 0], chunk_sizes=[2, 4, 2, 4],
        st_fqn=[0, 0, 1], st_offset_ndim=[2, 2, -1], st_offset_values=[0, 0, 2, 0],
        st_index=[0, 1, -1], st_path=[0, 0, 0], paths=["__0_0.distcp"],
        st_file_offset=[0, 10, 20], st_length=[10, 10, 5],
    )
    args.update(over)
    return args


def test_arrays_round_trip():
    cols = MetadataColumns(["w", "b", "s"], **_args())
    off, sz = cols.chunks("s")
    assert off.shape == (1, 0) and sz.shape == (1, 0)
    assert cols.chunks(0)[0].tolist() == [[0, 0], [2, 0]]
    assert not cols.chunks(0)[0].flags.writeable
    md = cols.to_metadata()
    assert MetadataColumns.from_metadata(md) == cols
    assert cols.storage_row("w", (2, 0)) == 1
    assert cols.storage_row("b") == 2
    assert cols.storage_row("w", (1, 0)) == -1 and cols.storage_row("nope") == -1
    assert cols.storage_info(1).offset == 10


@pytest.mark.parametrize("field, value, match", [
    ("size_ptr", [0, 2, 2], "size_ptr has 3 entries, want 4"),
    ("size_ptr", [1, 2, 2, 2], "size_ptr must start at 0"),
    ("chunk_ptr", [0, 2, 1, 3], "chunk_ptr must not decrease"),
    ("chunk_offsets", [0, 0, 2], "chunk_offsets has 3 entries, want 4"),
    ("chunk_sizes", [2, 4, -2, 4], "chunk_sizes has a value below 0"),
    ("kinds", [TENSOR, 7, TENSOR], "kinds must be"),
    ("st_fqn", [0, 0, 9], "st_fqn has an id outside"),
    ("st_path", [0, 0, 3], "st_path has an id outside"),
    ("st_offset_ndim", [2, 2, -2], "st_offset_ndim has a value below -1"),
    ("st_offset_values", [0, 0, 2], "st_offset_values has 3 entries, want 4"),
    ("st_length", [10, 10], "st_length has 2 entries, want 3"),
    ("properties", [P, P, P], r"properties\[1\] must be None"),
    ("chunk_offsets", [0.5, 0, 2, 0], "chunk_offsets must be an int64 array"),
    ("size_values", [2**64 - 1, 4], "size_values"),
    ("size_values", np.array([2**64 - 1, 4], dtype=np.uint64), "size_values has values beyond int64"),
])
def test_bad_arrays_name_the_field(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MetadataColumns(["w", "b", "s"], **_args(**{field: value}))


def test_duplicate_fqns_refused():
    with pytest.raises(ValueError, match="fqns has duplicates"):
        MetadataColumns(["w", "w", "s"], **_args())


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reader_on_torch_style_streams(protocol):
    data = torchify(sample_metadata(), protocol=protocol)
    got = loads_metadata_columns(data, fallback=False)
    assert got == MetadataColumns.from_metadata(loads_metadata(data))
    assert got.to_metadata() == loads_metadata(data)


def test_fallback_reads_what_the_machine_does_not_model():
    from collections import OrderedDict

    md = sample_metadata()
    md.planner_data = OrderedDict(md.planner_data)   # REDUCE of OrderedDict: not modelled
    data = torchify(md, protocol=4)
    with pytest.raises(CheckpointError, match="column reader does not read this file"):
        loads_metadata_columns(data, fallback=False)
    assert loads_metadata_columns(data) == MetadataColumns.from_metadata(loads_metadata(data))


def test_reader_bad_arguments():
    with pytest.raises(TypeError):
        loads_metadata_columns("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="larger than the cap"):
        loads_metadata_columns(b"x" * 100, max_bytes=10)


def test_columns_arrays_are_int64():
    cols = loads_metadata_columns(torchify(sample_metadata(), protocol=4), fallback=False)
    for name in ("size_ptr", "chunk_offsets", "st_fqn", "st_file_offset"):
        assert getattr(cols, name).dtype == np.int64
