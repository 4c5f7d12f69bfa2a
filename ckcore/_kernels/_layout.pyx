"""Sharding arithmetic of DTensor layouts, for every mesh coordinate at once.

torch computes one rank's local shape and global offset per call
(``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``),
materialising index tensors for strided shards. This kernel computes the same
``(sizes, offsets)`` for all ``prod(mesh_shape)`` coordinates in one pass,
with closed-form arithmetic and no allocation in the loop.

Placements arrive encoded, one entry per mesh dimension:
``kinds[i]`` is ``KIND_REPLICATE`` (Replicate and Partial: neither moves an
offset), ``KIND_SHARD`` or ``KIND_STRIDED``; ``dims[i]`` is the tensor
dimension (non-negative) and ``split_factors[i]`` the strided shard's split
factor (ignored otherwise).

torch's semantics, reproduced exactly (see ``layout_row``):

* mesh dimensions are applied left to right; a tensor dimension sharded by
  several mesh dimensions is split again inside the previous piece;
* a ``Shard`` split is ``torch.chunk``: pieces of ``ceil(c / n)``, empty
  trailing pieces;
* a ``_StridedShard(split_factor=k)`` split first chunks the current piece
  into ``k`` parts, chunks each part into ``n``, and gives coordinate ``r``
  the concatenation of the ``r``-th sub-chunk of every part (torch's
  ``_StridedShard._split_tensor``); the held indices are no longer
  contiguous and torch reports their count as the size and the first held
  global index as the offset;
* a dimension left with no element reports the global size as its offset
  (torch's ``zero_global_offset``); a dimension no mesh dimension shards
  reports offset 0 and the full size.
"""

from libc.stdint cimport INT64_MAX
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from ckcore._kernels._types cimport i64


# Python-visible names of the placement kinds (the enum lives in _layout.pxd).
PLACEMENT_REPLICATE = KIND_REPLICATE
PLACEMENT_SHARD = KIND_SHARD
PLACEMENT_STRIDED = KIND_STRIDED


# Mesh dims beyond this are refused: DeviceMesh has a handful, and a fixed
# bound lets per-mesh-dim scratch live on the stack instead of in numpy
# allocations on every call (which dominated the one-coordinate path).
cdef enum:
    MAX_MESH_DIMS = 64


cdef struct Placements:
    # The caller's placement arrays, copied before they are checked: the
    # arithmetic runs on the values that were checked (mesh sizes and split
    # factors are divisors, mesh sizes bound the table), whatever another
    # thread writes into the caller's arrays meanwhile.
    Py_ssize_t nmesh
    i64 mesh[MAX_MESH_DIMS]
    i64 kinds[MAX_MESH_DIMS]
    i64 dims[MAX_MESH_DIMS]
    i64 sfs[MAX_MESH_DIMS]


cdef str _row_str(const i64* v, Py_ssize_t n):
    return str(tuple([v[i] for i in range(n)]))


cdef int load_placements(Py_ssize_t ndim, const i64[::1] mesh_shape,
                         const i64[::1] kinds, const i64[::1] dims,
                         const i64[::1] split_factors, Placements* p) except -1:
    # The façade (ckcore.layout) already gives friendlier messages; these
    # checks keep the kernel safe when it is called directly.
    cdef Py_ssize_t nmesh = mesh_shape.shape[0]
    cdef Py_ssize_t i
    if nmesh > MAX_MESH_DIMS:
        raise ValueError(f"mesh has {nmesh} dimensions; at most {MAX_MESH_DIMS} are supported")
    if kinds.shape[0] != nmesh or dims.shape[0] != nmesh or split_factors.shape[0] != nmesh:
        raise ValueError(
            f"placement arrays have lengths {kinds.shape[0]}, {dims.shape[0]}, "
            f"{split_factors.shape[0]}; the mesh has {nmesh} dimensions")
    p.nmesh = nmesh
    for i in range(nmesh):
        p.mesh[i] = mesh_shape[i]
        p.kinds[i] = kinds[i]
        p.dims[i] = dims[i]
        p.sfs[i] = split_factors[i]
    for i in range(nmesh):
        if p.mesh[i] < 1:
            raise ValueError(f"mesh dim {i} has size {p.mesh[i]}; mesh sizes must be >= 1")
        if p.kinds[i] != KIND_REPLICATE and p.kinds[i] != KIND_SHARD and p.kinds[i] != KIND_STRIDED:
            raise ValueError(f"mesh dim {i}: unknown placement kind {p.kinds[i]}")
        if p.kinds[i] != KIND_REPLICATE and not (0 <= p.dims[i] < ndim):
            raise ValueError(
                f"mesh dim {i} shards tensor dim {p.dims[i]}, outside [0, {ndim})")
        if p.kinds[i] == KIND_STRIDED and p.sfs[i] < 1:
            raise ValueError(
                f"mesh dim {i}: split_factor {p.sfs[i]} must be >= 1")
    return 0


