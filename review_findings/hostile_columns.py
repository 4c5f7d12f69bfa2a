"""Hostile WriteResultColumns(parts) fed to FastFileSystemWriter.finish: errors, time, memory, no .metadata."""
import json, zlib, time, resource, tempfile, pathlib, sys
import numpy as np
from common import *
from ckcore.compact import pack_result_columns, unpack_result_columns, CompactPlanError
from ckcore.dcp._compact import result_columns

central, _ = _global(_world(2))
good = pack_result_columns(result_columns(_results(central, True)[0]))
raw = zlib.decompress(good[3])
n0 = int(np.frombuffer(raw[:8], "<i8")[0])

def body(n, v, cols, offs):
    b = np.array([n, v], "<i8").tobytes()
    for c in cols:
        b += np.asarray(c, "<i8").view(np.uint8).reshape(-1, 8).T.tobytes() if len(c) else b""
    b += np.asarray(offs, "<i8").view(np.uint8).reshape(-1, 8).T.tobytes() if len(offs) else b""
    return zlib.compress(b)
def tables(paths, tr): return zlib.compress(json.dumps([paths, tr]).encode())
F = zlib.compress(json.dumps(["w"]).encode())
I64 = 2**63 - 1
cases = {
  "int64 extremes": (1, F, tables(["p"], []), body(1, 1, [[0], [1], [I64], [I64], [0], [I64], [I64]], [-2**63])),
  "nd sum wraps": (1, F, tables(["p"], []), body(2, 1, [[0, 0], [2**62, 2**62], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]], [0])),
  "nd -1 all, v>0": (1, F, tables(["p"], []), body(1, 1, [[0], [-1], [0], [0], [0], [0], [0]], [5])),
  "nd -2": (1, F, tables(["p"], []), body(1, 0, [[0], [-2], [0], [0], [0], [0], [0]], [])),
  "hint -2": (1, F, tables(["p"], []), body(1, 0, [[0], [-1], [-2], [0], [0], [0], [0]], [])),
  "transform row bool idx": (1, F, tables(["p"], [[True, ["x"]]]), body(1, 0, [[0], [-1], [0], [0], [0], [0], [0]], [])),
  "transform not list": (1, F, tables(["p"], [[0, "x"]]), body(1, 0, [[0], [-1], [0], [0], [0], [0], [0]], [])),
  "transform nested": (1, F, tables(["p"], [[0, [["x"]]]]), body(1, 0, [[0], [-1], [0], [0], [0], [0], [0]], [])),
  "transforms not list": (1, F, zlib.compress(b'[["p"], {"0": 1}]'), body(1, 0, [[0], [-1], [0], [0], [0], [0], [0]], [])),
  "fqn table dict": (1, zlib.compress(b'{"a":1}'), tables(["p"], []), body(0, 0, [[]]*7, [])),
  "version bool": (True,) + good[1:],
  "parts list": list(good),
  "bytearray part": (1, bytearray(good[1]), good[2], good[3]),
  "memoryview part": (1, good[1], memoryview(good[2]), good[3]),
  "zlib trailing": good[:3] + (good[3] + b"x",),
  "gzip header": good[:3] + (zlib.compress(raw, wbits=31),) if False else good[:3] + (b"\x1f\x8b" + good[3],),
  "deep json": (1, F, zlib.compress(b"[" * 100000 + b"]" * 100000), good[3]),
  "empty fqn table, n=0": (1, zlib.compress(b"[]"), tables([], []), body(0, 0, [[]]*7, [])),
}
def run(parts, name):
    with tempfile.TemporaryDirectory() as d:
        central, md = _global(_world(2))
        res = _results(central)
        received = [pickle.loads(pickle.dumps(SentWriteResults(res[0]))), WriteResultColumns(parts)]
        t = time.time()
        try:
            FastFileSystemWriter(d).finish(md, received)
            out = "finished OK"
        except Exception as e:
            out = f"{type(e).__name__}: {str(e)[:150]}"
        exists = (pathlib.Path(d) / ".metadata").exists()
        print(f"{name}: {out} [{time.time()-t:.2f}s, .metadata exists={exists}, maxrss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024}MB]")
        if exists:
            from torch.distributed.checkpoint import FileSystemReader
            try:
                m = FileSystemReader(d).read_metadata()
                print("    file entries tail:", _entries(m)[-2:])
            except Exception as e:
                print("    file unreadable by torch:", e)
only = sys.argv[1:]
for k, v in cases.items():
    if not only or k in only: run(v, k)
