"""The d2prune-sparse storage format: a sparse matrix as a bitmask or N:M
indices plus its kept values (pure tensor code; folders, loading and the
transformers integration are in :mod:`d2prune.deploy.compress`; docs/deploy.md §1)."""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from pathlib import Path

import torch
from torch import Tensor

from ..errors import D2PruneError

FORMAT = "d2prune-sparse"
QUANT_METHOD = "d2prune_sparse"
VERSION = 1
SHAPE, BITMASK, VALUES = "_shape", "_bitmask", "_values"
NM, NM_VALUES, NM_INDICES = "_nm", "_nm_values", "_nm_indices"
SUFFIXES = (SHAPE, BITMASK, VALUES, NM, NM_VALUES, NM_INDICES)
NM_PATTERNS = ((2, 4), (4, 8))  # (kept, group) tried in this order: 2:4, then 4:8
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Every stored tensor's crc32 sits in its shard's safetensors header metadata
# under CHECKSUM_KEY (a JSON object {tensor name: 8 hex digits}); config.json's
# quantization_config names the digest ("checksum": "crc32"), so a shard that
# lost its digests is refused rather than read unverified. crc32 detects
# damage (flipped bytes, a torn copy), not deliberate tampering, and runs at
# several GB/s (docs/deploy.md §1).
CHECKSUM = "crc32"
CHECKSUM_KEY = "d2prune_crc32"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- checksums
def checksum(t: Tensor) -> str:
    """crc32 of the bytes safetensors stores for ``t`` (its elements,
    contiguous, in the machine's little-endian order), as 8 hex digits."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return f"{zlib.crc32(memoryview(data)):08x}"


def shard_metadata(tensors: dict[str, Tensor]) -> dict[str, str]:
    """The safetensors header metadata of a compressed shard holding ``tensors``."""
    return {"format": "pt", CHECKSUM_KEY: json.dumps({n: checksum(t) for n, t in tensors.items()}, sort_keys=True)}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def expected_checksums(config: dict | object, files) -> dict[str, str]:
    """``{stored tensor name: crc32}`` of a compressed checkpoint's shard
    ``files``, read from their headers (no tensor data). ``config`` is the
    ``quantization_config`` (a dict or transformers' config object). A folder
    written before checksums (its config names none) gives ``{}`` and loads
    unverified; one that names them but has a shard without them, or a
    tensor missing from its shard's list, is refused."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    algo = get("checksum")
    if algo is None:
        log.debug("%s: written before d2prune recorded checksums: its tensors are loaded unverified",
                  Path(next(iter(files), ".")).parent)
        return {}
    if algo != CHECKSUM:
        raise D2PruneError(f"{FORMAT} checksum {algo!r} is not one this d2prune knows ({CHECKSUM}): upgrade d2prune")
    out: dict[str, str] = {}
    for path in sorted({Path(f) for f in files}):
        try:
            header = _header(path)
            sums = json.loads((header.get("__metadata__") or {})[CHECKSUM_KEY])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise D2PruneError(f"{path}: no readable {CHECKSUM} checksums in its header although config.json says "
                               f"the folder has them ({type(e).__name__}): the shard is damaged or was replaced; "
                               "copy the folder again or re-create it (d2prune compress)") from e
        unlisted = [n for n in header if n != "__metadata__" and n not in sums]
        if unlisted:
            raise D2PruneError(f"{path}: tensor {unlisted[0]} has no checksum in its shard: the shard is damaged "
                               "or was replaced; copy the folder again or re-create it (d2prune compress)")
        out.update(sums)
    return out


def checksum_error(name: str, path: str | os.PathLike, want: str, got: str, more: int = 0):
    """The one-line error of a tensor whose bytes do not match its checksum."""
    others = f" (and {more} more tensors)" if more else ""
    return D2PruneError(f"{path}: tensor {name} fails its {CHECKSUM} checksum (stored {want}, read {got}){others}: "
                        "the file is damaged; copy the folder again or re-create it (d2prune compress)")


# --------------------------------------------------------------------------- bits
def pack_bits(bits: Tensor) -> Tensor:
    """``[..., n]`` booleans -> ``[..., ceil(n / 8)]`` uint8, bit ``j % 8`` of byte
    ``j // 8`` = ``bits[..., j]`` (the last byte zero-padded)."""
    n = bits.shape[-1]
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], dim=-1)
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    grouped = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., ceil(n / 8)]`` uint8 -> ``[..., n]`` bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()


def _kept(W: Tensor) -> Tensor:
    """Weights whose bits are not all zero (``-0.0`` is kept: exact round trip)."""
    return W.view(_INT_VIEW[W.element_size()]) != 0


