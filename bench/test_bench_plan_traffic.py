"""Benchmark ``plan-traffic``: the whole planning phase of ``dcp.save`` and ``dcp.load`` at N ranks.

Llama-2-70B shapes (723 bfloat16 tensors), saved FSDP-N (``Shard(0)`` on a
1-d mesh of N ranks) and loaded FSDP-(N/8) x TP-8 (torchtitan's plan, as in
the ``model-load`` workload), N from ``CKCORE_BENCH_TRAFFIC_RANKS`` (default
``256,1024,4096``; ``16`` with 4 layers in quick mode, ``CKCORE_BENCH_QUICK=1``
or ``--benchmark-disable``).

What is replayed. torch 2.13's ``_save_state_dict`` / ``_load_state_dict``
(state_dict_saver.py, state_dict_loader.py) and ``_DistWrapper``'s
``reduce_scatter("plan")`` / ``all_reduce("write")`` (utils.py), in one
process, calling the planner and the storage object only through DCP's
public protocol, with the same arguments, in the same order, and serializing
exactly what the collectives serialize (``pickle.dumps`` with the default
protocol is what ``_object_to_tensor`` writes; ``pickle.loads`` is
``_tensor_to_object``). The harness never looks inside a plan on its way
through the coordinator: plans are pickled, unpickled and handed to the
next protocol method. Each implementation is a set of classes:

- ``[torch]``: ``DefaultSavePlanner`` + ``FileSystemWriter``,
  ``DefaultLoadPlanner`` + ``FileSystemReader``;
- ``[ckcore]``: ``FastSavePlanner`` + ``FileSystemWriter`` (or
  ``ckcore.dcp.FastFileSystemWriter`` when that exists),
  ``FastLoadPlanner`` + ``ckcore.dcp.RangeFileSystemReader``.

Save, per N (one ``benchmark.group`` "plan-traffic save N=..."):

(a) each rank: ``storage_meta``, ``set_up_planner``, ``set_up_storage_writer``,
    ``create_local_plan``, ``prepare_local_plan``, ``pickle.dumps`` (bytes up);
(b) rank 0: ``gc.collect()`` (untimed, so rounds start equal), then
    ``pickle.loads`` of all N plans with the cyclic GC in its normal state,
    ``create_global_plan``, ``prepare_global_plan``, ``pickle.dumps`` of every
    rank's global plan (bytes down);
(c) each rank: ``pickle.loads`` of its plan, ``finish_plan``;
(d) rank 0: ``storage_writer.finish(metadata, results)``: ``.metadata``
    pickled to a fresh directory per run (``FileSystemWriter``'s defaults,
    fsync included). ``results`` are synthesized per rank from its finished
    plan as ``FileSystemWriter.write_data`` returns them (one file per rank,
    in the list type the implementation's ``write_data`` returns, which for
    ``FastFileSystemWriter`` pickles as columns;
    ``{prefix}0.distcp``; bytes items first, then tensors in plan order, each
    a ``WriteResult(index, length, _StorageInfo(file, offset, length))``
    with ``length`` = the chunk's bytes + the ``torch.save`` record overhead
    measured once per dimension count): the file's bytes are not written;
(e) reported apart, not in the timed figure: the ``all_reduce("write")``
    traffic: every rank's ``WriteResult`` list pickled up, rank 0's
    ``pickle.loads`` of all N (needed by (d)), the ``Metadata`` serialized
    for the broadcast and one rank's deserialization of it (with torch's own
    ``_object_to_tensor`` / ``_tensor_to_object``, what
    ``broadcast_object_list`` runs).

The timed figure of a round (the benchmark median, so the ratio table's
figure) is rank 0's critical path: its own (a), (b), its own (c), and (d).
Only these steps advance the benchmark's clock (a step clock in place of
pytest-benchmark's timer); every step's seconds are in ``extra_info``.

Load, per N (group "plan-traffic load N=..."): rank 0 reads the ``.metadata``
that implementation's save wrote (``storage_reader.read_metadata()``: every
rank does this, one is timed), then (a) ``set_up_planner``,
``set_up_storage_reader``, ``create_local_plan``, ``prepare_local_plan``,
``pickle.dumps``; (b) ``pickle.loads`` of all N (GC on, after an untimed
``gc.collect()``), ``create_global_plan``, ``prepare_global_plan``,
``pickle.dumps`` of each; (c) its own ``pickle.loads`` + ``finish_plan``. The
timed figure is all of it.

Which ranks are real. Rank 0 (the coordinator, also the measured rank) runs
every step for real with its own state dict. The other ranks' local save
plans come from the same planner and writer classes, each rank with its own
state dict, computed in forked worker processes (2) before the timing, once
per (implementation, N), and fed to rank 0 as bytes; their ``finish_plan``
and ``WriteResult`` lists likewise. State dicts hold ``DTensor``s built
directly from a ``DTensorSpec`` on a ``DeviceMesh`` made with ``_rank=r``
and no process group (one process can be any rank), their local tensors
zero-stride views of one element, so nothing is allocated; the planners see
exactly the DTensors ``DTensor.from_local`` would give. On the load side,
planning every rank with torch's planner costs O(saved chunks) per tensor
and rank (hours at N=4096), so by default **the other ranks' local load
plans are the measured rank's pickled bytes, reused N-1 times**;
``CKCORE_BENCH_TRAFFIC_LOAD_ALL=1`` (the default in quick mode) plans every
rank for real instead. Load bytes up (median, max) are therefore the
measured rank's unless that is set.

Checked in the bench, not only timed: both implementations' global
``Metadata`` agree (every tensor's chunk count; properties, size and chunks
of a sample of tensors; ``planner_data``), the measured rank's finished save
plans are equal (items and storage data) and its finished load plans hold
the same read items; the ``.metadata`` read back equals the one written.

Rank 0's peak RSS growth over the phase is measured in a forked child
(``/proc/self/clear_refs`` + ``VmHWM``, the parent's objects frozen out of
the GC so that copy-on-write does not count) running the same steps; that
run also produces the down bytes the workers finish from and the checkpoint
the load reads. ``CKCORE_BENCH_MEMORY=0`` skips the measurement (the child
still runs). torch runs one round (minutes at N=1024), ckcore three.
At the end of the session a table of the figures is printed (bench/conftest.py).

Run: ``PYTHONPATH=$PWD python -m pytest bench/test_bench_plan_traffic.py -q``
(``CKCORE_BENCH_TRAFFIC_RANKS=256`` for one size).
"""

