"""plan_global_save on ckcore's own objects, without torch.

The fused single pass (``_fused_plan.fused_save_plan``) must give exactly what
the three steps give in turn. tests/differential/test_plan_global_save.py checks that
against torch too; this module runs in the torch-free CI pass, so the fused
kernel is exercised where torch is absent.
"""

from __future__ import annotations

import gc
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckcore import metadata as cm
from ckcore import planner as cp
from ckcore.global_plan import (
    create_global_save_plan,
    dedup_save_plans,
    plan_global_save,
    validate_global_plan,
)


def item(kind, fqn, size=(), offsets=None, sizes=None, dtype="float32"):
    if kind == "bytes":
        return cp.WriteItem(index=cm.MetadataIndex(fqn), type=cp.WriteItemType.BYTE_IO)
    if kind == "tensor":
        offsets, sizes, typ = (0,) * len(size), size, cp.WriteItemType.TENSOR
    else:
        typ = cp.WriteItemType.SHARD
    return cp.WriteItem(
        index=cm.MetadataIndex(fqn, tuple(offsets)),
        type=typ,
        tensor_data=cp.TensorWriteData(
            chunk=cm.ChunkStorageMetadata(tuple(offsets), tuple(sizes)),
            properties=cm.TensorProperties(dtype=dtype),
            size=tuple(size),
        ),
    )


def steps(plans, dedup=True, lowest=False, rewrite=True):
    out = dedup_save_plans(plans, lowest) if dedup else list(plans)
    out, md = create_global_save_plan(out, rewrite)
    return out, md, validate_global_plan(out, md)


def hints(plans):
    return [[(i.index.fqn, i.index.offset, i.index.index) for i in p.items] for p in plans]


def assert_same(plans, **kw):
    flags = dict(dedup=kw.get("dedup", True), lowest=kw.get("lowest", False),
                 rewrite=kw.get("rewrite", True))
    exp = steps(plans, **flags)
    got = plan_global_save(plans, dedup=flags["dedup"], save_to_lowest_rank=flags["lowest"],
                           rewrite_index_hints=flags["rewrite"])
    assert got == exp
    assert hints(got[0]) == hints(exp[0])
    assert list(got[1].state_dict_metadata) == list(exp[1].state_dict_metadata)
    assert gc.isenabled()
    return got


