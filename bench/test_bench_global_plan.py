"""Rank 0's global save planning, ckcore against torch in the same run.

Workloads (DESIGN.md §5), one ``benchmark.group`` each, ``[ckcore]`` and
``[torch]`` side by side:

* ``validate-grid``: one 65536×8192 tensor saved as a 256×256 grid (65536 chunks).
* ``validate-moe``: MoE expert tensors (512 experts × 8-way on the largest
  dimension, expert groups of uneven size that differ per shard column).
* ``global-plan``: 1024 ranks × 723 tensors of a Llama-2-70B-class model,
  FSDP-sharded on dim 0 torch.chunk-style: dedup + global plan + validation.
  ``[ckcore]`` is ``plan_global_save`` (one pass over the items, what
  ``FastSavePlanner`` runs); ``[ckcore-steps]`` calls the three functions in
  turn and records each one's time.
* ``dedup``: the same ranks with the 161 norm weights replicated on every rank.

Every workload is built from torch's own objects and both libraries get the
same objects. torch runs once (``pedantic``, rounds=1): it takes seconds to
minutes. ``CKCORE_BENCH_RANKS`` sets the rank count (default 1024, or 64 under
``--benchmark-disable`` so the quick mode stays short); the MoE key count is
``CKCORE_BENCH_MOE_KEYS`` (default 16, 1 in quick mode). Peak memory of the
global-plan pipelines is measured in a forked child each (peak RSS growth,
``/proc/self/clear_refs`` + ``VmHWM``) and stored in ``extra_info``; set
``CKCORE_BENCH_MEMORY=0`` to skip it.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time

import pytest
import torch
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as torch_dedup
from torch.distributed.checkpoint.default_planner import (
    _validate_global_plan,
    create_default_global_save_plan,
)

from ckcore.global_plan import (
    create_global_save_plan,
    dedup_save_plans,
    plan_global_save,
    validate_global_plan,
)
from tests.support.gp_cases import TORCH_TYPES

IMPLS = ["ckcore", "torch"]


def _quick(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture(scope="module")
def ranks(request) -> int:
    return int(os.environ.get("CKCORE_BENCH_RANKS", "64" if _quick(request.config) else "1024"))


@pytest.fixture(autouse=True)
def _quiet():
    # Findings are logged per message by both validators; benchmarks time the
    # work, not the log handlers.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _run(benchmark, impl, fn, ckcore_rounds=5):
    gc.collect()
    if impl == "torch":
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    return benchmark.pedantic(fn, rounds=ckcore_rounds, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ validate-grid


def _chunk(offs, sizes):
    return tm.ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes))


@pytest.fixture(scope="module")
def grid_md():
    S0, S1, n0, n1 = 65536, 8192, 256, 256
    chunks = [_chunk((i * S0 // n0, j * S1 // n1), (S0 // n0, S1 // n1))
              for i in range(n0) for j in range(n1)]
    return tm.Metadata({"w": tm.TensorStorageMetadata(
        tm.TensorProperties(dtype=torch.bfloat16), torch.Size([S0, S1]), chunks)})


@pytest.mark.parametrize("impl", IMPLS)
def test_validate_grid(benchmark, impl, grid_md):
    benchmark.group = "validate-grid"
    plans = [tp.SavePlan([]), tp.SavePlan([])]
    fn = validate_global_plan if impl == "ckcore" else _validate_global_plan
    errors = _run(benchmark, impl, lambda: fn(plans, grid_md), ckcore_rounds=20)
    assert errors == []


# ------------------------------------------------------------------- validate-moe


def moe_md(n_keys: int):
    """Expert tensors (512, 2048, 8192): 8-way on dim 2 (the largest, torch's
    sweep dimension), and per shard column the 512 experts cut into groups of
    1 (mostly) or 2 experts, differently in every column (~455 chunks per
    column, ~3600 per key); one key has an extra chunk
    overlapping two groups so the finding path is exercised too."""
    E, H, F, cols = 512, 2048, 8192, 8
    sdm = {}
    for k in range(n_keys):
        rng = random.Random(k)
        chunks = []
        for c in range(cols):
            e = 0
            while e < E:
                g = min(rng.choice([1, 1, 1, 1, 1, 1, 1, 2]), E - e)
                chunks.append(_chunk((e, 0, c * F // cols), (g, H, F // cols)))
                e += g
        if k == 0:
            chunks.append(_chunk((100, 0, 0), (3, 16, 16)))
        sdm[f"layers.{k}.moe.experts.w"] = tm.TensorStorageMetadata(
            tm.TensorProperties(dtype=torch.bfloat16), torch.Size([E, H, F]), chunks)
    return tm.Metadata(sdm)


@pytest.fixture(scope="module")
def moe(request):
    n = int(os.environ.get("CKCORE_BENCH_MOE_KEYS", "1" if _quick(request.config) else "16"))
    return moe_md(n)


@pytest.mark.parametrize("impl", IMPLS)
def test_validate_moe(benchmark, impl, moe):
    benchmark.group = "validate-moe"
    plans = [tp.SavePlan([]), tp.SavePlan([])]
    fn = validate_global_plan if impl == "ckcore" else _validate_global_plan
    errors = _run(benchmark, impl, lambda: fn(plans, moe), ckcore_rounds=10)
    benchmark.extra_info["chunks"] = sum(len(v.chunks) for v in moe.state_dict_metadata.values())
    # The rogue chunk overlaps every expert group of column 0 that meets experts 100..102.
    first = next(iter(moe.state_dict_metadata.values())).chunks
    expected = sum(1 for c in first[:-1]
                   if c.offsets[2] == 0 and c.offsets[0] < 103 and c.offsets[0] + c.sizes[0] > 100)
    assert sum("overlapping" in e for e in errors) == expected >= 2


# ------------------------------------------------------------- global-plan, dedup


def llama_70b():
    """(fqn, shape) of every tensor of a Llama-2-70B-class model: 723 tensors."""
    dim, layers, kv_dim, ffn, vocab = 8192, 80, 8 * 128, 28672, 32000
    out = [("tok_embeddings.weight", (vocab, dim))]
    for i in range(layers):
        p = f"layers.{i}."
        out += [
            (p + "attention.wq.weight", (dim, dim)),
            (p + "attention.wk.weight", (kv_dim, dim)),
            (p + "attention.wv.weight", (kv_dim, dim)),
            (p + "attention.wo.weight", (dim, dim)),
            (p + "feed_forward.w1.weight", (ffn, dim)),
            (p + "feed_forward.w2.weight", (dim, ffn)),
            (p + "feed_forward.w3.weight", (ffn, dim)),
            (p + "attention_norm.weight", (dim,)),
            (p + "ffn_norm.weight", (dim,)),
        ]
    out += [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]
    return out


def _shard_item(fqn, shape, rank, world):
    # torch.chunk-style: ceil-divided rows, trailing ranks possibly empty.
    step = -(-shape[0] // world)
    lo = min(rank * step, shape[0])
    offs = (lo,) + (0,) * (len(shape) - 1)
    sizes = (min(step, shape[0] - lo),) + tuple(shape[1:])
    return tp.WriteItem(
        index=tm.MetadataIndex(fqn, offs),
        type=tp.WriteItemType.SHARD,
        tensor_data=tp.TensorWriteData(
            chunk=_chunk(offs, sizes),
            properties=tm.TensorProperties(dtype=torch.bfloat16),
            size=torch.Size(shape),
        ),
    )


def _whole_item(fqn, shape):
    offs = (0,) * len(shape)
    return tp.WriteItem(
        index=tm.MetadataIndex(fqn, offs),
        type=tp.WriteItemType.TENSOR,
        tensor_data=tp.TensorWriteData(
            chunk=_chunk(offs, shape),
            properties=tm.TensorProperties(dtype=torch.bfloat16),
            size=torch.Size(shape),
        ),
    )


@pytest.fixture(scope="module")
def fsdp_plans(ranks):
    """Every rank's SavePlan, each with its own objects (as after unpickling)."""
    tensors = llama_70b()
    return [tp.SavePlan([_shard_item(f, s, r, ranks) for f, s in tensors]) for r in range(ranks)]


