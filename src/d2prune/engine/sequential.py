"""The one sequential engine, for every architecture (docs/method.md §1).

1. :func:`capture_block_inputs` runs the model once per calibration sample with
   every decoder block replaced by a stub: block 0's stub records the hidden
   states it receives, and every block's stub records the positional and
   keyword arguments *that block* receives (rotary ``position_embeddings``,
   its own attention mask - sliding-window layers get a different one - cache
   position...). Nothing is assumed about which arguments a block takes.
2. For each block (moved to the compute device on its own, so a model larger
   than the accelerator fits): a dense calibration pass with forward hooks on
   every Linear feeds shared per-input statistics (fp32) and per-layer output
   observers; every Linear is pruned by the method's thin wrapper; a second
   pass through the pruned block produces the next block's inputs, written in
   place into the single activation buffer (N samples held once).
   A block whose MoE experts are read in groups (docs/moe.md §4) is
   propagated a group of experts at a time (:func:`propagate_in_groups`).
3. :func:`sequential_logits` runs the same machinery without pruning and
   finishes with the model's own head (final norm, lm_head) - used to check
   the engine against the model's own forward and to evaluate models that do
   not fit on the device whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import D2PruneError
from ..io.source import ActivationStore, BlockSource
from ..io.experts import routed_modules
from ..io.streaming import trim_heap
from ..io.modeling import STORAGE_DTYPE, Blocks, all_finite, find_blocks

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stubs
class _StopForward(Exception):
    """Raised by the last block's stub: nothing after the blocks is needed."""


class _BlockStub(nn.Module):
    """Stands in for a decoder block inside its ModuleList.

    The real block is kept outside the module tree (so ``model.to(device)``
    moves only embeddings, norms and head) and attribute reads fall through to
    it (models read e.g. ``decoder_layer.attention_type`` to pick its mask).
    """

    def __init__(self, index: int, block: nn.Module, handler: Callable):
        super().__init__()
        object.__setattr__(self, "_real", block)
        object.__setattr__(self, "_handler", handler)
        self.index = index

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args, **kwargs):
        return self._handler(self.index, args, kwargs)


@contextlib.contextmanager
def _stubbed(model: nn.Module, blocks: Blocks, handler: Callable, device: torch.device,
             source: "BlockSource", head: bool = True) -> Iterator[None]:
    """Swap every block for a stub and have the source put the rest of the
    model (embeddings, norms, head) on ``device``; always restore both."""
    real = list(blocks.layers)
    try:
        for i, b in enumerate(real):
            blocks.layers[i] = _BlockStub(i, b, handler)
        with source.outside(model, device, head):  # the blocks are out of the tree now
            yield
    finally:
        for i, b in enumerate(real):
            blocks.layers[i] = b


