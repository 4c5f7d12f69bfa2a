"""One rank of the ``shared-load`` benchmark (bench/test_bench_shared_load.py launches 4).

Usage: python _shared_load_worker.py <workdir> <rounds>, with RANK, WORLD_SIZE
and CKCORE_TEST_INIT_METHOD in the environment. Loads ``<workdir>/ckpt`` as 4
replicas (HSDP with 4 replica groups of 1 shard: every rank needs every
element), with torch's ``DefaultLoadPlanner`` + ``FileSystemReader`` and with
ckcore's ``FastLoadPlanner`` + ``SharedRangeFileSystemReader``, the latter
as deployed here (``ckcore``: the 4 ranks share one host and its page cache,
so each reads its own) and with each rank made its own host
(``ckcore-4hosts``: ``exchange_within_host=True``, every byte read once and
exchanged over gloo, as 4 replicas on 4 hosts would), cold (the
checkpoint files dropped from the page cache with ``posix_fadvise(DONTNEED)``
first) and warm; every element is checked after every load. Rank 0 writes
``<workdir>/result.json``: per variant and mode the slowest rank's wall
seconds (from a barrier to the end of ``dcp.load``) and the storage bytes
all ranks read (torch: the storage items its ``read_data`` reads, one
whole item per read item; ckcore: the reader's ``stats``).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ckcore.dcp import FastLoadPlanner
from ckcore.dcp.shared import SharedRangeFileSystemReader


def expected(i: int, numel: int) -> torch.Tensor:
    return (torch.arange(numel, dtype=torch.float32) * 3 + i) % 1021


class CountingReader(FileSystemReader):
    """torch's reader, counting the bytes its read_data reads (each read item's whole storage item)."""

    bytes_read = 0

    def read_data(self, plan, planner):
        self.bytes_read += sum(self.storage_data[r.storage_index].length for r in plan.items)
        return super().read_data(plan, planner)


def drop_cache(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def device_bytes() -> int:
    """Bytes this process has had fetched from the block device (``/proc/self/io`` ``read_bytes``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    workdir, rounds = sys.argv[1], int(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["CKCORE_TEST_INIT_METHOD"], rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    path = os.path.join(workdir, "ckpt")
    with open(os.path.join(workdir, "tensors.json")) as f:
        shapes = json.load(f)
    sd = {name: torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}
    result: dict = {}
    variants = os.environ.get("CKCORE_BENCH_SHARED_VARIANTS", "torch,ckcore,ckcore-4hosts")
    # The storage model (bench/_io_delay.c, preloaded by the launcher when
    # CKCORE_BENCH_SHARED_MBPS is set): one server of that bandwidth shared
    # by the 4 processes, every read charged (no shared cache: 4 hosts).
    shim = ctypes.CDLL(os.environ["LD_PRELOAD"]) if os.environ.get("LD_PRELOAD") else None
    mbps = [float(x) for x in os.environ.get("CKCORE_BENCH_SHARED_MBPS", "").split(",") if x]
    if shim is not None:
        shim.ck_io_bw_set_mbps.argtypes = [ctypes.c_double]
    runs = [(v, m) for v in variants.split(",")
            for m in ["cold"] * rounds + ["warm"] * rounds]
    if shim is not None:
        runs += [(v, f"storage {b:g} MB/s") for b in mbps for v in ("torch", "ckcore-4hosts")
                 for _ in range(rounds)]
    for variant, mode in runs:
        for t in sd.values():
            t.fill_(-1.0)
        dist.barrier()
        if mode == "cold" and rank == 0:
            drop_cache(path)
        dist.barrier()
        modelled = mode.startswith("storage")
        if modelled:
            shim.ck_io_bw_set_mbps(float(mode.split()[1]))
        dev0 = device_bytes()
        t0 = time.perf_counter()
        if variant == "torch":
            reader = CountingReader(path)
            dcp.load(sd, storage_reader=reader, planner=DefaultLoadPlanner())
            nbytes = reader.bytes_read
        else:
            reader = SharedRangeFileSystemReader(
                path, exchange_within_host=variant == "ckcore-4hosts")
            dcp.load(sd, storage_reader=reader, planner=FastLoadPlanner())
            nbytes = reader.stats["bytes_read"]
            if os.environ.get("CKCORE_BENCH_SHARED_VERBOSE"):
                print(rank, mode, round(time.perf_counter() - t0, 3), reader.stats, reader.seconds, file=sys.stderr)
        wall = time.perf_counter() - t0
        dev = device_bytes() - dev0
        if modelled:
            shim.ck_io_bw_set_mbps(0.0)
        for i, (name, t) in enumerate(sd.items()):
            assert torch.equal(t.view(-1), expected(i, t.numel())), f"{variant}: {name} differs"
        walls = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(walls, torch.tensor([wall, float(nbytes), float(dev)], dtype=torch.float64))
        row = result.setdefault(variant, {}).setdefault(mode, [])
        row.append({"wall_s": max(float(w[0]) for w in walls),
                    "bytes_read": int(sum(float(w[1]) for w in walls)),
                    "device_bytes": int(sum(float(w[2]) for w in walls))})
    if rank == 0:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
