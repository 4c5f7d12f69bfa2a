"""The planning façade against the installed torch, on the same inputs.

Read items: ``ckcore.intersect_chunks``, ``create_read_items_for_chunk_list``
and ``create_read_items`` against torch's ``create_read_items_for_chunk_list``
and ``_create_read_items``, as multisets of items compared field by field
(torch's order follows its sweep line, ckcore's is canonical), on grids,
irregular, MoE, nested, duplicated, zero-size, 0-d to 8-d and near-2**62
layouts. ckcore is also fed torch's own chunk objects and asked to build
torch's own classes, which then compare with ``==``.

Write items and plan helpers: ckcore's constructors and
``compare_save_plans`` / ``contains_usable_plan`` / ``merge_delta_local_plans``
against torch's private helpers of the same role.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint.metadata as tmd
import torch.distributed.checkpoint.planner as tpl
import torch.distributed.checkpoint.planner_helpers as tph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import (
    TensorProperties as ShardedTensorProperties,
)

import ckcore
from ckcore.dtypes import normalize_dtype
from tests.support import reference as ref
from tests.support.layouts import (
    HUGE,
    chunk_cuts,
    layout,
    layout_pair,
    product,
    shapes,
    zero_d_pair,
)

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TORCH_CLASSES = ckcore.ItemClasses(read_item=tpl.ReadItem, metadata_index=tmd.MetadataIndex,
                                   load_item_type=tpl.LoadItemType, size=torch.Size)


# ---------------------------------------------------------------------------
# Converters and field-by-field keys
# ---------------------------------------------------------------------------

def torch_chunks(boxes):
    return [tmd.ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in boxes]


def ck_chunks(boxes):
    return [ckcore.ChunkStorageMetadata(offsets=o, sizes=s) for o, s in boxes]


def torch_md(shape, boxes):
    return tmd.TensorStorageMetadata(properties=tmd.TensorProperties(dtype=torch.float32),
                                     size=torch.Size(shape), chunks=torch_chunks(boxes))


def ck_md(shape, boxes):
    return ckcore.TensorStorageMetadata(properties=ckcore.TensorProperties(), size=tuple(shape),
                                        chunks=ck_chunks(boxes))


def index_key(ix):
    return (ix.fqn, None if ix.offset is None else tuple(ix.offset), ix.index)


def item_key(item):
    """Every field of a ReadItem, as plain values (the index hint included)."""
    return (item.type.name, index_key(item.dest_index), tuple(item.dest_offsets),
            index_key(item.storage_index), tuple(item.storage_offsets), tuple(item.lengths))


def assert_same_items(got, expected):
    assert len(got) == len(expected)
    assert Counter(map(item_key, got)) == Counter(map(item_key, expected))


def assert_canonical(items):
    keys = [(it.dest_index.index, it.storage_index.index) for it in items]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


def check_read_items(shape, local, saved, fqn="model.layers.0.w"):
    """ckcore vs torch on one layout, every way ckcore can be called. Returns torch's items."""
    expected = tph.create_read_items_for_chunk_list(fqn, torch_md(shape, saved),
                                                    torch_chunks(local))

    # ckcore's own classes.
    got = ckcore.create_read_items_for_chunk_list(fqn, ck_md(shape, saved), ck_chunks(local))
    assert_same_items(got, expected)
    assert_canonical(got)
    assert all(type(it) is ckcore.ReadItem and type(it.lengths) is tuple for it in got)

    # torch's chunk objects in, torch's classes out: then dataclass == works directly.
    got_t = ckcore.create_read_items_for_chunk_list(fqn, torch_md(shape, saved),
                                                    torch_chunks(local), TORCH_CLASSES)
    assert Counter(got_t) == Counter(expected)
    assert_same_items(got_t, expected)
    assert all(type(it) is tpl.ReadItem and type(it.dest_offsets) is torch.Size
               and type(it.storage_index.offset) is torch.Size for it in got_t)

    # The array form agrees with the item form, pair for pair.
    r = ckcore.intersect_chunks(ck_chunks(local), ck_chunks(saved), fqn=fqn, ndim=len(shape))
    assert len(r) == len(got)
    assert [(it.dest_index.index, it.storage_index.index) for it in got] == list(
        zip(r.local_index.tolist(), r.saved_index.tolist()))
    nd = len(shape)
    for arr in (r.storage_offsets, r.dest_offsets, r.lengths):
        assert arr.dtype == np.int64 and arr.shape == (len(got), nd)
    assert [tuple(x) for x in r.storage_offsets.tolist()] == [it.storage_offsets for it in got]
    assert [tuple(x) for x in r.dest_offsets.tolist()] == [it.dest_offsets for it in got]
    assert [tuple(x) for x in r.lengths.tolist()] == [it.lengths for it in got]

    # And the array form accepts (offsets, sizes) arrays as well as chunk lists.
    if local and saved:
        arrs = [np.array([b[k] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
                for boxes in (local, saved) for k in (0, 1)]
        r2 = ckcore.intersect_chunks((arrs[0], arrs[1]), (arrs[2], arrs[3]), fqn=fqn)
        for a, b in zip(r, r2):
            np.testing.assert_array_equal(a, b)
    return expected


# ---------------------------------------------------------------------------
# Read items: hypothesis differential tests
# ---------------------------------------------------------------------------

@SETTINGS
@given(layout_pair())
def test_read_items_random_layouts(case):
    check_read_items(*case)


@SETTINGS
@given(st.data())
def test_read_items_grid_to_grid(data):
    shape = data.draw(shapes(1, 8))
    saved = data.draw(layout(shape, "grid"))
    local = data.draw(layout(shape, "grid"))
    check_read_items(shape, local, saved)


@SETTINGS
@given(st.data())
def test_read_items_irregular(data):
    shape = data.draw(shapes(2, 4))
    saved = data.draw(layout(shape, data.draw(st.sampled_from(["moe", "bricks", "nested"]))))
    local_kind = data.draw(st.sampled_from(["moe", "bricks", "random", "zero"]))
    local = data.draw(layout(shape, local_kind))
    check_read_items(shape, local, saved)


@settings(max_examples=30, deadline=None)
@given(zero_d_pair())
def test_read_items_zero_d(case):
    expected = check_read_items(*case)
    assert len(expected) == len(case[1]) * len(case[2])


def test_read_items_matches_reference_too():
    # Ties the torch tests to the kernel tests: torch, ckcore and the reference agree.
    shape = (7, 10)
    saved = product([chunk_cuts(7, 3), chunk_cuts(10, 4)])
    local = [((0, 0), (7, 10)), ((3, 3), (0, 2)), ((2, 5), (5, 5))]
    expected = check_read_items(shape, local, saved)
    pairs = ref.intersect(local, saved)
    assert sorted((it.dest_index.index, it.storage_index.index, tuple(it.storage_offsets),
                   tuple(it.dest_offsets), tuple(it.lengths)) for it in expected) == pairs


def test_read_items_zero_size_inside_and_on_boundary():
    shape = (8, 8)
    saved = [((0, 0), (4, 8)), ((4, 0), (4, 8))]
    local = [((2, 3), (0, 2)),   # zero rows strictly inside saved 0
             ((4, 0), (0, 8)),   # zero rows on the boundary between saved 0 and 1
             ((8, 0), (0, 8)),   # on the far edge
             ((1, 1), (3, 0))]   # zero columns, strictly inside saved 0
    expected = check_read_items(shape, local, saved)
    assert sorted((it.dest_index.index, it.storage_index.index) for it in expected) == [
        (0, 0), (3, 0)]
    assert all(0 in it.lengths for it in expected)


def test_read_items_huge_offsets():
    base = HUGE - 2**30
    shape = (base + 2**40, 3)
    saved = [((base, 0), (2**39, 3)), ((base + 2**39, 0), (2**39, 3))]
    local = [((base + 2**39 - 5, 1), (10, 2)), ((base, 0), (2**40, 3))]
    check_read_items(shape, local, saved)
    # A single 1-d dimension of extent near 2**62, cut torch.chunk-style.
    extent = HUGE + 3
    saved = [((o,), (s,)) for o, s in chunk_cuts(extent, 3)]
    local = [((o,), (s,)) for o, s in chunk_cuts(extent, 4)]
    expected = check_read_items((extent,), local, saved)
    assert sum(it.lengths[0] for it in expected) == extent


def test_read_items_duplicate_saved_chunks():
    shape = (4, 4)
    saved = [((0, 0), (4, 4)), ((0, 0), (4, 4)), ((0, 0), (2, 4))]
    local = [((1, 1), (2, 2))]
    expected = check_read_items(shape, local, saved)
    assert sorted(it.storage_index.index for it in expected) == [0, 1, 2]


def test_read_items_empty_lists():
    one = [((0,), (4,))]
    assert ckcore.create_read_items_for_chunk_list("w", ck_md((4,), []), ck_chunks(one)) == []
    assert ckcore.create_read_items_for_chunk_list("w", ck_md((4,), one), []) == []
    assert tph.create_read_items_for_chunk_list("w", torch_md((4,), []), torch_chunks(one)) == []


# ---------------------------------------------------------------------------
# _create_read_items: whole tensors and bytes
# ---------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_create_read_items_whole_tensor(data):
    shape = data.draw(shapes(0, 6))
    saved = data.draw(layout(shape)) if shape else [((), ())] * data.draw(st.integers(1, 3))
    tensor = torch.empty(shape, device="meta")
    expected = tph._create_read_items("w", torch_md(shape, saved), tensor)
    whole = [((0,) * len(shape), tuple(shape))]
    got = ckcore.create_read_items("w", ck_md(shape, saved), ck_chunks(whole))
    assert_same_items(got, expected)
    got_t = ckcore.create_read_items("w", torch_md(shape, saved), torch_chunks(whole),
                                     TORCH_CLASSES)
    assert Counter(got_t) == Counter(expected)


def test_create_read_items_bytes():
    expected = tph._create_read_items("extra_state", tmd.BytesStorageMetadata(), b"payload")
    assert len(expected) == 1
    for md in (ckcore.BytesStorageMetadata(), tmd.BytesStorageMetadata()):
        got = ckcore.create_read_items("extra_state", md)
        assert_same_items(got, expected)
        assert got == [ckcore.ReadItem(
            type=ckcore.LoadItemType.BYTE_IO, dest_index=ckcore.MetadataIndex("extra_state"),
            dest_offsets=(0,), storage_index=ckcore.MetadataIndex("extra_state"),
            storage_offsets=(0,), lengths=(0,))]
        got_t = ckcore.create_read_items("extra_state", md, classes=TORCH_CLASSES)
        assert got_t == expected
        assert type(got_t[0].lengths) is torch.Size


# ---------------------------------------------------------------------------
# Write items
# ---------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64,
          torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn, torch.uint32]


def ck_properties(tp):
    """ckcore TensorProperties equal to torch's (dtype by name)."""
    return ckcore.TensorProperties(
        dtype=normalize_dtype(tp.dtype), layout=str(tp.layout).removeprefix("torch."),
        requires_grad=tp.requires_grad,
        memory_format=str(tp.memory_format).removeprefix("torch."), pin_memory=tp.pin_memory)


def write_item_key(w):
    """Every field of a WriteItem as plain values; dtypes by ckcore name."""
    td = w.tensor_data
    tkey = None
    if td is not None:
        p = td.properties
        tkey = (tuple(td.chunk.offsets), tuple(td.chunk.sizes), tuple(td.size),
                normalize_dtype(p.dtype), str(p.layout).removeprefix("torch."), p.requires_grad,
                str(p.memory_format).removeprefix("torch."), p.pin_memory)
    return (index_key(w.index), w.type.name, w.bytes_io_data, tkey, w.tensor_storage_size())


@SETTINGS
@given(shapes(0, 8), st.sampled_from(DTYPES))
def test_write_item_for_tensor(shape, dtype):
    tensor = torch.empty(shape, dtype=dtype, device="meta")
    expected = tph._create_write_item_for_tensor("w", tensor)
    got = ckcore.create_write_item_for_tensor(
        "w", shape, ck_properties(expected.tensor_data.properties))
    assert write_item_key(got) == write_item_key(expected)
    assert type(got.index.offset) is tuple and type(got.tensor_data.size) is tuple
    # Default properties are float32, like torch's default dtype.
    default = ckcore.create_write_item_for_tensor("w", torch.Size(shape))
    assert default.tensor_data.properties == ckcore.TensorProperties()
    assert default.tensor_storage_size() == tph._create_write_item_for_tensor(
        "w", torch.empty(shape, device="meta")).tensor_storage_size()


def test_write_item_for_tensor_huge_shape():
    shape = (HUGE // 8, 2)
    expected = tph._create_write_item_for_tensor("w", torch.empty(shape, device="meta"))
    got = ckcore.create_write_item_for_tensor("w", shape)
    assert write_item_key(got) == write_item_key(expected)


class _FakeShardedTensor:
    """Just enough ShardedTensor for torch's ``_create_write_item_for_shard``.

    torch only calls ``metadata()``; building a real ShardedTensor needs a
    process group, which a unit test should not start.
    """

    def __init__(self, md):
        self._md = md

    def metadata(self):
        return self._md


@SETTINGS
@given(st.data())
def test_write_item_for_shard(data):
    shape = data.draw(shapes(1, 6))
    boxes = data.draw(layout(shape, data.draw(st.sampled_from(["grid", "moe", "bricks"]))))
    dtype = data.draw(st.sampled_from(DTYPES))
    props = ShardedTensorProperties(dtype=dtype, requires_grad=data.draw(st.booleans()))
    shards = [ShardMetadata(shard_offsets=list(o), shard_sizes=list(s), placement="rank:0/cpu")
              for o, s in boxes]
    st_md = ShardedTensorMetadata(shards_metadata=shards, size=torch.Size(shape),
                                  tensor_properties=props)
    fake = _FakeShardedTensor(st_md)
    for (o, s), shard in zip(boxes, shards):
        expected = tph._create_write_item_for_shard("layer.w", fake, shard)
        got = ckcore.create_write_item_for_shard(
            "layer.w", o, s, shape, ck_properties(expected.tensor_data.properties))
        assert write_item_key(got) == write_item_key(expected)


def test_write_item_for_bytesio():
    expected = tph._create_write_item_for_bytesio("step", 3)
    got = ckcore.create_write_item_for_bytesio("step")
    assert write_item_key(got) == write_item_key(expected)
    assert got == ckcore.WriteItem(index=ckcore.MetadataIndex("step"),
                                   type=ckcore.WriteItemType.BYTE_IO)


# ---------------------------------------------------------------------------
# Plan helpers on random plans
# ---------------------------------------------------------------------------

@st.composite
def item_specs(draw):
    """An abstract write item: (kind, fqn, offset, index hint, size, chunk)."""
    kind = draw(st.sampled_from(["TENSOR", "SHARD", "BYTE_IO"]))
    fqn = draw(st.sampled_from(["a", "b", "layers.0.w"]))
    hint = draw(st.one_of(st.none(), st.integers(0, 3)))
    if kind == "BYTE_IO":
        return (kind, fqn, None, hint, None, None)
    nd = draw(st.integers(0, 3))
    size = tuple(draw(st.integers(0, 6)) for _ in range(nd))
    off = tuple(draw(st.integers(0, e)) for e in size)
    sizes = tuple(draw(st.integers(0, e - o)) for o, e in zip(off, size))
    return (kind, fqn, off, hint, size, (off, sizes))


def mutate(draw, spec):
    kind, fqn, off, hint, size, chunk = spec
    what = draw(st.sampled_from(["kind", "fqn", "off", "hint", "size", "chunk_off", "chunk_size",
                                 "no_tensor_data"]))
    if what == "kind":
        kind = draw(st.sampled_from([k for k in ("TENSOR", "SHARD", "BYTE_IO") if k != kind]))
        if kind == "BYTE_IO":
            size = chunk = off = None
        elif size is None:
            off, size, chunk = (0,), (1,), ((0,), (1,))
    elif what == "fqn":
        fqn = fqn + "_x"
    elif what == "off":
        off = None if off is None else off + (0,)
    elif what == "hint":
        hint = 7 if hint is None else None
    elif what == "size" and size is not None:
        size = size + (1,)
    elif what == "chunk_off" and chunk is not None:
        chunk = (chunk[0] + (1,), chunk[1])
    elif what == "chunk_size" and chunk is not None:
        chunk = (chunk[0], chunk[1] + (1,))
    elif what == "no_tensor_data" and kind != "BYTE_IO":
        return (kind, fqn, off, hint, None, None)
    return (kind, fqn, off, hint, size, chunk)


def build_item(spec, torch_side):
    kind, fqn, off, hint, size, chunk = spec
    m, p = (tmd, tpl) if torch_side else (ckcore, ckcore)
    wrap = torch.Size if torch_side else tuple
    td = None
    if size is not None:
        props = (tmd.TensorProperties(dtype=torch.float32) if torch_side
                 else ckcore.TensorProperties())
        td = p.TensorWriteData(chunk=m.ChunkStorageMetadata(wrap(chunk[0]), wrap(chunk[1])),
                               properties=props, size=wrap(size))
    return p.WriteItem(index=m.MetadataIndex(fqn, off, hint), type=p.WriteItemType[kind],
                       tensor_data=td)


def build_plan(specs, usable, torch_side):
    p = tpl if torch_side else ckcore
    return p.SavePlan(items=[build_item(s, torch_side) for s in specs], usable=usable)


@st.composite
def plan_pairs(draw):
    specs = draw(st.lists(item_specs(), max_size=5))
    other = list(specs)
    usable = draw(st.booleans())
    other_usable = usable
    change = draw(st.sampled_from(["same", "usable", "drop", "add", "mutate", "mutate"]))
    if change == "usable":
        other_usable = not usable
    elif change == "drop" and other:
        other.pop(draw(st.integers(0, len(other) - 1)))
    elif change == "add":
        other.insert(draw(st.integers(0, len(other))), draw(item_specs()))
    elif change == "mutate" and other:
        k = draw(st.integers(0, len(other) - 1))
        other[k] = mutate(draw, other[k])
    return (specs, usable), (other, other_usable)


@settings(max_examples=200, deadline=None)
@given(plan_pairs())
def test_compare_save_plans(pair):
    (a, ua), (b, ub) = pair
    expected = tph._compare_save_plans(build_plan(a, ua, True), build_plan(b, ub, True))
    assert ckcore.compare_save_plans(build_plan(a, ua, False), build_plan(b, ub, False)) is expected
    # Duck typing: ckcore's helper on torch's plans. (A ckcore plan never equals a torch
    # plan: their WriteItemType enums differ, as two unrelated enums do.)
    assert ckcore.compare_save_plans(build_plan(a, ua, True), build_plan(b, ub, True)) is expected


def test_compare_save_plans_sees_every_field():
    base = [("SHARD", "w", (0, 2), 1, (4, 4), ((0, 2), (4, 2)))]
    plan = build_plan(base, True, False)
    assert ckcore.compare_save_plans(plan, build_plan(base, True, False))
    for changed in (("TENSOR", "w", (0, 2), 1, (4, 4), ((0, 2), (4, 2))),
                    ("SHARD", "v", (0, 2), 1, (4, 4), ((0, 2), (4, 2))),
                    ("SHARD", "w", (0, 0), 1, (4, 4), ((0, 2), (4, 2))),
                    ("SHARD", "w", (0, 2), 2, (4, 4), ((0, 2), (4, 2))),
                    ("SHARD", "w", (0, 2), 1, (4, 5), ((0, 2), (4, 2))),
                    ("SHARD", "w", (0, 2), 1, (4, 4), ((0, 0), (4, 2))),
                    ("SHARD", "w", (0, 2), 1, (4, 4), ((0, 2), (4, 1)))):
        other = build_plan([changed], True, False)
        assert not ckcore.compare_save_plans(plan, other)
        assert not tph._compare_save_plans(build_plan(base, True, True),
                                           build_plan([changed], True, True))
    assert not ckcore.compare_save_plans(plan, build_plan(base, False, False))


plan_slots = st.sampled_from(["none", "usable", "unusable"])


def slot_plan(slot, torch_side, tag):
    if slot == "none":
        return None
    p = tpl if torch_side else ckcore
    return p.SavePlan(items=[], usable=slot == "usable", planner_data=tag)


@settings(max_examples=100, deadline=None)
@given(st.lists(plan_slots, max_size=6))
def test_contains_usable_plan(slots):
    for torch_side in (True, False):
        plans = [slot_plan(s, torch_side, i) for i, s in enumerate(slots)]
        assert ckcore.contains_usable_plan(plans) is tph._contains_usable_plan(plans)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(plan_slots, plan_slots), max_size=6))
