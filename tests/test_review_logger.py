"""validate_global_plan / plan_global_save take a logging.Logger (or LoggerAdapter) or None."""

from __future__ import annotations

import logging

import pytest

from ckcore.global_plan import plan_global_save, validate_global_plan
from tests.gp_cases import ck_plans

# Two ranks whose shards overlap: validation has a finding to log.
BAD = [[("shard", "w", (4,), "float32", (0,), (3,))],
       [("shard", "w", (4,), "float32", (2,), (2,))]]
GOOD = [[("shard", "w", (4,), "float32", (0,), (2,))],
        [("shard", "w", (4,), "float32", (2,), (2,))]]


@pytest.mark.parametrize("logger", ["ckcore", 0, print, logging])
@pytest.mark.parametrize("specs", [BAD, GOOD])
def test_logger_must_be_a_logger(logger, specs):
    # Before: a str was accepted, then failed with AttributeError ('str' object
    # has no attribute 'warning') only when there was something to report,
    # and passed silently when there was not.
    with pytest.raises(TypeError, match="logger must be a logging.Logger"):
        plan_global_save(ck_plans(specs), logger=logger)
    _, md, _ = plan_global_save(ck_plans(specs))
    with pytest.raises(TypeError, match="logger must be a logging.Logger"):
        validate_global_plan(ck_plans(specs), md, logger=logger)


def test_logger_adapter_and_none_are_taken(caplog):
    adapter = logging.LoggerAdapter(logging.getLogger("review.adapter"), {})
    with caplog.at_level(logging.WARNING):
        _, md, errors = plan_global_save(ck_plans(BAD), logger=adapter)
        assert errors and validate_global_plan(ck_plans(BAD), md, logger=None) == errors
    assert [r.name for r in caplog.records] == ["review.adapter"] * len(errors) + \
        ["ckcore.global_plan"] * len(errors)
