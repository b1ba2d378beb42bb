"""D²Prune's configuration: the options of eq 10 and of the frozen-projection
choice, and the numerics of its three variants (docs/method.md §3.1, §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...config import MethodConfig, option
from ...errors import D2PruneError
from ..sparsegpt import check_sparsegpt_fields


FROZEN_STRATEGIES = ("auto", "per-layer", "outlier")
D2_CANDIDATES = ("q", "k", "v")  # what the searches (auto, per-layer) choose among


@dataclass(frozen=True)
class D2Variant:
    """The numerics of a D²Prune variant (docs/method.md §3.1).

    ``index_weighted``: ``y`` and ``dx`` are the authors' running buffers
    ``buf *= n/(n+B); buf += t`` (index-weighted sums), else plain per-sample
    means; ``rescaled_dx``: D2-SparseGPT's ``dx`` is the norm of the
    Hessian-rescaled input ``sqrt(2/n) X`` (a running buffer only);
    ``wanda_dx_exponent``: ``e`` in D2-Wanda's ``r1 * y |W| dx^e``."""

    index_weighted: bool
    rescaled_dx: bool
    wanda_dx_exponent: int

    def __post_init__(self) -> None:
        if self.rescaled_dx and not self.index_weighted:
            raise ValueError("rescaled_dx is a running-buffer statistic: it needs index_weighted")


D2_VARIANTS: dict[str, D2Variant] = {
    "faithful": D2Variant(index_weighted=True, rescaled_dx=True, wanda_dx_exponent=0),  # the authors' code
    "paper": D2Variant(index_weighted=True, rescaled_dx=True, wanda_dx_exponent=1),  # Algorithm 1
    "normalized": D2Variant(index_weighted=False, rescaled_dx=False, wanda_dx_exponent=1),
}


def parse_frozen(value: str) -> str:
    """Normalise ``--frozen``: ``none``, a subset of q/k/v (``k``, ``q,v``),
    or a strategy (``auto``, ``per-layer``, ``outlier``)."""
    text = str(value).strip().lower().replace("_", "-")
    if text in ("none", "") or text in FROZEN_STRATEGIES:
        return text or "none"
    letters = {t.strip() for t in text.replace("+", ",").split(",")} if "," in text or "+" in text else set(text)
    if not letters or not letters <= {"q", "k", "v"}:
        raise D2PruneError(f"--frozen {value!r} is not valid: use q, k, v (or a set like q,v), none, auto, per-layer or outlier")
    if letters == {"q", "k", "v"}:
        raise D2PruneError("--frozen q,k,v freezes every projection: that is D2-Wanda on all of q/k/v; pick at most two")
    return ",".join(x for x in "qkv" if x in letters)


@dataclass(frozen=True)
class D2PruneConfig(MethodConfig):
    """D²Prune (AAAI 2026), docs/method.md §3-4.

    ``frozen``: the q/k/v projections pruned with D2-Wanda and NOT updated
    (every other Linear: D2-SparseGPT), or a strategy choosing them: ``auto``
    (prune under each of q/k/v, keep the lowest held-out perplexity),
    ``per-layer`` (eq 12 block by block: reconstruction error + rho * attention
    KL), ``outlier`` (appendix eqs 17-19: freeze the projection with the largest
    share of |w| > mean|W|). ``variant``: ``faithful`` = the authors' code
    numerics (20250516aaa/D2Prune HEAD), ``paper`` = dx^1 in D2-Wanda
    (Algorithm 1), ``normalized`` = plain means for every statistic.
    ``s``, ``r1``, ``r2``: the scale and the lambda_1 / lambda_2 of eq 10.
    """

    name: ClassVar[str] = "d2prune"
    label_fields: ClassVar[tuple[str, ...]] = ("frozen",)
    uses_hessian: ClassVar[bool] = True
    frozen: str = option("auto", "q/k/v projections pruned without update: k|q|v|q+v|none, or chosen per run: "
                                 "auto (held-out perplexity) | per-layer (eq 12) | outlier (eqs 17-19)")
    variant: str = option("faithful", "faithful (the authors' code) | paper (Algorithm 1) | normalized (plain means)")
    s: float = option(1500.0, "activation scale s (eqs 13-15)")
    r1: float = option(1.0, "lambda_1 of eq 10")
    r2: float = option(0.0, "lambda_2 of eq 10")
    blocksize: int = option(128, "columns per block of the OBS update (N:M's M must divide it)")
    percdamp: float = option(0.01, "Hessian damping, as a fraction of mean(diag H)")
    rho: float = option(1.0, "per-layer: weight of the attention KL in eq 12")

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen", parse_frozen(self.frozen))
        if self.variant not in D2_VARIANTS:
            raise D2PruneError(f"--variant {self.variant!r} is not valid: use {', '.join(D2_VARIANTS)}")
        if not (isinstance(self.s, (int, float)) and math.isfinite(self.s) and self.s > 0):
            raise D2PruneError(f"--s {self.s!r} must be a positive number (the paper uses 1500)")
        for k in ("r1", "r2", "rho"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise D2PruneError(f"--{k} {v!r} must be a finite number >= 0")
            object.__setattr__(self, k, float(v))
        object.__setattr__(self, "s", float(self.s))
        check_sparsegpt_fields(self.blocksize, self.percdamp)

    @property
    def numerics(self) -> D2Variant:
        return D2_VARIANTS[self.variant]

    @property
    def needs_heldout(self) -> bool:
        return self.frozen == "auto"

    @property
    def activation_buffers(self) -> int:
        return len(D2_CANDIDATES) if self.frozen == "auto" else 1

    @property
    def block_copies(self) -> int:
        return len(D2_CANDIDATES) if self.frozen == "auto" else 1

    @property
    def column_block(self) -> int:
        return self.blocksize

    @property
    def frozen_set(self) -> tuple[str, ...] | None:
        """The fixed frozen projections, or None for a search strategy."""
        if self.frozen in FROZEN_STRATEGIES:
            return None
        return () if self.frozen == "none" else tuple(self.frozen.split(","))
