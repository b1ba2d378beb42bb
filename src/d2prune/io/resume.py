"""Crash-resume: a work folder beside ``--out`` that survives a kill.

After every finished block the run writes, atomically (temporary file,
fsync, rename), the block's pruned weights in their storage dtype
(``block-00007.safetensors``) and then ``state.json`` (the next block, the
report rows so far, the method's per-block choices, and the run's identity).
Rerunning the same command finds the folder, checks that the identity is the
same (model files, calibration tokens, configuration, library versions, the
number of torchrun processes) and continues: the finished blocks' weights
are put back and only run forward to recompute the activations of the next
block (bit-identical, since the saved weights are exactly what the
interrupted run propagated with; see
:func:`d2prune.io.modeling.set_weight_matrix`). A successful run removes the folder.

The folder's files are checked before they are trusted: a finished block whose
file is missing, truncated or holds other tensors is pruned again (with every
block after it), and a ``state.json`` that is not what this version writes
stops the run in one line naming ``--restart``. The process that writes the
folder holds an advisory lock on it (``flock``, released by the OS when the
process dies, so a killed run never leaves it stuck): a second run on the same
``--out`` is refused at once.

Nothing here deletes a folder the tool did not write: the work folder carries
a marker file, and only a folder holding it is ever removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from torch import Tensor

from ..errors import D2PruneError, no_space_left

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
MARKER_NAME = ".d2prune-work"
LOCK_NAME = "lock"  # held (flock) by the process writing the folder; it holds that process's pid


def tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor's bytes (calibration token ids: data, seed, tokenizer in one)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def files_digest(paths: list[Path]) -> str:
    """Identity of model files without reading them: names, sizes, mtimes."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()[:16]


def _processes(n) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, Exception) and no_space_left(e):
            raise D2PruneError(f"no space left on device while writing the resume checkpoint {path}: free some space "
                               "and rerun the same command to resume from the last finished block") from e
        raise


