"""One rank: dcp.save with FastSavePlanner+FastFileSystemWriter / torch, load the other way, check exact.
Scenario 'pathlike': checkpoint path passed as a user PathLike (torch: works; its storage_meta travels)."""
import os, sys, json, tempfile, pathlib, traceback
sys.path.insert(0, os.environ.get("CKROOT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, DefaultLoadPlanner, DefaultSavePlanner
import ckcore.dcp as cdcp

class UserPath(os.PathLike):
    def __init__(self, p): self.p = str(p)
    def __fspath__(self): return self.p
    def __eq__(self, o): return isinstance(o, UserPath) and o.p == self.p
    def __hash__(self): return hash(self.p)
    def __reduce__(self): return (UserPath, (self.p,))

def state(rank, world, fill=None):
    g = torch.Generator().manual_seed(1234)
    big = torch.randn(13, 7, generator=g, dtype=torch.float64)
    rows = torch.tensor_split(torch.arange(13), world)[rank]
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    sd = {
        "rep": torch.arange(10, dtype=torch.int32) * 3,
        "scalar": torch.tensor(2.5),
        "obj": {"step": 7, "name": "x"},
        "nested": {"a": [torch.ones(3) * 4, torch.zeros(2, 2)]},
        f"rank{rank}.own": torch.full((4,), float(rank)),
        "bf": torch.arange(6, dtype=torch.bfloat16),
    }
    if fill is not None:
        for k, v in list(sd.items()):
            if isinstance(v, torch.Tensor): sd[k] = torch.full_like(v, fill)
        sd["nested"] = {"a": [torch.full((3,), fill), torch.full((2, 2), fill)]}
        sd["obj"] = {"step": 0, "name": ""}
    return sd

def check(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path}: {a} vs {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a: check(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)): check(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"

def main():
    scen, wd = sys.argv[1], pathlib.Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=rank, world_size=world)
    out = {}
    try:
        if scen == "exact":
            for name, planner, writer_cls, lplanner, reader_cls in [
                ("fast->torch", cdcp.FastSavePlanner(), cdcp.FastFileSystemWriter, DefaultLoadPlanner(), FileSystemReader),
                ("torch->fast", DefaultSavePlanner(), FileSystemWriter, cdcp.FastLoadPlanner(), cdcp.RangeFileSystemReader),
                ("fast->fast", cdcp.FastSavePlanner(), cdcp.FastFileSystemWriter, cdcp.FastLoadPlanner(), cdcp.RangeFileSystemReader),
            ]:
                p = wd / name
                sd = state(rank, world)
                md = dcp.save(sd, storage_writer=writer_cls(str(p)), planner=planner)
                # every rank's returned metadata must equal rank 0's file
                ref = FileSystemReader(str(p)).read_metadata()
                diffs = [f for f in ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version") if getattr(md, f) != getattr(ref, f) and f != "storage_meta"]
                if diffs:
                    out[name + " DIFF"] = {f: [repr(getattr(md, f))[:300], repr(getattr(ref, f))[:300]] for f in diffs}
                    out[name + " DIFF"]["type"] = type(md).__name__
                assert list(md.storage_data.items()) == list(ref.storage_data.items()), "order/hints"
                out[name + " returned type"] = type(md).__name__
                dest = state(rank, world, fill=-7.0)
                dcp.load(dest, storage_reader=reader_cls(str(p)), planner=lplanner)
                check(state(rank, world), dest)
                out[name] = "exact"
        elif scen in ("intkeys_fast", "intkeys_torch"):
            base = cdcp.FastSavePlanner if scen == "intkeys_fast" else DefaultSavePlanner
            class P(base):
                def create_global_plan(self, plans):
                    plans, md = super().create_global_plan(plans)
                    md.planner_data = {"mappings": md.planner_data, "ranks": {0: "coord", 1: "w"}}
                    return plans, md
            writer = cdcp.FastFileSystemWriter if scen == "intkeys_fast" else FileSystemWriter
            md = dcp.save(state(rank, world), storage_writer=writer(str(wd / scen)), planner=P())
            out[scen] = f"ok {type(md).__name__} ranks={md.planner_data['ranks']}"
        elif scen == "bytes_planner":
            class P(cdcp.FastSavePlanner):
                def create_global_plan(self, plans):
                    plans, md = super().create_global_plan(plans)
                    md.planner_data = {"mappings": md.planner_data, "run": b"\x00tag"}
                    return plans, md
            p = wd / scen
            dcp.save(state(rank, world), storage_writer=cdcp.FastFileSystemWriter(str(p)), planner=P())
            out["storage entries in file"] = len(FileSystemReader(str(p)).read_metadata().storage_data or {})
            dest = state(rank, world, fill=-7.0)
            dcp.load(dest, storage_reader=FileSystemReader(str(p)), planner=DefaultLoadPlanner())
            check(state(rank, world), dest)
            out[scen] = "loaded exact"
        elif scen == "pathlike":
            p = UserPath(wd / "pl")
            md = dcp.save(state(rank, world), storage_writer=cdcp.FastFileSystemWriter(p), planner=cdcp.FastSavePlanner())
            out["pathlike"] = f"ok, checkpoint_id={md.storage_meta.checkpoint_id!r}"
        elif scen == "pathlike_torch":
            p = UserPath(wd / "plt")
            md = dcp.save(state(rank, world), storage_writer=FileSystemWriter(p), planner=cdcp.FastSavePlanner())
            out["pathlike_torch"] = f"ok, checkpoint_id={md.storage_meta.checkpoint_id!r}"
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    (wd / f"{scen}.{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
