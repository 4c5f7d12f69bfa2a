"""RangeFileSystemReader with worker threads (``thread_count > 1``) against its sequential path.

The concurrent path must load exactly what ``thread_count=1`` loads (and
what torch's reader loads) on every layout and read path, call the planner's
hooks on the calling thread, raise a worker's error on the caller with the
sequential path's message, leave no thread behind, and keep overlapping
destination writes in the sequential order. Also: the cost-model coalescing
and its explicit overrides, and damaged storage entries (a short file,
entries sharing bytes) as ``CheckpointError``.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader

import ckcore.dcp.reader as rd
from ckcore.checkpoint import CheckpointError
from ckcore.dcp.reader import RangeFileSystemReader
from tests.differential.test_range_reader import (
    CONFIGS,
    assert_same,
    full_state_dict,
    zeros_like_sd,
)
from tests.support.dcp_sim import BoxLoadPlanner, col_boxes, grid_boxes, row_boxes, save_as_ranks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SHAPES = {"w": (384, 96), "wb": (130, 200), "w8": (96, 515), "wt": (200, 72)}
DTYPES = {"w": torch.float32, "wb": torch.bfloat16, "w8": torch.float8_e4m3fn, "wt": torch.float64}


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ckcore-read")]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """4 ranks, row-sharded (wt saved column-major)."""
    path = str(tmp_path_factory.mktemp("sharded-c"))
    g = torch.Generator().manual_seed(2)
    tensors = {k: torch.randn(SHAPES[k], generator=g).to(DTYPES[k]) for k in SHAPES}
    save_as_ranks(
        path, {k: (t, row_boxes(t.shape, 4)) for k, t in tensors.items()}, 4,
        layout=lambda fqn, s: s.t().contiguous().t() if fqn == "wt" else s,
    )
    return path, tensors


def _load(path, boxes, tensors, **kw):
    sd = {k: torch.zeros(boxes[k][1], dtype=tensors[k].dtype) for k in boxes}
    reader = RangeFileSystemReader(path, **kw)
    dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
    return sd, reader


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_plain_load_concurrent_equals_sequential(tmp_path, config, threads):
    sd = full_state_dict()
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    got = {}
    for t in (1, threads):
        got[t] = zeros_like_sd(sd)
        dcp.load(got[t], storage_reader=RangeFileSystemReader(str(tmp_path), thread_count=t, **CONFIGS[config]),
                 no_dist=True)
    assert_same(got[1], got[threads])
    assert_same(sd, got[threads])
    assert not _reader_threads()


@pytest.mark.parametrize("threads", [2, 5])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["col3", "grid2x3", "row5"])
def test_resharded_concurrent_equals_sequential(sharded, config, layout, threads):
    path, tensors = sharded
    make = {"col3": lambda s: col_boxes(s, 3), "grid2x3": lambda s: grid_boxes(s, 2, 3),
            "row5": lambda s: row_boxes(s, 5)}[layout]
    all_boxes = {k: make(t.shape) for k, t in tensors.items()}
    for r in range(len(next(iter(all_boxes.values())))):
        boxes = {k: b[r] for k, b in all_boxes.items()}
        seq, rs = _load(path, boxes, tensors, thread_count=1, **CONFIGS[config])
        con, rc = _load(path, boxes, tensors, thread_count=threads, **CONFIGS[config])
        assert_same(seq, con, f"rank {r}")
        for k, ((o0, o1), (n0, n1)) in boxes.items():
            assert_same(tensors[k][o0 : o0 + n0, o1 : o1 + n1], con[k], f"{k} rank {r}")
        assert rc.stats["fallback_items"] == rs.stats["fallback_items"] == 0
    assert not _reader_threads()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_boxes_concurrent_equals_torch(sharded, data):
    """Random boxes, reader settings and thread counts: equal to torch's reader and the source."""
    path, tensors = sharded
    boxes = {}
    for k in data.draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=4, unique=True)):
        r, c = SHAPES[k]
        o0 = data.draw(st.integers(0, r - 1))
        o1 = data.draw(st.integers(0, c - 1))
        boxes[k] = ((o0, o1), (data.draw(st.integers(1, r - o0)), data.draw(st.integers(1, c - o1))))
    kw = {
        "thread_count": data.draw(st.integers(1, 6)),
        "buffer_bytes": data.draw(st.sampled_from([4096, 8192, 1 << 20])),
        "small_item_bytes": data.draw(st.sampled_from([0, 4096])),
        "direct_min_bytes": data.draw(st.sampled_from([1, 4096, 1 << 40])),
        "request_latency_s": data.draw(st.sampled_from([0.0, 1e-6, 1e-3])),
    }
    got, _ = _load(path, boxes, tensors, **kw)
    ref = {k: torch.zeros(boxes[k][1], dtype=tensors[k].dtype) for k in boxes}
    dcp.load(ref, storage_reader=FileSystemReader(path), planner=BoxLoadPlanner(boxes), no_dist=True)
    assert_same(ref, got, str(kw))
    assert not _reader_threads()


