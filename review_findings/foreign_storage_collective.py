"""A writer's own storage record type (not _StorageInfo) in the results, then dcp.save's broadcast
of the finished metadata: the receivers must get equal metadata (torch: they do)."""
import tempfile, dataclasses
from common import *
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.metadata import Metadata

@dataclasses.dataclass
class BlobRecord:
    bucket: str
    key: str

import os
RECORD = (lambda i: {i: "intkey"}) if os.environ.get("DICTREC") else (lambda i: BlobRecord("b", f"k{i}"))
with tempfile.TemporaryDirectory() as d:
    central, md = _global(_world(2))
    results = _results(central)
    results[1] = [WriteResult(index=wr.index, size_in_bytes=1, storage_data=RECORD(i))
                  for i, wr in enumerate(results[1])]
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    FastFileSystemWriter(d).finish(md, received)
    try:
        got = through(md)
        print("received", type(got).__name__, "equal:", got == md and _entries(got) == _entries(md))
    except Exception as e:
        print("RECEIVER RAISED", type(e).__name__, str(e)[:160])
