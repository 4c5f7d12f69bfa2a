"""Do a rank's reads fill each of its destination chunks exactly once?

DCP's load planning never checks this: if a checkpoint's ``.metadata`` lost
a chunk or a chunk's offsets were damaged, torch plans reads that leave part
of a destination tensor unwritten, and the load succeeds. ckcore's
``FastLoadPlanner`` runs this check on the intersection arrays it already
has (``ckcore._kernels._intersect.intersect``), before any byte is read.

The reads of local chunk ``i`` are the boxes ``(dest_offsets[k], lengths[k])``
for ``local_index[k] == i``; they lie inside chunk ``i`` by construction.
They tile it exactly iff (a) their volumes sum to its volume and (b) no two
of them overlap with positive volume. (a) is linear; (b) is checked pairwise
for chunks with at most ``max_pairwise`` reads, which covers every DCP layout
in practice (a rank's chunk spans a few saved chunks). Beyond that the caller
gets ``COVER_UNDECIDED`` and settles overlaps with the intersection kernel.
"""

from libc.stdint cimport INT64_MAX

from ckcore._kernels._types cimport i64, isize
from ckcore._kernels._util cimport volume_overflows

# C_OK, C_VOLUME, C_OVERLAP, C_UNDECIDED: the enum of _coverage.pxd.

COVER_OK = C_OK
COVER_VOLUME = C_VOLUME
COVER_OVERLAP = C_OVERLAP
COVER_UNDECIDED = C_UNDECIDED


cdef inline i64 _volume_sat(const i64* sizes, isize nd) noexcept nogil:
    # Product of non-negative sizes, saturated at INT64_MAX (callers compare only).
    cdef i64 v
    if volume_overflows(sizes, nd, &v):
        return INT64_MAX
    return v


cdef inline bint _positive_overlap(const i64* a_off, const i64* a_len,
                                   const i64* b_off, const i64* b_len,
                                   isize nd) noexcept nogil:
    # Boxes share an element (strict, so zero-length reads never conflict).
    cdef isize d
    for d in range(nd):
        if a_len[d] == 0 or b_len[d] == 0:
            return False
        if a_off[d] >= b_off[d] + b_len[d] or b_off[d] >= a_off[d] + a_len[d]:
            return False
    return True


cdef int check_reads(const i64* li, const i64* doff, const i64* ln, isize k,
                     const i64* lsizes, isize nloc, isize nd, isize max_pairwise,
                     isize* out) noexcept nogil:
    # out = [local chunk, read a, read b, covered volume]
    cdef isize start = 0, end, p, q, i
    cdef i64 covered, vol, want
    cdef int undecided = 0
    # Local chunks without any read at all must have zero volume.
    for i in range(nloc):
        # Find the reads of chunk i: li is sorted (canonical order).
        end = start
        while end < k and li[end] == i:
            end += 1
        want = _volume_sat(&lsizes[i * nd], nd)
        covered = 0
        for p in range(start, end):
            vol = _volume_sat(&ln[p * nd], nd)
            if covered > INT64_MAX - vol:
                covered = INT64_MAX
            else:
                covered = covered + vol
        if nd == 0:
            # 0-d: one element; each read is the whole of it.
            want = 1
            covered = end - start
        if covered != want:
            out[0] = i
            out[3] = covered
            return C_VOLUME
        if nd > 0 and end - start > 1:
            if end - start > max_pairwise:
                undecided = 1
            else:
                for p in range(start, end):
                    for q in range(p + 1, end):
                        if _positive_overlap(&doff[p * nd], &ln[p * nd],
                                             &doff[q * nd], &ln[q * nd], nd):
                            out[0] = i
                            out[1] = p
                            out[2] = q
                            return C_OVERLAP
        start = end
    if start != k:
        # local_index not sorted or out of range: caller's bug, reported as such.
        out[0] = -1
        return -1
    return C_UNDECIDED if undecided else C_OK


def check_cover(const i64[::1] local_index, const i64[:, ::1] dest_offsets,
                const i64[:, ::1] lengths, const i64[:, ::1] local_sizes,
                isize max_pairwise=64):
    """``(code, local_chunk, read_a, read_b, covered)`` for the reads of every local chunk.

    ``code`` is ``COVER_OK``, ``COVER_VOLUME`` (``covered`` elements of
    ``local_chunk`` are read; for 0-d chunks, the number of reads),
    ``COVER_OVERLAP`` (reads ``read_a`` and ``read_b`` share elements) or
    ``COVER_UNDECIDED``. ``local_index`` must be sorted (the intersection
    kernel's canonical order).
    """
    cdef isize k = local_index.shape[0]
    cdef isize nd = local_sizes.shape[1]
    cdef isize nloc = local_sizes.shape[0]
    cdef isize out[4]
    cdef int code
    if dest_offsets.shape[0] != k or lengths.shape[0] != k:
        raise ValueError(
            "check_cover: local_index, dest_offsets and lengths differ in length")
    if k and (dest_offsets.shape[1] != nd or lengths.shape[1] != nd):
        raise ValueError("check_cover: reads and local chunks differ in dimensions")
    if max_pairwise < 0:
        raise ValueError("check_cover: max_pairwise must be non-negative")
    out[0] = out[1] = out[2] = out[3] = -1
    with nogil:
        code = check_reads(&local_index[0] if k else NULL,
                           &dest_offsets[0, 0] if k and nd else NULL,
                           &lengths[0, 0] if k and nd else NULL, k,
                           &local_sizes[0, 0] if nloc and nd else NULL, nloc, nd,
                           max_pairwise, out)
    if code < 0:
        raise ValueError(
            "check_cover: local_index must be sorted and within the local chunks")
    return code, out[0], out[1], out[2], out[3]
