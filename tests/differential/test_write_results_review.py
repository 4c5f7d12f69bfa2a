"""Review regressions: the collective's file bytes must read back on the receivers, and storage
records the columns cannot hold exactly are written (and kept in memory) as torch's objects."""

from __future__ import annotations

import os
import pickle

import pytest
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from ckcore.checkpoint import CheckpointError
from ckcore.dcp import ColumnarMetadata, FastFileSystemWriter
from ckcore.dcp._compact import SentWriteResults

from .test_write_results_columns import (
    _entries,
    _global,
    _plain,
    _results,
    _through_collective,
    _world,
)


class _UserPath(os.PathLike):
    def __init__(self, p):
        self.p = p

    def __fspath__(self):
        return self.p

    def __eq__(self, other):
        return isinstance(other, _UserPath) and other.p == self.p

    __hash__ = None

    def __reduce__(self):
        return (_UserPath, (self.p,))


def _finished(tmp_path):
    central, md = _global(_world(2))
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in _results(central)]
    FastFileSystemWriter(str(tmp_path)).finish(md, received)
    return md


@pytest.mark.parametrize("mutate", [
    lambda md: setattr(md, "planner_data", {"ranks": {0: "coordinator", 1: "worker"}}),
    lambda md: setattr(md, "planner_data", {"p": _UserPath("/x")}),
    lambda md: setattr(md.storage_meta, "checkpoint_id", _UserPath("/ckpt")),
    lambda md: setattr(md.storage_meta, "save_id", 5),
], ids=["int dict keys", "user PathLike in planner_data", "user PathLike checkpoint_id",
        "int save_id"])
def test_values_the_receivers_reader_refuses_travel_as_objects(tmp_path, mutate):
    md = _finished(tmp_path)
    mutate(md)
    got, _ = _through_collective(md)  # raised on the receiver before the fix
    assert type(got) is Metadata
    assert got == md and _entries(got) == _entries(md)


def test_plain_values_still_travel_as_file_bytes(tmp_path):
    md = _finished(tmp_path)
    md.planner_data = {"t": (1, "a", None), "l": [1.5, True]}
    got, _ = _through_collective(md)
    assert type(got) is ColumnarMetadata and got == md


class _Info(_StorageInfo):
    pass


def _odd(kind, wr):
    info = wr.storage_data
    if kind == "subclass":
        info = _Info(info.relative_path, info.offset, info.length)
    elif kind == "extra attribute":
        info.extra = 1
    elif kind == "negative hint":
        return WriteResult(index=MetadataIndex(wr.index.fqn, wr.index.offset, -1),
                           size_in_bytes=wr.size_in_bytes, storage_data=info)
    return WriteResult(index=wr.index, size_in_bytes=wr.size_in_bytes, storage_data=info)


@pytest.mark.parametrize("kind", ["subclass", "extra attribute", "negative hint"])
def test_odd_storage_records_are_torchs_in_file_and_memory(tmp_path, kind):
    central, md = _global(_world(2))
    results = _results(central)
    results[1][0] = _odd(kind, results[1][0])
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    ref_md = _plain(md)
    (tmp_path / "ref").mkdir()
    (tmp_path / "got").mkdir()
    FileSystemWriter(str(tmp_path / "ref")).finish(ref_md, results)
    FastFileSystemWriter(str(tmp_path / "got")).finish(md, received)
    for a, b in ((FileSystemReader(str(tmp_path / "ref")).read_metadata(),
                  FileSystemReader(str(tmp_path / "got")).read_metadata()), (ref_md, md)):
        assert _entries(b) == _entries(a)
        assert [type(v) for v in b.storage_data.values()] == [type(v) for v in a.storage_data.values()]
        assert [getattr(v, "extra", None) for v in b.storage_data.values()] == \
            [getattr(v, "extra", None) for v in a.storage_data.values()]


@pytest.mark.parametrize("value", [b"raw bytes", 2**80, CheckpointError("custom")],
                         ids=["bytes", "int beyond int64", "custom object"])
def test_unwritable_planner_data_before_finish_keeps_the_storage_entries(tmp_path, value):
    """A planner_data dumps_metadata cannot write, set before finish: torch's pickle with torch's storage dict."""
    central, md = _global(_world(2))
    md.planner_data = {"custom": value}
    results = _results(central)
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    ref_md = _plain(md)
    ref_md.planner_data = {"custom": value}
    (tmp_path / "ref").mkdir()
    (tmp_path / "got").mkdir()
    FileSystemWriter(str(tmp_path / "ref")).finish(ref_md, results)
    FastFileSystemWriter(str(tmp_path / "got")).finish(md, received)
    a = FileSystemReader(str(tmp_path / "ref")).read_metadata()
    b = FileSystemReader(str(tmp_path / "got")).read_metadata()
    assert b.storage_data is not None and len(b.storage_data) == len(a.storage_data) > 0
    assert _entries(b) == _entries(a)
    assert _entries(md) == _entries(ref_md)
