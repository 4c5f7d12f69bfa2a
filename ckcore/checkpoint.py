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

The unpickler subclasses the C-accelerated :class:`pickle.Unpickler`, so only
the handful of ``find_class`` calls (each global is memoised by the pickler)
run Python code. Loading pauses the cyclic GC (which otherwise rescans the
growing heap again and again: most of torch's own ``pickle.load`` time on a
large file) and checks the result's structure with a compiled walk
(:mod:`ckcore._kernels._mdcheck`). On a 51,200-chunk file this is several
times faster than torch's ``FileSystemReader.read_metadata`` and on par with
torch's ``pickle.load`` given the same GC pause (bench/test_bench_metadata.py).
"""

from __future__ import annotations

import gc
import io
import os
import pathlib
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any

from ._kernels import _mdcheck
from .dtypes import _ALIASES, DTYPE_ITEMSIZE
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
    "METADATA_FILENAME",
    "Checkpoint",
    "CheckpointError",
    "ItemLocation",
    "StorageInfo",
    "UnsafeCheckpointError",
    "load_metadata",
    "loads_metadata",
]

#: Name of the global metadata file FileSystemWriter writes (``filesystem._metadata_fn``).
METADATA_FILENAME = ".metadata"


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

def _r(obj: object) -> str:
    """repr() for error messages about untrusted objects: bounded, and never raises.

    A hostile or damaged stream can build dataclass instances without their
    fields, whose generated ``__repr__`` would raise AttributeError.
    """
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= 200 else text[:197] + "..."


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
        self.__class__ = TensorProperties


def _path_class(pure: type, concrete: type) -> type:
    # A concrete Path of the other OS flavour cannot be instantiated here;
    # its pure twin keeps the value (and compares equal to torch's on the same OS).
    return concrete if concrete is type(pathlib.Path()) else pure


_DCP_MD = "torch.distributed.checkpoint.metadata"
_SHARD_MD = "torch.distributed._shard.sharded_tensor.metadata"
_FS = "torch.distributed.checkpoint.filesystem"

_ALLOWED: dict[tuple[str, str], Any] = {
    (_DCP_MD, "Metadata"): Metadata,
    (_DCP_MD, "TensorStorageMetadata"): TensorStorageMetadata,
    (_DCP_MD, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_DCP_MD, "BytesStorageMetadata"): BytesStorageMetadata,
    (_DCP_MD, "MetadataIndex"): MetadataIndex,
    (_DCP_MD, "StorageMeta"): StorageMeta,
    (_DCP_MD, "TensorProperties"): _TensorPropertiesState,
    (_DCP_MD, "_MEM_FORMAT_ENCODING"): _mem_format_from_encoding,
    # Checkpoints of torch < 2.0 took TensorProperties from the ShardedTensor
    # package; its pickled state is the same tuple.
    (_SHARD_MD, "TensorProperties"): _TensorPropertiesState,
    (_SHARD_MD, "MEM_FORMAT_ENCODING"): _mem_format_from_encoding,
    (_FS, "_StorageInfo"): StorageInfo,
    ("torch", "Size"): tuple,
    ("torch.serialization", "_get_layout"): _layout_from_name,
    # Plain containers a planner's planner_data may hold; constructing them runs
    # no user code, and their size is bounded by the file's (bytearray is left
    # out: bytearray(n) would allocate n bytes on the file's say-so).
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PosixPath"): _path_class(pathlib.PurePosixPath, pathlib.PosixPath),
    ("pathlib", "WindowsPath"): _path_class(pathlib.PureWindowsPath, pathlib.WindowsPath),
}
# Python >= 3.13 moved the concrete classes to pathlib._local.
for _name in ("PurePosixPath", "PureWindowsPath", "PosixPath", "WindowsPath"):
    _ALLOWED[("pathlib._local", _name)] = _ALLOWED[("pathlib", _name)]
# torch.dtype pickles as the global torch.<name> (its __reduce__ returns the name).
for _name in DTYPE_ITEMSIZE:
    _ALLOWED[("torch", _name)] = _name
for _alias, _name in _ALIASES.items():
    _ALLOWED[("torch", _alias)] = _name
for _name in _LAYOUTS:
    _ALLOWED[("torch", _name)] = _name
# torch.memory_format pickles as the global "torch._utils" / "torch.<name>".
for _name in _MEMORY_FORMATS:
    _ALLOWED[("torch._utils", "torch." + _name)] = _name
    _ALLOWED[("torch", _name)] = _name
del _name, _alias


class _SafeUnpickler(pickle.Unpickler):
    """C unpickler whose only way to reach a global is the allow-list table.

    Every opcode that names a global (GLOBAL, STACK_GLOBAL, INST, OBJ and the
    EXT codes) goes through ``find_class``, so nothing outside the table can
    be called. Protocol 0/1 object pickles (``copyreg._reconstructor``) are
    refused too: torch writes protocol 4 (5 on Python >= 3.14).
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing global {module[:100]}.{name[:100]} (module {_r(module)}, class {_r(name)}): "
                "not on ckcore's allow-list of DCP metadata classes; nothing was executed"
            ) from None
        except TypeError:  # unhashable: cannot come from a valid stream
            raise UnsafeCheckpointError(f"refusing global {_r(module)}.{_r(name)}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing persistent id {_r(pid)}: DCP metadata has none")


