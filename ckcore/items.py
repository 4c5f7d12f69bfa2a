"""The planning façade: chunk intersection, read/write item lists, plan comparison.

Mirrors ``torch/distributed/checkpoint/planner_helpers.py`` without importing
torch. Every function accepts chunk objects with ``.offsets``/``.sizes`` and
plan objects with DCP's fields, whether ckcore's dataclasses or torch's, and
builds its results with the classes it is given (``ItemClasses``), so the
torch integration (:mod:`ckcore.dcp`) gets torch objects from the same code.

The numeric work is in the compiled kernels (``ckcore._kernels``); this module
validates, dispatches and names things. Beyond torch, it can verify that the
reads of a load fill every local chunk exactly once
(``create_read_items(..., verify_cover=True)``), which a damaged checkpoint
otherwise slips past silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, cast

import numpy as np

from ._kernels import _coverage, _intersect, _items
from ._kernels._validate import _check_tensor_bounded
from .metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from .planner import LoadItemType, ReadItem, TensorWriteData, WriteItem, WriteItemType

__all__ = [
    "Intersection",
    "ItemClasses",
    "CKCORE_CLASSES",
    "chunk_arrays",
    "intersect_chunks",
    "create_read_items_for_chunk_list",
    "create_read_items",
    "create_write_item_for_tensor",
    "create_write_item_for_shard",
    "create_write_item_for_bytesio",
    "compare_save_plans",
    "contains_usable_plan",
    "merge_delta_local_plans",
]


class Intersection(NamedTuple):
    """Every overlapping (local, saved) chunk pair, as int64 arrays, by local then saved index.

    ``storage_offsets[k]`` is where the overlap starts inside saved chunk
    ``saved_index[k]``, ``dest_offsets[k]`` where it starts inside local chunk
    ``local_index[k]``, and ``lengths[k]`` its size, per dimension.
    """

    local_index: np.ndarray
    saved_index: np.ndarray
    storage_offsets: np.ndarray
    dest_offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:  # the number of pairs, not of fields
        return int(self.local_index.shape[0])


class ItemClasses(NamedTuple):
    """The classes read items are built from: ckcore's by default, torch's in :mod:`ckcore.dcp`."""

    read_item: type
    metadata_index: type
    load_item_type: Any
    size: type


CKCORE_CLASSES = ItemClasses(ReadItem, MetadataIndex, LoadItemType, tuple)

_BOX_ERRORS = {
    _intersect.BOX_NEGATIVE_OFFSET: "has a negative offset",
    _intersect.BOX_NEGATIVE_SIZE: "has a negative size",
    _intersect.BOX_END_OVERFLOW: "has an offset + size beyond int64",
    _intersect.BOX_VOLUME_OVERFLOW: "has a volume beyond int64",
}


def chunk_arrays(chunks: Sequence[Any], fqn: str = "<chunks>", ndim: Optional[int] = None):
    """Validated ``(offsets, sizes)`` int64 arrays of shape (N, ndim) for a list of chunks.

    >>> off, size = chunk_arrays([ChunkStorageMetadata((0, 4), (2, 4))], "w")
    >>> off.tolist(), size.tolist()
    ([[0, 4]], [[2, 4]])
    """
    return _items.chunk_arrays(_chunk_list(chunks, fqn, "chunks"), fqn, ndim)


def _chunk_list(chunks: Any, fqn: str, what: str) -> list:
    """``chunks`` as a list, or a TypeError naming the fqn (not a bare "not iterable")."""
    if isinstance(chunks, list):
        return chunks
    if isinstance(chunks, (str, bytes)):
        raise TypeError(f"{fqn}: {what} must be a list of chunks, got {type(chunks).__name__}")
    try:
        return list(chunks)
    except TypeError:
        raise TypeError(
            f"{fqn}: {what} must be a list of chunks, got {type(chunks).__name__}") from None


def _as_arrays(chunks: Any, fqn: str, what: str, ndim: Optional[int]):
    """Accept a chunk list or an ``(offsets, sizes)`` pair of arrays; return checked arrays."""
    if isinstance(chunks, tuple) and len(chunks) == 2 and isinstance(chunks[0], np.ndarray):
        off = np.ascontiguousarray(chunks[0])
        size = np.ascontiguousarray(chunks[1])
        for name, a in (("offsets", off), ("sizes", size)):
            if a.ndim != 2:
                raise ValueError(
                    f"{fqn}: {what} {name} must be a 2-d (N, ndim) array, got {a.shape}")
            if a.dtype != np.int64:
                if not np.issubdtype(a.dtype, np.integer):
                    raise TypeError(f"{fqn}: {what} {name} must be integers, got {a.dtype}")
                a_int = a.astype(np.int64)
                if not np.array_equal(a_int, a):
                    raise ValueError(f"{fqn}: {what} {name} do not fit in int64")
                if name == "offsets":
                    off = a_int
                else:
                    size = a_int
        if off.shape != size.shape:
            raise ValueError(f"{fqn}: {what} offsets {off.shape} and sizes {size.shape} differ")
        if ndim is not None and off.shape[1] != ndim:
            raise ValueError(
                f"{fqn}: {what} chunks have {off.shape[1]} dimensions but the tensor has {ndim}")
        code, row = _intersect.check_boxes(off, size)
        if code:
            raise ValueError(
                f"{fqn}: {what} chunk {row} (offsets={tuple(off[row].tolist())}, "
                f"sizes={tuple(size[row].tolist())}) {_BOX_ERRORS[code]}")
        return off, size
    if isinstance(chunks, (str, bytes)) or not hasattr(chunks, "__len__"):
        raise TypeError(
            f"{fqn}: {what} chunks must be a list of chunks or an (offsets, sizes) pair of arrays, "
            f"got {type(chunks).__name__}")
    return chunk_arrays(chunks, fqn, ndim)


def intersect_chunks(local: Any, saved: Any, *, fqn: str = "<chunks>",
                     ndim: Optional[int] = None) -> Intersection:
    """Every overlapping (local, saved) pair and where it lies in each chunk.

    ``local`` and ``saved`` are lists of chunks (objects with ``.offsets`` and
    ``.sizes``) or ``(offsets, sizes)`` pairs of (N, ndim) integer arrays.
    Offsets in the result are relative to each chunk, as in DCP's ReadItem:

    >>> r = intersect_chunks([ChunkStorageMetadata((2,), (4,))],
    ...                      [ChunkStorageMetadata((0,), (4,)), ChunkStorageMetadata((4,), (4,))])
    >>> r.saved_index.tolist(), r.storage_offsets.tolist(), r.dest_offsets.tolist()
    ([0, 1], [[2], [0]], [[0], [2]])
    >>> r.lengths.tolist()
    [[2], [2]]

    Overlap is torch's predicate exactly: a zero-size chunk strictly inside
    another overlaps it (with length 0), one on its boundary does not; for
    0-d tensors every pair overlaps.
    """
    loff, lsize = _as_arrays(local, fqn, "local", ndim)
    soff, ssize = _as_arrays(saved, fqn, "saved", ndim)
    if loff.shape[1] != soff.shape[1] and len(loff) and len(soff):
        raise ValueError(
            f"{fqn}: local chunks have {loff.shape[1]} dimensions but saved chunks have "
            f"{soff.shape[1]}")
    if not len(loff) or not len(soff):
        nd = loff.shape[1] if len(loff) else soff.shape[1]
        empty1 = np.zeros(0, dtype=np.int64)
        empty2 = np.zeros((0, nd), dtype=np.int64)
        return Intersection(empty1, empty1.copy(), empty2, empty2.copy(), empty2.copy())
    return Intersection(*_intersect.intersect(loff, lsize, soff, ssize))


def create_read_items_for_chunk_list(fqn: str, checkpoint_md: Any, local_chunks: Sequence[Any],
                                     classes: Optional[ItemClasses] = None, *,
                                     verify_cover: bool = False) -> list:
    """ReadItems that fill ``local_chunks`` from the saved chunks of ``checkpoint_md``.

    Same items as torch's ``create_read_items_for_chunk_list``, in canonical
    order (by local chunk, then saved chunk). ``checkpoint_md`` is a
    TensorStorageMetadata (ckcore's or torch's); every chunk must have as many
    dimensions as ``checkpoint_md.size``.

    With ``verify_cover``, the saved chunks must also fill every local chunk
    exactly once; a hole or two saved chunks overlapping inside a local chunk
    is a ``ValueError`` naming ``fqn`` and the local chunk (torch does not
    check, and leaves part of the destination unwritten):

    >>> md = TensorStorageMetadata(TensorProperties(), (4,), [ChunkStorageMetadata((0,), (2,))])
    >>> create_read_items_for_chunk_list("w", md, [ChunkStorageMetadata((0,), (4,))],
    ...                                  verify_cover=True)
    Traceback (most recent call last):
    ...
    ValueError: checkpoint metadata does not fill w: local chunk 0 (offsets=(0,), sizes=(4,)) \
