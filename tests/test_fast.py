"""--fast: several calibration samples per block forward. Not bit-identical
to the references (statistics updated per batch), but the same pattern, exact
sparsity, and perplexity within 1% of the exact mode; samples whose calls
differ are never batched together."""

from __future__ import annotations

import copy

import pytest
import torch

from d2prune import PruneConfig, perplexity, prune
from d2prune.engine.sequential import BlockCall, BlockInputs, sample_batches

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


@pytest.mark.parametrize("rescaled", [False, True])
def test_index_weighted_buffers_batch_like_one_sample_steps(rescaled):
    """D²Prune-faithful's running buffers (``buf *= n/(n+1); buf += t``) fed
    a batch under --fast end where the reference's one-sample steps end."""
    from d2prune.methods.d2prune.method import InputNormIW, OutputNorm, ScaledInputNormIW

    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 7, 5, generator=g, dtype=torch.float64).float()
    cls = ScaledInputNormIW if rescaled else InputNormIW
    one, batched = cls(5, torch.device("cpu"), 3.0), cls(5, torch.device("cpu"), 3.0)
    out_one, out_batched = OutputNorm(3.0, True), OutputNorm(3.0, True)
    for j in range(11):
        one.update(x[j:j + 1])
        out_one.update(x[j:j + 1])
    for j0, j1 in [(0, 1), (1, 4), (4, 11)]:
        batched.update(x[j0:j1])
        out_batched.update(x[j0:j1])
    assert one.n == batched.n == 11
    torch.testing.assert_close(batched.value, one.value, rtol=1e-5, atol=0)
    torch.testing.assert_close(out_batched.value, out_one.value, rtol=1e-5, atol=0)


def test_fast_inverse_hessian_factor_and_obs_match_the_exact_ones():
    """--fast's one-Cholesky factor equals the reference's chol(H^-1)^T, and
    its grouped in-block OBS updates give the same masks and weights (float
    rounding aside) for unstructured and N:M sparsity."""
    from d2prune.config import Sparsity
    from d2prune.methods.sparsegpt import inverse_hessian_factor, obs_prune

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 200, generator=g) * torch.rand(200, generator=g) * 3
    H = x.t() @ x / 3000
    H[:, 7] = H[7, :] = 0  # a dead input
    exact, dead = inverse_hessian_factor(H.clone(), 0.01)
    fast, dead_fast = inverse_hessian_factor(H.clone(), 0.01, fast=True)
    assert torch.equal(dead, dead_fast) and torch.equal(fast, torch.triu(fast))
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-6)
    W = torch.randn(64, 200, generator=g)
    for sparsity in ("0.5", "0.7", "2:4", "4:8"):
        sp = Sparsity.parse(sparsity)
        We, me = obs_prune(W.clone(), exact, dead, sp)
        Wf, mf = obs_prune(W.clone(), exact, dead, sp, fast=True)
        assert (me == mf).float().mean() > 0.999, sparsity
        torch.testing.assert_close(Wf, We, rtol=1e-4, atol=1e-5)
