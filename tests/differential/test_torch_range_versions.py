"""Which torch version strings ckcore.dcp's UntestedTorchWarning treats as tested.

The range is pyproject's ``torch>=2.13,<2.14`` read as PEP 440 does: a
pre-release or dev build of 2.13.0 (a nightly "2.13.0a0+git...") comes before
2.13 and is outside it, as is one of 2.14.0.
"""

from __future__ import annotations

import pytest

from ckcore.dcp._compat import untested_torch_message


@pytest.mark.parametrize("version", [
    "2.13.0", "2.13", "2.13.0+cpu", "2.13.1+cu121", "2.13.2", "2.13.1rc1", "2.13.0.post1",
])
def test_tested(version):
    assert untested_torch_message(version) is None


@pytest.mark.parametrize("version", [
    # Pre-releases of 2.13 are outside >=2.13 in PEP 440, so they warn too.
    "2.13.0a0+git1234abc", "2.13.0rc1", "2.13.0.dev20260101", "2.13.0b2",
    "2.14.0.dev20260101", "2.14.0a0+git", "2.14.0", "2.12.9", "3.0", "garbage", "", "2.130.0",
])
def test_untested(version):
    message = untested_torch_message(version)
    assert message is not None and f"torch {version} is installed" in message
