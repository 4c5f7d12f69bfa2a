"""Output-sensitive intersection of two chunk lists (local x saved).

DCP's resharding asks, for every chunk a rank needs (``local``) and every
chunk the checkpoint holds (``saved``), which pairs overlap and where. torch
answers with a 1-D sweep that degrades to N x M pair checks whenever the
sweep dimension does not separate the chunks (MoE layouts, tensors whose
largest dimension is not the sharded one).

This module answers from an *interval trie* over the saved chunks instead:
level k of the trie holds the distinct intervals of dimension ``perm[k]``
under a common prefix of intervals in ``perm[0..k-1]``; children are sorted
by (start, end), so when their ends are also sorted (they are, whenever the
intervals at that level do not nest -- every DCP layout we know) the
overlapping children are a contiguous range found by two binary searches.
A query therefore costs O(ndim * log M) plus the pairs it reports.

When the saved chunks are a full Cartesian product of per-dimension cut lists
(FSDP x TP, even or torch.chunk-uneven -- the usual case) the trie collapses
to those cut lists and a query is one binary search per dimension plus the
product of the per-dimension ranges: O(N log m + M + K).

Overlap is torch's predicate exactly (see ``_box.pxd``): two boxes overlap
unless some dimension separates them with ``a.off >= b.off + b.size`` or
``b.off >= a.off + a.size``; a zero-size chunk strictly inside another
overlaps it, 0-d chunks all overlap each other.

Output order is canonical: by local index, then by saved index.
"""

from libc.stdlib cimport free, qsort, realloc
from libc.string cimport memcpy, memset

from ckcore._kernels._types cimport i64, isize
from ckcore._kernels._box cimport box_overlap
from ckcore._kernels._intervals cimport (
    IvlTable, Key3, ivl_free, ivl_id, ivl_init, ivl_keys, sort_key3,
)
from ckcore._kernels._util cimport add_overflows, safe_alloc, volume_overflows

import numpy as np

cdef extern from *:
    """
    static inline void ck_atomic_add(Py_ssize_t* p, Py_ssize_t v) {
        __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    static inline Py_ssize_t ck_atomic_load(Py_ssize_t* p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    """
    void ck_atomic_add(isize* p, isize v) noexcept nogil
    isize ck_atomic_load(isize* p) noexcept nogil

# Test hooks for the error paths (see _py_live_indexes): how many chunk
# indexes are built and not yet freed, kept with atomics because the kernel
# runs on many threads at once; and a switch that makes every reservation of
# the output buffer fail, as a failed realloc would.
cdef isize _live_indexes = 0
cdef bint _fail_reserve = False

# Codes returned by check_boxes (row index goes alongside).
BOX_OK = 0
BOX_NEGATIVE_OFFSET = 1
BOX_NEGATIVE_SIZE = 2
BOX_END_OVERFLOW = 3
BOX_VOLUME_OVERFLOW = 4


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

cdef int _check_boxes(const i64* off, const i64* size, isize n, isize nd,
                      isize* bad_row) noexcept nogil:
    cdef isize i, d
    cdef i64 o, s, vol
    for i in range(n):
        for d in range(nd):
            o = off[i * nd + d]
            s = size[i * nd + d]
            if o < 0:
                bad_row[0] = i
                return 1
            if s < 0:
                bad_row[0] = i
                return 2
            if add_overflows(o, s):
                bad_row[0] = i
                return 3
        if volume_overflows(size + i * nd, nd, &vol):
            bad_row[0] = i
            return 4
    return 0


