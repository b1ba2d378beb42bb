"""Where a block's weights and the calibration activations live between
their turns, and how a block is put on the compute device for its turn.

* :func:`place_params` / :func:`on_device` - a module moved to the compute
  device (and compute dtype) for the duration, then back home;
* :func:`outside_on_device` - embeddings, final norm and head on the device
  (the big matrices kept in their storage dtype);
* :class:`ActivationStore` - activations on the device, in host RAM or in
  memory-mapped files (``--offload-activations``);
* :class:`BlockSource` - the blocks of a model in memory;
  :class:`d2prune.io.streaming.StreamedBlocks` reads them from disk instead.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import D2PruneError
from .modeling import STORAGE_DTYPE, Blocks


class _Placement:
    """Where and in which dtype a module's parameters lived before
    :func:`place_params` moved them; :meth:`restore` puts them back."""

    def __init__(self, saved: list[tuple[nn.Parameter, torch.device, torch.dtype]], buffers: list):
        self.saved, self.buffers = saved, buffers

    def restore(self) -> None:
        for p, device, dtype in self.saved:
            p.data = p.data.to(device=device, dtype=dtype)
            if hasattr(p, STORAGE_DTYPE):
                delattr(p, STORAGE_DTYPE)
        for mod, name, device in self.buffers:
            buf = mod._buffers[name]
            if buf is not None:
                mod._buffers[name] = buf.to(device)


def place_params(module: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None,
                 skip: set[int] = frozenset()) -> _Placement:
    """Move ``module``'s parameters (and buffers) to ``device``; floating
    parameters stored in another dtype are cast to ``compute_dtype`` and
    remember their storage dtype (see :func:`d2prune.io.modeling.set_weight_matrix`:
    weights written while a block computes in fp32 are rounded to the dtype
    they will be saved in, so the next block sees what the saved model gives).
    Buffers keep their dtype (rotary ``inv_freq`` stays fp32). Parameters on
    the meta device are left alone."""
    saved, buffers = [], []
    for p in module.parameters():
        if p.device.type == "meta" or id(p) in skip:
            continue
        dtype = compute_dtype if (compute_dtype is not None and p.is_floating_point()) else p.dtype
        saved.append((p, p.device, p.dtype))
        if dtype != p.dtype:
            setattr(p, STORAGE_DTYPE, p.dtype)
        if p.device != device or p.dtype != dtype:
            p.data = p.data.to(device=device, dtype=dtype)
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device.type != "meta" and buf.device != device:
                buffers.append((mod, name, buf.device))
                mod._buffers[name] = buf.to(device)
    return _Placement(saved, buffers)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """Put a block on the compute device (in ``compute_dtype``) for the duration, then back home."""
    placed = place_params(module, device, compute_dtype)
    try:
        yield module
    finally:
        placed.restore()


OFFLOAD_CHOICES = ("cpu", "disk")


class ActivationStore:
    """Where the calibration activations (``[N, L, d]`` per buffer) live:
    on the compute device (``None``), in host RAM (``"cpu"``), or in files
    memory-mapped from ``folder`` (``"disk"``: the page cache holds what is
    in use, the OS writes the rest back). Samples stream through the device
    one at a time either way (:func:`run_block` moves them)."""

    def __init__(self, kind: str | None = None, folder: str | os.PathLike | None = None):
        if kind not in (None, *OFFLOAD_CHOICES):
            raise D2PruneError(f"--offload-activations {kind!r} is not valid: use {' or '.join(OFFLOAD_CHOICES)}")
        if kind == "disk" and folder is None:
            raise D2PruneError("--offload-activations disk needs a folder for its files")
        self.kind, self.folder, self.count = kind, folder, 0
        self._scratch: dict = {}

    def scratch(self, key: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer kept for ``key`` and handed out again to the next call with
        the same shape and dtype (one file per key when on disk, however many
        blocks use it)."""
        buf = self._scratch.get(key)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            self._scratch.pop(key, None)
            buf = self._scratch[key] = self.empty(tuple(shape), dtype, device)
        return buf

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.kind is None:
            return torch.empty(shape, dtype=dtype, device=device)
        if self.kind == "cpu":
            return torch.empty(shape, dtype=dtype, device="cpu")
        numel = 1
        for d in shape:
            numel *= d
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"activations-{self.count}.bin")
        self.count += 1
        with open(path, "wb") as f:  # a sparse file of the right size; from_file maps it
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)

    def empty_like(self, t: Tensor) -> Tensor:
        return self.empty(tuple(t.shape), t.dtype, t.device)


HEAD_CHUNK_ROWS = 16384  # rows of a stored-in-half head computed in fp32 at a time


