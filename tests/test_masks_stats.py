"""Mask helpers and statistics against straightforward independent versions."""

from __future__ import annotations

import math

import pytest
import torch

from d2prune import D2PruneError, Sparsity
from d2prune.ops.masks import at_or_below_kth, lowest_in_matrix, lowest_per_row, nm_mask
from d2prune.ops.stats import RunningHessian, RunningSqNorm


def _scores(rows=16, cols=64, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows, cols, generator=g)
    if ties:  # many exact ties, including zeros (dead channels, pruned weights)
        s = torch.round(s * 4) / 4
    return s


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_exact_and_equal_to_reference_loop(n, m, ties):
    s = _scores(ties=ties)
    mask = nm_mask(s, n, m)
    # exact N:M: every group of M consecutive weights of a row has N pruned
    assert torch.all(mask.reshape(s.shape[0], -1, m).sum(-1) == n)
    # the references' per-group loop (wanda/sparsegpt): topk per M columns
    ref = torch.zeros_like(s, dtype=torch.bool)
    for ii in range(0, s.shape[1], m):
        ref.scatter_(1, ii + torch.topk(s[:, ii:ii + m], n, dim=1, largest=False)[1], True)
    assert torch.equal(mask, ref)
    # pruned weights are never scored above kept ones in their group
    g, gm = s.reshape(s.shape[0], -1, m), mask.reshape(s.shape[0], -1, m)
    assert torch.all(torch.where(gm, g, -math.inf).amax(-1) <= torch.where(~gm, g, math.inf).amin(-1))


def test_nm_mask_rejects_width_not_multiple_of_m():
    with pytest.raises(D2PruneError, match="multiple of M"):
        nm_mask(torch.rand(4, 10), 2, 4)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_equals_stable_sort(ratio, ties):
    """Our O(n) selection picks exactly what the references' stable sort picks."""
    s = _scores(rows=32, cols=96, ties=ties, seed=4)
    k = int(96 * ratio)
    ref = torch.zeros_like(s, dtype=torch.bool)
    if k:
        ref.scatter_(1, torch.sort(s, dim=-1, stable=True)[1][:, :k], True)
    assert torch.equal(lowest_per_row(s, ratio), ref)
    flat_ref = torch.zeros(s.numel(), dtype=torch.bool)
    kk = int(s.numel() * ratio)
    if kk:
        flat_ref[torch.sort(s.flatten(), stable=True)[1][:kk]] = True
    assert torch.equal(lowest_in_matrix(s, ratio), flat_ref.view_as(s))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_rules_exact_counts(ratio):
    s = _scores(cols=64, ties=True)
    per_row = lowest_per_row(s, ratio)
    assert torch.all(per_row.sum(1) == int(64 * ratio))
    per_matrix = lowest_in_matrix(s, ratio)
    assert int(per_matrix.sum()) == int(s.numel() * ratio)
    # everything pruned scores <= everything kept
    if 0 < ratio:
        assert s[per_matrix].max() <= s[~per_matrix].min()
    s_unique = _scores(cols=64, ties=False)
    block = at_or_below_kth(s_unique, ratio)
    # SparseGPT's rule: the int(numel*p)-th smallest is included -> one more
    assert int(block.sum()) == (int(s.numel() * ratio) + 1 if ratio > 0 else 0)


def test_sparsity_parsing_and_validation():
    assert Sparsity.parse("0.5").ratio == 0.5 and not Sparsity.parse("0.5").is_nm
    assert Sparsity.parse("50%").ratio == 0.5
    s = Sparsity.parse("2:4")
    assert (s.n, s.m, s.ratio) == (2, 4, 0.5)
    for bad in ["1.0", "-0.1", "4:4", "0:4", "5:4", "abc", "nan"]:
        with pytest.raises(D2PruneError):
            Sparsity.parse(bad)


def _samples(n=6, L=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, L, d, generator=g) for _ in range(n)]


def test_hessian_incremental_equals_batch():
    xs = _samples()
    acc = RunningHessian(8, torch.device("cpu"))
    for x in xs:
        acc.update(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    H = 2 / len(xs) * X.t() @ X  # (2/N) sum_k X_k^T X_k
    torch.testing.assert_close(acc.H.double(), H, rtol=1e-5, atol=1e-6)
    # batch of several samples per call: same statistic
    acc2 = RunningHessian(8, torch.device("cpu"))
    acc2.update(torch.cat(xs[:4]))
    acc2.update(torch.cat(xs[4:]))
    torch.testing.assert_close(acc2.H, acc.H, rtol=1e-5, atol=1e-6)


def test_sq_norm_incremental_equals_batch():
    xs = _samples()
    acc = RunningSqNorm(8, torch.device("cpu"))
    for x in xs:
        acc.update(x)
    X = torch.stack([x[0] for x in xs]).double()  # [N, L, d]
    ref = (X ** 2).sum(1).mean(0)  # mean over samples of ||X_k[:, j]||^2
    torch.testing.assert_close(acc.value.double(), ref, rtol=1e-5, atol=1e-6)
    acc2 = RunningSqNorm(8, torch.device("cpu"))
    acc2.update(torch.cat(xs))
    torch.testing.assert_close(acc2.value, acc.value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_by_rows_chunks_equal_the_whole_matrix(monkeypatch, ties):
    """A row-local rule evaluated a few rows at a time (how wide layers bound
    their temporaries) gives the mask of the whole matrix at once, ties and a
    last partial chunk included; Wanda's layer mask is such a rule."""
    import d2prune.ops.masks as masks
    from d2prune.methods.wanda import WandaLayer, wanda_score
    from d2prune.ops.stats import InputStats

    s = _scores(rows=37, cols=96, ties=ties, seed=5)
    sparsity = Sparsity.parse("0.5")
    whole = masks.row_mask(s, sparsity)
    monkeypatch.setattr(masks, "ROW_CHUNK_ELEMENTS", 96 * 5)  # 5 rows per chunk, 8 chunks
    assert torch.equal(masks.by_rows(s, lambda w: masks.row_mask(w, sparsity)), whole)
    nm = Sparsity.parse("2:4")
    assert torch.equal(masks.by_rows(s, lambda w: masks.row_mask(w, nm)), masks.nm_mask(s, 2, 4))

    W = torch.randn(37, 96)
    stats = InputStats(96, torch.device("cpu"), ["sq_norm"])
    stats.update(torch.randn(1, 50, 96))
    sq = stats["sq_norm"].value
    assert torch.equal(WandaLayer("x", sparsity).mask(W, stats), masks.row_mask(wanda_score(W, sq), sparsity))