cdef enum:
    SMALL_SHAPES = 64   # values of shapes copied to the caller's stack buffer


cdef i64* load_shapes(const i64* shapes, Py_ssize_t nrows, Py_ssize_t ndim,
                      bint one, i64* small) except NULL:
    # A checked copy of (nrows, ndim) sizes, for the same reason as the
    # placements: a negative size would reach a division by zero. Up to
    # SMALL_SHAPES values go to ``small`` (the one-coordinate path is a few
    # microseconds), more to a buffer the caller frees (free_shapes).
    # ``one``: a single shape, named without a row.
    cdef i64* out = small
    cdef Py_ssize_t t, d
    cdef str msg
    if nrows * ndim > SMALL_SHAPES:
        out = <i64*>malloc(<size_t>(nrows * ndim) * sizeof(i64))
        if out == NULL:
            raise MemoryError()
    if nrows * ndim:
        memcpy(out, shapes, <size_t>(nrows * ndim) * sizeof(i64))
    for t in range(nrows):
        for d in range(ndim):
            if out[t * ndim + d] < 0:
                if one:
                    msg = f"global shape has a negative size {out[d]} in dim {d}"
                else:
                    msg = (f"global shape {_row_str(out + t * ndim, ndim)} (row {t}) has a "
                           f"negative size in dim {d}")
                free_shapes(out, small)
                raise ValueError(msg)
    return out


cdef inline void free_shapes(i64* g, i64* small) noexcept:
    if g != small:
        free(g)


cdef Py_ssize_t mesh_volume(const Placements* p) except -1:
    cdef Py_ssize_t i
    cdef i64 total = 1
    for i in range(p.nmesh):
        if total > INT64_MAX // p.mesh[i]:
            raise ValueError(
                f"mesh of shape {_row_str(p.mesh, p.nmesh)} has more than 2**63 coordinates")
        total *= p.mesh[i]
    return <Py_ssize_t>total


cdef void layout_tensor(
    const i64* g, Py_ssize_t ndim,
    const i64* mesh, const i64* kinds, const i64* dims, const i64* sfs,
    Py_ssize_t nmesh, Py_ssize_t nrows, i64* table,
    i64* out_sizes, i64* out_offsets,
) noexcept nogil:
    # Every coordinate of one tensor; outputs are (nrows, ndim) row-major.
    # A tensor dim's (size, offset) depends only on the coordinates of the
    # mesh dims that shard it, so it is computed once per combination of
    # those (into ``table``, 2 * nrows entries) and then broadcast to the rows:
    # with replication or several sharded dims that is many times fewer
    # divisions than one layout_row per coordinate.
    cdef Py_ssize_t steps[MAX_MESH_DIMS]
    cdef i64 sub_coord[MAX_MESH_DIMS]
    cdef i64 stride_of[MAX_MESH_DIMS]
    cdef i64 ssize[MAX_MESH_DIMS]
    cdef i64 sstart[MAX_MESH_DIMS]
    cdef Py_ssize_t d, i, k, nsteps, row, t, combos
    cdef i64 sub
    for d in range(ndim):
        nsteps = dim_steps(d, kinds, dims, nmesh, steps)
        if nsteps == 0:
            for row in range(nrows):
                out_sizes[row * ndim + d] = g[d]
                out_offsets[row * ndim + d] = 0
            continue
        # The table, indexed row-major by the coordinates of ``steps``.
        for i in range(nmesh):
            sub_coord[i] = 0
            stride_of[i] = 0
        combos = 1
        for k in range(nsteps - 1, -1, -1):
            stride_of[steps[k]] = combos
            combos *= mesh[steps[k]]
        for t in range(combos):
            dim_layout(g[d], nsteps, steps, mesh, kinds, sfs, sub_coord,
                       ssize, sstart, &table[2 * t], &table[2 * t + 1])
            k = nsteps - 1
            while k >= 0:
                i = steps[k]
                sub_coord[i] += 1
                if sub_coord[i] < mesh[i]:
                    break
                sub_coord[i] = 0
                k -= 1
        # Broadcast: walk every coordinate in row-major order, keeping the
        # table index ``sub`` of the current one up to date.
        for i in range(nmesh):
            sub_coord[i] = 0
        sub = 0
        for row in range(nrows):
            out_sizes[row * ndim + d] = table[2 * sub]
            out_offsets[row * ndim + d] = table[2 * sub + 1]
            i = nmesh - 1
            while i >= 0:
                sub_coord[i] += 1
                sub += stride_of[i]
                if sub_coord[i] < mesh[i]:
                    break
                sub_coord[i] = 0
                sub -= stride_of[i] * mesh[i]
                i -= 1


