"""Save plans as columns: the compact form that travels between ranks, and rank 0's plan from it.

``dcp.save`` gathers every rank's local plan on the coordinator and
scatters a global plan back, pickling torch's objects both ways
(DESIGN.md, "Plan traffic"). At 1024 ranks that is ~740k ``WriteItem``
objects unpickled on rank 0 with the cyclic GC running. When both ends
are ckcore's planners a plan's items travel instead as
:class:`WriteColumns`: an fqn table, a table of the distinct tensor
properties (dtype, layout, flags, global size) and per item a few integer
columns, each part zlib-compressed (:func:`pack_write_columns`), with a
format version that a receiver refuses when it differs
(:class:`CompactPlanError`). :func:`plan_columns` then computes on rank 0
exactly what torch's ``dedup_save_plans``, ``create_default_global_save_plan``
and ``_validate_global_plan`` compute, from the columns: which items each
rank keeps, their index hints and the metadata's chunks, without an object
per item. Layouts it does not cover (a validation finding, a fqn written
by a non-shard item twice, items of one fqn with different properties, an
int64 overflow) return ``None`` and the caller plans from objects, so
messages and corner cases stay torch's.

This module is torch-free; :mod:`ckcore.dcp._compact` maps torch's objects
to and from these columns.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckcore._kernels._plan_columns import chunk_rows, dedup_columns
from ckcore._kernels._validate import _check_tensor
from ckcore.checkpoint import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "CompactPlanError",
    "ColumnPlan",
    "ResultColumns",
    "WriteColumns",
    "pack_mapping",
    "pack_result_columns",
    "pack_write_columns",
    "plan_columns",
    "storage_columns",
    "unpack_mapping",
    "unpack_result_columns",
    "unpack_write_columns",
]

#: Version of the packed layout. A receiver refuses any other.
FORMAT_VERSION = 1

TENSOR, SHARD, BYTE_IO = 0, 1, 2
_INT64_MAX = (1 << 63) - 1
# Largest inflated part accepted: a hostile part cannot make zlib allocate
# more than this (a 1M-item 8-d plan is well under it).
MAX_PART_BYTES = 1 << 28

Props = tuple[str, str, bool, str, bool, tuple[int, ...]]


class CompactPlanError(CheckpointError):
    """A compact plan that is truncated, inconsistent or of another format version."""


@dataclass(frozen=True, eq=False)
class WriteColumns:
    """One rank's write items as columns.

    ``fqns`` and ``props`` are tables (props: ``(dtype, layout,
    requires_grad, memory_format, pin_memory, size)`` with torch's names,
    e.g. ``"torch.bfloat16"``); per item ``fid`` (into ``fqns``), ``kind``
    (0 TENSOR, 1 SHARD, 2 BYTE_IO) and ``pid`` (into ``props``, -1 for a
    bytes item); ``offsets`` and ``sizes`` hold each tensor item's chunk, as
    many values as its properties' size has dimensions, items in order. A
    tensor item's index offset is its chunk's offsets and its index hint is
    None (what torch's planners make; other items are not packed).
    """

    fqns: tuple[str, ...]
    props: tuple[Props, ...]
    fid: np.ndarray
    kind: np.ndarray
    pid: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.fid)

    def ndims(self) -> np.ndarray:
        """Values per item in ``offsets``/``sizes`` (0 for bytes items), int64."""
        pnd = np.array([len(p[5]) for p in self.props] + [0], dtype=np.int64)
        return pnd[self.pid]

    def starts(self) -> np.ndarray:
        """Where each item's values start in ``offsets``/``sizes``, int64."""
        nd = self.ndims()
        out = np.zeros(len(nd), dtype=np.int64)
        if len(nd) > 1:
            np.cumsum(nd[:-1], out=out[1:])
        return out


def _deflate(b: bytes) -> bytes:
    return zlib.compress(b, 1)


def _inflate(b: object, what: str) -> bytes:
    if not isinstance(b, bytes):
        raise CompactPlanError(f"compact plan: {what} is a {type(b).__name__}, not bytes")
    d = zlib.decompressobj()
    try:
        out = d.decompress(b, MAX_PART_BYTES)
    except zlib.error as e:
        raise CompactPlanError(f"compact plan: {what} is damaged ({e})") from None
    if d.unconsumed_tail:
        raise CompactPlanError(f"compact plan: {what} inflates beyond {MAX_PART_BYTES} bytes")
    if not d.eof or d.unused_data:
        raise CompactPlanError(f"compact plan: {what} is truncated or has trailing bytes")
    return out


def _shuffle(a: np.ndarray) -> bytes:
    # Byte planes of int64 values (all low bytes, then the next...): offsets
    # and sizes differ mostly in their low bytes, which zlib then sees together.
    return a.astype("<i8", copy=False).view(np.uint8).reshape(-1, 8).T.tobytes()


def _unshuffle(b: bytes, n: int) -> np.ndarray:
    return np.frombuffer(b, np.uint8).reshape(8, n).T.copy().view("<i8").reshape(n).astype(
        np.int64, copy=False)


def _narrow(a: np.ndarray, hi: int) -> tuple[int, bytes]:
    # The smallest signed width that holds [-1, hi): code = bytes per value.
    for code, dt in ((1, "<i1"), (2, "<i2"), (4, "<i4")):
        if hi <= np.iinfo(dt).max:
            return code, a.astype(dt).tobytes()
    return 8, a.astype("<i8").tobytes()


_WIDTH = {1: "<i1", 2: "<i2", 4: "<i4", 8: "<i8"}


def pack_write_columns(cols: WriteColumns) -> tuple[int, bytes, bytes, bytes]:
    """``(FORMAT_VERSION, fqn table, props table, columns)``, each part zlib-compressed.

    The tables are JSON (exact for any ``str``, ints and bools); the columns
    a small header, then ``fid`` (omitted when it is 0, 1, 2, ...), ``kind``,
    ``pid`` at the narrowest width and the offsets and sizes as int64 byte
    planes.
    """
    n = len(cols.fid)
    fid = np.asarray(cols.fid, dtype=np.int64)
    if n and np.array_equal(fid, np.arange(n)):
        fid_code, fid_b = 0, b""
    else:
        fid_code, fid_b = _narrow(fid, len(cols.fqns))
    pid_code, pid_b = _narrow(np.asarray(cols.pid, dtype=np.int64), len(cols.props))
    v = len(cols.offsets)
    header = np.array([n, v, fid_code, pid_code], dtype="<i8").tobytes()
    body = b"".join((header, fid_b, np.asarray(cols.kind, dtype=np.int8).tobytes(), pid_b,
                     _shuffle(cols.offsets), _shuffle(cols.sizes)))
    props = [[p[0], p[1], p[2], p[3], p[4], list(p[5])] for p in cols.props]
    return (FORMAT_VERSION,
            _deflate(json.dumps(list(cols.fqns)).encode()),
            _deflate(json.dumps(props).encode()),
            _deflate(body))


def _fqn_table(blob: bytes) -> tuple[str, ...]:
    text = _inflate(blob, "fqn table")
    try:
        fqns = json.loads(text)
    except (ValueError, RecursionError):
        raise CompactPlanError("compact plan: fqn table is not a JSON list") from None
    if type(fqns) is not list or any(type(f) is not str for f in fqns):
        raise CompactPlanError("compact plan: fqn table is not a list of strings")
    return tuple(fqns)


def _check_parts(parts: object, form: str, names: tuple[str, ...]) -> tuple[Any, ...]:
    """``parts`` if it is ``(FORMAT_VERSION, *bytes)`` with one bytes part per name.

    Anything else is a :class:`CompactPlanError` naming the form and the part.
    """
    if type(parts) is not tuple or len(parts) != 1 + len(names):
        raise CompactPlanError(f"{form}: expected (version, {', '.join(names)})")
    if type(parts[0]) is not int or parts[0] != FORMAT_VERSION:
        raise CompactPlanError(
            f"{form}: format version {parts[0]!r}, this ckcore reads {FORMAT_VERSION} "
            "(every rank must run the same ckcore version)")
    for what, part in zip(names, parts[1:]):
        if not isinstance(part, bytes):
            raise CompactPlanError(f"{form}: {what} is a {type(part).__name__}, not bytes")
    return parts


def _cached_fqn_table(cache: dict, blob: bytes) -> tuple[str, ...]:
    # Ranks usually send equal tables: each distinct one is decoded once.
    fqns = cache.get(("f", blob))
    if fqns is None:
        fqns = cache[("f", blob)] = _fqn_table(blob)
    return fqns


def _int64(v: object) -> bool:
    return type(v) is int and -_INT64_MAX - 1 <= v <= _INT64_MAX


def _props_table(blob: bytes) -> tuple[Props, ...]:
    text = _inflate(blob, "props table")
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError):
        raise CompactPlanError("compact plan: props table is not JSON") from None
    if type(rows) is not list:
        raise CompactPlanError("compact plan: props table is not a list")
    out = []
    for i, r in enumerate(rows):
        if not (type(r) is list and len(r) == 6 and type(r[0]) is str and type(r[1]) is str
                and type(r[2]) is bool and type(r[3]) is str and type(r[4]) is bool
                and type(r[5]) is list and all(_int64(x) for x in r[5])):
            raise CompactPlanError(f"compact plan: props row {i} is malformed")
        out.append((r[0], r[1], r[2], r[3], r[4], tuple(r[5])))
    return tuple(out)


