"""RangeFileSystemReader on untrusted checkpoints: safe metadata, paths kept inside.

* ``read_metadata`` goes through ckcore's allow-list unpickler and returns
  exactly what torch's ``FileSystemReader.read_metadata`` returns (types,
  field values, ``MetadataIndex.index`` hints, dict order, the fresh
  ``load_id``) for real checkpoints: saved here by torch 2.13, the committed
  fixtures under tests/data/, rank-local ``__0.metadata``.
* A ``.metadata`` carrying a ``__reduce__`` payload is refused and the
  payload never runs; ``safe_metadata=False`` brings back torch's
  ``pickle.load`` (shown with a payload that only creates a marker file in
  tmp_path).
* A storage entry naming ``../x``, ``/etc/passwd``, ``a/../../x`` (or NUL,
  or a file under a symlinked directory) fails the load with CheckpointError
  before any file is opened, even where a readable copy of the data waits at
  the escaped target; a file that is itself a symlink, or sits in a real
  subdirectory, still loads.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import shutil
import sys
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ckcore.checkpoint import CheckpointError, UnsafeCheckpointError
from ckcore.dcp import FastLoadPlanner
from ckcore.dcp.reader import RangeFileSystemReader
from tests.support.identical import assert_identical
from tests.support.paths import DATA

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")



# ---------------------------------------------------------------- helpers


def read_both(path, **kwargs):
    """torch's and ckcore's read_metadata of ``path``, with the same load_id."""
    ref_reader = FileSystemReader(path)
    ours = RangeFileSystemReader(path)
    ours.load_id = ref_reader.load_id
    return ref_reader.read_metadata(**kwargs), ours.read_metadata(**kwargs)


def state_dict():
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(40, 24, generator=g),
        "wb": torch.randn(17, 9, generator=g).bfloat16(),
        "wt": torch.randn(9, 31, generator=g).t(),
        "i": torch.arange(50),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "nested": {"a": torch.ones(3, 4), "note": "text"},
        "step": 11,
        "blob": b"\x00raw",
    }


def zeros_like(sd):
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd, memory_format=torch.contiguous_format)
    if isinstance(sd, dict):
        return {k: zeros_like(v) for k, v in sd.items()}
    return None


def filled_like(sd, value=-7.0):
    if isinstance(sd, torch.Tensor):
        t = torch.empty_like(sd, memory_format=torch.contiguous_format)
        return t.fill_(True if t.dtype == torch.bool else value)
    if isinstance(sd, dict):
        return {k: filled_like(v, value) for k, v in sd.items()}
    return None


def assert_equal_sd(a, b, where="sd"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_sd(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def rewrite_metadata(path, edit):
    """Load ``path``'s metadata with torch, apply ``edit`` to it, pickle it back as torch does."""
    md = FileSystemReader(str(path)).read_metadata()
    md.storage_meta.load_id = None  # not in files FileSystemWriter writes
    edit(md)
    with open(pathlib.Path(path) / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    sd = state_dict()
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return path, sd


# ---------------------------------------------------------------- metadata equals torch's


@pytest.mark.parametrize("name", ["dcp_small", "dcp_sharded"])
def test_committed_fixtures_read_like_torch(name):
    ref, got = read_both(str(DATA / name))
    assert_identical(ref, got)
    assert got.storage_meta.load_id is not None


def test_fresh_save_reads_like_torch(saved):
    path, _ = saved
    for p in (str(path), path):  # str and PathLike checkpoint ids
        ref, got = read_both(p)
        assert_identical(ref, got)
    # every storage entry keeps torch's classes, with the index hint
    assert {type(v).__name__ for v in got.storage_data.values()} == {"_StorageInfo"}
    assert {type(k).__module__ for k in got.storage_data} == {
        "torch.distributed.checkpoint.metadata"
    }
    assert any(k.index is not None for k in got.storage_data)


def test_load_id_is_stamped_like_torch(saved, tmp_path):
    path, _ = saved
    reader = RangeFileSystemReader(str(path))
    md = reader.read_metadata()
    assert md.storage_meta.load_id == reader.load_id
    reader.reset()  # a new load gets a new id, as in torch
    assert reader.read_metadata().storage_meta.load_id == reader.load_id != md.storage_meta.load_id
    # no storage_meta in the file: torch makes an empty one to hold the id
    copy = tmp_path / "c"
    shutil.copytree(path, copy)
    rewrite_metadata(copy, lambda m: setattr(m, "storage_meta", None))
    ref, got = read_both(str(copy))
    assert_identical(ref, got)
    assert got.storage_meta.checkpoint_id is None and got.storage_meta.load_id is not None


def test_checkpoint_id_given_to_load_is_followed(saved):
    path, sd = saved
    reader = RangeFileSystemReader("/nonexistent/elsewhere")
    got = zeros_like(sd)
    dcp.load(got, checkpoint_id=str(path), storage_reader=reader, no_dist=True)
    assert_equal_sd(sd, got)
    assert pathlib.Path(reader.path) == path


def test_rank_local_metadata_reads_like_torch(tmp_path):
    sd = state_dict()
    path = tmp_path / "ranklocal"
    dcp.save(sd, checkpoint_id=str(path), no_dist=True, use_collectives=False)
    assert (path / "__0.metadata").is_file() and not (path / ".metadata").exists()
    ref, got = read_both(str(path), rank=0)
    assert_identical(ref, got)
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        RangeFileSystemReader(str(path)).read_metadata()  # torch: FileNotFoundError
    # dcp.load falls back to __{rank}.metadata through read_metadata(rank=...)
    got_sd = zeros_like(sd)
    dcp.load(got_sd, storage_reader=RangeFileSystemReader(str(path)), planner=FastLoadPlanner(),
             no_dist=True)
    assert_equal_sd(sd, got_sd)


@pytest.mark.parametrize("planner", ["fast", "default"])
def test_planners_load_through_the_safe_reader(saved, planner):
    path, sd = saved
    make = {"fast": FastLoadPlanner, "default": DefaultLoadPlanner}[planner]
    ref = zeros_like(sd)
    dcp.load(ref, storage_reader=FileSystemReader(str(path)), planner=DefaultLoadPlanner(),
             no_dist=True)
    got = zeros_like(sd)
    dcp.load(got, storage_reader=RangeFileSystemReader(str(path)), planner=make(), no_dist=True)
    assert_equal_sd(ref, got)
    assert_equal_sd(sd, got)


# ---------------------------------------------------------------- code-execution payloads


class _TouchPayload:
    """Unpickles as ``Path(marker).touch()``: harmless, but proves code ran."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _SystemPayload:
    """Unpickles as ``os.system("touch marker")``; only ever fed to the safe reader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, payload, where):
    def edit(md):
        if where == "planner_data":
            md.planner_data = {"w": payload}
        elif where == "storage_meta":
            md.storage_meta.save_id = payload
        else:  # a storage entry's offset
            key = next(iter(md.storage_data))
            md.storage_data[key].offset = payload

    rewrite_metadata(path, edit)


