"""Structure check of unpickled DCP metadata: the shapes are exact tuples of int64 >= 0.

ckcore.checkpoint unpickles a ``.metadata`` with an allow-list, then must
make sure what came out has the shape the planning kernels rely on. A
50k-chunk file holds some 300k shape integers; checking them with
Python-level passes (``map``/``set``/``array``) costs a third of the
unpickling itself. Here each value is one type test and one C conversion.

This module walks Python objects (lists, tuples, dataclass instances), so
unlike the numeric kernels it holds the GIL throughout; it only reads.
"""

from cpython.object cimport PyObject


cdef extern from "Python.h":
    # Borrowed-reference accessors, declared on PyObject* so the loops below
    # do no reference counting.
    bint _tuple_check_exact "PyTuple_CheckExact"(PyObject *o) noexcept
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(PyObject *o) noexcept
    PyObject *_tuple_item "PyTuple_GET_ITEM"(PyObject *o, Py_ssize_t i) noexcept
    bint _long_check_exact "PyLong_CheckExact"(PyObject *o) noexcept
    bint _unicode_check_exact "PyUnicode_CheckExact"(PyObject *o) noexcept
    # Cannot fail on an exact int: overflow is reported through the flag.
    long long _as_ll "PyLong_AsLongLongAndOverflow"(PyObject *o, int *overflow) noexcept


cdef inline bint _nonneg_i64(PyObject *v) noexcept:
    cdef int overflow = 0
    cdef long long x
    # bool is an int subclass: refused, as a shape never holds one.
    if not _long_check_exact(v):
        return False
    x = _as_ll(v, &overflow)
    return overflow == 0 and x >= 0


cdef inline bint _shape_ok(PyObject *t, Py_ssize_t ndim) noexcept:
    cdef Py_ssize_t j
    if not _tuple_check_exact(t) or _tuple_size(t) != ndim:
        return False
    for j in range(ndim):
        if not _nonneg_i64(_tuple_item(t, j)):
            return False
    return True


def shape_ok(object shape, Py_ssize_t ndim):
    """True if ``shape`` is an exact tuple of ``ndim`` ints in ``[0, 2**63)``."""
    return _shape_ok(<PyObject *>shape, ndim)


def first_bad_chunk(list chunks, type chunk_cls, Py_ssize_t ndim):
    """Index of the first chunk that is not a well-formed ``chunk_cls``, or -1.

    Well-formed: exactly of type ``chunk_cls``, with ``offsets`` and
    ``sizes`` exact tuples of ``ndim`` ints in ``[0, 2**63)``.
    """
    # Reading an attribute can run Python code (a property of chunk_cls),
    # during which the list may change. Iterating (not indexing up to a
    # length read once) checks the length at every step and holds each
    # item, at no cost: this runs over every chunk of a .metadata, where a
    # snapshot copy cost 6-10%.
    cdef Py_ssize_t i = -1
    cdef object c, offsets, sizes
    for c in chunks:
        i += 1
        if type(c) is not chunk_cls:
            return i
        # A chunk built by NEWOBJ without its BUILD has no fields.
        offsets = getattr(c, "offsets", None)
        sizes = getattr(c, "sizes", None)
        if not (_shape_ok(<PyObject *>offsets, ndim)
                and _shape_ok(<PyObject *>sizes, ndim)):
            return i
    return -1


def first_bad_storage_info(list infos, type info_cls):
    """Index of the first ``info_cls`` whose fields are malformed, or -1.

    Well-formed: ``relative_path`` an exact str, ``offset`` and ``length``
    ints in ``[0, 2**63)``. Values of other types (a custom storage
    writer's records) are skipped.
    """
    # Iterated, as in first_bad_chunk.
    cdef Py_ssize_t i = -1
    cdef object info, rp, off, length
    for info in infos:
        i += 1
        if type(info) is not info_cls:
            continue
        rp = getattr(info, "relative_path", None)
        off = getattr(info, "offset", None)
        length = getattr(info, "length", None)
        if (
            not _unicode_check_exact(<PyObject *>rp)
            or not _nonneg_i64(<PyObject *>off)
            or not _nonneg_i64(<PyObject *>length)
        ):
            return i
    return -1
