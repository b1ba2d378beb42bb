"""Quantized checkpoints: which ones d2prune reads, and their weights de-quantized.

The largest open models ship quantized (docs/quantized.md): FP8 (e4m3) weights
with 128 x 128 block scales (DeepSeek-V3 / R1, Kimi-K2, the Qwen3 / GLM FP8
releases: ``quantization_config.quant_method = "fp8"``, one
``weight_scale_inv`` per weight), compressed-tensors FP8 (llm-compressor:
``"compressed-tensors"``, ``format`` ``float-quantized``, one ``weight_scale``
per channel, per tensor or per block) and MXFP4 (GPT-OSS: ``"mxfp4"``,
``*_blocks`` of packed e2m1 pairs and ``*_scales`` of e8m0 exponents per 32
values). :func:`describe` reads a checkpoint's ``quantization_config`` into a
:class:`Quantization`, refusing by name, before any weight is read, the
formats d2prune cannot read (GPTQ / AWQ int4, bitsandbytes, ...) with the
conversion that would help. The functions below de-quantize one weight at a
time with the numerics of transformers' own loaders (``Fp8Dequantize``,
compressed-tensors' ``dequantize``, ``convert_moe_packed_tensors``), so the
streamed reader (:class:`d2prune.io.streaming.QuantizedReader`) gives the
tensors ``from_pretrained`` gives with de-quantization on.

Pure tensor code: no file is read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import D2PruneError

FP8_BLOCK = "fp8"  # transformers' FineGrainedFP8 (DeepSeek-V3 layout)
CT_FP8 = "compressed-tensors"  # llm-compressor's float-quantized FP8
MXFP4 = "mxfp4"  # GPT-OSS
SUPPORTED = (FP8_BLOCK, CT_FP8, MXFP4)
OWN = "d2prune-sparse"  # d2prune's own compressed format (io/sparse_format.py): read elsewhere

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# the names of the tensors that only serve to de-quantize a weight (never a model parameter)
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".activation_scale", ".weight_zero_point",
                  ".weight_global_scale", ".input_global_scale", ".k_scale", ".v_scale")
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
MX_GROUP = 32  # values per e8m0 scale (two e2m1 values per byte: 16 bytes)
# the e2m1 values of the 16 nibbles (transformers' integrations/mxfp4.py FP4_VALUES)
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# quant_method -> (what it is, what to do instead): refused before any weight is read
REFUSED = {
    "gptq": ("GPTQ int4/int8 weights",
             "prune the float checkpoint it was quantized from and quantize the pruned model with GPTQ again"),
    "awq": ("AWQ int4 weights",
            "prune the float checkpoint it was quantized from and quantize the pruned model with AWQ again"),
    "bitsandbytes": ("bitsandbytes 4/8-bit weights",
                     "load it with bitsandbytes, call model.dequantize() and save_pretrained the float model, then prune "
                     "that folder (or prune the float checkpoint it came from)"),
    "gguf": ("GGUF weights in a safetensors folder", "pass the .gguf file itself as --model"),
}
CONVERT_HINT = ("prune the float checkpoint it was made from, or de-quantize it to a float safetensors folder "
                "(transformers: from_pretrained, model.dequantize(), save_pretrained) and prune that")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's weights are quantized (from ``config.json``'s ``quantization_config``).

    ``method``: :data:`FP8_BLOCK`, :data:`CT_FP8` or :data:`MXFP4`;
    ``block``: the FP8 weight block ``(rows, columns)`` (None: the scale's
    shape says: per tensor, per channel); ``config``: the section as written."""

    method: str
    block: tuple[int, int] | None = None
    config: dict = field(default_factory=dict, compare=False)

    @property
    def scale_suffix(self) -> str:
        return "weight_scale_inv" if self.method == FP8_BLOCK else "weight_scale"

    def describe(self) -> str:
        if self.method == MXFP4:
            return "MXFP4 (e2m1 values, one e8m0 scale per 32)"
        what = "FP8 block-scaled" if self.method == FP8_BLOCK else "compressed-tensors FP8"
        return what + (f" ({self.block[0]} x {self.block[1]} blocks)" if self.block else "")

    # ------------------------------------------------------------------ the checkpoint's tensors
    def plan(self, dtypes: dict[str, torch.dtype]) -> tuple[dict[str, dict[str, str]], set[str]]:
        """``(quantized, hidden)`` for a checkpoint whose tensors have
        ``dtypes``: ``quantized`` = ``{weight name as the model reads it:
        {"q": stored values, "scale": stored scales}}``, ``hidden`` = the
        stored names no parameter is made of directly (the parts and every
        scale). A quantized weight without its scale is refused by name."""
        quantized: dict[str, dict[str, str]] = {}
        if self.method == MXFP4:
            for n in dtypes:
                if n.endswith(MX_BLOCKS):
                    base = n[: -len(MX_BLOCKS)]
                    if base + MX_SCALES not in dtypes:
                        raise D2PruneError(f"tensor {n} has no scale tensor {base + MX_SCALES} in the checkpoint")
                    quantized[base] = {"q": n, "scale": base + MX_SCALES}
            hidden = {p for parts in quantized.values() for p in parts.values()}
            return quantized, hidden
        for n, dt in dtypes.items():
            if dt in FP8_DTYPES:
                if not n.endswith(".weight"):
                    raise D2PruneError(f"tensor {n} is stored in {dt} but is not a weight: d2prune does not know "
                                       f"how to de-quantize it")
                scale = n[: -len("weight")] + self.scale_suffix
                if scale not in dtypes:
                    raise D2PruneError(f"tensor {n} is stored in {str(dt).removeprefix('torch.')} but its scale "
                                       f"tensor {scale} is missing from the checkpoint")
                quantized[n] = {"q": n, "scale": scale}
        hidden = {n for n in dtypes if n.endswith(SCALE_SUFFIXES)}
        return quantized, hidden

    def shape(self, name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The de-quantized shape of ``name`` from its parts' shapes (``{"q":, "scale":}``)."""
        if self.method == MXFP4:
            experts, rows, groups, nbytes = shapes["q"]
            return experts, groups * nbytes * 2, rows
        return tuple(shapes["q"])

    def dequantize(self, name: str, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Weight ``name`` de-quantized into ``dtype`` from its parts (as :meth:`plan` names them)."""
        if self.method == MXFP4:
            out = dequantize_mxfp4(parts["q"], parts["scale"], dtype, name)
        elif self.method == FP8_BLOCK:
            out = dequantize_fp8_block(parts["q"], parts["scale"], self.block, dtype, name)
        else:
            out = dequantize_ct_fp8(parts["q"], parts["scale"], self.block, dtype, name)
        check_finite(out, name)
        return out


def describe(quant: dict | None, where: str = "the model") -> Quantization | None:
    """The :class:`Quantization` of a ``quantization_config`` section (None:
    not quantized, or d2prune's own sparse format); a format d2prune does not
    read is refused by name with the conversion that would help."""
    if not quant:
        return None
    if not isinstance(quant, dict):
        to_dict = getattr(quant, "to_dict", None)
        quant = to_dict() if callable(to_dict) else {}
    method = str(quant.get("quant_method", "")).lower().replace("_", "-")
    if method == OWN:
        return None
    if method == "bitsandbytes" or quant.get("load_in_4bit") or quant.get("load_in_8bit"):
        method = "bitsandbytes"
    if method in REFUSED:
        what, hint = REFUSED[method]
        raise D2PruneError(f"{where} is quantized with {what} (quant_method {quant.get('quant_method')!r}), which "
                           f"d2prune cannot read: {hint}")
    if method == FP8_BLOCK:
        block = quant.get("weight_block_size")
        if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2
                                      and all(isinstance(b, int) and b > 0 for b in block)):
            raise D2PruneError(f"{where}: quantization_config.weight_block_size {block!r} is not two positive "
                               "integers")
        fmt = str(quant.get("fmt", "e4m3"))
        if fmt != "e4m3":
            raise D2PruneError(f"{where}: FP8 format {fmt!r} is not read (only e4m3): {CONVERT_HINT}")
        return Quantization(FP8_BLOCK, tuple(block) if block else None, quant)
    if method == MXFP4:
        return Quantization(MXFP4, None, quant)
    if method == CT_FP8:
        return _compressed_tensors(quant, where)
    raise D2PruneError(f"{where} is quantized with an unknown method (quant_method {quant.get('quant_method')!r}): "
                       f"d2prune reads FP8 (fp8, compressed-tensors float-quantized) and MXFP4 checkpoints; "
                       f"{CONVERT_HINT}")


def _compressed_tensors(quant: dict, where: str) -> Quantization:
    """compressed-tensors: FP8 weights (``float-quantized`` / ``naive-quantized``,
    8-bit float, symmetric) are read; every other scheme (int4 pack-quantized,
    NVFP4, 2:4 sparse-compressed...) is refused by name."""
    fmt = quant.get("format")
    groups = quant.get("config_groups") or {}
    blocks = set()
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        kind = f"{w.get('num_bits')}-bit {w.get('type')}"
        if w and (w.get("type") != "float" or w.get("num_bits") != 8 or w.get("symmetric") is False):
            raise D2PruneError(f"{where} is quantized with compressed-tensors {kind} weights (group {name}, format "
                               f"{fmt!r}), which d2prune cannot read (FP8 weights only): {CONVERT_HINT}")
        if w.get("strategy") == "block":
            bs = w.get("block_structure")
            if not (isinstance(bs, (list, tuple)) and len(bs) == 2):
                raise D2PruneError(f"{where}: compressed-tensors group {name} has block strategy without a "
                                   "block_structure")
            blocks.add(tuple(bs))
        elif w and w.get("strategy") not in ("tensor", "channel"):
            raise D2PruneError(f"{where}: compressed-tensors FP8 strategy {w.get('strategy')!r} (group {name}) is "
                               f"not read (tensor, channel, block are): {CONVERT_HINT}")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise D2PruneError(f"{where} is stored in compressed-tensors format {fmt!r}, which d2prune cannot read "
                           f"(float-quantized FP8 only): {CONVERT_HINT}")
    if len(blocks) > 1:
        raise D2PruneError(f"{where}: compressed-tensors groups use different block structures {sorted(blocks)}")
    return Quantization(CT_FP8, blocks.pop() if blocks else None, quant)


def undivided(quant: Quantization, headers: dict[str, tuple[tuple[int, ...], str]]) -> tuple[str, tuple] | None:
    """The first FP8 weight (``headers``: ``{name: (shape, safetensors dtype)}``)
    that ``quant``'s block does not divide, with its shape; None if every one is whole blocks."""
    if quant.block is None:
        return None
    for name, (shape, dtype) in sorted(headers.items()):
        if dtype.startswith("F8_") and len(shape) >= 2 and (shape[-2] % quant.block[0] or shape[-1] % quant.block[1]):
            return name, shape
    return None


# --------------------------------------------------------------------------- numerics
def check_finite(t: Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise D2PruneError(f"NaN/Inf in weight {name} after de-quantization: the checkpoint is corrupt")


def _grid(q: Tensor, scale: Tensor, block: tuple[int, int] | None, name: str, suffix: str) -> tuple[int, int]:
    """The block ``(rows, columns)`` one scale covers in the last two
    dimensions of ``q``: the configured block (the scale grid must be
    ``ceil(rows / block)`` x ``ceil(columns / block)``: DeepSeek-V3's
    kv_a_proj_with_mqa has 576 rows, 4.5 blocks of 128, the last one partial),
    or, with no block configured, what the scale's shape says (per tensor:
    one scale; per channel: one per row)."""
    if q.dim() < 2:
        raise D2PruneError(f"tensor {name} of shape {list(q.shape)} is not a matrix: it cannot be block-de-quantized")
    rows, cols = q.shape[-2:]
    lead = tuple(q.shape[:-2])
    if block is None:
        if scale.numel() == 1:
            return rows, cols
        if tuple(scale.shape) in ((*lead, rows, 1), (*lead, rows)):
            return 1, cols
        raise D2PruneError(f"scale {suffix} of {name} has shape {list(scale.shape)}: a weight of shape "
                           f"{list(q.shape)} wants one scale, one per row [{rows}, 1], or a block size in the config")
    bm, bn = block
    want = (*lead, math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(scale.shape) != want:
        raise D2PruneError(f"scale {suffix} of {name} has shape {list(scale.shape)}; a weight of shape "
                           f"{list(q.shape)} in {bm} x {bn} blocks needs {list(want)}")
    return bm, bn


def _expand(scale: Tensor, bm: int, bn: int, rows: int, cols: int) -> Tensor:
    """Block scales ``[..., R/bm, C/bn]`` spread over ``[..., rows, cols]`` (a partial last block kept)."""
    return scale.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]


def dequantize_fp8_block(q: Tensor, scale_inv: Tensor, block: tuple[int, int] | None, dtype: torch.dtype,
                         name: str = "weight") -> Tensor:
    """FP8 values times their block's ``weight_scale_inv``, computed in fp32
    and rounded once into ``dtype`` (transformers' ``Fp8Dequantize``; e8m0
    scales stored as bytes are ``2 ** (byte - 127)``). Blocks follow the
    configured ``block``; where it does not divide the weight the last block
    is partial, as the checkpoint's writer made it (transformers instead
    divides the weight evenly by the scale grid, which silently mis-scales such
    a weight: docs/quantized.md §2)."""
    if q.dtype not in FP8_DTYPES:
        raise D2PruneError(f"tensor {name} is stored in {q.dtype}, not FP8, but has a weight_scale_inv")
    rows, cols = (q.shape[-2:] if q.dim() >= 2 else (1, q.numel()))
    if q.dim() < 2 and scale_inv.numel() != 1:
        raise D2PruneError(f"tensor {name} of shape {list(q.shape)} is not a matrix: it cannot be block-de-quantized")
    s = scale_inv.to(torch.float32) if scale_inv.dtype != torch.uint8 else (scale_inv.to(torch.float32) - 127.0).exp2()
    if scale_inv.numel() == 1 and (block is None or scale_inv.dim() == 0):  # one scale for the tensor
        return (q.to(torch.float32) * s.reshape(())).to(dtype)
    bm, bn = _grid(q, scale_inv, block, name, "weight_scale_inv")
    return (q.to(torch.float32) * _expand(s, bm, bn, rows, cols)).to(dtype)


def dequantize_ct_fp8(q: Tensor, scale: Tensor, block: tuple[int, int] | None, dtype: torch.dtype,
                      name: str = "weight") -> Tensor:
    """compressed-tensors FP8: ``q.to(scale.dtype) * scale`` (per tensor, per
    channel ``[rows, 1]`` or per block), computed in the scale's dtype as
    compressed-tensors' ``dequantize`` does, then cast to ``dtype``."""
    if q.dtype not in FP8_DTYPES:
        raise D2PruneError(f"tensor {name} is stored in {q.dtype}, not FP8, but has a weight_scale")
    if scale.numel() == 1 and (block is None or scale.dim() == 0):  # per tensor
        return (q.to(scale.dtype) * scale.reshape(())).to(dtype)
    bm, bn = _grid(q, scale, block, name, "weight_scale")
    rows, cols = q.shape[-2:]
    if bm == 1 and bn == cols:  # per channel
        s = scale.reshape(*q.shape[:-1], 1)
    else:
        s = _expand(scale, bm, bn, rows, cols)
    return (q.to(scale.dtype) * s).to(dtype)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype, name: str = "weight") -> Tensor:
    """MXFP4 ``*_blocks`` ``[..., rows, G, 16]`` (two e2m1 values per byte, low
    nibble first) and ``*_scales`` ``[..., rows, G]`` (e8m0: ``2 ** (s - 127)``)
    -> ``[E, G * 32, rows]`` in ``dtype``: transformers' ``convert_moe_packed_tensors``
    step for step (the values looked up in ``dtype``, ``ldexp`` by the exponent),
    transposed to the layout GPT-OSS's experts compute with."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise D2PruneError(f"MXFP4 tensors of {name} are {blocks.dtype} / {scales.dtype}, not uint8")
    if blocks.dim() != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise D2PruneError(f"scale {name}{MX_SCALES} has shape {list(scales.shape)}; {name}{MX_BLOCKS} of shape "
                           f"{list(blocks.shape)} needs {list(blocks.shape[:-1])} (experts, rows, groups)")
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    *prefix, groups, nbytes = blocks.shape
    total = math.prod(prefix) * groups
    flat = blocks.reshape(total, nbytes)
    exp = scales.to(torch.int32).reshape(total, 1) - 127
    out = torch.empty(total, nbytes * 2, dtype=dtype)
    out[:, 0::2] = lut[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(flat >> 4).to(torch.int)]
    torch.ldexp(out, exp, out=out)
    return out.reshape(*prefix, groups * nbytes * 2).transpose(1, 2).contiguous()
