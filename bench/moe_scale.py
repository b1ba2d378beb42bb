#!/usr/bin/env python
"""MoE blocks of real width: Qwen3-30B-A3B-, Mixtral-8x7B- and DeepSeek-V3-shaped
checkpoints with a few decoder blocks, pruned by ``d2prune prune``.

Each checkpoint is written one block per shard, in the layout the published
checkpoints use (per-expert tensors: ``mlp.experts.7.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.7.w1.weight``; transformers fuses them
into 3-D parameters on load), with random bf16 weights (normal, std 0.02),
norms 1. The runs reuse bench/scale.py's measurement (peak RSS of the pruning
process: sampled VmRSS of the tree and the process's VmHWM at exit).

    python bench/moe_scale.py build --shape qwen3-30b-a3b --blocks 1 --dir /tmp/d2prune-moe/q3 [--verify]
    python bench/moe_scale.py run --model /tmp/d2prune-moe/q3 --method wanda --nsamples 4 --seqlen 128
    python bench/moe_scale.py all --matrix qwen3-30b-a3b:1,mixtral-8x7b:1 --methods wanda,sparsegpt --md bench/MOE_SCALE.md

What is measured: 1-2 blocks; the full-depth time is extrapolated (x depth /
blocks) and marked as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (bench/scale.py: measurement, rows)

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # Qwen/Qwen3-30B-A3B: 48 blocks, 128 experts (top 8) of width 768, no shared expert
    "qwen3-30b-a3b": dict(kind="qwen3_moe", depth=48, hidden=2048, heads=32, kv=4, head_dim=128, experts=128, top=8,
                          inter=768, vocab=151936,
                          config=dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                                      moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                                      num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                                      head_dim=128, rope_theta=1000000.0)),
    # mistralai/Mixtral-8x7B-v0.1: 32 blocks, 8 experts (top 2) of width 14336
    "mixtral-8x7b": dict(kind="mixtral", depth=32, hidden=4096, heads=32, kv=8, head_dim=128, experts=8, top=2,
                         inter=14336, vocab=32000,
                         config=dict(model_type="mixtral", architectures=["MixtralForCausalLM"],
                                     intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                                     rope_theta=1000000.0)),
    # deepseek-ai/DeepSeek-V3: 61 blocks (the first 3 dense; here every block is a MoE block), 256 routed experts
    # (top 8) of width 2048 + 1 shared, multi-head latent attention
    "deepseek-v3": dict(kind="deepseek_v3", depth=61, hidden=7168, heads=128, kv=128, head_dim=128, experts=256, top=8,
                        inter=2048, vocab=129280,
                        config=dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                                    intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
                                    n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=0, n_group=8,
                                    topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536,
                                    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                    rope_theta=10000.0, rope_scaling=None)),
}


scale.SHAPES.update({k: {"depth": v["depth"]} for k, v in SHAPES.items()})  # scale.model_info reads the depth


def block_shapes(s: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, hd = s["hidden"], s["head_dim"]
    p = f"model.layers.{i}."
    out = {p + "self_attn.q_proj.weight": (s["heads"] * hd, h), p + "self_attn.k_proj.weight": (s["kv"] * hd, h),
           p + "self_attn.v_proj.weight": (s["kv"] * hd, h), p + "self_attn.o_proj.weight": (h, s["heads"] * hd),
           p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    if s["kind"] == "deepseek_v3":  # latent attention instead of q/k/v/o, a shared expert, a router bias
        for k in [k for k in out if ".self_attn." in k]:
            del out[k]
        a = p + "self_attn."
        out.update({a + "q_a_proj.weight": (1536, h), a + "q_a_layernorm.weight": (1536,),
                    a + "q_b_proj.weight": (s["heads"] * 192, 1536), a + "kv_a_proj_with_mqa.weight": (512 + 64, h),
                    a + "kv_a_layernorm.weight": (512,), a + "kv_b_proj.weight": (s["heads"] * 256, 512),
                    a + "o_proj.weight": (h, s["heads"] * 128), p + "mlp.gate.e_score_correction_bias": (s["experts"],)})
        for n in ("gate_proj", "up_proj"):
            out[f"{p}mlp.shared_experts.{n}.weight"] = (s["inter"], h)
        out[f"{p}mlp.shared_experts.down_proj.weight"] = (h, s["inter"])
    if s["kind"] in ("qwen3_moe", "deepseek_v3"):
        if s["kind"] == "qwen3_moe":
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
        moe, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
    else:
        moe, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
    out[moe + "gate.weight"] = (s["experts"], h)
    for e in range(s["experts"]):
        out[f"{moe}experts.{e}.{names[0]}.weight"] = (s["inter"], h)
        out[f"{moe}experts.{e}.{names[1]}.weight"] = (s["inter"], h)
        out[f"{moe}experts.{e}.{names[2]}.weight"] = (h, s["inter"])
    return out


FP8_BLOCK = 128  # DeepSeek-V3's FP8 checkpoints: e4m3 weights, one fp32 weight_scale_inv per 128 x 128 block


def fp8_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every projection of a block in FP8 with its block scales (the DeepSeek-V3 layout; router,
    norms and correction bias stay as they are)."""
    out = {}
    for name, shp in shapes.items():
        out[name] = shp
        if len(shp) == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight", ".w1.weight", ".w2.weight",
                                            ".w3.weight")):
            out[name.removesuffix("weight") + "weight_scale_inv"] = (-(-shp[0] // FP8_BLOCK), -(-shp[1] // FP8_BLOCK))
    return out


def _st_dtype(name: str, shp, fp8: bool) -> tuple[str, int]:
    if name.endswith(("correction_bias", "weight_scale_inv")):
        return "F32", 4
    if fp8 and len(shp) == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight", ".w1.weight", ".w2.weight",
                                                 ".w3.weight")):
        return "F8_E4M3", 1
    return "BF16", 2


