"""Writing a pruned model: all or nothing.

Everything (safetensors weights, config, tokenizer, ``d2prune.json``) is
written into a temporary folder beside the target and renamed into place at
the end, so an interrupted or failed run (full disk included) never leaves a
half-written model behind. The output is staged inside a hidden folder that
carries a marker (``.NAME.tmp-*/x``) and renamed out of it, so a save killed
outright (SIGKILL) at any point - writing, or between the final rename and the
cleanup - leaves a marked folder; the next save into the same place removes
it (:func:`reclaim_stale`), and only folders marked as ours by a dead process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import D2PruneError, no_space_left

log = logging.getLogger(__name__)

RECORD_NAME = "d2prune.json"


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any pruning) if ``out`` cannot be written. Leftovers
    of an earlier save into the same place that was killed are reclaimed first
    (:func:`reclaim_stale`), so they can neither block nor pass this check."""
    p = Path(out).expanduser()
    reclaim_stale(p)
    if p.exists() and not p.is_dir():
        raise D2PruneError(f"output path {p} exists and is a file, not a folder: choose another --out")
    if p.exists() and not overwrite:
        raise D2PruneError(f"output folder {p} already exists: pass --overwrite or choose another --out")
    if p.exists():
        check_replaceable(p)
    # missing parent folders are created at save time (like save_pretrained): the nearest existing one must be writable
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise D2PruneError(f"{parent} is a file, so {p} cannot be created: choose another --out")
    if not os.access(parent, os.W_OK):
        raise D2PruneError(f"cannot write into {parent}: choose a writable --out")
    return p


def check_replaceable(p: Path) -> None:
    """``--overwrite`` replaces what d2prune wrote, never a folder it did not:
    only an empty folder or a previous output (it holds ``d2prune.json``), and
    never the working directory or a folder above it (``--out .``)."""
    here, target = Path.cwd().resolve(), p.resolve()
    if target == here or target in here.parents:
        raise D2PruneError(f"--out {p} is the working directory or a folder above it: --overwrite never replaces it; "
                           "choose a new folder")
    if any(p.iterdir()) and not (p / RECORD_NAME).is_file():
        raise D2PruneError(f"output folder {p} is not empty and is not a d2prune output (no {RECORD_NAME}): "
                           "--overwrite only replaces those; choose another --out or empty it yourself")


# --------------------------------------------------------------------------- temporary folders
# Every hidden folder a save makes beside its target (.NAME.tmp-*, .NAME.old-*) holds this file first,
# with the writer's pid and host: a later save reclaims the folder only when that process is gone.
TMP_MARKER = ".d2prune-tmp"


def make_temp(parent: Path, prefix: str) -> Path:
    """A new hidden folder in ``parent``, marked as ours before anything else goes in."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        (tmp / TMP_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def remove_ours(folder: Path) -> None:
    """Delete a folder made by :func:`make_temp`, its marker last: stopped half
    way, what is left is still recognisably ours and reclaimed later."""
    try:
        for child in folder.iterdir():
            if child.name == TMP_MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def _writer_is_gone(folder: Path) -> bool:
    """True when ``folder`` carries our marker and the process that wrote it no
    longer exists on this host. Anything else (no marker, another host, a live
    or unknown process) is kept."""
    try:
        pid_text, host = (folder / TMP_MARKER).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: alive, another user's
        return False
    return False


def reclaim_stale(target: Path) -> None:
    """Remove the temporary folders a killed save into ``target`` left beside
    it (SIGKILL gives no chance to clean up). If it was killed while replacing
    an old output (the old one moved aside, the new one not yet in place), the
    old output is put back first."""
    target = target.absolute()
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:  # no parent yet (created at save time) or unreadable: nothing of ours there
        return
    for entry in entries:
        if not entry.name.startswith(prefixes) or entry.is_symlink() or not entry.is_dir() or not _writer_is_gone(entry):
            continue
        previous = entry / "x"
        if entry.name.startswith(prefixes[1]) and previous.is_dir() and not os.path.lexists(target):
            os.rename(previous, target)
            log.warning("restored %s: a save replacing it was killed before the new output was in place", target)
        remove_ours(entry)
        log.info("removed %s, left behind by a killed save", entry)


def drop_auto_map(folder: Path) -> None:
    """A pruned model is a plain transformers model: its config must not point
    at custom code (``auto_map``) that d2prune never ran nor copied."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C inside the block takes effect when the block ends. Outside the
    main thread (where Python delivers signals) nothing changes."""
    caught: list[int] = []
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):
            previous = None
        else:
            signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if caught:
                if callable(previous):
                    previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
                else:
                    raise KeyboardInterrupt


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
    tmp: Path | None = None
    try:
        # the output is written into tmp/x and renamed out of it: the marked folder tmp outlives the
        # rename, so a save killed at any point leaves only folders the next save can tell are ours
        tmp = make_temp(parent, f".{target.name}.tmp-")
        staged = tmp / "x"
        staged.mkdir()  # a plain mkdir: the permissions the output would have had if made directly
        if write_weights is None:
            model.save_pretrained(staged, safe_serialization=True)
        else:
            write_weights(staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        drop_auto_map(staged)
        write_json(staged / RECORD_NAME, record)
        _fsync_dir(staged)
        with sigint_deferred():  # the swap below is never left half-done by Ctrl-C
            if target.exists():  # overwrite: move the old folder aside, put the new one in, then drop the old
                old = make_temp(parent, f".{target.name}.old-")
                os.rename(target, old / "x")
                try:
                    os.rename(staged, target)
                except OSError:
                    os.rename(old / "x", target)  # put the user's previous output back
                    remove_ours(old)
                    raise
                remove_ours(old)
            else:
                os.rename(staged, target)
            _fsync_dir(parent)
            remove_ours(tmp)
    except Exception as e:  # OSError, safetensors' SafetensorError, ... -> one line, nothing left behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if no_space_left(e):
            raise D2PruneError(f"no space left on device while writing {target}: free some space or choose another --out") from e
        raise D2PruneError(f"could not write {target}: {type(e).__name__}: {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
