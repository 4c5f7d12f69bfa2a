"""torch's plan objects to and from ckcore's compact forms (see :mod:`ckcore.compact`).

What travels when both ends are ckcore's planners:

* a local save plan's ``items`` are a :class:`SentWriteItems` (a real
  ``list`` of the rank's ``WriteItem`` objects) and its ``planner_data`` a
  :class:`SentMapping` (a real ``dict``); pickled, they become
  :class:`WriteItemColumns` and :class:`MappingColumns`, which hold packed
  columns and behave as a list of ``WriteItem`` / a mapping for any code
  that touches them, building the objects only then;
* the global plan sent back to a rank holds :class:`GlobalWriteItems`: the
  columns the rank sent, which of its items dedup kept and their index
  hints. ``FastSavePlanner.finish_plan`` rebuilds the plan from the rank's
  own objects after checking that the columns are the ones it sent;
* a local load plan's ``items`` are a :class:`LocalReadItems` (a real
  list). When the coordinator's step cannot change read items it pickles
  as a :class:`ReadItemsTicket` (a count and a token: no items), and
  ``FastLoadPlanner.finish_plan`` puts the rank's own list back.

Anything these forms cannot represent exactly travels as torch's objects.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    ReadItem,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from ckcore.compact import (
    BYTE_IO,
    FORMAT_VERSION,
    SHARD,
    TENSOR,
    CompactPlanError,
    ResultColumns,
    WriteColumns,
    _deflate,
    _inflate,
    pack_mapping,
    pack_result_columns,
    pack_write_columns,
    unpack_mapping,
    unpack_result_columns,
    unpack_write_columns,
)

__all__ = [
    "GlobalWriteItems",
    "LocalReadItems",
    "MappingColumns",
    "ReadItemColumns",
    "ReadItemsTicket",
    "SentMapping",
    "SentWriteItems",
    "SentWriteResults",
    "WriteItemColumns",
    "WriteResultColumns",
]

_KIND = {WriteItemType.TENSOR: TENSOR, WriteItemType.SHARD: SHARD, WriteItemType.BYTE_IO: BYTE_IO}
_TYPE = {v: k for k, v in _KIND.items()}
_INT64_MAX = (1 << 63) - 1

# The columns hold exactly these fields; a torch with other fields sends objects.
_SUPPORTED = (
    tuple(f.name for f in dataclasses.fields(WriteItem))
    == ("index", "type", "bytes_io_data", "tensor_data")
    and tuple(f.name for f in dataclasses.fields(TensorProperties))
    == ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
    and tuple(f.name for f in dataclasses.fields(TensorWriteData)) == ("chunk", "properties", "size")
)


def _torch_attr(name: object, kind: type) -> Any:
    # torch.<name> for a name like "torch.bfloat16", only if it is a `kind`.
    if type(name) is not str or not name.startswith("torch."):
        raise CompactPlanError(f"compact plan: {name!r} is not a torch {kind.__name__}")
    v = getattr(torch, name[6:], None)
    if not isinstance(v, kind):
        raise CompactPlanError(f"compact plan: {name[:80]!r} is not a torch {kind.__name__}")
    return v


def _props_key(pr: Any, size: torch.Size) -> tuple | None:
    if type(pr.requires_grad) is not bool or type(pr.pin_memory) is not bool:
        return None
    names = (str(pr.dtype), str(pr.layout), str(pr.memory_format))
    try:
        if (_torch_attr(names[0], torch.dtype) is not pr.dtype
                or _torch_attr(names[1], torch.layout) is not pr.layout
                or _torch_attr(names[2], torch.memory_format) is not pr.memory_format):
            return None
    except CompactPlanError:
        return None
    if any(type(s) is not int or not 0 <= s <= _INT64_MAX for s in size):
        return None
    return (names[0], names[1], pr.requires_grad, names[2], pr.pin_memory, tuple(size))


def write_columns(items: Sequence[Any]) -> WriteColumns | None:
    """``items`` as :class:`WriteColumns`, or None if they are not all plain torch write items.

    Packed: torch's own ``WriteItem``/``MetadataIndex``/``TensorWriteData``
    classes (not subclasses), index hints None, no ``bytes_io_data``, a tensor item's index offset
    equal to its chunk's offsets, offsets/sizes ``torch.Size`` of int64
    values with as many dimensions as the tensor.
    """
    if not _SUPPORTED:
        return None
    fqn_ix: dict[str, int] = {}
    prop_ix: dict[tuple, int] = {}
    rows: dict[tuple, tuple | None] = {}
    props: list[tuple] = []
    fid: list[int] = []
    kind: list[int] = []
    pid: list[int] = []
    vals_o: list[int] = []
    vals_s: list[int] = []
    for it in items:
        if type(it) is not WriteItem or it.bytes_io_data is not None:
            return None
        idx = it.index
        if type(idx) is not MetadataIndex or idx.index is not None or type(idx.fqn) is not str:
            return None
        k = _KIND.get(it.type)
        td = it.tensor_data
        if k is None:
            return None
        if k == BYTE_IO:
            if td is not None or idx.offset is not None:
                return None
            p = -1
        else:
            if type(td) is not TensorWriteData or type(td.chunk) is not ChunkStorageMetadata \
                    or type(td.properties) is not TensorProperties or type(td.size) is not torch.Size:
                return None
            o, s = td.chunk.offsets, td.chunk.sizes
            if type(o) is not torch.Size or type(s) is not torch.Size \
                    or type(idx.offset) is not torch.Size or idx.offset != o \
                    or len(o) != len(td.size) or len(s) != len(td.size):
                return None
            # Items usually share one TensorProperties per tensor (or equal
            # ones): the row is computed once per object and size.
            key = (id(td.properties), td.size)
            row = rows.get(key)
            if row is None:
                row = rows[key] = _props_key(td.properties, td.size)
                if row is None:
                    return None
            p = prop_ix.get(row, -1)
            if p == -1:
                p = prop_ix[row] = len(props)
                props.append(row)
            vals_o.extend(o)
            vals_s.extend(s)
        kind.append(k)
        pid.append(p)
        fid.append(fqn_ix.setdefault(idx.fqn, len(fqn_ix)))
    try:
        offs = np.array(vals_o, dtype=np.int64)
        sizes = np.array(vals_s, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        return None
    return WriteColumns(tuple(fqn_ix), tuple(props), np.array(fid, dtype=np.int64),
                        np.array(kind, dtype=np.int8), np.array(pid, dtype=np.int64), offs, sizes)


def _torch_props(row: tuple) -> TensorProperties:
    return TensorProperties(
        dtype=_torch_attr(row[0], torch.dtype),
        layout=_torch_attr(row[1], torch.layout),
        requires_grad=row[2],
        memory_format=_torch_attr(row[3], torch.memory_format),
        pin_memory=row[4],
    )


def write_items(cols: WriteColumns, hints: np.ndarray | None = None,
                keep: np.ndarray | None = None) -> list[WriteItem]:
    """torch ``WriteItem`` objects from columns (only the kept ones, with ``hints`` if given)."""
    props = [(_torch_props(r), torch.Size(r[5])) for r in cols.props]
    starts = cols.starts().tolist()
    nds = cols.ndims().tolist()
    offs = cols.offsets.tolist()
    sizes = cols.sizes.tolist()
    fqns = cols.fqns
    out = []
    for i, (f, k, p) in enumerate(zip(cols.fid.tolist(), cols.kind.tolist(), cols.pid.tolist())):
        if keep is not None and not keep[i]:
            continue
        t = _TYPE[k]
        h = None if hints is None or hints[i] < 0 else int(hints[i])
        if k == BYTE_IO:
            out.append(WriteItem(index=MetadataIndex(fqns[f], None, h), type=t))
            continue
        a = starts[i]
        o = torch.Size(offs[a:a + nds[i]])
        pr, size = props[p]
        out.append(WriteItem(
            index=MetadataIndex(fqns[f], o, h), type=t,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(o, torch.Size(sizes[a:a + nds[i]])),
                properties=pr, size=size)))
    return out


class _LazySequence(Sequence):
    """A read-only sequence whose list is built on first use."""

    __slots__ = ("_list",)
    _list: list | None

    def _build(self) -> list:
        raise NotImplementedError

    def _items(self) -> list:
        lst = self._list
        if lst is None:
            lst = self._list = self._build()
        return lst

    def __len__(self) -> int:
        return len(self._items())

    def __getitem__(self, i: Any) -> Any:
        return self._items()[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, _LazySequence)):
            return self._items() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __copy__(self) -> list:
        return list(self._items())

    def __deepcopy__(self, memo: dict) -> list:
        return copy.deepcopy(self._items(), memo)


class WriteItemColumns(_LazySequence):
    """A rank's write items as received: packed columns, a list of ``WriteItem`` when touched."""

    __slots__ = ("parts", "_cols")

    def __init__(self, parts: Any) -> None:
        self.parts = parts
        self._cols: WriteColumns | None = None
        self._list = None

    def columns(self, tables: dict | None = None) -> WriteColumns:
        """The unpacked columns (checked; :class:`CompactPlanError` if damaged)."""
        if self._cols is None:
            self._cols = unpack_write_columns(self.parts, _tables=tables)
        return self._cols

    def _build(self) -> list:
        return write_items(self.columns())

    def __reduce__(self) -> Any:
        return (WriteItemColumns, (self.parts,))

    def __repr__(self) -> str:
        return f"<WriteItemColumns: {len(self.parts[3]) if isinstance(self.parts, tuple) and len(self.parts) == 4 else '?'} packed bytes>"


