"""The README's Python example runs as written.

The snippet uses paths relative to the checkout (``../shared/...`` for the
model and data, ``out/...`` for its output). It runs unchanged, in a fresh
interpreter, from a scratch folder laid out like a checkout: a sibling
``shared`` that links to the real one, so its output lands under tmp_path
instead of the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_one_python_example():
    assert len(python_blocks(README.read_text())) == 1


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir() or not (SHARED / "data" / "c4").is_dir(),
                    reason="../shared (stories260K and the C4 sample the README's example reads) is not beside this checkout")
def test_readme_python_example_runs_as_written(tmp_path):
    (snippet,) = python_blocks(README.read_text())
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", snippet], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = re.search(r'save_pruned\([^,]+,\s*[^,]+,\s*"([^"]+)"', snippet).group(1)
    assert (checkout / saved / "d2prune.json").is_file() and (checkout / saved / "config.json").is_file()
    assert res.stdout.strip(), "the example prints the achieved sparsity and the first layer's row"
