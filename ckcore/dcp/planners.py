"""DCP planners that plan with ckcore's kernels.

:class:`FastSavePlanner` and :class:`FastLoadPlanner` are
``DefaultSavePlanner`` / ``DefaultLoadPlanner`` with every option and
behaviour of their parents (flattening, dedup to the lowest rank, plan
caching, strict and partial loads, pre-2.4 key fallback). Only the methods
that call DCP's planning helpers are overridden, with the same control flow
as torch's, calling the drop-ins of :mod:`ckcore.dcp.dropins` instead of the
helpers torch's methods find in ``default_planner``'s globals. Pass them to
``dcp.save(..., planner=FastSavePlanner())`` / ``dcp.load(..., planner=FastLoadPlanner())``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from collections import ChainMap
from typing import Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint import _version, state_dict_loader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    Metadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, SavePlanner

from ckcore._gc import paused
from ckcore.compact import ColumnPlan, CompactPlanError, merged_mapping, plan_columns
from ckcore.mdcolumns import BYTES, TENSOR, MetadataColumns

from . import _compact as _c
from . import dropins as _d
from ._lazy_metadata import ColumnarMetadata, columns_of

__all__ = ["FastLoadPlanner", "FastSavePlanner"]

logger = logging.getLogger(__name__)


class FastSavePlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` whose local plan, dedup, global plan and validation run on ckcore.

    Takes exactly ``DefaultSavePlanner``'s arguments (``flatten_state_dict``,
    ``flatten_sharded_tensors``, ``dedup_replicated_tensors``,
    ``dedup_save_to_lowest_rank``, ``enable_plan_caching``). The plan cache
    is keyed by class name, as in torch, so it is not shared with
    ``DefaultSavePlanner``'s.
    """

    def create_local_plan(self) -> SavePlan:
        """This rank's write items (see ``DefaultSavePlanner.create_local_plan``)."""
        plan = _d.create_default_local_save_plan(self.state_dict, self.is_coordinator)
        if self.flatten_state_dict:
            plan = dataclasses.replace(plan, planner_data=self.mappings)
        plan = _compact_save_plan(plan)
        self.plan = plan

        if self._enable_plan_caching:
            # Unchanged plan: send an empty, unusable one and let the
            # coordinator reuse its cache (torch's protocol).
            if self._cached_plans_key in SavePlanner._cached_save_plan and _d._compare_save_plans(
                plan, SavePlanner._cached_save_plan[self._cached_plans_key]
            ):
                logger.info(
                    "No change in the local plan. Skipping sending the plan to the coordinator"
                )
                return SavePlan([], usable=False)
            # Promoted to the class-level cache in finish_plan, once the
            # global plan has succeeded (as torch does).
            self._pending_local_plan = plan

        return self.plan

    def _dedup_save_plans(self, all_plans: list[SavePlan]) -> list[SavePlan]:
        return _d.dedup_save_plans(all_plans, self.dedup_save_to_lowest_rank)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """This rank's final plan (see ``DefaultSavePlanner.finish_plan``).

        A compact global plan is rebuilt from this rank's own write items,
        after checking that the columns the coordinator planned are the ones
        this rank sent (a plan changed in between raises
        :class:`~ckcore.compact.CompactPlanError` instead of being written).
        """
        if isinstance(new_plan.items, _c.GlobalWriteItems):
            new_plan = dataclasses.replace(
                new_plan, items=self._own_items(new_plan.items),
                planner_data=_plain(getattr(self.plan, "planner_data", None)))
        return super().finish_plan(new_plan)

    def _own_items(self, planned: _c.GlobalWriteItems) -> list[Any]:
        sent = getattr(self, "plan", None)
        items = getattr(sent, "items", None)
        if not isinstance(items, _c.SentWriteItems):
            raise CompactPlanError(
                "finish_plan: the coordinator returned a compact plan, but this rank's local "
                "plan was not sent compact (was create_local_plan's plan replaced?)")
        if items.current_parts(repack=True) != planned.parts:
            raise CompactPlanError(
                "finish_plan: this rank's write items differ from the ones it sent to the "
                "coordinator; refusing to write a plan the coordinator did not validate")
        own = items.packed_items()
        keep, hints = planned.arrays(len(own))
        out = []
        for i, item in enumerate(own):
            if keep is not None and not keep[i]:
                continue
            h = int(hints[i])
            if h >= 0:
                item = dataclasses.replace(item, index=dataclasses.replace(item.index, index=h))
            out.append(item)
        return out

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if _hook_is(self, "_dedup_save_plans", FastSavePlanner._dedup_save_plans):
            planned = self._plan_from_columns(all_plans)
            if planned is not None:
                return planned
            all_plans = [_materialised(p) for p in all_plans]
            # Dedup, global plan and validation in one pass over the items.
            # Validation does not read planner_data, so merging it after is
            # the same as torch's order.
            global_plan, metadata, validation_errors = _d._plan_global_save(
                all_plans, self.dedup_save_to_lowest_rank)
            if self.flatten_state_dict:
                merged_mappings = dict(ChainMap(*[p.planner_data for p in global_plan]))
                metadata = dataclasses.replace(metadata, planner_data=merged_mappings)
        else:
            # A subclass dedups its own way: torch's steps, in torch's order.
            all_plans = [_materialised(p) for p in all_plans]
            deduped_plans = self._dedup_save_plans(all_plans)
            global_plan, metadata = _d.create_default_global_save_plan(deduped_plans)

            if self.flatten_state_dict:
                merged_mappings = dict(ChainMap(*[p.planner_data for p in global_plan]))
                metadata = dataclasses.replace(metadata, planner_data=merged_mappings)

            validation_errors = _d._validate_global_plan(global_plan, metadata)
        if validation_errors:
            error_summary = "; ".join(validation_errors)
            if len(error_summary) > 500:
                error_summary = error_summary[:500] + "... (truncated)"
            raise ValueError(f"Failed to validate global plan: {error_summary}")

        return global_plan, metadata

    def _plan_from_columns(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata] | None:
        """The global plan from every rank's columns; None when a plan is not compact or the
        layout needs torch's object path (see :func:`ckcore.compact.plan_columns`)."""
        received = [_received(p) for p in all_plans]
        if not all_plans or any(r is None for r in received):
            return None
        tables: dict = {}
        cols = [cast(_c.WriteItemColumns, r).columns(tables) for r in received]
        with paused(promote=True):
            cp = plan_columns(cols, dedup=True, save_to_lowest_rank=self.dedup_save_to_lowest_rank,
                              itemsize=_itemsize)
            if cp is None:
                return None
            global_plan = [
                dataclasses.replace(p, items=cast(
                    list, _c.GlobalWriteItems.from_arrays(r.parts, k, h)))
                for p, r, k, h in zip(all_plans, cast(list, received), cp.keep, cp.hints)
            ]
            merged = None
            if self.flatten_state_dict:
                cache: dict = {}
                maps = [p.planner_data.as_dict(cache) if isinstance(p.planner_data, _c.MappingColumns)
                        else p.planner_data for p in global_plan]
                merged = merged_mapping(maps)
            metadata = _metadata_from_columns(cp, merged)
        return global_plan, metadata

    def _create_global_plan_with_caching(
        self, all_plans: list[SavePlan]
    ) -> tuple[list[SavePlan], list[SavePlan], Metadata]:
        key = self._cached_plans_key
        if key not in SavePlanner._cached_all_plans:
            # Cache only after the global plan validated, so a failure leaves no partial cache.
            global_plan, metadata = self._create_global_plan(all_plans)
            SavePlanner._cached_all_plans[key] = all_plans
            SavePlanner._cached_global_plan[key] = global_plan
            SavePlanner._cached_metadata[key] = metadata
            return global_plan, global_plan, metadata

        global_plan_delta: list[SavePlan] = []
        if not _d._contains_usable_plan(all_plans):
            global_plan_delta = [SavePlan([], usable=False)] * len(all_plans)
            global_plan = SavePlanner._cached_global_plan[key]
            metadata = SavePlanner._cached_metadata[key]
        else:
            merged_plans = _d._merge_delta_local_plans(
                SavePlanner._cached_all_plans[key], all_plans
            )
            SavePlanner._cached_all_plans[key] = merged_plans
            global_plan, metadata = self._create_global_plan(merged_plans)

            if key in self._cached_global_plan:
                for cached_plan, new_plan in zip(SavePlanner._cached_global_plan[key], global_plan):
                    if _same_plan(cached_plan, new_plan):
                        global_plan_delta.append(SavePlan([], usable=False))
                    else:
                        global_plan_delta.append(new_plan)

            SavePlanner._cached_global_plan[key] = global_plan
            SavePlanner._cached_metadata[key] = metadata

        return global_plan_delta, global_plan, metadata


class FastLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose local plan (the resharding reads) runs on ckcore's kernels.

    Takes ``DefaultLoadPlanner``'s arguments (``flatten_state_dict``,
    ``flatten_sharded_tensors``, ``allow_partial_load``) and one more,
    ``verify_metadata`` (default True): check that the planned reads fill
    every destination chunk of this rank exactly once (no hole, no two saved
    chunks writing the same element). torch does not check this, so a
    damaged ``.metadata`` that lost a chunk or moved one makes torch leave
    part of a destination tensor unwritten, and the load succeeds; here the
    plan fails, before a single byte is read, naming the tensor and the
    chunk. The check runs on the intersection arrays the plan is built from
    (that of :func:`ckcore.items.create_read_items` with ``verify_cover``, in
    the same compiled call that plans every tensor) and costs little.
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_partial_load: bool = False,
        verify_metadata: bool = True,
    ) -> None:
        super().__init__(
            flatten_state_dict=flatten_state_dict,
            flatten_sharded_tensors=flatten_sharded_tensors,
            allow_partial_load=allow_partial_load,
        )
        self.verify_metadata = verify_metadata

    def create_local_plan(self) -> LoadPlan:
        """This rank's read items (see ``DefaultLoadPlanner.create_local_plan``)."""
        if self.metadata is None:
            raise AssertionError("self.metadata is not None")
        # Columnar metadata answers from its columns: reading state_dict_metadata
        # would build every chunk object.
        cols = columns_of(self.metadata)
        if cols is None and not isinstance(getattr(self.metadata, "state_dict_metadata", None), dict):
            raise TypeError(
                f"checkpoint metadata is not a DCP Metadata (got {type(self.metadata).__name__}); "
                "the .metadata file is damaged or not a DCP checkpoint"
            )
        if self.flatten_state_dict:
            # Checkpoints saved before torch 2.4 flattened keys differently:
            # if keys are missing, try the old flattening, exactly as torch does.
            current_keys = set(self.state_dict.keys())
            load_keys = set(cols.fqns if cols is not None
                            else self.metadata.state_dict_metadata.keys())
            missing_keys = load_keys - current_keys
            if missing_keys:
                _version._derived_version = "2_3"
                try:
                    old_state_dict, old_mappings = flatten_state_dict(self.original_state_dict)
                finally:
                    _version._derived_version = None
                if set(old_state_dict.keys()) & missing_keys:
                    self.state_dict, self.mappings = old_state_dict, old_mappings

        plan = _d._local_load_plan(
            self.state_dict, self.metadata, not self.allow_partial_load, self.verify_metadata
        )
        # Items may stay only if nothing on the way reads them: the
        # coordinator plans as torch's default (plans unchanged) and this
        # class's finish_plan puts them back, neither overridden by the class
        # nor replaced on the instance.
        keeps = (_hook_is(self, "create_global_plan", DefaultLoadPlanner.create_global_plan)
                 and _hook_is(self, "finish_plan", FastLoadPlanner.finish_plan))
        plan = dataclasses.replace(plan, items=_c.LocalReadItems(
            plan.items, stay=keeps and _reader_keeps_items(sys._getframe(1)),
            coordinator_keeps=keeps))
        self._sent_items = plan.items
        return plan

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        """This rank's final plan: its own read items back in place of a ticket."""
        items = new_plan.items
        if isinstance(items, (_c.ReadItemsTicket, _c.LocalReadItems, _c.ReadItemColumns)):
            sent = getattr(self, "_sent_items", None)
            if isinstance(items, _c.ReadItemColumns):
                # Sent compact (another reader's coordinator step could read
                # them): what came back is used as it came, as torch would.
                return super().finish_plan(dataclasses.replace(new_plan, items=list(items)))
            if not (isinstance(sent, _c.LocalReadItems) and items.token == sent.token
                    and len(items) == len(sent) and sent.unchanged()):
                raise CompactPlanError(
                    "finish_plan: the coordinator returned a load plan whose items stayed on a "
                    "rank, but not this rank's, or this rank's items changed since")
            new_plan = dataclasses.replace(new_plan, items=list(sent))
        return super().finish_plan(new_plan)


