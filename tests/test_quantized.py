"""Quantized checkpoints (docs/quantized.md): FP8 block-scaled (DeepSeek-V3
layout), compressed-tensors FP8 and MXFP4 (GPT-OSS) read streamed and in
memory, equal to transformers' own de-quantization; the formats d2prune
cannot read refused by name before any weight is read.

The checkpoints are built here from tiny random bf16 models, quantized by the
small independent quantizers below (not d2prune's code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_shared
from d2prune import D2PruneError
from test_stream_mapping import _config, _save_tokenizer, _streamed_equals_from_pretrained

BLOCK = 8  # transformers reads any block size; 8 divides every projection of the tiny DeepSeek-V3
MAG = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp8_blocks(w: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as e4m3 values and one ``weight_scale_inv`` per ``bm x bn`` block (the last ones partial)."""
    rows, cols = w.shape
    sr, sc = -(-rows // bm), -(-cols // bn)
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, R, K]`` as MXFP4 ``blocks [E, R, K/32, 16]`` (nearest e2m1, low nibble first) and e8m0 ``scales``."""
    E, R, K = w.shape
    g = w.float().reshape(E, R, K // 32, 32)
    e = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=2.0 ** -126) / 6.0)).clamp(-127, 127)
    v = g / torch.exp2(e)[..., None]
    idx = ((v.abs()[..., None] - MAG).abs().argmin(-1) + 8 * (v < 0).long()).to(torch.uint8)
    return (idx[..., 0::2] | (idx[..., 1::2] << 4)).contiguous(), (e + 127).to(torch.uint8)


def _deepseek_config(vocab: int = 128, kv_lora_rank: int = 16):
    """test_stream_mapping's DeepSeek-V3 (block 0 dense, block 1 MoE with a
    shared expert): every projection is whole 8 x 8 blocks."""
    import transformers

    kw = _config("deepseek_v3").to_dict()
    kw.update(kv_lora_rank=kv_lora_rank, vocab_size=vocab)
    return transformers.DeepseekV3Config(**{k: kw[k] for k in (
        "moe_intermediate_size", "intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
        "first_k_dense_replace", "n_group", "topk_group", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
        "qk_nope_head_dim", "v_head_dim", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "max_position_embeddings")}, rope_scaling=None)


def _write(folder: Path, model, tokenizer_from: Path | None) -> None:
    import shutil

    model.save_pretrained(folder)
    if tokenizer_from is None:
        _save_tokenizer(folder, model.config.vocab_size)
    else:
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / f, folder / f)


def _requantize_config(folder: Path, section: dict) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = section
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def fp8_checkpoint(folder: Path, block=(BLOCK, BLOCK), tokenizer_from: Path | None = None, cfg=None) -> dict:
    """A tiny DeepSeek-V3 in the DeepSeek-V3 FP8 layout: every projection of
    the blocks (experts one tensor each) in e4m3 with ``weight_scale_inv``;
    norms, router, embeddings and head in bf16. Returns the bf16 originals."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg or _deepseek_config()).eval().to(torch.bfloat16)
    _write(folder, model, tokenizer_from)
    dense = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, v in dense.items():
        if ".layers." in k and k.endswith(("proj.weight", "proj_with_mqa.weight")):
            out[k], out[k.removesuffix("weight") + "weight_scale_inv"] = fp8_blocks(v, *block)
        else:
            out[k] = v
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _requantize_config(folder, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(block)})
    return dense


