"""RangeFileSystemReader on untrusted checkpoints: safe metadata.

* ``read_metadata`` goes through ckcore's allow-list unpickler and returns
  exactly what torch's ``FileSystemReader.read_metadata`` returns (types,
  field values, ``MetadataIndex.index`` hints, dict order, the fresh
  ``load_id``) for real checkpoints: saved here by torch 2.13, the committed
  fixtures under tests/data/, rank-local ``__0.metadata``.
* A ``.metadata`` carrying a ``__reduce__`` payload is refused and the
  payload never runs; ``safe_metadata=False`` brings back torch's
  ``pickle.load`` (shown with a payload that only creates a marker file in
  tmp_path).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore.checkpoint import CheckpointError, UnsafeCheckpointError
from ckcore.dcp import FastLoadPlanner
from ckcore.dcp.reader import RangeFileSystemReader

from ._identical import assert_identical

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

DATA = pathlib.Path(__file__).with_name("data")


# ---------------------------------------------------------------- helpers


def read_both(path, **kwargs):
    """torch's and ckcore's read_metadata of ``path``, with the same load_id."""
    ref_reader = FileSystemReader(path)
    ours = RangeFileSystemReader(path)
    ours.load_id = ref_reader.load_id
    return ref_reader.read_metadata(**kwargs), ours.read_metadata(**kwargs)


def state_dict():
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(40, 24, generator=g),
        "wb": torch.randn(17, 9, generator=g).bfloat16(),
        "wt": torch.randn(9, 31, generator=g).t(),
        "i": torch.arange(50),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "nested": {"a": torch.ones(3, 4), "note": "text"},
        "step": 11,
        "blob": b"\x00raw",
    }


def zeros_like(sd):
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd, memory_format=torch.contiguous_format)
    if isinstance(sd, dict):
        return {k: zeros_like(v) for k, v in sd.items()}
    return None


def filled_like(sd, value=-7.0):
    if isinstance(sd, torch.Tensor):
        t = torch.empty_like(sd, memory_format=torch.contiguous_format)
        return t.fill_(True if t.dtype == torch.bool else value)
    if isinstance(sd, dict):
        return {k: filled_like(v, value) for k, v in sd.items()}
    return None


def assert_equal_sd(a, b, where="sd"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_sd(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def rewrite_metadata(path, edit):
    """Load ``path``'s metadata with torch, apply ``edit`` to it, pickle it back as torch does."""
    md = FileSystemReader(str(path)).read_metadata()
    md.storage_meta.load_id = None  # not in files FileSystemWriter writes
    edit(md)
    with open(pathlib.Path(path) / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    sd = state_dict()
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return path, sd


# ---------------------------------------------------------------- metadata equals torch's


@pytest.mark.parametrize("name", ["dcp_small", "dcp_sharded"])
def test_committed_fixtures_read_like_torch(name):
    ref, got = read_both(str(DATA / name))
    assert_identical(ref, got)
    assert got.storage_meta.load_id is not None


def test_fresh_save_reads_like_torch(saved):
    path, _ = saved
    for p in (str(path), path):  # str and PathLike checkpoint ids
        ref, got = read_both(p)
        assert_identical(ref, got)
    # every storage entry keeps torch's classes, with the index hint
    assert {type(v).__name__ for v in got.storage_data.values()} == {"_StorageInfo"}
    assert {type(k).__module__ for k in got.storage_data} == {
        "torch.distributed.checkpoint.metadata"
    }
    assert any(k.index is not None for k in got.storage_data)


def test_load_id_is_stamped_like_torch(saved, tmp_path):
    path, _ = saved
    reader = RangeFileSystemReader(str(path))
    md = reader.read_metadata()
    assert md.storage_meta.load_id == reader.load_id
    reader.reset()  # a new load gets a new id, as in torch
    assert reader.read_metadata().storage_meta.load_id == reader.load_id != md.storage_meta.load_id
    # no storage_meta in the file: torch makes an empty one to hold the id
    copy = tmp_path / "c"
    shutil.copytree(path, copy)
    rewrite_metadata(copy, lambda m: setattr(m, "storage_meta", None))
    ref, got = read_both(str(copy))
    assert_identical(ref, got)
    assert got.storage_meta.checkpoint_id is None and got.storage_meta.load_id is not None


def test_checkpoint_id_given_to_load_is_followed(saved):
    path, sd = saved
    reader = RangeFileSystemReader("/nonexistent/elsewhere")
    got = zeros_like(sd)
    dcp.load(got, checkpoint_id=str(path), storage_reader=reader, no_dist=True)
    assert_equal_sd(sd, got)
    assert pathlib.Path(reader.path) == path


def test_rank_local_metadata_reads_like_torch(tmp_path):
    sd = state_dict()
    path = tmp_path / "ranklocal"
    dcp.save(sd, checkpoint_id=str(path), no_dist=True, use_collectives=False)
    assert (path / "__0.metadata").is_file() and not (path / ".metadata").exists()
    ref, got = read_both(str(path), rank=0)
    assert_identical(ref, got)
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        RangeFileSystemReader(str(path)).read_metadata()  # torch: FileNotFoundError
    # dcp.load falls back to __{rank}.metadata through read_metadata(rank=...)
    got_sd = zeros_like(sd)
    dcp.load(got_sd, storage_reader=RangeFileSystemReader(str(path)), planner=FastLoadPlanner(),
             no_dist=True)
    assert_equal_sd(sd, got_sd)


@pytest.mark.parametrize("planner", ["fast", "default"])
def test_planners_load_through_the_safe_reader(saved, planner):
    path, sd = saved
    make = {"fast": FastLoadPlanner, "default": DefaultLoadPlanner}[planner]
    ref = zeros_like(sd)
    dcp.load(ref, storage_reader=FileSystemReader(str(path)), planner=DefaultLoadPlanner(),
             no_dist=True)
    got = zeros_like(sd)
    dcp.load(got, storage_reader=RangeFileSystemReader(str(path)), planner=make(), no_dist=True)
    assert_equal_sd(ref, got)
    assert_equal_sd(sd, got)


# ---------------------------------------------------------------- code-execution payloads


class _TouchPayload:
    """Unpickles as ``Path(marker).touch()``: harmless, but proves code ran."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _SystemPayload:
    """Unpickles as ``os.system("touch marker")``; only ever fed to the safe reader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, payload, where):
    def edit(md):
        if where == "planner_data":
            md.planner_data = {"w": payload}
        elif where == "storage_meta":
            md.storage_meta.save_id = payload
        else:  # a storage entry's offset
            key = next(iter(md.storage_data))
            md.storage_data[key].offset = payload

    rewrite_metadata(path, edit)


