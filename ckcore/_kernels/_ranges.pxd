# C-level API of the byte-range kernel, for other kernels that walk boxes.
#
# A box inside a strided chunk is walked as a run of contiguous bytes repeated
# over an odometer of "outer" dims; _plan_walk computes that walk, _emit_ranges
# writes its [start, end) pairs sorted and merged, _copy_runs memcpys it.
# All helpers assume validated inputs (see _ranges.pyx) and cannot fail.
from ckcore._kernels._types cimport i64

cdef struct Walk:
    Py_ssize_t m          # number of outer dims (at most 64)
    i64 run               # bytes per contiguous run
    i64 nruns             # number of runs (product of outer lengths)
    i64 origin            # byte address of the box's first element

cdef void _sort_dims(Py_ssize_t* order, Py_ssize_t k, const i64* key) noexcept nogil
cdef Walk _plan_walk(const i64* strides, i64 itemsize, i64 base,
                     const i64* offsets, const i64* lengths, Py_ssize_t n,
                     Py_ssize_t* dims, i64* dlen, i64* dstride) noexcept nogil
cdef Py_ssize_t _emit_ranges(Walk w, const i64* dlen, const i64* dstride,
                             i64* out) noexcept nogil
cdef void _copy_runs(const unsigned char* src, unsigned char* dst, i64 run, Py_ssize_t m,
                     const i64* dlen, const i64* sstride, const i64* tstride,
                     i64 nruns) noexcept nogil
