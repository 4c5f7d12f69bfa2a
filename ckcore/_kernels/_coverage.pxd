# C-level API of the coverage check (see _coverage.pyx), for kernels that
# verify reads they build themselves.
from ckcore._kernels._types cimport i64, isize


cdef enum:
    C_OK = 0
    C_VOLUME = 1       # reads hold fewer (or more) elements than the chunk
    C_OVERLAP = 2      # two reads write the same element
    C_UNDECIDED = 3    # too many reads for the pairwise check; volumes do match


# Do the reads (li sorted: local chunk of each read; doff/ln: k rows of nd)
# fill each of the nloc local chunks (lsizes) exactly once? A C_* code, -1
# for unsorted or out-of-range li; out = [local chunk, read a, read b, covered].
cdef int check_reads(const i64* li, const i64* doff, const i64* ln, isize k,
                     const i64* lsizes, isize nloc, isize nd, isize max_pairwise,
                     isize* out) noexcept nogil
