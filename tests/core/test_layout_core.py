"""Torch-free tests of ckcore.layout: a naive reference, the parser, validation.

This file must not import torch: it runs where torch is absent. The naive
reference below follows the structure of torch's
``_compute_local_shape_and_global_offset`` literally -- it keeps the list of
global indices each coordinate holds (as Python ``range`` pieces, so sizes
near 2**62 cost nothing) and loops over every split -- while the kernel uses
closed forms; the differential test against torch itself is test_layout.py.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckcore import layout as L
from ckcore.metadata import ChunkStorageMetadata

# ---------------------------------------------------------------------------
# Naive reference
# ---------------------------------------------------------------------------


def _select(pieces: list[range], start: int, stop: int) -> list[range]:
    """Positions [start, stop) of the concatenation of ``pieces``."""
    out, pos = [], 0
    for piece in pieces:
        lo, hi = max(start - pos, 0), min(stop - pos, len(piece))
        if lo < hi:
            out.append(piece[lo:hi])
        pos += len(piece)
    return out


def _chunk_bounds(c: int, n: int, r: int) -> tuple[int, int]:
    """torch.chunk of c into n (ceil-sized pieces, empty trailing ones): piece r."""
    f = -(-c // n)
    return min(r * f, c), min((r + 1) * f, c)


def naive_layout(global_shape, mesh_shape, placements, coord):
    """Reference for one coordinate: (sizes, offsets) tuples."""
    held: dict[int, list[range]] = {}
    for i, p in enumerate(placements):
        if not isinstance(p, (L.Shard, L.StridedShard)):
            continue
        d = p.dim
        cur = held.get(d, [range(global_shape[d])])
        c = sum(len(x) for x in cur)
        n, r = mesh_shape[i], coord[i]
        if isinstance(p, L.Shard):
            new = _select(cur, *_chunk_bounds(c, n, r))
        else:
            new = []
            for j in range(p.split_factor):
                a, b = _chunk_bounds(c, p.split_factor, j)
                s, e = _chunk_bounds(b - a, n, r)
                new += _select(cur, a + s, a + e)
        held[d] = new
    sizes, offsets = [], []
    for d, g in enumerate(global_shape):
        if d not in held:
            sizes.append(g)
            offsets.append(0)
            continue
        count = sum(len(x) for x in held[d])
        sizes.append(count)
        offsets.append(held[d][0][0] if count else g)
    return tuple(sizes), tuple(offsets)


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


@st.composite
def layouts(draw, max_ndim=8, max_size=24, max_mesh=5):
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(0, max_size), min_size=ndim, max_size=ndim)))
    mesh = tuple(draw(st.lists(st.integers(1, max_mesh), min_size=1, max_size=3)))
    # Bias towards few distinct tensor dims so several mesh dims shard the same one.
    hot = draw(st.integers(0, ndim - 1))
    places = []
    for _ in mesh:
        kind = draw(st.sampled_from(["S", "S", "SS", "R", "P"]))
        dim = draw(st.one_of(st.just(hot), st.integers(0, ndim - 1)))
        if kind == "S":
            places.append(L.Shard(dim))
        elif kind == "SS":
            places.append(L.StridedShard(dim, draw(st.integers(1, 6))))
        elif kind == "R":
            places.append(L.Replicate())
        else:
            places.append(L.Partial())
    return shape, mesh, tuple(places)


def _coords(mesh):
    return list(itertools.product(*[range(n) for n in mesh]))


# ---------------------------------------------------------------------------
# Kernel against the naive reference
# ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_all_coordinates_match_naive(layout):
    shape, mesh, places = layout
    sizes, offsets = L.local_shapes_and_offsets(shape, mesh, places)
    assert sizes.dtype == np.int64 and offsets.dtype == np.int64
    assert sizes.shape == offsets.shape == (int(np.prod(mesh)), len(shape))
    for row, coord in enumerate(_coords(mesh)):
        want = naive_layout(shape, mesh, places, coord)
        assert (tuple(sizes[row].tolist()), tuple(offsets[row].tolist())) == want, coord
        assert L.local_shape_and_offset(shape, mesh, places, coord) == want


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(2**40, 2**62), min_size=1, max_size=3),
    st.lists(st.integers(1, 7), min_size=1, max_size=3),
    st.data(),
)
def test_huge_sizes_match_naive(shape, mesh, data):
    # Sizes near 2**62 (the volume stays < 2**63 only for 1-d; use a 1-d
    # global shape per tensor dim checked separately to keep volumes legal).
    for g in shape:
        places = tuple(
            data.draw(
                st.one_of(
                    st.just(L.Shard(0)),
                    st.builds(L.StridedShard, st.just(0), st.integers(1, 9)),
                    st.just(L.Replicate()),
                )
            )
            for _ in mesh
        )
        sizes, offsets = L.local_shapes_and_offsets((g,), mesh, places)
        for row, coord in enumerate(_coords(mesh)):
            want = naive_layout((g,), mesh, places, coord)
            assert (tuple(sizes[row].tolist()), tuple(offsets[row].tolist())) == want


_I64 = st.integers(0, 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(_I64, st.one_of(st.integers(1, 64), st.integers(1, 2**63 - 1)), st.data())
def test_inline_chunk_helper_whole_int64_range(c, n, data):
    from ckcore._kernels._layout import _py_chunk

    r = data.draw(st.one_of(st.integers(0, min(n - 1, 64)), st.integers(0, n - 1)))
    f = -(-c // n)  # Python ints: no overflow
    start, stop = min(r * f, c), min((r + 1) * f, c)
    assert _py_chunk(c, n, r) == (start, stop - start)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.tuples(_I64, st.integers(1, 9)),  # any size, few parts
        st.tuples(st.integers(0, 2000), st.integers(1, 2**63 - 1)),  # any split factor
    ),
    st.integers(1, 64),
    st.data(),
)
def test_inline_strided_helpers_whole_int64_range(c_sf, n, data):
    from ckcore._kernels._layout import _py_strided

    c, sf = c_sf
    r = data.draw(st.integers(0, n - 1))
    # Reference: torch's literal loop over the parts (only the first
    # ceil(c / f1) <= min(sf, c) parts can be non-empty).
    f1 = -(-c // sf)
    count, first = 0, -1
    for j in range(min(sf, c)):
        a, b = min(j * f1, c), min((j + 1) * f1, c)
        f2 = -(-(b - a) // n)
        s, e = min(r * f2, b - a), min((r + 1) * f2, b - a)
        if e > s and first < 0:
            first = a + s
        count += e - s
    assert _py_strided(c, sf, n, r) == (count, first)


def test_int64_max_dimension():
    g = 2**63 - 1
    sizes, offsets = L.local_shapes_and_offsets((g,), (3, 5), "S0,_S(0,7)")
    for row, coord in enumerate(_coords((3, 5))):
        want = naive_layout((g,), (3, 5), (L.Shard(0), L.StridedShard(0, 7)), coord)
        assert (tuple(sizes[row].tolist()), tuple(offsets[row].tolist())) == want
    # Every index is held exactly once across the coordinates.
    assert int(sizes.sum(dtype=object)) == g


def test_rows_follow_mesh_coordinates():
    mesh = (2, 3, 4)
    coords = L.mesh_coordinates(mesh)
    assert coords.tolist() == [list(c) for c in _coords(mesh)]
    sizes, offsets = L.local_shapes_and_offsets((7, 9, 5), mesh, "S0,S1,_S(1,2)")
    for row, coord in enumerate(coords.tolist()):
        s, o = L.local_shape_and_offset((7, 9, 5), mesh, "S0,S1,_S(1,2)", coord)
        assert s == tuple(sizes[row].tolist()) and o == tuple(offsets[row].tolist())


def test_docstring_examples():
    # torch's compute_local_shape_and_global_offset docstring: 2x5 tensor,
    # (Shard(1), Shard(1)) on a 2x2 mesh.
    sizes, offsets = L.local_shapes_and_offsets((2, 5), (2, 2), "S(1),S(1)")
    assert sizes.tolist() == [[2, 2], [2, 1], [2, 1], [2, 1]]
    assert offsets.tolist() == [[0, 0], [0, 2], [0, 3], [0, 4]]
    # _StridedShard docstring: 8 rows, (_S(0, 2), S(0)) gives shard index 0, 2, 1, 3.
    sizes, offsets = L.local_shapes_and_offsets((8, 8), (2, 2), "_S(0,2),S(0)")
    assert offsets[:, 0].tolist() == [0, 4, 2, 6]
    assert sizes[:, 0].tolist() == [2, 2, 2, 2]


def test_empty_shards_report_global_size():
    sizes, offsets = L.local_shapes_and_offsets((3, 2), (4,), "S0")
    assert sizes[:, 0].tolist() == [1, 1, 1, 0]
    assert offsets[:, 0].tolist() == [0, 1, 2, 3]
    sizes, offsets = L.local_shapes_and_offsets((0, 2), (3,), "S0")
    assert sizes.tolist() == [[0, 2]] * 3 and offsets.tolist() == [[0, 0]] * 3


def test_zero_dim_tensor_and_replicate_only():
    sizes, offsets = L.local_shapes_and_offsets((), (2, 2), "R,P")
    assert sizes.shape == (4, 0) and offsets.shape == (4, 0)
    assert L.local_shape_and_offset((), (2,), "R", (1,)) == ((), ())
    sizes, offsets = L.local_shapes_and_offsets((4, 5), (3,), "R")
    assert sizes.tolist() == [[4, 5]] * 3 and offsets.tolist() == [[0, 0]] * 3


def test_negative_dims_count_from_the_end():
    a = L.local_shapes_and_offsets((6, 10), (4,), [L.Shard(-1)])
    b = L.local_shapes_and_offsets((6, 10), (4,), [L.Shard(1)])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Placements and the parser
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("S(0),R", (L.Shard(0), L.Replicate())),
        ("S0,S1", (L.Shard(0), L.Shard(1))),
        ("s0, r, p", (L.Shard(0), L.Replicate(), L.Partial())),
        ("Shard(dim=2),Replicate()", (L.Shard(2), L.Replicate())),
        ("P(max),Partial(reduce_op=avg)", (L.Partial("max"), L.Partial("avg"))),
        ("_S(0, 8),S(0)", (L.StridedShard(0, 8), L.Shard(0))),
        ("SS(1,2)", (L.StridedShard(1, 2),)),
        ("_StridedShard(dim=0, sf=4)", (L.StridedShard(0, 4),)),
        ("StridedShard(split_factor=3, dim=1)", (L.StridedShard(1, 3),)),
        ("S(-1)", (L.Shard(-1),)),
    ],
)
def test_parse_placements(text, want):
    assert L.parse_placements(text) == want
    assert L.parse_placements(L.format_placements(want)) == want


@pytest.mark.parametrize(
    "text",
    ["", "  ", "S", "S(", "S(0))", "Q(0)", "S(x)", "S(0,1)", "R(1)", "_S(0)", "_S(0,1,2)",
     "_S(dim=0, foo=1)", "S0,,R", "P(1)", "_S(dim=0, 2)"],
)
def test_parse_placements_rejects(text):
    with pytest.raises(ValueError):
        L.parse_placements(text)


def test_parse_mesh_shape():
    assert L.parse_mesh_shape("4x32x8") == (4, 32, 8)
    assert L.parse_mesh_shape("(4, 32, 8)") == (4, 32, 8)
    assert L.parse_mesh_shape("16") == (16,)
    for bad in ["", "4x", "4xx8", "a", "4x0", "-1"]:
        with pytest.raises(ValueError):
            L.parse_mesh_shape(bad)
    with pytest.raises(TypeError):
        L.parse_mesh_shape((4, 8))


class _FakeTorchShard:
    """Stands in for torch's Shard: duck typing must not need torch."""

    def __init__(self, dim):
        self.dim = dim

    def is_shard(self):
        return True


