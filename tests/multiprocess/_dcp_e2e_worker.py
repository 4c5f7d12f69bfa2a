"""One rank of the end-to-end DCP tests (tests/multiprocess/test_dcp_e2e.py runs several of these).

Usage: python _dcp_e2e_worker.py <scenario> <workdir>, with RANK, WORLD_SIZE
and CKCORE_TEST_INIT_METHOD (the rendezvous, a file:// store) in the environment. Each rank writes
``<workdir>/<scenario>.<rank>.json`` with what it checked; any failed check
raises, so the process exits non-zero with the traceback on stderr.

The state dict is model-like: DTensors of several layouts (uneven too),
plain replicated tensors, a 0-d tensor, a bytes value, an int, and a nested
optimizer-like state. Every value is a deterministic function of its fqn, so
any rank can check any element of what it loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import ckcore.dcp as cdcp

SENTINEL = -7.0

# fqn (dotted, as flattened by DCP) -> (global shape, dtype)
TENSORS = {
    "model.embed": ((13, 6), torch.float32),
    "model.layers.0.wq": ((8, 10), torch.float32),
    "model.layers.0.norm": ((10,), torch.float32),
    "model.layers.1.wq": ((8, 10), torch.bfloat16),
    "model.layers.1.norm": ((10,), torch.bfloat16),
    "model.output": ((6, 13), torch.float32),
    "optim.state.embed.exp_avg": ((13, 6), torch.float32),
    "optim.state.embed.step": ((), torch.float32),
}


def expected(fqn: str) -> torch.Tensor:
    shape, dtype = TENSORS[fqn]
    n = 1
    for s in shape:
        n *= s
    seed = sum(map(ord, fqn)) % 97
    # Small integers: exact in bfloat16 too.
    return ((torch.arange(n, dtype=torch.float64) * 3 + seed) % 251).reshape(shape).to(dtype)


# layout name -> (mesh shape builder, fqn -> placements); None = plain tensor on every rank
def placements_for(layout: str, fqn: str, mesh_ndim: int):
    shape, _ = TENSORS[fqn]
    if len(shape) < 2:
        return None  # norms, scalars: plain replicated tensors
    if layout == "save2d":  # 2 x 2 mesh: FSDP on dim 0, TP on the other dim
        if fqn.endswith("output"):
            return [Shard(1), Shard(0)]
        if fqn.endswith(("embed", "exp_avg")):
            return [Shard(0), Shard(0)]
        return [Shard(0), Shard(1)]
    if layout == "load1d_a":  # 1-D mesh, column sharded
        return [Shard(1)]
    if layout == "load1d_b":  # 1-D mesh, row sharded / replicated
        return [Replicate()] if fqn.endswith("output") else [Shard(0)]
    raise ValueError(layout)


def make_mesh(layout: str, world: int):
    if layout == "save2d":
        return init_device_mesh("cpu", (2, world // 2))
    return init_device_mesh("cpu", (world,))


def local_value(fqn, mesh, placements, fill=None):
    glob = expected(fqn)
    if placements is None:
        return glob.clone() if fill is None else torch.full_like(glob, fill)
    sizes, offsets = compute_local_shape_and_global_offset(glob.shape, mesh, placements)
    sl = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    local = glob[sl].clone() if fill is None else torch.full(sizes, fill, dtype=glob.dtype)
    return DTensor.from_local(
        local, mesh, placements, shape=glob.shape, stride=glob.stride(), run_check=False
    )


def build_state_dict(layout: str, world: int, fill=None):
    mesh = make_mesh(layout, world)
    flat = {f: local_value(f, mesh, placements_for(layout, f, mesh.ndim), fill) for f in TENSORS}
    # Nest like a model + optimizer state dict; DCP flattens it to the dotted fqns above.
    return {
        "model": {
            "embed": flat["model.embed"],
            "layers": {
                "0": {"wq": flat["model.layers.0.wq"], "norm": flat["model.layers.0.norm"]},
                "1": {"wq": flat["model.layers.1.wq"], "norm": flat["model.layers.1.norm"]},
            },
            "output": flat["model.output"],
        },
        "optim": {
            "state": {
                "embed": {
                    "exp_avg": flat["optim.state.embed.exp_avg"],
                    "step": flat["optim.state.embed.step"],
                }
            },
            "param_groups": [{"lr": 0.01 if fill is None else 0.0, "betas": (0.9, 0.95)}],
        },
        "extra": {
            "blob": b"\x00ckcore\xff" if fill is None else b"",
            "epoch": 7 if fill is None else 0,
        },
    }


def leaves(sd, prefix=""):
    for k, v in sd.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, name + ".")
        else:
            yield name, v


def check_loaded(sd, log):
    """Every element of every tensor this rank holds equals the saved value."""
    n = 0
    for fqn, v in leaves(sd):
        if fqn in TENSORS:
            glob = expected(fqn)
            if isinstance(v, DTensor):
                sizes, offsets = compute_local_shape_and_global_offset(
                    glob.shape, v.device_mesh, v.placements
                )
                want = glob[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                got = v.to_local()
            else:
                want, got = glob, v
            assert got.dtype == want.dtype, (fqn, got.dtype)
            assert torch.equal(got, want), f"{fqn}: loaded values differ"
            n += got.numel()
    assert sd["extra"]["blob"] == b"\x00ckcore\xff", sd["extra"]["blob"]
    assert sd["extra"]["epoch"] == 7
    assert sd["optim"]["param_groups"] == [{"lr": 0.01, "betas": (0.9, 0.95)}]
    log.append(n)
    return n


def untouched(sd) -> bool:
    """True if no tensor of ``sd`` holds anything but the sentinel fill."""
    for fqn, v in leaves(sd):
        if fqn in TENSORS:
            t = v.to_local() if isinstance(v, DTensor) else v
            if not bool((t.float() == SENTINEL).all()):
                return False
    return True


def corrupt_copies(src: str, workdir: str) -> dict:
    """Rank 0: damaged copies of a good checkpoint. Returns name -> path."""
    out = {}
    md_path = os.path.join(src, ".metadata")
    with open(md_path, "rb") as f:
        raw = f.read()
    md = pickle.loads(raw)

    def copy(name):
        dst = os.path.join(workdir, name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        out[name] = dst
        return os.path.join(dst, ".metadata")

    with open(copy("truncated"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    with open(copy("garbage"), "wb") as f:
        f.write(b"\x80\x04not a pickle at all" * 3)
    # A tensor lost one of its saved chunks: torch would leave that box unwritten.
    lost = pickle.loads(raw)
    lost.state_dict_metadata["model.embed"].chunks.pop(1)
    with open(copy("lost_chunk"), "wb") as f:
        pickle.dump(lost, f)
    # A chunk grew past the tensor's end.
    oob = pickle.loads(raw)
    c = oob.state_dict_metadata["model.output"].chunks[0]
    c.sizes = torch.Size([c.sizes[0] + 50, *c.sizes[1:]])
    with open(copy("out_of_bounds"), "wb") as f:
        pickle.dump(oob, f)
    assert md.state_dict_metadata["model.embed"].chunks  # the original is intact
    return out


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["CKCORE_TEST_INIT_METHOD"], rank=rank,
                            world_size=world)
    report: dict = {"rank": rank, "checked": [], "errors": {}}
    fast_ckpt = os.path.join(workdir, "fast")
    patched_ckpt = os.path.join(workdir, "patched")
    torch_ckpt = os.path.join(workdir, "torch")

    if scenario == "save":
        # N ranks, 2-D mesh: ckcore's planner; torch's planners under patch();
        # torch's planners as they are.
        sd = build_state_dict("save2d", world)
        dcp.save(sd, checkpoint_id=fast_ckpt, planner=cdcp.FastSavePlanner())
        with cdcp.patch():
            import torch.distributed.checkpoint.default_planner as t_dp

            assert (
                t_dp.create_default_local_save_plan is cdcp.dropins.create_default_local_save_plan
            )
            dcp.save(build_state_dict("save2d", world), checkpoint_id=patched_ckpt)
        assert (
            t_dp.create_default_local_save_plan
            is cdcp.dropins.ORIGINALS["create_default_local_save_plan"]
        )
        dcp.save(build_state_dict("save2d", world), checkpoint_id=torch_ckpt)
        report["saved"] = True

    elif scenario == "load":
        # M != N ranks, other layouts.
        # 1. ckcore's planner.
        sd = build_state_dict("load1d_a", world, fill=SENTINEL)
        dcp.load(sd, checkpoint_id=fast_ckpt, planner=cdcp.FastLoadPlanner())
        check_loaded(sd, report["checked"])
        # 2. torch's own planner reads ckcore's checkpoint (interchangeable).
        sd = build_state_dict("load1d_b", world, fill=SENTINEL)
        dcp.load(sd, checkpoint_id=fast_ckpt, planner=DefaultLoadPlanner())
        check_loaded(sd, report["checked"])
        # 3. torch's default planners under patch(): the N-rank patched save, loaded resharded.
        with cdcp.patch():
            import torch.distributed.checkpoint.default_planner as t_dp

            assert t_dp._create_read_items is cdcp.dropins._create_read_items
            sd = build_state_dict("load1d_a", world, fill=SENTINEL)
            dcp.load(sd, checkpoint_id=patched_ckpt, planner=DefaultLoadPlanner())
            check_loaded(sd, report["checked"])
        assert t_dp._create_read_items is cdcp.dropins.ORIGINALS["_create_read_items"]
        # 4. ckcore's planner reads the checkpoint torch's own planners wrote.
        sd = build_state_dict("load1d_b", world, fill=SENTINEL)
        dcp.load(sd, checkpoint_id=torch_ckpt, planner=cdcp.FastLoadPlanner())
        check_loaded(sd, report["checked"])
        # 5. ckcore's planner and ckcore's range reader together.
        sd = build_state_dict("load1d_a", world, fill=SENTINEL)
        reader = cdcp.RangeFileSystemReader(fast_ckpt)
        dcp.load(sd, storage_reader=reader, planner=cdcp.FastLoadPlanner())
        check_loaded(sd, report["checked"])
        report["range_reader_bytes"] = reader.stats["bytes_read"]

        # 6. damaged checkpoints: a clear error, and destinations untouched.
        paths = [None]
        if rank == 0:
            paths = [corrupt_copies(fast_ckpt, workdir)]
        dist.broadcast_object_list(paths, src=0)
        for name, path in sorted(paths[0].items()):
            sd = build_state_dict("load1d_a", world, fill=SENTINEL)
            try:
                dcp.load(sd, checkpoint_id=path, planner=cdcp.FastLoadPlanner())
                msg = None
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - the test reads it
                msg = f"{type(e).__name__}: {e}"
            report["errors"][name] = msg
            assert msg is not None, f"{name}: load of a damaged checkpoint succeeded"
            assert untouched(sd), f"{name}: a destination was written before the error"
        # torch's own planner on the lost chunk: no error, a box left unwritten.
        sd = build_state_dict("load1d_a", world, fill=SENTINEL)
        dcp.load(sd, checkpoint_id=paths[0]["lost_chunk"], planner=DefaultLoadPlanner())
        t = sd["model"]["embed"].full_tensor()
        report["torch_lost_chunk_sentinels"] = int((t == SENTINEL).sum())
    else:
        raise ValueError(scenario)

    dist.barrier()
    with open(os.path.join(workdir, f"{scenario}.{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    # The report is written. Leave without gloo's teardown: when one rank exits
    # first, the other's destroy_process_group / interpreter exit can hit
    # std::terminate in gloo's transport threads.
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
