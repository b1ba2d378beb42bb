"""Data loading: the reference calibration protocol, the ``datasets`` path on
local files, and the WikiText-2 loader cross-checked against the raw file."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import C4, WIKI, WIKI_RAW, needs_shared
from d2prune import D2PruneError, eval_text, eval_windows, read_texts, sample_calibration
from d2prune.io.data import hub_texts

pytestmark = needs_shared


def reference_c4_samples(tokenizer, docs, nsamples, seqlen, seed):
    """The SparseGPT/Wanda/D2Prune ``get_c4`` loop, transcribed (global random)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out)


def test_calibration_follows_reference_protocol(stories, c4_docs):
    tok = stories[1]
    ours = sample_calibration(tok, c4_docs, nsamples=32, seqlen=256, seed=0)
    assert ours.shape == (32, 256)
    assert torch.equal(ours, reference_c4_samples(tok, c4_docs, 32, 256, 0))
    assert not torch.equal(ours, sample_calibration(tok, c4_docs, nsamples=32, seqlen=256, seed=1))
    # our sampler does not disturb the caller's global random state
    random.seed(5)
    a = random.random()
    random.seed(5)
    sample_calibration(tok, c4_docs, nsamples=2, seqlen=64, seed=0)
    assert random.random() == a


def test_datasets_loader_on_local_files(c4_docs):
    rows = hub_texts("json", None, {"train": str(C4)}, "train")
    assert rows == c4_docs and len(rows) == 1000


def test_wikitext_loader_matches_raw_file():
    rows = read_texts(WIKI)
    assert len(rows) == 4358
    assert "".join(rows) == read_texts(WIKI_RAW)[0]  # the rows are the raw file's lines
    assert eval_text("wikitext2", WIKI) == "\n\n".join(rows)


def test_eval_windows_non_overlapping(stories):
    tok = stories[1]
    text = eval_text("wikitext2", WIKI)
    w = eval_windows(tok, text, 256)
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert w.shape == (ids.numel() // 256, 256)
    assert torch.equal(w.flatten(), ids[: w.numel()])
    with pytest.raises(D2PruneError, match="fewer than seqlen"):
        eval_windows(tok, "too short", 256)
