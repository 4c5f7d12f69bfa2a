import numpy as np
import numpy.typing as npt

BOX_OK: int
BOX_NEGATIVE_OFFSET: int
BOX_NEGATIVE_SIZE: int
BOX_END_OVERFLOW: int
BOX_VOLUME_OVERFLOW: int

def check_boxes(offsets: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]) -> tuple[int, int]: ...
def intersect(
    local_offsets: npt.NDArray[np.int64],
    local_sizes: npt.NDArray[np.int64],
    saved_offsets: npt.NDArray[np.int64],
    saved_sizes: npt.NDArray[np.int64],
    path: str = ...,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]: ...
def _py_live_indexes() -> int: ...
def _py_fail_reserve(on: bool) -> None: ...
def _py_index_summary(offsets: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]) -> dict: ...
