"""A keyed hash for ``MetadataIndex``, the key of every storage_data entry.

Python's hash of ints and tuples is not randomised: ``hash(x) == x`` for
small ints and a tuple's hash is an invertible mix of its items'. A
``.metadata`` can therefore hold thousands of keys whose offsets tuples all
hash alike, and building its storage_data dict then compares every new key
with all the earlier ones: quadratic time from a file of a few MB. Here the
offsets are packed as int64 and hashed as bytes, with the per-process
SipHash key Python uses for str and bytes, so no file can choose collisions.
Equal keys still hash equally: equal offsets tuples of ints pack to the
same bytes.
"""

from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

from ckcore._kernels._capi cimport ck_hash_buffer


cdef extern from "Python.h":
    bint _tuple_check "PyTuple_Check"(PyObject *o) noexcept
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(PyObject *o) noexcept
    PyObject *_tuple_item "PyTuple_GET_ITEM"(PyObject *o, Py_ssize_t i) noexcept
    bint _long_check "PyLong_Check"(PyObject *o) noexcept
    long long _as_ll "PyLong_AsLongLongAndOverflow"(PyObject *o, int *overflow) noexcept


cdef bint _pack(PyObject *t, Py_ssize_t n, int64_t *out) noexcept:
    # The items as int64, or False if one is not an int that fits.
    cdef Py_ssize_t i
    cdef int overflow
    cdef PyObject *v
    for i in range(n):
        v = _tuple_item(t, i)
        if not _long_check(v):
            return False
        overflow = 0
        out[i] = _as_ll(v, &overflow)
        if overflow:
            return False
    return True


def index_hash(str fqn, object offset):
    """Hash of a ``MetadataIndex(fqn, offset)``, keyed per process for int offsets.

    ``offset`` None or any value; a tuple whose items are all ints that fit
    in int64 is hashed as their packed bytes (SipHash with Python's
    per-process key), another non-tuple through its ``repr`` (keyed as a
    str), and only a tuple holding other items as ``hash((fqn, offset))``
    (which no checkpoint file can produce: the opcode scan admits int64
    items only).
    """
    cdef int64_t small[16]
    cdef int64_t *buf = small
    cdef Py_ssize_t n
    cdef bint packed
    cdef Py_hash_t hb = 0
    cdef uint64_t h
    if offset is None:
        return hash((fqn, None))
    if not _tuple_check(<PyObject *>offset):
        # Not a DCP offset; keyed through its text all the same.
        return hash((fqn, repr(offset)))
    n = _tuple_size(<PyObject *>offset)
    if n > 16:
        buf = <int64_t *>malloc(<size_t>n * sizeof(int64_t))
        if buf == NULL:
            raise MemoryError()
    try:
        packed = _pack(<PyObject *>offset, n, buf)
        if not packed:
            return hash((fqn, offset))
        hb = ck_hash_buffer(buf, n * <Py_ssize_t>sizeof(int64_t))
    finally:
        if buf != small:
            free(buf)
    h = <uint64_t>hash(fqn) * <uint64_t>0x9E3779B97F4A7C15 ^ <uint64_t>hb
    return hash(<int64_t>h)
