"""Write results as columns, ``FastFileSystemWriter.finish`` from them, and the compact broadcast.

Every case is compared with torch: the ``.metadata`` ``FastFileSystemWriter``
writes from gathered columns must load (with torch's own reader) into the
fields torch's ``FileSystemWriter.finish`` stores for the same metadata and
results, in the same order, index hints included; the metadata a rank
receives from torch's object collective must equal the coordinator's.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.distributed.distributed_c10d as c10d
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from ckcore.checkpoint import CheckpointError
from ckcore.compact import CompactPlanError, pack_result_columns, unpack_result_columns
from ckcore.dcp import ColumnarMetadata, FastFileSystemWriter, FastSavePlanner
from ckcore.dcp._compact import (
    SentWriteResults,
    WriteResultColumns,
    result_columns,
    write_results,
)
from ckcore.dcp.planners import _compact_save_plan


def _item(fqn, size, offsets, sizes):
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData

    return WriteItem(
        index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
            properties=TensorProperties(dtype=torch.float32), size=torch.Size(size)))


def _bytes_item(fqn):
    return WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)


def _world(ranks: int, rows: int = 12):
    """Local plans of ``ranks`` ranks: a row-sharded matrix, a 0-d scalar everybody holds,
    a zero-size shard, a 3-d tensor and one bytes item per rank."""
    plans = []
    step = -(-rows // ranks)
    for r in range(ranks):
        lo = min(rows, r * step)
        hi = min(rows, lo + step)
        items = [_item("w", (rows, 5), (lo, 0), (hi - lo, 5)),
                 _item("s", (), (), ()),
                 _item("cube", (ranks, 2, 3), (r, 0, 0), (1, 2, 3)),
                 _bytes_item(f"extra.{r}")]
        plans.append(SavePlan(items, planner_data={"rank": r}))
    return plans


def _global(plans):
    planner = FastSavePlanner()
    planner._enable_plan_caching = False
    wire = [pickle.dumps(_compact_save_plan(p)) for p in plans]
    central, md = planner._create_global_plan([pickle.loads(b) for b in wire])
    assert type(md) is ColumnarMetadata
    return central, md


def _results(central, transforms=False):
    """What ``FileSystemWriter.write_data`` returns for each rank's kept items (synthesized)."""
    out = []
    for r, gp in enumerate(central):
        at, mine = 0, []
        for i, wi in enumerate(gp.items):
            length = 100 + 7 * i
            info = _StorageInfo(f"__{r}_0.distcp", at, length,
                                transform_descriptors=["zstd"] if transforms and i == 0 else None)
            mine.append(WriteResult(index=wi.index, size_in_bytes=length, storage_data=info))
            at += length
        out.append(mine)
    return out


def _writer(cls, path):
    path.mkdir(parents=True, exist_ok=True)
    return cls(str(path))


def _plain(md):
    """A torch ``Metadata`` of ``md``'s plan, built from its columns (``md`` stays unbuilt)."""
    from ckcore.dcp._lazy_metadata import _state_dict_metadata

    cols = md.ck_columns
    return Metadata(state_dict_metadata=_state_dict_metadata(cols), planner_data=cols.planner_data)


def _entries(md):
    return [(k.fqn, k.offset, k.index, v) for k, v in md.storage_data.items()]


def _finish_both(tmp_path, md, results, received):
    """torch's finish on a plain copy with object results; ckcore's on ``md`` with ``received``."""
    ref_md = _plain(md)
    _writer(FileSystemWriter, tmp_path / "ref").finish(ref_md, results)
    _writer(FastFileSystemWriter, tmp_path / "got").finish(md, received)
    built = md.ck_built
    a = FileSystemReader(str(tmp_path / "ref")).read_metadata()
    b = FileSystemReader(str(tmp_path / "got")).read_metadata()
    assert type(b) is Metadata
    assert b.state_dict_metadata == a.state_dict_metadata
    assert b.planner_data == a.planner_data and b.version == a.version
    assert _entries(b) == _entries(a)
    assert b.storage_meta.modules == a.storage_meta.modules
    # In memory, the coordinator's metadata holds what torch's finish assigns.
    assert _entries(md) == _entries(ref_md)
    return md, built


