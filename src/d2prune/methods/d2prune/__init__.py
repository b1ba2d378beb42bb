"""D²Prune: the method (:mod:`.method`) and its searches over the frozen projection (:mod:`.search`)."""

from .config import D2PruneConfig, D2Variant  # noqa: F401
from .method import D2Prune  # noqa: F401
