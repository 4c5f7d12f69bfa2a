"""Benchmark "metadata-load": reading a 50k-chunk DCP ``.metadata``, ckcore vs torch.

The file is what ``FileSystemWriter.finish`` writes (``pickle.dump`` of
torch's ``Metadata``) for a 64-rank save of 100 tensors, each a 32x16 grid
of chunks: 51,200 chunks with their ``MetadataIndex -> _StorageInfo``
entries. It is built by pickling torch's dataclasses directly rather than
saving 51,200 real tensors.

- ``[ckcore]``: ``ckcore.load_metadata`` (C allow-list unpickler with the GC
  paused, then the compiled structure check; torch is never needed).
- ``[torch]``: ``FileSystemReader(path).read_metadata()``, i.e. torch's
  ``pickle.load`` with torch imported.
- ``[torch-gc-paused]``: torch's ``pickle.load`` with the cyclic GC paused the
  way ckcore pauses it, to separate the unpickling itself from GC cost.

Every body ends with ``gc.collect(0)`` so the young-generation pass a paused
GC defers is charged to the run that deferred it.

    PYTHONPATH=$PWD python -m pytest bench/test_bench_metadata.py --benchmark-group-by=group
"""

from __future__ import annotations

import gc
import pickle
from pathlib import PosixPath

import pytest

torch = pytest.importorskip("torch")

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as tmd
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ckcore.checkpoint import load_metadata

N_TENSORS = 100
GRID = (32, 16)
RANKS = 64


def big_torch_metadata(n_tensors: int = N_TENSORS, grid: tuple[int, int] = GRID) -> tmd.Metadata:
    """torch ``Metadata`` of ``n_tensors`` bf16 tensors saved as ``grid`` chunks across 64 ranks."""
    rows, cols = grid
    ch, cw = 128, 256
    sdm: dict = {}
    storage: dict = {}
    file_pos = [0] * RANKS
    for t in range(n_tensors):
        fqn = f"model.layers.{t // 7}.mlp.w{t % 7}.weight"
        chunks = []
        for i in range(rows):
            for j in range(cols):
                off = torch.Size([i * ch, j * cw])
                chunks.append(tmd.ChunkStorageMetadata(off, torch.Size([ch, cw])))
                rank = (i * cols + j) % RANKS
                # One torch.save stream per chunk: data plus ~1.1 kB of zip framing.
                length = ch * cw * 2 + 1133
                storage[tmd.MetadataIndex(fqn, off, len(chunks) - 1)] = _StorageInfo(
                    f"__{rank}_0.distcp", file_pos[rank], length
                )
                file_pos[rank] += length
        props = tmd.TensorProperties(dtype=torch.bfloat16)
        sdm[fqn] = tmd.TensorStorageMetadata(props, torch.Size([rows * ch, cols * cw]), chunks)
    return tmd.Metadata(
        sdm,
        planner_data={k: tuple(k.split(".")) for k in sdm},
        storage_data=storage,
        storage_meta=tmd.StorageMeta(checkpoint_id=PosixPath("/ckpt/step_1000"), save_id="bench"),
        version="1.0.0",
    )


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("metadata_load")
    md = big_torch_metadata()
    assert sum(len(v.chunks) for v in md.state_dict_metadata.values()) >= 50_000
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)  # exactly FileSystemWriter.finish
    return path


def _chunks(md) -> int:
    return sum(len(v.chunks) for v in md.state_dict_metadata.values())


def test_metadata_load_ckcore(benchmark, metadata_dir):
    benchmark.group = "metadata-load"
    benchmark.name = "test_metadata_load[ckcore]"

    def run():
        md = load_metadata(metadata_dir)
        gc.collect(0)
        return md

    md = benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    assert _chunks(md) == N_TENSORS * GRID[0] * GRID[1]
    assert len(md.storage_data) == _chunks(md)
    benchmark.extra_info["chunks"] = _chunks(md)


def test_metadata_load_torch(benchmark, metadata_dir):
    benchmark.group = "metadata-load"
    benchmark.name = "test_metadata_load[torch]"

    def run():
        md = FileSystemReader(metadata_dir).read_metadata()
        gc.collect(0)
        return md

    md = benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    assert _chunks(md) == N_TENSORS * GRID[0] * GRID[1]
    benchmark.extra_info["chunks"] = _chunks(md)


def test_metadata_load_torch_gc_paused(benchmark, metadata_dir):
    benchmark.group = "metadata-load"
    benchmark.name = "test_metadata_load[torch-gc-paused]"

    def run():
        was = gc.isenabled()
        gc.disable()
        try:
            with open(metadata_dir / ".metadata", "rb") as f:
                md = pickle.load(f)
        finally:
            if was:
                gc.enable()
        gc.collect(0)
        return md

    md = benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    assert _chunks(md) == N_TENSORS * GRID[0] * GRID[1]
