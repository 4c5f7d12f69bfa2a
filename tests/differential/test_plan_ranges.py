"""``ckcore plan``'s range-reader figures against what RangeFileSystemReader really reads.

A single-process checkpoint (a row-major and a transposed, non-contiguous
tensor, both larger than the 4 KiB small-item limit, and a small one) is
planned at a column-sharded target layout (narrow boxes: items read whole in
one request) and a row-sharded one (long runs: records read in merged
windows, then the rows in place); each target rank's boxes are then
read with ``RangeFileSystemReader.read_data`` and its ``stats`` must equal
the plan's ``range`` figures for that rank. The same plan without the files
says that it assumes contiguous storage.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ExtensionRegistry
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ckcore import report
from ckcore.checkpoint import Checkpoint
from ckcore.cli import main
from ckcore.dcp import RangeFileSystemReader
from ckcore.layout import local_shapes_and_offsets
from tests.differential.test_range_reader import _Xor

TENSORS = {
    "rows": torch.arange(64 * 40, dtype=torch.float32).reshape(64, 40),
    "cols": torch.arange(48 * 32, dtype=torch.float64).reshape(32, 48).t(),  # stored transposed
    "small": torch.arange(30, dtype=torch.int16).reshape(3, 10),
}


class _Dest:
    def __init__(self, dests):
        self.dests = dests

    def resolve_tensor(self, req):
        t = self.dests[req.dest_index.fqn]
        for d, (o, n) in enumerate(zip(req.dest_offsets, req.lengths)):
            t = t.narrow(d, o, n)
        return t

    def commit_tensor(self, req, tensor):
        pass


def _assert_plan_equals_reader(path, shard_dim, make_reader, strides="stored", tensors=None, world=3):
    # Plan every target rank's reads with `ckcore plan`'s model, read them
    # with the reader, compare the values and the reader's stats.
    tensors = TENSORS if tensors is None else tensors
    ck = Checkpoint(path)
    mesh, layouts = report.resolve_layouts(ck.metadata, world_size=world, shard_dim=shard_dim)
    plan = report.plan_reads(ck, mesh, layouts, ranges=True)
    if strides is not None:
        assert plan["range_reader"]["strides"] == strides
    by_rank = {r["rank"]: r for r in plan["ranks"]}
    for rank in range(world):
        reader = make_reader(path)
        md = reader.read_metadata()
        reader.set_up_storage_reader(md, True)
        items, dests = [], {}
        for fqn, t in tensors.items():
            sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
            off, ln = tuple(offsets[rank]), tuple(sizes[rank])
            dests[fqn] = torch.empty(ln, dtype=t.dtype)
            if 0 not in ln:
                items += create_read_items_for_chunk_list(
                    fqn, md.state_dict_metadata[fqn],
                    [ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(ln))])
        reader.read_data(LoadPlan(items), _Dest(dests)).wait()
        for fqn, t in tensors.items():
            sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
            sl = tuple(slice(o, o + n) for o, n in zip(offsets[rank], sizes[rank]))
            assert torch.equal(dests[fqn], t[sl]), (fqn, rank)
        got = by_rank[rank]["range"]
        assert (got["bytes_read"], got["read_calls"]) == (
            reader.stats["bytes_read"], reader.stats["read_calls"]), (world, shard_dim, rank)
        # Every byte the rank needs is read; the cost model may read through
        # gaps (even whole neighbouring items of this small checkpoint) to
        # save requests.
        assert got["bytes_read"] >= by_rank[rank]["useful_bytes"]


def _save(path, **kw):
    dcp.save({k: v.clone() if k != "cols" else v for k, v in TENSORS.items()}, checkpoint_id=path,
             no_dist=True, **kw)


@pytest.mark.parametrize("shard_dim", [1, 0])
def test_range_figures_equal_the_reader_and_say_when_files_are_absent(tmp_path, capsys, shard_dim):
    path = tmp_path / "ck"
    _save(path)
    _assert_plan_equals_reader(path, shard_dim, RangeFileSystemReader)

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / ".metadata", bare / ".metadata")
    assert main(["plan", str(bare), "--world-size", "3", "--shard-dim", "1"]) == 0
    assert "assume contiguous (C-order) storage" in capsys.readouterr().out
    assert main(["plan", str(bare), "--world-size", "3", "--shard-dim", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["range_reader"]["strides"] == "contiguous"


@pytest.mark.parametrize("shard_dim", [1, 0])
def test_range_figures_equal_the_reader_for_transformed_items(tmp_path, shard_dim):
    """Items with a stream transform go through torch's path: one call and the whole item each."""
    path = tmp_path / "ck"
    _save(path, storage_writer=FileSystemWriter(path, _extensions=[_Xor()]))
    registry = ExtensionRegistry()
    registry.register(_Xor)
    _assert_plan_equals_reader(path, shard_dim, lambda p: RangeFileSystemReader(p, registry),
                               strides="contiguous")


