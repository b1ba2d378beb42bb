"""What each decoder block holds, tensor by tensor, and why a tensor is left
unpruned - so a run can never report a sparsity it did not make (docs/moe.md §1).

Every parameter of a block is either pruned (the weight of a prunable Linear,
or the fused 3-D experts parameter behind :class:`~d2prune.io.experts.ExpertLinear`
views) or left unpruned for one documented reason:

* ``router`` - a MoE router (a module beside a layer's ``experts``: it decides
  where tokens go, holds a sliver of the weights, and pruned sends tokens elsewhere);
* ``norm`` - a normalisation's scale; ``bias`` - a bias (per-expert biases included);
* ``vector`` - any other 1-D tensor (attention sinks, per-channel scales);
* ``embedding`` - an embedding table inside a block;
* ``ignored`` - kept dense by ``--ignore`` / ``--targets``;
* ``unknown`` - a weight of two or more dimensions d2prune does not know how to
  prune. Above :data:`UNKNOWN_SHARE` of a block's weights this refuses the run
  before any weight is read (:func:`check_blocks`): that is what keeps the next
  unknown architecture (a new experts layout) from being "pruned" silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..errors import D2PruneError
from .experts import ExpertLinear, layout_problem
from .modeling import Blocks, find_prunable, is_router

UNKNOWN_SHARE = 0.01  # above this share of a block's 2+-D weights, unknown tensors refuse the run
UNPRUNED_REASONS = ("router", "norm", "bias", "vector", "embedding", "ignored", "unknown")


@dataclass(frozen=True)
class Unpruned:
    name: str  # inside the block
    shape: tuple[int, ...]
    reason: str
    owner: str  # the class of the module holding it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix(self) -> bool:
        return len(self.shape) >= 2


def pruned_parameters(layers: dict[str, nn.Module]) -> set[int]:
    """``id`` of the parameters the given prunable layers prune (a view's fused parameter)."""
    out = set()
    for m in layers.values():
        out.add(id(m.source if isinstance(m, ExpertLinear) else m.weight))
    return out


def _reason(block: nn.Module, module_name: str, leaf: str, owner: nn.Module, dims: int) -> str:
    if dims < 2:
        if "norm" in type(owner).__name__.lower():
            return "norm"
        return "bias" if leaf.endswith("bias") else "vector"
    if leaf.endswith("bias"):  # a fused experts module's per-expert biases [E, d_out]
        return "bias"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if module_name and is_router(block, module_name):
        return "router"
    return "unknown"


def unpruned(block: nn.Module, ignored: set[str] = frozenset()) -> list[Unpruned]:
    """Every parameter of ``block`` that a run leaves unpruned, with its reason.
    ``ignored``: names (in the block) of prunable layers kept dense by ``--ignore`` / ``--targets``."""
    prunable = find_prunable(block)
    pruned = pruned_parameters({n: m for n, m in prunable.items() if n not in ignored})
    kept = {id(m.weight): n for n, m in prunable.items() if n in ignored and not isinstance(m, ExpertLinear)}
    out = []
    for name, p in block.named_parameters():
        if id(p) in pruned:
            continue
        module_name, _, leaf = name.rpartition(".")
        owner = block.get_submodule(module_name) if module_name else block
        reason = "ignored" if id(p) in kept else _reason(block, module_name, leaf, owner, p.dim())
        out.append(Unpruned(name, tuple(p.shape), reason, type(owner).__name__))
    return out


def check_blocks(blocks: Blocks, model_name: str, ignored=lambda i: frozenset()) -> list[Unpruned]:
    """Refuse, before any weight is read (shapes suffice: the blocks may be on
    the meta device), a model whose blocks hold weights d2prune cannot prune
    (more than :data:`UNKNOWN_SHARE` of a block's 2+-D weights in ``unknown``
    tensors); else return every block's unpruned tensors, named ``PREFIX.i.NAME``.
    ``ignored(i)``: names in block ``i`` of the layers ``--ignore`` / ``--targets`` keep dense."""
    everything = []
    for i, block in enumerate(blocks.layers):
        rows = unpruned(block, ignored(i))
        total = sum(p.numel() for p in block.parameters() if p.dim() >= 2)
        unknown = [u for u in rows if u.reason == "unknown"]
        share = sum(u.numel for u in unknown) / max(total, 1)
        if share > UNKNOWN_SHARE:
            names = ", ".join(f"{u.name} {list(u.shape)} in {u.owner}" for u in unknown[:4])
            declared = next(((type(m).__name__, why) for m in block.modules() if (why := layout_problem(m))), None)
            hint = (f"{declared[0]} declares an experts layout it does not follow: {declared[1]}" if declared else
                    "if this is a mixture-of-experts layer, its experts class does not declare its layout through "
                    "transformers' @use_experts_implementation")
            raise D2PruneError(
                f"{model_name} block {i} holds weights d2prune does not know how to prune ({share:.0%} of the "
                f"block's weights: {names}): refusing rather than report a sparsity it did not make; {hint}")
        everything.extend(Unpruned(f"{blocks.prefix}.{i}.{u.name}", u.shape, u.reason, u.owner) for u in rows)
    return everything


def summarize(rows: list[Unpruned], prefix: str) -> list[dict]:
    """The unpruned tensors for d2prune.json: one entry per name inside a
    block and reason, with the number of blocks that hold it."""
    groups: dict[tuple[str, str], dict] = {}
    for u in rows:
        inner = u.name.removeprefix(prefix + ".").split(".", 1)[1]
        g = groups.setdefault((inner, u.reason), {"tensor": inner, "shape": list(u.shape), "reason": u.reason,
                                                  "blocks": 0, "numel": 0})
        g["blocks"] += 1
        g["numel"] += u.numel
    return list(groups.values())