# --------------------------------------------------------------------------- one matrix
def compress_matrix(name: str, W: Tensor, nm: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """The tensors storing the weight ``name`` (e.g. ``...q_proj.weight``):
    N:M when ``nm = (kept, group)`` fits it, else the bitmask. A fused 3-D
    experts tensor ``[E, a, b]`` is stored as the ``[E * a, b]`` matrix of its
    stacked experts (its shape entry keeps the three dimensions)."""
    out = {name + SHAPE: torch.tensor(list(W.shape), dtype=torch.int64)}
    W = _as_matrix(W)
    rows, cols = W.shape
    kept = _kept(W)
    if nm is not None:
        k, m = nm
        groups = kept.reshape(rows, cols // m, m)
        # kept positions first (ascending), then the group's zeros (ascending) up to k
        order = torch.sort((~groups).to(torch.int8), dim=-1, stable=True).indices[..., :k]
        idx = order.sort(dim=-1).values
        values = torch.gather(W.reshape(rows, cols // m, m), -1, idx)
        bits_per = int(math.log2(m))
        bits = ((idx.unsqueeze(-1) >> torch.arange(bits_per, device=W.device)) & 1).reshape(rows, -1)
        out[name + NM] = torch.tensor([k, m], dtype=torch.int64)
        out[name + NM_VALUES] = values.reshape(rows, -1).contiguous()
        out[name + NM_INDICES] = pack_bits(bits.bool())
        return out
    out[name + BITMASK] = pack_bits(kept)
    out[name + VALUES] = W[kept].contiguous()
    return out


def decompress_matrix(parts: dict[str, Tensor]) -> Tensor:
    """The dense matrix from its stored parts (keys are the suffixes:
    ``_shape``, ``_bitmask``/``_values`` or ``_nm``/``_nm_values``/``_nm_indices``)."""
    shape = [int(v) for v in parts[SHAPE]]
    W = _decompress(parts, math.prod(shape[:-1]), shape[-1])
    return W.reshape(shape)


def _as_matrix(W: Tensor) -> Tensor:
    """``W`` as a ``[rows, cols]`` matrix (a 3-D experts tensor: its experts stacked)."""
    return W if W.ndim == 2 else W.reshape(-1, W.shape[-1])


def _decompress(parts: dict[str, Tensor], rows: int, cols: int) -> Tensor:
    if NM in parts:
        k, m = (int(v) for v in parts[NM])
        values = parts[NM_VALUES].reshape(rows, cols // m, k)
        bits_per = int(math.log2(m))
        bits = unpack_bits(parts[NM_INDICES], (cols // m) * k * bits_per).reshape(rows, cols // m, k, bits_per)
        idx = (bits.to(torch.int64) << torch.arange(bits_per, device=bits.device)).sum(-1)
        W = torch.zeros(rows, cols // m, m, dtype=values.dtype, device=values.device)
        return W.scatter_(-1, idx, values).reshape(rows, cols)
    kept = unpack_bits(parts[BITMASK], cols)
    values = parts[VALUES]
    W = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    W[kept] = values
    return W


def nm_pattern(W: Tensor) -> tuple[int, int] | None:
    """The first of 2:4, 4:8 that ``W`` satisfies (at most ``k`` kept weights in
    every group of ``m`` consecutive inputs of a row), or None."""
    W = _as_matrix(W)
    kept = _kept(W)
    for k, m in NM_PATTERNS:
        if W.shape[1] % m == 0 and int(kept.reshape(W.shape[0], -1, m).sum(-1).max()) <= k:
            return k, m
    return None


def compressed_bytes(W: Tensor, nm: tuple[int, int] | None) -> int:
    W = _as_matrix(W)
    return stored_bytes(W.shape[0], W.shape[1], W.element_size(), 0 if nm is not None else int(_kept(W).sum()), nm)


def stored_bytes(rows: int, cols: int, element_size: int, kept: int, nm: tuple[int, int] | None = None) -> int:
    """Bytes of a ``[rows, cols]`` matrix in the N:M layout ``nm = (k, m)``
    (``kept`` is then ``k`` per group of ``m``), else as a bitmask with
    ``kept`` kept weights (also what a run's disk estimate counts)."""
    if nm is not None:
        k, m = nm
        kept = rows * cols // m * k
        return kept * element_size + math.ceil(kept * int(math.log2(m)) / 8) + 32
    return rows * math.ceil(cols / 8) + kept * element_size + 16


def encode(name: str, t: Tensor) -> dict[str, Tensor]:
    """``{name: t}`` unchanged, or the compressed parts of ``t`` when it is a
    floating 2-D ``.weight`` or a 3-D fused experts tensor (``...experts.down_proj``)
    that they store in fewer bytes."""
    matrix = (name.endswith("weight") and t.ndim == 2) or (t.ndim == 3 and not name.endswith("bias"))
    if not (matrix and t.is_floating_point() and t.numel()):
        return {name: t}
    dense = t.numel() * t.element_size()
    nm = nm_pattern(t)  # preferred when it fits: the layout 2:4 kernels consume
    if nm is not None and compressed_bytes(t, nm) < dense:
        return compress_matrix(name, t, nm)
    if compressed_bytes(t, None) < dense:
        return compress_matrix(name, t, None)
    return {name: t}


def compressed_names(names) -> dict[str, dict[str, str]]:
    """``{weight name: {suffix: stored name}}`` for every compressed weight
    among the stored ``names`` (a weight is known by its ``_shape`` entry)."""
    names = set(names)
    out = {}
    for n in names:
        if n.endswith(SHAPE):
            base = n[: -len(SHAPE)]
            out[base] = {s: base + s for s in SUFFIXES if base + s in names}
    return out


def is_compressed(folder: str | os.PathLike) -> bool:
    """True for a folder written by :func:`compress_weights` (its config says so)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD
