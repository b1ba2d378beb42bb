"""Data-parallel calibration: ``torchrun --nproc-per-node 2 -m d2prune prune``
(gloo, CPU) gives the masks of one process; a job that loses a rank ends
instead of hanging, and its work folder resumes with as many processes (not
another number); ``--restart`` starts over on every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import C4, ROOT, STORIES, Crash, crash_after_block, needs_shared

pytestmark = [needs_shared, pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]

ARGS = ["--model", str(STORIES), "--nsamples", "8", "--seqlen", "128", "--calib-file", str(C4), "--no-eval"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "D2PRUNE_DIST_TIMEOUT": "60"}


def _one(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "d2prune", "-q", "prune", *ARGS, *extra, "--out", str(out)],
                   check=True, env=ENV, timeout=600)


def _torchrun(*extra: str, procs: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", "d2prune", "-q", "prune", *ARGS, *extra]


def _agreement(a: Path, b: Path) -> dict[str, float]:
    """Per pruned matrix: the fraction of weights whose kept/pruned state is the same in both folders."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return {k: float(((wa[k] == 0) == (wb[k] == 0)).float().mean()) for k in wa if k.endswith("proj.weight")}


# Statistics that combine exactly over the ranks (running means and sums: SparseGPT's Hessian, Wanda's
# squared norms, the normalized D2Prune means, Pruner-Zero's summed squared gradients) give the masks of
# one process: every layer's mask is asserted equal, weight for weight. The floats differ only by the
# order of the additions, far below the gaps between the scores a mask is chosen from. With a statistic
# left un-merged a rank chooses from half the samples and no layer's mask is the same (tested by
# disabling the all-reduce: mean agreement 0.983 sparsegpt, 0.978 wanda 2:4, 0.983 normalized, 0.936
# pruner-zero). Magnitude has no statistic: the --restart test below checks its masks.
@pytest.mark.parametrize("method", [["--method", "sparsegpt"], ["--method", "wanda", "--sparsity", "2:4"],
                                    ["--method", "d2prune", "--frozen", "k", "--variant", "normalized"],
                                    ["--method", "pruner-zero"]])
def test_two_processes_give_the_masks_of_one(tmp_path, method):
    _one(tmp_path / "one", *method)
    subprocess.run(_torchrun(*method, "--out", str(tmp_path / "two")), check=True, env=ENV, timeout=600)
    agree = _agreement(tmp_path / "one", tmp_path / "two")
    assert len(agree) == 35 and all(v == 1.0 for v in agree.values()), {k: v for k, v in agree.items() if v < 1}
    rec = json.loads((tmp_path / "two" / "d2prune.json").read_text())
    assert rec["sparsity"] == json.loads((tmp_path / "one" / "d2prune.json").read_text())["sparsity"]


def test_faithful_variant_is_close_to_one_process(tmp_path):
    """faithful's index-weighted buffers are merged as means: not the single
    process's numbers, so not its masks either; measured here (docs/scale.md
    §4): per layer min 0.9973, mean 0.99984 of the weights agree. With the
    statistics left un-merged (each rank choosing from its 4 samples) min
    0.951, mean 0.983: the bounds below tell the two apart."""
    method = ["--method", "d2prune", "--frozen", "k"]
    _one(tmp_path / "one", *method)
    subprocess.run(_torchrun(*method, "--out", str(tmp_path / "two")), check=True, env=ENV, timeout=600)
    agree = _agreement(tmp_path / "one", tmp_path / "two")
    print("faithful mask agreement per layer: min %.5f mean %.5f" % (min(agree.values()),
                                                                   sum(agree.values()) / len(agree)))
    assert min(agree.values()) >= 0.99 and sum(agree.values()) / len(agree) >= 0.999


