"""Run hostile ``.metadata`` payloads in child processes and judge them against the contract.

Parent side (imported by the tests): :func:`run_payloads` writes each
payload to a file in a fresh temporary directory, starts a child (this very
file, run as a script with ``sys.executable``) that loads them one after the
other, and returns one :class:`Verdict` per payload. :func:`problems` turns a
verdict and its expectation into a list of contract violations (empty when
the payload was handled correctly).

Child side (``python _runner.py --child JOB``): before loading anything it
caps its address space (``RLIMIT_AS``, 2 GiB) and core dumps, imports ckcore,
loads a real fixture (the baseline for the follow-up check) and snapshots
every allow-listed class and function. Then, for each task, it arms
``alarm()`` (the default SIGALRM action kills it: a hang in C code cannot
escape), loads the payload, and prints a one-line JSON verdict: how the load
ended (returned, CheckpointError, other exception), the exception type and
message prefix, the allow-listed objects whose attributes changed
(poisoning), files that appeared in its working directory (the payloads'
marker: ``os.system("touch ckcore_hostile_marker")`` and the like), whether a
follow-up benign load still gives the baseline, and the elapsed time.

A child that dies (signal, hang) takes only the task in progress with it: the
parent records a crash or hang for that task and starts a new child for the
rest. A child that finds poisoning restores the objects it snapshotted and
goes on only if the restore is complete; otherwise it exits and the parent
continues in a fresh process, so one poisoning cannot taint later verdicts.

Only the standard library is imported at module level: the child must not
import anything from ``tests`` (it runs against an installed ckcore too),
and nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DATA = REPO / "tests" / "data"
GOLDEN_FILE = HERE / "golden.json"

#: Per-payload wall-clock limit in seconds (the child's alarm); HOSTILE_TIMEOUT overrides.
TIMEOUT = int(os.environ.get("HOSTILE_TIMEOUT", "20"))
#: Address-space cap of a child, bytes; HOSTILE_MEMORY overrides.
MEMORY = int(os.environ.get("HOSTILE_MEMORY", str(2 << 30)))
#: A payload that should be refused "quickly" (special files) must take less than this.
QUICK = 5.0
#: Bound on the command's combined output for one payload.
MAX_OUTPUT = 64 * 1024

MARKER = "ckcore_hostile_marker"
DIRTY_EXIT = 17  # the child stopped early because it could not undo a poisoning


# ==========================================================================
# Child side. Everything below up to "Parent side" runs in the child.
# ==========================================================================


def canon(x, _depth: int = 0):
    """A JSON-able, exact description of a loaded Metadata (types and values).

    Used to compare a load with the golden result of today's code. Only the
    types a DCP metadata can hold are known; anything else raises TypeError,
    so a result holding an unexpected object never compares equal.
    """
    if _depth > 200:
        raise ValueError("too deep for canon")
    d = _depth + 1
    t = type(x)
    if x is None or t in (bool, int, str):
        return [t.__name__, x]
    if t in (float, complex, bytes):
        return [t.__name__, repr(x)]
    if t in (tuple, list):
        return [t.__name__, [canon(v, d) for v in x]]
    if t.__name__ == "OrderedDict" or t is dict:
        return [t.__name__, [[canon(k, d), canon(v, d)] for k, v in x.items()]]
    if t in (set, frozenset):
        return [t.__name__, sorted((canon(v, d) for v in x), key=json.dumps)]
    mod = getattr(t, "__module__", "")
    if mod in ("pathlib", "pathlib._local"):
        return [t.__name__, list(map(str, x.parts))]
    fields = t.__dict__.get("__dataclass_fields__") if mod.startswith("ckcore") else None
    if isinstance(fields, dict):
        # Field values as the object presents them: its own __dict__ entry, else
        # the class default (torch omits None fields; either form is the same
        # value). Any other instance attribute is reported too.
        import dataclasses

        own = object.__getattribute__(x, "__dict__")
        out = {}
        for k, f in fields.items():
            if k in own:
                out[k] = canon(own[k], d)
            elif f.default is not dataclasses.MISSING:
                out[k] = canon(f.default, d)
            else:
                out[k] = ["<missing>", None]
        for k in own:
            if k not in fields:
                out[f"<extra>{k}"] = canon(own[k], d)
        return [t.__name__, dict(sorted(out.items()))]
    raise TypeError(f"unexpected {t.__module__}.{t.__qualname__} in metadata")


def _child_targets():
    """(label, object) for every allow-listed class and function, deduplicated."""
    import collections
    import pathlib
    import types

    import ckcore.checkpoint as cc
    import ckcore.metadata as cm

    seen: dict[int, tuple[str, object]] = {}

    def add(label, obj):
        if isinstance(obj, (type, types.FunctionType)) and id(obj) not in seen:
            seen[id(obj)] = (label, obj)

    for n in ("ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
              "BytesStorageMetadata", "MetadataIndex", "Metadata", "StorageMeta"):
        add(f"ckcore.metadata.{n}", getattr(cm, n))
    add("ckcore.checkpoint.StorageInfo", getattr(cc, "StorageInfo", None))
    for n in ("PurePath", "PurePosixPath", "PureWindowsPath", "PosixPath", "WindowsPath", "Path"):
        add(f"pathlib.{n}", getattr(pathlib, n))
    add("pathlib.<concrete Path>", type(pathlib.Path()))
    add("collections.OrderedDict", collections.OrderedDict)
    # The allow-list table: _ALLOWED today; the rewrite may rename it, so also
    # every module-level dict of ckcore.checkpoint keyed by (module, name).
    tables = []
    if isinstance(getattr(cc, "_ALLOWED", None), dict):
        tables.append(("_ALLOWED", cc._ALLOWED))
    for name, val in list(vars(cc).items()):
        if isinstance(val, dict) and val and name != "_ALLOWED" and all(
                isinstance(k, tuple) and len(k) == 2 and all(isinstance(p, str) for p in k)
                for k in val):
            tables.append((name, val))
    for tname, table in tables:
        for (module, name), obj in table.items():
            add(f"{tname}[{module}.{name}]", obj)
            # A stand-in object (an instance) exposes its class to BUILD too.
            if not isinstance(obj, (type, types.FunctionType, str, int)):
                add(f"type({tname}[{module}.{name}])", type(obj))
    # The classes the unpickler itself is made of.
    for name, val in list(vars(cc).items()):
        if isinstance(val, type) and "Unpickler" in name:
            add(f"ckcore.checkpoint.{name}", val)
    return list(seen.values())


_FUNC_ATTRS = ("__defaults__", "__kwdefaults__", "__code__", "__name__", "__qualname__",
               "__module__", "__doc__", "__annotations__")


def _snap_one(obj):
    import types

    if isinstance(obj, type):
        rec = {"vars": dict(vars(obj))}
        fields = obj.__dict__.get("__dataclass_fields__")
        if isinstance(fields, dict):
            rec["fields"] = {k: (f.default, f.default_factory, f.type, f.init, f.compare, f.hash)
                             for k, f in fields.items()}
        return rec
    if isinstance(obj, types.FunctionType):
        rec = {a: getattr(obj, a, None) for a in _FUNC_ATTRS}
        rec["__dict__"] = dict(obj.__dict__)
        ann = rec["__annotations__"]
        rec["__annotations__ items"] = dict(ann) if isinstance(ann, dict) else ann
        return rec
    return {}


def _same(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) in (str, int, bool, float, bytes, type(None)):
        return a == b
    if type(a) is tuple:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return False


def _snapshot(targets):
    return {label: _snap_one(obj) for label, obj in targets}


def _diff(before, after) -> list[str]:
    out = []
    for label, rec in before.items():
        now = after.get(label, {})
        for key in sorted(set(rec) | set(now)):
            a, b = rec.get(key, KeyError), now.get(key, KeyError)
            if type(a) is dict and type(b) is dict:
                for k in sorted(set(a) | set(b), key=str):
                    if not _same(a.get(k, KeyError), b.get(k, KeyError)):
                        out.append(f"{label}.{k}" if key == "vars" else f"{label}.{key}[{k}]")
            elif not _same(a, b):
                out.append(f"{label}.{key}")
    return out


def _restore(targets, before) -> None:
    import contextlib
    import types

    for label, obj in targets:
        rec = before[label]
        # An incomplete restore is caught by the re-diff that follows.
        with contextlib.suppress(Exception):
            if isinstance(obj, type):
                orig = rec["vars"]
                for k in list(vars(obj)):
                    if k not in orig:
                        delattr(obj, k)
                for k, v in orig.items():
                    if vars(obj).get(k, KeyError) is not v:
                        setattr(obj, k, v)
            elif isinstance(obj, types.FunctionType):
                for a in _FUNC_ATTRS:
                    if getattr(obj, a, None) is not rec[a]:
                        setattr(obj, a, rec[a])
                obj.__dict__.clear()
                obj.__dict__.update(rec["__dict__"])


def _probes() -> dict[str, str]:
    """Results of ordinary operations on the allow-listed classes, as text."""
    import collections
    import pathlib

    from ckcore.checkpoint import StorageInfo
    from ckcore.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    checks = {
        "str(PurePosixPath('/a/b'))": lambda: str(pathlib.PurePosixPath("/a/b")),
        "Path('/x').joinpath('y')": lambda: str(pathlib.Path("/x").joinpath("y")),
        "Path('/x') / 'y'": lambda: repr(pathlib.Path("/x") / "y"),
        "PureWindowsPath": lambda: str(pathlib.PureWindowsPath("c:/a", "b")),
        "PurePath parts": lambda: repr(pathlib.PurePath("/a/b/c").parts),
        "MetadataIndex eq": lambda: repr(MetadataIndex("w", [0, 4], 3) == MetadataIndex("w", (0, 4))),
        "MetadataIndex hash": lambda: repr(hash(MetadataIndex("w", (0, 4))) == hash(("w", (0, 4)))),
        "MetadataIndex repr": lambda: repr(MetadataIndex("w")),
        "StorageInfo": lambda: repr(StorageInfo("f", 1, 2)),
        "TensorProperties": lambda: repr(TensorProperties()),
        "Chunk eq": lambda: repr(ChunkStorageMetadata((0,), (1,)) == ChunkStorageMetadata((0,), (1,))),
        "TensorStorageMetadata": lambda: repr(TensorStorageMetadata(TensorProperties(), (1,), [])),
        "BytesStorageMetadata": lambda: repr(BytesStorageMetadata()),
        "StorageMeta": lambda: repr(StorageMeta()),
        "Metadata": lambda: repr(Metadata({})),
        "OrderedDict": lambda: repr(collections.OrderedDict([(1, 2)])),
    }
    out = {}
    for k, f in checks.items():
        try:
            out[k] = f()
        except BaseException as e:  # noqa: BLE001
            out[k] = f"EXC:{type(e).__name__}"
    return out


def _child_main(job_path: str) -> int:
    import resource

    job = json.loads(Path(job_path).read_text())
    mem = job["memory"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    import ckcore.checkpoint as cc
    from ckcore.metadata import Metadata

    goldens = job["goldens"]
    baseline_bytes = Path(job["baseline"]).read_bytes()
    try:
        baseline = json.dumps(canon(cc.loads_metadata(baseline_bytes)))
    except BaseException as e:  # noqa: BLE001
        baseline = None
        print(json.dumps({"warning": f"baseline load failed: {type(e).__name__}: {e}"[:300]}),
              flush=True)
    probes0 = _probes()
    targets = _child_targets()
    snap0 = _snapshot(targets)
    # A str, not a Path: a poisoned pathlib must not break the marker check.
    cwd = os.getcwd()
    files0 = set(os.listdir(cwd))

    for task in job["tasks"]:
        print(json.dumps({"start": task["name"]}), flush=True)
        v: dict = {"name": task["name"]}
        mode, path = task["mode"], task["path"]
        data = Path(path).read_bytes() if mode in ("loads", "columns", "columns-strict") else None
        r = None
        signal.alarm(job["timeout"])
        t0 = time.perf_counter()
        try:
            if mode == "loads":
                r = cc.loads_metadata(data)
                md = r
            elif mode == "load":
                r = cc.load_metadata(path)
                md = r
            elif mode in ("columns", "columns-strict"):
                # The column reader, with (or without) its fallback to the object reader.
                r = cc.loads_metadata_columns(data, fallback=mode == "columns")
                md = r.to_metadata()
            elif mode == "checkpoint":
                r = cc.Checkpoint(path)
                md = r.metadata
                r.problems()
            else:
                raise SystemExit(f"unknown mode {mode}")
            v["outcome"] = "ok"
        except BaseException as e:  # noqa: BLE001 - judged by the parent
            v["elapsed"] = round(time.perf_counter() - t0, 4)
            signal.alarm(0)
            v["outcome"] = "refused" if isinstance(e, cc.CheckpointError) else "escape"
            v["exc"] = type(e).__name__
            v["unsafe"] = isinstance(e, cc.UnsafeCheckpointError)
            try:
                msg = str(e)
            except BaseException:  # noqa: BLE001
                msg = "<str() failed>"
            v["msg"] = msg[:300]
            v["msg_len"] = len(msg)
            del e
        else:
            v["elapsed"] = round(time.perf_counter() - t0, 4)
            signal.alarm(0)
            v["valid"] = type(md) is Metadata
            if task.get("golden"):
                try:
                    got = json.dumps(canon(md))
                    v["golden"] = got == json.dumps(goldens[task["golden"]])
                except BaseException as e:  # noqa: BLE001
                    v["golden"] = False
                    v["golden_error"] = f"{type(e).__name__}: {e}"[:200]
        # After the load, whatever it did: poisoning, marker, follow-up load
        # (freeing the result, however deep, is timed too).
        signal.alarm(job["timeout"])
        md = r = data = None
        dirty = False
        try:
            snap = _snapshot(targets)
            poisoned = _diff(snap0, snap)
            probes = _probes()
            poisoned += [f"probe {k}: {probes0[k]!r} -> {probes[k]!r}"
                         for k in probes0 if probes[k] != probes0[k]]
            try:
                follow = json.dumps(canon(cc.loads_metadata(baseline_bytes)))
            except BaseException as e:  # noqa: BLE001
                follow = f"EXC:{type(e).__name__}"
            v["followup"] = baseline is not None and follow == baseline
            if poisoned or not v["followup"]:
                _restore(targets, snap0)
                clean = not _diff(snap0, _snapshot(targets)) and _probes() == probes0
                try:
                    clean = clean and json.dumps(canon(cc.loads_metadata(baseline_bytes))) == baseline
                except BaseException:  # noqa: BLE001
                    clean = False
                dirty = not clean
        except BaseException as e:  # noqa: BLE001
            poisoned = [f"post-load check failed: {type(e).__name__}: {e}"[:300]]
            dirty = True
        signal.alarm(0)
        v["poisoned"] = poisoned
        new = sorted(set(os.listdir(cwd)) - files0)
        v["marker"] = new
        for n in new:
            try:
                os.unlink(os.path.join(cwd, n))
            except OSError:
                pass
        print(json.dumps(v), flush=True)
        if dirty:
            return DIRTY_EXIT
    return 0


# ==========================================================================
# Parent side.
# ==========================================================================


@dataclass
class Verdict:
    """How one payload's load ended, as the child (or the parent, for a crash or hang) saw it."""

    name: str
    outcome: str  # ok | refused | escape | crash | hang | error
    exc: str | None = None
    unsafe: bool = False
    msg: str = ""
    msg_len: int = 0
    elapsed: float = 0.0
    poisoned: list[str] = field(default_factory=list)
    marker: list[str] = field(default_factory=list)
    followup: bool = True
    valid: bool | None = None
    golden: bool | None = None
    golden_error: str | None = None
    signal: int | None = None
    stderr: str = ""

    def short(self) -> str:
        bits = [self.outcome]
        if self.exc:
            bits.append(self.exc)
        if self.signal:
            bits.append(f"signal {self.signal}")
        bits.append(f"{self.elapsed:.2f}s")
        if self.msg:
            bits.append(repr(self.msg[:120]))
        return " ".join(bits)


