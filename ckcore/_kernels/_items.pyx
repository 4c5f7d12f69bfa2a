"""The object boundary: chunk lists in, plan item lists out.

Everything numeric happens in ``_intersect`` with the GIL released; this
module does the part that must touch Python objects, as cheaply as CPython
allows:

* ``chunk_arrays`` reads ``.offsets``/``.sizes`` of any chunk objects
  (ckcore's or torch's) into (N, ndim) int64 arrays, checking every value
  (an int, not a float or bool; non-negative; offset+size and the volume
  within int64) and naming the fqn and the chunk when one is wrong.
* ``build_read_items`` turns intersection arrays into ReadItem objects of the
  caller's classes (ckcore's or torch's). Index objects are built once per
  chunk and shared; a frozen dataclass is created with object's own
  ``tp_new`` and its fields stored with ``PyObject_GenericSetAttr`` (what
  ``object.__setattr__`` does, minus the Python-level call): the same fields
  as the generated ``__init__`` sets, at a fifth of its cost (callgrind:
  ~2000 instructions per ReadItem against ~9800 through ``__init__``).
* ``plan_reads`` does all of it for a whole local load plan at once: every
  tensor's chunks read (from chunk objects or from metadata columns), every
  intersection and cover check made in one GIL-free pass, then every item
  built; what it does not take as is, it hands back to the caller.
"""

from cpython.tuple cimport (
    PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM,
)
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.list cimport PyList_GET_ITEM, PyList_New, PyList_SET_ITEM
from ckcore._kernels._capi cimport (
    PyObject_GenericSetAttr, ck_hash_key, ck_mix64, ck_new_instance, ck_plain_new,
)
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from ckcore._kernels._coverage cimport C_OK, check_reads
from ckcore._kernels._gcpause cimport gc_pause, gc_resume
from ckcore._kernels._intersect cimport PATH_AUTO, IdxBuf, fill_pairs, intersect_pairs
from ckcore._kernels._types cimport i64, isize, u64
from ckcore._kernels._util cimport (
    index_int, safe_alloc, safe_calloc, safe_realloc, to_i64, volume_overflows,
)
from libc.stdint cimport INT64_MAX

import numpy as np

cdef str _DICT = "__dict__"


cdef inline object _object_new(type cls):
    # object.__new__(cls) minus the Python-level wrapper. Only valid for classes
    # whose instances object itself allocates, i.e. plain Python classes such as
    # dataclasses: checked by _check_plain_class before the loop.
    return ck_new_instance(cls)


cdef int _check_plain_class(object cls, str role) except -1:
    if not isinstance(cls, type):
        raise TypeError(f"{role} must be a class, got {cls!r}")
    if not ck_plain_new(cls):
        raise TypeError(f"{role} {cls.__qualname__} defines its own __new__; need a plain dataclass")
    if not hasattr(cls, "__dataclass_fields__"):
        raise TypeError(f"{role} {cls.__qualname__} is not a dataclass")
    return 0


# Interned attribute names: set one by one, CPython stores them straight into the
# instance's inline values (3.11+) instead of building and then swapping a dict.
cdef str _TYPE = "type"
cdef str _DEST_INDEX = "dest_index"
cdef str _DEST_OFFSETS = "dest_offsets"
cdef str _STORAGE_INDEX = "storage_index"
cdef str _STORAGE_OFFSETS = "storage_offsets"
cdef str _LENGTHS = "lengths"
cdef str _FQN = "fqn"
cdef str _OFFSET = "offset"
cdef str _INDEX = "index"
cdef str _OFFSETS = "offsets"
cdef str _SIZES = "sizes"


cdef inline i64 _as_i64(object v, object fqn, isize i, object chunk, str what) except? -1:
    # Exact ints take the fast path; anything else must be an integer by __index__
    # (numpy integers are; floats and strings are not). bool is an int in Python
    # and torch.Size accepts it, so it is accepted here too.
    cdef i64 r = 0
    if not to_i64(v, &r):
        return r
    n = index_int(v)
    if n is None:
        raise TypeError(
            f"{fqn}: chunk {i} {chunk!r}: {what} must be integers, got {type(v).__name__} {v!r}")
    if to_i64(n, &r):
        raise ValueError(
            f"{fqn}: chunk {i} {chunk!r}: {what} value {n} does not fit in int64")
    return r


cdef isize _chunk_ndim(tuple chunks, object fqn, object ndim) except -1:
    # The number of dimensions of chunk 0, checked against the tensor's (ndim).
    cdef isize nd
    try:
        first = chunks[0]
        nd = len(first.offsets)
    except AttributeError:
        raise TypeError(
            f"{fqn}: chunk 0 {chunks[0]!r} is not a chunk (needs .offsets and .sizes)") from None
    except TypeError:
        raise TypeError(f"{fqn}: chunk 0 {chunks[0]!r}: offsets must be a sequence") from None
    if ndim is not None and nd != ndim:
        raise ValueError(
            f"{fqn}: chunk 0 {first!r} has {nd} dimensions but the tensor has {ndim}")
    return nd


