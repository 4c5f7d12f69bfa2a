"""Benchmark ``model-load`` (DESIGN.md §5): plan loading a 70B-class model saved with another layout.

Every tensor of Llama-2-70B (723 bfloat16 tensors: dim 8192, 80 layers,
8 KV heads so wk/wv are 1024x8192, ffn 28672, vocab 32000) is saved with one
layout and loaded with another:

- ``fsdp64->fsdp8xtp8``: saved FSDP-64 (``Shard(0)`` on 64 ranks), loaded
  FSDP-8 x TP-8 as FSDP2 + torchtitan's TP plan build it (column-parallel
  weights ``(_StridedShard(0, 8), Shard(0))``, row-parallel ``(Shard(0),
  Shard(1))``, norms ``(Shard(0), Replicate())``).
- ``fsdp16xtp4->fsdp32``: saved FSDP-16 x TP-4 (same plan), loaded FSDP-32.

Two scopes, each timed for ckcore and torch in the same run:

- ``one-rank``: one rank's ``create_local_plan()`` as torch objects,
  ``FastLoadPlanner`` vs ``DefaultLoadPlanner``. What is faithful here: the
  state dict holds real ``DTensor``s on a real ``DeviceMesh`` for that rank
  (built with ``_rank=r`` and no process group, so one process can be any
  rank of any world size), their local tensors zero-stride views so that
  nothing is allocated; the saved ``Metadata`` is built directly as torch
  objects, with the chunks in rank order, exactly what
  ``create_default_global_save_plan`` records for that save. Both planners
  go through ``set_up_planner`` once (outside the timing) and time
  ``create_local_plan()``, which is what ``dcp.load`` calls. ckcore's planner
  additionally verifies that the saved chunks tile each tensor (its
  ``verify_metadata`` default); ``[ckcore-noverify]`` times the plan alone.
- ``all-ranks``: every load rank's read plan in array form:
  ``ckcore.intersect_chunks`` once per tensor over all ranks' chunks, against
  torch's ``create_read_items_for_chunk_list`` for every (tensor, rank), the
  way a coordinator would plan for everybody. torch runs one round (seconds).

Every rank's chunks come from :mod:`ckcore.layout` (all ranks at once),
checked against torch's own DTensor chunks for two ranks of each distinct
tensor layout, in setup, outside the timing.

Run: ``PYTHONPATH=$PWD python -m pytest bench/test_bench_model_load.py``;
quick check: add ``--benchmark-disable`` (and ``CKCORE_BENCH_QUICK=1`` for 4 layers).
"""

from __future__ import annotations

import os
from collections import Counter
from functools import cache

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ckcore._models import llama70b_state_dict_shapes
from ckcore.dcp import FastLoadPlanner
from ckcore.dcp._lazy_metadata import ColumnarMetadata
from ckcore.dcp.dropins import ORIGINALS
from ckcore.items import intersect_chunks
from ckcore.layout import local_shapes_and_offsets
from ckcore.mdcolumns import MetadataColumns

torch_create_read_items_for_chunk_list = ORIGINALS["create_read_items_for_chunk_list"]

LAYERS = 80
# Quick mode (CI: every body once) plans 4 layers of the same shapes.
QUICK = bool(os.environ.get("CKCORE_BENCH_QUICK"))
if QUICK:
    LAYERS = 4
DTYPE = torch.bfloat16


# The one table of Llama-2-70B shapes every ckcore workload plans.
SHAPES = llama70b_state_dict_shapes(LAYERS)
assert len(SHAPES) == 9 * LAYERS + 3  # 723 for the full model


def placements(fqn: str, layout: tuple[int, ...]) -> tuple:
    """FSDP2 (x TP, torchtitan's plan) placements of ``fqn`` on a mesh of shape ``layout``."""
    if len(layout) == 1:
        return (Shard(0),)
    tp = layout[1]
    if fqn.endswith("norm.weight"):
        return (Shard(0), Replicate())
    if fqn.endswith(("wo.weight", "w2.weight")):  # row-parallel
        return (Shard(0), Shard(1))
    # column-parallel, embedding, output: TP on dim 0, FSDP2 shards the TP shard.
    return (_StridedShard(0, split_factor=tp), Shard(0))


def _world(layout):
    return int(np.prod(layout))


@cache
def _mesh(layout: tuple[int, ...], rank: int) -> DeviceMesh:
    return DeviceMesh(
        "cpu", torch.arange(_world(layout)).reshape(layout), _init_backend=False, _rank=rank
    )


