"""A DCP checkpoint on disk, read without torch and without running pickle code.

``torch.distributed.checkpoint.FileSystemWriter`` stores a checkpoint's
:class:`~ckcore.metadata.Metadata` as a plain ``pickle.dump`` of torch's
dataclasses (file ``.metadata``, or ``__{rank}.metadata`` when ranks do not
coordinate). Reading it with ``pickle.load`` needs torch and executes
whatever callables the file names, so a checkpoint downloaded from anywhere
can run arbitrary code. This module reads it with an *allow-list*
unpickler: every global the stream asks for is looked up in a fixed table
that maps torch's classes to ckcore's torch-free equivalents (dtypes and
layouts become their names); anything else is refused with
:class:`UnsafeCheckpointError` before it is called.

What torch 2.13 writes (checked with ``pickletools`` on real saves):

* ``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``,
  ``BytesStorageMetadata``, ``MetadataIndex``, ``StorageMeta`` and the
  filesystem's ``_StorageInfo`` go through ``copyreg.__newobj__`` (opcode
  ``NEWOBJ``) and ``BUILD`` with a ``__dict__`` state: the C unpickler fills
  the instance dict directly, so mapping them to ckcore dataclasses costs
  nothing. ``_StorageInfo`` omits ``None`` fields and ``MetadataIndex``
  omits a ``None`` offset; the class defaults supply them, as in torch.
* ``TensorProperties`` has a ``__getstate__`` that returns the tuple
  ``(dtype, layout, requires_grad, _MEM_FORMAT_ENCODING(n), pin_memory)``.
* ``torch.Size(t)`` is ``REDUCE(torch.Size, (tuple,))``; ckcore maps
  ``torch.Size`` to ``tuple``.
* a dtype is the global ``torch.<name>`` (``torch.dtype.__reduce__`` returns
  its name); a layout is ``torch.serialization._get_layout("torch.strided")``;
  a memory format (never in torch's own metadata, but possible in
  ``planner_data``) is the global ``torch._utils.torch.<name>``.
* ``StorageMeta.checkpoint_id`` is a ``pathlib.PosixPath`` (FileSystemWriter)
  or a ``str`` (fsspec); ``load_id`` is None in the file (torch's reader
  stamps a fresh one after loading; ckcore does not).
* ``planner_data`` is DefaultSavePlanner's flattening map, fqn -> tuple of
  str/int keys (``{"a.b": ("a", "b")}``), or None; ``storage_data`` maps
  each ``MetadataIndex`` (``index`` hint set for tensor chunks) to its
  ``_StorageInfo``.

There is no header and no other format: ``Metadata.version`` is ``"1.0.0"``
(``filesystem.CURRENT_DCP_VERSION``); older checkpoints have no version.
The HuggingFace writer stores JSON (``model.safetensors.index.json``), not a
``.metadata`` pickle; it is out of scope here.

How a file is read, in order:

1. **The file.** Only a regular file is read (a FIFO, a device such as
   ``/dev/zero`` or a directory is refused before any read), opened without
   blocking, and only up to a size cap (``max_bytes``, default
   :data:`DEFAULT_MAX_BYTES`, or the environment variable
   ``CKCORE_MAX_METADATA_BYTES``): memory stays proportional to the cap.
2. **The opcodes** (:mod:`ckcore._kernels._pickle_scan`, GIL released). The
   stream is run over abstract values before anything is built. Globals come
   only from the allow-list; a metadata class is only instantiated by
   ``NEWOBJ`` without arguments and gets its state by one ``BUILD`` of the
   shape torch writes; ``BUILD`` on a class, a function or anything else is
   refused (it would set attributes process-wide), as are ``INST``,
   ``OBJ``, ``EXT*``, persistent ids and out-of-band buffers; callables get
   only the arguments their types take; memo indices are dense; containers
   nest at most :data:`MAX_DEPTH` deep (hashing a deeper tuple overflows the
   C stack); every declared length lies inside the stream.
3. **The objects.** The C-accelerated :class:`pickle.Unpickler` builds the
   scanned stream with the GC paused (which otherwise rescans the growing
   heap again and again: most of torch's own ``pickle.load`` time on a
   large file); ``find_class`` resolves the same allow-list. Functions and
   Python classes the stream may call are handed out behind a slot-only
   stand-in that refuses ``BUILD``, so even a stream the scan let through
   could not reach them.
4. **The structure** (:mod:`ckcore._kernels._mdcheck`). Every instance has
   exactly the fields of its class with values of the exact types torch
   writes (shapes are tuples of int64 >= 0), checked by type before any
   hash. The allow-listed classes are compared with a snapshot taken before
   the load, as a last tripwire: a change is undone and refused.

Errors name the file and describe untrusted values with
:func:`ckcore._saferepr.saferepr` (bounded size and time). The reading costs
about what torch's ``pickle.load`` costs with the same GC pause, a fraction
of torch's ``FileSystemReader.read_metadata`` (bench/test_bench_metadata.py).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import pickletools
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from math import prod
from typing import IO, Any

from ._gc import paused
from ._kernels import _mdcheck, _mdcolumns, _pickle_scan
from ._saferepr import index_text, name_text, saferepr, shape_text
from .dtypes import _ALIASES, DTYPE_ITEMSIZE, itemsize
from .mdcolumns import MetadataColumns
from .metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PROBLEM_LIMIT",
    "MAX_DEPTH",
    "METADATA_FILENAME",
    "STORAGE_PROBLEMS",
    "Checkpoint",
    "CheckpointError",
    "ItemLocation",
    "StorageInfo",
    "UnsafeCheckpointError",
    "load_metadata",
    "load_metadata_columns",
    "loads_metadata",
    "loads_metadata_columns",
    "tensor_nbytes",
]

#: Name of the global metadata file FileSystemWriter writes (``filesystem._metadata_fn``).
METADATA_FILENAME = ".metadata"

#: Largest ``.metadata`` read unless the caller passes ``max_bytes`` or sets
#: ``CKCORE_MAX_METADATA_BYTES``. A 740,352-item plan (a 70B model saved by
#: 1,024 ranks) pickles to about 30 MB; the objects built take roughly 15
#: times the file's size in memory.
DEFAULT_MAX_BYTES = 1 << 30

#: Deepest nesting of containers accepted in ``.metadata``. torch's own
#: metadata nests about 10 deep; hashing a tuple nested a million deep
#: overflows the C stack.
MAX_DEPTH = 100


class CheckpointError(ValueError):
    """A checkpoint (or its ``.metadata``) is missing, corrupted, truncated or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """``.metadata`` asks for a global that is not on ckcore's allow-list; nothing was called."""


class _StructureError(CheckpointError):
    """Valid pickle, but not the shape of DCP metadata (raised by the structure check)."""


@dataclass
class StorageInfo:
    """Where one item's bytes sit: ``length`` bytes at ``offset`` in ``relative_path``.

    Field for field torch's ``filesystem._StorageInfo``;
    ``transform_descriptors`` names stream transforms (e.g. compression)
    applied when the item was written, None when there were none.
    """

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None


@dataclass(frozen=True)
class ItemLocation:
    """An item's bytes on disk: absolute ``path`` plus the ``StorageInfo`` fields."""

    path: pathlib.Path
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None


# --------------------------------------------------------------------------
# The allow-list.
# --------------------------------------------------------------------------

_r = saferepr


_MEM_FORMAT_BY_ENCODING = {0: "contiguous_format", 1: "channels_last", 2: "preserve_format"}
_MEMORY_FORMATS = (
    "contiguous_format",
    "channels_last",
    "channels_last_3d",
    "preserve_format",
    "legacy_contiguous_format",
)
_LAYOUTS = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc",
            "_mkldnn", "jagged")


