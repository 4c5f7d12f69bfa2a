"""How many requests ``RangeFileSystemReader`` makes, and its default worker count.

A network store charges per request, so the archive records of the items of
one file are read in merged windows: items lie back to back, and one item's
last 4 KiB and the next one's first 4 KiB are one read. These tests count the
reads (every ``os.pread`` of the reader module, and ``stats``), check that the
values are still torch's, and that a window cut short still reports the item
as truncated.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore.dcp import reader as reader_mod
from ckcore.dcp.reader import RangeFileSystemReader
from tests.support.dcp_sim import BoxLoadPlanner, row_boxes, save_as_ranks

N_ITEMS = 5


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("requests"))
    g = torch.Generator().manual_seed(3)
    # 16 KiB each: larger than two record windows, so head and tail are read apart
    sd = {f"t{i}": torch.randn(64, 64, generator=g) for i in range(N_ITEMS)}
    dcp.save(sd, checkpoint_id=path, no_dist=True)
    return path, sd


def _spy_pread(monkeypatch, edit=None):
    calls: list[tuple[int, int]] = []
    real = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        calls.append((n, off))
        b = real(fd, n, off)
        return edit(len(calls), b) if edit is not None else b

    monkeypatch.setattr(reader_mod.os, "pread", pread)
    return calls


def test_records_of_back_to_back_items_cost_one_request_each(one_file, monkeypatch):
    path, sd = one_file
    calls = _spy_pread(monkeypatch)
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    reader = RangeFileSystemReader(path, thread_count=1)
    dcp.load(got, storage_reader=reader, no_dist=True)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    md = FileSystemReader(path).read_metadata()
    spans = sorted((s.offset, s.offset + s.length) for s in md.storage_data.values())
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "items are not back to back"
    # The first item's head, one window per boundary between items, the last item's tail.
    want = [(4096, spans[0][0])]
    want += [(8192, end - 4096) for _, end in spans[:-1]]
    want += [(4096, spans[-1][1] - 4096)]
    assert calls == want
    # ... and one preadv per item for its data: N + 1 record reads, not 2 N.
    assert reader.stats["read_calls"] == (N_ITEMS + 1) + N_ITEMS


def test_a_record_window_cut_short_reports_the_item_truncated(one_file, monkeypatch):
    path, sd = one_file

    # From the second window on (first item's tail + second item's head)
    # every read comes back one byte short, as when the file shrinks after it
    # was checked: the window falls short, so does the read that replaces it.
    def cut(i: int, b: bytes) -> bytes:
        return b[:-1] if i >= 2 else b

    calls = _spy_pread(monkeypatch, cut)
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    with pytest.raises(CheckpointException, match=r"CorruptItem: .*item 't\d'.*file truncated"):
        dcp.load(got, storage_reader=RangeFileSystemReader(path, thread_count=1), no_dist=True)
    # The item was asked again, outside the short window, before it was reported.
    start, n = calls[1][1], calls[1][0]
    assert any(start <= off < start + n for _, off in calls[N_ITEMS + 1:])


def test_a_small_item_in_a_short_window_reports_truncated(tmp_path, monkeypatch):
    path = str(tmp_path)
    sd = {"a": torch.arange(8.0), "b": torch.arange(4.0)}
    dcp.save(sd, checkpoint_id=path, no_dist=True)
    _spy_pread(monkeypatch, lambda i, b: b[:-1])
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    with pytest.raises(CheckpointException, match=r"CorruptItem: .*file truncated"):
        dcp.load(got, storage_reader=RangeFileSystemReader(path, thread_count=1), no_dist=True)


# ------------------------------------------------------------- whole reads


@pytest.fixture(scope="module")
def row_sharded(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("whole"))
    g = torch.Generator().manual_seed(5)
    tensors = {"w": torch.randn(384, 96, generator=g), "c": torch.randn(64, 80, generator=g).to(torch.bfloat16)}
    save_as_ranks(path, {k: (t, row_boxes(t.shape, 4)) for k, t in tensors.items()}, 4)
    return path, tensors


@pytest.mark.parametrize("threads", [1, 3])
def test_narrow_column_boxes_read_each_item_whole_in_one_request(row_sharded, threads, monkeypatch):
    """Column runs of 128 B with gaps a request costs more than: one read per item, records and all."""
    path, tensors = row_sharded
    calls = _spy_pread(monkeypatch)  # record windows (os.pread); whole reads go through read_runs
    boxes = {k: ((0, t.shape[1] // 4), (t.shape[0], t.shape[1] // 4)) for k, t in tensors.items()}
    reader = RangeFileSystemReader(path, thread_count=threads)
    sd = {k: torch.zeros(b[1], dtype=tensors[k].dtype) for k, b in boxes.items()}
    dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
    ref = {k: torch.zeros(b[1], dtype=tensors[k].dtype) for k, b in boxes.items()}
    dcp.load(ref, storage_reader=FileSystemReader(path), planner=BoxLoadPlanner(boxes), no_dist=True)
    for k, ((o0, o1), (n0, n1)) in boxes.items():
        assert torch.equal(sd[k], ref[k]), k
        assert torch.equal(sd[k], tensors[k][o0:o0 + n0, o1:o1 + n1]), k
    items = 4 * len(tensors)
    # "w" items are read whole without being located first; "c" items are
    # small (at most 8 KiB): their record window holds them whole.
    md = FileSystemReader(path).read_metadata()
    small = sorted((s.length, s.offset) for i, s in md.storage_data.items() if i.fqn == "c")
    assert all(n <= 8192 for n, _ in small)
    assert sorted(calls) == small
    assert reader.stats["read_calls"] == items
    assert reader.stats["fallback_items"] == 0


def test_a_whole_read_item_torch_save_wrote_with_a_conj_bit_loads_as_torch(tmp_path):
    """The locator refuses the archive after it was read whole: torch.load of the same bytes serves it."""
    c = torch.randn(64, 40, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    dcp.save({"cj": c.conj()}, checkpoint_id=str(tmp_path), no_dist=True)
    boxes = {"cj": ((0, 10), (64, 10))}
    got = {"cj": torch.zeros(64, 10, dtype=torch.complex64)}
    ref = {"cj": torch.zeros(64, 10, dtype=torch.complex64)}
    reader = RangeFileSystemReader(str(tmp_path), thread_count=1)
    dcp.load(got, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
    dcp.load(ref, storage_reader=FileSystemReader(str(tmp_path)), planner=BoxLoadPlanner(boxes), no_dist=True)
    assert torch.equal(got["cj"], ref["cj"])
    assert torch.equal(got["cj"], c.conj().resolve_conj()[:, 10:20])
    assert reader.stats["read_calls"] == 1


def test_a_whole_read_item_truncated_after_the_check_names_the_item(row_sharded, tmp_path, monkeypatch):
    """The file shrinks between the size check and the read: the item is reported truncated."""
    path, tensors = row_sharded
    real = reader_mod.RangeFileSystemReader._check_entries
    victim = os.path.join(str(tmp_path), "c")
    shutil.copytree(path, victim)

    def check_then_shrink(self, p, reqs, size):
        real(self, p, reqs, size)
        with open(p, "r+b") as f:
            f.truncate(size // 2)

    monkeypatch.setattr(reader_mod.RangeFileSystemReader, "_check_entries", check_then_shrink)
    boxes = {"w": ((0, 24), (384, 24))}
    sd = {"w": torch.zeros(384, 24)}
    with pytest.raises(CheckpointException, match=r"CorruptItem: .*item 'w'.*file truncated"):
        dcp.load(sd, storage_reader=RangeFileSystemReader(victim, thread_count=1),
                 planner=BoxLoadPlanner(boxes), no_dist=True)


def test_whole_reads_announce_the_next_items_to_the_kernel(tmp_path, monkeypatch):
    """Each whole read announces the whole-read items up to prefetch_bytes after it, each once."""
    path = str(tmp_path)
    g = torch.Generator().manual_seed(6)
    tensors = {f"t{i}": torch.randn(128, 256, generator=g) for i in range(4)}  # 64 KiB per chunk
    save_as_ranks(path, {k: (t, row_boxes(t.shape, 2)) for k, t in tensors.items()}, 2)
    announced: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd, off, n, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            announced.append((off, n))
        return real(fd, off, n, advice)

    monkeypatch.setattr(reader_mod.os, "posix_fadvise", fadvise)
    boxes = {k: ((0, 64), (128, 16)) for k in tensors}  # 64 B runs: every item read whole
    reader = RangeFileSystemReader(path, thread_count=1, prefetch_bytes=100_000)
    sd = {k: torch.zeros(128, 16) for k in tensors}
    dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
    for k, t in tensors.items():
        assert torch.equal(sd[k], t[:, 64:80]), k
    md = FileSystemReader(path).read_metadata()
    items = sorted((s.offset, s.length) for s in md.storage_data.values())
    assert reader.stats["read_calls"] == len(items) == 8
    # Every item is announced exactly once (two files, 4 items each, at the
    # same offsets: the lists compare as multisets), and nothing else is.
    assert sorted(announced) == items


def test_record_windows_are_held_one_batch_at_a_time(tmp_path):
    """A file of many located items: its records are read in batches of at most buffer_bytes.

    All windows at once would hold about 8 KiB per item (12 MiB here); a
    batch at a time, the peak is the plan's own objects plus one batch.
    """
    import tracemalloc

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    n = 1500
    sd = {f"p{i}": torch.full((3072,), float(i)) for i in range(n)}  # 12 KiB each, one file
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    got = {k: torch.empty_like(v) for k, v in sd.items()}
    reader = RangeFileSystemReader(str(tmp_path), thread_count=1, buffer_bytes=1 << 20)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    planner = DefaultLoadPlanner()
    planner.set_up_planner(got, md, True)
    plan = planner.create_local_plan()
    tracemalloc.start()
    try:
        reader.read_data(plan, planner).wait()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    # 1 MiB batches of 8 KiB windows: 128 items a batch, 12 batches, each
    # costing one more request than a single merged pass would.
    assert reader.stats["read_calls"] == n + -(-n // 128) + n


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_boxes_of_one_item_read_whole_read_it_once_per_worker(tmp_path, threads):
    # 40 narrow boxes of one 11.5 KiB item (the pieces a shared read cuts a
    # small chunk into): each box alone is read whole, but the item's bytes
    # are fetched once per worker, not once per box.
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    full = torch.arange(40 * 6 * 6, dtype=torch.int64).reshape(40, 6, 6)
    dcp.save({"t": full}, checkpoint_id=tmp_path, no_dist=True)
    md = FileSystemReader(tmp_path).read_metadata()
    length = next(iter(md.storage_data.values())).length

    class Dest:
        def __init__(self):
            self.out = [torch.full((1, 6, 6), -1, dtype=torch.int64) for _ in range(40)]

        def resolve_tensor(self, req):
            return self.out[req.dest_index.index]

        def commit_tensor(self, req, t):
            pass

    boxes = [ChunkStorageMetadata(offsets=torch.Size([i, 0, 0]), sizes=torch.Size([1, 6, 6]))
             for i in range(40)]
    items = create_read_items_for_chunk_list("t", md.state_dict_metadata["t"], boxes)
    items = [type(it)(**{**it.__dict__, "dest_index": type(it.dest_index)("t", it.dest_index.offset, k)})
             for k, it in enumerate(items)]
    reader = RangeFileSystemReader(tmp_path, thread_count=threads)
    reader.set_up_storage_reader(md, True)
    dest = Dest()
    reader.read_data(LoadPlan(items), dest).wait()
    for i, t in enumerate(dest.out):
        assert torch.equal(t, full[i : i + 1]), i
    assert 1 <= reader.stats["read_calls"] <= threads
    assert reader.stats["bytes_read"] == reader.stats["read_calls"] * length
    if threads == 1:
        assert reader.stats["read_calls"] == 1
