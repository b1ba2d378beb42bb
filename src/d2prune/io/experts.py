"""Mixture-of-experts layers as matrices the engine can prune (docs/moe.md).

transformers 5 stores a MoE layer's routed experts as fused 3-D parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, or transposed, with
gate and up concatenated or interleaved, with or without biases) inside one
experts module, and every such class declares its layout through the
``@use_experts_implementation`` decorator (``is_transposed``,
``is_concatenated``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``).
One mechanism covers them all, read from those flags, never from a class or
model name:

* :func:`install` gives every expert of such a module three (two without a
  gate) :class:`ExpertLinear` children - ``experts.3.gate_proj``,
  ``experts.3.up_proj``, ``experts.3.down_proj``, the names of the per-expert
  checkpoints - whose ``weight`` is a *view* of the expert's slice of the
  fused parameter (no copy: writing a pruned matrix into the view writes the
  3-D parameter, and the state dict keeps its own keys);
* the experts module's forward is replaced by :func:`routed_forward`, an
  implementation of transformers' experts interface (``hidden_states``,
  ``top_k_index``, ``top_k_weights``) that calls each expert's views on the
  tokens its router sent to it. The engine's forward hooks therefore see each
  expert's own routed tokens, so every method's statistics, per-layer wrapper
  and report work on experts unchanged.

The statistics of an expert (``--moe-calibration``): ``routed`` (default) are
the inputs its projections receive, unscaled by the router's gate weight (the
weight multiplies the expert's *output*; the layer-wise objective
``||WX - W'X||`` is over the layer's own inputs, as for a dense MLP);
``all`` sends every token through every expert for statistics only, the
block's output staying the routed one; ``weighted`` takes the routed tokens
with each token's rows scaled by its gate weight (statistics weighted by g^2). An expert routed fewer than
``min_tokens`` calibration tokens gets all-token statistics (recorded per
expert with its routed token count).

A block too large for host RAM has its experts read in groups
(:mod:`d2prune.engine.expert_groups`, docs/moe.md §4): the fused parameters
then hold only experts ``offset ... offset + g - 1``, ``active`` says which
experts :func:`routed_forward` computes, ``out`` is the running sum it adds
them to, and ``intercept`` replaces the experts' computation altogether (to
record their inputs, or to return their output computed group by group).
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import D2PruneError

# the attributes transformers' @use_experts_implementation sets on an experts module
LAYOUT_FLAGS = ("has_gate", "is_transposed", "is_concatenated", "has_bias")
STORAGE_DTYPE = "_d2prune_storage_dtype"  # == modeling.STORAGE_DTYPE (defined here: modeling imports this module)


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its weights (from its declared flags).

    ``up``: the first projection's parameter (``gate_up_proj``, or ``up_proj``
    without a gate), ``[E, out, in]`` or transposed ``[E, in, out]``;
    ``down``: ``down_proj`` laid out the same way."""

    num_experts: int
    up: str
    down: str
    gated: bool
    transposed: bool
    concatenated: bool
    bias: bool
    post_norm: bool

    def matrix_shape(self, p: Tensor) -> tuple[int, int]:
        """``[d_out, d_in]`` of one expert's slice of parameter ``p``."""
        a, b = p.shape[1], p.shape[2]
        return (b, a) if self.transposed else (a, b)


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers experts module, or None if ``module`` is
    not one (no declared layout flags) or declares one that it does not follow
    (:func:`layout_problem`): then its tensors stay ``unknown`` and the run is
    refused (docs/moe.md §1), rather than computed by a forward that would
    ignore some of them or not be called as the class's own is."""
    return _read_layout(module)[0]


def layout_problem(module: nn.Module) -> str | None:
    """Why ``module`` declares the experts layout flags but d2prune cannot read
    it (None if it can, or declares none)."""
    return _read_layout(module)[1]