class SentWriteItems(list):
    """A local plan's write items: the rank's own list, pickled as :class:`WriteItemColumns`.

    Built only from items :func:`write_columns` can pack; if the list
    changes afterwards it is packed again when pickled (and sent as plain
    objects if it no longer packs).
    """

    def __init__(self, items: Sequence[WriteItem], cols: WriteColumns) -> None:
        super().__init__(items)
        self._keepalive = tuple(self)
        self.parts = pack_write_columns(cols)

    def current_parts(self, repack: bool = False) -> tuple | None:
        """The packed form of the list as it is now (None if it no longer packs).

        ``packed_items()`` are then exactly the items these parts describe,
        even if another thread changes the list meanwhile. The list is packed
        again when it holds other objects than at the last packing, or always
        with ``repack`` (an item's chunk and properties are mutable objects:
        only packing again sees them changed in place).
        """
        now = tuple(self)
        if repack or len(now) != len(self._keepalive) or any(
                a is not b for a, b in zip(now, self._keepalive)):
            cols = write_columns(now)
            if cols is None:
                return None
            self.parts = pack_write_columns(cols)
            self._keepalive = now
        return self.parts

    def packed_items(self) -> tuple:
        """The items the last packed parts describe (the list as it was then)."""
        return self._keepalive

    def __reduce_ex__(self, protocol: Any) -> Any:
        parts = self.current_parts()
        if parts is None:
            return (list, (list(self),))
        return (WriteItemColumns, (parts,))

    def __copy__(self) -> list:
        return list(self)

    def __deepcopy__(self, memo: dict) -> list:
        return copy.deepcopy(list(self), memo)


