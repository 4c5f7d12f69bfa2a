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
import logging
from collections import ChainMap

from torch.distributed.checkpoint import _version
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, SavePlanner

from . import dropins as _d
from ._lazy_metadata import columns_of

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

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if type(self)._dedup_save_plans is FastSavePlanner._dedup_save_plans:
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
                    if _d._compare_save_plans(cached_plan, new_plan):
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
    (:func:`ckcore.items.create_read_items` with ``verify_cover``) and costs little.
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

        return _d._local_load_plan(
            self.state_dict, self.metadata, not self.allow_partial_load, self.verify_metadata
        )
