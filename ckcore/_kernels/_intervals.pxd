# The distinct intervals of one dimension, shared by _validate (is a layout a
# grid?) and _intersect (the cut lists of its index): an open-addressing map
# of int64 pairs to dense ids in first-seen order, and the (a, b, idx) keys
# that sort them (sort_key3, every Key3 sort of the kernels).
#
# The kernels' other open-addressing tables differ in key, so they stay
# their own: _dedup.IndexTable maps (fqn id, variable-length offset) keys,
# ~700 000 of them probed at random, through 8-byte tagged slots on huge
# pages with each probe prefetched; _items._RowCache maps rows of ndim values
# to interned Python objects.
from libc.stdlib cimport free
from libc.string cimport memcpy

from ckcore._kernels._capi cimport ck_mix64
from ckcore._kernels._types cimport i64, u64
from ckcore._kernels._util cimport safe_alloc


cdef struct IvlSlot:
    i64 a
    i64 b
    i64 id      # -1: empty


cdef struct IvlTable:
    # Sized by the number of distinct intervals (small for grids), not by the
    # number of chunks, so it stays in cache: it starts at 64 slots and
    # doubles while more than half full.
    IvlSlot* slots
    Py_ssize_t mask
    Py_ssize_t count


cdef struct Key3:
    # A sort key: an interval (a, b) and a tie-breaking index.
    i64 a
    i64 b
    i64 idx


cdef inline int cmp_key3(const void* x, const void* y) noexcept nogil:
    # Order of Key3: by a, then b, then idx (qsort's comparator signature).
    cdef const Key3* p = <const Key3*>x
    cdef const Key3* q = <const Key3*>y
    if p.a != q.a:
        return -1 if p.a < q.a else 1
    if p.b != q.b:
        return -1 if p.b < q.b else 1
    if p.idx != q.idx:
        return -1 if p.idx < q.idx else 1
    return 0


cdef inline int sort_key3(Key3* keys, Py_ssize_t m) except -1 nogil:
    # Sort keys by cmp_key3 (all keys differ in idx, so the order is total);
    # nothing to do when they are in order already (layouts laid out in order,
    # the usual case, give their intervals sorted). A bottom-up merge sort
    # rather than qsort: qsort calls its comparator through a pointer, and on
    # 65 536 random keys it took 10.7 ms where this takes 6.3 ms.
    cdef Py_ssize_t i, width, lo, mid, hi, a, b, k
    cdef Key3* tmp
    cdef Key3* src = keys
    cdef Key3* dst
    cdef Key3* t
    for i in range(1, m):
        if cmp_key3(&keys[i - 1], &keys[i]) > 0:
            break
    else:
        return 0
    tmp = <Key3*>safe_alloc(m, sizeof(Key3))
    dst = tmp
    width = 1
    while width < m:
        lo = 0
        while lo < m:
            mid = lo + width if lo + width < m else m
            hi = lo + 2 * width if lo + 2 * width < m else m
            a = lo
            b = mid
            k = lo
            while a < mid and b < hi:
                if cmp_key3(&src[b], &src[a]) < 0:
                    dst[k] = src[b]
                    b += 1
                else:
                    dst[k] = src[a]
                    a += 1
                k += 1
            while a < mid:
                dst[k] = src[a]
                a += 1
                k += 1
            while b < hi:
                dst[k] = src[b]
                b += 1
                k += 1
            lo = hi
        t = src
        src = dst
        dst = t
        width *= 2
    if src != keys:
        memcpy(keys, src, <size_t>m * sizeof(Key3))
    free(tmp)
    return 0


cdef inline Py_ssize_t ivl_slot(const IvlTable* t, i64 a, i64 b) noexcept nogil:
    # The slot holding (a, b), or the empty slot where it would go.
    cdef Py_ssize_t h = <Py_ssize_t>(ck_mix64(<u64>a * <u64>0x9E3779B97F4A7C15 ^ <u64>b)
                                     & <u64>t.mask)
    while t.slots[h].id >= 0 and (t.slots[h].a != a or t.slots[h].b != b):
        h = (h + 1) & t.mask
    return h


cdef inline int ivl_init(IvlTable* t, Py_ssize_t cap) except -1 nogil:
    # An empty table of cap (a power of two) slots; t.slots must be free.
    cdef Py_ssize_t i
    t.slots = <IvlSlot*>safe_alloc(cap, sizeof(IvlSlot))
    t.mask = cap - 1
    t.count = 0
    for i in range(cap):
        t.slots[i].id = -1
    return 0


cdef inline int ivl_grow(IvlTable* t) except -1 nogil:
    # Twice the slots; on MemoryError t is left as it was.
    cdef IvlTable bigger
    cdef Py_ssize_t i
    ivl_init(&bigger, 2 * (t.mask + 1))
    for i in range(t.mask + 1):
        if t.slots[i].id >= 0:
            bigger.slots[ivl_slot(&bigger, t.slots[i].a, t.slots[i].b)] = t.slots[i]
            bigger.count += 1
    free(t.slots)
    t[0] = bigger
    return 0


cdef inline i64 ivl_id(IvlTable* t, i64 a, i64 b) except -1 nogil:
    # The id of (a, b); an unseen pair gets the next one (t.count grows).
    cdef Py_ssize_t h = ivl_slot(t, a, b)
    if t.slots[h].id >= 0:
        return t.slots[h].id
    if 2 * (t.count + 1) > t.mask + 1:
        ivl_grow(t)
        h = ivl_slot(t, a, b)
    t.slots[h].a = a
    t.slots[h].b = b
    t.slots[h].id = t.count
    t.count += 1
    return t.slots[h].id


cdef inline void ivl_keys(const IvlTable* t, Key3* keys) noexcept nogil:
    # The distinct pairs as keys in id (first-seen) order: keys[id] = (a, b, id).
    cdef Py_ssize_t i, e
    for i in range(t.mask + 1):
        e = t.slots[i].id
        if e >= 0:
            keys[e].a = t.slots[i].a
            keys[e].b = t.slots[i].b
            keys[e].idx = e