def mxfp4_checkpoint(folder: Path, tokenizer_from: Path | None = None) -> dict:
    """A tiny GPT-OSS in its MXFP4 layout: the fused experts as ``*_blocks`` /
    ``*_scales`` over their input dimension, everything else bf16."""
    import transformers

    cfg = _config("gpt_oss")
    if tokenizer_from is not None:
        cfg.vocab_size = 512
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().to(torch.bfloat16)
    _write(folder, model, tokenizer_from)
    dense = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, v in dense.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]: quantized along `in`
            out[k + "_blocks"], out[k + "_scales"] = mxfp4(v.transpose(1, 2))
        else:
            out[k] = v
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _requantize_config(folder, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return dense


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("layout", ["fp8", "mxfp4"])
def test_streamed_dequantized_tensors_equal_transformers(tmp_path, layout):
    """Every block parameter the streamed reader de-quantizes equals what
    ``from_pretrained`` (de-quantizing on the CPU) loads, bit for bit, and is
    the original weight within the format's quantization error."""
    from d2prune.io.streaming import load_streamed

    dense = (fp8_checkpoint if layout == "fp8" else mxfp4_checkpoint)(tmp_path)
    _streamed_equals_from_pretrained(tmp_path)
    model, _, reader = load_streamed(str(tmp_path))
    assert model.dtype == torch.bfloat16 and not hasattr(model.config, "quantization_config")
    names = ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight"] \
        if layout == "fp8" else ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    for n in names:
        got, want = reader.get(n).float(), dense[n].float()
        assert got.shape == want.shape
        tol = 2 ** -3 if layout == "fp8" else 0.5  # e4m3: 3 mantissa bits; e2m1: 1, a group's largest value as high as 6
        err = (got - want).abs() / want.abs().amax()
        assert 0 < float(err.max()) <= tol, n
    # a group of experts (docs/moe.md §4) reads those experts' blocks and scales only, de-quantized alike
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(reader.param_rows(fused, 1, 3), reader.params([fused])[fused][1:3])


def test_in_memory_load_dequantizes_and_saves_float(tmp_path):
    from d2prune.io.modeling import load_model

    fp8_checkpoint(tmp_path / "in")
    model, _, _ = load_model(str(tmp_path / "in"))
    assert {p.dtype for n, p in model.named_parameters()} <= {torch.bfloat16, torch.float32}
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


def test_partial_blocks_follow_the_configured_block():
    """DeepSeek-V3's kv_a_proj_with_mqa (576 rows of 128-row blocks) ends in a
    partial block: scale ``[i // 128, j // 128]`` for element ``(i, j)``."""
    from d2prune.io.quantized import dequantize_fp8_block

    torch.manual_seed(1)
    w = torch.randn(40, 24)
    q, s = fp8_blocks(w, 16, 16)  # 3 x 2 blocks, the last row and column partial
    got = dequantize_fp8_block(q, s, (16, 16), torch.float32)
    want = torch.empty(40, 24)
    for i in range(40):
        for j in range(24):
            want[i, j] = q[i, j].float() * s[i // 16, j // 16]
    assert torch.equal(got, want)


def test_a_partial_block_checkpoint_streams_and_is_refused_in_memory(tmp_path):
    """transformers divides a weight evenly by its scale grid (20 columns over 2
    scales: blocks of 10, not 16) and mis-scales it; the streamed reader reads
    the configured blocks, and the in-memory path refuses in one line."""
    from d2prune.io.modeling import load_model
    from d2prune.io.streaming import load_streamed

    cfg = _deepseek_config(kv_lora_rank=20)  # kv_b_proj [96, 20]: 1.25 blocks of 16 columns; kv_a_proj_with_mqa [28, 64]
    fp8_checkpoint(tmp_path, block=(16, 16), cfg=cfg)
    raw = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _, _, reader = load_streamed(str(tmp_path))
    q, s = raw[name], raw[name.removesuffix("weight") + "weight_scale_inv"]
    want = (q.float() * s.repeat_interleave(16, 0)[:96].repeat_interleave(16, 1)[:, :20]).to(torch.bfloat16)
    assert torch.equal(reader.get(name), want)
    with pytest.raises(D2PruneError, match=r"weight model\.layers\.0\.self_attn\.kv_a_proj_with_mqa\.weight \[28, 64\] is not "
                                           r"a whole number of 16 x 16 blocks.*--stream on"):
        load_model(str(tmp_path))


def test_compressed_tensors_fp8_per_channel_and_per_tensor():
    """compressed-tensors' numerics: ``q.to(scale.dtype) * scale`` in the scale's dtype."""
    from d2prune.io.quantized import Quantization, describe

    quant = describe({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                       "symmetric": True}}}})
    assert quant == Quantization("compressed-tensors")
    torch.manual_seed(2)
    q = (torch.randn(8, 16) * 50).to(torch.float8_e4m3fn)
    ch = torch.rand(8, 1, dtype=torch.bfloat16) + 0.01
    got = quant.dequantize("w", {"q": q, "scale": ch}, torch.bfloat16)
    assert torch.equal(got, q.to(torch.bfloat16) * ch)
    one = torch.tensor([0.03], dtype=torch.bfloat16)
    assert torch.equal(quant.dequantize("w", {"q": q, "scale": one}, torch.float32),
                       (q.to(torch.bfloat16) * one).float())


