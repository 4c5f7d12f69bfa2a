"""Torch-free tests of ckcore.checkpoint: the allow-list unpickler and Checkpoint.

This file must not import torch (CI also runs it where torch is absent, and a
subprocess test below proves the loader never imports it). Real torch output
comes from the fixture tests/data/dcp_small, written by
torch.distributed.checkpoint.save (tests/data/make_dcp_fixture.py);
tests/differential/test_checkpoint.py checks the fixture against the installed torch.
Other streams are crafted here: ckcore objects pickled and renamed to
torch's module paths, and hostile pickles.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path, PosixPath

import pytest

from ckcore.checkpoint import (
    Checkpoint,
    CheckpointError,
    ItemLocation,
    StorageInfo,
    UnsafeCheckpointError,
    _SafeUnpickler,
    load_metadata,
    loads_metadata,
)
from ckcore.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from tests.support.paths import CKCORE_PARENT, REPO
from tests.support.streams import call_global, sample_metadata, torchify

FIXTURE = REPO / "tests" / "data" / "dcp_small"
FIXTURE_MD = FIXTURE / ".metadata"

# What tests/data/make_dcp_fixture.py saved: fqn -> (dtype, global size).
FIXTURE_TENSORS = {
    "w_bf16": ("bfloat16", (4, 3)),
    "scalar_bool": ("bool", ()),
    "scalar_f64": ("float64", ()),
    "empty": ("float32", (0, 3)),
    "nested.c64": ("complex64", (2, 2)),
    "nested.f8": ("float8_e4m3fn", (5,)),
    "nested.deeper.i64": ("int64", (1, 2, 3)),
    "nested.deeper.u8": ("uint8", (4,)),
}
FIXTURE_BYTES = {"blob", "step", "config.lr", "config.name"}


# --------------------------------------------------------------------------
# Reading real torch output.
# --------------------------------------------------------------------------


def test_fixture_metadata_types_and_values():
    md = load_metadata(FIXTURE)
    assert type(md) is Metadata
    assert md.version == "1.0.0"
    assert set(md.state_dict_metadata) == set(FIXTURE_TENSORS) | FIXTURE_BYTES
    for fqn, (dtype, size) in FIXTURE_TENSORS.items():
        tmd = md.state_dict_metadata[fqn]
        assert type(tmd) is TensorStorageMetadata
        # Exactly ckcore's class, not the unpickling helper subclass.
        assert type(tmd.properties) is TensorProperties
        assert tmd.properties == TensorProperties(dtype=dtype)
        assert type(tmd.size) is tuple and tmd.size == size
        assert tmd.chunks == [ChunkStorageMetadata(offsets=(0,) * len(size), sizes=size)]
        assert all(type(c.offsets) is tuple and type(c.sizes) is tuple for c in tmd.chunks)
    for fqn in FIXTURE_BYTES:
        assert type(md.state_dict_metadata[fqn]) is BytesStorageMetadata
    assert md.planner_data["nested.deeper.i64"] == ("nested", "deeper", "i64")
    assert type(md.storage_meta) is StorageMeta
    assert md.storage_meta.checkpoint_id == PosixPath("tests/data/dcp_small")
    assert md.storage_meta.load_id is None
    assert set(md.storage_data) == {MetadataIndex(f, (0,) * len(s)) for f, (_, s) in FIXTURE_TENSORS.items()} | {
        MetadataIndex(f) for f in FIXTURE_BYTES
    }
    for key, info in md.storage_data.items():
        assert type(info) is StorageInfo
        assert info.relative_path == "__0_0.distcp"
        assert info.transform_descriptors is None
        assert key.index == (None if key.offset is None else 0)


def test_fixture_item_locations_tile_the_data_file():
    ck = Checkpoint(FIXTURE)
    assert ck.dir == FIXTURE and ck.metadata_path == FIXTURE_MD
    data_file = FIXTURE / "__0_0.distcp"
    assert ck.files == {"__0_0.distcp": data_file.stat().st_size}
    assert ck.problems() == []
    locs = sorted((ck.item_location(k) for k in ck.storage), key=lambda loc: loc.offset)
    # FileSystemWriter appends items one after another to the rank's file.
    pos = 0
    raw = data_file.read_bytes()
    for loc in locs:
        assert type(loc) is ItemLocation and loc.path == data_file
        assert loc.offset == pos and loc.length > 0
        pos += loc.length
        # Every item is a torch.save stream (a zip archive).
        assert raw[loc.offset : loc.offset + 4] == b"PK\x03\x04"
    assert pos == len(raw)
    # Bytes items can be addressed by fqn.
    assert ck.item_location("step") == ck.item_location(MetadataIndex("step"))
    # The index hint is not part of the key, as in torch.
    assert ck.item_location(MetadataIndex("w_bf16", (0, 0), 7)).length == ck.storage_info(
        MetadataIndex("w_bf16", (0, 0))
    ).length
    with pytest.raises(KeyError, match="w_bf16"):
        ck.item_location(MetadataIndex("w_bf16", (1, 0)))


def test_entry_points_agree(tmp_path):
    ref = load_metadata(FIXTURE)
    assert load_metadata(str(FIXTURE)) == ref
    assert load_metadata(FIXTURE_MD) == ref
    with open(FIXTURE_MD, "rb") as f:
        assert load_metadata(f) == ref
    assert loads_metadata(FIXTURE_MD.read_bytes()) == ref
    # Rank-local metadata (FileSystemWriter without rank coordination).
    shutil.copy(FIXTURE_MD, tmp_path / "__3.metadata")
    assert load_metadata(tmp_path, rank=3) == ref
    assert Checkpoint(tmp_path, rank=3).metadata == ref
    assert Checkpoint(FIXTURE_MD).dir == FIXTURE


def test_problems_reports_missing_and_short_files(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "ck")
    data_file = tmp_path / "ck" / "__0_0.distcp"
    size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(size - 10)
    probs = Checkpoint(tmp_path / "ck").problems()
    # Exactly the last item in the file overruns its end.
    assert len(probs) == 1 and "beyond the end of __0_0.distcp" in probs[0]
    data_file.unlink()
    ck = Checkpoint(tmp_path / "ck")
    assert ck.files == {"__0_0.distcp": None}
    assert len(ck.problems()) == len(ck.storage)
    assert all("is missing" in p for p in ck.problems())


def test_problems_reports_entries_without_items_and_items_without_entries(tmp_path):
    md = sample_metadata()
    extra = MetadataIndex("ghost", (0,))
    md.storage_data[extra] = StorageInfo("__0_0.distcp", 0, 1)
    del md.storage_data[MetadataIndex("layer1.weight", (4, 0))]
    (tmp_path / ".metadata").write_bytes(torchify(md))
    for i in range(2):
        (tmp_path / f"__{i}_0.distcp").write_bytes(b"\0" * 2000)
    probs = Checkpoint(tmp_path).problems()
    assert any("layer1.weight: chunk 1 at offsets (4, 0) has no storage entry" in p for p in probs)
    assert any("ghost" in p and "names no item" in p for p in probs)
    # The ghost entry's byte lies inside layer0.weight's: the storage check sees that too.
    assert any("overlap those of ghost" in p for p in probs)
    assert len(probs) == 3


def test_crafted_torch_style_stream_round_trips():
    md = sample_metadata()
    out = loads_metadata(torchify(md))
    assert out == md
    assert out.storage_data[MetadataIndex("step")].transform_descriptors == ["zstd/1"]
    assert out.storage_data[MetadataIndex("layer0.weight", (4, 0))].transform_descriptors is None


# --------------------------------------------------------------------------
# Hostile streams: refused, named, and never executed.
# --------------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``, the classic pickle code-execution gadget."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class EvilDict(dict):
    """A dict subclass: not on the allow-list even though dict is."""


# Pickle finds classes through sys.modules; pytest's importlib mode does not
# register test modules there, so the subclass lives in a stand-in plugin module.
EvilDict.__module__ = "evil_plugin"
_EVIL_PLUGIN = types.ModuleType("evil_plugin")
_EVIL_PLUGIN.EvilDict = EvilDict  # type: ignore[attr-defined]


def _hostile_cases(marker: Path):
    import collections
    import subprocess as sp

    cmd = f"touch {marker}"
    return [
        ("os.system", pickle.dumps(_Reduce(os.system, (cmd,))), os.system.__module__, "system"),
        ("os.system-p0", pickle.dumps(_Reduce(os.system, (cmd,)), protocol=0), os.system.__module__, "system"),
        ("eval", pickle.dumps(_Reduce(eval, (f"open({str(marker)!r}, 'w')",))), "builtins", "eval"),
        ("exec", pickle.dumps(_Reduce(exec, (f"open({str(marker)!r}, 'w')",))), "builtins", "exec"),
        ("getattr", call_global("builtins", "getattr", "x"), "builtins", "getattr"),
        ("popen", pickle.dumps(_Reduce(sp.Popen, (["touch", str(marker)],))), "subprocess", "Popen"),
        ("dict-subclass", pickle.dumps(EvilDict(a=1)), "evil_plugin", "EvilDict"),
        ("counter", pickle.dumps(collections.Counter("ab")), "collections", "Counter"),
        ("defaultdict", pickle.dumps(collections.defaultdict(list)), "collections", "defaultdict"),
        ("torch.load", call_global("torch", "load", str(marker)), "torch", "load"),
        ("torch.save", call_global("torch", "save", str(marker)), "torch", "save"),
        ("rebuild-tensor", call_global("torch._utils", "_rebuild_tensor_v2", "x"), "torch._utils", "_rebuild_tensor_v2"),
        ("ckcore-direct", pickle.dumps(Metadata({})), "ckcore.metadata", "Metadata"),
        (
            "inside-valid-metadata",
            torchify(Metadata({"a": BytesStorageMetadata()}, planner_data=[_Reduce(os.system, (cmd,))])),
            os.system.__module__,
            "system",
        ),
    ]


@pytest.mark.parametrize("case", range(14))
def test_hostile_pickles_refused_and_not_executed(tmp_path, monkeypatch, case):
    monkeypatch.setitem(sys.modules, "evil_plugin", _EVIL_PLUGIN)
    marker = tmp_path / "marker"
    label, data, module, name = _hostile_cases(marker)[case]
    path = tmp_path / ".metadata"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_metadata(tmp_path)
    msg = str(ei.value)
    assert str(path) in msg, label
    assert repr(module) in msg and repr(name) in msg, (label, msg)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, CheckpointError)
    assert not marker.exists(), label


def test_persistent_ids_refused():
    # BINPERSID: torch.save streams use these for storages; metadata never does.
    data = b"\x80\x02X\x01\x00\x00\x00xQ."
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        loads_metadata(data, name="pid.metadata")


def test_restricted_helpers_refuse_unknown_values():
    for data in (
        call_global("torch.serialization", "_get_layout", "torch.evil"),
        call_global("torch.serialization", "_get_layout", "strided"),
        call_global("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", 3),
    ):
        with pytest.raises(CheckpointError, match="invalid"):
            _SafeUnpickler(io.BytesIO(data)).load()
        # Through the loader the scan refuses the stream first: it is not Metadata.
        with pytest.raises(CheckpointError, match="x.metadata: .*not a DCP Metadata"):
            loads_metadata(data, name="x.metadata")


def test_allowed_globals_map_to_names():
    def load(data):
        return _SafeUnpickler(io.BytesIO(data)).load()

    assert load(call_global("torch.serialization", "_get_layout", "torch.sparse_coo")) == "sparse_coo"
    enc = "torch.distributed.checkpoint.metadata"
    for value, name in ((0, "contiguous_format"), (1, "channels_last"), (2, "preserve_format")):
        assert load(call_global(enc, "_MEM_FORMAT_ENCODING", value)) == name
    assert load(b"\x80\x02ctorch\nbfloat16\n.") == "bfloat16"
    assert load(b"\x80\x02ctorch\nhalf\n.") == "float16"
    assert load(b"\x80\x02ctorch._utils\ntorch.channels_last\n.") == "channels_last"


# --------------------------------------------------------------------------
# Truncated, corrupted and foreign files.
# --------------------------------------------------------------------------


def test_every_truncation_is_a_checkpoint_error():
    data = FIXTURE_MD.read_bytes()
    for n in range(len(data)):
        with pytest.raises(CheckpointError) as ei:
            loads_metadata(data[:n], name="cut.metadata")
        assert type(ei.value) is CheckpointError, n
        assert "cut.metadata" in str(ei.value)
        assert ei.value.__cause__ is None  # no pickle internals chained in


def test_truncated_file_names_the_file(tmp_path):
    data = FIXTURE_MD.read_bytes()
    for n in (0, 1, 2, len(data) // 3, len(data) - 1):
        (tmp_path / ".metadata").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=str(tmp_path / ".metadata")):
            load_metadata(tmp_path)


def test_corrupted_bytes_never_leak_other_errors():
    # Some flips turn an opcode into BYTEARRAY8 with an absurd length; CPython
    # 3.11's C unpickler then fails the allocation (MemoryError -> our
    # CheckpointError) and may print a spurious "deallocated bytearray object
    # has exported buffers" line from bytearray's error path. Nothing escapes.
    data = FIXTURE_MD.read_bytes()
    rng = random.Random(20261128)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            md = loads_metadata(bytes(buf), name="flip.metadata")
        except CheckpointError as e:
            assert "flip.metadata" in str(e)
            outcomes["error"] += 1
        else:
            # A flip inside a string or number can leave valid metadata.
            assert type(md) is Metadata
            outcomes["ok"] += 1
    assert outcomes["error"] > 0


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated"),
        (b"not a pickle at all", "corrupted"),
        (b'{"metadata": {"total_size": 0}, "weight_map": {}}', "corrupted"),
        (pickle.dumps(123), "result is not a DCP Metadata object"),
        (pickle.dumps({"state_dict_metadata": {}}), "result is not a DCP Metadata object"),
        # torch.Size() then call a tuple: a call torch.Size never takes
        (b"\x80\x02c" + b"torch\nSize\n" + b")R\x85R.", "call refused"),
    ],
)
def test_foreign_content_is_a_checkpoint_error(data, match):
    with pytest.raises(CheckpointError, match=f"foreign.metadata: .*{match}"):
        loads_metadata(data, name="foreign.metadata")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / ".metadata")):
        load_metadata(tmp_path)
    with pytest.raises(CheckpointError, match="cannot read"):
        Checkpoint(tmp_path / "nope" / ".metadata")


def _bad(mutate):
    md = sample_metadata()
    mutate(md)
    return torchify(md)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(m, "state_dict_metadata", [1]), "Metadata.state_dict_metadata is missing or not a dict"),
        (lambda m: m.state_dict_metadata.update({"x": "tensor"}), "x: storage metadata is str"),
        (lambda m: setattr(m.state_dict_metadata["layer0.weight"], "chunks", ()), "layer0.weight: chunks is tuple"),
        (lambda m: m.state_dict_metadata["layer0.weight"].chunks.append("c"), "layer0.weight: chunk 2 is str"),
        (
            lambda m: setattr(m.state_dict_metadata["layer1.weight"].chunks[1], "offsets", (4, -1)),
            r"layer1.weight: chunk 1 has invalid offsets/sizes \(4, -1\)",
        ),
        (
            lambda m: setattr(m.state_dict_metadata["layer1.weight"].chunks[0], "sizes", (4,)),
            "layer1.weight: chunk 0 has invalid offsets/sizes .* for a 2-d tensor",
        ),
        (
            lambda m: setattr(m.state_dict_metadata["layer2.weight"].chunks[0], "sizes", (2**63, 1)),
            "layer2.weight: chunk 0 has invalid",
        ),
        (
            lambda m: setattr(m.state_dict_metadata["layer2.weight"].chunks[0], "sizes", (1.0, 1)),
            "layer2.weight: chunk 0 has invalid",
        ),
        (lambda m: setattr(m.state_dict_metadata["layer0.weight"], "size", [8, 8]), "layer0.weight: invalid size"),
        (
            lambda m: setattr(m.state_dict_metadata["layer0.weight"].properties, "dtype", "float33"),
            "layer0.weight: invalid tensor properties",
        ),
        (
            lambda m: setattr(m.state_dict_metadata["layer0.weight"].properties, "memory_format", 0),
            "layer0.weight: invalid tensor properties",
        ),
        (lambda m: setattr(m, "version", 1), "version is 1"),
        (lambda m: setattr(m, "storage_meta", "s"), "storage_meta is str"),
        (lambda m: setattr(m, "storage_data", [1]), "storage_data is list"),
        (lambda m: m.storage_data.update({"k": StorageInfo("f", 0, 1)}), "storage_data key 'k'"),
        (lambda m: m.storage_data.update({MetadataIndex("k"): StorageInfo("f", -1, 1)}), r"storage_data\[.*'k'"),
        (lambda m: m.storage_data.update({MetadataIndex("k"): StorageInfo(5, 0, 1)}), r"storage_data\[.*'k'"),
    ],
)
def test_malformed_structure_is_named(mutate, match):
    with pytest.raises(CheckpointError, match="bad.metadata: not valid DCP metadata: " + match):
        loads_metadata(_bad(mutate), name="bad.metadata")


def test_non_str_keys_are_refused_before_hashing():
    # An int key is refused by the opcode scan, before the unpickler hashes it.
    data = _bad(lambda m: m.state_dict_metadata.update({3: BytesStorageMetadata()}))
    with pytest.raises(UnsafeCheckpointError, match="bad.metadata: a dict key or set element"):
        loads_metadata(data, name="bad.metadata")


def test_tensor_properties_state_must_be_a_5_tuple():
    with pytest.raises(UnsafeCheckpointError, match="bad.metadata: BUILD refused.*opcode BUILD"):
        loads_metadata(torchify(sample_metadata(1), state_len=4), name="bad.metadata")


def test_custom_storage_values_pass_through():
    # A custom StorageWriter may store its own (allowed) values in storage_data.
    md = sample_metadata(1)
    md.storage_data = {MetadataIndex("layer0.weight", (0, 0)): ("s3://bucket/key", 0, 100)}
    assert loads_metadata(torchify(md)).storage_data == md.storage_data


# --------------------------------------------------------------------------
# The safe path never imports torch.
# --------------------------------------------------------------------------


def test_safe_path_never_imports_torch(tmp_path):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / ".metadata").write_bytes(call_global("torch", "load", "x"))
    code = f"""
