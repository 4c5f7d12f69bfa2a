"""Bounded, non-raising descriptions of untrusted values for error messages.

A hostile ``.metadata`` can hold values whose ``repr()`` is unbounded: a
list whose levels share their children (3 kB of pickle that prints as
gigabytes), a dataclass instance without its fields (its generated
``__repr__`` raises), an int of a million digits (``repr`` raises
ValueError past ``sys.int_info.default_max_str_digits``), a dict of a
million entries. :func:`saferepr` writes at most a few levels and a few
elements of each container, never calls a ``__repr__`` it does not know, and
never raises, the way :mod:`reprlib` bounds its output.

The ``*_text`` helpers write the values a checkpoint names (fqns, file
names, shapes, chunks, storage keys) for messages and tables: as Python
writes them when they are short and plain (every real one), bounded
otherwise; :func:`one_line` makes an exception's message one bounded line.
"""

from __future__ import annotations

import dataclasses
from itertools import islice
from typing import cast

__all__ = ["chunk_text", "index_text", "name_text", "one_line", "saferepr", "shape_text"]

_MAX_LEVEL = 3
_MAX_ITEMS = 6
_MAX_STR = 60
_MAX_TOTAL = 240


def _text(s: str | bytes) -> str:
    if len(s) <= _MAX_STR:
        return repr(s)
    head = s[: _MAX_STR - 20]
    return f"{head!r}...<{len(s)} {'chars' if isinstance(s, str) else 'bytes'}>"


def _items(x, level: int, left: str, right: str, n: int) -> str:
    if level <= 0:
        return f"{left}...{right}" if n else f"{left}{right}"
    parts = [_repr(v, level - 1) for v in islice(x, _MAX_ITEMS)]
    if n > _MAX_ITEMS:
        parts.append(f"...<{n} items>")
    if left == "(" and n == 1:
        return f"({parts[0]},)"
    return left + ", ".join(parts) + right


def _repr(x: object, level: int) -> str:
    t = type(x)
    if x is None or t is bool or t is float or t is complex:
        return repr(x)
    if t is int:
        # Past 128 bits repr() is slow (quadratic) or raises (max str digits).
        bits = cast(int, x).bit_length()  # t is int
        return repr(x) if bits <= 128 else f"<int of {bits} bits>"
    if t is str or t is bytes:
        return _text(x)  # type: ignore[arg-type]
    if t is tuple:
        return _items(x, level, "(", ")", len(x))  # type: ignore[arg-type]
    if t is list:
        return _items(x, level, "[", "]", len(x))  # type: ignore[arg-type]
    if t is set or t is frozenset:
        n = len(x)  # type: ignore[arg-type]
        if n == 0:
            return f"{t.__name__}()"
        return _items(x, level, "{", "}", n)
    if isinstance(x, dict):
        n = len(x)
        if level <= 0:
            return "{...}" if n else "{}"
        parts = [
            f"{_repr(k, level - 1)}: {_repr(v, level - 1)}"
            for k, v in islice(x.items(), _MAX_ITEMS)
        ]
        if n > _MAX_ITEMS:
            parts.append(f"...<{n} items>")
        return "{" + ", ".join(parts) + "}"
    name = t.__name__[:_MAX_STR]
    if dataclasses.is_dataclass(t):
        if level <= 0:
            return f"{name}(...)"
        # The instance dict, not the fields: a hostile stream may build an
        # instance without some of them.
        d = getattr(x, "__dict__", None)
        if type(d) is not dict:
            return f"<{name} object>"
        parts = [
            f"{k}={_repr(v, level - 1)}" if type(k) is str else "?"
            for k, v in islice(d.items(), _MAX_ITEMS)
        ]
        return f"{name}(" + ", ".join(parts) + ")"
    return f"<{name} object>"


def saferepr(x: object, limit: int = _MAX_TOTAL) -> str:
    """A description of ``x`` of at most ``limit`` characters, in bounded time; never raises.

    Containers show at most a few levels and a few items each; dataclass
    instances show their instance fields; objects of other types show only
    their type name, since their ``__repr__`` may be anything.

    >>> saferepr(list(range(100)))
    '[0, 1, 2, 3, 4, 5, ...<100 items>]'
    >>> saferepr(((((((1,),),),),),))
    '((((...),),),)'
    """
    try:
        text = _repr(x, _MAX_LEVEL)
    except Exception:  # noqa: BLE001 - a description must never be what fails
        text = f"<{type(x).__name__[:_MAX_STR]} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Dims written in full by :func:`shape_text`; a longer shape is abbreviated
#: (a crafted ``.metadata`` can give a tensor any number of dims and share
#: that one size tuple between all its tensors and chunks).
MAX_DIMS_SHOWN = 16

#: Longest fqn or file name :func:`name_text` writes as is.
MAX_NAME = 200

#: Longest line :func:`one_line` writes (a message quoting file content is cut there).
MAX_LINE = 1000


def shape_text(t: object) -> str:
    """A shape as Python writes a tuple, bounded for long or odd ones.

    >>> shape_text((4, 3)), shape_text([5]), shape_text(())
    ('(4, 3)', '(5,)', '()')
    >>> shape_text((1,) * 5000)
    '(1, 1, 1, 1, 1, 1, ...<5000 dims>)'
    """
    if type(t) is list:
        t = tuple(t)
    if type(t) is not tuple:
        return saferepr(t)
    head = t if len(t) <= MAX_DIMS_SHOWN else t[:6]
    if not all(type(v) is int and -(2**64) < v < 2**64 for v in head):
        return saferepr(t)
    if len(t) <= MAX_DIMS_SHOWN:
        return str(t)
    return "(" + ", ".join(map(str, head)) + f", ...<{len(t)} dims>)"


def name_text(s: object) -> str:
    """An fqn or file name from a checkpoint, for a message or a table cell.

    As is when it is a short printable str; otherwise :func:`saferepr`'s
    bounded, escaped form, so a megabyte fqn or one with a newline cannot
    flood or split the output.

    >>> name_text("layers.0.attention.wq.weight")
    'layers.0.attention.wq.weight'
    >>> name_text("a\\nb")
    "'a\\\\nb'"
    """
    if type(s) is str and len(s) <= MAX_NAME and s.isprintable():
        return s
    return saferepr(s)


def chunk_text(c: object) -> str:
    """A chunk as its ``repr`` writes it (as torch's messages quote it), with bounded shapes."""
    return (f"ChunkStorageMetadata(offsets={shape_text(getattr(c, 'offsets', None))}, "
            f"sizes={shape_text(getattr(c, 'sizes', None))})")


def index_text(key: object) -> str:
    """A storage key for a message: its fqn and, for a chunk, its offsets."""
    fqn, offset = getattr(key, "fqn", None), getattr(key, "offset", None)
    return name_text(fqn) if offset is None else f"{name_text(fqn)} at offsets {shape_text(offset)}"


def one_line(exc: BaseException) -> str:
    """An exception's message as one line of printable text, at most :data:`MAX_LINE` characters.

    Messages quote values from the checkpoint (bounded at the source with
    :func:`saferepr`, but not every raiser does): newlines would split an
    error line and control characters reach the terminal.

    >>> one_line(ValueError("bad\\n  value\\x1b"))
    'bad value\\\\x1b'
    """
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a message must never be what fails
        text = ""
    text = " ".join(text[: 4 * MAX_LINE].split()) or type(exc).__name__
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."
