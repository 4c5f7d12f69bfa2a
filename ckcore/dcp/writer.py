"""``FastFileSystemWriter``: torch's ``FileSystemWriter`` writing ``.metadata`` from columns.

``finish`` does what torch's does (``version``, ``storage_data`` from the
write results, ``storage_meta``, a temporary file renamed into place), but
when the metadata carries columns (a :class:`~ckcore.dcp.ColumnarMetadata`
whose chunks were not replaced) the file is written by
:func:`ckcore.mdcolumns.dumps_metadata` instead of ``pickle.dump``: the same
objects for torch's ``pickle.load``, without building a chunk object. Any
other metadata is pickled exactly as torch does.
"""

from __future__ import annotations

import os
import pickle
from io import UnsupportedOperation
from pathlib import Path
from typing import Any, cast

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _metadata_fn
from torch.distributed.checkpoint.metadata import Metadata

from ckcore.mdcolumns import MetadataColumns, dumps_metadata

from ._lazy_metadata import columns_of

__all__ = ["FastFileSystemWriter"]


def _with_storage(cols: MetadataColumns, metadata: Metadata, storage: dict) -> MetadataColumns:
    """``cols``' tensors with ``storage`` (MetadataIndex -> _StorageInfo) and ``metadata``'s small fields."""
    from ckcore.metadata import StorageMeta

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
        index.append(-1 if key.index is None else key.index)
        rp = getattr(info, "relative_path", None)
        if type(rp) is str:
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
    sm = metadata.storage_meta
    return MetadataColumns(
        cols.fqns, kinds=cols.kinds, properties=cols.properties, size_ptr=cols.size_ptr,
        size_values=cols.size_values, chunk_ptr=cols.chunk_ptr, chunk_offsets=cols.chunk_offsets,
        chunk_sizes=cols.chunk_sizes, extra_names=names[len(cols.fqns):], st_fqn=st_fqn,
        st_offset_ndim=nd, st_offset_values=vals, st_index=index, st_path=path,
        paths=list(paths), st_file_offset=foff, st_length=length, st_transforms=transforms,
        storage_other=other, planner_data=metadata.planner_data,
        storage_meta=None if sm is None else StorageMeta(
            checkpoint_id=sm.checkpoint_id, save_id=sm.save_id, load_id=sm.load_id,
            modules=list(sm.modules)),
        version=metadata.version,
    )


class FastFileSystemWriter(FileSystemWriter):
    """torch's ``FileSystemWriter``; ``finish`` writes ``.metadata`` from columns when it can.

    Constructor and every other method are torch's. The file it writes loads
    with torch's own ``FileSystemReader`` into objects equal to those
    ``pickle.dump`` would have stored.
    """

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        """Record the write results in ``metadata`` and write ``.metadata`` (see the class)."""
        cols = columns_of(metadata)
        if cols is None:
            super().finish(metadata, results)
            return
        metadata.version = CURRENT_DCP_VERSION
        storage_md: dict = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        try:
            data = dumps_metadata(_with_storage(cols, metadata, storage_md))
        except (TypeError, ValueError):
            # Something columns cannot hold (a custom object in planner_data):
            # torch's own pickle of the same metadata.
            data = pickle.dumps(metadata)
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
