"""Hostile ``.metadata`` payloads, built opcode by opcode.

Every generator returns (or yields) ``(name, bytes, expected)`` triples;
``expected`` is what the contract demands (see ``_runner.problems``):

* ``"unsafe"``: must raise ``UnsafeCheckpointError`` (a forbidden global, or
  an opcode that could run code or mutate an allow-listed object);
* ``"refuse"``: must raise ``CheckpointError`` (or its subclass);
* ``"any"``: may load or be refused, but never crash, hang, escape, run code
  or poison; ``"any:GOLD"`` and ``"ok:GOLD"`` also require a loaded result to
  equal the golden result ``GOLD`` (``dcp_small``, ``dcp_sharded``: today's
  loads of the fixtures, in golden.json; ``sample``: :func:`sample_metadata`).

Streams are written by :class:`Emitter`, a small pickler that writes ckcore
objects the way torch writes its own (NEWOBJ + BUILD with a ``__dict__``
state; TensorProperties as its state tuple; dtypes as ``torch.<name>``
globals; sizes as ``REDUCE(torch.Size, (tuple,))``; layouts and memory
formats through ``_get_layout`` and ``_MEM_FORMAT_ENCODING``) at any
protocol, and splices :class:`Raw` opcode fragments anywhere in the tree.
No torch import: the streams name torch's classes without needing them.
"""

from __future__ import annotations

import os
import pickle as P
import random
import struct
from collections import OrderedDict
from pathlib import Path, PosixPath, PurePath

from ckcore.checkpoint import StorageInfo
from ckcore.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from tests.support.streams import sample_metadata as _sample

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "tests" / "data"
MARKER = "ckcore_hostile_marker"
SH = f"touch {MARKER}"
PY = f"open({MARKER!r}, 'w').close()"

DCP_MD = "torch.distributed.checkpoint.metadata"
SHARD_MD = "torch.distributed._shard.sharded_tensor.metadata"
FS = "torch.distributed.checkpoint.filesystem"
MEM_CODES = {"contiguous_format": 0, "channels_last": 1, "preserve_format": 2}

#: Memo indices from here up are left to the fragments (bombs, memo abuse);
#: the emitter's own memo entries stay below it.
FRAG_MEMO = 60000


def fixture_bytes(name: str = "dcp_small") -> bytes:
    return (DATA / name / ".metadata").read_bytes()


# --------------------------------------------------------------------------
# The emitter.
# --------------------------------------------------------------------------


class Raw:
    """An opcode fragment that leaves exactly one object on the stack, written verbatim."""

    def __init__(self, data: bytes):
        self.data = bytes(data)


class G:
    """A global reference ``module.name``; ``stack`` forces STACK_GLOBAL (True) or GLOBAL (False)."""

    def __init__(self, module: str, name: str, stack: bool | None = None):
        self.module, self.name, self.stack = module, name, stack


class R:
    """``REDUCE(func, args)``."""

    def __init__(self, func, args: tuple):
        self.func, self.args = func, tuple(args)


class ArgOf:
    """In a dtype-free torch-style field (size, offsets, layout, memory format):
    ``x`` becomes the argument of the usual REDUCE instead of the usual value."""

    def __init__(self, x):
        self.x = x


class Again:
    """``obj`` as usual, then one more BUILD with ``state`` on the same instance."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class Label:
    """``obj`` as usual, then memoised; the emitter records its memo index under ``label``."""

    def __init__(self, obj, label: str):
        self.obj, self.label = obj, label


_TORCH_NAME = {
    Metadata: (DCP_MD, "Metadata"),
    TensorStorageMetadata: (DCP_MD, "TensorStorageMetadata"),
    ChunkStorageMetadata: (DCP_MD, "ChunkStorageMetadata"),
    BytesStorageMetadata: (DCP_MD, "BytesStorageMetadata"),
    MetadataIndex: (DCP_MD, "MetadataIndex"),
    StorageMeta: (DCP_MD, "StorageMeta"),
    StorageInfo: (FS, "_StorageInfo"),
    TensorProperties: (DCP_MD, "TensorProperties"),
}
_SIZE_FIELDS = {(ChunkStorageMetadata, "offsets"), (ChunkStorageMetadata, "sizes"),
                (TensorStorageMetadata, "size"), (MetadataIndex, "offset")}


def _size(x):
    if isinstance(x, ArgOf):
        return R(G("torch", "Size"), (x.x,))
    if type(x) is tuple:
        return R(G("torch", "Size"), (x,))
    return x


class Emitter:
    """Writes a pickle of ``obj`` at ``proto`` the way torch's FileSystemWriter would.

    ``memo``: memoise globals (the second use is a GET), as real pickles do.
    """

    def __init__(self, proto: int = 4, *, memo: bool = True):
        self.proto = proto
        self.use_memo = memo
        self.out = bytearray()
        self.globals: dict[tuple[str, str], int] = {}
        self.labels: dict[str, int] = {}
        self.next_memo = 0

    # -- primitives ------------------------------------------------------
    def put(self) -> int:
        idx = self.next_memo
        self.next_memo += 1
        self.out += put_op(idx, self.proto)
        return idx

    def get(self, idx: int) -> None:
        self.out += get_op(idx, self.proto)

    def global_(self, g: G) -> None:
        key = (g.module, g.name)
        if self.use_memo and g.stack is None and key in self.globals:
            self.get(self.globals[key])
            return
        stack = g.stack if g.stack is not None else self.proto >= 4
        if stack:
            self.emit(g.module)
            self.emit(g.name)
            self.out += P.STACK_GLOBAL
        else:
            self.out += P.GLOBAL + g.module.encode() + b"\n" + g.name.encode() + b"\n"
        if self.use_memo and g.stack is None:
            self.globals[key] = self.put()

    def instance(self, cls: G, state, args: tuple = ()) -> None:
        p = self.proto
        if p >= 2:
            self.global_(cls)
            self.emit(tuple(args))
            self.out += P.NEWOBJ
        elif p == 1:
            self.out += P.MARK
            self.global_(cls)
            for a in args:
                self.emit(a)
            self.out += P.OBJ
        else:
            self.out += P.MARK
            for a in args:
                self.emit(a)
            self.out += P.INST + cls.module.encode() + b"\n" + cls.name.encode() + b"\n"
        self.emit(state)
        self.out += P.BUILD

    # -- objects ---------------------------------------------------------
    def emit(self, x) -> None:
        p = self.proto
        t = type(x)
        if t is Raw:
            self.out += x.data
        elif t is G:
            self.global_(x)
        elif t is R:
            self.emit(x.func)
            self.emit(x.args)
            self.out += P.REDUCE
        elif t is Again:
            self.emit(x.obj)
            self.emit(x.state)
            self.out += P.BUILD
        elif t is Label:
            self.emit(x.obj)
            self.labels[x.label] = self.put()
        elif x is None:
            self.out += P.NONE
        elif t is bool:
            self.out += (P.NEWTRUE if x else P.NEWFALSE) if p >= 2 else (b"I01\n" if x else b"I00\n")
        elif t is int:
            self.out += int_op(x, p)
        elif t is float:
            self.out += P.BINFLOAT + struct.pack(">d", x) if p >= 1 else b"F%r\n" % x
        elif t is str:
            self.out += str_op(x, p)
        elif t is bytes:
            if p < 3:
                raise ValueError("bytes need protocol 3")
            self.out += (P.SHORT_BINBYTES + bytes([len(x)]) if len(x) < 256
                         else P.BINBYTES + struct.pack("<I", len(x))) + x
        elif t is tuple:
            if p >= 2 and len(x) <= 3:
                for v in x:
                    self.emit(v)
                self.out += [P.EMPTY_TUPLE, P.TUPLE1, P.TUPLE2, P.TUPLE3][len(x)]
            elif p >= 1 and not x:
                self.out += P.EMPTY_TUPLE
            else:
                self.out += P.MARK
                for v in x:
                    self.emit(v)
                self.out += P.TUPLE
        elif t is list:
            if p == 0:
                self.out += P.MARK
                for v in x:
                    self.emit(v)
                self.out += P.LIST
            else:
                self.out += P.EMPTY_LIST
                if x:
                    self.out += P.MARK
                    for v in x:
                        self.emit(v)
                    self.out += P.APPENDS
        elif t in (dict, OrderedDict):
            if t is OrderedDict:
                self.emit(R(G("collections", "OrderedDict"), ()))
                self.out += P.MARK
            elif p == 0:
                self.out += P.MARK
            else:
                self.out += P.EMPTY_DICT + (P.MARK if x else b"")
            for k, v in x.items():
                self.emit(k)
                self.emit(v)
            if t is OrderedDict:
                self.out += P.SETITEMS
            elif p == 0:
                self.out += P.DICT
            elif x:
                self.out += P.SETITEMS
        elif t in (set, frozenset):
            if p >= 4:
                if t is set:
                    self.out += P.EMPTY_SET
                self.out += P.MARK
                for v in x:
                    self.emit(v)
                self.out += P.ADDITEMS if t is set else P.FROZENSET
            else:
                self.emit(R(G("builtins", t.__name__), (list(x),)))
        elif isinstance(x, PurePath):
            self.emit(R(G("pathlib", t.__name__), tuple(x.parts)))
        elif t is TensorProperties:
            d = vars(x)
            dtype = d["dtype"]
            layout = d["layout"]
            mf = d["memory_format"]
            state = (
                G("torch", dtype) if type(dtype) is str else dtype,
                R(G("torch.serialization", "_get_layout"), ("torch." + layout,)) if type(layout) is str
                else R(G("torch.serialization", "_get_layout"), (layout.x,)) if type(layout) is ArgOf
                else layout,
                d["requires_grad"],
                R(G(DCP_MD, "_MEM_FORMAT_ENCODING"), (MEM_CODES[mf],)) if type(mf) is str
                else R(G(DCP_MD, "_MEM_FORMAT_ENCODING"), (mf.x,)) if type(mf) is ArgOf
                else mf,
                d["pin_memory"],
            )
            self.instance(G(*_TORCH_NAME[t]), state)
        elif t in _TORCH_NAME:
            state = {}
            for k, v in vars(x).items():
                if v is None and (t, k) in ((StorageInfo, "transform_descriptors"), (MetadataIndex, "offset")):
                    continue  # torch omits these None fields
                state[k] = _size(v) if (t, k) in _SIZE_FIELDS else v
            self.instance(G(*_TORCH_NAME[t]), state)
        else:
            raise TypeError(f"cannot emit {t}")

    def body(self, x) -> bytes:
        self.emit(x)
        return bytes(self.out)


def header(proto: int) -> bytes:
    return P.PROTO + bytes([proto]) if proto >= 2 else b""


def dumps(x, proto: int = 4, *, memo: bool = True, frame: bool = False,
          prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """A whole stream: PROTO, optional FRAME, ``prefix``, ``x``, ``suffix``, STOP."""
    e = Emitter(proto, memo=memo)
    body = prefix + e.body(x) + suffix + P.STOP
    if frame and proto >= 4:
        body = P.FRAME + struct.pack("<Q", len(body)) + body
    return header(proto) + body


def frag(x, proto: int = 4) -> bytes:
    """Opcodes that push ``x`` (no header, no STOP, no memo)."""
    return Emitter(proto, memo=False).body(x)


def put_op(idx: int, proto: int = 4) -> bytes:
    if proto == 0:
        return b"p%d\n" % idx
    if idx < 256:
        return P.BINPUT + bytes([idx])
    return P.LONG_BINPUT + struct.pack("<I", idx)


def get_op(idx: int, proto: int = 4) -> bytes:
    if proto == 0:
        return b"g%d\n" % idx
    if idx < 256:
        return P.BINGET + bytes([idx])
    return P.LONG_BINGET + struct.pack("<I", idx)


def int_op(x: int, proto: int = 4) -> bytes:
    if proto == 0:
        return b"I%d\n" % x if -(2**31) <= x < 2**31 else b"L%dL\n" % x
    if 0 <= x < 256:
        return P.BININT1 + bytes([x])
    if 0 <= x < 65536:
        return P.BININT2 + struct.pack("<H", x)
    if -(2**31) <= x < 2**31:
        return P.BININT + struct.pack("<i", x)
    if proto == 1:
        return b"L%dL\n" % x
    n = (x.bit_length() + 8) // 8
    data = x.to_bytes(n, "little", signed=True)
    return (P.LONG1 + bytes([n]) if n < 256 else P.LONG4 + struct.pack("<i", n)) + data


def str_op(s: str, proto: int = 4) -> bytes:
    if proto == 0:
        esc = (s.replace("\\", "\\u005c").replace("\0", "\\u0000").replace("\n", "\\u000a")
               .replace("\r", "\\u000d").replace("\x1a", "\\u001a"))
        return P.UNICODE + esc.encode("raw-unicode-escape") + b"\n"
    b = s.encode("utf-8", "surrogatepass")
    if proto >= 4 and len(b) < 256:
        return P.SHORT_BINUNICODE + bytes([len(b)]) + b
    return P.BINUNICODE + struct.pack("<I", len(b)) + b


def tup(*frags: bytes) -> bytes:
    """A tuple of the objects the fragments push."""
    return P.MARK + b"".join(frags) + P.TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` via REDUCE; func and args are fragments."""
    return func + tup(*args) + P.REDUCE


