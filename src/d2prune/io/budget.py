"""What a run will need, estimated before it starts (host RAM, device memory,
scratch disk), so a run that cannot fit is refused in seconds with the flag
that would make it fit, instead of dying after hours.

The estimate follows the engine's memory model: the weights at rest (the
whole model in memory, or only embeddings / norm / head when streamed), one
block open in its compute dtype, the statistics of its widest input (a
Hessian and its inverse factor, fp32: d_in^2 * 4 bytes each), a few fp32
copies of its largest weight matrix, and the activation buffer(s) of
``samples x seqlen x hidden`` in the compute dtype.

The scratch disk is what the run has written at its peak, just before the
work folder is removed: every pruned block in the work folder (once per
candidate of ``--frozen auto``), the whole output beside it (for
``--save-format compressed`` its dense staging copy and the compressed
weights at once), and with ``--offload-activations disk`` the activation
files (the evaluation windows' too when evaluation runs block by block).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Sparsity
from ..errors import D2PruneError
from .experts import ExpertLinear, unfused
from .modeling import find_prunable, in_features, weight_matrix
from .sparse_format import NM_PATTERNS, stored_bytes

log = logging.getLogger(__name__)

GB = 1e9
PROCESS_BASELINE = 500_000_000  # python, torch, transformers and the tokenizer before any weight (measured: ~0.45 GB)
# files besides the tensors' bytes: a tensor's entry in a safetensors header (measured ~100 bytes; in a
# compressed output's index too) and a pruned layer's row in state.json or d2prune.json (measured ~250-300)
TENSOR_ENTRY = 128
LAYER_ROW = 512


def _nbytes(params, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (torch.empty((), dtype=dtype or p.dtype).element_size()) for p in params)


@dataclass
class Budget:
    host_ram: int
    device_memory: int
    scratch_disk: int
    activations: int
    block: int = 0  # host RAM of one block at work (as read, in the compute dtype, its statistics) on a CPU

    def to_dict(self) -> dict:
        return {k: round(v / GB, 3) for k, v in vars(self).items()} | {"unit": "GB"}


@dataclass(frozen=True)
class Writes:
    """What a run writes besides its activations: an output folder (``out``,
    compressed at ``compressed`` sparsity, with ``side_bytes`` of config and
    tokenizer files), ``block_copies`` pruned copies of every block, and
    ``eval_samples`` evaluation windows (activation files when offloaded)."""

    out: bool = False
    block_copies: int = 1
    compressed: Sparsity | None = None
    side_bytes: int = 0
    eval_samples: int = 0
    requantized: int | None = None  # a streamed output re-quantized into the input's format: its weights' bytes


def side_files_bytes(files: list[Path]) -> int:
    """Config and tokenizer files beside the checkpoint ``files`` (what the
    output gets besides its weights); a checkpoint that has none beside it
    (a GGUF file) gets an allowance for a large tokenizer."""
    folder = files[0].parent if files else None
    if folder is None or files[0].suffix == ".gguf":
        return 16_000_000
    names = ("*.json", "*.txt", "*.model", "*.jinja")
    return sum(f.stat().st_size for pattern in names for f in folder.glob(pattern)
               if f.is_file() and not f.name.endswith(".index.json"))


def _compressed_matrix(shape, element_size: int, sparsity: Sparsity) -> tuple[int, int]:
    """(bytes, tensors) of one pruned matrix in the compressed output: the
    larger of the layouts it may take (an N:M pattern its sparsity fits, the
    bitmask), or dense when neither is smaller (as :func:`d2prune.sparse_format.encode`)."""
    rows, cols = shape
    dense = rows * cols * element_size
    layouts = [(stored_bytes(rows, cols, element_size, round(rows * cols * (1 - sparsity.ratio))), 3)]
    if sparsity.is_nm:
        keep = sparsity.m - sparsity.n  # kept per group of m
        layouts += [(stored_bytes(rows, cols, element_size, 0, (k, m)), 4) for k, m in NM_PATTERNS
                    if m % sparsity.m == 0 and cols % m == 0 and keep * (m // sparsity.m) <= k]
    size, tensors = max(layouts)
    return (size, tensors) if size < dense else (dense, 1)


def scratch_disk(opened, writes: Writes, offload: str | None, activations: int, eval_activations: int) -> int:
    """Bytes on disk at the run's peak (the module docstring lists them)."""
    blocks = opened.source.blocks
    block0, n_blocks = blocks[0], len(blocks)
    params = list(block0.parameters())
    layers = find_prunable(block0)
    rows = LAYER_ROW * len(layers) * n_blocks  # the report rows of state.json and d2prune.json
    in_blocks = {id(p) for b in blocks.layers for p in b.parameters()}
    outside = [p for p in opened.model.parameters() if id(p) not in in_blocks]
    block_file = _nbytes(params) + TENSOR_ENTRY * len(params)
    total = 0
    # the pruned blocks: the resume folder (--out), the streamed model's blocks, the work folder of the
    # activation files, or the candidates of a search spilled to a temporary folder
    if writes.out or opened.streamed or offload == "disk" or writes.block_copies > 1:
        total += writes.block_copies * (n_blocks * block_file + rows)
    if writes.out:
        dense = _nbytes(outside) + TENSOR_ENTRY * len(outside) + n_blocks * block_file
        if writes.requantized is not None:  # converted as it is written: the input's size, not the float one's
            dense = writes.requantized
        total += dense + writes.side_bytes + rows
        if writes.compressed is not None:  # the dense staging copy and the compressed weights, at once
            stored, entries = 0, 0
            pruned = {id(m.weight) for m in layers.values()}
            for p in params:
                size, tensors = _compressed_matrix(p.shape, p.element_size(), writes.compressed) \
                    if id(p) in pruned and p.dim() == 2 else (_nbytes([p]), 1)
                stored, entries = stored + size, entries + tensors
            total += _nbytes(outside) + n_blocks * stored + 2 * TENSOR_ENTRY * (len(outside) + n_blocks * entries)
    if offload == "disk":
        total += activations + eval_activations
    return total