cdef int _chunk_rows_into(tuple chunks, object fqn, isize nd, bint nd_is_tensors,
                          i64* ov, i64* sv, list offs_out) except -1:
    # Every chunk's offsets and sizes into ov/sv (row-major, nd per chunk), each
    # value checked: an integer, non-negative, offset+size and volume within int64.
    # With offs_out (a list of len(chunks)), each chunk's offsets object as read
    # (a tuple) is kept there: the items built later name exactly the offsets
    # whose numbers were intersected, without reading the attribute again.
    cdef isize n = len(chunks), i, d
    cdef i64 o, s, vol
    cdef object chunk, offs, sizes
    for i in range(n):
        chunk = chunks[i]
        try:
            offs = chunk.offsets
            sizes = chunk.sizes
        except AttributeError:
            raise TypeError(
                f"{fqn}: chunk {i} {chunk!r} is not a chunk (needs .offsets and .sizes)") from None
        if not (PyTuple_Check(offs) and PyTuple_Check(sizes)):
            # tuple and torch.Size (a tuple subclass) are read in place below; anything
            # else (a list, an array, a set that has len() but no indexing) is copied
            # into a tuple once, or refused.
            try:
                offs = tuple([offs[d] for d in range(len(offs))])
                sizes = tuple([sizes[d] for d in range(len(sizes))])
            except (TypeError, KeyError, IndexError):
                raise TypeError(
                    f"{fqn}: chunk {i} {chunk!r}: offsets and sizes must be sequences") from None
        if PyTuple_GET_SIZE(offs) != nd or PyTuple_GET_SIZE(sizes) != nd:
            raise ValueError(
                f"{fqn}: chunk {i} {chunk!r} has {len(offs)} offsets and {len(sizes)} sizes "
                f"but {'the tensor has' if nd_is_tensors else 'chunk 0 has'} "
                f"{nd} dimensions")
        for d in range(nd):
            o = _as_i64(<object>PyTuple_GET_ITEM(offs, d), fqn, i, chunk, "offsets")
            s = _as_i64(<object>PyTuple_GET_ITEM(sizes, d), fqn, i, chunk, "sizes")
            if o < 0 or s < 0:
                raise ValueError(f"{fqn}: chunk {i} {chunk!r} has a negative offset or size")
            if o > INT64_MAX - s:
                raise ValueError(
                    f"{fqn}: chunk {i} {chunk!r}: offset + size overflows int64 in dimension {d}")
            ov[i * nd + d] = o
            sv[i * nd + d] = s
        if volume_overflows(sv + i * nd, nd, &vol):
            raise ValueError(f"{fqn}: chunk {i} {chunk!r}: volume overflows int64")
        if offs_out is not None:
            offs_out[i] = offs
    return 0


def chunk_arrays(chunks, fqn="<chunks>", ndim=None):
    """Read a list of chunk objects into validated (N, ndim) int64 arrays.

    ``chunks`` is a sequence of objects with ``.offsets`` and ``.sizes``
    (ckcore's or torch's ``ChunkStorageMetadata``). ``ndim``, when given, is
    the number of dimensions every chunk must have (the tensor's). Raises
    ``TypeError`` for objects without those attributes or non-integer values
    and ``ValueError`` for a wrong number of dimensions, negative values, or
    an offset+size or volume beyond int64; each message names ``fqn`` and the
    chunk.
    """
    # A snapshot the call owns: another thread (or a property or __index__ run
    # while reading) may change the caller's list; sizes and indices below
    # stay those of the snapshot.
    cdef tuple chunk_list = tuple(chunks)
    cdef isize n = len(chunk_list), nd
    cdef i64 dummy = 0
    if n == 0:
        nd = ndim if ndim is not None else 0
        return np.zeros((0, nd), dtype=np.int64), np.zeros((0, nd), dtype=np.int64)
    nd = _chunk_ndim(chunk_list, fqn, ndim)
    out_off = np.empty((n, nd), dtype=np.int64)
    out_size = np.empty((n, nd), dtype=np.int64)
    cdef i64[:, ::1] ov = out_off
    cdef i64[:, ::1] sv = out_size
    _chunk_rows_into(chunk_list, fqn, nd, ndim is not None,
                     &ov[0, 0] if nd else &dummy, &sv[0, 0] if nd else &dummy, None)
    return out_off, out_size


cdef inline tuple _row(const i64* a, isize nd):
    cdef tuple t = PyTuple_New(nd)
    cdef isize d
    cdef object v
    for d in range(nd):
        v = a[d]
        Py_INCREF(v)
        PyTuple_SET_ITEM(t, d, v)
    return t


cdef inline size_t _hash_row(const i64* a, isize nd) noexcept nogil:
    # Keyed (ck_hash_key): the rows derive from a file's chunks, and an
    # unkeyed hash would let a crafted .metadata put them all in one slot.
    cdef u64 h = ck_hash_key()
    cdef isize d
    for d in range(nd):
        h = ck_mix64(h ^ <u64>a[d])
    return <size_t>h


