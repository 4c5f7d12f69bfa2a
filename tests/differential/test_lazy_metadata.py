"""ColumnarMetadata (torch's Metadata built from columns) and planning from the columns.

- the object is torch's ``Metadata`` for third-party code: isinstance,
  fields, asdict, equality both ways, assignment, pickle in torch's format;
- ``FastLoadPlanner`` / the local load plan drop-in on columnar metadata give
  exactly torch's ``create_default_local_load_plan`` items (with and
  without the cover check), without building torch's chunk objects;
- ``RangeFileSystemReader`` reads it and loads element-exact.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import PosixPath

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ckcore.checkpoint import loads_metadata_columns
from ckcore.dcp import FastLoadPlanner, RangeFileSystemReader
from ckcore.dcp._lazy_metadata import ColumnarMetadata, columns_of
from ckcore.dcp.dropins import _local_load_plan
from tests.support.identical import assert_identical

from .test_helpers_torch import item_key

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _grid_md(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], *, with_bytes=True,
             storage_meta=True) -> tmd.Metadata:
    """torch Metadata of tensors cut into a grid (shape, parts per dim), plus a bytes item."""
    sdm: dict = {}
    sd: dict = {}
    for fqn, (shape, parts) in shapes.items():
        chunks = []
        import itertools
        cuts = [[(s * k) // p for k in range(p + 1)] for s, p in zip(shape, parts)]
        for idx in itertools.product(*[range(p) for p in parts]):
            off = torch.Size([cuts[d][i] for d, i in enumerate(idx)])
            sz = torch.Size([cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx)])
            chunks.append(tmd.ChunkStorageMetadata(off, sz))
            sd.setdefault(tmd.MetadataIndex(fqn, off, len(chunks) - 1),
                          _StorageInfo(f"__{len(chunks) % 2}_0.distcp", 10 * len(chunks), 10))
        sdm[fqn] = tmd.TensorStorageMetadata(
            tmd.TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)
    if with_bytes:
        sdm["step"] = tmd.BytesStorageMetadata()
        sd[tmd.MetadataIndex("step")] = _StorageInfo("__0_0.distcp", 0, 5)
    return tmd.Metadata(
        sdm, planner_data={k: tuple(k.split(".")) for k in sdm}, storage_data=sd,
        storage_meta=tmd.StorageMeta(checkpoint_id=PosixPath("/ck"), save_id="s")
        if storage_meta else None, version="1.0.0")


SHAPES = {"a.w": ((8, 6), (4, 3)), "b.w": ((5,), (3,)), "c.s": ((), ()), "d.w": ((4, 0, 2), (2, 1, 1))}


def _columnar(md: tmd.Metadata) -> ColumnarMetadata:
    return ColumnarMetadata(loads_metadata_columns(pickle.dumps(md), fallback=False))


def test_is_torch_metadata():
    md = _grid_md(SHAPES)
    lazy = _columnar(md)
    assert isinstance(lazy, tmd.Metadata)
    assert lazy.ck_built == frozenset()
    assert [f.name for f in dataclasses.fields(lazy)] == [f.name for f in dataclasses.fields(md)]
    assert lazy == md and md == lazy and not (lazy != md)
    # asdict of any storage_data fails for torch's own Metadata too (dict keys).
    md_nosd = dataclasses.replace(md, storage_data=None)
    assert dataclasses.asdict(_columnar(md_nosd)) == dataclasses.asdict(md_nosd)
    assert_identical(pickle.loads(pickle.dumps(md)), lazy)
    # torch's format: a plain Metadata comes back, equal field for field.
    back = pickle.loads(pickle.dumps(lazy))
    assert type(back) is tmd.Metadata
    assert_identical(back, pickle.loads(pickle.dumps(md)))
    assert type(copy.copy(lazy)) is tmd.Metadata and copy.deepcopy(lazy) == md
    assert "ColumnarMetadata" in repr(lazy)


def test_assignment_as_filesystem_writer_finish_does():
    md = _grid_md(SHAPES)
    lazy = _columnar(md)
    lazy.version = "2.0"
    lazy.storage_data = {}
    assert lazy.version == "2.0" and lazy.storage_data == {}
    assert lazy.ck_storage_view() is None          # the dict now holds
    assert columns_of(lazy) is not None            # the chunks still do
    lazy.state_dict_metadata = {}
    assert columns_of(lazy) is None
    replaced = dataclasses.replace(_columnar(md), version=None)
    assert replaced.version is None and replaced.state_dict_metadata == md.state_dict_metadata


def test_storage_view_equals_the_dict():
    md = _grid_md(SHAPES)
    view = _columnar(md).ck_storage_view()
    assert len(view) == len(md.storage_data)
    for key, info in md.storage_data.items():
        assert view[key] == info
        assert view[tmd.MetadataIndex(key.fqn, key.offset)] == info    # the hint plays no part
    assert tmd.MetadataIndex("a.w", torch.Size([1, 1])) not in view
    assert list(view) == list(md.storage_data)
    with pytest.raises(KeyError):
        view[tmd.MetadataIndex("nope")]


def _state_dict(shapes):
    sd: dict = {fqn: torch.zeros(shape) for fqn, (shape, _) in shapes.items()}
    sd["step"] = 0
    return sd


def _same_items(a, b):
    assert sorted(map(item_key, a), key=repr) == sorted(map(item_key, b), key=repr)


@pytest.mark.parametrize("check_cover", [False, True])
@pytest.mark.parametrize("strict", [True, False])
def test_load_plan_from_columns_equals_torch(check_cover, strict):
    md = _grid_md(SHAPES)
    state = _state_dict(SHAPES)
    if not strict:
        state["missing"] = torch.zeros(2)
    lazy = _columnar(md)
    ours = _local_load_plan(state, lazy, strict, check_cover)
    assert lazy.ck_built == frozenset()            # no torch chunk object was built
    if strict:
        want = create_default_local_load_plan(state, md, strict)
        _same_items(ours.items, want.items)
        # The items are torch's classes, index hints included.
        assert [(i.storage_index.index, type(i.storage_index.offset)) for i in ours.items] == \
            [(i.storage_index.index, type(i.storage_index.offset)) for i in
             _local_load_plan(state, md, strict, check_cover).items]
    else:
        state.pop("missing")
        _same_items(ours.items, create_default_local_load_plan(state, md, True).items)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       parts=st.lists(st.integers(1, 3), min_size=4, max_size=4))
def test_hypothesis_layouts(shape, parts):
    parts = [min(p, max(s, 1)) for s, p in zip(shape, parts)]
    shapes = {"t": (tuple(shape), tuple(parts))}
    md = _grid_md(shapes, with_bytes=False)
    state = _state_dict(shapes)
    state.pop("step")
    ours = _local_load_plan(state, _columnar(md), True, False)
    _same_items(ours.items, create_default_local_load_plan(state, md, True).items)


def test_missing_key_and_size_mismatch_as_torch():
    md = _grid_md(SHAPES)
    with pytest.raises(RuntimeError, match="Missing key in checkpoint state_dict: nope"):
        _local_load_plan({"nope": torch.zeros(1)}, _columnar(md), True, False)
    with pytest.raises(ValueError, match=r"Size mismatch between saved torch.Size\(\[8, 6\]\)"):
        _local_load_plan({"a.w": torch.zeros(3)}, _columnar(md), True, False)


def test_cover_check_refuses_a_hole():
    md = _grid_md({"a.w": ((8, 6), (4, 3))}, with_bytes=False)
    chunks = md.state_dict_metadata["a.w"].chunks
    del chunks[3]
    with pytest.raises(ValueError, match="does not fill a.w"):
        _local_load_plan({"a.w": torch.zeros(8, 6)}, _columnar(md), True, True)


def test_save_then_load_through_the_range_reader(tmp_path):
    state = {"w": torch.randn(6, 4), "b": torch.arange(5), "s": torch.tensor(3.0), "step": 9}
    dcp.save(state, checkpoint_id=str(tmp_path))
    reader = RangeFileSystemReader(str(tmp_path))
    md = reader.read_metadata()
    assert isinstance(md, ColumnarMetadata)
    assert md == dcp.FileSystemReader(str(tmp_path)).read_metadata() or md.storage_meta.load_id
    out = {"w": torch.zeros(6, 4), "b": torch.zeros(5, dtype=torch.int64), "s": torch.tensor(0.0),
           "step": 0}
    dcp.load(out, storage_reader=RangeFileSystemReader(str(tmp_path)), planner=FastLoadPlanner())
    for k in ("w", "b", "s"):
        assert torch.equal(out[k], state[k])
    assert out["step"] == 9


@pytest.mark.parametrize("verify", [True, False])
def test_fast_load_planner_plans_from_the_columns(verify):
    md = _grid_md(SHAPES)
    state = _state_dict(SHAPES)
    lazy = _columnar(md)
    planner = FastLoadPlanner(verify_metadata=verify)
    planner.set_up_planner(state, lazy, is_coordinator=False)
    plan = planner.create_local_plan()
    assert "state_dict_metadata" not in lazy.ck_built
    _same_items(plan.items, create_default_local_load_plan(state, md, True).items)
