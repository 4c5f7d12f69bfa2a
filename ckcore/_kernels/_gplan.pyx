"""Object plumbing of rank 0's global save planning, compiled.

``create_default_global_save_plan`` and ``dedup_save_plans`` in torch spend
their time on Python objects: hashing ``MetadataIndex`` dataclasses,
``dataclasses.replace`` (which runs ``__init__`` and, for torch's
``MetadataIndex``, rebuilds a ``torch.Size``) and ``tensor_storage_size``
calls, ~700 000 times at 1024 ranks. These loops do the same work with C
bookkeeping: index keys are ``(fqn, offset)`` tuples (what the dataclass
hashes and compares), new objects are made with ``type(old)`` and the old
field values set directly, and storage sizes are computed from the dtype's
item size once per dtype. Façade: :mod:`ckcore.global_plan`.
"""

import dataclasses
import sys

from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.ref cimport PyObject
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.stdint cimport int32_t, uint32_t
from libc.string cimport memcmp

from ckcore._kernels._capi cimport (
    PyObject_GenericSetAttr, PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE,
    ck_add64, ck_i128, ck_malloc_big, ck_mix64, ck_mul64, ck_new_instance,
)
from ckcore._kernels._types cimport i64, u64
from ckcore._kernels._validate cimport fast_row, tensor_findings


cdef int TENSOR = 0
cdef int SHARD = 1
cdef int BYTE_IO = 2

# Field names, interned: class field names are interned too (_fields_slow),
# so _replace_known can compare names by identity.
cdef str F_INDEX = sys.intern("index")
cdef str F_FQN = sys.intern("fqn")
cdef str F_OFFSET = sys.intern("offset")
cdef str F_TYPE = sys.intern("type")
cdef str F_TENSOR_DATA = sys.intern("tensor_data")
cdef str F_ITEMS = sys.intern("items")

# class -> tuple of dataclass field names, or () when objects of that class
# must be copied with dataclasses.replace (slots, custom __new__, not a dataclass).
cdef dict _FIELDS = {}
# WriteItemType member (ckcore's or torch's) -> TENSOR / SHARD / BYTE_IO
cdef dict _CATS = {}


cdef class _LastFields:
    """A one-entry identity cache of _fields_slow: plans hold a handful of
    classes, so the last one asked for is almost always asked for again."""
    cdef type cls
    cdef tuple fields

    cdef inline tuple of(self, type cls):
        if cls is not self.cls:
            self.fields = _fields_slow(cls)
            self.cls = cls
        return self.fields


# Plans, items and index objects alternate when items are rewritten: one
# cache each, as a shared entry would miss on every call.
cdef _LastFields _PLAN_FIELDS = _LastFields()
cdef _LastFields _ITEM_FIELDS = _LastFields()
cdef _LastFields _INDEX_FIELDS = _LastFields()


cdef tuple _fields_slow(type cls):
    cdef object f = _FIELDS.get(cls)
    if f is None:
        f = ()
        if (dataclasses.is_dataclass(cls) and cls.__new__ is object.__new__
                and "__slots__" not in cls.__dict__
                and all(fl.init for fl in dataclasses.fields(cls))
                and getattr(cls, "__post_init__", None) is None):
            f = tuple(sys.intern(fl.name) for fl in dataclasses.fields(cls))
        _FIELDS[cls] = f
    return <tuple>f


cdef object _replace1(object obj, str name, object value):
    """dataclasses.replace(plan, **{name: value}) for a plan obj, without running __init__."""
    cdef type cls = type(obj)
    cdef tuple names = _PLAN_FIELDS.of(cls)
    cdef object new, n
    if not names:
        return dataclasses.replace(obj, **{name: value})
    new = ck_new_instance(cls)
    for n in names:
        if n == name:
            PyObject_GenericSetAttr(new, n, value)
        else:
            PyObject_GenericSetAttr(new, n, getattr(obj, n))
    return new


cdef object _replace_known(object obj, tuple names, str name, object value,
                           str k1, object v1, str k2, object v2):
    """_replace1 with obj's field names given, and told the current values of
    two more fields (no getattr for them).

    The names must be interned (the F_* constants): fields are matched by
    identity, which for interned strings is equality.
    """
    cdef object new, n, v
    if not names:
        return dataclasses.replace(obj, **{name: value})
    new = ck_new_instance(type(obj))
    for n in names:
        if n is name:
            v = value
        elif n is k1:
            v = v1
        elif n is k2:
            v = v2
        else:
            v = getattr(obj, n)
        PyObject_GenericSetAttr(new, n, v)
    return new


