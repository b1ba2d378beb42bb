"""Compressed checkpoints: size on disk vs dense, and an exact reload.

For each (model, sparsity): ``d2prune prune`` (Wanda, small calibration) saves
the dense pruned folder; ``d2prune compress`` writes the compressed one. Then
both are loaded with ``AutoModelForCausalLM.from_pretrained`` (after ``import
d2prune``), their logits compared on random ids, and WikiText-2 perplexity
computed on both with ``d2prune eval --ppl``. Prints (and appends to
``--markdown``) one row per run:

    python bench/compress_sizes.py --markdown bench/COMPRESS.md
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

import torch

from _report import command, emit  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = SHARED / "data" / "wikitext-2-raw" / "test.jsonl"


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "d2prune", "-q", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{res.stderr}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def ppl(folder: Path, seqlen: int, windows: int) -> float:
    out = folder.parent / (folder.name + "-ppl.json")
    cli("eval", "--model", str(folder), "--ppl", "--eval-file", str(WIKI), "--seqlen", str(seqlen),
            "--eval-windows", str(windows), "--output", str(out))
    stack = [json.loads(out.read_text())]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if isinstance(d.get("ppl"), (int, float)):
                return float(d["ppl"])
            stack.extend(d.values())
    raise SystemExit(f"no perplexity in {out}")


def main() -> None:
    from transformers import AutoModelForCausalLM

    import d2prune  # noqa: F401 - registers the format
    from d2prune.io.modeling import default_model_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    src = default_model_source()
    smol = str(Path(src.path) / src.gguf_file)
    models = [("stories260K", str(SHARED / "models" / "stories260K"), "auto"), ("SmolLM2-135M", smol, "bfloat16")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2prune-compress-") as tmp:
        tmp = Path(tmp)
        for label, model, dtype in models:
            for sp in args.sparsities.split(","):
                t0 = time.perf_counter()
                dense, comp = tmp / f"{label}-{sp}-dense", tmp / f"{label}-{sp}-comp"
                cli("prune", "--model", model, "--method", "wanda", "--sparsity", sp, "--dtype", dtype,
                        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib-file", str(C4),
                        "--no-eval", "--out", str(dense))
                cli("compress", str(dense), str(comp))
                rec = json.loads((comp / "d2prune.json").read_text())["compression"]
                a = AutoModelForCausalLM.from_pretrained(str(dense))
                b = AutoModelForCausalLM.from_pretrained(str(comp))
                ids = torch.randint(0, min(a.config.vocab_size, 512), (2, 64), generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    same = torch.equal(a(ids).logits, b(ids).logits)
                weights_same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
                dtype_name = str(next(a.parameters()).dtype).replace("torch.", "")
                del a, b
                seqlen = 256
                pd, pc = ppl(dense, seqlen, args.eval_windows), ppl(comp, seqlen, args.eval_windows)
                row = (f"| {label} | {sp} | {dtype_name} | {folder_bytes(dense) / 1e6:.2f} | {folder_bytes(comp) / 1e6:.2f} "
                       f"| {folder_bytes(comp) / folder_bytes(dense):.3f} | {rec['sparse_matrices_ratio']:.4f} | "
                       + ", ".join(f"{k} {v}" for k, v in rec["layouts"].items() if v)
                       + f" | {'yes' if weights_same else 'NO'} | {'yes' if same else 'NO'} | {pd:.4f} | {pc:.4f} "
                       f"| {time.perf_counter() - t0:.0f} |")
                print(row, flush=True)
                rows.append(row)
    head = ("| model | sparsity | dtype | dense MB | compressed MB | file ratio | sparse matrices ratio | layouts "
            "| weights identical | logits identical | ppl dense | ppl compressed | s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cmd = command()
    text = (f"`{cmd}`\n\nWanda, {args.nsamples} x {args.seqlen} C4 calibration; perplexity: WikiText-2, first "
            f"{args.eval_windows} windows of 256 tokens; sizes: the `*.safetensors` files on disk; torch "
            f"{torch.__version__}\n\n{head}\n" + "\n".join(rows) + "\n")
    emit(text, args.markdown)


if __name__ == "__main__":
    main()