from __future__ import annotations

import gc
import inspect
import io
import math
import multiprocessing
import os
import pickle
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed.distributed_c10d as _c10d
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import (
    FileSystemReader,
    FileSystemWriter,
    _StorageInfo,
)
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

import ckcore.dcp as ckdcp
from ckcore._models import llama70b_state_dict_shapes

QUICK_ENV = bool(os.environ.get("CKCORE_BENCH_QUICK"))
LAYERS = 4 if QUICK_ENV else 80
SHAPES = llama70b_state_dict_shapes(LAYERS)
DTYPE = torch.bfloat16
TP = 8
WORKERS = 2
IMPLS = ["ckcore", "torch"]
CKCORE_ROUNDS = 3


def _quick(config) -> bool:
    return QUICK_ENV or bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    if "ranks" in metafunc.fixturenames:
        default = "16" if _quick(metafunc.config) else "256,1024,4096"
        ns = [int(x) for x in os.environ.get("CKCORE_BENCH_TRAFFIC_RANKS", default).split(",")]
        for n in ns:
            if n < TP or n % TP:
                raise ValueError(f"plan-traffic: N={n} must be a multiple of {TP} (TP-{TP} load)")
        metafunc.parametrize("ranks", ns, ids=[f"N{n}" for n in ns])


def _load_all(config) -> bool:
    return os.environ.get("CKCORE_BENCH_TRAFFIC_LOAD_ALL", "1" if _quick(config) else "0") == "1"


# ------------------------------------------------------------------ implementations


def _classes(impl: str):
    """(save planner, storage writer, load planner, storage reader) classes of ``impl``."""
    if impl == "torch":
        return DefaultSavePlanner, FileSystemWriter, DefaultLoadPlanner, FileSystemReader
    writer = getattr(ckdcp, "FastFileSystemWriter", None) or FileSystemWriter
    return ckdcp.FastSavePlanner, writer, ckdcp.FastLoadPlanner, ckdcp.RangeFileSystemReader


