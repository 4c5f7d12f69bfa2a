"""Differential tests: every drop-in of ckcore.dcp.dropins against torch's own function.

Single process. DTensors for any rank of any mesh are built without a process
group (``DeviceMesh(..., _init_backend=False, _rank=r)``), so one process sees
the layout of every rank, including ranks outside a submesh. ShardedTensors
need a default group: a FakeStore "fake" group, set up and torn down here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import random
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint._dedup_save_plans as t_dedup
import torch.distributed.checkpoint.default_planner as t_dp
import torch.distributed.checkpoint.planner_helpers as t_ph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Partial, _StridedShard

import ckcore
import ckcore.dcp as cdcp
from ckcore._kernels import _items
from ckcore.dcp import dropins as ch
from tests.support.reference import fills_exactly
from tests.support.torch_chunks import chunk as _chunk
from tests.support.torch_chunks import grid as _grid

ORIG = ch.ORIGINALS
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------
# canonical forms: compare torch objects field by field, index hints included
# ----------------------------------------------------------------------------


def _mi(m: MetadataIndex):
    return (m.fqn, None if m.offset is None else tuple(m.offset), m.index)


def _ri(r: ReadItem):
    assert type(r) is ReadItem
    for f in (r.dest_offsets, r.storage_offsets, r.lengths):
        assert type(f) is torch.Size
    assert type(r.dest_index) is MetadataIndex and type(r.storage_index) is MetadataIndex
    return (
        r.type.name,
        _mi(r.dest_index),
        tuple(r.dest_offsets),
        _mi(r.storage_index),
        tuple(r.storage_offsets),
        tuple(r.lengths),
    )


def _wi(w: WriteItem):
    assert type(w) is WriteItem
    td = w.tensor_data
    tdk = None
    if td is not None:
        tdk = (
            tuple(td.chunk.offsets),
            tuple(td.chunk.sizes),
            type(td.chunk.offsets),
            type(td.chunk.sizes),
            td.properties,
            tuple(td.size),
        )
    return (_mi(w.index), type(w.index.offset), w.type.name, w.bytes_io_data, tdk)


def same_reads(ours, theirs):
    """Same multiset of read items, and ours in canonical (local, saved) order."""
    a = [_ri(r) for r in ours]
    b = [_ri(r) for r in theirs]
    assert sorted(a, key=repr) == sorted(b, key=repr)
    # Within one fqn, ours come by local index then saved index.
    by_fqn: dict = {}
    for x in a:
        if x[0] == "TENSOR":
            by_fqn.setdefault(x[1][0], []).append((x[1][2], x[3][2]))
    for keys in by_fqn.values():
        assert keys == sorted(keys)


def same_writes(ours, theirs):
    assert [_wi(w) for w in ours] == [_wi(w) for w in theirs]


def _saveplan(p: SavePlan):
    return ([_wi(w) for w in p.items], p.storage_data, p.planner_data, p.usable)


# ----------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------


@st.composite
def grid_layout(draw, shape):
    splits = [draw(st.lists(st.integers(0, n), max_size=3)) for n in shape]
    return _grid(shape, splits)


@st.composite
def random_boxes(draw, shape, max_n=6):
    """Arbitrary (possibly overlapping, possibly zero-size) boxes inside ``shape``."""
    n = draw(st.integers(0, max_n))
    out = []
    for _ in range(n):
        offs, sizes = [], []
        for d in shape:
            o = draw(st.integers(0, d))
            offs.append(o)
            sizes.append(draw(st.integers(0, d - o)))
        out.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)))
    return out


@st.composite
def read_case(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    big = draw(st.booleans()) and ndim > 0
    saved = draw(st.one_of(grid_layout(shape), random_boxes(shape)))
    local = draw(st.one_of(grid_layout(shape), random_boxes(shape)))
    if big:
        # Translate everything near 2**62: offsets must survive int64 untouched.
        base = 2**62 - 100

        def shift(cs):
            return [_chunk([o + base for o in c.offsets], c.sizes) for c in cs]

        saved, local = shift(saved), shift(local)
        shape = tuple(s + base for s in shape)
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), saved)
    return md, local


@SETTINGS
@given(read_case())
def test_create_read_items_for_chunk_list_matches_torch(case):
    md, local = case
    ours = ch.create_read_items_for_chunk_list("w.x", md, local)
    theirs = ORIG["create_read_items_for_chunk_list"]("w.x", md, local)
    same_reads(ours, theirs)


ADVERSARIAL = [
    # 0-d: every pair overlaps with empty tuples.
    ((), [((), ())] * 2, [((), ())] * 3),
    # zero-size chunk strictly inside another: torch emits a zero-length item.
    ((8,), [((0,), (8,))], [((3,), (0,))]),
    # zero-size chunk on a boundary: no item (the one test where torch emits none).
    ((8,), [((0,), (4,)), ((4,), (4,))], [((4,), (0,)), ((8,), (0,))]),
    # ... but a zero-size chunk at an inner offset of a saved chunk does overlap it.
    ((8,), [((0,), (4,)), ((4,), (4,))], [((5,), (0,))]),
    # 8-d, everything split in two in every dim vs one whole chunk.
    (
        (2,) * 8,
        [(c, (1,) * 8) for c in itertools.product((0, 1), repeat=8)],
        [((0,) * 8, (2,) * 8)],
    ),
    # MoE-style: experts of different sizes along dim 0, loaded as an even split.
    (
        (20, 4),
        [((0, 0), (3, 4)), ((3, 0), (9, 4)), ((12, 0), (1, 4)), ((13, 0), (7, 4))],
        [((0, 0), (10, 4)), ((10, 0), (10, 4))],
    ),
    # offsets near 2**62
    (
        (2**62 + 10,),
        [((0,), (2**62,)), ((2**62,), (10,))],
        [((2**62 - 1,), (11,))],
    ),
]


@pytest.mark.parametrize("shape,saved,local", ADVERSARIAL)
def test_create_read_items_adversarial(shape, saved, local):
    def mk(cs):
        return [_chunk(o, s) for o, s in cs]

    md = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size(shape), mk(saved))
    ours = ch.create_read_items_for_chunk_list("t", md, mk(local))
    theirs = ORIG["create_read_items_for_chunk_list"]("t", md, mk(local))
    # Only a zero-size chunk lying on chunk boundaries may read nothing.
    assert len(theirs) > 0 or all(0 in c[1] for c in local)
    same_reads(ours, theirs)


def test_empty_lists():
    md = TensorStorageMetadata(TensorProperties(), torch.Size([4]), [])
    assert (
        ch.create_read_items_for_chunk_list(
            "t", md, [ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))]
        )
        == []
    )
    md.chunks.append(ChunkStorageMetadata(torch.Size([0]), torch.Size([4])))
    assert ch.create_read_items_for_chunk_list("t", md, []) == []


# ----------------------------------------------------------------------------
# DTensor layouts, every rank, no process group
# ----------------------------------------------------------------------------


def _mesh(shape, rank, ranks=None):
    n = 1
    for s in shape:
        n *= s
    ids = torch.arange(n) if ranks is None else torch.tensor(ranks)
    return DeviceMesh("cpu", ids.reshape(shape), _init_backend=False, _rank=rank)


def _dtensor(global_shape, mesh, placements, device="cpu", dtype=torch.float32):
    """A DTensor of ``global_shape`` as seen by ``mesh``'s rank (local data uninitialised)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if mesh.get_coordinate() is None:
        local_shape = (0,)
    else:
        local_shape, _ = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    local = torch.zeros(local_shape, device=device, dtype=dtype)
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, placements, shape=torch.Size(global_shape), stride=stride, run_check=False
    )


