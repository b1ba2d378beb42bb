"""What the benchmark scripts do with their tables: the command that made a
table goes beside it, and the table is printed and appended to ``--markdown``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command() -> str:
    """This script's command line, as run from the repository root."""
    return "python bench/" + Path(sys.argv[0]).name + "".join(" " + shlex.quote(a) for a in sys.argv[1:])


def emit(text: str, markdown: str | None) -> None:
    """Print ``text`` and append it to the ``markdown`` file, if one is given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)
