"""Pruning methods: each file = pure tensor math + a thin per-layer wrapper,
registered against its config type (see :mod:`d2prune.methods.base`)."""

from .base import REGISTRY, LayerPruner, Method, build_method, register
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = ["REGISTRY", "LayerPruner", "Method", "build_method", "register", "Magnitude", "SparseGPT", "Wanda"]
