"""OWL per-block sparsity (issue 9 item 3): the allocation rule, the outlier
ratios against the model's own forward, every method honouring it, and the
errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import C4, STORIES, WIKI
from d2prune import PruneConfig, find_blocks, find_prunable, prune
from d2prune.engine.allocation import outlier_ratio, owl_sparsities
from d2prune.cli import main
from d2prune.config import parse_method_spec
from d2prune.errors import D2PruneError
from d2prune.io.modeling import weight_matrix


def test_owl_sparsities_rule():
    ratios = [0.02, 0.03, 0.01, 0.015, 0.05]
    weights = [100, 100, 100, 100, 100]
    s = owl_sparsities(ratios, weights, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)
    assert all(0.62 - 1e-12 <= v <= 0.78 + 1e-12 for v in s)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert all(s[order[k]] > s[order[k + 1]] for k in range(4))  # more outliers, pruned less
    # unequal block sizes: the weight-weighted mean is the target
    w = [10, 300, 50, 200, 40]
    s2 = owl_sparsities(ratios, w, 0.6, 0.1)
    assert sum(a * b for a, b in zip(s2, w)) / sum(w) == pytest.approx(0.6, abs=1e-12)
    assert all(0.5 - 1e-12 <= v <= 0.7 + 1e-12 for v in s2)
    # no differences between blocks: uniform
    assert owl_sparsities([0.01] * 4, [1] * 4, 0.5, 0.08) == pytest.approx([0.5] * 4)


def test_outlier_ratio_textbook():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 9, generator=g) ** 4, torch.rand(3, 20, generator=g) ** 4]
    flat = torch.cat([s.flatten() for s in scores]).double()
    want = float((flat > 5 * flat.mean()).double().mean())
    assert outlier_ratio(scores, 5.0) == pytest.approx(want, abs=1e-12) and want > 0


needs_stories = pytest.mark.skipif(not STORIES.is_dir() or not C4.is_file(), reason="../shared is not available")


@pytest.fixture(scope="module")
def calib(stories_calib):
    return stories_calib[:8, :64]


def _own_forward_ratios(model, calib, m: float) -> list[float]:
    """OWL's outlier ratio per block from the model's own dense forward: hooks
    catch every block Linear's input, Wanda's score is built by hand."""
    blocks = find_blocks(model)
    sq, hooks = {}, []
    for i, b in enumerate(blocks.layers):
        for n, lin in find_prunable(b).items():
            def hook(mod, inp, out, key=(i, n)):
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                sq[key] = sq.get(key, 0) + (x * x).sum(0)
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for row in calib:
            model(row[None])
    for h in hooks:
        h.remove()
    out = []
    for i, b in enumerate(blocks.layers):
        scores = [weight_matrix(lin).double().abs() * sq[(i, n)].sqrt()[None] for n, lin in find_prunable(b).items()]
        flat = torch.cat([s.flatten() for s in scores])
        out.append(float((flat > m * flat.mean()).double().mean()))
    return out


def _owl_rule(ratios: list[float], target: float, lam: float) -> list[float]:
    """docs/method.md §8 for blocks of one size, solved here another way:
    ``d_i = 2 lam (r_i - min r) / (max r - min r)``, block ``i`` pruned at
    ``clip(target + lam - d_i + c)`` to ``[target - lam, target + lam]``, with
    the common shift ``c`` that makes the mean ``target`` found by bisection."""
    lo, hi = min(ratios), max(ratios)
    d = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    clip = lambda v: min(max(v, target - lam), target + lam)  # noqa: E731
    a, b = -1.0, 1.0
    for _ in range(200):
        c = (a + b) / 2
        a, b = (c, b) if sum(clip(target + lam - di + c) for di in d) / len(d) < target else (a, c)
    return [clip(target + lam - di + c) for di in d]


def _zeros_by_rule(method: str, name: str, shape: tuple[int, int], s: float) -> int:
    """How many weights a layer of ``shape`` loses at sparsity ``s`` under the
    method's counting rule (docs/method.md §1; no ties in real weights)."""
    rows, cols = shape
    if method == "magnitude":  # exactly int(numel * s) of the layer
        return int(rows * cols * s)
    if method == "wanda" or name.endswith("k_proj") and method == "d2prune:frozen=k":  # int(cols * s) per row
        return rows * int(cols * s)
    # SparseGPT's column blocks of 128: every score <= the int(numel * s)-th smallest of the block
    return sum(int(rows * min(128, cols - c) * s) + 1 for c in range(0, cols, 128))