def check_boxes(const i64[:, ::1] offsets, const i64[:, ::1] sizes):
    """Check that every box has non-negative offsets and sizes whose sums and volume fit in int64.

    Returns ``(code, row)``: ``(0, -1)`` when all rows are sound, else one of
    the ``BOX_*`` codes and the first offending row.
    """
    if offsets.shape[0] != sizes.shape[0] or offsets.shape[1] != sizes.shape[1]:
        raise ValueError(
            f"offsets ({offsets.shape[0]}, {offsets.shape[1]}) and sizes "
            f"({sizes.shape[0]}, {sizes.shape[1]}) differ in shape")
    cdef isize bad = -1
    cdef int code
    cdef isize n = offsets.shape[0], nd = offsets.shape[1]
    if n == 0 or nd == 0:
        return 0, -1
    with nogil:
        code = _check_boxes(&offsets[0, 0], &sizes[0, 0], n, nd, &bad)
    return code, bad


# ---------------------------------------------------------------------------
# A growable buffer of isize (the reported saved indices)
# ---------------------------------------------------------------------------

# (IdxBuf itself is declared in _intersect.pxd, for the kernels that cimport
# intersect_pairs.)

cdef inline int buf_push(IdxBuf* b, isize v) except -1 nogil:
    if b.len == b.cap:
        _buf_grow(b)
    b.data[b.len] = v
    b.len += 1
    return 0


cdef int _buf_grow(IdxBuf* b) except -1 nogil:
    # Out of line: the rare path, so buf_push stays a compare and a store.
    return _buf_reserve(b, b.cap * 2 if b.cap else 1024)


cdef int _buf_reserve(IdxBuf* b, isize newcap) except -1 nogil:
    cdef isize* p
    if _fail_reserve or <size_t>newcap > (<size_t>-1) // sizeof(isize):
        with gil:
            raise MemoryError("intersection output too large")
    p = <isize*>realloc(b.data, <size_t>newcap * sizeof(isize))
    if p == NULL:
        with gil:
            raise MemoryError("intersection output too large")
    b.data = p
    b.cap = newcap
    return 0


# ---------------------------------------------------------------------------
# Per-dimension cut lists and sorting
# ---------------------------------------------------------------------------

cdef int _distinct_dim(const i64* off, const i64* size, isize n, isize nd, isize d,
                       i64* dstart, i64* dend, isize* rank, isize* count,
                       isize* ids, isize* tmp) except -1 nogil:
    # Distinct intervals of dimension d, sorted by (start, end), and each chunk's rank
    # among them. Hashing first keeps this O(n + m log m) for m distinct intervals:
    # DCP layouts repeat a handful of cuts across thousands of chunks.
    cdef IvlTable t
    cdef Key3* keys = NULL
    cdef isize i, j, m
    cdef i64 s
    memset(&t, 0, sizeof(IvlTable))
    try:
        ivl_init(&t, 64)
        for i in range(n):
            s = off[i * nd + d]
            ids[i] = ivl_id(&t, s, s + size[i * nd + d])
        m = t.count
        keys = <Key3*>safe_alloc(m, sizeof(Key3))
        ivl_keys(&t, keys)
        sort_key3(keys, m)
        # tmp[first-seen id] = rank; the distinct list laid out in rank order.
        for j in range(m):
            tmp[keys[j].idx] = j
            dstart[j] = keys[j].a
            dend[j] = keys[j].b
        for i in range(n):
            rank[i * nd + d] = tmp[ids[i]]
        count[0] = m
    finally:
        ivl_free(&t)
        free(keys)
    return 0


cdef int _cmp_isize(const void* x, const void* y) noexcept nogil:
    cdef isize a = (<const isize*>x)[0], b = (<const isize*>y)[0]
    return (a > b) - (a < b)


cdef void _sort_small(isize* a, isize n) noexcept nogil:
    # Sort reported saved indices of one local chunk; usually already sorted.
    cdef isize i
    for i in range(1, n):
        if a[i] < a[i - 1]:
            qsort(a, <size_t>n, sizeof(isize), _cmp_isize)
            return


# ---------------------------------------------------------------------------
# The index over saved chunks
# ---------------------------------------------------------------------------

