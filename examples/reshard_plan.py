"""Plan a resharded load of one large tensor and show what every rank reads.

A 65536 x 65536 bfloat16 weight saved by 64 ranks as an 8 x 8 grid is loaded
by 48 ranks as a 6 x 8 grid. For each loading rank this prints the saved
chunks it reads from, the bytes it needs, and how long planning took: the
array form for every rank at once, and the ReadItem list for one rank.
Runs without torch; when torch is installed its planner is timed beside.

    python examples/reshard_plan.py [--shape 65536,65536] [--saved 8,8] [--loaded 6,8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import ckcore


def grid(shape, parts):
    """Row-major (offsets, sizes) arrays of a torch.chunk-style grid."""
    cuts = []
    for n, p in zip(shape, parts):
        step = -(-n // p)
        starts = np.minimum(np.arange(p) * step, n)
        stops = np.minimum(starts + step, n)
        cuts.append((starts, stops - starts))
    mesh = np.meshgrid(*[np.arange(p) for p in parts], indexing="ij")
    idx = [m.reshape(-1) for m in mesh]
    off = np.stack([cuts[d][0][idx[d]] for d in range(len(shape))], axis=1).astype(np.int64)
    size = np.stack([cuts[d][1][idx[d]] for d in range(len(shape))], axis=1).astype(np.int64)
    return off, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="65536,65536")
    ap.add_argument("--saved", default="8,8")
    ap.add_argument("--loaded", default="6,8")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    saved_parts = tuple(int(x) for x in args.saved.split(","))
    loaded_parts = tuple(int(x) for x in args.loaded.split(","))
    isz = ckcore.itemsize(args.dtype)

    saved = grid(shape, saved_parts)
    loaded = grid(shape, loaded_parts)
    t0 = time.perf_counter()
    r = ckcore.intersect_chunks(loaded, saved)
    t_all = time.perf_counter() - t0

    print(f"tensor {shape} {args.dtype}: saved as {saved_parts} ({len(saved[0])} chunks), "
          f"loaded as {loaded_parts} ({len(loaded[0])} ranks)")
    print(f"planned every rank's reads in {t_all * 1e3:.3f} ms: {len(r)} read items\n")
    print(f"{'rank':>5} {'reads':>6} {'from saved chunks':<28} {'MiB needed':>11}")
    nbytes = np.prod(r.lengths, axis=1) * isz
    for rank in range(len(loaded[0])):
        sel = r.local_index == rank
        chunks = r.saved_index[sel].tolist()
        shown = ",".join(map(str, chunks[:6])) + (",..." if len(chunks) > 6 else "")
        print(f"{rank:>5} {int(sel.sum()):>6} {shown:<28} {nbytes[sel].sum() / 2**20:>11.1f}")

    # One rank's plan as ReadItem objects, the form DCP's planners hand to storage.
    md = ckcore.TensorStorageMetadata(
        ckcore.TensorProperties(dtype=args.dtype), shape,
        [ckcore.ChunkStorageMetadata(tuple(o), tuple(s)) for o, s in zip(*(a.tolist() for a in saved))])
    mine = [ckcore.ChunkStorageMetadata(tuple(loaded[0][0].tolist()), tuple(loaded[1][0].tolist()))]
    t0 = time.perf_counter()
    items = ckcore.create_read_items_for_chunk_list("model.weight", md, mine)
    t_one = time.perf_counter() - t0
    print(f"\nrank 0's ReadItem list: {len(items)} items in {t_one * 1e6:.1f} us; first: {items[0]}")

    try:
        import torch
        from torch.distributed.checkpoint import metadata as tmd
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    except ImportError:
        print("\n(torch not installed: skipping the side-by-side timing)")
        return
    t_md = tmd.TensorStorageMetadata(tmd.TensorProperties(), torch.Size(shape), [
        tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s))
        for o, s in zip(saved[0].tolist(), saved[1].tolist())])
    t_local = [tmd.ChunkStorageMetadata(torch.Size(o), torch.Size(s))
               for o, s in zip(loaded[0].tolist(), loaded[1].tolist())]
    t0 = time.perf_counter()
    t_items = create_read_items_for_chunk_list("model.weight", t_md, t_local)
    t_torch = time.perf_counter() - t0
    assert len(t_items) == len(r)
    print(f"\ntorch {torch.__version__}: every rank's reads in {t_torch * 1e3:.1f} ms "
          f"({t_torch / t_all:.0f}x ckcore's array form)")


if __name__ == "__main__":
    main()
