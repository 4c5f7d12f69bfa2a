"""One rank of tests/multiprocess/test_compact_compat.py: compact plans mixed with torch's, over gloo.

Usage: python _compact_compat_worker.py <scenario> <workdir>, with RANK,
WORLD_SIZE and CKCORE_TEST_INIT_METHOD in the environment. ``save`` (3
ranks, a 1-D mesh) writes checkpoints with torch's ``DefaultSavePlanner``,
``FastSavePlanner``, ranks mixing the two, ``FastSavePlanner`` subclasses and
plan caching over three saves; ``load`` (2 ranks, other placements) loads
each of them with every planner x reader mix and checks every element.

Each rank writes ``<workdir>/<scenario>.<rank>.json``: the elements it checked
per case, and the pickled size of what it sent to the coordinator ("up") and
received back ("down") in each call's planning collective, measured by
wrapping ``_DistWrapper.gather_object`` / ``scatter_object``. Any failed check
raises, so the process exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    dedup_save_plans,
)
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.utils import _DistWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import ckcore.dcp as cdcp

SENTINEL = -7.0
FastSavePlanner = cdcp.FastSavePlanner

# --- what travels -----------------------------------------------------------------------

LABEL = ["-"]
TRAFFIC: dict[str, dict[str, int]] = {}
_gather, _scatter = _DistWrapper.gather_object, _DistWrapper.scatter_object


def _gather_recording(self, obj):
    # The first gather of a dcp call is its local plan, the second (on save) the write results.
    rec = TRAFFIC.setdefault(LABEL[0], {})
    rec.setdefault("up" if "up" not in rec else "write_up", len(pickle.dumps(obj)))
    return _gather(self, obj)


def _scatter_recording(self, object_list):
    out = _scatter(self, object_list)
    TRAFFIC.setdefault(LABEL[0], {}).setdefault("down", len(pickle.dumps(out)))
    return out


_broadcast = _DistWrapper.broadcast_object


def _broadcast_recording(self, obj):
    out = _broadcast(self, obj)
    if type(out).__name__ in ("Metadata", "ColumnarMetadata"):
        TRAFFIC.setdefault(LABEL[0], {})["metadata_type"] = type(out).__name__
    return out


_DistWrapper.gather_object = _gather_recording
_DistWrapper.scatter_object = _scatter_recording
_DistWrapper.broadcast_object = _broadcast_recording

# --- the state dict -----------------------------------------------------------------------

F32, BF16 = torch.float32, torch.bfloat16


def spec(ver: int) -> dict:
    """fqn -> (global shape, dtype, save placement, load placement); None = plain tensor."""
    s = {
        "m.embed": ((13, 6), F32, [Shard(0)], [Shard(1)]),
        # Plain, so every rank writes it; at version 4 rank 0 does not have it, which
        # changes only rank 0's local plan but dedup's choices for every rank.
        "m.early": ((4, 4), F32, None, None),
        "m.out": ((5, 11), F32, [Shard(1)], [Shard(0)]),
        "m.rep": ((4, 4), F32, [Replicate()], [Shard(0)]),  # dedup across the 3 savers
        "m.bf": ((7, 3), BF16, [Shard(0)], [Replicate()]),  # uneven: 3, 3, 1 rows
        "m.tiny": ((2, 5), F32, [Shard(0)], [Shard(1)]),  # one saving rank holds no rows
        "m.norm": ((10,), F32, None, None),  # plain: every rank writes it, dedup keeps one
        "m.step": ((), F32, None, None),  # 0-d
    }
    for i in range(8):
        s[f"m.layers.{i}.w"] = ((6 + i, 4), F32 if i % 2 else BF16, [Shard(0)], [Shard(1)])
    if ver == 3:  # the changed state dict of the third cached save
        s["m.out"] = ((5, 12), F32, [Shard(1)], [Shard(0)])
        s["m.new"] = ((9, 4), F32, [Shard(0)], [Replicate()])
    return s


def expected(fqn: str, shape, dtype, ver: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    seed = (sum(map(ord, fqn)) + 31 * ver) % 97
    # Small integers: exact in bfloat16 too.
    return ((torch.arange(n, dtype=torch.float64) * 3 + seed) % 251).reshape(shape).to(dtype)


def build(side: str, ver: int, fill=None) -> dict:
    """The nested state dict on this rank; ``side`` is "save" or "load" (which placements)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    flat = {}
    for fqn, (shape, dtype, ps, pl) in spec(ver).items():
        if fqn == "m.early" and ver == 4 and side == "save" and dist.get_rank() == 0:
            continue
        glob = expected(fqn, shape, dtype, ver)
        placements = ps if side == "save" else pl
        if placements is None:
            flat[fqn] = glob.clone() if fill is None else torch.full_like(glob, fill)
            continue
        sizes, offs = compute_local_shape_and_global_offset(glob.shape, mesh, placements)
        local = (glob[tuple(slice(o, o + n) for o, n in zip(offs, sizes))].clone()
                 if fill is None else torch.full(sizes, fill, dtype=dtype))
        flat[fqn] = DTensor.from_local(local, mesh, placements, shape=glob.shape,
                                       stride=glob.stride(), run_check=False)
    sd: dict = {}
    for fqn, v in flat.items():
        node = sd
        *path, leaf = fqn.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    sd["x"] = {"blob": b"\x00ck\xff" if fill is None else b"", "n": ver if fill is None else 0,
               "groups": [{"lr": 0.5 * ver if fill is None else 0.0}]}
    return sd


