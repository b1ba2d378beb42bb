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

Nothing here deletes a folder the tool did not write: the work folder carries
a marker file, and only a folder holding it is ever removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from torch import Tensor

from ..errors import D2PruneError, no_space_left

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
MARKER_NAME = ".d2prune-work"


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
    """``.OUT.work/`` beside the output folder ``out``."""

    def __init__(self, out: str | os.PathLike, identity: dict, restart: bool = False, writer: bool = True):
        out = Path(out).expanduser().absolute()
        self.restart = restart
        self.writer = writer  # False: another process of a torchrun job, which reads rank 0's folder
        self.path = out.parent / f".{out.name}.work"
        self.identity = json.loads(json.dumps(identity, default=str))  # what state.json will compare against
        self.state: dict = {}
        self.temp_root: Path | None = None  # a private temporary folder this work folder lives in (removed with it)

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
        state_file = self.path / STATE_NAME
        if self.path.exists() and self.restart and self.writer:
            self.remove()
        # another rank of a torchrun job never looks at a folder that rank 0 discards: it may be read before
        # rank 0 has removed it, and another run's identity there would stop this rank alone
        if state_file.is_file() and not (self.restart and not self.writer):
            try:
                state = json.loads(state_file.read_text())
            except ValueError as e:
                raise D2PruneError(f"{state_file} is corrupt ({e}): rerun with --restart to start over") from e
            diff = [k for k in sorted(set(self.identity) | set(state.get("identity", {})))
                    if self.identity.get(k) != state.get("identity", {}).get(k)]
            saved_world = state.get("identity", {}).get("world_size")
            if "world_size" in diff and saved_world is not None:  # said first: the command alone does not show it
                others = ", ".join(k for k in diff if k != "world_size")
                others = f" with another {others}" if others else ""
                how = "as one process (no torchrun)" if saved_world == 1 else f"under torchrun --nproc-per-node {saved_world}"
                raise D2PruneError(
                    f"{self.path} holds an interrupted run of {_processes(saved_world)}{others}; this run has "
                    f"{_processes(self.identity.get('world_size'))}: resume it with its own command {how}, or pass "
                    "--restart to discard it"
                )
            if diff:
                raise D2PruneError(
                    f"{self.path} holds an interrupted run with another {', '.join(diff)}: rerun its own command to "
                    "resume it, or pass --restart to discard it"
                )
            self.state = state
            start = int(state["next_block"])
            if 0 < start < n_blocks:
                log.info("resuming from block %d/%d (%d finished blocks in %s)", start + 1, n_blocks, start, self.path)
            return start
        if self.writer:
            self.ensure()
        self.state = {"identity": self.identity, "next_block": 0, "n_blocks": n_blocks, "rows": [], "method": {}}
        return 0

    def ensure(self) -> Path:
        """The folder, created with its marker (refused if someone else's)."""
        if self.path.exists() and not (self.path / MARKER_NAME).is_file():
            raise D2PruneError(f"{self.path} exists and was not written by d2prune: move it away or choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER_NAME).write_text(f"{os.getpid()}\n")
        except OSError as e:
            raise D2PruneError(f"could not create the work folder {self.path}: {e.strerror or e}") from e
        return self.path

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

    def read_block(self, i: int, tag: str = "") -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.block_path(i, tag)))

    def commit(self, next_block: int, rows: list[dict], method_state: dict, extra: dict | None = None) -> None:
        """Record that every block before ``next_block`` is finished."""
        self.state.update({"next_block": next_block, "rows": rows, "method": method_state, **(extra or {})})
        if not self.writer:
            return
        _atomic_write(self.path / STATE_NAME, lambda p: p.write_text(json.dumps(self.state, indent=1, default=str)))

    # ------------------------------------------------------------------ end
    def remove(self) -> None:
        if self.writer and (self.path / MARKER_NAME).is_file():
            shutil.rmtree(self.path, ignore_errors=True)
        if self.temp_root is not None:  # the temporary folder we made, nothing above it
            shutil.rmtree(self.temp_root, ignore_errors=True)

