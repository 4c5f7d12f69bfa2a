"""Bad input to every public façade function: a clear ValueError/TypeError, never a crash.

Each case names the fqn it passes and what the message must say to identify
the culprit (the chunk's index, its repr, or the array row); the test checks
the exception type and that every one of those strings is in the message.
Torch-free.
"""

from __future__ import annotations

import numpy as np
import pytest

import ckcore
from ckcore import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
    TensorStorageMetadata,
    chunk_arrays,
    create_read_items,
    create_read_items_for_chunk_list,
    create_write_item_for_shard,
    create_write_item_for_tensor,
    intersect_chunks,
)

FQN = "model.layers.7.mlp.w1"
I64_MAX = 2**63 - 1
C = ChunkStorageMetadata


def md(size, chunks):
    return TensorStorageMetadata(TensorProperties(), size, chunks)


class Offsetless:
    """Has .sizes but no .offsets."""

    sizes = (1, 1)

    def __repr__(self):
        return "<Offsetless>"


class SizeOnly:
    def __init__(self):
        self.offsets = (0, 0)

    def __repr__(self):
        return "<SizeOnly>"


GOOD = C((0, 0), (2, 2))

# (id, bad chunk list, exception, strings the message must contain besides the fqn)
BAD_CHUNK_LISTS = [
    ("ndim-mismatch-between-chunks", [GOOD, C((0,), (2,))], ValueError, ["chunk 1", "(0,)"]),
    ("offsets-sizes-length-differ", [GOOD, C((0, 0), (2,))], ValueError, ["chunk 1"]),
    ("negative-offset", [GOOD, GOOD, C((0, -3), (2, 2))], ValueError, ["chunk 2", "-3"]),
    ("negative-size", [C((0, 0), (2, -1))], ValueError, ["chunk 0", "-1"]),
    ("end-beyond-int64", [GOOD, C((I64_MAX, 0), (1, 1))], ValueError, ["chunk 1", "int64"]),
    ("offset-beyond-int64", [C((2**63, 0), (0, 1))], ValueError, ["chunk 0", "int64"]),
    ("size-beyond-uint64", [C((0, 0), (2**70, 1))], ValueError, ["chunk 0", "int64"]),
    ("negative-beyond-int64", [C((-(2**64), 0), (1, 1))], ValueError, ["chunk 0"]),
    ("volume-beyond-int64", [GOOD, C((0, 0), (2**32, 2**32))], ValueError, ["chunk 1", "volume"]),
    ("float-offset", [C((0.0, 0), (1, 1))], TypeError, ["chunk 0", "float"]),
    ("float-size", [GOOD, C((0, 0), (1, 1.5))], TypeError, ["chunk 1", "1.5"]),
    ("numpy-float", [C((np.float64(1), 0), (1, 1))], TypeError, ["chunk 0"]),
    ("string-offset", [C(("0", 0), (1, 1))], TypeError, ["chunk 0", "'0'"]),
    ("none-value", [GOOD, C((None, 0), (1, 1))], TypeError, ["chunk 1", "None"]),
    ("none-offsets", [GOOD, C(None, (1, 1))], TypeError, ["chunk 1"]),
    ("none-sizes-first", [C((0, 0), None)], TypeError, ["chunk 0"]),
    ("nested-tuple", [C(((0,), 0), (1, 1))], TypeError, ["chunk 0"]),
    ("int-offsets", [C(3, (1,))], TypeError, ["chunk 0"]),
    ("set-offsets", [C({0, 1}, (1, 1))], TypeError, ["chunk 0"]),
    ("no-offsets", [GOOD, Offsetless()], TypeError, ["chunk 1", "<Offsetless>"]),
    ("no-sizes", [SizeOnly()], TypeError, ["chunk 0", "<SizeOnly>"]),
    ("no-offsets-first", [Offsetless(), GOOD], TypeError, ["chunk 0", "<Offsetless>"]),
    ("plain-tuple-chunk", [((0, 0), (1, 1))], TypeError, ["chunk 0"]),
    ("none-chunk", [GOOD, None], TypeError, ["chunk 1", "None"]),
]

BAD_IDS = [c[0] for c in BAD_CHUNK_LISTS]


def check(exc_info, *needles):
    msg = str(exc_info.value)
    for needle in (FQN,) + tuple(needles):
        assert needle in msg, f"{needle!r} not in {msg!r}"


