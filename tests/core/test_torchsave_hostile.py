"""Hostile bytes for the torch.save locator: only CorruptItem or UnsupportedItem may come out.

The records are real ``torch.save`` archives from the checkpoint fixture
(tests/data/dcp_small, written by torch), so this module runs without torch.
Whatever the damage, :func:`locate_tensor` either locates a tensor, raises
:class:`CorruptItem` (damage) or raises :class:`UnsupportedItem` (the damaged
bytes now read as a valid archive it does not handle, e.g. a flipped
compression method, which a caller sends to ``torch.load``). Anything else
escaping (``struct.error``, ``KeyError``, ...) is a bug.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile

import pytest

from ckcore._torchsave import CorruptItem, UnsupportedItem, locate_tensor
from ckcore.checkpoint import load_metadata
from tests.support.paths import DATA

FIXTURE = str(DATA / "dcp_small")


def _tensor_records() -> list[bytes]:
    md = load_metadata(FIXTURE)
    out = []
    for idx, info in md.storage_data.items():
        if idx.offset is None:  # bytes items are pickles, not tensor archives
            continue
        with open(os.path.join(FIXTURE, info.relative_path), "rb") as f:
            f.seek(info.offset)
            out.append(f.read(info.length))
    return out


RECORDS = _tensor_records()


def _locate(data: bytes):
    return locate_tensor(lambda n, off: data[off : off + n], 0, len(data), "item")


def test_fixture_records_locate():
    assert len(RECORDS) >= 3
    for d in RECORDS:
        _locate(d)


def _cd_entry(data: bytes, name: str) -> int:
    """Position of the central directory entry of ``name`` in a zip archive."""
    p = data.rfind(b"PK\x01\x02")
    while p >= 0:
        nlen = struct.unpack_from("<H", data, p + 28)[0]
        if data[p + 46 : p + 46 + nlen] == name.encode():
            return p
        p = data.rfind(b"PK\x01\x02", 0, p)
    raise AssertionError(f"no central directory entry for {name}")


def _archive(pkl: bytes, extra: bytes = b"") -> bytes:
    """A stored zip laid out as torch.save lays out a one-tensor archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        info = zipfile.ZipInfo("archive/data.pkl")
        info.extra = extra
        z.writestr(info, pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", b"\0" * 8)
    return buf.getvalue()


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _pickle(after_storage_type: bytes = b"") -> bytes:
    """data.pkl of a float32 tensor of size (2,) (protocol 2 opcodes, as torch writes them)."""
    pid = (b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + after_storage_type
           + _s("0") + _s("cpu") + b"K\x02t")
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + pid
            + b"QK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")


def test_handmade_archive_locates():
    loc = _locate(_archive(_pickle()))
    assert (loc.dtype, loc.size, loc.stride, loc.storage_nbytes) == ("float32", (2,), (1,), 8)


def test_zip64_extra_field_shorter_than_it_claims_is_corrupt():
    # The central directory defers data.pkl's compressed size to a zip64
    # extra block that claims 24 bytes and holds 8.
    extra = struct.pack("<HH", 1, 24) + struct.pack("<Q", 100)
    data = bytearray(_archive(_pickle(), extra))
    p = _cd_entry(bytes(data), "archive/data.pkl")
    data[p + 20 : p + 24] = b"\xff\xff\xff\xff"
    with pytest.raises(CorruptItem, match="zip64 extra field of archive/data.pkl claims 24"):
        _locate(bytes(data))


def test_zip64_extra_field_read_when_complete():
    # The same deferral with a complete block: the size comes from it.
    good = _archive(_pickle())
    pkl_len = len(_pickle())
    extra = struct.pack("<HH", 1, 8) + struct.pack("<Q", pkl_len)
    data = bytearray(_archive(_pickle(), extra))
    p = _cd_entry(bytes(data), "archive/data.pkl")
    data[p + 20 : p + 24] = b"\xff\xff\xff\xff"
    assert _locate(bytes(data)).storage_nbytes == _locate(good).storage_nbytes


@pytest.mark.parametrize("state", [
    b"}" + _s("dtype") + _s("weird") + b"s",   # a dtype the allow-list never gave
    b"}" + _s("dtype") + b"]s",                # an unhashable one
], ids=["foreign-dtype", "unhashable-dtype"])
def test_pickle_build_on_allow_listed_objects_is_refused(state):
    # BUILD (opcode b) on the storage type the allow-list returned would
    # rewrite its dtype; the locator must refuse, not fail on the result.
    with pytest.raises(CorruptItem, match="BUILD"):
        _locate(_archive(_pickle(state + b"b")))


def _check(data: bytes) -> None:
    try:
        _locate(data)
    except (CorruptItem, UnsupportedItem):
        pass


