"""What a run will need, estimated before it starts (host RAM, device memory,
scratch disk), so a run that cannot fit is refused in seconds with the flag
that would make it fit, instead of dying after hours.

The estimate follows the engine's memory model: the weights at rest (the
whole model in memory, or only embeddings / norm / head when streamed), one
block open in its compute dtype, the statistics of its widest input (a
Hessian and its inverse factor, fp32: d_in^2 * 4 bytes each), a few fp32
copies of its largest weight matrix, and the activation buffer(s) of
``samples x seqlen x hidden`` in the compute dtype.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import D2PruneError
from .modeling import find_prunable, in_features, weight_matrix

log = logging.getLogger(__name__)

GB = 1e9
PROCESS_BASELINE = 500_000_000  # python, torch, transformers and the tokenizer before any weight (measured: ~0.45 GB)


def _nbytes(params, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (torch.empty((), dtype=dtype or p.dtype).element_size()) for p in params)


@dataclass
class Budget:
    host_ram: int
    device_memory: int
    scratch_disk: int
    activations: int

    def to_dict(self) -> dict:
        return {k: round(v / GB, 3) for k, v in vars(self).items()} | {"unit": "GB"}


def estimate(opened, samples: int, seqlen: int, device: torch.device, hessian: bool, activation_buffers: int = 1,
             offload: str | None = None, deltas: bool = False, whole_model_per_weight: int = 0) -> Budget:
    """Peak needs of pruning ``opened`` (a :class:`d2prune.io.streaming.OpenedModel`)."""
    model, blocks = opened.model, opened.source.blocks
    compute = opened.source.compute_dtype or opened.storage_dtype
    c_bytes = torch.empty((), dtype=compute).element_size()
    block0 = blocks[0]
    block_params = list(block0.parameters())
    block_storage = _nbytes(block_params)
    block_compute = _nbytes(block_params, compute)
    layers = find_prunable(block0)
    widest = max((in_features(m) for m in layers.values()), default=0)
    largest = max((weight_matrix(m).numel() if m.weight.device.type != "meta" else m.weight.numel()
                   for m in layers.values()), default=0)
    # a Hessian and its inverse factor per widest input; without one, the per-layer error keeps W - W' (fp32)
    stats = (2 * widest * widest * 4 if hessian else 0) + 3 * largest * 4 + (_nbytes(block_params, torch.float32)
                                                                           if deltas else 0)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    acts = activation_buffers * samples * seqlen * hidden * c_bytes
    in_blocks = {id(p) for b in blocks.layers for p in b.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_blocks]  # embeddings, final norm, head
    model_bytes = _nbytes(outside) + block_storage * len(blocks)
    on_cpu = device.type == "cpu"
    # the block as read (pages of the memory-mapped shard count in RSS), its compute copy and statistics
    working = 2 * block_storage + (block_compute + stats if on_cpu else 0)
    if opened.streamed:  # the outside is read only for the capture and the head, not during the block loop
        host = max(_nbytes(outside, compute if on_cpu else None), working)
    else:
        host = model_bytes + working
    host += (acts if (on_cpu or offload == "cpu") else 0) + PROCESS_BASELINE
    dev = 0 if on_cpu else max(block_compute + stats, _nbytes(outside, compute)) + (0 if offload else acts)
    if whole_model_per_weight:  # a whole-model pass (Pruner-Zero's gradients): the model + a buffer per weight
        weights = sum(p.numel() for b in blocks.layers for p in b.parameters())
        whole = _nbytes(list(model.parameters()), compute) + whole_model_per_weight * weights
        host, dev = (max(host, whole + PROCESS_BASELINE), dev) if on_cpu else (host, max(dev, whole))
    disk = model_bytes + (acts if offload == "disk" else 0)
    return Budget(int(host), int(dev), int(disk), int(acts))


def check_fits(budget: Budget, device: torch.device, scratch: str | Path | None, available_ram: int,
               streamed: bool) -> None:
    """Log the estimate; refuse (one line, naming the flag) when it cannot fit."""
    log.info("estimated peak: host RAM %.2f GB (%.2f GB available), device %.2f GB, scratch disk %.2f GB "
             "(activations %.2f GB)", budget.host_ram / GB, available_ram / GB, budget.device_memory / GB,
             budget.scratch_disk / GB, budget.activations / GB)
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
    if scratch is not None:
        parent = Path(scratch).expanduser().absolute()
        while not parent.exists():
            parent = parent.parent
        free_disk = shutil.disk_usage(parent).free
        if budget.scratch_disk > free_disk:
            raise D2PruneError(f"this run writes about {budget.scratch_disk / GB:.1f} GB beside {scratch} but only "
                               f"{free_disk / GB:.1f} GB are free there: free some space or choose another --out")


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
