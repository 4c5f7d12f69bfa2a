"""Who reads which saved bytes when ranks share their reads (torch-free).

Under DDP or HSDP several ranks need the same saved chunk, or overlapping
boxes of it. Instead of each reading its box from storage, the ranks agree
on a split: every needed byte of a saved chunk is read on exactly one host
(by the *reader* of the piece holding it, and by its host-mates that need
it, through their shared page cache) and sent to the ranks on other hosts
that need it; with every rank its own host (the default), by exactly one
rank. :func:`plan_shared_reads` computes that split from a compact
description of what every rank needs (one int64 row per rank and saved
chunk box); it is a pure function of its inputs, so every rank computes the
same plan from the same all-gathered rows without any rank holding the
others' read items (``ckcore.dcp.shared`` does the gathering and the
exchange).

How a saved chunk is split:

1. the boxes every rank needs from the chunk cut each dim at their
   boundaries; the grid cells covered by at least one box are disjoint and
   each lies wholly inside or wholly outside every box, so a cell has a
   well-defined set of *needers*;
2. a cell needed by ranks on ``k`` hosts is cut along its outermost dim (the one
   with the largest stride in a row-major chunk, so each part is few, long
   byte runs) into ``k`` parts (fewer when parts would be smaller than
   ``min_piece_bytes``: every reader of a chunk also reads a few KiB of its
   archive records), and into more when a part would make a rank send more
   than ``exchange_bytes`` in one round;
3. parts go, in a fixed order, to a needer on the host with the fewest
   bytes assigned so far, the one of its ranks with the fewest (lowest rank
   on ties): the storage traffic spreads over the hosts and their ranks;
4. parts are packed, in the same order, into exchange *rounds* in which no
   rank reads, sends or receives more than ``exchange_bytes`` (a part that
   alone exceeds it, a single element larger than the budget, gets a round
   of its own): the memory bound of the exchange.

A chunk whose boxes cut it into more than ``max_cells`` cells (a crafted or
pathological layout) is not shared: each rank reads its own boxes.

Hosts: ranks on one host read through one page cache, so exchanging bytes
between them only costs copies the cache already saves (the first read
fetches the bytes from the device, the others copy them from memory). Given
each rank's host, the split treats a host as one needer: ``k`` above counts
the hosts that need a cell; a part's reader sends it to the needers on
other hosts, and its host-mates that need it read it themselves. A chunk
that ranks of one host only need is not shared at all.

Example: two replicas need all of a 4x2 float32 chunk; each reads two rows
and sends them to the other::

    >>> import numpy as np
    >>> needs = np.array([[0, 0, 0, 0, 4, 2], [1, 0, 0, 0, 4, 2]])
    >>> p = plan_shared_reads(needs, itemsizes=[4], world=2, min_piece_bytes=1)
    >>> p.offsets.tolist(), p.lengths.tolist(), p.reader.tolist()
    ([[0, 0], [2, 0]], [[2, 2], [2, 2]], [0, 1])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["SharePlan", "plan_shared_reads"]

DEFAULT_EXCHANGE_BYTES = 64 << 20
DEFAULT_MAX_CELLS = 4096
DEFAULT_MIN_PIECE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class SharePlan:
    """The shared reads of every rank: pieces of saved chunks, their reader, needers and round.

    Piece ``i`` is the box ``offsets[i]``/``lengths[i]`` (elements, relative
    to the origin of saved chunk ``chunk[i]``) of ``nbytes[i]`` bytes, needed
    by the ranks ``needers[needers_ptr[i]:needers_ptr[i + 1]]`` (ascending).
    In exchange round ``round[i]``, rank ``reader[i]`` (one of them) reads it
    from storage and sends it to the needers on other hosts; the needers on
    its own host (``hosts[r] == hosts[reader[i]]``) read it from storage too,
    through the page cache that host's ranks share (:meth:`piece_readers`,
    :meth:`piece_receivers`). With every rank its own host (the default) the
    reader alone reads and sends to every other needer. ``shared_chunks``
    lists (ascending) the saved chunks the pieces cover completely: every
    needed byte of them is in exactly one piece. Rows of the input on other
    chunks are read by their own rank as usual. ``n_rounds`` is the number
    of exchange rounds every rank takes part in.
    """

    world: int
    hosts: np.ndarray
    shared_chunks: np.ndarray
    chunk: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    nbytes: np.ndarray
    reader: np.ndarray
    needers_ptr: np.ndarray
    needers: np.ndarray
    round: np.ndarray
    n_rounds: int

    def piece_needers(self, i: int) -> np.ndarray:
        """The ranks that need piece ``i`` (ascending, its reader included)."""
        return self.needers[self.needers_ptr[i] : self.needers_ptr[i + 1]]

    def piece_readers(self, i: int) -> np.ndarray:
        """The ranks that read piece ``i`` from storage: its needers on its reader's host (ascending)."""
        who = self.piece_needers(i)
        return who[self.hosts[who] == self.hosts[self.reader[i]]]

    def piece_receivers(self, i: int) -> np.ndarray:
        """The ranks piece ``i``'s reader sends it to: its needers on other hosts (ascending)."""
        who = self.piece_needers(i)
        return who[self.hosts[who] != self.hosts[self.reader[i]]]

    def bytes_read(self) -> np.ndarray:
        """Bytes of pieces each rank reads from storage (int64, one per rank)."""
        out = np.zeros(self.world, dtype=np.int64)
        for i in range(len(self.chunk)):
            out[self.piece_readers(i)] += self.nbytes[i]
        return out

    def bytes_sent(self) -> np.ndarray:
        """Bytes each rank sends to others over the exchange (int64, one per rank)."""
        out = np.zeros(self.world, dtype=np.int64)
        for i in range(len(self.chunk)):
            out[self.reader[i]] += self.nbytes[i] * len(self.piece_receivers(i))
        return out


