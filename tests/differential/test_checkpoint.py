"""Differential tests of ckcore.checkpoint against torch's own reader.

Checkpoints are written by ``torch.distributed.checkpoint.save`` (one
process, no process group: torch 2.13 saves with ``no_dist`` then) or, for
layouts one process cannot produce, by pickling torch's ``Metadata`` exactly
as ``FileSystemWriter.finish`` does. ckcore's safe loader must return, field
for field, what ``FileSystemReader.read_metadata`` / ``pickle.load`` return.
The torch-free half of the tests is tests/core/test_checkpoint_safe.py.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import sys
import types
import warnings
from pathlib import PosixPath, PureWindowsPath

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed._shard.sharded_tensor import metadata as tshard
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ckcore.checkpoint import (
    Checkpoint,
    CheckpointError,
    StorageInfo,
    UnsafeCheckpointError,
    load_metadata,
    loads_metadata,
)
from ckcore.dcp.convert import from_torch, to_torch
from ckcore.dtypes import DTYPE_ITEMSIZE
from ckcore.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from tests.support.paths import REPO

FIXTURE = REPO / "tests" / "data" / "dcp_small"

ALL_TORCH_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str
)
LAYOUTS = [v for v in vars(torch).values() if isinstance(v, torch.layout)]
# TensorProperties.__getstate__ encodes only these three.
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last, torch.preserve_format]


def _name(obj) -> str:
    return str(obj).removeprefix("torch.")


def _save(state_dict, path, **kw):
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state_dict, checkpoint_id=path, **kw)


# --------------------------------------------------------------------------
# Field-by-field comparison, independent of the converter.
# --------------------------------------------------------------------------


def assert_same_metadata(ours: Metadata, theirs: tmd.Metadata, *, torch_load_id=None) -> None:
    """``ours`` (safe loader) equals ``theirs`` (torch) in every field, with ckcore's types."""
    assert type(ours) is Metadata
    assert list(ours.state_dict_metadata) == list(theirs.state_dict_metadata)
    for fqn, t in theirs.state_dict_metadata.items():
        o = ours.state_dict_metadata[fqn]
        if isinstance(t, tmd.BytesStorageMetadata):
            assert type(o) is BytesStorageMetadata, fqn
            continue
        assert type(o) is TensorStorageMetadata, fqn
        op, tp = o.properties, t.properties
        assert type(op) is TensorProperties
        assert (op.dtype, op.layout, op.memory_format) == (
            _name(tp.dtype), _name(tp.layout), _name(tp.memory_format)
        ), fqn
        assert DTYPE_ITEMSIZE[op.dtype] == tp.dtype.itemsize
        assert (op.requires_grad, op.pin_memory) == (tp.requires_grad, tp.pin_memory)
        assert type(o.size) is tuple and o.size == tuple(t.size)
        assert len(o.chunks) == len(t.chunks)
        for oc, tc in zip(o.chunks, t.chunks):
            assert type(oc) is ChunkStorageMetadata
            assert type(oc.offsets) is tuple and oc.offsets == tuple(tc.offsets)
            assert type(oc.sizes) is tuple and oc.sizes == tuple(tc.sizes)
    if theirs.storage_data is None:
        assert ours.storage_data is None
    else:
        assert len(ours.storage_data) == len(theirs.storage_data)
        for (ok, ov), (tk, tv) in zip(ours.storage_data.items(), theirs.storage_data.items()):
            assert type(ok) is MetadataIndex
            assert (ok.fqn, ok.offset, ok.index) == (
                tk.fqn, None if tk.offset is None else tuple(tk.offset), tk.index
            )
            assert type(ov) is StorageInfo
            assert (ov.relative_path, ov.offset, ov.length, ov.transform_descriptors) == (
                tv.relative_path, tv.offset, tv.length, getattr(tv, "transform_descriptors", None)
            )
    assert ours.planner_data == theirs.planner_data
    assert ours.version == theirs.version
    if theirs.storage_meta is None:
        assert ours.storage_meta is None
    else:
        om, tm = ours.storage_meta, theirs.storage_meta
        assert type(om) is StorageMeta
        assert (om.checkpoint_id, om.save_id, om.modules) == (tm.checkpoint_id, tm.save_id, tm.modules)
        assert type(om.checkpoint_id) is type(tm.checkpoint_id)
        assert om.load_id == (tm.load_id if torch_load_id is None else None)


