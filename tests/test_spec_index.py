"""Every MUST in spec/ has an id, unique across the documents, and each id is indexed: to a
conformance case that exists (or a reason the wire cannot show it) and to tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

from conformance.all_cases import REGISTRY
from conformance.serve_cases import SERVE_CASES

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"
DOCS = {
    "PROTOCOL.md": "## 14.",
    "RUNNER.md": "## 9.",
    "GATEWAY.md": None,  # no MUST of its own today; its ids would be unique too
}
TAG = re.compile(r"\*\*\[([A-Z]+\d+)\]\*\*")
CASE_NAMES = REGISTRY.names() | {c.name for c in SERVE_CASES}


def _split(doc: str) -> tuple[str, str]:
    """(the normative text, its index section); sections after the index count as text."""
    text = (SPEC / doc).read_text()
    marker = DOCS[doc]
    if marker is None:
        return text, ""
    before, _, rest = text.partition(marker)
    index, _, after = rest.partition("\n## ")
    return before + ("\n## " + after if after else ""), index


def _index(index: str) -> dict[str, tuple[str, str]]:
    """Index table rows: id -> (conformance cell, tests cell)."""
    rows = {}
    for line in index.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[A-Z]+\d+", cells[0]):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def _sentences(text: str) -> list[str]:
    text = re.sub(r"`[^`]*`", "CODE", text)  # code spans hold no sentence ends
    text = re.sub(r"\b(e\.g|i\.e|vs|cf)\.", r"\1", text)
    return re.split(r"(?<=[.;:])\s+(?=[A-Z(*])|\n\s*\n", text)


def test_ids_are_unique_across_the_documents() -> None:
    owner: dict[str, str] = {}
    for doc in DOCS:
        text, _ = _split(doc)
        for must_id in TAG.findall(text):
            assert must_id not in owner or owner[must_id] == doc, (
                f"{must_id} is used by {owner[must_id]} and {doc}"
            )
            owner[must_id] = doc
    assert len(owner) > 60


def test_every_tagged_must_is_indexed_and_nothing_else_is() -> None:
    for doc, marker in DOCS.items():
        text, index = _split(doc)
        tagged = set(TAG.findall(text))
        if marker is None:
            assert not tagged, f"{doc} has ids but no index"
            continue
        assert tagged == set(_index(index)), f"{doc}: ids tagged and ids indexed differ"


def test_every_must_sentence_carries_an_id() -> None:
    for doc in DOCS:
        text, _ = _split(doc)
        body = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
        untagged = [
            s
            for s in _sentences(body)
            if re.search(r"\bMUST\b", s) and not TAG.search(s) and "RFC 2119" not in s
        ]
        assert not untagged, f"{doc}: {untagged}"


def test_every_id_maps_to_a_conformance_case_or_says_why_not() -> None:
    listed: set[str] = set()
    for doc, marker in DOCS.items():
        if marker is None:
            continue
        for must_id, (conformance, _) in _index(_split(doc)[1]).items():
            names = set(re.findall(r"`([A-Z]+\d+-[\w.-]+)`", conformance))
            unknown = names - CASE_NAMES
            assert not unknown, f"{must_id}: no such conformance case {sorted(unknown)}"
            assert names or conformance.startswith("not observable"), (
                f"{must_id}: name a conformance case or say why the wire cannot show it"
            )
            listed |= names
    # ...and every case is indexed under the ids it checks.
    assert listed == CASE_NAMES, f"cases missing from the index: {sorted(CASE_NAMES - listed)}"


def test_every_case_checks_ids_the_spec_defines() -> None:
    defined = set()
    for doc in DOCS:
        defined |= set(TAG.findall(_split(doc)[0]))
    for case in [*REGISTRY.cases, *SERVE_CASES]:
        assert set(case.ids) <= defined, f"{case.name} checks {case.ids}"
        assert case.name.startswith(case.ids[0] + "-"), case.name


def test_indexed_tests_exist() -> None:
    for doc, marker in DOCS.items():
        if marker is None:
            continue
        for must_id, (_, cell) in _index(_split(doc)[1]).items():
            assert re.search(r"tests/", cell), f"{must_id} names no test"
            for ref in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", cell):
                path, _, name = ref.partition("::")
                source = (ROOT / path).read_text()
                assert not name or f"def {name}(" in source, f"{must_id}: {ref} not found"
