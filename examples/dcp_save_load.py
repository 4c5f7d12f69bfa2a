"""Plug ckcore into DCP: save with FastSavePlanner, load resharded with FastLoadPlanner
through RangeFileSystemReader, and check every element.

Single process (DCP needs no process group for that); with a process group the
same planner and reader objects are passed to every rank's dcp.save / dcp.load.

    python examples/dcp_save_load.py [CHECKPOINT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import torch
import torch.distributed.checkpoint as dcp

import ckcore
from ckcore.dcp import (
    FastFileSystemWriter,
    FastLoadPlanner,
    FastSavePlanner,
    RangeFileSystemReader,
    patch,
)

# Single process on purpose: silence DCP's note that no process group is set up.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def main(path: str) -> None:
    torch.manual_seed(0)
    state = {
        "model": {"w": torch.randn(256, 512), "b": torch.randn(512).to(torch.bfloat16)},
        "step": 1000,
    }
    dcp.save(state, planner=FastSavePlanner(), storage_writer=FastFileSystemWriter(path))

    # Load into other shapes of storage: a transposed (non-contiguous) destination
    # and a bf16 vector, through the reader that reads only the needed bytes.
    dest = {
        "model": {"w": torch.empty(512, 256).t(), "b": torch.empty(512, dtype=torch.bfloat16)},
        "step": 0,
    }
    dcp.load(dest, checkpoint_id=path, planner=FastLoadPlanner(),
             storage_reader=RangeFileSystemReader(path))
    assert torch.equal(dest["model"]["w"], state["model"]["w"])
    assert torch.equal(dest["model"]["b"], state["model"]["b"])
    assert dest["step"] == 1000

    # torch's own planners with ckcore's kernels swapped in, and restored after.
    again = {"model": {"w": torch.empty(256, 512), "b": torch.empty(512, dtype=torch.bfloat16)},
             "step": 0}
    with patch():
        dcp.load(again, checkpoint_id=path)
    assert torch.equal(again["model"]["w"], state["model"]["w"])

    # The checkpoint on disk, read without torch's unpickler.
    ck = ckcore.Checkpoint(path)
    for fqn, md in sorted(ck.metadata.state_dict_metadata.items()):
        kind = f"{md.properties.dtype} {md.size} in {len(md.chunks)} chunk(s)" \
            if isinstance(md, ckcore.TensorStorageMetadata) else "bytes"
        print(f"{fqn:10s} {kind}")
    print("saved, reloaded resharded and checked:", path)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