class WorkFolder:
    """``.OUT.work/`` beside the output folder ``out``: the marker that makes
    it ours, the lock of the run writing it, the identity a resumed run must
    match, atomic writes. A prune keeps its finished blocks here
    (:meth:`begin`, :meth:`commit`); ``d2prune finetune`` keeps its
    checkpoints in one of its own (``suffix``, :class:`d2prune.finetune.FinetuneWork`)."""

    def __init__(self, out: str | os.PathLike, identity: dict, restart: bool = False, writer: bool = True,
                 suffix: str = ".work"):
        out = Path(out).expanduser().absolute()
        self.restart = restart
        self.writer = writer  # False: another process of a torchrun job, which reads rank 0's folder
        self.path = out.parent / f".{out.name}{suffix}"
        self.identity = json.loads(json.dumps(identity, default=str))  # what state.json will compare against
        self.state: dict = {}
        self.temp_root: Path | None = None  # a private temporary folder this work folder lives in (removed with it)
        self._lock = None  # the open lock file while this process holds the folder

    @classmethod
    def temporary(cls, prefix: str, identity: dict, writer: bool = True) -> "WorkFolder":
        """A work folder inside a new private temporary folder (a run without
        ``--out``: nothing to resume), which :meth:`remove` deletes too."""
        import tempfile

        root = Path(tempfile.mkdtemp(prefix=prefix))
        work = cls(root / "model", identity, writer=writer)
        work.temp_root = root
        return work

    # ------------------------------------------------------------------ start
    def begin(self, n_blocks: int) -> int:
        """Create the folder, or check an interrupted run's identity; returns
        the first block left to prune."""
        try:
            return self._begin(n_blocks)
        except BaseException:
            self.release()  # refused: the folder is left as it was, for whichever run it belongs to
            raise

    def _begin(self, n_blocks: int) -> int:
        state_file = self.path / STATE_NAME
        if self.writer and self.path.exists():
            self.ensure()  # ours, and locked before anything in it is read or removed
        if self.path.exists() and self.restart and self.writer:
            self._clear()
        # another rank of a torchrun job never looks at a folder that rank 0 discards: it may be read before
        # rank 0 has removed it, and another run's identity there would stop this rank alone
        if state_file.is_file() and not (self.restart and not self.writer):
            try:
                state = json.loads(state_file.read_text())
            except ValueError as e:
                raise D2PruneError(f"{state_file} is corrupt ({e}): rerun with --restart to start over") from e
            why = _state_shape_error(state, n_blocks)
            if why:
                raise D2PruneError(f"{state_file} is not a state this version of d2prune wrote ({why}): rerun with "
                                   "--restart to start over")
            diff = [k for k in sorted(set(self.identity) | set(state["identity"]))
                    if self.identity.get(k) != state["identity"].get(k)]
            saved_world = state["identity"].get("world_size")
            if "world_size" in diff and saved_world is not None:  # said first: the command alone does not show it
                others = ", ".join(k for k in diff if k != "world_size")
                others = f" with another {others}" if others else ""
                how = "as one process (no torchrun)" if saved_world == 1 else f"under torchrun --nproc-per-node {saved_world}"
                raise D2PruneError(
                    f"{self.path} holds an interrupted run of {_processes(saved_world)}{others}; this run has "
                    f"{_processes(self.identity.get('world_size'))}: resume it with its own command {how}, or pass "
                    "--restart to discard it"
                )
            self.check_identity(state["identity"], "run")
            self.state = state
            start = int(state["next_block"])
            if 0 < start < n_blocks:
                log.info("resuming from block %d/%d (%d finished blocks in %s)", start + 1, n_blocks, start, self.path)
            return start
        if self.writer:
            self.ensure()
        self.state = {"identity": self.identity, "next_block": 0, "n_blocks": n_blocks, "rows": [], "method": {}}
        return 0

    def check_identity(self, theirs: dict, what: str) -> None:
        """Refuse, in one line, to resume an interrupted ``what`` whose identity differs from this run's."""
        diff = [k for k in sorted(set(self.identity) | set(theirs)) if self.identity.get(k) != theirs.get(k)]
        if diff:
            raise D2PruneError(f"{self.path} holds an interrupted {what} with another {', '.join(diff)}: rerun its own "
                               "command to resume it, or pass --restart to discard it")

    def write_atomic(self, name: str, write) -> Path:
        """``write(path)`` into the folder under ``name``, atomically (temporary file, fsync, rename)."""
        path = self.path / name
        _atomic_write(path, write)
        return path

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Decoding what ``state.json`` holds (report rows, a method's
        choices): a value of the wrong shape is one line naming ``--restart``."""
        try:
            yield
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise D2PruneError(f"{self.path / STATE_NAME} holds values this version of d2prune cannot read "
                               f"({type(e).__name__}: {e}): rerun with --restart to start over") from e

    def ensure(self) -> Path:
        """The folder, created with its marker (refused if someone else's) and
        locked by this process (refused if another run holds it)."""
        if self.path.exists() and not (self.path / MARKER_NAME).is_file():
            raise D2PruneError(f"{self.path} exists and was not written by d2prune: move it away or choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire()
            (self.path / MARKER_NAME).write_text(f"{os.getpid()}\n")
        except OSError as e:
            raise D2PruneError(f"could not create the work folder {self.path}: {e.strerror or e}") from e
        return self.path

    def _acquire(self) -> None:
        """Hold the folder's lock (once per process; a no-op if already held).
        ``flock`` is released by the OS when the process dies, however it dies."""
        if self._lock is not None or not self.writer:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: no advisory locks
            return
        lock_path = self.path / LOCK_NAME
        for _ in range(10):  # the folder (and its lock file) may be removed under us by a run that just finished
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                f = open(lock_path, "a+")
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip()
                f.close()
                raise D2PruneError(f"another d2prune run{f' (pid {pid})' if pid else ''} is using {self.path}, the work "
                                   "folder of this --out: wait for it to end, or choose another --out") from None
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a lock file its owner removed on the way out: take the new one
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self._lock = f
            return
        raise D2PruneError(f"could not lock the work folder {self.path}: it keeps disappearing; rerun the command")

    def release(self) -> None:
        """Let go of the folder's lock (the run has ended, however)."""
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    # ------------------------------------------------------------------ per block
    def block_path(self, i: int, tag: str = "") -> Path:
        return self.path / f"block{('-' + tag) if tag else ''}-{i:05d}.safetensors"

    def write_block(self, i: int, tensors: dict[str, Tensor], tag: str = "") -> Path:
        from safetensors.torch import save_file

        path = self.block_path(i, tag)
        if not self.writer:
            return path
        _atomic_write(path, lambda p: save_file(tensors, str(p)))
        return path

    def damaged(self, i: int, shapes: dict[str, tuple[int, ...]], tag: str = "") -> str | None:
        """Why block ``i``'s file cannot be put back - missing, unreadable
        (truncated: its header no longer matches its length) or holding other
        tensors than ``shapes`` (``{checkpoint name: shape}``) - or None."""
        from safetensors import safe_open

        path = self.block_path(i, tag)
        if not path.is_file():
            return f"{path} is missing"
        try:
            with safe_open(str(path), framework="pt") as f:
                held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors' SafetensorError (truncated, garbage) or an OSError
            return f"{path} cannot be read ({type(e).__name__}: {e})"
        if held != shapes:
            return f"{path} does not hold the tensors of block {i}"
        return None

    def commit(self, next_block: int, rows: list[dict], method_state: dict, extra: dict | None = None) -> None:
        """Record that every block before ``next_block`` is finished."""
        self.state.update({"next_block": next_block, "rows": rows, "method": method_state, **(extra or {})})
        if not self.writer:
            return
        _atomic_write(self.path / STATE_NAME, lambda p: p.write_text(json.dumps(self.state, indent=1, default=str)))

    # ------------------------------------------------------------------ end
    def _clear(self) -> None:
        """Empty the folder (``--restart``), keeping its marker and the lock
        this process holds (a lock file removed now would let another run in)."""
        if not (self.writer and (self.path / MARKER_NAME).is_file()):
            return
        for child in self.path.iterdir():
            if child.name in (LOCK_NAME, MARKER_NAME):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def remove(self) -> None:
        if self.writer and (self.path / MARKER_NAME).is_file():
            self._clear()
            for name in (MARKER_NAME, LOCK_NAME):  # the lock file last, while it is still held
                (self.path / name).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:  # another run already took the folder over after the lock file went
                pass
        self.release()
        if self.temp_root is not None:  # the temporary folder we made, nothing above it
            shutil.rmtree(self.temp_root, ignore_errors=True)


def _state_shape_error(state, n_blocks: int) -> str | None:
    """What is wrong with the shape of a parsed ``state.json``, or None."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    for key, kind in (("identity", dict), ("next_block", int), ("rows", list), ("method", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key!r} is not a JSON {'object' if kind is dict else 'array' if kind is list else 'integer'}"
    if not 0 <= state["next_block"] <= n_blocks:
        return f"next_block {state['next_block']} is not a block of this {n_blocks}-block model"
    return None