# ---------------------------------------------------------------------- state dicts


def _placements(fqn: str, layout: tuple[int, ...]) -> tuple:
    """FSDP2 (x TP, torchtitan's plan) placements, as bench/test_bench_model_load.py."""
    if len(layout) == 1:
        return (Shard(0),)
    tp = layout[1]
    if fqn.endswith("norm.weight"):
        return (Shard(0), Replicate())
    if fqn.endswith(("wo.weight", "w2.weight")):
        return (Shard(0), Shard(1))
    return (_StridedShard(0, split_factor=tp), Shard(0))


_ZERO = torch.zeros(1, dtype=DTYPE)
_STRIDES: dict = {}


def state_dict(layout: tuple[int, ...], rank: int) -> dict[str, DTensor]:
    """Rank ``rank``'s state dict on a mesh of shape ``layout``: DTensors, nothing allocated.

    The same DTensors ``DTensor.from_local(zero_view, mesh, placements,
    shape=..., stride=..., run_check=False)`` gives, built straight from their
    spec (one spec per distinct (shape, placements) of the rank) because
    ``from_local`` costs ~1 ms per tensor.
    """
    mesh = DeviceMesh("cpu", torch.arange(math.prod(layout)).reshape(layout),
                      _init_backend=False, _rank=rank)
    specs: dict = {}
    out = {}
    for fqn, shape in SHAPES.items():
        pl = _placements(fqn, layout)
        key = (shape, pl)
        if key not in specs:
            size = torch.Size(shape)
            local_shape, _ = compute_local_shape_and_global_offset(size, mesh, pl)
            stride = _STRIDES.get(shape)
            if stride is None:
                stride = _STRIDES[shape] = torch.empty(size, device="meta").stride()
            specs[key] = (local_shape, DTensorSpec(mesh, pl, TensorMeta(size, stride, DTYPE)))
        local_shape, spec = specs[key]
        local = _ZERO.expand(local_shape) if len(local_shape) else _ZERO[0]
        out[fqn] = DTensor(local, spec, requires_grad=False)
    return out


def save_layout(n: int) -> tuple[int, ...]:
    return (n,)