@dataclass
class Task:
    name: str
    mode: str  # loads (bytes) | load (path) | checkpoint (directory)
    path: str
    expected: str


def _ckcore_root() -> str:
    import ckcore

    return str(Path(ckcore.__file__).resolve().parent.parent)


def goldens() -> dict:
    """The golden canonical results of the real fixtures (today's code) plus the crafted sample."""
    from ._payloads import sample_metadata

    gold = json.loads(GOLDEN_FILE.read_text())
    gold["sample"] = canon(sample_metadata())
    return gold


def _child_env() -> dict:
    env = dict(os.environ)
    root = _ckcore_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONFAULTHANDLER", None)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _run_child(tasks: list[Task], workdir: Path, gold: dict, timeout: int) -> tuple[list[dict], int, str]:
    """One child over ``tasks``; returns (records printed, return code, stderr tail)."""
    job = {
        "tasks": [{"name": t.name, "mode": t.mode, "path": t.path,
                   "golden": t.expected.partition(":")[2] or None} for t in tasks],
        "memory": MEMORY,
        "timeout": timeout,
        "goldens": gold,
        "baseline": str(DATA / "dcp_small" / ".metadata"),
    }
    cwd = Path(tempfile.mkdtemp(prefix="child-", dir=workdir))
    job_path = cwd.parent / (cwd.name + ".json")
    job_path.write_text(json.dumps(job))
    err_path = cwd.parent / (cwd.name + ".err")
    records: list[dict] = []
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(HERE / "_runner.py"), "--child", str(job_path)],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=_child_env())
        # The child's own alarm ends a hang; this is only a backstop (e.g. a
        # child that blocks SIGALRM), checked between lines of output.
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout + 60
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()  # our own child, by its handle
                break
            if not sel.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        records.append({"noise": line[:200].decode("utf-8", "replace")})
                    deadline = time.monotonic() + timeout + 60
        sel.close()
        proc.stdout.close()
        rc = proc.wait()
    tail = err_path.read_bytes()[-2000:].decode("utf-8", "replace")
    return records, rc, tail


