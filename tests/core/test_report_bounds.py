"""Hostile-input review of Checkpoint.from_metadata / problems() (ckcore.report's inputs).

Bad input must give a clear TypeError / ValueError / CheckpointError naming
what is wrong, never an AttributeError or a message built from garbage.
"""

from __future__ import annotations

import pytest

from ckcore.checkpoint import Checkpoint, CheckpointError, StorageInfo
from ckcore.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from ckcore.report import inspect_checkpoint, plan_reads, validate_checkpoint
from tests.support.streams import sample_metadata

SIZES = {"__0_0.distcp": 2000, "__1_0.distcp": 2000}


def _one(info=None, chunks=None, size=(4,), key=None):
    chunks = [ChunkStorageMetadata((0,), (4,))] if chunks is None else chunks
    t = TensorStorageMetadata(TensorProperties("float32"), size, chunks)
    sd = {MetadataIndex("w", (0,)) if key is None else key:
          StorageInfo("f", 0, 16) if info is None else info}
    return Metadata({"w": t}, storage_data=sd)


@pytest.mark.parametrize("md, words", [
    (_one(info=StorageInfo("f", "0", 16)), "storage_data["),
    (_one(info=StorageInfo("f", -5, 16)), "storage_data["),
    (_one(info=StorageInfo("f", 0, -16)), "storage_data["),
    (_one(info=StorageInfo(3, 0, 16)), "storage_data["),
    (_one(info=StorageInfo("f", 1.5, 16)), "storage_data["),
    (_one(info=StorageInfo("f", 2**63, 1)), "storage_data["),
    (_one(key="w"), "storage_data key 'w' is not a valid MetadataIndex"),
    (_one(chunks=[(0, 4)]), "w: chunk 0 is tuple"),
    (_one(chunks=[ChunkStorageMetadata((0,), (4, 5))]), "w: chunk 0 has invalid"),
    (_one(size="abc"), "w: invalid size"),
    (Metadata({"w": 5}), "w: storage metadata is int"),
    (Metadata({5: TensorStorageMetadata(TensorProperties("float32"), (1,), [])}), "key 5 is not a str"),
    (Metadata([1]), "state_dict_metadata is missing or not a dict"),
    (Metadata({"w": TensorStorageMetadata(TensorProperties("nope"), (4,), [])}), "invalid tensor properties"),
    (Metadata({}, storage_data=[1, 2]), "storage_data is list, not a dict"),
])
def test_from_metadata_refuses_malformed_metadata(md, words):
    # Unchecked, such metadata surfaces later as an AttributeError deep in
    # problems()/validate/inspect/plan, or as a nonsense finding.
    with pytest.raises(CheckpointError) as exc:
        Checkpoint.from_metadata(md, file_sizes={"f": 16}, name="<crafted>")
    assert "<crafted>: not valid DCP metadata" in str(exc.value)
    assert words in str(exc.value)


def test_from_metadata_still_takes_foreign_storage_records():
    # A custom storage writer's plain records are reported, not refused.
    md = _one(info=("f", 0, 16))
    ck = Checkpoint.from_metadata(md, file_sizes={"f": 16})
    assert ck.problems() == ["storage entry w at offsets (0,) is a tuple, not a FileSystemWriter record"]
    assert validate_checkpoint(ck).counts == {"foreign_storage_entry": 1}
    assert inspect_checkpoint(ck)["totals"]["files"] == 0
    with pytest.raises(CheckpointError, match="not a FileSystemWriter record"):
        plan_reads(ck, (1,), {"w": ((4,), ())})


@pytest.mark.parametrize("limit", [True, False, 1.5, "3", 2.0])
def test_problems_limit_must_be_an_int(limit):
    # A bool must not pass as 1/0, nor a float or str reach islice.
    ck = Checkpoint.from_metadata(sample_metadata(), file_sizes=SIZES)
    with pytest.raises(TypeError, match="limit must be an int >= 0 or None"):
        ck.problems(limit=limit)


def test_problems_huge_limit_means_all():
    # islice refuses a limit past sys.maxsize: such a limit means all.
    ck = Checkpoint.from_metadata(sample_metadata())
    assert ck.problems(limit=2**100) == ck.problems(limit=None)


_SHARED_CHUNKS = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from ckcore.checkpoint import Checkpoint
from ckcore.metadata import *
from ckcore.report import MAX_KEPT_FINDINGS, validate_checkpoint
c = ChunkStorageMetadata((0,), (1,))
md = Metadata({"v": TensorStorageMetadata(TensorProperties("float32"), (1,), [c] * 200_000)},
              storage_data={})
