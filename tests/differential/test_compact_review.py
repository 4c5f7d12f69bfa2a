"""Review of the compact plan traffic: user hooks, mutation, races, hostile columns (torch side).

Single process. ``dcp.save``/``dcp.load`` run with ``no_dist=True`` but with
``_DistWrapper.gather_object``/``scatter_object`` replaced by a pickle round
trip, so each plan crosses pickle both ways exactly as it does between gloo
ranks: the load plan's items stay on the rank as a ticket, the save plan
travels as columns. Each test is one finding of the review (hooks replaced
on an instance, a ``finish_plan`` override, a list changed while it is
packed, an item changed in place after sending).
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint.default_planner import dedup_save_plans
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.utils import _DistWrapper

from ckcore.compact import CompactPlanError
from ckcore.dcp import FastLoadPlanner, FastSavePlanner, RangeFileSystemReader
from ckcore.dcp import _compact as c
from ckcore.dcp.planners import _compact_save_plan

from .test_compact_plans import fsdp, plans_of, shard


@pytest.fixture
def wire(monkeypatch):
    """Plans cross pickle in the planning collective; records what crossed."""
    seen: dict[str, list] = {"up": [], "down": []}

    def gather(self, obj):
        seen["up"].append(obj)
        return [pickle.loads(pickle.dumps(obj))]

    def scatter(self, object_list):
        seen["down"].append(object_list[0])
        return pickle.loads(pickle.dumps(object_list[0]))

    monkeypatch.setattr(_DistWrapper, "gather_object", gather)
    monkeypatch.setattr(_DistWrapper, "scatter_object", scatter)
    return seen


def _state(fill=None):
    def t(shape, k):
        v = torch.arange(1, 1 + shape[0] * shape[1], dtype=torch.float32).reshape(shape) * k
        return v if fill is None else torch.full(shape, fill)

    return {"m": {"a": t((6, 4), 1), "b": t((3, 5), 2)}, "n": 3 if fill is None else 0}


def _saved(tmp_path):
    path = tmp_path / "ck"
    dcp.save(_state(), storage_writer=FileSystemWriter(path), no_dist=True)
    return path


def _load(path, planner, reader):
    sd = _state(fill=-1.0)
    dcp.load(sd, storage_reader=reader, planner=planner, no_dist=True)
    assert torch.equal(sd["m"]["a"], _state()["m"]["a"]) and sd["n"] == 3
    assert torch.equal(sd["m"]["b"], _state()["m"]["b"])


def _sent_ticket(wire):
    items = wire["up"][-1].items
    return isinstance(items, c.ReadItemsTicket) or (
        isinstance(items, c.LocalReadItems) and items.stay)


def test_load_items_stay_on_the_rank_with_the_file_system_readers(tmp_path, wire):
    path = _saved(tmp_path)
    for reader in (FileSystemReader(path), RangeFileSystemReader(path)):
        _load(path, FastLoadPlanner(), reader)
        assert _sent_ticket(wire)
        assert len(pickle.dumps(wire["up"][-1])) < 1024


class _FinishReads(FastLoadPlanner):
    def finish_plan(self, new_plan):
        # Reads the items before (or instead of) FastLoadPlanner.finish_plan.
        assert all(it.dest_index.fqn for it in new_plan.items)
        return new_plan


def test_finish_plan_override_that_reads_the_items_gets_objects(tmp_path, wire):
    # Finding: the items stayed on the rank and the override got a ticket
    # (CompactPlanError on iteration), where torch's planner loads.
    path = _saved(tmp_path)
    _load(path, _FinishReads(), FileSystemReader(path))
    assert not _sent_ticket(wire)


def test_reader_hook_replaced_on_the_instance_gets_objects(tmp_path, wire):
    # Finding: only the reader's class was checked; a prepare_global_plan set
    # on the instance iterated a ticket.
    path = _saved(tmp_path)
    reader = FileSystemReader(path)
    seen = []

    def prepare_global_plan(plans):
        seen.append(sum(1 for p in plans for _ in p.items))
        return plans

    reader.prepare_global_plan = prepare_global_plan
    _load(path, FastLoadPlanner(), reader)
    assert seen and seen[0] > 0
    assert not _sent_ticket(wire)


def test_planner_hook_replaced_on_the_instance_gets_objects(tmp_path, wire):
    path = _saved(tmp_path)
    planner = FastLoadPlanner()
    planner.create_global_plan = lambda plans: [
        dataclasses.replace(p, items=list(reversed(list(p.items)))) for p in plans]
    _load(path, planner, FileSystemReader(path))
    assert not _sent_ticket(wire)


def test_ticket_that_reaches_code_iterating_it_names_the_cause():
    t = pickle.loads(pickle.dumps(c.LocalReadItems([object(), object()])))
    assert isinstance(t, c.ReadItemsTicket) and len(t) == 2
    # count(): the ticket's item count once hid Sequence.count ("'int' object is not callable").
    for use in (list, lambda x: x[0], lambda x: [i for i in x], lambda x: x.count(None),
                lambda x: None in x, lambda x: list(reversed(x)), lambda x: x.index(None)):
        with pytest.raises(CompactPlanError, match="stayed on their rank"):
            use(t)


def test_dedup_replaced_on_the_instance_is_used(tmp_path):
    # Finding: only the class's _dedup_save_plans was checked; one set on the
    # instance was ignored by the column path.
    plans = plans_of([[shard("r", (4,), (0,), (4,))]] * 3)
    coordinator = FastSavePlanner()
    calls = []

    def lowest(all_plans):
        calls.append(len(all_plans))
        return dedup_save_plans(all_plans, save_to_lowest_rank=True)

    coordinator._dedup_save_plans = lowest
    gathered = [pickle.loads(pickle.dumps(_compact_save_plan(p))) for p in plans]
    global_plan, _ = coordinator._create_global_plan(gathered)
    assert calls == [3]
    assert [len(list(p.items)) for p in global_plan] == [1, 0, 0]


def test_list_changed_while_it_is_packed_never_mixes_two_lists(monkeypatch):
    # Finding: current_parts packed the list, then snapshotted it again; a
    # change in between (another thread) left parts of one list with the
    # items of another, and finish_plan applied the coordinator's keep/hint
    # columns to the wrong items.
    plans = plans_of(fsdp(2, [("a", (8, 2)), ("b", (6,))]))
    planner = FastSavePlanner()
    planner.plan = _compact_save_plan(plans[0])
    items = planner.plan.items
    items.append(shard("c", (4,), (0,), (4,)))  # repacked when pickled
    real = c.write_columns
    intruder = shard("z", (2,), (0,), (2,))

    def racing(its):
        cols = real(its)
        items[0] = intruder  # another thread, right after the packing
        return cols

    monkeypatch.setattr(c, "write_columns", racing)
    sent = pickle.loads(pickle.dumps(planner.plan))
    monkeypatch.setattr(c, "write_columns", real)
    other = pickle.loads(pickle.dumps(_compact_save_plan(plans[1])))
    global_plan, _ = FastSavePlanner()._create_global_plan([sent, other])
    try:
        done = planner.finish_plan(pickle.loads(pickle.dumps(global_plan[0])))
    except CompactPlanError:
        return  # refusing is fine; writing a mix is not
    assert [it.index.fqn for it in done.items] == [it.index.fqn for it in global_plan[0].items]


def test_item_changed_in_place_after_sending_is_not_written():
    plans = plans_of(fsdp(2, [("a", (8, 2))]))
    planner = FastSavePlanner()
    planner.plan = _compact_save_plan(plans[0])
    sent = pickle.loads(pickle.dumps(planner.plan))
    other = pickle.loads(pickle.dumps(_compact_save_plan(plans[1])))
    global_plan, _ = FastSavePlanner()._create_global_plan([sent, other])
    planner.plan.items[0].tensor_data.chunk.sizes = torch.Size([99, 2])
    try:
        done = planner.finish_plan(pickle.loads(pickle.dumps(global_plan[0])))
    except (CompactPlanError, ValueError):
        return
    # torch's finish_plan returns the coordinator's copy: the chunk it validated.
    assert done.items[0].tensor_data.chunk.sizes == torch.Size([4, 2])


@pytest.mark.parametrize("fqn", ["", "\udc80", "\ud800x", "é.ü", "a\x00b", "ß" * 300])
def test_odd_fqns_travel_exactly(fqn):
    plans = plans_of([[shard(fqn, (4,), (0,), (2,))], [shard(fqn, (4,), (2,), (2,))]],
                     flatten=False)
    gathered = [pickle.loads(pickle.dumps(_compact_save_plan(p))) for p in plans]
    assert all(isinstance(p.items, c.WriteItemColumns) for p in gathered)
    global_plan, md = FastSavePlanner(flatten_state_dict=False)._create_global_plan(gathered)
    assert list(md.state_dict_metadata) == [fqn]
    assert [it.index.fqn for p in global_plan for it in p.items] == [fqn, fqn]


class MyItem(tp.WriteItem):
    """A user's WriteItem subclass."""


