"""Compact save plans (ckcore.compact, ckcore.dcp._compact) against torch's planner.

Each case replays the planning collective of ``dcp.save`` in one process:
every rank's local plan goes through ``FastSavePlanner``'s compaction and
``pickle`` (what ``_DistWrapper.gather_object`` does), the coordinator
plans, the global plans are pickled back and every rank runs
``finish_plan``. The finished plans and the metadata must equal what
torch's ``DefaultSavePlanner`` produces from the same objects, and a plan
torch refuses must be refused with torch's error. Hypothesis draws the
layouts (shards of 1-d to 4-d tensors on grids, zero-size chunks, 0-d
tensors, tensors replicated on several ranks, bytes items), and a few
adversarial ones are fixed.
"""

from __future__ import annotations

import dataclasses
import pickle
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ckcore.compact import FORMAT_VERSION, CompactPlanError, pack_write_columns
from ckcore.dcp import FastSavePlanner
from ckcore.dcp import _compact as c
from ckcore.dcp.planners import _compact_save_plan

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float16]


def shard(fqn, shape, offs, sizes, dtype=torch.float32, kind=tp.WriteItemType.SHARD):
    return tp.WriteItem(
        index=tm.MetadataIndex(fqn, torch.Size(offs)),
        type=kind,
        tensor_data=tp.TensorWriteData(
            chunk=tm.ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)),
            properties=tm.TensorProperties(dtype=dtype),
            size=torch.Size(shape),
        ),
    )


def whole(fqn, shape, dtype=torch.float32):
    return shard(fqn, shape, (0,) * len(shape), shape, dtype, tp.WriteItemType.TENSOR)


def blob(fqn):
    return tp.WriteItem(index=tm.MetadataIndex(fqn), type=tp.WriteItemType.BYTE_IO)


def plans_of(items_per_rank, flatten=True):
    out = []
    for items in items_per_rank:
        pd = {it.index.fqn: tuple(it.index.fqn.split(".")) for it in items} if flatten else None
        out.append(tp.SavePlan(list(items), planner_data=pd))
    return out


def torch_global(plans, lowest, flatten=True):
    p = DefaultSavePlanner(flatten_state_dict=flatten, dedup_save_to_lowest_rank=lowest)
    return p._create_global_plan(plans)


def ckcore_collective(plans, lowest, flatten=True):
    """The coordinator's result and every rank's finished plan, through pickle both ways."""
    senders = []
    wire = []
    for plan in plans:
        planner = FastSavePlanner(flatten_state_dict=flatten, dedup_save_to_lowest_rank=lowest)
        planner.plan = _compact_save_plan(plan)
        senders.append(planner)
        wire.append(pickle.dumps(planner.plan))
    coordinator = FastSavePlanner(flatten_state_dict=flatten, dedup_save_to_lowest_rank=lowest)
    gathered = [pickle.loads(b) for b in wire]
    global_plan, metadata = coordinator._create_global_plan(gathered)
    finished = [s.finish_plan(pickle.loads(pickle.dumps(g))) for s, g in zip(senders, global_plan)]
    return global_plan, metadata, finished, wire


def assert_same_as_torch(rank_items, lowest=False, flatten=True, expect_columns=None):
    plans = plans_of(rank_items, flatten)
    try:
        t_plans, t_md = torch_global(plans, lowest, flatten)
    except (AssertionError, ValueError, AttributeError) as e:
        with pytest.raises(type(e)) as got:
            ckcore_collective(plans, lowest, flatten)
        assert str(got.value) == str(e)
        return None
    g, md, finished, _ = ckcore_collective(plans, lowest, flatten)
    assert md == t_md
    assert list(md.state_dict_metadata) == list(t_md.state_dict_metadata)
    for mine, theirs in zip(finished, t_plans):
        assert list(mine.items) == list(theirs.items)
        assert [i.index.index for i in mine.items] == [i.index.index for i in theirs.items]
        assert mine.planner_data == theirs.planner_data
    if expect_columns is not None:
        assert all(isinstance(p.items, c.GlobalWriteItems) for p in g) == expect_columns
    return g


# ------------------------------------------------------------------ layouts


