"""The opcode scan that runs before ``.metadata`` is unpickled: one test per rule.

Each payload is built opcode by opcode, so the test says exactly which
opcode the scan must refuse and why. The refusals come in two kinds:
``unsafe`` (the stream asks for something that could run or change code:
:class:`UnsafeCheckpointError`) and damage (``CheckpointError``). Real
streams, at every protocol torch can write, must pass unchanged. Torch-free.
"""

from __future__ import annotations

import io
import os
import pathlib
import stat
import struct
import threading

import pytest

import ckcore.checkpoint as ckpt
from ckcore._kernels._pickle_scan import GLOBAL_KINDS, Scanner, scan
from ckcore.checkpoint import (
    MAX_DEPTH,
    CheckpointError,
    UnsafeCheckpointError,
    load_metadata,
    loads_metadata,
)
from tests.support.paths import DATA
from tests.support.streams import sample_metadata, torchify

FIXTURE = DATA / "dcp_small" / ".metadata"
MD = "torch.distributed.checkpoint.metadata"


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def sbu(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def refusal(data: bytes):
    return scan(data, ckpt._global_kind, MAX_DEPTH)


def assert_unsafe(data: bytes, why: str):
    found = refusal(data)
    assert found is not None and found[0], found
    assert why in found[2], found
    with pytest.raises(UnsafeCheckpointError, match="nothing was executed"):
        loads_metadata(data)


def assert_damaged(data: bytes, why: str):
    found = refusal(data)
    assert found is not None and not found[0], found
    assert why in found[2], found
    with pytest.raises(CheckpointError) as ei:
        loads_metadata(data)
    assert type(ei.value) is CheckpointError


# A minimal valid Metadata stream, and pieces to splice into it.
EMPTY_MD = b"\x80\x04" + glob(MD, "Metadata") + b")\x81}" + sbu("state_dict_metadata") + b"}sb."


def test_minimal_metadata_is_accepted():
    assert refusal(EMPTY_MD) is None
    assert loads_metadata(EMPTY_MD).state_dict_metadata == {}


# --------------------------------------------------------------------------
# BUILD: only once, on a fresh metadata instance, with its class's state.
# --------------------------------------------------------------------------

STATE = b"}" + sbu("_str") + sbu("/attacker") + b"s"
SLOTSTATE = b"N}" + sbu("_str") + sbu("/attacker") + b"s\x86"


@pytest.mark.parametrize("target", [
    glob("pathlib", "PurePosixPath"),
    glob("pathlib", "PosixPath"),
    glob(MD, "Metadata"),
    glob(MD, "MetadataIndex"),
    glob(MD, "TensorProperties"),
    glob(MD, "_MEM_FORMAT_ENCODING"),
    glob("torch.serialization", "_get_layout"),
    glob("collections", "OrderedDict"),
    glob("torch", "bfloat16"),
    glob("builtins", "list"),
    b"]", b"}", b")", b"N", sbu("text"),
])
@pytest.mark.parametrize("state", [STATE, SLOTSTATE], ids=["dict", "slots"])
def test_build_on_anything_but_a_fresh_instance_is_refused(target, state):
    assert_unsafe(b"\x80\x04" + target + state + b"b.", "BUILD refused")
    assert str(pathlib.PurePosixPath("/a/b")) == "/a/b"


def test_build_twice_is_refused():
    inst = glob(MD, "ChunkStorageMetadata") + b")\x81"
    state = b"}" + sbu("offsets") + b")s"
    second = b"}" + sbu("__class__") + glob(MD, "Metadata") + b"s"
    assert_unsafe(b"\x80\x04" + inst + state + b"b" + second + b"b.", "BUILD refused")
    # One BUILD alone is fine (the chunk is then dropped from the stack).
    assert refusal(b"\x80\x04" + inst + state + b"b0" + EMPTY_MD[2:]) is None


def test_build_state_must_have_the_class_shape():
    inst = b"\x80\x04" + glob(MD, "ChunkStorageMetadata") + b")\x81"
    assert_unsafe(inst + b"]b.", "BUILD refused")          # a list state
    assert_unsafe(inst + SLOTSTATE + b"b.", "BUILD refused")  # (None, slots) would setattr
    props = b"\x80\x04" + glob(MD, "TensorProperties") + b")\x81"
    assert_unsafe(props + b"}b.", "BUILD refused")          # TensorProperties takes its 5-tuple
    assert_unsafe(props + b"NNNN(t" + b"b.", "BUILD refused")


def test_instance_fields_are_exactly_the_class_fields():
    md = sample_metadata(1)
    chunk = md.state_dict_metadata["layer0.weight"].chunks[0]
    chunk.__dict__["__eq__"] = 1
    with pytest.raises(CheckpointError, match="fields other than offsets and sizes"):
        loads_metadata(torchify(md))
    md = sample_metadata(1)
    md.__dict__["extra"] = 1
    with pytest.raises(CheckpointError, match="not DCP Metadata"):
        loads_metadata(torchify(md))
    md = sample_metadata(1)
    key = next(iter(md.storage_data))
    object.__setattr__(key, "surprise", 1)
    with pytest.raises(CheckpointError, match="not a valid MetadataIndex"):
        loads_metadata(torchify(md))


# --------------------------------------------------------------------------
# Calls: each global takes only what its type takes.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    glob(MD, "Metadata") + b"]\x85R",                       # a metadata class is never called
    glob(MD, "ChunkStorageMetadata") + b")R",
    glob("torch", "Size") + b")R",                          # Size(iterable) only
    glob("torch", "Size") + b"K\x01\x85R",
    glob(MD, "_MEM_FORMAT_ENCODING") + sbu("x") + b"\x85R",  # an int only
    glob("torch.serialization", "_get_layout") + b"K\x01\x85R",
    glob("builtins", "tuple") + b"K\x01\x85R",
    glob("builtins", "dict") + b"K\x01\x85R",
    glob("builtins", "complex") + b"]\x85R",
    glob("pathlib", "PurePosixPath") + b"K\x01\x85R",
    glob("torch", "bfloat16") + b")R",                      # a constant is not callable
    glob("pathlib", "PurePosixPath") + b")\x81",            # paths only through REDUCE
    glob(MD, "Metadata") + b"K\x01\x85\x81",                # NEWOBJ with arguments
    glob(MD, "Metadata") + b")}" + sbu("k") + b"Ns\x92",    # NEWOBJ_EX with keywords
    glob("builtins", "tuple") + glob("builtins", "tuple") + b"R",  # args not a tuple
])
def test_calls_outside_the_types_signature_are_refused(call):
    assert_unsafe(b"\x80\x04" + call + b".", "call refused")


