"""torch's ``dedup_save_plans`` on columns: which write item each rank keeps.

Rank 0 gets every rank's local plan as columns (:mod:`ckcore.compact`):
per item its fqn id (global across ranks), plan (rank), the number of
offset values (-1 for a bytes item, whose key offset is None) and where
they start, and its planned storage size. Two items are the same entry
when fqn and offsets are equal (``MetadataIndex`` equality, the hint takes
no part). The choice of the keeper is torch's: entries in first-seen
order; each goes to the holder with the smallest planned size so far
(ties to the lowest rank), or with ``save_to_lowest_rank`` to the lowest
holder; every entry, duplicated or not, adds its last item's size to its
keeper's total. Then torch's global plan over the kept items
(:func:`chunk_rows`): the metadata's fqn order, chunk rows and each item's
index hint. Façade: :func:`ckcore.compact.plan_columns`.

Both work in passes over the items in order with per-fqn state, so the
work per item does not grow with the ranks: no sort of every item, and
hashing only for an fqn whose keys go back to a smaller offset, in a table
of that fqn's size.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcmp, memset

from ckcore._kernels._capi cimport ck_add64, ck_hash_key, ck_mix64
from ckcore._kernels._types cimport i64, u64
from ckcore._kernels._util cimport safe_alloc, safe_calloc

import numpy as np


cdef struct Table:
    int64_t* slot        # entry id + 1, 0 when empty
    uint64_t* hash       # per entry
    int64_t* first       # per entry: its first item
    Py_ssize_t mask
    Py_ssize_t n


cdef inline uint64_t _key_hash(i64 fid, int32_t nd, const i64* offs, u64 key) noexcept nogil:
    # Keyed with the per-process secret, so offsets a plan chooses cannot all
    # land in one slot.
    cdef u64 h = ck_mix64(<u64>fid ^ key) ^ <u64>(nd + 2) * <u64>0x9e3779b97f4a7c15
    cdef int32_t d
    for d in range(nd):
        h = ck_mix64(h ^ <u64>offs[d]) + key
    return ck_mix64(h)


cdef inline bint _same(Py_ssize_t a, Py_ssize_t b, const i64* fid, const int32_t* nd,
                       const i64* ptr, const i64* offs) noexcept nogil:
    if fid[a] != fid[b] or nd[a] != nd[b]:
        return False
    if nd[a] <= 0:
        return True
    return memcmp(offs + ptr[a], offs + ptr[b], nd[a] * sizeof(i64)) == 0


cdef Py_ssize_t _entries(Py_ssize_t n, const i64* fid, const int32_t* nd, const i64* ptr,
                         const i64* offs, int64_t* eid, Table* t) noexcept nogil:
    # Entry id of every item (entries numbered in first-seen order); the count.
    cdef Py_ssize_t i, s, e
    cdef u64 h, key = ck_hash_key()
    for i in range(n):
        h = _key_hash(fid[i], nd[i], offs + (ptr[i] if nd[i] > 0 else 0), key)
        s = <Py_ssize_t>(h & <u64>t.mask)
        while True:
            e = t.slot[s] - 1
            if e < 0:
                e = t.n
                t.n += 1
                t.slot[s] = e + 1
                t.hash[e] = h
                t.first[e] = i
                break
            if t.hash[e] == h and _same(t.first[e], i, fid, nd, ptr, offs):
                break
            s = (s + 1) & t.mask
        eid[i] = e
    return t.n


cdef inline int _lex_cmp(const i64* a, const i64* b, int32_t nd) noexcept nogil:
    cdef int32_t d
    for d in range(nd):
        if a[d] != b[d]:
            return -1 if a[d] < b[d] else 1
    return 0


cdef struct Groups:
    int64_t* prev        # per fqn: its last item so far, -1 before the first
    int64_t* start       # per fqn + 1: where its items start in ``items``
    uint8_t* ordered     # per fqn: 1 while its keys never decrease in item order
    int64_t* items       # the items of unordered fqns, grouped by fqn, ascending
    int64_t* slot        # local table: entry + 1, 0 when empty
    uint64_t* hash       # per local entry
    int64_t* first       # per local entry: its first item


cdef Py_ssize_t _grouped_entries(Py_ssize_t n, Py_ssize_t F, i64 fmin, const i64* fid,
                                 const int32_t* nd, const i64* ptr, const i64* offs,
                                 int64_t* eid, Groups* g) noexcept nogil:
    # _entries by fqn. An fqn whose keys never decrease (lexicographic
    # offsets) in item order, as a sharded tensor's do when ranks hold its
    # chunks in order (trailing empty chunks sharing the end offset, or a
    # tensor every rank holds whole, repeat the last key), needs no table: a
    # key equal to the fqn's previous one is its entry, a greater one is new.
    # The others are hashed one fqn at a time in a table sized to that fqn,
    # which stays in cache where a table over every item would not. eid holds
    # each item's entry's first item, then the entry ids (first-seen order).
    cdef Py_ssize_t i, j, f, k, a, b, s, e, cap, m = 0, biggest = 0, E = 0
    cdef int c
    cdef u64 h, key = ck_hash_key()
    for f in range(F):
        g.prev[f] = -1
        g.ordered[f] = 1
        g.start[f + 1] = 0
    for i in range(n):
        f = fid[i] - fmin
        j = g.prev[f]
        eid[i] = i
        if j >= 0 and g.ordered[f]:
            c = 1 if nd[j] != nd[i] else (
                0 if nd[i] <= 0 else _lex_cmp(offs + ptr[j], offs + ptr[i], nd[i]))
            if c == 0:
                eid[i] = eid[j]
            elif c > 0:
                g.ordered[f] = 0
        g.prev[f] = i
        g.start[f + 1] += 1
    g.start[0] = 0
    for f in range(F):
        k = g.start[f + 1] if not g.ordered[f] else 0
        if k > biggest:
            biggest = k
        g.start[f + 1] = g.start[f] + k
    m = g.start[F]
    if m:
        for i in range(n):
            f = fid[i] - fmin
            if not g.ordered[f]:
                g.items[g.start[f]] = i
                g.start[f] += 1
        for f in range(F - 1, -1, -1):
            g.start[f + 1] = g.start[f]
        g.start[0] = 0
        for f in range(F):
            a, b = g.start[f], g.start[f + 1]
            if a == b:
                continue
            cap = 16
            while cap < 2 * (b - a):
                cap *= 2
            memset(g.slot, 0, cap * sizeof(int64_t))
            E = 0
            for k in range(a, b):
                i = g.items[k]
                h = _key_hash(fid[i], nd[i], offs + (ptr[i] if nd[i] > 0 else 0), key)
                s = <Py_ssize_t>(h & <u64>(cap - 1))
                while True:
                    e = g.slot[s] - 1
                    if e < 0:
                        g.slot[s] = E + 1
                        g.hash[E] = h
                        g.first[E] = i
                        E += 1
                        eid[i] = i
                        break
                    if g.hash[e] == h and _same(g.first[e], i, fid, nd, ptr, offs):
                        eid[i] = g.first[e]
                        break
                    s = (s + 1) & (cap - 1)
    # First items are numbered in order; a later item takes its first item's id.
    E = 0
    for i in range(n):
        if eid[i] == i:
            eid[i] = E
            E += 1
        else:
            eid[i] = eid[eid[i]]
    return E


cdef struct Scratch:
    int64_t* hstart      # E + 1, zeroed
    int32_t* holders     # n
    int32_t* last_plan   # E
    int64_t* last_item   # E
    i64* total           # P, zeroed


cdef int _select(Py_ssize_t n, Py_ssize_t E, const int32_t* plan, const int64_t* eid,
                 const i64* size, bint lowest, Scratch* w, int32_t* keeper) noexcept nogil:
    # torch's keeper per entry; 1 when a planned total overflows int64.
    cdef int64_t* hstart = w.hstart
    cdef int32_t* holders = w.holders
    cdef int32_t* last_plan = w.last_plan
    cdef int64_t* last_item = w.last_item
    cdef i64* total = w.total
    cdef Py_ssize_t i, e, k, c, h
    cdef int rc = 0
    # Holders of each entry, ascending (items come in plan order), counted then filled.
    for e in range(E):
        last_plan[e] = -1
    for i in range(n):
        e = eid[i]
        if plan[i] != last_plan[e]:
            last_plan[e] = plan[i]
            hstart[e + 1] += 1
        last_item[e] = i
    for e in range(E):
        hstart[e + 1] += hstart[e]
        last_plan[e] = -1
    for i in range(n):
        e = eid[i]
        if plan[i] != last_plan[e]:
            last_plan[e] = plan[i]
            holders[hstart[e]] = plan[i]
            hstart[e] += 1
    for e in range(E - 1, -1, -1):
        hstart[e + 1] = hstart[e]
    hstart[0] = 0
    for e in range(E):
        c = holders[hstart[e]]
        if not lowest:
            for k in range(hstart[e] + 1, hstart[e + 1]):
                h = holders[k]
                if total[h] < total[c]:
                    c = h
            if ck_add64(total[c], size[last_item[e]], &total[c]):
                rc = 1
                break
        keeper[e] = <int32_t>c
    return rc


def dedup_columns(const i64[::1] fid, const int32_t[::1] plan, const int32_t[::1] nd,
                  const i64[::1] ptr, const i64[::1] offs, const i64[::1] size,
                  Py_ssize_t nplans, bint save_to_lowest_rank):
    """Which items torch's ``dedup_save_plans`` keeps, over every rank's items in order.

    ``fid``, ``plan``, ``nd`` (offset values, -1 for a bytes item), ``ptr``
    (start of its offsets in ``offs``) and ``size`` (planned storage bytes,
    at least 1) are per item, items in rank order and within a rank in plan
    order. Returns ``(keep, duplicated)``: a uint8 array (1: the item stays in
    its plan) and whether any two items are the same entry; ``None`` when a
    planned total overflows int64 (the caller then runs torch's algorithm
    on Python ints).
    """
    cdef Py_ssize_t n = fid.shape[0], i, cap = 16, F = 0
    cdef i64 fmin = 0, fmax = -1
    cdef Table t
    cdef Groups g
    cdef int64_t* eid = NULL
    cdef int32_t* keeper = NULL
    cdef Scratch w
    cdef Py_ssize_t E
    cdef int rc
    if not (plan.shape[0] == n and nd.shape[0] == n and ptr.shape[0] == n and size.shape[0] == n):
        raise ValueError("dedup_columns: fid, plan, nd, ptr and size must have one entry per item")
    for i in range(n):
        if plan[i] < 0 or plan[i] >= nplans or (i and plan[i] < plan[i - 1]):
            raise ValueError(f"dedup_columns: item {i}: plan {plan[i]} out of order or range")
        if size[i] < 1:
            raise ValueError(f"dedup_columns: item {i}: storage size {size[i]} < 1")
        if nd[i] > 0 and (ptr[i] < 0 or ptr[i] > offs.shape[0] - nd[i]):
            raise ValueError(f"dedup_columns: item {i}: offsets outside the offsets column")
        if i == 0 or fid[i] < fmin:
            fmin = fid[i]
        if i == 0 or fid[i] > fmax:
            fmax = fid[i]
    if n and <u64>fmax - <u64>fmin < <u64>n:
        F = <Py_ssize_t>(fmax - fmin) + 1
    while cap < 2 * n:
        cap *= 2
    keep = np.zeros(n, dtype=np.uint8)
    cdef uint8_t[::1] kv = keep
    t.slot = NULL
    t.hash = NULL
    t.first = NULL
    g.prev = NULL
    g.start = NULL
    g.ordered = NULL
    g.items = NULL
    g.slot = NULL
    g.hash = NULL
    g.first = NULL
    w.hstart = NULL
    w.holders = NULL
    w.last_plan = NULL
    w.last_item = NULL
    w.total = NULL
    try:
        eid = <int64_t*>safe_alloc(n + 1, sizeof(int64_t))
        keeper = <int32_t*>safe_alloc(n + 1, sizeof(int32_t))
        if F:
            # Dense fqn ids (what plan_columns passes): per-fqn work.
            g.prev = <int64_t*>safe_alloc(F, sizeof(int64_t))
            g.start = <int64_t*>safe_alloc(F + 1, sizeof(int64_t))
            g.ordered = <uint8_t*>safe_alloc(F, sizeof(uint8_t))
            g.items = <int64_t*>safe_alloc(n, sizeof(int64_t))
            g.slot = <int64_t*>safe_alloc(cap, sizeof(int64_t))
            g.hash = <uint64_t*>safe_alloc(n, sizeof(uint64_t))
            g.first = <int64_t*>safe_alloc(n, sizeof(int64_t))
            with nogil:
                E = _grouped_entries(n, F, fmin, &fid[0], &nd[0], &ptr[0],
                                     &offs[0] if offs.shape[0] else NULL, eid, &g)
        else:
            t.slot = <int64_t*>safe_calloc(cap, sizeof(int64_t))
            t.hash = <uint64_t*>safe_alloc(n + 1, sizeof(uint64_t))
            t.first = <int64_t*>safe_alloc(n + 1, sizeof(int64_t))
            t.mask = cap - 1
            t.n = 0
            with nogil:
                E = _entries(n, &fid[0] if n else NULL, &nd[0] if n else NULL,
                             &ptr[0] if n else NULL, &offs[0] if offs.shape[0] else NULL,
                             eid, &t)
        if E == n:
            keep[:] = 1
            return keep, False
        w.hstart = <int64_t*>safe_calloc(E + 1, sizeof(int64_t))
        w.holders = <int32_t*>safe_alloc(n, sizeof(int32_t))
        w.last_plan = <int32_t*>safe_alloc(E, sizeof(int32_t))
        w.last_item = <int64_t*>safe_alloc(E, sizeof(int64_t))
        w.total = <i64*>safe_calloc(nplans + 1, sizeof(i64))
        with nogil:
            rc = _select(n, E, &plan[0], eid, &size[0], save_to_lowest_rank, &w, keeper)
            if rc == 0:
                for i in range(n):
                    kv[i] = keeper[eid[i]] == plan[i]
        if rc:
            return None
        return keep, True
    finally:
        free(t.slot)
        free(t.hash)
        free(t.first)
        free(g.prev)
        free(g.start)
        free(g.ordered)
        free(g.items)
        free(g.slot)
        free(g.hash)
        free(g.first)
        free(eid)
        free(keeper)
        free(w.hstart)
        free(w.holders)
        free(w.last_plan)
        free(w.last_item)
        free(w.total)


cdef struct Rows:
    int64_t* cnt         # per fqn: kept items so far
    int64_t* first_pid   # per fqn: props id of its first kept item
    int64_t* nvals       # per fqn: values per chunk row (0 for bytes)
    int64_t* row         # per fqn: its metadata position, -1 until it has a kept item
    uint8_t* single      # per fqn: 1 if a kept item of it is not a shard


cdef int _rows_count(Py_ssize_t n, const i64* fid, const int8_t* kind, const i64* pid,
                     const i64* nd, const uint8_t* keep, int64_t* hints, int64_t* order,
                     Py_ssize_t* norder, Rows* w) noexcept nogil:
    # One pass in item order: the metadata order of the fqns (first kept item
    # first), each kept item's position within its fqn, and the layouts the
    # columns do not cover (1: items of one fqn with different properties,
    # 2: a non-shard item of an fqn with more than one kept item, 3: an item
    # whose value count is not its fqn's).
    cdef Py_ssize_t i, k, m = 0
    cdef i64 f
    for i in range(n):
        if keep != NULL and not keep[i]:
            hints[i] = -1
            continue
        f = fid[i]
        if w.cnt[f] == 0:
            w.first_pid[f] = pid[i]
            w.nvals[f] = nd[i] if nd[i] > 0 else 0
            w.row[f] = m
            order[m] = f
            m += 1
        elif pid[i] != w.first_pid[f]:
            return 1
        if (nd[i] if nd[i] > 0 else 0) != w.nvals[f]:
            return 3
        if kind[i] != 1:
            w.single[f] = 1
        hints[i] = -1 if kind[i] == 2 else w.cnt[f]
        w.cnt[f] += 1
    norder[0] = m
    for k in range(m):
        f = order[k]
        if w.single[f] and w.cnt[f] > 1:
            return 2
    return 0


cdef void _rows_fill(Py_ssize_t n, const i64* fid, const i64* ptr, const i64* offs,
                     const i64* sizes, const uint8_t* keep, const int64_t* hints,
                     const int64_t* val_ptr, const Rows* w, i64* c_offs,
                     i64* c_sizes) noexcept nogil:
    # Each kept tensor item's chunk to its row: items are read in order and
    # written through one cursor per fqn, so both sides stream.
    cdef Py_ssize_t i, d, at, nv
    cdef i64 f
    for i in range(n):
        if (keep != NULL and not keep[i]) or hints[i] < 0:
            continue
        f = fid[i]
        nv = w.nvals[f]
        if w.first_pid[f] < 0 or nv == 0:
            continue
        at = val_ptr[w.row[f]] + hints[i] * nv
        for d in range(nv):
            c_offs[at + d] = offs[ptr[i] + d]
            c_sizes[at + d] = sizes[ptr[i] + d]


def chunk_rows(const i64[::1] fid, const int8_t[::1] kind, const i64[::1] pid,
               const i64[::1] nd, const i64[::1] ptr, const i64[::1] offs,
               const i64[::1] sizes, const uint8_t[::1] keep, Py_ssize_t nfqns):
    """torch's global plan over the kept items: metadata order, chunk rows, index hints.

    Per item ``fid`` (``0 <= fid < nfqns``), ``kind`` (0 TENSOR, 1 SHARD, 2
    BYTE_IO), ``pid`` (props id, -1 for bytes), ``nd`` (values per chunk,
    -1 for bytes) and ``ptr`` (start of its values in ``offs``/``sizes``),
    items in rank order and within a rank in plan order; ``keep`` (uint8
    per item, or None: all kept) says which items dedup kept.

    Returns ``(order, pids, row_ptr, val_ptr, chunk_offsets, chunk_sizes,
    hints)``: the fqns in metadata order (first kept item first) and the
    props id of each, the chunk rows of the ``k``-th as
    ``row_ptr[k]:row_ptr[k+1]`` with values from ``val_ptr[k]`` (kept items
    in item order; none for bytes), and per item its index hint (its
    position among its fqn's kept items; -1 for bytes items and items not
    kept). ``None`` when items of one fqn have different props ids or an
    fqn with a non-shard item has more than one kept item (layouts torch's
    object path handles).
    """
    cdef Py_ssize_t n = fid.shape[0], i, k, m = 0
    cdef Py_ssize_t nv = offs.shape[0]
    cdef int rc
    cdef Rows w
    cdef const uint8_t* kp = NULL
    if not (kind.shape[0] == n and pid.shape[0] == n and nd.shape[0] == n and ptr.shape[0] == n):
        raise ValueError("chunk_rows: fid, kind, pid, nd and ptr must have one entry per item")
    if sizes.shape[0] != nv:
        raise ValueError("chunk_rows: offsets and sizes must have the same length")
    if keep is not None:
        if keep.shape[0] != n:
            raise ValueError("chunk_rows: keep must have one entry per item")
        if n:
            kp = &keep[0]
    if nfqns < 0:
        raise ValueError("chunk_rows: nfqns < 0")
    for i in range(n):
        if fid[i] < 0 or fid[i] >= nfqns:
            raise ValueError(f"chunk_rows: item {i}: fqn id {fid[i]} out of range")
        if kind[i] < 0 or kind[i] > 2 or nd[i] < -1:
            raise ValueError(f"chunk_rows: item {i}: kind or value count out of range")
        if nd[i] > 0 and (ptr[i] < 0 or ptr[i] > nv - nd[i]):
            raise ValueError(f"chunk_rows: item {i}: values outside the offsets column")
    hints = np.empty(n, dtype=np.int64)
    order = np.empty(min(n, nfqns), dtype=np.int64)
    cdef int64_t[::1] hv = hints
    cdef int64_t[::1] ov = order
    cdef int64_t[::1] pv, rv, vv
    cdef i64[::1] co, cs
    cdef i64 f, rows
    w.cnt = NULL
    w.first_pid = NULL
    w.nvals = NULL
    w.row = NULL
    w.single = NULL
    try:
        w.cnt = <int64_t*>safe_calloc(nfqns + 1, sizeof(int64_t))
        w.first_pid = <int64_t*>safe_alloc(nfqns + 1, sizeof(int64_t))
        w.nvals = <int64_t*>safe_alloc(nfqns + 1, sizeof(int64_t))
        w.row = <int64_t*>safe_alloc(nfqns + 1, sizeof(int64_t))
        w.single = <uint8_t*>safe_calloc(nfqns + 1, sizeof(uint8_t))
        with nogil:
            rc = _rows_count(n, &fid[0] if n else NULL, &kind[0] if n else NULL,
                             &pid[0] if n else NULL, &nd[0] if n else NULL, kp,
                             &hv[0] if n else NULL, &ov[0] if n else NULL, &m, &w)
        if rc == 3:
            raise ValueError("chunk_rows: items of one fqn have different value counts")
        if rc:
            return None
        pids = np.empty(m, dtype=np.int64)
        row_ptr = np.zeros(m + 1, dtype=np.int64)
        val_ptr = np.zeros(m + 1, dtype=np.int64)
        pv = pids
        rv = row_ptr
        vv = val_ptr
        for k in range(m):
            f = ov[k]
            pv[k] = w.first_pid[f]
            rows = w.cnt[f] if w.first_pid[f] >= 0 else 0
            rv[k + 1] = rv[k] + rows
            vv[k + 1] = vv[k] + rows * w.nvals[f]
        c_offs = np.empty(vv[m], dtype=np.int64)
        c_sizes = np.empty(vv[m], dtype=np.int64)
        if vv[m]:
            co = c_offs
            cs = c_sizes
            with nogil:
                _rows_fill(n, &fid[0], &ptr[0], &offs[0], &sizes[0], kp, &hv[0], &vv[0], &w,
                           &co[0], &cs[0])
        return order[:m], pids, row_ptr, val_ptr, c_offs, c_sizes, hints
    finally:
        free(w.cnt)
        free(w.first_pid)
        free(w.nvals)
        free(w.row)
        free(w.single)