def glob(module: str, name: str, *, stack: bool = False, proto: int = 4) -> bytes:
    return frag(G(module, name, stack), proto)


# --------------------------------------------------------------------------
# Templates: a small, valid Metadata and where the hostile parts go.
# --------------------------------------------------------------------------


def sample_metadata() -> Metadata:
    """A small well-formed Metadata like a 2-rank save, built by hand (no loader involved)."""
    return _sample(dtypes=("bfloat16", "float32"))


def sample_stream(proto: int = 4, **kw) -> bytes:
    return dumps(sample_metadata(), proto, **kw)


#: Where a hostile value can be put in the sample, and what the load must do
#: when that value is junk: "refuse" where metadata needs a specific type,
#: "any" where DCP allows arbitrary values (planner_data, custom storage records).
POSITIONS = {
    "dtype": "refuse",          # TensorProperties dtype (normally the global torch.<name>)
    "memfmt": "refuse",         # argument of _MEM_FORMAT_ENCODING(...)
    "layout": "refuse",         # argument of _get_layout(...)
    "size": "refuse",           # argument of torch.Size(...) for a tensor's size
    "offsets": "refuse",        # argument of torch.Size(...) for a chunk's offsets
    "fqn": "refuse",            # a state_dict_metadata key
    "dict_key": "any",          # a planner_data key
    "set_elem": "any",          # an element of a set in planner_data
    "planner_value": "any",     # a planner_data value
    # used by the bombs and the poisoning payloads:
    "tp_state": "refuse",       # the whole TensorProperties state tuple
    "chunks": "refuse",         # a tensor's chunk list
    "sd_key": "refuse",         # a storage_data key
    "sd_value": "any",          # a storage_data value (custom writers store anything)
    "version": "refuse",
    "checkpoint_id": "any",
    "top": "refuse",            # the whole stream's object
}


def sample_with(position: str, x, proto: int = 4, **kw) -> bytes:
    """The sample Metadata stream with ``x`` (usually a :class:`Raw`) at ``position``."""
    md = sample_metadata()
    sdm = md.state_dict_metadata
    w = sdm["layer0.weight"]
    if position == "dtype":
        w.properties.dtype = x
    elif position == "memfmt":
        w.properties.memory_format = ArgOf(x)
    elif position == "layout":
        w.properties.layout = ArgOf(x)
    elif position == "size":
        w.size = ArgOf(x)
    elif position == "offsets":
        w.chunks[1].offsets = ArgOf(x)
    elif position == "fqn":
        md.state_dict_metadata = {**sdm, x: BytesStorageMetadata()}
    elif position == "dict_key":
        md.planner_data[x] = ("a",)
    elif position == "set_elem":
        md.planner_data["s"] = {x, "b"}
    elif position == "planner_value":
        md.planner_data["v"] = x
    elif position == "tp_state":
        w.properties = Raw(frag(G(DCP_MD, "TensorProperties")) + P.EMPTY_TUPLE + P.NEWOBJ
                           + _data(x, proto) + P.BUILD)
    elif position == "chunks":
        w.chunks = x
    elif position == "sd_key":
        md.storage_data[x] = StorageInfo("__0_0.distcp", 0, 1)
    elif position == "sd_value":
        md.storage_data[MetadataIndex("step")] = x
    elif position == "version":
        md.version = x
    elif position == "checkpoint_id":
        md.storage_meta.checkpoint_id = x
    elif position == "top":
        return header(proto) + _data(x, proto) + P.STOP
    else:
        raise KeyError(position)
    return dumps(md, proto, **kw)