def load_layout(n: int) -> tuple[int, ...]:
    return (n // TP, TP)


# ----------------------------------------------------------- DCP's protocol, per rank


class StepClock:
    """Seconds spent inside ``step`` blocks: pytest-benchmark's timer for these rounds.

    Reading it before and after a round gives the time of the round's steps
    only; ``steps`` has each step's seconds of the current round.
    """

    __name__ = "plan_traffic_step_clock"

    def __init__(self) -> None:
        self.total = 0.0
        self.steps: dict[str, float] = {}

    def __call__(self) -> float:
        return self.total

    @contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.total += dt
            self.steps[name] = self.steps.get(name, 0.0) + dt


class _NoClock:
    def step(self, name: str):
        return nullcontext()


NO_CLOCK = _NoClock()


def save_local_step(planner, writer, sd, rank: int):
    """``_save_state_dict``'s ``local_step`` (is_coordinator = rank 0)."""
    storage_meta = writer.storage_meta()
    if "storage_meta" not in inspect.signature(planner.set_up_planner).parameters:
        planner.set_up_planner(sd, rank == 0)
    else:
        planner.set_up_planner(state_dict=sd, storage_meta=storage_meta, is_coordinator=rank == 0)
    if "kwargs" in inspect.signature(writer.set_up_storage_writer).parameters:
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
    else:
        writer.set_up_storage_writer(rank == 0)
    local_plan = planner.create_local_plan()
    return writer.prepare_local_plan(local_plan)


def load_local_step(planner, reader, sd, metadata, rank: int):
    """``_load_state_dict``'s ``local_step`` after ``read_metadata``."""
    planner.set_up_planner(sd, metadata, rank == 0)
    if "kwargs" in inspect.signature(reader.set_up_storage_reader).parameters:
        reader.set_up_storage_reader(metadata, rank == 0, rank=rank, use_collectives=True)
    else:
        reader.set_up_storage_reader(metadata, rank == 0)
    local_plan = planner.create_local_plan()
    return reader.prepare_local_plan(local_plan)


_RECORD_OVERHEAD: dict[int, int] = {}


def _record_overhead(ndim: int) -> int:
    """Bytes a ``torch.save`` record adds to a bfloat16 tensor's data (per dimension count)."""
    if ndim not in _RECORD_OVERHEAD:
        t = torch.zeros((3,) * ndim, dtype=DTYPE)
        buf = io.BytesIO()
        torch.save(t, buf)
        _RECORD_OVERHEAD[ndim] = len(buf.getvalue()) - t.numel() * t.element_size()
    return _RECORD_OVERHEAD[ndim]


def write_results(finished_plan) -> list:
    """What ``FileSystemWriter.write_data`` returns for this finished plan (default options).

    One file per rank (``single_file_per_rank``, one thread): bytes items
    first, then tensor items in plan order, back to back; a tensor's length
    is its chunk's bytes plus the ``torch.save`` record overhead. This reads
    the finished plan's items, as ``write_data`` does.
    """
    file_name = f"{finished_plan.storage_data.prefix}0.distcp"
    items = finished_plan.items
    ordered = ([wi for wi in items if wi.type == WriteItemType.BYTE_IO]
               + [wi for wi in items if wi.type != WriteItemType.BYTE_IO])
    out, offset = [], 0
    for wi in ordered:
        if wi.type == WriteItemType.BYTE_IO:
            raise NotImplementedError("plan-traffic state dicts hold tensors only")
        td = wi.tensor_data
        item_bytes = math.prod(td.chunk.sizes) * td.properties.dtype.itemsize
        length = item_bytes + _record_overhead(len(td.chunk.sizes))
        out.append(WriteResult(index=wi.index, size_in_bytes=length,
                               storage_data=_StorageInfo(file_name, offset, length)))
        offset += length
    return out


def _as_written(impl: str, results: list) -> list:
    """``results`` in the list type ``impl``'s writer's ``write_data`` returns."""
    writer = _classes(impl)[1]
    if writer is getattr(ckdcp, "FastFileSystemWriter", None):
        from ckcore.dcp._compact import SentWriteResults

        return SentWriteResults(results)
    return results


# ------------------------------------------------------------------ the other ranks


def _worker_init() -> None:
    # The parent's objects are not this worker's garbage: keep the GC (and
    # copy-on-write) off them.
    gc.freeze()
    warnings.simplefilter("ignore")


def _w_save_up(args) -> list[bytes]:
    impl, n, ranks, path = args
    sp, sw, _, _ = _classes(impl)
    out = []
    for r in ranks:
        plan = save_local_step(sp(), sw(path), state_dict(save_layout(n), r), r)
        out.append(pickle.dumps(plan))
    return out


def _w_save_finish(args) -> list[bytes]:
    """Re-plan these ranks locally (untimed), then what each does with its scattered plan."""
    impl, n, ranks, path, downs = args
    sp, sw, _, _ = _classes(impl)
    out = []
    for r, down in zip(ranks, downs):
        planner = sp()
        save_local_step(planner, sw(path), state_dict(save_layout(n), r), r)
        final = planner.finish_plan(pickle.loads(down))
        out.append(pickle.dumps(_as_written(impl, write_results(final))))
    return out


_WORKER_MD: dict = {}


def _w_load_up(args) -> list[bytes]:
    impl, n, ranks, path = args
    _, _, lp, lr = _classes(impl)
    if path not in _WORKER_MD:
        _WORKER_MD.clear()
        _WORKER_MD[path] = lr(path).read_metadata()
    md = _WORKER_MD[path]
    out = []
    for r in ranks:
        plan = load_local_step(lp(), lr(path), state_dict(load_layout(n), r), md, r)
        out.append(pickle.dumps(plan))
    return out


def _chunks(seq: list, parts: int) -> list[list]:
    k = max(1, -(-len(seq) // parts))
    return [seq[i:i + k] for i in range(0, len(seq), k)]


def _on_workers(fn, impl, n, ranks: list[int], *rest, per_rank=None) -> list[bytes]:
    """``fn`` over ``ranks`` in forked workers, results in rank order."""
    if not ranks:
        return []
    parts = _chunks(list(range(len(ranks))), WORKERS * 4)
    tasks = []
    for idx in parts:
        args = (impl, n, [ranks[i] for i in idx], *rest)
        if per_rank is not None:
            args = args + ([per_rank[i] for i in idx],)
        tasks.append(args)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(WORKERS, initializer=_worker_init) as pool:
        return [b for part in pool.map(fn, tasks, chunksize=1) for b in part]


# ---------------------------------------------------------------------- rank 0


def rank0_save(impl, n, sd, others_up, others_results, path, clock, info):
    """Rank 0's side of ``dcp.save``'s planning phase and ``.metadata`` write.

    ``others_results(down)`` gives the other ranks' pickled WriteResult lists
    for the scattered plans ``down``. Steps inside ``clock.step`` are the
    timed figure; (e) goes to ``info`` with its own timer.
    """
    sp, sw, _, _ = _classes(impl)
    planner, writer = sp(), sw(path)
    with clock.step("local_plan"):
        local_plan = save_local_step(planner, writer, sd, 0)
    with clock.step("local_dumps"):
        up0 = pickle.dumps(local_plan)
    gathered = [up0, *others_up]
    gc.collect()
    with clock.step("gather_loads"):
        all_plans = [pickle.loads(b) for b in gathered]
    with clock.step("global_plan"):
        all_plans, metadata = planner.create_global_plan(all_plans)
    with clock.step("prepare_global_plan"):
        all_plans = writer.prepare_global_plan(all_plans)
    with clock.step("scatter_dumps"):
        down = [pickle.dumps(p) for p in all_plans]
    del all_plans, gathered
    with clock.step("finish_loads"):
        central = pickle.loads(down[0])
    with clock.step("finish_plan"):
        final = planner.finish_plan(central)
    info["bytes_up"] = [len(up0), *map(len, others_up)]
    info["bytes_down"] = [len(b) for b in down]
    # (e) all_reduce("write"): every rank's WriteResult list up, rank 0 unpickles all.
    t0 = time.perf_counter()
    mine = pickle.dumps(_as_written(impl, write_results(final)))
    t1 = time.perf_counter()
    rest = others_results(down)
    del down
    write_up = [mine, *rest]
    t2 = time.perf_counter()
    results = [pickle.loads(b) for b in write_up]
    t3 = time.perf_counter()
    info["write_results_dumps_s"] = t1 - t0
    info["write_gather_loads_s"] = t3 - t2
    info["write_bytes_up"] = [len(b) for b in write_up]
    del write_up, rest
    with clock.step("metadata_write"):
        writer.finish(metadata=metadata, results=results)
    # (e) the Metadata broadcast: pickled once on rank 0, unpickled on every other rank.
    t0 = time.perf_counter()
    md_tensor, md_size = _c10d._object_to_tensor(metadata, torch.device("cpu"), None)
    t1 = time.perf_counter()
    _c10d._tensor_to_object(md_tensor, md_size, None)
    t2 = time.perf_counter()
    info["broadcast_dumps_s"] = t1 - t0
    info["broadcast_loads_s"] = t2 - t1
    info["broadcast_bytes"] = int(md_size.item())
    info["metadata_file_bytes"] = os.path.getsize(os.path.join(path, ".metadata"))
    return final, metadata


def rank0_load(impl, n, sd, others_up, path, clock, info):
    """Rank 0's side of ``dcp.load``'s planning phase (``others_up`` None: reuse its bytes)."""
    _, _, lp, lr = _classes(impl)
    planner, reader = lp(), lr(path)
    with clock.step("read_metadata"):
        metadata = reader.read_metadata()
    with clock.step("local_plan"):
        local_plan = load_local_step(planner, reader, sd, metadata, 0)
    with clock.step("local_dumps"):
        up0 = pickle.dumps(local_plan)
    gathered = [up0, *(others_up if others_up is not None else [up0] * (n - 1))]
    gc.collect()
    with clock.step("gather_loads"):
        all_plans = [pickle.loads(b) for b in gathered]
    with clock.step("global_plan"):
        all_plans = planner.create_global_plan(all_plans)
    with clock.step("prepare_global_plan"):
        all_plans = reader.prepare_global_plan(all_plans)
    with clock.step("scatter_dumps"):
        down = [pickle.dumps(p) for p in all_plans]
    del all_plans
    with clock.step("finish_loads"):
        central = pickle.loads(down[0])
    with clock.step("finish_plan"):
        final = planner.finish_plan(central)
    info["bytes_up"] = [len(b) for b in gathered]
    info["bytes_down"] = [len(b) for b in down]
    info["metadata_file_bytes"] = os.path.getsize(os.path.join(path, ".metadata"))
    return final, metadata


# ------------------------------------------------------------- memory, in a child


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    os.write(fd, len(data).to_bytes(8, "little"))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int):
    def exact(k: int) -> bytes:
        buf = bytearray()
        while len(buf) < k:
            chunk = os.read(fd, min(k - len(buf), 1 << 24))
            if not chunk:
                raise EOFError("child or parent went away")
            buf += chunk
        return bytes(buf)

    return pickle.loads(exact(int.from_bytes(exact(8), "little")))


def in_child(phase_fn, serve=None):
    """Run ``phase_fn(ask)`` in a forked child; returns (its result, peak RSS growth in bytes).

    ``ask(x)`` in the child sends ``x`` to the parent and returns
    ``serve(x)`` computed there. The child freezes the parent's objects out of
    the cyclic GC (its collections would otherwise copy every page they
    touch), resets ``VmHWM`` and reports the peak over the phase.
    """
    to_parent, from_child = os.pipe()[::-1]
    from_parent, to_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(from_child)
            os.close(to_child)
            gc.freeze()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _proc_status_kb("VmRSS")

            def ask(x):
                _send(to_parent, ("ask", x))
                return _recv(from_parent)

            result = phase_fn(ask)
            peak = (_proc_status_kb("VmHWM") - base) * 1024
            _send(to_parent, ("done", (result, peak)))
            code = 0
        except BaseException as e:  # report, never return into pytest
            try:
                _send(to_parent, ("error", repr(e)))
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(to_parent)
    os.close(from_parent)
    try:
        while True:
            kind, x = _recv(from_child)
            if kind == "ask":
                _send(to_child, serve(x))
            elif kind == "error":
                raise RuntimeError(f"plan-traffic child failed: {x}")
            else:
                return x
    finally:
        os.close(from_child)
        os.close(to_child)
        os.waitpid(pid, 0)


# -------------------------------------------------------------------- the fixtures

_BASE = tempfile.mkdtemp(prefix="ckcore-plan-traffic-")
_MEMO: dict = {}
_SEEN: dict = {}  # (phase, n) -> {impl: summary}, for the cross-check


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_BASE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _quiet():
    warnings.simplefilter("ignore")  # FileSystemWriter's overwrite warning, torch's TypedStorage
    yield


def _fresh_dir(tag: str) -> str:
    return tempfile.mkdtemp(prefix=tag + "-", dir=_BASE)


def _saved(impl: str, n: int) -> dict:
    """The other ranks' save traffic and rank 0's peak memory, once per (impl, N).

    The child runs rank 0's whole save; its scattered plans go to the
    workers, whose WriteResult lists go back to it; its checkpoint
    directory is the one the load reads.
    """
    key = ("save", impl, n)
    if key in _MEMO:
        return _MEMO[key]
    scratch = _fresh_dir(f"{impl}-{n}-workers")
    others = list(range(1, n))
    others_up = _on_workers(_w_save_up, impl, n, others, scratch)
    sd = state_dict(save_layout(n), 0)
    path = _fresh_dir(f"{impl}-{n}-save")
    served: dict = {}

    def serve(down):
        served["results"] = _on_workers(_w_save_finish, impl, n, others, scratch, per_rank=down)
        return served["results"]

    def phase(ask):
        info: dict = {}
        rank0_save(impl, n, sd, others_up, lambda down: ask(down[1:]), path, NO_CLOCK, info)
        return None

    _, peak = in_child(phase, serve)
    _MEMO[key] = {"others_up": others_up, "others_results": served["results"],
                  "sd": sd, "path": path, "peak": peak}
    return _MEMO[key]


def _memory_enabled() -> bool:
    return os.environ.get("CKCORE_BENCH_MEMORY", "1") != "0"


def _rounds(impl: str) -> int:
    return 1 if impl == "torch" else CKCORE_ROUNDS


def _median_steps(per_round: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}


def _bytes_stats(prefix: str, sizes: list[int]) -> dict:
    return {f"{prefix}_median": int(statistics.median(sizes)), f"{prefix}_max": max(sizes),
            f"{prefix}_total": sum(sizes)}


def _run_rounds(benchmark, impl, one_round):
    """Time ``one_round(clock, info)`` by the step clock; per-round step seconds and infos."""
    clock = StepClock()
    per_round: list[dict] = []
    infos: list[dict] = []

    def target():
        clock.steps = {}
        info: dict = {}
        out = one_round(clock, info)
        per_round.append(dict(clock.steps))
        infos.append(info)
        return out

    if hasattr(benchmark, "_timer"):
        benchmark._timer = clock  # only the rank-0 steps advance the benchmark's clock
    out = benchmark.pedantic(target, rounds=_rounds(impl), iterations=1)
    return out, per_round, infos


def _md_summary(metadata) -> dict:
    sdm = metadata.state_dict_metadata
    fqns = sorted(sdm)
    sample = fqns[:: max(1, len(fqns) // 12)] + [fqns[-1]]

    def full(m):
        return (repr(m.properties), tuple(m.size),
                [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks])

    return {
        "chunk_counts": {f: len(sdm[f].chunks) for f in fqns},
        "sample": {f: full(sdm[f]) for f in sample},
        "planner_data": metadata.planner_data,
        "storage_entries": len(metadata.storage_data or {}),
    }


def _cross_check(phase: str, n: int, impl: str, summary: dict) -> None:
    seen = _SEEN.setdefault((phase, n), {})
    seen[impl] = summary
    if len(seen) == 2:
        a, b = seen.values()
        assert a["chunk_counts"] == b["chunk_counts"]
        assert a["sample"] == b["sample"]
        assert a["planner_data"] == b["planner_data"]
        assert a["storage_entries"] == b["storage_entries"]
        assert a["final"] == b["final"], f"{phase} N={n}: measured rank's finished plans differ"


def _load_items_key(plan) -> Counter:
    return Counter(
        (r.type, r.dest_index.fqn, tuple(r.dest_index.offset), r.storage_index.fqn,
         tuple(r.storage_index.offset), tuple(r.storage_offsets), tuple(r.dest_offsets),
         tuple(r.lengths))
        for r in plan.items
    )


def _table_row(phase, n, impl, steps, info, peak, extra=None) -> dict:
    """The row of the end-of-session table (bench/conftest.py): the main figures, short."""
    md_step = steps.get("metadata_write", steps.get("read_metadata"))
    row = {
        "phase": phase, "N": n, "impl": impl,
        "rank0_s": round(sum(steps.values()), 3),
        "up_kB med/max": f"{info['bytes_up_median'] / 1e3:.1f}/{info['bytes_up_max'] / 1e3:.1f}",
        "down_kB med/max":
            f"{info['bytes_down_median'] / 1e3:.1f}/{info['bytes_down_max'] / 1e3:.1f}",
        "local_s": round(steps["local_plan"], 3),
        "gather_loads_s": round(steps["gather_loads"], 3),
        "global_plan_s": round(steps["global_plan"], 3),
        "scatter_dumps_s": round(steps["scatter_dumps"], 3),
        "md_write/read_s": round(md_step, 3),
        "md_MB": round(info["metadata_file_bytes"] / 1e6, 1),
        "peak_MiB": "-" if peak is None else round(peak / 2**20),
    }
    row.update(extra or {})
    return row


# ------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_traffic_save(benchmark, impl, ranks):
    n = ranks
    benchmark.group = f"plan-traffic save N={n}"
    saved = _saved(impl, n)
    paths: list[str] = []

    def one_round(clock, info):
        if paths:
            shutil.rmtree(paths.pop(), ignore_errors=True)
        path = _fresh_dir(f"{impl}-{n}-round")
        paths.append(path)
        return rank0_save(impl, n, saved["sd"], saved["others_up"],
                          lambda down: saved["others_results"], path, clock, info)

    (final, metadata), per_round, infos = _run_rounds(benchmark, impl, one_round)
    steps = _median_steps(per_round)
    info = infos[-1]
    peak = saved["peak"] if _memory_enabled() else None
    ei = benchmark.extra_info
    ei.update(ranks=n, layers=LAYERS, tensors=len(SHAPES),
              classes=[c.__name__ for c in _classes(impl)[:2]],
              rank0_steps_s=steps, rank0_steps_all_rounds=per_round,
              rank0_seconds=sum(steps.values()), peak_rss_growth_bytes=peak)
    ei.update(_bytes_stats("bytes_up", info["bytes_up"]))
    ei.update(_bytes_stats("bytes_down", info["bytes_down"]))
    ei.update(_bytes_stats("write_bytes_up", info["write_bytes_up"]))
    for k in ("write_results_dumps_s", "write_gather_loads_s", "broadcast_dumps_s",
              "broadcast_loads_s", "broadcast_bytes", "metadata_file_bytes"):
        ei[k] = statistics.median(i[k] for i in infos)
    ei["summary_table"] = "plan-traffic"
    ei["summary_row"] = _table_row(
        "save", n, impl, steps, ei, peak,
        {"(e) write_up_kB": round(ei["write_bytes_up_median"] / 1e3, 1),
         "(e) gather_s": round(ei["write_gather_loads_s"], 3),
         "(e) bcast_loads_s": round(ei["broadcast_loads_s"], 3)})

    # Correct, not only timed.
    assert len(metadata.state_dict_metadata) == len(SHAPES)
    assert all(len(m.chunks) >= 1 for m in metadata.state_dict_metadata.values())
    assert len(final.items) == len(SHAPES)  # FSDP: every tensor has a shard on rank 0
    summary = _md_summary(metadata)
    summary["final"] = (final.items, final.storage_data)
    _cross_check("save", n, impl, summary)


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_traffic_load(benchmark, impl, ranks, request):
    n = ranks
    benchmark.group = f"plan-traffic load N={n}"
    saved = _saved(impl, n)
    path = saved["path"]
    sd = state_dict(load_layout(n), 0)
    all_ranks = _load_all(request.config)
    others_up = (_on_workers(_w_load_up, impl, n, list(range(1, n)), path)
                 if all_ranks else None)

    def phase(_ask):
        rank0_load(impl, n, sd, others_up, path, NO_CLOCK, {})

    peak = in_child(phase)[1] if _memory_enabled() else None
    (final, metadata), per_round, infos = _run_rounds(
        benchmark, impl, lambda clock, info: rank0_load(impl, n, sd, others_up, path, clock, info))
    steps = _median_steps(per_round)
    info = infos[-1]
    ei = benchmark.extra_info
    ei.update(ranks=n, layers=LAYERS, tensors=len(SHAPES),
              classes=[c.__name__ for c in _classes(impl)[2:]],
              other_ranks="planned" if all_ranks else "measured rank's bytes reused",
              rank0_steps_s=steps, rank0_steps_all_rounds=per_round,
              rank0_seconds=sum(steps.values()), peak_rss_growth_bytes=peak,
              metadata_file_bytes=info["metadata_file_bytes"])
    ei.update(_bytes_stats("bytes_up", info["bytes_up"]))
    ei.update(_bytes_stats("bytes_down", info["bytes_down"]))
    ei["summary_table"] = "plan-traffic"
    ei["summary_row"] = _table_row("load", n, impl, steps, ei, peak,
                                   {"other ranks": "planned" if all_ranks else "reused"})

    # The metadata read back is the one the save wrote; the plan is torch's.
    summary = _md_summary(metadata)
    assert len(metadata.state_dict_metadata) == len(SHAPES)
    assert summary["storage_entries"] == sum(summary["chunk_counts"].values())
    reference = DefaultLoadPlanner()
    reference.set_up_planner(sd, metadata, True)
    want = _load_items_key(reference.create_local_plan())
    assert _load_items_key(final) == want
    summary["final"] = want
    _cross_check("load", n, impl, summary)