def run_tasks(tasks: list[Task], *, timeout: int | None = None) -> dict[str, Verdict]:
    """Run ``tasks`` in as few children as crashes, hangs and unrestorable poisonings allow."""
    timeout = timeout or TIMEOUT
    gold = goldens()
    out: dict[str, Verdict] = {}
    with tempfile.TemporaryDirectory(prefix="ckcore-hostile-") as tmp:
        workdir = Path(tmp)
        todo = list(tasks)
        while todo:
            records, rc, tail = _run_child(todo, workdir, gold, timeout)
            started = None
            for rec in records:
                if "start" in rec:
                    started = rec["start"]
                elif "outcome" in rec:
                    keep = {k: v for k, v in rec.items() if k in Verdict.__dataclass_fields__}
                    out[rec["name"]] = Verdict(**keep)
                    started = None
            done = {t.name for t in todo if t.name in out}
            if started is not None:
                sig = -rc if rc < 0 else None
                kind = "hang" if sig in (signal.SIGALRM, signal.SIGKILL) else "crash" if sig else "error"
                out[started] = Verdict(started, kind, signal=sig, elapsed=float(timeout) if kind == "hang" else 0.0,
                                       msg=f"child exit status {rc}", stderr=tail)
                done.add(started)
            elif rc not in (0, DIRTY_EXIT) and not done:
                # The child died before starting any task: nothing can run.
                for t in todo:
                    out[t.name] = Verdict(t.name, "error", msg=f"child failed: rc={rc}", stderr=tail)
                break
            rest = [t for t in todo if t.name not in done]
            if len(rest) == len(todo):  # no progress (cannot happen; guard anyway)
                for t in rest:
                    out[t.name] = Verdict(t.name, "error", msg="child made no progress", stderr=tail)
                break
            todo = rest
    return out


