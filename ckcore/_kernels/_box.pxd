# Shared inline helpers over boxes (offsets, sizes) stored as rows of int64.
#
# Every function here is noexcept nogil: callers validate inputs (non-negative,
# offset+size within int64) with the GIL held before entering a nogil region,
# so these helpers cannot fail.
from ckcore._kernels._types cimport i64


cdef inline bint ivl_overlap(i64 a_off, i64 a_size, i64 b_off, i64 b_size) noexcept nogil:
    # torch's per-dimension predicate (resharding._check_shard_metadata_pair_overlap):
    # separated iff a.off >= b.end or b.off >= a.end. A zero-size interval
    # strictly inside another one therefore overlaps it; one on a boundary does not.
    return a_off < b_off + b_size and b_off < a_off + a_size


cdef inline bint box_overlap(const i64* a_off, const i64* a_size,
                             const i64* b_off, const i64* b_size,
                             Py_ssize_t ndim) noexcept nogil:
    # Conjunction of the per-dimension predicate; a 0-d box overlaps everything.
    cdef Py_ssize_t d
    for d in range(ndim):
        if a_off[d] >= b_off[d] + b_size[d] or b_off[d] >= a_off[d] + a_size[d]:
            return False
    return True
