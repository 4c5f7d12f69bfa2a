"""Torch-style ``.metadata`` streams crafted without torch, shared by the safe-reader tests.

ckcore's own dataclasses, pickled the way torch pickles its (TensorProperties
as a state tuple) and with the globals renamed to torch's module paths.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import pickletools
import struct
from pathlib import PosixPath

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


class _TorchStylePickler(pickle.Pickler):
    """Pickles ckcore objects the way torch pickles its own (TensorProperties as a state tuple)."""

    state_len = 5

    def reducer_override(self, obj):
        if type(obj) is TensorProperties:
            state = (obj.dtype, obj.layout, obj.requires_grad, obj.memory_format, obj.pin_memory)
            return (copyreg.__newobj__, (TensorProperties,), state[: self.state_len])
        return NotImplemented


_RENAMES = {
    "ckcore.metadata": "torch.distributed.checkpoint.metadata",
    "ckcore.checkpoint": "torch.distributed.checkpoint.filesystem",
    "StorageInfo": "_StorageInfo",
}


def _short_str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def torchify(obj, state_len: int = 5, protocol: int = 2) -> bytes:
    """A pickle of ckcore objects whose globals name torch's classes, as torch's files do."""
    buf = io.BytesIO()
    pickler = _TorchStylePickler(buf, protocol=protocol)
    pickler.state_len = state_len
    pickler.dump(obj)
    data = buf.getvalue()
    if protocol < 4:
        # Globals are text lines: renaming them is a replace.
        data = data.replace(b"cckcore.metadata\n", b"ctorch.distributed.checkpoint.metadata\n")
        data = data.replace(
            b"cckcore.checkpoint\nStorageInfo\n",
            b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n",
        )
    else:
        # Globals are length-prefixed strings: rewrite those ops, copy the rest
        # byte for byte (frames are optional and their lengths would change).
        ops = list(pickletools.genops(data))
        out = []
        for i, (op, arg, pos) in enumerate(ops):
            end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
            if op.name == "FRAME":
                continue
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and arg in _RENAMES:
                out.append(_short_str(_RENAMES[arg]))
            else:
                out.append(data[pos:end])
        data = b"".join(out)
    assert b"ckcore" not in data
    return data


def call_global(module: str, name: str, arg: object) -> bytes:
    """Protocol-2 stream: ``module.name(arg)`` via GLOBAL + REDUCE (arg: str or small int)."""
    if isinstance(arg, str):
        a = arg.encode()
        argop = b"X" + struct.pack("<I", len(a)) + a
    else:
        argop = b"K" + bytes([arg])
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + argop + b"\x85R."


def sample_metadata(n_tensors: int = 3, dtypes: tuple[str, ...] | None = None) -> Metadata:
    """A small well-formed ckcore Metadata with storage info, like a 2-rank save.

    ``n_tensors`` bfloat16 tensors, or one tensor per entry of ``dtypes``.
    """
    sdm: dict = {}
    sd: dict = {}
    for t, dtype in enumerate(dtypes or ("bfloat16",) * n_tensors):
        fqn = f"layer{t}.weight"
        chunks = [ChunkStorageMetadata((0, 0), (4, 8)), ChunkStorageMetadata((4, 0), (4, 8))]
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype), (8, 8), chunks)
        for i, c in enumerate(chunks):
            sd[MetadataIndex(fqn, c.offsets, i)] = StorageInfo(f"__{i}_0.distcp", 100 * t, 100)
    sdm["step"] = BytesStorageMetadata()
    sd[MetadataIndex("step")] = StorageInfo("__0_0.distcp", 1000, 10, ["zstd/1"])
    return Metadata(
        sdm,
        planner_data={k: tuple(k.split(".")) for k in sdm},
        storage_data=sd,
        storage_meta=StorageMeta(checkpoint_id=PosixPath("/ck"), save_id="s"),
        version="1.0.0",
    )
