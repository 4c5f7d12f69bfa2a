"""The columnar dedup kernel (``dedup_columns``) against torch's rule written out in Python.

Torch-free. With dense fqn ids (what ``plan_columns`` passes) the kernel
works per fqn: an fqn whose keys never decrease in item order skips
hashing (an equal key is the previous item's entry), the others are
hashed in a table of their own. Sparse ids take a
single table over every item. Both must give torch's keepers, for keys
that are disjoint (sharded tensors), repeated (replicated tensors,
trailing empty chunks that share an offset), out of order, of mixed
dimensions, bytes items and 0-d tensors, and for hostile layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckcore._kernels._plan_columns import chunk_rows, dedup_columns


def reference(items, nplans, lowest):
    """torch's ``dedup_save_plans`` keepers: items are ``(plan, fid, offsets or None, size)``.

    Returns the keep flags and whether two items share a key (the kernel's
    ``duplicated``).
    """
    holders: dict = {}
    last_size: dict = {}
    for plan, fid, offs, size in items:
        key = (fid, offs)
        holders.setdefault(key, [])
        if plan not in holders[key]:
            holders[key].append(plan)
        last_size[key] = size
    total = [0] * nplans
    keeper = {}
    for key, hs in holders.items():
        c = min(hs) if lowest else min(hs, key=lambda h: (total[h], h))
        total[c] += last_size[key]
        keeper[key] = c
    keep = np.array([keeper[(fid, offs)] == plan for plan, fid, offs, _ in items], np.uint8)
    return keep, len(holders) < len(items)


def columns(items):
    fid = np.array([it[1] for it in items], np.int64)
    plan = np.array([it[0] for it in items], np.int32)
    nd = np.array([-1 if it[2] is None else len(it[2]) for it in items], np.int32)
    flat = [v for it in items if it[2] is not None for v in it[2]]
    offs = np.array(flat, np.int64)
    ptr = np.zeros(len(items), np.int64)
    if len(items) > 1:
        np.cumsum(np.maximum(nd, 0)[:-1], out=ptr[1:])
    size = np.array([it[3] for it in items], np.int64)
    return fid, plan, nd, ptr, offs, size


def check(items, nplans, lowest=False):
    items = sorted(items, key=lambda it: it[0])  # plan order; stable within a plan
    want = reference(items, nplans, lowest)
    fid, plan, nd, ptr, offs, size = columns(items)
    got = dedup_columns(fid, plan, nd, ptr, offs, size, nplans, lowest)
    assert got is not None
    assert got[0].tolist() == want[0].tolist() and got[1] == want[1]
    # The same items with sparse fqn ids take the single-table path.
    sparse = fid * (len(items) + 7) - 3
    got2 = dedup_columns(sparse, plan, nd, ptr, offs, size, nplans, lowest)
    assert got2 is not None
    assert got2[0].tolist() == want[0].tolist() and got2[1] == want[1]
    return got


def fsdp(world, shapes, rows_of=lambda s: s[0]):
    # torch.chunk-style row shards; trailing ranks of a short tensor share offset (rows, 0...).
    items = []
    for r in range(world):
        for f, shape in enumerate(shapes):
            step = -(-rows_of(shape) // world)
            lo = min(r * step, shape[0])
            items.append((r, f, (lo,) + (0,) * (len(shape) - 1), 1 + f))
    return items


@pytest.mark.parametrize("lowest", [False, True])
def test_sharded_keys_are_kept_everywhere(lowest):
    keep, dup = check(fsdp(8, [(64, 4), (16,), (8, 2, 2)]), 8, lowest)
    assert keep.all() and not dup


@pytest.mark.parametrize("lowest", [False, True])
def test_trailing_empty_chunks_share_a_key(lowest):
    # 3 rows on 8 ranks: ranks 3..7 all hold offset (3, 0).
    keep, dup = check(fsdp(8, [(64, 4), (3, 4)]), 8, lowest)
    assert dup and keep.sum() == 8 + 4


@pytest.mark.parametrize("lowest", [False, True])
def test_replicated_tensors(lowest):
    items = [(r, f, (0, 0), 10 + f) for r in range(6) for f in range(5)]
    items += [(r, 5, (r * 2,), 3) for r in range(6)]
    keep, dup = check(items, 6, lowest)
    assert dup


def test_keys_out_of_order_but_distinct():
    items = [(r, 0, (40 - 4 * r, 0), 5) for r in range(10)]
    keep, dup = check(items, 10)
    assert keep.all() and not dup


def test_fqn_that_decreases_after_repeated_keys_is_hashed_from_its_start():
    # Repeats first (the table-free path numbers them), then a smaller key.
    keys = [0, 0, 2, 2, 1, 0, 2, 3, 3]
    items = [(r, 0, (k, 0), 4) for r, k in enumerate(keys)]
    items += [(r, 1, (r,), 2) for r in range(len(keys))]
    for lowest in (False, True):
        keep, dup = check(items, len(keys), lowest)
        assert dup and keep.sum() == 4 + len(keys)


def test_two_d_grid_in_rank_order_is_ordered():
    items = [(2 * a + b, 0, (4 * a, 4 * b), 16) for a in range(4) for b in range(2)]
    keep, dup = check(items, 8)
    assert keep.all() and not dup


def test_bytes_items_and_scalars():
    items = [(0, 0, None, 1), (1, 0, None, 1), (0, 1, (), 4), (2, 1, (), 4),
             (2, 2, None, 1), (2, 3, (), 8)]
    check(items, 3)
    check(items, 3, lowest=True)


def test_same_fqn_with_different_dimensions_are_different_keys():
    items = [(0, 0, (0,), 4), (1, 0, (0, 0), 4), (2, 0, (0,), 4), (2, 0, None, 1)]
    check(items, 3)


def test_one_fqn_replicated_on_every_rank():
    items = [(r, 0, (0, 0, 0), 7) for r in range(500)]
    keep, dup = check(items, 500)
    assert keep.sum() == 1 and dup


def test_many_fqns_with_negative_ids():
    items = [(r, f - 20, (r,), 2) for r in range(3) for f in range(40)]
    items += [(3, -20, (0,), 2)]
    check(items, 4)


def test_empty_and_single():
    e = np.zeros(0, np.int64)
    keep, dup = dedup_columns(e, np.zeros(0, np.int32), np.zeros(0, np.int32), e, e, e, 1, False)
    assert len(keep) == 0 and not dup
    check([(0, 0, (0,), 1)], 1)


def test_colliding_offsets_within_one_fqn_stay_exact():
    # Offsets that differ only in high bits, in an order that is not increasing.
    items = [(r % 4, 0, ((r * 7919 % 64) << 40, 1), 3) for r in range(256)]
    items.sort(key=lambda it: it[0])
    check(items, 4)


@st.composite
def layouts(draw):
    nplans = draw(st.integers(1, 6))
    items = []
    for plan in range(nplans):
        for _ in range(draw(st.integers(0, 8))):
            fid = draw(st.integers(0, 4))
            if draw(st.integers(0, 9)) == 0:
                offs = None
            else:
                offs = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
            items.append((plan, fid, offs, draw(st.integers(1, 50))))
    return items, nplans


@settings(max_examples=400, deadline=None)
@given(layouts(), st.booleans())
def test_random_layouts_match_torchs_rule(layout, lowest):
    items, nplans = layout
    check(items, nplans, lowest)


# ------------------------------------------------------------------ chunk_rows


def rows_input(items):
    """Items ``(fid, kind, pid, offsets or None, sizes or None)`` as chunk_rows' columns."""
    fid = np.array([it[0] for it in items], np.int64)
    kind = np.array([it[1] for it in items], np.int8)
    pid = np.array([it[2] for it in items], np.int64)
    nd = np.array([-1 if it[3] is None else len(it[3]) for it in items], np.int64)
    offs = np.array([v for it in items if it[3] is not None for v in it[3]], np.int64)
    sizes = np.array([v for it in items if it[4] is not None for v in it[4]], np.int64)
    ptr = np.zeros(len(items), np.int64)
    if len(items) > 1:
        np.cumsum(np.maximum(nd, 0)[:-1], out=ptr[1:])
    return fid, kind, pid, nd, ptr, offs, sizes


