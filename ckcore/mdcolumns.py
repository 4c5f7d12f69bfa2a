"""A DCP ``Metadata`` as columns: numpy arrays of chunks and storage records.

A checkpoint saved by a thousand ranks holds close to a million chunks and
as many ``storage_data`` entries. As objects (torch's or ckcore's) that is
several Python objects per chunk, built by every rank on load and walked by
every planner. :class:`MetadataColumns` holds the same content as a few
int64 arrays plus small Python tables, so that planning reads chunk boxes
straight from arrays and storage lookups need no ``MetadataIndex`` per
entry.

Layout (``n`` fqns, ``m`` storage entries):

* ``fqns``: the keys of ``state_dict_metadata``, in its order; ``kinds[i]``
  is :data:`TENSOR` or :data:`BYTES`; ``properties[i]`` is the tensor's
  ``(dtype, layout, requires_grad, memory_format, pin_memory)`` with names as
  :mod:`ckcore.metadata` uses them (None for a bytes item).
* ``size_ptr`` (n + 1) / ``size_values``: tensor ``i``'s global size is
  ``size_values[size_ptr[i]:size_ptr[i + 1]]`` (empty for a 0-d tensor and
  for a bytes item).
* ``chunk_ptr`` (n + 1): tensor ``i``'s chunks are rows ``chunk_ptr[i]`` to
  ``chunk_ptr[i + 1]``; their offsets and sizes are stored row after row in
  ``chunk_offsets`` / ``chunk_sizes`` (a row has the tensor's number of
  dimensions, so rows of different tensors have different widths);
  :meth:`MetadataColumns.chunks` returns them as ``(rows, ndim)`` views.
* storage entries, in ``storage_data`` order: ``st_fqn`` (an id into
  :attr:`names`, which begins with ``fqns``; names of entries for no fqn
  follow), ``st_offset_ndim`` (-1 for an index without offset, else the
  length of its offset, whose values follow one another in
  ``st_offset_values``), ``st_index`` (the index hint, -1 for None),
  ``st_path`` (an id into ``paths``; -1 for an entry that is not a
  FileSystemWriter record, whose value is then ``storage_other[row]``),
  ``st_file_offset``, ``st_length``; ``st_transforms`` maps the rows whose
  ``transform_descriptors`` is not None to it. ``storage_data`` None is
  ``storage_data_none``.
* ``planner_data``, ``storage_meta`` (a :class:`~ckcore.metadata.StorageMeta`
  or None) and ``version``: plain values, as in the dataclass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._saferepr import saferepr
from .dtypes import normalize_dtype
from .metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

__all__ = ["BYTES", "TENSOR", "MetadataColumns", "dumps_metadata"]

#: ``MetadataColumns.kinds`` value of a tensor.
TENSOR = 0
#: ``MetadataColumns.kinds`` value of a bytes item.
BYTES = 1

_I64 = np.dtype(np.int64)
_PROPERTY_NAMES = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


def _name(value: object, what: str) -> str:
    # torch's layouts and memory formats print as "torch.<name>".
    text = value if isinstance(value, str) else str(value)
    if not text:
        raise ValueError(f"{what} is empty")
    return text.removeprefix("torch.")


def _i64_array(value: Any, what: str, length: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - reported as the field's fault
        raise TypeError(f"{what} must be an int64 array: {e}") from None
    if arr.dtype != _I64:
        if arr.size == 0 and arr.dtype.kind in "fiub":
            arr = arr.astype(_I64)
        elif arr.dtype.kind in "iu":
            big = arr.size and arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max
            if big:
                raise ValueError(f"{what} has values beyond int64")
            arr = arr.astype(_I64)
        else:
            raise TypeError(f"{what} must be an int64 array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-d, got shape {arr.shape}")
    if length is not None and len(arr) != length:
        raise ValueError(f"{what} has {len(arr)} entries, want {length}")
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    return arr


def _check_ptr(ptr: np.ndarray, what: str, total: int) -> None:
    if len(ptr) == 0 or ptr[0] != 0:
        raise ValueError(f"{what} must start at 0")
    if len(ptr) > 1 and bool((np.diff(ptr) < 0).any()):
        raise ValueError(f"{what} must not decrease")
    if ptr[-1] != total:
        raise ValueError(f"{what} ends at {int(ptr[-1])}, but its values hold {total}")


def _nonneg(arr: np.ndarray, what: str, floor: int = 0) -> None:
    if arr.size and int(arr.min()) < floor:
        raise ValueError(f"{what} has a value below {floor}: {int(arr.min())}")


class MetadataColumns:
    """The content of a DCP ``Metadata`` as columns (see the module docstring for the layout).

    The constructor takes the columns themselves, validates them (lengths,
    pointer arrays, ids in range, values >= 0) and raises ``ValueError`` or
    ``TypeError`` naming the field at fault. A save-side planner builds one
    from its global plan this way; :meth:`from_metadata` builds one from
    metadata objects and the compiled reader from a ``.metadata`` file.
    Arrays are copied to read-only contiguous int64 arrays.

    >>> cols = MetadataColumns(
    ...     ["w", "extra"], kinds=[TENSOR, BYTES],
    ...     properties=[("float32", "strided", False, "contiguous_format", False), None],
    ...     size_ptr=[0, 2, 2], size_values=[4, 4],
    ...     chunk_ptr=[0, 2, 2], chunk_offsets=[0, 0, 2, 0], chunk_sizes=[2, 4, 2, 4])
    >>> offsets, sizes = cols.chunks("w")
    >>> offsets.tolist(), sizes.tolist()
    ([[0, 0], [2, 0]], [[2, 4], [2, 4]])
    >>> cols.to_metadata().state_dict_metadata["w"].chunks[1]
    ChunkStorageMetadata(offsets=(2, 0), sizes=(2, 4))
    """

    __slots__ = (
        "_fqn_ids",
        "_groups",
        "_lookup",
        "chunk_offsets",
        "chunk_ptr",
        "chunk_sizes",
        "chunk_value_ptr",
        "fqns",
        "kinds",
        "names",
        "paths",
        "planner_data",
        "properties",
        "size_ptr",
        "size_values",
        "st_file_offset",
        "st_fqn",
        "st_index",
        "st_length",
        "st_offset_ndim",
        "st_offset_ptr",
        "st_offset_values",
        "st_path",
        "st_transforms",
        "storage_data_none",
        "storage_meta",
        "storage_other",
        "version",
    )

    fqns: list[str]
    kinds: np.ndarray
    properties: list[tuple[str, str, bool, str, bool] | None]
    size_ptr: np.ndarray
    size_values: np.ndarray
    chunk_ptr: np.ndarray
    chunk_offsets: np.ndarray
    chunk_sizes: np.ndarray
    chunk_value_ptr: np.ndarray
    names: list[str]
    st_fqn: np.ndarray
    st_offset_ndim: np.ndarray
    st_offset_ptr: np.ndarray
    st_offset_values: np.ndarray
    st_index: np.ndarray
    st_path: np.ndarray
    paths: list[str]
    st_file_offset: np.ndarray
    st_length: np.ndarray
    st_transforms: dict[int, Any]
    storage_other: dict[int, Any]
    storage_data_none: bool
    planner_data: Any
    storage_meta: StorageMeta | None
    version: str | None

    def __init__(
        self,
        fqns: Sequence[str],
        *,
        kinds: Any,
        properties: Sequence[tuple[str, str, bool, str, bool] | None],
        size_ptr: Any,
        size_values: Any,
        chunk_ptr: Any,
        chunk_offsets: Any,
        chunk_sizes: Any,
        extra_names: Sequence[str] = (),
        st_fqn: Any = (),
        st_offset_ndim: Any = (),
        st_offset_values: Any = (),
        st_index: Any = (),
        st_path: Any = (),
        paths: Sequence[str] = (),
        st_file_offset: Any = (),
        st_length: Any = (),
        st_transforms: Mapping[int, Any] | None = None,
        storage_other: Mapping[int, Any] | None = None,
        storage_data_none: bool = False,
        planner_data: Any = None,
        storage_meta: StorageMeta | None = None,
        version: str | None = None,
    ) -> None:
        """Build the columns from arrays; see the class and module docstrings for each field.

        ``extra_names`` are names of storage entries for no fqn of
        ``state_dict_metadata`` (``st_fqn`` ids ``len(fqns)`` and up).
        """
        self.fqns = _str_list(fqns, "fqns")
        n = len(self.fqns)
        ids = {f: i for i, f in enumerate(self.fqns)}
        if len(ids) != n:
            raise ValueError("fqns has duplicates")
        self._fqn_ids = ids
        self.names = self.fqns + _str_list(extra_names, "extra_names")
        self.kinds = np.ascontiguousarray(_i64_array(kinds, "kinds", n).astype(np.int8))
        self.kinds.flags.writeable = False
        if n and not bool(np.isin(self.kinds, (TENSOR, BYTES)).all()):
            raise ValueError("kinds must be TENSOR (0) or BYTES (1)")
        self.properties = _properties(properties, self.kinds, n)
        self.size_ptr = _i64_array(size_ptr, "size_ptr", n + 1)
        self.size_values = _i64_array(size_values, "size_values")
        _check_ptr(self.size_ptr, "size_ptr", len(self.size_values))
        _nonneg(self.size_values, "size_values")
        ndim = np.diff(self.size_ptr)
        if n and bool((ndim[self.kinds == BYTES] != 0).any()):
            raise ValueError("size_ptr gives a bytes item dimensions")
        self.chunk_ptr = _i64_array(chunk_ptr, "chunk_ptr", n + 1)
        rows = np.diff(self.chunk_ptr)
        _check_ptr(self.chunk_ptr, "chunk_ptr", int(self.chunk_ptr[-1]) if n else 0)
        if n and bool((rows[self.kinds == BYTES] != 0).any()):
            raise ValueError("chunk_ptr gives a bytes item chunks")
        vptr = np.zeros(n + 1, dtype=np.int64)
        if n:
            np.cumsum(rows * ndim, out=vptr[1:])
        vptr.flags.writeable = False
        self.chunk_value_ptr = vptr
        self.chunk_offsets = _i64_array(chunk_offsets, "chunk_offsets", int(vptr[-1]))
        self.chunk_sizes = _i64_array(chunk_sizes, "chunk_sizes", int(vptr[-1]))
        _nonneg(self.chunk_offsets, "chunk_offsets")
        _nonneg(self.chunk_sizes, "chunk_sizes")

        self.st_fqn = _i64_array(st_fqn, "st_fqn")
        m = len(self.st_fqn)
        if m and (int(self.st_fqn.min()) < 0 or int(self.st_fqn.max()) >= len(self.names)):
            raise ValueError("st_fqn has an id outside fqns + extra_names")
        self.st_offset_ndim = _i64_array(st_offset_ndim, "st_offset_ndim", m)
        _nonneg(self.st_offset_ndim, "st_offset_ndim", -1)
        optr = np.zeros(m + 1, dtype=np.int64)
        if m:
            np.cumsum(np.maximum(self.st_offset_ndim, 0), out=optr[1:])
        optr.flags.writeable = False
        self.st_offset_ptr = optr
        self.st_offset_values = _i64_array(st_offset_values, "st_offset_values", int(optr[-1]))
        _nonneg(self.st_offset_values, "st_offset_values")
        self.st_index = _i64_array(st_index, "st_index", m)
        _nonneg(self.st_index, "st_index", -1)
        self.paths = _str_list(paths, "paths")
        self.st_path = _i64_array(st_path, "st_path", m)
        if m and (int(self.st_path.min()) < -1 or int(self.st_path.max()) >= len(self.paths)):
            raise ValueError("st_path has an id outside paths (or below -1)")
        self.st_file_offset = _i64_array(st_file_offset, "st_file_offset", m)
        self.st_length = _i64_array(st_length, "st_length", m)
        _nonneg(self.st_file_offset, "st_file_offset")
        _nonneg(self.st_length, "st_length")
        self.st_transforms = _row_map(st_transforms, "st_transforms", m)
        self.storage_other = _row_map(storage_other, "storage_other", m)
        other_rows = set(np.flatnonzero(self.st_path == -1).tolist()) if m else set()
        if other_rows != set(self.storage_other):
            raise ValueError("storage_other must hold exactly the rows whose st_path is -1")
        if type(storage_data_none) is not bool:
            raise TypeError("storage_data_none must be a bool")
        if storage_data_none and m:
            raise ValueError("storage_data_none with storage rows")
        self.storage_data_none = storage_data_none
        if storage_meta is not None and not isinstance(storage_meta, StorageMeta):
            raise TypeError("storage_meta must be a ckcore StorageMeta or None, "
                            f"got {type(storage_meta).__name__}")
        if version is not None and not isinstance(version, str):
            raise TypeError(f"version must be a str or None, got {type(version).__name__}")
        self.planner_data = planner_data
        self.storage_meta = storage_meta
        self.version = version
        self._lookup: dict[int, dict[bytes, int]] | None = None

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        """The number of fqns."""
        return len(self.fqns)

    @property
    def n_chunks(self) -> int:
        """The number of chunks of all tensors."""
        return int(self.chunk_ptr[-1])

    @property
    def n_storage(self) -> int:
        """The number of storage entries."""
        return len(self.st_fqn)

    def fqn_id(self, fqn: str) -> int:
        """The row of ``fqn`` in :attr:`fqns`; KeyError if the metadata has no such fqn."""
        try:
            return self._fqn_ids[fqn]
        except (KeyError, TypeError):
            raise KeyError(f"no fqn {saferepr(fqn)} in the metadata") from None

    def _id(self, fqn_or_id: str | int) -> int:
        if isinstance(fqn_or_id, str):
            return self.fqn_id(fqn_or_id)
        if type(fqn_or_id) is not int and not isinstance(fqn_or_id, np.integer):
            raise TypeError(f"want an fqn or an fqn id, got {type(fqn_or_id).__name__}")
        i = int(fqn_or_id)
        if not 0 <= i < len(self.fqns):
            raise IndexError(f"fqn id {i} out of range (0..{len(self.fqns) - 1})")
        return i

    def ndim(self, fqn_or_id: str | int) -> int:
        """The number of dimensions of a tensor (0 for a bytes item)."""
        i = self._id(fqn_or_id)
        return int(self.size_ptr[i + 1] - self.size_ptr[i])

    def size(self, fqn_or_id: str | int) -> tuple[int, ...]:
        """The global size of a tensor as a tuple of ints (``()`` for a bytes item)."""
        i = self._id(fqn_or_id)
        return tuple(self.size_values[self.size_ptr[i]:self.size_ptr[i + 1]].tolist())

    def chunks(self, fqn_or_id: str | int) -> tuple[np.ndarray, np.ndarray]:
        """A tensor's saved chunks: read-only ``(offsets, sizes)`` views of shape ``(rows, ndim)``."""
        i = self._id(fqn_or_id)
        nd = int(self.size_ptr[i + 1] - self.size_ptr[i])
        rows = int(self.chunk_ptr[i + 1] - self.chunk_ptr[i])
        a, b = int(self.chunk_value_ptr[i]), int(self.chunk_value_ptr[i + 1])
        return (self.chunk_offsets[a:b].reshape(rows, nd), self.chunk_sizes[a:b].reshape(rows, nd))

    def storage_row(self, fqn: str, offset: Sequence[int] | None = None) -> int:
        """The storage row of ``MetadataIndex(fqn, offset)``, or -1 if there is none.

        Equal to a ``storage_data`` lookup (the index hint plays no part);
        the table behind it is built per fqn on first use, from the arrays,
        without a ``MetadataIndex`` per entry.
        """
        fid = self._fqn_ids.get(fqn) if isinstance(fqn, str) else None
        if fid is None:
            if not isinstance(fqn, str) or fqn not in self.names:
                return -1
            fid = self.names.index(fqn)
        table = self._table(fid)
        key = b"-" if offset is None else np.asarray(tuple(offset), dtype=np.int64).tobytes()
        return table.get(key, -1)

    def _table(self, fid: int) -> dict[bytes, int]:
        if self._lookup is None:
            # Rows grouped by fqn once (a stable sort keeps dict order inside a group).
            order = np.argsort(self.st_fqn, kind="stable")
            bounds = np.searchsorted(self.st_fqn[order], np.arange(len(self.names) + 1))
            self._lookup = {}
            self._groups = (order, bounds)
        table = self._lookup.get(fid)
        if table is not None:
            return table
        order, bounds = self._groups
        table = {}
        vals, ptr, nd = self.st_offset_values, self.st_offset_ptr, self.st_offset_ndim
        for r in order[bounds[fid]:bounds[fid + 1]].tolist():
            key = b"-" if nd[r] < 0 else vals[ptr[r]:ptr[r + 1]].tobytes()
            table[key] = r  # the last of equal keys wins, as in a dict
        self._lookup[fid] = table
        return table

    def storage_info(self, row: int) -> Any:
        """The storage value of ``row``: a ckcore StorageInfo, or the foreign value kept for it."""
        from .checkpoint import StorageInfo

        if row in self.storage_other:
            return self.storage_other[row]
        return StorageInfo(self.paths[int(self.st_path[row])], int(self.st_file_offset[row]),
                           int(self.st_length[row]), self.st_transforms.get(row))

    def storage_offset(self, row: int) -> tuple[int, ...] | None:
        """The offset of storage row ``row``'s index (None for a bytes item)."""
        if self.st_offset_ndim[row] < 0:
            return None
        return tuple(self.st_offset_values[self.st_offset_ptr[row]:self.st_offset_ptr[row + 1]].tolist())

    def __eq__(self, other: object) -> bool:
        """Equal content: every column and value (the index hints included)."""
        if not isinstance(other, MetadataColumns):
            return NotImplemented
        arrays = ("kinds", "size_ptr", "size_values", "chunk_ptr", "chunk_offsets", "chunk_sizes",
                  "st_offset_ndim", "st_offset_values", "st_index", "st_file_offset", "st_length")
        if not all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays):
            return False
        if self.fqns != other.fqns or self.properties != other.properties:
            return False
        # Names and paths compare by value, not by the ids given to them.
        if [self.names[i] for i in self.st_fqn.tolist()] != [other.names[i] for i in other.st_fqn.tolist()]:
            return False
        if ([None if i < 0 else self.paths[i] for i in self.st_path.tolist()]
                != [None if i < 0 else other.paths[i] for i in other.st_path.tolist()]):
            return False
        return (self.st_transforms == other.st_transforms and self.storage_other == other.storage_other
                and self.storage_data_none == other.storage_data_none
                and self.planner_data == other.planner_data and self.storage_meta == other.storage_meta
                and self.version == other.version)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"MetadataColumns(fqns={len(self.fqns)}, chunks={self.n_chunks}, "
                f"storage_entries={self.n_storage}, version={self.version!r})")

    # ------------------------------------------------------------ conversions

    @classmethod
    def from_metadata(cls, md: Any) -> MetadataColumns:
        """Columns of a ``Metadata`` of ckcore's or torch's classes (duck-typed; the reference).

        Tensors are the items with ``chunks``; every other item is a bytes
        item. dtypes, layouts and memory formats become their names.
        Storage values with ``relative_path``, ``offset`` and ``length`` are
        FileSystemWriter records; others are kept as they are in
        :attr:`storage_other`. Raises ValueError/TypeError naming what is
        not metadata (a chunk with a different number of dimensions than its
        tensor, a negative or non-int shape).
        """
        sdm = getattr(md, "state_dict_metadata", None)
        if not isinstance(sdm, Mapping):
            raise TypeError(f"metadata has no state_dict_metadata mapping: {type(md).__name__}")
        fqns: list[str] = []
        kinds: list[int] = []
        props: list[tuple[str, str, bool, str, bool] | None] = []
        size_ptr, size_values, chunk_ptr, offs, sizes = [0], [], [0], [], []
        for fqn, item in sdm.items():
            fqns.append(fqn)
            chunks = getattr(item, "chunks", None)
            if chunks is None:
                kinds.append(BYTES)
                props.append(None)
                size_ptr.append(size_ptr[-1])
                chunk_ptr.append(chunk_ptr[-1])
                continue
            kinds.append(TENSOR)
            p = item.properties
            props.append((normalize_dtype(p.dtype), _name(p.layout, "layout"), p.requires_grad,
                          _name(p.memory_format, "memory_format"), p.pin_memory))
            shape = _ints(item.size, f"{saferepr(fqn)}: size")
            size_values.extend(shape)
            size_ptr.append(len(size_values))
            for j, c in enumerate(chunks):
                o = _ints(c.offsets, f"{saferepr(fqn)}: chunk {j} offsets")
                s = _ints(c.sizes, f"{saferepr(fqn)}: chunk {j} sizes")
                if len(o) != len(shape) or len(s) != len(shape):
                    raise ValueError(f"{saferepr(fqn)}: chunk {j} has {len(o)}/{len(s)} dimensions, "
                                     f"the tensor {len(shape)}")
                offs.extend(o)
                sizes.extend(s)
            chunk_ptr.append(chunk_ptr[-1] + len(chunks))
        ids = {f: i for i, f in enumerate(fqns)}
        extra: list[str] = []
        path_ids: dict[str, int] = {}
        st: dict[str, list] = {k: [] for k in ("fqn", "nd", "off", "index", "path", "foff", "len")}
        transforms: dict[int, Any] = {}
        other: dict[int, Any] = {}
        sd = getattr(md, "storage_data", None)
        if sd is not None and not isinstance(sd, Mapping):
            raise TypeError(f"storage_data must be a mapping or None, got {type(sd).__name__}")
        for row, (key, info) in enumerate((sd or {}).items()):
            fqn = key.fqn
            if not isinstance(fqn, str):
                raise TypeError(f"storage_data key {saferepr(key)}: fqn is not a str")
            fid = ids.get(fqn)
            if fid is None:
                fid = ids[fqn] = len(fqns) + len(extra)
                extra.append(fqn)
            st["fqn"].append(fid)
            offset = key.offset
            if offset is None:
                st["nd"].append(-1)
            else:
                o = _ints(offset, f"storage_data key {saferepr(fqn)}: offset")
                st["nd"].append(len(o))
                st["off"].extend(o)
            idx = getattr(key, "index", None)
            st["index"].append(-1 if idx is None else _ints((idx,), "storage_data index")[0])
            rp = getattr(info, "relative_path", None)
            if isinstance(rp, str) and hasattr(info, "offset") and hasattr(info, "length"):
                pid = path_ids.setdefault(rp, len(path_ids))
                st["path"].append(pid)
                st["foff"].append(info.offset)
                st["len"].append(info.length)
                td = getattr(info, "transform_descriptors", None)
                if td is not None:
                    transforms[row] = td
            else:
                st["path"].append(-1)
                st["foff"].append(0)
                st["len"].append(0)
                other[row] = info
        sm = getattr(md, "storage_meta", None)
        if sm is not None and not isinstance(sm, StorageMeta):
            sm = StorageMeta(checkpoint_id=sm.checkpoint_id, save_id=sm.save_id,
                             load_id=sm.load_id, modules=list(getattr(sm, "modules", [])))
        return cls(
            fqns, kinds=kinds, properties=props, size_ptr=size_ptr, size_values=size_values,
            chunk_ptr=chunk_ptr, chunk_offsets=offs, chunk_sizes=sizes, extra_names=extra,
            st_fqn=st["fqn"], st_offset_ndim=st["nd"], st_offset_values=st["off"],
            st_index=st["index"], st_path=st["path"], paths=list(path_ids),
            st_file_offset=st["foff"], st_length=st["len"], st_transforms=transforms,
            storage_other=other, storage_data_none=sd is None,
            planner_data=getattr(md, "planner_data", None), storage_meta=sm,
            version=getattr(md, "version", None),
        )

    def to_metadata(self) -> Metadata:
        """The same content as ckcore's :class:`~ckcore.metadata.Metadata` objects."""
        sdm: dict[str, Any] = {}
        for i, fqn in enumerate(self.fqns):
            p = self.properties[i]
            if p is None:
                sdm[fqn] = BytesStorageMetadata()
                continue
            offs, sizes = self.chunks(i)
            chunks = [ChunkStorageMetadata(tuple(o), tuple(s))
                      for o, s in zip(offs.tolist(), sizes.tolist())]
            sdm[fqn] = TensorStorageMetadata(TensorProperties(*p), self.size(i), chunks)
        storage: dict[MetadataIndex, Any] | None = None
        if not self.storage_data_none:
            storage = {}
            idx = self.st_index.tolist()
            for row, fid in enumerate(self.st_fqn.tolist()):
                key = MetadataIndex(self.names[fid], self.storage_offset(row),
                                    None if idx[row] < 0 else idx[row])
                storage[key] = self.storage_info(row)
        return Metadata(sdm, planner_data=self.planner_data, storage_data=storage,
                        storage_meta=self.storage_meta, version=self.version)


