# Small C tools shared by the kernels: checked 64-bit arithmetic, a 128-bit
# accumulator, a few CPython macros Cython does not declare, and object
# creation without the Python call machinery.
from cpython.ref cimport PyObject

from ckcore._kernels._types cimport i64, u64

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object o, object name, object value) except -1
    PyObject* PyTuple_GET_ITEM(object t, Py_ssize_t i)
    Py_ssize_t PyTuple_GET_SIZE(object t)
    bint PyTuple_Check(object o)

cdef extern from *:
    """
    #include <stdint.h>
    typedef __int128 ck_i128;
    static inline int ck_add64(int64_t a, int64_t b, int64_t *r) {
        return __builtin_add_overflow(a, b, r);
    }
    static inline int ck_mul64(int64_t a, int64_t b, int64_t *r) {
        return __builtin_mul_overflow(a, b, r);
    }
    static inline int ck_mul128(ck_i128 a, int64_t b, ck_i128 *r) {
        return __builtin_mul_overflow(a, (ck_i128)b, r);
    }
    static inline int64_t ck_hi(ck_i128 x) { return (int64_t)(x >> 64); }
    /* Python's keyed hash of a buffer (what hash(bytes) computes), without
       making the bytes object: public from 3.14, exported before that. */
    #if PY_VERSION_HEX >= 0x030E0000
    #define ck_hash_buffer(p, n) Py_HashBuffer((p), (n))
    #else
    #define ck_hash_buffer(p, n) _Py_HashBytes((p), (n))
    #endif
    /* A per-process secret for the kernels' hash tables, drawn from Python's
       hash secret (so PYTHONHASHSEED governs it as it governs dict and set):
       keys a chunk file chooses cannot be made to collide without it. Reading
       the secret touches no Python object, so it is safe without the GIL;
       two threads racing on the first call store the same value. */
    static uint64_t ck_hash_key_cache = 0;
    static inline uint64_t ck_hash_key(void) {
        uint64_t k = ck_hash_key_cache;
        if (k == 0) {
            static const char seed[] = "ckcore hash-table key";
            k = (uint64_t)ck_hash_buffer(seed, (Py_ssize_t)(sizeof(seed) - 1)) | 1u;
            ck_hash_key_cache = k;
        }
        return k;
    }
    static inline uint64_t ck_lo(ck_i128 x) { return (uint64_t)x; }
    /* object.__new__(cls) without the call machinery: tp_new_wrapper would slice
       an argument tuple on every call. cls must not override __new__ (callers
       check with ck_plain_new). */
    static PyObject* ck_new_instance(PyObject* cls) {
        PyTypeObject* t = (PyTypeObject*)cls;
        PyObject* args = PyTuple_New(0);
        PyObject* r;
        if (args == NULL) return NULL;
        r = t->tp_new(t, args, NULL);
        Py_DECREF(args);
        return r;
    }
    /* malloc for big tables probed at random: 2 MiB-aligned and, on Linux,
       backed by transparent huge pages where the system allows it, so a
       random probe costs a cache miss but not also a TLB miss. Free with
       free(). */
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    static void* ck_malloc_big(size_t size) {
        void* p = NULL;
        const size_t huge = (size_t)2 << 20;
        if (size < huge) return malloc(size ? size : 1);
        if (posix_memalign(&p, huge, (size + huge - 1) & ~(huge - 1)) != 0) return NULL;
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(p, (size + huge - 1) & ~(huge - 1), MADV_HUGEPAGE);
    #endif
        return p;
    }
    /* Does cls allocate through object's own tp_new (no custom __new__)? */
    static int ck_plain_new(PyObject* cls) {
        return PyType_Check(cls) && ((PyTypeObject*)cls)->tp_new == PyBaseObject_Type.tp_new;
    }
    """
    # Cython only needs a name for the 128-bit accumulator; the C compiler
    # sees the real __int128 and does the arithmetic.
    ctypedef long long ck_i128
    bint ck_add64(i64 a, i64 b, i64* r) noexcept nogil
    bint ck_mul64(i64 a, i64 b, i64* r) noexcept nogil
    bint ck_mul128(ck_i128 a, i64 b, ck_i128* r) noexcept nogil
    i64 ck_hi(ck_i128 x) noexcept nogil
    u64 ck_lo(ck_i128 x) noexcept nogil
    void* ck_malloc_big(size_t size) nogil
    Py_hash_t ck_hash_buffer(const void *p, Py_ssize_t n) noexcept
    u64 ck_hash_key() noexcept nogil
    object ck_new_instance(object cls)
    bint ck_plain_new(object cls)


cdef inline u64 ck_mix64(u64 x) noexcept nogil:
    # splitmix64 finaliser: spreads regular keys (grid offsets, interval ends)
    # evenly over a power-of-two hash table.
    x ^= x >> 30
    x *= <u64>0xbf58476d1ce4e5b9
    x ^= x >> 27
    x *= <u64>0x94d049bb133111eb
    x ^= x >> 31
    return x