def test_chunk_rows_orders_fqns_by_first_kept_item_and_numbers_hints():
    items = [(2, 1, 0, (0, 0), (2, 4)), (0, 2, -1, None, None), (1, 1, 1, (0,), (3,)),
             (2, 1, 0, (2, 0), (2, 4)), (1, 1, 1, (3,), (3,)), (2, 1, 0, (4, 0), (2, 4))]
    keep = np.array([1, 1, 0, 1, 1, 1], np.uint8)
    order, pids, row_ptr, val_ptr, co, cs, hints = chunk_rows(*rows_input(items), keep, 3)
    assert order.tolist() == [2, 0, 1] and pids.tolist() == [0, -1, 1]
    assert row_ptr.tolist() == [0, 3, 3, 4] and val_ptr.tolist() == [0, 6, 6, 7]
    assert co.tolist() == [0, 0, 2, 0, 4, 0, 3] and cs.tolist() == [2, 4] * 3 + [3]
    assert hints.tolist() == [0, -1, -1, 1, 0, 2]


def test_chunk_rows_leaves_layouts_it_does_not_cover_to_torch():
    shard, tensor = 1, 0
    # Two kept non-shard items of one fqn.
    assert chunk_rows(*rows_input([(0, tensor, 0, (0,), (4,)), (0, tensor, 0, (0,), (4,))]),
                      None, 1) is None
    # Items of one fqn with different props.
    assert chunk_rows(*rows_input([(0, shard, 0, (0,), (2,)), (0, shard, 1, (2,), (2,))]),
                      None, 1) is None
    # A dropped non-shard duplicate is fine.
    got = chunk_rows(*rows_input([(0, tensor, 0, (0,), (4,)), (0, tensor, 0, (0,), (4,))]),
                     np.array([0, 1], np.uint8), 1)
    assert got is not None and got[6].tolist() == [-1, 0]


