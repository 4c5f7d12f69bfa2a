"""Round trips of ckcore.dcp.convert: torch <-> ckcore for metadata, storage info and plans."""

from __future__ import annotations

import io
import warnings
from pathlib import PosixPath

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint import planner as tpl
from torch.distributed.checkpoint.default_planner import (
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix

from ckcore import metadata as cmd
from ckcore import planner as cpl
from ckcore.checkpoint import StorageInfo, load_metadata
from ckcore.dcp.convert import dtype_from_torch, dtype_to_torch, from_torch, to_torch
from ckcore.dtypes import DTYPE_ITEMSIZE

TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
LAYOUTS = [v for v in vars(torch).values() if isinstance(v, torch.layout)]
MEMORY_FORMATS = [v for v in vars(torch).values() if isinstance(v, torch.memory_format)]

_n = st.integers(0, 2**63 - 1)


def _dims(ndim):
    return st.lists(_n, min_size=ndim, max_size=ndim).map(tuple)


# ckcore-side strategies ---------------------------------------------------------------

c_props = st.builds(
    cmd.TensorProperties,
    dtype=st.sampled_from(sorted(DTYPE_ITEMSIZE)),
    layout=st.sampled_from([str(v)[6:] for v in LAYOUTS]),
    requires_grad=st.booleans(),
    memory_format=st.sampled_from([str(v)[6:] for v in MEMORY_FORMATS]),
    pin_memory=st.booleans(),
)


@st.composite
def c_chunk(draw, ndim=None):
    ndim = draw(st.integers(0, 8)) if ndim is None else ndim
    return cmd.ChunkStorageMetadata(draw(_dims(ndim)), draw(_dims(ndim)))


@st.composite
def c_tensor_md(draw):
    ndim = draw(st.integers(0, 8))
    return cmd.TensorStorageMetadata(
        draw(c_props), draw(_dims(ndim)), draw(st.lists(c_chunk(ndim), max_size=4))
    )


c_index = st.builds(
    cmd.MetadataIndex,
    fqn=st.text(max_size=12),
    offset=st.one_of(st.none(), st.integers(0, 8).flatmap(_dims)),
    index=st.one_of(st.none(), st.integers(0, 1000)),
)
c_storage_info = st.builds(
    StorageInfo,
    relative_path=st.text(min_size=1, max_size=12),
    offset=_n,
    length=_n,
    transform_descriptors=st.one_of(st.none(), st.lists(st.text(max_size=6), max_size=2)),
)
c_storage_meta = st.builds(
    cmd.StorageMeta,
    checkpoint_id=st.sampled_from([None, "ck", PosixPath("/a/b")]),
    save_id=st.one_of(st.none(), st.text(max_size=6)),
    load_id=st.one_of(st.none(), st.text(max_size=6)),
    modules=st.lists(st.text(max_size=4), max_size=3),
)
c_metadata = st.builds(
    cmd.Metadata,
    state_dict_metadata=st.dictionaries(
        st.text(max_size=10), st.one_of(c_tensor_md(), st.just(cmd.BytesStorageMetadata())), max_size=5
    ),
    planner_data=st.one_of(
        st.none(), st.dictionaries(st.text(max_size=5), st.tuples(st.text(max_size=3), st.integers()), max_size=3)
    ),
    storage_data=st.one_of(st.none(), st.dictionaries(c_index, c_storage_info, max_size=5)),
    storage_meta=st.one_of(st.none(), c_storage_meta),
    version=st.sampled_from([None, "1.0.0"]),
)


@st.composite
def c_write_item(draw):
    kind = draw(st.sampled_from(list(cpl.WriteItemType)))
    if kind is cpl.WriteItemType.BYTE_IO:
        return cpl.WriteItem(
            draw(c_index), kind,
            bytes_io_data=draw(st.one_of(st.none(), st.builds(cpl.BytesIOWriteData, _n))),
        )
    ndim = draw(st.integers(0, 8))
    td = cpl.TensorWriteData(draw(c_chunk(ndim)), draw(c_props), draw(_dims(ndim)))
    return cpl.WriteItem(draw(c_index), kind, tensor_data=td)


@st.composite
def c_read_item(draw):
    ndim = draw(st.integers(0, 8))
    return cpl.ReadItem(
        draw(st.sampled_from(list(cpl.LoadItemType))),
        draw(c_index), draw(_dims(ndim)), draw(c_index), draw(_dims(ndim)), draw(_dims(ndim)),
    )


c_save_plan = st.builds(
    cpl.SavePlan,
    items=st.lists(c_write_item(), max_size=5),
    storage_data=st.one_of(st.none(), st.builds(_StoragePrefix, st.text(max_size=5))),
    planner_data=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.tuples(st.text(max_size=3)))),
    usable=st.booleans(),
)
c_load_plan = st.builds(
    cpl.LoadPlan,
    items=st.lists(c_read_item(), max_size=5),
    storage_data=st.one_of(st.none(), st.text(max_size=4)),
    planner_data=st.none(),
)