def test_merge_delta_local_plans(pairs):
    for torch_side in (True, False):
        cached = [slot_plan(c, torch_side, ("cached", i)) for i, (c, _) in enumerate(pairs)]
        delta = [slot_plan(d, torch_side, ("delta", i)) for i, (_, d) in enumerate(pairs)]
        expected = tph._merge_delta_local_plans(cached, delta)
        got = ckcore.merge_delta_local_plans(cached, delta)
        assert len(got) == len(expected)
        # The very same objects, position by position.
        assert all(g is e for g, e in zip(got, expected))


def test_merge_delta_local_plans_refuses_mismatched_lengths():
    cached = [tpl.SavePlan([], usable=True) for _ in range(3)]
    delta = [tpl.SavePlan([], usable=False) for _ in range(2)]
    # torch zips silently and drops the third rank ...
    assert len(tph._merge_delta_local_plans(cached, delta)) == 2
    # ... ckcore refuses: a lost or added rank is an error, not a shorter plan list.
    with pytest.raises(ValueError, match="3 cached plans but 2 delta plans"):
        ckcore.merge_delta_local_plans(cached, delta)
    with pytest.raises(ValueError):
        ckcore.merge_delta_local_plans(cached[:1], delta)


# ---------------------------------------------------------------------------
# The dataclasses themselves interoperate
# ---------------------------------------------------------------------------

