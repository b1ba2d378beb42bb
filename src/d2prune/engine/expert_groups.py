"""A mixture-of-experts block too large for host RAM, its experts a group at a time (docs/moe.md §4).

A DeepSeek-V3 block holds 256 routed experts (~22 GB in bf16) and, for an
OBS-style method, a ``7168 x 7168`` Hessian per expert: it cannot be opened
whole on a 24 GB machine. A streamed source with ``expert_group`` set
(:class:`d2prune.io.streaming.StreamedBlocks`) opens such a block with its
fused 3-D expert parameters left on disk, and the block is done in passes
whose results equal the whole-block ones float for float:

1. **Record** (the block's dense calibration pass): every sample runs through
   the block with the experts' computation replaced by a recorder that keeps
   what the experts module receives - its input rows, each token's experts
   and gate weights - and returns zeros (nothing after it is needed). Hooks
   collect the statistics of every other Linear (attention, shared experts)
   as in a plain block; these are pruned now.
2. **Groups**: for each group of experts, its rows of the 3-D parameters are
   read, each recorded call is replayed through the experts module with only
   the group's experts computed (each on the tokens routed to it: the hooks of
   the plain pass see the same inputs), the group is pruned, and its rows are
   written into the block's work file before the next group is read.
3. **Propagate** (the pruned block's outputs, the next block's inputs;
   :func:`d2prune.engine.sequential.propagate_in_groups`, which every
   propagation of such a block goes through): the recorder runs again over the pruned block (the experts' inputs have
   changed with the pruned attention), every group of pruned experts adds its
   outputs to a running sum per call - in the order the whole experts module
   adds them, expert after expert - and a last pass through the block returns
   those sums in place of the experts' computation.

So peak RAM holds the block without its routed experts, one group of experts
with its statistics, and two activation-sized buffers (the experts' inputs
and their summed outputs), in the activation store (``--offload-activations``).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..errors import D2PruneError
from ..io.experts import ExpertLinear, routed_modules
from ..io.modeling import STORAGE_DTYPE
from ..io.streaming import SafetensorsWriter, trim_heap
from .calibration import (BlockLayers, BlockObserver, CalibrationOptions, LayerReport, calibrate, few_tokens_fallback,
                          label_weighted, merge_statistics, prune_layers)
from .method import Method
from .sequential import BlockInputs, forward_hooks, grouped_modules, make_recorders, propagate_in_groups

log = logging.getLogger(__name__)


def _group_layers(layers: BlockLayers, module: nn.Module, experts: range) -> BlockLayers:
    """The group's expert projections, as a BlockLayers of their own (no block: its other tensors are reported once)."""
    def mine(m: nn.Module) -> bool:
        return isinstance(m, ExpertLinear) and m.owner is module and m.expert in experts

    return BlockLayers(layers.index, {n: m for n, m in layers.layers.items() if mine(m)}, layers.qualified,
                       {n: m for n, m in layers.ignored.items() if mine(m)}, None, layers.prefix)


def _writer(run, i: int, block: nn.Module) -> SafetensorsWriter:
    specs = {f"{run.blocks.prefix}.{i}.{n}": (tuple(p.shape), getattr(p, STORAGE_DTYPE, p.dtype))
             for n, p in block.named_parameters()}
    return SafetensorsWriter(run.work.block_path(i), specs)


def check_groups_supported(run) -> None:
    if run.work is None:
        raise D2PruneError("experts pruned in groups are written to a work folder as they are done: "
                           "give the prune a WorkFolder (the command line always does)")