@pytest.mark.parametrize("seed", range(12))
def test_range_figures_equal_the_reader_on_random_checkpoints(tmp_path, seed):
    """Random multi-rank saves (row, column, grid; some transposed; 2-3 dims), many targets."""
    import random

    from tests.support.dcp_sim import col_boxes, grid_boxes, row_boxes, save_as_ranks

    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    save_world = rnd.choice([1, 2, 3, 4])
    spec = {}
    for i in range(rnd.randint(1, 4)):
        dt = rnd.choice([torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.complex64])
        shape = (rnd.choice([1, 3, 17, 64, 128, 300]), rnd.choice([1, 5, 40, 96, 257]))
        if rnd.random() < 0.2:
            shape += (rnd.choice([2, 7]),)
        t = torch.randn(shape, generator=g).to(dt)
        kind = rnd.choice(["row", "col", "grid"]) if len(shape) == 2 else "row"
        if kind == "col":
            boxes = col_boxes(shape, save_world)
        elif kind == "grid" and save_world == 4:
            boxes = grid_boxes(shape, 2, 2)
        else:
            boxes = row_boxes(shape, save_world)
        spec[f"t{i}"] = (t, boxes)
    transposed = {k for k in spec if rnd.random() < 0.3 and spec[k][0].dim() == 2}
    path = tmp_path / "ck"
    save_as_ranks(str(path), spec, save_world,
                  layout=lambda fqn, s: s.t().contiguous().t() if fqn in transposed else s)
    tensors = {k: t for k, (t, _) in spec.items()}
    for world in (2, 3):
        for shard_dim in (0, 1):
            _assert_plan_equals_reader(path, shard_dim, lambda p: RangeFileSystemReader(p, thread_count=1),
                                       strides=None, tensors=tensors, world=world)


def test_range_figures_count_each_preadv_of_a_block_of_many_runs(tmp_path, monkeypatch):
    """A block of more runs than one preadv carries is read in several calls; the plan counts them."""
    from ckcore import ranges
    from ckcore.dcp import reader as reader_mod
    from tests.support.dcp_sim import row_boxes, save_as_ranks

    t = torch.randn(300, 257, 7, generator=torch.Generator().manual_seed(0)).to(torch.complex64)
    path = tmp_path / "ck"
    save_as_ranks(str(path), {"t": (t, row_boxes(t.shape, 1))}, 1)
    calls_per_block = []
    real = ranges.read_runs

    def spy(fd, runs, blocks, dst, prefetch=0):
        out = real(fd, runs, blocks, dst, prefetch)
        calls_per_block.append(out[0] / len(blocks))
        return out

    monkeypatch.setattr(reader_mod._r, "read_runs", spy)
    ck = Checkpoint(path)
    mesh, layouts = report.resolve_layouts(ck.metadata, world_size=2, shard_dim=1)
    plan = {r["rank"]: r["range"] for r in report.plan_reads(ck, mesh, layouts, ranges=True)["ranks"]}
    for rank in range(2):
        reader = RangeFileSystemReader(path, thread_count=1)
        md = reader.read_metadata()
        reader.set_up_storage_reader(md, True)
        sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts["t"][1])
        off, ln = tuple(offsets[rank]), tuple(sizes[rank])
        dest = torch.empty(ln, dtype=t.dtype)
        items = create_read_items_for_chunk_list(
            "t", md.state_dict_metadata["t"], [ChunkStorageMetadata(torch.Size(off), torch.Size(ln))])
        reader.read_data(LoadPlan(items), _Dest({"t": dest})).wait()
        assert torch.equal(dest, t[tuple(slice(o, o + n) for o, n in zip(off, ln))])
        assert (plan[rank]["bytes_read"], plan[rank]["read_calls"]) == (
            reader.stats["bytes_read"], reader.stats["read_calls"])
    assert max(calls_per_block) > 1  # the case is the one of several preadv calls per block


