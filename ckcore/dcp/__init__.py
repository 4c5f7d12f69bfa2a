"""ckcore's integration with ``torch.distributed.checkpoint`` (the only part of ckcore that imports torch).

- :class:`FastSavePlanner` / :class:`FastLoadPlanner`: DCP's default planners, planning with ckcore.
- :func:`patch`: swap ckcore's drop-ins into torch's own modules (context manager or plain call).
- :mod:`ckcore.dcp.dropins`: drop-ins with torch's exact signatures and types.
- :class:`RangeFileSystemReader`: a ``FileSystemReader`` that reads only the
  byte ranges each item needs, sorted and coalesced, straight into the
  destination tensors; :class:`SharedRangeFileSystemReader` (opt-in) reads
  bytes several ranks need once and exchanges them over the process group.
- :func:`to_torch` / :func:`from_torch`: conversions between ckcore's and
  torch's metadata and plan objects.

Importing it with a torch outside the tested releases
(:data:`ckcore.dcp._compat.TESTED_TORCH`) emits :class:`UntestedTorchWarning`.
"""

from __future__ import annotations

import torch as _torch

from . import dropins
from ._compat import UntestedTorchWarning, warn_if_untested
from ._lazy_metadata import ColumnarMetadata
from .convert import dtype_from_torch, dtype_to_torch, from_torch, to_torch
from .dropins import (
    create_default_global_save_plan,
    create_default_local_load_plan,
    create_default_local_save_plan,
    create_read_items_for_chunk_list,
    dedup_save_plans,
)
from .patch import Patch, is_patched, patch, unpatch
from .planners import FastLoadPlanner, FastSavePlanner
from .reader import RangeFileSystemReader
from .shared import SharedRangeFileSystemReader, SharedReadError
from .writer import FastFileSystemWriter

warn_if_untested(_torch.__version__)

__all__ = [
    "ColumnarMetadata",
    "FastFileSystemWriter",
    "FastLoadPlanner",
    "FastSavePlanner",
    "Patch",
    "RangeFileSystemReader",
    "SharedRangeFileSystemReader",
    "SharedReadError",
    "UntestedTorchWarning",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
    "create_read_items_for_chunk_list",
    "dedup_save_plans",
    "dropins",
    "dtype_from_torch",
    "dtype_to_torch",
    "from_torch",
    "is_patched",
    "patch",
    "to_torch",
    "unpatch",
]
