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
import torch
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


def _pickle_load_gc_paused(path):
    """``pickle.load`` of ``path`` with the cyclic GC paused (and a young collection after)."""
    was = gc.isenabled()
    gc.disable()
    try:
        with open(path, "rb") as f:
            md = pickle.load(f)
    finally:
        if was:
            gc.enable()
    gc.collect(0)
    return md


def test_metadata_load_torch_gc_paused(benchmark, metadata_dir):
    benchmark.group = "metadata-load"
    benchmark.name = "test_metadata_load[torch-gc-paused]"

    def run():
        return _pickle_load_gc_paused(metadata_dir / ".metadata")

    md = benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    assert _chunks(md) == N_TENSORS * GRID[0] * GRID[1]


# --------------------------------------------------------------------------
# metadata-740k: Llama-2-70B saved by FSDP-1024, read into what a load planner
# needs and written back.
# --------------------------------------------------------------------------
#
# 723 tensors (ckcore._models' Llama-2-70B table), each cut in 1024 row chunks
# the way torch.chunk does (Shard(0) on 1024 ranks: the last ranks of a short
# dimension hold empty chunks), 740,352 chunks; storage_data in the order
# FileSystemWriter.finish builds it (rank by rank), each rank's index fqns its
# own str objects (they arrive unpickled per rank). CKCORE_BENCH_QUICK=1 or
# --benchmark-disable: 4 layers on 64 ranks.
#
# - [ckcore-columns]: ckcore.checkpoint.load_metadata_columns (the compiled
#   column reader: chunk and storage columns, no object per chunk);
# - [torch]: FileSystemReader.read_metadata (pickle.load, GC on);
# - [torch-gc-paused]: pickle.load with the GC paused.

import os  # noqa: E402

from ckcore._models import llama70b_state_dict_shapes  # noqa: E402
from ckcore.checkpoint import load_metadata_columns  # noqa: E402


def fsdp_metadata(layers: int, ranks: int) -> tmd.Metadata:
    """torch ``Metadata`` of Llama-2-70B (``layers`` layers) saved FSDP-``ranks``, chunks in rank order."""
    sdm: dict = {}
    per_rank: list[list] = [[] for _ in range(ranks)]
    for fqn, shape in llama70b_state_dict_shapes(layers).items():
        rows = shape[0]
        per = -(-rows // ranks)
        row_bytes = 2 * (shape[1] if len(shape) > 1 else 1)
        chunks = []
        for r in range(ranks):
            start = min(r * per, rows)
            n = max(0, min(per, rows - start))
            off = torch.Size([start] + [0] * (len(shape) - 1))
            chunks.append(tmd.ChunkStorageMetadata(off, torch.Size([n, *shape[1:]])))
            per_rank[r].append((fqn, off, r, n * row_bytes + 1133))
        sdm[fqn] = tmd.TensorStorageMetadata(tmd.TensorProperties(dtype=torch.bfloat16),
                                             torch.Size(shape), chunks)
    storage: dict = {}
    for r in range(ranks):
        path, pos, names = f"__{r}_0.distcp", 0, {}
        for fqn, off, idx, length in per_rank[r]:
            own = names.setdefault(fqn, (fqn + ".")[:-1])   # a distinct str object
            storage[tmd.MetadataIndex(own, torch.Size(list(off)), idx)] = _StorageInfo(path, pos, length)
            pos += length
    return tmd.Metadata(
        sdm, planner_data={k: tuple(k.split(".")) for k in sdm}, storage_data=storage,
        storage_meta=tmd.StorageMeta(checkpoint_id=PosixPath("/ckpt/step_1000"), save_id="bench"),
        version="1.0.0")


@pytest.fixture(scope="module")
def big_metadata_dir(tmp_path_factory, request):
    quick = bool(os.environ.get("CKCORE_BENCH_QUICK")) or request.config.getoption(
        "benchmark_disable", False)
    layers, ranks = (4, 64) if quick else (80, 1024)
    path = tmp_path_factory.mktemp("metadata_740k")
    md = fsdp_metadata(layers, ranks)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)  # exactly FileSystemWriter.finish
    n = _chunks(md)
    del md
    gc.collect()
    return path, n


def test_metadata_740k_columns(benchmark, big_metadata_dir):
    path, n = big_metadata_dir
    benchmark.group = "metadata-load 740k"
    benchmark.name = "test_metadata_740k[ckcore-columns]"

    def run():
        cols = load_metadata_columns(path)
        gc.collect(0)
        return cols

    cols = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    # Empty chunks at the end of a short dimension share an offset: one key.
    assert cols.n_chunks == n and cols.n_storage == n - _shared_offsets(cols)
    benchmark.extra_info["chunks"] = n


def _shared_offsets(cols) -> int:
    total = 0
    for i in range(len(cols.fqns)):
        offs, _ = cols.chunks(i)
        total += len(offs) - len({o.tobytes() for o in offs})
    return total


def test_metadata_740k_torch(benchmark, big_metadata_dir):
    path, n = big_metadata_dir
    benchmark.group = "metadata-load 740k"
    benchmark.name = "test_metadata_740k[torch]"

    def run():
        md = FileSystemReader(path).read_metadata()
        gc.collect(0)
        return md

    md = benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    assert _chunks(md) == n


def test_metadata_740k_torch_gc_paused(benchmark, big_metadata_dir):
    path, n = big_metadata_dir
    benchmark.group = "metadata-load 740k"
    benchmark.name = "test_metadata_740k[torch-gc-paused]"

    def run():
        return _pickle_load_gc_paused(path / ".metadata")

    md = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert _chunks(md) == n


# metadata-write 740k: the same metadata written as .metadata bytes.
# - [ckcore-columns]: ckcore.mdcolumns.dumps_metadata from the columns;
# - [torch]: pickle.dumps of torch's Metadata (what FileSystemWriter.finish does).

from ckcore.mdcolumns import dumps_metadata  # noqa: E402


@pytest.fixture(scope="module")
def big_metadata_objects(big_metadata_dir):
    path, n = big_metadata_dir
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    return md, load_metadata_columns(path), n


def test_metadata_740k_write_columns(benchmark, big_metadata_objects):
    md, cols, n = big_metadata_objects
    benchmark.group = "metadata-write 740k"
    benchmark.name = "test_metadata_740k_write[ckcore-columns]"
    data = benchmark.pedantic(dumps_metadata, args=(cols,), rounds=5, warmup_rounds=1)
    assert _chunks(pickle.loads(data)) == n


def test_metadata_740k_write_torch(benchmark, big_metadata_objects):
    md, cols, n = big_metadata_objects
    benchmark.group = "metadata-write 740k"
    benchmark.name = "test_metadata_740k_write[torch]"
    data = benchmark.pedantic(pickle.dumps, args=(md,), rounds=3, warmup_rounds=1)
    assert len(data) > 0
