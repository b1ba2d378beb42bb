"""D²Prune (AAAI 2026): dual-Taylor scores + attention-aware q/k/v update
(docs/method.md §3-4).

Two kinds of layers:

* **D2-SparseGPT** (every Linear except the frozen q/k/v): SparseGPT's OBS mask
  and update (:func:`~d2prune.methods.sparsegpt.obs_prune`) with the eq 10
  saliency ``S = W^2/U_jj^2 + r1 * y_i |W_ij| dx_j - r2 * W_ij^2 dx_j^2``.
* **D2-Wanda** (the frozen projections, no weight update):
  ``S = W^2 a_j + r1 * y_i |W_ij| dx_j^e - r2 * W^2 dx_j^2``, per row or N:M.

``y_i`` = per-output-channel activation magnitude / s, ``dx_j`` = per-input-
channel magnitude / s (dx = lambda * x, eqs 13-15). The variants
(docs/method.md §3.1) differ in three switches, tabled as
:data:`d2prune.methods.d2prune.config.D2_VARIANTS`:

* ``faithful`` - the authors' code (20250516aaa/D2Prune HEAD b22c860), quirks
  included: ``y`` and ``dx`` are running buffers updated ``buf *= n/(n+1);
  buf += t`` (index-weighted sums, not means); D2-SparseGPT's ``dx`` comes from
  the Hessian-rescaled input ``sqrt(2/n) X``; D2-Wanda's exponent ``e = 0`` (dx
  drops out of its r1 term); float operations in the code's order.
* ``paper`` - as faithful but ``e = 1`` (Algorithm 1; cquxl/D2Prune).
* ``normalized`` - plain per-sample means of ``||Y_k[:, i]||`` and
  ``||X_k[:, j]||`` (raw input) / s: independent of sample order and batch
  size; ``e = 1``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from .config import D2PruneConfig, D2Variant
from ...config import Sparsity
from ...ops.masks import row_mask
from ...errors import D2PruneError
from ...io.modeling import Rows, find_prunable, qkv_parts, role_frozen, weight_matrix
from ...ops.stats import Accumulator, StatKey, as_columns, register_accumulator
from ...engine.method import LayerPruner, MaskPruner, Method, register
from ..sparsegpt import hessian_factor, obs_prune

# --------------------------------------------------------------------------- statistics


def _sum_dtype(device) -> torch.dtype:
    """float64 sums for the order-independent means (MPS has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def iw_batch_update(buf: Tensor, n: int, t: Tensor) -> Tensor:
    """The authors' running buffer after ``B`` one-sample steps
    ``buf <- buf * m / (m + 1) + t_k`` (``m`` = samples so far), in one go:
    unrolled, ``buf * n / (n + B) + sum_k t_k (n + k) / (n + B)``. ``t``:
    ``[B, d]``, one row per sample in order. Equal to the sequential updates
    up to float rounding, so ``--fast`` batches keep the faithful statistic
    (docs/scale.md §5) instead of one norm over the whole batch."""
    b = t.shape[0]
    w = (n + torch.arange(1, b + 1, device=t.device, dtype=torch.float32)) / (n + b)
    return buf * (n / (n + b)) + (w[:, None] * t.float()).sum(0)


class _InputNormIW(Accumulator):
    """faithful ``dx``: the authors' running buffer ``buf *= n/(n+B); buf += ||X[:, j]|| / s``
    (an index-weighted sum, not a mean), float operations in their order."""

    rescaled = False  # D2-SparseGPT takes the norm of the Hessian-rescaled input sqrt(2/n) X
    merge_fields = {"value": "mean"}  # not a mean: merged as one, close to one process's (docs/scale.md §4)

    def __init__(self, d_in, device, s):
        super().__init__(d_in, device)
        self.s = s
        self.value = torch.zeros(d_in, dtype=torch.float32, device=device)

    def update(self, x: Tensor) -> None:
        if x.dim() == 3 and x.shape[0] > 1:  # --fast: a batch, updated as that many one-sample steps would be
            per = torch.linalg.vector_norm(x.float(), dim=1)  # [B, d_in]: each sample's norm over its tokens
            counts = self.n + torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float32)
            if self.rescaled:
                per = per * torch.sqrt(2 / counts)[:, None]
            self.value = iw_batch_update(self.value, self.n, per / self.s)
            self.n += x.shape[0]
            return
        inp, b = as_columns(x)  # one sample per call: the reference's operations, in its order
        self.value *= self.n / (self.n + b)
        self.n += b
        inp = math.sqrt(2 / self.n) * inp.float() if self.rescaled else inp.type(torch.float32)
        self.value += torch.norm(inp, p=2, dim=1) / self.s


