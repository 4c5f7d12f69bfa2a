"""ckcore's integration with ``torch.distributed.checkpoint`` (the only part of ckcore that imports torch).

- :class:`FastSavePlanner` / :class:`FastLoadPlanner`: DCP's default planners, planning with ckcore.
- :func:`patch`: swap ckcore's drop-ins into torch's own modules (context manager or plain call).
- :mod:`ckcore.dcp.helpers`: drop-ins with torch's exact signatures and types.
- ``RangeFileSystemReader`` (a reader that reads only the byte ranges each item
  needs) and ``to_torch`` / ``from_torch`` (metadata conversions) are loaded on
  first use.
"""

from __future__ import annotations

from typing import Any

from . import helpers
from .helpers import (
    create_default_global_save_plan,
    create_default_local_load_plan,
    create_default_local_save_plan,
    create_read_items_for_chunk_list,
    dedup_save_plans,
)
from .patch import Patch, is_patched, patch, unpatch
from .planners import FastLoadPlanner, FastSavePlanner

__all__ = [
    "FastLoadPlanner",
    "FastSavePlanner",
    "Patch",
    "RangeFileSystemReader",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
    "create_read_items_for_chunk_list",
    "dedup_save_plans",
    "from_torch",
    "helpers",
    "is_patched",
    "patch",
    "to_torch",
    "unpatch",
]

# Names that live in sibling modules of this package, imported on first access
# so that ``import ckcore.dcp`` stays cheap and does not depend on them.
_LAZY = {
    "RangeFileSystemReader": ".reader",
    "to_torch": ".convert",
    "from_torch": ".convert",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
