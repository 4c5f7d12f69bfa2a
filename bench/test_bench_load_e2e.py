"""Workload ``load-e2e``: resharded ``dcp.load`` end to end over real gloo processes.

Four ranks (this 2-core machine's sensible most; ``CKCORE_BENCH_E2E_WORLD``
is not offered because the layouts below are written for 4) save a
transformer-like bf16 state dict FSDP-sharded with ``dcp.save`` (per layer
``qkv`` 3h x h, ``out`` h x h, ``up`` 4h x h, ``down`` h x 4h; h = 2048 and 3
layers, 288 MiB, in the full run; h = 256 and 2 layers, 3 MiB, in quick mode:
``CKCORE_BENCH_QUICK=1`` or ``--benchmark-disable``), then load it as:

* ``fsdp->fsdp×tp``: a 2 x 2 mesh, (Shard(0), Shard(1)) — FSDP -> FSDP x TP;
* ``col-tp4``: Shard(1) over 4 — a column reshard of a row-sharded checkpoint;
* ``fsdp->fsdp``: Shard(0) over 4 — no reshard.

Each load is ``FastLoadPlanner`` + ``RangeFileSystemReader`` (default
arguments) against torch's ``DefaultLoadPlanner`` + ``FileSystemReader``, in
the same launch, interleaved round by round (3 rounds, 1 in quick mode). The
figure is the slowest rank's ``dcp.load`` wall time (median over rounds) and
``torch / ckcore``. Every element of every rank's shards is checked.

Page cache: **cold** means rank 0 ``fsync``-s every checkpoint file and drops
it with ``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` before the load
(the other ranks wait at a barrier); **warm** means rank 0 read every file
once just before.

Modelled network storage (``delay=…``): the ranks run with
``bench/_io_delay.c`` preloaded (compiled here with ``cc``; without a
compiler those rows are left out), which, switched on around the delayed
loads only, makes every read
call (``read``, ``pread``, ``readv``, ``preadv`` and variants) on a file of
the checkpoint sleep ``CKCORE_BENCH_E2E_DELAY_MS`` (default 1) ms first, in
the calling thread. Both readers pass through those libc calls — torch's
through CPython's file objects, ckcore's through ``os.pread`` and its
``preadv`` kernel — so both pay the same price per request. It is a model of
per-request latency only (no bandwidth limit, no server-side queueing), not a
measurement of any real network file system or object store. Delayed loads
run with a warm page cache, so the modelled latency is what is measured.

``CKCORE_BENCH_E2E_READER`` (JSON) passes arguments to ckcore's reader,
e.g. ``{"thread_count": 1}`` for the sequential path.

Device floor: before the loads rank 0 times reading every checkpoint file
from a cold cache itself (each file announced whole with
``POSIX_FADV_WILLNEED``, then read in 16 MiB calls; median of 3). Every
scenario needs every saved byte on some rank, so no cold load can beat it:
``torch cold / floor`` is printed as the largest cold ratio any reader could
reach here.

Reads and bytes: ``/proc/self/io`` of every rank around its load, summed:
``syscr`` (read syscalls), ``rchar`` (bytes those returned) and
``read_bytes`` (bytes fetched from the block device).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _io_model import build_io_model  # bench/ is on sys.path (conftest.py)

from tests.support.paths import CKCORE_PARENT
from tests.support.rdzv import file_init_method

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_load_e2e_worker.py"
WORLD = 4
SCENARIOS = ["fsdp->fsdp×tp", "col-tp4", "fsdp->fsdp"]
TIMEOUT = 1800


def _quick(request) -> bool:
    return bool(os.environ.get("CKCORE_BENCH_QUICK")) or bool(
        request.config.getoption("benchmark_disable", False))


def _config(request, delays_ms: list[float]) -> dict:
    quick = _quick(request)
    return {
        "save": True,
        "hidden": 256 if quick else 2048,
        "layers": 2 if quick else 3,
        "rounds": 1 if quick else 3,
        "scenarios": SCENARIOS,
        "caches": ["cold", "warm"],
        "delays_us": [ms * 1000 for ms in delays_ms],
        "delay_caches": ["warm"],
        "reader_kw": json.loads(os.environ.get("CKCORE_BENCH_E2E_READER", "{}")),
    }


def _launch(workdir: Path, ckpt: Path, cfg: dict, extra_env: dict[str, str]) -> dict:
    name = f"rdzv-{len(list(workdir.glob('rdzv-*')))}"
    init = file_init_method(workdir, name)
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(WORLD),
            CKCORE_BENCH_INIT_METHOD=init, OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(CKCORE_PARENT), os.environ.get("PYTHONPATH", "")]),
            **extra_env,
        )
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(ckpt), json.dumps(cfg)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-4000:]
        outs.append(out)
    return json.loads(outs[0].strip().splitlines()[-1])


def test_load_e2e(benchmark, request, tmp_path):
    """One launch: save, then every scenario on local disk (cold, warm) and under the delay model."""
    ckpt = tmp_path / "ckpt"
    delays_ms = [float(x) for x in os.environ.get("CKCORE_BENCH_E2E_DELAY_MS", "1").split(",") if x]
    so = build_io_model(tmp_path, "load-e2e") if delays_ms else None
    env: dict[str, str] = {}
    if so is not None:
        # Preloaded with the delay off; the ranks switch it on around the delayed loads.
        env = {"LD_PRELOAD": str(so), "CKCORE_IO_DELAY_US": "0",
               "CKCORE_IO_DELAY_PREFIX": str(ckpt.resolve())}
    cfg = _config(request, delays_ms)
    benchmark.group = "load-e2e"
    benchmark.name = "test_load_e2e (whole launch)"
    out = benchmark.pedantic(_launch, args=(tmp_path, ckpt, cfg, env), rounds=1, iterations=1)
    bad = [r for r in out["rows"] if r["bad_ranks"]]
    assert not bad, f"loaded values differ from the saved ones: {bad[:3]}"
    assert len(out["rows"]) == cfg["rounds"] * len(SCENARIOS) * 2 * (
        2 + (len(delays_ms) if so is not None else 0))
    table = _summarise(out)
    benchmark.extra_info.update({"checkpoint_bytes": out["checkpoint_bytes"], "rows": table,
                                 "device_floor_s": out["device_floor_s"]})
    _print(request, out["checkpoint_bytes"], table, out["device_floor_s"])


def _summarise(out: dict) -> list[dict]:
    rows = out["rows"]
    table = []
    kinds = sorted({(r["delay_us"], r["cache"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for delay_us, cache in kinds:
        label = "local disk" if not delay_us else f"delay={delay_us / 1000:g}ms"
        for scenario in SCENARIOS:
            sel = {impl: [r for r in rows if r["scenario"] == scenario and r["cache"] == cache
                          and r["delay_us"] == delay_us and r["impl"] == impl]
                   for impl in ("ckcore", "torch")}
            if not sel["ckcore"]:
                continue
            med = {i: statistics.median(r["wall_s"] for r in v) for i, v in sel.items()}
            last = {i: v[-1] for i, v in sel.items()}
            table.append({
                "storage": label, "scenario": scenario, "cache": cache,
                "ckcore_s": med["ckcore"], "torch_s": med["torch"],
                "ratio": med["torch"] / med["ckcore"] if med["ckcore"] > 0 else None,
                "ckcore_reads": last["ckcore"]["syscr"], "torch_reads": last["torch"]["syscr"],
                "ckcore_rchar": last["ckcore"]["rchar"], "torch_rchar": last["torch"]["rchar"],
                "ckcore_disk": last["ckcore"]["read_bytes"], "torch_disk": last["torch"]["read_bytes"],
            })
    return table


def _print(request, total: int, table: list[dict], floor: float) -> None:
    mib = 2**20
    lines = ["", f"load-e2e, {WORLD} gloo ranks, checkpoint {total / mib:.1f} MiB "
             "(slowest rank, median; reads and MiB summed over ranks, last round)",
             f"{'storage':<13}{'scenario':<15}{'cache':<6}{'ckcore s':>9}{'torch s':>9}{'torch/ck':>9}"
             f"{'ck reads':>9}{'t reads':>9}{'ck MiB':>8}{'t MiB':>8}{'ck disk':>8}{'t disk':>8}"]
    for r in table:
        lines.append(
            f"{r['storage']:<13}{r['scenario']:<15}{r['cache']:<6}{r['ckcore_s']:>9.3f}{r['torch_s']:>9.3f}"
            f"{(r['ratio'] or float('nan')):>8.2f}x{r['ckcore_reads']:>9}{r['torch_reads']:>9}"
            f"{r['ckcore_rchar'] / mib:>8.1f}{r['torch_rchar'] / mib:>8.1f}"
            f"{r['ckcore_disk'] / mib:>8.1f}{r['torch_disk'] / mib:>8.1f}")
    # Every scenario needs every saved byte on some rank: no cold load beats
    # the device reading the checkpoint once, so torch cold / floor bounds
    # any reader's cold ratio on this machine.
    lines.append(f"device floor (one process reads every file cold, median of 3): {floor:.3f} s")
    for r in table:
        if r["cache"] == "cold" and r["storage"] == "local disk" and floor > 0:
            lines.append(f"  {r['scenario']:<15} torch cold / floor = {r['torch_s'] / floor:.2f}x "
                         "(the most any reader's cold ratio can be)")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines))