def split_box(
    offsets: tuple[int, ...], lengths: tuple[int, ...], min_parts: int, max_bytes: int,
    itemsize: int,
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Cut a box into at least ``min_parts`` parts (as far as it has elements) of at most ``max_bytes`` each.

    Cuts go along the outermost dim with more than one index; when one
    index of it alone exceeds ``max_bytes`` each index is cut further along
    the next dims. Parts are returned in row-major order and tile the box
    exactly. A single element larger than ``max_bytes`` is one part.

    >>> split_box((0, 0), (5, 3), 2, 1 << 20, 4)
    [((0, 0), (3, 3)), ((3, 0), (2, 3))]
    """
    dims = [d for d, n in enumerate(lengths) if n > 1]
    if not dims:
        return [(offsets, lengths)]
    d = dims[0]
    n = lengths[d]
    row = itemsize * math.prod(lengths[d + 1 :])
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    if row > max_bytes:
        sub = -(-min_parts // n)
        for i in range(n):
            o = offsets[:d] + (offsets[d] + i,) + offsets[d + 1 :]
            ln = lengths[:d] + (1,) + lengths[d + 1 :]
            out += split_box(o, ln, sub, max_bytes, itemsize)
        return out
    per = max(1, min(max_bytes // row, -(-n // max(1, min_parts))))
    for i in range(0, n, per):
        o = offsets[:d] + (offsets[d] + i,) + offsets[d + 1 :]
        ln = lengths[:d] + (min(per, n - i),) + lengths[d + 1 :]
        out.append((o, ln))
    return out


def _cells(offs: np.ndarray, lens: np.ndarray, max_cells: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The grid cells the boxes cut (lo, hi per cell, row-major), or None past ``max_cells``."""
    ndim = offs.shape[1]
    cuts = [np.unique(np.concatenate([offs[:, d], offs[:, d] + lens[:, d]])) for d in range(ndim)]
    count = math.prod(len(c) - 1 for c in cuts)
    if count > max_cells:
        return None
    lo = np.empty((count, ndim), dtype=np.int64)
    hi = np.empty((count, ndim), dtype=np.int64)
    for i, idx in enumerate(itertools.product(*(range(len(c) - 1) for c in cuts))):
        for d, j in enumerate(idx):
            lo[i, d] = cuts[d][j]
            hi[i, d] = cuts[d][j + 1]
    return lo, hi


def _host_ids(hosts: np.ndarray | Sequence[int] | None, world: int) -> np.ndarray:
    """Each rank's host as 0, 1, ... in order of the values given (any ints, numpy or Python)."""
    if hosts is None:
        return np.arange(world, dtype=np.int64)
    if isinstance(hosts, np.ndarray):
        if hosts.shape != (world,) or hosts.dtype.kind not in "iub":
            raise ValueError(f"hosts must be {world} ints, one per rank, got {hosts!r}")
        values = hosts.tolist()
    else:
        try:
            values = [operator.index(h) for h in hosts]
        except TypeError:
            raise ValueError(f"hosts must be {world} ints, one per rank, got {hosts!r}") from None
        if len(values) != world:
            raise ValueError(f"hosts must be {world} ints, one per rank, got {len(values)}")
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(v, len(ids)) for v in values], dtype=np.int64)