_ZERO = torch.zeros(1, dtype=DTYPE)


def dtensor(fqn: str, layout, rank: int) -> DTensor:
    """The DTensor rank ``rank`` holds for ``fqn``; its local data a zero-stride view (no memory)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = torch.Size(SHAPES[fqn])
    mesh, pl = _mesh(layout, rank), placements(fqn, layout)
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, pl)
    local = _ZERO.expand(local_shape) if len(local_shape) else _ZERO[0]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, pl, shape=shape, stride=stride, run_check=False)


@cache
def rank_chunks(layout: tuple[int, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """fqn -> (offsets, sizes) int64 arrays of shape (world, ndim): every rank's chunk, by rank.

    Computed for all ranks at once by :mod:`ckcore.layout`, and checked
    against torch's own DTensor chunk (``__create_chunk_list__``) on two ranks
    of every distinct (shape, placements).
    """
    by_shape: dict = {}
    out = {}
    world = _world(layout)
    for fqn, shape in SHAPES.items():
        pl = placements(fqn, layout)
        key = (shape, repr(pl))
        if key not in by_shape:
            sizes, offs = local_shapes_and_offsets(shape, layout, pl)
            for r in (ONE_RANK % world, world - 1):
                (c,) = dtensor(fqn, layout, r).__create_chunk_list__()
                assert (tuple(c.offsets), tuple(c.sizes)) == (
                    tuple(offs[r].tolist()),
                    tuple(sizes[r].tolist()),
                ), (fqn, layout, r)
            by_shape[key] = (np.ascontiguousarray(offs), np.ascontiguousarray(sizes))
        out[fqn] = by_shape[key]
    return out


@cache
def saved_metadata(layout: tuple[int, ...]) -> Metadata:
    """The torch ``Metadata`` a save with ``layout`` records: every rank's chunk, in rank order."""
    md = {}
    props = TensorProperties(dtype=DTYPE)
    for fqn, (offs, sizes) in rank_chunks(layout).items():
        chunks, seen = [], set()
        for o, s in zip(offs.tolist(), sizes.tolist()):
            # Replicated shards are saved once (dedup); keep the first holder's.
            if (tuple(o), tuple(s)) in seen:
                continue
            seen.add((tuple(o), tuple(s)))
            chunks.append(ChunkStorageMetadata(torch.Size(o), torch.Size(s)))
        md[fqn] = TensorStorageMetadata(props, torch.Size(SHAPES[fqn]), chunks)
    return Metadata(md)


PAIRS = {
    "fsdp64->fsdp8xtp8": ((64,), (8, 8)),
    "fsdp16xtp4->fsdp32": ((16, 4), (32,)),
}
ONE_RANK = 27


def _items_key(items):
    return Counter(
        (
            r.dest_index.fqn,
            tuple(r.dest_index.offset),
            r.dest_index.index,
            tuple(r.storage_index.offset),
            r.storage_index.index,
            tuple(r.storage_offsets),
            tuple(r.dest_offsets),
            tuple(r.lengths),
        )
        for r in items
    )


