"""Opcode-level check of an untrusted ``.metadata`` pickle (compiled)."""

from collections.abc import Callable

GLOBAL_KINDS: dict[str, int]

def scan(
    data: bytes | bytearray | memoryview,
    lookup: Callable[[bytes, bytes], int],
    max_depth: int = ...,
) -> tuple[bool, int, str] | None: ...

class Scanner:
    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        lookup: Callable[[bytes, bytes], int],
        max_depth: int = ...,
    ) -> None: ...
    def run(self) -> tuple[bool, int, str] | None: ...
    @property
    def progress(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def outcome_accepted(self) -> bool: ...
    def cancel(self) -> None: ...
    def result(self) -> tuple[bool, int, str] | None: ...
