"""RIA: relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play:
An Efficient Post-training Pruning Method for Large Language Models").

Score ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_:,j||_2^a``: the
weight's share of its input channel's (column) and of its output channel's
(row) total magnitude, times its input channel's activation norm to the power
``a`` (0.5 in the paper). No weight update. ``||X_:,j||`` is Wanda's statistic
(the square root of the running mean of squared channel norms); float
operations in the order of the authors' ``prune_ria``
(biomedical-cybernetics/Relative-importance-and-activation-pruning).

Masks: N:M per group of M inputs; unstructured ``rule="row"`` prunes
``int(cols * p)`` per output row (Wanda's rule; the reference's
``--per_outneuron``), ``rule="layer"`` every score ``<=`` the
``int(numel * p)``-th smallest of the matrix (the reference's default). The
reference's N:M channel reallocation / linear-sum assignment is not implemented.

This file is the whole method: config (its fields are the ``--a`` / ``--rule``
flags and the ``ria:a=...`` sweep options), math, per-layer wrapper, registration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..config import MethodConfig, Sparsity, option
from ..errors import D2PruneError
from ..ops.masks import at_or_below_kth, row_mask
from ..engine.method import MaskPruner, Method, register

RIA_RULES = ("row", "layer")


@dataclass(frozen=True)
class RIAConfig(MethodConfig):
    """RIA (ICLR 2024): relative importance x activation^a, no update."""

    name: ClassVar[str] = "ria"
    a: float = option(0.5, "RIA: exponent of the input-channel activation norm")
    rule: str = option("row", "RIA unstructured mask: row (int(cols*p) per output row) | layer (every score <= the "
                              "int(numel*p)-th of the matrix, the reference's default)")

    def __post_init__(self) -> None:
        if not (isinstance(self.a, (int, float)) and not isinstance(self.a, bool) and math.isfinite(self.a)
                and self.a >= 0):
            raise D2PruneError(f"--a {self.a!r} must be a finite number >= 0 (the paper uses 0.5)")
        object.__setattr__(self, "a", float(self.a))
        if self.rule not in RIA_RULES:
            raise D2PruneError(f"--rule {self.rule!r} is not valid: use {' or '.join(RIA_RULES)}")


def ria_score(W: Tensor, sq_norm: Tensor, a: float) -> Tensor:
    """``(|W| / column sums + |W| / row sums) * sqrt(sq_norm)^a`` (``sq_norm``:
    Wanda's mean squared input-channel norm). A row or column of zeros has no
    share to give: 0, not 0/0."""
    W = torch.abs(W)
    of_column = (W / torch.sum(W, dim=0)).nan_to_num_(nan=0.0)
    of_row = (W / torch.sum(W, dim=1).reshape(-1, 1)).nan_to_num_(nan=0.0)
    return (of_column + of_row) * (torch.sqrt(sq_norm.reshape((1, -1)))) ** a


def ria_mask(score: Tensor, sparsity: Sparsity, rule: str) -> Tensor:
    if rule == "layer" and not sparsity.is_nm:
        return at_or_below_kth(score, sparsity.ratio)
    return row_mask(score, sparsity)


class RIALayer(MaskPruner):
    input_stats = ("sq_norm",)
    label = "ria"

    def mask(self, W, stats):
        return ria_mask(ria_score(W, stats["sq_norm"].value, self.config.a), self.sparsity, self.config.rule)


@register
class RIA(Method):
    config_type = RIAConfig
    layer_type = RIALayer
