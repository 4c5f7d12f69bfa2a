"""Type stub of the compiled layout kernel (see _layout.pyx)."""

import numpy as np
import numpy.typing as npt

PLACEMENT_REPLICATE: int
PLACEMENT_SHARD: int
PLACEMENT_STRIDED: int

def layout_all(
    global_shape: npt.NDArray[np.int64],
    mesh_shape: npt.NDArray[np.int64],
    kinds: npt.NDArray[np.int64],
    dims: npt.NDArray[np.int64],
    split_factors: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def layout_coordinate(
    global_shape: npt.NDArray[np.int64],
    mesh_shape: npt.NDArray[np.int64],
    kinds: npt.NDArray[np.int64],
    dims: npt.NDArray[np.int64],
    split_factors: npt.NDArray[np.int64],
    coordinate: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def layout_all_many(
    shapes: npt.NDArray[np.int64],
    mesh_shape: npt.NDArray[np.int64],
    kinds: npt.NDArray[np.int64],
    dims: npt.NDArray[np.int64],
    split_factors: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def layout_coordinate_many(
    shapes: npt.NDArray[np.int64],
    mesh_shape: npt.NDArray[np.int64],
    kinds: npt.NDArray[np.int64],
    dims: npt.NDArray[np.int64],
    split_factors: npt.NDArray[np.int64],
    coordinate: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def _py_chunk(c: int, n: int, r: int) -> tuple[int, int]: ...
def _py_strided(c: int, sf: int, n: int, r: int) -> tuple[int, int]: ...
