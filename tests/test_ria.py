"""RIA against its closed form, written here from the paper's formula, on
every Linear of block 0 of a tiny LLaMA; the method through the CLI and a sweep."""

from __future__ import annotations

import pytest
import torch

from conftest import C4, STORIES, WIKI, forward_calls, needs_shared, tiny_model
from d2prune import D2PruneError, PruneConfig, find_prunable, prune
from d2prune.cli import build_parser, method_options
from d2prune.config import method_config, method_label, parse_method_spec
from d2prune.methods.ria import RIAConfig, ria_score
from d2prune.io.modeling import weight_matrix


def block0_inputs(model, calib) -> dict[str, list[torch.Tensor]]:
    """Per-sample inputs ``X_k`` ``[L, d_in]`` of every Linear of block 0, from the model's own forward."""
    calls = forward_calls(model, find_prunable(model.model.layers[0]), calib)
    return {n: [inp[0][0].clone() for inp, _ in c] for n, c in calls.items()}


def closed_form_score(W: torch.Tensor, X: list[torch.Tensor], a: float) -> torch.Tensor:
    """float64: ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * (sqrt(mean_k ||X_k[:, j]||^2))^a``."""
    W = W.double().abs()
    norm = torch.stack([x.double().norm(dim=0) ** 2 for x in X]).mean(0).sqrt()
    return (W / W.sum(0, keepdim=True) + W / W.sum(1, keepdim=True)) * norm.reshape(1, -1) ** a


def _reference_mask(score: torch.Tensor, sparsity: str, rule: str) -> torch.Tensor:
    if ":" in sparsity:
        n, m = map(int, sparsity.split(":"))
        groups = score.reshape(score.shape[0], -1, m)
        idx = torch.sort(groups, dim=-1, stable=True)[1][..., :n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(score.shape)
    p = float(sparsity)
    if rule == "layer":
        return score <= torch.sort(score.flatten())[0][int(score.numel() * p)]
    k = int(score.shape[1] * p)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], True)


@pytest.mark.parametrize("sparsity,rule,a", [("0.5", "row", 0.5), ("0.6", "layer", 0.5), ("2:4", "row", 0.5),
                                             ("0.5", "row", 1.0)])
def test_masks_equal_closed_form(sparsity, rule, a):
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    xs = block0_inputs(model, calib)
    dense = {n: weight_matrix(m).clone() for n, m in find_prunable(model.model.layers[0]).items()}
    report = prune(model, PruneConfig(method=RIAConfig(a=a, rule=rule), sparsity=sparsity, device="cpu"), calib)
    assert {r.how for r in report.layers} == {"ria"}
    for n, m in find_prunable(model.model.layers[0]).items():
        want = _reference_mask(closed_form_score(dense[n], xs[n], a), sparsity, rule)
        got = weight_matrix(m)
        assert torch.equal(got == 0, want), n
        assert torch.equal(got[~want], dense[n][~want]), n  # no update


def test_score_formula_by_hand():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    sq = torch.tensor([4.0, 9.0])  # ||X_j|| = 2, 3
    # column sums 4, 2; row sums 3, 3
    want = torch.tensor([[1 / 4 + 1 / 3, 2 / 2 + 2 / 3], [3 / 4 + 3 / 3, 0.0]]) * torch.tensor([2.0, 3.0]) ** 0.5
    torch.testing.assert_close(ria_score(W, sq, 0.5), want)
    # an all-zero row or column has no share to give: 0, not NaN
    Z = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert torch.isfinite(ria_score(Z, sq, 0.5)).all()


def test_options_from_cli_and_specs(capsys):
    args = build_parser().parse_args(["prune", "--method", "ria", "--a", "0.25", "--rule", "layer"])
    cfg = method_config(args.method, **method_options(args))
    assert cfg == RIAConfig(a=0.25, rule="layer")
    assert parse_method_spec(method_label(cfg)) == cfg == parse_method_spec("ria:a=0.25,rule=layer")
    for bad in ({"a": -1}, {"rule": "column"}):
        with pytest.raises(D2PruneError):
            RIAConfig(**bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method {d2prune,magnitude,pruner-zero,ria,sparsegpt,wanda}" in text
    assert "ria options: --a A RIA: exponent of the input-channel activation norm (default 0.5)" in text


@needs_shared
def test_in_a_sweep(tmp_path):
    from d2prune.pipeline import DataConfig
    from d2prune.sweep import SweepConfig, run_sweep, split_methods, split_sparsities

    data = DataConfig(calib_file=str(C4), nsamples=4, seqlen=64, eval_file=str(WIKI), eval_windows=2)
    rows = run_sweep(SweepConfig(models=[str(STORIES)], methods=split_methods("wanda,ria:a=0.5,rule=layer"),
                                 sparsities=split_sparsities("0.5"), data=data, out=str(tmp_path), device="cpu"))
    ria = [r for r in rows if r["method"].startswith("ria")]
    assert [r["method"] for r in ria] == ["ria:rule=layer"] and abs(float(ria[0]["achieved"]) - 0.5) < 0.01
    assert "ria:rule=layer" in (tmp_path / "results.md").read_text()
