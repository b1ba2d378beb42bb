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
from ..io.experts import ExpertLinear
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
    """``{qualified Linear name: G}`` with ``G = sqrt(sum_k g_k^2)`` ([d_out, d_in], fp32).

    A MoE expert's projection is a view of its experts module's fused 3-D
    parameter (io/experts.py): the gradient is taken on that parameter and each
    expert's slice read out of its sum of squares."""
    blocks = find_blocks(model)
    targets = {f"{blocks.prefix}.{i}.{n}": m for i, b in enumerate(blocks.layers) for n, m in find_prunable(b).items()}
    source = {name: m.source if isinstance(m, ExpertLinear) else m.weight for name, m in targets.items()}
    params = {id(p): p for p in source.values()}  # each parameter once (a fused one serves many experts)
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    sq: dict[int, Tensor] = {}
    handles = []

    def fold(p: Tensor) -> None:  # runs when p.grad is complete for this sample
        g = p.grad.float()
        sq[id(p)] = g * g if id(p) not in sq else sq[id(p)].add_(g * g)
        p.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in params)
        for p in params.values():
            handles.append(p.register_post_accumulate_grad_hook(fold))
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
        if id(source[name]) not in sq:
            raise D2PruneError(f"{name} received no gradient from the language-modelling loss: Pruner-Zero cannot score it")
    # torchrun: each rank summed the squares over its own samples; G is over all of them
    distributed.sum_(sq[i] for i in params)
    out = {}
    for name, m in targets.items():
        full = sq[id(source[name])]
        # laid out as the weight matrix
        out[name] = (m.select(full) if isinstance(m, ExpertLinear) else to_matrix(m, full)).sqrt().contiguous()
    return out


class PrunerZeroLayer(MaskPruner):
    label = "pruner-zero"

    def __init__(self, name, sparsity, G: Tensor):
        super().__init__(name, sparsity)
        self.G = G

    def mask(self, W, stats):
        G = self.G.to(W.device)
        check_finite(G, f"the gradient norms of {self.name}")
        if not G.max() > G.min():
            # no gradient reached it (a MoE expert no calibration token was routed to): mms(G) would be 0
            # everywhere and the mask arbitrary; |W * W| alone ranks the weights instead
            self.label = "pruner-zero (no gradient: |W|^2)"
            return row_mask(W * W, self.sparsity)
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