def test_metadata_index_equal_across_libraries():
    a = ckcore.MetadataIndex("w", (0, 4), 3)
    b = tmd.MetadataIndex("w", torch.Size([0, 4]), 9)
    assert (a.fqn, a.offset) == (b.fqn, b.offset)
    assert hash(a.offset) == hash(b.offset)
    assert dataclasses.astuple(ckcore.ChunkStorageMetadata((1, 2), (3, 4))) == dataclasses.astuple(
        tmd.ChunkStorageMetadata(torch.Size([1, 2]), torch.Size([3, 4])))


def test_read_items_many_distinct_rows():
    # Thousands of items with distinct offset rows: past the first table size of the
    # kernel's row cache (rows are interned there), against torch.
    shape = (60, 70)
    saved = product([chunk_cuts(60, 30), chunk_cuts(70, 35)])
    local = [((0, 0), (60, 70)), ((1, 1), (58, 67))]
    local += product([chunk_cuts(60, 7), chunk_cuts(70, 3)])
    expected = check_read_items(shape, local, saved)
    assert len(expected) > 2000
    assert len({it.dest_offsets for it in expected}) > 1024


def test_mismatched_ndim_torch_truncates_ckcore_refuses():
    # torch zips a 1-d local chunk against 2-d saved chunks and returns a 1-d read item
    # of a 2-d tensor; ckcore names the tensor and the chunk instead.
    local = [((1,), (2,))]
    saved = [((0, 0), (4, 4))]
    items = tph.create_read_items_for_chunk_list("w", torch_md((4, 4), saved), torch_chunks(local))
    assert len(items) == 1 and len(items[0].lengths) == 1
    for md, chunks in ((ck_md((4, 4), saved), ck_chunks(local)),
                       (torch_md((4, 4), saved), torch_chunks(local))):
        with pytest.raises(ValueError, match=r"w: chunk 0 .* 1 dimensions but the tensor has 2"):
            ckcore.create_read_items_for_chunk_list("w", md, chunks)
