"""Hostile-input review of the verified load path (ckcore.items, verify_cover)."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from ckcore.items import create_read_items, create_read_items_for_chunk_list
from ckcore.metadata import ChunkStorageMetadata as C
from ckcore.metadata import TensorProperties, TensorStorageMetadata


def _md(size, chunks):
    return TensorStorageMetadata(TensorProperties("float32"), size, chunks)


@pytest.mark.parametrize("flag", ["no", "", 0.0, 1, 0, None, [], [1]])
def test_verify_cover_must_be_a_bool(flag):
    # A stray value must not switch verification off silently: a hole would
    # then load as uninitialised memory.
    md = _md((4,), [C((0,), (2,))])
    with pytest.raises(TypeError, match="verify_cover must be True or False"):
        create_read_items_for_chunk_list("w", md, [C((0,), (4,))], verify_cover=flag)
    with pytest.raises(TypeError, match="verify_cover must be True or False"):
        create_read_items("w", md, [C((0,), (4,))], verify_cover=flag)


def test_many_overlapping_reads_into_one_chunk_is_bounded():
    # n copies of one 1 x n saved chunk fill an n x n local chunk by volume,
    # every copy overlapping every other. Intersecting the reads pairwise
    # would hold n**2 pairs (gigabytes from a few kilobytes of .metadata).
    n = 2000
    md = _md((n, n), [C((0, 0), (1, n))] * n)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="saved chunks that overlap inside local chunk 0"):
            create_read_items_for_chunk_list("w", md, [C((0, 0), (n, n))], verify_cover=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, peak
    assert time.perf_counter() - t0 < 5


def test_many_overlapping_distinct_reads_are_found():
    # Distinct boxes (no two identical) that all share the origin, volumes adding up.
    n = 600
    saved = [C((0, 0), (1, n))] + [C((0, 0), (n - 1, 1))] + [C((1, 1), (n - 1, n - 1))]
    saved += [C((k, k), (0, 3)) for k in range(2, 300)]  # zero-size reads hold nothing
    with pytest.raises(ValueError, match=r"overlap inside local chunk 0 \(offsets=\(0, 0\)"):
        create_read_items_for_chunk_list("w", _md((n, n), saved), [C((0, 0), (n, n))],
                                         verify_cover=True)


def test_many_reads_that_fill_exactly_still_load():
    # A 64 x 64 grid of saved chunks into one local chunk (world 1 loading a
    # checkpoint of 4096 ranks), plus zero-size saved chunks strictly inside.
    saved = [C((r, c), (2, 3)) for r in range(0, 128, 2) for c in range(0, 192, 3)]
    saved += [C((5, 7), (0, 0)), C((9, 10), (0, 2))]
    md = _md((128, 192), saved)
    local = [C((0, 0), (128, 192)), C((3, 4), (50, 60))]
    got = create_read_items_for_chunk_list("w", md, local, verify_cover=True)
    assert got == create_read_items_for_chunk_list("w", md, local)
