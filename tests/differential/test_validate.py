"""Differential tests of validate_global_plan against torch's _validate_global_plan.

torch is fed its own objects and must produce exactly ckcore's messages (same
strings, same order) when ckcore is fed the same torch objects; ckcore fed
its own objects must produce the same messages up to the repr of torch.Size.
The overlap kernel is also checked pair for pair against a naive all-pairs
reference on larger layouts than torch's validator can afford.
"""

from __future__ import annotations

import itertools
import logging
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import _validate_global_plan

from ckcore._kernels._validate import _check_tensor, _check_tensor_bounded, _self_overlap_pairs
from ckcore.global_plan import validate_global_plan
from tests.support.gp_cases import ck_md, normalize, torch_md

TWO_PLANS = [object(), object()]


@pytest.fixture(autouse=True)
def _quiet(caplog):
    # Both validators log one warning per finding; keep the output small.
    caplog.set_level(logging.ERROR)


def check(tensors: dict, plans=TWO_PLANS) -> list[str]:
    """Assert ckcore == torch on this layout (both object kinds); return torch's messages."""
    mt = torch_md(tensors)
    expected = _validate_global_plan(plans, mt)
    got_t = validate_global_plan(plans, mt)
    assert got_t == expected
    got_c = validate_global_plan(plans, ck_md(tensors))
    assert got_c == [normalize(m) for m in expected]
    return expected


def naive_pairs(offs, sizes):
    n, d = offs.shape
    out = set()
    for i in range(n):
        for j in range(i):
            if all(
                not (offs[i, k] >= offs[j, k] + sizes[j, k] or offs[j, k] >= offs[i, k] + sizes[i, k])
                for k in range(d)
            ):
                out.add((i, j))
    return out


def kernel_pairs(offs, sizes):
    res = _self_overlap_pairs(np.ascontiguousarray(offs, dtype=np.int64),
                              np.ascontiguousarray(sizes, dtype=np.int64))
    got = [tuple(sorted(p, reverse=True)) for p in res.tolist()]
    assert len(got) == len(set(got)), "a pair was reported twice"
    return set(got)


# ------------------------------------------------------------------ strategies


@st.composite
def random_layout(draw, max_ndim=4, max_chunks=24):
    """Arbitrary boxes in and around a small tensor: overlaps, gaps, out of bounds, empties."""
    ndim = draw(st.integers(1, max_ndim))
    size = draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim))
    n = draw(st.integers(0, max_chunks))
    lo = draw(st.sampled_from([0, 0, 0, -2]))  # sometimes negative values
    chunks = []
    for _ in range(n):
        offs = draw(st.lists(st.integers(lo, 10), min_size=ndim, max_size=ndim))
        sizes = draw(st.lists(st.integers(lo, 6), min_size=ndim, max_size=ndim))
        chunks.append((offs, sizes))
    return tuple(size), chunks


def cuts(draw, length, max_parts):
    k = draw(st.integers(1, max_parts))
    pts = sorted(draw(st.lists(st.integers(0, length), min_size=k - 1, max_size=k - 1)))
    bounds = [0, *pts, length]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]


@st.composite
def structured_layout(draw, max_ndim=5):
    """Grids (regular or not), per-column irregular cuts, then a few random edits.

    These drive the grid proof and the interval-grouping paths; the edits
    (duplicate, shift, shrink to empty, drop) create the overlaps and gaps.
    """
    ndim = draw(st.integers(1, max_ndim))
    size = [draw(st.integers(0, 12)) for _ in range(ndim)]
    if draw(st.booleans()) or ndim == 1:
        per_dim = [cuts(draw, s, 4) for s in size]
        chunks = [
            ([iv[0] for iv in combo], [iv[1] for iv in combo]) for combo in itertools.product(*per_dim)
        ]
    else:
        # Irregular in dim 0 per column of dim 1 (MoE-like uneven groups).
        col_cuts = cuts(draw, size[1], 4)
        rest = [cuts(draw, s, 2) for s in size[2:]]
        chunks = []
        for c_off, c_size in col_cuts:
            for r_off, r_size in cuts(draw, size[0], 4):
                for combo in itertools.product(*rest):
                    chunks.append(
                        ([r_off, c_off, *(iv[0] for iv in combo)],
                         [r_size, c_size, *(iv[1] for iv in combo)])
                    )
    for _ in range(draw(st.integers(0, 3))):
        if not chunks:
            break
        i = draw(st.integers(0, len(chunks) - 1))
        op = draw(st.sampled_from(["dup", "shift", "empty", "drop", "grow"]))
        o, s = list(chunks[i][0]), list(chunks[i][1])
        k = draw(st.integers(0, ndim - 1))
        if op == "dup":
            chunks.append((o, s))
        elif op == "shift":
            o[k] += draw(st.integers(-2, 2))
            chunks[i] = (o, s)
        elif op == "empty":
            s[k] = 0
            o[k] += draw(st.integers(0, 2))
            chunks[i] = (o, s)
        elif op == "grow":
            s[k] += draw(st.integers(1, 3))
            chunks[i] = (o, s)
        else:
            chunks.pop(i)
    draw(st.randoms()).shuffle(chunks)
    return tuple(size), chunks


