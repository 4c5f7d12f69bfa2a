# Reading and copying DCP's plan objects, shared by the save-plan kernels
# (_save_plan, _dedup, _fused_plan): the category of a write item's type,
# cached Python ints for index hints, and dataclasses.replace without
# __init__ for plans and items.

cdef enum:
    # What item_category maps a WriteItemType member (ckcore's or torch's) to.
    TENSOR = 0
    SHARD = 1
    BYTE_IO = 2


cdef int item_category(object t) except -1


cdef class HintInts:
    # Python ints 0..n-1, made once: see _plan_objects.pyx.
    cdef list ints
    cdef object get(self, Py_ssize_t k)


cdef object plan_with_items(object plan, list items)
cdef object item_with_hint(object item, object idx, object fqn, object off, object t,
                           object td, object hint)
