"""``ckcore demo``: a 70B-class model planned for save at one layout and load at another.

Everything is computed, nothing is downloaded or written: the shapes come
from :mod:`ckcore._models`, the checkpoint is built in memory
(:meth:`~ckcore.checkpoint.Checkpoint.from_metadata`), and each planning
step is timed for ckcore and, when torch is installed, for torch on its own
objects. torch is imported only inside :func:`run_demo`'s torch step.
"""

from __future__ import annotations

import gc
import logging
import math
import pickle
import time
from typing import Any

import numpy as np

from . import _models
from .checkpoint import Checkpoint, StorageInfo
from .compact import WriteColumns, pack_write_columns, plan_columns, unpack_write_columns
from .dtypes import itemsize
from .global_plan import plan_global_save
from .items import chunk_arrays, create_read_items_for_chunk_list, intersect_chunks
from .layout import Shard, job_layouts
from .metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from .planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from .report import ProgressSink, format_mesh, plan_reads

__all__ = ["MAX_DEMO_LAYERS", "MAX_DEMO_RANKS", "run_demo"]

#: Largest job (ranks of the save mesh, or of the load mesh) :func:`run_demo`
#: plans: it builds Python plan objects for every rank and tensor.
MAX_DEMO_RANKS = 4096

#: Most layers :func:`run_demo` plans.
MAX_DEMO_LAYERS = 1000


def _check_sizes(**sizes: Any) -> None:
    for name, value in sizes.items():
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if (sizes["save_fsdp"] > MAX_DEMO_RANKS or sizes["load_fsdp"] * sizes["load_tp"] > MAX_DEMO_RANKS
            or sizes["layers"] > MAX_DEMO_LAYERS):
        raise ValueError(f"demo sizes are capped at {MAX_DEMO_RANKS} ranks per job and "
                         f"{MAX_DEMO_LAYERS} layers")


# validate_global_plan logs every finding as a warning (as torch does); with
# no logging configured Python prints those to stderr through
# logging.lastResort, duplicating the CLI's own report. The demo's plan gets
# a logger of its own that goes nowhere, leaving "ckcore.global_plan" (and
# whatever other threads log to it meanwhile) alone.
_SILENT = logging.getLogger("ckcore.demo.validation")
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False


