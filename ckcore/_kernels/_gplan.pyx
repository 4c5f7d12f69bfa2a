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
from libc.string cimport memcmp

from ckcore._kernels._capi cimport (
    PyObject_GenericSetAttr, PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE,
    ck_i128, ck_mix64, ck_mul64, ck_new_instance,
)
from ckcore._kernels._types cimport i64, u64


cdef int TENSOR = 0
cdef int SHARD = 1
cdef int BYTE_IO = 2

# class -> tuple of dataclass field names, or () when objects of that class
# must be copied with dataclasses.replace (slots, custom __new__, not a dataclass).
cdef dict _FIELDS = {}
# WriteItemType member (ckcore's or torch's) -> TENSOR / SHARD / BYTE_IO
cdef dict _CATS = {}


cdef type _last_cls = None
cdef tuple _last_fields = None


cdef inline tuple _fields_of(type cls):
    # Plans hold a handful of classes: a one-entry identity cache skips the dict.
    global _last_cls, _last_fields
    if cls is _last_cls:
        return _last_fields
    _last_fields = _fields_slow(cls)
    _last_cls = cls
    return _last_fields


cdef tuple _fields_slow(type cls):
    cdef object f = _FIELDS.get(cls)
    if f is None:
        f = ()
        if (dataclasses.is_dataclass(cls) and cls.__new__ is object.__new__
                and "__slots__" not in cls.__dict__
                and all(fl.init for fl in dataclasses.fields(cls))
                and getattr(cls, "__post_init__", None) is None):
            f = tuple(fl.name for fl in dataclasses.fields(cls))
        _FIELDS[cls] = f
    return <tuple>f


cdef object _replace1(object obj, str name, object value):
    """dataclasses.replace(obj, **{name: value}), without running __init__."""
    cdef type cls = type(obj)
    cdef tuple names = _fields_of(cls)
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


cdef object _replace_known(object obj, str name, object value,
                           str k1, object v1, str k2, object v2):
    """_replace1, told the current values of two more fields (no getattr for them)."""
    cdef type cls = type(obj)
    cdef tuple names = _fields_of(cls)
    cdef object new, n, v
    if not names:
        return dataclasses.replace(obj, **{name: value})
    new = ck_new_instance(cls)
    for n in names:
        if n == name:
            v = value
        elif n == k1:
            v = v1
        elif n == k2:
            v = v2
        else:
            v = getattr(obj, n)
        PyObject_GenericSetAttr(new, n, v)
    return new


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


def create_global_save_plan(list all_plans, bint rewrite_index_hints,
                            metadata_cls, tensor_md_cls, bytes_md_cls):
    """See ckcore.global_plan.create_global_save_plan (torch's create_default_global_save_plan)."""
    cdef dict md = {}
    cdef dict chunk_lists = {}
    cdef list new_plans = []
    cdef list new_items, chunks
    cdef int cat
    cdef object items, item, index, fqn, td, tmd, chunk, new_item, t
    for plan in all_plans:
        items = plan.items
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
                new_item = _replace_known(
                    item, "index",
                    _replace_known(index, "index", len(chunks), "fqn", fqn, "", None),
                    "type", t, "tensor_data", td)
            chunk = td.chunk
            if chunk is None:
                raise AssertionError(f"""
                    Cannot create MD for tensor without bounds.
                    FQN: {index.fqn}
                """)
            chunks.append(chunk)
            new_items.append(new_item)
        new_plans.append(_replace1(plan, "items", new_items))
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


cdef type _last_item_cls = None
cdef object _last_rule = None
cdef object _last_dt = None
cdef i64 _last_isz = 0


cdef int _storage_size(object item, i64* out) except -1:
    # `item.tensor_storage_size() or 1` as an int64; returns 1 if it does not
    # fit (the caller then falls back to Python ints). One-entry identity
    # caches stand in for the class and dtype lookups (a plan has a handful).
    global _last_item_cls, _last_rule, _last_dt, _last_isz
    cdef object rule
    cdef object td, v, isz
    if type(item) is _last_item_cls:
        rule = _last_rule
    else:
        rule = _size_rule(type(item))
        _last_item_cls = type(item)
        _last_rule = rule
        _last_dt = None
    cdef i64 numel = 1, x
    if rule is None:
        v = item.tensor_storage_size() or 1
        if v > 0x7FFFFFFFFFFFFFFF or v < -0x8000000000000000:
            return 1
        out[0] = v
        return 0
    td = item.tensor_data
    if td is None:
        out[0] = 1
        return 0
    for v in td.size:
        x = v
        if ck_mul64(numel, x, &numel):
            return 1
    dt = td.properties.dtype
    if dt is not _last_dt or _last_dt is None:
        isz = _ITEMSIZE.get((rule, dt))
        if isz is None:
            isz = rule(dt)
            _ITEMSIZE[(rule, dt)] = isz
        _last_isz = isz
        _last_dt = dt
    x = _last_isz
    if ck_mul64(numel, x, &numel):
        return 1
    out[0] = numel if numel != 0 else 1
    return 0


