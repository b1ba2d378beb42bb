"""Crash-resume (docs/scale.md §3) at the points a plain mid-loop crash does not
reach: a real SIGKILL after D²Prune's `auto` choice (while evaluating, while
saving); `--fast` resumed with the uninterrupted run's batching; damaged files
in the work folder; two runs on one `--out`; a save killed at its final rename.
Tiny runs (stories260K, 2 x 32 tokens) so that each test takes seconds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import C4, ROOT, STORIES, WIKI, needs_shared
from d2prune.cli import main

pytestmark = needs_shared

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
AUTO = ["--method", "d2prune", "--frozen", "auto", "--heldout-windows", "2"]
PLAIN = ["--method", "sparsegpt", "--no-eval"]

# A real SIGKILL at a chosen point: the command runs with MODULE.ATTR replaced by a function that kills its own
# process (no except / finally / atexit of d2prune runs, exactly as under `kill -9`).
KILL_AT = """
import importlib, os, signal, sys
module, attr = sys.argv[1].rsplit(":", 1)
setattr(importlib.import_module(module), attr, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
from d2prune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _args(out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(STORIES), "--nsamples", "2", "--seqlen", "32", "--calib-file", str(C4),
            "--eval-file", str(WIKI), "--eval-windows", "2", "--seed", "0", "--out", str(out), *extra]


def _prune(out: Path, *extra: str) -> dict:
    assert main(["-q", *_args(out, *extra)]) == 0
    return json.loads((out / "d2prune.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _sans_seconds(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if "seconds" not in k and k != "cost_vs_one_prune"}


class _Crash(Exception):
    pass


def _crash_after_block(monkeypatch, block: int) -> None:
    """The next run raises right after block ``block`` (0-based) is committed."""
    import d2prune.resume as resume

    real = resume.WorkFolder.commit

    def commit(self, next_block, *a, **k):
        real(self, next_block, *a, **k)
        if next_block == block + 1:
            raise _Crash()

    monkeypatch.setattr(resume.WorkFolder, "commit", commit)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Uninterrupted runs: ``{name: (record, weights)}``."""
    root = tmp_path_factory.mktemp("whole")
    out = {}
    for name, args in (("auto", AUTO), ("plain", PLAIN)):
        rec = _prune(root / name, *args)
        out[name] = rec, _weights(root / name)
    return out


# --------------------------------------------------------------------------- --fast
def test_fast_resume_batches_like_the_uninterrupted_run(tmp_path, monkeypatch):
    """The finished blocks of a resumed `--fast` run propagate several samples per forward (--fast: up to 8; here both) as the uninterrupted run did
    (one at a time they would be other float operations: GPUs and other BLAS builds round them differently)."""
    import d2prune.engine as engine

    batches: list[int] = []
    real = engine.run_block
    monkeypatch.setattr(engine, "run_block", lambda block, hidden, *a, **k: batches.append(hidden.shape[0])
                        or real(block, hidden, *a, **k))
    _prune(tmp_path / "whole", *PLAIN, "--fast")
    uninterrupted, batches[:] = list(batches), []
    assert uninterrupted == [2] * 5  # one forward of both samples per block: the propagation is batched

    _crash_after_block(monkeypatch, 2)
    with pytest.raises(_Crash):
        _prune(tmp_path / "out", *PLAIN, "--fast")
    monkeypatch.undo()
    monkeypatch.setattr(engine, "run_block", lambda block, hidden, *a, **k: batches.append(hidden.shape[0])
                        or real(block, hidden, *a, **k))
    batches[:] = []
    rec = _prune(tmp_path / "out", *PLAIN, "--fast")
    assert rec["memory"]["resumed_from_block"] == 3
    assert batches == uninterrupted  # blocks 0-2 re-run as batches of 2, not 2 single samples
    _same(_weights(tmp_path / "whole"), _weights(tmp_path / "out"))


# --------------------------------------------------------------------------- a save killed at its end
SAVE_KILLED = """
import os, signal, sys
from pathlib import Path
import d2prune.save as save
target, where = sys.argv[1], sys.argv[2]
rename = os.rename
def killing_rename(src, dst):
    if where == "before" and os.fspath(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
    if where == "after" and os.fspath(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
save.os.rename = killing_rename
def write(folder):
    (Path(folder) / "model.safetensors").write_bytes(b"weights")
save.save_pruned(None, None, target, {"run": 1}, write_weights=write)
"""


@pytest.mark.parametrize("where", ["before", "after"])
def test_save_killed_at_the_final_rename_is_reclaimed(tmp_path, where):
    """SIGKILL just before (or just after) the output is renamed into place: whatever the kill leaves is a folder
    the next save into the same place recognises as ours and removes."""
    from d2prune.save import save_pruned

    target = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", SAVE_KILLED, str(target), where], env=ENV, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert target.exists() == (where == "after")
    if where == "before":  # the complete output, not yet in place
        assert [p.name[:9] for p in tmp_path.iterdir()] == [".out.tmp-"]
    save_pruned(None, None, target, {"run": 2}, overwrite=True,
                write_weights=lambda folder: (Path(folder) / "model.safetensors").write_bytes(b"weights"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((target / "d2prune.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in target.iterdir()) == ["d2prune.json", "model.safetensors"]
