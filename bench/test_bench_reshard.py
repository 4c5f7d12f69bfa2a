"""reshard-grid and reshard-fine (DESIGN.md §5): plan a resharded load of one tensor.

Each workload is timed three ways in the same run:
  torch          torch's create_read_items_for_chunk_list on torch's objects
  ckcore-items   ckcore.create_read_items_for_chunk_list (ReadItem list, chunk lists in)
  ckcore-array   ckcore.intersect_chunks on (offsets, sizes) arrays (no Python objects)
plus ``build-items``: ckcore's item building alone, reported per ReadItem.

The local chunks are every chunk of the new layout (all ranks at once).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from _workloads import RESHARD, grid_chunks
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint import planner_helpers as tph

import ckcore
from ckcore._kernels import _intersect, _items

_CACHE: dict = {}


def _inputs(name):
    if name not in _CACHE:
        shape, saved_parts, local_parts = RESHARD[name]
        saved = grid_chunks(shape, saved_parts)
        local = grid_chunks(shape, local_parts)
        ck_saved = [ckcore.ChunkStorageMetadata(o, s) for o, s in saved]
        ck_local = [ckcore.ChunkStorageMetadata(o, s) for o, s in local]
        t_saved = [tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in saved]
        t_local = [tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in local]
        _CACHE[name] = dict(
            ck_md=ckcore.TensorStorageMetadata(ckcore.TensorProperties(), shape, ck_saved),
            ck_local=ck_local,
            t_md=tmd.TensorStorageMetadata(tmd.TensorProperties(), torch.Size(shape), t_saved),
            t_local=t_local,
            arrays=(
                (np.array([o for o, _ in local], dtype=np.int64),
                 np.array([s for _, s in local], dtype=np.int64)),
                (np.array([o for o, _ in saved], dtype=np.int64),
                 np.array([s for _, s in saved], dtype=np.int64)),
            ),
        )
    return _CACHE[name]


def _rounds(variant: str) -> int:
    # torch takes seconds on reshard-fine: a few rounds give a median; ckcore gets many.
    return 3 if variant == "torch" else 30


@pytest.mark.parametrize("workload", sorted(RESHARD))
@pytest.mark.parametrize("variant", ["torch", "ckcore-items", "ckcore-array"])
def test_reshard(benchmark, workload, variant):
    data = _inputs(workload)
    benchmark.group = workload
    if variant == "torch":
        fn = lambda: tph.create_read_items_for_chunk_list("w", data["t_md"], data["t_local"])  # noqa: E731
    elif variant == "ckcore-items":
        fn = lambda: ckcore.create_read_items_for_chunk_list("w", data["ck_md"], data["ck_local"])  # noqa: E731
    else:
        local, saved = data["arrays"]
        fn = lambda: ckcore.intersect_chunks(local, saved)  # noqa: E731
    result = benchmark.pedantic(fn, rounds=_rounds(variant), iterations=1, warmup_rounds=1)
    n = len(result)
    benchmark.extra_info["read_items"] = n
    assert n > 0
    if variant != "torch":
        # The answer is checked, not just timed: same number of items as torch.
        expected = _CACHE.setdefault(
            ("count", workload),
            len(tph.create_read_items_for_chunk_list("w", data["t_md"], data["t_local"])),
        )
        assert n == expected


@pytest.mark.parametrize("workload", sorted(RESHARD))
def test_build_items_per_item(benchmark, workload):
    """The object boundary alone: intersection arrays in, ReadItem list out."""
    data = _inputs(workload)
    benchmark.group = workload + " build-items"
    local_chunks = data["ck_local"]
    saved_chunks = data["ck_md"].chunks
    lo, ls = _items.chunk_arrays(local_chunks, "w", 2)
    so, ss = _items.chunk_arrays(saved_chunks, "w", 2)
    arrays = _intersect.intersect(lo, ls, so, ss)

    def build():
        return _items.build_read_items(
            "w", *arrays, local_chunks, saved_chunks, ckcore.ReadItem, ckcore.MetadataIndex,
            ckcore.LoadItemType.TENSOR, tuple)

    items = benchmark.pedantic(build, rounds=30, iterations=1, warmup_rounds=1)
    assert len(items) == len(arrays[0])
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["ns_per_item"] = stats.stats.median / len(items) * 1e9
    else:  # --benchmark-disable: one timed call, for the record
        t = time.perf_counter()
        build()
        benchmark.extra_info["ns_per_item"] = (time.perf_counter() - t) / len(items) * 1e9
