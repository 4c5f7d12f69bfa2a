"""Plan items, field for field with ``torch.distributed.checkpoint.planner``.

Torch-free: a write item's size is computed from the dtype *name*
(:func:`ckcore.dtypes.itemsize`), so global planning runs without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Union

from .dtypes import itemsize
from .metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties

__all__ = [
    "WriteItemType",
    "LoadItemType",
    "BytesIOWriteData",
    "TensorWriteData",
    "WriteItem",
    "ReadItem",
    "SavePlan",
    "LoadPlan",
]


class WriteItemType(Enum):
    """What a write item holds: a whole tensor, one shard of it, or bytes."""

    TENSOR = auto()
    SHARD = auto()
    BYTE_IO = auto()


class LoadItemType(Enum):
    """What a read item fills: a tensor box or a bytes object."""

    TENSOR = auto()
    BYTE_IO = auto()


@dataclass(frozen=True)
class BytesIOWriteData:
    """Size of a bytes item, when known."""

    nbytes: int


@dataclass(frozen=True)
class TensorWriteData:
    """The chunk a write item saves, the tensor's properties and its global size."""

    chunk: ChunkStorageMetadata
    properties: TensorProperties
    size: tuple[int, ...]


@dataclass(frozen=True)
class WriteItem:
    """One thing a rank writes: its index, its type and, for tensors, its chunk."""

    index: MetadataIndex
    type: WriteItemType
    bytes_io_data: Union[BytesIOWriteData, None] = None
    tensor_data: Union[TensorWriteData, None] = None

    def tensor_storage_size(self) -> Union[int, None]:
        """Bytes of the tensor this item belongs to, or None for non-tensor items.

        As in torch this is the *global* tensor's size (``tensor_data.size``),
        not the chunk's: dedup balances by it.
        """
        if self.tensor_data is None:
            return None
        numel = 1
        for s in self.tensor_data.size:
            numel *= s
        return numel * itemsize(self.tensor_data.properties.dtype)


@dataclass(frozen=True)
class ReadItem:
    """One copy of a box from a saved chunk (``storage_index``) into a local one (``dest_index``).

    ``storage_offsets`` are relative to the saved chunk, ``dest_offsets`` to
    the local chunk, ``lengths`` is the box's size; all per dimension.
    """

    type: LoadItemType
    dest_index: MetadataIndex
    dest_offsets: tuple[int, ...]
    storage_index: MetadataIndex
    storage_offsets: tuple[int, ...]
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class SavePlan:
    """One rank's write items; ``usable=False`` marks a cached plan that did not change."""

    items: list[WriteItem]
    storage_data: Any = None
    planner_data: Any = None
    usable: bool = True


@dataclass
class LoadPlan:
    """One rank's read items."""

    items: list[ReadItem]
    storage_data: Any = None
    planner_data: Any = None
