"""Drop-in replacements for DCP's planning helpers, built on ckcore's kernels.

Each function here has the exact signature of the torch function of the
same name (``planner_helpers``, ``default_planner``, ``_dedup_save_plans``),
takes torch's own objects and returns torch's own types, so it can stand in
for torch's (see :func:`ckcore.dcp.patch`) or be called directly. Results
equal torch's as a multiset of items; read items come in ckcore's canonical
order (by local chunk, then saved chunk) rather than torch's sweep order,
which DCP does not depend on.

Where the work is intersection of chunk lists, :mod:`ckcore.items` does it,
given torch's classes (:data:`TORCH_ITEM_CLASSES`), and the kernels build
torch's ``ReadItem``/``MetadataIndex``/``torch.Size`` objects directly;
this module supplies torch's classes and the local chunks. A local load
plan hands all its plain tensors and DTensors to one kernel call
(``_items.plan_reads``: read, intersect, verify, build), and plans every
other entry, and any tensor that call hands back, one entry at a time. A
DTensor's chunk is memoised per layout (:mod:`ckcore.dcp._dtensor`). The global save
plan, its validation and dedup run on :mod:`ckcore.global_plan`, given
torch's classes. Where there is nothing to accelerate (ShardedTensor
metadata, ``_init_state_dict``), the function calls torch's original,
captured at import time so that :func:`ckcore.dcp.patch` can never make it
recurse.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint._dedup_save_plans as _torch_dedup
import torch.distributed.checkpoint.default_planner as _torch_dp
import torch.distributed.checkpoint.planner_helpers as _torch_ph
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.tensor import DTensor

from .. import global_plan as _gp
from .. import items as _core
from .._gc import paused
from .._kernels import _items as _kernel_items
from ..mdcolumns import MetadataColumns
from . import _dtensor as _dt
from ._lazy_metadata import columns_of, storage_md

__all__ = [
    "ORIGINALS",
    "TORCH_ITEM_CLASSES",
    "_compare_save_plans",
    "_contains_usable_plan",
    "_create_chunk_from_dtensor",
    "_create_chunk_list",
    "_create_default_metadata_only_plan",
    "_create_read_items",
    "_create_write_items",
    "_create_write_items_for_dtensor",
    "_init_state_dict",
    "_merge_delta_local_plans",
    "_validate_global_plan",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
    "create_read_items_for_chunk_list",
    "dedup_save_plans",
]

#: torch's metadata classes, for the global plan's Metadata.
_TORCH_MD_TYPES = _gp.MetadataTypes(
    metadata=Metadata,
    tensor_storage=TensorStorageMetadata,
    bytes_storage=BytesStorageMetadata,
)

#: The classes the kernels instantiate to hand back torch's own objects.
TORCH_ITEM_CLASSES = _core.ItemClasses(
    read_item=ReadItem,
    metadata_index=MetadataIndex,
    load_item_type=LoadItemType,
    size=torch.Size,
)

# torch's functions as they were when ckcore.dcp was first imported. The
# drop-ins delegate to these (never to the module attribute, which patch()
# may have replaced by the drop-in itself), and patch() restores them.
_PH_NAMES = (
    "create_read_items_for_chunk_list",
    "_create_read_items",
    "_create_write_items",
    "_create_chunk_list",
    "_create_chunk_from_dtensor",
    "_create_write_items_for_dtensor",
    "_create_default_metadata_only_plan",
    "_compare_save_plans",
    "_merge_delta_local_plans",
    "_contains_usable_plan",
    "_init_state_dict",
)
_DP_NAMES = (
    "create_default_local_load_plan",
    "create_default_local_save_plan",
    "create_default_global_save_plan",
    "_validate_global_plan",
)
#: name -> torch's original function (identity-equal to torch's module attribute).
ORIGINALS: dict[str, Any] = {name: getattr(_torch_ph, name) for name in _PH_NAMES}
ORIGINALS.update({name: getattr(_torch_dp, name) for name in _DP_NAMES})
ORIGINALS["dedup_save_plans"] = _torch_dedup.dedup_save_plans

_t_create_write_item_for_tensor = _torch_ph._create_write_item_for_tensor
_t_create_write_item_for_shard = _torch_ph._create_write_item_for_shard
_t_create_write_item_for_bytesio = _torch_ph._create_write_item_for_bytesio
_t_chunk_for_shard = _torch_ph._chunk_for_shard


def _create_chunk_from_dtensor(tensor: DTensor) -> ChunkStorageMetadata:
    """Drop-in for ``planner_helpers._create_chunk_from_dtensor``: this rank's chunk of ``tensor``."""
    sizes, offsets = _dt.local_sizes_offsets(tensor)
    return ChunkStorageMetadata(offsets=offsets, sizes=sizes)