def expert_gram_elements(block) -> int:
    """Elements of the input Gram matrices of a block's MoE experts: per
    expert, one ``d_in x d_in`` for gate and up (they read the same tokens)
    and one for down (docs/moe.md §4)."""
    with unfused(block):
        views = [m for m in find_prunable(block).values() if isinstance(m, ExpertLinear) and m.role != "up"]
        return sum(in_features(m) ** 2 for m in views)


def _grouped_share(block, group: int | None) -> dict:
    """``{3-D expert parameter: share of it held at once}`` when a block's experts are read ``group`` at a time."""
    if not group:
        return {}
    from .experts import experts_modules, fused_matrices

    out = {}
    for m in experts_modules(block).values():
        for n in fused_matrices(m):
            p = m._parameters[n]
            out[p] = min(1.0, group / p.shape[0])
    return out


def _experts_of(block, params: set[int]) -> list:
    from .experts import experts_modules

    return [m for m in experts_modules(block).values() if any(id(p) in params for p in m.parameters(recurse=False))]


def expert_group_size(opened, fits) -> int | None:
    """The largest number of experts per group for which ``fits(budget)``
    (a streamed model's blocks larger than RAM, docs/moe.md §4); None when
    the model has no grouped experts or not even one expert at a time fits."""
    from .experts import experts_modules, fused_matrices

    sizes = [m._parameters[n].shape[0] for b in opened.source.blocks.layers for m in experts_modules(b).values()
             for n in fused_matrices(m)]
    if not sizes or not opened.streamed:
        return None
    lo, hi = 1, max(sizes)
    if not fits(lo):
        return None
    while lo < hi:  # the needs grow with the group: the largest that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def estimate(opened, samples: int, seqlen: int, device: torch.device, hessians: int, activation_buffers: int = 1,
             offload: str | None = None, whole_model_per_weight: int = 0, writes: Writes | None = None) -> Budget:
    """Peak needs of pruning ``opened`` (a :class:`d2prune.io.streaming.OpenedModel`)
    that writes ``writes`` (default: nothing but what the run itself needs).
    ``hessians``: the fp32 ``d_in x d_in`` matrices held for the widest input
    (2 for an OBS-style method: the Hessian and its inverse factor; 1 when only
    the per-layer error reads one; 0 without either)."""
    model, blocks = opened.model, opened.source.blocks
    compute = opened.source.compute_dtype or opened.storage_dtype
    c_bytes = torch.empty((), dtype=compute).element_size()
    block0 = max(blocks.layers, key=lambda b: sum(p.numel() for p in b.parameters()))  # the largest (MoE, not dense)
    # experts read in groups (docs/moe.md §4): a group's share of the fused expert parameters is held at a time
    group = getattr(opened.source, "expert_group", None)
    grouped = _grouped_share(block0, group)
    block_params = list(block0.parameters())
    in_groups = {id(p) for p in grouped}
    share = {id(p): f for p, f in grouped.items()}
    block_storage = sum(_nbytes([p]) * share.get(id(p), 1.0) for p in block_params)
    block_compute = sum(_nbytes([p], compute) * share.get(id(p), 1.0) for p in block_params)
    layers = find_prunable(block0)
    widest = max((in_features(m) for m in layers.values()), default=0)
    largest = max((weight_matrix(m).numel() if m.weight.device.type != "meta" else m.weight.numel()
                   for m in layers.values()), default=0)
    # the Hessian(s) of the widest input, and a few fp32 working copies of the largest weight matrix
    stats = hessians * widest * widest * 4 + 3 * largest * 4
    if hessians:  # + every MoE expert's Hessians, all held from the block's calibration pass until it is pruned
        stats += 4 * expert_gram_elements(block0) * (min(grouped.values()) if grouped else 1.0)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    # a grouped experts module's recorded inputs and summed outputs live beside the activations
    activation_buffers += 2 * len({id(m) for m in _experts_of(block0, in_groups)})
    acts = activation_buffers * samples * seqlen * hidden * c_bytes
    in_blocks = {id(p) for b in blocks.layers for p in b.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_blocks]  # embeddings, final norm, head
    model_bytes = _nbytes(outside) + block_storage * len(blocks)
    on_cpu = device.type == "cpu"
    # the block as read (pages of the memory-mapped shard count in RSS), its compute copy and statistics
    working = 2 * block_storage + (block_compute + stats if on_cpu else 0)
    if opened.streamed:  # the outside is read only for the capture and the head, not during the block loop
        # (embeddings and head stay in their storage dtype: io/source.py outside_on_device)
        big = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(False)}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        big |= {id(p) for p in (head.parameters(False) if head is not None else ())}
        held = _nbytes([p for p in outside if id(p) in big]) + \
            _nbytes([p for p in outside if id(p) not in big], compute if on_cpu else None)
        host = max(held, working)
    else:
        host = model_bytes + working
    host += (acts if (on_cpu or offload == "cpu") else 0) + PROCESS_BASELINE
    dev = 0 if on_cpu else max(block_compute + stats, _nbytes(outside, compute)) + (0 if offload else acts)
    if whole_model_per_weight:  # a whole-model pass (Pruner-Zero's gradients): the model + a buffer per weight
        weights = sum(p.numel() for b in blocks.layers for p in b.parameters())
        whole = _nbytes(list(model.parameters()), compute) + whole_model_per_weight * weights
        host, dev = (max(host, whole + PROCESS_BASELINE), dev) if on_cpu else (host, max(dev, whole))
    writes = writes or Writes()
    # evaluation runs block by block (perplexity's sequential path, through the same activation store)
    # on a streamed or half-stored model and off the CPU
    eval_acts = writes.eval_samples * seqlen * hidden * c_bytes \
        if opened.streamed or opened.source.compute_dtype is not None or not on_cpu else 0
    disk = scratch_disk(opened, writes, offload, acts, eval_acts)
    return Budget(int(host), int(dev), int(disk), int(acts), int(working if on_cpu else 0))