def test_the_calls_torch_writes_are_accepted():
    # torch's own file: torch.Size, _get_layout and _MEM_FORMAT_ENCODING calls.
    data = FIXTURE.read_bytes()
    assert b"_get_layout" in data and b"_MEM_FORMAT_ENCODING" in data and b"Size" in data
    assert refusal(data) is None


# --------------------------------------------------------------------------
# Opcodes DCP metadata never holds.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00",    # EXT1/2/4
    b"N\x51", b"Pid\n",                                      # BINPERSID, PERSID
    glob(MD, "Metadata") + b"(i" + MD.encode() + b"\nMetadata\n",  # INST (after a MARK)
    b"(" + glob(MD, "Metadata") + b"o",                      # OBJ
    b"\x97", b"N\x98",                                       # NEXT_BUFFER, READONLY_BUFFER
    b"\x96\x01\x00\x00\x00\x00\x00\x00\x00x",                # BYTEARRAY8
])
def test_forbidden_opcodes(op):
    assert_unsafe(b"\x80\x05" + op + b".", "opcode refused")


@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("builtins", "eval"), ("copyreg", "_reconstructor"),
    ("builtins", "getattr"), ("pathlib", "Path"), ("builtins", "bytearray"),
])
def test_globals_off_the_list(module, name):
    assert_unsafe(b"\x80\x02" + glob(module, name) + b".", "allow-list")
    assert_unsafe(b"\x80\x04" + sbu(module) + sbu(name) + b"\x93.", "allow-list")
    with pytest.raises(UnsafeCheckpointError, match=f"refusing global {module}.{name}"):
        loads_metadata(b"\x80\x02" + glob(module, name) + b".")


def test_stack_global_needs_literal_names():
    # A name computed by a call (content unknown to the scan) is refused.
    name = glob("torch.serialization", "_get_layout") + sbu("torch.strided") + b"\x85R"
    assert_unsafe(b"\x80\x04" + sbu("torch") + name + b"\x93.", "global")
    assert_unsafe(b"\x80\x04K\x01" + sbu("Size") + b"\x93.", "global")


# --------------------------------------------------------------------------
# Containers, memo, nesting, lengths.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op", [b"NNa", b"}N(Ne", b"]NNs", b"]N(Nu", b"}(N\x90", b"N(N\x90"])
def test_filling_the_wrong_container(op):
    assert_unsafe(b"\x80\x04" + op + b".", "APPEND/SETITEM/ADDITEMS")


