"""Hypothesis strategies for chunk layouts, shared by the kernel and torch differential tests.

A layout is a list of boxes ``(offsets, sizes)`` of plain int tuples. The
strategies cover what DCP meets in practice and what breaks naive code:

* product grids: even, ``torch.chunk``-uneven (ceil division, with empty
  trailing shards that sit on the tensor's far boundary), random cut points;
* irregular layouts: random boxes, "bricks" (row blocks each cut at its own
  columns), MoE-style expert blocks (each expert group sharded differently),
  nested / overlapping boxes (the interval trie's non-monotone path) and
  duplicated identical boxes;
* zero-size boxes, strictly inside other boxes or on their boundaries;
* 0-d tensors, 1-d to 8-d, zero extents, and offsets shifted near 2**62.

Torch-free: the torch tests convert boxes to torch objects themselves.
"""

from __future__ import annotations

from hypothesis import strategies as st

MAX_BOXES = 96
HUGE = 2**62

Box = tuple[tuple[int, ...], tuple[int, ...]]


# ---------------------------------------------------------------------------
# Per-dimension interval lists
# ---------------------------------------------------------------------------

def chunk_cuts(extent: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk / DTensor Shard cuts: ceil division, empty trailing shards at ``extent``."""
    c = -(-extent // parts) if extent else 0
    out = []
    for i in range(parts):
        start = min(i * c, extent)
        out.append((start, max(0, min(c, extent - start))))
    return out


def point_cuts(extent: int, points: list[int]) -> list[tuple[int, int]]:
    """Intervals between sorted cut points in [0, extent]; repeated points give zero-size pieces."""
    pts = [0] + sorted(min(p, extent) for p in points) + [extent]
    return [(a, b - a) for a, b in zip(pts, pts[1:])]


def product(cuts: list[list[tuple[int, int]]]) -> list[Box]:
    """Row-major Cartesian product of per-dimension interval lists."""
    boxes: list[Box] = [((), ())]
    for dim in cuts:
        boxes = [(o + (s,), z + (n,)) for o, z in boxes for s, n in dim]
    return boxes


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

@st.composite
def shapes(draw, min_dims: int = 1, max_dims: int = 8, max_extent: int = 12):
    """A global shape; extents may be zero (rarely: a zero extent means no overlaps at all)."""
    nd = draw(st.integers(min_dims, max_dims))
    hi = max_extent if nd <= 3 else 5
    return tuple(draw(st.integers(0, hi)) if draw(st.integers(0, 15)) == 0
                 else draw(st.integers(1, hi)) for _ in range(nd))


@st.composite
def _parts(draw, shape, cap: int):
    """Number of pieces per dimension, with a product of at most ``cap``."""
    parts, prod = [], 1
    for _ in shape:
        p = draw(st.integers(1, max(1, min(5, cap // prod))))
        parts.append(p)
        prod *= p
    return parts


@st.composite
def grid_layout(draw, shape, style: str | None = None, cap: int = MAX_BOXES):
    """A full product grid over ``shape``: ``even``, ``chunk`` (torch.chunk) or ``points`` cuts."""
    style = style or draw(st.sampled_from(["even", "chunk", "points"]))
    parts = draw(_parts(shape, cap))
    cuts = []
    for extent, p in zip(shape, parts):
        if style == "even":
            divisors = [k for k in range(1, p + 1) if extent % k == 0] or [1]
            cuts.append(chunk_cuts(extent, draw(st.sampled_from(divisors))))
        elif style == "chunk":
            cuts.append(chunk_cuts(extent, p))
        else:
            pts = draw(st.lists(st.integers(0, extent), min_size=p - 1, max_size=p - 1))
            cuts.append(point_cuts(extent, pts))
    return product(cuts)


@st.composite
def random_boxes(draw, shape, max_boxes: int = 40):
    """Independent random boxes inside ``shape`` (any overlaps, zero sizes included)."""
    n = draw(st.integers(1, max_boxes))
    boxes = []
    for _ in range(n):
        off, size = [], []
        for extent in shape:
            o = draw(st.integers(0, extent))
            off.append(o)
            size.append(draw(st.integers(0, extent - o)))
        boxes.append((tuple(off), tuple(size)))
    return boxes


@st.composite
def brick_layout(draw, shape, cap: int = MAX_BOXES):
    """Row blocks along dimension 0, each cut at its own points along dimension 1.

    Not a product grid (the column cuts differ between blocks); remaining
    dimensions are whole. Falls back to point cuts in 1-d.
    """
    if len(shape) < 2:
        return draw(grid_layout(shape, "points", cap))
    rows = point_cuts(shape[0], draw(st.lists(st.integers(0, shape[0]), max_size=5)))
    per_row = max(1, cap // len(rows))
    boxes = []
    rest_off = (0,) * (len(shape) - 2)
    for r0, rn in rows:
        pts = draw(st.lists(st.integers(0, shape[1]), max_size=min(5, per_row - 1)))
        for c0, cn in point_cuts(shape[1], pts):
            boxes.append(((r0, c0) + rest_off, (rn, cn) + tuple(shape[2:])))
    return boxes


@st.composite
def moe_layout(draw, shape, cap: int = MAX_BOXES):
    """MoE-style: experts (dimension 0) in contiguous groups, each group gridded its own way."""
    if len(shape) < 2:
        return draw(grid_layout(shape, None, cap))
    groups = point_cuts(shape[0], draw(st.lists(st.integers(0, shape[0]), max_size=4)))
    per_group = max(1, cap // len(groups))
    boxes = []
    for g0, gn in groups:
        sub = draw(grid_layout(tuple(shape[1:]), None, per_group))
        boxes.extend(((g0,) + o, (gn,) + s) for o, s in sub)
    return boxes


@st.composite
def nested_layout(draw, shape, max_boxes: int = 30):
    """Boxes with sub-boxes strictly inside them: intervals nest, so ends are not monotone."""
    outer = draw(random_boxes(shape, max(1, max_boxes // 2)))
    boxes = list(outer)
    for o, s in outer:
        if draw(st.booleans()):
            io, isz = [], []
            for off, size in zip(o, s):
                a = draw(st.integers(off, off + size))
                io.append(a)
                isz.append(draw(st.integers(0, off + size - a)))
            boxes.append((tuple(io), tuple(isz)))
    return boxes


@st.composite
def with_zero_size(draw, boxes, shape):
    """Add zero-size boxes: on cut boundaries of existing boxes or at random points."""
    extra = []
    for _ in range(draw(st.integers(1, 4))):
        if boxes and draw(st.booleans()):
            o, s = draw(st.sampled_from(boxes))
            # A corner of an existing box (its start or end in each dimension): on a boundary.
            off = tuple(x + draw(st.sampled_from([0, n])) for x, n in zip(o, s))
        else:
            off = tuple(draw(st.integers(0, e)) for e in shape)
        zdims = draw(st.sets(st.integers(0, max(0, len(shape) - 1)), min_size=1))
        size = tuple(0 if d in zdims else draw(st.integers(0, e - off[d]))
                     for d, e in enumerate(shape))
        extra.append((off, size))
    at = draw(st.integers(0, len(boxes)))
    return boxes[:at] + extra + boxes[at:]


LAYOUT_KINDS = ["grid", "random", "bricks", "moe", "nested", "zero"]


@st.composite
def layout(draw, shape, kind: str | None = None):
    """One chunk list over ``shape`` of the given (or a drawn) kind, possibly with duplicates."""
    kind = kind or draw(st.sampled_from(LAYOUT_KINDS))
    if kind == "grid":
        boxes = draw(grid_layout(shape))
    elif kind == "random":
        boxes = draw(random_boxes(shape))
    elif kind == "bricks":
        boxes = draw(brick_layout(shape))
    elif kind == "moe":
        boxes = draw(moe_layout(shape))
    elif kind == "nested":
        boxes = draw(nested_layout(shape))
    else:
        boxes = draw(with_zero_size(draw(grid_layout(shape)), shape))
    if boxes and draw(st.integers(0, 4)) == 0:
        # Duplicate identical chunks (saved twice by different ranks).
        dups = draw(st.lists(st.sampled_from(boxes), min_size=1, max_size=3))
        boxes = boxes + dups
    if draw(st.booleans()):
        boxes = draw(st.permutations(boxes))
    return list(boxes)


def shift(boxes: list[Box], base: tuple[int, ...]) -> list[Box]:
    """Move every box by ``base`` (the same for local and saved, so overlaps are unchanged)."""
    return [(tuple(o + b for o, b in zip(off, base)), size) for off, size in boxes]


@st.composite
def layout_pair(draw, min_dims: int = 1, max_dims: int = 8, kinds=None):
    """``(shape, local, saved)`` over one global shape, sometimes shifted near 2**62."""
    shape = draw(shapes(min_dims, max_dims))
    kinds = kinds or LAYOUT_KINDS
    local = draw(layout(shape, draw(st.sampled_from(kinds))))
    saved = draw(layout(shape, draw(st.sampled_from(kinds))))
    if draw(st.integers(0, 5)) == 0:
        base = tuple(draw(st.integers(HUGE - 2**20, HUGE + 2**20)) for _ in shape)
        local, saved = shift(local, base), shift(saved, base)
        shape = tuple(e + b for e, b in zip(shape, base))
    return shape, local, saved


@st.composite
def zero_d_pair(draw):
    """0-d: every chunk is ``((), ())``."""
    n = draw(st.integers(1, 5))
    m = draw(st.integers(1, 5))
    return (), [((), ())] * n, [((), ())] * m
