"""The shared interval table and merge sort (``_intervals.pxd``) on adversarial layouts.

``_validate`` (grid proof, sweeps) and ``_intersect`` (the per-dimension
cut lists of the index) share one interval -> id hash table and one sort.
Here they meet layouts built against them: intervals whose keys all hash to
one slot (the table's mix of ``(a, b)`` is ``mix(a * G ^ b)``, so ``b = a * G ^ c``
collides for every ``a``), thousands of chunks repeating one interval,
duplicates, zero sizes, and more than 63 dimensions. Every search path must
give the brute-force answer.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from ckcore._kernels import _intersect, _validate

M = 2**64
G = 0x9E3779B97F4A7C15


def _arrays(chunks, nd):
    offs = np.array([c[0] for c in chunks], dtype=np.int64).reshape(len(chunks), nd)
    sizes = np.array([c[1] for c in chunks], dtype=np.int64).reshape(len(chunks), nd)
    return offs, sizes


def _colliding_validate(n, seed):
    # (offset, size) keys of dimension 0 that all hash alike in _validate's table.
    c0 = random.Random(seed).getrandbits(64)
    out, i = [], 0
    while len(out) < n:
        i += 1
        s = ((i * G) % M) ^ c0
        if s < 2**61:
            out.append(([i, len(out)], [s, 1]))
    return out


def _colliding_intersect(n, seed):
    # (start, end) keys of dimension 0 that all hash alike in _intersect's table.
    c0 = random.Random(seed).getrandbits(64)
    out, i = [], 0
    while len(out) < n:
        i += 1
        e = ((i * G) % M) ^ c0
        if i < e < 2**61:
            out.append(([i, len(out)], [e - i, 1]))
    return out


def _repeated(n, seed):
    rng = random.Random(seed)
    out = [([0, k], [7, 1]) for k in range(n)]
    out += [([0, k], [7, 1]) for k in range(0, n, 13)]       # duplicates
    out += [([3, k], [0, 1]) for k in range(0, n, 17)]       # zero sizes
    rng.shuffle(out)
    return out


LAYOUTS = {
    "collide_validate": lambda: _colliding_validate(300, 1),
    "collide_intersect": lambda: _colliding_intersect(300, 2),
    "repeated_interval": lambda: _repeated(2000, 3),
}


def _pairs(rows):
    # Unordered: each pair as (larger index, smaller index).
    return sorted((max(a, b), min(a, b)) for a, b in np.asarray(rows).tolist())


def _brute_pairs(offs, sizes):
    li, si = _intersect.intersect(offs, sizes, offs, sizes, "brute")[:2]
    return sorted((int(a), int(b)) for a, b in zip(li, si) if a > b)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_self_overlaps_equal_brute_force(name):
    offs, sizes = _arrays(LAYOUTS[name](), 2)
    got = _pairs(_validate._self_overlap_pairs(offs, sizes))
    want = _brute_pairs(offs, sizes)
    assert got == want
    if name == "repeated_interval":
        assert want      # the duplicates overlap


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_intersect_paths_equal_brute_force(name):
    offs, sizes = _arrays(LAYOUTS[name](), 2)
    rng = np.random.default_rng(7)
    lo = np.stack([rng.integers(0, 5, 40), rng.integers(0, 300, 40)], 1).astype(np.int64)
    ls = np.stack([rng.integers(1, 2**40, 40), rng.integers(1, 40, 40)], 1).astype(np.int64)
    want = _intersect.intersect(lo, ls, offs, sizes, "brute")
    assert len(want[0]) > 0
    for path in ("auto", "grid", "trie"):
        got = _intersect.intersect(lo, ls, offs, sizes, path)
        for g, w in zip(got, want):
            assert np.array_equal(g, w), path
    summary = _intersect._py_index_summary(offs, sizes)
    distinct0 = len({(int(o), int(o + s)) for o, s in zip(offs[:, 0], sizes[:, 0])})
    assert summary["dcount"][0] == distinct0


@pytest.mark.parametrize("nd", [63, 64, 70])
def test_many_dims_equal_brute_force(nd):
    rng = random.Random(nd)
    chunks = [([rng.randrange(0, 2) for _ in range(nd)], [rng.randrange(0, 3) for _ in range(nd)])
              for _ in range(30)]
    chunks += chunks[:5]
    offs, sizes = _arrays(chunks, nd)
    got = _pairs(_validate._self_overlap_pairs(offs, sizes))
    assert got == _brute_pairs(offs, sizes)
    tsize = np.full(nd, 2, dtype=np.int64)
    _, _, pairs = _validate._check_tensor(offs, sizes, tsize)
    assert _pairs(pairs) == got