def _assert_torch_types(obj):
    """Every shape in a converted torch object is a torch.Size, every dtype a torch.dtype."""
    if isinstance(obj, tmd.Metadata):
        for v in obj.state_dict_metadata.values():
            _assert_torch_types(v)
        for k, v in (obj.storage_data or {}).items():
            _assert_torch_types(k)
            assert type(v) is _StorageInfo
    elif isinstance(obj, tmd.TensorStorageMetadata):
        assert type(obj.size) is torch.Size
        _assert_torch_types(obj.properties)
        for c in obj.chunks:
            assert type(c.offsets) is torch.Size and type(c.sizes) is torch.Size
    elif isinstance(obj, tmd.TensorProperties):
        assert isinstance(obj.dtype, torch.dtype) and isinstance(obj.layout, torch.layout)
        assert isinstance(obj.memory_format, torch.memory_format)
    elif isinstance(obj, tmd.MetadataIndex):
        assert obj.offset is None or type(obj.offset) is torch.Size
    elif isinstance(obj, (tpl.SavePlan, tpl.LoadPlan)):
        for i in obj.items:
            _assert_torch_types(i)
    elif isinstance(obj, tpl.WriteItem):
        assert type(obj.type) is tpl.WriteItemType
        _assert_torch_types(obj.index)
        if obj.tensor_data is not None:
            assert type(obj.tensor_data.size) is torch.Size
            _assert_torch_types(obj.tensor_data.properties)
    elif isinstance(obj, tpl.ReadItem):
        assert type(obj.type) is tpl.LoadItemType
        for f in (obj.dest_offsets, obj.storage_offsets, obj.lengths):
            assert type(f) is torch.Size


@settings(max_examples=120, deadline=None)
@given(obj=st.one_of(c_metadata, c_save_plan, c_load_plan, c_write_item(), c_read_item(), c_storage_info, c_index))
def test_ckcore_to_torch_and_back(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = to_torch(obj)
    assert type(t).__module__.startswith("torch.")
    _assert_torch_types(t)
    back = from_torch(t)
    assert back == obj
    assert type(back) is type(obj)


@settings(max_examples=60, deadline=None)
@given(item=c_write_item())
def test_tensor_storage_size_agrees_with_torch(item):
    t = to_torch(item)
    if item.tensor_data is not None and item.tensor_data.properties.dtype.startswith(("qu", "qi")):
        return  # torch's _element_size raises for quantized dtypes
    try:
        expected = t.tensor_storage_size()
    except TypeError:  # torch.iinfo/finfo do not know bits*/sub-byte dtypes
        return
    assert item.tensor_storage_size() == expected


def test_torch_dtypes_by_name():
    for dt in TORCH_DTYPES:
        name = dtype_from_torch(dt)
        assert name == str(dt)[6:]
        assert dtype_to_torch(name) is dt
        assert DTYPE_ITEMSIZE[name] == dt.itemsize
    assert dtype_to_torch("half") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_to_torch("float33")


def _state_dict():
    return {
        "w": torch.randn(4, 6).to(torch.bfloat16),
        "b": torch.zeros(()),
        "sub": {"f8": torch.zeros(3, dtype=torch.float8_e5m2)},
        "blob": io.BytesIO(b"x"),
        "step": 7,
    }


def test_real_plans_round_trip():
    sd = _state_dict()
    plan = create_default_local_save_plan(sd, is_coordinator=True)
    ours = from_torch(plan)
    assert type(ours) is cpl.SavePlan and all(type(i) is cpl.WriteItem for i in ours.items)
    assert to_torch(ours) == plan
    for a, b in zip(ours.items, plan.items):
        assert a.tensor_storage_size() == b.tensor_storage_size()


def test_load_plan_from_safely_read_metadata_equals_torch(tmp_path):
    sd = _state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=tmp_path)
    theirs = dcp.FileSystemReader(tmp_path).read_metadata()
    ours = load_metadata(tmp_path)
    # torch plans a load from the converted torch-free metadata exactly as from its own.
    flat = {"w": sd["w"], "b": sd["b"], "sub.f8": sd["sub"]["f8"], "blob": sd["blob"], "step": 7}
    plan_theirs = create_default_local_load_plan(flat, theirs)
    plan_ours = create_default_local_load_plan(flat, to_torch(ours))
    assert plan_ours == plan_theirs
    assert to_torch(from_torch(plan_theirs)) == plan_theirs
    assert from_torch(plan_theirs) == from_torch(plan_ours)


def test_unknown_values_pass_through_and_containers_are_walked():
    marker = object()
    assert from_torch(marker) is marker and to_torch(marker) is marker
    t = {"k": [torch.Size([1, 2]), (torch.bfloat16, "s")]}
    assert from_torch(t) == {"k": [(1, 2), ("bfloat16", "s")]}
    assert type(from_torch(t)["k"][0]) is tuple
    assert from_torch(torch.channels_last) == "channels_last"
    assert from_torch(torch.sparse_csr) == "sparse_csr"
    assert from_torch(tpl.WriteItemType.SHARD) is cpl.WriteItemType.SHARD
    assert to_torch(cpl.LoadItemType.BYTE_IO) is tpl.LoadItemType.BYTE_IO


def test_subclasses_convert_as_their_base():
    class MyMetadata(tmd.Metadata):
        pass

    md = MyMetadata({"x": tmd.BytesStorageMetadata()}, version="1.0.0")
    assert from_torch(md) == cmd.Metadata({"x": cmd.BytesStorageMetadata()}, version="1.0.0")
