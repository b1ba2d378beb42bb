"""The small trained MoE pruned by every method: WikiText-2 perplexity and the
sparsity really made over all block weights, routed vs all-token expert calibration.

    python bench/moe.py --markdown bench/MOE.md        # 6 methods x {0.5, 2:4} x {routed, all}: ~10 min here
    python bench/moe.py --methods wanda --sparsities 0.5 --calibrations none   # plumbing check, no --moe-calibration

Each cell is one ``d2prune prune ... --moe-calibration routed|all --json --out
TMP`` in a subprocess (``--calibrations none`` leaves the option out, for code
that does not have it; ``--src`` picks the d2prune code that runs). Besides
the record's own figures (``sparsity`` over the pruned matrices,
``overall_sparsity``), the script counts the zeros of the saved
checkpoint itself over every decoder-block tensor with two or more dimensions
(the fused 3-D expert tensors included) and over the expert tensors alone, so a
run that leaves the experts dense shows as such whatever the record says. The
dense row is ``d2prune eval --ppl`` on the same windows. The saved models are
deleted after counting.
"""

from __future__ import annotations

import argparse
import json
import os
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
MODEL = ROOT / "bench" / "_models" / "qwen3moe-c4"
METHODS = "magnitude,wanda,sparsegpt,ria,pruner-zero,d2prune"


def d2prune_cmd(*rest: str) -> list[str]:
    return [sys.executable, "-m", "d2prune", "-q", *rest]


