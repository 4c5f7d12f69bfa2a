"""The locator reads a ``torch.save`` archive's end records as torch's zip reader does.

torch reads archives with miniz: a zip64 end locator right before the end
record, pointing at a zip64 end record, makes that record's entry count and
central directory count whatever the 32-bit fields say; a record flagged as
a directory is extracted as no bytes. ckcore's locator must load the values
torch loads or raise a ``CorruptItem`` naming the item; it must never load
other values. Checked on hand-built archives and on a seeded mutation fuzz
of the end records and central directory of real ``torch.save`` archives.
"""

from __future__ import annotations

import io
import random
import struct

import pytest
import torch

from ckcore._torchsave import CorruptItem, UnsupportedItem, locate_tensor

EOCD = b"PK\x05\x06"


def saved(t: torch.Tensor) -> bytes:
    b = io.BytesIO()
    torch.save(t, b)
    return b.getvalue()


def torch_load(data: bytes):
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal
        return None


def ck_load(data: bytes):
    """The tensor the locator finds, or None when it raises CorruptItem/UnsupportedItem."""
    try:
        loc = locate_tensor(lambda n, off: data[off : off + n], 0, len(data), "ITEM")
    except (CorruptItem, UnsupportedItem) as e:
        assert "ITEM" in str(e)
        return None
    buf = bytearray(data[loc.data_offset : loc.data_offset + loc.storage_nbytes])
    flat = torch.frombuffer(buf, dtype=getattr(torch, loc.dtype)) if buf else torch.empty(0)
    return flat.as_strided(loc.size, loc.stride, loc.storage_offset)


def with_second_directory(item: bytes, other: bytes) -> bytes:
    """``item`` whose zip64 end record points at ``other``'s central directory, appended after it."""
    e_item, e_other = item.rfind(EOCD), other.rfind(EOCD)
    _, _, _, _, n, cd_size, cd_off, _ = struct.unpack_from("<4sHHHHIIH", other, e_other)
    shift = len(item)
    cd = bytearray(other[cd_off : cd_off + cd_size])
    p = 0
    for _ in range(n):
        nlen, elen, clen = struct.unpack_from("<HHH", cd, p + 28)
        (loff,) = struct.unpack_from("<I", cd, p + 42)
        struct.pack_into("<I", cd, p + 42, loff + shift)
        p += 46 + nlen + elen + clen
    (z64,) = struct.unpack_from("<Q", item, e_item - 20 + 8)
    out = bytearray(item + other[:cd_off] + bytes(cd))
    struct.pack_into("<QQQQ", out, z64 + 24, n, n, cd_size, shift + cd_off)
    return bytes(out)


@pytest.mark.parametrize("shape", [(8,), (40, 100)])
def test_the_zip64_end_record_counts_as_torch_counts_it(shape):
    zeros, sevens = saved(torch.zeros(shape)), saved(torch.full(shape, 7.0))
    item = with_second_directory(zeros, sevens)
    want = torch_load(item)
    assert want is not None and torch.equal(want, torch.full(shape, 7.0))
    assert torch.equal(ck_load(item), want)


def test_a_zip64_locator_pointing_past_the_archive_is_refused():
    data = bytearray(saved(torch.arange(6.0)))
    e = data.rfind(EOCD)
    struct.pack_into("<Q", data, e - 20 + 8, len(data))
    assert torch_load(bytes(data)) is None
    with pytest.raises(CorruptItem, match="zip64 end locator points past"):
        locate_tensor(lambda n, off: bytes(data[off : off + n]), 0, len(data), "ITEM")


def test_a_data_record_marked_as_a_directory_is_refused():
    # torch extracts it as no bytes and returns whatever its buffer held.
    data = bytearray(saved(torch.arange(3000, dtype=torch.float32)))
    e = data.rfind(EOCD)
    _, _, _, _, n, _, p, _ = struct.unpack_from("<4sHHHHIIH", data, e)
    for _ in range(n):
        nlen, elen, clen = struct.unpack_from("<HHH", data, p + 28)
        if data[p + 46 : p + 46 + nlen].endswith(b"data/0"):
            data[p + 38] |= 0x10
        p += 46 + nlen + elen + clen
    with pytest.raises(CorruptItem, match="marked as a directory"):
        locate_tensor(lambda n, off: bytes(data[off : off + n]), 0, len(data), "ITEM")