@pytest.mark.parametrize("where", ["planner_data", "storage_meta", "storage_data"])
@pytest.mark.parametrize("payload", [_TouchPayload, _SystemPayload])
def test_code_payload_is_refused_and_never_runs(saved, tmp_path, payload, where):
    path, sd = saved
    copy = tmp_path / "evil"
    shutil.copytree(path, copy)
    marker = tmp_path / "marker"
    _plant(copy, payload(marker), where)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing global"):
        RangeFileSystemReader(str(copy)).read_metadata()
    assert not marker.exists()
    # through dcp.load: both metadata attempts (global, then rank-local) fail
    got = filled_like(sd)
    with pytest.raises(CheckpointException, match="refusing global"):
        dcp.load(got, storage_reader=RangeFileSystemReader(str(copy)), planner=FastLoadPlanner(),
                 no_dist=True)
    assert not marker.exists()
    assert_equal_sd(filled_like(sd), got)


def test_opt_out_restores_torchs_pickle_load(saved, tmp_path):
    path, _ = saved
    copy = tmp_path / "evil"
    shutil.copytree(path, copy)
    marker = tmp_path / "marker"
    _plant(copy, _TouchPayload(marker), "planner_data")
    with pytest.raises(UnsafeCheckpointError):
        RangeFileSystemReader(str(copy), safe_metadata=True).read_metadata()
    assert not marker.exists()
    reader = RangeFileSystemReader(str(copy), safe_metadata=False)
    md = reader.read_metadata()
    assert marker.exists()  # torch's pickle.load ran the payload
    ref = FileSystemReader(str(copy))
    ref.load_id = reader.load_id
    assert_identical(ref.read_metadata(), md)
    assert md.planner_data == {"w": None}  # what Path.touch returned


def test_opt_out_reads_custom_classes(saved, tmp_path):
    """A trusted checkpoint whose planner_data holds a class off the allow-list."""
    path, _ = saved
    copy = tmp_path / "custom"
    shutil.copytree(path, copy)
    rewrite_metadata(copy, lambda m: setattr(m, "planner_data", {"w": _Custom()}))
    with pytest.raises(UnsafeCheckpointError):
        RangeFileSystemReader(str(copy)).read_metadata()
    md = RangeFileSystemReader(str(copy), safe_metadata=False).read_metadata()
    assert md.planner_data == {"w": _Custom()}