would get only 2 of its 4 elements from the saved chunks (is the .metadata damaged?)
    """
    cls = classes or CKCORE_CLASSES
    _check_flag(verify_cover)
    if not hasattr(checkpoint_md, "chunks") or not hasattr(checkpoint_md, "size"):
        raise TypeError(
            f"{fqn}: expected tensor storage metadata (with .size and .chunks), "
            f"got {type(checkpoint_md).__name__}")
    saved_chunks = _chunk_list(checkpoint_md.chunks, fqn, "saved chunks")
    local_chunks = _chunk_list(local_chunks, fqn, "local chunks")
    try:
        ndim = len(checkpoint_md.size)
    except TypeError:
        raise TypeError(
            f"{fqn}: the tensor size must be a sequence, got {checkpoint_md.size!r}") from None
    if verify_cover:
        return _verified_read_items(fqn, local_chunks, saved_chunks, ndim, cls)
    if not local_chunks or not saved_chunks:
        return []
    # None answers only verify=True; unverified, the kernel returns the items.
    return cast("list[Any]", _items.read_items(
        fqn, local_chunks, saved_chunks, ndim,
        cls.read_item, cls.metadata_index, cls.load_item_type.TENSOR, cls.size))


def _check_flag(verify_cover: Any) -> None:
    # A stray truthy/falsy value ("no", 0.0, None) must not switch the check
    # on or off unnoticed.
    if type(verify_cover) is not bool:
        raise TypeError(f"verify_cover must be True or False, got {type(verify_cover).__name__}")


#: Box comparisons the overlap search of :func:`_check_cover` may make per
#: call (about a second). Reads that tile a chunk on a grid, as every DCP
#: layout does, need a few per read; only crafted metadata needs more.
COVER_SWEEP_BUDGET = 500_000_000


def _overlapping_reads(fqn: str, r: Intersection, lsize: np.ndarray) -> Optional[tuple[int, int, int]]:
    """``(local chunk, read a, read b)`` of two reads sharing elements, or None if none do.

    The validator's bounded overlap kernel, stopping at the first pair
    (identical reads cost nothing): never all pairs, which for n reads
    crossing each other are n**2. ValueError when the search would pass
    :data:`COVER_SWEEP_BUDGET` comparisons.
    """
    li = r.local_index
    budget = COVER_SWEEP_BUDGET
    # Reads of a zero-size box hold no elements and cannot overlap.
    solid: np.ndarray = np.all(r.lengths > 0, axis=1)
    starts = np.flatnonzero(np.r_[True, li[1:] != li[:-1]]) if len(li) else np.zeros(0, np.int64)
    for sel in np.split(np.arange(len(li)), starts[1:]):
        sel = sel[solid[sel]]
        if len(sel) < 2:
            continue
        i = int(li[sel[0]])
        if r.lengths.shape[1] == 0:  # 0-d: any two reads write the one element
            return i, int(sel[0]), int(sel[1])
        offs = np.ascontiguousarray(r.dest_offsets[sel])
        sizes = np.ascontiguousarray(r.lengths[sel])
        tsize = np.ascontiguousarray(lsize[i])
        *_, pairs, found, _, exhausted, spent = _check_tensor_bounded(
            offs, sizes, tsize, 1, 1, max(0, budget))
        budget -= spent
        if found:
            a, b = (int(sel[k]) for k in pairs[0].tolist())
            return i, min(a, b), max(a, b)
        if exhausted:
            raise ValueError(
                f"checkpoint metadata for {fqn}: the {len(sel):,} reads into local chunk {i} are too "
                f"irregular to check for overlaps within {COVER_SWEEP_BUDGET:,} comparisons, "
                "which no DCP layout needs (is the .metadata damaged?)")
    return None


def _verified_read_items(fqn: str, local_chunks: list, saved: list, ndim: int,
                         cls: ItemClasses) -> list:
    """The read items of ``local_chunks``, or a ValueError if ``saved`` does not fill them exactly once."""
    if not local_chunks:
        return []
    # One compiled call reads, intersects, verifies the cover and builds the
    # items; None when the cover is not proven there (a hole, an overlap, too
    # many reads into one chunk, no saved chunks): the array path below then
    # decides and names the problem.
    tensor_type = cls.load_item_type.TENSOR
    items = _items.read_items(fqn, local_chunks, saved, ndim, cls.read_item,
                              cls.metadata_index, tensor_type, cls.size, True)
    if items is not None:
        return items
    # chunk_arrays validates (non-negative, int64, ndim) and names fqn and chunk;
    # the raw kernel then skips _as_arrays's second look at the arrays.
    loff, lsize = _items.chunk_arrays(local_chunks, fqn, ndim)
    if saved:
        soff, ssize = _items.chunk_arrays(saved, fqn, ndim)
        r = Intersection(*_intersect.intersect(loff, lsize, soff, ssize))
    else:
        r = intersect_chunks((loff, lsize), [], fqn=fqn, ndim=ndim)
    _check_cover(fqn, r, local_chunks, saved, lsize)
    if not len(r):
        return []
    return _items.build_read_items(
        fqn, r.local_index, r.saved_index, r.storage_offsets, r.dest_offsets, r.lengths,
        local_chunks, saved, cls.read_item, cls.metadata_index, tensor_type, cls.size)


def _check_cover(fqn: str, r: Intersection, local_chunks: Sequence[Any], saved: Sequence[Any],
                 lsize: np.ndarray) -> None:
    """Raise ValueError unless the reads ``r`` fill every local chunk exactly once."""
    code, i, a, b, covered = _coverage.check_cover(r.local_index, r.dest_offsets, r.lengths, lsize)
    if code == _coverage.COVER_UNDECIDED:
        # Many reads into one chunk: look for two that share elements.
        hit = _overlapping_reads(fqn, r, lsize)
        if hit is None:
            return
        i, a, b = hit
        code = _coverage.COVER_OVERLAP
    if code == _coverage.COVER_OK:
        return
    chunk = local_chunks[i]
    where = f"local chunk {i} (offsets={tuple(chunk.offsets)}, sizes={tuple(chunk.sizes)})"
    if code == _coverage.COVER_VOLUME:
        want = 1
        for s in chunk.sizes:
            want *= s
        if covered < want:
            raise ValueError(
                f"checkpoint metadata does not fill {fqn}: {where} would get only {covered} "
                f"of its {want} elements from the saved chunks (is the .metadata damaged?)"
            )
        raise ValueError(
            f"checkpoint metadata for {fqn} has saved chunks that overlap inside {where}: "
            f"they hold {covered} elements for its {want} (is the .metadata damaged?)"
        )
    sa = saved[int(r.saved_index[a])]
    sb = saved[int(r.saved_index[b])]
    raise ValueError(
        f"checkpoint metadata for {fqn} has saved chunks that overlap inside {where}: "
        f"{sa} and {sb} (is the .metadata damaged?)"
    )


def create_read_items(fqn: str, md: Any, local_chunks: Optional[Sequence[Any]] = None,
                      classes: Optional[ItemClasses] = None, *,
                      verify_cover: bool = False) -> list:
    """ReadItems for one state-dict entry: tensor metadata with its local chunks, or bytes.

    For ``BytesStorageMetadata`` (any object whose class is named so) the
    result is torch's single BYTE_IO item with zero offsets and length. For
    tensor metadata, ``verify_cover`` refuses saved chunks that leave a hole
    in a local chunk or overlap inside one (see
    :func:`create_read_items_for_chunk_list`). ``md`` may also be the saved
    chunks as columns, an ``(offsets, sizes)`` pair of int64 ``(n, ndim)``
    arrays (``MetadataColumns.chunks(fqn)``): no chunk object is read or built.

    >>> import numpy as np
    >>> saved = (np.array([[0], [2]]), np.array([[2], [2]]))
    >>> [(i.storage_index.offset, i.lengths) for i in
    ...  create_read_items("w", saved, [ChunkStorageMetadata((1,), (2,))], verify_cover=True)]
    [((0,), (1,)), ((2,), (1,))]
    """
    cls = classes or CKCORE_CLASSES
    _check_flag(verify_cover)
    if isinstance(md, tuple) and len(md) == 2 and isinstance(md[0], np.ndarray):
        return _read_items_from_arrays(fqn, md, local_chunks, cls, verify_cover)
    if isinstance(md, BytesStorageMetadata) or type(md).__name__ == "BytesStorageMetadata":
        zero = cls.size((0,))
        return [cls.read_item(
            type=cls.load_item_type.BYTE_IO,
            dest_index=cls.metadata_index(fqn),
            dest_offsets=zero,
            storage_index=cls.metadata_index(fqn),
            storage_offsets=zero,
            lengths=zero,
        )]
    if not hasattr(md, "chunks") or not hasattr(md, "size"):
        raise TypeError(
            f"{fqn}: expected tensor or bytes storage metadata, got {type(md).__name__}")
    if local_chunks is None:
        raise ValueError(f"{fqn}: tensor metadata needs the local chunks to load")
    return create_read_items_for_chunk_list(fqn, md, local_chunks, cls, verify_cover=verify_cover)


class _SavedRows(Sequence):
    """Saved chunks given as arrays, as chunk objects on demand (for error messages)."""

    def __init__(self, offsets: np.ndarray, sizes: np.ndarray) -> None:
        self._offsets, self._sizes = offsets, sizes

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: Any) -> Any:
        return ChunkStorageMetadata(tuple(self._offsets[i].tolist()), tuple(self._sizes[i].tolist()))


def _read_items_from_arrays(fqn: str, saved: tuple, local_chunks: Optional[Sequence[Any]],
                            cls: ItemClasses, verify_cover: bool) -> list:
    if local_chunks is None:
        raise ValueError(f"{fqn}: tensor metadata needs the local chunks to load")
    soff, ssize = _as_arrays(saved, fqn, "saved chunks", None)
    ndim = soff.shape[1]
    local = _chunk_list(local_chunks, fqn, "local chunks")
    if not local:
        return []
    loff, lsize = _items.chunk_arrays(local, fqn, ndim)
    if len(soff):
        r = Intersection(*_intersect.intersect(loff, lsize, soff, ssize))
    else:
        r = intersect_chunks((loff, lsize), [], fqn=fqn, ndim=ndim)
    if verify_cover:
        _check_cover(fqn, r, local, _SavedRows(soff, ssize), lsize)
    if not len(r):
        return []
    return _items.build_read_items(
        fqn, r.local_index, r.saved_index, r.storage_offsets, r.dest_offsets, r.lengths,
        local, None, cls.read_item, cls.metadata_index, cls.load_item_type.TENSOR, cls.size,
        saved_offsets=soff)


_I64_MAX = 2**63 - 1


def _check_shape(fqn: str, name: str, values: Sequence[int], volume: bool = False) -> tuple:
    """``values`` as a tuple of non-negative int64 ints (and, with ``volume``, an int64 product)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{fqn}: {name} must be a sequence of integers, got {values!r}")
    try:
        t = tuple(values)
    except TypeError:
        raise TypeError(f"{fqn}: {name} must be a sequence of integers, got {values!r}") from None
    for v in t:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fqn}: {name} must be integers, got {t!r}")
        if v < 0:
            raise ValueError(f"{fqn}: {name} must be non-negative, got {t!r}")
        if v > _I64_MAX:
            raise ValueError(f"{fqn}: {name} {t!r} do not fit in int64")
    if volume:
        numel = 1
        for v in t:
            numel *= v
        if numel > _I64_MAX:
            raise ValueError(f"{fqn}: {name} {t!r} has a volume beyond int64")
    return t


