"""One rank of the ``load-e2e`` benchmark (bench/test_bench_load_e2e.py starts the ranks).

argv: checkpoint directory, JSON config. Started with ``LD_PRELOAD`` of the
delay model (bench/_io_delay.c), it also runs every scenario with the
modelled per-request delays of ``config["delays_us"]``, switched on through
the model's ``ck_io_delay_set_us`` around those loads only. The ranks save a transformer-like
bf16 state dict FSDP-sharded (``dcp.save``, torch's default planner) if
``config["save"]``, then time resharded ``dcp.load`` calls: for each round,
scenario, page-cache state and reader, every rank builds zeroed destination
DTensors, the cache is prepared by rank 0 (cold: ``fsync`` +
``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file of the checkpoint;
warm: every file read once), all ranks meet at a barrier, and each times its
own ``dcp.load``; the figure is the slowest rank's time. Every element of
every rank's shards is compared (as raw 16-bit patterns) with the saved
values. Rank 0 prints one JSON line with all figures.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: E402

from ckcore.dcp import FastLoadPlanner, RangeFileSystemReader  # noqa: E402

# scenario -> (mesh shape, placements of every tensor)
SCENARIOS = {
    "fsdp->fsdp×tp": ((2, 2), (Shard(0), Shard(1))),
    "col-tp4": ((4,), (Shard(1),)),
    "fsdp->fsdp": ((4,), (Shard(0),)),
}
SAVE = ((4,), (Shard(0),))


def shapes(hidden: int, layers: int) -> dict[str, tuple[int, int]]:
    """A transformer's weight matrices (no biases or norms: they are tiny)."""
    h = hidden
    out = {}
    for i in range(layers):
        out[f"layers.{i}.attn.qkv.weight"] = (3 * h, h)
        out[f"layers.{i}.attn.out.weight"] = (h, h)
        out[f"layers.{i}.mlp.up.weight"] = (4 * h, h)
        out[f"layers.{i}.mlp.down.weight"] = (h, 4 * h)
    return out


def values(salt: int, shape, offset, size) -> torch.Tensor:
    """bf16 whose bit pattern is a hash of (tensor, global element index): a misplaced element shows."""
    rows = torch.arange(offset[0], offset[0] + size[0], dtype=torch.int64)[:, None]
    cols = torch.arange(offset[1], offset[1] + size[1], dtype=torch.int64)[None, :]
    x = rows * shape[1] + cols + salt * 1_000_003
    x = x * 0x9E3779B1
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 13)
    return (x & 0xFFFF).to(torch.int32).sub_(32768).to(torch.int16).view(torch.bfloat16)


def local_box(mesh, placements, shape):
    """This rank's (sizes, offsets) of ``shape`` under ``placements`` on ``mesh`` (torch's rule)."""
    size, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(size), tuple(offset)


def state_dict(meshes, layout, fqn_shapes, fill: bool):
    """DTensors of every weight in ``layout``: the saved values (``fill``) or zeros to load into."""
    mesh = meshes[layout[0]]
    sd = {}
    for i, (fqn, shape) in enumerate(fqn_shapes.items()):
        size, offset = local_box(mesh, layout[1], shape)
        local = values(i, shape, offset, size) if fill else torch.zeros(size, dtype=torch.bfloat16)
        sd[fqn] = DTensor.from_local(local, mesh, layout[1], run_check=False, shape=torch.Size(shape),
                                     stride=(shape[1], 1))
    return sd


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io`` counters (every thread's reads)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def prepare_cache(path: str, cache: str) -> None:
    """Cold: fsync and drop every checkpoint file from the page cache; warm: read each once."""
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            if cache == "cold":
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 8 << 20):
                    pass
        finally:
            os.close(fd)