def layout_all_many(const i64[:, ::1] shapes, const i64[::1] mesh_shape,
                    const i64[::1] kinds, const i64[::1] dims,
                    const i64[::1] split_factors):
    """Every coordinate of T tensors that share a rank (ndim) and placements.

    ``shapes`` is (T, ndim). Returns ``(sizes, offsets)``, int64 arrays of
    shape ``(T, prod(mesh_shape), ndim)``; ``[t, k]`` is tensor t at the k-th
    mesh coordinate in row-major order.
    """
    cdef Py_ssize_t ntensors = shapes.shape[0]
    cdef Py_ssize_t ndim = shapes.shape[1]
    cdef Placements p
    cdef i64 small[SMALL_SHAPES]
    cdef i64* g = NULL
    cdef Py_ssize_t nrows
    load_placements(ndim, mesh_shape, kinds, dims, split_factors, &p)
    g = load_shapes(&shapes[0, 0] if ntensors and ndim else NULL, ntensors, ndim, False, small)
    try:
        nrows = mesh_volume(&p)
        sizes_arr = np.empty((ntensors, nrows, ndim), dtype=np.int64)
        offsets_arr = np.empty((ntensors, nrows, ndim), dtype=np.int64)
        table_arr = np.empty(2 * nrows if ndim else 0, dtype=np.int64)
        if ntensors == 0 or nrows == 0 or ndim == 0:
            return sizes_arr, offsets_arr
        _layout_many(g, ntensors, ndim, &p, nrows, table_arr, sizes_arr, offsets_arr)
        return sizes_arr, offsets_arr
    finally:
        free_shapes(g, small)


cdef int _layout_many(const i64* g, Py_ssize_t ntensors, Py_ssize_t ndim, const Placements* p,
                      Py_ssize_t nrows, i64[::1] table, i64[:, :, ::1] sizes,
                      i64[:, :, ::1] offsets) except -1:
    cdef Py_ssize_t t
    with nogil:
        for t in range(ntensors):
            layout_tensor(g + t * ndim, ndim, p.mesh, p.kinds, p.dims, p.sfs, p.nmesh, nrows,
                          &table[0], &sizes[t, 0, 0], &offsets[t, 0, 0])
    return 0


def layout_all(const i64[::1] global_shape, const i64[::1] mesh_shape,
               const i64[::1] kinds, const i64[::1] dims,
               const i64[::1] split_factors):
    """Local sizes and global offsets of every mesh coordinate of one tensor.

    Returns ``(sizes, offsets)``, two int64 arrays of shape
    ``(prod(mesh_shape), len(global_shape))``, rows in row-major order of the
    mesh coordinates (rank order for a default mesh).
    """
    cdef Py_ssize_t ndim = global_shape.shape[0]
    cdef Placements p
    cdef i64* g = NULL
    cdef Py_ssize_t nrows
    cdef i64[:, ::1] sizes
    cdef i64[:, ::1] offsets
    cdef i64[::1] table
    cdef i64 small[SMALL_SHAPES]
    load_placements(ndim, mesh_shape, kinds, dims, split_factors, &p)
    g = load_shapes(&global_shape[0] if ndim else NULL, 1, ndim, True, small)
    try:
        nrows = mesh_volume(&p)
        sizes_arr = np.empty((nrows, ndim), dtype=np.int64)
        offsets_arr = np.empty((nrows, ndim), dtype=np.int64)
        table_arr = np.empty(2 * nrows if ndim else 0, dtype=np.int64)
        if nrows == 0 or ndim == 0:
            return sizes_arr, offsets_arr
        sizes = sizes_arr
        offsets = offsets_arr
        table = table_arr
        with nogil:
            layout_tensor(g, ndim, p.mesh, p.kinds, p.dims, p.sfs, p.nmesh, nrows, &table[0],
                          &sizes[0, 0], &offsets[0, 0])
        return sizes_arr, offsets_arr
    finally:
        free_shapes(g, small)


