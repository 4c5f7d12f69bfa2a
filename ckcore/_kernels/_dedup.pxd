# torch's dedup_save_plans bookkeeping over an open-addressing table of
# MetadataIndex keys; cimported by _fused_plan, which dedups in its one pass.
from libc.stdint cimport int32_t, uint32_t

from ckcore._kernels._types cimport i64, u64


cdef struct Ent:
    # 40 bytes: plan numbers, fqn ids and entry numbers stay below 2**31
    # (entries are capped there; plans by item_lists).
    u64 hash
    i64 pool           # where the offset's values start in the pool
    int32_t fqn_id     # dense id of the index's fqn
    int32_t ndim       # len(offset), -1 for offset None
    int32_t first      # first plan holding the entry
    int32_t last       # last plan holding it (holders are visited in ascending order)
    int32_t nholders
    int32_t selected


cdef struct Slot:
    # 8 bytes, so a probe touches one cache line: the entry number (-1:
    # empty) and the hash's high half, so a probe past another key does not
    # touch that entry's memory.
    int32_t e
    uint32_t tag


cdef struct Key:
    # A hashed key waiting for its probe; its offset values lie at
    # t.pool[at:at + nd], at or past the pool's tail (t.n_pool).
    i64 fid
    Py_ssize_t nd
    u64 hash
    Py_ssize_t at


cdef struct IndexTable:
    # Open-addressing table over MetadataIndex keys (fqn, offset), compared
    # by value like the dataclass's __eq__/__hash__, without building a
    # Python tuple or hashing a torch.Size per item.
    Ent* ents
    Py_ssize_t n_ent, cap_ent
    Slot* slots
    Py_ssize_t mask
    i64* pool
    Py_ssize_t n_pool, cap_pool


cdef class Dedup:
    cdef IndexTable t
    cdef dict fqn_ids     # fqn -> dense id
    cdef list fqns        # dense id -> fqn
    cdef dict dups        # entry -> [plans holding it], for entries held by 2+ plans
    cdef list ent_item    # entry -> last item seen with that index (torch keeps the last)
    cdef Py_ssize_t last_dup
    cdef object ck_itemsize   # ckcore.dtypes.itemsize, given by the façade

    cdef i64 fid(self, object fqn) except -1
    cdef int key(self, i64 fid, object off, Key* key, const Key* pending) except -1
    cdef Py_ssize_t add(self, object item, const Key* key, Py_ssize_t p) except -1
    cdef int select(self, Py_ssize_t P, bint save_to_lowest_rank,
                    unsigned char* touched) except -1


cdef list item_lists(tuple plans, Py_ssize_t* total)
