"""ckcore's torch-free dataclasses have torch's shape: fields, order, defaults, frozen, equality."""

from __future__ import annotations

import dataclasses
import enum

import pytest
import torch
import torch.distributed.checkpoint.metadata as tmd
import torch.distributed.checkpoint.planner as tpl
from hypothesis import given, settings
from hypothesis import strategies as st

import ckcore
import ckcore.metadata as cmd
import ckcore.planner as cpl
from ckcore.dtypes import normalize_dtype

METADATA_CLASSES = ["ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
                    "BytesStorageMetadata", "MetadataIndex", "Metadata", "StorageMeta"]
PLANNER_CLASSES = ["BytesIOWriteData", "TensorWriteData", "WriteItem", "ReadItem", "SavePlan",
                   "LoadPlan"]
PAIRS = ([(getattr(cmd, n), getattr(tmd, n)) for n in METADATA_CLASSES]
         + [(getattr(cpl, n), getattr(tpl, n)) for n in PLANNER_CLASSES])


def test_every_public_class_is_covered():
    # A class added to ckcore.metadata / ckcore.planner must be added to the parity list.
    for module, listed in ((cmd, METADATA_CLASSES), (cpl, PLANNER_CLASSES)):
        dataclass_names = {n for n in module.__all__
                           if dataclasses.is_dataclass(getattr(module, n))}
        assert dataclass_names == set(listed)


@pytest.mark.parametrize("ck,tc", PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_fields_in_the_same_order(ck, tc):
    ck_fields = dataclasses.fields(ck)
    tc_fields = dataclasses.fields(tc)
    assert [f.name for f in ck_fields] == [f.name for f in tc_fields]
    for a, b in zip(ck_fields, tc_fields):
        # Same required/optional split, and the same equality/hash participation.
        assert (a.default is dataclasses.MISSING and a.default_factory is dataclasses.MISSING) == (
            b.default is dataclasses.MISSING and b.default_factory is dataclasses.MISSING), a.name
        assert (a.compare, a.hash, a.init) == (b.compare, b.hash, b.init), a.name


@pytest.mark.parametrize("ck,tc", PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_frozen_and_eq_match(ck, tc):
    ck_params = ck.__dataclass_params__
    tc_params = tc.__dataclass_params__
    assert ck_params.frozen == tc_params.frozen
    assert ck_params.eq == tc_params.eq
    assert ck_params.order == tc_params.order
    assert (ck.__hash__ is None) == (tc.__hash__ is None)


def _plain(value):
    """Defaults as comparable plain values: torch objects by their ckcore names."""
    if isinstance(value, torch.dtype):
        return normalize_dtype(value)
    if isinstance(value, (torch.layout, torch.memory_format)):
        return str(value).removeprefix("torch.")
    return value


@pytest.mark.parametrize("ck,tc", PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_defaults_match(ck, tc):
    for a, b in zip(dataclasses.fields(ck), dataclasses.fields(tc)):
        da = a.default_factory() if a.default_factory is not dataclasses.MISSING else a.default
        db = b.default_factory() if b.default_factory is not dataclasses.MISSING else b.default
        assert _plain(da) == _plain(db), a.name


@pytest.mark.parametrize("name", ["WriteItemType", "LoadItemType"])
def test_enums_match(name):
    ck, tc = getattr(cpl, name), getattr(tpl, name)
    assert issubclass(ck, enum.Enum)
    assert [(m.name, m.value) for m in ck] == [(m.name, m.value) for m in tc]


FROZEN = [ck for ck, tc in PAIRS if tc.__dataclass_params__.frozen]


def test_frozen_list():
    assert {c.__name__ for c in FROZEN} == {"MetadataIndex", "BytesIOWriteData", "TensorWriteData",
                                            "WriteItem", "ReadItem", "SavePlan"}


@pytest.mark.parametrize("ck", FROZEN, ids=[c.__name__ for c in FROZEN])
def test_frozen_classes_refuse_assignment(ck):
    obj = _instance(ck)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, dataclasses.fields(ck)[0].name, None)


def _instance(cls):
    chunk = cmd.ChunkStorageMetadata((0,), (2,))
    return {
        cmd.MetadataIndex: lambda: cmd.MetadataIndex("w", (0,)),
        cpl.BytesIOWriteData: lambda: cpl.BytesIOWriteData(3),
        cpl.TensorWriteData: lambda: cpl.TensorWriteData(chunk, cmd.TensorProperties(), (2,)),
        cpl.WriteItem: lambda: cpl.WriteItem(cmd.MetadataIndex("w"), cpl.WriteItemType.BYTE_IO),
        cpl.ReadItem: lambda: cpl.ReadItem(cpl.LoadItemType.TENSOR, cmd.MetadataIndex("w", (0,)),
                                           (0,), cmd.MetadataIndex("w", (0,)), (0,), (2,)),
        cpl.SavePlan: lambda: cpl.SavePlan([]),
    }[cls]()


# ---------------------------------------------------------------------------
# MetadataIndex
# ---------------------------------------------------------------------------

offsets = st.lists(st.integers(0, 2**62), max_size=4)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["w", "layers.0.w", ""]), offsets, st.one_of(st.none(), st.integers(0, 9)),
       st.one_of(st.none(), st.integers(0, 9)))