def _data(x, proto: int) -> bytes:
    return x.data if type(x) is Raw else frag(x, proto)


def at(position: str, fragment: bytes, proto: int = 4, **kw) -> bytes:
    return sample_with(position, Raw(fragment), proto, **kw)


# ==========================================================================
# 1. Opcodes that run code, against forbidden and allowed globals.
# ==========================================================================

#: (module, name, args): each would leave a marker file (or worse) if called.
FORBIDDEN_CORE = [
    ("os", "system", (SH,)),
    ("posix", "system", (SH,)),
    ("builtins", "exec", (PY,)),
    ("builtins", "eval", (PY,)),
    ("builtins", "open", (MARKER, "w")),
    ("subprocess", "call", ([ "touch", MARKER],)),
]
FORBIDDEN_MORE = [
    ("__builtin__", "eval", (PY,)),
    ("io", "open", (MARKER, "w")),
    ("subprocess", "check_output", (["touch", MARKER],)),
    ("builtins", "__import__", ("os",)),
    ("builtins", "getattr", ("x", "upper")),
    ("builtins", "setattr", ("x", "y", "z")),
    ("builtins", "globals", ()),
    ("builtins", "compile", (PY, "x", "exec")),
    ("builtins", "object", ()),
    ("builtins", "type", ("X", (), {})),
    ("sys", "exit", (0,)),
    ("pickle", "loads", ()),  # args filled in below: a nested pickle that runs os.system
    ("_pickle", "loads", ()),
    ("copyreg", "_reconstructor", ("x",)),
    ("copyreg", "__newobj__", ("x",)),
    ("functools", "partial", ("x",)),
    ("operator", "methodcaller", ("upper",)),
    ("numpy.core.multiarray", "_reconstruct", ("x",)),
    ("torch", "load", (MARKER,)),
    ("torch._utils", "_rebuild_tensor_v2", ("x",)),
    ("ckcore.checkpoint", "_ALLOWED", ()),
    ("ckcore.checkpoint", "load_metadata", (MARKER,)),
    # Names that a getattr-walking find_class would resolve to something dangerous.
    ("pathlib", "os.system", (SH,)),
    ("pathlib", "os", ()),
    ("ckcore.checkpoint", "os.system", (SH,)),
    ("ckcore.checkpoint", "pickle.loads", ()),
    ("collections", "os.system", (SH,)),
    (DCP_MD, "Metadata.__init__", ()),
    (DCP_MD, "Metadata.__init__.__globals__", ()),
    ("builtins", "tuple.__class__", ("X", (), {})),
    ("collections", "OrderedDict.fromkeys", ("ab",)),
    ("pathlib", "PurePosixPath.__subclasses__", ()),
    ("torch", "Size.mro", ()),
    ("torch", "bfloat16.format", ()),
    ("torch.serialization", "_get_layout.__globals__", ()),
    # Look-alikes of allowed names.
    ("pathlib ", "PurePosixPath", ("/a",)),
    ("pathlib", "PurePosixPath ", ("/a",)),
    ("pathlib", "PurePosixPath\x00", ("/a",)),
    ("Pathlib", "PurePosixPath", ("/a",)),
    ("pathlib", "PurePath", ("/a",)),
    ("pathlib", "Path", ("/a",)),
    ("torch", "float64 ", ()),
    ("torch", "Size ", ()),
    ("torch.distributed.checkpoint", "metadata.Metadata", ()),
    (DCP_MD.upper(), "Metadata", ()),
    ("builtins", "bytearray", (2**40,)),
    ("builtins", "range", (2**62,)),
]

_NESTED = b"cos\nsystem\n(V" + SH.encode() + b"\ntR."


def _args_of(module: str, name: str, args: tuple) -> tuple:
    if name == "loads":
        return (_NESTED,)
    return args


FORMS = ("reduce", "inst", "obj", "newobj", "newobj_ex", "build", "build_dict",
         "reference", "setitems", "appends", "additems", "stack_global")


def form(kind: str, module: str, name: str, args: tuple, proto: int) -> bytes:
    """A fragment that reaches ``module.name`` with opcode form ``kind`` (pushes one object)."""
    g = frag(G(module, name, False), proto)
    a = b"".join(frag(v, max(proto, 3) if type(v) is bytes else proto) for v in args)
    if kind == "reduce":
        return g + P.MARK + a + P.TUPLE + P.REDUCE
    if kind == "stack_global":
        return frag(G(module, name, True), proto) + P.MARK + a + P.TUPLE + P.REDUCE
    if kind == "inst":
        return P.MARK + a + P.INST + module.encode() + b"\n" + name.encode() + b"\n"
    if kind == "obj":
        return P.MARK + g + a + P.OBJ
    if kind == "newobj":
        return g + P.MARK + a + P.TUPLE + P.NEWOBJ
    if kind == "newobj_ex":
        return g + P.MARK + a + P.TUPLE + P.EMPTY_DICT + P.NEWOBJ_EX
    if kind == "build":
        return g + frag((None, {"ckcore_hostile": 1}), proto) + P.BUILD
    if kind == "build_dict":
        return g + frag({"ckcore_hostile": 1}, proto) + P.BUILD
    if kind == "reference":
        return g
    if kind == "setitems":
        return g + P.MARK + frag("k", proto) + frag("v", proto) + P.SETITEMS
    if kind == "appends":
        return g + P.MARK + (a or frag("x", proto)) + P.APPENDS
    if kind == "additems":
        return g + P.MARK + (a or frag("x", proto)) + P.ADDITEMS
    raise KeyError(kind)


def _gname(module: str, name: str) -> str:
    return f"{module}.{name}".replace("\x00", "\\0").replace(" ", "_")


def forbidden_payloads():
    """Every code-running opcode form against forbidden globals, protocols 0-5, alone and embedded."""
    out = []
    for module, name, args in FORBIDDEN_CORE:
        args = _args_of(module, name, args)
        for kind in FORMS:
            for proto in range(6):
                if kind == "stack_global" and proto < 2:
                    continue
                if kind == "additems" and proto < 4:
                    continue
                f = form(kind, module, name, args, proto)
                out.append((f"forbidden-{kind}-{_gname(module, name)}-p{proto}",
                            header(proto) + f + P.STOP, "unsafe"))
            for proto in (2, 4):
                out.append((f"forbidden-{kind}-{_gname(module, name)}-in-planner-p{proto}",
                            at("planner_value", form(kind, module, name, args, proto), proto), "unsafe"))
                out.append((f"forbidden-{kind}-{_gname(module, name)}-prefix-p{proto}",
                            sample_stream(proto, prefix=form(kind, module, name, args, proto) + P.POP),
                            "unsafe"))
    for module, name, args in FORBIDDEN_MORE:
        args = _args_of(module, name, args)
        for kind in ("reduce", "stack_global", "inst", "obj", "newobj", "build", "reference"):
            for proto in (0, 2, 4):
                if kind == "stack_global" and proto < 2:
                    continue
                if "\n" in module + name and kind in ("inst",):
                    continue
                out.append((f"forbidden-{kind}-{_gname(module, name)}-p{proto}",
                            header(proto) + form(kind, module, name, args, proto) + P.STOP, "unsafe"))
        out.append((f"forbidden-reduce-{_gname(module, name)}-in-planner-p4",
                    at("planner_value", form("reduce", module, name, args, 4)), "unsafe"))
    # The getattr trick: getattr(__import__("os"), "system")("touch ...").
    imp = call(glob("builtins", "__import__"), frag("os"))
    system = call(glob("builtins", "getattr"), imp, frag("system"))
    out.append(("forbidden-getattr-import-chain", P.PROTO + b"\x02" + call(system, frag(SH)) + P.STOP,
                "unsafe"))
    out.append(("forbidden-getattr-import-chain-in-planner",
                at("planner_value", call(system, frag(SH))), "unsafe"))
    # Allowed globals used to reach getattr: e.g. tuple.__class__ is type.
    out.append(("forbidden-stack-global-nonstr-module",
                P.PROTO + b"\x04" + frag(G("builtins", "tuple")) + frag("x") + P.STACK_GLOBAL + P.STOP,
                "refuse"))
    out.append(("forbidden-stack-global-int-name",
                P.PROTO + b"\x04" + frag("builtins") + frag(7) + P.STACK_GLOBAL + P.STOP, "refuse"))
    out.append(("forbidden-global-non-utf8",
                P.PROTO + b"\x02" + P.GLOBAL + b"o\xffs\nsystem\n" + P.STOP, "refuse"))
    out.append(("forbidden-global-huge-name",
                P.PROTO + b"\x02" + P.GLOBAL + b"os\n" + b"s" * 1_000_000 + b"\n" + P.STOP, "refuse"))
    out.append(("forbidden-stack-global-huge-name",
                P.PROTO + b"\x04" + frag("os") + frag("s" * 1_000_000) + P.STACK_GLOBAL + P.STOP,
                "refuse"))
    # Adding to the allow-list through the table itself.
    out.append(("forbidden-allowlist-setitem",
                P.PROTO + b"\x02" + glob("ckcore.checkpoint", "_ALLOWED") + P.MARK
                + frag(("os", "system")) + glob("os", "system") + P.SETITEMS + P.STOP, "unsafe"))
    return out


