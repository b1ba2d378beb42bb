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


# --------------------------------------------------------------------------- quantizing (the output)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
UE8M0 = "ue8m0"


def _e8m0(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Power-of-two scales stored as ``dtype``: fp32 / bf16 as they are,
    ``float8_e8m0fnu`` exactly, ``uint8`` as the biased exponent byte."""
    if dtype == torch.uint8:
        return (torch.log2(scale) + 127).round().clamp(0, 254).to(torch.uint8)
    return scale.to(dtype)


def quantize_fp8_block(w: Tensor, block: tuple[int, int] | None, scale_dtype: torch.dtype = torch.float32,
                       ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """``w [..., rows, cols]`` -> ``(e4m3 values, weight_scale_inv)``: the
    inverse of :func:`dequantize_fp8_block`, with transformers' numerics
    (``Fp8Quantize``: per ``block`` tile, ``scale = 448 / amax`` in fp32, an
    all-zero tile scaled by 1, ``q = clamp(w * scale, ±448)`` cast to e4m3,
    ``weight_scale_inv = 1 / scale``; ``ue8m0``: the inverse rounded up to a
    power of two first, as DeepSeek-V3.1's ``scale_fmt: ue8m0``). A block
    that does not divide the weight leaves a partial last tile, whose amax is
    over the elements it has (DeepSeek's own ``weight_dequant`` grid). ``block``
    None: one scale for the tensor. Zeros stay exact zeros (0 * scale = 0)."""
    rows, cols = w.shape[-2:]
    bm, bn = block or (rows, cols)
    e8m0 = scale_dtype in (torch.uint8, getattr(torch, "float8_e8m0fnu", None))
    ue8m0 = ue8m0 or e8m0  # scales stored as exponents are powers of two
    sr, sc = math.ceil(rows / bm), math.ceil(cols / bn)
    x = w.to(torch.float32)
    if (sr * bm, sc * bn) != (rows, cols):  # zeros do not change a tile's amax
        x = torch.nn.functional.pad(x, (0, sc * bn - cols, 0, sr * bm - rows))
    tiles = x.reshape(*w.shape[:-2], sr, bm, sc, bn)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    inv = 1.0 / scale
    if ue8m0:  # the stored inverse is a power of two; the forward scale its exact reciprocal
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scale = 1.0 / inv
    q = torch.clamp(tiles * scale[..., :, None, :, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*w.shape[:-2], sr * bm, sc * bn)[..., :rows, :cols].contiguous()
    if block is None:
        inv = inv.reshape(inv.shape[:-2])
    return q, (_e8m0(inv, scale_dtype) if e8m0 else inv.to(scale_dtype))


def quantize_ct_fp8(w: Tensor, block: tuple[int, int] | None, scale_shape: tuple[int, ...],
                    scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``w`` -> ``(e4m3 values, weight_scale)`` as compressed-tensors'
    symmetric FP8 ``quantize`` does: ``scale = amax / 448`` in the scale's
    dtype (at least fp32's eps), ``q = clamp(w / scale, ±448)`` cast to e4m3,
    per tensor, per channel (``[rows, 1]``) or per block; which one is the
    input's (``scale_shape``: the input's scale tensor). The inverse of
    :func:`dequantize_ct_fp8`; zeros stay exact zeros."""
    rows, cols = w.shape[-2:]
    x = w.to(scale_dtype)
    if math.prod(scale_shape) == 1 and (block is None or len(scale_shape) <= 1):  # per tensor
        s = (x.abs().amax().to(scale_dtype) / FP8_MAX).clamp(min=torch.finfo(torch.float32).eps)
        q = torch.clamp(x / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, s.reshape(scale_shape)
    if block is None:  # per channel: one scale per row
        s = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).eps)
        q = torch.clamp(x / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, (s.squeeze(-1) if len(scale_shape) == w.dim() - 1 else s)  # [rows, 1] or [rows], as the input
    bm, bn = block
    sr, sc = math.ceil(rows / bm), math.ceil(cols / bn)
    pad = torch.nn.functional.pad(x.float(), (0, sc * bn - cols, 0, sr * bm - rows)).to(scale_dtype)
    amax = pad.reshape(*w.shape[:-2], sr, bm, sc, bn).abs().amax(dim=(-3, -1))
    s = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(x / _expand(s, bm, bn, rows, cols), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w [E, G * 32, rows]`` (GPT-OSS's experts layout) -> MXFP4 ``blocks
    [E, rows, G, 16]`` and e8m0 ``scales [E, rows, G]``: the inverse of
    :func:`dequantize_mxfp4`, with the numerics of the triton kernel that
    transformers quantizes with (``downcast_to_mxfp``): per 32 values,
    ``scale = amax / 6`` rounded *up* to a power of two (so no value clips),
    each value divided by it and rounded to the nearest e2m1 value, ties away
    from zero, packed two per byte, low nibble first. Zeros stay exact zeros
    (nibble 0, or 8: -0)."""
    x = w.to(torch.float32).transpose(1, 2)  # [E, rows, G * 32]
    E, rows, K = x.shape
    if K % MX_GROUP:
        raise D2PruneError(f"cannot quantize a weight of {K} values per row to MXFP4: not a multiple of {MX_GROUP}")
    g = x.reshape(E, rows, K // MX_GROUP, MX_GROUP)
    bits = ((g.abs().amax(-1) / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000  # rounded up to 2^e
    scale = bits.view(torch.float32)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / torch.where(scale == 0, torch.ones_like(scale), scale))
    v = (g * inv[..., None]).view(torch.int32)
    sign = (v >> 31) & 1
    exp = (v >> 23) & 0xFF
    man = v & 0x7FFFFF
    # below 1 the value is an e2m1 subnormal (0, 0.5): the implicit bit moved into the mantissa
    shift = (126 - exp).clamp(0, 31)
    man = torch.where(exp < 127, (0x400000 | (man >> 1)) >> shift, man)
    exp = exp.clamp(min=126) - 126
    code = torch.clamp((((exp << 2) | (man >> 21)) + 1) >> 1, max=7) | (sign << 3)
    code = code.to(torch.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous()
    return blocks, (bits >> 23).to(torch.uint8)


ENCODE_BYTES = 1 << 26  # fused experts are re-quantized this many bytes of them at a time (fp32 temporaries: ~8x)
REQUANT_ERROR = ("||W - D(Q(W))||_F^2 / ||W||_F^2 per weight: W the pruned float weight as written before "
                 "re-quantization, D(Q(W)) the weight the output de-quantizes to (an expert of a fused tensor: "
                 "its slice)")


class Requantizer:
    """The pruned model's float tensors, by checkpoint name (as the dense
    output writes them), encoded back into the input checkpoint's format:
    every tensor that was quantized in the input (``stored``: the input's
    tensors, ``{name: (shape, dtype)}``) becomes the same stored tensors
    (values, and scales of the input's dtype and granularity) computed from
    the pruned weight; every other one is written as it is. The input's
    other quantization tensors (static ``input_scale``, ``k_scale`` ...)
    are copied beside the weight of their module (``read``: stored names ->
    the input's tensors). :meth:`encode` records the added error per weight
    (:data:`REQUANT_ERROR`). Pure tensor code: ``read`` does the reading."""

    def __init__(self, quant: Quantization, stored: dict[str, tuple[tuple[int, ...], torch.dtype]], read):
        self.quant = quant
        self.stored = stored
        self.read = read
        self.parts, hidden = quant.plan({n: d for n, (_, d) in stored.items()})
        for name, parts in self.parts.items():
            if quant.method != MXFP4 and stored[parts["q"]][1] != torch.float8_e4m3fn:
                raise D2PruneError(f"tensor {parts['q']} is stored in {stored[parts['q']][1]}: d2prune writes FP8 "
                                   "back as e4m3 only; use --save-format dense")
        taken = {p for parts in self.parts.values() for p in parts.values()}
        self.extras: dict[str, list[str]] = {}  # weight -> the input's other quantization tensors written beside it
        weights = sorted(self.parts)
        for extra in sorted(hidden - taken):
            module = extra.rpartition(".")[0]
            while module:
                near = [w for w in weights if w.startswith(module + ".")]
                if near:
                    self.extras.setdefault(near[0], []).append(extra)
                    break
                module = module.rpartition(".")[0]
        self.errors: dict[tuple[str, int | None], list[float]] = {}  # (weight, expert or None) -> [error, norm]

    def _dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """A float tensor that was not quantized is written in the input's dtype
        (the model may hold it wider: DeepSeek-V3's router computes in fp32)."""
        if name in self.stored and dtype.is_floating_point and self.stored[name][1].is_floating_point:
            return self.stored[name][1]
        return dtype

    def _quantize(self, name: str, t: Tensor) -> dict[str, Tensor]:
        parts = self.parts[name]
        if self.quant.method == MXFP4:
            blocks, scales = quantize_mxfp4(t)
            return {parts["q"]: blocks, parts["scale"]: scales}
        shape, dtype = self.stored[parts["scale"]]
        if self.quant.method == FP8_BLOCK:
            q, s = quantize_fp8_block(t, self.quant.block, dtype, self.quant.config.get("scale_fmt") == UE8M0)
            if self.quant.block is None:
                s = s.reshape(shape)  # per tensor: the input's own shape ([] or [1])
        else:
            q, s = quantize_ct_fp8(t, self.quant.block, shape, dtype)
        return {parts["q"]: q, parts["scale"]: s}

    def spec(self, name: str, shape: tuple[int, ...],
             dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stored tensors (shape, dtype) tensor ``name`` of ``shape`` is written as."""
        if name not in self.parts:
            return {name: (tuple(shape), self._dtype(name, dtype))}
        made = self._quantize(name, torch.empty(shape, dtype=dtype, device="meta"))
        out = {k: (tuple(v.shape), v.dtype) for k, v in made.items()}
        out.update({e: self.stored[e] for e in self.extras.get(name, ())})
        return out

    def encode(self, name: str, t: Tensor, start: int = 0) -> dict[str, tuple[Tensor, int]]:
        """Tensor ``name`` (or its rows ``start:``, a group of experts) as
        ``{stored name: (tensor, first row)}``; the added error recorded."""
        if name not in self.parts:
            return {name: (t.to(self._dtype(name, t.dtype)), start)}
        per_tensor = math.prod(self.stored[self.parts[name]["scale"]][0]) == 1 and self.quant.method != MXFP4
        if per_tensor and t.dim() == 3 and start > 0:
            raise D2PruneError(f"{name} has one scale for all its experts: it cannot be re-quantized a group of "
                               "experts at a time; use --save-format dense")
        nbytes = t.numel() * t.element_size()
        if t.dim() == 3 and t.shape[0] > 1 and nbytes > ENCODE_BYTES and not per_tensor:
            # experts are quantized independently: a few at a time, so the fp32 temporaries stay small
            step = max(1, t.shape[0] * ENCODE_BYTES // nbytes)
            pieces = [self.encode(name, t[e:e + step], start + e) for e in range(0, t.shape[0], step)]
            return {k: (torch.cat([p[k][0] for p in pieces if k in p]) if k in pieces[-1] else v, first)
                    for k, (v, first) in pieces[0].items()}
        made = self._quantize(name, t)
        back = self.quant.dequantize(name, {"q": made[self.parts[name]["q"]],
                                            "scale": made[self.parts[name]["scale"]]}, torch.float32)
        w = t.to(torch.float32)
        dims = tuple(range(1, w.dim()))
        if w.dim() == 3:  # experts: one error each
            err, norm = ((w - back) ** 2).sum(dims).double(), (w ** 2).sum(dims).double()
            for e in range(w.shape[0]):
                self.errors[(name, start + e)] = [float(err[e]), float(norm[e])]
        else:
            self.errors[(name, None)] = [float(((w - back) ** 2).sum().double()), float((w ** 2).sum().double())]
        del w, back
        out = {k: (v, start) for k, v in made.items()}
        if start == 0 and self.extras.get(name):
            out.update({k: (v, 0) for k, v in self.read(self.extras[name]).items()})
        return out

    def encode_all(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Whole tensors by checkpoint name -> the stored tensors."""
        return {k: v for name, t in tensors.items() for k, (v, _) in self.encode(name, t).items()}

    def error_of(self, layer: str) -> float | None:
        """The added error of the pruned layer ``layer`` (a report row's name:
        ``model.layers.3.mlp.up_proj``, or an expert's ``...experts.5.up_proj``
        whose checkpoint tensor is per expert or fused); None when its weight
        was not quantized in the input. The gate and up rows of a fused
        ``gate_up_proj`` share their expert's error."""
        got = self.errors.get((layer + ".weight", None))
        if got is None:
            module, _, role = layer.rpartition(".")
            experts, _, index = module.rpartition(".")
            if index.isdigit():
                for fused in ({"gate_proj": ("gate_up_proj",), "up_proj": ("gate_up_proj", "up_proj"),
                               "down_proj": ("down_proj",)}.get(role, ())):
                    got = self.errors.get((f"{experts}.{fused}", int(index)))
                    if got is not None:
                        break
        if got is None:
            return None
        return got[0] / got[1] if got[1] > 0 else 0.0

    def report(self) -> dict:
        """The d2prune.json ``requantization`` section."""
        err = sum(e for e, _ in self.errors.values())
        norm = sum(n for _, n in self.errors.values())
        return {"format": self.quant.describe(), "quant_method": self.quant.method,
                "weights": len({n for n, _ in self.errors}), "error": err / norm if norm > 0 else 0.0,
                "error_definition": REQUANT_ERROR}
