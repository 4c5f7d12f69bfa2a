"""DCP ``.metadata`` pickle bytes to columns (compiled)."""

from collections.abc import Callable
from typing import Any

ROLES: dict[str, int]
ABSENT: object

class Unsupported(Exception): ...

def decode(
    data: bytes | bytearray | memoryview,
    lookup: Callable[[bytes, bytes], int],
    roles: list[int],
    objects: list[Any],
    max_depth: int = ...,
) -> dict[str, Any]: ...
