"""``--targets`` / ``--ignore`` (PruneConfig.targets / ignore, issue 17): the
layers kept dense are untouched bit for bit, the others pruned exactly to the
target, with every method (D²Prune's frozen strategies included), streamed
or not, resumed or not; d2prune.json records the selection and one row per
layer kept dense; a pattern matching no layer is a one-line error."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import C4, STORIES, crash_after_block, needs_shared, tiny_model
from d2prune import D2PruneError, PruneConfig, find_blocks, find_prunable, prune
from d2prune.cli import main
from d2prune.methods.d2prune.config import D2PruneConfig
from d2prune.io.modeling import weight_matrix

METHODS = ["magnitude", "wanda", "sparsegpt", "ria", "pruner-zero", D2PruneConfig(frozen="k"),
           D2PruneConfig(frozen="auto"), D2PruneConfig(frozen="per-layer"), D2PruneConfig(frozen="outlier")]


def _linears(model) -> dict[str, torch.Tensor]:
    blocks = find_blocks(model)
    return {f"{blocks.prefix}.{i}.{n}": weight_matrix(m).clone()
            for i, b in enumerate(blocks.layers) for n, m in find_prunable(b).items()}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: getattr(m, "frozen", m))
def test_ignored_layers_untouched_and_the_others_exact(method):
    """2:4 on a tiny Llama with the down projections and one k_proj kept
    dense: those are bit-identical to the dense model, every other Linear has
    exactly 2 zeros in every group of 4; the report's rows, ``sparsity`` (the
    pruned layers) and ``overall_sparsity`` (every block Linear) say so."""
    model = tiny_model("llama")
    dense = _linears(model)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (4, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    ignore = (r"mlp\.down_proj", r"layers\.1\.self_attn\.k_proj$")
    report = prune(model, PruneConfig(method=method, sparsity="2:4", device="cpu", ignore=ignore), calib, held)
    after = _linears(model)
    kept = {n for n in after if any(re.search(p, n) for p in ignore)}
    assert len(kept) == 4  # 3 down_proj + one k_proj
    for n, W in after.items():
        if n in kept:
            assert torch.equal(W, dense[n]), n
        else:
            assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2), n
    rows = {r.name: r for r in report.layers}
    assert list(rows) == list(after)  # one row per block Linear, in module order
    assert {n for n, r in rows.items() if r.how == "ignored"} == kept
    assert all(rows[n].error is None and rows[n].sparsity == 0.0 for n in kept)
    assert report.sparsity == 0.5
    pruned_weights = sum(W.numel() for n, W in after.items() if n not in kept)
    total = sum(W.numel() for W in after.values())
    assert report.overall_sparsity == pytest.approx(0.5 * pruned_weights / total, abs=1e-12)
    assert report.to_dict()["config"]["ignore"] == list(ignore)


def test_targets_and_a_block_kept_dense_with_owl_and_auto():
    """``targets`` restricts pruning to the attention of blocks 1-2 (block 0
    has nothing to prune): OWL spreads its allocation over the blocks that
    are pruned, D²Prune's auto search runs, block 0 stays bit-identical."""
    model = tiny_model("llama")
    dense = _linears(model)
    g = torch.Generator().manual_seed(1)
    calib, held = torch.randint(0, 128, (4, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    cfg = PruneConfig(method=D2PruneConfig(frozen="auto"), sparsity=0.5, device="cpu", allocation="owl",
                      targets=(r"self_attn",), ignore=(r"layers\.0\.",))
    report = prune(model, cfg, calib, held)
    after = _linears(model)
    for n, W in after.items():
        pruned = "self_attn" in n and ".layers.0." not in n
        assert torch.equal(W, dense[n]) != pruned, n
    alloc = report.method["allocation"]
    assert alloc["block_weights"][0] == 0 and alloc["block_weights"][1] > 0
    # the allocation's weighted mean over the pruned blocks is the target
    w, s = alloc["block_weights"][1:], alloc["block_sparsity"][1:]
    assert sum(a * b for a, b in zip(w, s)) / sum(w) == pytest.approx(0.5, abs=1e-5)


def test_patterns_matching_nothing_or_invalid_are_refused():
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (2, 8))
    for kw, msg in [({"ignore": "lm_head"}, "--ignore 'lm_head' matches no prunable layer"),
                    ({"targets": ("q_prj",)}, "--targets 'q_prj' matches no prunable layer"),
                    ({"targets": "q_proj", "ignore": "self_attn"}, "leave no layer to prune")]:
        with pytest.raises(D2PruneError, match=re.escape(msg)):
            prune(model, PruneConfig(method="magnitude", device="cpu", **kw), calib)
    with pytest.raises(D2PruneError, match="not a valid regular expression"):
        PruneConfig(ignore="(")
    assert all((W != 0).all() for W in _linears(model).values())  # nothing was pruned


def test_cli_errors_are_one_line(tmp_path, capsys):
    """A bad regular expression is refused before the model loads, a pattern
    matching no layer before any block is pruned: one line, exit 2, no output."""
    out = tmp_path / "out"
    assert main(["prune", "--model", "no/such-model", "--ignore", "(", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ignore '(' is not a valid regular expression" in err
    if STORIES.is_dir() and C4.is_file():
        assert main(["prune", "--model", str(STORIES), "--method", "magnitude", "--targets", "lm_head",
                     "--calib-file", str(C4), "--nsamples", "2", "--seqlen", "32", "--no-eval", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("d2prune: error: --targets 'lm_head' matches no prunable layer")
    assert not out.exists()


@needs_shared
def test_cli_record_streaming_and_resume(tmp_path, monkeypatch):
    """The CLI records the selection (config and one ``ignored`` row per layer
    kept dense); streamed equals in memory; the selection is part of the
    resume identity, and a crashed run resumes to the uninterrupted weights."""
    from safetensors.torch import load_file

    def weights(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    args = ["--method", "wanda", "--sparsity", "0.5", "--ignore", r"down_proj", "--ignore", r"layers\.4\.",
            "--calib-file", str(C4), "--no-eval", "--nsamples", "2", "--seqlen", "32"]

    def run(out, *extra):
        return main(["-q", "prune", "--model", str(STORIES), *args, "--out", str(tmp_path / out), *extra])

    assert run("mem", "--stream", "off") == 0 and run("st", "--stream", "on") == 0
    rec = json.loads((tmp_path / "mem" / "d2prune.json").read_text())
    assert rec["config"]["ignore"] == ["down_proj", r"layers\.4\."] and rec["config"]["targets"] == []
    dense_in = weights(STORIES)
    mem = weights(tmp_path / "mem")
    ignored = [r["name"] for r in rec["layers"] if r["how"] == "ignored"]
    assert len(ignored) == 5 + 6  # every down_proj, and block 4's other six Linears
    for r in rec["layers"]:
        W = mem[r["name"] + ".weight"]
        if r["how"] == "ignored":
            assert torch.equal(W, dense_in[r["name"] + ".weight"]) and r["error"] is None
        else:
            assert torch.all((W == 0).sum(1) == W.shape[1] // 2), r["name"]
    assert rec["sparsity"] == 0.5 and rec["overall_sparsity"] < 0.5
    st = weights(tmp_path / "st")
    assert st.keys() == mem.keys() and all(torch.equal(st[k], mem[k]) for k in mem)

    crash_after_block(monkeypatch, 2, KeyboardInterrupt)
    assert run("out", "--stream", "off") == 130
    monkeypatch.undo()
    # another selection must not pick up the finished blocks
    assert main(["-q", "prune", "--model", str(STORIES), *args, "--ignore", "q_proj", "--out", str(tmp_path / "out"),
                 "--stream", "off"]) == 2
    assert run("out", "--stream", "off") == 0
    got = weights(tmp_path / "out")
    assert all(torch.equal(got[k], mem[k]) for k in mem)
    assert json.loads((tmp_path / "out" / "d2prune.json").read_text())["memory"]["resumed_from_block"] == 3


def test_finetune_adapts_the_pruned_layers_only():
    """``d2prune finetune`` adapts the Linears d2prune.json lists as pruned:
    not those kept dense (``how: ignored``), which stay as the user kept them."""
    from d2prune.finetune import target_linears

    model = tiny_model("llama")
    names = list(_linears(model))
    record = {"layers": [{"name": n, "how": "ignored" if "down_proj" in n else "wanda"} for n in names]}
    assert target_linears(model, record) == [n for n in names if "down_proj" not in n]
    assert target_linears(model, {}) == names


def test_a_mixture_of_experts_router_is_never_pruned_nor_a_target():
    """Qwen2-MoE's shared_expert_gate (a Linear beside the experts) keeps every weight; the shared expert is pruned
    like a dense MLP; a --targets pattern that only names the gate matches nothing prunable (one line)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gates = {i: b.mlp.shared_expert_gate.weight.detach().clone() for i, b in enumerate(find_blocks(model).layers)}
    assert all("shared_expert_gate" not in n for b in find_blocks(model).layers for n in find_prunable(b))
    report = prune(model, PruneConfig(method="wanda", sparsity=0.5, device="cpu"), torch.randint(0, 128, (2, 16)))
    for i, b in enumerate(find_blocks(model).layers):
        assert torch.equal(b.mlp.shared_expert_gate.weight, gates[i])
        w = b.mlp.shared_expert.down_proj.weight
        assert int((w == 0).sum()) == w.numel() // 2
    # listed as left alone, for its reason (so the overall sparsity counts it), never as pruned
    assert {r.how for r in report.layers if "shared_expert_gate" in r.name} == {"router"}
    with pytest.raises(D2PruneError, match="shared_expert_gate"):
        prune(AutoModelForCausalLM.from_config(cfg), PruneConfig(method="wanda", sparsity=0.5, device="cpu",
                                                                 targets=["shared_expert_gate"]),
              torch.randint(0, 128, (2, 16)))
