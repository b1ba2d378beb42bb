"""Perplexity exactly as docs/method.md §5 (the SparseGPT / Wanda / D²Prune protocol).

The text is tokenised once and cut into ``floor(T / seqlen)`` non-overlapping
windows (:func:`d2prune.io.data.eval_windows`); each window's mean NLL over its
``seqlen - 1`` predictions is averaged over windows; ``ppl = exp(mean)``.
``max_windows`` evaluates only the first windows for quick runs and is always
recorded next to the number.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.sequential import sequential_logits
from ..io.source import BlockSource
from ..errors import D2PruneError
from ..io.modeling import pick_device

log = logging.getLogger(__name__)

MAX_MEAN_NLL = 700.0  # a larger mean NLL is reported as ppl inf (math.exp overflows just above 709.78)


@dataclass(frozen=True)
class PerplexityResult:
    dataset: str
    ppl: float
    mean_nll: float
    windows: int          # windows evaluated
    total_windows: int    # windows the full text gives
    seqlen: int

    def __str__(self) -> str:
        part = "" if self.windows == self.total_windows else f", first {self.windows}/{self.total_windows} windows"
        return f"{self.dataset} ppl {self.ppl:.3f} (seqlen {self.seqlen}{part})"


def window_nll(logits: Tensor, ids: Tensor) -> float:
    """Mean next-token NLL of one window (``seqlen - 1`` predictions), in fp32."""
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device)))


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, dataset: str = "wikitext2", max_windows: int | None = None,
               device: str | torch.device | None = None, sequential: bool | None = None,
               source: BlockSource | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (``[W, seqlen]`` token ids).

    ``sequential=None`` runs the whole model on ``device`` when it is already
    there (or the device is the CPU), else block by block through the engine
    (the model stays in CPU memory; one block at a time on the accelerator).
    A ``source`` whose blocks are streamed from disk, or compute in another
    dtype than they are stored in, always goes block by block through it.
    """
    if max_windows is not None and max_windows < 1:
        raise D2PruneError(f"--eval-windows {max_windows} must be >= 1")
    total = windows.shape[0]
    use = windows[: max_windows] if max_windows else windows
    dev = device if isinstance(device, torch.device) else pick_device(device)
    param = next(model.parameters())
    if source is not None and (source.compute_dtype is not None or type(source) is not BlockSource):
        sequential = True
    if sequential is None:
        sequential = not (dev.type == "cpu" or param.device == dev)
    model.eval()
    nlls = []
    if sequential:
        sequential_logits(model, use, dev, lambda j, logits: nlls.append(window_nll(logits, use[j:j + 1])), source)
    else:
        for j in tqdm(range(use.shape[0]), desc=f"ppl {dataset}", leave=False, disable=None):
            ids = use[j:j + 1].to(param.device)
            nlls.append(window_nll(model(ids, use_cache=False).logits, ids))
    mean = sum(nlls) / len(nlls)
    if not math.isfinite(mean):
        log.warning("perplexity on %s is not finite (mean NLL %s)", dataset, mean)
    ppl = math.exp(mean) if mean < MAX_MEAN_NLL else float("inf")
    return PerplexityResult(dataset, ppl, mean, len(nlls), total, windows.shape[1])
