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
