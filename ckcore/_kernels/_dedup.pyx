"""torch's ``dedup_save_plans``, compiled: each duplicated write item kept on one plan.

The items' ``MetadataIndex`` keys (``(fqn, offset)``, what the dataclass
hashes and compares) go into an open-addressing table of int64 values
instead of a dict of dataclasses; storage sizes are computed from the
dtype's item size once per dtype. Façade: :func:`ckcore.global_plan.dedup_save_plans`.
"""

import sys

from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport free
from libc.string cimport memcmp

from ckcore._kernels._capi cimport (
    PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE, ck_i128, ck_malloc_big, ck_mix64, ck_mul64,
)
from ckcore._kernels._plan_objects cimport plan_with_items
from ckcore._kernels._types cimport i64, u64
from ckcore._kernels._util cimport safe_alloc, safe_calloc, safe_realloc, to_i64

# item class -> function(dtype) -> itemsize, _CK_RULE for ckcore's WriteItem
# (the façade's itemsize function is used), or None when the class's own
# tensor_storage_size must be called.
cdef dict _SIZE_RULE = {}
cdef dict _ITEMSIZE = {}
cdef object _CK_RULE = object()


cdef object _size_rule(type cls, object ck_itemsize):
    """How items of cls are sized. ck_itemsize is passed down by the façade
    (ckcore.dtypes.itemsize): a kernel imports nothing from above it."""
    rule = _SIZE_RULE.get(cls, _SIZE_RULE)
    if rule is _SIZE_RULE:
        rule = None
        m = getattr(cls, "tensor_storage_size", None)
        if m is not None and getattr(m, "__qualname__", "") == "WriteItem.tensor_storage_size":
            mod = getattr(m, "__module__", "")
            if mod == "ckcore.planner":
                rule = _CK_RULE
            elif mod == "torch.distributed.checkpoint.planner":
                rule = sys.modules["torch"]._utils._element_size
        _SIZE_RULE[cls] = rule
    return ck_itemsize if rule is _CK_RULE else rule


cdef class _LastSize:
    """The last (item class, size rule) and (rule, dtype, item size) looked up.

    Immutable once made, and swapped in whole: threads planning at once
    share the cache, and a lookup that runs Python code (the rule, a hash)
    may let another thread in between, so no reader ever sees one thread's
    class with another's rule.
    """
    cdef type cls
    cdef object rule
    cdef object dt
    cdef i64 isz


cdef _LastSize _LAST_SIZE = _LastSize()


cdef int _storage_size(object item, object ck_itemsize, i64* out) except -1:
    # `item.tensor_storage_size() or 1` as an int64; returns 1 if it does not
    # fit or is not computed from int64 values (the caller then falls back to
    # Python ints, with torch's own arithmetic). A one-entry cache stands in
    # for the class and dtype lookups (a plan has a handful).
    global _LAST_SIZE
    cdef _LastSize last = _LAST_SIZE
    cdef _LastSize new
    cdef object rule, td, v, isz, dt
    cdef i64 numel = 1, x = 0
    if type(item) is last.cls:
        rule = last.rule
    else:
        rule = _size_rule(type(item), ck_itemsize)
        new = _LastSize()
        new.cls = type(item)
        new.rule = rule
        _LAST_SIZE = last = new
    if rule is None:
        v = item.tensor_storage_size() or 1
        return to_i64(v, out)
    td = item.tensor_data
    if td is None:
        out[0] = 1
        return 0
    for v in td.size:
        if to_i64(v, &x) or ck_mul64(numel, x, &numel):
            return 1
    dt = td.properties.dtype
    if dt is not last.dt or last.dt is None:
        isz = _ITEMSIZE.get((rule, dt))
        if isz is None:
            isz = rule(dt)
            _ITEMSIZE[(rule, dt)] = isz
        if to_i64(isz, &x):
            return 1
        new = _LastSize()
        new.cls = last.cls
        new.rule = rule
        new.dt = dt
        new.isz = x
        _LAST_SIZE = last = new
    if ck_mul64(numel, last.isz, &numel):
        return 1
    out[0] = numel if numel != 0 else 1
    return 0


