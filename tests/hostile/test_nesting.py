"""Tuples, lists, dicts and frozensets nested 10**3, 10**5 and 10**6 deep, wherever a value goes.

Payload class 3 of the hostile suite. Hashing a 10**6-deep tuple (as a dict
key, or looking a dtype up in a table) recurses in C and overflows the
stack: a segfault, which only a child process can observe. Depth 10**3 runs
batched; the deep ones run one per child process.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, assert_ok, run_payloads

SHALLOW = list(pl.nesting_payloads((10**3,)))
GROUPS = pl.grouped(SHALLOW, 3)
DEEP = [(kind, depth, pos) for depth in (10**5, 10**6) for kind in pl.NEST_KINDS
        for pos in pl.NEST_POSITIONS]


@pytest.fixture(scope="module")
def shallow_verdicts():
    return run_payloads(SHALLOW)


@pytest.mark.parametrize("group", list(GROUPS))
def test_nesting_1e3(shallow_verdicts, group):
    assert_all(shallow_verdicts, GROUPS[group])


@pytest.mark.parametrize("kind,depth,position", DEEP,
                         ids=[f"{k}-{d:.0e}-{p}".replace("+0", "") for k, d, p in DEEP])
def test_nesting_deep(kind, depth, position):
    name, data, expected = pl.nesting_payload(kind, depth, position)
    verdicts = run_payloads([(name, data, expected)], isolate=True)
    assert_ok(verdicts[name], expected)
