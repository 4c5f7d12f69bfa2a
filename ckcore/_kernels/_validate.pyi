"""Type stubs for the compiled global-plan validation kernel (see _validate.pyx)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

def chunk_rows(
    key: Any, chunks: Sequence[Any], ndim: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def _self_overlap_pairs(
    offs: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]: ...
def _check_tensor(
    offs: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    tsize: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], int | None, npt.NDArray[np.int64]]: ...
def _check_tensor_bounded(
    offs: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    tsize: npt.NDArray[np.int64],
    keep: int,
    stop: int,
    budget: int,
) -> tuple[npt.NDArray[np.int64], int | None, npt.NDArray[np.int64], int, bool, bool, int]: ...
