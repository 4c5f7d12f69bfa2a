"""The ckcore command without torch: fixtures committed under tests/data, naive references.

Torch-free (runs under ``--torch-free``): the checkpoints are the committed
fixtures tests/data/dcp_small (single process) and tests/data/dcp_sharded
(2 gloo ranks, see tests/data/make_cli_fixture.py); damaged variants are
made by editing copies of the files or the loaded metadata, hostile ones by
pickling ckcore's objects under torch's class names (:func:`write_crafted`).
"""

from __future__ import annotations

import copyreg
import io
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import ckcore
import ckcore.cli
import ckcore.report
from ckcore.checkpoint import Checkpoint, StorageInfo, load_metadata
from ckcore.cli import Progress, main
from ckcore.dtypes import itemsize
from ckcore.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from ckcore.report import (
    COALESCING,
    _coalesce,
    parse_layout_rules,
    plan_reads,
    resolve_layouts,
    validate_checkpoint,
)
from tests.support.paths import TESTS

HERE = str(TESTS)
CKCORE_HOME = os.path.dirname(os.path.dirname(os.path.abspath(ckcore.__file__)))
SMALL = os.path.join(HERE, "data", "dcp_small")
SHARDED = os.path.join(HERE, "data", "dcp_sharded")


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckcore: error: "), err
    assert "Traceback" not in err
    return lines[0]


class _TorchStylePickler(pickle.Pickler):
    # TensorProperties pickles as torch's does: NEWOBJ, then a 5-tuple state.
    def reducer_override(self, obj):
        if type(obj) is TensorProperties:
            state = (obj.dtype, obj.layout, obj.requires_grad, obj.memory_format, obj.pin_memory)
            return copyreg.__newobj__, (TensorProperties,), state
        return NotImplemented


