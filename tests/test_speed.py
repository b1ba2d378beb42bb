"""``d2prune speed``: the 2:4 pattern check, the CSR-backed forward against
the dense one, the CPU table through the CLI, the one-line refusal of
``--device cuda`` without an sm80+ GPU, and (on such a GPU) the
semi-structured swap and its timings."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from d2prune.errors import D2PruneError
from d2prune.ops.masks import lowest_per_row, nm_mask
from d2prune.io.modeling import weight_matrix
from d2prune.deploy.speed import (CSRLinear, TimingConfig, block_linears, check_2to4, compare_logits, cuda_capable,
                           measure_cpu, model_logits, nm_violation, random_sparse, swap_csr_, unique_shapes)

ROOT = Path(__file__).resolve().parents[1]
# (d_out, d_in) of the tiny LLaMA's block Linears: q/o, k/v (2 KV heads of 32), gate/up, down
TINY_SHAPES = {(128, 128), (64, 128), (256, 128), (128, 256)}
needs_sm80 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                                reason="2:4 semi-structured kernels need an NVIDIA GPU of compute capability >= 8.0")


def tiny_llama(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def prune_(model, sparsity: str):
    """Magnitude pruning of the block Linears: "2:4" or "0.5" per row."""
    for layer in block_linears(model).values():
        w = layer.weight
        score = w.abs().float()
        w[nm_mask(score, 2, 4) if sparsity == "2:4" else lowest_per_row(score, float(sparsity))] = 0
    return model


def save_with_tokenizer(model, folder: Path) -> Path:
    """``save_pretrained`` plus a word-level tokenizer over the vocabulary:
    ``load_model`` loads a tokenizer with every model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pruned_24_folder(tmp_path_factory):
    return save_with_tokenizer(prune_(tiny_llama(), "2:4"), tmp_path_factory.mktemp("tiny24"))


# --------------------------------------------------------------------------- 2:4 pattern
def test_2to4_checker_accepts_24_and_names_first_offending_layer():
    model = prune_(tiny_llama(), "2:4")
    layers = block_linears(model)
    assert set(unique_shapes(layers)) == TINY_SHAPES and len(layers) == 14  # 7 per block, no lm_head
    assert all(nm_violation(weight_matrix(m)) is None for m in layers.values())
    check_2to4(layers)  # no error

    bad = "model.layers.1.mlp.up_proj"
    w = layers[bad].weight.data
    zeros = (w[5, 8:12] == 0).nonzero().flatten()
    assert len(zeros) == 2
    w[5, 8 + zeros[0]] = 0.25  # a third non-zero in that group of 4
    assert nm_violation(w) == "row 5, inputs 8-11 hold 3 non-zeros"
    with pytest.raises(D2PruneError, match=r"layer model\.layers\.1\.mlp\.up_proj is not 2:4 sparse \(row 5, inputs 8-11"):
        check_2to4(layers)
    # a 50% unstructured model is not 2:4: its first block Linear is named
    with pytest.raises(D2PruneError, match=r"layer model\.layers\.0\.self_attn\.q_proj is not 2:4"):
        check_2to4(block_linears(prune_(tiny_llama(), "0.5")))


def test_nm_violation_width_not_multiple_of_4():
    assert "not a multiple of 4" in nm_violation(torch.zeros(4, 6))


# --------------------------------------------------------------------------- CPU: CSR forward
@pytest.mark.parametrize("sparsity", ["2:4", "0.5"])
def test_csr_swap_matches_dense_forward(sparsity):
    dense = prune_(tiny_llama(), sparsity)
    swapped = copy.deepcopy(dense)
    names = swap_csr_(swapped)
    assert len(names) == 14
    for name, layer in block_linears(dense).items():
        csr = swapped.get_submodule(name)
        assert isinstance(csr, CSRLinear) and csr.weight.layout == torch.sparse_csr
        assert csr.weight._nnz() == torch.count_nonzero(layer.weight).item() == layer.weight.numel() // 2
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = dense(ids).logits, swapped(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # independently of compare_logits
    check = compare_logits(ref, got, 1e-3)
    assert check.ok and check.max_abs_diff == (ref - got).abs().max().item() and check.argmax_agreement == 1.0


def test_csr_linear_with_bias_and_batched_input():
    lin = torch.nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        lin.weight[torch.rand(32, 64, generator=torch.Generator().manual_seed(3)) < 0.7] = 0
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(CSRLinear(lin)(x), lin(x), atol=1e-5, rtol=1e-5)


def test_logits_check_catches_a_wrong_swap():
    dense = prune_(tiny_llama(), "0.5")
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    ref = model_logits(dense, ids)
    wrong = copy.deepcopy(dense)
    with torch.no_grad():  # a swap that lost the sign of one row of one layer
        wrong.model.layers[0].mlp.down_proj.weight[3] *= -1
    swap_csr_(wrong)
    check = compare_logits(ref, model_logits(wrong, ids), 1e-3)
    assert not check.ok and check.max_abs_diff > check.tolerance
    assert not compare_logits(ref, ref * float("nan"), 1e-3).ok  # NaN logits never pass
    with pytest.raises(D2PruneError, match="shapes differ"):
        compare_logits(ref, ref[:, :-1], 1e-3)


def test_random_sparse_has_exactly_that_many_zeros():
    g = torch.Generator().manual_seed(0)
    for s in (0.5, 0.7, 0.8, 0.9):
        w = random_sparse((63, 129), s, g)
        assert (w == 0).sum().item() == round(s * w.numel())


def test_measure_cpu_figures():
    model = prune_(tiny_llama(), "0.5")
    names = list(block_linears(model))
    res = measure_cpu(model, [0.5, 0.9], [1], TimingConfig(min_run_time=0.01))
    assert res["logits_check"]["ok"] and res["logits_check"]["max_abs_diff"] <= res["logits_check"]["tolerance"]
    assert res["model_block_sparsity"] == pytest.approx(0.5)
    rows = res["gemm"]
    assert {tuple(r["shape"]) for r in rows} == TINY_SHAPES and len(rows) == 4 * 3  # 2 random + the model's own
    for r in rows:
        assert r["dense_us"] > 0 and r["csr_mm_us"] > 0 and r["csr_linear_us"] > 0 and r["bsr_mm_us"] > 0
        assert r["csr_mm_speedup"] == pytest.approx(r["dense_us"] / r["csr_mm_us"])
    own = [r for r in rows if r["weights"].startswith("model: ")]
    assert len(own) == 4 and all(r["sparsity"] == pytest.approx(0.5) for r in own)
    assert sorted(r["sparsity"] for r in rows if r["weights"].startswith("random")) == [0.5] * 4 + [0.9] * 4
    assert all(isinstance(model.get_submodule(n), CSRLinear) for n in names)  # swapped in place


# --------------------------------------------------------------------------- command line
def test_cli_cpu_table(pruned_24_folder, tmp_path, capsys):
    from d2prune.cli import main

    out_json = tmp_path / "speed.json"
    rc = main(["speed", str(pruned_24_folder), "--device", "cpu", "--tokens", "1", "--sparsities", "0.5",
               "--min-run-time", "0.01", "--json", str(out_json), "--markdown", str(tmp_path / "speed.md"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    for d_out, d_in in TINY_SHAPES:
        assert f"| {d_out} x {d_in} |" in out
    assert "logits check OK" in out and "machine:" in out and f"torch {torch.__version__}" in out
    res = json.loads(out_json.read_text())
    assert res["device"] == "cpu" and len(res["gemm"]) == 4 * 2 and res["logits_check"]["ok"]
    assert res["model_block_sparsity"] == pytest.approx(0.5)
    assert (tmp_path / "speed.md").read_text().strip() == out.strip()


@pytest.mark.skipif(cuda_capable(), reason="this machine has an sm80+ CUDA GPU")
def test_cli_cuda_without_gpu_is_one_line_exit_2(pruned_24_folder, capsys):
    from d2prune.cli import main

    rc = main(["speed", str(pruned_24_folder), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("d2prune: error: --device cuda:") and "8.0" in err


@pytest.mark.parametrize("flags, msg", [(["--sparsities", "0.5,1.5"], "--sparsities"), (["--tokens", "x"], "--tokens"),
                                        (["--min-run-time", "0"], "--min-run-time")])
def test_cli_bad_flags_are_one_line_exit_2(pruned_24_folder, capsys, flags, msg):
    from d2prune.cli import main

    rc = main(["speed", str(pruned_24_folder), "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"d2prune: error: {msg}")


def test_compressed_folder_loads_dense(pruned_24_folder, tmp_path):
    compress = pytest.importorskip("d2prune.deploy.compress")
    if not all(hasattr(compress, n) for n in ("compress_folder", "is_compressed", "from_pretrained")):
        pytest.skip("d2prune.deploy.compress has no compressed-checkpoint loader yet")
    from d2prune.deploy.speed import load_for_speed

    out = tmp_path / "compressed"
    compress.compress_folder(pruned_24_folder, out)
    assert compress.is_compressed(out)
    got = load_for_speed(str(out), torch.float32)
    ref = load_for_speed(str(pruned_24_folder), torch.float32)
    for name, layer in block_linears(ref).items():
        assert torch.equal(got.get_submodule(name).weight, layer.weight), name


def test_gpu_bench_script_cpu_parts():
    """bench/speed_gpu.py imports and, built small on the CPU, gives an exact 2:4 model."""
    spec = importlib.util.spec_from_file_location("speed_gpu", ROOT / "bench" / "speed_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model(2, torch.float32, "cpu", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=256)
    mod.prune_24_(model)
    layers = block_linears(model)
    check_2to4(layers)
    assert all(torch.count_nonzero(m.weight).item() == m.weight.numel() // 2 for m in layers.values())
    assert torch.count_nonzero(model.lm_head.weight).item() == model.lm_head.weight.numel()  # lm_head stays dense


# --------------------------------------------------------------------------- CUDA (sm80+)
@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_swap_keeps_logits(dtype):
    from torch.sparse import SparseSemiStructuredTensor

    from d2prune.deploy.speed import REL_TOLERANCE, swap_semi_structured_

    model = prune_(tiny_llama(), "2:4").to("cuda", dtype)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    ref = model_logits(model, ids)
    report = swap_semi_structured_(model)
    assert len(report.swapped) + len(report.kept_dense) == 14 and report.swapped
    for name in report.swapped:
        assert isinstance(model.get_submodule(name).weight, SparseSemiStructuredTensor), name
    check = compare_logits(ref, model_logits(model, ids), REL_TOLERANCE[dtype])
    assert check.ok, check.line()


@needs_sm80
def test_gemm_and_model_timings_are_positive():
    from d2prune.deploy.speed import measure_cuda

    model = prune_(tiny_llama(), "2:4")
    res = measure_cuda(model, [1, 2], [16], torch.float16, TimingConfig(min_run_time=0.01))
    assert res["logits_check"]["ok"]
    assert {tuple(r["shape"]) for r in res["gemm"]} == TINY_SHAPES
    for r in res["gemm"]:
        assert r["dense_us"] > 0 and (r["kept_dense"] is not None or r["sparse_us"] > 0)
    for r in res["model_runs"]:
        assert min(r["prefill_dense_tok_s"], r["prefill_sparse_tok_s"], r["decode_dense_tok_s"], r["decode_sparse_tok_s"]) > 0


@needs_sm80
def test_cuda_refuses_a_model_that_is_not_24():
    from d2prune.deploy.speed import measure_cuda

    with pytest.raises(D2PruneError, match=r"model\.layers\.0\.self_attn\.q_proj is not 2:4"):
        measure_cuda(prune_(tiny_llama(), "0.5"), [1], [16], torch.float16, TimingConfig(min_run_time=0.01))


@needs_sm80
def test_cli_cuda_table(pruned_24_folder, capsys):
    from d2prune.cli import main

    rc = main(["speed", str(pruned_24_folder), "--device", "cuda", "--batch", "1,2", "--seqlen", "16",
               "--min-run-time", "0.01", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "logits check OK" in out and "2:4 backend:" in out
    assert "| 1 | 16 |" in out and "| 2 | 16 |" in out and "| 128 x 256 |" in out