def _create_write_items_for_dtensor(fqn: str, tensor: DTensor) -> WriteItem:
    """Drop-in for ``planner_helpers._create_write_items_for_dtensor``: this rank's SHARD item."""
    sizes, offsets = _dt.local_sizes_offsets(tensor)
    return WriteItem(
        index=MetadataIndex(fqn, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
            properties=TensorProperties.create_from_tensor(tensor.to_local()),
            size=tensor.size(),
        ),
    )


# --------------------------------------------------------------------------
# Chunk lists and read items
# --------------------------------------------------------------------------


def _create_chunk_list(tensor: torch.Tensor) -> list[ChunkStorageMetadata]:
    """Drop-in for ``planner_helpers._create_chunk_list``: the chunks this rank holds of ``tensor``.

    Raises ``ValueError`` for objects that are not tensors, as torch does.
    """
    if _dt.is_plain_dtensor(tensor):
        _dt.raise_if_partial(tensor)
        return [_create_chunk_from_dtensor(tensor)]
    if hasattr(tensor, "__create_chunk_list__"):
        return tensor.__create_chunk_list__()
    if isinstance(tensor, ShardedTensor):
        return [_t_chunk_for_shard(shard.metadata) for shard in tensor.local_shards()]
    if isinstance(tensor, torch.Tensor):
        size = tensor.size()
        return [ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)]
    raise ValueError(
        "Unsupported Type, expecting one of [Tensor, DTensor, ShardedTensor] "
        f",but got {type(tensor)}"
    )


def create_read_items_for_chunk_list(
    fqn: str,
    checkpoint_md: TensorStorageMetadata,
    local_chunks: list[ChunkStorageMetadata],
) -> list[ReadItem]:
    """Drop-in for torch's ``create_read_items_for_chunk_list``: reads that fill ``local_chunks``.

    One ``ReadItem`` per overlapping (local, saved) pair, the same multiset as
    torch's, in canonical order (by local index, then saved index). Offsets in
    ``storage_offsets`` are relative to the saved chunk, ``dest_offsets`` to the
    local chunk.
    """
    return _core.create_read_items_for_chunk_list(
        fqn, checkpoint_md, local_chunks, classes=TORCH_ITEM_CLASSES
    )


def _local_chunks(fqn: str, md: Any, obj: Any) -> list[ChunkStorageMetadata]:
    """``obj``'s chunks, with torch's error when ``obj`` has none (it is not a tensor)."""
    try:
        return _create_chunk_list(obj)
    except ValueError as ex:
        raise ValueError(
            f"Invalid checkpoint metadata for {fqn}, "
            + f"expected BytesStorageMetadata but found {type(md)}",
        ) from ex


