"""Deep identity of torch DCP metadata objects, for differential tests against torch's reader."""

from __future__ import annotations

import dataclasses


def assert_identical(a, b, where="metadata"):
    """Same types and values all the way down, including fields ``==`` skips
    (``MetadataIndex.index``) and dict order."""
    assert type(a) is type(b), (where, type(a), type(b))
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_identical(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert len(a) == len(b), where
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_identical(ka, kb, f"{where} key")
            assert_identical(va, vb, f"{where}[{ka!r}]")
    elif isinstance(a, (list, tuple)):  # torch.Size too
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