DT_LAYOUTS = [
    # (global shape, mesh shape, placements, mesh ranks or None)
    ((16, 12), (4,), [Shard(0)], None),
    ((13, 7), (4,), [Shard(0)], None),  # uneven
    ((3, 7), (4,), [Shard(0)], None),  # empty trailing shard
    ((16, 12), (2, 4), [Shard(0), Shard(1)], None),
    ((17, 11), (2, 3), [Shard(1), Shard(0)], None),
    ((16, 12), (2, 4), [Replicate(), Shard(1)], None),
    ((16, 12), (2, 4), [Shard(0), Shard(0)], None),  # FSDP x TP on one dim
    ((24, 5), (2, 4), [_StridedShard(0, split_factor=4), Shard(0)], None),  # FSDP2 + TP strided
    ((10,), (2, 2), [Shard(0), Replicate()], None),
    ((6, 4, 5), (2, 2, 2), [Shard(2), Shard(0), Shard(1)], None),
    ((8, 8), (2,), [Shard(1)], [3, 5]),  # submesh: most ranks are not in it
    ((), (4,), [Replicate()], None),  # 0-d replicated
]


def _dt_cases():
    for shape, mshape, pl, ranks in DT_LAYOUTS:
        n = 1
        for s in mshape:
            n *= s
        world = range(max(ranks) + 2) if ranks else range(n)
        for r in world:
            yield shape, mshape, pl, ranks, r


@pytest.mark.parametrize("shape,mshape,pl,ranks,rank", list(_dt_cases()))
def test_dtensor_chunks_and_items_match_torch(shape, mshape, pl, ranks, rank):
    mesh = _mesh(mshape, rank, ranks)
    dt = _dtensor(shape, mesh, pl)
    for _ in range(2):  # second round hits the chunk memo
        assert ch._create_chunk_list(dt) == ORIG["_create_chunk_list"](dt)
        same_writes(ch._create_write_items("d", dt), ORIG["_create_write_items"]("d", dt))
        assert ch._create_chunk_from_dtensor(dt) == ORIG["_create_chunk_from_dtensor"](dt)
        same_writes(
            [ch._create_write_items_for_dtensor("d", dt)],
            [ORIG["_create_write_items_for_dtensor"]("d", dt)],
        )
        same_writes(
            ch._create_default_metadata_only_plan({"d": dt}).items,
            ORIG["_create_default_metadata_only_plan"]({"d": dt}).items,
        )
        same_writes(
            ch.create_default_local_save_plan({"d": dt}, rank == 0).items,
            ORIG["create_default_local_save_plan"]({"d": dt}, rank == 0).items,
        )
    # A checkpoint saved as a different layout: even split along the last dim.
    sizes = torch.Size(shape)
    saved = (
        _grid(shape, [[n // 3, n // 2] for n in shape])
        if shape
        else [ChunkStorageMetadata(torch.Size([]), torch.Size([]))]
    )
    md = Metadata({"d": TensorStorageMetadata(TensorProperties(), sizes, saved)})
    if mesh.get_coordinate() is not None:
        same_reads(
            ch._create_read_items("d", md.state_dict_metadata["d"], dt),
            ORIG["_create_read_items"]("d", md.state_dict_metadata["d"], dt),
        )
    same_reads(
        ch.create_default_local_load_plan({"d": dt}, md).items,
        ORIG["create_default_local_load_plan"]({"d": dt}, md).items,
    )


@st.composite
def dtensor_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 13)) for _ in range(ndim))
    mshape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3))))
    pls = []
    for m in mshape:
        kind = draw(st.sampled_from(["shard", "shard", "replicate", "strided"]))
        d = draw(st.integers(0, ndim - 1))
        if kind == "shard":
            pls.append(Shard(d))
        elif kind == "replicate":
            pls.append(Replicate())
        else:
            pls.append(_StridedShard(d, split_factor=draw(st.integers(1, 4))))
    n = 1
    for m in mshape:
        n *= m
    rank = draw(st.integers(0, n))  # n: a rank outside the mesh
    saved_splits = [draw(st.lists(st.integers(0, s), max_size=3)) for s in shape]
    return shape, mshape, pls, rank, saved_splits


