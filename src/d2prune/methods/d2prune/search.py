"""Choosing which q/k/v projections D²Prune leaves un-updated (docs/method.md §4).

Two :class:`~d2prune.engine.calibration.CandidateSearch` es registered for
:class:`~d2prune.config.D2PruneConfig`; both drive the same engine primitives
as a plain prune (capture, calibrate, prune_layers, run_block) and neither
changes the engine:

* :class:`AutoSearch` (``frozen="auto"``) - the paper's perplexity-guided
  search, done soundly: the model is pruned under each candidate (freeze q, k
  or v) and each is scored by perplexity on **held-out calibration text** (C4
  documents not used for calibration; never the evaluation set, which the
  paper used). The candidates run in lock-step over the blocks, sharing what
  they can: the tokenised data, the captured inputs of block 0, and block 0's
  calibration pass and statistics (one Hessian and one Cholesky per input for all).
* :class:`PerLayerSearch` (``frozen="per-layer"``) - eq 12 block by block: for
  each block choose the frozen projection minimising the block's output
  reconstruction error ``||B~(X) - B(X)||^2 / ||B(X)||^2`` plus ``rho`` times
  the mean ``KL(attn~ || attn)`` of its attention rows, on the calibration
  data, then propagate with the chosen one.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...engine import distributed
from ...evaluation.attention import TINY, find_attention, kl_rows, run_with_attention
from ...engine.calibration import (BlockLayers, CandidateSearch, LayerReport, PruneOutcome, PruneRun, block_of, block_shapes, calibrate, prune_layers, register_search, resume_point, save_block, usable_blocks)
from .config import D2_CANDIDATES, D2PruneConfig
from ...config import to_dict
from ...engine.sequential import BlockInputs, check_finite, propagate, run_block, run_head, sequential
from ...io.source import load_block_shard
from ...errors import D2PruneError
from ...evaluation.perplexity import window_nll
from ...evaluation.vision import image_loss
from ...engine.method import LayerPruner
from .method import D2Prune
from ...io.modeling import eager_attention
from ...io.resume import WorkFolder
from ...io.streaming import block_tensors

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One way of pruning the model in a search (freeze ``name``), and what it has produced so far."""

    name: str
    method: D2Prune
    rows: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    hidden: Tensor | None = None  # auto: this candidate's activations (calibration, then held-out windows)

    @property
    def tag(self) -> str:
        return f"[candidate: freeze {self.name}] "


class D2Search(CandidateSearch):
    """A search over which of q/k/v D²Prune freezes, for ``frozen=strategy``."""

    config_type = D2PruneConfig
    strategy: ClassVar[str]

    @classmethod
    def applies(cls, config: D2PruneConfig) -> bool:
        return config.frozen == cls.strategy

    def __init__(self, method: D2Prune):
        super().__init__(method)
        self.candidates = {c: Candidate(c, method.with_frozen(c)) for c in D2_CANDIDATES}