def child_env(args) -> dict:
    """The children see this checkout's src (so a worktree benchmarks its own
    code) and the thread count asked for (the machine's cores are shared)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.src).resolve()), env.get("PYTHONPATH")]))
    return env


def run(cmd: list[str], args) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
    if res.returncode:
        raise SystemExit(f"failed ({res.returncode}): {shlex.join(cmd)}\n{res.stderr[-3000:]}")
    return res, time.perf_counter() - t0


def zeros_in_blocks(folder: Path) -> dict:
    """Zeros over the saved decoder-block tensors with >= 2 dimensions, read
    from the checkpoint's safetensors files: all of them, and the experts' alone."""
    from safetensors import safe_open

    z = n = ze = ne = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if ".layers." not in key:
                    continue
                t = st.get_tensor(key)
                if t.dim() < 2:
                    continue
                k = int((t == 0).sum())
                z, n = z + k, n + t.numel()
                if ".experts." in key:
                    ze, ne = ze + k, ne + t.numel()
    if n == 0:
        raise SystemExit(f"no decoder-block tensors found in {folder}")
    return {"blocks": z / n, "experts": ze / ne if ne else float("nan")}


def expert_tokens(rec: dict, calibration: str) -> str:
    """From the record's per-matrix rows: the fewest calibration tokens any
    expert's statistics came from, and how many experts got statistics other
    than the run's mode ("routed", or "all ..." with ``all``): with ``routed``,
    the all-token fallback of experts routed too few tokens.
    '-' when the record has no per-expert rows (code without MoE pruning)."""
    experts = {}
    for row in rec.get("layers", []):
        if row.get("tokens") is not None:
            experts[row["name"].rsplit(".", 1)[0]] = (row["tokens"], row.get("statistics"))
    if not experts:
        return "-"
    label = {"routed": "routed", "weighted": "routed, gate-weighted"}.get(calibration)
    expected = (lambda st: str(st).startswith("all")) if calibration == "all" else (lambda st: st == label)
    other = sum(1 for _, st in experts.values() if not expected(st))
    return f"{min(t for t, _ in experts.values())} / {other}"


def dense_ppl(args) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        run(d2prune_cmd("eval", "--ppl", "--model", args.model, "--eval-file", str(WIKI), "--seqlen",
                        str(args.seqlen), "--eval-windows", str(args.eval_windows), "--output", str(out)), args)
        r = json.loads(out.read_text())["ppl"]
    return r["ppl"], r["windows"], r["total_windows"]


def prune_row(method: str, sparsity: str, calibration: str, args) -> dict:
    name, _, opts = method.partition(":")
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        out = Path(tmp) / "pruned"
        cmd = d2prune_cmd("prune", "--model", args.model, "--method", name, "--sparsity", sparsity,
                          "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib-file", str(C4),
                          "--eval-file", str(WIKI), "--eval-windows", str(args.eval_windows), "--json",
                          "--out", str(out))
        if calibration != "none":
            cmd += ["--moe-calibration", calibration]
        for kv in filter(None, opts.split(",")):
            k, _, v = kv.partition("=")
            cmd += [f"--{k}", v]
        res, wall = run(cmd, args)
        rec = json.loads(res.stdout)
        counted = zeros_in_blocks(out)
    return {"method": method, "sparsity": sparsity, "calibration": calibration, "wall": wall,
            "ppl": rec["evaluation"]["wikitext2"]["ppl"], "record_sparsity": rec["sparsity"],
            "record_overall": rec.get("overall_sparsity", float("nan")), "counted": counted,
            "experts": expert_tokens(rec, calibration)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL), help="default: bench/_models/qwen3moe-c4 (bench/train_moe.py)")
    ap.add_argument("--methods", default=METHODS, help="comma list; method:key=value,... passes --key value")
    ap.add_argument("--sparsities", default="0.5,2:4")
    ap.add_argument("--calibrations", default="routed,all",
                    help="--moe-calibration values, comma list; 'none' leaves the option out")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (OMP_NUM_THREADS)")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the d2prune source folder the runs import (default: this checkout's)")
    ap.add_argument("--markdown", default=None, help="append the table (with this command) to this file")
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"no model at {args.model}: train it first with python bench/train_moe.py")
    cals = args.calibrations.split(",")
    t0 = time.perf_counter()
    ppl, windows, total = dense_ppl(args)
    head = "| method | sparsity | " + " | ".join(f"{c} ppl" for c in cals) + " | " + \
        " | ".join(f"{c} record sparsity / overall" for c in cals) + " | " + \
        " | ".join(f"{c} zeros: blocks / experts" for c in cals) + " | " + \
        " | ".join(f"{c}: fewest expert tokens / experts off-mode" for c in cals) + " | s |"
    dash = " | ".join("-" for _ in cals)
    lines = [head, "|" + "---|" * (3 + 4 * len(cals)),
             "| dense | 0 | " + " | ".join(f"{ppl:.2f}" for _ in cals) + f" | {dash} | "
             + " | ".join("0 / 0" for _ in cals) + f" | {dash} | - |"]
    print(lines[-1], flush=True)
    for method in args.methods.split(","):
        for sp in args.sparsities.split(","):
            rows = [prune_row(method, sp, c, args) for c in cals]
            line = (f"| {method} | {sp} | " + " | ".join(f"{r['ppl']:.2f}" for r in rows) + " | "
                    + " | ".join(f"{r['record_sparsity']:.4f} / {r['record_overall']:.4f}" for r in rows) + " | "
                    + " | ".join(f"{r['counted']['blocks']:.4f} / {r['counted']['experts']:.4f}" for r in rows) + " | "
                    + " | ".join(r["experts"] for r in rows) + f" | {sum(r['wall'] for r in rows):.0f} |")
            print(line, flush=True)
            lines.append(line)
    text = ("## Pruned by every method: routed vs all-token expert calibration\n\n"
            f"`{command()}`\n\nmodel {args.model}; {args.nsamples} x {args.seqlen} C4 calibration tokens (seed 0); "
            f"WikiText-2 perplexity on the first {windows} of {total} windows of {args.seqlen} tokens; "
            f"{args.threads} thread(s) per run; record sparsity / overall: d2prune.json's `sparsity` (pruned matrices) "
            "and `overall_sparsity`; zeros: counted in the saved checkpoint over every decoder-block tensor with >= 2 "
            "dimensions / over the expert tensors alone; fewest expert tokens / experts off-mode: the fewest "
            "calibration tokens an expert's statistics came from, and the experts whose statistics are not the run's "
            "mode (d2prune.json `layers[].tokens` / `.statistics`); s: wall seconds of the row's runs "
            f"(whole table {time.perf_counter() - t0:.0f} s)\n\n" + "\n".join(lines) + "\n")
    emit(text, args.markdown)


if __name__ == "__main__":
    main()