cdef inline object _rewritten(object item, object idx, object fqn, object off, object t,
                              object td, object hint):
    """replace(item, index=replace(item.index, index=hint)), its other fields known."""
    cdef object new_idx = _replace_known(idx, _INDEX_FIELDS.of(type(idx)), F_INDEX, hint,
                                         F_FQN, fqn, F_OFFSET, off)
    return _replace_known(item, _ITEM_FIELDS.of(type(item)), F_INDEX, new_idx,
                          F_TYPE, t, F_TENSOR_DATA, td)


cdef class _Ints:
    """Python ints 0..n-1, made once: index hints repeat across fqns (position
    k of every fqn's chunk list), and ints past 256 are not cached by Python."""
    cdef list ints

    def __cinit__(self):
        self.ints = []

    cdef inline object get(self, Py_ssize_t k):
        cdef Py_ssize_t i
        if k >= len(self.ints):
            for i in range(len(self.ints), 2 * k + 256):
                self.ints.append(i)
        return self.ints[k]


cdef object _last_t = None
cdef int _last_cat = -1


cdef inline int _category(object t) except -1:
    # Enum members hash through a Python-level __hash__: compare by identity
    # with the last member seen first (items of a plan mostly share a type).
    global _last_t, _last_cat
    if t is _last_t:
        return _last_cat
    _last_cat = _category_slow(t)
    _last_t = t
    return _last_cat


cdef int _category_slow(object t) except -1:
    cdef object c = _CATS.get(t)
    if c is None:
        name = getattr(t, "name", None)
        if name == "TENSOR":
            c = TENSOR
        elif name == "SHARD":
            c = SHARD
        elif name == "BYTE_IO":
            c = BYTE_IO
        else:
            raise TypeError(f"unknown write item type {t!r}")
        _CATS[t] = c
    return <int>c


def create_global_save_plan(all_plans, bint rewrite_index_hints,
                            metadata_cls, tensor_md_cls, bytes_md_cls):
    """See ckcore.global_plan.create_global_save_plan (torch's create_default_global_save_plan)."""
    cdef dict md = {}
    cdef dict chunk_lists = {}
    cdef list new_plans = []
    cdef list new_items, chunks
    cdef int cat
    cdef object items, item, index, fqn, td, tmd, chunk, new_item, t
    cdef _Ints hints = _Ints()
    # Snapshots of the plan list and of each item list: another thread (or
    # Python code run by an attribute read) may change the caller's lists.
    for plan in tuple(all_plans):
        items = tuple(plan.items)
        new_items = []
        for item in items:
            t = item.type
            cat = _category(t)
            index = item.index
            fqn = index.fqn
            if cat != SHARD:
                if fqn in md:
                    raise AssertionError("item.index.fqn not in md")
            if cat == BYTE_IO:
                md[fqn] = bytes_md_cls()
                chunk_lists.pop(fqn, None)
                new_items.append(item)
                continue
            td = item.tensor_data
            if td is None:
                raise AssertionError("item.tensor_data is not None")
            chunks = chunk_lists.get(fqn)
            if chunks is None:
                tmd = md.get(fqn)
                if tmd is None:
                    tmd = tensor_md_cls(properties=td.properties, size=td.size, chunks=[])
                    md[fqn] = tmd
                # A bytes entry has no .chunks: the same AttributeError as torch.
                chunks = tmd.chunks
                chunk_lists[fqn] = chunks
            new_item = item
            if rewrite_index_hints:
                new_item = _rewritten(item, index, fqn, index.offset, t, td, hints.get(len(chunks)))
            chunk = td.chunk
            if chunk is None:
                raise AssertionError(f"""
                    Cannot create MD for tensor without bounds.
                    FQN: {index.fqn}
                """)
            chunks.append(chunk)
            new_items.append(new_item)
        new_plans.append(_replace1(plan, F_ITEMS, new_items))
    return new_plans, metadata_cls(md)


# ------------------------------------------------------------------- dedup

# item class -> function(dtype) -> itemsize, or None when the class's own
# tensor_storage_size must be called.
cdef dict _SIZE_RULE = {}
cdef dict _ITEMSIZE = {}


