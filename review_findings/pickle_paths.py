"""Outside torch's collectives, a finished ColumnarMetadata must pickle as torch's plain Metadata;
a metadata read by RangeFileSystemReader and then broadcast must arrive equal."""
import copy, io, tempfile, pickle, threading, pathlib
from common import *
from torch.distributed.checkpoint.metadata import Metadata
import ckcore.dcp as cdcp
with tempfile.TemporaryDirectory() as d:
    md, central, results = finished(d, 3, True)
    for proto in range(0, 6):
        got = pickle.loads(pickle.dumps(md, protocol=proto))
        assert type(got) is Metadata and got == md, proto
    got = copy.deepcopy(md); assert type(got) is Metadata and got == md
    got = copy.copy(md); print("copy.copy ->", type(got).__name__)
    buf = io.BytesIO(); torch.save(md, buf); buf.seek(0)
    got = torch.load(buf, weights_only=False); assert type(got) is Metadata and got == md
    buf.seek(0)
    try:
        got = torch.load(buf, weights_only=True); print("weights_only torch.load ->", type(got).__name__)
    except Exception as e:
        print("weights_only torch.load refused (as for torch's Metadata):", str(e)[:80])
    print("pickle 0-5 / deepcopy / torch.save: plain Metadata, equal")
    for reader in (cdcp.RangeFileSystemReader(d), ):
        r = reader.read_metadata()
        print("reader gives", type(r).__name__, "built:", getattr(r, "ck_built", None))
        sent = through(r)
        print("  broadcast ->", type(sent).__name__, "equal:", sent == r, "storage order equal:", _entries(sent) == _entries(r),
              "storage_meta equal:", sent.storage_meta == r.storage_meta)
