"""Shared replicated reads over gloo: 4 ranks read each needed byte once and exchange it.

An HSDP checkpoint (2x2 mesh, replicate x shard) is loaded by 4 ranks with
:class:`ckcore.dcp.shared.SharedRangeFileSystemReader` at several layouts
(2 replica groups x 2 shards, a column reshard, 4 replicas of the FSDP-2
shards), with overlapping-but-different boxes per rank, and with a peer
that fails: every element is checked, the storage bytes read with sharing
are compared with the range reader's, and a failing or dying peer must make
every other rank raise within the timeout. The rank logic lives in
``_shared_worker.py``; three launches of 4 processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gloo import launch

WORKER = Path(__file__).with_name("_shared_worker.py")
TIMEOUT = 300
WORLD = 4


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shared_reads")
    launch(WORKER, "save", WORLD, workdir, TIMEOUT)
    return workdir, launch(WORKER, "load", WORLD, workdir, TIMEOUT)


REPLICAS = {"hsdp": 2, "hsdp_cols": 2, "rep4": 4}


@pytest.mark.parametrize("layout", sorted(REPLICAS))
def test_shared_loads_are_element_exact_and_share_the_bytes(shared, layout):
    _, ranks = shared
    assert len(ranks) == WORLD
    plain = sum(r[layout]["plain"]["bytes_read"] for r in ranks.values())
    for variant in ("shared", "small"):
        stats = [r[layout][variant] for r in ranks.values()]
        assert all(s["shared_items"] > 0 for s in stats), (variant, stats)
        got = sum(s["bytes_read"] for s in stats)
        # Each saved byte read once instead of once per replica; the margin is
        # the archive records each extra reader of a chunk reads (<= 8 KiB).
        margin = 0 if variant == "shared" else 8192 * 4 * 4 * WORLD
        assert got <= plain / REPLICAS[layout] * 1.02 + margin, (variant, got, plain)
    small = [r[layout]["small"] for r in ranks.values()]
    assert sum(s["exchange_rounds"] for s in small) > WORLD  # several rounds ran
    assert sum(s["bytes_sent"] for s in small) == sum(s["bytes_received"] for s in small) > 0


@pytest.mark.parametrize("layout", sorted(REPLICAS))
def test_ranks_on_one_host_read_through_its_cache_and_exchange_only_across_hosts(shared, layout):
    _, ranks = shared
    plain = [r[layout]["plain"] for r in ranks.values()]
    # One host (the default here): the range reader's reads, no exchange.
    one = [r[layout]["onehost"] for r in ranks.values()]
    assert [s["bytes_read"] for s in one] == [s["bytes_read"] for s in plain]
    assert all(s["shared_items"] == s["exchange_rounds"] == s["bytes_sent"] == 0 for s in one)
    # Two hosts of two ranks: each byte a replica group needs is read on one
    # host (by each of its ranks that need it, through the shared cache)
    # and crosses the process group only between hosts.
    two = [r[layout]["hosts2"] for r in ranks.values()]
    assert all(s["shared_items"] > 0 for s in two)
    assert sum(s["bytes_sent"] for s in two) == sum(s["bytes_received"] for s in two) > 0
    per_rank_hosts = [r[layout]["shared"] for r in ranks.values()]
    # No more bytes cross than with every rank its own host; fewer when
    # ranks of one host need the same bytes (rep4: all 4 ranks are replicas;
    # hsdp puts the two replicas of a shard on different hosts).
    sent2 = sum(s["bytes_sent"] for s in two)
    sent4 = sum(s["bytes_sent"] for s in per_rank_hosts)
    assert sent2 < sent4 if layout != "hsdp" else sent2 == sent4, (sent2, sent4)
    # Every rank's storage reads: at most what it reads alone, and the
    # two hosts' reads together cover each byte at most twice over.
    margin = 8192 * 4 * 4
    assert all(t["bytes_read"] <= p["bytes_read"] + margin for t, p in zip(two, plain))
    groups = {"hsdp": 2, "hsdp_cols": 2, "rep4": 4}[layout]
    total_plain = sum(p["bytes_read"] for p in plain)
    assert sum(t["bytes_read"] for t in two) <= total_plain / groups * 2 * 1.02 + margin * WORLD


def test_overlapping_but_different_boxes_load_exactly(shared):
    _, ranks = shared
    for key in ("overlap", "overlap_hosts2"):
        for r in ranks.values():
            assert r[key]["elements"] > 0
            assert r[key]["shared"]["shared_items"] > 0
        assert sum(r[key]["shared"]["bytes_received"] for r in ranks.values()) > 0


def test_a_peer_that_raises_fails_every_rank(shared):
    _, ranks = shared
    for rank, r in ranks.items():
        err = r["raise"]["error"]
        assert r["raise"]["seconds"] < 20
        if rank == 1:
            assert "injected read failure on rank 1" in err
        else:
            assert "rank(s) [1]" in err and "SharedReadError" in err, err


def test_a_peer_that_dies_mid_exchange_fails_every_other_rank_within_the_timeout(shared):
    workdir, _ = shared
    ranks = launch(WORKER, "kill", WORLD, workdir, TIMEOUT, expect_exit={2: 17})
    assert sorted(ranks) == [0, 1, 3]
    for r in ranks.values():
        assert r["kill"]["seconds"] < 15 + 5, r
        assert "shared read" in r["kill"]["error"]
