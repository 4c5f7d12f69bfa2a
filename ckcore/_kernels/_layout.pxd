# C-level API of the layout kernel: placement kinds and the per-coordinate
# sharding arithmetic, cimportable by other kernels (e.g. a planner that
# needs one rank's box without going through Python).
#
# Every helper is noexcept nogil: callers validate (sizes >= 0, mesh sizes and
# split factors >= 1, 0 <= coordinate < mesh size) with the GIL held.
from ckcore._kernels._types cimport i64


cdef enum:
    KIND_REPLICATE = 0   # Replicate and Partial: the offset does not move
    KIND_SHARD = 1
    KIND_STRIDED = 2     # torch's _StridedShard


cdef inline i64 ceil_div(i64 a, i64 b) noexcept nogil:
    # a >= 0, b > 0; written so that a + b - 1 cannot overflow.
    return a // b + (a % b != 0)


cdef inline i64 chunk(i64 c, i64 n, i64 r, i64* length) noexcept nogil:
    # torch.chunk of c elements into n pieces of ceil(c / n): returns the
    # start of piece r and stores its length. A trailing empty piece starts
    # at c. ``r > c // f`` is ``r * f > c`` without the multiplication, so
    # nothing here overflows for any c < 2**63.
    cdef i64 f = ceil_div(c, n)
    cdef i64 start
    if f == 0 or r > c // f:
        length[0] = 0
        return c
    start = r * f
    length[0] = f if f < c - start else c - start
    return start


cdef inline i64 strided_count(i64 c, i64 sf, i64 n, i64 r) noexcept nogil:
    # Number of indices coordinate r holds after _StridedShard(sf) over n.
    # The sf first-level parts have at most two distinct non-zero lengths:
    # ``nfull`` parts of f1 and one part of ``rem`` (then empty parts), so
    # the sum over parts is closed-form instead of a loop over sf.
    cdef i64 f1 = ceil_div(c, sf)
    cdef i64 nfull, rem, a, b
    if f1 == 0:
        return 0
    nfull = c // f1
    rem = c - nfull * f1
    chunk(f1, n, r, &a)
    chunk(rem, n, r, &b)
    return nfull * a + b


cdef inline i64 strided_position(i64 c, i64 sf, i64 n, i64 r, i64 p) noexcept nogil:
    # Position, among the c indices before the split, of the p-th index that
    # coordinate r holds after it (0 <= p < strided_count(c, sf, n, r)).
    cdef i64 f1 = ceil_div(c, sf)
    cdef i64 nfull = c // f1
    cdef i64 rem = c - nfull * f1
    cdef i64 a, b, s, j
    s = chunk(f1, n, r, &a)
    if p < nfull * a:
        j = p // a
        return j * f1 + s + (p - j * a)
    p -= nfull * a
    s = chunk(rem, n, r, &b)
    return nfull * f1 + s + p


cdef inline void dim_layout(
    i64 g, Py_ssize_t nsteps, const Py_ssize_t* steps,
    const i64* mesh, const i64* kinds, const i64* sfs, const i64* coord,
    i64* scratch_size, i64* scratch_start, i64* out_size, i64* out_offset,
) noexcept nogil:
    # One tensor dim of global size g, split by the mesh dims ``steps``
    # (left to right) at coordinate ``coord`` (indexed by mesh dim). A
    # forward pass applies the splits, remembering the size before each; a
    # backward pass maps position 0 of the final piece to its global index
    # (torch's ``previous_offsets[index]`` chain, of which only the first
    # element is ever read).
    cdef Py_ssize_t i, k
    cdef i64 size = g
    cdef i64 length, p
    for k in range(nsteps):
        i = steps[k]
        scratch_size[k] = size
        if size > 0:
            if kinds[i] == KIND_SHARD:
                scratch_start[k] = chunk(size, mesh[i], coord[i], &length)
                size = length
            else:
                size = strided_count(size, sfs[i], mesh[i], coord[i])
    out_size[0] = size
    if nsteps == 0:
        out_offset[0] = 0
    elif size == 0:
        # torch's zero_global_offset: an emptied dim reports the global size.
        out_offset[0] = g
    else:
        p = 0
        for k in range(nsteps - 1, -1, -1):
            i = steps[k]
            if kinds[i] == KIND_SHARD:
                p = scratch_start[k] + p
            else:
                p = strided_position(scratch_size[k], sfs[i], mesh[i], coord[i], p)
        out_offset[0] = p


cdef inline Py_ssize_t dim_steps(
    Py_ssize_t d, const i64* kinds, const i64* dims, Py_ssize_t nmesh, Py_ssize_t* steps,
) noexcept nogil:
    # The mesh dims that shard tensor dim d, in mesh order; returns how many.
    cdef Py_ssize_t i, n = 0
    for i in range(nmesh):
        if kinds[i] != KIND_REPLICATE and dims[i] == d:
            steps[n] = i
            n += 1
    return n


cdef inline void layout_row(
    const i64* gshape, Py_ssize_t ndim,
    const i64* mesh, const i64* kinds, const i64* dims, const i64* sfs,
    Py_ssize_t nmesh, const i64* coord,
    i64* scratch_size, i64* scratch_start, Py_ssize_t* scratch_steps,
    i64* out_sizes, i64* out_offsets,
) noexcept nogil:
    # One mesh coordinate, every tensor dim. Scratch arrays hold nmesh entries.
    cdef Py_ssize_t d, nsteps
    for d in range(ndim):
        nsteps = dim_steps(d, kinds, dims, nmesh, scratch_steps)
        dim_layout(gshape[d], nsteps, scratch_steps, mesh, kinds, sfs, coord,
                   scratch_size, scratch_start, &out_sizes[d], &out_offsets[d])