@pytest.mark.parametrize("stream, why", [
    (b"\x80\x04h\x00.", "memo"),                              # GET of an unset index
    (b"\x80\x04Nq\x01.", "memo"),                             # PUT out of order
    (b"\x80\x04Nr\xff\xff\xff\xff.", "memo"),                  # 4 GiB memo
    (b"\x80\x02Np4294967295\n.", "memo"),
    (b"\x80\x02Np99999999999999999999\n.", "memo"),
    (b"\x80\x02Ng0\n.", "memo"),
])
def test_memo_misuse(stream, why):
    assert_damaged(stream, why)


def test_dense_memo_is_accepted():
    assert refusal(b"\x80\x04" + b"N\x94" * 1000 + b"0" * 1000 + EMPTY_MD[2:]) is None
    assert refusal(b"\x80\x02Nq\x00Nq\x01Nq\x000" + b"00" + EMPTY_MD[2:]) is None


@pytest.mark.parametrize("wrap, close", [
    (b"", b"\x85"), (b"(", b"t"), (b"(", b"l"), (b"]", b"a"), (b"}" + sbu("k"), b"s"),
])
def test_nesting_limit(wrap, close):
    inner = b"N"
    for _ in range(MAX_DEPTH):
        inner = wrap + inner + close
    assert refusal(b"\x80\x04" + inner + b"0" + EMPTY_MD[2:]) is None
    assert_damaged(b"\x80\x04" + wrap + inner + close + b"0" + EMPTY_MD[2:], "nested deeper")


@pytest.mark.parametrize("stream", [
    b"}K\x01Ns",                      # an int key: its hash is the file's to choose
    b"}K\x01K\x02\x86Ns",             # a tuple key
    b"(K\x01Nd",                      # DICT with an int key
    b"\x8f(K\x01\x90",                # a set of ints
    b"(N\x91",                        # a frozenset holding None
    glob("builtins", "set") + b"K\x01\x85\x85R",        # set((1,))
    glob("builtins", "frozenset") + b"]K\x01a\x85R",     # frozenset([1])
])
def test_only_strings_are_hashed(stream):
    assert_unsafe(b"\x80\x04" + stream + b".", "dict key or set element")


def test_string_keys_and_elements_are_accepted():
    ok = (b"}" + sbu("a") + b"Ns" + b"0" + b"\x8f(" + sbu("a") + sbu("b") + b"\x900"
          + b"(" + sbu("a") + b"\x910"
          + glob("builtins", "set") + b"]" + sbu("a") + b"a\x85R0")
    assert refusal(b"\x80\x04" + ok + EMPTY_MD[2:]) is None


def test_hash_bomb_of_shared_tuples_is_refused():
    # T(k+1) = (T(k), T(k)): hashing T(60) would take 2**60 steps. Tuples
    # are never hashed, so it can only ride along in a value, not as a key.
    bomb = b"K\x00" + b"\x94" + b"".join(
        b"h" + bytes([k]) + b"h" + bytes([k]) + b"\x86\x94" for k in range(60))
    key = b"h" + bytes([60])
    assert_unsafe(b"\x80\x04" + bomb + b"}" + key + b"Ns.", "dict key")
    assert_unsafe(b"\x80\x04" + bomb + b"(" + key + b"\x91.", "dict key or set element")


def test_metadata_index_offsets_stay_short():
    key = glob(MD, "MetadataIndex") + b")\x81}(" + sbu("fqn") + sbu("w") + sbu("offset")
    wide = b"(" + b"K\x00" * 1025 + b"t"
    assert_damaged(b"\x80\x04" + key + wide + b"ub.", "MetadataIndex offset")
    ok = b"(" + b"K\x00" * 1024 + b"t"
    assert refusal(b"\x80\x04" + key + ok + b"ub0" + EMPTY_MD[2:]) is None


def test_shared_chunk_lists_are_bounded_by_the_file_size():
    # One list of 20,000 chunks shared by 200 tensors: 4 million chunks to
    # every reader of the result, from a file of a few hundred kB.
    from ckcore.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunks = [ChunkStorageMetadata((i,), (1,)) for i in range(20_000)]
    sdm = {f"t{i}": TensorStorageMetadata(TensorProperties("float32"), (20_000,), chunks)
           for i in range(200)}
    data = torchify(Metadata(sdm))
    with pytest.raises(CheckpointError, match="more chunk dimensions than a file of"):
        loads_metadata(data)
    # The same tensors, each with its own list, are fine at the file's size.
    sdm = {f"t{i}": TensorStorageMetadata(TensorProperties("float32"), (200,),
                                          [ChunkStorageMetadata((j,), (1,)) for j in range(200)])
           for i in range(50)}
    assert len(loads_metadata(torchify(Metadata(sdm))).state_dict_metadata) == 50