@pytest.mark.parametrize("name,chunks,exc,needles", BAD_CHUNK_LISTS, ids=BAD_IDS)
def test_chunk_arrays(name, chunks, exc, needles):
    with pytest.raises(exc) as e:
        chunk_arrays(chunks, FQN)
    check(e, *needles)


@pytest.mark.parametrize("name,chunks,exc,needles", BAD_CHUNK_LISTS, ids=BAD_IDS)
@pytest.mark.parametrize("side", ["local", "saved"])
def test_intersect_chunks(name, chunks, exc, needles, side):
    other = [GOOD]
    args = (chunks, other) if side == "local" else (other, chunks)
    with pytest.raises(exc) as e:
        intersect_chunks(*args, fqn=FQN)
    check(e, *needles)


@pytest.mark.parametrize("name,chunks,exc,needles", BAD_CHUNK_LISTS, ids=BAD_IDS)
@pytest.mark.parametrize("side", ["local", "saved"])
def test_create_read_items_for_chunk_list(name, chunks, exc, needles, side):
    if side == "local":
        args = (md((4, 4), [GOOD]), chunks)
    else:
        args = (md((4, 4), chunks), [GOOD])
    with pytest.raises(exc) as e:
        create_read_items_for_chunk_list(FQN, *args)
    check(e, *needles)
    with pytest.raises(exc) as e:
        create_read_items(FQN, *args)
    check(e, *needles)


@pytest.mark.parametrize("side", ["local", "saved"])
def test_chunks_against_the_tensor_ndim(side):
    wrong = [C((0, 0, 0), (1, 1, 1))]
    args = (md((4, 4), [GOOD]), wrong) if side == "local" else (md((4, 4), wrong), [GOOD])
    with pytest.raises(ValueError) as e:
        create_read_items_for_chunk_list(FQN, *args)
    check(e, "chunk 0", "3 dimensions", "2")
    with pytest.raises(ValueError) as e:
        intersect_chunks(*((wrong, [GOOD]) if side == "local" else ([GOOD], wrong)),
                         fqn=FQN, ndim=2)
    check(e, "3")
    # A chunk list of the right ndim but a 0-d tensor.
    with pytest.raises(ValueError) as e:
        create_read_items_for_chunk_list(FQN, md((), [C((), ())]), [GOOD])
    check(e, "chunk 0")


@pytest.mark.parametrize("bad", [None, 5, 3.5, object()], ids=["None", "int", "float", "object"])
def test_non_list_inputs(bad):
    with pytest.raises(TypeError) as e:
        chunk_arrays(bad, FQN)
    check(e)
    with pytest.raises(TypeError) as e:
        intersect_chunks(bad, [GOOD], fqn=FQN)
    check(e)
    with pytest.raises(TypeError) as e:
        intersect_chunks([GOOD], bad, fqn=FQN)
    check(e)
    with pytest.raises(TypeError) as e:
        create_read_items_for_chunk_list(FQN, md((4, 4), [GOOD]), bad)
    check(e)
    with pytest.raises(TypeError) as e:
        create_read_items_for_chunk_list(FQN, md((4, 4), bad), [GOOD])
    check(e)


def test_strings_are_not_chunk_lists():
    for bad in ("abc", b"abc"):
        with pytest.raises(TypeError) as e:
            intersect_chunks(bad, [GOOD], fqn=FQN)
        check(e)
        with pytest.raises(TypeError) as e:
            chunk_arrays(bad, FQN)
        check(e)


@pytest.mark.parametrize("bad_md", [None, object(), 3, "tensor", [GOOD]],
                         ids=["None", "object", "int", "str", "list"])
def test_bad_storage_metadata(bad_md):
    with pytest.raises(TypeError) as e:
        create_read_items_for_chunk_list(FQN, bad_md, [GOOD])
    check(e)
    with pytest.raises(TypeError) as e:
        create_read_items(FQN, bad_md, [GOOD])
    check(e)


def test_bad_tensor_size_in_metadata():
    for size in (None, 4):
        with pytest.raises(TypeError) as e:
            create_read_items_for_chunk_list(FQN, md(size, [GOOD]), [GOOD])
        check(e)


def test_tensor_metadata_without_local_chunks():
    with pytest.raises(ValueError) as e:
        create_read_items(FQN, md((4, 4), [GOOD]))
    check(e)
    # Bytes metadata needs none.
    assert len(create_read_items(FQN, BytesStorageMetadata())) == 1


# ---------------------------------------------------------------------------
# (offsets, sizes) arrays for intersect_chunks
# ---------------------------------------------------------------------------