# --------------------------------------------------------------------------- errors
def _edit(folder: Path, **tensors) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    for k, v in tensors.items():
        k = k.replace("__", ".")
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


BAD = "model__layers__1__self_attn__o_proj__weight_scale_inv"


@pytest.mark.parametrize("case, message", [
    ("missing", r"^tensor model\.layers\.1\.self_attn\.o_proj\.weight is stored in float8_e4m3fn but its scale tensor "
                r"model\.layers\.1\.self_attn\.o_proj\.weight_scale_inv is missing from the checkpoint$"),
    ("shape", r"^scale weight_scale_inv of model\.layers\.1\.self_attn\.o_proj\.weight has shape \[8, 3\]; a weight of "
              r"shape \[64, 64\] in 8 x 8 blocks needs \[8, 8\]$"),
    ("nan", r"^NaN/Inf in weight model\.layers\.1\.self_attn\.o_proj\.weight after de-quantization"),
])
def test_bad_scales_are_one_line_errors_naming_the_tensor(tmp_path, case, message):
    from d2prune.io.streaming import StreamedBlocks, load_streamed

    fp8_checkpoint(tmp_path)
    bad = {"missing": None, "shape": torch.ones(8, 3), "nan": torch.full((8, 8), float("nan"))}[case]
    _edit(tmp_path, **{BAD: bad})
    with pytest.raises(D2PruneError, match=message) as e:
        model, _, reader = load_streamed(str(tmp_path))
        from d2prune.io.modeling import find_blocks

        with StreamedBlocks(find_blocks(model), reader).open(1, torch.device("cpu")):
            pass
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- refusals
REFUSED = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ int4/int8 weights", "quantize the pruned model with GPTQ again"),
    "awq": ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "AWQ int4 weights", "with AWQ again"),
    "bnb": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes 4/8-bit weights", "model.dequantize()"),
    "int4-ct": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
        "compressed-tensors 4-bit int weights", "de-quantize it to a float safetensors folder"),
    "unknown": ({"quant_method": "martian"}, "an unknown method (quant_method 'martian')", "prune the float checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
@pytest.mark.parametrize("stream", ["on", "off"])
def test_unreadable_quantized_inputs_are_refused_by_name_before_any_weight_is_read(tmp_path, capsys, kind, stream):
    from d2prune.cli import main

    import transformers

    transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=128).save_pretrained(tmp_path / "m")
    _requantize_config(tmp_path / "m", REFUSED[kind][0])
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a checkpoint: never read")
    assert main(["prune", "--model", str(tmp_path / "m"), "--method", "magnitude", "--sparsity", "0.5", "--stream",
                 stream, "--no-eval", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"d2prune: error: model {tmp_path / 'm'} is quantized with {REFUSED[kind][1]}")
    assert REFUSED[kind][2] in err[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- acceptance
@needs_shared
@pytest.mark.parametrize("layout", ["fp8", "mxfp4"])
def test_streamed_prune_equals_the_in_memory_prune(tmp_path, layout):
    """``--stream on`` and ``--stream off`` on a quantized checkpoint write the
    same pruned model, tensor for tensor (SparseGPT: weights updated too)."""
    from conftest import C4, STORIES
    from d2prune.cli import main

    if layout == "fp8":
        fp8_checkpoint(tmp_path / "in", tokenizer_from=STORIES, cfg=_deepseek_config(vocab=512))
    else:
        mxfp4_checkpoint(tmp_path / "in", tokenizer_from=STORIES)
    outs = {}
    for stream in ("on", "off"):
        assert main(["-q", "prune", "--model", str(tmp_path / "in"), "--method", "sparsegpt", "--sparsity", "0.5",
                     "--nsamples", "2", "--seqlen", "16", "--calib-file", str(C4), "--no-eval", "--stream", stream,
                     "--out", str(tmp_path / stream)]) == 0
        outs[stream] = {k: v for f in sorted((tmp_path / stream).glob("*.safetensors"))
                        for k, v in load_file(str(f)).items()}
    assert set(outs["on"]) == set(outs["off"])
    for k, v in outs["on"].items():
        assert v.dtype == outs["off"][k].dtype and torch.equal(v, outs["off"][k]), k
    pruned = [k for k in outs["on"] if ".experts." in k and not k.endswith("bias")]
    assert pruned and all(float((outs["on"][k] == 0).float().mean()) >= 0.49 for k in pruned)
