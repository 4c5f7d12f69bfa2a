"""One pause of the cyclic garbage collector, shared by every thread and kernel.

The collector's switch is one per process while pauses may overlap on
several threads: a pause taken while another is open must neither restore
the setting early nor take the paused state for the caller's. Pauses are
counted; the first one remembers the setting and the last one to end
restores it. Both run with the GIL held and call no Python code, so each is
atomic with respect to other threads without a lock, and costs a few
nanoseconds (the item-building kernels pause once per call).
``ckcore._gc`` is the Python-level interface.
"""

cdef extern from "Python.h":
    int PyGC_Enable()
    int PyGC_Disable()

cdef Py_ssize_t _depth = 0
cdef bint _restore = False


cdef void gc_pause() noexcept:
    global _depth, _restore
    if _depth == 0:
        _restore = PyGC_Disable()
    else:
        PyGC_Disable()
    _depth += 1


cdef void gc_resume() noexcept:
    global _depth
    _depth -= 1
    if _depth == 0 and _restore:
        PyGC_Enable()


def pause():
    """Start a pause of the cyclic GC; every call must be matched by :func:`resume`."""
    gc_pause()


def resume():
    """End a pause; the last one open restores the setting the first one found."""
    gc_resume()


def depth():
    """The number of pauses open (test hook)."""
    return _depth
