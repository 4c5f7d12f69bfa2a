"""DCP ``.metadata`` pickle bytes to columns, without a Python object per chunk.

``decode`` runs a small pickle machine over the bytes with the GIL released.
It is not an unpickler: it never calls anything and builds no Python object
while it runs. Values are 16-byte records (an int, a str as a range of the
input, a tuple of ints in an int64 arena, a list or dict as linked segments
of records, an instance of one of DCP's metadata classes as a row of field
records); a ``ChunkStorageMetadata`` costs two int64 tuples and a row, a
storage entry two rows. After ``STOP``, the result is walked from the root
``Metadata`` straight into the arrays of :class:`ckcore.mdcolumns.MetadataColumns`;
only the fqns, file names and the small fields (properties, planner_data,
storage_meta, version, transform descriptors) become Python objects.

The machine understands what torch's ``pickle.dump`` of DCP metadata
writes (protocols 2 to 5: ``NEWOBJ`` + ``BUILD`` of the metadata classes,
``torch.Size`` and the layout / memory-format / path helpers by
``REDUCE``, str-keyed dicts, lists, tuples, ints, floats, bools, None,
memo and frames). Anything else -- another opcode, a global that is not
allow-listed, a call it does not model, a ``BUILD`` that is not the first on
a fresh instance, a shared or later-mutated state dict, duplicate keys, a
value out of int64, malformed or truncated bytes -- stops it with a reason
and the caller reads the file with the object reader instead
(``ckcore.checkpoint``), which refuses what is unsafe or not metadata. The
machine is memory-safe on any bytes: every read is bounds-checked, its
tables grow only with the stream (each opcode adds at most a fixed number
of records, or one per byte it declares), memo indices must be dense, and
nothing recurses except the conversion of the small fields, whose depth
and size are bounded.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, INT32_MAX
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8

import numpy as np

from ckcore._kernels._capi cimport ck_hash_key, ck_malloc_big, ck_mix64

# Value kinds.
cdef enum:
    K_ABSENT = 0     # a field the BUILD state did not set
    K_NONE
    K_BOOL
    K_INT
    K_FLOAT          # a: the IEEE bits
    K_STR            # a: offset of its UTF-8 bytes in the input, b: their length
    K_ITUPLE         # a tuple of ints: a = start in the int arena, b = length
    K_TUPLE          # a = start in the item arena, b = length
    K_TUPLE1         # a 1-tuple of a non-int: the item's a, b, and its kind in k2
    K_LIST           # a = container id
    K_DICT           # a = container id
    K_GLOBAL         # a = code (index into the allow-list objects)
    K_INST           # a = instance id
    K_CALL           # a = the arguments (one record in the item arena), b = code

# Roles of allow-listed globals (what the machine does with them).
cdef enum:
    R_NONE = 0
    R_METADATA = 1
    R_TSM = 2
    R_CHUNK = 3
    R_BYTES = 4
    R_INDEX = 5
    R_SMETA = 6
    R_SINFO = 7
    R_TPROPS = 8
    R_SIZE = 9
    R_MEMFMT = 10
    R_LAYOUT = 11
    R_PATH = 12
    R_CONST = 13
    N_ROLES = 14

#: Why the machine stopped (0: it did not).
cdef enum:
    W_OK = 0
    W_NOMEM
    W_TRUNCATED
    W_OPCODE
    W_STACK
    W_MEMO
    W_GLOBAL
    W_CALL
    W_BUILD
    W_TARGET
    W_KEY
    W_FRAME
    W_RESULT
    W_SHAPE
    W_STORAGE
    W_DUPLICATE
    W_LARGE
    W_PROTOCOL
    N_WHY

_WHY = (
    "ok",
    "out of memory",
    "truncated stream",
    "an opcode DCP metadata does not use",
    "stack or mark misuse",
    "memo misuse",
    "a global the column reader does not model",
    "a call the column reader does not model",
    "a BUILD the column reader does not model",
    "APPEND/SETITEM target is not a fresh list/dict",
    "a dict key that is not a str or a built MetadataIndex",
    "an opcode across a frame's end",
    "the result is not a built DCP Metadata",
    "a tensor, chunk or size of an unexpected form",
    "a storage entry of an unexpected form",
    "duplicate keys",
    "a value or length beyond what the columns hold",
    "unsupported protocol",
)

ctypedef struct V:
    int64_t a
    int32_t b
    uint8_t kind
    uint8_t k2       # K_TUPLE1: the item's kind
    uint16_t pad

ctypedef struct Inst:
    int64_t slots    # start of the field records in the item arena, -1 before BUILD
    uint8_t role
    uint8_t built

ctypedef struct Cont:
    int64_t head     # first segment, -1 when empty
    int64_t tail
    int64_t count    # items (dict: pairs)
    int32_t gen      # bumped when the slot is reused; a record of an older one is stale
    uint8_t kind     # K_LIST or K_DICT
    uint8_t consumed  # a BUILD state, read once: never read or changed again

ctypedef struct Seg:
    int64_t start    # in the item arena
    int64_t n        # items (dict: pairs, two records each)
    int64_t next

ctypedef struct D:
    const uint8_t *buf
    Py_ssize_t len
    Py_ssize_t pos
    Py_ssize_t frame_end
    V *stack
    Py_ssize_t n_stack, cap_stack
    Py_ssize_t *marks
    Py_ssize_t n_marks, cap_marks
    uint64_t *memo    # packed records (_pack)
    Py_ssize_t n_memo, cap_memo
    V *spill          # memo records too wide to pack
    Py_ssize_t n_spill, cap_spill
    uint64_t *items   # packed records (_pack), as the memo
    Py_ssize_t n_items, cap_items
    int64_t *ints
    Py_ssize_t n_ints, cap_ints
    Inst *insts
    Py_ssize_t n_insts, cap_insts
    Cont *conts
    Py_ssize_t n_conts, cap_conts, top_conts
    Seg *segs
    Py_ssize_t n_segs, cap_segs
    uint8_t roles[4096]
    Py_ssize_t n_roles
    int why
    Py_ssize_t why_pos

# Field names of each class in slot order, and how many slots it has.
cdef int NSLOTS[N_ROLES]
NSLOTS[:] = [0, 5, 3, 2, 0, 3, 4, 4, 5, 0, 0, 0, 0, 0]
cdef const char *FIELD[N_ROLES][5]
cdef int FIELD_LEN[N_ROLES][5]
FIELD[R_METADATA][:] = [b"state_dict_metadata", b"planner_data", b"storage_data",
                        b"storage_meta", b"version"]
FIELD_LEN[R_METADATA][:] = [19, 12, 12, 12, 7]
FIELD[R_TSM][:3] = [b"properties", b"size", b"chunks"]
FIELD_LEN[R_TSM][:3] = [10, 4, 6]
FIELD[R_CHUNK][:2] = [b"offsets", b"sizes"]
FIELD_LEN[R_CHUNK][:2] = [7, 5]
FIELD[R_INDEX][:3] = [b"fqn", b"offset", b"index"]
FIELD_LEN[R_INDEX][:3] = [3, 6, 5]
FIELD[R_SMETA][:4] = [b"checkpoint_id", b"save_id", b"load_id", b"modules"]
FIELD_LEN[R_SMETA][:4] = [13, 7, 7, 7]
FIELD[R_SINFO][:4] = [b"relative_path", b"offset", b"length", b"transform_descriptors"]
FIELD_LEN[R_SINFO][:4] = [13, 6, 6, 21]


cdef int _grow(void **p, Py_ssize_t *cap, Py_ssize_t need, size_t item) noexcept nogil:
    # Doubling growth; every table is bounded by a constant times the stream's length.
    cdef Py_ssize_t new_cap = cap[0] if cap[0] > 0 else 256
    cdef void *q
    if need <= cap[0]:
        return 0
    while new_cap < need:
        new_cap *= 2
    q = realloc(p[0], <size_t>new_cap * item)
    if q == NULL:
        return -1
    p[0] = q
    cap[0] = new_cap
    return 0


cdef int _reserve(void **p, Py_ssize_t *cap, Py_ssize_t n, size_t item) noexcept nogil:
    # A first capacity from the stream's length: the memory is only
    # reserved (pages are touched as the tables fill), huge-page backed where
    # the system allows, and a table that fills it grows by realloc.
    p[0] = ck_malloc_big(<size_t>n * item)
    if p[0] == NULL:
        # Address space is short (a capped process): start small and grow.
        n = 256
        p[0] = ck_malloc_big(<size_t>n * item)
        if p[0] == NULL:
            return -1
    cap[0] = n
    return 0


cdef inline int _fail(D *d, int why) noexcept nogil:
    if d.why == W_OK:
        d.why = why
        d.why_pos = d.pos
    return -1


cdef int _grow_stack(D *d) noexcept nogil:
    if _grow(<void **>&d.stack, &d.cap_stack, d.n_stack + 1, sizeof(V)) < 0:
        return _fail(d, W_NOMEM)
    return 0


cdef inline int _push(D *d, V v) noexcept nogil:
    if d.n_stack >= d.cap_stack and _grow_stack(d) < 0:
        return -1
    d.stack[d.n_stack] = v
    d.n_stack += 1
    return 0


cdef inline int _push_kind(D *d, uint8_t kind, int64_t a, int32_t b) noexcept nogil:
    cdef V v
    v.a = a
    v.b = b
    v.kind = kind
    v.k2 = 0
    v.pad = 0
    return _push(d, v)


cdef inline Py_ssize_t _fence(D *d) noexcept nogil:
    return d.marks[d.n_marks - 1] if d.n_marks > 0 else 0


cdef inline int _pop(D *d, V *out) noexcept nogil:
    if d.n_stack <= _fence(d):
        return _fail(d, W_STACK)
    d.n_stack -= 1
    out[0] = d.stack[d.n_stack]
    return 0


cdef inline int _need(D *d, Py_ssize_t n) noexcept nogil:
    if n < 0 or n > d.len - d.pos:
        return _fail(d, W_TRUNCATED)
    return 0


cdef inline uint64_t _le(const uint8_t *p, int n) noexcept nogil:
    cdef uint64_t x = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        x = (x << 8) | p[i]
    return x


cdef inline int _arg(D *d, Py_ssize_t n, int64_t *x) noexcept nogil:
    # An opcode's n-byte little-endian argument (n <= 8), consumed.
    if _need(d, n) < 0:
        return -1
    x[0] = <int64_t>_le(d.buf + d.pos, <int>n)
    d.pos += n
    return 0


cdef int64_t _alloc_items(D *d, Py_ssize_t n) noexcept nogil:
    cdef int64_t start = d.n_items
    if _grow(<void **>&d.items, &d.cap_items, d.n_items + n, sizeof(uint64_t)) < 0:
        _fail(d, W_NOMEM)
        return -1
    d.n_items += n
    return start


cdef int _tuple(D *d, Py_ssize_t first, Py_ssize_t n, V *out) noexcept nogil:
    # The n records from stack position first as one tuple record.
    cdef Py_ssize_t i
    cdef bint ints = True
    cdef int64_t start
    for i in range(first, first + n):
        if d.stack[i].kind != K_INT:
            ints = False
            break
    out.k2 = 0
    out.pad = 0
    if n > INT32_MAX:
        return _fail(d, W_LARGE)
    out.b = <int32_t>n
    if ints:
        if _grow(<void **>&d.ints, &d.cap_ints, d.n_ints + n, sizeof(int64_t)) < 0:
            return _fail(d, W_NOMEM)
        for i in range(n):
            d.ints[d.n_ints + i] = d.stack[first + i].a
        out.kind = K_ITUPLE
        out.a = d.n_ints
        d.n_ints += n
        return 0
    if n == 1 and d.stack[first].kind != K_TUPLE1:
        out.kind = K_TUPLE1
        out.a = d.stack[first].a
        out.b = d.stack[first].b
        out.k2 = d.stack[first].kind
        return 0
    start = _alloc_items(d, n)
    if start < 0:
        return -1
    for i in range(n):
        if _pack(d, &d.stack[first + i], &d.items[start + i]) < 0:
            return -1
    out.kind = K_TUPLE
    out.a = start
    return 0


cdef inline Py_ssize_t _tlen(V *t) noexcept nogil:
    if t.kind == K_TUPLE1:
        return 1
    if t.kind == K_ITUPLE or t.kind == K_TUPLE:
        return t.b
    return -1


cdef inline V _titem(D *d, V *t, Py_ssize_t i) noexcept nogil:
    # Item i (< _tlen) of a tuple record.
    cdef V v
    if t.kind == K_ITUPLE:
        v.kind = K_INT
        v.a = d.ints[t.a + i]
        v.b = 0
    elif t.kind == K_TUPLE1:
        v.kind = t.k2
        v.a = t.a
        v.b = t.b
    else:
        return _unpack(d, d.items[t.a + i])
    v.k2 = 0
    v.pad = 0
    return v


cdef int _new_cont(D *d, uint8_t kind) noexcept nogil:
    cdef Cont *c
    cdef int32_t gen = 0
    if _grow(<void **>&d.conts, &d.cap_conts, d.n_conts + 1, sizeof(Cont)) < 0:
        return _fail(d, W_NOMEM)
    c = &d.conts[d.n_conts]
    if d.n_conts < d.top_conts:
        gen = c.gen + 1      # a slot given back by _build
    c.gen = gen
    c.head = c.tail = -1
    c.count = 0
    c.kind = kind
    c.consumed = 0
    d.n_conts += 1
    if d.n_conts > d.top_conts:
        d.top_conts = d.n_conts
    return _push_kind(d, kind, d.n_conts - 1, gen)


cdef inline Cont *_cont(D *d, V *v, uint8_t kind) noexcept nogil:
    # The live container a record names, or NULL (another kind, a slot since
    # reused, or a state already consumed by BUILD).
    cdef Cont *c
    if v.kind != kind or v.a < 0 or v.a >= d.n_conts:
        return NULL
    c = &d.conts[v.a]
    if c.gen != v.b or c.consumed:
        return NULL
    return c


cdef int _cont_add(D *d, Py_ssize_t first, Py_ssize_t nvals, uint8_t kind) noexcept nogil:
    # APPEND(S)/SETITEM(S): the records from first to the top go into the
    # list (or dict) just below them, as one segment.
    cdef Py_ssize_t i
    cdef V *target
    cdef Cont *c
    cdef int64_t start
    cdef Seg *s
    cdef V *k
    if first < 1 or first - 1 < (d.marks[d.n_marks - 1] if d.n_marks > 0 else 0):
        return _fail(d, W_STACK)
    target = &d.stack[first - 1]
    c = _cont(d, target, kind)
    if c == NULL:
        return _fail(d, W_TARGET)
    if kind == K_DICT:
        if nvals % 2:
            return _fail(d, W_STACK)
        for i in range(first, first + nvals, 2):
            k = &d.stack[i]
            if not (k.kind == K_STR or (k.kind == K_INST and d.insts[k.a].built
                                        and d.insts[k.a].role == R_INDEX)):
                return _fail(d, W_KEY)
    if nvals == 0:
        d.n_stack = first
        return 0
    start = _alloc_items(d, nvals)
    if start < 0:
        return -1
    for i in range(nvals):
        if _pack(d, &d.stack[first + i], &d.items[start + i]) < 0:
            return -1
    if _grow(<void **>&d.segs, &d.cap_segs, d.n_segs + 1, sizeof(Seg)) < 0:
        return _fail(d, W_NOMEM)
    s = &d.segs[d.n_segs]
    s.start = start
    s.n = nvals // 2 if kind == K_DICT else nvals
    s.next = -1
    if c.tail < 0:
        c.head = d.n_segs
    else:
        d.segs[c.tail].next = d.n_segs
    c.tail = d.n_segs
    c.count += s.n
    d.n_segs += 1
    d.n_stack = first
    return 0


# The memo holds a record per MEMOIZE (torch memoises every value: a dozen
# per chunk), so it is packed into 8 bytes: 4 bits of kind, then the int
# (60 bits), or a (36 bits) and b (24 bits), or for a 1-tuple a (36), b (20)
# and the item's kind (4). Wider records go to a side array (tag SPILL).
cdef enum:
    SPILL = 15


cdef int _spill(D *d, V *v, uint64_t *out) noexcept nogil:
    if _grow(<void **>&d.spill, &d.cap_spill, d.n_spill + 1, sizeof(V)) < 0:
        return _fail(d, W_NOMEM)
    d.spill[d.n_spill] = v[0]
    out[0] = (<uint64_t>d.n_spill << 4) | SPILL
    d.n_spill += 1
    return 0


cdef inline int _pack(D *d, V *v, uint64_t *out) noexcept nogil:
    cdef uint8_t k = v.kind
    if k == K_INT:
        if -(<int64_t>1 << 59) <= v.a < (<int64_t>1 << 59):
            out[0] = (<uint64_t>v.a << 4) | K_INT
            return 0
    elif k == K_TUPLE1:
        if 0 <= v.a < (<int64_t>1 << 36) and 0 <= v.b < (1 << 20) and v.k2 < 16:
            out[0] = ((<uint64_t>v.a << 28) | (<uint64_t>v.b << 8) | (<uint64_t>v.k2 << 4)
                      | K_TUPLE1)
            return 0
    elif k != K_FLOAT:
        if 0 <= v.a < (<int64_t>1 << 36) and 0 <= v.b < (1 << 24):
            out[0] = (<uint64_t>v.a << 28) | (<uint64_t>v.b << 4) | k
            return 0
    return _spill(d, v, out)


cdef inline V _it(D *d, int64_t i) noexcept nogil:
    return _unpack(d, d.items[i])


cdef inline V _unpack(D *d, uint64_t w) noexcept nogil:
    cdef V v
    cdef uint8_t k = w & 15
    if k == SPILL:
        return d.spill[w >> 4]
    v.kind = k
    v.k2 = 0
    v.pad = 0
    if k == K_INT:
        v.a = (<int64_t>w) >> 4
        v.b = 0
    elif k == K_TUPLE1:
        v.a = <int64_t>(w >> 28)
        v.b = <int32_t>((w >> 8) & 0xFFFFF)
        v.k2 = (w >> 4) & 15
    else:
        v.a = <int64_t>(w >> 28)
        v.b = <int32_t>((w >> 4) & 0xFFFFFF)
    return v


cdef inline int _memo_put(D *d, int64_t idx) noexcept nogil:
    if d.n_stack <= 0:
        return _fail(d, W_STACK)
    if idx < 0 or idx > d.n_memo:
        return _fail(d, W_MEMO)
    if idx == d.n_memo:
        if _grow(<void **>&d.memo, &d.cap_memo, d.n_memo + 1, sizeof(uint64_t)) < 0:
            return _fail(d, W_NOMEM)
        d.n_memo += 1
    return _pack(d, &d.stack[d.n_stack - 1], &d.memo[idx])


cdef inline int _memo_get(D *d, int64_t idx) noexcept nogil:
    if idx < 0 or idx >= d.n_memo:
        return _fail(d, W_MEMO)
    return _push(d, _unpack(d, d.memo[idx]))


cdef int _str(D *d, Py_ssize_t n) noexcept nogil:
    if _need(d, n) < 0:
        return -1
    if n > INT32_MAX:
        return _fail(d, W_LARGE)
    if _push_kind(d, K_STR, d.pos, <int32_t>n) < 0:
        return -1
    d.pos += n
    return 0


cdef int _global(D *d, PyObject *lookup, Py_ssize_t mod, Py_ssize_t mod_n,
                 Py_ssize_t name, Py_ssize_t name_n) noexcept nogil:
    cdef int code = 0
    with gil:
        try:
            code = (<object>lookup)(d.buf[mod:mod + mod_n], d.buf[name:name + name_n])
        except BaseException:
            code = 0
    if code <= 0 or code >= d.n_roles or d.roles[code] == R_NONE:
        return _fail(d, W_GLOBAL)
    return _push_kind(d, K_GLOBAL, code, 0)


cdef int _newobj(D *d) noexcept nogil:
    cdef V args, cls
    cdef Inst *inst
    if _pop(d, &args) < 0 or _pop(d, &cls) < 0:
        return -1
    if _tlen(&args) != 0 or cls.kind != K_GLOBAL or d.roles[cls.a] > R_TPROPS:
        return _fail(d, W_CALL)
    if _grow(<void **>&d.insts, &d.cap_insts, d.n_insts + 1, sizeof(Inst)) < 0:
        return _fail(d, W_NOMEM)
    inst = &d.insts[d.n_insts]
    inst.slots = -1
    inst.role = d.roles[cls.a]
    inst.built = 0
    d.n_insts += 1
    return _push_kind(d, K_INST, d.n_insts - 1, 0)


cdef int _reduce(D *d) noexcept nogil:
    cdef V args, fn, item
    cdef int role
    cdef Py_ssize_t i, n
    cdef int64_t box
    if _pop(d, &args) < 0 or _pop(d, &fn) < 0:
        return -1
    n = _tlen(&args)
    if fn.kind != K_GLOBAL or n < 0:
        return _fail(d, W_CALL)
    role = d.roles[fn.a]
    if role == R_SIZE:
        # torch.Size((ints,)) is the tuple of ints.
        if n != 1:
            return _fail(d, W_CALL)
        item = _titem(d, &args, 0)
        if item.kind != K_ITUPLE:
            return _fail(d, W_CALL)
        return _push(d, item)
    if role == R_LAYOUT or role == R_PATH:
        if (role == R_LAYOUT and n != 1) or n > 4096:
            return _fail(d, W_CALL)
        for i in range(n):
            if _titem(d, &args, i).kind != K_STR:
                return _fail(d, W_CALL)
    elif role == R_MEMFMT:
        if n != 1 or _titem(d, &args, 0).kind != K_INT:
            return _fail(d, W_CALL)
    else:
        return _fail(d, W_CALL)
    box = _alloc_items(d, 1)
    if box < 0:
        return -1
    if _pack(d, &args, &d.items[box]) < 0:
        return -1
    return _push_kind(d, K_CALL, box, <int32_t>fn.a)


cdef inline bint _key_is(D *d, V *k, int role, int slot) noexcept nogil:
    return (k.b == FIELD_LEN[role][slot]
            and memcmp(d.buf + k.a, FIELD[role][slot], <size_t>k.b) == 0)


cdef inline void _give_back(D *d, V *state) noexcept nogil:
    # A consumed state that is the newest container frees its slot (torch's
    # are: a chunk's or an index's state holds no container); records of it
    # left in the memo no longer match the slot's generation.
    if state.a == d.n_conts - 1 and state.b < INT32_MAX - 1:
        d.n_conts -= 1


cdef int _build(D *d) noexcept nogil:
    cdef V state, target, item
    cdef Inst *inst
    cdef int role, nslots, j
    cdef int64_t slots, s
    cdef Cont *c
    cdef Seg *seg
    cdef V k
    cdef Py_ssize_t i
    cdef bint found
    if _pop(d, &state) < 0:
        return -1
    if d.n_stack <= _fence(d):
        return _fail(d, W_STACK)
    target = d.stack[d.n_stack - 1]
    if target.kind != K_INST or d.insts[target.a].built:
        return _fail(d, W_BUILD)
    role = d.insts[target.a].role
    nslots = NSLOTS[role]
    if role == R_TPROPS:
        # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory format, pin_memory).
        if _tlen(&state) != 5:
            return _fail(d, W_BUILD)
        slots = _alloc_items(d, 5)
        if slots < 0:
            return -1
        for j in range(5):
            item = _titem(d, &state, j)
            if _pack(d, &item, &d.items[slots + j]) < 0:
                return -1
        inst = &d.insts[target.a]
        inst.slots = slots
        inst.built = 1
        return 0
    c = _cont(d, &state, K_DICT)
    if c == NULL:
        return _fail(d, W_BUILD)
    c.consumed = 1
    if role == R_BYTES:
        if c.count:
            return _fail(d, W_BUILD)
        d.insts[target.a].built = 1
        _give_back(d, &state)
        return 0
    # The state's records are copied into the instance's slots (pickle
    # copies the state dict into the instance dict).
    slots = _alloc_items(d, nslots)
    if slots < 0:
        return -1
    for j in range(nslots):
        d.items[slots + j] = K_ABSENT   # packed: K_ABSENT with a = b = 0
    s = c.head
    while s >= 0:
        seg = &d.segs[s]
        for i in range(seg.n):
            k = _it(d, seg.start + 2 * i)
            if k.kind != K_STR:
                return _fail(d, W_BUILD)
            found = False
            for j in range(nslots):
                if _key_is(d, &k, role, j):
                    d.items[slots + j] = d.items[seg.start + 2 * i + 1]
                    found = True
                    break
            if not found:
                return _fail(d, W_BUILD)
        s = seg.next
    # A state that sits just below the slots (torch's: built right before its
    # BUILD) is dropped, the slots moved down over it: memory stays at a few
    # records per chunk.
    if c.head >= 0 and c.head == c.tail and c.head == d.n_segs - 1:
        seg = &d.segs[c.head]
        if seg.start + 2 * seg.n == slots:
            memmove(&d.items[seg.start], &d.items[slots], <size_t>nslots * sizeof(uint64_t))
            slots = seg.start
            d.n_items = slots + nslots
            d.n_segs -= 1
            c.head = c.tail = -1
            c.count = 0
    _give_back(d, &state)
    inst = &d.insts[target.a]
    inst.slots = slots
    inst.built = 1
    return 0


cdef int _run(D *d, PyObject *lookup) noexcept nogil:
    # The machine: one opcode per turn; 1 at STOP, -1 when it stops short.
    cdef uint8_t op
    cdef Py_ssize_t n, m, first, p0, op_pos
    cdef int64_t x
    cdef V a, b, v
    cdef const void *nl
    while True:
        op_pos = d.pos
        if d.pos >= d.len:
            return _fail(d, W_TRUNCATED)
        op = d.buf[d.pos]
        d.pos += 1
        if op == 0x94:  # MEMOIZE
            if _memo_put(d, d.n_memo) < 0:
                return -1
        elif op == 0x68 or op == 0x6a:  # BINGET, LONG_BINGET
            n = 1 if op == 0x68 else 4
            if _arg(d, n, &x) < 0:
                return -1
            if _memo_get(d, x) < 0:
                return -1
        elif op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT
            n = 1 if op == 0x71 else 4
            if _arg(d, n, &x) < 0:
                return -1
            if _memo_put(d, x) < 0:
                return -1
        elif op == 0x4b or op == 0x4d:  # BININT1, BININT2
            n = 1 if op == 0x4b else 2
            if _arg(d, n, &x) < 0:
                return -1
            if _push_kind(d, K_INT, x, 0) < 0:
                return -1
        elif op == 0x4a:  # BININT
            if _need(d, 4) < 0:
                return -1
            x = <int64_t>(<int32_t>(<uint32_t>_le(d.buf + d.pos, 4)))
            d.pos += 4
            if _push_kind(d, K_INT, x, 0) < 0:
                return -1
        elif op == 0x8a:  # LONG1
            if _need(d, 1) < 0:
                return -1
            n = d.buf[d.pos]
            d.pos += 1
            if n > 8:
                return _fail(d, W_LARGE)
            if _need(d, n) < 0:
                return -1
            x = 0
            if n > 0:
                x = <int64_t>_le(d.buf + d.pos, <int>n)
                if n < 8 and (d.buf[d.pos + n - 1] & 0x80):
                    x = <int64_t>(<uint64_t>x | (~(<uint64_t>0) << (8 * n)))
            d.pos += n
            if _push_kind(d, K_INT, x, 0) < 0:
                return -1
        elif op == 0x47:  # BINFLOAT (big-endian)
            if _need(d, 8) < 0:
                return -1
            x = 0
            for n in range(8):
                x = <int64_t>((<uint64_t>x << 8) | d.buf[d.pos + n])
            d.pos += 8
            if _push_kind(d, K_FLOAT, x, 0) < 0:
                return -1
        elif op == 0x4e:  # NONE
            if _push_kind(d, K_NONE, 0, 0) < 0:
                return -1
        elif op == 0x88 or op == 0x89:  # NEWTRUE, NEWFALSE
            if _push_kind(d, K_BOOL, 1 if op == 0x88 else 0, 0) < 0:
                return -1
        elif op == 0x8c:  # SHORT_BINUNICODE
            if _need(d, 1) < 0:
                return -1
            n = d.buf[d.pos]
            d.pos += 1
            if _str(d, n) < 0:
                return -1
        elif op == 0x58 or op == 0x8d:  # BINUNICODE, BINUNICODE8
            m = 4 if op == 0x58 else 8
            if _arg(d, m, &x) < 0:
                return -1
            if x < 0 or x > d.len:
                return _fail(d, W_TRUNCATED)
            if _str(d, <Py_ssize_t>x) < 0:
                return -1
        elif op == 0x29:  # EMPTY_TUPLE
            if _push_kind(d, K_ITUPLE, d.n_ints, 0) < 0:
                return -1
        elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1..3
            n = op - 0x84
            if d.n_stack - _fence(d) < n:
                return _fail(d, W_STACK)
            if _tuple(d, d.n_stack - n, n, &v) < 0:
                return -1
            d.n_stack -= n
            if _push(d, v) < 0:
                return -1
        elif op == 0x74:  # TUPLE
            if d.n_marks == 0:
                return _fail(d, W_STACK)
            first = d.marks[d.n_marks - 1]
            d.n_marks -= 1
            if _tuple(d, first, d.n_stack - first, &v) < 0:
                return -1
            d.n_stack = first
            if _push(d, v) < 0:
                return -1
        elif op == 0x5d:  # EMPTY_LIST
            if _new_cont(d, K_LIST) < 0:
                return -1
        elif op == 0x7d:  # EMPTY_DICT
            if _new_cont(d, K_DICT) < 0:
                return -1
        elif op == 0x31:  # POP_MARK (ckcore's writer: a prelude of memoised constants)
            if d.n_marks == 0:
                return _fail(d, W_STACK)
            d.n_marks -= 1
            d.n_stack = d.marks[d.n_marks]
        elif op == 0x28:  # MARK
            if _grow(<void **>&d.marks, &d.cap_marks, d.n_marks + 1, sizeof(Py_ssize_t)) < 0:
                return _fail(d, W_NOMEM)
            d.marks[d.n_marks] = d.n_stack
            d.n_marks += 1
        elif op == 0x61 or op == 0x73:  # APPEND, SETITEM
            n = 1 if op == 0x61 else 2
            if d.n_stack - _fence(d) < n + 1:
                return _fail(d, W_STACK)
            if _cont_add(d, d.n_stack - n, n, K_LIST if op == 0x61 else K_DICT) < 0:
                return -1
        elif op == 0x65 or op == 0x75:  # APPENDS, SETITEMS
            if d.n_marks == 0:
                return _fail(d, W_STACK)
            first = d.marks[d.n_marks - 1]
            d.n_marks -= 1
            if _cont_add(d, first, d.n_stack - first, K_LIST if op == 0x65 else K_DICT) < 0:
                return -1
        elif op == 0x93:  # STACK_GLOBAL
            if _pop(d, &b) < 0 or _pop(d, &a) < 0:
                return -1
            if a.kind != K_STR or b.kind != K_STR:
                return _fail(d, W_GLOBAL)
            if _global(d, lookup, a.a, a.b, b.a, b.b) < 0:
                return -1
        elif op == 0x63:  # GLOBAL module\nname\n
            p0 = d.pos
            nl = memchr(d.buf + d.pos, 10, <size_t>(d.len - d.pos))
            if nl == NULL:
                return _fail(d, W_TRUNCATED)
            n = <const uint8_t *>nl - (d.buf + p0)
            d.pos = p0 + n + 1
            nl = memchr(d.buf + d.pos, 10, <size_t>(d.len - d.pos))
            if nl == NULL:
                return _fail(d, W_TRUNCATED)
            m = <const uint8_t *>nl - (d.buf + d.pos)
            if _global(d, lookup, p0, n, d.pos, m) < 0:
                return -1
            d.pos += m + 1
        elif op == 0x81:  # NEWOBJ
            if _newobj(d) < 0:
                return -1
        elif op == 0x52:  # REDUCE
            if _reduce(d) < 0:
                return -1
        elif op == 0x62:  # BUILD
            if _build(d) < 0:
                return -1
        elif op == 0x80:  # PROTO
            if _need(d, 1) < 0:
                return -1
            if d.buf[d.pos] < 2 or d.buf[d.pos] > 5:
                return _fail(d, W_PROTOCOL)
            d.pos += 1
        elif op == 0x95:  # FRAME
            if _need(d, 8) < 0:
                return -1
            if op_pos < d.frame_end:
                return _fail(d, W_FRAME)
            x = <int64_t>_le(d.buf + d.pos, 8)
            d.pos += 8
            if x < 0 or x > d.len - d.pos:
                return _fail(d, W_TRUNCATED)
            d.frame_end = d.pos + x
            continue
        elif op == 0x2e:  # STOP
            return 1
        else:
            return _fail(d, W_OPCODE)
        if op_pos < d.frame_end and d.pos > d.frame_end:
            return _fail(d, W_FRAME)


cdef void _free(D *d) noexcept nogil:
    free(d.stack)
    free(d.marks)
    free(d.memo)
    free(d.spill)
    free(d.items)
    free(d.ints)
    free(d.insts)
    free(d.conts)
    free(d.segs)


# --------------------------------------------------------------------------
# Hash tables over byte strings and storage keys (keyed: the keys come from a file).
# --------------------------------------------------------------------------

cdef enum:
    CACHE = 1024


ctypedef struct Table:
    int64_t *slots     # -1 empty, else an id
    int64_t mask
    uint64_t key


cdef int _table_init(Table *t, Py_ssize_t n) noexcept nogil:
    cdef int64_t cap = 16
    while cap < 2 * n + 16:
        cap *= 2
    t.slots = <int64_t *>realloc(NULL, <size_t>cap * sizeof(int64_t))
    if t.slots == NULL:
        return -1
    memset(t.slots, 0xff, <size_t>cap * sizeof(int64_t))
    t.mask = cap - 1
    t.key = ck_hash_key()
    return 0


cdef inline uint64_t _hash_bytes(uint64_t key, const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = key ^ <uint64_t>n
    cdef uint64_t w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = ck_mix64(h ^ w)
        i += 8
    w = 0
    if i < n:
        memcpy(&w, p + i, <size_t>(n - i))
    return ck_mix64(h ^ w ^ key)


ctypedef struct StrTab:
    Table t
    int64_t *refs      # id -> (offset, length) of its bytes
    Py_ssize_t n, cap


cdef int _str_rehash(StrTab *s, const uint8_t *buf) noexcept nogil:
    # Doubles the slot array (kept at most half full, and small: a table of
    # a few thousand names stays in cache).
    cdef Table t
    cdef int64_t id_, i
    if _table_init(&t, s.t.mask + 1) < 0:
        return -1
    for id_ in range(s.n):
        i = <int64_t>(_hash_bytes(t.key, buf + s.refs[2 * id_], s.refs[2 * id_ + 1])
                      & <uint64_t>t.mask)
        while t.slots[i] >= 0:
            i = (i + 1) & t.mask
        t.slots[i] = id_
    free(s.t.slots)
    s.t = t
    return 0


cdef int64_t _str_id(StrTab *s, const uint8_t *buf, int64_t a, int32_t b, bint add) noexcept nogil:
    # The id of the string buf[a:a+b] (added when absent and add), -1 when
    # absent, -2 out of memory.
    cdef uint64_t h = _hash_bytes(s.t.key, buf + a, b)
    cdef int64_t i = <int64_t>(h & <uint64_t>s.t.mask)
    cdef int64_t id_
    while True:
        id_ = s.t.slots[i]
        if id_ < 0:
            break
        if s.refs[2 * id_ + 1] == b and memcmp(buf + s.refs[2 * id_], buf + a, <size_t>b) == 0:
            return id_
        i = (i + 1) & s.t.mask
    if not add:
        return -1
    if _grow(<void **>&s.refs, &s.cap, 2 * (s.n + 1), sizeof(int64_t)) < 0:
        return -2
    s.refs[2 * s.n] = a
    s.refs[2 * s.n + 1] = b
    s.t.slots[i] = s.n
    s.n += 1
    if 2 * s.n > s.t.mask and _str_rehash(s, buf) < 0:
        return -2
    return s.n - 1


# --------------------------------------------------------------------------
# From the machine's records to columns.
# --------------------------------------------------------------------------

class Unsupported(Exception):
    """The column reader does not model this stream; read it with the object reader."""


cdef class _Decoder:
    cdef D d
    cdef object data
    cdef object objects
    cdef int depth_limit
    cdef int64_t budget

    def __dealloc__(self):
        _free(&self.d)

    cdef str _text(self, int64_t a, int32_t b):
        try:
            return PyUnicode_DecodeUTF8(<const char *>self.d.buf + a, b, "surrogatepass")
        except UnicodeDecodeError:
            raise Unsupported("a str that is not UTF-8") from None

    cdef object _py(self, V v, int depth):
        # A small field's value as Python objects, bounded in depth and size
        # (as a tree: a value shared many times over costs each time).
        cdef Py_ssize_t i, n
        cdef Cont *c
        cdef int64_t s
        cdef Seg *seg
        cdef V item
        cdef double f
        cdef uint64_t bits
        self.budget -= 1
        if self.budget < 0 or depth > self.depth_limit:
            raise Unsupported("a small field too large or too deep")
        k = v.kind
        if k == K_NONE or k == K_ABSENT:
            return None
        if k == K_BOOL:
            return v.a != 0
        if k == K_INT:
            return v.a
        if k == K_FLOAT:
            bits = <uint64_t>v.a
            memcpy(&f, &bits, 8)
            return f
        if k == K_STR:
            return self._text(v.a, v.b)
        if k == K_ITUPLE or k == K_TUPLE or k == K_TUPLE1:
            n = _tlen(&v)
            self.budget -= n
            return tuple([self._py(_titem(&self.d, &v, i), depth + 1) for i in range(n)])
        if k == K_GLOBAL:
            if self.d.roles[v.a] != R_CONST:
                raise Unsupported("a class or function as a value")
            return self.objects[v.a]
        if k == K_CALL:
            args = self._py(_it(&self.d, v.a), depth + 1)
            try:
                return self.objects[v.b](*args)
            except Exception:
                raise Unsupported("a call with arguments its target refuses") from None
        if k == K_LIST or k == K_DICT:
            c = _cont(&self.d, &v, k)
            if c == NULL:
                raise Unsupported("a BUILD state used as a value")
            self.budget -= c.count
            if self.budget < 0:
                raise Unsupported("a small field too large")
            out = [] if k == K_LIST else {}
            s = c.head
            while s >= 0:
                seg = &self.d.segs[s]
                for i in range(seg.n):
                    if k == K_LIST:
                        out.append(self._py(_it(&self.d, seg.start + i), depth + 1))
                    else:
                        item = _it(&self.d, seg.start + 2 * i)
                        if item.kind != K_STR:
                            raise Unsupported("a dict key that is not a str")
                        out[self._text(item.a, item.b)] = self._py(
                            _it(&self.d, seg.start + 2 * i + 1), depth + 1)
                s = seg.next
            return out
        raise Unsupported("an instance where a plain value belongs")

    cdef V _slot(self, V inst, int role, int slot):
        cdef Inst *p
        if inst.kind != K_INST:
            raise Unsupported("a metadata object of the wrong class")
        p = &self.d.insts[inst.a]
        if p.role != role or not p.built:
            raise Unsupported("a metadata object of the wrong class, or never built")
        return _it(&self.d, p.slots + slot)

    cdef int _ints_ok(self, V t, Py_ssize_t ndim) except -1:
        # An int64 tuple of ndim values >= 0 (ndim < 0: any length).
        cdef Py_ssize_t i
        if t.kind != K_ITUPLE or (ndim >= 0 and t.b != ndim):
            return 0
        for i in range(t.b):
            if self.d.ints[t.a + i] < 0:
                return 0
        return 1

    def columns(self):
        cdef D *d = &self.d
        cdef V root, sdm, item, props, size, chunks, key, f
        cdef Cont *c
        cdef Seg *seg
        cdef int64_t s, nrows, j, total_rows = 0, total_vals = 0, total_size = 0
        cdef int64_t budget
        cdef Py_ssize_t i, t, nd, nf
        cdef int64_t[::1] sp, cp, sv, ov, zv
        cdef int64_t vpos = 0, spos = 0, rpos = 0, sa, cid
        cdef int bad = 0
        cdef int32_t sb
        if d.n_stack < 1:
            raise Unsupported("empty stack at STOP")
        root = d.stack[d.n_stack - 1]
        sdm = self._slot(root, R_METADATA, 0)
        c = _cont(d, &sdm, K_DICT)
        if c == NULL:
            raise Unsupported("state_dict_metadata is not a dict")
        nf = c.count
        fqns = []
        seen = {}
        kinds = np.zeros(nf, dtype=np.int8)
        props_raw = []
        # Per fqn: (size record, chunks container) of tensors, walked twice.
        tens = []
        budget = 2 * d.len + 4096
        s = c.head
        t = 0
        while s >= 0:
            seg = &d.segs[s]
            for i in range(seg.n):
                key = _it(d, seg.start + 2 * i)
                item = _it(d, seg.start + 2 * i + 1)
                name = self._text(key.a, key.b)
                if name in seen:
                    raise Unsupported("duplicate fqns")
                seen[name] = t
                fqns.append(name)
                if item.kind == K_INST and d.insts[item.a].role == R_BYTES:
                    kinds[t] = 1
                    props_raw.append(None)
                    tens.append(None)
                    t += 1
                    continue
                props = self._slot(item, R_TSM, 0)
                size = self._slot(item, R_TSM, 1)
                chunks = self._slot(item, R_TSM, 2)
                self._slot(props, R_TPROPS, 0)
                props_raw.append(tuple([self._py(_it(d, d.insts[props.a].slots + j), 0)
                                        for j in range(5)]))
                if not self._ints_ok(size, -1):
                    raise Unsupported("a size that is not a tuple of ints >= 0")
                if _cont(d, &chunks, K_LIST) == NULL:
                    raise Unsupported("chunks is not a list")
                nd = size.b
                nrows = d.conts[chunks.a].count
                budget -= (nrows + 1) * (nd if nd > 1 else 1)
                if budget < 0:
                    raise Unsupported("more chunk dimensions than the file holds")
                total_rows += nrows
                total_vals += nrows * nd
                total_size += nd
                tens.append((size.a, size.b, chunks.a))
                t += 1
            s = seg.next
        size_ptr = np.zeros(nf + 1, dtype=np.int64)
        chunk_ptr = np.zeros(nf + 1, dtype=np.int64)
        size_values = np.empty(total_size, dtype=np.int64)
        offsets = np.empty(total_vals, dtype=np.int64)
        sizes = np.empty(total_vals, dtype=np.int64)
        sp = size_ptr
        cp = chunk_ptr
        sv = size_values
        ov = offsets
        zv = sizes
        for i in range(nf):
            e = tens[i]
            if e is not None:
                sa, sb, cid = e
                with nogil:
                    memcpy(&sv[spos], &d.ints[sa], <size_t>sb * sizeof(int64_t))
                    spos += sb
                    bad = _copy_chunks(d, cid, sb, &ov[0] if total_vals else NULL,
                                       &zv[0] if total_vals else NULL, &vpos, &rpos)
                if bad:
                    raise Unsupported("a chunk of an unexpected form (class, build, "
                                      "dimensions or values)")
            sp[i + 1] = spos
            cp[i + 1] = rpos
        out = dict(fqns=fqns, kinds=kinds, properties=props_raw, size_ptr=size_ptr,
                   size_values=size_values, chunk_ptr=chunk_ptr, chunk_offsets=offsets,
                   chunk_sizes=sizes)
        out.update(self._storage(root, fqns))
        out["planner_data"] = self._py(self._slot(root, R_METADATA, 1), 0)
        f = self._slot(root, R_METADATA, 3)
        if f.kind == K_ABSENT or f.kind == K_NONE:
            out["storage_meta"] = None
        else:
            out["storage_meta"] = tuple([self._py(self._slot(f, R_SMETA, j), 0)
                                         if self._slot(f, R_SMETA, j).kind != K_ABSENT
                                         else self._absent for j in range(4)])
        out["version"] = self._py(self._slot(root, R_METADATA, 4), 0)
        return out

    @property
    def _absent(self):
        return _ABSENT

    cdef dict _storage(self, V root, list fqns):
        cdef D *d = &self.d
        cdef V sd = self._slot(root, R_METADATA, 2)
        cdef Cont *c
        cdef StrTab names
        cdef StrTab paths
        cdef int64_t m
        cdef int why = 0
        cdef Py_ssize_t i
        cdef TdList tds
        cdef I64Buf vals
        cdef int64_t[::1] sv
        if sd.kind == K_ABSENT or sd.kind == K_NONE:
            return dict(storage_data_none=True)
        c = _cont(d, &sd, K_DICT)
        if c == NULL:
            raise Unsupported("storage_data is not a dict")
        m = c.count
        memset(&names, 0, sizeof(StrTab))
        memset(&paths, 0, sizeof(StrTab))
        memset(&tds, 0, sizeof(TdList))
        memset(&vals, 0, sizeof(I64Buf))
        try:
            st_fqn = np.empty(m, dtype=np.int64)
            st_nd = np.empty(m, dtype=np.int64)
            st_index = np.empty(m, dtype=np.int64)
            st_path = np.empty(m, dtype=np.int64)
            st_foff = np.empty(m, dtype=np.int64)
            st_len = np.empty(m, dtype=np.int64)
            hashes = np.empty(m, dtype=np.uint64)
            if _table_init(&names.t, len(fqns)) < 0 or _table_init(&paths.t, 64) < 0:
                raise MemoryError()
            # The fqns first, in order: their ids are their rows.
            if _seed_names(d, &names, d.stack[d.n_stack - 1]) < 0:
                raise MemoryError()
            why = _storage_fill(d, sd.a, &names, &paths, st_fqn, st_nd, &vals, st_index,
                                st_path, st_foff, st_len, hashes, &tds)
            if why == W_NOMEM:
                raise MemoryError()
            if why:
                raise Unsupported(_WHY[why])
            st_vals = np.empty(vals.n, dtype=np.int64)
            if vals.n:
                sv = st_vals
                memcpy(&sv[0], vals.p, <size_t>vals.n * sizeof(int64_t))
            _check_unique(hashes, st_fqn, st_nd, st_vals)
            extra = [self._text(names.refs[2 * i], <int32_t>names.refs[2 * i + 1])
                     for i in range(len(fqns), names.n)]
            path_list = [self._text(paths.refs[2 * i], <int32_t>paths.refs[2 * i + 1])
                         for i in range(paths.n)]
            transforms = {}
            for i in range(tds.n):
                transforms[tds.rows[i]] = self._py(_unpack(d, tds.vals[i]), 0)
        finally:
            free(names.t.slots)
            free(names.refs)
            free(paths.t.slots)
            free(paths.refs)
            free(tds.rows)
            free(tds.vals)
            free(vals.p)
        return dict(extra_names=extra, st_fqn=st_fqn, st_offset_ndim=st_nd,
                    st_offset_values=st_vals, st_index=st_index, st_path=st_path,
                    paths=path_list, st_file_offset=st_foff, st_length=st_len,
                    st_transforms=transforms, storage_data_none=False)


def _check_unique(hashes, st_fqn, st_nd, st_vals):
    # A dict holds one entry per (fqn, offset): equal keys in the stream
    # would collapse. Keys with equal (keyed) hashes are compared exactly;
    # a file cannot choose keys whose hashes collide.
    srt = np.sort(hashes)
    same = srt[1:] == srt[:-1]
    if not same.any():
        return
    rows = np.flatnonzero(np.isin(hashes, srt[1:][same])).tolist()
    ptr = np.concatenate(([0], np.cumsum(np.maximum(st_nd, 0))))
    seen = set()
    for r in rows:
        key = (int(st_fqn[r]), int(st_nd[r]), st_vals[ptr[r]:ptr[r + 1]].tobytes())
        if key in seen:
            raise Unsupported(_WHY[W_DUPLICATE])
        seen.add(key)


_ABSENT = object()


cdef int _copy_chunks(D *d, int64_t cid, int32_t nd, int64_t *ov, int64_t *zv,
                      int64_t *vpos, int64_t *rpos) noexcept nogil:
    # The chunks of one tensor into the offset and size columns; 1 when a
    # chunk is not a built ChunkStorageMetadata of nd int64 values >= 0.
    cdef int64_t s = d.conts[cid].head
    cdef Seg *seg
    cdef V v
    cdef Inst *p
    cdef V o
    cdef V z
    cdef Py_ssize_t i, j
    while s >= 0:
        seg = &d.segs[s]
        for i in range(seg.n):
            v = _it(d, seg.start + i)
            if v.kind != K_INST:
                return 1
            p = &d.insts[v.a]
            if p.role != R_CHUNK or not p.built:
                return 1
            o = _it(d, p.slots)
            z = _it(d, p.slots + 1)
            if o.kind != K_ITUPLE or z.kind != K_ITUPLE or o.b != nd or z.b != nd:
                return 1
            for j in range(nd):
                if d.ints[o.a + j] < 0 or d.ints[z.a + j] < 0:
                    return 1
                ov[vpos[0] + j] = d.ints[o.a + j]
                zv[vpos[0] + j] = d.ints[z.a + j]
            vpos[0] += nd
            rpos[0] += 1
        s = seg.next
    return 0


cdef int _seed_names(D *d, StrTab *names, V root) noexcept nogil:
    cdef Inst *p = &d.insts[root.a]
    cdef V sdm = _it(d, p.slots)
    cdef int64_t s = d.conts[sdm.a].head
    cdef Seg *seg
    cdef V k
    cdef Py_ssize_t i
    while s >= 0:
        seg = &d.segs[s]
        for i in range(seg.n):
            k = _it(d, seg.start + 2 * i)
            if _str_id(names, d.buf, k.a, k.b, True) < 0:
                return -1
        s = seg.next
    return 0


ctypedef struct I64Buf:
    int64_t *p
    Py_ssize_t n, cap


ctypedef struct TdList:
    int64_t *rows
    uint64_t *vals
    Py_ssize_t n, cap, cap2


cdef inline uint64_t _key_hash(uint64_t key, int64_t fid, int64_t nd, const int64_t *vals) noexcept nogil:
    cdef uint64_t h = ck_mix64(key ^ <uint64_t>fid) ^ <uint64_t>(nd + 2)
    cdef int64_t j
    for j in range(nd):
        h = ck_mix64(h ^ <uint64_t>vals[j] ^ key)
    return ck_mix64(h)


cdef inline int64_t _cached_id(StrTab *tab, int64_t (*cache)[3], const uint8_t *buf, V *f) noexcept nogil:
    # Memoised strs are one range of the input however often they are used:
    # a direct-mapped cache by that range saves hashing the bytes again.
    cdef int64_t ci = <int64_t>(ck_mix64(<uint64_t>f.a) & (CACHE - 1))
    cdef int64_t id_
    if cache[ci][0] == f.a and cache[ci][1] == f.b:
        return cache[ci][2]
    id_ = _str_id(tab, buf, f.a, f.b, True)
    if id_ >= 0:
        cache[ci][0] = f.a
        cache[ci][1] = f.b
        cache[ci][2] = id_
    return id_


cdef int _storage_fill(D *d, int64_t cid, StrTab *names, StrTab *paths,
                       int64_t[::1] st_fqn, int64_t[::1] st_nd, I64Buf *ov,
                       int64_t[::1] st_index, int64_t[::1] st_path, int64_t[::1] st_foff,
                       int64_t[::1] st_len, uint64_t[::1] hashes, TdList *tds) noexcept nogil:
    # One pass over storage_data: every key a built MetadataIndex (fqn str,
    # offset None/absent or ints >= 0, index None/absent or an int >= 0),
    # every value a built StorageInfo (path str, offset and length ints >= 0,
    # transform_descriptors kept aside when set). W_* on a mismatch.
    cdef int64_t s = d.conts[cid].head, row = 0, vpos = 0, fid, pid, nd, j
    cdef int64_t cache[2][CACHE][3]
    cdef uint64_t key = ck_hash_key()
    cdef Seg *seg
    cdef V k, v, f
    cdef Inst *p
    cdef Inst *q
    cdef Py_ssize_t i
    cdef int64_t *vals
    memset(cache, 0xff, sizeof(cache))
    while s >= 0:
        seg = &d.segs[s]
        for i in range(seg.n):
            k = _it(d, seg.start + 2 * i)
            v = _it(d, seg.start + 2 * i + 1)
            if k.kind != K_INST or v.kind != K_INST:
                return W_STORAGE
            p = &d.insts[k.a]
            q = &d.insts[v.a]
            if p.role != R_INDEX or not p.built or q.role != R_SINFO or not q.built:
                return W_STORAGE
            f = _it(d, p.slots)
            if f.kind != K_STR:
                return W_STORAGE
            fid = _cached_id(names, cache[0], d.buf, &f)
            if fid < 0:
                return W_NOMEM
            st_fqn[row] = fid
            f = _it(d, p.slots + 1)
            if f.kind == K_ITUPLE:
                nd = f.b
                if _grow(<void **>&ov.p, &ov.cap, vpos + nd + 1, sizeof(int64_t)) < 0:
                    return W_NOMEM
                vals = ov.p
                for j in range(nd):
                    if d.ints[f.a + j] < 0:
                        return W_STORAGE
                    vals[vpos + j] = d.ints[f.a + j]
            elif f.kind == K_NONE or f.kind == K_ABSENT:
                nd = -1
            else:
                return W_STORAGE
            st_nd[row] = nd
            hashes[row] = _key_hash(key, fid, nd, &ov.p[vpos] if nd > 0 else NULL)
            if nd > 0:
                vpos += nd
            f = _it(d, p.slots + 2)
            if f.kind == K_INT and f.a >= 0:
                st_index[row] = f.a
            elif f.kind == K_NONE or f.kind == K_ABSENT:
                st_index[row] = -1
            else:
                return W_STORAGE
            f = _it(d, q.slots)
            if f.kind != K_STR:
                return W_STORAGE
            pid = _cached_id(paths, cache[1], d.buf, &f)
            if pid < 0:
                return W_NOMEM
            st_path[row] = pid
            f = _it(d, q.slots + 1)
            if f.kind != K_INT or f.a < 0:
                return W_STORAGE
            st_foff[row] = f.a
            f = _it(d, q.slots + 2)
            if f.kind != K_INT or f.a < 0:
                return W_STORAGE
            st_len[row] = f.a
            if d.items[q.slots + 3] != K_ABSENT:
                f = _it(d, q.slots + 3)
                if f.kind != K_NONE:
                    if (_grow(<void **>&tds.rows, &tds.cap, tds.n + 1, sizeof(int64_t)) < 0
                            or _grow(<void **>&tds.vals, &tds.cap2, tds.n + 1, sizeof(uint64_t)) < 0):
                        return W_NOMEM
                    tds.rows[tds.n] = row
                    tds.vals[tds.n] = d.items[q.slots + 3]
                    tds.n += 1
            row += 1
        s = seg.next
    ov.n = vpos
    return 0


def decode(const uint8_t[::1] data not None, object lookup, list roles, list objects,
           int max_depth=100):
    """Columns of a DCP ``Metadata`` pickle, as a dict of ``MetadataColumns`` arguments.

    ``lookup(module, name)`` (both bytes) returns the code of an allow-listed
    global (0: not allowed); ``roles[code]`` says what it is to the machine
    (see the ``R_*`` roles: a metadata class, ``torch.Size``, the layout,
    memory-format and path helpers, or a constant) and ``objects[code]`` is
    the object a value of it becomes (a constant's name, the helper called
    on the stream's arguments). Properties, ``storage_meta`` and the small
    fields come back as Python values for the caller to check; chunk and
    storage columns as int64 arrays. Raises :class:`Unsupported` (with the
    reason) for a stream the machine does not model, and ``MemoryError``.
    """
    cdef _Decoder dec = _Decoder()
    cdef D *d = &dec.d
    cdef Py_ssize_t i
    cdef int r
    if len(roles) != len(objects) or len(roles) > 4096:
        raise ValueError("roles and objects must be lists of the same length (at most 4096)")
    memset(d, 0, sizeof(D))
    for i in range(len(roles)):
        r = roles[i]
        if r < 0 or r >= N_ROLES:
            raise ValueError(f"roles[{i}] = {r} is not a role")
        d.roles[i] = <uint8_t>r
    d.n_roles = len(roles)
    dec.data = data
    dec.objects = objects
    dec.depth_limit = max_depth
    dec.budget = data.shape[0] + 4096
    d.buf = &data[0] if data.shape[0] else <const uint8_t *>b""
    d.len = data.shape[0]
    # Upper bounds seen on torch's files, per byte of stream: a memo entry per
    # 8 bytes, an item record per 4, an int per 8, an instance or container per 32.
    if (_reserve(<void **>&d.stack, &d.cap_stack, 4096, sizeof(V)) < 0
            or _reserve(<void **>&d.memo, &d.cap_memo, d.len // 8 + 256, sizeof(uint64_t)) < 0
            or _reserve(<void **>&d.items, &d.cap_items, d.len // 4 + 256, sizeof(uint64_t)) < 0
            or _reserve(<void **>&d.ints, &d.cap_ints, d.len // 8 + 256, sizeof(int64_t)) < 0
            or _reserve(<void **>&d.insts, &d.cap_insts, d.len // 32 + 256, sizeof(Inst)) < 0
            or _reserve(<void **>&d.conts, &d.cap_conts, d.len // 32 + 256, sizeof(Cont)) < 0
            or _reserve(<void **>&d.segs, &d.cap_segs, d.len // 64 + 256, sizeof(Seg)) < 0):
        raise MemoryError()
    cdef PyObject *fn = <PyObject *>lookup
    with nogil:
        r = _run(d, fn)
    if r < 0:
        if d.why == W_NOMEM:
            raise MemoryError()
        raise Unsupported(f"{_WHY[d.why]} (byte {d.why_pos})")
    return dec.columns()


#: Role numbers, by name, for building ``roles``.
ROLES = {
    "Metadata": R_METADATA, "TensorStorageMetadata": R_TSM, "ChunkStorageMetadata": R_CHUNK,
    "BytesStorageMetadata": R_BYTES, "MetadataIndex": R_INDEX, "StorageMeta": R_SMETA,
    "StorageInfo": R_SINFO, "TensorProperties": R_TPROPS, "Size": R_SIZE,
    "memory_format_encoding": R_MEMFMT, "get_layout": R_LAYOUT, "path": R_PATH,
    "constant": R_CONST,
}

ABSENT = _ABSENT
