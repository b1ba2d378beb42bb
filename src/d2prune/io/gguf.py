"""A GGUF file read one tensor at a time, de-quantised exactly as transformers does.

``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` de-quantises the
whole file in memory (``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``).
:class:`GGUFFile` keeps only the file's tensor table (name, ggml type, offset,
shape) and turns one transformers parameter name into its tensor on demand,
with transformers' own knowledge of the layout:

* the GGUF -> transformers names come from ``get_gguf_hf_weights_map`` applied to
  a meta-device skeleton of the model transformers would build;
* the raw bytes are read with a plain file read (no memory map left open: mapped
  pages count in the process's resident memory) and de-quantised by the ``gguf``
  package's ``dequantize``, the function transformers calls;
* the architecture's ``TensorProcessor`` (e.g. LLaMA's reverse q/k permutation)
  is applied, then the cast to the model's dtype: ``float32`` for ``dtype="auto"``
  (``torch.get_default_dtype()``, what transformers gives a GGUF model), else
  the dtype asked for.

The result equals, bit for bit, the tensor ``from_pretrained`` puts in the model.
Architectures that transformers loads through its newer packed-GGUF path
(``transformers.integrations.gguf``: Qwen3.5, LFM2) are refused (their
conversions are other code): they load in memory (``--stream off``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import D2PruneError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stored:
    """Where one GGUF tensor's bytes are and how ``GGUFReader`` would view them."""

    offset: int  # from the start of the file
    np_dtype: np.dtype  # the element type of GGUFReader's view (uint8 for quantised blocks)
    shape: tuple[int, ...]  # GGUFReader's view shape (rows x bytes per row for quantised blocks)
    ggml_type: object  # gguf.GGMLQuantizationType
    n_elements: int  # of the de-quantised tensor

    @property
    def count(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _scan(path: Path) -> tuple[str, dict[str, _Stored]]:
    """``(architecture, {gguf name: stored})`` from the file's header; the
    reader's memory map is closed before returning."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - a dependency of transformers' GGUF support
        raise D2PruneError("reading a .gguf file needs the gguf package: pip install gguf") from e
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture in its metadata")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        tensors = {t.name: _Stored(int(t.data_offset), t.data.dtype, tuple(int(d) for d in t.data.shape), t.tensor_type,
                                   int(t.n_elements))
                   for t in reader.tensors}
    except D2PruneError:
        raise
    except Exception as e:  # gguf raises ValueError, struct/numpy errors on a corrupt file
        raise D2PruneError(f"could not read the GGUF file {path}: {type(e).__name__}: {first_line(e)}") from e
    finally:
        reader = None  # noqa: F841 - drops the memory map (and every view of it)
    return arch, tensors


def packed_path_architecture(arch: str) -> bool:
    """Whether transformers loads this GGUF architecture through its packed-GGUF
    path (``transformers.integrations.gguf``) rather than ``load_gguf_checkpoint``."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # older transformers: every architecture goes through load_gguf_checkpoint
        return False
    return bool(is_gguf_arch_supported(arch))


@contextlib.contextmanager
def _name_maps_cached():
    """``get_gguf_hf_weights_map`` visits every submodule and builds gguf's
    name map (every block's names) anew at each: 6 s for a 30-block model, and
    quadratic in depth. The maps of one (architecture, depth) are equal, so
    they are built once while it runs."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def gguf_dtype(config, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``from_pretrained`` gives a GGUF model: the one asked for, else
    the config's, else ``torch.get_default_dtype()`` (float32)."""
    if dtype is not None:
        return dtype
    want = getattr(config, "dtype", None)
    if isinstance(want, str):
        want = getattr(torch, want, None)
    return want if isinstance(want, torch.dtype) else torch.get_default_dtype()


def dequantized_nbytes(path: str | os.PathLike, dtype: torch.dtype | None = None,
                       limit: float | None = None) -> int | None:
    """The bytes the file's tensors take de-quantised (in ``dtype``, float32 by
    default): what the in-memory path holds. None when the architecture
    cannot be streamed. With ``limit``: 0 when the file cannot hold more than
    ``limit`` bytes de-quantised (its size x the densest ggml type's elements
    per byte), without parsing its header (seconds for a large vocabulary)."""
    item = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    if limit is not None:
        from gguf.constants import GGML_QUANT_SIZES

        per_byte = max(block / size for block, size in GGML_QUANT_SIZES.values())
        if Path(path).stat().st_size * per_byte * item <= limit:
            return 0
    arch, tensors = _scan(Path(path))
    if packed_path_architecture(arch):
        return None
    return sum(s.n_elements for s in tensors.values()) * item


class GGUFFile:
    """The tensors of a GGUF file under their transformers names, each
    de-quantised (and re-laid out) only when asked for. ``config`` is
    transformers' config for the file (``AutoConfig`` with ``gguf_file``)."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None):
        self.path = Path(path)
        self.arch, self._stored = _scan(self.path)
        if packed_path_architecture(self.arch):
            raise D2PruneError(
                f"{self.path}: GGUF architecture {self.arch!r} is converted by transformers' packed-GGUF loader, "
                "which d2prune does not stream: load it in memory with --stream off")
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        folder, name = str(self.path.parent), self.path.name
        try:
            self.config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
            # the processor sees the parsed GGUF config dict, as in load_gguf_checkpoint
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
            self._processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=parsed)
            with init_empty_weights(include_buffers=False):
                skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(self.config), trust_remote_code=False)
            with _name_maps_cached():
                self._map = get_gguf_hf_weights_map(skeleton, self._processor)  # gguf name -> transformers name
        except D2PruneError:
            raise
        except Exception as e:  # transformers raises many types
            raise D2PruneError(f"could not map the tensors of {self.path} to transformers names: "
                               f"{type(e).__name__}: {first_line(e)}") from e
        del skeleton
        self.dtype = gguf_dtype(self.config, dtype)
        self.sources: dict[str, list[str]] = {}  # transformers name -> the GGUF tensors it is made of (file order)
        for gguf_name in self._stored:
            hf = self._map.get(gguf_name)
            if hf is not None:
                self.sources.setdefault(hf, []).append(gguf_name)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def names(self) -> list[str]:
        return list(self.sources)

    def nbytes(self) -> int:
        """De-quantised size of the tensors transformers loads, in ``dtype``."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(self._stored[g].n_elements for gs in self.sources.values() for g in gs) * item

    def _raw(self, f, gguf_name: str) -> np.ndarray:
        """The bytes GGUFReader's ``tensor.data`` views, read into a fresh array."""
        s = self._stored[gguf_name]
        f.seek(s.offset)
        data = np.fromfile(f, dtype=s.np_dtype, count=s.count)
        if data.size != s.count:
            raise D2PruneError(f"{self.path} is truncated: tensor {gguf_name} is incomplete")
        return data.reshape(s.shape)

    def get_many(self, names) -> dict[str, Tensor]:
        """Transformers' tensors ``names``, the file opened once for all."""
        from gguf import dequantize

        out = {}
        with open(self.path, "rb") as f:
            for name in names:
                if name not in self.sources:
                    raise D2PruneError(f"tensor {name} is not in the GGUF file {self.path}")
                produced: dict = {"tensors": {}}  # what a processor stores aside (merged MoE experts, GPT-2's head)
                weights = None
                for gguf_name in self.sources[name]:
                    raw = self._raw(f, gguf_name)
                    result = self._processor.process(weights=dequantize(raw, self._stored[gguf_name].ggml_type),
                                                     name=gguf_name, tensor_key_mapping=self._map,
                                                     parsed_parameters=produced)
                    del raw
                    if result.name is not None and self._map.get(result.name) == name:
                        weights = result.weights
                if name in produced["tensors"]:
                    tensor = produced["tensors"][name]
                elif weights is not None:
                    tensor = torch.from_numpy(np.copy(weights))  # as load_gguf_checkpoint, then its cast
                else:
                    raise D2PruneError(f"{self.path}: transformers' GGUF conversion gives no tensor {name}: "
                                       "load it in memory with --stream off")
                out[name] = tensor.to(self.dtype)
                del weights, produced, tensor
        return out

    def get(self, name: str) -> Tensor:
        return self.get_many([name])[name]
