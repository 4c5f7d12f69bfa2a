# Primitives every kernel shares, defined once (scikit-learn's utils/_typedefs.pxd
# and tree/_utils.pxd are the model): int64 read from a Python int, the
# int64 overflow tests and the overflow-checked volume of a box, and one
# allocation helper with one error contract (it raises MemoryError; it never
# returns NULL).
#
# Constants come from libc.stdint (INT64_MAX), never from a mutable module
# global.
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check, PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from libc.stdlib cimport realloc
from libc.string cimport memset

from ckcore._kernels._capi cimport ck_add64, ck_mul64
from ckcore._kernels._types cimport i64


cdef inline bint add_overflows(i64 a, i64 b) noexcept nogil:
    # Does a + b overflow int64? (The compiler's checked add: any signs.)
    cdef i64 r
    return ck_add64(a, b, &r)


cdef inline bint mul_overflows(i64 a, i64 b) noexcept nogil:
    # Does a * b overflow int64?
    cdef i64 r
    return ck_mul64(a, b, &r)


cdef inline bint to_i64(object v, i64* out) noexcept:
    # An exact int64 from a Python int (or int subclass): 0. 1 for anything
    # else (another type, or beyond int64), where the caller takes its own
    # careful path (operator.index, Python ints, or a message).
    cdef int ovf = 0
    if not PyLong_Check(v):
        return 1
    out[0] = PyLong_AsLongLongAndOverflow(v, &ovf)
    return ovf != 0


cdef inline object index_int(object v):
    # v as an exact Python int by __index__ (numpy integers are integers; v
    # itself when it is an exact int), or None when v is not an integer.
    # Callers take this slow path once to_i64 has said no, read the int it
    # returns with to_i64 and show that same int in their messages: __index__
    # runs once per value (a second call may return another value, or raise).
    # Exceptions of __index__ other than TypeError propagate.
    if PyLong_CheckExact(v):
        return v
    try:
        return PyNumber_Index(v)
    except TypeError:
        return None


cdef inline bint volume_overflows(const i64* sizes, Py_ssize_t nd, i64* out) noexcept nogil:
    # out = product of nd non-negative sizes; 1 when it does not fit in int64.
    # A zero size makes the volume 0 whatever came before, so an overflow is
    # only reported once every dimension has been seen.
    # Each size is read once: the arrays may be a caller's, written by
    # another thread meanwhile.
    cdef Py_ssize_t d
    cdef i64 v = 1, s
    cdef bint over = False
    for d in range(nd):
        s = sizes[d]
        if s == 0:
            out[0] = 0
            return False
        if not over and ck_mul64(v, s, &v):
            over = True
    out[0] = v
    return over


cdef inline void* safe_realloc(void* p, size_t count, size_t size) except NULL nogil:
    # realloc(p, count * size) (at least one byte), raising MemoryError when
    # the product overflows or the allocation fails; p is left valid then.
    cdef void* q
    if count == 0:
        count = 1
    if count > (<size_t>-1) // size:
        with gil:
            raise MemoryError("allocation size overflows")
    q = realloc(p, count * size)
    if q == NULL:
        with gil:
            raise MemoryError()
    return q


cdef inline void* safe_alloc(size_t count, size_t size) except NULL nogil:
    # malloc(count * size) with safe_realloc's contract.
    return safe_realloc(NULL, count, size)


cdef inline void* safe_calloc(size_t count, size_t size) except NULL nogil:
    # safe_alloc, zeroed.
    cdef void* p = safe_realloc(NULL, count, size)
    memset(p, 0, (count if count else 1) * size)
    return p
