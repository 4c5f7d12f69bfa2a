"""The ``ckcore`` command: answers about DCP checkpoints on disk, without torch.

A checkpoint is opaque until something reads its ``.metadata``: which tensors
it holds, whether its chunks tile every tensor, whether its files are whole,
and what a resharded load at another layout will cost each rank. Torch can
answer the first three only by loading the checkpoint (which runs pickle
code) and the last one not at all without a process group. This module is
the command line (arguments, text and JSON output, exit status) over
:mod:`ckcore.report`, which computes the answers as plain data:

* ``ckcore inspect PATH``   what the checkpoint holds
  (:func:`~ckcore.report.inspect_checkpoint`);
* ``ckcore validate PATH``  torch's global-plan checks plus storage checks
  (:func:`~ckcore.report.validate_checkpoint`); exit status 0 only when sound;
* ``ckcore plan PATH ...``  every rank's reads for a target layout
  (:func:`~ckcore.report.plan_reads`);
* ``ckcore demo``           a 70B-class model planned for save at one layout
  and load at another, timed for ckcore and (when installed) torch
  (:func:`ckcore.demo.run_demo`);
* ``ckcore --version``      the installed version.

Every command takes ``--json`` (the report as one JSON object on stdout) and
``--progress``. The ``.metadata`` is untrusted input: a few kilobytes of
pickle can repeat one chunk object a million times, so everything printed
is bounded. ``validate`` shows the first ``--max-findings N`` findings of
each kind (default 20, 0 for all) and a line counting the rest (``... and
4,498,480 more overlapping chunk pairs``); its ``--json`` lists the same
messages plus each kind's count (``inexact`` names the counts that are lower
bounds); :class:`~ckcore.report.Findings` describes the bounds. ``inspect``
writes a row per tensor, bytes item and file, each of bounded size, and
``plan`` a row per target rank; names and shapes from the file are
abbreviated in text and in error messages
(:func:`~ckcore._saferepr.saferepr`).

Exit status: 0 success (and, for ``validate``, a sound checkpoint), 1 for
``validate`` problems, 2 for every error: bad arguments, an unusable input
(a missing path, a corrupted or unsafe ``.metadata``, a layout that does not
fit a tensor), running out of memory, or a bug in ckcore ("internal error",
naming the exception type); 130 when interrupted (Ctrl-C), as shells report
it. Every error is one ``ckcore: error: ...`` line on stderr, argparse's
usage errors included, never a traceback: set ``CKCORE_DEBUG=1`` in the
environment to have errors re-raised with their traceback instead.

Nothing here imports torch, except ``demo``, which times torch when it is
installed (and ``--no-torch`` is not given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from . import __version__, report
from ._saferepr import name_text, one_line, shape_text
from .checkpoint import Checkpoint, CheckpointError
from .metadata import TensorStorageMetadata
from .ranges import NO_RATIO_CAP
from .report import DEFAULT_MAX_FINDINGS, UsageError, format_mesh

__all__ = ["Progress", "main", "open_checkpoint"]


# --------------------------------------------------------------------------
# Text output: sizes, tables, progress, one printer per command.
# --------------------------------------------------------------------------


def _human(n: int | None) -> str:
    """Bytes as a short human string with binary units (exact bytes stay in --json)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - loop always returns


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _table(rows: list[list[str]], header: list[str], right: Sequence[int] = ()) -> list[str]:
    """Plain aligned columns; ``right`` lists the columns to right-align (numbers)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        return "  ".join(cells).rstrip()

    return [fmt(header)] + [fmt(r) for r in rows]


class Progress:
    """Progress of long work on stderr: a self-rewriting line on a TTY, else sparse lines.

    Disabled unless stderr is a TTY or ``force`` (``--progress``) is set, so
    pipes and logs stay clean by default.
    """

    def __init__(self, stream: IO[str], force: bool = False) -> None:
        """Report on ``stream``; ``force`` enables it even when ``stream`` is not a TTY."""
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = self.tty or force
        self._last = 0.0
        self._label = ""
        self._total = 0
        self._shown_pct = -1

    def start(self, label: str, total: int) -> None:
        """Begin a phase of ``total`` steps."""
        self._label, self._total, self._shown_pct = label, max(total, 0), -1
        self._last = 0.0
        self.update(0)

    def update(self, done: int) -> None:
        """Record that ``done`` of the phase's steps are finished."""
        if not self.enabled:
            return
        pct = 100 * done // self._total if self._total else 100
        if self.tty:
            now = time.monotonic()
            if now - self._last < 0.1 and done < self._total:
                return
            self._last = now
            self.stream.write(f"\r{self._label}: {done}/{self._total} ({pct}%)\x1b[K")
        else:
            # Not a terminal: one line per 25% so logs stay short.
            step = pct // 25
            if step == self._shown_pct:
                return
            self._shown_pct = step
            self.stream.write(f"{self._label}: {done}/{self._total} ({pct}%)\n")
        self.stream.flush()

    def done(self) -> None:
        """Finish the phase (clears the TTY line)."""
        if self.enabled:
            self.update(self._total)
            if self.tty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def open_checkpoint(path: str) -> Checkpoint:
    """A :class:`~ckcore.checkpoint.Checkpoint`; a missing path is a CheckpointError naming it."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    return Checkpoint(path)


def _print_inspect(result: dict[str, Any], out: IO[str]) -> None:
    t = result["totals"]
    w = out.write
    version = name_text(result["version"]) if result["version"] else "unknown"
    w(f"checkpoint {result['path']}  (DCP metadata version {version})\n")
    if result["tensors"]:
        rows = [
            [name_text(fqn), v["dtype"],
             shape_text(v["shape"]) if v["shape"] is not None else f"(...<{v['ndim']} dims>)",
             str(v["chunks"]), _human(v["bytes"]), _human(v["stored_bytes"])]
            for fqn, v in result["tensors"].items()
        ]
        w("\n" + "\n".join(_table(rows, ["tensor", "dtype", "shape", "chunks", "bytes", "stored"],
                                    right=(3, 4, 5))) + "\n")
    if result["bytes_items"]:
        rows = [[name_text(fqn), _human(v["stored_bytes"])] for fqn, v in result["bytes_items"].items()]
        w("\n" + "\n".join(_table(rows, ["bytes item", "stored"], right=(1,))) + "\n")
    if result["files"]:
        rows = [[name_text(rp), _human(v["size"]) if v["size"] is not None else "MISSING", str(v["items"])]
                for rp, v in result["files"].items()]
        w("\n" + "\n".join(_table(rows, ["file", "size", "items"], right=(1, 2))) + "\n")
    missing = f", {t['missing_files']} missing" if t["missing_files"] else ""
    w(
        f"\ntotal: {_n(t['tensors'], 'tensor')} in {_n(t['chunks'], 'chunk')} ({_human(t['tensor_bytes'])}), "
        f"{_n(t['bytes_items'], 'bytes item')}, {_n(t['files'], 'file')} ({_human(t['file_bytes'])}{missing})\n"
    )


def _print_plan(result: dict[str, Any], out: IO[str], top: int) -> None:
    t = result["totals"]
    w = out.write
    w(f"plan: load {result['path']} on mesh {format_mesh(result['mesh'])} "
      f"({result['world_size']} ranks)\n")
    w(f"reads coalesced: {result['coalescing']}\n\n")
    ranks = result["ranks"] if top <= 0 else result["ranks"][:top]
    rows = []
    for r in ranks:
        pct = 100.0 * r["over_read"] / r["bytes_read"] if r["bytes_read"] else 0.0
        rows.append([
            str(r["rank"]), shape_text(r["coordinate"]), str(r["read_items"]), str(r["files"]),
            str(r["read_calls"]), _human(r["bytes_read"]), _human(r["useful_bytes"]),
            f"{_human(r['over_read'])} ({pct:.0f}%)",
        ])
    header = ["rank", "coord", "items", "files", "calls", "read", "useful", "over-read"]
    ranged = "range_reader" in result
    if ranged:
        # ckcore's range reader alone, and sharing replicated reads
        for row, r in zip(rows, ranks):
            row += [str(r["range"]["read_calls"]), _human(r["range"]["bytes_read"]),
                    _human(r["shared"]["bytes_read"])]
        header += ["range calls", "range read", "shared read"]
    w("\n".join(_table(rows, header, right=tuple(range(2, len(header))))) + "\n")
    if len(ranks) < len(result["ranks"]):
        w(f"... {len(result['ranks']) - len(ranks)} lighter ranks not shown (--top 0 shows all)\n")
    over = t["bytes_read"] - t["useful_bytes"]
    w(
        f"\ntotal: {t['read_items']} read items, {t['read_calls']} read calls, "
        f"{_human(t['bytes_read'])} read for {_human(t['useful_bytes'])} useful "
        f"(over-read {_human(over)}); per rank {_human(t['min_bytes_read'])} .. "
        f"{_human(t['max_bytes_read'])}; checkpoint files {_human(t['checkpoint_file_bytes'])}\n"
    )
    if ranged:
        _print_range_reads(result, out)


def _print_range_reads(result: dict[str, Any], out: IO[str]) -> None:
    w = out.write
    rr, sh, t = result["range_reader"], result["sharing"], result["totals"]
    rt = rr["totals"]
    cap = ("no over-read cap" if rr["max_overread"] >= NO_RATIO_CAP
           else f"a {rr['max_overread']:g}x over-read cap")
    w(f"\nrange reader (RangeFileSystemReader): {_human(rt['bytes_read'])} read in "
      f"{rt['read_calls']} read calls for {_human(t['useful_bytes'])} useful "
      f"(over-read {_human(rt['over_read'])}); byte ranges per item coalesced across gaps up to "
      f"{_human(rr['max_gap'])} under {cap}, plus the archive records of each file's items in "
      "merged windows; a narrow box whose item is read through anyway reads it whole in one call\n")
    if rr["strides"] == "stored":
        w(f"strides: read from the torch.save records of {rr['chunks_located']} saved chunks\n")
    else:
        w(f"strides: checkpoint files absent or unreadable for {rr['chunks_assumed_contiguous']} saved "
          "chunks: their figures assume contiguous (C-order) storage\n")
    if rr["boxes_estimated"]:
        w(f"({rr['boxes_estimated']} boxes of more than a million runs counted without coalescing)\n")
    st = sh["totals"]
    w(f"\nshared reads (SharedRangeFileSystemReader): {_human(st['bytes_read'])} read from storage "
      f"in total, {_human(st['bytes_sent'])} exchanged; {_n(sh['pieces'], 'piece')} in "
      f"{_n(sh['exchange_rounds'], 'round')} of at most {_human(sh['exchange_bytes'])} per rank"
      + _hosts_text(sh["ranks_per_host"], result["world_size"]) + "\n")
    groups = sorted(sh["groups"], key=lambda g: (-g["torch_bytes_read"], g["ranks"]))
    shown = groups[:8]
    rows = [[_ranks_text(g["ranks"]), _human(g["torch_bytes_read"]), _human(g["range_bytes_read"]),
             _human(g["shared_bytes_read"])] for g in shown]
    w("\n".join(_table(rows, ["replica group", "torch read", "range read", "shared read"],
                       right=(1, 2, 3))) + "\n")
    if len(shown) < len(groups):
        w(f"... {len(groups) - len(shown)} lighter replica groups not shown (--json lists all)\n")


def _hosts_text(per_host: int, world: int) -> str:
    if per_host >= world > 1:
        return f"; all {world} ranks on one host: each reads its own, nothing exchanged"
    if per_host > 1:
        return f"; {per_host} ranks per host, exchanging only across hosts"
    return ""


def _ranks_text(ranks: list[int]) -> str:
    text = ",".join(str(r) for r in ranks[:8])
    return text + (f",... ({len(ranks)} ranks)" if len(ranks) > 8 else "")


def _print_demo(result: dict[str, Any], out: IO[str], top: int) -> None:
    w = out.write
    w(f"model: {result['model']}\n")
    w(f"save:  {result['save']}\n")
    w(f"load:  {result['load']}\n")
    w(f"work:  {result['write_items']} write items saved, {result['read_items']} read items loaded\n\n")
    torch_label = f"torch {result['torch_version']}" if result["torch_version"] else "torch"
    rows = []
    for step, row in result["timings_s"].items():
        ck, tt = row["ckcore"], row["torch"]
        rows.append([
            step,
            f"{ck * 1e3:.1f} ms",
            f"{tt * 1e3:.1f} ms" if tt is not None else ("n/a" if result["torch_version"] else "-"),
            f"{tt / ck:.1f}x" if tt is not None and ck > 0 else "",
        ])
    w("\n".join(_table(rows, ["step", "ckcore", torch_label, "speed-up"], right=(1, 2, 3))) + "\n")
    if not result["torch_version"]:
        w("(torch not timed: not installed, or --no-torch)\n")
    tb = result.get("traffic_bytes_per_rank") or {}
    if tb.get("ckcore") is not None:
        torch_b = f", torch's pickled SavePlan {tb['torch'] / 1e3:.1f} kB" if tb.get("torch") else ""
        w(f"plan traffic: one rank's local save plan is {tb['ckcore'] / 1e3:.1f} kB packed{torch_b}\n")
    w("\n")
    _print_plan(result["plan"], out, top)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def _max_findings(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 (0: no limit), got {text[:40]!r}")
    return n


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``ckcore: error: ...`` and exit status 2, like every error."""

    def error(self, message: str) -> NoReturn:
        # argparse prints the usage block and exits itself; the command's
        # contract is one error line, which main() writes.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="ckcore",
        description="Inspect, validate and plan PyTorch Distributed Checkpoints (DCP) without torch.",
        epilog="Exit status: 0 ok, 1 validate found problems, 2 any error (bad arguments, an "
               "unreadable, unsafe or corrupted checkpoint, ...), written as one line on stderr; "
               "CKCORE_DEBUG=1 re-raises errors with their traceback.",
    )
    p.add_argument("--version", action="version", version=f"ckcore {__version__}",
                   help="print the version (ckcore X.Y.Z) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sp.add_argument("--progress", action="store_true",
                        help="show progress on stderr even when it is not a terminal")

    sp = sub.add_parser("inspect", help="what a checkpoint holds: tensors, chunks, bytes, files")
    sp.add_argument("path", help="checkpoint directory (or its .metadata file)")
    common(sp)

    sp = sub.add_parser(
        "validate", help="overlaps, bounds, coverage and storage checks; exit 0 only when sound")
    sp.add_argument("path", help="checkpoint directory (or its .metadata file)")
    sp.add_argument("--max-findings", type=_max_findings, default=DEFAULT_MAX_FINDINGS, metavar="N",
                    help=f"show the first N findings of each kind and count the rest "
                         f"(default {DEFAULT_MAX_FINDINGS}; 0: show all)")
    common(sp)

    sp = sub.add_parser(
        "plan", help="every rank's reads to load the checkpoint at a target layout",
        description="The resharding what-if: for a target layout, every rank's reads "
                    "(bytes, files, read calls after coalescing, over-read), heaviest first: "
                    "torch's FileSystemReader (whole storage items), ckcore's "
                    "RangeFileSystemReader (byte ranges; strides from the files' torch.save "
                    "records, contiguous storage assumed when the files are absent) and "
                    "SharedRangeFileSystemReader (storage bytes per replica group). "
                    "Either --mesh with --layout rules, or --world-size with --shard-dim.",
        epilog="Placements: S(d) shard tensor dim d, R replicate, P partial (as R), "
               "_S(d,k) FSDP2's strided shard with split factor k. Examples:\n"
               "  ckcore plan CKPT --world-size 8\n"
               "  ckcore plan CKPT --mesh 8x8 --layout '*norm*=S(0),R' "
               "--layout '*.wo.weight=S(0),S(1)' --layout '*=_S(0,8),S(0)'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("path", help="checkpoint directory (or its .metadata file)")
    sp.add_argument("--mesh", help="target mesh shape, e.g. 8,8 or 8x8 (rank k = k-th row-major coordinate)")
    sp.add_argument(
        "--layout", action="append", default=[], metavar="PATTERN=PLACEMENTS",
        help="placements for fqns matching an fnmatch PATTERN, one per mesh dim, e.g. "
             "'*.wq.weight=S(0),S(1)'; repeatable, first match wins; bare PLACEMENTS means '*'")
    sp.add_argument("--world-size", type=int, help="simple form: a 1-d mesh of N ranks")
    sp.add_argument("--shard-dim", type=int, default=0,
                    help="simple form: the tensor dim to shard (tensors with fewer dims are replicated)")
    sp.add_argument("--top", type=int, default=0, help="show only the N heaviest ranks (0: all)")
    sp.add_argument("--ranks-per-host", type=int, default=1, metavar="N",
                    help="for shared reads: ranks 0..N-1 on the first host, and so on, the last "
                         "host taking what is left (ranks of a host read through its page cache "
                         "and do not exchange; default 1)")
    common(sp)

    sp = sub.add_parser(
        "demo", help="plan a 70B-class model: save at FSDP-64, load at FSDP-8 x TP-8; time ckcore vs torch")
    sp.add_argument("--layers", type=int, default=80, help="transformer layers (default 80)")
    sp.add_argument("--save-fsdp", type=int, default=64, help="saving world size (FSDP, default 64)")
    sp.add_argument("--load-fsdp", type=int, default=8, help="loading FSDP degree (default 8)")
    sp.add_argument("--load-tp", type=int, default=8, help="loading TP degree (default 8)")
    sp.add_argument("--repeat", type=int, default=1, help="time each step N times, keep the best")
    sp.add_argument("--no-torch", action="store_true", help="do not time torch even if installed")
    sp.add_argument("--top", type=int, default=8, help="ranks shown in the plan table (0: all)")
    common(sp)
    return p


def _cmd_inspect(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    result = report.inspect_checkpoint(open_checkpoint(args.path))
    if args.json:
        json.dump(result, out, indent=1)
        out.write("\n")
    else:
        _print_inspect(result, out)
    return 0


def _cmd_validate(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    ck = open_checkpoint(args.path)
    findings = report.validate_checkpoint(ck, Progress(err, args.progress), max_findings=args.max_findings)
    if args.json:
        json.dump({"path": str(ck.dir), "ok": findings.ok, **findings.as_json()}, out, indent=1)
        out.write("\n")
    elif not findings.ok:
        for line in findings.lines():
            out.write(line + "\n")
        at_least = "" if findings.exact else "at least "
        err.write(f"ckcore: {ck.dir}: {at_least}{findings.total:,} problem(s)\n")
    else:
        md = ck.metadata
        tensors = [t for t in md.state_dict_metadata.values() if type(t) is TensorStorageMetadata]
        n_t = len(tensors)
        n_c = sum(len(t.chunks) for t in tensors)
        out.write(f"ok: {ck.dir}: {_n(n_t, 'tensor')}, {_n(n_c, 'chunk')}, "
                  f"{_n(len(md.state_dict_metadata) - n_t, 'bytes item')}, {_n(len(ck.files), 'file')}: "
                  "no overlaps, in bounds, fully covered, storage complete\n")
    return 0 if findings.ok else 1


def _cmd_plan(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from .layout import parse_mesh_shape

    if args.world_size is not None and (args.mesh or args.layout):
        raise UsageError("give either --world-size (and --shard-dim) or --mesh and --layout, not both")
    if args.world_size is None and (args.mesh is None or not args.layout):
        raise UsageError("give a target layout: --mesh and --layout, or --world-size (and --shard-dim)")
    rules = report.parse_layout_rules(args.layout)
    mesh = None
    if args.mesh is not None:
        try:
            mesh = parse_mesh_shape(args.mesh)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--mesh: {exc}") from None
        for pattern, placements in rules:
            if len(placements) != len(mesh):
                raise UsageError(
                    f"--layout for {pattern!r} has {len(placements)} placements but the mesh "
                    f"{format_mesh(mesh)} has {len(mesh)} dims")
    ck = open_checkpoint(args.path)
    mesh_t, layouts = report.resolve_layouts(ck.metadata, mesh=mesh, rules=rules,
                                             world_size=args.world_size, shard_dim=args.shard_dim)
    if args.ranks_per_host < 1:
        raise UsageError("--ranks-per-host must be >= 1")
    result = report.plan_reads(ck, mesh_t, layouts, Progress(err, args.progress), ranges=True,
                               ranks_per_host=args.ranks_per_host)
    if args.json:
        json.dump(result, out, indent=1)
        out.write("\n")
    else:
        _print_plan(result, out, args.top)
    return 0


def _cmd_demo(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    for name in ("layers", "save_fsdp", "load_fsdp", "load_tp", "repeat"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    from .demo import MAX_DEMO_LAYERS, MAX_DEMO_RANKS, run_demo

    # The demo builds Python plan objects for every rank and tensor: keep it a demo.
    if (args.save_fsdp > MAX_DEMO_RANKS or args.load_fsdp * args.load_tp > MAX_DEMO_RANKS
            or args.layers > MAX_DEMO_LAYERS):
        raise UsageError(f"demo sizes are capped at {MAX_DEMO_RANKS} ranks per job and "
                         f"{MAX_DEMO_LAYERS} layers")

    result = run_demo(layers=args.layers, save_fsdp=args.save_fsdp, load_fsdp=args.load_fsdp,
                      load_tp=args.load_tp, use_torch=not args.no_torch, repeat=args.repeat,
                      progress=Progress(err, args.progress))
    if args.json:
        json.dump(result, out, indent=1)
        out.write("\n")
    else:
        _print_demo(result, out, args.top)
    return 0


_COMMANDS = {"inspect": _cmd_inspect, "validate": _cmd_validate, "plan": _cmd_plan, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None) -> int:
    """Run the ``ckcore`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0 ok, 1 ``validate`` found problems, 2 any error: bad arguments, an
    unreadable, unsafe or corrupted checkpoint, out of memory, or a bug in
    ckcore; 130 when interrupted (Ctrl-C). Every error is one
    ``ckcore: error: ...`` line on ``stderr``, never a traceback unless the
    environment sets ``CKCORE_DEBUG=1`` (errors are then re-raised).

    Usable in-process (tests call ``main([...])``): it never calls
    ``sys.exit`` itself. ``stdout``/``stderr`` default to the current
    ``sys.stdout``/``sys.stderr``.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    debug = bool(os.environ.get("CKCORE_DEBUG"))
    parser = _parser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except UsageError as exc:
        err.write(f"ckcore: error: {one_line(exc)}\n")
        return 2
    except SystemExit as exc:  # --help has been printed
        return 0 if exc.code in (0, None) else 2
    try:
        return _COMMANDS[args.command](args, out, err)
    except BrokenPipeError:  # pragma: no cover - `ckcore inspect | head`
        return 0
    except KeyboardInterrupt:
        err.write("ckcore: interrupted\n")
        return 130
    except MemoryError:
        if debug:
            raise
        err.write("ckcore: error: out of memory\n")
        return 2
    except (CheckpointError, UsageError, ValueError, TypeError, OSError) as exc:
        if debug:
            raise
        err.write(f"ckcore: error: {one_line(exc)}\n")
        return 2
    except Exception as exc:  # a bug: still one line, not a traceback
        if debug:
            raise
        err.write(f"ckcore: error: internal error: {type(exc).__name__}: {one_line(exc)} "
                  "(a bug in ckcore; set CKCORE_DEBUG=1 for a traceback)\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
