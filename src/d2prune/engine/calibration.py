"""One block's calibration and pruning, and the contract of what drives it.

Below both the plain prune (:mod:`d2prune.pruning`) and the searches over
candidate settings (:mod:`d2prune.methods.d2prune.search`), so neither imports the other:

* :class:`BlockLayers` - a block's prunable Linears with their qualified
  names, and the method's per-layer wrappers for them;
* :func:`calibrate` - the block's dense calibration pass: hooks feed one
  :class:`~d2prune.ops.stats.InputStats` per distinct input tensor (Linears
  reading the same tensor - q/k/v, gate/up - share it) and every wrapper that
  watches its layer's output (:class:`BlockObserver`);
* :func:`prune_layers` - every Linear pruned by its wrapper, one
  :class:`LayerReport` each: shape, achieved sparsity, the reconstruction
  error ``||WX - W'X||^2 / ||WX||^2`` on the calibration inputs, time;
* :class:`PruneRun` / :class:`PruneOutcome` - what a driver over the blocks
  (the plain loop or a :class:`CandidateSearch`) is given and returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from . import distributed
from ..config import MethodConfig, PruneConfig, to_dict
from ..errors import D2PruneError
from .sequential import BlockInputs, check_finite, forward_hooks, run_block, sample_batches
from ..io.source import BlockSource
from ..ops.masks import ROW_CHUNK_ELEMENTS
from .method import LayerPruner, Method
from ..io.experts import ExpertLinear, StopForward, CountingPass, routed_modules
from ..io.inventory import unpruned
from ..io.modeling import Blocks, find_prunable, in_features, set_weight_matrix, weight_matrix
from ..io.resume import WorkFolder
from ..io.streaming import block_tensors
from .expert_drop import ExpertDrop, replay_drops
from ..ops.stats import InputStats, StatKey

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None
    seconds: float
    how: str = ""
    tokens: int | None = None  # a MoE expert's projection: calibration tokens its router sent to it
    statistics: str | None = None  # ... and where its statistics came from (routed, or all tokens and why)


FAST_BATCH = 8  # --fast: samples per block forward


@dataclass(frozen=True)
class CalibrationOptions:
    """What a calibration pass collects besides the methods' own statistics.

    ``extra_stats``: ``("hessian",)`` for the per-layer reconstruction error;
    ``share_inputs``: one statistics object per distinct input tensor
    (False: one per Linear, the references' way; same numbers, more work)."""

    extra_stats: tuple[StatKey, ...] = ()
    share_inputs: bool = True
    batch: int = 1  # samples per block forward (--fast); 1 = the references' order of float operations
    moe_calibration: str = "routed"  # experts' statistics: from their routed tokens, or from every token
    moe_min_tokens: int = 64  # routed: an expert with fewer calibration tokens gets all-token statistics

    @property
    def fast(self) -> bool:
        return self.batch > 1

    @classmethod
    def of(cls, config: PruneConfig) -> "CalibrationOptions":
        """The per-layer error (:func:`relative_error`) of every method comes
        from the Gram matrix of its layer's calibration inputs: the method's
        own Hessian where it builds one, else one accumulated for the error
        (``--no-layer-error`` skips it). One definition for every method, so
        the ``error`` column compares methods (docs/method.md §1)."""
        return cls(("hessian",) if config.layer_error else (), config.share_inputs, FAST_BATCH if config.fast else 1,
                   config.moe_calibration, config.moe_min_tokens)

    def without_error(self) -> "CalibrationOptions":
        """The same options without the per-layer error's Hessian (for a pass that prunes nothing)."""
        return replace(self, extra_stats=())


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """The per-layer error of every method: ``||W X - W' X||^2 / ||W X||^2``
    (no bias: it is not pruned, and would only dilute the ratio) where ``X``
    holds the inputs the layer received in its block's dense calibration pass
    (the pass the method's statistics come from: the block's inputs are the
    outputs of the already pruned earlier blocks, and inside the block every
    layer is still dense). Computed from the (scaled) Gram matrix ``H`` of
    ``X`` as ``tr(dW H dW^T) / tr(W H W^T)``. ``W`` may be in any dtype (it is
    read in fp32); rows are taken a chunk at a time so no full-size ``dW`` /
    ``dW H`` temporaries exist."""
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, W.shape[1]))
    num = den = 0.0
    for i in range(0, W.shape[0], rows):
        w = W[i:i + rows].float()
        dw = w - W_new[i:i + rows]
        num += float((dw @ H * dw).sum())
        den += float((w @ H * w).sum())
    return num / den if den > 0 else 0.0