def run_payloads(triples, *, mode: str = "loads", isolate: bool = False, workers: int = 1,
                 timeout: int | None = None) -> dict[str, Verdict]:
    """Load each ``(name, bytes, expected)`` payload in a child; ``isolate``: one child each.

    ``workers`` (with ``isolate``) runs that many children at a time.

    ``mode`` "loads" calls ``loads_metadata(bytes)``, "columns" and
    "columns-strict" ``loads_metadata_columns(bytes)`` with and without its
    fallback to the object reader; "load" and "checkpoint"
    write the bytes as ``.metadata`` of a directory and call
    ``load_metadata(dir)`` or ``Checkpoint(dir)`` (plus ``problems()``).
    """
    triples = list(triples)
    names = [n for n, _, _ in triples]
    assert len(set(names)) == len(names), "payload names must be unique"
    out: dict[str, Verdict] = {}
    with tempfile.TemporaryDirectory(prefix="ckcore-payloads-") as tmp:
        tasks = []
        for i, (name, data, expected) in enumerate(triples):
            if mode in ("loads", "columns", "columns-strict"):
                p = Path(tmp) / f"p{i}.pickle"
                p.write_bytes(data)
            else:
                d = Path(tmp) / f"ck{i}"
                d.mkdir()
                (d / ".metadata").write_bytes(data)
                p = d
            tasks.append(Task(name, mode, str(p), expected))
        if isolate:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as ex:
                for result in ex.map(lambda t: run_tasks([t], timeout=timeout), tasks):
                    out.update(result)
        else:
            out.update(run_tasks(tasks, timeout=timeout))
    return out


