"""Torch-free tests of the library under the command: Checkpoint.from_metadata
and the bounded storage checks behind Checkpoint.problems(); and ``ckcore --version``.
"""

from __future__ import annotations

import io
import time

import pytest

import ckcore
from ckcore.checkpoint import STORAGE_PROBLEMS, Checkpoint, StorageInfo
from ckcore.cli import main
from ckcore.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from tests.support.streams import sample_metadata

SIZES = {"__0_0.distcp": 2000, "__1_0.distcp": 2000}


def test_from_metadata_is_a_checkpoint_without_a_directory():
    md = sample_metadata()
    ck = Checkpoint.from_metadata(md, file_sizes={**SIZES, "unused.distcp": 5}, name="<mem>")
    assert str(ck.dir) == str(ck.metadata_path) == "<mem>"
    assert ck.metadata is md and ck.storage is md.storage_data
    # Only the files the storage entries name; a name no entry uses is ignored.
    assert ck.files == SIZES
    assert ck.problems() == []
    assert "<mem>" in repr(ck)
    loc = ck.item_location(MetadataIndex("layer1.weight", (4, 0)))
    assert (loc.offset, loc.length) == (100, 100)


def test_from_metadata_without_sizes_has_every_file_missing():
    ck = Checkpoint.from_metadata(sample_metadata())
    assert str(ck.dir) == "<in memory>"
    assert ck.files == {"__0_0.distcp": None, "__1_0.distcp": None}
    assert len(ck.problems()) == len(ck.storage)
    assert all(p.endswith("is missing") for p in ck.problems())


def test_from_metadata_refuses_a_path_outside_the_checkpoint():
    md = sample_metadata()
    md.storage_data[MetadataIndex("step")] = StorageInfo("../etc/passwd", 0, 10)
    ck = Checkpoint.from_metadata(md, file_sizes={**SIZES, "../etc/passwd": 4000})
    assert ck.files["../etc/passwd"] is None
    assert ck.problems() == ["step: file ../etc/passwd lies outside the checkpoint directory"]


@pytest.mark.parametrize("kwargs, message", [
    ({"metadata": {"w": 1}}, "metadata must be a ckcore Metadata, got dict"),
    ({"file_sizes": {"__0_0.distcp": -1}}, "file_sizes['__0_0.distcp'] must be an int >= 0 or None"),
    ({"file_sizes": {"__0_0.distcp": "10"}}, "must be an int >= 0 or None, got '10'"),
    ({"name": 3}, "name must be a str, got int"),
])
def test_from_metadata_bad_arguments(kwargs, message):
    kwargs.setdefault("metadata", sample_metadata())
    md = kwargs.pop("metadata")
    with pytest.raises(TypeError) as exc:
        Checkpoint.from_metadata(md, **kwargs)
    assert message in str(exc.value)


def test_storage_checks_of_every_kind():
    md = sample_metadata()
    sd = md.storage_data
    del sd[MetadataIndex("layer0.weight", (4, 0))]  # missing_storage_entry
    sd[MetadataIndex("ghost")] = StorageInfo("__1_0.distcp", 1500, 10)  # unknown_storage_entry
    sd[MetadataIndex("layer1.weight", (0, 0))] = ("__0_0.distcp", 100, 100)  # foreign_storage_entry
    sd[MetadataIndex("layer1.weight", (4, 0))] = StorageInfo("/abs", 0, 100)  # path_outside
    sd[MetadataIndex("layer2.weight", (0, 0))] = StorageInfo("gone.distcp", 0, 100)  # missing_file
    sd[MetadataIndex("step")] = StorageInfo("__0_0.distcp", 1995, 10)  # beyond_file_end
    sd[MetadataIndex("layer2.weight", (4, 0))] = StorageInfo("__0_0.distcp", 50, 10)  # overlap, short
    ck = Checkpoint.from_metadata(md, file_sizes=SIZES)
    kinds = [k for k, _ in ck.iter_problems()]
    assert sorted(set(kinds), key=list(STORAGE_PROBLEMS).index) == list(STORAGE_PROBLEMS)
    assert len(kinds) == len(ck.problems()) == 8
    assert ("layer2.weight: bytes [50, 60) of __0_0.distcp overlap those of layer0.weight "
            "(up to byte 100)") in ck.problems()
    assert ("layer2.weight: chunk 1 at offsets (4, 0) needs 64 bytes but its storage entry in "
            "__0_0.distcp holds 10") in ck.problems()


def test_short_storage_skips_transformed_entries():
    md = sample_metadata()
    md.storage_data[MetadataIndex("layer0.weight", (0, 0))].length = 1
    md.storage_data[MetadataIndex("layer0.weight", (0, 0))].transform_descriptors = ["zstd/1"]
    assert Checkpoint.from_metadata(md, file_sizes=SIZES).problems() == []


def _many_missing(n: int) -> Metadata:
    # One chunk object repeated n times (as a crafted file shares it), no storage at all.
    chunk = ChunkStorageMetadata((0,), (1,))
    tensor = TensorStorageMetadata(TensorProperties("float32"), (1,), [chunk] * n)
    return Metadata({"w": tensor}, storage_data={})


def test_problems_is_bounded():
    ck = Checkpoint.from_metadata(_many_missing(1_000_000))
    t0 = time.perf_counter()
    probs = ck.problems()
    assert time.perf_counter() - t0 < 1.0  # the walk stops at the limit
    assert len(probs) == 1000
    assert probs[0] == "w: chunk 0 at offsets (0,) has no storage entry"
    assert len(ck.problems(limit=3)) == 3
    assert ck.problems(limit=0) == []
    assert len(Checkpoint.from_metadata(_many_missing(2000)).problems(limit=None)) == 2000
    with pytest.raises(ValueError, match="limit must be >= 0 or None"):
        ck.problems(limit=-1)


def test_iter_problems_writes_only_wanted_messages():
    ck = Checkpoint.from_metadata(_many_missing(10_000))
    asked = []

    def want(kind):
        asked.append(kind)
        return len(asked) <= 2

    found = list(ck.iter_problems(want))
    assert len(found) == len(asked) == 10_000
    assert [m is not None for _, m in found[:3]] == [True, True, False]
    assert {k for k, _ in found} == {"missing_storage_entry"}


def test_version_flag():
    out, err = io.StringIO(), io.StringIO()
    assert main(["--version"], stdout=out, stderr=err) == 0
    assert out.getvalue() == f"ckcore {ckcore.__version__}\n"
    assert err.getvalue() == ""


def test_the_command_holds_no_library():
    # The command parses, prints and exits; the work is ckcore.report's and ckcore.demo's.
    import ast
    from pathlib import Path

    import ckcore.cli

    tree = ast.parse(Path(ckcore.cli.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("_kernels" in (m or "") for m in imported), imported
    for name in ("plan_reads", "run_demo", "inspect_checkpoint", "validate_checkpoint", "Findings"):
        assert not hasattr(ckcore.cli, name), name