class GlobalWriteItems(_LazySequence):
    """A rank's items in the global plan: its packed columns, which items it keeps, their hints."""

    __slots__ = ("parts", "keep", "hints")

    @classmethod
    def from_arrays(cls, parts: Any, keep: np.ndarray | None, hints: np.ndarray) -> GlobalWriteItems:
        """Pack ``keep`` (uint8 per item, or None: all kept) and ``hints`` (int64 per item)."""
        return cls(parts, None if keep is None else _deflate(keep.astype(np.uint8).tobytes()),
                   _deflate(hints.astype("<i8").tobytes()))

    def __init__(self, parts: Any, keep: bytes | None, hints: bytes) -> None:
        self.parts = parts
        self.keep = keep
        self.hints = hints
        self._list = None

    def arrays(self, n: int) -> tuple[np.ndarray | None, np.ndarray]:
        """``(keep, hints)`` for a rank with ``n`` items, checked."""
        try:
            hints = np.frombuffer(_inflate(self.hints, "hints column"), "<i8")
            keep = None if self.keep is None else np.frombuffer(
                _inflate(self.keep, "keep column"), np.uint8)
        except (TypeError, ValueError):
            raise CompactPlanError("compact global plan: hints or keep column is damaged") from None
        if len(hints) != n or (keep is not None and len(keep) != n):
            raise CompactPlanError(
                f"compact global plan: {len(hints)} hints for a plan of {n} items")
        return keep, hints

    def _build(self) -> list:
        cols = unpack_write_columns(self.parts)
        keep, hints = self.arrays(len(cols))
        return write_items(cols, hints, keep)

    def __reduce__(self) -> Any:
        return (GlobalWriteItems, (self.parts, self.keep, self.hints))

    def __repr__(self) -> str:
        return "<GlobalWriteItems>"


