"""The ckcore command on checkpoints saved by torch.distributed.checkpoint in the test.

Differential where torch has an answer: ``inspect`` against torch's own
``FileSystemReader.read_metadata``, ``validate``'s global checks against
torch's ``_validate_global_plan`` on the same (edited) metadata, ``plan``
against torch's ``create_read_items_for_chunk_list`` per rank, and ``demo``
with torch's timing. One checkpoint is saved by 2 gloo processes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint import planner_helpers as tph
from torch.distributed.checkpoint.default_planner import _validate_global_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan as TorchSavePlan

import ckcore
from ckcore.cli import main
from ckcore.layout import chunks_for_mesh
from tests.support.paths import TESTS

HERE = str(TESTS)
CKCORE_HOME = os.path.dirname(os.path.dirname(os.path.abspath(ckcore.__file__)))


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckcore: error: "), err
    assert "Traceback" not in err
    return lines[0]


def torch_md(path) -> tmd.Metadata:
    return FileSystemReader(str(path)).read_metadata()


def write_torch_md(path, md: tmd.Metadata) -> None:
    # What FileSystemWriter.finish does: a plain pickle of torch's Metadata.
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A single-process DCP save: several dtypes and ranks, a 0-d tensor, bytes items."""
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {
            "wq": torch.randn(16, 8, generator=g),
            "wo": torch.randn(8, 16, generator=g).to(torch.bfloat16),
            "norm": torch.ones(8, dtype=torch.float16),
            "ids": torch.arange(12, dtype=torch.int64).reshape(2, 3, 2),
        },
        "step": torch.tensor(5),
        "empty": torch.zeros(0, 4),
        "extra": {"name": "run-1", "lr": 3e-4},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))
    return path


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    """The 2-process gloo save of tests/data/make_cli_fixture.py, run fresh with the installed torch."""
    path = tmp_path_factory.mktemp("gloo") / "ckpt"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "data", "make_cli_fixture.py"), str(path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------


def test_inspect_equals_torchs_metadata(saved):
    code, out, err = run("inspect", saved, "--json")
    assert code == 0, err
    report = json.loads(out)
    md = torch_md(saved)
    tensors = {k: v for k, v in md.state_dict_metadata.items()
               if isinstance(v, tmd.TensorStorageMetadata)}
    assert set(report["tensors"]) == set(tensors)
    for fqn, t in tensors.items():
        row = report["tensors"][fqn]
        assert "torch." + row["dtype"] == str(t.properties.dtype)
        assert row["shape"] == list(t.size)
        assert row["chunks"] == len(t.chunks)
        elem = torch.empty(0, dtype=t.properties.dtype).element_size()
        assert row["bytes"] == t.size.numel() * elem
        assert row["stored_bytes"] == sum(
            md.storage_data[tmd.MetadataIndex(fqn, c.offsets)].length for c in t.chunks)
    assert set(report["bytes_items"]) == set(md.state_dict_metadata) - set(tensors)
    files = sorted(f for f in os.listdir(saved) if f.endswith(".distcp"))
    assert sorted(report["files"]) == files
    assert report["totals"]["file_bytes"] == sum(os.path.getsize(saved / f) for f in files)


def test_inspect_text(saved):
    code, out, _ = run("inspect", saved)
    assert code == 0
    assert re.search(r"model\.wo\s+bfloat16\s+\(8, 16\)\s+1\s+256 B", out)
    assert re.search(r"step\s+int64\s+\(\)\s+1\s+8 B", out)
    assert "extra.name" in out and "__0_0.distcp" in out


# --------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------


def test_validate_sound(saved):
    code, out, err = run("validate", saved)
    assert code == 0, out + err
    assert out.startswith("ok: ")


def _edit_chunks(path, fqn, chunks):
    md = torch_md(path)
    t = md.state_dict_metadata[fqn]
    md.state_dict_metadata[fqn] = dataclasses.replace(
        t, chunks=[tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
    # Give every chunk its own storage entry, back to back in a new file, so
    # only the global checks can fire.
    for c in t.chunks:
        del md.storage_data[tmd.MetadataIndex(fqn, c.offsets)]
    pos = 0
    for o, s in chunks:
        n = math.prod(s) * t.properties.dtype.itemsize
        md.storage_data[tmd.MetadataIndex(fqn, torch.Size(o))] = _StorageInfo("edited.distcp", pos, n)
        pos += n
    (path / "edited.distcp").write_bytes(bytes(pos))
    write_torch_md(path, md)
    return md


def _kinds(messages):
    # "key:{fqn} has overlapping chunks: ..." -> ("model.wq", "has overlapping chunks")
    out = []
    for m in messages:
        match = re.match(r"key:(\S+) (has out of bounds chunk|has overlapping chunks|invalid fill)", m)
        if match:
            out.append(match.groups())
    return sorted(out)


@pytest.mark.parametrize(
    "chunks",
    [
        [((0, 0), (10, 8)), ((8, 0), (8, 8))],                       # overlap
        [((0, 0), (8, 8)), ((8, 0), (9, 8))],                        # out of bounds (and overfill)
        [((0, 0), (8, 8)), ((9, 0), (7, 8))],                        # gap: invalid fill
        [((0, 0), (16, 8)), ((4, 4), (0, 0))],                       # empty chunk strictly inside
        [((0, 0), (8, 8)), ((8, 0), (8, 4)), ((8, 4), (8, 4))],      # sound, 3 chunks
        [((0, 0), (16, 8)), ((0, 0), (16, 8)), ((15, 7), (1, 1))],   # duplicate + overlap
    ],
)
def test_validate_global_checks_equal_torch(copy, chunks):
    md = _edit_chunks(copy, "model.wq", chunks)
    # torch reports the fill only with more than one plan; a checkpoint is always checked.
    expected = _kinds(_validate_global_plan([TorchSavePlan([]), TorchSavePlan([])], md))
    code, out, err = run("validate", copy)
    got = _kinds(out.splitlines())
    assert got == expected
    assert code == (1 if expected else 0), out + err
    if expected:
        assert f"{len(out.splitlines())} problem(s)" in err


def test_validate_missing_and_truncated_data(copy):
    (copy / "__0_0.distcp").rename(copy / "elsewhere")
    code, out, _ = run("validate", copy)
    assert code == 1
    n_entries = len(torch_md(copy).storage_data)
    assert out.count("file __0_0.distcp is missing") == n_entries
    (copy / "elsewhere").rename(copy / "__0_0.distcp")
    data = (copy / "__0_0.distcp").read_bytes()
    (copy / "__0_0.distcp").write_bytes(data[:-1])
    code, out, _ = run("validate", copy, "--json")
    assert code == 1
    problems = json.loads(out)["problems"]
    assert len(problems) == 1 and "lie beyond the end of __0_0.distcp" in problems[0]


def test_validate_storage_entry_removed(copy):
    md = torch_md(copy)
    key = tmd.MetadataIndex("model.wo", torch.Size((0, 0)))
    del md.storage_data[key]
    write_torch_md(copy, md)
    code, out, _ = run("validate", copy)
    assert code == 1
    assert out.strip() == "model.wo: chunk 0 at offsets (0, 0) has no storage entry"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not-metadata"])
@pytest.mark.parametrize("command", ["inspect", "validate", "plan"])
def test_corrupted_metadata(copy, damage, command):
    meta = copy / ".metadata"
    raw = meta.read_bytes()
    if damage == "truncated":
        meta.write_bytes(raw[:-7])
    elif damage == "flipped":
        meta.write_bytes(raw[:20] + bytes(b ^ 0xFF for b in raw[20:60]) + raw[60:])
    else:
        meta.write_bytes(pickle.dumps({"model.wq": [1, 2, 3]}))
    extra = ["--world-size", 2] if command == "plan" else []
    code, out, err = run(command, copy, *extra)
    assert code == 2 and out == ""
    assert ".metadata" in one_error_line(err)


# --------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------


def _torch_plan(path, mesh, placements_of):
    """Per-rank reads from torch's create_read_items_for_chunk_list and torch's storage_data."""
    md = torch_md(path)
    world = math.prod(mesh)
    per_rank = [{"items": 0, "useful": 0, "reads": set()} for _ in range(world)]
    for fqn, t in md.state_dict_metadata.items():
        if not isinstance(t, tmd.TensorStorageMetadata):
            info = md.storage_data[tmd.MetadataIndex(fqn)]
            for r in per_rank:
                r["items"] += 1
                r["useful"] += info.length
                r["reads"].add((info.relative_path, info.offset, info.length))
            continue
        elem = torch.empty(0, dtype=t.properties.dtype).element_size()
        local = chunks_for_mesh(tuple(t.size), mesh, placements_of(fqn, t))
        for rank, chunk in enumerate(local):
            tchunk = tmd.ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes))
            for item in tph.create_read_items_for_chunk_list(fqn, t, [tchunk]):
                r = per_rank[rank]
                r["items"] += 1
                r["useful"] += math.prod(item.lengths) * elem
                info = md.storage_data[item.storage_index]
                r["reads"].add((info.relative_path, info.offset, info.length))
    out = {}
    for rank, r in enumerate(per_rank):
        merged = []
        for f, o, n in sorted(r["reads"]):
            if merged and merged[-1][0] == f and o <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], o + n)
            else:
                merged.append([f, o, o + n])
        nbytes = sum(e - s for _, s, e in merged)
        out[rank] = {"read_items": r["items"], "useful_bytes": r["useful"],
                     "read_calls": len(merged), "bytes_read": nbytes,
                     "files": len({f for f, _, _ in r["reads"]}), "over_read": nbytes - r["useful"]}
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_plan_world_size_equals_torch(saved, world):
    code, out, err = run("plan", saved, "--world-size", world, "--json")
    assert code == 0, err
    got = {r["rank"]: {k: r[k] for k in ("read_items", "useful_bytes", "read_calls", "bytes_read",
                                           "files", "over_read")}
           for r in json.loads(out)["ranks"]}
    expected = _torch_plan(saved, (world,), lambda fqn, t: "S(0)" if len(t.size) else "R")
    assert got == expected


