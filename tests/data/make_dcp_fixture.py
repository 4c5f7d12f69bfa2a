"""Regenerate tests/data/dcp_small: a real checkpoint written by torch.distributed.checkpoint.

The torch-free tests (tests/core/test_checkpoint_safe.py) read this checkpoint
without torch; tests/differential/test_checkpoint.py checks that a fresh save of
``state_dict()`` with the installed torch still produces the same metadata,
so the fixture cannot drift from what torch writes.

Run from the repository root:  python tests/data/make_dcp_fixture.py
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "dcp_small")
# Saved through a relative path so the file records no machine-specific directory.
CHECKPOINT_ID = os.path.join("tests", "data", "dcp_small")


def state_dict():
    """The state dict saved in the fixture: many dtypes, 0-d, empty, nested, bytes, objects."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "w_bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "scalar_bool": torch.tensor(True),
        "scalar_f64": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "nested": {
            "c64": torch.randn(2, 2, generator=g).to(torch.complex64),
            "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
            "deeper": {"i64": torch.arange(6).reshape(1, 2, 3), "u8": torch.arange(4, dtype=torch.uint8)},
        },
        "blob": io.BytesIO(b"raw bytes item"),
        "step": 100,
        "config": {"lr": 0.1, "name": "adam"},
    }


def main() -> None:
    import torch.distributed.checkpoint as dcp

    shutil.rmtree(FIXTURE, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state_dict(), checkpoint_id=CHECKPOINT_ID)


if __name__ == "__main__":
    if os.path.abspath(os.getcwd()) != os.path.dirname(os.path.dirname(HERE)):
        sys.exit("run from the repository root")
    main()
