"""Type stubs for the compiled byte-range kernel (see ckcore.ranges for the façade)."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

IOVECS_PER_CALL: int
DISCARD_BYTES: int

def box_runs(
    shape: npt.NDArray[np.int64],
    strides: npt.NDArray[np.int64],
    itemsize: int,
    base: int,
    offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
) -> tuple[int, int, int]: ...
def byte_ranges(
    shape: npt.NDArray[np.int64],
    strides: npt.NDArray[np.int64],
    itemsize: int,
    base: int,
    offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]: ...
def coalesce(
    ranges: npt.NDArray[np.int64], max_gap: int, max_overread: float
) -> npt.NDArray[np.int64]: ...
def copy_box(
    src: Buffer,
    src_shape: npt.NDArray[np.int64],
    src_strides: npt.NDArray[np.int64],
    src_base: int,
    src_offsets: npt.NDArray[np.int64],
    dst: Buffer,
    dst_shape: npt.NDArray[np.int64],
    dst_strides: npt.NDArray[np.int64],
    dst_base: int,
    dst_offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    itemsize: int,
) -> None: ...
def paired_runs(
    src_shape: npt.NDArray[np.int64],
    src_strides: npt.NDArray[np.int64],
    src_base: int,
    src_offsets: npt.NDArray[np.int64],
    dst_shape: npt.NDArray[np.int64],
    dst_strides: npt.NDArray[np.int64],
    dst_base: int,
    dst_offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    itemsize: int,
) -> npt.NDArray[np.int64]: ...
def paired_run_info(
    src_shape: npt.NDArray[np.int64],
    src_strides: npt.NDArray[np.int64],
    src_offsets: npt.NDArray[np.int64],
    dst_shape: npt.NDArray[np.int64],
    dst_strides: npt.NDArray[np.int64],
    dst_offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    itemsize: int,
) -> tuple[int, int]: ...
def read_runs(
    fd: int,
    runs: npt.NDArray[np.int64],
    blocks: npt.NDArray[np.int64],
    dst: Buffer,
    prefetch: int,
) -> tuple[int, int]: ...