# ----------------------------------------------------------- differential tests


@settings(max_examples=200, deadline=None)
@given(random_layout())
def test_random_layouts_match_torch(layout):
    check({"w": layout})


@settings(max_examples=200, deadline=None)
@given(structured_layout())
def test_structured_layouts_match_torch(layout):
    check({"w": layout})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(random_layout(3, 8), structured_layout(3), st.none()), max_size=5),
       st.integers(1, 3))
def test_many_keys_and_plan_counts(layouts, nplans):
    # Messages come key by key in metadata order; the fill check needs > 1 plan.
    tensors = {f"k{i}": lay for i, lay in enumerate(layouts)}
    check(tensors, [object()] * nplans)


@settings(max_examples=150, deadline=None)
@given(st.one_of(random_layout(5, 60), structured_layout(6)))
def test_kernel_pairs_equal_naive(layout):
    size, chunks = layout
    ndim = len(size)
    offs = np.array([c[0] for c in chunks], dtype=np.int64).reshape(-1, ndim)
    sizes = np.array([c[1] for c in chunks], dtype=np.int64).reshape(-1, ndim)
    assert kernel_pairs(offs, sizes) == naive_pairs(offs, sizes)


@settings(max_examples=150, deadline=None)
@given(st.one_of(random_layout(5, 40), structured_layout(5)),
       st.integers(-1, 6), st.integers(-1, 12))
def test_bounded_search_keeps_a_prefix_and_counts(layout, keep, stop):
    # _check_tensor_bounded: at most `keep` true pairs, an exact count when it
    # says complete, a lower bound of at least `stop` when it stopped.
    size, chunks = layout
    ndim = len(size)
    offs = np.array([c[0] for c in chunks], dtype=np.int64).reshape(-1, ndim)
    sizes = np.array([c[1] for c in chunks], dtype=np.int64).reshape(-1, ndim)
    tsize = np.array(size, dtype=np.int64)
    naive = naive_pairs(offs, sizes)
    oob, volume, pairs, found, complete, exhausted, spent = _check_tensor_bounded(
        offs, sizes, tsize, keep, stop, -1)
    full = _check_tensor(offs, sizes, tsize)
    assert oob.tolist() == full[0].tolist() and volume == full[1]
    got = [tuple(sorted(p, reverse=True)) for p in pairs.tolist()]
    assert set(got) <= naive and len(got) == len(set(got))
    assert not exhausted and spent == 0
    if complete:
        assert found == len(naive)
    else:
        assert 0 <= stop <= found <= len(naive)
    assert len(got) == (found if keep < 0 else min(keep, found))


def test_bounded_search_counts_identical_chunks_without_walking_them():
    # One chunk repeated 200,000 times (a crafted file repeats one pickled
    # object for 2 bytes a copy): 2e10 pairs, counted exactly, 5 kept.
    n = 200_000
    offs = np.zeros((n, 2), dtype=np.int64)
    sizes = np.full((n, 2), 4, dtype=np.int64)
    res = _check_tensor_bounded(offs, sizes, np.array([4, 4], dtype=np.int64), 5, 1000, -1)
    _, _, pairs, found, complete, exhausted, _ = res
    assert pairs.shape == (5, 2) and found == n * (n - 1) // 2 and complete and not exhausted


def test_sweep_budget_ends_a_quadratic_search():
    # Chunks that all share a sweep interval yet overlap in no pair, and no
    # dimension splits them: n^2/2 comparisons without a budget.
    n = 3000
    i = np.arange(n, dtype=np.int64)
    offs = np.vstack([np.stack([i, i], 1), [[10 * n, 0]]])
    sizes = np.vstack([np.stack([np.full(n, n), np.ones(n, dtype=np.int64)], 1), [[n, n]]])
    tsize = np.array([11 * n, n], dtype=np.int64)
    offs, sizes = np.ascontiguousarray(offs), np.ascontiguousarray(sizes)
    *_, found, complete, exhausted, spent = _check_tensor_bounded(offs, sizes, tsize, 20, -1, 10_000)
    assert (found, complete, exhausted, spent) == (0, False, True, 10_000)
    *_, found, complete, exhausted, spent = _check_tensor_bounded(offs, sizes, tsize, 20, -1, 10**8)
    assert (found, complete, exhausted) == (0, True, False) and 0 < spent < 10**8


# ----------------------------------------------------------------- adversarial


