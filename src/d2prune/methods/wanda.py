"""Wanda (Sun et al., 2023): score ``|W_ij| * ||X_:,j||_2``, per output row, no
weight update (docs/method.md §2; locuslab/wanda ``prune_wanda``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..config import MethodConfig
from ..ops.masks import by_rows, row_mask
from ..engine.method import MaskPruner, Method, register


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class WandaConfig(MethodConfig):
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 per output row, no update."""

    name: ClassVar[str] = "wanda"


def wanda_score(W: Tensor, sq_norm: Tensor) -> Tensor:
    """``|W| * sqrt(a)`` with ``a_j`` the mean squared input-channel norm."""
    return torch.abs(W) * torch.sqrt(sq_norm.reshape((1, -1)))


class WandaLayer(MaskPruner):
    input_stats = ("sq_norm",)
    label = "wanda"

    def mask(self, W, stats):
        sq_norm = stats["sq_norm"].value
        # row-local rule: scored a chunk of rows at a time (a 14336-wide layer's
        # full-size score and selection temporaries would set the block's peak)
        return by_rows(W, lambda w: row_mask(wanda_score(w, sq_norm), self.sparsity))


@register
class Wanda(Method):
    config_type = WandaConfig
    layer_type = WandaLayer
