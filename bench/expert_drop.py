"""Whole experts removed from the small trained MoE (bench/MOE.md's model):
REAP and frequency at 25% and 50% of each layer's experts, D²Prune 50%
alone, and REAP 50% + D²Prune 50% in one command; WikiText-2 perplexity and
the size of each output's weights.

    python bench/expert_drop.py --markdown bench/MOE.md     # ~10 min here

Each row is one ``d2prune prune ... --json --out TMP`` in a subprocess
(``--sparsity 0`` for the rows that only remove experts); the safetensors
bytes of the saved folder are counted, then it is deleted. D²Prune alone runs
with its default ``--frozen auto``; with ``--drop-experts`` a search over
candidates is refused, so the combined row freezes what the search chose
alone (read from its record).
"""

from __future__ import annotations

import argparse
import json
import os
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
MODEL = ROOT / "bench" / "_models" / "qwen3moe-c4"


def prune(args, *flags: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="d2prune-drop-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "d2prune", "-q", "prune", "--model", str(args.model), *flags,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib-file", str(C4),
               "--eval-file", str(WIKI), "--eval-windows", str(args.eval_windows), "--json", "--seed", "0",
               "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
        rec = json.loads((out / "d2prune.json").read_text())
        rec["_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rec["_seconds"] = time.perf_counter() - t0
        return rec


def experts_left(rec: dict) -> str:
    drops = rec.get("dropped_experts") or []
    return f"{drops[0]['kept']} of {drops[0]['experts']}" if drops else "all"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model} is missing: make it with bench/train_moe.py (bench/MOE.md says how)")
    rows = [("dense", prune(args, "--method", "magnitude", "--sparsity", "0"))]
    for score in ("reap", "frequency"):
        for amount in ("0.25", "0.5"):
            rows.append((f"{score} {amount} of the experts",
                         prune(args, "--method", "magnitude", "--sparsity", "0", "--drop-experts", amount,
                               "--expert-score", score)))
    alone = prune(args, "--method", "d2prune", "--sparsity", "0.5")
    chosen = alone["method_summary"].get("chosen") or "none"
    rows.append(("d2prune 50% (--frozen auto)", alone))
    rows.append((f"reap 0.5 + d2prune 50% (--frozen {chosen})",
                 prune(args, "--method", "d2prune", "--frozen", chosen, "--sparsity", "0.5", "--drop-experts", "0.5")))
    rows.append((f"d2prune 50% (--frozen {chosen})", prune(args, "--method", "d2prune", "--frozen", chosen,
                                                          "--sparsity", "0.5")))
    dense_bytes = rows[0][1]["_bytes"]
    lines = ["| run | experts left per layer | wikitext2 ppl | zeros over block weights | weights MB | vs dense | s |",
             "|---|---|---|---|---|---|---|"]
    for name, rec in rows:
        lines.append(f"| {name} | {experts_left(rec)} | {rec['evaluation']['wikitext2']['ppl']:.2f} | "
                     f"{rec['overall_sparsity']:.3f} | {rec['_bytes'] / 1e6:.1f} | {rec['_bytes'] / dense_bytes:.2f} | "
                     f"{rec['_seconds']:.0f} |")
    text = ("\n## Whole experts removed (`--drop-experts`)\n\n"
            f"`{command()}`\n\nmodel {args.model}; {args.nsamples} x {args.seqlen} C4 calibration tokens (seed 0); "
            f"WikiText-2 perplexity on {args.eval_windows} windows of {args.seqlen}; weights MB: the safetensors "
            "files of the saved folder (dense format: zeros take room; removed experts do not).\n\n"
            + "\n".join(lines) + "\n")
    emit(text, args.markdown)


if __name__ == "__main__":
    main()
