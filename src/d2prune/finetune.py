"""``d2prune finetune``: LoRA recovery fine-tuning that keeps the pruned zeros.

A pruned model gets a LoRA adapter (``peft``) on every pruned Linear of its
decoder blocks, is trained on C4 windows (the calibration sampler of
:mod:`d2prune.io.data`, another seed), and is saved **merged** with exactly the
pruned zeros (docs/finetune.md §2):

    W' = W + (s · B A) ⊙ M,   M = (W != 0),   s = alpha / r

By default the mask is applied during training too (the forward computes with
``W + (s·BA) ⊙ M``), so what is trained is what is saved; ``mask_training=False``
trains plain LoRA and masks only at the merge (an ablation). The WikiText-2
perplexity before and after (of the model actually saved) goes into the output's
``d2prune.json`` next to the pruned model's record, under ``finetune``.

Checkpoints (adapter weights, AdamW state, RNG state: safetensors; step, losses:
JSON) are written every ``save_every`` steps into ``.OUT.finetune-work`` beside
the output; rerunning the same command resumes, bit-identically on a CPU
(docs/finetune.md §4).

    d2prune finetune pruned-70 --out pruned-70-lora --steps 100 --batch-size 8 --seqlen 256

From Python:

>>> cfg = FinetuneConfig(steps=20, batch_size=2, seqlen=128)  # doctest: +SKIP
>>> result = finetune("pruned-70", "pruned-70-lora", cfg)  # doctest: +SKIP
>>> result.ppl_before, result.ppl_after  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import D2PruneError, first_line
from .io.experts import LAYOUT_FLAGS
from .io.modeling import check_seqlen, find_blocks, find_prunable, pick_device
from .io.resume import STATE_NAME, WorkFolder, files_digest, tensor_digest
from .io.save import RECORD_NAME, check_output_dir, library_versions, save_pruned

log = logging.getLogger(__name__)

# The authors' LoRA recipe (D2Prune main_lora.py + lora_ft/, itself Wanda's lora_ft/finetune_lm.py):
# r 8, alpha 16, dropout 0.05, lr 1e-4, block 1024, 1 window per device x 128 accumulated, 5 warm-up
# steps then linear decay, AdamW (no weight decay), 30,000 C4 windows for one epoch = 234 steps.
AUTHORS_STEPS = 30000 // 128
DEFAULT_SEQLEN = 1024
DATA_SEED_OFFSET = 1_000_003  # training windows never replay the calibration draw of the same --seed
WORK_SUFFIX = ".finetune-work"


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of a LoRA recovery run (the training, not the files).

    ``batch_size`` windows per optimizer step, computed ``micro_batch_size`` at a
    time (gradient accumulation); ``seqlen=None``: ``min(1024, the model's context)``.
    """

    steps: int = AUTHORS_STEPS
    batch_size: int = 128
    micro_batch_size: int = 1
    seqlen: int | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lr: float = 1e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    mask_training: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, value) -> None:
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise D2PruneError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        for name in ("steps", "batch_size", "micro_batch_size", "lora_r"):
            positive_int(name, getattr(self, name))
        if self.batch_size % self.micro_batch_size:
            raise D2PruneError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                               f"{self.micro_batch_size}")
        if self.seqlen is not None and not (isinstance(self.seqlen, int) and self.seqlen > 1):
            raise D2PruneError(f"--seqlen must be an integer > 1, got {self.seqlen!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise D2PruneError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise D2PruneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise D2PruneError(f"--lr must be > 0, got {self.lr}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise D2PruneError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise D2PruneError(f"--weight-decay must be >= 0, got {self.weight_decay}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(cfg: FinetuneConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` then linear decay towards 0 at ``steps`` (the shape of
    transformers' default schedule, shifted one step so that no step has lr 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps)


# --------------------------------------------------------------------------- the masked LoRA layer
def _lora_linear_class():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class MaskedLoraLinear(LoraLinear):
        """peft's LoRA Linear whose update is ``(s·BA) ⊙ M`` with ``M = (W != 0)``
        of the base weight at wrap time: the pruned zeros stay zero in the
        forward (``mask_training``), in ``get_delta_weight`` and so in any peft merge."""

        def __init__(self, base_layer, adapter_name, config, **kwargs):
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
            # non-persistent: adapter state dicts hold A and B only
            self.register_buffer("lora_mask", self.get_base_layer().weight != 0, persistent=False)
            self.mask_training = True

        def get_delta_weight(self, adapter) -> Tensor:
            return super().get_delta_weight(adapter) * self.lora_mask

        def masked_delta(self, adapter: str = "default") -> Tensor:
            """``(s·BA) ⊙ M`` in the adapter's dtype (fp32), differentiable."""
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (b @ a) * self.scaling[adapter] * self.lora_mask

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            if (not self.mask_training or self.disable_adapters or self.merged or args or kwargs
                    or list(self.active_adapters) != ["default"]):
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            delta = self.masked_delta("default")
            dropout = self.lora_dropout["default"]
            if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                # dropout acts on the adapter's input only (as in peft): two GEMMs
                return base(x) + F.linear(dropout(x).to(delta.dtype), delta).to(x.dtype)
            # one GEMM with the merged weight: the same arithmetic as the saved model
            return F.linear(x, (base.weight.to(delta.dtype) + delta).to(x.dtype), base.bias)

    return MaskedLoraLinear


# --------------------------------------------------------------------------- targets and masks
def target_linears(model: nn.Module, record: dict | None = None) -> list[str]:
    """Full names of the Linears to adapt: those of the decoder blocks that the
    pruned model's ``d2prune.json`` lists as pruned (rows are full module
    names; a layer kept dense by ``--ignore`` / ``--targets`` has the row
    ``how: ignored`` and is not adapted), else every block Linear."""
    # every module declaring an experts layout, also one d2prune cannot read (the prune refuses those)
    fused = [type(m).__name__ for m in model.modules() if all(hasattr(m, f) for f in LAYOUT_FLAGS)]
    if fused:  # LoRA here wraps nn.Linear: the experts (most of the weights) would silently stay untrained
        raise D2PruneError(f"{type(model).__name__} keeps its experts in fused 3-D parameters ({fused[0]}): d2prune "
                           "finetune adapts nn.Linear layers only and would leave every expert untrained; it does not "
                           "support mixture-of-experts models yet")
    blocks = find_blocks(model)
    names = [f"{blocks.prefix}.{i}.{n}" for i, block in enumerate(blocks.layers) for n in find_prunable(block)]
    layers = (record or {}).get("layers") or []
    pruned = {row["name"] for row in layers if isinstance(row, dict) and "name" in row and row.get("how") != "ignored"}
    chosen = [n for n in names if n in pruned] if pruned else names
    if not chosen:
        chosen = names
    modules = dict(model.named_modules())
    conv = [n for n in chosen if not isinstance(modules[n], nn.Linear)]
    if conv:
        raise D2PruneError(f"{conv[0]} is a {type(modules[conv[0]]).__name__}, not an nn.Linear: d2prune finetune "
                           "supports models whose block layers are nn.Linear (not GPT-2's Conv1D)")
    return chosen


def zero_masks(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """``{name: W == 0}`` of the named Linears (the pattern that must survive)."""
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() == 0 for n in names}


def count_zeros(model: nn.Module, names: list[str]) -> int:
    modules = dict(model.named_modules())
    return int(sum(int((modules[n].weight == 0).sum()) for n in names))


def add_lora(model: nn.Module, cfg: FinetuneConfig, targets: list[str]):
    """Wrap ``targets`` in masked LoRA layers (peft); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    lora._register_custom_module({nn.Linear: _lora_linear_class()})  # peft's (experimental) custom-layer hook
    torch.manual_seed(cfg.seed)  # A's initialisation
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x (FutureWarning): not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    for m in lora_layers(peft_model):
        m.mask_training = cfg.mask_training
    return peft_model


def lora_layers(peft_model: nn.Module) -> list[nn.Module]:
    return [m for m in peft_model.modules() if hasattr(m, "masked_delta")]


@torch.no_grad()
def merge_masked(peft_model, storage_dtype: torch.dtype | None = None) -> nn.Module:
    """The plain model with ``W' = W + (s·BA) ⊙ M`` in every adapted Linear,
    rounded to ``storage_dtype``. A pruned position keeps its exact bits (even
    a ``-0.0``); a kept weight whose sum rounds to exactly zero keeps its old
    value, so the zero pattern is provably the pruned one."""
    for m in lora_layers(peft_model):
        w = m.get_base_layer().weight
        dtype = storage_dtype or w.dtype
        new = (w.to(m.lora_A["default"].weight.dtype) + m.masked_delta("default")).to(dtype)
        old = w.detach().to(dtype)
        keep_old = ~m.lora_mask | (new == 0)
        w.data = torch.where(keep_old, old, new).to(w.dtype)
    return peft_model.unload()


# --------------------------------------------------------------------------- checkpoints
class FinetuneWork(WorkFolder):
    """``.OUT.finetune-work/`` beside the output: ``step-NNNNNN.safetensors``
    (adapter + optimizer + RNG) then ``state.json`` naming it, each written
    atomically; the state file is the commit point, so a kill between the two
    leaves the previous checkpoint intact. Marker, lock, identity check and
    removal are the prune's work folder's (:class:`d2prune.io.resume.WorkFolder`)."""

    def __init__(self, out: str | os.PathLike, identity: dict, restart: bool = False):
        super().__init__(out, identity, restart, suffix=WORK_SUFFIX)

    def load(self) -> dict | None:
        """The interrupted run's state (identity checked), or None to start fresh."""
        if self.path.exists():
            self.ensure()  # ours (its marker), and locked by this run before anything in it is read or removed
        if self.restart:
            self._clear()
            return None
        state_file = self.path / STATE_NAME
        if not state_file.is_file():
            return None
        try:
            state = json.loads(state_file.read_text())
        except ValueError as e:
            raise D2PruneError(f"{state_file} is corrupt ({e}): rerun with --restart to start over") from e
        if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
            raise D2PruneError(f"{state_file} is not a state this version of d2prune wrote: rerun with --restart to "
                               "start over")
        self.check_identity(state["identity"], "fine-tuning")
        return state

    def save(self, step: int, tensors: dict[str, Tensor], state: dict) -> None:
        from safetensors.torch import save_file

        self.ensure()
        name = f"step-{step:06d}.safetensors"
        self.write_atomic(name, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
        record = {**state, "identity": self.identity, "step": step, "tensors": name}
        self.write_atomic(STATE_NAME, lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        for old in self.path.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def tensors(self, state: dict) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        with self.reading():
            return load_file(str(self.path / state["tensors"]))


def trainable(peft_model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def training_state(params: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
                   device: torch.device) -> dict[str, Tensor]:
    """Adapter weights, AdamW moments and step counts, and the RNG state, as tensors."""
    out: dict[str, Tensor] = {}
    for i, (name, p) in enumerate(params):
        out[f"param.{name}"] = p.detach().cpu()
        for key, value in opt.state.get(p, {}).items():
            out[f"optim.{i}.{key}"] = value.detach().cpu() if torch.is_tensor(value) else torch.tensor(value)
    out["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


@torch.no_grad()
def restore_training_state(tensors: dict[str, Tensor], params: list[tuple[str, nn.Parameter]],
                           opt: torch.optim.Optimizer, device: torch.device) -> None:
    for i, (name, p) in enumerate(params):
        key = f"param.{name}"
        if key not in tensors:
            raise D2PruneError(f"the fine-tuning checkpoint has no {name}: rerun with --restart to start over")
        p.copy_(tensors[key])
        state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if state:
            if "step" in state:
                state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
            opt.state[p] = state
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


# --------------------------------------------------------------------------- loading
def load_pruned(folder: Path):
    """``(model, tokenizer, record)`` of a pruned folder: a d2prune output, a
    compressed one (``d2prune compress``) or any causal-LM folder."""
    from transformers import AutoTokenizer

    from .deploy.compress import from_pretrained as load_compressed
    from .io.modeling import load_model
    from .io.sparse_format import is_compressed

    if not folder.is_dir():
        raise D2PruneError(f"pruned model folder {folder} does not exist: pass the --out folder of `d2prune prune`")
    if not (folder / "config.json").is_file():
        raise D2PruneError(f"{folder} has no config.json: pass a model folder (the --out folder of `d2prune prune`)")
    record: dict = {}
    if (folder / RECORD_NAME).is_file():
        try:
            record = json.loads((folder / RECORD_NAME).read_text())
        except ValueError as e:
            raise D2PruneError(f"{folder / RECORD_NAME} is not valid JSON ({e}): fix or remove it") from e
    if is_compressed(folder):
        model = load_compressed(folder)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as e:
            raise D2PruneError(f"could not load the tokenizer of {folder}: {type(e).__name__}: {first_line(e)}") from e
    else:
        model, tok, _ = load_model(str(folder), dtype="auto")
    return model, tok, record


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.name != RECORD_NAME)


def default_data_file(kind: str) -> str | None:
    """The C4 / WikiText-2 file of ``../shared/data`` (or ``$D2PRUNE_DATA``) when present; None: the hub."""
    from .io.data import SHARED_C4, SHARED_WIKI, find_shared_data

    root = find_shared_data()
    if root is None:
        return None
    path = root / (SHARED_C4 if kind == "c4" else SHARED_WIKI)
    return str(path) if path.is_file() else None


# --------------------------------------------------------------------------- the run
@dataclass
class FinetuneResult:
    out: Path
    ppl_before: float
    ppl_after: float
    record: dict = field(repr=False)


def loss_summary(losses: list[float]) -> dict:
    n = len(losses)
    tenth = max(1, n // 10)
    return {"first": losses[0], "last": losses[-1], "min": min(losses),
            "mean_first_10pct": sum(losses[:tenth]) / tenth, "mean_last_10pct": sum(losses[-tenth:]) / tenth,
            "per_step": [round(v, 5) for v in losses]}


def finetune(pruned: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig | None = None, *,
             data: str | None = None, eval_file: str | None = None, eval_windows: int | None = 16,
             eval_seqlen: int | None = None, save_every: int = 0, device: str | None = None,
             overwrite: bool = False, restart: bool = False,
             on_step: Callable[[int], None] | None = None) -> FinetuneResult:
    """Fine-tune ``pruned`` with masked LoRA and save the merged model to ``out``.

    ``data``: C4-style ``.jsonl[.gz]`` (default ``../shared/data`` or the hub
    shard); ``eval_file``: WikiText-2 test (likewise); ``eval_windows``: the
    first N windows of ``eval_seqlen`` tokens (default: the seqlen the pruned
    model was evaluated at, else its context capped at 2048; None = all).
    ``save_every`` K > 0 checkpoints every K steps; ``on_step(step)`` is called
    after each optimizer step (and its checkpoint): a test hook.
    """
    from .io.data import calibration_texts, eval_text

    t0 = time.perf_counter()
    cfg = cfg or FinetuneConfig()
    pruned = Path(pruned).expanduser()
    if not (isinstance(save_every, int) and save_every >= 0):
        raise D2PruneError(f"--save-every must be an integer >= 0 (0: no checkpoints), got {save_every!r}")
    if eval_windows is not None and eval_windows < 1:
        raise D2PruneError(f"--eval-windows must be >= 1, got {eval_windows}")
    if not pruned.is_dir():
        raise D2PruneError(f"pruned model folder {pruned} does not exist: pass the --out folder of `d2prune prune`")
    target = check_output_dir(out, overwrite)
    if target.absolute() == pruned.absolute():
        raise D2PruneError(f"--out {out} is the input folder: choose a new folder for the fine-tuned model")
    dev = pick_device(device)
    # data first: a typo never costs a model load
    data = data or default_data_file("c4")
    eval_file = eval_file or default_data_file("wiki")
    docs = calibration_texts(data)
    text = eval_text("wikitext2", eval_file)

    run = _open_run(pruned, cfg, dev, docs, text, eval_seqlen, eval_windows)
    work = FinetuneWork(target, run.identity, restart)
    try:
        state = work.load()
        before = state["ppl_before"] if state and "ppl_before" in state else run.evaluate(run.model)
        peft_model = add_lora(run.model, cfg, run.targets)
        params = trainable(peft_model)
        opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
        progress = TrainingProgress()
        if state:
            restore_training_state(work.tensors(state), params, opt, dev)
            progress = TrainingProgress(int(state["step"]), list(state["losses"]), float(state["train_seconds"]),
                                        list(state.get("resumed_from", [])) + [int(state["step"])])
            log.info("resuming from step %d/%d (checkpoint in %s)", progress.step, cfg.steps, work.path)
        n_trainable = sum(p.numel() for _, p in params)
        log.info("LoRA r=%d on %d Linears (%d trainable parameters), %d steps x %d windows x %d tokens",
                 cfg.lora_r, len(run.targets), n_trainable, cfg.steps, cfg.batch_size, run.seqlen)

        def checkpoint(done: int) -> None:
            if save_every and done % save_every == 0 and done < cfg.steps:
                work.save(done, training_state(params, opt, dev),
                          {"losses": progress.losses, "train_seconds": progress.train_seconds, "ppl_before": before,
                           "resumed_from": progress.resumed_from})
            if on_step is not None:
                on_step(done)

        train(peft_model, opt, run.windows, cfg, dev, progress, checkpoint)
        merged = merge_keeping_zeros(peft_model, run.storage, run.targets, run.masks_before)
        t_eval = time.perf_counter()
        after = run.evaluate(merged)  # the weights saved, rounded to storage
        eval_seconds = time.perf_counter() - t_eval

        section = {
            "source": str(pruned), "config": {**cfg.to_dict(), "seqlen": run.seqlen, "scaling": cfg.scaling},
            "authors_defaults": {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lr": 1e-4, "seqlen": 1024,
                                 "batch_size": 128, "steps": AUTHORS_STEPS, "warmup_steps": 5,
                                 "target_modules": ["q_proj", "v_proj"]},
            "targets": len(run.targets), "trainable_parameters": n_trainable,
            "data": {"file": data or "hub: allenai/c4 en/c4-train.00000-of-01024", "sampler": "calibration windows",
                     "seed": DATA_SEED_OFFSET + cfg.seed},
            "steps": cfg.steps, "windows_seen": cfg.steps * cfg.batch_size,
            "tokens_seen": cfg.steps * cfg.batch_size * run.seqlen,
            "loss": loss_summary(progress.losses),
            "evaluation": {"file": eval_file or "hub: wikitext-2-raw-v1 test", "before": before, "after": after},
            "zeros": {"before": run.zeros_before, "after": count_zeros(merged, run.targets), "pattern_identical": True},
            "resumed_from": progress.resumed_from, "device": str(dev), "threads": torch.get_num_threads(),
            "train_seconds": progress.train_seconds, "eval_seconds": eval_seconds, "total_seconds": None,
            "versions": {**library_versions(), "peft": _peft_version()},
        }
        record = run.record
        out_record = dict(record) if record else {"model": str(pruned)}
        out_record["finetune"] = section
        if record.get("evaluation"):
            out_record["evaluation_before_finetune"] = record["evaluation"]
        out_record["evaluation"] = {"wikitext2": after}
        section["total_seconds"] = time.perf_counter() - t0
        merged = merged.to(run.storage)
        merged.config.use_cache = True
        saved = save_pruned(merged, run.tokenizer, target, out_record, overwrite=overwrite)
        work.remove()
        log.info("wikitext2 ppl %.3f -> %.3f (%d windows of %d), saved to %s", before["ppl"], after["ppl"],
                 after["windows"], run.eval_seqlen, saved)
        return FinetuneResult(saved, before["ppl"], after["ppl"], out_record)
    except BaseException:
        work.release()  # as a killed run's lock is: the same command may take the folder over
        raise


@dataclass
class FinetuneRun:
    """What a fine-tuning run works on: the pruned model (on its device, in
    its compute dtype) and the zeros it must keep, the training windows, the
    evaluation windows, and the identity a resumed run must match."""

    model: nn.Module
    tokenizer: object
    record: dict
    targets: list[str]
    storage: torch.dtype
    seqlen: int
    eval_seqlen: int
    windows: Tensor
    eval_ids: Tensor
    eval_windows: int | None
    device: torch.device
    zeros_before: int
    masks_before: dict[str, Tensor]
    identity: dict

    def evaluate(self, model: nn.Module) -> dict:
        from .evaluation.perplexity import perplexity

        return asdict(perplexity(model, self.eval_ids, "wikitext2", max_windows=self.eval_windows, device=self.device))


def _open_run(pruned: Path, cfg: FinetuneConfig, dev: torch.device, docs: list[str], text: str,
              eval_seqlen: int | None, eval_windows: int | None) -> FinetuneRun:
    """Load the pruned model and cut the training and evaluation windows."""
    from .io.data import eval_windows as cut_windows, sample_calibration

    model, tok, record = load_pruned(pruned)
    targets = target_linears(model, record)
    storage = dict(model.named_modules())[targets[0]].weight.dtype
    if dev.type == "cpu" and storage in (torch.float16, torch.bfloat16):
        model = model.to(torch.float32)  # CPU half-precision kernels are slow and poorly supported
    model = model.to(dev)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seqlen = cfg.seqlen or min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)
    check_seqlen(model, seqlen)
    if eval_seqlen is None:
        eval_seqlen = ((record.get("evaluation") or {}).get("wikitext2") or {}).get("seqlen") or min(context or 2048, 2048)
    check_seqlen(model, eval_seqlen)
    windows = sample_calibration(tok, docs, cfg.steps * cfg.batch_size, seqlen, seed=DATA_SEED_OFFSET + cfg.seed)
    ev = cut_windows(tok, text, eval_seqlen, "the WikiText-2 text")
    versions = library_versions()
    identity = {"config": {**cfg.to_dict(), "seqlen": seqlen}, "model": files_digest(weight_files(pruned)),
                "data": tensor_digest(windows), "evaluation": [tensor_digest(ev[:eval_windows]), eval_seqlen],
                "device": dev.type, "versions": [versions.get("torch"), versions.get("transformers"), _peft_version()]}
    return FinetuneRun(model, tok, record, targets, storage, seqlen, eval_seqlen, windows, ev, eval_windows, dev,
                       count_zeros(model, targets), zero_masks(model, targets), identity)


@dataclass
class TrainingProgress:
    """Where training stands: the next step, the losses so far, the seconds
    spent training and the steps a resumed run started from."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)


def train(peft_model: nn.Module, opt: torch.optim.Optimizer, windows: Tensor, cfg: FinetuneConfig,
          dev: torch.device, progress: TrainingProgress, after_step: Callable[[int], None]) -> None:
    """The optimizer steps from ``progress.step`` to ``cfg.steps``: each
    accumulates ``batch_size / micro_batch_size`` micro-batches of the
    step's own windows (so a resumed run sees the same data), then
    ``after_step(steps done)`` (checkpoints, test hooks)."""
    peft_model.train()
    accum = cfg.batch_size // cfg.micro_batch_size
    bar = tqdm(range(progress.step, cfg.steps), desc="finetune", initial=progress.step, total=cfg.steps, disable=None)
    for step in bar:
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for j in range(accum):
            lo = step * cfg.batch_size + j * cfg.micro_batch_size
            ids = windows[lo:lo + cfg.micro_batch_size].to(dev)
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / accum).backward()
            step_loss += float(loss.detach()) / accum
        if not math.isfinite(step_loss):
            raise D2PruneError(f"the training loss became {step_loss} at step {step + 1}: lower --lr (now {cfg.lr})")
        opt.step()
        progress.losses.append(step_loss)
        progress.train_seconds += time.perf_counter() - t_step
        progress.step = step + 1
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_at(cfg, step):.2e}")
        after_step(progress.step)
    bar.close()
    peft_model.eval()


def merge_keeping_zeros(peft_model: nn.Module, storage: torch.dtype, targets: list[str],
                        masks_before: dict[str, Tensor]) -> nn.Module:
    """The merged model, checked to have exactly the pruned model's zeros."""
    merged = merge_masked(peft_model, storage)
    masks_after = zero_masks(merged, targets)
    if any(not torch.equal(masks_before[n], masks_after[n]) for n in targets):
        # cannot happen (merge_masked keeps them), but a model that breaks the promise is never saved
        raise RuntimeError("the merge changed the zero pattern of the pruned layers")
    return merged


def _peft_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("peft")
    except md.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .io.data import windows_arg

    d = FinetuneConfig()
    p.add_argument("pruned", help="a pruned model folder (`d2prune prune --out`, compressed or not, or any causal LM)")
    p.add_argument("--out", required=True, help="folder for the merged fine-tuned model (written atomically)")
    p.add_argument("--data", default=None, help="C4 .jsonl[.gz] to train on (default: ../shared/data, else the hub shard)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps}: the authors' "
                                                              "30,000 windows / 128)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help=f"windows per forward; batch-size / micro-batch-size are accumulated (default {d.micro_batch_size})")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per training window (default: min(1024, context))")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help=f"default {d.lora_dropout}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default {d.lr:g})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"default {d.warmup_steps}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--train-unmasked", action="store_true",
                   help="ablation: plain LoRA in training, the mask applied only when merging")
    p.add_argument("--eval-file", default=None, help="WikiText-2 test .jsonl (default: ../shared/data, else the hub)")
    p.add_argument("--eval-windows", type=windows_arg, default=16,
                   help="first N >= 1 WikiText-2 windows (default 16; all: every window)")
    p.add_argument("--eval-seqlen", type=int, default=None,
                   help="evaluation window length (default: the pruned model's, else its context capped at 2048)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (default 0: never)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the LoRA init, data windows and dropout")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (a d2prune output)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoints and start over")


def main(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                         seqlen=args.seqlen, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                         lora_dropout=args.lora_dropout, lr=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, seed=args.seed, mask_training=not args.train_unmasked)
    res = finetune(args.pruned, args.out, cfg, data=args.data, eval_file=args.eval_file,
                   eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, save_every=args.save_every,
                   device=args.device, overwrite=args.overwrite, restart=args.restart)
    sec = res.record["finetune"]
    print(f"finetune: wikitext2 ppl {res.ppl_before:.3f} -> {res.ppl_after:.3f} "
          f"({sec['evaluation']['after']['windows']} windows), {sec['steps']} steps, {sec['tokens_seen']} tokens, "
          f"loss {sec['loss']['first']:.3f} -> {sec['loss']['last']:.3f}, zeros kept {sec['zeros']['after']}, "
          f"{sec['train_seconds']:.0f}s training -> {res.out}")
    return 0