def bytes_under(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def check_fits(budget: Budget, device: torch.device, scratch: str | Path | None, available_ram: int,
               streamed: bool, held: int = 0, experts: str = "") -> None:
    """Log the estimate; refuse (one line, naming the flag) when it cannot fit.
    ``scratch``: the output folder (None: the files go to the temporary
    folder); ``held``: bytes of the estimate already on disk there (the work
    folder of an interrupted run, resumed or discarded); ``experts``: how the
    block's MoE experts were read, for the message when even that cannot fit."""
    log.info("estimated peak: host RAM %.2f GB (%.2f GB available), device %.2f GB, scratch disk %.2f GB "
             "(activations %.2f GB)", budget.host_ram / GB, available_ram / GB, budget.device_memory / GB,
             budget.scratch_disk / GB, budget.activations / GB)
    if budget.block > available_ram:  # the unit of work itself does not fit
        raise D2PruneError(
            f"one decoder block needs about {budget.block / GB:.1f} GB of host RAM at work (its weights as read and "
            f"in the compute dtype, and its statistics) but {available_ram / GB:.1f} GB are available"
            f"{experts}: use a machine with more RAM or a GPU")
    if budget.host_ram > available_ram:
        hint = "--offload-activations disk, fewer --nsamples or a smaller --seqlen" if streamed else \
            "--stream on (blocks read from disk one at a time), fewer --nsamples or a smaller --seqlen"
        raise D2PruneError(f"this run needs about {budget.host_ram / GB:.1f} GB of host RAM but {available_ram / GB:.1f} GB "
                           f"are available: use {hint}")
    if device.type == "cuda" and budget.device_memory:
        free, _ = torch.cuda.mem_get_info(device)
        if budget.device_memory > free:
            raise D2PruneError(f"this run needs about {budget.device_memory / GB:.1f} GB on {device} but {free / GB:.1f} GB "
                               "are free: use --offload-activations cpu, fewer --nsamples or a smaller --seqlen")
    if budget.scratch_disk:
        parent = Path(scratch).expanduser().absolute() if scratch is not None else Path(tempfile.gettempdir())
        while not parent.exists():
            parent = parent.parent
        free_disk = shutil.disk_usage(parent).free + held
        if budget.scratch_disk > free_disk and scratch is not None:
            raise D2PruneError(f"this run writes about {budget.scratch_disk / GB:.1f} GB beside {scratch} but only "
                               f"{free_disk / GB:.1f} GB are free there: free some space or choose another --out")
        if budget.scratch_disk > free_disk:
            raise D2PruneError(f"this run writes about {budget.scratch_disk / GB:.1f} GB of temporary files in {parent} "
                               f"but only {free_disk / GB:.1f} GB are free there: set TMPDIR to a folder with room, "
                               "or give --out DIR on a disk with room")


def auto_offload(budget: Budget, device: torch.device, available_ram: int) -> str | None:
    """``--offload-activations`` when not given: keep the activations where
    they are if everything fits; else host RAM when that frees enough device
    memory, else memory-mapped files."""
    if device.type == "cuda" and budget.device_memory:
        free, _ = torch.cuda.mem_get_info(device)
        if budget.device_memory > free:
            return "cpu" if budget.host_ram + budget.activations <= available_ram else "disk"
    if budget.host_ram > available_ram and budget.host_ram - budget.activations <= available_ram:
        return "disk"
    return None