def plan_shared_reads(
    needs: np.ndarray | Sequence[Sequence[int]],
    itemsizes: np.ndarray | Sequence[int],
    world: int,
    *,
    exchange_bytes: int = DEFAULT_EXCHANGE_BYTES,
    max_cells: int = DEFAULT_MAX_CELLS,
    min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
    hosts: np.ndarray | Sequence[int] | None = None,
) -> SharePlan:
    """Split every saved chunk of which ranks on several hosts need the same elements into pieces, each read on one host.

    ``needs``: int64 rows ``[rank, chunk, off_0 .. off_{D-1}, len_0 .. len_{D-1}]``,
    the box (elements, relative to the saved chunk's origin) rank ``rank``
    needs of saved chunk ``chunk`` (an index into ``itemsizes``, the bytes
    per element of each saved chunk); tensors with fewer than ``D`` dims pad
    with offset 0 and length 1. Rows may come in any order and repeat; empty
    boxes need nothing. ``world``: ranks are ``0 .. world - 1``.

    ``hosts``: one int per rank, equal for ranks that read through the same
    page cache (ranks on one host); default: every rank its own host. Ranks
    of one host do not exchange with each other: each reads the bytes it
    needs from storage, and the cache serves all but the first read. So a
    chunk is shared only when ranks on at least two hosts need some element
    of it, and each needed region is cut for the hosts that need it, not
    the ranks.

    Only chunks some element of which ranks on at least two hosts need are
    shared (see :class:`SharePlan`); ranks that need disjoint parts of a
    chunk read their own. The result depends on the set of rows only, not
    their order, so every rank computes the same plan from the same
    all-gathered rows.
    """
    if type(world) is not int or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    if exchange_bytes < 1 or max_cells < 1 or min_piece_bytes < 1:
        raise ValueError("exchange_bytes, max_cells and min_piece_bytes must be >= 1")
    host = _host_ids(hosts, world)
    rows = np.asarray(needs, dtype=np.int64)
    isz = np.asarray(itemsizes, dtype=np.int64).reshape(-1)
    if rows.ndim != 2 or rows.shape[1] < 2 or rows.shape[1] % 2:
        raise ValueError(f"needs must be rows of 2 + 2*D int64 values, got shape {rows.shape}")
    ndim = (rows.shape[1] - 2) // 2
    if len(rows):
        if rows[:, 0].min() < 0 or rows[:, 0].max() >= world:
            raise ValueError("needs: a rank outside 0 .. world - 1")
        if rows[:, 1].min() < 0 or rows[:, 1].max() >= len(isz):
            raise ValueError("needs: a chunk index outside itemsizes")
        if (rows[:, 2:] < 0).any():
            raise ValueError("needs: negative offsets or lengths")
    # Canonical order, duplicates and empty boxes dropped: the plan depends
    # on the set of rows only.
    rows = rows[(rows[:, 2 + ndim :] > 0).all(axis=1)] if len(rows) else rows
    if len(rows):
        rows = np.unique(rows, axis=0)  # sorted row-wise: rank, chunk, box
        rows = rows[np.argsort(rows[:, 1], kind="stable")]  # grouped by chunk

    shared: list[int] = []
    p_chunk: list[int] = []
    p_off: list[tuple[int, ...]] = []
    p_len: list[tuple[int, ...]] = []
    p_needers: list[np.ndarray] = []
    starts: list[int] = (np.flatnonzero(np.r_[True, rows[1:, 1] != rows[:-1, 1]]).tolist()
                         if len(rows) else [])
    ends = [*starts[1:], len(rows)] if starts else []
    for s, e in zip(starts, ends):
        block = rows[s:e]
        ranks = block[:, 0]
        if host[ranks].min() == host[ranks].max():
            continue  # one rank or one host needs it: nothing to exchange
        offs, lens = block[:, 2 : 2 + ndim], block[:, 2 + ndim :]
        cells = _cells(offs, lens, max_cells)
        if cells is None:
            continue
        c = int(block[0, 1])
        size = int(isz[c])
        lo, hi = cells
        # inside[i, j]: cell i lies in box j (cells never straddle a box edge)
        inside: np.ndarray = np.all((offs[None, :, :] <= lo[:, None, :])
                                    & (hi[:, None, :] <= (offs + lens)[None, :, :]), axis=2)
        # needs[j, u]: rank uniq[u] needs cell j
        uniq, ridx = np.unique(ranks, return_inverse=True)
        onehot = np.zeros((len(ranks), len(uniq)), dtype=np.int64)
        onehot[np.arange(len(ranks)), ridx] = 1
        cell_needs = (inside.astype(np.int64) @ onehot) > 0
        # cell_hosts[j, h]: a rank on host h needs cell j
        _, hidx = np.unique(host[uniq], return_inverse=True)
        cell_hosts = (cell_needs.astype(np.int64) @ np.eye(int(hidx.max()) + 1, dtype=np.int64)[hidx]) > 0
        if cell_hosts.sum(axis=1).max() < 2:
            continue  # the hosts need disjoint parts: each reads its own
        shared.append(c)
        for j in np.flatnonzero(cell_needs.any(axis=1)).tolist():
            who = uniq[cell_needs[j]]
            k = int(cell_hosts[j].sum())
            cell_len = tuple(int(v) for v in hi[j] - lo[j])
            # A part goes to the needers on the hosts other than its
            # reader's: at most len(who) minus the fewest needers of a host.
            mates = np.bincount(hidx[cell_needs[j]])
            fan = len(who) - int(mates[mates > 0].min())
            max_part = max(size, exchange_bytes // max(1, fan))
            # One part per host that needs the cell, but each reader of a
            # chunk also reads its archive records (a few KiB): cells smaller
            # than k * min_piece_bytes get fewer readers.
            cell_bytes = math.prod(cell_len) * size
            want = max(1, min(k, cell_bytes // min_piece_bytes))
            parts = split_box(tuple(int(v) for v in lo[j]), cell_len, want, max_part, size)
            for o, ln in parts:
                p_chunk.append(c)
                p_off.append(o)
                p_len.append(ln)
                p_needers.append(who)

    n = len(p_chunk)
    chunk = np.array(p_chunk, dtype=np.int64)
    offsets = np.array(p_off, dtype=np.int64).reshape(n, ndim)
    lengths = np.array(p_len, dtype=np.int64).reshape(n, ndim)
    nbytes: np.ndarray = (np.prod(lengths, axis=1, dtype=np.int64) * isz[chunk] if n
                          else np.zeros(0, np.int64))
    ptr = np.zeros(n + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(w) for w in p_needers])
    needers = np.concatenate(p_needers).astype(np.int64) if n else np.zeros(0, np.int64)

    # Readers: a needer on the least-loaded host, the least-loaded rank of
    # it, lowest rank on ties; its host-mates among the needers read the
    # piece too (from their page cache), the other needers receive it.
    reader = np.empty(n, dtype=np.int64)
    load = [0] * world
    host_load: dict[int, int] = {}
    for i in range(n):
        who = p_needers[i]
        best = min(who.tolist(), key=lambda r: (host_load.get(int(host[r]), 0), load[r], r))
        reader[i] = best
        load[best] += int(nbytes[i])
        host_load[int(host[best])] = host_load.get(int(host[best]), 0) + int(nbytes[i])

    # Rounds: in piece order, while no rank reads, sends or receives past the budget.
    rnd = np.empty(n, dtype=np.int64)
    cur = 0
    read = [0] * world
    sent = [0] * world
    recv = [0] * world
    used = False
    alone = False  # the round holds a part over the budget by itself
    for i in range(n):
        r, b, who = int(reader[i]), int(nbytes[i]), p_needers[i].tolist()
        readers = [w for w in who if host[w] == host[r]]
        others = [w for w in who if host[w] != host[r]]
        over = (any(read[w] + b > exchange_bytes for w in readers)
                or sent[r] + b * len(others) > exchange_bytes
                or any(recv[w] + b > exchange_bytes for w in others))
        if (over or alone) and used:
            cur += 1
            read = [0] * world
            sent = [0] * world
            recv = [0] * world
        for w in readers:
            read[w] += b
        sent[r] += b * len(others)
        for w in others:
            recv[w] += b
        used = True
        alone = b > exchange_bytes or b * len(others) > exchange_bytes
        rnd[i] = cur
    return SharePlan(
        world=world, hosts=host,
        shared_chunks=np.array(shared, dtype=np.int64),
        chunk=chunk, offsets=offsets, lengths=lengths, nbytes=nbytes, reader=reader,
        needers_ptr=ptr, needers=needers, round=rnd, n_rounds=cur + 1 if n else 0,
    )