def unpack_write_columns(parts: object, *, _tables: dict | None = None) -> WriteColumns:
    """The :class:`WriteColumns` packed by :func:`pack_write_columns`, checked.

    Raises :class:`CompactPlanError` naming the part or column that is
    truncated, of another format version or inconsistent (lengths that
    disagree, an fqn or props id out of range, a bytes item with
    properties). ``_tables`` caches decoded tables by their packed bytes, so
    ranks that send the same table share one decoded copy.
    """
    parts = _check_parts(parts, "compact plan", ("fqn table", "props table", "columns"))
    cache = {} if _tables is None else _tables
    fqns = _cached_fqn_table(cache, parts[1])
    props = cache.get(("p", parts[2]))
    if props is None:
        props = cache[("p", parts[2])] = _props_table(parts[2])
    body = _inflate(parts[3], "columns")
    if len(body) < 32:
        raise CompactPlanError("compact plan: columns header is truncated")
    n, v, fid_code, pid_code = (int(x) for x in np.frombuffer(body[:32], "<i8"))
    if n < 0 or v < 0 or fid_code not in (0, 1, 2, 4, 8) or pid_code not in _WIDTH:
        raise CompactPlanError("compact plan: columns header is inconsistent")
    need = 32 + n * (fid_code + 1 + pid_code) + 16 * v
    if len(body) != need:
        raise CompactPlanError(
            f"compact plan: columns hold {len(body)} bytes, the header says {need}")
    at = 32
    if fid_code == 0:
        fid = np.arange(n, dtype=np.int64)
    else:
        fid = np.frombuffer(body, _WIDTH[fid_code], n, at).astype(np.int64)
        at += n * fid_code
    kind = np.frombuffer(body, np.int8, n, at).copy()
    at += n
    pid = np.frombuffer(body, _WIDTH[pid_code], n, at).astype(np.int64)
    at += n * pid_code
    offsets = _unshuffle(body[at:at + 8 * v], v)
    sizes = _unshuffle(body[at + 8 * v:], v)
    if n and (fid.min() < 0 or fid.max() >= len(fqns)):
        raise CompactPlanError("compact plan: an fqn id is out of range of the fqn table")
    if n and (pid.min() < -1 or pid.max() >= len(props)):
        raise CompactPlanError("compact plan: a props id is out of range of the props table")
    if n and (kind.min() < 0 or kind.max() > 2):
        raise CompactPlanError("compact plan: an item kind is not TENSOR, SHARD or BYTE_IO")
    if not np.array_equal(kind == BYTE_IO, pid < 0):
        raise CompactPlanError("compact plan: bytes items and items without properties disagree")
    cols = WriteColumns(fqns, props, fid, kind, pid, offsets, sizes)
    if int(cols.ndims().sum()) != v:
        raise CompactPlanError(
            f"compact plan: the items' dimensions add up to {int(cols.ndims().sum())} "
            f"offset values, the columns hold {v}")
    return cols