cdef object _size_rule(type cls):
    if cls in _SIZE_RULE:
        return _SIZE_RULE[cls]
    rule = None
    m = getattr(cls, "tensor_storage_size", None)
    if m is not None and getattr(m, "__qualname__", "") == "WriteItem.tensor_storage_size":
        mod = getattr(m, "__module__", "")
        if mod == "ckcore.planner":
            from ckcore.dtypes import itemsize
            rule = itemsize
        elif mod == "torch.distributed.checkpoint.planner":
            rule = sys.modules["torch"]._utils._element_size
    _SIZE_RULE[cls] = rule
    return rule


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


cdef inline int _as_i64(object v, i64* out) noexcept:
    # An exact int64 from a Python int; 1 for anything else (another type, or
    # beyond int64), where the caller must use Python ints instead.
    cdef int ovf = 0
    if not PyLong_Check(v):
        return 1
    out[0] = PyLong_AsLongLongAndOverflow(v, &ovf)
    return 1 if ovf else 0


cdef int _storage_size(object item, i64* out) except -1:
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
        rule = _size_rule(type(item))
        new = _LastSize()
        new.cls = type(item)
        new.rule = rule
        _LAST_SIZE = last = new
    if rule is None:
        v = item.tensor_storage_size() or 1
        return _as_i64(v, out)
    td = item.tensor_data
    if td is None:
        out[0] = 1
        return 0
    for v in td.size:
        if _as_i64(v, &x) or ck_mul64(numel, x, &numel):
            return 1
    dt = td.properties.dtype
    if dt is not last.dt or last.dt is None:
        isz = _ITEMSIZE.get((rule, dt))
        if isz is None:
            isz = rule(dt)
            _ITEMSIZE[(rule, dt)] = isz
        if _as_i64(isz, &x):
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
    from ``_item_lists``), so both passes below see the same items.
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
        _replace1(plans[p], "items", [it for it in <list>plan_items[p]
                                      if selected[(it.index.fqn, it.index.offset)] == p])
        for p in range(len(plans))
    ]


cdef struct Ent:
    # 40 bytes: plan numbers, fqn ids and entry numbers stay below 2**31
    # (entries are capped there; plans by global_save_plan/dedup_save_plans).
    u64 hash
    i64 pool       # where the offset's values start in the pool
    int32_t fqn_id     # dense id of the index's fqn
    int32_t ndim       # len(offset), -1 for offset None
    int32_t first      # first plan holding the entry
    int32_t last       # last plan holding it (holders are visited in ascending order)
    int32_t nholders
    int32_t selected


cdef struct Slot:
    # 8 bytes, so a probe touches one cache line: the entry number (-1:
    # empty) and the hash's high half, so a probe past another key does not
    # touch that entry's memory.
    int32_t e
    uint32_t tag


cdef struct Key:
    # A hashed key waiting for its probe; its offset values lie at
    # t.pool[at:at + nd], at or past the pool's tail (t.n_pool).
    i64 fid
    Py_ssize_t nd
    u64 hash
    Py_ssize_t at


cdef struct Index:
    # Open-addressing table over MetadataIndex keys (fqn, offset), compared
    # by value like the dataclass's __eq__/__hash__, without building a
    # Python tuple or hashing a torch.Size per item.
    Ent* ents
    Py_ssize_t n_ent, cap_ent
    Slot* slots
    Py_ssize_t mask
    i64* pool
    Py_ssize_t n_pool, cap_pool


cdef extern from *:
    """
    #define ck_prefetch(p) __builtin_prefetch((const void*)(p), 1, 3)
    """
    void ck_prefetch(const void* p) noexcept nogil


cdef int _index_init(Index* t, Py_ssize_t expected) except -1:
    """An empty table sized for `expected` keys at load <= 1/2: no rehash on the way."""
    cdef Py_ssize_t cap = 1024, i
    while cap < 2 * expected:
        cap *= 2
    t.slots = <Slot*>ck_malloc_big(cap * sizeof(Slot))
    if t.slots == NULL:
        raise MemoryError()
    for i in range(cap):
        t.slots[i].e = -1
    t.mask = cap - 1
    return 0


cdef int _index_grow_slots(Index* t) except -1:
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