cdef class _RowCache:
    """Interns offset/length rows: equal rows share one tuple (or torch.Size).

    A resharded load repeats a handful of distinct offset and length rows
    across thousands of items; looking a row up in this open-addressing table
    costs less than building the tuple, and far less than a torch.Size.
    """

    cdef isize nd, cap, count
    cdef i64* rows          # cap * nd
    cdef isize* slots       # cap, -1 = empty, else entry number
    cdef list values        # entry number -> object (keeps references)
    cdef object wrap

    def __cinit__(self, isize nd, object wrap):
        self.nd = nd
        self.cap = 0
        self.count = 0
        self.rows = NULL
        self.slots = NULL
        self.values = []
        self.wrap = None if wrap is tuple else wrap
        self._grow(1024)

    def __dealloc__(self):
        free(self.rows)
        free(self.slots)

    cdef int _grow(self, isize newcap) except -1:
        cdef i64* rows = <i64*>malloc(<size_t>newcap * (self.nd if self.nd else 1) * sizeof(i64))
        cdef isize* slots = <isize*>malloc(<size_t>newcap * sizeof(isize))
        cdef isize i, e, h
        if rows == NULL or slots == NULL:
            free(rows)
            free(slots)
            raise MemoryError()
        for i in range(newcap):
            slots[i] = -1
        if self.count:
            memcpy(rows, self.rows, <size_t>self.count * self.nd * sizeof(i64))
        for e in range(self.count):
            h = _hash_row(rows + e * self.nd, self.nd) & (newcap - 1)
            while slots[h] >= 0:
                h = (h + 1) & (newcap - 1)
            slots[h] = e
        free(self.rows)
        free(self.slots)
        self.rows = rows
        self.slots = slots
        self.cap = newcap
        return 0

    cdef object get(self, const i64* row):
        cdef isize nd = self.nd, h, e, d
        cdef bint same
        h = _hash_row(row, nd) & (self.cap - 1)
        while True:
            e = self.slots[h]
            if e < 0:
                break
            same = True
            for d in range(nd):
                if self.rows[e * nd + d] != row[d]:
                    same = False
                    break
            if same:
                return self.values[e]
            h = (h + 1) & (self.cap - 1)
        # A new row: build its object and remember it. Keep the table at most half full.
        v = _row(row, nd)
        if self.wrap is not None:
            v = self.wrap(v)
        e = self.count
        if 2 * (e + 1) > self.cap:
            self.values.append(v)
            self._grow_keep(row, e)
            return v
        memcpy(self.rows + e * nd, row, <size_t>nd * sizeof(i64))
        self.slots[h] = e
        self.values.append(v)
        self.count = e + 1
        return v

    cdef int _grow_keep(self, const i64* row, isize e) except -1:
        # Grow first (rehashing existing entries), then insert entry e.
        cdef isize h
        self._grow(self.cap * 2)
        memcpy(self.rows + e * self.nd, row, <size_t>self.nd * sizeof(i64))
        h = _hash_row(row, self.nd) & (self.cap - 1)
        while self.slots[h] >= 0:
            h = (h + 1) & (self.cap - 1)
        self.slots[h] = e
        self.count = e + 1
        return 0


cdef inline object _index_obj(object cls, str fqn, object offsets, isize i, object size_cls):
    # MetadataIndex(fqn, offsets, i) without its Python __init__: the same three fields,
    # with offset normalised to size_cls as both torch's and ckcore's __init__ do.
    if type(offsets) is not size_cls:
        offsets = size_cls(offsets)
    cdef object obj = _object_new(cls)
    PyObject_GenericSetAttr(obj, _FQN, fqn)
    PyObject_GenericSetAttr(obj, _OFFSET, offsets)
    PyObject_GenericSetAttr(obj, _INDEX, i)
    return obj


cdef inline object _make_item(type cls, object tensor_type, object dest_index,
                              object dest_offsets, object storage_index,
                              object storage_offsets, object lengths):
    # A ReadItem with exactly the fields its dataclass __init__ would set.
    cdef object item = _object_new(cls)
    PyObject_GenericSetAttr(item, _TYPE, tensor_type)
    PyObject_GenericSetAttr(item, _DEST_INDEX, dest_index)
    PyObject_GenericSetAttr(item, _DEST_OFFSETS, dest_offsets)
    PyObject_GenericSetAttr(item, _STORAGE_INDEX, storage_index)
    PyObject_GenericSetAttr(item, _STORAGE_OFFSETS, storage_offsets)
    PyObject_GenericSetAttr(item, _LENGTHS, lengths)
    return item


