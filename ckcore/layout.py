"""Chunks of a DTensor layout for every rank, computed without torch.

DCP asks each rank, one tensor at a time, where its local shard sits
(``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``).
To plan a whole job offline -- every rank's save and load plan, the CLI's
``plan`` command, the ``model-load`` benchmark -- ckcore needs that answer for
every mesh coordinate at once, without a process group and without torch.
This module is the façade over the compiled kernel
(:mod:`ckcore._kernels._layout`): placement descriptors, a compact string
form for the command line, and the array and chunk-list views of a layout.

Semantics equal torch 2.13's, coordinate by coordinate (checked by
``tests/differential/test_layout.py``):

* ``Shard(d)`` splits tensor dim ``d`` like ``torch.chunk``: pieces of
  ``ceil(size / mesh_dim_size)``, so trailing pieces may be empty;
* mesh dims apply left to right; several mesh dims sharding one tensor dim
  split the previous piece again;
* ``StridedShard(d, split_factor=k)`` is torch's ``_StridedShard``: the held
  indices are strided, torch reports their count as the size and the first
  held index as the offset;
* ``Replicate()`` and ``Partial()`` leave the dim whole at offset 0;
* a dim left empty reports offset ``global_shape[d]`` (torch's convention);
* negative shard dims count from the end, as DTensor normalises them (torch's
  plain arithmetic accepts them for ``Shard`` only).

Ranks outside a (sub)mesh: torch's ``compute_local_shape_and_global_offset``
returns ``((0,), ())`` there -- not a chunk of an ``ndim``-d tensor.
:func:`local_shape_and_offset_for_rank` returns exactly that, for parity;
the chunk-list helpers (:func:`chunks_for_rank`, :func:`job_chunks`,
:func:`job_rank_chunks`) give such a rank no chunk (an empty list).

Array results are int64 with one row per mesh coordinate in row-major order
(rank order of a default ``DeviceMesh``; :func:`mesh_coordinates`).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ckcore._gc import paused
from ckcore._kernels import _layout
from ckcore.metadata import ChunkStorageMetadata

__all__ = [
    "Shard",
    "Replicate",
    "Partial",
    "StridedShard",
    "Placement",
    "to_placement",
    "to_placements",
    "parse_placements",
    "format_placements",
    "parse_mesh_shape",
    "mesh_coordinates",
    "local_shapes_and_offsets",
    "local_shape_and_offset",
    "local_shape_and_offset_for_rank",
    "chunk_for_coordinate",
    "chunks_for_mesh",
    "chunks_for_rank",
    "job_layouts",
    "job_layout_at",
    "job_chunks",
    "job_rank_chunks",
]

_I64_MAX = 2**63 - 1


# --------------------------------------------------------------------------
# Placement descriptors
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Tensor dim ``dim`` split over a mesh dim, ``torch.chunk``-style (torch's ``Shard``)."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate:
    """Every coordinate of the mesh dim holds the whole tensor dim (torch's ``Replicate``)."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Pending reduction (torch's ``Partial``); for shapes and offsets it acts as ``Replicate``."""

    reduce_op: str = "sum"

    def __str__(self) -> str:
        return f"P({self.reduce_op})"


@dataclass(frozen=True)
class StridedShard:
    """torch's ``_StridedShard(dim, split_factor=k)``: right-to-left sharding (FSDP2 over TP).

    The dim is first chunked into ``split_factor`` parts, each part into the
    mesh dim's size, and coordinate ``r`` holds the ``r``-th sub-chunk of
    every part. Example, 8 rows on a (2, 2) mesh with
    ``(StridedShard(0, 2), Shard(0))``: coordinate (0, 1) holds rows 4-5,
    (1, 0) rows 2-3, as if the second mesh dim had sharded first.
    """

    dim: int
    split_factor: int

    def __str__(self) -> str:
        return f"_S({self.dim}, {self.split_factor})"


Placement = Union[Shard, Replicate, Partial, StridedShard]

_KIND = {
    Replicate: _layout.PLACEMENT_REPLICATE,
    Partial: _layout.PLACEMENT_REPLICATE,
    Shard: _layout.PLACEMENT_SHARD,
    StridedShard: _layout.PLACEMENT_STRIDED,
}


def _int(value: Any, what: str) -> int:
    # operator.index accepts int, numpy integers and SymInt-free torch ints,
    # and refuses floats and strings; bool is an int but never a size.
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        kind = type(value).__name__
        raise TypeError(f"{what} must be an integer, got {kind} {value!r}") from None


def _call_flag(obj: Any, name: str) -> bool:
    method = getattr(obj, name, None)
    if not callable(method):
        return False
    try:
        return bool(method())
    except Exception:  # a foreign object's method with another signature: not ours
        return False


def to_placement(obj: Any) -> Placement:
    """Convert one placement -- ckcore's, torch's, or a string like ``"S(0)"`` -- to ckcore's.

    torch's objects are recognised by duck typing, without importing torch:
    ``_StridedShard`` by its ``dim`` and ``split_factor``, ``Shard`` by
    ``is_shard()``, ``Replicate`` by ``is_replicate()``, ``Partial`` (and its
    subclasses such as ``_MaskPartial``) by ``is_partial()``.

    >>> to_placement("S(1)")
    Shard(dim=1)
    """
    if type(obj) in _KIND:
        return obj
    if isinstance(obj, str):
        (placement,) = parse_placements(obj)
        return placement
    cls = type(obj).__name__
    if cls in ("_StridedShard", "StridedShard") or (
        hasattr(obj, "dim") and hasattr(obj, "split_factor")
    ):
        return StridedShard(
            _int(obj.dim, f"{cls}.dim"), _int(obj.split_factor, f"{cls}.split_factor")
        )
    if cls == "Shard" or _call_flag(obj, "is_shard"):
        return Shard(_int(obj.dim, f"{cls}.dim"))
    if cls == "Replicate" or _call_flag(obj, "is_replicate"):
        return Replicate()
    if cls in ("Partial", "_MaskPartial") or _call_flag(obj, "is_partial"):
        return Partial(str(getattr(obj, "reduce_op", "sum")))
    raise TypeError(
        f"not a placement: {obj!r} ({cls}); expected Shard, Replicate, Partial, "
        "StridedShard (ckcore's or torch's) or a string such as 'S(0)'"
    )


def to_placements(placements: Any) -> tuple[Placement, ...]:
    """Convert a sequence of placements (or one compact string, ``"S(0),R"``) to ckcore's."""
    if isinstance(placements, str):
        return parse_placements(placements)
    if not isinstance(placements, Iterable):
        raise TypeError(
            "placements must be a sequence of placements or a string, "
            f"got {type(placements).__name__}"
        )
    return tuple(to_placement(p) for p in placements)


