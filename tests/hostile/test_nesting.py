"""Tuples, lists, dicts and frozensets nested 10**3, 10**5 and 10**6 deep, wherever a value goes.

Payload class 3 of the hostile suite. Hashing a 10**6-deep tuple (as a dict
key, or looking a dtype up in a table) recurses in C and overflows the
stack: a segfault, which only a child process can observe. Depths 10**3
and 10**5 run batched (a crash costs only the payload in progress: the
runner resumes in a fresh child); the 10**6-deep ones run one per child
process, two children at a time.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_ok, run_payloads

BATCHED_DEPTHS = (10**3, 10**5)
ISOLATED_DEPTHS = (10**6,)
SPECS = [(kind, depth, pos) for depth in BATCHED_DEPTHS + ISOLATED_DEPTHS for kind in pl.NEST_KINDS
         for pos in pl.NEST_POSITIONS]


@pytest.fixture(scope="module")
def verdicts():
    out = run_payloads(list(pl.nesting_payloads(BATCHED_DEPTHS)))
    out.update(run_payloads(pl.nesting_payloads(ISOLATED_DEPTHS), isolate=True, workers=2))
    return out


@pytest.mark.parametrize("kind,depth,position", SPECS,
                         ids=[f"{k}-{d:.0e}-{p}".replace("+0", "") for k, d, p in SPECS])
def test_nesting(verdicts, kind, depth, position):
    name, _, expected = pl.nesting_payload(kind, depth, position)
    assert_ok(verdicts[name], expected)