def _outcome(fn, *args):
    # What a call returns, or the type of what it raises (torch refuses some
    # strided layouts; ckcore must refuse the same ones).
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001
        return ("raised", type(e))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtensor_case())
def test_dtensor_random_layouts_match_torch(case):
    shape, mshape, pls, rank, saved_splits = case
    n = 1
    for m in mshape:
        n *= m
    mesh = DeviceMesh("cpu", torch.arange(n).reshape(mshape), _init_backend=False, _rank=rank)
    dt = _dtensor(shape, mesh, pls)
    for _ in range(2):  # cold, then memoised
        ours, theirs = _outcome(ch._create_chunk_list, dt), _outcome(ORIG["_create_chunk_list"], dt)
        assert ours == theirs
        ours = _outcome(ch._create_write_items, "d", dt)
        theirs = _outcome(ORIG["_create_write_items"], "d", dt)
        assert ours[0] == theirs[0]
        if ours[0] == "ok":
            same_writes(ours[1], theirs[1])
    md = Metadata(
        {
            "d": TensorStorageMetadata(
                TensorProperties(), torch.Size(shape), _grid(shape, saved_splits)
            )
        }
    )
    ours = _outcome(ch.create_default_local_load_plan, {"d": dt}, md)
    theirs = _outcome(ORIG["create_default_local_load_plan"], {"d": dt}, md)
    assert ours[0] == theirs[0]
    if ours[0] == "ok":
        same_reads(ours[1].items, theirs[1].items)


def test_dtensor_partial_placement_refused_like_torch():
    mesh = _mesh((2,), 0)
    dt = _dtensor((4, 4), mesh, [Partial()])
    for name in ("_create_chunk_list", "_create_write_items"):
        with pytest.raises(ValueError, match="partial placements") as e_t:
            (ORIG[name](dt) if name == "_create_chunk_list" else ORIG[name]("p", dt))
        with pytest.raises(ValueError) as e_c:
            (getattr(ch, name)(dt) if name == "_create_chunk_list" else getattr(ch, name)("p", dt))
        assert str(e_c.value) == str(e_t.value)


def test_dtensor_memo_key_distinguishes_layouts():
    # Same shape and mesh shape, different coordinate / placements -> different chunks.
    seen = set()
    for rank in range(4):
        for pl in ([Shard(0)], [Shard(1)], [Replicate()]):
            dt = _dtensor((8, 8), _mesh((4,), rank), pl)
            c = ch._create_chunk_list(dt)[0]
            assert c == ORIG["_create_chunk_list"](dt)[0]
            seen.add((tuple(c.offsets), tuple(c.sizes)))
    assert len(seen) == 1 + 4 + 4


# ----------------------------------------------------------------------------
# ShardedTensor, plain tensors, bytes, nested state dicts
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_tensor(rank=1, world=4, rows=3):
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import (
        Shard as STShard,
    )
    from torch.distributed._shard.sharded_tensor import (
        ShardedTensor,
        ShardedTensorMetadata,
    )
    from torch.distributed._shard.sharded_tensor import (
        TensorProperties as STProps,
    )

    mds = [ShardMetadata([rows * r, 0], [rows, 8], f"rank:{r}/cpu") for r in range(world)]
    stm = ShardedTensorMetadata(mds, torch.Size([rows * world, 8]), STProps(dtype=torch.float32))
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        [STShard(torch.arange(rows * 8, dtype=torch.float32).reshape(rows, 8), mds[rank])], stm
    )


def _mixed_state_dict():
    mesh = _mesh((2, 2), 3)
    return {
        "w": torch.arange(24.0).reshape(4, 6),
        "scalar": torch.tensor(3.5),
        "bf": torch.zeros(5, 3, dtype=torch.bfloat16),
        "dt": _dtensor((9, 6), mesh, [Shard(0), Shard(1)]),
        "dt_sub": _dtensor((9, 6), _mesh((2,), 3, [0, 1]), [Shard(0)]),
        "step": 7,
        "name": "model",
        "blob": io.BytesIO(b"abc"),
        "meta_t": torch.empty(3, 3, device="meta"),
    }


