"""What a DCP checkpoint holds, whether it is sound, and what loading it at another layout reads.

The library behind the ``ckcore`` command (:mod:`ckcore.cli`), torch-free,
returning plain data (dicts, lists, ints and strings, ready for
``json.dump``) and printing nothing:

* :func:`inspect_checkpoint`  tensors, bytes items and files with their sizes;
* :func:`validate_checkpoint` torch's global-plan checks on the saved chunks
  plus :meth:`~ckcore.checkpoint.Checkpoint.iter_problems`' storage checks,
  as bounded :class:`Findings`;
* :func:`plan_reads`          every rank's reads for a target layout, given as
  ``--layout`` rules (:func:`parse_layout_rules`) or resolved from a world
  size (:func:`resolve_layouts`).

Each takes a :class:`~ckcore.checkpoint.Checkpoint`: one opened on disk, or
one built in memory with :meth:`~ckcore.checkpoint.Checkpoint.from_metadata`.
The ``.metadata`` is untrusted input: a few kilobytes of pickle can repeat
one chunk object a million times, so everything returned is bounded (see
:class:`Findings`, :data:`PAIR_COUNT_LIMIT`, :data:`SWEEP_BUDGET`,
:data:`MAX_SHAPE_DIMS`, :data:`MAX_WORLD`), and names and shapes quoted in
messages are abbreviated (:func:`~ckcore._saferepr.saferepr`).

>>> md = Metadata({"w": TensorStorageMetadata(
...     TensorProperties("float32"), (4, 2), [ChunkStorageMetadata((0, 0), (2, 2)),
...                                           ChunkStorageMetadata((2, 0), (2, 2))])},
...     storage_data={MetadataIndex("w", (0, 0)): StorageInfo("__0_0.distcp", 0, 16),
...                   MetadataIndex("w", (2, 0)): StorageInfo("__1_0.distcp", 0, 16)})
>>> ck = Checkpoint.from_metadata(md, file_sizes={"__0_0.distcp": 16, "__1_0.distcp": 16})
>>> inspect_checkpoint(ck)["totals"]["tensor_bytes"], validate_checkpoint(ck).ok
(32, True)
>>> [r["bytes_read"] for r in plan_reads(ck, (2,), {"w": ((4, 2), (Shard(1),))})["ranks"]]
[32, 32]
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from . import ranges as _ranges

# The only kernel this module calls directly.
from ._kernels._validate import _check_tensor_bounded, chunk_rows
from ._saferepr import chunk_text, name_text, one_line, saferepr, shape_text
from ._torchsave import UnsupportedItem, locate_tensor
from .checkpoint import (
    STORAGE_PROBLEMS,
    Checkpoint,
    CheckpointError,
    StorageInfo,
    _escapes,
    _volume,
    tensor_nbytes,
)
from .dtypes import itemsize
from .global_plan import _torch_order
from .items import chunk_arrays, intersect_chunks
from .layout import (
    Replicate,
    Shard,
    format_placements,
    local_shapes_and_offsets,
    parse_placements,
)
from .metadata import Metadata, MetadataIndex, TensorStorageMetadata
from .ranges import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_DIRECT_MIN_BYTES,
    DIRECT_SLAB_BYTES,
    box_runs,
    byte_ranges,
    coalesce_ranges,
    contiguous_strides,
    paired_run_info,
    paired_runs,
    preadv_calls,
    reads_whole,
    record_batches,
    record_windows,
    slab_limit,
    slabs,
)
from .share import DEFAULT_EXCHANGE_BYTES, DEFAULT_MIN_PIECE_BYTES, plan_shared_reads

__all__ = [
    "COALESCING",
    "DEFAULT_MAX_FINDINGS",
    "FINDING_KINDS",
    "MAX_KEPT_FINDINGS",
    "MAX_SHAPE_DIMS",
    "MAX_WORLD",
    "PAIR_COUNT_LIMIT",
    "SWEEP_BUDGET",
    "Findings",
    "ProgressSink",
    "UsageError",
    "format_mesh",
    "inspect_checkpoint",
    "parse_layout_rules",
    "plan_reads",
    "range_reads",
    "resolve_layouts",
    "validate_checkpoint",
]

#: How :func:`plan_reads` counts read calls: reads are whole storage items,
#: as torch's FileSystemReader reads them; per rank and file they are sorted
#: by offset and merged when they overlap or touch (no gap is bridged, no
#: cap applies).
COALESCING = "whole storage items, per rank and file sorted by offset, touching/overlapping merged"

#: ``RangeFileSystemReader``'s defaults, which :func:`range_reads` models.
RANGE_MAX_GAP = _ranges.DEFAULT_GAP_BYTES
RANGE_MAX_OVERREAD = _ranges.NO_RATIO_CAP
#: Items up to this size are read whole; larger ones have their archive
#: records (first and last 4 KiB) read to locate the tensor.
RANGE_SMALL_ITEM = _ranges.DEFAULT_SMALL_ITEM_BYTES
#: Runs of one box past this are counted, not listed: calls = runs, bytes = useful.
RANGE_MAX_RUNS = 1 << 20

#: Dims of a shape :func:`inspect_checkpoint` lists (a longer one is given as ``ndim`` only).
MAX_SHAPE_DIMS = 64

#: Largest target world :func:`plan_reads` accepts: its arrays hold a row per
#: rank and tensor dim, so a typo such as ``--world-size 100000000`` would
#: otherwise allocate gigabytes before failing.
MAX_WORLD = 1 << 20


class UsageError(ValueError):
    """Arguments that cannot work together, or a target layout that does not fit the checkpoint."""


class ProgressSink(Protocol):
    """What long work reports its progress to (the command's ``Progress`` is one)."""

    def start(self, label: str, total: int) -> None:
        """Begin a phase of ``total`` steps."""

    def update(self, done: int) -> None:
        """Record that ``done`` of the phase's steps are finished."""

    def done(self) -> None:
        """Finish the phase."""


def format_mesh(mesh: Sequence[int]) -> str:
    """A mesh shape as the command line takes it.

    >>> format_mesh((8, 8))
    '8x8'
    """
    return "x".join(str(int(v)) for v in mesh)


def _tensor_items(md: Metadata) -> Iterator[tuple[str, TensorStorageMetadata]]:
    for fqn, item in md.state_dict_metadata.items():
        if type(item) is TensorStorageMetadata:
            yield fqn, item


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
                "bytes": tensor_nbytes(fqn, item),
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


# --------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------


#: Findings of each kind ``validate`` shows by default (``--max-findings``).
DEFAULT_MAX_FINDINGS = 20

#: Messages of each kind :class:`Findings` keeps when asked for all of them
#: (``--max-findings 0``); the rest are still counted. A few hundred
#: kilobytes of crafted ``.metadata`` hold 10**10 overlapping pairs, whose
#: messages no memory holds.
MAX_KEPT_FINDINGS = 100_000

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
    **STORAGE_PROBLEMS,
}


