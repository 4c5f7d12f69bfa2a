"""Which torch releases ``ckcore.dcp`` is tested against, and the warning outside them.

``ckcore.dcp`` reaches into torch's private planning modules: ``patch()``
replaces names such as ``planner_helpers._create_read_items`` and
``default_planner._validate_global_plan``, and the drop-ins build torch's
``ReadItem``/``MetadataIndex`` objects field by field. A torch release may
rename, move or change any of those without notice, so ckcore states the
releases its CI proves it against and warns, once at import, on any other.
The torch-free core (``import ckcore``) does not depend on torch at all.
"""

from __future__ import annotations

import re
import warnings

# Inclusive lower bound, exclusive upper bound, as (major, minor). Keep in step
# with the ``torch`` extra in pyproject.toml and the version scripts/test.sh installs.
TESTED_TORCH = ((2, 13), (2, 14))


class UntestedTorchWarning(UserWarning):
    """The installed torch is outside the releases ckcore.dcp is tested against."""


# PEP 440: release numbers, then an optional pre-release (a, b, rc and their
# spellings), post-release and dev segment; "+local" is ignored.
_VERSION = re.compile(
    r"v?(?P<release>\d+(?:\.\d+)*)"
    r"(?P<pre>[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?"
    r"(?P<post>[-_.]?(?:post|rev|r)[-_.]?\d*|-\d+)?"
    r"(?P<dev>[-_.]?dev[-_.]?\d*)?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?",
    re.IGNORECASE)


def _release(version: str) -> tuple[int, int, bool] | None:
    """``(major, minor, early)`` of a PEP 440 version, or None if it is not one.

    ``early``: a pre-release or dev build of ``X.Y.0`` (a nightly
    ``2.13.0a0+git...``), which comes before ``X.Y``: ``>=X.Y`` excludes it,
    and so does ``<X.Y`` (PEP 440 keeps pre-releases of ``V`` out of ``<V``).
    """
    m = _VERSION.fullmatch(version)
    if m is None:
        return None
    parts = [int(p) for p in m.group("release").split(".")]
    if len(parts) < 2:
        return None
    early = bool(m.group("pre") or (m.group("dev") and not m.group("post"))) and not any(parts[2:])
    return parts[0], parts[1], early


def _tested(version: str) -> bool:
    lo, hi = TESTED_TORCH
    release = _release(version)
    if release is None:
        return False
    major, minor, early = release
    return lo <= (major, minor) < hi and not (early and (major, minor) == lo)


def untested_torch_message(version: str) -> str | None:
    """The warning for torch ``version`` when it is outside :data:`TESTED_TORCH`, else None.

    >>> untested_torch_message("2.13.0+cpu") is None
    True
    >>> print(untested_torch_message("2.15.1"))  # doctest: +ELLIPSIS
    ckcore.dcp is tested with torch >=2.13,<2.14, and torch 2.15.1 is installed: ...
    """
    lo, hi = TESTED_TORCH
    if _tested(version):
        return None
    return (
        f"ckcore.dcp is tested with torch >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}, and torch "
        f"{version} is installed: its patches and drop-ins replace private torch "
        "planning functions that may have changed. Run ckcore's differential test "
        "suite against this torch before relying on it, or install a tested torch."
    )


def warn_if_untested(version: str) -> None:
    """Emit :class:`UntestedTorchWarning` if torch ``version`` is outside :data:`TESTED_TORCH`."""
    message = untested_torch_message(version)
    if message is not None:
        warnings.warn(message, UntestedTorchWarning, stacklevel=3)
