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
from libc.string cimport memcmp

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
    its plan) and whether any entry had more than one holder; ``None`` when a
    planned total overflows int64 (the caller then runs torch's algorithm
    on Python ints).
    """
    cdef Py_ssize_t n = fid.shape[0], i, cap = 16
    cdef Table t
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
    while cap < 2 * n:
        cap *= 2
    keep = np.zeros(n, dtype=np.uint8)
    cdef uint8_t[::1] kv = keep
    t.slot = NULL
    t.hash = NULL
    t.first = NULL
    w.hstart = NULL
    w.holders = NULL
    w.last_plan = NULL
    w.last_item = NULL
    w.total = NULL
    try:
        t.slot = <int64_t*>safe_calloc(cap, sizeof(int64_t))
        t.hash = <uint64_t*>safe_alloc(n + 1, sizeof(uint64_t))
        t.first = <int64_t*>safe_alloc(n + 1, sizeof(int64_t))
        t.mask = cap - 1
        t.n = 0
        eid = <int64_t*>safe_alloc(n + 1, sizeof(int64_t))
        keeper = <int32_t*>safe_alloc(n + 1, sizeof(int32_t))
        with nogil:
            E = _entries(n, &fid[0] if n else NULL, &nd[0] if n else NULL,
                         &ptr[0] if n else NULL, &offs[0] if offs.shape[0] else NULL, eid, &t)
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
        free(eid)
        free(keeper)
        free(w.hstart)
        free(w.holders)
        free(w.last_plan)
        free(w.last_item)
        free(w.total)
