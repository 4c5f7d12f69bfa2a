"""A naive pure-Python reference for chunk intersection, written from torch's formulas.

This is deliberately the slowest, most obvious code possible: every (local,
saved) pair is tested with torch's predicate
(``resharding._check_shard_metadata_pair_overlap``) and narrowed with torch's
formulas (``resharding._shards_get_overlap_region_wrt_saved_tensor``), in
canonical order (local index, then saved index). The kernel tests compare the
compiled interval trie and grid paths against it, so it must not share code
with them.
"""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[Sequence[int], Sequence[int]]  # (offsets, sizes)


def overlaps(a_off: Sequence[int], a_size: Sequence[int],
             b_off: Sequence[int], b_size: Sequence[int]) -> bool:
    """torch's predicate: separated iff some dimension has a.off >= b.end or b.off >= a.end."""
    for d in range(len(a_off)):
        if a_off[d] >= b_off[d] + b_size[d]:
            return False
        if b_off[d] >= a_off[d] + a_size[d]:
            return False
    return True


def narrow(saved_off: Sequence[int], saved_size: Sequence[int],
           local_off: Sequence[int], local_size: Sequence[int]):
    """torch's narrowing: (storage_offsets, dest_offsets, lengths), each a tuple per dimension."""
    so, do, ln = [], [], []
    for s_off, l_off, s_size, l_size in zip(saved_off, local_off, saved_size, local_size):
        min_end = min(s_off + s_size, l_off + l_size)
        length = min_end - max(l_off, s_off)
        if s_off > l_off:
            so.append(0)
            do.append(s_off - l_off)
        else:
            so.append(l_off - s_off)
            do.append(0)
        ln.append(length)
    return tuple(so), tuple(do), tuple(ln)


def intersect(local: Sequence[Box], saved: Sequence[Box]):
    """Every overlapping pair, O(N*M), canonical order.

    Returns a list of ``(local_index, saved_index, storage_offsets,
    dest_offsets, lengths)`` tuples.
    """
    out = []
    for i, (l_off, l_size) in enumerate(local):
        for j, (s_off, s_size) in enumerate(saved):
            if overlaps(l_off, l_size, s_off, s_size):
                so, do, ln = narrow(s_off, s_size, l_off, l_size)
                out.append((i, j, so, do, ln))
    return out


def is_product_grid(boxes: Sequence[Box]) -> bool:
    """True when the boxes are exactly the Cartesian product of their per-dimension intervals.

    That is: no two boxes are equal and their number equals the product of the
    numbers of distinct intervals per dimension (then the map box -> tuple of
    intervals is a bijection onto the product).
    """
    if not boxes:
        return False
    nd = len(boxes[0][0])
    if nd == 0:
        return False
    keys = {tuple((o[d], o[d] + s[d]) for d in range(nd)) for o, s in boxes}
    if len(keys) != len(boxes):
        return False
    prod = 1
    for d in range(nd):
        prod *= len({(o[d], o[d] + s[d]) for o, s in boxes})
    return prod == len(boxes)


def fills_exactly(shape: Sequence[int], saved: Sequence, local: Sequence) -> bool:
    """Every element of every local chunk lies in exactly one saved chunk (element by element)."""
    import numpy as np

    if len(shape) == 0:
        return not local or len(saved) == 1
    for lc in local:
        count = np.zeros(tuple(lc.sizes), dtype=np.int64)
        for sc in saved:
            sl = []
            for lo, ls, so, ss in zip(lc.offsets, lc.sizes, sc.offsets, sc.sizes):
                a, b = max(lo, so), min(lo + ls, so + ss)
                sl.append(slice(a - lo, max(a, b) - lo))
            count[tuple(sl)] += 1
        if (count != 1).any():
            return False
    return True
