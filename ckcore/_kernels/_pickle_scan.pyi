"""Opcode-level check of an untrusted ``.metadata`` pickle (compiled)."""

from collections.abc import Callable

from typing_extensions import Self, disjoint_base

GLOBAL_KINDS: dict[str, int]

def scan(
    data: bytes | bytearray | memoryview,
    lookup: Callable[[bytes, bytes], int],
    max_depth: int = ...,
) -> tuple[bool, int, str] | None: ...

@disjoint_base
class Scanner:
    # A cdef class built by __cinit__: its arguments are __new__'s.
    def __new__(
        cls,
        data: bytes | bytearray | memoryview,
        lookup: Callable[[bytes, bytes], int],
        max_depth: int = ...,
    ) -> Self: ...
    def run(self) -> tuple[bool, int, str] | None: ...
    @property
    def progress(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def outcome_accepted(self) -> bool: ...
    def cancel(self) -> None: ...
    def result(self) -> tuple[bool, int, str] | None: ...
