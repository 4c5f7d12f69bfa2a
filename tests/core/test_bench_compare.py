"""bench/compare.py on synthetic pytest-benchmark JSON files (torch-free)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO

ROOT = str(REPO)
_spec = importlib.util.spec_from_file_location("bench_compare", os.path.join(ROOT, "bench", "compare.py"))
compare_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_mod)


def _ratios(groups):
    """{group: {variant: median}} -> ckcore_ratios as bench/conftest.py writes it."""
    out = {}
    for group, variants in groups.items():
        t = variants["torch"]
        out[group] = {name: {"median_s": m, "ratio_vs_torch": t / m} for name, m in variants.items()}
    return out


def _write(tmp_path, name, groups, with_table=True):
    benchmarks = [
        {"group": g, "name": n, "stats": {"median": m, "mean": m}}
        for g, vs in groups.items() for n, m in vs.items()
    ]
    data = {"benchmarks": benchmarks}
    if with_table:
        data["ckcore_ratios"] = _ratios(groups)
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = compare_mod.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


BASE = {
    "reshard-grid": {"torch": 1.0, "ckcore-items": 0.1, "ckcore-array": 0.01},
    "validate-grid": {"torch": 6.0, "ckcore": 0.06},
}


def test_same_ratios_pass_even_when_the_machine_is_slower(tmp_path):
    base = _write(tmp_path, "a.json", BASE)
    # Every time 3x larger (a busy machine): ratios unchanged, no regression.
    slow = {g: {n: m * 3 for n, m in vs.items()} for g, vs in BASE.items()}
    new = _write(tmp_path, "b.json", slow)
    code, out, err = _run(base, new)
    assert code == 0, out + err
    assert out.count(" ok") == 3
    assert "0 slower" in out


def test_ratio_drop_beyond_tolerance_fails(tmp_path):
    base = _write(tmp_path, "a.json", BASE)
    worse = {g: dict(vs) for g, vs in BASE.items()}
    worse["reshard-grid"]["ckcore-array"] = 0.02  # ratio 100x -> 50x: -50%
    worse["validate-grid"]["ckcore"] = 0.07       # ratio 100x -> 85.7x: -14%, within 25%
    new = _write(tmp_path, "b.json", worse)
    code, out, err = _run(base, new, "--tolerance", "0.25")
    assert code == 1
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("reshard", "validate"))}
    assert "SLOWER" in lines["ckcore-array"] and "-50.0%" in lines["ckcore-array"]
    assert lines["ckcore"].rstrip().endswith("ok") and "-14.3%" in lines["ckcore"]
    assert "reshard-grid/ckcore-array -50.0%" in err
    # A looser tolerance accepts the same drop.
    assert _run(base, new, "--tolerance", "0.6")[0] == 0


def test_faster_is_not_a_failure(tmp_path):
    base = _write(tmp_path, "a.json", BASE)
    better = {g: dict(vs) for g, vs in BASE.items()}
    better["validate-grid"]["ckcore"] = 0.02
    code, out, _ = _run(base, _write(tmp_path, "b.json", better))
    assert code == 0
    assert "faster" in out and "+200.0%" in out


def test_missing_group_and_variant_fail_unless_allowed(tmp_path):
    base = _write(tmp_path, "a.json", BASE)
    partial = {"reshard-grid": {"torch": 1.0, "ckcore-items": 0.1}}  # no ckcore-array, no validate-grid
    new = _write(tmp_path, "b.json", partial)
    code, out, err = _run(base, new)
    assert code == 1
    assert "MISSING (variant missing)" in out
    assert "MISSING (group missing from new run)" in out
    assert "reshard-grid/ckcore-array" in err and "validate-grid/ckcore" in err
    assert _run(base, new, "--allow-missing")[0] == 0


def test_new_variants_are_reported_not_failed(tmp_path):
    base = _write(tmp_path, "a.json", BASE)
    more = {g: dict(vs) for g, vs in BASE.items()}
    more["model-load"] = {"torch": 2.0, "ckcore": 0.2}
    code, out, _ = _run(base, _write(tmp_path, "b.json", more))
    assert code == 0
    assert any(line.startswith("model-load") and line.rstrip().endswith("new") for line in out.splitlines())


def test_ratios_computed_when_the_table_is_absent(tmp_path):
    # A JSON written without bench/conftest.py's table: ratios come from the medians.
    base = _write(tmp_path, "a.json", BASE, with_table=False)
    worse = {g: dict(vs) for g, vs in BASE.items()}
    worse["validate-grid"]["ckcore"] = 0.6
    code, out, _ = _run(base, _write(tmp_path, "b.json", worse, with_table=False))
    assert code == 1
    assert "100.00x" in out and "10.00x" in out and "-90.0%" in out


def test_zero_median_is_na_not_a_crash(tmp_path):
    base = tmp_path / "a.json"
    base.write_text(json.dumps({"ckcore_ratios": {"g": {
        "torch": {"median_s": 1.0, "ratio_vs_torch": 1.0},
        "ckcore": {"median_s": 0.0, "ratio_vs_torch": None}}}}))
    code, out, _ = _run(str(base), str(base))
    assert code == 0
    assert "n/a" in out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a pytest-benchmark JSON object"),
        (json.dumps({"benchmarks": []}), "no torch/ckcore ratios"),
        (json.dumps({"benchmarks": [{"group": "g", "name": "ckcore", "stats": {"median": 1}}]}),
         "no torch/ckcore ratios"),
        (json.dumps({"ckcore_ratios": {"g": [1, 2]}}), "ckcore_ratios is not"),
    ],
)
def test_bad_files_exit_2_with_one_line(tmp_path, content, message):
    good = _write(tmp_path, "good.json", BASE)
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    code, _, err = _run(good, str(bad))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_bad_tolerance(tmp_path):
    good = _write(tmp_path, "good.json", BASE)
    code, _, err = _run(good, good, "--tolerance", "1.5")
    assert code == 2 and "--tolerance" in err


def test_script_runs_as_a_command(tmp_path):
    base = _write(tmp_path, "a.json", BASE)
    worse = {g: dict(vs) for g, vs in BASE.items()}
    worse["reshard-grid"]["ckcore-items"] = 1.0
    new = _write(tmp_path, "b.json", worse)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare.py"), base, new],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "SLOWER" in proc.stdout and "-90.0%" in proc.stdout
