"""The torch-free verified load path: ``create_read_items(..., verify_cover=True)``.

The reads of a load must fill every local chunk exactly once. ckcore's core
refuses saved chunks that leave a hole or overlap inside a local chunk, with
the messages FastLoadPlanner raises (tests/test_dcp_helpers.py checks the
torch path gives the same ones); a cover that holds gives exactly the
unverified items.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckcore
from ckcore import (
    CKCORE_CLASSES,
    ChunkStorageMetadata,
    ItemClasses,
    TensorProperties,
    TensorStorageMetadata,
    create_read_items,
    create_read_items_for_chunk_list,
)
from tests.support.reference import fills_exactly

C = ChunkStorageMetadata


def _md(size, chunks):
    return TensorStorageMetadata(TensorProperties(), tuple(size), list(chunks))


def _verified(size, saved, local):
    return create_read_items("w", _md(size, saved), list(local), verify_cover=True)


#: (size, saved chunks, local chunks, the exact message).
REFUSED = {
    "hole": (
        (4, 4), [C((0, 0), (2, 4))], [C((0, 0), (4, 4))],
        "checkpoint metadata does not fill w: local chunk 0 (offsets=(0, 0), sizes=(4, 4)) "
        "would get only 8 of its 16 elements from the saved chunks (is the .metadata damaged?)",
    ),
    "no saved chunks": (
        (4,), [], [C((0,), (4,))],
        "checkpoint metadata does not fill w: local chunk 0 (offsets=(0,), sizes=(4,)) "
        "would get only 0 of its 4 elements from the saved chunks (is the .metadata damaged?)",
    ),
    "overlap, too many elements": (
        (4, 4), [C((0, 0), (3, 4)), C((2, 0), (2, 4))], [C((0, 0), (4, 4))],
        "checkpoint metadata for w has saved chunks that overlap inside local chunk 0 "
        "(offsets=(0, 0), sizes=(4, 4)): they hold 20 elements for its 16 "
        "(is the .metadata damaged?)",
    ),
    "overlap and hole, volume adds up": (
        (4,), [C((0,), (2,)), C((1,), (2,))], [C((0,), (4,))],
        "checkpoint metadata for w has saved chunks that overlap inside local chunk 0 "
        "(offsets=(0,), sizes=(4,)): ChunkStorageMetadata(offsets=(0,), sizes=(2,)) and "
        "ChunkStorageMetadata(offsets=(1,), sizes=(2,)) (is the .metadata damaged?)",
    ),
    "second local chunk": (
        (4,), [C((0,), (3,))], [C((0,), (2,)), C((2,), (2,))],
        "checkpoint metadata does not fill w: local chunk 1 (offsets=(2,), sizes=(2,)) "
        "would get only 1 of its 2 elements from the saved chunks (is the .metadata damaged?)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refuses_holes_and_overlaps_with_the_planner_messages(case):
    size, saved, local, message = REFUSED[case]
    with pytest.raises(ValueError) as e:
        _verified(size, saved, local)
    assert str(e.value) == message
    # Unverified, the same layout plans whatever overlaps, as torch does.
    create_read_items("w", _md(size, saved), local)
    with pytest.raises(ValueError) as e2:
        create_read_items_for_chunk_list("w", _md(size, saved), local, verify_cover=True)
    assert str(e2.value) == message


@pytest.mark.parametrize("overlap", [False, True])
def test_many_reads_into_one_chunk(overlap):
    # 100 reads into one local chunk: past the pairwise limit of the cover
    # check, decided with the intersection kernel.
    saved = [C((i,), (1,)) for i in range(100)]
    if overlap:
        # 49 read twice, 51 never: the volumes still add up to 100.
        saved[50] = C((49,), (2,))
        saved[51] = C((52,), (0,))
    local = [C((0,), (100,))]
    if overlap:
        with pytest.raises(ValueError, match=r"for w has saved chunks that overlap inside local "
                                             r"chunk 0 \(offsets=\(0,\), sizes=\(100,\)\): "):
            _verified((100,), saved, local)
    else:
        assert _verified((100,), saved, local) == create_read_items("w", _md((100,), saved), local)


def test_sound_cover_gives_the_unverified_items_in_the_given_classes():
    class Size(tuple):
        pass

    classes = ItemClasses(CKCORE_CLASSES.read_item, CKCORE_CLASSES.metadata_index,
                          CKCORE_CLASSES.load_item_type, Size)
    saved = [C((r, c), (2, 2)) for r in (0, 2) for c in (0, 2)]
    local = [C((1, 0), (2, 4))]
    md = _md((4, 4), saved)
    got = create_read_items("w", md, local, classes, verify_cover=True)
    assert got == create_read_items("w", md, local, classes)
    assert len(got) == 4 and all(type(r.lengths) is Size for r in got)
    # No local chunks: nothing to fill, nothing to read.
    assert create_read_items("w", md, [], verify_cover=True) == []


def test_bytes_metadata_is_not_checked():
    from ckcore import BytesStorageMetadata

    assert create_read_items("b", BytesStorageMetadata(), None, verify_cover=True) == (
        create_read_items("b", BytesStorageMetadata(), None))


@st.composite
def _boxes(draw, shape, max_n):
    out = []
    for _ in range(draw(st.integers(0, max_n))):
        offs = [draw(st.integers(0, s)) for s in shape]
        out.append(C(tuple(offs), tuple(draw(st.integers(0, s - o)) for s, o in zip(shape, offs))))
    return out


@st.composite
def _grid(draw, shape):
    cuts = [sorted(set(draw(st.lists(st.integers(1, s - 1), max_size=3)))) if s > 1 else []
            for s in shape]
    bounds = [[0, *c, s] for c, s in zip(cuts, shape)]
    chunks = [()]
    for b in bounds:
        chunks = [ch + ((lo, hi),) for ch in chunks for lo, hi in zip(b, b[1:])]
    return [C(tuple(lo for lo, _ in ch), tuple(hi - lo for lo, hi in ch)) for ch in chunks]


@st.composite
def _case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    saved = draw(_grid(shape)) if draw(st.booleans()) else draw(_boxes(shape, 6))
    if saved and draw(st.booleans()):
        saved = [c for i, c in enumerate(saved) if i != draw(st.integers(0, len(saved) - 1))]
    local = draw(_grid(shape)) if draw(st.booleans()) else draw(_boxes(shape, 3))
    return shape, saved, local


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_refuses_exactly_the_layouts_that_do_not_fill(case):
    shape, saved, local = case
    if fills_exactly(shape, saved, local):
        assert _verified(shape, saved, local) == create_read_items("w", _md(shape, saved), local)
    else:
        with pytest.raises(ValueError, match=r"checkpoint metadata (does not fill w: |for w has "
                                             r"saved chunks that overlap inside local chunk )"):
            _verified(shape, saved, local)


def test_verified_call_does_not_import_torch():
    code = (
        "import sys\n"
        "from ckcore import ChunkStorageMetadata as C, TensorProperties, TensorStorageMetadata\n"
        "from ckcore.items import create_read_items\n"
        "md = TensorStorageMetadata(TensorProperties(), (4,), [C((0,), (2,))])\n"
        "try:\n"
        "    create_read_items('w', md, [C((0,), (4,))], verify_cover=True)\n"
        "except ValueError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(ckcore.__file__).resolve().parent.parent))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
