"""``FastFileSystemWriter``: torch's ``FileSystemWriter`` writing ``.metadata`` from columns.

``write_data`` returns torch's write results in a list that pickles as
packed columns (:class:`~ckcore.dcp._compact.SentWriteResults`), so the
gather of every rank's results to the coordinator carries a few kB per rank
and builds no object there. ``finish`` does what torch's does (``version``,
``storage_data`` from the write results, ``storage_meta``, a temporary file
renamed into place), but when the metadata carries columns (a
:class:`~ckcore.dcp.ColumnarMetadata` whose chunks were not replaced) and
the results arrive as columns, the storage entries are joined as arrays and
the file is written by :func:`ckcore.mdcolumns.dumps_metadata` instead of
``pickle.dump``: the same objects for torch's ``pickle.load``, without a
Python object per chunk or entry. Any other metadata is pickled exactly as
torch does.
"""

from __future__ import annotations

import os
import pickle
from io import UnsupportedOperation
from pathlib import Path
from typing import Any, cast

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _metadata_fn, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.futures import Future

from ckcore.compact import ResultColumns, storage_columns
from ckcore.mdcolumns import MetadataColumns, dumps_metadata

from ._compact import SentWriteResults, WriteResultColumns, result_columns
from ._lazy_metadata import ColumnarMetadata, columns_of, small_fields, tensor_part

__all__ = ["FastFileSystemWriter"]


def _results_as_columns(results: list[Any]) -> list[ResultColumns] | None:
    """Each rank's write results as columns, or None if one rank's are not torch's plain form.

    Results that arrived packed are used as they came (unless something
    built and so may have changed their objects); a list is packed here.
    """
    out = []
    tables: dict = {}
    for r in results:
        if type(r) is WriteResultColumns and r._list is None:
            out.append(r.columns(tables))
            continue
        rc = result_columns(r) if isinstance(r, (list, tuple, WriteResultColumns)) else None
        if rc is None:
            return None
        out.append(rc)
    return out


def _storage_from_columns(cols: MetadataColumns, metadata: Metadata,
                          results: list[Any]) -> MetadataColumns | None:
    """``cols``' tensors with the results' storage entries (joined as arrays) and small fields.

    None when a rank's results are not in torch's plain form or two share
    a key: the caller then builds torch's dict.
    """
    rcs = _results_as_columns(results)
    if rcs is None:
        return None
    part = storage_columns(cols.fqns, rcs)
    if part is None:
        return None
    try:
        return MetadataColumns(cols.fqns, **tensor_part(cols), **part, **small_fields(metadata))
    except (TypeError, ValueError):
        return None


def _assign_storage(metadata: Metadata, results: list[Any]) -> None:
    """torch's ``finish``: ``metadata.storage_data`` from every rank's results, the last value per key."""
    storage_md: dict = {}
    for wr_list in results:
        storage_md.update({wr.index: wr.storage_data for wr in wr_list})
    metadata.storage_data = storage_md


# The attributes of a torch ``_StorageInfo`` the columns hold; an instance
# with others (or of a subclass) is kept as an object, as torch pickles it.
_INFO_FIELDS = frozenset({"relative_path", "offset", "length", "transform_descriptors"})


