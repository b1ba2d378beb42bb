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

from ..config import Sparsity
from ..errors import D2PruneError


def first_k_stable(score: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` lowest entries of each row, ties taken left to right:
    exactly the first ``k`` of a stable sort (what Wanda's reference prunes),
    found by selection (``kthvalue``, O(n)) instead of sorting."""
    cols = score.shape[1]
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(score, dtype=torch.bool)
    if score.device.type == "mps":  # no kthvalue there: the plain stable sort
        mask = torch.zeros_like(score, dtype=torch.bool)
        return mask.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], True)
    kth = torch.kthvalue(score, k, dim=1, keepdim=True).values
    mask = score < kth
    tied = score == kth
    need = k - mask.sum(1, keepdim=True)  # how many of the ties the stable sort reaches (>= 1)
    ntied = tied.sum(1, keepdim=True)
    mask |= tied & (ntied <= need)  # the usual row: every tie is reached
    # Rows with more ties than the sort reaches take the leftmost ``need``. Only
    # those rows pay for the running count (int64: 8 bytes per score).
    rows = (ntied > need).squeeze(1).nonzero().squeeze(1)
    if rows.numel():
        t = tied[rows]
        mask[rows] |= t & (t.cumsum(1) <= need[rows])
    return mask


def lowest_per_row(score: Tensor, ratio: float) -> Tensor:
    """Prune the ``int(cols * ratio)`` lowest scores of each row (equal scores
    taken left to right, as Wanda's reference stable sort does)."""
    return first_k_stable(score, int(score.shape[1] * ratio))


def lowest_in_matrix(score: Tensor, ratio: float) -> Tensor:
    """Prune exactly the ``int(numel * ratio)`` lowest scores of the matrix."""
    return first_k_stable(score.reshape(1, -1), int(score.numel() * ratio)).view_as(score)


def at_or_below_kth(score: Tensor, ratio: float) -> Tensor:
    """SparseGPT's block rule: ``score <= sorted(score)[int(numel * ratio)]``.

    The threshold is found with a selection (``kthvalue``, O(n)) instead of the
    reference's full sort: the same element, so the same mask, faster."""
    if ratio <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score.flatten()
    k = int(flat.numel() * ratio)
    if flat.device.type == "mps":  # kthvalue is not implemented there
        thresh = torch.sort(flat)[0][k]
    else:
        thresh = torch.kthvalue(flat, k + 1).values
    return score <= thresh


# Scores taken at once by :func:`by_rows`: bounds a wide layer's temporaries
# (score, selection, comparisons) to a few times 16M elements instead of
# several full-size copies (a 14336 x 4096 MLP matrix is 59M weights).
ROW_CHUNK_ELEMENTS = 1 << 24


def by_rows(W: Tensor, rule) -> Tensor:
    """``rule(W)`` for a row-local mask rule (each row's mask depends only on
    that row: per-row selection, N:M), evaluated a chunk of rows at a time into
    one boolean mask. Identical to ``rule(W)``; peak memory ~ one chunk."""
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, W.shape[1]))
    if rows >= W.shape[0]:
        return rule(W)
    mask = torch.empty(W.shape, dtype=torch.bool, device=W.device)
    for i in range(0, W.shape[0], rows):
        mask[i:i + rows] = rule(W[i:i + rows])
    return mask


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
