"""Compact plans mixed with torch's planners and readers, over real gloo processes.

Three ranks save the same model-like state dict (1-D mesh: uneven and empty
shards, replicated DTensors and plain tensors that dedup, a 0-d tensor, bytes)
with torch's ``DefaultSavePlanner``, ``FastSavePlanner``, ranks mixing the two,
``FastSavePlanner`` subclasses (own dedup, own global plan) and plan caching
(same plan twice, then a changed state dict). Two ranks, with other
placements, load each checkpoint with every mix of {``DefaultLoadPlanner``,
``FastLoadPlanner``} x {``FileSystemReader``, ``RangeFileSystemReader``},
with subclasses and with readers whose coordinator step reads the items;
every element is checked. The workers also record the pickled size of each
rank's plan up to the coordinator and back. The rank logic lives in
``_compact_compat_worker.py``; the two launches take ~30-60 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gloo import launch_all

WORKER = Path(__file__).with_name("_compact_compat_worker.py")
TIMEOUT = 300
SAVE_WORLD, LOAD_WORLD = 3, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compact_compat")
    saved = launch_all(WORKER, "save", SAVE_WORLD, workdir, TIMEOUT)
    loaded = launch_all(WORKER, "load", LOAD_WORLD, workdir, TIMEOUT)
    return workdir, saved, loaded


def _elements(ver: int) -> int:
    # Elements of the state dict of version ``ver`` (see spec() in the worker).
    n = 13 * 6 + 16 + 5 * (12 if ver == 3 else 11) + 16 + 7 * 3 + 10 + 10 + 1
    n += sum((6 + i) * 4 for i in range(8))
    return n + (36 if ver == 3 else 0)


def test_every_checkpoint_loads_element_exact_with_every_planner_and_reader(runs):
    _, _, loaded = runs
    labels = set(loaded[0]["checked"])
    for ckpt in ("torch", "fast", "fast_fw"):
        for planner in ("torch", "fast"):
            for reader in ("fs", "range"):
                assert f"load:{planner}:{reader}:{ckpt}" in labels
    for ckpt in ("mix_torch_coord", "mix_fast_coord", "sub_dedup", "sub_global_reads",
                 "sub_global_rewrites", "cached1", "cached2", "cached3", "shift1", "shift4",
                 "torch_fw", "mix_fw"):
        assert f"load:fast:fs:{ckpt}" in labels
    assert len(labels) == 12 + 12 + 1 + 2 + 5
    for label in labels:
        ver = int(label[-1]) if label[-1].isdigit() else 1
        # Each rank checked its part, the two ranks together at least every element.
        assert all(r["checked"][label] > 0 for r in loaded), label
        assert sum(r["checked"][label] for r in loaded) >= _elements(ver), label


def test_subclasses_run_their_own_steps(runs):
    _, saved, loaded = runs
    # The own dedup ran on the coordinator, and kept every replicated item on rank 0.
    assert saved[0]["sub_dedup_calls"] == 1
    assert "m.rep" in saved[0]["sub_dedup_fqns"] and "m.norm" in saved[0]["sub_dedup_fqns"]
    for r in saved[1:]:
        assert r["sub_dedup_calls"] == 0
        assert not {"m.rep", "m.norm", "m.step"} & set(r["sub_dedup_fqns"])
    assert saved[0]["sub_global_items_seen"] > 0
    # Readers whose coordinator step iterates the items got them all as objects.
    assert loaded[0]["counting_items_seen"] > 0
    assert loaded[0]["instance_hook_items_seen"] > 0


def _traffic(reports, label, way):
    return [r["traffic"][label][way] for r in reports]


def test_load_plan_that_travels_is_small_with_ckcore_at_both_ends(runs):
    _, _, loaded = runs
    for reader in ("fs", "range"):
        for ckpt in ("torch", "fast"):
            label = f"load:fast:{reader}:{ckpt}"
            for way in ("up", "down"):
                assert max(_traffic(loaded, label, way)) <= 1024, (label, way)
            # torch's planner sends every read item, both ways.
            torch_up = _traffic(loaded, f"load:torch:{reader}:{ckpt}", "up")
            assert min(torch_up) > 4 * max(_traffic(loaded, label, "up")), label
    # A reader or planner that reads the items on the coordinator gets them
    # (as packed rows it can iterate), not a ticket of the item count.
    ticket = max(_traffic(loaded, "load:fast:fs:fast", "up"))
    for label in ("load:fast:counting:fast", "load:fast:instance_hook:fast",
                  "load:sub_global:fs:fast"):
        assert min(_traffic(loaded, label, "up")) > 2 * ticket, label


def test_fast_save_plan_is_much_smaller_than_torchs(runs):
    _, saved, _ = runs
    fast, torch_ = _traffic(saved, "save:fast", "up"), _traffic(saved, "save:torch", "up")
    for f, t in zip(fast, torch_):
        assert 3 * f < t, (fast, torch_)
    # The global plan sent back is smaller too.
    for f, t in zip(_traffic(saved, "save:fast", "down"), _traffic(saved, "save:torch", "down")):
        assert 2 * f < t


def test_plan_caching_sends_nothing_for_an_unchanged_plan(runs):
    _, saved, _ = runs
    for r in saved:
        tr = r["traffic"]
        # The second save's local plan is torch's unusable marker, like torch's own cache.
        assert tr["save:cached2"]["up"] < 300
        assert tr["save:cached2"]["up"] == tr["save:torch_cached2"]["up"]
        assert tr["save:cached3"]["up"] > tr["save:cached2"]["up"]


def test_plan_caching_when_dedup_moves_items_to_unchanged_ranks(runs):
    _, saved, _ = runs
    # Each rank finished with the items torch's own caching planner gives it...
    for r in saved:
        assert r["shift1_fqns"] == r["torch_shift1_fqns"]
        assert r["shift4_fqns"] == r["torch_shift4_fqns"]
    # ...and the case is real: some rank whose local plan did not change writes
    # other replicated items in the second save.
    assert any(r["shift1_fqns"] != r["shift4_fqns"] for r in saved[1:])


def test_fast_writer_sends_compact_results_and_metadata(runs):
    _, saved, _ = runs
    for r in saved:
        # Every save returns, on every rank, the metadata its file holds.
        assert r["returned_is_file"] and all(r["returned_is_file"].values()), r["returned_is_file"]
    for r in saved:
        tr = r["traffic"]
        # Write results travel as columns: a fraction of torch's pickled list.
        assert 2 * tr["save:fast_fw"]["write_up"] < tr["save:fast"]["write_up"], tr
        assert 2 * tr["save:torch_fw"]["write_up"] < tr["save:torch"]["write_up"], tr
    # With ckcore's planners the finished metadata reaches the other ranks as
    # columns; with torch's coordinator (or torch's writer) it is torch's object.
    for r in saved[1:]:
        tr = r["traffic"]
        assert tr["save:fast_fw"]["metadata_type"] == "ColumnarMetadata"
        assert tr["save:torch_fw"]["metadata_type"] == "Metadata"
        assert tr["save:fast"]["metadata_type"] == "Metadata"