class MappingColumns(Mapping):
    """A flattening map as received: packed JSON, a dict when touched."""

    __slots__ = ("blob", "_dict")

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self._dict: dict | None = None

    def as_dict(self, cache: dict | None = None) -> dict:
        """The map (decoded once; ``cache`` shares decodings of equal blobs)."""
        if self._dict is None:
            d = None if cache is None else cache.get(self.blob)
            if d is None:
                d = unpack_mapping(self.blob)
                if cache is not None:
                    cache[self.blob] = d
            self._dict = d
        return self._dict

    def __getitem__(self, k: Any) -> Any:
        return self.as_dict()[k]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __reduce__(self) -> Any:
        return (MappingColumns, (self.blob,))


class SentMapping(dict):
    """A local plan's flattening map: the rank's own dict, pickled as :class:`MappingColumns`."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        blob = pack_mapping(self)
        if blob is None:
            return (dict, (dict(self),))
        return (MappingColumns, (blob,))

    def __copy__(self) -> dict:
        return dict(self)

    def __deepcopy__(self, memo: dict) -> dict:
        return copy.deepcopy(dict(self), memo)


class ReadItemsTicket(Sequence):
    """A load plan's items left on their rank: only their count and the rank's token travel.

    The coordinator's step for the file-system readers returns plans
    unchanged, so nothing there reads items; anything that does gets a
    :class:`CompactPlanError`, never a silently empty plan.
    """

    # The item count is ``n_items``: a ``count`` attribute would hide
    # Sequence.count(), and code calling it must get the error below.
    __slots__ = ("n_items", "token", "version")

    def __init__(self, version: int, n_items: int, token: bytes) -> None:
        self.version = version
        self.n_items = n_items
        self.token = token

    def __len__(self) -> int:
        return self.n_items

    def _refuse(self) -> Any:
        raise CompactPlanError(
            "this load plan's read items stayed on their rank (ckcore's FastLoadPlanner with "
            "a file-system reader); a coordinator step that reads them needs the plain form")

    def __getitem__(self, i: Any) -> Any:
        return self._refuse()

    def __iter__(self) -> Iterator[Any]:
        return self._refuse()

    def __reduce__(self) -> Any:
        return (ReadItemsTicket, (self.version, self.n_items, self.token))

    def __repr__(self) -> str:
        return f"<ReadItemsTicket: {self.n_items} items kept on their rank>"


_LOAD_KIND = {LoadItemType.TENSOR: 0, LoadItemType.BYTE_IO: 1}
_LOAD_TYPE = {v: k for k, v in _LOAD_KIND.items()}


def _size_row(v: Any) -> list[int] | None:
    if type(v) is not torch.Size or any(not -_INT64_MAX - 1 <= x <= _INT64_MAX for x in v):
        return None
    return list(v)


def _index_row(idx: Any, fqns: dict[str, int]) -> list | None:
    if type(idx) is not MetadataIndex or type(idx.fqn) is not str:
        return None
    off: list[int] | None = None
    if idx.offset is not None:
        off = _size_row(idx.offset)
        if off is None:
            return None
    h = idx.index
    if h is not None and (type(h) is not int or not 0 <= h <= _INT64_MAX):
        return None
    return [fqns.setdefault(idx.fqn, len(fqns)), off, h]


def pack_read_items(items: Sequence[Any]) -> tuple[int, bytes] | None:
    """``(FORMAT_VERSION, packed)`` for plain torch read items, None for anything else.

    One row of ints per item (and an fqn table), as zlib-compressed JSON:
    exact for every value torch's read items hold, and no object per item
    on the receiving side until someone iterates the items.
    """
    fqns: dict[str, int] = {}
    rows = []
    for it in items:
        if type(it) is not ReadItem or it.type not in _LOAD_KIND:
            return None
        d = _index_row(it.dest_index, fqns)
        s = _index_row(it.storage_index, fqns)
        vals = [_size_row(it.dest_offsets), _size_row(it.storage_offsets), _size_row(it.lengths)]
        if d is None or s is None or None in vals:
            return None
        rows.append([_LOAD_KIND[it.type], d, s, *vals])
    return FORMAT_VERSION, _deflate(json.dumps([list(fqns), rows]).encode())


def _ints(v: object, what: str) -> torch.Size:
    if type(v) is not list or any(type(x) is not int or not -_INT64_MAX - 1 <= x <= _INT64_MAX
                                  for x in v):
        raise CompactPlanError(f"compact load plan: {what} is not a list of int64 values")
    return torch.Size(v)


def _read_index(row: object, fqns: list, what: str) -> MetadataIndex:
    if type(row) is not list or len(row) != 3 or type(row[0]) is not int \
            or not 0 <= row[0] < len(fqns):
        raise CompactPlanError(f"compact load plan: {what} is malformed or its fqn id is out of range")
    h = row[2]
    if h is not None and (type(h) is not int or h < 0):
        raise CompactPlanError(f"compact load plan: {what} has a bad index hint")
    return MetadataIndex(fqns[row[0]], None if row[1] is None else _ints(row[1], what), h)


def read_items(parts: object) -> list[ReadItem]:
    """torch ``ReadItem`` objects from :func:`pack_read_items`'s output, checked."""
    if type(parts) is not tuple or len(parts) != 2 or parts[0] != FORMAT_VERSION:
        raise CompactPlanError(
            "compact load plan: not (version, packed) of this ckcore's format version "
            f"{FORMAT_VERSION} (every rank must run the same ckcore version)")
    text = _inflate(parts[1], "read items")
    try:
        table = json.loads(text)
    except (ValueError, RecursionError):
        raise CompactPlanError("compact load plan: read items are not JSON") from None
    if type(table) is not list or len(table) != 2 or type(table[0]) is not list \
            or type(table[1]) is not list or any(type(f) is not str for f in table[0]):
        raise CompactPlanError("compact load plan: read items are not (fqns, rows)")
    fqns, out = table[0], []
    for i, r in enumerate(table[1]):
        if type(r) is not list or len(r) != 6 or r[0] not in _LOAD_TYPE or type(r[0]) is not int:
            raise CompactPlanError(f"compact load plan: read item {i} is malformed")
        out.append(ReadItem(
            type=_LOAD_TYPE[r[0]],
            dest_index=_read_index(r[1], fqns, f"read item {i} dest_index"),
            dest_offsets=_ints(r[3], f"read item {i} dest_offsets"),
            storage_index=_read_index(r[2], fqns, f"read item {i} storage_index"),
            storage_offsets=_ints(r[4], f"read item {i} storage_offsets"),
            lengths=_ints(r[5], f"read item {i} lengths")))
    return out