cdef struct Index:
    isize n            # saved chunks
    isize nd           # dimensions
    const i64* off     # (n, nd) row-major
    const i64* size
    # Per dimension: distinct intervals sorted by (start, end).
    isize* dcount      # (nd,)
    isize* dbase       # (nd,) offset of dimension d in dstart/dend
    i64* dstart
    i64* dend
    bint* dmono        # (nd,) ends non-decreasing over the distinct list
    isize* rank        # (n, nd) rank of chunk i's interval in dimension d
    # Grid path
    bint grid
    isize* cell        # prod(dcount) -> saved index (grid only)
    isize* cstride     # (nd,)
    # Trie path
    isize* perm        # (nd,) dimension of each trie level
    isize* order       # (n,) saved indices in trie order
    isize* lbase       # (nd + 1,) first node of each level; lbase[nd] = total nodes
    i64* nstart        # per node: interval in dimension perm[level]
    i64* nend
    isize* nlo         # per node: children range (next level) or positions in order (last level)
    isize* nhi
    bint* nmono        # per node: its children's ends are non-decreasing
    bint rootmono
    bint has_trie      # the trie arrays are built (always, unless a grid made them moot)
    bint live          # counted in _live_indexes until index_free


cdef void index_free(Index* ix) noexcept nogil:
    # Safe on a zeroed Index and twice on the same one: it frees what is there.
    if ix.live:
        ck_atomic_add(&_live_indexes, -1)
    free(ix.dcount); free(ix.dbase); free(ix.dstart); free(ix.dend); free(ix.dmono)
    free(ix.rank); free(ix.cell); free(ix.cstride); free(ix.perm); free(ix.order)
    free(ix.lbase); free(ix.nstart); free(ix.nend); free(ix.nlo); free(ix.nhi); free(ix.nmono)
    memset(ix, 0, sizeof(Index))


cdef inline bint _same_prefix(const Index* ix, isize k, isize lvl) noexcept nogil:
    # Does the k-th chunk in trie order share its intervals in dimensions
    # perm[0..lvl] with the one before it (i.e. the same level-lvl node)?
    cdef isize j, nd = ix.nd
    if k == 0:
        return False
    for j in range(lvl + 1):
        if (ix.rank[ix.order[k] * nd + ix.perm[j]]
                != ix.rank[ix.order[k - 1] * nd + ix.perm[j]]):
            return False
    return True


cdef struct Work:
    # index_build's temporaries, freed together whatever phase fails.
    isize* ids
    isize* tmp
    isize* counts


cdef int index_build(Index* ix, const i64* off, const i64* size, isize n, isize nd,
                     bint trie_always) except -1 nogil:
    """Build the per-dimension cut lists, detect a product grid, and build the trie
    (for a grid only when ``trie_always``). On error (MemoryError) nothing is
    left allocated: ix is freed (index_free) before the exception propagates."""
    cdef Work w
    cdef bint built = False
    memset(&w, 0, sizeof(Work))
    memset(ix, 0, sizeof(Index))
    ix.live = True
    ck_atomic_add(&_live_indexes, 1)
    ix.n = n
    ix.nd = nd
    ix.off = off
    ix.size = size
    try:
        _index_alloc(ix, &w)
        _index_dims(ix, &w)
        _index_grid(ix)
        ix.has_trie = not ix.grid or trie_always
        if ix.has_trie:
            _trie_order(ix, &w)
            _trie_nodes(ix)
        built = True
    finally:
        free(w.ids); free(w.tmp); free(w.counts)
        if not built:
            index_free(ix)
    return 0


