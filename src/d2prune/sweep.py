"""``d2prune sweep``: a grid of models x methods x sparsities, resumable.

Each model is loaded once and its calibration samples (and held-out windows),
evaluation windows and dense results are computed once; every cell prunes a
fresh copy of the dense weights. A finished cell is appended to
``results.csv`` (flushed and fsynced) before the next starts, so a sweep that
is killed and restarted skips every finished cell and ends with the same
table. ``sweep.json`` records every setting that changes a cell's numbers
(seed, data files by content hash, windows, dtype, versions...); a rerun
under other settings is refused, naming each difference, while adding models,
methods or sparsities simply adds cells. From the CSV alone: ``results.md`` (the paper's layout: rows =
sparsity x method, columns = models) and PNG plots (perplexity vs sparsity,
log scale; zero-shot mean vs sparsity).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import MethodConfig, PruneConfig, Sparsity, method_label, parse_method_spec
from .io.data import C4_TRAIN, WIKITEXT2_TEST, calibration_texts, eval_text, eval_windows
from .errors import D2PruneError
from .evaluation.perplexity import perplexity
from .io.modeling import check_seqlen, load_model
from .pipeline import DataConfig, calibration_for, resolve_dtype, seqlen_for
from .io.save import library_versions
from .pruning import prune

log = logging.getLogger(__name__)

FIELDS = ["model", "method", "sparsity", "achieved", "ppl", "ppl_windows", "prune_seconds", "zero_shot_mean",
          "zero_shot", "attn_kl", "attn_rmse", "chosen", "nsamples", "seqlen", "limit"]


def split_methods(text: str) -> list[MethodConfig]:
    """``"wanda,d2prune:frozen=k,variant=paper,sparsegpt"``: a comma after a
    ``key=value`` continues the previous method's options."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    if not specs:
        raise D2PruneError("--methods is empty: give e.g. magnitude,wanda,sparsegpt")
    return [parse_method_spec(s) for s in specs]


def split_sparsities(text: str) -> list[Sparsity]:
    out = [Sparsity.parse(p) for p in (x.strip() for x in text.split(",")) if p]
    if not out:
        raise D2PruneError("--sparsities is empty: give e.g. 0.5,0.7,2:4")
    return out


@dataclass
class SweepConfig:
    models: list[str | None]
    methods: list[MethodConfig]
    sparsities: list[Sparsity]
    data: DataConfig
    out: str
    device: str | None = None
    zero_shot: dict | None = None  # evaluate_zero_shot options, or None
    diagnose_windows: int = 0      # >0: attention KL / RMSE vs dense on that many eval windows
    max_cells: int | None = None   # stop after this many new cells (to test resuming)
    dtype: str = "auto"
    model_labels: dict = field(default_factory=dict)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())


def model_label(name: str | None) -> str:
    return "SmolLM2-135M-Instruct" if name is None else Path(name).name.removesuffix(".gguf") or name


def run_sweep(cfg: SweepConfig) -> list[dict]:
    if cfg.zero_shot is not None:  # before any work: a typo must not surface after the first prune
        from .evaluation.zeroshot import check_zero_shot

        check_zero_shot(**cfg.zero_shot)
    # the data files are read (and validated) once, before any model loads
    docs = calibration_texts(cfg.data.calib_file)
    wiki = eval_text("wikitext2", cfg.data.eval_file)
    out = Path(cfg.out)
    csv_path = out / "results.csv"
    existing = read_rows(csv_path)
    settings = sweep_settings(cfg)
    check_resumable(out, settings, existing)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise D2PruneError(f"cannot create the sweep folder {out}: {e.strerror or e}: choose another --out") from e
    write_sweep_record(out, cfg, settings)
    done = {(r["model"], r["method"], r["sparsity"]) for r in existing}
    new_cells = 0
    for model_name in cfg.models:
        label = cfg.model_labels.get(model_name) or model_label(model_name)
        cells = [(m, s) for s in cfg.sparsities for m in cfg.methods if (label, method_label(m), str(s)) not in done]
        need_dense = (label, "dense", "0") not in done
        if not cells and not need_dense:
            log.info("%s: every cell already done", label)
            continue
        dense, tok, _ = load_model(model_name, dtype=resolve_dtype(cfg.dtype, cfg.device))
        seqlen = seqlen_for(dense, cfg.data.seqlen)
        check_seqlen(dense, seqlen)
        windows = eval_windows(tok, wiki, seqlen, what="the wikitext2 evaluation text")
        need_held = any(m.needs_heldout for m, _ in cells)
        calib, held = calibration_for(tok, cfg.data, seqlen, need_held, docs)
        common = {"model": label, "nsamples": cfg.data.nsamples, "seqlen": seqlen,
                  "limit": (cfg.zero_shot or {}).get("limit", "")}
        if need_dense:
            row = {**common, "method": "dense", "sparsity": "0", "achieved": 0.0, **_evaluate(dense, tok, windows, cfg)}
            _append(csv_path, row)
            done.add((label, "dense", "0"))
        for m, s in cells:
            if cfg.max_cells is not None and new_cells >= cfg.max_cells:
                log.warning("stopping after %d new cells (--max-cells)", new_cells)
                return read_rows(csv_path)
            name = method_label(m)
            log.info("%s | %s | %s", label, name, s)
            model = copy.deepcopy(dense)
            report = prune(model, PruneConfig(method=m, sparsity=s, device=cfg.device), calib, held)
            row = {**common, "method": name, "sparsity": str(s), "achieved": round(report.sparsity, 6),
                   "prune_seconds": round(report.seconds, 3), "chosen": report.method.get("chosen", ""),
                   **_evaluate(model, tok, windows, cfg, dense)}
            _append(csv_path, row)
            done.add((label, name, str(s)))
            new_cells += 1
            del model
    rows = read_rows(csv_path)
    write_outputs(rows, out, cfg)
    return rows