def _saved_md_for(sd):
    """Metadata of a checkpoint holding every value of ``sd`` saved as 2 chunks along dim 0."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            size = v.size()
            if len(size) == 0:
                chunks = [ChunkStorageMetadata(torch.Size([]), torch.Size([]))]
            else:
                chunks = _grid(tuple(size), [[size[0] // 2]] + [[] for _ in size[1:]])
            out[k] = TensorStorageMetadata(TensorProperties(dtype=v.dtype), size, chunks)
        else:
            out[k] = BytesStorageMetadata()
    return Metadata(out)


def test_mixed_state_dict_plans_match_torch(fake_group):
    sd = _mixed_state_dict()
    sd["st"] = _sharded_tensor()
    md = _saved_md_for(sd)
    same_reads(
        ch.create_default_local_load_plan(sd, md).items,
        ORIG["create_default_local_load_plan"](sd, md).items,
    )
    for coord in (True, False):
        same_writes(
            ch.create_default_local_save_plan(sd, coord).items,
            ORIG["create_default_local_save_plan"](sd, coord).items,
        )
    same_writes(
        ch._create_default_metadata_only_plan(sd).items,
        ORIG["_create_default_metadata_only_plan"](sd).items,
    )
    for k, v in sd.items():
        same_writes(ch._create_write_items(k, v), ORIG["_create_write_items"](k, v))
        same_reads(
            ch._create_read_items(k, md.state_dict_metadata[k], v),
            ORIG["_create_read_items"](k, md.state_dict_metadata[k], v),
        )
        if isinstance(v, torch.Tensor):
            assert ch._create_chunk_list(v) == ORIG["_create_chunk_list"](v)


def test_sharded_tensor_deprecation_warning_points_where_torchs_does(fake_group):
    # ShardedTensor.size() warns (FutureWarning) at its caller's frame; the
    # drop-in's warning must come from where torch's own function's does, so
    # that filters on torch's module match it.
    st = _sharded_tensor()
    md = _saved_md_for({"st": torch.zeros(12, 8)})

    def warned(fn, *args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args)
        return [(w.category, str(w.message), w.filename, w.lineno) for w in caught]

    theirs = warned(ORIG["create_default_local_load_plan"], {"st": st}, md)
    assert theirs and theirs[0][0] is FutureWarning
    assert theirs[0][2] == t_dp.__file__
    assert warned(ch.create_default_local_load_plan, {"st": st}, md) == theirs
    same_reads(
        ch.create_default_local_load_plan({"st": st}, md).items,
        ORIG["create_default_local_load_plan"]({"st": st}, md).items,
    )

    def set_up(planner, metadata):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # set_up_planner's own
            planner.set_up_planner({"st": st}, metadata)
        return planner

    def default_planner():
        planner = t_dp.DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        return set_up(planner, md)

    def fast_planner(metadata):
        planner = cdcp.FastLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        return set_up(planner, metadata)

    assert warned(default_planner().create_local_plan) == theirs
    with cdcp.patch():
        assert warned(default_planner().create_local_plan) == theirs
    assert warned(fast_planner(md).create_local_plan) == theirs
    # A ShardedTensor whose saved chunks do not fill it is still refused.
    holed = _saved_md_for({"st": torch.zeros(12, 8)})
    holed.state_dict_metadata["st"].chunks.pop(0)  # rows 0-5; this rank holds rows 3-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match="does not fill st"):
            fast_planner(holed).create_local_plan()


def test_errors_match_torch():
    md = Metadata({"a": TensorStorageMetadata(TensorProperties(), torch.Size([4]), [])})
    for fn in (ch.create_default_local_load_plan, ORIG["create_default_local_load_plan"]):
        with pytest.raises(RuntimeError, match="Missing key in checkpoint state_dict: b."):
            fn({"b": torch.zeros(4)}, md)
        assert fn({"b": torch.zeros(4)}, md, strict=False).items == []
        with pytest.raises(ValueError, match="Size mismatch between saved"):
            fn({"a": torch.zeros(5)}, md)
    for fn in (ch._create_read_items, ORIG["_create_read_items"]):
        with pytest.raises(
            ValueError, match="Invalid checkpoint metadata for a, expected BytesStorageMetadata"
        ):
            fn("a", md.state_dict_metadata["a"], 123)
    for fn in (ch._create_chunk_list, ORIG["_create_chunk_list"]):
        with pytest.raises(ValueError, match="Unsupported Type"):
            fn("not a tensor")


def test_init_state_dict_materialises_like_torch(fake_group):
    # Meta tensors and meta DTensors, nested in dicts and lists, become empty
    # tensors on the process group's device; everything else is left alone.
    def state_dict():
        return {
            "x": torch.empty(2, 3, device="meta", dtype=torch.float16),
            "n": {"y": torch.empty(4, device="meta"), "k": 3, "l": [torch.empty(1, device="meta")]},
            "c": torch.arange(3.0),
            "dt": _dtensor((9, 6), _mesh((2, 2), 1), [Shard(0), Shard(1)], device="meta"),
            "s": "name",
        }

    def leaves(sd, path=()):
        if isinstance(sd, dict):
            for k, v in sd.items():
                yield from leaves(v, (*path, k))
        elif isinstance(sd, list):
            for i, v in enumerate(sd):
                yield from leaves(v, (*path, i))
        else:
            yield path, sd

    def describe(value):
        if isinstance(value, DTensor):
            local = value.to_local()
            return ("dtensor", value.device.type, value.shape, value.stride(), value.placements,
                    local.shape, local.dtype, local.device.type)
        if isinstance(value, torch.Tensor):
            return ("tensor", value.device.type, value.shape, value.dtype)
        return ("value", value)

    ours, theirs = state_dict(), state_dict()
    kept = {path: v for path, v in leaves(ours) if not getattr(v, "is_meta", False)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fake group's "multiple backends"
        assert ch._init_state_dict(ours) == ORIG["_init_state_dict"](theirs)
    got, want = dict(leaves(ours)), dict(leaves(theirs))
    assert {p: describe(v) for p, v in got.items()} == {p: describe(v) for p, v in want.items()}
    assert all(describe(v)[1] != "meta" for v in got.values() if isinstance(v, torch.Tensor))
    assert all(got[p] is v for p, v in kept.items())


# ----------------------------------------------------------------------------
# global plans, dedup, validation, plan-caching helpers
# ----------------------------------------------------------------------------


def _rank_plans(nranks, seed):
    """Local save plans of ``nranks`` ranks: replicated tensors and bytes, FSDP and 2-D shards."""
    rng = random.Random(seed)
    plans = []
    for r in range(nranks):
        sd = {
            "rep": torch.zeros(rng.choice([3, 4]) if False else 4, 2),
            "bytes": b"x",
            "fsdp": _dtensor((2 * nranks + 1, 3), _mesh((nranks,), r), [Shard(0)]),
        }
        if nranks % 2 == 0:
            sd["tp2d"] = _dtensor(
                (7, 6), _mesh((2, nranks // 2), r), [Shard(1), Shard(0)], dtype=torch.bfloat16
            )
        plans.append(ORIG["create_default_local_save_plan"](sd, r == 0))
    return plans


@pytest.mark.parametrize("nranks,seed", [(1, 0), (2, 1), (4, 2), (8, 3), (6, 4)])
@pytest.mark.parametrize("lowest", [False, True])
def test_global_save_plan_dedup_validate_match_torch(nranks, seed, lowest):
    plans = _rank_plans(nranks, seed)
    d_ours = ch.dedup_save_plans(plans, lowest)
    d_theirs = ORIG["dedup_save_plans"](plans, lowest)
    assert [_saveplan(p) for p in d_ours] == [_saveplan(p) for p in d_theirs]
    for hints in (True, False):
        g_ours, md_ours = ch.create_default_global_save_plan(d_theirs, hints)
        g_theirs, md_theirs = ORIG["create_default_global_save_plan"](d_theirs, hints)
        assert [_saveplan(p) for p in g_ours] == [_saveplan(p) for p in g_theirs]
        assert md_ours == md_theirs
        assert ch._validate_global_plan(g_theirs, md_theirs) == ORIG["_validate_global_plan"](
            g_theirs, md_theirs
        )


def test_validate_reports_torch_errors():
    c = _chunk
    md = Metadata(
        {
            "oob": TensorStorageMetadata(
                TensorProperties(), torch.Size([4, 4]), [c((0, 0), (4, 5))]
            ),
            "ovl": TensorStorageMetadata(
                TensorProperties(), torch.Size([8]), [c((0,), (5,)), c((4,), (4,)), c((2,), (0,))]
            ),
            "hole": TensorStorageMetadata(TensorProperties(), torch.Size([8]), [c((0,), (3,))]),
            "b": BytesStorageMetadata(),
        }
    )
    plans = [SavePlan([]), SavePlan([])]
    ours = ch._validate_global_plan(plans, md)
    assert ours == ORIG["_validate_global_plan"](plans, md)
    assert any(m.startswith("key:oob has out of bounds chunk") for m in ours)
    assert any(m.startswith("key:ovl has overlapping chunks") for m in ours)
    assert any(m.startswith("key:hole invalid fill") for m in ours)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _records_of(name):
    """The records a handler on logger ``name`` receives (WARNING and above) in the block."""
    log = logging.getLogger(name)
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _seen(records):
    return [(r.name, r.levelno, r.getMessage()) for r in records]


def _overlapping_md():
    c = _chunk
    return Metadata(
        {
            "ovl": TensorStorageMetadata(
                TensorProperties(), torch.Size([8]), [c((0,), (5,)), c((4,), (4,))]
            ),
            "hole": TensorStorageMetadata(TensorProperties(), torch.Size([8]), [c((0,), (3,))]),
        }
    )


def test_patched_validation_logs_to_torchs_logger_with_torchs_messages():
    # A handler or filter on the logger torch's _validate_global_plan uses
    # must see the drop-in's findings once patch() has swapped it in.
    md, plans = _overlapping_md(), [SavePlan([]), SavePlan([])]
    with _records_of(t_dp.logger.name) as torch_records:
        expected = ORIG["_validate_global_plan"](plans, md)
    assert len(expected) == 3 and _seen(torch_records)
    with _records_of(t_dp.logger.name) as records, _records_of("ckcore.global_plan") as core:
        with cdcp.patch():
            assert t_dp._validate_global_plan(plans, md) == expected
    assert _seen(records) == _seen(torch_records)
    assert core == []
    # The torch-free core, called directly, logs to its own logger.
    with _records_of(t_dp.logger.name) as records, _records_of("ckcore.global_plan") as core:
        assert ckcore.validate_global_plan(plans, md) == expected
    assert records == [] and [r.getMessage() for r in core] == expected


def test_fast_save_planners_global_step_logs_to_torchs_logger():
    def shard(offset, size):
        chunk = _chunk((offset,), (size,))
        return WriteItem(
            MetadataIndex("w", chunk.offsets),
            t_ph.WriteItemType.SHARD,
            tensor_data=t_ph.TensorWriteData(chunk, TensorProperties(), torch.Size([8])),
        )

    plans = [SavePlan([shard(0, 5)]), SavePlan([shard(4, 4)])]
    with _records_of(t_dp.logger.name) as torch_records:
        g, md = ORIG["create_default_global_save_plan"](ORIG["dedup_save_plans"](plans))
        expected = ORIG["_validate_global_plan"](g, md)
    with _records_of(t_dp.logger.name) as records, _records_of("ckcore.global_plan") as core:
        assert ch._plan_global_save(plans)[2] == expected
    assert expected and _seen(records) == _seen(torch_records)
    assert core == []


@pytest.mark.parametrize("seed", range(6))
def test_plan_cache_helpers_match_torch(seed):
    rng = random.Random(seed)
    base = _rank_plans(4, seed)
    variants = []
    for p in base:
        q = p
        k = rng.randrange(4)
        if k == 1:
            q = dataclasses.replace(p, usable=False, items=[])
        elif k == 2:
            q = dataclasses.replace(p, items=p.items[:-1])
        elif k == 3 and p.items:
            it = p.items[0]
            q = dataclasses.replace(
                p,
                items=[dataclasses.replace(it, index=dataclasses.replace(it.index, index=5))]
                + p.items[1:],
            )
        variants.append(q)
    for a, b in itertools.product(base + variants, repeat=2):
        assert ch._compare_save_plans(a, b) == ORIG["_compare_save_plans"](a, b)
    for plans in (base, variants, [SavePlan([], usable=False)] * 3, [None, SavePlan([])]):
        assert ch._contains_usable_plan(plans) == ORIG["_contains_usable_plan"](plans)
    merged_o = ch._merge_delta_local_plans(base, variants)
    merged_t = ORIG["_merge_delta_local_plans"](base, variants)
    assert [id(p) for p in merged_o] == [id(p) for p in merged_t]


# ----------------------------------------------------------------------------
# planners, single process (coordinator of a 1-rank job), nested state dicts
# ----------------------------------------------------------------------------


def _nested_sd():
    return {
        "model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4)},
        "optim": {
            "state": {0: {"exp_avg": torch.ones(3, 4), "step": torch.tensor(2.0)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "epoch": 3,
    }


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("caching", [False, True])
def test_save_planner_matches_default(flatten, caching):
    results = []
    for cls in (t_dp.DefaultSavePlanner, cdcp.FastSavePlanner):
        out = []
        for round_ in range(3):
            sd = _nested_sd() if flatten else {"w": torch.zeros(3), "s": 1}
            if round_ == 2 and flatten:
                sd["model"]["extra"] = torch.zeros(2)
            p = cls(flatten_state_dict=flatten, enable_plan_caching=caching)
            p.set_up_planner(sd, is_coordinator=True)
            local = p.create_local_plan()
            deltas, md = p.create_global_plan([local])
            final = p.finish_plan(deltas[0])
            out.append((_saveplan(local), [_saveplan(d) for d in deltas], md, _saveplan(final)))
        results.append(out)
        # torch keys its class-level cache by class name: each class its own entry.
        for cache in (
            SavePlanner._cached_save_plan,
            SavePlanner._cached_all_plans,
            SavePlanner._cached_global_plan,
            SavePlanner._cached_metadata,
            SavePlanner._cached_final_save_plan,
        ):
            cache.pop(cls.__name__, None)
    assert results[0] == results[1]


def test_save_planner_validation_error_matches_default():
    c = ChunkStorageMetadata(torch.Size([0]), torch.Size([5]))
    bad = SavePlan(
        [
            WriteItem(
                MetadataIndex("t", torch.Size([0])),
                t_ph.WriteItemType.SHARD,
                tensor_data=t_ph.TensorWriteData(c, TensorProperties(), torch.Size([4])),
            )
        ]
    )
    msgs = []
    for cls in (t_dp.DefaultSavePlanner, cdcp.FastSavePlanner):
        p = cls(flatten_state_dict=False)
        with pytest.raises(ValueError, match="Failed to validate global plan") as e:
            p.create_global_plan([bad])
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


def _sharded_and_replicated_plans(nranks: int):
    """Every rank's local SavePlan of a sharded weight, a replicated bias and a
    replicated bytes value, made by torch's own local planner."""
    plans = []
    for r in range(nranks):
        sd = {"w": torch.zeros(2, 4), "b": torch.zeros(4), "step": 7}
        p = t_dp.DefaultSavePlanner(flatten_state_dict=False)
        p.set_up_planner(sd, is_coordinator=r == 0)
        local = p.create_local_plan()
        # Shard "w" by rows: rank r holds rows 2r..2r+1 of a (2 * nranks, 4) tensor.
        items = [
            dataclasses.replace(
                i,
                index=dataclasses.replace(i.index, offset=torch.Size([2 * r, 0])),
                type=t_ph.WriteItemType.SHARD,
                tensor_data=t_ph.TensorWriteData(
                    ChunkStorageMetadata(torch.Size([2 * r, 0]), torch.Size([2, 4])),
                    i.tensor_data.properties, torch.Size([2 * nranks, 4])),
            ) if i.index.fqn == "w" else i
            for i in local.items
        ]
        plans.append(dataclasses.replace(local, items=items))
    return plans