_ITEM = re.compile(r"^(?P<name>[A-Za-z_]+)\s*(?:\((?P<args>[^()]*)\)|(?P<num>-?\d+))?$")
_SHARD_NAMES = {"s", "shard"}
_REPLICATE_NAMES = {"r", "replicate"}
_PARTIAL_NAMES = {"p", "partial", "_maskpartial"}
_STRIDED_NAMES = {"_s", "ss", "stridedshard", "_stridedshard"}


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in placements {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '(' in placements {text!r}")
    items.append(text[start:])
    return [item.strip() for item in items]


def _parse_args(args: str, item: str) -> tuple[list[str], dict[str, str]]:
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for arg in (a.strip() for a in args.split(",")) if args.strip() else ():
        if "=" in arg:
            key, _, value = arg.partition("=")
            keywords[key.strip()] = value.strip()
        elif keywords:
            raise ValueError(f"positional argument after keyword in placement {item!r}")
        else:
            positional.append(arg)
    return positional, keywords


def _parse_int(text: str, item: str) -> int:
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"expected an integer, got {text!r} in placement {item!r}")
    return int(text)


@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> tuple[Placement, ...]:
    return _parse(text)


def parse_placements(text: str) -> tuple[Placement, ...]:
    """Parse a compact, comma-separated placement list, one entry per mesh dim.

    Accepted forms (names are case-insensitive, spaces ignored)::

        R  Replicate  Replicate()                      -> Replicate()
        P  P(sum)  Partial  Partial(max)               -> Partial(reduce_op)
        S0  S(0)  Shard(0)  Shard(dim=0)               -> Shard(0)
        _S(0, 4)  SS(0,4)  StridedShard(0, 4)
        _StridedShard(dim=0, sf=4)  (or split_factor=4) -> StridedShard(0, 4)

    torch's ``str`` of its placements (``S(0)``, ``R``, ``P(sum)``,
    ``_S(0, 4)``) is accepted, and :func:`format_placements` writes it back.

    >>> parse_placements("_S(0,8),S0")
    (StridedShard(dim=0, split_factor=8), Shard(dim=0))
    """
    if not isinstance(text, str):
        raise TypeError(f"placements text must be a str, got {type(text).__name__}")
    return _parse_cached(text)