def _plan_equals_reader_stats(path, tensors, world, shard_dim):
    # Every target rank's plan figures against the reader's stats (one thread), values checked.
    ck = Checkpoint(path)
    mesh, layouts = report.resolve_layouts(ck.metadata, world_size=world, shard_dim=shard_dim)
    plan = {r["rank"]: r["range"] for r in report.plan_reads(ck, mesh, layouts, ranges=True)["ranks"]}
    for rank in range(world):
        reader = RangeFileSystemReader(path, thread_count=1)
        md = reader.read_metadata()
        reader.set_up_storage_reader(md, True)
        items, dests, boxes = [], {}, {}
        for fqn, t in tensors.items():
            sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
            boxes[fqn] = off, ln = tuple(offsets[rank]), tuple(sizes[rank])
            dests[fqn] = torch.empty(ln, dtype=t.dtype)
            items += create_read_items_for_chunk_list(
                fqn, md.state_dict_metadata[fqn], [ChunkStorageMetadata(torch.Size(off), torch.Size(ln))])
        reader.read_data(LoadPlan(items), _Dest(dests)).wait()
        for fqn, (off, ln) in boxes.items():
            assert torch.equal(dests[fqn], tensors[fqn][tuple(slice(o, o + n) for o, n in zip(off, ln))])
        assert (plan[rank]["bytes_read"], plan[rank]["read_calls"]) == (
            reader.stats["bytes_read"], reader.stats["read_calls"]), (world, shard_dim, rank)


def test_range_figures_count_no_gap_iovec_between_touching_runs(tmp_path):
    """Rows that touch in the file but not in the destination (a 3-d save with its first
    two dims swapped in memory) are one block of runs without gaps between them:
    read_runs gathers one iovec per run, 300 of them in one preadv."""
    from tests.support.dcp_sim import save_as_ranks

    t = torch.randn(20, 15, 1024, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ck"
    save_as_ranks(str(path), {"t": (t, [((0, 0, 0), tuple(t.shape))])}, 1,
                  layout=lambda fqn, s: s.permute(1, 0, 2).contiguous().permute(1, 0, 2))
    _plan_equals_reader_stats(path, {"t": t}, 1, 0)
    _plan_equals_reader_stats(path, {"t": t}, 2, 2)


def test_range_figures_count_the_scratch_slabs_of_an_item_past_the_buffer(tmp_path):
    """A box read through the scratch buffer from a chunk larger than buffer_bytes is read
    slab by slab, each coalesced on its own (no read crosses a slab boundary)."""
    from tests.support.dcp_sim import save_as_ranks

    t = torch.randn(4200, 1024, generator=torch.Generator().manual_seed(0))  # 17 MB > 16 MiB
    path = tmp_path / "ck"
    save_as_ranks(str(path), {"t": (t, [((0, 0), tuple(t.shape))])}, 1)
    _plan_equals_reader_stats(path, {"t": t}, 2, 1)


@pytest.mark.parametrize("what", ["direct_slab", "slab_runs"])
def test_range_figures_count_the_slabs_of_large_boxes(tmp_path, monkeypatch, what):
    """In-place boxes are read in slabs of DIRECT_SLAB_BYTES of file span and any slab
    holds about MAX_SLAB_RUNS runs; the plan counts the same slabs (limits shrunk here
    so that small tensors have several)."""
    from ckcore import ranges
    from tests.support.dcp_sim import save_as_ranks

    if what == "direct_slab":
        monkeypatch.setattr(ranges, "DIRECT_SLAB_BYTES", 300 << 10)
        monkeypatch.setattr(report, "DIRECT_SLAB_BYTES", 300 << 10)
    else:
        monkeypatch.setattr(ranges, "MAX_SLAB_RUNS", 100)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(600, 2048, generator=g), "b": torch.randn(700, 96, generator=g)}
    path = tmp_path / "ck"
    save_as_ranks(str(path), {k: (v, [((0, 0), tuple(v.shape))]) for k, v in tensors.items()}, 1)
    for world, shard_dim in ((2, 1), (3, 1), (2, 0)):
        _plan_equals_reader_stats(path, tensors, world, shard_dim)


def test_range_figures_read_into_the_ranks_local_tensor(tmp_path):
    """A read item lands in the planner's narrow of the rank's local tensor: a column-saved
    chunk read by a rank that holds whole rows fills strided rows there (one run, and one
    iovec, per row: two preadv calls for 600 rows), not a tensor of its own (one run)."""
    from tests.support.dcp_sim import col_boxes, save_as_ranks

    t = torch.randn(600, 2048, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ck"
    save_as_ranks(str(path), {"t": (t, col_boxes(t.shape, 2))}, 2)
    _plan_equals_reader_stats(path, {"t": t}, 1, 0)
    _plan_equals_reader_stats(path, {"t": t}, 3, 0)
