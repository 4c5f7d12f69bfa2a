"""Type stubs for the columnar dedup kernel (see _plan_columns.pyx)."""

import numpy as np
import numpy.typing as npt

def dedup_columns(
    fid: npt.NDArray[np.int64],
    plan: npt.NDArray[np.int32],
    nd: npt.NDArray[np.int32],
    ptr: npt.NDArray[np.int64],
    offs: npt.NDArray[np.int64],
    size: npt.NDArray[np.int64],
    nplans: int,
    save_to_lowest_rank: bool,
) -> tuple[npt.NDArray[np.uint8], bool] | None: ...