f = validate_checkpoint(Checkpoint.from_metadata(md), max_findings=0)
n = 200_000
assert f.counts["overlapping_chunks"] == n * (n - 1) // 2, f.counts
assert f.exact
assert len(f.shown["overlapping_chunks"]) == MAX_KEPT_FINDINGS
lines = list(f.lines())
assert any("more overlapping chunk pairs" in x and "first 100,000" in x for x in lines), lines[-3:]
print("ok")
"""


def test_validate_show_all_is_bounded_in_memory():
    # A few hundred KB of .metadata repeating one chunk 200,000 times holds
    # 2e10 overlapping pairs: with max_findings=0 ("show all", `ckcore
    # validate --max-findings 0`) only MAX_KEPT_FINDINGS messages per kind may
    # be kept, in a child capped at 2 GB of address space.
    import os
    import subprocess
    import sys

    from tests.support.paths import CKCORE_PARENT
    r = subprocess.run([sys.executable, "-c", _SHARED_CHUNKS], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(CKCORE_PARENT)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("bad", [True, 1.5, "3", None])
def test_validate_max_findings_must_be_an_int(bad):
    ck = Checkpoint.from_metadata(sample_metadata(), file_sizes=SIZES)
    with pytest.raises(TypeError, match="max_findings must be an int"):
        validate_checkpoint(ck, max_findings=bad)


def test_plan_reads_refuses_a_target_shape_other_than_the_saved_one():
    # A layout of (16, 16) over an (8, 8) tensor would plan a load no DCP load
    # makes, as if the saved chunks lay in the bigger tensor.
    from ckcore.report import UsageError, resolve_layouts

    md = sample_metadata()
    ck = Checkpoint.from_metadata(md, file_sizes=SIZES)
    mesh, layouts = resolve_layouts(md, world_size=2)
    for shape in ((16, 16), (1, 1), (8, 8, 1), (8,)):
        bad = {**layouts, "layer1.weight": (shape, layouts["layer1.weight"][1])}
        with pytest.raises(UsageError, match=r"layer1.weight: target shape .* differs from the "
                                             r"saved tensor's \(8, 8\)"):
            plan_reads(ck, mesh, bad)


@pytest.mark.parametrize("kw, words", [
    ({"world_size": 1.5}, "world_size must be an int"),
    ({"world_size": True}, "world_size must be an int"),
    ({"world_size": 2, "shard_dim": "0"}, "shard_dim must be an int"),
    ({"world_size": 2, "shard_dim": 0.0}, "shard_dim must be an int"),
])
def test_resolve_layouts_takes_int_sizes(kw, words):
    # world_size=1.5 would make a mesh (1.5,); shard_dim="0" a bare comparison TypeError.
    from ckcore.report import resolve_layouts

    with pytest.raises(TypeError, match=words):
        resolve_layouts(sample_metadata(), **kw)


@pytest.mark.parametrize("sizes", ["abc", 5, [("__0_0.distcp", 2000)], True])
def test_from_metadata_file_sizes_must_be_a_mapping(sizes):
    # dict() would turn these into its own confusing errors, or accept a list of pairs.
    with pytest.raises(TypeError, match="file_sizes must be a mapping of file name to size"):
        Checkpoint.from_metadata(sample_metadata(), file_sizes=sizes)


def test_storage_walk_parses_each_file_name_once(monkeypatch):
    # Each file name is parsed once, not once per storage entry: 300,000
    # entries in one file stay a linear walk to the first overlap.
    import ckcore.checkpoint as cc

    n = 20_000
    chunks = [ChunkStorageMetadata((i,), (1,)) for i in range(n)]
    sd = {MetadataIndex("w", (i,)): StorageInfo(f"__{i % 3}_0.distcp", 4 * (i // 3), 4)
          for i in range(n)}
    md = Metadata({"w": TensorStorageMetadata(TensorProperties("float32"), (n,), chunks)},
                  storage_data=sd)
    ck = Checkpoint.from_metadata(md, file_sizes={f"__{k}_0.distcp": 4 * n for k in range(3)})
    calls = []
    real = cc._escapes
    monkeypatch.setattr(cc, "_escapes", lambda rp: calls.append(rp) or real(rp))
    assert ck.problems() == []
    assert sorted(calls) == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]


@pytest.mark.parametrize("want", ["missing_file", 0, True])
def test_iter_problems_want_must_be_callable(want):
    # A falsy non-callable must not mean "every message", nor a str fail only
    # once a problem is found.
    ck = Checkpoint.from_metadata(sample_metadata(), file_sizes=SIZES)
    with pytest.raises(TypeError, match="want must be a callable"):
        list(ck.iter_problems(want))