def _mem_format_from_encoding(value: object) -> str:
    # Stands in for torch's ``_MEM_FORMAT_ENCODING(value)``: REDUCE calls it
    # with the enum's value, and we return ckcore's memory-format name.
    try:
        return _MEM_FORMAT_BY_ENCODING[value]  # type: ignore[index]
    except (KeyError, TypeError):
        raise CheckpointError(f"invalid memory-format encoding {_r(value)}") from None


def _layout_from_name(name: object) -> str:
    # Stands in for ``torch.serialization._get_layout("torch.strided")``.
    if isinstance(name, str) and name.startswith("torch.") and name[6:] in _LAYOUTS:
        return name[6:]
    raise CheckpointError(f"invalid layout {_r(name)}")


class _TensorPropertiesState(TensorProperties):
    """Receives torch's TensorProperties state tuple, then becomes a plain TensorProperties.

    NEWOBJ builds an instance of this subclass and BUILD calls its
    ``__setstate__``; switching ``__class__`` afterwards leaves an object
    that is exactly ``ckcore.metadata.TensorProperties`` (dataclass ``==``
    compares classes), without a second pass over the result.
    """

    def __setstate__(self, state: Any) -> None:
        if type(state) is not tuple or len(state) != 5:
            raise CheckpointError(f"invalid TensorProperties state {_r(state)}")
        d = self.__dict__
        d["dtype"], d["layout"], d["requires_grad"], d["memory_format"], d["pin_memory"] = state
        object.__setattr__(self, "__class__", TensorProperties)


class _Callable:
    """A slot-only stand-in for an allow-listed function or Python class.

    ``find_class`` hands the stream this wrapper, never the function or
    class itself: pickle's ``BUILD`` on it calls :meth:`__setstate__`, which
    refuses, so neither ``__dict__``/``__defaults__`` of a function nor an
    attribute of a class (``pathlib.PurePosixPath._str`` renders every path
    of the process) can be set from a file. Calling it calls the original.
    """

    __slots__ = ("_fn",)
    _fn: Any

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError("refusing to set an attribute of an allow-listed callable")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("refusing BUILD on an allow-listed function or class")

    def __reduce__(self) -> Any:
        raise TypeError("an allow-list stand-in is not picklable")


def _path_class(pure: type, concrete: type) -> type:
    # A concrete Path of the other OS flavour cannot be instantiated here;
    # its pure twin keeps the value (and compares equal to torch's on the same OS).
    return concrete if concrete is type(pathlib.Path()) else pure


_DCP_MD = "torch.distributed.checkpoint.metadata"
_SHARD_MD = "torch.distributed._shard.sharded_tensor.metadata"
_FS = "torch.distributed.checkpoint.filesystem"

_PATH_GUARDS = {
    cls: _Callable(cls)
    for cls in {pathlib.PurePosixPath, pathlib.PureWindowsPath,
                _path_class(pathlib.PurePosixPath, pathlib.PosixPath),
                _path_class(pathlib.PureWindowsPath, pathlib.WindowsPath)}
}
_K = _pickle_scan.GLOBAL_KINDS

# (module, name) -> (what find_class returns, the kind the opcode scan models).
# Metadata classes go out as themselves (NEWOBJ needs a type; the scan lets
# BUILD reach only their fresh instances); functions and Python classes go
# out behind _Callable; builtin types cannot be changed from Python at all.
_TABLE: dict[tuple[str, str], tuple[Any, int]] = {
    (_DCP_MD, "Metadata"): (Metadata, _K["Metadata"]),
    (_DCP_MD, "TensorStorageMetadata"): (TensorStorageMetadata, _K["TensorStorageMetadata"]),
    (_DCP_MD, "ChunkStorageMetadata"): (ChunkStorageMetadata, _K["ChunkStorageMetadata"]),
    (_DCP_MD, "BytesStorageMetadata"): (BytesStorageMetadata, _K["BytesStorageMetadata"]),
    (_DCP_MD, "MetadataIndex"): (MetadataIndex, _K["MetadataIndex"]),
    (_DCP_MD, "StorageMeta"): (StorageMeta, _K["StorageMeta"]),
    (_DCP_MD, "TensorProperties"): (_TensorPropertiesState, _K["TensorProperties"]),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"): (
        _Callable(_mem_format_from_encoding), _K["memory_format_encoding"]),
    # Checkpoints of torch < 2.0 took TensorProperties from the ShardedTensor
    # package; its pickled state is the same tuple.
    (_SHARD_MD, "TensorProperties"): (_TensorPropertiesState, _K["TensorProperties"]),
    (_SHARD_MD, "MEM_FORMAT_ENCODING"): (
        _Callable(_mem_format_from_encoding), _K["memory_format_encoding"]),
    (_FS, "_StorageInfo"): (StorageInfo, _K["StorageInfo"]),
    ("torch", "Size"): (tuple, _K["Size"]),
    ("torch.serialization", "_get_layout"): (_Callable(_layout_from_name), _K["get_layout"]),
    # Plain containers a planner's planner_data may hold; constructing them runs
    # no user code, and their size is bounded by the file's (bytearray is left
    # out: bytearray(n) would allocate n bytes on the file's say-so).
    ("collections", "OrderedDict"): (OrderedDict, _K["OrderedDict"]),
    ("builtins", "tuple"): (tuple, _K["tuple"]),
    ("builtins", "list"): (list, _K["list"]),
    ("builtins", "dict"): (dict, _K["dict"]),
    ("builtins", "set"): (set, _K["set"]),
    ("builtins", "frozenset"): (frozenset, _K["frozenset"]),
    ("builtins", "complex"): (complex, _K["complex"]),
}
# Python >= 3.13 moved the concrete classes to pathlib._local.
for _mod in ("pathlib", "pathlib._local"):
    for _name, _pure, _concrete in (
        ("PurePosixPath", pathlib.PurePosixPath, pathlib.PurePosixPath),
        ("PureWindowsPath", pathlib.PureWindowsPath, pathlib.PureWindowsPath),
        ("PosixPath", pathlib.PurePosixPath, pathlib.PosixPath),
        ("WindowsPath", pathlib.PureWindowsPath, pathlib.WindowsPath),
    ):
        _TABLE[(_mod, _name)] = (_PATH_GUARDS[_path_class(_pure, _concrete)], _K["path"])
# torch.dtype pickles as the global torch.<name> (its __reduce__ returns the name).
for _name in DTYPE_ITEMSIZE:
    _TABLE[("torch", _name)] = (_name, _K["constant"])
for _alias, _name in _ALIASES.items():
    _TABLE[("torch", _alias)] = (_name, _K["constant"])
for _name in _LAYOUTS:
    _TABLE[("torch", _name)] = (_name, _K["constant"])
# torch.memory_format pickles as the global "torch._utils" / "torch.<name>".
for _name in _MEMORY_FORMATS:
    _TABLE[("torch._utils", "torch." + _name)] = (_name, _K["constant"])
    _TABLE[("torch", _name)] = (_name, _K["constant"])
del _mod, _name, _alias, _pure, _concrete

#: What the unpickler may reach: (module, name) -> the object it gets.
_ALLOWED: dict[tuple[str, str], Any] = {key: obj for key, (obj, _) in _TABLE.items()}
_KINDS: dict[tuple[str, str], int] = {key: kind for key, (_, kind) in _TABLE.items()}


def _global_kind(module: bytes, name: bytes) -> int:
    # The opcode scan's view of the same table (0: refused).
    return _KINDS.get((module.decode("utf-8"), name.decode("utf-8")), 0)