def layout_coordinate_many(const i64[:, ::1] shapes, const i64[::1] mesh_shape,
                           const i64[::1] kinds, const i64[::1] dims,
                           const i64[::1] split_factors, const i64[::1] coordinate):
    """One mesh coordinate of T tensors sharing ndim and placements: (T, ndim) sizes and offsets."""
    cdef Py_ssize_t ntensors = shapes.shape[0]
    cdef Py_ssize_t ndim = shapes.shape[1]
    cdef Py_ssize_t i, t, nmesh
    cdef Placements p
    cdef i64 coord[MAX_MESH_DIMS]
    cdef i64* g = NULL
    cdef i64[:, ::1] sizes
    cdef i64[:, ::1] offsets
    cdef i64 ssize[MAX_MESH_DIMS]
    cdef i64 sstart[MAX_MESH_DIMS]
    cdef Py_ssize_t ssteps[MAX_MESH_DIMS]
    cdef i64 small[SMALL_SHAPES]
    load_placements(ndim, mesh_shape, kinds, dims, split_factors, &p)
    nmesh = p.nmesh
    g = load_shapes(&shapes[0, 0] if ntensors and ndim else NULL, ntensors, ndim, False, small)
    try:
        if coordinate.shape[0] != nmesh:
            raise ValueError(
                f"coordinate {tuple(coordinate)} has {coordinate.shape[0]} entries; "
                f"the mesh has {nmesh} dimensions")
        for i in range(nmesh):
            coord[i] = coordinate[i]
        for i in range(nmesh):
            if not (0 <= coord[i] < p.mesh[i]):
                raise ValueError(
                    f"coordinate {_row_str(coord, nmesh)} is outside the mesh "
                    f"{_row_str(p.mesh, nmesh)}")
        sizes_arr = np.empty((ntensors, ndim), dtype=np.int64)
        offsets_arr = np.empty((ntensors, ndim), dtype=np.int64)
        sizes = sizes_arr
        offsets = offsets_arr
        if ntensors == 0 or ndim == 0:
            return sizes_arr, offsets_arr
        with nogil:
            for t in range(ntensors):
                layout_row(g + t * ndim, ndim, p.mesh, p.kinds, p.dims, p.sfs, nmesh, coord,
                           ssize, sstart, ssteps, &sizes[t, 0], &offsets[t, 0])
        return sizes_arr, offsets_arr
    finally:
        free_shapes(g, small)


def layout_coordinate(const i64[::1] global_shape, const i64[::1] mesh_shape,
                      const i64[::1] kinds, const i64[::1] dims,
                      const i64[::1] split_factors, const i64[::1] coordinate):
    """Local size and global offset of one mesh coordinate, as two int64 arrays of shape (ndim,)."""
    sizes, offsets = layout_coordinate_many(
        np.asarray(global_shape).reshape(1, -1), mesh_shape, kinds, dims, split_factors, coordinate)
    return sizes[0], offsets[0]


# Private wrappers so tests can reach the inline helpers of _layout.pxd
# directly (property tests over the whole int64 range).
def _py_chunk(i64 c, i64 n, i64 r):
    """(start, length) of torch.chunk piece r of c elements into n (test hook)."""
    if c < 0 or n < 1 or not (0 <= r < n):
        raise ValueError("need c >= 0, n >= 1, 0 <= r < n")
    cdef i64 length = 0
    cdef i64 start = chunk(c, n, r, &length)
    return start, length


def _py_strided(i64 c, i64 sf, i64 n, i64 r):
    """(count, position of the first held index or -1) of a _StridedShard split (test hook)."""
    if c < 0 or sf < 1 or n < 1 or not (0 <= r < n):
        raise ValueError("need c >= 0, sf >= 1, n >= 1, 0 <= r < n")
    cdef i64 count = strided_count(c, sf, n, r)
    if count == 0:
        return 0, -1
    return count, strided_position(c, sf, n, r, 0)