class _ThreadRecorder(BoxLoadPlanner):
    def __init__(self, boxes):
        super().__init__(boxes)
        self.threads = set()
        self.order = []

    def resolve_tensor(self, read_item):
        self.threads.add(threading.get_ident())
        self.order.append(("resolve", read_item.storage_index))
        return super().resolve_tensor(read_item)

    def commit_tensor(self, read_item, tensor):
        self.threads.add(threading.get_ident())
        self.order.append(("commit", read_item.storage_index))


def test_planner_hooks_on_the_calling_thread(sharded):
    path, tensors = sharded
    boxes = {k: col_boxes(t.shape, 3)[1] for k, t in tensors.items()}
    planner = _ThreadRecorder(boxes)
    sd = {k: torch.zeros(b[1], dtype=tensors[k].dtype) for k, b in boxes.items()}
    dcp.load(sd, storage_reader=RangeFileSystemReader(path, thread_count=4, small_item_bytes=0),
             planner=planner, no_dist=True)
    assert planner.threads == {threading.get_ident()}
    # every item resolved once, committed once, after its resolve
    seen = {}
    for kind, idx in planner.order:
        seen.setdefault(idx, []).append(kind)
    assert seen and all(v == ["resolve", "commit"] for v in seen.values())


def test_worker_error_raises_on_caller_and_stops_threads(sharded, monkeypatch):
    """An OSError inside a worker's preadv reaches dcp.load with the sequential path's message."""
    path, tensors = sharded
    boxes = {k: col_boxes(t.shape, 2)[0] for k, t in tensors.items()}
    real = rd._r.read_runs
    where = []

    def failing(fd, *a, **k):
        where.append(threading.current_thread().name)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rd._r, "read_runs", failing)
    messages = {}
    for t in (1, 4):
        where.clear()
        with pytest.raises(CheckpointException) as ei:
            _load(path, boxes, tensors, thread_count=t, small_item_bytes=0)
        (exc, _tb), = ei.value.failures.values()
        assert isinstance(exc, OSError)
        messages[t] = str(exc)
        assert where and (t == 1) == all(n == "MainThread" for n in where), where
        assert not _reader_threads()
    assert messages[1] == messages[4]
    assert "Input/output error" in messages[4] and ".distcp: item" in messages[4]
    monkeypatch.setattr(rd._r, "read_runs", real)


def _damaged(src, dst, damage):
    shutil.copytree(src, dst)
    files = sorted(f for f in os.listdir(dst) if f.endswith(".distcp"))
    damage(os.path.join(dst, files[-1]))


@pytest.mark.parametrize("threads", [1, 4])
def test_short_file_is_a_checkpoint_error(sharded, tmp_path, threads):
    path, tensors = sharded

    def truncate(p):
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)

    _damaged(path, str(tmp_path / "c"), truncate)
    sd = {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in tensors.items()}
    with pytest.raises(CheckpointException) as ei:
        dcp.load(sd, storage_reader=RangeFileSystemReader(str(tmp_path / "c"), thread_count=threads),
                 no_dist=True)
    (exc, _tb), = ei.value.failures.values()
    assert isinstance(exc, CheckpointError) and "file truncated" in str(exc)
    assert not _reader_threads()


