"""Review findings on whole-item reads (RangeFileSystemReader._read_whole, ranges.reads_whole).

* A whole-read item whose archive dtype differs from the metadata's loads as
  torch loads it (one conversion, archive -> target), also into a target of a
  third dtype, through the locator and through torch.load (conj bit).
* Metadata whose chunk byte math overflows int64 is reported as the archive
  not matching the metadata (CorruptItem naming the item), not as a bare
  kernel ValueError from the whole-read decision.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore import ranges
from ckcore.dcp.reader import RangeFileSystemReader
from tests.support.dcp_sim import BoxLoadPlanner, row_boxes, save_as_ranks


def _load(path, reader, box, dtype):
    sd = {"w": torch.zeros(box[1], dtype=dtype)}
    dcp.load(sd, storage_reader=reader, planner=BoxLoadPlanner({"w": box}), no_dist=True)
    return sd["w"]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "meta_dtype, saved, target_dtype",
    [
        # metadata float16, archive float32, target float32: no float16 rounding
        (torch.float16, lambda s: s.float() + 1e-4, torch.float32),
        # metadata float32, archive float64, target float64
        (torch.float32, lambda s: s.double() / 3, torch.float64),
        # torch.load path (conj bit): metadata complex64, archive complex128, target complex128
        (torch.complex64, lambda s: (s.to(torch.complex128) / 3).conj(), torch.complex128),
    ],
)
def test_whole_read_with_a_lying_metadata_dtype_converts_once_as_torch(
        tmp_path, threads, meta_dtype, saved, target_dtype):
    t = torch.randn(384, 96, generator=torch.Generator().manual_seed(0)).to(meta_dtype)
    save_as_ranks(str(tmp_path), {"w": (t, row_boxes(t.shape, 4))}, 4, layout=lambda fqn, s: saved(s))
    box = ((0, 24), (384, 24))  # narrow: every item read whole
    assert ranges.reads_whole((96, 96), t.element_size(), (0, 24), (96, 24), 40000)
    ref = _load(tmp_path, FileSystemReader(str(tmp_path)), box, target_dtype)
    got = _load(tmp_path, RangeFileSystemReader(str(tmp_path), thread_count=threads), box, target_dtype)
    assert torch.equal(got, ref)


def test_reads_whole_is_false_when_the_chunk_byte_math_overflows():
    big = (2**32, 2**32, 2**32)
    assert ranges.reads_whole(big, 4, (0, 0, 0), (4, 32, 1), 67000) is False


@pytest.mark.parametrize("threads", [1, 2])
def test_metadata_claiming_a_huge_chunk_is_reported_against_the_archive(tmp_path, threads):
    t = torch.randn(32, 32, 16)
    save_as_ranks(str(tmp_path), {"w": (t, row_boxes(t.shape, 1))}, 1)
    mdp = os.path.join(str(tmp_path), ".metadata")
    with open(mdp, "rb") as f:
        md = pickle.load(f)
    big = torch.Size((2**32, 2**32, 2**32))
    md.state_dict_metadata["w"].size = big
    md.state_dict_metadata["w"].chunks[0].sizes = big
    with open(mdp, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointException, match=r"CorruptItem: .*item 'w'.*archive holds a tensor of size"):
        _load(tmp_path, RangeFileSystemReader(str(tmp_path), thread_count=threads), ((0, 0, 0), (4, 32, 1)),
              torch.float32)
