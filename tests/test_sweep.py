"""A sweep killed mid-way and restarted skips finished cells and gives the
same table as an uninterrupted one."""

from __future__ import annotations

import pytest

from conftest import C4, STORIES, WIKI, needs_shared
import d2prune.sweep as sweep_mod
from d2prune.pipeline import DataConfig
from d2prune.sweep import SweepConfig, read_rows, run_sweep, split_methods, split_sparsities

pytestmark = needs_shared


def _cfg(out, **kw):
    data = DataConfig(calib_file=str(C4), nsamples=4, seqlen=64, eval_file=str(WIKI), eval_windows=3, heldout_windows=2)
    return SweepConfig(models=[str(STORIES)], methods=split_methods("magnitude,wanda,d2prune:frozen=k,variant=paper"),
                       sparsities=split_sparsities("0.5,2:4"), data=data, out=str(out), device="cpu", **kw)


def test_method_spec_splitting():
    names = [m.name for m in split_methods("wanda,d2prune:frozen=k,variant=paper,sparsegpt")]
    assert names == ["wanda", "d2prune", "sparsegpt"]
    assert split_methods("d2prune:frozen=k,variant=paper")[0].variant == "paper"


def test_killed_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    full = run_sweep(_cfg(tmp_path / "full"))
    assert len(full) == 1 + 3 * 2  # dense + methods x sparsities

    calls = {"n": 0}
    real = sweep_mod.prune

    def dying(*a, **k):  # the 4th cell is killed mid-prune
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "prune", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(tmp_path / "resumed"))
    assert len(read_rows(tmp_path / "resumed" / "results.csv")) == 1 + 3

    calls["n"] = 100  # no more deaths; count what the restart prunes
    run_sweep(_cfg(tmp_path / "resumed"))
    assert calls["n"] == 100 + 3  # only the 3 unfinished cells
    assert (tmp_path / "resumed" / "results.md").read_text() == (tmp_path / "full" / "results.md").read_text()
    assert (tmp_path / "full" / "ppl_vs_sparsity.png").is_file()
