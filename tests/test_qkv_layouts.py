"""D²Prune on fused and latent attention (issue 19): the rows d2prune calls q,
k and v are the rows the model's own forward reads as queries, keys and values
(GPT-NeoX, BLOOM, Persimmon, GPT-NeoX-Japanese, Falcon's three layouts, GPT-BigCode, CodeGen,
DeepSeek-V2/V3 multi-head latent attention), and a prune freezes exactly them."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import transformers as tf

from d2prune import D2PruneConfig, PruneConfig, prune
from d2prune.evaluation.diagnostics import attention_diff
from d2prune.io.modeling import attention_module, eager_attention, find_blocks, qkv_parts, weight_matrix

import moe_models

C = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=64)
FALCON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, **C)

CONFIGS = {
    "gpt_neox": lambda: tf.GPTNeoXConfig(**C),
    "gpt_neox_japanese": lambda: tf.GPTNeoXJapaneseConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_multiple_size=2,
                                                          max_position_embeddings=64),
    "persimmon": lambda: tf.PersimmonConfig(**C),
    "bloom": lambda: tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4),
    "falcon_new_decoder": lambda: tf.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **FALCON),
    "falcon_multi_query": lambda: tf.FalconConfig(multi_query=True, **FALCON),
    "falcon_per_head": lambda: tf.FalconConfig(multi_query=False, **FALCON),
    "falcon_alibi": lambda: tf.FalconConfig(multi_query=False, alibi=True, **FALCON),
    # names other models use for other layouts: GPT-2's c_attn is [q; k; v] thirds, Phi-3's qkv_proj [q; k; v]
    "gpt_bigcode_multi_query": lambda: tf.GPTBigCodeConfig(multi_query=True, n_embd=32, n_layer=2, n_head=4,
                                                           vocab_size=128, n_positions=64),
    "gpt_bigcode_per_head": lambda: tf.GPTBigCodeConfig(multi_query=False, n_embd=32, n_layer=2, n_head=4,
                                                        vocab_size=128, n_positions=64),
    "codegen": lambda: tf.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, rotary_dim=4),
    # MLA with the q bottleneck (q_a_proj / q_b_proj) and without (q_proj); dense MLPs, except deepseek_v3_moe
    "deepseek_v3": lambda: tf.DeepseekV3Config(q_lora_rank=24, first_k_dense_replace=2, rope_scaling=None, **MLA),
    "deepseek_v2": lambda: tf.DeepseekV2Config(q_lora_rank=None, first_k_dense_replace=2, **MLA),
}


def model_of(arch: str):
    if arch == "deepseek_v3_moe":
        return moe_models.tiny("deepseek_v3")
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def record_qkv(monkeypatch, attn) -> list:
    """Appends ``[queries, keys, values]`` of every forward of ``attn`` as the
    model computes them: the output of its own splitting method where it has
    one (Falcon, Persimmon ``_split_heads``; BLOOM ``_reshape``), the
    arguments of its attention product otherwise (GPT-NeoX-Japanese ``_attn``;
    ``eager_attention_forward`` of GPT-NeoX and DeepSeek)."""
    seen: list = []
    if hasattr(attn, "_attn"):  # before _split_heads: GPT-NeoX-Japanese has one, for something else
        orig = attn._attn

        def product(q, k, v, *a, **kw):
            seen.append([q.clone(), k.clone(), v.clone()])
            return orig(q, k, v, *a, **kw)
        monkeypatch.setattr(attn, "_attn", product)
        return seen
    for split in ("_split_heads", "_reshape"):
        if hasattr(attn, split):
            orig = getattr(attn, split)

            def wrapped(*a, _orig=orig, **kw):
                out = _orig(*a, **kw)
                seen.append([t.clone() for t in out])
                return out
            monkeypatch.setattr(attn, split, wrapped)
            return seen
    module = sys.modules[type(attn).__module__]
    orig = module.eager_attention_forward

    def eager(mod, q, k, v, *a, **kw):
        if mod is attn:
            seen.append([q.clone(), k.clone(), v.clone()])
        return orig(mod, q, k, v, *a, **kw)
    monkeypatch.setattr(module, "eager_attention_forward", eager)
    return seen


def split_layers(model) -> dict[str, list]:
    """Block 0's Linears that d2prune splits into q/k/v roles, with their parts."""
    block = find_blocks(model)[0]
    out = {}
    for name, mod in block.named_modules():
        parts = qkv_parts(name, mod, model.config) if isinstance(mod, torch.nn.Linear) else None
        if parts:
            out[name] = parts
    return out


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_rows_are_split_as_the_forward_reads_them(arch, monkeypatch):
    """Perturb the rows d2prune assigns to one role: exactly the attention
    states of that role change in the model's own forward (both keys and
    values for latent attention's shared latent rows), and every row has one
    role. Where one fused layer holds all three, every element of the role's
    states changes (no row of it was missed)."""
    model = model_of(arch)
    block = find_blocks(model)[0]
    _, attn = attention_module(block)
    seen = record_qkv(monkeypatch, attn)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))

    def states():
        seen.clear()
        with torch.no_grad(), eager_attention(model):
            model(ids, use_cache=False)
        assert len(seen) == 1, arch  # block 0's attention ran once
        return seen[0]

    dense = states()
    layers = split_layers(model)
    assert layers, arch
    roles = {r for parts in layers.values() for role, _ in parts for r in role}
    assert roles == {"q", "k", "v"}, arch
    for name, parts in layers.items():
        layer = block.get_submodule(name)
        d_out = weight_matrix(layer).shape[0]
        every = torch.cat([torch.arange(d_out)[rows] for _, rows in parts])
        assert torch.equal(every.sort().values, torch.arange(d_out)), (arch, name)  # a partition of the rows
        for role, rows in parts:
            w0 = layer.weight.data.clone()
            b0 = None if layer.bias is None else layer.bias.data.clone()
            noise = torch.randn(w0[rows].shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                layer.weight[rows] += noise
                if b0 is not None:
                    layer.bias[rows] += 1.0
            got = states()
            layer.weight.data.copy_(w0)
            if b0 is not None:
                layer.bias.data.copy_(b0)
            changed = {r for r, a, b in zip("qkv", dense, got) if not torch.equal(a, b)}
            assert changed == set(role), (arch, name, role, changed)
            if len(parts) == 3:
                i = "qkv".index(role)
                assert bool((got[i] != dense[i]).all()), (arch, name, role)


PRUNED = ["gpt_neox", "bloom", "falcon_new_decoder", "falcon_multi_query", "falcon_per_head", "deepseek_v3_moe",
          "deepseek_v2"]


def _pruned(arch: str, frozen: str):
    model = model_of(arch)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    held = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    report = prune(model, PruneConfig(method=D2PruneConfig(frozen=frozen), sparsity=0.5, device="cpu"), ids, held)
    return dense, model, report


def _check_frozen_rows(dense, model, report, arch):
    """In every block: the rows of the frozen roles keep their surviving weights
    (D2-Wanda, no update; exactly half of each row pruned), every other role's
    rows are updated (SparseGPT's OBS update moves surviving weights)."""
    frozen_per_block = report.method["frozen_per_block"]
    for i, (bd, bp) in enumerate(zip(find_blocks(dense), find_blocks(model))):
        frozen = frozen_per_block[str(i)]
        seen = set()
        for name, parts in split_layers(dense).items():
            wd, wp = weight_matrix(bd.get_submodule(name)), weight_matrix(bp.get_submodule(name))
            for role, rows in parts:
                d, p = wd[rows], wp[rows]
                kept = p != 0
                if all(r in frozen for r in role):
                    seen.add(role)
                    assert torch.all((~kept).sum(1) == d.shape[1] // 2), (arch, i, name, role)
                    assert torch.equal(p[kept], d[kept]), (arch, i, name, role)
                else:
                    assert not torch.equal(p[kept], d[kept]), (arch, i, name, role)
        assert seen >= set(frozen), (arch, i, frozen)


@pytest.mark.parametrize("arch", PRUNED)
def test_auto_prunes_and_freezes_exactly_the_chosen_rows(arch):
    dense, model, report = _pruned(arch, "auto")
    chosen = report.method["chosen"]
    assert chosen in ("q", "k", "v")
    assert all(v == [chosen] for v in report.method["frozen_per_block"].values())
    _check_frozen_rows(dense, model, report, arch)


@pytest.mark.parametrize("frozen", ["q", "k", "v", "q+v", "k+v", "per-layer", "outlier", "none"])
def test_every_frozen_mode_on_latent_attention(frozen):
    """Latent attention under each --frozen mode; with k and v both frozen the
    shared latent rows of kv_a_proj_with_mqa are frozen too, else updated."""
    dense, model, report = _pruned("deepseek_v3", frozen)
    _check_frozen_rows(dense, model, report, "deepseek_v3")
    if frozen == "none":
        assert all(v == [] for v in report.method["frozen_per_block"].values())


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon_new_decoder"])
def test_per_layer_on_interleaved_fused_attention(arch):
    dense, model, report = _pruned(arch, "per-layer")
    _check_frozen_rows(dense, model, report, arch)


@pytest.mark.parametrize("arch", ["gpt_neox", "bloom", "falcon_multi_query", "deepseek_v3"])
def test_attention_diagnostics_run(arch):
    """d2prune diagnose: zero against itself, positive KL after pruning."""
    dense, model, _ = _pruned(arch, "k")
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    same = attention_diff(dense, copy.deepcopy(dense), windows, torch.device("cpu"))
    assert all(r.kl == 0 and r.rmse == 0 for r in same)
    rows = attention_diff(dense, model, windows, torch.device("cpu"))
    assert len(rows) == 2 and all(r.kl > 0 and r.rmse > 0 for r in rows)


def test_bloom_diagnostics_rmse_is_the_attention_output_without_the_residual():
    """BLOOM's attention module returns its output with the residual added; the
    diagnostics' RMSE is of the attention's own output (its ``dense``
    projection), from each model's own forward."""
    from conftest import forward_calls

    dense, model, _ = _pruned("bloom", "k")
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    rows = attention_diff(dense, model, windows, torch.device("cpu"))
    outs = []
    for m in (dense, model):
        calls = forward_calls(m, {i: b.self_attention.dense for i, b in enumerate(find_blocks(m))}, windows)
        outs.append([torch.cat([out for _, out in calls[i]]).double() for i in sorted(calls)])
    for r, yd, yp in zip(rows, *outs):
        assert r.rmse == pytest.approx(float((yp - yd).pow(2).mean().sqrt()), rel=1e-4), r


def test_layouts_the_config_does_not_define_are_refused():
    """A fused query_key_value of a model type whose layout d2prune does not
    know, or whose row count the config does not explain, and latent attention
    without its config fields: one-line errors naming --frozen none."""
    from types import SimpleNamespace

    from d2prune import D2PruneError

    layer = torch.nn.Linear(32, 96)
    with pytest.raises(D2PruneError, match="layout d2prune does not know for model type 'mystery'.*--frozen none"):
        qkv_parts("attn.query_key_value", layer, SimpleNamespace(model_type="mystery", num_attention_heads=4,
                                                                 hidden_size=32))
    with pytest.raises(D2PruneError, match=r"cannot split fused q/k/v layer attn.query_key_value \(96 rows\)"):
        qkv_parts("attn.query_key_value", layer, SimpleNamespace(model_type="falcon", num_attention_heads=4,
                                                                 hidden_size=32, multi_query=True))
    with pytest.raises(D2PruneError, match="latent attention but the config has no"):
        qkv_parts("self_attn.kv_b_proj", layer, SimpleNamespace(num_attention_heads=4))
    mla = SimpleNamespace(num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
                          v_head_dim=6, q_lora_rank=24)
    with pytest.raises(D2PruneError, match=r"kv_b_proj \(96 rows, the config gives 56\)"):
        qkv_parts("self_attn.kv_b_proj", layer, mla)
