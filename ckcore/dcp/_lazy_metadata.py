"""torch's ``Metadata``, backed by :class:`~ckcore.mdcolumns.MetadataColumns`, built on first touch.

:class:`ColumnarMetadata` is a subclass of torch's ``Metadata`` dataclass: it
is one for ``isinstance``, ``dataclasses.fields`` / ``asdict``, ``==`` (with a
plain torch ``Metadata`` of the same content, both ways) and attribute
assignment (``FileSystemWriter.finish`` sets ``version``, ``storage_data``
and ``storage_meta``). Each field is built as torch's objects the first time
it is read (``state_dict_metadata``: a ``TensorStorageMetadata`` with
``torch.Size`` chunks per tensor; ``storage_data``: a dict of
``MetadataIndex`` -> ``_StorageInfo``), and kept. ckcore's own planners and
reader never touch the fields: they read :attr:`ColumnarMetadata.ck_columns`
(chunk boxes as int64 arrays) and :meth:`ColumnarMetadata.ck_storage_view`
(a lookup that builds one ``_StorageInfo`` per item asked for).

``pickle`` sees a plain torch ``Metadata`` (``__reduce_ex__``): the stream
is torch's format, and torch's reader loads it into equal objects. The one
exception is torch's own object collectives (``dcp.save`` broadcasts the
finished metadata from the coordinator to every rank): there the metadata
travels as the bytes of a ``.metadata`` file written from the columns, and
each receiving rank reads them with ckcore's column reader into a
``ColumnarMetadata``, instead of every rank building and collecting an
object per chunk and storage entry.
"""

from __future__ import annotations

import copyreg
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.distributed_c10d as _c10d
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ckcore.checkpoint import loads_metadata_columns
from ckcore.dcp.convert import _layout_to_torch, _memory_format_to_torch, dtype_to_torch
from ckcore.mdcolumns import MetadataColumns, dumps_metadata

__all__ = ["ColumnarMetadata", "StorageView", "columns_of", "small_fields", "storage_md",
           "storage_part", "tensor_part"]

_NEWOBJ = copyreg.__newobj__  # type: ignore[attr-defined]
_FIELDS = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")


def _torch_properties(p: tuple[str, str, bool, str, bool]) -> TensorProperties:
    return TensorProperties(dtype=dtype_to_torch(p[0]), layout=_layout_to_torch(p[1]),
                            requires_grad=p[2], memory_format=_memory_format_to_torch(p[3]),
                            pin_memory=p[4])


def _state_dict_metadata(cols: MetadataColumns) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = torch.Size
    for i, fqn in enumerate(cols.fqns):
        p = cols.properties[i]
        if p is None:
            out[fqn] = BytesStorageMetadata()
            continue
        off, sz = cols.chunks(i)
        chunks = [ChunkStorageMetadata(size(o), size(s)) for o, s in zip(off.tolist(), sz.tolist())]
        out[fqn] = TensorStorageMetadata(_torch_properties(p), size(cols.size(i)), chunks)
    return out



def _torch_info(cols: MetadataColumns, row: int) -> Any:
    other = cols.storage_other
    if other and row in other:
        return other[row]
    return _StorageInfo(cols.paths[int(cols.st_path[row])], int(cols.st_file_offset[row]),
                        int(cols.st_length[row]), cols.st_transforms.get(row))


def _torch_index(cols: MetadataColumns, row: int) -> MetadataIndex:
    off = cols.storage_offset(row)
    idx = int(cols.st_index[row])
    return MetadataIndex(cols.names[int(cols.st_fqn[row])],
                         None if off is None else torch.Size(off), None if idx < 0 else idx)


def _storage_data(cols: MetadataColumns) -> dict[MetadataIndex, Any] | None:
    if cols.storage_data_none:
        return None
    return {_torch_index(cols, row): _torch_info(cols, row) for row in range(cols.n_storage)}


def _storage_meta(cols: MetadataColumns) -> StorageMeta | None:
    sm = cols.storage_meta
    if sm is None:
        return None
    return StorageMeta(checkpoint_id=sm.checkpoint_id, save_id=sm.save_id, load_id=sm.load_id,
                       modules=list(sm.modules))


_BUILDERS = {
    "state_dict_metadata": _state_dict_metadata,
    "planner_data": lambda cols: cols.planner_data,
    "storage_data": _storage_data,
    "storage_meta": _storage_meta,
    "version": lambda cols: cols.version,
}


def _field(name: str) -> property:
    def get(self: ColumnarMetadata) -> Any:
        values = self.__dict__["_ck_values"]
        try:
            return values[name]
        except KeyError:
            value = values[name] = _BUILDERS[name](self.__dict__["ck_columns"])
            return value

    def put(self: ColumnarMetadata, value: Any) -> None:
        self.__dict__["_ck_values"][name] = value

    return property(get, put, doc=f"torch's ``Metadata.{name}``, built from the columns when first read.")


