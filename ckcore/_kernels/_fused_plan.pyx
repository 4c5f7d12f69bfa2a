"""dedup_save_plans, create_global_save_plan and validation's checks in one pass.

At 1024 ranks rank 0's global planning reads ~700 000 write items three
times (dedup, global plan, validation). :func:`fused_save_plan` reads each
once, in plan order (the order its objects lie in memory), and keeps what the
later steps need as C arrays: the item's dedup entry and fqn, and its
chunk's offsets and sizes as int64 rows. The phases, each a method of
``_FusedPass``:

1. ``read_items``: the index goes to the dedup table (:mod:`_dedup`), the
   chunk to its fqn's metadata, the rewritten copy is made with a provisional
   index hint (:mod:`_plan_objects`), the chunk's values become rows;
2. ``pick_keepers``: dedup picks keepers; only fqns that lost an item to it
   are redone (``redo_lost``: metadata from the first surviving item, chunks
   and hints renumbered);
3. ``metadata`` and ``new_plans``: the results, in torch's order;
4. ``careful_fqns``: validation on the rows, each tensor's rows gathered in
   plan order, with the GIL released (:mod:`_validate`'s ``tensor_findings``).

Façade: :func:`ckcore.global_plan.plan_global_save`.
"""

from libc.stdint cimport int32_t
from libc.stdlib cimport free

from ckcore._kernels._capi cimport PyTuple_Check, PyTuple_GET_SIZE, ck_add64
from ckcore._kernels._dedup cimport Dedup, Ent, Key, item_lists
from ckcore._kernels._plan_objects cimport (
    BYTE_IO, SHARD, HintInts, item_category, item_with_hint, plan_with_items,
)
from ckcore._kernels._types cimport i64
from ckcore._kernels._util cimport safe_alloc, safe_calloc, safe_realloc
from ckcore._kernels._validate cimport fast_row, tensor_findings


cdef struct Fq:
    # One fqn of the fused pass.
    int cat            # TENSOR / SHARD / BYTE_IO: every item of the fqn has it
    bint careful       # validate it the exact way (in Python), not on the rows
    bint rebuilt       # dedup took one of its items: metadata and hints redone
    i64 ent            # non-shard fqns: the one dedup entry all its items share
    i64 n_items
    i64 n_chunks       # tensor items so far: the next item's index hint
    i64 ndim           # from the first item's tensor size
    i64 tsize_at       # where that size lies in the size pool
    i64 first          # position of its first surviving item (metadata order)


cdef struct I64Buf:
    i64* data
    Py_ssize_t n, cap


cdef i64* _i64buf_room(I64Buf* b, Py_ssize_t k) except NULL:
    """Room for k more values at the end of b (not yet counted in b.n); never NULL."""
    if b.n + k > b.cap or b.data == NULL:
        b.data = <i64*>safe_realloc(b.data, 2 * b.cap + k + 1024, sizeof(i64))
        b.cap = 2 * b.cap + k + 1024
    return b.data + b.n


cdef int _read_rows(object chunk, Py_ssize_t ndim, I64Buf* rows) except -1:
    """Append chunk's offsets then sizes (ndim int64 values each) to rows.

    Returns 1, appending nothing, when the chunk is not that (no such
    attributes, another length, non-integers, offset + size past int64):
    the exact validation then reads and reports it.
    """
    cdef i64* out = _i64buf_room(rows, 2 * ndim)
    cdef Py_ssize_t j
    cdef i64 e
    cdef object o = getattr(chunk, "offsets", None)
    cdef object s = getattr(chunk, "sizes", None)
    if fast_row(o, ndim, out) or fast_row(s, ndim, out + ndim):
        return 1
    for j in range(ndim):
        if ck_add64(out[j], out[ndim + j], &e):
            return 1
    rows.n += 2 * ndim
    return 0


cdef int _first_size(Fq* f, object size, I64Buf* tsz) except -1:
    """Keep an fqn's tensor size as int64s for validation, or mark it careful."""
    cdef Py_ssize_t nd
    cdef i64* out
    if not PyTuple_Check(size):
        f.careful = True
        return 0
    nd = PyTuple_GET_SIZE(size)
    out = _i64buf_room(tsz, nd + 1)
    if fast_row(size, nd, out):
        f.careful = True
        return 0
    f.ndim = nd
    f.tsize_at = tsz.n
    tsz.n += nd
    return 0


