"""Per-block sparsity allocation: OWL (Yin et al., 2024, "Outlier Weighed
Layerwise sparsity"; docs/method.md §8).

Uniform pruning gives every block the same sparsity ``p``. OWL measures how
many *outliers* each block holds - the share of its Wanda scores
``|W_ij| * ||X_j||_2`` (all its prunable Linears together, dense weights,
inputs propagated through the dense model) above ``M`` times their mean - and
prunes blocks with more outliers less:

    r_i   = outlier ratio of block i
    d_i   = 2λ (r_i - min r) / (max r - min r)        in [0, 2λ]
    s_i   = p + λ - d_i, then shifted so that the weight-count-weighted mean
            of s_i over the blocks is exactly p (clipped to [p - λ, p + λ])

The reference (luuyin/OWL ``prune_wanda_outlier``) uses the plain mean over
blocks, which is the same for models whose blocks all have one size; the
weighted mean keeps the overall sparsity over all pruned weights at ``p``
for any model. The allocation is computed once, before pruning, by one dense
pass of the engine over every block; it works with every method, because
each block's layers simply receive their block's sparsity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import PruneRun, calibrate
from ..config import Sparsity
from .sequential import BlockInputs, propagate, sequential
from ..errors import D2PruneError
from .method import LayerPruner
from ..io.modeling import weight_matrix

log = logging.getLogger(__name__)

SCORE_CHUNK = 1 << 24  # Wanda scores compared with the threshold this many at a time


class _InputNorms(LayerPruner):
    """Collects the squared input norms Wanda's score needs; prunes nothing."""

    input_stats = ("sq_norm",)


@dataclass
class Allocation:
    """The per-block sparsities of a run, with what they were computed from."""

    kind: str
    target: float
    block_sparsity: list[float] = field(default_factory=list)
    outlier_ratio: list[float] = field(default_factory=list)
    block_weights: list[int] = field(default_factory=list)
    m: float | None = None
    lam: float | None = None

    def sparsity(self, i: int) -> Sparsity:
        return Sparsity(self.block_sparsity[i])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "owl_m": self.m, "owl_lambda": self.lam,
                "block_sparsity": [round(s, 6) for s in self.block_sparsity],
                "outlier_ratio": [round(r, 6) for r in self.outlier_ratio], "block_weights": self.block_weights}


def owl_sparsities(ratios: list[float], weights: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios (see the module docstring): more
    outliers, lower sparsity; within ``[target - lam, target + lam]`` and
    ``[0, 0.99]``; weight-weighted mean exactly ``target`` (whenever that is
    possible inside the bounds)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    span = float(r.max() - r.min())
    d = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    s = target + lam - d
    lo, hi = max(0.0, target - lam), min(0.99, target + lam)
    # shift to the exact weighted mean; clipping can move it, so shift the
    # unclipped blocks again until it holds (converges in a few rounds)
    for _ in range(100):
        s = s.clamp(lo, hi)
        gap = target - float((s * w).sum() / w.sum())
        if abs(gap) < 1e-12:
            break
        free = (s < hi) if gap > 0 else (s > lo)  # the blocks that can still move that way
        if not bool(free.any()):
            break
        s = torch.where(free, s + gap * float(w.sum()) / float(w[free].sum()), s)
    return [float(v) for v in s]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all the scores above ``m`` times their mean (OWL's ``check_outlier_mean``)."""
    total = sum(float(s.sum(dtype=torch.float64)) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    above = 0
    for s in scores:
        flat = s.reshape(-1)
        for k in range(0, flat.numel(), SCORE_CHUNK):
            above += int((flat[k:k + SCORE_CHUNK] > threshold).sum())
    return above / count


@torch.no_grad()
def owl_allocation(run: PruneRun, target: Sparsity, m: float, lam: float) -> Allocation:
    """OWL's per-block sparsities for ``run``'s model: one dense pass of the
    engine (input statistics of every block's Linears, then the dense block's
    outputs feed the next block), then :func:`owl_sparsities`."""
    if target.is_nm:
        raise D2PruneError(f"--allocation owl gives each block its own unstructured sparsity; N:M ({target}) is the "
                           "same fixed pattern everywhere: use an unstructured --sparsity such as 0.7")
    if not (0 < lam < 1):
        raise D2PruneError(f"--owl-lambda {lam} must be in (0, 1) (the paper uses 0.08)")
    if not m > 0:
        raise D2PruneError(f"--owl-m {m} must be > 0 (the paper uses 5)")
    ratios: list[float] = []
    weights: list[int] = []

    def step(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = run.layers(block, i)  # the layers kept dense (--ignore) take no part in the allocation
        watchers = {n: [_InputNorms(layers.qualified[n], target)] for n in layers.layers}
        # only Wanda's activation norms: no Hessian for a per-layer error (nothing is pruned in this pass)
        obs = calibrate(block, layers, inputs, watchers, run.options.without_error())
        scores = []
        for n, layer in layers.layers.items():
            a = obs.stats[n]["sq_norm"].value.float().sqrt().reshape(1, -1)
            scores.append(weight_matrix(layer).float().abs() * a)  # Wanda's score (docs/method.md §2)
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)  # a block kept dense entirely: no scores
        weights.append(sum(s.numel() for s in scores))
        del obs, scores
        propagate(block, i, inputs, run.options.batch)

    sequential(run.model, run.calibration, run.device, step, desc="owl", blocks=run.blocks, source=run.source)
    # the allocation spreads over the blocks with layers to prune (all of them unless --ignore keeps one dense)
    live = [i for i, w in enumerate(weights) if w]
    spread = owl_sparsities([ratios[i] for i in live], [weights[i] for i in live], target.ratio, lam)
    block_sparsity = [target.ratio] * len(weights)
    for i, s in zip(live, spread):
        block_sparsity[i] = s
    alloc = Allocation("owl", target.ratio, block_sparsity, ratios, weights, m, lam)
    log.info("OWL allocation (M=%g, lambda=%g): outlier ratios %s -> block sparsities %s", m, lam,
             " ".join(f"{r:.4f}" for r in ratios), " ".join(f"{s:.4f}" for s in alloc.block_sparsity))
    return alloc
