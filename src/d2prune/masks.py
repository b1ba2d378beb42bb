"""Mask selection shared by every method: ``True`` marks a weight to prune.

One vectorised N:M helper (no per-column loops copied per method) and the
three unstructured rules the references use:

* per output row, exactly ``int(cols * p)`` lowest (Wanda, D2-Wanda, Pruner-Zero);
* per layer, exactly ``int(numel * p)`` lowest (magnitude);
* per block, everything ``<=`` the ``int(numel * p)``-th smallest score
  (SparseGPT's adaptive mask: one weight more than ``p``, plus ties).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import Sparsity
from .errors import D2PruneError


def lowest_per_row(score: Tensor, ratio: float) -> Tensor:
    """Prune the ``int(cols * ratio)`` lowest scores of each row (stable sort,
    so equal scores are taken left to right, as Wanda's reference does)."""
    k = int(score.shape[1] * ratio)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def lowest_in_matrix(score: Tensor, ratio: float) -> Tensor:
    """Prune exactly the ``int(numel * ratio)`` lowest scores of the matrix."""
    k = int(score.numel() * ratio)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.sort(score.flatten(), stable=True)[1][:k]
        mask[idx] = True
    return mask.view_as(score)


def at_or_below_kth(score: Tensor, ratio: float) -> Tensor:
    """SparseGPT's block rule: ``score <= sorted(score)[int(numel * ratio)]``."""
    if ratio <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = torch.sort(score.flatten())[0][int(score.numel() * ratio)]
    return score <= thresh


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """In every group of ``m`` consecutive columns of each row, prune the ``n``
    lowest scores. Vectorised over all groups at once."""
    rows, cols = score.shape
    if cols % m:
        raise D2PruneError(f"N:M with M={m} needs the input width to be a multiple of M, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def row_mask(score: Tensor, sparsity: Sparsity) -> Tensor:
    """Per-row unstructured rule or N:M: what Wanda-style methods use."""
    return nm_mask(score, sparsity.n, sparsity.m) if sparsity.is_nm else lowest_per_row(score, sparsity.ratio)
