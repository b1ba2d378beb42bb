"""The one exception type users see.

Every problem a user can fix (bad sparsity, a missing file, an output folder
that exists, NaN statistics...) is raised as :class:`D2PruneError` with a
one-line message that says what to fix. The CLI prints it as
``d2prune: error: <message>`` and exits with status 2; library callers catch it.
"""

from __future__ import annotations

import errno


class D2PruneError(Exception):
    """A user-fixable error; ``str(err)`` is a single line naming what to fix."""

    def __init__(self, message: str):
        # Keep the promise of one line even when a wrapped library error is long.
        super().__init__(" ".join(str(message).split()))


class UnknownOptionError(D2PruneError):
    """A method was given options it does not have (``options``: their names)."""

    def __init__(self, message: str, options: list[str]):
        super().__init__(message)
        self.options = options


MAX_REASON_CHARS = 300  # how much of a wrapped library error a one-line message quotes


def first_line(e: BaseException) -> str:
    """The reason of a wrapped library error, for a one-line message: its first
    line, or its first two when the first is only a heading ("Validation error
    for field 'x':"), at most :data:`MAX_REASON_CHARS` characters."""
    lines = [ln.strip() for ln in (str(e).strip() or repr(e)).splitlines() if ln.strip()]
    text = lines[0] if len(lines) == 1 or not lines[0].endswith(":") else " ".join(lines[:2])
    return text[:MAX_REASON_CHARS]


def no_space_left(e: BaseException) -> bool:
    """Whether ``e`` reports a full disk (or a file over the filesystem's size
    limit); safetensors reports one as ``SafetensorError("... I/O error: No
    space left on device (os error 28)")``, without an errno."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(
        t in str(e) for t in ("No space left", "os error 28", "File too large", "os error 27"))
