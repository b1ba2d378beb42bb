"""The ``d2prune_sparse`` quantization method for ``transformers.from_pretrained``.

transformers (5.x) loads pre-quantized checkpoints through a registered
quantizer whose *dequantize* operation maps each module's serialized tensors
(``weight_shape``, ``weight_bitmask``, ``weight_values``, ... - see
:mod:`d2prune.deploy.compress`) to its dense ``weight`` while the checkpoint is read,
one module at a time. With ``dequantize = True`` transformers then drops the
quantization config: the returned model is an ordinary dense model (saving it
again writes a dense checkpoint, never a mislabelled one). Imported lazily by
:func:`d2prune.deploy.compress.register_with_transformers` (``import d2prune`` calls it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..io.sparse_format import (FORMAT, QUANT_METHOD, SHAPE, SUFFIXES, VERSION, checksum, checksum_error, decompress_matrix,
                            expected_checksums)

# The quantizer relies on transformers' load operations ("dequantize" ops that
# receive a module's serialized tensors), checked to decompress correctly on
# 5.24. On an older 5.x (5.17 was seen loading the model with its compressed
# weights left at their random initialisation) it refuses instead.
MIN_TRANSFORMERS = (5, 24)


def _version() -> tuple[int, int]:
    import transformers

    parts = transformers.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


class D2PruneSparseConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a compressed folder."""

    def __init__(self, format: str = FORMAT, version: int = VERSION, checksum: str | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.version = version
        self.checksum = checksum  # None: a folder written before checksums
        self.dequantize = True  # the loaded model is dense: transformers removes this config after loading
        if version > VERSION:
            raise ValueError(f"{FORMAT} version {version} is newer than this d2prune reads ({VERSION}): upgrade d2prune")

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": self.quant_method, "format": self.format, "version": self.version}
        return out if self.checksum is None else {**out, "checksum": self.checksum}


class Decompress(ConversionOps):
    """One module's serialized tensors -> its dense ``weight``. A plain
    ``weight`` (a matrix stored dense: not sparse enough to gain) passes
    through."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies a converter for every weight: the copies must
        # report to the one quantizer that holds the checksums
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict: dict[str, Any], source_patterns=None, target_patterns=None,
                full_layer_name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """Two callers: one module's own tensors (keys are the stored names'
        tails, ``weight``, ``weight_values``, ... or a fused experts tensor's
        ``down_proj``, ``down_proj_shape``, ...), returned as the module's dense
        parameter; or, before a model converter merges per-expert checkpoint
        tensors into a fused parameter, lists of them keyed by source pattern
        (``.experts.*.w1.weight_values``), returned as lists of dense tensors
        under the weight's own pattern for the merge that follows."""
        groups: dict[str, dict[str, Any]] = {}
        for k, v in input_dict.items():
            suffix = next((s for s in sorted(SUFFIXES, key=len, reverse=True) if k.endswith(s)), "")
            groups.setdefault(k[: len(k) - len(suffix)], {})[suffix] = v
        if len(groups) == 1 and next(iter(groups)) in self.hf_quantizer.serialized_names:  # one module's own tensors
            param, parts = next(iter(groups.items()))
            parts = {k: (v[0] if isinstance(v, list) else v) for k, v in parts.items()}
            if full_layer_name and full_layer_name.endswith(param):
                prefix = full_layer_name[: -len(param)]
                self.hf_quantizer.verify({prefix + param + k: v for k, v in parts.items()})
            dense = parts[""] if "" in parts and len(parts) == 1 else decompress_matrix(parts)
            return {full_layer_name: dense}
        out = {}  # per-expert lists (their checksums were checked before loading: quantizer.PER_EXPERT)
        for base, parts in groups.items():
            if "" in parts and len(parts) == 1:
                out[base] = parts[""]
                continue
            n = len(parts[SHAPE])
            out[base] = [decompress_matrix({s: v[i] for s, v in parts.items() if s}) for i in range(n)]
        return out


# per-expert checkpoint tensors (Mixtral's experts.3.w1.weight): transformers may merge them into a fused
# parameter, and the merge's dequantize step sees patterns, not names, so their checksums are checked up front
PER_EXPERT = re.compile(r"\.experts\.\d+\.")


class D2PruneSparseQuantizer(HfQuantizer):
    """Loads ``d2prune-sparse`` checkpoints (pre-compressed only)."""

    requires_calibration = True  # nothing to do on a dense model: only loading compressed folders
    # a Linear's weight, and the fused 3-D parameters of transformers' experts modules (io/experts.py)
    serialized_names = {p: [p] + [p + s for s in SUFFIXES] for p in ("weight", "gate_up_proj", "up_proj", "down_proj")}

    def get_load_operations(self) -> dict:
        return {"dequantize": Decompress}

    def validate_environment(self, *args, **kwargs):
        if _version() < MIN_TRANSFORMERS:
            import transformers

            raise ValueError(
                f"transformers {transformers.__version__} cannot decompress d2prune-sparse weights inside "
                f"from_pretrained (needs >= {'.'.join(map(str, MIN_TRANSFORMERS))}): load the folder with "
                "d2prune.from_pretrained(folder), or upgrade transformers")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """The model stays dense (the dequantize operation runs on every stored
        weight). The shards' checksums are read here; the dequantize operation
        checks every ``*.weight*`` tensor as it arrives, and the few it never
        sees (biases, ...) are read and checked now."""
        self.checksums: dict[str, str] = {}
        self.shard_of: dict[str, Path] = {}
        self.damaged: list[tuple[str, str, str]] = []
        converted = {n for names in self.serialized_names.values() for n in names}
        for f in checkpoint_files or ():
            sums = expected_checksums(self.quantization_config, [f])
            self.checksums.update(sums)
            self.shard_of.update({n: Path(f) for n in sums})
            others = [n for n in sums if n.rpartition(".")[2] not in converted or PER_EXPERT.search(n)]
            if others:
                from safetensors import safe_open

                with safe_open(str(f), "pt") as sf:
                    self.verify({n: sf.get_tensor(n) for n in others})
                self._raise_if_damaged()
        return model

    def verify(self, tensors: dict[str, torch.Tensor]) -> None:
        """Note each of ``tensors`` (stored name -> tensor as stored) whose bytes
        differ from its checksum. Raising inside a load operation would only be
        logged by transformers (the weight left at its initialisation): the
        error is raised once loading ends (:meth:`_process_model_after_weight_loading`)."""
        for n, t in tensors.items():
            want = self.checksums.get(n)
            if want is not None and (got := checksum(t)) != want:
                self.damaged.append((n, want, got))

    def _raise_if_damaged(self) -> None:
        if self.damaged:
            n, want, got = self.damaged[0]
            raise checksum_error(n, self.shard_of[n], want, got, more=len(self.damaged) - 1)

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._raise_if_damaged()
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(D2PruneSparseConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(D2PruneSparseQuantizer)
