"""Type stubs for the columnar dedup and chunk-row kernels (see _plan_columns.pyx)."""

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

def chunk_rows(
    fid: npt.NDArray[np.int64],
    kind: npt.NDArray[np.int8],
    pid: npt.NDArray[np.int64],
    nd: npt.NDArray[np.int64],
    ptr: npt.NDArray[np.int64],
    offs: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    keep: npt.NDArray[np.uint8] | None,
    nfqns: int,
) -> (
    tuple[
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
    ]
    | None
): ...
