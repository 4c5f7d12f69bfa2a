"""The intersection kernel against a naive O(N*M) reference (tests/support/reference.py).

Every search path of ``ckcore._kernels._intersect.intersect`` (brute force for
few pairs, the product-grid path, the interval trie; each forced with
``path=``, plus the automatic choice) must report exactly
the reference's pairs, narrowings and canonical order, on grids, irregular,
MoE, nested, duplicated and zero-size layouts, 0-d to 8-d, and offsets near
2**62. ``_py_index_summary`` must call a layout a grid exactly when it is a
product of monotone per-dimension cut lists. Torch-free.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckcore._kernels import _intersect
from tests.support import reference as ref
from tests.support.layouts import (
    HUGE,
    chunk_cuts,
    grid_layout,
    layout,
    layout_pair,
    nested_layout,
    point_cuts,
    product,
    random_boxes,
    shapes,
    zero_d_pair,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def arrays(boxes, nd):
    off = np.array([b[0] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
    size = np.array([b[1] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
    return off, size


# Every search the kernel has: "auto" (what users get), each forced path.
PATHS = ("auto", "brute", "grid", "trie")


def kernel_pairs(local, saved, nd, path):
    lo, ls = arrays(local, nd)
    so, ss = arrays(saved, nd)
    li, si, sto, dso, ln = _intersect.intersect(lo, ls, so, ss, path=path)
    k = len(li)
    for name, a, shape in (("local_index", li, (k,)), ("saved_index", si, (k,)),
                           ("storage_offsets", sto, (k, nd)), ("dest_offsets", dso, (k, nd)),
                           ("lengths", ln, (k, nd))):
        assert a.dtype == np.int64, name
        assert a.shape == shape, (name, a.shape, shape)
    return [
        (int(li[p]), int(si[p]), tuple(sto[p].tolist()), tuple(dso[p].tolist()),
         tuple(ln[p].tolist()))
        for p in range(k)
    ]


def check_both_paths(local, saved, nd):
    expected = ref.intersect(local, saved)
    for path in PATHS:
        got = kernel_pairs(local, saved, nd, path)
        # Lists, not sets: the canonical order (local index, then saved index) is part of
        # the contract, and a duplicate pair would show up as a length mismatch.
        assert got == expected, f"path={path}"
    return expected


# ---------------------------------------------------------------------------
# Property tests against the reference
# ---------------------------------------------------------------------------

@SETTINGS
@given(layout_pair())
def test_random_layouts_match_reference(case):
    shape, local, saved = case
    check_both_paths(local, saved, len(shape))


@SETTINGS
@given(st.data())
def test_grid_vs_grid_matches_reference(data):
    # Resharding one grid into another: the grid path is taken whenever the saved
    # side is a product, so this is the test of _query_grid.
    shape = data.draw(shapes(1, 8))
    saved = data.draw(grid_layout(shape))
    local = data.draw(grid_layout(shape))
    check_both_paths(local, saved, len(shape))


@SETTINGS
@given(st.data())
def test_irregular_saved_matches_reference(data):
    # Irregular saved layouts never take the grid path: this exercises the trie.
    shape = data.draw(shapes(1, 5))
    kind = data.draw(st.sampled_from(["random", "bricks", "moe", "nested", "zero"]))
    saved = data.draw(layout(shape, kind))
    local = data.draw(layout(shape))
    check_both_paths(local, saved, len(shape))


@SETTINGS
@given(zero_d_pair())
def test_zero_d_every_pair(case):
    _, local, saved = case
    expected = check_both_paths(local, saved, 0)
    assert len(expected) == len(local) * len(saved)
    assert [(i, j) for i, j, *_ in expected] == [
        (i, j) for i in range(len(local)) for j in range(len(saved))]


@SETTINGS
@given(st.data())
def test_shuffled_saved_order_gives_canonical_order(data):
    # The kernel's internal sort (trie order) must not leak into the output order.
    shape = data.draw(shapes(1, 4))
    saved = data.draw(layout(shape))
    local = data.draw(layout(shape))
    for path in PATHS:
        got = kernel_pairs(local, saved, len(shape), path)
        keys = [(i, j) for i, j, *_ in got]
        assert keys == sorted(keys), path
        assert len(set(keys)) == len(keys), path


# ---------------------------------------------------------------------------
# Adversarial cases, written out
# ---------------------------------------------------------------------------

def test_zero_size_inside_overlaps_and_on_boundary_does_not():
    saved = [((0,), (4,)), ((4,), (4,))]
    local = [((2,), (0,)),   # strictly inside saved 0: overlaps with length 0
             ((4,), (0,)),   # on the boundary between them: overlaps neither
             ((0,), (0,)),   # on saved 0's start: no overlap
             ((8,), (0,))]   # on the far end: no overlap
    pairs = check_both_paths(local, saved, 1)
    assert pairs == [(0, 0, (2,), (0,), (0,))]


def test_zero_size_saved_chunks_inside_and_on_boundary():
    saved = [((0, 0), (4, 4)), ((2, 2), (0, 0)), ((2, 0), (0, 4)), ((4, 0), (0, 4)),
             ((1, 1), (2, 0))]
    local = [((0, 0), (4, 4)), ((1, 1), (2, 2)), ((3, 3), (1, 1))]
    pairs = check_both_paths(local, saved, 2)
    # Saved 1, 2 and 4 lie strictly inside local 0; saved 3 sits on its far edge.
    assert {(i, j) for i, j, *_ in pairs if i == 0} == {(0, 0), (0, 1), (0, 2), (0, 4)}


def test_zero_extent_dimension_never_overlaps():
    # A tensor with a zero extent: every chunk is empty along it and nothing overlaps.
    saved = product([chunk_cuts(6, 3), [(0, 0)]])
    local = product([chunk_cuts(6, 2), [(0, 0)]])
    assert check_both_paths(local, saved, 2) == []


def test_torch_chunk_uneven_with_empty_trailing_shards():
    # 5 rows in 4 parts: 2, 2, 1, 0 -- the last shard is empty at offset 5.
    assert chunk_cuts(5, 4) == [(0, 2), (2, 2), (4, 1), (5, 0)]
    # 2 rows in 4 parts: two empty shards, both at offset 2 (duplicate boxes).
    assert chunk_cuts(2, 4) == [(0, 1), (1, 1), (2, 0), (2, 0)]
    for extent, parts in ((5, 4), (2, 4), (7, 3), (1, 8)):
        saved = product([chunk_cuts(extent, parts), chunk_cuts(6, 4)])
        local = product([chunk_cuts(extent, 3), chunk_cuts(6, 5)])
        check_both_paths(local, saved, 2)


def test_nested_saved_intervals_take_the_non_monotone_path():
    # [0, 8) contains [2, 4): sorted by start the ends go 8, 4 -- not monotone.
    saved = [((0,), (8,)), ((2,), (2,)), ((3,), (5,)), ((6,), (1,))]
    summary = _intersect._py_index_summary(*arrays(saved, 1))
    assert summary["mono"] == [False]
    assert summary["grid"] is False
    local = [((i,), (1,)) for i in range(9)] + [((0,), (9,)), ((5,), (0,))]
    check_both_paths(local, saved, 1)


def test_nested_inside_trie_nodes():
    # Non-monotone children under one trie node (dimension 1 nests inside row block 0).
    saved = [((0, 0), (2, 8)), ((0, 2), (2, 2)), ((0, 1), (2, 6)), ((2, 0), (2, 4)),
             ((2, 4), (2, 4))]
    local = product([point_cuts(4, [1, 3]), point_cuts(8, [2, 3, 5])])
    check_both_paths(local, saved, 2)


def test_duplicate_identical_saved_chunks_all_reported():
    saved = [((0, 0), (2, 2)), ((0, 0), (2, 2)), ((2, 0), (2, 2)), ((0, 0), (2, 2))]
    local = [((1, 1), (2, 1))]
    pairs = check_both_paths(local, saved, 2)
    assert [j for _, j, *_ in pairs] == [0, 1, 2, 3]
    assert _intersect._py_index_summary(*arrays(saved, 2))["grid"] is False


def test_offsets_near_2_62():
    base = HUGE - 2**40  # base + 2**62 still fits in int64
    saved = [((base,), (HUGE - 1,)), ((base + HUGE - 1,), (1000,))]
    local = [((base + HUGE - 10,), (20,)), ((base,), (0,)), ((base + 5,), (0,))]
    pairs = check_both_paths(local, saved, 1)
    assert pairs[0] == (0, 0, (HUGE - 10,), (0,), (9,))
    assert pairs[1] == (0, 1, (0,), (9,), (11,))
    # An end exactly at int64's maximum still fits (the boxes were checked with it).
    top = 2**63 - 1
    saved = [((top - 10, 0), (10, 3)), ((0, 0), (top - 10, 1))]
    local = [((top - 20, 0), (20, 2))]
    lo, ls = arrays(local, 2)
    so, ss = arrays(saved, 2)
    assert _intersect.check_boxes(so, ss) == (0, -1)
    assert _intersect.check_boxes(lo, ls) == (0, -1)
    check_both_paths(local, saved, 2)


def test_eight_dims_grid_and_irregular():
    shape = (3, 2, 4, 1, 2, 3, 2, 5)
    saved = product([chunk_cuts(e, p) for e, p in zip(shape, (2, 1, 2, 1, 2, 1, 1, 3))])
    local = product([chunk_cuts(e, p) for e, p in zip(shape, (3, 2, 1, 1, 1, 2, 2, 2))])
    assert _intersect._py_index_summary(*arrays(saved, 8))["grid"] is True
    check_both_paths(local, saved, 8)
    check_both_paths(saved, local, 8)


def test_empty_sides():
    for nd in (0, 1, 3):
        one = [((0,) * nd, (1,) * nd)]
        for path in PATHS:
            assert kernel_pairs([], one, nd, path) == []
            assert kernel_pairs(one, [], nd, path) == []


# ---------------------------------------------------------------------------
# Grid detection
# ---------------------------------------------------------------------------

def expected_grid(boxes):
    """The kernel's grid path needs a product of distinct boxes whose cut lists have sorted ends."""
    nd = len(boxes[0][0])
    mono = []
    for d in range(nd):
        ivs = sorted({(o[d], o[d] + s[d]) for o, s in boxes})
        mono.append(all(a[1] <= b[1] for a, b in zip(ivs, ivs[1:])))
    return ref.is_product_grid(boxes) and all(mono), mono