@pytest.mark.parametrize("where", ["planner_data", "storage_meta", "storage_data"])
@pytest.mark.parametrize("payload", [_TouchPayload, _SystemPayload])
def test_code_payload_is_refused_and_never_runs(saved, tmp_path, payload, where):
    path, sd = saved
    copy = tmp_path / "evil"
    shutil.copytree(path, copy)
    marker = tmp_path / "marker"
    _plant(copy, payload(marker), where)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing global"):
        RangeFileSystemReader(str(copy)).read_metadata()
    assert not marker.exists()
    # through dcp.load: both metadata attempts (global, then rank-local) fail
    got = filled_like(sd)
    with pytest.raises(CheckpointException, match="refusing global"):
        dcp.load(got, storage_reader=RangeFileSystemReader(str(copy)), planner=FastLoadPlanner(),
                 no_dist=True)
    assert not marker.exists()
    assert_equal_sd(filled_like(sd), got)


def test_opt_out_restores_torchs_pickle_load(saved, tmp_path):
    path, _ = saved
    copy = tmp_path / "evil"
    shutil.copytree(path, copy)
    marker = tmp_path / "marker"
    _plant(copy, _TouchPayload(marker), "planner_data")
    with pytest.raises(UnsafeCheckpointError):
        RangeFileSystemReader(str(copy), safe_metadata=True).read_metadata()
    assert not marker.exists()
    reader = RangeFileSystemReader(str(copy), safe_metadata=False)
    md = reader.read_metadata()
    assert marker.exists()  # torch's pickle.load ran the payload
    ref = FileSystemReader(str(copy))
    ref.load_id = reader.load_id
    assert_identical(ref.read_metadata(), md)
    assert md.planner_data == {"w": None}  # what Path.touch returned


def test_opt_out_reads_custom_classes(saved, tmp_path):
    """A trusted checkpoint whose planner_data holds a class off the allow-list."""
    path, _ = saved
    copy = tmp_path / "custom"
    shutil.copytree(path, copy)
    rewrite_metadata(copy, lambda m: setattr(m, "planner_data", {"w": _Custom()}))
    with pytest.raises(UnsafeCheckpointError):
        RangeFileSystemReader(str(copy)).read_metadata()
    md = RangeFileSystemReader(str(copy), safe_metadata=False).read_metadata()
    assert md.planner_data == {"w": _Custom()}


@dataclasses.dataclass
class _Custom:
    value: int = 5
