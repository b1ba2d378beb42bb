"""Choosing which q/k/v projections D²Prune leaves un-updated (docs/method.md §4).

Both searches drive the same engine primitives as a plain prune (capture,
calibrate, prune_layers, run_block); neither changes the engine.

* :func:`prune_auto` - the paper's perplexity-guided search, done soundly: the
  model is pruned under each candidate (freeze q, k or v) and each is scored
  by perplexity on **held-out calibration text** (C4 documents not used for
  calibration; never the evaluation set, which the paper used). The
  candidates run in lock-step over the blocks, sharing what they can: the
  tokenised data, the captured inputs of block 0, and block 0's calibration
  pass and statistics (one Hessian and one Cholesky per input for all).
* :func:`prune_per_layer` - eq 12 block by block: for each block choose the
  frozen projection minimising the block's output reconstruction error
  ``||B~(X) - B(X)||^2 / ||B(X)||^2`` plus ``rho`` times the mean
  ``KL(attn~ || attn)`` of its attention rows, on the calibration data, then
  propagate with the chosen one.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
from torch import Tensor, nn

from .attention import find_attention, kl_rows, run_with_attention
from .engine import BlockInputs, check_finite, propagate, run_block, run_head, sequential
from .errors import D2PruneError
from .evaluate import window_nll
from .modeling import eager_attention, find_prunable, set_weight_matrix, weight_matrix
from .pruning import calibrate, prune_layers

log = logging.getLogger(__name__)

CANDIDATES = ("q", "k", "v")


def _restore(layers: dict[str, nn.Module], weights: dict[str, Tensor]) -> None:
    for n, m in layers.items():
        set_weight_matrix(m, weights[n])


def _engine_options(config) -> tuple[tuple[str, ...], bool]:
    return (("hessian",) if config.layer_error else ()), config.share_inputs


def prune_auto(model, method, blocks, calibration: Tensor, heldout: Tensor | None, device, config, report) -> None:
    """Prune under each candidate in lock-step; keep the lowest held-out ppl."""
    extra, share = _engine_options(config)
    if heldout is None or heldout.numel() == 0:
        raise D2PruneError("--frozen auto scores candidates on held-out text: give held-out windows "
                           "(the CLI takes them from calibration documents not used as samples)")
    if heldout.shape[1] != calibration.shape[1]:
        raise D2PruneError(f"held-out windows have {heldout.shape[1]} tokens, calibration {calibration.shape[1]}: use one seqlen")
    t_start = time.perf_counter()
    n_cal = calibration.shape[0]
    methods = {c: method.with_frozen(c) for c in CANDIDATES}
    hidden: dict[str, Tensor] = {}
    weights: dict[str, dict[int, dict[str, Tensor]]] = {c: {} for c in CANDIDATES}
    rows: dict[str, list] = {c: [] for c in CANDIDATES}
    secs = {c: 0.0 for c in CANDIDATES}
    shared = {"seconds": 0.0}

    @torch.no_grad()
    def step(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = find_prunable(block)
        qual = {n: f"{blocks.prefix}.{i}.{n}" for n in layers}
        dense = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
        prunes = {}
        for c in CANDIDATES:
            methods[c].begin_block(i, block, layers)
            prunes[c] = {n: methods[c].layer(qual[n], m, i) for n, m in layers.items()}
        if i == 0:  # identical inputs for every candidate: one calibration pass, shared statistics
            t0 = time.perf_counter()
            shared_obs = calibrate(block, i, inputs.hidden, inputs, layers,
                                   {n: [prunes[c][n] for c in CANDIDATES] for n in layers}, extra, n_cal, share)
            shared["seconds"] += time.perf_counter() - t0
        for k, c in enumerate(CANDIDATES):
            t0 = time.perf_counter()
            _restore(layers, dense)
            if i == 0:
                obs, src = shared_obs, inputs.hidden
                last = k == len(CANDIDATES) - 1
                dst = inputs.hidden if last else inputs.new_buffer()  # the last one reuses the capture buffer
            else:
                src = dst = hidden[c]
                obs = calibrate(block, i, src, inputs, layers, {n: [prunes[c][n]] for n in layers}, extra, n_cal, share)
            rows[c].extend(prune_layers(layers, prunes[c], obs.stats, qual, tag=f"[candidate: freeze {c}] "))
            weights[c][i] = {n: weight_matrix(m).detach().to("cpu", copy=True) for n, m in layers.items()}
            for j in range(src.shape[0]):  # calibration AND held-out windows
                dst[j:j + 1] = run_block(block, src[j:j + 1], inputs.calls[i][j], inputs)
            check_finite(dst, f"the outputs of pruned block {i} (frozen {c})")
            hidden[c] = dst
            secs[c] += time.perf_counter() - t0
        del dense

    t_cap = time.perf_counter()
    inputs = sequential(model, torch.cat([calibration, heldout]), device, step, desc="auto block", blocks=blocks)
    capture_and_loop = time.perf_counter() - t_cap
    scores = {}
    for c in CANDIDATES:
        nll: list[float] = []
        run_head(model, heldout, hidden[c][n_cal:], device, lambda j, lg: nll.append(window_nll(lg, heldout[j:j + 1])),
                 inputs, blocks)
        scores[c] = math.exp(sum(nll) / len(nll))
    best = min(scores, key=scores.get)
    for i, block in enumerate(blocks.layers):
        layers = find_prunable(block)
        for n, m in layers.items():
            set_weight_matrix(m, weights[best][i][n].to(m.weight.device))
    report.layers.extend(rows[best])
    total = time.perf_counter() - t_start
    capture = capture_and_loop - sum(secs.values()) - shared["seconds"]
    one_prune = capture + shared["seconds"] + sum(secs.values()) / len(secs)  # what a fixed choice would have cost
    report.method = {
        **methods[best].summary(), "frozen": "auto", "chosen": best,
        "heldout_ppl": scores, "heldout_windows": int(heldout.shape[0]),
        "seconds_per_candidate": secs, "shared_seconds": capture + shared["seconds"],
        "total_seconds": total, "cost_vs_one_prune": total / one_prune if one_prune > 0 else None,
    }
    log.info("auto: held-out ppl %s -> freeze %s (%.1fx the cost of one prune)",
             {k: round(v, 3) for k, v in scores.items()}, best, report.method["cost_vs_one_prune"] or 0)


def prune_per_layer(model, method, blocks, calibration: Tensor, heldout, device, config, report) -> None:
    """Eq 12 block by block: min over q/k/v of block error + rho * attention KL."""
    extra, share = _engine_options(config)
    rho = method.config.rho
    methods = {c: method.with_frozen(c) for c in CANDIDATES}
    choices: dict[str, dict] = {}

    @torch.no_grad()
    def step(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = find_prunable(block)
        qual = {n: f"{blocks.prefix}.{i}.{n}" for n in layers}
        dense_block = block  # still dense: the chosen weights are copied in at the end of the step
        dense_attn = find_attention(dense_block, f" (block {i})")
        prunes = {}
        for c in CANDIDATES:
            methods[c].begin_block(i, block, layers)
            prunes[c] = {n: methods[c].layer(qual[n], m, i) for n, m in layers.items()}
        obs = calibrate(block, i, inputs.hidden, inputs, layers, {n: [prunes[c][n] for c in CANDIDATES] for n in layers},
                        extra, share=share)
        cands, cand_rows = {}, {}
        for c in CANDIDATES:
            cb = copy.deepcopy(dense_block)
            cl = find_prunable(cb)
            cand_rows[c] = prune_layers(cl, prunes[c], {n: obs.stats[n] for n in cl}, qual,
                                        tag=f"[candidate: freeze {c}] ")
            cands[c] = (cb, find_attention(cb))
        del obs
        num = {c: 0.0 for c in CANDIDATES}
        kl = {c: 0.0 for c in CANDIDATES}
        den, rows_seen = 0.0, 0
        for j in range(inputs.hidden.shape[0]):
            x, call = inputs.hidden[j:j + 1], inputs.calls[i][j]
            y_d, p_d, _ = run_with_attention(dense_block, dense_attn, x, call, inputs)
            den += float((y_d.float() ** 2).sum())
            rows_seen += p_d.shape[0] * p_d.shape[1] * p_d.shape[2]
            for c, (cb, ca) in cands.items():
                y_c, p_c, _ = run_with_attention(cb, ca, x, call, inputs)
                num[c] += float(((y_c.float() - y_d.float()) ** 2).sum())
                kl[c] += float(kl_rows(p_c, p_d).sum())
        objective = {c: num[c] / max(den, 1e-30) + rho * kl[c] / max(rows_seen, 1) for c in CANDIDATES}
        best = min(objective, key=objective.get)
        best_layers = find_prunable(cands[best][0])
        for n, m in layers.items():
            set_weight_matrix(m, weight_matrix(best_layers[n]))
        report.layers.extend(cand_rows[best])
        choices[str(i)] = {"frozen": best, "objective": objective,
                           "block_error": {c: num[c] / max(den, 1e-30) for c in CANDIDATES},
                           "attention_kl": {c: kl[c] / max(rows_seen, 1) for c in CANDIDATES}}
        log.info("block %d: per-layer objective %s -> freeze %s", i, {k: f"{v:.4g}" for k, v in objective.items()}, best)
        del cands
        propagate(block, i, inputs)
        check_finite(inputs.hidden, f"the outputs of pruned block {i}")

    with eager_attention(model):  # explicit masks and attention probabilities
        sequential(model, calibration, device, step, desc="per-layer block", blocks=blocks)
    report.method = {"variant": method.config.variant, "frozen": "per-layer", "rho": rho,
                     "frozen_per_block": {k: [v["frozen"]] for k, v in choices.items()}, "per_block": choices}
