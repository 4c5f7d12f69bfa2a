"""Structure check of unpickled DCP metadata: the shapes are exact tuples of int64 >= 0.

ckcore.checkpoint unpickles a ``.metadata`` with an allow-list, then must
make sure what came out has the shape the planning kernels rely on. A
50k-chunk file holds some 300k shape integers; checking them with
Python-level passes (``map``/``set``/``array``) costs a third of the
unpickling itself. Here each value is one type test and one C conversion.

This module walks Python objects (lists, tuples, dataclass instances), so
unlike the numeric kernels it holds the GIL throughout; it only reads.
"""

from cpython.object cimport PyObject


cdef extern from "Python.h":
    # Borrowed-reference accessors, declared on PyObject* so the loops below
    # do no reference counting.
    bint _tuple_check_exact "PyTuple_CheckExact"(PyObject *o) noexcept
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(PyObject *o) noexcept
    PyObject *_tuple_item "PyTuple_GET_ITEM"(PyObject *o, Py_ssize_t i) noexcept
    bint _long_check_exact "PyLong_CheckExact"(PyObject *o) noexcept
    bint _unicode_check_exact "PyUnicode_CheckExact"(PyObject *o) noexcept
    # Cannot fail on an exact int: overflow is reported through the flag.
    long long _as_ll "PyLong_AsLongLongAndOverflow"(PyObject *o, int *overflow) noexcept
    bint _dict_check_exact "PyDict_CheckExact"(PyObject *o) noexcept
    Py_ssize_t _dict_size "PyDict_GET_SIZE"(PyObject *o) noexcept
    bint _list_check_exact "PyList_CheckExact"(PyObject *o) noexcept
    # For an exact list or tuple: its length and its item array.
    Py_ssize_t _seq_size "PySequence_Fast_GET_SIZE"(PyObject *o) noexcept
    PyObject **_seq_items "PySequence_Fast_ITEMS"(PyObject *o) noexcept
    # Borrowed; NULL when the key is missing. Keys here are exact str, whose
    # hash and comparison cannot fail or run code.
    PyObject *_dict_get "PyDict_GetItem"(PyObject *d, PyObject *key) noexcept
    PyObject *_none "Py_None"
    # A new reference to the instance dict (made if the object has none
    # yet), or NULL with an exception set when the type has no dict.
    PyObject *_generic_dict "PyObject_GenericGetDict"(PyObject *o, void *context) noexcept
    void _err_clear "PyErr_Clear"() noexcept
    PyObject *_type_of "(PyObject *)Py_TYPE"(PyObject *o) noexcept
    void _decref "Py_DECREF"(PyObject *o) noexcept
    bint _dict_next "PyDict_Next"(PyObject *d, Py_ssize_t *pos, PyObject **key,
                                  PyObject **value) noexcept


cdef inline PyObject *_fields(PyObject *obj, Py_ssize_t min_n, Py_ssize_t max_n) noexcept:
    # The instance dict of ``obj`` (borrowed: the instance holds it) if it
    # holds between min_n and max_n entries, else NULL. A hostile stream's
    # BUILD may have added keys (a dunder, a field of another class):
    # counting them is how they are refused, since every key that may be
    # there is then looked up by name. Callers pass exact metadata classes,
    # whose dict is a plain slot: reading it runs no Python code.
    cdef PyObject *d = _generic_dict(obj, NULL)
    if d == NULL:
        _err_clear()
        return NULL
    _decref(d)
    if not _dict_check_exact(d) or not min_n <= _dict_size(d) <= max_n:
        return NULL
    return d


cdef inline bint _nonneg_i64(PyObject *v) noexcept:
    cdef int overflow = 0
    cdef long long x
    # bool is an int subclass: refused, as a shape never holds one.
    if v == NULL or not _long_check_exact(v):
        return False
    x = _as_ll(v, &overflow)
    return overflow == 0 and x >= 0


cdef inline bint _shape_ok(PyObject *t, Py_ssize_t ndim) noexcept:
    cdef Py_ssize_t j
    if t == NULL or not _tuple_check_exact(t) or _tuple_size(t) != ndim:
        return False
    for j in range(ndim):
        if not _nonneg_i64(_tuple_item(t, j)):
            return False
    return True


def shape_ok(object shape, Py_ssize_t ndim):
    """True if ``shape`` is an exact tuple of ``ndim`` ints in ``[0, 2**63)``."""
    return _shape_ok(<PyObject *>shape, ndim)