cdef int _index_alloc(Index* ix, Work* w) except -1 nogil:
    cdef isize n = ix.n, nd = ix.nd
    ix.dcount = <isize*>safe_alloc(nd, sizeof(isize))
    ix.dbase = <isize*>safe_alloc(nd, sizeof(isize))
    ix.dstart = <i64*>safe_alloc(<size_t>n * nd, sizeof(i64))
    ix.dend = <i64*>safe_alloc(<size_t>n * nd, sizeof(i64))
    ix.dmono = <bint*>safe_alloc(nd, sizeof(bint))
    ix.rank = <isize*>safe_alloc(<size_t>n * nd, sizeof(isize))
    ix.cstride = <isize*>safe_alloc(nd, sizeof(isize))
    ix.perm = <isize*>safe_alloc(nd, sizeof(isize))
    ix.order = <isize*>safe_alloc(n, sizeof(isize))
    ix.lbase = <isize*>safe_alloc(nd + 1, sizeof(isize))
    w.ids = <isize*>safe_alloc(n, sizeof(isize))
    w.tmp = <isize*>safe_alloc(n, sizeof(isize))
    return 0


cdef int _index_dims(Index* ix, Work* w) except -1 nogil:
    # 1. Per dimension: the distinct intervals sorted by (start, end), and ranks.
    cdef isize d, r, n = ix.n, nd = ix.nd
    for d in range(nd):
        ix.dbase[d] = d * n
        _distinct_dim(ix.off, ix.size, n, nd, d, ix.dstart + d * n, ix.dend + d * n, ix.rank,
                      &ix.dcount[d], w.ids, w.tmp)
        ix.dmono[d] = True
        for r in range(1, ix.dcount[d]):
            if ix.dend[d * n + r] < ix.dend[d * n + r - 1]:
                ix.dmono[d] = False
                break
    return 0


cdef int _index_grid(Index* ix) except -1 nogil:
    # 2. Grid detection: the saved chunks are the full product of the per-dimension
    #    cut lists iff prod(dcount) == n and no two chunks are the same box (no cell
    #    of the product is hit twice).
    cdef isize d, i, p, n = ix.n, nd = ix.nd
    cdef isize prod_cells = 1
    cdef bint overflow = False
    ix.grid = nd > 0
    for d in range(nd - 1, -1, -1):
        ix.cstride[d] = prod_cells
        if not ix.dmono[d]:
            ix.grid = False
        if prod_cells > n // (ix.dcount[d] if ix.dcount[d] else 1):
            overflow = True
        prod_cells *= ix.dcount[d]
    if overflow or prod_cells != n:
        ix.grid = False
    if not ix.grid:
        return 0
    ix.cell = <isize*>safe_alloc(n, sizeof(isize))
    for i in range(n):
        ix.cell[i] = -1
    for i in range(n):
        p = 0
        for d in range(nd):
            p += ix.rank[i * nd + d] * ix.cstride[d]
        if ix.cell[p] >= 0:
            # The same box twice: not a grid (duplicates go through the trie).
            ix.grid = False
            free(ix.cell)
            ix.cell = NULL
            break
        ix.cell[p] = i
    return 0


cdef int _trie_order(Index* ix, Work* w) except -1 nogil:
    # 3. Trie order: dimensions with the fewest distinct intervals first (coarse to
    #    fine: row blocks before the columns cut inside each block), ties by index.
    cdef isize d, i, j, k, r, lvl, cnt, n = ix.n, nd = ix.nd
    # Insertion sort: nd is a handful of dimensions.
    for d in range(nd):
        ix.perm[d] = d
    for i in range(1, nd):
        k = ix.perm[i]
        j = i - 1
        while j >= 0 and ix.dcount[ix.perm[j]] > ix.dcount[k]:
            ix.perm[j + 1] = ix.perm[j]
            j -= 1
        ix.perm[j + 1] = k
    # LSD radix sort by the ranks of perm[nd-1], ..., perm[0] (counting sort, stable).
    for i in range(n):
        ix.order[i] = i
    w.counts = <isize*>safe_alloc(n + 1, sizeof(isize))
    for lvl in range(nd - 1, -1, -1):
        d = ix.perm[lvl]
        cnt = ix.dcount[d]
        memset(w.counts, 0, <size_t>(cnt + 1) * sizeof(isize))
        for k in range(n):
            w.counts[ix.rank[ix.order[k] * nd + d] + 1] += 1
        for r in range(cnt):
            w.counts[r + 1] += w.counts[r]
        for k in range(n):
            i = ix.order[k]
            r = ix.rank[i * nd + d]
            w.tmp[w.counts[r]] = i
            w.counts[r] += 1
        memcpy(ix.order, w.tmp, <size_t>n * sizeof(isize))
    return 0


