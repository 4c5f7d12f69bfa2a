"""MetadataColumns to torch ``.metadata`` pickle bytes (compiled)."""

from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

@disjoint_base
class Encoder:
    memo: int
    def op(self, code: bytes) -> None: ...
    def text(self, s: str) -> None: ...
    def integer(self, v: int) -> None: ...
    def memoize(self) -> int: ...
    def get(self, idx: int) -> None: ...
    def size(self, values: Any, size_cls: int) -> None: ...
    def getvalue(self) -> bytes: ...
    def chunk_lists(
        self,
        chunk_ptr: npt.NDArray[np.int64],
        size_ptr: npt.NDArray[np.int64],
        offsets: npt.NDArray[np.int64],
        sizes: npt.NDArray[np.int64],
        tensor: int,
        chunk_cls: int,
        size_cls: int,
        k_offsets: int,
        k_sizes: int,
    ) -> None: ...
    def storage_entries(
        self,
        start: int,
        stop: int,
        fqn_memo: npt.NDArray[np.int64],
        st_fqn: npt.NDArray[np.int64],
        st_nd: npt.NDArray[np.int64],
        st_optr: npt.NDArray[np.int64],
        st_vals: npt.NDArray[np.int64],
        st_index: npt.NDArray[np.int64],
        path_memo: npt.NDArray[np.int64],
        st_path: npt.NDArray[np.int64],
        st_foff: npt.NDArray[np.int64],
        st_len: npt.NDArray[np.int64],
        keys: npt.NDArray[np.int64],
    ) -> None: ...