@pytest.mark.parametrize("lowest", [False, True])
def test_save_planner_global_plan_many_ranks_matches_default(lowest):
    # The fast planner dedups, plans and validates in one pass: same global
    # plan (items and index hints) and metadata as DefaultSavePlanner's steps.
    outs = []
    for cls in (t_dp.DefaultSavePlanner, cdcp.FastSavePlanner):
        p = cls(flatten_state_dict=False, dedup_save_to_lowest_rank=lowest)
        plans, md = p.create_global_plan(_sharded_and_replicated_plans(6))
        outs.append(([_saveplan(x) for x in plans],
                     [[i.index.index for i in x.items] for x in plans], md))
    assert outs[0] == outs[1]
    assert sum(len(x[0]) for x in outs[1][0]) == 6 + 2  # every shard, one bias, one bytes


def test_save_planner_subclass_dedup_hook_is_honoured():
    calls = []

    class KeepAll(cdcp.FastSavePlanner):
        def _dedup_save_plans(self, all_plans):
            calls.append(len(all_plans))
            return all_plans

    p = KeepAll(flatten_state_dict=False)
    plans = _sharded_and_replicated_plans(2)
    plans[1] = dataclasses.replace(plans[1], items=[i for i in plans[1].items if i.index.fqn == "w"])
    global_plan, md = p.create_global_plan(plans)
    assert calls == [2]
    assert len(md.state_dict_metadata["w"].chunks) == 2


