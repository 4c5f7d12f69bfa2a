"""Code-running opcodes against forbidden and allowed globals, EXT codes, persistent ids, protocols 0-5.

Payload class 1 of the hostile suite (see _payloads.py): every form that can
call something (REDUCE, INST, OBJ, NEWOBJ, NEWOBJ_EX, BUILD, GLOBAL,
STACK_GLOBAL, SETITEMS/APPENDS/ADDITEMS on a global), alone and inside an
otherwise valid Metadata stream, at protocols 0 to 5. A forbidden global
must be refused with UnsafeCheckpointError and its code never run (the
payloads would create a marker file). All payloads load in one child
process (_runner.py), one test per opcode form.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, assert_ok, run_payloads

PAYLOADS = pl.opcode_payloads()
GROUPS = pl.grouped(PAYLOADS, 2)


@pytest.fixture(scope="module")
def verdicts():
    return run_payloads(PAYLOADS)


@pytest.mark.parametrize("group", list(GROUPS))
def test_opcode_form(verdicts, group):
    assert_all(verdicts, GROUPS[group])


# Benign controls (payload class 9): the real fixtures as torch wrote them, and
# re-pickled torch-style at protocols 2-5 (memoised or not, framed or not),
# must load and equal today's results (golden.json), so the rewrite is
# proven to keep real checkpoints working.
BENIGN = pl.benign_payloads()


@pytest.fixture(scope="module")
def benign_verdicts():
    return run_payloads(BENIGN)


@pytest.mark.parametrize("name,expected", [(n, e) for n, _, e in BENIGN], ids=[n for n, _, _ in BENIGN])
def test_benign_control(benign_verdicts, name, expected):
    assert_ok(benign_verdicts[name], expected)