class _OverlappingEntries(RangeFileSystemReader):
    """Moves one storage entry onto the middle of another of the same file."""

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        # The reader's storage lookups are a read-only view over the metadata's
        # columns; a plain dict stands in for the damaged metadata.
        self.storage_data = dict(self.storage_data.items())
        by_file = {}
        for idx, info in sorted(self.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
            by_file.setdefault(info.relative_path, []).append(idx)
        first, second = next(v for v in by_file.values() if len(v) >= 2)[:2]
        a = self.storage_data[first]
        b = self.storage_data[second]
        self.storage_data[second] = type(b)(b.relative_path, a.offset + a.length // 2, b.length,
                                            b.transform_descriptors)


@pytest.mark.parametrize("threads", [1, 4])
def test_overlapping_entries_are_a_checkpoint_error(sharded, threads):
    path, tensors = sharded
    sd = {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in tensors.items()}
    with pytest.raises(CheckpointException) as ei:
        dcp.load(sd, storage_reader=_OverlappingEntries(path, thread_count=threads), no_dist=True)
    (exc, _tb), = ei.value.failures.values()
    assert isinstance(exc, CheckpointError) and "overlap" in str(exc)
    assert not _reader_threads()


class _SharedTarget(BoxLoadPlanner):
    """Every item of 'w' lands in one shared buffer: writes overlap, the last one must win."""

    def __init__(self, boxes, shared):
        super().__init__(boxes)
        self.shared = shared

    def resolve_tensor(self, read_item):
        if read_item.dest_index.fqn == "w":
            return self.shared[: read_item.lengths[0], : read_item.lengths[1]]
        return super().resolve_tensor(read_item)


@pytest.mark.parametrize("threads", [2, 4])
def test_overlapping_destinations_keep_sequential_order(sharded, threads):
    path, tensors = sharded
    boxes = {"w": ((0, 0), SHAPES["w"])}  # 4 items, one per saved chunk of 96 rows
    out = {}
    for t in (1, threads):
        shared = torch.zeros(96, 96)
        sd = {"w": torch.zeros(SHAPES["w"])}
        dcp.load(sd, storage_reader=RangeFileSystemReader(path, thread_count=t),
                 planner=_SharedTarget(boxes, shared), no_dist=True)
        out[t] = shared
    assert torch.equal(out[1], out[threads])
    assert any(torch.equal(out[1], tensors["w"][r : r + 96]) for r in range(0, 384, 96))


def test_cost_model_and_overrides(sharded):
    """Gaps cheaper than a request are read through; max_gap / max_overread override the model."""
    path, tensors = sharded
    box = {"w": ((0, 32), (384, 32))}  # a column block: 384 runs of 128 B, gaps of 256 B
    model, r_model = _load(path, box, tensors, small_item_bytes=0, thread_count=1)
    none, r_none = _load(path, box, tensors, small_item_bytes=0, thread_count=1, request_latency_s=0.0)
    capped, r_capped = _load(path, box, tensors, small_item_bytes=0, thread_count=1, max_overread=1.05,
                             max_gap=1 << 20)
    for sd in (model, none, capped):
        assert_same(tensors["w"][:, 32:64], sd["w"])
    assert r_none.stats["read_calls"] >= 384  # no gap is worth reading at zero latency
    assert r_model.stats["read_calls"] < 40  # 1 ms x 1 GB/s: every 256 B gap is read through
    assert r_capped.stats["bytes_read"] <= 1.1 * 384 * 32 * 4 + 4 * 2 * 4096
    assert r_model.stats["bytes_read"] > r_capped.stats["bytes_read"]
    # no gap larger than the break-even gap, and never more than one scratch buffer
    r = RangeFileSystemReader(path, request_latency_s=1.0, bandwidth_bytes_per_s=1e9, buffer_bytes=1 << 16)
    assert r._gap_limit == 1 << 16
    r = RangeFileSystemReader(path, request_latency_s=1e-6, bandwidth_bytes_per_s=1e9)
    assert r._gap_limit == 1000


def test_bad_concurrency_arguments(tmp_path):
    for kw in ({"thread_count": 0}, {"thread_count": 1.5}, {"thread_count": True},
               {"request_latency_s": -1.0}, {"request_latency_s": float("inf")},
               {"bandwidth_bytes_per_s": 0.0}, {"bandwidth_bytes_per_s": float("nan")},
               {"max_gap": -1}, {"max_overread": 0.5}):
        with pytest.raises(ValueError):
            RangeFileSystemReader(str(tmp_path), **kw)
