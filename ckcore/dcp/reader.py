"""A DCP storage reader that reads only the bytes each ReadItem needs.

torch's ``FileSystemReader.read_data`` ``torch.load``s every saved chunk a
request touches, whole, then narrows it, and serves requests in plan order.
A rank that needs one column block of a row-sharded tensor therefore reads
(and holds in memory) every full row chunk. :class:`RangeFileSystemReader`
instead, per file:

1. locates each tensor item's storage bytes inside its ``torch.save`` archive
   (:mod:`ckcore._torchsave`, a few KiB of zip records and an allow-listed
   pickle; no ``torch.load``);
2. sorts the requests by file offset, computes the byte ranges of each
   request's box (:func:`ckcore.ranges.byte_ranges`) and coalesces them
   across small gaps under an over-read cap (:func:`ckcore.ranges.coalesce_ranges`);
3. reads with ``preadv`` (in the compiled ``read_runs``, GIL released) straight into the destination tensor's memory
   when the source runs are also contiguous there (the usual case: rows of a
   row-major chunk into rows of the destination), and otherwise into a
   bounded scratch buffer followed by the GIL-free box copy
   (:func:`ckcore.ranges.copy_box`), slab by slab so no buffer exceeds
   ``buffer_bytes``.

Items with stream transforms (compression, extensions), formats it cannot
parse, dtype conversions or non-CPU destinations go through torch's own
path (``FileSystemReader.read_data``) or a staging tensor, so the result is
always what torch would load. Planning hooks and ``checkpoint_id``
handling are inherited from ``FileSystemReader``.

Two things differ from torch's reader because a checkpoint may come from
anywhere:

* ``.metadata`` is read with ckcore's allow-list column reader
  (:func:`ckcore.checkpoint.load_metadata_columns`), never ``pickle.load``,
  into a :class:`~ckcore.dcp._lazy_metadata.ColumnarMetadata`: torch's
  ``Metadata`` whose fields are built as torch's classes when first read,
  equal to what torch's ``read_metadata`` returns for any real checkpoint. A file that names any other global raises
  :class:`~ckcore.checkpoint.UnsafeCheckpointError` and nothing in it runs.
* ``read_data`` refuses storage entries whose ``relative_path`` would leave
  the checkpoint directory (absolute, ``..``, NUL, a symlinked directory)
  before opening any file.
"""

from __future__ import annotations

import ctypes
import io
import os
import pathlib
import stat
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ckcore import ranges as _r
from ckcore._saferepr import saferepr
from ckcore._torchsave import CorruptItem, TensorLocation, UnsupportedItem, locate_tensor
from ckcore.checkpoint import CheckpointError, _escapes, load_metadata_columns
from ckcore.dcp._lazy_metadata import ColumnarMetadata, columns_of

__all__ = ["RangeFileSystemReader"]

# Items up to this size are read whole in one call: locating the tensor reads
# the first and last 4 KiB of an item anyway (ckcore._torchsave), so reading
# such an item whole costs no extra bytes.
_SMALL_ITEM = 4096
# At most this many runs per slab, so the (runs, 2|3) int64 arrays of a slab
# stay a few MiB even when every element is its own run.
_MAX_RUNS = 1 << 18
_HAS_FADVISE = hasattr(os, "posix_fadvise")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _byte_view(addr: int, nbytes: int) -> memoryview:
    # A writable byte view of tensor memory [addr, addr + nbytes): torch
    # tensors do not export the buffer protocol (and numpy has no bfloat16 or
    # float8), so the view is built over the raw address.
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * nbytes).from_address(addr)).cast("B")


