"""Mixture-of-experts models: every expert pruned from its own routed tokens,
by every method, with an honest record (docs/moe.md)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers

from d2prune import D2PruneError, PruneConfig, Sparsity, prune
from d2prune.io.experts import unfused
from conftest import needs_shared
from moe_models import ARCHS, expert_matrices, experts_module, tiny
from test_sparsegpt import textbook_obs

METHODS = ("magnitude", "wanda", "sparsegpt", "ria", "pruner-zero", "d2prune")


def calibration(n=4, length=32, seed=1):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def block_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n}


@pytest.mark.parametrize("kind", ARCHS)
def test_per_expert_views_compute_the_models_own_forward(kind):
    model = tiny(kind)
    ids = calibration()
    with torch.no_grad():
        ref = model(ids).logits
        with unfused(model) as modules:
            got = model(ids).logits
            assert len(modules) == 2
            names = {n for n, _ in model.named_modules()}
            assert "model.layers.1.mlp.experts.3.down_proj" in names
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the views are gone afterwards and the state dict never changed
    assert not any(".experts.0." in n for n, _ in model.named_modules())
    assert set(model.state_dict()) == set(tiny(kind).state_dict())


def _check_pruned(kind, model, before, sparsity: Sparsity):
    """Every expert matrix (read from the fused parameters by hand) at the
    target; routers unchanged bit for bit."""
    for i, block in enumerate(model.model.layers):
        experts = experts_module(block)
        for e in range(experts.gate_up_proj.shape[0]):
            for role, W in expert_matrices(kind, experts, e).items():
                zero = W == 0
                if sparsity.is_nm:
                    groups = zero.reshape(W.shape[0], -1, sparsity.m).sum(-1)
                    assert bool((groups >= sparsity.n).all()), f"block {i} expert {e} {role} is not {sparsity}"
                else:
                    frac = float(zero.float().mean())
                    assert sparsity.ratio <= frac <= sparsity.ratio + 0.01, f"block {i} expert {e} {role}: {frac}"
    for n, p in model.named_parameters():
        if ".mlp.gate." in n or ".mlp.router." in n or "shared_expert_gate" in n:
            assert torch.equal(p, before[n]), f"router {n} changed"


def _direct_overall(model) -> float:
    tot = zero = 0
    for n, p in model.named_parameters():
        if ".layers." in n and p.dim() >= 2:
            tot += p.numel()
            zero += int((p == 0).sum())
    return zero / tot


# Mixtral: concatenated [2I, H]; GPT-OSS: transposed, interleaved [H, 2I] with biases (the other
# architectures and patterns run Wanda and SparseGPT in the mask test below)
@pytest.mark.parametrize("kind,pattern", [("mixtral", "0.5"), ("gpt_oss", "2:4")])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_every_expert(kind, method, pattern):
    model = tiny(kind)
    before = block_weights(model)
    ids = calibration()
    report = prune(model, PruneConfig(method=method, sparsity=pattern, moe_min_tokens=0), ids,
                   heldout=calibration(2, seed=7))
    _check_pruned(kind, model, before, Sparsity.parse(pattern))
    assert report.sparsity >= 0.5 and report.overall_sparsity == pytest.approx(_direct_overall(model), abs=1e-9)


# --------------------------------------------------------------------------- statistics from routed tokens
def routed_inputs(kind, model, ids, block=0):
    """``{expert: (x, h)}``: the tokens the router of ``block`` sends to each
    expert (its gate/up input ``x``) and its down projection's input ``h``,
    captured with a hook on the model's own forward (sample by sample, as the
    engine calibrates) and computed with the experts module's own gate."""
    experts = experts_module(model.model.layers[block])
    sig = inspect.signature(type(experts).forward)
    calls = []

    def hook(module, args, kwargs):
        bound = sig.bind(module, *args, **kwargs)
        a = list(bound.arguments.values())[1:4]
        calls.append(tuple(t.detach().clone() for t in a))

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j:j + 1])
    h.remove()
    out = {}
    E = experts.gate_up_proj.shape[0]
    for e in range(E):
        xs = [x[(idx == e).any(-1)] for x, idx, _ in calls]
        gates = torch.cat([(w * (idx == e)).sum(-1)[(idx == e).any(-1)] for _, idx, w in calls])
        x = torch.cat(xs)
        W = expert_matrices(kind, experts, e)
        with torch.no_grad():
            g, u = x @ W["gate_proj"].t(), x @ W["up_proj"].t()
            if kind == "gpt_oss":
                b = experts.gate_up_proj_bias[e]
                g, u = g + b[::2], u + b[1::2]
                hidden = experts._apply_gate(torch.stack([g, u], -1).flatten(-2))
            else:
                hidden = experts._apply_gate(torch.cat([g, u], -1))
        out[e] = (x, hidden, [len(t) for t in xs])
        GATES[(id(model), e)] = gates
    return out