@pytest.mark.parametrize("partial", [False, True])
def test_load_planner_matches_default(partial):
    saved = _nested_sd()
    sp = t_dp.DefaultSavePlanner()
    sp.set_up_planner(saved, is_coordinator=True)
    _, md = sp.create_global_plan([sp.create_local_plan()])
    outs = []
    for cls in (t_dp.DefaultLoadPlanner, cdcp.FastLoadPlanner):
        sd = _nested_sd()
        sd["model"]["new"] = torch.zeros(2)  # missing from the checkpoint
        p = cls(allow_partial_load=partial)
        p.set_up_planner(sd, md, is_coordinator=True)
        try:
            plan = p.create_local_plan()
            outs.append(sorted(map(_ri, plan.items), key=repr))
        except RuntimeError as e:
            outs.append(str(e))
    assert outs[0] == outs[1]
    assert isinstance(outs[0], list) == partial


# ----------------------------------------------------------------------------
# patch()
# ----------------------------------------------------------------------------

PATCHED = {
    t_ph: [
        "create_read_items_for_chunk_list",
        "_create_read_items",
        "_create_write_items",
        "_create_chunk_list",
        "_create_default_metadata_only_plan",
        "_compare_save_plans",
        "_merge_delta_local_plans",
        "_contains_usable_plan",
        "_init_state_dict",
    ],
    t_dp: [
        "_create_read_items",
        "_create_write_items",
        "_compare_save_plans",
        "_contains_usable_plan",
        "_merge_delta_local_plans",
        "_create_default_metadata_only_plan",
        "_init_state_dict",
        "create_default_local_load_plan",
        "create_default_local_save_plan",
        "create_default_global_save_plan",
        "_validate_global_plan",
        "dedup_save_plans",
    ],
    t_dedup: ["dedup_save_plans"],
}


def _snapshot():
    return {(m.__name__, n): getattr(m, n) for m, names in PATCHED.items() for n in names}


