"""Byte ranges of a box inside a stored chunk, range coalescing, and box copy.

This is what a reader needs to load *part* of a saved chunk: which bytes of
the file hold the part (:func:`byte_ranges`), how to read them in few calls
without reading much more than needed (:func:`coalesce_ranges`), and how to
move the elements into the destination tensor (:func:`copy_box`). Strides
are explicit because ``torch.save`` keeps a non-contiguous tensor's strides.

All shapes, strides, offsets and lengths are in elements; ``base`` and every
returned address are in bytes. Example: a C-order 4x6 float32 chunk at byte
100, box rows 1..2, columns 2..4::

    >>> byte_ranges((4, 6), (6, 1), 4, (1, 2), (2, 3), base=100).tolist()
    [[132, 144], [156, 168]]
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ckcore._kernels import _ranges
from ckcore._torchsave import _HEAD as _ARCHIVE_HEAD

__all__ = [
    "RECORD_BYTES",
    "box_runs",
    "byte_ranges",
    "coalesce_ranges",
    "contiguous_strides",
    "copy_box",
    "paired_run_info",
    "paired_runs",
    "preadv_calls",
    "read_runs",
    "reads_whole",
    "record_batches",
    "record_windows",
    "slab_limit",
    "slabs",
]

_I64_MAX = 2**63 - 1


#: The range reader's default cost model: one request costs this long...
DEFAULT_REQUEST_LATENCY_S = 1e-3
#: ...and a byte this long at this rate; a gap is read through when reading
#: it costs less than one more request (measured on this project's local disk,
#: cold page cache; ``scripts/measure_storage.py`` measures another storage).
DEFAULT_BANDWIDTH_BYTES_PER_S = 1e9
#: The range reader's default scratch-buffer size, which also caps a gap.
DEFAULT_BUFFER_BYTES = 16 << 20
#: ``max_overread`` meaning "no ratio cap" (coalesce_ranges' budget saturates).
NO_RATIO_CAP = float(1 << 62)
#: The largest gap the defaults read through.
DEFAULT_GAP_BYTES = min(DEFAULT_BUFFER_BYTES,
                        int(DEFAULT_REQUEST_LATENCY_S * DEFAULT_BANDWIDTH_BYTES_PER_S))
#: The range reader's default: runs at least this long are read in place.
DEFAULT_DIRECT_MIN_BYTES = 4096
#: A ``torch.save`` archive's zip records sit in its first and last this many
#: bytes (all but the storage bytes themselves); the locator reads the same.
RECORD_BYTES = _ARCHIVE_HEAD
#: The range reader's default: items up to this size are read whole (their
#: record windows hold them whole anyway) and every box served from memory.
DEFAULT_SMALL_ITEM_BYTES = 2 * RECORD_BYTES
#: A read of merged record windows stops growing past this many bytes.
MAX_RECORD_WINDOW = 1 << 20
#: Boxes of more runs than this are never read whole (their ranges are not listed).
MAX_WHOLE_RUNS = 1 << 18
#: iovecs one ``preadv`` of :func:`read_runs` carries at most.
IOVECS_PER_CALL: int = _ranges.IOVECS_PER_CALL
#: :func:`read_runs` reads a gap between two runs into a discard buffer of at
#: most this many bytes (a longer gap takes several iovecs).
DISCARD_BYTES: int = _ranges.DISCARD_BYTES
#: The range reader reads a box in place in slabs of at most this much file span...
DIRECT_SLAB_BYTES = 256 << 20
#: ...and any slab holds about this many runs at most (:func:`slab_limit`).
MAX_SLAB_RUNS = 1 << 18


def _vec(what: str, name: str, values: Sequence[int]) -> np.ndarray:
    # int64 vector from a sequence of Python/numpy ints; out-of-range values are
    # a ValueError here (numpy would raise OverflowError or wrap silently).
    try:
        items = [operator.index(v) for v in values]
    except TypeError:
        raise TypeError(f"{what}: {name} must be integers, got {values!r}") from None
    for v in items:
        if v > _I64_MAX or v < -_I64_MAX - 1:
            raise ValueError(f"{what}: {name} value {v} does not fit in int64")
    return np.array(items, dtype=np.int64).reshape(len(items))


def _int(what: str, name: str, value: int) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: {name} must be an integer, got {value!r}") from None
    if v > _I64_MAX or v < -_I64_MAX - 1:
        raise ValueError(f"{what}: {name} value {v} does not fit in int64")
    return v


def _bytes_view(what: str, obj: Any, writable: bool) -> memoryview:
    # A flat unsigned-byte view of any C-contiguous buffer (numpy array,
    # bytearray, mmap, ...): the kernel addresses bytes, not elements.
    try:
        m = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what}: {type(obj).__name__} does not support the buffer protocol") from None
    if writable and m.readonly:
        raise ValueError(f"{what}: destination buffer is read-only")
    if not m.c_contiguous:
        raise ValueError(f"{what}: buffer must be C-contiguous (describe strides instead)")
    if m.ndim != 1 or m.format != "B":
        m = m.cast("B")
    return m


def _ranges_array(ranges: Any, what: str = "coalesce_ranges") -> np.ndarray:
    # (K, 2) int64 without numpy's silent float truncation or wrap-around.
    if not isinstance(ranges, np.ndarray):
        rows = [tuple(r) for r in ranges]
        if any(len(r) != 2 for r in rows):
            raise ValueError(f"{what}: ranges must have shape (K, 2)")
        flat = _vec(what, "ranges", [v for r in rows for v in r])
        return flat.reshape(len(rows), 2)
    a = ranges
    if a.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if a.dtype == object:
        raise ValueError(f"{what}: a range bound does not fit in int64")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what}: ranges must be integers, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{what}: ranges must have shape (K, 2), got {a.shape}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _I64_MAX:
        raise ValueError(f"{what}: a range bound does not fit in int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """C-order element strides of ``shape`` (what ``torch.empty(shape).stride()`` returns)."""
    strides = []
    acc = 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def byte_ranges(
    shape: Sequence[int],
    strides: Sequence[int],
    itemsize: int,
    offsets: Sequence[int],
    lengths: Sequence[int],
    base: int = 0,
) -> np.ndarray:
    """Sorted, maximally merged ``[start, end)`` byte ranges holding exactly a box.

    The chunk has ``shape`` and element ``strides`` and its element 0 sits at
    byte ``base``; the box is ``offsets``/``lengths`` in chunk coordinates.
    Returns a (K, 2) int64 array (K == 0 for an empty box). Raises ValueError
    for a box outside the chunk, negative values or int64 overflow.
    """
    w = "byte_ranges"
    return _ranges.byte_ranges(
        _vec(w, "shape", shape),
        _vec(w, "strides", strides),
        _int(w, "itemsize", itemsize),
        _int(w, "base", base),
        _vec(w, "offsets", offsets),
        _vec(w, "lengths", lengths),
    )


def box_runs(
    shape: Sequence[int],
    strides: Sequence[int],
    itemsize: int,
    offsets: Sequence[int],
    lengths: Sequence[int],
    base: int = 0,
) -> tuple[int, int, int]:
    """``(runs, run_bytes, first_byte)`` of a box, in O(ndim), before any merging.

    ``runs * run_bytes`` is the box's size in bytes; callers use it to bound
    the work of :func:`byte_ranges` (one row per run at most).
    """
    w = "box_runs"
    return _ranges.box_runs(
        _vec(w, "shape", shape),
        _vec(w, "strides", strides),
        _int(w, "itemsize", itemsize),
        _int(w, "base", base),
        _vec(w, "offsets", offsets),
        _vec(w, "lengths", lengths),
    )


def coalesce_ranges(
    ranges: Any, max_gap: int = 1 << 20, max_overread: float = 1.1
) -> np.ndarray:
    """Merge sorted ``[start, end)`` ranges across gaps to make fewer, larger reads.

    A gap is filled only if it is at most ``max_gap`` bytes, and gaps are
    filled smallest first while ``bytes read / bytes needed <= max_overread``
    (1.0: only touching ranges merge). ``ranges`` must be sorted and
    non-overlapping, as :func:`byte_ranges` returns them.

        >>> coalesce_ranges([[0, 10], [12, 20], [100, 110]], max_gap=50).tolist()
        [[0, 20], [100, 110]]
    """
    arr = _ranges_array(ranges)
    return _ranges.coalesce(
        arr, _int("coalesce_ranges", "max_gap", max_gap), float(max_overread)
    )


def _side(w: str, name: str, shape: Sequence[int], strides: Sequence[int] | None,
          offsets: Sequence[int] | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked (shape, strides, offsets) of one side of a copy; C-order strides and zero
    offsets by default."""
    return (
        _vec(w, f"{name}_shape", shape),
        _vec(w, f"{name}_strides", contiguous_strides(shape) if strides is None else strides),
        _vec(w, f"{name}_offsets", (0,) * n if offsets is None else offsets),
    )


