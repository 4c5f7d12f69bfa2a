"""ckcore.dcp and the torch release installed: silent on the tested range, one warning outside it.

Each test imports ckcore.dcp fresh in a child interpreter, as a user's program would.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.paths import CKCORE_PARENT


def _run(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "user_code.py"
    script.write_text(body)
    env = dict(os.environ, PYTHONPATH=str(CKCORE_PARENT))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_dcp_warns_once_at_import_outside_the_tested_torch(tmp_path):
    # torch reports a release outside the tested range; the warning must name
    # the importing line (the user's code), not ckcore's.
    out = _run(tmp_path,
        "import warnings\n"
        "import torch\n"
        "torch.__version__ = '2.99.0'\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import ckcore.dcp\n"
        "ours = [w for w in seen if w.category.__name__ == 'UntestedTorchWarning']\n"
        "assert len(ours) == 1, [str(w.message) for w in seen]\n"
        "assert 'torch 2.99.0' in str(ours[0].message), ours[0].message\n"
        "assert ours[0].filename == __file__, ours[0].filename\n"
        "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_dcp_is_silent_with_the_tested_torch(tmp_path):
    out = _run(tmp_path,
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import ckcore.dcp\n"
        "ours = [w for w in seen if w.category.__name__ == 'UntestedTorchWarning']\n"
        "assert not ours, [str(w.message) for w in ours]\n"
        "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