def write_crafted(path, tensors, storage=None, data=None):
    """A checkpoint directory whose ``.metadata`` is written the way torch writes it, without torch.

    ``tensors``: fqn -> (global size, chunk list) or None for a bytes item; a
    chunk repeated in the list is pickled once and referenced (2 to 5 bytes a
    copy), as a hostile file would. ``storage``: MetadataIndex -> StorageInfo
    (default: one entry per distinct chunk, back to back in ``__0_0.distcp``).
    ``data``: file name -> size of the data files to create (default: each
    file as long as its entries reach). Returns the ``.metadata`` size.
    """
    sdm = {}
    for fqn, spec in tensors.items():
        if spec is None:
            sdm[fqn] = BytesStorageMetadata()
        else:
            size, chunks = spec
            sdm[fqn] = TensorStorageMetadata(TensorProperties("float32"), tuple(size), chunks)
    if storage is None:
        storage, pos = {}, 0
        for fqn, item in sdm.items():
            for c in getattr(item, "chunks", [None]):
                key = MetadataIndex(fqn) if c is None else MetadataIndex(fqn, c.offsets)
                if key not in storage:
                    n = 8 if c is None else math.prod(c.sizes) * 4
                    storage[key] = StorageInfo("__0_0.distcp", pos, n)
                    pos += n
    if data is None:
        data = {}
        for info in storage.values():
            end = info.offset + info.length
            data[info.relative_path] = max(data.get(info.relative_path, 0), end)
    buf = io.BytesIO()
    _TorchStylePickler(buf, protocol=2).dump(Metadata(sdm, storage_data=storage, version="1.0.0"))
    raw = buf.getvalue()
    # Protocol 2 names globals in text lines: rename ckcore's classes to torch's.
    raw = raw.replace(b"cckcore.metadata\n", b"ctorch.distributed.checkpoint.metadata\n")
    raw = raw.replace(b"cckcore.checkpoint\nStorageInfo\n",
                      b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n")
    assert b"ckcore" not in raw
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        fh.write(raw)
    for name, size in data.items():
        with open(os.path.join(path, name), "wb") as fh:
            fh.truncate(size)
    return len(raw)


def identical_chunks(path, n):
    """One 4-element tensor saved as the same chunk n times: n(n-1)/2 overlapping pairs."""
    c = ChunkStorageMetadata((0,), (4,))
    return write_crafted(path, {"w": ((4,), [c] * n)})


@pytest.fixture
def sharded_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(SHARDED, dst)
    return dst


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SMALL, SHARDED])
def test_inspect_json_matches_metadata_and_files(path):
    code, out, err = run("inspect", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    md = load_metadata(path)
    storage = md.storage_data
    tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    assert list(report["tensors"]) == list(tensors)
    for fqn, t in tensors.items():
        row = report["tensors"][fqn]
        assert row["dtype"] == t.properties.dtype
        assert tuple(row["shape"]) == t.size
        assert row["chunks"] == len(t.chunks)
        assert row["bytes"] == math.prod(t.size) * itemsize(t.properties.dtype)
        assert row["stored_bytes"] == sum(storage[MetadataIndex(fqn, c.offsets)].length for c in t.chunks)
    bytes_items = [k for k in md.state_dict_metadata if k not in tensors]
    assert list(report["bytes_items"]) == bytes_items
    files = {f for f in os.listdir(path) if f.endswith(".distcp")}
    assert set(report["files"]) == files
    for name, row in report["files"].items():
        assert row["size"] == os.path.getsize(os.path.join(path, name))
        assert row["items"] == sum(1 for v in storage.values() if v.relative_path == name)
    totals = report["totals"]
    assert totals["chunks"] == sum(len(t.chunks) for t in tensors.values())
    assert totals["file_bytes"] == sum(os.path.getsize(os.path.join(path, f)) for f in files)
    assert totals["missing_files"] == 0


def test_inspect_text_lists_every_tensor_and_file():
    code, out, _ = run("inspect", SHARDED)
    assert code == 0
    md = load_metadata(SHARDED)
    for fqn in md.state_dict_metadata:
        assert fqn in out
    assert "__0_0.distcp" in out and "__1_0.distcp" in out
    assert "layers.0.wq.weight    float32   (8, 4)       2" in out
    assert "(5,)" in out  # 1-d shapes written as tuples
    assert out.rstrip().splitlines()[-1].startswith("total: 4 tensors in 7 chunks")


def test_inspect_reports_a_missing_file(sharded_copy):
    os.remove(sharded_copy / "__1_0.distcp")
    code, out, _ = run("inspect", str(sharded_copy), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["files"]["__1_0.distcp"]["size"] is None
    assert report["totals"]["missing_files"] == 1
    code, out, _ = run("inspect", str(sharded_copy))
    assert "MISSING" in out and "1 missing" in out


# --------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SMALL, SHARDED])
def test_validate_sound_checkpoints(path):
    code, out, err = run("validate", path)
    assert code == 0, out + err
    assert out.startswith("ok: ")
    assert err == ""
    code, out, _ = run("validate", path, "--json")
    assert code == 0 and json.loads(out) == {"path": path, "ok": True, "problems": [], "counts": {},
                                             "inexact": [], "total": 0, "max_findings": 20}


def test_validate_missing_and_truncated_data_files(sharded_copy):
    os.remove(sharded_copy / "__0_0.distcp")
    data1 = sharded_copy / "__1_0.distcp"
    data1.write_bytes(data1.read_bytes()[:100])
    code, out, err = run("validate", str(sharded_copy))
    assert code == 1
    lines = out.strip().splitlines()
    md = load_metadata(sharded_copy)
    in0 = [k for k, v in md.storage_data.items() if v.relative_path == "__0_0.distcp"]
    beyond1 = [k for k, v in md.storage_data.items()
               if v.relative_path == "__1_0.distcp" and v.offset + v.length > 100]
    assert sum("file __0_0.distcp is missing" in line for line in lines) == len(in0)
    assert sum("beyond the end of __1_0.distcp (100 bytes)" in line for line in lines) == len(beyond1)
    assert len(lines) == len(in0) + len(beyond1)
    assert f"{len(lines)} problem(s)" in err


def test_validate_global_checks_on_edited_metadata():
    ck = Checkpoint(SHARDED)
    sdm = ck.metadata.state_dict_metadata
    wq = sdm["layers.0.wq.weight"]        # (8, 4) saved as rows 0-3 and 4-7
    norm = sdm["layers.0.norm.weight"]    # (5,) saved as 0-2 and 3-4
    wo = sdm["layers.0.wo.weight"]        # (4, 6) saved as cols 0-2 and 3-5
    # Overlap: the second chunk of wq starts one row early (its storage entry moves with it).
    old = wq.chunks[1]
    wq.chunks[1] = ChunkStorageMetadata((3, 0), (5, 4))
    ck.storage[MetadataIndex("layers.0.wq.weight", (3, 0))] = ck.storage.pop(
        MetadataIndex("layers.0.wq.weight", old.offsets))
    # Out of bounds and a gap: norm's second chunk grows past the end, wo loses a chunk.
    norm.chunks[1] = ChunkStorageMetadata((3,), (3,))
    del wo.chunks[1]
    problems = validate_checkpoint(ck).messages
    assert any(p.startswith("key:layers.0.wq.weight has overlapping chunks") for p in problems)
    assert any(p.startswith("key:layers.0.wq.weight invalid fill tensor-volume: 32 chunks-volume: 36")
               for p in problems)
    assert any(p.startswith("key:layers.0.norm.weight has out of bounds chunk") for p in problems)
    assert any(p.startswith("key:layers.0.wo.weight invalid fill tensor-volume: 24 chunks-volume: 12")
               for p in problems)
    # The dropped wo chunk's storage entry now names nothing in the metadata.
    assert any("names no item" in p and "layers.0.wo.weight" in p for p in problems)
    assert all("embed.weight" not in p for p in problems)


def test_validate_storage_entry_missing_and_too_short():
    ck = Checkpoint(SHARDED)
    key = MetadataIndex("layers.0.wq.weight", (0, 0))
    del ck.storage[key]
    info = ck.storage[MetadataIndex("embed.weight", (0, 0))]
    info.length = 10  # 3x4 float32 need 48 raw bytes
    problems = validate_checkpoint(ck).messages
    assert "layers.0.wq.weight: chunk 0 at offsets (0, 0) has no storage entry" in problems
    assert any(p.startswith("embed.weight: chunk 0 at offsets (0, 0) needs 48 bytes") for p in problems)


def test_validate_output_is_bounded_for_millions_of_overlapping_pairs(tmp_path):
    # 3000 copies of one chunk: a 7 kB .metadata with 4,498,500 overlapping
    # pairs. Before the bound: 4.5 million lines, 558 MB, 13 s, 1.3 GB RSS.
    size = identical_chunks(tmp_path, 3000)
    assert size < 10_000
    t0 = time.perf_counter()
    code, out, err = run("validate", str(tmp_path))
    elapsed = time.perf_counter() - t0
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 20 + 1 + 1 and len(out) < 5000
    assert all(line.startswith("key:w has overlapping chunks: ") for line in lines[:20])
    assert lines[20] == "... and 4,498,480 more overlapping chunk pairs (--max-findings 0 shows all)"
    assert lines[21] == "key:w invalid fill tensor-volume: 4 chunks-volume: 12000"
    assert err == f"ckcore: {tmp_path}: 4,498,501 problem(s)\n"
    assert elapsed < 5, elapsed


def test_validate_counts_identical_chunks_exactly_without_walking_them(tmp_path):
    # 200,000 copies (under 1 MB): 2e10 pairs, counted exactly and at once.
    identical_chunks(tmp_path, 200_000)
    t0 = time.perf_counter()
    code, out, _ = run("validate", str(tmp_path), "--max-findings", "3", "--json")
    assert time.perf_counter() - t0 < 10
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["counts"] == {"overlapping_chunks": 200_000 * 199_999 // 2, "invalid_fill": 1}
    assert report["inexact"] == [] and report["total"] == 200_000 * 199_999 // 2 + 1
    assert len(report["problems"]) == 3 + 1 and report["max_findings"] == 3


@pytest.mark.parametrize("limit, shown", [("0", 28), ("5", 5), ("28", 28), ("100", 28)])
def test_max_findings(tmp_path, limit, shown):
    identical_chunks(tmp_path, 8)  # 28 pairs
    code, out, err = run("validate", str(tmp_path), "--max-findings", limit)
    assert code == 1
    lines = out.splitlines()
    assert sum(line.startswith("key:w has overlapping chunks") for line in lines) == shown
    more = [line for line in lines if line.startswith("...")]
    expected = f"... and {28 - shown} more overlapping chunk pairs (--max-findings 0 shows all)"
    assert more == ([] if shown == 28 else [expected])
    assert err.endswith(": 29 problem(s)\n")
    code, out, _ = run("validate", str(tmp_path), "--max-findings", limit, "--json")
    report = json.loads(out)
    assert len(report["problems"]) == shown + 1
    assert report["counts"] == {"overlapping_chunks": 28, "invalid_fill": 1}


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_max_findings_must_be_a_count(value):
    code, out, err = run("validate", SHARDED, "--max-findings", value)
    assert code == 2 and out == ""
    assert "argument --max-findings: expected a count >= 0" in one_error_line(err)


def test_pair_count_stops_at_the_limit_and_says_at_least(tmp_path, monkeypatch):
    # 200 distinct chunks that all overlap (each starts one element later and
    # reaches past the others' ends): 19,900 pairs walked one by one.
    chunks = [ChunkStorageMetadata((i,), (400,)) for i in range(200)]
    write_crafted(tmp_path, {"w": ((600,), chunks)})
    monkeypatch.setattr(ckcore.report, "PAIR_COUNT_LIMIT", 1000)
    code, out, err = run("validate", str(tmp_path))
    assert code == 1
    more = [line for line in out.splitlines() if line.startswith("...")]
    assert more == ["... and at least 980 more overlapping chunk pairs (counting stopped at 1,000)"]
    assert err == f"ckcore: {tmp_path}: at least 1,001 problem(s)\n"  # + the overfill
    code, out, _ = run("validate", str(tmp_path), "--json")
    report = json.loads(out)
    assert report["inexact"] == ["overlapping_chunks"] and report["counts"]["overlapping_chunks"] == 1000
    # No limit: every pair counted (and shown).
    code, out, _ = run("validate", str(tmp_path), "--max-findings", "0", "--json")
    report = json.loads(out)
    assert report["inexact"] == [] and report["counts"]["overlapping_chunks"] == 19_900
    assert len(report["problems"]) == 19_900 + 1


def test_overlap_sweep_budget(tmp_path, monkeypatch):
    # Chunks that share a sweep interval, overlap nowhere, and that no
    # dimension splits: the sweep would compare every pair.
    n = 300
    chunks = [ChunkStorageMetadata((i, i), (n, 1)) for i in range(n)]
    chunks.append(ChunkStorageMetadata((10 * n, 0), (n, n)))
    write_crafted(tmp_path, {"w": ((11 * n, n), chunks)})
    code, out, _ = run("validate", str(tmp_path), "--json")
    assert "overlap_check_stopped" not in json.loads(out)["counts"]
    monkeypatch.setattr(ckcore.report, "SWEEP_BUDGET", 1000)
    code, out, _ = run("validate", str(tmp_path))
    assert code == 1
    assert "key:w overlap check stopped: its 301 chunks need more than 1,000 comparisons" in out


def test_storage_findings_are_bounded_per_kind(tmp_path):
    # 5000 chunks tiling a tensor, their data file gone: one finding per
    # storage entry, 20 shown.
    chunks = [ChunkStorageMetadata((i,), (1,)) for i in range(5000)]
    write_crafted(tmp_path, {"w": ((5000,), chunks)})
    os.remove(tmp_path / "__0_0.distcp")
    code, out, err = run("validate", str(tmp_path))
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 21
    assert lines[0] == "w: file __0_0.distcp is missing"
    assert lines[-1] == "... and 4,980 more storage entries in missing files (--max-findings 0 shows all)"
    assert err.endswith(": 5,000 problem(s)\n")


def test_huge_and_multiline_fqns_are_bounded_in_findings(tmp_path):
    # A 1 MB fqn, repeated in every message, and one with a newline that
    # would forge a line of output.
    long_fqn = "a" * 1_000_000
    c = ChunkStorageMetadata((0,), (4,))
    write_crafted(tmp_path, {"x\nok: forged": ((4,), [c, c]), long_fqn: ((4,), [c] * 50)}, storage={})
    code, out, _ = run("validate", str(tmp_path))
    assert code == 1
    lines = out.splitlines()
    assert max(map(len, lines)) < 1000
    assert not any(line.startswith("ok:") for line in lines)
    assert any(line.startswith("key:'x\\nok: forged' has overlapping chunks") for line in lines)
    assert len(out) < 40_000
    code, out, _ = run("validate", str(tmp_path), "--json")
    assert len(out) < 40_000


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "delete", "unsafe"])
@pytest.mark.parametrize("command", ["inspect", "validate", "plan"])
def test_bad_metadata_is_one_error_line(sharded_copy, damage, command):
    meta = sharded_copy / ".metadata"
    raw = meta.read_bytes()
    if damage == "truncate":
        meta.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        meta.write_bytes(b"\x80\x04not a pickle at all" + raw[40:80])
    elif damage == "empty":
        meta.write_bytes(b"")
    elif damage == "delete":
        meta.unlink()
    else:
        meta.write_bytes(pickle.dumps(os.system))  # names posix.system: must not run
    extra = ["--world-size", "2"] if command == "plan" else []
    code, out, err = run(command, str(sharded_copy), *extra)
    assert code == 2
    assert out == ""
    line = one_error_line(err)
    assert ".metadata" in line
    if damage == "unsafe":
        assert "refusing global" in line


@pytest.mark.parametrize("command", ["inspect", "validate", "plan"])
def test_missing_path(tmp_path, command):
    extra = ["--world-size", "2"] if command == "plan" else []
    code, out, err = run(command, str(tmp_path / "nope"), *extra)
    assert code == 2 and out == ""
    assert "no such file or directory" in one_error_line(err)


def test_inspect_of_a_crafted_file_is_proportional_to_it(tmp_path):
    # 40 tensors sharing one 1000-dim size tuple (and one chunk list), next
    # to a 100 kB fqn and one with a newline: inspect prints what the file holds.
    dims = (1,) * 1000
    chunks = [ChunkStorageMetadata((0,) * 1000, dims)]
    long_fqn = "b" * 100_000
    tensors = {f"t{i}": (dims, chunks) for i in range(40)}
    tensors[long_fqn] = ((2, 3), [])
    tensors["x\nfake row"] = ((4,), [])
    size = write_crafted(tmp_path, tensors)
    code, out, err = run("inspect", str(tmp_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    t0 = report["tensors"]["t0"]
    assert t0["shape"] is None and t0["ndim"] == 1000 and t0["bytes"] == 4
    assert report["tensors"][long_fqn]["shape"] == [2, 3]
    assert len(out) < 300 * size
    code, text, _ = run("inspect", str(tmp_path))
    assert code == 0
    lines = text.splitlines()
    assert len(lines) < 2100 and max(map(len, lines)) < 500
    assert any(line.startswith("t0 ") and "(...<1000 dims>)" in line for line in lines)
    assert any(line.startswith("'x\\nfake row'") for line in lines)
    assert not any(line.startswith("fake row") for line in lines)


def test_shapes_shared_beyond_the_file_size_are_refused(tmp_path):
    # 2000 tensors sharing them: 2 million chunk dims from a small file. The
    # reader refuses it, so no command works through what the file never held.
    dims = (1,) * 1000
    chunks = [ChunkStorageMetadata((0,) * 1000, dims)]
    write_crafted(tmp_path, {f"t{i}": (dims, chunks) for i in range(2000)})
    for command in ("inspect", "validate"):
        code, out, err = run(command, str(tmp_path))
        assert code == 2 and out == "", (command, out)
        assert "more chunk dimensions than a file of" in err and err.count("\n") == 1


def test_storage_entries_that_are_not_records(tmp_path):
    # A tuple where a _StorageInfo belongs: the reader keeps it (custom
    # writers store their own records); nothing may read fields off it.
    c = ChunkStorageMetadata((0,), (4,))
    write_crafted(tmp_path, {"w": ((4,), [c])},
                  storage={MetadataIndex("w", (0,)): ("__0_0.distcp", 0, 16)}, data={})
    code, out, err = run("inspect", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"]["w"]["stored_bytes"] is None
    code, out, _ = run("validate", str(tmp_path))
    assert code == 1
    assert "storage entry w at offsets (0,) is a tuple, not a FileSystemWriter record" in out
    code, out, err = run("plan", str(tmp_path), "--world-size", "2")
    assert code == 2 and out == ""
    assert "is a tuple, not a FileSystemWriter record" in one_error_line(err)


@pytest.mark.parametrize("case, message", [
    ("identical", "w: saved chunks overlap"),
    ("identical-empty", "w: two saved chunks start at the same offsets"),
    ("0-d", "w: two saved chunks start at the same offsets"),
])
def test_plan_refuses_repeated_chunks(tmp_path, case, message):
    # A chunk repeated 100,000 times (2 to 5 bytes a copy) would be read by
    # every rank 100,000 times: plan refuses what no save writes.
    if case == "identical":
        tensors = {"w": ((4,), [ChunkStorageMetadata((0,), (4,))] * 100_000)}
    elif case == "identical-empty":  # empty, strictly inside the target chunks
        tensors = {"w": ((4,), [ChunkStorageMetadata((0,), (4,)), *[ChunkStorageMetadata((2,), (0,))] * 100_000])}
    else:
        tensors = {"w": ((), [ChunkStorageMetadata((), ())] * 100_000)}
    write_crafted(tmp_path, tensors)
    code, out, err = run("plan", str(tmp_path), "--world-size", "1000")
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_plan_errors_bound_long_fqns(tmp_path):
    long_fqn = "c" * 1_000_000
    write_crafted(tmp_path, {long_fqn: ((4,), [ChunkStorageMetadata((0,), (4,))])})
    code, out, err = run("plan", str(tmp_path), "--mesh", "2", "--layout", "*=S(3)")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert len(line) < 1100 and "...<1000000 chars>" in line


# --------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------


def _overlap(a_off, a_size, b_off, b_size):
    # torch's predicate: overlap unless separated in some dimension.
    for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size):
        if ao >= bo + bsz or bo >= ao + asz:
            return False
    return True


def _naive_plan(path, world, dim):
    """Per-rank reads for a 1-d mesh sharding tensor dim ``dim`` (torch.chunk cuts), pure Python."""
    md = load_metadata(path)
    storage = md.storage_data
    out = []
    for r in range(world):
        items = useful = 0
        reads = set()
        for fqn, t in md.state_dict_metadata.items():
            if not isinstance(t, TensorStorageMetadata):
                info = storage[MetadataIndex(fqn)]
                items += 1
                useful += info.length
                reads.add((info.relative_path, info.offset, info.length))
                continue
            off, size = [0] * len(t.size), list(t.size)
            if dim < len(t.size):
                n = t.size[dim]
                step = -(-n // world)
                start, stop = min(n, r * step), min(n, (r + 1) * step)
                off[dim], size[dim] = start, stop - start
            for c in t.chunks:
                if _overlap(off, size, c.offsets, c.sizes):
                    items += 1
                    lengths = [min(a + s, b + z) - max(a, b)
                               for a, s, b, z in zip(off, size, c.offsets, c.sizes)]
                    useful += math.prod(lengths) * itemsize(t.properties.dtype)
                    info = storage[MetadataIndex(fqn, c.offsets)]
                    reads.add((info.relative_path, info.offset, info.length))
        calls = nbytes = 0
        cur = None
        for f, o, n in sorted(reads):
            if cur is not None and cur[0] == f and o <= cur[2]:
                cur[2] = max(cur[2], o + n)
                continue
            if cur is not None:
                nbytes += cur[2] - cur[1]
            calls += 1
            cur = [f, o, o + n]
        if cur is not None:
            nbytes += cur[2] - cur[1]
        out.append({"rank": r, "read_items": items, "useful_bytes": useful, "read_calls": calls,
                    "bytes_read": nbytes, "files": len({f for f, _, _ in reads}),
                    "over_read": nbytes - useful})
    return out


@pytest.mark.parametrize("path", [SMALL, SHARDED])
@pytest.mark.parametrize("world, dim", [(1, 0), (2, 0), (3, 0), (4, 1), (5, 0)])
def test_plan_matches_naive_reference(path, world, dim):
    code, out, err = run("plan", path, "--world-size", str(world), "--shard-dim", str(dim), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["coalescing"] == COALESCING
    expected = {r["rank"]: r for r in _naive_plan(path, world, dim)}
    got = {r["rank"]: r for r in report["ranks"]}
    assert set(got) == set(range(world))
    for rank, exp in expected.items():
        row = {k: got[rank][k] for k in exp}
        assert row == exp, rank
    # heaviest first
    read = [r["bytes_read"] for r in report["ranks"]]
    assert read == sorted(read, reverse=True)
    t = report["totals"]
    assert t["bytes_read"] == sum(read)
    assert t["read_items"] == sum(r["read_items"] for r in expected.values())


def test_plan_mesh_and_layout_rules_text():
    # wq rows over the first mesh dim, wo columns over the second, everything else replicated.
    code, out, err = run("plan", SHARDED, "--mesh", "2x2",
                         "--layout", "*.wq.weight=S(0),R", "--layout", "*.wo.weight=R,S(1)",
                         "--layout", "*=R,R", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["mesh"] == [2, 2] and report["world_size"] == 4
    by_rank = {r["rank"]: r for r in report["ranks"]}
    assert by_rank[3]["coordinate"] == [1, 1]
    # wq: rank (i, j) needs rows 4i..4i+3 = exactly saved chunk i (1 item); wo: cols 3j.. = chunk j;
    # norm: 2 saved chunks; embed: 1; step: 1 -> 6 items each.
    assert all(r["read_items"] == 6 for r in report["ranks"])
    md = load_metadata(SHARDED)
    useful = 4 * 4 * 4 + 4 * 3 * 2 + 5 * 4 + 3 * 4 * 4 + md.storage_data[MetadataIndex("step")].length
    assert all(r["useful_bytes"] == useful for r in report["ranks"])
    code, text, _ = run("plan", SHARDED, "--mesh", "2,2", "--layout", "R,R", "--top", "2")
    assert code == 0
    assert "on mesh 2x2 (4 ranks)" in text
    assert "2 lighter ranks not shown" in text


def test_first_matching_rule_wins():
    rules = parse_layout_rules(["*.wq.weight=S(0)", "*=R", "Shard(dim=0)"])
    assert [p for p, _ in rules] == ["*.wq.weight", "*", "*"]
    md = load_metadata(SHARDED)
    mesh, layouts = resolve_layouts(md, mesh=(2,), rules=rules)
    assert mesh == (2,)
    assert str(layouts["layers.0.wq.weight"][1][0]) == "S(0)"
    assert str(layouts["embed.weight"][1][0]) == "R"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "2", "--layout", "*=S(2)"], "layers.0.wq.weight: layout S(2) on mesh 2 does not fit"),
        (["--mesh", "2", "--layout", "*.wq.weight=S(1)"], "no --layout pattern matches"),
        (["--mesh", "2x2", "--layout", "*=S(0)"], "has 1 placements but the mesh 2x2 has 2 dims"),
        (["--mesh", "2", "--layout", "*=Q(0)"], "cannot parse placement"),
        (["--mesh", "2", "--layout", "=S(0)"], "empty fqn pattern"),
        (["--mesh", "0x2", "--layout", "*=R,R"], "--mesh"),
        (["--mesh", "two", "--layout", "*=R"], "--mesh"),
        (["--mesh", "2"], "give a target layout"),
        ([], "give a target layout"),
        (["--world-size", "2", "--mesh", "2", "--layout", "R"], "not both"),
        (["--world-size", "0"], "--world-size must be >= 1"),
    ],
)
def test_plan_bad_layouts_are_one_error_line(argv, message):
    code, out, err = run("plan", SHARDED, *argv)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_plan_shard_dim_too_large_replicates():
    # --shard-dim beyond a tensor's dims replicates it (FSDP's rule for small tensors).
    code, out, _ = run("plan", SHARDED, "--world-size", "2", "--shard-dim", "5", "--json")
    assert code == 0
    ranks = json.loads(out)["ranks"]
    md = load_metadata(SHARDED)
    total_chunks = sum(len(t.chunks) for t in md.state_dict_metadata.values()
                       if isinstance(t, TensorStorageMetadata))
    assert all(r["read_items"] == total_chunks + 1 for r in ranks)


def test_plan_missing_storage_entry_is_an_error_line():
    ck = Checkpoint(SHARDED)
    del ck.storage[MetadataIndex("layers.0.wq.weight", (0, 0))]
    mesh, layouts = resolve_layouts(ck.metadata, world_size=2)
    with pytest.raises(ValueError, match="chunk 0 at offsets \\(0, 0\\) has no storage entry"):
        plan_reads(ck, mesh, layouts)


def test_coalesce_matches_naive_merge():
    rng = random.Random(1234)
    for trial in range(200):
        world = rng.randint(1, 5)
        n = rng.randint(0, 40)
        reads = []
        for _ in range(n):
            r, f = rng.randrange(world), rng.randrange(3)
            o = rng.randrange(0, 60)
            ln = rng.choice([0, 1, 5, 10, 30])
            reads.append((r, f, o, ln))
            if rng.random() < 0.2:
                reads.append((r, f, o, ln))  # duplicate
            if rng.random() < 0.2:
                reads.append((r, f, o + ln, rng.randrange(1, 8)))  # touching
        arr = np.array(reads, dtype=np.int64).reshape(-1, 4)
        calls, nbytes, files = _coalesce(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], world)
        for rank in range(world):
            mine = sorted((f, o, o + ln) for r, f, o, ln in reads if r == rank)
            merged = []
            for f, s, e in mine:
                if merged and merged[-1][0] == f and s <= merged[-1][2]:
                    merged[-1][2] = max(merged[-1][2], e)
                else:
                    merged.append([f, s, e])
            assert calls[rank] == len(merged), (trial, rank)
            assert nbytes[rank] == sum(e - s for _, s, e in merged), (trial, rank)
            assert files[rank] == len({f for f, _, _ in mine}), (trial, rank)


# --------------------------------------------------------------------------
# demo, progress, entry points
# --------------------------------------------------------------------------


def test_demo_without_torch_timing():
    code, out, err = run("demo", "--layers", "2", "--save-fsdp", "8", "--load-fsdp", "2",
                         "--load-tp", "2", "--no-torch", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["torch_version"] is None
    assert all(row["torch"] is None and row["ckcore"] > 0 for row in report["timings_s"].values())
    # 2 layers: 9 per layer + 3 tensors; every saving rank writes one chunk of each.
    assert report["write_items"] == 8 * (2 * 9 + 3)
    assert report["traffic_bytes_per_rank"]["ckcore"] > 0
    assert report["traffic_bytes_per_rank"]["torch"] is None
    plan = report["plan"]
    assert plan["world_size"] == 4 and plan["totals"]["read_items"] == report["read_items"]
    # Every element of every tensor is loaded by exactly the TP-replicated ranks:
    # norms are replicated over TP (2 copies), every other tensor is sharded.
    from ckcore import _models

    shapes = _models.llama70b_state_dict_shapes(2)
    norms = sum(math.prod(s) for f, s in shapes.items() if f.endswith("norm.weight"))
    others = sum(math.prod(s) for f, s in shapes.items() if not f.endswith("norm.weight"))
    assert plan["totals"]["useful_bytes"] == 2 * (others + 2 * norms)


def test_demo_text():
    code, out, _ = run("demo", "--layers", "1", "--save-fsdp", "4", "--load-fsdp", "2",
                       "--load-tp", "2", "--no-torch")
    assert code == 0
    assert "global save plan" in out and "load plan, all ranks: arrays" in out
    assert "(torch not timed" in out
    assert "on mesh 2x2 (4 ranks)" in out


@pytest.mark.parametrize("flag", ["--layers", "--save-fsdp", "--repeat"])
def test_demo_bad_arguments(flag):
    code, _, err = run("demo", flag, "0", "--no-torch")
    assert code == 2 and "must be >= 1" in one_error_line(err)


def test_progress_only_when_asked_or_tty():
    code, _, err = run("plan", SHARDED, "--world-size", "2")
    assert code == 0 and err == ""
    code, _, err = run("plan", SHARDED, "--world-size", "2", "--progress")
    assert code == 0 and "planning reads: 4/4 (100%)" in err

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress(tty)
    p.start("work", 3)
    p.update(3)
    p.done()
    assert "\r" in tty.getvalue() and "work: 3/3 (100%)" in tty.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["validate"], "the following arguments are required: path (see 'ckcore validate --help')"),
        (["validate", SHARDED, "--bogus"], "unrecognized arguments: --bogus"),
        (["plan", SHARDED, "--world-size", "x"], "argument --world-size: invalid int value: 'x'"),
        (["inspect", SHARDED, "--json=yes"], "--json: ignored explicit argument 'yes'"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(argv, message):
    # argparse's own errors (usage block + message, sys.exit(2)) become one line and a return value.
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"], ["plan", "-h"]])
def test_help_still_works(argv):
    code, out, err = run(*argv)
    assert code == 0 and err == ""
    assert out.startswith("usage: ckcore")


def _raise(exc):
    def boom(*args, **kwargs):
        raise exc
    return boom


def test_internal_error_is_one_line_with_status_2(monkeypatch):
    # A bug (any unexpected exception): one line naming its type, status 2, no traceback.
    monkeypatch.delenv("CKCORE_DEBUG", raising=False)
    monkeypatch.setattr(ckcore.report, "inspect_checkpoint", _raise(KeyError("first\nsecond")))
    code, out, err = run("inspect", SHARDED)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith("ckcore: error: internal error: KeyError: ") and "CKCORE_DEBUG=1" in line
    monkeypatch.setenv("CKCORE_DEBUG", "1")
    with pytest.raises(KeyError):
        run("inspect", SHARDED)


def test_out_of_memory_is_one_line_with_status_2(monkeypatch):
    monkeypatch.delenv("CKCORE_DEBUG", raising=False)
    monkeypatch.setattr(ckcore.report, "validate_checkpoint", _raise(MemoryError()))
    code, out, err = run("validate", SHARDED)
    assert code == 2 and out == ""
    assert one_error_line(err) == "ckcore: error: out of memory"


def test_error_line_is_bounded_and_printable(monkeypatch):
    # A message quoting a megabyte of file content with control characters in it.
    monkeypatch.delenv("CKCORE_DEBUG", raising=False)
    hostile = "\x1b[2J" + "x" * 1_000_000 + "\nckcore: error: fake second line\r"
    monkeypatch.setattr(ckcore.report, "inspect_checkpoint", _raise(ValueError(hostile)))
    code, _, err = run("inspect", SHARDED)
    line = one_error_line(err)
    assert code == 2 and len(line) <= 1100 and line.isprintable()
    assert "\\x1b" in line


def test_exit_statuses_are_0_1_2_or_130():
    # The documented contract, checked on the source: every status main() and
    # the commands return is 0, 1, 2 (or 130 on Ctrl-C), and nothing exits itself.
    import ast
    from pathlib import Path

    tree = ast.parse(Path(ckcore.cli.__file__).read_text(encoding="utf-8"))
    exits = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", getattr(n.func, "id", None)) in ("exit", "_exit")]
    assert exits == []
    statuses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and (node.name == "main" or node.name.startswith("_cmd_")):
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    if ast.unparse(ret.value).startswith("_COMMANDS["):
                        continue  # main returns what a command returns
                    values = [n for n in ast.walk(ret.value) if isinstance(n, ast.Constant)]
                    assert values, f"{node.name}: return {ast.unparse(ret.value)} is not a literal status"
                    statuses |= {n.value for n in values if isinstance(n.value, int)}
    assert statuses == {0, 1, 2, 130}
    main_py = Path(ckcore.cli.__file__).with_name("__main__.py")
    assert "sys.exit(main())" in main_py.read_text(encoding="utf-8")


def test_cli_never_imports_torch():
    code = (
        "import sys\n"
        "from ckcore.cli import main\n"
        f"assert main(['inspect', {SHARDED!r}]) == 0\n"
        f"assert main(['validate', {SHARDED!r}]) == 0\n"
        f"assert main(['plan', {SHARDED!r}, '--mesh', '2x1', '--layout', 'S(0),R']) == 0\n"
        "assert main(['demo', '--layers', '1', '--save-fsdp', '2', '--load-fsdp', '1', '--load-tp', '2',"
        " '--no-torch']) == 0\n"
        "assert 'torch' not in sys.modules, 'the CLI imported torch'\n"
    )
    # The ckcore under test (source tree or installed wheel), not whatever cwd holds.
    env = dict(os.environ, PYTHONPATH=CKCORE_HOME + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_plan_refuses_byte_counts_beyond_int64():
    ck = Checkpoint(SHARDED)
    info = ck.storage[MetadataIndex("embed.weight", (0, 0))]
    info.offset = 2**63 - 100  # a crafted entry: offset and length fit, their sum does not
    mesh, layouts = resolve_layouts(ck.metadata, world_size=2)
    with pytest.raises(ValueError, match=r"embed.weight: storage entry ends at byte 92233720368547\d+, beyond int64"):
        plan_reads(ck, mesh, layouts)
    problems = validate_checkpoint(ck).messages
    assert any(p.startswith("embed.weight: bytes [9223372036854775708,") for p in problems)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", SHARDED, "--world-size", str(2**21)], "ckcore plan handles 1 to 1048576"),
        (["plan", SHARDED, "--mesh", "2048x1024", "--layout", "R,R"], "has 2097152 ranks"),
        (["demo", "--save-fsdp", "5000", "--no-torch"], "capped"),
    ],
)
def test_sizes_that_would_exhaust_memory_are_refused(argv, message):
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_validate_overlapping_storage_entries():
    ck = Checkpoint(SHARDED)
    a = ck.storage[MetadataIndex("layers.0.wq.weight", (4, 0))]
    b = ck.storage[MetadataIndex("embed.weight", (0, 0))]
    assert a.relative_path == b.relative_path
    b.offset = a.offset + 10  # embed's bytes now start inside wq's second chunk
    problems = validate_checkpoint(ck).messages
    hits = [p for p in problems if "overlap those of" in p]
    expected = (
        f"embed.weight: bytes [{a.offset + 10}, {a.offset + 10 + b.length}) of {a.relative_path} "
        f"overlap those of layers.0.wq.weight (up to byte {a.offset + a.length})"
    )
    assert hits == [expected]
    assert validate_checkpoint(Checkpoint(SHARDED)).ok


def test_mutated_metadata_never_crashes(tmp_path):
    # Random byte edits of a real .metadata: every command ends with a status
    # (0, 1 or 2) and at most one error line, never an internal error or a traceback.
    dst = tmp_path / "ckpt"
    shutil.copytree(SHARDED, dst)
    raw = (dst / ".metadata").read_bytes()
    rng = random.Random(7)
    seen = set()
    for _ in range(120):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(len(b))
            op = rng.random()
            if op < 0.6:
                b[k] = rng.randrange(256)
            elif op < 0.8:
                del b[k:k + rng.randint(1, 8)]
            else:
                b[k:k] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        (dst / ".metadata").write_bytes(bytes(b))
        for argv in (["inspect", dst], ["validate", dst], ["plan", dst, "--world-size", "3"]):
            code, _, err = run(*map(str, argv))
            seen.add(code)
            assert code in (0, 1, 2), err
            assert "Traceback" not in err and "internal error" not in err
            if code == 2:
                one_error_line(err)
    assert 2 in seen  # the edits did break the file most of the time
