"""The per-layer error of a method without a Hessian is measured on the
propagation pass (no X^T X accumulated for a statistic): equal to a direct
computation of ||W X - W' X||^2 / ||W X||^2 on the layer's inputs."""

from __future__ import annotations

import copy

import torch

from d2prune import PruneConfig, prune
from d2prune.engine.sequential import capture_block_inputs
from d2prune.io.modeling import find_blocks

from conftest import needs_shared

pytestmark = needs_shared


@torch.no_grad()
def test_wanda_error_equals_direct_computation(stories, stories_calib):
    dense, _ = stories
    model = copy.deepcopy(dense)
    calib = stories_calib[:4]
    report = prune(model, PruneConfig(method="wanda", sparsity=0.5, device="cpu"), calib)
    cpu = torch.device("cpu")
    inputs = capture_block_inputs(dense, calib, cpu)
    block_d, block_p = find_blocks(dense)[0], find_blocks(model)[0]
    x = block_d.input_layernorm(inputs.hidden).float()  # what q/k/v of block 0 read, dense or pruned alike
    rows = {r.name: r for r in report.layers}
    for name in ("q_proj", "k_proj", "v_proj"):
        W = getattr(block_d.self_attn, name).weight.float()
        Wp = getattr(block_p.self_attn, name).weight.float()
        want = float(((x @ (W - Wp).t()) ** 2).sum() / ((x @ W.t()) ** 2).sum())
        got = rows[f"model.layers.0.self_attn.{name}"].error
        assert abs(got - want) <= 1e-5 * want, (name, got, want)
    assert all(r.error is not None and 0 < r.error < 1.0 for r in report.layers)  # Wanda beats zeroing every layer


def test_no_hessian_is_built_for_wanda(stories, stories_calib, monkeypatch):
    from d2prune import stats

    def refuse(self, *a, **k):
        raise AssertionError("a Hessian was accumulated for a method that does not use one")

    monkeypatch.setattr(stats.RunningHessian, "update", refuse)
    prune(copy.deepcopy(stories[0]), PruneConfig(method="wanda", sparsity=0.5, device="cpu"), stories_calib[:2])
