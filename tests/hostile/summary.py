"""Counts of the hostile suite, for the issue's closing note: ``python -m tests.hostile.summary``.

Runs every payload class through the same child-process runner as the tests
(batched classes in one child each, the deep nestings one per child, the
special files) and prints, per class and in total: payloads tried, refused,
accepted, crashes, hangs, poisonings, other-exception escapes, code runs
(marker files), and contract violations. ``--list`` also prints each
violation. ``--only CLASS`` runs one class. Not collected by pytest.

``--write-golden`` rewrites golden.json from the current loader's results on
the real fixtures: do it only deliberately (golden.json pins today's results,
which the unpickler rewrite must keep).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import _payloads as pl
from . import _runner as rn

COLUMNS = ("tried", "refused", "accepted", "crashes", "hangs", "poisonings", "escapes", "code_ran",
           "violations")


def tally(verdicts: dict, triples) -> tuple[dict, list[str]]:
    counts = dict.fromkeys(COLUMNS, 0)
    lines = []
    for name, _, expected in triples:
        v = verdicts[name]
        counts["tried"] += 1
        counts["refused"] += v.outcome == "refused"
        counts["accepted"] += v.outcome == "ok"
        counts["crashes"] += v.outcome in ("crash", "error")
        counts["hangs"] += v.outcome == "hang"
        counts["poisonings"] += bool(v.poisoned)
        counts["escapes"] += v.outcome == "escape"
        counts["code_ran"] += bool(v.marker)
        bad = rn.problems(v, expected, quick=getattr(triples, "quick", None))
        if bad:
            counts["violations"] += 1
            lines.append(f"{name}: {'; '.join(bad)}")
    return counts, lines


def write_golden() -> None:
    from ckcore.checkpoint import load_metadata

    gold = {name: rn.canon(load_metadata(pl.DATA / name)) for name in ("dcp_small", "dcp_sharded")}
    rn.GOLDEN_FILE.write_text(json.dumps(gold, indent=1, sort_keys=True) + "\n")
    print(f"wrote {rn.GOLDEN_FILE}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.hostile.summary", description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print every contract violation")
    ap.add_argument("--only", help="run one class: " + ", ".join(
        [*pl.BATCHED, *pl.ISOLATED, "special", "cli"]))
    ap.add_argument("--write-golden", action="store_true")
    args = ap.parse_args(argv)
    if args.write_golden:
        write_golden()
        return 0
    rows = {}
    all_lines = []
    t0 = time.perf_counter()
    classes = [*pl.BATCHED, *pl.ISOLATED, "special", "cli"]
    for cls in classes:
        if args.only and cls != args.only:
            continue
        t = time.perf_counter()
        if cls in pl.BATCHED:
            triples = pl.BATCHED[cls]()
            verdicts = rn.run_payloads(triples)
            counts, lines = tally(verdicts, triples)
        elif cls in pl.ISOLATED:
            triples = pl.ISOLATED[cls]()
            counts, lines = tally(rn.run_payloads(triples, isolate=True, workers=2), triples)
        elif cls == "special":
            with tempfile.TemporaryDirectory() as tmp:
                tasks = pl.special_file_tasks(Path(tmp))
                verdicts = rn.run_tasks([rn.Task(n, m, p, e) for n, p, m, e in tasks])
                triples = _Quick([(n, None, e) for n, _, _, e in tasks])
                counts, lines = tally(verdicts, triples)
        else:
            from .test_cli_hostile import run_cli_cases

            counts, lines = run_cli_cases()
        rows[cls] = counts
        all_lines += lines
        print(f"  {cls}: {counts['tried']} payloads in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    total = {k: sum(r[k] for r in rows.values()) for k in COLUMNS}
    width = max(map(len, rows), default=5) + 2
    print("class".ljust(width) + "".join(c.rjust(12) for c in COLUMNS))
    for cls, r in [*rows.items(), ("TOTAL", total)]:
        print(cls.ljust(width) + "".join(str(r[c]).rjust(12) for c in COLUMNS))
    print(f"elapsed {time.perf_counter() - t0:.0f} s")
    if args.list:
        print("\n".join(all_lines))
    return 0


class _Quick(list):
    quick = rn.QUICK


if __name__ == "__main__":
    sys.exit(main())