@pytest.mark.parametrize("ranks", [1, 2, 5])
@pytest.mark.parametrize("transforms", [False, True])
def test_finish_from_gathered_columns_is_torchs(tmp_path, ranks, transforms):
    central, md = _global(_world(ranks))
    results = _results(central, transforms)
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    assert all(type(r) is WriteResultColumns for r in received)
    _, built = _finish_both(tmp_path, md, results, received)
    # The columns took the storage entries: no dict was built to write them.
    assert "storage_data" not in built and "state_dict_metadata" not in built


def test_finish_from_unpickled_own_results_is_torchs(tmp_path):
    """Without collectives the coordinator's own results arrive as the list itself."""
    central, md = _global(_world(1))
    results = _results(central)
    _finish_both(tmp_path, md, results, [SentWriteResults(results[0])])


def test_duplicate_keys_keep_torchs_first_key_and_last_value(tmp_path):
    central, md = _global(_world(3))
    results = _results(central)
    # Rank 2 also reports rank 0's first entry, with another hint and value.
    first = results[0][0]
    results[2].append(WriteResult(
        index=MetadataIndex(first.index.fqn, first.index.offset, 99), size_in_bytes=1,
        storage_data=_StorageInfo("__2_0.distcp", 5000, 1)))
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    md, _ = _finish_both(tmp_path, md, results, received)
    key = MetadataIndex(first.index.fqn, first.index.offset)
    assert md.storage_data[key].offset == 5000
    assert next(k for k in md.storage_data if k == key).index == first.index.index


def test_results_of_another_form_are_recorded_as_torch_does(tmp_path):
    """A writer's own storage_data type: torch's dict, written as torch writes it."""
    central, md = _global(_world(2))
    results = _results(central)
    results[1] = [WriteResult(index=wr.index, size_in_bytes=wr.size_in_bytes,
                              storage_data={"custom": wr.storage_data.offset})
                  for wr in results[1]]
    assert result_columns(results[1]) is None
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    assert type(received[1]) is list
    _finish_both(tmp_path, md, results, received)


def test_results_touched_on_the_coordinator_are_read_as_objects(tmp_path):
    """A received list someone built (and may have changed) is read from its objects."""
    central, md = _global(_world(2))
    results = _results(central)
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    received[0][0].storage_data.offset = 4242
    results[0][0].storage_data.offset = 4242
    _finish_both(tmp_path, md, results, received)