cdef list _dedup_python(tuple plans, list plan_items, bint save_to_lowest_rank):
    """torch's algorithm with Python ints, ties to the lowest rank (exact-size fallback).

    On the snapshots the compiled pass read (``plans``, and ``plan_items``
    from ``item_lists``), so both passes below see the same items.
    """
    holders = {}
    item_of = {}
    for p in range(len(plans)):
        for item in <list>plan_items[p]:
            key = (item.index.fqn, item.index.offset)
            hs = holders.setdefault(key, [])
            if not hs or hs[len(hs) - 1] != p:
                hs.append(p)
            item_of[key] = item
    size = [0] * len(plans)
    selected = {}
    for key, hs in holders.items():
        if save_to_lowest_rank:
            c = hs[0]
        else:
            c = min(hs, key=lambda p: size[p])  # first minimum: lowest rank
        size[c] += item_of[key].tensor_storage_size() or 1
        selected[key] = c
    return [
        plan_with_items(plans[p], [it for it in <list>plan_items[p]
                                   if selected[(it.index.fqn, it.index.offset)] == p])
        for p in range(len(plans))
    ]


cdef extern from *:
    """
    #define ck_prefetch(p) __builtin_prefetch((const void*)(p), 1, 3)
    """
    void ck_prefetch(const void* p) noexcept nogil


cdef int _index_init(IndexTable* t, Py_ssize_t expected) except -1:
    """An empty table sized for `expected` keys at load <= 1/2: no rehash on the way."""
    cdef Py_ssize_t cap = 1024, i
    while cap < 2 * expected:
        cap *= 2
    # Not safe_alloc: the slots are probed at random, so they go on huge pages.
    t.slots = <Slot*>ck_malloc_big(cap * sizeof(Slot))
    if t.slots == NULL:
        raise MemoryError()
    for i in range(cap):
        t.slots[i].e = -1
    t.mask = cap - 1
    return 0


cdef int _index_grow_slots(IndexTable* t) except -1:
    cdef Py_ssize_t cap = 2 * (t.mask + 1), i, h
    cdef Slot* slots = <Slot*>ck_malloc_big(cap * sizeof(Slot))
    if slots == NULL:
        raise MemoryError()
    for i in range(cap):
        slots[i].e = -1
    for i in range(t.n_ent):
        h = <Py_ssize_t>(t.ents[i].hash & <u64>(cap - 1))
        while slots[h].e >= 0:
            h = (h + 1) & (cap - 1)
        slots[h].e = <int32_t>i
        slots[h].tag = <uint32_t>(t.ents[i].hash >> 32)
    free(t.slots)
    t.slots = slots
    t.mask = cap - 1
    return 0


cdef int _index_key(IndexTable* t, i64 fid, object off, Key* key, Py_ssize_t at) except -1:
    """Hash (fid, off) into key, its values to t.pool[at:], and prefetch its
    slot. ``at`` is the pool's tail, or just past the values of a key hashed
    before and not yet probed. Returns 1 if off is not a tuple of int64
    values (the caller falls back to Python keys), else 0."""
    cdef Py_ssize_t nd, j
    cdef i64 v = 0
    cdef u64 hv
    if off is None:
        nd = -1
    elif PyTuple_Check(off):
        nd = PyTuple_GET_SIZE(off)
        if nd > 0x7FFFFFFF:
            return 1
    else:
        return 1
    if at + nd + 1 > t.cap_pool:
        t.pool = <i64*>safe_realloc(t.pool, 2 * t.cap_pool + nd + 1024, sizeof(i64))
        t.cap_pool = 2 * t.cap_pool + nd + 1024
    hv = ck_mix64(<u64>fid * <u64>0x9E3779B97F4A7C15 + <u64>(nd + 2))
    for j in range(nd):
        if to_i64(<object>PyTuple_GET_ITEM(off, j), &v):
            return 1
        t.pool[at + j] = v
        hv = ck_mix64(hv ^ <u64>v)
    key.fid = fid
    key.nd = nd
    key.hash = hv
    key.at = at
    ck_prefetch(&t.slots[hv & <u64>t.mask])
    return 0