cdef int _index_key(Index* t, i64 fid, object off, Key* key, Py_ssize_t at) except -1:
    """Hash (fid, off) into key, its values to t.pool[at:], and prefetch its
    slot. ``at`` is the pool's tail, or just past the values of a key hashed
    before and not yet probed. Returns 1 if off is not a tuple of int64
    values (the caller falls back to Python keys), else 0."""
    cdef Py_ssize_t nd, j
    cdef i64 v
    cdef int ovf = 0
    cdef u64 hv
    cdef i64* grown
    cdef PyObject* item
    if off is None:
        nd = -1
    elif PyTuple_Check(off):
        nd = PyTuple_GET_SIZE(off)
        if nd > 0x7FFFFFFF:
            return 1
    else:
        return 1
    if at + nd + 1 > t.cap_pool:
        t.cap_pool = 2 * t.cap_pool + nd + 1024
        grown = <i64*>realloc(t.pool, t.cap_pool * sizeof(i64))
        if grown == NULL:
            raise MemoryError()
        t.pool = grown
    hv = ck_mix64(<u64>fid * <u64>0x9E3779B97F4A7C15 + <u64>(nd + 2))
    for j in range(nd):
        item = PyTuple_GET_ITEM(off, j)
        if not PyLong_Check(<object>item):
            return 1
        v = PyLong_AsLongLongAndOverflow(<object>item, &ovf)
        if ovf:
            return 1
        t.pool[at + j] = v
        hv = ck_mix64(hv ^ <u64>v)
    key.fid = fid
    key.nd = nd
    key.hash = hv
    key.at = at
    ck_prefetch(&t.slots[hv & <u64>t.mask])
    return 0


cdef Py_ssize_t _index_probe(Index* t, const Key* key, Py_ssize_t p) except -1:
    """Entry number of a hashed key, adding it (held by plan p) if new.

    Keys are probed in the order they were hashed."""
    cdef Py_ssize_t h, e, nd = key.nd
    cdef u64 hv = key.hash
    cdef uint32_t tag = <uint32_t>(hv >> 32)
    cdef Ent* grown_e
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
        t.cap_ent = 2 * t.cap_ent + 1024
        grown_e = <Ent*>realloc(t.ents, t.cap_ent * sizeof(Ent))
        if grown_e == NULL:
            raise MemoryError()
        t.ents = grown_e
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


cdef class _Dedup:
    """torch's dedup bookkeeping: which plans hold each index, and which one keeps it.

    ``key`` then ``add`` are called for every item, plan by plan (work may
    go between the two while the key's slot is prefetched); entries are the
    distinct ``(fqn, offset)`` keys in first-seen order. ``select`` then gives every
    entry held by more than one plan its keeper with torch's rule. An entry's
    ``selected`` plan is its only holder otherwise.
    """
    cdef Index t
    cdef dict fqn_ids     # fqn -> dense id
    cdef list fqns        # dense id -> fqn
    cdef dict dups        # entry -> [plans holding it], for entries held by 2+ plans
    cdef list ent_item    # entry -> last item seen with that index (torch keeps the last)
    cdef Py_ssize_t last_dup

    def __cinit__(self, Py_ssize_t expected):
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

    def __dealloc__(self):
        free(self.t.ents)
        free(self.t.slots)
        free(self.t.pool)

    cdef inline i64 fid(self, object fqn) except -1:
        cdef object got = self.fqn_ids.get(fqn)
        cdef i64 f
        if got is not None:
            return <i64>got
        f = len(self.fqns)
        self.fqn_ids[fqn] = f
        self.fqns.append(fqn)
        return f

    cdef inline int key(self, i64 fid, object off, Key* key, const Key* pending) except -1:
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
        plan_size = <ck_i128*>calloc(P + 1, sizeof(ck_i128))
        if plan_size == NULL:
            raise MemoryError()
        try:
            for e in range(self.last_dup + 1):
                if ents[e].nholders == 1:
                    if not save_to_lowest_rank and touched[ents[e].first]:
                        if _storage_size(self.ent_item[e], &sz):
                            return 1
                        plan_size[ents[e].first] += sz
                    continue
                hs = <list>self.dups[e]
                c = hs[0]
                if not save_to_lowest_rank:
                    if _storage_size(self.ent_item[e], &sz):
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


cdef list _item_lists(tuple plans, Py_ssize_t* total):
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


