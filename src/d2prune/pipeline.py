"""The whole job, as a library function: load -> calibrate -> prune ->
evaluate -> save. The CLI (:mod:`d2prune.cli`) only parses flags into
:class:`DataConfig` / :class:`~d2prune.config.PruneConfig` and calls :func:`run`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .config import PruneConfig, to_dict
from .io.data import EVAL_SETS, calibration_texts, eval_text, eval_windows, heldout_windows, sample_calibration
from .errors import D2PruneError
from .evaluation.perplexity import PerplexityResult, perplexity
from .io.modeling import (check_seqlen, default_seqlen, image_classifier_class, is_image_model, load_model, pick_device,
                       resolve_source)
from .pruning import PruneReport, prune
from .engine import distributed
from .io.experts import experts_modules
from .io.budget import Writes, auto_offload, bytes_under, check_fits, estimate, expert_group_size, side_files_bytes
from .io.source import ActivationStore
from .io.resume import WorkFolder, files_digest, tensor_digest
from .io.save import RECORD_NAME, check_output_dir, library_versions, save_pruned
from .io.streaming import available_ram, open_model, write_sharded

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DataConfig:
    """Calibration and evaluation data. ``None`` files mean: the hub via
    ``datasets`` (C4 shard 00000, WikiText-2 raw test). ``seqlen=None``: the
    model's context, capped at 2048."""

    calib_file: str | None = None
    nsamples: int = 128
    seqlen: int | str | None = None
    seed: int = 0
    eval_file: str | None = None
    c4_eval_file: str | None = None
    eval_windows: int | None = None
    heldout_windows: int = 16
    evaluate: bool = True
    calib_images: str | None = None  # image classifiers: ImageFolder trees instead of text
    eval_images: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.nsamples, int) and self.nsamples > 0):
            raise D2PruneError(f"--nsamples {self.nsamples!r} must be a positive integer (the paper uses 128)")
        if self.seqlen is not None and self.seqlen != "max" and not (isinstance(self.seqlen, int) and self.seqlen > 1):
            raise D2PruneError(f"--seqlen {self.seqlen!r} must be an integer > 1 or max")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise D2PruneError(f"--eval-windows {self.eval_windows} must be >= 1")
        if not (isinstance(self.heldout_windows, int) and self.heldout_windows >= 1):
            raise D2PruneError(f"--heldout-windows {self.heldout_windows!r} must be an integer >= 1")


def calibration_for(tokenizer, data: DataConfig, seqlen: int, with_heldout: bool = False,
                    docs: list[str] | None = None):
    """``(calibration [N, L], heldout [H, L] or None)``; held-out windows come
    from calibration documents that no sample was drawn from (file order).
    ``docs``: the calibration documents if already read (before the model loads)."""
    docs = calibration_texts(data.calib_file) if docs is None else docs
    used: set[int] = set()
    calib = sample_calibration(tokenizer, docs, data.nsamples, seqlen, data.seed, used)
    heldout = heldout_windows(tokenizer, docs, used, data.heldout_windows, seqlen) if with_heldout else None
    return calib, heldout


def needs_heldout(config: PruneConfig) -> bool:
    return config.method.needs_heldout


def eval_texts(data: DataConfig) -> dict[str, str]:
    """The evaluation texts (WikiText-2 always; C4 validation when a file is
    given), read before any pruning so a bad file fails in seconds."""
    sets = [("wikitext2", data.eval_file)] + ([("c4", data.c4_eval_file)] if data.c4_eval_file else [])
    return {name: eval_text(name, path) for name, path in sets}


def eval_window_sets(tokenizer, texts: dict[str, str], seqlen: int) -> dict[str, torch.Tensor]:
    """Each evaluation text as windows of ``seqlen`` tokens; computed right
    after the tokenizer loads, so a text shorter than ``--seqlen`` fails before
    any pruning, not after it."""
    out = {}
    for name, text in texts.items():
        windows = eval_windows(tokenizer, text, seqlen, what=f"the {name} evaluation text")
        out[name] = windows[:EVAL_SETS[name].max_windows]  # C4: SparseGPT's first 256 windows
    return out