def _read_layout(module: nn.Module) -> tuple[ExpertsLayout | None, str | None]:
    if not all(hasattr(module, f) for f in LAYOUT_FLAGS):
        return None, None
    gated, bias = bool(module.has_gate), bool(module.has_bias)
    post_norm = bool(getattr(module, "has_post_expert_norm", False))
    up = "gate_up_proj" if gated else "up_proj"
    names = [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if bias else [])
    params = dict(module.named_parameters(recurse=False))
    missing = [n for n in names if n not in params]
    if missing:
        return None, f"its flags (has_gate={gated}, has_bias={bias}) name {', '.join(missing)}, which it does not hold"
    pu, pd = params[up], params["down_proj"]
    if pu.dim() != 3 or pd.dim() != 3 or pu.shape[0] != pd.shape[0]:
        return None, (f"{up} {list(pu.shape)} and down_proj {list(pd.shape)} are not [experts, out, in] tables "
                      "of as many experts")
    layout = ExpertsLayout(int(pu.shape[0]), up, "down_proj", gated, bool(module.is_transposed),
                           bool(module.is_concatenated), bias, post_norm)
    (u_out, u_in), (d_out, d_in) = layout.matrix_shape(pu), layout.matrix_shape(pd)
    if d_out != u_in or d_in * (2 if gated else 1) != u_out:  # down maps the (gated) up output back to the input
        return None, (f"{up} {list(pu.shape)} and down_proj {list(pd.shape)} do not chain as "
                      f"{'transposed' if layout.transposed else '[out, in]'} expert matrices")
    if bias and (tuple(params[names[2]].shape) != (layout.num_experts, u_out)
                 or tuple(params[names[3]].shape) != (layout.num_experts, d_out)):
        return None, f"its biases {[list(params[n].shape) for n in names[2:]]} are not [experts, out] tables"
    for needs in ([] if gated else ["act_fn"]) + (["post_expert_norm"] if post_norm else []):
        if not hasattr(module, needs):  # what the per-expert forward calls besides the matrices
            return None, f"it has no {needs}"
    # every tensor it holds must be one the per-expert forward computes with
    norm = module.post_expert_norm if post_norm else nn.Module()
    known = set(names) | {f"post_expert_norm.{n}" for n, _ in (*norm.named_parameters(), *norm.named_buffers())}
    extra = [n for n, _ in (*module.named_parameters(), *module.named_buffers()) if n not in known]
    if extra:
        return None, f"it holds {', '.join(extra)} besides the expert matrices its flags describe"
    # ... and it must be called as the experts interface (the class's own forward, under the decorator's)
    own = inspect.unwrap(type(module).forward)
    try:
        inspect.signature(own).bind(module, None, None, None)
    except (TypeError, ValueError):
        return None, (f"its forward ({own.__qualname__}) is not called as transformers' experts interface "
                      "(hidden_states, top_k_index, top_k_weights)")
    return layout, None


class ExpertLinear(nn.Module):
    """One expert's projection as a Linear: ``weight`` is the ``[d_out, d_in]``
    view of its slice of the experts module's fused parameter (``rows`` picks
    gate or up out of a fused gate-up projection), ``bias`` likewise.

    Holds no parameter of its own, so the model's state dict is unchanged; the
    fused parameter is looked up on every access, so a streamed block whose
    parameters are replaced when it is loaded is seen as it is now."""

    def __init__(self, owner: nn.Module, param: str, expert: int, transposed: bool, rows: slice | None,
                 bias: str | None, role: str):
        super().__init__()
        self._owner = (owner,)  # a tuple: not registered as a child module
        self.param, self.expert, self.transposed, self.rows, self.bias_param = param, expert, transposed, rows, bias
        self.role = role

    @property
    def owner(self) -> nn.Module:
        return self._owner[0]

    def select(self, t: Tensor, offset: int = 0) -> Tensor:
        """This expert's ``[d_out, d_in]`` matrix out of a tensor laid out like
        the fused parameter (the weight itself, its gradient, a mask), whose
        first expert is ``offset``."""
        m = t[self.expert - offset]
        if self.transposed:
            m = m.t()
        return m if self.rows is None else m[self.rows]

    @property
    def source(self) -> nn.Parameter:
        return getattr(self.owner, self.param)

    @property
    def weight(self) -> Tensor:
        p = self.source
        w = self.select(p, self.owner._d2prune_experts.offset)  # a group of experts: its first one is at 0
        storage = getattr(p, STORAGE_DTYPE, None)
        if storage is not None:  # the dtype the block is saved in (a bf16 block computing in fp32)
            setattr(w, STORAGE_DTYPE, storage)
        return w

    @property
    def bias(self) -> Tensor | None:
        if self.bias_param is None:
            return None
        b = getattr(self.owner, self.bias_param)[self.expert]
        return b if self.rows is None else b[self.rows]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def tokens(self) -> int | None:
        """Calibration tokens the router sent to this expert in the last calibration pass."""
        return self.owner._d2prune_experts.tokens(self.expert)

    @property
    def statistics(self) -> str | None:
        """Where this expert's statistics came from in the last calibration pass."""
        return self.owner._d2prune_experts.statistics(self.expert)

    @property
    def stat_scale(self) -> Tensor | None:
        """Per input row, the factor its statistics are scaled by (the tokens' gate weights under
        ``--moe-calibration weighted``), else None."""
        return self.owner._d2prune_experts.scale.get(self.expert)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"expert={self.expert}, {self.role}, {tuple(self.weight.shape)}"