def copy_box(
    src: Any,
    dst: Any,
    lengths: Sequence[int],
    *,
    itemsize: int,
    src_shape: Sequence[int],
    dst_shape: Sequence[int],
    src_strides: Sequence[int] | None = None,
    dst_strides: Sequence[int] | None = None,
    src_offsets: Sequence[int] | None = None,
    dst_offsets: Sequence[int] | None = None,
    src_base: int = 0,
    dst_base: int = 0,
) -> None:
    """Copy a box of ``lengths`` elements from one strided chunk to another.

    ``src``/``dst`` are any buffer-protocol objects (numpy arrays, bytearray,
    mmap, ...); each chunk starts at byte ``*_base`` of its buffer and has
    ``*_shape`` and element ``*_strides`` (C order if omitted). The box starts at
    ``src_offsets`` in the source and lands at ``dst_offsets`` in the
    destination (zeros if omitted). Contiguous runs are moved with memcpy and
    the GIL released. Equivalent to
    ``dst_chunk[dst_box] = src_chunk[src_box]`` in numpy terms, also when
    ``src`` and ``dst`` share memory (the source is read as it was before
    the copy).
    """
    w = "copy_box"
    n = len(lengths)
    s_shape, s_strides, s_offsets = _side(w, "src", src_shape, src_strides, src_offsets, n)
    d_shape, d_strides, d_offsets = _side(w, "dst", dst_shape, dst_strides, dst_offsets, n)
    _ranges.copy_box(
        _bytes_view(w, src, False), s_shape, s_strides, _int(w, "src_base", src_base), s_offsets,
        _bytes_view(w, dst, True), d_shape, d_strides, _int(w, "dst_base", dst_base), d_offsets,
        _vec(w, "lengths", lengths),
        _int(w, "itemsize", itemsize),
    )


