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
                     "--save-format", "dense", "--out", str(tmp_path / stream)]) == 0
        outs[stream] = _tensors(tmp_path / stream)
    assert set(outs["on"]) == set(outs["off"])
    for k, v in outs["on"].items():
        assert v.dtype == outs["off"][k].dtype and torch.equal(v, outs["off"][k]), k
    pruned = [k for k in outs["on"] if ".experts." in k and not k.endswith("bias")]
    assert pruned and all(float((outs["on"][k] == 0).float().mean()) >= 0.49 for k in pruned)


# --------------------------------------------------------------------------- writing (--save-format same)
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (torch.equal does not compare FP8 tensors)."""
    return t.contiguous().view(torch.uint8)


def test_fp8_block_quantization_is_transformers_own():
    """``quantize_fp8_block`` = transformers' ``Fp8Quantize`` bit for bit (its
    per-tile scale, clamp and cast; ue8m0 scales rounded up to powers of two),
    and zeros come back exact zeros."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    from d2prune.io.quantized import dequantize_fp8_block, quantize_fp8_block

    torch.manual_seed(3)
    w = torch.randn(2, 32, 48, dtype=torch.bfloat16) * 0.02
    w[w.abs() < 0.01] = 0
    w[0, :16, :16] = 0  # an all-zero tile
    for fmt in ("float", "ue8m0"):
        cfg = SimpleNamespace(weight_block_size=[16, 16], scale_fmt=fmt)
        want = Fp8Quantize(SimpleNamespace(quantization_config=cfg))._quantize_one("x.weight", w)
        q, s = quantize_fp8_block(w, (16, 16), want["x.weight_scale_inv"].dtype, fmt == "ue8m0")
        assert torch.equal(_bits(q), _bits(want["x.weight"]))
        assert torch.equal(s.float(), want["x.weight_scale_inv"].float())
        back = dequantize_fp8_block(q, s, (16, 16), torch.float32)
        assert torch.equal(back == 0, w == 0)


def test_mxfp4_rounding_and_zeros():
    """MXFP4 as the triton kernel transformers quantizes with: the group's
    scale is ``amax / 6`` rounded up to a power of two, each value rounded to
    the nearest e2m1 value with ties away from zero; 0 and -0 stay zeros."""
    from d2prune.io.quantized import dequantize_mxfp4, quantize_mxfp4

    vals = [0.0, -0.0, 0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.49, 2.5, 3.5, 5.0, -5.0, -0.25, 6.0]
    want = [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 6.0, -6.0, -0.5, 6.0]
    w = torch.zeros(1, 32, len(vals))  # [E, in, out]: one group of 32 inputs per output column
    w[0, 0] = 6.0 * 8  # the group's amax: scale 8 (6 * 8 / 6, a power of two)
    w[0, 1] = torch.tensor(vals) * 8
    blocks, scales = quantize_mxfp4(w)
    assert scales.shape == (1, len(vals), 1) and bool((scales == 127 + 3).all())
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    assert back[0, 1].tolist() == [v * 8 for v in want]
    assert torch.equal(back[0, 2:], torch.zeros(30, len(vals)))


def test_compressed_tensors_fp8_quantization():
    """compressed-tensors' symmetric FP8 ``quantize``: ``scale = amax / 448`` in
    the scale's dtype, ``clamp(w / scale)`` cast to e4m3, at the input's
    granularity (its scale's shape); zeros stay zeros."""
    from d2prune.io.quantized import dequantize_ct_fp8, quantize_ct_fp8

    torch.manual_seed(4)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    w[:, ::2] = 0
    w[3] = 0  # an all-zero channel: the smallest scale, not 0
    for shape, block in (((16, 1), None), ((1,), None), ((2, 4), (8, 8))):
        q, s = quantize_ct_fp8(w, block, shape, torch.bfloat16)
        assert s.shape == shape and s.dtype == torch.bfloat16
        if shape == (16, 1):
            ref = (w.abs().amax(1, keepdim=True) / 448.0).clamp(min=torch.finfo(torch.float32).eps)
            assert torch.equal(s, ref)
            assert torch.equal(_bits(q), _bits((w / ref).clamp(-448, 448).to(torch.float8_e4m3fn)))
        back = dequantize_ct_fp8(q, s, block, torch.float32)
        assert torch.equal(back == 0, w == 0)


def _prune(model: Path, out: Path, *flags: str) -> None:
    from conftest import C4
    from d2prune.cli import main

    assert main(["-q", "prune", "--model", str(model), "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "2",
                 "--seqlen", "16", "--calib-file", str(C4), "--no-eval", "--out", str(out), *flags]) == 0