def _str_list(values: Sequence[str], what: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of str, not a single str")
    out = list(values)
    for v in out:
        if type(v) is not str:
            raise TypeError(f"{what} holds a {type(v).__name__}, want str: {saferepr(v)}")
    return out


def _ints(values: Any, what: str) -> list[int]:
    try:
        out = [int(v) for v in values] if not isinstance(values, (str, bytes)) else None
    except (TypeError, ValueError):
        out = None
    if out is None or any(isinstance(v, (float, bool)) for v in values):
        raise TypeError(f"{what} must be ints, got {saferepr(values)}")
    for v in out:
        if not 0 <= v < 2**63:
            raise ValueError(f"{what} has {v}, outside [0, 2**63)")
    return out


def _properties(props: Sequence[Any], kinds: np.ndarray, n: int) -> list[Any]:
    out = list(props)
    if len(out) != n:
        raise ValueError(f"properties has {len(out)} entries, want {n}")
    for i, p in enumerate(out):
        if kinds[i] == BYTES:
            if p is not None:
                raise ValueError(f"properties[{i}] must be None for a bytes item")
            continue
        if not isinstance(p, tuple) or len(p) != 5:
            raise TypeError(f"properties[{i}] must be a tuple of {_PROPERTY_NAMES}, got {saferepr(p)}")
        dtype, layout, rg, fmt, pin = p
        if normalize_dtype(dtype) != dtype:
            raise ValueError(f"properties[{i}]: dtype {saferepr(dtype)} is not a canonical name")
        if type(layout) is not str or type(fmt) is not str:
            raise TypeError(f"properties[{i}]: layout and memory_format must be names")
        if type(rg) is not bool or type(pin) is not bool:
            raise TypeError(f"properties[{i}]: requires_grad and pin_memory must be bools")
    return out


def _row_map(values: Mapping[int, Any] | None, what: str, m: int) -> dict[int, Any]:
    out = dict(values or {})
    for k in out:
        if type(k) is not int or not 0 <= k < m:
            raise ValueError(f"{what} has a key that is not a storage row: {saferepr(k)}")
    return out



# --------------------------------------------------------------------------
# Writing: MetadataColumns -> torch's .metadata pickle.
# --------------------------------------------------------------------------

_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
_MEM_FORMAT_CODES = {"contiguous_format": 0, "channels_last": 1, "preserve_format": 2}
_KEYS = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version",
         "properties", "size", "chunks", "offsets", "sizes", "fqn", "index", "offset",
         "relative_path", "length", "transform_descriptors", "checkpoint_id", "save_id",
         "load_id", "modules")
