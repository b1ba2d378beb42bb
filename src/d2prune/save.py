"""Writing a pruned model: all or nothing.

Everything (safetensors weights, config, tokenizer, ``d2prune.json``) is
written into a temporary folder beside the target and renamed into place at
the end, so an interrupted or failed run (full disk included) never leaves a
half-written model behind.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from .errors import D2PruneError

RECORD_NAME = "d2prune.json"


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any pruning) if ``out`` cannot be written."""
    p = Path(out).expanduser()
    if p.exists() and not overwrite:
        raise D2PruneError(f"output folder {p} already exists: pass --overwrite or choose another --out")
    if p.exists() and not p.is_dir():
        raise D2PruneError(f"output path {p} exists and is not a folder: choose another --out")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise D2PruneError(f"the parent folder of --out ({parent}) does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise D2PruneError(f"cannot write into {parent}: choose a writable --out")
    return p


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("d2prune", "torch", "transformers", "safetensors", "datasets", "gguf", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def save_pruned(model, tokenizer, out: str | os.PathLike, record: dict, overwrite: bool = False) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer + ``d2prune.json``, atomically."""
    target = check_output_dir(out, overwrite)
    parent = target.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / RECORD_NAME, "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        if target.exists():  # overwrite: swap, then drop the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise D2PruneError(f"no space left on device while writing {target}: free some space or choose another --out") from e
        raise D2PruneError(f"could not write {target}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_record(folder: str | os.PathLike) -> dict:
    p = Path(folder) / RECORD_NAME
    if not p.is_file():
        raise D2PruneError(f"{folder} has no {RECORD_NAME}: is it a d2prune output folder?")
    return json.loads(p.read_text())