def build_read_items(str fqn,
                     const i64[::1] local_index, const i64[::1] saved_index,
                     const i64[:, ::1] storage_offsets, const i64[:, ::1] dest_offsets,
                     const i64[:, ::1] lengths,
                     local_chunks, saved_chunks,
                     read_item_cls, metadata_index_cls, tensor_type, size_cls,
                     saved_offsets=None):
    """ReadItem objects for intersection arrays, built directly.

    ``local_chunks`` and ``saved_chunks`` are sequences of chunk objects
    (read once, into a snapshot the call owns). With ``saved_offsets`` (an
    int64 ``(n, ndim)`` array: saved chunks as columns) ``saved_chunks`` is
    not read: storage indices take their offsets from its rows. ``read_item_cls`` and
    ``metadata_index_cls`` must be dataclasses with the fields of DCP's
    ReadItem and MetadataIndex (ckcore's or torch's); index objects are built
    once per distinct chunk and shared by its items, as are equal
    offset/length rows. ``size_cls`` wraps each row (``tuple``, or
    ``torch.Size`` for torch's classes).
    """
    # Snapshots: chunk numbers below are checked against these lengths and
    # index these tuples, whatever happens to the caller's lists meanwhile.
    cdef tuple local_snap = tuple(local_chunks)
    cdef bint by_rows = saved_offsets is not None
    cdef const i64[:, ::1] srows = saved_offsets if by_rows else None
    cdef tuple saved_snap = () if by_rows else tuple(saved_chunks)
    cdef isize k = local_index.shape[0], p, li, si
    cdef isize nd = lengths.shape[1]
    cdef isize nloc = len(local_snap)
    cdef isize nsav = srows.shape[0] if by_rows else len(saved_snap)
    cdef list out = PyList_New(k)
    cdef list dest_idx = [None] * nloc
    cdef list stor_idx = [None] * nsav
    cdef object item, di, st
    cdef _RowCache cache = _RowCache(nd, size_cls)
    cdef i64 zero = 0
    _check_plain_class(read_item_cls, "read_item_cls")
    _check_plain_class(metadata_index_cls, "metadata_index_cls")
    if k and (storage_offsets.shape[0] != k or dest_offsets.shape[0] != k or lengths.shape[0] != k
              or saved_index.shape[0] != k or storage_offsets.shape[1] != nd
              or dest_offsets.shape[1] != nd):
        raise ValueError(f"{fqn}: intersection arrays disagree in shape")
    if by_rows and nsav and srows.shape[1] != nd:
        raise ValueError(f"{fqn}: saved_offsets has {srows.shape[1]} columns, the reads {nd}")
    # Tens of thousands of new container objects would trigger the cyclic GC over and
    # over (each pass walking every live object); none of them can form a cycle.
    gc_pause()
    try:
        for p in range(k):
            li = local_index[p]
            si = saved_index[p]
            if li < 0 or li >= nloc or si < 0 or si >= nsav:
                raise ValueError(f"{fqn}: pair {p} refers to chunk ({li}, {si}) out of range")
            di = dest_idx[li]
            if di is None:
                di = _index_obj(metadata_index_cls, fqn, local_snap[li].offsets, li, size_cls)
                dest_idx[li] = di
            st = stor_idx[si]
            if st is None:
                if by_rows:
                    st = _index_obj(metadata_index_cls, fqn, cache.get(&srows[si, 0] if nd else &zero),
                                    si, size_cls)
                else:
                    st = _index_obj(metadata_index_cls, fqn, saved_snap[si].offsets, si, size_cls)
                stor_idx[si] = st
            item = _make_item(
                read_item_cls, tensor_type,
                di, cache.get(&dest_offsets[p, 0] if nd else &zero),
                st, cache.get(&storage_offsets[p, 0] if nd else &zero),
                cache.get(&lengths[p, 0] if nd else &zero))
            Py_INCREF(item)
            PyList_SET_ITEM(out, p, item)
    finally:
        gc_resume()
    return out


def read_items(str fqn, local_chunks, saved_chunks, isize ndim,
               read_item_cls, metadata_index_cls, tensor_type, size_cls, bint verify=False):
    """ReadItems filling ``local_chunks`` from ``saved_chunks``, chunk objects in, items out.

    The one-call path behind ``create_read_items_for_chunk_list``: chunks are
    read into C buffers (checked as :func:`chunk_arrays` checks them, against
    the tensor's ``ndim``, local chunks first), intersected with the GIL
    released, and the items built straight from the pairs, with no
    intermediate arrays. Classes as in :func:`build_read_items`. Canonical
    order: by local chunk, then saved chunk.

    With ``verify``, the reads must also fill every local chunk exactly once
    (``_coverage.check_reads``, before any object is built); when they do
    not, or the check cannot decide cheaply, or either list is empty, the
    result is None and the caller runs the array path, which names the
    problem.

    Both chunk sequences are read once, into snapshots the call owns: the
    items built after the GIL-free intersection index those snapshots and
    name the offsets objects whose numbers were intersected, so another
    thread changing the caller's lists meanwhile cannot make the call read
    past them.
    """
    cdef tuple local_snap = tuple(local_chunks)
    cdef tuple saved_snap = tuple(saved_chunks)
    cdef isize nl = len(local_snap), ns = len(saved_snap), nd = ndim
    cdef isize k
    cdef i64* lo = NULL
    cdef i64* ls = NULL
    cdef i64* so = NULL
    cdef i64* ss = NULL
    cdef i64* rows = NULL
    cdef i64* li = NULL
    cdef isize* seg = NULL
    cdef isize cover[4]
    cdef IdxBuf out
    cdef list loffs, soffs
    cdef int code = C_OK
    if nd < 0:
        raise ValueError(f"{fqn}: ndim must be non-negative, got {nd}")
    if nl == 0 or ns == 0:
        return None if verify else []
    _check_plain_class(read_item_cls, "read_item_cls")
    _check_plain_class(metadata_index_cls, "metadata_index_cls")
    out.data = NULL
    out.len = 0
    out.cap = 0
    try:
        lo = <i64*>safe_alloc(<size_t>nl * nd + 1, sizeof(i64))
        ls = <i64*>safe_alloc(<size_t>nl * nd + 1, sizeof(i64))
        so = <i64*>safe_alloc(<size_t>ns * nd + 1, sizeof(i64))
        ss = <i64*>safe_alloc(<size_t>ns * nd + 1, sizeof(i64))
        seg = <isize*>safe_alloc(nl + 1, sizeof(isize))
        loffs = [None] * nl
        soffs = [None] * ns
        _chunk_ndim(local_snap, fqn, nd)
        _chunk_rows_into(local_snap, fqn, nd, True, lo, ls, loffs)
        _chunk_ndim(saved_snap, fqn, nd)
        _chunk_rows_into(saved_snap, fqn, nd, True, so, ss, soffs)
        with nogil:
            intersect_pairs(lo, ls, nl, so, ss, ns, nd, PATH_AUTO, &out, seg)
        k = out.len
        # Every pair's (storage offsets, dest offsets, lengths), as three
        # k x nd blocks, and its local and saved chunk (li, li + k).
        rows = <i64*>safe_alloc(3 * <size_t>k * nd + 1, sizeof(i64))
        li = <i64*>safe_alloc(2 * <size_t>k + 1, sizeof(i64))
        with nogil:
            fill_pairs(lo, ls, so, ss, nd, nl, seg, out.data, li, li + k,
                       rows, rows + k * nd, rows + 2 * k * nd)
            if verify:
                code = check_reads(li, rows + k * nd, rows + 2 * k * nd, k, ls, nl, nd, 64, cover)
        if code != C_OK:
            return None
        return _items_from_pairs(fqn, nl, ns, nd, k, seg, li, rows, loffs, soffs,
                                 read_item_cls, metadata_index_cls, tensor_type, size_cls)
    finally:
        free(lo)
        free(ls)
        free(so)
        free(ss)
        free(rows)
        free(li)
        free(seg)
        free(out.data)


