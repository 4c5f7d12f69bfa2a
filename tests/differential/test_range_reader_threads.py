"""``RangeFileSystemReader``'s default worker count: the host's usable CPUs shared among its ranks.

Four ranks on a 2-core host, each with four workers, measured slower than
one worker each (bench/test_bench_load_e2e.py): the workers copy what they
read, so more of them than CPUs only queue. The default divides the CPUs
this process may use by torchrun's ``LOCAL_WORLD_SIZE``, between 1 and 4.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore.dcp import reader as reader_mod
from ckcore.dcp.reader import RangeFileSystemReader, default_thread_count

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.mark.parametrize(("cpus", "local", "want"), [
    (2, None, 2), (2, "4", 1), (8, "2", 4), (64, "8", 4), (6, "4", 1), (1, None, 1),
    (16, "0", 4), (16, "-3", 4), (16, "four", 4), (3, "", 3),
])
def test_default_thread_count_shares_the_host_cpus(monkeypatch, cpus, local, want):
    monkeypatch.setattr(reader_mod.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert default_thread_count() == want
    assert RangeFileSystemReader("unused").thread_count == want
    assert RangeFileSystemReader("unused", thread_count=None).thread_count == want


def test_default_thread_count_without_affinity(monkeypatch):
    monkeypatch.delattr(reader_mod.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(reader_mod.os, "cpu_count", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_thread_count() == 1
    assert default_thread_count(max_threads=8) == 1


def test_explicit_thread_count_is_kept(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert RangeFileSystemReader("unused", thread_count=7).thread_count == 7
    for bad in (0, -1, 2.0, "4", True):
        with pytest.raises(ValueError, match="thread_count"):
            RangeFileSystemReader("unused", thread_count=bad)


@pytest.mark.parametrize("local", ["1", "64"])
def test_the_default_reads_what_torch_reads(tmp_path, monkeypatch, local):
    """One worker (many ranks per host) or several: the values are torch's."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    g = torch.Generator().manual_seed(4)
    sd = {f"t{i}": torch.randn(96, 70, generator=g) for i in range(6)}
    dcp.save(sd, checkpoint_id=str(tmp_path), no_dist=True)
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    ref = {k: torch.zeros_like(v) for k, v in sd.items()}
    reader = RangeFileSystemReader(str(tmp_path))
    assert reader.thread_count == default_thread_count()
    dcp.load(got, storage_reader=reader, no_dist=True)
    dcp.load(ref, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    for k in sd:
        assert torch.equal(got[k], ref[k]) and torch.equal(got[k], sd[k]), k



@pytest.mark.parametrize(("bad", "exc"), [(0, ValueError), (-1, ValueError), ("4", TypeError),
                                          (2.0, TypeError), (None, TypeError), (True, TypeError)])
def test_default_thread_count_refuses_a_bad_bound(bad, exc):
    with pytest.raises(exc, match="max_threads"):
        default_thread_count(bad)
