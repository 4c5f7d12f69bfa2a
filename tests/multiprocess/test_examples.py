"""The examples in examples/ run and print what the README says they print.

They run in a subprocess against the ckcore under test (the installed wheel
in CI), from a scratch directory, as a user would run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch  # noqa: F401  (dcp_save_load.py needs it; this module never skips)

from tests.support.paths import CKCORE_PARENT, EXAMPLES


def _run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(CKCORE_PARENT))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_reshard_plan_example(tmp_path):
    out = _run("reshard_plan.py", "--shape", "4096,4096", "--saved", "4,4", "--loaded", "3,4",
               cwd=tmp_path)
    assert "saved as (4, 4) (16 chunks), loaded as (3, 4) (12 ranks)" in out
    # 12 loading ranks, one line each, then rank 0's ReadItems and torch's timing.
    rank_lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rank_lines) == 12
    assert "rank 0's ReadItem list" in out
    assert "torch 2.13" in out


def test_dcp_save_load_example(tmp_path):
    out = _run("dcp_save_load.py", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert "model.w    float32 (256, 512) in 1 chunk(s)" in out
    assert "saved, reloaded resharded and checked" in out
