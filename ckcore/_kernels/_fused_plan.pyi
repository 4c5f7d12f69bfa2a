"""Type stubs for the fused global save plan (see _fused_plan.pyx)."""

from collections.abc import Callable, Sequence
from typing import Any

def fused_save_plan(
    all_plans: Sequence[Any],
    dedup: bool,
    save_to_lowest_rank: bool,
    rewrite_index_hints: bool,
    metadata_cls: Any,
    tensor_md_cls: Any,
    bytes_md_cls: Any,
    ck_itemsize: Callable[[Any], int],
) -> tuple[list[Any], Any, set[Any]] | None: ...
