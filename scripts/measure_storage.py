"""Measure the two storage settings of RangeFileSystemReader: per-request latency and bandwidth.

    python scripts/measure_storage.py /path/on/the/storage/__0_0.distcp [--warm] [-n 2000]

Point it at a large file (a checkpoint data file of a few hundred MiB is
ideal) on the storage the checkpoints are loaded from. It times ``n`` small
reads (4 KiB each, one after another, spread evenly over the file) and one
large sequential read (up to 256 MiB), then prints

    bandwidth  B = large bytes / large time
    latency    L = small time / n - 4 KiB / B

and the reader arguments ``request_latency_s=L, bandwidth_bytes_per_s=B``
(the reader reads through every gap shorter than ``L * B`` bytes). By default
each part starts from a cold page cache (``posix_fadvise(DONTNEED)`` on the
file): a file system whose client cache ignores that advice (some network
file systems, FUSE mounts of object stores) needs a file not read since it
was written, or ``--warm`` to measure the cached case on purpose. Run it a
few times: shared storage varies.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    """Time the small reads and the large read of the file named on the command line; print L and B."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("-n", type=int, default=2000, help="number of small reads (default 2000)")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache first")
    args = ap.parse_args()
    size = os.path.getsize(args.path)
    small = 4096
    n = max(1, min(args.n, size // small))
    stride = max(small, size // n // small * small)
    fd = os.open(args.path, os.O_RDONLY)
    try:
        def drop() -> None:
            if not args.warm and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        drop()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead between small reads
        t0 = time.perf_counter()
        for i in range(n):
            os.pread(fd, small, (i * stride) % max(1, size - small))
        t_small = time.perf_counter() - t0
        drop()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        big = min(size, 256 << 20)
        buf = memoryview(bytearray(big))
        t0 = time.perf_counter()
        got = 0
        while got < big:
            k = os.preadv(fd, [buf[got:]], got)
            if k <= 0:
                break
            got += k
        t_big = time.perf_counter() - t0
    finally:
        os.close(fd)
    bandwidth = got / t_big
    latency = max(0.0, t_small / n - small / bandwidth)
    print(f"{n} reads of {small} B: {t_small * 1e3:.1f} ms ({t_small / n * 1e6:.1f} us each)")
    print(f"one read of {got / 2**20:.1f} MiB: {t_big * 1e3:.1f} ms ({bandwidth / 1e9:.3f} GB/s)")
    print(f"break-even gap L*B = {latency * bandwidth / 1024:.0f} KiB")
    print(f"RangeFileSystemReader(path, request_latency_s={latency:.3g}, bandwidth_bytes_per_s={bandwidth:.3g})")


if __name__ == "__main__":
    main()
