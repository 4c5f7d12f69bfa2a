# Shared C-level typedefs for every ckcore kernel.
from libc.stdint cimport int64_t, uint64_t, int32_t

ctypedef int64_t i64
ctypedef uint64_t u64
ctypedef Py_ssize_t isize
