"""SparseGPT (Frantar & Alistarh, 2023), docs/method.md §2.

Pure math in two steps, so Linears that share an input share step 1:

1. :func:`inverse_hessian_factor`: dead inputs (``H_jj = 0``) get ``H_jj = 1``,
   damping ``percdamp * mean(diag H)``, then ``U = chol(H^-1)^T`` (upper), the
   factor whose rows drive the OBS updates. A singular ``H`` is retried with 10x
   the damping (with a warning) instead of crashing.
2. :func:`obs_prune`: columns in blocks of ``blocksize``; inside a block the
   mask is chosen from ``S = W^2 / U_jj^2`` (adaptive mask, the reference's
   ``<=`` threshold rule) or, for N:M, at every M-th column from the group's
   scores on the already-updated weights; each pruned column's error
   ``(w - q) / U_ii`` is propagated to the remaining columns of the block
   (``W[:, i:] -= err * U[i, i:]``), then to the later blocks in one matmul.

``score_fn`` lets D2-SparseGPT add its activation terms to ``S`` (eq 10)
without copying this loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from ..config import MethodConfig, Sparsity, option
from ..errors import D2PruneError
from ..ops.masks import at_or_below_kth
from ..engine.method import LayerPruner, Method, register

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SparseGPTConfig(MethodConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS mask + update in column blocks."""

    name: ClassVar[str] = "sparsegpt"
    uses_hessian: ClassVar[bool] = True
    blocksize: int = option(128, "columns per block of the OBS update (N:M's M must divide it)")
    percdamp: float = option(0.01, "Hessian damping, as a fraction of mean(diag H)")

    def __post_init__(self) -> None:
        check_sparsegpt_fields(self.blocksize, self.percdamp)

    @property
    def column_block(self) -> int:
        return self.blocksize


def check_sparsegpt_fields(blocksize: int, percdamp: float) -> None:
    if not (isinstance(blocksize, int) and blocksize > 0):
        raise D2PruneError(f"blocksize {blocksize!r} must be a positive integer (default 128)")
    if not (isinstance(percdamp, (int, float)) and 0.0 < percdamp < 10.0):
        raise D2PruneError(f"percdamp {percdamp!r} must be in (0, 10) (default 0.01)")

# score_fn(W_sub, hinv_diag_sub, col_start, col_end) -> scores for W_sub; the
# column range is absolute so per-input-channel statistics can be sliced.
ScoreFn = Callable[[Tensor, Tensor, int, int], Tensor]

MAX_DAMP_RETRIES = 6


def obs_score(W_sub: Tensor, d_sub: Tensor, c0: int, c1: int) -> Tensor:
    """SparseGPT's saliency ``w^2 / [U]_jj^2`` (the OBS error of pruning w)."""
    return W_sub ** 2 / (d_sub.reshape((1, -1))) ** 2