GATES: dict = {}  # (model, expert) -> the gate weight of each routed token of block 0, from routed_inputs


def wanda_direct(W, X, sparsity: Sparsity):
    score = W.abs() * X.norm(dim=0).reshape(1, -1)
    if sparsity.is_nm:
        g = score.reshape(W.shape[0], -1, sparsity.m)
        idx = torch.topk(g, sparsity.n, dim=-1, largest=False)[1]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(W.shape)
    k = int(W.shape[1] * sparsity.ratio)
    idx = torch.sort(score, dim=-1)[1][:, :k]
    return torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)


def sparsegpt_direct(W, X, sparsity: Sparsity):
    _, mask = textbook_obs(W, 2 / X.shape[0] * X.t().double() @ X.double(), sparsity)
    return mask


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("method,direct", [("wanda", wanda_direct), ("sparsegpt", sparsegpt_direct)])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_expert_masks_equal_a_direct_computation_from_its_routed_tokens(kind, method, direct, pattern):
    model = tiny(kind)
    ids = calibration()
    inputs = routed_inputs(kind, model, ids)
    dense = {e: {r: w.detach().clone() for r, w in expert_matrices(kind, experts_module(model.model.layers[0]), e).items()}
             for e in inputs}
    before = block_weights(model)
    report = prune(model, PruneConfig(method=method, sparsity=pattern, moe_min_tokens=0), ids)
    sp = Sparsity.parse(pattern)
    _check_pruned(kind, model, before, sp)
    # the record counts every 2+-D block weight, routers included: what a direct count of zeros gives
    assert report.overall_sparsity == pytest.approx(_direct_overall(model), abs=1e-9)
    reasons = {u["reason"] for u in report.to_dict()["unpruned"]}
    assert "router" in reasons and "norm" in reasons
    expert_rows = [r for r in report.layers if r.tokens is not None]
    assert len(expert_rows) == 2 * 4 * 3 and all(r.statistics == "routed" for r in expert_rows)
    assert sum(r.tokens for r in expert_rows if r.name.endswith("down_proj")) == 2 * ids.numel() * 2  # top-2
    if kind in ("qwen2_moe", "deepseek_v3"):  # the shared expert is pruned like a dense MLP
        shared = [r for r in report.layers if "shared_expert" in r.name and r.how != "router"]
        assert shared and all(r.sparsity >= 0.5 for r in shared)
    experts = experts_module(model.model.layers[0])
    for e, (x, h, _) in inputs.items():
        pruned = expert_matrices(kind, experts, e)
        for role, X in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
            want = direct(dense[e][role], X, sp)
            got = pruned[role] == 0
            agree = float((want == got).float().mean())
            assert agree == 1.0, f"{kind} expert {e} {role}: {agree:.4f} of the mask agrees"


