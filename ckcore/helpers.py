"""Re-exports of :mod:`ckcore.items` for ``ckcore/cli.py``, which imports these names from here.

Delete this module once cli.py imports them from :mod:`ckcore.items`;
everything else already does.
"""

from .items import chunk_arrays, create_read_items_for_chunk_list, intersect_chunks

__all__ = ["chunk_arrays", "create_read_items_for_chunk_list", "intersect_chunks"]
