"""``prune(model, config, calibration)``: the public entry point.

Per block (see :mod:`d2prune.engine`): dense calibration pass with hooks ->
every Linear pruned by the method's wrapper -> propagation pass. This file is
the glue between the engine and the methods: hooks feed one
:class:`~d2prune.stats.InputStats` per distinct input tensor (Linears reading
the same tensor - q/k/v, gate/up - share it), the wrappers prune, and one
report row per layer records shape, achieved sparsity, the reconstruction
error ``||WX - W'X||^2 / ||WX||^2`` on the calibration inputs and the time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .config import PruneConfig, Sparsity, to_dict
from .engine import BlockInputs, BlockSource, check_finite, forward_hooks, propagate, run_block, sequential
from .errors import D2PruneError
from .methods.base import LayerPruner, build_method
from .modeling import (compute_dtype_for, find_blocks, find_prunable, in_features, pick_device, set_weight_matrix,
                       weight_matrix)
from .resume import WorkFolder
from .streaming import block_tensors
from .stats import InputStats

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None
    seconds: float
    how: str = ""


@dataclass
class PruneReport:
    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calib_forward_seconds: float = 0.0
    method: dict = field(default_factory=dict)
    resumed_from: int = 0  # first block pruned by this call (> 0: an interrupted run was resumed)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned Linear weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "method_summary": self.method,
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "calib_forward_seconds": self.calib_forward_seconds,
            "layers": [to_dict(r) for r in self.layers],
        }


def validate_pattern(model: nn.Module, sparsity: Sparsity, blocksize: int | None = None) -> None:
    """N:M needs M to divide every pruned layer's input width (and, for the
    column-block methods, the block size): fail before any work is done."""
    if not sparsity.is_nm:
        return
    if blocksize is not None and blocksize % sparsity.m:
        raise D2PruneError(f"N:M {sparsity} needs a blocksize divisible by {sparsity.m}, got {blocksize}")
    blocks = find_blocks(model)
    for i, block in enumerate(blocks.layers):
        for name, layer in find_prunable(block).items():
            d_in = in_features(layer)
            if d_in % sparsity.m:
                raise D2PruneError(
                    f"N:M {sparsity} does not fit layer {blocks.prefix}.{i}.{name}: its input width {d_in} is not a multiple of {sparsity.m}"
                )


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """``||W X - W' X||^2 / ||W X||^2`` over the calibration inputs, from the
    (scaled) Gram matrix ``H`` of ``X``: ``tr(dW H dW^T) / tr(W H W^T)``."""
    dW = W - W_new
    num = float((dW @ H * dW).sum())
    den = float((W @ H * W).sum())
    return num / den if den > 0 else 0.0


class BlockObserver:
    """Forward hooks for one block's dense calibration pass.

    Linears reading the same tensor share one :class:`InputStats`. The groups
    are found on the first sample from tensor identity (its inputs are kept as
    copies until every member has declared which statistics it needs); from
    the second sample on, each group's statistics are updated inside the hook
    of its first member, as the references do. Output observers (every pruner
    listed for a Linear, e.g. one per search candidate) are fed in the hook.
    """

    def __init__(self, layers: dict[str, nn.Module], prunes: dict[str, list[LayerPruner]], device: torch.device,
                 extra_stats: tuple[str, ...], share: bool = True):
        self.layers, self.prunes, self.device, self.extra, self.share = layers, prunes, device, extra_stats, share
        self.first: dict[str, list[tuple[tuple, Tensor, Tensor]]] = {}  # sample 0: (key, input, copy) per call
        self.stats: dict[str, InputStats] = {}
        self.leaders: set[str] = set()

    def hooks(self):
        def make(name: str):
            watchers = [p for p in self.prunes[name] if p.wants_output]

            def hook(module, inp, out):
                x = inp[0].detach()
                if not self.stats:
                    # keep x itself alive too: a freed input's address could be reused by a later
                    # Linear's input within this forward, and identity keys would then collide
                    self.first.setdefault(name, []).append((self._key(x), x, x.clone()))
                elif name in self.leaders:
                    self.stats[name].update(x)
                if watchers:
                    y = (out[0] if isinstance(out, tuple) else out).detach()
                    for p in watchers:
                        p.observe_output(y)
            return hook
        return {m: make(n) for n, m in self.layers.items()}

    @staticmethod
    def _key(x: Tensor):
        return (x.data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)

    def end_sample(self) -> None:
        if self.stats:
            return
        self._group()
        for leader in self.leaders:
            for _, _, x in self.first.get(leader, []):
                self.stats[leader].update(x)
        self.first.clear()

    def _group(self) -> None:
        by_key: dict = {}
        for name in self.layers:
            calls = self.first.get(name)
            key = calls[0][0] if calls and self.share else ("own", name)
            by_key.setdefault(key, []).append(name)
        for names in by_key.values():
            kinds = set(self.extra)
            for n in names:
                for p in self.prunes[n]:
                    kinds.update(p.input_stats)
            st = InputStats(in_features(self.layers[names[0]]), self.device, kinds)
            self.leaders.add(names[0])
            for n in names:
                self.stats[n] = st
        if len(by_key) < len(self.layers):
            log.debug("shared input statistics: %s", [v for v in by_key.values() if len(v) > 1])


@torch.no_grad()
def calibrate(block: nn.Module, i: int, hidden: Tensor, inputs: BlockInputs, layers: dict[str, nn.Module],
              prunes: dict[str, list[LayerPruner]], extra: tuple[str, ...], nsamples: int | None = None,
              share: bool = True) -> BlockObserver:
    """Dense calibration pass of block ``i`` over ``hidden[:nsamples]``."""
    param = next(block.parameters(), None)  # statistics live with the block (activations may be offloaded)
    obs = BlockObserver(layers, prunes, param.device if param is not None else hidden.device, extra, share)
    with forward_hooks(obs.hooks()):
        for j in range(hidden.shape[0] if nsamples is None else nsamples):
            run_block(block, hidden[j:j + 1], inputs.calls[i][j], inputs)
            obs.end_sample()
    return obs


@torch.no_grad()
def prune_layers(layers: dict[str, nn.Module], prunes: dict[str, LayerPruner], stats: dict[str, InputStats],
                 qual: dict[str, str], tag: str = "") -> list[LayerReport]:
    """Prune every Linear with its wrapper; one report row per layer (logged,
    prefixed by ``tag``, e.g. the candidate of a search)."""
    rows = []
    for n, layer in layers.items():
        t1 = time.perf_counter()
        st = stats[n]
        for t in st.tensors():
            check_finite(t, f"the calibration statistics of {qual[n]}")
        W = weight_matrix(layer).float().clone()  # .float() aliases an fp32 weight
        W_new, _ = prunes[n].prune(W.clone(), st)
        set_weight_matrix(layer, W_new)
        err = relative_error(W, W_new, st["hessian"].H) if "hessian" in st else None
        achieved = float((weight_matrix(layer) == 0).sum()) / W.numel()
        row = LayerReport(qual[n], tuple(W.shape), achieved, err, time.perf_counter() - t1, prunes[n].label)
        rows.append(row)
        log.info("%s%-40s %-13s sparsity %.4f  error %s  %.2fs", tag, row.name, row.how, row.sparsity,
                 f"{row.error:.3e}" if row.error is not None else "-", row.seconds)
    return rows


def prune(model: nn.Module, config: PruneConfig, calibration: Tensor, heldout: Tensor | None = None,
          source: BlockSource | None = None, work: WorkFolder | None = None) -> PruneReport:
    """Prune every Linear of the model's decoder blocks, in place.

    ``calibration``: ``[N, L]`` token ids (see :func:`d2prune.data.sample_calibration`).
    ``heldout``: ``[H, L]`` token ids of text not used for calibration, needed
    only by searches that score candidates (D²Prune ``frozen="auto"``).
    Returns a :class:`PruneReport` with one row per layer.
    ``source``: where the blocks come from and the dtype they compute in
    (default: the model's own modules; fp32 compute for a half-precision model
    on a CPU). ``work``: a resume folder: every finished block is saved there
    and a rerun continues after the last one (see :mod:`d2prune.resume`).

    >>> from d2prune import PruneConfig, load_model, prune, sample_calibration, read_texts
    >>> model, tok, _ = load_model("../shared/models/stories260K")                # doctest: +SKIP
    >>> calib = sample_calibration(tok, read_texts("c4.jsonl"), 128, 256, seed=0)  # doctest: +SKIP
    >>> report = prune(model, PruneConfig(method="sparsegpt", sparsity="2:4"), calib)  # doctest: +SKIP
    >>> round(report.sparsity, 3)                                                  # doctest: +SKIP
    0.5
    """
    if not isinstance(config, PruneConfig):
        raise D2PruneError(f"config must be a PruneConfig, not {type(config).__name__}")
    if not (isinstance(calibration, Tensor) and calibration.dim() == 2 and calibration.shape[0] > 0):
        raise D2PruneError("calibration must be a [nsamples, seqlen] tensor of token ids")
    t_start = time.perf_counter()
    device = pick_device(config.device)
    sparsity: Sparsity = config.sparsity  # type: ignore[assignment]
    blocks = source.blocks if source is not None else find_blocks(model)
    if source is None:
        source = BlockSource(blocks, compute_dtype_for(device, next(model.parameters()).dtype))
    validate_pattern(model, sparsity, getattr(config.method, "blocksize", None))
    method = build_method(config.method, sparsity)  # type: ignore[arg-type]
    report = PruneReport(config=to_dict(config))
    model.eval()
    method.prepare(model, calibration, device)
    extra = ("hessian",) if config.layer_error else ()
    driver = method.driver()
    if driver is not None and sparsity.ratio > 0:  # a search over the engine (e.g. D2Prune auto / per-layer)
        driver(model, method, blocks, calibration, heldout, device, config, report)
        report.seconds = time.perf_counter() - t_start
        return report
    timers = {"calib": 0.0}

    @torch.no_grad()
    def step(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        if sparsity.ratio == 0:  # nothing to prune: keep the weights bit-identical
            propagate(block, i, inputs)
            return
        layers = find_prunable(block)
        qual = {n: f"{blocks.prefix}.{i}.{n}" for n in layers}
        method.begin_block(i, block, layers)
        prunes = {n: method.layer(qual[n], m, i) for n, m in layers.items()}
        t0 = time.perf_counter()
        obs = calibrate(block, i, inputs.hidden, inputs, layers, {n: [p] for n, p in prunes.items()}, extra,
                        share=config.share_inputs)
        timers["calib"] += time.perf_counter() - t0
        report.layers.extend(prune_layers(layers, prunes, obs.stats, qual))
        del obs
        propagate(block, i, inputs)
        check_finite(inputs.hidden, f"the outputs of pruned block {i}")

    start, after = 0, None
    if work is not None and sparsity.ratio > 0:
        start = report.resumed_from = work.begin(len(blocks))
        for i in range(start):
            source.restore(i, work.block_path(i))
        report.layers.extend(LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in work.state["rows"])
        method.load_state(work.state["method"])

        def after(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            work.write_block(i, block_tensors(block, f"{blocks.prefix}.{i}"))
            source.saved(i, work.block_path(i))  # a streamed model reads its pruned block back from there
            work.commit(i + 1, [to_dict(r) for r in report.layers], method.state())

    sequential(model, calibration, device, step, desc="block", blocks=blocks, source=source, start=start, after=after)
    report.seconds = time.perf_counter() - t_start
    report.calib_forward_seconds = timers["calib"]
    report.method = method.summary()
    return report
