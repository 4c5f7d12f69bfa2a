"""Rank 0's global save planning: dedup, global plan + metadata, validation.

DCP runs these three steps on the coordinator rank once per save, over every
rank's plan (``_dedup_save_plans.dedup_save_plans``,
``default_planner.create_default_global_save_plan`` and
``default_planner._validate_global_plan``). At 1024+ ranks they dominate the
save's planning time. This module gives the same results as torch's functions
with the loops in compiled kernels (``ckcore._kernels._validate`` for the
chunk checks, ``_dedup``, ``_save_plan`` and ``_fused_plan`` for the object
plumbing).

Every function takes ckcore's plan objects (:mod:`ckcore.planner`) or torch's,
duck-typed, and returns objects of the classes it was given: a new
``WriteItem`` or ``MetadataIndex`` is made with ``type(old)`` and the old
object's fields, bypassing ``__init__`` and the frozen ``__setattr__`` (the
result equals ``dataclasses.replace``'s: same class, same field values, the
one field changed). Classes this shortcut cannot copy faithfully (no
instance ``__dict__``, a custom ``__new__``, ``__post_init__`` or
``init=False`` fields, or not dataclasses) go through ``dataclasses.replace``.

The cyclic GC is paused inside each function and the new objects are moved
to the oldest generation on exit (``ckcore._gc.paused(promote=True)``): at
1024 ranks the collections otherwise cost as much as the planning.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckcore._gc import paused
from ckcore._kernels import _dedup, _fused_plan, _save_plan
from ckcore._kernels._validate import _check_tensor, chunk_rows
from ckcore.dtypes import itemsize
from ckcore.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

__all__ = [
    "CKCORE_TYPES",
    "MetadataTypes",
    "create_global_save_plan",
    "dedup_save_plans",
    "plan_global_save",
    "validate_global_plan",
]

logger = logging.getLogger(__name__)
# Under its own name: the functions' ``logger`` argument shadows ``logger``.
_LOG = logger


@dataclass(frozen=True)
class MetadataTypes:
    """The classes :func:`create_global_save_plan` builds its metadata with.

    ckcore's own by default; the torch integration passes torch's
    ``Metadata``, ``TensorStorageMetadata`` and ``BytesStorageMetadata`` to get
    torch objects back. Each is called with torch's keyword arguments
    (``Metadata(state_dict_metadata)``,
    ``TensorStorageMetadata(properties=, size=, chunks=)``,
    ``BytesStorageMetadata()``).
    """

    metadata: Any = Metadata
    tensor_storage: Any = TensorStorageMetadata
    bytes_storage: Any = BytesStorageMetadata


CKCORE_TYPES = MetadataTypes()


def _wrong_objects(what: str, all_plans: Any, item_attrs: tuple[str, ...]) -> TypeError | None:
    """The TypeError for plans or items without DCP's fields, naming the first one.

    Only called after the kernel hit an AttributeError: the check costs a pass
    over every item, which the success path does not pay. None when every
    plan, item and index has DCP's fields: the AttributeError came from
    elsewhere (torch raises it too, e.g. a shard item on an fqn that a bytes
    item took) and is re-raised as is.
    """
    try:
        plans = list(all_plans)
    except TypeError:
        return TypeError(f"{what}: expected a list of SavePlans, got {type(all_plans).__name__}")
    for rank, plan in enumerate(plans):
        items = getattr(plan, "items", None)
        if items is None:
            return TypeError(
                f"{what}: plan {rank} is a {type(plan).__name__}, not a SavePlan (no .items)")
        for i, item in enumerate(items):
            missing = [a for a in item_attrs if not hasattr(item, a)]
            if missing:
                return TypeError(
                    f"{what}: plan {rank} item {i} ({type(item).__name__}) is not a WriteItem "
                    f"(missing {', '.join(missing)})")
            index = item.index
            if not (hasattr(index, "fqn") and hasattr(index, "offset")):
                return TypeError(
                    f"{what}: plan {rank} item {i}: index {index!r} is not a MetadataIndex")
    return None


def create_global_save_plan(
    all_plans: Sequence[Any],
    rewrite_index_hints: bool = True,
    *,
    types: MetadataTypes = CKCORE_TYPES,
) -> tuple[list[Any], Any]:
    """Build the global plan and checkpoint metadata, as torch's ``create_default_global_save_plan``.

    Every fqn's metadata collects its write items' chunks in plan order
    (``TensorStorageMetadata`` from the first item's properties and size;
    ``BytesStorageMetadata`` for bytes items). With ``rewrite_index_hints``
    each tensor item's ``index.index`` becomes its chunk's position in that
    list:

    >>> from ckcore.planner import SavePlan
    >>> plans, md = create_global_save_plan([SavePlan([]), SavePlan([])])
    >>> md.state_dict_metadata
    {}

    Raises ``AssertionError`` exactly where torch does: a second non-shard
    item for an fqn, a tensor item without ``tensor_data`` or without a
    chunk. Returned plans and items keep the input classes; the metadata
    classes come from ``types`` (see :class:`MetadataTypes`).
    """
    try:
        with paused(promote=True):
            return _save_plan.create_global_save_plan(
                list(all_plans),
                bool(rewrite_index_hints),
                types.metadata,
                types.tensor_storage,
                types.bytes_storage,
            )
    except AttributeError:
        wrong = _wrong_objects("create_global_save_plan", all_plans, ("index", "type"))
        if wrong is None:
            raise
        raise wrong from None


def dedup_save_plans(all_plans: Sequence[Any], save_to_lowest_rank: bool = False) -> list[Any]:
    """Keep each write item duplicated across plans on one plan only, as torch's ``dedup_save_plans``.

    Items are visited in first-seen order (plan by plan); a duplicated item
    stays on the holder with the smallest planned size so far (global tensor
    bytes, ``WriteItem.tensor_storage_size()``, or 1 for bytes items and
    empty tensors), or on the lowest holder with ``save_to_lowest_rank``.
    Size ties go to the lowest rank. torch breaks ties by the iteration order
    of a Python ``set`` of ranks, which is ascending on up to 8 ranks (where
    the two agree exactly) and hash-table order beyond; ckcore's rule is
    deterministic and documented instead.

    Returns new plans of the input plans' class (``dataclasses.replace``
    semantics: only ``items`` changes); the items themselves are shared.
    """
    try:
        with paused(promote=True):
            return _dedup.dedup_save_plans(list(all_plans), bool(save_to_lowest_rank), itemsize)
    except AttributeError:
        wrong = _wrong_objects("dedup_save_plans", all_plans, ("index", "type"))
        if wrong is None:
            raise
        raise wrong from None


def _is_tensor_storage(key: Any, value: Any) -> bool:
    # Duck-typed isinstance checks that accept ckcore's and torch's classes:
    # bytes entries are skipped as torch skips them; anything else that is
    # not a tensor entry is refused (torch would crash on .size).
    if hasattr(value, "chunks") and hasattr(value, "size"):
        return True
    if type(value).__name__ == "BytesStorageMetadata":
        return False
    raise TypeError(
        f"key:{key} expected TensorStorageMetadata or BytesStorageMetadata, "
        f"got {type(value).__name__}"
    )


def _torch_order(offs: np.ndarray, sizes: np.ndarray, tsize: Sequence[int], pairs: np.ndarray):
    """Order overlapping pairs as torch's sweep reports them: (current, other) rows.

    torch sorts chunks by (offset on the largest dimension, then all offsets),
    stable, sweeps, and for each chunk (``current``) reports the active
    earlier chunks (``other``) in (end on that dimension, index) order.
    """
    ndim = offs.shape[1]
    sweep = max(range(ndim), key=lambda d: tsize[d])
    keys = [offs[:, d] for d in reversed(range(ndim))] + [offs[:, sweep]]
    order = np.lexsort(keys)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    a, b = pairs[:, 0], pairs[:, 1]
    a_later = rank[a] > rank[b]
    cur = np.where(a_later, a, b)
    oth = np.where(a_later, b, a)
    # end on the sweep dimension: exact in int64 (offset + size was checked).
    end = offs[:, sweep] + sizes[:, sweep]
    perm = np.lexsort((oth, end[oth], rank[cur]))
    return cur[perm], oth[perm]


def _logger(logger: Any) -> Any:
    """``logger``, or this module's for None; TypeError for anything else.

    Checked up front: findings are logged only when there are some, so a
    wrong value would otherwise pass unnoticed until a plan is unsound.
    """
    if logger is None:
        return _LOG
    # Duck-typed, as torch's planner uses its logger: only ``.warning(msg)``
    # is called, and a drop-in must take whatever torch's module holds.
    if not callable(getattr(logger, "warning", None)):
        raise TypeError(
            "logger must be a logging.Logger (or any object with a warning method) or None, "
            f"got {type(logger).__name__}")
    return logger


def validate_global_plan(
    global_plan: Sequence[Any], metadata: Any, *,
    logger: logging.Logger | logging.LoggerAdapter | None = None
) -> list[str]:
    """Return torch's ``_validate_global_plan`` findings (an empty list if the plan is sound).

    For every tensor of ``metadata.state_dict_metadata`` (0-d tensors and
    bytes are skipped, as torch does): each out-of-bounds chunk (negative
    offset or size, or past the tensor's size), each overlapping pair of
    chunks (torch's predicate: an empty chunk strictly inside another
    overlaps it), and, when there is more than one plan, a mismatch between
    the tensor's volume and the sum of its chunks' volumes. Messages are
    torch's, formatted with the ``repr`` of the objects given (so torch's
    objects give torch's exact strings), in torch's order, each also logged
    as a warning to ``logger`` (by default this module's, ``ckcore.global_plan``;
    the torch drop-ins pass the logger torch's ``default_planner`` uses; a
    any object with a ``warning`` method is taken too, as torch's module
    logger may be replaced by one; anything else is a TypeError).

    Cost is linear for regular grids and layouts whose per-dimension cuts
    are disjoint (regular, irregular, MoE), and follows the output when
    chunks do overlap; volumes are exact (never wrap).

    Raises TypeError for chunks that are not objects with integer
    ``.offsets``/``.sizes``, ValueError for a chunk whose number of
    dimensions differs from the tensor's (torch crashes or silently ignores
    the extra dimensions) or whose values or offset + size fall outside
    int64; negative values are reported as out of bounds, as torch does.
    """
    log = _logger(logger)
    if not hasattr(metadata, "state_dict_metadata"):
        raise TypeError(
            f"validate_global_plan: metadata must be a Metadata (with .state_dict_metadata), "
            f"got {type(metadata).__name__}")
    try:
        len(global_plan)
    except TypeError:
        raise TypeError(
            f"validate_global_plan: global_plan must be a list of SavePlans, "
            f"got {type(global_plan).__name__}") from None
    with paused(promote=True):
        return _validate(global_plan, metadata, log)


def _validate(global_plan: Sequence[Any], metadata: Any,
              log: logging.Logger | logging.LoggerAdapter) -> list[str]:
    errors: list[str] = []
    multi = len(global_plan) > 1
    for key, value in metadata.state_dict_metadata.items():
        _validate_key(key, value, multi, errors, log)
    return errors


def _validate_key(
    key: Any, value: Any, multi: bool, errors: list[str], log: logging.Logger | logging.LoggerAdapter
) -> None:
    """torch's checks of one metadata entry, its findings logged to ``log`` and appended to errors."""
    if not _is_tensor_storage(key, value):
        return
    size = value.size
    ndim = len(size)
    if ndim == 0:
        return
    # One snapshot for the numbers and the messages: they must name the
    # chunks that were checked, whatever another thread does to the list.
    chunks = tuple(value.chunks)
    try:
        tsize = np.array([operator.index(v) for v in size], dtype=np.int64)
    except TypeError:
        raise TypeError(f"key:{key} tensor size {size!r} is not a tuple of integers") from None
    except OverflowError:
        raise ValueError(f"key:{key} tensor size {size!r} does not fit in int64") from None
    offs, sizes = chunk_rows(key, chunks, ndim)
    oob, chunks_volume, pairs = _check_tensor(offs, sizes, tsize)
    for i in oob.tolist():
        msg = f"key:{key} has out of bounds chunk: tensor-size:{size} chunk: {chunks[i]}"
        log.warning(msg)
        errors.append(msg)
    if len(pairs):
        cur, oth = _torch_order(offs, sizes, size, pairs)
        for i, j in zip(cur.tolist(), oth.tolist()):
            msg = f"key:{key} has overlapping chunks: {chunks[i]} {chunks[j]}"
            log.warning(msg)
            errors.append(msg)
    if multi:
        if chunks_volume is None:
            # Some chunk's volume overflows int64: exact Python ints.
            chunks_volume = sum(math.prod(c.sizes) for c in chunks)
        tensor_volume = math.prod(size)
        if chunks_volume != tensor_volume:
            msg = (
                f"key:{key} invalid fill tensor-volume: "
                f"{tensor_volume} chunks-volume: {chunks_volume}"
            )
            log.warning(msg)
            errors.append(msg)

