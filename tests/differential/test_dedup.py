"""Differential tests of dedup_save_plans against torch's dedup_save_plans.

On up to 8 ranks torch's tie-break (min over a Python set) is the lowest rank
and the results must be identical; with save_to_lowest_rank they must be
identical on any number of ranks. Beyond 8 ranks with size ties, ckcore is
checked against torch's algorithm with the set replaced by a sorted list.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as torch_dedup

from ckcore import metadata as cm
from ckcore import planner as cp
from ckcore.global_plan import dedup_save_plans
from tests.support.gp_cases import ck_plans, item_key, torch_plans


@st.composite
def rank_specs(draw, max_ranks=8):
    """Replicated tensors on random rank subsets, sharded tensors, bytes items,
    empty tensors, the same index twice on one rank."""
    nranks = draw(st.integers(1, max_ranks))
    ranks = [[] for _ in range(nranks)]
    for t in range(draw(st.integers(0, 8))):
        fqn = f"t{t}"
        dtype = draw(st.sampled_from(["float32", "bfloat16", "int8", "float64", "complex64"]))
        size = tuple(draw(st.integers(0, 6)) for _ in range(draw(st.integers(0, 3))))
        kind = draw(st.sampled_from(["replicated", "replicated", "shard", "bytes"]))
        holders = draw(st.lists(st.integers(0, nranks - 1), min_size=1, max_size=nranks))
        for r in holders:
            if kind == "replicated":
                ranks[r].append(("tensor", fqn, size, dtype))
            elif kind == "bytes":
                ranks[r].append(("bytes", fqn))
            else:
                n = size[0] if size else 0
                ranks[r].append(("shard", fqn, size, dtype, (0,) * len(size), size)
                                if not size else
                                ("shard", fqn, size, dtype, (r % max(n, 1),) + (0,) * (len(size) - 1),
                                 (min(1, n),) + size[1:]))
    for r in ranks:
        draw(st.randoms()).shuffle(r)
    return ranks


def keys(plans):
    return [[item_key(i) for i in p.items] for p in plans]


def assert_same(specs, lowest):
    tplans = torch_plans(specs)
    exp = torch_dedup(tplans, lowest)
    got = dedup_save_plans(torch_plans(specs), lowest)
    assert got == exp
    assert all(type(p) is tp.SavePlan for p in got)
    got_c = dedup_save_plans(ck_plans(specs), lowest)
    assert all(type(p) is cp.SavePlan for p in got_c)
    assert keys(got_c) == keys(exp)


@settings(max_examples=150, deadline=None)
@given(rank_specs(), st.booleans())
def test_random_plans_match_torch(specs, lowest):
    assert_same(specs, lowest)


@settings(max_examples=40, deadline=None)
@given(rank_specs(max_ranks=40))
def test_lowest_rank_many_ranks_match_torch(specs):
    assert_same(specs, True)


def sorted_set_reference(all_plans, save_to_lowest_rank=False):
    """torch's algorithm, with the rank set iterated in ascending order."""
    holders = defaultdict(set)
    item_of = {}
    keep = [{i.index for i in p.items} for p in all_plans]
    for p, plan in enumerate(all_plans):
        for item in plan.items:
            holders[item.index].add(p)
            item_of[item.index] = item
    size = [0] * len(all_plans)
    for idx, hs in holders.items():
        order = sorted(hs)
        sel = order[0] if save_to_lowest_rank else min(order, key=lambda p: size[p])
        size[sel] += item_of[idx].tensor_storage_size() or 1
        for p in hs - {sel}:
            keep[p].discard(idx)
    return [dataclasses.replace(p, items=[i for i in p.items if i.index in k])
            for p, k in zip(all_plans, keep)]


@settings(max_examples=40, deadline=None)
@given(rank_specs(max_ranks=40))
def test_many_ranks_ties_to_lowest_rank(specs):
    exp = sorted_set_reference(torch_plans(specs))
    assert dedup_save_plans(torch_plans(specs)) == exp
    assert keys(dedup_save_plans(ck_plans(specs))) == keys(exp)


def test_1024_ranks_replicated_and_sharded():
    specs = []
    for r in range(1024):
        items = [("tensor", f"rep{t}", (64, 8 + t), "bfloat16") for t in range(6)]
        items += [("shard", "w", (1024, 4), "float32", (r, 0), (1, 4)), ("bytes", "meta")]
        specs.append(items)
    exp = sorted_set_reference(torch_plans(specs))
    got = dedup_save_plans(torch_plans(specs))
    assert got == exp
    # Every replicated item survives exactly once, every shard stays home.
    assert sum(len(p.items) for p in got) == 6 + 1024 + 1


def test_duplicate_index_within_one_plan_kept_together():
    specs = [[("tensor", "a", (4,), "float32"), ("tensor", "a", (4,), "float32")],
             [("tensor", "a", (4,), "float32")]]
    assert_same(specs, False)


def test_huge_tensor_sizes_exact():
    # numel * itemsize beyond int64: Python-int fallback, still torch's answer.
    big = (2**40, 2**30)
    specs = [[("tensor", "huge", big, "float64"), ("tensor", "x", (3,), "float32")],
             [("tensor", "huge", big, "float64"), ("tensor", "x", (3,), "float32")]]
    assert_same(specs, False)


def test_custom_tensor_storage_size_is_called():
    @dataclasses.dataclass(frozen=True)
    class Heavy(cp.WriteItem):
        def tensor_storage_size(self):
            return 10**6 if self.index.fqn == "a" else 1

    def item(fqn):
        return Heavy(index=cm.MetadataIndex(fqn), type=cp.WriteItemType.BYTE_IO)

    plans = [cp.SavePlan([item("a"), item("b")]), cp.SavePlan([item("a"), item("b")])]
    out = dedup_save_plans(plans)
    # "a" goes to rank 0 (tie), which then weighs 10**6: "b" goes to rank 1.
    assert [[i.index.fqn for i in p.items] for p in out] == [["a"], ["b"]]


def test_dimension_beyond_int64_falls_back_to_torchs_arithmetic():
    # One dimension of the duplicated tensor is past int64 on its own (not
    # only the product): the exact Python-int fallback, still torch's answer.
    for big in ((2**63,), (3, 2**64 + 5), (2**70, 0)):
        specs = [[("tensor", "huge", big, "float32"), ("tensor", "x", (3,), "float32")],
                 [("tensor", "huge", big, "float32"), ("tensor", "x", (3,), "float32")],
                 [("tensor", "x", (3,), "float32")]]
        assert_same(specs, False)
        assert_same(specs, True)
