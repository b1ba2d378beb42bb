"""One block's calibration and pruning, and the contract of what drives it.

Below both the plain prune (:mod:`d2prune.pruning`) and the searches over
candidate settings (:mod:`d2prune.selection`), so neither imports the other:

* :class:`BlockLayers` - a block's prunable Linears with their qualified
  names, and the method's per-layer wrappers for them;
* :func:`calibrate` - the block's dense calibration pass: hooks feed one
  :class:`~d2prune.stats.InputStats` per distinct input tensor (Linears
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
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import distributed
from .config import MethodConfig, PruneConfig, to_dict
from .engine import BlockInputs, BlockSource, check_finite, forward_hooks, run_block, sample_batches
from .masks import ROW_CHUNK_ELEMENTS
from .methods.base import LayerPruner, Method
from .modeling import STORAGE_DTYPE, Blocks, find_prunable, in_features, set_weight_matrix, weight_matrix
from .resume import WorkFolder
from .streaming import block_tensors
from .stats import InputStats, StatKey

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None
    seconds: float
    how: str = ""


FAST_BATCH = 8  # --fast: samples per block forward


@dataclass(frozen=True)
class CalibrationOptions:
    """What a calibration pass collects besides the methods' own statistics.

    ``extra_stats``: e.g. ``("hessian",)`` for the per-layer reconstruction
    error; ``share_inputs``: one statistics object per distinct input tensor
    (False: one per Linear, the references' way; same numbers, more work)."""

    extra_stats: tuple[StatKey, ...] = ()
    share_inputs: bool = True
    error_from_outputs: bool = False
    batch: int = 1  # samples per block forward (--fast); 1 = the references' order of float operations

    @property
    def fast(self) -> bool:
        return self.batch > 1

    @classmethod
    def of(cls, config: PruneConfig) -> "CalibrationOptions":
        """The per-layer error comes from the Hessian where the method builds
        one anyway (``tr(dW H dW^T)``, d_out * d_in^2); a method without one
        measures it on the propagation pass instead (d_out * d_in * tokens,
        about one more forward of the layer), never accumulating a Hessian
        (d_in^2 * tokens) only for a statistic."""
        hessian = config.layer_error and config.method.uses_hessian
        return cls(("hessian",) if hessian else (), config.share_inputs, config.layer_error and not hessian,
                   FAST_BATCH if config.fast else 1)


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """``||W X - W' X||^2 / ||W X||^2`` over the calibration inputs, from the
    (scaled) Gram matrix ``H`` of ``X``: ``tr(dW H dW^T) / tr(W H W^T)``.
    ``W`` may be in any dtype (it is read in fp32); rows are taken a chunk at
    a time so no full-size ``dW`` / ``dW H`` temporaries exist."""
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, W.shape[1]))
    num = den = 0.0
    for i in range(0, W.shape[0], rows):
        w = W[i:i + rows].float()
        dw = w - W_new[i:i + rows]
        num += float((dw @ H * dw).sum())
        den += float((w @ H * w).sum())
    return num / den if den > 0 else 0.0


# --------------------------------------------------------------------------- a block's layers
@dataclass
class BlockLayers:
    """The prunable Linears (and GPT-2 ``Conv1D``) of block ``index`` by name
    inside the block, and their qualified names (``model.layers.3.mlp.up_proj``)."""

    index: int
    layers: dict[str, nn.Module]
    qualified: dict[str, str]

    @classmethod
    def find(cls, block: nn.Module, index: int, prefix: str) -> "BlockLayers":
        layers = find_prunable(block)
        return cls(index, layers, {n: f"{prefix}.{index}.{n}" for n in layers})

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
                if not self.stats:
                    # keep x itself alive too: a freed input's address could be reused by a later
                    # Linear's input within this forward, and identity keys would then collide
                    self.first.setdefault(name, []).append((_identity(x), x, x.clone()))
                elif name in self.leaders:
                    self.stats[name].update(x)
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


@torch.no_grad()
def calibrate(block: nn.Module, layers: BlockLayers, inputs: BlockInputs, watchers: dict[str, list[LayerPruner]],
              options: CalibrationOptions, hidden: Tensor | None = None, nsamples: int | None = None) -> BlockObserver:
    """Dense calibration pass of the block over ``hidden[:nsamples]`` (default:
    ``inputs.hidden``, every sample); ``watchers``: the wrappers of each layer
    whose statistics to collect (several per layer in a search)."""
    hidden = inputs.hidden if hidden is None else hidden
    param = next(block.parameters(), None)  # statistics live with the block (activations may be offloaded)
    obs = BlockObserver(layers.layers, watchers, param.device if param is not None else hidden.device, options)
    with forward_hooks(obs.hooks()):
        n = hidden.shape[0] if nsamples is None else nsamples
        for j0, j1 in sample_batches(inputs, layers.index, n, options.batch):
            run_block(block, hidden[j0:j1], inputs.calls[layers.index][j0], inputs)
            obs.end_sample()
    if distributed.active():  # every process's samples count: statistics combined before any mask is chosen
        for st in {id(st): st for st in obs.stats.values()}.values():
            for acc in st.acc.values():
                distributed.merge(acc, acc.merge_fields)
        for pruners in watchers.values():
            for p in pruners:
                for o in p.observers():
                    distributed.merge(o, o.merge_fields)
    return obs


