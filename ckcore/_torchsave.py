"""Where a tensor's bytes sit inside a ``torch.save`` archive, without torch.

DCP's ``FileSystemWriter`` (default ``SerializationFormat.TORCH_SAVE``) writes
every tensor item as a complete ``torch.save`` zip archive at
``(offset, length)`` inside a ``.distcp`` file (``filesystem._write_item``).
The archive holds ``<prefix>/data.pkl`` (a pickle that calls
``torch._utils._rebuild_tensor_v2``/``_v3`` with a persistent storage id,
the storage offset, size and strides) and one uncompressed record
``<prefix>/data/<key>`` with the storage bytes, plus ``byteorder`` and
version records. The zip local headers carry no sizes (data descriptors),
so the central directory at the end of the archive is the authority.

:func:`locate_tensor` reads the archive's end records and its pickle with an
allow-list unpickler (no ``torch.load``, no arbitrary code), and returns
where storage element 0 sits in the file plus the tensor's dtype, storage
offset, size and strides. Anything outside what it can prove is either
:class:`UnsupportedItem` (the caller should fall back to ``torch.load``) or
:class:`CorruptItem` (a ``ValueError`` naming the file and item).

``SerializationFormat.SAFETENSORS`` is not handled here: torch 2.13's writer
records an offset taken *before* the data is written and appends one
safetensors file per ``.distcp`` file at the end, so its ``_StorageInfo``
does not locate the tensor, and ``FileSystemReader`` cannot read it either
(``HuggingFaceStorageReader`` does). The range reader falls back for it.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckcore._saferepr import saferepr
from ckcore.checkpoint import CheckpointError
from ckcore.dtypes import DTYPE_ITEMSIZE

__all__ = ["CorruptItem", "TensorLocation", "UnsupportedItem", "locate_tensor"]

# Legacy typed-storage classes that torch.save names in the pickle
# (torch/storage.py: _LegacyStorage subclasses) and their dtypes.
_LEGACY_STORAGE = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

_EOCD = b"PK\x05\x06"
_EOCD64_LOC = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CDIR = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_HEAD = 4096  # first/last bytes of an item read up front: they hold every record but the storage
# How far back from an archive's end torch's zip reader (miniz,
# mz_zip_reader_locate_header_sig) looks for the end-of-central-directory
# record: 4096-byte blocks scanned backwards, each overlapping the next by 3
# bytes, until a block that starts 65535 + 22 bytes or more from the end. The
# last record that starts in the last 4096 + 16 * 4093 bytes with its 22 bytes
# inside the archive is the one: past a zip comment (up to 65535 bytes)
# torch.load accepts 69562 trailing bytes after a bare record, not one more.
# (miniz means to clamp a block's start at the archive's byte 0 but computes
# it unsigned, so a record in the archive's first 4093 bytes that the blocks
# starting at or after byte 0 miss is looked for in a block starting before
# the item: torch.load of the item's bytes fails ("negative seek value"), and
# FileSystemReader reads the bytes in front of the item, failing only for an
# item at the start of its file. This searches the item's own bytes, as
# miniz means to, and loads such an item wherever it sits.)
_EOCD_REACH = 4096 + 16 * 4093


class UnsupportedItem(Exception):
    """The item is valid but not in a form the range reader handles (fall back to torch.load)."""


class CorruptItem(CheckpointError):
    """The item's bytes are not a well-formed torch.save archive (truncated or damaged).

    A :class:`~ckcore.checkpoint.CheckpointError` (so a ``ValueError``): the
    checkpoint's files do not hold what its metadata says.
    """


@dataclass(frozen=True)
class TensorLocation:
    """A saved tensor inside a file: storage element 0 is at byte ``data_offset``."""

    data_offset: int
    storage_nbytes: int
    dtype: str
    itemsize: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def base(self) -> int:
        """File byte of the tensor's element 0 (``data_offset + storage_offset * itemsize``)."""
        return self.data_offset + self.storage_offset * self.itemsize


# ----------------------------------------------------------------- unpickling