def paired_runs(
    lengths: Sequence[int],
    *,
    itemsize: int,
    src_shape: Sequence[int],
    dst_shape: Sequence[int],
    src_strides: Sequence[int] | None = None,
    dst_strides: Sequence[int] | None = None,
    src_offsets: Sequence[int] | None = None,
    dst_offsets: Sequence[int] | None = None,
    src_base: int = 0,
    dst_base: int = 0,
) -> np.ndarray:
    """The runs :func:`copy_box` would memcpy, as an (K, 3) int64 array ``[src, dst, nbytes]``.

    Same arguments as :func:`copy_box` without the buffers; addresses are byte
    offsets from each buffer's start, rows sorted by source address. A reader
    whose runs are large reads each one straight into the destination.
    """
    w = "paired_runs"
    n = len(lengths)
    s_shape, s_strides, s_offsets = _side(w, "src", src_shape, src_strides, src_offsets, n)
    d_shape, d_strides, d_offsets = _side(w, "dst", dst_shape, dst_strides, dst_offsets, n)
    return _ranges.paired_runs(
        s_shape, s_strides, _int(w, "src_base", src_base), s_offsets,
        d_shape, d_strides, _int(w, "dst_base", dst_base), d_offsets,
        _vec(w, "lengths", lengths),
        _int(w, "itemsize", itemsize),
    )


