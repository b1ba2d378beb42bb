#!/usr/bin/env python
"""Regenerates bench/RESULTS.md (and bench/sweep/*: CSV, tables, plots).

    python bench/make_results.py            # the full benchmark (a few hours on 2 CPU cores)
    python bench/make_results.py --quick    # a smoke run of every step (minutes), into /tmp

Steps (each resumable: finished sweep cells are skipped on a rerun):

1. Sweeps (``d2prune.sweep``) on stories260K and SmolLM2-135M-Instruct:
   A. magnitude, Wanda, SparseGPT, Pruner-Zero, D²Prune(auto) at 50% and 70%,
      with WikiText-2 perplexity, zero-shot (7 tasks, ``--limit``) and the
      attention KL / RMSE against the dense model;
   B. the same methods at 60%, 80% and 2:4 (perplexity, attention);
   C. D²Prune with each fixed frozen projection (q, k, v, none), per-layer and
      outlier at 50%, 70%, 2:4 (perplexity, attention).
2. Speed and memory: ``bench/bench_prune.py`` per method in its own process
   (peak RSS is per process), plus the floor of two plain block forwards.
3. RESULTS.md from the CSV and the speed JSON only: the numbers in it are what
   these steps measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = SHARED / "data" / "wikitext-2-raw" / "test.jsonl"
ZS = SHARED / "data" / "zeroshot"
STORIES = SHARED / "models" / "stories260K"

MAIN = "magnitude,wanda,sparsegpt,pruner-zero,d2prune:frozen=auto"
D2_VARIANTS = "d2prune:frozen=q,d2prune:frozen=k,d2prune:frozen=v,d2prune:frozen=none,d2prune:frozen=per-layer,d2prune:frozen=outlier"
SPEED_METHODS = ["magnitude", "wanda", "sparsegpt", "pruner-zero", "d2prune:frozen=k", "d2prune:frozen=auto"]
TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

FULL = {
    "stories260K": dict(model=str(STORIES), nsamples=128, seqlen=256, eval_windows=400, heldout=16, limit=100, diag=8),
    "SmolLM2-135M-Instruct": dict(model=None, nsamples=32, seqlen=256, eval_windows=40, heldout=8, limit=50, diag=4),
}
QUICK = {
    "stories260K": dict(model=str(STORIES), nsamples=8, seqlen=128, eval_windows=8, heldout=2, limit=4, diag=1),
    "SmolLM2-135M-Instruct": dict(model=None, nsamples=2, seqlen=64, eval_windows=2, heldout=1, limit=2, diag=1),
}


def sweeps(sizes: dict, out: Path) -> list[dict]:
    from d2prune.pipeline import DataConfig
    from d2prune.sweep import SweepConfig, read_rows, run_sweep, split_methods, split_sparsities, write_outputs
    from d2prune.evaluation.zeroshot import DEFAULT_BATCH_SIZE

    for label, sz in sizes.items():
        data = DataConfig(calib_file=str(C4), nsamples=sz["nsamples"], seqlen=sz["seqlen"], eval_file=str(WIKI),
                          eval_windows=sz["eval_windows"], heldout_windows=sz["heldout"])
        zs = {"tasks": TASKS, "limit": sz["limit"], "task_data": str(ZS), "batch_size": DEFAULT_BATCH_SIZE}
        for methods, sparsities, zero_shot in [(MAIN, "0.5,0.7", zs), (MAIN, "0.6,0.8,2:4", None),
                                               (D2_VARIANTS, "0.5,0.7,2:4", None)]:
            cfg = SweepConfig(models=[sz["model"]], methods=split_methods(methods), sparsities=split_sparsities(sparsities),
                              data=data, out=str(out), device="cpu", zero_shot=zero_shot,
                              diagnose_windows=sz["diag"], model_labels={sz["model"]: label})
            t = time.perf_counter()
            run_sweep(cfg)
            print(f"[{label}] {methods} @ {sparsities}: {time.perf_counter() - t:.0f}s", flush=True)
    rows = read_rows(out / "results.csv")
    write_outputs(rows, out)
    return rows


def speed(sizes: dict, out: Path) -> dict:
    res = {}
    for label, sz in sizes.items():
        res[label] = []
        for k, method in enumerate(SPEED_METHODS):
            path = out / f"speed_{label}_{k}.json"
            if not path.is_file():
                cmd = [sys.executable, str(HERE / "bench_prune.py"), "--methods", method, "--sparsity", "0.5",
                       "--nsamples", str(sz["nsamples"]), "--seqlen", str(sz["seqlen"]), "--calib-file", str(C4),
                       "--heldout-windows", str(sz["heldout"]), "--device", "cpu", "--json", str(path)]
                if sz["model"]:
                    cmd += ["--model", sz["model"]]
                if k:
                    cmd.append("--no-floor")  # measured once per model, with the first method
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res[label].append(json.loads(path.read_text()))
            print(f"[{label}] speed {method}: {res[label][-1]['methods'][0]['prune_seconds']:.1f}s", flush=True)
    return res


def _f(v, fmt="{:.2f}"):
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return "-"


def attention_change(rows: list[dict], models: list[str]) -> list[str]:
    """D²Prune (auto) against each baseline: relative change of attention KL and RMSE (the paper: -61% / -43%)."""
    cell = {(r["model"], r["sparsity"], r["method"]): r for r in rows}
    out = ["Relative change of D²Prune (auto) against each baseline, (D2 - baseline) / baseline "
           "(the paper reports -61% KL and -43% RMSE):", "",
           "| model | sparsity | vs | KL change | RMSE change |", "|---|---|---|---|---|"]
    for m in models:
        from d2prune.sweep import _sparsity_sort

        sps = sorted({r["sparsity"] for r in rows if r["model"] == m and r["method"] != "dense"}, key=_sparsity_sort)
        for s in sps:
            d2 = cell.get((m, s, "d2prune:frozen=auto"))
            for base in ("sparsegpt", "wanda"):
                b = cell.get((m, s, base))
                if not d2 or not b or not d2.get("attn_kl") or not b.get("attn_kl"):
                    continue
                kl = float(d2["attn_kl"]) / float(b["attn_kl"]) - 1
                rmse = float(d2["attn_rmse"]) / float(b["attn_rmse"]) - 1
                out.append(f"| {m} | {s} | {base} | {kl:+.0%} | {rmse:+.0%} |")
    return out + [""]


def write_results(rows: list[dict], spd: dict, sizes: dict, out: Path, cmd: str, seconds: float) -> str:
    from d2prune.sweep import markdown_table

    models = list(sizes)
    lines = [
        "# Benchmark results", "",
        f"Generated by `{cmd}` (resumable: sweep cells and speed runs already in `bench/sweep` are reused, not "
        f"redone; this invocation {seconds / 60:.0f} min, a run from scratch about 2.5 h) on {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Every number below is what that script measured; sweep data in "
        "`bench/sweep/results.csv`, plots `bench/sweep/*.png`.", "",
        "## Sizes", "",
        "| model | calibration (C4, seed 0) | WikiText-2 ppl | held-out (auto) | zero-shot | attention diagnostics |",
        "|---|---|---|---|---|---|",
    ]
    for m, sz in sizes.items():
        lines.append(f"| {m} | {sz['nsamples']} x {sz['seqlen']} tokens | first {sz['eval_windows']} windows of "
                     f"{sz['seqlen']} | {sz['heldout']} windows | first {sz['limit']} items per task | "
                     f"first {sz['diag']} eval windows |")
    lines += ["", "## WikiText-2 perplexity", "", markdown_table(rows, "ppl"), ""]
    # zero-shot per task
    zrows = [r for r in rows if r.get("zero_shot")]
    if zrows:
        lines += ["## Zero-shot accuracy (lm-eval-harness, 0-shot, local task data)", "",
                  "acc_norm for hellaswag, arc_easy, arc_challenge, openbookqa; acc for boolq, rte, winogrande "
                  "(as the pruning papers report them). HellaSwag is a 1000-item subset (see README). With 50-100 items per task one item is 1-2 "
                  "points and the standard error of a task is about 5-7 points: differences of a few points are noise, "
                  "and stories260K (260K parameters) is at chance on every task.", ""]
        rank = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
        zrows.sort(key=lambda r: (r["method"] != "dense", float(r["sparsity"]) if ":" not in r["sparsity"] else 2.0,
                                  rank[r["method"]]))
        for m in models:
            mz = [r for r in zrows if r["model"] == m]
            if not mz:
                continue
            lines += [f"**{m}**", "", "| sparsity | method | " + " | ".join(TASKS) + " | mean |",
                      "|---|---|" + "---|" * (len(TASKS) + 1)]
            for r in mz:
                z = json.loads(r["zero_shot"])
                lines.append(f"| {r['sparsity']} | {r['method']} | " + " | ".join(_f(z.get(t), "{:.3f}") for t in TASKS)
                             + f" | {_f(r['zero_shot_mean'], '{:.4f}')} |")
            lines.append("")
    lines += ["## Attention KL(pruned || dense) and attention-output RMSE (mean over blocks)", "",
              "KL:", "", markdown_table(rows, "attn_kl", "{:.4f}"), "", "RMSE:", "",
              markdown_table(rows, "attn_rmse", "{:.4f}"), ""]
    lines += attention_change(rows, models)
    auto = [r for r in rows if r.get("chosen")]
    if auto:
        lines += ["D²Prune auto chose: " + "; ".join(f"{r['model']} {r['sparsity']}: freeze {r['chosen']}" for r in auto), ""]
    lines += ["## Prune time and peak memory (50% unstructured, one process per method)", ""]
    for m, runs in spd.items():
        floor = runs[0]["floor_seconds"]
        lines += [f"**{m}** ({runs[0]['nsamples']} x {runs[0]['seqlen']} calibration tokens): floor (capture + two plain "
                  f"block forwards per block) {floor:.1f} s", "",
                  "| method | prune s | x floor | dense calibration pass s | peak RSS MiB |", "|---|---|---|---|---|"]
        for run in runs:
            x = run["methods"][0]
            calib = f"{x['calib_pass_seconds']:.1f}" if x["calib_pass_seconds"] else "-"  # auto: per candidate
            lines.append(f"| {x['method']} | {x['prune_seconds']:.1f} | {x['prune_seconds'] / floor:.2f} | "
                         f"{calib} | {x['peak_rss_mib']:.0f} |")
        lines.append("")
    lines += ["The same D²Prune configuration against the authors' code, and what bounds the remaining time: "
              "`bench/REFERENCE.md`. Shared vs per-Linear statistics: `bench/prune_speed.md`.", "",
              "Plots: `sweep/ppl_vs_sparsity.png`, `sweep/zeroshot_vs_sparsity.png`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, into /tmp/d2prune-bench-quick")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out or ("/tmp/d2prune-bench-quick" if args.quick else HERE))
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = sweeps(sizes, out / "sweep")
    spd = speed(sizes, out / "sweep")
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/make_results.py", *sys.argv[1:]])
    text = write_results(rows, spd, sizes, out, cmd, time.perf_counter() - t0)
    (out / "RESULTS.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
