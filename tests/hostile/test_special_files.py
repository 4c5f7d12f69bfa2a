"""Special files as a checkpoint's ``.metadata``, and hostile payloads through load_metadata(dir)/Checkpoint(dir).

Payload class 8 of the hostile suite: ``.metadata`` a symlink to /dev/zero,
/dev/urandom or /dev/null, a dangling or looping symlink, a FIFO with no
writer (an open() for reading blocks forever), a directory, and a sparse
8 GiB file (over any sane size cap: it must be refused without being read).
Each must be refused with CheckpointError, within a few seconds
(``_runner.QUICK``), through ``load_metadata(dir)``, ``load_metadata(file)``
and ``Checkpoint(dir)``.

Then the real fixtures through the path entry points (benign controls), and
a cross-section of the other payload classes through ``load_metadata(dir)``
and ``Checkpoint(dir)`` (with ``problems()``): the path entry points must
keep the contract of ``loads_metadata``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from . import _payloads as pl
from ._runner import QUICK, Task, assert_all, assert_ok, run_payloads, run_tasks

with tempfile.TemporaryDirectory() as _tmp:
    NAMES = [t[0] for t in pl.special_file_tasks(Path(_tmp))]


@pytest.fixture(scope="module")
def special_verdicts(tmp_path_factory):
    tasks = pl.special_file_tasks(tmp_path_factory.mktemp("special"))
    expected = {n: e for n, _, _, e in tasks}
    return run_tasks([Task(n, m, p, e) for n, p, m, e in tasks]), expected


@pytest.mark.parametrize("name", NAMES)
def test_special_file(special_verdicts, name):
    verdicts, expected = special_verdicts
    assert_ok(verdicts[name], expected[name], quick=QUICK)


BENIGN = [(f"benign-{fx}-{mode}-{how}", fx, mode, how) for fx in ("dcp_small", "dcp_sharded")
          for mode in ("load", "checkpoint") for how in ("dir", "file")]


@pytest.fixture(scope="module")
def benign_verdicts():
    tasks = []
    for name, fx, mode, how in BENIGN:
        d = pl.DATA / fx
        tasks.append(Task(name, mode, str(d if how == "dir" else d / ".metadata"), f"ok:{fx}"))
    return run_tasks(tasks)


@pytest.mark.parametrize("name,fx,mode,how", BENIGN, ids=[b[0] for b in BENIGN])
def test_benign_fixture_through_paths(benign_verdicts, name, fx, mode, how):
    assert_ok(benign_verdicts[name], f"ok:{fx}")


def cross_section():
    """A few payloads of every class (the first of each group), cheap to run twice more."""
    picks = []
    picks += pl.representative(pl.opcode_payloads(), 2)
    picks += pl.representative(pl.poison_payloads(), 3)
    picks += pl.representative(pl.length_payloads() + pl.memo_payloads(), 2)
    picks += list(pl.nesting_payloads((10**3,)))[:: len(pl.NEST_POSITIONS)]
    picks += [t for t in pl.bomb_payloads() if t[0] in ("bomb-tuple-20-size", "bomb-list-64-planner_value")]
    picks += pl.truncation_payloads()[::400] + pl.bitflip_payloads()[::60]
    picks += pl.benign_payloads()[:2]
    return picks


CROSS = cross_section()


@pytest.mark.parametrize("mode", ["load", "checkpoint"])
def test_payloads_through_path_entry_points(mode):
    assert_all(run_payloads(CROSS, mode=mode), CROSS)