#: Allow-listed globals (a name for each distinct stand-in).
ALLOWED_GLOBALS = [
    (DCP_MD, "Metadata"), (DCP_MD, "TensorStorageMetadata"), (DCP_MD, "ChunkStorageMetadata"),
    (DCP_MD, "BytesStorageMetadata"), (DCP_MD, "MetadataIndex"), (DCP_MD, "StorageMeta"),
    (DCP_MD, "TensorProperties"), (DCP_MD, "_MEM_FORMAT_ENCODING"), (SHARD_MD, "TensorProperties"),
    (SHARD_MD, "MEM_FORMAT_ENCODING"), (FS, "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "complex"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"),
    ("torch", "bfloat16"), ("torch", "strided"), ("torch._utils", "torch.channels_last"),
]
CLASS_GLOBALS = [g for g in ALLOWED_GLOBALS if g[1] not in (
    "_MEM_FORMAT_ENCODING", "MEM_FORMAT_ENCODING", "_get_layout", "bfloat16", "strided",
    "torch.channels_last")]
FUNC_GLOBALS = [(DCP_MD, "_MEM_FORMAT_ENCODING"), (SHARD_MD, "MEM_FORMAT_ENCODING"),
                ("torch.serialization", "_get_layout")]


def allowed_form_payloads():
    """The same code-running forms against allow-listed globals, with odd arguments.

    Calling an allowed global is legitimate (torch's own stream calls
    torch.Size and _get_layout), so the load may succeed or be refused; it
    must still never crash, escape or poison.
    """
    out = []
    arg_sets = {"noargs": (), "str": ("x",), "three": (1, "b", None), "dict": ({"fqn": "a"},)}
    for module, name in ALLOWED_GLOBALS:
        for kind in ("reduce", "inst", "obj", "newobj", "newobj_ex", "setitems", "appends", "additems"):
            for an, args in arg_sets.items():
                f = form(kind, module, name, args, 4)
                out.append((f"allowed-{kind}-{an}-{_gname(module, name)}-in-planner",
                            at("planner_value", f), "any"))
            out.append((f"allowed-{kind}-{_gname(module, name)}-top",
                        header(2) + form(kind, module, name, ("x",), 2) + P.STOP, "refuse"))
    # NEWOBJ_EX with keyword arguments on the dataclasses.
    for module, name in CLASS_GLOBALS:
        f = frag(G(module, name)) + frag(()) + frag({"fqn": "a", "offset": (1,)}) + P.NEWOBJ_EX
        out.append((f"allowed-newobj_ex-kwargs-{_gname(module, name)}", at("planner_value", f), "any"))
    # REDUCE on the Metadata class itself with a valid-looking argument: a Metadata that ran __init__.
    out.append(("allowed-reduce-metadata-init",
                header(2) + call(glob(DCP_MD, "Metadata"), frag({})) + P.STOP, "any"))
    return out


def ext_persid_payloads():
    """EXT1/EXT2/EXT4 (nothing registered) and PERSID/BINPERSID: always refused."""
    out = []
    exts = {
        "ext1-1": P.EXT1 + b"\x01", "ext1-255": P.EXT1 + b"\xff", "ext1-0": P.EXT1 + b"\x00",
        "ext2-1": P.EXT2 + b"\x01\x00", "ext2-65535": P.EXT2 + b"\xff\xff",
        "ext4-1": P.EXT4 + struct.pack("<i", 1), "ext4-max": P.EXT4 + struct.pack("<i", 2**31 - 1),
        "ext4-neg": P.EXT4 + struct.pack("<i", -1), "ext4-0": P.EXT4 + struct.pack("<i", 0),
        "persid-text": P.PERSID + b"os.system\n", "persid-empty": P.PERSID + b"\n",
        "persid-nonascii": P.PERSID + b"\xff\xfe\n",
        "binpersid-str": frag("pid") + P.BINPERSID,
        "binpersid-tuple": frag(("storage", "os", "system", 0, "cpu", 4)) + P.BINPERSID,
        "binpersid-global": glob("os", "system") + P.BINPERSID,
        "next_buffer": P.NEXT_BUFFER,
        "readonly_buffer": frag(b"abc") + P.READONLY_BUFFER,
    }
    for n, f in exts.items():
        exp = "unsafe" if n == "binpersid-global" else "any" if n == "readonly_buffer" else "refuse"
        for proto in (2, 4, 5):
            out.append((f"{n}-p{proto}", header(proto) + f + P.STOP, exp))
        out.append((f"{n}-in-planner", at("planner_value", f), exp))
        out.append((f"{n}-as-fqn", at("fqn", f), exp))
    for n, f in (("ext1", P.EXT1 + b"\x01"), ("ext2", P.EXT2 + b"\x01\x00"), ("ext4", P.EXT4 + b"\x01\x00\x00\x00")):
        out.append((f"{n}-then-reduce", header(2) + f + frag((SH,), 2) + P.REDUCE + P.STOP, "refuse"))
    return out


def protocol_payloads():
    """The sample at protocols 0-5 (header and text forms), framed and not, and odd PROTO opcodes."""
    out = []
    for proto in range(6):
        exp = "ok:sample" if proto >= 2 else "any:sample"
        out.append((f"proto{proto}-sample", sample_stream(proto), exp))
        out.append((f"proto{proto}-sample-nomemo", sample_stream(proto, memo=False), exp))
        if proto >= 4:
            out.append((f"proto{proto}-sample-framed", sample_stream(proto, frame=True), exp))
    body4 = sample_stream(4)[2:]
    for v in (0, 1, 6, 7, 255):
        exp = "refuse" if v > P.HIGHEST_PROTOCOL else "any:sample"
        out.append((f"proto-header-{v}", P.PROTO + bytes([v]) + body4, exp))
    out.append(("proto-twice", P.PROTO + b"\x02" + P.PROTO + b"\x04" + body4, "any:sample"))
    out.append(("proto-midstream", P.PROTO + b"\x04" + P.PROTO + b"\x05" + body4, "any:sample"))
    out.append(("proto-after-object", sample_stream(4)[:-1] + P.PROTO + b"\x09" + P.STOP, "refuse"))
    out.append(("frame-split-opcode", P.PROTO + b"\x04" + P.FRAME + struct.pack("<Q", 3) + body4, "refuse"))
    out.append(("frame-zero", P.PROTO + b"\x04" + P.FRAME + struct.pack("<Q", 0) + body4, "any:sample"))
    out.append(("two-stops", sample_stream(4) + P.STOP, "any:sample"))
    out.append(("trailing-junk", sample_stream(4) + b"\x00" * 64 + glob("os", "system"), "any:sample"))
    out.append(("stack-leftover", sample_stream(4, prefix=frag("junk")), "any:sample"))
    out.append(("mark-leftover", sample_stream(4, prefix=P.MARK), "any:sample"))
    out.append(("empty", b"", "refuse"))
    out.append(("stop-only", P.STOP, "refuse"))
    out.append(("none-only", P.PROTO + b"\x04" + P.NONE + P.STOP, "refuse"))
    out.append(("pop-empty", P.PROTO + b"\x04" + P.POP + P.STOP, "refuse"))
    out.append(("pop-mark-empty", P.PROTO + b"\x04" + P.POP_MARK + P.STOP, "refuse"))
    out.append(("dup-empty", P.PROTO + b"\x04" + P.DUP + P.STOP, "refuse"))
    out.append(("unknown-opcode", P.PROTO + b"\x04" + b"\xff" + P.STOP, "refuse"))
    return out