cdef int _trie_nodes(Index* ix) except -1 nogil:
    # 4. Trie nodes. A level-lvl node is a maximal run of `order` whose ranks agree
    #    on perm[0..lvl]. Count nodes per level first.
    cdef isize lvl, k, cnt, total = 0, n = ix.n, nd = ix.nd
    for lvl in range(nd):
        ix.lbase[lvl] = total
        cnt = 0
        for k in range(n):
            if not _same_prefix(ix, k, lvl):
                cnt += 1
        total += cnt
    ix.lbase[nd] = total
    ix.nstart = <i64*>safe_alloc(total, sizeof(i64))
    ix.nend = <i64*>safe_alloc(total, sizeof(i64))
    ix.nlo = <isize*>safe_alloc(total, sizeof(isize))
    ix.nhi = <isize*>safe_alloc(total, sizeof(isize))
    ix.nmono = <bint*>safe_alloc(total, sizeof(bint))
    _fill_nodes(ix)
    _link_levels(ix)
    return 0


cdef void _fill_nodes(Index* ix) noexcept nogil:
    # Fill nodes level by level; nlo/nhi first hold positions in `order`.
    cdef isize lvl, d, q, k, i, r, n = ix.n, nd = ix.nd
    for lvl in range(nd):
        d = ix.perm[lvl]
        q = ix.lbase[lvl] - 1
        for k in range(n):
            if not _same_prefix(ix, k, lvl):
                q += 1
                i = ix.order[k]
                r = ix.rank[i * nd + d]
                ix.nstart[q] = ix.dstart[d * n + r]
                ix.nend[q] = ix.dend[d * n + r]
                ix.nlo[q] = k
                ix.nmono[q] = True
            ix.nhi[q] = k + 1


cdef void _link_levels(Index* ix) noexcept nogil:
    # Link levels: the children of a level-lvl node are the level-(lvl+1) nodes whose
    # position ranges lie inside its own. The last level keeps positions in `order`.
    cdef isize lvl, child, q, p, nd = ix.nd
    for lvl in range(nd - 1):
        child = ix.lbase[lvl + 1]
        for q in range(ix.lbase[lvl], ix.lbase[lvl + 1]):
            p = ix.nhi[q]
            ix.nlo[q] = child
            while child < ix.lbase[lvl + 2] and ix.nlo[child] < p:
                if child > ix.nlo[q] and ix.nend[child] < ix.nend[child - 1]:
                    ix.nmono[q] = False
                child += 1
            ix.nhi[q] = child
    ix.rootmono = True
    if nd > 0:
        for q in range(ix.lbase[0] + 1, ix.lbase[1]):
            if ix.nend[q] < ix.nend[q - 1]:
                ix.rootmono = False
                break


# ---------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------

