"""Convert DCP's metadata and plan objects between torch's classes and ckcore's.

ckcore's dataclasses (:mod:`ckcore.metadata`, :mod:`ckcore.planner`,
:class:`ckcore.checkpoint.StorageInfo`) mirror torch's field for field but
hold plain Python values: dtypes, layouts and memory formats by name,
``torch.Size`` as ``tuple``. This module is the one place that maps between
the two, so a checkpoint read without torch (:func:`ckcore.load_metadata`)
can be handed to torch's planners, and torch's plans to ckcore's kernels.

Both directions walk containers (``dict``, ``list``, exact ``tuple``) so that
``storage_data`` dicts keyed by ``MetadataIndex`` and ``planner_data``
convert too; values they do not know (strings, ints, a writer's private
objects) are passed through unchanged. ``to_torch(from_torch(x)) == x`` and
``from_torch(to_torch(y)) == y`` for every supported object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import metadata as _tshard
from torch.distributed.checkpoint import filesystem as _tfs
from torch.distributed.checkpoint import metadata as _tmd
from torch.distributed.checkpoint import planner as _tpl

from .. import metadata as _cmd
from .. import planner as _cpl
from ..checkpoint import StorageInfo
from ..dtypes import normalize_dtype

__all__ = ["dtype_from_torch", "dtype_to_torch", "from_torch", "to_torch"]


# --------------------------------------------------------------------------
# Leaf values.
# --------------------------------------------------------------------------


def _strip_torch(obj: object) -> str:
    name = str(obj)
    return name.removeprefix("torch.")


def dtype_from_torch(dtype: torch.dtype) -> str:
    """ckcore's name of a ``torch.dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return normalize_dtype(_strip_torch(dtype))