# --------------------------------------------------------------------------
# Shape check of what came out: the stream may be valid pickle yet not DCP metadata.
# --------------------------------------------------------------------------


def _valid_properties(p: dict) -> bool:
    return (
        p.get("dtype") in DTYPE_ITEMSIZE
        and p.get("layout") in _LAYOUTS
        and p.get("memory_format") in _MEMORY_FORMATS
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
        raise _StructureError(f"{fqn}: chunk {i} is {type(c).__name__}")
    offs, sizes = c.__dict__.get("offsets"), c.__dict__.get("sizes")
    raise _StructureError(
        f"{fqn}: chunk {i} has invalid offsets/sizes {_r(offs)}/{_r(sizes)} "
        f"for a {ndim}-d tensor (want tuples of {ndim} ints in [0, 2**63))"
    )


def _check_storage_data(sd: dict) -> None:
    if not set(map(type, sd)) <= {MetadataIndex}:
        bad = next(k for k in sd if type(k) is not MetadataIndex)
        raise _StructureError(f"storage_data key {_r(bad)} is not a MetadataIndex")
    # Custom storage writers may store other values; the kernel checks only
    # the filesystem's records (StorageInfo) and skips the rest.
    infos = list(sd.values())
    i = _mdcheck.first_bad_storage_info(infos, StorageInfo)
    if i >= 0:
        key = next(islice(sd, i, None))
        raise _StructureError(f"storage_data[{_r(key)}] is invalid: {_r(infos[i])}")


def _check_metadata(md: object) -> Metadata:
    """Raise CheckpointError unless ``md`` is a well-formed ckcore Metadata.

    The unpickler guarantees only that no foreign code ran; a valid pickle
    may still hold e.g. a list where chunks belong, or a TensorProperties
    whose BUILD never came. Callers (planning kernels, the CLI) rely on the
    types, so they are checked here, in bulk.
    """
    if type(md) is not Metadata:
        raise _StructureError(f"top-level object is {type(md).__name__}, not DCP Metadata")
    sdm = md.__dict__.get("state_dict_metadata")
    if type(sdm) is not dict:
        raise _StructureError("Metadata.state_dict_metadata is missing or not a dict")
    for fqn, item in sdm.items():
        if type(fqn) is not str:
            raise _StructureError(f"state_dict_metadata key {_r(fqn)} is not a str")
        kind = type(item)
        if kind is BytesStorageMetadata:
            continue
        if kind is not TensorStorageMetadata:
            raise _StructureError(f"{fqn}: storage metadata is {kind.__name__}")
        d = item.__dict__
        props = d.get("properties")
        if type(props) is not TensorProperties or not _valid_properties(props.__dict__):
            raise _StructureError(f"{fqn}: invalid tensor properties {_r(props)}")
        size = d.get("size")
        if not _mdcheck.shape_ok(size, len(size) if type(size) is tuple else -1):
            raise _StructureError(f"{fqn}: invalid size {_r(size)}")
        chunks = d.get("chunks")
        if type(chunks) is not list:
            raise _StructureError(f"{fqn}: chunks is {type(chunks).__name__}, not a list")
        _check_chunks(fqn, chunks, len(size))
    md_dict = md.__dict__
    sm = md_dict.get("storage_meta")
    if sm is not None and type(sm) is not StorageMeta:
        raise _StructureError(f"storage_meta is {type(sm).__name__}, not StorageMeta")
    version = md_dict.get("version")
    if version is not None and type(version) is not str:
        raise _StructureError(f"version is {_r(version)}, not a str")
    sd = md_dict.get("storage_data")
    if sd is not None:
        if type(sd) is not dict:
            raise _StructureError(f"storage_data is {type(sd).__name__}, not a dict")
        _check_storage_data(sd)
    return md


# --------------------------------------------------------------------------
# Public loaders.
# --------------------------------------------------------------------------


def _metadata_path(path: str | os.PathLike, rank: int | None = None) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_dir():
        return p / (METADATA_FILENAME if rank is None else f"__{rank}{METADATA_FILENAME}")
    return p


def _load(file: IO[bytes], name: str) -> Metadata:
    # The unpickler allocates several container objects per chunk and the
    # cyclic GC would rescan the growing young generation again and again:
    # measured, that is ~80% of the load time of a 50k-chunk file (torch's
    # pickle.load pays it too). Nothing built here needs the cycle
    # collector while loading; it runs again afterwards.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        md = _SafeUnpickler(file).load()
        # Checked while the GC is still paused: the first allocations after
        # re-enabling it would otherwise run the deferred young-generation
        # pass (and possibly an older one) in the middle of the check.
        _check_metadata(md)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{name}: {e}") from None
    except _StructureError as e:
        raise CheckpointError(f"{name}: not valid DCP metadata: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{name}: corrupted DCP metadata: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{name}: corrupted DCP metadata: nesting too deep") from None
    except Exception as e:  # noqa: BLE001 - any failure of the stream is "corrupted"
        # UnpicklingError, EOFError (truncated), ValueError, TypeError, KeyError,
        # MemoryError, ... : report the file, not the pickle internals.
        raise CheckpointError(
            f"{name}: corrupted or truncated DCP metadata ({type(e).__name__}: {e})"
        ) from None
    finally:
        if gc_was_enabled:
            gc.enable()
    return md


def load_metadata(
    path_or_file: str | os.PathLike | IO[bytes], *, rank: int | None = None
) -> Metadata:
    """Read a DCP checkpoint's ``.metadata`` without torch and without executing pickle code.

    ``path_or_file`` is the checkpoint directory, the metadata file itself, or
    a binary file object. ``rank`` selects ``__{rank}.metadata`` in a directory
    (FileSystemWriter without rank coordination). Returns ckcore's
    :class:`~ckcore.metadata.Metadata`; ``storage_data`` maps
    :class:`~ckcore.metadata.MetadataIndex` to :class:`StorageInfo`, dtypes are
    names. Unlike torch's ``FileSystemReader.read_metadata`` it does not stamp a
    fresh ``load_id`` into ``storage_meta``: the result is the file's content.

    Raises :class:`UnsafeCheckpointError` if the file names any global outside
    the allow-list (nothing is called), :class:`CheckpointError` if it is
    missing, truncated, corrupted or not DCP metadata; both name the file.

    >>> md = load_metadata("/ckpt/step_100")            # doctest: +SKIP
    >>> md.state_dict_metadata["w"].properties.dtype     # doctest: +SKIP
    'bfloat16'
    """
    if hasattr(path_or_file, "read"):
        f = path_or_file
        name = str(getattr(f, "name", "<metadata stream>"))
        return _load(f, name)  # type: ignore[arg-type]
    p = _metadata_path(path_or_file, rank)  # type: ignore[arg-type]
    try:
        # One read then BytesIO: the C unpickler reads a BytesIO without
        # Python-level read() calls per frame.
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read DCP metadata: {e.strerror or e}") from e
    return _load(io.BytesIO(data), str(p))


def loads_metadata(data: bytes, *, name: str = "<metadata bytes>") -> Metadata:
    """Like :func:`load_metadata` for the bytes of a ``.metadata`` file; ``name`` goes in errors."""
    return _load(io.BytesIO(data), name)


# --------------------------------------------------------------------------
# Checkpoint.
# --------------------------------------------------------------------------


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

    >>> ck = Checkpoint("/ckpt/step_100")                       # doctest: +SKIP
    >>> ck.item_location(MetadataIndex("w", (0, 0)))            # doctest: +SKIP
    ItemLocation(path=PosixPath('/ckpt/step_100/__0_0.distcp'), offset=0, length=1261, ...)
    """

    def __init__(self, path: str | os.PathLike, *, rank: int | None = None) -> None:
        """Open the checkpoint at ``path`` (a directory, or its metadata file) and read its metadata.

        Raises :class:`CheckpointError` (or :class:`UnsafeCheckpointError`) as
        :func:`load_metadata` does; data files are only ``stat``-ed, never read.
        """
        p = pathlib.Path(path)
        if p.is_dir():
            self.dir = p
            self.metadata_path = _metadata_path(p, rank)
        else:
            self.dir = p.parent
            self.metadata_path = p
        self.metadata: Metadata = load_metadata(self.metadata_path)
        sd = self.metadata.storage_data
        self.storage: dict[MetadataIndex, Any] = sd if isinstance(sd, dict) else {}
        files: dict[str, int | None] = {}
        for info in self.storage.values():
            rp = getattr(info, "relative_path", None) if type(info) is StorageInfo else None
            if rp is not None and rp not in files:
                files[rp] = None
                if not _escapes(rp):
                    try:
                        files[rp] = os.stat(self.dir / rp).st_size
                    except OSError:
                        pass
        self.files = files

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
            raise KeyError(f"{self.metadata_path}: no storage entry for {key}") from None
        if type(info) is not StorageInfo:
            raise CheckpointError(
                f"{self.metadata_path}: storage entry for {key} is {type(info).__name__}, "
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
                f"{self.metadata_path}: storage entry for {index} names {rp!r}, "
                "outside the checkpoint directory"
            )
        return ItemLocation(self.dir / rp, info.offset, info.length, info.transform_descriptors)

    def problems(self) -> list[str]:
        """Inconsistencies between metadata and files, as messages; empty when sound.

        Checks that every tensor chunk and bytes item has a storage entry, that
        every entry's file exists inside the checkpoint directory and holds
        ``[offset, offset + length)``, and that no entry names an item the
        metadata lacks.
        """
        out: list[str] = []
        storage = self.storage
        expected: set[MetadataIndex] = set()
        for fqn, item in self.metadata.state_dict_metadata.items():
            if type(item) is TensorStorageMetadata:
                for i, c in enumerate(item.chunks):
                    key = MetadataIndex(fqn, c.offsets)
                    expected.add(key)
                    if key not in storage:
                        out.append(f"{fqn}: chunk {i} at offsets {c.offsets} has no storage entry")
            else:
                key = MetadataIndex(fqn)
                expected.add(key)
                if key not in storage:
                    out.append(f"{fqn}: bytes item has no storage entry")
        for key, info in storage.items():
            if key not in expected:
                out.append(f"storage entry {key} names no item in state_dict_metadata")
            if type(info) is not StorageInfo:
                continue
            rp = info.relative_path
            if _escapes(rp):
                out.append(f"{key.fqn}: file {rp!r} lies outside the checkpoint directory")
                continue
            size = self.files.get(rp)
            if size is None:
                out.append(f"{key.fqn}: file {rp} is missing")
            elif info.offset + info.length > size:
                out.append(
                    f"{key.fqn}: bytes [{info.offset}, {info.offset + info.length}) "
                    f"lie beyond the end of {rp} ({size} bytes)"
                )
        return out