cdef inline isize _first_start_ge(const i64* starts, isize lo, isize hi, i64 x) noexcept nogil:
    # First position in [lo, hi) whose start >= x (starts sorted ascending).
    cdef isize mid
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if starts[mid] >= x:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef inline isize _first_end_gt(const i64* ends, isize lo, isize hi, i64 x) noexcept nogil:
    # First position in [lo, hi) whose end > x (ends sorted ascending).
    cdef isize mid
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if ends[mid] > x:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef int _query_trie(const Index* ix, isize lvl, isize c_lo, isize c_hi, bint mono,
                     const i64* qoff, const i64* qsize, IdxBuf* out) except -1 nogil:
    # Report every saved chunk under nodes [c_lo, c_hi) of level lvl overlapping the query.
    cdef isize d = ix.perm[lvl]
    cdef i64 qs = qoff[d]
    cdef i64 qe = qs + qsize[d]
    cdef isize hi = _first_start_ge(ix.nstart, c_lo, c_hi, qe)
    cdef isize lo, c, p
    if mono:
        lo = _first_end_gt(ix.nend, c_lo, hi, qs)
    else:
        lo = c_lo
    for c in range(lo, hi):
        # In a monotone range every child here overlaps; otherwise filter.
        if not mono and ix.nend[c] <= qs:
            continue
        if lvl == ix.nd - 1:
            for p in range(ix.nlo[c], ix.nhi[c]):
                buf_push(out, ix.order[p])
        else:
            _query_trie(ix, lvl + 1, ix.nlo[c], ix.nhi[c], ix.nmono[c], qoff, qsize, out)
    return 0


cdef int _query_grid(const Index* ix, const i64* qoff, const i64* qsize,
                     isize* lo, isize* hi, isize* cur, i64* memo, IdxBuf* out) except -1 nogil:
    # One binary-search pair per dimension, then the product of the ranges.
    # memo[2d], memo[2d+1] hold the last interval searched in dimension d, whose
    # range lo[d]..hi[d] still stands: local chunks in row-major order repeat
    # their outer intervals, so most searches in outer dimensions are skipped.
    cdef isize d, nd = ix.nd, base, cnt, p
    cdef i64 qs, qe
    cdef bint empty = False
    for d in range(nd):
        qs = qoff[d]
        qe = qs + qsize[d]
        if memo[2 * d] != qs or memo[2 * d + 1] != qe:
            base = ix.dbase[d]
            cnt = ix.dcount[d]
            hi[d] = _first_start_ge(ix.dstart + base, 0, cnt, qe)
            lo[d] = _first_end_gt(ix.dend + base, 0, hi[d], qs)
            memo[2 * d] = qs
            memo[2 * d + 1] = qe
        if lo[d] >= hi[d]:
            empty = True
        cur[d] = lo[d]
    if empty:
        return 0
    # Odometer over the product, last dimension fastest (row-major cell order).
    while True:
        p = 0
        for d in range(nd):
            p += cur[d] * ix.cstride[d]
        buf_push(out, ix.cell[p])
        d = nd - 1
        while d >= 0:
            cur[d] += 1
            if cur[d] < hi[d]:
                break
            cur[d] = lo[d]
            d -= 1
        if d < 0:
            return 0


cdef inline bint _small(isize nl, isize ns) noexcept nogil:
    # Few pairs: checking them all beats building an index over the saved chunks
    # (one rank's chunk against a few dozen saved ones is the common DCP call).
    return nl * ns <= 64 * (nl + ns)


