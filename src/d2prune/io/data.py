"""Calibration and evaluation data (docs/method.md §5).

Calibration follows the SparseGPT / Wanda / D²Prune reference sequence of
calls exactly, so the same seed, documents and tokenizer give the same samples
as those codes: ``random.seed(seed)``; per sample draw documents with
``randint(0, len(docs) - 1)`` until one tokenises (tokenizer defaults, special
tokens included) to MORE than ``seqlen`` tokens, then a window start
``randint(0, T - seqlen - 1)``.

Texts come from local files (``.jsonl`` / ``.jsonl.gz`` with a ``text`` field,
or plain ``.txt`` / ``.raw``) or, when no file is given, from the HuggingFace
hub through ``datasets`` (the C4 shard the references use, WikiText-2 raw).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import D2PruneError

log = logging.getLogger(__name__)

# The exact sources the reference implementations read from the hub.
C4_TRAIN = ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}, "train")
C4_VALIDATION = ("allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation")
WIKITEXT2_TEST = ("wikitext", "wikitext-2-raw-v1", None, "test")
C4_EVAL_DOCS = 1100  # SparseGPT protocol: first 1100 validation documents


@dataclass(frozen=True)
class EvalSet:
    """An evaluation text and its protocol (docs/method.md §5): where the hub
    keeps it, how many of its documents are joined (``None``: all) and how
    many windows of the joined text are scored (``None``: all)."""

    name: str
    hub: tuple
    max_docs: int | None = None
    max_windows: int | None = None


EVAL_SETS = {
    "wikitext2": EvalSet("wikitext2", WIKITEXT2_TEST),
    # SparseGPT's C4 protocol: the first 1100 validation documents, the first 256 windows of their text
    "c4": EvalSet("c4", C4_VALIDATION, max_docs=C4_EVAL_DOCS, max_windows=256),
}


# --------------------------------------------------------------------------- text sources
def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Rows of a local ``.jsonl[.gz]`` (``field`` of each object) or a whole
    ``.txt``/``.raw`` file (``.gz`` too) as one row. Every malformed input
    (truncated or corrupt gzip, bytes that are not UTF-8, a line that is not a
    JSON object with a string ``field``) is a one-line error naming the file
    and line."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise D2PruneError(f"data file {path} is a folder: pass a .jsonl or .txt file inside it")
    if not p.is_file():
        raise D2PruneError(f"data file {path} does not exist: pass an existing .jsonl or .txt file")
    gzipped = p.suffix == ".gz"
    json_lines = (p.name[:-3] if gzipped else p.name).endswith((".jsonl", ".json"))
    rows: list[str] = []
    lineno = 0
    try:
        # bytes, decoded line by line: an error is pinned to its line (text mode decodes 8 KB chunks ahead)
        with (gzip.open(p, "rb") if gzipped else open(p, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, lineno)
                if not json_lines:
                    rows.append(line)
                elif line.strip():
                    rows.append(_text_field(line, field, path, lineno))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise D2PruneError(f"{path} line {lineno + 1}: the gzip data is truncated or corrupt ({type(e).__name__}: "
                           f"{e}): download or compress the file again") from e
    except OSError as e:
        raise D2PruneError(f"cannot read {path}: {type(e).__name__}: {e.strerror or e}") from e
    return rows if json_lines else ["".join(rows)]


def _decode(raw: bytes, path: str | Path, lineno: int) -> str:
    """One line as text, newlines as Python's text mode gives them ("\r\n" and "\r" -> "\n")."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise D2PruneError(f"{path} line {lineno} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                           "convert the file to UTF-8") from None
    return line.replace("\r\n", "\n").replace("\r", "\n") if "\r" in line else line


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _text_field(line: str, field: str, path: str | Path, lineno: int) -> str:
    """``field`` of one JSON-lines row, which must be an object holding a string there."""
    want = f"each line must be a JSON object with a string {field!r}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise D2PruneError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}): {want}") from None
    if not isinstance(obj, dict):
        raise D2PruneError(f"{path} line {lineno} is {_JSON_KINDS.get(type(obj), 'a value')}, not an object: {want}")
    if field not in obj:
        raise D2PruneError(f"{path} line {lineno} has no {field!r} field: {want}")
    text = obj[field]
    if not isinstance(text, str):
        raise D2PruneError(f"{path} line {lineno}: {field!r} is {_JSON_KINDS.get(type(text), 'a value')}, "
                           f"not a string: {want}")
    return text


