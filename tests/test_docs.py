"""The documentation the code cites lives in this repository.

Every ``docs/<file>.md`` reference in src/, tests/, bench/ and README.md names
an existing file and, when followed by ``§N[.M]`` (or a range ``§N-M``), a
numbered heading of that file; no reference points to the old spec outside the
repository (the bare name of the old spec file), which a user's clone does not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = [ROOT / "src", ROOT / "tests", ROOT / "bench", ROOT / "README.md"]

_NUM = r"\d+(?:\.\d+)*"
# docs/<file>.md, optionally followed by "§3", "§3.1" or a range "§3-4"
DOC_REF = re.compile(rf"(?<![\w/.])docs/([\w/-]+\.md)(?:\s*§\s*({_NUM})(?:\s*[-–]\s*({_NUM}))?)?")
# the out-of-tree spec, written so that this file does not match itself
OLD_SPEC = re.compile(r"(?<![\w/.])" + "METHOD" + r"\.md")
HEADING = re.compile(rf"^#{{1,6}}\s+({_NUM})\.?(?=\s)", re.M)


def _text_files():
    for base in SCANNED:
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in paths:
            if "__pycache__" in p.parts or p.suffix in (".png", ".pt", ".pyc", ".gz"):
                continue
            try:
                yield p, p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def _references():
    for path, text in _text_files():
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in DOC_REF.finditer(line):
                yield f"{path.relative_to(ROOT)}:{lineno}", m.group(1), [s for s in m.group(2, 3) if s]


def _section_numbers(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def test_docs_references_resolve():
    refs = list(_references())
    assert any(name == "method.md" for _, name, _ in refs), "no code cites docs/method.md: is the pattern still right?"
    bad = []
    for where, name, sections in refs:
        doc = DOCS / name
        if not doc.is_file():
            bad.append(f"{where}: docs/{name} does not exist")
            continue
        have = _section_numbers(doc)
        bad += [f"{where}: docs/{name} has no section {s} (sections: {', '.join(sorted(have))})"
                for s in sections if s not in have]
    assert not bad, "\n".join(bad)


def test_no_reference_to_the_out_of_tree_spec():
    this = Path(__file__).resolve()
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
           for p, text in _text_files() if p.resolve() != this
           for i, line in enumerate(text.splitlines(), 1) if OLD_SPEC.search(line)]
    assert not bad, "references to a spec outside the repository (use docs/method.md):\n" + "\n".join(bad)


def test_docs_index_lists_every_document():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and f"({p.name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"


@pytest.mark.parametrize("number", ["1", "2", "3", "3.1", "4", "5", "6"])
def test_method_keeps_the_section_numbers(number):
    """The section numbers the code has always cited stay valid."""
    assert number in _section_numbers(DOCS / "method.md")
