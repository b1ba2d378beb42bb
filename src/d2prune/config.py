"""Typed, frozen, self-validating configuration.

``Sparsity`` is the parsed pattern ("0.5" -> unstructured 50%, "2:4" -> N:M).
Each method has its own frozen config dataclass (torchao style), defined
in the method's own file under :mod:`d2prune.methods` on the base
:class:`MethodConfig` here and registered by name; a ``PruneConfig`` bundles
the method config with the run settings. All of them
validate in ``__post_init__`` and serialise with :func:`to_dict`. The CLI only
parses strings into these objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import D2PruneError, UnknownOptionError


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


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Make a method config reachable by name (``PruneConfig(method="wanda")``);
    :func:`d2prune.engine.method.register` calls this for every method."""
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
        raise UnknownOptionError(f"method {name!r} takes no option(s) {', '.join(unknown)}", unknown)
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


MOE_CALIBRATIONS = ("routed", "all", "weighted")


@dataclass(frozen=True)
class PruneConfig:
    """What to do to the model (serialised into d2prune.json); the calibration
    data is passed separately (see :mod:`d2prune.io.data`).

    ``method`` is a method config or its name; ``sparsity`` a :class:`Sparsity`
    or anything :meth:`Sparsity.parse` takes. ``device=None`` picks cuda, then
    mps, then cpu. Blocks move to ``device`` one at a time, so a model larger
    than the accelerator's memory can be pruned from CPU memory.

    >>> PruneConfig(method="wanda", sparsity="2:4").sparsity.n
    2
    """

    method: MethodConfig | str = "sparsegpt"
    sparsity: Sparsity | str | float = 0.5
    device: str | None = None
    layer_error: bool = True  # compute ||WX - W'X||^2 / ||WX||^2 per layer (needs X^T X)
    share_inputs: bool = True  # one Hessian / Cholesky per distinct input (q/k/v, gate/up), not per Linear
    fast: bool = False  # several samples per block forward: faster, not bit-identical to the references
    allocation: str = "uniform"  # per-block sparsity: uniform, or owl (outlier-weighted, docs/method.md §8)
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m x the block's mean score
    owl_lambda: float = 0.08  # OWL: block sparsities within [p - owl_lambda, p + owl_lambda]
    # Which Linears of the decoder blocks are pruned (llm-compressor's targets / ignore): regular
    # expressions matched with re.search against full module names (model.layers.3.self_attn.q_proj).
    # A layer is pruned when it matches some target (no targets: every layer) and no ignore pattern.
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    # Mixture-of-experts (docs/moe.md): each expert's statistics from the calibration tokens its router
    # sends to it (routed), those weighted by their gate weights (weighted), or from every token (all);
    # in routed / weighted mode an expert sent fewer than
    # moe_min_tokens tokens gets all-token statistics (recorded per expert)
    moe_calibration: str = "routed"
    moe_min_tokens: int = 64
    # Whole experts removed from every MoE layer before it is pruned (docs/moe.md §5): a fraction
    # (0 < F < 1) of its routed experts or a count (>= 1), ranked by expert_score (reap | frequency)
    drop_experts: float | None = None
    expert_score: str = "reap"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _patterns(self.targets, "--targets"))
        object.__setattr__(self, "ignore", _patterns(self.ignore, "--ignore"))
        method = self.method
        if isinstance(method, str):
            method = method_config(method)
        if not isinstance(method, MethodConfig):
            raise D2PruneError(f"method must be a method name or a MethodConfig, not {type(method).__name__}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "sparsity", Sparsity.parse(self.sparsity))
        if self.moe_calibration not in MOE_CALIBRATIONS:
            raise D2PruneError(f"unknown --moe-calibration {self.moe_calibration!r}: use one of {', '.join(MOE_CALIBRATIONS)}")
        if not isinstance(self.moe_min_tokens, int) or self.moe_min_tokens < 0:
            raise D2PruneError(f"--moe-min-tokens {self.moe_min_tokens!r} must be an integer >= 0 (0: never fall back)")
        if self.drop_experts is not None:
            d = self.drop_experts
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0 or (d >= 1 and d != int(d)) \
                    or d != d:
                raise D2PruneError(f"--drop-experts {d!r}: give a fraction of each layer's experts (0 < F < 1) "
                                   "or a whole number of experts (>= 1)")
        if self.expert_score not in ("reap", "frequency"):
            raise D2PruneError(f"unknown --expert-score {self.expert_score!r}: use reap or frequency")
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

    def prunes(self, name: str) -> bool:
        """Whether the block Linear with full module name ``name`` is pruned
        (``targets`` / ``ignore``)."""
        if self.targets and not any(re.search(p, name) for p in self.targets):
            return False
        return not any(re.search(p, name) for p in self.ignore)

    def select(self, names: list[str]) -> list[str]:
        """The layers of ``names`` (every prunable Linear of the decoder blocks,
        full module names) that this config prunes. A pattern matching none of
        ``names`` is an error (a typo must not silently prune everything), and
        so is a selection that leaves nothing to prune."""
        example = names[0] if names else "model.layers.0.self_attn.q_proj"
        for flag, patterns in (("--targets", self.targets), ("--ignore", self.ignore)):
            for p in patterns:
                if not any(re.search(p, n) for n in names):
                    raise D2PruneError(
                        f"{flag} {p!r} matches no prunable layer (full module names inside the decoder blocks, e.g. "
                        f"{example}; the head and embeddings are never pruned): fix the pattern")
        selected = [n for n in names if self.prunes(n)]
        if not selected:
            raise D2PruneError(f"--targets {list(self.targets)} and --ignore {list(self.ignore)} leave no layer to "
                               "prune: loosen them")
        return selected


def _patterns(value: Any, flag: str) -> tuple[str, ...]:
    """A tuple of valid regular expressions from one string or a sequence of them."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise D2PruneError(f"{flag} takes regular expressions (a string or a list of strings), not {type(value).__name__}")
    for p in items:
        if not isinstance(p, str) or not p:
            raise D2PruneError(f"{flag} takes non-empty regular expressions, got {p!r}")
        try:
            re.compile(p)
        except re.error as e:
            raise D2PruneError(f"{flag} {p!r} is not a valid regular expression: {e}") from None
    return tuple(items)


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
