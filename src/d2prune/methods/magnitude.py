"""Magnitude pruning: score ``|W_ij|``, the lowest ``p`` of each layer (docs/method.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..config import MethodConfig, Sparsity
from ..ops.masks import lowest_in_matrix, nm_mask
from ..engine.method import MaskPruner, Method, register


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MagnitudeConfig(MethodConfig):
    """Magnitude: score |W_ij|, lowest ``p`` of each layer pruned."""

    name: ClassVar[str] = "magnitude"


def magnitude_mask(W: Tensor, sparsity: Sparsity) -> Tensor:
    score = torch.abs(W)
    return nm_mask(score, sparsity.n, sparsity.m) if sparsity.is_nm else lowest_in_matrix(score, sparsity.ratio)


class MagnitudeLayer(MaskPruner):
    label = "magnitude"

    def mask(self, W, stats):
        return magnitude_mask(W, self.sparsity)


@register
class Magnitude(Method):
    config_type = MagnitudeConfig
    layer_type = MagnitudeLayer
