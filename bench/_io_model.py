"""Builds the storage model the multi-process benchmarks preload (``bench/_io_delay.c``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "_io_delay.c"


def build_io_model(workdir: Path, what: str) -> Path | None:
    """Compile the model into ``workdir``; None (and a note on stderr naming ``what``) without a C compiler."""
    so = workdir / "libckdelay.so"
    proc = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(so), str(SOURCE), "-ldl"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{what}: no storage model (cc failed): {proc.stderr[-500:]}", file=sys.stderr)
        return None
    return so