class Replicate:  # same class name as torch's
    pass


def test_duck_typed_placements():
    assert L.to_placement(_FakeTorchShard(1)) == L.Shard(1)
    assert L.to_placement(Replicate()) == L.Replicate()
    assert L.to_placement("S(3)") == L.Shard(3)
    fake_strided = type("_StridedShard", (), {"dim": 0, "split_factor": 4})()
    assert L.to_placement(fake_strided) == L.StridedShard(0, 4)
    fake_partial = type("_MaskPartial", (), {"reduce_op": "sum"})()
    assert L.to_placement(fake_partial) == L.Partial("sum")
    with pytest.raises(TypeError, match="not a placement"):
        L.to_placement(object())
    with pytest.raises(TypeError):
        L.to_placement(_FakeTorchShard("0"))
    with pytest.raises(TypeError):
        L.to_placements(3)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, mesh, places, exc, match",
    [
        ((-1, 4), (2,), "S0", ValueError, "negative"),
        ((2**63, 1), (2,), "S0", ValueError, "int64"),
        ((2**32, 2**32), (2,), "S0", ValueError, "elements"),
        ((4, 4), (2,), "S2", ValueError, "tensor dim 2"),
        ((4, 4), (2,), "S(-3)", ValueError, "tensor dim -3"),
        ((), (2,), "S0", ValueError, "0 dims"),
        ((4, 4), (2, 2), "S0", ValueError, "1 placements"),
        ((4, 4), (2,), "S0,S1", ValueError, "2 placements"),
        ((4, 4), (0,), "S0", ValueError, "must be >= 1"),
        ((4, 4), (1,) * 65, "R," * 64 + "R", ValueError, "at most 64"),
        ((4, 4), (2,), "_S(0,0)", ValueError, "split_factor"),
        ((4, 4), (2,), [L.StridedShard(0, -2)], ValueError, "split_factor"),
        ((4.0, 4), (2,), "S0", TypeError, "float"),
        ((True, 4), (2,), "S0", TypeError, "bool"),
        ("44", (2,), "S0", TypeError, "sequence"),
        ((4, 4), (2.5,), "S0", TypeError, "float"),
        ((4, 4), (2,), [L.Shard("0")], TypeError, "integer"),
        ((4, 4), (2,), [None], TypeError, "not a placement"),
        (np.zeros((2, 2), dtype=np.int64), (2,), "S0", ValueError, "1-d"),
    ],
)
def test_validation(shape, mesh, places, exc, match):
    with pytest.raises(exc, match=match):
        L.local_shapes_and_offsets(shape, mesh, places)