def _load_step_code() -> Any:
    # The code of torch's ``_load_state_dict.<locals>.local_step``, which
    # calls ``planner.create_local_plan()`` and then the reader's
    # ``prepare_local_plan``; None if this torch does not have it.
    fn = inspect.unwrap(getattr(state_dict_loader, "_load_state_dict", None) or (lambda: None))
    for c in getattr(getattr(fn, "__code__", None), "co_consts", ()):
        if getattr(c, "co_name", None) == "local_step" and "storage_reader" in c.co_freevars:
            return c
    return None


_LOAD_STEP = _load_step_code()


def _reader_keeps_items(caller: Any) -> bool:
    """Does the storage reader ``dcp.load`` is using leave read items alone on the coordinator?

    The reader is the one in the calling frame of torch's own
    ``local_step``: a ``FileSystemReader`` (or subclass, such as
    ``RangeFileSystemReader``) whose ``prepare_global_plan`` is
    ``FileSystemReader``'s (it returns plans unchanged) and whose
    ``prepare_local_plan`` keeps the planner's list, neither overridden by
    its class nor replaced on the instance. Any other caller or reader gets
    the items in their compact form; ``RangeFileSystemReader`` also decides
    this itself in its ``prepare_local_plan``.
    """
    if _LOAD_STEP is None or caller.f_code is not _LOAD_STEP:
        return False
    reader = caller.f_locals.get("storage_reader")
    return (isinstance(reader, FileSystemReader)
            and _hook_is(reader, "prepare_local_plan", FileSystemReader.prepare_local_plan)
            and _hook_is(reader, "prepare_global_plan", FileSystemReader.prepare_global_plan))