class Findings:
    """What :func:`validate_checkpoint` found, by kind: the first ``limit`` messages of each, and counts.

    ``limit`` <= 0 keeps every message, up to :data:`MAX_KEPT_FINDINGS` of
    each kind. Checks call :meth:`add` for each
    finding and write its message (:meth:`keep`) only when ``add`` asks for
    it, so a million findings cost a million counts, not a million strings.
    ``counts`` maps each kind (a key of :data:`FINDING_KINDS`) found to its
    number; ``inexact`` holds the kinds whose count is a lower bound (counting
    stopped, see :data:`PAIR_COUNT_LIMIT`).
    """

    def __init__(self, limit: int = DEFAULT_MAX_FINDINGS) -> None:
        """Keep the first ``limit`` messages of each kind (every message when ``limit`` <= 0)."""
        if type(limit) is not int:
            raise TypeError(f"max_findings must be an int, got {type(limit).__name__}")
        self.limit = limit
        self.shown: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.inexact: set[str] = set()

    def room(self, kind: str) -> int:
        """How many more messages of ``kind`` would be kept."""
        cap = MAX_KEPT_FINDINGS if self.limit <= 0 else min(self.limit, MAX_KEPT_FINDINGS)
        return max(0, cap - len(self.shown.get(kind, ())))

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
        kept = list(messages[:room])
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
            elif rest > 0 and len(shown) >= MAX_KEPT_FINDINGS:
                yield (f"... and {rest:,} more {label} (only the first "
                       f"{MAX_KEPT_FINDINGS:,} of each kind are kept)")
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