def evaluate_ppl(model, tokenizer, data: DataConfig, seqlen: int, device=None,
                 texts: dict[str, str] | None = None, source=None,
                 windows: dict[str, torch.Tensor] | None = None) -> dict[str, PerplexityResult]:
    """Perplexity on each of :func:`eval_texts` (or on ``windows`` from :func:`eval_window_sets`)."""
    if windows is None:
        windows = eval_window_sets(tokenizer, texts if texts is not None else eval_texts(data), seqlen)
    out = {}
    for name, ids in windows.items():
        out[name] = perplexity(model, ids, name, data.eval_windows, device, source=source)
        log.info("%s", out[name])
    return out


SAVE_FORMATS = ("same", "dense", "bf16", "compressed")


@dataclass(frozen=True)
class OutputConfig:
    """Where the pruned model goes: ``out`` (None: nowhere, only the record is
    returned), whether an existing d2prune output there may be replaced, and
    the format (``same``: the input's: an FP8 / MXFP4 input re-quantized into
    its own format (docs/quantized.md §4), any other ``dense``; ``dense``:
    ``save_pretrained``'s float layout; ``bf16``: ``dense`` of bf16 weights;
    ``compressed``: :mod:`d2prune.deploy.compress`, bitmask / N:M indices + values)."""

    out: str | None = None
    overwrite: bool = False
    save_format: str = "same"

    def __post_init__(self) -> None:
        if self.save_format not in SAVE_FORMATS:
            raise D2PruneError(f"unknown save format {self.save_format!r}: use one of {', '.join(SAVE_FORMATS)}")


@dataclass(frozen=True)
class RunOptions:
    """How a run uses the machine: the storage ``dtype``; ``stream``: blocks
    read from disk one at a time (``on``), the model in memory (``off``) or
    decided from its size (``auto``); where the activations live
    (``offload``: None = decided from the memory estimate); ``restart``:
    discard an interrupted run's work folder instead of resuming it."""

    dtype: str = "auto"
    stream: str = "auto"
    offload: str | None = None
    restart: bool = False
    expert_group: int | str = "auto"  # streamed MoE blocks: experts per group (auto: only when a block does not fit)


@dataclass
class RunInputs:
    """What a run reads before the model loads (so a typo never costs a
    load): the evaluation texts and calibration documents, or an image
    classifier's folders."""

    images: bool
    texts: dict[str, str] = field(default_factory=dict)
    docs: list[str] = field(default_factory=list)
    folders: dict = field(default_factory=dict)


@dataclass
class Calibration:
    """The calibration samples (token ids, or pixels), the held-out ones a
    search scores on, and the evaluation windows cut at the same ``seqlen``."""

    seqlen: int
    calib: torch.Tensor
    heldout: torch.Tensor | None = None
    heldout_labels: torch.Tensor | None = None
    windows: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.calib.shape[0] + (0 if self.heldout is None else self.heldout.shape[0])


