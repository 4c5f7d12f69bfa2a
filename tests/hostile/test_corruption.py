"""Every truncation of a real stream, seeded bit flips and byte swaps, huge text numbers.

Payload class 7 of the hostile suite. Truncations must all be refused; a
flipped stream may still be valid metadata (a changed digit), but must
never crash, hang, escape or poison.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, run_payloads

PAYLOADS = pl.corruption_payloads()
GROUPS = pl.grouped(PAYLOADS, 2)


@pytest.fixture(scope="module")
def verdicts():
    return run_payloads(PAYLOADS)


@pytest.mark.parametrize("group", list(GROUPS))
def test_corruption(verdicts, group):
    assert_all(verdicts, GROUPS[group])