def test_a_dead_rank_ends_the_job_and_the_work_folder_resumes(tmp_path, capsys):
    method = ["--method", "sparsegpt", "--nsamples", "64"]
    out, state = tmp_path / "out", tmp_path / ".out.work" / "state.json"
    job = subprocess.Popen(_torchrun(*method, "--out", str(out)), env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (state.is_file() and json.loads(state.read_text())["next_block"] >= 1):
        assert job.poll() is None and time.time() < deadline, "the job ended before a block was saved"
        time.sleep(0.05)
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", "-P", str(job.pid), "d2prune"], capture_output=True,
                                              text=True).stdout.split()]
    assert workers, "no worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    t0 = time.time()
    job.wait(timeout=120)  # the others stop instead of waiting forever on a collective
    assert job.returncode != 0 and time.time() - t0 < 120 and not out.exists()
    saved = json.loads(state.read_text())["next_block"]
    assert saved >= 1
    # its statistics were merged over 2 processes: one process does not resume it
    from d2prune.cli import main

    assert main(["-q", "prune", *ARGS, *method, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted run of 2 processes; this run has 1 process" in err and \
        "under torchrun --nproc-per-node 2" in err and "--restart" in err, err
    assert json.loads(state.read_text())["next_block"] == saved
    done = subprocess.run(_torchrun(*method, "--out", str(out)), env=ENV, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "d2prune.json").read_text())["memory"]["resumed_from_block"] >= saved
    subprocess.run(_torchrun(*method, "--out", str(tmp_path / "whole")), check=True, env=ENV, timeout=600)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# rank 0 enters WorkFolder.begin only after rank 1 did: the worst interleaving of a --restart, where rank 1
# looks at the work folder before rank 0 has removed it (left to chance, the two race)
RANK1_FIRST = """
import os, sys, time
from pathlib import Path

import d2prune.io.resume as resume
from d2prune.cli import main

flag, real = Path(sys.argv[1]), resume.WorkFolder.begin


def begin(self, n_blocks):
    if os.environ["RANK"] == "0":
        deadline = time.time() + 60
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
    else:
        flag.touch()
    return real(self, n_blocks)


resume.WorkFolder.begin = begin
sys.exit(main(sys.argv[2:]))
"""


def test_another_world_size_is_refused_and_restart_starts_over(tmp_path, monkeypatch):
    """A one-process run killed after block 2, rerun under torchrun with 2
    processes: refused in one line naming the number of processes (its
    statistics were merged over another split); with --restart every rank
    starts over (rank 1 must not read the folder rank 0 discards) and gives
    the one-process model (magnitude: no statistic, bit-identical)."""
    from d2prune.cli import main

    method = ["--method", "magnitude"]
    out, work = tmp_path / "out", tmp_path / ".out.work"
    assert main(["-q", "prune", *ARGS, *method, "--out", str(tmp_path / "one")]) == 0
    crash_after_block(monkeypatch, 2)
    with pytest.raises(Crash):
        main(["-q", "prune", *ARGS, *method, "--out", str(out)])
    monkeypatch.undo()
    assert json.loads((work / "state.json").read_text())["identity"]["world_size"] == 1

    refused = subprocess.run(_torchrun(*method, "--out", str(out)), env=ENV, timeout=600, capture_output=True,
                             text=True)
    errors = {line for line in refused.stderr.splitlines() if line.startswith("d2prune: error:")}
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-3000:]  # the same line from both ranks
    (line,) = errors
    assert "interrupted run of 1 process;" in line and "this run has 2 processes" in line and \
        "as one process (no torchrun)" in line and "--restart" in line, line
    assert work.is_dir() and not out.exists()

    launcher = tmp_path / "rank1_first.py"
    launcher.write_text(RANK1_FIRST)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(launcher),
           str(tmp_path / "rank1-began"), "-q", "prune", *ARGS, *method, "--out", str(out), "--restart"]
    done = subprocess.run(cmd, env=ENV, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank1-began").exists() and not work.exists()
    assert json.loads((out / "d2prune.json").read_text())["memory"]["resumed_from_block"] == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_prune_moe_experts_like_one(tmp_path):
    """A tiny Qwen3-MoE: each expert's routed-token statistics, its token count and the few-token fallback
    decision are combined over the ranks, so two processes give one process's masks and expert rows."""
    sys.path.insert(0, str(ROOT / "tests"))
    from moe_models import save_with_tokenizer

    save_with_tokenizer("qwen3_moe", tmp_path / "dense", STORIES)
    args = ["--model", str(tmp_path / "dense"), "--seqlen", "64", "--method", "sparsegpt", "--moe-min-tokens", "250"]
    _one(tmp_path / "one", *args)
    subprocess.run(_torchrun(*args, "--out", str(tmp_path / "two")), check=True, env=ENV, timeout=600)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    experts = [k for k in wa if ".experts." in k]
    assert experts and all(torch.equal(wa[k] == 0, wb[k] == 0) for k in wa)
    rows = [{r["name"]: (r["tokens"], r["statistics"]) for r in json.loads((tmp_path / d / "d2prune.json").read_text())
             ["layers"] if r["tokens"] is not None} for d in ("one", "two")]
    assert rows[0] == rows[1]
    assert {s.split(" (")[0] for _, s in rows[0].values()} == {"routed", "all tokens"}  # both kinds occur
