"""Fixtures and builders shared by the tests (``tests/*/``) and the benchmarks (``bench/``).

Import it as ``tests.support`` (``from tests.support.streams import sample_metadata``).
The repository's root ``conftest.py`` makes the checkout's ``tests`` package
importable for both suites without putting the checkout itself on ``sys.path``
(that would import ckcore from the sources instead of the installed wheel).

torch-free (usable from ``tests/core`` and ``tests/hostile``):

- ``paths``: the checkout's folders (``REPO``, ``DATA``, ...) and ``CKCORE_PARENT``,
  the folder holding the ckcore under test, for child processes' ``PYTHONPATH``.
- ``streams``: torch-style ``.metadata`` pickle streams crafted without torch.
- ``layouts``: hypothesis strategies of chunk layouts, ``chunk_cuts``.
- ``reference``: naive O(N*M) references of the intersection kernels.
- ``identical``: field-by-field equality of dataclass trees, types included.
- ``rdzv``: race-free rendezvous for multi-process tests (a file store, no port).

need torch (``tests/differential``, ``tests/multiprocess``, ``bench``):

- ``gp_cases``: global-save-plan cases built as both torch's and ckcore's objects.
- ``dcp_sim``: save a sharded DCP checkpoint "as N ranks" in one process; load boxes.
"""
