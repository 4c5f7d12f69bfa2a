"""Workload ``ranges``: a resharded load from a real DCP checkpoint on disk.

Two cases, each saved once by DCP's FileSystemWriter with one layout and
loaded by ONE rank of another layout, with ckcore's RangeFileSystemReader and
torch's FileSystemReader in the same run:

* ``row2col``: one fp32 (32·MB x 8192) tensor saved row-sharded over 8 ranks,
  loaded as rank 0 of a column-sharded layout over 8 (every 4 KiB run of a
  32 KiB row).
* ``fsdp64-fsdp8tp8``: four bf16 (32·MB x 4096) matrices saved
  FSDP-64 (Shard(0) over 64), loaded as rank 0 of an 8x8 (Shard(0), Shard(1))
  mesh: a scaled-down FSDP-64 -> FSDP-8 x TP-8 reshard.

Size: ``CKCORE_BENCH_RANGES_MB`` (total checkpoint MiB per case), default
1024; with ``--benchmark-disable`` and no variable set, 8 MiB (quick mode).

Figures, per reader (stored in ``benchmark.extra_info`` and printed as a table):
bytes the rank needs; bytes read from disk (``/proc/self/io`` ``read_bytes``,
i.e. storage I/O, plus ``rchar``: bytes returned by read syscalls) and read
syscalls (``syscr``); wall time of ``dcp.load``; peak RSS above the RSS just
before ``dcp.load`` (destination tensors already allocated and touched),
from ``ru_maxrss`` of a fresh subprocess per reader.

Page cache: before every load (each timed round and each subprocess), every
file of the checkpoint is ``fsync``-ed and dropped with
``posix_fadvise(POSIX_FADV_DONTNEED)``, so both readers read from storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore.dcp.reader import RangeFileSystemReader
from tests.support.dcp_sim import BoxLoadPlanner, grid_boxes, row_boxes, save_as_ranks
from tests.support.paths import CKCORE_PARENT, REPO

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

RESULTS: dict[tuple[str, str], dict] = {}


def _size_mb(request) -> int:
    env = os.environ.get("CKCORE_BENCH_RANGES_MB")
    if env:
        return max(1, int(env))
    return 8 if request.config.getoption("benchmark_disable", False) else 1024


def _cases(mb: int):
    """name -> (tensors {fqn: (shape, dtype, saved world, saved boxes)}, the loading rank's boxes)."""
    rows = 32 * mb  # fp32 x 8192 columns = 32 KiB per row -> mb MiB
    t1 = {"w": ((rows, 8192), torch.float32)}
    rows2 = max(64, 32 * mb // 64 * 64)  # four bf16 x 4096 (8 KiB rows) -> mb MiB in all
    t2 = {f"layers.{i}.w": ((rows2, 4096), torch.bfloat16) for i in range(4)}
    return {
        "row2col": (t1, 8, lambda s: row_boxes(s, 8), lambda s: ((0, 0), (s[0], s[1] // 8))),
        "fsdp64-fsdp8tp8": (t2, 64, lambda s: row_boxes(s, 64), lambda s: grid_boxes(s, 8, 8)[0]),
    }


def drop_cache(path: str) -> None:
    """fsync and drop every file of the checkpoint from the page cache."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture(scope="module", params=["row2col", "fsdp64-fsdp8tp8"])
def checkpoint(request, tmp_path_factory):
    mb = _size_mb(request)
    tensors, world, saved, load_box = _cases(mb)[request.param]
    path = str(tmp_path_factory.mktemp(f"ranges-{request.param}"))
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(shape, generator=g).to(dtype) for k, (shape, dtype) in tensors.items()}
    save_as_ranks(path, {k: (t, saved(t.shape)) for k, t in full.items()}, world)
    boxes = {k: load_box(t.shape) for k, t in full.items()}
    expect = {}
    for k, ((o0, o1), (n0, n1)) in boxes.items():
        expect[k] = full[k][o0 : o0 + n0, o1 : o1 + n1].contiguous()
    needed = sum(e.numel() * e.element_size() for e in expect.values())
    del full
    yield request.param, path, boxes, {k: str(d).removeprefix("torch.") for k, (_, d) in tensors.items()}, expect, needed, mb
    _print_table(request, request.param)


def _load(path, boxes, dtypes, impl):
    sd = {k: torch.zeros(b[1], dtype=getattr(torch, dtypes[k])) for k, b in boxes.items()}
    reader = RangeFileSystemReader(path) if impl == "ckcore" else FileSystemReader(path)
    dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
    return sd


_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time, warnings, hashlib
    warnings.filterwarnings("ignore")
    import torch, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from tests.support.dcp_sim import BoxLoadPlanner
    from ckcore.dcp.reader import RangeFileSystemReader
    args = json.loads(sys.argv[1])
    path, impl = args["path"], args["impl"]
    boxes = {k: (tuple(o), tuple(s)) for k, (o, s) in args["boxes"].items()}
    def io_counters():
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (l.split(": ") for l in f.read().splitlines())}
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    sd = {k: torch.zeros(b[1], dtype=getattr(torch, args["dtypes"][k])) for k, b in boxes.items()}
    reader = RangeFileSystemReader(path) if impl == "ckcore" else FileSystemReader(path)
    planner = BoxLoadPlanner(boxes)
    # Warm-up: one load of a 1-element box of each tensor, so the lazy imports
    # and allocator pools of dcp.load are not counted as the load's memory.
    tiny = {k: ((0, 0), (1, 1)) for k in boxes}
    warm = {k: torch.zeros(1, 1, dtype=getattr(torch, args["dtypes"][k])) for k in boxes}
    warm_reader = RangeFileSystemReader(path) if impl == "ckcore" else FileSystemReader(path)
    dcp.load(warm, storage_reader=warm_reader, planner=BoxLoadPlanner(tiny), no_dist=True)
    del warm, warm_reader
    for name in os.listdir(path):  # page cache: see the module docstring
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
    # Reset the peak-RSS mark (VmHWM) to the current RSS, so the peak after the
    # load is the load's own (ru_maxrss cannot be reset; it is reported too).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base_rss = rss()
    io0 = io_counters()
    t0 = time.perf_counter()
    dcp.load(sd, storage_reader=reader, planner=planner, no_dist=True)
    wall = time.perf_counter() - t0
    io1 = io_counters()
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        hwm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
    peak = hwm if hwm_reset else ru_peak
    digest = {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
              for k, v in sd.items()}
    print(json.dumps({
        "wall_s": wall,
        "read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "rchar": io1["rchar"] - io0["rchar"],
        "syscr": io1["syscr"] - io0["syscr"],
        "peak_rss_above_dest": max(0, peak - max(base_rss, 0)),
        "peak_source": "VmHWM after clear_refs" if hwm_reset else "ru_maxrss",
        "ru_maxrss": ru_peak,
        "reader_stats": getattr(reader, "stats", None),
        "digest": digest,
    }))
    """
)


def _measure_in_child(path, boxes, dtypes, impl) -> dict:
    env = dict(os.environ)
    # The child imports the same ckcore as this process (the installed one in CI),
    # and tests.support from the checkout, after it (never the checkout's ckcore).
    env["PYTHONPATH"] = os.pathsep.join([str(CKCORE_PARENT), str(REPO), env.get("PYTHONPATH", "")])
    arg = json.dumps({"path": path, "impl": impl, "boxes": boxes, "dtypes": dtypes})
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, arg], env=env, capture_output=True, text=True, timeout=1800,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["ckcore", "torch"])
def test_ranges(benchmark, checkpoint, impl):
    import hashlib

    case, path, boxes, dtypes, expect, needed, mb = checkpoint
    benchmark.group = "ranges"
    benchmark.name = f"test_ranges[{case}-{impl}]"
    # Fresh process: peak RSS, I/O counters and read calls of one cold load.
    fig = _measure_in_child(path, boxes, dtypes, impl)
    want = {
        k: hashlib.sha256(v.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in expect.items()
    }
    assert fig["digest"] == want, "loaded bytes differ from the saved tensor"
    # In-process timing, page cache dropped before every round.
    rounds = 1 if mb <= 64 else 3
    result = benchmark.pedantic(
        _load, args=(path, boxes, dtypes, impl), setup=lambda: drop_cache(path),
        rounds=rounds, iterations=1,
    )
    for k, v in result.items():
        assert torch.equal(v.view(-1).view(torch.uint8), expect[k].view(-1).view(torch.uint8))
    info = {
        "case": case,
        "checkpoint_mib": mb,
        "needed_bytes": needed,
        "read_bytes": fig["read_bytes"],
        "rchar": fig["rchar"],
        "read_ratio_disk": fig["read_bytes"] / needed,
        "read_ratio_syscall": fig["rchar"] / needed,
        "read_syscalls": fig["syscr"],
        "child_wall_s": fig["wall_s"],
        "peak_rss_above_dest_mib": fig["peak_rss_above_dest"] / 2**20,
        "peak_source": fig["peak_source"],
        "reader_stats": fig["reader_stats"],
    }
    benchmark.extra_info.update(info)
    if benchmark.stats is not None:
        info["median_s"] = benchmark.stats.stats.median
    RESULTS[(case, impl)] = info


def _print_table(request, only: str) -> None:
    rows = [(k, v) for k, v in RESULTS.items() if k[0] == only]
    if not rows:
        return
    lines = [
        "",
        "ranges workload (page cache dropped before each load)",
        (f"{'case':<18}{'reader':<8}{'needed MiB':>11}{'disk MiB':>10}{'disk/need':>10}"
        f"{'rchar/need':>11}{'read calls':>11}{'wall s':>9}{'median s':>10}{'peak RSS+ MiB':>14}"),
    ]
    for (case, impl), r in sorted(rows):
        med = r.get("median_s")
        lines.append(
            f"{case:<18}{impl:<8}{r['needed_bytes'] / 2**20:>11.1f}{r['read_bytes'] / 2**20:>10.1f}"
            f"{r['read_ratio_disk']:>10.2f}{r['read_ratio_syscall']:>11.2f}{r['read_syscalls']:>11}"
            f"{r['child_wall_s']:>9.3f}{(med if med is not None else float('nan')):>10.3f}"
            f"{r['peak_rss_above_dest_mib']:>14.1f}"
        )
    for case in [only]:
        a, b = RESULTS.get((case, "ckcore")), RESULTS.get((case, "torch"))
        if a and b:
            lines.append(
                f"{case}: torch/ckcore wall (child) = {b['child_wall_s'] / a['child_wall_s']:.2f}x"
                + (
                    f", median = {b['median_s'] / a['median_s']:.2f}x"
                    if a.get("median_s") and b.get("median_s")
                    else ""
                )
            )
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines))
