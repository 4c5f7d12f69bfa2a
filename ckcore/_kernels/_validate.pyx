"""Global save-plan validation: bounds, self-overlap and fill of every tensor's chunks.

torch's ``_validate_global_plan`` runs on rank 0 once per save and is where
DCP saves stall at scale: its sweep over the largest dimension turns
quadratic whenever that dimension has few distinct cuts (MoE expert tensors,
fine grids). This kernel finds the same findings without that cliff:

* chunks are read once into ``int64`` rows (``chunk_rows``), with the GIL,
  raising the errors a user should see (wrong ndim, non-ints, int64 overflow);
* ``find_self_overlaps`` lists every overlapping pair with torch's predicate
  (``_box.pxd``): first a hash pass proves regular grids (and any layout whose
  per-dimension cuts are pairwise disjoint) overlap-free in O(n); otherwise it
  splits the chunks recursively on a dimension whose distinct intervals are
  disjoint (interval grouping, which handles irregular and MoE layouts), and
  only sweeps what no dimension can split, on the dimension with the most
  distinct offsets. Its cost follows the number of chunk pairs that share a
  sweep interval, never n² on these layouts. A caller may keep only the
  first pairs and stop after a count (``PairBuf``): a crafted file can hold
  billions of overlapping pairs in a few kilobytes;
* volumes are summed in 128 bits, so they never wrap.
"""

from libc.stdlib cimport free, realloc
from libc.string cimport memset

import numpy as np

from ckcore._kernels._box cimport box_overlap
from ckcore._kernels._capi cimport (
    PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE,
    ck_add64, ck_hi, ck_i128, ck_lo, ck_mul64, ck_mul128,
)
from ckcore._kernels._types cimport i64
from ckcore._kernels._intervals cimport (
    IvlTable, Key3, ivl_free, ivl_id, ivl_init, ivl_keys, sort_key3,
)
from ckcore._kernels._util cimport index_int, safe_alloc, to_i64


# ---------------------------------------------------------------- small C tools

cdef void pairbuf_init(PairBuf* pb, Py_ssize_t keep, Py_ssize_t stop) noexcept nogil:
    pb.data = NULL
    pb.n = 0
    pb.cap = 0
    pb.keep = keep
    pb.found = 0
    pb.stop = stop
    pb.budget = -1
    pb.exhausted = False


cdef int pairbuf_push(PairBuf* pb, i64 a, i64 b) except -1 nogil:
    cdef Py_ssize_t cap
    cdef i64* data
    pb.found += 1
    if pb.keep < 0 or pb.n < pb.keep:
        if pb.n == pb.cap:
            cap = 64 if pb.cap == 0 else pb.cap * 2
            data = <i64*>realloc(pb.data, <size_t>cap * 2 * sizeof(i64))
            if data == NULL:
                with gil:
                    raise MemoryError("overlap pair buffer")
            pb.data = data
            pb.cap = cap
        pb.data[2 * pb.n] = a
        pb.data[2 * pb.n + 1] = b
        pb.n += 1
    return 1 if 0 <= pb.stop <= pb.found else 0


cdef int _all_pairs(PairBuf* pb, const i64* S, Py_ssize_t m) except -1 nogil:
    # Every pair of the m chunks S (0..m-1 when S is NULL) overlaps. Once no
    # more pairs are kept the rest are counted, not walked: m identical
    # chunks (one chunk object repeated in a crafted file costs 2 bytes a
    # copy) hold m(m-1)/2 pairs. m is a number of chunks held in memory, so
    # m(m-1)/2 fits in 63 bits. Counting costs nothing, so it does not end
    # the search even past pb.stop: the next pair walked elsewhere does, and
    # if there is none the count is exact.
    cdef Py_ssize_t i, j
    for i in range(m):
        for j in range(i):
            if 0 <= pb.keep <= pb.n:
                pb.found += m * (m - 1) // 2 - (i * (i - 1) // 2 + j)
                return 0
            if pairbuf_push(pb, S[i] if S != NULL else i, S[j] if S != NULL else j):
                return 1
    return 0


# ------------------------------------------------------------ overlap finding

cdef struct Ctx:
    Py_ssize_t n
    Py_ssize_t ndim
    const i64* offs
    const i64* sizes
    PairBuf* out


