"""``ckcore plan``'s range-reader and shared-read figures (torch-free).

On the 2-rank fixture loaded HSDP-style (mesh 2x2, replicate x shard): the
replica groups are the ranks holding the same shard, sharing never reads
more than the range reader, the range reader never more than torch's, and
the text names the readers and where strides come from.
"""

from __future__ import annotations

import io
import json
import os
import shutil

from ckcore.cli import main

SHARDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "dcp_sharded")


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_hsdp_plan_reports_range_and_shared_reads_per_replica_group():
    code, out, err = run("plan", SHARDED, "--mesh", "2x2", "--layout", "R,S(0)", "--json")
    assert code == 0, err
    rep = json.loads(out)
    groups = rep["sharing"]["groups"]
    assert sorted(g["ranks"] for g in groups) == [[0, 2], [1, 3]]
    for g in groups:
        assert g["shared_bytes_read"] < g["range_bytes_read"] <= g["torch_bytes_read"]
        assert g["torch_bytes_read"] == sum(r["bytes_read"] for r in rep["ranks"] if r["rank"] in g["ranks"])
    assert rep["range_reader"]["strides"] == "stored"
    assert rep["range_reader"]["totals"]["bytes_read"] == sum(r["range"]["bytes_read"] for r in rep["ranks"])
    assert rep["sharing"]["totals"]["bytes_sent"] == sum(r["shared"]["bytes_received"] for r in rep["ranks"])
    code, text, _ = run("plan", SHARDED, "--mesh", "2x2", "--layout", "R,S(0)")
    assert code == 0
    assert "range reader (RangeFileSystemReader)" in text and "strides: read from the torch.save records" in text
    assert "shared reads (SharedRangeFileSystemReader)" in text and "replica group" in text


def test_without_files_the_plan_says_it_assumes_contiguous_storage(tmp_path):
    shutil.copy(os.path.join(SHARDED, ".metadata"), tmp_path / ".metadata")
    code, text, err = run("plan", str(tmp_path), "--world-size", "2")
    assert code == 0, err
    assert "assume contiguous (C-order) storage" in text


def _sharing(*extra):
    code, out, err = run("plan", SHARDED, "--mesh", "4", "--layout", "R", "--json", *extra)
    assert code == 0, err
    rep = json.loads(out)
    ranks = sorted(rep["ranks"], key=lambda r: r["rank"])
    return rep, [r["shared"] for r in ranks], [r["range"] for r in ranks]


def test_ranks_per_host_count_each_host_reading_what_it_shares_and_exchanging_across_hosts():
    # 4 replicas: on one host every rank reads everything (the range
    # reader); on 2 hosts of 2 each byte is read on one host, by both its
    # ranks; on 4 hosts each byte is read once in all.
    rep1, per_rank, plain = _sharing()
    rep2, two, _ = _sharing("--ranks-per-host", "2")
    rep4, one, _ = _sharing("--ranks-per-host", "4")
    assert rep2["sharing"]["ranks_per_host"] == 2
    total = sum(p["bytes_read"] for p in plain)
    assert [s["bytes_read"] for s in one] == [p["bytes_read"] for p in plain]
    assert sum(s["bytes_sent"] for s in one) == 0 and rep4["sharing"]["pieces"] == 0
    read1, read2 = (sum(s["bytes_read"] for s in x) for x in (per_rank, two))
    assert read1 < read2 < total
    # host-mates read the same pieces: ranks 0 and 1 (host 0) read alike
    assert two[0]["bytes_read"] == two[1]["bytes_read"] and two[2]["bytes_read"] == two[3]["bytes_read"]
    sent1, sent2 = (sum(s["bytes_sent"] for s in x) for x in (per_rank, two))
    assert 0 < sent2 < sent1
    for x in (per_rank, two):
        assert sum(s["bytes_sent"] for s in x) == sum(s["bytes_received"] for s in x)
    code, text, _ = run("plan", SHARDED, "--mesh", "4", "--layout", "R", "--ranks-per-host", "2")
    assert code == 0 and "2 ranks per host, exchanging only across hosts" in text


def test_ranks_per_host_below_one_is_a_usage_error():
    code, _, err = run("plan", SHARDED, "--mesh", "4", "--layout", "R", "--ranks-per-host", "0")
    assert code != 0 and "--ranks-per-host" in err


def test_ranks_per_host_past_the_world_is_one_host_and_says_so():
    rep, one, plain = _sharing("--ranks-per-host", str(2**63))
    assert [s["bytes_read"] for s in one] == [p["bytes_read"] for p in plain]
    assert rep["sharing"]["pieces"] == 0
    # the replicas are still one replica group: they need the same bytes
    assert [g["ranks"] for g in rep["sharing"]["groups"]] == [[0, 1, 2, 3]]
    code, text, err = run("plan", SHARDED, "--mesh", "4", "--layout", "R", "--ranks-per-host", "9")
    assert code == 0, err
    assert "all 4 ranks on one host: each reads its own, nothing exchanged" in text


def test_replica_groups_do_not_depend_on_the_hosts():
    groups = []
    for n in ("1", "2", "3"):
        code, out, err = run("plan", SHARDED, "--mesh", "2x2", "--layout", "R,S(0)", "--json",
                             "--ranks-per-host", n)
        assert code == 0, err
        groups.append(sorted(g["ranks"] for g in json.loads(out)["sharing"]["groups"]))
    assert groups[0] == groups[1] == groups[2] == [[0, 2], [1, 3]]