# --------------------------------------------------------------------------- auto
@register_search
class AutoSearch(D2Search):
    """Prune under each candidate in lock-step; keep the lowest held-out perplexity."""

    strategy = "auto"

    def __init__(self, method: D2Prune):
        super().__init__(method)
        self.shared_seconds = 0.0  # block 0's calibration pass, shared by every candidate

    def run(self, run: PruneRun) -> PruneOutcome:
        held = run.heldout
        if held is None or held.numel() == 0:
            raise D2PruneError("--frozen auto scores candidates on held-out text: give held-out windows "
                               "(the CLI takes them from calibration documents not used as samples)")
        if held.shape[1:] != run.calibration.shape[1:]:
            raise D2PruneError(f"held-out samples have shape {tuple(held.shape[1:])}, calibration "
                               f"{tuple(run.calibration.shape[1:])}: use one seqlen")
        t_start = time.perf_counter()
        # every candidate's pruned blocks are spilled to disk, never held in RAM: the resume folder of the
        # run, or a temporary one when the run has none
        self.work = run.work or WorkFolder.temporary("d2prune-auto-", {})
        try:
            self.start = self._resume(run)
            with self.work.reading():
                chosen, summary = self.work.state.get("chosen"), self.work.state.get("summary")
                if chosen is not None:
                    if chosen not in self.candidates:
                        raise ValueError(f"chosen candidate {chosen!r}")
                    ppl = {k: round(v, 3) for k, v in summary["heldout_ppl"].items()}
            if chosen is None:
                summary = self._search(run, held, t_start)
                chosen = summary["chosen"]
                # the choice is committed before the chosen blocks are renamed: a run killed from here on
                # (renaming, evaluating, saving) resumes with that choice instead of searching again
                self._commit(len(run.blocks) - 1, {"chosen": chosen, "summary": summary})
                log.info("auto: held-out ppl %s -> freeze %s (%.1fx the cost of one prune)",
                         {k: round(v, 3) for k, v in summary["heldout_ppl"].items()}, chosen,
                         summary["cost_vs_one_prune"] or 0)
            else:
                log.info("auto: resuming after the search, which chose freeze %s (held-out ppl %s)", chosen, ppl)
            self._keep(run, chosen)
        finally:
            if run.work is None:
                self.work.remove()
        return PruneOutcome(self.candidates[chosen].rows, summary, resumed_from=self.start)

    def _search(self, run: PruneRun, held: Tensor, t_start: float) -> dict:
        """Every candidate pruned block by block, then scored on the held-out
        windows; the summary for ``d2prune.json``, the choice in ``chosen``."""
        inputs = sequential(run.model, torch.cat([run.calibration, held]), run.device,
                            lambda i, block, inputs: self._step(run, i, block, inputs), desc="auto block",
                            blocks=run.blocks, source=run.source)
        loop_seconds = time.perf_counter() - t_start
        scores = {c: self._heldout_ppl(run, cand, inputs) for c, cand in self.candidates.items()}
        best = min(scores, key=scores.get)
        total = time.perf_counter() - t_start
        secs = {c: cand.seconds for c, cand in self.candidates.items()}
        capture = loop_seconds - sum(secs.values()) - self.shared_seconds
        one_prune = capture + self.shared_seconds + sum(secs.values()) / len(secs)  # what a fixed choice would cost
        return {
            **self.candidates[best].method.summary(), "frozen": "auto", "chosen": best,
            "heldout_ppl": scores, "heldout_windows": int(held.shape[0]),
            "seconds_per_candidate": secs, "shared_seconds": capture + self.shared_seconds,
            "total_seconds": total, "cost_vs_one_prune": total / one_prune if one_prune > 0 else None,
        }

    def _keep(self, run: PruneRun, best: str) -> None:
        """The chosen candidate's blocks become the run's blocks (``block-00007``,
        what the output is written from); the others' files are dropped. Safe
        to repeat: a rerun after a kill finds some blocks already renamed."""
        if not self.work.writer:  # another process of a torchrun job keeps nothing: rank 0 writes the output
            return
        for i in range(len(run.blocks)):
            if self.work.block_path(i, best).exists():
                os.replace(self.work.block_path(i, best), self.work.block_path(i))
            why = self.work.damaged(i, block_shapes(run, i))
            if why:
                raise D2PruneError(f"{why}: the pruned blocks of this --out cannot be recovered; rerun with "
                                   "--restart to prune again")
            for c in self.candidates:
                if c != best:
                    self.work.block_path(i, c).unlink(missing_ok=True)
        for i in range(len(run.blocks)):
            run.source.restore(i, self.work.block_path(i))

    def _resume(self, run: PruneRun) -> int:
        """An interrupted search continues after its last block finished by
        every candidate (their rows, choices and times are in the state); a
        block whose file of any candidate is missing or damaged, and every
        block after it, is pruned again."""
        start = self.work.begin(len(run.blocks))
        if start and "chosen" not in self.work.state:
            start = usable_blocks(run, start, tuple(self.candidates))
        with self.work.reading():
            saved = self.work.state.get("candidates", {})
            for c, cand in self.candidates.items():
                if c in saved:
                    cand.rows.extend(r for r in (LayerReport(**{**r, "shape": tuple(r["shape"])})
                                                 for r in saved[c]["rows"]) if block_of(r, run.blocks.prefix) < start)
                    cand.method.load_state(saved[c]["method"])
                    cand.seconds = saved[c]["seconds"]
        return start

    def _commit(self, i: int, extra: dict | None = None) -> None:
        self.work.commit(i + 1, [], {}, {"candidates": {
            c: {"rows": [to_dict(r) for r in cand.rows], "method": cand.method.state(), "seconds": cand.seconds}
            for c, cand in self.candidates.items()}, **(extra or {})})

    @torch.no_grad()
    def _step(self, run: PruneRun, i: int, block: nn.Module, inputs: BlockInputs) -> None:
        n_calib = run.calibration.shape[0]
        layers = run.layers(block, i)
        resumed = i < self.start  # finished before an interruption: only recompute the activations
        dense = layers.weights()
        if not resumed:
            pruners = {c: layers.pruners(cand.method, block) for c, cand in self.candidates.items()}
        if i == 0 and not resumed:  # identical inputs for every candidate: one calibration pass, shared statistics
            t0 = time.perf_counter()
            shared = calibrate(block, layers, inputs, {n: [p[n] for p in pruners.values()] for n in layers.layers},
                               run.options, nsamples=n_calib)
            self.shared_seconds += time.perf_counter() - t0
        for k, (c, cand) in enumerate(self.candidates.items()):
            t0 = time.perf_counter()
            if i == 0:
                src = inputs.hidden
                last = k == len(self.candidates) - 1
                dst = inputs.hidden if last else inputs.new_buffer()  # the last one reuses the capture buffer
            else:
                src = dst = cand.hidden
            if resumed:
                load_block_shard(block, f"{run.blocks.prefix}.{i}", self.work.block_path(i, c))
            else:
                layers.load(dense)
                obs = shared if i == 0 else calibrate(block, layers, inputs, {n: [pruners[c][n]] for n in layers.layers},
                                                      run.options, hidden=src, nsamples=n_calib)
                cand.rows.extend(prune_layers(layers, pruners[c], obs.stats, tag=cand.tag))
                self.work.write_block(i, block_tensors(block, f"{run.blocks.prefix}.{i}"), tag=c)
            for j in range(src.shape[0]):  # calibration AND held-out windows
                dst[j:j + 1] = run_block(block, src[j:j + 1], inputs.calls[i][j], inputs)
            check_finite(dst, f"the outputs of pruned block {i} (frozen {c})")
            cand.hidden = dst
            if not resumed:
                cand.seconds += time.perf_counter() - t0
        if not resumed:
            self._commit(i)

    def _heldout_ppl(self, run: PruneRun, cand: Candidate, inputs: BlockInputs) -> float:
        held, labels, nll = run.heldout, run.heldout_labels, []

        def score(j: int, logits: Tensor) -> None:  # next-token NLL of a window; an image's cross-entropy
            nll.append(window_nll(logits, held[j:j + 1]) if labels is None else image_loss(logits, labels[j:j + 1]))

        run_head(run.model, held, cand.hidden[run.calibration.shape[0]:], run.device, score, inputs, run.blocks,
                 run.source)
        total, count = distributed.all_sum([sum(nll), len(nll)])  # every process scores its share of the windows
        return math.exp(total / count)


