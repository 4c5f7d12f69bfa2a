import sys, pickle, os
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "differential"))
import torch
import torch.distributed.distributed_c10d as c10d
from test_write_results_columns import _global, _world, _results, _plain, _entries, _writer
__all__ = ["torch","pickle","os","c10d","_global","_world","_results","_plain","_entries","_writer","ColumnarMetadata","FastFileSystemWriter","SentWriteResults","WriteResultColumns","through","finished"]
from ckcore.dcp import ColumnarMetadata, FastFileSystemWriter
from ckcore.dcp._compact import SentWriteResults, WriteResultColumns

def through(obj):
    t, size = c10d._object_to_tensor(obj, torch.device("cpu"), None)
    return c10d._tensor_to_object(t, size, None)

def finished(tmp, ranks=2, transforms=False):
    central, md = _global(_world(ranks))
    results = _results(central, transforms)
    received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
    FastFileSystemWriter(str(tmp)).finish(md, received)
    return md, central, results
