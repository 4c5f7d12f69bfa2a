"""Swap ckcore's drop-ins into torch's DCP modules, and put torch's back.

DCP's planners look their helpers up as module globals, and
``default_planner`` binds several of them by name at import
(``from planner_helpers import _create_read_items``), so replacing the
function in ``planner_helpers`` alone would not reach it. :func:`patch`
therefore walks every loaded ``torch.distributed`` module and replaces each
attribute that *is* one of torch's originals (identity, so aliases such as
``from x import f as g`` are found too), remembering exactly what it
replaced; restoring writes those very objects back.

Use it as a context manager or as a plain call::

    with ckcore.dcp.patch():
        dcp.load(state_dict, checkpoint_id=path)   # torch's planners, ckcore's kernels

    handle = ckcore.dcp.patch()
    ...
    handle.restore()                               # or ckcore.dcp.unpatch()
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

from . import dropins as _dropins

__all__ = ["Patch", "is_patched", "patch", "unpatch"]

# Guards the module-attribute swaps: two threads patching at once must not
# record each other's replacements as "originals".
_LOCK = threading.RLock()
# Handles that are applied and not yet restored, oldest first.
_ACTIVE: list[Patch] = []


def _replacements() -> dict[int, tuple[str, Any, Any]]:
    """id(torch original) -> (name, original, drop-in)."""
    out = {}
    for name, original in _dropins.ORIGINALS.items():
        out[id(original)] = (name, original, getattr(_dropins, name))
    return out


def _torch_dcp_modules() -> list[ModuleType]:
    # Only torch.distributed: that is where DCP and its by-name importers live
    # (planners in torch.distributed.checkpoint.*, DTensor's dunders in
    # torch.distributed.tensor import planner_helpers lazily, at call time).
    mods = []
    for name, mod in list(sys.modules.items()):
        if isinstance(mod, ModuleType) and (
            name == "torch.distributed" or name.startswith("torch.distributed.")
        ):
            mods.append(mod)
    return mods


class Patch:
    """One application of :func:`patch`: restore it with :meth:`restore` or by leaving ``with``.

    ``replaced`` lists ``(module, attribute, original)`` for every swap made.
    """

    def __init__(self) -> None:
        self.replaced: list[tuple[ModuleType, str, Any]] = []
        self.active = False

    def apply(self) -> Patch:
        """Swap the drop-ins in (idempotent on an applied handle)."""
        with _LOCK:
            if self.active:
                return self
            by_id = _replacements()
            for mod in _torch_dcp_modules():
                namespace = vars(mod)
                for attr, value in list(namespace.items()):
                    hit = by_id.get(id(value))
                    if hit is None or hit[1] is not value:
                        continue
                    setattr(mod, attr, hit[2])
                    self.replaced.append((mod, attr, value))
            self.active = True
            _ACTIVE.append(self)
        return self

    def restore(self) -> None:
        """Put back exactly the objects this handle replaced (idempotent)."""
        with _LOCK:
            if not self.active:
                return
            # Reverse order, so an attribute replaced twice ends as it began.
            for mod, attr, original in reversed(self.replaced):
                setattr(mod, attr, original)
            self.replaced.clear()
            self.active = False
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            if not _ACTIVE:
                # A module imported while patched bound our functions by name
                # (from planner_helpers import ...); give it torch's back too.
                _sweep()

    unpatch = restore

    def __enter__(self) -> Patch:  # noqa: PYI034 - py3.10 has no typing.Self
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _sweep() -> None:
    originals = {
        id(getattr(_dropins, name)): (getattr(_dropins, name), original)
        for name, original in _dropins.ORIGINALS.items()
    }
    for mod in _torch_dcp_modules():
        for attr, value in list(vars(mod).items()):
            hit = originals.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(mod, attr, hit[1])


def patch() -> Patch:
    """Swap ckcore's drop-ins into torch's DCP modules; returns the handle that undoes it.

    Works as a plain call (``h = patch(); ...; h.restore()``) and as a context
    manager (``with patch(): ...``). Only modules already imported are
    patched; ``import ckcore.dcp`` imports DCP's planner modules first, so
    those are always covered.
    """
    return Patch().apply()


def unpatch() -> None:
    """Restore every patch still applied, newest first."""
    with _LOCK:
        for handle in reversed(list(_ACTIVE)):
            handle.restore()


def is_patched() -> bool:
    """True while some :func:`patch` is applied."""
    return bool(_ACTIVE)