cdef list _items_from_pairs(str fqn, isize nl, isize ns, isize nd, isize k, const isize* seg,
                            const i64* li, const i64* rows, list loffs, list soffs,
                            read_item_cls, metadata_index_cls, tensor_type, size_cls):
    """read_items' ReadItems from the k pairs: pair p joins local chunk i (its
    run seg[i]..seg[i+1]) and saved chunk li[k + p]; rows holds the pairs'
    storage offsets, dest offsets and lengths as three k x nd blocks."""
    cdef list items = PyList_New(k)
    cdef list dest_idx = [None] * nl
    cdef list stor_idx = [None] * ns
    cdef _RowCache cache = _RowCache(nd, size_cls)
    cdef isize i, p, s
    cdef object di, st, dro, sro, lro
    # As in build_read_items: no cycles among the new objects, so no GC passes.
    gc_pause()
    try:
        for i in range(nl):
            for p in range(seg[i], seg[i + 1]):
                s = li[k + p]
                di = dest_idx[i]
                if di is None:
                    di = _index_obj(metadata_index_cls, fqn, loffs[i], i, size_cls)
                    dest_idx[i] = di
                st = stor_idx[s]
                if st is None:
                    st = _index_obj(metadata_index_cls, fqn, soffs[s], s, size_cls)
                    stor_idx[s] = st
                sro = cache.get(rows + p * nd)
                dro = cache.get(rows + (k + p) * nd)
                lro = cache.get(rows + (2 * k + p) * nd)
                item = _make_item(read_item_cls, tensor_type, di, dro, st, sro, lro)
                Py_INCREF(item)
                PyList_SET_ITEM(items, p, item)
    finally:
        gc_resume()
    return items


def new_frozen(cls, dict fields):
    """Create an instance of the (frozen) dataclass ``cls`` with ``fields`` as its ``__dict__``.

    The caller guarantees ``fields`` names exactly the dataclass's fields.
    """
    _check_plain_class(cls, "cls")
    obj = _object_new(cls)
    PyObject_GenericSetAttr(obj, _DICT, fields)
    return obj


# ---------------------------------------------------------------------------
# One rank's whole local load plan in one call
# ---------------------------------------------------------------------------

cdef struct _Tensor:
    # One tensor of plan_reads: where its rows are and what became of it.
    isize nd        # dimensions
    isize ns        # saved chunks
    isize lval      # first value of its local chunk in lo/ls
    isize sval      # first value of its saved chunks in so/ss (or the columns)
    isize schunk    # its first saved chunk in the saved offsets list (or the columns)
    isize pbase     # its first pair
    isize pval      # its first pair value (pbase * nd for all tensors before it)
    isize k         # its pairs
    bint slow       # left to the caller's one-tensor path


cdef inline bint _box_ok(const i64* off, const i64* size, isize nd) noexcept nogil:
    # The checks chunk_arrays makes of one chunk: non-negative, offset + size and
    # the volume within int64.
    cdef isize d
    cdef i64 vol
    for d in range(nd):
        if off[d] < 0 or size[d] < 0 or off[d] > INT64_MAX - size[d]:
            return False
    return not volume_overflows(size, nd, &vol)


