"""Opcode-level check of an untrusted ``.metadata`` pickle before anything is built.

An allow-list in ``find_class`` decides which globals a stream may name, but
not what the stream does with them: ``BUILD`` can set attributes on an
allow-listed *class* or function (poisoning it for the whole process),
``REDUCE`` can call an allowed constructor with any arguments, a memo index
of 2**32 makes the C unpickler allocate gigabytes, and hashing a tuple
nested a million deep overflows the C stack. ``scan`` runs the stream's
opcodes over *abstract* values (what kind of object each stack slot and
memo entry holds, how deep it nests, whether an instance was built) and
refuses a stream unless every opcode does what DCP metadata needs:

* globals only from the table it is given (resolved by name, as the
  unpickler's ``find_class`` will resolve them);
* ``NEWOBJ``/``NEWOBJ_EX`` of a metadata class with no arguments;
  ``REDUCE`` only of the few callables that take arguments (``torch.Size``,
  the layout and memory-format helpers, plain containers, paths), each with
  the argument kinds it accepts;
* ``BUILD`` only once, on an instance made by ``NEWOBJ`` in this stream,
  with a dict state (a 5-tuple for TensorProperties): never on a class, a
  function or a container, never slot state (which would ``setattr``);
* no ``INST``/``OBJ``/``EXT*``/``PERSID``/out-of-band buffers;
* ``APPEND``/``SETITEM``/``ADDITEMS`` only on a list/dict/set, and only
  strs hashed (dict keys may also be metadata objects): ints and tuples
  hash without a key, so a file could choose colliding ones;
* every declared length within the stream, no opcode across a frame's end
  (the C unpickler would read on after the frame), memo indices dense (a
  new index is the next one), containers nested at most ``max_depth`` deep
  and never deepened once inside another, str arguments of calls within a
  budget of the stream's size, and the result a built ``Metadata`` instance.

The scan is a linear pass over bytes with the GIL released; it takes the GIL
back only to resolve a global's name (a real stream names a dozen). It is
stricter than the C unpickler on purpose: a stream it accepts is one the
unpickler builds exactly as the scan modelled it. Field *values* are checked
afterwards on the built objects (``ckcore._kernels._mdcheck``).
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from cpython.object cimport PyObject
from libc.string cimport memchr, memcpy


# Kinds of abstract values.
cdef enum:
    K_NONE = 0
    K_BOOL
    K_INT
    K_FLOAT
    K_NUM
    K_STR
    K_BYTES
    K_TUPLE
    K_LIST
    K_DICT
    K_SET
    K_FROZENSET
    K_GLOBAL
    K_INST
    K_PATH
    K_BIGINT     # an int that may not fit in int64 (its hash is not int64's)

# What may be hashed: dict keys are str (or a metadata object: MetadataIndex
# keys storage_data), set elements are str. Ints and tuples are left out:
# their hashes are not randomised, so a file could pick thousands of keys
# with one hash and make every insertion walk all of them.
cdef enum:
    HASHABLE_KEYS = (1 << K_STR) | (1 << K_GLOBAL) | (1 << K_INST)
    HASHABLE_ELEMENTS = (1 << K_STR) | (1 << K_GLOBAL)
    # MetadataIndex is a dict key: its offsets tuple is hashed on every
    # insertion, so it stays as short as a shape can reasonably be.
    MAX_INDEX_WIDTH = 1024
    MAX_STATE_ENTRIES = 8
    INDEX_FIELD_KINDS = ((1 << K_STR) | (1 << K_GLOBAL) | (1 << K_INT) | (1 << K_NONE)
                         | (1 << K_TUPLE))


# Val.flags bits.
cdef enum:
    BUILT = 1
    # Placed inside another value, whose depth was computed from this one's:
    # this one may then not grow deeper (the outer depth would be stale).
    EMBEDDED = 2


# Kinds of globals: the allow-list table maps (module, name) to one of these.
# 1..8 are the metadata classes (NEWOBJ then BUILD).
cdef enum:
    G_METADATA = 1
    G_TSM = 2
    G_CHUNK = 3
    G_BYTES_MD = 4
    G_INDEX = 5
    G_STORAGE_META = 6
    G_STORAGE_INFO = 7
    G_TPROPS = 8
    G_SIZE = 9
    G_MEMFMT = 10
    G_LAYOUT_FN = 11
    G_CONST = 12
    G_TUPLE = 13
    G_LIST = 14
    G_SET = 15
    G_FROZENSET = 16
    G_DICT = 17
    G_ODICT = 18
    G_COMPLEX = 19
    G_PATH = 20

# Outcome codes: 0 accepted; the rest name why, and whether it is a refusal
# of something that could run or change code (unsafe) or plain damage.
cdef enum:
    E_OK = 0
    E_TRUNCATED
    E_BAD_OPCODE
    E_UNDERFLOW
    E_MEMO
    E_DEPTH
    E_LENGTH
    E_PROTOCOL
    E_RESULT
    E_NO_MEMORY
    E_UNSAFE_FIRST
    E_GLOBAL = E_UNSAFE_FIRST
    E_FORBIDDEN_OPCODE
    E_BUILD
    E_CALL
    E_TARGET
    E_KEY
    E_FRAME

cdef const char *_MESSAGES[18]
_MESSAGES[E_OK] = b"ok"
_MESSAGES[E_TRUNCATED] = b"the stream ends inside an opcode or before STOP"
_MESSAGES[E_BAD_OPCODE] = b"invalid opcode"
_MESSAGES[E_UNDERFLOW] = b"an opcode takes more values than the stack holds"
_MESSAGES[E_MEMO] = b"memo misuse (an index read before it was set, or set out of order)"
_MESSAGES[E_DEPTH] = b"values nested deeper than the limit (or a MetadataIndex offset too long)"
_MESSAGES[E_LENGTH] = b"a declared length is negative or runs past the end of the stream"
_MESSAGES[E_PROTOCOL] = b"unsupported pickle protocol"
_MESSAGES[E_RESULT] = b"the stream's result is not a DCP Metadata object"
_MESSAGES[E_NO_MEMORY] = b"out of memory while checking the stream"
_MESSAGES[E_GLOBAL] = b"global not on the allow-list"
_MESSAGES[E_FORBIDDEN_OPCODE] = (
    b"opcode refused: INST, OBJ, EXT codes, persistent ids and out-of-band buffers "
    b"are never in DCP metadata")
_MESSAGES[E_BUILD] = (
    b"BUILD refused: state may only be set once, on a metadata instance made by "
    b"NEWOBJ, with the state its class pickles")
_MESSAGES[E_CALL] = b"call refused: a global called with arguments its type does not take"
_MESSAGES[E_TARGET] = b"APPEND/SETITEM/ADDITEMS on an object that is not a list/dict/set"
_MESSAGES[E_FRAME] = (
    b"an opcode runs past the end of its frame, or a frame starts inside another: "
    b"the unpickler would then run bytes other than the ones checked")
_MESSAGES[E_KEY] = (
    b"a dict key or set element that is not a str (or, for a dict, a metadata object): "
    b"DCP metadata hashes nothing else, and other values can make hashing slow")


ctypedef struct Val:
    uint8_t kind
    uint8_t flags        # BUILT (K_INST: its BUILD came), EMBEDDED (inside another value)
    uint16_t depth       # containers: nesting (0 for scalars)
    uint16_t mask        # K_TUPLE/K_LIST/K_SET/K_FROZENSET: bit per kind of its items;
    #                      K_DICT: of its keys and values
    uint16_t inner       # K_DICT: bit per kind of the items of its tuple values
    int32_t n            # K_TUPLE: length; K_GLOBAL/K_INST: G_* kind; K_STR: byte length or -1;
    #                      K_DICT: the longest tuple among its values
    int64_t ref          # K_TUPLE: first item's id; K_STR: offset of its bytes; K_DICT: entries
    int64_t text         # K_TUPLE: bytes of its str items (-1: a str of unknown length)


ctypedef struct Scan:
    const uint8_t *buf
    Py_ssize_t len
    Py_ssize_t pos
    Py_ssize_t op_pos
    int max_depth
    Val *vals
    Py_ssize_t n_vals, cap_vals
    int64_t *stack
    Py_ssize_t n_stack, cap_stack
    Py_ssize_t *marks
    Py_ssize_t n_marks, cap_marks
    Py_ssize_t fence     # the innermost MARK's stack position (0 without one)
    Py_ssize_t frame_end  # end of the current protocol-4 frame (0 before any)
    int64_t text_budget   # bytes of str arguments calls may still parse
    int64_t *memo
    Py_ssize_t cap_memo, memo_len
    int error
    int64_t result


cdef int _grow(void **p, Py_ssize_t *cap, Py_ssize_t need, size_t item) noexcept nogil:
    # Doubling growth; every table is bounded by the stream's length, which
    # the caller's size cap bounds.
    cdef Py_ssize_t new_cap = cap[0] if cap[0] > 0 else 64
    cdef void *q
    while new_cap < need:
        new_cap *= 2
    q = realloc(p[0], <size_t>new_cap * item)
    if q == NULL:
        return -1
    p[0] = q
    cap[0] = new_cap
    return 0


cdef inline int _fail(Scan *s, int code) noexcept nogil:
    if s.error == E_OK:
        s.error = code
    return -1


cdef inline int64_t _new(Scan *s, uint8_t kind, int depth) noexcept nogil:
    cdef Val *v
    if depth > s.max_depth:
        _fail(s, E_DEPTH)
        return -1
    if s.n_vals == s.cap_vals and _grow(<void **>&s.vals, &s.cap_vals, s.n_vals + 1,
                                        sizeof(Val)) < 0:
        _fail(s, E_NO_MEMORY)
        return -1
    v = &s.vals[s.n_vals]
    v.kind = kind
    v.flags = 0
    v.depth = <uint16_t>depth
    v.mask = 0
    v.inner = 0
    v.n = 0
    v.ref = 0
    v.text = 0
    s.n_vals += 1
    return s.n_vals - 1


# Values that carry nothing but their kind (None, bools, ints, floats, bytes,
# the empty tuple) get no table entry: their stack and memo word is a tag
# below TAG_BASE. Table indices are >= 0; -1 is the error return.
cdef enum:
    TAG_BASE = -1000


cdef inline bint _failed(int64_t w) noexcept nogil:
    # The error return of _pop/_top/_new (tags are further below).
    return w < 0 and w > TAG_BASE


cdef inline int64_t _tag(uint8_t kind) noexcept nogil:
    return TAG_BASE - kind


cdef inline uint8_t _kind(Scan *s, int64_t w) noexcept nogil:
    return <uint8_t>(TAG_BASE - w) if w <= TAG_BASE else s.vals[w].kind


cdef inline int _depth(Scan *s, int64_t w) noexcept nogil:
    if w <= TAG_BASE:
        return 1 if TAG_BASE - w == K_TUPLE else 0
    return s.vals[w].depth


cdef inline int32_t _len(Scan *s, int64_t w) noexcept nogil:
    # K_TUPLE: its length (-1 when not modelled); K_STR: its byte length.
    return 0 if w <= TAG_BASE else s.vals[w].n


cdef inline int64_t _first(Scan *s, int64_t w) noexcept nogil:
    # K_TUPLE: the word of its first item.
    return -1 if w <= TAG_BASE else s.vals[w].ref


cdef inline uint16_t _mask(Scan *s, int64_t w) noexcept nogil:
    return 0 if w <= TAG_BASE else s.vals[w].mask


cdef inline Py_ssize_t _fence(Scan *s) noexcept nogil:
    return s.fence


cdef inline int _push(Scan *s, int64_t vid) noexcept nogil:
    if vid < 0 and vid > TAG_BASE:
        return -1
    if s.n_stack == s.cap_stack and _grow(<void **>&s.stack, &s.cap_stack, s.n_stack + 1,
                                          sizeof(int64_t)) < 0:
        return _fail(s, E_NO_MEMORY)
    s.stack[s.n_stack] = vid
    s.n_stack += 1
    return 0


cdef inline int64_t _pop(Scan *s) noexcept nogil:
    # The C unpickler never pops below the innermost MARK; neither do we.
    if s.n_stack <= _fence(s):
        _fail(s, E_UNDERFLOW)
        return -1
    s.n_stack -= 1
    return s.stack[s.n_stack]


cdef inline int64_t _top(Scan *s) noexcept nogil:
    if s.n_stack <= _fence(s):
        _fail(s, E_UNDERFLOW)
        return -1
    return s.stack[s.n_stack - 1]


cdef inline Py_ssize_t _pop_mark(Scan *s) noexcept nogil:
    cdef Py_ssize_t m
    if s.n_marks == 0:
        _fail(s, E_UNDERFLOW)
        return -1
    s.n_marks -= 1
    m = s.marks[s.n_marks]
    s.fence = s.marks[s.n_marks - 1] if s.n_marks else 0
    return m


cdef inline int _need(Scan *s, int64_t n) noexcept nogil:
    # An opcode's fixed-size argument: the stream must still hold it.
    if n > s.len - s.pos:
        return _fail(s, E_TRUNCATED)
    return 0


cdef inline int _declared(Scan *s, int64_t n) noexcept nogil:
    # A length the stream declares: checked before anything is sized by it.
    if n < 0 or n > s.len - s.pos:
        return _fail(s, E_LENGTH)
    return 0


cdef int _max_depth(Scan *s, Py_ssize_t first) noexcept nogil:
    # Deepest nesting among stack[first:].
    cdef Py_ssize_t i
    cdef int depth = 0
    cdef int d
    cdef int64_t w
    for i in range(first, s.n_stack):
        w = s.stack[i]
        d = _depth(s, w)
        if d > depth:
            depth = d
        if w > TAG_BASE:
            s.vals[w].flags |= EMBEDDED
    return depth


cdef uint16_t _kinds(Scan *s, Py_ssize_t first) noexcept nogil:
    # Bit per kind among stack[first:].
    cdef Py_ssize_t i
    cdef uint16_t mask = 0
    for i in range(first, s.n_stack):
        mask |= <uint16_t>(1 << _kind(s, s.stack[i]))
    return mask


cdef inline int64_t _text(Scan *s, Py_ssize_t first) noexcept nogil:
    # Bytes of the str values among stack[first:], -1 if one is of unknown
    # length; saturates far below overflow.
    cdef Py_ssize_t i
    cdef int64_t total = 0
    cdef int64_t w
    for i in range(first, s.n_stack):
        w = s.stack[i]
        if _kind(s, w) == K_STR and w > TAG_BASE:
            if s.vals[w].n < 0:
                return -1
            total += s.vals[w].n
            if total > (<int64_t>1 << 62):
                total = <int64_t>1 << 62
    return total


cdef inline int _seq(Scan *s, Py_ssize_t first, uint8_t kind) noexcept nogil:
    # stack[first:] becomes one tuple/list/frozenset value.
    cdef int64_t vid
    if kind == K_TUPLE and first == s.n_stack:
        return _push(s, _tag(K_TUPLE))
    vid = _new(s, kind, _max_depth(s, first) + 1)
    if vid < 0:
        return -1
    s.vals[vid].mask = _kinds(s, first)
    s.vals[vid].n = <int32_t>min(s.n_stack - first, 0x7fffffff)
    s.vals[vid].ref = s.stack[first] if s.n_stack > first else -1
    s.vals[vid].text = _text(s, first)
    s.n_stack = first
    return _push(s, vid)


cdef inline uint64_t _le(Scan *s, int nbytes) noexcept nogil:
    # Little-endian unsigned read (memcpy: the stream is not aligned).
    cdef uint64_t x = 0
    cdef uint8_t tmp[8]
    memcpy(tmp, s.buf + s.pos, nbytes)
    cdef int i
    for i in range(nbytes - 1, -1, -1):
        x = (x << 8) | tmp[i]
    s.pos += nbytes
    return x


cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef Py_ssize_t _line(Scan *s) noexcept nogil:
    # Length of the text argument up to its newline; pos moves past the newline.
    cdef const void *nl = memchr(s.buf + s.pos, 10, <size_t>(s.len - s.pos))
    cdef Py_ssize_t n
    if nl == NULL:
        _fail(s, E_TRUNCATED)
        return -1
    n = <const uint8_t *>nl - (s.buf + s.pos)
    s.pos += n + 1
    return n


cdef Py_ssize_t _text_int_digits(const uint8_t *p, Py_ssize_t n, bint long_suffix) noexcept nogil:
    # Number of digits of a text INT/LONG argument "[-]digits" (LONG: an "L"
    # may follow), or -1 for any other form.
    cdef Py_ssize_t i = 0, start
    if long_suffix and n > 0 and p[n - 1] == 76:
        n -= 1
    if n > 0 and p[0] == 45:
        i = 1
    start = i
    while i < n:
        if p[i] < 48 or p[i] > 57:
            return -1
        i += 1
    return n - start if n > start else -1


cdef int64_t _decimal(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    # A text memo index: digits only, below 2**62; -1 otherwise.
    cdef int64_t x = 0
    cdef Py_ssize_t i
    if n <= 0 or n > 18:
        return -1
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return -1
        x = x * 10 + (p[i] - 48)
    return x


cdef inline int _memo_put(Scan *s, int64_t idx) noexcept nogil:
    cdef int64_t vid
    # Picklers number memo entries 0, 1, 2, ...: a new index must be the next
    # one, so the memo (ours and the unpickler's) grows with the stream only.
    if s.n_stack <= _fence(s):
        return _fail(s, E_UNDERFLOW)
    if idx < 0 or idx > s.memo_len:
        return _fail(s, E_MEMO)
    vid = s.stack[s.n_stack - 1]
    if idx == s.memo_len:
        if idx >= s.cap_memo:
            if _grow(<void **>&s.memo, &s.cap_memo, idx + 1, sizeof(int64_t)) < 0:
                return _fail(s, E_NO_MEMORY)
        s.memo_len += 1
    s.memo[idx] = vid
    return 0


cdef inline int _memo_get(Scan *s, int64_t idx) noexcept nogil:
    if idx < 0 or idx >= s.memo_len:
        return _fail(s, E_MEMO)
    return _push(s, s.memo[idx])


cdef int _seq_from_mark(Scan *s, uint8_t kind) noexcept nogil:
    # TUPLE / LIST / FROZENSET: the values above the innermost MARK.
    cdef Py_ssize_t m = _pop_mark(s)
    if m < 0:
        return -1
    return _seq(s, m, kind)


cdef inline int _tuple_n(Scan *s, Py_ssize_t n) noexcept nogil:
    # EMPTY_TUPLE, TUPLE1..3: the top n values (above the fence).
    cdef int64_t vid, w
    cdef Py_ssize_t i, first = s.n_stack - n
    cdef int depth = 0, d
    cdef uint16_t mask = 0
    if first < s.fence:
        return _fail(s, E_UNDERFLOW)
    if n == 0:
        return _push(s, _tag(K_TUPLE))
    for i in range(first, s.n_stack):
        w = s.stack[i]
        d = _depth(s, w)
        depth = d if d > depth else depth
        mask |= <uint16_t>(1 << _kind(s, w))
        if w > TAG_BASE:
            s.vals[w].flags |= EMBEDDED
    vid = _new(s, K_TUPLE, depth + 1)
    if vid < 0:
        return -1
    s.vals[vid].mask = mask
    s.vals[vid].n = <int32_t>n
    s.vals[vid].ref = s.stack[first]
    s.vals[vid].text = _text(s, first)
    # The tuple takes its items' place: the stack cannot need to grow.
    s.stack[first] = vid
    s.n_stack = first + 1
    return 0


cdef int _dict_pairs(Scan *s, Py_ssize_t first, Val *d) noexcept nogil:
    # Keys must be hashable cheaply (HASHABLE_KEYS); the dict remembers its
    # longest tuple value, for the MetadataIndex width rule in _build.
    cdef Py_ssize_t i
    cdef int64_t v
    for i in range(first, s.n_stack, 2):
        if not (HASHABLE_KEYS >> _kind(s, s.stack[i])) & 1:
            return _fail(s, E_KEY)
        v = s.stack[i + 1]
        if _kind(s, v) == K_TUPLE:
            d.inner |= _mask(s, v)
            if _len(s, v) > d.n:
                d.n = _len(s, v)
    return 0


cdef inline int _into(Scan *s, Py_ssize_t first, int64_t target, uint8_t kind) noexcept nogil:
    # APPEND(S) / SETITEM(S) / ADDITEMS: the values from stack[first:] go into
    # ``target``, which must be a container of ``kind``; its depth follows.
    cdef int depth
    cdef Val *t
    if _failed(target):
        return -1
    if _kind(s, target) != kind or target <= TAG_BASE:
        return _fail(s, E_TARGET)
    t = &s.vals[target]
    if kind == K_DICT:
        if (s.n_stack - first) % 2:
            return _fail(s, E_UNDERFLOW)
        if _dict_pairs(s, first, t) < 0:
            return -1
    elif kind == K_SET:
        if _kinds(s, first) & ~HASHABLE_ELEMENTS:
            return _fail(s, E_KEY)
    t.mask |= _kinds(s, first)
    depth = t.depth
    cdef int inner = _max_depth(s, first) + 1
    if inner > depth:
        depth = inner
    if depth > s.max_depth or (t.flags & EMBEDDED and depth > t.depth):
        return _fail(s, E_DEPTH)
    t.depth = <uint16_t>depth
    if kind == K_DICT:
        t.ref += (s.n_stack - first) // 2
    else:
        # Items of a list or set, for what copying it costs (_call_result).
        t.n = <int32_t>min(<int64_t>t.n + (s.n_stack - first), 0x7fffffff)
    s.n_stack = first
    return 0


cdef int64_t _copy_tuple(Scan *s, int64_t w) noexcept nogil:
    # A new tuple value equal to tuple ``w`` (torch.Size(t), tuple(t)).
    cdef int64_t vid
    if w <= TAG_BASE:
        return w
    vid = _new(s, K_TUPLE, s.vals[w].depth)
    if vid >= 0:
        s.vals[vid].n = s.vals[w].n
        s.vals[vid].mask = s.vals[w].mask
        s.vals[vid].ref = s.vals[w].ref
        s.vals[vid].text = s.vals[w].text
    return vid


cdef int64_t _call_result(Scan *s, int g, int64_t args) noexcept nogil:
    # What calling global kind ``g`` with the argument tuple ``args`` gives,
    # or -1 if that call is refused. NEWOBJ and REDUCE share the rules.
    # Read everything from ``args`` first: _new may move the value table.
    cdef uint8_t kind = _kind(s, args)
    cdef int32_t n = _len(s, args)
    cdef uint16_t mask = _mask(s, args)
    cdef int64_t text = 0 if args <= TAG_BASE else s.vals[args].text
    cdef uint8_t k0 = _kind(s, _first(s, args)) if n > 0 else K_NONE
    cdef int d0 = _depth(s, _first(s, args)) if n > 0 else 0
    cdef uint16_t seqs = (1 << K_TUPLE) | (1 << K_LIST) | (1 << K_SET) | (1 << K_FROZENSET)
    cdef uint16_t nums = ((1 << K_INT) | (1 << K_BIGINT) | (1 << K_FLOAT) | (1 << K_NUM)
                          | (1 << K_BOOL))
    cdef uint16_t m0
    cdef int64_t vid, copied
    if kind != K_TUPLE or n < 0:
        _fail(s, E_CALL)
        return -1
    # Text a call parses (a path's parts, a complex or a layout name) is
    # charged to a budget of the stream's size: one long str passed to many
    # calls would otherwise cost its length each time.
    if text < 0 or text > s.text_budget:
        _fail(s, E_CALL)
        return -1
    s.text_budget -= text
    # Copying a container costs its length (torch.Size(t), list(x), set(x)):
    # charged the same way, so one long list copied by many calls cannot
    # cost its length each time.
    if n == 1 and (seqs >> k0) & 1:
        copied = _len(s, _first(s, args))
        if copied < 0 or copied > s.text_budget:
            _fail(s, E_CALL)
            return -1
        s.text_budget -= copied
    # A metadata class is never called (NEWOBJ without arguments, see
    # _newobj); the other globals each take the arguments their type takes.
    if g == G_SIZE or g == G_TUPLE:
        # torch.Size(t) / tuple(t) of a tuple: the same tuple, as modelled.
        # (Of a list, the length and items would not be known.)
        if n == 0 and g == G_TUPLE:
            return _tag(K_TUPLE)
        if n == 1 and k0 == K_TUPLE:
            return _copy_tuple(s, _first(s, args))
    elif g == G_MEMFMT:
        if n == 1 and k0 == K_INT:
            vid = _new(s, K_STR, 0)
            if vid >= 0:
                s.vals[vid].n = -1
            return vid
    elif g == G_LAYOUT_FN:
        if n == 1 and k0 == K_STR:
            vid = _new(s, K_STR, 0)
            if vid >= 0:
                s.vals[vid].n = -1
            return vid
    elif g == G_LIST or g == G_SET or g == G_FROZENSET:
        if n == 0 or (n == 1 and (seqs >> k0) & 1):
            # set/frozenset hash the items: only what a set may hold.
            m0 = _mask(s, _first(s, args)) if n else 0
            if g != G_LIST and m0 & ~HASHABLE_ELEMENTS:
                _fail(s, E_KEY)
                return -1
            vid = _new(s, K_LIST if g == G_LIST else K_SET if g == G_SET else K_FROZENSET,
                       max(d0, 1))
            if vid >= 0:
                s.vals[vid].mask = m0
                s.vals[vid].n = _len(s, _first(s, args)) if n else 0
            return vid
    elif g == G_DICT or g == G_ODICT:
        # Empty only (items come by SETITEMS, where keys are checked).
        if n == 0:
            return _new(s, K_DICT, 1)
    elif g == G_COMPLEX:
        if n <= 2 and (mask & ~(nums | (1 << K_STR))) == 0:
            return _new(s, K_NUM, 0)
    elif g == G_PATH:
        # Parts as strs (what pathlib pickles), never paths: a path of paths
        # of paths multiplies its parts at every level.
        if (mask & ~(1 << K_STR)) == 0 and n <= 256:
            return _new(s, K_PATH, 0)
    _fail(s, E_CALL)
    return -1


cdef int _newobj(Scan *s, int64_t cls, int64_t args) noexcept nogil:
    cdef int g
    cdef int64_t vid
    if _failed(cls) or _failed(args):
        return -1
    if _kind(s, cls) != K_GLOBAL or _kind(s, args) != K_TUPLE:
        return _fail(s, E_CALL)
    g = s.vals[cls].n
    if G_METADATA <= g <= G_TPROPS:
        if _len(s, args) != 0:
            return _fail(s, E_CALL)
        vid = _new(s, K_INST, 1)
        if vid < 0:
            return -1
        s.vals[vid].n = g
        return _push(s, vid)
    if g == G_PATH:
        return _fail(s, E_CALL)  # paths pickle through REDUCE; NEWOBJ would skip __init__
    return _push(s, _call_result(s, g, args))


cdef int _build(Scan *s) noexcept nogil:
    cdef int64_t state = _pop(s)
    cdef int64_t target = _top(s)
    cdef Val *t
    cdef int depth
    if _failed(state) or _failed(target):
        return -1
    if _kind(s, target) != K_INST:
        return _fail(s, E_BUILD)
    t = &s.vals[target]
    # Once per instance, and each state once: torch's pickler writes a fresh
    # state for every instance (a shared one would be copied into each).
    if t.flags & BUILT or (state > TAG_BASE and s.vals[state].flags & EMBEDDED):
        return _fail(s, E_BUILD)
    if t.n == G_TPROPS:
        # torch's TensorProperties.__getstate__: (dtype, layout, requires_grad,
        # memory_format, pin_memory); ckcore's stand-in takes exactly that.
        if _kind(s, state) != K_TUPLE or _len(s, state) != 5:
            return _fail(s, E_BUILD)
    elif _kind(s, state) != K_DICT or s.vals[state].ref > MAX_STATE_ENTRIES:
        # A (dict, slots) pair would make the unpickler setattr() its keys;
        # a big dict shared as the state of many instances would be copied
        # into each (no metadata class has more than five fields).
        return _fail(s, E_BUILD)
    depth = _depth(s, state) + 1
    if state > TAG_BASE:
        s.vals[state].flags |= EMBEDDED
    # MetadataIndex is hashed as a dict key: its state stays shallow (a dict
    # of a str, an offsets tuple of ints and an int), so hashing it never
    # recurses through a deep value.
    if t.n == G_INDEX and (depth > 3 or s.vals[state].n > MAX_INDEX_WIDTH):
        return _fail(s, E_DEPTH)
    # Its fields are a str, None, int64s and a tuple of int64s: the values
    # whose hash ckcore.metadata.MetadataIndex keys (see its __hash__).
    if t.n == G_INDEX and (s.vals[state].mask & ~INDEX_FIELD_KINDS
                           or s.vals[state].inner & ~(1 << K_INT)):
        return _fail(s, E_KEY)
    if depth > s.max_depth:
        return _fail(s, E_DEPTH)
    if t.flags & EMBEDDED and depth > t.depth:
        return _fail(s, E_DEPTH)
    t.flags |= BUILT
    t.depth = <uint16_t>depth
    return 0


cdef int _reduce(Scan *s) noexcept nogil:
    cdef int64_t args = _pop(s)
    cdef int64_t fn = _pop(s)
    if _failed(args) or _failed(fn):
        return -1
    if _kind(s, fn) != K_GLOBAL:
        return _fail(s, E_CALL)
    return _push(s, _call_result(s, s.vals[fn].n, args))


cdef inline int64_t _str(Scan *s, int64_t n, bint known) noexcept nogil:
    # A str whose bytes are buf[pos:pos+n] (``known``: as decoded, for names).
    cdef int64_t vid
    if _declared(s, n) < 0:
        return -1
    vid = _new(s, K_STR, 0)
    if vid < 0:
        return -1
    s.vals[vid].n = <int32_t>n if known and n < 0x7fffffff else -1
    s.vals[vid].ref = s.pos
    s.pos += n
    return vid


cdef inline int64_t _sized(Scan *s, uint8_t kind, int64_t n) noexcept nogil:
    # A scalar with an n-byte argument (ints, floats, bytes): a tag.
    if _declared(s, n) < 0:
        return -1
    s.pos += n
    return _tag(kind)


cdef int _resolve(Scan *s, PyObject *lookup, Py_ssize_t mod, Py_ssize_t mod_n,
                  Py_ssize_t name, Py_ssize_t name_n) noexcept nogil:
    # A global's kind from the caller's table (the only step that needs the
    # GIL). Any failure of the lookup is a refusal.
    cdef int g = 0
    cdef int64_t vid
    with gil:
        try:
            g = (<object>lookup)(s.buf[mod:mod + mod_n], s.buf[name:name + name_n])
        except Exception:
            g = 0
    if g <= 0:
        return _fail(s, E_GLOBAL)
    vid = _new(s, K_GLOBAL, 0)
    if vid >= 0:
        s.vals[vid].n = g
    return _push(s, vid)


cdef inline int _step(Scan *s, PyObject *lookup) noexcept nogil:
    # One opcode, then the frame rule. The C unpickler reads a frame whole;
    # when an opcode (its argument, its text line) runs past the frame's end
    # it drops the rest of the frame and reads on from the file after it,
    # so it would run bytes this scan took for data. No opcode may cross a
    # frame's end: then both read the same bytes the same way.
    cdef int r = _op(s, lookup)
    if r >= 0 and s.op_pos < s.frame_end < s.pos:
        return _fail(s, E_FRAME)
    return r


# Stack and stream control: MARK, STOP, POP, POP_MARK, DUP, PROTO, FRAME.
cdef inline int _op_control(Scan *s, uint8_t op) noexcept nogil:
    cdef Py_ssize_t m
    cdef int64_t a
    if op == 0x28:    # MARK
        if s.n_marks == s.cap_marks and _grow(<void **>&s.marks, &s.cap_marks, s.n_marks + 1,
                                              sizeof(Py_ssize_t)) < 0:
            return _fail(s, E_NO_MEMORY)
        s.marks[s.n_marks] = s.n_stack
        s.n_marks += 1
        s.fence = s.n_stack
        return 0
    elif op == 0x2e:    # STOP
        a = _pop(s)
        if _failed(a):
            return -1
        if (s.n_stack or s.n_marks or _kind(s, a) != K_INST or s.vals[a].n != G_METADATA
                or not s.vals[a].flags & BUILT):
            return _fail(s, E_RESULT)
        s.result = a
        return 1
    elif op == 0x30:    # POP: a value, or the MARK on top of the stack
        if s.n_marks and s.marks[s.n_marks - 1] == s.n_stack:
            _pop_mark(s)
            return 0
        return -1 if _failed(_pop(s)) else 0
    elif op == 0x31:    # POP_MARK
        m = _pop_mark(s)
        if m < 0:
            return -1
        s.n_stack = m
        return 0
    elif op == 0x32:    # DUP
        return _push(s, _top(s))
    elif op == 0x80:    # PROTO
        if _need(s, 1) < 0:
            return -1
        if _le(s, 1) > 5:
            return _fail(s, E_PROTOCOL)
        return 0
    elif op == 0x95:    # FRAME: the opcodes inside are scanned as usual (see _step)
        if s.op_pos < s.frame_end:
            return _fail(s, E_FRAME)
        if _need(s, 8) < 0:
            return -1
        a = <int64_t>_le(s, 8)
        if a < 0 or a > s.len - s.pos:
            return _fail(s, E_LENGTH)
        s.frame_end = s.pos + a
        return 0
    return _fail(s, E_BAD_OPCODE)


# Scalars: NONE, bools, ints (text, binary, LONG1/LONG4), floats.
cdef inline int _op_scalar(Scan *s, uint8_t op) noexcept nogil:
    cdef Py_ssize_t n, m, p0
    cdef int64_t a
    if op == 0x4e:    # NONE
        return _push(s, _tag(K_NONE))
    elif op == 0x49 or op == 0x4c:   # INT, LONG (text; I01/I00 are bools)
        p0 = s.pos
        n = _line(s)
        if n < 0:
            return -1
        # C reads any 2-character INT worth 0 or 1 as a bool: "00", "01", "-0".
        if (op == 0x49 and n == 2 and (
                (s.buf[p0] == 48 and (s.buf[p0 + 1] == 48 or s.buf[p0 + 1] == 49))
                or (s.buf[p0] == 45 and s.buf[p0 + 1] == 48))):
            return _push(s, _tag(K_BOOL))
        # Only what picklers write: [-]digits[L]. (The C unpickler also takes
        # hex, octal, spaces and signs, and reads " 1" as True.)
        m = _text_int_digits(s.buf + p0, n, op == 0x4c)
        if m < 0:
            return _fail(s, E_BAD_OPCODE)
        return _push(s, _tag(K_INT if m <= 18 else K_BIGINT))
    elif op == 0x46:    # FLOAT (text)
        if _line(s) < 0:
            return -1
        return _push(s, _tag(K_FLOAT))
    elif op == 0x4a:    # BININT
        return _push(s, _sized(s, K_INT, 4))
    elif op == 0x4b:    # BININT1
        return _push(s, _sized(s, K_INT, 1))
    elif op == 0x4d:    # BININT2
        return _push(s, _sized(s, K_INT, 2))
    elif op == 0x47:    # BINFLOAT
        return _push(s, _sized(s, K_FLOAT, 8))
    elif op == 0x88 or op == 0x89:   # NEWTRUE, NEWFALSE
        return _push(s, _tag(K_BOOL))
    elif op == 0x8a:    # LONG1: int64 in at most 8 bytes
        if _need(s, 1) < 0:
            return -1
        a = <int64_t>_le(s, 1)
        return _push(s, _sized(s, K_INT if a <= 8 else K_BIGINT, a))
    elif op == 0x8b:    # LONG4 (signed length)
        if _need(s, 4) < 0:
            return -1
        a = <int64_t>_le(s, 4)
        if a >= <int64_t>0x80000000:
            return _fail(s, E_LENGTH)
        return _push(s, _sized(s, K_INT if a <= 8 else K_BIGINT, a))
    return _fail(s, E_BAD_OPCODE)


# Strings and bytes, with their length prefixes (or text lines).
cdef inline int _op_text(Scan *s, uint8_t op) noexcept nogil:
    cdef int64_t a, vid
    if op == 0x53 or op == 0x56:   # STRING, UNICODE (text, escaped: content unknown)
        if _line(s) < 0:
            return -1
        vid = _new(s, K_STR, 0)
        if vid >= 0:
            s.vals[vid].n = -1
        return _push(s, vid)
    elif op == 0x54 or op == 0x58:   # BINSTRING (signed), BINUNICODE (unsigned): 4-byte length
        if _need(s, 4) < 0:
            return -1
        a = <int64_t>_le(s, 4)
        if op == 0x54 and a >= <int64_t>0x80000000:
            return _fail(s, E_LENGTH)
        return _push(s, _str(s, a, True))
    elif op == 0x55:    # SHORT_BINSTRING
        if _need(s, 1) < 0:
            return -1
        return _push(s, _str(s, <int64_t>_le(s, 1), True))
    elif op == 0x42:    # BINBYTES
        if _need(s, 4) < 0:
            return -1
        return _push(s, _sized(s, K_BYTES, <int64_t>_le(s, 4)))
    elif op == 0x43:    # SHORT_BINBYTES
        if _need(s, 1) < 0:
            return -1
        return _push(s, _sized(s, K_BYTES, <int64_t>_le(s, 1)))
    elif op == 0x8c:    # SHORT_BINUNICODE
        if _need(s, 1) < 0:
            return -1
        return _push(s, _str(s, <int64_t>_le(s, 1), True))
    elif op == 0x8d or op == 0x8e:   # BINUNICODE8, BINBYTES8
        if _need(s, 8) < 0:
            return -1
        a = <int64_t>_le(s, 8)
        if a < 0:
            return _fail(s, E_LENGTH)
        if op == 0x8d:
            return _push(s, _str(s, a, True))
        return _push(s, _sized(s, K_BYTES, a))
    return _fail(s, E_BAD_OPCODE)


# Containers: lists, tuples, dicts, sets, and the opcodes that fill them.
cdef inline int _op_container(Scan *s, uint8_t op) noexcept nogil:
    cdef Py_ssize_t m
    cdef int64_t vid
    if op == 0x61:    # APPEND
        if s.n_stack - 1 <= _fence(s):
            return _fail(s, E_UNDERFLOW)
        return _into(s, s.n_stack - 1, s.stack[s.n_stack - 2], K_LIST)
    elif op == 0x65 or op == 0x75 or op == 0x90:   # APPENDS, SETITEMS, ADDITEMS
        m = _pop_mark(s)
        if m < 0:
            return -1
        if m <= _fence(s) or m > s.n_stack:
            return _fail(s, E_UNDERFLOW)
        return _into(s, m, s.stack[m - 1],
                     K_LIST if op == 0x65 else K_DICT if op == 0x75 else K_SET)
    elif op == 0x73:    # SETITEM
        if s.n_stack - 2 <= _fence(s):
            return _fail(s, E_UNDERFLOW)
        return _into(s, s.n_stack - 2, s.stack[s.n_stack - 3], K_DICT)
    elif op == 0x64:    # DICT (key, value pairs above the MARK)
        m = _pop_mark(s)
        if m < 0:
            return -1
        if (s.n_stack - m) % 2:
            return _fail(s, E_UNDERFLOW)
        vid = _new(s, K_DICT, _max_depth(s, m) + 1)
        if vid < 0:
            return -1
        if _dict_pairs(s, m, &s.vals[vid]) < 0:
            return -1
        s.vals[vid].mask = _kinds(s, m)
        s.vals[vid].ref = (s.n_stack - m) // 2
        s.n_stack = m
        return _push(s, vid)
    elif op == 0x7d:    # EMPTY_DICT
        return _push(s, _new(s, K_DICT, 1))
    elif op == 0x6c:    # LIST
        return _seq_from_mark(s, K_LIST)
    elif op == 0x5d:    # EMPTY_LIST
        return _push(s, _new(s, K_LIST, 1))
    elif op == 0x74:    # TUPLE
        return _seq_from_mark(s, K_TUPLE)
    elif op == 0x29:    # EMPTY_TUPLE
        return _tuple_n(s, 0)
    elif op == 0x85:
        return _tuple_n(s, 1)
    elif op == 0x86:
        return _tuple_n(s, 2)
    elif op == 0x87:
        return _tuple_n(s, 3)
    elif op == 0x8f:    # EMPTY_SET
        return _push(s, _new(s, K_SET, 1))
    elif op == 0x91:    # FROZENSET
        if s.n_marks and _kinds(s, s.marks[s.n_marks - 1]) & ~HASHABLE_ELEMENTS:
            return _fail(s, E_KEY)
        return _seq_from_mark(s, K_FROZENSET)
    return _fail(s, E_BAD_OPCODE)


# The memo: GET/PUT in their three widths, and MEMOIZE (the commonest opcode:
# its fast path is here).
cdef inline int _op_memo(Scan *s, uint8_t op) noexcept nogil:
    cdef Py_ssize_t n, p0
    cdef int64_t a
    if op == 0x67 or op == 0x70:   # GET, PUT (text index)
        p0 = s.pos
        n = _line(s)
        if n < 0:
            return -1
        a = _decimal(s.buf + p0, n)
        if a < 0:
            return _fail(s, E_MEMO)
        return _memo_get(s, a) if op == 0x67 else _memo_put(s, a)
    elif op == 0x68 or op == 0x71:   # BINGET, BINPUT
        if _need(s, 1) < 0:
            return -1
        a = s.buf[s.pos]
        s.pos += 1
        return _memo_get(s, a) if op == 0x68 else _memo_put(s, a)
    elif op == 0x6a or op == 0x72:   # LONG_BINGET, LONG_BINPUT
        if _need(s, 4) < 0:
            return -1
        a = <int64_t>_le32(s.buf + s.pos)
        s.pos += 4
        return _memo_get(s, a) if op == 0x6a else _memo_put(s, a)
    elif op == 0x94:    # MEMOIZE (the commonest opcode: its fast path is here)
        if s.n_stack > s.fence and s.memo_len < s.cap_memo:
            s.memo[s.memo_len] = s.stack[s.n_stack - 1]
            s.memo_len += 1
            return 0
        return _memo_put(s, s.memo_len)
    return _fail(s, E_BAD_OPCODE)


# Globals and the objects built from them: GLOBAL, STACK_GLOBAL, REDUCE, BUILD,
# NEWOBJ, NEWOBJ_EX.
cdef inline int _op_object(Scan *s, PyObject *lookup, uint8_t op) noexcept nogil:
    cdef Py_ssize_t n, m, p0
    cdef int64_t a, b, vid
    if op == 0x62:    # BUILD
        return _build(s)
    elif op == 0x52:    # REDUCE
        return _reduce(s)
    elif op == 0x63:    # GLOBAL "module\nname\n"
        p0 = s.pos
        n = _line(s)
        if n < 0:
            return -1
        m = _line(s)
        if m < 0:
            return -1
        return _resolve(s, lookup, p0, n, p0 + n + 1, m)
    elif op == 0x93:    # STACK_GLOBAL
        b = _pop(s)
        a = _pop(s)
        if _failed(a) or _failed(b):
            return -1
        if (_kind(s, a) != K_STR or _kind(s, b) != K_STR
                or s.vals[a].n < 0 or s.vals[b].n < 0):
            return _fail(s, E_GLOBAL)
        return _resolve(s, lookup, s.vals[a].ref, s.vals[a].n, s.vals[b].ref, s.vals[b].n)
    elif op == 0x81:    # NEWOBJ
        b = _pop(s)
        a = _pop(s)
        return _newobj(s, a, b)
    elif op == 0x92:    # NEWOBJ_EX: keyword arguments must be an empty dict
        b = _pop(s)
        a = _pop(s)
        vid = _pop(s)
        if _failed(a) or _failed(b) or _failed(vid):
            return -1
        if _kind(s, b) != K_DICT or s.vals[b].ref != 0:
            return _fail(s, E_CALL)
        return _newobj(s, vid, a)
    return _fail(s, E_BAD_OPCODE)


cdef int _op(Scan *s, PyObject *lookup) noexcept nogil:
    # One opcode: read it, then hand it to its family. Cython compiles this
    # chain (and each family's) to a C switch; the families are inlined.
    cdef uint8_t op
    if s.pos >= s.len:
        return _fail(s, E_TRUNCATED)
    s.op_pos = s.pos
    op = s.buf[s.pos]
    s.pos += 1
    if (op == 0x28 or op == 0x2e or op == 0x30 or op == 0x31 or op == 0x32 or op == 0x80 or
            op == 0x95):
        return _op_control(s, op)
    elif (op == 0x4e or op == 0x49 or op == 0x4c or op == 0x46 or op == 0x4a or op == 0x4b or
            op == 0x4d or op == 0x47 or op == 0x88 or op == 0x89 or op == 0x8a or op == 0x8b):
        return _op_scalar(s, op)
    elif (op == 0x53 or op == 0x56 or op == 0x54 or op == 0x58 or op == 0x55 or op == 0x42 or
            op == 0x43 or op == 0x8c or op == 0x8d or op == 0x8e):
        return _op_text(s, op)
    elif (op == 0x61 or op == 0x65 or op == 0x75 or op == 0x90 or op == 0x73 or op == 0x64 or
            op == 0x7d or op == 0x6c or op == 0x5d or op == 0x74 or op == 0x29 or op == 0x85 or
            op == 0x86 or op == 0x87 or op == 0x8f or op == 0x91):
        return _op_container(s, op)
    elif (op == 0x67 or op == 0x70 or op == 0x68 or op == 0x71 or op == 0x6a or op == 0x72 or
            op == 0x94):
        return _op_memo(s, op)
    elif (op == 0x63 or op == 0x93 or op == 0x52 or op == 0x62 or op == 0x81 or op == 0x92):
        return _op_object(s, lookup, op)
    elif (op == 0x69 or op == 0x6f or op == 0x50 or op == 0x51 or op == 0x82 or op == 0x83 or
            op == 0x84 or op == 0x96 or op == 0x97 or op == 0x98):
        # INST, OBJ, PERSID, BINPERSID, EXT1/2/4, BYTEARRAY8, NEXT_BUFFER,
        # READONLY_BUFFER
        return _fail(s, E_FORBIDDEN_OPCODE)
    return _fail(s, E_BAD_OPCODE)


cdef extern from *:
    """
    static inline void ck_store_i64(volatile long long *p, long long v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline long long ck_load_i64(volatile long long *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    """
    void ck_store_i64(long long *p, long long v) noexcept nogil
    long long ck_load_i64(long long *p) noexcept nogil


cdef class Scanner:
    """One scan of one stream, which another thread may follow as it goes.

    :meth:`run` scans the whole stream with the GIL released; meanwhile
    :attr:`progress` tells how far it has accepted the stream (every opcode
    that ends before that offset was checked), so a reader on another thread
    can hand the unpickler only accepted bytes and unpickle while the scan
    runs ahead. :meth:`cancel` stops a scan nobody waits for any more.
    """

    cdef Scan s
    cdef const uint8_t[::1] data
    cdef object lookup
    cdef long long _progress
    cdef long long _cancel
    cdef long long _finished
    cdef int outcome

    def __cinit__(self, const uint8_t[::1] data not None, object lookup, int max_depth=100):
        if max_depth < 1 or max_depth > 10000:
            raise ValueError(f"max_depth must be in [1, 10000], got {max_depth}")
        self.data = data
        self.lookup = lookup
        self.s.buf = &data[0] if data.shape[0] else NULL
        self.s.len = data.shape[0]
        self.s.pos = 0
        self.s.op_pos = 0
        self.s.max_depth = max_depth
        self.s.vals = NULL
        self.s.n_vals = self.s.cap_vals = 0
        self.s.stack = NULL
        self.s.n_stack = self.s.cap_stack = 0
        self.s.marks = NULL
        self.s.n_marks = self.s.cap_marks = 0
        self.s.fence = 0
        self.s.frame_end = 0
        self.s.text_budget = self.s.len
        self.s.memo = NULL
        self.s.cap_memo = self.s.memo_len = 0
        self.s.error = E_OK
        self.s.result = -1
        self._progress = 0
        self._cancel = 0
        self._finished = 0
        self.outcome = 0

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        free(self.s.vals)
        free(self.s.stack)
        free(self.s.marks)
        free(self.s.memo)
        self.s.vals = NULL
        self.s.stack = NULL
        self.s.marks = NULL
        self.s.memo = NULL

    def run(self):
        """Scan the stream to its end (or first refusal); returns :meth:`result`."""
        cdef int r = 0
        cdef Py_ssize_t n = 0
        cdef PyObject *fn = <PyObject *>self.lookup
        cdef Scan *s = &self.s
        if self._finished or self.outcome:
            raise RuntimeError("a Scanner runs once")
        self.outcome = 2
        with nogil:
            while r == 0:
                r = _step(s, fn)
                n += 1
                # Publishing every opcode would bounce the cache line with a
                # polling reader; every 256th is often enough for one.
                if (n & 255) == 0:
                    ck_store_i64(&self._progress, s.op_pos if r else s.pos)
                    if ck_load_i64(&self._cancel):
                        break
            # Only opcodes that ended before the failing one were accepted.
            ck_store_i64(&self._progress, s.pos if r == 1 else s.op_pos)
        self.outcome = 1 if r == 1 else 3
        self._free()
        ck_store_i64(&self._finished, 1)
        return self.result()

    @property
    def progress(self):
        """Offset up to which every opcode has been accepted."""
        return ck_load_i64(&self._progress)

    @property
    def finished(self):
        """True once :meth:`run` has returned (accepted, refused or cancelled)."""
        return ck_load_i64(&self._finished) != 0

    @property
    def outcome_accepted(self):
        """True once :meth:`run` has finished and accepted the stream."""
        return ck_load_i64(&self._finished) != 0 and self.outcome == 1

    def cancel(self):
        """Ask a running scan to stop early (its result is then meaningless)."""
        ck_store_i64(&self._cancel, 1)

    def result(self):
        """None if the stream was accepted, else ``(unsafe, position, message)``.

        See :func:`scan`; a cancelled scan reports itself as damage. Raises
        MemoryError if the scan ran out of memory, RuntimeError if it has
        not finished.
        """
        if self.outcome == 1:
            return None
        if self.outcome != 3:
            raise RuntimeError("the pickle scan has not finished")
        if self.s.error == E_OK:
            return (False, self.s.op_pos, "the scan was cancelled")
        if self.s.error == E_NO_MEMORY:
            raise MemoryError(_MESSAGES[E_NO_MEMORY].decode())
        return (self.s.error >= E_UNSAFE_FIRST, self.s.op_pos,
                _MESSAGES[self.s.error].decode())


def scan(const uint8_t[::1] data not None, object lookup, int max_depth=100):
    """Check a ``.metadata`` pickle opcode by opcode; None if it may be unpickled.

    ``lookup(module: bytes, name: bytes) -> int`` resolves a global to its
    kind (:data:`GLOBAL_KINDS`; 0 refuses it, as does an exception). Returns
    None when the stream does only what DCP metadata needs, else a tuple
    ``(unsafe, position, message)``: ``unsafe`` is True when the stream
    asked for something that could run or change code (a refused global,
    call, BUILD or opcode), False when it is merely damaged; ``position`` is
    the byte offset of the offending opcode.
    """
    return Scanner(data, lookup, max_depth).run()


#: The kind codes ``lookup`` returns, by name (0 refuses a global).
GLOBAL_KINDS = {
    "Metadata": G_METADATA,
    "TensorStorageMetadata": G_TSM,
    "ChunkStorageMetadata": G_CHUNK,
    "BytesStorageMetadata": G_BYTES_MD,
    "MetadataIndex": G_INDEX,
    "StorageMeta": G_STORAGE_META,
    "StorageInfo": G_STORAGE_INFO,
    "TensorProperties": G_TPROPS,
    "Size": G_SIZE,
    "memory_format_encoding": G_MEMFMT,
    "get_layout": G_LAYOUT_FN,
    "constant": G_CONST,
    "tuple": G_TUPLE,
    "list": G_LIST,
    "set": G_SET,
    "frozenset": G_FROZENSET,
    "dict": G_DICT,
    "OrderedDict": G_ODICT,
    "complex": G_COMPLEX,
    "path": G_PATH,
}
