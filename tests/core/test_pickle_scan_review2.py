"""Second security review of the safe ``.metadata`` reader (torch-free).

``test_hole_*`` tests assert the SAFE outcome of an attack that works on the
reviewed code, so they fail until it is fixed. ``test_refused_*`` and
``test_harmless_*`` pin attacks the current code already stops, and
torch-style streams it must keep accepting. Payloads that hang are run in a
subprocess with a timeout; the test asserts the child exits 0 in time.
"""

from __future__ import annotations

import io
import pickletools
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ckcore._kernels import _pickle_scan
from ckcore.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    _global_kind,
    loads_metadata,
)
from ckcore.metadata import BytesStorageMetadata, MetadataIndex
from tests.support.paths import CKCORE_PARENT
from tests.support.streams import _TorchStylePickler, sample_metadata, torchify

# Where the ckcore under test lives (the installed wheel in CI, not the checkout).
_ROOT = CKCORE_PARENT
_MD = b"torch.distributed.checkpoint.metadata"


def _run(tmp_path: Path, data: bytes, body: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``body`` in a child with ``data`` (the payload) bound; it must exit 0 within ``timeout``."""
    payload = tmp_path / "payload.metadata"
    payload.write_bytes(data)
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(_ROOT)!r})\n"
        "from ckcore.checkpoint import CheckpointError, loads_metadata\n"
        f"data = open({str(payload)!r}, 'rb').read()\n" + body
    )
    try:
        return subprocess.run([sys.executable, "-c", script], check=False,
                              capture_output=True,
                              timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the payload ({len(data)} bytes) kept the reader busy over {timeout} s")


def _ustr(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


# --------------------------------------------------------------------------
# Hole 1: MetadataIndex with a non-str fqn hashes as hash((fqn, offset)),
# unkeyed: storage_data keys with chosen colliding offsets are quadratic.
# --------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _colliding_pairs(n: int, target: int = 0x1234567) -> list[tuple[int, int]]:
    """``n`` int64 pairs whose tuple hashes are all equal (CPython's xxHash-based tuplehash)."""
    ip1, ip2 = pow(_P1, -1, 1 << 64), pow(_P2, -1, 1 << 64)
    x = target * ip1 & _M64
    x = ((x >> 31) | (x << 33)) & _M64          # rotr 31
    mod = (1 << 61) - 1
    out, a = [], 1
    while len(out) < n:
        a += 1
        acc1 = _rotl((_P5 + a * _P2) & _M64, 31) * _P1 & _M64
        lane = (x - acc1) * ip2 & _M64
        if lane < mod:
            out.append((a, lane))
        elif -mod < lane - (1 << 64) < -2:
            out.append((a, lane - (1 << 64)))
    return out


def _index_collision_stream(pairs: list[tuple[int, int]], fqn_op: bytes = b"K\x00") -> bytes:
    """Metadata whose storage_data keys are MetadataIndex(fqn=<fqn_op>, offset=pair)."""
    o = [b"\x80\x02c" + _MD + b"\nMetadata\n)\x81}("
         + _ustr("state_dict_metadata") + b"}" + _ustr("storage_data") + b"}("]
    for i, (a, b) in enumerate(pairs):
        if i == 0:
            o.append(b"c" + _MD + b"\nMetadataIndex\nq\x00)\x81}(" + _ustr("fqn") + b"q\x01"
                     + fqn_op + _ustr("offset") + b"q\x02")
        else:
            o.append(b"h\x00)\x81}(h\x01" + fqn_op + b"h\x02")
        o.append(b"J" + struct.pack("<i", a) + b"\x8a\x08" + b.to_bytes(8, "little", signed=True)
                 + b"\x86ubN")
    o.append(b"uub.")
    return b"".join(o)


def test_hole_metadata_index_with_int_fqn_collides_quadratically(tmp_path):
    # 12,000 keys (~370 KB) take ~13 s to unpickle today (4x per doubling);
    # keyed, they take milliseconds. The scan lets any of str/int/None/tuple/
    # global into any MetadataIndex field, and __hash__ falls back to
    # hash((fqn, offset)) when fqn is not a str.
    data = _index_collision_stream(_colliding_pairs(12_000))
    r = _run(tmp_path, data, (
        "try:\n    loads_metadata(data)\nexcept CheckpointError:\n    pass\n"), timeout=6)
    assert r.returncode == 0, r.stderr


def test_hole_metadata_index_with_global_fqn_collides_quadratically(tmp_path):
    # The same with fqn = the class torch.Size (-> tuple): hash((tuple, offset)).
    data = _index_collision_stream(_colliding_pairs(12_000), fqn_op=b"ctorch\nSize\n")
    r = _run(tmp_path, data, (
        "try:\n    loads_metadata(data)\nexcept CheckpointError:\n    pass\n"), timeout=6)
    assert r.returncode == 0, r.stderr


def test_hole_metadata_index_non_str_fqn_is_refused():
    # A MetadataIndex whose fqn is not a str is hashed keyed all the same
    # (through its repr), so its colliding offsets cost nothing; the
    # structure check then refuses the key.
    data = _index_collision_stream(_colliding_pairs(2))
    with pytest.raises(CheckpointError, match="not a valid MetadataIndex"):
        loads_metadata(data)


def test_harmless_metadata_index_str_fqn_collisions_are_keyed(tmp_path):
    # With a str fqn the keyed hash applies: the same offsets are cheap.
    data = _index_collision_stream(_colliding_pairs(12_000), fqn_op=_ustr("w"))
    # (The keys are refused afterwards: their offsets are negative.)
    r = _run(tmp_path, data, (
        "try:\n    loads_metadata(data)\nexcept CheckpointError:\n    pass\n"), timeout=6)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------
# Hole 2: planner_data / storage_data values may be DAGs of shared tuples or
# lists. _check_planner_data visits each object once (fine), but every
# tree walk of the result is exponential: ckcore.dcp.convert.to_torch
# (RangeFileSystemReader.read_metadata), Metadata.__eq__, repr, ...
# --------------------------------------------------------------------------


def _dag(depth: int, kind: type = tuple) -> object:
    x: object = kind()
    for _ in range(depth):
        x = kind([x, x])
    return x


def _with(field: str, value: object) -> bytes:
    md = sample_metadata()
    if field == "planner_data":
        md.planner_data = {"x": value}
    else:
        md.storage_data[MetadataIndex("extra")] = value
        md.state_dict_metadata["extra"] = BytesStorageMetadata()
    return torchify(md, protocol=4)


_WALK = (
    "try:\n"
    "    a = loads_metadata(data)\n"
    "    b = loads_metadata(data)\n"
    "except CheckpointError:\n"
    "    sys.exit(0)\n"
    "assert a == b\n"          # any walk of the tree: to_torch, ==, repr
)


@pytest.mark.parametrize("kind", [tuple, list])
def test_hole_planner_data_dag_is_exponential_for_every_reader(tmp_path, kind):
    # 1.5 KB: 2**60 leaves. to_torch() (RangeFileSystemReader.read_metadata)
    # hangs the same way as == does here.
    data = _with("planner_data", _dag(60, kind))
    assert len(data) < 4096
    r = _run(tmp_path, data, _WALK, timeout=15)
    assert r.returncode == 0, r.stderr


def test_hole_storage_data_value_dag_is_exponential_for_every_reader(tmp_path):
    # storage_data values that are not StorageInfo are not checked at all.
    data = _with("storage_data", _dag(60))
    r = _run(tmp_path, data, _WALK, timeout=15)
    assert r.returncode == 0, r.stderr


def test_hole_storage_data_value_may_be_an_unchecked_metadata_instance():
    # A ChunkStorageMetadata (or Metadata, TensorProperties, ...) as a storage
    # value escapes every field check: here its instance dict carries
    # __reduce_ex__ = builtins.tuple, which copy/pickle of the result call.
    evil = (b"c" + _MD + b"\nChunkStorageMetadata\n)\x81}" + _ustr("__reduce_ex__")
            + b"cbuiltins\ntuple\nsb")
    data = (b"\x80\x02c" + _MD + b"\nMetadata\n)\x81}(" + _ustr("state_dict_metadata") + b"}"
            + _ustr("storage_data") + b"}(" + b"c" + _MD + b"\nMetadataIndex\n)\x81}"
            + _ustr("fqn") + _ustr("extra") + b"sb" + evil + b"uub.")
    with pytest.raises(CheckpointError):
        loads_metadata(data)


# --------------------------------------------------------------------------
# Refused / harmless: the frame rule, the gated pipeline, concurrency,
# and torch-style streams that must keep loading.
# --------------------------------------------------------------------------


def _kinds_lookup(module: bytes, name: bytes) -> int:
    # ckcore's own class names (what _TorchStylePickler writes before renaming).
    if module in (b"ckcore.metadata", b"ckcore.checkpoint"):
        return _pickle_scan.GLOBAL_KINDS.get(name.decode(), 0)
    return _global_kind(module, name)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_harmless_torch_style_streams_with_frames_and_big_strs_are_accepted(protocol):
    # Real pickler output, frames kept (protocol >= 4), with a 100 KB str
    # (written outside any frame) and > 256 memo entries (LONG_BINPUT).
    md = sample_metadata(3000)
    big = "w" * 100_000
    md.state_dict_metadata[big] = BytesStorageMetadata()
    md.planner_data[big] = (big, 7)
    buf = io.BytesIO()
    _TorchStylePickler(buf, protocol=protocol).dump(md)
    data = buf.getvalue()
    if protocol >= 4:
        assert b"\x95" in data[:16]
    assert _pickle_scan.scan(data, _kinds_lookup, 100) is None


def _framed(body: bytes, cut: int) -> bytes:
    # PROTO 4, then ``body`` split into two frames at ``cut``.
    a, b = body[:cut], body[cut:]
    return (b"\x80\x04\x95" + struct.pack("<Q", len(a)) + a
            + b"\x95" + struct.pack("<Q", len(b)) + b)


def _small_body() -> bytes:
    return torchify(sample_metadata(1), protocol=4)[2:]


def test_harmless_zero_length_frame_and_frame_ending_at_stop():
    body = _small_body()
    q = struct.pack
    # FRAME(0), then one frame whose last byte is STOP.
    data = b"\x80\x04\x95" + q("<Q", 0) + b"\x95" + q("<Q", len(body)) + body
    assert loads_metadata(data) == sample_metadata(1)
    # FRAME(0), then every opcode outside any frame.
    assert loads_metadata(b"\x80\x04\x95" + q("<Q", 0) + body) == sample_metadata(1)
    # A frame ending before STOP, which runs unframed.
    assert loads_metadata(b"\x80\x04\x95" + q("<Q", len(body) - 1) + body) == sample_metadata(1)


def test_refused_frame_boundary_inside_an_opcode_argument():
    body = _small_body()
    # Cut inside the first BINUNICODE/SHORT_BINUNICODE argument after the globals.
    i = body.index(b"state_dict_metadata") + 3
    with pytest.raises(CheckpointError, match="frame"):
        loads_metadata(_framed(body, i))


def test_refused_frame_straddle_in_the_gated_pipeline():
    # Over 1 MiB: the unpickler runs behind the scan through _Gated.peek.
    md = sample_metadata(6000)
    body = torchify(md, protocol=4)[2:]
    assert len(body) > (1 << 20)
    i = body.index(b"layer5999.weight") + 4
    with pytest.raises(CheckpointError, match="frame"):
        loads_metadata(_framed(body, i))
    assert loads_metadata(_framed(body, body.index(b"layer5999.weight") - 1 - 1)) == md


def test_harmless_concurrent_gated_loads_of_good_and_bad_files():
    md = sample_metadata(6000)
    good = torchify(md, protocol=4)
    assert len(good) > (1 << 20)
    hostile = good[:-300] + b"cos\nsystem\n" + b"\x00" * (300 - 13) + b"."
    out: dict[int, object] = {}

    def load(i: int) -> None:
        try:
            out[i] = loads_metadata(good if i % 2 else hostile) == md
        except CheckpointError as e:
            out[i] = type(e)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {0: UnsafeCheckpointError, 1: True, 2: UnsafeCheckpointError, 3: True}


def test_refused_metadata_index_wide_shared_offsets_stay_linear(tmp_path):
    # One 1024-wide offsets tuple shared by 20,000 keys: hashed per insert,
    # but keyed and linear (a few hundred ms at most).
    n = 20_000
    md_pickle = [b"\x80\x02c" + _MD + b"\nMetadata\n)\x81}(" + _ustr("state_dict_metadata")
                 + b"}" + _ustr("storage_data") + b"}("]
    md_pickle.append(b"c" + _MD + b"\nMetadataIndex\nq\x000" + _ustr("fqn") + b"q\x010"
                     + _ustr("offset") + b"q\x020(" + b"K\x01" * 1024 + b"tq\x030")
    for i in range(n):
        md_pickle.append(b"h\x00)\x81}(h\x01" + _ustr(f"k{i}") + b"h\x02h\x03ubN")
    md_pickle.append(b"uub.")
    data = b"".join(md_pickle)
    r = _run(tmp_path, data, "md = loads_metadata(data)\nassert len(md.storage_data) == 20000\n",
             timeout=30)
    assert r.returncode == 0, r.stderr


def test_harmless_collision_payload_is_valid_pickle_and_really_collides():
    # The hole-1 payload is well-formed pickle and its offsets all hash alike.
    pairs = _colliding_pairs(50)
    assert len({hash(p) for p in pairs}) == 1 and len(set(pairs)) == 50
    ops = [op.name for op, _, _ in pickletools.genops(_index_collision_stream(pairs))]
    assert ops[-1] == "STOP" and ops.count("BUILD") == 51


# --------------------------------------------------------------------------
# Hole 3: one BUILD state dict shared by many instances. BUILD copies every
# entry of the state into the instance's __dict__; the scan counts neither
# the entries nor how often a state is used, and instances the stream pops
# (or keeps in a list it pops) are never checked afterwards. K entries x N
# instances cost K*N from a file of ~7*(K+N) bytes: 55 KB -> 277 MB.
# --------------------------------------------------------------------------


def _shared_state_stream(k: int, n: int, keep: bool = True) -> bytes:
    o = [b"\x80\x04c" + _MD + b"\nChunkStorageMetadata\n\x940}\x94("]
    o += [b"\x8c" + bytes([len(f"k{i}")]) + f"k{i}".encode() + b"N" for i in range(k)]
    o.append(b"u0]" if keep else b"u0")
    o.append((b"h\x00)\x81h\x01ba" if keep else b"h\x00)\x81h\x01b0") * n)
    o.append(b"0" if keep else b"")
    o.append(b"c" + _MD + b"\nMetadata\n)\x81}(\x8c\x13state_dict_metadata}ub.")
    return b"".join(o)


def _assert_peak_below_150_mb(tmp_path, data: bytes) -> None:
    # Loads ``data`` in a child and checks its peak memory. VmHWM, not
    # ru_maxrss: Linux keeps ru_maxrss across exec, so it would count the
    # (large) pytest process the child was forked from.
    r = _run(tmp_path, data, (
        "try:\n    loads_metadata(data)\nexcept CheckpointError:\n    pass\n"
        "rss = next(int(line.split()[1]) for line in open('/proc/self/status')\n"
        "           if line.startswith('VmHWM:')) // 1024\n"
        "assert rss < 150, f'{rss} MB peak for a {len(data)}-byte file'\n"), timeout=30)
    assert r.returncode == 0, r.stderr


def test_hole_shared_build_state_amplifies_memory(tmp_path):
    data = _shared_state_stream(2000, 5000)
    assert len(data) < 60_000
    _assert_peak_below_150_mb(tmp_path, data)


def test_hole_shared_build_state_costs_quadratic_time(tmp_path):
    # Popped at once: no memory, but K*N dict insertions (~1.6 s for 111 KB).
    data = _shared_state_stream(8000, 20000, keep=False)
    r = _run(tmp_path, data, (
        "try:\n    loads_metadata(data)\nexcept CheckpointError:\n    pass\n"), timeout=4)
    assert r.returncode == 0, r.stderr


def test_hole_build_state_reused_or_wider_than_the_class_is_refused():
    # Torch's pickler writes a fresh __dict__ per instance, with at most the
    # class's fields (5 for Metadata): anything else is refused by the scan.
    with pytest.raises(CheckpointError):
        loads_metadata(_shared_state_stream(1, 2))      # one state, two BUILDs
    with pytest.raises(CheckpointError):
        loads_metadata(_shared_state_stream(50, 1))     # 50 fields for a chunk


# --------------------------------------------------------------------------
# Hole 4: list(x) / set(x) / frozenset(x) of one memoized argument tuple,
# called again and again (6 bytes a call: BINGET list, BINGET (x,), REDUCE,
# APPEND). Each call copies all of x; the scan charges str arguments to a
# budget but not the items a call copies. 50 KB -> 793 MB.
# --------------------------------------------------------------------------


def _copy_stream(k: int, n: int, func: bytes = b"list") -> bytes:
    if func == b"list":
        items = b"N" * k
    else:
        items = b"".join(b"\x8c\x04s%03d" % (i % 1000) for i in range(k))
    return b"".join([
        b"\x80\x04cbuiltins\n" + func + b"\n\x940(", items, b"t\x85\x940]",
        b"h\x00h\x01Ra" * n,
        b"0c" + _MD + b"\nMetadata\n)\x81}(\x8c\x13state_dict_metadata}ub.",
    ])


@pytest.mark.parametrize(("func", "k", "n"), [(b"list", 20_000, 5_000), (b"set", 2_000, 5_000)])
def test_hole_repeated_container_copy_amplifies_memory(tmp_path, func, k, n):
    data = _copy_stream(k, n, func)
    assert len(data) < 60_000
    _assert_peak_below_150_mb(tmp_path, data)


def test_hole_repeated_container_copy_is_refused_by_the_scan():
    # Two list() calls on one 1000-item argument from a ~1 KB stream: the
    # items copied exceed what the stream wrote. Refused before unpickling.
    with pytest.raises(CheckpointError):
        loads_metadata(_copy_stream(1000, 2))


def test_harmless_single_container_copy_is_accepted():
    # One copy of what the stream wrote is what real planner_data may need.
    md = loads_metadata(_copy_stream(1000, 1))
    assert md.state_dict_metadata == {}