@register_accumulator
class ScaledInputNormIW(_InputNormIW):
    """faithful D2-SparseGPT ``dx`` (from ``sqrt(2/n) X``, as the reference computes it)."""

    key = "d2_dx_scaled_iw"
    rescaled = True


@register_accumulator
class InputNormIW(_InputNormIW):
    """faithful D2-Wanda ``dx`` (from the raw fp32 input)."""

    key = "d2_dx_raw_iw"


@register_accumulator
class InputNormMean(Accumulator):
    """normalized ``dx``: plain mean over samples of ``||X_k[:, j]|| / s``."""

    key = "d2_dx_mean"
    merge_fields = {"total": "sum"}

    def __init__(self, d_in, device, s):
        super().__init__(d_in, device)
        self.s = s
        self.total = torch.zeros(d_in, dtype=_sum_dtype(device), device=device)

    def update(self, x: Tensor) -> None:
        x = x if x.dim() == 3 else x.unsqueeze(0)
        self.total += torch.linalg.vector_norm(x.to(self.total.dtype), dim=1).sum(0)  # one norm per sample
        self.n += x.shape[0]

    @property
    def value(self) -> Tensor:
        return (self.total / max(self.n, 1) / self.s).float()


class OutputNorm:
    """``y_i``: per-output-channel norm of the layer's dense output / s,
    index-weighted (faithful/paper) or a plain per-sample mean (normalized)."""

    def __init__(self, s: float, index_weighted: bool):
        self.s, self.iw, self.n = s, index_weighted, 0
        self.buf: Tensor | None = None
        self.merge_fields = {"buf": "mean" if index_weighted else "sum"}

    def update(self, out: Tensor) -> None:
        out = out if out.dim() == 3 else out.unsqueeze(0)
        b = out.shape[0]
        if self.iw and b > 1:  # --fast: as b one-sample updates would leave it
            t = torch.linalg.vector_norm(out.float(), dim=1) / self.s  # [b, d_out]
            self.buf = iw_batch_update(torch.zeros_like(t[0]) if self.buf is None else self.buf, self.n, t)
            self.n += b
        elif self.iw:
            t = torch.norm(out.reshape(-1, out.shape[-1]).float(), p=2, dim=0) / self.s
            if self.buf is None:
                self.buf = torch.zeros_like(t)
            self.buf *= self.n / (self.n + b)
            self.n += b
            self.buf += t
        else:
            t = torch.linalg.vector_norm(out.to(_sum_dtype(out.device)), dim=1).sum(0)
            self.buf = t if self.buf is None else self.buf + t
            self.n += b

    @property
    def value(self) -> Tensor:
        if self.buf is None:
            raise RuntimeError("no calibration output was observed")
        return self.buf if self.iw else (self.buf / self.n / self.s).float()


# --------------------------------------------------------------------------- scores (eq 10)
def d2_sparsegpt_score(W1: Tensor, d1: Tensor, y: Tensor, dx: Tensor, r1: float, r2: float) -> Tensor:
    """``W^2 / U_jj^2 + r1 * y |W| dx - r2 * W^2 dx^2`` on a column block
    (``dx`` already sliced to the block). Operation order = the authors' code."""
    tmp = W1 ** 2 / (d1.reshape((1, -1))) ** 2
    tmp += r1 * ((y.reshape((-1, 1)) ** 1) * torch.abs(W1) * (dx.reshape((1, -1)) ** 1))
    tmp += -r2 * (W1 ** 2) * (dx.reshape((1, -1)) ** 2)
    return tmp