def _hidden_of(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def model_forward(model: nn.Module, x: Tensor):
    """The whole model on one batch of its main input: token ids for a causal
    LM (without a KV cache: every window is scored on its own), pixel values
    for an image classifier (``model.main_input_name`` says which)."""
    kwargs: dict[str, Any] = {getattr(model, "main_input_name", "input_ids"): x}
    if getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return model(**kwargs)


# --------------------------------------------------------------------------- capture
@dataclass
class BlockCall:
    """The arguments one block receives for one sample (besides hidden states)."""

    args: tuple
    kwargs: dict


@dataclass
class BlockInputs:
    """Captured inputs: ``hidden[j]`` enters block 0 for sample ``j`` and is
    overwritten in place as the blocks advance; ``calls[i][j]`` are block
    ``i``'s other arguments for sample ``j`` (deduplicated across samples)."""

    hidden: Tensor
    calls: list[list[BlockCall]]
    output_is_tuple: bool = False
    tuple_extras: tuple = field(default_factory=tuple)
    store: "ActivationStore | None" = None

    def new_buffer(self) -> Tensor:
        """Another buffer like ``hidden``, where the run keeps its activations."""
        return self.store.empty_like(self.hidden) if self.store is not None else torch.empty_like(self.hidden)


def _store(obj: Any, prev: Any, memo: dict, device: torch.device) -> Any:
    """Move ``obj`` (tensors inside tuples/lists/dicts) to ``device``, reusing
    the previous sample's tensor when equal (masks and rotary tables are the
    same for every sample of one length: store them once, not N times)."""
    if isinstance(obj, Tensor):
        key = id(obj)
        if key in memo:
            return memo[key]
        t = obj.detach().to(device)
        if isinstance(prev, Tensor) and prev.shape == t.shape and prev.dtype == t.dtype and torch.equal(prev, t):
            t = prev
        memo[key] = t
        return t
    if isinstance(obj, (tuple, list)):
        prevs = prev if isinstance(prev, type(obj)) and len(prev) == len(obj) else [None] * len(obj)
        return type(obj)(_store(o, p, memo, device) for o, p in zip(obj, prevs))
    if isinstance(obj, dict):
        prevs = prev if isinstance(prev, dict) else {}
        return {k: _store(v, prevs.get(k), memo, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, device: torch.device,
                         blocks: Blocks | None = None, source: "BlockSource | None" = None) -> BlockInputs:
    """Run ``input_ids`` (``[N, L]`` token ids, or ``[N, C, H, W]`` pixel values
    of an image model; one sample per forward, as the references do) through
    the model with stubbed blocks; return every block's inputs."""
    blocks = blocks or find_blocks(model)
    source = source or BlockSource(blocks)
    store = source.activations
    n_blocks, nsamples = len(blocks), input_ids.shape[0]
    calls: list[list[BlockCall]] = [[] for _ in range(n_blocks)]
    state: dict[str, Any] = {"hidden": None, "j": 0, "memo": {}}

    def handler(i: int, args: tuple, kwargs: dict):
        hidden, rest, kw = _hidden_of(args, kwargs)
        if i == 0:
            if state["hidden"] is None:
                state["hidden"] = store.empty((nsamples, *hidden.shape[1:]), hidden.dtype, device)
            state["hidden"][state["j"]] = hidden[0].to(device)
        prev = calls[i][-1] if calls[i] else None
        memo = state["memo"]
        calls[i].append(BlockCall(_store(rest, prev.args if prev else None, memo, device),
                                  _store(kw, prev.kwargs if prev else None, memo, device)))
        if i == n_blocks - 1:
            raise _StopForward
        return hidden

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with _stubbed(model, blocks, handler, device, source, head=False):  # the capture stops at the last block
            for j in range(nsamples):
                state["j"], state["memo"] = j, {}
                try:
                    model_forward(model, input_ids[j:j + 1].to(device))
                except _StopForward:
                    pass
                else:  # pragma: no cover - only if a model skips its last block
                    raise D2PruneError(f"{type(model).__name__} did not call its last decoder block; cannot capture its inputs")
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    if state["hidden"] is None:
        raise D2PruneError(f"{type(model).__name__} never called its decoder blocks with hidden states")
    return BlockInputs(state["hidden"], calls, store=store)


def run_block(block: nn.Module, hidden: Tensor, call: BlockCall, inputs: BlockInputs | None = None) -> Tensor:
    """One block forward for one sample (``hidden``: ``[1, L, d]``); returns the
    new hidden states whether the block returns a tensor or a tuple. An
    offloaded sample is moved to the block's device first."""
    p = next(block.parameters(), None)
    if p is not None and hidden.device != p.device:
        hidden = hidden.to(p.device, non_blocking=True)
    out = block(hidden, *call.args, **call.kwargs)
    if isinstance(out, tuple):
        if inputs is not None and not inputs.output_is_tuple:
            inputs.output_is_tuple, inputs.tuple_extras = True, tuple(None for _ in out[1:])
        return out[0]
    return out


@contextlib.contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    """Register forward hooks; they are removed however the block exits."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_finite(t: Tensor, what: str) -> None:
    if not all_finite(t):
        raise D2PruneError(
            f"NaN/Inf in {what}: the model overflows on this data; load it in float32 (--dtype float32) or check its weights"
        )


# --------------------------------------------------------------------------- the loop
BlockStep = Callable[[int, nn.Module, BlockInputs], None]


def sequential(model: nn.Module, input_ids: Tensor, device: torch.device, step: BlockStep,
               desc: str = "block", blocks: Blocks | None = None, source: BlockSource | None = None,
               start: int = 0, after: BlockStep | None = None, batch: int = 1) -> BlockInputs:
    """Capture block inputs, then call ``step(i, block_on_device, inputs)`` for
    every block in order. ``step`` must leave the block's outputs in
    ``inputs.hidden`` (they are the next block's inputs).

    ``source`` says where blocks come from (default: the model's own modules,
    in their own dtype). Blocks before ``start`` are only run forward (a
    resumed prune: their finished weights are already in the source), ``batch``
    samples per forward as the interrupted run's ``step`` propagated them (the
    same float operations, so the same activations), and
    ``after(i, block, inputs)`` runs once block ``i``'s step is done, while
    the block is still open (to write it out / checkpoint the run)."""
    blocks = blocks or find_blocks(model)
    source = source or BlockSource(blocks)
    t0 = time.perf_counter()
    inputs = capture_block_inputs(model, input_ids, device, blocks, source)
    log.debug("captured inputs of %d blocks for %d samples in %.2fs", len(blocks), input_ids.shape[0], time.perf_counter() - t0)
    bar = tqdm(range(len(blocks)), desc=desc, leave=False, disable=None)
    for i in bar:
        bar.set_description(f"{desc} {i + 1}/{len(blocks)}")
        with source.open(i, device) as block:
            if i < start:
                propagate(block, i, inputs, batch)
                continue
            step(i, block, inputs)
            if after is not None:
                after(i, block, inputs)
    return inputs


@torch.no_grad()
def propagate(block: nn.Module, i: int, inputs: BlockInputs, batch: int = 1, grouped: bool = True) -> None:
    """Overwrite ``inputs.hidden`` with this block's outputs, sample by sample
    (``batch`` > 1: several samples per forward where they share their call).
    A block whose experts are read in groups is done a group at a time
    (:func:`propagate_in_groups`)."""
    if grouped:
        if grouped_modules(block):
            propagate_in_groups(block, i, inputs, batch)
            return
    for j0, j1 in sample_batches(inputs, i, inputs.hidden.shape[0], batch):
        inputs.hidden[j0:j1] = run_block(block, inputs.hidden[j0:j1], inputs.calls[i][j0], inputs)


# --------------------------------------------------------------------------- experts in groups
def grouped_modules(block: nn.Module) -> list[nn.Module]:
    """The experts modules of an opened block whose experts are read in groups."""
    return [m for m in routed_modules(block) if m._d2prune_experts.groups is not None]


class _Recorder:
    """Stands in for one experts module's computation during a pass over the
    block: keeps each call's input rows (in one activation-store buffer for
    all the block's tokens), routed experts and gate weights, and returns zeros."""

    def __init__(self, inputs: BlockInputs, key: int, rows: int, width: int, dtype: torch.dtype, device: torch.device):
        self.buffer = inputs.store.scratch(("experts-in", key), (rows, width), dtype, device)
        self.calls: list[tuple[int, int, Tensor, Tensor]] = []  # (first row, rows, top_k_index, top_k_weights)
        self.used = 0

    def __call__(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        n = x.shape[0]
        if self.used + n > self.buffer.shape[0]:
            raise D2PruneError("the experts received more tokens than the calibration samples hold: "
                               "this model's experts cannot be processed in groups")
        self.buffer[self.used:self.used + n] = x
        self.calls.append((self.used, n, top_k_index.detach().clone(), top_k_weights.detach().clone()))
        self.used += n
        return torch.zeros_like(x)

    def replay(self, module: nn.Module, device: torch.device, out: Tensor | None = None) -> Iterator[int]:
        """Every recorded call through ``module``'s active experts (their
        outputs added to ``out``'s rows when given, else dropped)."""
        state = module._d2prune_experts
        for k, (r0, n, idx, w) in enumerate(self.calls):
            x = self.buffer[r0:r0 + n].to(device)
            acc = None if out is None else out[r0:r0 + n].to(device)
            state.out = acc
            try:
                module(x, idx.to(device), w.to(device))
            finally:
                state.out = None
            if acc is not None and acc.data_ptr() != out[r0:r0 + n].data_ptr():
                out[r0:r0 + n] = acc.to(out.device)
            yield k


class _Replay:
    """Stands in for an experts module's computation by returning, call after
    call, the outputs summed group by group."""

    def __init__(self, recorder: _Recorder, out: Tensor):
        self.recorder, self.out, self.k = recorder, out, 0

    def __call__(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if self.k >= len(self.recorder.calls) or self.recorder.calls[self.k][1] != x.shape[0]:
            raise D2PruneError(self.mismatch())
        r0, n, _, _ = self.recorder.calls[self.k]
        self.k += 1
        return self.out[r0:r0 + n].to(device=x.device, dtype=x.dtype)

    def mismatch(self) -> str:
        return (f"the block called its experts otherwise than when their inputs were recorded (call {self.k + 1} of "
                f"{len(self.recorder.calls)}): its outputs cannot be computed in expert groups")

    def check_done(self) -> None:
        """Every recorded call was answered (a block that called its experts fewer times would
        otherwise leave outputs of the recorded pass unused, silently)."""
        if self.k != len(self.recorder.calls):
            raise D2PruneError(self.mismatch())


def make_recorders(block: nn.Module, modules: list[nn.Module], inputs: BlockInputs) -> dict[nn.Module, _Recorder]:
    hidden = inputs.hidden
    param = next((p for p in block.parameters() if p.device.type != "meta"), None)
    device = param.device if param is not None else hidden.device
    rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    dtype = param.dtype if param is not None else hidden.dtype
    out = {}
    for k, m in enumerate(modules):
        out[m] = _Recorder(inputs, k, rows, _hidden_width(m), dtype, device)
    return out


def _hidden_width(module: nn.Module) -> int:
    """The width of the rows an experts module reads (its up projection's input)."""
    state = module._d2prune_experts
    p = state.groups.meta[state.layout.up]
    return p.shape[1] if state.layout.transposed else p.shape[2]


@torch.no_grad()
def _record(block: nn.Module, i: int, inputs: BlockInputs, batch: int, recorders: dict[nn.Module, _Recorder]) -> None:
    """One pass over the samples with the recorders in place (the block's outputs are dropped)."""
    for m, rec in recorders.items():
        m._d2prune_experts.intercept = rec
    try:
        for j0, j1 in sample_batches(inputs, i, inputs.hidden.shape[0], batch):
            run_block(block, inputs.hidden[j0:j1], inputs.calls[i][j0], inputs)
    finally:
        for m in recorders:
            m._d2prune_experts.intercept = None


@torch.no_grad()
def propagate_in_groups(block: nn.Module, i: int, inputs: BlockInputs, batch: int = 1,
                        recorders: dict[nn.Module, "_Recorder"] | None = None) -> None:
    """Overwrite ``inputs.hidden`` with block ``i``'s outputs, its grouped
    experts computed a group at a time (module docstring, step 3)."""
    modules = grouped_modules(block)
    recorders = recorders or make_recorders(block, modules, inputs)
    device = next(p for p in block.parameters() if p.device.type != "meta").device
    for rec in recorders.values():
        rec.calls, rec.used = [], 0
    _record(block, i, inputs, batch, recorders)
    sums = {}
    for k, (m, rec) in enumerate(recorders.items()):
        st = m._d2prune_experts
        out = inputs.store.scratch(("experts-out", k), tuple(rec.buffer.shape), rec.buffer.dtype, rec.buffer.device)
        out[:rec.used].zero_()
        for experts in st.groups.ranges():
            st.groups.load(experts)
            for _ in rec.replay(m, device, out):
                pass
            st.groups.unload()
            trim_heap()
        sums[m] = _Replay(rec, out)
    for m, replay in sums.items():
        m._d2prune_experts.intercept = replay
    try:
        propagate(block, i, inputs, batch, grouped=False)
    finally:
        for m in sums:
            m._d2prune_experts.intercept = None
    for replay in sums.values():
        replay.check_done()


def _same_call(a: object, b: object) -> bool:
    """Two captured arguments are the same call: tensors the same object (the
    capture stores equal tensors once), everything else equal."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_call(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_call(a[k], b[k]) for k in a)
    return a == b


def sample_batches(inputs: BlockInputs, i: int, n: int, batch: int) -> Iterator[tuple[int, int]]:
    """``[j0, j1)`` ranges of at most ``batch`` consecutive samples of block
    ``i`` whose other arguments are the same (masks, rotary tables...), so
    they can run as one forward. ``batch=1``: one sample at a time, as the
    reference codes (and their float results) do."""
    j0 = 0
    while j0 < n:
        j1 = j0 + 1
        first = inputs.calls[i][j0]
        while j1 < min(n, j0 + batch) and _same_call(inputs.calls[i][j1].args, first.args) \
                and _same_call(inputs.calls[i][j1].kwargs, first.kwargs):
            j1 += 1
        yield j0, j1
        j0 = j1


@torch.no_grad()
def run_head(model: nn.Module, input_ids: Tensor, final_hidden: Tensor, device: torch.device,
             consume: Callable[[int, Tensor], None], inputs: BlockInputs | None = None,
             blocks: Blocks | None = None, source: "BlockSource | None" = None) -> None:
    """The model's own head on given final hidden states: run the model with
    identity stubs, replacing block 0's input by ``final_hidden[j]``, so the
    model applies its final norm / projection / lm_head itself. Calls
    ``consume(j, logits)`` with ``[1, L, vocab]`` logits per sample (one at a
    time: the vocabulary-sized logits of all samples are never held), and the
    blocks are back in place when it returns, whatever happens."""
    blocks = blocks or find_blocks(model)
    source = source or BlockSource(blocks)
    state = {"j": 0}
    is_tuple = bool(inputs and inputs.output_is_tuple)
    extras = inputs.tuple_extras if inputs else ()

    def handler(i: int, args: tuple, kwargs: dict):
        hidden, _, _ = _hidden_of(args, kwargs)
        if i == 0:
            hidden = final_hidden[state["j"]:state["j"] + 1].to(hidden.device)
        return (hidden, *extras) if is_tuple else hidden

    with _stubbed(model, blocks, handler, device, source):
        for j in range(input_ids.shape[0]):
            state["j"] = j
            consume(j, model_forward(model, input_ids[j:j + 1].to(device)).logits)


@torch.no_grad()
def sequential_logits(model: nn.Module, input_ids: Tensor, device: torch.device,
                      consume: Callable[[int, Tensor], None] | None = None,
                      source: BlockSource | None = None) -> list[Tensor] | None:
    """The model's logits computed block by block through the engine (no
    pruning): equal to ``model(input_ids).logits`` up to float rounding.
    Without ``consume`` the logits are returned as a list (small inputs only).
    ``source``: where the blocks come from (e.g. streamed from disk)."""
    blocks = source.blocks if source is not None else find_blocks(model)
    source = source or BlockSource(blocks)
    inputs = sequential(model, input_ids, device, lambda i, block, inp: propagate(block, i, inp), desc="forward",
                        blocks=blocks, source=source)
    out: list[Tensor] = []
    run_head(model, input_ids, inputs.hidden, device, consume or (lambda j, lg: out.append(lg)), inputs, blocks,
             source)
    return None if consume else out
