"""Writing a pruned model: all or nothing.

Everything (safetensors weights, config, tokenizer, ``d2prune.json``) is
written into a temporary folder beside the target and renamed into place at
the end, so an interrupted or failed run (full disk included) never leaves a
half-written model behind.
"""

from __future__ import annotations

import errno
import json
import math
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
    if p.exists() and not p.is_dir():
        raise D2PruneError(f"output path {p} exists and is a file, not a folder: choose another --out")
    if p.exists() and not overwrite:
        raise D2PruneError(f"output folder {p} already exists: pass --overwrite or choose another --out")
    # missing parent folders are created at save time (like save_pretrained): the nearest existing one must be writable
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise D2PruneError(f"{parent} is a file, so {p} cannot be created: choose another --out")
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


def _json_safe(obj):
    """Strict JSON: non-finite floats (an infinite perplexity) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(_json_safe(record), f, indent=2, default=str, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _no_space(e: BaseException) -> bool:
    # safetensors reports a full disk as SafetensorError("... I/O error: No space left on device (os error 28)")
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(
        t in str(e) for t in ("No space left", "os error 28", "File too large", "os error 27"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_pruned(model, tokenizer, out: str | os.PathLike, record: dict, overwrite: bool = False,
                write_weights=None) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer + ``d2prune.json``, atomically:
    everything goes to a temporary folder that is renamed into place last; an
    overwritten folder is only removed once the new one is in place.
    ``write_weights(folder)`` replaces ``model.save_pretrained`` (a streamed
    model writes its shards itself: its blocks are not in memory)."""
    target = check_output_dir(out, overwrite)
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise D2PruneError(f"could not create {parent}: {e.strerror or e}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        # mkdtemp makes a private (0700) folder; the output gets the permissions a plain mkdir would give
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if write_weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            write_weights(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD_NAME, record)
        _fsync_dir(tmp)
        if target.exists():  # overwrite: move the old folder aside, put the new one in, then drop the old
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rename(target, old / "x")
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old / "x", target)  # put the user's previous output back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except Exception as e:  # OSError, safetensors' SafetensorError, ... -> one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise D2PruneError(f"no space left on device while writing {target}: free some space or choose another --out") from e
        raise D2PruneError(f"could not write {target}: {type(e).__name__}: {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
