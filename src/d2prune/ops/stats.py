"""Calibration statistics of a Linear layer's *input*, in fp32.

Every statistic here depends only on the input ``X`` of a layer, so Linears
that read the same tensor (q/k/v; gate/up) share one :class:`InputStats`
(one Hessian, one damped Cholesky inverse) instead of one each.

Accumulators are updated once per forward call with the raw hook input
(``[B, L, d_in]`` or ``[T, d_in]``); like the reference codes, a call counts
as ``B`` samples. The update order of floating-point operations copies the
references (IST-DASLab/sparsegpt ``add_batch``, locuslab/wanda
``WrappedGPT.add_batch``) so statistics are bit-identical to theirs.
Methods register further accumulators with :func:`register_accumulator`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import torch
from torch import Tensor


def as_columns(x: Tensor) -> tuple[Tensor, int]:
    """``[B, L, d] | [T, d]`` -> (``[d, B*L]`` view, B). The transposed view is
    what the references reduce over; keeping it keeps the same float order."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    b = x.shape[0]
    return x.reshape(-1, x.shape[-1]).t(), b


# A statistic is requested by its accumulator's ``key`` (``"hessian"``) or by a
# tuple ``(key, *args)`` whose arguments go to the constructor (D²Prune's
# ``("d2_dx_mean", 1500.0)``), so different settings never share a buffer.
StatKey = Union[str, tuple]


def _as_tuple(key: StatKey) -> tuple:
    return (key,) if isinstance(key, str) else tuple(key)


class Accumulator:
    """A running statistic of a layer input. Subclasses set ``key``; the
    constructor receives the extra arguments of a tuple :data:`StatKey`."""

    key: str = ""
    # how the states of several processes combine (d2prune.engine.distributed.merge):
    # attribute -> "mean" (a running mean over n samples) or "sum"
    merge_fields: dict[str, str] = {}

    def __init__(self, d_in: int, device: torch.device, *params):
        self.n = 0

    def update(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RunningHessian(Accumulator):
    """SparseGPT's ``H = (2/N) sum_k X_k^T X_k`` as a running mean.

    Each call rescales ``H`` by ``n/(n+B)`` and adds ``Xs Xs^T`` with
    ``Xs = sqrt(2/n) X`` (n already incremented), exactly as the reference.
    """

    key = "hessian"
    merge_fields = {"H": "mean"}

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(d_in, device)
        self.H = torch.zeros((d_in, d_in), dtype=torch.float32, device=device)

    def update(self, x: Tensor) -> None:
        if x.dim() == 3 and x.shape[0] > 1:  # --fast: one fused GEMM, H <- H n/(n+B) + (2/(n+B)) X^T X
            b, rows = x.shape[0], x.reshape(-1, x.shape[-1]).float()
            self.H.addmm_(rows.t(), rows, beta=self.n / (self.n + b), alpha=2 / (self.n + b))
            self.n += b
            return
        inp, b = as_columns(x)  # one sample per call: the reference's operations, in its order
        self.H *= self.n / (self.n + b)
        self.n += b
        inp = math.sqrt(2 / self.n) * inp.float()
        self.H += inp.matmul(inp.t())


class RunningSqNorm(Accumulator):
    """Wanda's ``a_j = (1/N) sum_k ||X_k[:, j]||^2`` (plain running mean)."""

    key = "sq_norm"
    merge_fields = {"value": "mean"}

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(d_in, device)
        self.value = torch.zeros(d_in, dtype=torch.float32, device=device)

    def update(self, x: Tensor) -> None:
        inp, b = as_columns(x)
        self.value *= self.n / (self.n + b)
        self.n += b
        inp = inp.type(torch.float32)
        self.value += torch.norm(inp, p=2, dim=1) ** 2 / self.n


ACCUMULATORS: dict[str, Callable[..., Accumulator]] = {}


def register_accumulator(cls: type[Accumulator]) -> type[Accumulator]:
    ACCUMULATORS[cls.key] = cls
    return cls


register_accumulator(RunningHessian)
register_accumulator(RunningSqNorm)


def make_accumulator(key: StatKey, d_in: int, device: torch.device) -> Accumulator:
    name, *params = _as_tuple(key)
    return ACCUMULATORS[name](d_in, device, *params)


class InputStats:
    """All accumulators one input tensor feeds, plus a cache for values derived
    from them (e.g. the damped inverse-Hessian Cholesky factor), so layers that
    share the input also share the derived work."""

    def __init__(self, d_in: int, device: torch.device, kinds: Iterable[StatKey], fast: bool = False):
        self.acc: dict[tuple, Accumulator] = {k: make_accumulator(k, d_in, device)
                                              for k in sorted({_as_tuple(k) for k in kinds})}
        self._cache: dict = {}
        # --fast: what is derived from these statistics (the inverse-Hessian factor, the OBS
        # updates) may take faster float paths that are not bit-identical to the references
        self.fast = fast

    def update(self, x: Tensor) -> None:
        for a in self.acc.values():
            a.update(x)

    def __getitem__(self, key: StatKey) -> Accumulator:
        return self.acc[_as_tuple(key)]

    def __contains__(self, key: StatKey) -> bool:
        return _as_tuple(key) in self.acc

    def cached(self, key, compute: Callable[[], object]):
        """``compute()`` once per key (e.g. ``("hinv", percdamp)``)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def tensors(self) -> Iterable[Tensor]:
        for a in self.acc.values():
            for v in vars(a).values():
                if isinstance(v, Tensor):
                    yield v
