import tempfile, pathlib, os, traceback, copy, io
from common import *
from torch.distributed.checkpoint.metadata import Metadata

def fields_equal(a, b):
    out = []
    for f in ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"):
        x, y = getattr(a, f), getattr(b, f)
        if x != y: out.append(f)
        elif f == "storage_data" and x is not None and _entries(a) != _entries(b): out.append("storage order/hints")
        elif f == "storage_meta" and x is not None and (type(x.checkpoint_id) is not type(y.checkpoint_id)):
            out.append(f"checkpoint_id type {type(x.checkpoint_id).__name__} -> {type(y.checkpoint_id).__name__}")
    return out

class MyPath(os.PathLike):
    def __init__(self, p): self.p = p
    def __fspath__(self): return self.p
    def __eq__(self, o): return isinstance(o, MyPath) and o.p == self.p
    def __reduce__(self): return (MyPath, (self.p,))

cases = {
  "planner tuple": lambda md: setattr(md, "planner_data", {"t": (1, 2)}),
  "planner nested": lambda md: setattr(md, "planner_data", {1: [1.5, None, True, {"a": ()}]}),
  "planner float nan-free": lambda md: setattr(md, "planner_data", {"f": 1e308, "neg": -0.0}),
  "planner Path": lambda md: setattr(md, "planner_data", {"p": pathlib.Path("/x/y")}),
  "planner PurePosixPath": lambda md: setattr(md, "planner_data", {"p": pathlib.PurePosixPath("a/b")}),
  "planner PureWindowsPath": lambda md: setattr(md, "planner_data", {"p": pathlib.PureWindowsPath("C:/a")}),
  "planner custom PathLike": lambda md: setattr(md, "planner_data", {"p": MyPath("/x")}),
  "planner bytes": lambda md: setattr(md, "planner_data", {"b": b"x"}),
  "planner int big": lambda md: setattr(md, "planner_data", 2**70),
  "planner str list": lambda md: setattr(md, "planner_data", ["rank0", "rank1"]),
  "planner shared refs": lambda md: setattr(md, "planner_data", (lambda l: [l, l])([1])),
  "planner self-ref": lambda md: (lambda l: (l.append(l), setattr(md, "planner_data", l)))([]),
  "ckpt id Path": lambda md: setattr(md.storage_meta, "checkpoint_id", pathlib.Path("/tmp/ck")),
  "ckpt id custom PathLike": lambda md: setattr(md.storage_meta, "checkpoint_id", MyPath("/tmp/ck")),
  "modules mutated": lambda md: md.storage_meta.modules.append("layer.0"),
  "save_id int": lambda md: setattr(md.storage_meta, "save_id", 5),
  "version mutated": lambda md: setattr(md, "version", "9.9.9"),
  "version None": lambda md: setattr(md, "version", None),
  "storage_meta None": lambda md: setattr(md, "storage_meta", None),
  "storage_meta torch plain w/ extra attr": lambda md: setattr(md.storage_meta, "extra", 1),
  "state_dict chunk mutated": lambda md: md.state_dict_metadata["w"].chunks.pop(),
  "storage_data mutated": lambda md: md.storage_data.popitem(),
  "planner_data in-place mutation": lambda md: md.planner_data.append({"new": 1}) if isinstance(md.planner_data, list) else md.planner_data.update({"new": 1}) if isinstance(md.planner_data, dict) else None,
}
for name, mut in cases.items():
    with tempfile.TemporaryDirectory() as d:
        md, *_ = finished(d)
        try:
            mut(md)
        except Exception as e:
            print(f"{name}: setup failed {e!r}"); continue
        try:
            got = through(md)
        except Exception as e:
            print(f"!! {name}: SEND/RECEIVE RAISED {type(e).__name__}: {str(e)[:200]}"); continue
        try:
            diff = fields_equal(md, got)
        except Exception as e:
            diff = [f"compare raised {e!r}"]
        print(f"{'!! ' if diff else ''}{name}: received {type(got).__name__} {'DIFF '+str(diff) if diff else 'equal'}")
        # nested
        try:
            got2 = through([md, {"k": md}])
            ok = fields_equal(md, got2[0]) == [] and got2[1]["k"] is got2[0]
            print(f"   nested: {type(got2[0]).__name__} equal={fields_equal(md, got2[0])==[]} identity_kept={got2[1]['k'] is got2[0]}")
        except Exception as e:
            print(f"!!   nested raised {type(e).__name__}: {str(e)[:200]}")