def test_write_data_returns_results_that_pickle_compactly(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(12.0).reshape(3, 4), "n": 3}
    writer = FastFileSystemWriter(str(tmp_path))
    seen = []
    orig = writer.finish

    def spy(metadata, results):
        seen.extend(results)
        orig(metadata, results)

    writer.finish = spy
    dcp.save(state, storage_writer=writer, planner=FastSavePlanner(), no_dist=True)
    assert len(seen) == 1 and type(seen[0]) is SentWriteResults
    sent = pickle.dumps(seen[0])
    assert type(pickle.loads(sent)) is WriteResultColumns
    assert list(pickle.loads(sent)) == list(seen[0])
    dest = {"w": torch.zeros(3, 4), "n": 0}
    dcp.load(dest, checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(dest["w"], state["w"]) and dest["n"] == 3


# ------------------------------------------------------------------ the broadcast


def _through_collective(obj):
    t, size = c10d._object_to_tensor(obj, torch.device("cpu"), None)
    return c10d._tensor_to_object(t, size, None), int(size.item())


def test_finished_metadata_travels_the_collective_as_file_bytes(tmp_path):
    central, md = _global(_world(4))
    results = _results(central, transforms=True)
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    FastFileSystemWriter(str(tmp_path)).finish(md, received)
    got, nbytes = _through_collective(md)
    assert type(got) is ColumnarMetadata
    assert len(md._ck_file_bytes()) <= nbytes < len(md._ck_file_bytes()) + 200
    assert got == md and _entries(got) == _entries(md)
    assert got.storage_meta == md.storage_meta
    # Everywhere else it pickles as torch's Metadata.
    plain = pickle.loads(pickle.dumps(md))
    assert type(plain) is Metadata and plain == md


def test_metadata_columns_cannot_hold_travels_as_objects(tmp_path):
    central, md = _global(_world(2))
    FastFileSystemWriter(str(tmp_path)).finish(md, _results(central))
    md.planner_data = {"obj": CheckpointError("not a plain value")}
    got, _ = _through_collective(md)
    assert type(got) is Metadata
    assert got.planner_data["obj"].args == ("not a plain value",)
    assert _entries(got) == _entries(md)


def test_metadata_whose_storage_was_replaced_travels_as_objects(tmp_path):
    central, md = _global(_world(2))
    FastFileSystemWriter(str(tmp_path)).finish(md, _results(central))
    md.storage_data = {}
    got, _ = _through_collective(md)
    assert type(got) is Metadata and got.storage_data == {}


# ------------------------------------------------------------------ damaged columns


def _packed(results):
    return pack_result_columns(result_columns(results))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_result_columns_roundtrip(data):
    central, _ = _global(_world(data.draw(st.integers(1, 4))))
    results = _results(central, transforms=data.draw(st.booleans()))
    r = data.draw(st.sampled_from(results))
    assert write_results(unpack_result_columns(_packed(r))) == r


def _damaged():
    central, _ = _global(_world(2))
    good = _packed(_results(central, transforms=True)[0])
    import json
    import zlib

    def body(mutate):
        raw = bytearray(zlib.decompress(good[3]))
        mutate(raw)
        return good[:3] + (zlib.compress(bytes(raw)),)

    def header(n, v):
        def m(raw):
            raw[:16] = np.array([n, v], dtype="<i8").tobytes()
        return m

    def column(i, value):
        def m(raw):
            n = int(np.frombuffer(bytes(raw[:8]), "<i8")[0])
            col = np.zeros(n, dtype="<i8")
            col[0] = value
            # Columns are byte planes: write the plane of column i from scratch.
            plane = col.view(np.uint8).reshape(n, 8).T.tobytes()
            raw[16 + 8 * n * i:16 + 8 * n * (i + 1)] = plane
        return m

    return {
        "not a tuple": [good],
        "wrong version": (99,) + good[1:],
        "fqn table not bytes": good[:1] + ("x",) + good[2:],
        "fqn table garbage": good[:1] + (b"garbage",) + good[2:],
        "tables not JSON": good[:2] + (zlib.compress(b"{"),) + good[3:],
        "tables wrong shape": good[:2] + (zlib.compress(json.dumps([[1], []]).encode()),)
        + good[3:],
        "transform row out of range": good[:2] + (zlib.compress(
            json.dumps([["p"], [[10**6, ["x"]]]]).encode()),) + good[3:],
        "truncated columns": good[:3] + (good[3][:-3],),
        "header says more": body(header(10**9, 0)),
        "negative header": body(header(-1, 0)),
        "fqn id out of range": body(column(0, 10**6)),
        "huge offset count": body(column(1, 2**62)),
        "negative length": body(column(6, -5)),
        "path id out of range": body(column(4, 7)),
    }


@pytest.mark.parametrize("case", sorted(_damaged()))
def test_damaged_result_columns_are_refused(case):
    parts = _damaged()[case]
    with pytest.raises(CompactPlanError, match="compact"):
        unpack_result_columns(parts)
    # Received damaged, the coordinator's finish refuses it too (no file written).
    with pytest.raises(CompactPlanError):
        list(WriteResultColumns(parts))


def test_damaged_results_never_reach_the_file(tmp_path):
    central, md = _global(_world(2))
    results = _results(central)
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    received[1] = WriteResultColumns(_damaged()["fqn id out of range"])
    with pytest.raises(CompactPlanError):
        FastFileSystemWriter(str(tmp_path)).finish(md, received)
    assert not (tmp_path / ".metadata").exists()
