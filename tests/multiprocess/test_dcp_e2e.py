"""End to end: real ``dcp.save`` / ``dcp.load`` over gloo, several processes on this machine.

A model-like state dict (DTensors on a 2-D mesh, plain tensors, a 0-d tensor,
bytes, an int, nested optimizer-like state) is saved by 4 ranks with
``FastSavePlanner`` and loaded by 3 ranks with other layouts, with
``FastLoadPlanner`` (also through ``RangeFileSystemReader``), with torch's
``DefaultLoadPlanner`` (checkpoints are interchangeable), and under
``ckcore.dcp.patch()`` with torch's default planners; every element is checked. Damaged ``.metadata`` files (truncated,
garbage, a lost chunk, an out-of-bounds chunk) must fail the load with a
clear error before any destination is written. The rank logic lives in
``_dcp_e2e_worker.py``; the two launches take 12-75 s on 2 shared cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gloo import launch_all

WORKER = Path(__file__).with_name("_dcp_e2e_worker.py")
# The ranks import the very ckcore this test process imported (installed
# wheel in CI, the built checkout in development), never the bare sources:
# tests.support.gloo puts CKCORE_PARENT first on their PYTHONPATH.
TIMEOUT = 240


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dcp_e2e")
    saved = launch_all(WORKER, "save", 4, workdir, TIMEOUT)
    loaded = launch_all(WORKER, "load", 3, workdir, TIMEOUT)
    return workdir, saved, loaded


def test_save_with_fast_planner_writes_a_dcp_checkpoint(e2e):
    workdir, saved, _ = e2e
    assert all(r["saved"] for r in saved)
    files = sorted(p.name for p in (workdir / "fast").iterdir())
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)


def test_every_element_loaded_in_every_mode(e2e):
    _, _, loaded = e2e
    for r in loaded:
        # fast load; torch load of ckcore's save; patched load of the patched save;
        # fast load of torch's save; fast load through RangeFileSystemReader
        assert len(r["checked"]) == 5
        assert r["range_reader_bytes"] > 0
        assert all(n > 0 for n in r["checked"])
    # The three ranks together hold every element at least once in each mode.
    assert sum(r["checked"][0] for r in loaded) >= 13 * 6 * 2 + 8 * 10 * 2 + 6 * 13


def test_damaged_metadata_fails_clearly_and_writes_nothing(e2e):
    _, _, loaded = e2e
    for r in loaded:
        errs = r["errors"]
        assert set(errs) == {"truncated", "garbage", "lost_chunk", "out_of_bounds"}
        assert all(errs.values())
        assert "checkpoint metadata does not fill model.embed" in errs["lost_chunk"]
        assert (
            "checkpoint metadata for model.output has saved chunks that overlap"
            in errs["out_of_bounds"]
        )
        for name in ("truncated", "garbage"):
            low = errs[name].lower()
            assert "pickle" in low or "metadata" in low or "truncated" in low, errs[name]
        # What ckcore prevents: torch's planner silently leaves the lost box unwritten.
        assert r["torch_lost_chunk_sentinels"] > 0