def _create_read_items(fqn: str, md: STORAGE_TYPES, obj: Any) -> list[ReadItem]:
    """Drop-in for ``planner_helpers._create_read_items``: reads for one state-dict value."""
    if isinstance(md, BytesStorageMetadata):
        return _core.create_read_items(fqn, md, None, classes=TORCH_ITEM_CLASSES)
    if isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None:
        # A rank outside the DTensor's submesh: torch describes its chunk as
        # offsets=() sizes=(0,), which its sweep treats like a 0-d tensor. The
        # planners never ask (they skip such ranks); a direct caller gets
        # torch's own answer rather than ckcore's ndim error.
        return ORIGINALS["_create_read_items"](fqn, md, obj)
    local_chunks = _local_chunks(fqn, md, obj)
    return _core.create_read_items_for_chunk_list(fqn, md, local_chunks, classes=TORCH_ITEM_CLASSES)


def _create_write_items(fqn: str, object: Any) -> list[WriteItem]:
    """Drop-in for ``planner_helpers._create_write_items``: what this rank writes for one value."""
    if _dt.is_plain_dtensor(object):
        _dt.raise_if_partial(object)
        return [_create_write_items_for_dtensor(fqn, object)]
    if hasattr(object, "__create_write_items__"):
        return object.__create_write_items__(fqn, object)
    if isinstance(object, ShardedTensor):
        return [
            _t_create_write_item_for_shard(fqn, object, shard.metadata)
            for shard in object.local_shards()
        ]
    if isinstance(object, torch.Tensor):
        return [_t_create_write_item_for_tensor(fqn, object)]
    return [_t_create_write_item_for_bytesio(fqn, object)]


def _create_default_metadata_only_plan(state_dict: STATE_DICT_TYPE) -> SavePlan:
    """Drop-in for ``planner_helpers._create_default_metadata_only_plan``.

    Every chunk of every value, as if this one process wrote the whole state dict.
    """
    requests: list[WriteItem] = []
    for fqn, obj in state_dict.items():
        if isinstance(obj, DTensor):
            requests.append(_create_write_items_for_dtensor(fqn, obj))
        elif isinstance(obj, ShardedTensor):
            requests.extend(
                _t_create_write_item_for_shard(fqn, obj, shard_md)
                for shard_md in obj.metadata().shards_metadata
            )
        elif isinstance(obj, torch.Tensor):
            requests.append(_t_create_write_item_for_tensor(fqn, obj))
        else:
            requests.append(_t_create_write_item_for_bytesio(fqn, obj))
    return SavePlan(requests)


# --------------------------------------------------------------------------
# Local plans
# --------------------------------------------------------------------------


def create_default_local_load_plan(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool = True
) -> LoadPlan:
    """Drop-in for ``default_planner.create_default_local_load_plan``.

    One batch of read items per value of ``state_dict`` against ``metadata``;
    a key missing from the checkpoint is an error when ``strict``, skipped
    otherwise; a DTensor on a mesh this rank is not part of reads nothing.
    """
    return _local_load_plan(state_dict, metadata, strict, check_cover=False)


def _local_load_plan(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool, check_cover: bool
) -> LoadPlan:
    """``create_default_local_load_plan``; with ``check_cover``, FastLoadPlanner's verified reads.

    ``check_cover`` refuses metadata whose saved chunks do not fill each
    destination chunk exactly once (see :func:`_read_items_checked`).
    """
    # A plan is thousands of new acyclic objects that all survive: each
    # allocation burst would trigger the cyclic GC, whose older generations
    # walk every live object of the process (torch's included). Nothing here
    # can form a cycle, so collection waits until the plan is built.
    with paused():
        return _local_load_plan_fused(state_dict, metadata, strict, check_cover)


_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_ZEROS: dict[int, torch.Size] = {}


def _zeros(ndim: int) -> torch.Size:
    z = _ZEROS.get(ndim)
    if z is None:
        z = _ZEROS[ndim] = torch.Size([0] * ndim)
    return z