cdef int intersect_pairs(const i64* loff, const i64* lsize, isize nl,
                         const i64* soff, const i64* ssize, isize ns, isize nd,
                         int path, IdxBuf* out, isize* seg) except -1 nogil:
    """For each local chunk in order, append its overlapping saved indices (ascending)
    to ``out``; ``seg[i] .. seg[i+1]`` delimit local chunk i's run (seg has nl+1 slots).
    Inputs must already be checked (non-negative, no int64 overflow). ``path`` is
    PATH_AUTO, or forces one of PATH_BRUTE, PATH_GRID (the grid when the saved
    chunks form one, else the trie) and PATH_TRIE."""
    cdef Index ix
    cdef isize i, j, start
    cdef isize* lo = NULL
    cdef isize* hi = NULL
    cdef isize* cur = NULL
    cdef i64* memo = NULL
    # Zeroed, so the one cleanup path below may free it whether or not it was built.
    memset(&ix, 0, sizeof(Index))
    seg[0] = 0
    if nd == 0 or path == PATH_BRUTE or (path == PATH_AUTO and _small(nl, ns)):
        # 0-d tensors (every pair overlaps: box_overlap of 0 dimensions is true),
        # or few enough pairs to check each one.
        for i in range(nl):
            for j in range(ns):
                if box_overlap(loff + i * nd, lsize + i * nd, soff + j * nd, ssize + j * nd, nd):
                    buf_push(out, j)
            seg[i + 1] = out.len
        return 0
    try:
        index_build(&ix, soff, ssize, ns, nd, path == PATH_TRIE)
        # A reshard reports about one pair per chunk on either side plus the crossings:
        # reserving nl + ns up front saves most of the doubling copies.
        if out.cap < nl + ns:
            _buf_reserve(out, nl + ns)
        lo = <isize*>safe_alloc(nd, sizeof(isize))
        hi = <isize*>safe_alloc(nd, sizeof(isize))
        cur = <isize*>safe_alloc(nd, sizeof(isize))
        memo = <i64*>safe_alloc(2 * nd, sizeof(i64))
        for i in range(2 * nd):
            memo[i] = -1     # offsets are non-negative: matches no interval
        for i in range(nl):
            start = out.len
            if ix.grid and path != PATH_TRIE:
                _query_grid(&ix, loff + i * nd, lsize + i * nd, lo, hi, cur, memo, out)
            else:
                _query_trie(&ix, 0, ix.lbase[0], ix.lbase[1], ix.rootmono,
                            loff + i * nd, lsize + i * nd, out)
            _sort_small(out.data + start, out.len - start)
            seg[i + 1] = out.len
    finally:
        free(lo)
        free(hi)
        free(cur)
        free(memo)
        index_free(&ix)
    return 0


cdef void fill_pairs(const i64* loff, const i64* lsize, const i64* soff, const i64* ssize,
                     isize nd, isize nl, const isize* seg, const isize* sidx,
                     i64* li, i64* si, i64* so, i64* do, i64* ln) noexcept nogil:
    # Per pair and dimension, torch's narrowing: offsets relative to each chunk.
    cdef isize i, p, d, s
    cdef i64 a0, a1, b0, b1
    for i in range(nl):
        for p in range(seg[i], seg[i + 1]):
            s = sidx[p]
            li[p] = i
            si[p] = s
            for d in range(nd):
                a0 = loff[i * nd + d]
                a1 = a0 + lsize[i * nd + d]
                b0 = soff[s * nd + d]
                b1 = b0 + ssize[s * nd + d]
                so[p * nd + d] = a0 - b0 if a0 > b0 else 0
                do[p * nd + d] = b0 - a0 if b0 > a0 else 0
                ln[p * nd + d] = (a1 if a1 < b1 else b1) - (a0 if a0 > b0 else b0)


_PATHS = {"auto": PATH_AUTO, "brute": PATH_BRUTE, "grid": PATH_GRID, "trie": PATH_TRIE}