cdef Py_ssize_t _index_probe(IndexTable* t, const Key* key, Py_ssize_t p) except -1:
    """Entry number of a hashed key, adding it (held by plan p) if new.

    Keys are probed in the order they were hashed."""
    cdef Py_ssize_t h, e, nd = key.nd
    cdef u64 hv = key.hash
    cdef uint32_t tag = <uint32_t>(hv >> 32)
    h = <Py_ssize_t>(hv & <u64>t.mask)
    while True:
        e = t.slots[h].e
        if e < 0:
            break
        if (t.slots[h].tag == tag and t.ents[e].hash == hv and t.ents[e].fqn_id == key.fid
                and t.ents[e].ndim == nd
                and (nd <= 0 or memcmp(t.pool + t.ents[e].pool, t.pool + key.at,
                                       nd * sizeof(i64)) == 0)):
            return e
        h = (h + 1) & t.mask
    if t.n_ent == t.cap_ent:
        if t.n_ent >= 0x7FFFFFFF:
            raise MemoryError("more than 2**31 distinct write item indices")
        t.ents = <Ent*>safe_realloc(t.ents, 2 * t.cap_ent + 1024, sizeof(Ent))
        t.cap_ent = 2 * t.cap_ent + 1024
    e = t.n_ent
    t.ents[e].fqn_id = <int32_t>key.fid
    t.ents[e].ndim = <int32_t>nd
    t.ents[e].pool = key.at
    t.ents[e].hash = hv
    t.ents[e].first = <int32_t>p
    t.ents[e].last = <int32_t>p
    t.ents[e].nholders = 1
    t.ents[e].selected = <int32_t>p
    if nd > 0:
        t.n_pool = key.at + nd
    t.slots[h].e = <int32_t>e
    t.slots[h].tag = tag
    t.n_ent += 1
    if 2 * t.n_ent > t.mask + 1:
        _index_grow_slots(t)
    return e


cdef class Dedup:
    """torch's dedup bookkeeping: which plans hold each index, and which one keeps it.

    ``key`` then ``add`` are called for every item, plan by plan (work may
    go between the two while the key's slot is prefetched); entries are the
    distinct ``(fqn, offset)`` keys in first-seen order. ``select`` then gives every
    entry held by more than one plan its keeper with torch's rule. An entry's
    ``selected`` plan is its only holder otherwise.

    Attributes: see _dedup.pxd.
    """

    def __cinit__(self, Py_ssize_t expected, object ck_itemsize):
        self.t.ents = NULL
        self.t.n_ent = 0
        self.t.cap_ent = 0
        self.t.pool = NULL
        self.t.n_pool = 0
        self.t.cap_pool = 0
        self.t.slots = NULL
        _index_init(&self.t, expected)
        self.fqn_ids = {}
        self.fqns = []
        self.dups = {}
        self.ent_item = []
        self.last_dup = -1
        self.ck_itemsize = ck_itemsize

    def __dealloc__(self):
        free(self.t.ents)
        free(self.t.slots)
        free(self.t.pool)

    cdef i64 fid(self, object fqn) except -1:
        cdef object got = self.fqn_ids.get(fqn)
        cdef i64 f
        if got is not None:
            return <i64>got
        f = len(self.fqns)
        self.fqn_ids[fqn] = f
        self.fqns.append(fqn)
        return f

    cdef int key(self, i64 fid, object off, Key* key, const Key* pending) except -1:
        """Hash index (fqn id, off) into key and prefetch its slot; 1 when off
        is not a tuple of int64 values (the caller must use Python keys,
        ``_dedup_python``), else 0. ``pending``: a key hashed before and not
        yet added, or NULL."""
        cdef Py_ssize_t at = self.t.n_pool
        if pending != NULL and pending.nd > 0:
            at = pending.at + pending.nd
        return _index_key(&self.t, fid, off, key, at)

    cdef Py_ssize_t add(self, object item, const Key* key, Py_ssize_t p) except -1:
        """Record that plan p holds item, at the index last hashed into key;
        its entry number."""
        cdef Py_ssize_t e = _index_probe(&self.t, key, p)
        cdef Ent* ent
        if e == len(self.ent_item):
            self.ent_item.append(item)
            return e
        self.ent_item[e] = item
        ent = &self.t.ents[e]
        if ent.last != p:
            if ent.nholders == 1:
                self.dups[e] = [ent.first, p]
            else:
                (<list>self.dups[e]).append(p)
            ent.nholders += 1
            ent.last = <int32_t>p
            if e > self.last_dup:
                self.last_dup = e
        return e

    cdef int select(self, Py_ssize_t P, bint save_to_lowest_rank,
                    unsigned char* touched) except -1:
        """Pick every duplicated entry's keeper; mark in ``touched`` (P zeroed
        bytes) the plans that hold some duplicated entry.

        The keeper is the holder with the smallest planned size so far
        (ties to the lowest rank), or the lowest holder. Only touched plans
        ever have their size compared, and only entries up to the last
        duplicated one matter: no other entry's size is computed. Returns 1
        when a size does not fit in int64 (the caller must use
        ``_dedup_python``), else 0.
        """
        cdef ck_i128* plan_size = NULL
        cdef Ent* ents = self.t.ents
        cdef Py_ssize_t e, k
        cdef list hs
        cdef i64 sz, c, h
        for hs in self.dups.values():
            for k in range(len(hs)):
                touched[<i64>hs[k]] = 1
        plan_size = <ck_i128*>safe_calloc(P + 1, sizeof(ck_i128))
        try:
            for e in range(self.last_dup + 1):
                if ents[e].nholders == 1:
                    if not save_to_lowest_rank and touched[ents[e].first]:
                        if _storage_size(self.ent_item[e], self.ck_itemsize, &sz):
                            return 1
                        plan_size[ents[e].first] += sz
                    continue
                hs = <list>self.dups[e]
                c = hs[0]
                if not save_to_lowest_rank:
                    if _storage_size(self.ent_item[e], self.ck_itemsize, &sz):
                        return 1
                    for k in range(1, len(hs)):
                        h = hs[k]
                        if plan_size[h] < plan_size[c]:
                            c = h
                    plan_size[c] += sz
                ents[e].selected = <int32_t>c
        finally:
            free(plan_size)
        return 0