def test_patch_context_manager_swaps_and_restores_identity():
    before = _snapshot()
    with cdcp.patch() as handle:
        assert cdcp.is_patched()
        for (mod, name), orig in before.items():
            now = getattr(__import__(mod, fromlist=["x"]), name)
            assert now is getattr(ch, name), (mod, name)
            assert orig is ORIG[name]
        assert len(handle.replaced) >= sum(map(len, PATCHED.values()))
    after = _snapshot()
    assert all(after[k] is before[k] for k in before)
    assert not cdcp.is_patched()


def test_patch_plain_call_nested_and_unpatch():
    before = _snapshot()
    h1 = cdcp.patch()
    h2 = cdcp.patch()  # nested: nothing left to replace, restores nothing
    assert h2.replaced == []
    assert t_dp._create_read_items is ch._create_read_items
    h2.restore()
    assert t_dp._create_read_items is ch._create_read_items
    h1.unpatch()
    h1.restore()  # idempotent
    assert all(_snapshot()[k] is before[k] for k in before)
    cdcp.patch()
    cdcp.unpatch()
    assert all(_snapshot()[k] is before[k] for k in before)


def test_module_imported_while_patched_gets_torchs_functions_back():
    import types

    name = "torch.distributed._ckcore_patch_probe"
    with cdcp.patch():
        # What `from torch.distributed.checkpoint.planner_helpers import ...` does
        # in a module first imported while the patch is on.
        probe = types.ModuleType(name)
        probe._create_read_items = t_ph._create_read_items
        probe.alias = t_dp.create_default_local_load_plan
        sys.modules[name] = probe
        assert probe._create_read_items is ch._create_read_items
    try:
        assert probe._create_read_items is ORIG["_create_read_items"]
        assert probe.alias is ORIG["create_default_local_load_plan"]
    finally:
        del sys.modules[name]


def test_patched_default_planner_uses_kernels_and_matches():
    sd = {"w": _dtensor((9, 6), _mesh((2, 2), 2), [Shard(0), Shard(1)]), "b": b"x"}
    md = _saved_md_for({"w": torch.zeros(9, 6), "b": b"x"})
    p = t_dp.DefaultLoadPlanner()
    p.set_up_planner(dict(sd), md)
    plain = p.create_local_plan()
    calls = []
    real = ch.create_read_items_for_chunk_list

    with cdcp.patch():
        # The local plan's tensors go through the one fused kernel call.
        orig_kernel = _items.plan_reads

        def spy(*a, **k):
            calls.append(list(a[0]))
            return orig_kernel(*a, **k)

        _items.plan_reads = spy
        try:
            p = t_dp.DefaultLoadPlanner()
            p.set_up_planner(dict(sd), md)
            patched = p.create_local_plan()
        finally:
            _items.plan_reads = orig_kernel
    assert calls == [["w"]]
    assert ch.create_read_items_for_chunk_list is real
    same_reads(patched.items, plain.items)


def test_lazy_attributes():
    assert "RangeFileSystemReader" in dir(cdcp)
    with pytest.raises(AttributeError):
        cdcp.no_such_name  # noqa: B018
    assert LoadItemType.BYTE_IO.name == "BYTE_IO"


# ----------------------------------------------------------------------------
# FastLoadPlanner's coverage check: reads fill each destination exactly once
# ----------------------------------------------------------------------------


class _Chunks:
    """A stand-in with __create_chunk_list__, as a checkpointable tensor would have."""

    def __init__(self, chunks, shape):
        self._chunks, self._shape = chunks, torch.Size(shape)

    def __create_chunk_list__(self):
        return list(self._chunks)

    def size(self):
        return self._shape


@SETTINGS
@given(read_case())
def test_checked_read_items_refuse_exactly_the_bad_layouts(case):
    md, local = case
    shape = tuple(md.size)
    if shape and shape[0] >= 2**62 - 100:
        return  # the reference allocates per element
    obj = _Chunks(local, shape)
    good = fills_exactly(shape, md.chunks, local)
    if good:
        ours = ch._read_items_checked("w", md, obj)
        same_reads(ours, ORIG["create_read_items_for_chunk_list"]("w", md, local))
    else:
        with pytest.raises(
            ValueError,
            match=r"checkpoint metadata (does not fill w|for w has saved chunks that overlap)",
        ):
            ch._read_items_checked("w", md, obj)


@SETTINGS
@given(read_case())
def test_one_call_verified_read_items_only_for_proven_covers(case):
    # FastLoadPlanner's one compiled call (read, intersect, check the cover,
    # build) returns items only when the reads tile every local chunk; anything
    # else (None) goes to the array path, which names the problem.
    md, local = case
    shape = tuple(md.size)
    if shape and shape[0] >= 2**62 - 100:
        return  # the reference allocates per element
    got = _items.read_items("w", list(local), list(md.chunks), len(shape), ReadItem,
                            MetadataIndex, LoadItemType.TENSOR, torch.Size, True)
    if not fills_exactly(shape, md.chunks, local):
        assert got is None
    elif got is not None:
        same_reads(got, ORIG["create_read_items_for_chunk_list"]("w", md, local))


def test_one_call_verified_read_items_on_a_resharded_grid():
    # 4x4 saved as 2x2 blocks, loaded as rows: proven in the one call.
    saved = [_chunk((r, c), (2, 2)) for r in (0, 2) for c in (0, 2)]
    md = TensorStorageMetadata(TensorProperties(), torch.Size([4, 4]), saved)
    local = [_chunk((1, 0), (2, 4))]
    got = _items.read_items("w", local, saved, 2, ReadItem, MetadataIndex,
                            LoadItemType.TENSOR, torch.Size, True)
    assert got is not None and len(got) == 4
    same_reads(got, ORIG["create_read_items_for_chunk_list"]("w", md, local))
    # A lost saved chunk leaves a hole: no items from the one call.
    assert _items.read_items("w", local, saved[:3], 2, ReadItem, MetadataIndex,
                             LoadItemType.TENSOR, torch.Size, True) is None