@st.composite
def rank_layouts(draw):
    world = draw(st.integers(1, 5))
    ranks: list[list] = [[] for _ in range(world)]
    for t in range(draw(st.integers(1, 4))):
        fqn = f"m.t{t}.w"
        nd = draw(st.integers(0, 4))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=nd, max_size=nd)))
        dtype = draw(st.sampled_from(DTYPES))
        how = draw(st.sampled_from(["rows", "replicated", "grid", "rank0"]))
        if nd == 0 or how == "rank0":
            ranks[0].append(whole(fqn, shape, dtype))
        elif how == "replicated":
            holders = draw(st.lists(st.integers(0, world - 1), min_size=1, max_size=world, unique=True))
            for r in sorted(holders):
                ranks[r].append(whole(fqn, shape, dtype))
        else:
            parts = draw(st.integers(1, 4))
            step = -(-shape[0] // parts) if shape[0] else 0
            boxes = []
            for k in range(parts):
                lo = min(k * step, shape[0])
                hi = min(lo + step, shape[0])
                if how == "grid" and nd > 1 and shape[1] > 1:
                    mid = shape[1] // 2
                    boxes.append(((lo,) + (0,) * (nd - 1), (hi - lo, mid) + shape[2:]))
                    boxes.append(((lo, mid) + (0,) * (nd - 2), (hi - lo, shape[1] - mid) + shape[2:]))
                else:
                    boxes.append(((lo,) + (0,) * (nd - 1), (hi - lo,) + shape[1:]))
            for k, (o, s) in enumerate(boxes):
                ranks[draw(st.integers(0, world - 1))].append(shard(fqn, shape, o, s, dtype))
    if draw(st.booleans()):
        ranks[0].append(blob("extra.step"))
    for items in ranks:
        draw(st.randoms()).shuffle(items)
    return ranks


@settings(max_examples=150, deadline=None)
@given(rank_layouts(), st.booleans())
def test_compact_collective_equals_torch(layout, lowest):
    assert_same_as_torch(layout, lowest)


def fsdp(world, shapes):
    return [[shard(f, s, (min(r * -(-s[0] // world), s[0]),) + (0,) * (len(s) - 1),
                   (max(0, min(-(-s[0] // world), s[0] - min(r * -(-s[0] // world), s[0]))),)
                   + s[1:]) for f, s in shapes] for r in range(world)]


SHAPES = [("layers.0.wq", (64, 16)), ("layers.0.norm", (16,)), ("out", (7, 3)),
          ("e.experts", (8, 4, 6, 2))]


def test_fsdp_takes_the_column_path():
    assert_same_as_torch(fsdp(8, SHAPES), expect_columns=True)


@pytest.mark.parametrize("lowest", [False, True])
def test_replicated_norms_dedup_like_torch(lowest):
    ranks = fsdp(6, SHAPES)
    for r in range(6):
        ranks[r].append(whole("norm", (16,), torch.bfloat16))
        ranks[r].append(whole("big", (4, 4), torch.float32))
    ranks[0].append(blob("step"))
    assert_same_as_torch(ranks, lowest, expect_columns=True)


def _short_and_replicated(world):
    # Tensors with fewer rows than ranks: trailing ranks share the end offset
    # (keys that repeat in rank order). Two replica groups each holding the
    # whole sharding (keys that go back to offset 0, hashed per fqn).
    ranks = fsdp(world, [("kv", (world // 2, 4)), ("norm", (world - 10,)), ("w", (80, 2))])
    groups = fsdp(world // 2, [("rep", (10, 3))])
    for r in range(world):
        ranks[r] += groups[r % (world // 2)]
        ranks[r].append(whole("scale", (2,), torch.bfloat16))
    return ranks


@pytest.mark.parametrize("lowest", [False, True])
def test_more_ranks_than_rows_and_replicas_in_two_groups_dedup_like_torch(lowest):
    # 24 ranks: every size tie is among holders whose set of ranks iterates
    # ascending, where torch's choice is ckcore's lowest rank (see
    # ckcore.global_plan.dedup_save_plans for ties beyond).
    assert_same_as_torch(_short_and_replicated(24), lowest, expect_columns=True)


def test_unflattened_plans():
    assert_same_as_torch(fsdp(4, SHAPES), flatten=False, expect_columns=True)


def test_huge_offsets_and_zero_size_chunks():
    big = (1 << 62, 1)
    ranks = [[shard("h", big, (0, 0), (1 << 61, 1), torch.bool)],
             [shard("h", big, (1 << 61, 0), (1 << 61, 1), torch.bool)],
             [shard("z", (0, 5), (0, 0), (0, 5))]]
    assert_same_as_torch(ranks, expect_columns=True)


def test_validation_failure_gives_torchs_error():
    ranks = [[shard("w", (8, 4), (0, 0), (5, 4))], [shard("w", (8, 4), (4, 0), (4, 4))]]
    assert_same_as_torch(ranks)


def test_out_of_bounds_chunk_gives_torchs_error():
    ranks = [[shard("w", (8, 4), (0, 0), (4, 4))], [shard("w", (8, 4), (4, 0), (5, 4))]]
    assert_same_as_torch(ranks)


def test_storage_size_beyond_int64_falls_back_like_torch():
    huge = (1 << 40, 1 << 30)
    ranks = [[whole("r", huge)], [whole("r", huge)], [shard("x", (4,), (0,), (4,))]]
    assert_same_as_torch(ranks, lowest=False)


def test_fqn_written_twice_by_tensor_items_gives_torchs_error():
    ranks = [[whole("w", (4,)), shard("w", (4,), (0,), (4,))], [shard("v", (2,), (0,), (2,))]]
    assert_same_as_torch(ranks)


def test_items_torch_cannot_pack_travel_as_objects():
    item = shard("w", (4,), (0,), (4,))
    hinted = dataclasses.replace(item, index=dataclasses.replace(item.index, index=3))
    plan = _compact_save_plan(tp.SavePlan([hinted]))
    assert type(plan.items) is list
    back = pickle.loads(pickle.dumps(plan))
    assert back.items == [hinted]


def test_compact_is_a_tenth_of_torchs_pickle_for_fsdp():
    shapes = [(f"model.layers.{i}.{n}.weight", (8192, 8192)) for i in range(20)
              for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    plan = plans_of([fsdp(1024, shapes)[5]])[0]
    assert len(pickle.dumps(_compact_save_plan(plan))) * 10 <= len(pickle.dumps(plan))


# ------------------------------------------------------------------ the forms behave as lists


def test_received_items_behave_as_a_list_of_write_items():
    items = fsdp(4, SHAPES)[1] + [blob("s")]
    got = pickle.loads(pickle.dumps(_compact_save_plan(tp.SavePlan(items))))
    assert isinstance(got.items, c.WriteItemColumns)
    assert len(got.items) == len(items)
    assert got.items == items and items == got.items
    assert got.items[0] == items[0] and list(got.items[1:]) == items[1:]
    assert [type(i.index.offset) for i in got.items[:-1]] == [torch.Size] * (len(items) - 1)
    replaced = dataclasses.replace(got, items=got.items)
    assert replaced.items == items
    # Pickling it again keeps it compact and equal.
    again = pickle.loads(pickle.dumps(got))
    assert isinstance(again.items, c.WriteItemColumns) and again.items == items


def test_sent_items_are_the_ranks_own_list():
    items = fsdp(4, SHAPES)[2]
    plan = _compact_save_plan(tp.SavePlan(items, planner_data={"a": ("a",)}))
    assert isinstance(plan.items, list) and plan.items == items
    assert all(a is b for a, b in zip(plan.items, items))
    assert plan.planner_data == {"a": ("a",)} and isinstance(plan.planner_data, dict)
    import copy
    assert type(copy.deepcopy(plan.items)) is list and type(copy.copy(plan.planner_data)) is dict


def test_received_mapping_behaves_as_a_mapping():
    plan = _compact_save_plan(tp.SavePlan([whole("w", (2,))], planner_data={"a.b": ("a", "b"), "c": ("c", 0)}))
    got = pickle.loads(pickle.dumps(plan)).planner_data
    assert isinstance(got, c.MappingColumns)
    assert dict(got) == {"a.b": ("a", "b"), "c": ("c", 0)} and got["c"] == ("c", 0)


# ------------------------------------------------------------------ bad input


def _gathered(world=3):
    plans = plans_of(fsdp(world, SHAPES))
    return [pickle.loads(pickle.dumps(_compact_save_plan(p))) for p in plans]


def _with_parts(plan, parts):
    return dataclasses.replace(plan, items=c.WriteItemColumns(parts))


def _damaged_cases():
    good = _gathered(1)[0].items.parts
    v, f, p, cols = good
    body = zlib.decompress(cols)
    header = np.frombuffer(body[:32], "<i8").copy()
    wrong_n = header.copy()
    wrong_n[0] += 1
    return {
        "version": ((FORMAT_VERSION + 1, f, p, cols), "format version"),
        "truncated columns": ((v, f, p, cols[:-3]), "columns"),
        "garbage fqns": ((v, b"garbage", p, cols), "fqn table"),
        "fqns not strings": ((v, zlib.compress(b"[1, 2]"), p, cols), "fqn table"),
        "props malformed": ((v, f, zlib.compress(b'[["torch.float32"]]'), cols), "props row 0"),
        "lengths disagree": ((v, f, p, zlib.compress(wrong_n.tobytes() + body[32:])), "header says"),
        "fqn table too short": ((v, zlib.compress(b'["x"]'), p, cols), "fqn id"),
        "bomb": ((v, f, p, zlib.compress(b"\0" * ((1 << 28) + 10), 9)), "inflates beyond"),
        "deep json": ((v, zlib.compress(b"[" * 100000), p, cols), "fqn table"),
        "not a tuple": ([v, f, p, cols], "expected"),
        "not bytes": ((v, "text", p, cols), "not bytes"),
    }


@pytest.mark.parametrize("case", sorted(_damaged_cases()))
def test_damaged_compact_plan_is_refused_naming_the_part(case):
    parts, needle = _damaged_cases()[case]
    plans = _gathered()
    plans[1] = _with_parts(plans[1], parts)
    with pytest.raises(CompactPlanError, match=needle):
        FastSavePlanner()._create_global_plan(plans)


def test_finish_plan_refuses_items_changed_after_sending():
    plans = plans_of(fsdp(2, SHAPES))
    planner = FastSavePlanner()
    planner.plan = _compact_save_plan(plans[0])
    wire = [pickle.dumps(planner.plan), pickle.dumps(_compact_save_plan(plans[1]))]
    g, _ = FastSavePlanner()._create_global_plan([pickle.loads(b) for b in wire])
    planner.plan.items[0] = shard("layers.0.wq", (64, 16), (1, 0), (31, 16))
    with pytest.raises(CompactPlanError, match="differ from the ones it sent"):
        planner.finish_plan(pickle.loads(pickle.dumps(g[0])))


def test_finish_plan_refuses_another_ranks_plan():
    plans = plans_of(fsdp(2, SHAPES))
    p0, p1 = FastSavePlanner(), FastSavePlanner()
    p0.plan, p1.plan = _compact_save_plan(plans[0]), _compact_save_plan(plans[1])
    g, _ = FastSavePlanner()._create_global_plan(
        [pickle.loads(pickle.dumps(p.plan)) for p in (p0, p1)])
    with pytest.raises(CompactPlanError):
        p0.finish_plan(pickle.loads(pickle.dumps(g[1])))


def test_hints_column_of_the_wrong_length_is_refused():
    plans = plans_of(fsdp(2, SHAPES))
    p0 = FastSavePlanner()
    p0.plan = _compact_save_plan(plans[0])
    parts = pickle.loads(pickle.dumps(p0.plan)).items.parts
    bad = tp.SavePlan(c.GlobalWriteItems.from_arrays(parts, None, np.zeros(1, dtype=np.int64)))
    with pytest.raises(CompactPlanError, match="hints"):
        p0.finish_plan(bad)


def test_pack_roundtrip_of_empty_plan():
    cols = c.write_columns([])
    assert cols is not None and len(cols) == 0
    parts = pack_write_columns(cols)
    assert list(c.WriteItemColumns(parts)) == []


# ------------------------------------------------------------------ load plans


def _saved(tmp_path):
    import torch.distributed.checkpoint as dcp
    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "n": 5}
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    return {"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "n": 0}


@pytest.mark.parametrize("reader", ["torch", "range"])
def test_load_items_stay_on_the_rank_with_file_system_readers(tmp_path, reader):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from ckcore.dcp import FastLoadPlanner, RangeFileSystemReader
    dest = _saved(tmp_path)
    planner = FastLoadPlanner()
    r = FileSystemReader(str(tmp_path)) if reader == "torch" else RangeFileSystemReader(str(tmp_path))
    dcp.load(dest, storage_reader=r, planner=planner, no_dist=True)
    assert torch.equal(dest["w"], torch.arange(12.0).reshape(3, 4)) and dest["n"] == 5
    sent = planner._sent_items
    assert isinstance(sent, c.LocalReadItems) and sent.stay
    wire = pickle.dumps(tp.LoadPlan(sent))
    assert len(wire) <= 1024
    ticket = pickle.loads(wire).items
    assert isinstance(ticket, c.ReadItemsTicket) and len(ticket) == len(sent)
    with pytest.raises(CompactPlanError, match="stayed on their rank"):
        list(ticket)
    final = planner.finish_plan(pickle.loads(wire))
    assert final.items == list(sent)


def test_load_items_travel_compact_with_another_reader(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from ckcore.dcp import FastLoadPlanner

    class Peeking(FileSystemReader):
        def prepare_global_plan(self, plans):
            self.seen = [len(list(p.items)) for p in plans]
            return plans

    dest = _saved(tmp_path)
    planner = FastLoadPlanner()
    reader = Peeking(str(tmp_path))
    dcp.load(dest, storage_reader=reader, planner=planner, no_dist=True)
    assert torch.equal(dest["w"], torch.arange(12.0).reshape(3, 4))
    sent = planner._sent_items
    assert not sent.stay
    got = pickle.loads(pickle.dumps(tp.LoadPlan(sent))).items
    assert isinstance(got, c.ReadItemColumns)
    assert list(got) == list(sent)
    assert planner.finish_plan(tp.LoadPlan(got)).items == list(sent)


def test_a_ticket_from_another_rank_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from ckcore.dcp import FastLoadPlanner
    dest = _saved(tmp_path)
    a, b = FastLoadPlanner(), FastLoadPlanner()
    dcp.load(dest, checkpoint_id=str(tmp_path), planner=a, no_dist=True)
    dcp.load(dest, checkpoint_id=str(tmp_path), planner=b, no_dist=True)
    other = pickle.loads(pickle.dumps(tp.LoadPlan(b._sent_items)))
    with pytest.raises(CompactPlanError, match="not this rank's"):
        a.finish_plan(other)


@pytest.mark.parametrize("case", ["version", "garbage", "fqn id", "not ints", "hint"])
def test_damaged_compact_read_items_are_refused(case):
    good = c.pack_read_items([tp.ReadItem(
        type=tp.LoadItemType.TENSOR, dest_index=tm.MetadataIndex("w", torch.Size([0])),
        dest_offsets=torch.Size([0]), storage_index=tm.MetadataIndex("w", torch.Size([0]), 0),
        storage_offsets=torch.Size([0]), lengths=torch.Size([3]))])
    assert good is not None
    rows = [["w"], [[0, [0, [0], None], [0, [0], 0], [0], [0], [3]]]]
    bad = {
        "version": (FORMAT_VERSION + 1, good[1]),
        "garbage": (FORMAT_VERSION, b"xx"),
        "fqn id": (FORMAT_VERSION, zlib.compress(str(rows).replace("[0, [0, [0]", "[0, [7, [0]").replace("'", '"').replace("None", "null").encode())),
        "not ints": (FORMAT_VERSION, zlib.compress(b'[["w"], [[0, [0, null, null], [0, null, null], ["a"], [0], [3]]]]')),
        "hint": (FORMAT_VERSION, zlib.compress(b'[["w"], [[0, [0, null, -4], [0, null, null], [0], [0], [3]]]]')),
    }[case]
    with pytest.raises(CompactPlanError):
        list(c.ReadItemColumns(bad))


# ------------------------------------------------------------------ torch's plan cache


def _caching_round(cls, rank_items, key_suffix):
    """One save's planning collective with enable_plan_caching=True, through pickle."""
    senders = []
    wire = []
    for r, items in enumerate(rank_items):
        planner = cls(enable_plan_caching=True)
        planner._cached_plans_key = f"{cls.__name__}-{key_suffix}-{r}"
        planner.state_dict = {}
        planner.flatten_state_dict = False
        planner.is_coordinator = r == 0
        senders.append(planner)
        # What create_local_plan does after building the plan.
        plan = tp.SavePlan(list(items))
        if cls is FastSavePlanner:
            plan = _compact_save_plan(plan)
        planner.plan = plan
        from torch.distributed.checkpoint.planner import SavePlanner

        from ckcore.dcp import dropins as d
        cached = SavePlanner._cached_save_plan.get(planner._cached_plans_key)
        if cached is not None and d._compare_save_plans(plan, cached):
            wire_plan = tp.SavePlan([], usable=False)
        else:
            planner._pending_local_plan = plan
            wire_plan = plan
        wire.append(pickle.dumps(wire_plan))
    coordinator = senders[0]
    coordinator._cached_plans_key = f"{cls.__name__}-{key_suffix}-coord"
    delta, md = coordinator.create_global_plan([pickle.loads(b) for b in wire])
    finished = [s.finish_plan(pickle.loads(pickle.dumps(g))) for s, g in zip(senders, delta)]
    return finished, md


@pytest.mark.parametrize("change", [False, True])
def test_plan_cache_protocol_matches_torch(change):
    first = fsdp(3, SHAPES)
    second = fsdp(3, SHAPES)
    if change:
        second[1] = second[1] + [whole("new", (3,))]
    key = f"cache-{change}"
    t1, tmd1 = _caching_round(DefaultSavePlanner, first, key)
    c1, cmd1 = _caching_round(FastSavePlanner, first, key)
    assert cmd1 == tmd1 and [list(p.items) for p in c1] == [list(p.items) for p in t1]
    t2, tmd2 = _caching_round(DefaultSavePlanner, second, key)
    c2, cmd2 = _caching_round(FastSavePlanner, second, key)
    assert cmd2 == tmd2
    assert [list(p.items) for p in c2] == [list(p.items) for p in t2]
    assert [p.usable for p in c2] == [p.usable for p in t2]


# ------------------------------------------------------------------ the coordinator's metadata


@pytest.mark.parametrize("writer", ["torch", "fast"])
def test_columnar_save_metadata_is_torchs(tmp_path, writer):
    """FastSavePlanner's metadata (columns) written by either writer reads back as torch's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from ckcore.dcp import FastFileSystemWriter
    from ckcore.dcp._lazy_metadata import ColumnarMetadata
    state = {"w": torch.arange(24.0).reshape(6, 4), "b": torch.ones(3, dtype=torch.bfloat16),
             "s": torch.tensor(2.5), "n": 7, "nested": {"x": torch.zeros(2, 2)}}
    ref, got = tmp_path / "ref", tmp_path / "got"
    dcp.save(state, checkpoint_id=str(ref), no_dist=True)
    planner = FastSavePlanner()
    w = FileSystemWriter(str(got)) if writer == "torch" else FastFileSystemWriter(str(got))
    dcp.save(state, storage_writer=w, planner=planner, no_dist=True)
    assert type(planner.metadata) is ColumnarMetadata
    a = FileSystemReader(str(ref)).read_metadata()
    b = FileSystemReader(str(got)).read_metadata()
    assert type(b) is tm.Metadata
    assert b.state_dict_metadata == a.state_dict_metadata
    assert list(b.state_dict_metadata) == list(a.state_dict_metadata)
    assert b.planner_data == a.planner_data
    assert b.storage_data == a.storage_data and b.version == a.version
    dest = {"w": torch.zeros(6, 4), "b": torch.zeros(3, dtype=torch.bfloat16),
            "s": torch.tensor(0.0), "n": 0, "nested": {"x": torch.ones(2, 2)}}
    dcp.load(dest, checkpoint_id=str(got), no_dist=True)
    assert torch.equal(dest["w"], state["w"]) and dest["n"] == 7
    assert torch.equal(dest["nested"]["x"], torch.zeros(2, 2)) and dest["s"].item() == 2.5
