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

from conftest import C4, ROOT, STORIES, WIKI, Crash, crash_after_block, needs_shared
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


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Uninterrupted runs: ``{name: (record, weights)}``."""
    root = tmp_path_factory.mktemp("whole")
    out = {}
    for name, args in (("auto", AUTO), ("plain", PLAIN)):
        rec = _prune(root / name, *args)
        out[name] = rec, _weights(root / name)
    return out


# --------------------------------------------------------------------------- after D²Prune's auto choice
@pytest.mark.parametrize("kill_at,stream", [("d2prune.pipeline:evaluate_ppl", "off"),  # evaluating the choice
                                            ("d2prune.io.save:write_json", "on")])        # saving it (streamed shards)
def test_sigkill_after_the_auto_choice_resumes(tmp_path, whole, kill_at, stream):
    out, work = tmp_path / "out", tmp_path / ".out.work"
    args = _args(out, *AUTO, "--stream", stream)
    killed = subprocess.run([sys.executable, "-c", KILL_AT, kill_at, *args], env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "auto: held-out ppl" in killed.stderr and "-> freeze" in killed.stderr  # killed after the choice
    assert work.is_dir() and not out.exists()
    rec = _prune(out, *AUTO, "--stream", stream)  # the same command
    ref, ref_weights = whole["auto"]
    _same(ref_weights, _weights(out))
    assert _sans_seconds(rec["method_summary"]) == _sans_seconds(ref["method_summary"])
    assert [_sans_seconds(r) for r in rec["layers"]] == [_sans_seconds(r) for r in ref["layers"]]
    assert rec["evaluation"]["wikitext2"]["ppl"] == ref["evaluation"]["wikitext2"]["ppl"]
    assert rec["memory"]["resumed_from_block"] == 5  # every block was finished: nothing pruned again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # work folder and the killed save's folder gone


# --------------------------------------------------------------------------- --fast
def test_fast_resume_batches_like_the_uninterrupted_run(tmp_path, monkeypatch):
    """The finished blocks of a resumed `--fast` run propagate several samples per forward (up to 8; here both)
    as the uninterrupted run did (one at a time they would be other float operations: GPUs and other BLAS builds
    may round them differently)."""
    import d2prune.engine.sequential as engine

    batches: list[int] = []
    real = engine.run_block
    monkeypatch.setattr(engine, "run_block", lambda block, hidden, *a, **k: batches.append(hidden.shape[0])
                        or real(block, hidden, *a, **k))
    _prune(tmp_path / "whole", *PLAIN, "--fast")
    uninterrupted, batches[:] = list(batches), []
    assert uninterrupted == [2] * 5  # one forward of both samples per block: the propagation is batched

    crash_after_block(monkeypatch, 2)
    with pytest.raises(Crash):
        _prune(tmp_path / "out", *PLAIN, "--fast")
    monkeypatch.undo()
    monkeypatch.setattr(engine, "run_block", lambda block, hidden, *a, **k: batches.append(hidden.shape[0])
                        or real(block, hidden, *a, **k))
    batches[:] = []
    rec = _prune(tmp_path / "out", *PLAIN, "--fast")
    assert rec["memory"]["resumed_from_block"] == 3
    assert batches == uninterrupted  # blocks 0-2 re-run as batches of 2, not 2 single samples
    _same(_weights(tmp_path / "whole"), _weights(tmp_path / "out"))


# --------------------------------------------------------------------------- damaged work folders
@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Work folders of runs that stopped after their block 2: ``plain``, and ``auto`` in its search."""
    root = tmp_path_factory.mktemp("crashed")
    mp = pytest.MonkeyPatch()
    try:
        for name, args in (("plain", PLAIN), ("auto", AUTO)):
            crash_after_block(mp, 2)
            with pytest.raises(Crash):
                _prune(root / name / "out", *args)
            mp.undo()
    finally:
        mp.undo()
    return root


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    """The work folder of an ``auto`` run that stopped right after its choice (while evaluating)."""
    import d2prune.pipeline as pipeline

    def crash(*a, **k):
        raise Crash()

    root = tmp_path_factory.mktemp("chosen")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(pipeline, "evaluate_ppl", crash)
        with pytest.raises(Crash):
            _prune(root / "chosen" / "out", *AUTO)
    finally:
        mp.undo()
    return root


