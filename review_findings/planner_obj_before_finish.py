"""planner_data holding an object dumps_metadata cannot write, set before finish (a custom planner's
create_global_plan does this): the results joined as columns are dropped and .metadata has no storage."""
import tempfile, pathlib, fractions
from common import *
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
for value in (fractions.Fraction(1, 3), b"raw", 2**80):
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        central, md = _global(_world(2))
        md.planner_data = {"custom": value}
        results = _results(central)
        ref = _plain(md); ref.planner_data = {"custom": value}
        (d / "ref").mkdir(); (d / "got").mkdir()
        FileSystemWriter(str(d / "ref")).finish(ref, results)
        received = [pickle.loads(pickle.dumps(SentWriteResults(r))) for r in results]
        FastFileSystemWriter(str(d / "got")).finish(md, received)
        a = FileSystemReader(str(d / "ref")).read_metadata()
        b = FileSystemReader(str(d / "got")).read_metadata()
        print(f"planner_data {type(value).__name__}: torch file {len(a.storage_data)} entries, ckcore file "
              f"{len(b.storage_data or {})} entries; in memory: torch {len(ref.storage_data)}, ckcore {len(md.storage_data or {})}; "
              f"ckcore file storage_data={'None' if b.storage_data is None else 'dict'}")