def _best_of(fn: Any, repeat: int, setup: Any = None) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run_demo(
    *,
    layers: int = 80,
    save_fsdp: int = 64,
    load_fsdp: int = 8,
    load_tp: int = 8,
    use_torch: bool = True,
    repeat: int = 1,
    progress: ProgressSink | None = None,
) -> dict[str, Any]:
    """Plan a 70B-class model's save at FSDP-``save_fsdp`` and load at FSDP-``load_fsdp`` x TP-``load_tp``.

    Everything is computed, nothing is downloaded: the shapes come from
    :mod:`ckcore._models` (Llama-2-70B, ``layers`` layers), the save layout
    is FSDP2's ``Shard(0)`` on a 1-d mesh, the load layout FSDP2 x TP as
    torchtitan builds it. Steps, each timed for ckcore and, when torch is
    importable and ``use_torch``, for torch on its own objects:

    1. ``global save plan``: dedup, global plan + metadata, and validation
       over every rank's save plan (DefaultSavePlanner.create_global_plan);
    2. ``load plan, all ranks``: every rank's ReadItems for every tensor
       (create_read_items_for_chunk_list per rank and tensor), and the same
       pairs in ckcore's array form (:func:`ckcore.intersect_chunks`, one
       call per tensor for all ranks), both against torch's ReadItems;
    3. ``ckcore plan``: the same intersection in array form plus per-rank
       coalesced byte counts over the checkpoint's storage, as ``ckcore plan``
       reports them (ckcore only; torch has no equivalent);
    4. ``plan traffic, save: rank 0``: what ``dcp.save``'s coordinator does
       with the gathered local plans: unpickle every rank's plan (with the
       cyclic GC running, as in DCP) and plan globally. ckcore's plans are
       the packed columns ``FastSavePlanner`` sends (:mod:`ckcore.compact`),
       torch's are its pickled ``SavePlan`` objects; ``traffic_bytes_per_rank``
       holds one rank's pickled plan size for each.

    The checkpoint's storage is laid out as FileSystemWriter would (one file
    per saving rank, items back to back), with raw tensor bytes as lengths.
    Returns the timings, the item counts and the plan report. Sizes are
    ints >= 1 (TypeError, ValueError), capped at :data:`MAX_DEMO_RANKS` ranks
    per job and :data:`MAX_DEMO_LAYERS` layers (ValueError).
    """
    _check_sizes(layers=layers, save_fsdp=save_fsdp, load_fsdp=load_fsdp, load_tp=load_tp,
                 repeat=repeat)
    shapes = _models.llama70b_state_dict_shapes(layers)
    dtype = _models.LLAMA70B_DTYPE
    save_mesh = (save_fsdp,)
    load_mesh = (load_fsdp, load_tp)
    save_layout = {fqn: (shape, (Shard(0),)) for fqn, shape in shapes.items()}
    load_layout = {fqn: (shape, _models.llama_fsdp_tp_placements(fqn, load_tp))
                   for fqn, shape in shapes.items()}
    n_params = sum(math.prod(s) for s in shapes.values())

    # Inputs: every saving rank's SavePlan, every loading rank's chunk lists.
    plans_items = _save_plan_items(shapes, job_layouts(save_layout, save_mesh), save_fsdp)
    ck_plans = _save_plans(plans_items, TensorProperties(dtype=dtype))
    load_arrays = job_layouts(load_layout, load_mesh)
    local_chunks = _local_chunks(load_arrays, load_fsdp * load_tp)

    if progress:
        progress.start("demo: ckcore", 3)
    timings, global_plans, md, n_read_items = _time_ckcore_steps(
        ck_plans, local_chunks, load_arrays, repeat, progress)
    md.storage_data, files = _filesystem_storage(global_plans, dtype)
    synthetic = Checkpoint.from_metadata(
        md, file_sizes=files, name=f"<llama-70b, {layers} layers, FSDP-{save_fsdp}>")
    t_plan, report = _best_of(lambda: plan_reads(synthetic, load_mesh, load_layout), repeat)
    timings["ckcore plan (arrays + coalescing)"] = {"ckcore": t_plan}
    t_traffic, ck_bytes = _time_ckcore_traffic(plans_items, dtype, repeat)
    timings["plan traffic, save: rank 0"] = {"ckcore": t_traffic}
    traffic_bytes: dict[str, int | None] = {"ckcore": ck_bytes, "torch": None}
    if progress:
        progress.done()

    torch_version = None
    if use_torch:
        try:
            import torch  # noqa: F401  (optional: only to time torch side by side)
        except ImportError:
            use_torch = False
    if use_torch:
        torch_version, t_torch_save, t_torch_load, n_torch, t_torch_traffic, torch_bytes = _time_torch(
            plans_items, local_chunks, dtype, repeat, progress)
        timings["plan traffic, save: rank 0"]["torch"] = t_torch_traffic
        traffic_bytes["torch"] = torch_bytes
        if n_torch != n_read_items:  # the comparison is only fair if both did the same work
            raise RuntimeError(f"torch made {n_torch} read items, ckcore {n_read_items}")
        timings["global save plan"]["torch"] = t_torch_save
        # torch has one form (ReadItem objects); both of ckcore's produce the same pairs.
        timings["load plan, all ranks: ReadItems"]["torch"] = t_torch_load
        timings["load plan, all ranks: arrays"]["torch"] = t_torch_load
    for row in timings.values():
        row.setdefault("torch", None)
    return {
        "model": f"Llama-2-70B shapes, {layers} layers, {len(shapes)} tensors, "
                 f"{n_params / 1e9:.1f}e9 params, {dtype}",
        "save": f"FSDP-{save_fsdp}: mesh {format_mesh(save_mesh)}, Shard(0) for every tensor",
        "load": f"FSDP-{load_fsdp} x TP-{load_tp}: mesh {format_mesh(load_mesh)}, "
                "FSDP2 (_StridedShard over TP) x TP column/row-wise",
        "write_items": sum(len(p.items) for p in ck_plans),
        "read_items": n_read_items,
        "torch_version": torch_version,
        "timings_s": timings,
        "traffic_bytes_per_rank": traffic_bytes,
        "plan": report,
    }