# --------------------------------------------------------------------------- a block's layers
IGNORED = "ignored"  # the ``how`` of a layer kept dense by PruneConfig.targets / ignore


@dataclass
class BlockLayers:
    """The prunable Linears (and GPT-2 ``Conv1D``) of block ``index`` by name
    inside the block, and their qualified names (``model.layers.3.mlp.up_proj``).
    ``layers``: those to prune; ``ignored``: those kept dense (``--ignore`` /
    ``--targets``), reported but never touched."""

    index: int
    layers: dict[str, nn.Module]
    qualified: dict[str, str]
    ignored: dict[str, nn.Module] = field(default_factory=dict)
    block: nn.Module | None = None
    prefix: str = ""  # the block's full name (model.layers.3)

    @classmethod
    def find(cls, block: nn.Module, index: int, prefix: str, prunes=None) -> "BlockLayers":
        """``prunes(full module name) -> bool`` selects the layers to prune (default: all)."""
        found = find_prunable(block)
        qualified = {n: f"{prefix}.{index}.{n}" for n in found}
        keep = {n: prunes is None or prunes(qualified[n]) for n in found}
        return cls(index, {n: m for n, m in found.items() if keep[n]}, qualified,
                   {n: m for n, m in found.items() if not keep[n]}, block, f"{prefix}.{index}")

    def unpruned_rows(self) -> list["LayerReport"]:
        """One row per other weight of two or more dimensions the block keeps
        as it is (a router, per-expert biases...: io/inventory.py), its
        sparsity as it is and its reason as ``how``, so that the run's overall
        sparsity counts every 2+-D weight of the blocks."""
        if self.block is None:
            return []
        params = dict(self.block.named_parameters())
        return [LayerReport(f"{self.prefix}.{u.name}", u.shape, float((params[u.name] == 0).sum()) / u.numel,
                            None, 0.0, u.reason)
                for u in unpruned(self.block, set(self.ignored)) if u.matrix and u.reason != IGNORED]

    def with_ignored(self, rows: list["LayerReport"]) -> list["LayerReport"]:
        """``rows`` of the pruned layers and one row per ignored layer (its
        sparsity as it is, no error, how ``ignored``), in module order, then
        one per other 2+-D weight left as it is (:meth:`unpruned_rows`)."""
        extra = self.unpruned_rows()
        if not self.ignored:
            return rows + extra
        by_name = {r.name: r for r in rows}
        out = []
        for n, q in self.qualified.items():
            if n in self.ignored:
                W = weight_matrix(self.ignored[n])
                out.append(LayerReport(q, tuple(W.shape), float((W == 0).sum()) / W.numel(), None, 0.0, IGNORED))
            elif q in by_name:
                out.append(by_name[q])
        return out + extra

    def pruners(self, method: Method, block: nn.Module) -> dict[str, LayerPruner]:
        """The method's wrapper for every layer (the method sees the dense block first)."""
        method.begin_block(self.index, block, self.layers)
        return {n: method.layer(self.qualified[n], m, self.index) for n, m in self.layers.items()}

    def weights(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Copies of the ``[d_out, d_in]`` weight matrices (on ``device``, default where they are)."""
        return {n: weight_matrix(m).detach().to(device or m.weight.device, copy=True) for n, m in self.layers.items()}

    def load(self, weights: dict[str, Tensor]) -> None:
        """Write ``[d_out, d_in]`` matrices (e.g. from :meth:`weights`) into the layers."""
        for n, m in self.layers.items():
            set_weight_matrix(m, weights[n].to(m.weight.device))


# --------------------------------------------------------------------------- calibration pass
def _identity(x: Tensor) -> tuple:
    return (x.data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)


class BlockObserver:
    """Forward hooks for one block's dense calibration pass.

    Linears reading the same tensor share one :class:`InputStats`. The groups
    are found on the first sample from tensor identity (its inputs are kept as
    copies until every member has declared which statistics it needs); from
    the second sample on, each group's statistics are updated inside the hook
    of its first member, as the references do. Output watchers (every pruner
    listed for a Linear, e.g. one per search candidate) are fed in the hook.
    """

    def __init__(self, layers: dict[str, nn.Module], watchers: dict[str, list[LayerPruner]], device: torch.device,
                 options: CalibrationOptions):
        self.layers, self.watchers, self.device, self.options = layers, watchers, device, options
        self.first: dict[str, list[tuple[tuple, Tensor, Tensor]]] = {}  # sample 0: (identity, input, copy) per call
        self.stats: dict[str, InputStats] = {}
        self.leaders: set[str] = set()

    def hooks(self):
        def make(name: str):
            outputs = [p for p in self.watchers[name] if p.wants_output]

            def hook(module, inp, out):
                x = inp[0].detach()
                # a MoE expert under --moe-calibration weighted: each routed token's row scaled by its gate
                # weight g, so the statistics weigh it by g^2 (docs/moe.md §2)
                scale = module.stat_scale if isinstance(module, ExpertLinear) else None
                seen = x if scale is None else x * scale.unsqueeze(-1).to(x.dtype)
                if not self.stats:
                    # keep x itself alive too: a freed input's address could be reused by a later
                    # Linear's input within this forward, and identity keys would then collide
                    self.first.setdefault(name, []).append((_identity(x), x, seen.clone()))
                elif name in self.leaders:
                    self.stats[name].update(seen)
                if outputs:
                    y = (out[0] if isinstance(out, tuple) else out).detach()
                    for p in outputs:
                        p.observe_output(y)
            return hook
        return {m: make(n) for n, m in self.layers.items()}

    def end_sample(self) -> None:
        if self.stats:
            return
        self._group()
        for leader in self.leaders:
            for _, _, x in self.first.get(leader, []):
                self.stats[leader].update(x)
        self.first.clear()

    def _group(self) -> None:
        groups: dict = {}
        for name in self.layers:
            calls = self.first.get(name)
            key = calls[0][0] if calls and self.options.share_inputs else ("own", name)
            groups.setdefault(key, []).append(name)
        for names in groups.values():
            kinds = set(self.options.extra_stats)
            for n in names:
                for p in self.watchers[n]:
                    kinds.update(p.input_stats)
            st = InputStats(in_features(self.layers[names[0]]), self.device, kinds, fast=self.options.fast)
            self.leaders.add(names[0])
            for n in names:
                self.stats[n] = st
        if len(groups) < len(self.layers):
            log.debug("shared input statistics: %s", [v for v in groups.values() if len(v) > 1])


def _sum_counts(st, device: torch.device) -> None:
    """An expert's token counts summed over the processes of a torchrun job
    (on the device the backend communicates from)."""
    if distributed.active():
        c = st.counts.to(device)
        distributed.sum_([c])
        st.counts.copy_(c.cpu())


def _choose_expert_statistics(block: nn.Module, experts: list, index: int, inputs: BlockInputs, hidden: Tensor,
                              n: int, options: CalibrationOptions) -> None:
    """Which experts of the block compute on every token in the calibration
    pass (docs/moe.md §2): all of them with ``--moe-calibration all``; else
    those the router sends fewer than ``moe_min_tokens`` calibration tokens,
    counted by a routing-only pass that stops the block at its last experts
    module (attention and routers run, no expert does)."""
    for st in experts:
        st.counts.zero_()
        st.reason = {}
        st.weighted = options.moe_calibration == "weighted"
    if options.moe_calibration == "all":
        for st in experts:
            st.all_tokens = set(range(st.layout.num_experts))
            st.reason = {e: "all tokens" for e in st.all_tokens}
        return
    counting = CountingPass(len(experts))
    for st in experts:
        st.counting = counting
    try:
        for j0, j1 in sample_batches(inputs, index, n, options.batch):
            counting.seen = 0
            try:
                run_block(block, hidden[j0:j1], inputs.calls[index][j0], inputs)
            except StopForward:
                pass
    finally:
        for st in experts:
            st.counting = None
    for st in experts:
        _sum_counts(st, hidden.device)  # every process's samples count
        few_tokens_fallback(st, options)
        st.counts.zero_()
    label_weighted(experts, options)


def few_tokens_fallback(st, options: CalibrationOptions) -> None:
    """The experts the router sent fewer than ``moe_min_tokens`` tokens
    (``st.counts``) get all-token statistics, with the reason recorded. One
    sent none gets them whatever ``moe_min_tokens`` says (even 0): it has no
    statistics at all, and an OBS-style method would zero every weight of an
    input it never saw - the whole expert (docs/moe.md §2)."""
    low = (st.counts < max(1, options.moe_min_tokens)).nonzero().flatten().tolist()
    st.all_tokens = set(low)
    st.reason = {e: (f"all tokens (routed {int(st.counts[e])} < {options.moe_min_tokens})" if st.counts[e]
                     else "all tokens (routed none)") for e in low}


def label_weighted(experts: list, options: CalibrationOptions) -> None:
    if options.moe_calibration == "weighted":
        for st in experts:
            st.reason = {e: st.reason.get(e, "routed, gate-weighted") for e in range(st.layout.num_experts)}


@torch.no_grad()
def calibrate(block: nn.Module, layers: BlockLayers, inputs: BlockInputs, watchers: dict[str, list[LayerPruner]],
              options: CalibrationOptions, hidden: Tensor | None = None, nsamples: int | None = None,
              experts: list | None = None) -> BlockObserver:
    """Dense calibration pass of the block over ``hidden[:nsamples]`` (default:
    ``inputs.hidden``, every sample); ``watchers``: the wrappers of each layer
    whose statistics to collect (several per layer in a search); ``experts``:
    the experts modules whose statistics this pass collects (default: all of the block's)."""
    hidden = inputs.hidden if hidden is None else hidden
    n = hidden.shape[0] if nsamples is None else nsamples
    experts = [m._d2prune_experts for m in (routed_modules(block) if experts is None else experts)]
    if experts:
        _choose_expert_statistics(block, experts, layers.index, inputs, hidden, n, options)
    param = next(block.parameters(), None)  # statistics live with the block (activations may be offloaded)
    obs = BlockObserver(layers.layers, watchers, param.device if param is not None else hidden.device, options)
    with forward_hooks(obs.hooks()):
        for j0, j1 in sample_batches(inputs, layers.index, n, options.batch):
            run_block(block, hidden[j0:j1], inputs.calls[layers.index][j0], inputs)
            obs.end_sample()
    for st in experts:  # what each expert's statistics came from, for the report; propagation is routed only
        _sum_counts(st, hidden.device)
        st.calib_counts, st.all_tokens, st.weighted = st.counts.clone(), set(), False
    merge_statistics(obs, watchers)
    return obs


def merge_statistics(obs: BlockObserver, watchers: dict[str, list[LayerPruner]]) -> None:
    """Every process's samples count: statistics combined before any mask is chosen (torchrun)."""
    if distributed.active():
        for st in {id(st): st for st in obs.stats.values()}.values():
            for acc in st.acc.values():
                distributed.merge(acc, acc.merge_fields)
        for pruners in watchers.values():
            for p in pruners:
                for o in p.observers():
                    distributed.merge(o, o.merge_fields)


@torch.no_grad()
def prune_layers(layers: BlockLayers, pruners: dict[str, LayerPruner], stats: dict[str, InputStats],
                 tag: str = "") -> list[LayerReport]:
    """Prune every layer with its wrapper; one report row per layer (logged,
    prefixed by ``tag``, e.g. the candidate of a search), with the per-layer
    error where the statistics hold a Hessian (unless ``--no-layer-error``)."""
    rows = []
    for n, layer in layers.layers.items():
        t1 = time.perf_counter()
        st, name = stats[n], layers.qualified[n]
        for t in st.tensors():
            check_finite(t, f"the calibration statistics of {name}")
        dense = weight_matrix(layer)  # a view: the dense weight until the write-back below
        # one fp32 working copy, which the wrapper prunes in place
        W_new, _ = pruners[n].prune(dense.to(torch.float32, copy=True), st)
        err = relative_error(dense, W_new, st["hessian"].H) if "hessian" in st else None
        set_weight_matrix(layer, W_new)
        distributed.broadcast_([layer.weight.data])  # every process continues with rank 0's block
        del W_new
        W = weight_matrix(layer)
        achieved = float((W == 0).sum()) / W.numel()
        row = LayerReport(name, tuple(W.shape), achieved, err, time.perf_counter() - t1, pruners[n].label,
                          *((layer.tokens, layer.statistics) if isinstance(layer, ExpertLinear) else ()))
        rows.append(row)
        log.log(logging.DEBUG if isinstance(layer, ExpertLinear) else logging.INFO,  # experts: thousands of rows
                "%s%-40s %-13s sparsity %.4f  error %s  %.2fs", tag, row.name, row.how, row.sparsity,
                 f"{row.error:.3e}" if row.error is not None else "-", row.seconds)
    return layers.with_ignored(rows)


# --------------------------------------------------------------------------- driver contract
@dataclass
class PruneRun:
    """Everything a driver over the blocks needs (one prune call).

    ``calibration`` ``[N, L]`` and ``heldout`` ``[H, L]`` (or None) token ids,
    or pixel values ``[N, C, H, W]`` of an image model, whose held-out images
    come with ``heldout_labels`` ``[H]``;
    ``source``: where the blocks live and the dtype they compute in;
    ``work``: the resume folder of an interruptible run, or None."""

    model: nn.Module
    blocks: Blocks
    source: BlockSource
    calibration: Tensor
    heldout: Tensor | None
    device: torch.device
    options: CalibrationOptions
    work: WorkFolder | None = None
    heldout_labels: Tensor | None = None
    prunes: Callable[[str], bool] | None = None  # which block Linears are pruned (PruneConfig.prunes); None: all
    drop: "ExpertDrop | None" = None  # whole experts removed from each MoE layer first (engine/expert_drop.py)
    drops: list[dict] = field(default_factory=list)  # ... and what they were, block by block (d2prune.json)

    def layers(self, block: nn.Module, i: int) -> BlockLayers:
        """Block ``i``'s prunable Linears, split into those pruned and those kept dense."""
        return BlockLayers.find(block, i, self.blocks.prefix, self.prunes)


@dataclass
class PruneOutcome:
    """What a driver returns: the report rows (one per pruned layer, in block
    order), the method's facts and choices for ``d2prune.json``, the seconds
    spent in calibration passes, and the first block this call pruned (> 0:
    an interrupted run was resumed)."""

    layers: list[LayerReport] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    calib_seconds: float = 0.0
    resumed_from: int = 0


def _rows(saved: list[dict]) -> list[LayerReport]:
    return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in saved]


def block_of(row: LayerReport, prefix: str) -> int:
    """The block a report row belongs to (its name is ``PREFIX.i.NAME``)."""
    return int(row.name.removeprefix(prefix + ".").split(".", 1)[0])


def block_shapes(run: PruneRun, i: int) -> dict[str, tuple[int, ...]]:
    """``{checkpoint name: shape}`` of block ``i``'s tensors: what its file in the work folder must hold."""
    return {f"{run.blocks.prefix}.{i}.{n}": tuple(p.shape) for n, p in run.blocks[i].named_parameters()}


def usable_blocks(run: PruneRun, start: int, tags: tuple[str, ...] = ("",)) -> int:
    """How many of the ``start`` finished blocks can be put back: a block whose
    file (under any of ``tags``) is missing or damaged is pruned again, and so
    is every block after it (they were pruned on its outputs)."""
    for i in range(start):
        for tag in tags:
            why = run.work.damaged(i, block_shapes(run, i), tag)
            if why:
                log.warning("%s: pruning blocks %d-%d again", why, i + 1, len(run.blocks))
                return i
    return start


def resume_point(run: PruneRun, method: Method, rows: list[LayerReport]) -> int:
    """With a resume folder: the first block left to prune. The finished
    blocks' weights are put back into ``run.source``, their report rows
    appended to ``rows`` and the method's per-block choices restored."""
    if run.work is None:
        return 0
    begun = run.work.begin(len(run.blocks))
    with run.work.reading():
        # the experts the finished blocks lost: removed again first, so that their saved files fit
        drops = [r for r in run.work.state.get("dropped_experts", []) if r["block"] < begun]
    replay_drops(run.model, run.blocks, drops)
    start = usable_blocks(run, begun)
    with run.work.reading():
        saved = [r for r in _rows(run.work.state["rows"]) if block_of(r, run.blocks.prefix) < start]
        method.load_state(run.work.state["method"])  # a block pruned again overwrites its choice
    if any(r["block"] >= start for r in drops):  # a damaged block whose experts are gone cannot be pruned again
        raise D2PruneError(f"block {start} of the work folder {run.work.path} is damaged, and experts were already "
                           "dropped from it: rerun with --restart")
    run.drops[:] = drops
    for i in range(start):
        run.source.restore(i, run.work.block_path(i))
    rows.extend(saved)
    return start


def save_block(run: PruneRun, i: int, block: nn.Module, rows: list[LayerReport], method_state: dict,
               extra: dict | None = None, written: bool = False) -> None:
    """Block ``i`` is finished: its weights go to the resume folder (a streamed
    model reads it back from there; ``written``: they are there already) and
    the run's state is committed."""
    if run.work is None or not run.work.writer:
        return
    if not written:
        run.work.write_block(i, block_tensors(block, f"{run.blocks.prefix}.{i}"))
        run.source.saved(i, run.work.block_path(i))
    run.work.commit(i + 1, [to_dict(r) for r in rows], method_state,
                    {**({"dropped_experts": run.drops} if run.drops else {}), **(extra or {})})


class CandidateSearch:
    """Prunes the model under several candidate settings of one method and
    keeps one (D²Prune's ``frozen="auto"`` / ``"per-layer"``).

    A subclass names the method config it serves (``config_type``) and says
    when it applies (:meth:`applies`); :func:`register_search` makes
    :func:`find_search` return it for such configs, so the plain prune never
    needs to know which methods search."""

    config_type: ClassVar[type[MethodConfig]]

    def __init__(self, method: Method):
        self.method = method

    @classmethod
    def applies(cls, config: MethodConfig) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, run: PruneRun) -> PruneOutcome:  # pragma: no cover - abstract
        raise NotImplementedError


SEARCHES: dict[type[MethodConfig], list[type[CandidateSearch]]] = {}


def register_search(cls: type[CandidateSearch]) -> type[CandidateSearch]:
    """Offer a search for its ``config_type`` (checked in registration order)."""
    SEARCHES.setdefault(cls.config_type, []).append(cls)
    return cls


def find_search(method: Method) -> CandidateSearch | None:
    """The search that drives ``method``'s run, or None for the plain block loop."""
    for cls in SEARCHES.get(type(method.config), ()):
        if cls.applies(method.config):
            return cls(method)
    return None
