"""Benchmark: every rank's chunk of every tensor of a 70B model on a 1024-rank mesh.

Workload ``layout``: Llama-2-70B (723 tensors, ckcore._models) under
HSDP x FSDP2 x TP on a (4, 32, 8) mesh -- torchtitan's placements, so
column-parallel weights carry ``_StridedShard(0, 8)`` on the FSDP dim. ckcore
computes all 1024 coordinates of every tensor (``job_layouts``); torch calls
its per-rank arithmetic, ``_compute_local_shape_and_global_offset``, once per
(tensor, coordinate), which is what planning every rank offline costs with
torch. The results are compared after timing.

Workload ``layout-rank``: the same model, one rank's shapes and offsets
(``job_layout_at``; what each rank's DCP planner asks of
``compute_local_shape_and_global_offset``, tensor by tensor).

Quick mode (``--benchmark-disable``) shortens the model to one layer so the
torch side takes seconds, not minutes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

from ckcore import layout as L
from ckcore._models import llama70b_state_dict_shapes, llama_fsdp_tp_placements

MESH = (4, 32, 8)  # (dp_replicate, dp_shard, tp): 1024 ranks
TP = MESH[-1]
RANK = 777


def _to_torch(p):
    if isinstance(p, L.Shard):
        return Shard(p.dim)
    if isinstance(p, L.StridedShard):
        return _StridedShard(p.dim, split_factor=p.split_factor)
    return Replicate()


def _workload(benchmark):
    n_layers = 1 if benchmark.disabled else 80
    shapes = llama70b_state_dict_shapes(n_layers)
    return {
        fqn: (shape, llama_fsdp_tp_placements(fqn, TP, replicate=True))
        for fqn, shape in shapes.items()
    }


def _torch_tensors(tensors):
    return {
        fqn: (shape, [_to_torch(p) for p in places]) for fqn, (shape, places) in tensors.items()
    }


def _torch_all(tensors):
    coords = [list(c) for c in itertools.product(*[range(n) for n in MESH])]
    out = {}
    for fqn, (shape, places) in tensors.items():
        out[fqn] = [_compute_local_shape_and_global_offset(shape, MESH, c, places) for c in coords]
    return out


def _torch_one(tensors, coord):
    return {fqn: _compute_local_shape_and_global_offset(shape, MESH, coord, places)
            for fqn, (shape, places) in tensors.items()}


@pytest.mark.parametrize("impl", ["ckcore", "torch"])
def test_layout(benchmark, impl):
    benchmark.group = "layout"
    tensors = _workload(benchmark)
    if impl == "ckcore":
        result = benchmark.pedantic(L.job_layouts, args=(tensors, MESH), rounds=20, iterations=1,
                                    warmup_rounds=1)
        assert len(result) == len(tensors)
        assert result["output.weight"][0].shape == (1024, 2)
        return
    torch_tensors = _torch_tensors(tensors)
    result = benchmark.pedantic(_torch_all, args=(torch_tensors,), rounds=1, iterations=1)
    ck = L.job_layouts(tensors, MESH)
    for fqn, rows in result.items():
        sizes, offsets = ck[fqn]
        assert [(tuple(s), tuple(o)) for s, o in zip(sizes.tolist(), offsets.tolist())] == rows, fqn


@pytest.mark.parametrize("impl", ["ckcore", "torch"])
def test_layout_rank(benchmark, impl):
    benchmark.group = "layout-rank"
    tensors = _workload(benchmark)
    coord = [int(c) for c in np.unravel_index(RANK, MESH)]
    if impl == "ckcore":
        result = benchmark.pedantic(L.job_layout_at, args=(tensors, MESH, coord), rounds=20,
                                    iterations=1, warmup_rounds=1)
        assert len(result) == len(tensors)
        return
    torch_tensors = _torch_tensors(tensors)
    result = benchmark.pedantic(_torch_one, args=(torch_tensors, coord), rounds=5, iterations=1)
    assert L.job_layout_at(tensors, MESH, coord) == result
