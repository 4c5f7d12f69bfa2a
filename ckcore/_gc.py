"""One way to pause Python's cyclic garbage collector around bulk object building.

Planning builds hundreds of thousands of small acyclic objects (read and
write items, index objects, chunk metadata) next to a heap that may hold
millions more (every rank's plan on rank 0, torch's own objects). With the
collector running, each allocation burst triggers collections whose older
generations walk the whole heap: measured, that costs more than the planning
itself. None of the objects built here can form a cycle, so collection waits
until the work is done, and the caller's setting is restored even on error.

Pauses may overlap on several threads while the collector's switch is one
per process: they are counted (``ckcore._kernels._gcpause``, shared with
the kernels that build items), the first remembering the setting and the
last to end restoring it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from ckcore._kernels._gcpause import pause, resume

__all__ = ["pause", "paused", "resume"]


@contextlib.contextmanager
def paused(promote: bool = False) -> Iterator[None]:
    """Pause the cyclic GC for the ``with`` block; restore the caller's setting after.

    ``promote=True`` also moves every tracked object to the oldest generation
    on exit (``gc.freeze()`` then ``gc.unfreeze()``, each O(1)). Use it for
    results that are long-lived by nature (a global plan): otherwise the first
    allocations after the block run a young-generation pass that walks every
    new object only to promote it. Cyclic garbage among them is still found by
    the next full collection. It is skipped when the caller has frozen objects
    of its own, which ``unfreeze()`` would release; telling that costs a walk
    of the frozen objects (``gc.get_freeze_count()``), so a process that froze
    millions of objects pays that walk per call.
    """
    pause()
    try:
        yield
    finally:
        try:
            if promote and gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
        finally:
            resume()
