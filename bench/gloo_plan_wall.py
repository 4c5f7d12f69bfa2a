"""Planning wall time of dcp.save / dcp.load over real gloo processes: torch's planners vs ckcore's.

Starts ``--world`` processes (default 16) on this machine, each with a
scaled transformer-like state dict of tiny DTensors (``--layers`` layers of
attention and MLP weights, norms, an embedding and output, and Adam's two
moments for each: many small tensors, so memory stays low). Then, in turns,
for ``--repeats`` rounds:

* ``dcp.save`` on a 2-D mesh (FSDP x TP) with torch's ``DefaultSavePlanner``
  and with ``FastSavePlanner``;
* ``dcp.load`` of each checkpoint on another 2-D mesh (resharding) with
  torch's ``DefaultLoadPlanner`` and with ``FastLoadPlanner`` (both through a
  ``FileSystemReader``).

Planning wall time is, per rank, from the call of ``dcp.save``/``dcp.load``
(all ranks leave a barrier just before) to the moment the storage writer's
``write_data`` / reader's ``read_data`` is called (a thin subclass records
it): the local plan, the gather, the coordinator's global plan, the
scatter and ``finish_plan``. The figure is the slowest rank's, median over
the rounds. "setup" is the part before the planner's ``create_local_plan``
(``set_up_planner``, and for a load the ``.metadata`` read), the same code
for both, slowest rank; "total" is the whole call, slowest rank. Bytes up/down are the pickled size of each rank's local plan
and of the plan scattered back (``_DistWrapper.gather_object`` /
``scatter_object`` wrapped), largest rank. The first load is checked
element by element.

    PYTHONPATH=$PWD python bench/gloo_plan_wall.py --world 16 --layers 48 --repeats 3

Writes the per-rank figures to ``--json`` if given. Takes a few minutes on 2
cores (each process imports torch); checkpoints go to ``/dev/shm`` when
it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HIDDEN, FFN, VOCAB = 64, 128, 256


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=16)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("INIT", "DIR"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _meshes(world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Save on (dp, tp), load on another factorisation (resharding).
    tp = 4 if world % 4 == 0 else 2 if world % 2 == 0 else 1
    save = (world // tp, tp)
    load = (world // (tp // 2), tp // 2) if tp > 1 else (1, world)
    return save, load


# --------------------------------------------------------------------------- rank side


def _worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.utils import _DistWrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    import ckcore.dcp as cdcp

    init, workdir = args.worker
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    save_shape, load_shape = _meshes(world)

    marks: dict = {}
    traffic: dict = {}
    _g, _s = _DistWrapper.gather_object, _DistWrapper.scatter_object

    def gather(self, obj):
        traffic.setdefault("up", len(pickle.dumps(obj)))
        return _g(self, obj)

    def scatter(self, object_list):
        out = _s(self, object_list)
        traffic.setdefault("down", len(pickle.dumps(out)))
        return out

    _DistWrapper.gather_object, _DistWrapper.scatter_object = gather, scatter

    # set_up_storage_writer/reader is called right before the planner's
    # create_local_plan (after the metadata read and set_up_planner).
    class Writer(FileSystemWriter):
        def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
            marks.setdefault("setup", time.perf_counter())
            return super().set_up_storage_writer(is_coordinator, *args, **kwargs)

        def write_data(self, plan, planner):
            marks.setdefault("first_io", time.perf_counter())
            return super().write_data(plan, planner)

    class Reader(FileSystemReader):
        def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
            marks.setdefault("setup", time.perf_counter())
            return super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

        def read_data(self, plan, planner):
            marks.setdefault("first_io", time.perf_counter())
            return super().read_data(plan, planner)

    def shapes():
        out = {"model.embed": ((VOCAB, HIDDEN), "row"), "model.output": ((VOCAB, HIDDEN), "row"),
               "model.norm": ((HIDDEN,), "vec")}
        for i in range(args.layers):
            p = f"model.layers.{i}."
            for n in ("wq", "wk", "wv"):
                out[p + "attn." + n] = ((HIDDEN, HIDDEN), "col")
            out[p + "attn.wo"] = ((HIDDEN, HIDDEN), "row")
            out[p + "mlp.w1"] = ((FFN, HIDDEN), "col")
            out[p + "mlp.w3"] = ((FFN, HIDDEN), "col")
            out[p + "mlp.w2"] = ((HIDDEN, FFN), "row")
            out[p + "norm1"] = ((HIDDEN,), "vec")
            out[p + "norm2"] = ((HIDDEN,), "vec")
        for k in [k for k in out if k.startswith("model.")]:
            for m in ("exp_avg", "exp_avg_sq"):
                out[f"optim.{m}.{k[6:]}"] = out[k]
        return out

    SHAPES = shapes()

    def value(fqn, shape):
        n = 1
        for s in shape:
            n *= s
        seed = sum(map(ord, fqn)) % 89
        return ((torch.arange(n, dtype=torch.float32) + seed) % 241).reshape(shape)

    def placements(kind, save):
        # FSDP shards dim 0 over the first mesh dim; TP shards rows or columns
        # over the second; norms are replicated over TP (dedup).
        if kind == "vec":
            return [Shard(0), Replicate()]
        if save:
            return [Shard(0), Shard(1) if kind == "col" else Shard(0)]
        return [Shard(1), Shard(0)]

    def build(save: bool, empty: bool):
        mesh = init_device_mesh("cpu", save_shape if save else load_shape)
        sd = {}
        for fqn, (shape, kind) in SHAPES.items():
            pl = placements(kind, save)
            g = value(fqn, shape)
            sizes, offs = compute_local_shape_and_global_offset(g.shape, mesh, pl)
            local = (torch.zeros(sizes) if empty
                     else g[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].clone())
            sd[fqn] = DTensor.from_local(local, mesh, pl, shape=g.shape, stride=g.stride(),
                                         run_check=False)
        return {"model": {k: v for k, v in sd.items() if k.startswith("model.")},
                "optim": {k: v for k, v in sd.items() if k.startswith("optim.")},
                "step": 10}

    def check(sd) -> int:
        n = 0
        for part in ("model", "optim"):
            for fqn, v in sd[part].items():
                g = value(fqn, SHAPES[fqn][0])
                sizes, offs = compute_local_shape_and_global_offset(g.shape, v.device_mesh,
                                                                    v.placements)
                want = g[tuple(slice(o, o + s) for o, s in zip(offs, sizes))]
                assert torch.equal(v.to_local(), want), fqn
                n += want.numel()
        assert sd["step"] == 10
        return n

    results = []
    checked = {}
    save_sd = build(save=True, empty=False)
    n_items = None
    for rnd in range(args.repeats):
        for who in ("torch", "ckcore"):
            path = os.path.join(workdir, f"{who}")
            planner = DefaultSavePlanner() if who == "torch" else cdcp.FastSavePlanner()
            marks.clear()
            traffic.clear()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            dist.barrier()
            t0 = time.perf_counter()
            dcp.save(save_sd, storage_writer=Writer(path), planner=planner)
            t1 = time.perf_counter()
            if n_items is None:
                n_items = len(planner.plan.items)
            results.append({"op": "save", "who": who, "round": rnd, "rank": rank,
                            "plan_s": marks["first_io"] - t0, "pre_s": marks["setup"] - t0,
                            "total_s": t1 - t0, **traffic})
        for who in ("torch", "ckcore"):
            path = os.path.join(workdir, f"{who}")
            planner = DefaultLoadPlanner() if who == "torch" else cdcp.FastLoadPlanner()
            sd = build(save=False, empty=True)
            marks.clear()
            traffic.clear()
            dist.barrier()
            t0 = time.perf_counter()
            dcp.load(sd, storage_reader=Reader(path), planner=planner)
            t1 = time.perf_counter()
            if rnd == 0:
                checked[who] = check(sd)
            results.append({"op": "load", "who": who, "round": rnd, "rank": rank,
                            "plan_s": marks["first_io"] - t0, "pre_s": marks["setup"] - t0,
                            "total_s": t1 - t0, **traffic})
    everything = [None] * world
    dist.all_gather_object(everything, {"results": results, "checked": checked,
                                        "save_items": n_items})
    if rank == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(everything, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


# --------------------------------------------------------------------------- launcher


def _summary(per_rank: list, args) -> str:
    rows = [r for pr in per_rank for r in pr["results"]]
    lines = []
    tensors = 3 + 9 * args.layers
    lines.append(f"world {args.world}, {tensors * 3} DTensors ({args.layers} layers), "
                 f"save mesh {_meshes(args.world)[0]}, load mesh {_meshes(args.world)[1]}, "
                 f"{per_rank[0]['save_items']} write items on rank 0, repeats {args.repeats}")
    lines.append(f"{'step':<12}{'slowest rank plan (ms)':>24}{'median rank':>14}"
                 f"{'setup (ms)':>12}{'total (ms)':>12}{'up B/rank':>12}{'down B/rank':>13}")
    figures = {}
    for op in ("save", "load"):
        for who in ("torch", "ckcore"):
            sel = [r for r in rows if r["op"] == op and r["who"] == who]
            rounds = sorted({r["round"] for r in sel})
            slow = [max(r["plan_s"] for r in sel if r["round"] == k) for k in rounds]
            med = [statistics.median(r["plan_s"] for r in sel if r["round"] == k) for k in rounds]
            tot = [max(r["total_s"] for r in sel if r["round"] == k) for k in rounds]
            pre = [max(r["pre_s"] for r in sel if r["round"] == k) for k in rounds]
            up = max(r.get("up", 0) for r in sel)
            down = max(r.get("down", 0) for r in sel)
            figures[(op, who)] = statistics.median(slow)
            lines.append(f"{op + ' ' + who:<12}{statistics.median(slow) * 1e3:>24.0f}"
                         f"{statistics.median(med) * 1e3:>14.0f}"
                         f"{statistics.median(pre) * 1e3:>12.0f}"
                         f"{statistics.median(tot) * 1e3:>12.0f}{up:>12}{down:>13}")
    for op in ("save", "load"):
        lines.append(f"{op}: torch / ckcore slowest-rank planning = "
                     f"{figures[(op, 'torch')] / figures[(op, 'ckcore')]:.1f}x")
    checked = sum(pr["checked"].get("ckcore", 0) for pr in per_rank)
    lines.append(f"first loads checked element by element ({checked} elements by ckcore's)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Launch the ranks, wait for them, print the table (and write ``--json``)."""
    args = _args(argv)
    if args.worker:
        _worker(args)
        return 0
    base = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    workdir = tempfile.mkdtemp(prefix="ckcore-gloo-", dir=base)
    init = f"file://{os.path.join(workdir, 'rdzv')}"
    here = os.path.dirname(os.path.abspath(__file__))
    procs = []
    try:
        for rank in range(args.world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.world),
                       LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.world), OMP_NUM_THREADS="1")
            cmd = [sys.executable, os.path.join(here, "gloo_plan_wall.py"),
                   "--layers", str(args.layers), "--repeats", str(args.repeats),
                   "--worker", init, workdir]
            procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
        bad = []
        for rank, p in enumerate(procs):
            _, err = p.communicate(timeout=3600)
            if p.returncode:
                bad.append(f"rank {rank}: exit {p.returncode}\n{err[-3000:]}")
        if bad:
            print("\n".join(bad), file=sys.stderr)
            return 1
        with open(os.path.join(workdir, "results.json")) as f:
            per_rank = json.load(f)
        print(_summary(per_rank, args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "ranks": per_rank}, f)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
