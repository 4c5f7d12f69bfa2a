"""Kernel entries called from many threads while other threads change their inputs.

Every compiled entry point (through its public façade where one takes
caller-owned objects) is called on shared inputs by several threads while
other threads shrink, grow, replace items in, clear and restore the shared
lists, rewrite shared arrays or try to resize shared buffers. A call must
either return the right answer for one state the input was really in, or
raise ValueError, TypeError, IndexError or RuntimeError; it must never
crash the interpreter. Each scenario runs in a fresh interpreter
(``subprocess``), so a crash fails its test instead of killing pytest.

The deterministic cases make Python code run inside a kernel (a property
read by the kernel changes the list it is reading), which reaches the same
windows as another thread would, every time.

torch-free: CI runs this module in its torch-free pass.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from ckcore import _gc
from tests.support.paths import CKCORE_PARENT

# Where the ckcore under test lives (the installed wheel in CI, not the checkout).
ROOT = str(CKCORE_PARENT)

# Shared by every scenario: the stress driver and a shared list that records
# every state it is put in.
PRELUDE = r'''
import random, sys, threading, time
sys.setswitchinterval(1e-6)   # switch threads as often as CPython allows
ALLOWED = (ValueError, TypeError, IndexError, RuntimeError)


def stress(call, check, mutators, seconds, callers=2):
    """call() on `callers` threads, each mutator(rng) on a thread of its own, for `seconds`.

    check(result) returns an error message or None; anything but ALLOWED
    raised by call() fails the run. Returns the number of checked results.
    """
    stop = threading.Event()
    errors, done = [], [0]

    def caller():
        while not stop.is_set():
            try:
                r = call()
            except ALLOWED:
                continue
            except BaseException as e:  # noqa: BLE001 - any other escape is the failure
                errors.append(f"call raised {type(e).__name__}: {e}")
                stop.set()
                return
            msg = check(r)
            if msg:
                errors.append(msg)
                stop.set()
                return
            done[0] += 1

    def mutator(m, seed):
        rng = random.Random(seed)
        while not stop.is_set():
            m(rng)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    threads += [threading.Thread(target=mutator, args=(m, i)) for i, m in enumerate(mutators)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert done[0] > 0, "no call returned"
    return done[0]


class Shared:
    """A shared list of pool objects, changed at random; remembers every state it was in.

    States are tuples of pool positions (kept as hashes). Each change is one
    list operation (atomic under the GIL), recorded under a lock right
    after; seen() takes that lock before a second look, so a state a call
    read is always recorded by the time it is asked about.
    """

    def __init__(self, pool, start):
        self.pool = pool
        self.start = list(start)
        self.idx = list(start)
        self.list = [pool[i] for i in start]
        self.lock = threading.Lock()
        self.states = {hash(tuple(start))}

    def mutate(self, rng):
        with self.lock:
            n = len(self.idx)
            op = rng.randrange(6)
            if op == 0 and n:                       # shrink
                k = rng.randrange(n)
                del self.list[k:]
                del self.idx[k:]
            elif op == 1 and n < 2 * len(self.start) + 2:   # grow
                j = rng.randrange(len(self.pool))
                self.list.append(self.pool[j])
                self.idx.append(j)
            elif op == 2 and n:                     # replace an item
                i, j = rng.randrange(n), rng.randrange(len(self.pool))
                self.list[i] = self.pool[j]
                self.idx[i] = j
            elif op == 3:                           # clear
                self.list.clear()
                self.idx.clear()
            else:                                   # back to the start
                self.list[:] = [self.pool[i] for i in self.start]
                self.idx[:] = self.start
            self.states.add(hash(tuple(self.idx)))

    def seen(self, positions):
        h = hash(tuple(positions))
        if h in self.states:
            return True
        with self.lock:
            return h in self.states
'''


def run_isolated(body: str, timeout: float = 60) -> str:
    """Run PRELUDE + body in a fresh interpreter; fail (not crash) on a non-zero exit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, (
        f"exit code {proc.returncode} (negative: killed by that signal)\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout


# ------------------------------------------------------------------ read items

READ_ITEMS_SETUP = r'''
from ckcore.items import chunk_arrays, create_read_items_for_chunk_list, intersect_chunks
from ckcore.metadata import ChunkStorageMetadata as C, TensorProperties, TensorStorageMetadata


def grid(n, step, dims=2):
    # n x n chunks of step x step over an (n*step)^2 tensor, each offset unique.
    return [C((i * step, j * step), (step, step)) for i in range(n) for j in range(n)]


# Local and saved layouts differ (the saved chunks are cut finer), so every
# local chunk meets several saved ones and the intersection runs long
# enough, GIL released, for the other threads to change the lists.
LOCAL = grid(20, 6)
SAVED = grid(40, 3)
by_offset = {c.offsets: k for k, c in enumerate(LOCAL)}
by_offset_saved = {c.offsets: k for k, c in enumerate(SAVED)}


def reference(local, saved):
    md = TensorStorageMetadata(TensorProperties(), (120, 120), list(saved))
    return create_read_items_for_chunk_list("w", md, list(local))


def snapshot(items, side, index_of):
    # The chunk list a result was built from: every chunk meets the other
    # side, so every position appears in the result as an index.
    found = {}
    for it in items:
        ix = it.dest_index if side == "local" else it.storage_index
        found[ix.index] = index_of[ix.offset]
    if sorted(found) != list(range(len(found))):
        return None
    return [found[i] for i in range(len(found))]
'''


def test_read_items_local_list_changed_by_other_threads():
    out = run_isolated(READ_ITEMS_SETUP + r'''
shared = Shared(LOCAL, range(len(LOCAL)))
md = TensorStorageMetadata(TensorProperties(), (120, 120), list(SAVED))


def check(items):
    pos = snapshot(items, "local", by_offset)
    if pos is None:
        return "local chunk indices of the result have holes"
    if not shared.seen(pos):
        return f"result built from a local list that never existed ({len(pos)} chunks)"
    if items != reference([LOCAL[i] for i in pos], SAVED):
        return "items differ from the items of the list they were built from"


n = stress(lambda: create_read_items_for_chunk_list("w", md, shared.list), check,
           [shared.mutate], seconds=1.5)
print("checked", n)
''')
    assert "checked" in out


def test_read_items_saved_list_changed_by_other_threads():
    out = run_isolated(READ_ITEMS_SETUP + r'''
shared = Shared(SAVED, range(len(SAVED)))
md = TensorStorageMetadata(TensorProperties(), (120, 120), shared.list)


def check(items):
    pos = snapshot(items, "saved", by_offset_saved)
    if pos is None:
        return "saved chunk indices of the result have holes"
    if not shared.seen(pos):
        return f"result built from a saved list that never existed ({len(pos)} chunks)"
    if items != reference(LOCAL, [SAVED[i] for i in pos]):
        return "items differ from the items of the list they were built from"


n = stress(lambda: create_read_items_for_chunk_list("w", md, LOCAL), check,
           [shared.mutate], seconds=1.0)
print("checked", n)
''')
    assert "checked" in out


def test_chunk_arrays_and_intersect_chunks_on_changing_lists():
    run_isolated(READ_ITEMS_SETUP + r'''
shared = Shared(LOCAL, range(len(LOCAL)))
rows = {(c.offsets, c.sizes): k for k, c in enumerate(LOCAL)}


def check_arrays(res):
    off, size = res
    pos = [rows[(tuple(o), tuple(s))] for o, s in zip(off.tolist(), size.tolist())]
    if not shared.seen(pos):
        return "arrays of a list that never existed"


stress(lambda: chunk_arrays(shared.list, "w", 2), check_arrays, [shared.mutate], seconds=0.5)


def check_pairs(r):
    if len(r) and (r.saved_index.max() >= len(SAVED) or r.local_index.min() < 0):
        return "pair indices out of range"


stress(lambda: intersect_chunks(shared.list, SAVED, ndim=2), check_pairs, [shared.mutate],
       seconds=0.5)
''')


EVIL_CHUNK = r'''
class Evil:
    """A chunk whose n-th read of .offsets empties the list it sits in."""

    def __init__(self, offsets, sizes, home, when):
        self._offsets, self.sizes, self.home, self.when, self.reads = offsets, sizes, home, when, 0

    @property
    def offsets(self):
        self.reads += 1
        if self.reads == self.when:
            self.home.clear()
        return self._offsets


def evil_list(n, when, step=4):
    lst = []
    lst.extend(Evil((i * step,), (step,), lst, when) for i in range(n))
    return lst
'''


def test_chunk_lists_emptied_while_a_kernel_reads_them():
    # The list empties itself from inside the kernel: at the first read (the
    # kernel is reading the chunks), or at the second (read_items building
    # items after its GIL-free intersection). Results are those of the list
    # as it was on entry.
    run_isolated(EVIL_CHUNK + r'''
import numpy as np
from ckcore._kernels import _items, _mdcheck, _validate
from ckcore.items import (
    ItemClasses, CKCORE_CLASSES, chunk_arrays, create_read_items_for_chunk_list,
)
from ckcore.metadata import ChunkStorageMetadata as C, TensorProperties, TensorStorageMetadata

saved = [C((i * 8,), (8,)) for i in range(100)]
for when in (1, 2, 3):
    local = evil_list(200, when)
    md = TensorStorageMetadata(TensorProperties(), (800,), saved)
    items = create_read_items_for_chunk_list("w", md, local)
    assert len(items) == 200, len(items)

    sv = evil_list(100, when, step=8)
    md = TensorStorageMetadata(TensorProperties(), (800,), sv)
    items = create_read_items_for_chunk_list("w", md, [C((i * 4,), (4,)) for i in range(200)])
    assert len(items) == 200, len(items)

    off, size = chunk_arrays(evil_list(50, when), "w", 1)
    assert off[:, 0].tolist() == [4 * i for i in range(50)]

    off, size = _validate.chunk_rows("k", evil_list(50, when), 1)
    assert off[:, 0].tolist() == [4 * i for i in range(50)]

    # build_read_items: the array path's item builder.
    loc = evil_list(20, when)
    li = np.arange(20, dtype=np.int64)
    z = np.zeros((20, 1), dtype=np.int64)
    out = _items.build_read_items("w", li, li, z, z, z + 4, loc, [C((i * 4,), (4,)) for i in range(20)],
                                  *CKCORE_CLASSES[:2], CKCORE_CLASSES.load_item_type.TENSOR, tuple)
    assert [it.dest_index.offset for it in out] == [(4 * i,) for i in range(20)]

    # _mdcheck reads instance fields from the instance dict, never through a
    # property: it runs no code of the chunks, so the list stays as it was
    # (and the evil class, whose dict is not offsets/sizes, is malformed).
    lst = evil_list(30, when)
    assert _mdcheck.first_bad_chunk(lst, Evil, 1) == 0 and len(lst) == 30
print("ok")
''')


# ------------------------------------------------------------------ global planning

PLANS_SETUP = r'''
import dataclasses
from ckcore import planner as cp
from ckcore.global_plan import create_global_save_plan, dedup_save_plans, plan_global_save
from ckcore.items import create_write_item_for_tensor


@dataclasses.dataclass(frozen=True)
class Sized(cp.WriteItem):
    # A Python-level size: dedup calls it (GIL switch points) between the
    # pass that counts a plan's items and the pass that indexes them.
    def tensor_storage_size(self):
        return 4 * (len(self.index.fqn) + 1)


def item(fqn):
    w = create_write_item_for_tensor(fqn, (4, 4))
    return Sized(index=w.index, type=w.type, tensor_data=w.tensor_data)


POOL = [item(f"t{i}") for i in range(60)]
NRANKS = 4
# Every rank holds every tensor: each is duplicated, so dedup has to choose.
shared = [Shared(POOL, range(len(POOL))) for _ in range(NRANKS)]
plans = [cp.SavePlan(s.list) for s in shared]
mutators = [s.mutate for s in shared]
'''


def test_dedup_and_global_plan_on_item_lists_changed_by_other_threads():
    run_isolated(PLANS_SETUP + r'''
def check_dedup(out):
    if len(out) != NRANKS:
        return f"{len(out)} plans for {NRANKS}"
    # (A plan may hold one index twice: dedup keeps both, on that plan.)
    holders = {}
    for r, p in enumerate(out):
        for it in p.items:
            holders.setdefault(it.index.fqn, set()).add(r)
    if any(len(h) > 1 for h in holders.values()):
        return "an item kept on two plans"
    if any(it not in POOL for p in out for it in p.items):
        return "an item that was never in a plan"


stress(lambda: dedup_save_plans(plans), check_dedup, mutators, seconds=0.7)
stress(lambda: dedup_save_plans(plans, save_to_lowest_rank=True), check_dedup, mutators,
       seconds=0.3)


def check_global(res):
    new_plans, md = res
    chunks = sum(len(v.chunks) for v in md.state_dict_metadata.values())
    if chunks != sum(len(p.items) for p in new_plans):
        return "metadata chunks and plan items disagree"


# A tensor item twice for one fqn (on several ranks without dedup, or twice
# on one rank, which dedup keeps) is torch's AssertionError: a clean
# outcome here too. Without dedup, each rank gets tensors of its own.
own = [Shared([item(f"r{r}t{i}") for i in range(60)], range(60)) for r in range(NRANKS)]
own_plans = [cp.SavePlan(s.list) for s in own]


def global_plan():
    try:
        return create_global_save_plan(own_plans)
    except AssertionError:
        raise ValueError("duplicate non-shard item") from None


stress(global_plan, check_global, [s.mutate for s in own], seconds=0.4)


def fused():
    try:
        new_plans, md, errors = plan_global_save(plans)
    except AssertionError:
        raise ValueError("duplicate non-shard item") from None
    return new_plans, md


stress(fused, check_global, mutators, seconds=0.6)
''')


def test_plans_emptied_while_dedup_reads_them():
    # An item's size call empties its own plan's list and the plan list:
    # the kernel must finish on what it read.
    run_isolated(PLANS_SETUP + r'''
all_plans = []


@dataclasses.dataclass(frozen=True)
class Clearing(cp.WriteItem):
    def tensor_storage_size(self):
        for p in all_plans:
            p.items.clear()
        all_plans.clear()
        return 16


def clearing(fqn):
    w = create_write_item_for_tensor(fqn, (4, 4))
    return Clearing(index=w.index, type=w.type, tensor_data=w.tensor_data)


for fn in (dedup_save_plans, lambda ps: plan_global_save(ps)[0]):
    all_plans[:] = [cp.SavePlan([clearing(f"t{i}") for i in range(50)]) for _ in range(3)]
    out = fn(all_plans)
    assert sorted(it.index.fqn for p in out for it in p.items) == sorted(f"t{i}" for i in range(50))
print("ok")
''')


# ------------------------------------------------------------------ validation and metadata checks


def test_validation_and_metadata_checks_on_changing_chunk_lists():
    run_isolated(r'''
from ckcore._kernels import _mdcheck
from ckcore.checkpoint import StorageInfo
from ckcore.global_plan import validate_global_plan
from ckcore.metadata import (
    ChunkStorageMetadata as C, Metadata, TensorProperties, TensorStorageMetadata,
)
from ckcore.planner import SavePlan

POOL = [C((i * 4, j * 4), (4, 4)) for i in range(16) for j in range(16)]
shared = Shared(POOL, range(len(POOL)))
md = Metadata({"w": TensorStorageMetadata(TensorProperties(), (64, 64), shared.list)})
plans = [SavePlan([]), SavePlan([])]


def check_errors(errors):
    if not all(isinstance(e, str) for e in errors):
        return "findings are not messages"


stress(lambda: validate_global_plan(plans, md), check_errors, [shared.mutate], seconds=0.6)


def check_index(i):
    if i != -1:
        return f"chunk {i} reported bad, all are well-formed"


stress(lambda: _mdcheck.first_bad_chunk(shared.list, C, 2), check_index, [shared.mutate],
       seconds=0.3)
INFOS = [StorageInfo("f", i, 1) for i in range(300)]
infos = Shared(INFOS, range(len(INFOS)))
stress(lambda: _mdcheck.first_bad_storage_info(infos.list, StorageInfo), check_index,
       [infos.mutate], seconds=0.3)
''')


# ------------------------------------------------------------------ arrays and buffers


def test_array_kernels_with_arrays_rewritten_by_other_threads():
    # Arrays passed straight to the kernels (no façade copy) and rewritten
    # with valid and invalid values by other threads: the kernels check
    # private copies or read each value once, so a call raises ValueError
    # or returns, and never reads or writes outside its buffers.
    run_isolated(r'''
import numpy as np
from ckcore._kernels import _coverage, _intersect, _layout

rng0 = np.random.default_rng(0)

# layout: mesh sizes, kinds and split factors rewritten between valid and
# invalid values (a mesh size sizes the table walk; split factors divide).
shape = np.array([96, 64], dtype=np.int64)
shapes = np.array([[96, 64], [32, 48]], dtype=np.int64)
mesh = np.array([2, 3], dtype=np.int64)
kinds = np.array([2, 1], dtype=np.int64)
dims = np.array([0, 1], dtype=np.int64)
sfs = np.array([2, 1], dtype=np.int64)
coord = np.array([1, 2], dtype=np.int64)
good = _layout.layout_all(shape, mesh, kinds, dims, sfs)


def mutate_layout(rng):
    mesh[rng.randrange(2)] = rng.choice([0, 1, 2, 3, 40, -1])
    sfs[0] = rng.choice([0, 1, 2, -5])
    kinds[rng.randrange(2)] = rng.choice([0, 1, 2, 7])
    shape[rng.randrange(2)] = rng.choice([96, -3, 0, 64])
    shapes[rng.randrange(2), rng.randrange(2)] = rng.choice([96, -3, 0, 64])
    dims[rng.randrange(2)] = rng.choice([0, 1, 5])
    if rng.random() < 0.3:
        mesh[:] = (2, 3); kinds[:] = (2, 1); sfs[:] = (2, 1); shape[:] = (96, 64); dims[:] = (0, 1)


def layout_calls():
    a = _layout.layout_all(shape, mesh, kinds, dims, sfs)
    b = _layout.layout_all_many(shapes, mesh, kinds, dims, sfs)
    c = _layout.layout_coordinate_many(shapes, mesh, kinds, dims, sfs, coord)
    return a, b, c


stress(layout_calls, lambda r: None, [mutate_layout], seconds=0.6)

# intersect and check_cover on arrays whose values change under them.
lo = np.array([[i * 4, j * 4] for i in range(30) for j in range(30)], dtype=np.int64)
ls = np.full_like(lo, 4)
so = np.array([[i * 3, j * 3] for i in range(40) for j in range(40)], dtype=np.int64)
ss = np.full_like(so, 3)


def mutate_boxes(rng):
    a = rng.choice([lo, ls, so, ss])
    a[rng.randrange(len(a)), rng.randrange(2)] = rng.choice([0, 1, 3, 4, 2**40, 2**62])
    if rng.random() < 0.05:
        lo[:] = [[i * 4, j * 4] for i in range(30) for j in range(30)]
        ls[:] = 4


def pairs_and_cover():
    r = _intersect.intersect(lo, ls, so, ss)
    return _coverage.check_cover(r[0], r[3], r[4], ls)


stress(pairs_and_cover, lambda r: None, [mutate_boxes], seconds=0.6)
''')


def test_ranges_with_buffers_resized_and_runs_rewritten(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 64)
    run_isolated(f"PATH = {str(path)!r}\n" + r'''
import os
import numpy as np
from ckcore.ranges import copy_box, read_runs

DATA = bytes(range(256)) * 64
fd = os.open(PATH, os.O_RDONLY)

# read_runs: the destination is a bytearray other threads try to resize (an
# exported buffer refuses), the runs an int64 array (passed through without
# a copy) whose destination offsets other threads push past the buffer.
N = 64
dst = bytearray(N)
runs = np.array([[16 * i, 8 * i, 8] for i in range(8)], dtype=np.int64)
blocks = np.array([[0, 16 * 7 + 8]], dtype=np.int64)
fence = bytearray(b"\xee" * 4096)   # allocated next to dst: a stray write shows here


def resize(rng):
    try:
        if rng.random() < 0.5:
            dst.extend(b"\0" * 64)
        else:
            del dst[N:]
    except BufferError:
        pass


def rewrite_runs(rng):
    r = rng.randrange(8)
    runs[r, 1] = rng.choice([8 * r, 10**6, 2**40, -1])
    if rng.random() < 0.2:
        runs[:, 1] = np.arange(8) * 8


def check_read(res):
    if bytes(fence) != b"\xee" * 4096:
        return "a read landed outside the destination"


stress(lambda: read_runs(fd, runs, blocks, dst), check_read, [resize, rewrite_runs],
       seconds=0.8)

# copy_box: the source bytearray is resized by another thread while boxes
# are copied out of it; every completed copy holds the right bytes.
src = bytearray(DATA[:4096])
out = np.zeros((16, 16), dtype=np.uint8)


def resize_src(rng):
    try:
        if rng.random() < 0.5:
            src.extend(b"\0" * 256)
        else:
            del src[4096:]
    except BufferError:
        pass


def copy():
    copy_box(src, out, (16, 16), itemsize=1, src_shape=(64, 64), dst_shape=(16, 16),
             src_offsets=(8, 8))
    return out.copy()


want = np.frombuffer(DATA[:4096], dtype=np.uint8).reshape(64, 64)[8:24, 8:24]
stress(copy, lambda r: None if np.array_equal(r, want) else "wrong bytes", [resize_src],
       seconds=0.5, callers=1)
os.close(fd)
''')


# ------------------------------------------------------------------ the GC switch


def test_overlapping_gc_pauses_restore_the_callers_setting():
    assert gc.isenabled()
    _gc.pause()
    _gc.pause()                 # a second pause, as another thread would take
    _gc.resume()                # the first to end must not turn the GC back on
    assert not gc.isenabled()
    _gc.resume()
    assert gc.isenabled()
    gc.disable()
    try:
        with _gc.paused():
            pass
        assert not gc.isenabled()   # a caller's disabled GC stays disabled
    finally:
        gc.enable()


def test_gc_enabled_after_many_threads_pause_it():
    from ckcore.items import create_read_items_for_chunk_list
    from ckcore.metadata import ChunkStorageMetadata as C
    from ckcore.metadata import TensorProperties, TensorStorageMetadata

    md = TensorStorageMetadata(TensorProperties(), (400,), [C((i * 4,), (4,)) for i in range(100)])
    local = [C((i * 8,), (8,)) for i in range(50)]

    def work():
        for _ in range(200):
            with _gc.paused(promote=True):
                create_read_items_for_chunk_list("w", md, local)
            create_read_items_for_chunk_list("w", md, local)

    assert gc.isenabled()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.isenabled()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