def opcode_payloads():
    return forbidden_payloads() + allowed_form_payloads() + ext_persid_payloads() + protocol_payloads()


# ==========================================================================
# 2. Poisoning: BUILD on allow-listed classes, functions and odd instances.
# ==========================================================================

_T = G("builtins", "tuple")
_GENERIC_ATTRS = {
    "__init__": _T, "__eq__": _T, "__hash__": None, "__repr__": _T, "__setstate__": _T,
    "__reduce_ex__": None, "__new__": _T, "__getattr__": _T, "__dataclass_fields__": {},
    "__module__": "evil", "ckcore_hostile": 1,
}
_CLASS_ATTRS = {
    (FS, "_StorageInfo"): {"transform_descriptors": ["zstd/1"], "offset": 7},
    (DCP_MD, "MetadataIndex"): {"offset": (1, 2), "index": 7, "fqn": "evil"},
    (DCP_MD, "TensorProperties"): {"dtype": "int8", "__class__": _T},
    (SHARD_MD, "TensorProperties"): {"layout": "sparse_coo"},
    (DCP_MD, "Metadata"): {"planner_data": {"evil": 1}, "version": "9", "storage_data": {}},
    (DCP_MD, "StorageMeta"): {"checkpoint_id": "/etc", "load_id": "evil"},
    (DCP_MD, "ChunkStorageMetadata"): {"__match_args__": ()},
    ("pathlib", "PurePosixPath"): {"_str": "/attacker", "_flavour": None, "__truediv__": _T,
                                   "__str__": _T, "__fspath__": _T},
    ("pathlib", "PosixPath"): {"_str": "/attacker", "_flavour": None},
    ("pathlib", "PureWindowsPath"): {"_str": "c:/attacker"},
    ("pathlib", "WindowsPath"): {"_str": "c:/attacker"},
}
_FUNC_ATTRS = {
    "__defaults__": (1,), "__kwdefaults__": {"x": 1}, "__dict__": {"evil": 1}, "__code__": _T,
    "__name__": "evil", "__qualname__": "evil", "__module__": "evil", "__doc__": "evil",
    "__annotations__": {}, "__wrapped__": _T, "ckcore_hostile": 1,
}


def _on_global(module: str, name: str, state):
    """A maker: ``proto`` -> fragment that BUILDs ``state`` on the global itself."""
    return lambda proto: frag(G(module, name), proto) + frag(state, proto) + P.BUILD


#: What BUILD on an allow-listed global itself (a class, a function, a dtype
#: name) must raise. The contract: UnsafeCheckpointError for "opcodes that
#: could run code or mutate objects", even where the target happens to be
#: immutable (tuple, OrderedDict) and today's refusal is a plain TypeError.
BUILD_ON_GLOBAL = "unsafe"


def poison_payloads():
    """BUILD on each allow-listed class and function: slot state, dict state, in valid streams."""
    out = []

    def add(name, make, exp=BUILD_ON_GLOBAL, standalone=False):
        # ``make(proto)`` is the poisoning fragment. The worst case first: an
        # otherwise valid stream that poisons and then loads.
        out.append((f"{name}-prefix", sample_stream(4, prefix=make(4) + P.POP), exp))
        out.append((f"{name}-in-planner", at("planner_value", make(4)), exp))
        if standalone:
            out.append((f"{name}-alone", header(4) + make(4) + P.STOP, exp))
            out.append((f"{name}-prefix-p2", sample_stream(2, prefix=make(2) + P.POP), exp))
            out.append((f"{name}-alone-p0", make(0) + P.STOP, exp))

    for module, name in CLASS_GLOBALS:
        attrs = {**_GENERIC_ATTRS, **_CLASS_ATTRS.get((module, name), {})}
        for attr, value in attrs.items():
            add(f"poison-slot-{_gname(module, name)}-{attr}",
                _on_global(module, name, (None, {attr: value})),
                standalone=attr in ("__init__", "_str", "transform_descriptors"))
        for attr in ("__init__", "ckcore_hostile"):
            add(f"poison-dict-{_gname(module, name)}-{attr}", _on_global(module, name, {attr: _T}))
        add(f"poison-both-{_gname(module, name)}",
            _on_global(module, name, ({"a": 1}, {"ckcore_hostile": 1})))
    for module, name in FUNC_GLOBALS:
        for attr, value in _FUNC_ATTRS.items():
            add(f"poison-slot-{_gname(module, name)}-{attr}",
                _on_global(module, name, (None, {attr: value})), standalone=attr == "__defaults__")
        add(f"poison-dict-{_gname(module, name)}",
            _on_global(module, name, {"ckcore_hostile": 1}), standalone=True)
        add(f"poison-dict-{_gname(module, name)}-wrapped", _on_global(module, name, {"__wrapped__": _T}))
    for module, name in (("torch", "bfloat16"), ("torch", "strided"), ("torch._utils", "torch.channels_last")):
        add(f"poison-slot-{_gname(module, name)}", _on_global(module, name, (None, {"x": 1})))
    # The same global BUILT through a memo GET (the pre-scan cannot just look
    # at the opcode after GLOBAL) and through STACK_GLOBAL after a MEMOIZE.

    def via_memo(module, name, state):
        return lambda p: (frag(G(module, name), p) + put_op(FRAG_MEMO, p) + P.POP
                          + get_op(FRAG_MEMO, p) + frag(state, p) + P.BUILD)

    # The fragment memoizes at a fixed, sparse index: the scan refuses that
    # (as damage) before the BUILD, so any refusal is the right outcome.
    add("poison-via-memo-PurePosixPath-_str",
        via_memo("pathlib", "PurePosixPath", (None, {"_str": "/attacker"})), exp="refuse",
        standalone=True)
    add("poison-via-memo-StorageInfo-defaults",
        via_memo(FS, "_StorageInfo", (None, {"transform_descriptors": ["zstd/1"]})), exp="refuse")
    add("poison-via-dup-MetadataIndex-hash",
        lambda p: frag(G(DCP_MD, "MetadataIndex"), p) + P.DUP + P.POP
        + frag((None, {"__hash__": None}), p) + P.BUILD)
    out += instance_poison_payloads()
    return out


def _instance_sample(target: str, extra_state, *, again: bool = True) -> bytes:
    """The sample with one instance of ``target`` BUILT a second time with ``extra_state``."""
    md = sample_metadata()
    sdm = md.state_dict_metadata
    w = sdm["layer0.weight"]
    if target == "Metadata":
        return dumps(Again(md, extra_state))
    if target == "TensorStorageMetadata":
        sdm["layer0.weight"] = Again(w, extra_state)
    elif target == "ChunkStorageMetadata":
        w.chunks[0] = Again(w.chunks[0], extra_state)
    elif target == "TensorProperties":
        w.properties = Again(w.properties, extra_state)
    elif target == "StorageInfo":
        key = MetadataIndex("step")
        md.storage_data[key] = Again(md.storage_data[key], extra_state)
    elif target == "StorageMeta":
        md.storage_meta = Again(md.storage_meta, extra_state)
    elif target == "MetadataIndex":
        # Mutate a key after it was inserted into storage_data: label it, then BUILD it at the end.
        sd = md.storage_data
        md.storage_data = {Label(k, f"k{i}") if i == 0 else k: v for i, (k, v) in enumerate(sd.items())}
        e = Emitter(4)
        body = e.body(md)
        suffix = get_op(e.labels["k0"]) + frag(extra_state) + P.BUILD + P.POP
        return header(4) + body + suffix + P.STOP
    elif target == "BytesStorageMetadata":
        sdm["step"] = Again(sdm["step"], extra_state)
    else:
        raise KeyError(target)
    return dumps(md)


