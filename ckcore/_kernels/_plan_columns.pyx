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
keeper's total. Façade: :func:`ckcore.compact.plan_columns`.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
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


cdef inline bint _lex_less(const i64* a, const i64* b, int32_t nd) noexcept nogil:
    cdef int32_t d
    for d in range(nd):
        if a[d] != b[d]:
            return a[d] < b[d]
    return False


cdef struct Groups:
    int64_t* prev        # per fqn: its last item so far, -1 before the first
    int64_t* start       # per fqn + 1: where its items start in ``items``
    uint8_t* ordered     # per fqn: 1 while its keys increase strictly in item order
    int64_t* items       # the items of unordered fqns, grouped by fqn, ascending
    int64_t* slot        # local table: entry + 1, 0 when empty
    uint64_t* hash       # per local entry
    int64_t* first       # per local entry: its first item


cdef Py_ssize_t _grouped_entries(Py_ssize_t n, Py_ssize_t F, i64 fmin, const i64* fid,
                                 const int32_t* nd, const i64* ptr, const i64* offs,
                                 int64_t* eid, Groups* g) noexcept nogil:
    # _entries by fqn: an fqn whose keys increase strictly (lexicographic
    # offsets) in item order, as a sharded tensor's do when ranks hold its
    # chunks in order, has no two equal keys and needs no table; the others
    # are hashed one fqn at a time in a table sized to that fqn, which stays
    # in cache where a table over every item would not. eid holds each
    # item's entry's first item, then the entry ids (first-seen order).
    cdef Py_ssize_t i, j, f, k, a, b, s, e, cap, m = 0, biggest = 0, E = 0
    cdef u64 h, key = ck_hash_key()
    for f in range(F):
        g.prev[f] = -1
        g.ordered[f] = 1
        g.start[f + 1] = 0
    for i in range(n):
        f = fid[i] - fmin
        j = g.prev[f]
        if j >= 0 and g.ordered[f] and not (
                nd[i] > 0 and nd[j] == nd[i] and _lex_less(offs + ptr[j], offs + ptr[i], nd[i])):
            g.ordered[f] = 0
        g.prev[f] = i
        g.start[f + 1] += 1
        eid[i] = i
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
