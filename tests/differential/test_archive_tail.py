"""Storage items whose archive has bytes after its end record load as torch loads them.

torch.load (miniz) finds a zip archive's end-of-central-directory record when
it starts in the archive's last 4096 + 16 * 4093 bytes (with its 22 bytes
inside): behind a zip comment of up to 65535 bytes, or up to 69562 bytes of
anything after a bare record. A DCP item whose storage entry covers such
bytes is loaded by ``FileSystemReader``; ``RangeFileSystemReader`` must
load it too (the same values) and must refuse, with a ``CorruptItem`` naming
the file and item, what torch refuses.

The items are tampered in a real ``dcp.save`` checkpoint: the ``.distcp``
file is rewritten with the bytes added to one item, the items after it
moved, and the metadata's storage entries (offset, length) rewritten to
match. Each tail is loaded whole, as a row box (the located path: archive
records, then the box's byte ranges) and as a column box (the item read
whole in one request and located in memory), with 1 and 2 worker threads.

A tail that searches further than the first 4 KiB costs the located path
one request (the bytes between the item's head and tail windows), and one
more when the central directory then lies before the searched bytes;
everything else reads as before.
"""

from __future__ import annotations

import pathlib
import pickle
import struct

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore.dcp.reader import RangeFileSystemReader
from tests.support.dcp_sim import BoxLoadPlanner

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

_EOCD = b"PK\x05\x06"
REACH = 4096 + 16 * 4093  # torch finds the end record this far from the archive's end


def state_dict():
    g = torch.Generator().manual_seed(11)
    return {
        "s": torch.arange(4.0),  # a small archive, first in its file
        "w": torch.randn(64, 1100, generator=g),  # 275 KiB: rows of 4400 bytes
        "t": torch.arange(5),  # a small archive after w
    }


def comment(n):
    """A zip comment of ``n`` bytes: the end record's comment length set, the bytes appended."""
    def edit(item):
        eocd = len(item) - 22
        assert item[eocd : eocd + 4] == _EOCD
        return item[: eocd + 20] + struct.pack("<H", n) + b"c" * n
    return edit


