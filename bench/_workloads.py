"""Named, stable benchmark workloads (DESIGN.md §5), shared by the bench suites.

Each builder returns plain data; the suites turn it into ckcore's or torch's
objects so both libraries get the same input in their own types.
"""

from __future__ import annotations

import itertools


def chunk_cuts(n: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk-style cuts of a dimension of length ``n`` into ``parts``: ceil division,
    empty trailing pieces."""
    step = -(-n // parts) if parts else 0
    cuts = []
    for i in range(parts):
        start = min(n, i * step)
        stop = min(n, (i + 1) * step)
        cuts.append((start, stop - start))
    return cuts


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