@needs_stories
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "d2prune:frozen=k", "magnitude"])
def test_owl_prune_follows_allocation(stories, calib, method, monkeypatch):
    from d2prune.engine.method import LayerPruner

    handed: dict[str, float] = {}  # the sparsity each layer's pruner is given
    real_init = LayerPruner.__init__

    def spy(self, name, sparsity, *a, **k):
        handed[name] = sparsity.ratio
        real_init(self, name, sparsity, *a, **k)

    monkeypatch.setattr(LayerPruner, "__init__", spy)
    model = copy.deepcopy(stories[0])
    dense = copy.deepcopy(model)
    report = prune(model, PruneConfig(method=parse_method_spec(method), sparsity=0.7, allocation="owl", device="cpu"),
                   calib)
    alloc = report.method["allocation"]
    # the ratios are the dense model's (engine pass == the model's own forward), whatever the method
    ratios = _own_forward_ratios(dense, calib, 5.0)
    assert alloc["outlier_ratio"] == pytest.approx(ratios, abs=1e-6)
    # block i's sparsity is OWL's rule on block i's ratio, computed here
    want = _owl_rule(ratios, 0.7, 0.08)
    assert len(set(round(w, 3) for w in want)) == 5  # every block its own sparsity
    assert alloc["block_sparsity"] == pytest.approx(want, abs=1e-6)
    # every layer of block i was pruned at block i's sparsity: handed to its pruner, and the exact count of zeros
    blocks = find_blocks(model)
    for i, b in enumerate(blocks.layers):
        for n, lin in find_prunable(b).items():
            name = f"{blocks.prefix}.{i}.{n}"
            assert handed[name] == pytest.approx(want[i], abs=1e-9), (name, handed[name], want[i])
            W = weight_matrix(lin)
            assert int((W == 0).sum()) == _zeros_by_rule(method, n, tuple(W.shape), handed[name]), name
    assert report.sparsity == pytest.approx(0.7, abs=0.015)


@needs_stories
def test_owl_with_auto_search_and_cli_record(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["-q", "prune", "--model", str(STORIES), "--method", "d2prune", "--frozen", "auto", "--sparsity", "0.6",
                 "--allocation", "owl", "--owl-lambda", "0.05", "--nsamples", "8", "--seqlen", "64",
                 "--heldout-windows", "2", "--calib-file", str(C4), "--eval-file", str(WIKI), "--eval-windows", "2",
                 "--out", str(out)]) == 0
    rec = json.loads((out / "d2prune.json").read_text())
    alloc = rec["method_summary"]["allocation"]
    assert alloc["kind"] == "owl" and alloc["owl_lambda"] == 0.05 and len(set(alloc["block_sparsity"])) == 5
    per_block: dict[int, list] = {}
    for row in rec["layers"]:
        per_block.setdefault(int(row["name"].split(".")[2]), []).append(row["sparsity"])
    assert len(per_block) == 5
    for i, rows in per_block.items():  # recorded per layer, near the block's allocation
        assert max(abs(r - alloc["block_sparsity"][i]) for r in rows) < 0.03


def test_owl_refuses_nm_and_bad_options(capsys):
    with pytest.raises(D2PruneError, match="N:M"):
        PruneConfig(method="wanda", sparsity="2:4", allocation="owl")
    with pytest.raises(D2PruneError, match="owl-lambda"):
        PruneConfig(method="wanda", sparsity=0.5, allocation="owl", owl_lambda=1.5)
    with pytest.raises(D2PruneError, match="unknown allocation"):
        PruneConfig(method="wanda", sparsity=0.5, allocation="best")
    assert main(["prune", "--model", str(STORIES), "--sparsity", "2:4", "--allocation", "owl", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "N:M" in err


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_owl_allocation_pass_builds_no_hessian(monkeypatch, method):
    """The allocation pass needs Wanda's activation norms only: no Hessian
    (d_in^2 per input, for the per-layer error or the method) is accumulated
    in it; the prune after it still builds its own."""
    from conftest import tiny_model
    from d2prune.engine import allocation
    from d2prune.ops import stats

    built = {"allocation": 0, "prune": 0}
    where = ["prune"]
    real_init, real_owl = stats.RunningHessian.__init__, allocation.owl_allocation

    def counting_init(self, *a, **k):
        built[where[0]] += 1
        real_init(self, *a, **k)

    def owl(*a, **k):
        where[0] = "allocation"
        try:
            return real_owl(*a, **k)
        finally:
            where[0] = "prune"

    monkeypatch.setattr(stats.RunningHessian, "__init__", counting_init)
    monkeypatch.setattr(allocation, "owl_allocation", owl)
    report = prune(tiny_model("llama"), PruneConfig(method=method, sparsity=0.6, allocation="owl", device="cpu"),
                   torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)))
    assert report.method["allocation"]["kind"] == "owl"
    assert built["allocation"] == 0 and built["prune"] > 0, built