# Every class whose attributes a load could reach, for the tripwire in _load.
_GUARDED_CLASSES: tuple[type, ...] = (
    Metadata, TensorStorageMetadata, ChunkStorageMetadata, BytesStorageMetadata,
    MetadataIndex, StorageMeta, StorageInfo, TensorProperties, _TensorPropertiesState,
    pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path,
    pathlib.PosixPath, pathlib.WindowsPath,
)


class _SafeUnpickler(pickle.Unpickler):
    """C unpickler whose only way to reach a global is the allow-list table.

    Every opcode that names a global (GLOBAL, STACK_GLOBAL, INST, OBJ and the
    EXT codes) goes through ``find_class``, so nothing outside the table can
    be called. It only ever runs on a stream the opcode scan accepted (see
    :func:`_load`); the table check here is the second line.
    """

    def find_class(self, module: str, name: str) -> Any:
        if type(module) is not str or type(name) is not str:
            raise UnsafeCheckpointError(f"refusing global {_r(module)}.{_r(name)}")
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing global {_r(module)}.{_r(name)}: not on ckcore's allow-list "
                "of DCP metadata classes; nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing persistent id {_r(pid)}: DCP metadata has none")


# --------------------------------------------------------------------------
# Shape check of what came out: the stream may be valid pickle yet not DCP metadata.
# --------------------------------------------------------------------------

_FIELDS: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (Metadata, TensorStorageMetadata, StorageMeta, BytesStorageMetadata)
}


def _fields_ok(obj: object) -> bool:
    # Exactly the dataclass's own fields, or fewer (a checkpoint of an older
    # torch lacks the newer ones; the class defaults supply them): a BUILD
    # state with any other key (a dunder, another class's field) is refused.
    d = getattr(obj, "__dict__", None)
    return type(d) is dict and all(type(k) is str for k in d) and d.keys() <= _FIELDS[type(obj)]


def _valid_properties(p: dict) -> bool:
    # Types first: a value is only hashed (``in``) once it is known to be a str.
    dtype, layout, fmt = p.get("dtype"), p.get("layout"), p.get("memory_format")
    return (
        len(p) == 5
        and type(dtype) is str and dtype in DTYPE_ITEMSIZE
        and type(layout) is str and layout in _LAYOUTS
        and type(fmt) is str and fmt in _MEMORY_FORMATS
        and type(p.get("requires_grad")) is bool
        and type(p.get("pin_memory")) is bool
    )


def _check_chunks(fqn: str, chunks: list, ndim: int) -> None:
    # The compiled walk finds the first bad chunk; Python only words the error.
    i = _mdcheck.first_bad_chunk(chunks, ChunkStorageMetadata, ndim)
    if i < 0:
        return
    c = chunks[i]
    if type(c) is not ChunkStorageMetadata:
        raise _StructureError(f"{name_text(fqn)}: chunk {i} is {type(c).__name__}")
    d = c.__dict__
    if d.keys() - {"offsets", "sizes"}:
        raise _StructureError(f"{name_text(fqn)}: chunk {i} has fields other than offsets and sizes: "
                              f"{_r(sorted(map(str, d)))}")
    raise _StructureError(
        f"{name_text(fqn)}: chunk {i} has invalid offsets/sizes {_r(d.get('offsets'))}/"
        f"{_r(d.get('sizes'))} for a {ndim}-d tensor (want tuples of {ndim} ints in [0, 2**63))"
    )


def _check_storage_data(sd: dict, limit: int) -> None:
    # One compiled pass over the dict; Python only words an error.
    bad_key, bad_value, others = _mdcheck.check_storage_data(sd, MetadataIndex, StorageInfo)
    if bad_key >= 0:
        key = next(islice(sd, bad_key, None))
        raise _StructureError(f"storage_data key {_r(key)} is not a valid MetadataIndex")
    if bad_value >= 0:
        key, info = next(islice(sd.items(), bad_value, None))
        raise _StructureError(f"storage_data[{_r(key)}] is invalid: {_r(info)}")
    # Custom storage writers may store other values, which must be plain.
    if others:
        _check_plain([v for v in sd.values() if type(v) is not StorageInfo],
                     "storage_data", limit)


_PLAIN_LEAVES = (str, int, float, bool, complex, bytes, type(None))
_PLAIN_CONTAINERS = (tuple, list, dict, set, frozenset, OrderedDict)