cdef int _sweep(Ctx* c, const i64* S, Py_ssize_t m, Py_ssize_t s) except -1 nogil:
    # Sweep the m chunks S along dimension s: a chunk stays active while its
    # end is past the current start; every active chunk is box-checked. Exact
    # for torch's predicate for any values (also negative sizes): a chunk
    # dropped because end <= start is separated from every later chunk.
    # Returns 1 when the pair buffer asked to stop or its budget ran out, as
    # _split and find_self_overlaps do.
    cdef Py_ssize_t d = c.ndim, i, j, na = 0, w
    cdef i64 cur, oth, start
    cdef Key3* keys = <Key3*>safe_alloc(m, sizeof(Key3))
    cdef i64* act = NULL
    cdef i64* act_end = NULL
    try:
        act = <i64*>safe_alloc(m, sizeof(i64))
        act_end = <i64*>safe_alloc(m, sizeof(i64))
        for i in range(m):
            keys[i].a = c.offs[S[i] * d + s]
            keys[i].b = 0
            keys[i].idx = S[i]
        sort_key3(keys, m)
        for i in range(m):
            cur = keys[i].idx
            start = keys[i].a
            w = 0
            for j in range(na):
                if act_end[j] <= start:
                    continue
                oth = act[j]
                act[w] = oth
                act_end[w] = act_end[j]
                w += 1
                if c.out.budget >= 0:
                    if c.out.budget == 0:
                        c.out.exhausted = True
                        return 1
                    c.out.budget -= 1
                if box_overlap(c.offs + cur * d, c.sizes + cur * d,
                               c.offs + oth * d, c.sizes + oth * d, d):
                    if pairbuf_push(c.out, cur, oth):
                        return 1
            na = w
            act[na] = cur
            act_end[na] = start + c.sizes[cur * d + s]
            na += 1
    finally:
        free(keys)
        free(act)
        free(act_end)
    return 0


cdef Py_ssize_t _sort_dim(Ctx* c, const i64* S, Py_ssize_t m, Py_ssize_t k,
                          Key3* keys, Py_ssize_t* n_groups, Py_ssize_t* n_offsets) except -1 nogil:
    # Sort S by (offset, size) in dimension k. Returns 1 if the distinct
    # intervals of that dimension are pairwise separated under torch's
    # predicate (sizes are >= 0 here), 0 otherwise; counts the distinct
    # intervals and distinct offsets.
    cdef Py_ssize_t d = c.ndim, i, groups = 1, noffs = 1
    cdef bint disjoint = True
    cdef i64 maxend
    for i in range(m):
        keys[i].a = c.offs[S[i] * d + k]
        keys[i].b = c.sizes[S[i] * d + k]
        keys[i].idx = S[i]
    sort_key3(keys, m)
    maxend = keys[0].a + keys[0].b
    for i in range(1, m):
        if keys[i].a == keys[i - 1].a and keys[i].b == keys[i - 1].b:
            continue
        groups += 1
        if keys[i].a != keys[i - 1].a:
            noffs += 1
        # Sorted by (offset, size): a new interval is separated from all
        # earlier ones iff it starts at or after the furthest end so far
        # (equal offsets: the earlier, shorter one must be empty).
        if keys[i].a < maxend:
            disjoint = False
        if keys[i].a + keys[i].b > maxend:
            maxend = keys[i].a + keys[i].b
    n_groups[0] = groups
    n_offsets[0] = noffs
    return disjoint