def run(model_name: str | None, config: PruneConfig, data: DataConfig, output: OutputConfig = OutputConfig(),
        options: RunOptions = RunOptions(), zero_shot: dict | None = None) -> dict:
    """Prune ``model_name`` with ``config`` and return the d2prune.json record
    (also written to ``output.out`` with the model, when given). With an
    output folder every finished block is saved in a work folder beside it,
    and the same command resumes an interrupted run (docs/scale.md §3).

    The steps: every option and data file checked -> the device resolved
    (once, handed down) -> the model opened -> calibration data -> memory plan
    (estimate, offload, refusal) -> work folder -> prune -> evaluate -> save."""
    t0 = time.perf_counter()
    inputs = _read_inputs(model_name, config, data, output, zero_shot)
    if distributed.launched():  # torchrun: this process's device, and the process group joined
        config = replace(config, device=distributed.init(config.device))
    device = pick_device(config.device)
    config = replace(config, device=str(device))  # resolved once: prune() and evaluation get this device
    opened = _open(model_name, options, device, inputs, zero_shot)
    _check_save_format(opened, output)
    cal = _calibration(opened, config, data, inputs)
    budget, offload = _plan_memory(opened, config, data, cal, device, options, output)
    work = _work_folder(opened, config, cal, options, output, offload)
    private = _place_activations(opened, offload, work)
    calib, heldout = distributed.shard(cal.calib), distributed.shard(cal.heldout)  # torchrun: this process's samples
    try:
        report: PruneReport = prune(opened.model, config, calib, heldout, source=opened.source, work=work,
                                    heldout_labels=distributed.shard(cal.heldout_labels))
        if not distributed.is_main():  # rank 0 evaluates and saves; the others are done
            if work is not None:
                work.remove()  # only what is this process's own (a temporary folder); rank 0's stays with rank 0
            return {"rank": distributed.rank(), "sparsity": report.sparsity}
        record = _evaluate(opened, config, data, inputs, cal, report, budget, device, zero_shot)
        record["total_seconds"] = time.perf_counter() - t0
        if output.out is not None:
            _save(opened, record, output, work)
    except BaseException:
        if work is not None and output.out is None:  # a temporary work folder cannot be resumed: nothing to keep
            work.remove()
        elif work is not None:
            work.release()  # unlocked (as a killed process's is): the next run on this --out may take it over
        raise  # with --out the work folder stays: the same command resumes
    finally:
        distributed.finish()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    if work is not None:
        work.remove()
    return record


def _read_inputs(model_name: str | None, config: PruneConfig, data: DataConfig, output: OutputConfig,
                 zero_shot: dict | None) -> RunInputs:
    """Every option and data file that can be checked, checked before the (long) prune."""
    if output.out is not None:
        check_output_dir(output.out, output.overwrite)
    if zero_shot is not None:
        from .evaluation.zeroshot import check_zero_shot

        check_zero_shot(**zero_shot)
    images = data.calib_images is not None
    if not images and image_classifier_class(resolve_source(model_name)):  # before any text is read
        raise D2PruneError(f"{model_name} is an image classifier: calibrate it on images with --calib-images DIR")
    if images:  # an image classifier: ImageFolder trees, listed (and checked) before the model loads
        return RunInputs(True, folders=_image_folders(data, zero_shot))
    # every data file is read (and validated) before the model loads
    return RunInputs(False, texts=eval_texts(data) if data.evaluate else {}, docs=calibration_texts(data.calib_file))


def _open(model_name: str | None, options: RunOptions, device: torch.device, inputs: RunInputs,
          zero_shot: dict | None):
    """The model, in memory or streamed (:func:`d2prune.io.streaming.open_model`), checked against the data."""
    opened = open_model(model_name, options.dtype, device, options.stream)
    if is_image_model(opened.model) != inputs.images:
        raise D2PruneError(f"{opened.description} is an image classifier: calibrate it on images with --calib-images DIR"
                           if not inputs.images else f"--calib-images is for image classifiers; {opened.description} "
                           "is a language model: calibrate it on text (--calib-file)")
    if zero_shot is not None and opened.streamed:
        raise D2PruneError("zero-shot evaluation needs the whole model in memory: drop --zero-shot (evaluate the "
                           "saved folder with d2prune eval where it fits) or use --stream off")
    if isinstance(options.expert_group, int):
        if not opened.streamed:
            raise D2PruneError(f"--expert-group {options.expert_group} reads a block's experts from disk a group at a "
                               f"time: it needs --stream on ({opened.description} is loaded in memory)")
        opened.source.expert_group = options.expert_group
    return opened


def _check_save_format(opened, output: OutputConfig) -> None:
    """``--save-format bf16`` writes the weights in the dtype they are pruned
    in: refused before any pruning when that is not bf16."""
    if output.out is not None and output.save_format == "bf16" and opened.storage_dtype != torch.bfloat16:
        dtype = str(opened.storage_dtype).removeprefix("torch.")
        raise D2PruneError(f"--save-format bf16: {opened.description} is pruned in {dtype}; pass --dtype bfloat16 "
                           f"to prune and write it in bf16, or --save-format dense to write {dtype}")