# --------------------------------------------------------------------------- per-layer (eq 12)
@dataclass
class BlockChoice:
    """Eq 12's terms for each candidate of one block, and the choice."""

    frozen: str
    objective: dict[str, float]
    block_error: dict[str, float]
    attention_kl: dict[str, float]


@dataclass
class _Trial:
    """A candidate pruned on a copy of the dense block."""

    block: nn.Module
    attention: nn.Module
    rows: list[LayerReport]
    squared_error: float = 0.0  # sum ||B~(X) - B(X)||^2
    kl: float = 0.0             # sum over attention rows of KL(attn~ || attn)


@register_search
class PerLayerSearch(D2Search):
    """Eq 12 block by block: min over q/k/v of block error + rho * attention KL."""

    strategy = "per-layer"

    def __init__(self, method: D2Prune):
        super().__init__(method)
        self.rho = method.config.rho
        self.choices: dict[int, BlockChoice] = {}
        self.rows: list[LayerReport] = []

    def run(self, run: PruneRun) -> PruneOutcome:
        start = resume_point(run, self.method, self.rows)
        if run.work is not None:
            with run.work.reading():
                self.choices.update({int(i): BlockChoice(**c) for i, c in run.work.state.get("choices", {}).items()
                                     if int(i) < start})
        with eager_attention(run.model):  # explicit masks and attention probabilities
            sequential(run.model, run.calibration, run.device, lambda i, block, inputs: self._step(run, i, block, inputs),
                       desc="per-layer block", blocks=run.blocks, source=run.source, start=start)
        per_block = {str(i): asdict(c) for i, c in sorted(self.choices.items())}
        summary = {"variant": self.method.config.variant, "frozen": "per-layer", "rho": self.rho,
                   "frozen_per_block": {k: [v["frozen"]] for k, v in per_block.items()}, "per_block": per_block}
        return PruneOutcome(self.rows, summary, resumed_from=start)

    @torch.no_grad()
    def _step(self, run: PruneRun, i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = run.layers(block, i)  # the block stays dense until the choice is copied in
        pruners = {c: layers.pruners(cand.method, block) for c, cand in self.candidates.items()}
        obs = calibrate(block, layers, inputs, {n: [p[n] for p in pruners.values()] for n in layers.layers},
                        run.options)
        trials = {c: self._trial(run, block, i, pruners[c], obs.stats, cand.tag)
                  for c, cand in self.candidates.items()}
        del obs
        choice = self._choose(block, i, inputs, trials)
        self.choices[i] = choice
        layers.load(run.layers(trials[choice.frozen].block, i).weights())
        self.rows.extend(trials[choice.frozen].rows)
        log.info("block %d: per-layer objective %s -> freeze %s", i,
                 {k: f"{v:.4g}" for k, v in choice.objective.items()}, choice.frozen)
        del trials
        propagate(block, i, inputs)
        check_finite(inputs.hidden, f"the outputs of pruned block {i}")
        save_block(run, i, block, self.rows, {}, {"choices": {str(k): asdict(c) for k, c in self.choices.items()}})

    @staticmethod
    def _trial(run: PruneRun, block: nn.Module, i: int, pruners: dict[str, LayerPruner], stats, tag: str) -> _Trial:
        pruned = copy.deepcopy(block)
        rows = prune_layers(run.layers(pruned, i), pruners, stats, tag=tag)
        return _Trial(pruned, find_attention(pruned), rows)

    def _choose(self, block: nn.Module, i: int, inputs: BlockInputs, trials: dict[str, _Trial]) -> BlockChoice:
        dense_attention = find_attention(block, f" (block {i})")
        dense_sq, attention_rows = 0.0, 0
        for j in range(inputs.hidden.shape[0]):
            x, call = inputs.hidden[j:j + 1], inputs.calls[i][j]
            y_dense, p_dense, _ = run_with_attention(block, dense_attention, x, call, inputs)
            dense_sq += float((y_dense.float() ** 2).sum())
            attention_rows += p_dense.shape[0] * p_dense.shape[1] * p_dense.shape[2]
            for t in trials.values():
                y, p, _ = run_with_attention(t.block, t.attention, x, call, inputs)
                t.squared_error += float(((y.float() - y_dense.float()) ** 2).sum())
                t.kl += float(kl_rows(p, p_dense).sum())
        names = list(trials)  # sums over every process's samples
        sums = distributed.all_sum([dense_sq, attention_rows, *(trials[c].squared_error for c in names),
                                    *(trials[c].kl for c in names)])
        dense_sq, attention_rows = sums[0], sums[1]
        for k, c in enumerate(names):
            trials[c].squared_error, trials[c].kl = sums[2 + k], sums[2 + len(names) + k]
        error = {c: t.squared_error / max(dense_sq, TINY) for c, t in trials.items()}
        kl = {c: t.kl / max(attention_rows, 1) for c, t in trials.items()}
        objective = {c: t.squared_error / max(dense_sq, TINY) + self.rho * t.kl / max(attention_rows, 1)
                     for c, t in trials.items()}
        return BlockChoice(min(objective, key=objective.get), objective, error, kl)
