"""The one exception type users see.

Every problem a user can fix (bad sparsity, a missing file, an output folder
that exists, NaN statistics...) is raised as :class:`D2PruneError` with a
one-line message that says what to fix. The CLI prints it as
``d2prune: error: <message>`` and exits with status 2; library callers catch it.
"""

from __future__ import annotations


class D2PruneError(Exception):
    """A user-fixable error; ``str(err)`` is a single line naming what to fix."""

    def __init__(self, message: str):
        # Keep the promise of one line even when a wrapped library error is long.
        super().__init__(" ".join(str(message).split()))
