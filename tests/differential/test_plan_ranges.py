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


def _assert_plan_equals_reader(path, shard_dim, make_reader, strides="stored"):
    # Plan every target rank's reads with `ckcore plan`'s model, read them
    # with the reader, compare the values and the reader's stats.
    ck = Checkpoint(path)
    mesh, layouts = report.resolve_layouts(ck.metadata, world_size=3, shard_dim=shard_dim)
    plan = report.plan_reads(ck, mesh, layouts, ranges=True)
    assert plan["range_reader"]["strides"] == strides
    by_rank = {r["rank"]: r for r in plan["ranks"]}
    for rank in range(3):
        reader = make_reader(path)
        md = reader.read_metadata()
        reader.set_up_storage_reader(md, True)
        items, dests = [], {}
        for fqn, t in TENSORS.items():
            sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
            off, ln = tuple(offsets[rank]), tuple(sizes[rank])
            dests[fqn] = torch.empty(ln, dtype=t.dtype)
            items += create_read_items_for_chunk_list(
                fqn, md.state_dict_metadata[fqn],
                [ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(ln))])
        reader.read_data(LoadPlan(items), _Dest(dests)).wait()
        for fqn, t in TENSORS.items():
            sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
            sl = tuple(slice(o, o + n) for o, n in zip(offsets[rank], sizes[rank]))
            assert torch.equal(dests[fqn], t[sl])
        got = by_rank[rank]["range"]
        assert (got["bytes_read"], got["read_calls"]) == (
            reader.stats["bytes_read"], reader.stats["read_calls"]), rank
        # Every byte the rank needs is read; the cost model may read through
        # gaps (even whole neighbouring items of this small checkpoint) to
        # save requests.
        assert got["bytes_read"] >= by_rank[rank]["useful_bytes"] > 0


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
