"""D²Prune: each variant's statistics and scores against straightforward
computations written here; the q/k/v choices; diagnostics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import WIKI, forward_calls, needs_shared, tiny_model
from d2prune import PruneConfig, Sparsity, eval_windows, eval_text, find_blocks, find_prunable, perplexity, prune
from d2prune import D2PruneConfig
from d2prune.evaluation.diagnostics import attention_diff
from d2prune.methods.d2prune.method import d2_sparsegpt_score, d2_wanda_score
from d2prune.io.modeling import weight_matrix
from test_sparsegpt import textbook_obs

CPU = torch.device("cpu")
S = 1500.0


# --------------------------------------------------------------------------- independent statistics
@pytest.fixture(scope="module")
def block0_io(stories, stories_calib):
    """Per-sample inputs X_k [L, d_in] and outputs Y_k [L, d_out] of every
    Linear of block 0, from the model's own forward (not the engine)."""
    calls = forward_calls(stories[0], find_prunable(stories[0].model.layers[0]), stories_calib)
    return {n: ([inp[0][0].clone() for inp, _ in c], [out[0].clone() for _, out in c]) for n, c in calls.items()}


def closed_form(X, Y, variant, S=S):
    """The D²Prune statistics in closed form (float64), scale ``S``. faithful/paper:
    the authors' running buffers are index-weighted sums (1/N) sum_k k t_k."""
    N = len(X)
    nx = torch.stack([x.double().norm(dim=0) for x in X])  # [N, d_in]: ||X_k[:, j]||
    ny = torch.stack([y.double().norm(dim=0) for y in Y])
    a = (nx ** 2).mean(0)
    H = 2 / N * sum(x.double().t() @ x.double() for x in X)
    if variant == "normalized":
        return {"a": a, "H": H, "y": ny.mean(0) / S, "dx_sg": nx.mean(0) / S, "dx_w": nx.mean(0) / S}
    k = torch.arange(1, N + 1, dtype=torch.float64).reshape(-1, 1)
    return {"a": a, "H": H, "y": (k * ny).sum(0) / N / S,
            "dx_sg": (k * torch.sqrt(2 / k) * nx).sum(0) / N / S,  # norm of the rescaled sqrt(2/k) X_k
            "dx_w": (k * nx).sum(0) / N / S}


def _pruned_d2(stories, calib, frozen, variant, sparsity=0.5, heldout=None, **opts):
    model = copy.deepcopy(stories[0])
    cfg = PruneConfig(method=D2PruneConfig(frozen=frozen, variant=variant, **opts), sparsity=sparsity, device="cpu")
    return model, prune(model, cfg, calib, heldout)


# Settings where the activation terms move the masks (checked below): at the
# defaults (r1 = 1, r2 = 0, s = 1500) they move none of block 0's k_proj or
# q_proj on stories260K, so a wrong y or dx would go unseen. paper and
# normalized D2-Wanda rank |W| dx almost as Wanda does (a_j ~ (s dx_j)^2), so
# only a large r2 (non-monotone in |W| dx) moves their masks.
ACTIVE = [("faithful", 1.0, 5.0, 30.0), ("paper", 1.0, 5.0, 10.0), ("normalized", 1.0, 8.0, 2.0)]


def _row_mask(score, ratio=0.5):
    k = int(score.shape[1] * ratio)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], True)


@needs_shared
@pytest.mark.parametrize("variant,r1,r2,s", ACTIVE)
def test_d2_wanda_layer_equals_closed_form(stories, stories_calib, block0_io, variant, r1, r2, s):
    """The frozen k_proj of block 0: mask from the independent score
    ``W^2 a + r1 y |W| dx^e - r2 W^2 dx^2``, at settings where both activation
    terms change it (against Wanda's W^2 a, and against r2 = 0)."""
    X, Y = block0_io["self_attn.k_proj"]
    st = closed_form(X, Y, variant, s)
    W = weight_matrix(stories[0].model.layers[0].self_attn.k_proj).double()
    e = 0 if variant == "faithful" else 1
    first = W ** 2 * st["a"] + r1 * st["y"].reshape(-1, 1) * W.abs() * st["dx_w"] ** e
    ref_mask = _row_mask(first - r2 * W ** 2 * st["dx_w"] ** 2)
    assert (ref_mask != _row_mask(W ** 2 * st["a"])).float().mean() > 0.02  # not Wanda's mask
    assert (ref_mask != _row_mask(first)).float().mean() > 0.01  # the r2 (dx^2) term moves it too
    model, _ = _pruned_d2(stories, stories_calib, "k", variant, r1=r1, r2=r2, s=s)
    got = weight_matrix(model.model.layers[0].self_attn.k_proj)
    assert torch.equal(got == 0, ref_mask)
    assert torch.equal(got[~ref_mask], weight_matrix(stories[0].model.layers[0].self_attn.k_proj)[~ref_mask])  # no update