@torch.no_grad()
def prune_layers(layers: BlockLayers, pruners: dict[str, LayerPruner], stats: dict[str, InputStats],
                 tag: str = "", deltas: dict[str, Tensor] | None = None) -> list[LayerReport]:
    """Prune every layer with its wrapper; one report row per layer (logged,
    prefixed by ``tag``, e.g. the candidate of a search). With ``deltas``,
    each layer's ``W - W'`` is kept there for :class:`OutputError` (layers
    whose statistics have no Hessian to give the error)."""
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
        dW = dense.float() - W_new if err is None and deltas is not None else None
        set_weight_matrix(layer, W_new)
        distributed.broadcast_([layer.weight.data])  # every process continues with rank 0's block
        if dW is not None:
            # what was taken away as the layer will compute it: W - W' where W' is
            # the weight after the write-back (rounded to storage, rank 0's)
            dW.add_(W_new.sub_(weight_matrix(layer).float()))
            stored = layer.weight.dtype if getattr(layer.weight, STORAGE_DTYPE, None) is None else \
                getattr(layer.weight, STORAGE_DTYPE)
            compact = dW.to(stored)  # a mask-only method removes stored values: exact in the storage dtype
            deltas[n] = compact if torch.equal(compact.float(), dW) else dW
        del W_new, dW
        W = weight_matrix(layer)
        achieved = float((W == 0).sum()) / W.numel()
        row = LayerReport(name, tuple(W.shape), achieved, err, time.perf_counter() - t1, pruners[n].label)
        rows.append(row)
        log.info("%s%-40s %-13s sparsity %.4f  error %s  %.2fs", tag, row.name, row.how, row.sparsity,
                 f"{row.error:.3e}" if row.error is not None else "-", row.seconds)
    return rows


class OutputError:
    """``||W X - W' X||^2 / ||W X||^2`` of each pruned layer measured on the
    propagation pass: hooks see each pruned layer's input ``X`` and output
    ``W' X``; with ``dW = W - W'`` kept from pruning, ``W X = W' X + dW X``.
    ``X`` is what the layer receives inside the pruned block (for a block's
    first layers, the calibration inputs themselves)."""

    def __init__(self, layers: BlockLayers, deltas: dict[str, Tensor]):
        self.layers, self.deltas = layers, deltas
        self.num = dict.fromkeys(deltas, 0.0)
        self.den = dict.fromkeys(deltas, 0.0)

    def hooks(self):
        def make(name: str):
            def hook(module, inp, out):
                x = inp[0].detach()
                y = (out[0] if isinstance(out, tuple) else out).detach().float()
                e = x.float() @ self.deltas[name].t().float()
                self.num[name] += float((e * e).sum())
                self.den[name] += float(((y + e) ** 2).sum())
            return hook
        return {self.layers.layers[n]: make(n) for n in self.deltas}

    def fill(self, rows: list[LayerReport]) -> None:
        names = list(self.deltas)
        sums = distributed.all_sum([self.num[n] for n in names] + [self.den[n] for n in names])
        self.num, self.den = dict(zip(names, sums[:len(names)])), dict(zip(names, sums[len(names):]))
        by_name = {self.layers.qualified[n]: n for n in self.deltas}
        for row in rows:
            n = by_name.get(row.name)
            if n is not None:
                row.error = self.num[n] / self.den[n] if self.den[n] > 0 else 0.0


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
    start = usable_blocks(run, run.work.begin(len(run.blocks)))
    with run.work.reading():
        saved = [r for r in _rows(run.work.state["rows"]) if block_of(r, run.blocks.prefix) < start]
        method.load_state(run.work.state["method"])  # a block pruned again overwrites its choice
    for i in range(start):
        run.source.restore(i, run.work.block_path(i))
    rows.extend(saved)
    return start


def save_block(run: PruneRun, i: int, block: nn.Module, rows: list[LayerReport], method_state: dict,
               extra: dict | None = None) -> None:
    """Block ``i`` is finished: its weights go to the resume folder (a streamed
    model reads it back from there) and the run's state is committed."""
    if run.work is None or not run.work.writer:
        return
    run.work.write_block(i, block_tensors(block, f"{run.blocks.prefix}.{i}"))
    run.source.saved(i, run.work.block_path(i))
    run.work.commit(i + 1, [to_dict(r) for r in rows], method_state, extra)


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
