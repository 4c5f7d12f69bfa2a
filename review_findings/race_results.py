"""Another thread appends/pops/replaces write results while FastFileSystemWriter.finish runs:
no crash other than what torch's own finish would raise, and every .metadata torch-readable."""
import threading, tempfile, pathlib, copy, collections
from common import *
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult
errs = collections.Counter()
stop = threading.Event()
for it in range(60):
    with tempfile.TemporaryDirectory() as d:
        central, md = _global(_world(3))
        res = _results(central)
        extra = [WriteResult(index=MetadataIndex(f"x{i}", torch.Size([i])), size_in_bytes=1,
                             storage_data=_StorageInfo("p", i, 1)) for i in range(2000)]
        res[0] = SentWriteResults(res[0] + extra)
        received = [res[0]] + [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in res[1:]]
        stop.clear()
        def mutate():
            i = 0
            while not stop.is_set():
                i += 1
                lst = received[0]
                if i % 3 == 0 and len(lst) > 5: lst.pop()
                elif i % 3 == 1: lst.append(copy.copy(extra[i % 2000]))
                else:
                    if lst: lst[len(lst) // 2].storage_data.offset = i
        t = threading.Thread(target=mutate); t.start()
        try:
            FastFileSystemWriter(d).finish(md, received)
            m = FileSystemReader(d).read_metadata()
            assert len(m.storage_data) > 0
            errs["ok"] += 1
        except Exception as e:
            errs[f"{type(e).__name__}: {str(e)[:100]}"] += 1
        finally:
            stop.set(); t.join()
print(dict(errs))