def junk(n, end=b""):
    """``n`` bytes after the archive (not a zip comment), then ``end``."""
    return lambda item: item + (b"junk" * (n // 4 + 1))[:n] + end


def then(*edits):
    def edit(item):
        for e in edits:
            item = e(item)
        return item
    return edit


# name: (edit, torch loads it, extra requests on w's located path)
TAILS = {
    "comment_100": (comment(100), True, 0),  # in the 4 KiB tail window, as before
    "comment_5000": (comment(5000), True, 1),
    "comment_60000": (comment(60000), True, 1),
    "comment_65535": (comment(65535), True, 1),
    "junk_5k": (junk(5 << 10), True, 1),
    "junk_60k": (junk(60 << 10), True, 1),
    # torch's last byte: the end record starts REACH bytes from the end, so
    # the zip64 locator, the zip64 end record and the central directory lie
    # before the searched bytes (one read more each, as miniz reads them)
    "junk_69562": (junk(REACH - 22), True, 4),
    "comment_65535_junk_4027": (then(comment(65535), junk(REACH - 22 - 65535)), True, 4),
    # a signature with fewer than 22 bytes after it is no end record (miniz skips it)
    "junk_cut_record": (junk(5000, _EOCD + b"\0" * 17), True, 1),
    "junk_69563": (junk(REACH - 21), False, None),
    "junk_70k": (junk(70 << 10), False, None),
    "comment_65535_junk_4028": (then(comment(65535), junk(REACH - 21 - 65535)), False, None),
    # an empty end record in the junk is the last one: an empty archive
    "junk_stray_record": (junk(5000, _EOCD + b"\0" * 18), False, None),
}


def tamper(path, fqn, edit):
    """Rewrite ``fqn``'s item in its ``.distcp`` file as ``edit(item)``; move the rest, fix the metadata."""
    path = pathlib.Path(path)
    md = FileSystemReader(str(path)).read_metadata()
    md.storage_meta.load_id = None  # not in files FileSystemWriter writes
    (key,) = [k for k in md.storage_data if k.fqn == fqn]
    rel = md.storage_data[key].relative_path
    entries = sorted((v.offset, k) for k, v in md.storage_data.items() if v.relative_path == rel)
    data = (path / rel).read_bytes()
    out, pos = bytearray(), 0
    for _, k in entries:
        info = md.storage_data[k]
        out += data[pos : info.offset]  # whatever lies between items, as it was
        item = data[info.offset : info.offset + info.length]
        pos = info.offset + info.length
        if k == key:
            item = edit(item)
        info.offset, info.length = len(out), len(item)
        out += item
    out += data[pos:]
    (path / rel).write_bytes(bytes(out))
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return md.storage_data[key]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    made = {}

    def get(name, fqn):
        key = (name, fqn)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{name}_{fqn}" if name else "clean")
            sd = state_dict()
            dcp.save(sd, checkpoint_id=str(path), no_dist=True)
            info = tamper(path, fqn, TAILS[name][0]) if name else None
            made[key] = (str(path), sd, info)
        return made[key]

    return get


# the w box each way of loading reads, and the path w's item takes
MODES = {
    "whole": None,  # every tensor whole (w: one long run, located)
    "rows": ((8, 0), (32, 1100)),  # a row box: located, rows read in place
    "cols": ((0, 100), (64, 60)),  # a column box: the item read whole, located in memory
}


def _load(path, sd, reader, mode):
    box = MODES[mode]
    if box is None:
        got = {k: torch.zeros_like(v) for k, v in sd.items()}
        dcp.load(got, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
        want = sd
    else:
        boxes = {"w": box, "s": ((0,), (4,)), "t": ((0,), (5,))}
        got = {k: torch.zeros(boxes[k][1], dtype=sd[k].dtype) for k in boxes}
        dcp.load(got, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
        (r0, c0), (nr, nc) = box
        want = {"w": sd["w"][r0 : r0 + nr, c0 : c0 + nc], "s": sd["s"], "t": sd["t"]}
    return got, want


def _paths(monkeypatch):
    # (offset, length) of the items located from record windows and of those read whole
    seen = {"located": set(), "whole": set()}
    locate, read_whole = RangeFileSystemReader._locate, RangeFileSystemReader._read_whole

    def spy_locate(self, fd, offset, length, *args, **kwargs):
        seen["located"].add((offset, length))
        return locate(self, fd, offset, length, *args, **kwargs)

    def spy_read_whole(self, fd, dest, job, scratch):
        seen["whole"].add((job.item_offset, job.length))
        return read_whole(self, fd, dest, job, scratch)

    monkeypatch.setattr(RangeFileSystemReader, "_locate", spy_locate)
    monkeypatch.setattr(RangeFileSystemReader, "_read_whole", spy_read_whole)
    return seen


def _assert_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        assert torch.equal(a[k], b[k]), (what, k)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("fqn", ["w", "t"])
@pytest.mark.parametrize("name", sorted(TAILS))
def test_tail_loads_as_torch_loads(saved, monkeypatch, name, fqn, mode, threads):
    path, sd, info = saved(name, fqn)
    _, loads, extra = TAILS[name]
    seen = _paths(monkeypatch)
    reader = RangeFileSystemReader(path, thread_count=threads)
    if not loads:
        with pytest.raises(CheckpointException):
            _load(path, sd, FileSystemReader(path), mode)
        with pytest.raises(
            CheckpointException,
            match=rf"CorruptItem: .*__\d+_\d+\.distcp: item '{fqn}' .*bytes \[{info.offset}, "
                  rf"{info.offset + info.length}\)\): (not a torch\.save zip archive|archive has no data\.pkl)",
        ):
            _load(path, sd, reader, mode)
        return
    ref, want = _load(path, sd, FileSystemReader(path), mode)
    _assert_equal(ref, want, "torch")
    got, _ = _load(path, sd, reader, mode)
    _assert_equal(got, ref, "ckcore")
    assert reader.stats["fallback_items"] == 0
    if fqn != "w":
        return
    item = (info.offset, info.length)
    # a box (and the whole tensor) located from its archive's records; a
    # column box read whole and located in memory
    if mode == "cols":
        assert item in seen["whole"] and item not in seen["located"]
    else:
        assert item in seen["located"] and item not in seen["whole"]
    # Requests: what the untampered checkpoint costs, plus the tail's search.
    clean_path, _, _ = saved("", "")
    clean = RangeFileSystemReader(clean_path, thread_count=threads)
    _load(clean_path, sd, clean, mode)
    more = 0 if mode == "cols" else extra
    assert reader.stats["read_calls"] == clean.stats["read_calls"] + more


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_record_in_the_first_block_of_a_small_archive(saved, monkeypatch, mode, threads):
    """A small archive (~1.5 KiB) with 5 KiB after it loads wherever its item sits.

    miniz steps back from the end in blocks of 4093 bytes, and its block
    start would be clamped at the archive's byte 0 if the clamp were not
    computed unsigned: the block that holds this record starts before the
    item. torch.load of the item's bytes then fails ("negative seek value"),
    and FileSystemReader reads the bytes in front of the item: it loads
    ``t`` (after ``w``) and fails for ``s`` (at byte 0 of its file). The
    range reader searches the item's own bytes, as miniz means to, and
    loads both.
    """
    for fqn in ("s", "t"):
        path, sd, info = saved("junk_5k", fqn)
        assert info.length - 5 * 1024 < 4093 - 22 and info.length > 4096
        got, want = _load(path, sd, RangeFileSystemReader(path, thread_count=threads), mode)
        _assert_equal(got, want, fqn)
        if fqn == "t":
            ref, _ = _load(path, sd, FileSystemReader(path), mode)
            _assert_equal(got, ref, fqn)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["comment_65535", "junk_60k", "junk_69562", "junk_69563"])
def test_whole_read_item_the_locator_does_not_handle(tmp_path, monkeypatch, name, threads):
    """An item read whole whose archive the locator hands to torch.load (a conjugate-bit
    tensor) is loaded from the same bytes, tail and all, as torch loads it."""
    c = torch.randn(6, 400, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    sd = {"cj": c.conj()}
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    info = tamper(tmp_path, "cj", TAILS[name][0])
    boxes = {"cj": ((0, 40), (6, 30))}

    def load(reader):
        got = {"cj": torch.zeros(6, 30, dtype=torch.complex64)}
        dcp.load(got, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
        return got

    seen = _paths(monkeypatch)
    reader = RangeFileSystemReader(str(tmp_path), thread_count=threads)
    if not TAILS[name][1]:
        with pytest.raises(CheckpointException):
            load(FileSystemReader(str(tmp_path)))
        with pytest.raises(CheckpointException, match=r"CorruptItem: .*item 'cj' .*not a torch\.save zip"):
            load(reader)
        return
    ref = load(FileSystemReader(str(tmp_path)))
    got = load(reader)
    assert torch.equal(got["cj"], ref["cj"]) and torch.equal(got["cj"], c.conj()[:, 40:70].resolve_conj())
    assert seen["whole"] == {(info.offset, info.length)} and not seen["located"]


@pytest.mark.parametrize("name", [n for n, (_, loads, _) in sorted(TAILS.items()) if loads])
@pytest.mark.parametrize("rank", [0, 1])
def test_the_plan_counts_the_locators_extra_reads_as_the_reader_makes_them(tmp_path, name, rank):
    # `ckcore plan`'s range figures for one rank of a 2-rank row reshard
    # equal the reader's stats (one worker), extra end-record reads included.
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    from ckcore import report
    from ckcore.checkpoint import Checkpoint
    from ckcore.layout import local_shapes_and_offsets

    sd = state_dict()
    dcp.save({k: v.clone() for k, v in sd.items()}, checkpoint_id=tmp_path, no_dist=True)
    tamper(tmp_path, "w", TAILS[name][0])
    ck = Checkpoint(tmp_path)
    mesh, layouts = report.resolve_layouts(ck.metadata, world_size=2, shard_dim=0)
    plan = report.plan_reads(ck, mesh, layouts, ranges=True)
    reader = RangeFileSystemReader(tmp_path, thread_count=1)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    items, outs = [], {}
    for fqn, t in sd.items():
        sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
        outs[fqn] = torch.empty(tuple(sizes[rank]), dtype=t.dtype)
        items += create_read_items_for_chunk_list(
            fqn, md.state_dict_metadata[fqn],
            [ChunkStorageMetadata(torch.Size(offsets[rank]), torch.Size(sizes[rank]))])

    class Dest:
        def resolve_tensor(self, req):
            t = outs[req.dest_index.fqn]
            for d, (o, n) in enumerate(zip(req.dest_offsets, req.lengths)):
                t = t.narrow(d, o, n)
            return t

        def commit_tensor(self, req, t):
            pass

    reader.read_data(LoadPlan(items), Dest()).wait()
    for fqn, t in sd.items():
        sizes, offsets = local_shapes_and_offsets(tuple(t.shape), mesh, layouts[fqn][1])
        want = t[tuple(slice(o, o + n) for o, n in zip(offsets[rank], sizes[rank]))]
        assert torch.equal(outs[fqn], want), fqn
    got = next(r for r in plan["ranks"] if r["rank"] == rank)["range"]
    assert (got["read_calls"], got["bytes_read"]) == (reader.stats["read_calls"],
                                                      reader.stats["bytes_read"])