def paired_run_info(
    lengths: Sequence[int],
    *,
    itemsize: int,
    src_shape: Sequence[int],
    dst_shape: Sequence[int],
    src_strides: Sequence[int] | None = None,
    dst_strides: Sequence[int] | None = None,
    src_offsets: Sequence[int] | None = None,
    dst_offsets: Sequence[int] | None = None,
) -> tuple[int, int]:
    """``(runs, run_bytes)`` of :func:`paired_runs` in O(ndim), without building the rows."""
    w = "paired_run_info"
    n = len(lengths)
    return _ranges.paired_run_info(
        *_side(w, "src", src_shape, src_strides, src_offsets, n),
        *_side(w, "dst", dst_shape, dst_strides, dst_offsets, n),
        _vec(w, "lengths", lengths),
        _int(w, "itemsize", itemsize),
    )


def read_runs(fd: int, runs: Any, blocks: Any, dst: Any, prefetch: int = 0) -> tuple[int, int]:
    """Read file runs straight into a buffer, one ``preadv`` per coalesced block, GIL released.

    ``runs`` is (K, 3) ``[file_offset, dst_offset, nbytes]`` sorted by file
    offset (as :func:`paired_runs` returns them with ``src_base`` = where the
    chunk sits in the file); ``blocks`` the :func:`coalesce_ranges` of their
    ``[file_offset, file_offset + nbytes)``. Gap bytes inside a block go to a
    discard buffer. ``prefetch > 0`` announces blocks that far ahead with
    ``POSIX_FADV_WILLNEED``. Returns ``(read calls, bytes read)``.
    """
    r = np.ascontiguousarray(runs, dtype=np.int64).reshape(-1, 3)
    b = np.ascontiguousarray(blocks, dtype=np.int64).reshape(-1, 2)
    return _ranges.read_runs(
        _int("read_runs", "fd", fd), r, b, _bytes_view("read_runs", dst, True),
        _int("read_runs", "prefetch", prefetch),
    )


