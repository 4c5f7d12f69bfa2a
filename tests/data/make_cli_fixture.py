"""Write a small sharded DCP checkpoint with 2 gloo processes (tests/data/dcp_sharded).

The CLI's torch-free tests (tests/core/test_cli_core.py) need a checkpoint that
looks like a real job's: DTensors sharded over ranks, one file per rank, a
replicated tensor deduplicated to one rank, bytes items. This script makes
one with torch.distributed.checkpoint on 2 CPU processes (gloo);
tests/differential/test_cli.py runs it again into a temporary directory to check that the
committed fixture still matches what the installed torch writes.

Regenerate the fixture from the repository root:
    python tests/data/make_cli_fixture.py tests/data/dcp_sharded
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings

WORLD = 2


def state_dict(rank: int):
    """The saved state: sharded 2-d and 1-d DTensors, an uneven shard, a replicated tensor, bytes."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(0)  # same global values on every rank
    return {
        "layers.0.wq.weight": distribute_tensor(torch.randn(8, 4, generator=g), mesh, [Shard(0)]),
        "layers.0.wo.weight": distribute_tensor(
            torch.randn(4, 6, generator=g).to(torch.bfloat16), mesh, [Shard(1)]),
        "layers.0.norm.weight": distribute_tensor(torch.ones(5), mesh, [Shard(0)]),  # 3 + 2 rows
        "embed.weight": distribute_tensor(torch.arange(12.0).reshape(3, 4), mesh, [Replicate()]),
        "step": 7,
    }


def _worker(rank: int, out_dir: str, init_file: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state_dict(rank), checkpoint_id=out_dir)
    dist.barrier()
    # Saved. Leave without gloo's teardown: when one rank exits first, the
    # other's destroy_process_group / interpreter exit can hit std::terminate
    # in gloo's transport threads. (An exception above still exits non-zero.)
    os._exit(0)


def save(out_dir: str) -> None:
    """Save the checkpoint into ``out_dir`` (replaced) with 2 gloo processes."""
    import torch.distributed.checkpoint
    import torch.distributed.tensor  # noqa: F401
    import torch.multiprocessing as mp

    shutil.rmtree(out_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children inherit the imported torch instead of importing it again (seconds each).
        mp.start_processes(_worker, args=(out_dir, os.path.join(tmp, "init")), nprocs=WORLD,
                           join=True, start_method="fork")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_cli_fixture.py OUT_DIR")
    save(sys.argv[1])
