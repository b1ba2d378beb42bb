#!/usr/bin/env python
"""The scale benchmark: LLaMA-shaped checkpoints with a few real-width blocks.

Writes LLaMA-2-7B-, LLaMA-3-8B- and LLaMA-2-70B-shaped checkpoints with ``N``
real-width decoder blocks (random weights, normal std 0.02, norms 1, bf16; an
ordinary HF sharded safetensors checkpoint written one block at a time, so the
builder never holds more than one shard), prunes them with ``d2prune prune`` in
a subprocess and reports, per run: the checkpoint size, the peak host RSS of
the pruning process (and its ratio to the checkpoint size), peak device memory
on a GPU, seconds per block, the time extrapolated to the full depth (32 / 32
/ 80 blocks; marked as extrapolated: only ``N`` blocks are measured) and the
sparsity of the output's block Linears (read back from its shards).

    python bench/scale.py build --shape llama2-7b --blocks 2 --dir /tmp/d2prune-scale/llama2-7b-2 [--verify]
    python bench/scale.py run --model /tmp/d2prune-scale/llama2-7b-2 --method wanda --nsamples 4 --seqlen 128
    python bench/scale.py all --matrix llama2-7b:4,llama3-8b:16=wanda,llama2-70b:2 --nsamples 16 --seqlen 512

Extra d2prune flags go to every run with ``--extra="--stream on --no-layer-error"`` (the ``=`` form: the
value starts with a dash); the default is ``--stream on``, dropped (and the row marked "in-memory path")
when the CLI rejects it.

``all`` builds and runs the matrix and (re)writes bench/SCALE.md after every run
(machine, exact command, table, what was measured vs extrapolated).
Checkpoints live in a scratch folder outside the repository (default
/tmp/d2prune-scale), removed at the end unless ``--keep``.

Peak RSS: the process tree's VmRSS is sampled every 0.2 s, and the pruning
process's own VmHWM (the kernel's exact high-water mark) is read when it exits
(the child runs ``d2prune``'s ``__main__`` through a two-line wrapper that dumps
/proc/self/status at exit - the same code path as ``python -m d2prune``); the
reported peak is the larger of the two. Figures are printed; nothing is
asserted on time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_CALIB = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
DEFAULT_EVAL = SHARED / "data" / "wikitext-2-raw" / "test.jsonl"
TOKENIZER_SRC = SHARED / "models" / "stories260K"  # ids < 512: valid in every vocabulary below
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SCRATCH = Path(tempfile.gettempdir()) / "d2prune-scale"
DEFAULT_MD = ROOT / "bench" / "SCALE.md"
GB = 1e9

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, depth=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, depth=32),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, depth=80),
}

# short method keys -> d2prune prune flags
METHODS = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "d2prune-k": ["--method", "d2prune", "--frozen", "k"],
    "d2prune-auto": ["--method", "d2prune", "--frozen", "auto"],
}
DEFAULT_METHODS = "wanda,sparsegpt,d2prune-k,d2prune-auto"
DEFAULT_EXTRA = "--stream on"
BLOCK_LINEAR = re.compile(r"^model\.layers\.(\d+)\..*_proj\.weight$")


# ----------------------------------------------------------------------------- build

def block_shapes(shape: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    hd = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }


def outer_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    h, v = shape["hidden_size"], shape["vocab_size"]
    return {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.suffix in (".safetensors", ".bin", ".gguf", ".pt") and f.is_file())


def build(shape_name: str, blocks: int, folder: Path, seed: int = 0, verify: bool = False, quiet: bool = False) -> Path:
    """Write the checkpoint one shard (= one block, or embeddings / norm / head)
    at a time; reuse ``folder`` when it already holds the same build."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = SHAPES[shape_name]
    folder = Path(folder)
    stamp = {"shape": shape_name, "blocks": blocks, "seed": seed, "std": 0.02, "dtype": "bfloat16"}
    marker = folder / "scale-build.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        if not quiet:
            print(f"build: reusing {folder} ({_checkpoint_bytes(folder) / GB:.2f} GB)")
        if verify:
            verify_loads(folder)
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    cfg = {k: v for k, v in shape.items() if k not in ("depth", "rope_theta")}
    LlamaConfig(**cfg, num_hidden_layers=blocks, rope_theta=shape["rope_theta"], rms_norm_eps=1e-5,
                tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"],
                bos_token_id=1, eos_token_id=2).to_json_file(tmp / "config.json")
    for name in TOKENIZER_FILES:
        if (TOKENIZER_SRC / name).is_file():
            shutil.copyfile(TOKENIZER_SRC / name, tmp / name)
    nshards = blocks + 1
    weight_map, total = {}, 0
    gen = torch.Generator()
    groups = [(i, block_shapes(shape, i)) for i in range(blocks)] + [(blocks, outer_shapes(shape))]
    for k, shapes in groups:
        fname = f"model-{k + 1:05d}-of-{nshards:05d}.safetensors"
        tensors = {}
        for j, (name, shp) in enumerate(shapes.items()):
            if len(shp) == 1:  # RMSNorm weights
                tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
            else:
                gen.manual_seed(seed * 1_000_003 + k * 101 + j)
                tensors[name] = torch.empty(shp, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        if not quiet:
            what = f"block {k + 1}/{blocks}" if k < blocks else "embeddings / norm / head"
            print(f"build: {shape_name} {what} -> {fname} ({(tmp / fname).stat().st_size / GB:.2f} GB, "
                  f"{time.perf_counter() - t0:.0f}s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    marker_tmp = tmp / "scale-build.json"
    marker_tmp.write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    if not quiet:
        print(f"build: {folder}: {shape_name} x {blocks} blocks, {_checkpoint_bytes(folder) / GB:.2f} GB bf16 "
              f"in {time.perf_counter() - t0:.0f}s")
    if verify:
        verify_loads(folder)
    return folder


_LOAD_CHECK = r"""
import json, sys
from transformers import AutoModelForCausalLM
m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto", output_loading_info=True)
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "mismatched": [str(x) for x in info.get("mismatched_keys", [])],
                  "dtype": str(m.dtype), "layers": m.config.num_hidden_layers,
                  "params": sum(p.numel() for p in m.parameters())}))
"""


def load_check(folder: Path) -> dict:
    """``AutoModelForCausalLM.from_pretrained(folder)`` in a child process."""
    r = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["ok"] = not (info["missing"] or info["unexpected"] or info["mismatched"])
    return info


def verify_loads(folder: Path) -> None:
    t = time.perf_counter()
    info = load_check(folder)
    print(f"verify: AutoModelForCausalLM.from_pretrained({folder}): "
          + (f"ok ({info['layers']} layers, {info['params'] / 1e9:.3f}B params, {info['dtype']}, no missing / "
             f"unexpected keys)" if info["ok"] else f"FAILED {info}") + f" [{time.perf_counter() - t:.0f}s]")
    if not info["ok"]:
        raise SystemExit(1)


# ----------------------------------------------------------------------------- run

# Runs d2prune's __main__ (what ``python -m d2prune`` runs) and, at exit, copies
# /proc/self/status (VmHWM: the exact peak RSS) and the CUDA peak to a file.
_WRAPPER = r"""
import atexit, json, sys
_f = sys.argv.pop(1)
def _dump():
    out = {"status": open("/proc/self/status").read()}
    t = sys.modules.get("torch")
    try:
        if t is not None and t.cuda.is_initialized():
            out["cuda_peak"] = max(t.cuda.max_memory_allocated(i) for i in range(t.cuda.device_count()))
    except Exception:
        pass
    open(_f, "w").write(json.dumps(out))
atexit.register(_dump)
sys.argv[0] = "d2prune"
if {has_main}:
    import runpy
    runpy.run_module("d2prune", run_name="__main__", alter_sys=True)
else:
    from d2prune.cli import main
    sys.exit(main())
"""


def has_dunder_main() -> bool:
    spec = importlib.util.find_spec("d2prune")  # does not import the package
    return bool(spec and spec.submodule_search_locations
                and any((Path(p) / "__main__.py").is_file() for p in spec.submodule_search_locations))


def d2prune_argv() -> list[str]:
    """How the benchmark would be started by hand (shown in the report)."""
    if has_dunder_main():
        return [sys.executable, "-m", "d2prune"]
    return [sys.executable, "-c", "import sys; from d2prune.cli import main; sys.exit(main())"]


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat's ppid)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def _mem_total() -> int:
    return _status_field("/proc/meminfo", "MemTotal")


def _mem_available() -> int:
    return _status_field("/proc/meminfo", "MemAvailable")


def _status_field(path: str, field: str) -> int:
    try:
        for line in open(path):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(argv: list[str], log: Path, max_rss: float | None, interval: float = 0.2) -> dict:
    """Run ``argv`` (d2prune's arguments after ``prune``...), sampling its RSS."""
    fd, hwm_file = tempfile.mkstemp(prefix="scale-hwm-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-c", _WRAPPER.replace("{has_main}", str(has_dunder_main())), hwm_file, *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env)
        peak_tree = peak_hwm = peak_anon = 0
        killed = None
        trace, loads = [], []
        while proc.poll() is None:
            rss = sum(_status_kib(p, "VmRSS") for p in _tree(proc.pid)) * 1024
            anon = sum(_status_kib(p, "RssAnon") for p in _tree(proc.pid)) * 1024
            peak_anon = max(peak_anon, anon)
            trace.append((time.perf_counter() - t0, rss, anon))
            loads.append(os.getloadavg()[0])
            peak_tree = max(peak_tree, rss)
            peak_hwm = max(peak_hwm, _status_kib(proc.pid, "VmHWM") * 1024)
            if max_rss and rss > max_rss and killed is None:
                killed = f"killed by the benchmark: RSS {rss / GB:.1f} GB > --max-rss-gb {max_rss / GB:.1f}"
                proc.kill()
            time.sleep(interval)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    cuda_peak = None
    try:
        dumped = json.loads(Path(hwm_file).read_text() or "{}")
        m = re.search(r"^VmHWM:\s+(\d+)", dumped.get("status", ""), re.M)
        if m:
            peak_hwm = max(peak_hwm, int(m.group(1)) * 1024)
        cuda_peak = dumped.get("cuda_peak")
    except (OSError, ValueError):
        pass
    os.unlink(hwm_file)
    with open(log.with_suffix(".rss.tsv"), "w") as f:  # the timeline: seconds, RSS GB, anonymous RSS GB
        f.writelines(f"{t:.1f}\t{r / GB:.3f}\t{a / GB:.3f}\n" for t, r, a in trace)
    return {"rc": rc, "wall": wall, "peak_rss": max(peak_tree, peak_hwm), "peak_tree_sampled": peak_tree,
            "peak_anon_sampled": peak_anon, "vmhwm": peak_hwm, "cuda_peak": cuda_peak, "killed": killed,
            "load": (sum(loads) / len(loads)) if loads else None}


def output_sparsity(folder: Path) -> dict:
    """Fraction of zeros in the block Linears of the output shards (read back
    with safetensors, a slice of rows at a time)."""
    import torch
    from safetensors import safe_open

    zeros = total = 0
    per_layer_min, dtypes = 1.0, set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not BLOCK_LINEAR.match(name):
                    continue
                sl = st.get_slice(name)
                rows = sl.get_shape()[0]
                z = n = 0
                step = max(1, (1 << 24) // max(1, sl.get_shape()[1]))
                for a in range(0, rows, step):
                    t = sl[a:a + step]
                    dtypes.add(str(t.dtype).removeprefix("torch."))
                    z += int((t == 0).sum())
                    n += t.numel()
                zeros, total = zeros + z, total + n
                per_layer_min = min(per_layer_min, z / max(n, 1))
    return {"sparsity": zeros / total if total else None, "min_layer": per_layer_min if total else None,
            "linears_numel": total, "dtype": ",".join(sorted(dtypes))}


def model_info(model: str) -> dict:
    """Shape name / depth of a checkpoint built here, else what config.json says."""
    p = Path(model)
    info = {"shape": p.name, "blocks": None, "depth": None, "size": None}
    if p.is_dir():
        info["size"] = _checkpoint_bytes(p)
        if (p / "scale-build.json").is_file():
            st = json.loads((p / "scale-build.json").read_text())
            info.update(shape=st["shape"], blocks=st["blocks"], depth=SHAPES[st["shape"]]["depth"])
        elif (p / "config.json").is_file():
            info["blocks"] = json.loads((p / "config.json").read_text()).get("num_hidden_layers")
    elif p.is_file():
        info["size"] = p.stat().st_size
    return info


def _drop_stream(flags: list[str]) -> list[str]:
    out, skip = [], False
    for x in flags:
        if skip:
            skip = False
        elif x == "--stream":
            skip = True
        elif not x.startswith("--stream="):
            out.append(x)
    return out


def run_one(model: str, method: str, nsamples: int, seqlen: int, extra: list[str], out: Path, *,
            calib_file: str = str(DEFAULT_CALIB), eval_windows: int = 0, eval_file: str = str(DEFAULT_EVAL),
            depth: int | None = None, max_rss: float | None = None, load: str = "auto", sparsity: str = "0.5",
            keep_output: bool = False) -> dict:
    """One prune of ``model`` in a subprocess; returns the row (a dict)."""
    info = model_info(model)
    depth = depth or info["depth"] or info["blocks"]
    mflags = METHODS[method] if method in METHODS else shlex.split(method)
    evalflags = ["--eval-file", eval_file, "--eval-windows", str(eval_windows)] if eval_windows else ["--no-eval"]
    base = ["-q", "prune", "--model", str(model), *mflags, "--sparsity", sparsity, "--nsamples", str(nsamples),
            "--seqlen", str(seqlen), "--calib-file", str(calib_file), *evalflags, "--out", str(out), "--overwrite"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    note = []
    shutil.rmtree(out, ignore_errors=True)
    argv = base + extra
    print(f"run: {shlex.join(d2prune_argv()[1:] + argv)}", flush=True)
    m = measure(argv, log, max_rss)
    text = log.read_text(errors="replace")
    bad = next((ln for ln in text.splitlines() if re.search(r"unrecognized arguments|invalid choice", ln)), "")
    if m["rc"] != 0 and extra and bad and any(x in bad for x in extra if x.startswith("-")):
        print(f"run: the CLI rejected {shlex.join(extra)!r} ({bad.strip()}): rerunning without it", flush=True)
        note.append(f"CLI rejected {shlex.join(extra)}: in-memory path")
        argv = base
        m = measure(argv, log, max_rss)
        text = log.read_text(errors="replace")
    err = next((ln for ln in text.splitlines() if ln.startswith("d2prune: error:")), "")
    if m["rc"] == 2 and "--stream" in err and "--stream" in argv[len(base):]:
        kept = _drop_stream(argv[len(base):])
        print(f"run: d2prune refused streaming for this run ({err.strip()}): rerunning without --stream", flush=True)
        note.append("streaming refused for this method: in-memory path")
        argv = base + kept
        m = measure(argv, log, max_rss)
        text = log.read_text(errors="replace")
    row = {"shape": info["shape"], "blocks": info["blocks"], "depth": depth, "method": method,
           "flags": shlex.join(mflags + [f for f in argv[len(base):]]), "nsamples": nsamples, "seqlen": seqlen,
           "ckpt_bytes": info["size"], "peak_rss": m["peak_rss"], "peak_tree_sampled": m["peak_tree_sampled"],
           "peak_anon": m["peak_anon_sampled"], "vmhwm": m["vmhwm"], "cuda_peak": m["cuda_peak"], "wall": m["wall"],
           "load": m["load"], "rc": m["rc"],
           "command": shlex.join(d2prune_argv() + argv), "note": note}
    if m["rc"] != 0:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["?"]
        row["error"] = m["killed"] or (f"killed by signal {-m['rc']} (out of memory?)" if m["rc"] < 0 else last[0])
        print(f"run: FAILED (rc {m['rc']}): {row['error']}\n--- last lines of {log}:\n"
              + "\n".join(text.strip().splitlines()[-15:]), flush=True)
        return row
    rec = json.loads((out / "d2prune.json").read_text())
    mem = rec.get("memory") or {}
    nblocks = row["blocks"] or len({re.match(r"^(.*?layers\.\d+)\.", r["name"]).group(1)
                                    for r in rec["layers"] if re.match(r"^(.*?layers\.\d+)\.", r["name"])}) or None
    row["blocks"] = nblocks
    row["depth"] = row["depth"] or nblocks
    row["prune_seconds"] = rec["prune_seconds"]
    row["total_seconds"] = rec.get("total_seconds")
    row["layer_seconds"] = sum(r["seconds"] for r in rec["layers"])
    row["s_per_block"] = rec["prune_seconds"] / nblocks if nblocks else None
    row["extrapolated_s"] = row["s_per_block"] * row["depth"] if row["s_per_block"] and row["depth"] else None
    row["reported_sparsity"] = rec.get("sparsity")
    row["streamed"] = mem.get("streamed")
    row["storage_dtype"] = mem.get("storage_dtype")
    row["compute_dtype"] = mem.get("compute_dtype")
    row["offload"] = mem.get("offload_activations")
    row["estimate"] = mem.get("estimate")
    row["resumed_from_block"] = mem.get("resumed_from_block")
    row["ppl"] = {k: v.get("ppl") for k, v in (rec.get("evaluation") or {}).items()} or None
    if row["streamed"] is False and not note:
        note.append("in-memory path")
    sp = output_sparsity(out)
    row["out_sparsity"], row["out_min_layer"], row["out_dtype"] = sp["sparsity"], sp["min_layer"], sp["dtype"]
    row["out_bytes"] = _checkpoint_bytes(out)
    if load == "on" or (load == "auto" and row["out_bytes"] < 0.4 * _mem_available()):
        li = load_check(out)
        row["loads"] = "yes" if li["ok"] else f"NO: {li.get('error') or li}"
    else:
        row["loads"] = "not checked"
    if not keep_output:
        shutil.rmtree(out, ignore_errors=True)
    print_row(row)
    return row


# ----------------------------------------------------------------------------- report

COLUMNS = ["shape", "blocks", "method", "calib", "path", "ckpt GB", "peak RSS GB", "peak anon GB", "RSS / ckpt", "est. RAM GB",
           "GPU peak GB", "s/block", "full depth (extrapolated)", "wall s", "load", "out sparsity", "out GB / dtype", "loads"]


def _hms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def row_cells(r: dict) -> list[str]:
    def f(v, fmt):
        if v is None:
            return "-"
        return format(v, ".4f") if fmt == ".2f" and 0 < abs(v) < 0.1 else format(v, fmt)
    ckpt = r.get("ckpt_bytes")
    if r.get("rc", 0) != 0:
        path = "FAILED: " + r.get("error", "?").replace("|", "/")
    else:
        path = ("streamed" if r.get("streamed") else "in-memory") + (f", acts {r['offload']}" if r.get("offload") else "")
        if r.get("compute_dtype"):
            path += f", {r.get('storage_dtype')}->{r['compute_dtype']}"
    notes = [n for n in r.get("note", []) if n != "in-memory path"]
    if notes:
        path += " (" + "; ".join(notes) + ")"
    extra = [x for x in shlex.split(r.get("flags", "")) if x not in METHODS.get(r["method"], [])]
    method = r["method"] + (f" `{shlex.join(extra)}`" if extra else "")
    depth = r.get("depth")
    if not r.get("extrapolated_s"):
        full = "-"
    elif depth == r.get("blocks"):
        full = f"{_hms(r['extrapolated_s'])} (measured: the model has {depth} blocks)"
    else:
        full = f"~{_hms(r['extrapolated_s'])} ({depth} blocks, extrapolated)"
    est = (r.get("estimate") or {}).get("host_ram")
    return [r["shape"], f(r.get("blocks"), "d"), method, f"{r['nsamples']}x{r['seqlen']}", path,
            f(ckpt / GB if ckpt else None, ".2f"), f(r["peak_rss"] / GB, ".2f"),
            f(r["peak_anon"] / GB if r.get("peak_anon") else None, ".2f"),
            f(r["peak_rss"] / ckpt if ckpt else None, ".2f"), f(est, ".2f"),
            f(r["cuda_peak"] / GB if r.get("cuda_peak") else None, ".2f"),
            f(r.get("s_per_block"), ".1f"), full, f(r.get("wall"), ".0f"), f(r.get("load"), ".1f"),
            f(r.get("out_sparsity"), ".4f"),
            (f"{f(r['out_bytes'] / GB, '.2f')} {r.get('out_dtype')}" if r.get("out_bytes") else "-"), r.get("loads", "-")]


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"


def table_row(r: dict) -> str:
    return "| " + " | ".join(row_cells(r)) + " |\n"


def print_row(r: dict) -> None:
    for k, v in zip(COLUMNS, row_cells(r)):
        print(f"  {k:>26}: {v}")
    print(f"  {'prune / total s':>26}: {r.get('prune_seconds', 0):.1f} / {r.get('total_seconds') or 0:.1f} "
          f"(layer rows {r.get('layer_seconds', 0):.1f})")
    print(f"  {'RSS sampled / VmHWM GB':>26}: {r['peak_tree_sampled'] / GB:.2f} / {r['vmhwm'] / GB:.2f}", flush=True)


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import transformers
        tv = transformers.__version__
    except Exception:  # pragma: no cover
        tv = "?"
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "ram_gb": _mem_total() / GB, "torch": torch.__version__, "transformers": tv, "gpu": gpu,
            "python": platform.python_version(), "git": _git_head()}


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def write_markdown(path: Path, command: str, rows: list[dict], mach: dict, started: str, done: bool) -> None:
    lines = ["# Scale benchmark", "",
             "LLaMA-shaped checkpoints with a few real-width decoder blocks (random weights, normal std 0.02, "
             "norms 1, bf16 safetensors shards written one block at a time) pruned to 50% by `d2prune prune` in a "
             "subprocess. Written by `bench/scale.py all`" + ("" if done else " - **run in progress / incomplete**")
             + ".", "",
             "## Machine", "",
             f"- {mach['nproc']} CPU cores ({mach['affinity']} usable), {mach['cpu']}, {mach['ram_gb']:.1f} GB RAM, "
             f"GPU: {mach['gpu'] or 'none'}",
             f"- Python {mach['python']}, torch {mach['torch']}, transformers {mach['transformers']}, "
             f"d2prune at commit {mach['git']}; started {started}", "",
             "## Command", "", "```bash", command, "```", "",
             "Each run is `" + shlex.join(["python"] + d2prune_argv()[1:]) + " -q prune --model CKPT METHOD "
             "--sparsity 0.5 --nsamples N --seqlen L --calib-file ../shared/data/c4/c4-train.00000-of-01024."
             "first1000.jsonl --no-eval --out OUT --overwrite EXTRA` (every row's exact command is listed under the table).", "",
             "## Results", "", table_header().rstrip("\n")]
    lines += [table_row(r).rstrip("\n") for r in rows]
    lines += ["", "Exact commands, in the order run:", "", "```bash"] + [r["command"] for r in rows] + ["```"]
    lines += ["", "## What was measured and what was extrapolated", "",
              "Measured, on the blocks present: *peak RSS* is the peak resident memory of the pruning process "
              "(the larger of its tree's VmRSS sampled every 0.2 s and its own VmHWM read at exit; everything the "
              "process touched, including memory-mapped checkpoint pages while resident); *ckpt GB* is the size of "
              "the input shards on disk (all N blocks + embeddings / norm / head), so *RSS / ckpt* says how much of "
              "the checkpoint the run held at once; *peak anon GB* is the peak of the sampled anonymous part "
              "(RssAnon: heap, tensors; not the file-backed pages of memory-mapped shards, which the kernel can "
              "drop); *est. RAM GB* is d2prune's own estimate printed before pruning "
              "(`memory.estimate.host_ram` in d2prune.json); *s/block* = d2prune's `prune_seconds` (capture, "
              "statistics, pruning and propagation; not loading, calibration sampling or saving) divided by the "
              "number of blocks; *wall s* is the whole subprocess; *load* is the machine's mean 1-minute load "
              f"average during the run (above {mach['affinity']}, other work shared the cores and the times are "
              "inflated); *out sparsity* is the fraction of exact zeros "
              "in the output's block Linears, read back from its shards; *loads* is "
              "`AutoModelForCausalLM.from_pretrained(OUT)` with no missing / unexpected keys.", "",
              "Extrapolated: *full depth* = s/block x the real model's depth (32 for LLaMA-2-7B and LLaMA-3-8B, 80 "
              "for LLaMA-2-70B). Blocks of one shape cost the same (same widths, same number of calibration "
              "tokens), so this is the prune loop of the full model on this machine with these calibration "
              "settings; it leaves out loading and saving the other blocks and the calibration size of the paper "
              "(128 x 2048) unless the row used it. Random weights: timings and memory are representative, the "
              "pruned models are not (no perplexity is meaningful here).", ""]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- CLI

def parse_matrix(spec: str, default_methods: list[str]) -> list[tuple[str, int, list[str]]]:
    """``llama2-7b:4,llama3-8b:16=wanda+sparsegpt`` -> [(shape, blocks, methods)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, _, ms = item.partition("=")
        shape, _, blocks = head.partition(":")
        if shape not in SHAPES:
            raise SystemExit(f"scale.py: error: unknown shape {shape!r} (one of {', '.join(SHAPES)})")
        methods = ms.split("+") if ms else default_methods
        for m in methods:
            if m not in METHODS:
                raise SystemExit(f"scale.py: error: unknown method {m!r} (one of {', '.join(METHODS)})")
        out.append((shape, int(blocks or 2), methods))
    return out


def _methods(spec: str) -> list[str]:
    ms = [m.strip() for m in spec.split(",") if m.strip()]
    for m in ms:
        if m not in METHODS:
            raise SystemExit(f"scale.py: error: unknown method {m!r} (one of {', '.join(METHODS)})")
    return ms


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nsamples", type=int, default=16, help="calibration samples (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration tokens per sample (default 512)")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--extra", default=DEFAULT_EXTRA,
                   help=f"extra d2prune prune flags for every run (default {DEFAULT_EXTRA!r}; dropped, and the row "
                        "marked, when the CLI rejects them; '' for none)")
    p.add_argument("--calib-file", default=str(DEFAULT_CALIB))
    p.add_argument("--eval-windows", type=int, default=0,
                   help="also evaluate WikiText-2 perplexity on the first N windows (default 0: --no-eval)")
    p.add_argument("--eval-file", default=str(DEFAULT_EVAL))
    p.add_argument("--max-rss-gb", type=float, default=round(0.9 * _mem_total() / GB, 1),
                   help="kill a run whose RSS passes this (default 90%% of RAM; 0: never)")
    p.add_argument("--load-check", default="auto", choices=["auto", "on", "off"],
                   help="load the output with AutoModelForCausalLM (auto: when it takes < 40%% of free RAM)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="write a LLaMA-shaped checkpoint with N real-width blocks")
    b.add_argument("--shape", required=True, choices=sorted(SHAPES))
    b.add_argument("--blocks", type=int, default=2)
    b.add_argument("--dir", default=None, help=f"output folder (default {DEFAULT_SCRATCH}/SHAPE-N)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--verify", action="store_true", help="then load it with AutoModelForCausalLM.from_pretrained")

    r = sub.add_parser("run", help="prune a checkpoint (built here or any folder) and measure")
    r.add_argument("--model", required=True, help="checkpoint folder (or .gguf); shape and depth from a build here")
    r.add_argument("--method", action="append", default=None,
                   help=f"one of {', '.join(METHODS)} or raw flags ('--method d2prune --frozen q'); repeatable "
                        f"(default: {DEFAULT_METHODS})")
    r.add_argument("--depth", type=int, default=None, help="full depth for the extrapolation (default: the shape's)")
    r.add_argument("--out", default=None, help="pruned output folder (default: SCRATCH/out-METHOD, removed after)")
    r.add_argument("--keep-output", action="store_true")
    r.add_argument("--markdown", default=None, help="append the rows to this markdown file")
    add_run_flags(r)

    a = sub.add_parser("all", help="build + run a matrix, write bench/SCALE.md")
    a.add_argument("--matrix", default="llama2-7b:2,llama3-8b:4,llama2-70b:2",
                   help="SHAPE:BLOCKS[=m1+m2],... (default llama2-7b:2,llama3-8b:4,llama2-70b:2; methods per entry "
                        "override --methods)")
    a.add_argument("--methods", default=DEFAULT_METHODS, help=f"default {DEFAULT_METHODS}")
    a.add_argument("--scratch", default=str(DEFAULT_SCRATCH), help=f"checkpoints and outputs (default {DEFAULT_SCRATCH})")
    a.add_argument("--keep", action="store_true", help="keep the checkpoints")
    a.add_argument("--markdown", default=str(DEFAULT_MD), help=f"report (default {DEFAULT_MD.relative_to(ROOT)})")
    a.add_argument("--verify", action="store_true", help="load every built checkpoint with transformers first")
    add_run_flags(a)
    args = ap.parse_args(argv)

    if args.cmd == "build":
        folder = Path(args.dir) if args.dir else DEFAULT_SCRATCH / f"{args.shape}-{args.blocks}"
        build(args.shape, args.blocks, folder, args.seed, args.verify)
        return 0

    extra = shlex.split(args.extra)
    max_rss = args.max_rss_gb * GB if args.max_rss_gb else None
    common = dict(calib_file=args.calib_file, eval_windows=args.eval_windows, eval_file=args.eval_file,
                  max_rss=max_rss, load=args.load_check, sparsity=args.sparsity)

    if args.cmd == "run":
        methods = args.method or _methods(DEFAULT_METHODS)
        rows = []
        for m in methods:
            key = re.sub(r"[^\w.-]+", "_", m).strip("_")
            out = Path(args.out) if args.out and len(methods) == 1 else DEFAULT_SCRATCH / f"out-{key}"
            rows.append(run_one(args.model, m, args.nsamples, args.seqlen, extra, out, depth=args.depth,
                                keep_output=args.keep_output, **common))
        if args.markdown:
            md = Path(args.markdown)
            new = not md.is_file() or not md.read_text().strip()
            with open(md, "a") as f:
                if new:
                    f.write(table_header())
                f.writelines(table_row(x) for x in rows)
            print(f"appended {len(rows)} row(s) to {md}")
        return 0 if all(x["rc"] == 0 for x in rows) else 1

    # all
    matrix = parse_matrix(args.matrix, _methods(args.methods))
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    md = Path(args.markdown)
    command = shlex.join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    mach = machine()
    print(f"machine: {mach}")
    jsonl = scratch / "results.jsonl"
    rows: list[dict] = []
    made: list[Path] = []  # what this call writes in the scratch folder (removed at the end unless --keep)
    try:
        for shape, blocks, methods in matrix:
            ckpt = scratch / f"{shape}-{blocks}"
            made += [ckpt, ckpt.with_name(ckpt.name + ".partial")]
            build(shape, blocks, ckpt, verify=args.verify)
            for m in methods:
                out = scratch / f"out-{shape}-{blocks}-{m}"
                made.append(out)
                row = run_one(str(ckpt), m, args.nsamples, args.seqlen, extra, out, **common)
                rows.append(row)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                write_markdown(md, command, rows, mach, started, done=False)
            if not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
        write_markdown(md, command, rows, mach, started, done=True)
        print(f"wrote {md}")
    finally:
        if not args.keep:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            print(f"removed the checkpoints and outputs; logs, RSS timelines and results.jsonl stay in {scratch}")
    print(table_header() + "".join(table_row(x) for x in rows))
    return 0 if all(x["rc"] == 0 for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
