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

from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..io.sparse_format import (FORMAT, QUANT_METHOD, SUFFIXES, VERSION, checksum, checksum_error, decompress_matrix,
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
        parts = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        if full_layer_name and full_layer_name.endswith("weight"):  # the stored names: P.weight, P.weight_values, ...
            prefix = full_layer_name[: -len("weight")]
            self.hf_quantizer.verify({prefix + k: v for k, v in parts.items()})
        if "weight" in parts and len(parts) == 1:
            return {full_layer_name: parts["weight"]}
        stored = {k[len("weight"):]: v for k, v in parts.items() if k != "weight"}
        return {full_layer_name: decompress_matrix(stored)}


class D2PruneSparseQuantizer(HfQuantizer):
    """Loads ``d2prune-sparse`` checkpoints (pre-compressed only)."""

    requires_calibration = True  # nothing to do on a dense model: only loading compressed folders
    serialized_names = {"weight": ["weight"] + ["weight" + s for s in SUFFIXES]}

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
        converted = set(self.serialized_names["weight"])
        for f in checkpoint_files or ():
            sums = expected_checksums(self.quantization_config, [f])
            self.checksums.update(sums)
            self.shard_of.update({n: Path(f) for n in sums})
            others = [n for n in sums if n.rpartition(".")[2] not in converted]
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
