"""``prune(model, config, calibration)``: the public entry point.

Per block (see :mod:`d2prune.engine.sequential`): dense calibration pass with hooks ->
every Linear pruned by the method's wrapper -> propagation pass, with the
pieces of :mod:`d2prune.engine.calibration`. A method whose config asks for a search
over candidate settings (D²Prune ``frozen="auto"`` / ``"per-layer"``) is
driven by the :class:`~d2prune.engine.calibration.CandidateSearch` registered for
it instead of the plain loop; both return a
:class:`~d2prune.engine.calibration.PruneOutcome`, turned here into the report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .methods.d2prune import search as _selection  # noqa: F401  (registers D²Prune's searches)
from .engine.calibration import (IGNORED, CalibrationOptions, LayerReport, PruneOutcome, PruneRun, calibrate,
                                 find_search, prune_layers, resume_point, save_block)
from .config import PruneConfig, Sparsity, to_dict
from .engine.sequential import BlockInputs, check_finite, propagate, sequential
from .engine.expert_groups import grouped_modules, prune_block_in_groups
from .engine.expert_drop import ExpertDrop, check_drop, drop_block_experts
from .io.source import BlockSource
from .errors import D2PruneError
from .engine.method import Method, build_method
from .io.modeling import compute_dtype_for, find_blocks, find_prunable, in_features, is_image_model, pick_device
from .io.experts import unfused
from .io.inventory import UNPRUNED_REASONS, check_blocks, summarize
from .io.resume import WorkFolder

log = logging.getLogger(__name__)

__all__ = ["LayerReport", "PruneReport", "prune", "validate_pattern"]


@dataclass
class PruneReport:
    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calib_forward_seconds: float = 0.0
    method: dict = field(default_factory=dict)
    resumed_from: int = 0  # first block pruned by this call (> 0: an interrupted run was resumed)
    unpruned: list[dict] = field(default_factory=list)  # block tensors left as they are, with their reasons
    dropped_experts: list[dict] = field(default_factory=list)  # whole experts removed, per MoE layer (--drop-experts)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the weights of the pruned Linears (the
        layers kept dense by ``targets`` / ``ignore`` not counted)."""
        return _weighted_sparsity([r for r in self.layers if r.how not in UNPRUNED_REASONS])

    @property
    def overall_sparsity(self) -> float:
        """Achieved sparsity over every weight of two or more dimensions in the
        decoder blocks (per-expert matrices, routers and layers kept dense
        included): the share of the blocks' weights that is zero."""
        return _weighted_sparsity(self.layers)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "method_summary": self.method,
            "sparsity": self.sparsity,
            "overall_sparsity": self.overall_sparsity,
            "seconds": self.seconds,
            "calib_forward_seconds": self.calib_forward_seconds,
            "unpruned": self.unpruned,
            "dropped_experts": self.dropped_experts,
            "layers": [to_dict(r) for r in self.layers],
        }


def _weighted_sparsity(rows: list[LayerReport]) -> float:
    total = sum(math.prod(r.shape) for r in rows)
    return sum(r.sparsity * math.prod(r.shape) for r in rows) / max(total, 1)


def validate_pattern(model: nn.Module, sparsity: Sparsity, blocksize: int | None = None, prunes=None) -> None:
    """N:M needs M to divide every pruned layer's input width (and, for the
    column-block methods, the block size): fail before any work is done.
    ``prunes(full module name)``: the layers pruned (default: all)."""
    if not sparsity.is_nm:
        return
    if blocksize is not None and blocksize % sparsity.m:
        raise D2PruneError(f"N:M {sparsity} needs a blocksize divisible by {sparsity.m}, got {blocksize}")
    blocks = find_blocks(model)
    for i, block in enumerate(blocks.layers):
        for name, layer in find_prunable(block).items():
            if prunes is not None and not prunes(f"{blocks.prefix}.{i}.{name}"):
                continue
            d_in = in_features(layer)
            if d_in % sparsity.m:
                raise D2PruneError(
                    f"N:M {sparsity} does not fit layer {blocks.prefix}.{i}.{name}: its input width {d_in} is not a multiple of {sparsity.m}"
                )


