"""Byte ranges of a box inside a strided chunk, range coalescing, n-d box copy,
and reading runs of a file straight into a buffer.

A DCP reader that wants only part of a saved chunk must know which bytes of
the file hold that part (byte_ranges), how to turn thousands of small ranges
into a few reads without reading much more than needed (coalesce), which of
them are contiguous in the destination too (paired_runs), how to issue the
reads without a Python-level loop per run (read_runs: one preadv per block,
with WILLNEED prefetch), and how to move elements from a read buffer into
the destination tensor otherwise (copy_box).
Strides are explicit everywhere because torch.save keeps the strides of a
non-contiguous tensor: a transposed chunk is stored column-major on disk.

Layout of every entry point: a def that validates with the GIL held and
raises the ValueError a user should see, a `with nogil:` block, and
noexcept nogil helpers over raw pointers.
"""

from libc.stdint cimport INT64_MAX
from libc.stdlib cimport malloc, free, qsort
from libc.string cimport memcpy, memset
from posix.types cimport off_t
from posix.uio cimport iovec, preadv

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    /* posix_fadvise is Linux/BSD; elsewhere prefetch hints are a no-op. */
    static int ck_willneed(int fd, long long off, long long len) {
    #if defined(POSIX_FADV_WILLNEED)
        return posix_fadvise(fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
    #else
        (void)fd; (void)off; (void)len; return 0;
    #endif
    }
    static int ck_errno(void) { return errno; }
    static int ck_eintr(int e) { return e == EINTR; }
    """
    int ck_willneed(int fd, long long off, long long length) nogil
    int ck_errno() nogil
    bint ck_eintr(int e) nogil

import numpy as np

from ckcore._kernels._types cimport i64
from ckcore._kernels._util cimport add_overflows, mul_overflows, safe_alloc


# ---------------------------------------------------------------- validation


cdef i64 _checked_extent(str what, const i64[::1] shape, const i64[::1] strides,
                         i64 itemsize, i64 base) except -1:
    # One past the last byte a chunk of `shape`/`strides` may touch, relative to
    # the buffer start: base + itemsize * (sum((shape_d - 1) * stride_d) + 1).
    # Returns base for an empty chunk. Raises on overflow.
    cdef Py_ssize_t d, n = shape.shape[0]
    cdef i64 last = 0, term
    for d in range(n):
        if shape[d] == 0:
            return base
    for d in range(n):
        if shape[d] > 1:
            if mul_overflows(shape[d] - 1, strides[d]):
                raise ValueError(f"{what}: (shape[{d}] - 1) * stride[{d}] overflows int64")
            term = (shape[d] - 1) * strides[d]
            if add_overflows(last, term):
                raise ValueError(f"{what}: chunk extent overflows int64")
            last += term
    if add_overflows(last, 1) or mul_overflows(last + 1, itemsize) or \
            add_overflows(base, (last + 1) * itemsize):
        raise ValueError(f"{what}: chunk extent in bytes overflows int64")
    return base + (last + 1) * itemsize


cdef int _check_layout(str what, const i64[::1] shape, const i64[::1] strides,
                       i64 itemsize, i64 base, const i64[::1] offsets,
                       const i64[::1] lengths) except -1:
    cdef Py_ssize_t d, n = shape.shape[0]
    if strides.shape[0] != n or offsets.shape[0] != n or lengths.shape[0] != n:
        raise ValueError(
            f"{what}: shape, strides, offsets and lengths must have the same length, "
            f"got {n}, {strides.shape[0]}, {offsets.shape[0]}, {lengths.shape[0]}")
    if itemsize <= 0:
        raise ValueError(f"{what}: itemsize must be positive, got {itemsize}")
    if base < 0:
        raise ValueError(f"{what}: base offset must be non-negative, got {base}")
    for d in range(n):
        if shape[d] < 0 or strides[d] < 0 or offsets[d] < 0 or lengths[d] < 0:
            raise ValueError(
                f"{what}: negative value in dim {d}: shape={shape[d]} stride={strides[d]} "
                f"offset={offsets[d]} length={lengths[d]}")
        if add_overflows(offsets[d], lengths[d]) or offsets[d] + lengths[d] > shape[d]:
            raise ValueError(
                f"{what}: box outside the chunk in dim {d}: offset {offsets[d]} + length "
                f"{lengths[d]} > size {shape[d]}")
    _checked_extent(what, shape, strides, itemsize, base)
    return 0


cdef i64 _box_numel(str what, const i64[::1] lengths) except -1:
    cdef Py_ssize_t d
    cdef i64 numel = 1
    for d in range(lengths.shape[0]):
        if mul_overflows(numel, lengths[d]):
            raise ValueError(f"{what}: box volume overflows int64")
        numel *= lengths[d]
    return numel


# ---------------------------------------------------------------- runs of a box

# A box is walked as an odometer over its "outer" dims (those that are not
# merged into the contiguous run), in descending stride order, so that on a
# non-overlapping layout the runs come out sorted by address.
# (struct Walk is declared in _ranges.pxd.)


cdef void _sort_dims(Py_ssize_t* order, Py_ssize_t k, const i64* key) noexcept nogil:
    # Insertion sort of dim indices by key descending (ndim is small); stable,
    # so equal strides keep their logical order.
    cdef Py_ssize_t i, j, t
    for i in range(1, k):
        t = order[i]
        j = i
        while j > 0 and key[order[j - 1]] < key[t]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = t


cdef Walk _plan_walk(const i64* strides, i64 itemsize, i64 base,
                     const i64* offsets, const i64* lengths, Py_ssize_t n,
                     Py_ssize_t* dims, i64* dlen, i64* dstride) noexcept nogil:
    # Fills dims/dlen/dstride[0:m] with the outer dims (outermost first) and
    # returns the run length. Dims of length 1 only shift the origin.
    cdef Walk w
    cdef Py_ssize_t d, k = 0, i
    w.origin = base
    for d in range(n):
        w.origin += offsets[d] * strides[d] * itemsize
        if lengths[d] > 1:
            dims[k] = d
            k += 1
    _sort_dims(dims, k, strides)
    w.run = itemsize
    # Merge from the innermost (smallest stride) outward while each dim steps
    # exactly one run: then the run grows to cover the whole dim.
    while k > 0 and strides[dims[k - 1]] * itemsize == w.run:
        w.run *= lengths[dims[k - 1]]
        k -= 1
    w.m = k
    w.nruns = 1
    for i in range(k):
        dlen[i] = lengths[dims[i]]
        dstride[i] = strides[dims[i]] * itemsize
        w.nruns *= dlen[i]
    return w


cdef int _cmp_pair(const void* a, const void* b) noexcept nogil:
    cdef const i64* x = <const i64*>a
    cdef const i64* y = <const i64*>b
    if x[0] < y[0]:
        return -1
    if x[0] > y[0]:
        return 1
    return (x[1] > y[1]) - (x[1] < y[1])


cdef Py_ssize_t _emit_ranges(Walk w, const i64* dlen, const i64* dstride,
                             i64* out) noexcept nogil:
    # Writes the runs as [start, end) pairs, sorts them if the layout made them
    # come out of order (overlapping or zero strides), and merges overlapping
    # or adjacent pairs in place. Returns the number of merged pairs.
    cdef i64 idx[64]
    cdef Py_ssize_t i, k, m = w.m
    cdef i64 addr = w.origin, r
    cdef bint sorted_ = True
    for i in range(m):
        idx[i] = 0
    for r in range(w.nruns):
        out[2 * r] = addr
        out[2 * r + 1] = addr + w.run
        if r > 0 and addr < out[2 * r - 2]:
            sorted_ = False
        # odometer step, innermost outer dim first
        i = m - 1
        while i >= 0:
            idx[i] += 1
            addr += dstride[i]
            if idx[i] < dlen[i]:
                break
            addr -= dstride[i] * dlen[i]
            idx[i] = 0
            i -= 1
    if not sorted_:
        qsort(out, <size_t>w.nruns, 2 * sizeof(i64), _cmp_pair)
    k = 0
    for r in range(1, w.nruns):
        if out[2 * r] <= out[2 * k + 1]:
            if out[2 * r + 1] > out[2 * k + 1]:
                out[2 * k + 1] = out[2 * r + 1]
        else:
            k += 1
            out[2 * k] = out[2 * r]
            out[2 * k + 1] = out[2 * r + 1]
    return k + 1 if w.nruns > 0 else 0


cdef Py_ssize_t _checked_ndim(str what, const i64[::1] shape, const i64[::1] strides,
                              i64 itemsize, i64 base, const i64[::1] offsets,
                              const i64[::1] lengths) except -1:
    # The checks every box entry point makes first; the walk's scratch arrays
    # are fixed at 64 dimensions.
    _check_layout(what, shape, strides, itemsize, base, offsets, lengths)
    cdef Py_ssize_t n = shape.shape[0]
    if n > 64:
        raise ValueError(f"{what}: at most 64 dims are supported, got {n}")
    return n


def box_runs(const i64[::1] shape, const i64[::1] strides, i64 itemsize, i64 base,
             const i64[::1] offsets, const i64[::1] lengths):
    """(number of runs, bytes per run, first byte) of a box before merging.

    Cheap (O(ndim)): lets a caller size its work before asking for the ranges.
    An empty box has zero runs.
    """
    cdef Py_ssize_t n = _checked_ndim("box_runs", shape, strides, itemsize, base, offsets,
                                      lengths)
    cdef Py_ssize_t dims[64]
    cdef i64 dlen[64]
    cdef i64 dstride[64]
    if _box_numel("box_runs", lengths) == 0:
        return 0, 0, base
    cdef Walk w = _plan_walk(&strides[0] if n else NULL, itemsize, base,
                             &offsets[0] if n else NULL, &lengths[0] if n else NULL,
                             n, dims, dlen, dstride)
    return w.nruns, w.run, w.origin


def byte_ranges(const i64[::1] shape, const i64[::1] strides, i64 itemsize, i64 base,
                const i64[::1] offsets, const i64[::1] lengths):
    """Sorted, maximally merged ``[start, end)`` byte ranges holding exactly a box.

    The chunk has ``shape`` and element ``strides`` and starts at byte ``base``;
    the box is ``offsets``/``lengths`` in chunk coordinates. Returns an (K, 2)
    int64 array; K == 0 for an empty box.
    """
    cdef Py_ssize_t n = _checked_ndim("byte_ranges", shape, strides, itemsize, base, offsets,
                                      lengths)
    cdef Py_ssize_t dims[64]
    cdef i64 dlen[64]
    cdef i64 dstride[64]
    cdef i64 numel = _box_numel("byte_ranges", lengths)
    if numel == 0:
        return np.empty((0, 2), dtype=np.int64)
    cdef Walk w = _plan_walk(&strides[0] if n else NULL, itemsize, base,
                             &offsets[0] if n else NULL, &lengths[0] if n else NULL,
                             n, dims, dlen, dstride)
    out = np.empty((w.nruns, 2), dtype=np.int64)
    cdef i64[:, ::1] o = out
    cdef Py_ssize_t k
    with nogil:
        k = _emit_ranges(w, dlen, dstride, &o[0, 0])
    return out[:k].copy() if k < w.nruns else out


# ---------------------------------------------------------------- coalescing

cdef struct Gap:
    i64 size
    i64 index


cdef int _cmp_gap(const void* a, const void* b) noexcept nogil:
    cdef const Gap* x = <const Gap*>a
    cdef const Gap* y = <const Gap*>b
    if x.size != y.size:
        return -1 if x.size < y.size else 1
    return -1 if x.index < y.index else (1 if x.index > y.index else 0)


def coalesce(const i64[:, ::1] ranges, i64 max_gap, double max_overread):
    """Merge sorted byte ranges across gaps of at most ``max_gap`` bytes.

    Gaps are filled smallest first (which merges the most ranges for a given
    over-read) while ``bytes read / bytes needed`` stays at most
    ``max_overread``. Input ranges must be sorted and non-overlapping
    (touching is fine). Returns an (M, 2) int64 array, M <= K.
    """
    cdef Py_ssize_t K = ranges.shape[0], i, ngap = 0, m
    if ranges.shape[1] != 2:
        raise ValueError(f"coalesce: ranges must have shape (K, 2), got (K, {ranges.shape[1]})")
    if max_gap < 0:
        raise ValueError(f"coalesce: max_gap must be non-negative, got {max_gap}")
    if not (max_overread >= 1.0):
        raise ValueError(f"coalesce: max_overread must be >= 1.0, got {max_overread}")
    cdef i64 needed = 0
    for i in range(K):
        if ranges[i, 0] < 0 or ranges[i, 1] < ranges[i, 0]:
            raise ValueError(f"coalesce: range {i} is invalid: [{ranges[i, 0]}, {ranges[i, 1]})")
        if i > 0 and ranges[i, 0] < ranges[i - 1, 1]:
            raise ValueError(
                f"coalesce: ranges must be sorted and non-overlapping; range {i} "
                f"[{ranges[i, 0]}, {ranges[i, 1]}) starts before the end of range {i - 1} "
                f"[{ranges[i - 1, 0]}, {ranges[i - 1, 1]})")
        if add_overflows(needed, ranges[i, 1] - ranges[i, 0]):
            raise ValueError("coalesce: total length overflows int64")
        needed += ranges[i, 1] - ranges[i, 0]
    out = np.empty((K, 2), dtype=np.int64)
    if K == 0:
        return out
    cdef i64[:, ::1] o = out
    # Budget of gap bytes; a double keeps (max_overread - 1) * needed exact
    # enough and the clamp keeps it inside int64.
    cdef double fb = (max_overread - 1.0) * <double>needed
    cdef i64 budget = INT64_MAX if fb >= 9.2e18 else <i64>fb
    cdef Gap* gaps = <Gap*>malloc((K if K > 0 else 1) * sizeof(Gap))
    cdef unsigned char* fill = <unsigned char*>malloc(K if K > 0 else 1)
    if gaps == NULL or fill == NULL:
        free(gaps)
        free(fill)
        raise MemoryError()
    try:
        with nogil:
            for i in range(K):
                fill[i] = 0
            for i in range(K - 1):
                if ranges[i + 1, 0] - ranges[i, 1] <= max_gap:
                    gaps[ngap].size = ranges[i + 1, 0] - ranges[i, 1]
                    gaps[ngap].index = i
                    ngap += 1
            qsort(gaps, <size_t>ngap, sizeof(Gap), _cmp_gap)
            for i in range(ngap):
                if gaps[i].size > budget:
                    break
                budget -= gaps[i].size
                fill[gaps[i].index] = 1
            m = 0
            o[0, 0] = ranges[0, 0]
            o[0, 1] = ranges[0, 1]
            for i in range(1, K):
                if fill[i - 1]:
                    o[m, 1] = ranges[i, 1]
                else:
                    m += 1
                    o[m, 0] = ranges[i, 0]
                    o[m, 1] = ranges[i, 1]
    finally:
        free(gaps)
        free(fill)
    return out[:m + 1].copy() if m + 1 < K else out


# ---------------------------------------------------------------- box copy


cdef i64 _box_last(const i64[::1] strides, i64 itemsize, i64 base,
                   const i64[::1] offsets, const i64[::1] lengths):
    # One past the last byte a non-empty box touches (inputs already validated,
    # and bounded by the chunk extent, so this cannot overflow).
    cdef Py_ssize_t d
    cdef i64 last = 0
    for d in range(strides.shape[0]):
        last += (offsets[d] + lengths[d] - 1) * strides[d]
    return base + (last + 1) * itemsize


cdef inline void _odometer_step(i64* idx, Py_ssize_t m, const i64* dlen,
                                const i64* sstride, const i64* tstride,
                                i64* so, i64* do) noexcept nogil:
    # Advance the outer-dimension counter of a run walk by one run, moving the
    # source and destination byte offsets with it (last dimension fastest).
    cdef Py_ssize_t i = m - 1
    while i >= 0:
        idx[i] += 1
        so[0] += sstride[i]
        do[0] += tstride[i]
        if idx[i] < dlen[i]:
            return
        so[0] -= sstride[i] * dlen[i]
        do[0] -= tstride[i] * dlen[i]
        idx[i] = 0
        i -= 1


cdef void _copy_runs(const unsigned char* src, unsigned char* dst, i64 run, Py_ssize_t m,
                     const i64* dlen, const i64* sstride, const i64* tstride,
                     i64 nruns) noexcept nogil:
    cdef i64 idx[64]
    cdef Py_ssize_t i
    cdef i64 _r, so = 0, do = 0
    for i in range(m):
        idx[i] = 0
    for _r in range(nruns):
        memcpy(dst + do, src + so, <size_t>run)
        _odometer_step(idx, m, dlen, sstride, tstride, &so, &do)


cdef i64 _paired_walk(const i64[::1] src_strides, i64 src_base, const i64[::1] src_offsets,
                      const i64[::1] dst_strides, i64 dst_base, const i64[::1] dst_offsets,
                      const i64[::1] lengths, i64 itemsize, Py_ssize_t* m,
                      i64* dlen, i64* sstride, i64* tstride, i64* so, i64* do,
                      i64* nruns) noexcept nogil:
    # The walk of a box copied between two strided chunks: outer dims in source
    # address order, and a run merged only while it is contiguous in both.
    # Returns the run length in bytes; fills the outer dims and start addresses.
    cdef Py_ssize_t dims[64]
    cdef Py_ssize_t d, k = 0, n = lengths.shape[0]
    cdef i64 run = itemsize
    so[0] = src_base
    do[0] = dst_base
    for d in range(n):
        so[0] += src_offsets[d] * src_strides[d] * itemsize
        do[0] += dst_offsets[d] * dst_strides[d] * itemsize
        if lengths[d] > 1:
            dims[k] = d
            k += 1
    _sort_dims(dims, k, &src_strides[0] if n else NULL)
    while k > 0 and src_strides[dims[k - 1]] * itemsize == run and \
            dst_strides[dims[k - 1]] * itemsize == run:
        run *= lengths[dims[k - 1]]
        k -= 1
    nruns[0] = 1
    for d in range(k):
        dlen[d] = lengths[dims[d]]
        sstride[d] = src_strides[dims[d]] * itemsize
        tstride[d] = dst_strides[dims[d]] * itemsize
        nruns[0] *= dlen[d]
    m[0] = k
    return run


cdef int _check_pair(str what, const i64[::1] src_shape, const i64[::1] src_strides,
                     i64 src_base, const i64[::1] src_offsets, const i64[::1] dst_shape,
                     const i64[::1] dst_strides, i64 dst_base, const i64[::1] dst_offsets,
                     const i64[::1] lengths, i64 itemsize) except -1:
    _check_layout(what + " source", src_shape, src_strides, itemsize, src_base,
                  src_offsets, lengths)
    _check_layout(what + " destination", dst_shape, dst_strides, itemsize, dst_base,
                  dst_offsets, lengths)
    if lengths.shape[0] > 64:
        raise ValueError(f"{what}: at most 64 dims are supported, got {lengths.shape[0]}")
    return 0


def paired_runs(const i64[::1] src_shape, const i64[::1] src_strides, i64 src_base,
                const i64[::1] src_offsets, const i64[::1] dst_shape,
                const i64[::1] dst_strides, i64 dst_base, const i64[::1] dst_offsets,
                const i64[::1] lengths, i64 itemsize):
    """Runs contiguous in both chunks as an (K, 3) int64 array ``[src, dst, nbytes]``.

    Rows are sorted by source address; every row has the same ``nbytes``. A
    reader uses this to read each source run straight into its destination.
    """
    _check_pair("paired_runs", src_shape, src_strides, src_base, src_offsets,
                dst_shape, dst_strides, dst_base, dst_offsets, lengths, itemsize)
    if _box_numel("paired_runs", lengths) == 0:
        return np.empty((0, 3), dtype=np.int64)
    cdef Py_ssize_t m, i
    cdef i64 dlen[64]
    cdef i64 sstride[64]
    cdef i64 tstride[64]
    cdef i64 idx[64]
    cdef i64 so, do, nruns, run, r
    cdef bint sorted_ = True
    run = _paired_walk(src_strides, src_base, src_offsets, dst_strides, dst_base,
                       dst_offsets, lengths, itemsize, &m, dlen, sstride, tstride,
                       &so, &do, &nruns)
    out = np.empty((nruns, 3), dtype=np.int64)
    cdef i64[:, ::1] o = out
    with nogil:
        for i in range(m):
            idx[i] = 0
        for r in range(nruns):
            o[r, 0] = so
            o[r, 1] = do
            o[r, 2] = run
            if r > 0 and so < o[r - 1, 0]:
                sorted_ = False
            _odometer_step(idx, m, dlen, sstride, tstride, &so, &do)
        if not sorted_:
            qsort(&o[0, 0], <size_t>nruns, 3 * sizeof(i64), _cmp_pair)
    return out


def copy_box(const unsigned char[::1] src, const i64[::1] src_shape,
             const i64[::1] src_strides, i64 src_base, const i64[::1] src_offsets,
             unsigned char[::1] dst, const i64[::1] dst_shape,
             const i64[::1] dst_strides, i64 dst_base, const i64[::1] dst_offsets,
             const i64[::1] lengths, i64 itemsize):
    """Copy the box ``lengths`` at ``src_offsets`` of the source chunk to ``dst_offsets`` of the destination.

    Both chunks are described by shape, element strides and a base byte offset
    into their buffer; the copy walks contiguous runs (contiguous in both) with
    memcpy and the GIL released. When the bytes the source box spans and those
    the destination box spans share memory (one buffer on both sides, or two
    views of one), the source span is copied aside first: the result is
    numpy's ``dst[box] = src[box]``, the source read as it was before the copy.
    """
    _check_pair("copy_box", src_shape, src_strides, src_base, src_offsets,
                dst_shape, dst_strides, dst_base, dst_offsets, lengths, itemsize)
    if _box_numel("copy_box", lengths) == 0:
        return
    cdef i64 send = _box_last(src_strides, itemsize, src_base, src_offsets, lengths)
    cdef i64 dend = _box_last(dst_strides, itemsize, dst_base, dst_offsets, lengths)
    if send > src.shape[0]:
        raise ValueError(f"copy_box: source buffer too small: the box needs {send} bytes, "
                         f"the buffer has {src.shape[0]}")
    if dend > dst.shape[0]:
        raise ValueError(f"copy_box: destination buffer too small: the box needs {dend} "
                         f"bytes, the buffer has {dst.shape[0]}")
    cdef Py_ssize_t m
    cdef i64 dlen[64]
    cdef i64 sstride[64]
    cdef i64 tstride[64]
    cdef i64 so, do, nruns, run
    cdef const unsigned char* s_first
    cdef unsigned char* d_first
    cdef unsigned char* aside = NULL
    cdef size_t s_span
    # The walk is planned from the arrays in the same GIL hold as their
    # checks: once the GIL is released another thread may rewrite them, and
    # the copy must follow the walk that was checked.
    run = _paired_walk(src_strides, 0, src_offsets, dst_strides, 0, dst_offsets,
                       lengths, itemsize, &m, dlen, sstride, tstride, &so, &do, &nruns)
    s_first = &src[0] + src_base + so
    d_first = &dst[0] + dst_base + do
    s_span = <size_t>(send - src_base - so)
    if (<size_t>s_first < <size_t>&dst[0] + <size_t>dend
            and <size_t>d_first < <size_t>s_first + s_span):
        # The spans overlap: writes could land on source bytes not yet read.
        aside = <unsigned char*>malloc(s_span)
        if aside == NULL:
            raise MemoryError(f"copy_box: cannot set aside the {s_span}-byte source span")
    try:
        with nogil:
            if aside != NULL:
                memcpy(aside, s_first, s_span)
                s_first = aside
            _copy_runs(s_first, d_first, run, m, dlen, sstride, tstride, nruns)
    finally:
        free(aside)


def paired_run_info(const i64[::1] src_shape, const i64[::1] src_strides,
                    const i64[::1] src_offsets, const i64[::1] dst_shape,
                    const i64[::1] dst_strides, const i64[::1] dst_offsets,
                    const i64[::1] lengths, i64 itemsize):
    """``(number of runs, bytes per run)`` of :func:`paired_runs`, in O(ndim)."""
    _check_pair("paired_run_info", src_shape, src_strides, 0, src_offsets,
                dst_shape, dst_strides, 0, dst_offsets, lengths, itemsize)
    if _box_numel("paired_run_info", lengths) == 0:
        return 0, 0
    cdef Py_ssize_t m
    cdef i64 dlen[64]
    cdef i64 sstride[64]
    cdef i64 tstride[64]
    cdef i64 so, do, nruns, run
    run = _paired_walk(src_strides, 0, src_offsets, dst_strides, 0, dst_offsets,
                       lengths, itemsize, &m, dlen, sstride, tstride, &so, &do, &nruns)
    return nruns, run


# ---------------------------------------------------------------- reading runs

cdef enum:
    NIOV = 512  # iovecs per preadv call (IOV_MAX is 1024 on Linux and macOS)
    JUNK_MAX = 1 << 20  # largest discard buffer for the gaps between runs

#: iovecs one preadv of read_runs carries at most: a block of more runs and
#: gaps is read in several calls (ckcore plan counts them).
IOVECS_PER_CALL = NIOV
#: read_runs reads a gap into a discard buffer of at most this many bytes (a
#: longer gap takes several iovecs).
DISCARD_BYTES = JUNK_MAX


cdef i64 _preadv_full(int fd, iovec* iov, int cnt, i64 off, i64* calls,
                      int* err) noexcept nogil:
    # preadv until every iovec is full. Returns bytes read, or -1 with *err
    # set to errno, or -2 at end of file. Adjusts iov in place on short reads.
    cdef i64 total = 0
    cdef ssize_t got
    cdef int i = 0
    while i < cnt:
        got = preadv(fd, iov + i, cnt - i, <off_t>off)
        calls[0] += 1
        if got < 0:
            if ck_eintr(ck_errno()):
                continue
            err[0] = ck_errno()
            return -1
        if got == 0:
            return -2
        total += got
        off += got
        while i < cnt and <size_t>got >= iov[i].iov_len:
            got -= iov[i].iov_len
            i += 1
        if i < cnt and got > 0:
            iov[i].iov_base = <char*>iov[i].iov_base + got
            iov[i].iov_len -= got
    return total


cdef struct _RunReader:
    # One read_runs call: its checked private copies and the preadv being gathered.
    int fd
    const i64* rw          # K runs, rows [file offset, dst offset, length]
    Py_ssize_t K
    const i64* bl          # M blocks, rows [start, end)
    Py_ssize_t M
    unsigned char* base    # dst
    unsigned char* junk    # where the gaps between two runs of a block go
    i64 junk_len
    iovec* iov
    int cnt                # iovecs gathered
    i64 io_start           # file offset of the first gathered byte
    i64 pos                # file offset after the last gathered byte
    Py_ssize_t b           # the block being read
    i64 calls
    i64 nbytes
    int err


cdef i64 _check_runs(const i64* rw, Py_ssize_t K, const i64* bl, Py_ssize_t M,
                     i64 cap) except -1:
    # Refuse runs and blocks read_runs cannot read safely; return the largest
    # gap between two runs of one block (the bytes read into junk).
    cdef Py_ssize_t r, b = 0
    cdef i64 maxgap = 0
    for r in range(K):
        if rw[3 * r] < 0 or rw[3 * r + 1] < 0 or rw[3 * r + 2] <= 0 \
                or add_overflows(rw[3 * r], rw[3 * r + 2]):
            raise ValueError(f"read_runs: run {r} is invalid: "
                             f"{rw[3 * r]}, {rw[3 * r + 1]}, {rw[3 * r + 2]}")
        if rw[3 * r + 1] > cap - rw[3 * r + 2]:
            raise ValueError(f"read_runs: run {r} lands at "
                             f"[{rw[3 * r + 1]}, {rw[3 * r + 1] + rw[3 * r + 2]}), "
                             f"past the {cap}-byte destination")
        if r > 0 and rw[3 * r] < rw[3 * r - 3] + rw[3 * r - 1]:
            raise ValueError(
                f"read_runs: runs must be sorted by file offset and disjoint (run {r})")
        while b < M and bl[2 * b + 1] <= rw[3 * r]:
            b += 1
        if b == M or rw[3 * r] < bl[2 * b] or rw[3 * r] + rw[3 * r + 2] > bl[2 * b + 1]:
            raise ValueError(
                f"read_runs: run {r} at file offset {rw[3 * r]} is not inside a block")
        # Only gaps between two runs of one block are read (into junk).
        if r > 0 and rw[3 * r - 3] >= bl[2 * b]:
            maxgap = max(maxgap, rw[3 * r] - rw[3 * r - 3] - rw[3 * r - 1])
    for b in range(M):
        if bl[2 * b] < 0 or bl[2 * b + 1] <= bl[2 * b] \
                or (b > 0 and bl[2 * b] < bl[2 * b - 1]):
            raise ValueError(f"read_runs: block {b} is invalid or out of order")
    return maxgap


cdef inline i64 _flush(_RunReader* s) noexcept nogil:
    # preadv the gathered iovecs: 0, or _preadv_full's -1 (I/O error) / -2 (EOF).
    cdef i64 got = _preadv_full(s.fd, s.iov, s.cnt, s.io_start, &s.calls, &s.err)
    if got < 0:
        return got
    s.nbytes += got
    s.io_start = s.pos
    s.cnt = 0
    return 0


cdef inline i64 _gather(_RunReader* s, unsigned char* p, i64 n) noexcept nogil:
    # Append the iovec [p, p + n), reading what is gathered first when the vector is full.
    cdef i64 got
    if s.cnt == NIOV:
        got = _flush(s)
        if got < 0:
            return got
    s.iov[s.cnt].iov_base = p
    s.iov[s.cnt].iov_len = <size_t>n
    s.cnt += 1
    s.pos += n
    return 0


cdef i64 _read_blocks(_RunReader* s, i64 prefetch) noexcept nogil:
    # One preadv (or a few, past NIOV iovecs) per block holding runs: from the
    # block's first run to the end of its last, the gaps between runs into
    # junk. 0, or -1 / -2 as _preadv_full, with s.pos and s.b where it stopped.
    cdef Py_ssize_t r = 0, pf = 0, b
    cdef i64 gap, g, got
    for b in range(s.M):
        s.b = b
        if prefetch > 0:
            while pf < s.M and (pf <= b or s.bl[2 * pf] < s.bl[2 * b] + prefetch):
                ck_willneed(s.fd, s.bl[2 * pf], s.bl[2 * pf + 1] - s.bl[2 * pf])
                pf += 1
        if r == s.K or s.rw[3 * r] >= s.bl[2 * b + 1]:
            continue  # no run in this block: nothing of it is needed
        # The read starts at the block's first run, not at the block's
        # start: the bytes before it are not needed.
        s.pos = s.rw[3 * r]
        s.io_start = s.pos
        s.cnt = 0
        while r < s.K and s.rw[3 * r] < s.bl[2 * b + 1]:
            gap = s.rw[3 * r] - s.pos
            while gap > 0:
                g = min(gap, s.junk_len)
                got = _gather(s, s.junk, g)
                if got < 0:
                    return got
                gap -= g
            got = _gather(s, s.base + s.rw[3 * r + 1], s.rw[3 * r + 2])
            if got < 0:
                return got
            r += 1
        if s.cnt > 0:
            got = _flush(s)
            if got < 0:
                return got
    return 0


def read_runs(int fd, const i64[:, ::1] runs, const i64[:, ::1] blocks,
              unsigned char[::1] dst, i64 prefetch):
    """Read file runs into a buffer: ``dst[d:d+n] = file[s:s+n]`` for each row ``[s, d, n]``.

    ``runs`` are sorted by file offset and do not overlap; ``blocks`` are the
    coalesced ``[start, end)`` reads that cover them (``coalesce``): each
    block is one ``preadv``, from its first run to the end of its last, whose
    iovecs point into ``dst`` for the runs and into a discard buffer for the
    gaps between them (bytes of a block before its first run or after its
    last are not read). With ``prefetch > 0`` every block is announced with
    ``POSIX_FADV_WILLNEED`` up to ``prefetch`` bytes ahead, so the device
    works on many small reads at once. The GIL is released.
    Returns ``(read calls, bytes read)``; raises OSError on an I/O error and
    EOFError when the file ends before the runs do.
    """
    cdef Py_ssize_t K = runs.shape[0], M = blocks.shape[0]
    if runs.shape[1] != 3 or blocks.shape[1] != 2:
        raise ValueError("read_runs: runs must be (K, 3) and blocks (M, 2)")
    cdef i64 cap = dst.shape[0], got
    cdef i64* rw = NULL
    cdef i64* bl = NULL
    cdef _RunReader s
    memset(&s, 0, sizeof(s))
    s.fd, s.K, s.M = fd, K, M
    s.base = &dst[0] if cap > 0 else NULL
    try:
        # Private copies, checked and then used: with the GIL released below,
        # another thread may rewrite the caller's arrays, and an unchecked
        # destination offset would send a read past dst.
        rw = <i64*>safe_alloc(<size_t>(3 * K), sizeof(i64))
        bl = <i64*>safe_alloc(<size_t>(2 * M), sizeof(i64))
        if K:
            memcpy(rw, &runs[0, 0], <size_t>(3 * K) * sizeof(i64))
        if M:
            memcpy(bl, &blocks[0, 0], <size_t>(2 * M) * sizeof(i64))
        s.junk_len = min(_check_runs(rw, K, bl, M, cap), <i64>JUNK_MAX)
        s.rw, s.bl = rw, bl
        s.junk = <unsigned char*>safe_alloc(<size_t>s.junk_len, 1)
        s.iov = <iovec*>safe_alloc(NIOV, sizeof(iovec))
        with nogil:
            got = _read_blocks(&s, prefetch)
        if got == -1:
            raise OSError(s.err, f"read_runs: read failed near file offset {s.pos}")
        if got == -2:
            raise EOFError(f"read_runs: file ends before byte {s.pos} (block {s.b}: "
                           f"[{bl[2 * s.b]}, {bl[2 * s.b + 1]}))")
        return s.calls, s.nbytes
    finally:
        free(rw)
        free(bl)
        free(s.junk)
        free(s.iov)