def validate_checkpoint(ck: Checkpoint, progress: ProgressSink | None = None, *,
                        max_findings: int = DEFAULT_MAX_FINDINGS) -> Findings:
    """Every problem of a checkpoint, as :class:`Findings`; ``ok`` when it is sound.

    Global checks are torch's ``_validate_global_plan``'s, with its messages
    (quoting bounded shapes and names): out-of-bounds chunks, overlapping
    chunk pairs (torch's predicate), and "invalid fill" (chunk volumes not
    summing to the tensor's). torch checks the fill only when more than one
    rank saved; a checkpoint on disk is checked always, since a gap means
    unreadable elements whoever wrote it. Storage checks are
    :meth:`Checkpoint.iter_problems <ckcore.checkpoint.Checkpoint.iter_problems>`':
    entries for every item and items for every entry, FileSystemWriter
    records whose files exist inside the checkpoint and hold their bytes, no
    bytes shared between entries, no entry shorter than its chunk's raw bytes.

    Bounded for crafted input: each kind keeps its first ``max_findings``
    messages (all when <= 0, up to :data:`MAX_KEPT_FINDINGS`) and counts the rest; overlapping pairs are
    counted up to :data:`PAIR_COUNT_LIMIT` (all when ``max_findings`` <= 0),
    and the overlap sweep makes at most :data:`SWEEP_BUDGET` comparisons.
    ``progress`` (optional) hears of each tensor checked.

    >>> md = Metadata({"w": TensorStorageMetadata(
    ...     TensorProperties("float32"), (4,), [ChunkStorageMetadata((0,), (3,)),
    ...                                         ChunkStorageMetadata((2,), (2,))])})
    >>> f = validate_checkpoint(Checkpoint.from_metadata(md))
    >>> f.counts
    {'overlapping_chunks': 1, 'invalid_fill': 1, 'missing_storage_entry': 2}
    >>> f.messages[0]
    'key:w has overlapping chunks: ChunkStorageMetadata(offsets=(2,), sizes=(2,)) ChunkStorageMetadata(offsets=(0,), sizes=(3,))'
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
    for kind, message in ck.iter_problems(f.add):
        if message is not None:
            f.keep(kind, message)
    return f


def _validate_tensor(fqn: str, item: TensorStorageMetadata, f: Findings,
                     budget: dict[str, int]) -> None:
    """torch's global checks of one tensor into ``f``; ``budget`` is what the run has left."""
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
        why = one_line(exc)
        if f.add("unvalidatable"):
            f.keep("unvalidatable", f"key:{name_text(fqn)} cannot be validated: {why}")
        return
    keep = f.room("overlapping_chunks")
    stop = max(1, budget["pairs"]) if budget["pairs"] >= 0 else -1
    oob, volume, pairs, found, complete, exhausted, spent = _check_tensor_bounded(
        offs, sizes, tsize, keep, stop, max(0, budget["sweep"]))
    budget["sweep"] -= spent
    if budget["pairs"] >= 0:
        budget["pairs"] = budget["pairs"] - found if complete else 0
    room = f.room("out_of_bounds")
    shape = shape_text(size)
    f.add_many("out_of_bounds", [
        f"key:{name_text(fqn)} has out of bounds chunk: tensor-size:{shape} chunk: {chunk_text(chunks[i])}"
        for i in oob[:room].tolist()
    ], len(oob))
    if found:
        shown = []
        if len(pairs):
            cur, oth = _torch_order(offs, sizes, size, pairs)
            shown = [f"key:{name_text(fqn)} has overlapping chunks: {chunk_text(chunks[i])} {chunk_text(chunks[j])}"
                     for i, j in zip(cur.tolist(), oth.tolist())]
        f.add_many("overlapping_chunks", shown, found, exact=complete)
    if exhausted and f.add("overlap_check_stopped"):
        f.keep("overlap_check_stopped", (
            f"key:{name_text(fqn)} overlap check stopped: its {len(chunks):,} chunks need more than "
            f"{SWEEP_BUDGET:,} comparisons for the whole checkpoint (no DCP layout does)"))
    tensor_volume = _volume(size)
    if volume is None:
        # Some chunk's volume passes int64: exact Python ints.
        vols = [v for v in (_volume(c.sizes) for c in chunks) if v is not None]
        volume = sum(vols) if len(vols) == len(chunks) else None
        if volume is None or tensor_volume is None:
            if f.add("unvalidatable"):
                f.keep("unvalidatable", (
                    f"key:{name_text(fqn)} cannot be validated: a volume passes 2**256 elements"))
            return
    if tensor_volume != volume and f.add("invalid_fill"):
        f.keep("invalid_fill", (
            f"key:{name_text(fqn)} invalid fill tensor-volume: "
            f"{'more than 2**256' if tensor_volume is None else tensor_volume} chunks-volume: {volume}"))



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
    tensors = dict(_tensor_items(md))
    out: dict[str, tuple[tuple[int, ...], tuple[Any, ...]]] = {}
    if world_size is not None:
        for name, value in (("world_size", world_size), ("shard_dim", shard_dim)):
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
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
            raise UsageError(f"{name_text(fqn)}: no --layout pattern matches it; add a catch-all such as '*=R'")
    return tuple(mesh), out


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
                f"{name_text(fqn)}: chunk {i} at offsets {shape_text(c.offsets)} has no storage entry "
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
    n, ndim = offs.shape
    if n < 2:
        return
    # Two non-empty chunks at the same offsets overlap, which the kernel
    # finds; only empty ones need the sort.
    if ndim == 0 or ((sizes == 0).any() and len(np.unique(offs, axis=0)) < n):
        raise CheckpointError(
            f"{name_text(fqn)}: two saved chunks start at the same offsets, which no DCP save "
            "writes (run `ckcore validate`)")
    *_, found, _, exhausted, spent = _check_tensor_bounded(
        offs, sizes, np.array(size, dtype=np.int64), 0, 1, max(0, budget[0]))
    budget[0] -= spent
    if found:
        raise CheckpointError(f"{name_text(fqn)}: saved chunks overlap (run `ckcore validate`)")
    if exhausted:
        raise CheckpointError(
            f"{name_text(fqn)}: saved chunks too irregular to check for overlaps within "
            f"{SWEEP_BUDGET:,} comparisons, which no DCP layout needs (run `ckcore validate`)")