def d2_wanda_score(W: Tensor, a: Tensor, y: Tensor, dx: Tensor, r1: float, r2: float, e: int) -> Tensor:
    """``W^2 a + r1 * y |W| dx^e - r2 * W^2 dx^2`` (``a`` = Wanda's mean squared
    input norm: W^2 a is Wanda's score squared). Operation order = the authors' code."""
    metric = (torch.abs(W) ** 2) * (a.reshape((1, -1)) ** 1)
    metric += r1 * (y.reshape((-1, 1)) ** 1) * torch.abs(W) * (dx.reshape((1, -1)) ** e)
    metric += -r2 * (torch.abs(W) ** 2) * (dx.reshape((1, -1)) ** 2)
    return metric


def outlier_count(W: Tensor) -> int:
    """How many weights have ``|w| > mean |W|``: appendix eq 18's numerator (the
    ratio is this over the weight count), counted so that a projection made of
    several pieces (latent attention's k: rows of two Linears) gets one ratio,
    each piece against its own mean."""
    a = W.abs().float()
    return int((a > a.mean()).sum())


def _at(rows: Rows, device) -> Rows:
    """Row indices on the tensor's device (a slice as it is)."""
    return rows if isinstance(rows, slice) else rows.to(device)


# --------------------------------------------------------------------------- per-layer wrappers
def dx_key(variant: D2Variant, updated: bool, s: float) -> StatKey:
    """The ``dx`` accumulator a layer reads: plain mean, or the authors' running
    buffer of the raw input (D2-Wanda) or of the rescaled input (D2-SparseGPT)."""
    if not variant.index_weighted:
        return (InputNormMean.key, s)
    return (ScaledInputNormIW.key if updated and variant.rescaled_dx else InputNormIW.key, s)


class _D2Layer(LayerPruner):
    """Shared by both D² layer kinds: the output statistic ``y`` (of the
    layer's own output rows, ``rows`` for part of a fused q/k/v)."""

    wants_output = True
    updated: bool = True

    def __init__(self, name, sparsity: Sparsity, cfg: D2PruneConfig, rows: Rows | None = None):
        super().__init__(name, sparsity)
        self.cfg, self.rows, self.variant = cfg, rows, cfg.numerics
        self.dx_key = dx_key(self.variant, self.updated, cfg.s)
        self.y = OutputNorm(cfg.s, self.variant.index_weighted)

    def observe_output(self, y):
        self.y.update(y if self.rows is None else y[..., _at(self.rows, y.device)])

    def observers(self):
        return [self.y]


class D2SparseGPTLayer(_D2Layer):
    label = "d2-sparsegpt"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_stats = ("hessian", self.dx_key)

    def prune(self, W, stats):
        U, dead = hessian_factor(stats, self.cfg.percdamp, self.name)
        y, dx, r1, r2 = self.y.value, stats[self.dx_key].value, self.cfg.r1, self.cfg.r2

        def score(W_sub, d_sub, c0, c1):
            return d2_sparsegpt_score(W_sub, d_sub, y, dx[c0:c1], r1, r2)

        return obs_prune(W, U, dead, self.sparsity, self.cfg.blocksize, score, fast=getattr(stats, "fast", False))


class D2WandaLayer(_D2Layer, MaskPruner):
    label = "d2-wanda"
    updated = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_stats = ("sq_norm", self.dx_key)
        self.e = self.variant.wanda_dx_exponent

    def mask(self, W, stats):
        score = d2_wanda_score(W, stats["sq_norm"].value, self.y.value, stats[self.dx_key].value,
                               self.cfg.r1, self.cfg.r2, self.e)
        return row_mask(score, self.sparsity)


class RowSplitLayer(LayerPruner):
    """A fused q/k/v Linear pruned as its separate projections (row slices, or
    the row indices of a per-head interleaved layout): exact, since both
    SparseGPT's update and Wanda's ranking act per row."""

    wants_output = True

    def __init__(self, name, sparsity, parts: list[tuple[Rows, LayerPruner]]):
        super().__init__(name, sparsity)
        self.parts = parts
        self.input_stats = tuple(dict.fromkeys(k for _, p in parts for k in p.input_stats))
        self.label = "+".join(p.label for _, p in parts)

    def observe_output(self, y):
        for _, p in self.parts:
            p.observe_output(y)

    def observers(self):
        return [o for _, p in self.parts for o in p.observers()]

    def prune(self, W, stats):
        mask = torch.zeros_like(W, dtype=torch.bool)
        for rows, p in self.parts:
            rows = _at(rows, W.device)
            W[rows], mask[rows] = p.prune(W[rows].clone(), stats)
        return W, mask


