"""Checkpoint metadata, field for field with ``torch.distributed.checkpoint.metadata``.

These dataclasses import nothing from torch, so a checkpoint can be read,
validated and planned on a machine without torch (the ``ckcore`` command
does). Shapes and offsets are plain ``tuple[int, ...]``; torch's
``torch.Size`` is a tuple subclass, so values compare equal across the two.
Dtypes are names (``"bfloat16"``); see :mod:`ckcore.dtypes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from ._kernels._keyhash import index_hash as _index_hash

__all__ = [
    "ChunkStorageMetadata",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "MetadataIndex",
    "Metadata",
    "StorageMeta",
    "STORAGE_TYPES",
]


@dataclass
class ChunkStorageMetadata:
    """One saved (or wanted) box of a tensor: ``offsets`` into the global tensor and ``sizes``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class TensorProperties:
    """How to rebuild a tensor; ``dtype`` by name, the deprecated fields kept for parity."""

    dtype: str = "float32"
    layout: str = "strided"
    requires_grad: bool = False
    memory_format: str = "contiguous_format"
    pin_memory: bool = False


@dataclass
class TensorStorageMetadata:
    """A tensor in a checkpoint: its properties, global ``size`` and saved ``chunks``."""

    properties: TensorProperties
    size: tuple[int, ...]
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    """A non-tensor object saved as bytes (``torch.save`` of any picklable value)."""


STORAGE_TYPES = Union[TensorStorageMetadata, BytesStorageMetadata]


@dataclass
class StorageMeta:
    """Identifiers of a save, as torch records them."""

    checkpoint_id: Union[str, os.PathLike, None] = None
    save_id: Union[str, None] = None
    load_id: Union[str, None] = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    """The ``.metadata`` of a checkpoint: every fqn's storage type plus planner/storage data."""

    state_dict_metadata: dict[str, STORAGE_TYPES]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: Union[StorageMeta, None] = None
    version: Union[str, None] = None


@dataclass(frozen=True)
class MetadataIndex:
    """Lookup key of an item: ``fqn``, and for tensors the chunk's ``offset``.

    ``index`` is only a hint for finding the chunk in a list quickly; as in
    torch it takes no part in ``==`` or ``hash``:

    >>> MetadataIndex("w", (0, 4), index=3) == MetadataIndex("w", (0, 4))
    True
    """

    fqn: str
    offset: Union[tuple[int, ...], None] = None
    index: Union[int, None] = field(hash=False, compare=False, default=None)

    def __init__(
        self,
        fqn: str,
        offset: Union[Sequence[int], None] = None,
        index: Union[int, None] = None,
    ) -> None:
        # frozen=True forbids plain assignment, exactly as in torch.
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "offset", None if offset is None else tuple(offset))

    def __hash__(self) -> int:
        # Keyed per process, unlike a tuple's hash: a checkpoint file cannot
        # pick storage_data keys that all collide (ckcore._kernels._keyhash).
        fqn = self.fqn
        if type(fqn) is not str:
            # Not a DCP key (their fqns are str); keyed all the same.
            fqn = repr(fqn)
        return _index_hash(fqn, self.offset)