def _parse(text: str) -> tuple[Placement, ...]:
    if not text.strip():
        raise ValueError("empty placement list; give one placement per mesh dim, e.g. 'S(0),R'")
    result: list[Placement] = []
    for item in _split_top_level(text):
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"cannot parse placement {item!r} in {text!r}")
        name = match["name"].lower()
        positional, keywords = _parse_args(match["args"] or "", item)
        if match["num"] is not None:
            positional = [match["num"]]
        if name in _REPLICATE_NAMES and not positional and not keywords:
            result.append(Replicate())
        elif name in _PARTIAL_NAMES and len(positional) + len(keywords) <= 1:
            op = positional[0] if positional else keywords.pop("reduce_op", "sum")
            if keywords or not re.fullmatch(r"[A-Za-z_]+", op):
                raise ValueError(f"cannot parse placement {item!r} in {text!r}")
            result.append(Partial(op))
        elif name in _SHARD_NAMES and len(positional) + len(keywords) == 1:
            dim = positional[0] if positional else keywords.get("dim")
            if dim is None:
                raise ValueError(f"cannot parse placement {item!r}: Shard takes dim")
            result.append(Shard(_parse_int(dim, item)))
        elif name in _STRIDED_NAMES:
            values = dict(zip(("dim", "split_factor"), positional))
            if len(positional) > 2:
                raise ValueError(f"too many arguments in placement {item!r}")
            for key, value in keywords.items():
                key = "split_factor" if key == "sf" else key
                if key not in ("dim", "split_factor") or key in values:
                    raise ValueError(f"unexpected argument {key!r} in placement {item!r}")
                values[key] = value
            if len(values) != 2:
                raise ValueError(f"placement {item!r} needs a dim and a split_factor")
            result.append(
                StridedShard(
                    _parse_int(values["dim"], item), _parse_int(values["split_factor"], item)
                )
            )
        else:
            raise ValueError(f"cannot parse placement {item!r} in {text!r}")
    return tuple(result)


def format_placements(placements: Any) -> str:
    """The compact string of a placement list, torch's short ``str`` form: ``"_S(0, 8),S(0)"``."""
    return ",".join(str(p) for p in to_placements(placements))


def parse_mesh_shape(text: str) -> tuple[int, ...]:
    """Parse a mesh shape such as ``"4x32x8"``, ``"4,32,8"`` or ``"(4, 32, 8)"``.

    >>> parse_mesh_shape("4x32x8")
    (4, 32, 8)
    """
    if not isinstance(text, str):
        raise TypeError(f"mesh shape text must be a str, got {type(text).__name__}")
    body = text.strip().strip("()[]").strip()
    parts = [p.strip() for p in re.split(r"[x×*,]", body)] if body else []
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"cannot parse mesh shape {text!r}; expected e.g. '4x32x8'")
    shape = tuple(int(p) for p in parts)
    _check_mesh_shape(shape)
    return shape