@register
class D2Prune(Method):
    """D²Prune with a fixed frozen set or the ``outlier`` rule; ``auto`` and
    ``per-layer`` are searches over this method, registered for its config
    (:mod:`d2prune.methods.d2prune.search`)."""

    config_type = D2PruneConfig

    def __init__(self, config: D2PruneConfig, sparsity: Sparsity):
        super().__init__(config, sparsity)
        self.model_config = None
        self.block_frozen: dict[int, tuple[str, ...]] = {}
        self.outlier_ratios: dict[int, dict[str, float]] = {}

    def prepare(self, model, calibration, device):
        self.model_config = model.config

    def with_frozen(self, frozen: str) -> "D2Prune":
        m = D2Prune(replace(self.config, frozen=frozen), self.sparsity)
        m.model_config = self.model_config
        m.block_sparsity = self.block_sparsity
        return m

    def begin_block(self, index: int, block: nn.Module, layers: dict[str, nn.Module]) -> None:
        fixed = self.config.frozen_set
        if fixed == ():
            self.block_frozen[index] = fixed
            return
        # the roles are the block's, whichever of its Linears --ignore / --targets keep dense
        every = find_prunable(block)
        parts = {name: qkv_parts(name, mod, self.model_config) or [] for name, mod in every.items()}
        roles = {r for ps in parts.values() for role, _ in ps for r in role}
        wanted = set(fixed) if fixed is not None else {"q", "k", "v"}
        if not wanted <= roles:
            missing = ", ".join(sorted(wanted - roles))
            raise D2PruneError(f"block {index} has no recognisable {missing} projection (Linears: {', '.join(every)}): "
                               "d2prune cannot tell which layer to freeze; use --frozen none")
        if fixed is not None:
            self.block_frozen[index] = fixed
            return
        # outlier rule (appendix eqs 17-19): freeze argmax_j r_j of the dense q/k/v (of those pruned); a
        # projection in several pieces (latent attention) counts each piece's outliers against its own mean;
        # rows shared by k and v are no one projection's and are left out
        counts: dict[str, list[int]] = {}
        for name, ps in parts.items():
            for role, rows in ps if name in layers else ():
                if len(role) == 1:
                    W = weight_matrix(layers[name])[_at(rows, layers[name].weight.device)]
                    c = counts.setdefault(role, [0, 0])
                    c[0], c[1] = c[0] + outlier_count(W), c[1] + W.numel()
        ratios = {role: n / total for role, (n, total) in counts.items()}
        self.outlier_ratios[index] = ratios
        self.block_frozen[index] = (max(ratios, key=ratios.get),) if ratios else ()

    def layer(self, name, module, block_index):
        frozen = self.block_frozen.get(block_index, self.config.frozen_set or ())
        cfg, sp = self.config, self.sparsity_at(block_index)
        parts = qkv_parts(name, module, self.model_config) if frozen else None
        if not parts or not any(role_frozen(role, frozen) for role, _ in parts):
            return D2SparseGPTLayer(name, sp, cfg)
        if all(role_frozen(role, frozen) for role, _ in parts):
            return D2WandaLayer(name, sp, cfg)
        return RowSplitLayer(name, sp, [
            (rows, (D2WandaLayer if role_frozen(role, frozen) else D2SparseGPTLayer)(f"{name}[{role}]", sp, cfg, rows))
            for role, rows in parts
        ])

    def state(self):
        return {"block_frozen": {str(k): list(v) for k, v in self.block_frozen.items()},
                "outlier_ratios": {str(k): v for k, v in self.outlier_ratios.items()}}

    def load_state(self, state):
        self.block_frozen.update({int(k): tuple(v) for k, v in state.get("block_frozen", {}).items()})
        self.outlier_ratios.update({int(k): v for k, v in state.get("outlier_ratios", {}).items()})

    def summary(self):
        out = {"variant": self.config.variant, "frozen": self.config.frozen,
               "frozen_per_block": {str(k): list(v) for k, v in sorted(self.block_frozen.items())}}
        if self.outlier_ratios:
            out["outlier_ratios"] = {str(k): v for k, v in sorted(self.outlier_ratios.items())}
        return out
