"""Benchmark session plumbing: the torch/ckcore ratio is the figure.

Every workload's benchmarks share a ``benchmark.group``; the variant timed
with torch has ``torch`` in its name. At the end of the session this prints,
per group, each ckcore variant's median and its ratio ``torch median /
ckcore median``, and adds the same table to the ``--benchmark-json`` /
``--benchmark-save`` output under ``"ckcore_ratios"`` so that
``bench/compare.py`` can compare two runs by ratio rather than absolute time.
"""

from __future__ import annotations

import os
import statistics
import sys

# The suites share bench/_workloads.py; with --import-mode=importlib the bench
# folder is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _ratios import ratio_table  # noqa: E402  (needs the path above)


def _medians(benchmarks):
    out = {}
    for b in benchmarks:
        stats = getattr(b, "stats", None)
        data = getattr(stats, "data", None) if stats is not None else None
        if not data:
            continue
        out.setdefault(b.group or b.name, {})[b.name] = statistics.median(data)
    return out


def ratios(benchmarks) -> dict:
    """{group: {variant: {"median_s": m, "ratio_vs_torch": r}}} for every group with a torch variant."""
    return ratio_table(_medians(benchmarks))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ckcore_ratios"] = ratios(benchmarks)


def _summary_tables(tr, benchmarks) -> None:
    """Print the rows benchmarks put in ``extra_info["summary_row"]``, one table per
    ``extra_info["summary_table"]`` (the ``plan-traffic`` figures: bytes, steps, memory)."""
    tables: dict[str, list[dict]] = {}
    for b in benchmarks:
        info = getattr(b, "extra_info", None) or {}
        if "summary_table" in info and "summary_row" in info:
            tables.setdefault(info["summary_table"], []).append(info["summary_row"])
    for name, rows in sorted(tables.items()):
        cols = list(dict.fromkeys(k for row in rows for k in row))
        cells = [[str(row.get(c, "")) for c in cols] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        tr.section(f"{name} figures")
        tr.write_line("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for r in cells:
            tr.write_line("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", False):
        return
    tr = terminalreporter
    _summary_tables(tr, session.benchmarks)
    table = ratios(session.benchmarks)
    if not table:
        return
    tr.section("ckcore / torch ratios (torch median / variant median)")
    for group in sorted(table):
        for name, row in sorted(table[group].items()):
            r = row["ratio_vs_torch"]
            tr.write_line(
                f"{group:24s} {name:48s} median {row['median_s'] * 1e3:12.3f} ms"
                f"   ratio {r:10.1f}x" if r is not None else f"{group} {name} (zero time)"
            )
