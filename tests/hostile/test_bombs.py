"""Shared-structure bombs: each level holds the previous one twice through the memo.

Payload class 4 of the hostile suite. 64 levels are 2**64 leaves in a few
hundred bytes: hashing one (as a dict key, a dtype or memory-format lookup)
or printing one in an error message never ends, unless the loader bounds
what it describes (ckcore._saferepr) and refuses before hashing. Placed
where error messages describe values: TensorProperties state, size,
offsets, chunk lists, storage keys and values, the version, a persistent
id, a STACK_GLOBAL module name.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, run_payloads

PAYLOADS = pl.bomb_payloads()
GROUPS = pl.grouped(PAYLOADS, 3)


@pytest.fixture(scope="module")
def verdicts():
    return run_payloads(PAYLOADS)


@pytest.mark.parametrize("group", list(GROUPS))
def test_bomb(verdicts, group):
    assert_all(verdicts, GROUPS[group])