def _dedup_python(list all_plans, bint save_to_lowest_rank):
    """torch's algorithm with Python ints, ties to the lowest rank (exact-size fallback)."""
    holders = {}
    item_of = {}
    for p, plan in enumerate(all_plans):
        for item in plan.items:
            key = (item.index.fqn, item.index.offset)
            hs = holders.setdefault(key, [])
            if not hs or hs[len(hs) - 1] != p:
                hs.append(p)
            item_of[key] = item
    size = [0] * len(all_plans)
    selected = {}
    for key, hs in holders.items():
        if save_to_lowest_rank:
            c = hs[0]
        else:
            c = min(hs, key=lambda p: size[p])  # first minimum: lowest rank
        size[c] += item_of[key].tensor_storage_size() or 1
        selected[key] = c
    return [
        _replace1(plan, "items", [it for it in plan.items
                                  if selected[(it.index.fqn, it.index.offset)] == p])
        for p, plan in enumerate(all_plans)
    ]


cdef struct Ent:
    i64 fqn_id     # dense id of the index's fqn
    i64 ndim       # len(offset), -1 for offset None
    i64 pool       # where the offset's values start in the pool
    u64 hash
    i64 first      # first plan holding the entry
    i64 last       # last plan holding it (holders are visited in ascending order)
    i64 nholders
    i64 selected


cdef struct Slot:
    i64 e
    u64 hash


cdef struct Index:
    # Open-addressing table over MetadataIndex keys (fqn, offset), compared
    # by value like the dataclass's __eq__/__hash__, without building a
    # Python tuple or hashing a torch.Size per item.
    Ent* ents
    Py_ssize_t n_ent, cap_ent
    Slot* slots       # entry number (-1: empty) and its hash, so a probe
    Py_ssize_t mask   # past another key does not touch that entry's memory
    i64* pool
    Py_ssize_t n_pool, cap_pool


cdef int _index_grow_slots(Index* t) except -1:
    cdef Py_ssize_t cap = 2 * (t.mask + 1), i, h
    cdef Slot* slots = <Slot*>malloc(cap * sizeof(Slot))
    if slots == NULL:
        raise MemoryError()
    for i in range(cap):
        slots[i].e = -1
    for i in range(t.n_ent):
        h = <Py_ssize_t>(t.ents[i].hash & <u64>(cap - 1))
        while slots[h].e >= 0:
            h = (h + 1) & (cap - 1)
        slots[h].e = i
        slots[h].hash = t.ents[i].hash
    free(t.slots)
    t.slots = slots
    t.mask = cap - 1
    return 0


cdef Py_ssize_t _index_find(Index* t, i64 fid, object off, Py_ssize_t p) except -2:
    """Entry number of (fid, off), adding it (held by plan p) if new; -1 if off is
    not a tuple of int64 values (the caller falls back to Python keys)."""
    cdef Py_ssize_t nd, j, h, e
    cdef i64 v
    cdef int ovf = 0
    cdef u64 hv
    cdef i64* grown
    cdef Ent* grown_e
    cdef PyObject* item
    if off is None:
        nd = -1
    elif PyTuple_Check(off):
        nd = PyTuple_GET_SIZE(off)
    else:
        return -1
    # Values go to the pool's tail first; they stay there only for a new entry.
    if t.n_pool + nd + 1 > t.cap_pool:
        t.cap_pool = 2 * t.cap_pool + nd + 1024
        grown = <i64*>realloc(t.pool, t.cap_pool * sizeof(i64))
        if grown == NULL:
            raise MemoryError()
        t.pool = grown
    hv = ck_mix64(<u64>fid * <u64>0x9E3779B97F4A7C15 + <u64>(nd + 2))
    for j in range(nd):
        item = PyTuple_GET_ITEM(off, j)
        if not PyLong_Check(<object>item):
            return -1
        v = PyLong_AsLongLongAndOverflow(<object>item, &ovf)
        if ovf:
            return -1
        t.pool[t.n_pool + j] = v
        hv = ck_mix64(hv ^ <u64>v)
    h = <Py_ssize_t>(hv & <u64>t.mask)
    while True:
        e = t.slots[h].e
        if e < 0:
            break
        if (t.slots[h].hash == hv and t.ents[e].fqn_id == fid and t.ents[e].ndim == nd
                and (nd <= 0 or memcmp(t.pool + t.ents[e].pool, t.pool + t.n_pool,
                                       nd * sizeof(i64)) == 0)):
            return e
        h = (h + 1) & t.mask
    if t.n_ent == t.cap_ent:
        t.cap_ent = 2 * t.cap_ent + 1024
        grown_e = <Ent*>realloc(t.ents, t.cap_ent * sizeof(Ent))
        if grown_e == NULL:
            raise MemoryError()
        t.ents = grown_e
    e = t.n_ent
    t.ents[e].fqn_id = fid
    t.ents[e].ndim = nd
    t.ents[e].pool = t.n_pool
    t.ents[e].hash = hv
    t.ents[e].first = p
    t.ents[e].last = p
    t.ents[e].nholders = 1
    t.ents[e].selected = p
    if nd > 0:
        t.n_pool += nd
    t.slots[h].e = e
    t.slots[h].hash = hv
    t.n_ent += 1
    if 2 * t.n_ent > t.mask + 1:
        _index_grow_slots(t)
    return e


