"""Differential: FastFileSystemWriter.finish vs torch FileSystemWriter.finish over odd result mixes."""
import tempfile, pathlib, copy, traceback
from common import *
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

class SI(_StorageInfo):
    pass
class WR(WriteResult):
    pass

def WRr(fqn, off, hint, path="p", o=0, l=1, td=None, cls=WriteResult, scls=_StorageInfo):
    return cls(index=MetadataIndex(fqn, None if off is None else torch.Size(off), hint),
               size_in_bytes=l, storage_data=scls(path, o, l, td) if scls is not dict else {"x": o})

def V(v):
    if not hasattr(v, "__dict__"): return v
    return (type(v), {k: x for k, x in vars(v).items() if x is not None}, getattr(v, "transform_descriptors", "?"))

def run(name, build, pickled=True):
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        central, md = _global(_world(2))
        results = build(_results(central))
        ref_md = _plain(md)
        received = [pickle.loads(pickle.dumps(SentWriteResults(r))) if pickled else SentWriteResults(r) for r in results]
        try:
            _writer(FileSystemWriter, d / "ref").finish(ref_md, copy.deepcopy(results))
        except Exception as e:
            print(f"{name}: torch raised {e!r}"); return
        try:
            _writer(FastFileSystemWriter, d / "got").finish(md, received)
        except Exception as e:
            print(f"!! {name}: ckcore raised {type(e).__name__}: {e}"); return
        a = FileSystemReader(str(d / "ref")).read_metadata()
        b = FileSystemReader(str(d / "got")).read_metadata()
        probs = []
        if _entries(a) != _entries(b): probs.append("file entries differ")
        if [type(v) for v in a.storage_data.values()] != [type(v) for v in b.storage_data.values()]: probs.append("file value types differ")
        if [V(v) for v in a.storage_data.values()] != [V(v) for v in b.storage_data.values()]: probs.append("file value attrs differ")
        if a.state_dict_metadata != b.state_dict_metadata: probs.append("sdm differ")
        if _entries(md) != _entries(ref_md): probs.append("in-memory entries differ")
        if [type(v) for v in md.storage_data.values()] != [type(v) for v in ref_md.storage_data.values()]: probs.append("in-memory value types differ")
        if [V(v) for v in md.storage_data.values()] != [V(v) for v in ref_md.storage_data.values()]: probs.append("in-memory value attrs differ")
        if [type(k) for k in md.storage_data] != [type(k) for k in ref_md.storage_data]: probs.append("in-memory key types differ")
        print(("!! " if probs else "") + f"{name}: {probs or 'same'}")
        if probs:
            for x, y in zip(list(ref_md.storage_data.items()), list(md.storage_data.items())):
                if x != y or type(x[1]) is not type(y[1]) or V(x[1]) != V(y[1]):
                    print("   torch :", x, vars(x[1]) if hasattr(x[1], "__dict__") else ""); print("   ckcore:", y, vars(y[1]) if hasattr(y[1], "__dict__") else ""); break

def dup_within(r):
    r[0].append(WRr(r[0][0].index.fqn, r[0][0].index.offset, 7, o=999)); return r
def bytes_and_scalar(r):
    r[0] += [WRr("z", None, None), WRr("z", (), None, o=5)]; return r
def bytes_dup(r):
    r[0] += [WRr("z", None, None, o=1)]; r[1] += [WRr("z", None, 3, o=2)]; return r
def nd_diff(r):
    r[0] += [WRr("q", (0,), None, o=1), WRr("q", (0, 0), None, o=2), WRr("q", (), None, o=3), WRr("q", None, None, o=4)]; return r
def offsets_spill(r):
    # (1,2),(3) vs (1),(2,3): same flat values, different split
    r[0] += [WRr("q", (1, 2), None, o=1), WRr("q", (3,), None, o=2)]
    r[1] += [WRr("q", (1,), None, o=3), WRr("q", (2, 3), None, o=4)]; return r
def empty_rank(r): r[1] = []; return r
def all_empty(r): return [[], []]
def extra_fqn(r): r[1].append(WRr("not.in.md", (0,), 0)); return r
def hint_none(r):
    for wr in r[0]: object.__setattr__(wr.index, "index", None)
    return r
def td(r):
    r[0][0].storage_data.transform_descriptors = []; r[1][0].storage_data.transform_descriptors = ["a", "b"]; return r
def subcls_si(r): r[1][0] = WRr("x", (0,), 0, scls=SI); return r
def subcls_wr(r): r[1][0] = WRr("x", (0,), 0, cls=WR); return r
def extra_attr(r): r[0][1].storage_data.extra = 1; return r
def foreign(r): r[1] = [WRr("x", (0,), 0, scls=dict)]; return r
def neg_off(r): r[0].append(WRr("neg", (-5,), None)); return r
def big_vals(r): r[0].append(WRr("big", (2**63-1, -2**63), 2**63-1, o=2**63-1, l=2**63-1)); return r
def huge_off(r): r[0].append(WRr("big", (0,), None, o=2**64)); return r
def neg_hint(r): r[0].append(WRr("nh", (0,), -1)); return r
def bool_hint(r): r[0].append(WRr("bh", (0,), True)); return r
class S(str): pass
def str_path_sub(r):
    r[0][0].storage_data.relative_path = S(r[0][0].storage_data.relative_path); return r
def td_tuple(r): r[0][0].storage_data.transform_descriptors = ("a",); return r
def empty_fqn(r): r[0].append(WRr("", (0,), None)); return r
def unicode(r): r[0].append(WRr("é\u0000\ud800x", (0,), None, path="\u2603")); return r
def mdindex_extra(r):
    object.__setattr__(r[0][0].index, "extra", 1); return r
import dataclasses
@dataclasses.dataclass
class Duck:
    relative_path: str
    offset: int
    length: int
def duck(r):
    r[1][0] = WriteResult(index=r[1][0].index, size_in_bytes=1, storage_data=Duck("p", 1, 2)); return r
def rank_tuple(r): r[0] = tuple(r[0]); return r
def dup_across_with_bytes(r):
    r[1] += [copy.deepcopy(r[0][-1])]; return r

for f in [dup_within, bytes_and_scalar, bytes_dup, nd_diff, offsets_spill, empty_rank, all_empty, extra_fqn,
          hint_none, td, subcls_si, subcls_wr, extra_attr, foreign, neg_off, big_vals, huge_off, neg_hint, bool_hint,
          str_path_sub, td_tuple, empty_fqn, unicode, mdindex_extra, rank_tuple, dup_across_with_bytes, duck]:
    for p in (True, False):
        try:
            run(f.__name__ + ("" if p else " (unpickled)"), f, p)
        except Exception as e:
            print(f"!! {f.__name__}: harness {type(e).__name__}: {e}"); traceback.print_exc()
