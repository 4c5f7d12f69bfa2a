"""A ~250 kB packed fqn table that inflates to 256 MiB of JSON '[[],[],...]': json.loads builds ~85M lists before the type check."""
import sys, zlib, time, resource
from common import *
from ckcore.compact import unpack_result_columns, MAX_PART_BYTES
mb = int(sys.argv[1]) if len(sys.argv) > 1 else 256
n = (mb << 20) // 3 - 1
text = b"[" + b"[]," * n + b"[]]"
assert len(text) <= MAX_PART_BYTES
blob = zlib.compress(text, 9)
del text
print(f"packed fqn table {len(blob)/1024:.0f} kB -> {mb} MiB JSON", flush=True)
t = time.time()
try:
    WriteResultColumns((1, blob, b"", b"")).columns()
except Exception as e:
    print(type(e).__name__, str(e)[:120])
print(f"{time.time()-t:.1f}s maxrss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024} MB")
