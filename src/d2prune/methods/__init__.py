"""Pruning methods. Each file is one method: its typed config, its pure tensor
math (scores, masks, updates) and a thin per-layer wrapper implementing
:class:`d2prune.engine.method.LayerPruner`, registered against its config type.
Importing a file registers its method: a new method is one file here plus one
import line below. D²Prune is a folder: the method (:mod:`.d2prune.method`),
its config and variants (:mod:`.d2prune.config`) and its searches over the
frozen q/k/v projection, which drive the engine (:mod:`.d2prune.search`).

Layer 5, the top of the library: may import every layer below
(:mod:`d2prune.evaluation`, :mod:`d2prune.engine`, :mod:`d2prune.io`,
:mod:`d2prune.ops`, the foundation)."""

from ..engine.method import REGISTRY, LayerPruner, Method, build_method, register
from .magnitude import Magnitude  # noqa: F401
from .wanda import Wanda  # noqa: F401
from .sparsegpt import SparseGPT  # noqa: F401
from .pruner_zero import PrunerZero  # noqa: F401
from .d2prune.method import D2Prune  # noqa: F401
from .ria import RIA  # noqa: F401

__all__ = ["REGISTRY", "LayerPruner", "Method", "build_method", "register"]
