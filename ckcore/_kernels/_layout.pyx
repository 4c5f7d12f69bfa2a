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

import numpy as np

from ckcore._kernels._types cimport i64

cdef i64 I64_MAX = 0x7FFFFFFFFFFFFFFF

# Python-visible names of the placement kinds (the enum lives in _layout.pxd).
PLACEMENT_REPLICATE = KIND_REPLICATE
PLACEMENT_SHARD = KIND_SHARD
PLACEMENT_STRIDED = KIND_STRIDED


cdef int check_layout(const i64[::1] global_shape, const i64[::1] mesh_shape,
                      const i64[::1] kinds, const i64[::1] dims,
                      const i64[::1] split_factors) except -1:
    # The façade (ckcore.layout) already gives friendlier messages; these
    # checks keep the kernel safe when it is called directly.
    cdef Py_ssize_t ndim = global_shape.shape[0]
    cdef Py_ssize_t nmesh = mesh_shape.shape[0]
    cdef Py_ssize_t i
    if kinds.shape[0] != nmesh or dims.shape[0] != nmesh or split_factors.shape[0] != nmesh:
        raise ValueError(
            f"placement arrays have lengths {kinds.shape[0]}, {dims.shape[0]}, "
            f"{split_factors.shape[0]}; the mesh has {nmesh} dimensions")
    for i in range(ndim):
        if global_shape[i] < 0:
            raise ValueError(f"global shape has a negative size {global_shape[i]} in dim {i}")
    for i in range(nmesh):
        if mesh_shape[i] < 1:
            raise ValueError(f"mesh dim {i} has size {mesh_shape[i]}; mesh sizes must be >= 1")
        if kinds[i] != KIND_REPLICATE and kinds[i] != KIND_SHARD and kinds[i] != KIND_STRIDED:
            raise ValueError(f"mesh dim {i}: unknown placement kind {kinds[i]}")
        if kinds[i] != KIND_REPLICATE and not (0 <= dims[i] < ndim):
            raise ValueError(
                f"mesh dim {i} shards tensor dim {dims[i]}, outside [0, {ndim})")
        if kinds[i] == KIND_STRIDED and split_factors[i] < 1:
            raise ValueError(
                f"mesh dim {i}: split_factor {split_factors[i]} must be >= 1")
    return 0


cdef Py_ssize_t mesh_volume(const i64[::1] mesh_shape) except -1:
    cdef Py_ssize_t i
    cdef i64 total = 1
    for i in range(mesh_shape.shape[0]):
        if total > I64_MAX // mesh_shape[i]:
            raise ValueError(f"mesh of shape {tuple(mesh_shape)} has more than 2**63 coordinates")
        total *= mesh_shape[i]
    return <Py_ssize_t>total


def layout_all(const i64[::1] global_shape, const i64[::1] mesh_shape,
               const i64[::1] kinds, const i64[::1] dims,
               const i64[::1] split_factors):
    """Local sizes and global offsets of every mesh coordinate.

    Returns ``(sizes, offsets)``, two int64 arrays of shape
    ``(prod(mesh_shape), len(global_shape))``, rows in row-major order of the
    mesh coordinates (rank order for a default mesh).
    """
    check_layout(global_shape, mesh_shape, kinds, dims, split_factors)
    cdef Py_ssize_t ndim = global_shape.shape[0]
    cdef Py_ssize_t nmesh = mesh_shape.shape[0]
    cdef Py_ssize_t nrows = mesh_volume(mesh_shape)
    sizes_arr = np.empty((nrows, ndim), dtype=np.int64)
    offsets_arr = np.empty((nrows, ndim), dtype=np.int64)
    # Scratch: the odometer coordinate plus the per-step state of layout_row.
    coord_arr = np.zeros(nmesh + 1, dtype=np.int64)
    size_arr = np.empty(nmesh + 1, dtype=np.int64)
    start_arr = np.empty(nmesh + 1, dtype=np.int64)
    dim_arr = np.empty(nmesh + 1, dtype=np.intp)
    cdef i64[:, ::1] sizes = sizes_arr
    cdef i64[:, ::1] offsets = offsets_arr
    cdef i64[::1] coord = coord_arr
    cdef i64[::1] ssize = size_arr
    cdef i64[::1] sstart = start_arr
    cdef Py_ssize_t[::1] sdim = dim_arr
    cdef Py_ssize_t row, i
    if nrows == 0 or ndim == 0:
        return sizes_arr, offsets_arr
    with nogil:
        for row in range(nrows):
            layout_row(&global_shape[0], ndim, &mesh_shape[0] if nmesh else NULL,
                       &kinds[0] if nmesh else NULL, &dims[0] if nmesh else NULL,
                       &split_factors[0] if nmesh else NULL, nmesh, &coord[0],
                       &ssize[0], &sstart[0], &sdim[0],
                       &sizes[row, 0], &offsets[row, 0])
            # Row-major odometer: the last mesh dimension moves fastest.
            i = nmesh - 1
            while i >= 0:
                coord[i] += 1
                if coord[i] < mesh_shape[i]:
                    break
                coord[i] = 0
                i -= 1
    return sizes_arr, offsets_arr


def layout_coordinate(const i64[::1] global_shape, const i64[::1] mesh_shape,
                      const i64[::1] kinds, const i64[::1] dims,
                      const i64[::1] split_factors, const i64[::1] coordinate):
    """Local size and global offset of one mesh coordinate, as two int64 arrays of shape (ndim,)."""
    check_layout(global_shape, mesh_shape, kinds, dims, split_factors)
    cdef Py_ssize_t ndim = global_shape.shape[0]
    cdef Py_ssize_t nmesh = mesh_shape.shape[0]
    cdef Py_ssize_t i
    if coordinate.shape[0] != nmesh:
        raise ValueError(
            f"coordinate {tuple(coordinate)} has {coordinate.shape[0]} entries; "
            f"the mesh has {nmesh} dimensions")
    for i in range(nmesh):
        if not (0 <= coordinate[i] < mesh_shape[i]):
            raise ValueError(
                f"coordinate {tuple(coordinate)} is outside the mesh {tuple(mesh_shape)}")
    sizes_arr = np.empty(ndim, dtype=np.int64)
    offsets_arr = np.empty(ndim, dtype=np.int64)
    size_arr = np.empty(nmesh + 1, dtype=np.int64)
    start_arr = np.empty(nmesh + 1, dtype=np.int64)
    dim_arr = np.empty(nmesh + 1, dtype=np.intp)
    cdef i64[::1] sizes = sizes_arr
    cdef i64[::1] offsets = offsets_arr
    cdef i64[::1] ssize = size_arr
    cdef i64[::1] sstart = start_arr
    cdef Py_ssize_t[::1] sdim = dim_arr
    if ndim == 0:
        return sizes_arr, offsets_arr
    with nogil:
        layout_row(&global_shape[0], ndim, &mesh_shape[0] if nmesh else NULL,
                   &kinds[0] if nmesh else NULL, &dims[0] if nmesh else NULL,
                   &split_factors[0] if nmesh else NULL, nmesh,
                   &coordinate[0] if nmesh else NULL,
                   &ssize[0], &sstart[0], &sdim[0], &sizes[0], &offsets[0])
    return sizes_arr, offsets_arr
