"""The ``ckcore`` command on hostile checkpoints: exit 2, one error line, bounded output, no traceback.

Each case is a directory whose ``.metadata`` is a hostile payload (a
cross-section of the other classes) or a special file; the command runs as
``python -m ckcore inspect|validate DIR`` in its own process with the same
2 GiB address-space cap and wall-clock limit as the loader children, in an
empty working directory (where the payloads would leave their marker file).
Contract: exit status 2 (1 from ``validate`` only for a valid but
inconsistent checkpoint), stderr one line ``ckcore: error: ...``, no
traceback, stdout + stderr under 64 kB, no crash, no hang, no marker.

``python -m ckcore.cli`` (the form the issue names) is checked separately:
today ckcore/cli.py has no ``__main__`` block, so that form does nothing
and exits 0.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import _payloads as pl
from ._runner import MAX_OUTPUT, MEMORY, TIMEOUT, _child_env

#: Payloads (by name, from the generators) run through the command.
CLI_PAYLOADS = (
    "forbidden-reduce-os.system-p4", "forbidden-inst-builtins.exec-p0",
    "forbidden-reduce-os.system-prefix-p4", "forbidden-getattr-import-chain", "ext1-1-p4",
    "binpersid-str-p4", "poison-slot-pathlib.PurePosixPath-_str-prefix",
    "poison-slot-torch.distributed.checkpoint.filesystem._StorageInfo-transform_descriptors-prefix",
    "poison-slot-torch.distributed.checkpoint.metadata.MetadataIndex-__hash__-prefix",
    "instance-twice-dict-Metadata-__class__", "instance-class-swap-to-Metadata",
    "nest-tuple-1e3-fqn", "bomb-list-64-version", "bomb-tuple-64-fqn", "bomb-list-64-planner_value",
    "len-BINBYTES8-9223372036854775807-top", "memo-LONG_BINPUT-4294967295-top", "memo-memoize-flood-top",
    "trunc-dcp_small-1000", "bignum-INT-1000000-size", "proto0-sample", "empty",
)


def _payload_cases():
    wanted = set(CLI_PAYLOADS)
    found = {}
    for gen in (pl.opcode_payloads, pl.poison_payloads, pl.bomb_payloads, pl.length_payloads,
                pl.memo_payloads, pl.corruption_payloads, lambda: pl.nesting_payloads((10**3,))):
        for name, data, expected in gen():
            if name in wanted:
                found[name] = (data, expected)
    missing = wanted - set(found)
    assert not missing, f"unknown CLI payloads: {missing}"
    name, data, expected = pl.nesting_payload("tuple", 10**6, "fqn")
    found[name] = (data, expected)
    return found


def _make_cases(tmp: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (checkpoint directory, {command: allowed exit statuses})."""
    refuse = {"inspect": {2}, "validate": {2}}
    anything = {"inspect": {0, 1, 2}, "validate": {0, 1, 2}}
    cases = {}
    for name, (data, expected) in _payload_cases().items():
        d = tmp / name
        d.mkdir()
        (d / ".metadata").write_bytes(data)
        cases[name] = (d, anything if expected.startswith("any") else refuse)
    d = tmp / "special-fifo"
    d.mkdir()
    os.mkfifo(d / ".metadata")
    cases["special-fifo"] = (d, refuse)
    d = tmp / "special-sparse-8GiB"
    d.mkdir()
    with open(d / ".metadata", "wb") as f:
        f.write(pl.fixture_bytes())
    os.truncate(d / ".metadata", pl.SPARSE_SIZE)
    cases["special-sparse-8GiB"] = (d, refuse)
    d = tmp / "special-dev-zero"
    d.mkdir()
    (d / ".metadata").symlink_to("/dev/zero")
    cases["special-dev-zero"] = (d, refuse)
    d = tmp / "special-metadata-dir"
    (d / ".metadata").mkdir(parents=True)
    cases["special-metadata-dir"] = (d, refuse)
    # Controls: a sound checkpoint, and valid metadata whose data files are missing.
    d = tmp / "benign-dcp_sharded"
    shutil.copytree(pl.DATA / "dcp_sharded", d)
    cases["benign-dcp_sharded"] = (d, {"inspect": {0}, "validate": {0}})
    d = tmp / "inconsistent-no-data-files"
    d.mkdir()
    (d / ".metadata").write_bytes(pl.fixture_bytes())
    cases["inconsistent-no-data-files"] = (d, {"inspect": {0}, "validate": {1}})
    return cases


