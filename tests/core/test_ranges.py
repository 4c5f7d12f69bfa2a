"""The byte-range kernel against numpy's own index arithmetic (torch-free).

A numpy view (C-order, transposed, sliced with steps) *is* a chunk stored
with (shape, strides, itemsize, base): its element addresses are the
reference. Ranges, coalescing and box copy are checked against naive Python
over those addresses, on hypothesis-generated and adversarial layouts.
"""

from __future__ import annotations

import itertools
import mmap
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckcore import ranges
from ckcore.ranges import (
    box_runs,
    byte_ranges,
    coalesce_ranges,
    contiguous_strides,
    copy_box,
    paired_run_info,
    paired_runs,
    read_runs,
)

DTYPES = [np.uint8, np.int16, np.float32, np.float64, np.complex128]


def layout(view: np.ndarray, base_arr: np.ndarray):
    """(shape, element strides, itemsize, byte base) of a view inside base_arr's buffer."""
    isz = view.itemsize
    assert all(s % isz == 0 for s in view.strides)
    base = view.__array_interface__["data"][0] - base_arr.__array_interface__["data"][0]
    return view.shape, tuple(s // isz for s in view.strides), isz, base


def ref_ranges(shape, strides, isz, base, offsets, lengths):
    """Naive: every element's [addr, addr + isz), sorted and merged."""
    ivs = []
    for idx in itertools.product(*[range(o, o + n) for o, n in zip(offsets, lengths)]):
        a = base + sum(i * s for i, s in zip(idx, strides)) * isz
        ivs.append((a, a + isz))
    ivs.sort()
    out: list[list[int]] = []
    for a, b in ivs:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


@st.composite
def strided_views(draw, max_ndim=4):
    """A numpy view with a permuted, stepped layout inside a flat base buffer, and a box."""
    ndim = draw(st.integers(0, max_ndim))
    dtype = draw(st.sampled_from(DTYPES))
    full = [draw(st.integers(1, 7)) for _ in range(ndim)]
    n = int(np.prod(full)) if full else 1
    base_arr = np.arange(n + 3).astype(dtype)
    arr = base_arr[3:].reshape(full) if ndim else base_arr[3:4].reshape(())
    if ndim:
        arr = arr.transpose(draw(st.permutations(range(ndim))))
        sl = []
        for d in range(ndim):
            start = draw(st.integers(0, arr.shape[d]))
            step = draw(st.integers(1, 3))
            sl.append(slice(start, None, step))
        arr = arr[tuple(sl)]
    offsets, lengths = [], []
    for s in arr.shape:
        o = draw(st.integers(0, s))
        offsets.append(o)
        lengths.append(draw(st.integers(0, s - o)))
    return base_arr, arr, tuple(offsets), tuple(lengths)


@settings(max_examples=200, deadline=None)
@given(strided_views())
def test_byte_ranges_match_numpy_addresses(case):
    base_arr, arr, offsets, lengths = case
    shape, strides, isz, base = layout(arr, base_arr)
    got = byte_ranges(shape, strides, isz, offsets, lengths, base=base)
    assert got.dtype == np.int64 and got.shape[1] == 2
    assert got.tolist() == ref_ranges(shape, strides, isz, base, offsets, lengths)
    # the bytes at those ranges are exactly the box's elements (set-wise)
    raw = base_arr.view(np.uint8)
    picked = np.concatenate([raw[a:b] for a, b in got.tolist()] or [np.empty(0, np.uint8)])
    box = arr[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
    assert sorted(picked.view(arr.dtype).tolist(), key=repr) == sorted(box.ravel().tolist(), key=repr)
    runs, run_bytes, first = box_runs(shape, strides, isz, offsets, lengths, base=base)
    assert runs * run_bytes == box.size * isz
    if box.size:
        assert first == got[0, 0]


def test_c_order_transposed_sliced_examples():
    a = np.zeros((4, 6), np.float32)
    # C order: rows 1..2, cols 2..4
    assert byte_ranges((4, 6), (6, 1), 4, (1, 2), (2, 3), base=100).tolist() == [[132, 144], [156, 168]]
    # full rows merge into one range
    assert byte_ranges((4, 6), (6, 1), 4, (1, 0), (2, 6)).tolist() == [[24, 72]]
    # transposed: a column of the logical array is a row on disk
    t = a.T
    shape, strides, isz, base = layout(t, a)
    assert byte_ranges(shape, strides, isz, (0, 2), (6, 1), base=base).tolist() == [[48, 72]]
    assert byte_ranges(shape, strides, isz, (0, 0), (6, 4), base=base).tolist() == [[0, 96]]
    # 0-d and empty boxes
    assert byte_ranges((), (), 8, (), (), base=16).tolist() == [[16, 24]]
    assert byte_ranges((4, 6), (6, 1), 4, (4, 0), (0, 6)).shape == (0, 2)
    # stride 0 (an expanded tensor): every row reads the same bytes
    assert byte_ranges((3, 4), (0, 1), 2, (0, 0), (3, 4)).tolist() == [[0, 8]]


def test_huge_offsets_near_2_62():
    base = 2**62
    got = byte_ranges((2**20, 2**20), (2**20, 1), 2, (2**20 - 1, 5), (1, 3), base=base)
    assert got.tolist() == [[base + ((2**20 - 1) * 2**20 + 5) * 2, base + ((2**20 - 1) * 2**20 + 8) * 2]]
    assert box_runs((2**31, 2**30), (2**30, 1), 1, (0, 0), (2**31, 2**30)) == (1, 2**61, 0)


# ------------------------------------------------------------------ coalescing


def ref_coalesce(ranges, max_gap, max_overread):
    needed = sum(b - a for a, b in ranges)
    budget = int((max_overread - 1.0) * needed)
    gaps = sorted(
        (ranges[i + 1][0] - ranges[i][1], i)
        for i in range(len(ranges) - 1)
        if ranges[i + 1][0] - ranges[i][1] <= max_gap
    )
    fill = set()
    for g, i in gaps:
        if g > budget:
            break
        budget -= g
        fill.add(i)
    out: list[list[int]] = []
    for i, (a, b) in enumerate(ranges):
        if out and (i - 1) in fill:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out


@st.composite
def sorted_ranges(draw):
    n = draw(st.integers(0, 40))
    pos = draw(st.integers(0, 1000))
    out = []
    for _ in range(n):
        pos += draw(st.integers(0, 300))
        ln = draw(st.integers(1, 200))
        out.append([pos, pos + ln])
        pos += ln
    return out


@settings(max_examples=200, deadline=None)
@given(sorted_ranges(), st.integers(0, 400), st.floats(1.0, 3.0))
def test_coalesce_matches_reference_and_invariants(ranges, max_gap, max_overread):
    got = coalesce_ranges(ranges, max_gap=max_gap, max_overread=max_overread).tolist()
    assert got == ref_coalesce(ranges, max_gap, max_overread)
    needed = sum(b - a for a, b in ranges)
    read = sum(b - a for a, b in got)
    assert read <= max_overread * needed + 1e-6
    # every input range lies inside exactly one output range
    for a, b in ranges:
        assert sum(1 for s, e in got if s <= a and b <= e) == 1
    # outputs are disjoint, sorted, and no merged gap exceeds max_gap
    # (touching ranges always merge: a zero gap costs nothing)
    for (_, e0), (s1, _) in itertools.pairwise(got):
        assert e0 < s1
    for left, right in itertools.pairwise(ranges):
        if any(s <= left[0] and right[1] <= e for s, e in got):
            assert right[0] - left[1] <= max_gap


def test_coalesce_examples():
    r = [[0, 10], [12, 20], [100, 110]]
    assert coalesce_ranges(r, max_gap=50, max_overread=2.0).tolist() == [[0, 20], [100, 110]]
    # cap 1.0: only touching ranges merge
    assert coalesce_ranges([[0, 10], [10, 20], [21, 30]], max_gap=50, max_overread=1.0).tolist() == [
        [0, 20],
        [21, 30],
    ]
    # budget is spent on the smallest gaps first
    r = [[0, 10], [15, 25], [26, 36], [40, 50]]  # gaps 5, 1, 4; needed 40, budget 4 at 1.1
    assert coalesce_ranges(r, max_gap=10, max_overread=1.1).tolist() == [[0, 10], [15, 36], [40, 50]]
    assert coalesce_ranges(np.empty((0, 2), np.int64)).shape == (0, 2)


def test_coalesce_bad_input():
    with pytest.raises(ValueError, match="sorted"):
        coalesce_ranges([[10, 20], [0, 5]])
    with pytest.raises(ValueError, match="sorted"):
        coalesce_ranges([[0, 20], [10, 30]])
    with pytest.raises(ValueError, match="invalid"):
        coalesce_ranges([[5, 2]])
    with pytest.raises(ValueError, match="invalid"):
        coalesce_ranges([[-5, 2]])
    with pytest.raises(ValueError, match="max_overread"):
        coalesce_ranges([[0, 2]], max_overread=0.5)
    with pytest.raises(ValueError, match="max_gap"):
        coalesce_ranges([[0, 2]], max_gap=-1)
    with pytest.raises(ValueError, match="int64"):
        coalesce_ranges([[0, 2**62], [2**62 + 5, 2**63]])


    with pytest.raises(TypeError, match="integers"):
        coalesce_ranges([[0.5, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        coalesce_ranges([[0, 1, 2]])


def test_coalesce_huge_offsets():
    r = [[2**62, 2**62 + 10], [2**62 + 11, 2**62 + 20], [2**63 - 10, 2**63 - 1]]
    assert coalesce_ranges(r, max_gap=2**62, max_overread=1.1).tolist() == [
        [2**62, 2**62 + 20],
        [2**63 - 10, 2**63 - 1],
    ]


# ------------------------------------------------------------------ box copy


@st.composite
def copy_cases(draw):
    ndim = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(DTYPES))
    lengths = tuple(draw(st.integers(0, 5)) for _ in range(ndim))

    def chunk(tag):
        full = tuple(n + draw(st.integers(0, 3)) for n in lengths)
        n = int(np.prod(full)) if full else 1
        pad = draw(st.integers(0, 4))
        base_arr = (np.arange(n + pad) * (1 if tag == "src" else -1)).astype(dtype)
        arr = base_arr[pad:].reshape(full) if ndim else base_arr[pad:pad + 1].reshape(())
        if ndim:
            perm = draw(st.permutations(range(ndim)))
            # a permuted layout with the same logical shape
            arr = np.ascontiguousarray(arr.transpose(perm)).transpose(np.argsort(perm))
            base_arr = arr.base if arr.base is not None else arr
            base_arr = base_arr.reshape(-1)
        offs = tuple(draw(st.integers(0, f - n)) for f, n in zip(arr.shape, lengths))
        return base_arr, arr, offs

    return lengths, chunk("src"), chunk("dst")


@settings(max_examples=200, deadline=None)
@given(copy_cases())
def test_copy_box_matches_numpy_assignment(case):
    lengths, (sb, sa, so), (db, da, do) = case
    expect = da.copy()
    expect[tuple(slice(o, o + n) for o, n in zip(do, lengths))] = sa[
        tuple(slice(o, o + n) for o, n in zip(so, lengths))
    ]
    s_shape, s_strides, isz, s_base = layout(sa, sb)
    d_shape, d_strides, _, d_base = layout(da, db)
    copy_box(
        sb, db, lengths, itemsize=isz,
        src_shape=s_shape, src_strides=s_strides, src_offsets=so, src_base=s_base,
        dst_shape=d_shape, dst_strides=d_strides, dst_offsets=do, dst_base=d_base,
    )
    assert np.array_equal(da, expect)
    # paired runs cover the box exactly, and agree with their O(ndim) summary
    pr = paired_runs(
        lengths, itemsize=isz, src_shape=s_shape, src_strides=s_strides, src_offsets=so,
        dst_shape=d_shape, dst_strides=d_strides, dst_offsets=do,
    )
    numel = int(np.prod(lengths)) if lengths else 1
    assert int(pr[:, 2].sum()) == numel * isz
    assert paired_run_info(
        lengths, itemsize=isz, src_shape=s_shape, src_strides=s_strides, src_offsets=so,
        dst_shape=d_shape, dst_strides=d_strides, dst_offsets=do,
    ) == ((len(pr), int(pr[0, 2])) if numel else (0, 0))
    assert np.all(np.diff(pr[:, 0]) > 0)


def test_copy_box_buffer_kinds():
    src = np.arange(24, dtype=np.int32).reshape(4, 6)
    want = src[1:3, 2:5]
    for dst in (bytearray(2 * 3 * 4), np.zeros(6, np.int32)):
        copy_box(bytes(src.tobytes()), dst, (2, 3), itemsize=4, src_shape=(4, 6),
                 src_offsets=(1, 2), dst_shape=(2, 3))
        assert np.array_equal(np.frombuffer(dst, np.int32).reshape(2, 3), want)
    with mmap.mmap(-1, 4096) as m:
        m[:96] = src.tobytes()
        dst = np.zeros((3, 2), np.int32)
        # into a transposed destination: column-major storage of a 2x3 box
        copy_box(m, dst, (2, 3), itemsize=4, src_shape=(4, 6), src_offsets=(1, 2),
                 dst_shape=(2, 3), dst_strides=(1, 2))
        assert np.array_equal(dst.T, want)


def test_copy_box_large_runs_release_gil():
    # a big contiguous copy and a big strided one agree with numpy
    src = np.random.default_rng(0).integers(0, 255, (512, 1024), dtype=np.uint8)
    dst = np.zeros((1024, 512), np.uint8)
    copy_box(src, dst, (512, 1024), itemsize=1, src_shape=(512, 1024), dst_shape=(512, 1024),
             dst_strides=(1, 512))
    assert np.array_equal(dst, src.T)


# ------------------------------------------------------------------ bad input


def test_bad_input_byte_ranges():
    with pytest.raises(ValueError, match="outside the chunk"):
        byte_ranges((4, 6), (6, 1), 4, (3, 0), (2, 6))
    with pytest.raises(ValueError, match="negative"):
        byte_ranges((4, 6), (6, 1), 4, (-1, 0), (1, 6))
    with pytest.raises(ValueError, match="negative"):
        byte_ranges((4, 6), (-6, 1), 4, (0, 0), (1, 6))
    with pytest.raises(ValueError, match="same length"):
        byte_ranges((4, 6), (6,), 4, (0, 0), (1, 6))
    with pytest.raises(ValueError, match="itemsize"):
        byte_ranges((4,), (1,), 0, (0,), (1,))
    with pytest.raises(ValueError, match="base"):
        byte_ranges((4,), (1,), 4, (0,), (1,), base=-1)
    with pytest.raises(ValueError, match="overflows"):
        byte_ranges((2**40, 2**40), (2**40, 1), 4, (0, 0), (1, 1))
    with pytest.raises(ValueError, match="overflows"):
        byte_ranges((2**62,), (1,), 4, (0,), (1,))
    with pytest.raises(ValueError, match="overflows"):
        byte_ranges((4,), (1,), 4, (0,), (1,), base=2**63 - 8)
    with pytest.raises(ValueError, match="int64"):
        byte_ranges((2**64,), (1,), 1, (0,), (1,))
    with pytest.raises(ValueError, match="64 dims"):
        byte_ranges((1,) * 65, (1,) * 65, 1, (0,) * 65, (1,) * 65)
    with pytest.raises(TypeError, match="integers"):
        byte_ranges((4.5,), (1,), 1, (0,), (1,))
    with pytest.raises(TypeError):
        byte_ranges((4,), (1,), "4", (0,), (1,))


def test_bad_input_copy_box():
    src = np.arange(24, dtype=np.float32)
    dst = np.zeros(6, np.float32)
    kw = {"itemsize": 4, "src_shape": (4, 6), "dst_shape": (2, 3)}
    with pytest.raises(ValueError, match="source buffer too small"):
        copy_box(src[:10], dst, (2, 3), src_offsets=(1, 2), **kw)
    with pytest.raises(ValueError, match="destination buffer too small"):
        copy_box(src, dst[:5], (2, 3), src_offsets=(1, 2), **kw)
    with pytest.raises(ValueError, match="outside the chunk"):
        copy_box(src, dst, (2, 3), src_offsets=(3, 2), **kw)
    with pytest.raises(ValueError, match="destination.*outside the chunk"):
        copy_box(src, dst, (2, 3), dst_offsets=(1, 0), **kw)
    with pytest.raises(ValueError, match="read-only"):
        copy_box(src, bytes(24), (2, 3), **kw)
    with pytest.raises(ValueError, match="C-contiguous"):
        copy_box(src, np.zeros((6, 2), np.float32)[:, 0], (2, 3), **kw)
    with pytest.raises(TypeError, match="buffer protocol"):
        copy_box(src, [0.0] * 6, (2, 3), **kw)
    with pytest.raises(ValueError, match="base"):
        copy_box(src, dst, (2, 3), src_base=-4, **kw)


def test_contiguous_strides():
    assert contiguous_strides((4, 6, 2)) == (12, 2, 1)
    assert contiguous_strides(()) == ()
    assert contiguous_strides((3, 0, 2)) == (2, 2, 1)


# ------------------------------------------------------------------ reading runs


@settings(max_examples=100, deadline=None)
@given(sorted_ranges(), st.integers(0, 400), st.floats(1.0, 3.0), st.sampled_from([0, 1, 4096]))
def test_read_runs_matches_slicing(tmp_path_factory, ranges, max_gap, max_overread, prefetch):
    data = np.random.default_rng(len(ranges)).integers(0, 256, 20000, dtype=np.uint8)
    path = tmp_path_factory.mktemp("rr") / "f.bin"
    data.tofile(path)
    # runs land packed, in file order, at an offset of 7 in the destination
    runs = []
    d = 7
    for a, b in ranges:
        runs.append([a, d, b - a])
        d += b - a
    runs = np.array(runs, dtype=np.int64).reshape(-1, 3)
    blocks = coalesce_ranges(ranges, max_gap=max_gap, max_overread=max_overread)
    dst = bytearray(d + 5)
    fd = os.open(path, os.O_RDONLY)
    try:
        calls, nbytes = read_runs(fd, runs, blocks, dst, prefetch)
    finally:
        os.close(fd)
    want = bytearray(d + 5)
    pos = 7
    for a, b in ranges:
        want[pos : pos + b - a] = data[a:b].tobytes()
        pos += b - a
    assert dst == want
    assert calls == len(blocks)
    assert nbytes == int((blocks[:, 1] - blocks[:, 0]).sum())


def test_read_runs_many_iovecs_and_errors(tmp_path):
    data = np.arange(100000, dtype=np.uint32).view(np.uint8)
    path = tmp_path / "f.bin"
    data.tofile(path)
    # 2000 runs of 8 bytes every 16 bytes, all in one block: > 1024 iovecs
    runs = np.array([[16 * i, 8 * i, 8] for i in range(2000)], dtype=np.int64)
    blocks = np.array([[0, 16 * 1999 + 8]], dtype=np.int64)
    dst = np.zeros(16000, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        calls, nbytes = read_runs(fd, runs, blocks, dst)
        assert nbytes == 16 * 1999 + 8 and calls >= 4
        assert np.array_equal(dst.reshape(2000, 8), data[: 2000 * 16].reshape(2000, 16)[:, :8])
        with pytest.raises(EOFError):
            read_runs(fd, [[len(data) - 4, 0, 8]], [[len(data) - 4, len(data) + 4]], bytearray(8))
        with pytest.raises(ValueError, match="past the"):
            read_runs(fd, [[0, 4, 8]], [[0, 8]], bytearray(8))
        with pytest.raises(ValueError, match="not inside a block"):
            read_runs(fd, [[0, 0, 8]], [[2, 8]], bytearray(8))
        with pytest.raises(ValueError, match="sorted"):
            read_runs(fd, [[8, 0, 4], [0, 4, 4]], [[0, 12]], bytearray(8))
        with pytest.raises(ValueError, match="invalid"):
            read_runs(fd, [[0, 0, 0]], [[0, 8]], bytearray(8))
        with pytest.raises(ValueError, match="read-only"):
            read_runs(fd, [[0, 0, 8]], [[0, 8]], bytes(8))
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        read_runs(fd, [[0, 0, 8]], [[0, 8]], bytearray(8))  # closed descriptor


def test_read_runs_block_starting_before_its_first_run(tmp_path):
    # Blocks given by a caller need not start at a run (a block aligned down to
    # a page, say): the bytes before a block's first run are not needed, and
    # must neither be read nor make the read fail.
    data = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8)
    path = tmp_path / "f.bin"
    data.tofile(path)
    runs = np.array([[100, 0, 10], [130, 10, 20], [4090, 30, 10]], dtype=np.int64)
    blocks = np.array([[0, 200], [4000, 4100]], dtype=np.int64)
    dst = bytearray(40)
    fd = os.open(path, os.O_RDONLY)
    try:
        # One run: no gap between runs to read, so no discard buffer either.
        one = bytearray(10)
        assert read_runs(fd, [[100, 0, 10]], [[0, 200]], one) == (1, 10)
        assert bytes(one) == data[100:110].tobytes()
        calls, nbytes = read_runs(fd, runs, blocks, dst)
        assert calls == 2
        assert nbytes == (150 - 100) + 10  # first run to last run end, per block
        want = data[100:110].tobytes() + data[130:150].tobytes() + data[4090:4100].tobytes()
        assert bytes(dst) == want
        # A block reaching past the end of the file is no EOF while its runs are in it.
        dst = bytearray(10)
        assert read_runs(fd, [[4990, 0, 10]], [[4096, 1 << 20]], dst) == (1, 10)
        assert bytes(dst) == data[4990:].tobytes()
        with pytest.raises(EOFError, match="file ends"):
            read_runs(fd, [[4995, 0, 10]], [[4096, 1 << 20]], bytearray(10))
    finally:
        os.close(fd)


# ------------------------------------------------------------------ copy_box within one buffer


def _layout_in(draw, lengths, itemsize):
    """A chunk holding a box of ``lengths``: (shape, element strides, box offsets, extent in bytes).

    Its dims are stored in a random order with random padding, so the chunk
    never overlaps itself but its elements interleave with other chunks'.
    """
    n = len(lengths)
    shape = [ln + draw(st.integers(0, 2)) for ln in lengths]
    offsets = [draw(st.integers(0, s - ln)) for s, ln in zip(shape, lengths)]
    order = draw(st.permutations(range(n)))
    strides = [0] * n
    acc = 1
    for d in reversed(order):
        strides[d] = acc
        acc *= shape[d] + draw(st.integers(0, 1))
    extent = (sum((s - 1) * t for s, t in zip(shape, strides)) + 1) * itemsize
    return shape, strides, offsets, extent


@st.composite
def shared_buffer_copies(draw):
    n = draw(st.integers(1, 3))
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    lengths = [draw(st.integers(1, 4)) for _ in range(n)]
    src = _layout_in(draw, lengths, itemsize)
    dst = _layout_in(draw, lengths, itemsize)
    # Bases a few bytes apart (any byte, not only whole elements): the two
    # chunks' bytes overlap in most draws.
    src_base = draw(st.integers(0, 24))
    dst_base = draw(st.integers(0, 24))
    size = max(src_base + src[3], dst_base + dst[3]) + draw(st.integers(0, 8))
    return itemsize, lengths, src, src_base, dst, dst_base, size


def _view(buf, base, shape, strides, itemsize):
    """The chunk as numpy sees it: elements are rows of ``itemsize`` bytes."""
    return np.lib.stride_tricks.as_strided(
        buf[base:], shape=(*shape, itemsize), strides=(*(s * itemsize for s in strides), 1))


@settings(max_examples=400, deadline=None)
@given(shared_buffer_copies(), st.integers(0, 2**32 - 1))
def test_copy_box_within_one_buffer_matches_numpy(case, seed):
    itemsize, lengths, (s_shape, s_str, s_off, _), s_base, (d_shape, d_str, d_off, _), d_base, size = case
    buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    want = buf.copy()
    s_box = tuple(slice(o, o + ln) for o, ln in zip(s_off, lengths))
    d_box = tuple(slice(o, o + ln) for o, ln in zip(d_off, lengths))
    # numpy assigns overlapping operands as if the source were copied first.
    _view(want, d_base, d_shape, d_str, itemsize)[d_box] = \
        _view(want, s_base, s_shape, s_str, itemsize)[s_box]
    copy_box(buf, buf, lengths, itemsize=itemsize,
             src_shape=s_shape, src_strides=s_str, src_offsets=s_off, src_base=s_base,
             dst_shape=d_shape, dst_strides=d_str, dst_offsets=d_off, dst_base=d_base)
    assert np.array_equal(buf, want)


def test_copy_box_shifting_rows_within_one_array():
    # Three columns of rows 0..2 of a 4x4 array onto rows 1..3: one run per
    # row, each run's destination the next run's source, so copying in walk
    # order would smear row 0 down.
    a = np.arange(16, dtype=np.int32).reshape(4, 4)
    want = a.copy()
    want[1:4, :3] = want[0:3, :3]
    copy_box(a, a, (3, 3), itemsize=4, src_shape=(4, 4), dst_shape=(4, 4),
             src_offsets=(0, 0), dst_offsets=(1, 0))
    assert np.array_equal(a, want)
    # A view of the same memory on the other side is the same buffer too.
    b = np.arange(16, dtype=np.int32).reshape(4, 4)
    want = b.copy()
    want[2:4, 1:] = want[1:3, 1:]
    copy_box(b[1:], b, (2, 3), itemsize=4, src_shape=(3, 4), dst_shape=(4, 4),
             src_offsets=(0, 1), dst_offsets=(2, 1))
    assert np.array_equal(b, want)


def test_preadv_calls_counts_what_read_runs_makes(tmp_path):
    """preadv_calls (ckcore plan's count) equals read_runs' calls: touching runs take no gap
    iovec, a gap past the discard buffer several, at most IOVECS_PER_CALL iovecs a call."""
    import random

    from ckcore import ranges

    path = tmp_path / "f"
    path.write_bytes(b"\0" * (16 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        rnd = random.Random(0)
        for _ in range(150):
            pos, d, rows = 0, 0, []
            for _ in range(rnd.choice([1, 2, 300, 700])):
                pos += rnd.choice([0, 0, 1, 100, (1 << 20) + rnd.randint(-1, 1), 3 << 20])
                ln = rnd.choice([1, 7, 4096])
                if pos + ln > 16 << 20:
                    break
                rows.append([pos, d, ln])
                d, pos = d + ln, pos + ln
            runs = np.array(rows, dtype=np.int64).reshape(-1, 3)
            spans = np.stack([runs[:, 0], runs[:, 0] + runs[:, 2]], axis=1)
            blocks = ranges.coalesce_ranges(spans, rnd.choice([0, 100, 8 << 20]), ranges.NO_RATIO_CAP)
            got = ranges.read_runs(fd, runs, blocks, np.empty(max(d, 1), np.uint8))[0]
            assert ranges.preadv_calls(spans, blocks) == got
    finally:
        os.close(fd)


# ------------------------------------------------ bad input to the reader's rules

_BAD_RULE_INPUTS = [
    (lambda: ranges.record_windows([(-5, 10)]), ValueError, "negative or ends past int64"),
    (lambda: ranges.record_windows([(2**63 - 1, 10)]), ValueError, "ends past int64"),
    (lambda: ranges.record_windows([(1, 2, 3)]), ValueError, "pair"),
    (lambda: ranges.record_windows([("a", 1)]), TypeError, "offset must be an integer"),
    (lambda: ranges.record_windows([(0, 1.5)]), TypeError, "length must be an integer"),
    (lambda: ranges.record_batches([(0, 10)], 0), ValueError, "max_bytes"),
    (lambda: ranges.record_batches([(0, -10)], 100), ValueError, "negative"),
    (lambda: ranges.reads_whole((-4, 4), 4, (0, 0), (1, 1), 100), ValueError, "sizes"),
    (lambda: ranges.reads_whole((4, 4), 0, (0, 0), (4, 1), 100), ValueError, "itemsize"),
    (lambda: ranges.reads_whole("ab", 4, (0, 0), (4, 1), 100), TypeError, "sizes must be integers"),
    (lambda: ranges.reads_whole((2**64, 4), 4, (0, 0), (4, 1), 100), ValueError, "int64"),
    (lambda: ranges.slabs((0, 0), (4, 4), (4, 1), 4, 0), ValueError, "limit >= itemsize"),
    (lambda: list(ranges.slabs((0, 0), (4, 4), (4, -1), 4, 8)), ValueError, "stride"),
    (lambda: list(ranges.slabs((0,), (0,), (1,), 4, 8)), ValueError, "length"),
    (lambda: list(ranges.slabs((0,), (4, 4), (4, 1), 4, 8)), ValueError, "per dim"),
    (lambda: ranges.slab_limit(-1, (4,), (1,), 4, (0,), (4,)), ValueError, "limit"),
    (lambda: ranges.slab_limit(8, (4,), (1,), 4, (0,), (4,), max_runs=0), ValueError, "max_runs"),
    (lambda: ranges.preadv_calls(np.zeros((3, 3), np.int64), np.zeros((1, 2), np.int64)), ValueError, "shape"),
    (lambda: ranges.preadv_calls(np.zeros((3, 2)), np.zeros((1, 2))), TypeError, "integers"),
    (lambda: ranges.preadv_calls([[10, 20], [0, 5]], [[0, 20]]), ValueError, "sorted"),
    (lambda: ranges.preadv_calls([[5, 2]], [[0, 20]]), ValueError, "sorted"),
    (lambda: ranges.preadv_calls([[0, 2**64]], [[0, 20]]), ValueError, "int64"),
]


_BAD_RULE_INPUTS += [
    (lambda: ranges.preadv_calls([[0, 10], [20, 30]], [[0, 5]]), ValueError, "inside one block"),
    (lambda: ranges.preadv_calls([[0, 0], [10, 20]], [[0, 20]]), ValueError, "non-empty"),
    (lambda: ranges.preadv_calls(None, None), TypeError, "integer arrays"),
    (lambda: ranges.slabs((0,), (10,), (1,), 1, float("nan")), TypeError, "limit must be an integer"),
    (lambda: ranges.slabs((0, 0), (4, 4), (1.5, 1), 4, 8), TypeError, "strides must be integers"),
    (lambda: ranges.slabs((0,) * 100, (2,) * 100, (1,) * 100, 1, 1), ValueError, "dims"),
    (lambda: ranges.slabs((-1,), (4,), (1,), 4, 8), ValueError, "offset"),
    (lambda: ranges.reads_whole((64, 1024), 2, (0, 0), (64, 256), 10**5, max_gap="x"), TypeError, "max_gap"),
    (lambda: ranges.reads_whole((64, 1024), 2, (0, 0), (64, 256), 10**5, max_overread=0.5), ValueError,
     "max_overread"),
    (lambda: ranges.reads_whole((64, 1024), 2, (0,), (64,), 10**5), ValueError, "one value per dim"),
    (lambda: ranges.record_windows(None), TypeError, "sequence"),
]


def test_the_reader_rules_take_any_integer_sequence():
    """Iterators and numpy arrays give the answer tuples give."""
    assert ranges.slab_limit(100, (1000, 1000), (1000, 1), 1, (0, 0), iter((10, 10)), max_runs=2) == \
        ranges.slab_limit(100, (1000, 1000), (1000, 1), 1, (0, 0), (10, 10), max_runs=2) == 100
    assert list(ranges.slabs(np.array([0, 0]), np.array([4, 6]), np.array([6, 1]), 4, 48)) == \
        [((0, 0), (2, 6)), ((2, 0), (2, 6))]


def test_preadv_calls_edge_cases_agree_with_read_runs_rules():
    # a block without runs reads nothing; gaps near int64 give a positive count
    assert ranges.preadv_calls([[0, 10]], [[0, 10], [50, 60]]) == 1
    assert ranges.preadv_calls([[0, 1], [2**63 - 2, 2**63 - 1]], [[0, 2**63 - 1]]) > 0


def test_record_windows_read_no_byte_twice_and_nothing_for_empty_items():
    assert ranges.record_windows([(5, 0)]) == []
    # overlapping 8 KiB items (each read whole) past the 1 MiB window cap:
    # the second window starts where the first ends
    windows = ranges.record_windows([(k, 8192) for k in range(0, 2**20 + 1000, 1000)])
    assert windows == [(0, 1048192), (1048192, 1049000 + 8192)]


@pytest.mark.parametrize(("call", "exc", "words"), _BAD_RULE_INPUTS)
def test_the_reader_rules_name_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_reads_whole_is_false_for_a_chunk_whose_bytes_overflow_int64():
    assert ranges.reads_whole((2**32, 2**32, 2**32), 4, (0, 0, 0), (1, 1, 1), 8192 + 1) is False
