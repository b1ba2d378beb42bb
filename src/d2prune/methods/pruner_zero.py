"""Pruner-Zero (Dong et al., ICML 2024), docs/method.md §2.

Score ``|W * W| * mms(G)`` (the evolved symbolic metric of pprp/Pruner-Zero's
``best_tree.json``), ``G`` = per-weight L2 norm of the language-modelling
loss gradient over the calibration samples (labels = inputs), ``mms`` = min-max
scaling over the whole matrix; pruned per row like Wanda (no update).

The gradients are taken on the dense model before any pruning, one sample at
a time, with the weights untouched (the reference collects them with an
optimizer in the loop; we never step). Memory: the model on the device, one
sample's activations and autograd graph, and an fp32 buffer of ``G^2`` per
pruned weight (4 bytes per weight); each ``.grad`` is folded into ``G^2`` and
freed as soon as it is accumulated, so no full set of gradients is held.
Under torchrun each rank takes the gradients of its own samples and the
sums of squares are summed over the ranks before the square root, so ``G``
is that of all the samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..engine import distributed
from ..config import MethodConfig
from ..engine.sequential import check_finite
from ..errors import D2PruneError
from ..ops.masks import row_mask
from ..io.modeling import find_blocks, find_prunable, to_matrix
from ..engine.method import MaskPruner, Method, register

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PrunerZeroConfig(MethodConfig):
    """Pruner-Zero (Dong et al., ICML 2024): score |W * W| * mms(G), G the
    per-weight L2 norm of the LM-loss gradients over the calibration samples."""

    name: ClassVar[str] = "pruner-zero"
    whole_model_bytes_per_weight: ClassVar[int] = 4  # the fp32 sum of squared gradients


def min_max(x: Tensor) -> Tensor:
    """``mms``: scale to [0, 1] over the whole tensor."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def pruner_zero_score(W: Tensor, G: Tensor) -> Tensor:
    return torch.abs(W * W) * min_max(G)


def gradient_norms(model: nn.Module, calibration: Tensor, device: torch.device) -> dict[str, Tensor]:
    """``{qualified Linear name: G}`` with ``G = sqrt(sum_k g_k^2)`` ([d_out, d_in], fp32)."""
    blocks = find_blocks(model)
    targets = {f"{blocks.prefix}.{i}.{n}": m for i, b in enumerate(blocks.layers) for n, m in find_prunable(b).items()}
    params = {id(m.weight): name for name, m in targets.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    sq: dict[str, Tensor] = {}
    handles = []

    def fold(p: Tensor) -> None:  # runs when p.grad is complete for this sample
        name = params[id(p)]
        g = p.grad.float()
        sq[name] = g * g if name not in sq else sq[name].add_(g * g)
        p.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in params)
        for m in targets.values():
            handles.append(m.weight.register_post_accumulate_grad_hook(fold))
        model.to(device)
        for j in range(calibration.shape[0]):
            ids = calibration[j:j + 1].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise D2PruneError(f"the language-modelling loss is {loss.item()} on calibration sample {j}: "
                                   "load the model in float32 (--dtype float32) or check its weights")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.to(home)
    for name in targets:  # the same on every rank of a torchrun job (same model): all raise or none
        if name not in sq:
            raise D2PruneError(f"{name} received no gradient from the language-modelling loss: Pruner-Zero cannot score it")
    # torchrun: each rank summed the squares over its own samples; G is over all of them
    distributed.sum_(sq[name] for name in targets)
    out = {}
    for name, m in targets.items():
        out[name] = to_matrix(m, sq[name].sqrt()).contiguous()  # laid out like m.weight: as the weight matrix
    return out


class PrunerZeroLayer(MaskPruner):
    label = "pruner-zero"

    def __init__(self, name, sparsity, G: Tensor):
        super().__init__(name, sparsity)
        self.G = G

    def mask(self, W, stats):
        G = self.G.to(W.device)
        check_finite(G, f"the gradient norms of {self.name}")
        return row_mask(pruner_zero_score(W, G), self.sparsity)


@register
class PrunerZero(Method):
    config_type = PrunerZeroConfig

    def __init__(self, config, sparsity):
        super().__init__(config, sparsity)
        self.G: dict[str, Tensor] = {}

    def prepare(self, model, calibration, device):
        if getattr(model, "main_input_name", "input_ids") != "input_ids":
            raise D2PruneError(f"pruner-zero's gradients come from a language-modelling loss; {type(model).__name__} "
                               "is not a language model: use magnitude, wanda, sparsegpt or d2prune")
        if self.sparsity.ratio > 0:
            with torch.enable_grad():
                self.G = gradient_norms(model, calibration, device)

    def layer(self, name, module, block_index):
        return PrunerZeroLayer(name, self.sparsity_at(block_index), self.G.pop(name))
