"""torch chunk lists for the differential tests: single chunks and product grids."""

from __future__ import annotations

import itertools

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata


def chunk(offsets, sizes) -> ChunkStorageMetadata:
    """torch's chunk of these offsets and sizes."""
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def grid(shape, splits) -> list[ChunkStorageMetadata]:
    """Chunks of a grid over ``shape``: per dim, cut points (clamped to the dim, sorted;
    repeated cuts give zero-size chunks), cells in row-major order."""
    bounds = []
    for n, cuts in zip(shape, splits):
        pts = [0] + sorted(min(c, n) for c in cuts) + [n]
        bounds.append(list(itertools.pairwise(pts)))
    return [chunk([a for a, _ in cell], [b - a for a, b in cell])
            for cell in itertools.product(*bounds)]