cdef extern from *:
    """
    /* An exact int of at most one digit (0 <= v < 2**30, every size and
       offset of a model's tensors) read in place; 0 for anything else, which
       the caller reads the general way. */
    static inline int ck_small_int(PyObject* v, int64_t* out) {
        if (!PyLong_CheckExact(v)) return 0;
    #if PY_VERSION_HEX >= 0x030C0000
        if (!PyUnstable_Long_IsCompact((PyLongObject*)v)) return 0;
        *out = (int64_t)PyUnstable_Long_CompactValue((PyLongObject*)v);
        return 1;
    #else
        Py_ssize_t size = Py_SIZE(v);
        if (size == 0) { *out = 0; return 1; }
        if (size == 1) { *out = (int64_t)((PyLongObject*)v)->ob_digit[0]; return 1; }
        return 0;
    #endif
    }
    """
    bint ck_small_int(object v, i64* out) noexcept


cdef inline bint _read_value(object v, i64* out) noexcept:
    # An exact int64 from a Python int: True; False for anything else.
    if ck_small_int(v, out):
        return True
    return not to_i64(v, out)


cdef inline bint _read_row(object offs, object sizes, isize nd, i64* ov, i64* sv) noexcept:
    # One chunk's offsets and sizes (tuples, or torch.Size) of nd exact ints
    # into ov/sv, checked as _box_ok checks; False for anything else (the
    # caller's one-tensor path names it).
    cdef isize d
    if not (PyTuple_Check(offs) and PyTuple_Check(sizes)):
        return False
    if PyTuple_GET_SIZE(offs) != nd or PyTuple_GET_SIZE(sizes) != nd:
        return False
    for d in range(nd):
        if not _read_value(<object>PyTuple_GET_ITEM(offs, d), ov + d):
            return False
        if not _read_value(<object>PyTuple_GET_ITEM(sizes, d), sv + d):
            return False
    return _box_ok(ov, sv, nd)


cdef int _reserve(i64** a, i64** b, i64** c, isize* cap, isize need) except -1 nogil:
    # Grow the malloc'd i64 arrays *a, *b and (unless c is NULL) *c, which
    # share the capacity *cap, to hold at least need values each.
    cdef isize n = cap[0]
    if need <= n:
        return 0
    while n < need:
        n = n * 2 if n else 1024
    a[0] = <i64*>safe_realloc(a[0], <size_t>n, sizeof(i64))
    b[0] = <i64*>safe_realloc(b[0], <size_t>n, sizeof(i64))
    if c != NULL:
        c[0] = <i64*>safe_realloc(c[0], <size_t>n, sizeof(i64))
    cap[0] = n
    return 0