def dedup_save_plans(all_plans, bint save_to_lowest_rank):
    """See ckcore.global_plan.dedup_save_plans (torch's dedup_save_plans)."""
    # The plans and their item lists are read once, into snapshots this call owns.
    cdef tuple plans = tuple(all_plans)
    cdef Py_ssize_t P = len(plans), p, k, nitems, total, pos
    cdef list plan_items = _item_lists(plans, &total)
    cdef _Dedup dd = _Dedup(total)
    cdef Key keys[2]
    cdef Py_ssize_t prev_p = 0
    cdef object prev_item = None
    cdef list new_items, items
    cdef int32_t* eid = NULL
    cdef unsigned char* touched = NULL
    cdef object idx
    cdef Ent* ents
    try:
        eid = <int32_t*>malloc((total + 1) * sizeof(int32_t))
        touched = <unsigned char*>calloc(P + 1, 1)
        if eid == NULL or touched == NULL:
            raise MemoryError()
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
            return [_replace1(plans[p], F_ITEMS, list(<list>plan_items[p])) for p in range(P)]
        if dd.select(P, save_to_lowest_rank, touched):
            return _dedup_python(plans, plan_items, save_to_lowest_rank)
        ents = dd.t.ents
        out = []
        pos = 0
        for p in range(P):
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
            out.append(_replace1(plans[p], F_ITEMS, new_items))
        return out
    finally:
        free(eid)
        free(touched)


# --------------------------------------------------- dedup + plan + validation

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
    cdef Py_ssize_t cap
    cdef i64* grown
    if b.n + k > b.cap or b.data == NULL:
        cap = 2 * b.cap + k + 1024
        grown = <i64*>realloc(b.data, cap * sizeof(i64))
        if grown == NULL:
            raise MemoryError()
        b.data = grown
        b.cap = cap
    return b.data + b.n


cdef Fq* _fq_room(Fq** fq, Py_ssize_t* cap, Py_ssize_t n) except NULL:
    cdef Fq* grown
    if n == cap[0]:
        cap[0] = 2 * cap[0] + 256
        grown = <Fq*>realloc(fq[0], cap[0] * sizeof(Fq))
        if grown == NULL:
            raise MemoryError()
        fq[0] = grown
    return fq[0] + n


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


