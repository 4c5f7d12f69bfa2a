"""Save and load a sharded DCP checkpoint as many ranks would, in one process.

Tests and the ``ranges`` benchmark need real ``FileSystemWriter`` checkpoints
of sharded layouts (FSDP-64, row shards, ...) without launching 64
processes. :func:`save_as_ranks` drives torch's own pieces exactly as
``dcp.save`` does per rank — local plans of ``SHARD`` write items, torch's
``create_default_global_save_plan``, ``FileSystemWriter.prepare_global_plan``,
``write_data`` per rank and ``finish`` — so the files and ``.metadata`` are
the ones a real run writes. :class:`BoxLoadPlanner` loads one box of each
tensor into a plain tensor, which is what one rank of another layout reads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _create_read_items,
    create_read_items_for_chunk_list,
)

from .layouts import chunk_cuts

__all__ = ["BoxLoadPlanner", "col_boxes", "grid_boxes", "row_boxes", "save_as_ranks"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def row_boxes(shape: Sequence[int], parts: int) -> list[Box]:
    """Boxes of ``Shard(0)`` over ``parts`` ranks."""
    return [((o,) + (0,) * (len(shape) - 1), (n,) + tuple(shape[1:])) for o, n in chunk_cuts(shape[0], parts)]


def col_boxes(shape: Sequence[int], parts: int) -> list[Box]:
    """Boxes of ``Shard(1)`` over ``parts`` ranks (2-d)."""
    return [((0, o), (shape[0], n)) for o, n in chunk_cuts(shape[1], parts)]


def grid_boxes(shape: Sequence[int], rows: int, cols: int) -> list[Box]:
    """Boxes of ``(Shard(0), Shard(1))`` on a rows x cols mesh, row-major rank order."""
    return [
        ((ro, co), (rn, cn)) for ro, rn in chunk_cuts(shape[0], rows) for co, cn in chunk_cuts(shape[1], cols)
    ]


class _ResolvePlanner:
    # The one planner method FileSystemWriter.write_data calls.
    def __init__(self, resolve: Callable[[WriteItem], Any]):
        self.resolve_data = resolve


def save_as_ranks(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[torch.Tensor, Sequence[Box]]],
    world_size: int,
    byte_items: Mapping[str, bytes] | None = None,
    layout: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    **writer_kwargs: Any,
) -> None:
    """Write a checkpoint as ``world_size`` ranks, rank r saving box r of each tensor.

    ``tensors[fqn] = (global_tensor, boxes)`` with one ``(offsets, sizes)`` box
    per rank (empty boxes are skipped). ``layout(fqn, shard)`` may return the
    shard in another memory layout (e.g. transposed storage) — torch.save keeps
    it. Byte items are saved by rank 0.
    """
    plans = []
    shards: dict[tuple[int, str], torch.Tensor] = {}
    for rank in range(world_size):
        items = []
        for fqn, (t, boxes) in tensors.items():
            offs, sizes = boxes[rank]
            if any(s == 0 for s in sizes):
                continue
            shard = t[tuple(slice(o, o + s) for o, s in zip(offs, sizes))]
            if layout is not None:
                shard = layout(fqn, shard)
            shards[(rank, fqn)] = shard
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn, torch.Size(offs)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)),
                        properties=TensorProperties.create_from_tensor(t),
                        size=t.size(),
                    ),
                )
            )
        if rank == 0:
            for fqn in byte_items or {}:
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
        plans.append(SavePlan(items))

    writer_kwargs.setdefault("sync_files", False)
    writer = FileSystemWriter(path, **writer_kwargs)
    writer.set_up_storage_writer(True)
    plans = [writer.prepare_local_plan(p) for p in plans]
    plans, metadata = create_default_global_save_plan(plans)
    plans = writer.prepare_global_plan(plans)
    results = []
    for rank, plan in enumerate(plans):

        def resolve(item: WriteItem, rank: int = rank) -> Any:
            if item.type == WriteItemType.BYTE_IO:
                return io.BytesIO((byte_items or {})[item.index.fqn])
            return shards[(rank, item.index.fqn)]

        # write_data only calls resolve_data: a stand-in, not a SavePlanner.
        planner = cast(SavePlanner, _ResolvePlanner(resolve))
        results.append(writer.write_data(plan, planner).wait())
    writer.finish(metadata, results)


class BoxLoadPlanner(DefaultLoadPlanner):
    """Loads box ``boxes[fqn] = (offsets, sizes)`` of each tensor into the plain tensor ``state_dict[fqn]``.

    Tensors without a box load whole (torch's default); byte items as usual.
    This is one rank of a different layout, without DTensor.
    """

    def __init__(self, boxes: Mapping[str, Box]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.boxes = dict(boxes)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None, "set_up_planner gives the metadata"
        items = []
        for fqn, obj in self.state_dict.items():
            md = self.metadata.state_dict_metadata[fqn]
            if fqn in self.boxes and isinstance(md, TensorStorageMetadata):
                offs, sizes = self.boxes[fqn]
                items += create_read_items_for_chunk_list(
                    fqn, md, [ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes))]
                )
            else:
                items += _create_read_items(fqn, md, obj)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]
