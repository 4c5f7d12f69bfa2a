"""Differential tests of create_global_save_plan against torch's create_default_global_save_plan.

torch gets its own objects; ckcore gets torch's objects (and must return
torch's classes, equal objects and the same index hints) and ckcore's own
(and must return the same values in ckcore's classes).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

from ckcore import metadata as cm
from ckcore import planner as cp
from ckcore.global_plan import create_global_save_plan
from tests.support.gp_cases import TORCH_TYPES, ck_plans, item_key, md_key, torch_item, torch_plans


@st.composite
def rank_specs(draw):
    """Per-rank item specs: sharded tensors (even or uneven, some empty), replicated
    whole tensors on one rank, bytes on one rank (non-shard fqns must be unique)."""
    nranks = draw(st.integers(1, 6))
    ranks = [[] for _ in range(nranks)]
    for t in range(draw(st.integers(0, 5))):
        fqn = f"layer{t}.w"
        dtype = draw(st.sampled_from(["float32", "bfloat16", "int8"]))
        ndim = draw(st.integers(1, 3))
        size = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
        kind = draw(st.sampled_from(["shard", "shard", "tensor", "bytes"]))
        if kind == "shard":
            step = -(-size[0] // nranks) if size[0] else 0
            for r in range(nranks):
                lo = min(r * step, size[0])
                hi = min(lo + step, size[0])
                ranks[r].append(("shard", fqn, size, dtype, (lo, *([0] * (ndim - 1))),
                                 (hi - lo, *size[1:])))
        elif kind == "tensor":
            ranks[draw(st.integers(0, nranks - 1))].append(("tensor", fqn, size, dtype))
        else:
            ranks[draw(st.integers(0, nranks - 1))].append(("bytes", fqn))
    for r in ranks:
        draw(st.randoms()).shuffle(r)
    return ranks


def assert_same(specs, rewrite):
    exp_plans, exp_md = create_default_global_save_plan(torch_plans(specs), rewrite)

    got_plans, got_md = create_global_save_plan(torch_plans(specs), rewrite, types=TORCH_TYPES)
    assert got_md == exp_md and type(got_md) is tm.Metadata
    assert got_plans == exp_plans
    for gp, ep in zip(got_plans, exp_plans):
        assert type(gp) is tp.SavePlan
        # index hints are excluded from ==: compare them (and the classes) apart.
        assert [item_key(i) for i in gp.items] == [item_key(i) for i in ep.items]
        assert all(type(i) is tp.WriteItem and type(i.index) is tm.MetadataIndex for i in gp.items)
        for i in gp.items:
            if i.index.offset is not None:
                assert type(i.index.offset) is torch.Size

    ck_got_plans, ck_md = create_global_save_plan(ck_plans(specs), rewrite)
    assert type(ck_md) is cm.Metadata
    assert md_key(ck_md) == md_key(exp_md)
    for gp, ep in zip(ck_got_plans, exp_plans):
        assert type(gp) is cp.SavePlan
        assert [item_key(i) for i in gp.items] == [item_key(i) for i in ep.items]
        assert all(type(i) is cp.WriteItem for i in gp.items)


@settings(max_examples=120, deadline=None)
@given(rank_specs(), st.booleans())
def test_random_plans_match_torch(specs, rewrite):
    assert_same(specs, rewrite)


def test_many_ranks_replicated_and_bytes():
    n = 64
    specs = [[("shard", "w", (128, 4), "bfloat16", (2 * r, 0), (2, 4))] for r in range(n)]
    specs[0].append(("bytes", "extra"))
    specs[5].append(("tensor", "bias", (7,), "float32"))
    assert_same(specs, True)


def test_input_hints_are_rewritten_and_inputs_untouched():
    plans = [tp.SavePlan([torch_item(("shard", "w", (4,), "float32", (2 * r,), (2,)), hint=99)])
             for r in range(2)][::-1]
    before = [p.items[0].index.index for p in plans]
    out, md = create_global_save_plan(plans, types=TORCH_TYPES)
    assert [p.items[0].index.index for p in out] == [0, 1]
    assert [p.items[0].index.index for p in plans] == before
    assert md.state_dict_metadata["w"].chunks[0].offsets == (2,)


def test_plan_fields_preserved():
    plan = dataclasses.replace(torch_plans([[("bytes", "b")]])[0], storage_data="s",
                               planner_data={"x": 1}, usable=False)
    (out,), _ = create_global_save_plan([plan], types=TORCH_TYPES)
    assert (out.storage_data, out.planner_data, out.usable) == ("s", {"x": 1}, False)


@pytest.mark.parametrize("dup", [("bytes", "x"), ("tensor", "x", (2,), "float32")])
def test_duplicate_non_shard_fqn_raises_like_torch(dup):
    specs = [[("bytes", "x")], [dup]]
    with pytest.raises(AssertionError) as exp:
        create_default_global_save_plan(torch_plans(specs))
    with pytest.raises(AssertionError) as got:
        create_global_save_plan(torch_plans(specs), types=TORCH_TYPES)
    assert str(got.value) == str(exp.value)
    with pytest.raises(AssertionError):
        create_global_save_plan(ck_plans(specs))


def test_shard_after_bytes_on_one_fqn_raises_attribute_error_like_torch():
    # Every object is a valid plan, item and index: torch's own AttributeError
    # (the bytes entry has no .chunks) comes through, not a TypeError about
    # wrong objects.
    specs = [[("bytes", "x")], [("shard", "x", (2,), "float32", (0,), (2,))]]
    with pytest.raises(AttributeError) as exp:
        create_default_global_save_plan(torch_plans(specs))
    with pytest.raises(AttributeError) as got:
        create_global_save_plan(torch_plans(specs), types=TORCH_TYPES)
    assert str(got.value) == str(exp.value)


def test_missing_chunk_raises_like_torch():
    item = torch_item(("shard", "w", (4,), "float32", (0,), (4,)))
    bad = dataclasses.replace(item, tensor_data=dataclasses.replace(item.tensor_data, chunk=None))
    with pytest.raises(AssertionError) as exp:
        create_default_global_save_plan([tp.SavePlan([bad])])
    with pytest.raises(AssertionError) as got:
        create_global_save_plan([tp.SavePlan([bad])], types=TORCH_TYPES)
    assert str(got.value) == str(exp.value)


def test_missing_tensor_data_raises_like_torch():
    bad = tp.WriteItem(index=tm.MetadataIndex("w", (0,)), type=tp.WriteItemType.SHARD)
    with pytest.raises(AssertionError) as exp:
        create_default_global_save_plan([tp.SavePlan([bad])])
    with pytest.raises(AssertionError) as got:
        create_global_save_plan([tp.SavePlan([bad])], types=TORCH_TYPES)
    assert str(got.value) == str(exp.value)


def test_unknown_item_type_raises_type_error():
    bad = cp.WriteItem(index=cm.MetadataIndex("w"), type="SHARD")
    with pytest.raises(TypeError, match="unknown write item type"):
        create_global_save_plan([cp.SavePlan([bad])])


def test_slots_classes_fall_back_to_replace():
    @dataclasses.dataclass(frozen=True, slots=True)
    class SlotPlan:
        items: list
        usable: bool = True

    plans = [SlotPlan([cp.WriteItem(index=cm.MetadataIndex("b"), type=cp.WriteItemType.BYTE_IO)])]
    out, md = create_global_save_plan(plans)
    assert type(out[0]) is SlotPlan and out[0].items == plans[0].items
    assert isinstance(md.state_dict_metadata["b"], cm.BytesStorageMetadata)


def test_gc_state_restored():
    import gc

    plans = [cp.SavePlan([cp.WriteItem(index=cm.MetadataIndex("b"), type=cp.WriteItemType.BYTE_IO)])]
    assert gc.isenabled()
    create_global_save_plan(plans)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        create_global_save_plan(plans)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(AssertionError):
        create_global_save_plan(plans * 2)  # duplicate bytes fqn
    assert gc.isenabled()
