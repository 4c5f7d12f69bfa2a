"""The one rule that turns benchmark medians into the figure: ratio to torch.

Per ``benchmark.group``, the first variant whose name contains ``torch`` is
the reference, and every variant's ratio is ``torch median / its median``.
bench/conftest.py applies it to a live session, bench/compare.py to saved
JSON files.
"""

from __future__ import annotations


def ratio_table(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, dict]]:
    """``{group: {variant: {"median_s", "ratio_vs_torch"}}}`` for groups that have a torch variant."""
    table = {}
    for group, variants in medians.items():
        torch_names = [n for n in variants if "torch" in n]
        if not torch_names:
            continue
        t = variants[torch_names[0]]
        table[group] = {
            name: {"median_s": m, "ratio_vs_torch": (t / m) if m > 0 else None}
            for name, m in variants.items()
        }
    return table
