"""The column reader against torch's pickle: columns equal to those of ``pickle.loads``.

For every stream torch writes (real ``dcp.save`` checkpoints, and torch's
``Metadata`` pickled as ``FileSystemWriter.finish`` does for layouts one
process cannot save), ``loads_metadata_columns(data, fallback=False)`` --
the compiled machine alone -- must equal ``MetadataColumns.from_metadata``
of what torch's ``pickle.loads`` returns. Mutated streams must either be
refused or read as the object reader reads them.
"""

from __future__ import annotations

import pickle
from pathlib import PosixPath

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ckcore.checkpoint import CheckpointError, loads_metadata, loads_metadata_columns
from ckcore.mdcolumns import MetadataColumns

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _reference(data: bytes) -> MetadataColumns:
    return MetadataColumns.from_metadata(pickle.loads(data))


def _machine(data: bytes) -> MetadataColumns:
    return loads_metadata_columns(data, fallback=False)


def _saved(tmp_path, state) -> bytes:
    dcp.save(state, checkpoint_id=str(tmp_path))
    return (tmp_path / ".metadata").read_bytes()


@pytest.mark.parametrize("shapes", [
    [(4, 3)], [()], [(0,)], [(2, 3, 4)], [(5,), (1, 1, 1, 1, 1, 1, 1, 2)], [(3, 0, 2), (7,)],
])
def test_real_saves(tmp_path, shapes):
    state = {f"t{i}": torch.arange(max(1, torch.Size(s).numel()), dtype=torch.float32)
             [:torch.Size(s).numel()].reshape(s) for i, s in enumerate(shapes)}
    state["step"] = 7
    state["nested"] = {"lr": 0.1, "w": torch.ones(2, dtype=torch.bfloat16)}
    data = _saved(tmp_path, state)
    assert _machine(data) == _reference(data)


def _torch_md(dims, n_chunks, *, storage_meta, version, planner_data, td, huge, bytes_items,
              string_id) -> tmd.Metadata:
    sdm: dict = {}
    sd: dict = {}
    for t, nd in enumerate(dims):
        fqn = f"m.layer{t}.weight"
        base = (1 << 62) if huge else 0
        size = torch.Size([base + 4 * n_chunks] + [3] * (nd - 1)) if nd else torch.Size([])
        chunks = []
        for i in range(n_chunks if nd else min(n_chunks, 1)):
            off = torch.Size([base + 4 * i] + [0] * (nd - 1)) if nd else torch.Size([])
            sz = torch.Size([4] + [3] * (nd - 1)) if nd else torch.Size([])
            chunks.append(tmd.ChunkStorageMetadata(off, sz))
            sd[tmd.MetadataIndex(fqn, off, i)] = _StorageInfo(
                f"__{i % 3}_0.distcp", 100 * i, 50 + i, ["zstd"] if td and i == 0 else None)
        props = tmd.TensorProperties(dtype=[torch.float32, torch.bfloat16, torch.int8][t % 3],
                                     requires_grad=bool(t % 2))
        sdm[fqn] = tmd.TensorStorageMetadata(props, size, chunks)
    for b in range(bytes_items):
        sdm[f"extra.{b}"] = tmd.BytesStorageMetadata()
        sd[tmd.MetadataIndex(f"extra.{b}")] = _StorageInfo("__0_0.distcp", 9000 + b, 3)
    cid = "s3://bucket/ckpt" if string_id else PosixPath("/ckpt/step_7")
    return tmd.Metadata(
        sdm,
        planner_data={k: tuple(k.split(".")) for k in sdm} if planner_data else None,
        storage_data=sd,
        storage_meta=tmd.StorageMeta(checkpoint_id=cid, save_id="s", modules=["m"])
        if storage_meta else None,
        version=version,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.lists(st.integers(0, 8), min_size=0, max_size=4),
    n_chunks=st.integers(0, 5),
    storage_meta=st.booleans(),
    version=st.sampled_from([None, "1.0.0"]),
    planner_data=st.booleans(),
    td=st.booleans(),
    huge=st.booleans(),
    bytes_items=st.integers(0, 2),
    string_id=st.booleans(),
    protocol=st.integers(2, 5),
)
def test_synthetic(dims, n_chunks, storage_meta, version, planner_data, td, huge, bytes_items,
                   string_id, protocol):
    md = _torch_md(dims, n_chunks, storage_meta=storage_meta, version=version,
                   planner_data=planner_data, td=td, huge=huge, bytes_items=bytes_items,
                   string_id=string_id)
    data = pickle.dumps(md, protocol=protocol)
    assert _machine(data) == _reference(data)


def test_storage_data_none_and_duplicate_like_keys():
    md = _torch_md([2], 3, storage_meta=True, version=None, planner_data=True, td=False,
                   huge=False, bytes_items=1, string_id=False)
    md.storage_data = None
    data = pickle.dumps(md)
    assert _machine(data) == _reference(data)


def _sample_stream() -> bytes:
    md = _torch_md([2, 1, 0], 3, storage_meta=True, version="1.0.0", planner_data=True, td=True,
                   huge=False, bytes_items=1, string_id=False)
    return pickle.dumps(md)


SAMPLE = _sample_stream()


def _object_reader(data: bytes):
    try:
        return MetadataColumns.from_metadata(loads_metadata(data))
    except CheckpointError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_read_as_the_object_reader_reads(data):
    b = bytearray(SAMPLE)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    mutated = bytes(b)
    try:
        got = _machine(mutated)
    except CheckpointError:
        return
    assert got == _object_reader(mutated)


def test_every_truncation_is_refused():
    for n in range(len(SAMPLE)):
        with pytest.raises(CheckpointError):
            loads_metadata_columns(SAMPLE[:n], fallback=False)
        with pytest.raises(CheckpointError):
            loads_metadata_columns(SAMPLE[:n])