def _limits():  # runs in the command's process before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cli(args: list[str], *, module: str = "ckcore") -> dict:
    """Run ``python -m MODULE ARGS`` capped and timed; stdout/stderr, status, elapsed, new files."""
    with tempfile.TemporaryDirectory(prefix="ckcore-cli-") as cwd:
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=cwd, env=_child_env(),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                               preexec_fn=_limits)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:  # subprocess.run killed its child
            rc, out, err = None, e.stdout or b"", e.stderr or b""
        return {"rc": rc, "out": out, "err": err, "elapsed": time.perf_counter() - t0,
                "marker": os.listdir(cwd)}


def cli_problems(r: dict, allowed: set[int]) -> list[str]:
    bad = []
    out = r["out"].decode("utf-8", "replace")
    err = r["err"].decode("utf-8", "replace")
    if r["rc"] is None:
        bad.append(f"hang: no exit within {TIMEOUT} s")
    elif r["rc"] < 0:
        bad.append(f"crash: killed by signal {-r['rc']}")
    elif r["rc"] not in allowed:
        bad.append(f"exit status {r['rc']}, want {sorted(allowed)} (stderr {err[-200:]!r})")
    if "Traceback" in out + err:
        bad.append("traceback printed")
    if len(r["out"]) + len(r["err"]) >= MAX_OUTPUT:
        bad.append(f"{len(r['out']) + len(r['err'])} bytes of output (want < {MAX_OUTPUT})")
    if r["rc"] == 2:
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("ckcore: error: "):
            bad.append(f"want one 'ckcore: error:' line on stderr, got {len(lines)}: {err[:200]!r}")
    if r["marker"]:
        bad.append(f"payload code ran: created {r['marker']}")
    return bad


def run_all(cases) -> dict[tuple[str, str], dict]:
    jobs = [(name, cmd) for name in cases for cmd in ("inspect", "validate")]
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = ex.map(lambda j: run_cli([j[1], str(cases[j[0]][0])]), jobs)
        return dict(zip(jobs, results))


def run_cli_cases():
    """(counts, violation lines) for the summary script."""
    from .summary import COLUMNS

    counts = dict.fromkeys(COLUMNS, 0)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = _make_cases(Path(tmp))
        for (name, cmd), r in run_all(cases).items():
            counts["tried"] += 1
            counts["refused"] += r["rc"] == 2
            counts["accepted"] += r["rc"] in (0, 1)
            counts["crashes"] += r["rc"] is not None and r["rc"] < 0
            counts["hangs"] += r["rc"] is None
            counts["escapes"] += r["rc"] == 3 or b"Traceback" in r["err"]
            counts["code_ran"] += bool(r["marker"])
            bad = cli_problems(r, cases[name][1][cmd])
            if bad:
                counts["violations"] += 1
                lines.append(f"cli {cmd} {name}: {'; '.join(bad)}")
    return counts, lines


CASE_NAMES = [*CLI_PAYLOADS, "nest-tuple-1e6-fqn",
              "special-fifo", "special-sparse-8GiB", "special-dev-zero", "special-metadata-dir",
              "benign-dcp_sharded", "inconsistent-no-data-files"]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    cases = _make_cases(tmp_path_factory.mktemp("cli"))
    assert sorted(cases) == sorted(CASE_NAMES)
    return cases, run_all(cases)


@pytest.mark.parametrize("cmd", ["inspect", "validate"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_on_hostile_checkpoint(cli_results, name, cmd):
    cases, results = cli_results
    bad = cli_problems(results[name, cmd], cases[name][1][cmd])
    assert not bad, f"ckcore {cmd} {name}: " + "; ".join(bad)


def test_cli_module_entry_point(tmp_path):
    """``python -m ckcore.cli validate DIR`` (the issue's form) must run the command too."""
    (tmp_path / ".metadata").write_bytes(pl.header(2) + pl.form("reduce", "os", "system", (pl.SH,), 2) + b".")
    r = run_cli(["validate", str(tmp_path)], module="ckcore.cli")
    bad = cli_problems(r, {2})
    if r["rc"] == 0 and not r["out"] and not r["err"]:
        bad.append("no output at all: ckcore/cli.py has no `if __name__ == '__main__'` block")
    assert not bad, "python -m ckcore.cli: " + "; ".join(bad)
