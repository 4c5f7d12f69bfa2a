"""Build script: cythonizes every kernel in ckcore/_kernels.

Environment switches (one place for every directive default):
  CKCORE_BOUNDSCHECK=1  turn boundscheck/wraparound/initializedcheck back on
  CKCORE_LINETRACE=1    add linetrace (profiling / coverage of .pyx lines)
  CKCORE_ANNOTATE=1     write the cython -a HTML next to each .pyx
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


checks = _flag("CKCORE_BOUNDSCHECK")
linetrace = _flag("CKCORE_LINETRACE")

directives = {
    "language_level": 3,
    "boundscheck": checks,
    "wraparound": checks,
    "initializedcheck": checks,
    "cdivision": True,
    "embedsignature": True,
    "linetrace": linetrace,
    # Not free-threading safe: kernels keep per-module C caches (last class
    # seen, its field layout) and the GC pause counter, all guarded only by
    # the GIL. Left False, a free-threaded CPython re-enables the GIL when it
    # imports them (and says so), instead of racing on those globals.
    "freethreading_compatible": False,
}

macros = []
if linetrace:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

extensions = [
    Extension(
        "ckcore._kernels." + os.path.splitext(os.path.basename(path))[0],
        [path],
        define_macros=macros,
        extra_compile_args=["-O3"],
    )
    for path in sorted(glob.glob(os.path.join("ckcore", "_kernels", "*.pyx")))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=_flag("CKCORE_ANNOTATE"),
    ),
)