def requantizes(opened, output: OutputConfig) -> bool:
    """The output is written re-quantized into the input's format (``same`` on an FP8 / MXFP4 input)."""
    return output.save_format == "same" and getattr(opened, "quantization", None) is not None


def _calibration(opened, config: PruneConfig, data: DataConfig, inputs: RunInputs) -> Calibration:
    """Calibration samples (and held-out ones for a search), and the evaluation
    windows, right after the model loads (a text shorter than ``--seqlen`` fails here)."""
    model, tokenizer = opened.model, opened.tokenizer
    if inputs.images:
        from .evaluation.vision import calibration_images, tokens_per_image

        cal = calibration_images(model, tokenizer, inputs.folders["calib"], data.nsamples, data.seed,
                                 data.heldout_windows if needs_heldout(config) else 0)
        return Calibration(tokens_per_image(model), cal.pixels, cal.heldout, cal.heldout_labels)
    seqlen = seqlen_for(model, data.seqlen)
    check_seqlen(model, seqlen)
    windows = eval_window_sets(tokenizer, inputs.texts, seqlen)
    calib, heldout = calibration_for(tokenizer, data, seqlen, needs_heldout(config), inputs.docs)
    return Calibration(seqlen, calib, heldout, None, windows)


def _plan_memory(opened, config: PruneConfig, data: DataConfig, cal: Calibration, device: torch.device,
                 options: RunOptions, output: OutputConfig):
    """The memory estimate (docs/scale.md §2), the activations offloaded when
    the device would run out otherwise, and a run that cannot fit refused now."""
    # an OBS-style method holds a Hessian and its inverse factor; the per-layer error alone reads a Hessian
    hessians = 2 if config.method.uses_hessian else 1 if config.layer_error else 0
    out = output.out
    writes = Writes(out=out is not None, block_copies=config.method.block_copies,
                    compressed=config.sparsity if output.save_format == "compressed" else None,
                    # streamed and re-quantized: the output is the input's size (converted as it is written)
                    requantized=sum(f.stat().st_size for f in opened.files)
                    if requantizes(opened, output) and opened.streamed else None,
                    side_bytes=side_files_bytes(opened.files) if out is not None else 0,
                    eval_samples=sum(min(len(w), data.eval_windows or len(w)) for w in cal.windows.values()))
    args = (opened, cal.samples, cal.seqlen, device, hessians, config.method.activation_buffers)
    whole = config.method.whole_model_bytes_per_weight
    offload = options.offload
    budget = estimate(*args, offload, whole, writes)
    if offload is None:
        offload = auto_offload(budget, device, available_ram())
        if offload is not None:
            log.info("activations (%.2f GB) offloaded to %s: the device would run out of memory otherwise",
                     budget.activations / 1e9, "host RAM" if offload == "cpu" else "memory-mapped files")
            budget = estimate(*args, offload, whole, writes)
    ram = available_ram()
    has_experts = any(experts_modules(b) for b in opened.source.blocks.layers)
    if options.expert_group == "auto" and opened.streamed and max(budget.block, budget.host_ram) > ram:
        # a block larger than RAM: its experts read, pruned and written in groups (docs/moe.md §4)
        def fits(g: int) -> bool:
            opened.source.expert_group = g
            b = estimate(*args, offload, whole, writes)
            return max(b.block, b.host_ram) <= ram

        group = expert_group_size(opened, fits)
        opened.source.expert_group = group or (1 if has_experts else None)  # not even one: refused below, as such
        if opened.source.expert_group is not None:
            budget = estimate(*args, offload, whole, writes)
        if group is not None:
            log.info("one block does not fit in RAM whole: its experts are read, pruned and written %d at a time "
                     "(--expert-group)", group)
    # an interrupted run's work folder is already on disk (and resumed, or removed by --restart)
    held = bytes_under(WorkFolder(out, {}).path) if out is not None else 0
    group = getattr(opened.source, "expert_group", None)
    experts = (f", with its experts read {group} at a time (--expert-group)" if group else
               "; --stream on would read its experts in groups" if has_experts and not opened.streamed else "")
    check_fits(budget, device, out, ram, opened.streamed, held, experts)
    return budget, offload