def test_chunk_rows_refuses_inconsistent_columns():
    cols = list(rows_input([(0, 1, 0, (0, 0), (2, 2)), (1, 1, 1, (0,), (2,))]))
    with pytest.raises(ValueError, match="out of range"):
        chunk_rows(*cols, None, 1)
    bad = list(cols)
    bad[4] = np.array([0, 3], np.int64)  # second item's values past the end
    with pytest.raises(ValueError, match="outside"):
        chunk_rows(*bad, None, 2)
    bad = list(cols)
    bad[1] = np.array([1, 3], np.int8)
    with pytest.raises(ValueError, match="kind"):
        chunk_rows(*bad, None, 2)
    with pytest.raises(ValueError, match="keep"):
        chunk_rows(*cols, np.ones(5, np.uint8), 2)
    with pytest.raises(ValueError, match="one entry per item"):
        chunk_rows(cols[0][:1], *cols[1:], None, 2)
    # Same fqn and props id, but a different value count (columns that lie).
    bad = list(rows_input([(0, 1, 0, (0, 0), (2, 2)), (0, 1, 0, (2,), (2,))]))
    with pytest.raises(ValueError, match="value counts"):
        chunk_rows(*bad, None, 1)


def test_chunk_rows_of_nothing():
    e = np.zeros(0, np.int64)
    order, pids, row_ptr, val_ptr, co, cs, hints = chunk_rows(
        e, np.zeros(0, np.int8), e, e, e, e, e, None, 0)
    assert len(order) == 0 and row_ptr.tolist() == [0] and len(hints) == 0