#: One saved chunk: (fqn, offsets, sizes, global shape).
_Item = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _save_plan_items(shapes: dict[str, tuple[int, ...]], save_arrays: dict[str, Any],
                     world: int) -> list[list[_Item]]:
    """Every saving rank's chunks, from the save layout's arrays."""
    plans_items: list[list[_Item]] = [[] for _ in range(world)]
    for fqn, (sizes, offsets) in save_arrays.items():
        for r, (o, s) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            plans_items[r].append((fqn, tuple(o), tuple(s), shapes[fqn]))
    return plans_items


def _save_plans(plans_items: list[list[_Item]], props: TensorProperties) -> list[SavePlan]:
    """ckcore's SavePlan of every saving rank."""
    return [
        SavePlan([
            WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(ChunkStorageMetadata(o, s), props, g))
            for fqn, o, s, g in items
        ])
        for items in plans_items
    ]


def _local_chunks(load_arrays: dict[str, Any], world: int) -> list[dict[str, list[ChunkStorageMetadata]]]:
    """Every loading rank's chunk of every tensor, from the load layout's arrays."""
    local_chunks: list[dict[str, list[ChunkStorageMetadata]]] = [{} for _ in range(world)]
    for fqn, (sizes, offsets) in load_arrays.items():
        for r, (o, s) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            local_chunks[r][fqn] = [ChunkStorageMetadata(tuple(o), tuple(s))]
    return local_chunks


def _time_ckcore_steps(
    ck_plans: list[SavePlan],
    local_chunks: list[dict[str, list[ChunkStorageMetadata]]],
    load_arrays: dict[str, Any],
    repeat: int,
    progress: ProgressSink | None,
) -> tuple[dict[str, dict[str, float | None]], list[Any], Metadata, int]:
    """Time ckcore's global save plan and both forms of the load plan.

    Returns the timings, the global plans, the metadata and the number of read items.
    """
    timings: dict[str, dict[str, float | None]] = {}

    def ck_save() -> tuple[list[Any], Metadata, list[str]]:
        return plan_global_save(ck_plans, logger=_SILENT)

    t_save, (global_plans, md, errors) = _best_of(ck_save, repeat)
    if errors:  # pragma: no cover - the demo's layouts are sound
        raise RuntimeError(f"demo save plan failed validation: {errors[0]}")
    timings["global save plan"] = {"ckcore": t_save}
    if progress:
        progress.update(1)

    def ck_load() -> int:
        sdm = md.state_dict_metadata
        n = 0
        for rank_chunks in local_chunks:
            for fqn, chunks in rank_chunks.items():
                n += len(create_read_items_for_chunk_list(fqn, sdm[fqn], chunks))
        return n

    t_load, n_read_items = _best_of(ck_load, repeat)
    timings["load plan, all ranks: ReadItems"] = {"ckcore": t_load}

    def ck_load_arrays() -> int:
        # The same pairs as int64 arrays: one call per tensor covers every rank
        # (the local chunks of all ranks are the layout's rows).
        sdm = md.state_dict_metadata
        n = 0
        for fqn, (sizes, offsets) in load_arrays.items():
            saved = chunk_arrays(sdm[fqn].chunks, fqn)
            n += len(intersect_chunks((offsets, sizes), saved, fqn=fqn))
        return n

    t_arrays, n_pairs = _best_of(ck_load_arrays, repeat)
    if n_pairs != n_read_items:  # pragma: no cover - both forms are one kernel
        raise RuntimeError(f"array form found {n_pairs} pairs, item form {n_read_items}")
    timings["load plan, all ranks: arrays"] = {"ckcore": t_arrays}
    if progress:
        progress.update(2)
    return timings, global_plans, md, n_read_items


def _write_columns(items: list[_Item], dtype: str) -> WriteColumns:
    """One rank's shard items as the columns FastSavePlanner packs."""
    fqns = tuple(fqn for fqn, _, _, _ in items)
    props_of: dict[tuple[int, ...], int] = {}
    pid = [props_of.setdefault(g, len(props_of)) for _, _, _, g in items]
    props = tuple((f"torch.{dtype}", "torch.strided", False, "torch.contiguous_format", False, g)
                  for g in props_of)
    return WriteColumns(
        fqns, props, np.arange(len(items), dtype=np.int64), np.ones(len(items), dtype=np.int8),
        np.array(pid, dtype=np.int64),
        np.array([v for _, o, _, _ in items for v in o], dtype=np.int64),
        np.array([v for _, _, sz, _ in items for v in sz], dtype=np.int64))