cdef list item_lists(tuple plans, Py_ssize_t* total):
    """Every plan's items as a list the call owns (read once), and their total count.

    Copies, never the plans' own lists: the passes that follow size their
    buffers by ``total`` and index the lists again after running Python code
    (attribute reads, hashes), during which another thread may change a
    plan's list.
    """
    cdef list out = []
    cdef list items
    if len(plans) > 0x7FFFFFFF:
        raise ValueError(f"at most 2**31 - 1 plans are supported, got {len(plans)}")
    total[0] = 0
    for plan in plans:
        items = list(plan.items)
        out.append(items)
        total[0] += len(items)
    return out


def dedup_save_plans(all_plans, bint save_to_lowest_rank, ck_itemsize):
    """See ckcore.global_plan.dedup_save_plans (torch's dedup_save_plans).

    ``ck_itemsize(dtype)`` sizes ckcore's own write items (the façade passes
    ``ckcore.dtypes.itemsize``); torch's items are sized with torch's table.
    """
    # The plans and their item lists are read once, into snapshots this call owns.
    cdef tuple plans = tuple(all_plans)
    cdef Py_ssize_t P = len(plans), p, total, pos
    cdef list plan_items = item_lists(plans, &total)
    cdef Dedup dd = Dedup(total, ck_itemsize)
    cdef Key keys[2]
    cdef Py_ssize_t prev_p = 0
    cdef object prev_item = None
    cdef int32_t* eid = NULL
    cdef unsigned char* touched = NULL
    cdef object idx
    try:
        eid = <int32_t*>safe_alloc(total + 1, sizeof(int32_t))
        touched = <unsigned char*>safe_calloc(P + 1, 1)
        # Software-pipelined: item k's key is hashed (and its slot
        # prefetched) before item k-1's is probed, so the probe's random
        # access overlaps reading the next item.
        pos = 0
        for p in range(P):
            for item in <list>plan_items[p]:
                idx = item.index
                if dd.key(dd.fid(idx.fqn), idx.offset, &keys[pos & 1],
                          &keys[(pos - 1) & 1] if pos else NULL):
                    # An offset that is not a tuple of int64 values: torch's own
                    # keys, with Python ints.
                    return _dedup_python(plans, plan_items, save_to_lowest_rank)
                if pos:
                    eid[pos - 1] = dd.add(prev_item, &keys[(pos - 1) & 1], prev_p)
                prev_item = item
                prev_p = p
                pos += 1
        if pos:
            eid[pos - 1] = dd.add(prev_item, &keys[(pos - 1) & 1], prev_p)
        if dd.last_dup < 0:
            # Nothing is duplicated: every plan keeps its items.
            return [plan_with_items(plans[p], list(<list>plan_items[p])) for p in range(P)]
        if dd.select(P, save_to_lowest_rank, touched):
            return _dedup_python(plans, plan_items, save_to_lowest_rank)
        return _kept_plans(plans, plan_items, dd.t.ents, eid, touched)
    finally:
        free(eid)
        free(touched)


cdef list _kept_plans(tuple plans, list plan_items, const Ent* ents, const int32_t* eid,
                      const unsigned char* touched):
    """New plans holding the items dedup selected them for (eid: entry of each item)."""
    cdef list out = [], items, new_items
    cdef Py_ssize_t p, k, nitems, pos = 0
    for p in range(len(plans)):
        items = <list>plan_items[p]
        nitems = len(items)
        if not touched[p]:
            new_items = list(items)
        else:
            new_items = []
            for k in range(nitems):
                if ents[eid[pos + k]].selected == p:
                    new_items.append(items[k])
        pos += nitems
        out.append(plan_with_items(plans[p], new_items))
    return out