def instance_poison_payloads():
    """BUILD twice, BUILD with unexpected keys, ``__class__`` swaps, BUILD on builtin instances."""
    out = []
    targets = ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
               "StorageInfo", "StorageMeta", "MetadataIndex", "BytesStorageMetadata")
    dunder = {
        "__class__": G(FS, "_StorageInfo"), "__dict__": {}, "__reduce_ex__": _T,
        "__setstate__": _T, "__weakref__": None, "__eq__": _T, "__hash__": None,
        "__dataclass_fields__": {},
    }
    for t in targets:
        for k, v in dunder.items():
            out.append((f"instance-twice-dict-{t}-{k}", _instance_sample(t, {k: v}), "refuse"))
            out.append((f"instance-twice-slot-{t}-{k}", _instance_sample(t, (None, {k: v})), "refuse"))
        out.append((f"instance-twice-same-fields-{t}", _instance_sample(t, {"fqn": "evil", "version": "2"}),
                    "refuse"))
        # An unknown plain field: a future torch may add fields, so only "no harm" is required.
        out.append((f"instance-unknown-key-{t}", _instance_sample(t, {"ckcore_hostile": 1}), "any"))
    # A second BUILD that sets __setstate__, then a third BUILD that would call it.
    md = sample_metadata()
    out.append(("instance-setstate-then-build",
                dumps(Again(Again(md, {"__setstate__": _T}), {"x": 1})), "refuse"))
    # An instance of one allowed class turned into another by a __class__ slot state,
    # then filled as a valid Metadata (the stream never names Metadata).
    sm_first = frag(G(FS, "_StorageInfo")) + P.EMPTY_TUPLE + P.NEWOBJ
    sm_first += frag((None, {"__class__": G(DCP_MD, "Metadata")})) + P.BUILD
    state = _metadata_state_fragment()
    out.append(("instance-class-swap-to-Metadata", header(4) + sm_first + state + P.BUILD + P.STOP, "refuse"))
    for t, cls in (("Chunk-to-TensorStorageMetadata", (DCP_MD, "TensorStorageMetadata")),
                   ("TensorProperties-to-Metadata", (DCP_MD, "Metadata")),
                   ("StorageInfo-to-MetadataIndex", (DCP_MD, "MetadataIndex"))):
        src = {"Chunk": "ChunkStorageMetadata", "TensorProperties": "TensorProperties",
               "StorageInfo": "StorageInfo"}[t.split("-")[0]]
        out.append((f"instance-class-swap-{t}", _instance_sample(src, (None, {"__class__": G(*cls)})),
                    "refuse"))
    # BUILD on instances of builtin and path types (torch never does).
    builtin_objs = {
        "list": frag([1]), "dict": frag({"a": 1}), "OrderedDict": frag(OrderedDict(a=1)),
        "set": frag({1}), "frozenset": frag(frozenset({1})), "tuple": frag((1, 2)), "str": frag("s"),
        "int": frag(5), "complex": call(glob("builtins", "complex"), frag(1), frag(2)),
        "PurePosixPath": call(glob("pathlib", "PurePosixPath"), frag("/a")),
        "PosixPath": call(glob("pathlib", "PosixPath"), frag("/a")),
        "torch.Size": call(glob("torch", "Size"), frag((1, 2))),
    }
    states = {"dict": {"x": 1}, "slot": (None, {"x": 1}), "class": (None, {"__class__": G("builtins", "dict")}),
              "_str": (None, {"_str": "/attacker"})}
    for on, f in builtin_objs.items():
        for sn, st in states.items():
            if sn == "_str" and "Path" not in on:
                continue
            out.append((f"instance-build-on-{on}-{sn}", at("planner_value", f + frag(st) + P.BUILD), "refuse"))
    out.append(("instance-build-checkpoint-id-_str",
                at("checkpoint_id", builtin_objs["PosixPath"] + frag((None, {"_str": "/etc"})) + P.BUILD),
                "refuse"))
    out.append(("instance-newobj-path-then-slots",
                at("checkpoint_id", frag(G("pathlib", "PosixPath")) + P.EMPTY_TUPLE + P.NEWOBJ
                   + frag((None, {"_str": "/etc", "_drv": "", "_root": "/", "_parts": ["/", "etc"]}))
                   + P.BUILD), "refuse"))
    return out


def _metadata_state_fragment() -> bytes:
    """The dict state of the sample's Metadata (what follows NEWOBJ in its stream)."""
    md = sample_metadata()
    return frag({k: v for k, v in vars(md).items()})


# ==========================================================================
# 3. Deep nesting; 4. shared-structure bombs.
# ==========================================================================

NEST_KINDS = ("tuple", "list", "dict", "frozenset")
NEST_DEPTHS = (10**3, 10**5, 10**6)
NEST_POSITIONS = ("dtype", "memfmt", "layout", "size", "offsets", "fqn", "dict_key", "set_elem",
                  "planner_value")


def nested(kind: str, depth: int, leaf: bytes = P.BININT1 + b"\x01") -> bytes:
    """``depth`` levels of ``kind`` around ``leaf``, built without recursion (O(depth) opcodes)."""
    if kind == "tuple":
        return leaf + P.TUPLE1 * depth
    if kind == "list":
        return P.MARK * depth + leaf + P.LIST * depth
    if kind == "dict":
        return (P.MARK + P.BININT1 + b"\x01") * depth + leaf + P.DICT * depth
    if kind == "frozenset":
        return P.MARK * depth + leaf + P.FROZENSET * depth
    raise KeyError(kind)


def nesting_payload(kind: str, depth: int, position: str):
    return (f"nest-{kind}-{depth:.0e}-{position}".replace("+0", ""), at(position, nested(kind, depth)),
            POSITIONS[position])


def nesting_payloads(depths=NEST_DEPTHS):
    for depth in depths:
        for kind in NEST_KINDS:
            for position in NEST_POSITIONS:
                yield nesting_payload(kind, depth, position)


def bomb(kind: str, levels: int, base: int = FRAG_MEMO) -> bytes:
    """Each level holds the previous one twice (memo GET): 2**levels leaves in O(levels) bytes."""
    leaf = frag("ab")
    f = leaf + put_op(base) + P.POP
    for i in range(1, levels + 1):
        prev = get_op(base + i - 1)
        if kind == "list":
            f += P.MARK + prev + prev + P.LIST
        elif kind == "tuple":
            f += prev + prev + P.TUPLE2
        elif kind == "dict":
            f += P.MARK + frag(1) + prev + frag(2) + prev + P.DICT
        elif kind == "frozenset_tuple":  # a frozenset of a tuple bomb: hashing walks every leaf
            f += prev + prev + P.TUPLE2
        else:
            raise KeyError(kind)
        f += put_op(base + i) + P.POP
    f += get_op(base + levels)
    if kind == "frozenset_tuple":
        f = P.MARK + f + P.FROZENSET
    return f


BOMB_KINDS = ("list", "tuple", "dict")
#: Positions where an error message describes the value (lists, dicts and tuples alike)...
BOMB_REPR_POSITIONS = ("tp_state", "size", "offsets", "layout", "chunks", "sd_value", "version", "top")
#: ... and where it is hashed (only tuples are hashable).
BOMB_HASH_POSITIONS = ("dtype", "memfmt", "fqn", "sd_key", "dict_key")


def bomb_payloads():
    out = []

    def add(kind, levels, position):
        f = bomb(kind, levels)
        if position == "tp_state":
            f = P.MARK + f + f + frag(False) + f + frag(False) + P.TUPLE  # a 5-tuple of bombs
        # torch.Size(a dict) is the tuple of its keys: a valid size, so may load.
        exp = "any" if kind == "dict" and position in ("size", "offsets") else POSITIONS[position]
        out.append((f"bomb-{kind}-{levels}-{position}", at(position, f), exp))

    for position in BOMB_REPR_POSITIONS:
        for kind in BOMB_KINDS:
            if kind == "dict" and position in ("layout", "version", "tp_state"):
                continue  # the same message path as the list and tuple bombs there
            add(kind, 64, position)
    for position in BOMB_HASH_POSITIONS:
        add("tuple", 64, position)
    add("list", 64, "planner_value")
    add("dict", 64, "dict_key")
    for position in ("size", "fqn"):  # small enough to finish even when walked in full
        add("tuple", 20, position)
    # In the places only error messages look at: a persistent id, a global's module name.
    for kind in ("list", "tuple"):
        b = bomb(kind, 64)
        out.append((f"bomb-{kind}-binpersid", header(4) + b + P.BINPERSID + P.STOP, "refuse"))
        out.append((f"bomb-{kind}-stack-global-module", header(4) + b + frag("x") + P.STACK_GLOBAL + P.STOP,
                    "refuse"))
        out.append((f"bomb-{kind}-reduce-args", header(4) + glob(DCP_MD, "_MEM_FORMAT_ENCODING")
                    + b + P.TUPLE1 + P.REDUCE + P.STOP, "refuse"))
        out.append((f"bomb-{kind}-get-layout", header(4) + glob("torch.serialization", "_get_layout")
                    + b + P.TUPLE1 + P.REDUCE + P.STOP, "refuse"))
        out.append((f"bomb-{kind}-build-state", at("chunks", P.EMPTY_LIST + P.MARK + frag(
            G(DCP_MD, "ChunkStorageMetadata")) + P.EMPTY_TUPLE + P.NEWOBJ + b + P.BUILD + P.APPENDS),
            "refuse"))
    out.append(("bomb-frozenset-of-tuple-planner", at("planner_value", bomb("frozenset_tuple", 64)), "any"))
    return out