# --------------------------------------------------------------------------- settings record (sweep.json)
RECORD = "sweep.json"
VERSIONED = ("d2prune", "torch", "transformers")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_source(path: str | None, hub: tuple) -> dict:
    """A data file by path and content hash (the content is what matters: a
    moved copy is the same data, an edited file is not); the hub source otherwise."""
    if not path:
        repo, name, files, split = hub
        return {"hub": " ".join(str(x) for x in (repo, name, *(files or {}).values(), split) if x)}
    return {"path": str(path), "sha256": sha256_file(Path(path).expanduser())}


def sweep_settings(cfg: SweepConfig) -> dict:
    """Every setting that changes a cell's numbers, as recorded in sweep.json.
    The grid (models, methods, sparsities) is not among them: it may grow."""
    d = cfg.data
    zs = cfg.zero_shot
    versions = library_versions()
    return {
        "seed": d.seed, "nsamples": d.nsamples, "seqlen": d.seqlen, "heldout_windows": d.heldout_windows,
        "eval_windows": d.eval_windows,
        "calib_file": _data_source(d.calib_file, C4_TRAIN), "eval_file": _data_source(d.eval_file, WIKITEXT2_TEST),
        "zero_shot": None if zs is None else {k: zs.get(k) for k in ("tasks", "limit", "task_data")},
        "diagnose_windows": cfg.diagnose_windows,
        "dtype": resolve_dtype(cfg.dtype, cfg.device),
        **{f"{name} version": versions.get(name) for name in VERSIONED},
    }


# what an unset (None) setting means, for messages
_UNSET = {"zero_shot": "off", "seqlen": "default", "eval_windows": "all", "tasks": "default", "limit": "none",
          "task_data": "default"}


def _show(value, key: str = "") -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['path']} (sha256 {value['sha256'][:12]})"
    if isinstance(value, dict) and "hub" in value:
        return f"the hub's {value['hub']}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_show(v, k)}" for k, v in value.items()) + "}"
    return _UNSET.get(key, "none") if value is None else str(value)


def _same(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict) and ("sha256" in old or "sha256" in new):
        return old.get("sha256") == new.get("sha256") and old.get("hub") == new.get("hub")
    return old == new


def check_resumable(out: Path, settings: dict, rows: list[dict]) -> None:
    """A sweep folder with results is resumed only under the settings they were
    made with; otherwise one line naming each difference. Nothing is written."""
    if not rows:
        return  # no cell yet: nothing to mix
    try:
        recorded = json.loads((out / RECORD).read_text())["settings"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise D2PruneError(f"sweep {out} has results but no record of the settings they were made with "
                           f"({RECORD}, written since d2prune 0.1): use another --out") from None
    settings = json.loads(json.dumps(settings, default=str))  # as it would read back from the file
    keys = [k for k in dict.fromkeys([*recorded, *settings]) if not _same(recorded.get(k), settings.get(k))]
    if keys:
        was = ", ".join(f"{k}={_show(recorded.get(k), k)}" for k in keys)
        now = ", ".join(f"{k}={_show(settings.get(k), k)}" for k in keys)
        raise D2PruneError(f"sweep {out} was made with {was}; this run asks {now}: use another --out "
                           "(adding models, methods or sparsities is fine, changing these is not)")


def write_sweep_record(out: Path, cfg: SweepConfig, settings: dict) -> None:
    """sweep.json: the settings, and the grid so far (a resumed sweep may add
    models, methods and sparsities). Written whole or not at all."""
    try:
        grid = json.loads((out / RECORD).read_text()).get("grid") or {}
    except (OSError, ValueError, AttributeError):
        grid = {}
    added = {"models": [model_label(m) for m in cfg.models], "methods": [method_label(m) for m in cfg.methods],
             "sparsities": [str(s) for s in cfg.sparsities]}
    grid = {k: list(dict.fromkeys([*(grid.get(k) or []), *v])) for k, v in added.items()}
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "grid": grid}, indent=2, default=str) + "\n")
    os.replace(tmp, out / RECORD)


