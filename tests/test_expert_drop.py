"""Whole experts removed (``--drop-experts``, docs/moe.md §5), on tiny random
models of each MoE family (tests/moe_models.py).

* REAP's scores equal a direct computation from the model's own forward: the
  arguments each experts module receives (hooked) and each expert's output
  computed by hand from its matrices;
* the smaller model is the original with the dropped experts taken out of
  routing - their router logits -inf (DeepSeek-V3: their selection scores
  too, since its sigmoid router adds a correction bias before choosing) - for
  every router type: softmax then top-k with and without renormalisation
  (Mixtral, Qwen3-MoE, OLMoE; Qwen2-MoE), top-k then softmax (GPT-OSS),
  sigmoid with grouped choice (DeepSeek-V3);
* the saved output loads with ``from_pretrained`` as a smaller model of the
  same class, streamed equals in memory, a run resumes bit-identically, and
  what cannot be done is refused in one line before any weight is read."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from torch.nn import functional as F

import moe_models
from conftest import C4, Crash, crash_after_block
from d2prune import PruneConfig, prune
from d2prune.cli import main
from d2prune.errors import D2PruneError
from test_stream_mapping import _checkpoint, _tensors

ARCHS = moe_models.ARCHS


def _ids(n=4, length=32, seed=1):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _grouped_deepseek():
    """DeepSeek-V3 with its grouped choice on: 8 experts in 2 groups, the best group first."""
    cfg = moe_models.config("deepseek_v3")
    cfg.n_routed_experts, cfg.n_group, cfg.topk_group = 8, 2, 1
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _model(kind):
    return _grouped_deepseek() if kind == "deepseek_v3_grouped" else moe_models.tiny(kind)


def _masked_logits(model, ids, dropped: dict[int, list[int]]) -> torch.Tensor:
    """The original model's logits with experts ``dropped[block]`` out of routing."""
    routers = {}
    for i, block in enumerate(model.model.layers):
        gate = getattr(block.mlp, "gate", None) or block.mlp.router
        routers[gate.weight.data_ptr()] = dropped.get(i, [])
        if hasattr(gate, "e_score_correction_bias") and dropped.get(i):
            gate.e_score_correction_bias[dropped[i]] = float("-inf")  # never chosen
    real = F.linear

    def linear(x, w, b=None):
        out = real(x, w, b)
        if w.data_ptr() in routers and routers[w.data_ptr()]:
            out = out.clone()
            out[..., routers[w.data_ptr()]] = float("-inf")
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", linear)
        with torch.no_grad():
            return model(ids).logits


@pytest.mark.parametrize("kind", [*ARCHS, "deepseek_v3_grouped"])
@pytest.mark.parametrize("score", ["reap", "frequency"])
def test_the_smaller_model_is_the_original_without_the_dropped_experts(kind, score):
    model = _model(kind)
    original = _model(kind)
    ids = _ids()
    amount = 4 if kind == "deepseek_v3_grouped" else 2  # half the experts
    report = prune(model, PruneConfig(method="magnitude", sparsity=0, drop_experts=amount, expert_score=score), ids)
    E = original.config.n_routed_experts if "deepseek" in kind else \
        getattr(original.config, "num_local_experts", None) or original.config.num_experts
    assert len(report.dropped_experts) == original.config.num_hidden_layers
    dropped = {r["block"]: [d["expert"] for d in r["dropped"]] for r in report.dropped_experts}
    for i, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        assert experts.gate_up_proj.shape[0] == E - amount and experts.num_experts == E - amount
        keep = [e for e in range(E) if e not in dropped[i]]
        assert torch.equal(experts.down_proj, original.model.layers[i].mlp.experts.down_proj[keep])
        if kind == "deepseek_v3_grouped":  # as many from each group of 4
            assert sorted(e // 4 for e in dropped[i]) == [0, 0, 1, 1]
    assert (model.config.n_routed_experts if "deepseek" in kind else
            getattr(model.config, "num_local_experts", None) or model.config.num_experts) == E - amount
    test = _ids(2, 24, seed=5)
    with torch.no_grad():
        got = model(test).logits
    want = _masked_logits(original, test, dropped)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_reap_scores_equal_a_direct_computation_from_the_models_forward(kind):
    """Block 0's scores: for each expert, the mean over the tokens routed to it
    of (its gate weight) x ||its output||, from the arguments the experts
    module receives in the model's own forward and the expert's matrices."""
    model = moe_models.tiny(kind)
    ids = _ids()
    experts = model.model.layers[0].mlp.experts
    calls = []
    h = experts.register_forward_hook(lambda m, args, out: calls.append([a.detach().clone() for a in args[:3]]))
    with torch.no_grad():
        for j in range(ids.shape[0]):  # one sample per forward, as the engine
            model(ids[j:j + 1])
    h.remove()
    E = experts.gate_up_proj.shape[0]
    total, count = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.long)
    for x, idx, w in calls:
        for e in range(E):
            tok, pos = torch.where(idx == e)
            if not len(tok):
                continue
            m = moe_models.expert_matrices(kind, experts, e)
            xe = x[tok]
            y = (F.silu(xe @ m["gate_proj"].t()) * (xe @ m["up_proj"].t())) @ m["down_proj"].t()
            total[e] += (w[tok, pos].double() * y.double().norm(dim=-1)).sum()
            count[e] += len(tok)
    want = total / count.clamp(min=1)
    report = prune(model, PruneConfig(method="magnitude", sparsity=0, drop_experts=1), ids)
    rec = report.dropped_experts[0]
    assert rec["block"] == 0 and rec["tokens"] == count.tolist()
    torch.testing.assert_close(torch.tensor(rec["scores"], dtype=torch.float64), want, rtol=1e-5, atol=1e-9)
    assert [d["expert"] for d in rec["dropped"]] == [int(want.argmin())]