def dedup_save_plans(list all_plans, bint save_to_lowest_rank):
    """See ckcore.global_plan.dedup_save_plans (torch's dedup_save_plans)."""
    cdef Py_ssize_t P = len(all_plans), p, k, nitems, total = 0, pos, e, i
    cdef Py_ssize_t last_dup = -1
    cdef dict fqn_ids = {}
    cdef dict dups = {}
    cdef list ent_item = []
    cdef list plan_items = []
    cdef list hs, new_items, items
    cdef Index t
    cdef Ent* ents
    cdef i64* eid = NULL
    cdef i64* start = NULL
    cdef ck_i128* plan_size = NULL
    cdef unsigned char* touched = NULL
    cdef i64 sz, c, h, fid
    cdef object idx, got, fqn
    t.ents = NULL
    t.n_ent = 0
    t.cap_ent = 0
    t.pool = NULL
    t.n_pool = 0
    t.cap_pool = 0
    t.mask = 1023
    t.slots = <Slot*>malloc(1024 * sizeof(Slot))
    if t.slots == NULL:
        raise MemoryError()
    for i in range(1024):
        t.slots[i].e = -1
    try:
        for p in range(P):
            items = all_plans[p].items
            if type(items) is not list:
                items = list(items)
            plan_items.append(items)
            total += len(items)
        eid = <i64*>malloc((total + 1) * sizeof(i64))
        start = <i64*>malloc((P + 1) * sizeof(i64))
        touched = <unsigned char*>calloc(P + 1, 1)
        if eid == NULL or start == NULL or touched == NULL:
            raise MemoryError()
        pos = 0
        for p in range(P):
            start[p] = pos
            items = <list>plan_items[p]
            for item in items:
                idx = item.index
                fqn = idx.fqn
                got = fqn_ids.get(fqn)
                if got is None:
                    fid = len(fqn_ids)
                    fqn_ids[fqn] = fid
                else:
                    fid = <i64>got
                e = _index_find(&t, fid, idx.offset, p)
                if e < 0:
                    # An offset that is not a tuple of int64 values: torch's own
                    # keys, with Python ints.
                    return _dedup_python(all_plans, save_to_lowest_rank)
                ents = t.ents
                if e == len(ent_item):
                    ent_item.append(item)
                else:
                    # torch maps each index to the last item seen with it.
                    ent_item[e] = item
                    if ents[e].last != p:
                        if ents[e].nholders == 1:
                            dups[e] = [ents[e].first, p]
                        else:
                            (<list>dups[e]).append(p)
                        ents[e].nholders += 1
                        ents[e].last = p
                        if e > last_dup:
                            last_dup = e
                eid[pos] = e
                pos += 1
        start[P] = pos
        ents = t.ents
        if last_dup < 0:
            # Nothing is duplicated: every plan keeps its items.
            return [_replace1(all_plans[p], "items", list(<list>plan_items[p])) for p in range(P)]
        plan_size = <ck_i128*>calloc(P + 1, sizeof(ck_i128))
        if plan_size == NULL:
            raise MemoryError()
        # Only plans holding some duplicated item ever have their planned
        # size compared ("touched"), and only up to the last duplicated entry:
        # the sizes of every other entry are never computed.
        for hs in dups.values():
            for k in range(len(hs)):
                touched[<i64>hs[k]] = 1
        for e in range(last_dup + 1):
            if ents[e].nholders == 1:
                if not save_to_lowest_rank and touched[ents[e].first]:
                    if _storage_size(ent_item[e], &sz):
                        return _dedup_python(all_plans, save_to_lowest_rank)
                    plan_size[ents[e].first] += sz
                continue
            hs = <list>dups[e]
            c = hs[0]
            if not save_to_lowest_rank:
                if _storage_size(ent_item[e], &sz):
                    return _dedup_python(all_plans, save_to_lowest_rank)
                for k in range(1, len(hs)):
                    h = hs[k]
                    if plan_size[h] < plan_size[c]:
                        c = h
                plan_size[c] += sz
            ents[e].selected = c
        out = []
        for p in range(P):
            items = <list>plan_items[p]
            if not touched[p]:
                new_items = list(items)
            else:
                new_items = []
                nitems = len(items)
                for k in range(nitems):
                    if ents[eid[start[p] + k]].selected == p:
                        new_items.append(items[k])
            out.append(_replace1(all_plans[p], "items", new_items))
        return out
    finally:
        free(t.ents)
        free(t.slots)
        free(t.pool)
        free(eid)
        free(start)
        free(plan_size)
        free(touched)
