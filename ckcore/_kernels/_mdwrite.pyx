"""``MetadataColumns`` to the bytes of a torch ``.metadata`` pickle (compiled).

:class:`Encoder` writes protocol-4 pickle opcodes into a growing buffer: the
few values the Python side writes (globals, strs, ints, small containers)
through its methods, and the bulk -- every tensor's chunk list and every
storage entry -- in two loops over the columns with the GIL released. The
stream is what ``pickle.dump`` of torch's ``Metadata`` builds when loaded
(``NEWOBJ`` + ``BUILD`` of torch's classes, ``torch.Size`` by ``REDUCE``);
memo entries are made only for the values it reuses (globals, dict keys,
fqns, file names), which the unpickler does not need to know in advance.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy


cdef class Encoder:
    """A pickle stream being written; ``getvalue()`` returns its bytes."""

    cdef uint8_t *buf
    cdef Py_ssize_t n, cap
    cdef public Py_ssize_t memo

    def __cinit__(self):
        self.buf = NULL
        self.n = 0
        self.cap = 0
        self.memo = 0

    def __dealloc__(self):
        free(self.buf)

    cdef int _reserve(self, Py_ssize_t extra) except -1 nogil:
        cdef Py_ssize_t cap = self.cap if self.cap else 1 << 16
        cdef uint8_t *p
        if self.n + extra <= self.cap:
            return 0
        while cap < self.n + extra:
            cap *= 2
        p = <uint8_t *>realloc(self.buf, <size_t>cap)
        if p == NULL:
            with gil:
                raise MemoryError()
        self.buf = p
        self.cap = cap
        return 0

    cdef inline void _b(self, uint8_t c) noexcept nogil:
        self.buf[self.n] = c
        self.n += 1

    cdef inline void _int(self, int64_t v) noexcept nogil:
        # BININT1 / BININT2 / BININT / LONG1, as pickle chooses (needs 10 bytes).
        cdef int nb, i
        cdef int64_t t
        if 0 <= v < 256:
            self._b(0x4b)
            self._b(<uint8_t>v)
        elif 0 <= v < 65536:
            self._b(0x4d)
            self._b(<uint8_t>(v & 0xff))
            self._b(<uint8_t>(v >> 8))
        elif -2147483648 <= v <= 2147483647:
            self._b(0x4a)
            for i in range(4):
                self._b(<uint8_t>((<uint32_t>v >> (8 * i)) & 0xff))
        else:
            nb = 1
            t = v
            while not (-128 <= t <= 127):
                t >>= 8
                nb += 1
            self._b(0x8a)
            self._b(<uint8_t>nb)
            for i in range(nb):
                self._b(<uint8_t>((v >> (8 * i)) & 0xff))

    cdef inline void _get(self, Py_ssize_t idx) noexcept nogil:
        cdef int i
        if idx < 256:
            self._b(0x68)
            self._b(<uint8_t>idx)
        else:
            self._b(0x6a)
            for i in range(4):
                self._b(<uint8_t>((idx >> (8 * i)) & 0xff))

    cdef inline void _size(self, const int64_t *v, Py_ssize_t nd, Py_ssize_t size_cls) noexcept nogil:
        # torch.Size(tuple): REDUCE(torch.Size, ((ints),)); needs 5 + 10 * nd + 4 bytes.
        cdef Py_ssize_t j
        self._get(size_cls)
        if nd == 0:
            self._b(0x29)
        else:
            if nd > 3:
                self._b(0x28)
            for j in range(nd):
                self._int(v[j])
            self._b(0x84 + nd if nd <= 3 else 0x74)
        self._b(0x85)
        self._b(0x52)

    # ------------------------------------------------------- Python-side writes

    def op(self, bytes code):
        """Raw opcode bytes."""
        self._reserve(len(code))
        memcpy(self.buf + self.n, <const char *>code, len(code))
        self.n += len(code)

    def text(self, str s):
        """A str (SHORT_BINUNICODE / BINUNICODE / BINUNICODE8)."""
        cdef bytes raw = s.encode("utf-8", "surrogatepass")
        cdef Py_ssize_t k = len(raw), i
        self._reserve(k + 9)
        if k < 256:
            self._b(0x8c)
            self._b(<uint8_t>k)
        elif k <= 0xFFFFFFFF:
            self._b(0x58)
            for i in range(4):
                self._b(<uint8_t>((k >> (8 * i)) & 0xff))
        else:
            self._b(0x8d)
            for i in range(8):
                self._b(<uint8_t>((k >> (8 * i)) & 0xff))
        memcpy(self.buf + self.n, <const char *>raw, k)
        self.n += k

    def integer(self, int64_t v):
        """An int in int64."""
        self._reserve(10)
        self._int(v)

    def memoize(self):
        """MEMOIZE the top of the stack; returns its memo index."""
        self._reserve(1)
        self._b(0x94)
        self.memo += 1
        return self.memo - 1

    def get(self, Py_ssize_t idx):
        """BINGET / LONG_BINGET of a memo index."""
        if not 0 <= idx < self.memo:
            raise ValueError(f"memo index {idx} not set")
        self._reserve(5)
        self._get(idx)

    def size(self, object values, Py_ssize_t size_cls):
        """``torch.Size(values)`` (``size_cls``: the memo index of the global)."""
        cdef const int64_t[::1] v = values
        self._reserve(9 + 10 * v.shape[0])
        self._size(&v[0] if v.shape[0] else NULL, v.shape[0], size_cls)

    def getvalue(self):
        """The bytes written."""
        return self.buf[:self.n] if self.n else b""

    # ------------------------------------------------------------ bulk loops

    def chunk_lists(self, const int64_t[::1] chunk_ptr, const int64_t[::1] size_ptr,
                    const int64_t[::1] offsets, const int64_t[::1] sizes, Py_ssize_t tensor,
                    Py_ssize_t chunk_cls, Py_ssize_t size_cls, Py_ssize_t k_offsets,
                    Py_ssize_t k_sizes):
        """The chunk list of tensor row ``tensor``: ``EMPTY_LIST`` and its ``APPENDS`` batches.

        Memo indices name the ChunkStorageMetadata and torch.Size globals and
        the ``"offsets"``/``"sizes"`` keys.
        """
        cdef Py_ssize_t nd = size_ptr[tensor + 1] - size_ptr[tensor]
        cdef Py_ssize_t r0 = chunk_ptr[tensor], r1 = chunk_ptr[tensor + 1], r, v = 0
        cdef Py_ssize_t per = 24 + 2 * (14 + 10 * nd) + 8
        cdef Py_ssize_t base = 0
        if nd < 0 or r0 < 0 or r1 < r0:
            raise ValueError("corrupt chunk pointers")
        if r1 > r0:
            base = 0
            for r in range(tensor):
                base += (chunk_ptr[r + 1] - chunk_ptr[r]) * (size_ptr[r + 1] - size_ptr[r])
            if base + (r1 - r0) * nd > offsets.shape[0] or offsets.shape[0] != sizes.shape[0]:
                raise ValueError("chunk arrays shorter than their pointers")
        self._reserve(2 + (r1 - r0) * per + ((r1 - r0) // 1000 + 1) * 2)
        with nogil:
            self._b(0x5d)
            for r in range(r0, r1):
                if (r - r0) % 1000 == 0:
                    self._b(0x28)
                v = base + (r - r0) * nd
                self._get(chunk_cls)
                self._b(0x29)
                self._b(0x81)
                self._b(0x7d)
                self._b(0x28)
                self._get(k_offsets)
                self._size(&offsets[v] if nd else NULL, nd, size_cls)
                self._get(k_sizes)
                self._size(&sizes[v] if nd else NULL, nd, size_cls)
                self._b(0x75)
                self._b(0x62)
                if (r - r0) % 1000 == 999 or r == r1 - 1:
                    self._b(0x65)

    def storage_entries(self, Py_ssize_t start, Py_ssize_t stop,
                        const int64_t[::1] fqn_memo, const int64_t[::1] st_fqn,
                        const int64_t[::1] st_nd, const int64_t[::1] st_optr,
                        const int64_t[::1] st_vals, const int64_t[::1] st_index,
                        const int64_t[::1] path_memo, const int64_t[::1] st_path,
                        const int64_t[::1] st_foff, const int64_t[::1] st_len,
                        const int64_t[::1] keys):
        """Storage rows ``start`` to ``stop`` as (MetadataIndex, _StorageInfo) pairs.

        ``fqn_memo`` / ``path_memo``: the memo index of each name and file
        name; ``keys``: memo indices of the MetadataIndex and _StorageInfo
        globals, torch.Size, and the keys ``fqn``, ``index``, ``offset``,
        ``relative_path``, ``offset`` (the same str), ``length``. Rows with
        transform descriptors or a foreign value are written by the caller.
        """
        cdef Py_ssize_t r, nd, need = 0
        cdef Py_ssize_t k_index = keys[0], k_info = keys[1], k_size = keys[2]
        cdef Py_ssize_t k_fqn = keys[3], k_idx = keys[4], k_off = keys[5]
        cdef Py_ssize_t k_path = keys[6], k_len = keys[7]
        if not (0 <= start <= stop <= st_fqn.shape[0]):
            raise ValueError("storage rows out of range")
        for r in range(start, stop):
            nd = st_nd[r]
            if (st_fqn[r] < 0 or st_fqn[r] >= fqn_memo.shape[0] or st_path[r] < 0
                    or st_path[r] >= path_memo.shape[0] or nd < -1
                    or (nd > 0 and (st_optr[r] < 0 or st_optr[r] + nd > st_vals.shape[0]))):
                raise ValueError(f"storage row {r} is out of its tables")
            need += 80 + 10 * (nd if nd > 0 else 0) + 30
        self._reserve(need)
        with nogil:
            for r in range(start, stop):
                nd = st_nd[r]
                self._get(k_index)
                self._b(0x29)
                self._b(0x81)
                self._b(0x7d)
                self._b(0x28)
                self._get(k_fqn)
                self._get(fqn_memo[st_fqn[r]])
                self._get(k_idx)
                if st_index[r] < 0:
                    self._b(0x4e)
                else:
                    self._int(st_index[r])
                if nd >= 0:
                    self._get(k_off)
                    self._size(&st_vals[st_optr[r]] if nd > 0 else NULL, nd, k_size)
                self._b(0x75)
                self._b(0x62)
                self._get(k_info)
                self._b(0x29)
                self._b(0x81)
                self._b(0x7d)
                self._b(0x28)
                self._get(k_path)
                self._get(path_memo[st_path[r]])
                self._get(k_off)
                self._int(st_foff[r])
                self._get(k_len)
                self._int(st_len[r])
                self._b(0x75)
                self._b(0x62)
