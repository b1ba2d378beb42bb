"""Pruner-Zero: gradients against plain autograd, on every Linear / GPT-2
``Conv1D`` (square ones included: a square ``Conv1D`` looks the same stored
or transposed, so only the values tell a misaligned gradient apart)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from d2prune import PruneConfig, Sparsity, find_blocks, find_prunable, prune
from d2prune import PrunerZeroConfig
from d2prune.ops.masks import row_mask
from d2prune.methods.pruner_zero import PrunerZero
from d2prune.io.modeling import Conv1D, weight_matrix

CPU = torch.device("cpu")


def autograd_norms(model, calib) -> dict[str, torch.Tensor]:
    """``sqrt(sum_k g_k^2)`` per pruned weight by plain autograd, one sample a
    backward, written as ``[d_out, d_in]`` here (``Conv1D`` stores ``[d_in, d_out]``)."""
    blocks = find_blocks(model)
    layers = {f"{blocks.prefix}.{i}.{n}": m for i, b in enumerate(blocks.layers) for n, m in find_prunable(b).items()}
    acc = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    for j in range(calib.shape[0]):
        model.zero_grad()
        model(input_ids=calib[j:j + 1], labels=calib[j:j + 1]).loss.backward()
        for n, m in layers.items():
            acc[n] += m.weight.grad ** 2
    model.zero_grad()
    return {n: (acc[n].sqrt().t() if isinstance(layers[n], Conv1D) else acc[n].sqrt()) for n in layers}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradients_match_autograd_for_every_layer(arch):
    model = tiny_model(arch)
    calib = torch.randint(0, 128, (3, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = PrunerZero(PrunerZeroConfig(), Sparsity.parse("0.5"))
    m.prepare(model, calib, CPU)
    for k, v in model.state_dict().items():  # the weights are never stepped
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    ref = autograd_norms(model, calib)
    assert set(m.G) == set(ref)
    if arch == "gpt2":  # the case a shape comparison cannot catch is really there
        assert any(isinstance(mod, Conv1D) and mod.weight.shape[0] == mod.weight.shape[1]
                   for mod in find_prunable(model.transformer.h[0]).values())
    for name, G in ref.items():
        torch.testing.assert_close(m.G[name], G, rtol=1e-5, atol=1e-8, msg=name)


def test_gpt2_masks_equal_the_score_from_autograd():
    """Every layer's mask after a prune equals the per-row rule on
    ``|W * W| * mms(G)`` with ``G`` from plain autograd."""
    model = tiny_model("gpt2")
    calib = torch.randint(0, 128, (3, 16))
    ref = autograd_norms(model, calib)
    dense = {n: weight_matrix(m).clone() for n, m in find_prunable(model.transformer).items()}
    prune(model, PruneConfig(method="pruner-zero", sparsity=0.5, device="cpu"), calib)
    for name, G in ref.items():
        short = name.removeprefix("transformer.")
        want = row_mask(torch.abs(dense[short] ** 2) * (G - G.min()) / (G.max() - G.min()), Sparsity.parse("0.5"))
        got = weight_matrix(find_prunable(model.transformer)[short]) == 0
        assert torch.equal(got, want), name


def test_prunes_per_row():
    model = tiny_model("qwen2")
    report = prune(model, PruneConfig(method="pruner-zero", sparsity=0.5, device="cpu"), torch.randint(0, 128, (3, 16)))
    for b in find_blocks(model).layers:
        for n, lin in find_prunable(b).items():
            W = weight_matrix(lin)
            assert torch.all((W == 0).sum(1) == W.shape[1] // 2), n
    assert len(report.layers) == 21
