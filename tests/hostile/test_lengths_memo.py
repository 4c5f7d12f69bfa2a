"""Huge declared lengths (up to 2**64-1 with 16 bytes behind them) and memo abuse.

Payload classes 5 and 6 of the hostile suite: BINUNICODE8, BINBYTES8,
BYTEARRAY8, BINSTRING, BINUNICODE, BINBYTES, LONG4 and FRAME lengths; PUT
and LONG_BINPUT at 2**32-1 (a memo table of 32 GiB if taken at its word),
text indices that are not numbers, GETs of unset entries, MEMOIZE floods,
reference cycles through the memo. The child has a 2 GiB address-space cap:
a MemoryError must come out as CheckpointError, never as itself.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, run_payloads

LENGTHS = pl.length_payloads()
MEMO = pl.memo_payloads()
GROUPS = {**pl.grouped(LENGTHS, 2), **pl.grouped(MEMO, 2)}


@pytest.fixture(scope="module")
def verdicts():
    return run_payloads(LENGTHS + MEMO)


@pytest.mark.parametrize("group", list(GROUPS))
def test_lengths_and_memo(verdicts, group):
    assert_all(verdicts, GROUPS[group])