_GLOBALS = {
    "Metadata": (_DCP_MD, "Metadata"), "TSM": (_DCP_MD, "TensorStorageMetadata"),
    "Chunk": (_DCP_MD, "ChunkStorageMetadata"), "Bytes": (_DCP_MD, "BytesStorageMetadata"),
    "Index": (_DCP_MD, "MetadataIndex"), "SMeta": (_DCP_MD, "StorageMeta"),
    "Props": (_DCP_MD, "TensorProperties"), "MemFmt": (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    "Info": (_DCP_FS, "_StorageInfo"), "Size": ("torch", "Size"),
    "Layout": ("torch.serialization", "_get_layout"),
}
_I64_RANGE = (-(2**63), 2**63 - 1)


class _Writer:
    """The Python half of :func:`dumps_metadata`: prelude, small values, structure."""

    def __init__(self, cols: MetadataColumns) -> None:
        from ._kernels._mdwrite import Encoder

        self.cols = cols
        self.e = Encoder()
        self.m: dict[Any, int] = {}

    def push_text(self, s: str, tag: str = "s") -> int:
        # Pushes the str once: written and memoised the first time, BINGET after.
        key = (tag, s)
        idx = self.m.get(key)
        if idx is None:
            self.e.text(s)
            idx = self.m[key] = self.e.memoize()
        else:
            self.e.get(idx)
        return idx

    def push_global(self, module: str, name: str) -> int:
        key = ("g", module, name)
        idx = self.m.get(key)
        if idx is None:
            self.push_text(module)
            self.push_text(name)
            self.e.op(b"\x93")
            idx = self.m[key] = self.e.memoize()
        else:
            self.e.get(idx)
        return idx

    def prelude(self) -> None:
        # Every reused value memoised once, between MARK and POP_MARK (which
        # drops what the prelude pushed): the structure below only BINGETs them.
        cols = self.cols
        self.e.op(b"(")
        self.g = {k: self.push_global(*v) for k, v in _GLOBALS.items()}
        self.k = {k: self.push_text(k) for k in _KEYS}
        for p in cols.properties:
            if p is not None:
                self.push_global("torch", p[0])
                self.push_text("torch." + p[1], "layout")
        self.names = np.array([self.push_text(n) for n in cols.names], dtype=np.int64)
        self.paths = np.array([self.push_text(p) for p in cols.paths], dtype=np.int64)
        self.e.op(b"1")

    def value(self, x: Any, depth: int = 0) -> None:
        """A plain value (planner_data, storage_meta fields, transform descriptors)."""
        if depth > 100:
            raise ValueError("value nested too deep to write")
        e = self.e
        if x is None:
            e.op(b"N")
        elif x is True or x is False:
            e.op(b"\x88" if x else b"\x89")
        elif type(x) is int:
            if not _I64_RANGE[0] <= x <= _I64_RANGE[1]:
                raise ValueError(f"int {x} beyond int64 cannot be written from columns")
            e.integer(x)
        elif type(x) is float:
            import struct
            e.op(b"G" + struct.pack(">d", x))
        elif type(x) is str:
            e.text(x)
        elif type(x) is tuple:
            if not x:
                e.op(b")")
                return
            e.op(b"(")
            for v in x:
                self.value(v, depth + 1)
            e.op(b"t")
        elif type(x) is list:
            e.op(b"]")
            if x:
                e.op(b"(")
                for v in x:
                    self.value(v, depth + 1)
                e.op(b"e")
        elif type(x) is dict:
            e.op(b"}")
            if x:
                e.op(b"(")
                for k, v in x.items():
                    self.value(k, depth + 1)
                    self.value(v, depth + 1)
                e.op(b"u")
        elif isinstance(x, os.PathLike):
            # A path pickles as its class called on its parts (PurePath.__reduce__).
            reduced: Any = x.__reduce__()
            cls, args = reduced[0], reduced[1]
            self.push_global(cls.__module__, cls.__qualname__)
            self.value(tuple(args), depth + 1)
            e.op(b"R")
        else:
            raise TypeError(f"cannot write a {type(x).__name__} from columns")

    def props(self, p: tuple[str, str, bool, str, bool]) -> None:
        e, g = self.e, self.g
        code = _MEM_FORMAT_CODES.get(p[3])
        if code is None:
            raise ValueError(f"memory format {p[3]!r} has no encoding in torch's TensorProperties")
        e.get(g["Props"])
        e.op(b")\x81(")
        self.push_global("torch", p[0])
        e.get(g["Layout"])
        self.push_text("torch." + p[1], "layout")
        e.op(b"\x85R")
        e.op(b"\x88" if p[2] else b"\x89")
        e.get(g["MemFmt"])
        e.integer(code)
        e.op(b"\x85R")
        e.op(b"\x88" if p[4] else b"\x89")
        e.op(b"tb")

    def state_dict_metadata(self) -> None:
        cols, e, g, k = self.cols, self.e, self.g, self.k
        e.op(b"}")
        for start in range(0, len(cols.fqns), 1000):
            e.op(b"(")
            for i in range(start, min(start + 1000, len(cols.fqns))):
                e.get(int(self.names[i]))
                p = cols.properties[i]
                if p is None:
                    e.get(g["Bytes"])
                    e.op(b")\x81")
                    continue
                e.get(g["TSM"])
                e.op(b")\x81}(")
                e.get(k["properties"])
                self.props(p)
                e.get(k["size"])
                e.size(cols.size_values[cols.size_ptr[i]:cols.size_ptr[i + 1]], g["Size"])
                e.get(k["chunks"])
                e.chunk_lists(cols.chunk_ptr, cols.size_ptr, cols.chunk_offsets, cols.chunk_sizes,
                              i, g["Chunk"], g["Size"], k["offsets"], k["sizes"])
                e.op(b"ub")
            e.op(b"u")

    def storage_data(self) -> None:
        cols, e, g, k = self.cols, self.e, self.g, self.k
        if cols.storage_data_none:
            e.op(b"N")
            return
        e.op(b"}")
        m = cols.n_storage
        special = sorted(set(cols.st_transforms) | set(cols.storage_other))
        keys = np.array([g["Index"], g["Info"], g["Size"], k["fqn"], k["index"], k["offset"],
                         k["relative_path"], k["length"]], dtype=np.int64)
        st_path = np.maximum(cols.st_path, 0)
        bounds = sorted({0, m, *special, *(r + 1 for r in special), *range(0, m, 1000)})
        for a, b in zip(bounds, bounds[1:]):
            e.op(b"(")
            if a in cols.storage_other or a in cols.st_transforms:
                self.index(a)
                if a in cols.storage_other:
                    self.value(cols.storage_other[a])
                else:
                    self.info(a)
            else:
                e.storage_entries(a, b, self.names, cols.st_fqn, cols.st_offset_ndim,
                                  cols.st_offset_ptr, cols.st_offset_values, cols.st_index,
                                  self.paths, cols.st_path if not cols.storage_other else st_path,
                                  cols.st_file_offset, cols.st_length, keys)
            e.op(b"u")

    def index(self, row: int) -> None:
        cols, e, g, k = self.cols, self.e, self.g, self.k
        e.get(g["Index"])
        e.op(b")\x81}(")
        e.get(k["fqn"])
        e.get(int(self.names[cols.st_fqn[row]]))
        e.get(k["index"])
        idx = int(cols.st_index[row])
        self.value(None if idx < 0 else idx)
        if cols.st_offset_ndim[row] >= 0:
            e.get(k["offset"])
            e.size(cols.st_offset_values[cols.st_offset_ptr[row]:cols.st_offset_ptr[row + 1]],
                   g["Size"])
        e.op(b"ub")

    def info(self, row: int) -> None:
        cols, e, g, k = self.cols, self.e, self.g, self.k
        e.get(g["Info"])
        e.op(b")\x81}(")
        e.get(k["relative_path"])
        e.get(int(self.paths[cols.st_path[row]]))
        e.get(k["offset"])
        e.integer(int(cols.st_file_offset[row]))
        e.get(k["length"])
        e.integer(int(cols.st_length[row]))
        e.get(k["transform_descriptors"])
        self.value(cols.st_transforms[row])
        e.op(b"ub")

    def storage_meta(self) -> None:
        sm, e = self.cols.storage_meta, self.e
        if sm is None:
            e.op(b"N")
            return
        e.get(self.g["SMeta"])
        e.op(b")\x81}(")
        for name in ("checkpoint_id", "save_id", "load_id", "modules"):
            e.get(self.k[name])
            self.value(getattr(sm, name))
        e.op(b"ub")

    def dumps(self) -> bytes:
        e, k = self.e, None
        e.op(b"\x80\x04")
        self.prelude()
        k = self.k
        e.get(self.g["Metadata"])
        e.op(b")\x81}(")
        e.get(k["state_dict_metadata"])
        self.state_dict_metadata()
        e.get(k["planner_data"])
        self.value(self.cols.planner_data)
        e.get(k["storage_data"])
        self.storage_data()
        e.get(k["storage_meta"])
        self.storage_meta()
        e.get(k["version"])
        self.value(self.cols.version)
        e.op(b"ub.")
        return e.getvalue()


def dumps_metadata(cols: MetadataColumns) -> bytes:
    """The ``.metadata`` bytes of ``cols``: what torch's ``pickle.load`` reads as torch's ``Metadata``.

    torch's ``FileSystemReader.read_metadata`` loads objects equal, field
    for field and class for class, to those ``pickle.dumps`` of the same
    torch ``Metadata`` gives (``torch.Size`` shapes, dtype objects,
    ``_StorageInfo`` without its None fields, index hints, paths); the
    bytes differ (memo use). Chunk lists and storage entries are written by
    a compiled loop. Raises ValueError/TypeError for what torch's format
    cannot hold from columns (a memory format without torch's encoding, an
    int beyond int64 or a value that is not plain in ``planner_data``).
    """
    if not isinstance(cols, MetadataColumns):
        raise TypeError(f"want MetadataColumns, got {type(cols).__name__}")
    return _Writer(cols).dumps()
