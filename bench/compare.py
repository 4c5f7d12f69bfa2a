"""Compare two benchmark runs by their torch/ckcore ratios and fail on a slowdown.

Absolute times on shared CI machines are noise: the same commit runs 2x
slower when a neighbour compiles. Every bench/ workload times torch in the
same run, so the ratio ``torch median / ckcore median`` cancels the machine
out; this script compares that ratio between a baseline run and a new run::

    python bench/compare.py BASELINE.json NEW.json [--tolerance 0.25]

Both files are pytest-benchmark JSON (``--benchmark-json`` or
``--benchmark-save``). The ratios come from the ``ckcore_ratios`` table
bench/conftest.py adds ({group: {variant: {median_s, ratio_vs_torch}}}); a
file without it (written by another conftest) gets the same table computed
from its ``benchmarks`` list. A variant regresses when its ratio drops by
more than ``tolerance`` (a fraction of the baseline ratio: 0.25 = 25%).

Exit status: 0 no regression; 1 a regression, or a baseline group/variant
missing from the new run (``--allow-missing`` accepts missing ones); 2 the
files cannot be read or hold no ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import IO, Any

# The ratio rule lives beside this script (bench/_ratios.py), shared with
# bench/conftest.py; importers that load this file by path need its folder too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ratios import ratio_table  # noqa: E402


class CompareError(ValueError):
    """A benchmark file that cannot be read or holds no ratios."""


def _ratios_from_benchmarks(benchmarks: list) -> dict:
    # The same rule as bench/conftest.py (bench/_ratios.py).
    medians: dict[str, dict[str, float]] = {}
    for b in benchmarks:
        if not isinstance(b, dict):
            continue
        stats = b.get("stats") or {}
        median = stats.get("median")
        if median is None and stats.get("data"):
            median = statistics.median(stats["data"])
        if median is None or "name" not in b:
            continue
        medians.setdefault(b.get("group") or b["name"], {})[b["name"]] = float(median)
    return ratio_table(medians)


def load_ratios(path: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {variant: {"median_s", "ratio_vs_torch"}}}`` of one pytest-benchmark JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise CompareError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: not a pytest-benchmark JSON object")
    table = data.get("ckcore_ratios")
    if table is None:
        table = _ratios_from_benchmarks(data.get("benchmarks") or [])
    if not isinstance(table, dict) or not all(
        isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()) for v in table.values()
    ):
        raise CompareError(f"{path}: ckcore_ratios is not {{group: {{variant: {{...}}}}}}")
    if not table:
        raise CompareError(
            f"{path}: no torch/ckcore ratios (no group has a torch variant; was the run made "
            "with --benchmark-disable, or without bench/conftest.py?)")
    return table


def _ratio(row: dict | None) -> float | None:
    if row is None:
        return None
    r = row.get("ratio_vs_torch")
    return float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None


def compare(base: dict, new: dict, tolerance: float = 0.25) -> list[dict[str, Any]]:
    """One row per (group, variant) of either run, with a ``status``.

    ``status`` is ``ok``, ``faster`` (ratio up by more than ``tolerance``),
    ``SLOWER`` (ratio down by more than ``tolerance`` of the baseline ratio),
    ``MISSING`` (in the baseline, not in the new run; the whole group or the
    variant), ``new`` (only in the new run) or ``n/a`` (a ratio could not be
    computed, e.g. a zero median). torch's own variants (ratio 1 by
    definition) are left out.
    """
    rows = []
    for group in sorted(set(base) | set(new)):
        b_variants, n_variants = base.get(group), new.get(group)
        names = set(b_variants or {}) | set(n_variants or {})
        for name in sorted(n for n in names if "torch" not in n):
            b = _ratio((b_variants or {}).get(name))
            n = _ratio((n_variants or {}).get(name))
            row: dict[str, Any] = {"group": group, "variant": name, "base": b, "new": n,
                                   "change": None}
            if b_variants is not None and name in b_variants and (
                    n_variants is None or name not in n_variants):
                row["status"] = "MISSING"
                row["why"] = "group missing from new run" if n_variants is None else "variant missing"
            elif b_variants is None or name not in b_variants:
                row["status"] = "new"
            elif b is None or n is None or b <= 0:
                row["status"] = "n/a"
            else:
                change = (n - b) / b
                row["change"] = change
                row["status"] = (
                    "SLOWER" if change < -tolerance else "faster" if change > tolerance else "ok"
                )
            rows.append(row)
    return rows


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def print_table(rows: list[dict[str, Any]], out: IO[str]) -> None:
    """The comparison as an aligned text table."""
    header = ["group", "variant", "base ratio", "new ratio", "change", "status"]
    cells = []
    for r in rows:
        change = "-" if r["change"] is None else f"{r['change'] * 100:+.1f}%"
        status = r["status"] + (f" ({r['why']})" if r.get("why") else "")
        cells.append([r["group"], r["variant"], _fmt_ratio(r["base"]), _fmt_ratio(r["new"]),
                      change, status])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    right = {2, 3, 4}
    for line in [header] + cells:
        out.write("  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                            for i, c in enumerate(line)).rstrip() + "\n")


def main(argv: Sequence[str] | None = None, out: IO[str] = sys.stdout,
         err: IO[str] = sys.stderr) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    p = argparse.ArgumentParser(
        description="Compare two pytest-benchmark JSON runs by torch/ckcore ratio.")
    p.add_argument("baseline", help="baseline run (pytest-benchmark JSON)")
    p.add_argument("new", help="new run (pytest-benchmark JSON)")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="allowed drop of a ratio, as a fraction of the baseline ratio (default 0.25)")
    p.add_argument("--allow-missing", action="store_true",
                   help="do not fail when a baseline group or variant is missing from the new run")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if not 0 <= args.tolerance < 1:
        err.write(f"compare: error: --tolerance must be in [0, 1), got {args.tolerance}\n")
        return 2
    try:
        base = load_ratios(args.baseline)
        new = load_ratios(args.new)
    except CompareError as exc:
        err.write(f"compare: error: {exc}\n")
        return 2
    rows = compare(base, new, args.tolerance)
    print_table(rows, out)
    slower = [r for r in rows if r["status"] == "SLOWER"]
    missing = [r for r in rows if r["status"] == "MISSING"]
    out.write(
        f"\n{len(rows)} variants compared at tolerance {args.tolerance:.0%}: {len(slower)} slower, "
        f"{len(missing)} missing, {sum(r['status'] == 'faster' for r in rows)} faster, "
        f"{sum(r['status'] == 'new' for r in rows)} new\n"
    )
    if slower:
        err.write("compare: regression: " + ", ".join(
            f"{r['group']}/{r['variant']} {r['change'] * 100:+.1f}%" for r in slower) + "\n")
    if missing and not args.allow_missing:
        err.write("compare: missing from the new run: " + ", ".join(
            f"{r['group']}/{r['variant']}" for r in missing) + " (--allow-missing to accept)\n")
    return 1 if slower or (missing and not args.allow_missing) else 0


if __name__ == "__main__":
    sys.exit(main())
