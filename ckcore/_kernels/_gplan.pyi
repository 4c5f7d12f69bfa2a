"""Type stubs for the compiled global save-planning loops (see _gplan.pyx)."""

from collections.abc import Sequence
from typing import Any

def create_global_save_plan(
    all_plans: Sequence[Any],
    rewrite_index_hints: bool,
    metadata_cls: Any,
    tensor_md_cls: Any,
    bytes_md_cls: Any,
) -> tuple[list[Any], Any]: ...
def dedup_save_plans(all_plans: Sequence[Any], save_to_lowest_rank: bool) -> list[Any]: ...
def global_save_plan(
    all_plans: Sequence[Any],
    dedup: bool,
    save_to_lowest_rank: bool,
    rewrite_index_hints: bool,
    metadata_cls: Any,
    tensor_md_cls: Any,
    bytes_md_cls: Any,
) -> tuple[list[Any], Any, set[Any]] | None: ...
