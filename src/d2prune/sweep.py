"""``d2prune sweep``: a grid of models x methods x sparsities, resumable.

Each model is loaded once and its calibration samples (and held-out windows),
evaluation windows and dense results are computed once; every cell prunes a
fresh copy of the dense weights. A finished cell is appended to
``results.csv`` (flushed and fsynced) before the next starts, so a sweep that
is killed and restarted skips every finished cell and ends with the same
table. From the CSV alone: ``results.md`` (the paper's layout: rows =
sparsity x method, columns = models) and PNG plots (perplexity vs sparsity,
log scale; zero-shot mean vs sparsity).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MethodConfig, PruneConfig, Sparsity, method_label, parse_method_spec
from .data import eval_text, eval_windows
from .errors import D2PruneError
from .evaluate import perplexity
from .modeling import check_seqlen, default_seqlen, load_model
from .pipeline import DataConfig, resolve_dtype, calibration_for
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


def _key(model: str, method: str, sparsity: str) -> tuple[str, str, str]:
    return (model, method, sparsity)


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
        from .zeroshot import check_zero_shot

        check_zero_shot(**cfg.zero_shot)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    done = {_key(r["model"], r["method"], r["sparsity"]) for r in read_rows(csv_path)}
    (out / "sweep.json").write_text(json.dumps({
        "models": [model_label(m) for m in cfg.models], "methods": [method_label(m) for m in cfg.methods],
        "sparsities": [str(s) for s in cfg.sparsities], "data": vars(cfg.data), "zero_shot": cfg.zero_shot,
        "diagnose_windows": cfg.diagnose_windows}, indent=2, default=str) + "\n")
    new_cells = 0
    existing = read_rows(csv_path)
    for model_name in cfg.models:
        label = cfg.model_labels.get(model_name) or model_label(model_name)
        _check_same_settings(existing, label, cfg)
        cells = [(m, s) for s in cfg.sparsities for m in cfg.methods if _key(label, method_label(m), str(s)) not in done]
        need_dense = _key(label, "dense", "0") not in done
        if not cells and not need_dense:
            log.info("%s: every cell already done", label)
            continue
        dense, tok, _ = load_model(model_name, dtype=resolve_dtype(cfg.dtype, cfg.device))
        seqlen = cfg.data.seqlen or default_seqlen(dense)
        check_seqlen(dense, seqlen)
        need_held = any(m.needs_heldout for m, _ in cells)
        calib, held = calibration_for(tok, cfg.data, seqlen, need_held)
        windows = eval_windows(tok, eval_text("wikitext2", cfg.data.eval_file), seqlen)
        common = {"model": label, "nsamples": cfg.data.nsamples, "seqlen": seqlen,
                  "limit": (cfg.zero_shot or {}).get("limit", "")}
        if need_dense:
            row = {**common, "method": "dense", "sparsity": "0", "achieved": 0.0, **_evaluate(dense, tok, windows, cfg)}
            _append(csv_path, row)
            done.add(_key(label, "dense", "0"))
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
            done.add(_key(label, name, str(s)))
            new_cells += 1
            del model
    rows = read_rows(csv_path)
    write_outputs(rows, out, cfg)
    return rows


def _check_same_settings(rows: list[dict], label: str, cfg: SweepConfig) -> None:
    """Resuming must not mix cells computed with other data settings."""
    for r in rows:
        if r["model"] != label:
            continue
        if str(r["nsamples"]) != str(cfg.data.nsamples) or (cfg.data.seqlen and str(r["seqlen"]) != str(cfg.data.seqlen)):
            raise D2PruneError(
                f"{cfg.out}/results.csv holds {label} cells made with nsamples={r['nsamples']}, seqlen={r['seqlen']}; "
                f"this sweep asks for nsamples={cfg.data.nsamples}, seqlen={cfg.data.seqlen}: use another --out"
            )
        if cfg.zero_shot and r.get("limit") not in ("", None) and str(r["limit"]) != str(cfg.zero_shot.get("limit")):
            raise D2PruneError(f"{cfg.out}/results.csv holds zero-shot results with --limit {r['limit']}: use the same --limit or another --out")


def _evaluate(model, tok, windows, cfg: SweepConfig, dense=None) -> dict:
    res = perplexity(model, windows, max_windows=cfg.data.eval_windows, device=cfg.device)
    row = {"ppl": res.ppl, "ppl_windows": f"{res.windows}/{res.total_windows}"}
    if cfg.zero_shot is not None:
        from .zeroshot import evaluate_zero_shot

        zs = evaluate_zero_shot(model, tok, device=cfg.device, **cfg.zero_shot)
        row["zero_shot_mean"] = zs.mean
        row["zero_shot"] = json.dumps({t: r["value"] for t, r in zs.tasks.items()}, sort_keys=True)
    if cfg.diagnose_windows and dense is not None:
        from .diagnostics import attention_diff, summarize
        from .modeling import pick_device

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
