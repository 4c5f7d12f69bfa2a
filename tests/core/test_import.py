"""Importing ckcore: torch-free, and a clear ImportError when the compiled kernels are missing.

Both run in a fresh interpreter: this test process has long imported torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ckcore

PACKAGE_DIR = Path(ckcore.__file__).resolve().parent


def run(code: str, cwd: Path, path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "import ckcore, ckcore.items, ckcore.metadata, ckcore.planner, ckcore.dtypes\n"
        "from ckcore import intersect_chunks, ChunkStorageMetadata as C\n"
        "r = intersect_chunks([C((0,), (4,))], [C((2,), (4,))])\n"
        "assert r.lengths.tolist() == [[2]], r\n"
        "print(ckcore.__file__)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    proc = run(code, tmp_path, PACKAGE_DIR.parent)
    assert proc.returncode == 0, proc.stderr
    # The subprocess imported this very package, not some other copy.
    assert Path(proc.stdout.strip()).resolve() == PACKAGE_DIR / "__init__.py"


def test_missing_extension_says_how_to_build(tmp_path):
    # A copy of the source tree without any compiled module, first on sys.path.
    src = tmp_path / "src"
    shutil.copytree(PACKAGE_DIR, src / "ckcore",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "*.html",
                                                  "__pycache__"))
    assert not list((src / "ckcore").rglob("*.so"))
    code = (
        "import ckcore\n"
    )
    proc = run(code, tmp_path, src)
    assert proc.returncode != 0
    err = proc.stderr
    assert "ImportError" in err, err
    assert "compiled" in err
    assert "build_ext --inplace" in err
    assert "pip install" in err
    # Never a crash.
    assert "Segmentation fault" not in err and proc.returncode > 0
