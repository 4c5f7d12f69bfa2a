import numpy as np

COVER_OK: int
COVER_VOLUME: int
COVER_OVERLAP: int
COVER_UNDECIDED: int

def check_cover(
    local_index: np.ndarray,
    dest_offsets: np.ndarray,
    lengths: np.ndarray,
    local_sizes: np.ndarray,
    max_pairwise: int = ...,
) -> tuple[int, int, int, int, int]: ...