def test_coordinate_validation():
    with pytest.raises(ValueError, match="outside the mesh"):
        L.local_shape_and_offset((4,), (2, 2), "S0,R", (0, 2))
    with pytest.raises(ValueError, match="2 dimensions"):
        L.local_shape_and_offset((4,), (2, 2), "S0,R", (0,))


def test_kernel_checks_its_inputs():
    from ckcore._kernels import _layout

    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    with pytest.raises(ValueError, match="negative"):
        _layout.layout_all(i64(-1), i64(2), i64(1), i64(0), i64(1))
    with pytest.raises(ValueError, match="outside"):
        _layout.layout_all(i64(4), i64(2), i64(1), i64(1), i64(1))
    with pytest.raises(ValueError, match="split_factor"):
        _layout.layout_all(i64(4), i64(2), i64(2), i64(0), i64(0))
    with pytest.raises(ValueError, match="kind"):
        _layout.layout_all(i64(4), i64(2), i64(7), i64(0), i64(1))
    with pytest.raises(ValueError, match="lengths"):
        _layout.layout_all(i64(4), i64(2, 2), i64(1), i64(0), i64(1))
    with pytest.raises(ValueError, match="2\\*\\*63"):
        _layout.layout_all(i64(4), i64(2**62, 4), i64(0, 0), i64(0, 0), i64(1, 1))
    with pytest.raises(ValueError, match="row 1"):
        shapes = np.array([[4], [-4]], dtype=np.int64)
        _layout.layout_all_many(shapes, i64(2), i64(1), i64(0), i64(1))
    with pytest.raises(ValueError, match="outside the mesh"):
        shapes = np.array([[4]], dtype=np.int64)
        _layout.layout_coordinate_many(shapes, i64(2), i64(1), i64(0), i64(1), i64(2))
    ones = np.ones(65, dtype=np.int64)
    with pytest.raises(ValueError, match="at most 64"):
        _layout.layout_all(i64(4), ones, ones * 0, ones * 0, ones)
    with pytest.raises(ValueError):  # wrong dtype is refused by the typed memoryview
        _layout.layout_all(np.array([4], dtype=np.int32), i64(2), i64(1), i64(0), i64(1))


