"""The per-layer error (docs/method.md §1) has one definition for every
method: ``||(W - W') X||^2 / ||W X||^2`` with ``X`` the inputs the layer
receives in its block's dense calibration pass (the block's inputs come from
the already pruned earlier blocks; inside the block every layer is still
dense) and no bias. Checked on OPT, whose Linears have biases, against a
textbook computation: hooks on each Linear of the pruned model run with its
block ``i`` put back dense."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from d2prune import PruneConfig, find_blocks, find_prunable, prune
from d2prune.config import parse_method_spec
from d2prune.io.modeling import weight_matrix


@torch.no_grad()
def direct_layer_inputs(dense, pruned, ids) -> dict[str, tuple[torch.Tensor, torch.nn.Module, torch.nn.Module]]:
    """``{qualified name: (X [tokens, d_in] float64, dense layer, pruned layer)}``.
    ``X`` is caught by a hook on the layer while ``pruned`` runs with its
    block ``i`` put back dense (the model's own forward, all samples in one
    batch; ``pruned`` is left as it was)."""
    blocks_d, blocks_p = find_blocks(dense), find_blocks(pruned)
    out = {}
    for i in range(len(blocks_d)):
        block = blocks_p.layers[i]
        kept = {k: v.clone() for k, v in block.state_dict().items()}
        xs: dict[str, list] = {n: [] for n in find_prunable(block)}

        def keep(name):
            def hook(mod, inp, o):
                xs[name].append(inp[0].detach().double().reshape(-1, inp[0].shape[-1]))
            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in find_prunable(block).items()]
        try:
            block.load_state_dict(blocks_d.layers[i].state_dict())
            pruned(ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            block.load_state_dict(kept)
        lin_d, lin_p = find_prunable(blocks_d.layers[i]), find_prunable(block)
        for n, x in xs.items():
            out[f"{blocks_d.prefix}.{i}.{n}"] = (torch.cat(x), lin_d[n], lin_p[n])
    return out


def direct_layer_errors(dense, pruned, ids) -> dict[str, float]:
    """The textbook per-layer error of every pruned layer (see the module docstring)."""
    out = {}
    for name, (X, d, p) in direct_layer_inputs(dense, pruned, ids).items():
        W, Wp = weight_matrix(d).double(), weight_matrix(p).double()
        den = float(((X @ W.t()) ** 2).sum())
        out[name] = float(((X @ (W - Wp).t()) ** 2).sum()) / den if den > 0 else 0.0
    return out


def biased_opt():
    """Tiny OPT whose Linears have biases as large as their outputs (a fresh
    model's biases are all zero), so an error with the bias in its
    denominator would show; weights 5x the default init, so the layers'
    outputs are not drowned by the LayerNorms."""
    model = tiny_model("opt")
    g = torch.Generator().manual_seed(1)
    for name, lin in find_prunable(model.model.decoder).items():
        lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.1
        lin.bias.data = torch.randn(lin.bias.shape, generator=g)
    return model


@pytest.mark.parametrize("method,fast", [("sparsegpt", False), ("d2prune:frozen=k", False), ("wanda", False),
                                         ("magnitude", False), ("ria", False), ("pruner-zero", False),
                                         ("sparsegpt", True), ("wanda", True)])
def test_every_method_reports_the_same_error_as_a_direct_computation(method, fast):
    dense = biased_opt()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(dense)
    report = prune(model, PruneConfig(method=parse_method_spec(method), sparsity=0.5, device="cpu", fast=fast), ids)
    want = direct_layer_errors(dense, model, ids)
    got = {r.name: r.error for r in report.layers}
    assert set(got) == set(want) and len(got) == 18  # 3 blocks x q, k, v, out_proj, fc1, fc2
    for name, w in want.items():
        assert 0 <= w < 1, (name, w)  # the direct computation itself is sane: better than zeroing the layer
        # (absolute 1e-6: where OBS leaves almost nothing, ~1e-7, fp32 sums carry a few 1e-11)
        assert got[name] == pytest.approx(w, rel=1e-4, abs=1e-6), (name, got[name], w)
    assert max(want.values()) > 1e-2  # far above that tolerance


def test_the_definition_is_the_one_a_biased_model_tells_apart():
    """The check above can tell the bias-free error from the one with the bias
    in its denominator, and dense from pruned in-block inputs: on this model
    they differ by far more than its tolerance."""
    dense = biased_opt()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(dense)
    prune(model, PruneConfig(method="wanda", sparsity=0.5, device="cpu"), ids)
    inputs = direct_layer_inputs(dense, model, ids)
    for name, (X, d, p) in inputs.items():  # with the bias, every denominator at least doubles
        W, b = weight_matrix(d).double(), d.bias.detach().double()
        assert float(((X @ W.t() + b) ** 2).sum()) > 2 * float(((X @ W.t()) ** 2).sum()), name
    # out_proj of block 1 reads the attention output: computed from pruned q/k/v it is another X
    X_dense = inputs["model.decoder.layers.1.self_attn.out_proj"][0]
    pruned_in = []
    h = find_blocks(model).layers[1].self_attn.out_proj.register_forward_hook(
        lambda m, inp, o: pruned_in.append(inp[0].detach().double().reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j:j + 1], use_cache=False)
    h.remove()
    assert not torch.allclose(torch.cat(pruned_in), X_dense, rtol=1e-2, atol=1e-3)


def test_no_hessian_is_built_for_wanda_without_the_layer_error(monkeypatch):
    """Wanda needs no X^T X itself: only the per-layer error asks for one, and
    ``layer_error=False`` (``--no-layer-error``) builds none."""
    from d2prune.ops import stats

    def refuse(self, *a, **k):
        raise AssertionError("a Hessian was accumulated for a method that does not use one")

    model = biased_opt()
    ids = torch.randint(0, 128, (4, 16))
    monkeypatch.setattr(stats.RunningHessian, "update", refuse)
    report = prune(model, PruneConfig(method="wanda", sparsity=0.5, device="cpu", layer_error=False), ids)
    assert all(r.error is None for r in report.layers)