@needs_shared
@pytest.mark.parametrize("layout", ["fp8", "mxfp4"])
def test_same_format_output(tmp_path, monkeypatch, layout):
    """``--save-format same`` (the default) on an FP8 / MXFP4 input: streamed
    (the experts written back and quantized a few at a time) and in memory
    (whole) the same bytes, tensor for tensor; the input's tensor names,
    shapes and dtypes and its ``quantization_config``; loaded by
    ``from_pretrained``, its de-quantized weights keep every pruned zero, and
    its logits are the bf16 output's within the re-quantization error."""
    import transformers
    from conftest import STORIES
    from d2prune.io import quantized, streaming

    if layout == "fp8":
        fp8_checkpoint(tmp_path / "in", tokenizer_from=STORIES, cfg=_deepseek_config(vocab=512))
    else:
        mxfp4_checkpoint(tmp_path / "in", tokenizer_from=STORIES)
    _prune(tmp_path / "in", tmp_path / "off", "--stream", "off")
    # the tiny blocks' fused experts are 16-32 KB: the larger ones written back 2 experts at a time, and every
    # group quantized one expert at a time
    with monkeypatch.context() as m:
        m.setattr(streaming, "EXPERT_CHUNK_BYTES", 20000)
        m.setattr(quantized, "ENCODE_BYTES", 1000)
        _prune(tmp_path / "in", tmp_path / "on", "--stream", "on")
    _prune(tmp_path / "in", tmp_path / "bf16", "--stream", "on", "--save-format", "bf16")
    inp, on, off, dense = (_tensors(tmp_path / f) for f in ("in", "on", "off", "bf16"))
    assert {k: (v.shape, v.dtype) for k, v in on.items()} == {k: (v.shape, v.dtype) for k, v in inp.items()}
    assert set(off) == set(on) and all(torch.equal(_bits(v), _bits(off[k])) for k, v in on.items())
    quantized = [k for k, v in inp.items()
                 if v.dtype in (torch.float8_e4m3fn, torch.uint8) and not k.endswith("scales")]
    assert quantized and not any(torch.equal(_bits(on[k]), _bits(inp[k])) for k in quantized)  # new values
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    section = json.loads((tmp_path / "in" / "config.json").read_text())["quantization_config"]
    assert config["quantization_config"] == section
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "on").eval()  # on a CPU: de-quantized
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    got, want = model.state_dict(), ref.state_dict()
    pruned = [k for k in want if ".layers." in k and ("proj" in k or "experts" in k) and want[k].dim() >= 2
              and not k.endswith("bias")]
    assert pruned
    for k in pruned:  # every zero of the pruned model is an exact zero after re-quantization
        assert bool((got[k][want[k] == 0] == 0).all()), k
        assert float((got[k] == 0).float().mean()) >= 0.49, k
    record = json.loads((tmp_path / "on" / "d2prune.json").read_text())
    err = record["requantization"]["error"]
    rows = [r for r in record["layers"] if r["requant_error"] is not None]
    assert rows and all(0 < r["requant_error"] < (0.002 if layout == "fp8" else 0.03) for r in rows)
    unquantized = {r["name"].split(".", 3)[3] for r in record["layers"] if r["requant_error"] is None}
    # the router, the experts' biases and GPT-OSS's attention are not quantized in the input
    assert unquantized == ({"mlp.gate.weight"} if layout == "fp8" else {
        "mlp.router.weight", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias",
        *(f"self_attn.{p}_proj" for p in "qkvo")})
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits.float()
    # re-quantization moves every weight by sqrt(err) of its norm (FP8 ~2.4%, MXFP4 ~11%); through two residual
    # blocks of independent errors the logits move by about as much, not more: measured 0.81x (FP8) and 0.54x
    # (MXFP4) of it; bounded at 2x
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 2 * err ** 0.5, (rel, err ** 0.5)


@needs_shared
@pytest.mark.parametrize("stream", ["on", "off"])
def test_full_disk_while_requantizing(tmp_path, capsys, monkeypatch, stream):
    """A full disk half way through the re-quantized shards: one line, no
    output and nothing of ours left beside it (the resume folder aside); the
    same command then writes the output."""
    import errno

    from conftest import C4, STORIES
    from d2prune.cli import main
    from d2prune.io import streaming

    fp8_checkpoint(tmp_path / "in", tokenizer_from=STORIES, cfg=_deepseek_config(vocab=512))
    capsys.readouterr()
    real, calls = streaming.SafetensorsWriter.write, []

    def write(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(streaming.SafetensorsWriter, "write", write)
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "in"), "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "2",
            "--seqlen", "16", "--calib-file", str(C4), "--no-eval", "--stream", stream, "--out", str(out)]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Writing model shards" not in line]
    assert len(calls) == 5 and len(err) == 1
    assert err[0].startswith("d2prune: error: no space left on device while writing")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.work"]
    monkeypatch.setattr(streaming.SafetensorsWriter, "write", real)
    assert main(["-q", *args]) == 0
    assert "quantization_config" in json.loads((out / "config.json").read_text())



@needs_shared
def test_compressed_tensors_fp8_written_back_per_channel(tmp_path):
    """stories260K as compressed-tensors FP8 (one bf16 scale per channel,
    quantized here independently), pruned streamed: written back with the
    input's names, shapes and dtypes, new per-channel scales, every pruned
    weight de-quantized at the target sparsity."""
    import shutil

    from conftest import STORIES
    from d2prune.io.quantized import describe
    from d2prune.io.streaming import QuantizedReader

    (tmp_path / "in").mkdir()
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "config.json"):
        shutil.copy(STORIES / f, tmp_path / "in" / f)
    out = {}
    for k, v in load_file(str(STORIES / "model.safetensors")).items():
        v = v.to(torch.bfloat16)
        if k.endswith("proj.weight"):
            s = v.abs().amax(1, keepdim=True) / 448.0
            out[k], out[k + "_scale"] = (v / s).clamp(-448, 448).to(torch.float8_e4m3fn), s
        else:
            out[k] = v
    save_file(out, str(tmp_path / "in" / "model.safetensors"), metadata={"format": "pt"})
    section = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}},
        "ignore": ["lm_head"]}
    _requantize_config(tmp_path / "in", section)
    _prune(tmp_path / "in", tmp_path / "out", "--stream", "on")
    got = _tensors(tmp_path / "out")
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in out.items()}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == section
    reader = QuantizedReader(tmp_path / "out", describe(section))
    pruned = [k for k in out if k.endswith("proj.weight")]
    assert len(pruned) == 5 * 7
    for k in pruned:
        assert not torch.equal(got[k + "_scale"], out[k + "_scale"])  # new scales, from the pruned weight
        assert float((reader.get(k) == 0).float().mean()) >= 0.5, k
