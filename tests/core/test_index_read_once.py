"""A chunk value that is an integer by ``__index__`` (numpy's) is converted once.

The chunk readers (``_validate.chunk_rows``, ``_items.chunk_arrays`` and
``read_items``) report a value beyond int64 with the value in the message.
That value is the one ``__index__`` returned: the readers must not call
``__index__`` a second time to write the message (a second call may return
something else, or raise, and then the user sees that instead of the int64
error).
"""

from __future__ import annotations

import pytest

from ckcore import metadata as cm
from ckcore._kernels import _items, _validate
from ckcore.planner import ReadItem


class OnceBig:
    """An integer by __index__ beyond int64, that refuses to be read twice."""

    def __init__(self):
        self.calls = 0

    def __index__(self):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("__index__ called again")
        return 2**70


class Chunk:
    def __init__(self, offsets, sizes):
        self.offsets = offsets
        self.sizes = sizes


def _readers():
    yield "chunk_rows", lambda chunks: _validate.chunk_rows("t", chunks, 2)
    yield "chunk_arrays", lambda chunks: _items.chunk_arrays(chunks, "t", 2)
    local = [cm.ChunkStorageMetadata((0, 0), (8, 8))]
    yield "read_items", lambda chunks: _items.read_items(
        "t", local, chunks, 2, ReadItem, cm.MetadataIndex, "T", tuple, True)


@pytest.mark.parametrize("name,read", list(_readers()))
@pytest.mark.parametrize("where", ["offsets", "sizes"])
def test_index_beyond_int64_is_read_once(name, read, where):
    big = OnceBig()
    if where == "offsets":
        bad = Chunk((big, 0), (4, 8))
    else:
        bad = Chunk((4, 0), (big, 8))
    chunks = [cm.ChunkStorageMetadata((0, 0), (4, 8)), bad]
    with pytest.raises(ValueError, match=rf"{where} value {2**70} does not fit in int64"):
        read(chunks)
    assert big.calls == 1
