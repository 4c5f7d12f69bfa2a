"""The ``ckcore`` command: answers about DCP checkpoints on disk, without torch.

A checkpoint is opaque until something reads its ``.metadata``: which tensors
it holds, whether its chunks tile every tensor, whether its files are whole,
and what a resharded load at another layout will cost each rank. Torch can
answer the first three only by loading the checkpoint (which runs pickle
code) and the last one not at all without a process group. This module is
the command line over ckcore's torch-free pieces:

* ``ckcore inspect PATH``   what the checkpoint holds (:func:`inspect_checkpoint`);
* ``ckcore validate PATH``  torch's global-plan checks plus storage checks
  (:func:`validate_checkpoint`); exit status 0 only when sound;
* ``ckcore plan PATH ...``  every rank's reads for a target layout
  (:func:`plan_reads`);
* ``ckcore demo``           a 70B-class model planned for save at one layout
  and load at another, timed for ckcore and (when installed) torch.

Every command takes ``--json`` (the report as one JSON object on stdout) and
``--progress``. The ``.metadata`` is untrusted input: a few kilobytes of
pickle can repeat one chunk object a million times, so everything printed
is bounded. ``validate`` shows the first ``--max-findings N`` findings of
each kind (default 20, 0 for all) and a line counting the rest (``... and
4,498,480 more overlapping chunk pairs``); its ``--json`` lists the same
messages plus each kind's count (``inexact`` names the counts that are lower
bounds). It keeps only the overlapping pairs
it shows, counts pairs up to :data:`PAIR_COUNT_LIMIT` ("at least" past it)
and gives the overlap sweep :data:`SWEEP_BUDGET` comparisons. ``inspect``
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
import fnmatch
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any, NoReturn

import numpy as np

from ._saferepr import saferepr
from .checkpoint import Checkpoint, CheckpointError, StorageInfo
from .dtypes import itemsize
from .metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

__all__ = [
    "COALESCING",
    "DEFAULT_MAX_FINDINGS",
    "FINDING_KINDS",
    "MAX_SHAPE_DIMS",
    "PAIR_COUNT_LIMIT",
    "SWEEP_BUDGET",
    "Findings",
    "inspect_checkpoint",
    "main",
    "parse_layout_rules",
    "plan_reads",
    "resolve_layouts",
    "run_demo",
    "validate_checkpoint",
]

#: How ``plan`` counts read calls. ckcore.ranges (byte ranges inside a stored
#: chunk) is not on main yet, so reads are whole storage items, as torch's
#: FileSystemReader reads them; per rank and file they are sorted by offset
#: and merged when they overlap or touch (no gap is bridged, no cap applies).
COALESCING = "whole storage items, per rank and file sorted by offset, touching/overlapping merged"

_I64_MAX = 2**63 - 1

#: Dims of a shape ``inspect --json`` lists (a longer one is given as ``ndim`` only).
MAX_SHAPE_DIMS = 64

#: Largest target world ``plan`` accepts: its arrays hold a row per rank and
#: tensor dim, so a typo such as ``--world-size 100000000`` would otherwise
#: allocate gigabytes before failing.
MAX_WORLD = 1 << 20


class UsageError(ValueError):
    """Arguments that cannot work together (reported like any input error, exit status 2)."""


# --------------------------------------------------------------------------
# Small helpers: sizes, tables, progress.
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


#: Dims written in full in messages and tables; a longer shape is abbreviated
#: (a crafted ``.metadata`` can give a tensor any number of dims and share
#: that one size tuple between all its tensors and chunks).
_MAX_DIMS_SHOWN = 16

#: Longest fqn or file name written as is; longer ones are abbreviated.
_MAX_NAME = 200


def _shape(t: Any) -> str:
    """A shape as Python writes a tuple: ``()``, ``(5,)``, ``(4, 3)``; bounded for long or odd ones.

    Past :data:`_MAX_DIMS_SHOWN` dims: ``(1, 1, 1, 1, 1, 1, ...<5000 dims>)``.
    """
    if type(t) is list:
        t = tuple(t)
    if type(t) is not tuple:
        return saferepr(t)
    head = t if len(t) <= _MAX_DIMS_SHOWN else t[:6]
    if not all(type(v) is int and -(2**64) < v < 2**64 for v in head):
        return saferepr(t)
    if len(t) <= _MAX_DIMS_SHOWN:
        return str(t)
    return "(" + ", ".join(map(str, head)) + f", ...<{len(t)} dims>)"


def _name(s: Any) -> str:
    """An fqn or file name from the checkpoint, for a message or a table cell.

    As is when it is a short printable str (every real one); otherwise
    :func:`~ckcore._saferepr.saferepr`'s bounded, escaped form, so a
    megabyte fqn or one with a newline cannot flood or split the output.
    """
    if type(s) is str and len(s) <= _MAX_NAME and s.isprintable():
        return s
    return saferepr(s)


def _chunk(c: Any) -> str:
    """A chunk as its ``repr`` writes it (as torch's messages quote it), with bounded shapes."""
    return f"ChunkStorageMetadata(offsets={_shape(getattr(c, 'offsets', None))}, " \
           f"sizes={_shape(getattr(c, 'sizes', None))})"


#: Largest volume :func:`_volume` computes exactly.
_VOLUME_CAP = 2**256


def _volume(values: Sequence[int]) -> int | None:
    """The product of the ints ``values``, or None past 2**256 in magnitude.

    A crafted shape of a million dims makes ``math.prod`` minutes of bignum
    work; no real tensor has 2**256 elements.
    """
    if len(values) > 64:
        if 0 in values:
            return 0
        # Every value other than 1 at least doubles the magnitude.
        if len(values) - values.count(1) > 256:
            return None
    v = math.prod(values)
    return v if -_VOLUME_CAP <= v <= _VOLUME_CAP else None


def _mesh(t: Sequence[int]) -> str:
    """A mesh shape as the command line takes it: ``8x8``."""
    return "x".join(str(int(v)) for v in t)


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


@contextlib.contextmanager
def _quiet_validation_logger() -> Iterator[None]:
    # validate_global_plan logs every finding as a warning (as torch does);
    # with no logging configured Python prints those to stderr through
    # logging.lastResort, duplicating the CLI's own report.
    log = logging.getLogger("ckcore.global_plan")
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was


def open_checkpoint(path: str) -> Checkpoint:
    """A :class:`~ckcore.checkpoint.Checkpoint`; a missing path is a CheckpointError naming it."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    return Checkpoint(path)


def _tensor_items(md: Metadata) -> Iterator[tuple[str, TensorStorageMetadata]]:
    for fqn, item in md.state_dict_metadata.items():
        if type(item) is TensorStorageMetadata:
            yield fqn, item


def _tensor_nbytes(fqn: str, item: TensorStorageMetadata) -> int:
    """Exact bytes of the whole tensor; refuses sizes whose byte count leaves int64."""
    vol = _volume(item.size)
    n = None if vol is None else vol * itemsize(item.properties.dtype)
    if n is None or n > _I64_MAX:
        raise CheckpointError(
            f"{_name(fqn)}: tensor of size {_shape(item.size)} has more bytes than int64 holds")
    return n


def _record(info: Any) -> StorageInfo | None:
    """A storage entry if it is a FileSystemWriter record, else None.

    The reader keeps other values (a custom writer's records, or anything a
    crafted file puts there); their fields cannot be trusted to exist.
    """
    return info if type(info) is StorageInfo else None


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------


def inspect_checkpoint(ck: Checkpoint) -> dict[str, Any]:
    """What a checkpoint holds, as plain data (the ``--json`` form of ``ckcore inspect``).

    ``tensors``: per fqn its dtype, global ``shape`` (None past
    :data:`MAX_SHAPE_DIMS` dims), ``ndim``, ``chunks`` (count), ``bytes`` (the
    tensor's logical size, numel x itemsize) and ``stored_bytes`` (sum of its
    storage entries, which include serialization overhead; None when an entry
    is missing or not a FileSystemWriter record). ``bytes_items``: per fqn its
    stored bytes. ``files``: per data file its size on disk (None when
    missing) and the number of items stored in it. ``totals`` sums them.

    Its size is proportional to the ``.metadata`` file's: a row per tensor,
    bytes item and file, each of bounded size.
    """
    md = ck.metadata
    storage = ck.storage
    tensors: dict[str, Any] = {}
    bytes_items: dict[str, Any] = {}
    items_per_file: dict[str, int] = {}
    for info in storage.values():
        if _record(info) is not None:
            items_per_file[info.relative_path] = items_per_file.get(info.relative_path, 0) + 1
    n_chunks = 0
    for fqn, item in md.state_dict_metadata.items():
        if type(item) is TensorStorageMetadata:
            stored: int | None = 0
            for c in item.chunks:
                info = _record(storage.get(MetadataIndex(fqn, c.offsets)))
                if info is None or stored is None:
                    stored = None
                else:
                    stored += info.length
            n_chunks += len(item.chunks)
            ndim = len(item.size)
            tensors[fqn] = {
                "dtype": item.properties.dtype,
                # One size tuple may be shared by every tensor of a crafted
                # file: listing a million dims per tensor would multiply it.
                "shape": list(item.size) if ndim <= MAX_SHAPE_DIMS else None,
                "ndim": ndim,
                "chunks": len(item.chunks),
                "bytes": _tensor_nbytes(fqn, item),
                "stored_bytes": stored,
            }
        else:
            info = _record(storage.get(MetadataIndex(fqn)))
            bytes_items[fqn] = {"stored_bytes": None if info is None else info.length}
    files = {
        rp: {"size": size, "items": items_per_file.get(rp, 0)} for rp, size in sorted(ck.files.items())
    }
    return {
        "path": str(ck.dir),
        "metadata_file": str(ck.metadata_path),
        "version": md.version,
        "tensors": tensors,
        "bytes_items": bytes_items,
        "files": files,
        "totals": {
            "tensors": len(tensors),
            "chunks": n_chunks,
            "tensor_bytes": sum(t["bytes"] for t in tensors.values()),
            "bytes_items": len(bytes_items),
            "files": len(files),
            "file_bytes": sum(f["size"] or 0 for f in files.values()),
            "missing_files": sum(1 for f in files.values() if f["size"] is None),
        },
    }


def _print_inspect(report: dict[str, Any], out: IO[str]) -> None:
    t = report["totals"]
    w = out.write
    version = _name(report["version"]) if report["version"] else "unknown"
    w(f"checkpoint {report['path']}  (DCP metadata version {version})\n")
    if report["tensors"]:
        rows = [
            [_name(fqn), v["dtype"],
             _shape(v["shape"]) if v["shape"] is not None else f"(...<{v['ndim']} dims>)",
             str(v["chunks"]), _human(v["bytes"]), _human(v["stored_bytes"])]
            for fqn, v in report["tensors"].items()
        ]
        w("\n" + "\n".join(_table(rows, ["tensor", "dtype", "shape", "chunks", "bytes", "stored"],
                                    right=(3, 4, 5))) + "\n")
    if report["bytes_items"]:
        rows = [[_name(fqn), _human(v["stored_bytes"])] for fqn, v in report["bytes_items"].items()]
        w("\n" + "\n".join(_table(rows, ["bytes item", "stored"], right=(1,))) + "\n")
    if report["files"]:
        rows = [[_name(rp), _human(v["size"]) if v["size"] is not None else "MISSING", str(v["items"])]
                for rp, v in report["files"].items()]
        w("\n" + "\n".join(_table(rows, ["file", "size", "items"], right=(1, 2))) + "\n")
    missing = f", {t['missing_files']} missing" if t["missing_files"] else ""
    w(
        f"\ntotal: {_n(t['tensors'], 'tensor')} in {_n(t['chunks'], 'chunk')} ({_human(t['tensor_bytes'])}), "
        f"{_n(t['bytes_items'], 'bytes item')}, {_n(t['files'], 'file')} ({_human(t['file_bytes'])}{missing})\n"
    )


# --------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------

#: Findings of each kind ``validate`` shows by default (``--max-findings``).
DEFAULT_MAX_FINDINGS = 20

#: Overlapping chunk pairs counted, over the whole checkpoint, before the
#: count becomes "at least": a few kilobytes of crafted ``.metadata`` hold
#: billions of pairs, and counting them can take as long as listing them
#: (identical chunks are the exception: they are counted exactly, for free).
PAIR_COUNT_LIMIT = 10_000_000

#: Chunk comparisons the overlap sweep may make over the whole checkpoint
#: (about a second). Only layouts that no dimension can split need the sweep,
#: and none of DCP's do; a crafted one can need n^2 comparisons without a
#: single overlap. A tensor whose check runs out is a finding of its own.
SWEEP_BUDGET = 500_000_000

#: Every kind of finding, in report order: id (the ``--json`` key) -> what a
#: count of them is called in "... and N more ...".
FINDING_KINDS = {
    "unvalidatable": "tensors that cannot be validated",
    "out_of_bounds": "out-of-bounds chunks",
    "overlapping_chunks": "overlapping chunk pairs",
    "overlap_check_stopped": "tensors whose overlap check stopped",
    "invalid_fill": "tensors whose chunks do not fill them",
    "missing_storage_entry": "items without a storage entry",
    "unknown_storage_entry": "storage entries naming no item",
    "foreign_storage_entry": "storage entries that are not FileSystemWriter records",
    "path_outside": "storage entries naming a file outside the checkpoint",
    "missing_file": "storage entries in missing files",
    "beyond_file_end": "storage entries beyond the end of their file",
    "overlapping_storage": "storage entries sharing bytes with another",
    "short_storage": "chunks whose storage entry is shorter than their raw bytes",
}


class Findings:
    """What ``validate`` found, by kind: the first ``limit`` messages of each, and counts.

    ``limit`` <= 0 keeps every message. Checks call :meth:`add` for each
    finding and write its message (:meth:`keep`) only when ``add`` asks for
    it, so a million findings cost a million counts, not a million strings. ``counts`` maps each kind found to its number;
    ``inexact`` holds the kinds whose count is a lower bound (counting
    stopped, see :data:`PAIR_COUNT_LIMIT`).
    """

    def __init__(self, limit: int = DEFAULT_MAX_FINDINGS) -> None:
        """Keep the first ``limit`` messages of each kind (every message when ``limit`` <= 0)."""
        self.limit = limit
        self.shown: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.inexact: set[str] = set()

    def room(self, kind: str) -> int:
        """How many more messages of ``kind`` would be kept (-1: no limit)."""
        if self.limit <= 0:
            return -1
        return max(0, self.limit - len(self.shown.get(kind, ())))

    def add(self, kind: str) -> bool:
        """Count one finding of ``kind``; True when its message is to be kept (see :meth:`keep`)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return self.room(kind) != 0

    def keep(self, kind: str, message: str) -> None:
        """Keep the message of a finding :meth:`add` counted and wanted."""
        self.shown.setdefault(kind, []).append(message)

    def add_many(self, kind: str, messages: Sequence[str], count: int, exact: bool = True) -> None:
        """Record ``count`` findings of ``kind`` (a lower bound unless ``exact``), ``messages`` the kept ones."""
        if count <= 0 and exact:
            return
        self.counts[kind] = self.counts.get(kind, 0) + count
        room = self.room(kind)
        kept = list(messages) if room < 0 else list(messages[:room])
        if kept:
            self.shown.setdefault(kind, []).extend(kept)
        if not exact:
            self.inexact.add(kind)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.counts

    @property
    def total(self) -> int:
        """Number of findings (a lower bound unless :attr:`exact`)."""
        return sum(self.counts.values())

    @property
    def exact(self) -> bool:
        """Whether every count is exact."""
        return not self.inexact

    @property
    def messages(self) -> list[str]:
        """The kept messages, kind by kind in :data:`FINDING_KINDS` order."""
        return [m for kind in FINDING_KINDS for m in self.shown.get(kind, ())]

    def lines(self) -> Iterator[str]:
        """The text report: each kind's kept messages, then a line counting the rest."""
        for kind, label in FINDING_KINDS.items():
            count = self.counts.get(kind)
            if count is None:
                continue
            shown = self.shown.get(kind, [])
            yield from shown
            rest = count - len(shown)
            if kind in self.inexact:
                yield (f"... and at least {rest:,} more {label} "
                       f"(counting stopped at {count:,})")
            elif rest > 0:
                yield f"... and {rest:,} more {label} (--max-findings 0 shows all)"

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` fields: ``problems`` (kept messages), ``counts``, ``inexact``, ``total``."""
        return {
            "problems": self.messages,
            "counts": {k: self.counts[k] for k in FINDING_KINDS if k in self.counts},
            "inexact": [k for k in FINDING_KINDS if k in self.inexact],
            "total": self.total,
            "max_findings": self.limit,
        }


def validate_checkpoint(ck: Checkpoint, progress: Progress | None = None, *,
                        max_findings: int = DEFAULT_MAX_FINDINGS) -> Findings:
    """Every problem of a checkpoint on disk, as :class:`Findings`; ``ok`` when it is sound.

    Global checks are torch's ``_validate_global_plan``'s, with its messages
    (quoting bounded shapes and names): out-of-bounds chunks, overlapping
    chunk pairs (torch's predicate), and "invalid fill" (chunk volumes not
    summing to the tensor's). torch checks the fill only when more than one
    rank saved; a checkpoint on disk is checked always, since a gap means
    unreadable elements whoever wrote it. Storage checks: every chunk and
    bytes item has a storage entry, every entry is a FileSystemWriter record
    whose file exists inside the checkpoint and holds its byte range, no
    entry names an unknown item, no two entries share bytes of a file, and
    (when no stream transform was applied) no tensor chunk's entry is
    shorter than the chunk's raw bytes.

    Bounded for crafted input: each kind keeps its first ``max_findings``
    messages (all when <= 0) and counts the rest; overlapping pairs are
    counted up to :data:`PAIR_COUNT_LIMIT` (all when ``max_findings`` <= 0),
    and the overlap sweep makes at most :data:`SWEEP_BUDGET` comparisons.
    """
    f = Findings(max_findings)
    md = ck.metadata
    tensors = list(_tensor_items(md))
    if progress:
        progress.start("validating", len(tensors))
    budget = {"pairs": PAIR_COUNT_LIMIT if max_findings > 0 else -1, "sweep": SWEEP_BUDGET}
    for done, (fqn, item) in enumerate(tensors, 1):
        _validate_tensor(fqn, item, f, budget)
        if progress:
            progress.update(done)
    if progress:
        progress.done()
    _storage_findings(ck, f)
    _overlapping_storage(ck, f)
    _short_storage(ck, f)
    return f


def _validate_tensor(fqn: str, item: TensorStorageMetadata, f: Findings,
                     budget: dict[str, int]) -> None:
    """torch's global checks of one tensor into ``f``; ``budget`` is what the run has left."""
    from ._kernels._validate import _check_tensor_bounded, chunk_rows
    from .global_plan import _torch_order

    size = item.size
    ndim = len(size)
    if ndim == 0:  # torch skips 0-d tensors
        return
    chunks = item.chunks
    if not isinstance(chunks, list):
        chunks = list(chunks)
    try:
        tsize = np.array(size, dtype=np.int64)
        # Raises for chunks the kernel cannot check (wrong number of dims,
        # offset + size past int64); the other tensors are still checked.
        offs, sizes = chunk_rows(fqn, chunks, ndim)
    except (TypeError, ValueError, OverflowError) as exc:
        why = _one_line(exc)
        if f.add("unvalidatable"):
            f.keep("unvalidatable", f"key:{_name(fqn)} cannot be validated: {why}")
        return
    keep = f.room("overlapping_chunks")
    stop = max(1, budget["pairs"]) if budget["pairs"] >= 0 else -1
    oob, volume, pairs, found, complete, exhausted, spent = _check_tensor_bounded(
        offs, sizes, tsize, keep, stop, max(0, budget["sweep"]))
    budget["sweep"] -= spent
    if budget["pairs"] >= 0:
        budget["pairs"] = budget["pairs"] - found if complete else 0
    room = f.room("out_of_bounds")
    shape = _shape(size)
    f.add_many("out_of_bounds", [
        f"key:{_name(fqn)} has out of bounds chunk: tensor-size:{shape} chunk: {_chunk(chunks[i])}"
        for i in (oob if room < 0 else oob[:room]).tolist()
    ], len(oob))
    if found:
        shown = []
        if len(pairs):
            cur, oth = _torch_order(offs, sizes, size, pairs)
            shown = [f"key:{_name(fqn)} has overlapping chunks: {_chunk(chunks[i])} {_chunk(chunks[j])}"
                     for i, j in zip(cur.tolist(), oth.tolist())]
        f.add_many("overlapping_chunks", shown, found, exact=complete)
    if exhausted and f.add("overlap_check_stopped"):
        f.keep("overlap_check_stopped", (
            f"key:{_name(fqn)} overlap check stopped: its {len(chunks):,} chunks need more than "
            f"{SWEEP_BUDGET:,} comparisons for the whole checkpoint (no DCP layout does)"))
    tensor_volume = _volume(size)
    if volume is None:
        # Some chunk's volume passes int64: exact Python ints.
        vols = [_volume(c.sizes) for c in chunks]
        volume = None if None in vols else sum(vols)
        if volume is None or tensor_volume is None:
            if f.add("unvalidatable"):
                f.keep("unvalidatable", (
                    f"key:{_name(fqn)} cannot be validated: a volume passes 2**256 elements"))
            return
    if tensor_volume != volume and f.add("invalid_fill"):
        f.keep("invalid_fill", (
            f"key:{_name(fqn)} invalid fill tensor-volume: "
            f"{'more than 2**256' if tensor_volume is None else tensor_volume} chunks-volume: {volume}"))


def _storage_findings(ck: Checkpoint, f: Findings) -> None:
    """Storage entries against items and files (what ``Checkpoint.problems`` checks), into ``f``.

    Every tensor chunk and bytes item needs a storage entry, every entry an
    item, a FileSystemWriter record, a file inside the checkpoint directory
    that exists and holds ``[offset, offset + length)``.
    """
    from .checkpoint import _escapes

    storage = ck.storage
    expected: set[MetadataIndex] = set()
    for fqn, item in ck.metadata.state_dict_metadata.items():
        if type(item) is TensorStorageMetadata:
            for i, c in enumerate(item.chunks):
                key = MetadataIndex(fqn, c.offsets)
                expected.add(key)
                if key not in storage and f.add("missing_storage_entry"):
                    f.keep("missing_storage_entry", (
                        f"{_name(fqn)}: chunk {i} at offsets {_shape(c.offsets)} has no storage entry"))
        else:
            key = MetadataIndex(fqn)
            expected.add(key)
            if key not in storage and f.add("missing_storage_entry"):
                f.keep("missing_storage_entry", f"{_name(fqn)}: bytes item has no storage entry")
    for key, info in storage.items():
        if key not in expected and f.add("unknown_storage_entry"):
            f.keep("unknown_storage_entry", (
                f"storage entry {_index(key)} names no item in state_dict_metadata"))
        if type(info) is not StorageInfo:
            if f.add("foreign_storage_entry"):
                f.keep("foreign_storage_entry", (
                    f"storage entry {_index(key)} is a {_name(type(info).__name__)}, "
                    "not a FileSystemWriter record"))
            continue
        rp = info.relative_path
        if _escapes(rp):
            if f.add("path_outside"):
                f.keep("path_outside", (
                    f"{_name(key.fqn)}: file {_name(rp)} lies outside the checkpoint directory"))
            continue
        size = ck.files.get(rp)
        if size is None:
            if f.add("missing_file"):
                f.keep("missing_file", f"{_name(key.fqn)}: file {_name(rp)} is missing")
        elif info.offset + info.length > size and f.add("beyond_file_end"):
            f.keep("beyond_file_end", (
                f"{_name(key.fqn)}: bytes [{info.offset}, {info.offset + info.length}) "
                f"lie beyond the end of {_name(rp)} ({size} bytes)"))


def _index(key: Any) -> str:
    """A storage key for a message: its fqn and, for a chunk, its offsets."""
    fqn, offset = getattr(key, "fqn", None), getattr(key, "offset", None)
    return _name(fqn) if offset is None else f"{_name(fqn)} at offsets {_shape(offset)}"


def _overlapping_storage(ck: Checkpoint, f: Findings) -> None:
    """Storage entries whose byte ranges overlap in one file, into ``f``.

    FileSystemWriter writes every item once, back to back, so two entries
    sharing bytes mean the metadata and the files do not belong together
    (or the metadata was edited). Empty entries hold no bytes and are skipped.
    """
    by_file: dict[str, list[tuple[int, int, Any]]] = {}
    for key, info in ck.storage.items():
        if type(info) is StorageInfo and info.length > 0:
            by_file.setdefault(info.relative_path, []).append(
                (info.offset, info.offset + info.length, key))
    for rp, entries in sorted(by_file.items()):
        entries.sort(key=lambda e: (e[0], e[1]))
        reach_end, reach_key = -1, None
        for start, end, key in entries:
            if start < reach_end and f.add("overlapping_storage"):
                f.keep("overlapping_storage", (
                    f"{_name(key.fqn)}: bytes [{start}, {end}) of {_name(rp)} overlap those of "
                    f"{_name(reach_key.fqn)} (up to byte {reach_end})"))
            if end > reach_end:
                reach_end, reach_key = end, key


def _short_storage(ck: Checkpoint, f: Findings) -> None:
    """Tensor chunks whose storage entry holds fewer bytes than the chunk's raw bytes, into ``f``.

    Skipped for entries written through a stream transform (compression).
    """
    for fqn, item in _tensor_items(ck.metadata):
        size = itemsize(item.properties.dtype)
        for i, c in enumerate(item.chunks):
            info = ck.storage.get(MetadataIndex(fqn, c.offsets))
            if type(info) is not StorageInfo or info.transform_descriptors:
                continue
            vol = _volume(c.sizes)
            raw = None if vol is None else vol * size
            if raw is None or info.length < raw and f.add("short_storage"):
                f.keep("short_storage", (
                    f"{_name(fqn)}: chunk {i} at offsets {_shape(c.offsets)} needs "
                    f"{'more than 2**256' if raw is None else raw} bytes but its storage entry in "
                    f"{_name(info.relative_path)} holds {info.length}"))


# --------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------


def parse_layout_rules(specs: Sequence[str]) -> list[tuple[str, tuple[Any, ...]]]:
    """Parse ``--layout`` values ``PATTERN=PLACEMENTS`` (or bare ``PLACEMENTS`` for ``*``).

    The pattern is an fnmatch pattern over fqns, split from the placements at
    the first ``=``; placements are :func:`ckcore.layout.parse_placements`
    strings, one per mesh dim. The first rule whose pattern matches an fqn
    applies to it.

    >>> parse_layout_rules(["*.wq.weight=S(0),S(1)", "R,R"])[1]
    ('*', (Replicate(), Replicate()))
    """
    from .layout import parse_placements

    rules = []
    for spec in specs:
        pattern, sep, text = spec.partition("=")
        if not sep or "(" in pattern:  # "Shard(dim=0),R": no pattern, '=' belongs to the placement
            pattern, text = "*", spec
        pattern = pattern.strip()
        if not pattern:
            raise UsageError(f"--layout {spec!r}: empty fqn pattern before '='")
        try:
            rules.append((pattern, parse_placements(text)))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--layout {spec!r}: {exc}") from None
    return rules


def resolve_layouts(
    md: Metadata,
    *,
    mesh: Sequence[int] | None = None,
    rules: Sequence[tuple[str, tuple[Any, ...]]] = (),
    world_size: int | None = None,
    shard_dim: int = 0,
) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]]:
    """The target layout of every tensor: ``(mesh, {fqn: (global shape, placements)})``.

    Either ``mesh`` and ``rules`` (see :func:`parse_layout_rules`; every
    tensor must match a rule), or ``world_size`` and ``shard_dim``: a 1-d mesh
    of ``world_size`` ranks, each tensor sharded on ``shard_dim`` (negative
    counts from the end) when it has that dim, replicated when it has fewer
    dims (scalars, norms when ``shard_dim=1``), as FSDP does.
    """
    from .layout import Replicate, Shard

    tensors = dict(_tensor_items(md))
    out: dict[str, tuple[tuple[int, ...], tuple[Any, ...]]] = {}
    if world_size is not None:
        if world_size < 1:
            raise UsageError(f"--world-size must be >= 1, got {world_size}")
        for fqn, item in tensors.items():
            ndim = len(item.size)
            ok = -ndim <= shard_dim < ndim
            out[fqn] = (tuple(item.size), (Shard(shard_dim),) if ok else (Replicate(),))
        return (world_size,), out
    if mesh is None or not rules:
        raise UsageError("give a target layout: --mesh and --layout, or --world-size (and --shard-dim)")
    for fqn, item in tensors.items():
        for pattern, placements in rules:
            if fnmatch.fnmatchcase(fqn, pattern):
                out[fqn] = (tuple(item.size), placements)
                break
        else:
            raise UsageError(f"{_name(fqn)}: no --layout pattern matches it; add a catch-all such as '*=R'")
    return tuple(mesh), out


def _check_byte_totals(ck: Checkpoint) -> None:
    """Refuse metadata whose byte counts could overflow plan's int64 sums.

    A rank reads at most every storage entry once and keeps at most every
    tensor once (plus bytes items), so these two Python-int totals bound
    every per-rank figure; a real checkpoint is far below 2**63 bytes, a
    crafted ``.metadata`` may not be.
    """
    stored = 0
    for key, info in ck.storage.items():
        if _record(info) is None:
            raise CheckpointError(
                f"storage entry {_index(key)} is a {_name(type(info).__name__)}, not a "
                "FileSystemWriter record (run `ckcore validate`)")
        end = info.offset + info.length
        if end > _I64_MAX:
            raise CheckpointError(f"{_name(key.fqn)}: storage entry ends at byte {end}, beyond int64")
        stored += info.length
    kept = sum(_tensor_nbytes(fqn, t) for fqn, t in _tensor_items(ck.metadata)) + stored
    if stored > _I64_MAX or kept > _I64_MAX:
        raise CheckpointError("the checkpoint's byte counts add up to more than int64 holds")


def _storage_table(ck: Checkpoint) -> dict[tuple[str, Any], Any]:
    """``{(fqn, offsets): StorageInfo}``: plain-tuple keys hash much faster than MetadataIndex."""
    return {(k.fqn, k.offset): v for k, v in ck.storage.items()}


def _saved_storage(table: dict[tuple[str, Any], Any], fqn: str, item: TensorStorageMetadata,
                   file_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(file id, offset, length) of every saved chunk of ``fqn``, in chunk order."""
    n = len(item.chunks)
    fid = np.empty(n, dtype=np.int64)
    off = np.empty(n, dtype=np.int64)
    ln = np.empty(n, dtype=np.int64)
    for i, c in enumerate(item.chunks):
        info = table.get((fqn, tuple(c.offsets)))
        if info is None:
            raise CheckpointError(
                f"{_name(fqn)}: chunk {i} at offsets {_shape(c.offsets)} has no storage entry "
                "(run `ckcore validate`)")
        fid[i] = file_ids.setdefault(info.relative_path, len(file_ids))
        off[i] = info.offset
        ln[i] = info.length
    return fid, off, ln


def _check_plannable(fqn: str, offs: np.ndarray, sizes: np.ndarray, size: Sequence[int],
                     budget: list[int]) -> None:
    """Refuse saved chunks that no DCP save writes and that would make the plan unbounded.

    Two chunks at the same offsets (a save stores each chunk once, under its
    offsets) or overlapping chunks: a crafted file repeats one chunk object a
    million times for 2 bytes each, and every rank would read each copy.
    ``budget`` (one-element list) is the overlap sweep's comparisons left.
    """
    from ._kernels._validate import _check_tensor_bounded

    n, ndim = offs.shape
    if n < 2:
        return
    # Two non-empty chunks at the same offsets overlap, which the kernel
    # finds; only empty ones need the sort.
    if ndim == 0 or ((sizes == 0).any() and len(np.unique(offs, axis=0)) < n):
        raise CheckpointError(
            f"{_name(fqn)}: two saved chunks start at the same offsets, which no DCP save "
            "writes (run `ckcore validate`)")
    *_, found, _, exhausted, spent = _check_tensor_bounded(
        offs, sizes, np.array(size, dtype=np.int64), 0, 1, max(0, budget[0]))
    budget[0] -= spent
    if found:
        raise CheckpointError(f"{_name(fqn)}: saved chunks overlap (run `ckcore validate`)")
    if exhausted:
        raise CheckpointError(
            f"{_name(fqn)}: saved chunks too irregular to check for overlaps within "
            f"{SWEEP_BUDGET:,} comparisons, which no DCP layout needs (run `ckcore validate`)")


def _coalesce(rank: np.ndarray, fid: np.ndarray, off: np.ndarray, ln: np.ndarray, world: int):
    """Per rank: coalesced read calls and bytes over (file, offset, length) reads.

    Vectorized: reads are sorted by (rank, file, offset); a read starts a new
    call unless an earlier read of the same (rank, file) reaches its offset.
    The "earlier reads reach" test needs a running max of ends that resets
    per group; ranking every (group, end) pair lexicographically turns it into
    one ``maximum.accumulate`` over integers (group ids never decrease along
    the sort, so the prefix maximum is the current group's largest end).
    """
    calls = np.zeros(world, dtype=np.int64)
    nbytes = np.zeros(world, dtype=np.int64)
    files = np.zeros(world, dtype=np.int64)
    if rank.size == 0:
        return calls, nbytes, files
    order = np.lexsort((off, fid, rank))
    r, f, o = rank[order], fid[order], off[order]
    e = o + ln[order]
    group_start = np.ones(r.size, dtype=bool)
    group_start[1:] = (r[1:] != r[:-1]) | (f[1:] != f[:-1])
    group = np.cumsum(group_start) - 1
    by_end = np.lexsort((e, group))
    key = np.empty(r.size, dtype=np.int64)
    key[by_end] = np.arange(r.size, dtype=np.int64)
    prefix = np.maximum.accumulate(key)
    new_call = group_start.copy()
    prev = by_end[prefix[:-1]]  # position (in sort order) of the best earlier read
    new_call[1:] |= (group[prev] != group[1:]) | (e[prev] < o[1:])
    starts = np.flatnonzero(new_call)
    call_end = np.maximum.reduceat(e, starts)
    np.add.at(calls, r[starts], 1)
    np.add.at(nbytes, r[starts], call_end - o[starts])
    np.add.at(files, r[group_start], 1)
    return calls, nbytes, files


def plan_reads(
    ck: Checkpoint,
    mesh: Sequence[int],
    layouts: Mapping[str, tuple[Sequence[int], Any]],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every rank's reads to load ``ck`` at a target layout (the ``--json`` form of ``ckcore plan``).

    ``layouts`` maps each tensor's fqn to ``(global shape, placements)`` on
    ``mesh`` (see :func:`resolve_layouts`); rank ``k`` sits at the ``k``-th
    row-major mesh coordinate. For each rank: ``read_items`` (DCP's ReadItems,
    one per overlapping local/saved chunk pair, plus one per bytes item, which
    every rank loads), ``useful_bytes`` (the elements it keeps), ``bytes_read``
    and ``read_calls`` after coalescing (see :data:`COALESCING`),
    ``files`` touched and ``over_read`` (= bytes read - useful bytes).
    The per-rank intersection is :func:`ckcore.intersect_chunks` (array form)
    on target chunks from :func:`ckcore.layout.local_shapes_and_offsets`.
    Ranks come heaviest first (bytes read, then rank).

    Refuses (CheckpointError) what no DCP save writes and would make the plan
    unbounded: saved chunks at the same offsets or overlapping, storage
    entries that are not FileSystemWriter records, byte counts past int64.
    """
    from .helpers import chunk_arrays, intersect_chunks
    from .layout import format_placements, local_shapes_and_offsets

    md = ck.metadata
    mesh = tuple(mesh)
    world = math.prod(mesh)
    if not 1 <= world <= MAX_WORLD:
        raise UsageError(f"mesh {_mesh(mesh)} has {world} ranks; ckcore plan handles 1 to {MAX_WORLD}")
    _check_byte_totals(ck)
    file_ids: dict[str, int] = {}
    ranks_l, fid_l, off_l, len_l = [], [], [], []
    items = np.zeros(world, dtype=np.int64)
    useful = np.zeros(world, dtype=np.int64)
    tensors = dict(_tensor_items(md))
    table = _storage_table(ck)
    missing = sorted(set(tensors) - set(layouts))
    if missing:
        raise UsageError(f"{_name(missing[0])}: no target layout given for it")
    sweep_budget = [SWEEP_BUDGET]
    if progress:
        progress.start("planning reads", len(tensors))
    for done, (fqn, item) in enumerate(tensors.items(), 1):
        shape, placements = layouts[fqn]
        elem = itemsize(item.properties.dtype)
        try:
            sizes, offsets = local_shapes_and_offsets(shape, mesh, placements)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"{_name(fqn)}: layout {format_placements(placements)} on mesh {_mesh(mesh)} does "
                f"not fit the tensor {_shape(shape)}: {exc}") from None
        if not item.chunks:
            continue
        saved_chunks = chunk_arrays(item.chunks, _name(fqn), len(shape))
        _check_plannable(fqn, *saved_chunks, item.size, sweep_budget)
        saved = _saved_storage(table, fqn, item, file_ids)
        hits = intersect_chunks((offsets, sizes), saved_chunks, fqn=_name(fqn), ndim=len(shape))
        if len(hits):
            r = hits.local_index
            np.add.at(items, r, 1)
            np.add.at(useful, r, np.prod(hits.lengths, axis=1, dtype=np.int64) * elem)
            ranks_l.append(r)
            s = hits.saved_index
            fid_l.append(saved[0][s])
            off_l.append(saved[1][s])
            len_l.append(saved[2][s])
        if progress:
            progress.update(done)
    if progress:
        progress.done()
    for fqn, item in md.state_dict_metadata.items():
        if type(item) is TensorStorageMetadata:
            continue
        info = ck.storage.get(MetadataIndex(fqn))
        if info is None:
            raise CheckpointError(
                f"{_name(fqn)}: bytes item has no storage entry (run `ckcore validate`)")
        all_ranks = np.arange(world, dtype=np.int64)
        items += 1
        useful += info.length
        ranks_l.append(all_ranks)
        fid_l.append(np.full(world, file_ids.setdefault(info.relative_path, len(file_ids))))
        off_l.append(np.full(world, info.offset, dtype=np.int64))
        len_l.append(np.full(world, info.length, dtype=np.int64))

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)

    # A storage item a rank needs for several chunks appears once per chunk here;
    # coalescing merges the identical ranges, so it is read (and counted) once.
    rank_a, fid_a, off_a, len_a = cat(ranks_l), cat(fid_l), cat(off_l), cat(len_l)
    calls, nbytes, nfiles = _coalesce(rank_a, fid_a, off_a, len_a, world)
    order = sorted(range(world), key=lambda k: (-int(nbytes[k]), k))
    coords = np.stack(np.unravel_index(np.arange(world), mesh), axis=1) if mesh else None
    ranks = [
        {
            "rank": k,
            "coordinate": [int(v) for v in coords[k]] if coords is not None else [],
            "read_items": int(items[k]),
            "files": int(nfiles[k]),
            "read_calls": int(calls[k]),
            "bytes_read": int(nbytes[k]),
            "useful_bytes": int(useful[k]),
            "over_read": int(nbytes[k] - useful[k]),
        }
        for k in order
    ]
    return {
        "path": str(ck.dir),
        "mesh": list(mesh),
        "world_size": world,
        "coalescing": COALESCING,
        "ranks": ranks,
        "totals": {
            # Python ints: world x per-rank bytes may pass int64.
            "read_items": sum(items.tolist()),
            "read_calls": sum(calls.tolist()),
            "bytes_read": sum(nbytes.tolist()),
            "useful_bytes": sum(useful.tolist()),
            "max_bytes_read": int(nbytes.max()) if world else 0,
            "min_bytes_read": int(nbytes.min()) if world else 0,
            "checkpoint_file_bytes": sum(v or 0 for v in ck.files.values()),
        },
    }


def _print_plan(report: dict[str, Any], out: IO[str], top: int) -> None:
    t = report["totals"]
    w = out.write
    w(f"plan: load {report['path']} on mesh {_mesh(report['mesh'])} "
      f"({report['world_size']} ranks)\n")
    w(f"reads coalesced: {report['coalescing']}\n\n")
    ranks = report["ranks"] if top <= 0 else report["ranks"][:top]
    rows = []
    for r in ranks:
        pct = 100.0 * r["over_read"] / r["bytes_read"] if r["bytes_read"] else 0.0
        rows.append([
            str(r["rank"]), _shape(r["coordinate"]), str(r["read_items"]), str(r["files"]),
            str(r["read_calls"]), _human(r["bytes_read"]), _human(r["useful_bytes"]),
            f"{_human(r['over_read'])} ({pct:.0f}%)",
        ])
    header = ["rank", "coord", "items", "files", "calls", "read", "useful", "over-read"]
    w("\n".join(_table(rows, header, right=(2, 3, 4, 5, 6, 7))) + "\n")
    if len(ranks) < len(report["ranks"]):
        w(f"... {len(report['ranks']) - len(ranks)} lighter ranks not shown (--top 0 shows all)\n")
    over = t["bytes_read"] - t["useful_bytes"]
    w(
        f"\ntotal: {t['read_items']} read items, {t['read_calls']} read calls, "
        f"{_human(t['bytes_read'])} read for {_human(t['useful_bytes'])} useful "
        f"(over-read {_human(over)}); per rank {_human(t['min_bytes_read'])} .. "
        f"{_human(t['max_bytes_read'])}; checkpoint files {_human(t['checkpoint_file_bytes'])}\n"
    )


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


class _SyntheticCheckpoint(Checkpoint):
    """A Checkpoint built in memory (metadata + storage), for the demo: no files."""

    def __init__(self, md: Metadata, files: dict[str, int], name: str) -> None:
        self.dir = name  # type: ignore[assignment]
        self.metadata_path = name  # type: ignore[assignment]
        self.metadata = md
        self.storage = md.storage_data
        self.files = files  # type: ignore[assignment]


def _best_of(fn: Any, repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run_demo(
    *,
    layers: int = 80,
    save_fsdp: int = 64,
    load_fsdp: int = 8,
    load_tp: int = 8,
    use_torch: bool = True,
    repeat: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Plan a 70B-class model's save at FSDP-``save_fsdp`` and load at FSDP-``load_fsdp`` x TP-``load_tp``.

    Everything is computed, nothing is downloaded: the shapes come from
    :mod:`ckcore._models` (Llama-2-70B, ``layers`` layers), the save layout
    is FSDP2's ``Shard(0)`` on a 1-d mesh, the load layout FSDP2 x TP as
    torchtitan builds it. Steps, each timed for ckcore and, when torch is
    importable and ``use_torch``, for torch on its own objects:

    1. ``global save plan``: dedup, global plan + metadata, and validation
       over every rank's save plan (DefaultSavePlanner.create_global_plan);
    2. ``load plan, all ranks``: every rank's ReadItems for every tensor
       (create_read_items_for_chunk_list per rank and tensor), and the same
       pairs in ckcore's array form (:func:`ckcore.intersect_chunks`, one
       call per tensor for all ranks), both against torch's ReadItems;
    3. ``ckcore plan``: the same intersection in array form plus per-rank
       coalesced byte counts over the checkpoint's storage, as ``ckcore plan``
       reports them (ckcore only; torch has no equivalent).

    The checkpoint's storage is laid out as FileSystemWriter would (one file
    per saving rank, items back to back), with raw tensor bytes as lengths.
    Returns the timings, the item counts and the plan report.
    """
    from . import _models
    from .global_plan import plan_global_save
    from .helpers import chunk_arrays, create_read_items_for_chunk_list, intersect_chunks
    from .layout import Shard, job_layouts
    from .planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    shapes = _models.llama70b_state_dict_shapes(layers)
    dtype = _models.LLAMA70B_DTYPE
    props = TensorProperties(dtype=dtype)
    save_mesh = (save_fsdp,)
    load_mesh = (load_fsdp, load_tp)
    save_layout = {fqn: (shape, (Shard(0),)) for fqn, shape in shapes.items()}
    load_layout = {fqn: (shape, _models.llama_fsdp_tp_placements(fqn, load_tp))
                   for fqn, shape in shapes.items()}
    n_params = sum(math.prod(s) for s in shapes.values())

    # Inputs: every saving rank's SavePlan, every loading rank's chunk lists.
    save_arrays = job_layouts(save_layout, save_mesh)
    load_arrays = job_layouts(load_layout, load_mesh)
    plans_items: list[list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = [
        [] for _ in range(save_fsdp)]
    for fqn, (sizes, offsets) in save_arrays.items():
        for r, (o, s) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            plans_items[r].append((fqn, tuple(o), tuple(s), shapes[fqn]))
    ck_plans = [
        SavePlan([
            WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(ChunkStorageMetadata(o, s), props, g))
            for fqn, o, s, g in items
        ])
        for items in plans_items
    ]
    load_world = load_fsdp * load_tp
    local_chunks: list[dict[str, list[ChunkStorageMetadata]]] = [{} for _ in range(load_world)]
    for fqn, (sizes, offsets) in load_arrays.items():
        for r, (o, s) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            local_chunks[r][fqn] = [ChunkStorageMetadata(tuple(o), tuple(s))]

    timings: dict[str, dict[str, float | None]] = {}

    def ck_save() -> tuple[list[Any], Metadata, list[str]]:
        with _quiet_validation_logger():
            return plan_global_save(ck_plans)

    if progress:
        progress.start("demo: ckcore", 3)
    t_save, (global_plans, md, errors) = _best_of(ck_save, repeat)
    if errors:  # pragma: no cover - the demo's layouts are sound
        raise RuntimeError(f"demo save plan failed validation: {errors[0]}")
    timings["global save plan"] = {"ckcore": t_save}
    if progress:
        progress.update(1)

    def ck_load() -> int:
        sdm = md.state_dict_metadata
        n = 0
        for rank_chunks in local_chunks:
            for fqn, chunks in rank_chunks.items():
                n += len(create_read_items_for_chunk_list(fqn, sdm[fqn], chunks))
        return n

    t_load, n_read_items = _best_of(ck_load, repeat)
    timings["load plan, all ranks: ReadItems"] = {"ckcore": t_load}

    def ck_load_arrays() -> int:
        # The same pairs as int64 arrays: one call per tensor covers every rank
        # (the local chunks of all ranks are the layout's rows).
        sdm = md.state_dict_metadata
        n = 0
        for fqn, (sizes, offsets) in load_arrays.items():
            saved = chunk_arrays(sdm[fqn].chunks, fqn)
            n += len(intersect_chunks((offsets, sizes), saved, fqn=fqn))
        return n

    t_arrays, n_pairs = _best_of(ck_load_arrays, repeat)
    if n_pairs != n_read_items:  # pragma: no cover - both forms are one kernel
        raise RuntimeError(f"array form found {n_pairs} pairs, item form {n_read_items}")
    timings["load plan, all ranks: arrays"] = {"ckcore": t_arrays}
    if progress:
        progress.update(2)

    # Storage as FileSystemWriter lays it out: rank r's items back to back in __r_0.distcp.
    storage: dict[MetadataIndex, Any] = {}
    files: dict[str, int] = {}
    for r, plan in enumerate(global_plans):
        name = f"__{r}_0.distcp"
        pos = 0
        for wi in plan.items:
            n = math.prod(wi.tensor_data.chunk.sizes) * itemsize(dtype)
            storage[MetadataIndex(wi.index.fqn, wi.index.offset)] = StorageInfo(name, pos, n)
            pos += n
        files[name] = pos
    md.storage_data = storage
    synthetic = _SyntheticCheckpoint(md, files, f"<llama-70b, {layers} layers, FSDP-{save_fsdp}>")
    t_plan, report = _best_of(lambda: plan_reads(synthetic, load_mesh, load_layout), repeat)
    timings["ckcore plan (arrays + coalescing)"] = {"ckcore": t_plan}
    if progress:
        progress.done()

    torch_version = None
    if use_torch:
        try:
            import torch  # noqa: F401  (optional: only to time torch side by side)
        except ImportError:
            use_torch = False
    if use_torch:
        torch_version, t_torch_save, t_torch_load, n_torch = _time_torch(
            plans_items, local_chunks, dtype, repeat, progress)
        if n_torch != n_read_items:  # the comparison is only fair if both did the same work
            raise RuntimeError(f"torch made {n_torch} read items, ckcore {n_read_items}")
        timings["global save plan"]["torch"] = t_torch_save
        # torch has one form (ReadItem objects); both of ckcore's produce the same pairs.
        timings["load plan, all ranks: ReadItems"]["torch"] = t_torch_load
        timings["load plan, all ranks: arrays"]["torch"] = t_torch_load
    for row in timings.values():
        row.setdefault("torch", None)
    return {
        "model": f"Llama-2-70B shapes, {layers} layers, {len(shapes)} tensors, "
                 f"{n_params / 1e9:.1f}e9 params, {dtype}",
        "save": f"FSDP-{save_fsdp}: mesh {_mesh(save_mesh)}, Shard(0) for every tensor",
        "load": f"FSDP-{load_fsdp} x TP-{load_tp}: mesh {_mesh(load_mesh)}, "
                "FSDP2 (_StridedShard over TP) x TP column/row-wise",
        "write_items": sum(len(p.items) for p in ck_plans),
        "read_items": n_read_items,
        "torch_version": torch_version,
        "timings_s": timings,
        "plan": report,
    }


def _time_torch(plans_items: list, local_chunks: list, dtype: str, repeat: int,
                progress: Progress | None) -> tuple[str, float, float, int]:
    """Time torch's own planning functions on torch's objects for the demo's two steps."""
    import warnings

    import torch
    from torch.distributed.checkpoint import default_planner as tdp
    from torch.distributed.checkpoint import metadata as tmd
    from torch.distributed.checkpoint import planner as tpl
    from torch.distributed.checkpoint import planner_helpers as tph
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as t_dedup

    props = tmd.TensorProperties(dtype=getattr(torch, dtype))
    t_plans = [
        tpl.SavePlan([
            tpl.WriteItem(
                index=tmd.MetadataIndex(fqn, torch.Size(o)), type=tpl.WriteItemType.SHARD,
                tensor_data=tpl.TensorWriteData(
                    tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s)), props, torch.Size(g)))
            for fqn, o, s, g in items
        ])
        for items in plans_items
    ]
    t_local = [
        {fqn: [tmd.ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in chunks]
         for fqn, chunks in rank.items()}
        for rank in local_chunks
    ]
    if progress:
        progress.start("demo: torch", 2)

    def save() -> Any:
        deduped = t_dedup(t_plans)
        plans, md = tdp.create_default_global_save_plan(deduped)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = tdp._validate_global_plan(plans, md)
        return md, errors

    t_save, (md, errors) = _best_of(save, repeat)
    if errors:  # pragma: no cover
        raise RuntimeError(f"torch reports the demo save plan invalid: {errors[0]}")
    if progress:
        progress.update(1)
    sdm = md.state_dict_metadata

    def load() -> int:
        n = 0
        for rank in t_local:
            for fqn, chunks in rank.items():
                n += len(tph.create_read_items_for_chunk_list(fqn, sdm[fqn], chunks))
        return n

    t_load, n = _best_of(load, repeat)
    if progress:
        progress.done()
    return torch.__version__, t_save, t_load, n


def _print_demo(report: dict[str, Any], out: IO[str], top: int) -> None:
    w = out.write
    w(f"model: {report['model']}\n")
    w(f"save:  {report['save']}\n")
    w(f"load:  {report['load']}\n")
    w(f"work:  {report['write_items']} write items saved, {report['read_items']} read items loaded\n\n")
    torch_label = f"torch {report['torch_version']}" if report["torch_version"] else "torch"
    rows = []
    for step, row in report["timings_s"].items():
        ck, tt = row["ckcore"], row["torch"]
        rows.append([
            step,
            f"{ck * 1e3:.1f} ms",
            f"{tt * 1e3:.1f} ms" if tt is not None else ("n/a" if report["torch_version"] else "-"),
            f"{tt / ck:.1f}x" if tt is not None and ck > 0 else "",
        ])
    w("\n".join(_table(rows, ["step", "ckcore", torch_label, "speed-up"], right=(1, 2, 3))) + "\n")
    if not report["torch_version"]:
        w("(torch not timed: not installed, or --no-torch)\n")
    w("\n")
    _print_plan(report["plan"], out, top)


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
                    "(bytes, files, read calls after coalescing, over-read), heaviest first. "
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
    report = inspect_checkpoint(open_checkpoint(args.path))
    if args.json:
        json.dump(report, out, indent=1)
        out.write("\n")
    else:
        _print_inspect(report, out)
    return 0


def _cmd_validate(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    ck = open_checkpoint(args.path)
    findings = validate_checkpoint(ck, Progress(err, args.progress), max_findings=args.max_findings)
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
        n_t = sum(1 for _ in _tensor_items(md))
        n_c = sum(len(t.chunks) for _, t in _tensor_items(md))
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
    rules = parse_layout_rules(args.layout)
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
                    f"{_mesh(mesh)} has {len(mesh)} dims")
    ck = open_checkpoint(args.path)
    mesh_t, layouts = resolve_layouts(ck.metadata, mesh=mesh, rules=rules,
                                      world_size=args.world_size, shard_dim=args.shard_dim)
    report = plan_reads(ck, mesh_t, layouts, Progress(err, args.progress))
    if args.json:
        json.dump(report, out, indent=1)
        out.write("\n")
    else:
        _print_plan(report, out, args.top)
    return 0


def _cmd_demo(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    for name in ("layers", "save_fsdp", "load_fsdp", "load_tp", "repeat"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    # The demo builds Python plan objects for every rank and tensor: keep it a demo.
    if args.save_fsdp > 4096 or args.load_fsdp * args.load_tp > 4096 or args.layers > 1000:
        raise UsageError("demo sizes are capped at 4096 ranks per job and 1000 layers")
    report = run_demo(layers=args.layers, save_fsdp=args.save_fsdp, load_fsdp=args.load_fsdp,
                      load_tp=args.load_tp, use_torch=not args.no_torch, repeat=args.repeat,
                      progress=Progress(err, args.progress))
    if args.json:
        json.dump(report, out, indent=1)
        out.write("\n")
    else:
        _print_demo(report, out, args.top)
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
        err.write(f"ckcore: error: {_one_line(exc)}\n")
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
        err.write(f"ckcore: error: {_one_line(exc)}\n")
        return 2
    except Exception as exc:  # a bug: still one line, not a traceback
        if debug:
            raise
        err.write(f"ckcore: error: internal error: {type(exc).__name__}: {_one_line(exc)} "
                  "(a bug in ckcore; set CKCORE_DEBUG=1 for a traceback)\n")
        return 2


#: Longest error line written (a message quoting file content is cut there).
_MAX_ERROR = 1000


def _one_line(exc: BaseException) -> str:
    """An exception's message as one bounded line of printable text.

    Messages quote values from the checkpoint (bounded at the source with
    :func:`~ckcore._saferepr.saferepr`, but not every raiser does): newlines
    would split the error line and control characters reach the terminal.
    """
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a message must never be what fails
        text = ""
    text = " ".join(text[: 4 * _MAX_ERROR].split()) or type(exc).__name__
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


if __name__ == "__main__":
    raise SystemExit(main())