cdef class _FusedPass:
    """One fused_save_plan call: its snapshots, the per-item and per-fqn C
    arrays, and the objects built so far. Every C buffer is freed with the
    object, whichever phase ends the call."""
    cdef tuple plans           # snapshot of the plans
    cdef list plan_items       # snapshot of each plan's items
    cdef Py_ssize_t P, total   # plans, items
    cdef bint dedup, rewrite, any_rebuilt
    cdef Dedup dd
    cdef HintInts hints
    cdef object tensor_md_cls
    cdef list new_lists        # per plan: its new items (rewritten copies)
    cdef list tmds             # per fqn: its TensorStorageMetadata, or None
    cdef list chunk_lists      # per fqn: that metadata's chunks list
    cdef Fq* fq
    cdef Py_ssize_t nfq, cap_fq
    cdef int32_t* eid          # per item: its dedup entry
    cdef i64* pfid             # per item: its fqn id
    cdef i64* prow             # per item: where its chunk's rows start in rows, or -1
    cdef unsigned char* touched    # per plan: holds a duplicated entry
    cdef unsigned char* lost       # per plan: dedup took one of its items
    cdef I64Buf rows           # chunk offsets then sizes, ndim values each
    cdef I64Buf tsz            # every fqn's tensor size (Fq.tsize_at)

    def __cinit__(self, all_plans, bint dedup, bint rewrite, tensor_md_cls, ck_itemsize):
        # The plans and their item lists are read once, into snapshots this call owns.
        self.plans = tuple(all_plans)
        self.P = len(self.plans)
        self.plan_items = item_lists(self.plans, &self.total)
        self.dedup = dedup
        self.rewrite = rewrite
        self.dd = Dedup(self.total if dedup else 0, ck_itemsize)
        self.hints = HintInts()
        self.tensor_md_cls = tensor_md_cls
        self.new_lists = []
        self.tmds = []
        self.chunk_lists = []
        self.eid = <int32_t*>safe_alloc(self.total + 1, sizeof(int32_t))
        self.pfid = <i64*>safe_alloc(self.total + 1, sizeof(i64))
        self.prow = <i64*>safe_alloc(self.total + 1, sizeof(i64))
        self.touched = <unsigned char*>safe_calloc(self.P + 1, 1)
        self.lost = <unsigned char*>safe_calloc(self.P + 1, 1)
        _i64buf_room(&self.rows, 4 * self.total)

    def __dealloc__(self):
        free(self.eid)
        free(self.pfid)
        free(self.prow)
        free(self.touched)
        free(self.lost)
        free(self.fq)
        free(self.rows.data)
        free(self.tsz.data)

    # ---- phase 1: one pass over every item, in plan order

    cdef int read_items(self) except -1:
        """Read every item once; 1 when the plans need the step-by-step path."""
        cdef Py_ssize_t p, k, n, pos = 0
        cdef list items, new_list
        for p in range(self.P):
            items = <list>self.plan_items[p]
            n = len(items)
            new_list = [None] * n
            self.new_lists.append(new_list)
            for k in range(n):
                if self.read_item(items[k], p, pos, new_list, k):
                    return 1
                pos += 1
        return 0

    cdef Py_ssize_t fqn_of(self, object fqn, int cat, Py_ssize_t pos) except -1:
        """The fqn's dense id, its Fq made on first sight (an item of category cat at pos)."""
        cdef Py_ssize_t fid = self.dd.fid(fqn)
        cdef Fq* f
        if fid == self.nfq:
            if self.nfq == self.cap_fq:
                self.fq = <Fq*>safe_realloc(self.fq, 2 * self.cap_fq + 256, sizeof(Fq))
                self.cap_fq = 2 * self.cap_fq + 256
            f = &self.fq[fid]
            f.cat = cat
            f.careful = cat == BYTE_IO
            f.rebuilt = False
            f.ent = -1
            f.n_items = 0
            f.n_chunks = 0
            f.ndim = -1
            f.tsize_at = -1
            f.first = pos
            self.tmds.append(None)
            self.chunk_lists.append(None)
            self.nfq += 1
        return fid

    cdef int read_item(self, object item, Py_ssize_t p, Py_ssize_t pos, list new_list,
                       Py_ssize_t k) except -1:
        """Item k of plan p (item number pos overall); 1 for the step-by-step path."""
        cdef Key key
        cdef object idx = item.index
        cdef object t = item.type
        cdef int cat = item_category(t)
        cdef object fqn = idx.fqn
        cdef Py_ssize_t fid = self.fqn_of(fqn, cat, pos), e
        cdef Fq* f = &self.fq[fid]
        cdef object off, td, chunk, chunks, tmd
        if f.cat != cat:
            return 1
        off = idx.offset
        # The slot is prefetched now and probed once the item is built.
        if self.dedup and self.dd.key(fid, off, &key, NULL):
            return 1
        self.pfid[pos] = fid
        self.prow[pos] = -1
        f.n_items += 1
        if cat == BYTE_IO:
            new_list[k] = item
        else:
            td = item.tensor_data
            if td is None:
                return 1
            chunk = td.chunk
            if chunk is None:
                return 1
            if f.n_chunks == 0:
                tmd = self.tensor_md_cls(properties=td.properties, size=td.size, chunks=[])
                self.tmds[fid] = tmd
                self.chunk_lists[fid] = chunks = tmd.chunks
                _first_size(f, td.size, &self.tsz)
            else:
                chunks = self.chunk_lists[fid]
            chunks.append(chunk)
            if self.rewrite:
                new_list[k] = item_with_hint(item, idx, fqn, off, t, td, self.hints.get(f.n_chunks))
            else:
                new_list[k] = item
            f.n_chunks += 1
            if not f.careful and f.ndim > 0:
                if _read_rows(chunk, f.ndim, &self.rows):
                    f.careful = True
                else:
                    self.prow[pos] = self.rows.n - 2 * f.ndim
        e = self.dd.add(item, &key, p) if self.dedup else 0
        self.eid[pos] = <int32_t>e
        if cat != SHARD:
            # A non-shard fqn has one dedup entry, or torch raises.
            if f.ent < 0:
                f.ent = e
            elif f.ent != e:
                return 1
        return 0

    # ---- phase 2: dedup's keepers, and which plans and fqns lose items

    cdef int pick_keepers(self, bint save_to_lowest_rank) except -1:
        """Select keepers and mark what loses items; 1 for the step-by-step path."""
        cdef Ent* ents = self.dd.t.ents
        cdef Py_ssize_t fid, p, k, n, pos = 0
        cdef Fq* f
        for fid in range(self.nfq):
            f = &self.fq[fid]
            # A non-shard fqn must end with one item, or torch raises.
            if f.cat != SHARD and f.n_items != (ents[f.ent].nholders if self.dedup else 1):
                return 1
        if not self.dedup or self.dd.last_dup < 0:
            return 0
        if self.dd.select(self.P, save_to_lowest_rank, self.touched):
            return 1
        for p in range(self.P):
            n = len(<list>self.plan_items[p])
            if self.touched[p]:
                for k in range(pos, pos + n):
                    if ents[self.eid[k]].selected != p:
                        self.lost[p] = 1
                        self.fq[self.pfid[k]].rebuilt = True
                        self.any_rebuilt = True
            pos += n
        if self.any_rebuilt:
            self.redo_lost()
        return 0

    cdef int redo_lost(self) except -1:
        """Redo the fqns that dedup took items from, over their surviving items.

        Their metadata comes from the first surviving item, their chunk lists and
        index hints count surviving items only (rare: replicated tensors, the
        empty trailing shards of uneven splits).
        """
        cdef Ent* ents = self.dd.t.ents
        cdef Py_ssize_t fid, p, k, n, pos = 0
        cdef Fq* f
        cdef list items, new_list
        cdef object item, idx, td, tmd
        for fid in range(self.nfq):
            f = &self.fq[fid]
            if f.rebuilt:
                f.n_chunks = 0
                f.first = -1
        for p in range(self.P):
            items = <list>self.plan_items[p]
            new_list = <list>self.new_lists[p]
            n = len(items)
            for k in range(n):
                fid = self.pfid[pos]
                f = &self.fq[fid]
                if f.rebuilt and ents[self.eid[pos]].selected == p:
                    if f.first < 0:
                        f.first = pos
                    if f.cat != BYTE_IO:
                        item = items[k]
                        td = item.tensor_data
                        if f.n_chunks == 0:
                            tmd = self.tensor_md_cls(properties=td.properties, size=td.size,
                                                     chunks=[])
                            self.tmds[fid] = tmd
                            self.chunk_lists[fid] = tmd.chunks
                        self.chunk_lists[fid].append(td.chunk)
                        if self.rewrite:
                            idx = item.index
                            new_list[k] = item_with_hint(item, idx, idx.fqn, idx.offset,
                                                         item.type, td, self.hints.get(f.n_chunks))
                        f.n_chunks += 1
                pos += 1
        return 0

    # ---- phase 3: the results

    cdef dict metadata(self, object bytes_md_cls):
        """fqn -> storage metadata, in the order of each fqn's first surviving item."""
        cdef list fqns = self.dd.fqns
        cdef dict md = {}
        cdef Py_ssize_t fid
        order = range(self.nfq)
        if self.any_rebuilt:
            order = sorted(order, key=lambda i: self.fq[<Py_ssize_t>i].first)
        for fid in order:
            md[fqns[fid]] = bytes_md_cls() if self.fq[fid].cat == BYTE_IO else self.tmds[fid]
        return md

    cdef list new_plans(self):
        """Every plan with its new items, less those dedup gave to another plan."""
        cdef Ent* ents = self.dd.t.ents
        cdef list out = [], new_list
        cdef Py_ssize_t p, k, n, pos = 0
        for p in range(self.P):
            new_list = <list>self.new_lists[p]
            n = len(new_list)
            if self.lost[p]:
                new_list = [new_list[k] for k in range(n)
                            if ents[self.eid[pos + k]].selected == p]
            pos += n
            out.append(plan_with_items(self.plans[p], new_list))
        return out

    # ---- phase 4: validation on the rows, each tensor's rows in plan order

    cdef set careful_fqns(self):
        """The fqns whose validation must run the exact way (a finding, or no rows)."""
        cdef Py_ssize_t fid, maxn = 0
        cdef Fq* f
        cdef i64* perm = NULL
        cdef i64* at = NULL
        cdef i64* scratch = NULL
        cdef set careful = set()
        for fid in range(self.nfq):
            f = &self.fq[fid]
            if f.careful or f.rebuilt or f.ndim <= 0:
                f.careful = f.careful or f.rebuilt
            elif f.n_chunks * f.ndim > maxn:
                maxn = f.n_chunks * f.ndim
        try:
            perm = <i64*>safe_alloc(self.total + 1, sizeof(i64))
            at = <i64*>safe_calloc(self.nfq + 1, sizeof(i64))
            scratch = <i64*>safe_alloc(2 * maxn + 1, sizeof(i64))
            with nogil:
                _gather_rows(self.fq, self.nfq, self.pfid, self.prow, self.total, perm, at)
                _check_rows(self.fq, self.nfq, perm, at, self.rows.data, self.tsz.data,
                            scratch, maxn, self.P > 1)
        finally:
            free(perm)
            free(at)
            free(scratch)
        for fid in range(self.nfq):
            if self.fq[fid].careful:
                careful.add(self.dd.fqns[fid])
        return careful