def global_save_plan(all_plans, bint dedup, bint save_to_lowest_rank,
                     bint rewrite_index_hints, metadata_cls, tensor_md_cls, bytes_md_cls):
    """dedup_save_plans, create_global_save_plan and validation's checks in one pass.

    Each item is read once, in plan order (the order its objects lie in
    memory): its index goes to the dedup table, its chunk to its fqn's
    metadata, its rewritten copy is made with a provisional index hint, and
    its chunk's offsets and sizes are kept as int64 rows. Dedup then picks
    keepers; only fqns that lost an item to it are redone (metadata from the
    first surviving item, chunks and hints renumbered). Validation runs on
    the rows, each tensor's rows gathered in plan order, with the GIL
    released.

    Returns ``(plans, metadata, careful)``: ``careful`` is the set of fqns
    whose validation must run the exact way in Python (a finding to report,
    bytes entries, values that are not int64 rows, fqns redone by dedup).
    Returns None when the plans need the step-by-step path, which raises
    torch's errors or handles them exactly: an fqn mixing item types or with
    two surviving non-shard items, a tensor item without tensor data or
    chunk, an index offset that is not int64 values, a planned size past
    int64.
    """
    # The plans and their item lists are read once, into snapshots this call owns.
    cdef tuple plans = tuple(all_plans)
    cdef Py_ssize_t P = len(plans), total, p, k, n, pos, e, fid, nfq = 0, cap_fq = 0
    cdef Py_ssize_t j, nd, m, maxn = 0
    cdef int cat
    cdef bint multi = P > 1, any_rebuilt = False
    cdef list plan_items = _item_lists(plans, &total)
    cdef _Dedup dd = _Dedup(total if dedup else 0)
    cdef Key key
    cdef list new_lists = [], tmds = [], chunk_lists = [], items, new_list, fqns
    cdef object item, idx, t, fqn, off, td, chunk, tmd, chunks
    cdef dict md
    cdef set careful = set()
    cdef _Ints hints = _Ints()
    cdef Fq* fq = NULL
    cdef Fq* f
    cdef Ent* ents
    cdef int32_t* eid = NULL
    cdef i64* pfid = NULL
    cdef i64* prow = NULL
    cdef i64* perm = NULL
    cdef i64* at = NULL
    cdef i64* scratch = NULL
    cdef unsigned char* touched = NULL
    cdef unsigned char* lost = NULL
    cdef I64Buf rows, tsz
    rows.data = NULL
    rows.n = rows.cap = 0
    tsz.data = NULL
    tsz.n = tsz.cap = 0
    try:
        eid = <int32_t*>malloc((total + 1) * sizeof(int32_t))
        pfid = <i64*>malloc((total + 1) * sizeof(i64))
        prow = <i64*>malloc((total + 1) * sizeof(i64))
        touched = <unsigned char*>calloc(P + 1, 1)
        lost = <unsigned char*>calloc(P + 1, 1)
        if eid == NULL or pfid == NULL or prow == NULL or touched == NULL or lost == NULL:
            raise MemoryError()
        _i64buf_room(&rows, 4 * total)

        # ---- one pass over every item, in plan order
        pos = 0
        for p in range(P):
            items = <list>plan_items[p]
            n = len(items)
            new_list = [None] * n
            new_lists.append(new_list)
            for k in range(n):
                item = items[k]
                idx = item.index
                t = item.type
                cat = _category(t)
                fqn = idx.fqn
                fid = dd.fid(fqn)
                if fid == nfq:
                    f = _fq_room(&fq, &cap_fq, nfq)
                    f.cat = cat
                    f.careful = cat == BYTE_IO
                    f.rebuilt = False
                    f.ent = -1
                    f.n_items = 0
                    f.n_chunks = 0
                    f.ndim = -1
                    f.tsize_at = -1
                    f.first = pos
                    tmds.append(None)
                    chunk_lists.append(None)
                    nfq += 1
                f = &fq[fid]
                if f.cat != cat:
                    return None
                off = idx.offset
                # The slot is prefetched now and probed once the item is built.
                if dedup and dd.key(fid, off, &key, NULL):
                    return None
                pfid[pos] = fid
                prow[pos] = -1
                f.n_items += 1
                if cat == BYTE_IO:
                    new_list[k] = item
                else:
                    td = item.tensor_data
                    if td is None:
                        return None
                    chunk = td.chunk
                    if chunk is None:
                        return None
                    if f.n_chunks == 0:
                        tmd = tensor_md_cls(properties=td.properties, size=td.size, chunks=[])
                        tmds[fid] = tmd
                        chunk_lists[fid] = chunks = tmd.chunks
                        _first_size(f, td.size, &tsz)
                    else:
                        chunks = chunk_lists[fid]
                    chunks.append(chunk)
                    if rewrite_index_hints:
                        new_list[k] = _rewritten(item, idx, fqn, off, t, td, hints.get(f.n_chunks))
                    else:
                        new_list[k] = item
                    f.n_chunks += 1
                    if not f.careful and f.ndim > 0:
                        if _read_rows(chunk, f.ndim, &rows):
                            f.careful = True
                        else:
                            prow[pos] = rows.n - 2 * f.ndim
                e = dd.add(item, &key, p) if dedup else 0
                eid[pos] = e
                if cat != SHARD:
                    if f.ent < 0:
                        f.ent = e
                    elif f.ent != e:
                        return None
                pos += 1

        # ---- dedup: keepers, and which plans and fqns lose items
        ents = dd.t.ents
        for fid in range(nfq):
            f = &fq[fid]
            # A non-shard fqn must end with one item, or torch raises.
            if f.cat != SHARD and f.n_items != (ents[f.ent].nholders if dedup else 1):
                return None
        if dedup and dd.last_dup >= 0:
            if dd.select(P, save_to_lowest_rank, touched):
                return None
            pos = 0
            for p in range(P):
                n = len(<list>plan_items[p])
                if touched[p]:
                    for k in range(pos, pos + n):
                        if ents[eid[k]].selected != p:
                            lost[p] = 1
                            fq[pfid[k]].rebuilt = True
                            any_rebuilt = True
                pos += n
        if any_rebuilt:
            _redo_lost(fq, nfq, plan_items, new_lists, tmds, chunk_lists, ents, eid, pfid,
                       rewrite_index_hints, tensor_md_cls, hints)

        # ---- metadata, in the order of each fqn's first surviving item
        fqns = dd.fqns
        order = range(nfq)
        if any_rebuilt:
            order = sorted(order, key=lambda i: fq[<Py_ssize_t>i].first)
        md = {}
        for fid in order:
            md[fqns[fid]] = bytes_md_cls() if fq[fid].cat == BYTE_IO else tmds[fid]

        out = []
        pos = 0
        for p in range(P):
            new_list = <list>new_lists[p]
            n = len(new_list)
            if lost[p]:
                new_list = [new_list[k] for k in range(n) if ents[eid[pos + k]].selected == p]
            pos += n
            out.append(_replace1(plans[p], F_ITEMS, new_list))

        # ---- validation on the rows: each tensor's rows in plan order
        perm = <i64*>malloc((total + 1) * sizeof(i64))
        at = <i64*>calloc(nfq + 1, sizeof(i64))
        if perm == NULL or at == NULL:
            raise MemoryError()
        for fid in range(nfq):
            f = &fq[fid]
            if f.careful or f.rebuilt or f.ndim <= 0:
                f.careful = f.careful or f.rebuilt
                continue
            at[fid + 1] = f.n_chunks
            if f.n_chunks * f.ndim > maxn:
                maxn = f.n_chunks * f.ndim
        scratch = <i64*>malloc((2 * maxn + 1) * sizeof(i64))
        if scratch == NULL:
            raise MemoryError()
        with nogil:
            for fid in range(nfq):
                at[fid + 1] += at[fid]
            for pos in range(total):
                if prow[pos] >= 0:
                    fid = pfid[pos]
                    if not fq[fid].careful:
                        perm[at[fid]] = prow[pos]
                        at[fid] += 1
            for fid in range(nfq):
                f = &fq[fid]
                if f.careful or f.ndim <= 0:
                    continue
                nd = f.ndim
                m = f.n_chunks
                # at[fid] is now the end of the fqn's rows in perm.
                for k in range(m):
                    for j in range(nd):
                        scratch[k * nd + j] = rows.data[perm[at[fid] - m + k] + j]
                        scratch[maxn + k * nd + j] = rows.data[perm[at[fid] - m + k] + nd + j]
                if tensor_findings(m, nd, scratch, scratch + maxn, tsz.data + f.tsize_at, multi):
                    f.careful = True
        for fid in range(nfq):
            if fq[fid].careful:
                careful.add(fqns[fid])
        return out, metadata_cls(md), careful
    finally:
        free(eid)
        free(pfid)
        free(prow)
        free(perm)
        free(at)
        free(scratch)
        free(touched)
        free(lost)
        free(fq)
        free(rows.data)
        free(tsz.data)


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