def pack_mapping(mapping: dict) -> bytes | None:
    """A flattening map (fqn -> tuple of str/int keys) as compressed JSON; None if it is not one."""
    rows = []
    for k, path in mapping.items():
        if type(k) is not str or type(path) is not tuple:
            return None
        for c in path:
            if type(c) is not str and type(c) is not int:
                return None
        rows.append([k, list(path)])
    return _deflate(json.dumps(rows).encode())


def unpack_mapping(blob: object) -> dict:
    """The map :func:`pack_mapping` packed (raises :class:`CompactPlanError` if malformed)."""
    text = _inflate(blob, "planner data")
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError):
        raise CompactPlanError("compact plan: planner data is not JSON") from None
    if type(rows) is not list:
        raise CompactPlanError("compact plan: planner data is not a list")
    out = {}
    for r in rows:
        if not (type(r) is list and len(r) == 2 and type(r[0]) is str and type(r[1]) is list
                and all(type(c) is str or type(c) is int for c in r[1])):
            raise CompactPlanError("compact plan: a planner data row is malformed")
        out[r[0]] = tuple(r[1])
    return out


@dataclass(frozen=True, eq=False)
class ColumnPlan:
    """What :func:`plan_columns` computed.

    Per rank ``keep[r]`` (uint8 per item, or None when the rank keeps every
    item) and ``hints[r]`` (int64 per item: the index hint a kept tensor
    item gets, -1 otherwise). The metadata: ``fqns`` in torch's order, each
    with ``props[f]`` (None for bytes), and its chunks as rows
    ``chunk_ptr[f]:chunk_ptr[f+1]`` of ``chunk_offsets``/``chunk_sizes``
    (flat, ``len(props[f][5])`` values per row, starting at ``val_ptr[f]``).
    """

    keep: list[np.ndarray | None]
    hints: list[np.ndarray]
    fqns: list[str]
    props: list[Props | None]
    chunk_ptr: np.ndarray
    val_ptr: np.ndarray
    chunk_offsets: np.ndarray
    chunk_sizes: np.ndarray

    def chunks(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """The chunks of the ``f``-th fqn: ``(offsets, sizes)``, each ``(n, ndim)`` int64."""
        p = self.props[f]
        nd = 0 if p is None else len(p[5])
        a, b = int(self.val_ptr[f]), int(self.val_ptr[f + 1])
        n = int(self.chunk_ptr[f + 1] - self.chunk_ptr[f])
        return self.chunk_offsets[a:b].reshape(n, nd), self.chunk_sizes[a:b].reshape(n, nd)


def _global_ids(tables: Sequence[tuple], ids: dict) -> list[np.ndarray]:
    # Per rank: its table's ids in one global numbering (first seen first).
    # Ranks usually send equal tables; each distinct one is mapped once.
    per_table: dict = {}
    out = []
    for t in tables:
        m = per_table.get(id(t))
        if m is None:
            m = np.fromiter((ids.setdefault(x, len(ids)) for x in t), np.int64, len(t))
            per_table[id(t)] = m
        out.append(m)
    return out


def _storage_size(size: tuple[int, ...], itemsize: int) -> int:
    # prod(size) * itemsize, exact up to int64 and any value beyond it once it
    # passes it: math.prod of a hostile 100,000-dim size is a bignum product
    # that takes minutes.
    if 0 in size:
        return 0
    n = itemsize
    for d in size:
        n *= d
        if not -_INT64_MAX <= n <= _INT64_MAX:
            return n
    return n


def _mapped(local: list[np.ndarray], maps: list[np.ndarray]) -> np.ndarray:
    # Every rank's local ids (-1 stays -1) in the global numbering, concatenated.
    # Ranks that sent the same table share one map: then a single gather.
    if not local:
        return np.zeros(0, dtype=np.int64)
    if all(m is maps[0] for m in maps):
        ids = np.concatenate(local)
        return np.append(maps[0], -1)[ids]  # id -1 indexes the appended -1
    return np.concatenate([np.append(m, -1)[ids] for m, ids in zip(maps, local)])


def plan_columns(
    ranks: Sequence[WriteColumns],
    *,
    dedup: bool,
    save_to_lowest_rank: bool,
    itemsize: Callable[[str], int],
) -> ColumnPlan | None:
    """torch's dedup, global plan and validation over every rank's columns.

    Equal to ``dedup_save_plans`` (when ``dedup``), then
    ``create_default_global_save_plan`` with index hints rewritten, then
    ``_validate_global_plan``, for the layouts it covers; ``None`` for the
    others (see the module docstring), and for any layout with a validation
    finding, so the caller can produce torch's messages from objects.
    ``itemsize(dtype_name)`` gives a dtype's bytes per element.
    """
    P = len(ranks)
    fqn_ids: dict[str, int] = {}
    prop_ids: dict[Props, int] = {}
    fmaps = _global_ids([c.fqns for c in ranks], fqn_ids)
    pmaps = _global_ids([c.props for c in ranks], prop_ids)
    gprops: list[Props] = list(prop_ids)
    pnd = np.array([len(p[5]) for p in gprops] + [-1], dtype=np.int64)
    psize = []
    for p in gprops:
        s = _storage_size(p[5], itemsize(p[0]))
        psize.append(s or 1)
    if psize and max(psize) > _INT64_MAX:
        return None
    psize_a = np.array(psize + [1], dtype=np.int64)
    counts = np.array([len(c) for c in ranks], dtype=np.int64)
    n = int(counts.sum())
    fid = _mapped([c.fid for c in ranks], fmaps)
    pid = _mapped([c.pid for c in ranks], pmaps)
    kind = np.concatenate([c.kind for c in ranks] or [np.zeros(0, np.int8)])
    offs = np.concatenate([c.offsets for c in ranks] or [np.zeros(0, np.int64)])
    sizes = np.concatenate([c.sizes for c in ranks] or [np.zeros(0, np.int64)])
    nd = pnd[pid]
    ptr = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(np.maximum(nd, 0)[:-1], out=ptr[1:])
    plan = np.repeat(np.arange(P, dtype=np.int32), counts)

    keep_all: np.ndarray | None = None
    if dedup:
        got = dedup_columns(fid, plan, nd.astype(np.int32), ptr, offs, psize_a[pid], P,
                            save_to_lowest_rank)
        if got is None:
            return None
        if got[1]:
            keep_all = got[0]

    # Metadata order, chunk rows and hints in one streaming pass (a sort of
    # every kept item by fqn would gather them from all over the columns).
    rows = chunk_rows(fid, kind, pid, nd, ptr, offs, sizes, keep_all, len(fqn_ids))
    if rows is None:
        # A fqn a non-shard item writes twice (torch raises), or items of one
        # fqn with different properties or kinds.
        return None
    md_order, md_pid, row_ptr, val_ptr, c_offs, c_sizes, hints = rows
    md_props: list[Props | None] = [None if p < 0 else gprops[p] for p in md_pid.tolist()]
    names = list(fqn_ids)
    result = ColumnPlan(
        keep=[], hints=[], fqns=[names[f] for f in md_order.tolist()], props=md_props,
        chunk_ptr=row_ptr, val_ptr=val_ptr, chunk_offsets=c_offs, chunk_sizes=c_sizes)
    if not _valid(result, multi=P > 1):
        return None

    bounds = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    for r in range(P):
        a, b = int(bounds[r]), int(bounds[r + 1])
        k = None if keep_all is None else keep_all[a:b]
        result.keep.append(None if k is None or k.all() else k)
        result.hints.append(hints[a:b])
    return result


def _valid(cp: ColumnPlan, multi: bool) -> bool:
    # torch's validation finds nothing (out-of-bounds chunk, overlap, or with
    # more than one plan a volume that is not the tensor's).
    for f, p in enumerate(cp.props):
        if p is None or len(p[5]) == 0:
            continue
        offs, sizes = cp.chunks(f)
        tsize = np.array(p[5], dtype=np.int64)
        oob, vol, pairs = _check_tensor(np.ascontiguousarray(offs), np.ascontiguousarray(sizes),
                                        tsize)
        if len(oob) or len(pairs) or vol is None:
            return False
        if multi and vol != math.prod(p[5]):
            return False
    return True


def merged_mapping(maps: Sequence[Any]) -> dict:
    """``dict(ChainMap(*maps))`` for plans whose planner data is a mapping.

    Ranks usually send the same map: when every map is the same object the
    merge is a copy of it.
    """
    if maps and all(m is maps[0] for m in maps):
        return dict(maps[0])
    from collections import ChainMap
    return dict(ChainMap(*maps))


@dataclass(frozen=True, eq=False)
class ResultColumns:
    """One rank's write results (``FileSystemWriter``'s) as columns.

    Tables ``fqns`` and ``paths``; per result ``fid``, ``nd`` (values of the
    index offset, -1 when it is None), ``hint`` (the index hint, -1 when
    None), ``nbytes`` (``size_in_bytes``), ``path`` (into ``paths``),
    ``offset`` and ``length`` (the ``_StorageInfo``'s); ``offsets`` holds the
    index offsets back to back; ``transforms`` maps a result's position to
    its ``transform_descriptors`` when they are not None.
    """

    fqns: tuple[str, ...]
    paths: tuple[str, ...]
    fid: np.ndarray
    nd: np.ndarray
    hint: np.ndarray
    nbytes: np.ndarray
    path: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    offsets: np.ndarray
    transforms: dict[int, list[str]]

    def __len__(self) -> int:
        return len(self.fid)


_RESULT_COLUMNS = ("fid", "nd", "hint", "nbytes", "path", "offset", "length")


def pack_result_columns(rc: ResultColumns) -> tuple[int, bytes, bytes, bytes]:
    """``(FORMAT_VERSION, fqn table, paths and transforms, columns)``, each part compressed.

    The fqn table is packed as a write plan's (ranks usually send equal
    ones, which the receiver decodes once); paths and transforms are JSON;
    the columns int64 byte planes.
    """
    n = len(rc.fid)
    tables = json.dumps([list(rc.paths), [[k, v] for k, v in sorted(rc.transforms.items())]])
    header = np.array([n, len(rc.offsets)], dtype="<i8").tobytes()
    body = b"".join([header] + [_shuffle(np.asarray(getattr(rc, c), dtype=np.int64))
                                for c in _RESULT_COLUMNS] + [_shuffle(rc.offsets)])
    return (FORMAT_VERSION, _deflate(json.dumps(list(rc.fqns)).encode()),
            _deflate(tables.encode()), _deflate(body))


def unpack_result_columns(parts: object, *, _tables: dict | None = None) -> ResultColumns:
    """The :class:`ResultColumns` :func:`pack_result_columns` packed, checked.

    Raises :class:`CompactPlanError` naming what is damaged or inconsistent.
    ``_tables`` caches decoded fqn tables by their packed bytes.
    """
    parts = _check_parts(parts, "compact write results",
                         ("fqn table", "paths and transforms", "columns"))
    fqns = _cached_fqn_table({} if _tables is None else _tables, parts[1])
    text = _inflate(parts[2], "write result paths and transforms")
    try:
        tables = json.loads(text)
    except (ValueError, RecursionError):
        raise CompactPlanError("compact write results: paths and transforms are not JSON") from None
    if not (type(tables) is list and len(tables) == 2 and all(type(t) is list for t in tables)
            and all(type(p) is str for p in tables[0])):
        raise CompactPlanError("compact write results: tables are not (paths, transforms)")
    body = _inflate(parts[3], "write result columns")
    if len(body) < 16:
        raise CompactPlanError("compact write results: columns header is truncated")
    n, v = (int(x) for x in np.frombuffer(body[:16], "<i8"))
    k = len(_RESULT_COLUMNS)
    if n < 0 or v < 0 or len(body) != 16 + 8 * (k * n + v):
        raise CompactPlanError("compact write results: column lengths disagree with the header")
    cols = [_unshuffle(body[16 + 8 * n * i:16 + 8 * n * (i + 1)], n) for i in range(k)]
    offsets = _unshuffle(body[16 + 8 * n * k:], v)
    fid, nd, hint, nbytes, path, offset, length = cols
    paths = tuple(tables[0])
    if n and (fid.min() < 0 or fid.max() >= len(fqns)):
        raise CompactPlanError("compact write results: an fqn id is out of range")
    if n and (path.min() < 0 or path.max() >= len(paths)):
        raise CompactPlanError("compact write results: a path id is out of range")
    if n and (nd.min() < -1 or hint.min() < -1 or nbytes.min() < 0 or offset.min() < 0
              or length.min() < 0):
        raise CompactPlanError("compact write results: a negative count, offset or length")
    # Bounded first, so that the sum below cannot wrap.
    if n and (nd.max() > v or int(np.maximum(nd, 0).sum()) != v):
        raise CompactPlanError("compact write results: index offsets disagree with their counts")
    transforms: dict[int, list[str]] = {}
    for row in tables[1]:
        if not (type(row) is list and len(row) == 2 and type(row[0]) is int and 0 <= row[0] < n
                and type(row[1]) is list and all(type(t) is str for t in row[1])):
            raise CompactPlanError("compact write results: a transform row is malformed")
        transforms[row[0]] = row[1]
    return ResultColumns(fqns, paths, fid, nd, hint, nbytes, path, offset, length, offsets,
                         transforms)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def storage_columns(names: Sequence[str], results: Sequence[ResultColumns]) -> dict[str, Any] | None:
    """Every rank's write results as the storage part of a ``MetadataColumns``, in torch's order.

    ``results`` are the ranks' :class:`ResultColumns` in rank order (what
    ``FileSystemWriter.finish`` receives, each in its rank's order);
    ``names`` the metadata's fqns, which keep their ids (an fqn of no
    tensor becomes an extra name). Returns the keyword arguments of
    :class:`~ckcore.mdcolumns.MetadataColumns` for the storage entries
    (``extra_names``, ``st_*``, ``paths``), or None when two results share
    a key (fqn and offset): torch's dict then keeps the first key with the
    last value, and the caller builds that from objects.
    """
    ids = {f: i for i, f in enumerate(names)}
    extra: list[str] = []
    paths: list[str] = []
    path_ids: dict[str, int] = {}

    def name_id(f: str) -> int:
        i = ids.get(f)
        if i is None:
            i = ids[f] = len(names) + len(extra)
            extra.append(f)
        return i

    def path_id(p: str) -> int:
        i = path_ids.get(p)
        if i is None:
            i = path_ids[p] = len(paths)
            paths.append(p)
        return i

    # Ranks usually share one fqn table: map each distinct table once.
    fqn_maps: dict[tuple[str, ...], np.ndarray] = {}
    cols: list[list[np.ndarray]] = [[] for _ in range(6)]
    offsets: list[np.ndarray] = []
    transforms: dict[int, list[str]] = {}
    row = 0
    for rc in results:
        fmap = fqn_maps.get(rc.fqns)
        if fmap is None:
            fmap = fqn_maps[rc.fqns] = np.array([name_id(f) for f in rc.fqns], dtype=np.int64)
        pmap = np.array([path_id(p) for p in rc.paths], dtype=np.int64)
        for c, v in zip(cols, (fmap[rc.fid], rc.nd, rc.hint, pmap[rc.path], rc.offset,
                               rc.length)):
            c.append(v)
        offsets.append(rc.offsets)
        for k, t in rc.transforms.items():
            transforms[row + k] = t
        row += len(rc)
    st_fqn, st_nd, st_index, st_path, st_foff, st_len = (_concat(c) for c in cols)
    st_vals = _concat(offsets)
    if row and not _distinct_keys(st_fqn, st_nd, st_vals):
        return None
    return dict(extra_names=extra, st_fqn=st_fqn, st_offset_ndim=st_nd, st_offset_values=st_vals,
                st_index=st_index, st_path=st_path, paths=paths, st_file_offset=st_foff,
                st_length=st_len, st_transforms=transforms)


def _distinct_keys(fid: np.ndarray, nd: np.ndarray, offs: np.ndarray) -> bool:
    """Whether no two rows share fqn id and offsets (the hashed entry pass of the dedup kernel)."""
    n = len(fid)
    ptr = np.zeros(n, dtype=np.int64)
    np.cumsum(np.maximum(nd[:-1], 0), out=ptr[1:])
    got = dedup_columns(np.ascontiguousarray(fid, dtype=np.int64), np.zeros(n, dtype=np.int32),
                        nd.astype(np.int32), ptr, np.ascontiguousarray(offs, dtype=np.int64),
                        np.ones(n, dtype=np.int64), 1, True)
    return got is not None and not got[1]