def test_all_token_statistics_and_the_few_token_fallback():
    kind, sp = "mixtral", Sparsity.parse("0.5")
    ids = calibration()
    model = tiny(kind)
    inputs = routed_inputs(kind, model, ids)
    experts = experts_module(model.model.layers[0])
    dense = {e: expert_matrices(kind, experts, e)["gate_proj"].detach().clone() for e in inputs}
    # every token through every expert: the statistics of block 0's MoE input, whatever the routing
    every = torch.cat([x for x, _, _ in inputs.values()])  # routed tokens, each repeated top-k times
    calls = []
    h = experts.register_forward_pre_hook(lambda m, a: calls.append(a[0].detach().clone()))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j:j + 1])
    h.remove()
    all_tokens = torch.cat(calls)
    assert all_tokens.shape[0] * 2 == every.shape[0]
    report = prune(model, PruneConfig(method="wanda", sparsity=sp, moe_calibration="all"), ids)
    for e in inputs:
        got = expert_matrices(kind, experts, e)["gate_proj"] == 0
        assert torch.equal(got, wanda_direct(dense[e], all_tokens, sp))
    rows = [r for r in report.layers if ".layers.0.mlp.experts." in r.name]
    assert {r.statistics for r in rows} == {"all tokens"}
    # routed tokens are still counted: each of the 128 tokens goes to 2 experts
    assert sum(r.tokens for r in rows if r.name.endswith("gate_proj")) == 4 * 32 * 2
    # --moe-min-tokens above every expert's count: each falls back to all-token statistics (same masks)
    model2 = tiny(kind)
    report2 = prune(model2, PruneConfig(method="wanda", sparsity=sp, moe_min_tokens=10**6), ids)
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(model2.named_parameters())[n]), n
    counts = {e: sum(c) for e, (_, _, c) in inputs.items()}
    for r in report2.layers:
        if ".layers.0.mlp.experts." in r.name and r.tokens is not None:
            e = int(r.name.split(".experts.")[1].split(".")[0])
            assert r.tokens == counts[e]
            assert r.statistics == f"all tokens (routed {counts[e]} < 1000000)"
    # a threshold between the counts: only the experts below it fall back
    low = sorted(counts.values())[1]
    report3 = prune(tiny(kind), PruneConfig(method="wanda", sparsity=sp, moe_min_tokens=low), ids)
    fell = {int(r.name.split(".experts.")[1].split(".")[0]) for r in report3.layers
            if ".layers.0.mlp.experts." in r.name and r.statistics and r.statistics.startswith("all")}
    assert fell == {e for e, c in counts.items() if c < low}


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_gate_weighted_statistics_equal_a_direct_computation(kind):
    """--moe-calibration weighted: each routed token's row scaled by its gate weight (Wanda's norms and
    SparseGPT's Hessian weigh it by g^2)."""
    sp = Sparsity.parse("0.5")
    for method, direct in (("wanda", wanda_direct), ("sparsegpt", sparsegpt_direct)):
        model = tiny(kind)
        ids = calibration()
        inputs = routed_inputs(kind, model, ids)
        experts = experts_module(model.model.layers[0])
        dense = {e: {r: w.detach().clone() for r, w in expert_matrices(kind, experts, e).items()} for e in inputs}
        report = prune(model, PruneConfig(method=method, sparsity=sp, moe_calibration="weighted", moe_min_tokens=0), ids)
        for e, (x, h, _) in inputs.items():
            g = GATES[(id(model), e)].unsqueeze(-1)
            pruned = expert_matrices(kind, experts, e)
            for role, X in (("gate_proj", x * g), ("up_proj", x * g), ("down_proj", h * g)):
                assert torch.equal(pruned[role] == 0, direct(dense[e][role], X, sp)), (method, e, role)
        assert {r.statistics for r in report.layers if r.tokens is not None} == {"routed, gate-weighted"}


def test_routed_and_all_token_statistics_give_different_masks():
    ids = calibration()
    a, b = tiny("qwen3_moe"), tiny("qwen3_moe")
    prune(a, PruneConfig(method="wanda", sparsity=0.5, moe_min_tokens=0), ids)
    prune(b, PruneConfig(method="wanda", sparsity=0.5, moe_calibration="all"), ids)
    ea, eb = experts_module(a.model.layers[0]), experts_module(b.model.layers[0])
    assert not torch.equal(ea.gate_up_proj == 0, eb.gate_up_proj == 0)