@pytest.mark.parametrize("impl", ["ckcore", "ckcore-columns", "ckcore-noverify", "torch"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_model_load_one_rank(benchmark, pair, impl):
    """One rank's local load plan, as torch objects, through the planner dcp.load calls.

    ``[ckcore-columns]``: the metadata as ``RangeFileSystemReader`` returns it
    (a ``ColumnarMetadata``), planned from its chunk arrays, cover verified.
    """
    saved_layout, load_layout = PAIRS[pair]
    md = saved_metadata(saved_layout)
    if impl == "ckcore-columns":
        md = ColumnarMetadata(MetadataColumns.from_metadata(md))
    rank = ONE_RANK % _world(load_layout)
    state_dict = {fqn: dtensor(fqn, load_layout, rank) for fqn in SHAPES}
    if impl == "torch":
        planner = DefaultLoadPlanner()
    else:
        planner = FastLoadPlanner(verify_metadata=impl != "ckcore-noverify")
    planner.set_up_planner(state_dict, md, is_coordinator=False)
    benchmark.group = f"model-load one-rank {pair}"
    plan = benchmark(planner.create_local_plan)
    # Same multiset of items as torch's planner, every time.
    reference = DefaultLoadPlanner()
    reference.set_up_planner(state_dict, md, is_coordinator=False)
    assert _items_key(plan.items) == _items_key(reference.create_local_plan().items)
    assert len(plan.items) >= len(SHAPES)


def _ckcore_all_ranks(pair):
    saved_layout, load_layout = PAIRS[pair]
    md = saved_metadata(saved_layout)
    local = rank_chunks(load_layout)
    total = 0
    results = {}
    for fqn, tmd in md.state_dict_metadata.items():
        r = intersect_chunks(local[fqn], tmd.chunks, fqn=fqn)
        results[fqn] = r
        total += len(r)
    return total, results


def _torch_all_ranks(pair):
    saved_layout, load_layout = PAIRS[pair]
    md = saved_metadata(saved_layout)
    local = rank_chunks(load_layout)
    total = 0
    results = {}
    for fqn, tmd in md.state_dict_metadata.items():
        offs, sizes = local[fqn]
        per_rank = []
        for o, s in zip(offs.tolist(), sizes.tolist()):
            chunk = ChunkStorageMetadata(torch.Size(o), torch.Size(s))
            items = torch_create_read_items_for_chunk_list(fqn, tmd, [chunk])
            per_rank.append(items)
            total += len(items)
        results[fqn] = per_rank
    return total, results


@pytest.mark.parametrize("impl", ["ckcore", "torch"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_model_load_all_ranks(benchmark, pair, impl):
    """Every load rank's read plan: ckcore's array form against torch's item lists."""
    benchmark.group = f"model-load all-ranks {pair}"
    if impl == "torch":
        total, _ = benchmark.pedantic(_torch_all_ranks, args=(pair,), rounds=1, iterations=1)
        assert total == _ckcore_all_ranks(pair)[0]
    else:
        total, results = benchmark(_ckcore_all_ranks, pair)
        # Exactly torch's reads, rank by rank, for every tensor shape of a layer.
        _spot_check(pair, results, "layers.3.")
    assert total > 0


def _spot_check(pair, ck_results, prefix):
    """ckcore's arrays for the tensors under ``prefix`` equal torch's items, rank by rank."""
    saved_layout, load_layout = PAIRS[pair]
    md = saved_metadata(saved_layout)
    local = rank_chunks(load_layout)
    for fqn in [f for f in SHAPES if f.startswith(prefix)] + ["output.weight"]:
        r = ck_results[fqn]
        tmd = md.state_dict_metadata[fqn]
        offs, sizes = local[fqn]
        for rank, (o, s) in enumerate(zip(offs.tolist(), sizes.tolist())):
            chunk = ChunkStorageMetadata(torch.Size(o), torch.Size(s))
            theirs = sorted(
                (
                    it.storage_index.index,
                    tuple(it.storage_offsets),
                    tuple(it.dest_offsets),
                    tuple(it.lengths),
                )
                for it in torch_create_read_items_for_chunk_list(fqn, tmd, [chunk])
            )
            sel = r.local_index == rank
            ours = sorted(
                zip(
                    r.saved_index[sel].tolist(),
                    map(tuple, r.storage_offsets[sel].tolist()),
                    map(tuple, r.dest_offsets[sel].tolist()),
                    map(tuple, r.lengths[sel].tolist()),
                )
            )
            assert ours == theirs, (fqn, rank)


@pytest.mark.parametrize("impl", ["ckcore", "torch"])
def test_model_save_one_rank(benchmark, impl):
    """The save side of the same model: one FSDP-8 x TP-8 rank's local save plan.

    ``FastSavePlanner`` vs ``DefaultSavePlanner``, ``create_local_plan()``
    after ``set_up_planner`` (not a DESIGN.md workload; the global half of
    a save is the ``global-plan`` workload).
    """
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from ckcore.dcp import FastSavePlanner

    layout = (8, 8)
    state_dict = {fqn: dtensor(fqn, layout, ONE_RANK) for fqn in SHAPES}
    planner = FastSavePlanner() if impl == "ckcore" else DefaultSavePlanner()
    planner.set_up_planner(state_dict, is_coordinator=False)
    benchmark.group = "model-save one-rank fsdp8xtp8"
    plan = benchmark(planner.create_local_plan)
    reference = DefaultSavePlanner()
    reference.set_up_planner(state_dict, is_coordinator=False)
    want = reference.create_local_plan()
    assert plan.items == want.items  # dataclass equality: torch's objects, same order
    assert len(plan.items) == len(SHAPES)