def create_write_item_for_tensor(fqn: str, size: Sequence[int],
                                 properties: Optional[TensorProperties] = None) -> WriteItem:
    """The TENSOR write item of a whole (unsharded) tensor of global ``size``."""
    size = _check_shape(fqn, "size", size, volume=True)
    return _tensor_write_item(fqn, WriteItemType.TENSOR, (0,) * len(size), size, size, properties)


def create_write_item_for_shard(fqn: str, offsets: Sequence[int], sizes: Sequence[int],
                                 global_size: Sequence[int],
                                 properties: Optional[TensorProperties] = None) -> WriteItem:
    """The SHARD write item of one chunk (``offsets``, ``sizes``) of a tensor of ``global_size``.

    The chunk must have as many dimensions as the tensor and lie inside it.
    """
    offsets = _check_shape(fqn, "offsets", offsets)
    sizes = _check_shape(fqn, "sizes", sizes)
    global_size = _check_shape(fqn, "global size", global_size, volume=True)
    if not (len(offsets) == len(sizes) == len(global_size)):
        raise ValueError(
            f"{fqn}: chunk offsets={offsets} sizes={sizes} do not match the tensor's "
            f"{len(global_size)} dimensions")
    for o, s, g in zip(offsets, sizes, global_size):
        if o + s > g:
            raise ValueError(
                f"{fqn}: chunk offsets={offsets} sizes={sizes} lies outside the tensor "
                f"{global_size}")
    return _tensor_write_item(fqn, WriteItemType.SHARD, offsets, sizes, global_size, properties)