def _local_load_plan_fused(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool, check_cover: bool
) -> LoadPlan:
    # _local_load_plan_body's plan, the usual entries planned by one kernel
    # call. The loop only sorts entries: a tensor or DTensor (exactly those
    # types, one local chunk) with tensor metadata of its size goes to the
    # kernel; anything else, and any tensor the kernel hands back (a value it
    # does not take as is, a cover it cannot prove), goes through
    # _local_load_plan_body on its own, in plan order, so every item and
    # every error is the one that function gives, where it gives it.
    cols = columns_of(metadata)
    md_by_fqn: Any = None
    if cols is None:
        md_by_fqn = metadata.state_dict_metadata
        if type(md_by_fqn) is not dict:
            return _local_load_plan_body(state_dict, metadata, strict, check_cover)
        get = md_by_fqn.get
    else:
        ids = cols._fqn_ids
        props = cols.properties
    order: list[Any] = []  # per entry: a kernel tensor number, or (fqn, obj)
    fqns: list[str] = []
    objs: list[Any] = []
    offsets: list[Any] = []
    sizes: list[Any] = []
    saved: list[Any] = []
    global_sizes: list[Any] = []
    planned_chunk = _dt.planned_chunk
    md: Any
    for fqn, obj in state_dict.items():
        if type(fqn) is str:
            if cols is None:
                md = get(fqn)
                tensor_md = type(md) is TensorStorageMetadata
            else:
                md = ids.get(fqn)
                tensor_md = md is not None and props[md] is not None
            t = type(obj)
            if tensor_md and (t is DTensor or t is _Tensor or t is _Parameter):
                try:
                    size = obj.size()
                    if cols is None and md.size != size:
                        raise ValueError(fqn)  # the one-entry path says what differs
                    if t is DTensor:
                        if type(obj._local_tensor) is not _Tensor:
                            raise TypeError(fqn)
                        lsize, loff = planned_chunk(obj, size)
                        if lsize is None:
                            # Off the mesh: reads nothing, after the size check.
                            raise LookupError(fqn)
                    else:
                        lsize, loff = size, _zeros(len(size))
                except Exception:  # noqa: S110 - planned (or refused) on its own below
                    pass
                else:
                    order.append(len(fqns))
                    fqns.append(fqn)
                    objs.append(obj)
                    offsets.append(loff)
                    sizes.append(lsize)
                    saved.append(md)
                    global_sizes.append(size)
                    continue
        order.append((fqn, obj))
    cls = TORCH_ITEM_CLASSES
    items, starts, slow = _kernel_items.plan_reads(
        fqns, offsets, sizes, saved, cls.read_item, cls.metadata_index,
        cls.load_item_type.TENSOR, cls.size, ChunkStorageMetadata, check_cover,
        cols, global_sizes if cols is not None else None)
    if not slow and len(order) == len(fqns):
        return LoadPlan(items)
    bounds = starts.tolist()
    slow_set = set(slow)
    requests: list[ReadItem] = []
    for e in order:
        if type(e) is int and e not in slow_set:
            requests += items[bounds[e]:bounds[e + 1]]
            continue
        fqn, obj = (fqns[e], objs[e]) if type(e) is int else e
        requests += _local_load_plan_body({fqn: obj}, metadata, strict, check_cover).items
    return LoadPlan(requests)


def _local_load_plan_columns(
    state_dict: dict[str, Any], cols: MetadataColumns, strict: bool, check_cover: bool
) -> LoadPlan:
    # The same decisions as _local_load_plan_body, in the same order, with
    # each tensor's saved chunks read as arrays from the columns.
    requests: list[ReadItem] = []
    ids = cols._fqn_ids
    for fqn, obj in state_dict.items():
        fid = ids.get(fqn) if type(fqn) is str else None
        if fid is None:
            if strict:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            continue
        is_tensor = cols.properties[fid] is not None
        if isinstance(obj, ShardedTensor):
            md = storage_md(cols, fid)
            plan = ORIGINALS["create_default_local_load_plan"](
                {fqn: obj}, Metadata(state_dict_metadata={fqn: md}), strict
            )
            requests += _read_items_checked(fqn, md, obj) if check_cover else plan.items
            continue
        if is_tensor and getattr(obj, "size", None) is not None:
            size = torch.Size(cols.size(fid))
            if size != obj.size():
                raise ValueError(
                    f"Size mismatch between saved {size} and current: {obj.size()} for {fqn}",
                )
        if isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None:
            continue
        if not is_tensor:
            requests += _core.create_read_items(fqn, _BYTES_MD, None, classes=TORCH_ITEM_CLASSES)
            continue
        local_chunks = _local_chunks(fqn, _TENSOR_MD, obj)
        requests += _core.create_read_items(
            fqn, cols.chunks(fid), local_chunks, classes=TORCH_ITEM_CLASSES,
            verify_cover=check_cover)
    return LoadPlan(requests)