def test_unknown_experts_layout_is_refused_before_any_weight_is_read():
    cfg = transformers.Llama4TextConfig(hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=128, num_local_experts=4, head_dim=16)
    with torch.device("meta"):  # no weight exists at all: the refusal must come from the structure alone
        model = transformers.Llama4ForCausalLM(cfg)
    with pytest.raises(D2PruneError, match=r"Llama4TextExperts.*refusing rather than report a sparsity"):
        prune(model, PruneConfig(method="wanda"), calibration())


def test_bad_moe_options_are_one_line_errors():
    with pytest.raises(D2PruneError, match="--moe-calibration"):
        PruneConfig(moe_calibration="every")
    with pytest.raises(D2PruneError, match="--moe-min-tokens"):
        PruneConfig(moe_min_tokens=-1)


# --------------------------------------------------------------------------- the command line, saved outputs
def _cli_prune(folder, out, *extra):
    from conftest import C4
    from d2prune.cli import main

    assert main(["-q", "prune", "--model", str(folder), "--nsamples", "4", "--seqlen", "64", "--calib-file", str(C4),
                 "--no-eval", "--out", str(out), *extra]) == 0


@needs_shared
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])  # per-expert checkpoint tensors / fused 3-D ones
def test_moe_cli_outputs_dense_and_compressed_load_back_equal(tmp_path, kind):
    import json

    from conftest import STORIES
    from moe_models import save_with_tokenizer
    from transformers import AutoModelForCausalLM

    save_with_tokenizer(kind, tmp_path / "dense", STORIES)
    _cli_prune(tmp_path / "dense", tmp_path / "out", "--method", "wanda", "--sparsity", "2:4")
    _cli_prune(tmp_path / "dense", tmp_path / "comp", "--method", "wanda", "--sparsity", "2:4",
               "--save-format", "compressed")
    record = json.loads((tmp_path / "out" / "d2prune.json").read_text())
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want = out.state_dict()
    for n, p in want.items():  # every expert matrix of the saved model is 2:4
        if ".experts." in n and not n.endswith("bias"):
            m = p.transpose(-1, -2) if kind == "gpt_oss" else p  # [E, in, out] -> rows of inputs
            m = m.reshape(-1, m.shape[-1])
            assert bool(((m == 0).reshape(m.shape[0], -1, 4).sum(-1) >= 2).all()), n
    assert record["overall_sparsity"] == pytest.approx(_direct_overall(out), abs=1e-9)
    assert {u["reason"] for u in record["unpruned"]} >= {"router", "norm"}
    # the compressed folder stores the experts compressed and loads back bit-identical
    comp = AutoModelForCausalLM.from_pretrained(tmp_path / "comp")
    for n, p in comp.state_dict().items():
        assert torch.equal(p, want[n]), n
    from safetensors import safe_open
    names = [k for f in (tmp_path / "comp").glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert any(".experts." in k and k.endswith("_nm_values") for k in names) or any(
        ".experts." in k and k.endswith("_bitmask") for k in names)


def test_finetune_refuses_fused_experts_in_one_line():
    from d2prune.finetune import target_linears

    with pytest.raises(D2PruneError, match="MixtralExperts.*mixture-of-experts"):
        target_linears(tiny("mixtral"))


@needs_shared
def test_moe_crash_resume_is_bit_identical(tmp_path, monkeypatch):
    """A run killed after block 0 of a tiny Qwen3-MoE and resumed gives the
    uninterrupted run's weights and expert rows (token counts included)."""
    import json

    from conftest import STORIES, Crash, crash_after_block
    from moe_models import save_with_tokenizer
    from safetensors.torch import load_file

    save_with_tokenizer("qwen3_moe", tmp_path / "dense", STORIES)
    args = ("--method", "sparsegpt", "--sparsity", "0.5", "--moe-min-tokens", "100")  # some experts fall back
    _cli_prune(tmp_path / "dense", tmp_path / "whole", *args)
    crash_after_block(monkeypatch, 0)
    with pytest.raises(Crash):
        _cli_prune(tmp_path / "dense", tmp_path / "out", *args)
    monkeypatch.undo()
    _cli_prune(tmp_path / "dense", tmp_path / "out", *args)
    a, b = (json.loads((tmp_path / d / "d2prune.json").read_text()) for d in ("whole", "out"))
    assert b["memory"]["resumed_from_block"] == 1
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(a["layers"]) == strip(b["layers"])
    assert any(r["statistics"] and r["statistics"].startswith("all tokens (routed") for r in a["layers"])
    wa, wb = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("whole", "out"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_memory_estimate_counts_every_experts_hessians():
    """A Mixtral-8x7B-shaped block (on the meta device: nothing allocated): the run holds one Gram matrix per
    expert for gate/up (4096^2) and one for down (14336^2) until the block is pruned: 7.1 GB in fp32."""
    from d2prune.io.budget import expert_gram_elements

    cfg = transformers.MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, vocab_size=128)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert 4 * expert_gram_elements(model.model.layers[0]) == 4 * 8 * (4096 ** 2 + 14336 ** 2)


def test_nm_that_does_not_divide_an_expert_matrix_names_it():
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=30, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, vocab_size=128)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(D2PruneError, match=r"model\.layers\.0\.mlp\.experts\.0\.down_proj: its input width 30"):
        prune(model, PruneConfig(method="wanda", sparsity="2:4"), calibration())