def assert_matches_torch_reader(path, rank=None) -> Metadata:
    """Safe-load ``path`` and compare with FileSystemReader.read_metadata, directly and via convert."""
    ours = load_metadata(path, rank=rank)
    reader = FileSystemReader(path)
    theirs = reader.read_metadata(rank=rank)
    # read_metadata stamps a fresh load_id; the file has none.
    assert theirs.storage_meta.load_id == reader.load_id
    assert_same_metadata(ours, theirs, torch_load_id=reader.load_id)
    theirs.storage_meta.load_id = None
    assert from_torch(theirs) == ours
    assert to_torch(ours) == theirs
    return ours


# --------------------------------------------------------------------------
# Real saves.
# --------------------------------------------------------------------------

# Every dtype torch 2.13 can save through DCP (the bits*, sub-byte int and
# quantized dtypes fail inside torch's own planner or tensor factory).
SAVABLE = [
    "bfloat16", "bool", "complex128", "complex32", "complex64", "float16", "float32",
    "float4_e2m1fn_x2", "float64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu", "int16", "int32", "int64", "int8", "uint16",
    "uint32", "uint64", "uint8",
]


def _many_dtype_state_dict():
    g = torch.Generator().manual_seed(1)
    sd: dict = {"by_dtype": {}, "scalars": {}}
    for i, name in enumerate(SAVABLE):
        dt = getattr(torch, name)
        shape = [(3,), (2, 5), (1, 2, 3), (0, 4)][i % 4]
        raw = torch.randint(0, 100, shape, generator=g, dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
            sd["by_dtype"][name] = raw.to(torch.uint8).view(dt) if dt.itemsize == 1 else raw.to(dt)
        sd["scalars"][name] = torch.zeros((), dtype=dt)
    sd["deep"] = {"a": {"b": {"c": torch.arange(24).reshape(2, 3, 4)}}}
    sd["blob"] = io.BytesIO(b"\x00\x01 raw bytes")
    sd["obj"] = {"epoch": 3, "tags": ["x", "y"], "lr": 1e-3}
    return sd


def _walk_tensors(sd, prefix=""):
    for k, v in sd.items():
        fqn = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk_tensors(v, fqn + ".")
        else:
            yield fqn, v


def _read_item(ck: Checkpoint, index) -> bytes:
    loc = ck.item_location(index)
    with open(loc.path, "rb") as f:
        f.seek(loc.offset)
        data = f.read(loc.length)
    assert len(data) == loc.length
    return data


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # Compare raw bytes: many of these dtypes have no torch.equal kernel.
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_real_save_many_dtypes(tmp_path, single_file_per_rank):
    sd = _many_dtype_state_dict()
    writer = FileSystemWriter(tmp_path, single_file_per_rank=single_file_per_rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=writer)
    ours = assert_matches_torch_reader(tmp_path)
    dtypes = {ours.state_dict_metadata[f"by_dtype.{n}"].properties.dtype for n in SAVABLE}
    assert dtypes == set(SAVABLE)
    assert ours.state_dict_metadata["scalars.bool"].size == ()
    assert ours.state_dict_metadata["scalars.bool"].chunks == [ChunkStorageMetadata((), ())]

    ck = Checkpoint(tmp_path)
    assert ck.problems() == []
    assert len(ck.files) == (1 if single_file_per_rank else len(ck.storage))
    for rp, size in ck.files.items():
        assert size == os.path.getsize(tmp_path / rp)
    # Every item's bytes, found through ckcore alone, are what torch saved.
    for fqn, value in _walk_tensors(sd):
        if isinstance(value, torch.Tensor):
            data = _read_item(ck, MetadataIndex(fqn, (0,) * value.dim()))
            loaded = torch.load(io.BytesIO(data), weights_only=True)
            assert _same_tensor(loaded, value), fqn
        elif isinstance(value, io.BytesIO):
            # BytesIO items are torch.save'd too (DefaultLoadPlanner.load_bytes torch.loads them).
            loaded = torch.load(io.BytesIO(_read_item(ck, fqn)), weights_only=False)
            assert loaded.getvalue() == value.getvalue()
        else:
            assert torch.load(io.BytesIO(_read_item(ck, fqn)), weights_only=False) == value


def test_rank_local_metadata(tmp_path):
    _save({"w": torch.ones(2, 2), "s": 1}, tmp_path, use_collectives=False)
    assert (tmp_path / "__0.metadata").exists() and not (tmp_path / ".metadata").exists()
    assert_matches_torch_reader(tmp_path, rank=0)
    assert Checkpoint(tmp_path, rank=0).problems() == []
    with pytest.raises(CheckpointError, match=r"\.metadata: cannot read"):
        load_metadata(tmp_path)


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_dcp_fixture", REPO / "tests/data/make_dcp_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fixture_is_what_this_torch_writes(tmp_path):
    """tests/data/dcp_small (read by the torch-free tests) equals a fresh save with this torch."""
    assert_matches_torch_reader(FIXTURE)
    fresh_dir = tmp_path / "fresh"
    _save(_fixture_module().state_dict(), fresh_dir)
    fresh, fixed = load_metadata(fresh_dir), load_metadata(FIXTURE)
    assert fresh.storage_meta.checkpoint_id == fresh_dir
    fresh.storage_meta = fixed.storage_meta = None  # ids differ by construction
    assert fresh == fixed
    # The data file holds the same items at the same places.
    assert Checkpoint(fresh_dir).files == Checkpoint(FIXTURE).files


# --------------------------------------------------------------------------
# Layouts a single process cannot save: pickled as FileSystemWriter.finish does.
# --------------------------------------------------------------------------

_int = st.integers(0, 2**62)
_edge = st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**62 - 1, 2**62, 2**63 - 1])