def _coalesce(rank: np.ndarray, fid: np.ndarray, off: np.ndarray, ln: np.ndarray,
              world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    progress: ProgressSink | None = None,
    *,
    ranges: bool = False,
    use_files: bool = True,
    max_gap: int = RANGE_MAX_GAP,
    max_overread: float = RANGE_MAX_OVERREAD,
    exchange_bytes: int = DEFAULT_EXCHANGE_BYTES,
    min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
    ranks_per_host: int = 1,
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

    ``ranges=True`` adds what ``RangeFileSystemReader`` and
    ``SharedRangeFileSystemReader`` would read (see :func:`range_reads`):
    a ``range`` and a ``shared`` dict in each rank's row, and the
    ``range_reader`` and ``sharing`` sections; ``use_files``, ``max_gap``,
    ``max_overread``, ``exchange_bytes``, ``min_piece_bytes`` and
    ``ranks_per_host`` are its parameters.

    Refuses (UsageError) a target shape other than the saved tensor's, and
    (CheckpointError) what no DCP save writes and would make the plan
    unbounded: saved chunks at the same offsets or overlapping, storage
    entries that are not FileSystemWriter records, byte counts past int64.
    """
    mesh = tuple(mesh)
    world = math.prod(mesh)
    if not 1 <= world <= MAX_WORLD:
        raise UsageError(
            f"mesh {format_mesh(mesh)} has {world} ranks; ckcore plan handles 1 to {MAX_WORLD}")
    ck.check_byte_totals()
    tensors = dict(_tensor_items(ck.metadata))
    missing = sorted(set(tensors) - set(layouts))
    if missing:
        raise UsageError(f"{name_text(missing[0])}: no target layout given for it")
    reads = _Reads(world)
    table = _storage_table(ck)
    sweep_budget = [SWEEP_BUDGET]
    if progress:
        progress.start("planning reads", len(tensors))
    for done, (fqn, item) in enumerate(tensors.items(), 1):
        _tensor_reads(reads, table, fqn, item, mesh, layouts[fqn], sweep_budget)
        if progress:
            progress.update(done)
    if progress:
        progress.done()
    for fqn, bytes_item in ck.metadata.state_dict_metadata.items():
        if type(bytes_item) is not TensorStorageMetadata:
            info = ck.storage.get(MetadataIndex(fqn))
            if info is None:
                raise CheckpointError(
                    f"{name_text(fqn)}: bytes item has no storage entry (run `ckcore validate`)")
            reads.everyone(info)
    result = _plan_report(ck, mesh, reads)
    if ranges:
        result.update(range_reads(ck, reads, use_files=use_files, max_gap=max_gap,
                                  max_overread=max_overread, exchange_bytes=exchange_bytes,
                                  min_piece_bytes=min_piece_bytes, ranks_per_host=ranks_per_host))
        by_rank = {r["rank"]: r for r in result["ranks"]}
        for k, row in enumerate(result.pop("_range_ranks")):
            by_rank[k]["range"] = row["range"]
            by_rank[k]["shared"] = row["shared"]
        for group in result["sharing"]["groups"]:
            group["torch_bytes_read"] = sum(by_rank[k]["bytes_read"] for k in group["ranks"])
    return result


class _Reads:
    """A plan's reads so far: (rank, file id, offset, length) rows, and per-rank counts."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.items = np.zeros(world, dtype=np.int64)
        self.useful = np.zeros(world, dtype=np.int64)
        self.file_ids: dict[str, int] = {}
        self.columns: tuple[list[np.ndarray], ...] = ([], [], [], [])
        # (fqn, saved chunks, per-chunk storage (fid, off, ln), intersection,
        # every rank's local shape) per tensor, and every bytes item's storage:
        # what the range-reader model needs.
        self.boxes: list[tuple[str, TensorStorageMetadata, tuple[np.ndarray, ...], Any, Any]] = []
        self.bytes_items: list[StorageInfo] = []

    def file_id(self, relative_path: str) -> int:
        """A small int per file, for the coalescing sort."""
        return self.file_ids.setdefault(relative_path, len(self.file_ids))

    def add(self, rank: np.ndarray, fid: np.ndarray, off: np.ndarray, ln: np.ndarray) -> None:
        """Reads ``rank[i]`` makes of ``ln[i]`` bytes at ``off[i]`` in file ``fid[i]``."""
        for column, values in zip(self.columns, (rank, fid, off, ln)):
            column.append(values)

    def everyone(self, info: StorageInfo) -> None:
        """A bytes item: every rank reads the whole entry, and keeps it."""
        world = self.world
        self.bytes_items.append(info)
        self.items += 1
        self.useful += info.length
        self.add(np.arange(world, dtype=np.int64),
                 np.full(world, self.file_id(info.relative_path), dtype=np.int64),
                 np.full(world, info.offset, dtype=np.int64),
                 np.full(world, info.length, dtype=np.int64))

    def arrays(self) -> list[np.ndarray]:
        """The rows as four int64 arrays: rank, file id, offset, length."""
        return [np.concatenate(c).astype(np.int64, copy=False) if c else np.zeros(0, np.int64)
                for c in self.columns]


def _tensor_reads(reads: _Reads, table: dict[tuple[str, Any], Any], fqn: str,
                  item: TensorStorageMetadata, mesh: tuple[int, ...],
                  layout: tuple[Sequence[int], Any], sweep_budget: list[int]) -> None:
    """Add every rank's reads of tensor ``fqn`` at ``layout`` (global shape, placements) to ``reads``."""
    shape, placements = layout
    try:
        same = tuple(shape) == tuple(item.size)
    except TypeError:
        raise UsageError(f"{name_text(fqn)}: target shape {saferepr(shape)} is not a sequence "
                         "of ints") from None
    if not same:
        # DCP loads a tensor at the shape it was saved with; any other shape
        # would plan reads no load makes.
        raise UsageError(f"{name_text(fqn)}: target shape {shape_text(tuple(shape))} differs from "
                         f"the saved tensor's {shape_text(item.size)}")
    try:
        sizes, offsets = local_shapes_and_offsets(shape, mesh, placements)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"{name_text(fqn)}: layout {format_placements(placements)} on mesh {format_mesh(mesh)} "
            f"does not fit the tensor {shape_text(shape)}: {exc}") from None
    if not item.chunks:
        return
    saved_chunks = chunk_arrays(item.chunks, name_text(fqn), len(shape))
    _check_plannable(fqn, saved_chunks[0], saved_chunks[1], item.size, sweep_budget)
    fid, off, ln = _saved_storage(table, fqn, item, reads.file_ids)
    hits = intersect_chunks((offsets, sizes), saved_chunks, fqn=name_text(fqn), ndim=len(shape))
    if len(hits):
        r = hits.local_index
        elem = itemsize(item.properties.dtype)
        np.add.at(reads.items, r, 1)
        np.add.at(reads.useful, r, np.prod(hits.lengths, axis=1, dtype=np.int64) * elem)
        s = hits.saved_index
        reads.add(r, fid[s], off[s], ln[s])
        reads.boxes.append((fqn, item, (fid, off, ln), hits, sizes))


