from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

def chunk_arrays(
    chunks: Sequence[Any], fqn: str = ..., ndim: Optional[int] = ...
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def build_read_items(
    fqn: str,
    local_index: npt.NDArray[np.int64],
    saved_index: npt.NDArray[np.int64],
    storage_offsets: npt.NDArray[np.int64],
    dest_offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    local_chunks: Sequence[Any],
    saved_chunks: Sequence[Any] | None,
    read_item_cls: type,
    metadata_index_cls: type,
    tensor_type: Any,
    size_cls: type,
    saved_offsets: npt.NDArray[np.int64] | None = ...,
) -> list[Any]: ...
def read_items(
    fqn: str,
    local_chunks: Sequence[Any],
    saved_chunks: Sequence[Any],
    ndim: int,
    read_item_cls: type,
    metadata_index_cls: type,
    tensor_type: Any,
    size_cls: type,
    verify: bool = ...,
) -> list[Any] | None: ...
def plan_reads(
    fqns: list[Any],
    local_offsets: list[Any],
    local_sizes: list[Any],
    saved: list[Any],
    read_item_cls: type,
    metadata_index_cls: type,
    tensor_type: Any,
    size_cls: type,
    chunk_cls: type,
    verify: bool = ...,
    columns: Any = ...,
    global_sizes: list[Any] | None = ...,
) -> tuple[list[Any], npt.NDArray[np.int64], list[int]]: ...
def new_frozen(cls: type, fields: dict[str, Any]) -> Any: ...