def _tensor_write_item(fqn: str, kind: WriteItemType, offsets: tuple, sizes: tuple,
                       size: tuple, properties: Optional[TensorProperties]) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(fqn, offsets),
        type=kind,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
            properties=properties if properties is not None else TensorProperties(),
            size=size,
        ),
    )


def create_write_item_for_bytesio(fqn: str) -> WriteItem:
    """The BYTE_IO write item of a non-tensor object."""
    return WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)


def compare_save_plans(plan: Any, other_plan: Any) -> bool:
    """True when two save plans have the same items (torch's ``_compare_save_plans``).

    Compares usability, then item by item: type, index (fqn, offset *and* the
    index hint), and for tensor items the global size and the chunk.
    """
    if plan.usable != other_plan.usable:
        return False
    if len(plan.items) != len(other_plan.items):
        return False
    for a, b in zip(plan.items, other_plan.items):
        if a.type != b.type:
            return False
        ai, bi = a.index, b.index
        if ai.fqn != bi.fqn or ai.offset != bi.offset or ai.index != bi.index:
            return False
        ta, tb = a.tensor_data, b.tensor_data
        if bool(ta) != bool(tb):
            return False
        if ta and tb:
            if ta.size != tb.size:
                return False
            ca, cb = ta.chunk, tb.chunk
            if bool(ca) != bool(cb):
                return False
            if ca and cb and (ca.offsets != cb.offsets or ca.sizes != cb.sizes):
                return False
    return True


def contains_usable_plan(delta_plans: Sequence[Any]) -> bool:
    """True when any delta plan is usable, i.e. some rank's plan changed."""
    return any(p and p.usable for p in delta_plans)


def merge_delta_local_plans(cached_plans: Sequence[Any], delta_plans: Sequence[Any]) -> list:
    """Per rank: the cached plan where the delta plan is an unusable marker, else the delta plan.

    Unlike torch, which zips silently, a different number of cached and delta
    plans is a ``ValueError``: it means ranks were lost or added.
    """
    if len(cached_plans) != len(delta_plans):
        raise ValueError(
            f"merge_delta_local_plans: {len(cached_plans)} cached plans but "
            f"{len(delta_plans)} delta plans")
    return [
        cached if (delta and not delta.usable) else delta
        for cached, delta in zip(cached_plans, delta_plans)
    ]