def _copy_work(crashed: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(crashed / name / ".out.work", tmp_path / ".out.work")
    return tmp_path / ".out.work"


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_block_file_is_pruned_again(tmp_path, crashed, whole, caplog, damage):
    work = _copy_work(crashed, "plain", tmp_path)
    block = work / "block-00001.safetensors"
    if damage == "truncated":
        os.truncate(block, block.stat().st_size // 2)
    else:
        block.unlink()
    with caplog.at_level(logging.WARNING, logger="d2prune"):
        rec = _prune(tmp_path / "out", *PLAIN)
    assert any("block-00001.safetensors" in r.message and "pruning blocks 2-5 again" in r.message
               for r in caplog.records)
    assert rec["memory"]["resumed_from_block"] == 1
    _same(whole["plain"][1], _weights(tmp_path / "out"))
    assert [r["name"] for r in rec["layers"]] == [r["name"] for r in whole["plain"][0]["layers"]]


def test_damaged_candidate_file_is_pruned_again(tmp_path, crashed, whole):
    work = _copy_work(crashed, "auto", tmp_path)
    os.truncate(work / "block-v-00002.safetensors", 100)
    rec = _prune(tmp_path / "out", *AUTO)
    assert rec["memory"]["resumed_from_block"] == 2
    _same(whole["auto"][1], _weights(tmp_path / "out"))
    assert _sans_seconds(rec["method_summary"]) == _sans_seconds(whole["auto"][0]["method_summary"])


@pytest.mark.parametrize("state", ["array", "identity", "next_block", "rows", "candidates", "chosen"])
def test_wrong_shaped_state_is_one_line_naming_restart(tmp_path, request, capsys, state):
    """Valid JSON that is not what d2prune writes: one line naming --restart, never a traceback."""
    folder = {"candidates": "auto", "chosen": "chosen"}.get(state, "plain")
    work = _copy_work(request.getfixturevalue("chosen" if state == "chosen" else "crashed"), folder, tmp_path)
    saved = json.loads((work / "state.json").read_text())
    broken = {"array": [], "identity": {**saved, "identity": "x"}, "next_block": {**saved, "next_block": 99},
              "rows": {**saved, "rows": [{"name": "model.layers.0.self_attn.q_proj"}]},  # a row without its fields
              "candidates": {**saved, "candidates": {"q": {"rows": 5}}},
              "chosen": {**saved, "summary": {"heldout_ppl": [1, 2, 3]}}}[state]
    (work / "state.json").write_text(json.dumps(broken))
    args = PLAIN if folder == "plain" else AUTO
    rc = main(["-q", *_args(tmp_path / "out", *args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--restart" in err and "state.json" in err, err
    if state == "array":  # what the line says works
        assert main(["-q", *_args(tmp_path / "out", *args, "--restart")]) == 0


def test_damaged_block_after_the_auto_choice_is_one_line_naming_restart(tmp_path, chosen, capsys):
    work = _copy_work(chosen, "chosen", tmp_path)
    os.truncate(work / "block-00003.safetensors", 1000)
    rc = main(["-q", *_args(tmp_path / "out", *AUTO)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "block-00003" in err and "--restart" in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- one run per --out
PAUSE_AFTER_BLOCK_1 = """
import sys, time
from pathlib import Path
import d2prune.io.resume as resume
real = resume.WorkFolder.commit
def commit(self, next_block, *a, **k):
    real(self, next_block, *a, **k)
    if next_block == 2:
        Path(sys.argv[1]).write_text("paused")
        time.sleep(600)
resume.WorkFolder.commit = commit
from d2prune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_second_run_on_the_same_out_is_refused_and_a_killed_one_does_not_block(tmp_path, whole, capsys):
    out, state, ready = tmp_path / "out", tmp_path / ".out.work" / "state.json", tmp_path / "paused"
    first = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_BLOCK_1, str(ready), "-q", *_args(out, *PLAIN)],
                             env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run never reached block 2"
            time.sleep(0.05)
        before = state.read_bytes()
        t0 = time.time()
        rc = main(["-q", *_args(out, *PLAIN)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"pid {first.pid}" in err and "--out" in err and str(tmp_path / ".out.work") in err
        assert time.time() - t0 < 60  # refused before any pruning, not after it
        assert state.read_bytes() == before and not out.exists()  # the first run's folder untouched
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait()
    rec = _prune(out, *PLAIN)
    assert rec["memory"]["resumed_from_block"] == 2
    _same(whole["plain"][1], _weights(out))


# --------------------------------------------------------------------------- a save killed at its end
SAVE_KILLED = """
import os, signal, sys
from pathlib import Path
import d2prune.io.save as save
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
    from d2prune.io.save import save_pruned

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
