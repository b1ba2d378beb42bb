"""Whole experts removed from each MoE layer (``--drop-experts``, docs/moe.md §5).

For every block with routed experts, before its layers are calibrated and
pruned: one scoring pass runs the block (dense, as it is at this point of
the sequential prune: its inputs are the outputs of the already pruned
blocks) over the calibration samples and accumulates, per expert, the tokens
its router sends to it and REAP's saliency (Lasby et al., 2026, eq. 9): the
mean over those tokens of ``g_e(x) * ||f_e(x)||_2``, the gate weight the
expert's output is multiplied by times the norm of that output. The lowest
scored experts (``--expert-score reap``, or ``frequency``: fewest routed
tokens) are removed - their rows of the fused expert tensors, of the
router's weight and of every per-expert bias or correction term - and the
layer's expert counts (and the model config's) set to the new number, so the
result is an ordinary, smaller model of the same architecture.

The remaining experts are then calibrated and pruned as usual, on the
routing of the reduced layer (tokens that went to a removed expert now go
to the next best one): that is why the scoring is a pass of its own.

A grouped router (DeepSeek-V3: ``n_group`` groups, the best ``topk_group``
chosen first) loses as many experts in every group, so the experts that
remain keep their groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed
from ..errors import D2PruneError
from ..io.experts import ExpertScores, expert_groups_of, remove_experts, routed_modules, routers_of
from .sequential import BlockInputs, run_block, sample_batches

log = logging.getLogger(__name__)

EXPERT_SCORES = ("reap", "frequency")


@dataclass(frozen=True)
class ExpertDrop:
    """``amount``: a fraction (0 < F < 1) of each MoE layer's routed experts,
    or a count (>= 1); ``score``: how experts are ranked (:data:`EXPERT_SCORES`)."""

    amount: float
    score: str = "reap"

    def count(self, experts: int) -> int:
        return int(round(self.amount * experts)) if self.amount < 1 else int(self.amount)


def experts_per_token(layer: nn.Module, routers: list[nn.Module], config) -> int | None:
    """``top_k``: the experts each token is routed to."""
    for m in (*routers, layer):
        for a in ("top_k", "num_experts_per_tok"):
            v = getattr(m, a, None)
            if isinstance(v, int) and v > 0:
                return v
    return getattr(config, "num_experts_per_tok", None)


def check_drop(model: nn.Module, blocks, drop: ExpertDrop) -> None:
    """Refuse, before any weight is read (the blocks may be on the meta
    device), a drop that this model cannot take: no routed experts, fewer
    experts left than a token is routed to, groups that cannot lose as many
    each."""
    from ..io.experts import experts_modules, unfused

    found = False
    for i, block in enumerate(blocks.layers):
        with unfused(block):
            for name, experts in experts_modules(block).items():
                found = True
                layer = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                routers = routers_of(layer, experts)
                E = experts._d2prune_experts.layout.num_experts
                k, left = drop.count(E), E - drop.count(E)
                top = experts_per_token(layer, routers, model.config)
                groups = expert_groups_of(routers)
                if k <= 0:
                    raise D2PruneError(f"--drop-experts {drop.amount:g} removes no expert of the {E} of block {i}: "
                                       "give a larger fraction or a count")
                if top is not None and left < top:
                    raise D2PruneError(f"--drop-experts {drop.amount:g} leaves {left} of the {E} experts of block {i}, "
                                       f"fewer than the {top} each token is routed to: drop fewer")
                if groups > 1 and (k % groups or left // groups < 2):
                    raise D2PruneError(f"block {i}'s router picks experts in {groups} groups: --drop-experts must "
                                       f"remove a multiple of {groups} experts and leave at least 2 per group "
                                       f"({k} of {E} asked)")
    if not found:
        raise D2PruneError(f"--drop-experts removes routed experts, and {type(model).__name__} has none "
                           "(a dense model): drop the flag")


@torch.no_grad()
def drop_block_experts(model: nn.Module, block: nn.Module, i: int, inputs: BlockInputs, batch: int,
                       drop: ExpertDrop) -> list[dict]:
    """Score block ``i``'s experts over the calibration samples and remove
    the lowest scored; one record per MoE layer (``d2prune.json``)."""
    modules = routed_modules(block)
    if not modules:
        return []
    names = {id(m): n for n, m in block.named_modules()}
    for m in modules:
        st = m._d2prune_experts
        st.scores = ExpertScores.zeros(st.layout.num_experts)
        st.all_tokens, st.weighted = set(), False
    try:
        for j0, j1 in sample_batches(inputs, i, inputs.hidden.shape[0], batch):
            run_block(block, inputs.hidden[j0:j1], inputs.calls[i][j0], inputs)
        scores = [m._d2prune_experts.scores for m in modules]
    finally:
        for m in modules:
            m._d2prune_experts.scores = None
    records = []
    for m, sc in zip(modules, scores):
        if distributed.active():  # every process's samples count
            t = torch.stack([sc.tokens.to(torch.float64), sc.reap_sum])
            dev = next(p for p in block.parameters() if p.device.type != "meta").device
            t = t.to(dev)
            distributed.sum_([t])
            sc = ExpertScores(t[0].round().long().cpu(), t[1].cpu())
        name = names[id(m)]
        layer = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
        score = sc.score(drop.score)
        E, k = score.numel(), drop.count(score.numel())
        groups = expert_groups_of(routers_of(layer, m))
        # lowest first; ties broken by the expert's index, so the choice is deterministic
        order = sorted(range(E), key=lambda e: (float(score[e]), e))
        if groups > 1:  # as many from every group: the experts left keep their groups
            size = E // groups
            dropped = sorted(e for g in range(groups) for e in [x for x in order if x // size == g][:k // groups])
        else:
            dropped = sorted(order[:k])
        keep = [e for e in range(E) if e not in set(dropped)]
        remove_experts(layer, m, keep)
        records.append({"block": i, "module": name, "experts": E, "kept": len(keep), "score": drop.score,
                        "dropped": [{"expert": e, "score": float(score[e]), "tokens": int(sc.tokens[e])}
                                    for e in dropped],
                        "scores": [float(x) for x in score], "tokens": [int(t) for t in sc.tokens]})
        log.info("block %d %s: %d of %d experts dropped by %s score", i, name, len(dropped), E, drop.score)
    _set_config(model, records)
    return records


def _set_config(model: nn.Module, records: list[dict]) -> None:
    """The model config's expert count follows (one number for every MoE layer)."""
    E, kept = records[0]["experts"], records[0]["kept"]
    config = model.config
    for key, v in config.to_dict().items():
        if type(v) is int and v == E and "expert" in key and not any(w in key for w in ("per_tok", "shared", "top")):
            setattr(config, key, kept)


def replay_drops(model: nn.Module, blocks, records: list[dict]) -> None:
    """Remove the experts an interrupted run removed from its finished blocks
    (before their saved weights are put back)."""
    from ..io.experts import unfused

    for r in records:
        block = blocks[r["block"]]
        with unfused(block):
            experts = block.get_submodule(r["module"])
            layer = block.get_submodule(r["module"].rpartition(".")[0]) if "." in r["module"] else block
            dropped = {d["expert"] for d in r["dropped"]}
            remove_experts(layer, experts, [e for e in range(r["experts"]) if e not in dropped])
    if records:
        _set_config(model, records)