class ColumnarMetadata(Metadata):
    """A torch ``Metadata`` whose fields are built from ``ck_columns`` when first read.

    ``ck_columns`` (a :class:`~ckcore.mdcolumns.MetadataColumns`) is what
    the file held; a field assigned afterwards replaces the built one
    (:func:`columns_of` tells whether the columns still describe the
    metadata). Compares equal to a torch ``Metadata`` with equal fields.
    """

    state_dict_metadata = _field("state_dict_metadata")  # type: ignore[assignment]
    planner_data = _field("planner_data")
    storage_data = _field("storage_data")
    storage_meta = _field("storage_meta")  # type: ignore[assignment]
    version = _field("version")  # type: ignore[assignment]

    def __init__(self, columns: MetadataColumns | None = None, /, **fields: Any) -> None:
        """Wrap ``columns``; nothing is built until a field is read.

        Without columns, the fields are torch's keyword arguments (what
        ``dataclasses.replace`` passes): a plain metadata in this class.
        """
        if columns is None:
            values = dict(Metadata(**fields).__dict__)
        elif not isinstance(columns, MetadataColumns):
            raise TypeError(f"columns must be MetadataColumns, got {type(columns).__name__}")
        elif fields:
            raise TypeError("pass either columns or torch's Metadata fields, not both")
        else:
            values = {}
        self.__dict__["ck_columns"] = columns
        self.__dict__["_ck_values"] = values
        self.__dict__["_ck_view"] = None

    @property
    def ck_built(self) -> frozenset[str]:
        """The fields built (or assigned) so far."""
        return frozenset(self.__dict__["_ck_values"])

    def ck_storage_view(self) -> StorageView | None:
        """``storage_data`` as a read-only lookup over the columns (see :class:`StorageView`).

        None once ``storage_data`` was read or assigned, or without columns:
        then the dict is what holds.
        """
        if self.__dict__["ck_columns"] is None or "storage_data" in self.__dict__["_ck_values"]:
            return None
        view = self.__dict__["_ck_view"]
        if view is None:
            view = self.__dict__["_ck_view"] = StorageView(self.__dict__["ck_columns"])
        return view

    def __eq__(self, other: object) -> bool:
        """Equal fields, with a torch ``Metadata`` (or another of these)."""
        if not isinstance(other, Metadata):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        cols = self.__dict__["ck_columns"]
        if cols is None:
            return "Columnar" + repr(Metadata(**{f: getattr(self, f) for f in _FIELDS}))
        return (f"ColumnarMetadata(fqns={len(cols.fqns)}, chunks={cols.n_chunks}, "
                f"storage_entries={cols.n_storage}, built={sorted(self.ck_built)})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle as a plain torch ``Metadata``: torch's format, every field built.

        Pickled by torch's object collectives (see the module docstring), it
        travels as ``.metadata`` bytes instead, when the columns still hold
        every field.
        """
        if sys._getframe(1).f_code is _COLLECTIVE_PICKLER:
            data = self._ck_file_bytes()
            if data is not None:
                return _from_collective, (data,)
        return _NEWOBJ, (Metadata,), {f: getattr(self, f) for f in _FIELDS}

    def _ck_file_bytes(self) -> bytes | None:
        """``.metadata`` bytes of this metadata from its columns, or None if they no longer hold it."""
        cols = columns_of(self)
        if cols is None or "storage_data" in self.__dict__["_ck_values"]:
            return None
        try:
            current = MetadataColumns(cols.fqns, **tensor_part(cols), **storage_part(cols),
                                      **small_fields(self))
            data = dumps_metadata(current)
        except (TypeError, ValueError, AttributeError):
            # A field columns cannot hold (a custom object in planner_data, a
            # storage_meta that is not torch's): the object pickle carries it.
            return None
        # The writer takes values the receivers' allow-list reader refuses
        # (a dict key that is not a str, a PathLike of another class, a
        # non-str save_id): every receiving rank would raise after the
        # checkpoint was written. Read back here what they will read, and
        # send objects unless it comes back equal. Chunks and storage records
        # are int64 columns and str tables, which always read back: only the
        # free-form values need the check, on a file holding just them
        # (the whole file when foreign storage objects are among them).
        if current.storage_other:
            probe, probe_data = current, data
        else:
            probe = MetadataColumns((), kinds=(), properties=(), size_ptr=(0,), size_values=(),
                                    chunk_ptr=(0,), chunk_offsets=(), chunk_sizes=(),
                                    **small_fields(self))
            probe_data = dumps_metadata(probe)
        try:
            back = loads_metadata_columns(probe_data, name="<metadata for a collective>",
                                          max_bytes=max(1, len(probe_data)))
            same = (back.planner_data == probe.planner_data
                    and back.storage_meta == probe.storage_meta
                    and back.version == probe.version
                    and back.storage_other == probe.storage_other)
        except Exception:  # noqa: BLE001 - any refusal means: send objects
            return None
        return data if same is True else None

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - pickle and dataclass __eq__ read it
        # What pickle names (NEWOBJ of torch's class, as torch writes) and what
        # torch's dataclass __eq__ compares (so plain == columnar holds both
        # ways); type() still tells the two apart.
        return Metadata


def tensor_part(cols: MetadataColumns) -> dict[str, Any]:
    """``cols``' state_dict_metadata part, as ``MetadataColumns`` takes it."""
    return dict(kinds=cols.kinds, properties=cols.properties, size_ptr=cols.size_ptr,
                size_values=cols.size_values, chunk_ptr=cols.chunk_ptr,
                chunk_offsets=cols.chunk_offsets, chunk_sizes=cols.chunk_sizes)


def storage_part(cols: MetadataColumns) -> dict[str, Any]:
    """``cols``' storage_data part, as ``MetadataColumns`` takes it."""
    return dict(extra_names=cols.names[len(cols.fqns):], st_fqn=cols.st_fqn,
                st_offset_ndim=cols.st_offset_ndim, st_offset_values=cols.st_offset_values,
                st_index=cols.st_index, st_path=cols.st_path, paths=cols.paths,
                st_file_offset=cols.st_file_offset, st_length=cols.st_length,
                st_transforms=cols.st_transforms, storage_other=cols.storage_other,
                storage_data_none=cols.storage_data_none)


def small_fields(metadata: Metadata) -> dict[str, Any]:
    """``metadata``'s fields besides chunks and storage, as ``MetadataColumns`` takes them."""
    from ckcore.metadata import StorageMeta as CkStorageMeta

    sm = metadata.storage_meta
    return dict(
        planner_data=metadata.planner_data,
        storage_meta=None if sm is None else CkStorageMeta(
            checkpoint_id=sm.checkpoint_id, save_id=sm.save_id, load_id=sm.load_id,
            modules=list(sm.modules)),
        version=metadata.version,
    )


# The code that pickles every object of torch's object collectives
# (broadcast_object_list, gather_object, ...): both ends run the same ckcore.
_COLLECTIVE_PICKLER = getattr(getattr(_c10d, "_object_to_tensor", None), "__code__", None)


def _from_collective(data: bytes) -> ColumnarMetadata:
    """What a receiving rank makes of a collective's metadata bytes: columns, read safely."""
    return ColumnarMetadata(loads_metadata_columns(
        data, name="<metadata from a collective>", max_bytes=max(1, len(data))))


def columns_of(metadata: Any) -> MetadataColumns | None:
    """The columns behind ``metadata`` if they still describe it, else None.

    They do while ``state_dict_metadata`` and ``storage_data`` were not
    assigned or built (a built field may have been changed in place).
    """
    if type(metadata) is not ColumnarMetadata:
        return None
    if "state_dict_metadata" in metadata.__dict__["_ck_values"]:
        return None
    return metadata.__dict__["ck_columns"]


def storage_md(cols: MetadataColumns, fid: int) -> Any:
    """torch's storage metadata of one fqn (row ``fid``), built on its own."""
    p = cols.properties[fid]
    if p is None:
        return BytesStorageMetadata()
    off, sz = cols.chunks(fid)
    size = torch.Size
    return TensorStorageMetadata(
        _torch_properties(p), size(cols.size(fid)),
        [ChunkStorageMetadata(size(o), size(s)) for o, s in zip(off.tolist(), sz.tolist())])


class StorageView(Mapping):
    """``storage_data`` of a columnar metadata: ``MetadataIndex`` -> torch ``_StorageInfo``.

    A lookup finds the row by ``(fqn, offset)`` (the index hint plays no
    part, as in a dict) and builds the ``_StorageInfo`` of that row only,
    once. Iteration builds every key: use it only where a dict would do.
    """

    def __init__(self, columns: MetadataColumns) -> None:
        """A view of ``columns``' storage entries."""
        self._cols = columns
        self._built: dict[int, Any] = {}

    def row(self, key: Any) -> int:
        """The storage row of ``key`` (anything with ``fqn`` and ``offset``), -1 if none."""
        try:
            fqn, offset = key.fqn, key.offset
        except AttributeError:
            return -1
        return self._cols.storage_row(fqn, offset)

    def __getitem__(self, key: Any) -> Any:
        row = self.row(key)
        if row < 0:
            raise KeyError(key)
        info = self._built.get(row)
        if info is None:
            info = self._built[row] = _torch_info(self._cols, row)
        return info

    def __contains__(self, key: object) -> bool:
        return self.row(key) >= 0

    def __len__(self) -> int:
        # Equal keys collapse in the columns as in a dict.
        return self._cols.n_storage

    def __iter__(self) -> Iterator[MetadataIndex]:
        return (_torch_index(self._cols, row) for row in range(self._cols.n_storage))