def device_floor(path: str, rounds: int = 3) -> float:
    """Seconds one process needs to read every checkpoint file from a cold cache (median of ``rounds``).

    Every file is announced whole (``POSIX_FADV_WILLNEED``, so the device
    works on many requests at once) and read in 16 MiB calls into one
    buffer: what the device gives when nothing else is done with the bytes.
    Every scenario here needs every saved byte on some rank, so no reader's
    cold load can be faster than this.
    """
    names = [os.path.join(path, n) for n in sorted(os.listdir(path))
             if os.path.isfile(os.path.join(path, n))]
    buf = bytearray(16 << 20)
    times = []
    for _ in range(rounds):
        prepare_cache(path, "cold")
        t0 = time.perf_counter()
        fds = [os.open(p, os.O_RDONLY) for p in names]
        try:
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            for fd in fds:
                while os.readv(fd, [buf]):
                    pass
        finally:
            for fd in fds:
                os.close(fd)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Run this rank: save if asked, then every timed load; rank 0 prints the figures."""
    ckpt, cfg = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["CKCORE_BENCH_INIT_METHOD"], rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    meshes = {s: init_device_mesh("cpu", s) for s in {SAVE[0], *(m for m, _ in SCENARIOS.values())}}
    fqn_shapes = shapes(cfg["hidden"], cfg["layers"])
    if cfg["save"]:
        dcp.save(state_dict(meshes, SAVE, fqn_shapes, True), checkpoint_id=ckpt)
    dist.barrier()
    floor = device_floor(ckpt) if rank == 0 else 0.0
    dist.barrier()
    # Expected shards, computed once: every load is compared with them.
    expect = {s: state_dict(meshes, SCENARIOS[s], fqn_shapes, True) for s in cfg["scenarios"]}
    reader_kw = cfg.get("reader_kw", {})
    shim = ctypes.CDLL(os.environ["LD_PRELOAD"]) if os.environ.get("LD_PRELOAD") else None
    rows = []
    runs = [(0.0, c) for c in cfg["caches"]]
    if shim is not None:
        shim.ck_io_delay_set_us.argtypes = [ctypes.c_double]
        runs += [(d, c) for d in cfg["delays_us"] for c in cfg["delay_caches"]]
    for rnd in range(cfg["rounds"]):
        for scenario in cfg["scenarios"]:
            for delay_us, cache in runs:
                if shim is not None:
                    shim.ck_io_delay_set_us(delay_us)
                for impl in ("ckcore", "torch"):
                    sd = state_dict(meshes, SCENARIOS[scenario], fqn_shapes, False)
                    if impl == "ckcore":
                        planner, reader = FastLoadPlanner(), RangeFileSystemReader(ckpt, **reader_kw)
                    else:
                        planner, reader = DefaultLoadPlanner(), FileSystemReader(ckpt)
                    if rank == 0:
                        prepare_cache(ckpt, cache)
                    dist.barrier()
                    io0 = io_counters()
                    t0 = time.perf_counter()
                    dcp.load(sd, checkpoint_id=ckpt, planner=planner, storage_reader=reader)
                    wall = time.perf_counter() - t0
                    io1 = io_counters()
                    ok = all(
                        torch.equal(sd[k].to_local().view(torch.int16), expect[scenario][k].to_local().view(torch.int16))
                        for k in fqn_shapes
                    )
                    t = torch.tensor([wall], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    c = torch.tensor([io1[k] - io0[k] for k in ("syscr", "rchar", "read_bytes")] + [int(not ok)],
                                     dtype=torch.int64)
                    dist.all_reduce(c, op=dist.ReduceOp.SUM)
                    rows.append({
                        "round": rnd, "scenario": scenario, "cache": cache, "impl": impl,
                        "delay_us": delay_us,
                        "wall_s": t.item(), "syscr": int(c[0]), "rchar": int(c[1]),
                        "read_bytes": int(c[2]), "bad_ranks": int(c[3]),
                    })
                    del sd
                if shim is not None:
                    shim.ck_io_delay_set_us(0.0)
    if rank == 0:
        total = sum(s[0] * s[1] * 2 for s in fqn_shapes.values())
        print(json.dumps({"rows": rows, "checkpoint_bytes": total, "device_floor_s": floor}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