def _factor_exact(H: Tensor) -> Tensor | None:
    """The reference's ``chol(cholesky_inverse(chol(H)))^T``: 2 Cholesky factorisations and an inverse."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True, out=(Hinv, torch.empty((), dtype=torch.int32,
                                                                                device=H.device)))
    return U if int(info) == 0 else None


def _factor_fast(H: Tensor) -> Tensor | None:
    """The same ``U`` (``H^-1 = U^T U``, upper) from ONE Cholesky factorisation
    and one triangular inverse (about 2.5x fewer flops; --fast): with ``P``
    the order-reversing permutation, ``P H P = L L^T`` gives
    ``H^-1 = (P L^-1 P)^T (P L^-1 P)`` and ``P L^-1 P`` is upper triangular
    with a positive diagonal, so by uniqueness it is the Cholesky factor."""
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info):
        return None
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False, out=eye)
    del L
    return Linv.flip(0, 1)


def inverse_hessian_factor(H: Tensor, percdamp: float, name: str = "layer", fast: bool = False) -> tuple[Tensor, Tensor]:
    """``(U, dead)``: upper Cholesky factor of the damped ``H^-1`` and the
    dead-input mask. ``H`` is used in place (its diagonal is damped, then put
    back exactly): a 28672-wide input's Hessian is 3.3 GB in fp32, so no
    full-size copy of it is made; at most two more matrices of its size exist
    at once (the factor and the inverse, which becomes ``U`` in place)."""
    diag = torch.arange(H.shape[0], device=H.device)
    saved = torch.diag(H).clone()
    dead = saved == 0
    damp = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        try:
            H[dead, dead] = 1
            H[diag, diag] += damp * torch.mean(torch.diag(H))
            U = (_factor_fast if fast else _factor_exact)(H)
        finally:
            H[diag, diag] = saved
        if U is not None and bool(torch.isfinite(U).all()):
            return U, dead
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite with damping %.3g; retrying with %.3g", name, damp, damp * 10)
            damp *= 10
    raise D2PruneError(
        f"the Hessian of {name} stays singular even with damping {damp:g}: its calibration inputs are degenerate; "
        "use more or different calibration data (--nsamples, --calib-file)"
    )


FAST_INNER = 16  # --fast: columns updated one by one before a matmul updates the rest of the block


def obs_prune(W: Tensor, U: Tensor, dead: Tensor, sparsity: Sparsity, blocksize: int = 128,
              score_fn: Optional[ScoreFn] = None, fast: bool = False) -> tuple[Tensor, Tensor]:
    """Prune ``W`` (fp32 ``[d_out, d_in]``, modified in place) with OBS updates.

    Returns ``(W, mask)``. The float operations follow IST-DASLab/sparsegpt
    ``fasterprune`` one to one, so masks and weights match the reference.
    ``fast``: inside a block, each column's update reaches only the columns of
    its group of :data:`FAST_INNER`; the rest of the block is updated by one
    matmul per group (SparseGPT's lazy batch update, §3.3, applied once more
    inside the block): the same mathematics, a quarter of the per-column
    memory traffic, other float rounding.
    """
    score_fn = score_fn or obs_score
    rows, cols = W.shape
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    n, m = sparsity.n, sparsity.m
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # The block is held transposed ([count, rows], contiguous) so that the
        # per-column work below touches contiguous rows; values and float
        # operations are those of the reference, only the memory layout differs.
        W1T = W[:, i1:i2].t().contiguous()
        Err1T = torch.zeros_like(W1T)
        buf = torch.empty_like(W1T)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        if sparsity.is_nm:
            mask1T = torch.zeros_like(W1T, dtype=torch.bool)
        else:
            # Adaptive mask: chosen once per block from the block's current
            # (already error-compensated) weights.
            mask1T = at_or_below_kth(score_fn(W1T.t(), d1, i1, i2), sparsity.ratio).t()
        inner = FAST_INNER if fast and (not sparsity.is_nm or FAST_INNER % m == 0) else count
        for i in range(count):
            if sparsity.is_nm and i % m == 0:
                s = score_fn(W1T[i:i + m].t(), d1[i:i + m], i1 + i, i1 + i + m)
                mask1T.t().scatter_(1, i + torch.topk(s, n, dim=1, largest=False)[1], True)
            # err = (w - q) / d with q = w pruned: w where pruned, +0 elsewhere (bit-identical to
            # the reference's subtraction), written straight into Err1's column.
            err1 = Err1T[i]
            torch.where(mask1T[i], W1T[i], zero, out=err1)
            err1.div_(U1[i, i])
            # OBS update of the not-yet-processed columns: W1[:, i:] -= err1 (x) U1[i, i:]
            # (product then subtraction, two roundings, exactly as the reference's matmul)
            end = min(count, (i // inner + 1) * inner)
            upd = buf[: end - i]
            torch.outer(U1[i, i:end], err1, out=upd)
            W1T[i:end].sub_(upd)
            if end == i + 1 and end < count:  # --fast: the group's errors reach the rest of the block at once
                g0 = end - inner
                W1T[end:].sub_(U1[g0:end, end:].t().matmul(Err1T[g0:end]))
        # q: every processed column keeps w where not pruned (its own update subtracted +0)
        W[:, i1:i2] = W1T.masked_fill(mask1T, 0).t()
        mask[:, i1:i2] = mask1T.t()
        # Lazy batch update of all later blocks (SparseGPT §3.3); Err1 contiguous as in the reference.
        W[:, i2:] -= Err1T.t().contiguous().matmul(U[i1:i2, i2:])
    return W, mask


def hessian_factor(stats, percdamp: float, name: str) -> tuple[Tensor, Tensor]:
    """The shared ``(U, dead)`` of an input, computed once per input group."""
    H = stats["hessian"].H
    if not bool(torch.isfinite(H).all()):
        raise D2PruneError(
            f"NaN/Inf in the calibration Hessian of {name}: the activations overflow; "
            "load the model in float32 (--dtype float32) or check its weights"
        )
    fast = getattr(stats, "fast", False)
    return stats.cached(("inverse_hessian_factor", percdamp),
                        lambda: inverse_hessian_factor(H, percdamp, name, fast=fast))


class SparseGPTLayer(LayerPruner):
    input_stats = ("hessian",)
    label = "sparsegpt"

    def prune(self, W, stats):
        U, dead = hessian_factor(stats, self.config.percdamp, self.name)
        return obs_prune(W, U, dead, self.sparsity, self.config.blocksize, fast=getattr(stats, "fast", False))


@register
class SparseGPT(Method):
    config_type = SparseGPTConfig
    layer_type = SparseGPTLayer