def prune_blocks(run: PruneRun, method: Method, sparsity: Sparsity) -> PruneOutcome:
    """The plain loop: every block calibrated, pruned by ``method`` and
    propagated in turn; with ``run.work``, every finished block is saved and an
    interrupted run continues after the last one saved."""
    out = PruneOutcome()
    grouped: set[int] = set()  # blocks whose experts went in groups (their work file is written already)

    @torch.no_grad()
    def step(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        if run.drop is not None:  # whole experts first; the rest is pruned on the reduced layer's routing
            run.drops.extend(drop_block_experts(run.model, block, i, inputs, run.options.batch, run.drop))
        if sparsity.ratio == 0:  # nothing to prune: keep the weights bit-identical
            propagate(block, i, inputs)
            return
        if grouped_modules(block):  # experts too large for RAM at once: a group at a time, written as done
            timing = {"calib": 0.0}
            out.layers.extend(prune_block_in_groups(run, method, i, block, inputs, timing))
            out.calib_seconds += timing["calib"]
            grouped.add(i)
            check_finite(inputs.hidden, f"the outputs of pruned block {i}")
            return
        layers = run.layers(block, i)
        if not layers.layers:  # every Linear of the block kept dense (--ignore / --targets)
            out.layers.extend(layers.with_ignored([]))
            propagate(block, i, inputs, run.options.batch)
            return
        pruners = layers.pruners(method, block)
        t0 = time.perf_counter()
        obs = calibrate(block, layers, inputs, {n: [p] for n, p in pruners.items()}, run.options)
        out.calib_seconds += time.perf_counter() - t0
        out.layers.extend(prune_layers(layers, pruners, obs.stats))
        del obs
        propagate(block, i, inputs, run.options.batch)
        check_finite(inputs.hidden, f"the outputs of pruned block {i}")

    def after(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        save_block(run, i, block, out.layers, method.state(), written=i in grouped)

    changes = sparsity.ratio > 0 or run.drop is not None  # the blocks are saved (and resumable) when they change
    if changes:
        out.resumed_from = resume_point(run, method, out.layers)
    sequential(run.model, run.calibration, run.device, step, desc="block", blocks=run.blocks, source=run.source,
               start=out.resumed_from, after=after if run.work is not None and changes else None,
               batch=run.options.batch)  # finished blocks of a resumed run propagate as step() did
    out.summary = method.summary()
    return out


def prune(model: nn.Module, config: PruneConfig, calibration: Tensor, heldout: Tensor | None = None,
          source: BlockSource | None = None, work: WorkFolder | None = None,
          heldout_labels: Tensor | None = None) -> PruneReport:
    """Prune every Linear of the model's decoder blocks (or those
    ``config.targets`` / ``config.ignore`` select), in place.

    ``calibration``: ``[N, L]`` token ids (see :func:`d2prune.io.data.sample_calibration`).
    ``heldout``: ``[H, L]`` token ids of text not used for calibration, needed
    only by searches that score candidates (D²Prune ``frozen="auto"``).
    An image classifier (ViT, DeiT) takes pixel values ``[N, C, H, W]``
    instead (:func:`d2prune.evaluation.vision.calibration_images`); its held-out images
    are scored by cross-entropy against ``heldout_labels`` ``[H]``.
    Returns a :class:`PruneReport` with one row per layer.
    ``source``: where the blocks come from and the dtype they compute in
    (default: the model's own modules; fp32 compute for a half-precision model
    on a CPU). ``work``: a resume folder: every finished block is saved there
    and a rerun continues after the last one (see :mod:`d2prune.io.resume`).

    >>> from d2prune import PruneConfig, load_model, prune, sample_calibration, read_texts
    >>> model, tok, _ = load_model("../shared/models/stories260K")                # doctest: +SKIP
    >>> calib = sample_calibration(tok, read_texts("c4.jsonl"), 128, 256, seed=0)  # doctest: +SKIP
    >>> report = prune(model, PruneConfig(method="sparsegpt", sparsity="2:4"), calib)  # doctest: +SKIP
    >>> round(report.sparsity, 3)                                                  # doctest: +SKIP
    0.5
    """
    if not isinstance(config, PruneConfig):
        raise D2PruneError(f"config must be a PruneConfig, not {type(config).__name__}")
    # fused MoE experts seen as per-expert Linears for the whole run (their weights are views of the
    # 3-D parameters, so nothing needs copying back)
    with unfused(model):
        return _prune(model, config, calibration, heldout, source, work, heldout_labels)


def _prune(model: nn.Module, config: PruneConfig, calibration: Tensor, heldout: Tensor | None,
           source: BlockSource | None, work: WorkFolder | None, heldout_labels: Tensor | None) -> PruneReport:
    image = is_image_model(model)
    if not (isinstance(calibration, Tensor) and calibration.dim() == (4 if image else 2) and calibration.shape[0] > 0):
        raise D2PruneError("calibration must be a [nsamples, channels, height, width] tensor of pixel values" if image
                           else "calibration must be a [nsamples, seqlen] tensor of token ids")
    if image and heldout is not None and (heldout_labels is None or heldout_labels.shape[0] != heldout.shape[0]):
        raise D2PruneError("held-out images need their labels (one per image) to score candidates by cross-entropy")
    t_start = time.perf_counter()
    device = pick_device(config.device)
    sparsity: Sparsity = config.sparsity  # type: ignore[assignment]
    blocks = source.blocks if source is not None else find_blocks(model)
    if source is None:
        source = BlockSource(blocks, compute_dtype_for(device, next(model.parameters()).dtype))
    # --targets / --ignore checked against every block Linear's full name (a pattern matching none is an error)
    config.select([f"{blocks.prefix}.{i}.{n}" for i, b in enumerate(blocks.layers) for n in find_prunable(b)])
    # every block tensor is pruned or left for a documented reason; weights of a kind d2prune does not
    # know (a new experts layout) refuse the run here, before any weight is read
    unpruned = check_blocks(blocks, type(model).__name__, lambda i: {
        n for n in find_prunable(blocks[i]) if not config.prunes(f"{blocks.prefix}.{i}.{n}")})
    validate_pattern(model, sparsity, config.method.column_block, config.prunes)
    drop = ExpertDrop(config.drop_experts, config.expert_score) if config.drop_experts is not None else None
    if drop is not None:
        check_drop(model, blocks, drop)  # before any weight is read
    method = build_method(config.method, sparsity)  # type: ignore[arg-type]
    if config.method.whole_model_bytes_per_weight and any(p.is_meta for p in blocks[0].parameters()):
        weights = sum(p.numel() for b in blocks.layers for p in b.parameters())
        raise D2PruneError(
            f"{config.method.name} takes gradients through the whole model at once: it needs the model in memory "
            f"plus {config.method.whole_model_bytes_per_weight * weights / 1e9:.1f} GB of gradient statistics; "
            "use --stream off on a machine where that fits, or another method")
    if drop is not None and sparsity.ratio > 0 and find_search(method) is not None:
        raise D2PruneError(f"--drop-experts with {config.method.name}'s search over candidates: each candidate would "
                           "drop other experts; give --frozen q, k, v or none")
    if drop is not None and config.method.whole_model_bytes_per_weight:
        raise D2PruneError(f"--drop-experts with {config.method.name}: its gradients are taken through the whole "
                           "model before any expert is dropped; use another method")
    model.eval()
    method.prepare(model, calibration, device)
    run = PruneRun(model, blocks, source, calibration, heldout, device, CalibrationOptions.of(config), work,
                   heldout_labels, config.prunes if config.targets or config.ignore else None, drop)
    # a streamed block too large for RAM has its experts read, pruned and written in groups (docs/moe.md §4)
    in_groups = any(getattr(source, "in_groups", lambda i: {})(i) for i in range(len(blocks)))
    if drop is not None:
        if in_groups:
            raise D2PruneError("--drop-experts needs each MoE block's experts whole, and this model's are read in "
                               "groups: use a machine where one block fits")
    if in_groups and config.allocation == "owl" and sparsity.ratio > 0:
        raise D2PruneError("--allocation owl scores every block whole before pruning, and this model's experts are "
                           "read in groups: use --allocation uniform")
    allocation = None
    if config.allocation == "owl" and sparsity.ratio > 0:
        # one dense pass before any block is pruned (a resumed run recomputes it from the dense
        # model, before its finished blocks are restored: the same allocation, deterministically)
        from .engine.allocation import owl_allocation

        allocation = owl_allocation(run, sparsity, config.owl_m, config.owl_lambda)
        method.block_sparsity = {i: allocation.sparsity(i) for i in range(len(blocks))}
    search = find_search(method) if sparsity.ratio > 0 else None  # after the allocation: candidates copy it
    if search is not None and in_groups:
        raise D2PruneError(f"{config.method.name} with this setting prunes every block several times (a search over "
                           "candidates), and this model's experts are read in groups: give --frozen q, k, v or none")
    outcome = search.run(run) if search is not None else prune_blocks(run, method, sparsity)
    if allocation is not None:
        outcome.summary["allocation"] = allocation.to_dict()
    return PruneReport(config=to_dict(config), layers=outcome.layers, seconds=time.perf_counter() - t_start,
                       calib_forward_seconds=outcome.calib_seconds, method=outcome.summary,
                       resumed_from=outcome.resumed_from, unpruned=summarize(unpruned, blocks.prefix),
                       dropped_experts=run.drops)