@pytest.fixture(scope="module")
def replicated_plans(fsdp_plans):
    """The same plans with the 161 norm weights replicated on every rank."""
    norms = {f: s for f, s in llama_70b() if len(s) == 1}
    return [
        tp.SavePlan([_whole_item(i.index.fqn, norms[i.index.fqn]) if i.index.fqn in norms else i
                     for i in plan.items])
        for plan in fsdp_plans
    ]


def ckcore_fused(all_plans):
    return plan_global_save(all_plans, types=TORCH_TYPES)


def ckcore_pipeline(all_plans, phases=None):
    c0, t0 = time.process_time(), time.perf_counter()
    plans = dedup_save_plans(all_plans)
    t1 = time.perf_counter()
    plans, md = create_global_save_plan(plans, types=TORCH_TYPES)
    t2 = time.perf_counter()
    errors = validate_global_plan(plans, md)
    t3, c3 = time.perf_counter(), time.process_time()
    if phases is not None:
        # Wall time per phase, and the CPU time of the whole pipeline: on a
        # shared machine the wall time includes waiting for a core.
        phases.append((t1 - t0, t2 - t1, t3 - t2, c3 - c0))
    return plans, md, errors


def _cpu_timed(fn, all_plans, out):
    # CPU time beside the wall time: on a shared machine the wall time
    # includes waiting for a core.
    c0 = time.process_time()
    res = fn(all_plans)
    out.append(time.process_time() - c0)
    return res


