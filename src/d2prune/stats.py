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
from typing import Callable, Iterable

import torch
from torch import Tensor


def as_columns(x: Tensor) -> tuple[Tensor, int]:
    """``[B, L, d] | [T, d]`` -> (``[d, B*L]`` view, B). The transposed view is
    what the references reduce over; keeping it keeps the same float order."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    b = x.shape[0]
    return x.reshape(-1, x.shape[-1]).t(), b


class Accumulator:
    """A running statistic of a layer input. Subclasses set ``key``; a key
    requested as ``"name:arg"`` passes ``float(arg)`` to the constructor (e.g.
    D²Prune's scale ``s``), so different settings never share a buffer."""

    key: str = ""

    def __init__(self, d_in: int, device: torch.device, *params: float):
        self.n = 0

    def update(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RunningHessian(Accumulator):
    """SparseGPT's ``H = (2/N) sum_k X_k^T X_k`` as a running mean.

    Each call rescales ``H`` by ``n/(n+B)`` and adds ``Xs Xs^T`` with
    ``Xs = sqrt(2/n) X`` (n already incremented), exactly as the reference.
    """

    key = "hessian"

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(d_in, device)
        self.H = torch.zeros((d_in, d_in), dtype=torch.float32, device=device)

    def update(self, x: Tensor) -> None:
        inp, b = as_columns(x)
        self.H *= self.n / (self.n + b)
        self.n += b
        inp = math.sqrt(2 / self.n) * inp.float()
        self.H += inp.matmul(inp.t())


class RunningSqNorm(Accumulator):
    """Wanda's ``a_j = (1/N) sum_k ||X_k[:, j]||^2`` (plain running mean)."""

    key = "sq_norm"

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


def make_accumulator(key: str, d_in: int, device: torch.device) -> Accumulator:
    name, *params = key.split(":")
    return ACCUMULATORS[name](d_in, device, *(float(p) for p in params))


class InputStats:
    """All accumulators one input tensor feeds, plus a cache for values derived
    from them (e.g. the damped inverse-Hessian Cholesky factor), so layers that
    share the input also share the derived work."""

    def __init__(self, d_in: int, device: torch.device, kinds: Iterable[str]):
        self.d_in = d_in
        self.acc: dict[str, Accumulator] = {k: make_accumulator(k, d_in, device) for k in sorted(set(kinds))}
        self._cache: dict = {}

    def update(self, x: Tensor) -> None:
        for a in self.acc.values():
            a.update(x)

    def __getitem__(self, key: str) -> Accumulator:
        return self.acc[key]

    def __contains__(self, key: str) -> bool:
        return key in self.acc

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
