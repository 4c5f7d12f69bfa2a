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


def _release(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def untested_torch_message(version: str) -> str | None:
    """The warning for torch ``version`` when it is outside :data:`TESTED_TORCH`, else None.

    >>> untested_torch_message("2.13.0+cpu") is None
    True
    >>> print(untested_torch_message("2.15.1"))  # doctest: +ELLIPSIS
    ckcore.dcp is tested with torch >=2.13,<2.14, and torch 2.15.1 is installed: ...
    """
    lo, hi = TESTED_TORCH
    release = _release(version)
    if release is not None and lo <= release < hi:
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