def _with_storage(cols: MetadataColumns, metadata: Metadata, storage: dict) -> MetadataColumns:
    """``cols``' tensors with ``storage`` (MetadataIndex -> _StorageInfo) and ``metadata``'s small fields."""
    names = list(cols.fqns)
    ids = dict(cols._fqn_ids)
    st_fqn, nd, vals, index, path, foff, length = [], [], [], [], [], [], []
    paths: dict[str, int] = {}
    transforms: dict[int, Any] = {}
    other: dict[int, Any] = {}
    for row, (key, info) in enumerate(storage.items()):
        fid = ids.get(key.fqn)
        if fid is None:
            fid = ids[key.fqn] = len(names)
            names.append(key.fqn)
        st_fqn.append(fid)
        off = key.offset
        if off is None:
            nd.append(-1)
        else:
            nd.append(len(off))
            vals.extend(off)
        hint = key.index
        if type(key) is not MetadataIndex or (hint is not None and (type(hint) is not int
                                                                   or hint < 0)):
            # A hint the columns cannot hold (-1 is their "None") or a key of
            # another class: torch's pickle keeps it as it is.
            raise ValueError(f"storage key {key!r} cannot be written from columns")
        index.append(-1 if hint is None else hint)
        rp = getattr(info, "relative_path", None)
        if type(info) is _StorageInfo and type(rp) is str and set(vars(info)) <= _INFO_FIELDS:
            path.append(paths.setdefault(rp, len(paths)))
            foff.append(info.offset)
            length.append(info.length)
            td = getattr(info, "transform_descriptors", None)
            if td is not None:
                transforms[row] = td
        else:
            path.append(-1)
            foff.append(0)
            length.append(0)
            other[row] = info
    return MetadataColumns(
        cols.fqns, **tensor_part(cols), extra_names=names[len(cols.fqns):], st_fqn=st_fqn,
        st_offset_ndim=nd, st_offset_values=vals, st_index=index, st_path=path,
        paths=list(paths), st_file_offset=foff, st_length=length, st_transforms=transforms,
        storage_other=other, **small_fields(metadata))


class FastFileSystemWriter(FileSystemWriter):
    """torch's ``FileSystemWriter``: compact write results, ``.metadata`` written from columns.

    Constructor and every other method are torch's. ``write_data``'s results
    are torch's ``WriteResult`` objects in a list that pickles compactly;
    ``finish`` writes a file that loads with torch's own ``FileSystemReader``
    into objects equal to those ``pickle.dump`` would have stored.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[Any]]:
        """torch's ``write_data``; its results travel to the coordinator as packed columns."""
        return super().write_data(plan, planner).then(lambda fut: SentWriteResults(fut.value()))

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        """Record the write results in ``metadata`` and write ``.metadata`` (see the class)."""
        cols = columns_of(metadata)
        if cols is None:
            super().finish(metadata, results)
            return
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_meta = self.storage_meta()
        data = None
        stored = _storage_from_columns(cols, metadata, results)
        assigned = stored is None
        if assigned:
            _assign_storage(metadata, results)
            storage_md = metadata.storage_data
            try:
                stored = _with_storage(cols, metadata, storage_md)
            except (TypeError, ValueError):
                stored = None
        if stored is not None:
            try:
                data = dumps_metadata(stored)
            except (TypeError, ValueError):
                pass
        if data is None:
            # Something columns cannot hold (a custom object in planner_data or
            # storage_data): torch's own pickle of the same metadata, whose
            # storage_data must then be torch's dict of the results (when
            # they were joined as columns, it was not assigned yet).
            if not assigned:
                _assign_storage(metadata, results)
            data = pickle.dumps(metadata)
        elif type(metadata) is ColumnarMetadata:
            # The columns now hold every field; storage_data is built from
            # them when read (equal to the dict torch's finish assigns).
            state = metadata.__dict__
            state["ck_columns"] = stored
            state["_ck_values"].pop("storage_data", None)
            state["_ck_view"] = None
        self._write_metadata_file(data)

    def _write_metadata_file(self, data: bytes) -> None:
        """``data`` to ``.metadata`` as torch's ``finish`` writes it: a temporary file renamed."""
        tmp_filename = (
            f"__{self.rank}{_metadata_fn}.tmp"
            if not self.use_collectives and self.rank is not None
            else f"{_metadata_fn}.tmp"
        )
        tmp_path = cast(Path, self.fs.concat_path(self.path, tmp_filename))
        with self.fs.create_stream(tmp_path, "wb") as metadata_file:
            metadata_file.write(data)
            if self.sync_files:
                try:
                    os.fsync(metadata_file.fileno())
                except (AttributeError, UnsupportedOperation):
                    os.sync()
        if not self.use_collectives and self.rank is not None:
            metadata_path = self._get_metadata_path(self.rank)
        else:
            metadata_path = self._get_metadata_path()
        if self.fs.exists(metadata_path):
            self.fs.rm_file(metadata_path)
        self.fs.rename(tmp_path, metadata_path)