# Stand-ins where only the class matters (item kind, torch's error message).
_BYTES_MD = BytesStorageMetadata()
_TENSOR_MD = TensorStorageMetadata.__new__(TensorStorageMetadata)


def _local_load_plan_body(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool, check_cover: bool
) -> LoadPlan:
    cols = columns_of(metadata)
    if cols is not None:
        return _local_load_plan_columns(state_dict, cols, strict, check_cover)
    requests: list[ReadItem] = []
    md_by_fqn = metadata.state_dict_metadata
    for fqn, obj in state_dict.items():
        # Any: the metadata is read from a file, and a damaged one can hold
        # anything here (_read_items_checked refuses what is not storage metadata).
        md: Any = md_by_fqn.get(fqn)
        if md is None and fqn not in md_by_fqn:
            if strict:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            continue
        if isinstance(obj, ShardedTensor):
            # ShardedTensor.size() warns that ShardedTensor is deprecated, at
            # the frame that calls it: inside torch's function for torch, and
            # would be here for ckcore. torch's function plans the entry, so
            # the warning comes from the same line and passes the same
            # filters (there is nothing to accelerate for ShardedTensor).
            plan = ORIGINALS["create_default_local_load_plan"](
                {fqn: obj}, Metadata(state_dict_metadata={fqn: md}), strict
            )
            requests += _read_items_checked(fqn, md, obj) if check_cover else plan.items
            continue
        if (
            isinstance(md, TensorStorageMetadata)
            and getattr(obj, "size", None) is not None
            and md.size != obj.size()
        ):
            raise ValueError(
                f"Size mismatch between saved {md.size} and current: {obj.size()} for {fqn}",
            )
        if isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None:
            continue
        if check_cover:
            requests += _read_items_checked(fqn, md, obj)
        else:
            requests += _create_read_items(fqn, md, obj)
    return LoadPlan(requests)


def _read_items_checked(fqn: str, md: Any, obj: Any) -> list[ReadItem]:
    """``_create_read_items``, refusing metadata whose chunks would leave part of ``obj`` unwritten.

    Raises ``TypeError`` if ``md`` is not tensor or bytes storage metadata, and
    ``ValueError`` naming ``fqn`` and the local chunk if the saved chunks do not
    fill it exactly once (a hole, or two saved chunks overlapping inside it):
    :func:`ckcore.items.create_read_items` with ``verify_cover``.
    """
    if isinstance(md, BytesStorageMetadata):
        return _core.create_read_items(fqn, md, None, classes=TORCH_ITEM_CLASSES)
    if not isinstance(md, TensorStorageMetadata):
        raise TypeError(
            f"checkpoint metadata for {fqn} is a {type(md).__name__}, "
            "expected TensorStorageMetadata or BytesStorageMetadata"
        )
    local_chunks = _local_chunks(fqn, md, obj)
    return _core.create_read_items(
        fqn, md, local_chunks, classes=TORCH_ITEM_CLASSES, verify_cover=True
    )