import sys
from ckcore.checkpoint import Checkpoint, load_metadata, UnsafeCheckpointError
ck = Checkpoint({str(FIXTURE)!r})
assert ck.problems() == [], ck.problems()
md = load_metadata({str(FIXTURE_MD)!r})
assert md.state_dict_metadata["w_bf16"].properties.dtype == "bfloat16"
try:
    load_metadata({str(hostile)!r})
except UnsafeCheckpointError:
    pass
else:
    raise SystemExit("hostile file loaded")
print("torch" in sys.modules, any(m.startswith("torch") for m in sys.modules))
"""
    # The child imports the same ckcore this test imported (the installed one in CI).
    env = dict(os.environ, PYTHONPATH=str(CKCORE_PARENT))
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../outside.distcp", "a/../../b", "C:\\x.distcp", ""])
def test_paths_outside_the_checkpoint_are_refused(tmp_path, bad_path):
    md = sample_metadata(1)
    key = MetadataIndex("layer0.weight", (0, 0))
    md.storage_data[key] = StorageInfo(bad_path, 0, 10)
    (tmp_path / ".metadata").write_bytes(torchify(md))
    ck = Checkpoint(tmp_path)
    assert ck.files[bad_path] is None
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        ck.item_location(key)
    assert any("outside the checkpoint directory" in p for p in ck.problems())


def test_non_filesystem_storage_entries(tmp_path):
    md = sample_metadata(1)
    key = MetadataIndex("layer0.weight", (0, 0))
    md.storage_data[key] = ("s3://bucket/key", 0, 100)
    (tmp_path / ".metadata").write_bytes(torchify(md))
    ck = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a FileSystemWriter record"):
        ck.item_location(key)
    assert "s3://bucket/key" not in ck.files


# --------------------------------------------------------------------------
# The compiled structure check, directly.
# --------------------------------------------------------------------------


def test_mdcheck_shape_ok_edges():
    from ckcore._kernels._mdcheck import shape_ok

    class TupleSub(tuple):
        pass

    assert shape_ok((), 0)
    assert shape_ok((0, 2**63 - 1), 2)
    assert not shape_ok((0, 2**63), 2)  # beyond int64
    assert not shape_ok((0, -1), 2)
    assert not shape_ok((True, 1), 2)  # bool is not a size
    assert not shape_ok((1.0,), 1)
    assert not shape_ok([1, 2], 2)
    assert not shape_ok(TupleSub((1, 2)), 2)
    assert not shape_ok((1, 2), 3)
    assert not shape_ok(None, 0)


def test_mdcheck_first_bad_chunk_and_storage_info():
    from ckcore._kernels._mdcheck import first_bad_chunk, first_bad_storage_info

    good = [ChunkStorageMetadata((0, 0), (2, 2)), ChunkStorageMetadata((2, 0), (2, 2))]
    assert first_bad_chunk(good, ChunkStorageMetadata, 2) == -1
    assert first_bad_chunk(good, ChunkStorageMetadata, 1) == 0
    assert first_bad_chunk(good + [ChunkStorageMetadata((0,), (1, 1))], ChunkStorageMetadata, 2) == 2
    fieldless = ChunkStorageMetadata.__new__(ChunkStorageMetadata)  # NEWOBJ without BUILD
    assert first_bad_chunk(good + [fieldless], ChunkStorageMetadata, 2) == 2
    assert first_bad_chunk(good + ["x"], ChunkStorageMetadata, 2) == 2
    assert first_bad_chunk([], ChunkStorageMetadata, 5) == -1

    infos = [StorageInfo("a", 0, 1), ("custom", -1), StorageInfo("b", 2**63 - 1, 0)]
    assert first_bad_storage_info(infos, StorageInfo) == -1
    assert first_bad_storage_info(infos + [StorageInfo("c", 0, -1)], StorageInfo) == 3
    assert first_bad_storage_info(infos + [StorageInfo(None, 0, 1)], StorageInfo) == 3
    assert first_bad_storage_info([StorageInfo.__new__(StorageInfo)], StorageInfo) == 0
