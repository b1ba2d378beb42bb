#!/usr/bin/env python
"""Pruning speed and memory (a benchmark, not a test).

For one model and config, prints: the floor (the engine's plain dense passes:
input capture + two block forwards per block, no hooks, no statistics), the
prune time of each method, the dense calibration pass inside it, and the peak
memory (process RSS; CUDA peak allocated when on a GPU). ``--markdown FILE``
appends the rows (with the command line) to a results file.

    python bench/bench_prune.py --model ../shared/models/stories260K --nsamples 128 --seqlen 256 \
        --methods magnitude,wanda,sparsegpt --sparsity 0.5
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from d2prune import PruneConfig, load_model, perplexity, prune, sample_calibration
from d2prune.config import method_label
from d2prune.io.data import calibration_texts, heldout_windows
from d2prune.engine.sequential import propagate, run_block, sequential
from d2prune.io.modeling import pick_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_C4 = ROOT.parent / "shared" / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM (Linux) rather than ru_maxrss, which
    survives exec and so reports the parent's peak in a child process."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cuda_peak_mib(device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def floor_seconds(model, calib, device) -> float:
    """Capture + two plain forwards of every block per sample (what any
    sequential pruner must at least do)."""
    def step(i, block, inputs):
        for j in range(inputs.hidden.shape[0]):
            run_block(block, inputs.hidden[j:j + 1], inputs.calls[i][j], inputs)
        propagate(block, i, inputs)

    sync(device)
    t = time.perf_counter()
    sequential(model, calib, device, step, desc="floor")
    sync(device)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id / folder / .gguf (default SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calib-file", default=str(DEFAULT_C4) if DEFAULT_C4.is_file() else None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="repeat each timing, report the minimum")
    ap.add_argument("--markdown", default=None, help="append a results table to this file")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor measurement")
    ap.add_argument("--heldout-windows", type=int, default=8, help="held-out windows for d2prune:frozen=auto")
    ap.add_argument("--no-share", action="store_true", help="one Hessian per Linear (the references' way), for comparison")
    ap.add_argument("--compare-fast", action="store_true", help="run every method exact and with --fast")
    ap.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 perplexity on the first N windows of each result")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    model, tok, src = load_model(args.model, dtype="float32" if device.type == "cpu" else "auto")
    docs, used = calibration_texts(args.calib_file), set()
    calib = sample_calibration(tok, docs, args.nsamples, args.seqlen, seed=0, used=used)
    held = heldout_windows(tok, docs, used, args.heldout_windows, args.seqlen)
    rss_loaded = peak_rss_mib()
    floor = float("nan") if args.no_floor else min(floor_seconds(model, calib, device) for _ in range(args.repeat))
    rows = []
    from d2prune.sweep import split_methods

    windows = None
    if args.eval_windows:
        from d2prune.io.data import SHARED_WIKI, eval_text, eval_windows, find_shared_data

        windows = eval_windows(tok, eval_text("wikitext2", str(find_shared_data() / SHARED_WIKI)), args.seqlen)
        windows = windows[:args.eval_windows]
    for mcfg in split_methods(args.methods):
        for fast in ((False, True) if args.compare_fast else (False,)):
            name = method_label(mcfg) + (" --fast" if fast else "")
            best = None
            for _ in range(args.repeat):
                m = copy.deepcopy(model)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                rep = prune(m, PruneConfig(method=mcfg, sparsity=args.sparsity, device=str(device),
                                           share_inputs=not args.no_share, fast=fast), calib, held)
                sync(device)
                ppl = perplexity(m, windows, device=device).ppl if windows is not None else float("nan")
                if best is None or rep.seconds < best[0]:
                    best = (rep.seconds, rep.calib_forward_seconds, rep.sparsity, cuda_peak_mib(device), ppl)
                del m
            rows.append((name, *best, peak_rss_mib()))
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    cpu = platform.processor() or platform.machine()
    head = (f"model {src.describe()} | {args.nsamples} x {args.seqlen} calibration tokens | sparsity {args.sparsity} | "
            f"{'one Hessian per Linear' if args.no_share else 'shared input statistics'} | "
            f"device {device} ({torch.get_num_threads()} threads, {cpu}) | torch {torch.__version__}")
    lines = [f"`{cmd}`", "", head, "",
             f"floor (capture + 2 block forwards per block): {floor:.2f} s; peak RSS after loading: {rss_loaded:.0f} MiB", "",
             "peak RSS: the process's high-water mark after that method (run one method per process for per-method figures); "
             "dense calib pass: the calibration forwards with their statistics hooks", "",
             "| method | prune s | x floor | dense calib pass s | sparsity | ppl | peak RSS MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, secs, calib_s, sp, cuda_mib, ppl, rss in rows:
        lines.append(f"| {name} | {secs:.2f} | {secs / floor:.2f} | {calib_s:.2f} | {sp:.4f} | {ppl:.3f} | {rss:.0f} | "
                     f"{'-' if cuda_mib is None else f'{cuda_mib:.0f}'} |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"command": cmd, "model": src.describe(), "nsamples": args.nsamples, "seqlen": args.seqlen,
                       "device": str(device), "threads": torch.get_num_threads(), "floor_seconds": floor,
                       "rss_after_load_mib": rss_loaded,
                       "methods": [{"method": n, "prune_seconds": s, "calib_pass_seconds": c, "sparsity": sp,
                                    "cuda_peak_mib": cm, "ppl": p, "peak_rss_mib": r} for n, s, c, sp, cm, p, r in rows]},
                      f, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