def test_mutated_end_records_load_torchs_values_or_are_refused():
    # 1,500 mutations of 1-3 bytes or fields in the end records and the
    # central directory: whenever both load, the values are equal.
    rng = random.Random(20261130)
    bases = [saved(torch.arange(3000, dtype=torch.float32).reshape(30, 100)), saved(torch.arange(5))]
    both = refused = 0
    for _ in range(1500):
        orig = rng.choice(bases)
        data = bytearray(orig)
        e = orig.rfind(EOCD)
        _, _, _, _, n, cd_size, cd_off, _ = struct.unpack_from("<4sHHHHIIH", orig, e)
        lo, hi = rng.choice([(e - 76, e + 22), (cd_off, cd_off + cd_size), (e - 20, e)])
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(lo, hi)
            if rng.random() < 0.5:
                data[i] = rng.randrange(256)
            else:
                w = rng.choice([2, 4, 8])
                i -= i % w
                v = rng.choice([0, 1, 44, 56, n, cd_size, cd_off, len(orig), 0xFFFF, 0xFFFFFFFF,
                                rng.randrange(1 << (8 * w))])
                data[i : i + w] = (v % (1 << (8 * w))).to_bytes(w, "little")
        data = bytes(data)
        want, got = torch_load(data), ck_load(data)
        if got is not None and want is not None:
            both += 1
            assert isinstance(want, torch.Tensor) and torch.equal(got, want), data.hex()
        elif got is None:
            refused += 1
    assert both > 100 and refused > 100  # the fuzz reached both outcomes


def _rebuilt(entries: list[tuple[str, bytes]]) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return out.getvalue()


def _entries(t: torch.Tensor) -> list[tuple[str, bytes]]:
    import zipfile

    z = zipfile.ZipFile(io.BytesIO(saved(t)))
    return [(i.filename, z.read(i)) for i in z.infolist()]


SEVENS = torch.full((4,), 7.0).numpy().tobytes()


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", ["upper_names", "nested_data_pkl_first", "xdata_pkl_first",
                                  "outside_the_folder", "folder_in_other_case",
                                  "duplicate_data_record", "no_folder"])
def test_records_are_found_by_name_as_torch_finds_them(case):
    base = _entries(torch.arange(4.0))
    entries = {
        "upper_names": [(n[:8] + n[8:].upper(), v) for n, v in base],
        "nested_data_pkl_first": [("archive/sub/data.pkl", base[0][1])] + base,
        "xdata_pkl_first": [("archive/xdata.pkl", base[0][1])] + base,
        "outside_the_folder": base + [("other/x", b"1")],
        "folder_in_other_case": [(n.replace("archive/", "ARCHIVE/"), v) if n.endswith("data.pkl")
                                 else (n, v) for n, v in base],
        "duplicate_data_record": base + [("archive/data/0", SEVENS)],
        "no_folder": [(n.replace("archive/", ""), v) for n, v in base],
    }[case]
    data = _rebuilt(entries)
    want, got = torch_load(data), ck_load(data)
    if case == "duplicate_data_record":
        assert got is None  # which copy torch takes depends on miniz's sort
    elif want is None:
        assert got is None, case
    else:
        assert got is not None and torch.equal(got, want), case


def test_an_empty_storage_record_is_not_read_as_torch_does_not_read_it():
    # torch reads nothing for a 0-byte record, not even its local header.
    data = bytearray(saved(torch.empty(0, 3)))
    e = data.rfind(EOCD)
    _, _, _, _, n, _, p, _ = struct.unpack_from("<4sHHHHIIH", data, e)
    for _ in range(n):
        nlen, elen, clen = struct.unpack_from("<HHH", data, p + 28)
        (loff,) = struct.unpack_from("<I", data, p + 42)
        if data[p + 46 : p + 46 + nlen].endswith(b"data/0"):
            data[loff : loff + 4] = b"XXXX"
        p += 46 + nlen + elen + clen
    want = torch_load(bytes(data))
    assert want is not None and want.shape == (0, 3)
    got = ck_load(bytes(data))
    assert got is not None and got.shape == (0, 3) and got.dtype == want.dtype
