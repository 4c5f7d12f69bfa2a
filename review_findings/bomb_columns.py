"""A ~250 kB packed columns part inflating to MiBs of all-zero rows (same key): finish finds duplicates
and falls back to torch's dict path, building one WriteResult/MetadataIndex/_StorageInfo per row."""
import sys, zlib, time, resource, json, tempfile, pathlib
import numpy as np
from common import *
mb = int(sys.argv[1]) if len(sys.argv) > 1 else 256
n = ((mb << 20) - 16) // 56
b = np.array([n, 0], "<i8").tobytes() + bytes(56 * n)
parts = (1, zlib.compress(b'["w"]'), zlib.compress(b'[["p"], []]'), zlib.compress(b, 9))
del b
print(f"columns part {len(parts[3])/1024:.0f} kB -> {mb} MiB, {n} rows", flush=True)
central, md = _global(_world(2))
res = _results(central)
with tempfile.TemporaryDirectory() as d:
    t = time.time()
    try:
        FastFileSystemWriter(d).finish(md, [SentWriteResults(res[0]), WriteResultColumns(parts)])
        print("finished; entries:", len(md.storage_data))
    except Exception as e:
        print(type(e).__name__, str(e)[:150])
    print(f"{time.time()-t:.1f}s maxrss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024} MB")
