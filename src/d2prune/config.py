"""Typed, frozen, self-validating configuration.

``Sparsity`` is the parsed pattern ("0.5" -> unstructured 50%, "2:4" -> N:M).
Each method has its own frozen config dataclass (torchao style); a
``PruneConfig`` bundles the method config with the run settings. All of them
validate in ``__post_init__`` and serialise with :func:`to_dict`. The CLI only
parses strings into these objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import D2PruneError


# --------------------------------------------------------------------------- sparsity
@dataclass(frozen=True)
class Sparsity:
    """A sparsity pattern: unstructured ratio ``p`` in [0, 1), or N:M.

    N:M zeroes ``n`` weights in every group of ``m`` consecutive input weights
    of a row (2:4 keeps 2 of every 4). ``ratio`` is ``n / m`` for N:M.

    >>> Sparsity.parse("0.5").ratio, Sparsity.parse("2:4").is_nm
    (0.5, True)
    """

    ratio: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.n or self.m:
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise D2PruneError(f"bad N:M sparsity {self.n}:{self.m}: need 0 < N < M, e.g. 2:4")
            object.__setattr__(self, "ratio", self.n / self.m)
        elif not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and 0.0 <= self.ratio < 1.0):
            raise D2PruneError(f"sparsity {self.ratio!r} is out of range: give a ratio in [0, 1) such as 0.5, or N:M such as 2:4")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, value: "str | float | Sparsity") -> "Sparsity":
        """Parse ``0.5``, ``"0.5"``, ``"50%"`` or ``"2:4"``."""
        if isinstance(value, Sparsity):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(float(value))
        text = str(value).strip()
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if nm:
            return cls(0.0, int(nm.group(1)), int(nm.group(2)))
        try:
            ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise D2PruneError(f"cannot parse sparsity {value!r}: give a ratio in [0, 1) such as 0.5, or N:M such as 2:4") from None
        return cls(ratio)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


# --------------------------------------------------------------------------- methods
def option(default: Any, help: str) -> Any:
    """A method config field that is also a command-line flag (``--name``,
    ``--long-name`` for ``long_name``) and a sweep spec option
    (``method:name=value``). ``help`` is the flag's help; the default shown
    is the dataclass default, which an unset flag leaves in place."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MethodConfig:
    """Base of the per-method configs; ``name`` is the registry key. Every
    field is an option of the method (see :func:`option`). What generic code
    needs to know about a method (the properties below) it reads here, never
    from the method's name."""

    name: ClassVar[str] = ""
    label_fields: ClassVar[tuple[str, ...]] = ()  # options always written in the method's label
    uses_hessian: ClassVar[bool] = False  # the method itself accumulates X^T X (memory estimate)
    # the method's whole-model pass (Pruner-Zero's gradients) holds the model on the device plus an fp32
    # buffer per pruned weight: it cannot run on blocks streamed from disk
    whole_model_bytes_per_weight: ClassVar[int] = 0

    @property
    def needs_heldout(self) -> bool:
        """Scores candidates on held-out calibration windows (give ``heldout`` to prune)."""
        return False

    @property
    def activation_buffers(self) -> int:
        """Activation buffers ``[N, L, d]`` the run holds at once (candidates in lock-step)."""
        return 1

    @property
    def block_copies(self) -> int:
        """Pruned copies of every block the run writes to disk (candidates of a search spilled there)."""
        return 1

    @property
    def column_block(self) -> int | None:
        """The column block of an OBS-style update (N:M's M must divide it), or None."""
        return None


@dataclass(frozen=True)
class MagnitudeConfig(MethodConfig):
    """Magnitude: score |W_ij|, lowest ``p`` of each layer pruned."""

    name: ClassVar[str] = "magnitude"


@dataclass(frozen=True)
class WandaConfig(MethodConfig):
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 per output row, no update."""

    name: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTConfig(MethodConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS mask + update in column blocks."""

    name: ClassVar[str] = "sparsegpt"
    uses_hessian: ClassVar[bool] = True
    blocksize: int = option(128, "columns per block of the OBS update (N:M's M must divide it)")
    percdamp: float = option(0.01, "Hessian damping, as a fraction of mean(diag H)")

    def __post_init__(self) -> None:
        _check_sparsegpt_fields(self.blocksize, self.percdamp)

    @property
    def column_block(self) -> int:
        return self.blocksize


def _check_sparsegpt_fields(blocksize: int, percdamp: float) -> None:
    if not (isinstance(blocksize, int) and blocksize > 0):
        raise D2PruneError(f"blocksize {blocksize!r} must be a positive integer (default 128)")
    if not (isinstance(percdamp, (int, float)) and 0.0 < percdamp < 10.0):
        raise D2PruneError(f"percdamp {percdamp!r} must be in (0, 10) (default 0.01)")


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
        _check_sparsegpt_fields(self.blocksize, self.percdamp)

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