def arr(rows, dtype=np.int64):
    return np.array(rows, dtype=dtype)


BAD_ARRAYS = [
    ("float", (arr([[0, 0]], np.float64), arr([[1, 1]], np.float64)), TypeError, ["float64"]),
    ("bool", (arr([[0, 0]], bool), arr([[1, 1]], bool)), TypeError, ["bool"]),
    ("object", (arr([[0, 0]], object), arr([[1, 1]], object)), TypeError, ["object"]),
    ("complex", (arr([[0, 0]], complex), arr([[1, 1]], complex)), TypeError, []),
    ("1-d", (arr([0, 0]), arr([1, 1])), ValueError, ["2-d"]),
    ("3-d", (np.zeros((1, 1, 2), np.int64), np.ones((1, 1, 2), np.int64)), ValueError, ["2-d"]),
    ("shapes-differ", (arr([[0, 0], [1, 1]]), arr([[1, 1]])), ValueError, ["(2, 2)", "(1, 2)"]),
    ("ndim-differs", (arr([[0, 0, 0]]), arr([[1, 1, 1]])), ValueError, ["3", "2"]),
    ("negative-offset", (arr([[0, 0], [0, -1]]), arr([[1, 1], [1, 1]])), ValueError,
     ["chunk 1", "negative"]),
    ("negative-size", (arr([[0, 0]]), arr([[-1, 1]])), ValueError, ["chunk 0", "negative"]),
    ("end-overflow", (arr([[I64_MAX, 0]]), arr([[1, 0]])), ValueError, ["chunk 0", "int64"]),
    ("volume-overflow", (arr([[0, 0]]), arr([[2**40, 2**40]])), ValueError, ["chunk 0", "volume"]),
    ("uint64-beyond-int64", (arr([[2**63, 0]], np.uint64), arr([[1, 1]], np.uint64)), ValueError,
     ["int64"]),
]


@pytest.mark.parametrize("name,pair,exc,needles", BAD_ARRAYS, ids=[c[0] for c in BAD_ARRAYS])
@pytest.mark.parametrize("side", ["local", "saved"])
def test_intersect_chunks_arrays(name, pair, exc, needles, side):
    other = [GOOD]
    args = (pair, other) if side == "local" else (other, pair)
    with pytest.raises(exc) as e:
        intersect_chunks(*args, fqn=FQN)
    check(e, side, *needles)


def test_intersect_chunks_arrays_of_other_integer_dtypes_are_accepted():
    # Narrower integers and non-contiguous or byte-swapped int64 arrays are fine.
    base = np.zeros((4, 4), np.int64)
    for off, size in ((arr([[0, 0]], np.int32), arr([[2, 2]], np.int32)),
                      (arr([[0, 0]], np.uint16), arr([[2, 2]], np.uint8)),
                      (arr([[0, 0]], ">i8"), arr([[2, 2]], ">i8")),
                      (base[:1, ::2], (base + 2)[:1, ::2])):
        r = intersect_chunks((off, size), [GOOD], fqn=FQN)
        assert r.local_index.tolist() == [0]
        assert r.lengths.tolist() == [[2, 2]]


def test_intersect_chunks_local_and_saved_ndim_differ():
    with pytest.raises(ValueError) as e:
        intersect_chunks([C((0,), (1,))], [GOOD], fqn=FQN)
    check(e, "1", "2")


# ---------------------------------------------------------------------------
# Write-item constructors
# ---------------------------------------------------------------------------

BAD_SIZES = [
    ("none", None, TypeError),
    ("int", 4, TypeError),
    ("float", (2.0, 3), TypeError),
    ("string", ("2", 3), TypeError),
    ("none-value", (None, 3), TypeError),
    ("negative", (2, -3), ValueError),
    ("beyond-int64", (2**63, 1), ValueError),
    ("volume-beyond-int64", (2**40, 2**40), ValueError),
]


@pytest.mark.parametrize("name,size,exc", BAD_SIZES, ids=[c[0] for c in BAD_SIZES])
def test_create_write_item_for_tensor(name, size, exc):
    with pytest.raises(exc) as e:
        create_write_item_for_tensor(FQN, size)
    check(e)