class _NoBuild:
    # A pickle can apply BUILD to any object on its stack, and BUILD writes
    # straight into the instance (past a frozen dataclass's __setattr__).
    # The objects the allow-list hands out refuse it, so a storage type or
    # dtype always holds the name the allow-list gave it; the error is
    # raised inside load() and reported as a CorruptItem.
    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"BUILD on {type(self).__name__}")


@dataclass(frozen=True)
class _StorageType(_NoBuild):
    dtype: str | None  # None: UntypedStorage (the dtype comes with _rebuild_tensor_v3)


@dataclass(frozen=True)
class _Dtype(_NoBuild):
    name: str


@dataclass(frozen=True)
class _Storage(_NoBuild):
    dtype: str | None
    key: str
    numel: int


@dataclass(frozen=True)
class _Rebuilt(_NoBuild):
    storage: Any
    storage_offset: Any
    size: Any
    stride: Any
    dtype: Any
    metadata: Any


def _rebuild_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    return _Rebuilt(storage, storage_offset, size, stride, None, metadata)


def _rebuild_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _Rebuilt(storage, storage_offset, size, stride, dtype, metadata)


class _AllowListUnpickler(pickle.Unpickler):
    # Only the globals a plain tensor's data.pkl names; everything else is
    # refused before it can run.
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _LEGACY_STORAGE:
            return _StorageType(_LEGACY_STORAGE[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch" and name in DTYPE_ITEMSIZE:
            return _Dtype(name)
        raise UnsupportedItem(f"data.pkl names {module}.{name}, which is not on the allow-list")

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            return _Storage(pid[1].dtype, pid[2], pid[4])
        raise UnsupportedItem(f"unsupported persistent id {saferepr(pid)}")


def _int_tuple(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, tuple) and all(type(x) is int and x >= 0 for x in v):
        return v
    return None


# ----------------------------------------------------------------- zip records


@dataclass
class _Record:
    name: str
    method: int
    csize: int
    usize: int
    local_offset: int
    # miniz's directory test: torch extracts such a record as no bytes and
    # reads a buffer it never filled, so its values are not the file's.
    directory: bool = False


class _ItemBytes:
    """Reads inside one item's byte range, serving small reads from its head and tail."""

    def __init__(self, pread: Callable[[int, int], bytes], where: str, offset: int, length: int):
        self.pread = pread
        self.where = where
        self.offset = offset
        self.length = length
        n = min(length, _HEAD)
        self.head = self._read_exact(0, n)
        if length <= _HEAD:
            self.tail_start, self.tail = 0, self.head
        else:
            self.tail_start = length - n
            self.tail = self._read_exact(self.tail_start, n)

    def _read_exact(self, rel: int, n: int) -> bytes:
        b = self.pread(n, self.offset + rel)
        if len(b) != n:
            raise CorruptItem(
                f"{self.where}: file truncated: wanted {n} bytes at offset {self.offset + rel}, "
                f"got {len(b)}"
            )
        return b

    def widen_tail(self) -> None:
        """Extend the tail to the last :data:`_EOCD_REACH` bytes (at most one more read).

        For an archive whose end record is not in the first tail read: a
        long zip comment or trailing bytes after the archive. The read takes
        only the item's bytes between its head and its tail (no byte twice),
        at most ``_EOCD_REACH - _HEAD`` (65488) bytes.
        """
        start = max(0, self.length - _EOCD_REACH)
        if start >= self.tail_start:
            return
        held = max(start, min(len(self.head), self.tail_start))  # head bytes up to here
        more = self._read_exact(held, self.tail_start - held) if held < self.tail_start else b""
        self.tail = self.head[start:held] + more + self.tail
        self.tail_start = start

    def read(self, rel: int, n: int) -> bytes:
        if rel < 0 or n < 0 or rel + n > self.length:
            raise CorruptItem(
                f"{self.where}: zip record at [{rel}, {rel + n}) lies outside the item's "
                f"{self.length} bytes"
            )
        if rel + n <= len(self.head):
            return self.head[rel : rel + n]
        if rel >= self.tail_start:
            return self.tail[rel - self.tail_start : rel - self.tail_start + n]
        return self._read_exact(rel, n)


def _unpack(where: str, fmt: str, buf: bytes, pos: int) -> tuple:
    try:
        return struct.unpack_from(fmt, buf, pos)
    except struct.error:
        raise CorruptItem(f"{where}: zip record cut short") from None


def _central_directory(item: _ItemBytes) -> list[_Record]:
    where = item.where
    # The last end record with its 22 bytes inside the item, as miniz finds
    # it: in the first tail read for any archive torch.save writes, else
    # (a zip comment, trailing bytes) within _EOCD_REACH of the end. Only an
    # item that starts with a local header is searched further: torch.load
    # reads nothing else as a zip archive.
    pos = item.tail.rfind(_EOCD, 0, len(item.tail) - 18)
    if pos < 0 and item.head[:4] == _LOCAL and 0 < item.tail_start and len(item.tail) < _EOCD_REACH:
        item.widen_tail()
        pos = item.tail.rfind(_EOCD, 0, len(item.tail) - 18)
    tail = item.tail
    if pos < 0:
        if item.head[:4] != _LOCAL and item.head[:1] == b"\x80":
            # A pickle: torch.save's legacy (pre-zip) format. Valid, not ours.
            raise UnsupportedItem(f"{where}: legacy (non-zip) torch.save format")
        raise CorruptItem(
            f"{where}: not a torch.save zip archive (no end-of-central-directory record in "
            f"its last {len(tail)} bytes)")
    eocd = item.tail_start + pos
    (_, this_disk, cd_disk, disk_entries, entries, cd_size, cd_off, _) = _unpack(
        where, "<4sHHHHIIH", tail, pos)
    # Zip64, as miniz reads it: a locator right before the end record that
    # points at a zip64 end record makes that record's fields count, whatever
    # the 32-bit ones say (torch.save writes both). An archive whose locator
    # points past the end is refused; a locator or record that does not
    # match its signature is ignored.
    if eocd >= 20 + 56:
        sig, _, z64_off, disks = _unpack(where, "<4sIQI", item.read(eocd - 20, 20), 0)
        if sig == _EOCD64_LOC:
            if z64_off > item.length - 56:
                raise CorruptItem(f"{where}: zip64 end locator points past the archive ({z64_off})")
            rec = item.read(z64_off, 56)
            if rec[:4] == _EOCD64:
                (_, rec_size, _, _, this_disk, cd_disk, disk_entries, entries, cd_size,
                 cd_off) = _unpack(where, "<4sQHHIIQQQQ", rec, 0)
                if rec_size < 44:
                    raise CorruptItem(f"{where}: zip64 end record of {rec_size} bytes")
                if disks != 1:
                    raise CorruptItem(f"{where}: a zip archive on {disks} disks")
                if max(entries, disk_entries, cd_size) > 0xFFFFFFFF:
                    raise CorruptItem(f"{where}: zip64 central directory of {entries} entries, "
                                      f"{cd_size} bytes")
    if entries != disk_entries or ((this_disk | cd_disk) and (this_disk, cd_disk) != (1, 1)):
        raise CorruptItem(f"{where}: a multi-disk zip archive")
    if cd_size < 46 * entries or cd_off + cd_size > item.length:
        raise CorruptItem(f"{where}: central directory of {entries} entries in {cd_size} bytes "
                          f"at {cd_off} does not fit the archive")
    cd = item.read(cd_off, cd_size)
    records = []
    p = 0
    for _ in range(entries):
        if cd_size - p < 46 or cd[p : p + 4] != _CDIR:
            raise CorruptItem(f"{where}: bad central directory entry at {cd_off + p}")
        (_, _, _, flags, method, _, _, _, csize, usize, nlen, elen, clen, disk, _, attrs, loff) = _unpack(
            where, "<4sHHHHHHIIIHHHHHII", cd, p
        )
        if 46 + nlen + elen + clen > cd_size - p:
            raise CorruptItem(f"{where}: central directory entry at {cd_off + p} runs past it")
        name = cd[p + 46 : p + 46 + nlen].decode("utf-8", "replace")
        extra = cd[p + 46 + nlen : p + 46 + nlen + elen]
        if disk == 0xFFFF or disk not in (this_disk, 1):
            raise CorruptItem(f"{where}: record {name} on another disk")
        if 0xFFFFFFFF not in (csize, loff) and loff + 30 + csize > item.length:
            raise CorruptItem(f"{where}: record {name} ends past the archive")
        if 0xFFFFFFFF in (csize, usize, loff):
            usize, csize, loff = _zip64_fields(where, name, extra, usize, csize, loff)
        if flags & 1:
            raise UnsupportedItem(f"{where}: encrypted zip record {name}")
        records.append(_Record(name, method, csize, usize, loff,
                               bool(attrs & 0x10) or name.endswith("/")))
        p += 46 + nlen + elen + clen
    return records


def _zip64_fields(where: str, name: str, extra: bytes, usize: int, csize: int,
                  loff: int) -> tuple[int, int, int]:
    """``(usize, csize, loff)`` with the 0xFFFFFFFF ones taken from the zip64 extra field.

    The extra field is a list of ``(id, length, data)`` blocks; block 1 holds
    the 8-byte values of the fields set to 0xFFFFFFFF, in that order. A block
    that claims more bytes than the field has is damage.
    """
    q = 0
    while q + 4 <= len(extra):
        hid, hlen = _unpack(where, "<HH", extra, q)
        if q + 4 + hlen > len(extra):
            raise CorruptItem(
                f"{where}: zip64 extra field of {name} claims {hlen} bytes, "
                f"{len(extra) - q - 4} are there")
        if hid == 1:
            vals = list(_unpack(where, f"<{hlen // 8}Q", extra, q + 4))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if loff == 0xFFFFFFFF and vals:
                loff = vals.pop(0)
            break
        q += 4 + hlen
    return usize, csize, loff


def _names(where: str, records: list[_Record]) -> Callable[[str], _Record | None]:
    """Record lookup by name as torch's reader does it: under the first record's folder, any case.

    torch takes the folder from the first record's name (up to its first
    ``/``), refuses an archive with a record outside it, and looks names up
    case-insensitively. Two records a name could mean are refused: which
    one torch takes depends on how miniz sorts them.
    """
    if not records:
        return lambda name: None
    slash = records[0].name.find("/")
    if slash < 0:
        raise CorruptItem(f"{where}: record {saferepr(records[0].name)} is not in a folder")
    folder = records[0].name[: slash + 1]
    by_name: dict[str, list[_Record]] = {}
    for r in records:
        if not r.name.startswith(folder):
            raise CorruptItem(f"{where}: record {saferepr(r.name)} is outside the archive's folder "
                              f"{saferepr(folder)}")
        by_name.setdefault(r.name[len(folder):].lower(), []).append(r)

    def lookup(name: str) -> _Record | None:
        found = by_name.get(name.lower())
        if found and len(found) > 1:
            raise CorruptItem(f"{where}: {len(found)} records named {saferepr(folder + name)}")
        return found[0] if found else None

    return lookup


def _record_bytes_offset(item: _ItemBytes, rec: _Record) -> int:
    if rec.directory:
        raise CorruptItem(f"{item.where}: record {rec.name} is marked as a directory")
    hdr = item.read(rec.local_offset, 30)
    if hdr[:4] != _LOCAL:
        raise CorruptItem(f"{item.where}: bad local header for {rec.name}")
    nlen, elen = _unpack(item.where, "<HH", hdr, 26)
    start = rec.local_offset + 30 + nlen + elen
    if start + rec.csize > item.length:
        raise CorruptItem(
            f"{item.where}: record {rec.name} ends at {start + rec.csize}, past the item's "
            f"{item.length} bytes (truncated?)"
        )
    return start


def locate_tensor(
    pread: Callable[[int, int], bytes] | int,
    offset: int,
    length: int,
    where: str = "item",
) -> TensorLocation:
    """Find a ``torch.save``'d tensor's storage inside ``[offset, offset + length)`` of a file.

    ``pread`` is an open file descriptor or a callable ``(n, file_offset) -> bytes``
    (so callers can count reads). ``where`` names the file and item in error
    messages. Raises :class:`UnsupportedItem` for archives it does not handle
    (compressed records, big-endian, tensors with conj/neg bits, subclasses, ...)
    and :class:`CorruptItem` (a ValueError) for damaged or truncated ones.
    """
    if isinstance(pread, int):
        fd = pread

        def pread(n: int, off: int) -> bytes:
            return os.pread(fd, n, off)

    if length < 22:
        raise CorruptItem(f"{where}: {length} bytes is too short for a torch.save archive")
    item = _ItemBytes(pread, where, offset, length)
    lookup = _names(where, _central_directory(item))
    pkl = lookup("data.pkl")
    if pkl is None:
        raise CorruptItem(f"{where}: archive has no data.pkl")
    if pkl.method != 0:
        raise UnsupportedItem(f"{where}: data.pkl is compressed")
    bo = lookup("byteorder")
    if bo is not None:
        if bo.method != 0:
            raise UnsupportedItem(f"{where}: byteorder record is compressed")
        order = item.read(_record_bytes_offset(item, bo), bo.usize)
        if order != b"little":
            raise UnsupportedItem(f"{where}: byte order {order!r} is not little-endian")
    pkl_bytes = item.read(_record_bytes_offset(item, pkl), pkl.usize)
    try:
        obj = _AllowListUnpickler(io.BytesIO(pkl_bytes)).load()
    except UnsupportedItem as e:
        raise UnsupportedItem(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise anything
        raise CorruptItem(f"{where}: data.pkl does not unpickle: {e}") from None
    if not isinstance(obj, _Rebuilt) or not isinstance(obj.storage, _Storage):
        raise UnsupportedItem(f"{where}: data.pkl is not a plain tensor ({type(obj).__name__})")
    if obj.metadata:
        raise UnsupportedItem(
            f"{where}: tensor carries metadata {saferepr(obj.metadata)} (conj/neg bits)")
    st = obj.storage
    if st.dtype is not None:
        dtype = st.dtype
        if obj.dtype is not None:
            raise UnsupportedItem(f"{where}: typed storage with an explicit dtype")
    elif isinstance(obj.dtype, _Dtype):
        dtype = obj.dtype.name
    else:
        raise UnsupportedItem(f"{where}: untyped storage without a dtype")
    itemsize = DTYPE_ITEMSIZE[dtype]
    size, stride = _int_tuple(obj.size), _int_tuple(obj.stride)
    soff = obj.storage_offset
    if size is None or stride is None or len(size) != len(stride) or type(soff) is not int or soff < 0:
        raise CorruptItem(f"{where}: bad size/stride/offset in data.pkl")
    # Untyped storages count bytes; typed ones count elements.
    nbytes = st.numel * (itemsize if st.dtype is not None else 1)
    rec = lookup(f"data/{st.key}")
    if rec is None:
        raise CorruptItem(f"{where}: archive has no record for storage {st.key!r}")
    if rec.method != 0:
        raise UnsupportedItem(f"{where}: storage record is compressed")
    if rec.usize != nbytes or rec.csize != nbytes:
        raise CorruptItem(
            f"{where}: storage record holds {rec.usize} bytes, the pickle says {nbytes}"
        )
    if all(s > 0 for s in size):
        last = soff + sum((s - 1) * t for s, t in zip(size, stride)) + 1
        if last * itemsize > nbytes:
            raise CorruptItem(f"{where}: tensor reaches past its storage ({last * itemsize} > {nbytes})")
    # torch reads nothing for an empty record, not even its local header.
    data = _record_bytes_offset(item, rec) if nbytes else 0
    return TensorLocation(
        data_offset=offset + data,
        storage_nbytes=nbytes,
        dtype=dtype,
        itemsize=itemsize,
        storage_offset=soff,
        size=size,
        stride=stride,
    )
