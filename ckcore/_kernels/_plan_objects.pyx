"""Plan-object plumbing shared by the global save-plan kernels.

``create_default_global_save_plan`` and ``dedup_save_plans`` in torch spend
their time on Python objects, ``dataclasses.replace`` above all (it runs
``__init__`` and, for torch's ``MetadataIndex``, rebuilds a ``torch.Size``).
Here new objects are made with ``type(old)`` and the old field values set
directly; the category of an item's type and the index-hint ints are cached.
Used by :mod:`_save_plan`, :mod:`_dedup` and :mod:`_fused_plan`.
"""

import dataclasses
import sys

from ckcore._kernels._capi cimport PyObject_GenericSetAttr, ck_new_instance

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


cdef object plan_with_items(object plan, list items):
    """dataclasses.replace(plan, items=items), without running __init__."""
    cdef type cls = type(plan)
    cdef tuple names = _PLAN_FIELDS.of(cls)
    cdef object new, n
    if not names:
        return dataclasses.replace(plan, items=items)
    new = ck_new_instance(cls)
    for n in names:
        if n is F_ITEMS:
            PyObject_GenericSetAttr(new, n, items)
        else:
            PyObject_GenericSetAttr(new, n, getattr(plan, n))
    return new


cdef object _replace_known(object obj, tuple names, str name, object value,
                           str k1, object v1, str k2, object v2):
    """dataclasses.replace(obj, **{name: value}) with obj's field names given,
    and told the current values of two more fields (no getattr for them).

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


cdef object item_with_hint(object item, object idx, object fqn, object off, object t,
                           object td, object hint):
    """replace(item, index=replace(item.index, index=hint)), its other fields known
    (idx is item.index, fqn and off its fields, t and td the item's type and
    tensor_data)."""
    cdef object new_idx = _replace_known(idx, _INDEX_FIELDS.of(type(idx)), F_INDEX, hint,
                                         F_FQN, fqn, F_OFFSET, off)
    return _replace_known(item, _ITEM_FIELDS.of(type(item)), F_INDEX, new_idx,
                          F_TYPE, t, F_TENSOR_DATA, td)


cdef class HintInts:
    """Python ints 0..n-1, made once: index hints repeat across fqns (position
    k of every fqn's chunk list), and ints past 256 are not cached by Python."""

    def __cinit__(self):
        self.ints = []

    cdef object get(self, Py_ssize_t k):
        cdef Py_ssize_t i
        if k >= len(self.ints):
            for i in range(len(self.ints), 2 * k + 256):
                self.ints.append(i)
        return self.ints[k]


cdef object _last_t = None
cdef int _last_cat = -1


cdef int item_category(object t) except -1:
    """TENSOR, SHARD or BYTE_IO for a WriteItemType member; TypeError otherwise."""
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