@pytest.mark.parametrize("name,bad,exc", BAD_SIZES, ids=[c[0] for c in BAD_SIZES])
@pytest.mark.parametrize("which", ["offsets", "sizes", "global_size"])
def test_create_write_item_for_shard(name, bad, exc, which):
    args = {"offsets": (0, 0), "sizes": (2, 3), "global_size": (4, 6)}
    args[which] = bad
    if name == "volume-beyond-int64" and which != "global_size":
        # A chunk cannot have a bigger volume than a valid tensor it lies in: this is the
        # "outside the tensor" error instead.
        exc = ValueError
    with pytest.raises(exc) as e:
        create_write_item_for_shard(FQN, args["offsets"], args["sizes"], args["global_size"])
    check(e)


@pytest.mark.parametrize("offsets,sizes,global_size,needle", [
    ((0,), (2, 3), (4, 6), "dimensions"),
    ((0, 0), (2, 3), (4,), "dimensions"),
    ((3, 0), (2, 3), (4, 6), "outside"),
    ((0, 4), (2, 3), (4, 6), "outside"),
    ((I64_MAX, 0), (1, 1), (I64_MAX, 1), "outside"),
])
def test_create_write_item_for_shard_geometry(offsets, sizes, global_size, needle):
    with pytest.raises(ValueError) as e:
        create_write_item_for_shard(FQN, offsets, sizes, global_size)
    check(e, needle, str(offsets))


def test_write_items_accept_good_input():
    # The checks above must not reject what is valid: 0-d, zero sizes, int64's edge.
    assert create_write_item_for_tensor(FQN, ()).tensor_data.size == ()
    assert create_write_item_for_tensor(FQN, (0, 2**62)).tensor_data.size == (0, 2**62)
    w = create_write_item_for_shard(FQN, (I64_MAX - 1,), (1,), (I64_MAX,))
    assert w.tensor_data.chunk.offsets == (I64_MAX - 1,)
    assert create_write_item_for_shard(FQN, (4, 6), (0, 0), (4, 6)).index.offset == (4, 6)


# ---------------------------------------------------------------------------
# Plan helpers
# ---------------------------------------------------------------------------

def test_merge_delta_local_plans_mismatched_lengths():
    plans = [ckcore.SavePlan([]), ckcore.SavePlan([])]
    with pytest.raises(ValueError, match="2 cached plans but 1 delta plans"):
        ckcore.merge_delta_local_plans(plans, plans[:1])
    with pytest.raises(ValueError, match="0 cached plans but 2 delta plans"):
        ckcore.merge_delta_local_plans([], plans)


def test_plan_helpers_on_non_plans_raise_not_crash():
    plan = ckcore.SavePlan([])
    for bad in (None, 3, object()):
        with pytest.raises((TypeError, AttributeError)):
            ckcore.compare_save_plans(plan, bad)
    with pytest.raises(TypeError):
        ckcore.contains_usable_plan(None)
    with pytest.raises(TypeError):
        ckcore.merge_delta_local_plans(None, [plan])


def test_zero_volume_is_not_an_overflow():
    # A chunk with a zero size has volume 0 however large its other sizes are; only a
    # volume that really exceeds int64 is refused (torch plans such chunks fine).
    big = C((0, 0, 0), (2**40, 2**40, 0))
    off, size = chunk_arrays([big, C((0, 0, 0), (0, 2**40, 2**40))], FQN)
    assert size.tolist() == [[2**40, 2**40, 0], [0, 2**40, 2**40]]
    r = intersect_chunks([big], [C((0, 0, 0), (2**40, 1, 1))], fqn=FQN)
    assert len(r) == 0  # zero-size on the boundary of dimension 2: no overlap
    r = intersect_chunks((off, size), (off, size), fqn=FQN)
    assert len(r) == 0
    assert create_write_item_for_tensor(FQN, (2**40, 2**40, 0)).tensor_data.size[2] == 0
    # A real overflow is still caught, before and after a dimension of size 1.
    with pytest.raises(ValueError, match="volume"):
        chunk_arrays([C((0, 0, 0), (2**40, 1, 2**40))], FQN)
    with pytest.raises(ValueError, match="volume"):
        intersect_chunks((arr([[0, 0, 0]]), arr([[2**40, 2**40, 1]])), [big], fqn=FQN)


def test_empty_chunk_lists_keep_the_tensor_ndim():
    off, size = chunk_arrays([], FQN, ndim=3)
    assert off.shape == size.shape == (0, 3) and off.dtype == np.int64
    r = intersect_chunks([], [C((0, 0, 0), (1, 1, 1))], fqn=FQN, ndim=3)
    assert len(r) == 0 and r.lengths.shape == (0, 3)
