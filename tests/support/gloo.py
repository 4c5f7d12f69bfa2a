"""Launch a worker script as the ranks of a gloo process group and collect their reports.

Each rank runs ``python worker scenario workdir`` with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``CKCORE_TEST_INIT_METHOD`` (a fresh
``file://`` rendezvous, :mod:`tests.support.rdzv`) set, ckcore's parent
first on ``PYTHONPATH``, and writes its report to
``workdir/{scenario}.{rank}.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import CKCORE_PARENT
from tests.support.rdzv import file_init_method


def launch(worker: Path, scenario: str, world: int, workdir: Path, timeout: float,
           expect_exit: dict[int, int] | None = None) -> dict[int, dict]:
    """Run ``world`` ranks of ``worker``; their reports by rank (ranks that wrote one).

    Fails the test when a rank times out (every rank is killed then) or
    exits with another code than ``expect_exit`` gives it (0 by default),
    showing the end of each failing rank's stderr.
    """
    init_method = file_init_method(workdir, f"rdzv-{scenario}")
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   CKCORE_TEST_INIT_METHOD=init_method, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(CKCORE_PARENT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(worker), scenario, str(workdir)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    failures = []
    for rank, p in enumerate(procs):
        try:
            _out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: rank {rank} timed out")
        want = (expect_exit or {}).get(rank, 0)
        if p.returncode != want:
            failures.append(f"--- rank {rank} exit {p.returncode} (expected {want})\n{err[-4000:]}")
    if failures:
        pytest.fail(f"{scenario} failed:\n" + "\n".join(failures))
    out = {}
    for r in range(world):
        f = workdir / f"{scenario}.{r}.json"
        if f.exists():
            out[r] = json.loads(f.read_text())
    return out


def launch_all(worker: Path, scenario: str, world: int, workdir: Path, timeout: float) -> list[dict]:
    """:func:`launch` where every rank must succeed and report: the reports in rank order."""
    out = launch(worker, scenario, world, workdir, timeout)
    missing = [r for r in range(world) if r not in out]
    if missing:
        pytest.fail(f"{scenario}: ranks {missing} wrote no report")
    return [out[r] for r in range(world)]
