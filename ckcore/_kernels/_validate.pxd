# C-level API of the global-plan validation kernel (see _validate.pyx).
#
# Other kernels may cimport find_self_overlaps to list every overlapping pair
# of chunks of one tensor with torch's overlap predicate, and tensor_findings
# to ask whether torch's validation would report anything for one tensor.
from ckcore._kernels._types cimport i64


cdef struct PairBuf:
    # Growable array of (a, b) index pairs, stored flat: data[2*k], data[2*k+1].
    # Set up with pairbuf_init. A search keeps the first `keep` pairs it finds
    # (all when keep < 0), counts every pair in `found`, and ends once
    # `found` reaches `stop` (never when stop < 0), so a caller that only
    # reports a few pairs (or only asks whether there is one) does not pay
    # memory, or time, for the millions a crafted layout can hold. `budget`
    # caps the sweep's box comparisons (unlimited when < 0; pairbuf_init sets
    # -1): layouts no dimension can split (none that DCP writes) cost up to
    # n^2 comparisons even without a single overlap. A search that runs out
    # sets `exhausted` and ends.
    i64* data
    Py_ssize_t n
    Py_ssize_t cap
    Py_ssize_t keep
    Py_ssize_t found
    Py_ssize_t stop
    Py_ssize_t budget
    bint exhausted


cdef void pairbuf_init(PairBuf* pb, Py_ssize_t keep, Py_ssize_t stop) noexcept nogil

# Record the pair (a, b); 1 once pb.stop pairs are found (the search must end).
cdef int pairbuf_push(PairBuf* pb, i64 a, i64 b) except -1 nogil

# 1 when the search ended early, at pb.stop pairs or out of pb.budget
# (pb.found is then a lower bound), else 0 (pb.found is exact).
cdef int find_self_overlaps(Py_ssize_t n, Py_ssize_t ndim, const i64* offs,
                            const i64* sizes, PairBuf* out) except -1 nogil

cdef int tensor_findings(Py_ssize_t n, Py_ssize_t ndim, const i64* offs, const i64* sizes,
                         const i64* tsize, bint check_fill) except -1 nogil

# Read a tuple (or torch.Size) of exactly ndim int64 values into out without
# raising; 1 when it is anything else (the caller must take the careful path).
cdef int fast_row(object seq, Py_ssize_t ndim, i64* out) noexcept