def _rank0_gather(wire: list[bytes]) -> list[Any]:
    # As DCP's gather: unpickled with the collector in its normal state
    # (each timing starts after a full collection, outside the timed call).
    return [pickle.loads(b) for b in wire]


def _time_ckcore_traffic(plans_items: list[list[_Item]], dtype: str,
                         repeat: int) -> tuple[float, int]:
    """Rank 0's save step on packed plans: unpickle all, unpack, plan; one rank's bytes."""
    wire = [pickle.dumps(pack_write_columns(_write_columns(items, dtype)))
            for items in plans_items]

    def rank0() -> Any:
        tables: dict = {}
        cols = [unpack_write_columns(p, _tables=tables) for p in _rank0_gather(wire)]
        planned = plan_columns(cols, dedup=True, save_to_lowest_rank=False, itemsize=_torch_itemsize)
        if planned is None:  # pragma: no cover - the demo's layouts are sound
            raise RuntimeError("demo: the packed plans did not plan from columns")
        return planned

    t, _ = _best_of(rank0, repeat, gc.collect)
    return t, len(wire[0])


def _torch_itemsize(name: str) -> int:
    return itemsize(name.removeprefix("torch."))


def _filesystem_storage(global_plans: list[Any], dtype: str
                        ) -> tuple[dict[MetadataIndex, Any], dict[str, int | None]]:
    """Storage entries and file sizes as FileSystemWriter lays them out.

    Rank r's items back to back in ``__r_0.distcp``, each as long as the
    chunk's raw bytes.
    """
    storage: dict[MetadataIndex, Any] = {}
    files: dict[str, int | None] = {}
    for r, plan in enumerate(global_plans):
        name = f"__{r}_0.distcp"
        pos = 0
        for wi in plan.items:
            n = math.prod(wi.tensor_data.chunk.sizes) * itemsize(dtype)
            storage[MetadataIndex(wi.index.fqn, wi.index.offset)] = StorageInfo(name, pos, n)
            pos += n
        files[name] = pos
    return storage, files


def _time_torch(plans_items: list, local_chunks: list, dtype: str, repeat: int,
                progress: ProgressSink | None) -> tuple[str, float, float, int, float, int]:
    """Time torch's own planning functions on torch's objects for the demo's steps."""
    import warnings

    import torch
    from torch.distributed.checkpoint import default_planner as tdp
    from torch.distributed.checkpoint import metadata as tmd
    from torch.distributed.checkpoint import planner as tpl
    from torch.distributed.checkpoint import planner_helpers as tph
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as t_dedup

    props = tmd.TensorProperties(dtype=getattr(torch, dtype))
    t_plans = [
        tpl.SavePlan([
            tpl.WriteItem(
                index=tmd.MetadataIndex(fqn, torch.Size(o)), type=tpl.WriteItemType.SHARD,
                tensor_data=tpl.TensorWriteData(
                    tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s)), props, torch.Size(g)))
            for fqn, o, s, g in items
        ])
        for items in plans_items
    ]
    t_local = [
        {fqn: [tmd.ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in chunks]
         for fqn, chunks in rank.items()}
        for rank in local_chunks
    ]
    if progress:
        progress.start("demo: torch", 2)

    def save() -> Any:
        deduped = t_dedup(t_plans)
        plans, md = tdp.create_default_global_save_plan(deduped)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = tdp._validate_global_plan(plans, md)
        return md, errors

    t_save, (md, errors) = _best_of(save, repeat)
    if errors:  # pragma: no cover
        raise RuntimeError(f"torch reports the demo save plan invalid: {errors[0]}")
    if progress:
        progress.update(1)
    sdm = md.state_dict_metadata

    def load() -> int:
        n = 0
        for rank in t_local:
            for fqn, chunks in rank.items():
                n += len(tph.create_read_items_for_chunk_list(fqn, sdm[fqn], chunks))
        return n

    t_load, n = _best_of(load, repeat)
    wire = [pickle.dumps(p) for p in t_plans]

    def traffic() -> Any:
        gathered = _rank0_gather(wire)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plans, md = tdp.create_default_global_save_plan(t_dedup(gathered))
            tdp._validate_global_plan(plans, md)
        return md

    t_traffic, _ = _best_of(traffic, repeat, gc.collect)
    if progress:
        progress.done()
    return torch.__version__, t_save, t_load, n, t_traffic, len(wire[0])

