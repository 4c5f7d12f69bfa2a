"""Differential tests of plan_global_save, rank 0's whole global save-planning step.

Its contract: results, raised exceptions, logged warnings and GC state are
exactly those of the step-by-step composition

    plans = dedup_save_plans(all_plans, save_to_lowest_rank) if dedup else list(all_plans)
    plans, md = create_global_save_plan(plans, rewrite_index_hints, types=types)
    errors = validate_global_plan(plans, md)

and, with torch's objects and torch's metadata classes, those of torch's
pipeline (``dedup_save_plans``, ``create_default_global_save_plan``,
``_validate_global_plan``). torch breaks dedup size ties by Python set order,
which is ascending rank order only up to 8 ranks: beyond that, layouts with
indices duplicated across ranks are compared with torch only with
``save_to_lowest_rank=True`` (always against the composition).

Every case runs three object kinds (torch objects + torch's metadata classes,
ckcore objects + ckcore's, torch objects + ckcore's metadata classes) and
compares everything observable: plan and item classes, equality, index hints
(not part of ``==``), which input objects the outputs share, metadata key
order and classes, the errors list, exceptions (type and message), the
warnings logged, inputs left untouched, and the GC enabled/freeze state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import itertools
import logging
import random
import types as pytypes
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as torch_dedup
from torch.distributed.checkpoint.default_planner import (
    _validate_global_plan,
    create_default_global_save_plan,
)

from ckcore import metadata as cm
from ckcore import planner as cp
from ckcore.global_plan import (
    CKCORE_TYPES,
    MetadataTypes,
    create_global_save_plan,
    dedup_save_plans,
    plan_global_save,
    validate_global_plan,
)
from tests.support.gp_cases import (
    TORCH_TYPES,
    ck_item,
    ck_plans,
    item_key,
    normalize,
    torch_item,
    torch_plans,
)

DTYPES = ["float32", "bfloat16", "int8", "float64", "complex64"]

# ------------------------------------------------------------------ running


@pytest.fixture(autouse=True)
def _gc_state_around_each_test():
    # run() checks each call; this also catches a GC left off across calls
    # (later calls would then see it off before and after).
    before = (gc.isenabled(), gc.get_freeze_count())
    assert before[0], "the GC is off before the test"
    yield
    after = (gc.isenabled(), gc.get_freeze_count())
    gc.enable()
    assert after == before, f"GC (enabled, frozen) went from {before} to {after}"


def composition(all_plans, *, dedup=True, save_to_lowest_rank=False, rewrite_index_hints=True,
                types=CKCORE_TYPES):
    plans = dedup_save_plans(all_plans, save_to_lowest_rank) if dedup else list(all_plans)
    plans, md = create_global_save_plan(plans, rewrite_index_hints, types=types)
    return plans, md, validate_global_plan(plans, md)


def torch_pipeline(all_plans, *, dedup=True, save_to_lowest_rank=False, rewrite_index_hints=True):
    plans = torch_dedup(all_plans, save_to_lowest_rank) if dedup else list(all_plans)
    plans, md = create_default_global_save_plan(plans, rewrite_index_hints)
    return plans, md, _validate_global_plan(plans, md)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.records.append((record.name, record.levelno, record.getMessage()))


# torch's "torch" and "torch.distributed" loggers do not propagate to the root.
_LOGGERS = ("", "torch", "torch.distributed")


@contextlib.contextmanager
def capture_logs():
    """Every WARNING+ record logged by ckcore or by torch's checkpoint code.

    ckcore's loggers are set to pass warnings whatever other tests set.
    """
    handler = _Collect()
    levels = {name: logging.getLogger(name).level for name in ("", "ckcore", "ckcore.global_plan")}
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ckcore").setLevel(logging.NOTSET)
    logging.getLogger("ckcore.global_plan").setLevel(logging.NOTSET)
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield handler.records
    finally:
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def snapshot(all_plans):
    """Everything about the input that the call must leave alone (hints included)."""
    if not isinstance(all_plans, (list, tuple)):
        return None
    out = [id(all_plans), len(all_plans)]
    for p in all_plans:
        items = getattr(p, "items", None)
        if isinstance(items, list):
            out.append((id(p), type(p), id(items), [id(i) for i in items],
                        [repr(getattr(i, "index", None)) for i in items], repr(p)))
        else:
            out.append((id(p), repr(p)))
    return out


def labels(all_plans):
    """id -> where in the input an object lives, to see what the outputs share."""
    out: dict[int, tuple] = {}

    def put(obj, *where):
        if obj is not None:
            out.setdefault(id(obj), where)

    if not isinstance(all_plans, (list, tuple)):
        return out
    for r, p in enumerate(all_plans):
        for k, it in enumerate(getattr(p, "items", None) or ()):
            put(it, "item", r, k)
            index = getattr(it, "index", None)
            put(index, "index", r, k)
            put(getattr(index, "offset", None), "index.offset", r, k)
            td = getattr(it, "tensor_data", None)
            if td is not None:
                put(td, "tensor_data", r, k)
                put(getattr(td, "chunk", None), "chunk", r, k)
                put(getattr(td, "properties", None), "properties", r, k)
                put(getattr(td, "size", None), "size", r, k)
        for attr in ("storage_data", "planner_data"):
            put(getattr(p, attr, None), attr, r)
    return out


@dataclasses.dataclass(repr=False)
class Outcome:
    inputs: Any
    labels: dict
    result: Any
    exc: BaseException | None
    logs: list

    def __repr__(self):
        return f"Outcome(exc={self.exc!r}, result={_short(self.result, 300)})"


def run(fn, make, **kw) -> Outcome:
    inputs = make()
    before = snapshot(inputs)
    where = labels(inputs)
    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    result = exc = None
    with capture_logs() as logs:
        try:
            result = fn(inputs, **kw)
        except Exception as e:  # noqa: BLE001 - compared below
            exc = e
    assert gc.isenabled() == enabled, f"{fn.__name__} left the GC {'off' if enabled else 'on'}"
    assert gc.get_freeze_count() == frozen, f"{fn.__name__} changed the frozen object count"
    assert snapshot(inputs) == before, f"{fn.__name__} modified its input plans"
    return Outcome(inputs, where, result, exc, list(logs))


def _dt(dtype):
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def view(out: Outcome, typed: bool, torch_ref: bool = False):
    """Comparable structure of a result: values, hints, classes, shared input objects.

    ``typed=False`` drops the classes (ckcore objects vs torch objects);
    ``torch_ref`` drops index.offset sharing (torch's MetadataIndex.__post_init__
    copies the offset into a new torch.Size, ckcore shares it).
    """
    plans, md, errors = out.result
    lab = out.labels

    def L(o):
        return lab.get(id(o))

    def LS(o):
        # Sizes and offsets: gp_cases' ckcore builder shares one tuple between
        # items (tuple(t) is t), torch's makes a torch.Size each time.
        return L(o) if typed else None

    def T(o):
        return type(o) if typed else None

    pv = []
    for k, p in enumerate(plans):
        src = out.inputs[k] if isinstance(out.inputs, (list, tuple)) else None
        shares = None if src is None else (p.storage_data is src.storage_data,
                                           p.planner_data is src.planner_data)
        iv = []
        for it in p.items:
            td = it.tensor_data
            tdv = None
            if td is not None:
                tdv = (T(td), L(td), T(td.chunk), L(td.chunk), L(td.properties), T(td.size), LS(td.size))
            iv.append((T(it), L(it), T(it.index), L(it.index), T(it.index.offset),
                       None if torch_ref else LS(it.index.offset), item_key(it),
                       T(it.type), it.type.name, it.bytes_io_data, tdv))
        pv.append((T(p), p is src, shares, p.usable, iv))

    mv = []
    for fqn, v in md.state_dict_metadata.items():
        if hasattr(v, "chunks"):
            mv.append((fqn, T(v), T(v.properties), L(v.properties), _dt(v.properties.dtype),
                       T(v.size), LS(v.size), tuple(v.size), T(v.chunks),
                       [(T(c), L(c), T(c.offsets), T(c.sizes), tuple(c.offsets), tuple(c.sizes))
                        for c in v.chunks]))
        else:
            mv.append((fqn, T(v), type(v).__name__))
    return (T(out.result), len(out.result), T(plans), pv,
            T(md), T(md.state_dict_metadata), mv, T(errors))


def _short(x, limit=600):
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} chars)"


def same(got, exp, what):
    """got == exp, else an AssertionError naming the first differing element.

    Cheap on failure too (pytest's own diff of a 1024-rank plan takes minutes).
    """
    if got == exp:
        return
    if isinstance(got, (list, tuple)) and isinstance(exp, (list, tuple)):
        for k, (g, e) in enumerate(zip(got, exp)):
            if g != e:
                same(g, e, f"{what}[{k}]")
        if len(got) != len(exp):
            raise AssertionError(f"{what}: length {len(got)} != {len(exp)}; extra: "
                                 f"{_short(got[len(exp):] or exp[len(got):])}")
    raise AssertionError(f"{what}:\n  got {_short(got)}\n  exp {_short(exp)}")


def same_exception(got: Outcome, exp: Outcome, who: str):
    if got.exc is None:
        raise AssertionError(f"{who} raised {exp.exc!r}, plan_global_save returned")
    if exp.exc is None:
        raise AssertionError(f"plan_global_save raised {got.exc!r}, {who} returned")
    same((type(got.exc).__name__, str(got.exc)), (type(exp.exc).__name__, str(exp.exc)),
         f"exception vs {who}")
    assert type(got.exc) is type(exp.exc)


def assert_same(got: Outcome, exp: Outcome):
    """plan_global_save's outcome is exactly the composition's."""
    if got.exc is not None or exp.exc is not None:
        same_exception(got, exp, "composition")
    else:
        same(type(got.result), type(exp.result), "result type")
        gp, gmd, gerr = got.result
        ep, emd, eerr = exp.result
        same(gerr, eerr, "errors")
        same(list(gmd.state_dict_metadata), list(emd.state_dict_metadata), "metadata keys")
        same(view(got, typed=True), view(exp, typed=True), "view")
        same(gp, ep, "plans")
        same(gmd, emd, "metadata")
    same(got.logs, exp.logs, "logs")


def assert_same_as_torch(got: Outcome, ref: Outcome, typed: bool):
    """ckcore's outcome equals torch's pipeline's (exact strings for torch objects)."""
    if got.exc is not None or ref.exc is not None:
        same_exception(got, ref, "torch")
        return
    norm = (lambda m: m) if typed else normalize
    gp, gmd, gerr = got.result
    rp, rmd, rerr = ref.result
    same(gerr, [norm(m) for m in rerr], "errors vs torch")
    same([(lv, m) for _, lv, m in got.logs], [(lv, norm(m)) for _, lv, m in ref.logs],
         "logs vs torch")
    same(list(gmd.state_dict_metadata), list(rmd.state_dict_metadata), "metadata keys vs torch")
    same(view(got, typed, torch_ref=True), view(ref, typed, torch_ref=True), "view vs torch")
    if typed:
        same(gp, rp, "plans vs torch")
        same(gmd, rmd, "metadata vs torch")


def flags(dedup, lowest, rewrite):
    return dict(dedup=dedup, save_to_lowest_rank=lowest, rewrite_index_hints=rewrite)


def check_objects(makers, *, dedup=True, lowest=False, rewrite=True, vs_torch=True,
                  make_torch=None) -> dict[str, Outcome]:
    """Fused vs composition for each (name -> (make, types)); vs torch where asked.

    Returns the fused outcomes by name.
    """
    kw = flags(dedup, lowest, rewrite)
    ref = run(torch_pipeline, make_torch, **kw) if vs_torch and make_torch else None
    outs = {}
    for name, (make, types, typed) in makers.items():
        got = run(plan_global_save, make, types=types, **kw)
        assert_same(got, run(composition, make, types=types, **kw))
        if ref is not None and typed is not None:
            assert_same_as_torch(got, ref, typed)
        outs[name] = got
    return outs


def cross_rank_duplicates(specs) -> bool:
    """Does some index appear on more than one rank (dedup ties can then matter)?"""
    seen = {}
    for r, items in enumerate(specs):
        for s in items:
            key = (s[1], None) if s[0] == "bytes" else (
                s[1], tuple(s[4]) if s[0] == "shard" else (0,) * len(s[2]))
            if seen.setdefault(key, r) != r:
                return True
    return False


def check(specs, *, dedup=True, lowest=False, rewrite=True, vs_torch=None, hints=None,
          fields=False) -> dict[str, Outcome]:
    """Run ``specs`` (gp_cases item specs per rank) through every comparison.

    ``vs_torch=None`` compares with torch whenever torch's tie-break is
    ascending rank order (<= 8 ranks, save_to_lowest_rank, no dedup, or no
    index duplicated across ranks). ``hints`` sets every tensor item's input
    index hint; ``fields`` gives every plan storage_data/planner_data/usable.
    """
    if vs_torch is None:
        vs_torch = len(specs) <= 8 or lowest or not dedup or not cross_rank_duplicates(specs)

    def build(item_fn, plan_cls):
        def make():
            plans = [plan_cls([item_fn(s, hint=hints) for s in items]) for items in specs]
            if fields:
                plans = [dataclasses.replace(p, storage_data=f"s{r}", planner_data={"rank": r},
                                             usable=r % 2 == 0) for r, p in enumerate(plans)]
            return plans
        return make

    tmake, cmake = build(torch_item, tp.SavePlan), build(ck_item, cp.SavePlan)
    makers = {"torch": (tmake, TORCH_TYPES, True), "ckcore": (cmake, CKCORE_TYPES, False),
              "torch+ck_md": (tmake, CKCORE_TYPES, None)}
    return check_objects(makers, dedup=dedup, lowest=lowest, rewrite=rewrite,
                         vs_torch=vs_torch, make_torch=tmake)


def torch_only(make, **kw) -> Outcome:
    """Hand-built torch objects: fused vs composition (both metadata kinds) and vs torch."""
    makers = {"torch": (make, TORCH_TYPES, True), "torch+ck_md": (make, CKCORE_TYPES, None)}
    return check_objects(makers, make_torch=make, **kw)["torch"]


def errors_of(out: Outcome) -> list[str]:
    assert out.exc is None, out.exc
    return out.result[2]


# --------------------------------------------------------------- strategies


def _cuts(draw, length, parts):
    pts = sorted(draw(st.lists(st.integers(0, length), min_size=parts - 1, max_size=parts - 1)))
    b = [0, *pts, length]
    return [(b[i], b[i + 1] - b[i]) for i in range(parts)]


@st.composite
def layouts(draw, max_ranks=12, adversarial=False):
    """(per-rank item specs, dedup): FSDP/HSDP/TP-style sharding, replicated tensors and bytes.

    Even splits leave trailing empty shards whose (equal) indices are
    duplicated across ranks; random cuts leave empty shards in the middle that
    share an index with the next shard. ``adversarial`` adds stray boxes
    (overlaps, holes, negative or out-of-bounds values), copies of items on
    other ranks, items of another category or global size for an existing
    fqn, and shuffles.
    """
    nranks = draw(st.integers(1, max_ranks))
    dedup = draw(st.booleans())
    ranks: list[list] = [[] for _ in range(nranks)]
    tensors = []

    def holders():
        if not dedup and not adversarial:
            return [draw(st.integers(0, nranks - 1))]
        hs = draw(st.lists(st.integers(0, nranks - 1), min_size=1, max_size=nranks))
        # adversarial: now and then the same rank twice (an index twice in one plan)
        return hs if adversarial and draw(st.integers(0, 5)) == 0 else sorted(set(hs))

    for t in range(draw(st.integers(0, 6))):
        fqn = f"layers.{t}.w"
        dtype = draw(st.sampled_from(DTYPES))
        ndim = draw(st.one_of(st.integers(0, 3), st.integers(4, 8)))
        size = tuple(draw(st.integers(0, 7 if ndim <= 3 else 2)) for _ in range(ndim))
        kind = draw(st.sampled_from(["shard", "shard", "grid", "replicated", "bytes"]))
        if kind == "grid" and ndim < 2:
            kind = "shard"
        if kind in ("shard", "grid") and ndim == 0:
            kind = "replicated"
        if kind == "shard":
            dim = draw(st.integers(0, ndim - 1))
            group = draw(st.sampled_from([1, 1, 2]))  # 2: each shard on two ranks (HSDP)
            nshards = max(1, -(-nranks // group))
            n = size[dim]
            if draw(st.booleans()):
                step = -(-n // nshards) if n else 0
                spans = [(min(s * step, n), min(s * step + step, n) - min(s * step, n))
                         for s in range(nshards)]
            else:
                spans = _cuts(draw, n, nshards)
            for r in range(nranks):
                lo, ln = spans[r % nshards]
                offs = tuple(lo if d == dim else 0 for d in range(ndim))
                sizes = tuple(ln if d == dim else size[d] for d in range(ndim))
                ranks[r].append(("shard", fqn, size, dtype, offs, sizes))
        elif kind == "grid":
            d0, d1 = draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=2, unique=True))
            c0, c1 = _cuts(draw, size[d0], draw(st.integers(1, 3))), _cuts(draw, size[d1],
                                                                            draw(st.integers(1, 3)))
            for j, ((o0, s0), (o1, s1)) in enumerate(itertools.product(c0, c1)):
                offs = [0] * ndim
                sizes = list(size)
                offs[d0], sizes[d0], offs[d1], sizes[d1] = o0, s0, o1, s1
                ranks[j % nranks].append(("shard", fqn, size, dtype, tuple(offs), tuple(sizes)))
        elif kind == "replicated":
            for r in holders():
                ranks[r].append(("tensor", fqn, size, draw(st.sampled_from([dtype, dtype, "int8"]))
                                 if adversarial else dtype))
        else:
            for r in holders():
                ranks[r].append(("bytes", fqn))
            continue
        tensors.append((fqn, size, dtype))

    if adversarial:
        for _ in range(draw(st.integers(0, 5))):
            r = draw(st.integers(0, nranks - 1))
            op = draw(st.sampled_from(["box", "box", "box", "copy", "category", "resize"]))
            if op == "copy" and any(ranks):
                src = draw(st.sampled_from([s for items in ranks for s in items]))
                ranks[r].append(src)
            elif op == "category" and (tensors or any(ranks)):
                # Same ndim as the fqn's tensor: a mismatch is a documented difference.
                fqn, size, _ = draw(st.sampled_from(
                    tensors or [(s[1], (3,), None) for items in ranks for s in items]))
                ranks[r].append(draw(st.sampled_from([("bytes", fqn), ("tensor", fqn, size, "int8")])))
            elif tensors:
                fqn, size, dtype = draw(st.sampled_from(tensors))
                if not size:
                    continue
                lo = draw(st.sampled_from([0, 0, -2]))
                offs = tuple(draw(st.integers(lo, s + 2)) for s in size)
                sizes = tuple(draw(st.integers(lo // 2, s + 2)) for s in size)
                gsize = size
                if op == "resize":
                    gsize = tuple(s + draw(st.integers(0, 3)) for s in size)
                ranks[r].append(("shard", fqn, gsize, dtype, offs, sizes))
        for items in ranks:
            if draw(st.booleans()):
                draw(st.randoms()).shuffle(items)
    return ranks, dedup


# ------------------------------------------------------------------ random


@settings(max_examples=400, deadline=None)
@given(layouts(), st.booleans(), st.booleans(), st.sampled_from([None, None, 7]), st.booleans())
def test_random_layouts_match_composition_and_torch(layout, lowest, rewrite, hints, fields):
    specs, dedup = layout
    outs = check(specs, dedup=dedup, lowest=lowest, rewrite=rewrite, hints=hints, fields=fields)
    got = outs["torch"]
    if got.exc is None:
        plans, md, errors = got.result
        # Rewritten hints are each chunk's position in its fqn's chunk list.
        for p in plans:
            for it in p.items:
                if it.tensor_data is not None:
                    chunks = md.state_dict_metadata[it.index.fqn].chunks
                    if rewrite:
                        assert chunks[it.index.index] is it.tensor_data.chunk
                    else:
                        assert it.index.index == hints
        assert len(errors) == len(got.logs)


@settings(max_examples=400, deadline=None)
@given(layouts(adversarial=True), st.booleans(), st.booleans())
def test_random_adversarial_layouts_match_composition_and_torch(layout, lowest, rewrite):
    specs, dedup = layout
    check(specs, dedup=dedup, lowest=lowest, rewrite=rewrite)


@settings(max_examples=80, deadline=None)
@given(layouts(max_ranks=40, adversarial=True), st.booleans())
def test_random_many_ranks_lowest_rank_match_torch(layout, rewrite):
    specs, dedup = layout
    check(specs, dedup=dedup, lowest=True, rewrite=rewrite, vs_torch=True)


# ---------------------------------------------------------- validation findings


def _two_ranks(size, boxes, dtype="float32"):
    """The boxes of one tensor "w", alternating between two ranks (no duplicates)."""
    specs = [[], []]
    for k, (o, s) in enumerate(boxes):
        specs[k % 2].append(("shard", "w", size, dtype, tuple(o), tuple(s)))
    return specs


def test_overlapping_chunks_reported_in_torch_order():
    boxes = [((0, 0), (4, 4)), ((2, 2), (4, 4)), ((4, 0), (4, 4)), ((0, 4), (4, 4)), ((3, 3), (1, 1))]
    errors = errors_of(check(_two_ranks((8, 8), boxes))["torch"])
    assert sum("overlapping" in m for m in errors) >= 4


def test_out_of_bounds_negative_and_past_the_end():
    boxes = [((-1, 0), (2, 4)), ((1, 0), (3, 4)), ((4, 0), (2, 5)), ((0, -3), (1, 0)), ((0, 0), (1, -1))]
    errors = errors_of(check(_two_ranks((6, 4), boxes))["torch"])
    assert sum("out of bounds" in m for m in errors) == 4


@pytest.mark.parametrize("nranks", [1, 2])
def test_single_chunk_tensors_out_of_bounds(nranks):
    specs = [[("shard", "x", (4, 4), "float32", (2, 0), (4, 4)),
              ("shard", "y", (3,), "int8", (0,), (-1,)),
              ("shard", "z", (5,), "int8", (-1,), (6,)),
              ("tensor", "ok", (2, 2), "int8")]] + [[] for _ in range(nranks - 1)]
    errors = errors_of(check(specs)["torch"])
    assert [m.split()[0] for m in errors if "out of bounds" in m] == ["key:x", "key:y", "key:z"]
    assert sum("invalid fill" in m for m in errors) == (2 if nranks > 1 else 0)


@pytest.mark.parametrize("nranks", [1, 2, 5])
def test_volume_hole_reported_only_with_several_plans(nranks):
    specs = [[("shard", "w", (8, 3), "bfloat16", (0, 0), (3, 3)),
              ("shard", "w", (8, 3), "bfloat16", (5, 0), (3, 3))]] + [[] for _ in range(nranks - 1)]
    errors = errors_of(check(specs)["torch"])
    assert errors == ([] if nranks == 1 else ["key:w invalid fill tensor-volume: 24 chunks-volume: 18"])


def test_zero_size_chunk_strictly_inside_overlaps():
    boxes = [((0, 0), (8, 4)), ((0, 4), (8, 4)), ((3, 2), (0, 1)), ((0, 4), (2, 0)), ((0, 4), (2, 0))]
    # The two identical empty boxes share an index: keep both on one rank.
    specs = [[("shard", "w", (8, 8), "float32", o, s) for o, s in boxes[:3]],
             [("shard", "w", (8, 8), "float32", o, s) for o, s in boxes[3:]]]
    errors = errors_of(check(specs)["torch"])
    assert sum("overlapping" in m for m in errors) == 1


def test_zero_d_tensors_skipped_and_bytes_kept():
    specs = [[("tensor", "step", (), "int8"), ("bytes", "meta")],
             [("tensor", "step", (), "int8"), ("bytes", "meta"), ("tensor", "lr", (), "float64")]]
    out = check(specs)["torch"]
    plans, md, errors = out.result
    assert errors == [] and list(md.state_dict_metadata) == ["step", "meta", "lr"]
    assert [len(p.items) for p in plans] == [1, 2]  # meta goes to the lighter rank 1


@pytest.mark.parametrize("ndim", range(1, 9))
def test_dims_1_to_8_grid_with_duplicate_and_gap(ndim):
    rng = random.Random(ndim)
    size = tuple(rng.randint(2, 3) for _ in range(ndim))
    per_dim = [[(0, s // 2), (s // 2, s - s // 2)] for s in size]
    boxes = [(tuple(iv[0] for iv in c), tuple(iv[1] for iv in c)) for c in itertools.product(*per_dim)]
    boxes[-1] = boxes[0]
    specs = [[] for _ in range(3)]
    for k, (o, s) in enumerate(boxes):
        specs[k % 3].append(("shard", "w", size, "bfloat16", o, s))
    # Dedup drops the duplicate unless it landed on box 0's rank: a hole or an overlap.
    assert errors_of(check(specs)["torch"])


def _many_dims_specs(nd):
    size = (3,) + (1,) * (nd - 2) + (2,)
    boxes = []
    for (a, la), b in itertools.product([(0, 1), (1, 2)], range(2)):
        boxes.append(((a,) + (0,) * (nd - 2) + (b,), (la,) + (1,) * (nd - 1)))
    boxes.append(((2,) + (0,) * (nd - 1), (1,) * (nd - 1) + (2,)))  # overlaps two boxes
    return [[("shard", "w", size, "float32", o, s)] for o, s in boxes]


@pytest.mark.parametrize("nd", [8, 63, 64, 70])
def test_many_dims_match_torch(nd):
    specs = _many_dims_specs(nd)
    with capture_logs():
        plans, md, errors = torch_pipeline(torch_plans(specs))
    assert sum("overlapping" in m for m in errors) == 2 and any("invalid fill" in m for m in errors)
    got = plan_global_save(torch_plans(specs), types=TORCH_TYPES)
    assert got == (plans, md, errors)
    check(specs)


@pytest.mark.parametrize("nd", [64, 70])
def test_more_than_63_dims_match_composition(nd):
    specs = _many_dims_specs(nd)
    check(specs, vs_torch=False)
    # one chunk per tensor (no overlap search): no dimension limit
    check([[("tensor", "w", (1,) * nd, "float32")], [("tensor", "v", (2,) * nd, "int8")]])


def test_moe_irregular_chunking():
    # 32 experts x 4-way column split, expert groups of uneven sizes that
    # differ per column, on 16 ranks; one rogue box overlapping two groups.
    rng = random.Random(0)
    E, H, F = 32, 16, 4
    boxes = []
    for col in range(4):
        e = 0
        while e < E:
            g = min(rng.randint(1, 5), E - e)
            boxes.append(((e, col * H // 4, 0), (g, H // 4, F)))
            e += g
    specs = [[] for _ in range(16)]
    for k, (o, s) in enumerate(boxes):
        specs[k % 16].append(("shard", "experts", (E, H, F), "bfloat16", o, s))
    assert errors_of(check(specs)["torch"]) == []
    specs[3].append(("shard", "experts", (E, H, F), "bfloat16", (10, 2, 0), (3, 4, 4)))
    errors = errors_of(check(specs)["torch"])
    assert sum("overlapping" in m for m in errors) >= 2 and any("invalid fill" in m for m in errors)


def test_huge_offsets_near_2_63():
    top = 2**63 - 1
    size = (top, 4)
    boxes = [((top - 8, 0), (4, 4)), ((top - 4, 0), (4, 4)), ((top - 6, 1), (4, 2)),
             ((0, 0), (top - 8, 4)), ((top - 1, 3), (1, 1))]
    errors = errors_of(check(_two_ranks(size, boxes))["torch"])
    assert sum("overlapping" in m for m in errors) == 3
    assert any(str(top * 4) in m for m in errors)


def test_tensor_volume_overflowing_int64_is_exact():
    big = 2**40
    specs = [[("shard", "w", (big, big), "float32", (0, 0), (big, big))],
             [("shard", "w", (big, big), "float32", (0, 1), (big, big - 1))],
             [("tensor", "v", (2**62, 4), "float64")]]
    errors = errors_of(check(specs)["torch"])
    fill = [m for m in errors if "invalid fill" in m]
    assert fill == [f"key:w invalid fill tensor-volume: {big * big} chunks-volume: "
                    f"{big * big + big * (big - 1)}"]


# ------------------------------------------------------------------- dedup


def test_trailing_empty_shards_are_duplicated_indices_and_deduped():
    # 10 rows over 4 ranks, 3 per rank: rank 3 holds rows 9..9, then an empty
    # shard at row 10 on ranks 4..7 (one index, four holders).
    n, nranks = 10, 8
    specs = []
    for r in range(nranks):
        lo = min(3 * r, n)
        specs.append([("shard", "w", (n, 2), "float32", (lo, 0), (min(lo + 3, n) - lo, 2))])
    outs = check(specs)
    plans, md, errors = outs["torch"].result
    assert errors == [] and len(md.state_dict_metadata["w"].chunks) == 5
    assert [len(p.items) for p in plans].count(0) == 3


def test_same_index_twice_in_one_plan_both_kept():
    specs = [[("shard", "w", (4,), "float32", (0,), (2,)), ("shard", "w", (4,), "float32", (0,), (2,))],
             [("shard", "w", (4,), "float32", (0,), (2,)), ("shard", "w", (4,), "float32", (2,), (2,))]]
    for lowest in (False, True):
        plans, md, errors = check(specs, lowest=lowest)["torch"].result
        assert [len(p.items) for p in plans] == [2, 1]
        assert [it.index.index for it in plans[0].items] == [0, 1]
        assert any("overlapping" in m for m in errors) and any("invalid fill" in m for m in errors)


def _first_deduped_specs():
    # dedup visits big, w, s@0, s@4, v, s@2: rank 0 gets big (heavy), so w and
    # s@0 (on both ranks) go to rank 1, whose items carry other dtypes.
    return [
        [("tensor", "big", (1000,), "float32"), ("tensor", "w", (4,), "float32"),
         ("shard", "s", (6,), "float32", (0,), (2,)), ("shard", "s", (6,), "float32", (4,), (2,))],
        [("tensor", "v", (3,), "float32"), ("tensor", "w", (4,), "bfloat16"),
         ("shard", "s", (6,), "bfloat16", (0,), (2,)), ("shard", "s", (6,), "bfloat16", (2,), (2,))],
    ]


@pytest.mark.parametrize("rewrite", [True, False])
def test_first_item_of_fqn_deduped_away(rewrite):
    outs = check(_first_deduped_specs(), rewrite=rewrite, hints=5)
    plans, md, errors = outs["torch"].result
    assert errors == []
    sdm = md.state_dict_metadata
    assert list(sdm) == ["big", "s", "v", "w"]
    assert sdm["w"].properties.dtype == torch.bfloat16  # from the surviving rank-1 item
    assert sdm["s"].properties.dtype == torch.float32  # s@4 on rank 0 is s's first survivor
    assert [tuple(c.offsets) for c in sdm["s"].chunks] == [(4,), (0,), (2,)]
    hints = [[(it.index.fqn, it.index.index) for it in p.items] for p in plans]
    if rewrite:
        assert hints == [[("big", 0), ("s", 0)], [("v", 0), ("w", 0), ("s", 1), ("s", 2)]]
    else:
        assert all(h == 5 for p in hints for _, h in p)
    plans, md, _ = check(_first_deduped_specs(), lowest=True, rewrite=rewrite)["torch"].result
    assert list(md.state_dict_metadata) == ["big", "w", "s", "v"]
    assert md.state_dict_metadata["w"].properties.dtype == torch.float32


def test_different_chunk_sizes_for_the_same_index():
    # rank 0 is heavier when w@0 is placed: rank 1's (0,)/(4,) survives (sound);
    # lowest rank keeps rank 0's (0,)/(2,) (a hole).
    specs = [[("tensor", "big", (100,), "float32"), ("shard", "w", (4,), "float32", (0,), (2,))],
             [("shard", "w", (4,), "float32", (0,), (4,))]]
    plans, md, errors = check(specs)["torch"].result
    assert [tuple(c.sizes) for c in md.state_dict_metadata["w"].chunks] == [(4,)] and errors == []
    plans, md, errors = check(specs, lowest=True)["torch"].result
    assert errors == ["key:w invalid fill tensor-volume: 4 chunks-volume: 2"]
    _, _, errors = check(specs, dedup=False)["torch"].result
    assert any("overlapping" in m for m in errors)


def test_dedup_weight_comes_from_last_holder_item():
    # torch weighs a duplicated index by the item seen last (rank 2's r, global
    # size 1000), which sends q to rank 2; the first item's weight would not.
    f32 = "float32"
    specs = [[("tensor", "a", (500,), f32), ("tensor", "b", (25,), f32)],
             [("tensor", "r", (4,), f32), ("tensor", "q", (3,), f32)],
             [("tensor", "b", (25,), f32), ("tensor", "r", (1000,), f32), ("tensor", "q", (3,), f32)]]
    plans, md, errors = check(specs)["torch"].result
    assert [[it.index.fqn for it in p.items] for p in plans] == [["a"], ["r"], ["b", "q"]]
    assert tuple(md.state_dict_metadata["r"].size) == (4,)
    assert errors == []


def test_replicated_bytes_and_tensors_on_twelve_ranks():
    specs = [[("bytes", "step"), ("tensor", "norm", (16,), "float32"),
              ("shard", "w", (24, 2), "bfloat16", (2 * r, 0), (2, 2))] for r in range(12)]
    outs = check(specs)  # ties on 12 ranks: composition only
    plans, md, errors = outs["torch"].result
    assert errors == [] and sum(len(p.items) for p in plans) == 14
    check(specs, lowest=True)


def test_1024_rank_fsdp_plan():
    # vocab 50257 over 1024 ranks (50 rows each): ranks 1006.. hold an empty
    # shard at row 50257, one index with 18 holders; the norm (16 rows) leaves
    # 1008 holders of one empty shard; a replicated bytes item on every rank.
    nranks = 1024
    tensors = [("embed", (50257, 4), "bfloat16"), ("layer.w", (4096, 8), "float32"),
               ("norm", (16,), "float32")]
    specs = []
    for r in range(nranks):
        items = [("bytes", "step")]
        for fqn, size, dtype in tensors:
            step = -(-size[0] // nranks)
            lo = min(r * step, size[0])
            hi = min(lo + step, size[0])
            items.append(("shard", fqn, size, dtype, (lo, *([0] * (len(size) - 1))),
                          (hi - lo, *size[1:])))
        specs.append(items)
    outs = check(specs, lowest=True)
    plans, md, errors = outs["torch"].result
    assert errors == []
    assert [len(md.state_dict_metadata[f].chunks) for f, _, _ in tensors] == [1007, 1024, 17]
    assert len(plans[0].items) == 4
    outs = check(specs, vs_torch=False)
    plans, md, errors = outs["torch"].result
    assert errors == [] and sum(len(p.items) for p in plans) == 1 + 1007 + 1024 + 17


ALL_DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
              "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
              "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
              "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4"]


def _dtype_item(lib, fqn, size, dtype, offsets=None, sizes=None):
    spec = (("tensor", fqn, size, "float32") if offsets is None
            else ("shard", fqn, size, "float32", offsets, sizes))
    it = torch_item(spec) if lib == "torch" else ck_item(spec)
    props = dataclasses.replace(it.tensor_data.properties,
                                dtype=getattr(torch, dtype) if lib == "torch" else dtype)
    return dataclasses.replace(it, tensor_data=dataclasses.replace(it.tensor_data, properties=props))


@pytest.mark.parametrize("seed", range(4))
def test_dedup_weights_over_every_dtype(seed):
    # Greedy placement of replicated tensors follows the exact byte weights
    # (numel * itemsize) of every dtype: a wrong itemsize moves some item.
    rng = random.Random(seed)
    nranks = 5
    layout = []  # (fqn, size, dtype, holders)
    for t in range(40):
        size = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 2)))
        holders = sorted(rng.sample(range(nranks), rng.randint(2, nranks)))
        layout.append((f"t{t}", size, rng.choice(ALL_DTYPES), holders))

    def build(lib):
        plan_cls = tp.SavePlan if lib == "torch" else cp.SavePlan
        plans = [[] for _ in range(nranks)]
        for fqn, size, dtype, holders in layout:
            for r in holders:
                plans[r].append(_dtype_item(lib, fqn, size, dtype))
        return [plan_cls(items) for items in plans]

    makers = {"torch": (lambda: build("torch"), TORCH_TYPES, True),
              "ckcore": (lambda: build("ckcore"), CKCORE_TYPES, False)}
    for lowest in (False, True):
        outs = check_objects(makers, lowest=lowest, make_torch=lambda: build("torch"))
        plans = outs["torch"].result[0]
        assert sum(len(p.items) for p in plans) == len(layout)
        if not lowest:
            assert sum(bool(p.items) for p in plans) > 1


def test_dtype_torch_cannot_size_raises_like_torch():
    # torch's WriteItem.tensor_storage_size raises TypeError for bits8: so must dedup.
    def make():
        return [tp.SavePlan([_dtype_item("torch", "w", (4,), "bits8")]) for _ in range(2)]
    got = torch_only(make)
    assert type(got.exc) is TypeError
    assert torch_only(make, dedup=False).exc is not None  # a second TENSOR item for "w"


@pytest.mark.parametrize("seed", range(3))
def test_seeded_large_layouts(seed):
    # 64-256 ranks: HSDP (replicated shards), TP x FSDP grids, replicated norms
    # and bytes, uneven vocab splits, then a few stray boxes.
    rng = random.Random(seed)
    nranks = [64, 128, 256][seed]
    specs = [[("bytes", "step")] if r % 8 == 0 else [] for r in range(nranks)]
    tp_deg = 4
    for layer in range(3):
        rows, cols = rng.randint(nranks // 2, 3 * nranks), 4 * tp_deg
        dt = rng.choice(["bfloat16", "float32"])
        dp = nranks // tp_deg
        step = -(-rows // dp)
        for r in range(nranks):
            d, t = divmod(r, tp_deg)
            lo = min(d * step, rows)
            specs[r].append(("shard", f"l{layer}.w", (rows, cols), dt, (lo, t * 4),
                             (min(lo + step, rows) - lo, 4)))
            specs[r].append(("tensor", f"l{layer}.norm", (cols,), "float32"))
        # HSDP: each shard of the bias on two ranks
        n = rng.randint(nranks // 4, nranks)
        half = nranks // 2
        bstep = -(-n // half)
        for r in range(nranks):
            lo = min((r % half) * bstep, n)
            specs[r].append(("shard", f"l{layer}.b", (n,), dt, (lo,), (min(lo + bstep, n) - lo,)))
    b0 = next(s for s in specs[0] if s[1] == "l0.b")
    for _ in range(3):
        specs[rng.randrange(nranks)].append(
            ("shard", "l0.b", b0[2], b0[3], (rng.randint(-1, 5),), (rng.randint(0, 4),)))
    for r in range(nranks):
        rng.shuffle(specs[r])
    for lowest in (False, True):
        outs = check(specs, lowest=lowest)
        plans, md, errors = outs["torch"].result
        assert all(len(md.state_dict_metadata[f"l{k}.norm"].chunks) == 1 for k in range(3))


# --------------------------------------------------- categories and exceptions


_ITEMS = {
    "tensor": ("tensor", "w", (4,), "float32"),
    "shard": ("shard", "w", (4,), "float32", (2,), (2,)),
    "bytes": ("bytes", "w"),
}


@pytest.mark.parametrize("same_plan", [False, True])
@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("pair", list(itertools.product(_ITEMS, repeat=2)), ids="-then-".join)
def test_mixed_categories_for_one_fqn(pair, dedup, same_plan):
    a, b = (_ITEMS[k] for k in pair)
    if pair == ("shard", "shard"):
        b = ("shard", "w", (4,), "float32", (0,), (2,))
    specs = [[a, b]] if same_plan else [[a], [b]]
    for rewrite in (True, False):
        outs = check(specs, dedup=dedup, rewrite=rewrite)
    got = outs["torch"]
    if pair in [("shard", "tensor"), ("shard", "bytes"), ("tensor", "bytes"), ("bytes", "tensor")]:
        assert type(got.exc) is AssertionError
    if pair == ("bytes", "shard"):
        assert got.exc is not None
    if pair in [("tensor", "shard"), ("shard", "shard")]:
        assert got.exc is None


@pytest.mark.parametrize("dedup,rewrite", [(True, True), (False, False)])
def test_bytes_then_shard_raises_like_torch(dedup, rewrite):
    specs = [[("bytes", "w")], [_ITEMS["shard"]]]
    kw = flags(dedup, False, rewrite)
    with pytest.raises(Exception) as exp:
        torch_pipeline(torch_plans(specs), **kw)
    with pytest.raises(Exception) as got:
        plan_global_save(torch_plans(specs), types=TORCH_TYPES, **kw)
    assert (type(got.value), str(got.value)) == (type(exp.value), str(exp.value))


@pytest.mark.parametrize("dedup", [True, False])
def test_missing_tensor_data_and_chunk_raise_like_torch(dedup):
    item = torch_item(("shard", "w", (4,), "float32", (0,), (4,)))
    no_chunk = dataclasses.replace(item, tensor_data=dataclasses.replace(item.tensor_data, chunk=None))
    no_td = tp.WriteItem(index=tm.MetadataIndex("v", (0,)), type=tp.WriteItemType.SHARD)
    for bad in (no_chunk, no_td):
        def make(bad=bad):
            return [tp.SavePlan([torch_item(("bytes", "b"))]), tp.SavePlan([bad])]
        got = torch_only(make, dedup=dedup)
        assert type(got.exc) is AssertionError


def _chunk_plans(offsets, sizes, tsize=(4, 4), lib="torch"):
    """Two ranks of "w": rank 0's chunk replaced by (offsets, sizes) as given."""
    item_fn, plan_cls = (torch_item, tp.SavePlan) if lib == "torch" else (ck_item, cp.SavePlan)
    a = item_fn(("shard", "w", tsize, "float32", (0,) * len(tsize), (2,) + tsize[1:]))
    b = item_fn(("shard", "w", tsize, "float32", (2,) + (0,) * (len(tsize) - 1), (2,) + tsize[1:]))
    chunk_cls = tm.ChunkStorageMetadata if lib == "torch" else cm.ChunkStorageMetadata
    a = dataclasses.replace(a, tensor_data=dataclasses.replace(a.tensor_data,
                                                               chunk=chunk_cls(offsets, sizes)))
    return [plan_cls([a]), plan_cls([b])]


@pytest.mark.parametrize("offsets,sizes", [
    ([0, 1], [2, 4]),                                  # lists
    ((np.int64(0), np.int64(1)), (np.int64(2), 4)),    # numpy integers
    ((False, True), (2, 4)),                           # bools are ints
    ((torch.tensor(0).item(), 1), (2, 3)),
], ids=["lists", "numpy", "bools", "python-ints"])
def test_chunk_values_of_other_integer_kinds_match_torch(offsets, sizes):
    got = torch_only(lambda: _chunk_plans(offsets, sizes))
    assert got.exc is None and got.result[2]
    for lib in ("torch", "ckcore"):
        make = lambda lib=lib: _chunk_plans(offsets, sizes, lib=lib)  # noqa: E731
        types = TORCH_TYPES if lib == "torch" else CKCORE_TYPES
        assert_same(run(plan_global_save, make, types=types), run(composition, make, types=types))


@pytest.mark.parametrize("offsets,sizes,exc", [
    ((0.0, 1.0), (2, 4), TypeError),       # torch accepts floats; documented TypeError
    (("0", 1), (2, 4), TypeError),
    ((0,), (2,), ValueError),              # fewer dims than the tensor (torch: IndexError)
    ((0, 0, 0), (2, 4, 1), ValueError),    # more dims (torch ignores the extra one)
    ((0, 0), (2,), ValueError),            # offsets and sizes disagree
    ((2**62, 0), (2**62, 4), ValueError),  # offset + size overflows int64 (torch: out of bounds)
    ((-(2**63), 0), (-1, 4), ValueError),
    (None, (2, 4), TypeError),
], ids=["float", "str", "fewer-dims", "more-dims", "offsets-vs-sizes", "sum-overflow",
        "neg-overflow", "none"])
def test_bad_chunk_values_raise_like_composition(offsets, sizes, exc):
    for lib in ("torch", "ckcore"):
        for nranks in (1, 2):
            def make(lib=lib, nranks=nranks):
                return _chunk_plans(offsets, sizes, lib=lib)[:nranks]
            for types in (TORCH_TYPES, CKCORE_TYPES):
                got = run(plan_global_save, make, types=types)
                assert_same(got, run(composition, make, types=types))
                assert type(got.exc) is exc


@pytest.mark.parametrize("case", ["offset-2**63", "size-2**64", "tensor-size-2**64",
                                  "tensor-size-float"])
def test_values_beyond_int64_ckcore_objects(case):
    # torch.Size cannot hold these: ckcore objects (and plain tuples in torch's).
    def make():
        if case == "offset-2**63":
            return _chunk_plans((2**63, 0), (1, 4), lib="ckcore")
        if case == "size-2**64":
            return _chunk_plans((0, 0), (2**64, 4), lib="ckcore")
        tsize = (2**64,) if case == "tensor-size-2**64" else (4.0,)
        it = ck_item(("shard", "w", (4,), "float32", (0,), (4,)))
        it = dataclasses.replace(it, tensor_data=dataclasses.replace(it.tensor_data, size=tsize))
        return [cp.SavePlan([it]), cp.SavePlan([])]
    for types in (CKCORE_TYPES, TORCH_TYPES):
        got = run(plan_global_save, make, types=types)
        assert_same(got, run(composition, make, types=types))
        assert type(got.exc) in (ValueError, TypeError)


def test_exception_precedence_matches_composition():
    def item(spec):
        return ck_item(spec)

    bad_ndim = item(("shard", "w", (4, 4), "float32", (0, 0), (4, 4)))
    bad_ndim = dataclasses.replace(bad_ndim, tensor_data=dataclasses.replace(
        bad_ndim.tensor_data, chunk=cm.ChunkStorageMetadata((0,), (4,))))
    overlap = [item(("shard", "a", (4,), "float32", (0,), (3,))),
               item(("shard", "a", (4,), "float32", (1,), (3,)))]
    no_td = cp.WriteItem(index=cm.MetadataIndex("n", (0,)), type=cp.WriteItemType.SHARD)
    cases = {
        # validation findings for "a" are logged before "w"'s ValueError
        "findings-then-validate-error": [[*overlap, bad_ndim], [item(("bytes", "b"))]],
        # create's AssertionError (duplicate bytes, later plan) beats validation's ValueError
        "validate-error-then-create-error": [[bad_ndim], [item(("bytes", "b"))],
                                             [item(("bytes", "b"))]],
        "validate-error-then-missing-tensor-data": [[bad_ndim, *overlap], [no_td]],
        # dedup's TypeError (not a plan, later) beats create's AssertionError
        "create-error-then-not-a-plan": [[item(("tensor", "t", (2,), "int8"))],
                                         [item(("shard", "t", (2,), "int8", (1,), (1,)))], object()],
        "unknown-type-then-not-an-item": [[cp.WriteItem(index=cm.MetadataIndex("u"), type="SHARD")],
                                          [item(("bytes", "b")), "not an item"]],
        "bad-index-then-create-error": [[item(("tensor", "t", (2,), "int8"))],
                                        [cp.WriteItem(index="t", type=cp.WriteItemType.TENSOR)]],
    }
    for name, plan_items in cases.items():
        def make(plan_items=plan_items):
            return [p if not isinstance(p, list) else cp.SavePlan(list(p)) for p in plan_items]
        for dedup, rewrite in itertools.product((True, False), repeat=2):
            kw = flags(dedup, False, rewrite)
            got = run(plan_global_save, make, **kw)
            assert_same(got, run(composition, make, **kw))
            assert got.exc is not None, name


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("bad", ["int", "none", "plan-is-object", "items-none", "item-is-str",
                                 "index-is-str", "unknown-type", "type-none"])
def test_non_plan_objects_raise_like_composition(bad, dedup):
    def make():
        good = cp.SavePlan([ck_item(("bytes", "a")), ck_item(("tensor", "t", (2,), "int8"))])
        if bad == "int":
            return 42
        if bad == "none":
            return None
        if bad == "plan-is-object":
            return [good, object()]
        if bad == "items-none":
            return [good, cp.SavePlan(None)]
        if bad == "item-is-str":
            return [good, cp.SavePlan([ck_item(("bytes", "b")), "not an item"])]
        if bad == "index-is-str":
            return [good, cp.SavePlan([cp.WriteItem(index="x", type=cp.WriteItemType.BYTE_IO)])]
        if bad == "unknown-type":
            return [good, cp.SavePlan([cp.WriteItem(index=cm.MetadataIndex("u"), type="SHARD")])]
        return [good, cp.SavePlan([cp.WriteItem(index=cm.MetadataIndex("u"), type=None)])]
    kw = flags(dedup, False, True)
    got = run(plan_global_save, make, **kw)
    assert_same(got, run(composition, make, **kw))
    assert type(got.exc) is TypeError, got.exc


# ----------------------------------------------------------- objects and API


def test_ckcore_objects_with_default_types():
    specs = _first_deduped_specs() + [[("bytes", "meta"), ("shard", "s", (6,), "int8", (3,), (2,))]]
    plans, md, errors = plan_global_save(ck_plans(specs))
    exp = composition(ck_plans(specs))
    assert (plans, md, errors) == exp
    assert type(md) is cm.Metadata and all(type(p) is cp.SavePlan for p in plans)
    assert all(type(it) is cp.WriteItem and type(it.index) is cm.MetadataIndex
               for p in plans for it in p.items)
    assert type(md.state_dict_metadata["meta"]) is cm.BytesStorageMetadata
    assert sum("overlapping" in m for m in errors) == 2  # s@3 overlaps s@2 and s@4
    check(specs)


def test_input_plans_untouched_and_fields_preserved():
    specs = [[("shard", "w", (6,), "float32", (2 * r,), (2,)), ("bytes", "b")] for r in range(3)]
    for lib in ("torch", "ckcore"):
        item_fn, plan_cls = (torch_item, tp.SavePlan) if lib == "torch" else (ck_item, cp.SavePlan)
        plans = [plan_cls([item_fn(s, hint=99) for s in items], storage_data=("sd", r),
                          planner_data={"r": r}, usable=bool(r % 2)) for r, items in enumerate(specs)]
        before = [[repr(it.index) for it in p.items] for p in plans]
        item_ids = [[id(it) for it in p.items] for p in plans]
        out, md, errors = plan_global_save(plans, types=TORCH_TYPES if lib == "torch" else CKCORE_TYPES)
        assert [[repr(it.index) for it in p.items] for p in plans] == before
        assert [[id(it) for it in p.items] for p in plans] == item_ids
        assert [it.index.index for p in out for it in p.items] == [0, 1, None, 2]  # b goes to rank 1
        for r, (o, p) in enumerate(zip(out, plans)):
            assert o is not p
            assert o.storage_data is p.storage_data and o.planner_data is p.planner_data
            assert o.usable == bool(r % 2)
        assert errors == []
    check(specs, hints=99, fields=True)
    check(specs, hints=99, fields=True, rewrite=False)


@pytest.mark.parametrize("shape", ["list", "tuple", "generator", "empty", "no-items"])
def test_input_containers(shape):
    specs = [[("shard", "w", (4,), "float32", (0,), (2,)), ("bytes", "b")],
             [("shard", "w", (4,), "float32", (2,), (2,))]]

    def make():
        plans = torch_plans(specs)
        if shape == "tuple":
            return tuple(plans)
        if shape == "generator":
            return (p for p in plans)
        if shape == "empty":
            return []
        if shape == "no-items":
            return [tp.SavePlan([]) for _ in range(3)]
        return plans
    for dedup, lowest in itertools.product((True, False), repeat=2):
        # torch's dedup takes len() of its argument: no generators there.
        out = torch_only(make, dedup=dedup, lowest=lowest, vs_torch=shape != "generator")
        assert out.exc is None and type(out.result[0]) is list


@pytest.mark.parametrize("value", [0, 1, "", "yes", None, [], np.bool_(True)])
def test_flag_values_are_truth_tested_like_composition(value):
    specs = [[("tensor", "r", (4,), "float32"), ("bytes", "b")],
             [("tensor", "r", (4,), "float32"), ("bytes", "b"), ("tensor", "q", (2,), "int8")]]
    for which in ("dedup", "save_to_lowest_rank", "rewrite_index_hints"):
        def make():
            return torch_plans(specs)
        kw = {which: value}
        got = run(plan_global_save, make, types=TORCH_TYPES, **kw)
        assert_same(got, run(composition, make, types=TORCH_TYPES, **kw))


def test_signature_is_keyword_only():
    sig = inspect.signature(plan_global_save)
    params = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    kwo = inspect.Parameter.KEYWORD_ONLY
    assert params == [("all_plans", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                      ("dedup", kwo, True), ("save_to_lowest_rank", kwo, False),
                      ("rewrite_index_hints", kwo, True), ("types", kwo, CKCORE_TYPES),
                      ("logger", kwo, None)]
    with pytest.raises(TypeError):
        plan_global_save([], True)


@dataclasses.dataclass(frozen=True, slots=True)
class SlotPlan:
    items: list
    storage_data: Any = None
    planner_data: Any = None
    usable: bool = True


@dataclasses.dataclass(frozen=True)
class TaggedPlan(cp.SavePlan):
    """A plan class with a __post_init__: copies must go through dataclasses.replace."""

    tag: str = "t"

    def __post_init__(self):
        object.__setattr__(self, "tag", self.tag.upper())


@dataclasses.dataclass(frozen=True)
class HeavyItem(cp.WriteItem):
    """Custom tensor_storage_size (dedup must call it) and an extra field."""

    note: str = "n"

    def tensor_storage_size(self):
        return 10**6 if self.index.fqn == "a" else 1


@dataclasses.dataclass(frozen=True)
class SubIndex(cm.MetadataIndex):
    pass


class TSM(cm.TensorStorageMetadata):
    pass


class BSM(cm.BytesStorageMetadata):
    pass


class MD(cm.Metadata):
    pass


def _custom_plans(kind):
    if kind == "slots-plan":
        return [SlotPlan([ck_item(("bytes", "b")), ck_item(("shard", "w", (4,), "int8", (0,), (2,)))],
                         storage_data="x"),
                SlotPlan([ck_item(("bytes", "b")), ck_item(("shard", "w", (4,), "int8", (2,), (2,)))])]
    if kind == "post-init-plan":
        plans = [TaggedPlan([ck_item(("shard", "w", (4,), "int8", (2 * r,), (2,)))])
                 for r in range(2)]
        for p in plans:
            object.__setattr__(p, "tag", "r")  # a raw copy keeps "r", replace() gives "R"
        return plans
    if kind == "namespace-plan":
        return [pytypes.SimpleNamespace(items=[ck_item(("bytes", "b"))])]
    if kind == "heavy-items":
        def it(fqn, r):
            base = ck_item(("shard", fqn, (4,), "float32", (0,), (4,)))
            return HeavyItem(index=base.index, type=base.type, tensor_data=base.tensor_data,
                             note=f"{fqn}{r}")
        # "a" goes to rank 0 (tie), which then weighs 10**6: "b" goes to rank 1.
        return [cp.SavePlan([it("a", r), it("b", r)]) for r in range(2)]
    if kind == "sub-index":
        out = []
        for r in range(2):
            base = ck_item(("shard", "w", (4,), "float32", (2 * r,), (2,)))
            out.append(cp.SavePlan([dataclasses.replace(base, index=SubIndex("w", (2 * r,), 3))]))
        return out
    if kind == "torch-enum-in-ck-items":
        base = ck_item(("shard", "w", (4,), "float32", (0,), (4,)))
        return [cp.SavePlan([dataclasses.replace(base, type=tp.WriteItemType.SHARD)]),
                cp.SavePlan([cp.WriteItem(index=cm.MetadataIndex("b"), type=tp.WriteItemType.BYTE_IO)])]
    if kind == "torch-items-in-ck-plan":
        return [cp.SavePlan(torch_plans([[("shard", "w", (4,), "float32", (0,), (4,))]])[0].items)]
    raise AssertionError(kind)


CUSTOM_KINDS = ["slots-plan", "post-init-plan", "namespace-plan", "heavy-items", "sub-index",
                "torch-enum-in-ck-items", "torch-items-in-ck-plan"]


@pytest.mark.parametrize("kind", CUSTOM_KINDS)
def test_custom_classes_take_the_same_path(kind):
    custom_types = MetadataTypes(MD, TSM, BSM)
    for types, dedup, rewrite in itertools.product((CKCORE_TYPES, TORCH_TYPES, custom_types),
                                                   (True, False), (True, False)):
        kw = flags(dedup, False, rewrite)
        got = run(plan_global_save, lambda: _custom_plans(kind), types=types, **kw)
        assert_same(got, run(composition, lambda: _custom_plans(kind), types=types, **kw))
        if kind == "heavy-items" and dedup:
            assert [[it.index.fqn for it in p.items] for p in got.result[0]] == [["a"], ["b"]]
            assert [it.note for p in got.result[0] for it in p.items] == ["a0", "b1"]
        if types is custom_types and got.exc is None:
            md = got.result[1]
            assert type(md) is MD
            assert all(type(v) in (TSM, BSM) for v in md.state_dict_metadata.values())


def test_warnings_logged_in_order(caplog):
    specs = _two_ranks((4,), [((0,), (3,)), ((1,), (4,)), ((-1,), (1,))])
    caplog.set_level(logging.WARNING)
    plans, md, errors = plan_global_save(torch_plans(specs), types=TORCH_TYPES)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("ckcore")]
    assert logged == errors and len(errors) == 4
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name.startswith("ckcore"))
    with capture_logs() as torch_logged:
        exp = torch_pipeline(torch_plans(specs))[2]
    assert errors == exp
    assert [m for _, _, m in torch_logged] == exp


def test_gc_state_restored_including_on_errors():
    good = [[("shard", "w", (6,), "float32", (2 * r,), (2,))] for r in range(3)]
    good[0].append(("bytes", "b"))
    bad = [[("bytes", "b")], [("tensor", "b", (2,), "int8")]]  # AssertionError
    bad_validate = _chunk_plans((0,), (2,))  # ValueError in the validation stage

    def call(make, **kw):
        try:
            plan_global_save(make(), **kw)
        except (AssertionError, ValueError):
            return True
        return False

    makers = [(lambda: ck_plans(good), False), (lambda: ck_plans(bad), True),
              (lambda: bad_validate, True)]
    assert gc.isenabled()
    for make, raises in makers:
        for dedup in (True, False):
            assert call(make, dedup=dedup) is raises
            assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        for make, raises in makers:
            assert call(make) is raises
            assert not gc.isenabled()
    finally:
        gc.enable()
    # A caller's frozen objects stay frozen (no promote pass would unfreeze them).
    keep = [object() for _ in range(3)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        for make, raises in makers:
            assert call(make) is raises
            assert gc.get_freeze_count() == frozen and gc.isenabled()
    finally:
        gc.unfreeze()
    del keep