def _item_spans(what: str, items: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    # Distinct (offset, length) pairs of storage items: non-negative ints
    # whose end fits in int64.
    out: set[tuple[int, int]] = set()
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{what}: items must be a sequence of (offset, length) pairs, got {items!r}") from None
    for item in items:
        try:
            off, ln = item
        except (TypeError, ValueError):
            raise ValueError(f"{what}: each item must be an (offset, length) pair, got {item!r}") from None
        off, ln = _int(what, "offset", off), _int(what, "length", ln)
        if off < 0 or ln < 0 or off > _I64_MAX - ln:
            raise ValueError(f"{what}: item (offset {off}, length {ln}) is negative or ends past int64")
        out.add((off, ln))
    return out


def record_windows(items: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The reads that fetch the archive records of ``items`` (``(offset, length)`` of one file).

    Each item's records sit in its first and last :data:`RECORD_BYTES`
    (an item up to twice that is wanted whole). A file's items lie back to
    back, so one item's last bytes and the next one's first bytes touch and
    are read as one ``[start, end)`` window; windows merge only when they
    touch or overlap (no other byte is read), up to :data:`MAX_RECORD_WINDOW`
    bytes. Duplicate items count once. An item that is not a pair of
    non-negative ints ending within int64 raises ValueError (TypeError for
    a non-integer).

        >>> record_windows([(0, 10000), (10000, 9000), (19000, 100)])
        [(0, 4096), (5904, 14096), (14904, 19100)]
    """
    spans: list[tuple[int, int]] = []
    for off, ln in _item_spans("record_windows", items):
        if ln == 0:
            continue
        if ln <= 2 * RECORD_BYTES:
            spans.append((off, off + ln))
        else:
            spans.append((off, off + RECORD_BYTES))
            spans.append((off + ln - RECORD_BYTES, off + ln))
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] and end - merged[-1][0] <= MAX_RECORD_WINDOW:
            merged[-1][1] = max(merged[-1][1], end)
        elif merged and end <= merged[-1][1]:
            continue  # inside the previous window already
        else:
            # never read a byte twice: a window capped at MAX_RECORD_WINDOW
            # is followed by one that starts where it ends
            merged.append([max(start, merged[-1][1]) if merged else start, end])
    return [(a, b) for a, b in merged]


def record_batches(items: Sequence[tuple[int, int]], max_bytes: int) -> list[list[tuple[int, int]]]:
    """``items`` (``(offset, length)`` of one file, duplicates once) in file order, cut into batches.

    A reader holds one batch's record windows (:func:`record_windows`) at a
    time: each batch's records, at most ``2 * RECORD_BYTES`` per item, stay
    within ``max_bytes`` (a batch holds at least one item), so the memory
    they take is bounded however many items a file holds.

        >>> record_batches([(20000, 100), (0, 10000), (10000, 10000)], 16384)
        [[(0, 10000), (10000, 10000)], [(20000, 100)]]

    Items are checked as :func:`record_windows` checks them; ``max_bytes``
    must be at least 1.
    """
    max_bytes = _int("record_batches", "max_bytes", max_bytes)
    if max_bytes < 1:
        raise ValueError(f"record_batches: max_bytes must be >= 1, got {max_bytes}")
    batches: list[list[tuple[int, int]]] = []
    used = 0
    for off, ln in sorted(_item_spans("record_batches", items)):
        cost = min(ln, 2 * RECORD_BYTES)
        if not batches or used + cost > max_bytes:
            batches.append([])
            used = 0
        batches[-1].append((off, ln))
        used += cost
    return batches


def reads_whole(
    sizes: Sequence[int],
    itemsize: int,
    offsets: Sequence[int],
    lengths: Sequence[int],
    item_length: int,
    *,
    small_item_bytes: int = DEFAULT_SMALL_ITEM_BYTES,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    direct_min_bytes: int = DEFAULT_DIRECT_MIN_BYTES,
    max_gap: int = DEFAULT_GAP_BYTES,
    max_overread: float = NO_RATIO_CAP,
) -> bool:
    """True when the range reader reads a box's storage item whole, in one request.

    ``sizes`` and ``itemsize`` are the saved chunk's (from the metadata,
    laid out C-order as ``torch.save`` writes a chunk), ``offsets`` and
    ``lengths`` the box inside it, ``item_length`` the storage item's bytes.
    The item is read whole (records and all, located afterwards from memory)
    when it is larger than ``small_item_bytes`` (smaller ones are read whole
    anyway) and fits the ``buffer_bytes`` scratch buffer, the box's runs are
    shorter than ``direct_min_bytes`` (so they go through that buffer in any
    case), its byte ranges coalesce into one read, and the item's bytes
    outside that read are at most ``max_gap``: reading them costs less than
    the request that locating the item first would cost. A box outside the
    chunk, or a chunk whose byte arithmetic overflows int64, is not read
    whole; non-integers raise TypeError, a value outside int64, a negative
    size or item length or
    an itemsize below 1 ValueError.

        >>> reads_whole((64, 1024), 2, (0, 256), (64, 256), 64 * 1024 * 2 + 1500)
        True
        >>> reads_whole((64, 1024), 2, (0, 0), (64, 1024), 64 * 1024 * 2 + 1500)
        False
    """
    w = "reads_whole"
    sizes, offsets, lengths = (tuple(_vec(w, n, v).tolist()) for n, v in
                               (("sizes", sizes), ("offsets", offsets), ("lengths", lengths)))
    itemsize, item_length = _int(w, "itemsize", itemsize), _int(w, "item_length", item_length)
    if itemsize < 1 or item_length < 0 or any(c < 0 for c in sizes):
        raise ValueError(f"{w}: itemsize must be >= 1, item_length and sizes >= 0 "
                         f"(got {itemsize}, {item_length}, {sizes})")
    if not len(sizes) == len(offsets) == len(lengths):
        raise ValueError(f"{w}: sizes, offsets and lengths must have one value per dim, got "
                         f"{sizes}, {offsets}, {lengths}")
    small_item_bytes, buffer_bytes, direct_min_bytes, max_gap = (_int(w, n, v) for n, v in (
        ("small_item_bytes", small_item_bytes), ("buffer_bytes", buffer_bytes),
        ("direct_min_bytes", direct_min_bytes), ("max_gap", max_gap)))
    try:
        max_overread = float(max_overread)
    except (TypeError, ValueError):
        raise TypeError(f"{w}: max_overread must be a number, got {max_overread!r}") from None
    if max_gap < 0 or not max_overread >= 1.0:
        raise ValueError(f"{w}: max_gap must be >= 0 and max_overread >= 1, got {max_gap}, {max_overread}")
    if not small_item_bytes < item_length <= buffer_bytes:
        return False
    if len(sizes) != len(lengths) or len(offsets) != len(lengths) or any(
        o < 0 or n <= 0 or o + n > c for o, n, c in zip(offsets, lengths, sizes)
    ):
        return False
    strides = contiguous_strides(sizes)
    try:
        nruns, run, _ = box_runs(sizes, strides, itemsize, offsets, lengths)
    except ValueError:
        # A chunk whose byte math overflows int64 (sizes from damaged or
        # hostile metadata): not read whole; the reader's located path
        # reports the archive against the metadata.
        return False
    if run >= direct_min_bytes or nruns > MAX_WHOLE_RUNS:
        return False
    blocks = coalesce_ranges(byte_ranges(sizes, strides, itemsize, offsets, lengths),
                             max_gap, max_overread)
    return len(blocks) == 1 and item_length - int(blocks[0, 1] - blocks[0, 0]) <= max_gap


def _extent(sizes: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    # bytes from element 0 to one past the last element of a non-empty box
    return (sum((s - 1) * t for s, t in zip(sizes, strides)) + 1) * itemsize


#: Dims a box of :func:`slabs` may have (its cuts recurse once per dim).
MAX_SLAB_DIMS = 64


def _ints(what: str, name: str, values: Sequence[int]) -> tuple[int, ...]:
    # A tuple of Python ints (int64-checked) from any sequence of integers.
    try:
        seq = list(values)
    except TypeError:
        raise TypeError(f"{what}: {name} must be a sequence of integers, got {values!r}") from None
    return tuple(_vec(what, name, seq).tolist())


def slabs(
    offsets: Sequence[int], lengths: Sequence[int], strides: Sequence[int],
    itemsize: int, limit: int,
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A box cut along its largest-stride dim (recursively) into ``(offsets, lengths)``
    pieces that each span at most ``limit`` bytes of the source (strides >= 0).

    The range reader reads a box slab by slab (coalescing each on its own),
    so a read buffer stays bounded; ``ckcore plan`` counts the same slabs.
    The arguments are checked when this is called: integers (TypeError
    otherwise), one offset (>= 0), length (>= 1) and stride (>= 0) per dim,
    at most :data:`MAX_SLAB_DIMS` dims, ``itemsize >= 1`` and ``limit >=
    itemsize`` (ValueError otherwise).

        >>> list(slabs((0, 0), (4, 6), (6, 1), 4, 48))
        [((0, 0), (2, 6)), ((2, 0), (2, 6))]
    """
    w = "slabs"
    offsets, lengths, strides = _ints(w, "offsets", offsets), _ints(w, "lengths", lengths), \
        _ints(w, "strides", strides)
    itemsize, limit = _int(w, "itemsize", itemsize), _int(w, "limit", limit)
    if not (len(offsets) == len(lengths) == len(strides)) or len(lengths) > MAX_SLAB_DIMS \
            or itemsize < 1 or limit < itemsize or any(o < 0 for o in offsets) \
            or any(t < 0 for t in strides) or any(n < 1 for n in lengths):
        raise ValueError(
            f"{w}: need one offset (>= 0), length (>= 1) and stride (>= 0) per dim, at most "
            f"{MAX_SLAB_DIMS} dims, itemsize >= 1 and limit >= itemsize; got offsets={offsets} "
            f"lengths={lengths} strides={strides} itemsize={itemsize} limit={limit}")
    return _slabs(offsets, lengths, strides, itemsize, limit)


def _slabs(
    offsets: tuple[int, ...], lengths: tuple[int, ...], strides: tuple[int, ...],
    itemsize: int, limit: int,
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    span = _extent(lengths, strides, itemsize)
    if span <= limit:
        yield offsets, lengths
        return
    dims = [d for d in range(len(lengths)) if lengths[d] > 1]
    d = max(dims, key=lambda i: strides[i])
    step = strides[d] * itemsize
    rest = span - (lengths[d] - 1) * step  # span of one index along d
    k = max(1, (limit - rest) // step + 1) if rest <= limit else 1
    for i in range(0, lengths[d], k):
        o = offsets[:d] + (offsets[d] + i,) + offsets[d + 1 :]
        ln = lengths[:d] + (min(k, lengths[d] - i),) + lengths[d + 1 :]
        if rest > limit:
            yield from _slabs(o, ln, strides, itemsize, limit)
        else:
            yield o, ln


def slab_limit(limit: int, sizes: Sequence[int], strides: Sequence[int], itemsize: int,
               offsets: Sequence[int], lengths: Sequence[int],
               max_runs: int | None = None) -> int:
    """``limit`` shrunk so that a slab of the box holds about ``max_runs``
    (default :data:`MAX_SLAB_RUNS`) runs at most."""
    w = "slab_limit"
    limit = _int(w, "limit", limit)
    max_runs = MAX_SLAB_RUNS if max_runs is None else _int(w, "max_runs", max_runs)
    if limit < 1 or max_runs < 1:
        raise ValueError(f"{w}: limit and max_runs must be >= 1, got {limit}, {max_runs}")
    sizes, strides, offsets, lengths = (_ints(w, n, v) for n, v in (
        ("sizes", sizes), ("strides", strides), ("offsets", offsets), ("lengths", lengths)))
    itemsize = _int(w, "itemsize", itemsize)
    nruns, _, _ = box_runs(sizes, strides, itemsize, offsets, lengths)
    if nruns > max_runs:
        span = _extent(lengths, strides, itemsize)
        limit = min(limit, span * max_runs // nruns)
    return max(limit, itemsize)


def preadv_calls(ranges: np.ndarray, blocks: np.ndarray) -> int:
    """The ``preadv`` calls :func:`read_runs` makes for runs ``ranges`` (``[start, end)``,
    sorted, disjoint) and their coalesced ``blocks`` (absent short reads).

    Per block: one iovec per run and per gap between two of its runs (a gap
    longer than the discard buffer takes several; touching runs none), at
    most :data:`IOVECS_PER_CALL` iovecs a call. Arrays of another shape,
    unsorted or overlapping, raise ValueError.

        >>> preadv_calls([[0, 10], [20, 30], [100, 110]], [[0, 30], [100, 110]])
        2
    """
    w = "preadv_calls"
    if ranges is None or blocks is None:
        raise TypeError(f"{w}: ranges and blocks must be (K, 2) integer arrays")
    try:
        r = _ranges_array(ranges, w)
        b = _ranges_array(blocks, w)
    except TypeError as e:
        raise TypeError(f"{w}: ranges and blocks must be (K, 2) integer arrays ({e})") from None
    # read_runs' own rules: non-empty runs, sorted and disjoint, each inside
    # one block; blocks non-empty, sorted and disjoint.
    for name, a in (("ranges", r), ("blocks", b)):
        if len(a) and (np.any(a[:, 0] < 0) or np.any(a[:, 1] <= a[:, 0])
                       or np.any(a[1:, 0] < a[:-1, 1])):
            raise ValueError(f"{w}: {name} must be sorted, disjoint, non-empty [start, end) with start >= 0")
    if not len(r):
        return 0
    home = np.searchsorted(b[:, 1], r[:, 0], side="right") if len(b) else np.zeros(len(r), np.int64)
    if np.any(home >= len(b)) or np.any(r[:, 0] < b[np.minimum(home, len(b) - 1), 0]) \
            or np.any(r[:, 1] > b[np.minimum(home, len(b) - 1), 1]):
        raise ValueError(f"{w}: every run must lie inside one block")
    ends = np.searchsorted(r[:, 0], b[:, 1], side="left")
    starts = np.concatenate([[0], ends[:-1]])
    gaps = np.zeros(len(r), dtype=np.int64)
    gaps[1:] = r[1:, 0] - r[:-1, 1]
    gaps[starts[starts < len(r)]] = 0  # a block's first run has no gap before it
    junk = min(int(gaps.max()), DISCARD_BYTES)
    # ceil(gaps / junk) without forming gaps + junk (it may pass int64)
    pieces = gaps // junk + (gaps % junk > 0) if junk > 0 else gaps
    cs = np.concatenate([[0], np.cumsum(pieces)])
    iovecs = (ends - starts) + (cs[ends] - cs[starts])
    iovecs = iovecs[ends > starts]
    return int(((iovecs + IOVECS_PER_CALL - 1) // IOVECS_PER_CALL).sum())