cdef int _redo_lost(Fq* fq, Py_ssize_t nfq, list plan_items, list new_lists, list tmds,
                    list chunk_lists, Ent* ents, int32_t* eid, i64* pfid,
                    bint rewrite_index_hints, object tensor_md_cls, _Ints hints) except -1:
    """Redo the fqns that dedup took items from, over their surviving items.

    Their metadata comes from the first surviving item, their chunk lists and
    index hints count surviving items only (rare: replicated tensors, the
    empty trailing shards of uneven splits).
    """
    cdef Py_ssize_t fid, p, k, n, pos = 0
    cdef Fq* f
    cdef list items, new_list
    cdef object item, idx, td, tmd
    for fid in range(nfq):
        f = &fq[fid]
        if f.rebuilt:
            f.n_chunks = 0
            f.first = -1
    for p in range(len(plan_items)):
        items = <list>plan_items[p]
        new_list = <list>new_lists[p]
        n = len(items)
        for k in range(n):
            f = &fq[pfid[pos]]
            if f.rebuilt and ents[eid[pos]].selected == p:
                if f.first < 0:
                    f.first = pos
                if f.cat != BYTE_IO:
                    item = items[k]
                    td = item.tensor_data
                    if f.n_chunks == 0:
                        tmd = tensor_md_cls(properties=td.properties, size=td.size, chunks=[])
                        tmds[pfid[pos]] = tmd
                        chunk_lists[pfid[pos]] = tmd.chunks
                    chunk_lists[pfid[pos]].append(td.chunk)
                    if rewrite_index_hints:
                        idx = item.index
                        new_list[k] = _rewritten(item, idx, idx.fqn, idx.offset, item.type, td,
                                                 hints.get(f.n_chunks))
                    f.n_chunks += 1
            pos += 1
    return 0