@needs_shared
@pytest.mark.parametrize("variant,r1,r2,s", [a for a in ACTIVE if a[0] != "paper"])  # paper's = faithful's here
def test_d2_sparsegpt_layer_equals_textbook_obs_with_d2_score(stories, stories_calib, block0_io, variant, r1, r2, s):
    """Block 0's q_proj (d_in 64 = one column block): OBS with the eq 10 score
    ``W^2 / U_jj^2 + r1 y |W| dx - r2 W^2 dx^2``, at settings where the
    activation terms change the mask (against plain SparseGPT's)."""
    X, Y = block0_io["self_attn.q_proj"]
    st = closed_form(X, Y, variant, s)
    W = weight_matrix(stories[0].model.layers[0].self_attn.q_proj).double()
    dx, y = st["dx_sg"], st["y"].reshape(-1, 1)
    # textbook OBS; its mask uses W^2 / [H_F^-1]_jj^2 + r1 * y |W| dx - r2 W^2 dx^2
    extra = lambda Wb, cols: r1 * y * Wb.abs() * dx[cols].reshape(1, -1) - r2 * Wb ** 2 * dx[cols].reshape(1, -1) ** 2
    ref, ref_mask = textbook_obs(W, st["H"], Sparsity.parse("0.5"), extra=extra)
    assert (ref_mask != textbook_obs(W, st["H"], Sparsity.parse("0.5"))[1]).float().mean() > 0.02  # not SparseGPT's
    model, _ = _pruned_d2(stories, stories_calib, "k", variant, r1=r1, r2=r2, s=s)
    got = weight_matrix(model.model.layers[0].self_attn.q_proj).double()
    assert torch.equal(got == 0, ref_mask)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_score_functions_equal_formulas():
    g = torch.Generator().manual_seed(0)
    W, d = torch.randn(6, 8, generator=g), torch.rand(8, generator=g) + 0.5
    y, dx, a = torch.rand(6, generator=g), torch.rand(8, generator=g), torch.rand(8, generator=g)
    r1, r2 = 0.7, 0.3
    ref = W ** 2 / d ** 2 + r1 * y[:, None] * W.abs() * dx[None] - r2 * W ** 2 * dx[None] ** 2
    torch.testing.assert_close(d2_sparsegpt_score(W, d, y, dx, r1, r2), ref)
    for e in (0, 1):
        ref = W ** 2 * a[None] + r1 * y[:, None] * W.abs() * dx[None] ** e - r2 * W ** 2 * dx[None] ** 2
        torch.testing.assert_close(d2_wanda_score(W, a, y, dx, r1, r2, e), ref)


@needs_shared
def test_paper_and_faithful_differ_only_in_d2_wanda(stories, stories_calib):
    """docs/method.md §3.1: the only difference is dx^e in D2-Wanda (the frozen
    projection). Block 0 sees identical inputs, so every updated layer of it
    is bit-identical and only k_proj differs. (r1 = 100 makes the r1 term
    large enough to move the mask; at r1 = 1 it moves ~0.01% of k_proj.)"""
    fa, _ = _pruned_d2(stories, stories_calib, "k", "faithful", r1=100.0)
    pa, _ = _pruned_d2(stories, stories_calib, "k", "paper", r1=100.0)
    la, lb = find_prunable(fa.model.layers[0]), find_prunable(pa.model.layers[0])
    for n in la:
        same = torch.equal(weight_matrix(la[n]), weight_matrix(lb[n]))
        assert same == (n != "self_attn.k_proj"), n


@needs_shared
def test_normalized_is_sample_order_invariant(stories, stories_calib, block0_io):
    """normalized statistics do not depend on the order of the samples; the
    faithful (index-weighted) ones do."""
    from d2prune.methods.d2prune.method import InputNormIW, InputNormMean, OutputNorm

    X, Y = block0_io["self_attn.k_proj"]
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(3)).tolist()

    def run(cls_in, iw, order):
        acc, out = cls_in(X[0].shape[1], CPU, S), OutputNorm(S, iw)
        for j in order:
            acc.update(X[j][None])
            out.update(Y[j][None])
        return acc.value, out.value

    ident = list(range(len(X)))
    a1, y1 = run(InputNormMean, False, ident)
    a2, y2 = run(InputNormMean, False, perm)
    torch.testing.assert_close(a1, a2, rtol=1e-6, atol=0)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=0)
    f1, g1 = run(InputNormIW, True, ident)
    f2, g2 = run(InputNormIW, True, perm)
    assert (f1 - f2).abs().max() / f1.abs().max() > 1e-2 and (g1 - g2).abs().max() / g1.abs().max() > 1e-2
    # and the whole prune: identical masks of the frozen layer of block 0 under a permutation
    m1, _ = _pruned_d2(stories, stories_calib, "k", "normalized")
    m2, _ = _pruned_d2(stories, stories_calib[perm], "k", "normalized")
    k1 = weight_matrix(m1.model.layers[0].self_attn.k_proj) == 0
    k2 = weight_matrix(m2.model.layers[0].self_attn.k_proj) == 0
    assert torch.equal(k1, k2)