def check_summary(boxes):
    nd = len(boxes[0][0])
    s = _intersect._py_index_summary(*arrays(boxes, nd))
    grid, mono = expected_grid(boxes)
    assert s["grid"] is grid
    assert s["mono"] == mono
    assert s["dcount"] == [len({(o[d], o[d] + z[d]) for o, z in boxes}) for d in range(nd)]
    # The trie's last level has one node per distinct box.
    assert s["nodes"][-1] == len({(o, z) for o, z in boxes})
    assert sorted(s["perm"]) == list(range(nd))
    # Coarse to fine: levels ordered by the number of distinct intervals.
    assert [s["dcount"][d] for d in s["perm"]] == sorted(s["dcount"])
    return s


@SETTINGS
@given(st.data())
def test_summary_grids(data):
    shape = data.draw(shapes(1, 8))
    boxes = data.draw(grid_layout(shape))
    if data.draw(st.booleans()):
        boxes = data.draw(st.permutations(boxes))
    s = check_summary(boxes)
    # A product of distinct boxes with monotone cuts is always detected.
    if ref.is_product_grid(boxes):
        assert s["grid"] is True


@SETTINGS
@given(st.data())
def test_summary_irregular(data):
    shape = data.draw(shapes(1, 5))
    kind = data.draw(st.sampled_from(["random", "bricks", "moe", "nested", "zero"]))
    check_summary(data.draw(layout(shape, kind)))