cdef int _split(Ctx* c, const i64* S, Py_ssize_t m, unsigned long long cand) except -1 nogil:
    # Interval grouping. If some candidate dimension's distinct intervals are
    # pairwise separated, chunks in different groups cannot overlap, chunks in
    # a group with an empty interval cannot either, and the rest share that
    # dimension: recurse per group without it. Otherwise sweep.
    cdef Py_ssize_t d = c.ndim, k, j, g0, groups, noffs
    cdef Py_ssize_t best_k = -1, best_groups = 0, sweep_k = -1, sweep_offs = 0
    cdef Key3* keys = NULL
    cdef Key3* best = NULL
    cdef Key3* tmp
    cdef i64* sub = NULL
    if m <= 1:
        return 0
    try:
        keys = <Key3*>safe_alloc(m, sizeof(Key3))
        best = <Key3*>safe_alloc(m, sizeof(Key3))
        for k in range(d):
            if not (cand >> k) & 1:
                continue
            if _sort_dim(c, S, m, k, keys, &groups, &noffs):
                if groups == 1:
                    if keys[0].b == 0:
                        return 0  # all share an empty interval: no pair overlaps
                    cand &= ~(1ULL << k)  # all share it: it separates nothing
                    continue
                if groups > best_groups:
                    best_groups = groups
                    best_k = k
                    tmp = best
                    best = keys
                    keys = tmp
            elif noffs > sweep_offs:
                sweep_offs = noffs
                sweep_k = k
        if best_k >= 0:
            sub = <i64*>safe_alloc(m, sizeof(i64))
            g0 = 0
            while g0 < m:
                j = g0
                while j < m and best[j].a == best[g0].a and best[j].b == best[g0].b:
                    sub[j - g0] = best[j].idx
                    j += 1
                if best[g0].b != 0 and j - g0 > 1:
                    if _split(c, sub, j - g0, cand & ~(1ULL << best_k)):
                        return 1
                g0 = j
        elif sweep_k < 0:
            # Every dimension is shared with a non-empty interval: the chunks
            # are identical boxes with volume, and every pair overlaps.
            return _all_pairs(c.out, S, m)
        else:
            return _sweep(c, S, m, sweep_k)
    finally:
        free(keys)
        free(best)
        free(sub)
    return 0


cdef int _grid_free(Ctx* c, bint* proven) except -1 nogil:
    # O(n) proof for regular grids: if in every dimension the distinct
    # intervals are pairwise separated and no two chunks are the same box,
    # no two chunks overlap (two different chunks differ in some dimension,
    # where their intervals are separated). Chunks are hashed, not sorted;
    # only the distinct intervals of each dimension are sorted.
    cdef Py_ssize_t n = c.n, d = c.ndim, i, k, m
    cdef IvlTable t
    cdef i64* ids = NULL
    cdef i64* combo = NULL
    cdef unsigned char* seen = NULL
    cdef i64 o, s, radix = 1, prev_o = 0, prev_s = 0, prev_id
    cdef Key3* keys = NULL
    cdef IvlTable dup
    memset(&t, 0, sizeof(IvlTable))
    memset(&dup, 0, sizeof(IvlTable))
    proven[0] = False
    try:
        ids = <i64*>safe_alloc(n, sizeof(i64))
        combo = <i64*>safe_alloc(n, sizeof(i64))
        memset(combo, 0, n * sizeof(i64))
        for k in range(d):
            ivl_init(&t, 64)
            prev_id = -1
            for i in range(n):
                o = c.offs[i * d + k]
                s = c.sizes[i * d + k]
                # Grids repeat an interval over consecutive chunks: skip the hash.
                if prev_id >= 0 and o == prev_o and s == prev_s:
                    ids[i] = prev_id
                    continue
                ids[i] = ivl_id(&t, o, s)
                prev_o = o
                prev_s = s
                prev_id = ids[i]
            # The distinct intervals of dimension k must be pairwise separated.
            # Sorted by (offset, size) with sizes >= 0, separated neighbours
            # make the ends non-decreasing, so checking neighbours suffices.
            m = t.count
            keys = <Key3*>safe_alloc(m, sizeof(Key3))
            # In first-seen order: sorted already for ordered layouts.
            ivl_keys(&t, keys)
            ivl_free(&t)
            sort_key3(keys, m)
            for i in range(1, m):
                if keys[i].a < keys[i - 1].a + keys[i - 1].b:
                    return 0
            free(keys)
            keys = NULL
            if m > 0 and radix > (<i64>0x7FFFFFFFFFFFFFFF) // m:
                return 0  # mixed-radix id would overflow: leave it to _split
            for i in range(n):
                combo[i] = combo[i] * m + ids[i]
            radix *= m
        # No two chunks may be the same box: a bitmap over the mixed-radix
        # ids when it is small (grids: radix == n), a hash set otherwise.
        if radix <= 8 * n + 64:
            seen = <unsigned char*>safe_alloc(radix, 1)
            memset(seen, 0, radix)
            for i in range(n):
                if seen[combo[i]]:
                    return 0
                seen[combo[i]] = 1
        else:
            ivl_init(&dup, 64)
            for i in range(n):
                # A box seen before leaves the count as it was.
                m = dup.count
                ivl_id(&dup, combo[i], 0)
                if dup.count == m:
                    return 0
        proven[0] = True
    finally:
        ivl_free(&t)
        ivl_free(&dup)
        free(ids)
        free(combo)
        free(keys)
        free(seen)
    return 0


