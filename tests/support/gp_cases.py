"""Shared builders for the global-plan tests: the same layout as torch objects and ckcore objects.

A layout is plain data (tensor sizes, chunk boxes, per-rank items); these
helpers turn it into torch's dataclasses and ckcore's, so each differential
test feeds torch its own objects and ckcore both kinds.
"""

from __future__ import annotations

import re

import torch
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp

from ckcore import metadata as cm
from ckcore import planner as cp
from ckcore.global_plan import MetadataTypes

# ckcore's global plan building torch's own metadata classes.
TORCH_TYPES = MetadataTypes(tm.Metadata, tm.TensorStorageMetadata, tm.BytesStorageMetadata)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8,
                "float64": torch.float64, "complex64": torch.complex64}


def torch_md(tensors: dict) -> tm.Metadata:
    """tensors: fqn -> (size, [(offsets, sizes), ...]) or None for bytes."""
    sdm = {}
    for fqn, spec in tensors.items():
        if spec is None:
            sdm[fqn] = tm.BytesStorageMetadata()
            continue
        size, chunks = spec
        sdm[fqn] = tm.TensorStorageMetadata(
            tm.TensorProperties(dtype=torch.float32),
            torch.Size(size),
            [tm.ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks],
        )
    return tm.Metadata(sdm)


def ck_md(tensors: dict) -> cm.Metadata:
    sdm = {}
    for fqn, spec in tensors.items():
        if spec is None:
            sdm[fqn] = cm.BytesStorageMetadata()
            continue
        size, chunks = spec
        sdm[fqn] = cm.TensorStorageMetadata(
            cm.TensorProperties(dtype="float32"),
            tuple(size),
            [cm.ChunkStorageMetadata(tuple(o), tuple(s)) for o, s in chunks],
        )
    return cm.Metadata(sdm)


_SIZE_RE = re.compile(r"torch\.Size\(\[([^\]]*)\]\)")


def normalize(msg: str) -> str:
    """torch's repr of torch.Size -> the repr of the equal tuple (ckcore's objects)."""

    def sub(m: re.Match) -> str:
        inner = m.group(1)
        if not inner:
            return "()"
        return "(" + inner + ("," if "," not in inner else "") + ")"

    return _SIZE_RE.sub(sub, msg)


# ------------------------------------------------------------------ save plans
# An item spec: ("bytes", fqn) | ("tensor", fqn, size, dtype) (whole tensor)
#             | ("shard", fqn, size, dtype, offsets, sizes)


def torch_item(spec, hint=None) -> tp.WriteItem:
    kind = spec[0]
    if kind == "bytes":
        return tp.WriteItem(index=tm.MetadataIndex(spec[1]), type=tp.WriteItemType.BYTE_IO)
    fqn, size, dtype = spec[1], spec[2], spec[3]
    if kind == "tensor":
        offsets, sizes, typ = (0,) * len(size), size, tp.WriteItemType.TENSOR
    else:
        offsets, sizes, typ = spec[4], spec[5], tp.WriteItemType.SHARD
    return tp.WriteItem(
        index=tm.MetadataIndex(fqn, torch.Size(offsets), hint),
        type=typ,
        tensor_data=tp.TensorWriteData(
            chunk=tm.ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
            properties=tm.TensorProperties(dtype=TORCH_DTYPES[dtype]),
            size=torch.Size(size),
        ),
    )


def ck_item(spec, hint=None) -> cp.WriteItem:
    kind = spec[0]
    if kind == "bytes":
        return cp.WriteItem(index=cm.MetadataIndex(spec[1]), type=cp.WriteItemType.BYTE_IO)
    fqn, size, dtype = spec[1], spec[2], spec[3]
    if kind == "tensor":
        offsets, sizes, typ = (0,) * len(size), size, cp.WriteItemType.TENSOR
    else:
        offsets, sizes, typ = spec[4], spec[5], cp.WriteItemType.SHARD
    return cp.WriteItem(
        index=cm.MetadataIndex(fqn, tuple(offsets), hint),
        type=typ,
        tensor_data=cp.TensorWriteData(
            chunk=cm.ChunkStorageMetadata(tuple(offsets), tuple(sizes)),
            properties=cm.TensorProperties(dtype=dtype),
            size=tuple(size),
        ),
    )


def torch_plans(rank_specs) -> list:
    return [tp.SavePlan([torch_item(s) for s in specs]) for specs in rank_specs]


def ck_plans(rank_specs) -> list:
    return [cp.SavePlan([ck_item(s) for s in specs]) for specs in rank_specs]


def item_key(item):
    """Comparable view of a write item of either library (hint included)."""
    td = item.tensor_data
    dt = None
    if td is not None:
        dt = td.properties.dtype
        dt = dt if isinstance(dt, str) else str(dt).replace("torch.", "")
    return (
        item.index.fqn,
        None if item.index.offset is None else tuple(item.index.offset),
        item.index.index,
        item.type.name,
        None if td is None else (tuple(td.chunk.offsets), tuple(td.chunk.sizes), tuple(td.size), dt),
    )


def md_key(md):
    """Comparable view of Metadata of either library."""
    out = {}
    for fqn, v in md.state_dict_metadata.items():
        if not hasattr(v, "chunks"):
            out[fqn] = type(v).__name__
        else:
            dt = v.properties.dtype
            dt = dt if isinstance(dt, str) else str(dt).replace("torch.", "")
            out[fqn] = (dt, tuple(v.size), [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks])
    return out