def test_summary_is_not_fooled_by_a_product_count():
    # 4 distinct boxes with 2 distinct intervals per dimension, but not the product:
    # (0,0) appears twice as a row/col pair in different boxes and (1,1) never does.
    boxes = [((0, 0), (1, 1)), ((0, 1), (1, 1)), ((1, 0), (1, 1)), ((0, 0), (1, 2))]
    assert not ref.is_product_grid(boxes)
    assert check_summary(boxes)["grid"] is False
    # A grid with one cell missing, and one with a cell duplicated.
    full = product([chunk_cuts(4, 2), chunk_cuts(6, 3)])
    assert check_summary(full)["grid"] is True
    assert check_summary(full[:-1])["grid"] is False
    assert check_summary(full + full[:1])["grid"] is False
    # Bricks: same row blocks, different column cuts per block.
    bricks = [((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 2)), ((2, 2), (2, 4))]
    assert check_summary(bricks)["grid"] is False


def test_summary_product_with_nested_cuts_is_not_a_grid_path():
    # A true product whose dimension-0 cuts nest ([0,4) contains [1,2)): the grid path
    # needs sorted ends, so the kernel must fall back to the trie -- and stay correct.
    boxes = product([[(0, 4), (1, 1)], chunk_cuts(4, 2)])
    assert ref.is_product_grid(boxes)
    assert check_summary(boxes)["grid"] is False
    local = product([point_cuts(4, [1, 2]), point_cuts(4, [3])])
    check_both_paths(local, boxes, 2)


def test_summary_rejects_empty_and_zero_d():
    with pytest.raises(ValueError):
        _intersect._py_index_summary(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64))
    with pytest.raises(ValueError):
        _intersect._py_index_summary(np.zeros((3, 0), np.int64), np.zeros((3, 0), np.int64))


