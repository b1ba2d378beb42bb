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

from d2prune import PruneConfig, load_model, prune, read_texts, sample_calibration
from d2prune.data import calibration_texts
from d2prune.engine import propagate, run_block, sequential
from d2prune.modeling import pick_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_C4 = ROOT.parent / "shared" / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    model, tok, src = load_model(args.model, dtype="float32" if device.type == "cpu" else "auto")
    calib = sample_calibration(tok, calibration_texts(args.calib_file), args.nsamples, args.seqlen, seed=0)
    rss_loaded = peak_rss_mib()
    floor = min(floor_seconds(model, calib, device) for _ in range(args.repeat))
    rows = []
    for name in args.methods.split(","):
        best = None
        for _ in range(args.repeat):
            m = copy.deepcopy(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            rep = prune(m, PruneConfig(method=name, sparsity=args.sparsity, device=str(device)), calib)
            sync(device)
            if best is None or rep.seconds < best[0]:
                best = (rep.seconds, rep.calib_forward_seconds, rep.sparsity, cuda_peak_mib(device))
            del m
        rows.append((name, *best, peak_rss_mib()))
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    cpu = platform.processor() or platform.machine()
    head = (f"model {src.describe()} | {args.nsamples} x {args.seqlen} calibration tokens | sparsity {args.sparsity} | "
            f"device {device} ({torch.get_num_threads()} threads, {cpu}) | torch {torch.__version__}")
    lines = [f"`{cmd}`", "", head, "",
             f"floor (capture + 2 block forwards per block): {floor:.2f} s; peak RSS after loading: {rss_loaded:.0f} MiB", "",
             "| method | prune s | x floor | dense calib pass s | sparsity | peak RSS MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, secs, calib_s, sp, cuda_mib, rss in rows:
        lines.append(f"| {name} | {secs:.2f} | {secs / floor:.2f} | {calib_s:.2f} | {sp:.4f} | {rss:.0f} | "
                     f"{'-' if cuda_mib is None else f'{cuda_mib:.0f}'} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
