"""SharedRangeFileSystemReader in one process: the range reader's results, and its arguments checked.

The gloo tests (tests/multiprocess/test_shared_reads.py) cover the exchange;
here there is no process group, so the reader must load exactly what torch
loads by reading everything itself.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckcore.dcp import FastLoadPlanner, SharedRangeFileSystemReader


def test_without_a_process_group_it_reads_like_the_range_reader(tmp_path):
    sd = {"w": torch.arange(600, dtype=torch.float32).reshape(20, 30),
          "b": torch.arange(7, dtype=torch.bfloat16)}
    dcp.save(sd, checkpoint_id=tmp_path, no_dist=True)
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    reader = SharedRangeFileSystemReader(tmp_path, timeout=datetime.timedelta(seconds=5))
    dcp.load(out, storage_reader=reader, planner=FastLoadPlanner(), no_dist=True)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert reader.stats["bytes_read"] > 0
    assert reader.stats["shared_items"] == reader.stats["bytes_sent"] == 0


@pytest.mark.parametrize("kwargs", [
    {"timeout": 0}, {"timeout": -1.0}, {"exchange_bytes": 100}, {"max_cells": 0},
    {"min_piece_bytes": 0},
])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        SharedRangeFileSystemReader(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"host": 3}, {"host": b"node1"}, {"exchange_within_host": 1}, {"exchange_within_host": "yes"},
])
def test_bad_host_arguments_raise_type_error(tmp_path, kwargs):
    with pytest.raises(TypeError, match="host"):
        SharedRangeFileSystemReader(tmp_path, **kwargs)


def test_the_host_defaults_to_the_host_name(tmp_path):
    import socket
    assert SharedRangeFileSystemReader(tmp_path).host == socket.gethostname()
    assert SharedRangeFileSystemReader(tmp_path, host="node-7").host == "node-7"
