"""Models larger than host RAM: weights streamed block by block from disk.

A safetensors checkpoint (one file or sharded with ``model.safetensors.index.json``)
is opened without materialising it:

* :func:`load_streamed` builds the module skeleton with every parameter on the
  meta device (accelerate's ``init_empty_weights``; buffers such as rotary
  ``inv_freq`` stay real), then loads only what is not in a decoder block
  (embeddings, final norm, head: needed for every capture and evaluation).
* :class:`StreamedBlocks` is the engine's block source: block ``i``'s tensors
  are read (memory-mapped by safetensors) when its turn comes, cast to the
  compute dtype on the device, and released back to the meta device when the
  ``with`` ends. Host RAM holds one block at a time, whatever the depth.
* :class:`ShardWriter` writes a finished model as an ordinary sharded
  checkpoint (one shard per block + one for the rest, and the index) that
  ``AutoModelForCausalLM.from_pretrained`` loads.

A ``.gguf`` file streams likewise (:class:`GGUFCheckpointReader`): one tensor
de-quantised at a time, equal bit for bit to what transformers loads.

Checkpoint tensors become the skeleton's parameters by transformers' own
loading rules (:class:`d2prune.io.key_mapping.KeyMapping`: renamed keys,
per-expert tensors merged into the fused expert parameters), and the output is
written back in the checkpoint's own layout, as ``save_pretrained`` writes it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from .source import BlockSource, outside_on_device, place_params
from ..errors import D2PruneError, first_line
from .modeling import STORAGE_DTYPE, all_finite, Blocks, compute_dtype_for, find_blocks
from .sparse_format import (NM_VALUES, SHAPE, VALUES, checksum, checksum_error, compressed_names, decompress_matrix,
                            expected_checksums, is_compressed)

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
if hasattr(torch, "float8_e8m0fnu"):  # MXFP8-style e8m0 scales
    _ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


def read_safetensors(path: str | os.PathLike, names) -> dict[str, Tensor]:
    """``names`` from a safetensors file, each read straight into a new
    tensor (header parsed, ``readinto`` at the tensor's offset). safetensors'
    own ``get_tensor`` maps the file, and mapped pages count in the resident
    memory of the process until the file is closed."""
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        for name in names:
            info = header.get(name)
            if info is None:
                raise D2PruneError(f"tensor {name} is not in {path}")
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            view = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
            f.seek(base + begin)
            if view is not None and f.readinto(memoryview(view)) != end - begin:
                raise D2PruneError(f"{path} is truncated: tensor {name} is incomplete")
            out[name] = t
    return out


def read_safetensors_rows(path: str | os.PathLike, name: str, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` (first dimension) of tensor ``name`` of a
    safetensors file, read straight into a new tensor (they are contiguous)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        info = header.get(name)
        if info is None:
            raise D2PruneError(f"tensor {name} is not in {path}")
        shape = info["shape"]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise D2PruneError(f"rows {start}:{stop} are not in tensor {name} {shape} of {path}")
        t = torch.empty([stop - start, *shape[1:]], dtype=_ST_DTYPES[info["dtype"]])
        row = t[0].numel() * t.element_size() if t.numel() else 0
        begin = info["data_offsets"][0] + start * row
        f.seek(8 + n + begin)
        if t.numel() and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != (stop - start) * row:
            raise D2PruneError(f"{path} is truncated: tensor {name} is incomplete")
    return t


class SafetensorsWriter:
    """A safetensors file written piece by piece: the header (every tensor's
    name, shape and dtype) first, then each tensor's bytes - whole, or rows
    along its first dimension - at its offset, in any order, so a tensor
    larger than RAM (the fused experts of a block read in groups) is never
    held whole. Written to ``path.tmp`` and renamed by :meth:`close`."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        rev = {v: k for k, v in _ST_DTYPES.items()}
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.specs = {}
        for name in sorted(specs):
            shape, dtype = specs[name]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": rev[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.specs[name] = (tuple(shape), dtype, offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.base = 8 + len(raw)
        self.file = open(self.tmp, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file.truncate(self.base + offset)
        self.left = {name: math.prod(shape) for name, (shape, _, _) in self.specs.items()}

    def write(self, name: str, t: Tensor, start: int = 0) -> None:
        """``t`` as tensor ``name`` (whole), or as its rows ``start:start + len(t)``."""
        shape, dtype, offset = self.specs[name]
        if t.dtype != dtype or tuple(t.shape[1:]) != shape[1:] or (start == 0 and t.dim() != len(shape)) \
                or start + (t.shape[0] if t.dim() else 1) > (shape[0] if shape else 1):
            raise D2PruneError(f"cannot write {tuple(t.shape)} {t.dtype} at row {start} of {name} "
                               f"{list(shape)} {dtype}")
        row = math.prod(shape[1:]) * t.element_size() if shape else t.element_size()
        data = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        self.file.seek(self.base + offset + start * row)
        self.file.write(memoryview(data))
        self.left[name] -= t.numel()

    def close(self) -> Path:
        unwritten = [n for n, left in self.left.items() if left]
        if unwritten:
            raise D2PruneError(f"{self.path}: tensor {unwritten[0]} was not written whole")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class CheckpointReader:
    """Tensor name -> file of a safetensors checkpoint; tensors are read one
    at a time through ``safe_open`` (memory-mapped), never the whole file.

    :meth:`attach` gives it the model: :meth:`params` then answers in the
    model's parameters, built from the checkpoint's tensors as
    ``from_pretrained`` builds them (:mod:`d2prune.io.key_mapping`); a
    finished block's shard (:meth:`add`) holds parameters as they are, read as such."""

    mapping = None  # the KeyMapping of the attached model
    added: frozenset = frozenset()  # parameter names read from a finished block's shard from now on

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise D2PruneError(f"{index} is not a valid safetensors index (no weight_map): {e}") from e
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / SINGLE_NAME).is_file():
            from safetensors import safe_open

            path = self.folder / SINGLE_NAME
            with safe_open(str(path), "pt") as f:
                self.files = {name: path for name in f.keys()}
        else:
            raise D2PruneError(f"{self.folder} has no {SINGLE_NAME} nor {INDEX_NAME}: streaming needs a safetensors checkpoint")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise D2PruneError(f"checkpoint shard {missing[0]} listed in {INDEX_NAME} is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get_many(self, names) -> dict[str, Tensor]:
        """Tensors by name, read with plain file reads into fresh tensors
        (:func:`read_safetensors`): no memory map, so the process's resident
        memory holds exactly the tensors asked for, not the file's pages."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise D2PruneError(f"tensor {n} is not in the checkpoint {self.folder}")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, ns in by_file.items():
            out.update(read_safetensors(path, ns))
        return out

    def get(self, name: str) -> Tensor:
        return self.get_many([name])[name]

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of checkpoint tensor ``name`` (the rest is not read)."""
        if name not in self.files:
            raise D2PruneError(f"tensor {name} is not in the checkpoint {self.folder}")
        return read_safetensors_rows(self.files[name], name, start, stop)

    def param_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows (experts) ``start:stop`` of the model's 3-D parameter ``name``:
        from a finished block's shard, or built from the checkpoint tensors of
        those experts alone (:meth:`~d2prune.io.key_mapping.KeyMapping.read_rows`)."""
        if self.mapping is None or name in self.added:
            return self.get_rows(name, start, stop)
        return self.mapping.read_rows(name, start, stop, self.get_many, self.get_rows, str(self.folder))

    def attach(self, model: nn.Module):
        """Map this checkpoint's tensors to ``model``'s parameters (transformers'
        key mapping and conversions); returns the :class:`~d2prune.io.key_mapping.KeyMapping`."""
        from .key_mapping import KeyMapping

        self.mapping = KeyMapping(model, list(self.files))
        return self.mapping

    def params(self, names) -> dict[str, Tensor]:
        """Parameters by model name: those of finished blocks from their
        shards, the others built from the checkpoint's tensors, one parameter
        (with its sources) at a time; cast to the model's dtypes."""
        names = list(names)
        if self.mapping is None:
            return self.get_many(names)
        direct = [n for n in names if n in self.added]
        out = self.get_many(direct) if direct else {}
        out.update(self.mapping.read([n for n in names if n not in self.added], self.get_many, str(self.folder)))
        return {n: out[n] for n in names}

    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Every tensor's shape, from the headers (no tensor read); None where unknown."""
        from safetensors import safe_open

        out = {}
        for path in set(self.files.values()):
            with safe_open(str(path), "pt") as f:
                for n in f.keys():
                    if self.files.get(n) == path:
                        out[n] = tuple(f.get_slice(n).get_shape())
        return out

    def dtypes(self) -> dict[str, torch.dtype]:
        from safetensors import safe_open

        out = {}
        for path in set(self.files.values()):
            with safe_open(str(path), "pt") as f:
                for n in f.keys():
                    if self.files.get(n) == path:
                        out[n] = _ST_DTYPES.get(f.get_slice(n).get_dtype(), torch.float32)
        return out

    def storage_dtype(self) -> torch.dtype:
        """The dtype most floating tensors are stored in."""
        counts = Counter(d for d in self.dtypes().values() if d.is_floating_point)
        return counts.most_common(1)[0][0]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def add(self, path: str | os.PathLike) -> None:
        """Point every tensor of ``path`` (e.g. a finished pruned block) to it."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
        for name in names:
            self.files[name] = path
        self.added = frozenset(self.added | set(names))


class CompressedReader(CheckpointReader):
    """A :class:`~d2prune.io.streaming.CheckpointReader` over a compressed folder
    that answers in dense tensors: ``P.weight`` is decompressed from its stored
    parts when asked for (the streamed, block-by-block path reads this way).
    Every stored tensor read is checked against the crc32 its shard records
    (:func:`~d2prune.io.sparse_format.expected_checksums`)."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__(folder)
        self.stored = dict(self.files)  # every stored tensor -> its file
        self.parts = compressed_names(self.stored)
        part_names = {n for parts in self.parts.values() for n in parts.values()}
        self.files = {n: f for n, f in self.stored.items() if n not in part_names}
        for base, parts in self.parts.items():
            self.files[base] = self.stored[parts[SHAPE]]
        quant = json.loads((self.folder / "config.json").read_text()).get("quantization_config") or {}
        self.checksums = expected_checksums(quant, set(self.stored.values()))  # stored name -> crc32

    def _verified(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        for n, t in tensors.items():
            want = self.checksums.get(n)
            if want is not None and (got := checksum(t)) != want:
                raise checksum_error(n, self.stored[n], want, got)
        return tensors

    def get_many(self, names) -> dict[str, Tensor]:
        names = list(names)
        out = self._verified(super().get_many([n for n in names if n not in self.parts]))
        for n in names:
            if n in self.parts:
                parts = self.parts[n]
                by_file: dict[Path, list[str]] = {}
                for stored in parts.values():
                    by_file.setdefault(self.stored[stored], []).append(stored)
                got = {}
                for path, ns in by_file.items():
                    got.update(self._verified(read_safetensors(path, ns)))
                out[n] = decompress_matrix({s: got[stored] for s, stored in parts.items()})
        return out

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        if name in self.parts:  # a compressed tensor is decompressed whole, then cut
            return self.get_many([name])[name][start:stop].clone()
        return super().get_rows(name, start, stop)

    def add(self, path: str | os.PathLike) -> None:
        """A finished (dense) block shard replaces the compressed parts of its
        tensors (written by this run: not checked against the input's checksums)."""
        super().add(path)
        for n, f in self.files.items():
            if f == Path(path):
                self.parts.pop(n, None)
                self.checksums.pop(n, None)

    def shapes(self) -> None:
        """The stored parts' shapes are not the matrices' (checked when each block is read)."""
        return None

    def dtypes(self) -> dict[str, torch.dtype]:
        from safetensors import safe_open

        stored: dict[str, torch.dtype] = {}
        for path in set(self.stored.values()):
            with safe_open(str(path), "pt") as f:
                for n in f.keys():
                    stored[n] = _ST_DTYPES.get(f.get_slice(n).get_dtype(), torch.float32)
        out = {n: stored[n] for n in self.files if n in stored and n not in self.parts}
        for base, parts in self.parts.items():
            out[base] = stored[parts[VALUES] if VALUES in parts else parts[NM_VALUES]]
        return out


class QuantizedReader(CheckpointReader):
    """A :class:`CheckpointReader` over an FP8 or MXFP4 checkpoint that answers
    in de-quantized tensors (:mod:`d2prune.io.quantized`): a quantized weight
    is read with its scales and de-quantized into :attr:`dtype` when asked
    for, one at a time; the scale tensors themselves are not model tensors.
    GPT-OSS's ``*_blocks`` / ``*_scales`` answer as the fused parameter
    (``experts.gate_up_proj``) they make."""

    def __init__(self, folder: str | os.PathLike, quant):
        super().__init__(folder)
        self.quant = quant
        self.dtype = torch.bfloat16  # what weights are de-quantized into: the storage dtype (set by load_streamed)
        self.stored = dict(self.files)  # every stored tensor -> its file
        self.parts, hidden = quant.plan(CheckpointReader.dtypes(self))
        self.files = {n: f for n, f in self.stored.items() if n not in hidden}
        for name, parts in self.parts.items():
            self.files[name] = self.stored[parts["q"]]

    def get_many(self, names) -> dict[str, Tensor]:
        names = list(names)
        out = super().get_many([n for n in names if n not in self.parts])
        for n in names:
            if n in self.parts:
                got = self._read_parts(n)
                out[n] = self.quant.dequantize(n, got, self.dtype)
                del got
        return {n: out[n] for n in names}

    def _read_parts(self, name: str, rows: tuple[int, int] | None = None) -> dict[str, Tensor]:
        parts = self.parts[name]
        for stored in parts.values():
            if stored not in self.stored:
                raise D2PruneError(f"tensor {stored} is not in the checkpoint {self.folder}")
        if rows is not None:
            return {role: read_safetensors_rows(self.stored[s], s, *rows) for role, s in parts.items()}
        return {role: read_safetensors(self.stored[s], [s])[s] for role, s in parts.items()}

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        if name not in self.parts:
            return super().get_rows(name, start, stop)
        if self.quant.method == "mxfp4":  # experts first in blocks and scales: read those experts only
            return self.quant.dequantize(name, self._read_parts(name, (start, stop)), self.dtype)
        return self.get_many([name])[name][start:stop].clone()

    def dtypes(self) -> dict[str, torch.dtype]:
        stored = CheckpointReader.dtypes(self)
        return {n: (self.dtype if n in self.parts else stored[n]) for n in self.files}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        stored = {}
        for path in set(self.stored.values()):
            with safe_open(str(path), "pt") as f:
                for n in f.keys():
                    if self.stored.get(n) == path:
                        stored[n] = tuple(f.get_slice(n).get_shape())
        out = {n: stored[n] for n in self.files if n not in self.parts and n in stored}
        for name, parts in self.parts.items():
            out[name] = self.quant.shape(name, {role: stored[s] for role, s in parts.items()})
        return out

    def storage_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's unquantized floating tensors (norms, embeddings), bf16 if none."""
        counts = Counter(d for n, d in CheckpointReader.dtypes(self).items()
                         if n in self.files and n not in self.parts and d.is_floating_point
                         and d not in (torch.float8_e4m3fn, torch.float8_e5m2))
        return counts.most_common(1)[0][0] if counts else torch.bfloat16

    def add(self, path: str | os.PathLike) -> None:
        """A finished (de-quantized) block shard replaces the quantized parts of its tensors."""
        super().add(path)
        for n, f in self.files.items():
            if f == Path(path):
                self.parts.pop(n, None)


class GGUFCheckpointReader(CheckpointReader):
    """A ``.gguf`` file as a checkpoint: transformers' tensor name -> the file,
    each tensor de-quantised only when read (:class:`d2prune.io.gguf.GGUFFile`:
    bit for bit what ``from_pretrained(folder, gguf_file=...)`` loads, in
    ``dtype``, float32 when None). Tensors of safetensors shards given to
    :meth:`add` (finished blocks) are read from those instead."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None):
        from .gguf import GGUFFile

        self.gguf = GGUFFile(path, dtype)
        self.path = self.gguf.path
        self.folder = self.path.parent
        self.config = self.gguf.config  # transformers' config for the file (AutoConfig with gguf_file)
        self.files = {name: self.path for name in self.gguf.names()}

    def get_many(self, names) -> dict[str, Tensor]:
        names = list(names)
        in_gguf = [n for n in names if self.files.get(n) == self.path]
        out = self.gguf.get_many(in_gguf) if in_gguf else {}
        others = [n for n in names if n not in out]
        if others:
            out.update(super().get_many(others))
        return {n: out[n] for n in names}

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        if self.files.get(name) == self.path:  # de-quantised whole, then cut
            return self.get_many([name])[name][start:stop].clone()
        return super().get_rows(name, start, stop)

    def dtypes(self) -> dict[str, torch.dtype]:
        from safetensors import safe_open

        out = {n: self.gguf.dtype for n, p in self.files.items() if p == self.path}
        for path in {p for p in self.files.values() if p != self.path}:
            with safe_open(str(path), "pt") as f:
                for n in f.keys():
                    if self.files.get(n) == path:
                        out[n] = _ST_DTYPES.get(f.get_slice(n).get_dtype(), torch.float32)
        return out

    def shapes(self) -> None:
        """Named and shaped as transformers loads the file already (checked when each block is read)."""
        return None

    def dtype_of(self, name: str) -> torch.dtype:
        return self.gguf.dtype if self.files.get(name) == self.path else self.dtypes()[name]

    def storage_dtype(self) -> torch.dtype:
        """The dtype the tensors are de-quantised to."""
        return self.gguf.dtype

    def nbytes(self) -> int:
        """The de-quantised size (what the in-memory path holds), not the file's."""
        return self.gguf.nbytes()


# --------------------------------------------------------------------------- skeleton
def _set_param(root: nn.Module, name: str, value: Tensor | nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def _release(block: nn.Module) -> None:
    """Give a block's memory back: every parameter returns to the meta device,
    and the C allocator hands freed pages back to the OS (glibc keeps them
    otherwise, and the process's RSS would grow with every block it has seen)."""
    for module in block.modules():
        for attr, p in module._parameters.items():
            if p is not None and p.device.type != "meta":
                module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                        requires_grad=False)
    trim_heap()


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> None:
    """``malloc_trim(0)`` where glibc has it; nothing elsewhere."""
    if _libc():
        _libc().malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold(size: int = 1 << 20) -> None:
    """Allocations above ``size`` always get their own mapping, returned to
    the OS when freed. glibc otherwise raises the threshold after every large
    free, and later tensors of that size come from the heap, which keeps the
    pages: the RSS of a streamed run would climb with every block."""
    if _libc():
        _libc().mallopt(M_MMAP_THRESHOLD, size)


_LIBC = None


def persistent_buffers(model: nn.Module) -> list[str]:
    """The buffers the model's state dict holds (``from_pretrained`` loads them
    from the checkpoint and ``save_pretrained`` writes them: DeepSeek-V3's
    router keeps its trained ``e_score_correction_bias`` in one)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return [n for n in model.state_dict(keep_vars=True) if n not in params]


def _set_buffer(root: nn.Module, name: str, value: Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    (root.get_submodule(owner) if owner else root)._buffers[attr] = value


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` parameter names tied by the model (lm_head -> embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return dict(keys) if isinstance(keys, dict) else {}


def load_streamed(path: str, dtype: torch.dtype | None = None):
    """``(model, tokenizer, reader)``: the skeleton of the checkpoint in ``path``
    with its non-block weights loaded and every block on the meta device.
    ``path``: a safetensors folder, or a ``.gguf`` file (tensors de-quantised
    one at a time when read, config and tokenizer as transformers reads them)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw: dict = {}
    if str(path).lower().endswith(".gguf") and Path(path).is_file():
        reader = GGUFCheckpointReader(path, dtype)
        path, kw = str(reader.folder), {"gguf_file": reader.path.name}
    else:
        # d2prune-sparse: each block's weights are decompressed as they are read; FP8 / MXFP4: de-quantized
        quant = quantization_of(path)
        reader = (CompressedReader(path) if is_compressed(path) else QuantizedReader(path, quant) if quant
                  else CheckpointReader(path))
    storage = dtype or reader.storage_dtype()
    if isinstance(reader, QuantizedReader):
        reader.dtype = storage
    try:
        config = copy.deepcopy(reader.config) if kw else AutoConfig.from_pretrained(path, trust_remote_code=False)
        if isinstance(reader, (CompressedReader, QuantizedReader) if not kw else ()):
            del config.quantization_config  # the model is dense in memory, and so is what it saves
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=storage)
    except Exception as e:
        raise D2PruneError(f"could not build the model of {path}: {type(e).__name__}: {first_line(e)}") from e
    find_blocks(model)  # a clear error now for a model without decoder blocks
    tied = tied_parameters(model)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in tied]
    mapping = reader.attach(model)
    unknown = mapping.missing(names)
    if unknown:
        expected = mapping.expected_name(unknown[0])
        raise D2PruneError(
            f"{path}: the checkpoint has no tensor for {unknown[0]} of {type(model).__name__}"
            + (f" (read from {expected})" if expected != unknown[0] else "")
            + f"{f' nor for {len(unknown) - 1} other parameters' if len(unknown) > 1 else ''}: it is incomplete or "
            "not a checkpoint of this model"
        )
    buffers = [n for n in persistent_buffers(model) if not mapping.missing([n])]  # those the checkpoint holds
    shapes = reader.shapes()
    if shapes is not None:  # every parameter built on the meta device: a bad tensor is named before any block is pruned
        mapping.check(shapes, names + buffers, str(path))
    for name, t in _checked(reader.params(buffers)).items():  # small, and kept: buffers stay real in the skeleton
        _set_buffer(model, name, t)
    for target, src in tied.items():  # one Parameter object for both names, as from_pretrained ties them
        _set_param(model, target, model.get_parameter(src))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)
    except Exception as e:
        raise D2PruneError(f"could not load the tokenizer of {path}: {type(e).__name__}: {first_line(e)}") from e
    model.eval()
    return model, tok, reader


def quantization_of(folder: str | os.PathLike):
    """The :class:`~d2prune.io.quantized.Quantization` of the checkpoint in
    ``folder`` (its ``config.json``), None when it is not quantized; a format
    d2prune cannot read is refused by name here, before any weight is read."""
    from .quantized import describe

    path = Path(folder) / "config.json"
    try:
        quant = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    except (ValueError, OSError, AttributeError):
        return None  # an unreadable config is reported when transformers reads it
    return describe(quant, f"model {folder}")


def outside_blocks(model: nn.Module, blocks: Blocks) -> dict[str, nn.Parameter]:
    """The parameters outside the decoder blocks, by name (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if not n.startswith(blocks.prefix + ".")}


def _checked(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A streamed model's weights are checked for NaN/Inf as they are read
    (an in-memory one is checked at load time)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            raise D2PruneError(f"NaN/Inf in weight {name}: the checkpoint is corrupt")
    return tensors


class StreamedBlocks(BlockSource):
    """Block source reading each block from the checkpoint when it is opened
    and releasing it (back to the meta device) when it is closed. The rest of
    the model (embeddings, final norm, head) is read likewise only while the
    engine needs it (capture, head), so between those moments host RAM holds
    one block, not the 1-2 GB embedding and head of a 128k vocabulary."""

    def __init__(self, blocks: Blocks, reader: CheckpointReader, compute_dtype: torch.dtype | None = None,
                 expert_group: int | None = None):
        super().__init__(blocks, compute_dtype)
        self.reader = reader
        # experts per group when a block's MoE experts are read, pruned and written in groups (docs/moe.md §4)
        self.expert_group = expert_group
        fix_mmap_threshold()

    @contextlib.contextmanager
    def outside(self, model: nn.Module, device: torch.device, head: bool = True) -> Iterator[None]:
        params = outside_blocks(model, self.blocks)
        tied = tied_parameters(model)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not head and out_emb is not None and not tied:  # the capture never reaches the head: leave it unread
            skip = {id(p) for p in out_emb.parameters()}
            params = {n: p for n, p in params.items() if id(p) not in skip}
        try:
            for name, t in _checked(self.reader.params(params)).items():
                _set_param(model, name, t.to(params[name].dtype))
            for target, src in tied.items():
                _set_param(model, target, model.get_parameter(src))
            with outside_on_device(model, device, self.compute_dtype):
                yield
        finally:
            for name in [*params, *tied]:
                p = model.get_parameter(name)
                if p.device.type != "meta":
                    _set_param(model, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
            for target, src in tied.items():
                _set_param(model, target, model.get_parameter(src))

    def names(self, i: int) -> dict[str, str]:
        """``{name in block: name in checkpoint}`` for block ``i``."""
        return {n: f"{self.blocks.prefix}.{i}.{n}" for n, _ in self.blocks[i].named_parameters()}

    def in_groups(self, i: int) -> dict[str, list[str]]:
        """``{experts module: its 3-D parameters}`` of block ``i`` that are read
        in groups of experts (none unless ``expert_group`` is set)."""
        if not self.expert_group:
            return {}
        from .experts import experts_modules, fused_matrices

        return {name: fused_matrices(m) for name, m in experts_modules(self.blocks[i]).items() if fused_matrices(m)}

    @contextlib.contextmanager
    def open(self, i: int, device: torch.device) -> Iterator[nn.Module]:
        block = self.blocks[i]
        grouped = self.in_groups(i)
        on_disk = {f"{m}.{n}" if m else n for m, ns in grouped.items() for n in ns}
        try:
            names = {local: full for local, full in self.names(i).items() if local not in on_disk}
            tensors = _checked(self.reader.params(names.values()))
            for local, full in names.items():
                _set_param(block, local, tensors.pop(full).to(block.get_parameter(local).dtype))
            placed = place_params(block, device, self.compute_dtype)
            try:
                with self._groups(i, block, grouped, device):
                    yield block
            finally:
                placed.restore()
        finally:
            _release(block)

    @contextlib.contextmanager
    def _groups(self, i: int, block: nn.Module, grouped: dict[str, list[str]], device: torch.device) -> Iterator[None]:
        """Block ``i``'s experts modules told how to read their experts a group at a time."""
        if not grouped:
            yield
            return
        from .experts import ExpertGroups, unfused

        def reader(full: str):
            def read(name: str, e0: int, e1: int) -> Tensor:
                key = f"{full}.{name}"
                return _checked({key: self.reader.param_rows(key, e0, e1)})[key]
            return read

        with unfused(block):
            states = []
            for m in grouped:
                module = block.get_submodule(m)
                state = module._d2prune_experts
                state.groups = ExpertGroups(module, self.expert_group, reader(f"{self.blocks.prefix}.{i}.{m}"), device,
                                            self.compute_dtype)
                states.append(state)
            try:
                yield
            finally:
                for state in states:
                    state.groups.unload()
                    state.groups = None

    def restore(self, i: int, shard: str | os.PathLike) -> None:
        """Block ``i`` is read from ``shard`` from now on (a finished block)."""
        self.reader.add(shard)

    saved = restore


def block_tensors(block: nn.Module, prefix: str) -> dict[str, Tensor]:
    """A block's parameters by checkpoint name (``prefix`` = ``model.layers.7``),
    on the CPU, in their storage dtype, contiguous (as safetensors wants)."""
    return {f"{prefix}.{name}": p.detach().to(device="cpu", dtype=getattr(p, STORAGE_DTYPE, p.dtype)).contiguous()
            for name, p in block.named_parameters()}


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


REST_SHARD_BYTES = 1 << 30  # what is outside the blocks goes to shards of at most this (a bigger tensor alone)


def write_sharded(model: nn.Module, reader: CheckpointReader, block_shards: list[Path], folder: str | os.PathLike,
                  storage: torch.dtype, requant=None) -> None:
    """Write ``model`` into ``folder`` as an ordinary sharded checkpoint in the
    input checkpoint's own layout (its tensor names and shapes: the reverse of
    the conversions it was read with, as ``save_pretrained`` writes it): first
    what is outside the blocks (read from the input again, one shard of at
    most 1 GiB at a time), then one shard per block (``block_shards[i]``,
    already written in the model's layout; hard-linked when that is the
    checkpoint's too, so no block passes through RAM again, else converted
    back one parameter group at a time), ``model.safetensors.index.json`` and
    the config (``dtype`` = the storage dtype; no ``auto_map``). ``requant``
    (a :class:`~d2prune.io.quantized.Requantizer`): the tensors quantized in
    the input are written re-quantized, converted as they are written (one
    tensor, or one group of experts, at a time: no block shard is linked)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    blocks = find_blocks(model)
    tied = tied_parameters(model)
    mapping = reader.mapping
    rest = {n: p for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith(blocks.prefix + ".") and n not in tied}  # unchanged by pruning: copied from the input
    buffers = {n: model.get_buffer(n) for n in persistent_buffers(model)}  # every block's too, as save_pretrained
    # the tensors one conversion makes stay in one shard (it is reverted whole)
    units = [[n] for n in buffers if mapping is None or n not in mapping.of]
    if mapping is not None:
        units += [[t for t in g.targets if t in rest or t in buffers]
                  for g in mapping.groups_of([*rest, *(n for n in buffers if n in mapping.of)])]
    else:
        units += [[n] for n in rest]
    rest.update(buffers)
    groups: list[list[str]] = []
    filled = REST_SHARD_BYTES
    for unit in units:
        nbytes = sum(rest[n].numel() * rest[n].element_size() for n in unit)
        if filled + nbytes > REST_SHARD_BYTES:
            groups.append([])
            filled = 0
        groups[-1].extend(unit)
        filled += nbytes
    total = len(groups) + len(block_shards)
    weight_map, size = {}, 0
    for k, names in enumerate(groups):
        tensors = {n: t.to(rest[n].dtype) for n, t in reader.params([n for n in names if n not in buffers]).items()}
        tensors.update({n: buffers[n].detach().to("cpu").contiguous() for n in names if n in buffers})
        if mapping is not None:
            tensors = mapping.revert(tensors)
        if requant is not None:
            tensors = requant.encode_all(tensors)
        save_file(tensors, str(folder / shard_name(k + 1, total)), metadata={"format": "pt"})
        weight_map.update({n: shard_name(k + 1, total) for n in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    for i, src in enumerate(block_shards):
        dst = folder / shard_name(len(groups) + i + 1, total)
        with safe_open(str(src), "pt") as f:  # the header only: no tensor is read
            names = list(f.keys())
        if requant is not None and mapping is None:
            raise D2PruneError("re-quantizing a streamed output needs the checkpoint's key mapping")
        if requant is None and (mapping is None or mapping.written_as_read(names)):
            try:
                os.link(src, dst)
            except OSError:
                import shutil

                shutil.copyfile(src, dst)
        else:  # back to the checkpoint's layout (e.g. one tensor per expert), one conversion's parameters at a time
            write_reverted(mapping, src, names, dst, requant)
            trim_heap()
        with safe_open(str(dst), "pt") as f:  # the header only: no tensor is read
            for name in f.keys():
                weight_map[name] = dst.name
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                size += n * torch.empty((), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float32)).element_size()
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                                                indent=2) + "\n")
    config = model.config
    config.dtype = storage
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(folder)
        except Exception:  # pragma: no cover - an invalid generation config is not ours to fix
            log.warning("generation_config not saved")


EXPERT_CHUNK_BYTES = 1 << 29  # fused experts larger than this are written back a group of experts at a time


def write_reverted(mapping, src: Path, names: list[str], dst: Path, requant=None) -> None:
    """Block shard ``src`` (``names``, in the model's layout) written to
    ``dst`` in the checkpoint's layout, one conversion at a time; fused
    experts larger than :data:`EXPERT_CHUNK_BYTES` a group of experts at a
    time (a DeepSeek-V3 block's are ~7 GB each), so RAM never holds one whole.
    ``requant``: each tensor re-quantized into the input's format as it is
    written (:meth:`~d2prune.io.quantized.Requantizer.encode`)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:  # the header only
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        dtypes = {n: _ST_DTYPES[f.get_slice(n).get_dtype()] for n in names}
    specs = {k: (tuple(v.shape), v.dtype) for k, v in
             mapping.revert({n: torch.empty(shapes[n], dtype=dtypes[n], device="meta") for n in names}).items()}
    if requant is not None:
        specs = {k: v for name, (shape, dtype) in specs.items() for k, v in requant.spec(name, shape, dtype).items()}
    writer = SafetensorsWriter(dst, specs, {"format": "pt"})

    def put(name: str, t: Tensor, start: int = 0) -> None:
        if requant is None:
            writer.write(name, t, start)
            return
        for k, (v, first) in requant.encode(name, t, start).items():
            writer.write(k, v, first)

    try:
        for g in mapping.groups_of(names):
            targets = [t for t in g.targets if t in names]
            rows = {shapes[t][0] for t in targets if len(shapes[t]) == 3}
            nbytes = sum(math.prod(shapes[t]) * torch.empty((), dtype=dtypes[t]).element_size() for t in targets)
            if len(rows) != 1 or any(len(shapes[t]) != 3 for t in targets) or nbytes <= EXPERT_CHUNK_BYTES:
                for k, v in mapping.revert(read_safetensors(src, targets)).items():
                    put(k, v)
                continue
            E = rows.pop()
            step = max(1, E * EXPERT_CHUNK_BYTES // nbytes)
            for e0 in range(0, E, step):
                part = {t: read_safetensors_rows(src, t, e0, min(E, e0 + step)) for t in targets}
                for k, (v, start) in mapping.revert_rows(part, e0).items():
                    put(k, v, start)
                del part
        writer.close()
    except BaseException:
        writer.abort()
        raise


def requantizer_for(folder: str | os.PathLike, quant):
    """A :class:`~d2prune.io.quantized.Requantizer` for the quantized
    checkpoint in ``folder`` (``quant``: its format): the input's tensor
    names, shapes and dtypes from the shard headers (no tensor is read)."""
    from .quantized import Requantizer

    raw = CheckpointReader(folder)
    shapes, dtypes = raw.shapes(), raw.dtypes()
    return Requantizer(quant, {n: (shapes[n], dtypes[n]) for n in shapes}, raw.get_many)


def requantize_folder(folder: str | os.PathLike, requant) -> None:
    """A float checkpoint in ``folder`` (``save_pretrained``'s output, in the
    checkpoint's layout) re-quantized in place, one shard at a time (each
    rewritten to ``.tmp`` and renamed over the float one: the disk holds one
    shard twice at most), one tensor or one group of experts at a time; the
    index rewritten with the stored names."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        dtypes = {k: _ST_DTYPES[v["dtype"]] for k, v in header.items()}
        specs = {k: v for name in header for k, v in requant.spec(name, shapes[name], dtypes[name]).items()}
        writer = SafetensorsWriter(path, specs, {"format": "pt"})
        try:
            for name in header:
                nbytes = math.prod(shapes[name]) * torch.empty((), dtype=dtypes[name]).element_size()
                E = shapes[name][0] if len(shapes[name]) == 3 else 1
                step = E if nbytes <= EXPERT_CHUNK_BYTES else max(1, E * EXPERT_CHUNK_BYTES // nbytes)
                for e0 in range(0, E, step):
                    t = (read_safetensors_rows(path, name, e0, min(E, e0 + step)) if step < E
                         else read_safetensors(path, [name])[name])
                    for k, (v, first) in requant.encode(name, t, e0).items():
                        writer.write(k, v, first)
                    del t
            writer.close()
        except BaseException:
            writer.abort()
            raise
        trim_heap()
    index = folder / INDEX_NAME
    if index.is_file():
        from safetensors import safe_open

        weight_map, size = {}, 0
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    weight_map[name] = path.name
                    size += math.prod(sl.get_shape()) * torch.empty(
                        (), dtype=_ST_DTYPES[sl.get_dtype()]).element_size()
        index.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                                    indent=2) + "\n")


def keep_quantization_config(folder: str | os.PathLike, section: dict) -> None:
    """``config.json`` of a re-quantized output gets the input's
    ``quantization_config`` back, as the input wrote it."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = section
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- choosing the path
STREAM_CHOICES = ("auto", "on", "off")
STREAM_RAM_SHARE = 0.5  # --stream auto streams a checkpoint larger than this share of the available RAM


@dataclass
class OpenedModel:
    """A model ready for the engine: in memory, or a skeleton whose blocks are
    streamed from ``reader``. ``source`` is the engine's block source."""

    model: nn.Module
    tokenizer: object
    description: str
    source: BlockSource
    storage_dtype: torch.dtype
    reader: CheckpointReader | None = None
    files: list[Path] = field(default_factory=list)
    # the input's quantized format (io/quantized.py: FP8, MXFP4) and its folder; None: a float checkpoint
    quantization: object | None = None
    folder: Path | None = None

    @property
    def streamed(self) -> bool:
        return self.reader is not None


def available_ram() -> int:
    """MemAvailable of /proc/meminfo in bytes (total RAM elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def open_model(name: str | None, dtype: str | torch.dtype | None, device: torch.device, stream: str = "auto") -> OpenedModel:
    """Open ``--model`` for pruning: streamed from disk (``stream="on"``, or
    ``"auto"`` when the safetensors checkpoint, or a GGUF file's de-quantised
    tensors, take more than half the available RAM), else loaded in memory. Storage dtype: the checkpoint's
    (``dtype="auto"``) or the one asked for; blocks compute in fp32 on a CPU
    when stored in half precision (:func:`d2prune.io.modeling.compute_dtype_for`)."""
    from .modeling import _dtype, image_classifier_class, load_model, quantization, resolve_source

    if stream not in STREAM_CHOICES:
        raise D2PruneError(f"--stream {stream!r} is not valid: use {', '.join(STREAM_CHOICES)}")
    src = resolve_source(name)
    if image_classifier_class(src):  # vision transformers are small: in memory, one block at a time on the device
        if stream == "on":
            raise D2PruneError(f"--stream on reads causal LMs from disk block by block; {src.describe()} is an image "
                               "classifier, loaded in memory: use --stream off (or auto)")
        stream = "off"
    folder = Path(src.path)
    if stream != "off" and not src.is_local and not src.gguf_file:
        folder = Path(download_safetensors(src.path))
    gguf = folder / src.gguf_file if src.gguf_file else None
    files = [gguf] if gguf else (_safetensors_files(folder) if folder.is_dir() else [])
    if stream == "on" and not files:
        raise D2PruneError(f"--stream on needs a safetensors or GGUF checkpoint; {src.describe()} has none: "
                           "use --stream off")
    want = _dtype(dtype)
    if stream == "auto":
        limit = STREAM_RAM_SHARE * available_ram()
        if gguf:  # what the in-memory path would hold: the de-quantised tensors (None: not streamable)
            from .gguf import dequantized_nbytes

            size = dequantized_nbytes(gguf, None if want == "auto" else want, limit)
        else:
            size = sum(f.stat().st_size for f in files)
        stream = "on" if files and size is not None and size > limit else "off"
        if stream == "on":
            log.info("the checkpoint (%.1f GB%s) is larger than half the available RAM: streaming its blocks from disk",
                     size / 1e9, " de-quantised" if gguf else "")
    if stream == "on":
        model, tok, reader = load_streamed(str(gguf or folder), None if want == "auto" else want)
        storage = next(model.parameters()).dtype
        source = StreamedBlocks(find_blocks(model), reader, compute_dtype_for(device, storage))
        quant = reader.quant if isinstance(reader, QuantizedReader) else None
        return OpenedModel(model, tok, src.describe(), source, storage, reader, files, quant, folder)
    model, tok, _ = load_model(name, dtype=want)
    storage = next(model.parameters()).dtype
    quant = quantization(src)
    if quant is not None and not src.is_local:  # its files are in the hub cache (from_pretrained fetched them)
        folder = Path(download_safetensors(src.path))
    return OpenedModel(model, tok, src.describe(), BlockSource(find_blocks(model), compute_dtype_for(device, storage)),
                       storage, None, files, quant, folder)


def download_safetensors(repo: str) -> str:
    """A hub checkpoint's config, tokenizer and safetensors files, downloaded
    (or found in the local cache) without loading them; returns the folder."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:
        raise D2PruneError(f"could not download {repo} from the HuggingFace hub: {type(e).__name__}: "
                           f"{first_line(e)}") from e
