"""run_demo, the library function under ``ckcore demo``, checks its own arguments."""

from __future__ import annotations

import pytest

from ckcore.demo import MAX_DEMO_LAYERS, MAX_DEMO_RANKS, run_demo

SMALL = dict(layers=1, save_fsdp=2, load_fsdp=1, load_tp=2, use_torch=False)


@pytest.mark.parametrize("kw, error, words", [
    # The library function has the command's bounds, not only the command.
    ({"layers": -2}, ValueError, "layers must be >= 1, got -2"),
    ({"layers": 0}, ValueError, "layers must be >= 1, got 0"),
    ({"repeat": 0}, ValueError, "repeat must be >= 1, got 0"),
    ({"save_fsdp": 0}, ValueError, "save_fsdp must be >= 1, got 0"),
    ({"load_tp": -1}, ValueError, "load_tp must be >= 1, got -1"),
    ({"layers": 1.5}, TypeError, "layers must be an int, got float"),
    ({"layers": True}, TypeError, "layers must be an int, got bool"),
    ({"layers": MAX_DEMO_LAYERS + 1}, ValueError, "capped"),
    ({"save_fsdp": MAX_DEMO_RANKS + 1}, ValueError, "capped"),
    ({"load_fsdp": 64, "load_tp": 128}, ValueError, "capped"),
])
def test_run_demo_refuses_bad_sizes(kw, error, words):
    with pytest.raises(error, match=words):
        run_demo(**{**SMALL, **kw})


def test_run_demo_leaves_the_global_plan_logger_alone(monkeypatch):
    # The demo silences only its own validation warnings (a logger of its
    # own), never the process-wide ckcore.global_plan logger other threads use.
    import logging

    import ckcore.demo as demo

    seen = []
    real = demo.plan_global_save

    def spy(*args, **kwargs):
        seen.append((logging.getLogger("ckcore.global_plan").disabled, kwargs.get("logger")))
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "plan_global_save", spy)
    run_demo(**SMALL)
    assert seen and all(disabled is False for disabled, _ in seen)
    assert all(log is not None and log.name != "ckcore.global_plan" for _, log in seen)