def intersect(const i64[:, ::1] local_offsets, const i64[:, ::1] local_sizes,
              const i64[:, ::1] saved_offsets, const i64[:, ::1] saved_sizes,
              str path="auto"):
    """Every overlapping (local, saved) pair and its narrowing, in canonical order.

    Inputs are (N, ndim) and (M, ndim) C-contiguous int64 arrays, already
    checked with :func:`check_boxes`. Returns ``(local_index, saved_index,
    storage_offsets, dest_offsets, lengths)``: int64 arrays of shape (K,),
    (K,), (K, ndim), (K, ndim), (K, ndim). ``path`` forces one search for
    tests and measurements: ``"brute"`` (every pair), ``"grid"`` (the
    product-grid path when the saved chunks form a grid, else the trie),
    ``"trie"``; ``"auto"`` picks brute force for few pairs, else the grid or
    the trie.
    """
    cdef isize nl = local_offsets.shape[0], ns = saved_offsets.shape[0]
    cdef isize nd = local_offsets.shape[1]
    if (local_sizes.shape[0] != nl or local_sizes.shape[1] != nd
            or saved_sizes.shape[0] != ns or saved_sizes.shape[1] != saved_offsets.shape[1]):
        raise ValueError("offsets and sizes arrays must have the same shape")
    if path not in _PATHS:
        raise ValueError(f"path must be one of {sorted(_PATHS)}, got {path!r}")
    cdef int path_code = _PATHS[path]
    if saved_offsets.shape[1] != nd:
        raise ValueError(
            f"local chunks have {nd} dimensions but saved chunks have {saved_offsets.shape[1]}")
    cdef IdxBuf out
    out.data = NULL
    out.len = 0
    out.cap = 0
    cdef isize* seg = <isize*>safe_alloc(nl + 1, sizeof(isize))
    # Empty arrays have no element 0 to take the address of.
    cdef i64 dummy = 0
    cdef const i64* lo_p = &local_offsets[0, 0] if nl and nd else &dummy
    cdef const i64* ls_p = &local_sizes[0, 0] if nl and nd else &dummy
    cdef const i64* so_p = &saved_offsets[0, 0] if ns and nd else &dummy
    cdef const i64* ss_p = &saved_sizes[0, 0] if ns and nd else &dummy
    cdef isize k
    cdef i64[::1] li_v, si_v
    cdef i64[:, ::1] so_v, do_v, ln_v
    try:
        if nl and ns:
            with nogil:
                intersect_pairs(lo_p, ls_p, nl, so_p, ss_p, ns, nd, path_code, &out, seg)
        else:
            for k in range(nl + 1):
                seg[k] = 0
        k = out.len
        li = np.empty(k, dtype=np.int64)
        si = np.empty(k, dtype=np.int64)
        so = np.empty((k, nd), dtype=np.int64)
        do = np.empty((k, nd), dtype=np.int64)
        ln = np.empty((k, nd), dtype=np.int64)
        if k:
            li_v = li
            si_v = si
            so_v = so
            do_v = do
            ln_v = ln
            with nogil:
                fill_pairs(lo_p, ls_p, so_p, ss_p, nd, nl, seg, out.data,
                           &li_v[0], &si_v[0],
                           &so_v[0, 0] if nd else &dummy,
                           &do_v[0, 0] if nd else &dummy,
                           &ln_v[0, 0] if nd else &dummy)
        return li, si, so, do, ln
    finally:
        free(out.data)
        free(seg)


def _py_live_indexes():
    """Test hook: the number of chunk indexes built and not yet freed (0 when idle)."""
    return ck_atomic_load(&_live_indexes)


def _py_fail_reserve(bint on):
    """Test hook: make every reservation of the output buffer fail (MemoryError) while on."""
    global _fail_reserve
    _fail_reserve = on


def _py_index_summary(const i64[:, ::1] offsets, const i64[:, ::1] sizes):
    """Test hook: build the index over ``offsets``/``sizes`` and describe it.

    Returns a dict with ``grid`` (product grid detected), ``perm`` (trie level
    dimensions), ``dcount`` (distinct intervals per dimension), ``nodes``
    (trie nodes per level) and ``mono`` (per-dimension cut lists monotone).
    """
    cdef Index ix
    cdef isize n = offsets.shape[0], nd = offsets.shape[1], d
    if n == 0 or nd == 0:
        raise ValueError("need at least one chunk of at least one dimension")
    with nogil:
        index_build(&ix, &offsets[0, 0], &sizes[0, 0], n, nd, True)
    try:
        return {
            "grid": bool(ix.grid),
            "perm": [ix.perm[d] for d in range(nd)],
            "dcount": [ix.dcount[d] for d in range(nd)],
            "nodes": [ix.lbase[d + 1] - ix.lbase[d] for d in range(nd)],
            "mono": [bool(ix.dmono[d]) for d in range(nd)],
        }
    finally:
        index_free(&ix)