def test_truncations_raise_only_corrupt_item():
    for d in RECORDS[:3]:
        for n in range(len(d)):
            with pytest.raises((CorruptItem, UnsupportedItem)):
                _locate(d[:n])


def test_bit_flips_raise_only_locator_errors():
    rng = random.Random(20240611)
    for d in RECORDS:
        for _ in range(300):
            bad = bytearray(d)
            for _ in range(rng.choice((1, 1, 2, 8))):
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            _check(bytes(bad))


def test_byte_overwrites_in_the_records_raise_only_locator_errors():
    # The zip records sit in the first and last few hundred bytes: overwrite
    # every byte there with values that make lengths and offsets extreme.
    for d in RECORDS[:2]:
        head = range(min(len(d), 160))
        tail = range(max(0, len(d) - 200), len(d))
        for pos in (*head, *tail):
            for v in (0x00, 0x7F, 0xFF):
                bad = bytearray(d)
                bad[pos] = v
                _check(bytes(bad))


# ------------------------------------------------- bytes after the end record

# torch.load (miniz) finds the end-of-central-directory record when it starts
# in the archive's last 4096 + 16 * 4093 bytes with its 22 bytes inside: a
# zip comment of up to 65535 bytes, or up to 69562 bytes after a bare record.
# tests/differential/test_archive_tail.py checks the same tails against torch.
_REACH = 4096 + 16 * 4093


def _with_comment(d: bytes, n: int) -> bytes:
    eocd = len(d) - 22
    assert d[eocd : eocd + 4] == b"PK\x05\x06"
    return d[: eocd + 20] + struct.pack("<H", n) + b"c" * n


def _counted(data: bytes):
    reads: list[tuple[int, int]] = []

    def pread(n, off):
        assert 0 <= off and off + n <= len(data), (off, n, len(data))
        reads.append((off, n))
        return data[off : off + n]

    return pread, reads


@pytest.mark.parametrize("tail", [
    b"", b"j" * 2000, b"j" * 5120, b"j" * 61440, b"j" * (_REACH - 22),
    b"j" * 5000 + b"PK\x05\x06" + b"\0" * 17,  # a record cut short is not one (miniz skips it)
])
def test_trailing_bytes_within_torchs_reach_locate(tail):
    for d in RECORDS[:2]:
        want = _locate(d)
        data = d + tail
        pread, reads = _counted(data)
        assert locate_tensor(pread, 0, len(data), "item") == want
        if len(data) <= 4096:
            assert len(reads) == 1  # the whole item, as before
        else:
            # head and tail; for a record not in the tail, at most one read
            # more, of bytes between them (none twice), at most 65488 of them
            head, last, *more = reads
            assert head == (0, 4096) and last == (len(data) - 4096, 4096)
            assert len(more) <= (0 if len(tail) + 22 <= 4096 else 1)
            assert all(4096 <= off and off + n <= len(data) - 4096 and n <= _REACH - 4096
                       for off, n in more)


@pytest.mark.parametrize("n", [100, 5000, 65535])
def test_zip_comment_locates(n):
    for d in RECORDS[:2]:
        assert _locate(_with_comment(d, n)) == _locate(d)
    assert _locate(_with_comment(RECORDS[0], 65535) + b"j" * (_REACH - 22 - 65535)) == _locate(RECORDS[0])


@pytest.mark.parametrize("data", [
    RECORDS[0] + b"j" * (_REACH - 21),
    RECORDS[0] + b"j" * 71680,
    _with_comment(RECORDS[0], 65535) + b"j" * (_REACH - 21 - 65535),
])
def test_end_record_past_torchs_reach_is_corrupt(data):
    pread, reads = _counted(data)
    with pytest.raises(CorruptItem, match=r"^item: .*no end-of-central-directory record in its last 69584 bytes"):
        locate_tensor(pread, 0, len(data), "item")
    # the item's own bytes only, the search at most 65488 bytes past head and tail
    start = max(4096, len(data) - _REACH)
    assert len(reads) == 3 and reads[2] == (start, len(data) - 4096 - start)
    assert reads[2][1] <= _REACH - 4096


def test_a_stray_end_record_in_the_tail_wins_as_in_miniz():
    # The last record (with its 22 bytes inside) is the one: junk that holds
    # an empty one makes the archive empty, for torch and for the locator.
    with pytest.raises(CorruptItem, match="no data.pkl"):
        _locate(RECORDS[0] + b"j" * 5000 + b"PK\x05\x06" + b"\0" * 18)


def test_no_wider_search_for_an_item_that_is_not_a_zip():
    # torch.load reads an item as a zip only when it starts with a local header
    data = b"\0" * 20000
    pread, reads = _counted(data)
    with pytest.raises(CorruptItem, match="in its last 4096 bytes"):
        locate_tensor(pread, 0, len(data), "item")
    assert len(reads) == 2
