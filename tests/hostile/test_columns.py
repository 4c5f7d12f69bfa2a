"""The column reader (``loads_metadata_columns``) against every hostile payload family.

With its fallback the column reader keeps the object reader's contract
payload for payload (refusals, unsafe refusals, benign loads equal to the
golden results). Without it (``fallback=False``) the compiled machine is on
its own: whatever it makes of a payload, it must not crash, hang, run code,
poison a class or raise anything but ``CheckpointError``.
"""

from __future__ import annotations

import pytest

from . import _payloads as pl
from ._runner import assert_all, problems, run_payloads

FAMILIES = {
    "forbidden": pl.forbidden_payloads,
    "allowed-forms": pl.allowed_form_payloads,
    "ext-persid": pl.ext_persid_payloads,
    "protocols": pl.protocol_payloads,
    "opcodes": pl.opcode_payloads,
    "poison": pl.poison_payloads,
    "instance-poison": pl.instance_poison_payloads,
    "nesting": pl.nesting_payloads,
    "bombs": pl.bomb_payloads,
    "lengths": pl.length_payloads,
    "memo": pl.memo_payloads,
    "corruption": pl.corruption_payloads,
    "benign": pl.benign_payloads,
}
BY_FAMILY = {family: make() for family, make in FAMILIES.items()}
# Some families share payloads (the same stream under the same name): once each.
PAYLOADS = list({name: (name, data, expected)
                 for triples in BY_FAMILY.values() for name, data, expected in triples}.values())


# The fallback is the object reader, which the rest of this folder attacks in
# full: here the families where the two readers meet (streams the machine
# reads, corrupts of them, refusals it hands on).
FALLBACK_FAMILIES = ("benign", "forbidden", "memo", "corruption", "instance-poison")


@pytest.fixture(scope="module")
def with_fallback():
    return run_payloads([t for f in FALLBACK_FAMILIES for t in BY_FAMILY[f]], mode="columns")


@pytest.fixture(scope="module")
def strict():
    return run_payloads(PAYLOADS, mode="columns-strict")


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_columns_keep_the_contract(with_fallback, family):
    assert_all(with_fallback, BY_FAMILY[family])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_machine_alone_is_safe(strict, family):
    bad = []
    for name, _, expected in BY_FAMILY[family]:
        kind = expected.partition(":")[0]
        # Refusing what the machine does not model is its right (as a plain
        # CheckpointError: it names what it did not model, not why it is
        # unsafe); loading what must be refused is not.
        lenient = {"ok": "any", "unsafe": "refuse"}.get(kind, expected)
        found = problems(strict[name], lenient)
        if found:
            bad.append(f"{name}: {'; '.join(found)}")
    assert not bad, f"{len(bad)} payloads:\n" + "\n".join(bad[:25])


def test_machine_reads_benign_streams_itself(strict):
    # torch's own streams (the benign family) are what the machine exists for.
    benign = BY_FAMILY["benign"]
    refused = [n for n, _, e in benign if e.startswith("ok") and strict[n].outcome != "ok"]
    assert len(refused) <= len(benign) // 2, refused
