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

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import CKCORE_PARENT
from tests.support.rdzv import file_init_method

WORKER = Path(__file__).with_name("_shared_worker.py")
TIMEOUT = 300
WORLD = 4


def _launch(scenario: str, workdir: Path, expect_exit: dict[int, int] | None = None) -> dict[int, dict]:
    init_method = file_init_method(workdir, f"rdzv-{scenario}")
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                   CKCORE_TEST_INIT_METHOD=init_method, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(CKCORE_PARENT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(workdir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    failures = []
    for rank, p in enumerate(procs):
        try:
            _out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: rank {rank} timed out")
        want = (expect_exit or {}).get(rank, 0)
        if p.returncode != want:
            failures.append(f"--- rank {rank} exit {p.returncode} (expected {want})\n{err[-4000:]}")
    if failures:
        pytest.fail(f"{scenario} failed:\n" + "\n".join(failures))
    out = {}
    for r in range(WORLD):
        f = workdir / f"{scenario}.{r}.json"
        if f.exists():
            out[r] = json.loads(f.read_text())
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shared_reads")
    _launch("save", workdir)
    return workdir, _launch("load", workdir)


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


def test_overlapping_but_different_boxes_load_exactly(shared):
    _, ranks = shared
    for r in ranks.values():
        assert r["overlap"]["elements"] > 0
        assert r["overlap"]["shared"]["shared_items"] > 0
    assert sum(r["overlap"]["shared"]["bytes_received"] for r in ranks.values()) > 0


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
    ranks = _launch("kill", workdir, expect_exit={2: 17})
    assert sorted(ranks) == [0, 1, 3]
    for r in ranks.values():
        assert r["kill"]["seconds"] < 15 + 5, r
        assert "shared read" in r["kill"]["error"]
