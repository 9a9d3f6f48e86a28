"""Every MUST in spec/PROTOCOL.md has an id, and section 14 names a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "spec" / "PROTOCOL.md").read_text()


def _index() -> dict[str, str]:
    """Section 14's table: MUST id -> the cell naming its tests."""
    section = SPEC.split("## 14.", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and re.fullmatch(r"[A-Z]+\d+(, [A-Z]+\d+)*", cells[0]):
            for must_id in cells[0].split(", "):
                rows[must_id] = cells[1]
    return rows


def test_every_tagged_must_is_indexed() -> None:
    tagged = set(re.findall(r"\*\*\[([A-Z]+\d+)\]\*\*", SPEC))
    assert tagged, "no tagged MUSTs found"
    assert tagged == set(_index()), "ids tagged in the text and listed in section 14 differ"


def test_every_must_sentence_carries_an_id() -> None:
    body = SPEC.split("## 14.", 1)[0]
    paragraphs = re.split(r"\n\s*\n", body)
    untagged = [
        p
        for p in paragraphs
        if re.search(r"\bMUST\b", p) and not re.search(r"\*\*\[[A-Z]+\d+\]", p)
    ]
    # The conventions paragraph defines the word itself.
    untagged = [p for p in untagged if "RFC 2119" not in p]
    assert not untagged, untagged


def test_indexed_tests_exist() -> None:
    for must_id, cell in _index().items():
        for ref in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", cell):
            path, _, name = ref.partition("::")
            source = (ROOT / path).read_text()
            assert not name or f"def {name}(" in source, f"{must_id}: {ref} not found"
