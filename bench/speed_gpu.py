"""2:4 inference speed on an NVIDIA GPU for LLaMA-2-7B-shaped blocks (the GPU rows of bench/SPEED.md).

Builds, directly on the GPU, a LLaMA model with LLaMA-2-7B's block shapes
(hidden 4096, intermediate 11008, 32 heads, vocabulary 32000) but only a few
blocks (default 2), random weights in bf16 pruned to a real 2:4 pattern by
magnitude (2 smallest |w| of every 4 consecutive inputs), and runs the
measurement of ``d2prune speed --device cuda`` on it (``d2prune.deploy.speed.measure_cuda``):
per-shape GEMM dense vs 2:4, prefill and decode tokens/s, logits check.
Random weights time the same kernels as trained ones (a GEMM's cost does not
depend on the values), and no checkpoint is needed. About 1-2 minutes on an H100.

    python bench/speed_gpu.py                       # batch 1,8,32 x seqlen 128,2048, bf16
    python bench/speed_gpu.py --layers 4 --dtype float16 --json gpu.json --markdown bench/SPEED.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
from torch import nn

from d2prune.ops.masks import nm_mask
from d2prune.io.modeling import set_weight_matrix, weight_matrix
from d2prune.deploy.speed import (TimingConfig, block_linears, check_cuda_device, cuda_tables, machine_info, machine_line,
                           measure_cuda)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096)


def build_model(layers: int = 2, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                seed: int = 0, **shape) -> nn.Module:
    """A LLaMA causal LM with ``layers`` blocks of LLaMA-2-7B's shapes
    (override any config field through ``shape``, e.g. ``hidden_size=128`` for
    a CPU check), initialised on ``device`` in ``dtype`` (no host copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, **{**LLAMA2_7B, **shape})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def prune_24_(model: nn.Module) -> None:
    """Magnitude 2:4 on every block Linear, in place (``lm_head`` stays dense)."""
    for layer in block_linears(model).values():
        w = weight_matrix(layer)
        set_weight_matrix(layer, w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder blocks (default 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--seqlen", default="128,2048")
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds per figure (default 0.1)")
    p.add_argument("--cutlass", action="store_true",
                   help="set SparseSemiStructuredTensor._FORCE_CUTLASS (CUTLASS kernels instead of cuSPARSELt; "
                        "torch builds them for sm 8.x only, so not on an H100)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="append the tables to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("d2prune").setLevel(logging.INFO)

    device = check_cuda_device("cuda")  # one-line error without an sm80+ GPU
    if args.cutlass:
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = build_model(args.layers, dtype, device)
    prune_24_(model)
    res = measure_cuda(model, [int(b) for b in args.batch.split(",")], [int(s) for s in args.seqlen.split(",")],
                       dtype, TimingConfig(args.min_run_time), str(device))
    res["machine"] = machine_info(device)
    res["model_shape"] = {"layers": args.layers, **LLAMA2_7B}
    res["wall_s"] = time.perf_counter() - t0
    check = res["logits_check"]
    text = "\n".join([
        f"machine: {machine_line(res['machine'])}",
        f"model: LLaMA-2-7B-shaped, {args.layers} blocks, random {args.dtype} weights, magnitude 2:4 in the blocks",
        f"2:4 backend: {res['backend']}; {res['layers_swapped']} block Linears semi-structured, "
        f"{len(res['kept_dense'])} kept dense",
        f"logits check {'OK' if check['ok'] else 'FAILED'}: max |2:4 - dense| = {check['max_abs_diff']:.3g} "
        f"(tolerance {check['tolerance']:.3g}), argmax agreement {100 * check['argmax_agreement']:.1f}%",
        f"wall time {res['wall_s']:.0f} s", "", cuda_tables(res)])
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    from d2prune.errors import D2PruneError

    try:
        sys.exit(main())
    except D2PruneError as e:
        print(f"speed_gpu: error: {e}", file=sys.stderr)
        sys.exit(2)