class ReadItemColumns(_LazySequence):
    """A rank's read items as received: packed rows, a list of ``ReadItem`` when touched."""

    __slots__ = ("parts",)

    def __init__(self, parts: Any) -> None:
        self.parts = parts
        self._list = None

    def _build(self) -> list:
        return read_items(self.parts)

    def __reduce__(self) -> Any:
        return (ReadItemColumns, (self.parts,))

    def __repr__(self) -> str:
        return "<ReadItemColumns>"


class LocalReadItems(list):
    """A local load plan's read items: the rank's own list, sent compact.

    With ``stay`` true (nothing between this rank and its ``finish_plan``
    reads items) it pickles as a :class:`ReadItemsTicket`; otherwise as
    :class:`ReadItemColumns` when the items pack, else as a plain list.
    """

    def __init__(self, items: Sequence[Any], stay: bool = True,
                 coordinator_keeps: bool = True) -> None:
        super().__init__(items)
        self.token = secrets.token_bytes(16)
        self.stay = stay
        # The planner's class plans globally as torch's default (plans
        # unchanged): a reader whose own global step keeps items too may set
        # ``stay`` (RangeFileSystemReader.prepare_local_plan does).
        self.coordinator_keeps = coordinator_keeps
        self._keepalive = tuple(self)

    def unchanged(self) -> bool:
        """True when the list still holds exactly the items it was made with."""
        return len(self) == len(self._keepalive) and all(
            a is b for a, b in zip(self, self._keepalive))

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.stay:
            return (ReadItemsTicket, (FORMAT_VERSION, len(self), self.token))
        parts = pack_read_items(self)
        if parts is None:
            return (list, (list(self),))
        return (ReadItemColumns, (parts,))

    def __copy__(self) -> list:
        return list(self)

    def __deepcopy__(self, memo: dict) -> list:
        return copy.deepcopy(list(self), memo)