def plan_global_save(
    all_plans: Sequence[Any],
    *,
    dedup: bool = True,
    save_to_lowest_rank: bool = False,
    rewrite_index_hints: bool = True,
    types: MetadataTypes = CKCORE_TYPES,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> tuple[list[Any], Any, list[str]]:
    """Rank 0's whole global planning step: dedup, global plan and validation.

    Returns ``(plans, metadata, errors)``, equal to running, in
    ``DefaultSavePlanner.create_global_plan``'s order::

        plans = dedup_save_plans(all_plans, save_to_lowest_rank) if dedup else all_plans
        plans, metadata = create_global_save_plan(plans, rewrite_index_hints, types=types)
        errors = validate_global_plan(plans, metadata, logger=logger)

    and raising what those raise, but reading every item once: one compiled
    pass dedups, builds the metadata and rewritten items and keeps each
    chunk's offsets and sizes as int64 rows, which validation then checks
    without going back to the chunk objects (``_fused_plan.fused_save_plan``).
    Tensors with something to report are re-checked by
    :func:`validate_global_plan`'s own code, for torch's messages and order.
    Plans the single pass cannot take exactly (see the kernel: mixed item
    types on one fqn, missing chunks, non-integer offsets, ...) go through
    the three functions in turn.
    """
    log = _logger(logger)
    plans = list(all_plans)
    res = None
    try:
        with paused(promote=True):
            res = _fused_plan.fused_save_plan(
                plans, bool(dedup), bool(save_to_lowest_rank), bool(rewrite_index_hints),
                types.metadata, types.tensor_storage, types.bytes_storage, itemsize)
            if res is not None:
                new_plans, md, careful = res
                errors: list[str] = []
                if careful:
                    multi = len(new_plans) > 1
                    for key, value in md.state_dict_metadata.items():
                        if key in careful:
                            _validate_key(key, value, multi, errors, log)
                return new_plans, md, errors
    except (AttributeError, TypeError):
        # Objects that are not plans or items: the step-by-step path names them.
        if res is not None:
            raise
    plans = dedup_save_plans(plans, save_to_lowest_rank) if dedup else plans
    plans, md = create_global_save_plan(plans, rewrite_index_hints, types=types)
    return plans, md, validate_global_plan(plans, md, logger=log)
