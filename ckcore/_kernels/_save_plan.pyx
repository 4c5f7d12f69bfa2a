"""torch's ``create_default_global_save_plan``, compiled.

Every fqn's metadata collects its write items' chunks in plan order and,
with index hints rewritten, each tensor item is copied with its chunk's
position in that list. The loop is torch's; the objects are made without
``dataclasses.replace`` (:mod:`_plan_objects`). Façade:
:func:`ckcore.global_plan.create_global_save_plan`.
"""

from ckcore._kernels._plan_objects cimport (
    BYTE_IO, SHARD, HintInts, item_category, item_with_hint, plan_with_items,
)


def create_global_save_plan(all_plans, bint rewrite_index_hints,
                            metadata_cls, tensor_md_cls, bytes_md_cls):
    """See ckcore.global_plan.create_global_save_plan (torch's create_default_global_save_plan)."""
    cdef dict md = {}
    cdef dict chunk_lists = {}
    cdef list new_plans = []
    cdef list new_items, chunks
    cdef int cat
    cdef object items, item, index, fqn, td, tmd, chunk, new_item, t
    cdef HintInts hints = HintInts()
    # Snapshots of the plan list and of each item list: another thread (or
    # Python code run by an attribute read) may change the caller's lists.
    for plan in tuple(all_plans):
        items = tuple(plan.items)
        new_items = []
        for item in items:
            t = item.type
            cat = item_category(t)
            index = item.index
            fqn = index.fqn
            if cat != SHARD:
                if fqn in md:
                    raise AssertionError("item.index.fqn not in md")
            if cat == BYTE_IO:
                md[fqn] = bytes_md_cls()
                chunk_lists.pop(fqn, None)
                new_items.append(item)
                continue
            td = item.tensor_data
            if td is None:
                raise AssertionError("item.tensor_data is not None")
            chunks = chunk_lists.get(fqn)
            if chunks is None:
                tmd = md.get(fqn)
                if tmd is None:
                    tmd = tensor_md_cls(properties=td.properties, size=td.size, chunks=[])
                    md[fqn] = tmd
                # A bytes entry has no .chunks: the same AttributeError as torch.
                chunks = tmd.chunks
                chunk_lists[fqn] = chunks
            new_item = item
            if rewrite_index_hints:
                new_item = item_with_hint(item, index, fqn, index.offset, t, td,
                                          hints.get(len(chunks)))
            chunk = td.chunk
            if chunk is None:
                raise AssertionError(f"""
                    Cannot create MD for tensor without bounds.
                    FQN: {index.fqn}
                """)
            chunks.append(chunk)
            new_items.append(new_item)
        new_plans.append(plan_with_items(plan, new_items))
    return new_plans, metadata_cls(md)