def _plan_report(ck: Checkpoint, mesh: tuple[int, ...], reads: _Reads) -> dict[str, Any]:
    """:func:`plan_reads`' result from the reads: per rank after coalescing, heaviest first."""
    world, items, useful = reads.world, reads.items, reads.useful
    # A storage item a rank needs for several chunks appears once per chunk here;
    # coalescing merges the identical ranges, so it is read (and counted) once.
    rank, fid, off, ln = reads.arrays()
    calls, nbytes, nfiles = _coalesce(rank, fid, off, ln, world)
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



# --------------------------------------------------------------------------
# plan: what ckcore's range reader reads, alone and sharing
# --------------------------------------------------------------------------


class _ChunkLayout:
    """Where a saved chunk's elements sit: strides, byte of element 0, how the range reader reads it."""

    __slots__ = ("base", "file", "kind", "length", "offset", "reads", "stored", "strides", "whole")

    def __init__(self, strides: tuple[int, ...], base: int, length: int, stored: bool,
                 whole: bool, file: str = "", offset: int = 0, kind: str = "range",
                 reads: tuple[tuple[int, int], ...] = ()) -> None:
        self.strides, self.base, self.length = strides, base, length
        self.stored = stored  # strides read from the file's torch.save records
        self.whole = whole    # read whole: small, transformed or not a plain archive
        self.file, self.offset = file, offset  # the storage item: file and first byte
        # "range": an archive the range path reads; "unsupported": located, then
        # read whole by torch's path; "transformed": read whole by torch's path.
        self.kind = kind
        # The (file offset, n) reads that locating it makes, as the reader
        # asks its record windows for them (the whole item when it is small);
        # a read no window holds is a request of its own.
        self.reads = reads