class ExpertMLP(nn.Module):
    """One expert's projections (the children the engine prunes)."""

    def __init__(self, owner: nn.Module, layout: ExpertsLayout, e: int):
        super().__init__()
        up = getattr(owner, layout.up)
        bias_up = f"{layout.up}_bias" if layout.bias else None
        bias_down = f"{layout.down}_bias" if layout.bias else None
        if layout.gated:
            d_out = layout.matrix_shape(up)[0]
            if d_out % 2:
                raise D2PruneError(f"{type(owner).__name__}.{layout.up} has an odd output width {d_out}: "
                                   "it cannot hold a gate and an up projection")
            half = d_out // 2
            g, u = (slice(0, half), slice(half, d_out)) if layout.concatenated else (slice(0, None, 2), slice(1, None, 2))
            self.gate_proj = ExpertLinear(owner, layout.up, e, layout.transposed, g, bias_up, "gate")
            self.up_proj = ExpertLinear(owner, layout.up, e, layout.transposed, u, bias_up, "up")
        else:
            self.up_proj = ExpertLinear(owner, layout.up, e, layout.transposed, None, bias_up, "up")
        self.down_proj = ExpertLinear(owner, layout.down, e, layout.transposed, None, bias_down, "down")


class StopForward(Exception):
    """Raised by a counting pass once every experts module of the block has
    seen its tokens: the rest of the block is not needed."""


@dataclass
class RoutedExperts:
    """The state :func:`install` attaches to an experts module."""

    layout: ExpertsLayout
    mlps: list[ExpertMLP]
    counts: Tensor = None  # routed tokens per expert in the current pass
    calib_counts: Tensor | None = None  # ... in the last calibration pass
    all_tokens: set[int] = field(default_factory=set)  # experts computed on every token (statistics)
    counting: "CountingPass | None" = None
    reason: dict[int, str] = field(default_factory=dict)  # expert -> where its statistics come from, if not routed
    weighted: bool = False  # --moe-calibration weighted: statistics of routed tokens scaled by their gate weights
    scale: dict[int, Tensor] = field(default_factory=dict)  # expert -> its current tokens' gate weights
    # experts read in groups (docs/moe.md §4): the 3-D parameters hold experts offset ... offset + g - 1
    offset: int = 0
    active: range | None = None  # the experts routed_forward computes (None: all)
    out: Tensor | None = None  # the running sum the experts' outputs are added to (None: a new zero tensor)
    intercept: "Callable[[Tensor, Tensor, Tensor], Tensor] | None" = None  # replaces the experts' computation
    groups: "ExpertGroups | None" = None  # set by a block source that reads these 3-D parameters in groups
    scores: "ExpertScores | None" = None  # accumulated in a scoring pass (--drop-experts, docs/moe.md §5)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.layout.num_experts, dtype=torch.long)

    def tokens(self, e: int) -> int | None:
        return None if self.calib_counts is None else int(self.calib_counts[e])

    def statistics(self, e: int) -> str | None:
        if self.calib_counts is None:
            return None
        return self.reason.get(e, "routed")


class ExpertGroups:
    """How an experts module whose 3-D parameters stay on disk (the meta
    device) reads them one group of ``size`` experts at a time: ``read(name,
    e0, e1)`` gives rows ``e0:e1`` of parameter ``name`` (in its storage
    dtype), :meth:`load` puts them in the module - on ``device``, in
    ``compute_dtype`` - and :meth:`unload` gives them back."""

    def __init__(self, module: nn.Module, size: int, read: "Callable[[str, int, int], Tensor]",
                 device: torch.device, compute_dtype: torch.dtype | None):
        self.module, self.size, self.read = module, size, read
        self.device, self.compute_dtype = device, compute_dtype
        self.names = fused_matrices(module)
        self.meta = {n: module._parameters[n] for n in self.names}

    @property
    def num_experts(self) -> int:
        return self.meta[self.names[0]].shape[0]

    def ranges(self) -> list[range]:
        E = self.num_experts
        return [range(e0, min(E, e0 + self.size)) for e0 in range(0, E, self.size)]

    def load(self, experts: range) -> None:
        state: RoutedExperts = self.module._d2prune_experts
        for n in self.names:
            t = self.read(n, experts.start, experts.stop).to(self.meta[n].dtype)
            storage = t.dtype
            if self.compute_dtype is not None and t.is_floating_point():
                t = t.to(self.compute_dtype)
            p = nn.Parameter(t.to(self.device), requires_grad=False)
            if p.dtype != storage:
                setattr(p, STORAGE_DTYPE, storage)
            self.module._parameters[n] = p
        state.offset, state.active = experts.start, experts

    def loaded(self, storage: bool = True) -> dict[str, Tensor]:
        """The loaded group's rows of each parameter (in the storage dtype: as they will be saved)."""
        out = {}
        for n in self.names:
            p = self.module._parameters[n]
            out[n] = p.detach().to(getattr(p, STORAGE_DTYPE, p.dtype)) if storage else p.detach()
        return out

    def unload(self) -> None:
        state: RoutedExperts = self.module._d2prune_experts
        for n in self.names:
            self.module._parameters[n] = self.meta[n]
        state.offset, state.active = 0, None


