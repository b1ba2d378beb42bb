"""``d2prune diagnose``: how much pruning changed the attention (docs/method.md §4).

Dense and pruned model each run their own hidden states through their blocks
(block by block, the engine's capture + run_block); per block and averaged,
on the given windows:

* ``kl``: mean over samples, heads and query rows of
  ``KL(attn_pruned || attn_dense)`` (softmax rows over keys, eq 12's term);
* ``rmse``: root-mean-square difference of the attention module's output.

The paper reports D²Prune lowering these by 61% (KL) and 43% (RMSE) on average
versus its baselines; this measures whatever our models give.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .attention import find_attention, kl_rows, run_with_attention
from ..engine.sequential import capture_block_inputs
from ..io.source import on_device
from ..errors import D2PruneError
from ..io.modeling import eager_attention, find_blocks

log = logging.getLogger(__name__)


@dataclass
class AttentionDiff:
    block: int
    kl: float
    rmse: float


@torch.no_grad()
def attention_diff(dense: nn.Module, pruned: nn.Module, windows: Tensor, device: torch.device) -> list[AttentionDiff]:
    """Per-block attention KL and output RMSE of ``pruned`` against ``dense``."""
    bd, bp = find_blocks(dense), find_blocks(pruned)
    if len(bd) != len(bp):
        raise D2PruneError(f"the dense model has {len(bd)} blocks, the pruned one {len(bp)}: not the same architecture")
    out = []
    with eager_attention(dense), eager_attention(pruned):
        xd = capture_block_inputs(dense, windows, device, bd)
        xp = capture_block_inputs(pruned, windows, device, bp)
        for i in range(len(bd)):
            with on_device(bd[i], device) as blk_d, on_device(bp[i], device) as blk_p:
                att_d, att_p = find_attention(blk_d, f" (dense block {i})"), find_attention(blk_p, f" (pruned block {i})")
                kl_sum, rows, sq, n = 0.0, 0, 0.0, 0
                for j in range(windows.shape[0]):
                    yd, pd, od = run_with_attention(blk_d, att_d, xd.hidden[j:j + 1], xd.calls[i][j], xd)
                    yp, pp, op = run_with_attention(blk_p, att_p, xp.hidden[j:j + 1], xp.calls[i][j], xp)
                    k = kl_rows(pp, pd)
                    kl_sum += float(k.sum())
                    rows += k.numel()
                    sq += float(((op.float() - od.float()) ** 2).sum())
                    n += od.numel()
                    xd.hidden[j:j + 1], xp.hidden[j:j + 1] = yd, yp
            out.append(AttentionDiff(i, kl_sum / rows, math.sqrt(sq / n)))
            log.info("block %d: attention KL %.4g  RMSE %.4g", i, out[-1].kl, out[-1].rmse)
    return out


def summarize(rows: list[AttentionDiff]) -> dict:
    return {"blocks": [asdict(r) for r in rows],
            "mean_kl": sum(r.kl for r in rows) / len(rows),
            "mean_rmse": sum(r.rmse for r in rows) / len(rows)}


def format_table(rows: list[AttentionDiff]) -> str:
    lines = [f"{'block':>5} {'attention KL':>14} {'attn-out RMSE':>14}"]
    lines += [f"{r.block:>5} {r.kl:>14.5g} {r.rmse:>14.5g}" for r in rows]
    s = summarize(rows)
    lines.append(f"{'mean':>5} {s['mean_kl']:>14.5g} {s['mean_rmse']:>14.5g}")
    return "\n".join(lines)


def plot(rows: list[AttentionDiff], path: str, title: str = "") -> None:
    """PNG: KL and RMSE per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    x = [r.block for r in rows]
    axes[0].plot(x, [r.kl for r in rows], marker="o")
    axes[0].set(xlabel="block", ylabel="KL(pruned || dense)", title="attention distribution")
    axes[1].plot(x, [r.rmse for r in rows], marker="o", color="C1")
    axes[1].set(xlabel="block", ylabel="RMSE", title="attention output")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