def _work_folder(opened, config: PruneConfig, cal: Calibration, options: RunOptions, output: OutputConfig,
                 offload: str | None) -> WorkFolder | None:
    """The resume folder beside ``--out`` (or a temporary one where a run needs
    scratch space: streamed blocks, activations on disk), with the identity a
    resumed run must match."""
    if output.out is None and not opened.streamed and offload != "disk":
        return None
    identity = {"model": opened.description, "model_files": files_digest(opened.files) if opened.files else "",
                "config": to_dict(config), "calibration": tensor_digest(cal.calib),
                "heldout": tensor_digest(cal.heldout) if cal.heldout is not None else "",
                "dtype": str(opened.storage_dtype), "compute_dtype": str(opened.source.compute_dtype),
                # a torchrun job's statistics are merged over its processes: resumed by as many
                "world_size": distributed.world(),
                "versions": {k: v for k, v in library_versions().items() if k in ("torch", "transformers", "d2prune")}}
    main = output.out is None or distributed.is_main()  # in a torchrun job rank 0 writes, the others read its folder
    if output.out is not None:
        return WorkFolder(output.out, identity, options.restart, writer=main)
    return WorkFolder.temporary("d2prune-", identity, writer=main)


def _place_activations(opened, offload: str | None, work: WorkFolder | None) -> Path | None:
    """Where the activations live; returns a scratch folder of this process
    alone (another rank of a torchrun job) that the caller removes at the end."""
    if offload is None:
        return None
    private = scratch = None  # host RAM needs no folder (and a run without --out may have no work folder)
    if offload == "disk":  # files: beside the output in the work folder (a temporary one without --out)
        if not work.writer:
            private = Path(tempfile.mkdtemp(prefix="d2prune-act-"))
        scratch = (private or work.ensure()) / "activations"
    opened.source.activations = ActivationStore(offload, scratch)
    return private


def _evaluate(opened, config: PruneConfig, data: DataConfig, inputs: RunInputs, cal: Calibration,
              report: PruneReport, budget, device: torch.device, zero_shot: dict | None) -> dict:
    """Perplexity (or an image classifier's accuracy) and zero-shot accuracy of
    the pruned model, in the d2prune.json record."""
    model, tokenizer = opened.model, opened.tokenizer
    if inputs.images:
        results = _evaluate_images(model, tokenizer, inputs.folders.get("eval"), data, device, opened.source)
    else:
        results = evaluate_ppl(model, tokenizer, data, cal.seqlen, device, source=opened.source,
                               windows=cal.windows) if data.evaluate else {}
    zs = None
    if zero_shot is not None:
        from .evaluation.zeroshot import evaluate_zero_shot

        zs = evaluate_zero_shot(model, tokenizer, device=str(device), **zero_shot).to_dict()
    return _record(opened, config, data, cal.seqlen, report, results, zs, budget)


def _save(opened, record: dict, output: OutputConfig, work: WorkFolder | None) -> None:
    """The output folder, written atomically: a streamed model's blocks come
    from the work folder's shards; ``compressed`` re-encodes the sparse matrices."""
    model = opened.model
    writer = None
    requant = _requantizer(opened) if requantizes(opened, output) else None
    if opened.streamed:
        shards = [work.block_path(i) for i in range(len(opened.source.blocks))]
        writer = lambda folder: write_sharded(model, opened.reader, shards, folder, opened.storage_dtype,  # noqa: E731
                                              requant)
    if requant is not None:
        writer = _requantizing(writer, model, requant, record)
    if output.save_format == "compressed":
        from .deploy.compress import compressing

        writer = compressing(writer or (lambda folder: model.save_pretrained(folder, safe_serialization=True)), record)
    path = save_pruned(model, opened.tokenizer, output.out, record, output.overwrite, write_weights=writer)
    log.info("saved pruned model to %s", path)