def write_sparse(path: Path, shapes: dict[str, tuple[int, ...]], real=None, fp8: bool = False) -> int:
    """A safetensors file whose tensors are all zero, written as a sparse file
    (header only; the data are holes): a checkpoint of the right layout and
    size that costs no disk, for runs that must be refused before reading it.
    ``real(name, shape)``: a tensor to write for ``name`` instead (None: a hole)."""
    header, offset = {}, 0
    for name, shp in shapes.items():
        dtype, size = _st_dtype(name, shp, fp8)
        n = size
        for d in shp:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
        for name, shp in (shapes.items() if real is not None else ()):
            t = real(name, shp)
            if t is not None:
                f.seek(8 + len(raw) + header[name]["data_offsets"][0])
                f.write(t.contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
    return offset


def torch_uint8():
    import torch

    return torch.uint8


def build(shape_name: str, blocks: int, folder: Path, seed: int = 0, verify: bool = False,
          sparse: bool | str = False, fp8: bool = False) -> Path:
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape_name]
    folder = Path(folder)
    stamp = {"shape": shape_name, "blocks": blocks, "seed": seed, "std": 0.0 if sparse else 0.02, "dtype": "bfloat16",
             **({"sparse": sparse} if sparse == "experts" else {}), **({"fp8": True} if fp8 else {})}
    if fp8 and not sparse:
        raise SystemExit("--fp8 is built with --sparse or --sparse experts")
    marker = folder / "scale-build.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        print(f"build: reusing {folder}")
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = dict(s["config"], hidden_size=s["hidden"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
               num_hidden_layers=blocks, vocab_size=s["vocab"], max_position_embeddings=4096, rms_norm_eps=1e-6,
               tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in scale.TOKENIZER_FILES:
        if (scale.TOKENIZER_SRC / name).is_file():
            shutil.copyfile(scale.TOKENIZER_SRC / name, tmp / name)
    outer = {"model.embed_tokens.weight": (s["vocab"], s["hidden"]), "model.norm.weight": (s["hidden"],),
             "lm_head.weight": (s["vocab"], s["hidden"])}
    groups = [fp8_shapes(block_shapes(s, i)) if fp8 else block_shapes(s, i) for i in range(blocks)] + [outer]
    gen, weight_map, total, t0 = torch.Generator(), {}, 0, time.perf_counter()
    for k, shapes in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        if sparse:
            def real(name, shp, k=k):
                # --sparse experts: every tensor but the routed experts' is real (router, attention, shared
                # expert, embeddings: the routing and attention are those of random weights), the experts holes
                if sparse != "experts" or re.search(r"\.experts\.\d+\.", name):
                    return None
                if name.endswith("weight_scale_inv"):  # |w| < 0.12 (std 0.02) maps into e4m3's range
                    return torch.full(shp, 0.12 / 448, dtype=torch.float32)
                if len(shp) == 1:
                    return torch.ones(shp, dtype=torch.float32 if name.endswith("correction_bias") else torch.bfloat16)
                gen.manual_seed(seed * 1_000_003 + k * 100_003 + len(name))
                w = torch.empty(shp, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
                if _st_dtype(name, shp, fp8)[0] == "F8_E4M3":
                    return (w.float() / (0.12 / 448)).clamp(-448, 448).to(torch.float8_e4m3fn)
                return w

            total += write_sparse(tmp / fname, shapes, real, fp8)
            weight_map.update({n: fname for n in shapes})
            continue
        tensors = {}
        for j, (name, shp) in enumerate(shapes.items()):
            if len(shp) == 1:
                tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
            else:
                gen.manual_seed(seed * 1_000_003 + k * 100_003 + j)
                tensors[name] = torch.empty(shp, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"build: {shape_name} shard {k + 1}/{len(groups)} ({(tmp / fname).stat().st_size / GB:.2f} GB, "
              f"{time.perf_counter() - t0:.0f}s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (tmp / "scale-build.json").write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    if verify:
        info = scale.load_check(folder)
        print(f"build: from_pretrained: {info}")
        if not info.get("ok"):
            raise SystemExit(f"{folder} does not load cleanly: {info}")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=list(SHAPES), required=True)
    b.add_argument("--blocks", type=int, default=1)
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--verify", action="store_true")
    b.add_argument("--sparse", nargs="?", const=True, default=False, choices=[True, "experts"],
                   help="all-zero tensors in sparse files (no disk used): for runs refused before reading weights; "
                        "--sparse experts: only the routed experts' (the rest random), for groups of experts")
    b.add_argument("--fp8", action="store_true",
                   help="the DeepSeek-V3 FP8 layout: block projections in e4m3 with 128 x 128 weight_scale_inv")
    for name in ("run", "all"):
        r = sub.add_parser(name)
        r.add_argument("--method", default="wanda")
        r.add_argument("--methods", default="wanda,sparsegpt")
        r.add_argument("--nsamples", type=int, default=8)
        r.add_argument("--seqlen", type=int, default=256)
        r.add_argument("--extra", default="--stream on")
        r.add_argument("--sparsity", default="0.5")
        r.add_argument("--matrix", default="qwen3-30b-a3b:1,mixtral-8x7b:1")
        r.add_argument("--model", default=None)
        r.add_argument("--scratch", type=Path, default=Path("/tmp/d2prune-moe"))
        r.add_argument("--md", type=Path, default=ROOT / "bench" / "MOE_SCALE.md")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.shape, a.blocks, a.dir, verify=a.verify, sparse=a.sparse, fp8=a.fp8)
        return 0
    runs = ([(a.model, None, a.method)] if a.cmd == "run" else
            [(None, spec, m) for spec in a.matrix.split(",") for m in a.methods.split(",")])
    rows, started = [], datetime.datetime.now().isoformat(timespec="seconds")
    for model, spec, method in runs:
        depth = None
        if model is None:
            shape, blocks = spec.split(":")
            model = str(build(shape, int(blocks), a.scratch / f"{shape}-{blocks}"))
            depth = SHAPES[shape]["depth"]
        row = scale.run_one(model, method, a.nsamples, a.seqlen, shlex.split(a.extra),
                            a.scratch / "out" / Path(model).name, depth=depth, load="off", sparsity=a.sparsity)
        rows.append(row)
        if a.cmd == "run":  # one row, to be merged into a table by hand
            print(scale.table_row(row), end="")
            print(json.dumps(row, default=str))
        if a.cmd == "all":
            write_markdown(a.md, shlex.join(["python", "bench/moe_scale.py", *(argv or sys.argv[1:])]), rows,
                           started, done=False)
    if a.cmd == "all":
        write_markdown(a.md, shlex.join(["python", "bench/moe_scale.py", *(argv or sys.argv[1:])]), rows,
                       started, done=True)
    return 0


def write_markdown(path: Path, command: str, rows: list[dict], started: str, done: bool) -> None:
    mach = scale.machine()
    lines = ["# MoE blocks of real width", "",
             "Qwen3-30B-A3B- and Mixtral-8x7B-shaped checkpoints with a few real-width blocks (random bf16 weights, "
             "per-expert tensors as the published checkpoints store them) pruned to 50% by `d2prune prune` in a "
             "subprocess (`bench/moe_scale.py`, measurement from `bench/scale.py`)"
             + ("" if done else " - **run in progress / incomplete**") + ".", "",
             f"Machine: {mach['nproc']} CPU cores, {mach['cpu']}, {mach['ram_gb']:.1f} GB RAM, GPU: {mach['gpu'] or 'none'}; "
             f"torch {mach['torch']}, transformers {mach['transformers']}, d2prune at {mach['git']}; started {started}.", "",
             "```bash", command, "```", "", scale.table_header().rstrip("\n")]
    lines += [scale.table_row(r).rstrip("\n") for r in rows]
    lines += ["", "Exact commands:", "", "```bash"] + [r["command"] for r in rows] + ["```", "",
              "Peak RSS: the pruning process's high-water mark (VmHWM) or its tree's sampled VmRSS, whichever is "
              "larger. s/block: d2prune's prune_seconds / blocks. Full depth: s/block x the real model's depth "
              "(48 for Qwen3-30B-A3B, 32 for Mixtral-8x7B): extrapolated, not measured. Random weights: the "
              "timings and memory are representative, the pruned models are not.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