def plan_reads(list fqns, list local_offsets, list local_sizes, list saved,
               read_item_cls, metadata_index_cls, tensor_type, size_cls, chunk_cls,
               bint verify=False, columns=None, list global_sizes=None):
    """Every tensor's ReadItems of one rank's load plan, in one call.

    Tensor ``t`` is ``fqns[t]``, whose one local chunk has offsets
    ``local_offsets[t]`` and sizes ``local_sizes[t]`` (tuples or
    ``torch.Size``). Its saved chunks are, without ``columns``, those of
    ``saved[t]`` (tensor storage metadata: ``.size`` a tuple, ``.chunks`` a
    list of exactly ``chunk_cls``); with ``columns`` (a
    :class:`~ckcore.mdcolumns.MetadataColumns`), ``saved[t]`` is the tensor's
    row in them (an int), and its global size there must equal
    ``global_sizes[t]``. Classes as in :func:`build_read_items`.

    Chunks are read (every value an int, non-negative, offset + size and
    the volume within int64), then intersected and, with ``verify``,
    checked to fill each local chunk exactly once (as :func:`read_items`),
    all tensors at once with the GIL released, before any object is built.

    Returns ``(items, starts, slow)``: tensor ``t``'s items are
    ``items[starts[t]:starts[t + 1]]`` in canonical order; ``slow`` lists,
    ascending, the tensors this call did not plan (empty ranges): any value
    it would have to convert or refuse, a size that differs, metadata of
    another shape, verification that fails or cannot decide cheaply, an
    empty saved chunk list when verifying. The caller plans those with its
    one-tensor path, which gives the answer or names the problem.
    """
    cdef isize T, t, j, ns, nd, fid, a
    cdef bint by_cols = columns is not None
    cdef _Tensor* ts = NULL
    cdef _Tensor* tt
    cdef i64* lo = NULL
    cdef i64* ls = NULL
    cdef i64* so = NULL
    cdef i64* ss = NULL
    cdef i64* pli = NULL
    cdef i64* psi = NULL
    cdef i64* pso = NULL
    cdef i64* pdo = NULL
    cdef i64* pln = NULL
    cdef isize lcap = 0, pcap = 0, pvcap = 0, lvals = 0, svals = 0, nsnap = 0
    cdef isize npairs = 0, nvals = 0, max_ns = 0, max_nd = 0
    cdef isize seg[2]
    cdef isize cover[4]
    cdef IdxBuf buf
    cdef const i64[::1] size_ptr, size_values, chunk_ptr, chunk_vptr, c_off, c_size
    cdef const i64* cop = NULL
    cdef const i64* csp = NULL
    cdef isize n_fqns = 0, n_cvals = 0
    cdef i64 gval = 0
    cdef list soffs = []
    cdef list snaps
    cdef tuple snap
    cdef object md, msize, chunks, chunk, gsize, offs, sizes
    cdef bint ok
    cdef tuple fq, loff, lsz, sav, gsz
    # Snapshots the call owns: indices below are checked against T, and the
    # items built after the GIL-free part name what was read before it,
    # whatever happens to the caller's lists meanwhile.
    fq = tuple(fqns)
    loff = tuple(local_offsets)
    lsz = tuple(local_sizes)
    sav = tuple(saved)
    gsz = None if global_sizes is None else tuple(global_sizes)
    T = len(fq)
    if len(loff) != T or len(lsz) != T or len(sav) != T:
        raise ValueError("plan_reads: fqns, local_offsets, local_sizes and saved differ in length")
    if by_cols and (gsz is None or len(gsz) != T):
        raise ValueError("plan_reads: columns need one global size per tensor")
    _check_plain_class(read_item_cls, "read_item_cls")
    _check_plain_class(metadata_index_cls, "metadata_index_cls")
    if not isinstance(chunk_cls, type):
        raise TypeError(f"chunk_cls must be a class, got {chunk_cls!r}")
    if by_cols:
        try:
            size_ptr = columns.size_ptr
            size_values = columns.size_values
            chunk_ptr = columns.chunk_ptr
            chunk_vptr = columns.chunk_value_ptr
            c_off = columns.chunk_offsets
            c_size = columns.chunk_sizes
        except (AttributeError, TypeError, ValueError) as ex:
            raise TypeError(
                "plan_reads: columns must be MetadataColumns (contiguous int64 size and chunk "
                f"arrays), got {type(columns).__name__}: {ex}") from None
        n_fqns = min(size_ptr.shape[0], chunk_ptr.shape[0], chunk_vptr.shape[0]) - 1
        n_cvals = min(c_off.shape[0], c_size.shape[0])
        if n_cvals:
            cop = &c_off[0]
            csp = &c_size[0]
    buf.data = NULL
    buf.len = 0
    buf.cap = 0
    try:
        ts = <_Tensor*>safe_calloc(T + 1, sizeof(_Tensor))
        if not by_cols:
            # Each tensor's chunk list, snapshotted (chunk numbers index the
            # snapshot whatever happens to the list), and the room they need.
            snaps = [None] * T
            for t in range(T):
                md = sav[t]
                try:
                    msize = md.size
                    chunks = md.chunks
                except Exception:
                    continue  # the one-tensor path says what is wrong with it
                if not PyTuple_Check(msize) or type(chunks) is not list:
                    continue
                snap = tuple(chunks)
                snaps[t] = snap
                nd = PyTuple_GET_SIZE(msize)
                ns = len(snap)
                ts[t].nd = nd
                ts[t].ns = ns
                ts[t].schunk = nsnap
                ts[t].sval = svals
                nsnap += ns
                svals += ns * nd
            so = <i64*>safe_alloc(svals + 1, sizeof(i64))
            ss = <i64*>safe_alloc(svals + 1, sizeof(i64))
            soffs = [None] * nsnap
        # Read every chunk: local ones into lo/ls, saved ones into so/ss (or
        # only checked, in the columns). Whatever fails marks the tensor slow.
        for t in range(T):
            tt = &ts[t]
            tt.slow = True
            if type(fq[t]) is not str:
                continue
            if by_cols:
                if type(sav[t]) is not int or to_i64(sav[t], &gval):
                    continue
                fid = gval
                if fid < 0 or fid >= n_fqns:
                    continue
                nd = size_ptr[fid + 1] - size_ptr[fid]
                ns = chunk_ptr[fid + 1] - chunk_ptr[fid]
                a = chunk_vptr[fid]
                if (nd < 0 or ns < 0 or size_ptr[fid] < 0 or size_ptr[fid + 1] > size_values.shape[0]
                        or a < 0 or chunk_vptr[fid + 1] - a != ns * nd
                        or chunk_vptr[fid + 1] > n_cvals):
                    continue
                gsize = gsz[t]
                if not PyTuple_Check(gsize) or PyTuple_GET_SIZE(gsize) != nd:
                    continue
                ok = True
                for j in range(nd):
                    if to_i64(<object>PyTuple_GET_ITEM(gsize, j), &gval) or \
                            gval != size_values[size_ptr[fid] + j]:
                        ok = False
                        break
                if not ok:
                    continue
                for j in range(ns):
                    if not _box_ok(cop + a + j * nd, csp + a + j * nd, nd):
                        ok = False
                        break
                if not ok:
                    continue
                tt.sval = a
                tt.schunk = chunk_ptr[fid]
            else:
                if snaps[t] is None:
                    continue
                snap = snaps[t]
                nd = tt.nd
                ns = tt.ns
                ok = True
                for j in range(ns):
                    chunk = snap[j]
                    if type(chunk) is not chunk_cls:
                        ok = False
                        break
                    # getattr with a default: a missing field is a hand-back,
                    # without saving the exception state on every chunk.
                    offs = getattr(chunk, _OFFSETS, None)
                    sizes = getattr(chunk, _SIZES, None)
                    if not _read_row(offs, sizes, nd, so + tt.sval + j * nd, ss + tt.sval + j * nd):
                        ok = False
                        break
                    # Every slot of soffs holds None until its chunk is read: swap in place.
                    Py_INCREF(offs)
                    Py_DECREF(<object>PyList_GET_ITEM(soffs, tt.schunk + j))
                    PyList_SET_ITEM(soffs, tt.schunk + j, offs)
                if not ok:
                    continue
            _reserve(&lo, &ls, NULL, &lcap, lvals + nd + 1)
            if not _read_row(loff[t], lsz[t], nd, lo + lvals, ls + lvals):
                continue
            tt.lval = lvals
            lvals += nd
            tt.nd = nd
            tt.ns = ns
            tt.slow = False
            if ns > max_ns:
                max_ns = ns
            if nd > max_nd:
                max_nd = nd
        # Intersect and verify, every tensor, without the GIL.
        with nogil:
            for t in range(T):
                tt = &ts[t]
                tt.pbase = npairs
                tt.pval = nvals
                if tt.slow:
                    continue
                nd = tt.nd
                ns = tt.ns
                if ns == 0:
                    # Nothing saved: no reads; a refusal if they must fill the chunk.
                    tt.slow = verify
                    continue
                buf.len = 0
                if by_cols:
                    intersect_pairs(lo + tt.lval, ls + tt.lval, 1, cop + tt.sval, csp + tt.sval,
                                    ns, nd, PATH_AUTO, &buf, seg)
                else:
                    intersect_pairs(lo + tt.lval, ls + tt.lval, 1, so + tt.sval, ss + tt.sval,
                                    ns, nd, PATH_AUTO, &buf, seg)
                tt.k = buf.len
                _reserve(&pli, &psi, NULL, &pcap, npairs + tt.k + 1)
                _reserve(&pso, &pdo, &pln, &pvcap, nvals + tt.k * nd + 1)
                fill_pairs(lo + tt.lval, ls + tt.lval,
                           (cop if by_cols else so) + tt.sval, (csp if by_cols else ss) + tt.sval,
                           nd, 1, seg, buf.data, pli + npairs, psi + npairs,
                           pso + nvals, pdo + nvals, pln + nvals)
                if verify and check_reads(pli + npairs, pdo + nvals, pln + nvals, tt.k,
                                          ls + tt.lval, 1, nd, 64, cover) != C_OK:
                    tt.slow = True
                    tt.k = 0
                    continue
                npairs += tt.k
                nvals += tt.k * nd
            ts[T].pbase = npairs
        return _plan_items(fq, loff, soffs, ts, T, npairs, max_ns, max_nd, by_cols,
                           cop, psi, pso, pdo, pln, read_item_cls, metadata_index_cls,
                           tensor_type, size_cls)
    finally:
        free(ts)
        free(lo)
        free(ls)
        free(so)
        free(ss)
        free(pli)
        free(psi)
        free(pso)
        free(pdo)
        free(pln)
        free(buf.data)


