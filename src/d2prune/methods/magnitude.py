"""Magnitude pruning: score ``|W_ij|``, the lowest ``p`` of each layer (docs/method.md §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import MagnitudeConfig, Sparsity
from ..masks import lowest_in_matrix, nm_mask
from .base import LayerPruner, Method, register


def magnitude_mask(W: Tensor, sparsity: Sparsity) -> Tensor:
    score = torch.abs(W)
    return nm_mask(score, sparsity.n, sparsity.m) if sparsity.is_nm else lowest_in_matrix(score, sparsity.ratio)


class MagnitudeLayer(LayerPruner):
    label = "magnitude"

    def prune(self, W, stats):
        mask = magnitude_mask(W, self.sparsity)
        W[mask] = 0
        return W, mask


@register
class Magnitude(Method):
    config_type = MagnitudeConfig

    def layer(self, name, module, block_index):
        return MagnitudeLayer(name, self.sparsity)
