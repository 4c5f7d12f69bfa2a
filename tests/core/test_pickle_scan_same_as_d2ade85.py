"""The opcode scan gives the verdicts it gave before it was split into opcode families.

``_pickle_scan._op`` was one long chain at d2ade85 and is now a dispatcher
over one inline function per opcode family. This test builds the scanner of
d2ade85 from git into a temporary directory (as ``_pickle_scan_d2ade85``),
runs both on every hostile payload and on random mutations of real metadata
pickles, and requires the same result (accepted, or the same
``(unsafe, position, message)``) and the same globals asked of ``lookup``.
Skipped when git or the commit is not available (e.g. a source tarball).
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckcore._kernels import _pickle_scan
from ckcore.checkpoint import MAX_DEPTH, _global_kind
from tests.hostile import _payloads as pl
from tests.support.streams import sample_metadata, torchify

BASE = "d2ade85"
REPO = Path(__file__).resolve().parent.parent.parent

_BUILD = f"""
from setuptools import Extension, setup
from Cython.Build import cythonize
setup(script_args=["build_ext", "--inplace", "-q"],
      ext_modules=cythonize([Extension("_pickle_scan_{BASE}", ["_pickle_scan_{BASE}.pyx"])],
                            compiler_directives={{"language_level": 3, "boundscheck": False,
                                                 "wraparound": False, "initializedcheck": False,
                                                 "cdivision": True}}, quiet=True))
"""


@pytest.fixture(scope="module")
def old_scan(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is not available")
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BASE}:ckcore/_kernels/_pickle_scan.pyx"],
                         check=False, capture_output=True)
    if src.returncode:
        pytest.skip(f"commit {BASE} is not available")
    d = tmp_path_factory.mktemp("oldscan")
    (d / f"_pickle_scan_{BASE}.pyx").write_bytes(src.stdout)
    subprocess.run([sys.executable, "-c", _BUILD], cwd=d, check=True, capture_output=True)
    so = next(d.glob(f"_pickle_scan_{BASE}*.so"))
    spec = importlib.util.spec_from_file_location(f"_pickle_scan_{BASE}", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _verdict(module, data: bytes, depth: int = MAX_DEPTH):
    asked = []

    def lookup(m: bytes, n: bytes) -> int:
        asked.append((m, n))
        return _global_kind(m, n)

    try:
        res = module.scan(data, lookup, depth)
    except MemoryError as e:
        res = ("MemoryError", str(e))
    return res, asked


def _compare(old, triples, depth: int = MAX_DEPTH) -> int:
    n = 0
    for name, data, _ in triples:
        new_v = _verdict(_pickle_scan, data, depth)
        old_v = _verdict(old, data, depth)
        assert new_v == old_v, name
        n += 1
    return n


FAMILIES = ["forbidden_payloads", "allowed_form_payloads", "ext_persid_payloads",
            "protocol_payloads", "opcode_payloads", "poison_payloads",
            "instance_poison_payloads", "bomb_payloads", "length_payloads", "memo_payloads",
            "corruption_payloads", "bignum_payloads", "benign_payloads"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hostile_payloads_same_verdicts(old_scan, family):
    assert _compare(old_scan, getattr(pl, family)()) > 0


def test_nesting_payloads_same_verdicts(old_scan):
    # Shallow depth limits too, so the depth refusals are compared as well.
    triples = list(pl.nesting_payloads())
    assert _compare(old_scan, triples) > 0
    small = [t for t in triples if len(t[1]) < 200_000]
    assert _compare(old_scan, small, depth=3) > 0


def _mutants(data: bytes, rng: random.Random, n: int):
    ops = list(range(256))
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(5)
            i = rng.randrange(len(b))
            if kind == 0:
                b[i] ^= 1 << rng.randrange(8)
            elif kind == 1:
                b[i] = rng.choice(ops)
            elif kind == 2:
                del b[i:i + rng.randint(1, 8)]
            elif kind == 3:
                b[i:i] = bytes([rng.choice(ops)]) + rng.randbytes(rng.randint(0, 8))
            else:
                j = rng.randrange(len(b))
                b[i:i + 4] = b[j:j + 4]
            if not b:
                b = bytearray(b".")
        yield bytes(b)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_mutated_metadata_same_verdicts(old_scan, protocol):
    rng = random.Random(protocol * 7919)
    base = torchify(sample_metadata(), protocol=protocol)
    assert _verdict(_pickle_scan, base)[0] is None
    triples = [(f"p{protocol}-m{i}", d, None) for i, d in enumerate(_mutants(base, rng, 3000))]
    assert _compare(old_scan, triples) == 3000
    accepted = sum(_verdict(_pickle_scan, d)[0] is None for _, d, _ in triples)
    refused = len(triples) - accepted
    # Both outcomes occur, so the comparison covered accepts and refusals.
    assert accepted > 0 and refused > 0