def _check_plain(value: object, what: str, limit: int) -> None:
    """Refuse anything in ``value`` but plain values and containers, or a tree larger than ``limit``.

    A planner's own data (torch's DefaultSavePlanner stores fqn -> tuple of
    keys) and a custom storage writer's records hold plain values only;
    metadata objects do not belong there, and one made without its BUILD
    has no fields at all. The size is the value's size as a *tree*, which
    is what every later reader of it walks (``==``, ``repr``, conversion to
    torch's classes): a file can share one tuple twice at every level and
    make a 2**60-node tree of 60 objects. Cycles are refused for the same
    reason. Each object is examined once, so this costs the file's size.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[object, bool]] = [(value, False)]
    while stack:
        x, done = stack.pop()
        t = type(x)
        if t in _PLAIN_LEAVES or isinstance(x, pathlib.PurePath):
            continue
        if t not in _PLAIN_CONTAINERS:
            raise _StructureError(f"{what} holds a {t.__name__}: {_r(x)}")
        key = id(x)
        if not done:
            if key in sizes:
                continue
            if key in active:
                raise _StructureError(f"{what} contains itself")
            active.add(key)
            stack.append((x, True))
            stack.extend((c, False) for c in _children(x))
            continue
        active.discard(key)
        total = 1 + sum(sizes.get(id(c), 1) for c in _children(x))
        if total > limit:
            raise _StructureError(f"{what} is larger than the file could describe "
                                  "(values shared many times over)")
        sizes[key] = total


def _children(x: Any) -> list:
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    return list(x)


def _check_storage_meta(sm: object) -> None:
    if type(sm) is not StorageMeta or not _fields_ok(sm):
        raise _StructureError(f"storage_meta is {type(sm).__name__}, not a valid StorageMeta: "
                              f"{_r(sm)}")
    d = sm.__dict__
    cid = d.get("checkpoint_id")
    if cid is not None and type(cid) is not str and not isinstance(cid, pathlib.PurePath):
        raise _StructureError(f"storage_meta.checkpoint_id is {_r(cid)}")
    for key in ("save_id", "load_id"):
        v = d.get(key)
        if v is not None and type(v) is not str:
            raise _StructureError(f"storage_meta.{key} is {_r(v)}")
    # A file from a torch without ``modules`` lacks it, and it has no class
    # default (a default_factory): give it the field's default.
    modules = d.setdefault("modules", [])
    if type(modules) is not list or not all(type(m) is str for m in modules):
        raise _StructureError(f"storage_meta.modules is {_r(modules)}")


def _check_metadata(md: object, nbytes: int | None = None) -> Metadata:
    """Raise CheckpointError unless ``md`` is a well-formed ckcore Metadata.

    The scan and the unpickler guarantee that no foreign code ran and that
    every object was made the way torch makes it; a valid stream may still
    hold e.g. a list where chunks belong, or a TensorProperties whose BUILD
    never came. Callers (planning kernels, the CLI) rely on the types, so
    they are checked here, in bulk, each value by type before it is hashed.

    ``nbytes`` (the file's length) bounds the structure: a stream can share
    one chunk list or shape among many tensors at a few bytes each, and
    every reader of the result (this check, planning, the command) would
    then do work far beyond the file's size. Counted as chunk dimensions,
    a real file holds fewer than it has bytes.
    """
    if type(md) is not Metadata or not _fields_ok(md):
        raise _StructureError(f"top-level object is not DCP Metadata: {_r(md)}")
    md_dict = md.__dict__
    sdm = md_dict.get("state_dict_metadata")
    if type(sdm) is not dict:
        raise _StructureError("Metadata.state_dict_metadata is missing or not a dict")
    budget = None if nbytes is None else 2 * nbytes + 4096
    for fqn, item in sdm.items():
        if type(fqn) is not str:
            raise _StructureError(f"state_dict_metadata key {_r(fqn)} is not a str")
        kind = type(item)
        if kind is BytesStorageMetadata:
            if item.__dict__:
                raise _StructureError(f"{name_text(fqn)}: bytes storage metadata has fields")
            continue
        if kind is not TensorStorageMetadata:
            raise _StructureError(f"{name_text(fqn)}: storage metadata is {kind.__name__}")
        if not _fields_ok(item):
            raise _StructureError(f"{name_text(fqn)}: invalid tensor storage metadata {_r(item)}")
        d = item.__dict__
        props = d.get("properties")
        if type(props) is not TensorProperties or not _valid_properties(props.__dict__):
            raise _StructureError(f"{name_text(fqn)}: invalid tensor properties {_r(props)}")
        size = d.get("size")
        if not _mdcheck.shape_ok(size, len(size) if type(size) is tuple else -1):
            raise _StructureError(f"{name_text(fqn)}: invalid size {_r(size)}")
        chunks = d.get("chunks")
        if type(chunks) is not list:
            raise _StructureError(f"{name_text(fqn)}: chunks is {type(chunks).__name__}, not a list")
        if budget is not None:
            budget -= (len(chunks) + 1) * max(len(size), 1)
            if budget < 0:
                raise _StructureError(
                    f"{name_text(fqn)}: more chunk dimensions than a file of {nbytes} bytes can hold "
                    "(chunk lists or shapes shared between tensors)")
        _check_chunks(fqn, chunks, len(size))
    sm = md_dict.get("storage_meta")
    if sm is not None:
        _check_storage_meta(sm)
    limit = 1 << 62 if nbytes is None else nbytes + 4096
    _check_plain(md_dict.get("planner_data"), "planner_data", limit)
    version = md_dict.get("version")
    if version is not None and type(version) is not str:
        raise _StructureError(f"version is {_r(version)}, not a str")
    sd = md_dict.get("storage_data")
    if sd is not None:
        if type(sd) is not dict:
            raise _StructureError(f"storage_data is {type(sd).__name__}, not a dict")
        _check_storage_data(sd, limit)
    return md


# --------------------------------------------------------------------------
# Public loaders.
# --------------------------------------------------------------------------


def _metadata_path(path: str | os.PathLike, rank: int | None = None) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_dir():
        return p / (METADATA_FILENAME if rank is None else f"__{rank}{METADATA_FILENAME}")
    return p


def _max_bytes(max_bytes: int | None) -> int:
    if max_bytes is None:
        env = os.environ.get("CKCORE_MAX_METADATA_BYTES")
        if env is None:
            return DEFAULT_MAX_BYTES
        try:
            max_bytes = int(env)
        except ValueError:
            raise ValueError(f"CKCORE_MAX_METADATA_BYTES={_r(env)} is not an integer") from None
    if type(max_bytes) is not int:
        raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return max_bytes


def _read_capped(f: Any, cap: int, size: int | None = None) -> bytes:
    # Reads to the end, but never more than cap + 1 bytes (one past the cap
    # tells a file over it, or one that grew since fstat), and never asks
    # read() for more than is likely there: read(n) allocates n up front.
    parts = []
    total = 0
    want = (size + 1) if size is not None else (1 << 20)
    while total <= cap:
        chunk = f.read(max(1, min(want, cap + 1 - total)))
        if not chunk:
            break
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError("the metadata file object must be opened in binary mode")
        parts.append(chunk)
        total += len(chunk)
        want = min(max(want, 1 << 20) * 2, 1 << 28)
    return b"".join(parts)


def _too_big(name: str, size: int, cap: int) -> CheckpointError:
    return CheckpointError(
        f"{name}: DCP metadata of {size} bytes is larger than the cap of {cap} bytes "
        "(pass max_bytes= or set CKCORE_MAX_METADATA_BYTES to read it)"
    )


def _read_file(p: pathlib.Path, cap: int) -> bytes:
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever.
    # The type is checked on the open descriptor, not the path, so a file
    # swapped after a check cannot slip through.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read DCP metadata: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{p}: DCP metadata must be a regular file")
        if st.st_size > cap:
            raise _too_big(str(p), st.st_size, cap)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = _read_capped(f, cap, st.st_size)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read DCP metadata: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > cap:
        raise _too_big(str(p), len(data), cap)
    return data


# Class attributes that live on the type object itself, not in vars(cls).
_TYPE_SLOTS = ("__name__", "__qualname__", "__bases__", "__module__")


def _snapshot() -> list[tuple[type, dict[str, Any]]]:
    out = []
    for cls in _GUARDED_CLASSES:
        state = dict(vars(cls))
        for attr in _TYPE_SLOTS:
            state["\0" + attr] = getattr(cls, attr)
        out.append((cls, state))
    return out


def _restore(snapshot: list[tuple[type, dict[str, Any]]]) -> list[str]:
    # The tripwire: undo any change to an allow-listed class and name it.
    changed = []
    for cls, before in snapshot:
        now = dict(vars(cls))
        for attr in _TYPE_SLOTS:
            now["\0" + attr] = getattr(cls, attr)
        if now.keys() == before.keys() and all(now[k] is v for k, v in before.items()):
            continue
        for attr in _TYPE_SLOTS:
            if now["\0" + attr] is not before["\0" + attr]:
                setattr(cls, attr, before["\0" + attr])
        changed.append(cls.__qualname__)
        for k in [k for k in now if k not in before]:
            delattr(cls, k)
        for k, v in before.items():
            if not k.startswith("\0") and now.get(k) is not v:
                setattr(cls, k, v)
    return changed


# Below this size the scan runs to its end before unpickling starts; above
# it, on its own thread, ahead of the unpickler (see _Gated).
_PIPELINE_BYTES = 1 << 20


class _ScanStopped(Exception):
    """The scan refused the stream before the unpickler caught up with it."""


class _Gated(io.RawIOBase):
    """The stream, handed to the unpickler only as far as the scan has accepted it.

    The scan (GIL released, on another thread) runs several times faster than
    the unpickler, so the unpickler seldom waits; on a machine with a spare
    core the scan costs no wall time. ``read``/``readinto``/``readline``
    block until every opcode in the bytes they return has been accepted, and
    raise :class:`_ScanStopped` if the scan refused an opcode first.
    """

    def __init__(self, data: bytes, scanner: Any) -> None:
        super().__init__()
        self._data = data
        self._view = memoryview(data)
        self._pos = 0
        self._scanner = scanner

    def readable(self) -> bool:
        return True

    def _accepted(self) -> int:
        # How far the unpickler may go without waiting.
        sc = self._scanner
        return len(self._data) if sc.outcome_accepted else sc.progress

    def peek(self, n: int = 0) -> bytes:
        """Accepted bytes ahead, without moving: the C unpickler then reads
        ahead in large blocks instead of calling ``read`` per opcode.

        It runs an opcode only once all of it is in what it read, and this
        hands out nothing past the scan's progress, which only ever stands
        between two accepted opcodes.
        """
        end = min(self._pos + max(n, 1), self._accepted())
        return self._data[self._pos:end] if end > self._pos else b""

    def _wait(self, end: int) -> None:
        sc = self._scanner
        delay = 1e-5
        while sc.progress < end:
            if sc.finished:
                if sc.progress >= end:
                    return
                if sc.outcome_accepted:
                    # Bytes past STOP (the rest of its frame) are read, never run.
                    return
                raise _ScanStopped
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def read(self, n: int | None = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(self._pos + n, len(self._data))
        self._wait(end)
        out = self._data[self._pos:end]
        self._pos = end
        return out

    def readinto(self, b: Any) -> int:
        m = memoryview(b).cast("B")
        end = min(self._pos + len(m), len(self._data))
        self._wait(end)
        n = end - self._pos
        m[:n] = self._view[self._pos:end]
        self._pos = end
        return n

    def readline(self, size: int | None = -1) -> bytes:
        nl = self._data.find(b"\n", self._pos)
        end = len(self._data) if nl < 0 else nl + 1
        if size is not None and size >= 0:
            end = min(end, self._pos + size)
        self._wait(end)
        out = self._data[self._pos:end]
        self._pos = end
        return out


_OPCODES = {op.code: op for op in pickletools.opcodes}


def _refusal(found: tuple[bool, int, str], data: bytes, name: str,
             refused: list[tuple[bytes, bytes]]) -> CheckpointError:
    unsafe, pos, why = found
    if refused:
        mod, qual = (b.decode("utf-8", "replace") for b in refused[-1])
        why = (f"refusing global {mod[:100]}.{qual[:100]} (module {_r(mod)}, "
               f"class {_r(qual)}): not on ckcore's allow-list of DCP metadata classes")
    op = _OPCODES.get(chr(data[pos])) if pos < len(data) else None
    where = f"byte {pos}" + (f", opcode {op.name}" if op is not None else "")
    if unsafe:
        return UnsafeCheckpointError(f"{name}: {why} ({where}); nothing was executed")
    return CheckpointError(f"{name}: corrupted or truncated DCP metadata ({where}): {why}")


def _scan_quietly(scanner: Any) -> None:
    # The scan's outcome, out of memory included, is read with
    # _scan_result; nothing escapes a scan thread as a traceback.
    try:
        scanner.run()
    except MemoryError:
        pass


def _scan_result(scanner: Any, name: str) -> tuple[bool, int, str] | None:
    try:
        return scanner.result()
    except MemoryError:
        raise CheckpointError(f"{name}: out of memory while checking DCP metadata") from None


def _load(data: bytes, name: str) -> Metadata:
    refused: list[tuple[bytes, bytes]] = []

    def lookup(module: bytes, qualname: bytes) -> int:
        kind = _global_kind(module, qualname)
        if not kind:
            refused.append((module, qualname))
        return kind

    scanner = _pickle_scan.Scanner(data, lookup, MAX_DEPTH)
    thread = None
    if len(data) < _PIPELINE_BYTES:
        _scan_quietly(scanner)
        found = _scan_result(scanner, name)
        if found is not None:
            raise _refusal(found, data, name, refused)
        stream: IO[bytes] = io.BytesIO(data)
    else:
        thread = threading.Thread(target=_scan_quietly, args=(scanner,),
                                  name="ckcore-pickle-scan", daemon=True)
        thread.start()
        stream = _Gated(data, scanner)  # type: ignore[assignment]
    snapshot = _snapshot()
    try:
        # The unpickler allocates several container objects per chunk and the
        # cyclic GC would rescan the growing young generation again and again,
        # which dominates the load time of a large file (torch's pickle.load
        # pays it too; bench/test_bench_metadata.py measures it). Nothing built here needs the cycle
        # collector while loading; it runs again afterwards.
        with paused():
            return _load_paused(stream, name, len(data))
    except _ScanStopped:
        pass
    finally:
        if thread is not None:
            scanner.cancel()
            thread.join()
        changed = _restore(snapshot)
        if changed:
            raise UnsafeCheckpointError(
                f"{name}: loading changed allow-listed classes ({', '.join(changed)}); "
                "the change was undone and the file refused"
            )
    # Only a refusal of the scan ahead of the unpickler gets here.
    found = _scan_result(scanner, name)
    if found is None:
        raise CheckpointError(f"{name}: the opcode scan stopped without a result")
    raise _refusal(found, data, name, refused)


def _load_paused(stream: IO[bytes], name: str, nbytes: int) -> Metadata:
    try:
        md = _SafeUnpickler(stream).load()
        # Checked while the GC is still paused: the first allocations after
        # re-enabling it would otherwise run the deferred young-generation
        # pass (and possibly an older one) in the middle of the check.
        _check_metadata(md, nbytes)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{name}: {e}") from None
    except _StructureError as e:
        raise CheckpointError(f"{name}: not valid DCP metadata: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{name}: corrupted DCP metadata: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{name}: corrupted DCP metadata: nesting too deep") from None
    except _ScanStopped:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the stream is "corrupted"
        # UnpicklingError, ValueError, TypeError, KeyError, MemoryError, ... :
        # report the file, not the pickle internals.
        raise CheckpointError(
            f"{name}: corrupted DCP metadata ({type(e).__name__}: {_r(str(e))})"
        ) from None
    return md


def _metadata_bytes(path_or_file: Any, rank: int | None,
                    max_bytes: int | None) -> tuple[bytes, str]:
    """``(data, name)`` of a ``.metadata`` given as a binary stream or a checkpoint path, capped."""
    cap = _max_bytes(max_bytes)
    if hasattr(path_or_file, "read"):
        f = path_or_file
        name = _r(str(getattr(f, "name", "<metadata stream>")))
        try:
            data = _read_capped(f, cap)
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read DCP metadata: {e}") from None
        except TypeError:
            raise TypeError(f"{name}: the file object must be opened in binary mode") from None
        if len(data) > cap:
            raise _too_big(name, len(data), cap)
        return bytes(data), name
    p = _metadata_path(path_or_file, rank)
    return _read_file(p, cap), str(p)


def load_metadata(
    path_or_file: str | os.PathLike | IO[bytes],
    *,
    rank: int | None = None,
    max_bytes: int | None = None,
) -> Metadata:
    """Read a DCP checkpoint's ``.metadata`` without torch and without executing pickle code.

    ``path_or_file`` is the checkpoint directory, the metadata file itself, or
    a binary file object. ``rank`` selects ``__{rank}.metadata`` in a directory
    (FileSystemWriter without rank coordination). Returns ckcore's
    :class:`~ckcore.metadata.Metadata`; ``storage_data`` maps
    :class:`~ckcore.metadata.MetadataIndex` to :class:`StorageInfo`, dtypes are
    names. Unlike torch's ``FileSystemReader.read_metadata`` it does not stamp a
    fresh ``load_id`` into ``storage_meta``: the result is the file's content.

    Only a regular file is read, and at most ``max_bytes`` of it (default
    :data:`DEFAULT_MAX_BYTES`, or ``CKCORE_MAX_METADATA_BYTES`` when set).
    Raises :class:`UnsafeCheckpointError` if the stream asks for anything
    that could run or change code (a global outside the allow-list, a call
    or ``BUILD`` torch's metadata never makes: nothing is called),
    :class:`CheckpointError` if it is missing, not a regular file, over the
    cap, truncated, corrupted or not DCP metadata; both name the file.

    >>> md = load_metadata("/ckpt/step_100")            # doctest: +SKIP
    >>> md.state_dict_metadata["w"].properties.dtype     # doctest: +SKIP
    'bfloat16'
    """
    return _load(*_metadata_bytes(path_or_file, rank, max_bytes))


def loads_metadata(
    data: bytes, *, name: str = "<metadata bytes>", max_bytes: int | None = None
) -> Metadata:
    """Like :func:`load_metadata` for the bytes of a ``.metadata`` file; ``name`` goes in errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    cap = _max_bytes(max_bytes)
    nbytes = memoryview(data).nbytes
    if nbytes > cap:
        raise _too_big(name, nbytes, cap)
    return _load(bytes(data), name)


# --------------------------------------------------------------------------
# The column reader.
# --------------------------------------------------------------------------

_R = _mdcolumns.ROLES
_ROLE_OF_OBJECT: dict[int, int] = {
    id(Metadata): _R["Metadata"], id(TensorStorageMetadata): _R["TensorStorageMetadata"],
    id(ChunkStorageMetadata): _R["ChunkStorageMetadata"],
    id(BytesStorageMetadata): _R["BytesStorageMetadata"], id(MetadataIndex): _R["MetadataIndex"],
    id(StorageMeta): _R["StorageMeta"], id(StorageInfo): _R["StorageInfo"],
    id(_TensorPropertiesState): _R["TensorProperties"],
}
_ROLE_OF_KIND = {
    _K["Size"]: _R["Size"], _K["memory_format_encoding"]: _R["memory_format_encoding"],
    _K["get_layout"]: _R["get_layout"], _K["path"]: _R["path"], _K["constant"]: _R["constant"],
}


def _column_table() -> tuple[dict[tuple[bytes, bytes], int], list[int], list[Any]]:
    # The allow-list as the column machine sees it: code -> (role, object).
    # Containers built by REDUCE (OrderedDict, set, ...) have no role: a
    # stream naming them is read by the object reader.
    codes: dict[tuple[bytes, bytes], int] = {}
    roles, objects = [0], [None]
    for (module, name), (obj, kind) in _TABLE.items():
        role = _ROLE_OF_OBJECT.get(id(obj)) or _ROLE_OF_KIND.get(kind, 0)
        if not role:
            continue
        codes[(module.encode(), name.encode())] = len(roles)
        roles.append(role)
        objects.append(obj)
    return codes, roles, objects


_COLUMN_CODES, _COLUMN_ROLES, _COLUMN_OBJECTS = _column_table()


def _column_code(module: bytes, name: bytes) -> int:
    return _COLUMN_CODES.get((module, name), 0)


class _Fallback(Exception):
    """The column reader does not model the stream (the reason is the message)."""


def _columns_fast(data: bytes) -> MetadataColumns:
    try:
        raw = _mdcolumns.decode(data, _column_code, _COLUMN_ROLES, _COLUMN_OBJECTS, MAX_DEPTH)
    except _mdcolumns.Unsupported as e:
        raise _Fallback(str(e)) from None
    except RecursionError:
        raise _Fallback("nesting too deep") from None
    # The small fields are checked by the object reader's own rules.
    for p in raw["properties"]:
        if p is not None and not _valid_properties(dict(zip(_PROPERTY_FIELDS, p))):
            raise _Fallback(f"invalid tensor properties {_r(p)}")
    limit = len(data) + 4096
    try:
        _check_plain(raw["planner_data"], "planner_data", limit)
        sm = raw["storage_meta"]
        if sm is not None:
            obj = StorageMeta.__new__(StorageMeta)
            obj.__dict__.update({k: v for k, v in zip(_STORAGE_META_FIELDS, sm)
                                 if v is not _mdcolumns.ABSENT})
            _check_storage_meta(obj)
            raw["storage_meta"] = obj
    except _StructureError as e:
        raise _Fallback(str(e)) from None
    version = raw["version"]
    if version is not None and type(version) is not str:
        raise _Fallback("version is not a str")
    for td in raw.get("st_transforms", {}).values():
        if type(td) not in (list, tuple) or not all(type(x) is str for x in td):
            raise _Fallback("invalid transform_descriptors")
    try:
        return MetadataColumns(**raw)
    except (ValueError, TypeError) as e:
        raise _Fallback(str(e)) from None


_PROPERTY_FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
_STORAGE_META_FIELDS = ("checkpoint_id", "save_id", "load_id", "modules")


def _load_columns(data: bytes, name: str, fallback: bool) -> MetadataColumns:
    try:
        return _columns_fast(data)
    except _Fallback as e:
        if not fallback:
            raise CheckpointError(f"{name}: the column reader does not read this file: {e}") from None
    except MemoryError:
        raise CheckpointError(f"{name}: out of memory while reading DCP metadata") from None
    return MetadataColumns.from_metadata(_load(data, name))


def load_metadata_columns(
    path_or_file: str | os.PathLike | IO[bytes],
    *,
    rank: int | None = None,
    max_bytes: int | None = None,
    fallback: bool = True,
) -> MetadataColumns:
    """Read a ``.metadata`` straight into :class:`~ckcore.mdcolumns.MetadataColumns`.

    Arguments, file checks and errors are :func:`load_metadata`'s; the result
    equals ``MetadataColumns.from_metadata(load_metadata(...))``. A compiled
    machine (:mod:`ckcore._kernels._mdcolumns`) decodes the pickle into
    columns without building an object per chunk or storage entry; it calls
    nothing and refuses every construction it does not model. A file it
    refuses is read by :func:`load_metadata` (which refuses what is unsafe
    or not metadata) and converted, unless ``fallback`` is False: then it is
    a :class:`CheckpointError` naming what the column reader did not model.

    >>> cols = load_metadata_columns("/ckpt/step_100")     # doctest: +SKIP
    >>> offsets, sizes = cols.chunks("w")                  # doctest: +SKIP
    """
    return _load_columns(*_metadata_bytes(path_or_file, rank, max_bytes), fallback)


def loads_metadata_columns(
    data: bytes, *, name: str = "<metadata bytes>", max_bytes: int | None = None,
    fallback: bool = True,
) -> MetadataColumns:
    """Like :func:`load_metadata_columns` for the bytes of a ``.metadata`` file."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    cap = _max_bytes(max_bytes)
    nbytes = memoryview(data).nbytes
    if nbytes > cap:
        raise _too_big(name, nbytes, cap)
    return _load_columns(bytes(data), name, fallback)


# --------------------------------------------------------------------------
# Checkpoint.
# --------------------------------------------------------------------------

_I64_MAX = 2**63 - 1

#: Largest product :func:`_volume` computes exactly.
_VOLUME_CAP = 2**256

#: Every kind of problem :meth:`Checkpoint.iter_problems` finds, in the order
#: it reports them: kind -> what a count of them is called.
STORAGE_PROBLEMS = {
    "missing_storage_entry": "items without a storage entry",
    "unknown_storage_entry": "storage entries naming no item",
    "foreign_storage_entry": "storage entries that are not FileSystemWriter records",
    "path_outside": "storage entries naming a file outside the checkpoint",
    "missing_file": "storage entries in missing files",
    "beyond_file_end": "storage entries beyond the end of their file",
    "overlapping_storage": "storage entries sharing bytes with another",
    "short_storage": "chunks whose storage entry is shorter than their raw bytes",
}

#: Messages :meth:`Checkpoint.problems` returns unless given another limit.
DEFAULT_PROBLEM_LIMIT = 1000


def _volume(values: Sequence[int]) -> int | None:
    """The product of the ints ``values``, or None past 2**256 in magnitude.

    A crafted shape of a million dims makes ``math.prod`` minutes of bignum
    work; no real tensor has 2**256 elements.
    """
    if len(values) > 64:
        if 0 in values:
            return 0
        # Every value other than 1 at least doubles the magnitude.
        if len(values) - values.count(1) > 256:
            return None
    v = prod(values)
    return v if -_VOLUME_CAP <= v <= _VOLUME_CAP else None


def tensor_nbytes(fqn: str, item: TensorStorageMetadata) -> int:
    """Exact bytes of the whole tensor ``item`` (numel x itemsize) as a Python int.

    Raises :class:`CheckpointError` (naming ``fqn``) when the count leaves int64,
    which no real tensor does.

    >>> tensor_nbytes("w", TensorStorageMetadata(TensorProperties("bfloat16"), (4, 3), []))
    24
    """
    vol = _volume(item.size)
    n = None if vol is None else vol * itemsize(item.properties.dtype)
    if n is None or n > _I64_MAX:
        raise CheckpointError(
            f"{name_text(fqn)}: tensor of size {shape_text(item.size)} has more bytes than int64 holds")
    return n


def _escapes(relative_path: str) -> bool:
    # FileSystemWriter only writes plain file names ("__0_0.distcp"); an
    # absolute path or ".." in a downloaded checkpoint would point a reader
    # at files outside the checkpoint directory.
    pure = pathlib.PurePath(relative_path)
    return (
        not relative_path
        or pure.is_absolute()
        or pathlib.PureWindowsPath(relative_path).is_absolute()
        or ".." in pure.parts
        or "\0" in relative_path
    )


def _storage(md: Metadata) -> dict[MetadataIndex, Any]:
    sd = md.storage_data
    return sd if isinstance(sd, dict) else {}


def _file_names(storage: dict[MetadataIndex, Any]) -> list[str]:
    # Every file a FileSystemWriter record names, once, in first-use order.
    return list(dict.fromkeys(
        info.relative_path for info in storage.values()
        if type(info) is StorageInfo and type(info.relative_path) is str))


def _file_size(path: pathlib.Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _always(kind: str) -> bool:
    return True


class Checkpoint:
    """A FileSystemWriter checkpoint directory: its metadata and where every item's bytes are.

    Attributes:
        dir: the checkpoint directory.
        metadata_path: the metadata file read.
        metadata: ckcore :class:`~ckcore.metadata.Metadata`.
        storage: ``metadata.storage_data``: :class:`~ckcore.metadata.MetadataIndex` ->
            :class:`StorageInfo` (empty if the checkpoint has none).
        files: every data file the storage info names -> its size in bytes,
            or None if it is missing (or its name would leave ``dir``).

    :meth:`from_metadata` builds one from metadata already in memory.

    >>> ck = Checkpoint("/ckpt/step_100")                       # doctest: +SKIP
    >>> ck.item_location(MetadataIndex("w", (0, 0)))            # doctest: +SKIP
    ItemLocation(path=PosixPath('/ckpt/step_100/__0_0.distcp'), offset=0, length=1261, ...)
    """

    dir: pathlib.Path
    metadata_path: pathlib.Path
    metadata: Metadata
    storage: dict[MetadataIndex, Any]
    files: dict[str, int | None]

    def __init__(
        self, path: str | os.PathLike, *, rank: int | None = None, max_bytes: int | None = None
    ) -> None:
        """Open the checkpoint at ``path`` (a directory, or its metadata file) and read its metadata.

        ``rank`` and ``max_bytes`` are :func:`load_metadata`'s. Raises
        :class:`CheckpointError` (or :class:`UnsafeCheckpointError`) as
        :func:`load_metadata` does; data files are only ``stat``-ed, never read.
        """
        p = pathlib.Path(path)
        if p.is_dir():
            self.dir = p
            self.metadata_path = _metadata_path(p, rank)
        else:
            self.dir = p.parent
            self.metadata_path = p
        self.metadata = load_metadata(self.metadata_path, max_bytes=max_bytes)
        self.storage = _storage(self.metadata)
        self.files = {rp: None if _escapes(rp) else _file_size(self.dir / rp)
                      for rp in _file_names(self.storage)}

    @classmethod
    def from_metadata(
        cls,
        metadata: Metadata,
        *,
        file_sizes: Mapping[str, int | None] | None = None,
        name: str = "<in memory>",
    ) -> Checkpoint:
        """A checkpoint of ``metadata`` already in memory, with no directory read.

        ``file_sizes`` gives the size of each data file the storage entries
        name (a name it lacks, or maps to None, is a missing file; names no
        entry uses are ignored); ``name`` stands for both :attr:`dir` and
        :attr:`metadata_path`, so messages and reports name it. The metadata
        is used as given (not copied), after the structural check a file's
        gets (:class:`CheckpointError`, naming ``name``, for e.g. a chunk
        that is not a ChunkStorageMetadata or a StorageInfo with a negative
        offset): every later reader relies on those types. Mutate it
        afterwards and the check no longer holds; build a new Checkpoint.
        Nothing touches the disk: use it to validate or plan a checkpoint
        before (or without) writing it.

        >>> md = Metadata({"w": TensorStorageMetadata(
        ...     TensorProperties("float32"), (4,), [ChunkStorageMetadata((0,), (4,))])},
        ...     storage_data={MetadataIndex("w", (0,)): StorageInfo("__0_0.distcp", 0, 16)})
        >>> ck = Checkpoint.from_metadata(md, file_sizes={"__0_0.distcp": 16}, name="<demo>")
        >>> ck.files, ck.problems()
        ({'__0_0.distcp': 16}, [])
        >>> Checkpoint.from_metadata(md, name="<demo>").problems()
        ['w: file __0_0.distcp is missing']
        """
        if not isinstance(metadata, Metadata):
            raise TypeError(f"metadata must be a ckcore Metadata, got {type(metadata).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        try:
            _check_metadata(metadata)
        except _StructureError as e:
            raise CheckpointError(f"{name}: not valid DCP metadata: {e}") from None
        if file_sizes is not None and not isinstance(file_sizes, Mapping):
            raise TypeError("file_sizes must be a mapping of file name to size (or None), "
                            f"got {type(file_sizes).__name__}")
        sizes = {} if file_sizes is None else dict(file_sizes)
        for rp, size in sizes.items():
            if size is not None and (type(size) is not int or size < 0):
                raise TypeError(f"file_sizes[{saferepr(rp)}] must be an int >= 0 or None, "
                                f"got {saferepr(size)}")
        ck = cls.__new__(cls)
        ck.dir = ck.metadata_path = pathlib.Path(name)
        ck.metadata = metadata
        ck.storage = _storage(metadata)
        ck.files = {rp: None if _escapes(rp) else sizes.get(rp) for rp in _file_names(ck.storage)}
        return ck

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.dir)!r}, items={len(self.metadata.state_dict_metadata)}, "
            f"storage_entries={len(self.storage)}, files={len(self.files)})"
        )

    @property
    def state_dict_metadata(self) -> dict[str, Any]:
        """``metadata.state_dict_metadata``: fqn -> tensor or bytes storage metadata."""
        return self.metadata.state_dict_metadata

    def storage_info(self, index: MetadataIndex | str) -> StorageInfo:
        """The :class:`StorageInfo` of ``index`` (a MetadataIndex, or an fqn for a bytes item).

        Raises KeyError if the checkpoint has no entry for it (the index hint
        is ignored, as in torch), CheckpointError if the entry is not a
        FileSystemWriter record.
        """
        key = MetadataIndex(index) if isinstance(index, str) else index
        try:
            info = self.storage[key]
        except KeyError:
            raise KeyError(f"{self.metadata_path}: no storage entry for {_r(key)}") from None
        if type(info) is not StorageInfo:
            raise CheckpointError(
                f"{self.metadata_path}: storage entry for {_r(key)} is {type(info).__name__}, "
                "not a FileSystemWriter record"
            )
        return info

    def item_location(self, index: MetadataIndex | str) -> ItemLocation:
        """Where the bytes of ``index`` are: file path, byte offset and length.

        ``index`` is a :class:`~ckcore.metadata.MetadataIndex` (fqn and, for a
        tensor chunk, the chunk's global offsets) or an fqn string for a bytes
        item. The bytes are what FileSystemWriter wrote for the item (a
        ``torch.save`` stream of the chunk or object), after
        ``transform_descriptors`` if any. Refuses (CheckpointError) a path that
        would leave the checkpoint directory.
        """
        info = self.storage_info(index)
        rp = info.relative_path
        if _escapes(rp):
            raise CheckpointError(
                f"{self.metadata_path}: storage entry for {_r(index)} names {_r(rp)}, "
                "outside the checkpoint directory"
            )
        return ItemLocation(self.dir / rp, info.offset, info.length, info.transform_descriptors)


    def problems(self, limit: int | None = DEFAULT_PROBLEM_LIMIT) -> list[str]:
        """Inconsistencies between metadata and files, as messages; empty when sound.

        The first ``limit`` messages of :meth:`iter_problems` (None: all of
        them, as many as the metadata has entries); the walk stops there, so
        a crafted ``.metadata`` naming a million missing items costs
        ``limit`` messages. ``limit`` is an int >= 0 (a bool or float is a
        TypeError, a negative int a ValueError) or None.
        """
        if limit is not None:
            if type(limit) is not int:
                raise TypeError(f"limit must be an int >= 0 or None, got {saferepr(limit)}")
            if limit < 0:
                raise ValueError(f"limit must be >= 0 or None, got {limit}")
            if limit > sys.maxsize:  # islice's bound; no walk yields that many
                limit = None
        return [m for _, m in islice(self.iter_problems(), limit) if m is not None]

    def iter_problems(
        self, want: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, str | None]]:
        """Yield ``(kind, message)`` for each inconsistency between metadata and files.

        ``kind`` is a key of :data:`STORAGE_PROBLEMS`. Checks that every
        tensor chunk and bytes item has a storage entry and every entry an
        item; that every entry is a FileSystemWriter record whose file lies
        inside the checkpoint directory, exists and holds ``[offset, offset +
        length)``; that no two entries share bytes of a file (FileSystemWriter
        writes each item once, back to back, so shared bytes mean metadata and
        files do not belong together); and that no tensor chunk's entry is
        shorter than the chunk's raw bytes (entries written through a stream
        transform, such as compression, are not compared).

        ``want(kind)`` is called once per problem found; when it returns
        False the message is None and not written, so a caller counting
        millions of problems keeps only the messages it shows. The walk is
        linear in the metadata's entries (plus a sort of each file's).
        """
        if want is not None and not callable(want):
            raise TypeError(f"want must be a callable (kind -> bool) or None, got {type(want).__name__}")
        w = want or _always
        storage = self.storage
        expected: set[MetadataIndex] = set()
        for fqn, item in self.metadata.state_dict_metadata.items():
            if type(item) is TensorStorageMetadata:
                for i, c in enumerate(item.chunks):
                    key = MetadataIndex(fqn, c.offsets)
                    expected.add(key)
                    if key not in storage:
                        k = "missing_storage_entry"
                        yield k, (f"{name_text(fqn)}: chunk {i} at offsets {shape_text(c.offsets)} "
                                  "has no storage entry") if w(k) else None
            else:
                key = MetadataIndex(fqn)
                expected.add(key)
                if key not in storage:
                    k = "missing_storage_entry"
                    yield k, f"{name_text(fqn)}: bytes item has no storage entry" if w(k) else None
        outside: dict[str, bool] = {}  # a few files hold every entry: parse each name once
        for key, info in storage.items():
            if key not in expected:
                k = "unknown_storage_entry"
                yield k, (f"storage entry {index_text(key)} names no item in state_dict_metadata"
                          if w(k) else None)
            if type(info) is not StorageInfo:
                k = "foreign_storage_entry"
                yield k, (f"storage entry {index_text(key)} is a {name_text(type(info).__name__)}, "
                          "not a FileSystemWriter record") if w(k) else None
                continue
            rp = info.relative_path
            escapes = outside.get(rp)
            if escapes is None:
                escapes = outside[rp] = _escapes(rp)
            if escapes:
                k = "path_outside"
                yield k, (f"{name_text(key.fqn)}: file {name_text(rp)} lies outside the "
                          "checkpoint directory") if w(k) else None
                continue
            size = self.files.get(rp)
            if size is None:
                k = "missing_file"
                yield k, f"{name_text(key.fqn)}: file {name_text(rp)} is missing" if w(k) else None
            elif info.offset + info.length > size:
                k = "beyond_file_end"
                yield k, (f"{name_text(key.fqn)}: bytes [{info.offset}, {info.offset + info.length}) "
                          f"lie beyond the end of {name_text(rp)} ({size} bytes)") if w(k) else None
        yield from self._overlapping_storage(w)
        yield from self._short_storage(w)

    def _overlapping_storage(self, w: Callable[[str], bool]) -> Iterator[tuple[str, str | None]]:
        # Per file, entries sorted by start: an entry overlaps an earlier one
        # when it starts before the furthest end seen so far. Empty entries
        # hold no bytes.
        by_file: dict[str, list[tuple[int, int, Any]]] = {}
        for key, info in self.storage.items():
            if type(info) is StorageInfo and info.length > 0:
                by_file.setdefault(info.relative_path, []).append(
                    (info.offset, info.offset + info.length, key))
        for rp, entries in sorted(by_file.items()):
            entries.sort(key=lambda e: (e[0], e[1]))
            reach_end, reach_key = -1, None
            for start, end, key in entries:
                if start < reach_end:
                    k = "overlapping_storage"
                    yield k, (f"{name_text(key.fqn)}: bytes [{start}, {end}) of {name_text(rp)} "
                              f"overlap those of {name_text(getattr(reach_key, 'fqn', None))} "
                              f"(up to byte {reach_end})") if w(k) else None
                if end > reach_end:
                    reach_end, reach_key = end, key

    def _short_storage(self, w: Callable[[str], bool]) -> Iterator[tuple[str, str | None]]:
        for fqn, item in self.metadata.state_dict_metadata.items():
            if type(item) is not TensorStorageMetadata:
                continue
            size = itemsize(item.properties.dtype)
            for i, c in enumerate(item.chunks):
                info = self.storage.get(MetadataIndex(fqn, c.offsets))
                if type(info) is not StorageInfo or info.transform_descriptors:
                    continue
                vol = _volume(c.sizes)
                raw = None if vol is None else vol * size
                if raw is None or info.length < raw:
                    k = "short_storage"
                    yield k, (f"{name_text(fqn)}: chunk {i} at offsets {shape_text(c.offsets)} needs "
                              f"{'more than 2**256' if raw is None else raw} bytes but its storage "
                              f"entry in {name_text(info.relative_path)} holds {info.length}"
                              ) if w(k) else None

    def check_byte_totals(self) -> None:
        """Raise :class:`CheckpointError` unless every byte count fits int64 sums.

        Every storage entry must be a FileSystemWriter record ending before
        byte 2**63, and the entries' lengths plus every tensor's bytes must
        add up to less than 2**63: a load reads each entry at most once and
        keeps each tensor at most once, so these totals bound any per-rank
        figure. A real checkpoint is far below; a crafted ``.metadata`` may
        not be.
        """
        stored = 0
        for key, info in self.storage.items():
            if type(info) is not StorageInfo:
                raise CheckpointError(
                    f"storage entry {index_text(key)} is a {name_text(type(info).__name__)}, not a "
                    "FileSystemWriter record (run `ckcore validate`)")
            end = info.offset + info.length
            if end > _I64_MAX:
                raise CheckpointError(
                    f"{name_text(key.fqn)}: storage entry ends at byte {end}, beyond int64")
            stored += info.length
        kept = stored + sum(tensor_nbytes(fqn, item)
                            for fqn, item in self.metadata.state_dict_metadata.items()
                            if type(item) is TensorStorageMetadata)
        if stored > _I64_MAX or kept > _I64_MAX:
            raise CheckpointError("the checkpoint's byte counts add up to more than int64 holds")