# ==========================================================================
# 5. Huge declared lengths; 6. memo abuse.
# ==========================================================================

LENGTHS = (2**63 - 1, 2**63, 2**64 - 1, 2**32, 2**32 - 1, 2**31, 2**31 - 1, 2**30, 2**28 + 3)


def length_payloads():
    out = []
    tail = b"x" * 16
    for n in LENGTHS:
        ops = {
            "BINUNICODE8": P.BINUNICODE8 + struct.pack("<Q", n),
            "BINBYTES8": P.BINBYTES8 + struct.pack("<Q", n),
            "BYTEARRAY8": P.BYTEARRAY8 + struct.pack("<Q", n),
            "FRAME": P.FRAME + struct.pack("<Q", n),
        }
        if n < 2**32:
            ops.update({
                "BINUNICODE": P.BINUNICODE + struct.pack("<I", n),
                "BINBYTES": P.BINBYTES + struct.pack("<I", n),
                "BINSTRING": P.BINSTRING + struct.pack("<I", n),
                "LONG4": P.LONG4 + struct.pack("<I", n),
            })
        for op, f in ops.items():
            out.append((f"len-{op}-{n}-top", header(5) + f + tail + P.STOP, "refuse"))
            if op != "FRAME":
                out.append((f"len-{op}-{n}-as-version", at("version", f + tail), "refuse"))
            else:
                out.append((f"len-{op}-{n}-midstream", sample_stream(4, prefix=f + tail), "refuse"))
    for op, f in (("BINSTRING-neg", P.BINSTRING + struct.pack("<i", -1)),
                  ("LONG4-neg", P.LONG4 + struct.pack("<i", -1)),
                  ("LONG4-min", P.LONG4 + struct.pack("<i", -(2**31))),
                  ("SHORT_BINSTRING-255", P.SHORT_BINSTRING + b"\xff"),
                  ("SHORT_BINUNICODE-255", P.SHORT_BINUNICODE + b"\xff"),
                  ("SHORT_BINBYTES-255", P.SHORT_BINBYTES + b"\xff"),
                  ("LONG1-255", P.LONG1 + b"\xff")):
        out.append((f"len-{op}-top", header(5) + f + tail + P.STOP, "refuse"))
    # A frame that claims more than the file holds, around a valid body.
    body = sample_stream(4)[2:]
    out.append(("len-FRAME-over-body", P.PROTO + b"\x04" + P.FRAME + struct.pack("<Q", len(body) + 100) + body,
                "refuse"))
    # Large but real: a 64 MiB BINBYTES8 value in planner_data (bounded by the file's size).
    return out


def memo_payloads():
    out = []
    obj = frag("v")
    for idx in (2**32 - 1, 2**31, 2**31 - 1, 2**30, 2**27, 2**24, 10**6):
        put = P.LONG_BINPUT + struct.pack("<I", idx)
        out.append((f"memo-LONG_BINPUT-{idx}-top", header(4) + obj + put + P.STOP, "refuse"))
        out.append((f"memo-LONG_BINPUT-{idx}-in-planner", at("planner_value", obj + put), "any"))
        out.append((f"memo-LONG_BINGET-{idx}-unset", at("planner_value", P.LONG_BINGET + struct.pack("<I", idx)),
                    "refuse"))
    for text in (b"99999999999999999999999", b"-1", b"1e9", b"0x10", b" 9999", b"", b"\xd9\xa3", b"1" * 5000,
                 b"4294967295", b"2147483648"):
        out.append((f"memo-PUT-text-{text[:24]!r}", at("planner_value", obj + P.PUT + text + b"\n"), "any"))
        out.append((f"memo-GET-text-{text[:24]!r}", at("planner_value", P.GET + text + b"\n"), "refuse"))
    for idx in (0, 1, 255):
        out.append((f"memo-BINGET-{idx}-unset", header(4) + P.BINGET + bytes([idx]) + P.STOP, "refuse"))
    out.append(("memo-memoize-empty-stack", header(4) + P.MEMOIZE + frag("x") + P.STOP, "refuse"))
    out.append(("memo-put-empty-stack", header(2) + P.BINPUT + b"\x00" + frag("x", 2) + P.STOP, "refuse"))
    out.append(("memo-memoize-after-mark", header(4) + P.MARK + P.MEMOIZE + P.POP_MARK + P.STOP, "refuse"))
    out.append(("memo-memoize-flood-top", header(4) + obj + P.MEMOIZE * 10**6 + P.STOP, "refuse"))
    out.append(("memo-memoize-flood-in-planner", at("planner_value", obj + P.MEMOIZE * 10**6), "any"))
    out.append(("memo-get-flood-in-planner",
                at("planner_value", obj + put_op(FRAG_MEMO) + P.MARK + get_op(FRAG_MEMO) * 200_000 + P.LIST),
                "any"))
    # Overwriting memo entries the stream itself set: a later GET sees another object.
    md_stream = sample_stream(4, memo=True)
    for idx in (0, 1, 2):
        out.append((f"memo-overwrite-global-{idx}",
                    md_stream[:2] + frag("evil") + put_op(idx) + P.POP + md_stream[2:], "any:sample"))
    # A GET of the object being built (a cycle): Metadata containing itself.
    e = Emitter(4)
    md = sample_metadata()
    md.planner_data["self"] = Raw(get_op(FRAG_MEMO))
    body = frag(G(DCP_MD, "Metadata")) + P.EMPTY_TUPLE + P.NEWOBJ + put_op(FRAG_MEMO)
    body += e.body({k: v for k, v in vars(md).items()}) + P.BUILD
    out.append(("memo-cycle-metadata-in-planner", header(4) + body + P.STOP, "any"))
    tp = (frag(G(DCP_MD, "TensorProperties")) + P.EMPTY_TUPLE + P.NEWOBJ + put_op(FRAG_MEMO)
          + P.MARK + get_op(FRAG_MEMO) + frag("strided") + frag(False) + frag("contiguous_format")
          + frag(False) + P.TUPLE + P.BUILD)
    out.append(("memo-cycle-tensor-properties", _replace_properties(tp), "refuse"))
    lst = P.EMPTY_LIST + put_op(FRAG_MEMO) + P.MARK + get_op(FRAG_MEMO) + P.APPENDS
    for pos in ("size", "fqn", "dtype", "planner_value", "version"):
        out.append((f"memo-cycle-list-{pos}", at(pos, lst), POSITIONS[pos]))
    return out


def _replace_properties(tp_fragment: bytes) -> bytes:
    md = sample_metadata()
    md.state_dict_metadata["layer0.weight"].properties = Raw(tp_fragment)
    return dumps(md)


# ==========================================================================
# 7. Truncations, bit flips, big text numbers.
# ==========================================================================


def truncation_payloads(name: str = "dcp_small"):
    data = fixture_bytes(name)
    return [(f"trunc-{name}-{n}", data[:n], "refuse") for n in range(len(data))]