# --------------------------------------------------------------------------- choosing the frozen projection
@needs_shared
def test_auto_picks_lowest_heldout_and_equals_fixed_run(stories, stories_calib, c4_docs):
    from d2prune.io.data import heldout_windows, sample_calibration

    used: set[int] = set()
    calib = sample_calibration(stories[1], c4_docs, 16, 128, 0, used)
    assert torch.equal(calib, stories_calib)
    held = heldout_windows(stories[1], c4_docs, used, 6, 128)
    model, report = _pruned_d2(stories, calib, "auto", "faithful", heldout=held)
    scores = report.method["heldout_ppl"]
    assert set(scores) == {"q", "k", "v"} and report.method["chosen"] == min(scores, key=scores.get)
    assert report.method["cost_vs_one_prune"] > 1
    # the lock-step search gives exactly what a fixed run with the chosen projection gives
    fixed, _ = _pruned_d2(stories, calib, report.method["chosen"], "faithful")
    for (n, a), b in zip(model.state_dict().items(), fixed.state_dict().values()):
        assert torch.equal(a, b), n
    # and the recorded score is the chosen model's own held-out perplexity
    ppl = perplexity(model, held, device="cpu").ppl
    assert math.isclose(ppl, scores[report.method["chosen"]], rel_tol=1e-4)


@needs_shared
def test_per_layer_records_choice_per_block(stories, stories_calib):
    model, report = _pruned_d2(stories, stories_calib[:8], "per-layer", "faithful")
    per_block = report.method["per_block"]
    assert len(per_block) == 5
    for b, rec in per_block.items():
        obj = rec["objective"]
        assert rec["frozen"] == min(obj, key=obj.get)
        for c in "qkv":
            assert math.isclose(obj[c], rec["block_error"][c] + 1.0 * rec["attention_kl"][c], rel_tol=1e-9)
    # block 0's weights equal a fixed run with block 0's choice (same inputs;
    # per-layer runs eager attention to read the probabilities, so does this run)
    from d2prune.io.modeling import eager_attention

    with eager_attention(stories[0]):
        fixed, _ = _pruned_d2(stories, stories_calib[:8], per_block["0"]["frozen"], "faithful")
    for n, m in find_prunable(model.model.layers[0]).items():
        assert torch.equal(weight_matrix(m), weight_matrix(find_prunable(fixed.model.layers[0])[n])), n


@needs_shared
def test_outlier_rule_freezes_highest_outlier_ratio(stories, stories_calib):
    model, report = _pruned_d2(stories, stories_calib[:4], "outlier", "faithful")
    for b, ratios in report.method["outlier_ratios"].items():
        attn = stories[0].model.layers[int(b)].self_attn
        for role in "qkv":
            W = getattr(attn, f"{role}_proj").weight.abs()
            assert math.isclose(ratios[role], float((W > W.mean()).float().mean()), rel_tol=1e-6)
        assert report.method["frozen_per_block"][b] == [max(ratios, key=ratios.get)]