def dtype_to_torch(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a ckcore dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    dt = getattr(torch, normalize_dtype(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"torch {torch.__version__} has no dtype {name!r}")  # noqa: TRY004 - a bad name
    return dt


def _layout_to_torch(name: str) -> torch.layout:
    lay = getattr(torch, name, None)
    if not isinstance(lay, torch.layout):
        raise ValueError(f"unknown layout {name!r}")  # noqa: TRY004 - a bad name
    return lay


def _memory_format_to_torch(name: str) -> torch.memory_format:
    mf = getattr(torch, name, None)
    if not isinstance(mf, torch.memory_format):
        raise ValueError(f"unknown memory format {name!r}")  # noqa: TRY004 - a bad name
    return mf


def _ints(t: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in t)


def _size(t: Any) -> torch.Size:
    return torch.Size(_ints(t))


def _opt(f: Callable[[Any], Any], v: Any) -> Any:
    return None if v is None else f(v)


# --------------------------------------------------------------------------
# torch -> ckcore.
# --------------------------------------------------------------------------


def _props_from(p: _tmd.TensorProperties) -> _cmd.TensorProperties:
    return _cmd.TensorProperties(
        dtype=dtype_from_torch(p.dtype),
        layout=_strip_torch(p.layout),
        requires_grad=p.requires_grad,
        memory_format=_strip_torch(p.memory_format),
        pin_memory=p.pin_memory,
    )


def _chunk_from(c: _tmd.ChunkStorageMetadata) -> _cmd.ChunkStorageMetadata:
    return _cmd.ChunkStorageMetadata(offsets=_ints(c.offsets), sizes=_ints(c.sizes))


def _index_from(i: _tmd.MetadataIndex) -> _cmd.MetadataIndex:
    return _cmd.MetadataIndex(i.fqn, i.offset, i.index)


def _tensor_md_from(t: _tmd.TensorStorageMetadata) -> _cmd.TensorStorageMetadata:
    return _cmd.TensorStorageMetadata(
        properties=_props_from(t.properties),
        size=_ints(t.size),
        chunks=[_chunk_from(c) for c in t.chunks],
    )


def _storage_meta_from(s: _tmd.StorageMeta) -> _cmd.StorageMeta:
    return _cmd.StorageMeta(
        checkpoint_id=s.checkpoint_id, save_id=s.save_id, load_id=s.load_id,
        modules=list(s.modules),
    )


def _metadata_from(m: _tmd.Metadata) -> _cmd.Metadata:
    return _cmd.Metadata(
        state_dict_metadata={k: from_torch(v) for k, v in m.state_dict_metadata.items()},
        planner_data=from_torch(m.planner_data),
        storage_data=from_torch(m.storage_data),
        storage_meta=_opt(_storage_meta_from, m.storage_meta),
        version=m.version,
    )


def _storage_info_from(s: _tfs._StorageInfo) -> StorageInfo:
    return StorageInfo(
        relative_path=s.relative_path, offset=s.offset, length=s.length,
        transform_descriptors=getattr(s, "transform_descriptors", None),
    )


def _write_item_from(w: _tpl.WriteItem) -> _cpl.WriteItem:
    td = w.tensor_data
    return _cpl.WriteItem(
        index=_index_from(w.index),
        type=_cpl.WriteItemType[w.type.name],
        bytes_io_data=_opt(lambda b: _cpl.BytesIOWriteData(b.nbytes), w.bytes_io_data),
        tensor_data=None if td is None else _tensor_write_data_from(td),
    )


def _tensor_write_data_from(td: _tpl.TensorWriteData) -> _cpl.TensorWriteData:
    return _cpl.TensorWriteData(
        chunk=_chunk_from(td.chunk), properties=_props_from(td.properties), size=_ints(td.size)
    )


def _read_item_from(r: _tpl.ReadItem) -> _cpl.ReadItem:
    return _cpl.ReadItem(
        type=_cpl.LoadItemType[r.type.name],
        dest_index=_index_from(r.dest_index),
        dest_offsets=_ints(r.dest_offsets),
        storage_index=_index_from(r.storage_index),
        storage_offsets=_ints(r.storage_offsets),
        lengths=_ints(r.lengths),
    )


_FROM: dict[type, Callable[[Any], Any]] = {
    _tmd.Metadata: _metadata_from,
    _tmd.TensorStorageMetadata: _tensor_md_from,
    _tmd.BytesStorageMetadata: lambda b: _cmd.BytesStorageMetadata(),
    _tmd.ChunkStorageMetadata: _chunk_from,
    _tmd.TensorProperties: _props_from,
    # Checkpoints of torch < 2.0 hold the ShardedTensor package's TensorProperties.
    _tshard.TensorProperties: _props_from,
    _tmd.MetadataIndex: _index_from,
    _tmd.StorageMeta: _storage_meta_from,
    _tfs._StorageInfo: _storage_info_from,
    _tpl.WriteItem: _write_item_from,
    _tpl.ReadItem: _read_item_from,
    _tpl.TensorWriteData: _tensor_write_data_from,
    _tpl.BytesIOWriteData: lambda b: _cpl.BytesIOWriteData(b.nbytes),
    _tpl.SavePlan: lambda p: _cpl.SavePlan(
        items=[from_torch(i) for i in p.items], storage_data=from_torch(p.storage_data),
        planner_data=from_torch(p.planner_data), usable=p.usable,
    ),
    _tpl.LoadPlan: lambda p: _cpl.LoadPlan(
        items=[from_torch(i) for i in p.items], storage_data=from_torch(p.storage_data),
        planner_data=from_torch(p.planner_data),
    ),
    _tpl.WriteItemType: lambda e: _cpl.WriteItemType[e.name],
    _tpl.LoadItemType: lambda e: _cpl.LoadItemType[e.name],
    torch.Size: _ints,
    torch.dtype: dtype_from_torch,
    torch.layout: _strip_torch,
    torch.memory_format: _strip_torch,
}


# --------------------------------------------------------------------------
# ckcore -> torch.
# --------------------------------------------------------------------------


def _props_to(p: _cmd.TensorProperties) -> _tmd.TensorProperties:
    return _tmd.TensorProperties(
        dtype=dtype_to_torch(p.dtype),
        layout=_layout_to_torch(p.layout),
        requires_grad=p.requires_grad,
        memory_format=_memory_format_to_torch(p.memory_format),
        pin_memory=p.pin_memory,
    )


def _chunk_to(c: _cmd.ChunkStorageMetadata) -> _tmd.ChunkStorageMetadata:
    return _tmd.ChunkStorageMetadata(offsets=_size(c.offsets), sizes=_size(c.sizes))


def _index_to(i: _cmd.MetadataIndex) -> _tmd.MetadataIndex:
    return _tmd.MetadataIndex(i.fqn, i.offset, i.index)


def _tensor_md_to(t: _cmd.TensorStorageMetadata) -> _tmd.TensorStorageMetadata:
    return _tmd.TensorStorageMetadata(
        properties=_props_to(t.properties),
        size=_size(t.size),
        chunks=[_chunk_to(c) for c in t.chunks],
    )


def _storage_meta_to(s: _cmd.StorageMeta) -> _tmd.StorageMeta:
    return _tmd.StorageMeta(
        checkpoint_id=s.checkpoint_id, save_id=s.save_id, load_id=s.load_id,
        modules=list(s.modules),
    )


def _metadata_to(m: _cmd.Metadata) -> _tmd.Metadata:
    return _tmd.Metadata(
        state_dict_metadata={k: to_torch(v) for k, v in m.state_dict_metadata.items()},
        planner_data=to_torch(m.planner_data),
        storage_data=to_torch(m.storage_data),
        storage_meta=_opt(_storage_meta_to, m.storage_meta),
        version=m.version,
    )


def _storage_info_to(s: StorageInfo) -> _tfs._StorageInfo:
    return _tfs._StorageInfo(
        relative_path=s.relative_path, offset=s.offset, length=s.length,
        transform_descriptors=getattr(s, "transform_descriptors", None),
    )


def _tensor_write_data_to(td: _cpl.TensorWriteData) -> _tpl.TensorWriteData:
    return _tpl.TensorWriteData(
        chunk=_chunk_to(td.chunk), properties=_props_to(td.properties), size=_size(td.size)
    )


def _write_item_to(w: _cpl.WriteItem) -> _tpl.WriteItem:
    td = w.tensor_data
    return _tpl.WriteItem(
        index=_index_to(w.index),
        type=_tpl.WriteItemType[w.type.name],
        bytes_io_data=_opt(lambda b: _tpl.BytesIOWriteData(b.nbytes), w.bytes_io_data),
        tensor_data=None if td is None else _tensor_write_data_to(td),
    )


def _read_item_to(r: _cpl.ReadItem) -> _tpl.ReadItem:
    return _tpl.ReadItem(
        type=_tpl.LoadItemType[r.type.name],
        dest_index=_index_to(r.dest_index),
        dest_offsets=_size(r.dest_offsets),
        storage_index=_index_to(r.storage_index),
        storage_offsets=_size(r.storage_offsets),
        lengths=_size(r.lengths),
    )


_TO: dict[type, Callable[[Any], Any]] = {
    _cmd.Metadata: _metadata_to,
    _cmd.TensorStorageMetadata: _tensor_md_to,
    _cmd.BytesStorageMetadata: lambda b: _tmd.BytesStorageMetadata(),
    _cmd.ChunkStorageMetadata: _chunk_to,
    _cmd.TensorProperties: _props_to,
    _cmd.MetadataIndex: _index_to,
    _cmd.StorageMeta: _storage_meta_to,
    StorageInfo: _storage_info_to,
    _cpl.WriteItem: _write_item_to,
    _cpl.ReadItem: _read_item_to,
    _cpl.TensorWriteData: _tensor_write_data_to,
    _cpl.BytesIOWriteData: lambda b: _tpl.BytesIOWriteData(b.nbytes),
    _cpl.SavePlan: lambda p: _tpl.SavePlan(
        items=[to_torch(i) for i in p.items], storage_data=to_torch(p.storage_data),
        planner_data=to_torch(p.planner_data), usable=p.usable,
    ),
    _cpl.LoadPlan: lambda p: _tpl.LoadPlan(
        items=[to_torch(i) for i in p.items], storage_data=to_torch(p.storage_data),
        planner_data=to_torch(p.planner_data),
    ),
    _cpl.WriteItemType: lambda e: _tpl.WriteItemType[e.name],
    _cpl.LoadItemType: lambda e: _tpl.LoadItemType[e.name],
}


# --------------------------------------------------------------------------
# Walkers.
# --------------------------------------------------------------------------


def _lookup(table: dict[type, Callable[[Any], Any]], cls: type) -> Callable[[Any], Any] | None:
    f = table.get(cls)
    if f is None and cls not in (str, int, float, bool, bytes, type(None), dict, list, tuple):
        # Subclasses (a planner's own Metadata subclass, say) convert as their
        # nearest known base; the result is the base class.
        for base in cls.__mro__[1:]:
            f = table.get(base)
            if f is not None:
                break
    return f


def _walk(obj: Any, table: dict[type, Callable[[Any], Any]], recurse: Callable[[Any], Any]) -> Any:
    cls = type(obj)
    f = _lookup(table, cls)
    if f is not None:
        return f(obj)
    if cls is dict:
        return {recurse(k): recurse(v) for k, v in obj.items()}
    if cls is list:
        return [recurse(v) for v in obj]
    if cls is tuple:
        return tuple(recurse(v) for v in obj)
    return obj


def from_torch(obj: Any) -> Any:
    """Convert torch DCP objects (metadata, storage info, plan items, plans) to ckcore's.

    Accepts torch's ``Metadata``, ``TensorStorageMetadata``,
    ``BytesStorageMetadata``, ``ChunkStorageMetadata``, ``TensorProperties``,
    ``MetadataIndex``, ``StorageMeta``, ``filesystem._StorageInfo``,
    ``WriteItem``, ``ReadItem``, ``SavePlan``, ``LoadPlan``, ``TensorWriteData``,
    ``BytesIOWriteData``, the item-type enums, ``torch.Size``, dtypes, layouts
    and memory formats, and dicts/lists/tuples of them; anything else is
    returned unchanged.

    >>> from_torch(torch.distributed.checkpoint.metadata.TensorProperties(dtype=torch.bfloat16))
    TensorProperties(dtype='bfloat16', layout='strided', requires_grad=False, memory_format='contiguous_format', pin_memory=False)
    """
    return _walk(obj, _FROM, from_torch)


def to_torch(obj: Any) -> Any:
    """Convert ckcore objects (metadata, :class:`~ckcore.checkpoint.StorageInfo`, plans) to torch's.

    The inverse of :func:`from_torch`: dtype/layout/memory-format names become
    torch objects, shape tuples in typed fields become ``torch.Size``;
    dicts/lists/tuples are walked, anything else is returned unchanged.

    >>> to_torch(ckcore.metadata.MetadataIndex("w", (0, 4)))     # doctest: +SKIP
    MetadataIndex(fqn='w', offset=torch.Size([0, 4]), index=None)
    """
    return _walk(obj, _TO, to_torch)