def _wide_head_forward(layer: nn.Linear, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """A Linear stored in half precision computing in ``dtype``, one chunk of
    output rows at a time: never a full-size fp32 copy of a 128k-vocabulary head."""
    def forward(x: Tensor) -> Tensor:
        x = x.to(dtype)
        out = torch.empty((*x.shape[:-1], layer.out_features), dtype=dtype, device=x.device)
        for r in range(0, layer.out_features, HEAD_CHUNK_ROWS):
            w = layer.weight[r:r + HEAD_CHUNK_ROWS].to(dtype)
            b = None if layer.bias is None else layer.bias[r:r + HEAD_CHUNK_ROWS].to(dtype)
            out[..., r:r + HEAD_CHUNK_ROWS] = nn.functional.linear(x, w, b)
        return out
    return forward


@contextlib.contextmanager
def outside_on_device(model: nn.Module, device: torch.device, compute_dtype: torch.dtype | None) -> Iterator[None]:
    """Put what is outside the (stubbed-out) blocks on ``device``, computing in
    ``compute_dtype``. The two big matrices stay in their storage dtype:
    embeddings are looked up as stored and their output cast (a lookup is
    exact, so this equals an fp32 table of the same values) and the head
    computes in chunks of rows; the rest (norms...) is cast."""
    if compute_dtype is None:
        with on_device(model, device):
            yield
        return
    big: dict[nn.Module, str] = {}
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and mod.weight.device.type != "meta":
            big[mod] = "embedding"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and head.weight.device.type != "meta" and head not in big:
        big[head] = "head"
    keep = {id(p) for m in big for p in m.parameters(recurse=False)}
    saved = [(p, p.device) for p in model.parameters() if id(p) in keep]
    handles = []
    try:
        for p, _ in saved:
            p.data = p.data.to(device)
        placed = place_params(model, device, compute_dtype, skip=keep)
        try:
            for mod, kind in big.items():
                if kind == "embedding":
                    handles.append(mod.register_forward_hook(lambda m, i, out: out.to(compute_dtype)))
                else:
                    mod.forward = _wide_head_forward(mod, compute_dtype)
            yield
        finally:
            for h in handles:
                h.remove()
            for mod, kind in big.items():
                if kind == "head":
                    del mod.forward  # back to the class's forward
            placed.restore()
    finally:
        for p, home in saved:
            p.data = p.data.to(home)


class BlockSource:
    """Where the blocks' weights live between their turns, and the dtype they
    compute in. This one: the model's own modules (host RAM, or wherever the
    model is); :class:`d2prune.io.streaming.StreamedBlocks` reads each block from
    a checkpoint on disk instead. ``compute_dtype=None`` computes in the
    storage dtype. ``activations``: where the activation buffers live."""

    def __init__(self, blocks: Blocks, compute_dtype: torch.dtype | None = None,
                 activations: ActivationStore | None = None):
        self.blocks, self.compute_dtype = blocks, compute_dtype
        self.activations = activations or ActivationStore()

    def open(self, i: int, device: torch.device) -> contextlib.AbstractContextManager[nn.Module]:
        """Block ``i`` ready to run on ``device`` for the duration of a ``with``."""
        return on_device(self.blocks[i], device, self.compute_dtype)

    def outside(self, model: nn.Module, device: torch.device, head: bool = True) -> contextlib.AbstractContextManager:
        """Everything but the blocks (embeddings, final norm, head) ready on
        ``device`` for the duration (called while the blocks are stubbed out;
        ``head=False``: the output head will not run, a source may leave it unread)."""
        return outside_on_device(model, device, self.compute_dtype)

    def saved(self, i: int, shard: str | os.PathLike) -> None:
        """Block ``i`` is finished and saved in ``shard`` (its weights here are already the pruned ones)."""

    def restore(self, i: int, shard: str | os.PathLike) -> None:
        """Replace block ``i``'s weights by those saved in ``shard`` (a finished
        block of an interrupted run; checkpoint names ``PREFIX.i.NAME``)."""
        load_block_shard(self.blocks[i], f"{self.blocks.prefix}.{i}", shard)


def load_block_shard(block: nn.Module, prefix: str, shard: str | os.PathLike) -> None:
    """Copy a saved block's tensors (checkpoint names ``prefix.NAME``) into
    ``block`` as it is now (where it is, in the dtype it has: at rest or
    opened on the device in its compute dtype)."""
    from safetensors.torch import load_file

    for name, t in load_file(str(shard)).items():
        p = block.get_parameter(name.removeprefix(prefix + "."))
        p.data.copy_(t.to(device=p.device, dtype=p.dtype))