def hub_texts(path: str, name: str | None, data_files: dict | None, split: str, field: str = "text",
              limit: int | None = None) -> list[str]:
    """Rows of a ``datasets`` dataset (hub id, or a builder such as ``json``
    with local ``data_files``)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise D2PruneError("the `datasets` package is needed to read data from the hub: pip install datasets") from e
    try:
        ds = datasets.load_dataset(path, name, data_files=data_files, split=split)
    except Exception as e:
        raise D2PruneError(
            f"could not load dataset {path} ({split}) through `datasets`: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "offline? pass a local file (--calib-file / --eval-file)"
        ) from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return list(ds[field])


def calibration_texts(path: str | Path | None = None) -> list[str]:
    """C4 training documents: a local file if given, else the reference shard from the hub."""
    return read_texts(path) if path else hub_texts(*C4_TRAIN)


def eval_text(dataset: str = "wikitext2", path: str | Path | None = None) -> str:
    """The evaluation text, joined the way the references join it.

    WikiText-2: rows joined with "\\n\\n" (a ``.raw``/``.txt`` file is used as is).
    C4: the first 1100 validation documents joined with "\\n\\n" (D²Prune's
    code; SparseGPT joins with " ", a difference of a few tokens per document).
    """
    if dataset not in EVAL_SETS:
        raise D2PruneError(f"unknown evaluation dataset {dataset!r}: use {' or '.join(EVAL_SETS)}")
    spec = EVAL_SETS[dataset]
    rows = read_texts(path) if path else hub_texts(*spec.hub, limit=spec.max_docs)
    return "\n\n".join(rows[:spec.max_docs])


# the real data files inside a ``shared/data`` folder (see find_shared_data)
SHARED_C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"
SHARED_WIKI = "wikitext-2-raw/test.jsonl"


def find_shared_data() -> Path | None:
    """``$D2PRUNE_DATA``, else a ``shared/data`` folder beside the checkout or
    the working directory (the layout of this project's machines)."""
    env = os.environ.get("D2PRUNE_DATA")
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            cand = parent.parent / "shared" / "data"
            if (cand / "c4").is_dir() and (cand / "wikitext-2-raw").is_dir():
                return cand
    return None


# --------------------------------------------------------------------------- calibration
def sample_calibration(tokenizer, docs: Sequence[str], nsamples: int, seqlen: int, seed: int = 0,
                       used: set[int] | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids by the reference C4 protocol.

    Raises a one-line error when no document is longer than ``seqlen`` tokens
    (the reference codes loop forever there). ``used`` (if given) receives the
    indices of the documents the samples came from, so held-out text can avoid them.

    >>> ids = sample_calibration(tok, docs, nsamples=128, seqlen=256, seed=0)  # doctest: +SKIP
    """
    if not (isinstance(nsamples, int) and nsamples > 0):
        raise D2PruneError(f"nsamples {nsamples!r} must be a positive integer (the paper uses 128)")
    if not (isinstance(seqlen, int) and seqlen > 1):
        raise D2PruneError(f"seqlen {seqlen!r} must be an integer > 1")
    if len(docs) == 0:
        raise D2PruneError("the calibration text has no documents: pass a non-empty --calib-file")
    rng = random.Random(seed)  # same stream as the references' random.seed(seed) + random.randint
    lengths: dict[int, int] = {}  # doc index -> token count, to detect "all too short"
    long_ids: dict[int, torch.Tensor] = {}
    samples = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in lengths:
                ids = tokenizer(docs[i], return_tensors="pt").input_ids[0]
                lengths[i] = ids.numel()
                if lengths[i] > seqlen:
                    long_ids[i] = ids
            if lengths[i] > seqlen:
                break
            if len(lengths) == len(docs) and not long_ids:
                raise D2PruneError(
                    f"no calibration document is longer than seqlen={seqlen} tokens (longest: {max(lengths.values())}): "
                    "lower --seqlen or use longer texts"
                )
        ids = long_ids[i]
        if used is not None:
            used.add(i)
        j = rng.randint(0, ids.numel() - seqlen - 1)
        samples.append(ids[j:j + seqlen])
    return torch.stack(samples)


def heldout_windows(tokenizer, docs: Sequence[str], used: set[int] | None, nwindows: int, seqlen: int) -> torch.Tensor:
    """Windows of ``seqlen`` tokens from documents NOT in ``used`` (for selection
    objectives that must not see the evaluation set), taken in file order."""
    if not (isinstance(nwindows, int) and nwindows >= 1):
        raise D2PruneError(f"--heldout-windows {nwindows!r} must be an integer >= 1")
    out = []
    for i, doc in enumerate(docs):
        if used and i in used:
            continue
        ids = tokenizer(doc, return_tensors="pt").input_ids[0]
        for j in range(0, ids.numel() - seqlen + 1, seqlen):
            out.append(ids[j:j + seqlen])
            if len(out) == nwindows:
                return torch.stack(out)
    if not out:
        raise D2PruneError(f"no held-out document has {seqlen} tokens: lower --seqlen or give more text")
    return torch.stack(out)


# --------------------------------------------------------------------------- evaluation
def windows_arg(value: str) -> int | None:
    """``--eval-windows`` of every command (prune, eval, finetune): a number
    of windows >= 1, or ``all`` (None: every window). 0 is refused rather
    than read as "all" by one command and as an error by another."""
    if value.strip().lower() in ("all", "none"):
        return None
    return count_arg(value, "a number of windows: give N >= 1, or all for every window")


def count_arg(value: str, what: str = "a positive integer") -> int:
    """A command-line count: an integer >= 1, else argparse's one-line error ``VALUE is WHAT``."""
    import argparse

    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
    return n


def eval_windows(tokenizer, text: str, seqlen: int, what: str = "the evaluation text") -> torch.Tensor:
    """``[floor(T / seqlen), seqlen]`` non-overlapping windows of the tokenised text."""
    if not (isinstance(seqlen, int) and seqlen > 1):
        raise D2PruneError(f"seqlen {seqlen!r} must be an integer > 1")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise D2PruneError(f"{what} has {ids.numel()} tokens, fewer than seqlen={seqlen}: lower --seqlen or give more text")
    return ids[: n * seqlen].view(n, seqlen)
