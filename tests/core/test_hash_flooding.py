"""Kernel hash tables are keyed per process: a file cannot choose keys that collide.

The interval table (``_intervals.pxd``) and the item row cache (``_items``)
hash values that come from a checkpoint's chunks. With a fixed mix of
``(a, b)`` such as ``mix(a * G ^ b)``, every ``b = a * G ^ c`` lands in one
slot and each insert walks the whole table: 40,000 crafted chunks took half
a second of validation instead of milliseconds, and 400,000 would take
minutes. Keyed with a per-process secret (``ck_hash_key``), the crafted
layout costs what any layout of its size costs.

The check compares two layouts of the same size and shape in one process,
so it measures the complexity (linear against quadratic, a factor of ~100
here), not the machine's speed.
"""

from __future__ import annotations

import random
import time

import numpy as np

from ckcore._kernels import _validate

M = 2**64
G = 0x9E3779B97F4A7C15
N = 40_000


def _layout(n: int, crafted: bool):
    # Chunk k: rows [i, i + s) of dimension 0 and column k, so no two overlap;
    # crafted, every (i, s) makes i * G ^ s the same constant.
    rng = random.Random(7)
    c0 = rng.getrandbits(64)
    offs, sizes, i = [], [], 0
    while len(offs) < n:
        i += 1
        s = ((i * G) % M) ^ c0 if crafted else rng.getrandbits(64)
        if s < 2**61:
            offs.append((i, len(offs)))
            sizes.append((s, 1))
    return (np.array(offs, dtype=np.int64), np.array(sizes, dtype=np.int64),
            np.array([2**62, n], dtype=np.int64))


def _best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_crafted_interval_collisions_cost_what_any_layout_costs():
    crafted = _layout(N, crafted=True)
    plain = _layout(N, crafted=False)
    assert _validate._check_tensor(*crafted)[2].shape[0] == 0  # no overlaps: a sound layout
    t_crafted = _best_of(lambda: _validate._check_tensor(*crafted))
    t_plain = _best_of(lambda: _validate._check_tensor(*plain))
    assert t_crafted < 10 * t_plain + 0.01, (t_crafted, t_plain)
