"""The README's supported-architecture table is what d2prune does: every row
is recomputed here (tests/arch_zoo.py) on a tiny random model of its family
and compared with the README."""

from __future__ import annotations

import re

import pytest

from arch_zoo import FAMILIES, row
from conftest import ROOT


def readme_rows() -> dict[str, dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- archs:begin -->\n(.*?)<!-- archs:end -->", text, re.S).group(1)
    lines = [l for l in block.strip().splitlines() if l.startswith("|")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(cols, cells))
    return out


def test_the_table_lists_every_family_once():
    assert len(readme_rows()) == len(FAMILIES)


@pytest.mark.parametrize("arch", FAMILIES)
def test_readme_row_is_what_d2prune_does(arch):
    got = row(arch)
    assert readme_rows()[got["family"]] == got