def test_a_million_deep_tuple_is_refused_without_recursion():
    assert_damaged(b"\x80\x04N" + b"\x85" * 1_000_000 + b".", "nested deeper")


def test_metadata_index_state_stays_shallow():
    key = glob(MD, "MetadataIndex") + b")\x81}(" + sbu("fqn") + sbu("w") + sbu("offset")
    assert refusal(b"\x80\x04" + key + b"K\x00\x85ub0" + EMPTY_MD[2:]) is None
    deep = b"K\x00\x85\x85"  # ((0,),): deeper than offsets ever are
    assert_damaged(b"\x80\x04" + key + deep + b"ub.", "nested deeper")


@pytest.mark.parametrize("op", [
    b"X\xff\xff\xff\xff", b"T\xff\xff\xff\x7f", b"T\x00\x00\x00\x80", b"U\x10",
    b"B\xff\xff\xff\xff", b"C\x10", b"\x8c\x10",
    b"\x8d" + struct.pack("<Q", 2**63 - 1), b"\x8d" + struct.pack("<Q", 2**64 - 1),
    b"\x8e" + struct.pack("<Q", 2**62), b"\x8a\x10", b"\x8b\xff\xff\xff\x7f",
    b"\x8b\xff\xff\xff\xff", b"\x95" + struct.pack("<Q", 2**40),
])
def test_declared_lengths_past_the_end(op):
    assert_damaged(b"\x80\x04" + op + b"abc.", "declared length")


def test_unknown_opcode_and_protocol():
    assert_damaged(b"\x80\x04\xff.", "invalid opcode")
    assert_damaged(b"\x80\x06" + EMPTY_MD[2:], "protocol")


def test_underflow_below_a_mark():
    assert_damaged(b"\x80\x04](a.", "stack")
    assert_damaged(b"\x80\x04N(\x85.", "stack")
    assert_damaged(b"\x80\x04(N1" + b"1.", "stack")


def test_result_must_be_built_metadata():
    assert_damaged(b"\x80\x04" + glob(MD, "Metadata") + b")\x81.", "not a DCP Metadata")
    assert_damaged(b"\x80\x04N" + EMPTY_MD[2:], "not a DCP Metadata")   # a leftover value


def test_every_truncation_of_a_real_stream():
    data = FIXTURE.read_bytes()
    assert refusal(data) is None
    for n in range(len(data)):
        found = refusal(data[:n])
        assert found is not None and not found[0], n


# --------------------------------------------------------------------------
# Real streams at every protocol torch can write.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [2, 3, 4, 5])
def test_real_streams_at_each_protocol(proto):
    ref = load_metadata(FIXTURE)
    data = torchify(ref, protocol=proto)
    assert refusal(data) is None
    assert loads_metadata(data) == ref
    md = sample_metadata(3)
    assert loads_metadata(torchify(md, protocol=proto)) == md


# --------------------------------------------------------------------------
# The pipeline: big files are unpickled while the scan runs ahead.
# --------------------------------------------------------------------------


def big_stream() -> bytes:
    data = torchify(sample_metadata(6000))
    assert len(data) > ckpt._PIPELINE_BYTES
    return data


def test_pipelined_load_equals_the_serial_one(monkeypatch):
    data = big_stream()
    got = loads_metadata(data)
    monkeypatch.setattr(ckpt, "_PIPELINE_BYTES", 1 << 40)
    assert loads_metadata(data) == got


