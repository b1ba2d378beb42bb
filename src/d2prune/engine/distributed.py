"""Data-parallel calibration on ``torch.distributed``.

``torchrun --nproc-per-node K -m d2prune prune ...`` starts K processes: the
calibration samples (and held-out windows) are split into K contiguous
shards, every rank runs its shard through each block, and the per-layer
statistics are all-reduced before any mask is chosen, so every rank prunes
from the statistics of all samples. Rank 0's pruned weights are broadcast
(every rank continues with exactly the same block), rank 0 alone evaluates
and writes the output and the record. Collectives use NCCL on GPUs and gloo
on CPUs, with a timeout (``D2PRUNE_DIST_TIMEOUT`` seconds, default 1800): a
rank that dies makes the others fail with an error instead of hanging.

How statistics combine (docs/scale.md §4): a running mean over ``n_r``
samples on rank ``r`` becomes ``sum_r (n_r / N) mean_r`` (SparseGPT's
Hessian, Wanda's squared norms: the same quantity as one process, up to
float rounding); a sum is summed. D²Prune's ``faithful`` buffers weight
later samples more (an index-weighted running buffer, not a mean); merged
as means they are close to, not equal to, one process's (measured in
tests/test_distributed.py).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Iterable

import torch
from torch import Tensor

from ..errors import D2PruneError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800


def launched() -> bool:
    """Started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str | None) -> str | None:
    """Join the process group of a torchrun job; returns the device this rank
    computes on (``cuda:LOCAL_RANK`` on GPUs). No-op outside torchrun."""
    if not launched() or active():
        return device
    timeout = datetime.timedelta(seconds=float(os.environ.get("D2PRUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    use_cuda = (device is None or str(device).startswith("cuda")) and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    try:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    except Exception as e:
        raise D2PruneError(f"could not join the torchrun process group: {type(e).__name__}: {e}") from e
    log.info("rank %d of %d (%s)", rank(), world(), "nccl" if use_cuda else "gloo")
    return device


def finish() -> None:
    if active():
        torch.distributed.destroy_process_group()


def shard(t: Tensor | None) -> Tensor | None:
    """This rank's contiguous share of the rows of ``t`` (samples)."""
    if t is None or not active():
        return t
    if t.shape[0] < world():
        raise D2PruneError(f"{t.shape[0]} samples cannot be split over {world()} processes: use --nsamples >= {world()}")
    return torch.tensor_split(t, world())[rank()]


def all_sum(values: Iterable[float]) -> list[float]:
    """Sum plain numbers over the ranks (float64)."""
    values = list(values)
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def merge(obj, fields: dict[str, str]) -> None:
    """Combine one statistic over the ranks, in place: ``fields`` maps each
    tensor attribute of ``obj`` to ``"mean"`` (a running mean over ``obj.n``
    samples) or ``"sum"``; ``obj.n`` becomes the total count."""
    if not active():
        return
    (total,) = all_sum([obj.n])
    for name, kind in fields.items():
        t = getattr(obj, name)
        if t is None:
            raise D2PruneError("a process saw no calibration sample: use --nsamples >= the number of processes")
        if kind == "mean":
            t.mul_(obj.n / total)
        torch.distributed.all_reduce(t)
    obj.n = int(total)


def sum_(tensors: Iterable[Tensor]) -> None:
    """Sum tensors over the ranks, in place (every rank passes the same
    tensors in the same order)."""
    if not active():
        return
    for t in tensors:
        torch.distributed.all_reduce(t)


def broadcast_(tensors: Iterable[Tensor]) -> None:
    """Rank 0's values into every rank's tensors (pruned weights)."""
    if not active():
        return
    for t in tensors:
        torch.distributed.broadcast(t, src=0)