def _extent(sizes: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> int:
    # bytes from element 0 to one past the last element of a non-empty box
    return (sum((s - 1) * t for s, t in zip(sizes, strides)) + 1) * itemsize


def _slabs(
    offsets: tuple[int, ...], lengths: tuple[int, ...], strides: tuple[int, ...],
    itemsize: int, limit: int,
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    # Split a box along its largest-stride dim (recursively) until each piece
    # spans at most `limit` bytes of the source, so a read buffer stays bounded.
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


def _symlinked_dir(root: str | os.PathLike[str], relative_path: str) -> str | None:
    # The first directory component of `relative_path` under `root` that is a
    # symlink (lstat, nothing is resolved or opened), or None.
    d = os.fspath(root)
    for part in pathlib.PurePath(relative_path).parts[:-1]:
        d = os.path.join(d, part)
        try:
            if stat.S_ISLNK(os.lstat(d).st_mode):
                return d
        except OSError:
            return None  # missing: the open fails later, as in torch
    return None


def _check_inside(root: str | os.PathLike[str], relative_path: object, req: ReadItem) -> None:
    # FileSystemWriter writes plain file names only. A path that leaves the
    # checkpoint directory lexically (absolute, "..", NUL) or through a
    # symlinked directory is refused before any open. The file itself may be
    # a symlink: symlinks are not resolved, so a copy tool's links still load.
    if type(relative_path) is str:
        if not _escapes(relative_path):
            link = _symlinked_dir(root, relative_path)
            if link is None:
                return
            why = f"reached through the symlinked directory {saferepr(link)}"
        else:
            why = "absolute path, '..' or NUL"
    else:
        why = f"a {type(relative_path).__name__}, not a str"
    idx = req.storage_index
    raise CheckpointError(
        f"storage entry for {saferepr(idx.fqn)} (chunk at {saferepr(tuple(idx.offset or ()))}, "
        f"index {saferepr(idx.index)}) names the file {saferepr(relative_path)}, which lies "
        f"outside the checkpoint directory {str(root)!r} ({why}); refusing to read it"
    )


class RangeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that reads only the byte ranges each ReadItem needs.

    Use exactly like torch's reader::

        dcp.load(state_dict, storage_reader=RangeFileSystemReader(path))

    ``max_overread`` caps ``bytes read / bytes needed`` per request; the
    default 1.05 leaves room under a 1.1 budget for the archive records read
    to locate each item (up to 8 KiB per saved chunk touched); ``max_gap`` is the largest hole merged
    into one read; ``buffer_bytes`` bounds the scratch buffer used when a box
    cannot be read straight into the destination; runs of at least
    ``direct_min_bytes`` are read straight into the destination tensor;
    items of at most ``small_item_bytes`` are read whole in one call;
    ``prefetch_bytes`` is how far ahead of the current read the exact byte
    ranges are announced to the kernel (``POSIX_FADV_WILLNEED``, with
    readahead turned off by ``POSIX_FADV_RANDOM``); 0 leaves the kernel's
    readahead alone.
    ``stats`` counts read calls and bytes read by ``read_data`` (the
    whole-chunk fallback is counted as the items' full lengths).

    ``safe_metadata`` (default True): ``read_metadata`` reads ``.metadata``
    (or ``__{rank}.metadata``, from the same path torch's reader uses) with
    ckcore's allow-list unpickler and returns torch's ``Metadata``, equal to
    what ``FileSystemReader.read_metadata`` returns (including the fresh
    ``storage_meta.load_id``). A file naming any global outside the
    allow-list raises :class:`~ckcore.checkpoint.UnsafeCheckpointError`
    without running anything; a missing, truncated or malformed one raises
    :class:`~ckcore.checkpoint.CheckpointError`. ``safe_metadata=False``
    restores torch's ``pickle.load``, which executes whatever the file
    names: use it only for checkpoints you trust, e.g. ones whose
    ``planner_data`` holds a custom planner's classes.

    Whatever ``safe_metadata`` is, ``read_data`` raises
    :class:`~ckcore.checkpoint.CheckpointError`, before opening any file,
    when a storage entry of the plan names a file outside the checkpoint
    directory: an absolute path, a ``..`` component, a NUL byte, or a
    directory component that is a symlink. This covers items served by
    torch's whole-chunk path too. Symlinks are not resolved: the named file
    itself may be a symlink.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        _extension_registry: Any = None,
        *,
        max_overread: float = 1.05,
        max_gap: int = 1 << 20,
        buffer_bytes: int = 16 << 20,
        direct_min_bytes: int = 4096,
        small_item_bytes: int = _SMALL_ITEM,
        prefetch_bytes: int = 8 << 20,
        safe_metadata: bool = True,
    ) -> None:
        super().__init__(path, _extension_registry)
        if not max_overread >= 1.0:
            raise ValueError(f"max_overread must be >= 1.0, got {max_overread}")
        if max_gap < 0 or buffer_bytes < 4096 or direct_min_bytes < 1:
            raise ValueError("max_gap must be >= 0, buffer_bytes >= 4096, direct_min_bytes >= 1")
        self.max_overread = float(max_overread)
        self.max_gap = int(max_gap)
        self.buffer_bytes = int(buffer_bytes)
        self.direct_min_bytes = int(direct_min_bytes)
        self.small_item_bytes = int(small_item_bytes)
        self.prefetch_bytes = int(prefetch_bytes)
        if type(safe_metadata) is not bool:
            # A stray value must not switch torch's pickle.load back on.
            raise TypeError(f"safe_metadata must be True or False, got {saferepr(safe_metadata)}")
        self.safe_metadata = safe_metadata
        self.stats = {"read_calls": 0, "bytes_read": 0, "fallback_items": 0}
        self._md: Metadata | None = None
        self._scratch: np.ndarray | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's torch ``Metadata``, read without ``pickle.load`` unless ``safe_metadata=False``.

        ``rank=r`` reads ``__{r}.metadata`` as torch's reader does (``dcp.load``
        asks for it when the global file is missing).
        """
        if not self.safe_metadata:
            return super().read_metadata(*args, **kwargs)
        path = self._get_metadata_path(kwargs.get("rank"))
        # Columns, not objects: torch's objects are built only for the fields
        # something reads (ckcore's planners and read_data read the columns).
        metadata = ColumnarMetadata(load_metadata_columns(path))
        # As torch's reader: every load gets its own id, recorded in the metadata.
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Keep the metadata (chunk sizes are checked against each archive), then torch's setup.

        For metadata read as columns, ``storage_data`` is a lookup over them
        (no object per entry); otherwise torch's dict.
        """
        view = metadata.ck_storage_view() if isinstance(metadata, ColumnarMetadata) else None
        if view is None:
            super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        else:
            # torch's setup, without reading metadata.storage_data (which
            # would build every entry).
            self.storage_data = view  # type: ignore[assignment]  # a Mapping: all read_data needs
            self.rank = kwargs.get("rank")
            self.use_collectives = kwargs.get("use_collectives", True)
        self._md = metadata

    # ------------------------------------------------------------- raw reads

    def _pread(self, fd: int, n: int, off: int, where: str) -> bytes:
        b = os.pread(fd, n, off)
        self.stats["read_calls"] += 1
        self.stats["bytes_read"] += len(b)
        if len(b) != n:
            raise CorruptItem(f"{where}: file truncated: wanted {n} bytes at offset {off}, got {len(b)}")
        return b

    # ------------------------------------------------------------- read_data

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan``, calling the planner's hooks as torch's reader does.

        Raises :class:`~ckcore.checkpoint.CheckpointError` before opening any
        file if an item's storage entry names a file outside the checkpoint
        directory.
        """
        per_file: dict[str, list[ReadItem]] = {}
        for read_item in plan.items:
            rp = self.storage_data[read_item.storage_index].relative_path
            reqs = per_file.get(rp) if type(rp) is str else None
            if reqs is None:
                # Each file is checked once, before anything is opened; the
                # fallback through torch's read_data reads the same entries.
                _check_inside(self.path, rp, read_item)
                per_file[rp] = reqs = []
            reqs.append(read_item)

        fallback: list[ReadItem] = []
        for relative_path, reqs in per_file.items():
            path = str(self.fs.concat_path(self.path, relative_path))
            # Without blocking (a FIFO named like a data file would wait for
            # a writer forever), and only a regular file is read.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise CheckpointError(
                        f"{path}: a checkpoint data file must be a regular file")
                if self.prefetch_bytes and _HAS_FADVISE:
                    # Our reads are sparse: the kernel's readahead would read
                    # the gaps too (a strided pattern looks sequential to it).
                    # We announce exactly what we will read instead (WILLNEED),
                    # which keeps many reads in flight without threads.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                fallback += self._read_file(fd, path, reqs, planner)
            finally:
                os.close(fd)
        self._scratch = None
        if fallback:
            self.stats["fallback_items"] += len(fallback)
            for req in fallback:
                self.stats["bytes_read"] += self.storage_data[req.storage_index].length
            super().read_data(LoadPlan(fallback), planner).wait()
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _where(self, path: str, req: ReadItem) -> str:
        info = self.storage_data[req.storage_index]
        return (
            f"{path}: item {saferepr(req.storage_index.fqn)} "
            f"(chunk at {saferepr(tuple(req.storage_index.offset or ()))}, "
            f"bytes [{info.offset}, {info.offset + info.length}))"
        )

    def _read_file(
        self, fd: int, path: str, reqs: list[ReadItem], planner: LoadPlanner
    ) -> list[ReadItem]:
        fallback: list[ReadItem] = []
        located: dict[tuple[int, int], tuple[TensorLocation, bytes | None, int] | None] = {}
        jobs = []
        file_size = os.fstat(fd).st_size
        if self.prefetch_bytes and _HAS_FADVISE:
            # The records of every archive sit in its first and last 4 KiB.
            for off, ln in {(self.storage_data[q.storage_index].offset,
                             self.storage_data[q.storage_index].length) for q in reqs}:
                os.posix_fadvise(fd, off, min(ln, 4096), os.POSIX_FADV_WILLNEED)
                if ln > 4096:
                    os.posix_fadvise(fd, off + ln - 4096, 4096, os.POSIX_FADV_WILLNEED)
        for req in reqs:
            info = self.storage_data[req.storage_index]
            where = self._where(path, req)
            if info.offset + info.length > file_size:
                raise CorruptItem(
                    f"{where}: file truncated: the item ends at byte {info.offset + info.length}, "
                    f"the file has {file_size} bytes"
                )
            if info.transform_descriptors:
                fallback.append(req)
                continue
            if req.type == LoadItemType.BYTE_IO:
                data = self._pread(fd, info.length, info.offset, where)
                planner.load_bytes(req, io.BytesIO(data))
                continue
            key = (info.offset, info.length)
            if key not in located:
                located[key] = self._locate(fd, info.offset, info.length, where)
            found = located[key]
            if found is None:
                fallback.append(req)
                continue
            loc, small, item_offset = found
            self._check_chunk(req, loc, where)
            first = loc.base + sum(o * s for o, s in zip(req.storage_offsets, loc.stride)) * loc.itemsize
            jobs.append((first, req, loc, small, item_offset, where))
        # Serve requests in file order: sequential reads, page cache friendly.
        jobs.sort(key=lambda j: j[0])
        for _, req, loc, small, item_offset, where in jobs:
            self._read_tensor(fd, req, loc, (small, item_offset), where, planner)
        return fallback

    def _locate(
        self, fd: int, offset: int, length: int, where: str
    ) -> tuple[TensorLocation, bytes | None, int] | None:
        small: bytes | None = None
        if length <= self.small_item_bytes:
            # One read holds the whole item; its tensor bytes are served from it.
            small = self._pread(fd, length, offset, where)

            def pread(n: int, off: int) -> bytes:
                return small[off - offset : off - offset + n]
        else:

            def pread(n: int, off: int) -> bytes:
                b = os.pread(fd, n, off)
                self.stats["read_calls"] += 1
                self.stats["bytes_read"] += len(b)
                return b

        try:
            return locate_tensor(pread, offset, length, where), small, offset
        except UnsupportedItem:
            return None

    def _check_chunk(self, req: ReadItem, loc: TensorLocation, where: str) -> None:
        cols = columns_of(self._md)
        if cols is not None:
            self._check_chunk_columns(cols, req, loc, where)
            return
        md = self._md.state_dict_metadata.get(req.storage_index.fqn) if self._md else None
        if not isinstance(md, TensorStorageMetadata):
            return
        want = tuple(req.storage_index.offset or ())
        hint = req.storage_index.index
        # torch's index hint first (O(1)), then a scan like find_state_dict_object
        order = md.chunks if hint is None or not 0 <= hint < len(md.chunks) else (
            [md.chunks[hint], *md.chunks]
        )
        for chunk in order:
            if tuple(chunk.offsets) == want:
                if tuple(chunk.sizes) != loc.size:
                    raise CorruptItem(
                        f"{where}: archive holds a tensor of size {loc.size}, the metadata says "
                        f"{tuple(chunk.sizes)}"
                    )
                return

    @staticmethod
    def _check_chunk_columns(cols: Any, req: ReadItem, loc: TensorLocation, where: str) -> None:
        # _check_chunk on the columns: the hinted row first, then the first row
        # with the item's offsets.
        fid = cols._fqn_ids.get(req.storage_index.fqn)
        if fid is None or cols.properties[fid] is None:
            return
        offs, sizes = cols.chunks(fid)
        want = np.asarray(tuple(req.storage_index.offset or ()), dtype=np.int64)
        if offs.shape[1] != len(want):
            return
        hint = req.storage_index.index
        row = -1
        if hint is not None and 0 <= hint < len(offs) and np.array_equal(offs[hint], want):
            row = hint
        else:
            hits = np.flatnonzero((offs == want).all(axis=1))
            if hits.size:
                row = int(hits[0])
        if row >= 0 and tuple(sizes[row].tolist()) != loc.size:
            raise CorruptItem(
                f"{where}: archive holds a tensor of size {loc.size}, the metadata says "
                f"{tuple(sizes[row].tolist())}"
            )

    def _read_tensor(
        self, fd: int, req: ReadItem, loc: TensorLocation,
        small: tuple[bytes | None, int], where: str, planner: LoadPlanner,
    ) -> None:
        target = planner.resolve_tensor(req).detach()
        lengths = tuple(int(x) for x in req.lengths)
        if tuple(target.size()) != lengths:
            raise AssertionError(
                f"req {req.storage_index} mismatch sizes {target.size()} vs {torch.Size(lengths)}"
            )
        offsets = tuple(int(x) for x in req.storage_offsets)
        if len(offsets) != len(loc.size) or any(
            o < 0 or o + n > s for o, n, s in zip(offsets, lengths, loc.size)
        ):
            raise CorruptItem(
                f"{where}: read box offsets={offsets} lengths={lengths} lies outside the saved "
                f"chunk of size {loc.size}"
            )
        direct = (
            target.device.type == "cpu"
            and target.layout == torch.strided
            and _dtype_name(target.dtype) == loc.dtype
            and not target.is_conj()
            and not target.is_neg()
            and all(st > 0 or n <= 1 for st, n in zip(target.stride(), lengths))
        )
        # Anything else (dtype conversion, another device, aliasing strides):
        # read into a CPU tensor of the saved dtype, and let torch copy_ convert.
        dest = target if direct else torch.empty(
            lengths, dtype=getattr(torch, loc.dtype), device="cpu"
        )
        if dest.numel() > 0:
            self._fill(fd, dest, offsets, lengths, loc, small, where)
        if dest is not target:
            target.copy_(dest)
        planner.commit_tensor(req, target)

    def _fill(
        self, fd: int, dest: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...],
        loc: TensorLocation, small: tuple[bytes | None, int], where: str,
    ) -> None:
        isz = loc.itemsize
        dstrides = tuple(dest.stride())
        dview = _byte_view(dest.data_ptr(), _extent(lengths, dstrides, isz))
        data, item_offset = small
        try:
            if data is not None:
                # The whole item is in memory already: one box copy.
                _r.copy_box(
                    data, dview, lengths, itemsize=isz,
                    src_shape=loc.size, src_strides=loc.stride, src_offsets=offsets,
                    src_base=loc.base - item_offset,
                    dst_shape=lengths, dst_strides=dstrides,
                )
                return
            _, run = _r.paired_run_info(
                lengths, itemsize=isz, src_shape=loc.size, dst_shape=lengths,
                src_strides=loc.stride, dst_strides=dstrides, src_offsets=offsets,
            )
            if run >= self.direct_min_bytes:
                # Runs contiguous in file and destination, and long: read in place.
                self._fill_direct(fd, dview, offsets, lengths, dstrides, loc, where)
            else:
                self._fill_scratch(fd, dview, offsets, lengths, dstrides, loc, where)
        except CorruptItem:
            raise
        except ValueError as e:
            raise CorruptItem(f"{where}: {e}") from None

    def _read_runs(self, fd: int, runs: np.ndarray, blocks: np.ndarray, dst: Any, where: str) -> None:
        try:
            calls, nbytes = _r.read_runs(fd, runs, blocks, dst, self.prefetch_bytes)
        except EOFError as e:
            raise CorruptItem(f"{where}: file truncated: {e}") from None
        except OSError as e:
            raise OSError(e.errno, f"{where}: {e.strerror}") from None
        self.stats["read_calls"] += calls
        self.stats["bytes_read"] += nbytes

    @staticmethod
    def _slab_limit(limit: int, loc: TensorLocation, offsets: tuple[int, ...],
                    lengths: tuple[int, ...]) -> int:
        # Shrink the slab span so that a slab holds about _MAX_RUNS runs at most.
        nruns, _, _ = _r.box_runs(loc.size, loc.stride, loc.itemsize, offsets, lengths)
        if nruns > _MAX_RUNS:
            span = _extent(lengths, loc.stride, loc.itemsize)
            limit = min(limit, span * _MAX_RUNS // nruns)
        return max(limit, loc.itemsize)

    def _fill_direct(
        self, fd: int, dview: memoryview, offsets: tuple[int, ...], lengths: tuple[int, ...],
        dstrides: tuple[int, ...], loc: TensorLocation, where: str,
    ) -> None:
        isz = loc.itemsize
        limit = self._slab_limit(256 << 20, loc, offsets, lengths)
        for so, sl in _slabs(offsets, lengths, loc.stride, isz, limit):
            doff = tuple(a - b for a, b in zip(so, offsets))
            pairs = _r.paired_runs(
                sl, itemsize=isz, src_shape=loc.size, dst_shape=lengths,
                src_strides=loc.stride, dst_strides=dstrides, src_offsets=so,
                dst_offsets=doff, src_base=loc.base,
            )
            if len(pairs) > 1 and np.any(pairs[1:, 0] < pairs[:-1, 0] + pairs[:-1, 2]):
                # Source runs overlap (zero strides in the saved tensor): one
                # file byte feeds several places; the scratch path handles it.
                self._fill_scratch(fd, dview, offsets, lengths, dstrides, loc, where, (so, sl))
                continue
            ranges = pairs[:, [0, 2]]
            ranges[:, 1] += ranges[:, 0]
            blocks = _r.coalesce_ranges(ranges, self.max_gap, self.max_overread)
            # One preadv per block: runs land in the destination, gaps are discarded.
            self._read_runs(fd, pairs, blocks, dview, where)

    def _fill_scratch(
        self, fd: int, dview: memoryview, offsets: tuple[int, ...], lengths: tuple[int, ...],
        dstrides: tuple[int, ...], loc: TensorLocation, where: str,
        box: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> None:
        # Fill `box` (default: the whole request offsets/lengths, in saved-chunk
        # coordinates) slab by slab through the bounded scratch buffer.
        isz = loc.itemsize
        if self._scratch is None:
            self._scratch = np.empty(self.buffer_bytes, dtype=np.uint8)
        bo, bl = box if box is not None else (offsets, lengths)
        limit = self._slab_limit(self.buffer_bytes, loc, bo, bl)
        for so, sl in _slabs(bo, bl, loc.stride, isz, limit):
            ranges = _r.byte_ranges(loc.size, loc.stride, isz, so, sl, base=loc.base)
            blocks = _r.coalesce_ranges(ranges, self.max_gap, self.max_overread)
            span0 = int(ranges[0, 0])
            # each block lands at its own offset from the slab's first byte
            runs = np.empty((len(blocks), 3), dtype=np.int64)
            runs[:, 0] = blocks[:, 0]
            runs[:, 1] = blocks[:, 0] - span0
            runs[:, 2] = blocks[:, 1] - blocks[:, 0]
            self._read_runs(fd, runs, blocks, self._scratch, where)
            # The slab's first element is its lowest address (strides >= 0), so
            # it sits at scratch byte 0.
            _r.copy_box(
                self._scratch, dview, sl, itemsize=isz,
                src_shape=sl, src_strides=loc.stride,
                dst_shape=lengths, dst_strides=dstrides,
                dst_offsets=tuple(a - b for a, b in zip(so, offsets)),
            )