def bitflip_payloads(n: int = 300, seed: int = 20250610):
    rnd = random.Random(seed)
    out = []
    interesting = [P.REDUCE, P.BUILD, P.GLOBAL, P.STACK_GLOBAL, P.INST, P.OBJ, P.NEWOBJ, P.NEWOBJ_EX,
                   P.EXT1, P.PERSID, P.BINPERSID, P.MARK, P.POP, P.DUP, P.SETITEMS, P.APPENDS, P.TUPLE,
                   P.FROZENSET, P.MEMOIZE, P.LONG_BINPUT, P.LONG_BINGET, P.FRAME, P.BINUNICODE8, b"\xff"]
    for name in ("dcp_small", "dcp_sharded"):
        data = fixture_bytes(name)
        for i in range(n // 2):
            b = bytearray(data)
            how = rnd.choice(("flip", "byte", "opcode", "two"))
            pos = rnd.randrange(len(b))
            if how == "flip":
                b[pos] ^= 1 << rnd.randrange(8)
            elif how == "byte":
                b[pos] = rnd.randrange(256)
            elif how == "opcode":
                b[pos] = rnd.choice(interesting)[0]
            else:
                b[pos] ^= 1 << rnd.randrange(8)
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            out.append((f"flip-{name}-{i}-{how}-{pos}", bytes(b), "any"))
    return out


def bignum_payloads():
    out = []
    for digits in (4300, 4301, 10**5, 10**6):
        d = b"9" * digits
        for op, f in (("INT", P.INT + d + b"\n"), ("LONG", P.LONG + d + b"L\n"),
                      ("INT-neg", P.INT + b"-" + d + b"\n"), ("FLOAT", P.FLOAT + d + b"\n")):
            out.append((f"bignum-{op}-{digits}-top", f + P.STOP, "refuse"))
            out.append((f"bignum-{op}-{digits}-size", at("size", P.MARK + f + P.TUPLE), "refuse"))
            out.append((f"bignum-{op}-{digits}-planner", at("planner_value", f), "any"))
    # Binary big ints: cheap to build, a million digits to print.
    big = 10**20000
    for pos in ("size", "offsets", "memfmt", "planner_value", "sd_value", "fqn"):
        out.append((f"bignum-LONG4-{pos}", at(pos, P.MARK + int_op(big) + P.TUPLE if pos in ("size", "offsets")
                                             else int_op(big)), POSITIONS[pos]))
    big_bin = P.LONG4 + struct.pack("<i", 4 * 10**6) + b"\x7f" * (4 * 10**6)
    out.append(("bignum-LONG4-4MB-offsets", at("offsets", P.MARK + big_bin + P.TUPLE), "refuse"))
    for text in (b"nan", b"inf", b"-inf", b"1e999999", b"0x1p3", b"1_0"):
        out.append((f"float-{text.decode()}-size", at("size", P.MARK + P.FLOAT + text + b"\n" + P.TUPLE),
                    "refuse"))
    return out


def corruption_payloads():
    return truncation_payloads() + bitflip_payloads() + bignum_payloads()


# ==========================================================================
# 8. Special files.
# ==========================================================================

#: A size certainly above any sane default cap of a .metadata file.
SPARSE_SIZE = 8 << 30


def special_file_tasks(tmp: Path):
    """(name, path, mode, expected) for special files as a checkpoint's ``.metadata``.

    Every one must be refused (CheckpointError) quickly: see ``_runner.QUICK``.
    """
    tmp = Path(tmp)
    out = []

    def ckdir(name: str) -> Path:
        d = tmp / name
        d.mkdir()
        return d

    for name, target in (("dev-zero", "/dev/zero"), ("dev-urandom", "/dev/urandom"),
                         ("dev-null", "/dev/null"), ("dangling", str(tmp / "nowhere"))):
        if name.startswith("dev") and not os.path.exists(target):
            continue
        d = ckdir(name)
        (d / ".metadata").symlink_to(target)
        out.append((f"special-{name}-dir-load", str(d), "load", "refuse"))
        out.append((f"special-{name}-file-load", str(d / ".metadata"), "load", "refuse"))
        out.append((f"special-{name}-checkpoint", str(d), "checkpoint", "refuse"))
    d = ckdir("loop")
    (d / ".metadata").symlink_to(d / ".metadata")
    out.append(("special-symlink-loop-load", str(d), "load", "refuse"))
    d = ckdir("fifo")
    os.mkfifo(d / ".metadata")
    out.append(("special-fifo-dir-load", str(d), "load", "refuse"))
    out.append(("special-fifo-file-load", str(d / ".metadata"), "load", "refuse"))
    out.append(("special-fifo-checkpoint", str(d), "checkpoint", "refuse"))
    d = ckdir("dirmeta")
    (d / ".metadata").mkdir()
    out.append(("special-metadata-is-dir-load", str(d), "load", "refuse"))
    out.append(("special-metadata-is-dir-checkpoint", str(d), "checkpoint", "refuse"))
    out.append(("special-metadata-is-dir-file-load", str(d / ".metadata"), "load", "refuse"))
    d = ckdir("sparse")
    with open(d / ".metadata", "wb") as f:
        f.write(fixture_bytes())  # a real stream at the start, then 8 GiB of holes
    os.truncate(d / ".metadata", SPARSE_SIZE)
    out.append(("special-sparse-8GiB-dir-load", str(d), "load", "refuse"))
    out.append(("special-sparse-8GiB-file-load", str(d / ".metadata"), "load", "refuse"))
    out.append(("special-sparse-8GiB-checkpoint", str(d), "checkpoint", "refuse"))
    d = ckdir("sparse-hole-first")
    with open(d / ".metadata", "wb") as f:
        f.truncate(SPARSE_SIZE)
    out.append(("special-sparse-8GiB-zeros-load", str(d), "load", "refuse"))
    return out


# ==========================================================================
# 9. Benign controls.
# ==========================================================================


def benign_payloads():
    """The real fixtures as written, and re-pickled torch-style at protocols 2-5."""
    out = []
    for name in ("dcp_small", "dcp_sharded"):
        out.append((f"benign-{name}-raw", fixture_bytes(name), f"ok:{name}"))
        md = _fixture_metadata(name)
        for proto in (2, 3, 4, 5):
            out.append((f"benign-{name}-p{proto}", dumps(md, proto), f"ok:{name}"))
            out.append((f"benign-{name}-p{proto}-nomemo", dumps(md, proto, memo=False), f"ok:{name}"))
            if proto >= 4:
                out.append((f"benign-{name}-p{proto}-framed", dumps(md, proto, frame=True), f"ok:{name}"))
    for proto in (2, 3, 4, 5):
        out.append((f"benign-sample-p{proto}", sample_stream(proto), "ok:sample"))
    return out


def _fixture_metadata(name: str) -> Metadata:
    """The fixture rebuilt as ckcore objects from the golden description (no loader involved)."""
    import json

    gold = json.loads((Path(__file__).resolve().parent / "golden.json").read_text())[name]
    return _uncanon(gold)


_CLASSES = {c.__name__: c for c in (Metadata, TensorStorageMetadata, ChunkStorageMetadata,
                                    BytesStorageMetadata, MetadataIndex, StorageMeta, StorageInfo,
                                    TensorProperties)}


def _uncanon(c):
    t, v = c
    if t in ("NoneType", "bool", "int", "str"):
        return v
    if t in ("tuple", "list"):
        return (tuple if t == "tuple" else list)(_uncanon(x) for x in v)
    if t in ("dict", "OrderedDict"):
        return (dict if t == "dict" else OrderedDict)((_uncanon(k), _uncanon(x)) for k, x in v)
    if t in ("PosixPath", "PurePosixPath"):
        return PosixPath(*v)
    if t in _CLASSES:
        obj = _CLASSES[t].__new__(_CLASSES[t])
        obj.__dict__.update({k: _uncanon(x) for k, x in v.items() if not k.startswith("<")})
        return obj
    raise TypeError(t)


# ==========================================================================
# Registry (the summary runs every class).
# ==========================================================================

BATCHED = {
    "opcodes": opcode_payloads,
    "poisoning": poison_payloads,
    "nesting": lambda: list(nesting_payloads((10**3, 10**5))),
    "bombs": bomb_payloads,
    "lengths": length_payloads,
    "memo": memo_payloads,
    "corruption": corruption_payloads,
    "benign": benign_payloads,
}
ISOLATED = {
    "nesting-1e6": lambda: list(nesting_payloads((10**6,))),
}


def grouped(triples, nparts: int = 2) -> dict[str, list]:
    """Triples grouped by the first ``nparts`` dash-separated parts of their names (one test each)."""
    out: dict[str, list] = {}
    for t in triples:
        out.setdefault("-".join(t[0].split("-")[:nparts]), []).append(t)
    return out


def representative(triples, nparts: int = 2) -> list:
    """The first payload of each group: a small cross-section for the slower entry points."""
    return [g[0] for g in grouped(triples, nparts).values()]