def check(sd: dict, ver: int) -> int:
    """Every element of every tensor this rank holds equals the saved value; elements checked."""
    n = 0
    for fqn, (shape, dtype, _ps, _pl) in spec(ver).items():
        v = sd
        for p in fqn.split("."):
            v = v[p]
        glob = expected(fqn, shape, dtype, ver)
        if isinstance(v, DTensor):
            sizes, offs = compute_local_shape_and_global_offset(glob.shape, v.device_mesh,
                                                                v.placements)
            want, got = glob[tuple(slice(o, o + s) for o, s in zip(offs, sizes))], v.to_local()
        else:
            want, got = glob, v
        assert got.dtype == want.dtype, (fqn, got.dtype)
        assert torch.equal(got, want), f"{fqn}: loaded values differ (ver {ver})"
        n += got.numel()
    assert sd["x"] == {"blob": b"\x00ck\xff", "n": ver, "groups": [{"lr": 0.5 * ver}]}, sd["x"]
    return n


# --- planners and readers from user code --------------------------------------------------


class LowestRankDedup(FastSavePlanner):
    """Dedups its own way (everything replicated to rank 0): torch's steps must run."""

    calls = 0

    def _dedup_save_plans(self, all_plans):
        LowestRankDedup.calls += 1
        return dedup_save_plans(all_plans, save_to_lowest_rank=True)


class GlobalReads(FastSavePlanner):
    """Reads every item on the coordinator and returns the global plan as it got it."""

    def create_global_plan(self, all_plans):
        self.items_seen = sum(len(list(p.items)) for p in all_plans)
        global_plan, md = super().create_global_plan(all_plans)
        for p in global_plan:
            for it in p.items:  # a compact global plan reads as WriteItem objects too
                assert it.index.fqn in md.state_dict_metadata
        return global_plan, md


class GlobalRewrites(FastSavePlanner):
    """Replaces the coordinator's plans by plain lists of WriteItem objects."""

    def create_global_plan(self, all_plans):
        global_plan, md = super().create_global_plan(all_plans)
        return [dataclasses.replace(p, items=list(p.items)) for p in global_plan], md