def test_plan_mesh_rules_on_two_rank_checkpoint_equals_torch(two_rank):
    rules = {"layers.0.wq.weight": "S(1),S(0)", "layers.0.wo.weight": "S(0),S(1)"}
    argv = ["--mesh", "2x3"]
    for fqn, p in rules.items():
        argv += ["--layout", f"{fqn}={p}"]
    argv += ["--layout", "*norm*=R,S(0)", "--layout", "*=R,R"]
    code, out, err = run("plan", two_rank, *argv, "--json")
    assert code == 0, err
    report = json.loads(out)
    got = {r["rank"]: {k: r[k] for k in ("read_items", "useful_bytes", "read_calls", "bytes_read",
                                           "files", "over_read")} for r in report["ranks"]}

    def placements(fqn, t):
        if fqn in rules:
            return rules[fqn]
        return "R,S(0)" if "norm" in fqn else "R,R"

    assert got == _torch_plan(two_rank, (2, 3), placements)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "2", "--layout", "*=S(0)"], "step: layout S(0) on mesh 2 does not fit the tensor ()"),
        (["--mesh", "2", "--layout", "model.*=S(3)", "--layout", "*=R"],
         "model.wq: layout S(3) on mesh 2 does not fit"),
        (["--mesh", "4", "--layout", "model.*=_S(0, 0)", "--layout", "*=R"], "split_factor"),
        (["--mesh", "2x2", "--layout", "*=S(0),R,R"], "has 3 placements"),
    ],
)
def test_plan_bad_layout(saved, argv, message):
    code, out, err = run("plan", saved, *argv)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