@dataclass
class ExpertScores:
    """What a scoring pass accumulates per expert (docs/moe.md §5): the
    tokens routed to it and REAP's sum over them of ``g * ||f(x)||_2`` (the
    gate weight the expert's output is multiplied by, times the L2 norm of
    that output), in float64."""

    tokens: Tensor
    reap_sum: Tensor

    @classmethod
    def zeros(cls, n: int) -> "ExpertScores":
        return cls(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64))

    def score(self, kind: str) -> Tensor:
        """``reap``: the mean of ``g * ||f(x)||`` over the expert's routed tokens
        (0 for an expert never routed); ``frequency``: its routed tokens."""
        if kind == "frequency":
            return self.tokens.to(torch.float64)
        return self.reap_sum / self.tokens.clamp(min=1)


@dataclass
class CountingPass:
    """A routing-only pass over one block: the experts modules still to be
    reached in the current sample (the block stops after the last)."""

    modules: int
    seen: int = 0


def _gate_up(state: RoutedExperts, mlp: ExpertMLP, x: Tensor) -> Tensor:
    """The fused gate-up output of one expert, laid out as the module's own
    ``_apply_gate`` reads it (concatenated or interleaved)."""
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    if state.layout.concatenated:
        return torch.cat([g, u], dim=-1)
    return torch.stack([g, u], dim=-1).flatten(-2)


def routed_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   *args, **kwargs) -> Tensor:
    """An implementation of transformers' experts interface computing each
    expert through its :class:`ExpertLinear` views, on the tokens routed to it
    (in the order of transformers' eager loop: experts ascending, tokens in
    order, outputs weighted and summed with ``index_add_``)."""
    state: RoutedExperts = self._d2prune_experts
    E = state.layout.num_experts
    with torch.no_grad():
        hit = F.one_hot(top_k_index.long().clamp(max=E), num_classes=E + 1)[..., :E].permute(2, 1, 0)  # [E, k, T]
        per_expert = hit.sum(dim=(1, 2)).cpu()
    state.counts += per_expert
    if state.counting is not None:
        state.counting.seen += 1
        if state.counting.seen >= state.counting.modules:
            raise StopForward
        return torch.zeros_like(hidden_states)
    if state.intercept is not None:
        return state.intercept(hidden_states, top_k_index, top_k_weights)
    # (a group of experts adds to the sum of the groups before it: the same float operations, in the same
    # order, as all experts at once)
    out = torch.zeros_like(hidden_states) if state.out is None else state.out
    for e in (range(E) if state.active is None else state.active):
        routed = int(per_expert[e])
        every = e in state.all_tokens
        if not routed and not every:
            continue
        top_k_pos, token_idx = torch.where(hit[e])
        x = hidden_states if every else hidden_states[token_idx]
        mlp = state.mlps[e]
        if state.weighted and not every:  # (a few-token expert's all-token fallback is not weighted)
            state.scale[e] = top_k_weights[token_idx, top_k_pos].detach()
        h = self._apply_gate(_gate_up(state, mlp, x)) if state.layout.gated else self.act_fn(mlp.up_proj(x))
        y = mlp.down_proj(h)
        state.scale.pop(e, None)
        if state.layout.post_norm:
            y = self.post_expert_norm(y)
        if every:
            y = y[token_idx]
        if state.scores is not None:  # REAP: the gate weight times the norm of the expert's output, per token
            g = top_k_weights[token_idx, top_k_pos].detach().to(torch.float64)
            state.scores.reap_sum[e] += float((g * torch.linalg.vector_norm(y.detach().to(torch.float64), dim=-1)).sum())
            state.scores.tokens[e] += int(routed)
        y = y * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def install(module: nn.Module, layout: ExpertsLayout) -> None:
    """Give ``module`` per-expert :class:`ExpertMLP` children ``"0"`` ...
    ``"E-1"`` and the routed forward (undone by :func:`uninstall`)."""
    mlps = [ExpertMLP(module, layout, e) for e in range(layout.num_experts)]
    for e, mlp in enumerate(mlps):
        module.add_module(str(e), mlp)
    module._d2prune_experts = RoutedExperts(layout, mlps)
    module.forward = types.MethodType(routed_forward, module)