@pytest.mark.parametrize("overlap", [False, True])
def test_checked_read_items_many_reads_per_chunk(overlap):
    # 100 reads into one local chunk: past the pairwise limit, decided by the intersection kernel.
    def c(o, s):
        return _chunk([o], [s])

    saved = [c(i, 1) for i in range(100)]
    if overlap:
        # 49 read twice, 51 never: the volumes still add up to 100.
        saved[50] = c(49, 2)
        saved[51] = c(52, 0)
    md = TensorStorageMetadata(TensorProperties(), torch.Size([100]), saved)
    obj = _Chunks([c(0, 100)], (100,))
    assert fills_exactly((100,), saved, obj.__create_chunk_list__()) == (not overlap)
    if overlap:
        with pytest.raises(ValueError, match="overlap inside local chunk 0"):
            ch._read_items_checked("w", md, obj)
    else:
        same_reads(
            ch._read_items_checked("w", md, obj),
            ORIG["create_read_items_for_chunk_list"]("w", md, obj.__create_chunk_list__()),
        )


@pytest.mark.parametrize(
    "saved, local",
    [
        ([((0, 0), (2, 4))], [((0, 0), (4, 4))]),  # a hole
        ([((0, 0), (3, 4)), ((2, 0), (2, 4))], [((0, 0), (4, 4))]),  # too many elements
        ([], [((0, 0), (4, 4))]),  # no saved chunk
    ],
)
def test_checked_read_items_raise_the_core_message(saved, local):
    # The torch path is the core's verified call given torch's classes: same message.
    import ckcore

    md = TensorStorageMetadata(TensorProperties(), torch.Size([4, 4]), [_chunk(*c) for c in saved])
    with pytest.raises(ValueError) as e_torch:
        ch._read_items_checked("w", md, _Chunks([_chunk(*c) for c in local], (4, 4)))
    core_md = ckcore.TensorStorageMetadata(
        ckcore.TensorProperties(), (4, 4), [ckcore.ChunkStorageMetadata(*c) for c in saved])
    with pytest.raises(ValueError) as e_core:
        ckcore.create_read_items(
            "w", core_md, [ckcore.ChunkStorageMetadata(*c) for c in local], verify_cover=True)
    assert str(e_torch.value) == str(e_core.value)


def test_fast_load_planner_refuses_a_lost_chunk_torch_does_not():
    c = _chunk
    md = Metadata(
        {"w": TensorStorageMetadata(TensorProperties(), torch.Size([4, 4]), [c((0, 0), (2, 4))])}
    )
    sd = {"w": torch.zeros(4, 4)}
    p = t_dp.DefaultLoadPlanner()
    p.set_up_planner(sd, md)
    assert len(p.create_local_plan().items) == 1  # torch plans half the tensor, silently
    p = cdcp.FastLoadPlanner()
    p.set_up_planner(sd, md)
    with pytest.raises(
        ValueError,
        match=r"does not fill w: local chunk 0 \(offsets=\(0, 0\), sizes=\(4, 4\)\) would get only 8 of its 16",
    ):
        p.create_local_plan()
    p = cdcp.FastLoadPlanner(verify_metadata=False)
    p.set_up_planner(sd, md)
    assert len(p.create_local_plan().items) == 1
    p = cdcp.FastLoadPlanner()
    p.set_up_planner(sd, md)
    p.metadata = {"w": 1}
    with pytest.raises(TypeError, match="not a DCP Metadata"):
        p.create_local_plan()


@st.composite
def save_plans(draw):
    """1-8 ranks' local save plans: replicated tensors and bytes, shards (possibly bad)."""
    nranks = draw(st.integers(1, 8))
    ntensors = draw(st.integers(0, 4))
    tensors = []
    for t in range(ntensors):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.integers(0, 6)) for _ in range(ndim))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8]))
        tensors.append((f"t{t}", shape, dtype))
    plans = []
    for _ in range(nranks):
        items = []
        for fqn, shape, dtype in tensors:
            kind = draw(st.sampled_from(["replicated", "shard", "shard", "absent"]))
            if kind == "absent":
                continue
            props = TensorProperties(dtype=dtype)
            if kind == "replicated" or not shape:
                chunk = _chunk([0] * len(shape), shape)
                wtype = t_ph.WriteItemType.TENSOR
            else:
                offs = [draw(st.integers(0, s + 1)) for s in shape]  # may be out of bounds
                sizes = [draw(st.integers(0, s)) for s in shape]
                chunk = _chunk(offs, sizes)
                wtype = t_ph.WriteItemType.SHARD
            items.append(
                WriteItem(
                    MetadataIndex(fqn, chunk.offsets),
                    wtype,
                    tensor_data=t_ph.TensorWriteData(chunk, props, torch.Size(shape)),
                )
            )
        for b in range(draw(st.integers(0, 2))):
            items.append(t_ph._create_write_item_for_bytesio(f"b{b}", None))
        plans.append(SavePlan(items, planner_data={"rank": len(plans)}))
    return plans


def _global_outcome(fn, *args):
    try:
        plans, md = fn(*args)
        return "ok", [_saveplan(p) for p in plans], md
    except AssertionError as e:
        return "assert", str(e).strip(), None


@SETTINGS
@given(save_plans(), st.booleans(), st.booleans())
def test_random_plans_dedup_global_validate_match_torch(plans, lowest, hints):
    d_ours = ch.dedup_save_plans(plans, lowest)
    d_theirs = ORIG["dedup_save_plans"](plans, lowest)
    assert [_saveplan(p) for p in d_ours] == [_saveplan(p) for p in d_theirs]
    ours = _global_outcome(ch.create_default_global_save_plan, d_theirs, hints)
    theirs = _global_outcome(ORIG["create_default_global_save_plan"], d_theirs, hints)
    assert ours[:2] == theirs[:2]
    assert ours[2] == theirs[2]
    if theirs[0] == "ok":
        md = theirs[2]
        assert ch._validate_global_plan(d_theirs, md) == ORIG["_validate_global_plan"](d_theirs, md)
