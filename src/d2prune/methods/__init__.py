"""Pruning methods: each file = pure tensor math + a thin per-layer wrapper,
registered against its config type (see :mod:`d2prune.methods.base`)."""

from .base import REGISTRY, LayerPruner, Method, build_method, register
from .d2prune import D2Prune
from .magnitude import Magnitude
from .pruner_zero import PrunerZero
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = ["REGISTRY", "LayerPruner", "Method", "build_method", "register", "D2Prune", "Magnitude", "PrunerZero",
           "SparseGPT", "Wanda"]
