"""RangeFileSystemReader against torch's FileSystemReader on real DCP checkpoints.

Every test loads the same plan with both readers and compares every element
bit for bit (and against the source tensors). Reader configurations are
varied so that each read path runs: whole small items, reads straight into
the destination (preadv), and the bounded scratch buffer + box copy split
into many slabs.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

from ckcore.dcp.reader import RangeFileSystemReader
from tests.support.dcp_sim import BoxLoadPlanner, col_boxes, grid_boxes, row_boxes, save_as_ranks
from tests.support.identical import assert_identical
from tests.support.paths import CKCORE_PARENT
from tests.support.rdzv import file_init_method

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# Reader configurations: default; every item through ranges with a tiny
# scratch buffer (many slabs) and only scratch copies; straight reads for
# any run length.
CONFIGS = {
    "default": {},
    "scratch": {"small_item_bytes": 0, "buffer_bytes": 4096, "direct_min_bytes": 1 << 40, "max_gap": 64},
    "direct": {"small_item_bytes": 0, "direct_min_bytes": 1, "max_overread": 1.0},
}


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, what=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(raw(a), raw(b)), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    else:
        assert a == b, what


def zeros_like_sd(sd):
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd, memory_format=torch.contiguous_format)
    if isinstance(sd, dict):
        return {k: zeros_like_sd(v) for k, v in sd.items()}
    return None


def full_state_dict():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 257, generator=g)
    return {
        "f32": torch.randn(64, 33, generator=g),
        "big": big,
        "big_t": torch.randn(257, 300, generator=g).t(),  # saved column-major
        "bf16": torch.randn(129, 65, generator=g).to(torch.bfloat16),
        "f8": torch.randn(70, 300, generator=g).to(torch.float8_e4m3fn),
        "f8_t": torch.randn(300, 70, generator=g).to(torch.float8_e5m2).t(),
        "f16_3d": torch.randn(5, 6, 7, generator=g).half().permute(2, 0, 1),
        "i64": torch.randint(-(2**40), 2**40, (1000,), generator=g),
        "bool": torch.rand(77, generator=g) > 0.5,
        "c64": torch.randn(10, 3, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 5),
        "nested": {"a": torch.arange(12).reshape(3, 4), "b": "text"},
        "step": 17,
        "blob": b"\x00\x01bytes",
    }


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("plain"))
    sd = full_state_dict()
    dcp.save(sd, checkpoint_id=path, no_dist=True)
    return path, sd


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_plain_load_equals_torch(plain_ckpt, config):
    path, sd = plain_ckpt
    ref = zeros_like_sd(sd)
    dcp.load(ref, storage_reader=FileSystemReader(path), no_dist=True)
    got = zeros_like_sd(sd)
    reader = RangeFileSystemReader(path, **CONFIGS[config])
    dcp.load(got, storage_reader=reader, no_dist=True)
    assert_same(ref, got)
    assert_same(sd, got)
    assert reader.stats["fallback_items"] == 0
    assert reader.stats["read_calls"] > 0


# ---------------------------------------------------------------- resharding

SHAPES = {"w": (384, 96), "wb": (130, 200), "w8": (96, 515), "wt": (200, 72)}
DTYPES = {"w": torch.float32, "wb": torch.bfloat16, "w8": torch.float8_e4m3fn, "wt": torch.float64}


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
    """4 ranks, row-sharded (wt: saved transposed in memory), plus a byte item."""
    path = str(tmp_path_factory.mktemp("sharded"))
    g = torch.Generator().manual_seed(1)
    tensors = {
        k: torch.randn(SHAPES[k], generator=g).to(DTYPES[k]) for k in SHAPES
    }
    buf = io.BytesIO()
    torch.save({"lr": 0.1, "ids": torch.arange(5)}, buf)
    save_as_ranks(
        path,
        {k: (t, row_boxes(t.shape, 4)) for k, t in tensors.items()},
        4,
        byte_items={"extra": buf.getvalue()},
        layout=lambda fqn, s: s.t().contiguous().t() if fqn == "wt" else s,
    )
    return path, tensors


def _load_boxes(path, reader, boxes, tensors, with_extra=True):
    sd = {k: torch.zeros(boxes[k][1], dtype=tensors[k].dtype) for k in boxes}
    if with_extra:
        sd["extra"] = None
    dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
    return sd


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["col3", "grid2x3", "row5"])
def test_resharded_load_equals_torch(sharded_ckpt, config, layout):
    path, tensors = sharded_ckpt
    make = {
        "col3": lambda s: col_boxes(s, 3),
        "grid2x3": lambda s: grid_boxes(s, 2, 3),
        "row5": lambda s: row_boxes(s, 5),
    }[layout]
    all_boxes = {k: make(t.shape) for k, t in tensors.items()}
    for r in range(len(next(iter(all_boxes.values())))):
        boxes = {k: b[r] for k, b in all_boxes.items()}
        reader = RangeFileSystemReader(path, **CONFIGS[config])
        got = _load_boxes(path, reader, boxes, tensors)
        ref = _load_boxes(path, FileSystemReader(path), boxes, tensors)
        assert_same(ref, got, f"rank {r}")
        for k, ((o0, o1), (n0, n1)) in boxes.items():
            assert_same(tensors[k][o0 : o0 + n0, o1 : o1 + n1], got[k], f"{k} rank {r}")
        assert got["extra"]["lr"] == 0.1 and torch.equal(got["extra"]["ids"], torch.arange(5))


def test_reads_only_what_is_needed(sharded_ckpt):
    """Under an explicit over-read cap, a column box of a row-sharded tensor reads ~ its own bytes."""
    path, tensors = sharded_ckpt
    t = tensors["w"]  # 384 x 96 fp32, chunks of 96 rows (36 KiB each)
    box = ((0, 32), (384, 32))
    reader = RangeFileSystemReader(path, small_item_bytes=0, max_overread=1.05, max_gap=1 << 20)
    got = _load_boxes(path, reader, {"w": box}, tensors, with_extra=False)
    assert_same(t[:, 32:64], got["w"])
    needed = 384 * 32 * 4
    headers = 4 * 2 * 4096  # head + tail records of each of the 4 archives
    assert reader.stats["bytes_read"] <= 1.1 * needed + headers
    assert reader.stats["fallback_items"] == 0


def test_dtype_conversion_and_noncontiguous_destination(sharded_ckpt):
    path, tensors = sharded_ckpt
    # load fp32 'w' into a bf16 tensor and 'wb' into a transposed destination
    box_w = ((10, 5), (300, 80))
    box_b = ((7, 3), (100, 150))
    outs = []
    for reader in (FileSystemReader(path), RangeFileSystemReader(path, small_item_bytes=0)):
        sd = {"w": torch.zeros(box_w[1], dtype=torch.bfloat16), "wb": torch.zeros(150, 100, dtype=torch.bfloat16).t()}
        dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner({"w": box_w, "wb": box_b}), no_dist=True)
        outs.append(sd)
    assert_same(outs[0], outs[1])
    assert_same(tensors["wb"][7:107, 3:153], outs[1]["wb"])


class _Recorder(BoxLoadPlanner):
    def __init__(self, boxes):
        super().__init__(boxes)
        self.calls = []

    def resolve_tensor(self, read_item):
        self.calls.append(("resolve", read_item))
        return super().resolve_tensor(read_item)

    def commit_tensor(self, read_item, tensor):
        self.calls.append(("commit", read_item, raw(tensor).clone()))

    def load_bytes(self, read_item, value):
        self.calls.append(("bytes", read_item, value.getvalue()))
        super().load_bytes(read_item, value)


def test_planner_hooks_like_torch(sharded_ckpt):
    path, tensors = sharded_ckpt
    boxes = {k: col_boxes(t.shape, 2)[1] for k, t in tensors.items()}
    seen = []
    for reader in (FileSystemReader(path), RangeFileSystemReader(path)):
        planner = _Recorder(boxes)
        sd = {k: torch.zeros(b[1], dtype=tensors[k].dtype) for k, b in boxes.items()}
        sd["extra"] = None
        dcp.load(sd, storage_reader=reader, planner=planner, no_dist=True)
        seen.append(planner.calls)
    def key(c):
        return (c[0], str(c[1]))

    ref, got = sorted(seen[0], key=key), sorted(seen[1], key=key)
    assert [key(c) for c in ref] == [key(c) for c in got]
    for a, b in zip(ref, got):
        if a[0] in ("commit", "bytes"):
            assert (torch.equal(a[2], b[2]) if a[0] == "commit" else a[2] == b[2])


# ---------------------------------------------------------------- fallback


class _Xor(StreamTransformExtension):
    """A byte-wise XOR 'cipher': a stream transform, so the item must take torch's path."""

    @staticmethod
    def registry_name():
        return "test.xor"

    @staticmethod
    def from_descriptor(version):
        return _Xor()

    def get_descriptor(self):
        return "test.xor/1"

    def transform_to(self, output):
        class W(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                output.write(bytes(x ^ 0x5A for x in bytes(b)))
                return len(b)

        return W()

    def transform_from(self, input):
        class R(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                data = input.read(len(b))
                b[: len(data)] = bytes(x ^ 0x5A for x in data)
                return len(data)

        return io.BufferedReader(R())


def test_items_with_transforms_fall_back(tmp_path):
    sd = {"a": torch.randn(20, 30), "b": torch.randn(8).bfloat16(), "n": 5}
    dcp.save(sd, storage_writer=FileSystemWriter(str(tmp_path), _extensions=[_Xor()]), no_dist=True)
    reg = ExtensionRegistry()
    reg.register(_Xor)
    got = zeros_like_sd(sd)
    reader = RangeFileSystemReader(str(tmp_path), reg)
    dcp.load(got, storage_reader=reader, no_dist=True)
    assert_same(sd, got)
    assert reader.stats["fallback_items"] == 3


# ---------------------------------------------------------------- damage


def _damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    data_files = sorted(f for f in os.listdir(dst) if f.endswith(".distcp"))
    damage(os.path.join(dst, data_files[0]))
    return os.path.join(dst, data_files[0])


def test_truncated_file_names_file_and_item(sharded_ckpt, tmp_path):
    path, tensors = sharded_ckpt

    def truncate(p):
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)

    bad = _damaged_copy(path, str(tmp_path / "c"), truncate)
    sd = {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in tensors.items()}
    # dcp.load wraps the reader's ValueError in a CheckpointException carrying its text
    with pytest.raises(CheckpointException, match=rf"CorruptItem: .*{os.path.basename(bad)}: item '\w+'.*truncated"):
        dcp.load(sd, storage_reader=RangeFileSystemReader(str(tmp_path / "c")), no_dist=True)


def test_corrupted_archive_names_file_and_item(sharded_ckpt, tmp_path):
    path, tensors = sharded_ckpt

    def smash_central_directories(p):
        with open(p, "rb") as f:
            data = f.read()
        with open(p, "wb") as f:
            f.write(data.replace(b"PK\x01\x02", b"XX\x01\x02"))

    bad = _damaged_copy(path, str(tmp_path / "c"), smash_central_directories)
    sd = {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in tensors.items()}
    with pytest.raises(CheckpointException, match=rf"CorruptItem: .*{os.path.basename(bad)}: item '\w+'.*central directory"):
        dcp.load(sd, storage_reader=RangeFileSystemReader(str(tmp_path / "c")), no_dist=True)


def test_bad_reader_arguments(tmp_path):
    # Small items are held whole until copied: never larger than the scratch buffer.
    for small in (-1, 8193):
        with pytest.raises(ValueError, match="small_item_bytes"):
            RangeFileSystemReader(str(tmp_path), small_item_bytes=small, buffer_bytes=8192)
    assert RangeFileSystemReader(str(tmp_path), small_item_bytes=8192, buffer_bytes=8192).small_item_bytes == 8192
    with pytest.raises(ValueError):
        RangeFileSystemReader(str(tmp_path), max_overread=0.9)
    with pytest.raises(ValueError):
        RangeFileSystemReader(str(tmp_path), buffer_bytes=10)


# ---------------------------------------------------------------- multi-process

_WORKER = textwrap.dedent(
    """
    import os, pickle, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from ckcore.dcp.reader import RangeFileSystemReader
    # The reader's default (safe_metadata=True) must never pickle.load .metadata.
    _pickle_load = pickle.load
    def _no_metadata_pickle(f, *a, **k):
        assert not str(getattr(f, "name", "")).endswith(".metadata"), "pickle.load of .metadata"
        return _pickle_load(f, *a, **k)
    pickle.load = _no_metadata_pickle
    rank, world, init_method, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(7)
    full = {"w": torch.randn(101, 67, generator=g), "b": torch.randn(40, 90, generator=g).bfloat16(),
            "f8": torch.randn(64, 64, generator=g).to(torch.float8_e4m3fn)}
    # from_local: no collectives, so float8 works on gloo too
    def dt(v, dim, fill=None):
        local = v.chunk(world, dim=dim)[rank]
        local = local.clone() if fill is None else torch.zeros_like(local)
        return DTensor.from_local(local, mesh, [Shard(dim)], shape=v.shape, stride=v.stride())
    sd = {k: dt(v, 0) for k, v in full.items()}
    sd["step"] = 3
    dcp.save(sd, checkpoint_id=path)
    # load with another layout: column shards
    out = {k: dt(v, 1, fill=0) for k, v in full.items()}
    out["step"] = 0
    dcp.load(out, storage_reader=RangeFileSystemReader(path))
    for k, v in full.items():
        want = v.chunk(world, dim=1)[rank].contiguous()
        got = out[k].to_local()
        assert torch.equal(got.contiguous().view(torch.uint8), want.view(torch.uint8)), k
    assert out["step"] == 3
    dist.barrier()
    # Every check above has passed. Leave without gloo's teardown: when one rank
    # exits first, the other's destroy_process_group / interpreter exit can hit
    # std::terminate in gloo's transport threads (seen once in ~15 CI runs).
    print("ok", rank, flush=True)
    os._exit(0)
    """
)


def test_gloo_two_process_save_and_resharded_load(tmp_path):
    path = str(tmp_path / "ckpt")
    init_method = file_init_method(tmp_path)  # a file store: no port to race for
    env = dict(os.environ)
    # The workers import the same ckcore as this test (the installed one in CI).
    env["PYTHONPATH"] = str(CKCORE_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(r), "2", init_method, path],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("ok")
    # and in this process: whole tensors and a column box, both readers equal
    g = torch.Generator().manual_seed(7)
    full = {"w": torch.randn(101, 67, generator=g), "b": torch.randn(40, 90, generator=g).bfloat16()}
    boxes = {"w": ((0, 30), (101, 37)), "b": ((5, 0), (30, 90))}
    for reader in (FileSystemReader(path), RangeFileSystemReader(path, small_item_bytes=0)):
        sd = {k: torch.zeros(b[1], dtype=full[k].dtype) for k, b in boxes.items()}
        dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner(boxes), no_dist=True)
        assert_same(full["w"][:, 30:67], sd["w"])
        assert_same(full["b"][5:35], sd["b"])
    whole = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(whole, storage_reader=RangeFileSystemReader(path), planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    assert_same(full, whole)
    # the safe metadata of a 2-rank DTensor save is torch's, field for field
    ref, ours = FileSystemReader(path), RangeFileSystemReader(path)
    ours.load_id = ref.load_id
    assert_identical(ref.read_metadata(), ours.read_metadata())


def test_elementwise_runs_stay_bounded(tmp_path, monkeypatch):
    """A column-major chunk read by rows: every element is its own run; slabs keep arrays small."""
    import ckcore.dcp.reader as rd

    monkeypatch.setattr(rd, "_MAX_RUNS", 64)
    sizes = []
    for name in ("byte_ranges", "paired_runs"):
        real = getattr(rd._r, name)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            sizes.append(len(out))
            return out

        monkeypatch.setattr(rd._r, name, spy)
    t = torch.randn(3, 4000).t().contiguous().t()  # 3 x 4000, column-major storage
    dcp.save({"t": t}, checkpoint_id=str(tmp_path), no_dist=True)
    box = ((1, 0), (1, 4000))
    for config in ({"small_item_bytes": 0}, {"small_item_bytes": 0, "direct_min_bytes": 1}):
        sd = {"t": torch.zeros(1, 4000)}
        reader = RangeFileSystemReader(str(tmp_path), **config)
        dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner({"t": box}), no_dist=True)
        assert_same(t[1:2], sd["t"])
    assert sizes and max(sizes) <= 64 and sum(sizes) >= 2 * 4000


def test_unreadable_format_falls_back(tmp_path):
    """A conjugate-bit tensor is saved with metadata the locator refuses: torch's path loads it."""
    c = torch.randn(6, 4, dtype=torch.complex64)
    sd = {"cj": c.conj(), "plain": torch.randn(5, 5)}
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    got = {"cj": torch.zeros(6, 4, dtype=torch.complex64), "plain": torch.zeros(5, 5)}
    ref = {"cj": torch.zeros(6, 4, dtype=torch.complex64), "plain": torch.zeros(5, 5)}
    reader = RangeFileSystemReader(str(tmp_path))
    dcp.load(got, storage_reader=reader, no_dist=True)
    dcp.load(ref, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert_same(ref, got)
    assert torch.equal(got["cj"], c.conj().resolve_conj())
    assert reader.stats["fallback_items"] == 1
