"""Differential tests of ckcore.layout against torch 2.13's DTensor arithmetic.

Every mesh coordinate's ``(sizes, offsets)`` must equal torch's
``_compute_local_shape_and_global_offset(global_shape, mesh_shape,
my_coordinate, placements)`` -- the plain-data core that the public
``compute_local_shape_and_global_offset`` calls with the mesh's shape and the
current rank's coordinate. The public function itself (DeviceMesh, rank,
submeshes) is checked through a fake process group, one rank at a time.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata as TorchChunk
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor._utils import (
    _compute_local_shape_and_global_offset,
    compute_local_shape_and_global_offset,
)
from torch.distributed.tensor.placement_types import (
    Partial,
    Replicate,
    Shard,
    _MaskPartial,
    _StridedShard,
)
from torch.testing._internal.distributed.fake_pg import FakeStore

from ckcore import layout as L
from ckcore._models import llama70b_state_dict_shapes, llama_fsdp_tp_placements


def _coords(mesh):
    return list(itertools.product(*[range(n) for n in mesh]))


def _torch_rows(shape, mesh, torch_places):
    return [
        _compute_local_shape_and_global_offset(shape, mesh, list(c), torch_places)
        for c in _coords(mesh)
    ]


def _ck_rows(shape, mesh, places):
    sizes, offsets = L.local_shapes_and_offsets(shape, mesh, places)
    return [(tuple(s), tuple(o)) for s, o in zip(sizes.tolist(), offsets.tolist())]


def _to_torch(p):
    if isinstance(p, L.Shard):
        return Shard(p.dim)
    if isinstance(p, L.StridedShard):
        return _StridedShard(p.dim, split_factor=p.split_factor)
    if isinstance(p, L.Partial):
        return Partial(p.reduce_op)
    return Replicate()


def assert_matches_torch(shape, mesh, places):
    torch_places = [_to_torch(p) for p in L.to_placements(places)]
    want = _torch_rows(shape, mesh, torch_places)
    assert _ck_rows(shape, mesh, places) == want
    # torch's own placement objects are accepted and give the same answer
    assert _ck_rows(shape, mesh, torch_places) == want
    return want


# ---------------------------------------------------------------------------
# Hypothesis: random layouts
# ---------------------------------------------------------------------------


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 8))
    # Small sizes (often below the mesh dim, so shards are empty) and zeros.
    size = st.one_of(st.integers(0, 6), st.integers(0, 40))
    shape = tuple(draw(st.lists(size, min_size=ndim, max_size=ndim)))
    mesh = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    hot = draw(st.integers(0, ndim - 1))  # one tensor dim, often sharded by several mesh dims
    places = []
    for _ in mesh:
        kind = draw(st.sampled_from(["S", "S", "SS", "SS", "R", "P"]))
        dim = draw(st.one_of(st.just(hot), st.just(hot), st.integers(0, ndim - 1)))
        if kind == "S":
            places.append(L.Shard(dim))
        elif kind == "SS":
            places.append(L.StridedShard(dim, draw(st.integers(1, 7))))
        elif kind == "R":
            places.append(L.Replicate())
        else:
            places.append(L.Partial())
    return shape, mesh, tuple(places)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_random_layouts_match_torch(layout):
    shape, mesh, places = layout
    assert_matches_torch(shape, mesh, places)


# ---------------------------------------------------------------------------
# Fixed adversarial layouts
# ---------------------------------------------------------------------------

ADVERSARIAL = [
    # torch's docstring examples
    ((2, 5), (2, 2), "S(1),S(1)"),
    ((8, 8), (2, 2), "_S(0,2),S(0)"),
    ((8,), (2, 2), "S(0),_S(0,2)"),
    # more shards than elements: empty trailing shards, on every level
    ((3, 2), (4,), "S0"),
    ((3, 2), (2, 2), "S0,S0"),
    ((1,), (2, 3, 2), "S0,S0,S0"),
    ((5,), (2, 2, 2), "S0,_S(0,3),S0"),
    ((0, 4), (3, 2), "S0,S1"),
    ((0,), (2, 2), "_S(0,2),S0"),
    # split factor larger than the dim, not dividing it, or 1
    ((7,), (3,), "_S(0,9)"),
    ((10, 3), (3, 2), "_S(0,4),S0"),
    ((11,), (2, 3), "_S(0,3),_S(0,2)"),
    ((13, 6), (5,), "_S(0,1)"),
    ((9,), (2, 2, 2), "_S(0,2),_S(0,2),_S(0,2)"),
    # three mesh dims on one tensor dim, mixed with others
    ((37, 5, 2), (3, 2, 4), "S0,S0,S0"),
    ((37, 5, 2), (3, 2, 4), "S1,S0,_S(0,3)"),
    ((64, 64), (2, 4, 2), "R,_S(0,2),S0"),
    ((65, 63), (2, 4, 2), "P,_S(0,2),S1"),
    # FSDP2 x TP on awkward sizes (uneven everywhere)
    ((1001, 77), (3, 4), "_S(0,4),S0"),
    ((1001, 77), (3, 4), "S0,S1"),
    # 8-d
    ((2, 3, 0, 5, 1, 4, 7, 2), (2, 3, 2), "S6,_S(3,2),S6"),
    # 0-d tensor, replicate only
    ((), (2, 2), "R,P"),
    # a single large dim (torch materialises index tensors here; keep it moderate)
    ((1_000_003,), (7, 3), "_S(0,5),S0"),
]


@pytest.mark.parametrize("shape, mesh, text", ADVERSARIAL)
def test_adversarial_layouts_match_torch(shape, mesh, text):
    assert_matches_torch(shape, mesh, text)


def test_negative_shard_dim_matches_torch():
    # torch's plain-data function indexes with a negative Shard dim directly;
    # ckcore normalises it (as DTensor does on construction), which agrees
    # whenever one placement uses it. (torch's _StridedShard arithmetic
    # raises on a negative dim; ckcore normalises that too.)
    for text in ("S(-1)", "S(-2)"):
        (p,) = L.parse_placements(text)
        tp = _to_torch(p)
        assert _ck_rows((6, 10), (4,), [p]) == _torch_rows((6, 10), (4,), [tp])
        assert _ck_rows((6, 10), (4,), [tp]) == _torch_rows((6, 10), (4,), [tp])


def test_partial_variants_act_as_replicate():
    mask = _MaskPartial(offset_shape=torch.Size([10]), offset_dim=0)
    for places in (
        [Partial("max"), Shard(0)],
        [mask, Shard(1)],
        [Partial(), _StridedShard(1, split_factor=2)],
    ):
        want = _torch_rows((6, 10), (2, 3), places)
        assert _ck_rows((6, 10), (2, 3), places) == want
    assert L.to_placement(mask) == L.Partial("sum")
    assert L.to_placement(Partial("max")) == L.Partial("max")


def test_llama_fsdp_tp_layouts_match_torch():
    shapes = llama70b_state_dict_shapes(n_layers=1)
    for fqn, shape in shapes.items():
        # small meshes keep torch's index tensors cheap; the arithmetic is the same
        places = llama_fsdp_tp_placements(fqn, tp=4, replicate=True)
        assert_matches_torch(shape, (2, 3, 4), places)


# ---------------------------------------------------------------------------
# The public function with a real DeviceMesh, rank by rank (fake process group)
# ---------------------------------------------------------------------------


def _for_each_rank(world_size, body):
    results = []
    for rank in range(world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            results.append(body(rank))
        finally:
            dist.destroy_process_group()
    return results


def test_public_function_per_rank_with_submeshes():
    world = 8
    cases = [
        # (rank grid, global shape, placements)
        (np.arange(8).reshape(2, 4), (5, 7), "S0,S1"),
        (np.arange(8).reshape(2, 2, 2), (9, 4), "_S(0,2),S0,R"),
        (np.array([[6, 4], [2, 0]]), (5, 3), "S1,S0"),  # permuted submesh: odd ranks are outside
        (np.array([1, 3, 5]), (7,), "S0"),
    ]

    def body(rank):
        out = []
        for grid, shape, text in cases:
            mesh = DeviceMesh("cpu", torch.tensor(grid))
            torch_places = [_to_torch(p) for p in L.parse_placements(text)]
            want = compute_local_shape_and_global_offset(shape, mesh, torch_places)
            got = L.local_shape_and_offset_for_rank(shape, grid.shape, text, rank, ranks=mesh)
            assert got == tuple(map(tuple, want)), (grid.tolist(), shape, text, rank)
            chunks = L.chunks_for_rank(shape, grid.shape, text, rank, ranks=grid)
            job = {"w": (shape, torch_places)}
            assert L.job_rank_chunks(job, grid.shape, rank, ranks=mesh) == {"w": chunks}
            if mesh.get_coordinate() is None:
                assert want == ((0,), ()) and chunks == []
            else:
                assert [(c.offsets, c.sizes) for c in chunks] == [(tuple(want[1]), tuple(want[0]))]
            out.append(want)
        return out

    per_rank = _for_each_rank(world, body)
    # job_chunks must give every rank what that rank computed for itself
    for i, (grid, shape, text) in enumerate(cases):
        plans = L.job_chunks({"w": (shape, text)}, grid.shape, ranks=grid, world_size=world)
        for rank in range(world):
            want = per_rank[rank][i]
            expected = [] if want == ((0,), ()) else [
                TorchChunk(offsets=torch.Size(want[1]), sizes=torch.Size(want[0]))]
            got = [
                TorchChunk(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
                for c in plans[rank]["w"]
            ]
            assert got == expected


def test_chunks_equal_dcp_chunk_from_dtensor():
    # DCP's _create_chunk_from_dtensor on a real (fake-PG) DTensor, rank by rank.
    from torch.distributed.checkpoint.planner_helpers import _create_chunk_from_dtensor
    from torch.distributed.tensor import DTensor

    shape, grid, text = (10, 6), np.arange(4).reshape(2, 2), "_S(0,2),S0"
    torch_places = [_to_torch(p) for p in L.parse_placements(text)]
    ck = L.chunks_for_mesh(shape, grid.shape, text)

    def body(rank):
        mesh = DeviceMesh("cpu", torch.tensor(grid))
        local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, torch_places)
        dt = DTensor.from_local(
            torch.empty(local_shape), mesh, torch_places,
            shape=torch.Size(shape), stride=(shape[1], 1), run_check=False,
        )
        chunk = _create_chunk_from_dtensor(dt)
        assert (tuple(chunk.offsets), tuple(chunk.sizes)) == (ck[rank].offsets, ck[rank].sizes)
        return chunk

    assert len(_for_each_rank(4, body)) == 4