def test_metadata_index_ignores_the_hint(fqn, off, i, j):
    for make in (tuple, list, torch.Size, iter):
        a = cmd.MetadataIndex(fqn, make(off), i)
        assert type(a.offset) is tuple and a.offset == tuple(off)
        b = cmd.MetadataIndex(fqn, tuple(off), j)
        assert a == b and hash(a) == hash(b)
        assert a.index == i
        # Same behaviour as torch's class, whose offset is a torch.Size.
        ta = tmd.MetadataIndex(fqn, torch.Size(off), i)
        tb = tmd.MetadataIndex(fqn, torch.Size(off), j)
        assert (ta == tb) == (a == b)
        assert ta.offset == a.offset and hash(ta.offset) == hash(a.offset)
    assert cmd.MetadataIndex(fqn, tuple(off)) != cmd.MetadataIndex(fqn, tuple(off) + (0,))
    assert cmd.MetadataIndex(fqn) != cmd.MetadataIndex(fqn, tuple(off))
    assert cmd.MetadataIndex(fqn + "x", tuple(off)) != cmd.MetadataIndex(fqn, tuple(off))


def test_metadata_index_defaults_and_dict_keys():
    m = cmd.MetadataIndex("w")
    t = tmd.MetadataIndex("w")
    assert (m.fqn, m.offset, m.index) == (t.fqn, t.offset, t.index) == ("w", None, None)
    d = {cmd.MetadataIndex("w", (0, 4), 1): "a"}
    assert d[cmd.MetadataIndex("w", [0, 4], 7)] == "a"
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.fqn = "v"
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.index = 3


# ---------------------------------------------------------------------------
# WriteItem.tensor_storage_size
# ---------------------------------------------------------------------------

def _element_size_works(dtype):
    try:
        torch._utils._element_size(dtype)
    except TypeError:
        return False
    return True


ALL_DTYPES = sorted({v for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)},
                    key=str)
SIZED = [d for d in ALL_DTYPES if _element_size_works(d)]
UNSIZED = [d for d in ALL_DTYPES if not _element_size_works(d)]


def _write_items(dtype, shape, chunk_shape):
    ck = cpl.WriteItem(
        index=cmd.MetadataIndex("w", (0,) * len(shape)), type=cpl.WriteItemType.SHARD,
        tensor_data=cpl.TensorWriteData(
            chunk=cmd.ChunkStorageMetadata((0,) * len(shape), chunk_shape),
            properties=cmd.TensorProperties(dtype=normalize_dtype(dtype)), size=tuple(shape)))
    tc = tpl.WriteItem(
        index=tmd.MetadataIndex("w", torch.Size((0,) * len(shape))), type=tpl.WriteItemType.SHARD,
        tensor_data=tpl.TensorWriteData(
            chunk=tmd.ChunkStorageMetadata(torch.Size((0,) * len(shape)), torch.Size(chunk_shape)),
            properties=tmd.TensorProperties(dtype=dtype), size=torch.Size(shape)))
    return ck, tc


def test_dtype_lists_are_not_empty():
    assert len(SIZED) >= 25 and torch.bfloat16 in SIZED and torch.float8_e5m2 in SIZED


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SIZED), st.lists(st.integers(0, 2**20), max_size=4))
def test_tensor_storage_size_equals_torch(dtype, shape):
    chunk = tuple(s // 2 for s in shape)
    ck, tc = _write_items(dtype, shape, chunk)
    # The global tensor's bytes (tensor_data.size), not the chunk's: dedup balances by it.
    assert ck.tensor_storage_size() == tc.tensor_storage_size()
    n = 1
    for s in shape:
        n *= s
    assert ck.tensor_storage_size() == n * dtype.itemsize


@pytest.mark.parametrize("dtype", UNSIZED, ids=str)
def test_tensor_storage_size_where_torch_cannot(dtype):
    # torch 2.13's _element_size raises for sub-byte ints/bits (uint1..7, int1..7, bits*);
    # ckcore uses dtype.itemsize (one byte per stored element) instead of failing.
    ck, tc = _write_items(dtype, (3, 5), (3, 5))
    with pytest.raises(TypeError):
        tc.tensor_storage_size()
    assert ck.tensor_storage_size() == 15 * dtype.itemsize


def test_tensor_storage_size_of_non_tensor_items():
    ck = cpl.WriteItem(cmd.MetadataIndex("b"), cpl.WriteItemType.BYTE_IO, cpl.BytesIOWriteData(9))
    tc = tpl.WriteItem(tmd.MetadataIndex("b"), tpl.WriteItemType.BYTE_IO, tpl.BytesIOWriteData(9))
    assert ck.tensor_storage_size() is None is tc.tensor_storage_size()


def test_tensor_properties_default_matches_torch_default_dtype():
    assert cmd.TensorProperties().dtype == normalize_dtype(tmd.TensorProperties().dtype)
    assert ckcore.TensorProperties is cmd.TensorProperties