def create_default_local_save_plan(state_dict: dict[str, Any], is_coordinator: bool) -> SavePlan:
    """Drop-in for ``default_planner.create_default_local_save_plan``.

    Every rank plans every plain tensor and object (the coordinator's dedup
    decides who writes them); a DTensor on a mesh this rank is not part of
    writes nothing.
    """
    requests: list[WriteItem] = []
    for fqn, obj in state_dict.items():
        if isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None:
            continue
        requests += _create_write_items(fqn, obj)
    return SavePlan(requests)


# --------------------------------------------------------------------------
# Global plans
# --------------------------------------------------------------------------


def create_default_global_save_plan(
    all_plans: list[SavePlan],
    rewrite_index_hints: bool = True,
) -> tuple[list[SavePlan], Metadata]:
    """Drop-in for ``default_planner.create_default_global_save_plan``: the checkpoint's metadata.

    Every fqn's chunks in plan order and, with ``rewrite_index_hints``, each
    item's ``index.index`` set to its chunk's position; torch's classes in,
    torch's classes out.
    """
    return _gp.create_global_save_plan(all_plans, rewrite_index_hints, types=_TORCH_MD_TYPES)


def _plan_global_save(
    all_plans: list[SavePlan], save_to_lowest_rank: bool = False
) -> tuple[list[SavePlan], Metadata, list[str]]:
    """Rank 0's global save step, FastSavePlanner's: plans, metadata and validation errors.

    The results of ``dedup_save_plans``, ``create_default_global_save_plan``
    and ``_validate_global_plan`` in turn, in one pass over the items
    (:func:`ckcore.global_plan.plan_global_save`); findings are logged to the
    logger torch's ``_validate_global_plan`` uses.
    """
    return _gp.plan_global_save(
        all_plans, save_to_lowest_rank=save_to_lowest_rank, types=_TORCH_MD_TYPES,
        logger=_torch_dp.logger)


def _validate_global_plan(global_plan: list[SavePlan], metadata: Metadata) -> list[str]:
    """Drop-in for ``default_planner._validate_global_plan``: torch's error messages, same set.

    Out-of-bounds chunks, every overlapping pair, and (with more than one
    plan) chunk volumes that do not add up to the tensor's; each also logged
    as a warning to the logger torch's function uses (``default_planner.logger``).
    """
    return _gp.validate_global_plan(global_plan, metadata, logger=_torch_dp.logger)


def dedup_save_plans(
    all_plans: list[SavePlan],
    save_to_lowest_rank: bool = False,
) -> list[SavePlan]:
    """Drop-in for ``_dedup_save_plans.dedup_save_plans``: each duplicated item kept once.

    The holder with the smallest planned size so far keeps it (or the lowest
    rank with ``save_to_lowest_rank``); size ties go to the lowest rank, which
    is torch's choice on up to 8 ranks (beyond, torch's follows set order).
    """
    return _gp.dedup_save_plans(all_plans, save_to_lowest_rank)


# --------------------------------------------------------------------------
# Plan caching helpers
# --------------------------------------------------------------------------


def _compare_save_plans(plan: SavePlan, other_plan: SavePlan) -> bool:
    """Drop-in for ``planner_helpers._compare_save_plans``: True if the two plans are equal."""
    return _core.compare_save_plans(plan, other_plan)


def _contains_usable_plan(delta_plans: list[SavePlan]) -> bool:
    """Drop-in for ``planner_helpers._contains_usable_plan``: True if any delta plan is usable."""
    return _core.contains_usable_plan(delta_plans)


def _merge_delta_local_plans(
    cached_plans: list[SavePlan],
    delta_plans: list[SavePlan],
) -> list[SavePlan]:
    """Drop-in for ``planner_helpers._merge_delta_local_plans``: cached plan where a delta is unusable."""
    return _core.merge_delta_local_plans(cached_plans, delta_plans)


def _init_state_dict(state_dict: dict[str, Any]) -> Any:
    """Drop-in for ``planner_helpers._init_state_dict``; torch's (nothing here to accelerate).

    Materialises meta-device tensors and DTensors on the process group's device.
    """
    return ORIGINALS["_init_state_dict"](state_dict)