@st.composite
def torch_metadata(draw):
    sdm: dict = {}
    sd: dict = {}
    n = draw(st.integers(0, 6))
    for t in range(n):
        fqn = draw(st.sampled_from(["w", "model.layers.0.attn.q.weight", "é.ü", "a.b", ""])) + f"#{t}"
        if draw(st.booleans()):
            sdm[fqn] = tmd.BytesStorageMetadata()
            sd[tmd.MetadataIndex(fqn)] = _StorageInfo("__0_0.distcp", draw(_int), draw(_int))
            continue
        ndim = draw(st.integers(0, 8))
        cls = draw(st.sampled_from([tmd.TensorProperties, tshard.TensorProperties]))
        props = cls(
            dtype=draw(st.sampled_from(ALL_TORCH_DTYPES)),
            layout=draw(st.sampled_from(LAYOUTS)),
            requires_grad=draw(st.booleans()),
            memory_format=draw(st.sampled_from(MEMORY_FORMATS)),
            pin_memory=draw(st.booleans()),
        )
        dims = st.lists(st.one_of(_int, _edge), min_size=ndim, max_size=ndim)
        chunks = [
            tmd.ChunkStorageMetadata(offsets=torch.Size(draw(dims)), sizes=torch.Size(draw(dims)))
            for _ in range(draw(st.integers(0, 4)))
        ]
        sdm[fqn] = tmd.TensorStorageMetadata(props, torch.Size(draw(dims)), chunks)
        for i, c in enumerate(chunks):
            key = tmd.MetadataIndex(fqn, c.offsets, draw(st.sampled_from([i, None])))
            td = draw(st.one_of(st.none(), st.lists(st.sampled_from(["zstd/1", "x"]), max_size=2)))
            sd[key] = _StorageInfo(f"__{i}_0.distcp", draw(_int), draw(_int), transform_descriptors=td)
    storage_meta = draw(
        st.one_of(
            st.none(),
            st.builds(
                tmd.StorageMeta,
                checkpoint_id=st.sampled_from([None, "s3://b/k", PosixPath("/ck/a"), PureWindowsPath("C:/ck")]),
                save_id=st.one_of(st.none(), st.text(max_size=8)),
                load_id=st.one_of(st.none(), st.text(max_size=8)),
                modules=st.lists(st.text(max_size=5), max_size=3),
            ),
        )
    )
    planner_data = draw(
        st.one_of(st.none(), st.just({k: tuple(k.split(".")) + (0,) for k in sdm}))
    )
    return tmd.Metadata(
        sdm,
        planner_data=planner_data,
        storage_data=draw(st.sampled_from([sd, None])),
        storage_meta=storage_meta,
        version=draw(st.sampled_from([None, "1.0.0"])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(md=torch_metadata(), protocol=st.sampled_from([2, 3, 4, 5]))
def test_pickled_torch_metadata_equals_pickle_load(md, protocol):
    data = pickle.dumps(md, protocol=protocol)
    theirs = pickle.loads(data)
    ours = loads_metadata(data)
    assert_same_metadata(ours, theirs)
    assert to_torch(ours) == _as_dcp_properties(theirs)
    assert from_torch(theirs) == ours


def _as_dcp_properties(md: tmd.Metadata) -> tmd.Metadata:
    # ckcore has one TensorProperties; the legacy ShardedTensor class comes back as DCP's.
    for v in md.state_dict_metadata.values():
        if isinstance(v, tmd.TensorStorageMetadata) and type(v.properties) is tshard.TensorProperties:
            p = v.properties
            v.properties = tmd.TensorProperties(p.dtype, p.layout, p.requires_grad, p.memory_format, p.pin_memory)
    return md


def test_every_torch_dtype_layout_and_memory_format_by_name():
    for dt in ALL_TORCH_DTYPES:
        for lay in LAYOUTS:
            for mf in MEMORY_FORMATS:
                props = tmd.TensorProperties(dtype=dt, layout=lay, memory_format=mf)
                md = tmd.Metadata({"t": tmd.TensorStorageMetadata(props, torch.Size([2]), [])})
                got = loads_metadata(pickle.dumps(md)).state_dict_metadata["t"].properties
                assert (got.dtype, got.layout, got.memory_format) == (_name(dt), _name(lay), _name(mf))


def test_benchmark_metadata_equals_pickle_load():
    # The benchmark's layout (bench/test_bench_metadata.py), at a quarter of its 51,200 chunks.
    md = _big_torch_metadata(n_tensors=25, grid=(32, 16))
    assert sum(len(v.chunks) for v in md.state_dict_metadata.values()) == 12_800
    data = pickle.dumps(md)
    theirs = pickle.loads(data)
    ours = loads_metadata(data)
    assert_same_metadata(ours, theirs)


def _big_torch_metadata(n_tensors: int, grid: tuple[int, int]) -> tmd.Metadata:
    bench = importlib.util.spec_from_file_location("bench_md", REPO / "bench" / "test_bench_metadata.py")
    mod = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(mod)
    return mod.big_torch_metadata(n_tensors, grid)


# --------------------------------------------------------------------------
# Hostile and malformed streams built from torch objects.
# --------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class SneakyMetadata(tmd.Metadata):
    """A subclass of an allowed torch class is still not on the list."""


class SneakyChunk(tmd.ChunkStorageMetadata):
    pass


SneakyMetadata.__module__ = SneakyChunk.__module__ = "sneaky_plugin"
_SNEAKY = types.ModuleType("sneaky_plugin")
_SNEAKY.SneakyMetadata, _SNEAKY.SneakyChunk = SneakyMetadata, SneakyChunk


def _props():
    return tmd.TensorProperties(dtype=torch.float32)


@pytest.mark.parametrize(
    "make, module, name",
    [
        (lambda m: torch.zeros(3), "torch._utils", "_rebuild_tensor_v2"),
        (lambda m: tmd.Metadata({}, planner_data=torch.nn.Linear(1, 1)), "torch.nn.modules.linear", "Linear"),
        (lambda m: tmd.Metadata({}, planner_data={"x": _Reduce(os.system, (f"touch {m}",))}), "posix", "system"),
        (lambda m: tmd.Metadata({}, planner_data=_Reduce(eval, (f"open({str(m)!r}, 'w')",))), "builtins", "eval"),
        (lambda m: SneakyMetadata({}), "sneaky_plugin", "SneakyMetadata"),
        (
            lambda m: tmd.Metadata(
                {"t": tmd.TensorStorageMetadata(_props(), torch.Size([2]), [SneakyChunk(torch.Size([0]), torch.Size([2]))])}
            ),
            "sneaky_plugin",
            "SneakyChunk",
        ),
        (lambda m: tmd.Metadata({}, planner_data=torch.device("cpu")), "torch", "device"),
    ],
)
def test_hostile_torch_pickles_refused_and_not_executed(tmp_path, monkeypatch, make, module, name):
    monkeypatch.setitem(sys.modules, "sneaky_plugin", _SNEAKY)
    marker = tmp_path / "marker"
    data = pickle.dumps(make(marker))
    (tmp_path / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError) as ei:
        Checkpoint(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / ".metadata") in msg
    assert f"module {module!r}" in msg and f"class {name!r}" in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "chunks, size, match",
    [
        ([tmd.ChunkStorageMetadata(torch.Size([-1, 0]), torch.Size([2, 2]))], [4, 4], r"t: chunk 0 has invalid offsets/sizes \(-1, 0\)"),
        ([tmd.ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))], [4, 4], "t: chunk 0 .* for a 2-d tensor"),
        ([tmd.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 2])), "junk"], [4, 4], "t: chunk 1 is str"),
        ([], [4, -4], r"t: invalid size \(4, -4\)"),
    ],
)
def test_malformed_torch_metadata_names_fqn_and_chunk(chunks, size, match):
    md = tmd.Metadata({"t": tmd.TensorStorageMetadata(_props(), torch.Size(size), chunks)})
    with pytest.raises(CheckpointError, match="m.metadata: not valid DCP metadata: " + match):
        loads_metadata(pickle.dumps(md), name="m.metadata")


def test_truncated_real_checkpoint_names_file(tmp_path):
    _save({"w": torch.ones(3)}, tmp_path)
    path = tmp_path / ".metadata"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}: corrupted or truncated"):
        Checkpoint(tmp_path)
    # torch itself fails with a raw pickle error type here.
    with pytest.raises((EOFError, pickle.UnpicklingError)):
        FileSystemReader(tmp_path).read_metadata()