# --------------------------------------------------------------------------
# the 2-process save
# --------------------------------------------------------------------------


def test_two_rank_save_inspect_validate_and_fixture_drift(two_rank):
    code, out, err = run("validate", two_rank)
    assert code == 0, out + err
    code, out, _ = run("inspect", two_rank, "--json")
    fresh = json.loads(out)
    assert sorted(fresh["files"]) == ["__0_0.distcp", "__1_0.distcp"]
    assert fresh["tensors"]["layers.0.wq.weight"]["chunks"] == 2
    assert fresh["tensors"]["embed.weight"]["chunks"] == 1  # replicated, deduplicated
    # The committed torch-free fixture is what this torch writes today.
    code, out, _ = run("inspect", os.path.join(HERE, "data", "dcp_sharded"), "--json")
    committed = json.loads(out)
    assert {k: {f: v[f] for f in ("dtype", "shape", "chunks", "bytes")}
            for k, v in fresh["tensors"].items()} == \
        {k: {f: v[f] for f in ("dtype", "shape", "chunks", "bytes")}
         for k, v in committed["tensors"].items()}
    assert list(fresh["bytes_items"]) == list(committed["bytes_items"])
    fresh_md = torch_md(two_rank)
    committed_md = torch_md(os.path.join(HERE, "data", "dcp_sharded"))
    for fqn, t in fresh_md.state_dict_metadata.items():
        if isinstance(t, tmd.TensorStorageMetadata):
            assert t.chunks == committed_md.state_dict_metadata[fqn].chunks


# --------------------------------------------------------------------------
# demo and the entry point
# --------------------------------------------------------------------------


def test_demo_times_torch_side_by_side():
    code, out, err = run("demo", "--layers", "1", "--save-fsdp", "8", "--load-fsdp", "2",
                         "--load-tp", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["torch_version"] == torch.__version__
    for step in ("global save plan", "load plan, all ranks: ReadItems", "load plan, all ranks: arrays",
                 "plan traffic, save: rank 0"):
        assert report["timings_s"][step]["torch"] > 0 and report["timings_s"][step]["ckcore"] > 0
    # One rank's packed local plan against torch's pickled SavePlan.
    sent = report["traffic_bytes_per_rank"]
    assert 0 < sent["ckcore"] * 5 < sent["torch"]
    code, text, _ = run("demo", "--layers", "1", "--save-fsdp", "4", "--load-fsdp", "2",
                        "--load-tp", "2")
    assert code == 0 and f"torch {torch.__version__}" in text and "speed-up" in text


def test_python_dash_m_entry_point(saved, tmp_path):
    # The ckcore under test (source tree or installed wheel), not whatever cwd holds.
    env = dict(os.environ, PYTHONPATH=CKCORE_HOME + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def ckcore(*argv):
        return subprocess.run([sys.executable, "-m", "ckcore", *map(str, argv)], capture_output=True,
                              text=True, env=env, timeout=120, check=False)

    proc = ckcore("inspect", saved, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "model.wq" in json.loads(proc.stdout)["tensors"]
    proc = ckcore("validate", tmp_path / "missing")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no such file or directory" in one_error_line(proc.stderr)