cdef void _gather_rows(const Fq* fq, Py_ssize_t nfq, const i64* pfid, const i64* prow,
                       Py_ssize_t total, i64* perm, i64* at) noexcept nogil:
    """Lay each checked fqn's row positions out in perm, in plan order: fqn
    fid's lie in perm[at[fid] - n_chunks : at[fid]] afterwards (at: nfq + 1
    zeros on entry)."""
    cdef Py_ssize_t fid, pos
    for fid in range(nfq):
        if not fq[fid].careful and fq[fid].ndim > 0:
            at[fid + 1] = fq[fid].n_chunks
    for fid in range(nfq):
        at[fid + 1] += at[fid]
    for pos in range(total):
        if prow[pos] >= 0:
            fid = pfid[pos]
            if not fq[fid].careful:
                perm[at[fid]] = prow[pos]
                at[fid] += 1


cdef int _check_rows(Fq* fq, Py_ssize_t nfq, const i64* perm, const i64* at, const i64* rows,
                     const i64* tsz, i64* scratch, Py_ssize_t maxn,
                     bint multi) except -1 nogil:
    """Mark careful every checked fqn torch's validation would report on."""
    cdef Py_ssize_t fid, k, j, nd, m
    cdef Fq* f
    for fid in range(nfq):
        f = &fq[fid]
        if f.careful or f.ndim <= 0:
            continue
        nd = f.ndim
        m = f.n_chunks
        for k in range(m):
            for j in range(nd):
                scratch[k * nd + j] = rows[perm[at[fid] - m + k] + j]
                scratch[maxn + k * nd + j] = rows[perm[at[fid] - m + k] + nd + j]
        if tensor_findings(m, nd, scratch, scratch + maxn, tsz + f.tsize_at, multi):
            f.careful = True
    return 0


def fused_save_plan(all_plans, bint dedup, bint save_to_lowest_rank, bint rewrite_index_hints,
                    metadata_cls, tensor_md_cls, bytes_md_cls, ck_itemsize):
    """dedup_save_plans, create_global_save_plan and validation's checks in one pass.

    Returns ``(plans, metadata, careful)``: ``careful`` is the set of fqns
    whose validation must run the exact way in Python (a finding to report,
    bytes entries, values that are not int64 rows, fqns redone by dedup).
    Returns None when the plans need the step-by-step path, which raises
    torch's errors or handles them exactly: an fqn mixing item types or with
    two surviving non-shard items, a tensor item without tensor data or
    chunk, an index offset that is not int64 values, a planned size past
    int64. ``ck_itemsize`` as for :func:`_dedup.dedup_save_plans`.
    """
    cdef _FusedPass fp = _FusedPass(all_plans, dedup, rewrite_index_hints, tensor_md_cls,
                                    ck_itemsize)
    if fp.read_items() or fp.pick_keepers(save_to_lowest_rank):
        return None
    md = fp.metadata(bytes_md_cls)
    out = fp.new_plans()
    careful = fp.careful_fqns()
    return out, metadata_cls(md), careful
