"""validate_global_plan / plan_global_save take a logger (anything with .warning, as torch) or None."""

from __future__ import annotations

import logging

import pytest

from ckcore.global_plan import plan_global_save, validate_global_plan
from tests.support.gp_cases import ck_plans

# Two ranks whose shards overlap: validation has a finding to log.
BAD = [[("shard", "w", (4,), "float32", (0,), (3,))],
       [("shard", "w", (4,), "float32", (2,), (2,))]]
GOOD = [[("shard", "w", (4,), "float32", (0,), (2,))],
        [("shard", "w", (4,), "float32", (2,), (2,))]]


@pytest.mark.parametrize("logger", ["ckcore", 0, print, object()])
@pytest.mark.parametrize("specs", [BAD, GOOD])
def test_logger_must_be_a_logger(logger, specs):
    # Checked up front: otherwise a bad logger fails only when there is
    # something to report.
    with pytest.raises(TypeError, match="logger must be a logging.Logger \\(or any object with a warning method\\) or None"):
        plan_global_save(ck_plans(specs), logger=logger)
    _, md, _ = plan_global_save(ck_plans(specs))
    with pytest.raises(TypeError, match="logger must be a logging.Logger \\(or any object with a warning method\\) or None"):
        validate_global_plan(ck_plans(specs), md, logger=logger)


def test_logger_adapter_and_none_are_taken(caplog):
    adapter = logging.LoggerAdapter(logging.getLogger("review.adapter"), {})
    with caplog.at_level(logging.WARNING):
        _, md, errors = plan_global_save(ck_plans(BAD), logger=adapter)
        assert errors and validate_global_plan(ck_plans(BAD), md, logger=None) == errors
    assert [r.name for r in caplog.records] == ["review.adapter"] * len(errors) + \
        ["ckcore.global_plan"] * len(errors)


def test_any_object_with_a_warning_method_is_taken():
    # torch's planner only calls logger.warning(msg); a drop-in must take what torch takes.
    class Sink:
        def __init__(self):
            self.got = []

        def warning(self, msg):
            self.got.append(msg)

    sink = Sink()
    _, _, errors = plan_global_save(ck_plans(BAD), logger=sink)
    assert errors and sink.got == errors
