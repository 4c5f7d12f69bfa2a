"""Type stubs for the compiled dedup_save_plans (see _dedup.pyx)."""

from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import disjoint_base

@disjoint_base
class Dedup: ...

def dedup_save_plans(
    all_plans: Sequence[Any], save_to_lowest_rank: bool, ck_itemsize: Callable[[Any], int]
) -> list[Any]: ...
