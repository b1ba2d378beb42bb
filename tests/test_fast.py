"""--fast: several calibration samples per block forward. Not bit-identical
to the references (statistics updated per batch), but the same pattern, exact
sparsity, and perplexity within 1% of the exact mode; samples whose calls
differ are never batched together."""

from __future__ import annotations

import copy

import pytest
import torch

from d2prune import PruneConfig, perplexity, prune
from d2prune.engine import BlockCall, BlockInputs, sample_batches

from conftest import needs_shared


def test_batches_only_join_samples_with_the_same_call():
    mask_a, mask_b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    calls = [BlockCall((), {"attention_mask": m, "flag": f}) for m, f in
             [(mask_a, 1), (mask_a, 1), (mask_a, 1), (mask_b, 1), (mask_b, 1), (mask_b, 2), (mask_b, 2)]]
    inputs = BlockInputs(torch.zeros(7, 4, 2), [calls])
    assert list(sample_batches(inputs, 0, 7, 8)) == [(0, 3), (3, 5), (5, 7)]
    assert list(sample_batches(inputs, 0, 7, 2)) == [(0, 2), (2, 3), (3, 5), (5, 7)]
    assert list(sample_batches(inputs, 0, 7, 1)) == [(j, j + 1) for j in range(7)]


@needs_shared
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "d2prune:frozen=k"])
def test_fast_mode_keeps_quality(stories, stories_calib, method):
    from d2prune.config import parse_method_spec

    dense, tok = stories
    from d2prune import eval_text, eval_windows

    from conftest import WIKI

    windows = eval_windows(tok, eval_text("wikitext2", str(WIKI)), 128)[:20]
    ppl = {}
    for fast in (False, True):
        model = copy.deepcopy(dense)
        report = prune(model, PruneConfig(method=parse_method_spec(method), sparsity=0.5, device="cpu", fast=fast),
                       stories_calib)
        assert all(r.sparsity >= 0.5 for r in report.layers)
        ppl[fast] = perplexity(model, windows, device="cpu").ppl
    assert abs(ppl[True] - ppl[False]) <= 0.01 * ppl[False], ppl