# ---------------------------------------------------------------------------
# Chunks, ranks, whole jobs
# ---------------------------------------------------------------------------


def test_chunks_for_mesh_and_coordinate():
    chunks = L.chunks_for_mesh((5, 4), (2, 2), "S0,S1")
    assert chunks == [
        ChunkStorageMetadata(offsets=(0, 0), sizes=(3, 2)),
        ChunkStorageMetadata(offsets=(0, 2), sizes=(3, 2)),
        ChunkStorageMetadata(offsets=(3, 0), sizes=(2, 2)),
        ChunkStorageMetadata(offsets=(3, 2), sizes=(2, 2)),
    ]
    assert L.chunk_for_coordinate((5, 4), (2, 2), "S0,S1", (1, 0)) == chunks[2]
    assert all(type(v) is int for c in chunks for v in c.offsets + c.sizes)


def test_ranks_outside_the_mesh():
    ranks = [[4, 5], [6, 7]]
    assert L.local_shape_and_offset_for_rank((8, 3), (2, 2), "S0,R", 2, ranks=ranks) == ((0,), ())
    assert L.chunks_for_rank((8, 3), (2, 2), "S0,R", 2, ranks=ranks) == []
    got = L.local_shape_and_offset_for_rank((8, 3), (2, 2), "S0,R", 6, ranks=ranks)
    assert got == ((4, 3), (4, 0))
    assert L.chunks_for_rank((8, 3), (2, 2), "S0,R", 6, ranks=ranks) == [
        ChunkStorageMetadata(offsets=(4, 0), sizes=(4, 3))
    ]
    # default mesh: ranks 0..3; rank 9 is outside
    assert L.local_shape_and_offset_for_rank((8, 3), (2, 2), "S0,R", 9) == ((0,), ())
    assert L.chunks_for_rank((), (2,), "R", 1) == [ChunkStorageMetadata(offsets=(), sizes=())]
    with pytest.raises(ValueError):  # a malformed layout is refused even for outside ranks
        L.local_shape_and_offset_for_rank((8, 3), (2, 2), "S5,R", 9)
    with pytest.raises(ValueError, match="duplicate"):
        L.chunks_for_rank((8, 3), (2,), "S0", 0, ranks=[1, 1])
    with pytest.raises(ValueError, match="do not match"):
        L.chunks_for_rank((8, 3), (2,), "S0", 0, ranks=[0, 1, 2])
    with pytest.raises(TypeError):
        L.chunks_for_rank((8, 3), (2,), "S0", 0, ranks=[0.5, 1])