cdef int find_self_overlaps(Py_ssize_t n, Py_ssize_t ndim, const i64* offs,
                            const i64* sizes, PairBuf* out) except -1 nogil:
    """Append every overlapping pair (later index first) of the n chunks to out.

    Rows are ``ndim`` int64 values; ``offs + sizes`` must not overflow. The
    predicate is torch's (``_box.pxd``), including empty chunks strictly
    inside another one. Pairs come in no particular order. Returns 1 if the
    search ended early (at ``out.stop`` pairs, or out of ``out.budget``), 0 if
    it found them all (see PairBuf).
    """
    cdef Ctx c
    cdef Py_ssize_t i, k, groups, noffs, best_k = 0, best_offs = -1
    cdef bint proven = False, negative = False
    cdef i64* S = NULL
    cdef Key3* keys = NULL
    if n <= 1 or ndim <= 0:
        if ndim == 0:
            return _all_pairs(out, NULL, n)
        return 0
    c.n = n
    c.ndim = ndim
    c.offs = offs
    c.sizes = sizes
    c.out = out
    # Interval grouping tracks candidate dimensions in a 64-bit mask: more
    # dimensions than that take the plain sweep, exact for any layout.
    negative = ndim > 63
    for i in range(n * ndim):
        if negative:
            break
        if sizes[i] < 0:
            negative = True
    try:
        S = <i64*>safe_alloc(n, sizeof(i64))
        for i in range(n):
            S[i] = i
        if negative:
            # Out-of-bounds chunks with negative sizes (torch reports them
            # and still checks overlaps), or more than 63 dimensions: only
            # the plain sweep is exact here.
            keys = <Key3*>safe_alloc(n, sizeof(Key3))
            for k in range(ndim):
                _sort_dim(&c, S, n, k, keys, &groups, &noffs)
                if noffs > best_offs:
                    best_offs = noffs
                    best_k = k
            return _sweep(&c, S, n, best_k)
        _grid_free(&c, &proven)
        if proven:
            return 0
        return _split(&c, S, n, (1ULL << ndim) - 1)
    finally:
        free(S)
        free(keys)


# ------------------------------------------------------ Python-facing entry points

cdef inline i64 _as_i64(object v, object key, Py_ssize_t ci, object chunk, str what) except? -1:
    cdef i64 x = 0
    if not to_i64(v, &x):
        return x
    n = index_int(v)
    if n is None:
        raise TypeError(
            f"key:{key} chunk {ci} {chunk!r}: {what} must be integers, got {type(v).__name__}")
    if to_i64(n, &x):
        raise ValueError(
            f"key:{key} chunk {ci} {chunk!r}: {what} value {n} does not fit in int64")
    return x


cdef int _read_row(object seq, Py_ssize_t ndim, i64* out, object key, Py_ssize_t ci,
                   object chunk, str what) except -1:
    cdef Py_ssize_t j, n
    if not PyTuple_Check(seq):
        try:
            seq = tuple(seq)
        except TypeError:
            raise TypeError(
                f"key:{key} chunk {ci} {chunk!r}: {what} must be a sequence of integers"
            ) from None
    n = PyTuple_GET_SIZE(seq)
    if n != ndim:
        raise ValueError(
            f"key:{key} chunk {ci} {chunk!r}: {what} has {n} dims but the tensor has {ndim}"
        )
    for j in range(ndim):
        out[j] = _as_i64(<object>PyTuple_GET_ITEM(seq, j), key, ci, chunk, what)
    return 0


cdef int fast_row(object seq, Py_ssize_t ndim, i64* out) noexcept:
    # The common case (a tuple or torch.Size of ndim int64 values) without
    # raising: returns 1 when the careful path must look (and raise) instead.
    cdef Py_ssize_t j
    if not PyTuple_Check(seq) or PyTuple_GET_SIZE(seq) != ndim:
        return 1
    for j in range(ndim):
        if to_i64(<object>PyTuple_GET_ITEM(seq, j), out + j):
            return 1
    return 0


