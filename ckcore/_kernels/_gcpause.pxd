# C-level API of the shared GC pause (see _gcpause.pyx), for kernels that
# build many objects at once.

cdef void gc_pause() noexcept
cdef void gc_resume() noexcept