class MyProps(tm.TensorProperties):
    """A user's TensorProperties subclass."""


def test_subclassed_torch_objects_travel_as_objects():
    base = shard("a", (4,), (0,), (4,))
    variants = [
        MyItem(index=base.index, type=base.type, tensor_data=base.tensor_data),
        dataclasses.replace(base, tensor_data=dataclasses.replace(
            base.tensor_data, properties=MyProps(dtype=torch.float32))),
        dataclasses.replace(base, index=dataclasses.replace(base.index, index=0)),
    ]
    for it in variants:
        plan = _compact_save_plan(plans_of([[it]])[0])
        got = pickle.loads(pickle.dumps(plan))
        assert type(got.items) is list and type(got.items[0]) is type(it)


def _ticket_planner(items):
    planner = FastLoadPlanner()
    planner._sent_items = c.LocalReadItems(items)
    return planner, pickle.loads(pickle.dumps(planner._sent_items))


def test_load_ticket_of_another_rank_or_changed_items_is_refused():
    from torch.distributed.checkpoint.planner import LoadPlan

    mine, my_ticket = _ticket_planner([object()])
    _other, other_ticket = _ticket_planner([object()])
    with pytest.raises(CompactPlanError, match="not this rank's"):
        mine.finish_plan(LoadPlan(other_ticket))
    # The rank's list changed after it was sent: refused, not silently the new list.
    mine._sent_items.append(object())
    with pytest.raises(CompactPlanError):
        mine.finish_plan(LoadPlan(my_ticket))
    fresh, ticket = _ticket_planner([1, 2])
    assert list(fresh.finish_plan(LoadPlan(ticket)).items) == [1, 2]
