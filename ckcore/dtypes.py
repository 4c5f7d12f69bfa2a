"""Tensor dtypes by name, with their item sizes, without importing torch.

ckcore names a dtype the way ``str(torch.float32)`` does without the
``torch.`` prefix (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``).
The table equals ``torch.dtype.itemsize`` for every dtype of torch 2.13
(checked by ``tests/differential/test_dtypes.py``).
"""

from __future__ import annotations

__all__ = ["DTYPE_ITEMSIZE", "itemsize", "normalize_dtype"]

DTYPE_ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "bits8": 1,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    # Sub-byte integer dtypes occupy one byte per element in storage.
    **{f"int{b}": 1 for b in range(1, 8)},
    **{f"uint{b}": 1 for b in range(1, 8)},
}

# Aliases torch accepts as attribute names (torch.float is torch.float32, ...).
_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "bit": "uint1",
}


def normalize_dtype(dtype: object) -> str:
    """Return ckcore's name for ``dtype``: a name, an alias, or a torch.dtype.

    >>> normalize_dtype("torch.bfloat16")
    'bfloat16'
    """
    name = dtype if isinstance(dtype, str) else str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    name = _ALIASES.get(name, name)
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_ITEMSIZE))}")
    return name


def itemsize(dtype: object) -> int:
    """Bytes per element of ``dtype`` (a name such as ``"bfloat16"`` or a torch.dtype).

    >>> itemsize("bfloat16")
    2
    """
    return DTYPE_ITEMSIZE[normalize_dtype(dtype)]