def _hook_is(obj: Any, name: str, func: Any) -> bool:
    # ``obj.<name>`` is ``func`` bound to obj: not overridden by obj's class
    # nor replaced on the instance.
    return getattr(type(obj), name, None) is func and name not in getattr(obj, "__dict__", {})


def _compact_save_plan(plan: SavePlan) -> SavePlan:
    # The plan with items (and a flattening map) that pickle as columns, or
    # unchanged when its items are not all plain torch write items.
    cols = _c.write_columns(plan.items)
    if cols is None:
        return plan
    pd = plan.planner_data
    if type(pd) is dict:
        pd = _c.SentMapping(pd)
    return dataclasses.replace(plan, items=_c.SentWriteItems(plan.items, cols), planner_data=pd)


def _received(plan: SavePlan) -> _c.WriteItemColumns | None:
    # A plan's items as columns: as received through DCP's gather, or the
    # rank's own packed list when nothing was pickled (one process); None
    # when the plan is not compact or not usable.
    items = plan.items
    if not plan.usable:
        return None
    if type(items) is _c.WriteItemColumns:
        return items
    if type(items) is _c.SentWriteItems:
        parts = items.current_parts()
        return None if parts is None else _c.WriteItemColumns(parts)
    return None


def _same_plan(a: SavePlan, b: SavePlan) -> bool:
    # torch's _compare_save_plans; two compact global plans with the same
    # packed bytes hold equal items (packing is deterministic), so they are
    # compared without building every item.
    ia, ib = a.items, b.items
    if (isinstance(ia, _c.GlobalWriteItems) and isinstance(ib, _c.GlobalWriteItems)
            and a.usable == b.usable and ia.parts == ib.parts
            and ia.keep == ib.keep and ia.hints == ib.hints):
        return True
    return _d._compare_save_plans(a, b)


def _plain(pd: Any) -> Any:
    return dict(pd) if isinstance(pd, _c.SentMapping) else pd


def _materialised(plan: SavePlan) -> SavePlan:
    # torch's objects in place of received columns, for the object path.
    items, pd = plan.items, plan.planner_data
    if isinstance(items, _c.WriteItemColumns):
        items = list(items)
    if isinstance(pd, _c.MappingColumns):
        pd = dict(pd.as_dict())
    if items is plan.items and pd is plan.planner_data:
        return plan
    return dataclasses.replace(plan, items=items, planner_data=pd)


_ITEMSIZE: dict[str, int] = {}


def _itemsize(name: str) -> int:
    n = _ITEMSIZE.get(name)
    if n is None:
        n = _ITEMSIZE[name] = torch._utils._element_size(_c._torch_attr(name, torch.dtype))
    return n


def _metadata_from_columns(cp: ColumnPlan, planner_data: Any = None) -> Metadata:
    # torch's Metadata over the plan's columns: no chunk object is built
    # unless something reads state_dict_metadata (FastFileSystemWriter writes
    # .metadata from the columns).
    n = len(cp.fqns)
    props = [None if p is None else (p[0].removeprefix("torch."), p[1].removeprefix("torch."),
                                     p[2], p[3].removeprefix("torch."), p[4]) for p in cp.props]
    sizes = [() if p is None else p[5] for p in cp.props]
    size_ptr = np.zeros(n + 1, dtype=np.int64)
    if n:
        np.cumsum([len(s) for s in sizes], out=size_ptr[1:])
    cols = MetadataColumns(
        cp.fqns, kinds=[BYTES if p is None else TENSOR for p in cp.props], properties=props,
        size_ptr=size_ptr, size_values=[v for s in sizes for v in s], chunk_ptr=cp.chunk_ptr,
        chunk_offsets=cp.chunk_offsets, chunk_sizes=cp.chunk_sizes, storage_data_none=True,
        planner_data=planner_data)
    return ColumnarMetadata(cols)
