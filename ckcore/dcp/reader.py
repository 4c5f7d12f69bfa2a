"""A DCP storage reader that reads only the bytes each ReadItem needs.

torch's ``FileSystemReader.read_data`` ``torch.load``s every saved chunk a
request touches, whole, then narrows it, and serves requests in plan order.
A rank that needs one column block of a row-sharded tensor therefore reads
(and holds in memory) every full row chunk. :class:`RangeFileSystemReader`
instead, per file:

1. locates each tensor item's storage bytes inside its ``torch.save`` archive
   (:mod:`ckcore._torchsave`, a few KiB of zip records and an allow-listed
   pickle; no ``torch.load``), the records of back-to-back items read in
   merged windows (:func:`ckcore.ranges.record_windows`, a batch of items at
   a time); a narrow box whose item would be read through anyway reads the
   item whole in one request instead and locates it in memory
   (:func:`ckcore.ranges.reads_whole`);
2. sorts the requests by file offset, computes the byte ranges of each
   request's box (:func:`ckcore.ranges.byte_ranges`) and coalesces them
   across every gap that costs less to read than one more request would
   (a per-request latency times a bandwidth; :func:`ckcore.ranges.coalesce_ranges`);
3. reads with ``preadv`` (in the compiled ``read_runs``, GIL released, on
   ``thread_count`` worker threads: several files and runs in flight) straight into the destination tensor's memory
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

import bisect
import ctypes
import io
import math
import operator
import os
import pathlib
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future as _CFuture
from concurrent.futures import ThreadPoolExecutor
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
from ckcore.dcp._compact import LocalReadItems
from ckcore.dcp._lazy_metadata import ColumnarMetadata, columns_of
from ckcore.dtypes import DTYPE_ITEMSIZE

__all__ = ["RangeFileSystemReader", "default_thread_count"]

# Items up to this size are read whole: locating the tensor reads the first
# and last 4 KiB of an item anyway (ckcore._torchsave), so its record window
# holds it whole and every box of it is served from memory.
_SMALL_ITEM = _r.DEFAULT_SMALL_ITEM_BYTES
# At most this many runs per slab, so the (runs, 2|3) int64 arrays of a slab
# stay a few MiB even when every element is its own run.
_MAX_RUNS: int | None = None  # None: ranges.MAX_SLAB_RUNS (tests set a smaller one)
_HAS_FADVISE = hasattr(os, "posix_fadvise")
# max_overread=None: no ratio cap. The storage model's defaults are the
# torch-free ranges module's, so ``ckcore plan`` reports what this reader reads.
_NO_RATIO_CAP = _r.NO_RATIO_CAP
DEFAULT_REQUEST_LATENCY_S = _r.DEFAULT_REQUEST_LATENCY_S
DEFAULT_BANDWIDTH_BYTES_PER_S = _r.DEFAULT_BANDWIDTH_BYTES_PER_S


def default_thread_count(max_threads: int = 4) -> int:
    """Worker threads a ``RangeFileSystemReader`` starts when not told: 1 to ``max_threads``.

    The CPUs this process may run on (``os.sched_getaffinity``) divided by
    the ranks that share this host (torchrun's ``LOCAL_WORLD_SIZE``, 1 when
    unset or not a positive integer). Each worker copies what it reads;
    more workers than CPUs only queue for them, and the ranks of one host
    share its CPUs. Storage whose requests wait long on a round trip, on a
    host with CPUs to spare, is served by an explicit larger ``thread_count``.
    """
    if isinstance(max_threads, bool):
        raise TypeError(f"max_threads must be an int, got {saferepr(max_threads)}")
    try:
        max_threads = operator.index(max_threads)
    except TypeError:
        raise TypeError(f"max_threads must be an int, got {saferepr(max_threads)}") from None
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, min(max_threads, cpus // max(1, local)))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _byte_view(addr: int, nbytes: int) -> memoryview:
    # A writable byte view of tensor memory [addr, addr + nbytes): torch
    # tensors do not export the buffer protocol (and numpy has no bfloat16 or
    # float8), so the view is built over the raw address.
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * nbytes).from_address(addr)).cast("B")


# bytes from element 0 to one past the last element of a non-empty box
_extent = _r._extent


# Split a box along its largest-stride dim (recursively) until each piece
# spans at most `limit` bytes of the source, so a read buffer stays bounded
# (in ckcore.ranges, torch-free, so that `ckcore plan` counts the same slabs).
_slabs = _r.slabs


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

    Coalescing follows a cost model of the storage: a gap between two
    needed byte ranges is read through (and discarded) when reading it costs
    less than one more request, i.e. when ``gap < request_latency_s *
    bandwidth_bytes_per_s``, and never past ``buffer_bytes``. The defaults
    (1 ms, 1 GB/s) were measured on local disk with a cold page cache (README,
    "Concurrent reads and coalescing", says how to measure them for a
    parallel file system or object store). Two explicit overrides:
    ``max_gap`` (bytes) replaces the model's gap limit, and
    ``max_overread`` adds a cap on ``bytes read / bytes needed`` per box
    (gaps filled smallest first while under it); ``max_overread=1.05,
    max_gap=1 << 20`` is the rule of ckcore 0.1.

    ``thread_count`` worker threads read with the GIL released (1 reads on
    the calling thread; the default, ``None``, is :func:`default_thread_count`:
    this host's usable CPUs shared among its ranks, 1 to 4): files are prepared
    up to ``thread_count`` ahead, large boxes are cut into pieces that fill
    disjoint parts of the destination, and at most ``4 * thread_count``
    items are in flight. The planner's ``resolve_tensor``,
    ``commit_tensor`` and ``load_bytes`` run on the calling thread, as
    torch's reader runs them; two items whose destination memory overlaps
    are written in the sequential order. The result equals
    ``thread_count=1`` byte for byte; a worker's error is raised by
    ``read_data`` with the sequential path's message, after every worker has
    stopped. Memory: one ``buffer_bytes`` scratch buffer per worker, used
    only by boxes that cannot be read in place.

    ``buffer_bytes`` bounds the scratch buffer used when a box
    cannot be read straight into the destination; runs of at least
    ``direct_min_bytes`` are read straight into the destination tensor;
    items of at most ``small_item_bytes`` (default 8 KiB, at most ``buffer_bytes``) are read whole and served from memory;
    ``prefetch_bytes`` is how far ahead of the current read the exact byte
    ranges are announced to the kernel (``POSIX_FADV_WILLNEED``, with
    readahead turned off by ``POSIX_FADV_RANDOM``); 0 leaves the kernel's
    readahead alone.
    ``stats`` counts read calls and bytes read by ``read_data`` (the
    whole-chunk fallback is counted as one call and the full length per item).

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
        max_overread: float | None = None,
        max_gap: int | None = None,
        buffer_bytes: int = _r.DEFAULT_BUFFER_BYTES,
        direct_min_bytes: int = _r.DEFAULT_DIRECT_MIN_BYTES,
        small_item_bytes: int | None = None,
        prefetch_bytes: int = 8 << 20,
        thread_count: int | None = None,
        request_latency_s: float = DEFAULT_REQUEST_LATENCY_S,
        bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S,
        safe_metadata: bool = True,
    ) -> None:
        super().__init__(path, _extension_registry)
        if max_overread is not None and not max_overread >= 1.0:
            raise ValueError(f"max_overread must be >= 1.0 or None, got {max_overread}")
        if (max_gap is not None and max_gap < 0) or buffer_bytes < 4096 or direct_min_bytes < 1:
            raise ValueError("max_gap must be >= 0 or None, buffer_bytes >= 4096, direct_min_bytes >= 1")
        if small_item_bytes is None:
            small_item_bytes = min(_SMALL_ITEM, buffer_bytes)
        if not 0 <= small_item_bytes <= buffer_bytes:
            # Small items are held whole until they are copied: each within
            # the scratch buffer's size, as every other read is.
            raise ValueError(f"small_item_bytes must be between 0 and buffer_bytes ({buffer_bytes}), "
                             f"got {small_item_bytes}")
        if thread_count is None:
            thread_count = default_thread_count()
        if type(thread_count) is not int or thread_count < 1:
            raise ValueError(f"thread_count must be an int >= 1, got {saferepr(thread_count)}")
        if not (math.isfinite(request_latency_s) and request_latency_s >= 0):
            raise ValueError(f"request_latency_s must be finite and >= 0, got {request_latency_s}")
        if not (math.isfinite(bandwidth_bytes_per_s) and bandwidth_bytes_per_s > 0):
            raise ValueError(f"bandwidth_bytes_per_s must be finite and > 0, got {bandwidth_bytes_per_s}")
        self.max_overread = None if max_overread is None else float(max_overread)
        self.max_gap = None if max_gap is None else int(max_gap)
        self.buffer_bytes = int(buffer_bytes)
        self.direct_min_bytes = int(direct_min_bytes)
        self.small_item_bytes = int(small_item_bytes)
        self.prefetch_bytes = int(prefetch_bytes)
        self.thread_count = thread_count
        self.request_latency_s = float(request_latency_s)
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        # The coalescing rule: a gap is read through when reading it costs
        # less than one more request (gap / bandwidth < latency), never more
        # than a scratch buffer holds; an explicit max_gap replaces that
        # limit and an explicit max_overread adds the ratio cap.
        self._gap_limit = self.max_gap if self.max_gap is not None else min(
            self.buffer_bytes, int(self.request_latency_s * self.bandwidth_bytes_per_s))
        self._overread_limit = self.max_overread if self.max_overread is not None else _NO_RATIO_CAP
        if type(safe_metadata) is not bool:
            # A stray value must not switch torch's pickle.load back on.
            raise TypeError(f"safe_metadata must be True or False, got {saferepr(safe_metadata)}")
        self.safe_metadata = safe_metadata
        self.stats = {"read_calls": 0, "bytes_read": 0, "fallback_items": 0}
        self._stats_lock = threading.Lock()
        self._md: Metadata | None = None

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

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """The plan unchanged; a ``FastLoadPlanner``'s read items then stay on this rank.

        This reader's global step returns plans unchanged, so when the
        planner's does too the items need not travel to the coordinator
        (only a ticket does; ``FastLoadPlanner.finish_plan`` restores them).
        """
        items = plan.items
        if (isinstance(items, LocalReadItems) and items.coordinator_keeps
                and type(self).prepare_global_plan is FileSystemReader.prepare_global_plan
                and "prepare_global_plan" not in vars(self)):
            items.stay = True
        return super().prepare_local_plan(plan)

    # ------------------------------------------------------------- raw reads

    def _count(self, calls: int, nbytes: int) -> None:
        # Workers count too: one lock keeps the stats exact under threads.
        with self._stats_lock:
            self.stats["read_calls"] += calls
            self.stats["bytes_read"] += nbytes

    def _pread(self, fd: int, n: int, off: int, where: str) -> bytes:
        b = os.pread(fd, n, off)
        self._count(1, len(b))
        if len(b) != n:
            raise CorruptItem(f"{where}: file truncated: wanted {n} bytes at offset {off}, got {len(b)}")
        return b

    # ------------------------------------------------------------- read_data

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan``, calling the planner's hooks as torch's reader does.

        ``resolve_tensor``, ``commit_tensor`` and ``load_bytes`` are called
        on the calling thread (as torch's reader calls them); with
        ``thread_count > 1`` the reads run on up to ``thread_count`` worker
        threads, several items resolved ahead of their commit, and every
        worker has stopped when this returns or raises. The result is the
        sequential path's (``thread_count=1``), byte for byte.

        Raises :class:`~ckcore.checkpoint.CheckpointError` before opening any
        file if an item's storage entry names a file outside the checkpoint
        directory, and (as the items are read) when a file is shorter than an
        entry, two entries of a file share bytes, or an archive is damaged.
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
        if self.thread_count > 1 and per_file:
            fallback = _Concurrent(self, planner).run(per_file)
        else:
            scratch = _Scratch(self.buffer_bytes)
            for relative_path, reqs in per_file.items():
                path = str(self.fs.concat_path(self.path, relative_path))
                fd = self._open(path)
                try:
                    fallback += self._read_file(fd, path, reqs, planner, scratch)
                finally:
                    os.close(fd)
        if fallback:
            self.stats["fallback_items"] += len(fallback)
            for req in fallback:
                # torch's path reads each of these whole, in (at least) one call
                self.stats["bytes_read"] += self.storage_data[req.storage_index].length
                self.stats["read_calls"] += 1
            super().read_data(LoadPlan(fallback), planner).wait()
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _open(self, path: str) -> int:
        # Without blocking (a FIFO named like a data file would wait for a
        # writer forever), and only a regular file is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"{path}: a checkpoint data file must be a regular file")
            if self.prefetch_bytes and _HAS_FADVISE:
                # Our reads are sparse: the kernel's readahead would read
                # the gaps too (a strided pattern looks sequential to it).
                # We announce exactly what we will read instead (WILLNEED),
                # which keeps many reads in flight.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _where(self, path: str, req: ReadItem) -> str:
        info = self.storage_data[req.storage_index]
        return (
            f"{path}: item {saferepr(req.storage_index.fqn)} "
            f"(chunk at {saferepr(tuple(req.storage_index.offset or ()))}, "
            f"bytes [{info.offset}, {info.offset + info.length}))"
        )

    def _read_file(
        self, fd: int, path: str, reqs: list[ReadItem], planner: LoadPlanner,
        scratch: _Scratch | None = None,
    ) -> list[ReadItem]:
        # The sequential path: locate, then per item resolve, read, commit.
        scratch = scratch if scratch is not None else _Scratch(self.buffer_bytes)
        jobs, byte_items, fallback = self._prepare(fd, path, reqs)
        for req, data in byte_items:
            planner.load_bytes(req, io.BytesIO(data))
        for job in jobs:
            target, dest = self._resolve(job, planner)
            for piece in self._pieces(fd, dest, job, 1):
                piece(scratch)
            if dest is not target:
                target.copy_(dest)
            planner.commit_tensor(job.req, target)
        return fallback

    def _prepare(
        self, fd: int, path: str, reqs: list[ReadItem]
    ) -> tuple[list[_Job], list[tuple[ReadItem, bytes]], list[ReadItem]]:
        # Everything of one file that needs no planner: checks, archive
        # records, bytes items. Touches no destination, so a worker may run it.
        fallback: list[ReadItem] = []
        byte_items: list[tuple[ReadItem, bytes]] = []
        located: dict[tuple[int, int], tuple[TensorLocation, bytes | None, int] | None] = {}
        jobs: list[_Job] = []
        file_size = os.fstat(fd).st_size
        self._check_entries(path, reqs, file_size)
        whole: dict[int, str] = {}
        for i, req in enumerate(reqs):
            info = self.storage_data[req.storage_index]
            if not info.transform_descriptors and req.type != LoadItemType.BYTE_IO:
                dtype = self._whole_read(req, info)
                if dtype is not None:
                    whole[i] = dtype
        # Every other tensor item is located from its archive records, read
        # in merged windows a batch at a time (memory bounded by buffer_bytes).
        # Each item is named in errors as its first read item in plan order.
        first_where: dict[tuple[int, int], str] = {}
        for i, q in enumerate(reqs):
            info = self.storage_data[q.storage_index]
            if not info.transform_descriptors and q.type != LoadItemType.BYTE_IO and i not in whole:
                first_where.setdefault((info.offset, info.length), self._where(path, q))
        for batch in _r.record_batches(list(first_where), self.buffer_bytes):
            records = self._record_windows(fd, path, batch)
            for off, ln in batch:
                located[(off, ln)] = self._locate(fd, off, ln, first_where[(off, ln)], records)
        for i, req in enumerate(reqs):
            info = self.storage_data[req.storage_index]
            where = self._where(path, req)
            if info.transform_descriptors:
                fallback.append(req)
                continue
            if req.type == LoadItemType.BYTE_IO:
                byte_items.append((req, self._pread(fd, info.length, info.offset, where)))
                continue
            if i in whole:
                # Located and checked when read (_read_whole), from the item's own bytes.
                jobs.append(_Job(info.offset, req, None, None, info.offset, where,
                                 whole[i], info.length))
                continue
            found = located[(info.offset, info.length)]
            if found is None:
                fallback.append(req)
                continue
            loc, small, item_offset = found
            self._check_chunk(req, loc, where)
            first = loc.base + sum(o * s for o, s in zip(req.storage_offsets, loc.stride)) * loc.itemsize
            jobs.append(_Job(first, req, loc, small, item_offset, where))
        # Serve requests in file order: sequential reads, page cache friendly.
        jobs.sort(key=lambda j: j.first)
        if self.prefetch_bytes and _HAS_FADVISE:
            self._announce_ahead(jobs)
        return jobs, byte_items, fallback

    def _announce_ahead(self, jobs: list[_Job]) -> None:
        # Each item read whole announces (POSIX_FADV_WILLNEED) the whole-read
        # items after it up to prefetch_bytes ahead, so the device fetches
        # them while this one is copied; the first announces itself too.
        whole = [j for j in jobs if j.loc is None]
        k = 0
        for i, job in enumerate(whole):
            reach = job.item_offset + job.length + self.prefetch_bytes
            k = max(k, i + 1)
            ahead = [(job.item_offset, job.length)] if i == 0 else []
            while k < len(whole) and whole[k].item_offset < reach:
                ahead.append((whole[k].item_offset, whole[k].length))
                k += 1
            job.ahead = ahead

    def _check_entries(self, path: str, reqs: list[ReadItem], file_size: int) -> None:
        # The entries this plan reads from one file must lie inside it and
        # must not share bytes (FileSystemWriter writes each item once, back
        # to back): otherwise the metadata does not describe this file, and
        # a read would land another item's bytes in a destination.
        entries: dict[Any, Any] = {}
        for req in reqs:
            entries.setdefault(req.storage_index, req)
        spans = []
        for idx, req in entries.items():
            info = self.storage_data[idx]
            if info.offset + info.length > file_size:
                raise CorruptItem(
                    f"{self._where(path, req)}: file truncated: the item ends at byte "
                    f"{info.offset + info.length}, the file has {file_size} bytes"
                )
            if info.length > 0:
                spans.append((info.offset, info.offset + info.length, req))
        spans.sort(key=lambda e: (e[0], e[1]))
        reach_end, reach = -1, None
        for start, end, req in spans:
            if start < reach_end and reach is not None:
                raise CheckpointError(
                    f"{self._where(path, req)}: its bytes overlap those of "
                    f"{saferepr(reach.storage_index.fqn)} (chunk at "
                    f"{saferepr(tuple(reach.storage_index.offset or ()))}, up to byte {reach_end}); "
                    "the metadata does not describe this file"
                )
            if end > reach_end:
                reach_end, reach = end, req

    def _whole_read(self, req: ReadItem, info: Any) -> str | None:
        # The saved dtype when this item is better read whole, in one request
        # into the scratch buffer, records and all, than located first (one
        # more request) and then read in part (ranges.reads_whole, on the
        # chunk the metadata gives; `ckcore plan` applies the same rule).
        # _read_whole checks the archive itself and copes with any layout.
        found = self._saved_chunk(req)
        if found is None:
            return None
        sizes, dtype = found
        isz = DTYPE_ITEMSIZE.get(dtype)
        try:
            whole = isz is not None and _r.reads_whole(
                sizes, isz, tuple(int(x) for x in req.storage_offsets),
                tuple(int(x) for x in req.lengths), info.length,
                small_item_bytes=self.small_item_bytes, buffer_bytes=self.buffer_bytes,
                direct_min_bytes=self.direct_min_bytes, max_gap=self._gap_limit,
                max_overread=self._overread_limit,
            )
        except ValueError:
            # Metadata the rule refuses (a negative size): the located path
            # checks the item against its archive and names what is wrong.
            whole = False
        return dtype if whole else None

    def _saved_chunk(self, req: ReadItem) -> tuple[tuple[int, ...], str] | None:
        # (sizes, dtype name, "" if not a torch dtype) of the saved chunk the
        # metadata gives for req: torch's index hint first (O(1)), then the
        # first chunk with the item's offsets, as find_state_dict_object
        # scans; None when the metadata holds no such tensor chunk.
        idx = req.storage_index
        want = tuple(idx.offset or ())
        hint = idx.index
        cols = columns_of(self._md)
        if cols is not None:
            fid = cols._fqn_ids.get(idx.fqn)
            props = None if fid is None else cols.properties[fid]
            if fid is None or props is None:
                return None
            offs, sizes = cols.chunks(fid)
            w = np.asarray(want, dtype=np.int64)
            if offs.shape[1] != len(w):
                return None
            if hint is not None and 0 <= hint < len(offs) and np.array_equal(offs[hint], w):
                row = hint
            else:
                hits = np.flatnonzero((offs == w).all(axis=1))
                if not hits.size:
                    return None
                row = int(hits[0])
            return tuple(sizes[row].tolist()), str(props[0])
        md = self._md.state_dict_metadata.get(idx.fqn) if self._md else None
        if not isinstance(md, TensorStorageMetadata):
            return None
        order = md.chunks if hint is None or not 0 <= hint < len(md.chunks) else (
            [md.chunks[hint], *md.chunks]
        )
        for chunk in order:
            if tuple(chunk.offsets) == want:
                dtype = getattr(md.properties, "dtype", None)
                return tuple(chunk.sizes), _dtype_name(dtype) if isinstance(dtype, torch.dtype) else ""
        return None

    def _record_windows(self, fd: int, path: str, items: list[tuple[int, int]]) -> _Windows:
        # The archive records of a file's items, read up front in merged
        # windows (ranges.record_windows): about one request per item instead
        # of two, and the request count is what a network store charges for.
        merged = _r.record_windows(items)
        if self.prefetch_bytes and _HAS_FADVISE:
            for start, end in merged:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        windows = _Windows()
        for start, end in merged:
            b = os.pread(fd, end - start, start)
            self._count(1, len(b))
            # A short read (the file shrank since it was checked) is kept as
            # it is: the locate that needs the missing bytes reads them again
            # and reports the item truncated.
            windows.add(start, b)
        return windows

    def _locate(
        self, fd: int, offset: int, length: int, where: str, records: _Windows | None = None,
    ) -> tuple[TensorLocation, bytes | None, int] | None:
        small: bytes | None = None
        windows = records if records is not None else _Windows()

        def pread(n: int, off: int) -> bytes:
            b = windows.get(n, off)
            if b is None:
                b = os.pread(fd, n, off)
                self._count(1, len(b))
            return b

        if length <= self.small_item_bytes:
            # One read holds the whole item; its tensor bytes are served from it.
            small = pread(length, offset)
            if len(small) != length:
                raise CorruptItem(
                    f"{where}: file truncated: wanted {length} bytes at offset {offset}, "
                    f"got {len(small)}")
            whole = small

            def pread(n: int, off: int) -> bytes:
                return whole[off - offset : off - offset + n]

        try:
            return locate_tensor(pread, offset, length, where), small, offset
        except UnsupportedItem:
            return None

    def _check_chunk(self, req: ReadItem, loc: TensorLocation, where: str) -> None:
        # The archive's tensor must have the size the metadata gives its chunk.
        found = self._saved_chunk(req)
        if found is not None and tuple(found[0]) != loc.size:
            raise CorruptItem(
                f"{where}: archive holds a tensor of size {loc.size}, the metadata says {found[0]}"
            )

    def _resolve(self, job: _Job, planner: LoadPlanner) -> tuple[torch.Tensor, torch.Tensor]:
        # On the calling thread: the planner's resolve_tensor, the checks, and
        # the tensor the reads land in (the target itself, or a staging copy).
        req, loc = job.req, job.loc
        target = planner.resolve_tensor(req).detach()
        lengths = tuple(int(x) for x in req.lengths)
        if tuple(target.size()) != lengths:
            raise AssertionError(
                f"req {req.storage_index} mismatch sizes {target.size()} vs {torch.Size(lengths)}"
            )
        # A whole-read item is checked against its archive when it is read.
        dtype = job.dtype if loc is None else loc.dtype
        if loc is not None:
            _check_box(job.where, tuple(int(x) for x in req.storage_offsets), lengths, loc.size)
        direct = (
            target.device.type == "cpu"
            and target.layout == torch.strided
            and _dtype_name(target.dtype) == dtype
            and not target.is_conj()
            and not target.is_neg()
            and _distinct_elements(lengths, tuple(target.stride()))
        )
        # Anything else (dtype conversion, another device, aliasing strides):
        # read into a CPU tensor of the saved dtype, and let torch copy_ convert.
        # A whole-read item's saved dtype is only the metadata's claim until
        # its archive is read: its staging tensor has the target's dtype, so
        # _read_whole converts from the archive's dtype once, as torch does,
        # whatever the metadata says.
        dest = target if direct else torch.empty(
            lengths, dtype=getattr(torch, dtype) if loc is not None else target.dtype, device="cpu"
        )
        return target, dest

    def _pieces(self, fd: int, dest: torch.Tensor, job: _Job, split: int) -> list[Callable[[_Scratch], None]]:
        # The reads of one item as independent pieces, each filling its own
        # box of `dest` (disjoint elements, so pieces may run concurrently).
        # `split` > 1 cuts large boxes into about that many pieces.
        loc = job.loc
        lengths = tuple(int(x) for x in job.req.lengths)
        offsets = tuple(int(x) for x in job.req.storage_offsets)
        if dest.numel() == 0:
            return []
        if loc is None:
            def read_whole(scratch: _Scratch) -> None:
                with _as_corrupt(job.where):
                    self._read_whole(fd, dest, job, scratch)
            return [read_whole]
        isz = loc.itemsize
        dstrides = tuple(dest.stride())
        dview = _byte_view(dest.data_ptr(), _extent(lengths, dstrides, isz))
        where = job.where
        if job.small is not None:
            data, item_offset = job.small, job.item_offset

            def copy_small(scratch: _Scratch) -> None:
                # The whole item is in memory already: one box copy.
                with _as_corrupt(where):
                    _r.copy_box(
                        data, dview, lengths, itemsize=isz,
                        src_shape=loc.size, src_strides=loc.stride, src_offsets=offsets,
                        src_base=loc.base - item_offset,
                        dst_shape=lengths, dst_strides=dstrides,
                    )
            return [copy_small]
        with _as_corrupt(where):
            _, run = _r.paired_run_info(
                lengths, itemsize=isz, src_shape=loc.size, dst_shape=lengths,
                src_strides=loc.stride, dst_strides=dstrides, src_offsets=offsets,
            )
        direct = run >= self.direct_min_bytes
        # Runs contiguous in file and destination, and long: read in place,
        # in slabs of up to 256 MiB of file span; otherwise through the
        # bounded scratch buffer.
        limit = self._slab_limit(_r.DIRECT_SLAB_BYTES if direct else self.buffer_bytes, loc, offsets, lengths)
        if split > 1:
            span = _extent(lengths, loc.stride, isz)
            limit = max(min(limit, -(-span // split)), min(limit, _MIN_PIECE))
        fill = self._fill_direct if direct else self._fill_scratch
        pieces: list[Callable[[_Scratch], None]] = []
        for box in _slabs(offsets, lengths, loc.stride, isz, limit):

            def piece(scratch: _Scratch, box: tuple[tuple[int, ...], tuple[int, ...]] = box) -> None:
                with _as_corrupt(where):
                    fill(fd, dview, offsets, lengths, dstrides, loc, where, box, scratch)
            pieces.append(piece)
        return pieces

    def _read_whole(self, fd: int, dest: torch.Tensor, job: _Job, scratch: _Scratch) -> None:
        # One request for the whole item into the scratch buffer; then the
        # archive is located and checked from those bytes, exactly as a
        # located item is, and the box copied out of them. An archive in a
        # form the range path does not handle is loaded from the same bytes
        # with torch.load, as torch's reader loads it.
        req, where, offset, length = job.req, job.where, job.item_offset, job.length
        # Several read items of one storage item (boxes, or a shared read's
        # pieces) sort next to each other: a worker that still holds the
        # item reads it once for all of them. `where` names the file and the
        # item's bytes, so the tag cannot match another file's item.
        tag = (where, offset, length)
        if scratch.held == tag and scratch.buf is not None:
            arr = scratch.buf
        else:
            for start, n in job.ahead:
                os.posix_fadvise(fd, start, n, os.POSIX_FADV_WILLNEED)
            arr = scratch.get()
            self._read_runs(fd, np.array([[offset, 0, length]], dtype=np.int64),
                            np.array([[offset, offset + length]], dtype=np.int64), arr, where)
            scratch.held = tag
        buf = arr.data[:length]

        def pread(n: int, off: int) -> bytes:
            return bytes(buf[off - offset : off - offset + n])

        lengths = tuple(int(x) for x in req.lengths)
        offsets = tuple(int(x) for x in req.storage_offsets)
        try:
            loc = locate_tensor(pread, offset, length, where)
        except UnsupportedItem:
            saved = torch.load(io.BytesIO(bytes(buf)), map_location="cpu", weights_only=True)
            if not isinstance(saved, torch.Tensor) or saved.dim() != len(lengths):
                raise CorruptItem(f"{where}: the item does not hold a {len(lengths)}-d tensor") from None
            part = saved[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            if tuple(part.size()) != lengths:
                raise CorruptItem(
                    f"{where}: read box offsets={offsets} lengths={lengths} lies outside the saved "
                    f"tensor of size {tuple(saved.size())}") from None
            dest.copy_(part)
            return
        self._check_chunk(req, loc, where)
        _check_box(where, offsets, lengths, loc.size)
        out = dest if _dtype_name(dest.dtype) == loc.dtype else torch.empty(
            lengths, dtype=getattr(torch, loc.dtype), device="cpu")
        _r.copy_box(
            buf, _byte_view(out.data_ptr(), _extent(lengths, tuple(out.stride()), loc.itemsize)),
            lengths, itemsize=loc.itemsize,
            src_shape=loc.size, src_strides=loc.stride, src_offsets=offsets,
            src_base=loc.base - offset,
            dst_shape=lengths, dst_strides=tuple(out.stride()),
        )
        if out is not dest:
            dest.copy_(out)

    def _read_runs(self, fd: int, runs: np.ndarray, blocks: np.ndarray, dst: Any, where: str) -> None:
        try:
            calls, nbytes = _r.read_runs(fd, runs, blocks, dst, self.prefetch_bytes)
        except EOFError as e:
            raise CorruptItem(f"{where}: file truncated: {e}") from None
        except OSError as e:
            raise OSError(e.errno, f"{where}: {e.strerror}") from None
        self._count(calls, nbytes)

    def _coalesce(self, ranges: np.ndarray) -> np.ndarray:
        return _r.coalesce_ranges(ranges, self._gap_limit, self._overread_limit)

    @staticmethod
    def _slab_limit(limit: int, loc: TensorLocation, offsets: tuple[int, ...],
                    lengths: tuple[int, ...]) -> int:
        # Shrink the slab span so that a slab holds about _MAX_RUNS runs at most.
        return _r.slab_limit(limit, loc.size, loc.stride, loc.itemsize, offsets, lengths, _MAX_RUNS)

    def _fill_direct(
        self, fd: int, dview: memoryview, offsets: tuple[int, ...], lengths: tuple[int, ...],
        dstrides: tuple[int, ...], loc: TensorLocation, where: str,
        box: tuple[tuple[int, ...], tuple[int, ...]], scratch: _Scratch,
    ) -> None:
        # Fill `box` (saved-chunk coordinates, inside the request's
        # offsets/lengths) with one preadv per coalesced block, straight into
        # the destination.
        isz = loc.itemsize
        so, sl = box
        doff = tuple(a - b for a, b in zip(so, offsets))
        pairs = _r.paired_runs(
            sl, itemsize=isz, src_shape=loc.size, dst_shape=lengths,
            src_strides=loc.stride, dst_strides=dstrides, src_offsets=so,
            dst_offsets=doff, src_base=loc.base,
        )
        if len(pairs) > 1 and np.any(pairs[1:, 0] < pairs[:-1, 0] + pairs[:-1, 2]):
            # Source runs overlap (zero strides in the saved tensor): one
            # file byte feeds several places; the scratch path handles it.
            self._fill_scratch(fd, dview, offsets, lengths, dstrides, loc, where, box, scratch)
            return
        ranges = pairs[:, [0, 2]]
        ranges[:, 1] += ranges[:, 0]
        blocks = self._coalesce(ranges)
        # One preadv per block: runs land in the destination, gaps are discarded.
        self._read_runs(fd, pairs, blocks, dview, where)

    def _fill_scratch(
        self, fd: int, dview: memoryview, offsets: tuple[int, ...], lengths: tuple[int, ...],
        dstrides: tuple[int, ...], loc: TensorLocation, where: str,
        box: tuple[tuple[int, ...], tuple[int, ...]], scratch: _Scratch,
    ) -> None:
        # Fill `box` (saved-chunk coordinates) slab by slab through the
        # worker's bounded scratch buffer.
        isz = loc.itemsize
        buf = scratch.get()
        bo, bl = box
        limit = self._slab_limit(self.buffer_bytes, loc, bo, bl)
        for so, sl in _slabs(bo, bl, loc.stride, isz, limit):
            ranges = _r.byte_ranges(loc.size, loc.stride, isz, so, sl, base=loc.base)
            blocks = self._coalesce(ranges)
            span0 = int(ranges[0, 0])
            # each block lands at its own offset from the slab's first byte
            runs = np.empty((len(blocks), 3), dtype=np.int64)
            runs[:, 0] = blocks[:, 0]
            runs[:, 1] = blocks[:, 0] - span0
            runs[:, 2] = blocks[:, 1] - blocks[:, 0]
            self._read_runs(fd, runs, blocks, buf, where)
            # The slab's first element is its lowest address (strides >= 0), so
            # it sits at scratch byte 0.
            _r.copy_box(
                buf, dview, sl, itemsize=isz,
                src_shape=sl, src_strides=loc.stride,
                dst_shape=lengths, dst_strides=dstrides,
                dst_offsets=tuple(a - b for a, b in zip(so, offsets)),
            )


# ----------------------------------------------------------------- helpers

# A piece of a split item spans at least this many bytes of the file: fewer,
# larger pieces cost less bookkeeping than the reads they overlap save.
_MIN_PIECE = 1 << 20


class _Job:
    # One tensor item: where its first byte sits, how to read it. A located
    # item has its archive's `loc`; an item read whole has none yet (`loc`
    # None), the dtype the metadata gives and the item's length.
    __slots__ = ("first", "req", "loc", "small", "item_offset", "where", "dtype", "length", "ahead")

    def __init__(self, first: int, req: ReadItem, loc: TensorLocation | None, small: bytes | None,
                 item_offset: int, where: str, dtype: str = "", length: int = 0) -> None:
        self.first, self.req, self.loc = first, req, loc
        self.small, self.item_offset, self.where = small, item_offset, where
        self.dtype, self.length = dtype, length
        # (offset, length) of items to announce to the kernel before this read
        self.ahead: list[tuple[int, int]] = []


def _check_box(where: str, offsets: tuple[int, ...], lengths: tuple[int, ...],
               size: tuple[int, ...]) -> None:
    # The read box must lie inside the saved chunk.
    if len(offsets) != len(size) or any(o < 0 or o + n > c for o, n, c in zip(offsets, lengths, size)):
        raise CorruptItem(
            f"{where}: read box offsets={offsets} lengths={lengths} lies outside the saved "
            f"chunk of size {size}"
        )


class _Windows:
    # Byte windows of one file read up front, sorted by offset: get(n, off)
    # serves [off, off + n) when one window holds all of it, else None.
    __slots__ = ("starts", "data")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.data: list[bytes] = []

    def add(self, start: int, data: bytes) -> None:
        self.starts.append(start)
        self.data.append(data)

    def get(self, n: int, off: int) -> bytes | None:
        i = bisect.bisect_right(self.starts, off) - 1
        if i < 0:
            return None
        rel = off - self.starts[i]
        d = self.data[i]
        if n < 0 or rel + n > len(d):
            return None
        return d[rel : rel + n]


class _Scratch:
    # One worker's scratch buffer, allocated on first use: a load that never
    # needs one (every box read in place) allocates nothing. `held` names the
    # whole item the buffer still holds (see _read_whole); any other use of
    # the buffer forgets it.
    __slots__ = ("nbytes", "buf", "held")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.buf: np.ndarray | None = None
        self.held: tuple[str, int, int] | None = None

    def get(self) -> np.ndarray:
        self.held = None
        if self.buf is None:
            self.buf = np.empty(self.nbytes, dtype=np.uint8)
        return self.buf


class _as_corrupt:
    # A ValueError from the range kernels (a box the archive cannot hold)
    # names the file and item, as a CorruptItem; everything else passes.
    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> None:
        if typ is not None and issubclass(typ, ValueError) and not issubclass(typ, CheckpointError):
            raise CorruptItem(f"{self.where}: {exc}") from None


def _distinct_elements(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    # True when no two elements of the view share memory (every stride
    # positive where the size exceeds 1, and each dim's stride clears the
    # extent of the dims below it): only then may pieces of one item fill it
    # in place concurrently, and only then is "last write wins" moot.
    dims = sorted((st, n) for st, n in zip(strides, sizes) if n > 1)
    reach = 0  # elements spanned by the dims so far, minus one
    for st, n in dims:
        if st <= reach:
            return False
        reach += (n - 1) * st
    return True


def _mem_span(t: torch.Tensor) -> tuple[int, int]:
    # [first, last) bytes of memory a tensor's elements may touch (its
    # device's address space; empty for an empty tensor).
    if t.numel() == 0:
        return (0, 0)
    lo = hi = t.data_ptr()
    for n, st in zip(t.size(), t.stride()):
        if st > 0:
            hi += (n - 1) * st * t.element_size()
        else:
            lo += (n - 1) * st * t.element_size()
    return (lo, hi + t.element_size())


class _Concurrent:
    """One ``read_data`` with worker threads; everything here runs on the caller.

    Files are prepared (opened, checked, archive records located) up to
    ``thread_count`` files ahead; each located item is resolved on the
    caller, cut into pieces that fill disjoint boxes of its destination, and
    the pieces go to the pool. Items finish in the order they were resolved:
    their pieces' results (the first error raises here), the staging copy,
    ``commit_tensor``. An item whose target memory overlaps an unfinished
    item's waits for it, so overlapping writes happen in the sequential
    order. At most ``window`` items (and ``window * buffer_bytes`` of staging
    tensors) are in flight.
    """

    def __init__(self, reader: RangeFileSystemReader, planner: LoadPlanner) -> None:
        self.r = reader
        self.planner = planner
        self.threads = reader.thread_count
        self.window = 4 * self.threads
        self.staging_cap = self.window * reader.buffer_bytes
        self.local = threading.local()
        self.stop = threading.Event()
        # item entries: [futures, job, target, dest, span, file key, staged bytes]
        self.inflight: deque[tuple[list[_CFuture], _Job, torch.Tensor, torch.Tensor,
                                   tuple[int, int], int, int]] = deque()
        self.staged = 0
        self.pending: dict[int, int] = {}  # file key -> unfinished items
        self.fds: dict[int, int] = {}  # file key -> open fd

    def _scratch(self) -> _Scratch:
        s = getattr(self.local, "scratch", None)
        if s is None:
            s = self.local.scratch = _Scratch(self.r.buffer_bytes)
        return s

    def _run_piece(self, piece: Callable[[_Scratch], None]) -> None:
        if self.stop.is_set():
            return  # the load is failing: skip the remaining reads
        piece(self._scratch())

    def _prepare(self, path: str, reqs: list[ReadItem]) -> tuple[int, list[_Job], list, list]:
        if self.stop.is_set():
            raise _Stopped
        fd = self.r._open(path)
        try:
            return (fd, *self.r._prepare(fd, path, reqs))
        except BaseException:
            os.close(fd)
            raise

    def run(self, per_file: dict[str, list[ReadItem]]) -> list[ReadItem]:
        r = self.r
        files = [(str(r.fs.concat_path(r.path, rp)), reqs) for rp, reqs in per_file.items()]
        fallback: list[ReadItem] = []
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ckcore-read")
        prepared: deque[_CFuture] = deque()
        try:
            nxt = 0
            for key in range(len(files)):
                while nxt < len(files) and nxt < key + self.threads:
                    prepared.append(pool.submit(self._prepare, *files[nxt]))
                    nxt += 1
                fd, jobs, byte_items, fb = prepared.popleft().result()
                self.fds[key] = fd
                self.pending[key] = len(jobs)
                fallback += fb
                for req, data in byte_items:
                    self.planner.load_bytes(req, io.BytesIO(data))
                for job in jobs:
                    self._submit(pool, fd, key, job)
                self._maybe_close(key)
            while self.inflight:
                self._finish()
        except BaseException:
            self.stop.set()
            raise
        finally:
            # No thread outlives read_data: queued pieces are cancelled, running
            # ones finish their current read, then every fd is closed.
            pool.shutdown(wait=True, cancel_futures=True)
            for f in prepared:
                if f.done() and not f.cancelled() and f.exception() is None:
                    os.close(f.result()[0])
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
        return fallback

    def _submit(self, pool: ThreadPoolExecutor, fd: int, key: int, job: _Job) -> None:
        target, dest = self.r._resolve(job, self.planner)
        span = _mem_span(target)
        staged = 0 if dest is target else dest.numel() * dest.element_size()
        while self.inflight and (
            len(self.inflight) >= self.window
            or (staged and self.staged + staged > self.staging_cap)
            or any(_overlaps(span, e[4]) for e in self.inflight)
        ):
            self._finish()
        pieces = self.r._pieces(fd, dest, job, 2 * self.threads)
        futures = [pool.submit(self._run_piece, p) for p in pieces]
        self.inflight.append((futures, job, target, dest, span, key, staged))
        self.staged += staged

    def _finish(self) -> None:
        futures, job, target, dest, _, key, staged = self.inflight.popleft()
        for f in futures:
            f.result()
        self.staged -= staged
        if dest is not target:
            target.copy_(dest)
        self.planner.commit_tensor(job.req, target)
        self.pending[key] -= 1
        self._maybe_close(key)

    def _maybe_close(self, key: int) -> None:
        if self.pending.get(key) == 0 and key in self.fds:
            os.close(self.fds.pop(key))


class _Stopped(Exception):
    # A file prepared after the load failed; never reaches the caller.
    pass


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[0] < a[1] and b[0] < b[1]
