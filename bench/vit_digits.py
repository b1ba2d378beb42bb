"""Pruning a vision transformer: top-1 accuracy of a ViT trained on real images.

    python bench/vit_digits.py --markdown bench/VIT.md

The model is the one the test suite trains (tests/digits_vit.py): a 4-block
ViT (hidden 64, 4 heads, MLP 128, 32x32 inputs in 8x8 patches: 16 patches +
the class token) trained 30 epochs on 1438 of scikit-learn's 1797 real
handwritten digits, evaluated on the other 359 (a seeded 80/20 split). Every
cell is one ``d2prune prune --calib-images train --eval-images test`` in
process, calibration ``--nsamples`` training images (seed 0); D²Prune's
``--frozen auto`` scores its candidates on 16 more held-out training images.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,d2prune:frozen=k,d2prune")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (one model each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: one is enough)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from d2prune.cli import main as d2prune
    from digits_vit import train_vit, write_digits

    work = Path(tempfile.mkdtemp(prefix="vit-digits-"))
    train, test = write_digits(work)
    seeds = [int(s) for s in args.seeds.split(",")]
    models, dense = {}, {}
    for seed in seeds:
        models[seed] = train_vit(work / f"vit{seed}", train, seed=seed)
        out = work / f"dense{seed}.json"
        assert d2prune(["-q", "eval", "--model", str(models[seed]), "--eval-images", str(test), "--output", str(out)]) == 0
        dense[seed] = json.loads(out.read_text())["images"]["top1"]
    rows: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    for method in args.methods.split(","):
        name, _, opts = method.partition(":")
        extra = [f"--{k}={v}" for k, _, v in (kv.partition("=") for kv in filter(None, opts.split(",")))]
        for sp in args.sparsities.split(","):
            for seed in seeds:
                out = work / f"{name}-{opts}-{sp}-{seed}".replace(":", "_").replace("=", "_")
                argv = ["-q", "prune", "--model", str(models[seed]), "--method", name, "--sparsity", sp, *extra,
                        "--calib-images", str(train), "--eval-images", str(test), "--nsamples", str(args.nsamples),
                        "--out", str(out)]
                t0 = time.perf_counter()
                if d2prune(argv) != 0:
                    raise SystemExit(f"failed: d2prune {shlex.join(argv)}")
                rec = json.loads((out / "d2prune.json").read_text())
                rows.setdefault((method, sp), []).append(rec["evaluation"]["images"]["top1"])
                seconds.setdefault((method, sp), []).append(time.perf_counter() - t0)
    from transformers import ViTForImageClassification

    params = sum(p.numel() for p in ViTForImageClassification.from_pretrained(models[seeds[0]]).parameters())
    sps = args.sparsities.split(",")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines = [f"Dense top-1 (mean of {len(seeds)} models): **{mean(list(dense.values())):.4f}** "
             f"({', '.join(f'{dense[s]:.4f}' for s in seeds)}); {params:,} parameters; 359 test images.", "",
             "| method | " + " | ".join(sps) + " |", "|---|" + "---|" * len(sps)]
    for method in args.methods.split(","):
        cells = []
        for sp in sps:
            v = rows[(method, sp)]
            best = max(mean(rows[(m, sp)]) for m in args.methods.split(","))
            text = f"{mean(v):.4f}"
            cells.append(f"**{text}**" if mean(v) == best else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"Top-1 accuracy, mean over the models of seeds {args.seeds}; bold: the best of a column. "
              f"Calibration: {args.nsamples} training images (seed 0). Each prune took "
              f"{min(min(v) for v in seconds.values()):.1f}-{max(max(v) for v in seconds.values()):.1f} s "
              f"(load, prune, evaluate, save) on one thread ({args.threads}) of this project's 2-core CPU machine."]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        cmd = "python bench/vit_digits.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.markdown).write_text(
            "# Pruning a vision transformer (ViT on real handwritten digits)\n\n"
            + __doc__.split("\n\n", 2)[2].strip() + "\n\n" + f"Command: `{cmd}`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