def _requantizer(opened):
    """The :class:`~d2prune.io.quantized.Requantizer` of the input checkpoint (its shard headers)."""
    from .io.streaming import requantizer_for

    log.info("writing the pruned model in the input's format, %s, with scales computed from the pruned weights",
             opened.quantization.describe())
    return requantizer_for(opened.folder, opened.quantization)


def _requantizing(writer, model, requant, record: dict):
    """A ``write_weights(folder)`` writing the output re-quantized
    (docs/quantized.md §4): streamed, ``writer`` converts as it writes; in
    memory, ``save_pretrained``'s float shards are converted one at a time.
    ``config.json`` keeps the input's ``quantization_config``; ``record``
    gains ``requantization`` and each pruned layer's ``requant_error``."""
    from .io.streaming import keep_quantization_config, requantize_folder

    def write(folder: Path) -> None:
        if writer is not None:
            writer(folder)
        else:
            model.save_pretrained(folder, safe_serialization=True)
            requantize_folder(folder, requant)
        keep_quantization_config(folder, requant.quant.config)
        record["requantization"] = requant.report()
        for row in record.get("layers", []):
            row["requant_error"] = requant.error_of(row["name"])

    return write


def _image_folders(data: DataConfig, zero_shot: dict | None) -> dict:
    """The calibration (and evaluation) ImageFolder trees of an image classifier."""
    from .evaluation.vision import image_folder

    given = [f for f, v in (("--calib-file", data.calib_file), ("--eval-file", data.eval_file),
                            ("--c4-eval-file", data.c4_eval_file), ("--seqlen", data.seqlen)) if v is not None]
    if given or zero_shot is not None:
        raise D2PruneError(f"{', '.join(given) or '--zero-shot'} is for language models; an image classifier "
                           "takes --calib-images and --eval-images")
    folders = {"calib": image_folder(data.calib_images, "--calib-images")}
    if data.evaluate and data.eval_images:
        folders["eval"] = image_folder(data.eval_images, "--eval-images")
    elif data.evaluate:
        log.warning("no --eval-images: the pruned image classifier is not evaluated")
    return folders


def _evaluate_images(model, processor, folder, data: DataConfig, device, source) -> dict:
    from .evaluation.vision import evaluate_images

    return {} if folder is None else {"images": evaluate_images(model, processor, folder, data.eval_windows, device,
                                                                source)}


def seqlen_for(model, seqlen: int | str | None) -> int:
    """``None``: the model's context capped at 2048 (SparseGPT's protocol);
    ``"max"``: the full ``max_position_embeddings`` (the authors' and Wanda's)."""
    if seqlen == "max":
        return default_seqlen(model, cap=None)
    return seqlen or default_seqlen(model)


def _record(opened, config: PruneConfig, data: DataConfig, seqlen: int, report: PruneReport, results: dict, zs,
            budget) -> dict:
    return {
        "model": opened.description,
        "config": to_dict(config),
        "data": {**asdict(data), "seqlen": seqlen},
        "versions": library_versions(),
        "sparsity": report.sparsity,  # over the pruned layers; overall_sparsity: every 2+-D block weight
        "overall_sparsity": report.overall_sparsity,
        "unpruned": report.unpruned,
        "dropped_experts": report.dropped_experts,  # whole experts removed per MoE layer, with their scores  # block tensors left as they are, with their reasons (io/inventory.py)
        "prune_seconds": report.seconds,
        "method_summary": report.method,
        "layers": [to_dict(r) for r in report.layers],
        "evaluation": {k: asdict(v) for k, v in results.items()},
        "zero_shot": zs,
        "memory": {"streamed": opened.streamed, "storage_dtype": str(opened.storage_dtype).removeprefix("torch."),
                   "compute_dtype": str(opened.source.compute_dtype or opened.storage_dtype).removeprefix("torch."),
                   "estimate": budget.to_dict(), "resumed_from_block": report.resumed_from,
                   "offload_activations": opened.source.activations.kind,
                   # experts per group where a block's MoE experts were read in groups (docs/moe.md §4), else null
                   "expert_group": getattr(opened.source, "expert_group", None)},
    }


