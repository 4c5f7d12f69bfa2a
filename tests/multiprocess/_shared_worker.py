"""One rank of the shared-read tests (tests/multiprocess/test_shared_reads.py runs 4 of these).

Usage: python _shared_worker.py <scenario> <workdir>, with RANK, WORLD_SIZE
and CKCORE_TEST_INIT_METHOD in the environment. Each rank writes
``<workdir>/<scenario>.<rank>.json`` with what it measured; a failed check
raises, so the process exits non-zero with the traceback on stderr.

Scenarios:

* ``save``: an HSDP save on a 2x2 mesh (replicate x shard(0)): every tensor is
  saved as 2 FSDP shards.
* ``load``: several loads of that checkpoint, every element checked:
  the same HSDP layout (2 replica groups x 2 shards), a column reshard of it,
  4 replicas of the whole tensors, with and without sharing (bytes read
  compared); overlapping-but-different boxes through ``read_data`` directly;
  a peer that raises while reading its share, with ``dcp.load``. The 4
  processes run on one machine: ``exchange_within_host=True`` makes each
  rank its own host (every shared byte crosses the process group),
  ``host="h<rank // 2>"`` models 2 hosts of 2 ranks, and the default (one
  host) shares nothing.
* ``kill``: rank 2 dies in the middle of the shared reads; the others must
  raise within the timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import ckcore.dcp as cdcp
from ckcore.dcp.shared import SharedRangeFileSystemReader, SharedReadError

SENTINEL = -7.0
TENSORS = {
    "w": ((64, 48), torch.float32),
    "e": ((37, 20), torch.float32),  # uneven shards
    "b": ((48,), torch.bfloat16),
    "h": ((16, 8, 6), torch.float16),
}


def expected(fqn: str) -> torch.Tensor:
    shape, dtype = TENSORS[fqn]
    n = 1
    for s in shape:
        n *= s
    seed = sum(map(ord, fqn)) % 97
    return ((torch.arange(n, dtype=torch.float64) * 7 + seed) % 251).reshape(shape).to(dtype)


def state_dict(mesh, placements, fill=None):
    out = {}
    for fqn in TENSORS:
        glob = expected(fqn)
        # a placement sharding a dim the tensor lacks replicates it instead
        placements = tuple(Replicate() if isinstance(p, Shard) and p.dim >= glob.ndim else p
                           for p in placements)
        sizes, offsets = compute_local_shape_and_global_offset(glob.shape, mesh, placements)
        sl = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        local = glob[sl].clone() if fill is None else torch.full(sizes, fill, dtype=glob.dtype)
        out[fqn] = DTensor.from_local(local, mesh, placements, shape=glob.shape,
                                      stride=glob.stride(), run_check=False)
    return out


def check(sd) -> int:
    n = 0
    for fqn, v in sd.items():
        glob = expected(fqn)
        sizes, offsets = compute_local_shape_and_global_offset(glob.shape, v.device_mesh, v.placements)
        want = glob[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
        got = v.to_local()
        assert got.dtype == want.dtype and torch.equal(got, want), f"{fqn}: loaded values differ"
        n += got.numel()
    return n


def load(path, mesh, placements, reader):
    sd = state_dict(mesh, placements, fill=SENTINEL)
    dcp.load(sd, storage_reader=reader, planner=cdcp.FastLoadPlanner())
    return check(sd), dict(reader.stats)


class _BoxPlanner:
    # read_data's planner side for hand-made read items: each item fills its
    # part of a destination box of one tensor.
    def __init__(self, dests):
        self.dests = dests  # fqn -> (tensor, box offsets)

    def resolve_tensor(self, req):
        t, _ = self.dests[req.dest_index.fqn]
        for d, (o, n) in enumerate(zip(req.dest_offsets, req.lengths)):
            t = t.narrow(d, o, n)
        return t

    def commit_tensor(self, req, tensor):
        pass


def overlapping_boxes(path, rank, reader):
    """Each rank needs a different box of each tensor; neighbours' boxes overlap."""
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, rank == 0)
    dests, items = {}, []
    for fqn in TENSORS:
        shape = TENSORS[fqn][0]
        # rows [r * s/8, r * s/8 + s/2): ranks 0..3 overlap their neighbours
        offs = [rank * shape[0] // 8] + [rank % 2] * (len(shape) - 1)
        lens = [shape[0] // 2] + [s - 1 for s in shape[1:]]
        dest = torch.full(lens, SENTINEL, dtype=TENSORS[fqn][1])
        dests[fqn] = (dest, offs)
        items += create_read_items_for_chunk_list(
            fqn, md.state_dict_metadata[fqn],
            [ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(lens))])
    reader.read_data(LoadPlan(items), _BoxPlanner(dests)).wait()
    n = 0
    for fqn, (dest, offs) in dests.items():
        want = expected(fqn)[tuple(slice(o, o + s) for o, s in zip(offs, dest.shape))]
        assert torch.equal(dest, want), f"overlap: {fqn}: values differ on rank {rank}"
        n += dest.numel()
    return n, dict(reader.stats)


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["CKCORE_TEST_INIT_METHOD"], rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    path = os.path.join(workdir, "ckpt")
    out: dict = {}
    hsdp = (Replicate(), Shard(0))
    if scenario == "save":
        mesh = init_device_mesh("cpu", (2, 2))
        dcp.save(state_dict(mesh, hsdp), checkpoint_id=path)
    elif scenario == "load":
        mesh2 = init_device_mesh("cpu", (2, 2))
        mesh4 = init_device_mesh("cpu", (4,))
        layouts = {
            "hsdp": (mesh2, hsdp),
            "hsdp_cols": (mesh2, (Replicate(), Shard(1))),
            "rep4": (mesh4, (Replicate(),)),
        }
        for name, (mesh, placements) in layouts.items():
            n0, plain = load(path, mesh, placements, cdcp.RangeFileSystemReader(path))
            n1, shared = load(path, mesh, placements, SharedRangeFileSystemReader(
                path, exchange_within_host=True))
            # small pieces and rounds: splitting and several exchange rounds
            n2, small = load(path, mesh, placements, SharedRangeFileSystemReader(
                path, exchange_bytes=4096, min_piece_bytes=256, exchange_within_host=True))
            n3, hosts2 = load(path, mesh, placements, SharedRangeFileSystemReader(
                path, host=f"h{rank // 2}"))
            n4, onehost = load(path, mesh, placements, SharedRangeFileSystemReader(path))
            assert n0 == n1 == n2 == n3 == n4
            out[name] = {"elements": n1, "plain": plain, "shared": shared, "small": small,
                         "hosts2": hosts2, "onehost": onehost}
        n, stats = overlapping_boxes(path, rank, SharedRangeFileSystemReader(
            path, exchange_bytes=4096, min_piece_bytes=64, exchange_within_host=True))
        out["overlap"] = {"elements": n, "shared": stats}
        n, stats = overlapping_boxes(path, rank, SharedRangeFileSystemReader(
            path, exchange_bytes=4096, min_piece_bytes=64, host=f"h{rank // 2}"))
        out["overlap_hosts2"] = {"elements": n, "shared": stats}
        # A peer raises while reading its share: every rank's load raises.
        reader = SharedRangeFileSystemReader(path, timeout=20, exchange_within_host=True)
        if rank == 1:
            def boom(*args, **kwargs):
                raise OSError(5, "injected read failure on rank 1")
            reader._read_pieces = boom
        sd = state_dict(mesh4, (Replicate(),), fill=SENTINEL)
        t0 = time.monotonic()
        try:
            dcp.load(sd, storage_reader=reader, planner=cdcp.FastLoadPlanner())
        except CheckpointException as e:
            out["raise"] = {"error": str(e)[-3000:], "seconds": time.monotonic() - t0}
        else:
            raise AssertionError("the load succeeded although rank 1 failed")
    elif scenario == "kill":
        mesh4 = init_device_mesh("cpu", (4,))
        reader = SharedRangeFileSystemReader(path, timeout=15, exchange_bytes=4096,
                                             min_piece_bytes=64, exchange_within_host=True)
        if rank == 2:
            real = reader._read_pieces
            calls = []

            def die(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:  # mid-exchange: after one round went through
                    os._exit(17)
                return real(*args, **kwargs)
            reader._read_pieces = die
        sd = state_dict(mesh4, (Replicate(),), fill=SENTINEL)
        md = reader.read_metadata()
        reader.set_up_storage_reader(md, rank == 0)
        planner = cdcp.FastLoadPlanner()
        planner.set_up_planner(sd, md, rank == 0)
        plan = planner.finish_plan(planner.create_local_plan())
        t0 = time.monotonic()
        try:
            reader.read_data(plan, planner).wait()
        except SharedReadError as e:
            out["kill"] = {"error": str(e)[-2000:], "seconds": time.monotonic() - t0}
        else:
            raise AssertionError("read_data succeeded although rank 2 died")
        with open(os.path.join(workdir, f"{scenario}.{rank}.json"), "w") as f:
            json.dump(out, f)
        os._exit(0)  # the group lost a rank: skip the teardown collectives
    with open(os.path.join(workdir, f"{scenario}.{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