@dataclasses.dataclass
class _Custom:
    value: int = 5


# ---------------------------------------------------------------- paths outside the checkpoint


class _Opens:
    """Every path opened in this process while recording (the ``open`` audit event
    covers ``open()``, ``io.open``, ``Path.open`` and ``os.open``)."""

    paths: list[str] | None = None

    @classmethod
    def hook(cls, event, args):
        if event == "open" and cls.paths is not None and args and args[0] is not None:
            p = args[0]
            if isinstance(p, (str, bytes, os.PathLike)):
                cls.paths.append(os.path.abspath(os.fsdecode(p)))


sys.addaudithook(_Opens.hook)  # audit hooks cannot be removed; it idles unless recording


class recording_opens:
    def __enter__(self):
        _Opens.paths = []
        return _Opens.paths

    def __exit__(self, *exc):
        _Opens.paths = None


def _escaping_copy(saved_path, tmp_path, fqn, rel):
    """A copy of the checkpoint at tmp_path/ckpt whose entry for ``fqn`` names ``rel``.

    A readable copy of the data file waits at tmp_path/x, where ``../x`` and
    ``a/../../x`` lead (ckpt/a exists), so a reader that followed the path
    would load successfully instead of failing on a missing file.
    """
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved_path, ckpt)
    (ckpt / "a").mkdir()
    data = sorted(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    shutil.copy(data[0], tmp_path / "x")

    def edit(md):
        hits = [k for k in md.storage_data if k.fqn == fqn]
        assert hits, fqn
        for k in hits:
            md.storage_data[k].relative_path = rel

    rewrite_metadata(ckpt, edit)
    return ckpt


ESCAPES = ["../x", "/etc/passwd", "a/../../x", "x\0y"]


@pytest.mark.parametrize("rel", ESCAPES)
@pytest.mark.parametrize("fqn", ["wt", "blob"])  # a tensor chunk, a bytes item
def test_escaping_path_fails_load_before_any_open(saved, tmp_path, rel, fqn):
    path, sd = saved
    ckpt = _escaping_copy(path, tmp_path, fqn, rel)
    got = filled_like(sd)
    reader = RangeFileSystemReader(str(ckpt))
    with recording_opens() as opened, pytest.raises(CheckpointException) as ei:
        dcp.load(got, storage_reader=reader, planner=FastLoadPlanner(), no_dist=True)
    (err, _trace), = ei.value.failures.values()
    assert isinstance(err, CheckpointError), err
    msg = str(err)
    assert repr(fqn) in msg and "outside the checkpoint directory" in msg
    assert repr(rel)[1:-1] in msg
    # Nothing was read: neither the escaped targets nor the checkpoint's own data files.
    outside = {str(tmp_path / "x"), "/etc/passwd"}
    assert not [p for p in opened if p in outside or p.endswith(".distcp")], opened
    assert reader.stats["read_calls"] == 0 and reader.stats["bytes_read"] == 0
    assert_equal_sd(filled_like(sd), got)


@pytest.mark.parametrize("safe_metadata", [True, False])
def test_read_data_refuses_whatever_loaded_the_metadata(saved, tmp_path, safe_metadata):
    path, sd = saved
    ckpt = _escaping_copy(path, tmp_path, "w", "../x")
    reader = RangeFileSystemReader(str(ckpt), safe_metadata=safe_metadata)
    with pytest.raises(CheckpointException, match=r"names the file '\.\./x'"):
        dcp.load(filled_like(sd), storage_reader=reader, no_dist=True)


def test_fallback_items_are_checked_too(tmp_path, monkeypatch):
    """A conjugate tensor goes through torch's whole-chunk read_data: never reached here."""
    sd = {"cj": torch.randn(6, 4, dtype=torch.complex64).conj(), "plain": torch.randn(5, 5)}
    src = tmp_path / "src"
    dcp.save(sd, checkpoint_id=str(src), no_dist=True)
    good = {"cj": torch.zeros(6, 4, dtype=torch.complex64), "plain": torch.zeros(5, 5)}
    reader = RangeFileSystemReader(str(src))
    dcp.load(good, storage_reader=reader, no_dist=True)
    assert reader.stats["fallback_items"] == 1  # the path under test is the fallback

    ckpt = _escaping_copy(src, tmp_path, "cj", "a/../../x")
    calls = []
    real = FileSystemReader.read_data
    monkeypatch.setattr(FileSystemReader, "read_data",
                        lambda self, *a: calls.append(a) or real(self, *a))
    got = {"cj": torch.zeros(6, 4, dtype=torch.complex64), "plain": torch.zeros(5, 5)}
    with recording_opens() as opened, pytest.raises(CheckpointException,
                                                    match=r"'cj'.*'a/\.\./\.\./x'"):
        dcp.load(got, storage_reader=RangeFileSystemReader(str(ckpt)), no_dist=True)
    assert calls == []
    assert not [p for p in opened if p == str(tmp_path / "x") or p.endswith(".distcp")]


def test_symlinked_file_inside_is_read(saved, tmp_path):
    """Symlinks are not resolved: a plain name inside the directory is read even when it
    is a link (FileSystemWriter never writes one, but copying tools may)."""
    path, sd = saved
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    store = tmp_path / "store"
    store.mkdir()
    for p in ckpt.iterdir():
        if p.suffix == ".distcp":
            shutil.move(p, store / p.name)
            p.symlink_to(store / p.name)
    got = zeros_like(sd)
    dcp.load(got, storage_reader=RangeFileSystemReader(str(ckpt)), planner=FastLoadPlanner(),
             no_dist=True)
    assert_equal_sd(sd, got)


def _move_data_into(ckpt, subdir_maker, rel_dir):
    """Move the data files of ``ckpt`` under ``rel_dir`` (made by ``subdir_maker``)
    and point every storage entry there."""
    target = subdir_maker()
    for p in list(ckpt.iterdir()):
        if p.suffix == ".distcp":
            shutil.move(p, target / p.name)

    def edit(md):
        for info in md.storage_data.values():
            info.relative_path = f"{rel_dir}/{info.relative_path}"

    rewrite_metadata(ckpt, edit)


def test_subdirectory_inside_is_read(saved, tmp_path):
    path, sd = saved
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)

    def make():
        (ckpt / "sub").mkdir()
        return ckpt / "sub"

    _move_data_into(ckpt, make, "sub")
    got = zeros_like(sd)
    dcp.load(got, storage_reader=RangeFileSystemReader(str(ckpt)), planner=FastLoadPlanner(),
             no_dist=True)
    assert_equal_sd(sd, got)