def result_columns(results: Sequence[Any]) -> ResultColumns | None:
    """``FileSystemWriter``'s write results as columns, or None if any is not exactly that form."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    fqn_ix: dict[str, int] = {}
    path_ix: dict[str, int] = {}
    cols: list[list[int]] = [[] for _ in range(7)]
    offsets: list[int] = []
    transforms: dict[int, list[str]] = {}
    for i, wr in enumerate(results):
        if type(wr) is not WriteResult or type(wr.storage_data) is not _StorageInfo:
            return None
        idx, info = wr.index, wr.storage_data
        if type(idx) is not MetadataIndex or type(idx.fqn) is not str \
                or type(info.relative_path) is not str or type(wr.size_in_bytes) is not int \
                or type(info.offset) is not int or type(info.length) is not int:
            return None
        if set(vars(info)) != {"relative_path", "offset", "length", "transform_descriptors"}:
            return None
        td = info.transform_descriptors
        if td is not None:
            if type(td) is not list or any(type(t) is not str for t in td):
                return None
            transforms[i] = td
        h = idx.index
        if h is not None and (type(h) is not int or h < 0):
            return None
        nd = -1
        if idx.offset is not None:
            if type(idx.offset) is not torch.Size:
                return None
            nd = len(idx.offset)
            offsets.extend(idx.offset)
        for c, v in zip(cols, (fqn_ix.setdefault(idx.fqn, len(fqn_ix)), nd,
                               -1 if h is None else h, wr.size_in_bytes,
                               path_ix.setdefault(info.relative_path, len(path_ix)),
                               info.offset, info.length)):
            c.append(v)
    try:
        arrays = [np.array(c, dtype=np.int64) for c in cols]
        offs = np.array(offsets, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        return None
    if len(results) and min(int(a.min()) for a in arrays[3:]) < 0:
        return None
    a_fid, a_nd, a_hint, a_nbytes, a_path, a_offset, a_length = arrays
    return ResultColumns(tuple(fqn_ix), tuple(path_ix), a_fid, a_nd, a_hint, a_nbytes, a_path,
                         a_offset, a_length, offs, transforms)


def write_results(rc: ResultColumns) -> list[Any]:
    """torch ``WriteResult`` objects (with ``_StorageInfo``) from columns."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    out = []
    at = 0
    offs = rc.offsets.tolist()
    rows = zip(rc.fid.tolist(), rc.nd.tolist(), rc.hint.tolist(), rc.nbytes.tolist(),
               rc.path.tolist(), rc.offset.tolist(), rc.length.tolist())
    for i, (f, nd, h, nb, p, o, ln) in enumerate(rows):
        off = None
        if nd >= 0:
            off = torch.Size(offs[at:at + nd])
            at += nd
        out.append(WriteResult(
            index=MetadataIndex(rc.fqns[f], off, None if h < 0 else h), size_in_bytes=nb,
            storage_data=_StorageInfo(rc.paths[p], o, ln,
                                      transform_descriptors=rc.transforms.get(i))))
    return out


class WriteResultColumns(_LazySequence):
    """A rank's write results as received: packed columns, a list of ``WriteResult`` when touched."""

    __slots__ = ("parts", "_cols")

    def __init__(self, parts: Any) -> None:
        self.parts = parts
        self._cols: ResultColumns | None = None
        self._list = None

    def columns(self, tables: dict | None = None) -> ResultColumns:
        """The unpacked columns (checked; :class:`CompactPlanError` if damaged).

        ``tables`` (a dict shared across ranks) decodes each distinct fqn table once.
        """
        if self._cols is None:
            self._cols = unpack_result_columns(self.parts, _tables=tables)
        return self._cols

    def _build(self) -> list:
        return write_results(self.columns())

    def __reduce__(self) -> Any:
        return (WriteResultColumns, (self.parts,))

    def __repr__(self) -> str:
        return "<WriteResultColumns>"


class SentWriteResults(list):
    """A rank's write results: its own list, pickled as :class:`WriteResultColumns` when they pack."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        rc = result_columns(self)
        if rc is None:
            return (list, (list(self),))
        return (WriteResultColumns, (pack_result_columns(rc),))

    def __copy__(self) -> list:
        return list(self)

    def __deepcopy__(self, memo: dict) -> list:
        return copy.deepcopy(list(self), memo)