@needs_shared
def test_a_deepseek_v3_block_is_read_in_expert_groups_that_fit(tmp_path, capsys):
    """A one-block DeepSeek-V3-shaped checkpoint (256 experts of width 2048, hidden 7168: 22.5 GB of bf16 in the
    block) written as sparse files. Whole, it is refused in one line before a weight is read; the automatic
    choice reads its experts in the largest groups whose estimate fits 8 GB of RAM (docs/moe.md §4)."""
    import importlib.util

    from conftest import C4, ROOT
    from d2prune.cli import main
    from d2prune.io.budget import GB, estimate, expert_group_size
    from d2prune.io.streaming import open_model

    spec = importlib.util.spec_from_file_location("moe_scale", ROOT / "bench" / "moe_scale.py")
    moe_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe_scale)
    folder = moe_scale.build("deepseek-v3", 1, tmp_path / "ds", sparse=True)
    assert main(["-q", "prune", "--model", str(folder), "--method", "sparsegpt", "--stream", "on",
                 "--expert-group", "256", "--nsamples", "2", "--seqlen", "32", "--calib-file", str(C4), "--no-eval",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("d2prune: error: one decoder block needs about")
    assert "with its experts read 256 at a time (--expert-group)" in err[-1]
    assert not (tmp_path / "out").exists()
    opened = open_model(str(folder), "auto", torch.device("cpu"), "on")
    budgets = {}

    def fits(g: int) -> bool:
        opened.source.expert_group = g
        budgets[g] = estimate(opened, 32, 512, torch.device("cpu"), hessians=2)  # SparseGPT, 32 x 512 tokens
        return budgets[g].host_ram <= 8 * GB

    g = expert_group_size(opened, fits)
    assert g is not None and 1 <= g < 256 and not fits(g + 1)
    assert budgets[g].host_ram <= 8 * GB < budgets[g + 1].host_ram
    holds = {}

    def fits_wanda(k: int) -> bool:  # no Hessian at all: larger groups
        opened.source.expert_group = k
        holds[k] = estimate(opened, 32, 512, torch.device("cpu"), hessians=0).host_ram
        return holds[k] <= 8 * GB

    assert expert_group_size(opened, fits_wanda) > g
