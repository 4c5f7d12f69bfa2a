"""The column writer: torch's own reader loads what ``dumps_metadata`` writes, field for field.

``pickle.loads(dumps_metadata(MetadataColumns.from_metadata(md)))`` must be
identical (classes, ``torch.Size``, dtypes, ``_StorageInfo`` without None
fields, index hints, paths, dict order) to ``pickle.loads(pickle.dumps(md))``,
and ckcore's safe readers must accept it. ``FastFileSystemWriter`` in a real
``dcp.save`` writes a checkpoint torch's plain reader loads element-exact.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ckcore.checkpoint import loads_metadata, loads_metadata_columns
from ckcore.dcp import ColumnarMetadata, FastFileSystemWriter
from ckcore.mdcolumns import MetadataColumns, dumps_metadata
from tests.support.identical import assert_identical

from .test_mdcolumns_read import _torch_md

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _check(md) -> None:
    cols = MetadataColumns.from_metadata(md)
    data = dumps_metadata(cols)
    assert_identical(pickle.loads(pickle.dumps(md)), pickle.loads(data))
    assert loads_metadata(data) == loads_metadata(pickle.dumps(md))
    assert loads_metadata_columns(data, fallback=False) == cols


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.lists(st.integers(0, 8), min_size=0, max_size=4),
    n_chunks=st.integers(0, 5),
    storage_meta=st.booleans(),
    version=st.sampled_from([None, "1.0.0"]),
    planner_data=st.booleans(),
    td=st.booleans(),
    huge=st.booleans(),
    bytes_items=st.integers(0, 2),
    string_id=st.booleans(),
)
def test_torch_reads_what_ckcore_writes(dims, n_chunks, storage_meta, version, planner_data, td,
                                        huge, bytes_items, string_id):
    _check(_torch_md(dims, n_chunks, storage_meta=storage_meta, version=version,
                     planner_data=planner_data, td=td, huge=huge, bytes_items=bytes_items,
                     string_id=string_id))


def test_adversarial_values():
    md = _torch_md([1, 0, 8], 1200, storage_meta=True, version="1.0.0", planner_data=True,
                   td=True, huge=True, bytes_items=2, string_id=False)
    md.planner_data = {"a": ("x", 1, -5, 2**40, 1.5, None, True, ["l"], {"d": ()})}
    md.state_dict_metadata["m.layer0.weight"].properties.memory_format = torch.channels_last
    _check(md)
    md.storage_data = None
    _check(md)
    md.storage_meta = None
    md.planner_data = None
    md.version = None
    _check(md)


def test_unwritable_values_are_refused():
    md = _torch_md([2], 2, storage_meta=False, version=None, planner_data=False, td=False,
                   huge=False, bytes_items=0, string_id=False)
    md.planner_data = {"x": object()}
    with pytest.raises(TypeError, match="cannot write a object"):
        dumps_metadata(MetadataColumns.from_metadata(md))
    md.planner_data = {"x": 2**70}
    with pytest.raises(ValueError, match="beyond int64"):
        dumps_metadata(MetadataColumns.from_metadata(md))


class _ColumnarSavePlanner(DefaultSavePlanner):
    """torch's planner whose global Metadata carries columns (as a save-side planner builds them)."""

    def create_global_plan(self, all_plans):
        plans, md = super().create_global_plan(all_plans)
        return plans, ColumnarMetadata(MetadataColumns.from_metadata(md))


def test_real_save_and_plain_torch_load(tmp_path):
    state = {"w": torch.randn(6, 4), "b": torch.arange(5), "s": torch.tensor(3.0),
             "h": torch.randn(2, 3).to(torch.bfloat16), "step": 9, "nested": {"lr": 0.5}}
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    dcp.save(state, storage_writer=FastFileSystemWriter(str(fast)),
             planner=_ColumnarSavePlanner())
    dcp.save(state, storage_writer=FileSystemWriter(str(plain)))
    got = FileSystemReader(str(fast)).read_metadata()
    want = FileSystemReader(str(plain)).read_metadata()
    for field in ("state_dict_metadata", "planner_data", "storage_data", "version"):
        assert_identical(getattr(want, field), getattr(got, field), field)
    assert type(got.storage_meta.checkpoint_id) is type(want.storage_meta.checkpoint_id)
    out = {"w": torch.zeros(6, 4), "b": torch.zeros(5, dtype=torch.int64), "s": torch.tensor(0.0),
           "h": torch.zeros(2, 3, dtype=torch.bfloat16), "step": 0, "nested": {"lr": 0.0}}
    dcp.load(out, storage_reader=FileSystemReader(str(fast)))
    for k in ("w", "b", "s", "h"):
        assert torch.equal(out[k], state[k])
    assert out["step"] == 9 and out["nested"] == {"lr": 0.5}


def test_plain_metadata_is_written_as_torch_writes_it(tmp_path):
    state = {"w": torch.randn(3, 2)}
    dcp.save(state, storage_writer=FastFileSystemWriter(str(tmp_path)))
    out = {"w": torch.zeros(3, 2)}
    dcp.load(out, storage_reader=FileSystemReader(str(tmp_path)))
    assert torch.equal(out["w"], state["w"])
