"""Named, stable benchmark workloads (DESIGN.md §5), shared by the bench suites.

Each builder returns plain data; the suites turn it into ckcore's or torch's
objects so both libraries get the same input in their own types.
"""

from __future__ import annotations

import itertools

from tests.support.layouts import chunk_cuts


def grid_chunks(shape: tuple[int, ...], parts: tuple[int, ...]) -> list[tuple[tuple, tuple]]:
    """Row-major (offsets, sizes) of a grid that cuts dimension d of ``shape`` into ``parts[d]``."""
    per_dim = [chunk_cuts(n, p) for n, p in zip(shape, parts)]
    return [
        (tuple(c[0] for c in combo), tuple(c[1] for c in combo))
        for combo in itertools.product(*per_dim)
    ]


# name -> (global shape, saved grid, loaded grid)
RESHARD = {
    "reshard-grid": ((65536, 8192), (64, 8), (48, 12)),
    "reshard-fine": ((65536, 65536), (128, 128), (100, 100)),
}
