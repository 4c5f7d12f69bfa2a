"""Type stubs for the compiled create_global_save_plan (see _save_plan.pyx)."""

from collections.abc import Sequence
from typing import Any

def create_global_save_plan(
    all_plans: Sequence[Any],
    rewrite_index_hints: bool,
    metadata_cls: Any,
    tensor_md_cls: Any,
    bytes_md_cls: Any,
) -> tuple[list[Any], Any]: ...