class LoadGlobalReads(cdcp.FastLoadPlanner):
    """Reads (and reverses) every rank's items on the coordinator."""

    def create_global_plan(self, global_plan):
        return [dataclasses.replace(p, items=list(reversed(list(p.items)))) for p in global_plan]


class LoadLocalOwn(cdcp.FastLoadPlanner):
    """Builds its local plan on top of FastLoadPlanner's (items reversed)."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        return dataclasses.replace(plan, items=list(reversed(plan.items)))


class LoadFinishNoSuper(cdcp.FastLoadPlanner):
    """Overrides finish_plan without calling FastLoadPlanner's: reads the items it gets."""

    def finish_plan(self, new_plan):
        assert all(it.dest_index.fqn for it in new_plan.items)
        return new_plan


class CountingReader(FileSystemReader):
    """A reader whose coordinator step iterates every rank's items (so they must travel)."""

    def prepare_global_plan(self, plans):
        self.items_seen = sum(1 for p in plans for _ in p.items)
        return plans


def instance_hooked_reader(path: str) -> FileSystemReader:
    """A plain FileSystemReader whose prepare_global_plan is replaced on the instance."""
    r = FileSystemReader(path)

    def prepare_global_plan(plans):
        r.items_seen = sum(1 for p in plans for _ in p.items)
        return plans

    r.prepare_global_plan = prepare_global_plan
    return r


# --- scenarios ----------------------------------------------------------------------------


def save_all(workdir: str, rank: int, report: dict) -> None:
    def save(name, planner, ver=1, writer=FileSystemWriter):
        LABEL[0] = f"save:{name}"
        path = os.path.join(workdir, name)
        md = dcp.save(build("save", ver), storage_writer=writer(path), planner=planner)
        # What dcp.save returns on every rank is what the file holds.
        dist.barrier()
        on_disk = FileSystemReader(path).read_metadata()
        report.setdefault("returned_is_file", {})[name] = (
            md.state_dict_metadata == on_disk.state_dict_metadata
            and list(md.storage_data.items()) == list(on_disk.storage_data.items())
            and md.planner_data == on_disk.planner_data and md.version == on_disk.version)
        return planner

    save("torch", DefaultSavePlanner())
    save("fast", FastSavePlanner())
    # Ranks mixing planners in one save: torch's coordinator reads compact plans,
    # ckcore's coordinator gets objects from torch's ranks.
    save("mix_torch_coord", DefaultSavePlanner() if rank == 0 else FastSavePlanner())
    save("mix_fast_coord", FastSavePlanner() if rank == 0 else DefaultSavePlanner())
    # ckcore's writer: compact write results up, the finished metadata down as file bytes.
    fast_writer = cdcp.FastFileSystemWriter
    save("fast_fw", FastSavePlanner(), writer=fast_writer)
    save("torch_fw", DefaultSavePlanner(), writer=fast_writer)
    save("mix_fw", FastSavePlanner() if rank == 0 else DefaultSavePlanner(), writer=fast_writer)
    p = save("sub_dedup", LowestRankDedup())
    report["sub_dedup_calls"] = LowestRankDedup.calls
    report["sub_dedup_fqns"] = sorted({it.index.fqn for it in p.plan.items})
    p = save("sub_global_reads", GlobalReads())
    report["sub_global_items_seen"] = getattr(p, "items_seen", None)
    save("sub_global_rewrites", GlobalRewrites())
    # Plan caching: the same plan twice (new values), then a changed state dict.
    for i, ver in enumerate((1, 2, 3)):
        save(f"cached{i + 1}", FastSavePlanner(enable_plan_caching=True), ver)
    for i, ver in enumerate((1, 2, 3)):
        save(f"torch_cached{i + 1}", DefaultSavePlanner(enable_plan_caching=True), ver)
    # Plan caching where only rank 0's plan changes but dedup moves replicated items
    # between the unchanged ranks (they get a new global plan for their cached local plan).
    # A subclass so that the class-keyed plan cache starts empty.
    class Cached(FastSavePlanner):
        pass

    class TorchCached(DefaultSavePlanner):
        pass

    for name, cls in (("shift", Cached), ("torch_shift", TorchCached)):
        for ver in (1, 4):
            p = save(f"{name}{ver}", cls(enable_plan_caching=True), ver)
            report[f"{name}{ver}_fqns"] = sorted({it.index.fqn for it in p.plan.items})


