"""Security review of the untrusted ``.metadata`` reader: the opcode scan against the C unpickler.

Torch-free (never imports torch). ckcore.checkpoint pre-scans a pickle with
``ckcore._kernels._pickle_scan`` and then runs CPython's C unpickler on it;
the safety argument is that the scan models every opcode exactly as the C
unpickler runs it. The tests here are hostile streams, built byte by byte.

Part 1 (``test_hole_*``) are the attacks a review found getting through an
earlier version of the scan (frame desync, hash bombs and chosen
collisions, path and text amplification, memory, ill-formed results): each
asserts the safe outcome (CheckpointError/UnsafeCheckpointError, no crash,
nothing mutated, bounded time and memory). Payloads that could crash, hang
or eat memory run in a child process (``timeout=30``, memory capped where
noted).

Part 2 (``test_refused_*`` / ``test_harmless_*``) are attacks that were
refused or harmless from the start; they document the coverage and keep it.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import ckcore.checkpoint
from ckcore.checkpoint import (
    MAX_DEPTH,
    CheckpointError,
    UnsafeCheckpointError,
    _global_kind,
    _pickle_scan,
    loads_metadata,
)
from ckcore.metadata import Metadata
from tests.support.paths import CKCORE_PARENT

ROOT = CKCORE_PARENT

# --------------------------------------------------------------------------
# Stream builders.
# --------------------------------------------------------------------------

MD_MOD = b"torch.distributed.checkpoint.metadata"


def glob(module: bytes, name: bytes) -> bytes:
    return b"c" + module + b"\n" + name + b"\n"


GLOB_MD = glob(MD_MOD, b"Metadata")
GLOB_INDEX = glob(MD_MOD, b"MetadataIndex")
GLOB_BYTES_MD = glob(MD_MOD, b"BytesStorageMetadata")
GLOB_STORAGE_META = glob(MD_MOD, b"StorageMeta")
GLOB_CHUNK = glob(MD_MOD, b"ChunkStorageMetadata")
GLOB_TPROPS = glob(MD_MOD, b"TensorProperties")
GLOB_PATH = glob(b"pathlib", b"PurePosixPath")
M61 = (1 << 61) - 1  # the modulus of hash(int): i and i + M61 collide


def su(s: str) -> bytes:
    """SHORT_BINUNICODE."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def long1(x: int) -> bytes:
    b = x.to_bytes((x.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def lget(i: int) -> bytes:
    """LONG_BINGET."""
    return b"j" + struct.pack("<I", i)


def frame(body: bytes) -> bytes:
    return b"\x95" + struct.pack("<Q", len(body)) + body


# The smallest well-formed Metadata (no memo entries, so it can follow anything).
VALID_TAIL = GLOB_MD + b")\x81}" + su("state_dict_metadata") + b"}sb."
VALID = b"\x80\x04" + VALID_TAIL


def md_with(**fields: bytes) -> bytes:
    """Metadata whose BUILD state maps each field to the value its ops push.

    ``state_dict_metadata`` defaults to ``{}``. No memo entries are used by the
    wrapper, so the field ops may number theirs from 0.
    """
    fields.setdefault("state_dict_metadata", b"}")
    body = b"".join(su(k) + v for k, v in fields.items())
    return b"\x80\x04" + GLOB_MD + b")\x81}(" + body + b"ub."


def scan(data: bytes):
    return _pickle_scan.scan(data, _global_kind)


def _ascii_len(k: int) -> int:
    # A BINBYTES length whose 4 bytes are ASCII (they sit inside a str for the C unpickler).
    while any(b >= 0x80 for b in struct.pack("<I", k)):
        k += 1
    return k


def desync_straddle(hidden: bytes, tail: bytes = VALID_TAIL) -> bytes:
    """The C unpickler runs ``hidden``; the scan reads it as the content of a BINBYTES.

    A FRAME ends 5 bytes into a SHORT_BINUNICODE's 10-byte argument. The scan
    reads the argument across the frame end. CPython's C unpickler (file mode,
    as ckcore runs it over io.BytesIO or _Gated) finds too few bytes left in
    the frame buffer and reads 10 *fresh* bytes after it, dropping the 5 left
    in the frame: it is 5 bytes ahead of the scan from then on. Those 5 bytes
    are, for the scan, a BINBYTES header whose content is ``hidden``.
    """
    k = _ascii_len(len(hidden))
    hidden = hidden.ljust(k, b"\0")
    body = b"\x8c\x0a" + b"a" * 5
    after = b"b" * 5 + b"B" + struct.pack("<I", k) + hidden + b"00" + tail
    return b"\x80\x04" + frame(body) + after


def desync_nested_frame(hidden: bytes, tail: bytes = VALID_TAIL) -> bytes:
    """Same, with a FRAME inside a frame that is longer than the rest of the outer one.

    The C unpickler drops the outer frame's last 5 bytes (a BINBYTES header
    for the scan) and loads ``hidden`` as the new frame.
    """
    k = _ascii_len(len(hidden))
    hidden = hidden.ljust(k, b"\0")
    outer = b"\x95" + struct.pack("<Q", k) + b"B" + struct.pack("<I", k)
    return b"\x80\x04" + frame(outer) + hidden + b"0" + tail


def text_get_chain(levels: int) -> bytes:
    """A GET whose text line crosses a frame end: the scan reads GET 10, C reads GET 0.

    C looks for the newline in the frame buffer, does not find it and calls
    readline() on the file, which starts after the frame. Per level: the scan
    sees memo 10 (an int) go into a 1-tuple; C puts the chain built so far
    (memo 0) into it, then BINPUT 0 stores the new tuple. C ends with a tuple
    ``levels`` deep, the scan with one of depth 2; it is hashed as a dict key.
    """
    setup = b")\x940" + b"K\x01\x940" * 10          # memo 0: (), memo 1..10: 1
    level = frame(b"g1") + b"0\n\x85q\x000"
    return (b"\x80\x04" + setup + level * levels + GLOB_MD + b")\x81}("
            + su("state_dict_metadata") + b"}" + su("planner_data") + b"}h\x00Ns" + b"ub.")


def tuple_dag(levels: int, width: int) -> bytes:
    """Ops pushing a tuple DAG: level k+1 holds ``width`` references to level k (memo k).

    A few hundred bytes; hashing the top visits width**levels leaves.
    """
    ops = b"K\x01\x85\x940"
    for k in range(levels):
        ops += b"(" + (b"h" + bytes([k])) * width + b"t\x940"
    return ops + b"h" + bytes([levels])


def path_bomb(levels: int, width: int = 4) -> bytes:
    """PurePosixPath(p, p, ..., p) nested: each level multiplies the parts by ``width``."""
    ops = GLOB_PATH + b"\x940"                                  # memo 0: the class
    ops += b"h\x00" + su("a") + b"\x85R\x940"                   # memo 1: path 'a'
    for k in range(levels):
        ops += b"h\x00(" + (b"h" + bytes([k + 1])) * width + b"tR\x940"
    return md_with(planner_data=ops + b"h" + bytes([levels + 1]))


def path_repeat(parts: int, reps: int) -> bytes:
    """PurePosixPath(s, s, ..., s) with s = 'a/' * parts: reps * parts path parts."""
    s = "a/" * parts
    sb = s.encode()
    ops = GLOB_PATH + b"X" + struct.pack("<I", len(sb)) + sb + b"\x940("
    ops += b"h\x00" * reps + b"tR"
    return md_with(planner_data=ops)


def colliding_int_keys(n: int) -> bytes:
    """planner_data = {1: None, 1 + M61: None, 1 + 2*M61: None, ...}: one hash, n keys."""
    return md_with(planner_data=b"}(" + b"".join(long1(1 + i * M61) + b"N" for i in range(n)) + b"u")


def colliding_index_keys(n: int, dims: int = 8) -> bytes:
    """Well-formed metadata: storage_data has n MetadataIndex keys with one hash.

    Offsets are valid (ints in [0, 2**63)); each dimension is 5 + j*M61 for
    j in 0..3, so hash(offset) is the same for all 4**dims of them.
    """
    out = [b"\x80\x04" + GLOB_MD + b")\x81}(" + su("state_dict_metadata") + b"}"
           + su("storage_data") + b"}("]
    for i in range(n):
        offs = b"(" + b"".join(long1(5 + ((i >> (2 * d)) & 3) * M61) for d in range(dims)) + b"t"
        if i == 0:
            out.append(GLOB_INDEX + b"\x94)\x81}(" + su("fqn") + b"\x94" + su("w") + b"\x94"
                       + su("offset") + b"\x94" + offs + b"ubN")
        else:
            out.append(b"h\x00)\x81}(h\x01h\x02h\x03" + offs + b"ubN")
    out.append(b"uub.")
    return b"".join(out)


def rehash_big_tuple(size: int, reps: int) -> bytes:
    """planner_data = {T: None}, set ``reps`` times; T a flat tuple of ``size`` ints."""
    t = b"(" + b"K\x07" * size + b"t\x94"
    return md_with(planner_data=b"}" + t + b"Ns" + b"h\x00Ns" * reps)


def index_chain(n: int, cyclic: bool = False) -> bytes:
    """storage_data = {I0: None} with I_k.offset = I_{k+1} (or I0.offset = I0)."""
    out = [b"\x80\x04" + GLOB_INDEX + b"\x94" + su("fqn") + b"\x94" + su("offset") + b"\x94"
           + su("w") + b"\x940000"]          # memo 0 class, 1 'fqn', 2 'offset', 3 'w'
    out.append(b"h\x00)\x81\x940")            # memo 4: I0
    if cyclic:
        out.append(b"h\x04}(h\x01h\x03h\x02h\x04ub0")
    else:
        for k in range(n):
            out.append(b"h\x00)\x81\x940")    # memo 5+k: I_{k+1}
            out.append(lget(4 + k) + b"}(h\x01h\x03h\x02" + lget(5 + k) + b"ub0")
        out.append(lget(4 + n) + b"}(h\x01h\x03ub0")
    out.append(GLOB_MD + b")\x81}(" + su("state_dict_metadata") + b"}" + su("storage_data")
               + b"}h\x04Nsub.")
    return b"".join(out)


def deep_list_by_mutation(n: int) -> bytes:
    """planner_data = [[[...]]] n deep, built as n empty lists then L[k].append(L[k+1]).

    Every APPEND puts a list of depth 1 into another, so the scan's depths stay
    at 2 while the real nesting is n.
    """
    ops = b"]\x940" * n
    for k in range(n - 1):
        ops += lget(k) + lget(k + 1) + b"a0"
    return md_with(planner_data=ops + lget(0))


# --------------------------------------------------------------------------
# A child process for payloads that crash, hang or allocate.
# --------------------------------------------------------------------------

_CHILD = r"""
import resource, sys
from ckcore.checkpoint import CheckpointError, loads_metadata
data = open(sys.argv[1], "rb").read()
extra_mb = int(sys.argv[2])
if extra_mb:
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    lim = vm + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
def hwm():
    # VmHWM (kB), not ru_maxrss: Linux keeps ru_maxrss across exec, so it
    # would start at the size of the pytest process this child came from.
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))
rss0 = hwm()
try:
    md = loads_metadata(data)
    outcome = "loaded"
    repr(md)
except CheckpointError as e:
    outcome = "refused:" + type(e).__name__
except BaseException as e:
    outcome = "LEAKED:" + type(e).__name__
rss1 = hwm()
print(outcome, (rss1 - rss0) // 1024)
"""


def run_child(tmp_path: Path, data: bytes, *, extra_mb: int = 0, timeout: float = 30):
    """(outcome, peak RSS growth in MB) of loads_metadata(data) in a child process."""
    f = tmp_path / "payload.metadata"
    f.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(f), str(extra_mb)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              check=False, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a {len(data)}-byte stream did not finish within {timeout} s")
    assert proc.returncode == 0, (
        f"child died (returncode {proc.returncode}) on a {len(data)}-byte stream: "
        f"{proc.stderr[-2000:]}")
    outcome, rss_mb = proc.stdout.split()
    return outcome, int(rss_mb)


def assert_refused_in_child(tmp_path, data, **kw):
    outcome, _ = run_child(tmp_path, data, **kw)
    assert outcome.startswith("refused:"), outcome


# ==========================================================================
# Part 1: holes found in review, each closed.
# ==========================================================================

# --- 1a. Frame desync: the C unpickler runs bytes the scan took for data. --


def test_hole_frame_straddle_runs_opcodes_the_scan_never_saw():
    # Hidden: a *different* well-formed Metadata, with an item the scan never modelled.
    hidden = (b"0" + GLOB_MD + b")\x81}(" + su("state_dict_metadata") + b"}" + su("hidden")
              + GLOB_BYTES_MD + b")\x81}bsub.")
    data = desync_straddle(hidden)
    assert loads_metadata(VALID).state_dict_metadata == {}
    with pytest.raises(CheckpointError):
        md = loads_metadata(data)
        pytest.fail(f"the unpickler built {md.state_dict_metadata} from bytes the scan read as data")


def test_hole_frame_straddle_is_refused_by_the_scan():
    assert scan(desync_straddle(b"J\xd2\x04\x00\x00.")) is not None


def test_hole_nested_frame_is_refused_by_the_scan():
    data = desync_nested_frame(b"J\xd2\x04\x00\x00.")
    assert scan(data) is not None
    with pytest.raises(CheckpointError, match="opcode|frame|FRAME"):
        loads_metadata(data)


def test_hole_frame_straddle_segfault(tmp_path):
    # Hidden: hash a tuple nested 300,000 deep (dict key): tuplehash recursion
    # overflows the C stack. 330 kB, scanned in full before unpickling.
    hidden = b"0})" + b"\x85" * 300_000 + b"Ns."
    assert_refused_in_child(tmp_path, desync_straddle(hidden))


def test_hole_text_line_straddle_segfault(tmp_path):
    # No hidden bytes at all: a GET's text line that crosses a frame end makes
    # C fetch a different memo entry than the scan modelled; 250k of them build
    # a 250k-deep tuple that the scan believes is 2 deep (4 MB: gated pipeline).
    assert_refused_in_child(tmp_path, text_get_chain(250_000))


def test_hole_text_line_straddle_is_refused_by_the_scan():
    # C would build ((((),),),) where the scan modelled ((1,),): refused.
    data = text_get_chain(2)
    assert scan(data) is not None
    with pytest.raises(UnsafeCheckpointError, match="frame"):
        loads_metadata(data)


def test_hole_hidden_build_mutates_a_class_past_the_tripwire(tmp_path):
    # Hidden: BUILD on the Metadata *class* with slot state {"__qualname__": ...}:
    # setattr on the class. __qualname__ is not in vars(cls), so _restore sees
    # nothing; the load succeeds and every later pickle.dumps(Metadata(...)) fails.
    hidden = (b"0" + GLOB_MD + b"N}" + su("__qualname__") + su("StorageMeta") + b"s\x86b0"
              + VALID_TAIL)
    code = f"""
import pickle
from ckcore.checkpoint import CheckpointError, loads_metadata
from ckcore.metadata import Metadata
try:
    loads_metadata({desync_straddle(hidden)!r})
except CheckpointError:
    pass
assert Metadata.__qualname__ == "Metadata", Metadata.__qualname__
pickle.dumps(Metadata(state_dict_metadata={{}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- 1b. Unbounded time or memory from small, scan-accepted streams. ------


def test_hole_tuple_dag_hash_is_exponential(tmp_path):
    # 300 bytes; hashing the dict key visits 4**20 = 10**12 leaves (days).
    data = md_with(planner_data=b"}" + tuple_dag(20, 4) + b"Ns")
    assert len(data) < 400
    run_child(tmp_path, data)  # must finish (refused or loaded) within 30 s


def test_hole_path_args_are_exponential(tmp_path):
    # 350 bytes: PurePosixPath(p, p, p, p) nested 16 levels = 4**16 parts.
    data = path_bomb(16)
    outcome, rss_mb = run_child(tmp_path, data, extra_mb=800)
    assert rss_mb < 256, f"{len(data)} bytes took {rss_mb} MB ({outcome})"


def test_hole_path_args_are_quadratic(tmp_path):
    # 1 MB: one 400 kB str of 200k parts, passed 300k times to one PurePosixPath.
    data = path_repeat(200_000, 300_000)
    outcome, rss_mb = run_child(tmp_path, data, extra_mb=800)
    assert rss_mb < 256, f"{len(data)} bytes took {rss_mb} MB ({outcome})"


def test_hole_colliding_int_keys_are_quadratic(tmp_path):
    # 1.5 MB, 120k int keys of one hash: ~100 s of dict probing (O(n**2)).
    run_child(tmp_path, colliding_int_keys(120_000))


def test_hole_colliding_metadata_index_keys_are_quadratic(tmp_path):
    # 1.4 MB of *well-formed* metadata (passes _check_metadata): 20k storage_data
    # keys whose offsets are valid and hash alike; each insert compares with
    # every earlier key through the dataclass __eq__ (~60 s).
    run_child(tmp_path, colliding_index_keys(20_000))


def test_hole_repeated_hash_of_a_big_tuple_is_quadratic(tmp_path):
    # 1.4 MB: one 600k-item tuple set as a dict key 60k times (tuple hashes are
    # not cached): 3.6e10 item hashes.
    run_child(tmp_path, rehash_big_tuple(600_000, 60_000))


def test_hole_scan_memory_is_many_times_the_file(tmp_path):
    # 24 MB of NONE, POP: the scan keeps a 24-byte value record per NONE for the
    # whole run (~300-400 MB); the unpickler itself needs nothing.
    data = b"\x80\x04" + b"N0" * (12 << 20) + b"."
    outcome, rss_mb = run_child(tmp_path, data)
    assert outcome.startswith("refused:"), outcome
    assert rss_mb < 4 * 24, f"24 MB stream: {rss_mb} MB peak growth"


def test_hole_gated_pipeline_costs_a_python_call_per_opcode(tmp_path):
    # Above 1 MiB the unpickler reads through _Gated (no peek(), no frames in
    # torch's protocol-2 files): one Python-level read() per opcode, ~0.6 us
    # each. 96 MB of MARK, POP (which the scan keeps no record of) takes ~60 s
    # (1 GiB, the default cap: ~12 min); through io.BytesIO: ~2 s.
    data = b"\x80\x04" + b"(0" * (48 << 20) + b"."
    outcome, _ = run_child(tmp_path, data, timeout=30)
    assert outcome.startswith("refused:"), outcome


def test_hole_scan_out_of_memory_leaks_memory_error(tmp_path):
    # 24 MB of EMPTY_TUPLE, POP under a 200 MB address-space allowance: the
    # scan's value table (24 B per value, doubled) fails and result() raises
    # MemoryError, which load_metadata lets out (the scan thread also prints
    # a traceback on stderr).
    data = b"\x80\x04" + b")0" * (12 << 20) + b"."
    outcome, _ = run_child(tmp_path, data, extra_mb=200)
    assert outcome.startswith("refused:"), outcome


# --- 1c. What load_metadata returns or raises. ----------------------------


def test_hole_storage_meta_without_modules_is_returned_broken():
    # StorageMeta built with {}: "modules" (default_factory) has no class
    # default, so the returned object raises AttributeError on .modules and repr.
    data = md_with(storage_meta=GLOB_STORAGE_META + b")\x81}b")
    try:
        md = loads_metadata(data)
    except CheckpointError:
        return
    assert md.storage_meta.modules == []
    repr(md)


def test_hole_planner_data_with_unbuilt_instance_is_returned():
    # planner_data is never checked: an instance NEWOBJ made without BUILD
    # comes back, and repr(md) raises AttributeError.
    data = md_with(planner_data=GLOB_CHUNK + b")\x81")
    try:
        md = loads_metadata(data)
    except CheckpointError:
        return
    repr(md)


def test_hole_nesting_grows_past_max_depth_by_mutation():
    # The scan's depth of a container is fixed when it goes into another one;
    # appending to it later deepens the outer one unseen. 1,000 > MAX_DEPTH.
    data = deep_list_by_mutation(1000)
    try:
        md = loads_metadata(data)
    except CheckpointError:
        return
    depth, x = 0, md.planner_data
    while type(x) is list and x:
        depth, x = depth + 1, x[0]
    assert depth <= MAX_DEPTH, f"planner_data nests {depth} deep"


def test_hole_metadata_index_hint_may_be_any_int(tmp_path):
    # first_bad_index accepts any exact int as MetadataIndex.index: 10**5000
    # passes, then repr(md) and Checkpoint.problems() raise ValueError (int
    # to str past sys.int_info.default_max_str_digits).
    big = 10 ** 5000
    b = big.to_bytes((big.bit_length() + 8) // 8, "little", signed=True)
    key = (GLOB_INDEX + b")\x81}(" + su("fqn") + su("zzz") + su("index")
           + b"\x8b" + struct.pack("<i", len(b)) + b + b"ub")
    (tmp_path / ".metadata").write_bytes(md_with(storage_data=b"}" + key + b"Ns"))
    try:
        ck = ckcore.checkpoint.Checkpoint(tmp_path)
    except CheckpointError:
        return
    repr(ck.metadata)
    assert ck.problems()


def test_hole_max_bytes_is_allocated_up_front(tmp_path):
    # _read_file reads f.read(cap + 1): BufferedReader allocates cap + 1 bytes
    # first, so a 100-byte file with max_bytes=1 TiB raises MemoryError.
    p = tmp_path / ".metadata"
    p.write_bytes(VALID)
    md = ckcore.checkpoint.load_metadata(p, max_bytes=1 << 40)
    assert type(md) is Metadata


def test_hole_memoryview_cap_counts_elements_not_bytes():
    # len() of a 2-d memoryview is its first dimension: the cap is not applied.
    big = VALID + b"\0" * 10_000
    mv = memoryview(big).cast("B", (1, len(big)))
    with pytest.raises(CheckpointError, match="larger than the cap"):
        loads_metadata(mv, max_bytes=1000)


# ==========================================================================
# Part 2: attacks refused (or harmless) from the start.
# ==========================================================================


def _unsafe(data: bytes):
    with pytest.raises(UnsafeCheckpointError):
        loads_metadata(data)


def _damaged(data: bytes):
    with pytest.raises(CheckpointError) as ei:
        loads_metadata(data)
    return ei.value


# --- BUILD --------------------------------------------------------------


@pytest.mark.parametrize("target", [
    GLOB_MD,                                       # a metadata class
    GLOB_PATH,                                     # a _Callable stand-in
    glob(b"builtins", b"tuple"),                   # a builtin type
    glob(b"torch", b"bfloat16"),                   # a constant
    b"]", b"}", b"\x8f", b")",                      # containers
    glob(b"collections", b"OrderedDict") + b")R",  # OrderedDict instance (has a __dict__)
])
def test_refused_build_on_non_instances(target):
    _unsafe(b"\x80\x04" + target + b"}" + su("x") + b"Nsb0" + VALID_TAIL)


def test_refused_build_with_slot_state_or_twice():
    slot = b"N}" + su("x") + b"Ns\x86"
    _unsafe(b"\x80\x04" + GLOB_MD + b")\x81" + slot + b"b.")
    _unsafe(b"\x80\x04" + GLOB_MD + b")\x81}" + su("state_dict_metadata") + b"}sb}b.")
    _unsafe(b"\x80\x04" + GLOB_TPROPS + b")\x81}b0" + VALID_TAIL)          # dict state
    _unsafe(b"\x80\x04" + GLOB_TPROPS + b")\x81(NNNNt" + b"b0" + VALID_TAIL)  # 4-tuple


def test_refused_metadata_index_state_deeper_than_two():
    state = b"}" + su("fqn") + su("w") + b"s" + su("offset") + b"K\x01\x85\x85s"
    _damaged(b"\x80\x04" + GLOB_INDEX + b")\x81" + state + b"b0" + VALID_TAIL)


# --- calls ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [
    GLOB_MD + b"K\x01\x85\x81",                                        # NEWOBJ with args
    GLOB_MD + b")}" + su("x") + b"Ns\x92",                             # NEWOBJ_EX kwargs
    GLOB_PATH + b")\x81",                                              # NEWOBJ of a path
    GLOB_MD + b")R",                                                   # REDUCE of a class
    glob(b"torch", b"bfloat16") + b")R",                               # REDUCE of a constant
    glob(b"builtins", b"tuple") + su("ab") + b"\x85R",                 # tuple(str)
    glob(b"builtins", b"set") + b"}\x85R",                             # set(dict)
    glob(b"builtins", b"complex") + b"]\x85R",                         # complex(list)
    glob(b"torch.serialization", b"_get_layout") + b"K\x01\x85R",      # layout(int)
    glob(b"collections", b"OrderedDict") + b"))\x86R",                 # two args
])
def test_refused_calls(stream):
    _unsafe(b"\x80\x04" + stream + b"0" + VALID_TAIL)


@pytest.mark.parametrize("stream", [
    glob(b"builtins", b"set") + b"]]a\x85R",                       # set of unhashables
    glob(b"builtins", b"dict") + b"]K\x01a\x85R",                  # dict(list of non-pairs)
    glob(b"builtins", b"complex") + su("1+") + b"\x85R",           # complex('1+')
    glob(b"builtins", b"complex") + su("1") + su("2") + b"\x86R",  # complex(str, str)
    glob(b"torch.serialization", b"_get_layout") + su("torch.evil") + b"\x85R",
    glob(MD_MOD, b"_MEM_FORMAT_ENCODING") + b"K\x09\x85R",
    glob(b"torch.serialization", b"_get_layout") + su("torch.strided") + b"\x85\x81",  # NEWOBJ
])
def test_refused_bad_arguments_are_checkpoint_errors(stream):
    _damaged(b"\x80\x04" + stream + b"0" + VALID_TAIL)


# --- opcodes and the memo -------------------------------------------------


@pytest.mark.parametrize("op", [
    b"(i" + b"builtins\ntuple\n",           # INST
    GLOB_MD + b"o",                         # OBJ (after a MARK below)
    b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00",   # EXT1/2/4
    su("x") + b"Q",                         # BINPERSID
    b"Px\n",                                # PERSID
    b"\x96" + struct.pack("<Q", 1) + b"x",  # BYTEARRAY8
    b"\x97", b"\x98",                       # NEXT_BUFFER, READONLY_BUFFER
])
def test_refused_forbidden_opcodes(op):
    _unsafe(b"\x80\x05(" + op + b"." + VALID_TAIL)


@pytest.mark.parametrize("stream", [
    b"N" + b"r" + struct.pack("<I", 0xFFFFFFFF),   # sparse LONG_BINPUT (C: a 32 GB memo)
    b"Np100\n",                                    # sparse text PUT
    b"h\x00",                                      # GET before PUT
    b"Np 0\n",                                     # text PUT that C would parse, the scan not
])
def test_refused_memo_misuse(stream):
    _damaged(b"\x80\x04" + stream + b"0" + VALID_TAIL)


@pytest.mark.parametrize("stream", [
    VALID[:-1] + b"N.",                  # a value left under the result
    b"\x80\x04(" + VALID_TAIL,           # a MARK left open
    b"\x80\x04" + GLOB_MD + b")\x81.",   # result never BUILT
    b"\x80\x06" + VALID_TAIL,            # protocol 6
    b"\x80\x04" + GLOB_MD + b")\x810)." ,  # result is a tuple
    b"\x80\x04(0" + VALID_TAIL[:-1] + b"0.",   # POP of a MARK, then underflow
    b"\x80\x04]" + b"(e" + b"0" + b"\x80\x04)(e" + VALID_TAIL,  # APPENDS to a tuple
])
def test_refused_damaged_streams(stream):
    _damaged(stream)


def test_refused_stack_global_of_escaped_text():
    # STRING/UNICODE contents are not modelled, so they never name a global,
    # even when they would decode to an allowed one.
    for mod in (b"S'builtins'\n", b"Vbuiltins\n"):
        _unsafe(b"\x80\x04" + mod + su("tuple") + b"\x930" + VALID_TAIL)
    _unsafe(b"\x80\x04K\x01K\x02\x930" + VALID_TAIL)


def test_refused_globals_outside_the_table():
    for mod, name in [(b"builtins", b"eval"), (b"os", b"system"), (b"torch", b"load"),
                      (b"builtins", b"getattr"), (b"copyreg", b"_reconstructor"),
                      (b"builtins", b"bytearray"), (b"pathlib", b"Path")]:
        _unsafe(b"\x80\x04" + glob(mod, name) + b"0" + VALID_TAIL)
        _unsafe(b"\x80\x04" + su(mod.decode()) + su(name.decode()) + b"\x930" + VALID_TAIL)


# --- depth, cycles, recursion ---------------------------------------------


def test_refused_deep_tuple(tmp_path):
    assert_refused_in_child(tmp_path, md_with(planner_data=b"})" + b"\x85" * 300_000 + b"Ns"))


@pytest.mark.parametrize("ops", [b"(" * 500 + b"\x91" * 500,    # frozensets
                                 b"(" * 500 + b"l" * 500,       # lists
                                 b"(" * 500 + b"t" * 500,       # tuples
                                 b"(K\x01" * 300 + b"N" + b"d" * 300])      # dicts
def test_refused_deep_containers(tmp_path, ops):
    assert_refused_in_child(tmp_path, md_with(planner_data=ops))


def test_refused_metadata_index_cycle_and_long_chain(tmp_path):
    # A MetadataIndex inside another's state is refused by the scan now.
    with pytest.raises(CheckpointError):
        loads_metadata(index_chain(0, cyclic=True))
    assert_refused_in_child(tmp_path, index_chain(50_000))


def test_refused_cyclic_planner_data():
    # md.planner_data = md: planner_data holds only plain values, so it is refused.
    data = (b"\x80\x04" + GLOB_MD + b")\x81\x94}(" + su("state_dict_metadata") + b"}"
            + su("planner_data") + b"h\x00ub.")
    with pytest.raises(CheckpointError):
        loads_metadata(data)


def test_harmless_deep_list_by_mutation_does_not_crash(tmp_path):
    # (Part 1 asserts the depth limit; here only that nothing crashes on 3.11:
    # list/dict dealloc use the trashcan and repr/== raise RecursionError.)
    f = tmp_path / "deep.metadata"
    f.write_bytes(deep_list_by_mutation(200_000))
    code = f"""
from ckcore.checkpoint import CheckpointError, loads_metadata
data = open({str(f)!r}, "rb").read()
try:
    md = loads_metadata(data)
except CheckpointError:
    raise SystemExit(0)
for g in (repr, lambda m: m == loads_metadata(data)):
    try:
        g(md)
    except RecursionError:
        pass
del md
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- text opcodes ---------------------------------------------------------


@pytest.mark.parametrize("field", [
    b"I" + b"1" * (4 << 20) + b"\n",      # INT past int_max_str_digits: refused fast
    b"L" + b"1" * (4 << 20) + b"L\n",
    b"F" + b"1" * (4 << 20) + b"\n",      # FLOAT overflow
])
def test_refused_long_text_numbers_fast(field):
    _damaged(md_with(planner_data=field))


def test_refused_long_hex_text_and_harmless_float_text():
    # Text ints are only what picklers write ([-]digits[L]): hex is refused.
    with pytest.raises(CheckpointError, match="invalid opcode"):
        loads_metadata(md_with(planner_data=b"L0x" + b"f" * (1 << 20) + b"L\n"))
    assert loads_metadata(md_with(planner_data=b"F0." + b"1" * (1 << 20) + b"\n")).planner_data


def test_refused_text_int_forms_the_c_unpickler_reads_as_bools():
    # "I 1\n", "I+1\n", "I-0\n" are bools for C's load_int (len 3, strtol 0 or 1):
    # the scan takes only [-]digits, so they are refused before C sees them.
    for text in (b"I 1\n", b"I+1\n", b"I\t1\n"):
        with pytest.raises(CheckpointError, match="invalid opcode"):
            loads_metadata(md_with(planner_data=text))
    # "-0" is a digit form, and the scan models it as C reads it: a bool.
    assert loads_metadata(md_with(planner_data=b"I-0\n")).planner_data is False
    chunk = GLOB_CHUNK + b")\x81}(" + su("offsets") + b"I 1\n\x85" + su("sizes") + b"K\x01\x85ub"
    tsm = (glob(MD_MOD, b"TensorStorageMetadata") + b")\x81}(" + su("properties") + GLOB_TPROPS
           + b")\x81(" + glob(b"torch", b"float32") + glob(b"torch", b"strided") + b"\x89"
           + glob(b"torch", b"contiguous_format") + b"\x89tb" + su("size") + b"K\x02\x85"
           + su("chunks") + b"]" + chunk + b"aub")
    with pytest.raises(CheckpointError, match="invalid opcode"):
        loads_metadata(md_with(state_dict_metadata=b"}" + su("w") + tsm + b"s"))


# --- pipeline and globals -------------------------------------------------


def test_harmless_many_stack_global_lookups_in_the_gated_pipeline(tmp_path):
    # 200k valid STACK_GLOBALs (1.2 MB, scan thread takes the GIL per lookup).
    ops = su("builtins") + b"\x94" + su("tuple") + b"\x9400" + b"h\x00h\x01\x930" * 200_000
    outcome, _ = run_child(tmp_path, md_with(planner_data=ops + b"N"), timeout=30)
    assert outcome == "loaded"


def test_refused_hostile_global_after_the_pipeline_threshold():
    pad = b"N0" * (1 << 20)
    _unsafe(b"\x80\x04" + pad + glob(b"os", b"system") + su("echo hi") + b"\x85R0" + VALID_TAIL)
    _damaged(b"\x80\x04" + pad + b"X" + struct.pack("<I", 1 << 30))   # truncated


def test_refused_trailing_bytes_after_stop_are_not_run():
    # Without a desync the unpickler stops at STOP: bytes after it are inert.
    md = loads_metadata(VALID + glob(b"os", b"system") + b"N\x85R.")
    assert md.state_dict_metadata == {}


def test_refused_pickle_module_streams_of_arbitrary_objects():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for proto in range(6):
        _unsafe(pickle.dumps(Evil(), protocol=proto))
