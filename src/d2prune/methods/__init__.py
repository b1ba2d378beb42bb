"""Pruning methods: each file = its config, pure tensor math and a thin
per-layer wrapper, registered against its config type (see
:mod:`d2prune.methods.base`). Importing a file registers its method: a new
method is one file here plus one import line below."""

from .base import REGISTRY, LayerPruner, Method, build_method, register
from .magnitude import Magnitude  # noqa: F401
from .wanda import Wanda  # noqa: F401
from .sparsegpt import SparseGPT  # noqa: F401
from .pruner_zero import PrunerZero  # noqa: F401
from .d2prune import D2Prune  # noqa: F401
from .ria import RIA  # noqa: F401

__all__ = ["REGISTRY", "LayerPruner", "Method", "build_method", "register"]
