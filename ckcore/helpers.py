"""The names ``ckcore/cli.py`` imports from ``ckcore.helpers``, re-exported from :mod:`ckcore.items`.

cli.py is being split into report and demo modules on another branch and is
left alone here; delete this module once the split imports :mod:`ckcore.items`.
Everything else imports :mod:`ckcore.items` (or ``ckcore``) directly.
"""

from .items import chunk_arrays, create_read_items_for_chunk_list, intersect_chunks

__all__ = ["chunk_arrays", "create_read_items_for_chunk_list", "intersect_chunks"]