@dataclass(frozen=True)
class PrunerZeroConfig(MethodConfig):
    """Pruner-Zero (Dong et al., ICML 2024): score |W * W| * mms(G), G the
    per-weight L2 norm of the LM-loss gradients over the calibration samples."""

    name: ClassVar[str] = "pruner-zero"
    whole_model_bytes_per_weight: ClassVar[int] = 4  # the fp32 sum of squared gradients


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Make a method config reachable by name (``PruneConfig(method="wanda")``);
    :func:`d2prune.methods.base.register` calls this for every method."""
    METHOD_CONFIGS[cls.name] = cls
    return cls


def method_fields() -> dict[str, list[tuple[type[MethodConfig], dataclasses.Field]]]:
    """Every option of the registered methods: ``{field name: [(config type,
    field), ...]}`` (methods sharing an option, e.g. ``blocksize``, share the
    entry), in registration order. The CLI builds its method flags from this."""
    out: dict[str, list[tuple[type[MethodConfig], dataclasses.Field]]] = {}
    for cls in METHOD_CONFIGS.values():
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append((cls, f))
    return out


def method_config(name: str, **options: Any) -> MethodConfig:
    """Build a method config from its registry name and keyword options."""
    try:
        cls = METHOD_CONFIGS[name]
    except KeyError:
        raise D2PruneError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHOD_CONFIGS))}") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise D2PruneError(f"method {name!r} takes no option(s) {', '.join(unknown)}")
    return cls(**options)


def parse_method_spec(spec: "str | MethodConfig") -> MethodConfig:
    """``"wanda"``, ``"d2prune:frozen=k,variant=paper"`` -> a method config
    (how sweeps and the demo name method settings in one string; a set of
    frozen projections is written with ``+``: ``frozen=q+v``)."""
    if isinstance(spec, MethodConfig):
        return spec
    name, _, rest = str(spec).strip().partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise D2PruneError(f"bad method option {item!r} in {spec!r}: write key=value, e.g. d2prune:frozen=k")
        opts[key.strip()] = _coerce(value.strip())
    return method_config(name.strip(), **opts)


def method_label(cfg: MethodConfig) -> str:
    """The inverse of :func:`parse_method_spec` for non-default options."""
    default = type(cfg)()
    always = cfg.label_fields
    opts = [f"{f.name}={getattr(cfg, f.name)}".replace(",", "+") for f in dataclasses.fields(cfg)
            if f.name in always or getattr(cfg, f.name) != getattr(default, f.name)]
    return cfg.name + (":" + ",".join(opts) if opts else "")


def _coerce(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------- run
ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class PruneConfig:
    """What to do to the model (serialised into d2prune.json); the calibration
    data is passed separately (see :mod:`d2prune.data`).

    ``method`` is a method config or its name; ``sparsity`` a :class:`Sparsity`
    or anything :meth:`Sparsity.parse` takes. ``device=None`` picks cuda, then
    mps, then cpu. Blocks move to ``device`` one at a time, so a model larger
    than the accelerator's memory can be pruned from CPU memory.

    >>> PruneConfig(method="wanda", sparsity="2:4").sparsity.n
    2
    """

    method: MethodConfig | str = field(default_factory=SparseGPTConfig)
    sparsity: Sparsity | str | float = 0.5
    device: str | None = None
    layer_error: bool = True  # compute ||WX - W'X||^2 / ||WX||^2 per layer (needs X^T X)
    share_inputs: bool = True  # one Hessian / Cholesky per distinct input (q/k/v, gate/up), not per Linear
    fast: bool = False  # several samples per block forward: faster, not bit-identical to the references
    allocation: str = "uniform"  # per-block sparsity: uniform, or owl (outlier-weighted, docs/method.md §8)
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m x the block's mean score
    owl_lambda: float = 0.08  # OWL: block sparsities within [p - owl_lambda, p + owl_lambda]

    def __post_init__(self) -> None:
        method = self.method
        if isinstance(method, str):
            method = method_config(method)
        if not isinstance(method, MethodConfig):
            raise D2PruneError(f"method must be a method name or a MethodConfig, not {type(method).__name__}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "sparsity", Sparsity.parse(self.sparsity))
        if self.allocation not in ALLOCATIONS:
            raise D2PruneError(f"unknown allocation {self.allocation!r}: use one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "owl":
            if self.sparsity.is_nm:
                raise D2PruneError(f"--allocation owl gives each block its own unstructured sparsity; N:M "
                                   f"({self.sparsity}) is one fixed pattern: use an unstructured --sparsity such as 0.7")
            if not 0 < self.owl_lambda < 1:
                raise D2PruneError(f"--owl-lambda {self.owl_lambda} must be in (0, 1) (the paper uses 0.08)")
            if not self.owl_m > 0:
                raise D2PruneError(f"--owl-m {self.owl_m} must be > 0 (the paper uses 5)")


def to_dict(obj: Any) -> Any:
    """JSON-ready view of configs (method configs carry their ``name``)."""
    if isinstance(obj, Sparsity):
        return {"pattern": str(obj), "ratio": obj.ratio, "n": obj.n, "m": obj.m}
    if isinstance(obj, MethodConfig):
        return {"name": obj.name, **{f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj
