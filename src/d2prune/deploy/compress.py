"""Compressed sparse checkpoints: a pruned model's file shrinks with its sparsity.

A dense checkpoint of a pruned model stores every zero. Here each sparse
weight matrix ``P.weight`` (``[d_out, d_in]``) is stored instead as one of
(docs/deploy.md §1 has the layout and the size arithmetic):

* **bitmask** (any pattern): ``P.weight_bitmask`` - 1 bit per weight, rows
  padded to whole bytes, bit ``j % 8`` of byte ``j // 8`` (little-endian bit
  order) set where the weight is kept - and ``P.weight_values``, the kept
  values row-major in the model's dtype. 50% in bf16: 1 + 8 = 9 bits per
  weight instead of 16 (0.5625x); 70%: 1 + 4.8 = 5.8 bits (0.36x).
* **N:M** (at most ``k = m - n`` non-zeros in every group of ``m``
  consecutive inputs of a row, e.g. 2:4): ``P.weight_nm_values`` ``[d_out,
  d_in * k / m]`` (exactly ``k`` values per group, padded with the group's
  zeros) and ``P.weight_nm_indices`` - each value's position in its group,
  ``log2(m)`` bits, packed like the bitmask (2:4: 2 bits per kept value, 9 bits
  per weight in bf16 with the values, the layout sparse kernels consume).

Plus ``P.weight_shape`` (int64 ``[2]``) and, for N:M, ``P.weight_nm``
(``[k, m]``). A weight is "kept" when its bits are not all zero, so ``-0.0``
survives and the round trip is bit-identical in every dtype. A matrix is
compressed only when that makes it smaller; every other tensor (embeddings,
norms, a dense head) is written unchanged. Each shard's header records the
crc32 of every tensor in it, and every loader below checks the bytes it reads
against it.

Loading: ``config.json`` carries ``quantization_config = {"quant_method":
"d2prune_sparse", ...}``; importing :mod:`d2prune` registers that method with
transformers, so ``AutoModelForCausalLM.from_pretrained(folder)`` decompresses
each weight as it is loaded (one tensor at a time) and returns an ordinary
dense model. :func:`from_pretrained` does the same without transformers'
quantizer machinery, and :class:`CompressedReader` lets the streamed
(block-by-block) path read a compressed checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import D2PruneError
from ..io.sparse_format import (CHECKSUM, FORMAT, NM, QUANT_METHOD, VERSION, encode, is_compressed,  # noqa: F401 - is_compressed re-exported
                            shard_metadata)

log = logging.getLogger(__name__)

SHARD_BYTES = 1 << 30  # compressed output shards of at most ~1 GiB


# --------------------------------------------------------------------------- folders
@dataclass
class CompressionReport:
    """What compressing a folder did: bytes of the weights before and after,
    of the compressed matrices alone, and how many matrices took each layout."""

    folder: Path
    dense_bytes: int = 0
    stored_bytes: int = 0
    matrices_dense_bytes: int = 0
    matrices_stored_bytes: int = 0
    layouts: dict = field(default_factory=lambda: {"bitmask": 0, "2:4": 0, "4:8": 0})

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def matrices_ratio(self) -> float:
        return self.matrices_stored_bytes / self.matrices_dense_bytes if self.matrices_dense_bytes else 1.0

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "dense_bytes": self.dense_bytes,
                "stored_bytes": self.stored_bytes, "ratio": round(self.ratio, 4),
                "sparse_matrices_dense_bytes": self.matrices_dense_bytes,
                "sparse_matrices_stored_bytes": self.matrices_stored_bytes,
                "sparse_matrices_ratio": round(self.matrices_ratio, 4), "layouts": dict(self.layouts)}

    def line(self) -> str:
        gb = 1e9
        return (f"compressed {self.folder}: weights {self.stored_bytes / gb:.3f} GB vs {self.dense_bytes / gb:.3f} GB "
                f"dense ({self.ratio:.3f}x; the sparse matrices alone {self.matrices_ratio:.3f}x; layouts "
                + ", ".join(f"{k} {v}" for k, v in self.layouts.items() if v) + ")")


def _weight_files(folder: Path) -> list[Path]:
    from ..io.streaming import INDEX_NAME, SINGLE_NAME

    index = folder / INDEX_NAME
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise D2PruneError(f"{index} is not a valid safetensors index: {e}") from e
        return [folder / f for f in files]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    raise D2PruneError(f"{folder} has no model.safetensors nor model.safetensors.index.json: "
                       "compress needs a folder saved with safetensors (a d2prune --out folder)")


def compress_weights(src: str | os.PathLike, dst: str | os.PathLike) -> CompressionReport:
    """Write the weights of the safetensors checkpoint ``src`` into ``dst``
    compressed, one input tensor at a time (peak memory ~ one output shard),
    with ``model.safetensors.index.json``, and ``dst/config.json`` (copied
    from ``src``) marked with the format. Other files are not copied."""
    from safetensors.torch import save_file

    from ..io.streaming import INDEX_NAME, read_safetensors, shard_name

    src, dst = Path(src), Path(dst)
    report = CompressionReport(dst)
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if config is None:
        raise D2PruneError(f"{src} has no config.json: compress needs a saved model folder")
    if isinstance(config.get("quantization_config"), dict):
        raise D2PruneError(f"{src} is already quantized or compressed "
                           f"({config['quantization_config'].get('quant_method')}): give the dense pruned folder")
    from safetensors import safe_open

    shards: list[list[str]] = []  # temp files of finished output shards
    weight_map: dict[str, str] = {}
    pending: dict[str, Tensor] = {}
    pending_bytes = 0
    tmp_names: list[str] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        fname = f".shard-{len(tmp_names):05d}.safetensors"
        save_file(pending, str(dst / fname), metadata=shard_metadata(pending))  # with every tensor's crc32
        tmp_names.append(fname)
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for path in _weight_files(src):
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
        for name in names:
            t = read_safetensors(path, [name])[name]
            parts = encode(name, t)
            dense = t.numel() * t.element_size()
            stored = sum(p.numel() * p.element_size() for p in parts.values())
            report.dense_bytes += dense
            report.stored_bytes += stored
            if name not in parts:
                report.matrices_dense_bytes += dense
                report.matrices_stored_bytes += stored
                nm = parts.get(name + NM)
                report.layouts["bitmask" if nm is None else f"{int(nm[0])}:{int(nm[1])}"] += 1
            del t
            pending.update(parts)
            pending_bytes += stored
            if pending_bytes >= SHARD_BYTES:
                flush()
    flush()
    total = len(tmp_names)
    for k, (fname, names) in enumerate(zip(tmp_names, shards)):
        final = shard_name(k + 1, total)
        os.replace(dst / fname, dst / final)
        weight_map.update({n: final for n in names})
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": report.stored_bytes},
                                              "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format": FORMAT, "version": VERSION,
                                     "checksum": CHECKSUM}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("%s", report.line())
    return report


def copy_side_files(src: Path, dst: Path) -> None:
    """Everything of a model folder but its weights, config and record
    (tokenizer, generation config, ...), copied as it is."""
    from ..io.save import RECORD_NAME

    skip = {"model.safetensors.index.json", "config.json", RECORD_NAME}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors") and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)


def compressing(dense_writer, record: dict):
    """A ``write_weights(folder)`` for :func:`d2prune.io.save.save_pruned` that
    writes the dense weights with ``dense_writer`` into a staging folder
    inside ``folder``, compresses them into ``folder`` and removes the staging
    copy (the disk briefly holds both); ``record`` gains ``compression``."""

    def write(folder: Path) -> None:
        staging = Path(folder) / ".dense"
        staging.mkdir()
        dense_writer(staging)
        copy_side_files(staging, Path(folder))
        record["compression"] = compress_weights(staging, folder).to_dict()
        shutil.rmtree(staging)

    return write


def compress_folder(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> CompressionReport:
    """``d2prune compress SRC OUT``: a pruned folder re-saved compressed, with
    its tokenizer, generation config and ``d2prune.json`` (gaining a
    ``compression`` section), written atomically like every d2prune output."""
    from ..io.save import RECORD_NAME, save_pruned

    src = Path(src).expanduser()
    if not src.is_dir():
        raise D2PruneError(f"{src} is not a folder: give a pruned model folder (a d2prune --out)")
    if is_compressed(src):
        raise D2PruneError(f"{src} is already compressed ({FORMAT})")
    if Path(out).expanduser().resolve() == src.resolve():
        raise D2PruneError("compress writes a new folder: give an output folder other than the input")
    record = {}
    if (src / RECORD_NAME).is_file():
        try:
            record = json.loads((src / RECORD_NAME).read_text())
        except ValueError as e:
            raise D2PruneError(f"{src / RECORD_NAME} is not valid JSON: {e}") from e
    result: list[CompressionReport] = []

    def write(folder: Path) -> None:
        copy_side_files(src, folder)
        result.append(compress_weights(src, folder))
        record["compression"] = result[0].to_dict()

    target = save_pruned(None, None, out, record, overwrite, write_weights=write)
    result[0].folder = target
    return result[0]


def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype | str | None = "auto",
                    device: str | torch.device | None = None):
    """Load a compressed folder as an ordinary dense ``transformers`` model,
    without transformers' quantizer machinery (so with any transformers 5.x):
    the skeleton is built on the meta device and every weight is read - and
    decompressed - one tensor at a time (:class:`~d2prune.io.streaming.CompressedReader`).
    The same weights as ``AutoModelForCausalLM.from_pretrained(folder)`` after
    ``import d2prune`` (tested)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..io.key_mapping import KeyMapping
    from ..io.streaming import CompressedReader, persistent_buffers, tied_parameters

    folder = Path(folder)
    if not is_compressed(folder):
        raise D2PruneError(f"{folder} is not a d2prune-sparse folder (its config.json names no "
                           f"quantization_config.quant_method = {QUANT_METHOD}): load it with from_pretrained directly")
    reader = CompressedReader(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    del config.quantization_config
    want = reader.storage_dtype() if dtype in (None, "auto") else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=want)
    tied = tied_parameters(model)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in tied]
    # the folder has the checkpoint's layout (save_pretrained's: a matrix per expert): read as from_pretrained does
    mapping = KeyMapping(model, list(reader.files))
    missing = mapping.missing(names)
    if missing:
        raise D2PruneError(f"{folder}: the checkpoint has no tensor for {missing[0]} that {type(model).__name__} needs")
    names += [n for n in persistent_buffers(model) if not mapping.missing([n])]
    state = mapping.read(names, reader.get_many, str(folder))  # in the skeleton's dtypes (``want``; fp32 buffers stay)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if tied:
        model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.eval()
    return model.to(device) if device is not None else model


# --------------------------------------------------------------------------- transformers integration
_REGISTERED = False


def register_with_transformers() -> None:
    """Teach ``from_pretrained`` the ``d2prune_sparse`` quantization method: a
    quantizer whose load operation decompresses each weight (the model it
    returns is dense and plain; saving it again writes a dense checkpoint)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .quantizer import register

    register()
    _REGISTERED = True