cdef tuple _plan_items(tuple fqns, tuple local_offsets, list soffs, _Tensor* ts, isize T,
                       isize npairs, isize max_ns, isize max_nd, bint by_cols, const i64* cop,
                       const i64* psi, const i64* pso, const i64* pdo, const i64* pln,
                       read_item_cls, metadata_index_cls, tensor_type, size_cls):
    # plan_reads' objects: every pair's ReadItem, the per-tensor starts, the slow tensors.
    cdef list items = PyList_New(npairs)
    cdef list slow = []
    cdef list sidx = [None] * (max_ns if max_ns else 1)
    cdef isize* stamp = NULL
    cdef isize t, p, q, s, nd
    cdef i64 zero = 0
    cdef _Tensor* tt
    cdef _RowCache cache
    cdef object di, st, fqn, item
    # Equal rows share one object across tensors of the same dimensions.
    cdef list caches = [None] * (max_nd + 1)
    starts = np.empty(T + 1, dtype=np.int64)
    cdef i64[::1] sv = starts
    gc_pause()
    try:
        stamp = <isize*>safe_alloc(max_ns + 1, sizeof(isize))
        for s in range(max_ns + 1):
            stamp[s] = -1
        for t in range(T):
            tt = &ts[t]
            sv[t] = tt.pbase
            if tt.slow:
                slow.append(t)
                continue
            if tt.k == 0:
                continue
            nd = tt.nd
            cache = caches[nd]
            if cache is None:
                cache = caches[nd] = _RowCache(nd, size_cls)
            fqn = fqns[t]
            di = _index_obj(metadata_index_cls, fqn, local_offsets[t], 0, size_cls)
            for q in range(tt.k):
                p = tt.pbase + q
                s = psi[p]
                if stamp[s] == t:
                    st = sidx[s]
                else:
                    if by_cols:
                        st = _index_obj(metadata_index_cls, fqn,
                                        cache.get(cop + tt.sval + s * nd if nd else &zero),
                                        s, size_cls)
                    else:
                        st = _index_obj(metadata_index_cls, fqn, soffs[tt.schunk + s], s, size_cls)
                    sidx[s] = st
                    stamp[s] = t
                p = tt.pval + q * nd
                item = _make_item(
                    read_item_cls, tensor_type,
                    di, cache.get(pdo + p if nd else &zero),
                    st, cache.get(pso + p if nd else &zero),
                    cache.get(pln + p if nd else &zero))
                Py_INCREF(item)
                PyList_SET_ITEM(items, tt.pbase + q, item)
        sv[T] = ts[T].pbase
    finally:
        free(stamp)
        gc_resume()
    return items, starts, slow
