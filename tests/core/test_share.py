"""Who reads what under shared reads (ckcore.share.plan_shared_reads), torch-free.

Properties over hypothesis layouts (ranks needing random, often overlapping
or identical boxes of a few small saved chunks): every needed element of a
shared chunk is in exactly one piece; a piece's needers are exactly the
ranks whose boxes hold it and its reader is one of them; no round exceeds
the budget unless one piece alone does; the plan is the same whatever the
order or repetition of the rows (so every rank, computing it from the same
all-gathered rows, agrees).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckcore.share import plan_shared_reads, split_box

NDIM = 2


@st.composite
def layouts(draw):
    world = draw(st.integers(1, 5))
    n_chunks = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.integers(1, 7)) for _ in range(NDIM)) for _ in range(n_chunks)]
    itemsizes = [draw(st.sampled_from([1, 2, 4, 8])) for _ in range(n_chunks)]
    rows = []
    for _ in range(draw(st.integers(0, 10))):
        c = draw(st.integers(0, n_chunks - 1))
        r = draw(st.integers(0, world - 1))
        off = [draw(st.integers(0, s)) for s in shapes[c]]
        ln = [draw(st.integers(0, s - o)) for s, o in zip(shapes[c], off)]
        rows.append([r, c, *off, *ln])
        if draw(st.booleans()):  # a replica needing the same box
            rows.append([draw(st.integers(0, world - 1)), c, *off, *ln])
    return world, shapes, itemsizes, rows


def _arr(rows):
    return np.array(rows, dtype=np.int64).reshape(len(rows), 2 + 2 * NDIM)


def _plan(world, itemsizes, rows, **kw):
    return plan_shared_reads(_arr(rows), itemsizes, world, **kw)


def _need(world, shape, rows, c):
    """need[r]: the elements rank r needs of chunk c."""
    need = np.zeros((world, *shape), dtype=bool)
    for r, cc, *box in rows:
        if cc == c:
            need[(r, *(slice(o, o + n) for o, n in zip(box[:NDIM], box[NDIM:])))] = True
    return need


@settings(max_examples=300)
@given(layouts(), st.sampled_from([1, 64, 1 << 20]), st.sampled_from([16, 100, 1 << 20]))
def test_every_needed_element_is_read_once_by_a_rank_that_needs_it(layout, min_piece, budget):
    world, shapes, itemsizes, rows = layout
    p = _plan(world, itemsizes, rows, min_piece_bytes=min_piece, exchange_bytes=budget)
    shared = set(p.shared_chunks.tolist())
    for c, shape in enumerate(shapes):
        need = _need(world, shape, rows, c)
        needers = need.sum(axis=0)
        assert (c in shared) == (int(needers.max()) >= 2)
        count = np.zeros(shape, dtype=np.int64)
        for i in np.flatnonzero(p.chunk == c):
            sl = tuple(slice(o, o + n) for o, n in zip(p.offsets[i], p.lengths[i]))
            count[sl] += 1
            who = p.piece_needers(i).tolist()
            assert p.reader[i] in who
            assert p.nbytes[i] == np.prod(p.lengths[i]) * itemsizes[c] > 0
            for r in range(world):
                # a piece lies wholly inside or wholly outside each rank's need
                inside = need[(r, *sl)]
                assert inside.all() if r in who else not inside.any()
        if c in shared:
            assert ((count == 1) == (needers > 0)).all() and count.max() <= 1
        else:
            assert count.sum() == 0


@settings(max_examples=200)
@given(layouts(), st.randoms(use_true_random=False), st.sampled_from([16, 1 << 20]))
def test_the_plan_is_the_same_for_any_order_and_repetition_of_the_rows(layout, rnd, budget):
    world, _shapes, itemsizes, rows = layout
    a = _plan(world, itemsizes, rows, exchange_bytes=budget, min_piece_bytes=8)
    shuffled = rows + rows[: len(rows) // 2]
    rnd.shuffle(shuffled)
    b = _plan(world, itemsizes, shuffled, exchange_bytes=budget, min_piece_bytes=8)
    for field in ("shared_chunks", "chunk", "offsets", "lengths", "nbytes", "reader",
                  "needers_ptr", "needers", "round"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.n_rounds == b.n_rounds


def test_replicas_split_the_reads_evenly():
    # 4 replicas of one 8 MiB chunk: 4 parts of 2 MiB, one per replica.
    rows = [[r, 0, 0, 0, 1024, 2048] for r in range(4)]
    p = _plan(4, [4], rows)
    assert sorted(p.reader.tolist()) == [0, 1, 2, 3]
    assert p.bytes_read().tolist() == [2 << 20] * 4
    assert p.bytes_sent().tolist() == [6 << 20] * 4


def test_small_chunks_get_one_reader_each_spread_over_the_replicas():
    rows = [[r, c, 0, 0, 4, 4] for r in range(2) for c in range(6)]
    p = _plan(2, [4] * 6, rows)
    assert len(p.chunk) == 6
    assert sorted(np.bincount(p.reader, minlength=2).tolist()) == [3, 3]


def test_a_chunk_one_rank_needs_or_ranks_need_disjoint_parts_of_is_not_shared():
    p = _plan(3, [4, 4, 4], [[0, 0, 0, 0, 2, 2], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 2, 2],
                             [2, 1, 0, 0, 1, 2], [0, 2, 0, 0, 1, 2], [1, 2, 1, 0, 1, 2]])
    assert p.shared_chunks.tolist() == [1]
    assert set(p.chunk.tolist()) == {1}


def test_a_chunk_cut_into_too_many_cells_is_not_shared():
    rows = [[r, 0, r, r, 1, 1] for r in range(5)] + [[0, 0, 0, 0, 5, 5]]
    assert _plan(5, [4], rows, max_cells=24).shared_chunks.tolist() == []
    assert _plan(5, [4], rows, max_cells=25).shared_chunks.tolist() == [0]


def test_split_box_tiles_the_box_with_bounded_parts():
    parts = split_box((1, 2, 3), (3, 4, 5), 2, 30, 2)
    assert all(np.prod(ln) * 2 <= 30 for _, ln in parts)
    count = np.zeros((4, 6, 8), dtype=int)
    for o, ln in parts:
        count[tuple(slice(a, a + n) for a, n in zip(o, ln))] += 1
    assert count[1:4, 2:6, 3:8].min() == 1 and count.sum() == 3 * 4 * 5


@pytest.mark.parametrize("bad", [
    {"needs": [[0, 0, 0, 1]], "itemsizes": [4], "world": 0},
    {"needs": [[1, 0, 0, 1]], "itemsizes": [4], "world": 1},
    {"needs": [[0, 1, 0, 1]], "itemsizes": [4], "world": 1},
    {"needs": [[0, 0, -1, 1]], "itemsizes": [4], "world": 1},
    {"needs": [[0, 0, 0]], "itemsizes": [4], "world": 1},
])
def test_bad_rows_raise(bad):
    with pytest.raises(ValueError):
        plan_shared_reads(**bad)


# ------------------------------------------------------------------ hosts

@st.composite
def hosted(draw):
    world, shapes, itemsizes, rows = draw(layouts())
    hosts = [draw(st.integers(0, 2)) for _ in range(world)]
    return world, shapes, itemsizes, rows, hosts


@settings(max_examples=300)
@given(hosted(), st.sampled_from([1, 64, 1 << 20]), st.sampled_from([16, 100, 1 << 20]))
def test_with_hosts_each_rank_gets_each_needed_element_once_read_on_one_host(
        layout, min_piece, budget):
    world, shapes, itemsizes, rows, hosts = layout
    p = _plan(world, itemsizes, rows, min_piece_bytes=min_piece, exchange_bytes=budget, hosts=hosts)
    host = np.array(hosts)
    shared = set(p.shared_chunks.tolist())
    for c, shape in enumerate(shapes):
        need = _need(world, shape, rows, c)
        # host_need[h]: elements some rank on host h needs
        host_need = np.stack([need[host == h].any(axis=0) for h in range(3)])
        assert (c in shared) == (int(host_need.sum(axis=0).max()) >= 2)
        got = np.zeros((world, *shape), dtype=np.int64)  # times each rank gets each element
        for i in np.flatnonzero(p.chunk == c):
            sl = tuple(slice(o, o + n) for o, n in zip(p.offsets[i], p.lengths[i]))
            who = p.piece_needers(i).tolist()
            readers, receivers = p.piece_readers(i).tolist(), p.piece_receivers(i).tolist()
            assert p.reader[i] in readers
            assert sorted(readers + receivers) == who
            assert all(host[w] == host[p.reader[i]] for w in readers)
            assert all(host[w] != host[p.reader[i]] for w in receivers)
            for r in range(world):
                inside = need[(r, *sl)]
                assert inside.all() if r in who else not inside.any()
                got[(r, *sl)] += r in who
        if c in shared:
            # every rank gets exactly the elements it needs, once
            assert (got == need).all()
        else:
            assert got.sum() == 0


@settings(max_examples=100)
@given(layouts(), st.sampled_from([16, 1 << 20]))
def test_every_rank_its_own_host_is_the_default_plan(layout, budget):
    world, _shapes, itemsizes, rows = layout
    a = _plan(world, itemsizes, rows, exchange_bytes=budget, min_piece_bytes=8)
    b = _plan(world, itemsizes, rows, exchange_bytes=budget, min_piece_bytes=8,
              hosts=[7 * r + 3 for r in range(world)])
    for field in ("shared_chunks", "chunk", "offsets", "lengths", "nbytes", "reader",
                  "needers_ptr", "needers", "round"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert np.array_equal(a.bytes_read(), b.bytes_read())
    assert np.array_equal(a.bytes_sent(), b.bytes_sent())


@settings(max_examples=300)
@given(hosted(), st.booleans(), st.sampled_from([8, 40, 300]))
def test_no_round_exceeds_the_exchange_budget_unless_one_piece_does(layout, with_hosts, budget):
    world, _shapes, itemsizes, rows, hosts = layout
    p = _plan(world, itemsizes, rows, exchange_bytes=budget, min_piece_bytes=1,
              hosts=hosts if with_hosts else None)
    for rnd in range(p.n_rounds):
        idx = np.flatnonzero(p.round == rnd)
        assert len(idx) > 0
        if len(idx) == 1:
            continue
        read = np.zeros(world, np.int64)
        sent = np.zeros(world, np.int64)
        recv = np.zeros(world, np.int64)
        for i in idx:
            read[p.piece_readers(i)] += p.nbytes[i]
            sent[p.reader[i]] += p.nbytes[i] * len(p.piece_receivers(i))
            recv[p.piece_receivers(i)] += p.nbytes[i]
        assert read.max() <= budget and sent.max() <= budget and recv.max() <= budget


def test_ranks_of_one_host_share_nothing():
    rows = [[r, 0, 0, 0, 1024, 2048] for r in range(4)]
    p = _plan(4, [4], rows, hosts=[5, 5, 5, 5])
    assert p.shared_chunks.tolist() == [] and p.n_rounds == 0


def test_two_hosts_of_two_replicas_read_each_byte_on_one_host():
    # 4 replicas of an 8 MiB chunk on 2 hosts: each host reads half (both
    # its ranks, the second from the cache) and sends it to the other host's
    # 2 ranks; the network carries each byte once per receiving rank.
    rows = [[r, 0, 0, 0, 1024, 2048] for r in range(4)]
    p = _plan(4, [4], rows, hosts=[0, 0, 1, 1])
    assert len(p.chunk) == 2
    assert sorted(int(host) for host in np.array([0, 0, 1, 1])[p.reader]) == [0, 1]
    assert p.bytes_read().tolist() == [4 << 20] * 4
    sent = p.bytes_sent()
    assert sent.sum() == 2 * 2 * (4 << 20) and sorted(sent.tolist()) == [0, 0, 8 << 20, 8 << 20]


@pytest.mark.parametrize("hosts", [[0], [0, 1, 2], [0.5, 1.0], "ab", [[0, 1]]])
def test_bad_hosts_raise(hosts):
    with pytest.raises(ValueError, match="hosts"):
        plan_shared_reads([[0, 0, 0, 1]], [4], 2, hosts=hosts)


def test_hosts_may_be_any_ints():
    rows = [[r, 0, 0, 0, 4, 4] for r in range(3)]
    want = _plan(3, [4], rows, hosts=[0, 0, 1], min_piece_bytes=1)
    for hosts in ([2**64 - 1, 2**64 - 1, -5], [2**70, 2**70, 0], np.array([9, 9, -1], dtype=np.int8),
                  np.array([7, 7, 3], dtype=np.uint64)):
        got = _plan(3, [4], rows, hosts=hosts, min_piece_bytes=1)
        assert np.array_equal(got.reader, want.reader) and np.array_equal(got.round, want.round)
        assert np.array_equal(got.bytes_read(), want.bytes_read())


def test_a_piece_over_the_budget_gets_a_round_of_its_own():
    # Elements of 8 bytes under a 4-byte budget: each piece is over it alone.
    rows = [[r, 0, 0, 0, 2, 1] for r in range(2)] + [[r, 1, 0, 0, 1, 1] for r in range(2)]
    p = _plan(2, [8, 8], rows, exchange_bytes=4, min_piece_bytes=1)
    assert len(p.chunk) == 3
    assert p.round.tolist() == [0, 1, 2] and p.n_rounds == 3