def test_zero_size_chunk_inside_and_on_boundary():
    msgs = check({"w": ((8, 8), [
        ((0, 0), (8, 4)),
        ((0, 4), (8, 4)),
        ((3, 2), (0, 1)),   # empty, strictly inside chunk 0: overlaps it
        ((0, 4), (2, 0)),   # empty, on the boundary of both: overlaps nothing
        ((0, 4), (2, 0)),   # identical empty chunk: overlaps nothing
    ])})
    assert sum("overlapping" in m for m in msgs) == 1


def test_zero_d_tensor_skipped_and_bytes_skipped():
    assert check({"s": ((), [((), ()), ((), ())]), "b": None}) == []


def test_identical_chunks_every_pair():
    msgs = check({"w": ((4, 4), [((0, 0), (4, 4))] * 5)})
    assert sum("overlapping" in m for m in msgs) == 10


@pytest.mark.parametrize("ndim", [1, 2, 3, 4, 5, 6, 7, 8])
def test_dims_1_to_8(ndim):
    rng = random.Random(ndim)
    size = tuple(rng.randint(2, 4) for _ in range(ndim))
    per_dim = [[(0, s // 2), (s // 2, s - s // 2)] for s in size]
    chunks = [([iv[0] for iv in c], [iv[1] for iv in c]) for c in itertools.product(*per_dim)]
    chunks[-1] = (chunks[0][0], chunks[0][1])  # a duplicate: one overlap, one gap
    rng.shuffle(chunks)
    msgs = check({"w": (size, chunks)})
    assert any("overlapping" in m for m in msgs)


@pytest.mark.parametrize("ndim", [63, 64, 70])
def test_more_dims_than_the_split_mask_matches_torch(ndim):
    # Interval grouping keeps candidate dimensions in a 64-bit mask; tensors
    # with more dimensions (torch allows them) take the plain sweep.
    size = (4, 3) + (1,) * (ndim - 2)
    rest = (0,) * (ndim - 2), (1,) * (ndim - 2)
    chunks = [((0, 0) + rest[0], (2, 3) + rest[1]), ((2, 0) + rest[0], (2, 2) + rest[1]),
              ((1, 1) + rest[0], (2, 2) + rest[1])]
    msgs = check({"w": (size, chunks)})
    assert sum("overlapping" in m for m in msgs) == 2
    assert any("invalid fill" in m for m in msgs)


def test_moe_layout_irregular_experts():
    # 64 experts x 8-way on dim 1, uneven expert groups that differ per column,
    # plus one rogue chunk overlapping two groups.
    rng = random.Random(0)
    E, H, F = 64, 64, 16
    chunks = []
    for col in range(8):
        e = 0
        while e < E:
            g = min(rng.randint(1, 5), E - e)
            chunks.append(((e, col * H // 8, 0), (g, H // 8, F)))
            e += g
    chunks.append(((10, 4, 0), (3, 8, 4)))
    msgs = check({"experts": ((E, H, F), chunks)})
    assert sum("overlapping" in m for m in msgs) >= 2


def test_huge_offsets_near_2_62():
    big = 2**62
    msgs = check({"w": ((big + 8, 4), [
        ((big, 0), (4, 4)),
        ((big + 4, 0), (4, 4)),
        ((big + 2, 1), (4, 2)),
        ((0, 0), (big, 4)),
    ])})
    assert any("overlapping" in m for m in msgs)


def test_volume_overflowing_int64_is_exact():
    big = 2**40
    msgs = check({"w": ((big, big), [((0, 0), (big, big)), ((0, 0), (big, big - 1))])})
    fill = [m for m in msgs if "invalid fill" in m]
    assert fill and str(2**80 + big * (big - 1)) in fill[0]


def test_volume_sum_over_int64_per_chunk_fits():
    # Each chunk's volume fits in int64, the sum does not: 128-bit accumulation.
    s = 2**31
    chunks = [((0, 0), (s, s))] * 3
    msgs = check({"w": ((s, s), chunks)})
    assert any(str(3 * s * s) in m for m in msgs)


def test_negative_values_reported_like_torch():
    msgs = check({"w": ((6, 6), [((-2, 0), (4, 6)), ((2, 0), (4, -1)), ((0, 0), (6, 6))])})
    assert sum("out of bounds" in m for m in msgs) == 2


def test_single_plan_skips_fill_check():
    msgs = check({"w": ((4,), [((0,), (2,))])}, plans=[object()])
    assert msgs == []


def test_large_grid_and_moe_pairs_equal_naive():
    rng = np.random.default_rng(0)
    # 16x16 grid with 3 perturbed chunks, checked against all pairs.
    g = [(i * 4, j * 4) for i in range(16) for j in range(16)]
    offs = np.array(g, dtype=np.int64)
    sizes = np.full_like(offs, 4)
    for i in rng.choice(len(g), 3, replace=False):
        offs[i] += rng.integers(-2, 3, size=2)
    assert kernel_pairs(offs, sizes) == naive_pairs(offs, sizes)


# ------------------------------------------------------------------- bad input


def test_wrong_ndim_raises_naming_key_and_chunk():
    with pytest.raises(ValueError, match=r"key:w chunk 1 .*offsets has 1 dims but the tensor has 2"):
        validate_global_plan(TWO_PLANS, ck_md({"w": ((4, 4), [((0, 0), (4, 4)), ((0,), (4,))])}))


def test_offsets_sizes_length_mismatch_raises():
    md = ck_md({"w": ((4, 4), [((0, 0), (4, 4))])})
    md.state_dict_metadata["w"].chunks[0].sizes = (4,)
    with pytest.raises(ValueError, match="key:w chunk 0"):
        validate_global_plan(TWO_PLANS, md)


def test_float_offset_raises_type_error():
    md = ck_md({"w": ((4,), [((0,), (4,))])})
    md.state_dict_metadata["w"].chunks[0].offsets = (0.5,)
    with pytest.raises(TypeError, match="key:w chunk 0"):
        validate_global_plan(TWO_PLANS, md)


def test_not_a_chunk_raises_type_error():
    md = ck_md({"w": ((4,), [((0,), (4,))])})
    md.state_dict_metadata["w"].chunks.append("nope")
    with pytest.raises(TypeError, match="key:w chunk 1"):
        validate_global_plan(TWO_PLANS, md)


def test_value_beyond_int64_raises():
    with pytest.raises(ValueError, match="does not fit in int64"):
        validate_global_plan(TWO_PLANS, ck_md({"w": ((4,), [((2**63,), (1,))])}))


def test_offset_plus_size_overflow_raises():
    with pytest.raises(ValueError, match="overflows int64"):
        validate_global_plan(TWO_PLANS, ck_md({"w": ((4,), [((2**62,), (2**62,))])}))


def test_logs_each_finding(caplog):
    caplog.set_level(logging.WARNING, logger="ckcore.global_plan")
    msgs = validate_global_plan(TWO_PLANS, ck_md({"w": ((4,), [((0,), (3,)), ((1,), (4,))])}))
    logged = [r.getMessage() for r in caplog.records if r.name == "ckcore.global_plan"]
    assert logged == msgs and len(msgs) == 3


def test_logs_to_the_given_logger_instead(caplog):
    caplog.set_level(logging.WARNING)
    msgs = validate_global_plan(TWO_PLANS, ck_md({"w": ((4,), [((0,), (3,)), ((1,), (4,))])}),
                                logger=logging.getLogger("test.validate.elsewhere"))
    assert [r.getMessage() for r in caplog.records if r.name == "test.validate.elsewhere"] == msgs
    assert not [r for r in caplog.records if r.name == "ckcore.global_plan"]


def test_bad_tensor_size_raises():
    md = ck_md({"w": ((4,), [((0,), (4,))])})
    md.state_dict_metadata["w"].size = (4.0,)
    with pytest.raises(TypeError, match="key:w tensor size"):
        validate_global_plan(TWO_PLANS, md)
    md.state_dict_metadata["w"].size = (2**64,)
    with pytest.raises(ValueError, match="key:w tensor size"):
        validate_global_plan(TWO_PLANS, md)


def test_unknown_storage_entry_raises():
    md = ck_md({"w": ((4,), [((0,), (4,))])})
    md.state_dict_metadata["x"] = object()
    with pytest.raises(TypeError, match="key:x"):
        validate_global_plan(TWO_PLANS, md)


def pinwheels(k, s=2, hole=False):
    """k x k pinwheel tilings: no dimension's cuts separate a unit's 5 chunks."""
    out = []
    for a in range(k):
        for b in range(k):
            x, y = a * 3 * s, b * 3 * s
            out += [((x, y), (2 * s, s)), ((x + 2 * s, y), (s, 2 * s)),
                    ((x + s, y + 2 * s), (2 * s, s)), ((x, y + s), (s, 2 * s))]
            if not hole:
                out.append(((x + s, y + s), (s, s)))
    return out


def test_pinwheel_tiling_sound_and_perturbed():
    chunks = pinwheels(4)
    size = (4 * 6, 4 * 6)
    assert check({"w": (size, chunks)}) == []
    chunks[7] = ((chunks[7][0][0] + 1, chunks[7][0][1]), chunks[7][1])
    assert any("overlapping" in m for m in check({"w": (size, chunks)}))
    offs = np.array([c[0] for c in pinwheels(12)], dtype=np.int64)
    sizes = np.array([c[1] for c in pinwheels(12)], dtype=np.int64)
    offs[::37] += 1
    assert kernel_pairs(offs, sizes) == naive_pairs(offs, sizes)