def test_job_layouts_and_chunks():
    tensors = {
        "a": ((10, 4), "S0,S1"),
        "b": ((3,), [L.Replicate(), L.Shard(0)]),
        "c": ((), "R,R"),
    }
    layouts = L.job_layouts(tensors, (2, 2))
    for fqn, (shape, places) in tensors.items():
        want = L.local_shapes_and_offsets(shape, (2, 2), places)
        assert all(np.array_equal(x, y) for x, y in zip(layouts[fqn], want))
    plans = L.job_chunks(tensors, (2, 2), ranks=[[7, 5], [3, 1]], world_size=9)
    assert len(plans) == 9
    for rank in (0, 2, 4, 6, 8):
        assert plans[rank] == {"a": [], "b": [], "c": []}
    for row, rank in enumerate([7, 5, 3, 1]):
        coord = _coords((2, 2))[row]
        for fqn, (shape, places) in tensors.items():
            assert plans[rank][fqn] == [L.chunk_for_coordinate(shape, (2, 2), places, coord)]
    assert len(L.job_chunks(tensors, (2, 2))) == 4
    # job_chunks pauses the cyclic GC while it builds objects: the caller's
    # setting must come back either way.
    import gc

    gc.disable()
    try:
        L.job_chunks(tensors, (2, 2))
        assert not gc.isenabled()
    finally:
        gc.enable()
    L.job_chunks(tensors, (2, 2))
    assert gc.isenabled()
    with pytest.raises(ValueError):
        L.job_chunks({"bad": ((4,), "S3,R")}, (2, 2))
    assert gc.isenabled()


def _placements_for(ndim, nmesh):
    one = st.one_of(
        st.just(L.Replicate()),
        st.builds(L.Shard, st.integers(0, ndim - 1)),
        st.builds(L.StridedShard, st.integers(0, ndim - 1), st.integers(1, 4)),
    ) if ndim else st.just(L.Replicate())
    return st.tuples(*[one] * nmesh)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data())
