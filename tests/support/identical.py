"""Deep identity of torch DCP metadata objects, for differential tests against torch's reader."""

from __future__ import annotations

import dataclasses


def assert_identical(a, b, where="metadata"):
    """Same types and values all the way down, including fields ``==`` skips
    (``MetadataIndex.index``) and dict order. ckcore's ``ColumnarMetadata``
    (torch's ``Metadata`` built from columns on first touch) stands for
    torch's ``Metadata``: its fields are compared."""
    ta, tb = (type(x).__mro__[1] if type(x).__name__ == "ColumnarMetadata" else type(x)
              for x in (a, b))
    assert ta is tb, (where, type(a), type(b))
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
