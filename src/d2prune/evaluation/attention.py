"""Attention distributions of a block: what D²Prune's second contribution is
about (docs/method.md §4). Used by the per-layer search (eq 12) and by
``d2prune diagnose``.

The block must run with eager attention (:func:`d2prune.io.modeling.eager_attention`)
so its attention module returns ``(attn_output, attn_probs)``; the probabilities
are post-softmax rows ``[B, heads, L_q, L_k]`` (masked keys exactly 0).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..engine.sequential import BlockCall, BlockInputs, run_block
from ..errors import D2PruneError
from ..io.modeling import attention_module

TINY = 1e-30  # floor of probabilities in logs and of denominators: keeps 0 * log 0 and x / 0 finite


def find_attention(block: nn.Module, where: str = "") -> nn.Module:
    found = attention_module(block)
    if found is None:
        raise D2PruneError(f"found no attention module with q/k/v projections in {type(block).__name__}{where}")
    return found[1]


@torch.no_grad()
def run_with_attention(block: nn.Module, attn: nn.Module, hidden: Tensor, call: BlockCall,
                       inputs: BlockInputs | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(block_output, attn_probs, attn_output)`` for one sample. ``attn_output``
    is the attention's own contribution: BLOOM's attention module returns it
    with the residual stream already added (its ``residual`` argument), which
    is subtracted here, so that the output RMSE of the diagnostics measures the
    attention and not the difference of the blocks' inputs."""
    seen: dict[str, Tensor] = {}
    signature = inspect.signature(attn.forward)

    def hook(module, args, kwargs, out):
        if not (isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], Tensor) and out[1].dim() == 4):
            raise D2PruneError(
                f"{type(module).__name__} did not return attention probabilities (eager attention needed): "
                "this architecture is not supported for attention diagnostics / per-layer selection"
            )
        seen["probs"], seen["out"] = out[1].detach(), out[0].detach()
        if "residual" in signature.parameters:
            residual = signature.bind(*args, **kwargs).arguments["residual"]
            seen["out"] = seen["out"] - residual.detach()

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        y = run_block(block, hidden, call, inputs)
    finally:
        handle.remove()
    return y, seen["probs"], seen["out"]


def kl_rows(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p || q)`` of every attention row (summed over keys), in fp32.
    Zero-probability entries of ``p`` contribute 0; identical inputs give exactly 0."""
    p, q = p.float(), q.float()
    return (p * (torch.log(p.clamp_min(TINY)) - torch.log(q.clamp_min(TINY)))).sum(-1)