def test_job_functions_equal_per_tensor_calls(mesh, data):
    # Tensors of several ranks and placement lists on one mesh (few distinct
    # lists, so groups hold several tensors): the grouped kernel calls must
    # equal the per-tensor ones, fqn by fqn, in order.
    mesh = tuple(mesh)
    lists = {nd: data.draw(st.lists(_placements_for(nd, len(mesh)), min_size=1, max_size=2))
             for nd in range(4)}
    tensors = {}
    for n in range(data.draw(st.integers(1, 8))):
        shape = tuple(data.draw(st.lists(st.integers(0, 12), max_size=3)))
        tensors[f"t{n}"] = (shape, data.draw(st.sampled_from(lists[len(shape)])))
    layouts_ = L.job_layouts(tensors, mesh)
    assert list(layouts_) == list(tensors)
    coord = data.draw(st.tuples(*[st.integers(0, n - 1) for n in mesh]))
    at = L.job_layout_at(tensors, mesh, coord)
    assert list(at) == list(tensors)
    row = int(np.ravel_multi_index(coord, mesh))
    rank_chunks = L.job_rank_chunks(tensors, mesh, row)
    for fqn, (shape, places) in tensors.items():
        sizes, offsets = L.local_shapes_and_offsets(shape, mesh, places)
        assert np.array_equal(layouts_[fqn][0], sizes) and np.array_equal(layouts_[fqn][1], offsets)
        want = L.local_shape_and_offset(shape, mesh, places, coord)
        assert at[fqn] == want
        assert rank_chunks[fqn] == [ChunkStorageMetadata(offsets=want[1], sizes=want[0])]


def test_job_rank_chunks_outside_the_mesh():
    tensors = {"a": ((10, 4), "S0,S1"), "b": ((3,), "R,S0")}
    assert L.job_rank_chunks(tensors, (2, 2), 9) == {"a": [], "b": []}
    assert L.job_rank_chunks(tensors, (2, 2), 0, ranks=[[1, 2], [3, 4]]) == {"a": [], "b": []}
    assert L.job_rank_chunks(tensors, (2, 2), 4, ranks=[[1, 2], [3, 4]]) == L.job_chunks(
        tensors, (2, 2), ranks=[[1, 2], [3, 4]])[4]
    with pytest.raises(ValueError, match="a: "):
        L.job_rank_chunks({"a": ((4,), "S1,R")}, (2, 2), 9)


def test_job_errors_name_the_fqn():
    with pytest.raises(ValueError, match="layers.3.w: .*tensor dim 2"):
        L.job_layouts({"ok": ((4,), "S0"), "layers.3.w": ((4, 4), "S2")}, (2,))
    with pytest.raises(TypeError, match="bad: expected"):
        L.job_layouts({"bad": ((4, 4),)}, (2,))
    with pytest.raises(TypeError, match="mapping"):
        L.job_layouts([("a", ((4,), "S0"))], (2,))
    with pytest.raises(ValueError, match="world_size"):
        L.job_chunks({"a": ((4,), "S0")}, (2,), world_size=1)


def test_models_table():
    from ckcore._models import LLAMA70B_DTYPE, llama70b_state_dict_shapes, llama_fsdp_tp_placements

    shapes = llama70b_state_dict_shapes()
    assert len(shapes) == 723
    assert LLAMA70B_DTYPE == "bfloat16"
    params = sum(int(np.prod(s)) for s in shapes.values())
    assert 68.9e9 < params < 69.1e9  # Llama-2-70B: 68.98e9 parameters
    assert shapes["layers.0.attention.wk.weight"] == (1024, 8192)
    assert shapes["layers.79.feed_forward.w2.weight"] == (8192, 28672)
    assert len(llama70b_state_dict_shapes(2)) == 2 * 9 + 3
    assert llama_fsdp_tp_placements("layers.0.attention.wq.weight", 8) == (
        L.StridedShard(0, 8), L.Shard(0))
    assert llama_fsdp_tp_placements("layers.0.attention.wo.weight", 8, replicate=True) == (
        L.Replicate(), L.Shard(0), L.Shard(1))
    assert llama_fsdp_tp_placements("norm.weight", 8) == (L.Shard(0), L.Replicate())


def test_layout_imports_no_torch():
    # In a fresh interpreter: importing the façade and the model table must not pull in torch.
    import subprocess

    code = (
        "import sys, ckcore.layout, ckcore._models; "
        "ckcore.layout.job_chunks({'w': ((4, 6), 'S0,_S(1,2)')}, (2, 2)); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(L.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