@torch.no_grad()
def prune_block_in_groups(run, method: Method, i: int, block: nn.Module, inputs: BlockInputs,
                          timing: dict) -> list[LayerReport]:
    """Block ``i`` pruned with its grouped experts a group at a time, its
    pruned weights written to the work folder (and read from there from now
    on), its outputs left in ``inputs.hidden``; returns its report rows in
    the order of a plain block's."""
    from . import distributed

    check_groups_supported(run)
    if distributed.active():
        raise D2PruneError("experts pruned in groups run in one process: drop torchrun, or use a machine where "
                           "one block fits")
    options: CalibrationOptions = run.options
    modules = grouped_modules(block)
    layers = run.layers(block, i)
    in_groups = {n for n, m in {**layers.layers, **layers.ignored}.items()
                 if isinstance(m, ExpertLinear) and m.owner in modules}
    dense = BlockLayers(i, {n: m for n, m in layers.layers.items() if n not in in_groups}, layers.qualified,
                        {n: m for n, m in layers.ignored.items() if n not in in_groups}, block, layers.prefix)
    param = next(p for p in block.parameters() if p.device.type != "meta")
    device = param.device
    t0 = time.perf_counter()

    # 1. the dense pass: statistics of every other layer, and what each experts module receives
    method.begin_block(i, block, dense.layers)
    pruners = {n: method.layer(layers.qualified[n], m, i) for n, m in dense.layers.items()}
    recorders_ = make_recorders(block, modules, inputs)
    for m in modules:
        m._d2prune_experts.counts.zero_()
    for m, rec in recorders_.items():
        m._d2prune_experts.intercept = rec
    try:
        obs = calibrate(block, dense, inputs, {n: [p] for n, p in pruners.items()}, options,
                        experts=[m for m in routed_modules(block) if m not in modules])
    finally:
        for m in modules:
            m._d2prune_experts.intercept = None
    timing["calib"] += time.perf_counter() - t0
    rows = prune_layers(dense, pruners, obs.stats)
    del obs, pruners
    for m in modules:  # each expert's statistics: routed, or every token when it was sent too few
        st = m._d2prune_experts
        st.weighted = options.moe_calibration == "weighted"
        st.calib_counts = st.counts.clone()
        if options.moe_calibration == "all":
            st.all_tokens = set(range(st.layout.num_experts))
            st.reason = {e: "all tokens" for e in st.all_tokens}
        else:
            few_tokens_fallback(st, options)
        label_weighted([st], options)

    # 2. the experts, a group at a time: calibrated on the recorded calls, pruned, written
    writer = _writer(run, i, block)
    try:
        for m in modules:
            st, rec = m._d2prune_experts, recorders_[m]
            full = next(n for n, mod in block.named_modules() if mod is m)
            for experts in st.groups.ranges():
                st.groups.load(experts)
                group = _group_layers(layers, m, experts)
                gpruners = {n: method.layer(layers.qualified[n], mod, i) for n, mod in group.layers.items()}
                watchers = {n: [p] for n, p in gpruners.items()}
                t1 = time.perf_counter()
                obs = BlockObserver(group.layers, watchers, device, options)
                with forward_hooks(obs.hooks()):
                    for _ in rec.replay(m, device):
                        obs.end_sample()
                merge_statistics(obs, watchers)
                timing["calib"] += time.perf_counter() - t1
                rows += prune_layers(group, gpruners, obs.stats)
                del obs, gpruners
                for n, t in st.groups.loaded().items():
                    writer.write(f"{run.blocks.prefix}.{i}.{full}.{n}", t, experts.start)
                st.groups.unload()
                trim_heap()
                log.debug("block %d experts %d-%d pruned", i, experts.start, experts.stop - 1)
            st.all_tokens, st.weighted = set(), False  # propagation is routed only (calib_counts stay for the report)
        for n, p in block.named_parameters():  # everything else of the block, as pruned
            if p.device.type != "meta":
                writer.write(f"{run.blocks.prefix}.{i}.{n}", p.detach().to("cpu", getattr(p, STORAGE_DTYPE, p.dtype)))
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    run.source.saved(i, path)  # the pruned experts are read from the work file from now on

    # 3. the pruned block's outputs
    propagate_in_groups(block, i, inputs, options.batch, recorders_)
    order = {q: k for k, q in enumerate(layers.qualified.values())}
    return sorted(rows, key=lambda r: order.get(r.name, len(order)))