# ---------------------------------------------------------------------------
# check_boxes and shape errors of the raw kernel
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("off,size,code,row", [
    ([[0, 0], [-1, 0]], [[1, 1], [1, 1]], _intersect.BOX_NEGATIVE_OFFSET, 1),
    ([[0, 0], [0, 0]], [[1, 1], [1, -2]], _intersect.BOX_NEGATIVE_SIZE, 1),
    ([[2**63 - 1, 0]], [[1, 1]], _intersect.BOX_END_OVERFLOW, 0),
    ([[0, 0], [0, 0], [0, 0]], [[1, 1], [1, 1], [2**32, 2**31]], _intersect.BOX_VOLUME_OVERFLOW, 2),
    ([[0, 0]], [[2**32, 2**31 - 1]], 0, -1),
    ([[0]], [[2**63 - 1]], 0, -1),
    # Volume 0: a zero size after (or before) sizes whose product would overflow.
    ([[0, 0, 0]], [[2**40, 2**40, 0]], 0, -1),
    ([[0, 0, 0]], [[0, 2**40, 2**40]], 0, -1),
    ([[0, 0, 0], [0, 0, 0]], [[2**40, 2**40, 0], [2**40, 2**40, 1]],
     _intersect.BOX_VOLUME_OVERFLOW, 1),
])
def test_check_boxes(off, size, code, row):
    got = _intersect.check_boxes(np.array(off, np.int64), np.array(size, np.int64))
    assert got == (code, row)


def test_intersect_rejects_mismatched_arrays():
    a = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError):
        _intersect.intersect(a, np.zeros((2, 3), np.int64), a, a)
    with pytest.raises(ValueError):
        _intersect.intersect(a, a, np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError):
        _intersect.intersect(a, a, a, np.zeros((3, 2), np.int64))


@SETTINGS
@given(st.data())
def test_nested_and_random_big_counts(data):
    # Larger random and nested saved lists (more trie levels with many children).
    shape = data.draw(shapes(2, 3, max_extent=40))
    saved = data.draw(nested_layout(shape, 60))
    local = data.draw(random_boxes(shape, 20))
    check_both_paths(local, saved, len(shape))


# ---------------------------------------------------------------------------
# Sizes that reach the kernel's slow paths: output growth, sorting many saved hits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_hits_per_local_chunk_in_shuffled_order(seed):
    # A local chunk covering a shuffled 12x12 saved grid hits 144 saved chunks, reported
    # by the index in cell order: more than the insertion sort handles (heap sort path).
    import random

    rng = random.Random(seed)
    saved = product([chunk_cuts(24, 12), point_cuts(30, sorted(rng.sample(range(1, 30), 11)))])
    rng.shuffle(saved)
    local = [((0, 0), (24, 30)), ((3, 4), (17, 20)), ((0, 0), (0, 30))]
    pairs = check_both_paths(local, saved, 2)
    assert sum(1 for p in pairs if p[0] == 0) == 144
    # Nested saved chunks as well, so the trie path sorts many hits too.
    saved_nested = saved + [((0, 0), (24, 30)), ((1, 1), (20, 20))]
    rng.shuffle(saved_nested)
    check_both_paths(local, saved_nested, 2)


def test_output_larger_than_the_initial_buffer():
    # 64 x 40 saved chunks, all hit by one local chunk, plus a grid of local chunks:
    # several thousand pairs, past the kernel's first 1024-entry output buffer.
    saved = product([chunk_cuts(64, 64), chunk_cuts(80, 40)])
    local = [((0, 0), (64, 80))] + product([chunk_cuts(64, 3), chunk_cuts(80, 7)])
    pairs = check_both_paths(local, saved, 2)
    assert len(pairs) >= 2 * 64 * 40


def test_read_only_inputs():
    # The kernel takes const memoryviews: read-only arrays (e.g. np.frombuffer over bytes,
    # or a memory-mapped checkpoint index) must be accepted and left untouched.
    saved = product([chunk_cuts(6, 3), chunk_cuts(4, 2)])
    local = [((1, 1), (4, 2))]
    arrs = [*arrays(local, 2), *arrays(saved, 2)]
    copies = [a.copy() for a in arrs]
    for a in arrs:
        a.setflags(write=False)
    for path in PATHS:
        li, si, *_ = _intersect.intersect(*arrs, path=path)
        assert list(zip(li.tolist(), si.tolist())) == [
            (i, j) for i, j, *_ in ref.intersect(local, saved)]
    for a, c in zip(arrs, copies):
        np.testing.assert_array_equal(a, c)


def test_index_is_freed_when_the_output_reservation_fails():
    # Enough chunks for the indexed path, whose index is built before the
    # output buffer is reserved: a failed reservation must not leak it.
    off = np.arange(0, 4000, 4, dtype=np.int64).reshape(-1, 1)
    size = np.full_like(off, 4)
    assert _intersect._py_live_indexes() == 0
    _intersect._py_fail_reserve(True)
    try:
        for path in ("auto", "grid", "trie"):
            with pytest.raises(MemoryError):
                _intersect.intersect(off, size, off, size, path)
    finally:
        _intersect._py_fail_reserve(False)
    assert _intersect._py_live_indexes() == 0
    assert len(_intersect.intersect(off, size, off, size)[0]) == len(off)
    assert _intersect._py_live_indexes() == 0
