"""Shared replicated reads: each needed saved byte is read once and exchanged over the process group.

Under DDP or HSDP every replica of a shard needs the same saved bytes, and
torch's reader (and :class:`~ckcore.dcp.RangeFileSystemReader`) makes each
replica read them from storage: N replicas, N times the storage traffic.
:class:`SharedRangeFileSystemReader` reads each needed byte once, on one of
the ranks that need it, and sends it to the others.

How the ranks agree on who reads what, without any rank holding another's
read items (the load plan's items stay on their rank; only a ticket goes
through DCP's coordinator, see :mod:`ckcore.dcp._compact`):

1. every rank has the checkpoint's metadata and numbers its saved chunks the
   same way; it describes what it needs as int64 rows, one per read item
   (saved chunk, box within the chunk), and the rows are all-gathered
   (two ``all_gather`` calls on int64 tensors: counts and host keys, then
   the rows; with every rank on one host the second is skipped);
2. every rank runs :func:`ckcore.share.plan_shared_reads` on the same rows
   and gets the same plan: disjoint pieces covering every byte that ranks on
   two or more hosts need, each with one reader, packed into exchange
   rounds; the reader's host-mates that need a piece read it too (their
   page cache serves it), ranks on other hosts receive it;
3. per round, each rank reads its pieces with the range reader's machinery
   (located in the ``torch.save`` archive, coalesced, read with ``preadv``)
   into a buffer, the ranks exchange them with one ``all_to_all_single`` on a
   byte tensor, and each copies the pieces it needs into its destination
   tensors (``copy_``: dtype and device conversions as torch does);
4. read items no other rank shares are read as the range reader reads them.

Payloads travel as tensors through ``torch.distributed`` collectives (no
object collectives), on the CPU for gloo and on the current CUDA device for
NCCL, so the same code runs on both.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import time
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ckcore.share import (
    DEFAULT_EXCHANGE_BYTES,
    DEFAULT_MAX_CELLS,
    DEFAULT_MIN_PIECE_BYTES,
    SharePlan,
    plan_shared_reads,
)

from .reader import RangeFileSystemReader

__all__ = ["SharedRangeFileSystemReader", "SharedReadError"]

# Pieces sit at multiples of this in the exchange buffers, so a byte slice
# can be viewed as any dtype (a dtype view needs an aligned offset).
_ALIGN = 16


class SharedReadError(RuntimeError):
    """A shared read failed on another rank, or a peer died or hung past the timeout.

    Raised on every rank of the process group that did not itself fail; the
    rank that failed raises its own error. Destination tensors of the load
    may be partly written: the load did not complete.
    """


class _BufferPlanner:
    # The "planner" the range reader fills piece buffers through: each
    # synthetic read item resolves to its slice of the read buffer.
    def __init__(self) -> None:
        self.views: dict[int, torch.Tensor] = {}

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.views[id(req)]

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, req: ReadItem, value: Any) -> None:  # pragma: no cover - never planned
        raise AssertionError("shared reads plan tensor pieces only")


class _Chunks:
    """Every saved tensor chunk of a checkpoint, numbered in metadata order (the same on every rank)."""

    def __init__(self, md: Metadata) -> None:
        self.index: dict[tuple[str, tuple[int, ...]], int] = {}
        self.keys: list[MetadataIndex] = []
        self.ndim: list[int] = []
        self.dtype: list[torch.dtype] = []
        itemsizes: list[int] = []
        for fqn, item in md.state_dict_metadata.items():
            if not isinstance(item, TensorStorageMetadata):
                continue
            dtype = item.properties.dtype
            for i, c in enumerate(item.chunks):
                offsets = tuple(int(v) for v in c.offsets)
                self.index.setdefault((fqn, offsets), len(self.keys))
                self.keys.append(MetadataIndex(fqn, offsets, i))
                self.ndim.append(len(offsets))
                self.dtype.append(dtype)
                itemsizes.append(dtype.itemsize)
        self.itemsizes = np.array(itemsizes, dtype=np.int64)
        self.width = max(self.ndim, default=0)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SharedRangeFileSystemReader(RangeFileSystemReader):
    """A :class:`~ckcore.dcp.RangeFileSystemReader` whose ranks read replicated saved bytes once and exchange them.

    Use it on every rank of a load, in place of the range reader::

        dcp.load(state_dict, storage_reader=SharedRangeFileSystemReader(path),
                 planner=FastLoadPlanner())

    Bytes that ranks of ``process_group`` (default: the default group; give
    the group ``dcp.load`` uses) on two or more hosts need are split into
    disjoint pieces, each read by one of those ranks and sent to the others;
    replicas that need overlapping but different boxes of a saved chunk
    share the overlap. Everything else is read as ``RangeFileSystemReader``
    reads it, and the result is element for element what torch loads.
    Without an initialized process group, with one rank, or with every rank
    on one host, it is the range reader.

    Hosts: ranks with the same ``host`` (default ``socket.gethostname()``)
    read through one page cache, so they do not exchange with each other:
    each reads from storage the bytes it needs of the pieces its host reads
    (the first read fetches them from the device, the cache serves the
    rest), and only ranks on other hosts receive them. Each needed byte is
    then fetched from storage on one host only (by each of that host's
    ranks that need it, all but the first served by its cache), and the
    network carries only what crosses hosts. Set
    ``exchange_within_host=True`` for storage that the host does not cache
    (``O_DIRECT``, a FUSE mount without a page cache): every rank is then
    its own host, and ranks on one machine exchange over the process group
    too. Give ``host`` when the host name does not
    tell page caches apart (containers sharing a hostname on different
    machines).

    Every rank of the group must call ``read_data`` (``dcp.load`` does):
    the ranks all-gather a description of their reads (one int64 row of
    ``2 + 2 * D`` values per read item, ``D`` the largest tensor rank in the
    checkpoint) and exchange in rounds.

    Memory: in one round no rank reads, sends or receives more than
    ``exchange_bytes`` (default 64 MiB) of pieces. The next round's reads
    overlap the current exchange, so a rank holds at most four such buffers
    at once (two read buffers, send and receive); send and receive are on
    the CPU for gloo and on the current CUDA device for NCCL, read buffers
    on the CPU. A single element larger than ``exchange_bytes`` is a piece
    of its own.

    Failures: each collective waits at most ``timeout`` (seconds or a
    ``timedelta``; default 300 s) for the others; past it, or when a peer
    dies (gloo reports the closed connection at once), every waiting rank
    raises :class:`SharedReadError`. A rank whose own read fails tells the
    others at the next round's status exchange and raises its error; they
    raise :class:`SharedReadError` naming it. Either way the load raises on
    every rank and no destination is left partly written by a load that
    reports success. The process group's own timeout (``init_process_group``)
    bounds the collectives too.

    ``max_cells`` bounds how many grid cells the boxes of one saved chunk may
    cut it into before the chunk is not shared (each rank reads its own);
    ``min_piece_bytes`` (default 1 MiB) is the smallest part a region
    several ranks need is split into for several readers (each reader of a
    chunk also reads a few KiB of its archive records). See
    :func:`ckcore.share.plan_shared_reads`.
    Other keyword arguments go to ``RangeFileSystemReader``. ``stats`` adds
    ``shared_items`` (read items filled from shared pieces),
    ``pieces_read``, ``bytes_sent``, ``bytes_received`` and
    ``exchange_rounds`` to the range reader's counts (``seconds`` holds the
    time spent reading pieces and waiting for exchanges); ``bytes_read`` counts
    the storage bytes this rank read, its pieces included.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        _extension_registry: Any = None,
        *,
        process_group: Any = None,
        timeout: float | datetime.timedelta = 300.0,
        exchange_bytes: int = DEFAULT_EXCHANGE_BYTES,
        max_cells: int = DEFAULT_MAX_CELLS,
        min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
        host: str | None = None,
        exchange_within_host: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, _extension_registry, **kwargs)
        if not isinstance(timeout, datetime.timedelta):
            timeout = datetime.timedelta(seconds=float(timeout))
        if timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if exchange_bytes < 4096 or max_cells < 1 or min_piece_bytes < 1:
            raise ValueError("exchange_bytes must be >= 4096, max_cells and min_piece_bytes >= 1")
        if host is None:
            host = socket.gethostname()
        if not isinstance(host, str):
            raise TypeError(f"host must be a str or None, got {type(host).__name__}")
        if not isinstance(exchange_within_host, bool):
            raise TypeError(f"exchange_within_host must be a bool, got {type(exchange_within_host).__name__}")
        self.host = host
        self.exchange_within_host = exchange_within_host
        self.process_group = process_group
        self.timeout = timeout
        self.exchange_bytes = int(exchange_bytes)
        self.max_cells = int(max_cells)
        self.min_piece_bytes = int(min_piece_bytes)
        self._rank = 0
        self._world = 1
        self._device = torch.device("cpu")
        self.stats.update(shared_items=0, pieces_read=0, bytes_sent=0, bytes_received=0,
                          exchange_rounds=0)
        self.seconds = {"read": 0.0, "exchange_wait": 0.0}
        self._chunks: tuple[int, _Chunks] | None = None

    # ------------------------------------------------------------ collectives

    def _wait(self, work: Any, what: str) -> None:
        try:
            done = work.wait(timeout=self.timeout)
        except Exception as e:
            raise SharedReadError(
                f"shared read: {what} failed on rank {self._rank}: a peer died, hung or failed "
                f"(collective timeout {self.timeout.total_seconds():g} s): {e}") from e
        if done is False:
            raise SharedReadError(
                f"shared read: {what} did not finish on rank {self._rank} within "
                f"{self.timeout.total_seconds():g} s: a peer died or hung")

    def _all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self._world)]
        self._wait(dist.all_gather(out, t, group=self.process_group, async_op=True), what)
        return out

    def _status(self, err: BaseException | None, what: str) -> None:
        # Every rank reports whether it failed since the last status point;
        # all raise together, so no rank waits on a peer that left.
        flags = self._all_gather(
            torch.tensor([0 if err is None else 1], dtype=torch.int64, device=self._device), what)
        failed = [r for r, f in enumerate(flags) if int(f.item())]
        if not failed:
            return
        if err is not None:
            raise err
        raise SharedReadError(
            f"shared read: rank(s) {failed} of the process group failed during {what} (see their "
            f"errors); rank {self._rank} stops its load with destination tensors incomplete")

    def _host_key(self) -> int:
        # The int64 every rank of this page cache sends; a rank that
        # exchanges within its host makes its key its own.
        name = self.host if not self.exchange_within_host else f"{self.host}\0rank {self._rank}"
        return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                              "little", signed=True)

    # ------------------------------------------------------------ read_data

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read ``plan``'s items, sharing the bytes ranks on several hosts need (every rank must call it).

        Raises :class:`SharedReadError` when a peer fails, dies or does not
        answer within ``timeout``; a rank's own read errors are raised as
        the range reader raises them, on that rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(self.process_group) == 1 or self._md is None:
            return super().read_data(plan, planner)
        self._rank = dist.get_rank(self.process_group)
        self._world = dist.get_world_size(self.process_group)
        backend = str(dist.get_backend(self.process_group)).lower()
        self._device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
                        else torch.device("cpu"))
        if self._chunks is None or self._chunks[0] != id(self._md):
            self._chunks = (id(self._md), _Chunks(self._md))
        chunks = self._chunks[1]

        # 1. this rank's rows: [rank, chunk, offsets (padded 0), lengths (padded 1)]
        width = chunks.width
        rows: list[list[int]] = []
        mine: list[tuple[ReadItem, int]] = []
        local: list[ReadItem] = []
        err: BaseException | None = None
        try:
            for item in plan.items:
                gid = None
                if item.type == LoadItemType.TENSOR:
                    idx = item.storage_index
                    gid = chunks.index.get((idx.fqn, tuple(int(v) for v in idx.offset or ())))
                lengths = [int(v) for v in item.lengths] if gid is not None else []
                if gid is None or len(lengths) != chunks.ndim[gid] or 0 in lengths:
                    local.append(item)
                    continue
                pad = width - len(lengths)
                rows.append([self._rank, gid, *(int(v) for v in item.storage_offsets), *[0] * pad,
                             *lengths, *[1] * pad])
                mine.append((item, gid))
        except Exception as e:  # noqa: BLE001 - reported to the peers, then raised
            err = e
            rows = []
        cols = 2 + 2 * width
        head = torch.tensor([len(rows), 0 if err is None else 1, self._host_key()],
                            dtype=torch.int64, device=self._device)
        heads = [h.cpu() for h in self._all_gather(head, "the read descriptions")]
        failed = [r for r, h in enumerate(heads) if int(h[1].item())]
        if failed:
            if err is not None:
                raise err
            raise SharedReadError(f"shared read: rank(s) {failed} failed describing their reads")
        counts = [int(h[0].item()) for h in heads]
        hosts = np.unique(np.array([int(h[2].item()) for h in heads], dtype=np.int64),
                          return_inverse=True)[1].reshape(-1)
        if max(counts) == 0 or hosts.max() == 0:
            # Nothing to read, or every rank on one host: each reads its own
            # and the page cache serves the repeats.
            return super().read_data(plan, planner)
        block = torch.zeros((max(counts), cols), dtype=torch.int64)
        if rows:
            block[: len(rows)] = torch.tensor(rows, dtype=torch.int64)
        gathered = self._all_gather(block.to(self._device), "the read descriptions")
        needs = np.concatenate([g[:n].cpu().numpy() for g, n in zip(gathered, counts)])
        sp = plan_shared_reads(needs, chunks.itemsizes, self._world,
                               exchange_bytes=self.exchange_bytes, max_cells=self.max_cells,
                               min_piece_bytes=self.min_piece_bytes, hosts=hosts)

        # 2. shared items are filled from pieces; the rest are read as usual.
        shared = set(sp.shared_chunks.tolist())
        local += [item for item, gid in mine if gid not in shared]
        mine = [(item, gid) for item, gid in mine if gid in shared]
        if sp.n_rounds:
            self._exchange(sp, chunks, mine, planner)
        if local:
            super().read_data(LoadPlan(local), planner).wait()
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _exchange(self, sp: SharePlan, chunks: _Chunks, mine: list[tuple[ReadItem, int]],
                  planner: LoadPlanner) -> None:
        me = self._rank
        err: BaseException | None = None
        # This rank's destinations, by saved chunk, and the elements each still lacks.
        targets: dict[int, list[tuple[ReadItem, torch.Tensor, tuple[int, ...], tuple[int, ...]]]] = {}
        missing: dict[int, int] = {}
        try:
            for item, gid in mine:
                t = planner.resolve_tensor(item).detach()
                off = tuple(int(v) for v in item.storage_offsets)
                ln = tuple(int(v) for v in item.lengths)
                if tuple(t.shape) != ln:
                    raise AssertionError(f"req {item.storage_index} mismatch sizes {t.shape} vs {ln}")
                targets.setdefault(gid, []).append((item, t, off, ln))
                missing[id(item)] = t.numel()
        except Exception as e:  # noqa: BLE001 - reported at the first status point
            err = e
        needers = [set(sp.piece_needers(i).tolist()) for i in range(len(sp.chunk))]
        # Pieces this rank reads from storage itself: it is their reader or
        # a needer on the reader's host (whose page cache serves it).
        local = [me in needers[i] and sp.hosts[sp.reader[i]] == sp.hosts[me]
                 for i in range(len(sp.chunk))]
        rounds = [np.flatnonzero(sp.round == rnd).tolist() for rnd in range(sp.n_rounds)]

        def read(rnd: int) -> tuple[torch.Tensor, dict[int, int]]:
            t0 = time.perf_counter()
            out = self._read_pieces(sp, chunks, [i for i in rounds[rnd] if local[i]])
            self.seconds["read"] += time.perf_counter() - t0
            return out

        empty: tuple[torch.Tensor, dict[int, int]] = (torch.empty(0, dtype=torch.uint8), {})
        ready = empty
        try:
            if err is None:
                ready = read(0)
        except Exception as e:  # noqa: BLE001 - reported to the peers, then raised
            err = e
        for rnd, in_round in enumerate(rounds):
            # Every rank's reads of this round, and its copies of the last, went well.
            self._status(err, f"round {rnd + 1}/{sp.n_rounds} of the shared reads")
            self.stats["exchange_rounds"] += 1
            readbuf, where = ready
            work, recvbuf, recv_at, nsent = self._start_exchange(sp, in_round, readbuf, where)
            # The next round's reads overlap this round's exchange (gloo and
            # NCCL run it off this thread; preadv releases the GIL).
            ready = empty
            if rnd + 1 < len(rounds):
                try:
                    ready = read(rnd + 1)
                except Exception as e:  # noqa: BLE001 - reported at the next status point
                    err = e
            if work is not None:
                t0 = time.perf_counter()
                self._wait(work, f"the exchange of round {rnd + 1}/{sp.n_rounds}")
                self.seconds["exchange_wait"] += time.perf_counter() - t0
                self.stats["bytes_sent"] += nsent
                self.stats["bytes_received"] += sum(int(sp.nbytes[i]) for i in recv_at)
            if err is not None:
                continue
            try:
                for i in in_round:
                    if me not in needers[i]:
                        continue
                    buf, at = (readbuf, where[i]) if local[i] else (recvbuf, recv_at[i])
                    self._deliver(sp, chunks, i, buf, at, targets, missing)
            except Exception as e:  # noqa: BLE001 - reported at the next status point
                err = e
        if err is not None:
            raise err
        for gid_targets in targets.values():
            for item, t, _, _ in gid_targets:
                if missing[id(item)]:
                    # The plan covers every needed element exactly once; this
                    # guards a destination from being left partly written.
                    raise SharedReadError(
                        f"shared read: {missing[id(item)]} elements of {item.storage_index} were "
                        "not delivered (internal error)")
                planner.commit_tensor(item, t)
                self.stats["shared_items"] += 1

    def _start_exchange(
        self, sp: SharePlan, in_round: list[int], readbuf: torch.Tensor, where: dict[int, int],
    ) -> tuple[Any, torch.Tensor, dict[int, int], int]:
        # Launch one round's all_to_all_single: (work or None, receive buffer,
        # piece -> offset in it, bytes sent). A piece goes from its reader to
        # its needers on other hosts. Layout: by peer rank, pieces in plan
        # order, each at an aligned offset; both ends compute it.
        me, dev, world = self._rank, self._device, self._world
        receivers = {i: set(sp.piece_receivers(i).tolist()) for i in in_round}
        send_sizes = [0] * world
        recv_sizes = [0] * world
        send_parts: list[tuple[int, int]] = []  # (piece, offset in readbuf), in send order
        reads = [i for i in in_round if sp.reader[i] == me]
        for peer in range(world):
            for i in reads:
                if peer in receivers[i]:
                    send_parts.append((i, where[i]))
                    send_sizes[peer] += _aligned(int(sp.nbytes[i]))
        recv_at: dict[int, int] = {}
        pos = 0
        for src in range(world):
            for i in in_round:
                if sp.reader[i] == src and me in receivers[i]:
                    recv_at[i] = pos
                    n = _aligned(int(sp.nbytes[i]))
                    recv_sizes[src] += n
                    pos += n
        recvbuf = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=dev)
        if not any(receivers[i] for i in in_round):
            return None, recvbuf, recv_at, 0
        sendbuf = torch.empty(sum(send_sizes), dtype=torch.uint8, device=dev)
        at = 0
        for i, src_at in send_parts:
            n = int(sp.nbytes[i])
            sendbuf[at : at + n].copy_(readbuf[src_at : src_at + n])
            at += _aligned(n)
        work = dist.all_to_all_single(recvbuf, sendbuf, recv_sizes, send_sizes,
                                      group=self.process_group, async_op=True)
        return work, recvbuf, recv_at, sum(int(sp.nbytes[i]) for i, _ in send_parts)

    def _read_pieces(self, sp: SharePlan, chunks: _Chunks,
                     reads: list[int]) -> tuple[torch.Tensor, dict[int, int]]:
        # This rank's pieces of a round, read from storage into one byte buffer.
        where: dict[int, int] = {}
        total = 0
        for i in reads:
            where[i] = total
            total += _aligned(int(sp.nbytes[i]))
        buf = torch.empty(total, dtype=torch.uint8)
        bp = _BufferPlanner()
        reqs = []
        for i in reads:
            gid = int(sp.chunk[i])
            nd = chunks.ndim[gid]
            key = chunks.keys[gid]
            off = torch.Size(int(v) for v in sp.offsets[i, :nd])
            ln = torch.Size(int(v) for v in sp.lengths[i, :nd])
            req = ReadItem(type=LoadItemType.TENSOR, dest_index=key,
                           dest_offsets=torch.Size([0] * nd), storage_index=key,
                           storage_offsets=off, lengths=ln)
            n = int(sp.nbytes[i])
            bp.views[id(req)] = buf[where[i] : where[i] + n].view(chunks.dtype[gid]).view(ln)
            reqs.append(req)
        if reqs:
            super().read_data(LoadPlan(reqs), cast(LoadPlanner, bp)).wait()
            self.stats["pieces_read"] += len(reqs)
        return buf, where

    @staticmethod
    def _deliver(sp: SharePlan, chunks: _Chunks, i: int, buf: torch.Tensor, at: int,
                 targets: dict, missing: dict[int, int]) -> None:
        # Copy piece i into every destination of this rank that holds it. A
        # piece never straddles a box edge: it is inside a box or outside it.
        gid = int(sp.chunk[i])
        nd = chunks.ndim[gid]
        p_off = [int(v) for v in sp.offsets[i, :nd]]
        p_len = [int(v) for v in sp.lengths[i, :nd]]
        src = buf[at : at + int(sp.nbytes[i])].view(chunks.dtype[gid]).view(p_len)
        vol = src.numel()
        for item, t, off, ln in targets.get(gid, ()):
            if all(o <= po and po + pl <= o + n for po, pl, o, n in zip(p_off, p_len, off, ln)):
                idx = tuple(slice(po - o, po - o + pl) for po, pl, o in zip(p_off, p_len, off))
                t[idx].copy_(src)
                missing[id(item)] -= vol