class _Locator:
    """Each saved chunk's layout, from its ``torch.save`` records when the file is there."""

    def __init__(self, ck: Checkpoint, use_files: bool) -> None:
        self.ck = ck
        self.use_files = use_files
        self.fds: dict[str, int | None] = {}
        self.stored = 0
        self.assumed = 0

    def _fd(self, relative_path: str) -> int | None:
        if relative_path not in self.fds:
            fd = None
            if self.use_files and not _escapes(relative_path) and \
                    self.ck.files.get(relative_path) is not None:
                try:
                    fd = os.open(self.ck.dir / relative_path,
                                 os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        os.close(fd)
                        fd = None
                except OSError:
                    fd = None
            self.fds[relative_path] = fd
        return self.fds[relative_path]

    def layout(self, fqn: str, sizes: tuple[int, ...], info: StorageInfo) -> _ChunkLayout:
        """The layout of the saved chunk of ``fqn`` stored at ``info``."""
        whole = bool(info.transform_descriptors) or info.length <= RANGE_SMALL_ITEM
        where = (info.relative_path, info.offset)
        fd = self._fd(info.relative_path)
        if fd is not None and not info.transform_descriptors:
            reads: list[tuple[int, int]] = []

            def pread(n: int, off: int) -> bytes:
                reads.append((off, n))
                return os.pread(fd, n, off)

            try:
                loc = locate_tensor(pread, info.offset, info.length, name_text(fqn))
            except UnsupportedItem:
                self.stored += 1
                return _ChunkLayout(contiguous_strides(sizes), info.offset, info.length, True, True,
                                    *where, kind="unsupported", reads=self._asked(info, reads))
            except (ValueError, OSError):
                pass  # damaged: `ckcore validate` reports it; assume contiguous
            else:
                if tuple(loc.size) == tuple(sizes):
                    self.stored += 1
                    return _ChunkLayout(tuple(loc.stride), loc.base, info.length, True, whole, *where,
                                        reads=self._asked(info, reads))
        self.assumed += 1
        return _ChunkLayout(contiguous_strides(sizes), info.offset, info.length, False, whole, *where,
                            kind="transformed" if info.transform_descriptors else "range")

    @staticmethod
    def _asked(info: StorageInfo, reads: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        # What the reader asks its windows for: a small item whole, in one
        # read, then located from memory; any other item's locate reads.
        if info.length <= RANGE_SMALL_ITEM:
            return ((info.offset, info.length),)
        return tuple(reads)

    def close(self) -> None:
        """Close the files opened to read records."""
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.fds.clear()


class _RangeCost:
    """Bytes and calls of the range reader, per rank, for boxes of saved chunks."""

    def __init__(self, world: int, max_gap: int, max_overread: float) -> None:
        self.bytes = np.zeros(world, dtype=np.int64)
        self.calls = np.zeros(world, dtype=np.int64)
        self.max_gap, self.max_overread = max_gap, max_overread
        self.opened: set[tuple[int, int]] = set()
        # per (rank, file): the items whose archive records the rank reads
        self.located: dict[tuple[int, str], set[tuple[int, int]]] = {}
        # per item (file, offset, length): the reads locating it makes
        self.locate_reads: dict[tuple[str, int, int], tuple[tuple[int, int], ...]] = {}
        self.estimated = 0
        self.memo: dict[tuple, tuple[int, int, bool]] = {}
        self.whole_memo: dict[tuple, bool] = {}
        self.read_whole: set[tuple[int, int]] = set()

    def box(self, rank: int, gid: int, lay: _ChunkLayout, sizes: tuple[int, ...], elem: int,
            offsets: Sequence[int], lengths: Sequence[int],
            dst_shape: tuple[int, ...] | None = None, dst_offsets: Sequence[int] | None = None) -> None:
        """Rank ``rank`` reads box ``offsets``/``lengths`` of saved chunk ``gid``.

        The box lands at ``dst_offsets`` of a C-order tensor of ``dst_shape``
        (default: a tensor of its own, ``lengths``).
        """
        if lay.kind != "transformed" and self._whole(sizes, elem, offsets, lengths, lay.length):
            # One request for the whole item, records and all (decided from
            # the metadata alone, as the reader decides it), serving every
            # box of it the rank reads this way.
            if (rank, gid) not in self.read_whole:
                self.read_whole.add((rank, gid))
                self.bytes[rank] += lay.length
                self.calls[rank] += 1
            return
        if (rank, gid) not in self.opened:
            # The first touch of a chunk: a transformed item is read whole
            # once by torch's path; any other has its archive records read
            # (merged windows per file, in finish), and one the range path
            # cannot parse is then read whole by torch's path.
            self.opened.add((rank, gid))
            if lay.kind == "transformed":
                self.bytes[rank] += lay.length
                self.calls[rank] += 1
            else:
                self.located.setdefault((rank, lay.file), set()).add((lay.offset, lay.length))
                self.locate_reads[(lay.file, lay.offset, lay.length)] = lay.reads
                if lay.kind == "unsupported":
                    self.bytes[rank] += lay.length
                    self.calls[rank] += 1
        if lay.whole or 0 in lengths:
            return
        # Coalescing depends on run lengths and gaps only, not on where the
        # chunk starts: a layout repeats a few box shapes over many chunks.
        if dst_shape is None:
            dst_shape = tuple(lengths)
        if dst_offsets is None:
            dst_offsets = (0,) * len(lengths)
        key = (sizes, lay.strides, elem, *offsets, -1, *lengths, -1, *dst_shape, -1, *dst_offsets)
        cost = self.memo.get(key)
        if cost is None:
            runs, run_bytes, _ = box_runs(sizes, lay.strides, elem, offsets, lengths)
            if runs > RANGE_MAX_RUNS:
                cost = (runs * run_bytes, runs, True)
            else:
                cost = self._box_cost(sizes, lay.strides, elem, offsets, lengths, dst_shape,
                                      dst_offsets)
            self.memo[key] = cost
        self.bytes[rank] += cost[0]
        self.calls[rank] += cost[1]
        self.estimated += cost[2]

    def _box_cost(self, sizes: tuple[int, ...], strides: tuple[int, ...], elem: int,
                  offsets: Sequence[int], lengths: Sequence[int], dst_shape: tuple[int, ...],
                  dst_offsets: Sequence[int]) -> tuple[int, int, bool]:
        # (bytes, calls, estimated) of one box, as the reader reads it into
        # its place in a C-order destination (RangeFileSystemReader._pieces, one thread):
        # the box is cut into slabs (ranges.slabs: DIRECT_SLAB_BYTES of file
        # span in place, the scratch buffer's otherwise), each coalesced on its
        # own. Runs contiguous in both at least direct_min_bytes long go in
        # place, the preadv calls of read_runs per block (ranges.preadv_calls);
        # others through the scratch buffer, one read per block of each of its slabs.
        offsets, lengths, dst_offsets = tuple(offsets), tuple(lengths), tuple(dst_offsets)
        _, run = paired_run_info(lengths, itemsize=elem, src_shape=sizes, dst_shape=dst_shape,
                                 src_strides=strides, src_offsets=offsets, dst_offsets=dst_offsets)
        direct = run >= DEFAULT_DIRECT_MIN_BYTES
        limit = slab_limit(DIRECT_SLAB_BYTES if direct else DEFAULT_BUFFER_BYTES,
                           sizes, strides, elem, offsets, lengths)
        nbytes = calls = 0
        for so, sl in slabs(offsets, lengths, strides, elem, limit):
            if direct:
                pairs = paired_runs(sl, itemsize=elem, src_shape=sizes, dst_shape=dst_shape,
                                    src_strides=strides, src_offsets=so,
                                    dst_offsets=tuple(d + a - b for d, a, b in zip(dst_offsets, so, offsets)))
                ranges = np.stack([pairs[:, 0], pairs[:, 0] + pairs[:, 2]], axis=1)
                if len(pairs) < 2 or not np.any(ranges[1:, 0] < ranges[:-1, 1]):
                    blocks = coalesce_ranges(ranges, self.max_gap, self.max_overread)
                    nbytes += int((blocks[:, 1] - blocks[:, 0]).sum())
                    calls += preadv_calls(ranges, blocks)
                    continue
            # through the scratch buffer (also a slab whose source runs overlap)
            inner = slab_limit(DEFAULT_BUFFER_BYTES, sizes, strides, elem, so, sl)
            for to, tl in slabs(so, sl, strides, elem, inner):
                blocks = coalesce_ranges(byte_ranges(sizes, strides, elem, to, tl),
                                         self.max_gap, self.max_overread)
                nbytes += int((blocks[:, 1] - blocks[:, 0]).sum())
                calls += len(blocks)
        return nbytes, calls, False

    def _whole(self, sizes: tuple[int, ...], elem: int, offsets: Sequence[int],
               lengths: Sequence[int], length: int) -> bool:
        # reads_whole, memoized: a layout repeats a few box shapes over many chunks.
        key = (sizes, elem, length, *offsets, -1, *lengths)
        got = self.whole_memo.get(key)
        if got is None:
            got = self.whole_memo[key] = reads_whole(
                sizes, elem, offsets, lengths, length, max_gap=self.max_gap,
                max_overread=self.max_overread)
        return got

    def finish(self) -> None:
        """Add every rank's record reads: per file, the merged windows of its located items.

        A read that locating an item makes and no single window holds (a
        zip comment or trailing bytes past the item's last 4 KiB, a small
        item split by the window cap) is a request of its own, as in the
        reader.
        """
        for (rank, file), items in self.located.items():
            for batch in record_batches(list(items), DEFAULT_BUFFER_BYTES):
                windows = record_windows(batch)
                for start, end in windows:
                    self.bytes[rank] += end - start
                    self.calls[rank] += 1
                starts = [a for a, _ in windows]
                for off, ln in batch:
                    for at, n in self.locate_reads.get((file, off, ln), ()):
                        i = bisect.bisect_right(starts, at) - 1
                        if i < 0 or at + n > windows[i][1]:
                            self.bytes[rank] += n
                            self.calls[rank] += 1
        self.located.clear()


def range_reads(
    ck: Checkpoint,
    reads: Any,
    *,
    use_files: bool = True,
    max_gap: int = RANGE_MAX_GAP,
    max_overread: float = RANGE_MAX_OVERREAD,
    exchange_bytes: int = DEFAULT_EXCHANGE_BYTES,
    min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
    ranks_per_host: int = 1,
) -> dict[str, Any]:
    """What ``RangeFileSystemReader`` and ``SharedRangeFileSystemReader`` read, per rank and per replica group.

    ``reads`` is :func:`plan_reads`' record of every rank's read items (call
    ``plan_reads(..., ranges=True)``). The range reader is modelled as it
    reads: per read item, the byte ranges of its box in the saved chunk
    (element strides from the chunk's ``torch.save`` records when
    ``use_files`` and the file is there, else C-order: contiguous storage
    assumed), coalesced across gaps of at most ``max_gap`` bytes under the
    ``max_overread`` cap; per saved chunk a rank touches, its archive
    records (the first and last 4 KiB), or the whole item when it is at most
    4 KiB, has stream transforms or is not an archive ckcore parses; bytes
    items whole. Sharing is :func:`ckcore.share.plan_shared_reads` on the
    same boxes, with ranks ``k * ranks_per_host .. (k + 1) * ranks_per_host - 1``
    on host ``k`` (as torchrun numbers them; the default 1 makes every rank
    its own host): each piece is read by its reader and the host-mates that
    need it (their page cache serves all but the first read; the figures
    count what each rank asks storage for, as the reader's ``stats`` do),
    the rest by their rank.
    A *replica group* is a set of ranks linked by shared pieces (the
    replicas of a shard under DDP/HSDP); for each: its ranks, and the bytes
    its ranks read from storage with torch's reader, the range reader, and
    with sharing.
    """
    world = reads.world
    if type(ranks_per_host) is not int or ranks_per_host < 1:
        raise UsageError(f"ranks per host must be an int >= 1, got {ranks_per_host!r}")
    loc = _Locator(ck, use_files)
    plain = _RangeCost(world, max_gap, max_overread)
    shared = _RangeCost(world, max_gap, max_overread)
    # Every touched saved chunk gets an id; its layout, sizes and item size.
    chunk_info: list[tuple[_ChunkLayout, tuple[int, ...], int]] = []
    rows: list[np.ndarray] = []
    hit_gid: list[np.ndarray] = []
    ndim = max((len(item.size) for _, item, _, _, _ in reads.boxes), default=0)
    try:
        for fqn, item, _storage, hits, local_sizes in reads.boxes:
            elem = itemsize(item.properties.dtype)
            gids = np.full(len(item.chunks), -1, dtype=np.int64)
            for sc in np.unique(hits.saved_index).tolist():
                c = item.chunks[sc]
                info = ck.storage[MetadataIndex(fqn, tuple(c.offsets))]
                sizes = tuple(int(v) for v in c.sizes)
                gids[sc] = len(chunk_info)
                chunk_info.append((loc.layout(fqn, sizes, info), sizes, elem))
            g = gids[hits.saved_index]
            hit_gid.append(g)
            local_sizes = np.asarray(local_sizes, dtype=np.int64).reshape(world, len(item.size))
            for rank, gid, o, n, d in zip(hits.local_index.tolist(), g.tolist(),
                                          hits.storage_offsets.tolist(), hits.lengths.tolist(),
                                          hits.dest_offsets.tolist()):
                lay, sizes, _ = chunk_info[gid]
                # The box lands in the planner's view of the rank's local
                # tensor (resolve_tensor narrows it), not in a tensor of its own.
                plain.box(rank, gid, lay, sizes, elem, o, n, tuple(local_sizes[rank].tolist()), d)
            pad = ndim - hits.lengths.shape[1]
            rows.append(np.concatenate([
                hits.local_index[:, None], g[:, None], hits.storage_offsets,
                np.zeros((len(hits), pad), np.int64), hits.lengths,
                np.ones((len(hits), pad), np.int64)], axis=1).astype(np.int64))
    finally:
        loc.close()
    for info in reads.bytes_items:
        for cost in (plain, shared):
            cost.bytes += info.length
            cost.calls += 1
    needs = np.concatenate(rows) if rows else np.zeros((0, 2 + 2 * ndim), np.int64)
    itemsizes = [e for _, _, e in chunk_info] or [1]
    sp = plan_shared_reads(needs, itemsizes, world,
                           exchange_bytes=exchange_bytes, min_piece_bytes=min_piece_bytes,
                           hosts=np.arange(world, dtype=np.int64) // min(ranks_per_host, world))
    is_shared = np.zeros(max(len(chunk_info), 1), dtype=bool)
    is_shared[sp.shared_chunks] = True
    for row in needs[~is_shared[needs[:, 1]]].tolist() if len(needs) else ():
        gid = row[1]
        lay, sizes, elem = chunk_info[gid]
        shared.box(row[0], gid, lay, sizes, elem, row[2:2 + len(sizes)],
                   row[2 + ndim:2 + ndim + len(sizes)])
    for i in range(len(sp.chunk)):
        gid = int(sp.chunk[i])
        lay, sizes, elem = chunk_info[gid]
        n = len(sizes)
        for r in sp.piece_readers(i).tolist():
            shared.box(r, gid, lay, sizes, elem, sp.offsets[i, :n].tolist(),
                       sp.lengths[i, :n].tolist())
    plain.finish()
    shared.finish()
    sent = sp.bytes_sent()
    received = np.zeros(world, dtype=np.int64)
    # Replica groups: ranks linked by a shared piece (union-find).
    parent = list(range(world))

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for i in range(len(sp.chunk)):
        received[sp.piece_receivers(i)] += sp.nbytes[i]
    # Replica groups are the ranks that need the same bytes, wherever they
    # run: with several ranks per host, linked through the plan without hosts.
    linked = sp if ranks_per_host == 1 else plan_shared_reads(
        needs, itemsizes, world, exchange_bytes=exchange_bytes, min_piece_bytes=min_piece_bytes)
    for i in range(len(linked.chunk)):
        who = linked.piece_needers(i).tolist()
        for w in who[1:]:
            parent[find(w)] = find(who[0])
    groups: dict[int, list[int]] = {}
    for r in range(world):
        groups.setdefault(find(r), []).append(r)
    useful = reads.useful
    per_rank = [
        {
            "range": {"bytes_read": int(plain.bytes[k]), "read_calls": int(plain.calls[k]),
                      "over_read": int(plain.bytes[k] - useful[k])},
            "shared": {"bytes_read": int(shared.bytes[k]), "bytes_sent": int(sent[k]),
                       "bytes_received": int(received[k])},
        }
        for k in range(world)
    ]
    if not loc.assumed:
        strides = "stored"
    elif loc.stored:
        strides = "partly stored"
    else:
        strides = "contiguous"
    return {
        "_range_ranks": per_rank,
        "range_reader": {
            "strides": strides,
            "chunks_located": loc.stored,
            "chunks_assumed_contiguous": loc.assumed,
            "max_gap": max_gap,
            "max_overread": max_overread,
            "boxes_estimated": plain.estimated,
            "totals": {"bytes_read": sum(plain.bytes.tolist()), "read_calls": sum(plain.calls.tolist()),
                       "over_read": sum(plain.bytes.tolist()) - sum(useful.tolist())},
        },
        "sharing": {
            "exchange_bytes": exchange_bytes,
            "min_piece_bytes": min_piece_bytes,
            "ranks_per_host": ranks_per_host,
            "pieces": len(sp.chunk),
            "exchange_rounds": sp.n_rounds,
            "groups": [{"ranks": g, "torch_bytes_read": None,
                        "range_bytes_read": int(plain.bytes[g].sum()),
                        "shared_bytes_read": int(shared.bytes[g].sum())}
                       for g in sorted(groups.values())],
            "totals": {"bytes_read": sum(shared.bytes.tolist()), "bytes_sent": sum(sent.tolist())},
        },
    }