def problems(v: Verdict, expected: str, *, quick: float | None = None) -> list[str]:
    """Contract violations of verdict ``v`` for a payload whose expectation is ``expected``.

    ``expected`` is ``kind`` or ``kind:golden``; kind is one of
    ``ok`` (must load, and equal the golden result), ``any`` (may load or be
    refused; if it loads it must be a Metadata, equal to the golden result
    when one is named), ``refuse`` (CheckpointError) or ``unsafe``
    (UnsafeCheckpointError).
    """
    kind, _, golden = expected.partition(":")
    bad = []
    if v.outcome == "crash":
        bad.append(f"crash: child killed by signal {v.signal}")
    elif v.outcome == "hang":
        bad.append(f"hang: no answer within {v.elapsed:.0f} s")
    elif v.outcome == "error":
        bad.append(f"runner error: {v.msg} {v.stderr[-300:]}")
    elif v.outcome == "escape":
        bad.append(f"wrong exception type: {v.exc} escaped ({v.msg[:150]!r})")
    elif v.outcome == "refused":
        if kind == "ok":
            bad.append(f"benign input refused: {v.exc}: {v.msg[:150]!r}")
        elif kind == "unsafe" and not v.unsafe:
            bad.append(f"wrong exception type: {v.exc}, want UnsafeCheckpointError ({v.msg[:120]!r})")
    elif v.outcome == "ok":
        if kind in ("refuse", "unsafe"):
            bad.append("accepted as valid metadata (expected a refusal)")
        elif not v.valid:
            bad.append("returned something that is not a ckcore Metadata")
        elif golden and not v.golden:
            bad.append(f"result differs from the golden {golden!r} result {v.golden_error or ''}".rstrip())
    if v.marker:
        bad.append(f"payload code ran: created {v.marker}")
    if v.poisoned:
        bad.append(f"poisoned: {', '.join(v.poisoned[:6])}" + (" ..." if len(v.poisoned) > 6 else ""))
    if not v.followup and v.outcome in ("ok", "refused", "escape"):
        bad.append("follow-up benign load differs from the one before the hostile load")
    if quick is not None and v.outcome in ("ok", "refused", "escape") and v.elapsed > quick:
        bad.append(f"slow: {v.elapsed:.1f} s (want < {quick} s)")
    return bad


def check_all(verdicts: dict[str, Verdict], triples, *, quick: float | None = None) -> list[str]:
    """One line per payload that violates the contract: ``name: reason; reason``."""
    lines = []
    for name, _, expected in triples:
        bad = problems(verdicts[name], expected, quick=quick)
        if bad:
            lines.append(f"{name}: {'; '.join(bad)}")
    return lines


def assert_ok(verdict: Verdict, expected: str, *, quick: float | None = None) -> None:
    bad = problems(verdict, expected, quick=quick)
    assert not bad, f"{verdict.name} [{verdict.short()}]: " + "; ".join(bad)


def assert_all(verdicts, triples, *, quick: float | None = None, show: int = 25) -> None:
    lines = check_all(verdicts, triples, quick=quick)
    n = len(list(triples))
    assert not lines, f"{len(lines)} of {n} payloads violate the contract:\n" + "\n".join(
        lines[:show]) + ("\n..." if len(lines) > show else "")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    # Drop the tests directory from the path: the child imports only ckcore.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.exit(_child_main(sys.argv[2]))