def resolve_dtype(dtype: str, device: str | None) -> str:
    """``auto`` = the checkpoint's dtype, except on a CPU where half precision
    is slow and poorly supported: fp32 there (statistics are fp32 either way)."""
    if dtype in (None, "auto") and pick_device(device).type == "cpu":
        return "float32"
    return dtype


def _eval_expert_group(opened, seqlen: int, device: torch.device) -> None:
    """A streamed model whose blocks do not fit in RAM whole is evaluated with
    its MoE experts read in groups, the largest that fit (docs/moe.md §4)."""
    ram = available_ram()

    def fits(g: int | None) -> bool:
        opened.source.expert_group = g
        b = estimate(opened, 1, seqlen, device, 0)
        return max(b.block, b.host_ram) <= ram

    if not fits(None):
        opened.source.expert_group = expert_group_size(opened, fits)
        if opened.source.expert_group:
            log.info("one block does not fit in RAM whole: its experts are read %d at a time",
                     opened.source.expert_group)


def evaluate_model(model_name: str | None, zero_shot: dict | None, dtype: str = "auto", device: str | None = None,
                   ppl: bool = False, eval_file: str | None = None, seqlen: int | str | None = None,
                   eval_windows: int | None = None, eval_images: str | None = None) -> dict:
    """Zero-shot accuracy (``zero_shot``: :func:`~d2prune.evaluation.zeroshot.evaluate_zero_shot`
    options; None skips it) and/or WikiText-2 perplexity (``ppl``) of a model or
    pruned folder. Every option and file is checked before the model loads,
    the evaluation text's length right after (before the long zero-shot run)."""
    from .evaluation.zeroshot import check_zero_shot, evaluate_zero_shot

    if eval_images is not None:
        return _evaluate_image_model(model_name, eval_images, dtype, device, eval_windows, zero_shot, ppl)
    if zero_shot is None and not ppl:
        raise D2PruneError("nothing to evaluate: ask for zero-shot accuracy and/or --ppl")
    if zero_shot is not None:
        check_zero_shot(**zero_shot)
    data = DataConfig(eval_file=eval_file, eval_windows=eval_windows)
    texts = eval_texts(data) if ppl else {}
    if zero_shot is None:  # perplexity alone runs block by block, streamed from disk when the model does not fit
        opened = open_model(model_name, dtype, pick_device(device), "auto")
        model, tokenizer, description, source = opened.model, opened.tokenizer, opened.description, opened.source
    else:  # lm-eval needs the whole model
        model, tokenizer, src = load_model(model_name, dtype=resolve_dtype(dtype, device))
        description, source = src.describe(), None
    seqlen = seqlen_for(model, seqlen)
    if source is not None and opened.streamed:
        _eval_expert_group(opened, seqlen, pick_device(device))
    windows = None
    if ppl:
        check_seqlen(model, seqlen)
        windows = eval_window_sets(tokenizer, texts, seqlen)
    out: dict = {"model": description, "versions": library_versions()}
    if zero_shot is not None:
        out["zero_shot"] = evaluate_zero_shot(model, tokenizer, device=device, **zero_shot).to_dict()
    if ppl:
        res = evaluate_ppl(model, tokenizer, data, seqlen, device, source=source, windows=windows)
        out["ppl"] = asdict(res["wikitext2"])
    return out


def _evaluate_image_model(model_name: str | None, eval_images: str, dtype: str, device: str | None,
                          eval_windows: int | None, zero_shot: dict | None, ppl: bool) -> dict:
    """``d2prune eval --eval-images DIR``: an image classifier's accuracy."""
    from .evaluation.vision import evaluate_images, image_folder

    if zero_shot is not None or ppl:
        raise D2PruneError("--eval-images measures an image classifier's accuracy; zero-shot tasks and --ppl are for "
                           "language models: drop them")
    folder = image_folder(eval_images, "--eval-images")
    model, processor, src = load_model(model_name, dtype=resolve_dtype(dtype, device))
    if not is_image_model(model):
        raise D2PruneError(f"--eval-images needs an image classifier; {src.describe()} is a language model")
    return {"model": src.describe(), "versions": library_versions(),
            "images": asdict(evaluate_images(model, processor, folder, eval_windows, device))}