def _evaluate(model, tok, windows, cfg: SweepConfig, dense=None) -> dict:
    res = perplexity(model, windows, max_windows=cfg.data.eval_windows, device=cfg.device)
    row = {"ppl": res.ppl, "ppl_windows": f"{res.windows}/{res.total_windows}"}
    if cfg.zero_shot is not None:
        from .evaluation.zeroshot import evaluate_zero_shot

        zs = evaluate_zero_shot(model, tok, device=cfg.device, **cfg.zero_shot)
        row["zero_shot_mean"] = zs.mean
        row["zero_shot"] = json.dumps({t: r["value"] for t, r in zs.tasks.items()}, sort_keys=True)
    if cfg.diagnose_windows and dense is not None:
        from .evaluation.diagnostics import attention_diff, summarize
        from .io.modeling import pick_device

        s = summarize(attention_diff(dense, model, windows[: cfg.diagnose_windows], pick_device(cfg.device)))
        row["attn_kl"], row["attn_rmse"] = s["mean_kl"], s["mean_rmse"]
    return row


# --------------------------------------------------------------------------- outputs
def _f(v: str, fmt: str = "{:.2f}") -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "inf" if math.isinf(x) else fmt.format(x)


def markdown_table(rows: list[dict], value: str = "ppl", fmt: str = "{:.2f}") -> str:
    """Paper layout: one row per (sparsity, method), one column per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = list(dict.fromkeys((r["sparsity"], r["method"]) for r in rows))
    # methods in order of first appearance over the whole grid, so a cell redone later keeps its place
    rank = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    order.sort(key=lambda sm: (0 if sm[1] == "dense" else 1, _sparsity_sort(sm[0]), rank[sm[1]]))
    cell = {(r["model"], r["sparsity"], r["method"]): r.get(value, "") for r in rows}
    lines = ["| sparsity | method | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for s, m in order:
        lines.append(f"| {s} | {m} | " + " | ".join(_f(cell.get((mod, s, m), ""), fmt) for mod in models) + " |")
    return "\n".join(lines)


def _sparsity_sort(s: str) -> tuple:
    sp = Sparsity.parse(s) if s not in ("0", "") else Sparsity(0.0)
    return (1 if sp.is_nm else 0, sp.ratio, sp.n)


def write_outputs(rows: list[dict], out: Path, cfg: SweepConfig | None = None) -> None:
    parts = ["# Sweep results", "", "WikiText-2 perplexity:", "", markdown_table(rows, "ppl")]
    if any(r.get("zero_shot_mean") for r in rows):
        parts += ["", "Zero-shot mean accuracy:", "", markdown_table(rows, "zero_shot_mean", "{:.4f}")]
    if any(r.get("attn_kl") for r in rows):
        parts += ["", "Attention KL(pruned || dense), mean over blocks:", "", markdown_table(rows, "attn_kl", "{:.4f}"),
                  "", "Attention-output RMSE, mean over blocks:", "", markdown_table(rows, "attn_rmse", "{:.4f}")]
    (out / "results.md").write_text("\n".join(parts) + "\n")
    # timings vary run to run: kept apart so a resumed sweep reproduces results.md exactly
    (out / "timings.md").write_text("# Prune seconds\n\n" + markdown_table(rows, "prune_seconds", "{:.1f}") + "\n")
    plot_sweep(rows, out)


def plot_sweep(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for value, fname, ylabel, logy in [("ppl", "ppl_vs_sparsity.png", "WikiText-2 perplexity", True),
                                       ("zero_shot_mean", "zeroshot_vs_sparsity.png", "zero-shot mean accuracy", False)]:
        data = [r for r in rows if r.get(value) not in ("", None)]
        if not data:
            continue
        models = list(dict.fromkeys(r["model"] for r in data))
        # one colour per method across all panels (first appearance in the grid)
        methods = list(dict.fromkeys(r["method"] for r in data if r["method"] != "dense"))
        cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
        colors = {m: cmap(i) for i, m in enumerate(methods)}
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models) + 2.2, 3.8), squeeze=False)
        handles = {}
        for ax, model in zip(axes[0], models):
            mrows = [r for r in data if r["model"] == model]
            dense = [float(r[value]) for r in mrows if r["method"] == "dense"]
            for method in methods:
                pts = sorted((Sparsity.parse(r["sparsity"]).ratio, float(r[value])) for r in mrows
                             if r["method"] == method and not Sparsity.parse(r["sparsity"]).is_nm)
                if pts:
                    handles[method] = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                                              color=colors[method], label=method)[0]
                nm = [(Sparsity.parse(r["sparsity"]).ratio, float(r[value])) for r in mrows
                      if r["method"] == method and Sparsity.parse(r["sparsity"]).is_nm]
                if nm:  # N:M cells as crosses in the method's colour
                    h = ax.scatter([p[0] for p in nm], [p[1] for p in nm], marker="x", color=colors[method])
                    handles.setdefault(method, h)
            if dense:
                handles["dense"] = ax.axhline(dense[0], color="gray", ls="--", label="dense")
            if logy:
                ax.set_yscale("log")
            ax.set(title=model, xlabel="sparsity (x: N:M)", ylabel=ylabel)
        names = [m for m in [*methods, "dense"] if m in handles]
        fig.legend([handles[m] for m in names], names, loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 1 - 2.2 / (5 * len(models) + 2.2), 1))
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
