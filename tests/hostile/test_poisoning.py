"""BUILD on allow-listed classes, functions and instances: nothing may be poisoned.

Payload class 2 of the hostile suite: ``GLOBAL <allowed class>; (None,
{attr: value}); BUILD`` sets class attributes through the unpickler (today
it does: e.g. ``PurePosixPath._str = '/attacker'`` makes every pure path
print as /attacker in the whole process). Each is tried before an otherwise
valid Metadata stream (the worst case: the file loads and the process is
poisoned), as a planner_data value, and alone; plus BUILD twice on one
instance, dunder keys in instance state, ``__class__`` swaps and BUILD on
builtin containers and paths. The child snapshots every allow-listed class
and function (``vars()``, function defaults, ``__dict__``, ``__code__``) and
a few behaviours (``str(PurePosixPath('/a/b'))``, ``Path('/x').joinpath('y')``,
a benign follow-up load) before and after each load. One test per target.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, run_payloads

PAYLOADS = pl.poison_payloads()
GROUPS = pl.grouped(PAYLOADS, 3)


@pytest.fixture(scope="module")
def verdicts():
    return run_payloads(PAYLOADS)


@pytest.mark.parametrize("group", list(GROUPS))
def test_no_poisoning(verdicts, group):
    assert_all(verdicts, GROUPS[group])