# --------------------------------------------------------------------------
# Validation and encoding
# --------------------------------------------------------------------------


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    # Fast path for the common case (a tuple of plain ints, torch.Size included).
    if isinstance(value, tuple) and all(type(v) is int for v in value):
        return tuple(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        kind = type(value).__name__
        raise TypeError(f"{what} must be a sequence of integers, got {kind} {value!r}")
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise ValueError(f"{what} must be 1-d, got an array of shape {value.shape}")
    return tuple(_int(v, f"{what} entry") for v in value)


def _check_global_shape(shape: tuple[int, ...]) -> None:
    volume = 1
    for d, size in enumerate(shape):
        if size < 0:
            raise ValueError(f"global shape {shape} has a negative size in dim {d}")
        if size > _I64_MAX:
            raise ValueError(f"global shape {shape}: size of dim {d} does not fit in int64")
        volume *= size
    # A chunk's volume is at most the global volume; refuse shapes whose
    # element count would not fit in int64 (zero-size shapes have none).
    if volume > _I64_MAX:
        raise ValueError(f"global shape {shape} has {volume} elements, more than fit in int64")


_MAX_MESH_DIMS = 64  # the kernel keeps per-mesh-dim scratch on the stack


def _check_mesh_shape(mesh_shape: tuple[int, ...]) -> None:
    if len(mesh_shape) > _MAX_MESH_DIMS:
        raise ValueError(
            f"mesh shape has {len(mesh_shape)} dims; at most {_MAX_MESH_DIMS} are supported")
    volume = 1
    for i, n in enumerate(mesh_shape):
        if n < 1:
            raise ValueError(f"mesh shape {mesh_shape}: mesh dim {i} has size {n}, must be >= 1")
        volume *= n
    if volume > _I64_MAX:
        raise ValueError(f"mesh shape {mesh_shape} has more than 2**63 coordinates")


# Encoded placement arrays by (placements, ndim): a job has a handful of
# distinct placement lists shared by hundreds of tensors. The arrays are
# read-only because they are shared.
_ENCODED: dict[tuple[tuple[Placement, ...], int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_ENCODED_MAX = 4096


def _encode_placements(
    places: tuple[Placement, ...], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ndim = len(shape)
    try:
        key = (places, ndim)
        cached = _ENCODED.get(key)
    except TypeError:  # a placement with an unhashable field: validation below names it
        key, cached = None, None
    if cached is not None:
        return cached
    kinds, dims, sfs = [], [], []
    for i, p in enumerate(places):
        kinds.append(_KIND[type(p)])
        if isinstance(p, (Shard, StridedShard)):
            dim = _int(p.dim, f"mesh dim {i}: {p} dim")
            # Negative dims count from the end, as DTensor normalises them.
            if not -ndim <= dim < ndim:
                raise ValueError(
                    f"mesh dim {i}: {p} shards tensor dim {dim}, but the global shape "
                    f"{shape} has {ndim} dims"
                )
            dims.append(dim + ndim if dim < 0 else dim)
        else:
            dims.append(0)
        if isinstance(p, StridedShard):
            sf = _int(p.split_factor, f"mesh dim {i}: {p} split_factor")
            if not 1 <= sf <= _I64_MAX:
                raise ValueError(f"mesh dim {i}: {p} has split_factor {sf}; it must be >= 1")
            sfs.append(sf)
        else:
            sfs.append(1)
    encoded = tuple(np.array(v, dtype=np.int64) for v in (kinds, dims, sfs))
    for arr in encoded:
        arr.flags.writeable = False
    if key is not None:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        _ENCODED[key] = encoded  # type: ignore[assignment]
    return encoded  # type: ignore[return-value]


def _encode(
    global_shape: Any, mesh_shape: Any, placements: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    shape = _as_int_tuple(global_shape, "global shape")
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    _check_global_shape(shape)
    _check_mesh_shape(mesh)
    if isinstance(placements, tuple) and all(type(p) in _KIND for p in placements):
        places = placements
    else:
        places = to_placements(placements)
    if len(places) != len(mesh):
        raise ValueError(
            f"{len(places)} placements ({format_placements(places)}) for a mesh of "
            f"{len(mesh)} dims {mesh}; give exactly one placement per mesh dim"
        )
    kinds, dims, sfs = _encode_placements(places, shape)
    return np.array(shape, dtype=np.int64), np.array(mesh, dtype=np.int64), kinds, dims, sfs


def _in_context(fqn: Union[str, None], exc: Exception) -> Exception:
    if fqn is None:
        return exc
    return type(exc)(f"{fqn}: {exc}")


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------


def mesh_coordinates(mesh_shape: Sequence[int]) -> np.ndarray:
    """Every coordinate of a mesh, shape ``(prod(mesh_shape), len(mesh_shape))``, row-major.

    Row ``k`` is the coordinate of the ``k``-th row returned by
    :func:`local_shapes_and_offsets` (rank ``k`` of a default ``DeviceMesh``).
    """
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    _check_mesh_shape(mesh)
    if not mesh:
        return np.zeros((1, 0), dtype=np.int64)
    grids = np.indices(mesh, dtype=np.int64)
    return grids.reshape(len(mesh), -1).T.copy()


def local_shapes_and_offsets(
    global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Local shape and global offset of every mesh coordinate, as torch computes them.

    Returns ``(sizes, offsets)``: int64 arrays of shape
    ``(prod(mesh_shape), len(global_shape))``, row ``k`` for the ``k``-th
    coordinate in row-major order (see :func:`mesh_coordinates`). Row ``k``
    equals torch's ``compute_local_shape_and_global_offset`` on the rank at
    that coordinate.

    >>> sizes, offsets = local_shapes_and_offsets((5, 4), (2, 2), "S(0),S(1)")
    >>> sizes.tolist(), offsets.tolist()
    ([[3, 2], [3, 2], [2, 2], [2, 2]], [[0, 0], [0, 2], [3, 0], [3, 2]])
    """
    return _layout.layout_all(*_encode(global_shape, mesh_shape, placements))


def local_shape_and_offset(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Any,
    coordinate: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local_shape, global_offset)`` of one mesh coordinate, as tuples (torch's return form)."""
    encoded = _encode(global_shape, mesh_shape, placements)
    coord = np.array(_as_int_tuple(coordinate, "coordinate"), dtype=np.int64)
    sizes, offsets = _layout.layout_coordinate(*encoded, coord)
    return tuple(sizes.tolist()), tuple(offsets.tolist())


def _rank_grid(ranks: Any, mesh: tuple[int, ...]) -> np.ndarray:
    # ``ranks`` lists the global rank at each mesh coordinate (DeviceMesh.mesh,
    # a nested list, or an array); a torch tensor converts through __array__.
    grid_source = getattr(ranks, "mesh", ranks)  # a DeviceMesh itself
    if hasattr(grid_source, "tolist") and not isinstance(grid_source, np.ndarray):
        grid_source = grid_source.tolist()
    try:
        grid = np.asarray(grid_source)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"ranks must be an array of integers: {exc}") from None
    if grid.dtype == np.bool_ or not np.issubdtype(grid.dtype, np.integer):
        raise TypeError(f"ranks must be integers, got dtype {grid.dtype}")
    if grid.size != int(np.prod(mesh, dtype=np.int64)) or (grid.ndim > 1 and grid.shape != mesh):
        raise ValueError(f"ranks of shape {grid.shape} do not match the mesh shape {mesh}")
    flat = grid.astype(np.int64).reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError(f"ranks contain a negative rank {int(flat.min())}")
    if np.unique(flat).size != flat.size:
        raise ValueError("ranks contain a duplicate rank")
    return flat


def _coordinate_of_rank(mesh: tuple[int, ...], rank: int, ranks: Any) -> Union[list[int], None]:
    # The mesh coordinate of a global rank, or None when the rank is not in the mesh.
    if ranks is None:
        _check_mesh_shape(mesh)
        volume = int(np.prod(mesh, dtype=np.int64))
        row = rank if 0 <= rank < volume else -1
    else:
        hits = np.flatnonzero(_rank_grid(ranks, mesh) == rank)
        row = int(hits[0]) if hits.size else -1
    if row < 0:
        return None
    return [int(c) for c in np.unravel_index(row, mesh)] if mesh else []


def local_shape_and_offset_for_rank(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Any,
    rank: int,
    ranks: Any = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """torch's ``compute_local_shape_and_global_offset`` for a global ``rank``, without a group.

    ``ranks`` gives the global rank at each mesh coordinate (like
    ``DeviceMesh.mesh``; a ``DeviceMesh`` itself is accepted); by default rank
    ``k`` sits at the ``k``-th coordinate in row-major order. A rank that is
    not part of the mesh gets torch's answer for it, ``((0,), ())``.
    """
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    coordinate = _coordinate_of_rank(mesh, _int(rank, "rank"), ranks)
    if coordinate is None:
        _encode(global_shape, mesh, placements)  # still refuse a malformed layout
        return (0,), ()
    return local_shape_and_offset(global_shape, mesh, placements, coordinate)


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------


def chunk_for_coordinate(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Any,
    coordinate: Sequence[int],
) -> ChunkStorageMetadata:
    """The ``ChunkStorageMetadata`` a DTensor holds at one mesh coordinate.

    DCP builds it with ``_create_chunk_from_dtensor`` on each rank.
    """
    sizes, offsets = local_shape_and_offset(global_shape, mesh_shape, placements, coordinate)
    return ChunkStorageMetadata(offsets=offsets, sizes=sizes)


def _chunks_from_arrays(sizes: np.ndarray, offsets: np.ndarray) -> list[ChunkStorageMetadata]:
    make = ChunkStorageMetadata
    return [make(o, s) for o, s in zip(map(tuple, offsets.tolist()), map(tuple, sizes.tolist()))]


def chunks_for_mesh(
    global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Any
) -> list[ChunkStorageMetadata]:
    """One ``ChunkStorageMetadata`` per mesh coordinate, in row-major (default rank) order.

    Replicated coordinates repeat the same chunk, as DCP's per-rank plans do
    before dedup.
    """
    return _chunks_from_arrays(*local_shapes_and_offsets(global_shape, mesh_shape, placements))


def chunks_for_rank(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Any,
    rank: int,
    ranks: Any = None,
) -> list[ChunkStorageMetadata]:
    """The chunk list DCP builds for ``rank`` (``DTensor.__create_chunk_list__``).

    ``[]`` when the rank is outside the mesh.
    """
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    coordinate = _coordinate_of_rank(mesh, _int(rank, "rank"), ranks)
    if coordinate is None:
        _encode(global_shape, mesh, placements)
        return []
    return [chunk_for_coordinate(global_shape, mesh, placements, coordinate)]


_Group = tuple[list[str], list[tuple[int, ...]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _group_job(tensors: Any, mesh: tuple[int, ...]) -> tuple[list[str], list[_Group]]:
    # Validate every entry (errors name the fqn) and group the tensors that
    # share a rank and a placement list, so that each group is one kernel
    # call over a (T, ndim) array of shapes instead of T Python-level calls.
    if not isinstance(tensors, Mapping):
        raise TypeError(
            "tensors must be a mapping fqn -> (global_shape, placements), "
            f"got {type(tensors).__name__}")
    converted: dict[Any, tuple[Placement, ...]] = {}
    groups: dict[Any, _Group] = {}
    order: list[str] = []
    for fqn, entry in tensors.items():
        try:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise TypeError(f"expected (global_shape, placements), got {entry!r}")
            shape_in, placements = entry
            shape = _as_int_tuple(shape_in, "global shape")
            _check_global_shape(shape)
            # Many tensors share one placement list (every layer's weights):
            # convert each distinct list once; unhashable ones skip the cache.
            try:
                key = placements if isinstance(placements, str) else tuple(placements)
                places = converted.get(key)
                if places is None:
                    places = converted[key] = to_placements(placements)
            except TypeError:
                places = to_placements(placements)
            if len(places) != len(mesh):
                raise ValueError(
                    f"{len(places)} placements ({format_placements(places)}) for a mesh of "
                    f"{len(mesh)} dims {mesh}; give exactly one placement per mesh dim"
                )
            encoded = _encode_placements(places, shape)
        except (TypeError, ValueError) as exc:
            raise _in_context(fqn, exc) from None
        # Encoded arrays are cached per (placements, ndim): their identity is the group key.
        group = groups.get(id(encoded[0]))
        if group is None:
            group = groups[id(encoded[0])] = ([], [], encoded)
        group[0].append(fqn)
        group[1].append(shape)
        order.append(fqn)
    return order, list(groups.values())


def _shapes_array(shapes: list[tuple[int, ...]]) -> np.ndarray:
    ndim = len(shapes[0])
    return np.array(shapes, dtype=np.int64).reshape(len(shapes), ndim)


def job_layouts(
    tensors: Mapping[str, tuple[Sequence[int], Any]], mesh_shape: Sequence[int]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every tensor's :func:`local_shapes_and_offsets` on one mesh: ``{fqn: (sizes, offsets)}``.

    ``tensors`` maps each fqn to ``(global_shape, placements)``; placements
    may be ckcore's, torch's, or a compact string. Each value is a pair of
    ``(prod(mesh_shape), ndim)`` int64 arrays (views into one array per group
    of tensors that share a rank and placements). Errors name the fqn.
    """
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    _check_mesh_shape(mesh)
    mesh_arr = np.array(mesh, dtype=np.int64)
    order, groups = _group_job(tensors, mesh)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for fqns, shapes, (kinds, dims, sfs) in groups:
        sizes, offsets = _layout.layout_all_many(_shapes_array(shapes), mesh_arr, kinds, dims, sfs)
        for t, fqn in enumerate(fqns):
            found[fqn] = (sizes[t], offsets[t])
    return {fqn: found[fqn] for fqn in order}


def job_layout_at(
    tensors: Mapping[str, tuple[Sequence[int], Any]],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every tensor's ``(local_shape, global_offset)`` at one mesh coordinate (one rank's view)."""
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    _check_mesh_shape(mesh)
    mesh_arr = np.array(mesh, dtype=np.int64)
    coord = np.array(_as_int_tuple(coordinate, "coordinate"), dtype=np.int64)
    order, groups = _group_job(tensors, mesh)
    found: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for fqns, shapes, (kinds, dims, sfs) in groups:
        sizes, offsets = _layout.layout_coordinate_many(
            _shapes_array(shapes), mesh_arr, kinds, dims, sfs, coord)
        for fqn, s, o in zip(fqns, sizes.tolist(), offsets.tolist()):
            found[fqn] = (tuple(s), tuple(o))
    return {fqn: found[fqn] for fqn in order}


def job_rank_chunks(
    tensors: Mapping[str, tuple[Sequence[int], Any]],
    mesh_shape: Sequence[int],
    rank: int,
    ranks: Any = None,
) -> dict[str, list[ChunkStorageMetadata]]:
    """One rank's chunk list of every tensor of a job (``[]`` each if the rank is outside the mesh).

    Equal to ``job_chunks(tensors, mesh_shape, ranks)[rank]`` at the cost of
    one coordinate.
    """
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    coordinate = _coordinate_of_rank(mesh, _int(rank, "rank"), ranks)
    if coordinate is None:
        order, _ = _group_job(tensors, mesh)  # still validate the job
        return {fqn: [] for fqn in order}
    return {
        fqn: [ChunkStorageMetadata(offsets=offsets, sizes=sizes)]
        for fqn, (sizes, offsets) in job_layout_at(tensors, mesh, coordinate).items()
    }


def job_chunks(
    tensors: Mapping[str, tuple[Sequence[int], Any]],
    mesh_shape: Sequence[int],
    ranks: Any = None,
    world_size: Union[int, None] = None,
) -> list[dict[str, list[ChunkStorageMetadata]]]:
    """Every rank's chunk lists for a whole job on one mesh: ``result[rank][fqn]``.

    What each rank's DCP planner would see from ``__create_chunk_list__``,
    computed offline. ``ranks`` places global ranks on the mesh (default:
    rank ``k`` at the ``k``-th row-major coordinate); ``world_size`` defaults
    to the largest rank + 1. A rank outside the mesh gets an empty list for
    every fqn (torch's degenerate ``((0,), ())`` is not a chunk).

    >>> plans = job_chunks({"w": ((4, 6), "S(0),S(1)")}, (2, 2))
    >>> plans[3]["w"]
    [ChunkStorageMetadata(offsets=(2, 3), sizes=(2, 3))]
    """
    mesh = _as_int_tuple(mesh_shape, "mesh shape")
    _check_mesh_shape(mesh)
    volume = int(np.prod(mesh, dtype=np.int64))
    flat = np.arange(volume, dtype=np.int64) if ranks is None else _rank_grid(ranks, mesh)
    needed = int(flat.max()) + 1 if flat.size else 0
    if world_size is None:
        world = needed
    else:
        world = _int(world_size, "world_size")
        if world < needed:
            raise ValueError(
                f"world_size {world} is smaller than the mesh's largest rank + 1 ({needed})")
    layouts = job_layouts(tensors, mesh)
    # One object per (rank, fqn), as each rank's own planner would hold; the
    # array form (job_layouts) is the fast path for callers that need none.
    row_of_rank = {rank: row for row, rank in enumerate(flat.tolist())}
    out: list[dict[str, list[ChunkStorageMetadata]]] = []
    with paused():
        chunk_lists = [
            (fqn, _chunks_from_arrays(sizes, offsets)) for fqn, (sizes, offsets) in layouts.items()
        ]
        for rank in range(world):
            row = row_of_rank.get(rank)
            if row is None:
                out.append({fqn: [] for fqn in layouts})
            else:
                out.append({fqn: [chunks[row]] for fqn, chunks in chunk_lists})
    return out
