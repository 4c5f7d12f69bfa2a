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

from ckcore._kernels._capi cimport ck_hash_key, ck_mix64
from ckcore._kernels._types cimport i64, u64
from ckcore._kernels._util cimport safe_alloc, safe_realloc


cdef struct IvlTable:
    # Ids in the slots (8 bytes each), the pairs themselves in first-seen
    # order in a and b: a probe touches one small slot, then the candidate's
    # pair. Sized by the number of distinct intervals (small for grids), not
    # by the number of chunks, so it stays in cache: it starts at 64 slots
    # and doubles while more than half full. Zero it before ivl_init; free
    # it with ivl_free (also when ivl_init failed).
    i64* slots      # id, or -1: empty
    i64* a          # id -> first value of the pair
    i64* b          # id -> second value
    Py_ssize_t mask
    u64 key         # ck_hash_key(): the intervals come from files
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
    # The slot holding (a, b)'s id, or the empty slot where it would go.
    # Keyed: with a fixed mix, a crafted .metadata could pick intervals whose
    # slots all coincide and make every insert walk the whole table.
    cdef Py_ssize_t h = <Py_ssize_t>(ck_mix64(ck_mix64(<u64>a ^ t.key) ^ <u64>b)
                                     & <u64>t.mask)
    cdef i64 e
    while True:
        e = t.slots[h]
        if e < 0 or (t.a[e] == a and t.b[e] == b):
            return h
        h = (h + 1) & t.mask


cdef inline int _ivl_slots(IvlTable* t, Py_ssize_t cap) except -1 nogil:
    # cap (a power of two) slots holding ids 0..count-1; on MemoryError t is
    # left as it was.
    cdef i64* slots = <i64*>safe_alloc(cap, sizeof(i64))
    cdef Py_ssize_t i
    for i in range(cap):
        slots[i] = -1
    free(t.slots)
    t.slots = slots
    t.mask = cap - 1
    for i in range(t.count):
        t.slots[ivl_slot(t, t.a[i], t.b[i])] = i
    return 0


cdef inline int ivl_init(IvlTable* t, Py_ssize_t cap) except -1 nogil:
    # An empty table of cap (a power of two) slots; t zeroed or ivl_free'd.
    t.count = 0
    t.key = ck_hash_key()
    _ivl_slots(t, cap)
    t.a = <i64*>safe_alloc(cap // 2, sizeof(i64))
    t.b = <i64*>safe_alloc(cap // 2, sizeof(i64))
    return 0


cdef inline void ivl_free(IvlTable* t) noexcept nogil:
    free(t.slots)
    free(t.a)
    free(t.b)
    t.slots = t.a = t.b = NULL


cdef inline i64 ivl_id(IvlTable* t, i64 a, i64 b) except -1 nogil:
    # The id of (a, b); an unseen pair gets the next one (t.count grows).
    cdef Py_ssize_t h = ivl_slot(t, a, b), cap
    if t.slots[h] >= 0:
        return t.slots[h]
    if 2 * (t.count + 1) > t.mask + 1:
        # Pairs live at most half the slots: a and b grow with them.
        cap = 2 * (t.mask + 1)
        t.a = <i64*>safe_realloc(t.a, cap // 2, sizeof(i64))
        t.b = <i64*>safe_realloc(t.b, cap // 2, sizeof(i64))
        _ivl_slots(t, cap)
        h = ivl_slot(t, a, b)
    t.a[t.count] = a
    t.b[t.count] = b
    t.slots[h] = t.count
    t.count += 1
    return t.count - 1


cdef inline void ivl_keys(const IvlTable* t, Key3* keys) noexcept nogil:
    # The distinct pairs as keys in id (first-seen) order: keys[id] = (a, b, id).
    cdef Py_ssize_t e
    for e in range(t.count):
        keys[e].a = t.a[e]
        keys[e].b = t.b[e]
        keys[e].idx = e