def test_pipelined_load_stops_at_a_late_refusal():
    data = big_stream()
    # An EXT1 right before STOP: the unpickler has built nearly everything
    # by the time the scan reaches it, and must not run it.
    bad = data[:-1] + b"\x82\x01."
    with pytest.raises(UnsafeCheckpointError, match="opcode EXT1"):
        loads_metadata(bad)
    with pytest.raises(CheckpointError, match="truncated"):
        loads_metadata(data[: len(data) // 2])
    assert threading.active_count() == 1 or not any(
        t.name == "ckcore-pickle-scan" for t in threading.enumerate())


def test_scanner_progress_and_cancel():
    data = big_stream()
    sc = Scanner(data, ckpt._global_kind, MAX_DEPTH)
    assert sc.progress == 0 and not sc.finished
    assert sc.run() is None
    assert sc.finished and sc.outcome_accepted and sc.progress == len(data)
    with pytest.raises(RuntimeError, match="runs once"):
        sc.run()
    sc = Scanner(data, ckpt._global_kind, MAX_DEPTH)
    sc.cancel()
    assert sc.run() == (False, sc.progress, "the scan was cancelled")
    assert sc.finished and not sc.outcome_accepted and sc.progress < len(data)
    with pytest.raises(RuntimeError, match="not finished"):
        Scanner(data, ckpt._global_kind, MAX_DEPTH).result()


def test_scan_argument_checks():
    with pytest.raises(ValueError, match="max_depth"):
        scan(b".", ckpt._global_kind, 0)
    with pytest.raises(TypeError):
        scan(None, ckpt._global_kind)  # type: ignore[arg-type]
    assert set(GLOBAL_KINDS.values()) == set(range(1, 21))
    # An exception from the lookup refuses the global.
    assert scan(b"\x80\x02" + glob("a", "b") + b".", lambda m, n: 1 // 0)[0] is True


# --------------------------------------------------------------------------
# The file: only regular files, only up to the cap.
# --------------------------------------------------------------------------


def test_special_files_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo" / ".metadata"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="regular file"):
        load_metadata(fifo.parent)   # would block forever on open() or read()
    for dev in ("/dev/zero", "/dev/urandom"):
        d = tmp_path / pathlib.Path(dev).name
        d.mkdir()
        (d / ".metadata").symlink_to(dev)
        with pytest.raises(CheckpointError, match="regular file"):
            load_metadata(d)
    (tmp_path / "dir" / ".metadata").mkdir(parents=True)
    with pytest.raises(CheckpointError):
        load_metadata(tmp_path / "dir" / ".metadata")


def test_size_cap(tmp_path, monkeypatch):
    sparse = tmp_path / ".metadata"
    with open(sparse, "wb") as f:
        f.truncate(8 << 30)   # 8 GiB, sparse: refused from fstat alone
    assert stat.S_ISREG(sparse.stat().st_mode)
    with pytest.raises(CheckpointError, match="larger than the cap"):
        load_metadata(tmp_path)
    real = FIXTURE.read_bytes()
    with pytest.raises(CheckpointError, match="larger than the cap"):
        load_metadata(FIXTURE, max_bytes=len(real) - 1)
    assert load_metadata(FIXTURE, max_bytes=len(real)) == load_metadata(FIXTURE)
    with pytest.raises(CheckpointError, match="larger than the cap"):
        loads_metadata(real, max_bytes=100)
    with pytest.raises(CheckpointError, match="larger than the cap"):
        load_metadata(io.BytesIO(real), max_bytes=100)
    monkeypatch.setenv("CKCORE_MAX_METADATA_BYTES", "100")
    with pytest.raises(CheckpointError, match="larger than the cap"):
        load_metadata(FIXTURE)
    monkeypatch.setenv("CKCORE_MAX_METADATA_BYTES", "lots")
    with pytest.raises(ValueError, match="CKCORE_MAX_METADATA_BYTES"):
        load_metadata(FIXTURE)
    monkeypatch.delenv("CKCORE_MAX_METADATA_BYTES")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_bytes"):
            load_metadata(FIXTURE, max_bytes=bad)
    with pytest.raises(TypeError, match="max_bytes"):
        load_metadata(FIXTURE, max_bytes=1.5)  # type: ignore[arg-type]


def test_text_mode_file_object_is_a_type_error():
    with open(FIXTURE, encoding="latin-1") as f, pytest.raises(TypeError, match="binary mode"):
        load_metadata(f)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# The tripwire: a class changed during a load is restored and the load refused.
# --------------------------------------------------------------------------


def test_tripwire_restores_and_refuses(monkeypatch):
    from ckcore.metadata import ChunkStorageMetadata

    real_load = ckpt._load_paused

    def poisoning(stream, name, nbytes):
        md = real_load(stream, name, nbytes)
        ChunkStorageMetadata.poisoned = True  # what a hole in the scan would allow
        ChunkStorageMetadata.__eq__ = lambda self, other: True
        return md

    before = dict(vars(ChunkStorageMetadata))
    monkeypatch.setattr(ckpt, "_load_paused", poisoning)
    with pytest.raises(UnsafeCheckpointError, match="ChunkStorageMetadata"):
        loads_metadata(FIXTURE.read_bytes())
    assert dict(vars(ChunkStorageMetadata)) == before
