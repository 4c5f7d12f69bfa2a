"""Global planning refuses objects that are not plans, items or metadata with a TypeError.

Not an AttributeError from deep inside a kernel: the message names the
function, the plan (rank) and the item. Torch-free.
"""

from __future__ import annotations

import pytest

import ckcore


@pytest.mark.parametrize("fn", [ckcore.dedup_save_plans, ckcore.create_global_save_plan])
def test_plan_that_is_not_a_plan(fn):
    good = ckcore.SavePlan([ckcore.create_write_item_for_bytesio("a")])
    with pytest.raises(TypeError, match=r"plan 1 is a object, not a SavePlan"):
        fn([good, object()])


@pytest.mark.parametrize("fn", [ckcore.dedup_save_plans, ckcore.create_global_save_plan])
def test_item_that_is_not_an_item(fn):
    plan = ckcore.SavePlan([ckcore.create_write_item_for_bytesio("a"), "not an item"])
    with pytest.raises(TypeError, match=r"plan 0 item 1 \(str\) is not a WriteItem"):
        fn([plan])


def test_validate_wrong_metadata_and_plans():
    with pytest.raises(TypeError, match="metadata must be a Metadata"):
        ckcore.validate_global_plan([], {"w": 1})
    with pytest.raises(TypeError, match="global_plan must be a list of SavePlans"):
        ckcore.validate_global_plan(42, ckcore.Metadata({}))