def _cli(folder, out, *extra, stream="off", method=("--method", "sparsegpt", "--sparsity", "0.5")) -> dict:
    assert main(["-q", "prune", "--model", str(folder), *method, "--stream", stream, "--calib-file", str(C4),
                 "--nsamples", "2", "--seqlen", "16", "--no-eval", "--seed", "0", "--out", str(out), *extra]) == 0
    return json.loads((out / "d2prune.json").read_text())


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_drop_then_prune_streamed_equals_in_memory_and_loads(tmp_path_factory, tmp_path, arch):
    """REAP 50% then SparseGPT 50% in one command: the streamed output equals
    the in-memory one, in the checkpoint's layout with fewer experts; it loads
    as the same class with the new count, and every remaining expert matrix
    is at the target."""
    folder = _checkpoint(tmp_path_factory, arch)
    mem = _cli(folder, tmp_path / "mem", "--drop-experts", "0.5")
    _cli(folder, tmp_path / "st", "--drop-experts", "0.5", stream="on")
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "st")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(a) < len(_tensors(folder)) or any(a[k].shape != v.shape for k, v in _tensors(folder).items() if k in a)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "st", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    moe_blocks = [b for b in model.model.layers if hasattr(b.mlp, "experts")]
    assert moe_blocks and all(b.mlp.experts.gate_up_proj.shape[0] == 2 for b in moe_blocks)
    experts = [r for r in mem["layers"] if ".experts." in r["name"] and r["how"] == "sparsegpt"]
    assert len(experts) == 3 * 2 * len(moe_blocks) and all(0.5 <= r["sparsity"] < 0.52 for r in experts)
    assert [len(r["dropped"]) for r in mem["dropped_experts"]] == [2] * len(moe_blocks)
    with torch.no_grad():
        model(torch.arange(8)[None])


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
@pytest.mark.parametrize("stream", ["off", "on"])
def test_a_bf16_checkpoint_stays_bf16_and_shrinks(tmp_path_factory, tmp_path, stream):
    """A bf16 checkpoint computes in fp32 on a CPU: the tensors cut by the
    removal go back to bf16 like the rest, so the output is the input's
    layout and dtypes, with half the experts' bytes fewer."""
    folder = _checkpoint(tmp_path_factory, "qwen3_moe", torch.bfloat16)
    _cli(folder, tmp_path / "out", "--drop-experts", "0.5", stream=stream, method=("--method", "magnitude",
                                                                                     "--sparsity", "0"))
    given, out = _tensors(folder), _tensors(tmp_path / "out")
    assert {t.dtype for t in out.values()} == {t.dtype for t in given.values()}
    assert all(out[k].dtype == given[k].dtype for k in out)
    experts = lambda ts: sum(t.numel() * t.element_size() for k, t in ts.items() if ".experts." in k)  # noqa: E731
    rest = lambda ts: sum(t.numel() * t.element_size() for k, t in ts.items() if ".experts." not in k)  # noqa: E731
    assert experts(out) * 2 == experts(given)
    assert rest(out) == rest(given) - sum(t.numel() * t.element_size() // 2 for k, t in given.items()
                                          if k.endswith("mlp.gate.weight"))


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
def test_a_run_that_drops_experts_resumes_bit_identically(tmp_path_factory, tmp_path, monkeypatch):
    """Killed after block 0 is committed: the rerun removes block 0's dropped
    experts from the model again before putting its saved weights back."""
    folder = _checkpoint(tmp_path_factory, "mixtral")
    whole = _cli(folder, tmp_path / "whole", "--drop-experts", "2", stream="on")
    crash_after_block(monkeypatch, 0)
    with pytest.raises(Crash):
        _cli(folder, tmp_path / "out", "--drop-experts", "2", stream="on")
    monkeypatch.undo()
    again = _cli(folder, tmp_path / "out", "--drop-experts", "2", stream="on")
    assert again["memory"]["resumed_from_block"] == 1
    assert again["dropped_experts"] == whole["dropped_experts"]
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind,config,message", [
    ("llama", dict(drop_experts=0.5), "has none (a dense model)"),
    ("mixtral", dict(drop_experts=3), "leaves 1 of the 4 experts of block 0, fewer than the 2"),
    ("mixtral", dict(drop_experts=0.1), "removes no expert"),
    ("mixtral", dict(drop_experts=2, method="pruner-zero"), "its gradients are taken through the whole model"),
    ("mixtral", dict(drop_experts=2, method="d2prune"), "each candidate would drop other experts"),
    ("deepseek_v3_grouped", dict(drop_experts=3), "must remove a multiple of 2 experts"),
])
def test_what_cannot_be_dropped_is_refused_before_pruning(kind, config, message):
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128)) if kind == "llama" else _model(kind)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(D2PruneError, match=re.escape(message)):
        prune(model, PruneConfig(**{"method": "wanda", "sparsity": 0.5, **config}), _ids(), heldout=_ids(2, seed=3))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc"])
def test_bad_drop_amounts_are_refused_by_the_cli(value, capsys, tmp_path):
    try:
        code = main(["prune", "--model", str(tmp_path / "missing"), f"--drop-experts={value}"])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "drop-experts" in err[-1] and len(err) == 1 or "usage:" in err[0], err
