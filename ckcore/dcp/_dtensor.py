"""A DTensor's local chunk on this rank, memoised, and the DTensor checks the drop-ins share.

A DTensor's chunk is a pure function of (global shape, mesh shape, this
rank's coordinate, placements). torch recomputes it for every tensor of every
plan, although a model repeats a handful of shapes; :func:`local_sizes_offsets`
computes each distinct key once with torch's own function and reuses the
answer. The memo and the mesh cache are bounded (:data:`MEMO_MAX` entries) so
a caller with ever-new shapes cannot grow them without end.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
import torch.distributed.config as _dist_config
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Partial, _StridedShard

__all__ = [
    "MEMO_MAX",
    "chunk_key",
    "is_plain_dtensor",
    "local_sizes_offsets",
    "mesh_info",
    "planned_chunk",
    "raise_if_partial",
]

#: Entries kept per cache before it is cleared. A model has a handful of
#: distinct keys; the bound only guards against a pathological caller (e.g.
#: dynamic shapes).
MEMO_MAX = 4096

# (global shape, mesh shape, coordinate, placements key) -> (sizes, offsets)
# as torch.Size. torch's compute_local_shape_and_global_offset is a Python
# walk over the placements per call; a dict hit costs a small fraction of it.
_CHUNKS: dict[tuple, tuple[torch.Size, torch.Size]] = {}

# id(mesh) -> (mesh, mesh shape, this rank's coordinate). A mesh's shape and
# coordinate are fixed at construction; mesh.shape walks its layout in Python
# on every access, so we read it once per mesh. The entry holds the mesh, so its id
# cannot be reused while cached.
_MESHES: dict[int, tuple[Any, tuple, tuple | None]] = {}


def mesh_info(mesh: Any) -> tuple[tuple, tuple | None]:
    """``(mesh shape, this rank's coordinate)`` of a DeviceMesh; the coordinate is None off-mesh."""
    hit = _MESHES.get(id(mesh))
    if hit is not None and hit[0] is mesh:
        return hit[1], hit[2]
    coordinate = mesh.get_coordinate()
    info = (tuple(mesh.shape), None if coordinate is None else tuple(coordinate))
    if len(_MESHES) >= MEMO_MAX:
        _MESHES.clear()
    _MESHES[id(mesh)] = (mesh, *info)
    return info


def _placements_key(placements: Any, check_partial: bool) -> tuple | None:
    """The placements' part of a chunk memo key; None when they cannot key it (a symbolic split).

    Placements hash through Python-level ``__hash__``; the common ones key as
    plain values instead (an int for Shard, -1 for Replicate, a pair for a
    strided shard), anything else as a tagged tuple holding the placement.
    With ``check_partial``, a Partial placement raises torch's ValueError
    (every placement is checked, keyable or not).
    """
    key: list[Any] = []
    p: Any  # a type() identity test does not narrow for mypy; each branch knows its type
    memo = True
    for p in placements:
        t = type(p)
        if t is Shard:
            key.append(p.dim)
        elif t is Replicate:
            key.append(-1)
        elif t is _StridedShard:
            sf = p.split_factor
            if type(sf) is not int:
                if not check_partial:
                    return None
                memo = False
            key.append((p.dim, sf))
        else:
            if check_partial and isinstance(p, Partial):
                raise ValueError(  # noqa: TRY004 - torch raises ValueError here
                    "Any checkpointing related operations are not supported for "
                    "DTensor with partial placements!"
                )
            key.append(("placement", p))
    return tuple(key) if memo else None


def chunk_key(tensor: DTensor) -> tuple | None:
    """The memo key of a DTensor's local chunk, or None when torch must compute it.

    torch's ``compute_local_shape_and_global_offset`` depends only on the global
    shape, the mesh shape, this rank's coordinate and the placements, except
    when the local tensor is itself checkpointable or a split factor is
    symbolic; those we leave to torch (see also :func:`local_sizes_offsets`).
    """
    if type(tensor._local_tensor) is not torch.Tensor:
        return None
    shape, coordinate = mesh_info(tensor.device_mesh)
    if coordinate is None:
        return None
    key = _placements_key(tensor.placements, check_partial=False)
    if key is None:
        return None
    return (tensor.shape, shape, coordinate, key)


def local_sizes_offsets(tensor: DTensor) -> tuple[torch.Size, torch.Size]:
    """``(sizes, offsets)`` of this rank's chunk of ``tensor``, as torch computes them."""
    key = chunk_key(tensor)
    if key is not None:
        hit = _CHUNKS.get(key)
        if hit is not None:
            return hit
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    value = (torch.Size(sizes), torch.Size(offsets))
    # compile_on_one_rank makes torch trace symbolic coordinates under fake
    # mode; never memoise what it computes then. (Reading a torch config flag
    # goes through its config machinery, so only misses pay it.)
    if key is not None and not getattr(_dist_config, "compile_on_one_rank", False):
        if len(_CHUNKS) >= MEMO_MAX:
            _CHUNKS.clear()
        _CHUNKS[key] = value
    return value


_NOT_PARTIAL = frozenset({Shard, Replicate, _StridedShard})

_OFF_MESH = (None, None)


def planned_chunk(tensor: DTensor, shape: torch.Size) -> tuple[Any, Any]:
    """``(sizes, offsets)`` of this rank's chunk of a plain DTensor of global ``shape``.

    ``(None, None)`` when this rank is not on the DTensor's mesh. What
    :func:`raise_if_partial` and then :func:`local_sizes_offsets` give (the
    same errors, the same memo), reading the spec once: a load plan asks
    this of every tensor of the model. ``tensor`` must be exactly a
    ``DTensor`` over a plain ``torch.Tensor`` (:func:`is_plain_dtensor`) and
    ``shape`` its ``size()``.
    """
    spec = tensor._spec
    mesh = spec.mesh
    hit = _MESHES.get(id(mesh))
    if hit is None or hit[0] is not mesh:
        mesh_info(mesh)
        hit = _MESHES[id(mesh)]
    coordinate = hit[2]
    if coordinate is None:
        return _OFF_MESH
    # The memo key of chunk_key, built in the same loop as the Partial check.
    key = _placements_key(spec.placements, check_partial=True)
    if key is not None:
        value = _CHUNKS.get((shape, hit[1], coordinate, key))
        if value is not None:
            return value
    return local_sizes_offsets(tensor)


def raise_if_partial(tensor: DTensor) -> None:
    """Raise torch's ValueError if ``tensor`` has a Partial placement (checkpointing refuses it)."""
    # Same check and message as DTensor._raise_if_contains_partial_placements.
    for placement in tensor.placements:
        # isinstance against Partial goes through a Python __instancecheck__
        # (torch's opaque-type metaclass); an exact type check skips it for the usual types.
        if type(placement) in _NOT_PARTIAL:
            continue
        if isinstance(placement, Partial):
            raise ValueError(  # noqa: TRY004 - torch raises ValueError here
                "Any checkpointing related operations are not supported for "
                "DTensor with partial placements!"
            )


def is_plain_dtensor(obj: Any) -> TypeGuard[DTensor]:
    """True for exactly a DTensor whose local tensor is a plain tensor.

    The only case torch handles with ``_create_chunk_from_dtensor`` /
    ``_create_write_items_for_dtensor``. Exactly DTensor: a subclass may
    override the checkpoint dunders.
    """
    if type(obj) is not DTensor:
        return False
    local = obj._local_tensor
    if type(local) is torch.Tensor:  # has neither dunder; skip two failing lookups
        return True
    return (
        isinstance(local, torch.Tensor)
        and not hasattr(local, "__create_chunk_list__")
        and not hasattr(local, "__create_write_items__")
    )
