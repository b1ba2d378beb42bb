"""What a pruning method is, to the engine.

A method is a :class:`Method` (one per run, built from its frozen config) that
hands the engine one thin :class:`LayerPruner` per Linear. The engine owns
everything else: finding blocks, hooks, shared input statistics, moving data,
writing weights back, errors and timing. Adding a method = one file in this
folder with its config (a :class:`~d2prune.config.MethodConfig` whose fields
are its options, command line included), its tensor math, a ``LayerPruner``
and ``@register``, plus one import line in ``methods/__init__.py``; nothing
else changes (``methods/ria.py`` is such a file).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import MethodConfig, Sparsity, register_method_config
from ..ops.stats import InputStats, StatKey


class LayerPruner:
    """Thin per-Linear wrapper around a method's pure tensor functions.

    ``input_stats``: keys of the input accumulators (:mod:`d2prune.ops.stats`) the
    layer needs. ``wants_output``: if True the engine calls
    :meth:`observe_output` with the layer's dense output on every calibration
    call. :meth:`prune` receives the fp32 ``[d_out, d_in]`` weight (a copy) and
    returns the new weight and the mask (``True`` = pruned). ``name``: the
    layer's qualified name; ``config``: the method's config, if it needs it.
    """

    input_stats: tuple[StatKey, ...] = ()
    wants_output: bool = False
    label: str = ""  # how the layer was pruned, for the per-layer report

    def __init__(self, name: str, sparsity: Sparsity, config: MethodConfig | None = None):
        self.name = name
        self.sparsity = sparsity
        self.config = config

    def observe_output(self, y: Tensor) -> None:
        pass

    def observers(self) -> list:
        """The output statistics this wrapper collects, each with ``n`` and
        ``merge_fields`` (combined over the processes of a torchrun job)."""
        return []

    def prune(self, W: Tensor, stats: InputStats) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class MaskPruner(LayerPruner):
    """A layer whose method only chooses which weights to prune (no update of
    the others): :meth:`mask` says which, :meth:`prune` zeroes them."""

    def mask(self, W: Tensor, stats: InputStats) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prune(self, W: Tensor, stats: InputStats) -> tuple[Tensor, Tensor]:
        mask = self.mask(W, stats)
        W.masked_fill_(mask, 0)
        return W, mask


class Method:
    """One pruning run's method: builds a :class:`LayerPruner` per Linear
    (by default a ``layer_type(name, sparsity, config)``)."""

    config_type: ClassVar[type[MethodConfig]]
    layer_type: ClassVar[type[LayerPruner]]

    def __init__(self, config: MethodConfig, sparsity: Sparsity):
        self.config = config
        self.sparsity = sparsity
        self.block_sparsity: dict[int, Sparsity] = {}  # a per-block allocation (OWL), else the run's sparsity

    def sparsity_at(self, block_index: int) -> Sparsity:
        """The sparsity of block ``block_index`` (the run's, unless allocated per block)."""
        return self.block_sparsity.get(block_index, self.sparsity)

    def prepare(self, model: nn.Module, calibration: Tensor, device: torch.device) -> None:
        """A whole-model pass before the block loop (Pruner-Zero's gradients)."""

    def begin_block(self, index: int, block: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Called with the dense block before its :meth:`layer` calls (for
        per-block choices that need all of the block's weights)."""

    def layer(self, name: str, module: nn.Module, block_index: int) -> LayerPruner:
        """The wrapper pruning ``module`` (qualified ``name``) of block ``block_index``."""
        return self.layer_type(name, self.sparsity_at(block_index), self.config)

    def summary(self) -> dict:
        """Extra facts for d2prune.json (choices made during the run)."""
        return {}

    def state(self) -> dict:
        """Per-block choices made so far, as JSON (saved after every block for
        crash-resume); :meth:`load_state` puts them back."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned (a resumed run)."""


REGISTRY: dict[type[MethodConfig], type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Map a method config type to its handler (torchao-style registry) and
    make the config reachable by its name (``--method``, ``PruneConfig(method=...)``,
    sweep specs)."""
    REGISTRY[cls.config_type] = cls
    register_method_config(cls.config_type)
    return cls


def build_method(config: MethodConfig, sparsity: Sparsity) -> Method:
    try:
        handler = REGISTRY[type(config)]
    except KeyError:  # pragma: no cover - every registered config has a handler
        raise ValueError(f"no handler registered for {type(config).__name__}") from None
    return handler(config, sparsity)