LOADS = {
    # checkpoint -> version of its values
    "torch": 1, "fast": 1, "mix_torch_coord": 1, "mix_fast_coord": 1, "sub_dedup": 1,
    "sub_global_reads": 1, "sub_global_rewrites": 1, "cached1": 1, "cached2": 2, "cached3": 3,
    "shift1": 1, "shift4": 4, "fast_fw": 1, "torch_fw": 1, "mix_fw": 1,
}


def load_all(workdir: str, rank: int, report: dict) -> None:
    checked = report["checked"]

    def load(label, ckpt, planner, reader_cls):
        ver = LOADS[ckpt]
        LABEL[0] = f"load:{label}:{ckpt}"
        path = os.path.join(workdir, ckpt)
        reader = reader_cls(path)
        sd = build("load", ver, fill=SENTINEL)
        dcp.load(sd, storage_reader=reader, planner=planner)
        checked[LABEL[0]] = check(sd, ver)
        return reader

    planners = {"torch": DefaultLoadPlanner, "fast": cdcp.FastLoadPlanner}
    readers = {"fs": FileSystemReader, "range": cdcp.RangeFileSystemReader}
    for ckpt in ("torch", "fast", "fast_fw"):
        for pn, pcls in planners.items():
            for rn, rcls in readers.items():
                load(f"{pn}:{rn}", ckpt, pcls(), rcls)
    for ckpt in ("mix_torch_coord", "mix_fast_coord", "sub_dedup", "sub_global_reads",
                 "sub_global_rewrites", "cached1", "cached2", "cached3", "shift1", "shift4",
                 "torch_fw", "mix_fw"):
        load("fast:fs", ckpt, cdcp.FastLoadPlanner(), FileSystemReader)
    load("torch:fs", "cached3", DefaultLoadPlanner(), FileSystemReader)
    # Ranks mixing planners in one load.
    load("mix_torch_coord:fs", "fast",
         DefaultLoadPlanner() if rank == 0 else cdcp.FastLoadPlanner(), FileSystemReader)
    load("mix_fast_coord:fs", "torch",
         cdcp.FastLoadPlanner() if rank == 0 else DefaultLoadPlanner(), FileSystemReader)
    # User subclasses and readers.
    load("sub_global:fs", "fast", LoadGlobalReads(), FileSystemReader)
    load("sub_local:range", "fast", LoadLocalOwn(), cdcp.RangeFileSystemReader)
    load("sub_finish:fs", "fast", LoadFinishNoSuper(), FileSystemReader)
    r = load("fast:counting", "fast", cdcp.FastLoadPlanner(), CountingReader)
    report["counting_items_seen"] = getattr(r, "items_seen", None)
    r = load("fast:instance_hook", "fast", cdcp.FastLoadPlanner(), instance_hooked_reader)
    report["instance_hook_items_seen"] = getattr(r, "items_seen", None)


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["CKCORE_TEST_INIT_METHOD"], rank=rank,
                            world_size=world)
    report: dict = {"rank": rank, "checked": {}, "traffic": TRAFFIC}
    if scenario == "save":
        save_all(workdir, rank, report)
    elif scenario == "load":
        load_all(workdir, rank, report)
    else:
        raise ValueError(scenario)
    dist.barrier()
    with open(os.path.join(workdir, f"{scenario}.{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    # Leave without gloo's teardown (see _dcp_e2e_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # noqa: BLE001 - report any failure, then exit non-zero
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
