# C-level API of the global-plan validation kernel (see _validate.pyx).
#
# Other kernels may cimport find_self_overlaps to list every overlapping pair
# of chunks of one tensor with torch's overlap predicate, and tensor_findings
# to ask whether torch's validation would report anything for one tensor.
from ckcore._kernels._types cimport i64


cdef struct PairBuf:
    # Growable array of (a, b) index pairs, stored flat: data[2*k], data[2*k+1].
    i64* data
    Py_ssize_t n
    Py_ssize_t cap


cdef int pairbuf_push(PairBuf* pb, i64 a, i64 b) except -1 nogil

cdef int find_self_overlaps(Py_ssize_t n, Py_ssize_t ndim, const i64* offs,
                            const i64* sizes, PairBuf* out) except -1 nogil

cdef int tensor_findings(Py_ssize_t n, Py_ssize_t ndim, const i64* offs, const i64* sizes,
                         const i64* tsize, bint check_fill) except -1 nogil

# Read a tuple (or torch.Size) of exactly ndim int64 values into out without
# raising; 1 when it is anything else (the caller must take the careful path).
cdef int fast_row(object seq, Py_ssize_t ndim, i64* out) noexcept
