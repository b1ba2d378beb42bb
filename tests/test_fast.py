"""--fast: several calibration samples per block forward. Not bit-identical
to the references (statistics updated per batch), but the same pattern, exact
sparsity, and the exact mode's masks and weights up to rounding; samples whose
calls differ are never batched together."""

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
def test_fast_mode_batches_and_keeps_quality(stories, stories_calib, method, monkeypatch):
    """--fast really takes its path: every block forward of the prune (the
    calibration and the propagation pass) carries FAST_BATCH samples instead
    of one, and the inverse-Hessian factors come from the one-Cholesky path;
    the result stays the exact mode's up to rounding (masks, weights, perplexity)."""
    from d2prune.engine.calibration import FAST_BATCH
    from d2prune.config import parse_method_spec
    from d2prune.methods import sparsegpt as sg
    from d2prune import eval_text, eval_windows, find_blocks, find_prunable
    from d2prune.io.modeling import weight_matrix

    from conftest import WIKI

    dense, tok = stories
    windows = eval_windows(tok, eval_text("wikitext2", str(WIKI)), 128)[:20]
    factors: list[str] = []
    for kind in ("exact", "fast"):
        real = getattr(sg, f"_factor_{kind}")
        monkeypatch.setattr(sg, f"_factor_{kind}", lambda H, real=real, kind=kind: factors.append(kind) or real(H))
    n, n_blocks = stories_calib.shape[0], len(find_blocks(dense))
    assert n % FAST_BATCH == 0 and FAST_BATCH > 1
    ppl, weights = {}, {}
    for fast in (False, True):
        model = copy.deepcopy(dense)
        sizes: list[int] = []  # samples per block forward
        handles = [b.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
                   for b in find_blocks(model).layers]
        factors.clear()
        report = prune(model, PruneConfig(method=parse_method_spec(method), sparsity=0.5, device="cpu", fast=fast),
                       stories_calib)
        for h in handles:
            h.remove()
        # two passes (calibration, propagation) over every sample of every block
        assert sizes == ([FAST_BATCH] * (2 * n // FAST_BATCH) if fast else [1] * (2 * n)) * n_blocks
        if method != "wanda":
            assert factors and set(factors) == {"fast" if fast else "exact"}
        assert all(r.sparsity >= 0.5 for r in report.layers)
        weights[fast] = {n: weight_matrix(m).clone() for n, m in find_prunable(model).items()}
        ppl[fast] = perplexity(model, windows, device="cpu").ppl
    # within rounding of the exact mode (measured here: identical masks, weights within 5e-7, ppl within 2e-7)
    same = {k: (weights[True][k] == 0) == (weights[False][k] == 0) for k in weights[True]}
    assert sum(int(v.sum()) for v in same.values()) >= 0.999 * sum(v.numel() for v in same.values())
    for k, v in same.items():
        torch.testing.assert_close(weights[True][k][v], weights[False][k][v], rtol=1e-3, atol=1e-5, msg=k)
    assert abs(ppl[True] - ppl[False]) <= 1e-3 * ppl[False], ppl


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