def chunk_rows(key, chunks, Py_ssize_t ndim):
    """Read ``chunks`` (objects with .offsets/.sizes) into (n, ndim) int64 arrays.

    ``chunks`` is any sequence, read once into a snapshot the call owns (free
    for a tuple): reading a chunk can run Python code (a property, an
    ``__index__``) during which the caller's list may change. Raises
    TypeError for non-integers and ValueError for a wrong number of
    dimensions or values (or offset + size) outside int64, naming ``key``
    and the chunk.
    """
    cdef tuple snap = tuple(chunks)
    cdef Py_ssize_t n = len(snap), i, j
    cdef Py_ssize_t width = ndim if ndim > 0 else 1
    # At least one column, so &row[0] is valid for 0-d chunks.
    offs_a = np.empty((n, width), dtype=np.int64)
    sizes_a = np.empty((n, width), dtype=np.int64)
    cdef i64[:, ::1] offs = offs_a
    cdef i64[:, ::1] sizes = sizes_a
    cdef i64 e
    cdef object chunk, o, s
    for i in range(n):
        chunk = snap[i]
        o = getattr(chunk, "offsets", None)
        s = getattr(chunk, "sizes", None)
        if o is None or s is None:
            raise TypeError(
                f"key:{key} chunk {i} {chunk!r}: expected an object with .offsets and .sizes"
            )
        if fast_row(o, ndim, &offs[i, 0]):
            _read_row(o, ndim, &offs[i, 0], key, i, chunk, "offsets")
        if fast_row(s, ndim, &sizes[i, 0]):
            _read_row(s, ndim, &sizes[i, 0], key, i, chunk, "sizes")
        for j in range(ndim):
            if ck_add64(offs[i, j], sizes[i, j], &e):
                raise ValueError(
                    f"key:{key} chunk {i} {chunk!r}: offset + size overflows int64 in dim {j}"
                )
    if ndim == 0:
        return offs_a[:, :0].copy(), sizes_a[:, :0].copy()
    return offs_a, sizes_a


def _self_overlap_pairs(const i64[:, ::1] offs, const i64[:, ::1] sizes):
    """All overlapping pairs of the chunks given as rows, as an (K, 2) int64 array.

    Each row is (i, j) with i > j; order unspecified. Inputs must satisfy
    chunk_rows' checks (shapes equal, offset + size within int64).
    """
    cdef Py_ssize_t n = offs.shape[0], d = offs.shape[1]
    cdef PairBuf pb
    if sizes.shape[0] != n or sizes.shape[1] != d:
        raise ValueError("offsets and sizes must have the same shape")
    pairbuf_init(&pb, -1, -1)
    try:
        with nogil:
            find_self_overlaps(n, d, &offs[0, 0] if n * d else NULL,
                               &sizes[0, 0] if n * d else NULL, &pb)
        res = np.empty((pb.n, 2), dtype=np.int64)
        if pb.n:
            res.reshape(-1)[:] = <i64[:2 * pb.n]>pb.data
        return res
    finally:
        free(pb.data)


cdef Py_ssize_t _bounds_volume(Py_ssize_t n, Py_ssize_t d, const i64* offs, const i64* sizes,
                               const i64* tsize, i64* oob, ck_i128* total,
                               bint* vol_ovf) noexcept nogil:
    """torch's ``_check_box_bounds`` on every chunk, and the sum of chunk volumes.

    Out-of-bounds chunks (negative offset or size, or past the tensor's
    size) are counted, and their indices written to ``oob`` unless it is
    NULL. ``total`` gets the exact 128-bit sum of the volumes unless some
    chunk's volume overflows int64, which sets ``vol_ovf``.
    """
    cdef Py_ssize_t i, j, n_oob = 0
    cdef i64 vol, o, s
    cdef bint bad
    total[0] = 0
    vol_ovf[0] = False
    for i in range(n):
        vol = 1
        bad = False
        for j in range(d):
            o = offs[i * d + j]
            s = sizes[i * d + j]
            if o < 0 or s < 0 or o + s > tsize[j]:
                bad = True
            if ck_mul64(vol, s, &vol):
                vol_ovf[0] = True
        if bad:
            if oob != NULL:
                oob[n_oob] = i
            n_oob += 1
        total[0] += vol
    return n_oob