def test_fused_qkv_split_equals_separate_layers():
    """GPT-2's fused c_attn with k frozen: the k rows are pruned without update
    (Wanda-style, exactly int(cols*p) per row), the q/v rows with OBS."""
    model = tiny_model("gpt2")
    dense_w = weight_matrix(model.transformer.h[0].attn.c_attn).clone()
    prune(model, PruneConfig(method=D2PruneConfig(frozen="k"), sparsity=0.5, device="cpu"), torch.randint(0, 128, (4, 16)))
    W = weight_matrix(model.transformer.h[0].attn.c_attn)
    d = W.shape[0] // 3
    k_rows, dense_k = W[d:2 * d], dense_w[d:2 * d]
    assert torch.all((k_rows == 0).sum(1) == W.shape[1] // 2)
    assert torch.equal(k_rows[k_rows != 0], dense_k[k_rows != 0])  # no update
    q_rows = W[:d]
    assert not torch.equal(q_rows[q_rows != 0], dense_w[:d][q_rows != 0])  # updated


def test_frozen_on_unsplittable_fused_layout_is_an_error():
    import transformers as tf

    from d2prune import D2PruneError

    torch.manual_seed(0)  # MPT's Wqkv (GPT-NeoX's interleaved layout is split: tests/test_qkv_layouts.py)
    cfg = tf.MptConfig(vocab_size=128, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(D2PruneError, match="Wqkv fuses q/k/v in a layout that d2prune does not split"):
        prune(model, PruneConfig(method=D2PruneConfig(frozen="k"), sparsity=0.5, device="cpu"), torch.randint(0, 128, (2, 16)))
    prune(model, PruneConfig(method=D2PruneConfig(frozen="none"), sparsity=0.5, device="cpu"), torch.randint(0, 128, (2, 16)))


# --------------------------------------------------------------------------- diagnostics
@needs_shared
def test_diagnostics_zero_for_model_against_itself(stories):
    windows = eval_windows(stories[1], eval_text("wikitext2", WIKI), 64)[:3]
    rows = attention_diff(stories[0], copy.deepcopy(stories[0]), windows, CPU)
    assert len(rows) == 5 and all(r.kl == 0 and r.rmse == 0 for r in rows)


def _attention_of(model, windows):
    """Per block: attention probabilities and attention-module outputs of the
    model's own forward (eager attention returns the probabilities)."""
    calls = forward_calls(model, {k: b.self_attn for k, b in enumerate(find_blocks(model).layers)}, windows)
    return ([torch.cat([out[1] for _, out in calls[k]]).double() for k in sorted(calls)],
            [torch.cat([out[0] for _, out in calls[k]]).double() for k in sorted(calls)])


def test_diagnostics_equal_kl_div_and_rmse_of_the_models_own_forward():
    """Every block's KL(pruned || dense) of the attention rows against
    torch.nn.functional.kl_div, and its attention-output RMSE, from each
    model's own forward: a wrong block, swapped KL arguments or a wrong mean fail."""
    dense = tiny_model("llama")
    with torch.no_grad():  # sharper attention than a random init gives: KL far above fp32 rounding
        for b in dense.model.layers:
            b.self_attn.q_proj.weight *= 4
            b.self_attn.k_proj.weight *= 4
    pruned = copy.deepcopy(dense)  # pruned hard: KL(p || q) and KL(q || p) then differ well beyond rounding
    prune(pruned, PruneConfig(method=D2PruneConfig(frozen="k"), sparsity=0.9, device="cpu"), torch.randint(0, 128, (4, 16)))
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(5))
    rows = attention_diff(dense, pruned, windows, CPU)
    (pd, od), (pp, op) = _attention_of(dense, windows), _attention_of(pruned, windows)
    assert [r.block for r in rows] == list(range(len(pd)))
    for r, q, p, yd, yp in zip(rows, pd, pp, od, op):
        kl = torch.nn.functional.kl_div(torch.log(q).masked_fill(p == 0, 0.0), p, reduction="none").sum(-1)
        reverse = torch.nn.functional.kl_div(torch.log(p).masked_fill(q == 0, 0.0), q, reduction="none").sum(-1)
        # equal up to fp32 rounding (~1e-7 here); the reverse KL (swapped arguments) is ~1e-3 away
        assert abs(r.kl - float(kl.mean())) < 1e-5 * r.kl < abs(r.kl - float(reverse.mean())), r
        assert math.isclose(r.rmse, float((yp - yd).pow(2).mean().sqrt()), rel_tol=1e-5), r


def test_phi3_fused_qkv_with_gqa_split():
    """Phi-3's qkv_proj rows are [q (heads*hd); k (kv*hd); v (kv*hd)]: freezing k
    prunes exactly those rows without update."""
    model = tiny_model("phi3")
    attn = model.model.layers[0].self_attn
    dense_w = weight_matrix(attn.qkv_proj).clone()
    prune(model, PruneConfig(method=D2PruneConfig(frozen="k"), sparsity=0.5, device="cpu"), torch.randint(0, 128, (4, 16)))
    W = weight_matrix(attn.qkv_proj)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, k = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    k_rows = W[q:q + k]
    assert torch.all((k_rows == 0).sum(1) == W.shape[1] // 2)
    assert torch.equal(k_rows[k_rows != 0], dense_w[q:q + k][k_rows != 0])
    v_rows = W[q + k:]
    assert not torch.equal(v_rows[v_rows != 0], dense_w[q + k:][v_rows != 0])


def test_auto_without_a_work_folder_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """--frozen auto spills candidates to a private temporary folder when the
    run has no --out; it is removed whole afterwards (not only its content)."""
    import tempfile

    from conftest import tiny_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (4, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    prune(model, PruneConfig(method="d2prune", sparsity=0.5), calib, held)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("d2prune")] == []