def test_symlinked_directory_is_refused(saved, tmp_path):
    """Only the file itself may be a link: ``sub/f`` with ``sub -> elsewhere`` leaves the
    directory although the name looks inside."""
    path, sd = saved
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    elsewhere = tmp_path / "elsewhere"

    def make():
        elsewhere.mkdir()
        (ckpt / "sub").symlink_to(elsewhere, target_is_directory=True)
        return elsewhere

    _move_data_into(ckpt, make, "sub")
    got = filled_like(sd)
    with recording_opens() as opened, pytest.raises(
        CheckpointException, match=r"CheckpointError: .*'sub/__0_0\.distcp'.*symlinked directory"
    ):
        dcp.load(got, storage_reader=RangeFileSystemReader(str(ckpt)), no_dist=True)
    assert not [p for p in opened if p.endswith(".distcp")], opened
    assert_equal_sd(filled_like(sd), got)


def test_non_string_path_is_refused_with_the_opt_out(saved, tmp_path):
    """torch's pickle.load takes any type; the check does not assume a str."""
    path, sd = saved
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)

    def edit(md):
        for info in md.storage_data.values():
            info.relative_path = ["../x"]  # unhashable as well

    rewrite_metadata(ckpt, edit)
    reader = RangeFileSystemReader(str(ckpt), safe_metadata=False)
    with pytest.raises(CheckpointException, match=r"a list, not a str"):
        dcp.load(filled_like(sd), storage_reader=reader, no_dist=True)


def test_a_fifo_data_file_is_refused_without_blocking(tmp_path):
    # A FIFO where a data file belongs: opening it would wait for a writer.

    sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    dcp.save(sd, checkpoint_id=tmp_path)
    data = next(p for p in tmp_path.iterdir() if p.suffix == ".distcp")
    data.unlink()
    os.mkfifo(data)
    out = {"w": torch.zeros(3, 4)}
    result = {}

    def load():
        try:
            dcp.load(out, checkpoint_id=tmp_path, storage_reader=RangeFileSystemReader(tmp_path),
                     planner=FastLoadPlanner())
        except CheckpointException as e:  # a BaseException: dcp.load wraps each rank's error
            result["error"] = e.failures[0][0]  # (exception, traceback)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the reader blocked on a FIFO"
    assert isinstance(result.get("error"), CheckpointError), result
    assert "regular file" in str(result["error"])


@pytest.mark.parametrize("value", ["no", None, 0, 1])
def test_safe_metadata_must_be_a_bool(value):
    with pytest.raises(TypeError, match="safe_metadata must be True or False"):
        RangeFileSystemReader(DATA / "dcp_small", safe_metadata=value)
