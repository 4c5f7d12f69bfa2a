# C-level API of the intersection kernel, for kernels that build objects from it.
from ckcore._kernels._types cimport i64, isize


cdef struct IdxBuf:
    # A growable buffer of saved-chunk indices; free(data) when done.
    isize* data
    isize len
    isize cap


cdef enum:
    PATH_AUTO = 0
    PATH_BRUTE = 1
    PATH_GRID = 2
    PATH_TRIE = 3


cdef int intersect_pairs(const i64* loff, const i64* lsize, isize nl,
                         const i64* soff, const i64* ssize, isize ns, isize nd,
                         int path, IdxBuf* out, isize* seg) except -1 nogil

# The arrays of the pairs intersect_pairs found (seg, sidx): per pair its local
# and saved chunk (li, si) and, per dimension, torch's narrowing: the offset
# into the saved chunk (so), into the local chunk (do) and the length (ln);
# k x nd rows each, k = seg[nl].
cdef void fill_pairs(const i64* loff, const i64* lsize, const i64* soff, const i64* ssize,
                     isize nd, isize nl, const isize* seg, const isize* sidx,
                     i64* li, i64* si, i64* so, i64* do, i64* ln) noexcept nogil