cdef int tensor_findings(Py_ssize_t n, Py_ssize_t ndim, const i64* offs, const i64* sizes,
                         const i64* tsize, bint check_fill) except -1 nogil:
    """Would torch's validation report anything for this tensor? 1 if so, else 0.

    The question ``_check_tensor`` answers in full, asked without building a
    result: any out-of-bounds chunk, any overlapping pair, and (with
    ``check_fill``, torch's "more than one plan") chunk volumes that do not
    sum to the tensor's. Also 1 when the fill cannot be decided in 128-bit
    arithmetic (a chunk volume past int64, a tensor volume past int128): the
    caller then checks that tensor the exact way. Rows as for
    ``find_self_overlaps``; ``1 <= ndim <= 63``.
    """
    cdef PairBuf pb
    cdef ck_i128 total, tvol = 1
    cdef bint vol_ovf
    cdef Py_ssize_t j
    if _bounds_volume(n, ndim, offs, sizes, tsize, NULL, &total, &vol_ovf):
        return 1
    if check_fill:
        if vol_ovf:
            return 1
        for j in range(ndim):
            if ck_mul128(tvol, tsize[j], &tvol):
                return 1
        if tvol != total:
            return 1
    if n <= 1:
        return 0
    # One pair answers the question: keep none, stop at the first.
    pairbuf_init(&pb, 0, 1)
    try:
        find_self_overlaps(n, ndim, offs, sizes, &pb)
    finally:
        free(pb.data)
    return 1 if pb.found else 0


cdef tuple _check(const i64[:, ::1] offs, const i64[:, ::1] sizes, const i64[::1] tsize,
                  Py_ssize_t keep, Py_ssize_t stop, Py_ssize_t budget):
    cdef Py_ssize_t n = offs.shape[0], d = offs.shape[1], n_oob
    cdef PairBuf pb
    cdef ck_i128 total = 0
    cdef bint vol_ovf = False
    cdef int stopped = 0
    if sizes.shape[0] != n or sizes.shape[1] != d or tsize.shape[0] != d:
        raise ValueError("offsets, sizes and the tensor size must agree in shape")
    oob_a = np.empty(n, dtype=np.int64)
    cdef i64[::1] oob = oob_a
    pairbuf_init(&pb, keep, stop)
    pb.budget = budget
    try:
        with nogil:
            n_oob = _bounds_volume(n, d, &offs[0, 0] if n * d else NULL,
                                   &sizes[0, 0] if n * d else NULL,
                                   &tsize[0] if d else NULL,
                                   &oob[0] if n else NULL, &total, &vol_ovf)
            if n > 1:
                stopped = find_self_overlaps(n, d, &offs[0, 0] if d else NULL,
                                             &sizes[0, 0] if d else NULL, &pb)
        pairs = np.empty((pb.n, 2), dtype=np.int64)
        if pb.n:
            pairs.reshape(-1)[:] = <i64[:2 * pb.n]>pb.data
    finally:
        free(pb.data)
    volume = None if vol_ovf else (int(ck_hi(total)) << 64) + int(ck_lo(total))
    spent = budget - pb.budget if budget >= 0 else 0
    return oob_a[:n_oob], volume, pairs, pb.found, not stopped, bool(pb.exhausted), spent


def _check_tensor(const i64[:, ::1] offs, const i64[:, ::1] sizes, const i64[::1] tsize):
    """Bounds, volume and self-overlap of one tensor's chunks, in one nogil pass.

    Returns ``(oob, volume, pairs)``: indices of out-of-bounds chunks (torch's
    ``_check_box_bounds``: negative offset or size, or past the tensor's
    size), the exact sum of chunk volumes (a Python int, or None if some
    chunk's volume overflows int64 and the caller must compute it), and
    the overlapping pairs as ``_self_overlap_pairs`` returns them.
    """
    return _check(offs, sizes, tsize, -1, -1, -1)[:3]


def _check_tensor_bounded(const i64[:, ::1] offs, const i64[:, ::1] sizes, const i64[::1] tsize,
                          Py_ssize_t keep, Py_ssize_t stop, Py_ssize_t budget):
    """``_check_tensor`` for reports that show only a few overlapping pairs, in bounded time.

    Returns ``(oob, volume, pairs, found, complete, exhausted, spent)``:
    ``pairs`` holds the first ``keep`` pairs found (all when ``keep < 0``);
    the search ends once ``stop`` pairs are found (never when ``stop < 0``)
    or after ``budget`` box comparisons in the sweep (unlimited when
    ``budget < 0``), which sets ``exhausted``. ``found`` counts the pairs,
    exactly when ``complete``, else as a lower bound; ``spent`` is the
    comparisons used. Identical chunks are counted without being walked, so
    their m(m-1)/2 pairs cost O(m).
    """
    return _check(offs, sizes, tsize, keep, stop, budget)