def torch_pipeline(all_plans):
    # DefaultSavePlanner.create_global_plan's order: dedup, global plan, validation.
    plans = torch_dedup(all_plans)
    plans, md = create_default_global_save_plan(plans)
    return plans, md, _validate_global_plan(plans, md)


def _peak_rss_growth(fn) -> int | None:
    """Peak RSS growth (bytes) of fn() in a forked child, or None if unsupported."""
    if os.environ.get("CKCORE_BENCH_MEMORY", "1") == "0" or not hasattr(os, "fork"):
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure and report, never return into pytest
        code = 1
        try:
            os.close(r)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _proc_status_kb("VmRSS")
            gc.disable()
            fn()
            os.write(w, str((_proc_status_kb("VmHWM") - base) * 1024).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data) if data else None


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


@pytest.mark.parametrize("impl", ["ckcore", "ckcore-steps", "torch"])
def test_global_plan(benchmark, impl, fsdp_plans, ranks):
    benchmark.group = "global-plan"
    benchmark.extra_info["ranks"] = ranks
    benchmark.extra_info["items"] = sum(len(p.items) for p in fsdp_plans)
    if impl == "ckcore":
        cpu: list = []
        plans, md, errors = _run(benchmark, impl, lambda: _cpu_timed(ckcore_fused, fsdp_plans, cpu),
                                 ckcore_rounds=5)
        benchmark.extra_info["cpu_s_all_rounds"] = cpu
        peak = _peak_rss_growth(lambda: ckcore_fused(fsdp_plans))
    elif impl == "ckcore-steps":
        phases: list = []
        plans, md, errors = _run(benchmark, impl, lambda: ckcore_pipeline(fsdp_plans, phases),
                                 ckcore_rounds=3)
        best = min(phases, key=lambda ph: sum(ph[:3]))
        for name, v in zip(("dedup_s", "global_plan_s", "validate_s", "cpu_s"), best):
            benchmark.extra_info[name] = v
        benchmark.extra_info["cpu_s_all_rounds"] = [ph[3] for ph in phases]
        peak = _peak_rss_growth(lambda: ckcore_pipeline(fsdp_plans))
    else:
        cpu = []
        plans, md, errors = _run(benchmark, impl, lambda: _cpu_timed(torch_pipeline, fsdp_plans, cpu))
        benchmark.extra_info["cpu_s"] = cpu[0]
        peak = _peak_rss_growth(lambda: torch_pipeline(fsdp_plans))
    benchmark.extra_info["peak_rss_growth_bytes"] = peak
    assert errors == []
    assert len(md.state_dict_metadata) == 723
    # Dedup keeps one copy of each index: ranks past the end of a tensor whose
    # rows do not divide evenly (vocab 32000 on 1024 ranks) hold identical
    # empty shards.
    assert sum(len(p.items) for p in plans) == _distinct_indices(fsdp_plans)


@pytest.mark.parametrize("impl", IMPLS)
def test_dedup(benchmark, impl, replicated_plans, ranks):
    benchmark.group = "dedup"
    fn = dedup_save_plans if impl == "ckcore" else torch_dedup
    out = _run(benchmark, impl, lambda: fn(replicated_plans), ckcore_rounds=3)
    # Each replicated norm survives once; every distinct shard once.
    assert sum(len(p.items) for p in out) == _distinct_indices(replicated_plans)


def _distinct_indices(all_plans) -> int:
    return len({(i.index.fqn, tuple(i.index.offset)) for p in all_plans for i in p.items})
