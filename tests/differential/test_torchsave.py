"""Locating tensor bytes inside real torch.save archives and DCP files, without torch.load.

Every located tensor is rebuilt from the raw file bytes with numpy (using the
located base, strides and dtype) and compared bit for bit with the tensor
torch saved.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckcore._torchsave import CorruptItem, UnsupportedItem, locate_tensor

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as raw little-endian bytes, (numel, itemsize) uint8."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size()).numpy()


def rebuild(path: str, loc) -> np.ndarray:
    """The located tensor's elements from the file, via numpy strides, as (numel, itemsize) bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    isz = loc.itemsize
    if any(s == 0 for s in loc.size):
        return np.empty((0, isz), np.uint8)
    rows = np.lib.stride_tricks.as_strided(
        raw[loc.base :],
        shape=loc.size + (isz,),
        strides=tuple(s * isz for s in loc.stride) + (1,),
    )
    return rows.reshape(-1, isz)


CASES = {
    "f32": torch.randn(7, 5),
    "transposed": torch.randn(6, 9).t(),
    "permuted3d": torch.randn(3, 4, 5).permute(2, 0, 1),
    "bf16": torch.randn(33, 3, dtype=torch.bfloat16),
    "f8": torch.randn(16, 4).to(torch.float8_e4m3fn),
    "f8_e5m2_t": torch.randn(4, 16).to(torch.float8_e5m2).t(),
    "f16": torch.randn(10, dtype=torch.float16),
    "c64": torch.randn(4, 3, dtype=torch.complex64),
    "bool": torch.rand(9) > 0.5,
    "i64_0d": torch.tensor(123456789012),
    "empty": torch.empty(0, 4),
    "u8": torch.arange(200, dtype=torch.uint8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_locate_in_dcp_file(tmp_path, name):
    t = CASES[name]
    sd = {"pad": torch.randn(3), name: t, "after": torch.randn(2, 2)}
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    md = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    (_, info), = [(k, v) for k, v in md.storage_data.items() if k.fqn == name]
    path = os.path.join(str(tmp_path), info.relative_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        loc = locate_tensor(fd, info.offset, info.length, f"{path}:{name}")
    finally:
        os.close(fd)
    assert loc.dtype == str(t.dtype).removeprefix("torch.")
    assert loc.itemsize == t.element_size()
    assert loc.size == tuple(t.shape)
    assert info.offset <= loc.data_offset <= info.offset + info.length - loc.storage_nbytes
    np.testing.assert_array_equal(rebuild(path, loc), bits(t))
    if name == "transposed":
        assert loc.stride == (1, 9)  # torch.save keeps the strides


def test_locate_with_storage_offset_and_callable_pread(tmp_path):
    # torch.save of a view keeps the whole storage and a storage offset
    base = torch.arange(100, dtype=torch.float64)
    view = base[10:70].reshape(6, 10)[:, 2:7]
    buf = io.BytesIO()
    buf.write(b"x" * 1000)  # the item sits at an offset inside the file, as in .distcp files
    torch.save(view, buf)
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    calls = []
    data = buf.getvalue()

    def pread(n, off):
        calls.append((n, off))
        return data[off : off + n]

    loc = locate_tensor(pread, 1000, len(data) - 1000, "item")
    assert loc.storage_offset == 12 and loc.stride == (10, 1) and loc.size == (6, 5)
    assert loc.storage_nbytes == 800
    np.testing.assert_array_equal(rebuild(path, loc), bits(view))
    assert all(off >= 1000 for _, off in calls)  # never reads outside the item


def test_unsupported_items_fall_back():
    for obj in (torch.randn(3, dtype=torch.complex64).conj(), torch.nn.Parameter(torch.randn(2))):
        buf = io.BytesIO()
        torch.save(obj, buf)
        d = buf.getvalue()
        with pytest.raises(UnsupportedItem):
            locate_tensor(lambda n, off, d=d: d[off : off + n], 0, len(d), "x")
    buf = io.BytesIO()
    torch.save(torch.randn(3), buf, _use_new_zipfile_serialization=False)
    d = buf.getvalue()
    with pytest.raises(UnsupportedItem, match="legacy"):
        locate_tensor(lambda n, off: d[off : off + n], 0, len(d), "x")
    # a pickle that names anything off the allow-list is refused before it runs
    buf = io.BytesIO()
    torch.save({"a": torch.randn(2)}, buf)
    d = buf.getvalue()
    with pytest.raises(UnsupportedItem, match="not a plain tensor"):
        locate_tensor(lambda n, off: d[off : off + n], 0, len(d), "x")


def _saved(t=None) -> bytes:
    buf = io.BytesIO()
    torch.save(torch.randn(50, 20) if t is None else t, buf)
    return buf.getvalue()


def test_truncated_and_corrupted_items_name_the_item():
    d = _saved()
    # truncated: the pread returns fewer bytes than the item claims
    with pytest.raises(CorruptItem, match=r"f\.distcp:w.*truncated"):
        locate_tensor(lambda n, off: d[off : off + n], 0, len(d) + 100, "f.distcp:w")
    # the end record is gone
    with pytest.raises(CorruptItem, match="f.distcp:w"):
        locate_tensor(lambda n, off: d[off : off + n], 0, len(d) - 30, "f.distcp:w")
    # the central directory is damaged
    bad = bytearray(d)
    cd = bad.rfind(b"PK\x01\x02")
    bad[cd : cd + 4] = b"XXXX"
    bad = bytes(bad)
    with pytest.raises(CorruptItem, match="central directory"):
        locate_tensor(lambda n, off: bad[off : off + n], 0, len(bad), "w")
    # the pickle is damaged
    bad = bytearray(d)
    p = bad.find(b"_rebuild_tensor_v2")
    bad[p : p + 8] = b"\xff" * 8
    bad = bytes(bad)
    with pytest.raises((CorruptItem, UnsupportedItem)):
        locate_tensor(lambda n, off: bad[off : off + n], 0, len(bad), "w")
    with pytest.raises(CorruptItem, match="too short"):
        locate_tensor(lambda n, off: d[off : off + n], 0, 10, "w")
    assert issubclass(CorruptItem, ValueError)


def test_large_archive_reads_only_records():
    # a 4 MB tensor: locating it reads the head and tail records, not the data
    d = _saved(torch.randn(1024, 1024))
    read = []

    def pread(n, off):
        read.append(n)
        return d[off : off + n]

    loc = locate_tensor(pread, 0, len(d), "w")
    assert loc.storage_nbytes == 4 << 20
    assert sum(read) <= 16 << 10