def diagnose(dense_name: str | None, pruned_dir: str, text_file: str | None = None, seqlen: int | None = None,
             windows: int = 8, device: str | None = None, plot_path: str | None = None,
             json_path: str | None = None, images: str | None = None) -> dict:
    """Attention KL / RMSE of a pruned folder against its dense model, on the
    first ``windows`` WikiText-2 windows (not calibration text); for an image
    classifier on the first ``windows`` images of ``images`` (an ImageFolder
    tree; default: the folder the pruned model was evaluated on)."""
    import json
    from pathlib import Path

    from .evaluation.diagnostics import attention_diff, format_table, plot, summarize

    if not (isinstance(windows, int) and windows >= 1):
        raise D2PruneError(f"--windows {windows!r} must be an integer >= 1")
    folder = Path(pruned_dir)
    plot_path = plot_path or (str(folder / "attention.png") if folder.is_dir() else "attention.png")
    json_path = json_path or (str(folder / "attention.json") if folder.is_dir() else "attention.json")
    for p in (plot_path, json_path):
        if not Path(p).absolute().parent.is_dir():
            raise D2PruneError(f"the folder of {p} does not exist: create it or choose another --plot / --json")
    images = images or _recorded(folder, "eval_images") or _recorded(folder, "calib_images")
    if images is None:
        text_file = text_file or _default_eval_file(folder)
        text = eval_text("wikitext2", text_file)
    dev = pick_device(device)
    dense, tok, src = load_model(dense_name, dtype=resolve_dtype("auto", device))
    pruned, _, psrc = load_model(pruned_dir, dtype=resolve_dtype("auto", device))
    if is_image_model(dense):
        from .evaluation.vision import image_folder, pixel_values

        if images is None:
            raise D2PruneError(f"{src.describe()} is an image classifier: give --images DIR (an ImageFolder tree)")
        ids = pixel_values(tok, image_folder(images, "--images").paths[:windows])
        data = {"images": images, "seqlen": None}
    else:
        if images is not None and text_file is None:
            text_file = _default_eval_file(folder)
        text = eval_text("wikitext2", text_file) if images is not None else text
        seqlen = seqlen or default_seqlen(dense)
        check_seqlen(dense, seqlen)
        ids = eval_windows(tok, text, seqlen)[:windows]
        data = {"seqlen": seqlen, "eval_file": text_file}
    rows = attention_diff(dense, pruned, ids, dev)
    result = {"dense": src.describe(), "pruned": psrc.describe(), "windows": int(ids.shape[0]), **data,
              **summarize(rows), "table": format_table(rows)}
    plot(rows, plot_path, f"{psrc.describe()} vs dense")
    Path(json_path).write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2) + "\n")
    log.info("wrote %s and %s", plot_path, json_path)
    return result


def _recorded(pruned_dir, key: str) -> str | None:
    """A data path from the pruned folder's d2prune.json, if it still exists."""
    import json

    record = Path(pruned_dir) / RECORD_NAME
    try:
        value = json.loads(record.read_text()).get("data", {}).get(key) if record.is_file() else None
    except (ValueError, AttributeError, OSError):
        return None
    return value if value and Path(value).exists() else None


def _default_eval_file(pruned_dir) -> str | None:
    """WikiText-2 for ``diagnose`` when no --eval-file is given: the file the
    pruned folder was evaluated on (its d2prune.json), else ``../shared/data``
    / ``$D2PRUNE_DATA``, else ``None`` (the hub)."""
    import json
    from pathlib import Path

    from .io.data import SHARED_WIKI, find_shared_data

    record = Path(pruned_dir) / RECORD_NAME
    if record.is_file():
        try:
            f = json.loads(record.read_text()).get("data", {}).get("eval_file")
        except (ValueError, AttributeError):
            f = None
        if f and Path(f).is_file():
            return f
    shared = find_shared_data()
    if shared and (shared / SHARED_WIKI).is_file():
        return str(shared / SHARED_WIKI)
    return None