def first_bad_chunk(list chunks, type chunk_cls, Py_ssize_t ndim):
    """Index of the first chunk that is not a well-formed ``chunk_cls``, or -1.

    Well-formed: exactly of type ``chunk_cls``, with exactly the fields
    ``offsets`` and ``sizes``, each an exact tuple of ``ndim`` ints in
    ``[0, 2**63)``.
    """
    # Iterating (not indexing up to a length read once) checks the length at
    # every step and holds each item, should the list change under us.
    cdef Py_ssize_t i = -1
    cdef object c
    cdef PyObject *d
    cdef PyObject *offsets
    cdef PyObject *sizes
    for c in chunks:
        i += 1
        if type(c) is not chunk_cls:
            return i
        # A chunk built by NEWOBJ without its BUILD has no fields.
        d = _fields(<PyObject *>c, 2, 2)
        if d == NULL:
            return i
        offsets = _dict_get(d, <PyObject *>"offsets")
        sizes = _dict_get(d, <PyObject *>"sizes")
        if (offsets == NULL or sizes == NULL or not _shape_ok(offsets, ndim)
                or not _shape_ok(sizes, ndim)):
            return i
    return -1


cdef inline bint _is_str(PyObject *v) noexcept:
    return v != NULL and _unicode_check_exact(v)


cdef bint _str_seq(PyObject *v) noexcept:
    # None, or a list/tuple of exact str (StorageInfo.transform_descriptors).
    cdef Py_ssize_t j
    cdef PyObject **items
    if v == _none:
        return True
    if not (_tuple_check_exact(v) or _list_check_exact(v)):
        return False
    # The same item array view for both: nothing here can resize the list.
    items = _seq_items(v)
    for j in range(_seq_size(v)):
        if not _unicode_check_exact(items[j]):
            return False
    return True


cdef bint _bad_info(PyObject *info) noexcept:
    # A StorageInfo record is well-formed: ``relative_path`` an exact str,
    # ``offset`` and ``length`` ints in ``[0, 2**63)``,
    # ``transform_descriptors`` absent, None or a list/tuple of str, and no
    # other field.
    cdef PyObject *d = _fields(info, 3, 4)
    cdef PyObject *td
    if d == NULL:
        return True
    td = _dict_get(d, <PyObject *>"transform_descriptors")
    if _dict_size(d) != 3 + (td != NULL):
        return True
    if td != NULL and not _str_seq(td):
        return True
    return not (_is_str(_dict_get(d, <PyObject *>"relative_path"))
                and _nonneg_i64(_dict_get(d, <PyObject *>"offset"))
                and _nonneg_i64(_dict_get(d, <PyObject *>"length")))


cdef bint _bad_index(PyObject *key) noexcept:
    # A MetadataIndex is well-formed: an exact str ``fqn``, ``offset``
    # absent, None or an exact tuple of ints in ``[0, 2**63)``, ``index``
    # absent, None or an int in ``[0, 2**63)``, and no other field.
    cdef PyObject *d = _fields(key, 1, 3)
    cdef PyObject *fqn
    cdef PyObject *off
    cdef PyObject *idx
    if d == NULL:
        return True
    fqn = _dict_get(d, <PyObject *>"fqn")
    off = _dict_get(d, <PyObject *>"offset")
    idx = _dict_get(d, <PyObject *>"index")
    if _dict_size(d) != 1 + (off != NULL) + (idx != NULL) or not _is_str(fqn):
        return True
    if off != NULL and off != _none and not (
            _tuple_check_exact(off) and _shape_ok(off, _tuple_size(off))):
        return True
    return idx != NULL and idx != _none and not _nonneg_i64(idx)


def first_bad_storage_info(list infos, type info_cls):
    """Index of the first ``info_cls`` whose fields are malformed, or -1.

    Well-formed: ``relative_path`` an exact str, ``offset`` and ``length``
    ints in ``[0, 2**63)``, ``transform_descriptors`` absent, None or a
    list/tuple of str, and no other field. Values of other types (a custom
    storage writer's records) are skipped.
    """
    # Iterated, as in first_bad_chunk.
    cdef Py_ssize_t i = -1
    cdef object info
    for info in infos:
        i += 1
        if type(info) is info_cls and _bad_info(<PyObject *>info):
            return i
    return -1


def check_storage_data(dict sd, type index_cls, type info_cls):
    """One pass over a storage_data dict: ``(bad_key, bad_value, others)``.

    ``bad_key``: position of the first key that is not a well-formed
    ``index_cls`` (exact str ``fqn``, int64 ``offset`` tuple or None, int64
    ``index`` or None, no other field), or -1; ``bad_value``:
    position of the first ``info_cls`` value with malformed fields (see
    :func:`first_bad_storage_info`), or -1; ``others``: how many values are
    not ``info_cls`` (a custom storage writer's records). The checks run no
    Python code, so the dict cannot change while it is walked.
    """
    cdef Py_ssize_t pos = 0, i = -1, bad_key = -1, bad_value = -1, others = 0
    cdef PyObject *key
    cdef PyObject *value
    while _dict_next(<PyObject *>sd, &pos, &key, &value):
        i += 1
        if bad_key < 0 and (_type_of(key) != <PyObject *>index_cls or _bad_index(key)):
            bad_key = i
        if _type_of(value) != <PyObject *>info_cls:
            others += 1
        elif bad_value < 0 and _bad_info(value):
            bad_value = i
    return bad_key, bad_value, others