def uninstall(module: nn.Module) -> None:
    state: RoutedExperts = module.__dict__.pop("_d2prune_experts")
    for e in range(state.layout.num_experts):
        del module._modules[str(e)]
    del module.forward  # the class's own (dispatching) forward again


def routed_modules(root: nn.Module) -> list[nn.Module]:
    """The experts modules under ``root`` that have views installed."""
    return [m for m in root.modules() if "_d2prune_experts" in m.__dict__]


@contextmanager
def unfused(root: nn.Module) -> Iterator[list[nn.Module]]:
    """Every transformers experts module under ``root`` seen as per-expert
    Linears for the duration (nested uses are no-ops for modules already done)."""
    done = []
    try:
        for m in list(root.modules()):
            layout = experts_layout(m)
            if layout is not None and "_d2prune_experts" not in m.__dict__:
                install(m, layout)
                done.append(m)
        yield done
    finally:
        for m in done:
            uninstall(m)


def fused_matrices(module: nn.Module) -> list[str]:
    """The experts module's 3-D parameters (one matrix per expert along the
    first dimension): what a group of experts reads and writes."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def experts_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The transformers experts modules under ``root``, by name."""
    return {n: m for n, m in root.named_modules() if experts_layout(m) is not None}


# --------------------------------------------------------------------------- removing experts
GROUP_ATTRS = ("num_group", "n_group")  # a grouped router's number of expert groups (DeepSeek-V3)


def _num_experts(experts: nn.Module) -> int:
    return next(p for p in experts.parameters(recurse=False) if p.dim() == 3).shape[0]


def routers_of(layer: nn.Module, experts: nn.Module) -> list[nn.Module]:
    """The modules beside ``experts`` in its MoE ``layer`` whose every tensor
    is one row per expert (a router's weight ``[E, H]``, its bias and
    correction terms ``[E]``)."""
    E = _num_experts(experts)
    out = []
    for m in layer.children():
        if m is experts:
            continue
        tensors = [t for t in (*m.parameters(), *m.buffers()) if t is not None]
        if tensors and all(t.dim() in (1, 2) and t.shape[0] == E for t in tensors):
            out.append(m)
    return out


def expert_groups_of(routers: list[nn.Module]) -> int:
    """How many groups a grouped router splits its experts into (1: none)."""
    for r in routers:
        for a in GROUP_ATTRS:
            g = getattr(r, a, None)
            if isinstance(g, int) and g > 1:
                return g
    return 1


def remove_experts(layer: nn.Module, experts: nn.Module, keep: list[int]) -> None:
    """Keep only experts ``keep`` (ascending) of ``experts`` in MoE ``layer``:
    their rows of every per-expert tensor of the experts module and of its
    routers (weights, biases, correction buffers), and every ``*expert*``
    count of those modules set to the new number. Works on real or meta
    tensors; views installed on ``experts`` are rebuilt."""
    E = _num_experts(experts)
    routers = routers_of(layer, experts)
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    installed = "_d2prune_experts" in experts.__dict__
    if installed:
        uninstall(experts)
    for m in (experts, *routers):
        for name, p in list(m._parameters.items()):
            if p is not None and p.dim() >= 1 and p.shape[0] == E:
                # the same Parameter, its data cut: a block opened in its compute dtype still goes back to
                # its storage dtype when it is closed (io/source.py place_params keeps the objects)
                p.data = p.data.index_select(0, idx.to(p.device))
        for name, b in list(m._buffers.items()):
            if b is not None and b.dim() >= 1 and b.shape[0] == E:
                m._buffers[name] = b.index_select(0, idx.to(b.device))
    for m in (layer, experts, *routers):
        for attr, v in list(vars(m).items()):
            if type(v) is int and v == E and "expert" in attr:
                setattr(m, attr, len(idx))
    if installed:
        install(experts, experts_layout(experts))