@st.composite
def layouts(draw):
    """Sharded tensors split over the ranks (uneven: trailing empty shards are
    the same index on several ranks), replicated tensors and bytes, stray
    chunks that overlap, leave holes or fall out of bounds."""
    nranks = draw(st.integers(1, 9))
    ranks = [[] for _ in range(nranks)]
    for t in range(draw(st.integers(0, 6))):
        fqn = f"t{t}"
        ndim = draw(st.integers(0, 3))
        size = tuple(draw(st.integers(0, 7)) for _ in range(ndim))
        kind = draw(st.sampled_from(["shard", "shard", "tensor", "bytes"]))
        if kind == "shard" and ndim:
            step = -(-size[0] // nranks) if size[0] else 0
            for r in range(nranks):
                lo = min(r * step, size[0])
                hi = min(lo + step, size[0])
                ranks[r].append(item("shard", fqn, size, (lo,) + (0,) * (ndim - 1),
                                     (hi - lo,) + size[1:]))
            if draw(st.booleans()):
                o = tuple(draw(st.integers(-1, 8)) for _ in range(ndim))
                s = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
                ranks[draw(st.integers(0, nranks - 1))].append(item("shard", fqn, size, o, s))
        elif kind == "bytes":
            for r in draw(st.sets(st.integers(0, nranks - 1), min_size=1)):
                ranks[r].append(item("bytes", fqn))
        else:
            for r in draw(st.sets(st.integers(0, nranks - 1), min_size=1)):
                ranks[r].append(item("tensor", fqn, size))
    return [cp.SavePlan(r) for r in ranks]


@settings(max_examples=200, deadline=None)
@given(layouts(), st.booleans(), st.booleans(), st.booleans())
def test_random_layouts_match_the_three_steps(plans, dedup, lowest, rewrite):
    logging.disable(logging.WARNING)
    try:
        try:
            exp = steps(plans, dedup, lowest, rewrite)
        except (AssertionError, TypeError, ValueError) as ex:
            with pytest.raises(type(ex)) as got:
                plan_global_save(plans, dedup=dedup, save_to_lowest_rank=lowest,
                                 rewrite_index_hints=rewrite)
            assert str(got.value) == str(ex)
            return
        assert exp is not None
        assert_same(plans, dedup=dedup, lowest=lowest, rewrite=rewrite)
    finally:
        logging.disable(logging.NOTSET)


def test_empty_inputs():
    assert plan_global_save([]) == ([], cm.Metadata({}), [])
    assert_same([cp.SavePlan([]), cp.SavePlan([])])


def test_trailing_empty_shards_deduped_and_hints_renumbered():
    # 10 rows in steps of 3 over 6 ranks: rows 0-3, 3-6, 6-9, 9-10, and ranks 4
    # and 5 hold the same empty shard at row 10, which dedup keeps once.
    plans = [cp.SavePlan([item("shard", "w", (10, 2), (min(3 * r, 10), 0),
                               (max(0, min(3, 10 - 3 * r)), 2))]) for r in range(6)]
    out, md, errors = assert_same(plans)
    assert errors == []
    assert [c.offsets for c in md.state_dict_metadata["w"].chunks] == [
        (0, 0), (3, 0), (6, 0), (9, 0), (10, 0)]
    assert [i.index.index for p in out for i in p.items] == [0, 1, 2, 3, 4]


def test_first_holder_deduped_away_moves_the_metadata_entry():
    # "r" is replicated on ranks 0 and 1; when dedup reaches it rank 0 already
    # holds "big", so rank 1 keeps it and "r" comes after "a" in the metadata,
    # as in the three steps.
    plans = [cp.SavePlan([item("tensor", "big", (1000,)), item("tensor", "r", (2,))]),
             cp.SavePlan([item("tensor", "a", (1,)), item("tensor", "r", (2,))])]
    out, md, _ = assert_same(plans)
    assert list(md.state_dict_metadata) == ["big", "a", "r"]
    assert [i.index.fqn for i in out[1].items] == ["a", "r"]


def test_findings_reported_in_order():
    plans = [cp.SavePlan([item("shard", "w", (4, 4), (0, 0), (3, 4))]),
             cp.SavePlan([item("shard", "w", (4, 4), (2, 0), (2, 4)),
                          item("shard", "v", (2,), (1,), (5,))])]
    _, _, errors = assert_same(plans)
    assert [e.split(" has ")[0] if " has " in e else e.split(" invalid")[0] for e in errors] == [
        "key:w", "key:w", "key:v", "key:v"]
    assert "overlapping" in errors[0] and "invalid fill" in errors[1]
    assert "out of bounds" in errors[2] and "invalid fill" in errors[3]


def test_mixed_item_types_on_one_fqn_raise_as_the_steps_do():
    plans = [cp.SavePlan([item("tensor", "x", (2,))]), cp.SavePlan([item("bytes", "x")])]
    with pytest.raises(AssertionError) as exp:
        steps(plans)
    with pytest.raises(AssertionError) as got:
        plan_global_save(plans)
    assert str(got.value) == str(exp.value)
    assert gc.isenabled()


def test_bad_chunk_values_raise_as_the_steps_do():
    plans = [cp.SavePlan([item("shard", "w", (4,), (0,), (2,))]),
             cp.SavePlan([item("shard", "w", (4,), (2**63 - 1,), (2,))])]
    with pytest.raises(ValueError) as exp:
        steps(plans)
    with pytest.raises(ValueError) as got:
        plan_global_save(plans)
    assert str(got.value) == str(exp.value) and "w" in str(got.value)


def test_not_plans_raise_type_error():
    with pytest.raises(TypeError, match="not a SavePlan"):
        plan_global_save([object()])
